"""GPU fast path shared by the three pipelines: dtype casts, CUDA-graph replay of the per-scale transformer
steps, and the bookkeeping of ``enable_fast_inference`` / ``disable_fast_inference``.

At batch 1 a next-scale transformer spends most of its time launching thousands of small kernels.
:class:`CUDAGraphScaleSteps` records one CUDA graph per scale for fixed input shapes (KV cache storage, inputs
and outputs at static addresses) and replays it, so a whole scale costs one launch. Everything around the
transformer (guidance, filtering, sampling, the tokenizer's running latent) stays eager and runs on the GPU.
:class:`FastInferenceMixin` keeps the switches and a small cache of captured graph sets, keyed by whatever fixes
the shapes of a generation (rows, text length, scale schedule).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from functools import partial
from typing import Callable, Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import fuse_ffn_gelu_, quantize_linears_fp8_

FAST_INFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_fast_inference_args(dtype, cuda_graphs, compile_decoder, fp8=False, **more_flags) -> None:
    """Argument checks of ``enable_fast_inference`` (a ValueError names the parameter)."""
    if not isinstance(dtype, torch.dtype) or dtype not in FAST_INFERENCE_DTYPES:
        names = ", ".join(str(d) for d in FAST_INFERENCE_DTYPES)
        raise ValueError(f"`dtype` must be one of {names}, got {dtype!r}.")
    for name, value in (("cuda_graphs", cuda_graphs), ("compile_decoder", compile_decoder), ("fp8", fp8), *more_flags.items()):
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    if fp8 and dtype != torch.bfloat16:
        raise ValueError(f"`fp8=True` needs `dtype=torch.bfloat16` (the float8 matmuls write bf16), got {dtype}.")


def cast_module_(module: nn.Module | None, dtype: torch.dtype, keep_float32: Iterable[nn.Module | None] = ()) -> None:
    """In place: floating parameters and buffers of ``module`` to ``dtype``, then the ``keep_float32``
    sub-modules (output heads and their norms, where the logits are produced) back to float32.

    ``nn.Module.to`` is called directly, so a diffusers ``ModelMixin`` does not warn about a partial cast and a
    ``transformers`` model is cast like any module. ``None`` (an absent component) is skipped."""
    if module is None:
        return
    nn.Module.to(module, dtype)
    for sub in keep_float32:
        if sub is not None:
            sub.float()


def cast_decoder_(modules: Sequence[nn.Module], dtype: torch.dtype, compile_module: nn.Module | None = None) -> None:
    """The image decoder (and the convs feeding it) to ``dtype``; optionally ``torch.compile`` one module in
    place (parameter names, hence ``save_pretrained``, are unchanged). Compiled, the decoder also goes
    channels-last: cuDNN's channels-last convolutions are faster and the compiled GroupNorm reads that layout
    directly (H100, VAR decoder, batch 1: 12.1 ms NCHW eager, 3.6 to 7.0 ms channels-last compiled in two runs of
    benchmarks/bench_decoder.py). Eager, it stays
    NCHW: eager GroupNorm copies channels-last inputs at every call (batch 64: 145 ms NCHW, 211 ms channels-last).
    """
    memory_format = torch.channels_last if compile_module is not None else torch.contiguous_format
    for module in modules:
        nn.Module.to(module, dtype=dtype, memory_format=memory_format)
    if compile_module is not None:
        pad_narrow_convs_(compile_module)
        compile_module.compile(dynamic=False)


def pad_narrow_convs_(module: nn.Module, multiple: int = 32) -> int:
    """Make every ``Conv2d`` of ``module`` whose output channels are not a multiple of ``multiple`` (in the decoders:
    only the RGB ``conv_out``) compute with zero-padded extra output channels and drop them. For fewer than 32 output channels
    cuDNN's heuristics pick a generic channels-last kernel (H100, bf16, 160 -> 3 channels, 3x3, batch 64 at 256 px:
    24 ms, a fifth of the whole decoder; with 8 or 16 channels the same); with 32 it is a tensor-core implicit GEMM
    (1.9 ms). Parameters (and ``state_dict``) are unchanged: only the module's ``forward`` is replaced. Returns how
    many convolutions were padded."""
    padded = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.out_channels % multiple:
            conv.forward = partial(_padded_conv_forward, conv, multiple)
            padded += 1
    return padded


def _padded_conv_forward(conv: nn.Conv2d, multiple: int, x: torch.Tensor) -> torch.Tensor:
    extra = -conv.out_channels % multiple
    weight = F.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, extra))
    bias = None if conv.bias is None else F.pad(conv.bias, (0, extra))
    return conv._conv_forward(x, weight, bias)[:, : conv.out_channels]


class CUDAGraphScaleSteps:
    """One CUDA graph per scale for ``step(scale_index, *shared_inputs, *inputs) -> outputs`` with fixed shapes.

    Args:
        step: the eager per-scale function; it must read the KV cache that ``reset_cache`` rewinds. It may
            return a tensor or a tuple of tensors (the same static tensors are returned at every replay).
        example_inputs: per scale, a tuple of example tensors (shapes and dtypes of the real per-scale inputs;
            ``None`` for an absent input).
        reset_cache: rewinds the KV cache to empty without freeing its storage.
        shared_inputs: example tensors read by every scale (the text conditioning of a generation); set them
            once per generation with :meth:`set_shared_inputs`.
        generator: a CUDA generator that ``step`` draws from (sampling inside the graphs). It is registered with
            every graph, so a replay draws what the eager step would draw from the generator's state at that
            moment and advances it the same way; :meth:`borrow_generator_state` lends it a caller's state.
    """

    def __init__(self, step: Callable, example_inputs: Sequence[tuple], reset_cache: Callable[[], None],
                 shared_inputs: Sequence[torch.Tensor] = (), generator: torch.Generator | None = None):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device.")
        # The graphs write into whatever ``step`` and ``reset_cache`` close over (the KV cache storage, static
        # buffers) by address, so those must live as long as the graphs: without these references the KV cache was
        # freed once the constructor returned, the replays wrote into memory the allocator had handed back, and the
        # next ``torch.cuda.empty_cache()`` turned that into an illegal memory access.
        self.step, self.reset_cache, self.generator = step, reset_cache, generator
        self.shared_inputs = tuple(t.clone() for t in shared_inputs)
        self.static_inputs = [tuple(None if t is None else t.clone() for t in inputs) for inputs in example_inputs]
        self.graphs, self.outputs = [], []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # warm-up: allocator, cuBLAS / SDPA workspaces
            for _ in range(2):
                reset_cache()
                for si, inputs in enumerate(self.static_inputs):
                    step(si, *self.shared_inputs, *inputs)
        torch.cuda.current_stream().wait_stream(side)
        reset_cache()
        pool = None
        with torch.no_grad():
            for si, inputs in enumerate(self.static_inputs):
                graph = torch.cuda.CUDAGraph()
                if generator is not None:
                    graph.register_generator_state(generator)
                with torch.cuda.graph(graph, pool=pool):
                    out = step(si, *self.shared_inputs, *inputs)
                pool = graph.pool()
                self.graphs.append(graph)
                self.outputs.append(out)
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
        for static, value in zip(self.static_inputs[scale_index], inputs):
            if static is not None:
                static.copy_(value, non_blocking=True)
        self.graphs[scale_index].replay()
        return self.outputs[scale_index]


class FastInferenceMixin:
    """The switches of ``enable_fast_inference`` and the cache of captured CUDA graph sets, for a pipeline.

    A pipeline's ``enable_fast_inference`` casts its own modules (:func:`cast_module_`, :func:`cast_decoder_`)
    and then calls :meth:`_set_fast_inference` (which also sets the fused FFN GELU of every component). Its per-scale step asks :meth:`_graph_scale_steps` for the
    graph set of the current shapes: ``None`` means "run eagerly" (graphs off, or not on CUDA).

    ``graph_cache_size`` (default 4) bounds how many graph sets are kept (each owns a KV cache for the whole
    token pyramid and a memory pool); the least recently used one is dropped first.
    """

    graph_cache_size: int = 4
    _fast_inference: bool = False
    _use_cuda_graphs: bool = False

    def _set_fast_inference(self, enabled: bool, cuda_graphs: bool = False, dtype: torch.dtype | None = None,
                            fp8: bool = False):
        transformer = getattr(self, "transformer", None)
        if transformer is not None:
            quantize_linears_fp8_(transformer, enabled and fp8)
        self._fast_inference = bool(enabled)
        self._fast_dtype = dtype if enabled else None
        self._use_cuda_graphs = bool(enabled and cuda_graphs)
        self._graph_steps = OrderedDict()
        # the fused FFN GELU is a bf16 / fp16 shortcut: float32 keeps the eager ops, so its outputs equal eager
        for component in getattr(self, "components", {}).values():
            if isinstance(component, nn.Module):
                fuse_ffn_gelu_(component, enabled and dtype != torch.float32)
        return self

    def disable_fast_inference(self):
        """Back to the eager path without CUDA graphs (captured graphs are freed), the fused FFN GELU or the float8
        weights. The weights keep their current dtype, and a decoder or blocks compiled by ``compile_decoder`` /
        ``compile_blocks`` stay compiled (same results, compiled code): reload the pipeline for the plain float32
        modules."""
        return self._set_fast_inference(False)

    def _fast_top_p(self, device: torch.device) -> bool:
        """Whether to run top-p over the top-k values only (a k-wide instead of a vocabulary-wide sort). Only
        on CUDA, where it saves time; on the CPU the fast path falls back to the exact eager sampler."""
        return self._fast_inference and torch.device(device).type == "cuda"

    def _separable_upsample(self, device: torch.device, maps: int, side: int) -> bool:
        """Whether ``maps`` code maps (batch x channels) are upsampled to ``side x side`` by the separable bicubic
        (``bicubic_up``): on CUDA in a low-precision fast path, for many maps (the fused kernel loops over them in
        every thread; a few it does faster) and small sides (its temporary holds ``side**2 * w`` values per map).
        With ``dtype=torch.float32`` the fast path keeps the eager kernels, so its outputs equal eager."""
        return self._fast_top_p(device) and self._fast_dtype != torch.float32 and maps >= 256 and side <= 16

    @staticmethod
    def _cuda_graphs_usable(device) -> bool:
        return torch.device(device).type == "cuda"

    def _graph_sampling_generator(self, device, generator) -> torch.Generator | None:
        """For sampling inside the per-scale CUDA graphs: the CUDA generator whose state the graphs borrow (the
        caller's single CUDA generator, or the device's default one for ``None``), or ``None`` when sampling stays
        eager: graphs off, not on CUDA, or a CPU generator / a list of generators (they keep the original's draws,
        made on the host)."""
        device = torch.device(device)
        if not (self._use_cuda_graphs and device.type == "cuda" and hasattr(torch.cuda.CUDAGraph, "register_generator_state")):
            return None
        def cuda_index(d: torch.device) -> int:
            return d.index if d.index is not None else torch.cuda.current_device()

        if generator is None:
            return torch.cuda.default_generators[cuda_index(device)]
        if isinstance(generator, torch.Generator) and generator.device.type == "cuda" \
                and cuda_index(generator.device) == cuda_index(device):
            return generator
        return None

    def _graph_scale_steps(self, key: Hashable, device: torch.device,
                           build: Callable[[], CUDAGraphScaleSteps]) -> CUDAGraphScaleSteps | None:
        """The graph set for ``key`` (captured by ``build()`` on first use), or ``None`` for the eager path."""
        if not self._use_cuda_graphs or not self._cuda_graphs_usable(device):
            return None
        cache = self._graph_steps  # set by _set_fast_inference, which is what turns graphs on
        size = max(1, int(self.graph_cache_size))
        if key in cache:
            cache.move_to_end(key)
        else:
            while len(cache) >= size:  # free the least recently used sets before capturing a new one
                cache.popitem(last=False)
            cache[key] = build()
        while len(cache) > size:
            cache.popitem(last=False)
        return cache[key]
