"""InfinityPipeline: text-to-image generation with Infinity (bitwise next-scale prediction)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging

from ..models.bitwise_vae import BitwiseMultiScaleVAE
from ..models.blocks import compile_adaln_blocks_
from ..models.dynamic_resolution import schedule_for_pixels
from ..models.infinity_transformer import InfinityTextCondition, InfinityTransformer2DModel
from .fast_inference import CUDAGraphScaleSteps, FastInferenceMixin, cast_decoder_, cast_module_, check_fast_inference_args
from .pipeline_var import images_to_output
from .sampling import (
    GeneratorArg,
    check_generator,
    check_sampling_args,
    check_text_embeds,
    filter_top_k_top_p_,
    sample_from_logits,
)

logger = logging.get_logger(__name__)


def _per_scale(value, num_scales: int, name: str) -> list[float]:
    """A scalar broadcast to every scale, or a list with one value per scale (the original's cfg/tau lists)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_scales
    if len(values) != num_scales:
        raise ValueError(f"`{name}` has {len(values)} entries but the schedule has {num_scales} scales.")
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"`{name}` must be a number or a list of numbers, got {value!r}.")
    return [float(v) for v in values]


def _pad_text(embeds_BSC: torch.Tensor, mask_BS: torch.Tensor, length: int):
    extra = length - embeds_BSC.shape[1]
    return F.pad(embeds_BSC, (0, 0, 0, extra)), F.pad(mask_BS, (0, extra))


class InfinityPipeline(DiffusionPipeline, FastInferenceMixin):
    r"""Text-to-image generation with Infinity (FoundationVision): a BSQ multi-scale tokenizer and a
    transformer that predicts every bit of every token, scale by scale, conditioned on Flan-T5 features.

    Components:
        transformer ([`InfinityTransformer2DModel`]), vae ([`BitwiseMultiScaleVAE`]),
        text_encoder (`transformers.T5EncoderModel`), tokenizer (a T5 tokenizer).

    ``height``/``width`` pick the nearest aspect-ratio template and resolution preset (0.06M / 0.25M /
    0.60M / 1M); the image has exactly that template's size. With a single seeded CPU ``torch.Generator``
    the bits are drawn in the original order (one multinomial per scale over (batch, token, bit)), so the
    same seed gives the original's image. ``enable_model_cpu_offload()`` keeps only the running model on the
    accelerator: the T5 encoder leaves it before the transformer runs. ``text_encoder`` and ``tokenizer`` are
    optional: without them, pass precomputed T5 features (``prompt_embeds``, ``prompt_attention_mask``).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["summed_codes", "logits", "bits", "next_scale_input"]

    def __init__(self, transformer: InfinityTransformer2DModel, vae: BitwiseMultiScaleVAE, text_encoder=None, tokenizer=None,
                 default_size: list[int] | None = None):
        super().__init__()
        if transformer.config.bits_per_token != vae.bits_per_token:
            raise ValueError(
                f"transformer `bits_per_token` ({transformer.config.bits_per_token}) differs from the vae's "
                f"({vae.bits_per_token} = codebook_dim x {vae.patch_factor ** 2})."
            )
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        if default_size is not None and (len(default_size) != 2 or min(default_size) < 1):
            raise ValueError(f"`default_size` must be [height, width], got {default_size!r}.")
        # the size a model was trained for (small embedded models); height/width default to it, else 1024
        self.register_to_config(default_size=list(default_size) if default_size is not None else None)

    # -- text ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device=None, num_images_per_prompt: int = 1,
                      max_sequence_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        r"""T5 features of the prompts, as the original computes them (padded to the tokenizer maximum,
        then trimmed to the longest real length).

        Returns ``(text_embeds (B, S, text_dim) float32, text_mask (B, S) bool)`` with
        ``B = len(prompt) * num_images_per_prompt``. Prompts longer than ``max_sequence_length`` (default:
        the transformer's ``text_max_length``, 512 for the releases) are truncated with a warning.
        """
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings (or pass `prompt_embeds`), got {prompt!r}.")
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("`prompt`: this pipeline has no text encoder / tokenizer; pass `prompt_embeds` "
                             "(and `prompt_attention_mask`) instead.")
        max_length = max_sequence_length or self.transformer.config.text_max_length
        if max_length > self.transformer.config.text_max_length:
            raise ValueError(f"`max_sequence_length` ({max_length}) exceeds the model's `text_max_length` ({self.transformer.config.text_max_length}).")
        full_lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        too_long = [i for i, n in enumerate(full_lengths) if n > max_length]
        if too_long:
            logger.warning(
                f"prompt(s) {too_long} have more than {max_length} tokens and are truncated to the text encoder's "
                f"maximum of {max_length} tokens (as the original does)."
            )
        tokens = self.tokenizer(list(prompts), max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
        device = device or self._execution_device
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        embeds = self.text_encoder(input_ids=input_ids, attention_mask=mask)[0].float()
        longest = int(mask.sum(dim=1).max())
        embeds, mask = embeds[:, :longest] * mask[:, :longest, None], mask[:, :longest].bool()
        return embeds.repeat_interleave(num_images_per_prompt, 0), mask.repeat_interleave(num_images_per_prompt, 0)

    def _check_text_embeds(self, embeds, mask, prefix: str, batch_size: int | None = None):
        """Validate precomputed T5 features; returns ``(embeds, mask)`` with an all-True bool mask when none is given."""
        cfg = self.transformer.config
        check_text_embeds(embeds, mask, cfg.text_dim, f"{prefix}prompt_embeds", f"{prefix}prompt_attention_mask",
                          batch_size, cfg.text_max_length)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        return embeds, mask

    # -- fast inference ------------------------------------------------------------------------------
    def enable_fast_inference(self, dtype: torch.dtype = torch.bfloat16, cuda_graphs: bool = True,
                              compile_decoder: bool = False, compile_blocks: bool = False) -> "InfinityPipeline":
        """Speed switch for GPUs (as :meth:`VARPipeline.enable_fast_inference`). The transformer (text pooling and
        projection, blocks), the VAE decoder and the T5 encoder run in ``dtype`` (bf16 by default); the bit head, its
        AdaLN norm and the text RMSNorm stay float32, as do the running latent and the sampler. On CUDA each scale's
        transformer step is a CUDA graph, captured on the first call for a (rows, text length, scale schedule) and
        replayed after (a prompt of another token length captures another set; at most ``graph_cache_size`` are
        kept); the AdaLN modulations and every block's text keys / values are computed once per generation. Use a
        CUDA ``torch.Generator``. On the CPU it only casts: with ``dtype=torch.float32`` the images are the eager
        ones. ``compile_decoder``: channels-last ``torch.compile`` of the VAE decoder. ``compile_blocks``:
        ``torch.compile`` of each block's elementwise work (norms, modulation, q/k normalisation, 2-D RoPE, gating),
        fused before the graphs are captured. Returns the pipeline.
        """
        check_fast_inference_args(dtype, cuda_graphs, compile_decoder, compile_blocks=compile_blocks)
        transformer = self.transformer
        cast_module_(transformer, dtype, keep_float32=(transformer.head, transformer.head_norm, transformer.text_norm))
        cast_decoder_((self.vae.decoder,), dtype, self.vae.decoder if compile_decoder else None)
        cast_module_(self.text_encoder, dtype)
        if compile_blocks:
            compile_adaln_blocks_(transformer)
        return self._set_fast_inference(True, cuda_graphs, dtype)

    def _scale_step(self, schedule, text: InfinityTextCondition, device):
        """``step(scale_index, scale_input) -> logits`` for one generation: eager with a fresh KV cache, or replayed
        CUDA graphs (one set per rows, text length and schedule) fed with this generation's text condition."""
        transformer = self.transformer
        schedule = tuple(tuple(hw) for hw in schedule)
        rows, length = text.context.shape[:2]
        shared = (text.pooled, text.adaln, text.context, text.context_mask)

        def build() -> CUDAGraphScaleSteps:
            cache = transformer.init_kv_cache(schedule)
            bits = transformer.config.bits_per_token
            examples = [(None,)] + [(torch.zeros(rows, h * w, bits, device=device),) for h, w in schedule[1:]]

            def step(si, pooled, adaln, context, context_mask, scale_input):
                condition = InfinityTextCondition(pooled=pooled, adaln=adaln, context=context, context_mask=context_mask)
                return transformer.forward_scale(si, schedule, condition, cache, scale_input)

            return CUDAGraphScaleSteps(step, examples, cache.reset, shared_inputs=shared)

        graphs = self._graph_scale_steps((rows, length, schedule), device, build)
        if graphs is not None:
            return graphs.set_shared_inputs(*shared)
        cache = transformer.init_kv_cache(schedule)
        return lambda si, scale_input: transformer.forward_scale(si, schedule, text, cache, scale_input)

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | Sequence[float] = 3.0,
        tau: float | Sequence[float] = 0.5,
        top_k: int = 900,
        top_p: float = 0.97,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ):
        r"""Generate images.

        Args:
            prompt: text or list of texts (or pass ``prompt_embeds``).
            negative_prompt: ``None`` or empty: the learned unconditional text (as the original); otherwise
                one text, or one per prompt.
            height, width: requested size in pixels (default: the pipeline's ``default_size`` if set, else
                1024 x 1024); mapped to the nearest aspect-ratio template and preset
                (unsupported sizes raise and list the supported ones).
            guidance_scale: the original ``cfg``, on logits: ``cfg * cond + (1 - cfg) * uncond`` (1 = off,
                no unconditional branch). A list gives one value per scale.
            tau: temperature dividing the logits (> 0); a list gives one value per scale. 2B notebooks: 0.5.
            top_k, top_p: filtering of the two logits of every bit (``top_k=1``: deterministic).
            num_images_per_prompt: images per prompt.
            generator: one ``torch.Generator`` (original draw order) or one per image.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (float (B, 3, H, W) in [0, 1]) or ``"latent"`` (the
                summed codes (B, d, h, w) fed to the VAE decoder).
            callback_on_step_end: called once per scale as ``fn(pipe, scale_index, (h, w), tensors)`` with the
                tensors named in ``callback_on_step_end_tensor_inputs``: ``"summed_codes"``, ``"logits"``
                (raw head logits of all rows, before tau and guidance), ``"bits"`` (B, h*w, bits_per_token),
                ``"next_scale_input"``; may return a new ``"summed_codes"``.
            max_sequence_length: text tokens kept (default the model's ``text_max_length``); longer prompts
                are truncated with a warning.
            prompt_embeds, prompt_attention_mask: precomputed T5 features (B, S, text_dim) instead of ``prompt``, with
                their padding mask (B, S) (True / 1 = real token; default all real), as :meth:`encode_prompt` returns them.
            negative_prompt_embeds, negative_prompt_attention_mask: the same for the unconditional half (any length
                up to ``text_max_length``); default: ``negative_prompt``, else the learned unconditional text.
        """
        check_sampling_args(1.0, top_k, top_p, output_type, num_images_per_prompt)
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["summed_codes"])
        bad = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got {bad}.")
        transformer, vae = self.transformer, self.vae
        default_height, default_width = self.config.get("default_size") or (1024, 1024)
        height, width = height or default_height, width or default_width
        schedule = schedule_for_pixels(height, width, vae.pixels_per_token)
        num_scales = len(schedule)
        cfg_list = _per_scale(guidance_scale, num_scales, "guidance_scale")
        tau_list = _per_scale(tau, num_scales, "tau")
        if any(c < 0 for c in cfg_list):
            raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale!r}.")
        if any(t <= 0 for t in tau_list):
            raise ValueError(f"`tau` must be > 0, got {tau!r}.")
        if prompt_embeds is None:
            if prompt_attention_mask is not None:
                raise ValueError("`prompt_attention_mask` is only used with `prompt_embeds`.")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not prompts:
                raise ValueError(f"`prompt` must be a string or a non-empty list of strings (or pass `prompt_embeds`), got {prompt!r}.")
            num_prompts = len(prompts)
        else:
            if prompt is not None:
                raise ValueError("pass either `prompt` or `prompt_embeds`, not both.")
            given_embeds, given_mask = self._check_text_embeds(prompt_embeds, prompt_attention_mask, "")
            num_prompts = given_embeds.shape[0]
        negatives = None
        if negative_prompt is not None and negative_prompt != "" and negative_prompt != [""] * num_prompts:
            negatives = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, (list, tuple)) or len(negatives) not in (1, num_prompts):
                raise ValueError(f"`negative_prompt` must be a string or a list with one entry per prompt ({num_prompts}), got {negative_prompt!r}.")
            negatives = list(negatives) * (num_prompts if len(negatives) == 1 else 1)
        if negative_prompt_embeds is not None:
            if negative_prompt is not None:
                raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
            given_neg_embeds, given_neg_mask = self._check_text_embeds(negative_prompt_embeds, negative_prompt_attention_mask,
                                                                       "negative_", num_prompts)
        elif negative_prompt_attention_mask is not None:
            raise ValueError("`negative_prompt_attention_mask` is only used with `negative_prompt_embeds`.")
        if self.text_encoder is None or self.tokenizer is None:
            if prompt_embeds is None:
                raise ValueError("`prompt` needs a text encoder and tokenizer, which this pipeline lacks; pass `prompt_embeds` "
                                 "(and `prompt_attention_mask`) instead.")
            if negatives is not None:
                raise ValueError("`negative_prompt` needs a text encoder and tokenizer, which this pipeline lacks; pass "
                                 "`negative_prompt_embeds` instead (or nothing for the learned unconditional text).")
        B = num_prompts * num_images_per_prompt
        check_generator(generator, B)
        device = self._execution_device

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.to(device).repeat_interleave(num_images_per_prompt, 0)

        if prompt_embeds is None:
            embeds, mask = self.encode_prompt(list(prompts), device, num_images_per_prompt, max_sequence_length)
        else:
            embeds, mask = rows(given_embeds), rows(given_mask)
        use_cfg = any(c != 1.0 for c in cfg_list)
        if use_cfg:
            if negative_prompt_embeds is not None:
                neg_embeds, neg_mask = rows(given_neg_embeds).to(embeds.dtype), rows(given_neg_mask)
            elif negatives is None:
                neg_embeds, neg_mask = transformer.unconditional_text_embeds(mask).to(embeds.dtype), mask
            else:
                neg_embeds, neg_mask = self.encode_prompt(negatives, device, num_images_per_prompt, max_sequence_length)
            length = max(embeds.shape[1], neg_embeds.shape[1])
            embeds, mask = (torch.cat(pair) for pair in zip(_pad_text(embeds, mask, length), _pad_text(neg_embeds, neg_mask, length)))
        text = transformer.encode_text(embeds, mask)
        scale_step = self._scale_step(schedule, text, device)
        bits_per_token = transformer.config.bits_per_token
        latent_hw = vae.latent_schedule(schedule)[-1]
        summed = torch.zeros(B, vae.config.codebook_dim, *latent_hw, device=device, dtype=torch.float32)
        scale_input = None

        with self.progress_bar(total=num_scales) as progress_bar:
            for si, (h, w) in enumerate(schedule):
                raw_logits = scale_step(si, scale_input)
                cfg, tau_k = cfg_list[si], tau_list[si]
                if cfg != 1.0:  # tau before the mix, as the original (bit-exact logits)
                    scaled = raw_logits / tau_k
                    logits = cfg * scaled[:B] + (1 - cfg) * scaled[B:]
                else:  # the unconditional half (if any) only fills its KV cache
                    logits = raw_logits[:B] / tau_k
                logits = logits.reshape(B, h * w * bits_per_token, 2)
                filter_top_k_top_p_(logits, top_k, top_p)
                bits = sample_from_logits(logits, generator).view(B, h, w, bits_per_token)
                codes = vae.bits_to_codes(vae.token_bits_to_latent_bits(bits))
                next_hw = schedule[si + 1] if si + 1 < num_scales else None
                summed, next_input = vae.next_scale_input(summed, codes, next_hw)

                if callback_on_step_end is not None:
                    logits_copy = raw_logits.clone() if "logits" in tensor_inputs else None  # a graph output is overwritten
                    local = {"summed_codes": summed, "logits": logits_copy, "bits": bits.view(B, h * w, bits_per_token),
                             "next_scale_input": next_input}
                    out = callback_on_step_end(self, si, (h, w), {k: local[k] for k in tensor_inputs}) or {}
                    if out.get("summed_codes") is not None and out["summed_codes"] is not summed:
                        summed = out["summed_codes"].float()
                        if next_hw is not None:
                            next_input = vae.scale_input_from_summed(summed, next_hw)
                if next_input is not None:
                    scale_input = next_input.repeat(2, 1, 1) if use_cfg else next_input
                progress_bar.update()

        if output_type == "latent":
            images = summed
        else:
            decoder_dtype = next(vae.decoder.parameters()).dtype  # the decoder alone may be cast (fast inference)
            decoded = vae.decode(summed.to(decoder_dtype)).sample.float()
            images = images_to_output((decoded + 1) / 2, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
