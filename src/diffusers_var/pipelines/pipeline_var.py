"""VARPipeline: class-conditional image generation by next-scale prediction."""

from __future__ import annotations

import json
from contextlib import nullcontext
from importlib import resources
from typing import Callable, NamedTuple

import torch

from ..loaders import VARLoraLoaderMixin
from ..models.blocks import square_schedule
from ..models.multiscale_vq import MultiScaleVQModel
from ..models.var_transformer import VARTransformer2DModel
from .fast_inference import CUDAGraphScaleSteps, check_fast_inference_args, compile_adaln_blocks_, fp8_linears
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
    flatten_labels,
    warn_eager_forcing,
)
from .sampling import (
    GeneratorArg,
    apply_guidance,
    draw_class_labels,
    filter_top_k_top_p_,
    guidance_table,
    gumbel_softmax,
    linear_guidance_ramp,
    sample_from_logits,
    smooth_tau,
    top_p_mass,
)


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, comma-separated synonyms), by class index."""
    text = resources.files("diffusers_var.data").joinpath("imagenet_id2label.json").read_text()
    return {int(k): v for k, v in json.loads(text).items()}


# ``forcing(scale_index, code_map_BChw, indices_Bl) -> (code_map, indices)``: a task pipeline's replacement of a
# scale's sampled code map (and indices) before it enters f_hat (in-painting keeps the input image's codes)
ScaleForcing = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ScaleSampling(NamedTuple):
    """What shapes a scale's sampling code (a CUDA graph set is captured per value): Gumbel smoothing, copies of the
    logits for the callback, the k-wide top-p of the fast path."""

    more_smooth: bool
    keep_logits: bool
    fast_filter: bool


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
        if transformer is not None and vqvae is not None:
            if tuple(transformer.config.patch_nums) != tuple(vqvae.config.patch_nums):
                raise ValueError(f"transformer and vqvae `patch_nums` differ: {transformer.config.patch_nums} vs "
                                 f"{vqvae.config.patch_nums}.")
            if transformer.config.vocab_size != vqvae.config.vocab_size or transformer.config.latent_channels != vqvae.config.z_channels:
                raise ValueError("transformer `vocab_size`/`latent_channels` must match the vqvae's `vocab_size`/`z_channels`.")
        self.register_modules(transformer=transformer, vqvae=vqvae)
        if id2label is None and transformer is not None and transformer.config.num_classes == 1000:
            id2label = imagenet_id2label()
        id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()} or None)
        self.id2label = id2label
        self.labels = {}
        for key, value in id2label.items():
            for name in value.split(","):
                self.labels[name.strip()] = key
        self.labels = dict(sorted(self.labels.items()))

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (any synonym, e.g. ``"golden retriever"``) to class indices."""
        labels = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            raise ValueError(f"`label` {unknown} not found; choose from `pipe.labels` ({len(self.labels)} names).")
        return [self.labels[name] for name in labels]

    def scale_schedule(self) -> list[tuple[int, int]]:
        """The token grid ``(h, w)`` of every scale."""
        return square_schedule(self.transformer.config.patch_nums)

    # -- fast inference ------------------------------------------------------------------------------
    def enable_fast_inference(self, dtype: torch.dtype = torch.bfloat16, cuda_graphs: bool = True,
                              compile_decoder: bool = False, compile_blocks: bool = False,
                              fp8: bool = False) -> "VARPipeline":
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
        inside these graphs; a pipeline made with ``from_pipe`` of a fast one is fast too.

        Args:
            dtype: compute dtype of the blocks and the decoder.
            cuda_graphs: replay one CUDA graph per scale (on CUDA).
            compile_decoder: channels-last ``torch.compile`` of the image decoder.
            compile_blocks: ``torch.compile`` of each block's elementwise work (fused before the CUDA graphs are
                captured; the first generation per batch size compiles).
            fp8: (opt-in, for large batches of the large models) float8 (e4m3) matmuls for the attention and FFN
                linears of the blocks at scales of at least 4,096 token rows (activations scaled per row, weights per
                output channel); needs ``dtype=torch.bfloat16`` and a GPU with float8 tensor cores, and is meant for
                ``compile_blocks=True``, which fuses the quantisation into the norms. It changes the numerics more
                than bf16 (BENCHMARKS.md).

        Returns the pipeline. Not combinable with CPU / group offloading or layerwise casting.
        """
        check_fast_inference_args(dtype, cuda_graphs=cuda_graphs, compile_decoder=compile_decoder,
                                  compile_blocks=compile_blocks, fp8=fp8)
        if fp8:
            fp8_linears(self.transformer)  # a model float8 cannot take is refused before anything is cast or compiled
        self._cast_for_fast_inference(dtype, (self.vqvae.decoder, self.vqvae.post_quant_conv), compile_decoder)
        if compile_blocks:
            compile_adaln_blocks_(self.transformer)
        return self._set_fast_inference(True, cuda_graphs, dtype, fp8)

    def _sampling_graphs(self, B: int, device: torch.device, settings: ScaleSampling, top_k: int,
                         use_top_p: bool, forcing: TokenForcing | None = None) -> CUDAGraphScaleSteps:
        """One CUDA graph per scale for the whole scale: transformer step, guidance, top-k / top-p, the draw, the
        codebook lookup, the f_hat update and the next scale's input (built once per batch size, ``top_k`` (it fixes
        shapes) and structural setting). The guidance strengths and ``top_p`` are read from device tensors, so other
        values replay the same graphs; the graphs draw from a generator that borrows the caller's state. With
        ``forcing`` (editing) the graphs keep the input's tokens from a static copy of it (``graphs.forcing``, refilled
        per call)."""
        transformer, cfg = self.transformer, self.transformer.config
        rows, schedule = 2 * B, self.scale_schedule()
        num_scales = len(schedule)
        top_k = top_k if 0 < top_k < cfg.vocab_size else 0

        def build() -> CUDAGraphScaleSteps:
            cache = transformer.init_kv_cache()
            side = cfg.patch_nums[-1]
            f_hat = torch.zeros(B, cfg.latent_channels, side, side, device=device)
            scale_inputs = [None] + [torch.zeros(rows, h * w, cfg.latent_channels, device=device) for h, w in schedule[1:]]
            generator = torch.Generator(device)
            static_forcing = forcing.static_copy() if forcing is not None else None

            def step(si, labels_2B, guidance_S2, removable_mass):
                logits = transformer.forward_scale(si, (labels_2B,), cache, scale_inputs[si])
                indices, guided_logits, next_input = self._sample_scale(
                    si, logits, f_hat, guidance_S2[si], top_k, 0.0, generator, settings,
                    removable_mass if use_top_p else None, forcing=static_forcing)
                if next_input is not None:
                    scale_inputs[si + 1].copy_(self._guidance_rows(next_input))
                return indices, guided_logits, logits.clone() if settings.keep_logits else None

            def reset():
                cache.reset()
                f_hat.zero_()

            shared = (torch.zeros(rows, dtype=torch.long, device=device), torch.zeros(num_scales, 2, device=device),
                      torch.zeros((), device=device))
            graphs = CUDAGraphScaleSteps(step, [()] * num_scales, reset, shared, generator=generator)
            graphs.f_hat, graphs.scale_inputs, graphs.forcing = f_hat, scale_inputs, static_forcing
            return graphs

        key = ("sampling", rows, settings, top_k, use_top_p, forcing is not None)
        return self._graph_scale_steps(key, device, build)

    # -- one scale -------------------------------------------------------------------------------------
    def _sample_scale(self, si: int, logits_2BlV: torch.Tensor, f_hat: torch.Tensor, strength, top_k: int, top_p: float,
                      generator: GeneratorArg, settings: ScaleSampling, top_p_mass: torch.Tensor | None = None,
                      forcing: ScaleForcing | None = None):
        """Guidance, top-k / top-p, the draw and the f_hat update (in place) of scale ``si``, eagerly or inside a CUDA
        graph (``strength`` and ``1 - top_p`` then come as device tensors). ``forcing`` may replace the scale's code map
        (and indices) before f_hat. Returns ``(indices, guided logits if settings.keep_logits, next scale's input tokens
        (B, l', Cv) or None after the last scale)``."""
        patch_nums = self.transformer.config.patch_nums
        num_scales, pn, B = len(patch_nums), patch_nums[si], f_hat.shape[0]
        ratio = si / (num_scales - 1)
        logits = apply_guidance(logits_2BlV, strength)
        guided_logits = logits.clone() if settings.keep_logits else None
        filter_top_k_top_p_(logits, top_k, top_p, fast=settings.fast_filter, top_p_mass=top_p_mass)
        indices = sample_from_logits(logits, generator)
        if settings.more_smooth:  # soft mixture of codes; the hard sample above is discarded
            weights = gumbel_softmax(logits.mul(1 + ratio), smooth_tau(ratio), generator)
            embedding = weights @ self.vqvae.codebook_vectors(weights.device)
        else:
            embedding = self.vqvae.embed_tokens(indices)
        embedding = embedding.transpose(1, 2).reshape(B, -1, pn, pn)
        if forcing is not None:
            embedding, indices = forcing(si, embedding, indices)
        _, next_map = self.vqvae.next_scale_input(si, f_hat, embedding)
        return indices, guided_logits, None if si == num_scales - 1 else next_map.flatten(2).transpose(1, 2)

    def _sample_scales(self, labels_B: torch.LongTensor, top_k: int, top_p: float, more_smooth: bool, generator: GeneratorArg,
                       callback=None, tensor_names: list[str] = (), forcing: ScaleForcing | None = None) -> torch.Tensor:
        """The scale loop of a generation for the images of ``labels_B`` (the null class fills the unconditional rows);
        returns the final f_hat. ``forcing`` (task pipelines) replaces code maps before they enter f_hat."""
        schedule = self.scale_schedule()
        num_scales, side, B = len(schedule), schedule[-1][0], labels_B.shape[0]
        device = labels_B.device
        condition = (torch.cat((labels_B, torch.full_like(labels_B, self.transformer.config.num_classes))),)

        # the whole scale in a CUDA graph (fast path, CUDA generator), or the transformer step (eager, or a graph)
        # followed by the eager sampler
        wants_logits = callback is not None and bool({"guided_logits", "logits", "model_logits"} & set(tensor_names))
        settings = ScaleSampling(more_smooth=more_smooth, keep_logits=wants_logits, fast_filter=self._fast_top_p(device))
        graphs, graph_generator = None, self._graph_sampling_generator(device, generator)
        if graph_generator is not None and forcing is not None and not isinstance(forcing, TokenForcing):
            warn_eager_forcing(self)  # an arbitrary hook cannot be captured: sampling stays eager, said once
            graph_generator = None
        table_guidance = self._guidance_scale
        if graph_generator is not None:
            graphs = self._sampling_graphs(B, device, settings, top_k, top_p > 0, forcing)
            if forcing is not None:
                graphs.forcing.copy_(forcing)
            strengths = [linear_guidance_ramp(table_guidance, si, num_scales) for si in range(num_scales)]
            graphs.set_shared_inputs(condition[0], guidance_table(strengths, device), top_p_mass(top_p, device))
            latents = graphs.f_hat.zero_()
        else:
            transformer_step = self._transformer_steps(condition, schedule, device)
            latents = torch.zeros(B, self.vqvae.config.z_channels, side, side, device=device, dtype=torch.float32)
        scale_input = None

        with self.progress_bar(total=num_scales) as progress_bar, \
                (graphs.borrow_generator_state(graph_generator) if graphs is not None else nullcontext()):
            for si, scale_hw in enumerate(schedule):
                if self.interrupt:
                    break
                if graphs is not None:  # the whole scale, sampling included, is one graph replay
                    if self._guidance_scale != table_guidance:  # a callback changed the guidance
                        table_guidance = self._guidance_scale
                        strengths = [linear_guidance_ramp(table_guidance, k, num_scales) for k in range(num_scales)]
                        graphs.shared_inputs[1].copy_(guidance_table(strengths, device))
                    tokens, guided_logits, model_logits = graphs(si)
                    next_input = graphs.scale_inputs[si + 1][:B] if si + 1 < num_scales else None
                else:
                    model_logits = transformer_step(si, scale_input)
                    strength = linear_guidance_ramp(self._guidance_scale, si, num_scales)
                    tokens, guided_logits, next_input = self._sample_scale(si, model_logits, latents, strength, top_k, top_p,
                                                                           generator, settings, forcing=forcing)
                if callback is not None:
                    tensors = dict(latents=latents, tokens=tokens, guided_logits=guided_logits, model_logits=model_logits,
                                   next_scale_input=next_input)
                    new_latents = self._step_callback(callback, tensor_names, si, scale_hw, tensors)
                    if new_latents is not None:
                        next_input = self._next_scale_input(new_latents, si)
                        if graphs is None:
                            latents = new_latents
                        else:  # write the callback's latent into the graphs' static buffers
                            latents.copy_(new_latents)
                            if next_input is not None:
                                graphs.scale_inputs[si + 1].copy_(self._guidance_rows(next_input))
                if graphs is None and next_input is not None:
                    scale_input = self._guidance_rows(next_input)
                progress_bar.update()
        # the graphs' buffer is overwritten by the next generation
        return latents.clone() if graphs is not None else latents


    # -- inputs -------------------------------------------------------------------------------------
    def check_inputs(self, class_labels, guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator,
                     output_type, return_dict=True) -> None:
        """Every argument check of a call, before any work (a ValueError names the parameter)."""
        check_finite_number(guidance_scale, "guidance_scale", 0.0)
        check_common_inputs(top_k, top_p, output_type, num_images_per_prompt, return_dict)
        check_bool(more_smooth, "more_smooth")
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            check_generator(generator, num_images_per_prompt)
            return
        labels = flatten_labels(class_labels)
        if not isinstance(labels, list) or not labels:
            raise ValueError("`class_labels` must be an int, a non-empty list of ints (or of lists of ints), a 1-D tensor, "
                             f"or None; got {class_labels!r}.")
        for label in labels:
            if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label <= num_classes:
                raise ValueError(
                    f"`class_labels` entries must be integers in [0, {num_classes - 1}], or -1 / {num_classes} "
                    f"for the null (unconditional) class; got {label!r}."
                )
        check_generator(generator, len(labels) * num_images_per_prompt)

    def prepare_class_labels(self, class_labels, num_images_per_prompt: int, generator: GeneratorArg, device) -> torch.LongTensor:
        """(B,) labels of the images: the given ones (each repeated ``num_images_per_prompt`` times, -1 -> the null
        class), or drawn uniformly from ``generator`` as the original does."""
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            return draw_class_labels(num_classes, num_images_per_prompt, generator, device)
        labels = torch.tensor([num_classes if label < 0 else label for label in flatten_labels(class_labels)], dtype=torch.long)
        return labels.repeat_interleave(num_images_per_prompt).to(device)

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
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
    ):
        r"""Generate images.

        Args:
            class_labels: class index, list of indices (or of lists, as diffusers' DiT takes them), or ``None`` to
                draw ``num_images_per_prompt`` labels uniformly from ``generator`` (as the original does). ``-1`` is the
                null class.
            guidance_scale: the original ``cfg``: guidance ramps linearly from 0 at the first scale to
                ``guidance_scale`` at the last (``(1 + t) cond - t uncond``). The demo uses 4; the FID
                setting is 1.5 with ``top_p=0.96``.
            top_k: keep the ``top_k`` most likely tokens (0 = off; ties with the k-th survive).
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
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(class_labels, guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator,
                          output_type, return_dict)
        self._begin_call(guidance_scale, len(self.scale_schedule()))
        device = self._execution_device

        # 1. the condition: the class labels of every image
        labels_B = self.prepare_class_labels(class_labels, num_images_per_prompt, generator, device)
        # 2. scale by scale
        latents = self._sample_scales(labels_B, top_k, top_p, more_smooth, generator, callback, tensor_names)
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
        class_labels: int | list[int] | torch.Tensor | None = None,
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
            guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in :meth:`VARPipeline.__call__`; the
                callback's ``"tokens"`` are the scale's tokens after the input's were put back.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        schedule = self._edit_schedule()
        num_labels = self.check_inputs(class_labels, guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt,
                                       generator, output_type, return_dict, image, image_indices, mask_image)
        self._begin_call(guidance_scale, len(schedule))
        device = self._execution_device

        # 1. the condition: the class labels of every image
        labels_B = self.prepare_class_labels(class_labels, num_images_per_prompt, generator, device)
        # 2. the input's tokens and, per scale, where they are kept
        tokens = self.prepare_image_tokens(image, image_indices, schedule, num_labels, num_images_per_prompt, device)
        keep = self.prepare_mask_keep(mask_image, schedule, num_labels, num_images_per_prompt, device)
        # 3. scale by scale, the input's tokens put back where kept
        latents = self._sample_scales(labels_B, top_k, top_p, more_smooth, generator, callback, tensor_names,
                                      forcing=self._token_forcing(tokens, keep))
        return self._finish(latents, output_type, return_dict)

    def check_inputs(self, class_labels, guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator,
                     output_type, return_dict=True, image=None, image_indices=None, mask_image=None) -> int:
        """:meth:`VARPipeline.check_inputs` and the image / mask checks. Returns the number of labels given (1 for
        ``class_labels=None``)."""
        super().check_inputs(class_labels, guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator,
                             output_type, return_dict)
        num_labels = 1 if class_labels is None else len(flatten_labels(class_labels))
        schedule = self._edit_schedule()
        size = self.check_image_inputs(image, image_indices, schedule, num_labels, num_images_per_prompt)
        self.check_mask_input(mask_image, schedule, size, num_labels, num_images_per_prompt)
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
        class_labels: int | list[int] | torch.Tensor | None = None,
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
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in :meth:`VARPipeline.__call__`.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        schedule = self._edit_schedule()
        num_labels = self.check_inputs(class_labels, guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt,
                                       generator, output_type, return_dict, image, image_indices, strength)
        self._begin_call(guidance_scale, len(schedule))
        device = self._execution_device

        # 1. the condition: the class labels of every image
        labels_B = self.prepare_class_labels(class_labels, num_images_per_prompt, generator, device)
        # 2. the input's tokens, kept for the first scales
        tokens = self.prepare_image_tokens(image, image_indices, schedule, num_labels, num_images_per_prompt, device)
        keep = self.strength_keep(strength, schedule, labels_B.shape[0], device)
        # 3. scale by scale
        latents = self._sample_scales(labels_B, top_k, top_p, more_smooth, generator, callback, tensor_names,
                                      forcing=self._token_forcing(tokens, keep))
        return self._finish(latents, output_type, return_dict)

    def check_inputs(self, class_labels, guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator,
                     output_type, return_dict=True, image=None, image_indices=None, strength=0.5) -> int:
        """:meth:`VARPipeline.check_inputs`, the image checks and ``strength``. Returns the number of labels given."""
        super().check_inputs(class_labels, guidance_scale, top_k, top_p, more_smooth, num_images_per_prompt, generator,
                             output_type, return_dict)
        check_finite_number(strength, "strength", 0.0, 1.0)
        num_labels = 1 if class_labels is None else len(flatten_labels(class_labels))
        self.check_image_inputs(image, image_indices, self._edit_schedule(), num_labels, num_images_per_prompt)
        return num_labels
