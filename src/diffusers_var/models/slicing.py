"""Decoding a batch in slices: diffusers' ``enable_slicing`` / ``disable_slicing`` for the two image tokenizers."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.autoencoders.vae import AutoencoderMixin


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

    def _decode_sliced(self, decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """``decode(latents)``, slice by slice along the batch when slicing is on."""
        if not self.use_slicing or latents.shape[0] <= self.slice_size:
            return decode(latents)
        return torch.cat([decode(part) for part in latents.split(self.slice_size)])
