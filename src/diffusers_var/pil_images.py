"""PIL images of any mode as 8-bit RGB or grayscale. PIL's own ``convert("RGB")`` / ``convert("L")`` clips the
high-bit-depth grayscale modes at 255: a 16-bit PNG (mode ``I;16``) turns white wherever it is brighter than 255 of
65535. Shared by the pipelines (``image`` / ``mask_image``), training data and evaluation image folders. Image files
a user hands over (``edit``'s ``--image`` / ``--mask``, training images) are turned upright first (:func:`upright`)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _eight_bit_grayscale(image: PIL.Image.Image) -> PIL.Image.Image:
    """An ``I;16*`` / ``I`` / ``F`` image as mode ``L``, scaled by its range: 16-bit modes by 65535 / 255; 32-bit
    integers (how some Pillow versions open 16-bit PNGs) by 65535 / 255 when a value is above 255, else as they are;
    floats in [0, 1] by 255, other floats as 0-255."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():  # a float TIFF's NaN would cast to 0: black, without a word
        raise ValueError(f"the {image.mode!r} image holds pixel values that are not finite numbers (NaN or infinity).")
    peak = float(values.max()) if values.size else 0.0
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and peak > 255):
        values = values * (255 / 65535)
    elif image.mode == "F" and peak <= 1:
        values = values * 255
    return PIL.Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    return _eight_bit_grayscale(image) if image.mode in (*SIXTEEN_BIT_MODES, "I", "F") else image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` as 8-bit RGB (a 16-bit grayscale PNG scaled, not clipped)."""
    return _eight_bit(image).convert("RGB")


def to_grayscale(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` as 8-bit grayscale, mode ``L`` (a 16-bit mask scaled, not clipped)."""
    return _eight_bit(image).convert("L")


def mask_to_grayscale(image: PIL.Image.Image) -> PIL.Image.Image:
    """A mask image as 8-bit grayscale (:func:`to_grayscale`), except that a 16- or 32-bit integer one whose values
    are 0 / 1 holds 0 / 1, as an 8-bit mask of 0 / 1 does (``(seg > 0).astype(np.uint16)`` saved as a PNG): scaled
    by 255 / 65535 its ones would round to 0, an edit with nothing to generate."""
    if image.mode in (*SIXTEEN_BIT_MODES, "I"):
        values = np.asarray(image)
        if values.size and values.min() >= 0 and values.max() <= 1:
            return PIL.Image.fromarray((values * 255).astype(np.uint8), mode="L")
    return to_grayscale(image)


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` turned as its EXIF orientation tag says, as diffusers' ``load_image`` does: a phone photo stored
    sideways with a rotation tag comes out as every viewer shows it (and a mask drawn on that view lines up)."""
    return PIL.ImageOps.exif_transpose(image)


def open_upright(path) -> PIL.Image.Image:
    """The image file at ``path``, read and turned upright (:func:`upright`); the file is closed on return."""
    with PIL.Image.open(path) as image:
        return upright(image)
