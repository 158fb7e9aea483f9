"""Infinity's aspect-ratio templates and their scale schedules (token grids), as in the original
``infinity/utils/dynamic_resolution.py``.

A schedule is a list of ``(h, w)`` token grids, coarse to fine. Every template (height / width) has one
13-scale "1M" list; the resolution presets are prefixes of it. The RoPE reference grid of a schedule is the
last scale of the 1M list of its template, whatever the preset.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from ..scalars import is_integer

# (h, w) for the templates with h >= w; the template w/h (written int(1000/r)/1000) uses the transposes.
_BASE_SCHEDULES: dict[float, list[tuple[int, int]]] = {
    1.0: [(s, s) for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)],
    1.25: [
        (1, 1),
        (2, 2),
        (3, 3),
        (5, 4),
        (10, 8),
        (15, 12),
        (20, 16),
        (25, 20),
        (30, 24),
        (35, 28),
        (45, 36),
        (55, 44),
        (70, 56),
    ],
    1.333: [
        (1, 1),
        (2, 2),
        (4, 3),
        (8, 6),
        (12, 9),
        (16, 12),
        (20, 15),
        (24, 18),
        (28, 21),
        (36, 27),
        (48, 36),
        (60, 45),
        (72, 54),
    ],
    1.5: [
        (1, 1),
        (2, 2),
        (3, 2),
        (6, 4),
        (9, 6),
        (15, 10),
        (21, 14),
        (27, 18),
        (33, 22),
        (39, 26),
        (48, 32),
        (63, 42),
        (78, 52),
    ],
    1.75: [
        (1, 1),
        (2, 2),
        (3, 3),
        (7, 4),
        (11, 6),
        (14, 8),
        (21, 12),
        (28, 16),
        (35, 20),
        (42, 24),
        (56, 32),
        (70, 40),
        (84, 48),
    ],
    2.0: [
        (1, 1),
        (2, 2),
        (4, 2),
        (6, 3),
        (10, 5),
        (16, 8),
        (22, 11),
        (30, 15),
        (38, 19),
        (46, 23),
        (60, 30),
        (74, 37),
        (90, 45),
    ],
    2.5: [
        (1, 1),
        (2, 2),
        (5, 2),
        (10, 4),
        (15, 6),
        (20, 8),
        (25, 10),
        (30, 12),
        (40, 16),
        (50, 20),
        (65, 26),
        (80, 32),
        (100, 40),
    ],
    3.0: [
        (1, 1),
        (2, 2),
        (6, 2),
        (9, 3),
        (15, 5),
        (21, 7),
        (27, 9),
        (36, 12),
        (45, 15),
        (54, 18),
        (72, 24),
        (90, 30),
        (111, 37),
    ],
}

# Preset name -> number of scales (prefix length of the 13-scale list).
RESOLUTION_PRESETS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _build_templates() -> dict[float, list[tuple[int, int]]]:
    templates = {}
    for ratio, hw in _BASE_SCHEDULES.items():
        templates[ratio] = list(hw)
        if ratio != 1.0:
            templates[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in hw]
    return templates


ASPECT_RATIO_TEMPLATES: dict[float, list[tuple[int, int]]] = _build_templates()


def nearest_aspect_ratio(height_div_width: float) -> float:
    """The template (height / width) closest to ``height_div_width``."""
    return min(ASPECT_RATIO_TEMPLATES, key=lambda t: abs(height_div_width - t))


def scale_schedule_for(aspect_ratio: float, preset: str) -> list[tuple[int, int]]:
    """The token grids of a template and a resolution preset ("0.06M", "0.25M", "0.60M", "1M")."""
    if preset not in RESOLUTION_PRESETS:
        raise ValueError(f"`preset` must be one of {list(RESOLUTION_PRESETS)}, got {preset!r}.")
    return ASPECT_RATIO_TEMPLATES[nearest_aspect_ratio(aspect_ratio)][: RESOLUTION_PRESETS[preset]]


def normalize_schedule(scale_schedule: Sequence[Sequence[int]], name: str = "scale_schedule") -> list[tuple[int, int]]:
    """Accept ``(h, w)`` or the original ``(t, h, w)`` entries (t must be 1 for images): lists, tuples, integer numpy
    arrays or tensors of whole numbers (a float is refused: ``int()`` would read 1.5 as 1)."""

    def as_list(value):
        if isinstance(value, (np.ndarray, torch.Tensor)):
            is_whole = value.dtype.kind in "iu" if isinstance(value, np.ndarray) else not value.is_floating_point()
            return value.tolist() if is_whole and value.dtype != torch.bool and value.dtype != np.bool_ else None
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            return None
        return list(value)

    entries = as_list(scale_schedule)
    if entries is None:
        raise ValueError(
            f"`{name}` must be a list of (h, w) token grids of whole numbers, got {type(scale_schedule).__name__}."
        )
    out = []
    for entry in entries:
        values = as_list(entry)
        if values is None or not all(is_integer(v) for v in values):
            raise ValueError(f"`{name}` entries must be (h, w) or (1, h, w) positive integers, got {entry!r}.")
        entry = tuple(int(v) for v in values)
        if len(entry) == 3:
            if entry[0] != 1:
                raise ValueError(f"`{name}`: only image schedules (t == 1) are supported, got {entry}.")
            entry = entry[1:]
        if len(entry) != 2 or min(entry) < 1:
            raise ValueError(f"`{name}` entries must be (h, w) or (1, h, w) positive integers, got {entry}.")
        out.append(entry)
    if not out:
        raise ValueError(f"`{name}` must not be empty.")
    return out


def rope_grid_for_schedule(scale_schedule: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The RoPE reference grid: the last 1M scale of the template the schedule is a prefix of."""
    schedule = normalize_schedule(scale_schedule)
    for hw in ASPECT_RATIO_TEMPLATES.values():
        if hw[: len(schedule)] == schedule:
            return hw[-1]
    raise ValueError(
        f"`scale_schedule` {schedule} is not a prefix of any aspect-ratio template's schedule; Infinity's "
        f"positions are defined only for the predefined schedules (see ASPECT_RATIO_TEMPLATES)."
    )


def supported_pixel_sizes(pixels_per_token: int) -> list[tuple[int, int]]:
    """Every (height, width) in pixels that a template and preset produces."""
    sizes = set()
    for hw in ASPECT_RATIO_TEMPLATES.values():
        for count in RESOLUTION_PRESETS.values():
            h, w = hw[count - 1]
            sizes.add((h * pixels_per_token, w * pixels_per_token))
    return sorted(sizes)


MAX_SIDE = 2**16  # far above every preset; larger values only overflowed the float arithmetic below


def schedule_for_pixels(height: int, width: int, pixels_per_token: int, origin: str = "") -> list[tuple[int, int]]:
    """Map a requested image size to the nearest template and preset.

    The template is the nearest by height / width; the preset is the one whose final size is closest in
    area. Sizes more than 25% away from every supported size are refused: in aspect ratio (height / width) from the
    nearest template, or in area (per side, geometric mean) from every preset of that template. ``origin`` follows
    the size in that error (where it came from, when the caller did not give it).
    """
    for name, value in (("height", height), ("width", width)):
        if not is_integer(value) or not 1 <= value <= MAX_SIDE:
            raise ValueError(f"`{name}` must be an integer in [1, {MAX_SIDE}] (pixels), got {repr(value):.40}.")
    height, width = int(height), int(width)  # numpy's: Python arithmetic below
    hw = ASPECT_RATIO_TEMPLATES[nearest_aspect_ratio(height / width)]
    side = (height * width) ** 0.5
    best = min(
        RESOLUTION_PRESETS.values(),
        key=lambda n: abs(1 - (hw[n - 1][0] * hw[n - 1][1]) ** 0.5 * pixels_per_token / side),
    )
    h, w = hw[best - 1]
    ratio = (h * w) ** 0.5 * pixels_per_token / side
    aspect = h / w * width / height
    # (a 64x1000 request became 148x444 at 4 px / token); the slack: a size exactly 25% off came out 1.2500000000000002
    low, high = 0.8 - 1e-9, 1.25 + 1e-9
    if not (low <= ratio <= high and low <= aspect <= high):
        sizes = ", ".join(f"{a}x{b}" for a, b in supported_pixel_sizes(pixels_per_token))
        raise ValueError(
            f"`height`/`width` {height}x{width}{origin} is not near any supported size (height x width in pixels, "
            f"aspect ratios within 25% of 1:3 to 3:1): {sizes}."
        )
    return hw[:best]
