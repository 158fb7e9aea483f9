"""VARPipeline: class-conditional image generation by next-scale prediction."""

from __future__ import annotations

import collections
import json
import weakref
from contextlib import nullcontext
from importlib import resources
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..loaders import VARLoraLoaderMixin
from ..models.blocks import square_schedule
from ..models.multiscale_vq import MultiScaleVQModel
from ..models.var_transformer import VARTransformer2DModel
from .fast_inference import (
    FAST_SETTINGS_ATTRIBUTE,
    CUDAGraphScaleSteps,
    FastSettings,
    cast_module_,
    compile_adaln_blocks_,
    fast_settings,
    fp8_linears,
    fuse_ffn_gelu_,
    note_rounding_,
    quantize_linears_fp8_,
)
from .pipeline_utils import (
    UNIFIED_CALLBACK_TENSORS,
    CallbackArg,
    MultiScaleVQPipelineMixin,
    NextScaleEditMixin,
    NextScaleInpaintMixin,
    NextScalePipeline,
    TokenForcing,
    VQEditTokens,
    check_bool,
    check_common_inputs,
    check_finite_number,
    check_generator,
    check_guidance_scale,
    check_temperature,
    flatten_labels,
    is_integer,
    per_scale,
    shorten,
    warn_eager_forcing,
)
from .sampling import (
    GeneratorArg,
    advance_as_sample_from_logits,
    apply_guidance,
    draw_class_labels,
    filter_top_k_top_p_,
    gumbel_softmax,
    linear_guidance_ramp,
    nan_where_drawn_from_nonfinite,
    ramp_table,
    sample_from_logits,
    smooth_tau,
    top_p_mass,
)


def label_classes(id2label: dict) -> dict[str, list[int]]:
    """Class name -> the class indices it names, of an ``id2label`` mapping (each comma-separated synonym a name of its
    own), sorted by name. Most name one class; ImageNet's names 18 twice ("crane": a bird and a machine)."""
    names: dict[str, list[int]] = {}
    for key, value in sorted(id2label.items(), key=lambda item: int(item[0])):
        for name in str(value).split(","):
            if name.strip() and int(key) not in names.setdefault(name.strip(), []):
                names[name.strip()].append(int(key))
    return dict(sorted(names.items()))


def label_ids(id2label: dict) -> dict[str, int]:
    """Class name -> class index of an ``id2label`` mapping, for the names of one class only (a name shared by several
    classes is no class: it mapped to the last of them without a word), sorted by name: ``pipe.labels``."""
    return {name: ids[0] for name, ids in label_classes(id2label).items() if len(ids) == 1}


def check_id2label(id2label, num_classes: int | None) -> dict[int, str]:
    """``id2label`` as ``{class index: names}``: a dict from whole-number class indices (ints or their strings, as
    JSON stores them; each once, within ``[0, num_classes)`` when the transformer is known) to strings of
    comma-separated names."""
    if not isinstance(id2label, dict) or not all(
        isinstance(v, str) and (is_integer(k) or (isinstance(k, str) and k.isascii() and k.isdigit()))
        for k, v in id2label.items()
    ):
        raise ValueError(
            f"`id2label` must be a dict from class index to class name (synonyms comma-separated), got "
            f"{shorten(id2label)}."
        )
    indices = [int(k) for k in id2label]
    twice = sorted(i for i, count in collections.Counter(indices).items() if count > 1)
    if twice:
        raise ValueError(f"`id2label` gives class indices {twice} twice (as a number and as a string).")
    outside = sorted(i for i in indices if i < 0 or (num_classes is not None and i >= num_classes))
    if outside:
        classes = f"0 to {num_classes - 1}" if num_classes is not None else "0 or more"
        raise ValueError(
            f"`id2label` names class indices {outside[:5]}, but the transformer's classes are {classes} "
            "(`num_classes`)."
        )
    return {int(k): v for k, v in id2label.items()}


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, comma-separated synonyms), by class index."""
    text = resources.files("diffusers_var.data").joinpath("imagenet_id2label.json").read_text()
    return {int(k): v for k, v in json.loads(text).items()}


# ``forcing(scale_index, code_map_BChw, indices_Bl) -> (code_map, indices)``: a task pipeline's replacement of a
# scale's sampled code map (and indices) before it enters f_hat (in-painting keeps the input image's codes)
ScaleForcing = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ScaleSampling(NamedTuple):
    """What shapes a scale's sampling code (a CUDA graph set is captured per value): Gumbel smoothing, copies of the
    logits for the callback, the k-wide top-p of the fast path, a temperature other than 1 at some scale, whether
    CoDe's discarded re-samples are computed (for the callback) or only drawn, and whether its refiner's prefill gives
    the logits of the drafted positions too (for the callback)."""

    more_smooth: bool
    keep_logits: bool
    fast_filter: bool
    tempered: bool = False
    keep_resamples: bool = False
    keep_prefill_logits: bool = False

    def prefill_logits_from(self, run: "ScaleRun") -> int:
        """The first position of the prefill of ``run`` whose logits are computed: 0 when a callback reads them all
        (the prefill's logits, or the re-samples drawn from them) or the run has no prefill, else the run's first
        scale (its logits alone)."""
        if run.prefix is None or self.keep_prefill_logits or self.keep_resamples:
            return 0
        return run.transformer.begin_ends[run.scales.start][0]


class ScaleRun(NamedTuple):
    """The part of a token pyramid that one :meth:`VARPipeline._sample_scales` call samples, and the model that does
    it (by default every scale, with the pipeline's transformer).

    A run of the scales ``k ..`` (k > 0) continues a pyramid that another run (another model) began: ``latents`` is its
    f_hat after scales 0..k-1 (updated in place) and ``prefix`` the inputs of scales 1..k (B, cum_k - pn_0^2, Cv), the
    area-downsampled f_hat after each earlier scale. One block-causal prefill pass of ``transformer`` over them fills
    its KV cache and gives scale k's logits. With ``replay_prefix_draws`` the scales 0..k-1 are re-sampled first from
    the prefill's conditional logits (no guidance, each with its own top-k / temperature) and the tokens discarded:
    the draws of CoDe's refiner, which keep a seeded generator on the original's random stream. ``next_inputs``, a
    list, receives the next-scale input (B, l', Cv) of every scale of the run."""

    transformer: VARTransformer2DModel
    scales: range
    latents: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    replay_prefix_draws: bool = False
    next_inputs: list | None = None


class SharedStageMemory:
    """What the CUDA graph sets of the stages of one generation share (they never replay at the same time): one buffer
    for their KV caches (``KVCache.share_storage``), sized for the largest, and the graphs' memory pool."""

    def __init__(self, kv_storage: torch.Tensor):
        self.kv_storage = kv_storage
        self.pool = None


class VARPipeline(MultiScaleVQPipelineMixin, NextScalePipeline, VARLoraLoaderMixin):
    r"""Class-conditional generation with VAR (Visual AutoRegressive modeling, next-scale prediction).

    Components:
        transformer ([`VARTransformer2DModel`]): predicts each scale's tokens from the coarser ones.
        vqvae ([`MultiScaleVQModel`]): the multi-scale tokenizer whose codebook and decoder turn
            tokens into images.
        id2label (`dict[int, str]`, *optional*): class names (comma-separated synonyms) for
            :meth:`get_label_ids`; the ImageNet-1k names by default when the model has 1000 classes.

    With a single seeded CPU ``torch.Generator`` the random draws happen in the original order, shapes
    and dtypes, so a seed reproduces the original ``autoregressive_infer_cfg`` sample for sample.
    The VQ-VAE is used at every scale, so ``enable_model_cpu_offload`` offloads only the transformer
    (between calls) and keeps the comparatively small tokenizer on the accelerator.
    """

    model_cpu_offload_seq = "transformer"
    _exclude_from_cpu_offload = ["vqvae"]
    _callback_tensor_inputs = UNIFIED_CALLBACK_TENSORS + ["f_hat", "indices", "logits"]
    _family = "var"
    _callback_aliases = {"f_hat": "latents", "indices": "tokens", "logits": "guided_logits"}

    def __init__(self, transformer: VARTransformer2DModel, vqvae: MultiScaleVQModel, id2label: dict | None = None):
        super().__init__()
        self._check_vqvae_fits(transformer, vqvae)
        self.register_modules(transformer=transformer, vqvae=vqvae)
        num_classes = transformer.config.num_classes if transformer is not None else None
        if id2label is None and num_classes == 1000:
            id2label = imagenet_id2label()
        id2label = check_id2label(id2label, num_classes) if id2label is not None else {}
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()} or None)
        self.id2label = id2label
        self.labels = label_ids(id2label)
        # names of several classes (ImageNet's "crane", "panda", ...): get_label_ids refuses them, naming the classes
        self.shared_labels = {name: ids for name, ids in label_classes(id2label).items() if len(ids) > 1}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (any synonym, e.g. ``"golden retriever"``) to class indices."""
        labels = [label] if isinstance(label, str) else label
        if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(n, str) for n in labels):
            raise ValueError(f"`label` must be a class name or a non-empty list of them, got {label!r}.")
        shared = [name for name in labels if name in self.shared_labels]
        if shared:
            classes = ", ".join(f"{i} ({self.id2label[i]!r})" for i in self.shared_labels[shared[0]])
            raise ValueError(
                f"`label` {shared[0]!r} names several classes: {classes}; give a name of one of them, or its index."
            )
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            raise ValueError(f"`label` {unknown} not found; choose from `pipe.labels` ({len(self.labels)} names).")
        return [self.labels[name] for name in labels]

    def scale_schedule(self) -> list[tuple[int, int]]:
        """The token grid ``(h, w)`` of every scale."""
        return square_schedule(self.transformer.config.patch_nums)

    # -- fast inference ------------------------------------------------------------------------------
    def enable_fast_inference(
        self,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        compile_decoder: bool | str = False,
        compile_blocks: bool | str = False,
        fp8: bool = False,
    ) -> "VARPipeline":
        """Speed switch for GPUs. The transformer blocks and the image decoder run in ``dtype`` (bf16 by
        default); the transformer's ``_keep_in_fp32_modules`` (output head and its norm), the quantizer (codebook, Phi
        convs) and f_hat stay float32, which keeps greedy tokens close to the float32 path. On CUDA each scale is a
        CUDA graph (captured on the first call for a batch size, then replayed) and top-p sorts only the top-k values;
        in bf16 / fp16 the FFN's bias and GELU also run in the epilogue of its first matmul and the code maps are
        upsampled by a separable bicubic (same weights; float32 keeps the eager kernels, so its outputs equal the
        eager ones). With a CUDA ``torch.Generator`` (or ``generator=None``: the device's default one) the whole scale
        is one graph: transformer step, guidance, top-k / top-p, the draw, the codebook lookup and the f_hat update
        (captured per batch size, ``top_k`` and ``more_smooth``; other guidance scales and ``top_p`` replay the same
        graphs). The graphs borrow the generator's state, so a seed gives the same images as the eager sampler and the
        generator advances as if it had drawn eagerly; the tensors handed to ``callback_on_step_end`` are the graphs'
        buffers (clone what you keep). A CPU generator, or a list of generators, keeps the original's host-side draws
        (graphs for the transformer step only). On the CPU it only casts (the sampler and the step stay eager).
        The editing pipelines (:class:`VARInpaintPipeline`, :class:`VARImg2ImgPipeline`) put the input's tokens back
        inside these graphs. The switch lives on the transformer it casts: pipelines sharing it (``from_pipe``, either
        way) are fast or not together, each with its own graphs.

        Args:
            dtype: compute dtype of the blocks and the decoder.
            cuda_graphs: replay one CUDA graph per scale (on CUDA).
            compile_decoder: channels-last ``torch.compile`` of the image decoder; ``True`` compiles in torch's
                default mode, ``"max-autotune-no-cudagraphs"`` in that mode (convolution kernels benchmarked while
                compiling; the compile caches keep the choice). The modes that replay the decoder as torch's own
                CUDA graphs (``"reduce-overhead"``, ``"max-autotune"``) are refused. In calls of 64 images or more
                the decoder's GroupNorm statistics come from per-channel sums
                (:func:`~.fast_inference.channel_sum_group_norm_`): images as a smaller batch gives them, within
                float rounding.
            compile_blocks: ``torch.compile`` of each block's elementwise work (fused before the CUDA graphs are
                captured; the first generation compiles). The blocks run chained: the end of one block and the next
                block's norm are one compiled piece, and the projection writes keys and values into the KV cache
                (with dynamic shapes below 4,096 token rows, guidance rows included, the cache copying above; with
                static ones at every scale; ``fast_inference.CHAIN_VAR_BLOCKS``; a hook on a block runs the blocks
                one by one). ``True`` (or
                ``"dynamic"``) compiles once for every scale and batch size; ``"static-tokens"`` compiles each scale
                for itself (a longer first generation, faster after) and still any batch size without recompiling;
                ``"static"`` each scale and batch size (for jobs of one batch size: fastest at large batches, a
                recompile at every new batch size); both raise dynamo's recompile limit of the process to 64; see
                ``fast_inference.compile_blocks_shapes``.
            fp8: (opt-in, for large batches of the large models) float8 (e4m3) matmuls for the attention and FFN
                linears of the blocks at scales of at least 2,048 token rows (activations scaled per row, weights per
                output channel); needs ``dtype=torch.bfloat16`` and a GPU with float8 tensor cores, and is meant for
                ``compile_blocks=True``, which fuses the quantisation into the norms. It changes the numerics more
                than bf16 (BENCHMARKS.md).

        Returns the pipeline. Not combinable with CPU / group offloading or layerwise casting, in either order (a
        ``ValueError``; :meth:`disable_fast_inference` first).
        """
        self._check_fast_inference_args(
            dtype, cuda_graphs=cuda_graphs, compile_decoder=compile_decoder, compile_blocks=compile_blocks, fp8=fp8
        )
        self._cast_for_fast_inference(dtype, (self.vqvae.decoder, self.vqvae.post_quant_conv), compile_decoder)
        if compile_blocks:
            compile_adaln_blocks_(self.transformer, compile_blocks)
        return self._set_fast_inference(True, cuda_graphs, dtype, fp8)

    def _sampling_graphs(
        self,
        B: int,
        device: torch.device,
        settings: ScaleSampling,
        top_k: int | list[int],
        use_top_p: bool,
        run: ScaleRun | None = None,
        forcing: TokenForcing | None = None,
    ) -> CUDAGraphScaleSteps:
        """One CUDA graph per scale for the whole scale: transformer step, guidance, top-k / top-p, the draw, the
        codebook lookup, the f_hat update and the next scale's input (built once per batch size, ``top_k`` (it fixes
        shapes; one per scale or one for all) and structural setting). The guidance strengths, ``top_p`` and the
        temperatures are read from device tensors, so other values replay the same graphs; the graphs draw from a
        generator that borrows the caller's state. ``run`` (default: every scale with the transformer): the scales and
        the model of the set; a continuation's first graph is the prefill (with the replayed draws). With ``forcing``
        (editing) the graphs keep the input's tokens from a static copy of it (``graphs.forcing``, refilled per
        call)."""
        schedule = self.scale_schedule()
        num_scales = len(schedule)
        run = run or ScaleRun(self.transformer, range(num_scales))
        transformer, cfg = run.transformer, run.transformer.config
        rows, first = 2 * B, run.scales.start
        top_ks = [k if 0 < k < cfg.vocab_size else 0 for k in per_scale(top_k, num_scales)]
        prefill = run.prefix is not None
        logits_from = settings.prefill_logits_from(run)

        def build() -> CUDAGraphScaleSteps:
            cache = transformer.init_kv_cache(schedule[: run.scales.stop])  # room for the run's scales only
            memory = self._stage_memory(run, rows, device)
            if memory is not None:
                cache.share_storage(memory.kv_storage)
            side = cfg.patch_nums[-1]
            f_hat = torch.zeros(B, cfg.latent_channels, side, side, device=device)
            scale_inputs = [None] * num_scales  # those the run reads (the prefix at its first scale) and writes
            for si in range(max(first, 1), min(run.scales.stop + 1, num_scales)):
                length = (
                    transformer.begin_ends[si][1] - transformer.first_len
                    if prefill and si == first
                    else schedule[si][0] * schedule[si][1]
                )
                scale_inputs[si] = torch.zeros(rows, length, cfg.latent_channels, device=device)
            generator = torch.Generator(device)
            static_forcing = forcing.static_copy() if forcing is not None else None

            def step(si, labels_2B, guidance_S2, removable_mass, temperature_S):
                prefill_logits = replayed = None
                if prefill and si == first:
                    prefill_logits = transformer.prefill_scale((labels_2B,), cache, scale_inputs[si], logits_from)
                    if run.replay_prefix_draws:
                        replayed = self._replay_draws(
                            prefill_logits,
                            si,
                            top_ks,
                            0.0,
                            temperature_S,
                            generator,
                            settings,
                            removable_mass if use_top_p else None,
                        )
                    logits = prefill_logits[:, transformer.begin_ends[si][0] - logits_from :]
                else:
                    logits = transformer.forward_scale(si, (labels_2B,), cache, scale_inputs[si])
                indices, guided_logits, next_input = self._sample_scale(
                    si,
                    logits,
                    f_hat,
                    guidance_S2[si],
                    top_ks[si],
                    0.0,
                    generator,
                    settings,
                    removable_mass if use_top_p else None,
                    forcing=static_forcing,
                    temperature=temperature_S[si] if settings.tempered else None,
                )
                if next_input is not None:
                    scale_inputs[si + 1].copy_(self._guidance_rows(next_input))
                keep = settings.keep_logits
                return (
                    indices,
                    guided_logits,
                    logits.clone() if keep else None,
                    prefill_logits.clone() if settings.keep_prefill_logits and prefill_logits is not None else None,
                    replayed,
                )

            shared = (
                torch.zeros(rows, dtype=torch.long, device=device),
                torch.zeros(num_scales, 2, device=device),
                torch.zeros((), device=device),
                torch.ones(num_scales, device=device),
            )
            # f_hat is set by every generation before its first replay (zeros, or the f_hat the run continues)
            graphs = CUDAGraphScaleSteps(
                step,
                [()] * len(run.scales),
                cache.reset,
                shared,
                generator=generator,
                first_scale=first,
                pool=memory.pool if memory is not None else None,
            )
            graphs.f_hat, graphs.scale_inputs, graphs.memory = f_hat, scale_inputs, memory
            graphs.forcing = static_forcing
            if memory is not None:
                memory.pool = graphs.pool
            return graphs

        key = (
            "sampling",
            rows,
            settings,
            top_ks[0] if len(set(top_ks)) == 1 else tuple(top_ks),
            use_top_p,
            forcing is not None,
        )
        if transformer is not self.transformer or run.scales != range(num_scales) or prefill:  # a part of a generation
            key += (id(transformer), run.scales, prefill, run.replay_prefix_draws)
        return self._graph_scale_steps(key, device, build)

    def _stage_memory(self, run: ScaleRun, rows: int, device) -> "SharedStageMemory | None":
        """Memory that the graph set of ``run`` shares with the sets of other runs of the same generations (never
        replayed at the same time), or ``None``: a plain VAR generation is one run."""
        return None

    def _replay_draws(
        self,
        prefill_logits: torch.Tensor,
        first_scale: int,
        top_ks: list[int],
        top_p: float,
        temperatures,
        generator: GeneratorArg,
        settings: ScaleSampling,
        top_p_mass: torch.Tensor | None = None,
    ):
        """CoDe's refiner re-samples every scale before ``first_scale`` from the conditional rows of its prefill logits
        (no guidance; each scale's top-k, top-p and temperature) and discards the tokens: only the draws matter (they
        keep a seeded generator on the original's stream). Returns the re-sampled tokens, (B, l) per scale, when
        ``settings.keep_resamples`` (a callback asks for them); otherwise only draws the same numbers and returns
        None (``prefill_logits`` may then hold the first scale's positions alone: only its batch and vocabulary sizes
        are read)."""
        B, V = prefill_logits.shape[0] // 2, prefill_logits.shape[-1]
        replayed = []
        for si in range(first_scale):
            begin, end = self.transformer.begin_ends[si]
            if not settings.keep_resamples:
                advance_as_sample_from_logits((B, end - begin, V), generator, prefill_logits.device)
                continue
            logits = prefill_logits[:B, begin:end].clone()  # the prefill logits stay as the model gave them
            filter_top_k_top_p_(logits, top_ks[si], top_p, fast=settings.fast_filter, top_p_mass=top_p_mass)
            if settings.tempered:
                logits = logits / temperatures[si]
            replayed.append(sample_from_logits(logits, generator))
        return replayed if settings.keep_resamples else None

    # -- one scale -------------------------------------------------------------------------------------
    def _sample_scale(
        self,
        si: int,
        logits_2BlV: torch.Tensor,
        f_hat: torch.Tensor,
        strength,
        top_k: int,
        top_p: float,
        generator: GeneratorArg,
        settings: ScaleSampling,
        top_p_mass: torch.Tensor | None = None,
        forcing: ScaleForcing | None = None,
        temperature=None,
    ):
        """Guidance, top-k / top-p, the draw and the f_hat update (in place) of scale ``si``, eagerly or inside a CUDA
        graph (``strength``, ``1 - top_p`` and ``temperature`` then come as device tensors). ``forcing`` may replace
        the scale's code map (and indices) before f_hat. ``temperature`` (None: 1) divides the filtered logits for the
        draw only (the filters and the Gumbel mixture see them untempered, as in CoDe). Returns ``(indices, guided
        logits if settings.keep_logits, next scale's input tokens (B, l', Cv) or None after the last scale)``."""
        patch_nums = self.transformer.config.patch_nums
        num_scales, pn, B = len(patch_nums), patch_nums[si], f_hat.shape[0]
        ratio = si / (num_scales - 1)
        logits = apply_guidance(logits_2BlV, strength)
        guided_logits = logits.clone() if settings.keep_logits else None
        filter_top_k_top_p_(logits, top_k, top_p, fast=settings.fast_filter, top_p_mass=top_p_mass)
        indices, confidence = sample_from_logits(
            logits if temperature is None else logits / temperature, generator, return_confidence=True
        )
        if settings.more_smooth:  # soft mixture of codes (NaN logits give NaN codes); the hard sample is discarded
            weights = gumbel_softmax(logits.mul(1 + ratio), smooth_tau(ratio), generator)
            embedding = weights @ self.vqvae.codebook_vectors(weights.device)
        else:
            embedding = nan_where_drawn_from_nonfinite(self.vqvae.embed_tokens(indices), confidence)
        embedding = embedding.transpose(1, 2).reshape(B, -1, pn, pn)
        if forcing is not None:
            embedding, indices = forcing(si, embedding, indices)
        _, next_map = self.vqvae.next_scale_input(si, f_hat, embedding)
        return indices, guided_logits, None if si == num_scales - 1 else next_map.flatten(2).transpose(1, 2)

    def _sample_scales(
        self,
        labels_B: torch.LongTensor,
        top_k: int | list[int],
        top_p: float,
        more_smooth: bool,
        generator: GeneratorArg,
        callback=None,
        tensor_names: list[str] = (),
        forcing: ScaleForcing | None = None,
        temperature: float | list[float] = 1.0,
        run: ScaleRun | None = None,
    ) -> torch.Tensor:
        """The scale loop of a generation for the images of ``labels_B`` (the null class fills the unconditional rows);
        returns the final f_hat. ``forcing`` (task pipelines) replaces code maps before they enter f_hat. ``top_k`` and
        ``temperature``: one value, or one per scale. ``run`` (default: every scale, the pipeline's transformer): the
        scales and the model of this loop (:class:`ScaleRun`; CoDe runs the drafter and the refiner in turn)."""
        schedule = self.scale_schedule()
        num_scales, side, B = len(schedule), schedule[-1][0], labels_B.shape[0]
        run = run or ScaleRun(self.transformer, range(num_scales))
        top_ks, temperatures = per_scale(top_k, num_scales), per_scale(temperature, num_scales)
        prefill = run.prefix is not None
        device = labels_B.device
        condition = (torch.cat((labels_B, torch.full_like(labels_B, run.transformer.config.num_classes))),)

        # the whole scale in a CUDA graph (fast path, CUDA generator), or the transformer step (eager, or a graph)
        # followed by the eager sampler
        logit_names = {"guided_logits", "logits", "model_logits", "prefill_logits"}
        wants_logits = callback is not None and bool(logit_names & set(tensor_names))
        settings = ScaleSampling(
            more_smooth=more_smooth,
            keep_logits=wants_logits,
            fast_filter=self._fast_top_p(device),
            tempered=any(t != 1 for t in temperatures),
            keep_resamples=callback is not None and "draft_resamples" in tensor_names,
            keep_prefill_logits=callback is not None and "prefill_logits" in tensor_names,
        )
        graphs, graph_generator = None, self._graph_sampling_generator(device, generator)
        if graph_generator is not None and forcing is not None and not isinstance(forcing, TokenForcing):
            warn_eager_forcing(self)  # an arbitrary hook cannot be captured: sampling stays eager, said once
            graph_generator = None
        table_guidance = self._guidance_scale
        if graph_generator is not None:
            graphs = self._sampling_graphs(B, device, settings, top_k, top_p > 0, run, forcing)
            if forcing is not None:
                graphs.forcing.copy_(forcing)
            graphs.set_shared_inputs(
                condition[0],
                ramp_table(table_guidance, num_scales, device),
                top_p_mass(top_p, device),
                torch.tensor(temperatures, dtype=torch.float32).to(device, non_blocking=True),
            )
            latents = graphs.f_hat.zero_() if run.latents is None else graphs.f_hat.copy_(run.latents)
            if prefill:
                graphs.scale_inputs[run.scales.start].copy_(self._guidance_rows(run.prefix))
        else:
            prefill_from = settings.prefill_logits_from(run)
            transformer_step = self._transformer_steps(
                condition, schedule, device, run.transformer, run.scales, prefill, prefill_from
            )
            latents = (
                run.latents
                if run.latents is not None
                else torch.zeros(B, self.vqvae.config.z_channels, side, side, device=device, dtype=torch.float32)
            )
        scale_input = self._guidance_rows(run.prefix) if prefill else None

        with (
            self.progress_bar(total=len(run.scales)) as progress_bar,
            graphs.borrow_generator_state(graph_generator) if graphs is not None else nullcontext(),
        ):
            for si in run.scales:
                scale_hw = schedule[si]
                if self.interrupt:
                    break
                if graphs is not None:  # the whole scale, sampling included, is one graph replay
                    if self._guidance_scale != table_guidance:  # a callback changed the guidance
                        table_guidance = self._guidance_scale
                        graphs.shared_inputs[1].copy_(ramp_table(table_guidance, num_scales, device))
                    tokens, guided_logits, model_logits, prefill_logits, replayed = graphs(si)
                    next_input = graphs.scale_inputs[si + 1][:B] if si + 1 < num_scales else None
                else:
                    model_logits = transformer_step(si, scale_input)
                    prefill_logits = replayed = None
                    if prefill and si == run.scales.start:  # the logits of the positions from prefill_from on
                        begin = run.transformer.begin_ends[si][0]
                        head_rows, model_logits = model_logits, model_logits[:, begin - prefill_from :]
                        if run.replay_prefix_draws:
                            replayed = self._replay_draws(
                                head_rows, si, top_ks, top_p, temperatures, generator, settings
                            )
                        prefill_logits = head_rows if prefill_from == 0 else None
                    strength = linear_guidance_ramp(self._guidance_scale, si, num_scales)
                    tokens, guided_logits, next_input = self._sample_scale(
                        si,
                        model_logits,
                        latents,
                        strength,
                        top_ks[si],
                        top_p,
                        generator,
                        settings,
                        forcing=forcing,
                        temperature=temperatures[si] if settings.tempered else None,
                    )
                if callback is not None:
                    tensors = dict(
                        latents=latents,
                        tokens=tokens,
                        guided_logits=guided_logits,
                        model_logits=model_logits,
                        next_scale_input=next_input,
                        prefill_logits=prefill_logits,
                        draft_resamples=replayed,
                    )
                    new_latents = self._step_callback(callback, tensor_names, si, scale_hw, tensors)
                    if new_latents is not None:
                        latents, next_input = self._take_callback_latents(new_latents, latents, si, graphs)
                if run.next_inputs is not None and next_input is not None:
                    run.next_inputs.append(next_input)
                if graphs is None and next_input is not None:
                    scale_input = self._guidance_rows(next_input)
                progress_bar.update()
        # the graphs' buffer is overwritten by the next generation
        return latents.clone() if graphs is not None else latents

    # -- inputs -------------------------------------------------------------------------------------
    def check_inputs(
        self,
        class_labels,
        guidance_scale,
        top_k,
        top_p,
        more_smooth,
        num_images_per_prompt,
        generator,
        output_type,
        return_dict=True,
        temperature=1.0,
    ) -> None:
        """Every argument check of a call, before any work (a ValueError names the parameter)."""
        self._check_required_components()
        num_scales = len(self.transformer.config.patch_nums)
        check_guidance_scale(guidance_scale)
        check_common_inputs(top_k, top_p, output_type, num_images_per_prompt, return_dict, num_scales=num_scales)
        check_temperature(temperature, num_scales)
        check_bool(more_smooth, "more_smooth")
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            check_generator(generator, num_images_per_prompt)
            return
        labels = flatten_labels(class_labels)
        if not isinstance(labels, list) or not labels:
            raise ValueError(
                "`class_labels` must be an int, a non-empty list of ints (or of lists of ints), a tensor or numpy "
                f"array of ints, or None; got {class_labels!r}."
            )
        for label in labels:
            if not is_integer(label) or not -1 <= label <= num_classes:
                raise ValueError(
                    f"`class_labels` entries must be integers in [0, {num_classes - 1}], or -1 / {num_classes} "
                    f"for the null (unconditional) class; got {label!r}."
                )
        check_generator(generator, len(labels) * num_images_per_prompt)

    def prepare_class_labels(
        self, class_labels, num_images_per_prompt: int, generator: GeneratorArg, device
    ) -> torch.LongTensor:
        """(B,) labels of the images: the given ones (each repeated ``num_images_per_prompt`` times, -1 -> the null
        class), or drawn uniformly from ``generator`` as the original does."""
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            return draw_class_labels(num_classes, num_images_per_prompt, generator, device)
        labels = torch.tensor(
            [num_classes if label < 0 else label for label in flatten_labels(class_labels)], dtype=torch.long
        )
        return labels.repeat_interleave(num_images_per_prompt).to(device)

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | np.ndarray | None = None,
        guidance_scale: float = 4.0,
        top_k: int = 900,
        top_p: float = 0.95,
        more_smooth: bool = False,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: CallbackArg = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        temperature: float | list[float] = 1.0,
    ):
        r"""Generate images.

        Args:
            class_labels: class index, list of indices (or of lists, as diffusers' DiT takes them; a tensor or numpy
                array of them too), or ``None`` to draw ``num_images_per_prompt`` labels uniformly from
                ``generator`` (as the original does). ``-1`` is the null class.
            guidance_scale: the original ``cfg``: guidance ramps linearly from 0 at the first scale to
                ``guidance_scale`` at the last (``(1 + t) cond - t uncond``), in [0, 1e4]. The demo uses 4; the
                FID setting is 1.5 with ``top_p=0.96``.
            top_k: keep the ``top_k`` most likely tokens (0 = off; ties with the k-th survive); one value, or a list
                with one per scale (as CoDe passes it).
            top_p: nucleus filtering after top-k (0 = off).
            more_smooth: replace hard tokens by a Gumbel-softmax mixture of codes (sharper-looking
                images; the sampled token is still drawn and discarded, as in the original).
            num_images_per_prompt: images per label.
            generator: one ``torch.Generator`` (original draw order) or one per image.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (float (B, 3, H, W) in [0, 1]) or ``"latent"``
                (the final f_hat (B, Cv, h, h)).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end: called once per scale as ``fn(pipe, scale_index, (h, w), tensors)`` (or a diffusers
                ``PipelineCallback``) with the tensors named in ``callback_on_step_end_tensor_inputs``; the contract is
                every pipeline's (``diffusers_var.pipelines.pipeline_utils``): ``"latents"`` (f_hat), ``"tokens"``,
                ``"guided_logits"``, ``"model_logits"``, ``"next_scale_input"``; it may return a new ``"latents"``.
            callback_on_step_end_tensor_inputs: names from ``pipe._callback_tensor_inputs`` (default ``["latents"]``).
            temperature: divides the logits after top-k / top-p, before the draw (>= 1e-4; one value, or one per
                scale, as CoDe's sampler; 1 is the original VAR). The Gumbel mixture of ``more_smooth`` does not use
                it.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(
            class_labels,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            num_images_per_prompt,
            generator,
            output_type,
            return_dict,
            temperature,
        )
        self._begin_call(guidance_scale, len(self.scale_schedule()))
        device = self._execution_device

        # 1. the condition: the class labels of every image
        labels_B = self.prepare_class_labels(class_labels, num_images_per_prompt, generator, device)
        # 2. scale by scale
        latents = self._sample_scales(
            labels_B, top_k, top_p, more_smooth, generator, callback, tensor_names, temperature=temperature
        )
        # 3. decode
        return self._finish(latents, output_type, return_dict)


# ==============================================================================================
# Editing: in-painting / out-painting and image-to-image with VAR (issue 17)
# ==============================================================================================
class VARInpaintPipeline(VQEditTokens, NextScaleInpaintMixin, VARPipeline):
    r"""Class-conditional in-painting, out-painting and editing with VAR (the original's zero-shot editing,
    ``demo_zero_shot_edit.ipynb``).

    The input image is tokenised with the pipeline's VQ-VAE; at every scale the tokens outside the region to generate
    are replaced by the input's before they enter f_hat (and the next scale's input), so the model fills the region
    in context. Every random draw still happens as in :class:`VARPipeline` (the notebook's order), so a seed
    reproduces the notebook's edit. Loads from the same folders as :class:`VARPipeline`
    (``VARInpaintPipeline.from_pretrained(folder)``) or shares its weights (``VARInpaintPipeline.from_pipe(pipe)``).

    The mask of a scale is the notebook's rule: the keep side of the latent-grid mask (the last scale's
    ``pn x pn``) resized to the scale's grid bilinearly (``align_corners=False``) keeps the input where it is
    ``> 0.5``; scales of at most 3 tokens (1x1) always keep the input. A pixel mask is first reduced to the latent
    grid: a cell is generated when any of its pixels is white. :meth:`box_mask` makes the notebook's box masks.
    Under ``enable_fast_inference()`` the forcing runs inside the whole-scale CUDA graphs.
    """

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | np.ndarray | None = None,
        image=None,
        mask_image=None,
        image_indices: list[torch.Tensor] | None = None,
        guidance_scale: float = 4.0,
        top_k: int = 900,
        top_p: float = 0.95,
        more_smooth: bool = False,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: CallbackArg = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        mask_dilation: int = 0,
        temperature: float | list[float] = 1.0,
    ):
        r"""Re-generate the masked region of ``image``.

        Args:
            class_labels: what to generate in the region (class index, list of indices, or ``None`` to draw them as
                :class:`VARPipeline` does). The notebook in-paints with the null class (``-1``).
            image: the image to edit: PIL, numpy (H, W, 3) / (B, H, W, 3) or torch (3, H, W) / (B, 3, H, W) in
                [0, 1] (diffusers' ``VaeImageProcessor`` conventions; resized to the pipeline's size), or a list;
                one image for all labels or one per label. Or pass ``image_indices``.
            mask_image: where to generate (white / 1 / True), at the image's size or at the latent grid (the last
                scale's ``pn x pn``, e.g. from :meth:`box_mask`); PIL, numpy or torch; one for all images or one per
                label. A pixel mask is reduced to the latent grid (a cell is generated when any of its pixels is
                white), then each scale uses the notebook's rule (class docstring).
            image_indices: instead of ``image``, the input's tokens: the per-scale list ``vqvae.encode_indices``
                returns ((B, pn*pn) each).
            mask_dilation: grow the region to generate by this many latent cells on every side (after a pixel
                mask was reduced to the latent grid; 0, the default, is the notebook's edit). The decoder draws every
                cell from its neighbours too, so a new object drawn into a tight box keeps the old one's edges in the
                kept cells around it: one cell of margin lets it draw its own (README, "Quality on the embedded
                models").
            guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs, temperature: as in
                :meth:`VARPipeline.__call__`; the callback's ``"tokens"`` are the scale's tokens after the input's
                were put back.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        schedule = self._edit_schedule()
        num_labels = self.check_inputs(
            class_labels,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            num_images_per_prompt,
            generator,
            output_type,
            return_dict,
            image,
            image_indices,
            mask_image,
            mask_dilation,
            temperature,
        )
        self._begin_call(guidance_scale, len(schedule))
        device = self._execution_device

        # 1. the condition: the class labels of every image
        labels_B = self.prepare_class_labels(class_labels, num_images_per_prompt, generator, device)
        # 2. the input's tokens and, per scale, where they are kept
        tokens = self.prepare_image_tokens(image, image_indices, schedule, num_labels, num_images_per_prompt, device)
        keep = self.prepare_mask_keep(mask_image, schedule, num_labels, num_images_per_prompt, device, mask_dilation)
        # 3. scale by scale, the input's tokens put back where kept
        latents = self._sample_scales(
            labels_B,
            top_k,
            top_p,
            more_smooth,
            generator,
            callback,
            tensor_names,
            forcing=self._token_forcing(tokens, keep),
            temperature=temperature,
        )
        return self._finish(latents, output_type, return_dict)

    def check_inputs(
        self,
        class_labels,
        guidance_scale,
        top_k,
        top_p,
        more_smooth,
        num_images_per_prompt,
        generator,
        output_type,
        return_dict=True,
        image=None,
        image_indices=None,
        mask_image=None,
        mask_dilation=0,
        temperature=1.0,
    ) -> int:
        """:meth:`VARPipeline.check_inputs` and the image / mask checks. Returns the number of labels given (1 for
        ``class_labels=None``)."""
        super().check_inputs(
            class_labels,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            num_images_per_prompt,
            generator,
            output_type,
            return_dict,
            temperature,
        )
        num_labels = 1 if class_labels is None else len(flatten_labels(class_labels))
        schedule = self._edit_schedule()
        size = self.check_image_inputs(image, image_indices, schedule, num_labels, num_images_per_prompt)
        self.check_mask_input(mask_image, schedule, size, num_labels, num_images_per_prompt, mask_dilation)
        return num_labels


class VARImg2ImgPipeline(VQEditTokens, NextScaleEditMixin, VARPipeline):
    r"""Class-conditional image-to-image with VAR: the input image's tokens are kept for the first scales (its layout
    and colours) and the remaining scales are sampled for ``class_labels``.

    ``strength`` is diffusers' (the share of the steps that run): ``int(S * strength)`` of the ``S`` scales are
    sampled, the first ``S - int(S * strength)`` keep the input; 1.0 ignores the image (the same images as
    :class:`VARPipeline` for the same seed), 0.0 returns the tokenizer's reconstruction. Every scale still makes its
    random draws, as :class:`VARPipeline` does. Loads from the same folders as :class:`VARPipeline`, or
    ``VARImg2ImgPipeline.from_pipe(pipe)``; works under ``enable_fast_inference()`` (the input's tokens are put back
    inside the whole-scale CUDA graphs).
    """

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | np.ndarray | None = None,
        image=None,
        strength: float = 0.5,
        image_indices: list[torch.Tensor] | None = None,
        guidance_scale: float = 4.0,
        top_k: int = 900,
        top_p: float = 0.95,
        more_smooth: bool = False,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: CallbackArg = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        temperature: float | list[float] = 1.0,
    ):
        r"""Generate images of ``class_labels`` that start from ``image``.

        Args:
            class_labels: as in :meth:`VARPipeline.__call__`.
            image: the starting image: PIL, numpy or torch in [0, 1] (diffusers' conventions; resized to the
                pipeline's size), or a list; one for all labels or one per label. Or pass ``image_indices``.
            strength: in [0, 1], the share of the scales that are sampled (the rest keep the input's tokens);
                default 0.5.
            image_indices: instead of ``image``, the per-scale tokens ``vqvae.encode_indices`` returns.
            guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs, temperature: as in
                :meth:`VARPipeline.__call__`.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        schedule = self._edit_schedule()
        num_labels = self.check_inputs(
            class_labels,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            num_images_per_prompt,
            generator,
            output_type,
            return_dict,
            image,
            image_indices,
            strength,
            temperature,
        )
        self._begin_call(guidance_scale, len(schedule))
        device = self._execution_device

        # 1. the condition: the class labels of every image
        labels_B = self.prepare_class_labels(class_labels, num_images_per_prompt, generator, device)
        # 2. the input's tokens, kept for the first scales
        tokens = self.prepare_image_tokens(image, image_indices, schedule, num_labels, num_images_per_prompt, device)
        keep = self.strength_keep(strength, schedule, labels_B.shape[0], device)
        # 3. scale by scale
        latents = self._sample_scales(
            labels_B,
            top_k,
            top_p,
            more_smooth,
            generator,
            callback,
            tensor_names,
            forcing=self._token_forcing(tokens, keep),
            temperature=temperature,
        )
        return self._finish(latents, output_type, return_dict)

    def check_inputs(
        self,
        class_labels,
        guidance_scale,
        top_k,
        top_p,
        more_smooth,
        num_images_per_prompt,
        generator,
        output_type,
        return_dict=True,
        image=None,
        image_indices=None,
        strength=0.5,
        temperature=1.0,
    ) -> int:
        """:meth:`VARPipeline.check_inputs`, the image checks and ``strength``. Returns the number of labels given."""
        super().check_inputs(
            class_labels,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            num_images_per_prompt,
            generator,
            output_type,
            return_dict,
            temperature,
        )
        check_finite_number(strength, "strength", 0.0, 1.0)
        num_labels = 1 if class_labels is None else len(flatten_labels(class_labels))
        self.check_image_inputs(image, image_indices, self._edit_schedule(), num_labels, num_images_per_prompt)
        return num_labels


# ==============================================================================================================
# CoDe: collaborative decoding (a large drafter for the coarse scales, a small refiner for the fine ones)
# ==============================================================================================================
def _generator_states(generator: GeneratorArg):
    """The state of ``generator`` (a list of states for a list of generators; ``None`` for the global generator)."""
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return [g.get_state() for g in generator]
    return generator.get_state()


def _set_generator_states(generator: GeneratorArg, states) -> None:
    if generator is None:
        return
    for g, state in zip(
        generator if isinstance(generator, (list, tuple)) else [generator],
        states if isinstance(generator, (list, tuple)) else [states],
    ):
        g.set_state(state)


def _same_tokenizer(a: MultiScaleVQModel, b: MultiScaleVQModel) -> bool:
    """The same module, or equal configurations and equal weights (in the coarser dtype of the two: a tokenizer
    loaded in bf16, or cast by ``enable_fast_inference``, is the same as its float32 original)."""
    if a is b:
        return True
    config_a, config_b = ({k: v for k, v in dict(m.config).items() if not k.startswith("_")} for m in (a, b))
    if config_a != config_b:
        return False
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        state_a[k].shape == state_b[k].shape and _equal_weights(state_a[k].detach().cpu(), state_b[k].detach().cpu())
        for k in state_a
    )


def _equal_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, or within one rounding step of the coarser float dtype when the dtypes differ."""
    if a.dtype == b.dtype or not (a.is_floating_point() and b.is_floating_point()):
        return torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.double(), b.double())
    coarse = max((torch.finfo(a.dtype), torch.finfo(b.dtype)), key=lambda info: info.eps)
    return torch.allclose(a.double(), b.double(), rtol=coarse.eps, atol=coarse.tiny)


class VARCoDePipeline(VARPipeline):
    r"""CoDe (Collaborative Decoding, CVPR 2025): a large VAR (the drafter, ``transformer``) samples the first
    ``draft_steps`` scales, a small VAR (the ``refiner``) the remaining fine ones, sharing one tokenizer.

    The refiner never sees the drafter's states: one block-causal prefill pass over the drafted scales' next-scale
    inputs fills its KV cache and gives the logits of its first scale; from there it decodes scale by scale. Any two
    VAR checkpoints with the same tokenizer, scale schedule and classes work (training-free,
    :meth:`from_var_pipelines`); CoDe's fine-tuned ``drafter_N`` / ``refiner_N`` pairs are made for one
    ``draft_steps``, stored with the pipeline.

    Components:
        transformer ([`VARTransformer2DModel`]): the drafter (large).
        refiner ([`VARTransformer2DModel`]): the refiner (small), same classes, codebook and scale schedule.
        vqvae ([`MultiScaleVQModel`]): the tokenizer both share.
        draft_steps (`int`, *optional*): scales the drafter samples, in [1, num_scales - 1] (default
            ``num_scales - 2``, CoDe's N = 8 of 10 scales).
        id2label (`dict[int, str]`, *optional*): class names, as for :class:`VARPipeline`.

    Seeds: with a seeded CPU ``torch.Generator`` the draws are the original's: the drafter stage draws from the
    generator, then (the original re-seeds its second model with the same seed) the refiner stage restarts from the
    generator's state at the start of the call, redraws the labels when they are random, re-samples the drafted scales
    from its own prefill logits (discarded: this keeps the stream aligned) and samples the rest. The generator ends
    where the refiner stage leaves it; without ``more_smooth`` that is where a plain :class:`VARPipeline` call leaves
    it.
    """

    model_cpu_offload_seq = "transformer->refiner"
    _exclude_from_cpu_offload = ["vqvae"]
    # LoRA: the drafter's adapters (``transformer.`` keys: a VAR pipeline's files) and the refiner's (``refiner.``);
    # every LoRA method (list, disable, fuse, unload, delete, set_adapters) acts on both
    _lora_loadable_modules = ["transformer", "refiner"]
    _missing_component_hint = (
        ", or build it from two VAR pipelines: VARCoDePipeline.from_var_pipelines(drafter, refiner)"
    )
    # the refiner's first scale also hands its whole prefill (2B, cum_N, V) and the discarded re-samples of the drafted
    # scales (a list of (B, l) tokens); None at the other scales
    _callback_tensor_inputs = VARPipeline._callback_tensor_inputs + ["prefill_logits", "draft_resamples"]

    def __init__(
        self,
        transformer: VARTransformer2DModel,
        refiner: VARTransformer2DModel,
        vqvae: MultiScaleVQModel,
        draft_steps: int | None = None,
        id2label: dict | None = None,
    ):
        super().__init__(transformer=transformer, vqvae=vqvae, id2label=id2label)
        self._check_component_types(refiner=refiner)  # before its config is read
        if transformer is not None and refiner is not None:
            self._check_pair(transformer, refiner)
        scheduled = transformer if transformer is not None else refiner  # (both have one schedule)
        if scheduled is not None:
            num_scales = len(scheduled.config.patch_nums)
            draft_steps = max(1, num_scales - 2) if draft_steps is None else draft_steps
            self._check_draft_steps(draft_steps, num_scales)
        self.register_modules(refiner=refiner)
        self.register_to_config(draft_steps=None if draft_steps is None else int(draft_steps))

    @staticmethod
    def _check_pair(transformer, refiner) -> None:
        drafted, refined = transformer.config, refiner.config
        for name in ("patch_nums", "vocab_size", "latent_channels", "num_classes"):
            if tuple(per_scale(drafted[name], 1)) != tuple(per_scale(refined[name], 1)):
                raise ValueError(
                    f"`refiner` has {name}={refined[name]} but the drafter (`transformer`) has "
                    f"{drafted[name]}; CoDe needs two VAR models of one tokenizer, scale schedule "
                    "and class set."
                )

    @staticmethod
    def _check_draft_steps(draft_steps, num_scales: int) -> None:
        if not is_integer(draft_steps) or not 1 <= draft_steps <= num_scales - 1:
            raise ValueError(
                f"`draft_steps` must be an integer in [1, {num_scales - 1}] (the drafter samples that "
                f"many of the {num_scales} scales, the refiner the rest), got {draft_steps!r}."
            )

    @classmethod
    def from_var_pipelines(
        cls, drafter: VARPipeline, refiner: VARPipeline, draft_steps: int | None = None
    ) -> "VARCoDePipeline":
        """Training-free CoDe from two VAR pipelines that share a tokenizer (the same module, or equal weights): the
        new pipeline holds the drafter's transformer and tokenizer and the refiner's transformer (no weights copied).
        A ``ValueError`` names ``refiner`` when its tokenizer, classes or scale schedule differ from the drafter's."""
        for name, pipe in (("drafter", drafter), ("refiner", refiner)):
            if not isinstance(pipe, VARPipeline) or isinstance(pipe, VARCoDePipeline):
                raise ValueError(f"`{name}` must be a VARPipeline, got {type(pipe).__name__}.")
        if not _same_tokenizer(drafter.vqvae, refiner.vqvae):
            raise ValueError(
                "`refiner` was trained on another tokenizer than the drafter (their vqvae configurations "
                "or weights differ); CoDe's two models must share one tokenizer."
            )
        return cls(
            transformer=drafter.transformer,
            refiner=refiner.transformer,
            vqvae=drafter.vqvae,
            draft_steps=draft_steps,
            id2label=drafter.id2label or None,
        )

    # -- fast inference: both stages ------------------------------------------------------------------
    def enable_fast_inference(
        self,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        compile_decoder: bool | str = False,
        compile_blocks: bool | str = False,
        fp8: bool = False,
    ) -> "VARCoDePipeline":
        """:meth:`VARPipeline.enable_fast_inference` for both models: each stage replays its own CUDA graphs (the
        refiner's prefill, with its re-sampling of the drafted scales, is one graph), so CoDe's saving stacks on the
        fast path's. Arguments as there."""
        super().enable_fast_inference(dtype, cuda_graphs, compile_decoder, compile_blocks, fp8)
        if compile_blocks:
            compile_adaln_blocks_(self.refiner, compile_blocks)
        return self

    def _graphed_models(self):
        return (self.transformer, getattr(self, "refiner", None))

    @property
    def _fast_settings(self) -> FastSettings:
        """The drafter's switches, which must be the refiner's: a pipeline sharing only one of them (``from_pipe``)
        may have switched it alone."""
        drafter, refiner = fast_settings(self.transformer), fast_settings(getattr(self, "refiner", None))
        if drafter is not refiner and (drafter.enabled or refiner.enabled):
            raise ValueError(
                "the drafter's and the refiner's fast-inference switches differ (another pipeline sharing one of "
                "them called enable_fast_inference / disable_fast_inference): call `enable_fast_inference()` or "
                "`disable_fast_inference()` on this VARCoDePipeline."
            )
        return drafter

    def _check_fast_inference_args(self, dtype: torch.dtype, **flags) -> None:
        super()._check_fast_inference_args(dtype, **flags)
        if flags.get("fp8"):
            fp8_linears(self.refiner)  # a refiner float8 cannot take is refused before anything is cast

    def _cast_for_fast_inference(self, dtype: torch.dtype, decoder, compile_decoder: bool | str) -> None:
        super()._cast_for_fast_inference(dtype, decoder, compile_decoder)
        cast_module_(self.refiner, dtype)
        note_rounding_(self.refiner, dtype)

    def _set_fast_inference(
        self, enabled: bool, cuda_graphs: bool = False, dtype: torch.dtype | None = None, fp8: bool = False
    ):
        super()._set_fast_inference(enabled, cuda_graphs, dtype, fp8)
        quantize_linears_fp8_(self.refiner, enabled and fp8)
        fuse_ffn_gelu_(self.refiner, enabled and dtype != torch.float32)
        setattr(self.refiner, FAST_SETTINGS_ATTRIBUTE, fast_settings(self.transformer))
        self._stage_memories = weakref.WeakValueDictionary()  # alive while a graph set of its stages is cached
        return self

    def _stage_memory(self, run: ScaleRun, rows: int, device) -> SharedStageMemory:
        """The drafter's and the refiner's graph sets for ``rows`` and one ``draft_steps`` never replay at the same
        time: they share one KV buffer (the larger cache: the drafter's scales, or the refiner's whole pyramid) and one
        memory pool, so the fast path holds about the memory of one model's generation, not of both."""
        draft_steps = run.scales.start or run.scales.stop  # the refiner's first scale, or the drafter's last + 1
        dtype = self.transformer.blocks[0].attn.to_qkv.weight.dtype  # the keys' and values' (the blocks' dtype)
        key = (rows, str(device), dtype, draft_steps)
        memory = self._stage_memories.get(key)
        if memory is None:
            drafted = self.transformer.begin_ends[draft_steps][0]
            numel = max(
                2 * len(model.blocks) * rows * length * model.config.embed_dim
                for model, length in ((self.transformer, drafted), (self.refiner, self.refiner.seq_len))
            )
            memory = SharedStageMemory(torch.empty(numel, dtype=dtype, device=device))
            self._stage_memories[key] = memory
        return memory

    # -- inputs -------------------------------------------------------------------------------------
    def check_inputs(
        self,
        class_labels,
        guidance_scale,
        top_k,
        top_p,
        more_smooth,
        num_images_per_prompt,
        generator,
        output_type,
        return_dict=True,
        temperature=1.0,
        draft_steps=None,
    ) -> None:
        """Every argument check of a call, before any work (a ValueError names the parameter)."""
        self._check_required_components()  # a component left out is named as in every pipeline
        # the constructor's checks again: `pipe.transformer = ...` / `pipe.refiner = ...` skip it, and so does a
        # pipeline built without one of them (an IndexError or a misleading error deep in sampling otherwise)
        self._check_component_types(transformer=self.transformer, refiner=self.refiner)
        self._check_pair(self.transformer, self.refiner)
        super().check_inputs(
            class_labels,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            num_images_per_prompt,
            generator,
            output_type,
            return_dict,
            temperature,
        )
        num_scales = len(self.transformer.config.patch_nums)
        if draft_steps is not None:
            self._check_draft_steps(draft_steps, num_scales)
        elif self.config.draft_steps is None or not 1 <= self.config.draft_steps <= num_scales - 1:
            raise ValueError(
                f"`draft_steps` of the pipeline's config ({self.config.draft_steps!r}) does not fit the "
                f"{num_scales} scales of its `transformer` / `refiner`: pass `draft_steps=` in [1, {num_scales - 1}]."
            )

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | np.ndarray | None = None,
        guidance_scale: float = 4.0,
        top_k: int | list[int] = 600,
        top_p: float = 0.95,
        temperature: float | list[float] = 1.0,
        more_smooth: bool = False,
        draft_steps: int | None = None,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: CallbackArg = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Generate images: the drafter samples scales ``0 .. draft_steps - 1``, the refiner the rest.

        Args:
            class_labels: as for :class:`VARPipeline` (``None``: drawn from ``generator``; both stages use the same,
                also without a generator, where the original draws the refiner's labels again from the global
                random stream and refines towards other classes).
            guidance_scale: the original ``cfg``, ramped over the global scale index in both stages (4 in
                ``infer_CoDe.py``; its FID recipe uses 1.5 with ``top_p=0.96``).
            top_k: one value, or one per scale (the original passes ``[600] * 10``); 0 disables top-k.
            top_p: nucleus filtering after top-k, for every scale of both stages (0 = off).
            temperature: divides the filtered logits before each draw; one value or one per scale (the release uses
                ``[1.1] * 7 + [1.0] * 3`` for its 10 scales).
            more_smooth: VAR's Gumbel-softmax mixture of codes in both stages.
            draft_steps: scales the drafter samples, in [1, num_scales - 1]; default the pipeline's
                ``config.draft_steps`` (what its fine-tuned pair was made for).
            num_images_per_prompt, generator, output_type, return_dict: as for :class:`VARPipeline`.
            callback_on_step_end: called at every scale of both stages with the family's tensors (``"latents"``,
                ``"tokens"``, ``"guided_logits"``, ``"model_logits"``, ``"next_scale_input"``), plus, at the refiner's
                first scale, ``"prefill_logits"`` (its whole prefill, before guidance) and ``"draft_resamples"`` (the
                discarded re-samples of the drafted scales); it may return a new ``"latents"``.
            callback_on_step_end_tensor_inputs: names from ``pipe._callback_tensor_inputs`` (default ``["latents"]``).
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(
            class_labels,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            num_images_per_prompt,
            generator,
            output_type,
            return_dict,
            temperature,
            draft_steps,
        )
        draft_steps = self.config.draft_steps if draft_steps is None else draft_steps
        num_scales = len(self.scale_schedule())
        self._begin_call(guidance_scale, num_scales)
        device = self._execution_device
        start_state = _generator_states(generator)

        # 1. the condition: the class labels of every image
        labels_B = self.prepare_class_labels(class_labels, num_images_per_prompt, generator, device)
        # 2. the drafter samples the coarse scales; their next-scale inputs are the refiner's prefix
        drafted_inputs = []
        latents = self._sample_scales(
            labels_B,
            top_k,
            top_p,
            more_smooth,
            generator,
            callback,
            tensor_names,
            temperature=temperature,
            run=ScaleRun(self.transformer, range(draft_steps), next_inputs=drafted_inputs),
        )
        # 3. the refiner restarts from the generator's state at the start of the call (the original re-seeds), draws
        # the same labels again, re-samples the drafted scales (discarded), then samples the fine scales
        if not self.interrupt:
            _set_generator_states(generator, start_state)
            if class_labels is None and generator is not None:
                labels_B = self.prepare_class_labels(None, num_images_per_prompt, generator, device)
            refine = ScaleRun(
                self.refiner,
                range(draft_steps, num_scales),
                latents=latents,
                prefix=torch.cat(drafted_inputs, dim=1),
                replay_prefix_draws=True,
            )
            latents = self._sample_scales(
                labels_B,
                top_k,
                top_p,
                more_smooth,
                generator,
                callback,
                tensor_names,
                temperature=temperature,
                run=refine,
            )
        # 4. decode
        return self._finish(latents, output_type, return_dict)
