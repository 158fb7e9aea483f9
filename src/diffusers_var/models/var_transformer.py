"""VARTransformer2DModel: class-conditional next-scale prediction (VAR, FoundationVision)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..scalars import is_integer, is_number
from .blocks import (
    AdaLNHeadNorm,
    AdaLNModulation,
    AdaLNSelfAttentionBlock,
    KVCache,
    check_decoding_step,
    init_adaln_transformer_weights_,
    may_read_values,
    memoized,
    scale_begin_ends,
    scale_level_ids,
    square_kv_cache,
    validate_patch_nums,
)
from .loading import CheckedLoadingMixin


@dataclass
class NextScaleTransformerOutput(BaseOutput):
    """``logits``: (B, L, vocab_size) float32; row i predicts the token at pyramid position i."""

    logits: torch.Tensor


class VARTransformer2DModel(CheckedLoadingMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""VAR: a GPT-style transformer that predicts the token map of scale k+1 from all coarser scales.

    * The class embedding (row ``num_classes`` is the null class used for guidance and label dropout)
      is the first token and the AdaLN condition of every block and of the head.
    * Scale k >= 1 reads the area-downsampled cumulative f_hat of scales < k through ``input_proj``.
    * Every position adds a learned absolute position embedding and a per-scale level embedding.
    * Attention is block-causal (full within a scale, to all coarser scales); decoding uses a KV cache.

    Args:
        num_classes (`int`, defaults to 1000): number of classes (the embedding has ``num_classes + 1`` rows; the
            last is the null class).
        depth (`int`, defaults to 16): number of transformer blocks.
        embed_dim (`int`, defaults to 1024): width of the token stream.
        num_heads (`int`, defaults to 16): attention heads.
        mlp_ratio (`float`, defaults to 4.0): FFN width relative to ``embed_dim``.
        vocab_size (`int`, defaults to 4096): codebook size of the tokenizer.
        latent_channels (`int`, defaults to 32): code dimension of the tokenizer.
        patch_nums (`Sequence[int]`, defaults to `(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`): token-map side of every scale
            (must match the tokenizer).
        shared_adaln (`bool`, defaults to `False`): one AdaLN Linear shared by all blocks plus per-block learned
            offsets (VAR-d36).
        attn_l2_norm (`bool`, defaults to `True`): L2-normalised q/k with a learned per-head scale clamped at 100
            (all releases).
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        cond_drop_rate (`float`, defaults to 0.1): label-dropout probability during training (classifier-free
            guidance).
        drop_path_rate (`float`, defaults to 0.0): stochastic-depth rate of the last block (linearly increasing
            over depth).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AdaLNSelfAttentionBlock"]
    _keep_in_fp32_modules = ["head", "head_norm"]  # the logits (and their AdaLN norm) stay float32

    @register_to_config
    def __init__(
        self,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        shared_adaln: bool = False,
        attn_l2_norm: bool = True,
        norm_eps: float = 1e-6,
        cond_drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        patch_nums = validate_patch_nums(patch_nums)
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
        C = embed_dim
        self.num_scales = len(patch_nums)
        self.first_len = patch_nums[0] ** 2
        self.seq_len = sum(pn * pn for pn in patch_nums)
        self.begin_ends = scale_begin_ends(patch_nums)

        self.class_embedding = nn.Embedding(num_classes + 1, C)
        self.input_proj = nn.Linear(latent_channels, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_len, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len, C))
        self.level_embedding = nn.Embedding(self.num_scales, C)
        self.shared_modulation = AdaLNModulation(C, C, 6) if shared_adaln else None
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                AdaLNSelfAttentionBlock(C, num_heads, mlp_ratio, norm_eps, shared_adaln, attn_l2_norm, rates[i])
                for i in range(depth)
            ]
        )
        self.head_norm = AdaLNHeadNorm(C, C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.gradient_checkpointing = False

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def scale_input_channels(self) -> int:
        """Channels of a scale's input tokens (``scale_input`` of :meth:`forward_scale`)."""
        return self.config.latent_channels

    def level_pos_embed(self, scale_index: int | None = None, device=None) -> torch.Tensor:
        """(1, l, C): level embedding plus absolute position embedding of one scale's positions (of every position
        when ``scale_index`` is None)."""
        if scale_index is None:
            return self.level_embedding(scale_level_ids(self.config.patch_nums, device)) + self.pos_embed
        begin, end = self.begin_ends[scale_index]
        # made on the device (no host copy: this runs inside CUDA graph captures)
        level_ids = torch.full((1, end - begin), scale_index, dtype=torch.long, device=device)
        return self.level_embedding(level_ids) + self.pos_embed[:, begin:end]

    def drop_labels(
        self, class_labels: torch.LongTensor, rate: float | None = None, generator: torch.Generator | None = None
    ) -> torch.LongTensor:
        """Label dropout for classifier-free guidance training: each label becomes the null class with
        probability ``rate`` (default ``cond_drop_rate``). Draws ``torch.rand(B)`` like the original
        (from the global RNG when no generator is given), at rate 0 too: the random draws that follow, drop-path's
        say, are the original's."""
        rate = self.config.cond_drop_rate if rate is None else rate
        if not is_number(rate) or not 0 <= rate <= 1:
            raise ValueError(f"`rate` must be a probability in [0, 1], got {rate!r}.")
        device = generator.device if generator is not None else class_labels.device
        draw = torch.rand(class_labels.shape[0], generator=generator, device=device).to(class_labels.device)
        return torch.where(draw < rate, self.null_class, class_labels)

    def _check_labels(self, class_labels: torch.Tensor) -> None:
        if (
            not torch.is_tensor(class_labels)
            or class_labels.dtype not in (torch.int64, torch.int32)
            or class_labels.ndim != 1
        ):
            got = (
                f"{class_labels.dtype} {tuple(class_labels.shape)}"
                if torch.is_tensor(class_labels)
                else type(class_labels).__name__
            )
            raise ValueError(f"`class_labels` must be a 1-D int64 or int32 tensor, got {got}.")
        if class_labels.shape[0] == 0:
            raise ValueError("`class_labels` is empty: the batch needs at least one row.")
        if not may_read_values(class_labels, self.training):
            return  # (in a graph capture the pipeline checked the labels as Python ints)
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() > self.null_class):
            raise ValueError(f"`class_labels` must lie in [0, {self.null_class}] ({self.null_class} = null class).")

    def _adaln_condition(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Per-block AdaLN input: the class embedding, or the shared (B, 1, 6, C) modulation."""
        return cond_BD if self.shared_modulation is None else self.shared_modulation(cond_BD)

    def _run_block_stack(self, x_BLC, block_cond, attn_mask=None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The blocks in order (the fast path may chain their compiled pieces across block boundaries instead)."""
        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache[i] if kv_cache is not None else None
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x_BLC = self._gradient_checkpointing_func(block, x_BLC, block_cond, attn_mask, layer_cache)
            else:
                x_BLC = block(x_BLC, block_cond, attn_mask=attn_mask, kv_cache=layer_cache)
        return x_BLC

    def _run_blocks(
        self, x_BLC, cond_BD, attn_mask=None, kv_cache: KVCache | None = None, logits_from: int = 0
    ) -> torch.Tensor:
        head_memo = kv_cache.head if kv_cache is not None else None
        block_cond = memoized(head_memo, "shared_adaln", lambda: self._adaln_condition(cond_BD))
        x_BLC = self._run_block_stack(x_BLC, block_cond, attn_mask, kv_cache)
        head_dtype = self.head.weight.dtype  # the head stays float32 in a low-precision model
        x_BLC = x_BLC[:, logits_from:].to(head_dtype)
        return self.head(self.head_norm(x_BLC, cond_BD.to(head_dtype), head_memo)).float()

    # -- forward: teacher forcing (training) or one scale of decoding ---------------------------------
    def forward(
        self,
        class_labels: torch.LongTensor,
        teacher_forcing_input: torch.Tensor | None = None,
        drop_labels: bool | None = None,
        return_dict: bool = True,
        scale_index: int | None = None,
        kv_cache: KVCache | None = None,
        logits_from: int = 0,
    ):
        r"""Teacher-forcing forward with the block-causal mask, or (``scale_index`` given) one scale of decoding.

        Args:
            class_labels: (B,) int64 in ``[0, num_classes]`` (``num_classes`` = null class).
            teacher_forcing_input: training: (B, L - pn_0^2, latent_channels), from
                :meth:`MultiScaleVQModel.teacher_forcing_input`, or its first ``cum_k - pn_0^2`` positions (the inputs
                of scales 1..k: the logits are then those of scales 0..k); decoding: the scale's input
                (B, pn*pn, latent_channels) for scales >= 1, ``None`` at scale 0 (see :meth:`forward_scale`).
            drop_labels: apply label dropout (default: only in training mode).
            scale_index, kv_cache: decode this scale with the cache of :meth:`init_kv_cache` (scales in order).
                ``kv_cache`` without ``scale_index`` is a prefill: the teacher-forcing pass over the scales 0..k of
                ``teacher_forcing_input`` also writes their keys and values into the (empty) cache, so decoding goes
                on at scale k + 1 (CoDe's refiner continues a drafted pyramid this way).
            logits_from: teacher forcing and prefill: the logits of the positions from this one on only (the head
                skips those before it).

        Returns logits (B, L - logits_from, vocab_size), float32 (decoding: the scale's (B, pn*pn, vocab_size), as a
        tensor).
        """
        if scale_index is not None:
            if logits_from:
                raise ValueError(
                    "`logits_from` is for teacher forcing and prefill; decoding one scale (`scale_index`) "
                    f"gives that scale's logits, got logits_from={logits_from}."
                )
            return self._decode_scale(scale_index, class_labels, kv_cache, teacher_forcing_input)
        self._check_labels(class_labels)
        length = self._teacher_forcing_length(teacher_forcing_input)
        if teacher_forcing_input.shape[0] != class_labels.shape[0]:
            raise ValueError(
                f"`teacher_forcing_input` has {teacher_forcing_input.shape[0]} rows and `class_labels` "
                f"{class_labels.shape[0]}: one label per row."
            )
        if not is_integer(logits_from) or not 0 <= logits_from < length:
            raise ValueError(f"`logits_from` must be in [0, {length - 1}] for {length} positions, got {logits_from}.")
        if kv_cache is not None and kv_cache.length:
            raise ValueError(f"`kv_cache` must be empty for a prefill; it holds {kv_cache.length} positions.")
        if drop_labels if drop_labels is not None else self.training:
            class_labels = self.drop_labels(class_labels)
        B = class_labels.shape[0]
        head_memo = kv_cache.head if kv_cache is not None else None
        cond_BD = memoized(head_memo, "cond", lambda: self.class_embedding(class_labels))
        first = cond_BD.unsqueeze(1).expand(B, self.first_len, -1) + self.pos_start.expand(B, self.first_len, -1)
        x_BLC = torch.cat((first, self.input_proj(teacher_forcing_input.to(self.pos_start.dtype))), dim=1)
        level_ids = self._level_ids(length, x_BLC.device)
        x_BLC = x_BLC + (self.level_embedding(level_ids) + self.pos_embed[:, :length])
        attn_mask = (level_ids[0, :, None] >= level_ids[0, None, :])[None, None]  # block-causal
        logits = self._run_blocks(x_BLC, cond_BD, attn_mask=attn_mask, kv_cache=kv_cache, logits_from=logits_from)
        if not return_dict:
            return (logits,)
        return NextScaleTransformerOutput(logits=logits)

    def _level_ids(self, length: int, device) -> torch.LongTensor:
        """(1, length) scale index of the first ``length`` pyramid positions (whole scales), made on the device (no
        host copy: a prefill runs inside CUDA graph captures)."""
        ids = [
            torch.full((end - begin,), si, dtype=torch.long, device=device)
            for si, (begin, end) in enumerate(self.begin_ends)
            if end <= length
        ]
        return torch.cat(ids)[None]

    def _teacher_forcing_length(self, teacher_forcing_input) -> int:
        """The number of pyramid positions a teacher-forcing input covers (scales 0..k, k >= 1); ValueError unless it
        is (B, cum_k - pn_0^2, latent_channels) for some scale k."""
        Cv = self.config.latent_channels
        lengths = [end - self.first_len for _, end in self.begin_ends[1:]]
        if (
            not torch.is_tensor(teacher_forcing_input)
            or teacher_forcing_input.ndim != 3
            or teacher_forcing_input.shape[2] != Cv
            or teacher_forcing_input.shape[1] not in lengths
        ):
            tensor = torch.is_tensor(teacher_forcing_input)
            got = tuple(teacher_forcing_input.shape) if tensor else type(teacher_forcing_input).__name__
            raise ValueError(
                f"`teacher_forcing_input` must have shape (B, {lengths[-1]}, {Cv}), or cover the first "
                f"scales: (B, n, {Cv}) with n in {lengths}; got {got}."
            )
        return teacher_forcing_input.shape[1] + self.first_len

    # -- scale-by-scale decoding -------------------------------------------------------------------
    def init_kv_cache(self, scale_schedule=None) -> KVCache:
        """The KV cache of one generation: room for the scales of ``scale_schedule`` (the ``(h, w)`` grids of the
        model's own schedule, or its first ones for a generation that stops early; default all of them)."""
        return square_kv_cache(len(self.blocks), self.config.patch_nums, scale_schedule)

    def forward_scale(
        self,
        scale_index: int,
        condition: tuple[torch.Tensor],
        kv_cache: KVCache,
        scale_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Logits of one scale during sampling (through ``forward``, so module hooks run).

        Args:
            scale_index: the scale to predict (0 .. num_scales - 1), in order.
            condition: ``(class_labels,)``: (B,) int64 labels of every row (B includes the guidance rows).
            kv_cache: from :meth:`init_kv_cache`, shared by every call of one generation.
            scale_input: (B, pn*pn, latent_channels) for scale >= 1 (the downsampled cumulative f_hat,
                row-major); ``None`` at scale 0, whose input is the condition itself.

        Returns (B, pn*pn, vocab_size) float32 logits.
        """
        (class_labels,) = condition
        return self(class_labels, scale_input, scale_index=scale_index, kv_cache=kv_cache)

    def prefill_scale(
        self, condition: tuple[torch.Tensor], kv_cache: KVCache, prefix_input: torch.Tensor, logits_from: int = 0
    ) -> torch.Tensor:
        r"""Logits of every position of scales 0..k from one block-causal pass (through ``forward``), which also fills
        the empty ``kv_cache`` with them, so that :meth:`forward_scale` goes on at scale k + 1.

        Args:
            condition: ``(class_labels,)`` as for :meth:`forward_scale`.
            kv_cache: from :meth:`init_kv_cache`, empty.
            prefix_input: (B, cum_k - pn_0^2, latent_channels): the inputs of scales 1..k (each the area-downsampled
                cumulative f_hat of the scales before it, row-major), as
                :meth:`MultiScaleVQModel.teacher_forcing_input` builds them.
            logits_from: the first position whose logits are wanted (e.g. ``begin_ends[k][0]``: scale k's alone);
                the positions before it fill the cache without going through the head.

        Returns (B, cum_k - logits_from, vocab_size) float32 logits (the last pn_k^2 rows predict scale k).
        """
        (class_labels,) = condition
        return self(class_labels, prefix_input, drop_labels=False, kv_cache=kv_cache, logits_from=logits_from).logits

    def _decode_scale(self, scale_index: int, class_labels, kv_cache: KVCache, scale_input) -> torch.Tensor:
        check_decoding_step(kv_cache, scale_index, len(self.blocks))
        begin, end = self.begin_ends[scale_index]
        if scale_index == 0:
            self._check_labels(class_labels)
        cond_BD = memoized(kv_cache.head, "cond", lambda: self.class_embedding(class_labels))
        level_pos = self.level_pos_embed(scale_index, cond_BD.device)
        B = cond_BD.shape[0]
        if scale_index == 0:
            x_BLC = cond_BD.unsqueeze(1).expand(B, self.first_len, -1) + self.pos_start.expand(B, -1, -1) + level_pos
        else:
            if scale_input is None or tuple(scale_input.shape) != (B, end - begin, self.config.latent_channels):
                raise ValueError(
                    f"`scale_input` must have shape ({B}, {end - begin}, {self.config.latent_channels}) "
                    f"at scale {scale_index}."
                )
            x_BLC = self.input_proj(scale_input.to(self.pos_start.dtype)) + level_pos
        return self._run_blocks(x_BLC, cond_BD, kv_cache=kv_cache)

    # -- initialisation for training from scratch ----------------------------------------------------
    @torch.no_grad()
    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1.0
    ):
        """The original recipe: truncated normal (std sqrt(1/(3C))), scaled head / AdaLN / residual outputs."""
        std = math.sqrt(1 / self.config.embed_dim / 3) if init_std < 0 else init_std
        init_adaln_transformer_weights_(
            self, std, (self.pos_start, self.pos_embed), init_adaln, init_adaln_gamma, init_head
        )
