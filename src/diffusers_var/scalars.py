"""What counts as a number, an integer or a bool in a public argument: the Python types and numpy's scalars (what
indexing an array gives: ``np.int64(3)``, ``np.float32(0.5)``, ``np.bool_(True)``), never a bool as a number. Integers
are Python's or numpy's of 32 or 64 bits: the arithmetic of narrower numpy integers wraps around at the sizes used here
(an ``np.int16`` image height times its width is 0 at 1024 x 1024), so they are refused. Shared by the pipelines, the
model helpers and the LoRA loaders, which convert accepted numpy scalars to Python ones where a value is stored
(configs are JSON)."""

from __future__ import annotations

import numpy as np


def is_number(value) -> bool:
    """A real Python or numpy scalar (``np.float32(0.5)`` too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_integer(value) -> bool:
    """A Python integer or a numpy one of 32 or 64 bits, not a bool."""
    if isinstance(value, np.integer):
        return value.dtype.itemsize >= 4
    return isinstance(value, int) and not isinstance(value, bool)


def is_bool(value) -> bool:
    """``True`` / ``False``, or numpy's."""
    return isinstance(value, (bool, np.bool_))
