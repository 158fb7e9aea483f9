"""STARPipeline: text-to-image generation by next-scale prediction (STAR)."""

from __future__ import annotations

import types
from contextlib import nullcontext
from inspect import signature
from typing import Callable

import torch
from diffusers.utils import is_bs4_available, is_ftfy_available, logging

from ..loaders import STARLoraLoaderMixin
from ..models.blocks import square_schedule
from ..models.multiscale_vq import MultiScaleVQModel
from ..models.star_transformer import STARTransformer2DModel
from ..scalars import is_integer
from .fast_inference import CUDAGraphScaleSteps, compile_star_blocks_
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
    check_num_images_per_prompt,
    check_prompts,
    check_text_embeds,
    check_text_encoder_width,
    check_unicode_texts,
    repeat_rows,
    shorten,
    text_encoder_width,
    warn_eager_forcing,
)
from .sampling import (
    RANDOM_COMMIT_STEPS,
    STABLE_SAMPLER_VERSIONS,
    GeneratorArg,
    apply_guidance,
    derived_generator,
    filter_top_k_top_p_,
    gumbel_softmax,
    linear_guidance_ramp,
    nan_where_drawn_from_nonfinite,
    ramp_table,
    sample_from_logits,
    smooth_tau,
    stable_sampler_counts,
    stable_sampler_plan,
    top_p_mass,
    uniform_draws,
)

logger = logging.get_logger(__name__)

# ``forcing(scale_index, code_map_BChw, indices_Bl) -> (code_map, indices)``: a task pipeline's replacement of a
# scale's code map (and indices) before it enters f_hat (in-painting keeps the input image's codes)
ScaleForcing = Callable[[int, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]

# The T5 ablation pads every caption to 120 tokens and averages all of them (padding included).
T5_MAX_LENGTH = 120
# T5's positions are relative, but it was trained on texts of up to 512 tokens (flan-t5's tokenizers' model_max_length,
# the length Infinity's original tokenises to); its attention grows with the square of the length (100,000 tokens
# asked for 80 GB), so longer texts are refused.
T5_MAX_POSITIONS = 512


def t5_embedder_captions(texts: list[str]) -> list[str]:
    """Captions as STAR's T5 ablation reads them: its ``T5Embedder`` cleans each caption twice with DeepFloyd IF's
    caption cleaning (lower case; URLs, HTML, handles and stray punctuation removed). diffusers ships that cleaning
    with its PixArt-alpha pipeline, which needs ``beautifulsoup4`` and ``ftfy``."""
    missing = [
        name
        for name, available in (("beautifulsoup4", is_bs4_available), ("ftfy", is_ftfy_available))
        if not available()
    ]
    if missing:
        raise ImportError(
            f"a STAR pipeline with a T5 text encoder cleans prompts as the original's T5Embedder does, which needs "
            f"{' and '.join(missing)}: pip install {' '.join(missing)} (or pip install 'diffusers-var[t5]')."
        )
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline

    cleaner = types.SimpleNamespace(bad_punct_regex=PixArtAlphaPipeline.bad_punct_regex)  # all the method reads
    clean = PixArtAlphaPipeline._clean_caption
    return [clean(cleaner, clean(cleaner, text)) for text in texts]


class STARPipeline(MultiScaleVQPipelineMixin, NextScalePipeline, STARLoraLoaderMixin):
    r"""Text-to-image generation with STAR (scale-wise text-to-image autoregression).

    Components:
        transformer ([`STARTransformer2DModel`]): predicts each scale's tokens from the coarser ones and the text.
        vqvae ([`MultiScaleVQModel`]): VAR's multi-scale tokenizer (codebook + decoder).
        text_encoder (`CLIPTextModel` or `T5EncoderModel`): SD-2.x CLIP text tower in the releases
            (hidden states + the pooled EOS state); flan-t5-xl in one ablation.
        tokenizer (`CLIPTokenizer` / `T5TokenizerFast`).

    ``text_encoder`` and ``tokenizer`` are optional: without them, pass precomputed text features
    (``prompt_embeds``, ``pooled_prompt_embeds`` and the negative counterparts) instead of prompts. A pipeline with
    only the text encoder and tokenizer (``transformer=None, vqvae=None``) computes them with :meth:`encode_prompt`.

    With a single seeded CPU ``torch.Generator`` the token draws happen in the original order, shapes and
    dtypes. The stable sampler draws its random commit positions from a second stream (the global torch RNG in the
    original): ``sampler_generator`` sets it; by default it is derived from ``generator`` (so a seed, or a list of
    per-image generators, reproduces each image), and ``sampler_generator=torch.default_generator`` uses the global
    RNG as the original does. ``enable_model_cpu_offload`` offloads the text encoder and the transformer; the
    VQ-VAE, used at every scale, stays on the accelerator.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _exclude_from_cpu_offload = ["vqvae"]
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = UNIFIED_CALLBACK_TENSORS + [
        "step_logits",
        "step_indices",
        "step_confidences",
        "f_hat",
        "indices",
        "logits",
    ]
    _family = "star"
    _callback_aliases = {"f_hat": "latents", "indices": "tokens", "logits": "guided_logits"}

    def __init__(
        self, transformer: STARTransformer2DModel, vqvae: MultiScaleVQModel, text_encoder=None, tokenizer=None
    ):
        super().__init__()
        self._check_vqvae_fits(transformer, vqvae)
        if transformer is not None:
            check_text_encoder_width(text_encoder, transformer.config.text_embed_dim, "text_embed_dim")
        self.register_modules(transformer=transformer, vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer)

    def scale_schedule(self) -> list[tuple[int, int]]:
        """The token grid ``(h, w)`` of every scale."""
        return square_schedule(self.transformer.config.patch_nums)

    # -- text ---------------------------------------------------------------------------------------
    @property
    def _is_t5(self) -> bool:
        return getattr(getattr(self.text_encoder, "config", None), "model_type", "") in ("t5", "umt5", "mt5")

    @property
    def text_max_length(self) -> int | None:
        """Tokens per text the text encoder takes (77 for CLIP, 120 for the T5 ablation), or None without one."""
        if self.tokenizer is None:
            return None
        return T5_MAX_LENGTH if self._is_t5 else self.tokenizer.model_max_length

    def _truncated(self, texts: list[str], max_length: int) -> list[int]:
        """The indices of ``texts`` (as tokenised: T5's captions already rewritten) longer than ``max_length``."""
        # lengths from the attention mask: CLIP's tokenizers pad with their end token, which counting non-padding
        # ids would miss
        # (verbose=False: transformers warned of "indexing errors" for texts this pipeline truncates itself)
        lengths = self.tokenizer(texts, padding="longest", return_tensors="pt", verbose=False).attention_mask.sum(-1)
        return [i for i, length in enumerate(lengths.tolist()) if length > max_length]

    def _tokenize(self, texts: list[str], max_length: int, device, names: list[str] | None = None, warn: bool = True):
        """Token ids and attention masks (B, max_length); ``names`` say which argument each text came from (the
        truncation warning's words; default ``prompt[i]``); ``warn=False``: no truncation warning (training warns
        once per run itself, see :meth:`STARTask.encode_text`)."""
        if self._is_t5:
            texts = t5_embedder_captions(texts)
        tokens = self.tokenizer(  # padded on the right, as the original (a left-padding tokenizer too)
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
            padding_side="right",
        )
        cut = self._truncated(texts, max_length) if warn else []
        if cut:
            names = [f"prompt[{i}]" for i in range(len(texts))] if names is None else names
            logger.warning(
                f"{', '.join(f'`{names[i]}`' for i in cut)} ({shorten(texts[cut[0]], 60)}"
                f"{', ...' if len(cut) > 1 else ''}) longer than the text encoder's {max_length} tokens: truncated "
                "(as the original does)."
            )
        return tokens.input_ids.to(device), tokens.attention_mask.to(device)

    @torch.no_grad()
    def encode_text(
        self,
        texts: list[str],
        device: torch.device | None = None,
        max_sequence_length: int | None = None,
        text_names: list[str] | None = None,
        warn_truncation: bool = True,
    ):
        r"""One text encoder call on ``texts`` (training encodes captions with this, ``""`` for dropped ones);
        ``text_names`` name each text in the truncation warning (default ``prompt[i]``); ``warn_truncation=False``
        leaves the warning out (training warns once per run instead of at every step).

        Returns ``(hidden (B, N, D), attention_mask (B, N) int64, pooled (B, D))`` as in :meth:`encode_prompt`.
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "`prompt`: this pipeline has no text encoder / tokenizer; pass `prompt_embeds`, "
                "`pooled_prompt_embeds` and their `negative_` counterparts instead."
            )
        texts = check_prompts(texts, "texts")
        self._check_max_sequence_length(max_sequence_length)
        device = device or self._execution_device
        max_length = self.text_max_length if max_sequence_length is None else int(max_sequence_length)
        input_ids, attention_mask = self._tokenize(texts, max_length, device, text_names, warn=warn_truncation)
        output = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = output.last_hidden_state
        pooled = hidden.mean(dim=1) if self._is_t5 else output.pooler_output
        return hidden, attention_mask, pooled

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ):
        r"""Encode prompts (and their unconditional counterparts) for the transformer; precomputed features replace
        either half. Works on a pipeline with only a text encoder and tokenizer.

        Args:
            prompt: prompt or non-empty list of prompts (or ``prompt_embeds``).
            device: where the features go (default: the execution device).
            num_images_per_prompt: rows per prompt (repeated consecutively).
            do_classifier_free_guidance: also return the unconditional half (STAR always runs both halves).
            negative_prompt: unconditional text, one per prompt or a single string; ``None`` = ``""`` (the
                original's unconditional input).
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds: precomputed conditional features.
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds: the same for the
                unconditional half.
            max_sequence_length: tokens per text (default: the tokenizer's 77 for CLIP, 120 for T5; at most 77 for
                CLIP, 512 for T5).

        Returns ``(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt_embeds,
        negative_prompt_attention_mask, negative_pooled_prompt_embeds)``: hidden states (B, N, D), masks (B, N) int64,
        pooled (B, D) (the negatives ``None`` without guidance). CLIP's pooled vector is its EOS state
        (``pooler_output``); T5's is the mean over all positions, padding included, like the original ablation. The
        prompt and the negative prompt are encoded in one text encoder call, as the original does.
        """
        check_num_images_per_prompt(num_images_per_prompt)
        self._check_max_sequence_length(max_sequence_length)
        if prompt_embeds is not None:
            self._check_text_half(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, "")
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                self._check_negative_length(prompt_embeds)
        if negative_prompt_embeds is not None:
            self._check_text_half(
                negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds, "negative_"
            )
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = check_prompts(prompt)
            negatives = self._negative_prompts(negative_prompt, len(prompts)) if do_classifier_free_guidance else []
            if do_classifier_free_guidance and negative_prompt_embeds is None:  # both halves in one call
                names = [f"prompt[{i}]" for i in range(len(prompts))]
                names += [f"negative_prompt[{i}]" for i in range(len(negatives))]
                hidden, mask, pooled = self.encode_text(prompts + negatives, device, max_sequence_length, names)
                B = len(prompts)
                prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = hidden[:B], mask[:B], pooled[:B]
                negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds = (
                    hidden[B:],
                    mask[B:],
                    pooled[B:],
                )
            else:
                prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = self.encode_text(
                    prompts, device, max_sequence_length
                )
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        if do_classifier_free_guidance and negative_prompt_embeds is None:  # the prompt features were given
            negatives = self._negative_prompts(negative_prompt, prompt_embeds.shape[0])
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds = self.encode_text(
                negatives, device, prompt_embeds.shape[1], [f"negative_prompt[{i}]" for i in range(len(negatives))]
            )
        elif negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.long, device=negative_prompt_embeds.device
            )
        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_attention_mask = negative_pooled_prompt_embeds = None
        (
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
        ) = (
            repeat_rows(t, num_images_per_prompt, device)
            for t in (
                prompt_embeds,
                prompt_attention_mask,
                pooled_prompt_embeds,
                negative_prompt_embeds,
                negative_prompt_attention_mask,
                negative_pooled_prompt_embeds,
            )
        )
        return (
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
        )

    @staticmethod
    def _negative_prompts(negative_prompt, batch_size: int) -> list[str]:
        if negative_prompt is None:
            return [""] * batch_size
        if isinstance(negative_prompt, str):
            negatives = [negative_prompt] * batch_size
        elif not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
            raise ValueError(
                f"`negative_prompt` must be None, a string or a list of strings, got {shorten(negative_prompt)}."
            )
        elif len(negative_prompt) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch_size}; they must match."
            )
        else:
            negatives = list(negative_prompt)
        check_unicode_texts(negatives, "negative_prompt", negative_prompt)
        return negatives

    @property
    def _longest_text(self) -> int | None:
        """Most tokens per text: CLIP's positions (77), :data:`T5_MAX_POSITIONS` for T5, None without a tokenizer."""
        if self.tokenizer is None:
            return None
        return T5_MAX_POSITIONS if self._is_t5 else self.tokenizer.model_max_length

    def _check_max_sequence_length(self, max_sequence_length) -> None:
        # at least the tokenizer's start and end tokens; at most the text encoder's positions
        longest = self._longest_text
        if max_sequence_length is not None and (
            not is_integer(max_sequence_length)
            or max_sequence_length < 2
            or (longest is not None and max_sequence_length > longest)
        ):
            raise ValueError(
                f"`max_sequence_length` must be None or an integer in [2, {longest or 'inf'}] (text tokens), got "
                f"{max_sequence_length!r}."
            )

    def _check_negative_length(self, prompt_embeds: torch.Tensor) -> None:
        """The negative prompt is encoded to ``prompt_embeds``' length: the tokenizer's start and end tokens at
        least, the text encoder's positions at most."""
        limit = self._longest_text
        if prompt_embeds.shape[1] < 2 or (limit is not None and prompt_embeds.shape[1] > limit):
            raise ValueError(
                f"`prompt_embeds` has {prompt_embeds.shape[1]} tokens: the negative prompt is encoded to the same "
                f"length, which must be in [2, {limit or 'inf'}] (the tokenizer's start and end tokens, the text "
                "encoder's positions); pass `negative_prompt_embeds` too."
            )

    def _check_text_half(self, embeds, mask, pooled, prefix: str, batch_size: int | None = None) -> None:
        """Validate one half of precomputed text features (their width: the transformer's, or without one, the text
        encoder's)."""
        D = self.transformer.config.text_embed_dim if self.transformer is not None else None
        D = D or text_encoder_width(self.text_encoder) or embeds.shape[-1]
        check_text_embeds(embeds, mask, D, f"{prefix}prompt_embeds", f"{prefix}prompt_attention_mask", batch_size)
        if pooled is None:
            raise ValueError(
                f"`{prefix}pooled_prompt_embeds` (B, {D}) is required with `{prefix}prompt_embeds` "
                "(STAR's first token is the pooled text)."
            )
        if not torch.is_tensor(pooled) or tuple(pooled.shape) != (embeds.shape[0], D):
            shape = tuple(pooled.shape) if torch.is_tensor(pooled) else type(pooled).__name__
            raise ValueError(
                f"`{prefix}pooled_prompt_embeds` must be a floating-point ({embeds.shape[0]}, {D}) tensor, "
                f"got {shape}."
            )
        if not pooled.is_floating_point():
            raise ValueError(
                f"`{prefix}pooled_prompt_embeds` must be a floating-point tensor, got one of dtype {pooled.dtype}."
            )
        if not bool(torch.isfinite(pooled).all()):
            raise ValueError(f"`{prefix}pooled_prompt_embeds` holds NaN or infinite values.")

    # -- fast inference ------------------------------------------------------------------------------
    def enable_fast_inference(
        self,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        compile_decoder: bool | str = False,
        compile_blocks: bool | str = False,
        fp8: bool = False,
    ) -> "STARPipeline":
        """Speed switch for GPUs (as :meth:`VARPipeline.enable_fast_inference`). The transformer (blocks, text
        projection, stable-sampler blocks), the image decoder and the text encoder run in ``dtype`` (bf16 by
        default); the output heads (``_keep_in_fp32_modules``; their LayerNorms are parameter-free and computed in
        float32), the quantizer and f_hat stay float32. On CUDA each scale's main transformer step is a CUDA graph,
        captured on the first call for a (rows, text length) pair and replayed after; the text keys / values of every
        block are computed once per generation inside the first scale's graph; top-p sorts only the top-k values.
        With a CUDA ``torch.Generator`` (or ``generator=None``), no stable-sampler scale and images of at most 16 x 16
        tokens (256 px; ``fast_inference.WHOLE_SCALE_SAMPLING_MAX_TOKENS``) the whole scale is one graph, sampling
        included, as for VAR (a seed gives the eager sampler's images; the callback's tensors are the graphs'
        buffers); larger images, a CPU generator, a list of generators or the stable sampler (its commit steps and
        second random stream) keep sampling eager after the graphed transformer step. On the CPU it only casts: with
        ``dtype=torch.float32`` the images are the eager ones. ``compile_blocks``:
        ``torch.compile`` of each block's elementwise work (norms, q/k normalisation, RoPE, residuals, FFN; the
        stable sampler's blocks too), fused before the graphs are captured (on CUDA,
        ``fast_inference.STAR_COMPILED_CROSS_QUERY_ON_CUDA = False`` keeps the cross-attention query uncompiled);
        ``True`` / ``"dynamic"``, ``"static-tokens"`` or ``"static"`` as for VAR.
        ``fp8``: float8 matmuls in the main blocks' attention and FFN at scales of at least 2,048 token rows (as for
        VAR). Returns the pipeline.
        """
        self._check_fast_inference_args(
            dtype, cuda_graphs=cuda_graphs, compile_decoder=compile_decoder, compile_blocks=compile_blocks, fp8=fp8
        )
        self._cast_for_fast_inference(dtype, (self.vqvae.decoder, self.vqvae.post_quant_conv), compile_decoder)
        if compile_blocks:
            compile_star_blocks_(self.transformer, compile_blocks)
        return self._set_fast_inference(True, cuda_graphs, dtype, fp8)

    # -- one scale -----------------------------------------------------------------------------------
    def _stable_sampler_scale(
        self,
        scale_index,
        logits_2BlV,
        hidden_2BlC,
        pooled_2BD,
        guidance_scale,
        top_k,
        top_p,
        version,
        generator,
        sampler_generator,
        known=None,
    ):
        """Commit a scale's tokens over several steps (STAR's causal-driven stable sampling). ``known`` (in-painting:
        :meth:`TokenForcing.known_tokens`) is committed before the first step, so the sampler head sees the kept
        input around the positions it proposes; the steps then commit the other positions on the same schedule
        (finishing earlier), with the same random draws.

        Returns the committed codes (B, l, Cv), their indices (B, l) and the per-step trace
        (mixed logits, sampled indices, confidences)."""
        transformer, vqvae = self.transformer, self.vqvae
        B, n = logits_2BlV.shape[0] // 2, logits_2BlV.shape[1]
        device = logits_2BlV.device
        num_steps, main_head_steps = stable_sampler_plan(scale_index, version)
        ramp = linear_guidance_ramp(guidance_scale, scale_index, len(transformer.config.patch_nums))
        committed = torch.zeros(B, n, vqvae.config.z_channels, device=device, dtype=torch.float32)
        committed_idx = torch.zeros(B, n, dtype=torch.long, device=device)
        mask = torch.zeros(B, n, dtype=torch.bool, device=device)
        if known is not None:
            keep_Bl, codes_BlCv, indices_Bl = (t.to(device) for t in known)
            committed.copy_(codes_BlCv)
            committed_idx.copy_(indices_Bl)
            mask.copy_(keep_Bl)
        trace = ([], [], [])

        def commit(positions_Bk, codes_BlCv, indices_Bl):  # torch.where, not boolean indexing: no host sync
            chosen = torch.zeros_like(mask).scatter_(1, positions_Bk, True) & ~mask
            committed.copy_(torch.where(chosen[..., None], codes_BlCv, committed))
            committed_idx.copy_(torch.where(chosen, indices_Bl, committed_idx))
            mask.logical_or_(chosen)

        for step, count in enumerate(stable_sampler_counts(n, num_steps)):
            # the original's mask scheduler draws this and discards it (left where it is drawn: no copy)
            discard_device = sampler_generator.device if isinstance(sampler_generator, torch.Generator) else "cpu"
            uniform_draws((2 * B, n), sampler_generator, discard_device)
            if step < main_head_steps:
                mixed = apply_guidance(logits_2BlV, ramp)
            else:  # the sampler head is guided with the full scale, not the ramp
                mixed = apply_guidance(
                    transformer.sampler_scale_logits(scale_index, hidden_2BlC, committed, pooled_2BD), guidance_scale
                )
            trace[0].append(mixed.clone())
            filter_top_k_top_p_(mixed, top_k, top_p, fast=self._fast_top_p(device))
            indices, confidence = sample_from_logits(mixed, generator, return_confidence=True)
            codes = nan_where_drawn_from_nonfinite(vqvae.embed_tokens(indices), confidence)
            trace[1].append(indices)
            trace[2].append(confidence)
            if step < main_head_steps:  # main-head steps first commit the most confident positions overall
                commit(confidence.view(B, n).topk(count, dim=-1).indices, codes, indices)
            if step < RANDOM_COMMIT_STEPS:
                confidence = uniform_draws(tuple(confidence.shape), sampler_generator, device)
            confidence = confidence * (~mask)[..., None].to(confidence.dtype)
            commit(confidence.view(B, n).topk(count, dim=-1).indices, codes, indices)
        return committed, committed_idx, tuple(torch.stack(t) for t in trace)

    def _sample_scale(
        self,
        si: int,
        model_logits_2BlV: torch.Tensor,
        latents: torch.Tensor,
        strength,
        top_k: int,
        top_p: float,
        generator: GeneratorArg,
        *,
        more_smooth: bool,
        keep_logits: bool,
        fast_filter: bool,
        forcing: ScaleForcing | None = None,
        top_p_mass: torch.Tensor | None = None,
    ) -> tuple:
        """Guidance, top-k / top-p and the draw (or ``more_smooth``'s Gumbel mixture) of a scale without the stable
        sampler, then the forcing and the latents update (in place): eagerly, or inside a whole-scale CUDA graph
        (``strength`` and ``1 - top_p`` then come as device tensors). Returns ``(next scale's input or None, tokens,
        guided logits, step logits, step indices, step confidences)``; the logits copies only with ``keep_logits``."""
        ratio = si / (len(self.transformer.config.patch_nums) - 1)
        guided_logits = apply_guidance(model_logits_2BlV, strength)
        logits_copy = guided_logits.clone() if keep_logits else None
        if more_smooth:  # soft mixture of codes, no hard sample (no draw), as the original
            weights = gumbel_softmax(guided_logits.mul(1 + ratio), smooth_tau(ratio), generator)
            embedding = weights @ self.vqvae.codebook_vectors(weights.device)
            tokens = step_indices = step_conf = None
            step_logits = guided_logits[None] if keep_logits else None
        else:
            step_logits = logits_copy[None] if keep_logits else None
            filter_top_k_top_p_(guided_logits, top_k, top_p, fast=fast_filter, top_p_mass=top_p_mass)
            tokens, confidence = sample_from_logits(guided_logits, generator, return_confidence=True)
            step_indices, step_conf = tokens[None], confidence[None]
            embedding = nan_where_drawn_from_nonfinite(self.vqvae.embed_tokens(tokens), confidence)
        next_input, tokens = self._commit_scale(si, embedding, tokens, latents, forcing)
        return next_input, tokens, logits_copy, step_logits, step_indices, step_conf

    def _commit_scale(self, si: int, embedding_BlC, tokens, latents, forcing: ScaleForcing | None):
        """A scale's codes (B, l, Cv) into the running latent (in place), after the forcing. Returns ``(next scale's
        input or None, tokens after the forcing)``."""
        pn = self.transformer.config.patch_nums[si]
        embedding = embedding_BlC.to(latents.device).transpose(1, 2).reshape(latents.shape[0], -1, pn, pn)
        if forcing is not None:
            embedding, tokens = forcing(si, embedding, tokens)
        self.vqvae.next_scale_input(si, latents, embedding)
        return self._next_scale_input(latents, si), tokens

    def _sampling_graphs(
        self, condition, latents, top_k: int, top_p: float, forcing, **settings
    ) -> CUDAGraphScaleSteps | None:
        """The whole-scale CUDA graphs of a generation without the stable sampler (transformer step, guidance, top-k /
        top-p, the draw, the forcing and the latents update in one replay per scale), fed with this generation's
        condition, guidance ramp and top-p; ``None`` when graphs are off. ``settings``: :meth:`_sample_scale`'s."""
        device, num_scales = latents.device, len(self.transformer.config.patch_nums)

        def sample_scale(si, output, latents, generator, forcing, guidance_S2, removable_mass):
            model_logits, _ = output
            next_input, *outputs = self._sample_scale(
                si,
                model_logits,
                latents,
                guidance_S2[si],
                top_k,
                0.0,
                generator,
                forcing=forcing,
                top_p_mass=removable_mass if top_p > 0 else None,
                **settings,
            )
            return None if next_input is None else self._guidance_rows(next_input), model_logits, *outputs

        parameters = (ramp_table(self._guidance_scale, num_scales, device), top_p_mass(top_p, device))
        key = ("star", top_k, top_p > 0, *sorted(settings.items()))
        return self._whole_scale_graphs(
            key, device, condition, parameters, self.scale_schedule(), latents, sample_scale, forcing
        )

    def _sample_scales(
        self,
        condition,
        B: int,
        top_k: int,
        top_p: float,
        more_smooth: bool,
        use_stable_sampler: bool | None,
        sampler_version: str,
        generator: GeneratorArg,
        sampler_generator,
        callback=None,
        tensor_names: list[str] = (),
        forcing: ScaleForcing | None = None,
    ) -> torch.Tensor:
        """The scale loop of a generation with ``condition`` (the text of both guidance halves); returns the final
        f_hat. ``forcing`` (task pipelines) replaces code maps before they enter f_hat.

        On the fast path with a CUDA generator and no stable-sampler scale each scale is one CUDA graph replay,
        sampling included; otherwise the transformer step (a graph replay, or eager) is followed by the eager
        sampler."""
        transformer, vqvae = self.transformer, self.vqvae
        schedule = self.scale_schedule()
        num_scales, side = len(schedule), schedule[-1][0]
        if use_stable_sampler is None:
            use_stable_sampler = transformer.has_stable_sampler
        sampler_start = transformer.config.sampler_start_scale if use_stable_sampler else num_scales
        text_pooled = condition[2]
        device = text_pooled.device
        fast_filter = self._fast_top_p(device)
        settings = dict(more_smooth=more_smooth, keep_logits=callback is not None, fast_filter=fast_filter)
        latents = torch.zeros(B, vqvae.config.z_channels, side, side, device=device, dtype=torch.float32)
        graphs, graph_generator = None, None
        if sampler_start == num_scales and self._samples_in_graphs(schedule):  # the stable sampler's two random
            graph_generator = self._graph_sampling_generator(device, generator)  # streams stay eager
        if graph_generator is not None and forcing is not None and not isinstance(forcing, TokenForcing):
            warn_eager_forcing(self)  # an arbitrary hook cannot be captured: sampling stays eager, said once
            graph_generator = None
        if graph_generator is not None:
            graphs = self._sampling_graphs(condition, latents, top_k, top_p, forcing, **settings)
        if graphs is not None:
            latents, table_guidance = graphs.latents, self._guidance_scale
        else:
            transformer_step = self._transformer_steps(condition, schedule, device)
        scale_input = None
        with (
            self.progress_bar(total=num_scales) as progress_bar,
            graphs.borrow_generator_state(graph_generator) if graphs is not None else nullcontext(),
        ):
            for si, (pn, _) in enumerate(schedule):
                if self.interrupt:
                    break
                if graphs is not None:  # the whole scale, sampling included, is one graph replay
                    if self._guidance_scale != table_guidance:  # a callback changed the guidance
                        table_guidance = self._guidance_scale
                        graphs.shared_inputs[len(condition)].copy_(ramp_table(table_guidance, num_scales, device))
                    model_logits, tokens, logits_copy, step_logits, step_indices, step_conf = graphs(si)
                    next_input = graphs.scale_inputs[si + 1][:B] if si + 1 < num_scales else None
                elif si >= sampler_start:
                    model_logits, hidden_2B = transformer_step(si, scale_input)
                    ramp = linear_guidance_ramp(self._guidance_scale, si, num_scales)
                    logits_copy = apply_guidance(model_logits, ramp) if callback is not None else None
                    embedding, tokens, (step_logits, step_indices, step_conf) = self._stable_sampler_scale(
                        si,
                        model_logits,
                        hidden_2B,
                        text_pooled,
                        self._guidance_scale,
                        top_k,
                        top_p,
                        sampler_version,
                        generator,
                        sampler_generator,
                        forcing.known_tokens(si) if isinstance(forcing, TokenForcing) else None,
                    )
                    next_input, tokens = self._commit_scale(si, embedding, tokens, latents, forcing)
                else:
                    model_logits, _ = transformer_step(si, scale_input)
                    strength = linear_guidance_ramp(self._guidance_scale, si, num_scales)
                    next_input, tokens, logits_copy, step_logits, step_indices, step_conf = self._sample_scale(
                        si, model_logits, latents, strength, top_k, top_p, generator, forcing=forcing, **settings
                    )

                if callback is not None:
                    tensors = dict(
                        latents=latents,
                        tokens=tokens,
                        guided_logits=logits_copy,
                        model_logits=model_logits,
                        next_scale_input=next_input,
                        step_logits=step_logits,
                        step_indices=step_indices,
                        step_confidences=step_conf,
                    )
                    new_latents = self._step_callback(callback, tensor_names, si, (pn, pn), tensors)
                    if new_latents is not None:
                        latents, next_input = self._take_callback_latents(new_latents, latents, si, graphs)
                if graphs is None and next_input is not None:
                    scale_input = self._guidance_rows(next_input)
                progress_bar.update()
        # the graphs' buffer is overwritten by the next generation
        return latents.clone() if graphs is not None else latents

    @staticmethod
    def sampler_generators(generator: GeneratorArg, sampler_generator):
        """The stable sampler's commit-position stream: ``sampler_generator`` when given; else derived from
        ``generator`` (per image for a list), so a seed reproduces the image; else the global RNG (the original)."""
        if sampler_generator is not None or generator is None:
            return sampler_generator
        if isinstance(generator, torch.Generator):
            return derived_generator(generator, b"star-stable-sampler")
        return [derived_generator(g, b"star-stable-sampler") for g in generator]

    # -- inputs -------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        guidance_scale,
        top_k,
        top_p,
        more_smooth,
        use_stable_sampler,
        sampler_version,
        num_images_per_prompt,
        generator,
        sampler_generator,
        max_sequence_length,
        output_type,
        return_dict,
        prompt_embeds,
        prompt_attention_mask,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        negative_pooled_prompt_embeds,
    ) -> int:
        """Every argument check of a call, before any work (a ValueError names the parameter). Returns the number of
        prompts."""
        self._check_required_components()
        check_guidance_scale(guidance_scale)
        check_common_inputs(top_k, top_p, output_type, num_images_per_prompt, return_dict)
        check_bool(more_smooth, "more_smooth")
        self._check_max_sequence_length(max_sequence_length)
        if prompt_embeds is None:
            for name, value in (
                ("prompt_attention_mask", prompt_attention_mask),
                ("pooled_prompt_embeds", pooled_prompt_embeds),
            ):
                if value is not None:
                    raise ValueError(f"`{name}` is only used with `prompt_embeds`.")
            num_prompts = len(check_prompts(prompt))
        else:
            if prompt is not None:
                raise ValueError("pass either `prompt` or `prompt_embeds`, not both.")
            self._check_text_half(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, "")
            num_prompts = prompt_embeds.shape[0]
        limit = self.text_max_length
        if negative_prompt_embeds is None:
            for name, value in (
                ("negative_prompt_attention_mask", negative_prompt_attention_mask),
                ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds),
            ):
                if value is not None:
                    raise ValueError(f"`{name}` is only used with `negative_prompt_embeds`.")
            self._negative_prompts(negative_prompt, num_prompts)
            if prompt_embeds is not None:
                self._check_negative_length(prompt_embeds)
        else:
            if negative_prompt is not None:
                raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
            self._check_text_half(
                negative_prompt_embeds,
                negative_prompt_attention_mask,
                negative_pooled_prompt_embeds,
                "negative_",
                num_prompts,
            )
            if prompt_embeds is not None and negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
                raise ValueError(
                    f"`negative_prompt_embeds` has {negative_prompt_embeds.shape[1]} tokens but `prompt_embeds` "
                    f"has {prompt_embeds.shape[1]}; pad both to the same length."
                )
            encoded_length = max_sequence_length or limit  # the prompt is tokenised padded to this length
            if (
                prompt_embeds is None
                and encoded_length is not None
                and negative_prompt_embeds.shape[1] != encoded_length
            ):
                raise ValueError(
                    f"`negative_prompt_embeds` has {negative_prompt_embeds.shape[1]} tokens but `prompt` is encoded "
                    f"to {encoded_length} (`max_sequence_length`); pass embeddings of that length, or "
                    "`prompt_embeds` too."
                )
        if self.text_encoder is None or self.tokenizer is None:
            if prompt_embeds is None:
                raise ValueError(
                    "`prompt` needs a text encoder and tokenizer, which this pipeline lacks; pass `prompt_embeds` "
                    "and `pooled_prompt_embeds` instead."
                )
            if negative_prompt_embeds is None:
                raise ValueError(
                    "`negative_prompt_embeds` and `negative_pooled_prompt_embeds` are required: this pipeline "
                    'has no text encoder to encode `negative_prompt` (default "").'
                )
        if use_stable_sampler is not None:
            check_bool(use_stable_sampler, "use_stable_sampler")
            if use_stable_sampler and not self.transformer.has_stable_sampler:
                raise ValueError(
                    "`use_stable_sampler=True`, but this checkpoint has no stable-sampler head "
                    "(only star-1024-sampler has one); pass None or False."
                )
        if sampler_version not in STABLE_SAMPLER_VERSIONS:
            raise ValueError(f"`sampler_version` must be one of {STABLE_SAMPLER_VERSIONS}, got {sampler_version!r}.")
        if self.transformer.has_stable_sampler if use_stable_sampler is None else use_stable_sampler:
            self._check_stable_sampler_scales(sampler_version)
        if sampler_generator is not None and not isinstance(sampler_generator, torch.Generator):
            raise ValueError(
                f"`sampler_generator` must be a torch.Generator or None, got {type(sampler_generator).__name__}."
            )
        check_generator(generator, num_prompts * num_images_per_prompt)
        return num_prompts

    def _check_stable_sampler_scales(self, sampler_version: str) -> None:
        """Every stable-sampler scale needs about as many tokens as it has commit steps (the released models start at a
        scale of 441 tokens): with fewer, the schedule's last count goes negative (steps raised to one token take
        more than there are)."""
        start = self.transformer.config.sampler_start_scale
        for si, (h, w) in enumerate(self.scale_schedule()[start:], start):
            steps, _ = stable_sampler_plan(si, sampler_version)
            if min(stable_sampler_counts(h * w, steps)) < 0:
                raise ValueError(
                    f"The stable sampler (`use_stable_sampler`, `sampler_version={sampler_version!r}`) commits scale "
                    f"{si}'s {h * w} tokens in {steps} steps, which needs more tokens: this transformer's "
                    f"`sampler_start_scale` ({start}) is too early for it; pass `use_stable_sampler=False`."
                )

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
        callback_on_step_end: CallbackArg = None,
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
                ``guidance_scale`` at the last (``(1 + t) cond - t uncond`` on logits), in [0, 1e4]. Demo: 4.0.
            top_k, top_p: token filtering (0 disables); the demo uses 600 / 0.8.
            more_smooth: Gumbel-softmax mixture of codes instead of hard tokens (visualisation only; no
                top-k/top-p, and not combined with the stable sampler).
            use_stable_sampler: causal-driven stable sampling from ``transformer.config.sampler_start_scale``
                on; ``None`` = on when the checkpoint has the sampler head.
            sampler_version: the original ``sample_version``: ``"1024"`` (8 steps, 15 from scale 13; the first
                5 steps of scales < 13 propose with the main head) or ``"new"`` (8 sampler-head steps).
            num_images_per_prompt: images per prompt.
            generator: one ``torch.Generator`` (the original's ``g_seed`` stream) or one per image.
            sampler_generator: the stable sampler's commit-position stream (the original's global RNG:
                ``torch.default_generator``); ``None`` derives it from ``generator`` (each image's own for a list), or
                uses the global RNG when ``generator`` is None.
            max_sequence_length: text tokens (default 77 for CLIP, 120 for T5; at most 77 for CLIP, 512 for T5);
                longer prompts are truncated with a warning.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (float (B, 3, H, W) in [0, 1]) or ``"latent"`` (f_hat).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end: called once per scale as ``fn(pipe, scale_index, (h, w), tensors)`` (or a diffusers
                ``PipelineCallback``) with the tensors named in ``callback_on_step_end_tensor_inputs`` (every
                pipeline's contract, ``diffusers_var.pipelines.pipeline_utils``): ``"latents"`` (f_hat), ``"tokens"``
                (None with ``more_smooth``), ``"guided_logits"`` (main head, guided with the ramp, before filtering),
                ``"model_logits"``, ``"next_scale_input"``, and per sampling call of the scale ``"step_logits"``
                (K, B, l, V) guided logits, ``"step_indices"`` (K, B, l), ``"step_confidences"`` (K, B, l, 1) (K = 1 on
                plain scales); it may return a new ``"latents"``.
            callback_on_step_end_tensor_inputs: names from ``pipe._callback_tensor_inputs`` (default ``["latents"]``).
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds: precomputed text features instead of
                ``prompt``, as :meth:`encode_prompt` returns them: hidden states (B, N, text_embed_dim), the padding
                mask (B, N) (1 = real token; default all ones) and the pooled vector (B, text_embed_dim, required).
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds: the same for the
                unconditional half (same shapes); default: ``negative_prompt`` (``""``) through the text encoder.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_prompts = self.check_inputs(
            prompt,
            negative_prompt,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            use_stable_sampler,
            sampler_version,
            num_images_per_prompt,
            generator,
            sampler_generator,
            max_sequence_length,
            output_type,
            return_dict,
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
        )
        self._begin_call(guidance_scale, len(self.scale_schedule()))
        device = self._execution_device
        B = num_prompts * num_images_per_prompt
        sampler_generator = self.sampler_generators(generator, sampler_generator)

        # 1. the text of both guidance halves (conditional rows first)
        text = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            True,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            max_sequence_length,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
        )
        text_hidden, text_mask, text_pooled = (torch.cat((text[i], text[i + 3])) for i in range(3))
        if self._fast_inference:  # static graph inputs in the compute dtype (the blocks cast to it anyway)
            dtype = self.transformer.pos_start.dtype
            text_hidden, text_pooled = text_hidden.to(dtype), text_pooled.to(dtype)
        condition = (text_hidden, text_mask, text_pooled)

        # 2. scale by scale
        latents = self._sample_scales(
            condition,
            B,
            top_k,
            top_p,
            more_smooth,
            use_stable_sampler,
            sampler_version,
            generator,
            sampler_generator,
            callback,
            tensor_names,
        )
        return self._finish(latents, output_type, return_dict)


# ==============================================================================================
# Editing: in-painting / out-painting and image-to-image with STAR (issue 17)
# ==============================================================================================
class _STAREditCall:
    """The text half of a STAR editing call (as :meth:`STARPipeline.__call__` runs it), shared by the two task
    pipelines."""

    def _edit_condition(
        self,
        prompt,
        negative_prompt,
        num_images_per_prompt,
        max_sequence_length,
        prompt_embeds,
        prompt_attention_mask,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        negative_pooled_prompt_embeds,
        device,
    ):
        text = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            True,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            max_sequence_length,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
        )
        text_hidden, text_mask, text_pooled = (torch.cat((text[i], text[i + 3])) for i in range(3))
        if self._fast_inference:  # static graph inputs in the compute dtype (the blocks cast to it anyway)
            dtype = self.transformer.pos_start.dtype
            text_hidden, text_pooled = text_hidden.to(dtype), text_pooled.to(dtype)
        return text_hidden, text_mask, text_pooled


class STARInpaintPipeline(VQEditTokens, _STAREditCall, NextScaleInpaintMixin, STARPipeline):
    r"""Text-guided in-painting and out-painting with STAR, by VAR's zero-shot editing rule.

    The input image is tokenised with the pipeline's VQ-VAE; at every scale the tokens outside the region to generate
    replace the sampled ones before they enter f_hat (and the next scale's input), so the model fills the region in
    context; every random draw still happens as in :class:`STARPipeline`. The mask of a scale: the latent-grid mask
    (the last scale's ``pn x pn``) resized bilinearly (``align_corners=False``) to the scale's grid, the input kept
    where the keep side is ``> 0.5``; scales of at most 3 tokens always keep the input. A pixel mask is first reduced
    to the latent grid (a cell is generated when any of its pixels is white). :meth:`box_mask` makes the original
    notebook's box masks. With the stable sampler the input's tokens are put back after the scale's sampling steps.
    Loads from the same folders as :class:`STARPipeline` (``from_pretrained``) or shares its weights
    (``from_pipe``).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        image_indices: list[torch.Tensor] | None = None,
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
        callback_on_step_end: CallbackArg = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        mask_dilation: int = 0,
    ):
        r"""Re-generate the masked region of ``image`` from text.

        Args:
            prompt: what the edited image shows (or ``prompt_embeds``).
            image: the image to edit: PIL, numpy (H, W, 3) / (B, H, W, 3) or torch (3, H, W) / (B, 3, H, W) in
                [0, 1] (diffusers' ``VaeImageProcessor`` conventions; resized to the pipeline's size), or a list; one
                image for all prompts or one per prompt. Or pass ``image_indices``.
            mask_image: where to generate (white / 1 / True), at the image's size or at the latent grid (the last
                scale's ``pn x pn``, e.g. from :meth:`box_mask`); one for all images or one per prompt.
            image_indices: instead of ``image``, the per-scale tokens ``vqvae.encode_indices`` returns.
            mask_dilation: grow the region to generate by this many latent cells on every side (after a pixel
                mask was reduced to the latent grid; 0, the default, is the notebook's edit). The decoder draws every
                cell from its neighbours too, so a new object drawn into a tight box keeps the old one's edges in the
                kept cells around it: one cell of margin lets it draw its own (README, "Quality on the embedded
                models").
            Everything else: as in :meth:`STARPipeline.__call__`; the callback's ``"tokens"`` are the scale's tokens
            after the input's were put back.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_prompts = self.check_inputs(
            prompt,
            negative_prompt,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            use_stable_sampler,
            sampler_version,
            num_images_per_prompt,
            generator,
            sampler_generator,
            max_sequence_length,
            output_type,
            return_dict,
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
            image=image,
            image_indices=image_indices,
            mask_image=mask_image,
            mask_dilation=mask_dilation,
        )
        schedule = self._edit_schedule()
        self._begin_call(guidance_scale, len(schedule))
        device = self._execution_device
        B = num_prompts * num_images_per_prompt
        sampler_generator = self.sampler_generators(generator, sampler_generator)

        # 1. the text of both guidance halves (conditional rows first)
        condition = self._edit_condition(
            prompt,
            negative_prompt,
            num_images_per_prompt,
            max_sequence_length,
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
            device,
        )
        # 2. the input's tokens and, per scale, where they are kept
        tokens = self.prepare_image_tokens(image, image_indices, schedule, num_prompts, num_images_per_prompt, device)
        keep = self.prepare_mask_keep(mask_image, schedule, num_prompts, num_images_per_prompt, device, mask_dilation)
        # 3. scale by scale, the input's tokens put back where kept
        latents = self._sample_scales(
            condition,
            B,
            top_k,
            top_p,
            more_smooth,
            use_stable_sampler,
            sampler_version,
            generator,
            sampler_generator,
            callback,
            tensor_names,
            forcing=self._token_forcing(tokens, keep),
        )
        return self._finish(latents, output_type, return_dict)

    def check_inputs(self, *args, image=None, image_indices=None, mask_image=None, mask_dilation=0) -> int:
        """:meth:`STARPipeline.check_inputs` (same positional arguments), then the image and mask checks. Returns the
        number of prompts."""
        num_prompts = super().check_inputs(*args)
        per_prompt = signature(STARPipeline.check_inputs).bind(self, *args).arguments["num_images_per_prompt"]
        schedule = self._edit_schedule()
        size = self.check_image_inputs(image, image_indices, schedule, num_prompts, per_prompt)
        self.check_mask_input(mask_image, schedule, size, num_prompts, per_prompt, mask_dilation)
        return num_prompts


class STARImg2ImgPipeline(VQEditTokens, _STAREditCall, NextScaleEditMixin, STARPipeline):
    r"""Text-guided image-to-image with STAR: the input image's tokens are kept for the first scales (its layout and
    colours), the remaining scales are sampled for the prompt.

    ``strength`` is diffusers' (the share of the steps that run): ``int(S * strength)`` of the ``S`` scales are
    sampled; 1.0 ignores the image (the same images as :class:`STARPipeline` for the same seed), 0.0 returns the
    tokenizer's reconstruction. Every scale still makes its random draws. Loads from the same folders as
    :class:`STARPipeline`, or ``STARImg2ImgPipeline.from_pipe(pipe)``.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.5,
        image_indices: list[torch.Tensor] | None = None,
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
        callback_on_step_end: CallbackArg = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ):
        r"""Generate images of ``prompt`` that start from ``image``.

        Args:
            prompt: what the image shows (or ``prompt_embeds``).
            image: the starting image: PIL, numpy or torch in [0, 1] (diffusers' conventions; resized to the
                pipeline's size), or a list; one for all prompts or one per prompt. Or pass ``image_indices``.
            strength: in [0, 1], the share of the scales that are sampled (the rest keep the input's tokens);
                default 0.5.
            image_indices: instead of ``image``, the per-scale tokens ``vqvae.encode_indices`` returns.
            Everything else: as in :meth:`STARPipeline.__call__`.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_prompts = self.check_inputs(
            prompt,
            negative_prompt,
            guidance_scale,
            top_k,
            top_p,
            more_smooth,
            use_stable_sampler,
            sampler_version,
            num_images_per_prompt,
            generator,
            sampler_generator,
            max_sequence_length,
            output_type,
            return_dict,
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
            image=image,
            image_indices=image_indices,
            strength=strength,
        )
        schedule = self._edit_schedule()
        self._begin_call(guidance_scale, len(schedule))
        device = self._execution_device
        B = num_prompts * num_images_per_prompt
        sampler_generator = self.sampler_generators(generator, sampler_generator)

        # 1. the text of both guidance halves (conditional rows first)
        condition = self._edit_condition(
            prompt,
            negative_prompt,
            num_images_per_prompt,
            max_sequence_length,
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            negative_pooled_prompt_embeds,
            device,
        )
        # 2. the input's tokens, kept for the first scales
        tokens = self.prepare_image_tokens(image, image_indices, schedule, num_prompts, num_images_per_prompt, device)
        keep = self.strength_keep(strength, schedule, B, device)
        # 3. scale by scale
        latents = self._sample_scales(
            condition,
            B,
            top_k,
            top_p,
            more_smooth,
            use_stable_sampler,
            sampler_version,
            generator,
            sampler_generator,
            callback,
            tensor_names,
            forcing=self._token_forcing(tokens, keep),
        )
        return self._finish(latents, output_type, return_dict)

    def check_inputs(self, *args, image=None, image_indices=None, strength=0.5) -> int:
        """:meth:`STARPipeline.check_inputs` (same positional arguments), ``strength`` and the image checks. Returns
        the number of prompts."""
        num_prompts = super().check_inputs(*args)
        per_prompt = signature(STARPipeline.check_inputs).bind(self, *args).arguments["num_images_per_prompt"]
        check_finite_number(strength, "strength", 0.0, 1.0)
        self.check_image_inputs(image, image_indices, self._edit_schedule(), num_prompts, per_prompt)
        return num_prompts
