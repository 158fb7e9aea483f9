"""MultiScaleVQModel: the VAR / STAR image tokenizer.

A CNN VQ-VAE (taming-style encoder/decoder with a fused-qkv attention block) whose latent is quantised
by a *multi-scale residual* quantizer: scale ``k`` quantises the area-downsampled residual to a
``pn_k x pn_k`` token map, upsamples its codebook vectors back (bicubic), refines them with a small
conv ``Phi`` and subtracts them from the residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from .blocks import validate_patch_nums
from .loading import CheckedLoadingMixin
from .slicing import SlicedDecodingMixin, check_image_values, check_token_values


# ----------------------------------------------------------------------------------------------
# CNN encoder / decoder
# ----------------------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class SpatialSelfAttention(nn.Module):
    """Single-head attention over all spatial positions, one fused 1x1 qkv conv (q|k|v channel blocks)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # scale C^-0.5
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResnetBlocks, optional attention after each, optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample_name is not None:
            h = getattr(self, self.resample_name)(h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = SpatialSelfAttention(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, z_channels, dropout, using_sa, using_mid_sa):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        levels, block_in, n = [], ch, len(ch_mult)
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == n - 1 and using_sa:
                    attns.append(SpatialSelfAttention(block_in))
            levels.append(_Level(blocks, attns, Downsample2x(block_in) if level != n - 1 else None, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Middle(block_in, dropout, using_mid_sa)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, z_channels, dropout, using_sa, using_mid_sa):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Middle(block_in, dropout, using_mid_sa)
        levels = [None] * n
        for level in reversed(range(n)):  # built (and run) from the lowest resolution up
            block_out = ch * ch_mult[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == n - 1 and using_sa:
                    attns.append(SpatialSelfAttention(block_in))
            levels[level] = _Level(blocks, attns, Upsample2x(block_in) if level != 0 else None, "upsample")
        self.up = nn.ModuleList(levels)  # index = level, so up[n-1] runs first
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Multi-scale residual quantizer
# ----------------------------------------------------------------------------------------------
def phi_index(scale_index: int, num_scales: int, num_phi: int) -> int:
    """Which Phi conv scale ``scale_index`` of ``num_scales`` uses.

    Reproduces the original numpy float64 computation bit for bit: exact ties between ticks
    (e.g. 10 scales, scale 2) are decided by float64 rounding, and exact-rational or float32
    re-derivations give different (wrong) tables.
    """
    if num_phi <= 1:
        return 0
    position = scale_index / (num_scales - 1) if num_scales > 1 else 0.0
    if num_phi == 4:
        ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    else:
        ticks = np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi)
    return int(np.argmin(np.abs(ticks - position)).item())


def area_down(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="area")


def bicubic_up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling (``align_corners=False``) of (B, C, h, w) maps to ``size x size``, in ``x``'s dtype."""
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


class MultiScaleResidualQuantizer(nn.Module):
    def __init__(self, vocab_size, z_channels, patch_nums, quant_resi, share_quant_resi, beta, using_znorm=False):
        super().__init__()
        self.vocab_size, self.z_channels, self.beta = vocab_size, z_channels, beta
        self.using_znorm = using_znorm
        self.patch_nums = tuple(patch_nums)
        self.phi_ratio = abs(quant_resi)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        num_phi = share_quant_resi if share_quant_resi > 0 else len(patch_nums)
        # Phi_j(x) = (1 - r) x + r conv_j(x); no convs at all when r ~ 0 (Phi is the identity).
        self.phi = nn.ModuleList(
            [nn.Conv2d(z_channels, z_channels, 3, 1, 1) for _ in range(num_phi)] if self.phi_ratio > 1e-6 else []
        )
        # Codebook usage statistics (EMA of hits per scale); training diagnostics only.
        self.register_buffer("codebook_usage", torch.zeros(len(patch_nums), vocab_size))

    def upsample(self, codes_BChw: torch.Tensor, size: int) -> torch.Tensor:
        """A scale's code map up to the latent side (the fast path swaps in another kernel for the same maths)."""
        return bicubic_up(codes_BChw, size)

    def scale_contribution(
        self, codes_BChw: torch.Tensor, scale_index: int, num_scales: int, side: int, contiguous: bool = False
    ) -> torch.Tensor:
        """What scale ``scale_index`` adds to f_hat: ``Phi_k(up(codes))`` in float32 (no upsampling at the last
        scale, whose map already has the latent side). ``contiguous``: Phi reads the map in NCHW order, as the
        original's encoding does (its generation does not); the layout picks Phi's convolution kernel, which rounds
        differently."""
        h = codes_BChw.float()
        if scale_index != num_scales - 1:
            h = self.upsample(h, side)
        return self.apply_phi(h.contiguous() if contiguous else h, scale_index, num_scales)

    def apply_phi(self, h_BChw: torch.Tensor, scale_index: int, num_scales: int) -> torch.Tensor:
        if len(self.phi) == 0:
            return h_BChw
        conv = self.phi[phi_index(scale_index, num_scales, len(self.phi))]
        refined = conv(h_BChw.to(conv.weight.dtype)).to(h_BChw.dtype)  # f_hat stays float32 in low-precision models
        return h_BChw.mul(1 - self.phi_ratio) + refined.mul_(self.phi_ratio)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.LongTensor:
        """Index of the closest codebook vector (squared L2, first minimum on ties; with ``using_znorm`` the largest
        cosine similarity)."""
        # the codebook read through the embedding module: offloading hooks (leaf-level group offloading) move it here
        rows = torch.arange(self.embedding.num_embeddings, device=z_NC.device)
        codebook = self.embedding(rows).detach().float()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook.T, dim=0), dim=1)
        dist = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1)
        dist.addmm_(z_NC, codebook.T, alpha=-2, beta=1)
        return dist.argmin(dim=1)

    def embed(self, indices_Bl: torch.LongTensor, side: int) -> torch.Tensor:
        """(B, side*side) indices -> (B, Cv, side, side) codebook vectors."""
        B = indices_Bl.shape[0]
        return self.embedding(indices_Bl).float().transpose(1, 2).reshape(B, self.z_channels, side, side)

    def quantize(
        self,
        f_BChw: torch.Tensor,
        patch_nums: Sequence[int],
        return_fhat: bool = False,
        keep: Sequence[torch.Tensor] | None = None,
        kept_indices: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Residual quantisation along ``patch_nums``: per scale the indices (B, pn*pn), or the cumulative f_hat.
        With ``keep`` (per scale (B, pn, pn) bool) the tokens where it is True are ``kept_indices``' and the others
        are quantised from the residual that f and the kept ones leave."""
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        B, C, H, W = f_rest.shape
        S, outputs = len(patch_nums), []
        for si, pn in enumerate(patch_nums):
            z = f_rest if si == S - 1 else area_down(f_rest, pn)
            idx_N = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C))
            if keep is not None:
                idx_N = torch.where(keep[si].reshape(-1), kept_indices[si].reshape(-1), idx_N)
            h = self.scale_contribution(
                self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2), si, S, H, contiguous=True
            )
            f_hat.add_(h)
            f_rest.sub_(h)
            outputs.append(f_hat.clone() if return_fhat else idx_N.reshape(B, pn * pn))
        return outputs


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
@dataclass
class MultiScaleVQOutput(BaseOutput):
    """Output of :meth:`MultiScaleVQModel.forward` (tokenizer training)."""

    sample: torch.Tensor  # reconstruction, not clamped
    vq_loss: torch.Tensor | None = None  # defaults: accelerate rebuilds outputs from a dict
    indices: list | None = None


class MultiScaleVQModel(CheckedLoadingMixin, ModelMixin, ConfigMixin, SlicedDecodingMixin):
    r"""VAR's multi-scale VQ-VAE tokenizer.

    Images are in ``[-1, 1]``. A total downsampling of ``2 ** (len(ch_mult) - 1)`` maps the image to an
    ``h x h`` latent (``h = patch_nums[-1]``), which the residual quantizer turns into one token map per
    scale. The same weights serve every resolution whose latent side equals ``patch_nums[-1]``.

    Args:
        in_channels (`int`, defaults to 3): image channels.
        ch (`int`, defaults to 160): CNN width of the first level.
        ch_mult (`Sequence[int]`, defaults to `(1, 1, 2, 2, 4)`): per-level width multipliers (``len - 1`` stride-2
            stages).
        num_res_blocks (`int`, defaults to 2): ResnetBlocks per encoder level (the decoder uses one more).
        dropout (`float`, defaults to 0.0): dropout inside the ResnetBlocks (training).
        vocab_size (`int`, defaults to 4096): codebook size.
        z_channels (`int`, defaults to 32): latent / code dimension.
        patch_nums (`Sequence[int]`, defaults to `(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`): side of every scale's token
            map; must match the transformer's.
        quant_resi (`float`, defaults to 0.5): Phi mixing ratio ``r`` in ``(1 - r) x + r conv(x)``; ``0`` disables Phi.
        share_quant_resi (`int`, defaults to 4): number of Phi convs shared across scales (``0`` = one per scale).
        beta (`float`, defaults to 0.25): commitment weight of the VQ loss (training only).
        using_sa (`bool`, defaults to `True`): spatial attention at the lowest resolution level.
        using_mid_sa (`bool`, defaults to `True`): spatial attention in the middle block.
        quant_conv_ks (`int`, defaults to 3): kernel size of ``quant_conv`` / ``post_quant_conv`` (1 or 3).
        using_znorm (`bool`, defaults to `False`): pick codes by cosine similarity instead of L2 distance (an
            option of the original's tokenizer training, off in its release; nothing in the weights records it).
    """

    # its convolutions take their input's dtype from their weights, which layerwise casting stores in float8; it is
    # small beside the transformer, whose casting saves the memory
    _layerwise_casting_refusal = (
        "does not take layerwise casting: the image tokenizer is small beside the transformer (cast that one), and "
        "its inputs follow its stored weights' dtype."
    )

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 160,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        vocab_size: int = 4096,
        z_channels: int = 32,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        beta: float = 0.25,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        quant_conv_ks: int = 3,
        using_znorm: bool = False,
    ):
        super().__init__()
        patch_nums = validate_patch_nums(patch_nums)
        if ch % 32 or any((ch * m) % 32 for m in ch_mult):
            raise ValueError(
                f"`ch` * every `ch_mult` must be a multiple of 32 (GroupNorm(32)); got ch={ch}, ch_mult={ch_mult}."
            )
        if quant_conv_ks not in (1, 3):
            raise ValueError(f"`quant_conv_ks` must be 1 or 3, got {quant_conv_ks}.")
        if not isinstance(using_znorm, bool):
            raise ValueError(f"`using_znorm` must be True or False, got {using_znorm!r}.")
        args = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            dropout=dropout,
            using_sa=using_sa,
            using_mid_sa=using_mid_sa,
        )
        self.encoder = Encoder(in_channels, **args)
        self.decoder = Decoder(in_channels, **args)
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, pad)
        self.quantize = MultiScaleResidualQuantizer(
            vocab_size, z_channels, patch_nums, quant_resi, share_quant_resi, beta, using_znorm
        )

    # -- properties ---------------------------------------------------------------------------
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.config.patch_nums)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def codebook(self) -> torch.Tensor:
        """(vocab_size, z_channels) codebook vectors (the parameter itself; sampling uses :meth:`embed_tokens`)."""
        return self.quantize.embedding.weight

    def embed_tokens(self, indices: torch.LongTensor) -> torch.Tensor:
        """Codebook vectors (float32) of token indices of any shape, looked up through the embedding module, so
        offloading hooks move the codebook where the indices are."""
        return self.quantize.embedding(indices).float()

    def codebook_vectors(self, device) -> torch.Tensor:
        """(vocab_size, z_channels) float32 codebook on ``device`` for soft mixtures of codes (``more_smooth``),
        through the embedding module like :meth:`embed_tokens`."""
        return self.embed_tokens(torch.arange(self.config.vocab_size, device=device))

    def _check_images(self, images: torch.Tensor) -> None:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`images` must be a (B, {self.config.in_channels}, H, W) tensor in [-1, 1], got "
                f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}."
            )
        if not images.is_floating_point():  # (a dtype check costs no sync: uint8 pixels were read as floats)
            check_image_values(images)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"`images` must be square (the token maps are square), got {tuple(images.shape[-2:])}.")
        if images.shape[-1] % self.downsample_factor:
            raise ValueError(
                f"`images` height and width must be multiples of {self.downsample_factor}, "
                f"got {tuple(images.shape[-2:])}."
            )

    def _resolve_patch_nums(self, patch_nums, latent_side: int) -> tuple[int, ...]:
        patch_nums = self.patch_nums if patch_nums is None else validate_patch_nums(patch_nums)
        if patch_nums[-1] != latent_side:
            raise ValueError(
                f"`images` give a {latent_side}x{latent_side} latent, but the scale schedule `patch_nums` "
                f"{patch_nums} ends at {patch_nums[-1]}: use "
                f"{patch_nums[-1] * self.downsample_factor}x{patch_nums[-1] * self.downsample_factor} images "
                f"or pass a `patch_nums` ending at {latent_side}."
            )
        return patch_nums

    # -- encoding ------------------------------------------------------------------------------
    @apply_forward_hook
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> continuous latent f (B, Cv, H/16, W/16), before quantisation. Checks
        the images' shape only (trainers call it every step: the values of :meth:`encode_indices`' check would cost
        a device sync each)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images.to(self.encoder.conv_in.weight.dtype))).float()

    @apply_forward_hook
    def encode_indices(self, images: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.LongTensor]:
        """Images (B, 3, H, W) in [-1, 1] -> list of LongTensor (B, pn*pn), one per scale (row-major)."""
        self._check_images(images)
        check_image_values(images)
        return self.quantize_latent(self.encode_latent(images), patch_nums)

    def quantize_latent(self, f: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.LongTensor]:
        """A continuous latent of :meth:`encode_latent` -> its token pyramid, as :meth:`encode_indices` (the two
        halves apart, so a trainer can run the encoder in another precision than the quantiser)."""
        return self.quantize.quantize(f.float(), self._resolve_patch_nums(patch_nums, f.shape[-1]))

    @apply_forward_hook
    def encode_indices_keeping(
        self, images: torch.Tensor, kept_indices: Sequence[torch.LongTensor], keep: Sequence[torch.Tensor]
    ) -> list[torch.LongTensor]:
        """The token pyramid of ``images`` in which the tokens where ``keep`` (per scale (B, pn, pn) bool) is True
        are ``kept_indices``' ((B, pn*pn) per scale, e.g. another image's ``encode_indices``): the others are
        quantised from the residual that the image and the kept tokens leave, scale by scale. This is what an edit
        that keeps those tokens should sample (the targets of edit fine-tuning)."""
        patch_nums = self._check_indices(kept_indices, "kept_indices")
        self._check_images(images)
        check_image_values(images)
        rows = kept_indices[0].shape[0]
        if (
            not isinstance(keep, (list, tuple))
            or len(keep) != len(patch_nums)
            or not all(torch.is_tensor(k) and k.dtype == torch.bool for k in keep)
            or any(tuple(k.shape) != (rows, pn, pn) for k, pn in zip(keep, patch_nums))
        ):
            raise ValueError(f"`keep` must hold one ({rows}, pn, pn) bool mask per scale of {patch_nums}.")
        if images.shape[0] != rows:
            raise ValueError(f"`images` has {images.shape[0]} rows and `kept_indices` {rows}: one per image.")
        f = self.encode_latent(images)
        return self.quantize.quantize(f, self._resolve_patch_nums(patch_nums, f.shape[-1]), False, keep, kept_indices)

    @apply_forward_hook
    def encode_fhat(self, images: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Images -> cumulative quantised latent after each scale (the last one is the reconstruction latent)."""
        self._check_images(images)
        check_image_values(images)
        f = self.encode_latent(images)
        return self.quantize.quantize(f, self._resolve_patch_nums(patch_nums, f.shape[-1]), return_fhat=True)

    # -- from tokens to latents ------------------------------------------------------------------
    def _check_indices(self, indices, name: str = "indices", values: bool = True) -> tuple[int, ...]:
        """A token pyramid: integer tensors (B, pn*pn) with one batch, strictly growing sides, and (``values``, one
        device sync) codebook indices."""
        if not isinstance(indices, (list, tuple)) or not indices:
            raise ValueError(f"`{name}` must be a non-empty list of LongTensors (B, pn*pn), one per scale.")
        patch_nums = []
        for i, idx in enumerate(indices):
            if not torch.is_tensor(idx) or idx.dtype not in (torch.int64, torch.int32):
                got = idx.dtype if torch.is_tensor(idx) else type(idx).__name__
                raise ValueError(f"`{name}[{i}]` must be an int64 / int32 tensor (B, pn*pn), got {got}.")
            side = round(idx.shape[-1] ** 0.5) if idx.ndim else 0
            if idx.ndim != 2 or side * side != idx.shape[-1] or idx.shape[0] != indices[0].shape[0]:
                raise ValueError(
                    f"`{name}[{i}]` must have shape (B, pn*pn) with the batch of `{name}[0]`, got {tuple(idx.shape)}."
                )
            patch_nums.append(side)
        if any(p < 1 for p in patch_nums) or any(b <= a for a, b in zip(patch_nums, patch_nums[1:])):
            raise ValueError(f"`{name}` must go from small to large scales (growing sides), got {patch_nums}.")
        if values:
            check_token_values(indices, 0, self.config.vocab_size - 1, name)
        return tuple(patch_nums)

    @apply_forward_hook
    def indices_to_fhat(self, indices: Sequence[torch.LongTensor], all_scales: bool = False):
        """Token pyramid -> f_hat (B, Cv, h, h); with ``all_scales`` the list of cumulative f_hat per scale."""
        patch_nums = self._check_indices(indices)
        return self.embeddings_to_fhat(
            [self.quantize.embed(idx, pn) for idx, pn in zip(indices, patch_nums)], all_scales
        )

    def embeddings_to_fhat(self, embeddings_BChw: Sequence[torch.Tensor], all_scales: bool = False):
        """Per-scale code maps (B, Cv, pn, pn) -> f_hat (each upsampled to h x h, refined by Phi, summed)."""
        S, side = len(embeddings_BChw), embeddings_BChw[-1].shape[-1]
        f_hat = embeddings_BChw[0].new_zeros(
            embeddings_BChw[0].shape[0], self.config.z_channels, side, side, dtype=torch.float32
        )
        cumulative = []
        for si, h in enumerate(embeddings_BChw):
            f_hat.add_(self.quantize.scale_contribution(h, si, S, side))
            if all_scales:
                cumulative.append(f_hat.clone())
        return cumulative if all_scales else f_hat

    @apply_forward_hook
    def teacher_forcing_input(self, indices: Sequence[torch.LongTensor]) -> torch.Tensor:
        """Ground-truth token pyramid -> transformer training input (B, L - pn_0^2, Cv).

        The input of scale k+1 is the cumulative f_hat of scales 0..k, area-downsampled to pn_{k+1}. The indices'
        values are not checked (trainers call it every step with :meth:`encode_indices`' tokens; a check would cost a
        device sync each).
        """
        patch_nums = self._check_indices(indices, values=False)
        side, S = patch_nums[-1], len(patch_nums)
        B = indices[0].shape[0]
        f_hat = torch.zeros(B, self.config.z_channels, side, side, device=indices[0].device)
        inputs = []
        for si in range(S - 1):
            f_hat = f_hat + self.quantize.scale_contribution(
                self.quantize.embed(indices[si], patch_nums[si]), si, S, side
            )
            inputs.append(area_down(f_hat, patch_nums[si + 1]).flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    @apply_forward_hook
    def next_scale_input(
        self,
        scale_index: int,
        f_hat: torch.Tensor,
        embedding_BChw: torch.Tensor,
        patch_nums: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling step: add scale ``scale_index``'s code map to ``f_hat`` (in place) and return
        ``(f_hat, next_input)`` where ``next_input`` is f_hat area-downsampled to the next scale
        (or f_hat itself after the last scale)."""
        patch_nums = self.patch_nums if patch_nums is None else tuple(patch_nums)
        S, side = len(patch_nums), patch_nums[-1]
        f_hat.add_(self.quantize.scale_contribution(embedding_BChw, scale_index, S, side))
        if scale_index == S - 1:
            return f_hat, f_hat
        return f_hat, area_down(f_hat, patch_nums[scale_index + 1])

    # -- decoding --------------------------------------------------------------------------------
    @apply_forward_hook
    def decode_latent(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cv, h, h) -> images (B, 3, 16h, 16h) clamped to [-1, 1] (in slices after ``enable_slicing``)."""
        return self._decode_sliced(self._decode_latent_batch, f_hat, self.config.z_channels, "f_hat")

    def _decode_latent_batch(self, f_hat: torch.Tensor) -> torch.Tensor:
        # out of place: a decoder compiled into CUDA graphs (a user's torch.compile mode) reuses its output buffer
        return self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))).float().clamp(-1, 1)

    @apply_forward_hook
    def decode_indices(self, indices: Sequence[torch.LongTensor]) -> torch.Tensor:
        """List of LongTensor (B, pn*pn), one per scale -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_latent(self.indices_to_fhat(indices))

    # -- tokenizer training ----------------------------------------------------------------------
    def forward(self, images: torch.Tensor, return_dict: bool = True):
        """Tokenizer training step: straight-through multi-scale quantisation.

        Returns the (unclamped) reconstruction, the VQ loss (mean over scales of
        ``beta * |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2``) and the token pyramid.
        """
        f = self.encode_latent(images)  # (the images in the encoder's dtype)
        B, C, H, W = f.shape
        q = self.quantize
        patch_nums = self._resolve_patch_nums(None, W)
        S = len(patch_nums)
        f_detached = f.detach()
        f_rest, f_hat = f_detached.clone(), torch.zeros_like(f)
        vq_loss, indices = 0.0, []
        for si, pn in enumerate(patch_nums):
            z = f_rest if si == S - 1 else area_down(f_rest, pn)
            idx_N = q.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C))
            if self.training:
                hits = idx_N.bincount(minlength=q.vocab_size).float()
                q.codebook_usage[si].mul_(0.99).add_(hits, alpha=0.01)
            h = q.scale_contribution(q.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2), si, S, H, contiguous=True)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f).mul(q.beta) + F.mse_loss(f_hat, f_detached)
            indices.append(idx_N.reshape(B, pn * pn))
        vq_loss = vq_loss / S
        f_hat_st = (f_hat.detach() - f_detached) + f  # straight-through
        recon = self.decoder(self.post_quant_conv(f_hat_st.to(self.dtype)))
        if not return_dict:
            return recon, vq_loss, indices
        return MultiScaleVQOutput(sample=recon, vq_loss=vq_loss, indices=indices)
