"""The GPU fast path of every pipeline: dtype casts, CUDA-graph replay of the per-scale transformer steps, and the
kernels and precision tricks installed onto the models from outside (the model files hold only the maths).

* :class:`CUDAGraphScaleSteps` records one CUDA graph per scale for fixed input shapes (KV cache storage, inputs and
  outputs at static addresses) and replays it: at batch 1 a next-scale transformer spends most of its time launching
  thousands of small kernels, and a replay costs one launch per scale.
* Installed by giving a module a subclass of its class with ``forward`` (or another method) replaced, one subclass for
  every module of a class (or, for a block's residual methods, on the instance), so parameter names and
  ``state_dict`` never change, and undone by ``disable_fast_inference``:
  - :func:`fuse_ffn_gelu_`: fc1's bias and the tanh GELU in the cuBLASLt epilogue of the matmul (large scales);
  - :func:`quantize_linears_fp8_`: float8 matmuls for the attention and FFN linears (large scales, opt-in);
  - :func:`compile_adaln_blocks_` / :func:`compile_star_blocks_`: ``torch.compile`` of each block's elementwise work,
    split around the KV cache; VAR's blocks chained across block boundaries, keys and values written into the cache
    by the projection piece (:func:`_chained_block_stack`, :data:`CHAIN_VAR_BLOCKS`);
  - :func:`separable_upsample_`: VAR / STAR code maps upsampled by a separable bicubic;
  - :func:`pad_narrow_convs_`: the RGB output conv computed with zero-padded channels (compiled decoder);
  - :func:`channel_sum_group_norm_`: the compiled decoders' GroupNorm statistics as per-channel sums (large batches);
  - :func:`subpixel_upsample_`: the decoders' nearest 2x upsampling + 3x3 conv as one 2x2 conv on the small map
    (opt-in while it is measured on the GPU: ``benchmarks/bench_pipelines.py --modes fast-compile-all-subpixel``).
* :func:`use_compile_cache`: torch.compile's on-disk caches in a lasting folder, shared by the processes of a machine.
* :class:`FastInferenceMixin` holds the switches, the cache of captured graph sets and the graph-or-eager transformer
  step every pipeline uses.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from torch import nn

from ..file_utils import make_folder, write_atomic
from ..loaders import adapter_state
from ..models.bitwise_vae import Upsample as BitwiseUpsample
from ..models.blocks import AdaLNSelfAttentionBlock, CosineSelfAttention, FeedForward, memoized
from ..models.loading import FAST_PATH_ATTRIBUTE
from ..models.multiscale_vq import MultiScaleResidualQuantizer, Upsample2x
from ..models.star_transformer import STARBlock

logger = logging.get_logger(__name__)

FAST_INFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# STAR and Infinity sample inside their whole-scale CUDA graphs only for images of at most this many tokens at the last
# scale (256 px): there batch 1 is bound by the host launching the sampler's kernels, while at 1024 px the GPU already
# hid them and the graphs' pool only held the sampler's large temporaries (BENCHMARKS.md, session 32)
WHOLE_SCALE_SAMPLING_MAX_TOKENS = 16 * 16


# torch.compile modes ``compile_decoder`` takes besides True / False. The modes that replay the decoder as CUDA graphs
# of torch's own ("reduce-overhead", "max-autotune") are refused: measured, they gain nothing beside the pipeline's
# per-scale graphs, and a process that had run another fast pipeline crashed in them (BENCHMARKS.md, session 11).
DECODER_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
REFUSED_DECODER_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def check_fast_inference_args(dtype, **flags) -> None:
    """Argument checks of ``enable_fast_inference`` (a ValueError names the parameter)."""
    if not isinstance(dtype, torch.dtype) or dtype not in FAST_INFERENCE_DTYPES:
        names = ", ".join(str(d) for d in FAST_INFERENCE_DTYPES)
        raise ValueError(f"`dtype` must be one of {names}, got {dtype!r}.")
    for name, value in flags.items():
        if name == "compile_decoder" and isinstance(value, str):
            if value not in DECODER_COMPILE_MODES:
                modes = ", ".join(repr(m) for m in DECODER_COMPILE_MODES)
                why = (
                    " (torch's CUDA graphs of the decoder are not supported beside the pipeline's own: use"
                    " 'max-autotune-no-cudagraphs')"
                    if value in REFUSED_DECODER_COMPILE_MODES
                    else ""
                )
                raise ValueError(
                    f"`compile_decoder` must be True, False or a torch.compile mode ({modes}), got {value!r}{why}."
                )
        elif name == "compile_blocks" and not isinstance(value, bool):
            compile_blocks_shapes(value)
        elif name == "compile_decoder" and not isinstance(value, bool):
            modes = ", ".join(repr(m) for m in DECODER_COMPILE_MODES)
            raise ValueError(
                f"`compile_decoder` must be True, False or a torch.compile mode ({modes}), got {value!r}."
            )
        elif not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    if flags.get("fp8") and dtype != torch.bfloat16:
        raise ValueError(f"`fp8=True` needs `dtype=torch.bfloat16` (the float8 matmuls write bf16), got {dtype}.")


# ----------------------------------------------------------------------------------------------
# Compile caches
# ----------------------------------------------------------------------------------------------
COMPILE_CACHE_ENV = "DIFFUSERS_VAR_COMPILE_CACHE"


def default_compile_cache() -> Path:
    """``$XDG_CACHE_HOME/diffusers_var/torch_compile`` (``~/.cache/...`` without it)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusers_var" / "torch_compile"


COMPILE_CACHE_TORCH_FILE = ".diffusers_var_torch_version"  # in a compile cache folder: the torch that fills it


def use_compile_cache(directory: str | os.PathLike | None = None) -> Path:
    """Keep torch.compile's on-disk caches (Inductor's compiled graphs, AOTAutograd's, Triton's kernels) in a lasting
    folder, so that another process on the machine (a restarted demo or server, the next sampling job) loads the
    fast path's compiled code instead of compiling it again. Call it before the first compile of the process
    (``enable_fast_inference(compile_decoder=True, compile_blocks=True)`` compiles lazily, at the first call).

    The folder: ``directory``, else ``$DIFFUSERS_VAR_COMPILE_CACHE``, else a ``TORCHINDUCTOR_CACHE_DIR`` already set,
    else :func:`default_compile_cache` (torch's own default is a temporary folder). It is created if missing; nothing
    in it is ever deleted by this package. A folder that already holds compiled graphs made with this torch version
    (it notes the version in :data:`COMPILE_CACHE_TORCH_FILE`) also turns Inductor's pool of compile workers off for
    this process (one compile thread), unless ``TORCHINDUCTOR_COMPILE_THREADS`` says otherwise: with a warm cache
    little is left to compile, and starting the pool cost more than it saved. Returns it.
    """
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"`directory` must be a folder path (str or os.PathLike) or None, got {directory!r}.")
    if directory is None:
        directory = os.environ.get(COMPILE_CACHE_ENV) or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    path = Path(directory or default_compile_cache()).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"`directory` must be a folder for torch.compile's caches, got the file {path}.")
    make_folder(path, "directory")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by Inductor at every cache access
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # the defaults of recent torch, set in case a user turned them off
    marker = path / COMPILE_CACHE_TORCH_FILE
    same_torch = marker.is_file() and marker.read_text().strip() == torch.__version__
    if same_torch and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ and any((path / "fxgraph").glob("*")):
        inductor_config.compile_threads = 1  # a warm cache: see the docstring (BENCHMARKS.md, session 14)
    if not same_torch:  # graphs of another torch never hit (its version is in their keys): this one's from now on
        try:
            write_atomic(marker, lambda tmp: tmp.write_text(torch.__version__))
        except OSError:  # a read-only shared cache: it is only read, and the worker pool stays
            pass
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):  # older torch: the FX graph cache alone
        pass
    return path


# ----------------------------------------------------------------------------------------------
# Casts
# ----------------------------------------------------------------------------------------------
def cast_module_(module: nn.Module | None, dtype: torch.dtype) -> None:
    """In place: floating parameters and buffers of ``module`` to ``dtype``, except the sub-modules a model keeps in
    float32, which go to float32 without passing through ``dtype`` (their values stay exact): a diffusers
    ``ModelMixin``'s ``_keep_in_fp32_modules`` at any dtype (output heads and their norms, where the logits are
    produced), a transformers model's as ``from_pretrained`` keeps them (``_keep_in_fp32_modules`` for float16, such
    as T5's ``wo``; ``_keep_in_fp32_modules_strict`` for float16 and bfloat16).

    Each module is cast on its own (``nn.Module._apply`` without recursion), so a diffusers ``ModelMixin`` does not
    warn about a partial cast. ``None`` (an absent component) is skipped."""
    if module is None:
        return
    keep = kept_in_float32(module, dtype)
    for name, sub in module.named_modules():
        target = torch.float32 if keep & set(name.split(".")) else dtype
        sub._apply(functools.partial(_cast_floating, dtype=target), recurse=False)


def kept_in_float32(module: nn.Module, dtype: torch.dtype) -> set[str]:
    """The names of the sub-modules of ``module`` that its library keeps in float32 when it is loaded in ``dtype``."""
    if isinstance(module, ModelMixin):
        return set(module._keep_in_fp32_modules or ())
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return keep


def _cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def cast_decoder_(
    modules: Sequence[nn.Module], dtype: torch.dtype, compile_module: nn.Module | None = None, mode: str = "default"
) -> None:
    """The image decoder (and the convs feeding it) to ``dtype``; optionally ``torch.compile`` one module in
    place, in torch.compile's ``mode`` (parameter names, hence ``save_pretrained``, are unchanged). Compiled, the
    decoder also goes channels-last: cuDNN's channels-last convolutions are faster and the compiled GroupNorm reads
    that layout directly. Eager, it stays NCHW: eager GroupNorm copies channels-last inputs at every call
    (BENCHMARKS.md). Compiled with automatic dynamic shapes: a process that decodes one batch size keeps kernels
    specialised on it, and the second size makes the batch dimension dynamic, so later sizes compile nothing (with
    one graph per size, a ninth size passed dynamo's recompile limit and decoded eagerly), but for one graph from
    16 images on (the convolutions' layout rule), where GroupNorm also takes per-channel sums
    (:data:`CHANNEL_SUM_GROUP_NORM_MIN_BATCH`, :func:`channel_sum_group_norm_`)."""
    memory_format = torch.channels_last if compile_module is not None else torch.contiguous_format
    for module in modules:
        nn.Module.to(module, dtype=dtype, memory_format=memory_format)
    if compile_module is not None:
        pad_narrow_convs_(compile_module)
        channel_sum_group_norm_(compile_module)  # large batches: inductor's GroupNorm reduction read them slowly
        compile_module.compile(mode=mode)


# ----------------------------------------------------------------------------------------------
# Kernels installed on module instances
# ----------------------------------------------------------------------------------------------
# A kernel replaces a method through a subclass of the module's class, shared by every module of that class, not a
# bound partial on each instance: torch.compile guards on the method it calls, so a per-instance partial made every
# block compile its own graph (30 blocks: past dynamo's recompile limit, then eager).
_KERNEL_CLASSES: dict[tuple, type] = {}  # (class, method name, function, extra args) -> subclass


def _install(module: nn.Module, name: str, function: Callable, *args) -> None:
    """Make ``module.<name>(...)`` call ``function(module, *args, ...)`` (undone by :func:`_uninstall`); a kernel
    installed earlier under ``name`` is replaced, not wrapped."""
    _uninstall(module, name)
    module.__class__ = _kernel_class((type(module), name, function, args))


def _kernel_class(key: tuple) -> type:
    """The subclass of ``key[0]`` whose method ``key[1]`` calls ``key[2](self, *key[3], ...)`` (made once)."""
    if key not in _KERNEL_CLASSES:
        base, name, function, args = key

        def method(self, *call_args, **call_kwargs):
            return function(self, *args, *call_args, **call_kwargs)

        # the same name and module as the original class: reprs and lookups by class name are unchanged
        attributes = {
            name: method,
            "_fast_path_kernel": key,
            "__module__": base.__module__,
            "__reduce_ex__": _reduce_with_kernels,
        }
        _KERNEL_CLASSES[key] = type(base.__name__, (base,), attributes)
    return _KERNEL_CLASSES[key]


def _installed_kernels(module: nn.Module) -> tuple[type, list[tuple]]:
    """The class ``module`` had before any kernel, and the kernels installed on it (innermost first)."""
    installed, cls = [], type(module)
    while "_fast_path_kernel" in cls.__dict__:
        installed.insert(0, cls._fast_path_kernel)
        cls = cls.__bases__[0]
    return cls, installed


def _reduce_with_kernels(module: nn.Module, protocol: int):
    """Pickling, ``torch.save`` and ``copy.deepcopy`` of a module with kernels installed: the kernel classes are made
    at run time, so pickle cannot find them by name; the module is rebuilt from its own class with the same kernels
    installed again (:func:`_rebuild_with_kernels`), its state as ``nn.Module`` gives it."""
    base, installed = _installed_kernels(module)
    _constructor, _arguments, *state = object.__reduce_ex__(module, max(protocol, 2))
    return (_rebuild_with_kernels, (base, tuple(installed)), *state)


def _rebuild_with_kernels(base: type, installed: tuple[tuple, ...]) -> nn.Module:
    module = base.__new__(base)
    for _base, name, function, args in installed:
        module.__class__ = _kernel_class((type(module), name, function, args))
    return module


def _uninstall(module: nn.Module, name: str) -> None:
    """Give ``module`` back its class's own ``<name>`` if a kernel was installed in its place (other kernels stay)."""
    cls, installed = _installed_kernels(module)
    if all(key[1] != name for key in installed):
        return
    module.__class__ = cls
    for _base, other_name, function, args in installed:
        if other_name != name:
            _install(module, other_name, function, *args)


def pad_narrow_convs_(module: nn.Module, multiple: int = 32) -> int:
    """Make every ``Conv2d`` of ``module`` whose output channels are not a multiple of ``multiple`` (in the decoders:
    only the RGB ``conv_out``) compute with zero-padded extra output channels and drop them: for fewer than 32 output
    channels cuDNN's heuristics pick a generic channels-last kernel, 12x slower than the tensor-core implicit GEMM it
    picks for 32 (BENCHMARKS.md). Returns how many convolutions were padded."""
    padded = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.out_channels % multiple:
            _install(conv, "forward", _padded_conv_forward, multiple)
            padded += 1
    return padded


def _padded_conv_forward(conv: nn.Conv2d, multiple: int, x: torch.Tensor) -> torch.Tensor:
    extra = -conv.out_channels % multiple
    weight = F.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, extra))
    bias = None if conv.bias is None else F.pad(conv.bias, (0, extra))
    return conv._conv_forward(x, weight, bias)[:, : conv.out_channels]


# From this many images a compiled decoder takes its GroupNorm statistics as per-channel sums (faster from 16 images
# on, slower up to 8, BENCHMARKS.md session 22); 16 is also where the convolutions' layout rule splits the batch
# dimension, so the sums add no graph of their own
CHANNEL_SUM_GROUP_NORM_MIN_BATCH = 16
# And at any batch size on maps of at least this many positions (None: never): one 1024 px image's largest maps are as
# many positions as 16 images of 256 px (at batch 1: Infinity-2B -3.7%, STAR-d30 -3.7%, BENCHMARKS.md session 30). A
# static shape, so it adds no guard on the dynamic batch dimension.
CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS: int | None = 512 * 512


def channel_sum_group_norm_(
    module: nn.Module | None, enabled: bool = True, min_batch: int = CHANNEL_SUM_GROUP_NORM_MIN_BATCH
) -> int:
    """Install (``enabled``) or remove, on every ``GroupNorm`` of ``module`` (the image decoders), a GroupNorm that,
    from ``min_batch`` images on, takes its statistics as per-channel sums over the image (a reduction over rows
    whose channels are contiguous in the channels-last decoder), added up per group afterwards. torch.compile makes of
    ``F.group_norm`` a reduction over each group's (channels, height, width), which with 5 of 160 contiguous channels
    a group read VAR's largest decoder maps at a small share of the memory bandwidth. Installed by
    :func:`cast_decoder_` on compiled decoders. Returns how many norms it found (each now in the requested form)."""
    changed = 0
    for norm in module.modules() if module is not None else ():
        if isinstance(norm, nn.GroupNorm):
            _uninstall(norm, "forward")
            if enabled:
                _install(norm, "forward", _channel_sum_group_norm_forward, min_batch)
            changed += 1
    return changed


def _channel_sum_group_norm_forward(norm: nn.GroupNorm, min_batch: int, x_BCHW: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; from ``min_batch`` images on, from float32 sums per (image, channel) of ``x - pivot`` and its
    square, the pivot a value of each (image, group) (its first channel's first pixel), so that the variance from sums
    does not cancel for a group far from zero; per group: mean = pivot + S1 / n, variance = S2 / n - (S1 / n)^2."""
    B, C, H, W = x_BCHW.shape
    large_map = CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS is not None and H * W >= CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS
    if B < min_batch and not large_map:
        return F.group_norm(x_BCHW, norm.num_groups, norm.weight, norm.bias, norm.eps)
    G = norm.num_groups
    x = x_BCHW.float()
    pivot_BG = x[:, :: C // G, 0, 0]  # (B, G)
    centred = x - pivot_BG.repeat_interleave(C // G, dim=1)[:, :, None, None]
    s1_BG = centred.sum(dim=(2, 3)).view(B, G, -1).sum(-1)
    s2_BG = centred.square().sum(dim=(2, 3)).view(B, G, -1).sum(-1)
    n = x.numel() // (B * G)
    shift_mean_BG = s1_BG / n
    rstd_BG = (s2_BG / n - shift_mean_BG.square()).clamp_min(0).add(norm.eps).rsqrt()
    scale_BC = rstd_BG.repeat_interleave(C // G, dim=1)
    shift_BC = -(pivot_BG + shift_mean_BG).repeat_interleave(C // G, dim=1) * scale_BC
    if norm.affine:
        scale_BC, shift_BC = scale_BC * norm.weight.float(), shift_BC * norm.weight.float() + norm.bias.float()
    return (x * scale_BC[:, :, None, None] + shift_BC[:, :, None, None]).to(x_BCHW.dtype)


def subpixel_upsample_(module: nn.Module | None, enabled: bool = True) -> int:
    """Install (``enabled``) or remove the sub-pixel form of every decoder upsampler in ``module`` (VAR / STAR's
    ``Upsample2x``, Infinity's ``Upsample``): nearest 2x upsampling followed by a 3x3 conv equals, for each of the
    four output phases, a 2x2 conv of the small map, so one 2x2 conv with 4x the output channels on the zero-padded
    small map, interleaved, gives the same output with 4 instead of 9 multiply-adds per output value and input
    channel, and without the upsampled copy of the input (float32: the same values up to summation order). Returns
    how many upsamplers it found (each now in the requested form)."""
    changed = 0
    for upsampler in module.modules() if module is not None else ():
        if isinstance(upsampler, (Upsample2x, BitwiseUpsample)):
            _uninstall(upsampler, "forward")
            if enabled:
                _install(upsampler, "forward", _subpixel_upsample_forward)
            changed += 1
    return changed


# Row a of phase p: the weights of the two small-map taps of output phase p (0: even rows, 1: odd rows), read off the
# three taps of the 3x3 conv over the upsampled map. Even output row 2i sees upsampled rows 2i-1, 2i, 2i+1, i.e.
# small rows i-1, i, i (taps: k0 | k1 + k2); odd row 2i+1 sees small rows i, i, i+1 (taps: k0 + k1 | k2).
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def subpixel_weights(weight_OI33: torch.Tensor) -> torch.Tensor:
    """(4 O, I, 2, 2): the 3x3 kernel folded into the 2x2 kernel of each output phase (row phase, column phase),
    summed in float32."""
    taps_P23 = torch.tensor(_PHASE_TAPS, dtype=torch.float32, device=weight_OI33.device)
    folded = torch.einsum("apk,bql,oikl->aboipq", taps_P23, taps_P23, weight_OI33.float())
    return folded.reshape(4 * weight_OI33.shape[0], weight_OI33.shape[1], 2, 2).to(weight_OI33.dtype)


def _subpixel_upsample_forward(upsampler: nn.Module, x_BCHW: torch.Tensor) -> torch.Tensor:
    conv = upsampler.conv
    B, _, H, W = x_BCHW.shape
    C_out = conv.out_channels
    bias = None if conv.bias is None else conv.bias.repeat(4)
    # phase (a, b) of output pixel (2i + a, 2j + b) is the 2x2 conv at (i + a, j + b) of the map padded by one
    phases = F.conv2d(F.pad(x_BCHW, (1, 1, 1, 1)), subpixel_weights(conv.weight), bias).view(
        B, 2, 2, C_out, H + 1, W + 1
    )

    def phase(a: int, b: int) -> torch.Tensor:
        return phases[:, a, b, :, a : a + H, b : b + W]

    if x_BCHW.is_contiguous(memory_format=torch.channels_last) and not x_BCHW.is_contiguous():
        rows = [torch.stack([phase(a, b).permute(0, 2, 3, 1) for b in (0, 1)], dim=3) for a in (0, 1)]
        return torch.stack(rows, dim=2).reshape(B, 2 * H, 2 * W, C_out).permute(0, 3, 1, 2)  # channels-last
    rows = [torch.stack([phase(a, b) for b in (0, 1)], dim=-1) for a in (0, 1)]
    return torch.stack(rows, dim=3).reshape(B, C_out, 2 * H, 2 * W)


# Token rows (batch x tokens) from which the large-scale kernels run: fc1's bias + GELU in the matmul epilogue (fewer
# rows: cuBLASLt's small-row kernels are slower than the plain matmul plus a separate GELU), and the float8 matmuls
# unless FP8_MIN_ROWS starts them earlier. Compiled pieces are traced once per side of it (``_dynamic_rows``).
LARGE_SCALE_MIN_ROWS = 4096
# fc1's fused GELU from this many rows instead (None: LARGE_SCALE_MIN_ROWS), for measuring the epilogue at small rows
# again (BENCHMARKS.md session 3: slower at batch 1 then; ``bench_pipelines.py --modes fast-compile-all-gelu-always``)
FUSED_GELU_MIN_ROWS: int | None = None
# The float8 matmuls already from this many rows (if fewer; None: from LARGE_SCALE_MIN_ROWS): Infinity-2B at 1024 px,
# batch 1 -3.0%, STAR-d30 even (BENCHMARKS.md session 30). Pieces traced with dynamic rows take one more trace in their
# lower row regime for it (with float8 weights only).
FP8_MIN_ROWS: int | None = 2048


def fuse_ffn_gelu_(model: nn.Module | None, enabled: bool = True) -> int:
    """Install (``enabled``) or remove the fused bias + tanh-GELU forward on every :class:`FeedForward` of ``model``;
    returns how many carry it now."""
    feed_forwards = [m for m in model.modules() if isinstance(m, FeedForward)] if model is not None else []
    for ffn in feed_forwards:
        _uninstall(ffn, "forward")
        if enabled:
            _install(ffn, "forward", _fused_gelu_ffn_forward)
    return len(feed_forwards) if enabled else 0


def _fused_gelu_ffn_forward(ffn: FeedForward, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if (
        uses_fp8(_base_layer(ffn.fc1), x)
        or not x.is_cuda
        or torch.is_grad_enabled()
        or rows < (LARGE_SCALE_MIN_ROWS if FUSED_GELU_MIN_ROWS is None else FUSED_GELU_MIN_ROWS)
        or adds_lora_output(ffn.fc1)
    ):  # an unfused LoRA on fc1: its own forward adds the adapters' update
        # float8 fc1: its GELU fuses with the quantisation of fc2's input in the compiled block instead
        return ffn.fc2(F.gelu(ffn.fc1(x), approximate="tanh"))
    # on CUDA ``_addmm_activation(use_gelu=True)`` is the tanh approximation (exact erf GELU on the CPU)
    hidden = torch._addmm_activation(ffn.fc1.bias, x.reshape(-1, x.shape[-1]), ffn.fc1.weight.t(), use_gelu=True)
    return ffn.fc2(hidden.view(*x.shape[:-1], -1))


def _base_layer(layer: nn.Module) -> nn.Module:
    """The linear under a PEFT LoRA layer (the layer itself otherwise)."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def adds_lora_output(layer: nn.Module) -> bool:
    """Whether ``layer`` is a PEFT LoRA layer whose forward adds an adapter's update to its base layer's output
    (active, enabled, not fused): kernels that read ``layer.weight`` directly (the base weight) must not replace it."""
    if not hasattr(layer, "get_base_layer") or getattr(layer, "disable_adapters", True) or layer.merged:
        return False
    return any(name in getattr(layer, "lora_A", {}) for name in layer.active_adapters)


# float8 linears (opt-in: ``enable_fast_inference(fp8=True)`` of every family)
FLOAT8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_to_float8(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise float8 (e4m3) quantisation: ``(x8, scale)`` with ``x ~= x8 * scale``, ``scale`` (M, 1) float32 chosen
    so that each row's largest magnitude maps to 448 (an all-zero row gets a tiny scale and stays zero)."""
    scale = x_MK.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FLOAT8_MAX
    return (x_MK.float() / scale).to(torch.float8_e4m3fn), scale


def uses_fp8(linear: nn.Linear, x: torch.Tensor) -> bool:
    """Whether ``linear`` runs in float8 for ``x``: it carries float8 weights (:func:`quantize_linears_fp8_`), no
    autograd, and at least ``LARGE_SCALE_MIN_ROWS`` token rows, or :data:`FP8_MIN_ROWS` if fewer."""
    return (
        getattr(linear, "weight_fp8", None) is not None
        and not torch.is_grad_enabled()
        and x.numel() >= fp8_min_rows() * x.shape[-1]
    )


def fp8_min_rows() -> int:
    """The token rows from which the float8 matmuls run (:func:`uses_fp8`)."""
    return LARGE_SCALE_MIN_ROWS if FP8_MIN_ROWS is None else min(LARGE_SCALE_MIN_ROWS, FP8_MIN_ROWS)


_MODULE_BIAS = object()


def _fp8_linear_forward(linear: nn.Linear, x: torch.Tensor, bias=_MODULE_BIAS) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``bias`` defaults to the module's; an :class:`ExternalBiasLinear` passes its
    own), in float8 when :func:`uses_fp8`: activations quantised per row, weights per output channel, float32
    accumulation, output in ``x``'s dtype."""
    bias = linear.bias if bias is _MODULE_BIAS else bias
    if not uses_fp8(linear, x):
        return F.linear(x, linear.weight, bias)
    x8, x_scale = quantize_to_float8(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(
        x8,
        linear.weight_fp8.t(),
        scale_a=x_scale,
        scale_b=linear.weight_fp8_scale,
        bias=None if bias is None else bias.to(x.dtype),
        out_dtype=x.dtype,
    )
    return out.view(*x.shape[:-1], out.shape[-1])


def fp8_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears that ``fp8=True`` runs in float8: attention (qkv, out) and FFN (fc1, fc2) of every
    :class:`CosineSelfAttention` / :class:`FeedForward` in ``model.blocks`` (not the text projections, cross-attention
    or STAR's stable sampler). A ValueError if one has a width that ``torch._scaled_mm`` cannot take (not a multiple of
    16), raised before anything is changed."""
    linears = []
    for module in model.blocks.modules():
        if isinstance(module, CosineSelfAttention):
            linears += [module.to_qkv, module.to_out]
        elif isinstance(module, FeedForward):
            linears += [module.fc1, module.fc2]
    # a LoRA layer's base linear runs in float8; the LoRA layer adds the (unfused) adapters' update to its output
    linears = [_base_layer(linear) for linear in linears]
    for linear in linears:
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(
                f"float8 matmuls need widths divisible by 16, got a {linear.in_features} -> "
                f"{linear.out_features} linear; use `fp8=False` for this model."
            )
    return linears


def quantize_linears_fp8_(model: nn.Module | None, enabled: bool = True) -> int:
    """Give (``enabled``) or take back the float8 copies of the weights of :func:`fp8_linears` and their float8
    forward: per output channel scaled e4m3 weights, as non-persistent buffers ``weight_fp8`` / ``weight_fp8_scale``
    (``state_dict`` and ``save_pretrained`` are unchanged; the original weights stay). Returns how many linears carry
    float8 weights now."""
    if model is None:
        return 0
    if not enabled:
        for module in model.modules():
            if isinstance(module, nn.Linear) and "weight_fp8" in module._buffers:
                for name in ("weight_fp8", "weight_fp8_scale"):
                    module._buffers.pop(name, None)
                _uninstall(module, "forward")
        model.__dict__.pop("_fp8_linears", None)
        return 0
    linears = fp8_linears(model)  # all widths checked before the first buffer is added
    for linear in linears:
        with torch.no_grad():
            weight8, scale = quantize_to_float8(linear.weight)
        linear.register_buffer("weight_fp8", weight8, persistent=False)
        linear.register_buffer("weight_fp8_scale", scale.t().contiguous(), persistent=False)  # (1, N)
        _install(linear, "forward", _fp8_linear_forward)
        linear._fp8_weight_version = linear.weight._version  # what the copy was made from (fp8_copies_stale)
    model.__dict__["_fp8_linears"] = linears  # (a plain list, not submodules: fp8_copies_stale reads it every call)
    return len(linears)


def fp8_copies_stale(model: nn.Module) -> bool:
    """Whether a weight with a float8 copy changed in place since the copy was made (``load_state_dict``, an
    optimizer step, a ``copy_``): the float8 matmuls would compute with the old weights. By the weights' version
    counters: a write through ``weight.data`` bypasses them (call ``enable_fast_inference()`` again after one)."""
    return any(
        linear.weight._version != linear._fp8_weight_version for linear in model.__dict__.get("_fp8_linears", ())
    )


# compiled blocks: the elementwise work of a block (norms, modulation, q/k normalisation, RoPE, gating) fused by
# torch.compile, split around the KV cache (Python state) and the attention kernels
def _modulated_norm(block, x_BLC, scale_plus_one, shift):
    return block.norm(x_BLC).mul(scale_plus_one).add_(shift)


def _attention_inputs(block, x_BLC, scale_plus_one, shift, qkv_bias=None, rotary_cos=None, rotary_sin=None):
    h_BLC = _modulated_norm(block, x_BLC, scale_plus_one, shift)
    return block.attn.project(h_BLC, qkv_bias, rotary_cos, rotary_sin)


def _write_into_cache(keys_BMHD, values_BMHD, start: int, k_BLHD, v_BLHD) -> None:
    """Keys and values written into a KV cache's storage at ``[start, start + L)`` (:meth:`LayerKVCache.reserve`),
    inside the compiled piece that computes them: the kernel that normalises or rotates them stores them there, with
    no copy kernels of the cache's own."""
    end = start + k_BLHD.shape[1]
    keys_BMHD[:, start:end].copy_(k_BLHD)
    values_BMHD[:, start:end].copy_(v_BLHD)


def _attention_inputs_into_cache(
    block, x_BLC, scale_plus_one, shift, keys_BMHD, values_BMHD, start: int, qkv_bias, rotary_cos=None, rotary_sin=None
):
    """:func:`_attention_inputs` with the keys and values written into the KV cache's storage
    (:func:`_write_into_cache`); returns the queries and the softmax scale."""
    q, k, v, softmax_scale = _attention_inputs(block, x_BLC, scale_plus_one, shift, qkv_bias, rotary_cos, rotary_sin)
    _write_into_cache(keys_BMHD, values_BMHD, start, k, v)
    return q, softmax_scale


def _attention_residual(block, x_BLC, attended_BLC, gamma):
    return x_BLC + block.drop_path(block.attn.to_out(attended_BLC) * gamma)


def _split_self_attention_residual(
    block, x_BLC, gamma, scale_plus_one, shift, attn_mask=None, kv_cache=None, rotary=None
):
    attended = _compiled_self_attention(block, x_BLC, (scale_plus_one, shift), attn_mask, kv_cache, rotary)
    return block.compiled_attention_residual(x_BLC, attended, gamma)


def _compiled_self_attention(block, x_BLC, modulation: tuple, attn_mask=None, kv_cache=None, rotary=None):
    """A compiled block's self-attention before ``to_out``, (B, L, C): its projection piece
    (``compiled_attention_inputs(x, *modulation, qkv_bias, *rotary tables)``), the KV cache and the attention kernel.
    Where :func:`writes_kv_in_piece`, the piece ``compiled_attention_inputs_into_cache`` (the same arguments with the
    cache's storage and start position after ``modulation``) writes the keys and values into the cache itself."""
    attn = block.attn
    tables = () if rotary is None else (rotary.cos, rotary.sin)  # rotated inside the compiled piece
    qkv_bias = memoized(kv_cache, "qkv_bias", attn.qkv_bias)  # decoding: once per generation
    if not writes_kv_in_piece(kv_cache, x_BLC, kv_write_below(block.compiled_shapes)):
        q, k, v, softmax_scale = block.compiled_attention_inputs(x_BLC, *modulation, qkv_bias, *tables)
        return attn.attend(q, k, v, softmax_scale, attn_mask, kv_cache)
    B, L, _ = x_BLC.shape
    keys, values, start = kv_cache.reserve(B, L, attn.num_heads, attn.head_dim, x_BLC)
    q, softmax_scale = block.compiled_attention_inputs_into_cache(
        x_BLC, *modulation, keys, values, start, qkv_bias, *tables
    )
    return attn.attend(q, keys[:, : start + L], values[:, : start + L], softmax_scale, attn_mask)


def _cross_attention_query(block, x_BLC):
    return block.cross_attn.query(block.cross_attn_norm(x_BLC))


def _cross_attention_output(block, x_BLC, attended_BLC):
    return x_BLC + block.cross_attn.to_out(attended_BLC)


def _split_cross_attention_residual(block, x_BLC, context_BSC, context_mask_BS=None, kv_cache=None):
    cross_attn = block.cross_attn
    k, v = memoized(kv_cache, "cross_kv", lambda: cross_attn.context_keys_values(context_BSC))
    attended = cross_attn.attend(block.compiled_cross_attention_query(x_BLC), k, v, context_mask_BS)
    return block.compiled_cross_attention_output(x_BLC, attended)


# VAR's blocks chained: the pieces between two attention kernels run as one compiled piece across the block boundary
# (False: each block runs its own compiled pieces, as Infinity's do; read at every call, so graphs captured after a
# change follow it)
CHAIN_VAR_BLOCKS = True
# the compiled projection pieces write keys and values into the KV cache themselves (VAR's chained blocks, and every
# compiled VAR / Infinity / STAR block on its own): with dynamic shapes below the large scales' rows (above them the
# cache's copies were faster for VAR), with static ones at every scale (not compared there), see
# :func:`writes_kv_in_piece`; False: always the cache's own copies
KV_WRITES_IN_PIECE = True


def kv_write_below(shapes: str) -> int | None:
    """The token rows (batch x tokens) from which the pieces compiled for ``shapes`` leave the keys and values to the
    KV cache's copies: :data:`LARGE_SCALE_MIN_ROWS` with dynamic shapes, never (None) with static ones."""
    return LARGE_SCALE_MIN_ROWS if shapes == "dynamic" else None


def writes_kv_in_piece(kv_cache, x_BLC: torch.Tensor, write_below: int | None) -> bool:
    """Whether a compiled piece writes this call's keys and values into ``kv_cache``'s storage itself: with
    :data:`KV_WRITES_IN_PIECE`, a pre-allocated cache, no autograd or autocast (the storage takes the keys' dtype from
    ``x_BLC``), and fewer token rows than ``write_below`` (:func:`kv_write_below`; None: any number)."""
    return (
        KV_WRITES_IN_PIECE
        and kv_cache is not None
        and kv_cache.max_length is not None
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x_BLC.device.type)
        and (write_below is None or x_BLC.shape[0] * x_BLC.shape[1] < write_below)
    )


def _project_modulated(block, h_BLC, qkv_bias):
    return block.attn.project(h_BLC, qkv_bias)


def _project_into_cache(block, h_BLC, keys_BMHD, values_BMHD, start: int, qkv_bias):
    """The projection of an already modulated input whose keys and values are written straight into the KV cache's
    storage at ``[start, start + L)`` by the kernel that normalises them (no copy kernels); returns the queries and
    the softmax scale. ``qkv_bias`` comes from outside: concatenated in the piece, it was a kernel of its own at every
    call (the projection's matmul needs the bias in memory)."""
    q, k, v, softmax_scale = block.attn.project(h_BLC, qkv_bias)
    _write_into_cache(keys_BMHD, values_BMHD, start, k, v)
    return q, softmax_scale


def _last_block_tail(block, x_BLC, attended_BLC, gamma1, gamma2, scale2_plus_one, shift2):
    """The rest of a block after its attention kernel: output projection, residual, FFN, residual."""
    x_BLC = _attention_residual(block, x_BLC, attended_BLC, gamma1)
    return type(block).ffn_residual(block, x_BLC, gamma2, scale2_plus_one, shift2)


def _block_tail(block, x_BLC, attended_BLC, gamma1, gamma2, scale2_plus_one, shift2, next_scale_plus_one, next_shift):
    """:func:`_last_block_tail`, and the next block's modulated norm (its attention input) in the same piece."""
    x_BLC = _last_block_tail(block, x_BLC, attended_BLC, gamma1, gamma2, scale2_plus_one, shift2)
    return x_BLC, _modulated_norm(block, x_BLC, next_scale_plus_one, next_shift)


def _chained_block_stack(model, x_BLC, block_cond, attn_mask=None, kv_cache=None, write_below: int | None = None):
    """``model._run_block_stack`` with the compiled pieces of consecutive blocks fused across the boundary: each
    block is its projection piece, the attention kernel and one tail piece that also computes the next block's
    modulated norm (the residual add and the next norm share one pass over the rows). When decoding, the projection
    piece writes the keys and values into the KV cache's storage itself (:meth:`LayerKVCache.reserve`), below
    ``write_below`` token rows (None: always). Per block and scale that is four kernels fewer than the per-block
    pieces (two elementwise, two copies; two fewer from ``write_below`` rows on, where the cache copies). With
    autograd (training, gradient checkpointing), autocast, a hook on a block (the chained pieces never call a block)
    or :data:`CHAIN_VAR_BLOCKS` off, the blocks run as they are."""
    blocks = model.blocks
    if (
        not CHAIN_VAR_BLOCKS
        or torch.is_grad_enabled()
        or torch.is_autocast_enabled(x_BLC.device.type)
        or any(_has_forward_hooks(block) for block in blocks)
    ):
        return type(model)._run_block_stack(model, x_BLC, block_cond, attn_mask, kv_cache)
    caches = [kv_cache[i] if kv_cache is not None else None for i in range(len(blocks))]
    modulations = [  # (gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2) of each block, once per generation
        memoized(cache, "adaln", lambda block=block: block.modulation(block_cond))
        for block, cache in zip(blocks, caches)
    ]
    _, _, scale1, _, shift1, _ = modulations[0]
    h_BLC = blocks[0].compiled_modulated_norm(x_BLC, scale1, shift1)
    B, L, _ = x_BLC.shape
    write_in_piece = writes_kv_in_piece(caches[0], h_BLC, write_below)  # (every block's cache is of one kind)
    for i, (block, cache) in enumerate(zip(blocks, caches)):
        attn = block.attn
        qkv_bias = memoized(cache, "qkv_bias", attn.qkv_bias)  # once per generation
        if write_in_piece:  # keys, values written in place
            keys, values, start = cache.reserve(B, L, attn.num_heads, attn.head_dim, h_BLC)
            q, softmax_scale = block.compiled_project_into_cache(h_BLC, keys, values, start, qkv_bias)
            keys, values = keys[:, : start + L], values[:, : start + L]
            attended_BLC = attn.attend(q, keys, values, softmax_scale, attn_mask)
        else:
            q, k, v, softmax_scale = block.compiled_project_modulated(h_BLC, qkv_bias)
            attended_BLC = attn.attend(q, k, v, softmax_scale, attn_mask, cache)
        gamma1, gamma2, _, scale2, _, shift2 = modulations[i]
        if i + 1 == len(blocks):
            return block.compiled_last_block_tail(x_BLC, attended_BLC, gamma1, gamma2, scale2, shift2)
        _, _, next_scale1, _, next_shift1, _ = modulations[i + 1]
        x_BLC, h_BLC = block.compiled_block_tail(
            x_BLC, attended_BLC, gamma1, gamma2, scale2, shift2, next_scale1, next_shift1
        )


def _has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own, global ones, or a diffusers hook registry)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or getattr(module, "_diffusers_hook", None)
        or getattr(module, "_hf_hook", None)
    )


def _chainable(model: nn.Module) -> bool:
    """Whether ``model``'s block stack can run chained: a model with ``_run_block_stack`` (VAR) whose blocks are
    self-attention blocks without cross-attention, all with the same parameter-free norm (a block's tail computes
    the next block's norm with its own)."""
    blocks = list(getattr(model, "blocks", ()))
    norms = {(b.norm.normalized_shape, b.norm.eps, b.norm.elementwise_affine) for b in blocks if hasattr(b, "norm")}
    return (
        hasattr(type(model), "_run_block_stack")
        and len(blocks) > 0
        and all(type(b) is AdaLNSelfAttentionBlock for b in blocks)
        and len(norms) == 1
        and not next(iter(norms))[2]
    )


def compile_blocks_shapes(compile_blocks: bool | str) -> str:
    """The shapes the block pieces are compiled for, from ``enable_fast_inference(compile_blocks=...)``: ``True`` or
    ``"dynamic"``: batch and token dimensions dynamic from the first call, one trace (per row regime,
    :func:`_dynamic_rows`) for every scale and batch size;
    ``"static-tokens"``: every scale its own trace, the batch dynamic (no recompile at another batch size);
    ``"static"``: every scale and batch size its own trace (for jobs of one batch size). Static dimensions fold the
    index arithmetic into constants; with them the chained VAR blocks write keys and values in the projection at every
    scale (BENCHMARKS.md, session 19), and dynamo's recompile limit of the process goes up to
    :data:`STATIC_RECOMPILE_LIMIT` (every scale's trace is a recompile of the shared piece code)."""
    shapes = "dynamic" if compile_blocks is True else compile_blocks
    if not isinstance(shapes, str) or shapes not in _DYNAMIC_DIMS:
        allowed = ", ".join(repr(s) for s in _DYNAMIC_DIMS)
        raise ValueError(f"`compile_blocks` must be True, False or one of {allowed}, got {compile_blocks!r}.")
    return shapes


def compile_adaln_blocks_(model: nn.Module, shapes: bool | str = True) -> int:
    """``torch.compile`` the elementwise work of every :class:`AdaLNSelfAttentionBlock` of ``model`` (in place,
    parameter names unchanged): the residual branches are replaced by versions that run compiled pieces around the
    KV cache and the attention kernels; for VAR (:func:`_chainable`) the block stack runs the pieces chained across
    block boundaries (:func:`_chained_block_stack`). At batch 1 a block's time is mostly its ~26 tiny elementwise
    kernels; compiled, they fuse into a few. The compiled code is shared by all blocks (same class); with
    ``shapes=True`` it is dynamic in the batch and token count from the first call (:func:`_dynamic_rows`), so a
    generation compiles a handful of graphs and another batch size none (other ``shapes``:
    :func:`compile_blocks_shapes`). Blocks compiled before (a transformer shared by pipelines made with ``from_pipe``,
    or CoDe's drafter) are left as they are, with the shapes they were compiled for. Returns the number of blocks."""
    shapes = compile_blocks_shapes(shapes)
    chained = _chainable(model)

    def plan(block):
        pieces = {
            "compiled_attention_inputs": _attention_inputs,
            "compiled_attention_inputs_into_cache": _attention_inputs_into_cache,
            "compiled_attention_residual": _attention_residual,
            "ffn_residual": type(block).ffn_residual,  # compiled whole, under its own name
        }
        methods = {"self_attention_residual": _split_self_attention_residual}
        if hasattr(block, "cross_attention_residual"):
            pieces.update(
                compiled_cross_attention_query=_cross_attention_query,
                compiled_cross_attention_output=_cross_attention_output,
            )
            methods["cross_attention_residual"] = _split_cross_attention_residual
        if chained:
            pieces.update(
                compiled_modulated_norm=_modulated_norm,
                compiled_project_modulated=_project_modulated,
                compiled_project_into_cache=_project_into_cache,
                compiled_block_tail=_block_tail,
                compiled_last_block_tail=_last_block_tail,
            )
        return pieces, methods

    compiled = _compile_block_pieces_(model, AdaLNSelfAttentionBlock, plan, shapes)
    already_chained = getattr(model.__dict__.get("_run_block_stack"), "func", None) is _chained_block_stack
    if chained and not already_chained and all(hasattr(block, "compiled_block_tail") for block in model.blocks):
        # the pieces write keys and values into the cache at every scale when compiled per scale, else below the large
        # scales' rows (from there the cache's copies were faster with dynamic rows)
        model._run_block_stack = types.MethodType(
            functools.partial(_chained_block_stack, write_below=kv_write_below(shapes)), model
        )
    return compiled


# Dynamic dimensions of the compiled block pieces for each ``compile_blocks`` shapes value (see
# :func:`compile_blocks_shapes`); with static dimensions dynamo's recompile limit goes up to STATIC_RECOMPILE_LIMIT.
_DYNAMIC_DIMS = {"dynamic": ("batch", "tokens"), "static-tokens": ("batch",), "static": ()}
STATIC_RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    """Dynamo's recompile limit of the process to at least :data:`STATIC_RECOMPILE_LIMIT` (``cache_size_limit``
    before torch 2.7 named it)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), STATIC_RECOMPILE_LIMIT))


@functools.lru_cache(maxsize=None)
def _warn_compiled_before(compiled: str, requested: str) -> None:
    logger.warning(
        f"`compile_blocks={requested!r}`: the blocks were compiled before for {compiled!r} shapes (a transformer "
        f"shared through `from_pipe`, or enabled twice) and keep them; reload the pipeline to compile them anew."
    )


def _compile_block_pieces_(model: nn.Module, block_class: type, plan: Callable, shapes: str = "dynamic") -> int:
    """For every ``block_class`` block of ``model`` not compiled before: ``plan(block) -> (pieces, methods)``; each
    piece ``function(block, ...)`` is set on the block under its name, compiled with the dynamic dimensions of
    ``shapes`` (:func:`compile_blocks_shapes`), and each method (the block's own, rewritten to call the pieces around
    the KV cache and attention kernels) replaces the block's. Returns the number of blocks."""
    blocks = [m for m in model.modules() if isinstance(m, block_class)]
    dynamic_dims = _DYNAMIC_DIMS[shapes]
    options = {"dynamic": False} if shapes != "dynamic" else {}  # static: only the marked dimensions are dynamic
    if shapes != "dynamic" and any("compiled_attention_inputs" not in block.__dict__ for block in blocks):
        _raise_recompile_limit()  # once, and only when something is compiled
    for block in blocks:
        if "compiled_attention_inputs" in block.__dict__:
            if getattr(block, "compiled_shapes", shapes) != shapes:
                _warn_compiled_before(block.compiled_shapes, shapes)
            continue
        block.compiled_shapes = shapes
        pieces, methods = plan(block)
        for name, function in pieces.items():
            below, above = _row_regime_copies(function)
            compiled = (torch.compile(types.MethodType(copy, block), **options) for copy in (below, above))
            setattr(block, name, _dynamic_rows(*compiled, dynamic_dims=dynamic_dims))
        for name, function in methods.items():
            setattr(block, name, types.MethodType(function, block))
    return len(blocks)


# STAR's plain pre-LayerNorm blocks, compiled the same way: pieces around the KV cache and the attention kernels
def _star_attention_inputs(block, x_BLC, qkv_bias=None, rotary_cos=None, rotary_sin=None):
    return block.attn.project(block.norm(x_BLC), qkv_bias, rotary_cos, rotary_sin)


def _star_attention_inputs_into_cache(
    block, x_BLC, keys_BMHD, values_BMHD, start: int, qkv_bias, rotary_cos=None, rotary_sin=None
):
    q, k, v, softmax_scale = _star_attention_inputs(block, x_BLC, qkv_bias, rotary_cos, rotary_sin)
    _write_into_cache(keys_BMHD, values_BMHD, start, k, v)
    return q, softmax_scale


def _star_attention_residual(block, x_BLC, attended_BLC):
    return x_BLC + block.drop_path(block.attn.to_out(attended_BLC))


def _star_cross_attention_query(block, rows_BLC):
    return block.cross_attn.query(block.norm(rows_BLC))


def _star_ffn_residual(block, x_BLC):
    return x_BLC + block.drop_path(block.ffn(block.norm(x_BLC)))


# STAR's compiled cross-attention query: sessions 13 and 28 read STAR-d30's 0% greedy agreement with it compiled
# (random weights, bf16) as a fault; session 28 found its values right inside a generation and the first token a
# near-tie that one bf16 rounding flips, and session 29's GPU run of the parity fixture's near-tie rule agreed with it
# compiled as with it plain, and STAR-d30 ran faster with it (BENCHMARKS.md). So it runs compiled on CUDA too.
# The switches: False for the blocks runs them uncompiled on CUDA (their own forward, said once); False for the query
# runs it plain there. Set them before the first generation with CUDA graphs: captured graphs keep the code they
# captured.
STAR_COMPILED_BLOCKS_ON_CUDA = True
STAR_COMPILED_CROSS_QUERY_ON_CUDA = True


def star_compiled_pieces_run(x_BLC: torch.Tensor) -> bool:
    """Whether a compiled STAR block runs its compiled pieces for ``x_BLC`` (always on the CPU; on CUDA with
    :data:`STAR_COMPILED_BLOCKS_ON_CUDA`)."""
    return not x_BLC.is_cuda or STAR_COMPILED_BLOCKS_ON_CUDA


def star_compiled_query_runs(rows_BLC: torch.Tensor) -> bool:
    """Whether the cross-attention query of a compiled STAR block runs compiled (always on the CPU; on CUDA only with
    :data:`STAR_COMPILED_CROSS_QUERY_ON_CUDA`)."""
    return not rows_BLC.is_cuda or STAR_COMPILED_CROSS_QUERY_ON_CUDA


@functools.lru_cache(maxsize=1)
def _warn_star_blocks_uncompiled() -> None:
    logger.warning(
        "`compile_blocks=True`: STAR's compiled blocks are switched off on CUDA "
        "(diffusers_var.pipelines.fast_inference.STAR_COMPILED_BLOCKS_ON_CUDA = False); the blocks run uncompiled, "
        "at the speed of `compile_blocks=False`."
    )


def _split_star_block(
    block,
    x_BLC,
    attn_mask=None,
    kv_cache=None,
    rotary=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    cross_attention_row0=False,
):
    """:meth:`STARBlock.forward` with its elementwise work in compiled pieces (on CUDA: see
    :data:`STAR_COMPILED_BLOCKS_ON_CUDA`, :data:`STAR_COMPILED_CROSS_QUERY_ON_CUDA`)."""
    if not star_compiled_pieces_run(x_BLC):
        _warn_star_blocks_uncompiled()
        text = (encoder_hidden_states, encoder_attention_mask, cross_attention_row0)
        return STARBlock.forward(block, x_BLC, attn_mask, kv_cache, rotary, *text)
    attended = _compiled_self_attention(block, x_BLC, (), attn_mask, kv_cache, rotary)
    x_BLC = block.compiled_attention_residual(x_BLC, attended)
    if block.cross_attn is not None:
        cross = block.cross_attn
        rows, context, mask = block.cross_attention_inputs(
            x_BLC, encoder_hidden_states, encoder_attention_mask, cross_attention_row0
        )
        k, v = memoized(kv_cache, "cross_kv", lambda: cross.context_keys_values(context))
        if star_compiled_query_runs(rows):
            q = block.compiled_cross_attention_query(rows)
        else:
            q = _star_cross_attention_query(block, rows)
        x_BLC = block.compiled_cross_attention_output(x_BLC, cross.attend(q, k, v, mask))
    return block.compiled_ffn_residual(x_BLC)


def compile_star_blocks_(model: nn.Module, shapes: bool | str = True) -> int:
    """:func:`compile_adaln_blocks_` for STAR's blocks (the main ones and the stable sampler's): their norms, q/k
    normalisation, RoPE, residuals and FFN go to torch.compile in pieces around the KV cache and the attention
    kernels, with ``shapes=True`` dynamic in the batch and token count from the first call (other ``shapes``:
    :func:`compile_blocks_shapes`). Blocks compiled before are left as they are. Returns the number of blocks."""

    def plan(block):
        pieces = {
            "compiled_attention_inputs": _star_attention_inputs,
            "compiled_attention_inputs_into_cache": _star_attention_inputs_into_cache,
            "compiled_attention_residual": _star_attention_residual,
            "compiled_ffn_residual": _star_ffn_residual,
        }
        if block.cross_attn is not None:
            pieces.update(
                compiled_cross_attention_query=_star_cross_attention_query,
                compiled_cross_attention_output=_cross_attention_output,
            )
        return pieces, {"forward": _split_star_block}

    return _compile_block_pieces_(model, STARBlock, plan, compile_blocks_shapes(shapes))


@functools.cache
def _row_regime_copies(function: Callable) -> tuple[Callable, Callable]:
    """Two copies of ``function``, each with its own code object (dynamo keeps compiled code and its guards per code
    object): one traced for calls below :data:`LARGE_SCALE_MIN_ROWS` token rows, one for calls from it on. Shared by
    every block, as ``function`` is."""

    def copy(regime: str) -> Callable:
        name = f"{function.__name__}_{regime}"
        names = {"co_name": name, **({"co_qualname": name} if sys.version_info >= (3, 11) else {})}
        code = function.__code__.replace(**names)
        clone = types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)
        clone.__kwdefaults__, clone.__qualname__ = function.__kwdefaults__, name
        return clone

    return copy("below_row_split"), copy("above_row_split")


def _dynamic_rows(below: Callable, above: Callable, dynamic_dims: tuple[str, ...] = ("batch", "tokens")) -> Callable:
    """One compiled piece from its two row regimes (:func:`_row_regime_copies`, compiled): the call goes to ``above``
    from :data:`LARGE_SCALE_MIN_ROWS` rows (batch x tokens of its first (B, L, C) argument) on, else to ``below``,
    with the batch and token dimensions of its (B, L, C) arguments marked dynamic, the token dimension of its
    (L, P) RoPE tables (static, they guarded the token count and cost a recompile at the second one) and the batch and
    length of (B, max_length, H, D) KV-cache storage.

    Dynamic dimensions trace a piece once for every batch size and scale instead of specialising on the first. The two
    regimes keep the row threshold of the fused GELU out of the guards: each copy only ever sees one side of it (the
    float8 one, :data:`FP8_MIN_ROWS`, below it, adds one guard to the lower copy). With one copy, that guard came on
    top of the dynamic dimensions, and Infinity with
    ``fp8=True`` passed dynamo's recompile limit (8) on two pieces, which then ran eagerly (H100, session 12). The
    channels stay static (the norms' reductions keep their fixed-size kernels). ``dynamic_dims`` names the dimensions
    marked (:func:`compile_blocks_shapes`)."""
    batch, tokens = "batch" in dynamic_dims, "tokens" in dynamic_dims

    @functools.wraps(below)  # keeps torch.compile's attributes (``_torchdynamo_orig_callable``)
    def call(*args):
        rows = None
        for arg in args:
            if not isinstance(arg, torch.Tensor):
                continue
            if arg.ndim == 3:
                rows = arg.shape[0] * arg.shape[1] if rows is None else rows
                if batch:
                    torch._dynamo.maybe_mark_dynamic(arg, 0)
                if tokens and arg.shape[1] > 1:  # (B, 1, C) modulations stay one row
                    torch._dynamo.maybe_mark_dynamic(arg, 1)
            elif arg.ndim == 2 and arg.shape[0] > 1 and tokens:  # (L, P) RoPE tables
                torch._dynamo.maybe_mark_dynamic(arg, 0)
            elif arg.ndim == 4:  # (B, max_length, H, D) KV-cache storage
                if batch:
                    torch._dynamo.maybe_mark_dynamic(arg, 0)
                if tokens:
                    torch._dynamo.maybe_mark_dynamic(arg, 1)
        return (above if rows is not None and rows >= LARGE_SCALE_MIN_ROWS else below)(*args)

    call.below, call.above = below, above
    return call


def separable_upsample_(vqvae: nn.Module | None, enabled: bool = True) -> None:
    """Install (``enabled``) or remove separable bicubic upsampling of the code maps on the VAR / STAR quantizer."""
    for quantizer in vqvae.modules() if vqvae is not None else ():
        if isinstance(quantizer, MultiScaleResidualQuantizer):
            _uninstall(quantizer, "upsample")
            if enabled:
                _install(quantizer, "upsample", _separable_or_fused_upsample)


def _separable_or_fused_upsample(quantizer, codes_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """On CUDA, for many maps (batch x channels >= 256) of small side (<= 16): the separable form (the fused kernel
    gives one thread per output pixel that loops over every map; its temporary holds ``size**2 * w`` values per map).
    Otherwise the fused kernel."""
    maps = codes_BChw.shape[0] * codes_BChw.shape[1]
    if codes_BChw.is_cuda and maps >= 256 and size <= 16:
        return separable_bicubic_up(codes_BChw, size)
    return F.interpolate(codes_BChw, size=(size, size), mode="bicubic", align_corners=False)


def separable_bicubic_up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling (``align_corners=False``) as two weighted sums with the weight matrices of
    :func:`bicubic_weights`: the same interpolation as ``F.interpolate`` up to float summation order."""
    dtype = x.dtype
    rows = bicubic_weights(x.shape[-2], size, x.device)  # (size, h)
    cols = bicubic_weights(x.shape[-1], size, x.device)  # (size, w)
    # elementwise products and sums, not matmuls: stays exact float32 where TF32 matmuls are enabled
    x = (rows[:, :, None] * x.float()[..., None, :, :]).sum(dim=-2)  # (B, C, size, w)
    return (x[..., None, :] * cols).sum(dim=-1).to(dtype)  # (B, C, size, size)


_BICUBIC_WEIGHTS: dict = {}


def bicubic_weights(in_size: int, out_size: int, device) -> torch.Tensor:
    """(out_size, in_size) float32: row ``o`` holds the weights of every input position in output ``o`` of a 1-D
    bicubic resize (``align_corners=False``, borders clamped), read off ``F.interpolate`` applied to unit vectors."""
    key = (in_size, out_size, str(device))
    if key not in _BICUBIC_WEIGHTS:
        unit_vectors = torch.eye(in_size, dtype=torch.float32).view(in_size, 1, in_size, 1)
        resized = F.interpolate(unit_vectors, size=(out_size, 1), mode="bicubic", align_corners=False)
        _BICUBIC_WEIGHTS[key] = resized[:, 0, :, 0].t().contiguous().to(device)
    return _BICUBIC_WEIGHTS[key]


# ----------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------
class CUDAGraphScaleSteps:
    """One CUDA graph per scale for ``step(scale_index, *shared_inputs, *inputs) -> outputs`` with fixed shapes.

    Args:
        step: the eager per-scale function; it must read the KV cache that ``reset_cache`` rewinds. It may
            return a tensor or a tuple of tensors (the same static tensors are returned at every replay).
        example_inputs: per scale, a tuple of example tensors (shapes and dtypes of the real per-scale inputs;
            ``None`` for an absent input).
        reset_cache: rewinds the KV cache to empty without freeing its storage.
        shared_inputs: example tensors read by every scale (the condition of a generation); set them
            once per generation with :meth:`set_shared_inputs`.
        generator: a CUDA generator that ``step`` draws from (sampling inside the graphs). It is registered with
            every graph, so a replay draws what the eager step would draw from the generator's state at that
            moment and advances it the same way; :meth:`borrow_generator_state` lends it a caller's state.
        first_scale: the scale index of ``example_inputs[0]``: a set for the scales ``first_scale ..`` of a pyramid
            (a generation that another model started) calls ``step`` and is called with the pyramid's indices.
        pool: the memory pool to capture into (``graph_pool_handle`` / another set's ``pool``), e.g. that of a set
            that never replays at the same time (CoDe's other stage); default a new one. The set's is ``self.pool``.
    """

    def __init__(
        self,
        step: Callable,
        example_inputs: Sequence[tuple],
        reset_cache: Callable[[], None],
        shared_inputs: Sequence[torch.Tensor] = (),
        generator: torch.Generator | None = None,
        first_scale: int = 0,
        pool=None,
    ):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device.")
        # The graphs write into whatever ``step`` and ``reset_cache`` close over (the KV cache storage, static
        # buffers) by address, so those must live as long as the graphs: without these references the KV cache was
        # freed once the constructor returned, the replays wrote into memory the allocator had handed back, and the
        # next ``torch.cuda.empty_cache()`` turned that into an illegal memory access.
        self.step, self.reset_cache, self.generator, self.first_scale = step, reset_cache, generator, first_scale
        self.shared_inputs = tuple(t.clone() for t in shared_inputs)
        self.static_inputs = [tuple(None if t is None else t.clone() for t in inputs) for inputs in example_inputs]
        self.graphs, self.outputs = [], []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # warm-up: allocator, cuBLAS / SDPA workspaces
            for _ in range(2):
                reset_cache()
                for si, inputs in enumerate(self.static_inputs, first_scale):
                    step(si, *self.shared_inputs, *inputs)
        torch.cuda.current_stream().wait_stream(side)
        # the warm-up's temporaries are cached for ``side`` alone, which nothing uses again: handed back, they do not
        # add to the graphs' pool and the main stream's blocks in the process's reserved memory
        side.synchronize()
        torch.cuda.empty_cache()
        reset_cache()
        with torch.no_grad():
            for si, inputs in enumerate(self.static_inputs, first_scale):
                graph = torch.cuda.CUDAGraph()
                if generator is not None:
                    graph.register_generator_state(generator)
                with torch.cuda.graph(graph, pool=pool):
                    out = step(si, *self.shared_inputs, *inputs)
                pool = graph.pool()
                self.graphs.append(graph)
                self.outputs.append(out)
        self.pool = pool
        reset_cache()

    def set_shared_inputs(self, *values: torch.Tensor) -> "CUDAGraphScaleSteps":
        """Copy this generation's shared inputs (e.g. the text conditioning) into the static tensors."""
        if len(values) != len(self.shared_inputs):
            raise ValueError(f"expected {len(self.shared_inputs)} shared inputs, got {len(values)}.")
        for static, value in zip(self.shared_inputs, values):
            static.copy_(value, non_blocking=True)
        return self

    @contextmanager
    def borrow_generator_state(self, source: torch.Generator):
        """Within the block the graphs draw from ``source``'s state (seed and offset); afterwards ``source`` has
        advanced as if it had drawn eagerly."""
        self.generator.set_state(source.get_state())
        try:
            yield
        finally:
            source.set_state(self.generator.get_state())

    def __call__(self, scale_index: int, *inputs: torch.Tensor | None):
        index = scale_index - self.first_scale
        for static, value in zip(self.static_inputs[index], inputs):
            if static is not None:
                static.copy_(value, non_blocking=True)
        self.graphs[index].replay()
        return self.outputs[index]


@dataclasses.dataclass(frozen=True)
class FastSettings:
    """What ``enable_fast_inference`` switched on, kept on the transformer it cast and fitted: pipelines that share the
    module (``from_pipe``) share the state, so none of them runs the eager path on fitted modules."""

    enabled: bool = False
    dtype: torch.dtype | None = None
    fp8: bool = False
    cuda_graphs: bool = False


FAST_SETTINGS_ATTRIBUTE = "_diffusers_var_fast_settings"
ROUNDED_ATTRIBUTE = "_diffusers_var_rounded_to"  # the coarsest dtype the fast path ever cast the module's weights to
ADAPTER_STATE_ATTRIBUTE = "_diffusers_var_adapter_state"  # the adapters the float8 copies were made with
# A new object whenever graphs captured over the module would replay stale memory or maths (switches, float8 copies
# remade, adapters changed, weights moved or cast): every pipeline sharing the module drops its graph sets.
GRAPH_TOKEN_ATTRIBUTE = "_diffusers_var_graph_token"
_OFF = FastSettings()


def fast_settings(module: nn.Module | None) -> FastSettings:
    return getattr(module, FAST_SETTINGS_ATTRIBUTE, _OFF)


# where and in which dtype the fast path left a component's first and last weights (watch_weights_)
WATCHED_WEIGHTS_ATTRIBUTE = "_diffusers_var_watched_weights"


def watch_weights_(module: nn.Module, enabled: bool = True) -> None:
    """Record where (storage) and in which dtype the fast path leaves the first and last weights of ``module`` and of
    each of its direct children: a ``.to()``, ``.cuda()`` or ``.half()`` on the component or a part of it (not through
    the pipeline) replaces those weights' storage, which :func:`changed_weights` sees at the next call. A few weights,
    so the check costs nothing per call."""
    module.__dict__.pop(WATCHED_WEIGHTS_ATTRIBUTE, None)
    picked = {}
    for part in (module, *module.children()) if enabled else ():  # each part: the fast path casts some, not others
        named = list(part.named_parameters())
        picked.update({id(weight): (part, name, weight) for name, weight in named[:1] + named[-1:]})
    watched = []
    for part, name, weight in picked.values():
        owner, _, leaf = name.rpartition(".")
        watched.append((part.get_submodule(owner), leaf, weight.data_ptr(), weight.dtype))
    if watched:
        module.__dict__[WATCHED_WEIGHTS_ATTRIBUTE] = watched


def changed_weights(module: nn.Module) -> tuple[torch.dtype, torch.dtype] | bool:
    """Since :func:`watch_weights_`: ``(dtype then, dtype now)`` if the weights were cast, True if they only moved
    (another device, shared memory), else False."""
    moved = False
    for owner, leaf, address, dtype in module.__dict__.get(WATCHED_WEIGHTS_ATTRIBUTE, ()):
        weight = getattr(owner, leaf, None)
        if not isinstance(weight, torch.Tensor):
            continue
        if weight.dtype != dtype:
            return dtype, weight.dtype
        moved = moved or weight.data_ptr() != address
    return moved


def invalidate_graphs_(module: nn.Module | None) -> None:
    if module is not None:
        setattr(module, GRAPH_TOKEN_ATTRIBUTE, object())


def note_rounding_(module: nn.Module | None, dtype: torch.dtype) -> None:
    """Record on ``module`` that the fast path cast its weights to ``dtype``, keeping the coarsest rounding ever taken
    (bf16's 8-bit mantissa is coarser than fp16's 11 bits): ``save_pretrained`` names every component holding one."""
    if module is None or not isinstance(module, nn.Module) or torch.finfo(dtype).bits == 32:
        return
    earlier = getattr(module, ROUNDED_ATTRIBUTE, None)
    if earlier is None or torch.finfo(dtype).eps > torch.finfo(earlier).eps:
        setattr(module, ROUNDED_ATTRIBUTE, dtype)


def rounded_to(module: nn.Module) -> torch.dtype | None:
    """The coarsest dtype the fast path cast ``module``'s weights or any of its sub-modules' to (``None``: never)."""
    marks = [getattr(sub, ROUNDED_ATTRIBUTE, None) for sub in module.modules()]
    marks = [mark for mark in marks if mark is not None]
    return max(marks, key=lambda mark: torch.finfo(mark).eps) if marks else None


class FastInferenceMixin:
    """The switches of ``enable_fast_inference``, the cache of captured CUDA graph sets, and the transformer step of
    every pipeline (:meth:`_transformer_steps`: replayed graphs, or eager).

    ``enable_fast_inference`` casts (:meth:`_cast_for_fast_inference`), installs what its flags ask for and calls
    :meth:`_set_fast_inference`, which records the switches on the transformer (:class:`FastSettings`).
    ``graph_cache_size`` (default 4) bounds how many graph sets are kept (each owns a KV cache for the whole token
    pyramid and a memory pool); the least recently used one is dropped first.
    """

    graph_cache_size: int = 4

    @property
    def _fast_settings(self) -> FastSettings:
        return fast_settings(getattr(self, "transformer", None))

    @property
    def _fast_inference(self) -> bool:
        return self._fast_settings.enabled

    @property
    def _fast_dtype(self) -> torch.dtype | None:
        return self._fast_settings.dtype

    @property
    def _fast_fp8(self) -> bool:
        return self._fast_settings.fp8

    @property
    def _use_cuda_graphs(self) -> bool:
        return self._fast_settings.cuda_graphs

    def _graphed_models(self) -> tuple[nn.Module | None, ...]:
        """The models this pipeline's graphs replay (CoDe: both stages)."""
        return (getattr(self, "transformer", None),)

    def _graph_cache(self) -> OrderedDict:
        """This pipeline's captured graph sets; emptied (freed) first when the graphed models changed since they were
        captured, through this pipeline or another that shares them (:data:`GRAPH_TOKEN_ATTRIBUTE`)."""
        token = tuple(getattr(model, GRAPH_TOKEN_ATTRIBUTE, None) for model in self._graphed_models())
        if self.__dict__.get("_graph_sets_token") != token or "_graph_sets" not in self.__dict__:
            self.__dict__["_graph_sets"], self.__dict__["_graph_sets_token"] = OrderedDict(), token
        return self.__dict__["_graph_sets"]

    @property
    def _graph_steps(self) -> OrderedDict:
        return self._graph_cache()

    def _invalidate_graphs(self) -> None:
        """The graphs of every pipeline sharing this one's models are stale (this one's are freed now, the others' at
        their next call)."""
        for model in self._graphed_models():
            invalidate_graphs_(model)
        self.__dict__.pop("_graph_sets", None)

    def _check_fast_inference_args(self, dtype: torch.dtype, **flags) -> None:
        """:func:`check_fast_inference_args`, the components (a pipeline built with ``None`` for one is refused as
        its call refuses it), then, for ``fp8=True``, the transformer's widths: a model that float8 cannot take is
        refused before anything is cast or compiled."""
        self._refuse_during_callback("enable_fast_inference")
        check_fast_inference_args(dtype, **flags)
        self._check_required_components()
        if flags.get("fp8"):
            fp8_linears(self.transformer)

    def _cast_for_fast_inference(
        self, dtype: torch.dtype, decoder: Sequence[nn.Module], compile_decoder: bool | str
    ) -> None:
        """The transformer and text encoder to ``dtype`` (their ``_keep_in_fp32_modules`` to float32) and the image
        decoder (optionally compiled, channels-last); the tokenizer's quantizer and the running latent stay float32."""
        if self._has_weight_hooks():
            raise ValueError(
                "`enable_fast_inference()` cannot be combined with CPU offloading, group offloading or "
                "layerwise casting (their hooks move or cast weights at every call); reload the pipeline."
            )
        earlier = rounded_to(self.transformer)  # the coarsest rounding the weights ever took
        if earlier is not None and torch.finfo(dtype).eps < torch.finfo(earlier).eps:
            logger.warning(
                f"enable_fast_inference(dtype={dtype}): an earlier call cast the weights to {earlier}; they keep "
                f"that rounding in {dtype} (reload the pipeline for its full-precision weights)."
            )
        cast_module_(self.transformer, dtype)
        cast_module_(getattr(self, "text_encoder", None), dtype)
        cast_decoder_(
            decoder,
            dtype,
            decoder[0] if compile_decoder else None,
            compile_decoder if isinstance(compile_decoder, str) else "default",
        )
        for module in (self.transformer, getattr(self, "text_encoder", None), *decoder):
            note_rounding_(module, dtype)

    def _set_fast_inference(
        self, enabled: bool, cuda_graphs: bool = False, dtype: torch.dtype | None = None, fp8: bool = False
    ):
        enabled, cuda_graphs, fp8 = bool(enabled), bool(cuda_graphs), bool(fp8)
        low_precision = enabled and dtype != torch.float32  # float32 keeps the eager ops, so its outputs equal eager
        quantize_linears_fp8_(self.transformer, enabled and fp8)
        fuse_ffn_gelu_(self.transformer, low_precision)
        fuse_ffn_gelu_(
            getattr(self, "text_encoder", None)
            if isinstance(getattr(self, "text_encoder", None), nn.Module)
            else None,
            False,
        )
        separable_upsample_(getattr(self, "vqvae", None), low_precision)
        for component in self.components.values():  # their offloading / casting hooks are refused while it is on
            if isinstance(component, nn.Module):
                setattr(component, FAST_PATH_ATTRIBUTE, enabled)
                watch_weights_(component, enabled)
        if self.transformer is not None:
            settings = FastSettings(enabled, dtype if enabled else None, enabled and fp8, enabled and cuda_graphs)
            setattr(self.transformer, FAST_SETTINGS_ATTRIBUTE, settings)
        for model in self._graphed_models():  # (CoDe: the refiner's adapters too)
            if model is not None:
                setattr(model, ADAPTER_STATE_ATTRIBUTE, adapter_state(model))
        self._invalidate_graphs()
        return self

    def _has_weight_hooks(self) -> bool:
        """Whether a component, or a layer inside one (layerwise casting hooks each layer), carries an offloading or
        casting hook. (Once the fast path is on, the pipeline's offloading methods and the models' group offloading
        and layerwise casting refuse to add one: ``FAST_PATH_ATTRIBUTE``.)"""
        return any(
            hasattr(layer, "_hf_hook") or hasattr(layer, "_diffusers_hook")
            for component in self.components.values()
            if isinstance(component, nn.Module)
            for layer in component.modules()
        )

    def _sync_adapters(self) -> None:
        """At every generation's start. The CUDA graphs replay the LoRA layers as they were when captured (active
        adapters, scales, fused or not), and the float8 weights are copies: when loading, fusing, switching or scaling
        adapters has changed what the transformer (CoDe: or the refiner) computes since, the float8 copies are remade
        and the graphs of every pipeline sharing the model dropped (recaptured on the next call). Stale graph sets of
        this pipeline are freed here too, graphs on or off."""
        self._graph_cache()  # (frees stale sets)
        if not self._fast_inference or getattr(self, "transformer", None) is None:
            return
        self._follow_moved_weights()
        for model in self._graphed_models():  # (CoDe: the refiner's adapters, a LoRA component too)
            if model is None:
                continue
            state = adapter_state(model)
            if state != getattr(model, ADAPTER_STATE_ATTRIBUTE, None):
                quantize_linears_fp8_(model, self._fast_fp8)
                setattr(model, ADAPTER_STATE_ATTRIBUTE, state)
                self._invalidate_graphs()
        if self._fast_fp8:  # weights changed in place (the graphs read them where they are: only the copies are old)
            for component in self.components.values():
                if isinstance(component, nn.Module) and fp8_copies_stale(component):
                    quantize_linears_fp8_(component, True)
                    self._invalidate_graphs()  # (the graphs hold the old copies' memory)

    def _refuse_during_callback(self, method: str) -> None:
        """Refuse ``method`` from inside a running generation's callback (the pipelines' base class checks)."""

    def _follow_moved_weights(self) -> None:
        """A component moved by its own ``.to()`` / ``.cuda()`` since the fast path was set (the pipeline's ``.to``
        does this itself): the graphs read the old storage, so they are dropped (recaptured on this call). A component
        cast behind the fast path's back is refused, as ``pipe.to(dtype)`` is: the float8 copies became plain floats
        and the kept float32 modules were cast too."""
        for name, component in self.components.items():
            if not isinstance(component, nn.Module):
                continue
            change = changed_weights(component)
            if isinstance(change, tuple):
                raise ValueError(
                    f"`{name}`: its weights were cast from {change[0]} to {change[1]} after enable_fast_inference(), "
                    "which holds the components in the dtypes it set (as `pipe.to(dtype)` is refused on the fast "
                    "path); call enable_fast_inference(dtype=...) again to recast every component, or "
                    "disable_fast_inference() before casting."
                )
            if change:
                self._invalidate_graphs()
                watch_weights_(component)

    def disable_fast_inference(self):
        """Back to the eager path without CUDA graphs (captured graphs are freed), the fused FFN GELU, the separable
        upsampling or the float8 weights. The weights keep their current dtype, and a decoder or blocks compiled by
        ``compile_decoder`` / ``compile_blocks`` stay compiled (same results, compiled code): reload the pipeline for
        the plain float32 modules."""
        self._refuse_during_callback("disable_fast_inference")
        return self._set_fast_inference(False)

    def _fast_top_p(self, device: torch.device) -> bool:
        """Whether to run top-p over the top-k values only (a k-wide instead of a vocabulary-wide sort). Only
        on CUDA, where it saves time; on the CPU the fast path falls back to the exact eager sampler."""
        return self._fast_inference and torch.device(device).type == "cuda"

    @staticmethod
    def _cuda_graphs_usable(device) -> bool:
        return torch.device(device).type == "cuda"

    @staticmethod
    def _samples_in_graphs(schedule: Sequence[tuple[int, int]]) -> bool:
        """Whether STAR / Infinity put the sampling inside the whole-scale graphs for ``schedule`` (token grids of the
        scales): images of at most :data:`WHOLE_SCALE_SAMPLING_MAX_TOKENS` tokens at the last scale."""
        h, w = schedule[-1]
        return h * w <= WHOLE_SCALE_SAMPLING_MAX_TOKENS

    def _graph_sampling_generator(self, device, generator) -> torch.Generator | None:
        """For sampling inside the per-scale CUDA graphs: the CUDA generator whose state the graphs borrow (the
        caller's single CUDA generator, or the device's default one for ``None``), or ``None`` when sampling stays
        eager: graphs off, not on CUDA, or a CPU generator / a list of generators (they keep the original's draws,
        made on the host)."""
        device = torch.device(device)
        if not (
            self._use_cuda_graphs
            and device.type == "cuda"
            and hasattr(torch.cuda.CUDAGraph, "register_generator_state")
        ):
            return None

        def cuda_index(d: torch.device) -> int:
            return d.index if d.index is not None else torch.cuda.current_device()

        if generator is None:
            return torch.cuda.default_generators[cuda_index(device)]
        if (
            isinstance(generator, torch.Generator)
            and generator.device.type == "cuda"
            and cuda_index(generator.device) == cuda_index(device)
        ):
            return generator
        return None

    def _graph_scale_steps(
        self, key: Hashable, device: torch.device, build: Callable[[], CUDAGraphScaleSteps]
    ) -> CUDAGraphScaleSteps | None:
        """The graph set for ``key`` (captured by ``build()`` on first use), or ``None`` for the eager path."""
        self._sync_adapters()
        if not self._use_cuda_graphs:
            return None
        size = self.graph_cache_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(
                f"`graph_cache_size` must be a whole number of at least 1 (the CUDA graph sets kept), got {size!r}."
            )
        if not self._cuda_graphs_usable(device):
            return None
        cache = self._graph_steps  # set by _set_fast_inference, which is what turns graphs on
        if key in cache:
            cache.move_to_end(key)
        else:
            while len(cache) >= size:  # free the least recently used sets before capturing a new one
                cache.popitem(last=False)
            cache[key] = build()
        while len(cache) > size:
            cache.popitem(last=False)
        return cache[key]

    def _transformer_steps(
        self,
        condition: tuple[torch.Tensor, ...],
        schedule: Sequence[tuple[int, int]],
        device,
        transformer: nn.Module | None = None,
        scales: range | None = None,
        prefill: bool = False,
        prefill_logits_from: int = 0,
    ):
        """``step(scale_index, scale_input) -> transformer outputs`` for one generation with ``condition`` (the
        tensors of ``transformer.forward_scale``, guidance rows included): eager with a fresh KV cache, or replayed
        CUDA graphs, captured once per condition shapes and schedule and fed with this generation's condition.

        ``transformer`` (default: the pipeline's) runs the ``scales`` (default: all, in order). With ``prefill`` the
        first of them is a continuation: its ``scale_input`` is the input of every scale up to it (the teacher-forcing
        prefix) and the step is ``transformer.prefill_scale`` (the logits of those positions from
        ``prefill_logits_from`` on; the KV cache filled). (:meth:`_graph_scale_steps` syncs the adapters first, graphs
        on or off.)"""
        transformer = self.transformer if transformer is None else transformer
        schedule = tuple(tuple(hw) for hw in schedule)
        scales = range(len(schedule)) if scales is None else scales
        rows = condition[0].shape[0]

        def forward(cache, si, condition, scale_input):
            if prefill and si == scales.start:
                return transformer.prefill_scale(condition, cache, scale_input, prefill_logits_from)
            return transformer.forward_scale(si, condition, cache, scale_input)

        def build() -> CUDAGraphScaleSteps:
            cache = transformer.init_kv_cache(schedule[: scales.stop])
            channels = transformer.scale_input_channels
            first_len = schedule[0][0] * schedule[0][1]
            lengths = {
                si: sum(h * w for h, w in schedule[: si + 1]) - first_len
                if prefill and si == scales.start
                else schedule[si][0] * schedule[si][1]
                for si in scales
            }
            examples = [
                (None,) if si == 0 else (torch.zeros(rows, lengths[si], channels, device=device),) for si in scales
            ]

            def step(si, *tensors):
                return forward(cache, si, tensors[:-1], tensors[-1])

            return CUDAGraphScaleSteps(step, examples, cache.reset, shared_inputs=condition, first_scale=scales.start)

        key = ("transformer", schedule, tuple((t.shape, t.dtype) for t in condition))
        if transformer is not self.transformer or scales != range(len(schedule)) or prefill:  # a part of a generation
            key += (id(transformer), scales, prefill, prefill_logits_from)
        graphs = self._graph_scale_steps(key, device, build)
        if graphs is not None:
            return graphs.set_shared_inputs(*condition)
        cache = transformer.init_kv_cache(schedule[: scales.stop])
        return lambda si, scale_input: forward(cache, si, condition, scale_input)

    def _whole_scale_graphs(
        self,
        key: tuple,
        device,
        condition: tuple[torch.Tensor, ...],
        parameters: tuple[torch.Tensor, ...],
        schedule: Sequence[tuple[int, int]],
        latents: torch.Tensor,
        sample_scale: Callable,
        forcing=None,
    ) -> CUDAGraphScaleSteps | None:
        """Whole-scale CUDA graphs of the pipeline's transformer (STAR, Infinity): per scale the transformer step on
        the generation's ``condition``, then ``sample_scale(si, model_output, latents, generator, forcing,
        *parameters)``, which draws from ``generator``, updates the static ``latents`` in place and returns ``(the next
        scale's transformer input or None, *outputs)``; a replay returns the outputs. One launch per scale instead of
        the sampler's few dozen eager kernels (at batch 1 the host launching them is slower than the GPU running them).

        ``parameters``: device tensors the sampling reads (guidance table, ``1 - top_p``, temperatures), so other
        values replay the same graphs; ``key``: what else shapes ``sample_scale`` (captured once per key, with the
        shapes of the condition, the parameters and ``latents``). ``forcing``: a :class:`TokenForcing`, kept as a
        static copy refilled per call. Returns the set fed with this generation's condition, parameters and forcing,
        its ``graphs.latents`` set to ``latents`` (the running sum at the start; same memory layout), with
        ``graphs.scale_inputs[si]`` the static transformer input of scale ``si``; ``None`` when graphs are off."""
        transformer = self.transformer
        schedule = tuple(tuple(hw) for hw in schedule)
        rows = condition[0].shape[0]

        def build() -> CUDAGraphScaleSteps:
            cache = transformer.init_kv_cache(schedule)
            static_latents = torch.zeros_like(latents)  # the same memory layout: the kernels that read it follow it
            channels = transformer.scale_input_channels
            scale_inputs = [None] + [torch.zeros(rows, h * w, channels, device=device) for h, w in schedule[1:]]
            static_forcing = forcing.static_copy() if forcing is not None else None
            generator = torch.Generator(device)
            split = len(condition)

            def step(si, *shared):
                output = transformer.forward_scale(si, shared[:split], cache, scale_inputs[si])
                sampled = sample_scale(si, output, static_latents, generator, static_forcing, *shared[split:])
                next_rows, *outputs = sampled
                if next_rows is not None:
                    scale_inputs[si + 1].copy_(next_rows)
                return tuple(outputs)

            graphs = CUDAGraphScaleSteps(
                step, [()] * len(schedule), cache.reset, (*condition, *parameters), generator=generator
            )
            graphs.latents, graphs.scale_inputs, graphs.forcing = static_latents, scale_inputs, static_forcing
            return graphs

        shapes = tuple((t.shape, t.dtype) for t in (*condition, *parameters, latents))
        graphs = self._graph_scale_steps(("whole scales", schedule, shapes, forcing is not None, *key), device, build)
        if graphs is None:
            return None
        graphs.set_shared_inputs(*condition, *parameters)
        graphs.latents.copy_(latents)
        if forcing is not None:
            graphs.forcing.copy_(forcing)
        return graphs
