"""What counts as a number, an integer or a bool in a public argument: the Python types and numpy's scalars (what
indexing an array gives: ``np.int64(3)``, ``np.float32(0.5)``, ``np.bool_(True)``), never a bool as a number. Shared
by the pipelines, the model helpers and the LoRA loaders, which convert accepted numpy scalars to Python ones where a
value is stored (configs are JSON)."""

from __future__ import annotations

import numpy as np


def is_number(value) -> bool:
    """A real Python or numpy scalar (``np.float32(0.5)`` too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_integer(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_bool(value) -> bool:
    """``True`` / ``False``, or numpy's."""
    return isinstance(value, (bool, np.bool_))
