"""STARPipeline: text-to-image generation by next-scale prediction (STAR)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import logging

from ..models.multiscale_vq import MultiScaleVQModel
from ..models.star_transformer import STARTransformer2DModel
from .fast_inference import CUDAGraphScaleSteps, FastInferenceMixin, cast_decoder_, cast_module_, check_fast_inference_args
from .pipeline_var import finish_generation, run_scale_callback
from .sampling import (
    RANDOM_COMMIT_STEPS,
    STABLE_SAMPLER_VERSIONS,
    GeneratorArg,
    apply_guidance,
    check_callback_inputs,
    check_generator,
    check_sampling_args,
    check_text_embeds,
    filter_top_k_top_p_,
    gumbel_softmax,
    linear_guidance_ramp,
    sample_from_logits,
    smooth_tau,
    stable_sampler_counts,
    stable_sampler_plan,
    uniform_draws,
)

logger = logging.get_logger(__name__)

# The T5 ablation pads every caption to 120 tokens and averages all of them (padding included).
T5_MAX_LENGTH = 120


class STARPipeline(DiffusionPipeline, FastInferenceMixin):
    r"""Text-to-image generation with STAR (scale-wise text-to-image autoregression).

    Components:
        transformer ([`STARTransformer2DModel`]): predicts each scale's tokens from the coarser ones and the text.
        vqvae ([`MultiScaleVQModel`]): VAR's multi-scale tokenizer (codebook + decoder).
        text_encoder (`CLIPTextModel` or `T5EncoderModel`): SD-2.x CLIP text tower in the releases
            (hidden states + the pooled EOS state); flan-t5-xl in one ablation.
        tokenizer (`CLIPTokenizer` / `T5TokenizerFast`).

    ``text_encoder`` and ``tokenizer`` are optional: without them, pass precomputed text features
    (``prompt_embeds``, ``pooled_prompt_embeds`` and the negative counterparts) instead of prompts.

    With a single seeded CPU ``torch.Generator`` the token draws happen in the original order, shapes and
    dtypes. The stable sampler additionally draws its random commit positions from a second stream,
    the global torch RNG in the original: pass ``sampler_generator`` to make it explicit (or seed the
    global RNG with ``torch.manual_seed`` as the original scripts do).
    ``enable_model_cpu_offload`` offloads the text encoder and the transformer; the VQ-VAE, used at
    every scale, stays on the accelerator.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _exclude_from_cpu_offload = ["vqvae"]
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["f_hat", "logits", "indices", "step_logits", "step_indices", "step_confidences"]

    def __init__(self, transformer: STARTransformer2DModel, vqvae: MultiScaleVQModel, text_encoder=None, tokenizer=None):
        super().__init__()
        if tuple(transformer.config.patch_nums) != tuple(vqvae.config.patch_nums):
            raise ValueError(f"transformer and vqvae `patch_nums` differ: {transformer.config.patch_nums} vs {vqvae.config.patch_nums}.")
        if transformer.config.vocab_size != vqvae.config.vocab_size or transformer.config.latent_channels != vqvae.config.z_channels:
            raise ValueError("transformer `vocab_size`/`latent_channels` must match the vqvae's `vocab_size`/`z_channels`.")
        self.register_modules(transformer=transformer, vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer)

    # -- text ---------------------------------------------------------------------------------------
    @property
    def _is_t5(self) -> bool:
        return getattr(getattr(self.text_encoder, "config", None), "model_type", "") in ("t5", "umt5", "mt5")

    def _tokenize(self, texts: list[str], max_length: int, device):
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        untruncated = self.tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[-1] > tokens.input_ids.shape[-1]:
            cut = [t for t, ids in zip(texts, untruncated) if int((ids != self.tokenizer.pad_token_id).sum()) > max_length]
            logger.warning(f"prompts longer than the text encoder's {max_length} tokens are truncated (as the original does): {cut}")
        return tokens.input_ids.to(device), tokens.attention_mask.to(device)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        max_sequence_length: int | None = None,
    ):
        r"""Encode prompts (and their unconditional counterparts) for the transformer.

        Args:
            prompt: prompt or non-empty list of prompts.
            negative_prompt: unconditional text, one per prompt or a single string; ``None`` = ``""`` (the
                original's unconditional input).
            num_images_per_prompt: rows per prompt (repeated consecutively).
            max_sequence_length: tokens per text (default: the tokenizer's 77 for CLIP, 120 for T5).

        Returns ``(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt_embeds,
        negative_prompt_attention_mask, negative_pooled_prompt_embeds)``; hidden states (B, N, D), masks
        (B, N) int64, pooled (B, D). CLIP's pooled vector is its EOS state (``pooler_output``); T5's is the
        mean over all positions, padding included, like the original ablation.
        """
        prompts = self._check_prompts(prompt)
        negatives = self._check_negative_prompts(negative_prompt, len(prompts))
        # one call for both halves, as the original encodes prompts + [""] * B together
        hidden, attention_mask, pooled = self.encode_text(prompts + negatives, device, max_sequence_length)
        B = len(prompts)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(num_images_per_prompt, dim=0)

        return (rows(hidden[:B]), rows(attention_mask[:B]), rows(pooled[:B]),
                rows(hidden[B:]), rows(attention_mask[B:]), rows(pooled[B:]))

    @torch.no_grad()
    def encode_text(self, texts: list[str], device: torch.device | None = None, max_sequence_length: int | None = None):
        r"""One text encoder call on ``texts`` (training encodes captions with this, ``""`` for dropped ones).

        Returns ``(hidden (B, N, D), attention_mask (B, N) int64, pooled (B, D))`` as in :meth:`encode_prompt`.
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("`prompt`: this pipeline has no text encoder / tokenizer; pass `prompt_embeds`, "
                             "`pooled_prompt_embeds` and their `negative_` counterparts instead.")
        device = device or self._execution_device
        if max_sequence_length is None:
            max_sequence_length = T5_MAX_LENGTH if self._is_t5 else self.tokenizer.model_max_length
        input_ids, attention_mask = self._tokenize(list(texts), max_sequence_length, device)
        output = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = output.last_hidden_state
        pooled = hidden.mean(dim=1) if self._is_t5 else output.pooler_output
        return hidden, attention_mask, pooled

    @staticmethod
    def _check_prompts(prompt) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings (or pass `prompt_embeds`), got {prompt!r}.")
        return list(prompts)

    @staticmethod
    def _check_negative_prompts(negative_prompt, batch_size: int) -> list[str]:
        if negative_prompt is None:
            return [""] * batch_size
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch_size
        if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
            raise ValueError(f"`negative_prompt` must be None, a string or a list of strings, got {negative_prompt!r}.")
        if len(negative_prompt) != batch_size:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch_size}; they must match.")
        return list(negative_prompt)

    def _check_text_embeds(self, embeds, mask, pooled, prefix: str, batch_size: int | None = None):
        """Validate one half of precomputed text features; returns ``(hidden, mask, pooled)`` with an all-ones
        int64 mask when none is given."""
        D = self.transformer.config.text_embed_dim
        check_text_embeds(embeds, mask, D, f"{prefix}prompt_embeds", f"{prefix}prompt_attention_mask", batch_size)
        if pooled is None:
            raise ValueError(f"`{prefix}pooled_prompt_embeds` (B, {D}) is required with `{prefix}prompt_embeds` "
                             "(STAR's first token is the pooled text).")
        if not torch.is_tensor(pooled) or tuple(pooled.shape) != (embeds.shape[0], D) or not pooled.is_floating_point():
            shape = tuple(pooled.shape) if torch.is_tensor(pooled) else type(pooled).__name__
            raise ValueError(f"`{prefix}pooled_prompt_embeds` must be a floating-point ({embeds.shape[0]}, {D}) tensor, got {shape}.")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask, pooled

    def _prepare_text(self, prompt, negative_prompt, given, given_negative, num_images_per_prompt: int, device,
                      max_sequence_length):
        """Text conditions of all rows (conditional rows first): ``(hidden (2B, N, D), mask (2B, N), pooled (2B, D))``.

        Prompts and negative prompts are encoded in one text encoder call (as the original does); precomputed
        features, already checked by :meth:`_check_text_embeds` (``given`` / ``given_negative``), replace either half."""
        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        if given is None and given_negative is None:
            positive_negative = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, device, max_sequence_length)
            hidden, mask, pooled, neg_hidden, neg_mask, neg_pooled = positive_negative
        else:
            if given is None:
                hidden, mask, pooled = (rows(t) for t in self.encode_text(self._check_prompts(prompt), device, max_sequence_length))
            else:
                hidden, mask, pooled = (rows(t) for t in given)
            if given_negative is None:
                negatives = self._check_negative_prompts(negative_prompt, hidden.shape[0] // num_images_per_prompt)
                neg_hidden, neg_mask, neg_pooled = (rows(t) for t in self.encode_text(negatives, device, hidden.shape[1]))
            else:
                neg_hidden, neg_mask, neg_pooled = (rows(t) for t in given_negative)
            if neg_hidden.shape[1] != hidden.shape[1]:
                raise ValueError(f"`negative_prompt_embeds` has {neg_hidden.shape[1]} tokens but the prompt features have "
                                 f"{hidden.shape[1]}; pad both to the same length.")
        return torch.cat((hidden, neg_hidden)), torch.cat((mask, neg_mask)), torch.cat((pooled, neg_pooled))

    # -- fast inference ------------------------------------------------------------------------------
    def enable_fast_inference(self, dtype: torch.dtype = torch.bfloat16, cuda_graphs: bool = True,
                              compile_decoder: bool = False) -> "STARPipeline":
        """Speed switch for GPUs (as :meth:`VARPipeline.enable_fast_inference`). The transformer (blocks, text
        projection, stable-sampler blocks), the image decoder and the text encoder run in ``dtype`` (bf16 by
        default); the output heads (their LayerNorms are parameter-free and computed in float32), the quantizer
        and f_hat stay float32. On CUDA each scale's main transformer step is a CUDA graph, captured on the first
        call for a (rows, text length) pair and replayed after; the text keys / values of every block are
        computed once per generation inside the first scale's graph; top-p sorts only the top-k values. The
        stable sampler's extra head passes and all sampling run eagerly. Use a CUDA ``torch.Generator``. On the
        CPU it only casts: with ``dtype=torch.float32`` the images are the eager ones. Returns the pipeline.
        """
        check_fast_inference_args(dtype, cuda_graphs, compile_decoder)
        transformer = self.transformer
        sampler_head = transformer.sampler.head if transformer.sampler is not None else None
        cast_module_(transformer, dtype, keep_float32=(transformer.head, transformer.head_norm, sampler_head))
        cast_decoder_((self.vqvae.decoder, self.vqvae.post_quant_conv), dtype, self.vqvae.decoder if compile_decoder else None)
        cast_module_(self.text_encoder, dtype)
        return self._set_fast_inference(True, cuda_graphs, dtype)

    def _scale_step(self, text_pooled: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor, device):
        """``step(scale_index, scale_input) -> (logits, hidden)`` for one generation: eager with a fresh KV cache,
        or replayed CUDA graphs (one set per number of rows and text length) fed with this generation's text."""
        transformer = self.transformer
        rows, length = text_hidden.shape[:2]

        def build() -> CUDAGraphScaleSteps:
            cache = transformer.init_kv_cache()
            Cv = transformer.config.latent_channels
            examples = [(None,)] + [(torch.zeros(rows, end - begin, Cv, device=device),) for begin, end in transformer.begin_ends[1:]]
            return CUDAGraphScaleSteps(lambda si, pooled, hidden, mask, x: transformer.forward_scale(si, cache, pooled, hidden, mask, x),
                                       examples, cache.reset, shared_inputs=(text_pooled, text_hidden, text_mask))

        graphs = self._graph_scale_steps((rows, length), device, build)
        if graphs is not None:
            return graphs.set_shared_inputs(text_pooled, text_hidden, text_mask)
        cache = transformer.init_kv_cache()
        return lambda si, scale_input: transformer.forward_scale(si, cache, text_pooled, text_hidden, text_mask, scale_input)

    # -- stable sampler -------------------------------------------------------------------------------
    def _stable_sampler_scale(self, scale_index, logits_2BlV, hidden_2BlC, pooled_2BD, guidance_scale, top_k, top_p,
                              version, generator, sampler_generator):
        """Commit a scale's tokens over several steps (STAR's causal-driven stable sampling).

        Returns the committed codes (B, l, Cv), their indices (B, l) and the per-step trace
        (mixed logits, sampled indices, confidences)."""
        transformer, codebook = self.transformer, self.vqvae.codebook
        B, n = logits_2BlV.shape[0] // 2, logits_2BlV.shape[1]
        device = logits_2BlV.device
        num_steps, main_head_steps = stable_sampler_plan(scale_index, version)
        ramp = linear_guidance_ramp(guidance_scale, scale_index, len(transformer.config.patch_nums))
        committed = torch.zeros(B, n, codebook.shape[1], device=device, dtype=torch.float32)
        committed_idx = torch.zeros(B, n, dtype=torch.long, device=device)
        mask = torch.zeros(B, n, dtype=torch.bool, device=device)
        trace = ([], [], [])

        def commit(positions_Bk, codes_BlCv, indices_Bl):  # torch.where, not boolean indexing: no host sync
            chosen = torch.zeros_like(mask).scatter_(1, positions_Bk, True) & ~mask
            committed.copy_(torch.where(chosen[..., None], codes_BlCv, committed))
            committed_idx.copy_(torch.where(chosen, indices_Bl, committed_idx))
            mask.logical_or_(chosen)

        for step, count in enumerate(stable_sampler_counts(n, num_steps)):
            # the original's mask scheduler draws this and discards it (left where it is drawn: no copy)
            uniform_draws((2 * B, n), sampler_generator, "cpu" if sampler_generator is None else sampler_generator.device)
            if step < main_head_steps:
                mixed = apply_guidance(logits_2BlV, ramp)
            else:  # the sampler head is guided with the full scale, not the ramp
                mixed = apply_guidance(transformer.sampler_scale_logits(scale_index, hidden_2BlC, committed, pooled_2BD), guidance_scale)
            trace[0].append(mixed.clone())
            filter_top_k_top_p_(mixed, top_k, top_p, fast=self._fast_top_p(device))
            indices, confidence = sample_from_logits(mixed, generator, return_confidence=True)
            codes = codebook[indices.to(codebook.device)].float().to(device)
            trace[1].append(indices)
            trace[2].append(confidence)
            if step < main_head_steps:  # main-head steps first commit the most confident positions overall
                commit(confidence.view(B, n).topk(count, dim=-1).indices, codes, indices)
            if step < RANDOM_COMMIT_STEPS:
                confidence = uniform_draws(tuple(confidence.shape), sampler_generator, device)
            confidence = confidence * (~mask)[..., None].to(confidence.dtype)
            commit(confidence.view(B, n).topk(count, dim=-1).indices, codes, indices)
        return committed, committed_idx, tuple(torch.stack(t) for t in trace)

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 4.0,
        top_k: int = 600,
        top_p: float = 0.8,
        more_smooth: bool = False,
        use_stable_sampler: bool | None = None,
        sampler_version: str = "1024",
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        sampler_generator: torch.Generator | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ):
        r"""Generate images from text.

        Args:
            prompt: prompt or list of prompts (or pass ``prompt_embeds``).
            negative_prompt: unconditional text (default ``""``, as the original).
            guidance_scale: the original ``cfg``: guidance ramps linearly from 0 at the first scale to
                ``guidance_scale`` at the last (``(1 + t) cond - t uncond`` on logits). Demo: 4.0.
            top_k, top_p: token filtering (0 disables); the demo uses 600 / 0.8.
            more_smooth: Gumbel-softmax mixture of codes instead of hard tokens (visualisation only; no
                top-k/top-p, and not combined with the stable sampler).
            use_stable_sampler: causal-driven stable sampling from ``transformer.config.sampler_start_scale``
                on; ``None`` = on when the checkpoint has the sampler head.
            sampler_version: the original ``sample_version``: ``"1024"`` (8 steps, 15 from scale 13; the first
                5 steps of scales < 13 propose with the main head) or ``"new"`` (8 sampler-head steps).
            num_images_per_prompt: images per prompt.
            generator: one ``torch.Generator`` (the original's ``g_seed`` stream) or one per image.
            sampler_generator: the stable sampler's commit-position stream (the original's global RNG);
                ``None`` uses the global torch RNG like the original.
            max_sequence_length: text tokens (default 77 for CLIP, 120 for T5); longer prompts are truncated
                with a warning.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (float (B, 3, H, W) in [0, 1]) or ``"latent"`` (f_hat).
            callback_on_step_end: called once per scale as ``fn(pipe, scale_index, patch_num, kwargs)`` with
                the tensors named in ``callback_on_step_end_tensor_inputs``: ``"f_hat"``, ``"logits"`` (main
                head, guided with the ramp, before filtering), ``"indices"`` (B, l) (None with
                ``more_smooth``), and per sampling call of the scale ``"step_logits"`` (K, B, l, V) guided
                logits, ``"step_indices"`` (K, B, l), ``"step_confidences"`` (K, B, l, 1) (K = 1 on plain
                scales); may return a new ``"f_hat"``.
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds: precomputed text features instead of
                ``prompt``, as :meth:`encode_prompt` returns them: hidden states (B, N, text_embed_dim), the padding
                mask (B, N) (1 = real token; default all ones) and the pooled vector (B, text_embed_dim, required).
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds: the same for the
                unconditional half (same shapes); default: ``negative_prompt`` (``""``) through the text encoder.
        """
        check_sampling_args(guidance_scale, top_k, top_p, output_type, num_images_per_prompt)
        if prompt_embeds is None:
            for name, value in (("prompt_attention_mask", prompt_attention_mask), ("pooled_prompt_embeds", pooled_prompt_embeds)):
                if value is not None:
                    raise ValueError(f"`{name}` is only used with `prompt_embeds`.")
            num_prompts, given = len(self._check_prompts(prompt)), None
        else:
            if prompt is not None:
                raise ValueError("pass either `prompt` or `prompt_embeds`, not both.")
            given = self._check_text_embeds(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, "")
            num_prompts = prompt_embeds.shape[0]
        if negative_prompt_embeds is None:
            for name, value in (("negative_prompt_attention_mask", negative_prompt_attention_mask),
                                ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
                if value is not None:
                    raise ValueError(f"`{name}` is only used with `negative_prompt_embeds`.")
            self._check_negative_prompts(negative_prompt, num_prompts)
            given_negative = None
            limit = None if self.tokenizer is None else (T5_MAX_LENGTH if self._is_t5 else self.tokenizer.model_max_length)
            if prompt_embeds is not None and self.text_encoder is not None and limit is not None and prompt_embeds.shape[1] > limit:
                raise ValueError(f"`prompt_embeds` has {prompt_embeds.shape[1]} tokens: the negative prompt is encoded to the same "
                                 f"length and the text encoder takes at most {limit}; pass `negative_prompt_embeds` too, "
                                 f"or at most {limit} tokens.")
        else:
            if negative_prompt is not None:
                raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
            given_negative = self._check_text_embeds(negative_prompt_embeds, negative_prompt_attention_mask,
                                                     negative_pooled_prompt_embeds, "negative_", num_prompts)
        if self.text_encoder is None or self.tokenizer is None:
            if prompt_embeds is None:
                raise ValueError("`prompt` needs a text encoder and tokenizer, which this pipeline lacks; pass `prompt_embeds` "
                                 "and `pooled_prompt_embeds` instead.")
            if negative_prompt_embeds is None:
                raise ValueError("`negative_prompt_embeds` and `negative_pooled_prompt_embeds` are required: this pipeline "
                                 "has no text encoder to encode `negative_prompt` (default \"\").")
        transformer, vqvae = self.transformer, self.vqvae
        if use_stable_sampler is None:
            use_stable_sampler = transformer.has_stable_sampler
        elif use_stable_sampler and not transformer.has_stable_sampler:
            raise ValueError("`use_stable_sampler=True`, but this checkpoint has no stable-sampler head "
                             "(only star-1024-sampler has one); pass None or False.")
        if sampler_version not in STABLE_SAMPLER_VERSIONS:
            raise ValueError(f"`sampler_version` must be one of {STABLE_SAMPLER_VERSIONS}, got {sampler_version!r}.")
        if sampler_generator is not None and not isinstance(sampler_generator, torch.Generator):
            raise ValueError(f"`sampler_generator` must be a torch.Generator or None, got {type(sampler_generator).__name__}.")
        tensor_inputs = check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        B = num_prompts * num_images_per_prompt
        check_generator(generator, B)
        device = self._execution_device

        text_hidden, text_mask, text_pooled = self._prepare_text(  # conditional rows first
            prompt, negative_prompt, given, given_negative, num_images_per_prompt, device, max_sequence_length)
        if self._fast_inference:  # static graph inputs in the compute dtype (the blocks cast to it anyway)
            text_hidden, text_pooled = text_hidden.to(transformer.text_proj.weight.dtype), text_pooled.to(transformer.text_proj.weight.dtype)

        patch_nums = tuple(transformer.config.patch_nums)
        num_scales, side = len(patch_nums), patch_nums[-1]
        sampler_start = transformer.config.sampler_start_scale if use_stable_sampler else num_scales
        scale_step = self._scale_step(text_pooled, text_hidden, text_mask, device)
        fast_top_p = self._fast_top_p(device)
        separable_upsample = self._separable_upsample(device, B * vqvae.config.z_channels, side)
        codebook = vqvae.codebook
        f_hat = torch.zeros(B, vqvae.config.z_channels, side, side, device=device, dtype=torch.float32)
        scale_input = None

        with self.progress_bar(total=num_scales) as progress_bar:
            for si, pn in enumerate(patch_nums):
                ratio = si / (num_scales - 1)
                logits_2B, hidden_2B = scale_step(si, scale_input)
                logits = apply_guidance(logits_2B, linear_guidance_ramp(guidance_scale, si, num_scales))
                guided_logits = logits.clone() if "logits" in tensor_inputs else None
                if si >= sampler_start:
                    embedding, indices, (step_logits, step_indices, step_conf) = self._stable_sampler_scale(
                        si, logits_2B, hidden_2B, text_pooled, guidance_scale, top_k, top_p, sampler_version,
                        generator, sampler_generator)
                elif more_smooth:  # soft mixture of codes, no hard sample (no draw), as the original
                    weights = gumbel_softmax(logits.mul(1 + ratio), smooth_tau(ratio), generator)
                    embedding = weights @ codebook.float().to(weights.device)
                    indices = step_indices = step_conf = None
                    step_logits = logits[None]
                else:
                    step_logits = logits[None].clone() if "step_logits" in tensor_inputs else None
                    filter_top_k_top_p_(logits, top_k, top_p, fast=fast_top_p)
                    indices, confidence = sample_from_logits(logits, generator, return_confidence=True)
                    step_indices, step_conf = indices[None], confidence[None]
                    embedding = codebook[indices.to(codebook.device)].float()
                embedding = embedding.to(device).transpose(1, 2).reshape(B, -1, pn, pn)
                f_hat, next_input = vqvae.next_scale_input(si, f_hat, embedding, separable_upsample=separable_upsample)

                if callback_on_step_end is not None:
                    local = {"f_hat": f_hat, "logits": guided_logits, "indices": indices, "step_logits": step_logits,
                             "step_indices": step_indices, "step_confidences": step_conf}
                    f_hat, next_input = run_scale_callback(self, callback_on_step_end, si, patch_nums, local, tensor_inputs, f_hat, next_input)
                if si != num_scales - 1:
                    scale_input = next_input.flatten(2).transpose(1, 2).repeat(2, 1, 1)  # same input for both halves
                progress_bar.update()

        return finish_generation(self, f_hat, output_type, return_dict)
