"""InfinityPipeline: text-to-image generation with Infinity (bitwise next-scale prediction)."""

from __future__ import annotations

from contextlib import nullcontext
from inspect import signature
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.utils import logging

from ..loaders import InfinityLoraLoaderMixin
from ..models.bitwise_vae import BitwiseMultiScaleVAE
from ..models.dynamic_resolution import MAX_SIDE, schedule_for_pixels
from ..models.infinity_transformer import InfinityTransformer2DModel
from ..scalars import is_integer
from .fast_inference import CUDAGraphScaleSteps, compile_adaln_blocks_
from .pipeline_utils import (
    UNIFIED_CALLBACK_TENSORS,
    BitwiseEditTokens,
    CallbackArg,
    NextScaleEditMixin,
    NextScaleInpaintMixin,
    NextScalePipeline,
    TokenForcing,
    box_grid_mask,
    check_common_inputs,
    check_finite_number,
    check_generator,
    check_guidance_scale,
    check_num_images_per_prompt,
    check_prompts,
    check_temperature,
    check_text_embeds,
    check_text_encoder_width,
    check_unicode_texts,
    repeat_rows,
    shorten,
    text_encoder_width,
    warn_eager_forcing,
)
from .sampling import (
    GeneratorArg,
    filter_top_k_top_p_,
    nan_where_drawn_from_nonfinite,
    sample_from_logits,
    top_p_mass,
)

logger = logging.get_logger(__name__)
# The original tokenises every prompt to 512 T5 tokens (tools/run_infinity.py), whatever the transformer's
# text_max_length (the rows of its learned unconditional text, which only the rows that take it need)
PROMPT_MAX_TOKENS = 512

# ``forcing(scale_index, bits_BhwK) -> bits``: a task pipeline's replacement of a scale's sampled bits before they
# become codes (in-painting keeps the input image's bits)
BitForcing = Callable[[int, torch.Tensor], torch.Tensor]


def _pad_text(embeds_BSC: torch.Tensor, mask_BS: torch.Tensor, length: int):
    extra = length - embeds_BSC.shape[1]
    return F.pad(embeds_BSC, (0, 0, 0, extra)), F.pad(mask_BS, (0, extra))


class InfinityPipeline(NextScalePipeline, InfinityLoraLoaderMixin):
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
    optional: without them, pass precomputed T5 features (``prompt_embeds``, ``prompt_attention_mask``); a pipeline
    with only them (``transformer=None, vae=None``) computes the features with :meth:`encode_prompt`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = UNIFIED_CALLBACK_TENSORS + ["summed_codes", "bits", "logits"]
    _family = "infinity"
    _per_scale_guidance = True
    _callback_aliases = {"summed_codes": "latents", "bits": "tokens", "logits": "model_logits"}

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Infinity's cfg mixes ``cfg * cond + (1 - cfg) * uncond``: 1 (at every scale) is no guidance."""
        values = self._guidance_scale if isinstance(self._guidance_scale, (list, tuple)) else [self._guidance_scale]
        return self._guidance_scale is not None and any(v != 1.0 for v in values)

    def __init__(
        self,
        transformer: InfinityTransformer2DModel,
        vae: BitwiseMultiScaleVAE,
        text_encoder=None,
        tokenizer=None,
        default_size: list[int] | None = None,
    ):
        super().__init__()
        self._check_component_types(transformer=transformer, vae=vae)
        if transformer is not None and vae is not None and transformer.config.bits_per_token != vae.bits_per_token:
            raise ValueError(
                f"transformer `bits_per_token` ({transformer.config.bits_per_token}) differs from the vae's "
                f"({vae.bits_per_token} = codebook_dim x {vae.patch_factor**2})."
            )
        if transformer is not None:
            check_text_encoder_width(text_encoder, transformer.config.text_dim, "text_dim")
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        if default_size is not None and (
            not isinstance(default_size, (list, tuple))
            or len(default_size) != 2
            or not all(is_integer(v) and 1 <= v <= MAX_SIDE for v in default_size)
        ):
            raise ValueError(
                f"`default_size` must be [height, width], two integers in [1, {MAX_SIDE}] (pixels), "
                f"got {default_size!r}."
            )
        # the size a model was trained for (small embedded models); height/width default to it, else 1024
        self.register_to_config(default_size=[int(v) for v in default_size] if default_size is not None else None)

    def scale_schedule(self, height: int | None = None, width: int | None = None) -> list[tuple[int, int]]:
        """The token grid ``(h, w)`` of every scale for an image of about ``height x width`` pixels (default: the
        pipeline's ``default_size``, else 1024 x 1024)."""
        default_size = self.config.get("default_size")
        default_height, default_width = default_size or (1024, 1024)
        origin = ""
        defaulted = [f"`{name}`" for name, value in (("height", height), ("width", width)) if value is None]
        if defaulted:  # an unsupported size the caller did not give: say where it came from
            source = "the pipeline's `default_size`" if default_size else "1024, as the pipeline has no `default_size`"
            origin = f" ({' and '.join(defaulted)} not given: {source})"
        height = default_height if height is None else height
        width = default_width if width is None else width
        return schedule_for_pixels(height, width, self.vae.pixels_per_token, origin)

    @property
    def text_max_length(self) -> int:
        """The transformer's ``text_max_length`` (rows of its learned unconditional text; 512 for the releases), else
        the tokenizer's: what training tokenises captions to."""
        if self.transformer is not None:
            return self.transformer.config.text_max_length
        return self.tokenizer.model_max_length

    @property
    def prompt_max_length(self) -> int:
        """Most prompt tokens: :data:`PROMPT_MAX_TOKENS` (the original tokenises every prompt to 512), or
        ``text_max_length`` where it is larger."""
        return max(PROMPT_MAX_TOKENS, self.text_max_length)

    # -- text ---------------------------------------------------------------------------------------
    def _encode_texts(
        self, texts: list[str], device, max_length: int, warn: bool = True, name: str = "prompt"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features of ``texts`` as the original computes them: padded to ``max_length``, then trimmed to the
        longest real length, padding zeroed. Returns ``(embeds (B, S, text_dim) float32, mask (B, S) bool)``."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "`prompt`: this pipeline has no text encoder / tokenizer; pass `prompt_embeds` "
                "(and `prompt_attention_mask`) instead."
            )
        # counted untruncated (verbose=False: transformers warned of "indexing errors" past the tokenizer's 77)
        full_lengths = [len(ids) for ids in self.tokenizer(list(texts), verbose=False)["input_ids"]]
        too_long = [i for i, n in enumerate(full_lengths) if n > max_length]
        if too_long and warn:
            logger.warning(
                f"{', '.join(f'`{name}[{i}]`' for i in too_long)} ({shorten(texts[too_long[0]], 60)}"
                f"{', ...' if len(too_long) > 1 else ''}) more than {max_length} tokens: truncated (as the original "
                "does)."
            )
        tokens = self.tokenizer(  # padded on the right: the trim below keeps the first columns
            list(texts),
            max_length=max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            padding_side="right",
        )
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        embeds = self.text_encoder(input_ids=input_ids, attention_mask=mask)[0].float()
        longest = int(mask.sum(dim=1).max())
        return embeds[:, :longest] * mask[:, :longest, None], mask[:, :longest].bool()

    def _fit_learned_unconditional_text(self, texts, embeds, mask, takes_learned):
        """Prompts longer than the learned unconditional text (``text_max_length`` rows) in the rows that take it
        (guidance without a negative prompt for them) are encoded again, truncated to those rows, with a warning: the
        original fails there (the learned rows cannot match the prompt's length); other prompts keep up to 512."""
        if self.transformer is None:
            return embeds, mask
        rows, lengths = self.text_max_length, mask.sum(dim=1).tolist()
        cut = [i for i, (n, learned) in enumerate(zip(lengths, takes_learned)) if learned and n > rows]
        if not cut:
            return embeds, mask
        logger.warning(
            f"prompts {cut} have more tokens than the learned unconditional text's {rows} rows that guidance mixes "
            f"them with: truncated to {rows} tokens (the original fails here; give a `negative_prompt`, or "
            "guidance_scale=1, to keep them whole)."
        )
        short, short_mask = self._encode_texts([texts[i] for i in cut], embeds.device, rows, warn=False)
        embeds, mask = embeds.clone(), mask.clone()
        embeds[cut], mask[cut] = 0, False
        embeds[cut, : short.shape[1]], mask[cut, : short.shape[1]] = short, short_mask
        longest = int(mask.sum(dim=1).max())
        return embeds[:, :longest], mask[:, :longest]

    @staticmethod
    def _rows_taking_learned_text(
        num_rows: int, negatives, negative_prompt_embeds, negative_prompt_attention_mask
    ) -> list[bool]:
        """The rows that guidance mixes with the learned unconditional text: a negative row without real tokens, an
        empty negative prompt, every row where no negatives are given."""
        if negative_prompt_embeds is not None:
            given = negative_prompt_attention_mask
            return [False] * num_rows if given is None else (~given.bool().any(dim=1)).tolist()
        if negatives is not None:
            return [text == "" for text in negatives]
        return [True] * num_rows

    def _check_prompt_embeds_fit_learned_text(
        self, prompt_embeds, prompt_attention_mask, negatives, negative_prompt_embeds, negative_prompt_attention_mask
    ) -> None:
        """Precomputed prompts are not truncated as prompt texts are: one longer than the learned unconditional text
        in a row that takes it has no unconditional rows to match (the transformer would fail mid-call)."""
        takes_learned = self._rows_taking_learned_text(
            len(prompt_embeds), negatives, negative_prompt_embeds, negative_prompt_attention_mask
        )
        if prompt_attention_mask is None:
            lengths = [prompt_embeds.shape[1]] * len(prompt_embeds)
        else:
            lengths = prompt_attention_mask.bool().sum(dim=1).tolist()
        rows = self.text_max_length
        too_long = [i for i, (n, learned) in enumerate(zip(lengths, takes_learned)) if learned and n > rows]
        if too_long:
            raise ValueError(
                f"`prompt_embeds` rows {too_long} have more than the {rows} tokens of the learned unconditional text "
                "(`text_max_length`) that guidance mixes them with: pass `negative_prompt_embeds` for them, at most "
                f"{rows} tokens, or guidance_scale=1."
            )

    @staticmethod
    def _negative_prompts(negative_prompt, batch_size: int) -> list[str] | None:
        """The negative texts, one per prompt (``""``: that row's learned unconditional text), or None when every row
        takes the learned unconditional text (``None`` / ``""``)."""
        if negative_prompt is None or (isinstance(negative_prompt, str) and negative_prompt == ""):
            return None
        negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
        if (
            not isinstance(negatives, (list, tuple))
            or len(negatives) != batch_size
            or not all(isinstance(p, str) for p in negatives)
        ):
            raise ValueError(
                f"`negative_prompt` must be a string or a list with one string per prompt ({batch_size}), "
                f"got {shorten(negative_prompt)}."
            )
        check_unicode_texts(negatives, "negative_prompt", negative_prompt)
        return None if all(p == "" for p in negatives) else list(negatives)

    def _check_max_sequence_length(self, max_sequence_length) -> None:
        if max_sequence_length is not None and (
            not is_integer(max_sequence_length) or not 1 <= max_sequence_length <= self.prompt_max_length
        ):
            raise ValueError(
                f"`max_sequence_length` must be an integer in [1, {self.prompt_max_length}] or None, "
                f"got {max_sequence_length!r}."
            )

    def _check_text_half(self, embeds, mask, prefix: str, batch_size: int | None = None) -> None:
        """Validate one half of precomputed text features (a negative row without real tokens: the learned
        unconditional text). Masks pad on the right: the original keeps each row's first ``len`` features, and the
        learned unconditional text replaces them by its first ``len`` rows, position by position."""
        # the transformer's width, or on a text-only pipeline the text encoder's
        width = (
            self.transformer.config.text_dim if self.transformer is not None else text_encoder_width(self.text_encoder)
        )
        names = (f"{prefix}prompt_embeds", f"{prefix}prompt_attention_mask")
        check_text_embeds(
            embeds, mask, width, *names, batch_size, self.prompt_max_length, empty_rows=bool(prefix), right_padded=True
        )

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
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ):
        r"""T5 features of the prompts (and of the negative prompts), as the original computes them (padded to the
        tokenizer maximum, then trimmed to the longest real length). Works on a pipeline with only a text encoder and
        tokenizer.

        Args:
            prompt: text or list of texts (or ``prompt_embeds``).
            device: where the features go (default: the execution device).
            num_images_per_prompt: rows per prompt (repeated consecutively).
            do_classifier_free_guidance: also encode ``negative_prompt``.
            negative_prompt: ``None`` or ``""``: the learned unconditional text, which the transformer holds
                (``negative_prompt_embeds`` is then returned as ``None``); otherwise one text, or one per prompt
                (a ``""`` among them: that row's learned unconditional text, returned as a row without real tokens
                in ``negative_prompt_attention_mask``).
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask: precomputed
                features replace either half.
            max_sequence_length: text tokens kept (default 512, as the original tokenises); longer prompts are
                truncated with a warning.

        Returns ``(prompt_embeds (B, S, text_dim) float32, prompt_attention_mask (B, S) bool, negative_prompt_embeds,
        negative_prompt_attention_mask)`` with ``B = len(prompt) * num_images_per_prompt``.
        """
        check_num_images_per_prompt(num_images_per_prompt)
        self._check_max_sequence_length(max_sequence_length)
        if prompt_embeds is not None:
            self._check_text_half(prompt_embeds, prompt_attention_mask, "")
        if negative_prompt_embeds is not None:
            self._check_text_half(negative_prompt_embeds, negative_prompt_attention_mask, "negative_")
        device = device or self._execution_device
        max_length = self.prompt_max_length if max_sequence_length is None else int(max_sequence_length)
        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self._encode_texts(check_prompts(prompt), device, max_length)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.bool, device=prompt_embeds.device)
        negatives = (
            self._negative_prompts(negative_prompt, prompt_embeds.shape[0]) if do_classifier_free_guidance else None
        )
        if prompt is not None and do_classifier_free_guidance:
            takes_learned = self._rows_taking_learned_text(
                len(prompt_embeds), negatives, negative_prompt_embeds, negative_prompt_attention_mask
            )
            prompt_embeds, prompt_attention_mask = self._fit_learned_unconditional_text(
                check_prompts(prompt), prompt_embeds, prompt_attention_mask, takes_learned
            )
        if negative_prompt_embeds is None and negatives is not None:
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_texts(
                negatives, device, max_length, name="negative_prompt"
            )
            empty = torch.tensor([text == "" for text in negatives], device=negative_prompt_embeds.device)
            negative_prompt_attention_mask = negative_prompt_attention_mask & ~empty[:, None]  # the learned one
            negative_prompt_embeds = negative_prompt_embeds * negative_prompt_attention_mask[..., None]
        elif negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.bool, device=negative_prompt_embeds.device
            )
        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_attention_mask = None
        prompt_embeds = repeat_rows(prompt_embeds, num_images_per_prompt, device)
        prompt_attention_mask = repeat_rows(prompt_attention_mask.bool(), num_images_per_prompt, device)
        negative_prompt_embeds = repeat_rows(negative_prompt_embeds, num_images_per_prompt, device)
        if negative_prompt_attention_mask is not None:
            negative_prompt_attention_mask = repeat_rows(
                negative_prompt_attention_mask.bool(), num_images_per_prompt, device
            )
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    # -- fast inference ------------------------------------------------------------------------------
    def enable_fast_inference(
        self,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        compile_decoder: bool | str = False,
        compile_blocks: bool | str = False,
        fp8: bool = False,
    ) -> "InfinityPipeline":
        """Speed switch for GPUs (as :meth:`VARPipeline.enable_fast_inference`). The transformer (text pooling and
        projection, blocks), the VAE decoder and the T5 encoder run in ``dtype`` (bf16 by default); the transformer's
        ``_keep_in_fp32_modules`` (bit head, its AdaLN norm, the text RMSNorm) stay float32, as do the running latent
        and the sampler. On CUDA each scale's transformer step is a CUDA graph, captured on the first call for a
        (rows, text length, scale schedule) and replayed after (a prompt of another token length captures another
        set; at most ``graph_cache_size`` are kept); the text encoding, the AdaLN modulations and every block's text
        keys / values are computed once per generation inside the first scale's graph. With a CUDA
        ``torch.Generator`` (or ``generator=None``) and images of at most 16 x 16 tokens at the last scale
        (``fast_inference.WHOLE_SCALE_SAMPLING_MAX_TOKENS``) the whole scale is one graph, sampling included, as for
        VAR (a seed gives the eager sampler's images; other guidance, ``tau`` and ``top_p`` values replay the same
        graphs); larger images, a CPU generator or a list of generators keep sampling eager after the graphed
        transformer step. On the CPU it only casts: with ``dtype=torch.float32`` the images are the eager ones.
        ``compile_decoder``: channels-last ``torch.compile`` of the VAE decoder (``True``, or a torch.compile mode
        as for :meth:`VARPipeline.enable_fast_inference`). ``compile_blocks``:
        ``torch.compile`` of each block's elementwise work (norms, modulation, q/k normalisation, 2-D RoPE, gating),
        fused before the graphs are captured (``True`` / ``"dynamic"``, ``"static-tokens"`` or ``"static"`` as for
        VAR). ``fp8``: float8 matmuls in the blocks' self-attention and FFN at scales of at least 2,048 token rows (as
        for VAR; the cross-attention stays in ``dtype``). Returns the pipeline.
        """
        self._check_fast_inference_args(
            dtype, cuda_graphs=cuda_graphs, compile_decoder=compile_decoder, compile_blocks=compile_blocks, fp8=fp8
        )
        self._cast_for_fast_inference(dtype, (self.vae.decoder,), compile_decoder)
        if compile_blocks:
            compile_adaln_blocks_(self.transformer, compile_blocks)
        return self._set_fast_inference(True, cuda_graphs, dtype, fp8)

    @staticmethod
    def _bit_logits(raw_logits: torch.Tensor, B: int, mix) -> torch.Tensor:
        """The logits a scale draws from: tau before the guidance mix, times 1 / tau as the original (bit-exact).
        ``mix``: ``(cfg, 1 - cfg, 1 / tau, whether cfg != 1)`` as Python numbers, or as device scalars read inside a
        CUDA graph (the same float32 products). Without guidance the unconditional half (if any) only fills its KV
        cache."""
        cfg, uncond_weight, inverse_tau, mixes = mix
        scaled = raw_logits.mul(inverse_tau)
        if raw_logits.shape[0] == B:  # no unconditional rows
            return scaled
        if isinstance(mixes, torch.Tensor):
            return torch.where(mixes, cfg * scaled[:B] + uncond_weight * scaled[B:], scaled[:B])
        return cfg * scaled[:B] + uncond_weight * scaled[B:] if mixes else scaled[:B]

    @staticmethod
    def _mix_tables(cfg_list, tau_list, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_bit_logits`'s ``mix`` of every scale as device tables: float32 ``(S, 3)`` rows ``[cfg, 1 - cfg,
        1 / tau]`` (rounded from the Python values, as the eager products round them) and bool ``(S,)``."""
        values = [[cfg, 1 - cfg, 1 / tau] for cfg, tau in zip(cfg_list, tau_list)]
        mixes = [cfg != 1.0 for cfg in cfg_list]
        return (
            torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True),
            torch.tensor(mixes).to(device, non_blocking=True),
        )

    def _sample_scale(
        self,
        si: int,
        raw_logits: torch.Tensor,
        latents: torch.Tensor,
        mix,
        top_k: int,
        top_p: float,
        generator: GeneratorArg,
        schedule,
        keep_logits: bool,
        forcing: BitForcing | None = None,
        top_p_mass: torch.Tensor | None = None,
    ) -> tuple:
        """Guidance, top-k / top-p, the draw of every bit, the forcing and the running sum's update (in place in
        ``latents``) of scale ``si``: eagerly, or inside a whole-scale CUDA graph (``mix`` and ``1 - top_p`` then come
        as device tensors). Returns ``(next scale's input or None, bits (B, h*w, bits), guided logits if
        keep_logits)``."""
        B, (h, w) = latents.shape[0], schedule[si]
        bits_per_token, vae = self.transformer.config.bits_per_token, self.vae
        logits = self._bit_logits(raw_logits, B, mix).reshape(B, h * w * bits_per_token, 2)
        guided_logits = logits.view(B, h * w, bits_per_token, 2).clone() if keep_logits else None
        filter_top_k_top_p_(logits, top_k, top_p, top_p_mass=top_p_mass)
        bits, confidence = sample_from_logits(logits, generator, return_confidence=True)
        bits, confidence = bits.view(B, h, w, bits_per_token), confidence.view(B, h, w, bits_per_token)
        if forcing is not None:  # kept positions: the input's bits, and (finite) stand-in probabilities
            bits, confidence = forcing(si, bits), forcing(si, confidence)
        codes = nan_where_drawn_from_nonfinite(
            vae.bits_to_codes(vae.token_bits_to_latent_bits(bits)), vae.token_bits_to_latent_bits(confidence)
        )
        latents.copy_(vae.next_scale_input(latents, codes, None)[0])
        return self._next_scale_input(latents, si, schedule), bits.view(B, h * w, bits_per_token), guided_logits

    def _sampling_graphs(
        self, condition, latents, schedule, tables, top_k: int, top_p: float, keep_logits: bool, forcing
    ) -> CUDAGraphScaleSteps | None:
        """The whole-scale CUDA graphs of a generation (transformer step, guidance, top-k / top-p, the draws, the
        forcing and the running sum's update in one replay per scale), fed with this generation's condition, mix
        ``tables`` (:meth:`_mix_tables`) and top-p; ``None`` when graphs are off."""
        guided = condition[0].shape[0] == 2 * latents.shape[0]

        def sample_scale(si, raw_logits, latents, generator, forcing, mix_S3, mixes_S, removable_mass):
            next_input, *outputs = self._sample_scale(
                si,
                raw_logits,
                latents,
                (*mix_S3[si], mixes_S[si]),
                top_k,
                0.0,
                generator,
                schedule,
                keep_logits,
                forcing,
                removable_mass if top_p > 0 else None,
            )
            next_rows = None if next_input is None else self._guidance_rows(next_input, guided)
            return next_rows, raw_logits, *outputs

        parameters = (*tables, top_p_mass(top_p, latents.device))
        key = ("infinity", top_k, top_p > 0, keep_logits)
        return self._whole_scale_graphs(
            key, latents.device, condition, parameters, schedule, latents, sample_scale, forcing
        )

    def _sample_scales(
        self,
        condition,
        B: int,
        schedule,
        tau,
        top_k: int,
        top_p: float,
        generator: GeneratorArg,
        callback=None,
        tensor_names: list[str] = (),
        forcing: BitForcing | None = None,
    ) -> torch.Tensor:
        """The scale loop of a generation of ``B`` images with ``condition`` (the text of every row; 2B rows with
        guidance); returns the final summed codes. ``forcing`` (task pipelines) replaces bits before they
        become codes.

        On the fast path with a CUDA generator each scale is one CUDA graph replay, sampling included; otherwise the
        transformer step (a graph replay, or eager) is followed by the eager sampler."""
        num_scales = len(schedule)
        guided = condition[0].shape[0] == 2 * B
        cfg_state = self._guidance_state()
        cfg_list = check_guidance_scale(self._guidance_scale, num_scales)
        tau_list = check_temperature(tau, num_scales, "tau")
        device = condition[0].device
        keep_logits = callback is not None
        vae = self.vae
        latents = torch.zeros(  # channels-last: the original's sum of its codes' channels-last views
            B, vae.config.codebook_dim, *vae.latent_schedule(schedule)[-1], device=device, dtype=torch.float32
        ).contiguous(memory_format=torch.channels_last)
        graphs, graph_generator = None, None
        if self._samples_in_graphs(schedule):
            graph_generator = self._graph_sampling_generator(device, generator)
        if graph_generator is not None and forcing is not None and not isinstance(forcing, TokenForcing):
            warn_eager_forcing(self)  # an arbitrary hook cannot be captured: sampling stays eager, said once
            graph_generator = None
        if graph_generator is not None:
            tables = self._mix_tables(cfg_list, tau_list, device)
            graphs = self._sampling_graphs(condition, latents, schedule, tables, top_k, top_p, keep_logits, forcing)
        if graphs is not None:
            latents = graphs.latents
        else:
            transformer_step = self._transformer_steps(condition, schedule, device)
        scale_input = None
        with (
            self.progress_bar(total=num_scales) as progress_bar,
            graphs.borrow_generator_state(graph_generator) if graphs is not None else nullcontext(),
        ):
            for si, (h, w) in enumerate(schedule):
                if self.interrupt:
                    break
                if self._guidance_changed(cfg_state):  # a callback changed the guidance (or its list in place)
                    cfg_state, cfg_list = (
                        self._guidance_state(),
                        check_guidance_scale(self._guidance_scale, num_scales),
                    )
                    if not guided and any(c != 1.0 for c in cfg_list[si:]):
                        raise ValueError(
                            f"a callback set `guidance_scale` to {shorten(self._guidance_scale)}, but this call "
                            "started without guidance (1 at every scale), so it runs no unconditional rows to guide "
                            "with; start the call with the guidance wanted at some scale (a callback may then change "
                            "it)."
                        )
                    if graphs is not None:
                        for static, table in zip(
                            graphs.shared_inputs[len(condition) :], self._mix_tables(cfg_list, tau_list, device)
                        ):
                            static.copy_(table)
                if graphs is not None:  # the whole scale, sampling included, is one graph replay
                    model_logits, bits, guided_logits = graphs(si)
                    next_input = graphs.scale_inputs[si + 1][:B] if si + 1 < num_scales else None
                else:
                    model_logits = transformer_step(si, scale_input)
                    mix = (cfg_list[si], 1 - cfg_list[si], 1 / tau_list[si], guided and cfg_list[si] != 1.0)
                    next_input, bits, guided_logits = self._sample_scale(
                        si, model_logits, latents, mix, top_k, top_p, generator, schedule, keep_logits, forcing
                    )

                if callback is not None:
                    tensors = dict(
                        latents=latents,
                        tokens=bits,
                        guided_logits=guided_logits,
                        model_logits=model_logits.clone(),  # a graph output is overwritten
                        next_scale_input=next_input,
                    )
                    new_latents = self._step_callback(callback, tensor_names, si, (h, w), tensors)
                    if new_latents is not None:  # into the running sum (channels-last: the kernels follow the layout)
                        latents, next_input = self._take_callback_latents(
                            new_latents,
                            latents,
                            si,
                            graphs,
                            lambda summed: self._next_scale_input(summed, si, schedule),
                            lambda x: self._guidance_rows(x, guided),
                            in_place=True,
                        )
                if graphs is None and next_input is not None:
                    scale_input = self._guidance_rows(next_input, guided)
                progress_bar.update()
        # the graphs' buffer is overwritten by the next generation
        return latents.clone() if graphs is not None else latents

    def _next_scale_input(self, summed: torch.Tensor, scale_index: int, schedule) -> torch.Tensor | None:
        """The input tokens (B, h'*w', bits_per_token) of the scale after ``scale_index``."""
        if scale_index == len(schedule) - 1:
            return None
        return self.vae.scale_input_from_summed(summed, schedule[scale_index + 1])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Summed codes (B, d, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        decoder_dtype = next(self.vae.decoder.parameters()).dtype  # the decoder alone may be cast (fast inference)
        # channels-last as the original's decoder input: its CPU convolution kernels round by the layout
        latents = latents.to(decoder_dtype).contiguous(memory_format=torch.channels_last)
        return self.vae.decode(latents).sample.float()

    # -- inputs -------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        guidance_scale,
        tau,
        top_k,
        top_p,
        num_images_per_prompt,
        generator,
        max_sequence_length,
        output_type,
        return_dict,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
    ) -> tuple[list, int]:
        """Every argument check of a call, before any work (a ValueError names the parameter). Returns the scale
        schedule and the number of prompts."""
        self._check_required_components()
        check_common_inputs(top_k, top_p, output_type, num_images_per_prompt, return_dict)
        schedule = self.scale_schedule(height, width)
        guided = any(c != 1.0 for c in check_guidance_scale(guidance_scale, len(schedule)))
        check_temperature(tau, len(schedule), "tau")
        self._check_max_sequence_length(max_sequence_length)
        if prompt_embeds is None:
            if prompt_attention_mask is not None:
                raise ValueError("`prompt_attention_mask` is only used with `prompt_embeds`.")
            num_prompts = len(check_prompts(prompt))
        else:
            if prompt is not None:
                raise ValueError("pass either `prompt` or `prompt_embeds`, not both.")
            self._check_text_half(prompt_embeds, prompt_attention_mask, "")
            num_prompts = prompt_embeds.shape[0]
        negatives = self._negative_prompts(negative_prompt, num_prompts)
        if negative_prompt_embeds is not None:
            if negative_prompt is not None:
                raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
            self._check_text_half(negative_prompt_embeds, negative_prompt_attention_mask, "negative_", num_prompts)
        elif negative_prompt_attention_mask is not None:
            raise ValueError("`negative_prompt_attention_mask` is only used with `negative_prompt_embeds`.")
        if prompt_embeds is not None and guided and self.transformer is not None:
            self._check_prompt_embeds_fit_learned_text(
                prompt_embeds, prompt_attention_mask, negatives, negative_prompt_embeds, negative_prompt_attention_mask
            )
        if self.text_encoder is None or self.tokenizer is None:
            if prompt_embeds is None:
                raise ValueError(
                    "`prompt` needs a text encoder and tokenizer, which this pipeline lacks; pass `prompt_embeds` "
                    "(and `prompt_attention_mask`) instead."
                )
            if negatives is not None:
                raise ValueError(
                    "`negative_prompt` needs a text encoder and tokenizer, which this pipeline lacks; pass "
                    "`negative_prompt_embeds` instead (or nothing for the learned unconditional text)."
                )
        check_generator(generator, num_prompts * num_images_per_prompt)
        return schedule, num_prompts

    def prepare_condition(self, embeds, mask, negative_embeds, negative_mask, guided: bool):
        """The transformer's condition ``(text_embeds, text_mask, drop_text)`` of every row: the prompts, then (with
        guidance) the negatives, padded to one length; rows without a negative (no negatives at all, or a negative
        row without real tokens) use the learned unconditional text (``drop_text``) at the length of their prompt,
        as the original does."""
        B = embeds.shape[0]
        if not guided:
            return embeds, mask, torch.zeros(B, dtype=torch.bool, device=embeds.device)
        if negative_embeds is None:
            negative_embeds, negative_mask = embeds, mask
            unconditional_B = torch.ones(B, dtype=torch.bool, device=embeds.device)
        else:
            negative_embeds, negative_mask = negative_embeds.to(embeds.dtype), negative_mask.bool()
            unconditional_B = ~negative_mask.any(dim=1)
        length = max(embeds.shape[1], negative_embeds.shape[1])
        embeds, mask = _pad_text(embeds, mask, length)
        negative_embeds, negative_mask = _pad_text(negative_embeds, negative_mask, length)
        # the learned empty text replaces these rows inside the transformer, at their prompt's length
        negative_embeds = torch.where(unconditional_B[:, None, None], embeds, negative_embeds)
        negative_mask = torch.where(unconditional_B[:, None], mask, negative_mask)
        drop_text = torch.cat((torch.zeros_like(unconditional_B), unconditional_B))
        return torch.cat((embeds, negative_embeds)), torch.cat((mask, negative_mask)), drop_text

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
        callback_on_step_end: CallbackArg = None,
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
                one text, or one per prompt (``""`` among them: that row's learned unconditional text).
            height, width: requested size in pixels (default: the pipeline's ``default_size`` if set, else
                1024 x 1024); mapped to the nearest aspect-ratio template and preset
                (unsupported sizes raise and list the supported ones).
            guidance_scale: the original ``cfg``, on logits: ``cfg * cond + (1 - cfg) * uncond`` (1 = off,
                no unconditional branch), in [0, 1e4]. A list gives one value per scale.
            tau: temperature dividing the logits (>= 1e-4); a list gives one value per scale. 2B notebooks: 0.5.
            top_k, top_p: filtering of the two logits of every bit (``top_k=1``: deterministic).
            num_images_per_prompt: images per prompt.
            generator: one ``torch.Generator`` (original draw order) or one per image.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (float (B, 3, H, W) in [0, 1]) or ``"latent"`` (the
                summed codes (B, d, h, w) fed to the VAE decoder).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end: called once per scale as ``fn(pipe, scale_index, (h, w), tensors)`` (or a diffusers
                ``PipelineCallback``) with the tensors named in ``callback_on_step_end_tensor_inputs`` (every
                pipeline's contract, ``diffusers_var.pipelines.pipeline_utils``): ``"latents"`` (the summed codes),
                ``"tokens"`` (bits (B, h*w, bits_per_token)), ``"guided_logits"`` ((B, h*w, bits_per_token, 2), after
                tau and guidance), ``"model_logits"`` (raw head logits of all rows), ``"next_scale_input"``; it may
                return a new ``"latents"``. Guidance changed by a callback applies from the next scale if guidance was
                on when the call began (else there are no unconditional rows).
            callback_on_step_end_tensor_inputs: names from ``pipe._callback_tensor_inputs`` (default ``["latents"]``).
            max_sequence_length: text tokens kept (default 512, as the original tokenises); longer prompts
                are truncated with a warning.
            prompt_embeds, prompt_attention_mask: precomputed T5 features (B, S, text_dim) instead of ``prompt``, with
                their padding mask (B, S) (True / 1 = real token, padding on the right; default all real), as
                :meth:`encode_prompt` returns them.
            negative_prompt_embeds, negative_prompt_attention_mask: the same for the unconditional half (any length
                up to 512; a row whose mask has no real token takes the learned unconditional text);
                default: ``negative_prompt``, else the learned unconditional text.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        schedule, num_prompts = self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            guidance_scale,
            tau,
            top_k,
            top_p,
            num_images_per_prompt,
            generator,
            max_sequence_length,
            output_type,
            return_dict,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
        )
        num_scales = len(schedule)
        self._begin_call(guidance_scale, num_scales)
        device = self._execution_device
        guided = any(c != 1.0 for c in check_guidance_scale(guidance_scale, num_scales))

        # 1. the text of every row (conditional rows first), encoded by the transformer at the first scale
        embeds, mask, negative_embeds, negative_mask = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            guided,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            max_sequence_length,
            prompt_attention_mask,
            negative_prompt_attention_mask,
        )
        condition = self.prepare_condition(embeds, mask, negative_embeds, negative_mask, guided)

        # 2. scale by scale
        latents = self._sample_scales(
            condition,
            num_prompts * num_images_per_prompt,
            schedule,
            tau,
            top_k,
            top_p,
            generator,
            callback,
            tensor_names,
        )
        return self._finish(latents, output_type, return_dict)


# ==============================================================================================
# Editing: in-painting / out-painting and image-to-image with Infinity (issue 17)
# ==============================================================================================
class _InfinityEditCall:
    """What Infinity's two task pipelines share: the schedule of ``height`` / ``width`` and the text half of a call
    (as :meth:`InfinityPipeline.__call__` runs it). Listed before the editing mixin among the bases (it overrides
    its ``_edit_schedule``)."""

    def _edit_schedule(self, height=None, width=None) -> list[tuple[int, int]]:
        return [tuple(hw) for hw in self.scale_schedule(height, width)]

    def _edit_condition(
        self,
        prompt,
        negative_prompt,
        guidance_scale,
        num_scales,
        num_images_per_prompt,
        max_sequence_length,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        device,
    ):
        guided = any(c != 1.0 for c in check_guidance_scale(guidance_scale, num_scales))
        embeds, mask, negative_embeds, negative_mask = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            guided,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            max_sequence_length,
            prompt_attention_mask,
            negative_prompt_attention_mask,
        )
        return self.prepare_condition(embeds, mask, negative_embeds, negative_mask, guided)


class InfinityInpaintPipeline(BitwiseEditTokens, _InfinityEditCall, NextScaleInpaintMixin, InfinityPipeline):
    r"""Text-guided in-painting and out-painting with Infinity, by VAR's zero-shot editing rule on bits.

    The input image is tokenised with the pipeline's bitwise VAE (its bit labels); at every scale the bits of the
    tokens outside the region to generate replace the sampled ones before they become codes (and the next scale's
    input), so the model fills the region in context; every random draw still happens as in
    :class:`InfinityPipeline`. The mask of a scale: the latent-grid mask (the last scale's ``h x w`` tokens) resized
    bilinearly (``align_corners=False``) to the scale's grid, the input kept where the keep side is ``> 0.5``;
    scales of at most 3 tokens always keep the input. A pixel mask is first reduced to the latent grid (a cell is
    generated when any of its pixels is white). :meth:`box_mask` makes the original notebook's box masks. Loads from
    the same folders as :class:`InfinityPipeline` (``from_pretrained``) or shares its weights (``from_pipe``).
    """

    def box_mask(
        self,
        y0: float,
        x0: float,
        y1: float,
        x1: float,
        inpainting: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """The latent-grid mask (h, w) bool (True = generate) of the original notebook's box rule, on the token grid of
        the last scale for ``height`` x ``width`` (default: the pipeline's size); see
        :meth:`NextScaleInpaintMixin.box_mask`."""
        return box_grid_mask(self._edit_schedule(height, width)[-1], y0, x0, y1, x1, inpainting)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        image_indices: list[torch.Tensor] | None = None,
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
        callback_on_step_end: CallbackArg = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        mask_dilation: int = 0,
    ):
        r"""Re-generate the masked region of ``image`` from text.

        Args:
            prompt: what the edited image shows (or ``prompt_embeds``).
            image: the image to edit: PIL, numpy (H, W, 3) / (B, H, W, 3) or torch (3, H, W) / (B, 3, H, W) in
                [0, 1] (diffusers' ``VaeImageProcessor`` conventions), resized to the size of ``height`` x ``width``'s
                template; one image for all prompts or one per prompt. Or pass ``image_indices``.
            mask_image: where to generate (white / 1 / True), at the image's size or at the latent grid (the last
                scale's token grid, e.g. from :meth:`box_mask`); one for all images or one per prompt.
            image_indices: instead of ``image``, the input's bit labels as ``vae.encode(images,
                scale_schedule).bit_labels`` returns them (per scale (B, h, w, codebook_dim)).
            mask_dilation: grow the region to generate by this many latent cells on every side (after a pixel
                mask was reduced to the latent grid; 0, the default, is the notebook's edit). The decoder draws every
                cell from its neighbours too, so a new object drawn into a tight box keeps the old one's edges in the
                kept cells around it: one cell of margin lets it draw its own (README, "Quality on the embedded
                models").
            height, width: the output size (default: the pipeline's ``default_size``, else 1024 x 1024), as in
                :meth:`InfinityPipeline.__call__`.
            Everything else: as in :meth:`InfinityPipeline.__call__`; the callback's ``"tokens"`` are the scale's bits
            after the input's were put back.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        schedule, num_prompts = self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            guidance_scale,
            tau,
            top_k,
            top_p,
            num_images_per_prompt,
            generator,
            max_sequence_length,
            output_type,
            return_dict,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            image=image,
            image_indices=image_indices,
            mask_image=mask_image,
            mask_dilation=mask_dilation,
        )
        self._begin_call(guidance_scale, len(schedule))
        device = self._execution_device

        # 1. the text of every row (conditional rows first)
        condition = self._edit_condition(
            prompt,
            negative_prompt,
            guidance_scale,
            len(schedule),
            num_images_per_prompt,
            max_sequence_length,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            device,
        )
        # 2. the input's bits and, per scale, where they are kept
        tokens = self.prepare_image_tokens(image, image_indices, schedule, num_prompts, num_images_per_prompt, device)
        keep = self.prepare_mask_keep(mask_image, schedule, num_prompts, num_images_per_prompt, device, mask_dilation)
        # 3. scale by scale, the input's bits put back where kept
        latents = self._sample_scales(
            condition,
            num_prompts * num_images_per_prompt,
            schedule,
            tau,
            top_k,
            top_p,
            generator,
            callback,
            tensor_names,
            forcing=self._token_forcing(tokens, keep),
        )
        return self._finish(latents, output_type, return_dict)

    def check_inputs(
        self, *args, image=None, image_indices=None, mask_image=None, mask_dilation=0
    ) -> tuple[list, int]:
        """:meth:`InfinityPipeline.check_inputs` (same positional arguments), then the image and mask checks. Returns
        the scale schedule and the number of prompts."""
        schedule, num_prompts = super().check_inputs(*args)
        per_prompt = signature(InfinityPipeline.check_inputs).bind(self, *args).arguments["num_images_per_prompt"]
        size = self.check_image_inputs(image, image_indices, schedule, num_prompts, per_prompt)
        self.check_mask_input(mask_image, schedule, size, num_prompts, per_prompt, mask_dilation)
        return schedule, num_prompts


class InfinityImg2ImgPipeline(BitwiseEditTokens, _InfinityEditCall, NextScaleEditMixin, InfinityPipeline):
    r"""Text-guided image-to-image with Infinity: the input image's bits are kept for the first scales (its layout
    and colours), the remaining scales are sampled for the prompt.

    ``strength`` is diffusers' (the share of the steps that run): ``int(S * strength)`` of the ``S`` scales are
    sampled; 1.0 ignores the image (the same images as :class:`InfinityPipeline` for the same seed), 0.0 returns the
    tokenizer's reconstruction. Every scale still makes its random draws. Loads from the same folders as
    :class:`InfinityPipeline`, or ``InfinityImg2ImgPipeline.from_pipe(pipe)``.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.5,
        image_indices: list[torch.Tensor] | None = None,
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
        callback_on_step_end: CallbackArg = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ):
        r"""Generate images of ``prompt`` that start from ``image``.

        Args:
            prompt: what the image shows (or ``prompt_embeds``).
            image: the starting image: PIL, numpy or torch in [0, 1] (diffusers' conventions), resized to the size of
                ``height`` x ``width``'s template; one for all prompts or one per prompt. Or pass ``image_indices``.
            strength: in [0, 1], the share of the scales that are sampled (the rest keep the input's bits);
                default 0.5.
            image_indices: instead of ``image``, the bit labels ``vae.encode(images, scale_schedule).bit_labels``
                returns.
            Everything else: as in :meth:`InfinityPipeline.__call__`.
        """
        callback, tensor_names = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        schedule, num_prompts = self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            guidance_scale,
            tau,
            top_k,
            top_p,
            num_images_per_prompt,
            generator,
            max_sequence_length,
            output_type,
            return_dict,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            image=image,
            image_indices=image_indices,
            strength=strength,
        )
        self._begin_call(guidance_scale, len(schedule))
        device = self._execution_device
        B = num_prompts * num_images_per_prompt

        # 1. the text of every row (conditional rows first)
        condition = self._edit_condition(
            prompt,
            negative_prompt,
            guidance_scale,
            len(schedule),
            num_images_per_prompt,
            max_sequence_length,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            device,
        )
        # 2. the input's bits, kept for the first scales
        tokens = self.prepare_image_tokens(image, image_indices, schedule, num_prompts, num_images_per_prompt, device)
        keep = self.strength_keep(strength, schedule, B, device)
        # 3. scale by scale
        latents = self._sample_scales(
            condition,
            B,
            schedule,
            tau,
            top_k,
            top_p,
            generator,
            callback,
            tensor_names,
            forcing=self._token_forcing(tokens, keep),
        )
        return self._finish(latents, output_type, return_dict)

    def check_inputs(self, *args, image=None, image_indices=None, strength=0.5) -> tuple[list, int]:
        """:meth:`InfinityPipeline.check_inputs` (same positional arguments), ``strength`` and the image checks.
        Returns the scale schedule and the number of prompts."""
        schedule, num_prompts = super().check_inputs(*args)
        per_prompt = signature(InfinityPipeline.check_inputs).bind(self, *args).arguments["num_images_per_prompt"]
        check_finite_number(strength, "strength", 0.0, 1.0)
        self.check_image_inputs(image, image_indices, schedule, num_prompts, per_prompt)
        return schedule, num_prompts
