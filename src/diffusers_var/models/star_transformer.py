"""STARTransformer2DModel: text-conditioned next-scale prediction (STAR, Davinci-XLab/STAR-T2I)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..scalars import is_integer
from .blocks import (
    MAX_LOG_ATTN_SCALE,
    CosineSelfAttention,
    DropPath,
    ExternalBiasLinear,
    FeedForward,
    KVCache,
    LayerKVCache,
    Rotary2D,
    block_causal_mask,
    check_decoding_step,
    check_ffn_width,
    init_linear_and_embedding_weights_,
    may_read_values,
    memoized,
    scale_begin_ends,
    scale_level_ids,
    square_kv_cache,
    validate_patch_nums,
)
from .loading import CheckedLoadingMixin


# ----------------------------------------------------------------------------------------------
# Normalised 2D rotary position embedding and cosine cross-attention (STAR only)
# ----------------------------------------------------------------------------------------------
def normalized_rope_2d_table(
    patch_nums: Sequence[int], head_dim: int, theta: float = 10000.0, norm: float = 64.0, device=None
) -> torch.Tensor:
    """(L, head_dim // 2) complex64 rotation table of the whole token pyramid (STAR's "normalized RoPE").

    Inside a scale of side ``p`` token ``r * p + c`` sits at ``x = c / (p - 1) * norm``,
    ``y = r / (p - 1) * norm`` (both 0 when ``p == 1``), so every scale spans the same square. Each row
    holds ``head_dim / 4`` x-rotations followed by as many y-rotations, with frequencies
    ``theta ** (-4 j / head_dim)``.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}.")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
    tables = []
    for pn in patch_nums:
        t = torch.arange(pn * pn, dtype=torch.float32, device=device)
        x, y = t % pn, torch.div(t, pn, rounding_mode="floor")
        if pn > 1:  # division then multiplication, in float32, like the original
            x, y = x / (pn - 1) * norm, y / (pn - 1) * norm
        angles = torch.cat((torch.outer(x, freqs), torch.outer(y, freqs)), dim=-1)
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(tables, dim=0)


def rope_rotary(table_LD2: torch.Tensor) -> Rotary2D:
    """The ``rotary`` argument of :class:`CosineSelfAttention` for rows of a complex rotation table, as contiguous
    real cos / sin tables rather than ``.real`` / ``.imag`` views of one complex storage (the compiled blocks take
    them as inputs; the GPU measurements of session 13 ran with these copies)."""
    return Rotary2D(table_LD2.real.contiguous(), table_LD2.imag.contiguous())


def attend_somewhere(mask_BS: torch.Tensor) -> torch.Tensor:
    """``mask_BS`` (B, S) as booleans, a row without a real token given its first one (no host read: it runs inside
    CUDA graph captures)."""
    mask_BS = mask_BS.to(torch.bool)
    first_BS = torch.zeros_like(mask_BS)
    first_BS[:, 0] = True
    return mask_BS | (first_BS & ~mask_BS.any(dim=1, keepdim=True))


def _check_shape(name: str, tensor, shape: tuple[int, ...]) -> None:
    if not torch.is_tensor(tensor) or tuple(tensor.shape) != tuple(shape):
        got = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {got}.")


class CosineCrossAttention(nn.Module):
    """Multi-head cross-attention from the token stream to encoder (text) states, with the same
    L2-normalised q/k and clamped learned per-head scale as :class:`CosineSelfAttention` (softmax scale 1).

    q has a learned bias; the fused kv projection has a bias only on v. ``context_mask`` (B, Lc) marks
    the valid context positions (1 / True); padded positions are never attended.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`embed_dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.to_q = ExternalBiasLinear(dim, dim)
        self.to_kv = ExternalBiasLinear(context_dim, 2 * dim)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        self.log_scale = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.to_out = nn.Linear(dim, dim)

    def context_keys_values(self, context_BLcD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised keys and values (B, Lc, H, D) of the context."""
        B, Lc = context_BLcD.shape[:2]
        kv_bias = torch.cat((self.zero_k_bias.to(self.v_bias.dtype), self.v_bias))
        kv = self.to_kv(context_BLcD.to(self.v_bias.dtype), kv_bias)
        k, v = kv.view(B, Lc, 2, self.num_heads, self.head_dim).unbind(dim=2)
        return F.normalize(k, dim=-1), v

    def query(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """L2-normalised queries (B, L, H, D), scaled per head."""
        B, L, _ = x_BLC.shape
        q = self.to_q(x_BLC, self.q_bias).view(B, L, self.num_heads, self.head_dim)
        head_scale = self.log_scale.clamp_max(MAX_LOG_ATTN_SCALE).exp().transpose(1, 2)  # (1, 1, H, 1)
        return F.normalize(q, dim=-1).mul(head_scale)

    @staticmethod
    def attend(q_BLHD, k_BLcHD, v_BLcHD, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the queries to the context: (B, L, C), before ``to_out``."""
        B, L = q_BLHD.shape[:2]
        attn_mask = None if context_mask is None else context_mask.to(torch.bool).view(B, 1, 1, k_BLcHD.shape[1])
        return dispatch_attention_fn(q_BLHD, k_BLcHD, v_BLcHD, attn_mask=attn_mask, scale=1.0).reshape(B, L, -1)

    def forward(
        self,
        x_BLC: torch.Tensor,
        context_BLcD: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        q = self.query(x_BLC)
        # decoding: the text is fixed for a generation, so its keys / values are computed once
        k, v = memoized(kv_cache, "cross_kv", lambda: self.context_keys_values(context_BLcD))
        return self.to_out(self.attend(q, k, v, context_mask))


@dataclass
class STARTransformerOutput(BaseOutput):
    """``logits``: (B, L, vocab_size) float32; ``hidden_states``: (B, L, C) residual stream after the last
    block (before the head norm), which the stable sampler reads."""

    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None  # defaults: accelerate rebuilds outputs from a dict


class STARBlock(nn.Module):
    """Plain pre-LayerNorm block: self-attention (RoPE, cosine q/k), optional text cross-attention, FFN.

    One non-affine LayerNorm is applied before each branch. The cross-attention branch has no drop-path.
    With ``cross_attention_row0`` every batch row receives the cross-attention output of row 0 (the
    released STAR checkpoints were trained that way; see ``STARTransformer2DModel``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        norm_eps: float,
        text_embed_dim: int | None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn = CosineSelfAttention(dim, num_heads, attn_l2_norm=True, rotary_before_norm=True)
        self.cross_attn = CosineCrossAttention(dim, text_embed_dim, num_heads) if text_embed_dim else None
        self.ffn = FeedForward(dim, check_ffn_width(dim, mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x_BLC: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
        rotary=None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_row0: bool = False,
    ) -> torch.Tensor:
        x_BLC = x_BLC + self.drop_path(
            self.attn(self.norm(x_BLC), attn_mask=attn_mask, kv_cache=kv_cache, rotary=rotary)
        )
        if self.cross_attn is not None:
            # with the quirk, row 0's output of the cross-attention of every row, as the original computes it (row 0
            # alone goes through other matmul blocking: float rounding that VAR's more_smooth sampling amplifies)
            attended = self.cross_attn(self.norm(x_BLC), encoder_hidden_states, encoder_attention_mask, kv_cache)
            x_BLC = x_BLC + (attended[:1] if cross_attention_row0 else attended)
        return x_BLC + self.drop_path(self.ffn(self.norm(x_BLC)))

    @staticmethod
    def cross_attention_inputs(x_BLC, encoder_hidden_states, encoder_attention_mask, cross_attention_row0: bool):
        """The rows, text and text mask the cross-attention sees: all of them, or (the quirk) row 0's, whose output
        is broadcast over the batch."""
        if not cross_attention_row0:
            return x_BLC, encoder_hidden_states, encoder_attention_mask
        mask = encoder_attention_mask[:1] if encoder_attention_mask is not None else None
        return x_BLC[:1], encoder_hidden_states[:1], mask


class STARStableSampler(nn.Module):
    """The "causal-driven stable sampling" head (released only with star-1024-sampler).

    For a scale it re-predicts the tokens from the already committed ones: input
    ``F = [tau ; input_proj(committed codes) + level_embedding[s]]`` and ``P = [tau ; main features]``
    (``tau = text_proj(pooled text) + pos_start``) are fused by ``fuse_proj``, passed through
    ``len(blocks)`` self-attention blocks and a non-affine LayerNorm + ``head``.
    """

    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio,
        norm_eps,
        latent_channels,
        text_embed_dim,
        vocab_size,
        num_scales,
        depth,
        drop_paths,
    ):
        super().__init__()
        self.input_proj = nn.Linear(latent_channels, dim)
        self.level_embedding = nn.Embedding(num_scales, dim)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, dim))
        self.text_proj = nn.Linear(text_embed_dim, dim)
        self.fuse_proj = nn.Linear(2 * dim, dim)
        self.blocks = nn.ModuleList(
            [STARBlock(dim, num_heads, mlp_ratio, norm_eps, None, drop_paths[i]) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.head = nn.Linear(dim, vocab_size)

    def text_token(self, pooled_text_embeds: torch.Tensor) -> torch.Tensor:
        return self.text_proj(pooled_text_embeds.unsqueeze(1).to(self.pos_start.dtype)) + self.pos_start

    def forward(
        self, committed_embeds_BlCv, level_ids_1l, main_hidden_BlC, pooled_text_embeds, rope_table, attn_mask=None
    ):
        """Logits (B, l, V) of the tokens after the text token."""
        tau = self.text_token(pooled_text_embeds)
        features = torch.cat(
            (tau, self.input_proj(committed_embeds_BlCv.to(tau.dtype)) + self.level_embedding(level_ids_1l)), dim=1
        )
        previous = torch.cat((tau, main_hidden_BlC), dim=1)
        h = self.fuse_proj(torch.cat((features, previous), dim=-1))
        rotary = rope_rotary(rope_table)
        for block in self.blocks:
            h = block(h, attn_mask=attn_mask, rotary=rotary)
        return self.head(self.norm(h.float()).to(self.head.weight.dtype)).float()[:, 1:]


class STARTransformer2DModel(CheckedLoadingMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""STAR: VAR made text-to-image.

    * The first token is ``text_proj(pooled text) + pos_start``; every token gets ``level_embedding[scale]``.
      There is no AdaLN: blocks are plain pre-LN (non-affine LayerNorm) blocks.
    * Positions come from a normalised 2D RoPE in self-attention (every scale spans ``[0, rope_norm]^2``);
      without RoPE (an ablation) a learned absolute ``pos_embed`` is added instead.
    * Every block cross-attends to the text encoder's hidden states (padding masked).
    * Head: optional non-affine LayerNorm (``logit_norm``) + Linear.
    * Optional stable-sampler head (:class:`STARStableSampler`) used from scale ``sampler_start_scale`` on.

    Args:
        depth (`int`, defaults to 16): number of transformer blocks (released: 16 and 30).
        embed_dim (`int`, defaults to 1024): width of the token stream (released: 1024 for d16, 1920 for d30).
        num_heads (`int`, defaults to 16): attention heads.
        mlp_ratio (`float`, defaults to 4.0): FFN width relative to ``embed_dim``.
        vocab_size (`int`, defaults to 4096): codebook size of the tokenizer.
        latent_channels (`int`, defaults to 32): code dimension of the tokenizer.
        patch_nums (`Sequence[int]`, defaults to `(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`): token-map side of every scale
            (must match the tokenizer).
        text_embed_dim (`int`, defaults to 1024): width of the text encoder states (1024 for SD-2.x CLIP, 2048 for
            flan-t5-xl).
        cross_attention (`bool`, defaults to `True`): cross-attention to the text in every block (False only in an
            ablation).
        rope (`bool`, defaults to `True`): normalised 2D RoPE (every release); False uses learned absolute positions.
        rope_theta (`float`, defaults to 10000.0): RoPE base.
        rope_norm (`float`, defaults to 64.0): the side of the normalised square every scale spans.
        logit_norm (`bool`, defaults to `True`): LayerNorm before the head (all releases; cannot be read from a
            checkpoint).
        num_legacy_classes (`int`, defaults to 1000): rows - 1 of the unused ``class_embedding`` the original keeps
            (and saves); 0 omits it.
        stable_sampler (`bool`, defaults to `False`): build the stable-sampler head.
        sampler_depth (`int`, defaults to 3): blocks of the stable-sampler head.
        sampler_start_scale (`int`, defaults to 9): first scale handled by the stable sampler (9 in every release).
        cross_attention_row0_quirk (`bool`, defaults to `False`): reproduce the released training code, in which
            every batch row adds the cross-attention output of **row 0** (``cross_attn(...)[0]``). Converted original
            checkpoints set it, because their weights were trained (and their outputs produced) that way; with it, a
            prompt's image depends on the first prompt of the batch and classifier-free guidance only differs
            through the start token. ``False``: each row attends to its own text.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        cond_drop_rate (`float`, defaults to 0.1): caption-dropout probability during training (classifier-free
            guidance), recorded for the trainer: a dropped caption is the empty text, which only the text encoder
            can encode, so ``forward`` drops nothing itself (unlike VAR's and Infinity's, whose null condition is a
            parameter of the model). Train on captions replaced by ``""`` with this probability, as
            ``diffusers-var train star`` does.
        drop_path_rate (`float`, defaults to 0.0): stochastic-depth rate of the last block (linearly increasing over
            depth).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["STARBlock"]
    _keep_in_fp32_modules = ["head"]  # the output heads (main and stable sampler) stay float32

    @register_to_config
    def __init__(
        self,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        text_embed_dim: int = 1024,
        cross_attention: bool = True,
        rope: bool = True,
        rope_theta: float = 10000.0,
        rope_norm: float = 64.0,
        logit_norm: bool = True,
        num_legacy_classes: int = 1000,
        stable_sampler: bool = False,
        sampler_depth: int = 3,
        sampler_start_scale: int = 9,
        cross_attention_row0_quirk: bool = False,
        norm_eps: float = 1e-6,
        cond_drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        patch_nums = validate_patch_nums(patch_nums)
        if stable_sampler and not 0 < sampler_start_scale < len(patch_nums):
            raise ValueError(
                f"`sampler_start_scale` must be in [1, {len(patch_nums) - 1}], got {sampler_start_scale}."
            )
        if stable_sampler and not rope:
            raise ValueError("`stable_sampler` needs `rope=True` (its text token uses RoPE row 0).")
        if stable_sampler and sampler_depth > depth:
            raise ValueError(f"`sampler_depth` ({sampler_depth}) cannot exceed `depth` ({depth}).")
        if embed_dim % num_heads or (rope and (embed_dim // num_heads) % 4):
            raise ValueError(
                "`embed_dim` / `num_heads` must be an integer divisible by 4 (2D RoPE), "
                f"got {embed_dim} / {num_heads}."
            )
        C = embed_dim
        self.num_scales = len(patch_nums)
        self.seq_len = sum(pn * pn for pn in patch_nums)
        self.begin_ends = scale_begin_ends(patch_nums)
        if patch_nums[0] != 1:
            raise ValueError(f"STAR starts from a single text token: `patch_nums[0]` must be 1, got {patch_nums[0]}.")

        self.text_proj = nn.Linear(text_embed_dim, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.input_proj = nn.Linear(latent_channels, C)
        self.level_embedding = nn.Embedding(self.num_scales, C)
        self.pos_embed = None if rope else nn.Parameter(torch.zeros(1, self.seq_len, C))
        self.class_embedding = nn.Embedding(num_legacy_classes + 1, C) if num_legacy_classes > 0 else None
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        cross_dim = text_embed_dim if cross_attention else None
        self.blocks = nn.ModuleList(
            [STARBlock(C, num_heads, mlp_ratio, norm_eps, cross_dim, rates[i]) for i in range(depth)]
        )
        self.head_norm = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False) if logit_norm else nn.Identity()
        self.head = nn.Linear(C, vocab_size)
        self.sampler = (
            STARStableSampler(
                C,
                num_heads,
                mlp_ratio,
                norm_eps,
                latent_channels,
                text_embed_dim,
                vocab_size,
                self.num_scales,
                sampler_depth,
                rates,
            )
            if stable_sampler
            else None
        )
        self._rope_tables: dict = {}  # complex tables per device; not a buffer, so dtype casts never touch them
        self.gradient_checkpointing = False

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def has_stable_sampler(self) -> bool:
        return self.sampler is not None

    @property
    def scale_input_channels(self) -> int:
        """Channels of a scale's input tokens (``scale_input`` of :meth:`forward_scale`)."""
        return self.config.latent_channels

    def rope_table(self, device=None) -> torch.Tensor | None:
        """(L, head_dim / 2) complex64 RoPE table of the whole pyramid on ``device`` (default: the CPU), or None
        without RoPE. Built once per device; not a buffer, so dtype casts and offloading never touch it."""
        if not self.config.rope:
            return None
        device = torch.device(device or "cpu")
        if device not in self._rope_tables:
            cfg = self.config
            self._rope_tables[device] = normalized_rope_2d_table(
                cfg.patch_nums, cfg.embed_dim // cfg.num_heads, cfg.rope_theta, cfg.rope_norm, device=device
            )
        return self._rope_tables[device]

    def _level_ids(self, begin: int, end: int, device) -> torch.LongTensor:
        """(1, end - begin) scale index of the pyramid positions [begin, end)."""
        for si, (b, e) in enumerate(self.begin_ends):
            if (b, e) == (begin, end):  # one scale: made on the device (no host copy inside a CUDA graph capture)
                return torch.full((1, e - b), si, dtype=torch.long, device=device)
        return scale_level_ids(self.config.patch_nums, device)[:, begin:end]

    def _position_embed(self, begin: int, end: int, device) -> torch.Tensor:
        embed = self.level_embedding(self._level_ids(begin, end, device))
        return embed if self.pos_embed is None else embed + self.pos_embed[:, begin:end]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Head: (optional) non-affine LayerNorm in float32, then the Linear; float32 logits."""
        return self.head(self.head_norm(hidden_states.float()).to(self.head.weight.dtype)).float()

    def _check_text(self, encoder_hidden_states, encoder_attention_mask, pooled_text_embeds, batch_size) -> None:
        D = self.config.text_embed_dim
        for name, value in (
            ("pooled_text_embeds", pooled_text_embeds),
            ("encoder_hidden_states", encoder_hidden_states),
            ("encoder_attention_mask", encoder_attention_mask),
        ):
            if value is not None and not torch.is_tensor(value):
                raise ValueError(f"`{name}` must be a torch tensor, got {type(value).__name__}.")
        if batch_size < 1:
            raise ValueError("`pooled_text_embeds`: the batch is empty; give at least one row.")
        if pooled_text_embeds is None or pooled_text_embeds.ndim != 2 or pooled_text_embeds.shape != (batch_size, D):
            raise ValueError(
                f"`pooled_text_embeds` must have shape ({batch_size}, {D}), got "
                f"{None if pooled_text_embeds is None else tuple(pooled_text_embeds.shape)}."
            )
        if self.config.cross_attention:
            if (
                encoder_hidden_states is None
                or encoder_hidden_states.ndim != 3
                or encoder_hidden_states.shape[0] != batch_size
                or encoder_hidden_states.shape[2] != D
            ):
                raise ValueError(
                    f"`encoder_hidden_states` must have shape ({batch_size}, N, {D}), got "
                    f"{None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}."
                )
            if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != tuple(
                encoder_hidden_states.shape[:2]
            ):
                raise ValueError(
                    f"`encoder_attention_mask` must have shape {tuple(encoder_hidden_states.shape[:2])}, "
                    f"got {tuple(encoder_attention_mask.shape)}."
                )
            # a row without a real token attends to nothing (NaN on some kernels); with the row-0 quirk every row
            # attends to row 0's text, so only that row's mask is read
            if encoder_attention_mask is not None and may_read_values(encoder_attention_mask, self.training):
                read = encoder_attention_mask[:1] if self.config.cross_attention_row0_quirk else encoder_attention_mask
                if not bool(read.bool().any(dim=1).all()):
                    raise ValueError(
                        "`encoder_attention_mask`: every row needs at least one real (non-padding) token."
                    )

    def _run_blocks(
        self, x_BLC, attn_mask, kv_cache, rotary, encoder_hidden_states, encoder_attention_mask
    ) -> torch.Tensor:
        row0 = self.config.cross_attention_row0_quirk
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(x_BLC.dtype)
        if row0 and encoder_attention_mask is not None and torch.is_grad_enabled():
            # the quirk's dropped rows still run: one that attends to no token is NaN on some kernels, and their
            # backward multiplies it by 0 into the weights' gradients
            encoder_attention_mask = attend_somewhere(encoder_attention_mask)
        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache[i] if kv_cache is not None else None
            args = (x_BLC, attn_mask, layer_cache, rotary, encoder_hidden_states, encoder_attention_mask, row0)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x_BLC = self._gradient_checkpointing_func(block, *args)
            else:
                x_BLC = block(*args)
        return x_BLC

    def start_token(self, pooled_text_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D_txt) pooled text -> (B, 1, C) first token (without the position / level embedding)."""
        return self.text_proj(pooled_text_embeds.to(self.pos_start.dtype)).unsqueeze(1) + self.pos_start

    # -- forward: teacher forcing (training) or one scale of decoding ---------------------------------
    def forward(
        self,
        teacher_forcing_input: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        pooled_text_embeds: torch.Tensor,
        return_dict: bool = True,
        scale_index: int | None = None,
        kv_cache: KVCache | None = None,
        sampler_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        r"""Teacher-forcing forward with the block-causal mask, or (``scale_index`` given) one scale of decoding, or
        (``sampler_inputs`` too) the stable sampler's logits of that scale (see :meth:`sampler_scale_logits`).

        Args:
            teacher_forcing_input: training: (B, L - 1, latent_channels), from
                :meth:`MultiScaleVQModel.teacher_forcing_input`; decoding: the scale's input (B, pn*pn,
                latent_channels) for scales >= 1, ``None`` at scale 0 (see :meth:`forward_scale`).
            encoder_hidden_states: (B, N, text_embed_dim) text encoder states (CLIP ``last_hidden_state``).
            encoder_attention_mask: (B, N), 1 for real tokens, 0 for padding.
            pooled_text_embeds: (B, text_embed_dim), CLIP's pooled EOS state (no projection).
            scale_index, kv_cache: decode this scale with the cache of :meth:`init_kv_cache` (scales in order).
            sampler_inputs: ``(hidden_states, committed_embeddings)`` of :meth:`sampler_scale_logits`.

        Returns logits (B, L, vocab_size) float32 and the last block's output (B, L, C) (decoding: the scale's rows,
        as a tuple; the stable sampler: its logits).
        """
        if sampler_inputs is not None:
            return self._sampler_scale_logits(scale_index, *sampler_inputs, pooled_text_embeds)
        if scale_index is not None:
            return self._decode_scale(
                scale_index,
                teacher_forcing_input,
                encoder_hidden_states,
                encoder_attention_mask,
                pooled_text_embeds,
                kv_cache,
            )
        expected = (self.seq_len - 1, self.config.latent_channels)
        if (
            not torch.is_tensor(teacher_forcing_input)
            or teacher_forcing_input.ndim != 3
            or tuple(teacher_forcing_input.shape[1:]) != expected
        ):
            tensor = torch.is_tensor(teacher_forcing_input)
            got = tuple(teacher_forcing_input.shape) if tensor else type(teacher_forcing_input).__name__
            raise ValueError(f"`teacher_forcing_input` must have shape (B, {expected[0]}, {expected[1]}), got {got}.")
        B = teacher_forcing_input.shape[0]
        self._check_text(encoder_hidden_states, encoder_attention_mask, pooled_text_embeds, B)
        x_BLC = torch.cat(
            (self.start_token(pooled_text_embeds), self.input_proj(teacher_forcing_input.to(self.pos_start.dtype))),
            dim=1,
        )
        x_BLC = x_BLC + self._position_embed(0, self.seq_len, x_BLC.device)
        attn_mask = block_causal_mask(self.config.patch_nums, device=x_BLC.device)
        table = self.rope_table(x_BLC.device)
        rotary = rope_rotary(table) if table is not None else None
        hidden = self._run_blocks(x_BLC, attn_mask, None, rotary, encoder_hidden_states, encoder_attention_mask)
        logits = self.compute_logits(hidden)
        if not return_dict:
            return (logits, hidden)
        return STARTransformerOutput(logits=logits, hidden_states=hidden)

    def sampler_attention_mask(self, device=None) -> torch.BoolTensor:
        """(1, 1, 1 + l, 1 + l) mask of the sampler's training forward: block-diagonal per scale over the
        scales it handles; the leading text token attends to, and is attended by, every position."""
        begin = self.begin_ends[self.config.sampler_start_scale][0]
        levels = self._level_ids(begin, self.seq_len, device)[0]
        allowed = levels[:, None] == levels[None, :]
        mask = torch.ones(allowed.shape[0] + 1, allowed.shape[0] + 1, dtype=torch.bool, device=device)
        mask[1:, 1:] = allowed
        return mask[None, None]

    def forward_sampler(
        self,
        hidden_states: torch.Tensor,
        known_embeddings: torch.Tensor,
        known_mask: torch.Tensor,
        pooled_text_embeds: torch.Tensor,
    ) -> torch.Tensor:
        r"""Stable-sampler logits over every token of the scales ``>= sampler_start_scale`` (training form).

        Args:
            hidden_states: (B, L, C) last-block output of :meth:`forward`.
            known_embeddings: (B, l, latent_channels) codebook vectors of those tokens.
            known_mask: (B, l), 1 where the token is given to the sampler, 0 where it must be predicted.
            pooled_text_embeds: (B, text_embed_dim).

        Returns (B, l, vocab_size) float32 logits.
        """
        if self.sampler is None:
            raise ValueError("this checkpoint has no stable-sampler head (`stable_sampler=False`).")
        begin = self.begin_ends[self.config.sampler_start_scale][0]
        B, known = pooled_text_embeds.shape[0], self.seq_len - begin
        C, Cv = self.config.embed_dim, self.config.latent_channels
        for name, tensor, shape in (
            ("hidden_states", hidden_states, (B, self.seq_len, C)),
            ("known_embeddings", known_embeddings, (B, known, Cv)),
            ("known_mask", known_mask, (B, known)),
        ):
            _check_shape(name, tensor, shape)
        device = hidden_states.device
        table = self.rope_table(device)
        rows = torch.cat((table[:1], table[begin:]))
        committed = known_embeddings * known_mask[..., None].to(known_embeddings.dtype)
        return self.sampler(
            committed,
            self._level_ids(begin, self.seq_len, device),
            hidden_states[:, begin:],
            pooled_text_embeds,
            rows,
            attn_mask=self.sampler_attention_mask(device),
        )

    # -- scale-by-scale decoding -------------------------------------------------------------------
    def init_kv_cache(self, scale_schedule=None) -> KVCache:
        """The KV cache of one generation: room for the scales of ``scale_schedule`` (the model's own schedule, or
        its first scales; default all of them)."""
        return square_kv_cache(len(self.blocks), self.config.patch_nums, scale_schedule)

    def forward_scale(
        self,
        scale_index: int,
        condition: tuple[torch.Tensor, ...],
        kv_cache: KVCache,
        scale_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One scale during sampling (scales in order, one ``kv_cache``; through ``forward``, so module hooks run).

        Args:
            scale_index: the scale to predict.
            condition: ``(encoder_hidden_states, encoder_attention_mask, pooled_text_embeds)`` of every row
                (conditional rows first, then unconditional).
            kv_cache: from :meth:`init_kv_cache`.
            scale_input: (B, pn*pn, latent_channels) for scale >= 1; ``None`` at scale 0.

        Returns ``(logits, hidden_states)``: (B, pn*pn, V) float32 and the last block's output (B, pn*pn, C).
        """
        encoder_hidden_states, encoder_attention_mask, pooled_text_embeds = condition
        return self(
            scale_input,
            encoder_hidden_states,
            encoder_attention_mask,
            pooled_text_embeds,
            scale_index=scale_index,
            kv_cache=kv_cache,
        )

    def _decode_scale(
        self,
        scale_index,
        scale_input,
        encoder_hidden_states,
        encoder_attention_mask,
        pooled_text_embeds,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_decoding_step(kv_cache, scale_index, len(self.blocks))
        begin, end = self.begin_ends[scale_index]
        B = pooled_text_embeds.shape[0]
        if scale_index == 0:
            self._check_text(encoder_hidden_states, encoder_attention_mask, pooled_text_embeds, B)
            x_BLC = self.start_token(pooled_text_embeds)
        else:
            if scale_input is None or tuple(scale_input.shape) != (B, end - begin, self.config.latent_channels):
                raise ValueError(
                    f"`scale_input` must have shape ({B}, {end - begin}, {self.config.latent_channels}) "
                    f"at scale {scale_index}."
                )
            x_BLC = self.input_proj(scale_input.to(self.pos_start.dtype))
        x_BLC = x_BLC + self._position_embed(begin, end, x_BLC.device)
        table = self.rope_table(x_BLC.device)
        rotary = rope_rotary(table[begin:end]) if table is not None else None
        hidden = self._run_blocks(x_BLC, None, kv_cache, rotary, encoder_hidden_states, encoder_attention_mask)
        return self.compute_logits(hidden), hidden

    def sampler_scale_logits(
        self,
        scale_index: int,
        hidden_states: torch.Tensor,
        committed_embeddings: torch.Tensor,
        pooled_text_embeds: torch.Tensor,
    ) -> torch.Tensor:
        r"""Stable-sampler logits of one scale during sampling (through ``forward``, so module hooks run).

        Args:
            hidden_states: (2B, pn*pn, C) the scale's last-block output from :meth:`forward_scale`.
            committed_embeddings: (B, pn*pn, latent_channels) codes committed so far (zeros elsewhere);
                shared by the conditional and unconditional rows.
            pooled_text_embeds: (2B, text_embed_dim).

        Returns (2B, pn*pn, V) float32 logits.
        """
        return self(
            None,
            None,
            None,
            pooled_text_embeds,
            scale_index=scale_index,
            sampler_inputs=(hidden_states, committed_embeddings),
        )

    def _sampler_scale_logits(self, scale_index: int, hidden_states, committed_embeddings, pooled_text_embeds):
        if self.sampler is None:
            raise ValueError("this checkpoint has no stable-sampler head (`stable_sampler=False`).")
        first, last = self.config.sampler_start_scale, len(self.begin_ends) - 1
        if not is_integer(scale_index) or not first <= scale_index <= last:  # (-1 read the last scale, 9 failed)
            raise ValueError(
                f"`scale_index` must be a scale the stable sampler runs, a whole number in [{first}, {last}] "
                f"(`sampler_start_scale` to the last), got {scale_index!r}."
            )
        begin, end = self.begin_ends[scale_index]
        rows_2B = pooled_text_embeds.shape[0]
        _check_shape("hidden_states", hidden_states, (rows_2B, end - begin, self.config.embed_dim))
        committed_rows = committed_embeddings.shape[0] if torch.is_tensor(committed_embeddings) else 0
        if committed_rows < 1 or rows_2B % committed_rows:
            raise ValueError(
                f"`committed_embeddings` must have a number of rows that divides the {rows_2B} rows of "
                f"`pooled_text_embeds` (shared by the guidance halves), got {committed_rows}."
            )
        _check_shape(
            "committed_embeddings", committed_embeddings, (committed_rows, end - begin, self.config.latent_channels)
        )
        device = hidden_states.device
        table = self.rope_table(device)
        rows = torch.cat((table[:1], table[begin:end]))
        repeats = rows_2B // committed_rows
        return self.sampler(
            committed_embeddings.repeat(repeats, 1, 1),
            self._level_ids(begin, end, device),
            hidden_states,
            pooled_text_embeds,
            rows,
        )

    # -- initialisation for training from scratch ----------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_head: float = 0.02, init_std: float = -1.0):
        """The original recipe: truncated normal (std sqrt(1/(3C))), scaled head and residual outputs."""
        C, depth = self.config.embed_dim, self.config.depth
        std = math.sqrt(1 / C / 3) if init_std < 0 else init_std
        init_linear_and_embedding_weights_(
            self, std, (self.pos_start, self.pos_embed, None if self.sampler is None else self.sampler.pos_start)
        )
        heads = [self.head] + ([self.sampler.head] if self.sampler is not None else [])
        for head in heads:
            head.weight.mul_(init_head)
            head.bias.zero_()
        for block in self.blocks:
            block.attn.to_out.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        for module in self.modules():
            if isinstance(module, (CosineSelfAttention, CosineCrossAttention)):
                module.log_scale.fill_(math.log(4.0))
                module.q_bias.zero_()
                module.v_bias.zero_()
