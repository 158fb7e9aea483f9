"""VARPipeline: class-conditional image generation by next-scale prediction."""

from __future__ import annotations

import json
from importlib import resources
from contextlib import nullcontext
from typing import Any, Callable, NamedTuple

import torch

from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from ..models.blocks import compile_adaln_blocks_, fp8_linears
from ..models.multiscale_vq import MultiScaleVQModel, area_down
from ..models.var_transformer import VARTransformer2DModel
from .fast_inference import CUDAGraphScaleSteps, FastInferenceMixin, cast_decoder_, cast_module_, check_fast_inference_args
from .sampling import (
    GeneratorArg,
    apply_guidance,
    check_callback_inputs,
    check_generator,
    check_sampling_args,
    draw_class_labels,
    filter_top_k_top_p_,
    gumbel_softmax,
    guidance_table,
    top_p_mass,
    linear_guidance_ramp,
    sample_from_logits,
    smooth_tau,
)


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, comma-separated synonyms), by class index."""
    text = resources.files("diffusers_var.data").joinpath("imagenet_id2label.json").read_text()
    return {int(k): v for k, v in json.loads(text).items()}


def images_to_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) float in [0, 1] -> "pt" tensor, "np" array (B, H, W, 3) or "pil" list."""
    if output_type == "pt":
        return images
    array = VaeImageProcessor.pt_to_numpy(images.float().cpu())
    return array if output_type == "np" else VaeImageProcessor.numpy_to_pil(array)


def run_scale_callback(pipeline, callback, scale_index: int, patch_nums, tensors: dict, names, f_hat, next_input):
    """Call ``callback_on_step_end`` with the requested ``tensors``; a returned ``"f_hat"`` replaces the
    running latent (and the next scale's input derived from it). Returns ``(f_hat, next_input)``."""
    out = callback(pipeline, scale_index, patch_nums[scale_index], {k: tensors[k] for k in names}) or {}
    if out.get("f_hat") is not None and out["f_hat"] is not f_hat:
        f_hat = out["f_hat"].to(torch.float32, copy=True)  # a copy: the next scales add to f_hat in place
        if scale_index != len(patch_nums) - 1:
            next_input = area_down(f_hat, patch_nums[scale_index + 1])
    return f_hat, next_input


def finish_generation(pipeline, f_hat: torch.Tensor, output_type: str, return_dict: bool):
    """Decode the final latent (unless ``"latent"``), free offload hooks and wrap the output."""
    if output_type == "latent":
        images = f_hat
    else:
        images = images_to_output((pipeline.vqvae.decode_latent(f_hat) + 1) / 2, output_type)
    pipeline.maybe_free_model_hooks()
    if not return_dict:
        return (images,)
    return ImagePipelineOutput(images=images)


class ScaleSampling(NamedTuple):
    """What shapes a scale's sampling code (a CUDA graph set is captured per value): Gumbel smoothing, a copy of the
    guided logits for the callback, the k-wide top-p of the fast path, separable upsampling of the code maps."""

    more_smooth: bool
    keep_logits: bool
    fast_filter: bool
    separable_upsample: bool


def cfg_scale_input(next_input: torch.Tensor) -> torch.Tensor:
    """(B, Cv, pn, pn) next-scale input -> (2B, pn*pn, Cv) transformer input (the same for both guidance halves)."""
    return next_input.flatten(2).transpose(1, 2).repeat(2, 1, 1)


class VARPipeline(DiffusionPipeline, FastInferenceMixin):
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
    _callback_tensor_inputs = ["f_hat", "logits", "indices"]

    def __init__(self, transformer: VARTransformer2DModel, vqvae: MultiScaleVQModel, id2label: dict | None = None):
        super().__init__()
        if tuple(transformer.config.patch_nums) != tuple(vqvae.config.patch_nums):
            raise ValueError(f"transformer and vqvae `patch_nums` differ: {transformer.config.patch_nums} vs {vqvae.config.patch_nums}.")
        if transformer.config.vocab_size != vqvae.config.vocab_size or transformer.config.latent_channels != vqvae.config.z_channels:
            raise ValueError("transformer `vocab_size`/`latent_channels` must match the vqvae's `vocab_size`/`z_channels`.")
        self.register_modules(transformer=transformer, vqvae=vqvae)
        if id2label is None and transformer.config.num_classes == 1000:
            id2label = imagenet_id2label()
        id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()} or None)
        self.id2label = id2label
        self.labels = {}
        for key, value in id2label.items():
            for name in value.split(","):
                self.labels[name.strip()] = key
        self.labels = dict(sorted(self.labels.items()))

    # -- fast inference ------------------------------------------------------------------------------
    def enable_fast_inference(self, dtype: torch.dtype = torch.bfloat16, cuda_graphs: bool = True,
                              compile_decoder: bool = False, compile_blocks: bool = False,
                              fp8: bool = False) -> "VARPipeline":
        """Speed switch for GPUs. The transformer blocks and the image decoder run in ``dtype`` (bf16 by
        default); the output head, the quantizer (codebook, Phi convs) and f_hat stay float32, which keeps
        greedy tokens close to the float32 path. On CUDA each scale's transformer step is a CUDA graph
        (captured on the first call for a batch size, then replayed) and top-p sorts only the top-k values; in
        bf16 / fp16 the FFN's bias and GELU also run in the epilogue of its first matmul and the code maps are
        upsampled by a separable bicubic (same weights; float32 keeps the eager kernels, so its outputs equal
        the eager ones). With a CUDA ``torch.Generator`` (or ``generator=None``: the device's default one) the whole
        scale is one graph: transformer step, guidance, top-k / top-p, the draw, the codebook lookup and the f_hat
        update (captured per batch size, ``top_k`` and ``more_smooth``; other guidance scales and ``top_p`` replay
        the same graphs). The graphs borrow the generator's state, so a seed gives the same images as the eager
        sampler and the generator advances as if it had drawn eagerly; the tensors handed to
        ``callback_on_step_end`` are the graphs' buffers (clone what you keep). A CPU generator, or a list of
        generators, keeps the original's host-side draws (graphs for the transformer step only). On the CPU it
        only casts (the sampler and the step stay eager). ``compile_decoder``: channels-last ``torch.compile`` of the image
        decoder (its 3-channel output conv computed with zero-padded channels, see ``pad_narrow_convs_``). ``compile_blocks``:
        ``torch.compile`` of each block's elementwise work (fused before the CUDA graphs are captured; the first
        generation per batch size compiles). ``fp8``
        (opt-in, for large batches of the large models): float8 (e4m3) matmuls for the attention and FFN linears
        of the blocks at scales of at least 4,096 token rows (activations scaled per row, weights per output
        channel); needs ``dtype=torch.bfloat16`` and a GPU with float8 tensor cores (H100), and is meant for
        ``compile_blocks=True``, which fuses the quantisation into the norms. H100, batch 64: VAR-d30 103.4 -> 111.1
        images/s, VAR-d16 unchanged (300 vs 298); it changes the numerics more than bf16 (BENCHMARKS.md). Returns the pipeline.
        """
        check_fast_inference_args(dtype, cuda_graphs, compile_decoder, fp8, compile_blocks=compile_blocks)
        transformer = self.transformer
        if fp8:
            fp8_linears(transformer)  # a model float8 cannot take is refused before anything is cast or compiled
        cast_module_(transformer, dtype, keep_float32=(transformer.head, transformer.head_norm))
        cast_decoder_((self.vqvae.decoder, self.vqvae.post_quant_conv), dtype,
                      self.vqvae.decoder if compile_decoder else None)
        if compile_blocks:
            compile_adaln_blocks_(transformer)
        return self._set_fast_inference(True, cuda_graphs, dtype, fp8)

    def _scale_step(self, rows: int, device: torch.device):
        """``step(scale_index, cond, scale_input) -> logits`` for one generation: eager with a fresh
        KV cache, or replayed CUDA graphs (built once per number of rows)."""
        transformer = self.transformer

        def build() -> CUDAGraphScaleSteps:
            cache = transformer.init_kv_cache()
            cfg = transformer.config
            cond = torch.zeros(rows, cfg.embed_dim, device=device, dtype=transformer.dtype)
            examples = [(cond, None)] + [
                (cond, torch.zeros(rows, end - begin, cfg.latent_channels, device=device)) for begin, end in transformer.begin_ends[1:]
            ]
            return CUDAGraphScaleSteps(lambda si, c, x: transformer.forward_scale(si, c, cache, x), examples, cache.reset)

        graphs = self._graph_scale_steps(rows, device, build)
        if graphs is not None:
            return graphs
        cache = transformer.init_kv_cache()
        return lambda si, cond, scale_input: transformer.forward_scale(si, cond, cache, scale_input)

    def _sampling_graphs(self, B: int, device: torch.device, settings: "ScaleSampling", top_k: int,
                         use_top_p: bool) -> CUDAGraphScaleSteps:
        """One CUDA graph per scale for the whole scale: transformer step, guidance, top-k / top-p, the draw, the
        codebook lookup, the f_hat update and the next scale's input (built once per batch size, ``top_k`` (it fixes
        shapes) and structural setting). The guidance strengths and ``top_p`` are read from device tensors, so other
        values replay the same graphs; the graphs draw from a generator that borrows the caller's state."""
        transformer, cfg = self.transformer, self.transformer.config
        rows, num_scales = 2 * B, len(cfg.patch_nums)
        top_k = top_k if 0 < top_k < cfg.vocab_size else 0

        def build() -> CUDAGraphScaleSteps:
            cache = transformer.init_kv_cache()
            side = cfg.patch_nums[-1]
            f_hat = torch.zeros(B, cfg.latent_channels, side, side, device=device)
            scale_inputs = [None] + [torch.zeros(rows, end - begin, cfg.latent_channels, device=device)
                                     for begin, end in transformer.begin_ends[1:]]
            generator = torch.Generator(device)

            def step(si, cond_BD, guidance_S2, removable_mass):
                logits = transformer.forward_scale(si, cond_BD, cache, scale_inputs[si])
                indices, guided_logits, next_input = self._sample_scale(si, logits, f_hat, guidance_S2[si], top_k, 0.0, generator,
                                                                        settings, removable_mass if use_top_p else None)
                if si != num_scales - 1:
                    scale_inputs[si + 1].copy_(cfg_scale_input(next_input))
                return indices, guided_logits

            def reset():
                cache.reset()
                f_hat.zero_()

            shared = (torch.zeros(rows, cfg.embed_dim, device=device, dtype=transformer.dtype),
                      torch.zeros(num_scales, 2, device=device), torch.zeros((), device=device))
            graphs = CUDAGraphScaleSteps(step, [()] * num_scales, reset, shared, generator=generator)
            graphs.f_hat, graphs.scale_inputs = f_hat, scale_inputs
            return graphs

        return self._graph_scale_steps(("sampling", rows, settings, top_k, use_top_p), device, build)

    def _sample_scale(self, si: int, logits_2BlV: torch.Tensor, f_hat: torch.Tensor, strength, top_k: int, top_p: float,
                      generator: GeneratorArg, settings: "ScaleSampling", top_p_mass: torch.Tensor | None = None):
        """Guidance, top-k / top-p, the draw and the f_hat update (in place) of scale ``si``, eagerly or inside a CUDA
        graph (``strength`` and ``1 - top_p`` then come as device tensors). Returns ``(indices, guided logits if
        settings.keep_logits, next_input)``."""
        patch_nums = self.transformer.config.patch_nums
        num_scales, pn, B = len(patch_nums), patch_nums[si], f_hat.shape[0]
        ratio = si / (num_scales - 1)
        logits = apply_guidance(logits_2BlV, strength)
        guided_logits = logits.clone() if settings.keep_logits else None
        filter_top_k_top_p_(logits, top_k, top_p, fast=settings.fast_filter, top_p_mass=top_p_mass)
        indices = sample_from_logits(logits, generator)
        codebook = self.vqvae.codebook
        if settings.more_smooth:  # soft mixture of codes; the hard sample above is discarded
            weights = gumbel_softmax(logits.mul(1 + ratio), smooth_tau(ratio), generator)
            embedding = weights @ codebook.float().to(weights.device)
        else:
            embedding = codebook[indices.to(codebook.device)].float()
        embedding = embedding.transpose(1, 2).reshape(B, -1, pn, pn)
        _, next_input = self.vqvae.next_scale_input(si, f_hat, embedding, separable_upsample=settings.separable_upsample)
        return indices, guided_logits, next_input

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (any synonym, e.g. ``"golden retriever"``) to class indices."""
        labels = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            raise ValueError(f"`label` {unknown} not found; choose from `pipe.labels` ({len(self.labels)} names).")
        return [self.labels[name] for name in labels]

    # -- inputs -------------------------------------------------------------------------------------
    def _prepare_labels(self, class_labels, num_images_per_prompt: int, generator: GeneratorArg, device) -> torch.LongTensor:
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            check_generator(generator, num_images_per_prompt)
            return draw_class_labels(num_classes, num_images_per_prompt, generator, device)
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.flatten().tolist()
        elif isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = [class_labels]
        if not isinstance(class_labels, (list, tuple)) or not class_labels:
            raise ValueError("`class_labels` must be an int, a non-empty list of ints, a 1-D tensor, or None.")
        for label in class_labels:
            if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label <= num_classes:
                raise ValueError(
                    f"`class_labels` entries must be integers in [0, {num_classes - 1}], or -1 / {num_classes} "
                    f"for the null (unconditional) class; got {label!r}."
                )
        labels = torch.tensor([num_classes if label < 0 else label for label in class_labels], dtype=torch.long)
        labels = labels.repeat_interleave(num_images_per_prompt).to(device)
        check_generator(generator, labels.shape[0])
        return labels

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
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Generate images.

        Args:
            class_labels: class index, list of indices, or ``None`` to draw ``num_images_per_prompt``
                labels uniformly from ``generator`` (as the original does). ``-1`` is the null class.
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
            callback_on_step_end: called once per scale as ``fn(pipe, scale_index, patch_num, kwargs)``
                with the tensors named in ``callback_on_step_end_tensor_inputs`` (``"f_hat"``,
                ``"logits"`` (guided, before filtering), ``"indices"``); may return a new ``"f_hat"``.
        """
        check_sampling_args(guidance_scale, top_k, top_p, output_type, num_images_per_prompt)
        tensor_inputs = check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        labels_B = self._prepare_labels(class_labels, num_images_per_prompt, generator, self._execution_device)
        B = labels_B.shape[0]

        transformer, vqvae = self.transformer, self.vqvae
        patch_nums = tuple(transformer.config.patch_nums)
        num_scales, side = len(patch_nums), patch_nums[-1]
        null = torch.full_like(labels_B, transformer.config.num_classes)
        cond_BD = transformer.embed_condition(torch.cat((labels_B, null)))  # conditional rows first
        device = cond_BD.device
        settings = ScaleSampling(more_smooth=more_smooth, keep_logits=callback_on_step_end is not None and "logits" in tensor_inputs,
                                 fast_filter=self._fast_top_p(device),
                                 separable_upsample=self._separable_upsample(device, B * vqvae.config.z_channels, side))
        strengths = [linear_guidance_ramp(guidance_scale, si, num_scales) for si in range(num_scales)]
        graphs, scale_step, scale_input = None, None, None
        graph_generator = self._graph_sampling_generator(device, generator)
        if graph_generator is not None:
            graphs = self._sampling_graphs(B, device, settings, top_k, top_p > 0)
            graphs.set_shared_inputs(cond_BD, guidance_table(strengths, device), top_p_mass(top_p, device))
            f_hat = graphs.f_hat.zero_()
        else:
            scale_step = self._scale_step(cond_BD.shape[0], device)
            f_hat = torch.zeros(B, vqvae.config.z_channels, side, side, device=device, dtype=torch.float32)

        with self.progress_bar(total=num_scales) as progress_bar, \
                (graphs.borrow_generator_state(graph_generator) if graphs is not None else nullcontext()):
            for si in range(num_scales):
                if graphs is not None:  # the whole scale, sampling included, is one graph replay
                    indices, guided_logits = graphs(si)
                    next_input = None
                else:
                    logits = scale_step(si, cond_BD, scale_input)
                    indices, guided_logits, next_input = self._sample_scale(si, logits, f_hat, strengths[si], top_k, top_p,
                                                                            generator, settings)
                if callback_on_step_end is not None:
                    local = {"f_hat": f_hat, "logits": guided_logits, "indices": indices}
                    new_f_hat, next_input = run_scale_callback(self, callback_on_step_end, si, patch_nums, local, tensor_inputs,
                                                               f_hat, next_input)
                    if graphs is None:
                        f_hat = new_f_hat
                    elif new_f_hat is not f_hat:  # write the callback's latent into the graphs' static buffers
                        f_hat.copy_(new_f_hat)
                        if si != num_scales - 1:
                            graphs.scale_inputs[si + 1].copy_(cfg_scale_input(next_input))
                if graphs is None and si != num_scales - 1:
                    scale_input = cfg_scale_input(next_input)
                progress_bar.update()

        if graphs is not None:
            f_hat = f_hat.clone()  # the graphs' buffer is overwritten by the next generation
        return finish_generation(self, f_hat, output_type, return_dict)
