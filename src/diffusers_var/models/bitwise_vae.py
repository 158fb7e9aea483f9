"""BitwiseMultiScaleVAE: Infinity's tokenizer (FoundationVision/Infinity ``bsq_vae``).

A convolutional autoencoder whose latent (``codebook_dim`` channels) is quantised scale by scale with
binary spherical quantisation (BSQ): every latent position of every scale carries ``codebook_dim`` bits,
each bit selecting ``+-1/sqrt(d)`` on one channel. The image latent is the sum over scales of the
(bilinearly upsampled) codes.

Schedules passed to this model are the transformer's token grids ``[(h, w), ...]``. With
``spatial_patchify`` (Infinity-8B) the VAE works on ``(2h, 2w)`` and a transformer token packs a 2x2 block
of latent positions (``4 * codebook_dim`` bits, channel ``4c + 2dy + dx``).
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

from ..scalars import is_integer, is_number
from .dynamic_resolution import normalize_schedule
from .loading import CheckedLoadingMixin
from .slicing import SlicedDecodingMixin, check_image_values, check_token_values


def _group_norm(channels: int) -> nn.GroupNorm:
    """32 groups when they divide the width, else 24 (the original's rule), eps 1e-6."""
    for groups in (32, 24):
        if channels % groups == 0:
            return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
    raise ValueError(f"VAE width {channels} is divisible by neither 32 nor 24 (GroupNorm groups).")


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Res-blocks of one resolution level plus an optional resampler (``downsample`` / ``upsample``)."""

    def __init__(self, channels: Sequence[int], resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))
        if resample == "down":
            self.downsample = Downsample(channels[-1])
        elif resample == "up":
            self.upsample = Upsample(channels[-1])


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class BitwiseEncoder(nn.Module):
    def __init__(
        self, in_channels: int, base_channels: int, ch_mult: Sequence[int], num_res_blocks: int, out_channels: int
    ):
        super().__init__()
        widths = [base_channels * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        previous = base_channels
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(_Level([previous] + [width] * num_res_blocks, None if last else "down"))
            previous = width
        self.mid = _Mid(previous)
        self.norm_out = _group_norm(previous)
        self.conv_out = nn.Conv2d(previous, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BitwiseDecoder(nn.Module):
    def __init__(
        self, in_channels: int, base_channels: int, ch_mult: Sequence[int], num_res_blocks: int, out_channels: int
    ):
        super().__init__()
        widths = [base_channels * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, widths[-1], 3, padding=1)
        self.mid = _Mid(widths[-1])
        levels, previous = {}, widths[-1]
        for i in reversed(range(len(widths))):  # highest level first; stored by level index
            levels[i] = _Level([previous] + [widths[i]] * (num_res_blocks + 1), "up" if i > 0 else None)
            previous = widths[i]
        self.up = nn.ModuleList(levels[i] for i in range(len(widths)))
        self.norm_out = _group_norm(previous)
        self.conv_out = nn.Conv2d(previous, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Resizing on the original's (B, d, 1, h, w) layout, so interpolation weights match bit for bit
# ----------------------------------------------------------------------------------------------
def area_resize(x_BdHW: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x_BdHW.shape[-2:]) == tuple(size_hw):
        return x_BdHW
    return F.interpolate(x_BdHW.unsqueeze(2), size=(1, *size_hw), mode="area").squeeze(2)


def trilinear_resize(x_BdHW: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x_BdHW.shape[-2:]) == tuple(size_hw):
        return x_BdHW
    return F.interpolate(x_BdHW.unsqueeze(2), size=(1, *size_hw), mode="trilinear", align_corners=False).squeeze(2)


@dataclass
class BitwiseEncodeOutput(BaseOutput):
    """``features`` (B, d, H, W): raw encoder output. ``quantized`` (B, d, H, W): sum of the upsampled codes.
    ``bit_labels``: per scale (B, h, w, d) uint8 in latent layout. ``quantizer_inputs``: per scale the
    (area-resized) residual whose sign gives the bits. ``area_next_inputs``: the quantizer's own next-scale
    inputs (area-downsampled running sum, scales 1..K-1), which the transformer does NOT consume."""

    features: torch.Tensor
    quantized: torch.Tensor | None = None  # defaults: accelerate rebuilds outputs from a dict
    bit_labels: list | None = None
    quantizer_inputs: list | None = None
    area_next_inputs: list | None = None


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


class BitwiseMultiScaleVAE(CheckedLoadingMixin, ModelMixin, ConfigMixin, SlicedDecodingMixin):
    r"""Infinity's multi-scale BSQ autoencoder.

    Args:
        in_channels (`int`, defaults to 3): image channels of the encoder input.
        out_channels (`int`, defaults to 3): image channels of the decoder output.
        base_channels (`int`, defaults to 128): width of the first level.
        encoder_ch_mult (`Sequence[int]`, defaults to `(1, 2, 4, 4, 4)`): per-level width multipliers of the
            encoder; ``len - 1`` stride-2 stages (``[1, 2, 4, 4, 4]``: stride 16; ``[1, 2, 4, 4]``: stride 8).
        decoder_ch_mult (`Sequence[int]`, defaults to `(1, 2, 4, 4, 4)`): the same for the decoder.
        num_res_blocks (`int`, defaults to 2): res-blocks per encoder level (decoder levels have one more).
        codebook_dim (`int`, defaults to 32): bits per latent position (``d``).
        spatial_patchify (`bool`, defaults to `False`): a transformer token packs 2x2 latent positions (the
            Infinity-8B tokenizer).
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
        out_channels: int = 3,
        base_channels: int = 128,
        encoder_ch_mult: Sequence[int] = (1, 2, 4, 4, 4),
        decoder_ch_mult: Sequence[int] = (1, 2, 4, 4, 4),
        num_res_blocks: int = 2,
        codebook_dim: int = 32,
        spatial_patchify: bool = False,
    ):
        super().__init__()
        if len(encoder_ch_mult) != len(decoder_ch_mult):
            raise ValueError("`encoder_ch_mult` and `decoder_ch_mult` must have the same number of levels.")
        if codebook_dim < 1:
            raise ValueError(f"`codebook_dim` must be >= 1, got {codebook_dim}.")
        self.encoder = BitwiseEncoder(in_channels, base_channels, encoder_ch_mult, num_res_blocks, codebook_dim)
        self.decoder = BitwiseDecoder(codebook_dim, base_channels, decoder_ch_mult, num_res_blocks, out_channels)

    # -- geometry --------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    @property
    def patch_factor(self) -> int:
        return 2 if self.config.spatial_patchify else 1

    @property
    def pixels_per_token(self) -> int:
        return self.downsample_factor * self.patch_factor

    @property
    def bits_per_token(self) -> int:
        return self.config.codebook_dim * self.patch_factor**2

    def latent_schedule(self, scale_schedule) -> list[tuple[int, int]]:
        """Token grids -> the latent grids the quantizer works on (x2 per side with patchify)."""
        p = self.patch_factor
        return [(h * p, w * p) for h, w in normalize_schedule(scale_schedule)]

    # -- BSQ ---------------------------------------------------------------------------------------
    def bits_to_codes(self, bits_BdHW: torch.Tensor) -> torch.Tensor:
        """Bits (B, d, h, w) -> codes ``(2 bit - 1) / sqrt(d)``, L2-normalised over d as the original."""
        d = bits_BdHW.shape[1]
        codes = bits_BdHW.float() * (2 / d**0.5) - 1 / d**0.5
        return F.normalize(codes, dim=1)

    def token_bits_to_latent_bits(self, bits_BhwK: torch.Tensor) -> torch.Tensor:
        """(B, h, w, bits_per_token) -> latent layout (B, d, h*p, w*p) (pixel_shuffle with patchify)."""
        bits = bits_BhwK.permute(0, 3, 1, 2)
        return F.pixel_shuffle(bits.float(), 2).to(bits.dtype) if self.config.spatial_patchify else bits

    def latent_to_tokens(self, x_BdHW: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) -> (B, h*w, bits_per_token) row-major tokens (pixel_unshuffle with patchify)."""
        if self.config.spatial_patchify:
            x_BdHW = F.pixel_unshuffle(x_BdHW, 2)
        return x_BdHW.flatten(2).transpose(1, 2)

    @staticmethod
    def scale_contribution(codes_BdHW: torch.Tensor, full_hw: tuple[int, int]) -> torch.Tensor:
        """What one scale adds to the running sum of codes: its codes resized to the full latent grid."""
        return trilinear_resize(codes_BdHW, tuple(full_hw))

    @staticmethod
    def _bsq(residual_BdHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bits (residual > 0) and the straight-through quantised value of the normalised residual."""
        d = residual_BdHW.shape[1]
        unit = F.normalize(residual_BdHW, dim=1, eps=1e-12)
        bits = unit > 0
        quantized = bits.to(unit.dtype).mul(2).sub(1).mul(1 / d**0.5)  # the original's q_scale * (+-1), exactly
        return bits, unit + (quantized - unit).detach()  # straight-through: forward = quantized, gradient = identity

    # -- encode / decode ---------------------------------------------------------------------------
    @apply_forward_hook
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> raw latent features (B, d, H/s, W/s). Checks the images' shape only
        (trainers call it every step: the values of :meth:`encode`'s check would cost a device sync each)."""
        self._check_images(images)
        return self.encoder(images.to(next(self.encoder.parameters()).dtype))  # (float32 images, a bf16 model)

    def _check_images(self, images) -> None:
        channels = self.config.in_channels
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != channels:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"`images` must be a (B, {channels}, H, W) tensor in [-1, 1], got {got}.")
        if not images.is_floating_point():  # (a dtype check costs no sync: uint8 pixels were read as floats)
            check_image_values(images)
        if images.shape[-1] % self.downsample_factor or images.shape[-2] % self.downsample_factor:
            raise ValueError(  # the encoder's strided convs would drop the last rows / columns
                f"`images` height and width must be multiples of {self.downsample_factor}, "
                f"got {tuple(images.shape[-2:])}."
            )

    @apply_forward_hook
    def encode(self, images: torch.Tensor, scale_schedule, return_dict: bool = True):
        """Multi-scale BSQ of the encoder features along ``scale_schedule`` (transformer token grids)."""
        self._check_images(images)
        check_image_values(images)
        features = self.encode_features(images)
        out = self.quantize(features, scale_schedule)
        return out if return_dict else tuple(out.values())

    def _checked_latent_sizes(self, features_BdHW, scale_schedule) -> list[tuple[int, int]]:
        """The latent grids of ``scale_schedule`` for ``features_BdHW``; a ValueError naming the argument unless the
        features are the encoder's (B, d, H, W) and the schedule grows scale by scale up to their H x W."""
        d = self.config.codebook_dim
        if not torch.is_tensor(features_BdHW) or features_BdHW.ndim != 4 or features_BdHW.shape[1] != d:
            got = tuple(features_BdHW.shape) if torch.is_tensor(features_BdHW) else type(features_BdHW).__name__
            raise ValueError(f"`features_BdHW` must be the encoder's (B, {d}, H, W) features, got {got}.")
        sizes = self.latent_schedule(scale_schedule)
        if any(b[0] < a[0] or b[1] < a[1] for a, b in zip(sizes, sizes[1:])):
            raise ValueError(
                f"`scale_schedule` must grow scale by scale (no grid smaller than the one before), got {sizes}."
            )
        full = tuple(features_BdHW.shape[-2:])
        if sizes[-1] != full:
            raise ValueError(f"`scale_schedule` ends at latent size {sizes[-1]} but the features are {full}.")
        return sizes

    def quantize(self, features_BdHW: torch.Tensor, scale_schedule) -> BitwiseEncodeOutput:
        sizes = self._checked_latent_sizes(features_BdHW, scale_schedule)
        full = tuple(features_BdHW.shape[-2:])
        residual, summed = features_BdHW, torch.zeros_like(features_BdHW)
        bit_labels, inputs, area_inputs = [], [], []
        for k, size in enumerate(sizes):
            scale_input = area_resize(residual, size)
            bits, quantized = self._bsq(scale_input)
            upsampled = self.scale_contribution(quantized, full)
            residual, summed = residual - upsampled, summed + upsampled
            inputs.append(scale_input)
            bit_labels.append(bits.permute(0, 2, 3, 1).to(torch.uint8))
            if k + 1 < len(sizes):
                area_inputs.append(area_resize(summed, sizes[k + 1]))
        return BitwiseEncodeOutput(
            features=features_BdHW,
            quantized=summed,
            bit_labels=bit_labels,
            quantizer_inputs=inputs,
            area_next_inputs=area_inputs,
        )

    def forward(self, images: torch.Tensor, scale_schedule):
        """Training forward: encode, multi-scale BSQ along ``scale_schedule`` (straight-through), decode without
        clamping (so every pixel gets a gradient). Returns ``(reconstruction, BitwiseEncodeOutput)``."""
        encoded = self.quantize(self.encode_features(images), scale_schedule)
        return self.decoder(encoded.quantized), encoded

    @apply_forward_hook
    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        """Latent (B, d, H, W) -> images (B, 3, H*s, W*s) clamped to [-1, 1] (in slices after ``enable_slicing``)."""
        # out of place: a decoder compiled into CUDA graphs (a user's torch.compile mode) reuses its output buffer
        dtype = next(self.decoder.parameters()).dtype  # (the bits' float32 codes into a bf16 model)
        images = self._decode_sliced(
            lambda part: self.decoder(part.to(dtype)).clamp(-1, 1), latents, self.config.codebook_dim, "latents"
        )
        return DecoderOutput(sample=images) if return_dict else (images,)

    def codes_from_bit_labels(self, bit_labels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Latent-layout bits per scale ((B, h, w, d)) -> the summed, upsampled codes (B, d, H, W)."""
        self._check_bit_labels(bit_labels)
        full = tuple(bit_labels[-1].shape[1:3])
        return sum(self.scale_contribution(self.bits_to_codes(bits.permute(0, 3, 1, 2)), full) for bits in bit_labels)

    def _check_bit_labels(self, bit_labels) -> None:
        """Per scale an integer / bool (B, h, w, d) tensor of 0 / 1 with one batch, the grids growing."""
        d = self.config.codebook_dim
        if not isinstance(bit_labels, (list, tuple)) or not bit_labels:
            raise ValueError(f"`bit_labels` must be a non-empty list of (B, h, w, {d}) 0/1 tensors, one per scale.")
        for i, bits in enumerate(bit_labels):
            if (
                not torch.is_tensor(bits)
                or bits.ndim != 4
                or bits.shape[-1] != d
                or bits.is_floating_point()
                or bits.is_complex()
                or bits.shape[0] != bit_labels[0].shape[0]
            ):
                got = f"{tuple(bits.shape)} {bits.dtype}" if torch.is_tensor(bits) else type(bits).__name__
                raise ValueError(
                    f"`bit_labels[{i}]` must be an integer or bool (B, h, w, {d}) tensor with the batch of "
                    f"`bit_labels[0]`, got {got}."
                )
        grids = [tuple(bits.shape[1:3]) for bits in bit_labels]
        if any(b[0] < a[0] or b[1] < a[1] for a, b in zip(grids, grids[1:])):
            raise ValueError(f"`bit_labels` must go from small to large grids, got {grids}.")
        check_token_values(bit_labels, 0, 1, "bit_labels")

    def decode_bit_labels(self, bit_labels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Latent-layout bits per scale ((B, h, w, d), as :meth:`encode` returns them) -> images in [-1, 1]."""
        return self.decode(self.codes_from_bit_labels(bit_labels)).sample

    # -- what the transformer sees -----------------------------------------------------------------
    def next_scale_input(
        self, summed_BdHW: torch.Tensor, codes_BdHW: torch.Tensor, next_size_hw: tuple[int, int] | None
    ):
        """Add one scale's codes to the running sum (full latent resolution) and return ``(summed, x_next)``
        where ``x_next`` (B, h*w, bits_per_token) is the bilinear *downsampling* of the sum to the next
        token grid (``next_size_hw``; ``None`` at the last scale)."""
        summed = summed_BdHW + self.scale_contribution(codes_BdHW, summed_BdHW.shape[-2:])
        return summed, None if next_size_hw is None else self.scale_input_from_summed(summed, next_size_hw)

    def scale_input_from_summed(self, summed_BdHW: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
        """Running sum (B, d, H, W) -> the transformer input of token grid ``size_hw`` (B, h*w, bits_per_token)."""
        p = self.patch_factor
        return self.latent_to_tokens(trilinear_resize(summed_BdHW, (size_hw[0] * p, size_hw[1] * p)))

    def _check_kept_bits(self, keep, kept_bit_labels, batch: int, sizes) -> None:
        """``keep`` and ``kept_bit_labels`` of :meth:`teacher_forcing_inputs`: both or neither, one per scale, of the
        scale's token grid and latent size (shapes and dtypes only: no device sync per training step)."""
        if keep is None and kept_bit_labels is None:
            return
        if keep is None or kept_bit_labels is None:
            raise ValueError("`keep` and `kept_bit_labels` go together: the kept positions, and the bits kept there.")
        grids = [(batch, h // self.patch_factor, w // self.patch_factor) for h, w in sizes]
        if (
            not isinstance(keep, (list, tuple))
            or len(keep) != len(sizes)
            or not all(
                torch.is_tensor(k) and k.dtype == torch.bool and tuple(k.shape) == g for k, g in zip(keep, grids)
            )
        ):
            raise ValueError(f"`keep` must hold one bool mask per scale, of shapes {grids}.")
        shapes = [(batch, h, w, self.config.codebook_dim) for h, w in sizes]
        if (
            not isinstance(kept_bit_labels, (list, tuple))
            or len(kept_bit_labels) != len(sizes)
            or not all(
                torch.is_tensor(b) and not b.is_floating_point() and not b.is_complex() and tuple(b.shape) == shape
                for b, shape in zip(kept_bit_labels, shapes)
            )
        ):
            raise ValueError(
                f"`kept_bit_labels` must hold one bool / integer bit tensor per scale, of shapes {shapes} (as "
                "`encode(...).bit_labels` returns them)."
            )

    def teacher_forcing_inputs(
        self,
        features_BdHW: torch.Tensor,
        scale_schedule,
        noise_apply_layers: int = 0,
        noise_apply_strength: float = 0.0,
        numpy_rng: np.random.RandomState | None = None,
        generator: torch.Generator | None = None,
        keep: Sequence[torch.Tensor] | None = None,
        kept_bit_labels: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer inputs and bit labels for training, with Bitwise Self-Correction.

        For the first ``noise_apply_layers`` scales a strength ``s`` is drawn uniformly from
        ``{0, 0.01, ..., noise_apply_strength}`` (``numpy_rng.randint``, default the global numpy RNG) and
        each bit is flipped with probability ``s`` (``torch.rand`` from ``generator``, default the global
        torch RNG); later labels are computed from the corrupted running sum, so the model learns to
        correct earlier mistakes. The original's draw order is kept (per scale: randint, then rand).

        With ``keep`` (per scale (B, h, w) bool on the token grid) the bits where it is True are
        ``kept_bit_labels``' (per scale (B, H, W, d) in the latent layout, as :meth:`encode` returns them, e.g. of
        another image) and the others are quantised from the residual they leave: the labels of edit fine-tuning.

        Returns ``(inputs (B, L - first, bits_per_token), labels (B, L, bits_per_token) uint8)``.
        """
        schedule = normalize_schedule(scale_schedule)
        sizes = self._checked_latent_sizes(features_BdHW, schedule)
        if not is_integer(noise_apply_layers) or noise_apply_layers < 0:
            raise ValueError(f"`noise_apply_layers` must be a whole number >= 0 (scales), got {noise_apply_layers!r}.")
        if not is_number(noise_apply_strength) or not 0 <= noise_apply_strength <= 1:
            raise ValueError(
                "`noise_apply_strength` must be in [0, 1] (the largest bit-flip probability), got "
                f"{noise_apply_strength!r}."
            )
        self._check_kept_bits(keep, kept_bit_labels, features_BdHW.shape[0], sizes)
        full = tuple(features_BdHW.shape[-2:])
        summed = torch.zeros_like(features_BdHW)
        inputs, labels = [], []
        for k, size in enumerate(sizes):
            residual = features_BdHW - summed
            bits = area_resize(residual, size) > 0
            if keep is not None:
                kept = keep[k].repeat_interleave(self.patch_factor, 1).repeat_interleave(self.patch_factor, 2)
                bits = torch.where(kept[:, None], kept_bit_labels[k].permute(0, 3, 1, 2).bool(), bits)
            labels.append(self.latent_to_tokens(bits.to(torch.uint8)))
            if k < noise_apply_layers:
                rng = numpy_rng if numpy_rng is not None else np.random
                strength = rng.randint(0, int(100 * noise_apply_strength) + 1) / 100
                draw = torch.rand(bits.permute(0, 2, 3, 1).shape, generator=generator)
                flip = (draw < strength).permute(0, 3, 1, 2).to(bits.device)
                bits = bits ^ flip
            summed = summed + self.scale_contribution(self.bits_to_codes(bits), full)
            if k + 1 < len(sizes):
                inputs.append(self.scale_input_from_summed(summed, schedule[k + 1]))
        return torch.cat(inputs, dim=1), torch.cat(labels, dim=1)
