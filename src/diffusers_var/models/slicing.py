"""What the two image tokenizers share: decoding a batch in slices (diffusers' ``enable_slicing`` /
``disable_slicing``) and the checks of their public inputs and decoded outputs."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from diffusers.models.autoencoders.vae import AutoencoderMixin

# Images are in [-1, 1]; resampling may overshoot that a little. Beyond this bound they are in another range
# (0..255, say), which the encoders would quantise without complaint.
IMAGE_RANGE_BOUND = 1.5


def check_image_values(images: torch.Tensor, name: str = "images") -> None:
    """Floating point, finite and within [-1, 1] (to :data:`IMAGE_RANGE_BOUND`): one device sync."""
    if not images.is_floating_point():
        raise ValueError(
            f"`{name}` must be a floating-point tensor in [-1, 1], got {images.dtype} (uint8 pixels: x / 127.5 - 1)."
        )
    if images.numel():
        low, high = (float(v) for v in torch.aminmax(images.detach()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"`{name}` holds NaN or infinite values.")
        if low < -IMAGE_RANGE_BOUND or high > IMAGE_RANGE_BOUND:
            raise ValueError(
                f"`{name}` must be in [-1, 1], got values in [{low:.4g}, {high:.4g}] (images in [0, 1]: x * 2 - 1; "
                "in [0, 255]: x / 127.5 - 1)."
            )


def check_token_values(tokens: Sequence[torch.Tensor], low: int, high: int, name: str) -> None:
    """Every entry of the per-scale integer ``tokens`` within ``[low, high]`` (one device sync for all scales)."""
    if any(t.is_meta for t in tokens):  # a shape without values: name the parameter rather than fail inside torch
        raise ValueError(f"`{name}` holds tensors on the meta device (shapes without values); pass ones with data.")
    flat = torch.cat([t.detach().reshape(-1).long() for t in tokens])
    if flat.numel():
        found_low, found_high = (int(v) for v in torch.aminmax(flat))
        if found_low < low or found_high > high:
            raise ValueError(f"`{name}` must hold values in [{low}, {high}], got [{found_low}, {found_high}].")


class NaNDecodeError(ValueError):
    """Latents decoded to NaN pixels (a pipeline says which of its inputs to look at)."""


class SlicedDecodingMixin(AutoencoderMixin):
    """``enable_slicing()`` makes the tokenizer decode a batch a slice of images at a time (one by default, as
    diffusers' autoencoders do): at large batches the decoder's full-resolution activations are most of a
    generation's peak memory, and a slice needs only its share. The images are the same (to float rounding: the
    convolutions may pick other algorithms for another batch size). ``enable_tiling`` is not implemented and says so.
    """

    use_slicing: bool = False
    slice_size: int = 1

    def enable_slicing(self, slice_size: int = 1) -> None:
        """Decode ``slice_size`` images at a time (a positive int; diffusers' default, 1)."""
        if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
            raise ValueError(f"`slice_size` must be a positive int (images decoded at a time), got {slice_size!r}.")
        self.use_slicing, self.slice_size = True, slice_size

    def disable_slicing(self) -> None:
        """Decode the whole batch at once again (the default)."""
        self.use_slicing = False

    def _decode_sliced(
        self, decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, channels: int, name: str
    ) -> torch.Tensor:
        """``decode(latents)``, slice by slice along the batch when slicing is on. ``latents`` (named ``name``) must
        be a floating-point (B, ``channels``, h, w) tensor, and the pixels it decodes to must not be NaN: NaN or
        infinite latents, or values too large for the decoder, raise :class:`NaNDecodeError` instead of returning
        NaN images (one device sync, after the decoder's kernels are queued)."""
        if (
            not torch.is_tensor(latents)
            or latents.ndim != 4
            or latents.shape[1] != channels
            or not latents.is_floating_point()
        ):
            got = f"{tuple(latents.shape)} {latents.dtype}" if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"`{name}` must be a floating-point (B, {channels}, h, w) tensor, got {got}.")
        if not self.use_slicing or latents.shape[0] <= self.slice_size:
            images = decode(latents)
        else:
            images = torch.cat([decode(part) for part in latents.split(self.slice_size)])
        if bool(images.detach().sum().isnan()):  # the pixels are clamped: NaN is what can be left
            raise NaNDecodeError(
                f"`{name}` decoded to NaN pixels: it holds NaN or infinite values, or values too large for the "
                "decoder."
            )
        return images
