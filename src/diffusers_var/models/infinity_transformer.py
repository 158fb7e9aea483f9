"""InfinityTransformer2DModel: text-conditioned bitwise next-scale prediction (FoundationVision/Infinity)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .blocks import (
    AdaLNHeadNorm,
    AdaLNModulation,
    AdaLNSelfAttentionBlock,
    ExternalBiasLinear,
    FeedForward,
    KVCache,
    LayerKVCache,
    Rotary2D,
    block_causal_mask_from_counts,
    check_decoding_step,
    init_adaln_transformer_weights_,
    level_ids_from_counts,
    may_read_values,
    memoized,
)
from .dynamic_resolution import normalize_schedule, rope_grid_for_schedule
from .loading import CheckedLoadingMixin


# ----------------------------------------------------------------------------------------------
# Infinity's grid RoPE, text cross-attention and the AdaLN block that uses it (Infinity only)
# ----------------------------------------------------------------------------------------------
def normalized_grid_positions(height: int, width: int, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row / column position of every token of an ``height x width`` map (row-major) on a reference grid:
    ``round(i * H_ref / height)`` in float32 with round-half-to-even, so every scale spans the same grid."""
    rows = (torch.arange(height) * (grid_hw[0] / height)).round()
    cols = (torch.arange(width) * (grid_hw[1] / width)).round()
    return rows[:, None].expand(height, width).reshape(-1), cols[None, :].expand(height, width).reshape(-1)


def rope_2d_cos_sin(
    scale_hw: Sequence[tuple[int, int]], grid_hw: tuple[int, int], head_dim: int, base: float = 10000.0
):
    """cos / sin tables, each (L, head_dim // 2), for all scales of a schedule concatenated (row-major)."""
    half = head_dim // 2
    # int64 exponents as in the original, so the frequencies are bit-identical
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64) / half))
    angles = []
    for h, w in scale_hw:
        rows, cols = normalized_grid_positions(h, w, grid_hw)
        angles.append(torch.cat((torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)), dim=-1))
    angles = torch.cat(angles)
    return torch.cos(angles), torch.sin(angles)


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` to a context of another width, with padding mask.

    k/v come from one bias-free projection of the context plus a learned v bias (k has none); the softmax
    scale is ``1/sqrt(head_dim)``. With ``learned_query`` the query is a single learned token
    (``(1, num_heads, head_dim)``): the layer then pools the context into one vector per sample.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, learned_query: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width ({dim}) must be divisible by `num_heads` ({num_heads}).")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if learned_query:
            self.learned_query = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
            self.to_q = None
        else:
            self.to_q = nn.Linear(dim, dim)
        self.to_kv = ExternalBiasLinear(context_dim, 2 * dim)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        self.to_out = nn.Linear(dim, dim)

    def context_keys_values(self, context_BSC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, S, H, D) of the context."""
        B, S = context_BSC.shape[:2]
        bias = torch.cat((self.zero_k_bias.to(self.v_bias.dtype), self.v_bias))
        kv = self.to_kv(context_BSC, bias).view(B, S, 2, self.num_heads, self.head_dim)
        return kv.unbind(dim=2)

    def forward(
        self,
        x_BLC: torch.Tensor | None,
        context_BSC: torch.Tensor,
        context_mask_BS: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        B = context_BSC.shape[0]
        # decoding: the text is fixed for a generation, so its keys / values are computed once
        k, v = memoized(kv_cache, "cross_kv", lambda: self.context_keys_values(context_BSC))
        if self.to_q is None:
            q = self.learned_query.to(k.dtype).unsqueeze(0).expand(B, 1, -1, -1)
        else:
            q = self.query(x_BLC)
        return self.to_out(self.attend(q, k, v, context_mask_BS))

    def query(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> queries (B, L, H, D)."""
        return self.to_q(x_BLC).unflatten(-1, (self.num_heads, self.head_dim))

    def attend(self, q, k, v, context_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the context (padded positions masked): (B, L, H, D) queries -> (B, L, C), before
        ``to_out``."""
        mask = None if context_mask_BS is None else context_mask_BS[:, None, None, :].to(torch.bool)
        return dispatch_attention_fn(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5).flatten(2)


class AdaLNCrossAttentionBlock(AdaLNSelfAttentionBlock):
    """:class:`AdaLNSelfAttentionBlock` with an un-gated cross-attention residual between self-attention
    and FFN: ``x += CrossAttn(LayerNorm_affine(x), context)`` (no AdaLN on that branch)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int,
        ffn_dim: int,
        norm_eps: float = 1e-6,
        shared_adaln: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__(
            dim,
            num_heads,
            norm_eps=norm_eps,
            shared_adaln=shared_adaln,
            attn_l2_norm=True,
            drop_path=drop_path,
            ffn_dim=ffn_dim,
        )
        self.cross_attn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)

    def forward(self, x_BLC, cond, context_BSC, context_mask_BS=None, attn_mask=None, kv_cache=None, rotary=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = memoized(kv_cache, "adaln", lambda: self.modulation(cond))
        x_BLC = self.self_attention_residual(x_BLC, gamma1, scale1, shift1, attn_mask, kv_cache, rotary)
        x_BLC = self.cross_attention_residual(x_BLC, context_BSC, context_mask_BS, kv_cache)
        return self.ffn_residual(x_BLC, gamma2, scale2, shift2)

    def cross_attention_residual(self, x_BLC, context_BSC, context_mask_BS=None, kv_cache=None):
        return x_BLC + self.cross_attn(self.cross_attn_norm(x_BLC), context_BSC, context_mask_BS, kv_cache)


def infinity_ffn_dim(embed_dim: int, mlp_ratio: float) -> int:
    """FFN width of the original: ``round(C * mlp_ratio / 256) * 256`` (Python rounding)."""
    return round(embed_dim * mlp_ratio / 256) * 256


@dataclass
class InfinityTextCondition:
    """Everything the blocks need from the text, computed once per generation.

    ``pooled`` (B, C): attention-pooled text (start token and head AdaLN condition); ``adaln`` the block
    AdaLN input ((B, 1, 6, C) with shared AdaLN, else ``pooled``); ``context`` (B, S, C) cross-attention
    memory; ``context_mask`` (B, S) bool, True for real tokens.
    """

    pooled: torch.Tensor
    adaln: torch.Tensor
    context: torch.Tensor
    context_mask: torch.Tensor


@dataclass
class InfinityTransformerOutput(BaseOutput):
    """``logits`` (B, L, 2 * bits_per_token) float32; ``[..., 2i]`` / ``[..., 2i + 1]`` = bit i is 0 / 1."""

    logits: torch.Tensor


class InfinityTransformer2DModel(CheckedLoadingMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""Infinity: predicts every bit of every token of scale k from all coarser scales and the text.

    * Text (T5 features, padded, with a mask) is RMS-normalised, attention-pooled into one vector (the
      first token and the AdaLN condition) and projected by a 2-layer MLP into the cross-attention memory.
      ``uncond_text_embeds`` are the learned "empty text" rows used for guidance and caption dropout.
    * Blocks: AdaLN (shared Linear + per-block offsets in the releases) cosine self-attention with 2-D
      RoPE normalised to the aspect template's final grid, un-gated cross-attention, FFN.
    * The head predicts 2 logits per bit (``bits_per_token`` bits per token).

    Args:
        bits_per_token (`int`, defaults to 32): bits per token (VAE ``codebook_dim``, x4 with spatial patchify).
        text_dim (`int`, defaults to 2048): width of the text encoder features (2048 for flan-t5-xl).
        text_max_length (`int`, defaults to 512): rows of ``uncond_text_embeds`` (the tokenizer's max length).
        pool_num_heads (`int`, defaults to 16): heads of the attention pooling (``text_dim // 128`` in the original).
        depth (`int`, defaults to 32): number of transformer blocks.
        embed_dim (`int`, defaults to 2048): width of the token stream.
        num_heads (`int`, defaults to 16): attention heads.
        mlp_ratio (`float`, defaults to 4.0): FFN width ``round(embed_dim * mlp_ratio / 256) * 256``.
        block_chunks (`int`, defaults to 8): blocks are grouped in this many chunks (as in the release; level
            embedding granularity).
        shared_adaln (`bool`, defaults to `True`): one AdaLN Linear shared by the blocks plus per-block offsets (all
            releases).
        level_embed_every_chunk (`bool`, defaults to `False`): add the level embedding before every chunk (the
            releases add it once).
        num_level_embeddings (`int`, defaults to 15): rows of the level embedding (maximum number of scales).
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        cond_drop_rate (`float`, defaults to 0.1): caption-dropout probability during training (classifier-free
            guidance).
        drop_path_rate (`float`, defaults to 0.1): stochastic-depth rate of the last block (linear over depth).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AdaLNCrossAttentionBlock"]
    _keep_in_fp32_modules = ["head", "head_norm", "text_norm"]  # logits, their AdaLN norm, the text RMSNorm

    @register_to_config
    def __init__(
        self,
        bits_per_token: int = 32,
        text_dim: int = 2048,
        text_max_length: int = 512,
        pool_num_heads: int = 16,
        depth: int = 32,
        embed_dim: int = 2048,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        block_chunks: int = 8,
        shared_adaln: bool = True,
        level_embed_every_chunk: bool = False,
        num_level_embeddings: int = 15,
        norm_eps: float = 1e-6,
        cond_drop_rate: float = 0.1,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        if depth % block_chunks:
            raise ValueError(f"`depth` ({depth}) must be divisible by `block_chunks` ({block_chunks}).")
        # named here: the pooling layer's own check would name `num_heads`, the blocks' key
        if pool_num_heads < 1 or embed_dim % pool_num_heads:
            raise ValueError(f"`embed_dim` ({embed_dim}) must be divisible by `pool_num_heads` ({pool_num_heads}).")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:  # (a head of 2 features built, and RoPE then
            # gave q / k twice v's width; 6 failed at the first call)
            raise ValueError(
                "`embed_dim` / `num_heads` must be an integer divisible by 4 (2D RoPE), "
                f"got {embed_dim} / {num_heads}."
            )
        ffn_dim = infinity_ffn_dim(embed_dim, mlp_ratio)
        if ffn_dim < 1:  # a model without FFNs was built without a word
            raise ValueError(
                f"`mlp_ratio` {mlp_ratio} gives an FFN of width 0 for embed_dim {embed_dim} (the original rounds "
                "embed_dim * mlp_ratio to a multiple of 256): it needs embed_dim * mlp_ratio >= 128."
            )
        C = embed_dim
        self.uncond_text_embeds = nn.Parameter(torch.zeros(text_max_length, text_dim))
        self.text_norm = nn.RMSNorm(text_dim, eps=1e-6)
        self.text_pool = CrossAttention(C, text_dim, pool_num_heads, learned_query=True)
        self.text_proj = FeedForward(text_dim, C, out_dim=C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.level_embedding = nn.Embedding(num_level_embeddings, C)
        self.input_proj = nn.Linear(bits_per_token, C)
        self.shared_modulation = AdaLNModulation(C, C, 6) if shared_adaln else None
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> rate
        self.blocks = nn.ModuleList(
            AdaLNCrossAttentionBlock(C, num_heads, C, ffn_dim, norm_eps, shared_adaln, rates[i]) for i in range(depth)
        )
        self.head_norm = AdaLNHeadNorm(C, C, norm_eps)
        self.head = nn.Linear(C, 2 * bits_per_token)
        self.gradient_checkpointing = False
        self._rope_tables: dict = {}

    # -- text --------------------------------------------------------------------------------------
    def unconditional_text_embeds(self, text_mask_BS: torch.Tensor, drop_text: torch.Tensor | None = None):
        """Learned empty-text features shaped like a padded batch: row i's real tokens get the first
        ``len_i`` rows of ``uncond_text_embeds`` (same length as the prompt it replaces). A batch padded beyond those
        rows (prompts of up to 512 tokens, as the original takes them) is fine where the rows that take them
        (``drop_text``, default all) are not longer; a longer one is a ValueError (the original fails there too)."""
        B, S = text_mask_BS.shape
        rows = self.config.text_max_length
        if S <= rows:
            return self.uncond_text_embeds[:S].unsqueeze(0).expand(B, S, -1)
        lengths = text_mask_BS.sum(dim=1)
        if drop_text is not None:  # (no boolean indexing: it would sync with the device)
            lengths = lengths * drop_text.to(lengths.device)
        longest = int(lengths.max()) if may_read_values(text_mask_BS, self.training) else 0  # not inside a capture
        if longest > rows:
            raise ValueError(
                f"a text of {longest} tokens takes the learned unconditional text, which has {rows} rows "
                f"(`text_max_length`): give a `negative_prompt`, or a prompt of at most {rows} tokens."
            )
        padded = torch.nn.functional.pad(self.uncond_text_embeds, (0, 0, 0, S - rows))  # rows no text reaches
        return padded.unsqueeze(0).expand(B, S, -1)

    def encode_text(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, drop_text: torch.Tensor | None = None
    ) -> InfinityTextCondition:
        """Text features (B, S, text_dim) + mask (B, S) -> :class:`InfinityTextCondition` (called by ``forward``,
        once per generation when decoding).

        ``drop_text`` (B,) bool replaces those rows by the learned unconditional features.
        """
        if not torch.is_tensor(text_embeds) or text_embeds.ndim != 3 or text_embeds.shape[-1] != self.config.text_dim:
            got = tuple(text_embeds.shape) if torch.is_tensor(text_embeds) else type(text_embeds).__name__
            raise ValueError(f"`text_embeds` must be a (B, S, {self.config.text_dim}) tensor, got {got}.")
        if text_embeds.shape[0] == 0:
            raise ValueError("`text_embeds` is empty: the batch needs at least one row.")
        if not torch.is_tensor(text_mask):
            raise ValueError(f"`text_mask` must be a (B, S) tensor, got {type(text_mask).__name__}.")
        if tuple(text_mask.shape) != tuple(text_embeds.shape[:2]):
            raise ValueError(
                f"`text_mask` must have shape {tuple(text_embeds.shape[:2])}, got {tuple(text_mask.shape)}."
            )
        text_mask = text_mask.to(device=text_embeds.device, dtype=torch.bool)
        if may_read_values(text_mask, training=False) and not bool(text_mask.any(dim=1).all()):  # (also in training)
            raise ValueError("`text_mask`: every sample needs at least one real token.")
        text_embeds = text_embeds.to(self.uncond_text_embeds.dtype)
        if drop_text is not None:  # also when no row is dropped, so DDP always sees the parameter used
            rows = text_mask.shape[:1]
            if not torch.is_tensor(drop_text) or drop_text.dtype != torch.bool or drop_text.shape != rows:
                got = f"{drop_text.dtype} {tuple(drop_text.shape)}" if torch.is_tensor(drop_text) else drop_text
                raise ValueError(f"`drop_text` must be a bool tensor of shape ({rows[0]},), got {got}.")
            uncond = self.unconditional_text_embeds(text_mask, drop_text)
            text_embeds = torch.where(drop_text.to(text_embeds.device)[:, None, None], uncond, text_embeds)
        normed = self.text_norm(text_embeds.float()).to(text_embeds.dtype)
        pooled = self.text_pool(None, normed, text_mask).squeeze(1)
        context = self.text_proj(normed)
        adaln = pooled if self.shared_modulation is None else self.shared_modulation(pooled)
        return InfinityTextCondition(pooled=pooled, adaln=adaln, context=context, context_mask=text_mask)

    # -- positions ---------------------------------------------------------------------------------
    def rope_cos_sin(self, scale_schedule, device) -> tuple[torch.Tensor, torch.Tensor]:
        schedule = tuple(normalize_schedule(scale_schedule))
        key = (schedule, str(device))
        if key not in self._rope_tables:
            head_dim = self.config.embed_dim // self.config.num_heads
            cos, sin = rope_2d_cos_sin(schedule, rope_grid_for_schedule(schedule), head_dim)
            self._rope_tables[key] = (cos.to(device), sin.to(device))
        return self._rope_tables[key]

    def _check_schedule(self, scale_schedule) -> list[tuple[int, int]]:
        schedule = normalize_schedule(scale_schedule)
        if schedule[0] != (1, 1):
            raise ValueError(f"`scale_schedule` must start with a 1x1 scale, got {schedule[0]}.")
        if len(schedule) > self.config.num_level_embeddings:
            raise ValueError(
                f"`scale_schedule` has {len(schedule)} scales; the model supports {self.config.num_level_embeddings}."
            )
        return schedule

    @property
    def scale_input_channels(self) -> int:
        """Channels of a scale's input tokens (``scale_input`` of :meth:`forward_scale`)."""
        return self.config.bits_per_token

    # -- trunk -------------------------------------------------------------------------------------
    def _run_blocks(self, x_BLC, level_BLC, text: InfinityTextCondition, attn_mask=None, kv_cache=None, rotary=None):
        per_chunk = len(self.blocks) // self.config.block_chunks
        for i, block in enumerate(self.blocks):
            if i % per_chunk == 0 and (i == 0 or self.config.level_embed_every_chunk):
                x_BLC = x_BLC + level_BLC
            layer_cache = kv_cache[i] if kv_cache is not None else None
            args = (x_BLC, text.adaln, text.context, text.context_mask, attn_mask, layer_cache, rotary)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x_BLC = self._gradient_checkpointing_func(block, *args)
            else:
                x_BLC = block(*args)
        head_dtype = self.head.weight.dtype  # the head stays float32 in a low-precision model
        memo = kv_cache.head if kv_cache is not None else None  # decoding: head AdaLN once per generation
        return self.head(self.head_norm(x_BLC.to(head_dtype), text.pooled.to(head_dtype), memo)).float()

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        scale_schedule: Sequence[Sequence[int]] | None = None,
        drop_text: torch.Tensor | None = None,
        return_dict: bool = True,
        scale_index: int | None = None,
        kv_cache: KVCache | None = None,
    ):
        r"""Teacher-forcing forward with the block-causal mask, or (``scale_index`` given) one scale of decoding.

        Args:
            hidden_states: training: (B, L - 1, bits_per_token), the next-scale inputs of scales 1..K-1, from
                :meth:`BitwiseMultiScaleVAE.teacher_forcing_inputs`; decoding: the scale's input (B, h*w,
                bits_per_token) for scales >= 1, ``None`` at scale 0 (see :meth:`forward_scale`).
            text_embeds, text_mask: padded text encoder features (B, S, text_dim) and mask (B, S).
            scale_schedule: token grids ``[(h, w), ...]`` (a predefined aspect-ratio schedule); decoding takes the
                cache's.
            drop_text: (B,) bool, rows that use the learned unconditional text; default in training mode: each row
                with probability ``cond_drop_rate``, else none.
            scale_index, kv_cache: decode this scale with the cache of :meth:`init_kv_cache` (scales in order).

        Returns logits (B, L, 2 * bits_per_token), float32 (decoding: the scale's rows, as a tensor).
        """
        if scale_index is not None:
            return self._decode_scale(scale_index, hidden_states, text_embeds, text_mask, drop_text, kv_cache)
        schedule = self._check_schedule(scale_schedule)
        counts = [h * w for h, w in schedule]
        expected = (sum(counts) - 1, self.config.bits_per_token)
        if not torch.is_tensor(hidden_states) or hidden_states.ndim != 3 or tuple(hidden_states.shape[1:]) != expected:
            got = tuple(hidden_states.shape) if torch.is_tensor(hidden_states) else type(hidden_states).__name__
            raise ValueError(f"`hidden_states` must have shape (B, {expected[0]}, {expected[1]}), got {got}.")
        text_ok = torch.is_tensor(text_embeds) and text_embeds.ndim == 3  # (encode_text names what else is wrong)
        if text_ok and hidden_states.shape[0] != text_embeds.shape[0]:
            raise ValueError(
                f"`hidden_states` has {hidden_states.shape[0]} rows and `text_embeds` {text_embeds.shape[0]}: one "
                "text per row."
            )
        if drop_text is None and self.training and self.config.cond_drop_rate > 0:
            drop_text = torch.rand(hidden_states.shape[0]) < self.config.cond_drop_rate
        text = self.encode_text(text_embeds, text_mask, drop_text)
        first = text.pooled.unsqueeze(1) + self.pos_start
        x_BLC = torch.cat((first, self.input_proj(hidden_states.to(first.dtype))), dim=1)
        level = self.level_embedding(level_ids_from_counts(counts, x_BLC.device))
        attn_mask = block_causal_mask_from_counts(counts, x_BLC.device)
        rotary = Rotary2D(*self.rope_cos_sin(schedule, x_BLC.device))
        logits = self._run_blocks(x_BLC, level, text, attn_mask=attn_mask, rotary=rotary)
        return InfinityTransformerOutput(logits=logits) if return_dict else (logits,)

    # -- scale-by-scale decoding -------------------------------------------------------------------
    def init_kv_cache(self, scale_schedule) -> KVCache:
        """The KV cache of one generation along ``scale_schedule`` (token grids ``[(h, w), ...]``)."""
        return KVCache(len(self.blocks), self._check_schedule(scale_schedule))

    def forward_scale(
        self,
        scale_index: int,
        condition: tuple[torch.Tensor, ...],
        kv_cache: KVCache,
        scale_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Logits (B, h*w, 2 * bits_per_token) of one scale during sampling, in scale order (through ``forward``, so
        module hooks run).

        ``condition``: ``(text_embeds (B, S, text_dim), text_mask (B, S), drop_text (B,) bool)`` of every row
        (conditional rows first; ``drop_text`` marks the rows that use the learned unconditional text), encoded at
        scale 0 and reused; ``kv_cache`` from :meth:`init_kv_cache` (its schedule is the generation's);
        ``scale_input`` (B, h*w, bits_per_token) for scales >= 1 (``None`` at scale 0, whose input is the pooled text).
        """
        text_embeds, text_mask, drop_text = condition
        return self(
            scale_input, text_embeds, text_mask, drop_text=drop_text, scale_index=scale_index, kv_cache=kv_cache
        )

    def _decode_scale(
        self, scale_index, scale_input, text_embeds, text_mask, drop_text, kv_cache: KVCache
    ) -> torch.Tensor:
        check_decoding_step(kv_cache, scale_index, len(self.blocks))
        schedule = kv_cache.schedule
        begin, end = kv_cache.scale_range(scale_index)
        text = memoized(kv_cache.head, "text", lambda: self.encode_text(text_embeds, text_mask, drop_text))
        B = text.pooled.shape[0]
        if scale_index == 0:
            x_BLC = text.pooled.unsqueeze(1) + self.pos_start
        else:
            if scale_input is None or tuple(scale_input.shape) != (B, end - begin, self.config.bits_per_token):
                raise ValueError(
                    f"`scale_input` must have shape ({B}, {end - begin}, {self.config.bits_per_token}) "
                    f"at scale {scale_index}."
                )
            x_BLC = self.input_proj(scale_input.to(self.pos_start.dtype))
        # made on the device (no host copy: this runs inside CUDA graph captures)
        level = self.level_embedding(torch.full((1, 1), scale_index, dtype=torch.long, device=x_BLC.device))
        cos, sin = self.rope_cos_sin(schedule, x_BLC.device)
        return self._run_blocks(x_BLC, level, text, kv_cache=kv_cache, rotary=Rotary2D(cos[begin:end], sin[begin:end]))

    # -- initialisation for training from scratch ----------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 1e-3, init_adaln_gamma: float = 5e-6, init_head: float = 0.02):
        """Truncated-normal init (std sqrt(1/(3C))), scaled head / AdaLN / residual outputs, and the
        original's unconditional rows (std 1.2 / sqrt(text_dim), CPU generator seeded 0). The AdaLN multipliers are
        the original trainer's (``--aln`` 1e-3, ``--alng`` 5e-6 in its training script)."""
        std = math.sqrt(1 / self.config.embed_dim / 3)
        init_adaln_transformer_weights_(
            self, std, (self.pos_start, self.text_pool.learned_query), init_adaln, init_adaln_gamma, init_head
        )
        # drawn on the CPU whatever the default device (``with torch.device("cuda")``): the same rows everywhere
        uncond = torch.empty(self.uncond_text_embeds.shape, device="cpu")
        nn.init.trunc_normal_(uncond, std=1.2, generator=torch.Generator(device="cpu").manual_seed(0))
        self.uncond_text_embeds.copy_(uncond / self.config.text_dim**0.5)
