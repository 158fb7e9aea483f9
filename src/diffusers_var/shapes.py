"""A generated, captioned image dataset of coloured shapes, and a judge that reads them back from pixels.

Each image is one filled shape (circle, square or triangle) of one colour, at a random size and position,
on a plain background of another colour. Everything is deterministic from a seed and needs no download,
so it serves as training data for the embedded default pipelines and as a measurable generation task:
:func:`judge_images` recovers (shape, colour, background) from pixels alone, no model weights involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
# shapes the embedded pipelines never saw, for fine-tuning experiments (LoRA): a "bar" is a wide rectangle (width 2r,
# height 0.9r), drawn larger than the other shapes (r in BAR_SIZE of the image side) so that the frozen tokenizers,
# trained on circles, squares and triangles only, still reconstruct it as a wide rectangle
NEW_SHAPES = ("bar",)
ALL_SHAPES = SHAPES + NEW_SHAPES
BAR_SIZE = (0.28, 0.40)
BAR_HALF_HEIGHT = 0.45  # of r
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)


# the most samples a shapes dataset describes: its layout and classes are held for every sample (about 100 bytes
# each; 10**9 ran for minutes and out of memory before the first image)
MAX_SHAPES_IMAGES = 10**7


def check_shapes_size(num_images: int, resolution: int) -> None:
    if not 1 <= num_images <= MAX_SHAPES_IMAGES:
        raise ValueError(f"`num_images` must be in [1, {MAX_SHAPES_IMAGES:,}], got {num_images}.")
    if resolution < 16:
        raise ValueError(f"`resolution` must be >= 16 (pixels), got {resolution}.")


@dataclass(frozen=True)
class ShapeClass:
    shape: str
    color: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


# class id -> (shape, colour, background); colour != background: 3 * 6 * 5 = 90 classes
CLASSES = tuple(ShapeClass(s, c, b) for s in SHAPES for c in COLOR_NAMES for b in COLOR_NAMES if c != b)
NUM_CLASSES = len(CLASSES)


def id2label() -> dict[int, str]:
    return {i: f"{c.color} {c.shape} on {c.background}" for i, c in enumerate(CLASSES)}


def class_id(shape: str, color: str, background: str) -> int:
    try:
        return CLASSES.index(ShapeClass(shape, color, background))
    except ValueError:
        raise ValueError(
            f"no class for shape={shape!r}, color={color!r}, background={background!r}; shapes {SHAPES}, colours "
            f"{COLOR_NAMES} (the background must differ from the shape colour)"
        ) from None


def render(class_ids: np.ndarray, sizes: np.ndarray, centers: np.ndarray, resolution: int) -> np.ndarray:
    """Rasterise shapes: uint8 (N, resolution, resolution, 3). ``sizes`` are half-extents and ``centers``
    (N, 2) are (y, x), both in pixels. 2x2 supersampling gives slightly smooth edges."""
    return render_shapes([CLASSES[i] for i in class_ids], sizes, centers, resolution)


def render_shapes(classes, sizes: np.ndarray, centers: np.ndarray, resolution: int) -> np.ndarray:
    """:func:`render` for a list of :class:`ShapeClass` (the :data:`NEW_SHAPES` included)."""
    n, ss = len(classes), 2
    grid = (np.arange(resolution * ss, dtype=np.float32) + 0.5) / ss
    yy, xx = grid[None, :, None], grid[None, None, :]
    cy, cx, r = centers[:, 0, None, None], centers[:, 1, None, None], sizes[:, None, None]
    kind = np.array([ALL_SHAPES.index(c.shape) for c in classes])[:, None, None]
    circle = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    square = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    # upward triangle: apex at the top, base at the bottom of a 2r box
    t = (yy - (cy - r)) / (2 * r)
    triangle = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
    bar = (np.abs(yy - cy) <= r * BAR_HALF_HEIGHT) & (np.abs(xx - cx) <= r)
    mask = np.select([kind == 0, kind == 1, kind == 2], [circle, square, triangle], bar).astype(np.float32)
    mask = mask.reshape(n, resolution, ss, resolution, ss).mean(axis=(2, 4))[..., None]
    fg = _PALETTE[[COLOR_NAMES.index(c.color) for c in classes]][:, None, None]
    bg = _PALETTE[[COLOR_NAMES.index(c.background) for c in classes]][:, None, None]
    return np.clip(mask * fg + (1 - mask) * bg + 0.5, 0, 255).astype(np.uint8)


def sample_layout(
    rng: np.random.Generator, n: int, resolution: int, size_range: tuple[float, float] = (0.16, 0.34)
) -> tuple[np.ndarray, np.ndarray]:
    sizes = rng.uniform(*size_range, n).astype(np.float32) * resolution
    margin = sizes[:, None] + 1
    centers = rng.uniform(0, 1, (n, 2)).astype(np.float32) * (resolution - 2 * margin) + margin
    return sizes, centers


# how far each shape reaches from its centre, in units of its size r (a square's half side is 0.85 r)
_EXTENT = {"circle": 1.0, "square": 0.85, "triangle": 1.0}


@dataclass
class EditPairs:
    """Edit requests on real shape images (:func:`edit_pairs`): uint8 (N, H, W, 3) ``images`` and their
    ``originals``, the shapes' pixel bounding ``boxes`` (y0, x0, y1, x1; end exclusive), the ``targets`` (another
    shape in another colour on the same background) and ``edited``, each target drawn centred in the original's box
    and as large as fits in it: what an edit of the box should produce."""

    images: np.ndarray
    originals: list
    boxes: list
    targets: list
    edited: np.ndarray

    def box_masks(self, grow: int = 0) -> torch.Tensor:
        """(N, H, W) bool: each image's box (grown by ``grow`` pixels on every side, clipped to the image)."""
        n, height, width, _ = self.images.shape
        masks = torch.zeros(n, height, width, dtype=torch.bool)
        for mask, (y0, x0, y1, x1) in zip(masks, self.boxes):
            mask[max(y0 - grow, 0) : y1 + grow, max(x0 - grow, 0) : x1 + grow] = True
        return masks

    def band_masks(self, band: int) -> torch.Tensor:
        """(N, H, W) bool: the outer ``band`` pixels of every image (out-painting)."""
        n, height, width, _ = self.images.shape
        masks = torch.ones(n, height, width, dtype=torch.bool)
        masks[:, band : height - band, band : width - band] = False
        return masks


def edit_pairs(rng: np.random.Generator, n: int, resolution: int = 64) -> EditPairs:
    """``n`` shape images (the dataset's classes and layout sampler) and an edit request for each: another shape in
    another colour (neither the original's colour nor the background), the background kept."""
    class_ids = rng.integers(0, NUM_CLASSES, n)
    sizes, centers = sample_layout(rng, n, resolution)
    images = render(class_ids, sizes, centers, resolution)
    originals, boxes, targets = [], [], []
    for image, class_index in zip(images, class_ids):
        original = CLASSES[class_index]
        background = np.array(COLORS[original.background], dtype=np.int16)
        ys, xs = np.nonzero(np.abs(image.astype(np.int16) - background).max(axis=-1) > 0)  # every touched pixel
        boxes.append((int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1))
        shape = rng.choice([s for s in SHAPES if s != original.shape])
        color = rng.choice([c for c in COLOR_NAMES if c not in (original.color, original.background)])
        originals.append(original)
        targets.append(ShapeClass(str(shape), str(color), original.background))
    # each target centred in its box and as large as fits in it (half a pixel of margin for the smooth edges)
    box_sides = np.array([min(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes], dtype=np.float32)
    target_sizes = (box_sides - 1) / 2 / np.array([_EXTENT[t.shape] for t in targets], dtype=np.float32)
    box_centers = np.array([((y0 + y1) / 2, (x0 + x1) / 2) for y0, x0, y1, x1 in boxes], dtype=np.float32)
    edited = render_shapes(targets, target_sizes, box_centers, resolution)
    return EditPairs(images, originals, boxes, targets, edited)


class _DrawnShapes(torch.utils.data.Dataset):
    """Images of ``classes`` (:class:`ShapeClass`) at the given sizes and centres: rendered once, in memory, while
    they fit in :attr:`MAX_RENDERED_BYTES`; a larger set (28,800 images at 256 px are 5.7 GB and minutes of rendering)
    is drawn image by image when read (in the data loader's workers, where it has some), with the same pixels."""

    MAX_RENDERED_BYTES = 512 * 2**20

    def _draw(self, classes: list, sizes: np.ndarray, centers: np.ndarray, resolution: int) -> None:
        self.classes, self.sizes, self.centers, self.resolution = classes, sizes, centers, resolution
        self.images = None
        if len(classes) * resolution * resolution * 3 <= self.MAX_RENDERED_BYTES:
            chunk = max(1, 2**25 // resolution**2)  # rendering takes a few times its output's memory for a moment
            self.images = np.concatenate([self._render(slice(i, i + chunk)) for i in range(0, len(classes), chunk)])

    def _render(self, rows: slice) -> np.ndarray:
        return render_shapes(self.classes[rows], self.sizes[rows], self.centers[rows], self.resolution)

    def __len__(self) -> int:
        return len(self.classes)

    def _pixels(self, index: int) -> torch.Tensor:
        """(3, H, W) in [-1, 1]; ``index`` as :meth:`__getitem__` normalised it."""
        image = self.images[index] if self.images is not None else self._render(slice(index, index + 1))[0]
        return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1)


class ShapesDataset(_DrawnShapes):
    """``num_images`` deterministic samples: dicts with ``pixel_values`` (3, H, W) in [-1, 1],
    ``class_labels`` (int) and ``caption`` (str); held in memory or drawn when read, as :class:`_DrawnShapes`."""

    def __init__(self, num_images: int = 10000, resolution: int = 64, seed: int = 0):
        check_shapes_size(num_images, resolution)
        rng = np.random.default_rng(seed)
        self.class_ids = rng.integers(0, NUM_CLASSES, num_images)
        self._draw([CLASSES[i] for i in self.class_ids], *sample_layout(rng, num_images, resolution), resolution)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]  # negative indices as a list takes them, IndexError past the end
        label = int(self.class_ids[index])
        return {"pixel_values": self._pixels(index), "class_labels": label, "caption": CLASSES[label].caption}


def concept_classes(concept: str = "bar") -> list[ShapeClass]:
    """Every colour / background combination of a :data:`NEW_SHAPES` shape (30 classes)."""
    if concept not in NEW_SHAPES:
        raise ValueError(
            f"`concept` must be one of {NEW_SHAPES} (shapes the embedded models never saw), got {concept!r}."
        )
    return [ShapeClass(concept, c, b) for c in COLOR_NAMES for b in COLOR_NAMES if c != b]


def _layout_for(classes, rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and centres of ``classes`` (bars drawn within :data:`BAR_SIZE`, the other shapes as usual)."""
    is_bar = np.array([c.shape == "bar" for c in classes])
    sizes, centers = sample_layout(rng, len(classes), resolution)
    if is_bar.any():
        bar_sizes, bar_centers = sample_layout(rng, int(is_bar.sum()), resolution, BAR_SIZE)
        sizes[is_bar], centers[is_bar] = bar_sizes, bar_centers
    return sizes, centers


class ConceptShapesDataset(_DrawnShapes):
    """Fine-tuning data for a new concept, DreamBooth-style with prior preservation: ``num_images`` deterministic
    samples, ``concept_fraction`` of them the :data:`NEW_SHAPES` shape ``concept`` in any colour on any other
    background (captions such as "a red bar on a blue background"), the others the original classes, so that the
    fine-tuned model keeps what it knew. Items as :class:`ShapesDataset`.

    ``concept_replaces`` (class-conditional models, which can learn no new class ids): the concept takes over the class
    ids of that shape (``class_labels`` of a red bar on blue = the id of "red square on blue" for
    ``concept_replaces="square"``) and the prior images come from the other classes only. Without it,
    ``class_labels`` of the concept images is -1 (text-to-image training reads the captions).
    """

    def __init__(
        self,
        num_images: int = 1000,
        resolution: int = 64,
        seed: int = 0,
        concept: str = "bar",
        concept_fraction: float = 0.5,
        concept_replaces: str | None = None,
        need_labels: bool = False,
    ):
        check_shapes_size(num_images, resolution)
        new_classes = concept_classes(concept)
        if not isinstance(concept_fraction, (int, float)) or not 0 < concept_fraction <= 1:
            raise ValueError(f"`concept_fraction` must be in (0, 1], got {concept_fraction!r}.")
        if concept_replaces is not None and concept_replaces not in SHAPES:
            raise ValueError(f"`concept_replaces` must be one of {SHAPES} or None, got {concept_replaces!r}.")
        if need_labels and concept_replaces is None:
            raise ValueError(
                "`concept_replaces`: a class-conditional model learns no new class ids; name the shape "
                f"whose class ids the concept takes over ({SHAPES})."
            )
        rng = np.random.default_rng(seed)
        num_new = max(1, round(num_images * concept_fraction))
        prior_ids = [i for i, c in enumerate(CLASSES) if c.shape != concept_replaces]
        classes = [new_classes[i] for i in rng.integers(0, len(new_classes), num_new)]
        classes += [CLASSES[i] for i in rng.choice(prior_ids, num_images - num_new)]
        classes = [classes[i] for i in rng.permutation(num_images)]
        self.class_ids = np.array(
            [
                (class_id(concept_replaces, c.color, c.background) if concept_replaces else -1)
                if c.shape == concept
                else CLASSES.index(c)
                for c in classes
            ]
        )
        self._draw(classes, *_layout_for(classes, rng, resolution), resolution)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]
        caption = self.classes[index].caption
        return {"pixel_values": self._pixels(index), "class_labels": int(self.class_ids[index]), "caption": caption}


# ----------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------
def _nearest_color(rgb: np.ndarray) -> str:
    return COLOR_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def judge_image(image: np.ndarray) -> ShapeClass | None:
    """Read (shape, colour, background) from a uint8 (H, W, 3) image; ``None`` if no shape is found.

    Background = the palette colour nearest to the median border pixel; foreground = pixels far from that
    border colour; colour = nearest palette colour of their median; shape from how much of its
    bounding box the (largest) blob fills: square ~0.72+ of a square box, circle ~0.785 of the box of a
    disc, triangle ~0.5, disambiguated by where the mass sits (a triangle is heavier at the bottom). A box less than
    0.8 times as high as wide is a ``"bar"`` (:data:`NEW_SHAPES`; the other shapes' boxes are square: >= 0.86 in
    the embedded tokenizers' reconstructions, bars <= 0.72).
    """
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_color(bg_rgb)
    fg_mask = ((img - bg_rgb) ** 2).sum(-1) > 60.0**2
    if fg_mask.sum() < 12 or fg_mask.mean() > 0.6:  # nothing there, or no single shape on a background
        return None
    color = _nearest_color(np.median(img[fg_mask], axis=0))
    ys, xs = np.nonzero(fg_mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = fg_mask.sum() / float(h * w)
    # fraction of the mass in the lower half of the bounding box
    lower = (ys > (ys.min() + ys.max()) / 2).mean()
    if h < 0.8 * w and fill > 0.6:
        shape = "bar"
    elif fill > 0.88:
        shape = "square"
    elif fill < 0.64 or lower > 0.62:
        shape = "triangle"
    else:
        shape = "circle"
    return ShapeClass(shape, color, background)


def judge_images(images) -> list[ShapeClass | None]:
    """Judge a batch: PIL images, uint8 arrays (N, H, W, 3), or float tensors (N, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    elif isinstance(images, np.ndarray) and images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return [judge_image(np.asarray(im.convert("RGB")) if hasattr(im, "convert") else im) for im in images]


def attribute_accuracy(judged: list[ShapeClass | None], targets: list[ShapeClass]) -> dict[str, float]:
    """Per-attribute accuracy (shape, colour, background) and all three at once."""
    n = len(targets)
    hit = lambda f: sum(1 for j, t in zip(judged, targets) if j is not None and f(j, t)) / n  # noqa: E731
    return {
        "shape": hit(lambda j, t: j.shape == t.shape),
        "color": hit(lambda j, t: j.color == t.color),
        "background": hit(lambda j, t: j.background == t.background),
        "all": hit(lambda j, t: j == t),
    }


# ----------------------------------------------------------------------------------------------
# Distribution distance and end-to-end evaluation
# ----------------------------------------------------------------------------------------------
def thumbnail_features(images_uint8: np.ndarray, size: int = 8) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size*size*3) float64 area-averaged thumbnails in [0, 1]."""
    n, h, w, _ = images_uint8.shape
    x = images_uint8.astype(np.float64).reshape(n, size, h // size, size, w // size, 3).mean(axis=(2, 4)) / 255.0
    return x.reshape(n, -1)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula, any features)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(
        ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    )


def _as_uint8(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return np.stack([np.asarray(im.convert("RGB")) for im in images]) if isinstance(images, list) else images


def evaluate_generations(images, targets: list[ShapeClass], resolution: int, seed: int = 12345) -> dict:
    """Judge accuracy per attribute, and the thumbnail Fréchet distance to held-out real images of the same
    classes (plus that distance between two real sets of the same size, as the noise floor)."""
    generated = _as_uint8(images)
    n = len(targets)
    rng = np.random.default_rng(seed)
    ids = np.array([CLASSES.index(t) for t in targets])
    real = [render(ids, *sample_layout(rng, n, resolution), resolution) for _ in range(2)]
    return {
        **attribute_accuracy(judge_images(generated), targets),
        "frechet_thumbnail": frechet_distance(thumbnail_features(generated), thumbnail_features(real[0])),
        "frechet_thumbnail_real_vs_real": frechet_distance(thumbnail_features(real[1]), thumbnail_features(real[0])),
        "num_samples": n,
    }
