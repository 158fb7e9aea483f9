"""Training data: image folders (HF "imagefolder" layout), HF ``datasets``, and the generated shapes.

Every dataset yields dicts with ``pixel_values`` (3, R, R) in [-1, 1] and, where available,
``class_labels`` (int) and ``caption`` (str).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..cli_support import IMAGE_SUFFIXES  # (the formats generate writes and evaluate reads)
from ..file_utils import files_under, is_hidden, text_lines
from ..pil_images import to_rgb, upright
from ..scalars import is_number

logger = logging.getLogger(__name__)


def resize_center_crop(image: PIL.Image.Image, resolution: int) -> torch.Tensor:
    """Turn upright (EXIF orientation), resize the short side to ``resolution`` (Lanczos), centre-crop, scale to
    [-1, 1]."""
    image = to_rgb(upright(image))  # (a 16-bit PNG scaled, not clipped white)
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), PIL.Image.LANCZOS)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1)


BAD_IMAGE_POLICIES = ("skip", "error")
# what a broken file raises while decoding: OSError ("broken data stream", truncated; PIL's UnidentifiedImageError),
# SyntaxError / struct.error / EOFError (plugins' header parsers), ValueError, DecompressionBombError
DECODE_ERRORS = (OSError, SyntaxError, struct.error, EOFError, ValueError, PIL.Image.DecompressionBombError)


class DataError(ValueError):
    """Data that is wrong whatever ``data.bad_images`` says (no caption, a label that is no class id, a column that
    holds no images): an error, never skipped as an unreadable image."""


class _SkipsBadImages(torch.utils.data.Dataset):
    """``__getitem__`` for datasets whose images may fail to decode mid-training (``data.bad_images``).

    A file can pass the up-front check (PIL's ``verify()`` reads chunks and CRCs, not the compressed pixel data) and
    still fail to decode. ``"skip"`` logs a warning naming it (once) and returns the next readable item instead, so
    batches keep their size and a resumed run sees the same sequence; ``"error"`` raises a ``ValueError`` naming it.
    """

    bad_images = "skip"

    def _load(self, index: int) -> dict:
        raise NotImplementedError

    def _name(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if not hasattr(self, "_reported"):
            self._reported = set()
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                return self._load(candidate)
            except DataError:
                raise
            except DECODE_ERRORS as err:
                name = self._name(candidate)
                reason = f"{type(err).__name__}: {err}"
                if self.bad_images == "error":
                    raise ValueError(
                        f"`data`: cannot read image {name} ({reason}); set data.bad_images=skip to skip "
                        "unreadable images with a warning."
                    ) from None
                if name not in self._reported:
                    self._reported.add(name)
                    logger.warning(
                        "skipping unreadable image %s (%s); data.bad_images=error stops on it instead", name, reason
                    )
        raise ValueError(f"`data`: none of the {len(self)} images could be read (see the warnings above).")


def _read_text(path: Path) -> str:
    """A caption file's text, UTF-8 (a leading byte-order mark, as Windows editors write, is not part of it); anything
    else is an error naming the file under ``data.path``."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"`data.path`: cannot read {str(path)!r} as UTF-8 text ({err}).") from None


def _metadata_entry(line: str, where: str) -> tuple[str, str | None]:
    """``(file_name, caption)`` of one ``metadata.jsonl`` line (``where``: the file and line, for the error): a JSON
    object with a string ``file_name`` and a string ``text`` (or ``caption``), or no caption at all."""
    expected = '{"file_name": "0.png", "text": "a caption"}'
    try:
        entry = json.loads(line)
    except ValueError as err:
        raise ValueError(f"`data.path`: {where} is not JSON ({err}); each line is like {expected}.") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        raise ValueError(f"`data.path`: {where} must be a JSON object with a string `file_name`, like {expected}.")
    caption = entry.get("text")
    if caption is None or (isinstance(caption, str) and not caption.strip()):  # a blank "text": "caption" instead
        caption = entry.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"`data.path`: {where} has a caption that is not a string ({caption!r}), like {expected}.")
    # stripped as a .txt caption is: a blank one is no caption (the .txt next to the image, else an error)
    return entry["file_name"], (caption.strip() or None) if caption is not None else None


class ImageFolderDataset(_SkipsBadImages):
    """Images under ``root``.

    * Class-conditional (``need_labels``): one sub-folder per class (sorted names -> ids 0..N-1); each needs a
      readable image.
    * Captioned (``need_captions``): ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}`` (the HF
      imagefolder layout), or a ``.txt`` file next to each image.

    Unreadable images are skipped with a warning naming them, or are an error naming them, following
    ``bad_images`` (``data.bad_images``: ``"skip"`` or ``"error"``), whether the up-front check finds them or they
    fail to decode later; an empty folder or an image without a caption is an error.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        need_labels: bool = False,
        need_captions: bool = False,
        bad_images: str = "skip",
    ):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"`data.bad_images` must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}.")
        self.root, self.resolution, self.bad_images = Path(root), resolution, bad_images
        if not self.root.is_dir():
            raise ValueError(f"`data.path`: {str(self.root)!r} is not a folder.")
        files = files_under(self.root, lambda name: Path(name).suffix.lower() in IMAGE_SUFFIXES, broken_links=True)
        if not files:
            raise ValueError(f"`data.path`: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(self.root)!r}.")
        readable, skipped = [], []
        for path in files:
            try:
                with PIL.Image.open(path) as im:
                    im.verify()
                readable.append(path)
            except Exception as err:  # noqa: BLE001 - whatever verify() raises, the file cannot be used
                if bad_images == "error":
                    raise ValueError(
                        f"`data`: cannot read image {str(path)!r} ({type(err).__name__}: {err}); set "
                        "data.bad_images=skip to skip unreadable images with a warning."
                    ) from None
                skipped.append(path)
        if skipped:
            names = ", ".join(str(p) for p in skipped[:10]) + (
                f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            )
            logger.warning("skipped %d unreadable image(s) under %s: %s", len(skipped), self.root, names)
        if not readable:
            raise ValueError(f"`data.path`: none of the {len(files)} images under {str(self.root)!r} could be read.")
        self.files, self.skipped = readable, len(skipped)
        self.class_names, self.labels, self.captions = None, None, None
        if need_labels:
            self.class_names = self._class_folders(files, readable)
            if not self.class_names:
                raise ValueError(
                    f"`data.path`: class-conditional training needs one sub-folder per class under {str(self.root)!r}."
                )
            index = {name: i for i, name in enumerate(self.class_names)}
            self.files = [p for p in readable if len(p.relative_to(self.root).parts) > 1]
            outside = [p for p in readable if len(p.relative_to(self.root).parts) == 1]
            if outside:
                names = ", ".join(p.name for p in outside[:5]) + (" ..." if len(outside) > 5 else "")
                logger.warning(
                    "left out %d image(s) at the top of %s, outside the class folders (%s): class-conditional "
                    "training takes the images of one sub-folder per class",
                    len(outside),
                    self.root,
                    names,
                )
            self.labels = [index[p.relative_to(self.root).parts[0]] for p in self.files]
        if need_captions:
            self.captions = [self._caption(p) for p in self.files]

    def _class_folders(self, files: list[Path], readable: list[Path]) -> list[str]:
        """The sorted names of the class folders (every folder at the top of ``root`` but hidden ones), whose order
        gives the class ids. A folder left without a readable image is an error: dropping it would shift the ids of
        the classes after it (torchvision's ImageFolder refuses such a folder too)."""
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not is_hidden(p.name))
        used = {p.relative_to(self.root).parts[0] for p in readable if len(p.relative_to(self.root).parts) > 1}
        lacking = [name for name in folders if name not in used]
        if lacking:
            found = [p.relative_to(self.root).parts[0] for p in files if len(p.relative_to(self.root).parts) > 1]
            details = ", ".join(
                f"{name!r} ({f'only {found.count(name)} unreadable image(s)' if name in found else 'no images'})"
                for name in lacking
            )
            raise ValueError(
                f"`data.path`: class folder(s) under {str(self.root)!r} with no readable image: {details}. Class ids "
                "follow the sorted folder names, so leaving them out would shift the ids of the classes after them; "
                "remove the folder(s) or add images."
            )
        return folders

    def _caption(self, path: Path) -> str:
        if not hasattr(self, "_metadata"):
            self._metadata = {}
            for meta in files_under(self.root, lambda name: name == "metadata.jsonl"):
                for number, line in enumerate(text_lines(_read_text(meta)), start=1):
                    if line.strip():
                        file_name, caption = _metadata_entry(line, f"{str(meta)!r} line {number}")
                        self._metadata[(meta.parent / file_name).resolve()] = caption
        caption = self._metadata.get(path.resolve())
        if caption is None and path.with_suffix(".txt").is_file():
            caption = _read_text(path.with_suffix(".txt")).strip()
        if not caption:
            raise ValueError(
                f"`data.path`: image {str(path)!r} has no caption (metadata.jsonl 'text' or a .txt next to it)."
            )
        return caption

    def __len__(self) -> int:
        return len(self.files)

    def _name(self, index: int) -> str:
        return repr(str(self.files[index]))

    def _load(self, index: int) -> dict:
        with PIL.Image.open(self.files[index]) as image:
            item = {"pixel_values": resize_center_crop(image, self.resolution)}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


class HFDataset(_SkipsBadImages):
    """Any HF ``datasets`` dataset with an image column and optional label / text columns (images that fail to
    decode follow ``bad_images`` as in :class:`ImageFolderDataset`)."""

    def __init__(
        self,
        name_or_path: str,
        resolution: int,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = None,
        caption_column: str | None = None,
        bad_images: str = "skip",
    ):
        try:
            import datasets
        except ImportError as err:
            raise ValueError("`data.type: hf` needs the `datasets` package (pip install datasets).") from err
        try:
            self.dataset = (
                datasets.load_dataset(name_or_path, split=split)
                if not Path(name_or_path).is_dir()
                else datasets.load_from_disk(name_or_path)
            )
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds (not found, offline, bad split, ...)
            message = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(
                f"`data.path`: cannot load the dataset {name_or_path!r} (split {split!r}; {type(err).__name__}: "
                f"{message})."
            ) from None
        for column in (image_column, label_column, caption_column):
            if column is not None and column not in self.dataset.column_names:
                raise ValueError(
                    f"`data`: column {column!r} not in the dataset (columns: {self.dataset.column_names})."
                )
        self.resolution, self.columns, self.bad_images = (
            resolution,
            (image_column, label_column, caption_column),
            bad_images,
        )
        # checked up front, as an image folder's captions and class folders are (a column is read without decoding
        # images); kept only as a numpy array of labels: Python lists of millions of rows would be copied into every
        # DataLoader worker as it touched them
        self.labels = (
            np.array([self._label(i, v) for i, v in enumerate(self.dataset[label_column])], dtype=np.int64)
            if label_column
            else None
        )
        if caption_column:
            for i, value in enumerate(self.dataset[caption_column]):
                self._caption(i, value)
        feature = (getattr(self.dataset, "features", None) or {}).get(image_column)
        if feature is not None and not isinstance(feature, datasets.Image):  # without decoding an image
            raise DataError(self._not_images(f"column {image_column!r} holds {feature}"))

    @staticmethod
    def _label(index: int, value) -> int:
        whole = is_number(value) and float(value).is_integer() and value >= 0
        if not whole:  # int(2.7) would train on class 2; int(None) would stop with a bare TypeError
            raise DataError(
                f"`data.label_column`: row {index} of the dataset has label {_shown(value)}, not a class id (a whole "
                "number >= 0)."
            )
        return int(value)

    @staticmethod
    def _caption(index: int, value) -> str:
        if not isinstance(value, str) or not value.strip():  # str(None) would train on the prompt "None"
            raise DataError(
                f"`data.caption_column`: row {index} of the dataset has no caption ({_shown(value)}); every row needs "
                "a non-empty string."
            )
        return value

    def _image(self, index: int, value) -> PIL.Image.Image:
        if not isinstance(value, PIL.Image.Image):  # e.g. file paths in a string column, or undecoded {"bytes": ...}
            raise DataError(
                self._not_images(f"row {index} of the dataset holds {type(value).__name__} {_shown(value)}")
            )
        return value

    def _not_images(self, what: str) -> str:
        column = self.columns[0]
        return (
            f"`data.image_column`: {what}, not images; make {column!r} an image column first "
            f"(`dataset.cast_column({column!r}, datasets.Image())` reads file paths), or name another column."
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def _name(self, index: int) -> str:
        return f"row {index} of the dataset"

    def _load(self, index: int) -> dict:
        row = self.dataset[index]
        item = {"pixel_values": resize_center_crop(self._image(index, row[self.columns[0]]), self.resolution)}
        if self.labels is not None:
            item["class_labels"] = int(self.labels[index])
        if self.columns[2] is not None:
            item["caption"] = row[self.columns[2]]
        return item


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RepeatedDataset(torch.utils.data.Dataset):
    """``dataset`` seen ``repeats`` times per epoch (a few DreamBooth images fill a batch and an epoch); other
    attributes are the dataset's."""

    def __init__(self, dataset, repeats: int):
        self.dataset, self.repeats = dataset, repeats

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index % len(self.dataset)]

    def __getattr__(self, name):
        if name in ("dataset", "repeats"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


DATA_TYPES = ("shapes", "imagefolder", "hf")
# the keys each `data.type` reads; any type takes the common ones. A key of another type is ignored (a config file's
# shapes section keeps num_images / seed when the command line switches it to data.type=imagefolder).
DATA_KEYS = {
    "shapes": ("num_images", "seed", "concept", "concept_fraction", "concept_replaces"),
    "imagefolder": ("path",),
    "hf": ("path", "split", "image_column", "label_column", "caption_column"),
}
COMMON_DATA_KEYS = ("type", "bad_images", "repeats", "cache_tokens")
# the most times `data.repeats` repeats the data, and the most items an epoch of repeated data may have: the loader's
# shuffle holds one index (8 bytes) per item, so 10**9 repeats of 32 images asked for 256 GB
MAX_REPEATS = 10**6
MAX_REPEATED_ITEMS = 10**8


def check_data_section(data_config: dict) -> dict:
    """Validate the ``data`` section of a training config (before anything is built or written); a ``ValueError``
    names the key. Returns a copy with integral numbers as ints (``data.num_images=500.0``)."""
    data_config = dict(data_config)
    known = sorted({*COMMON_DATA_KEYS, *(key for keys in DATA_KEYS.values() for key in keys)})
    unknown = sorted(set(data_config) - set(known))
    if unknown:
        raise ValueError(f"unknown `data` keys {unknown}; known: {known}.")
    kind = data_config.get("type", "imagefolder")
    if kind not in DATA_TYPES:
        raise ValueError(f"`data.type` must be one of {', '.join(repr(t) for t in DATA_TYPES)}; got {kind!r}.")
    for key, low, high in (("num_images", 1, None), ("seed", 0, 2**32 - 1), ("repeats", 1, MAX_REPEATS)):
        if key not in data_config:  # (no default is added: the saved config of a run stays as it was given)
            continue
        value = data_config[key]
        whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
        if not whole or value < low or (high is not None and value > high):
            bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise ValueError(f"`data.{key}` must be a whole number {bounds}, got {value!r}.")
        data_config[key] = int(value)
    if not isinstance(data_config.get("cache_tokens", False), bool):
        raise ValueError(f"`data.cache_tokens` must be true or false, got {data_config['cache_tokens']!r}.")
    path = data_config.get("path")
    if kind == "shapes" and path is not None:  # the shapes are generated: a path here means data.type was forgotten
        raise ValueError(
            f"`data.path` ({path!r}) is set, but `data.type` is 'shapes' (generated images, no path); set "
            "data.type=imagefolder or data.type=hf to train on it (or data.path=null)."
        )
    if kind != "shapes":
        if path is None:
            raise ValueError(f"`data.path` is required for `data.type: {kind}`.")
        if not isinstance(path, str) or not path:
            raise ValueError(f"`data.path` must be a folder path{' or dataset name' * (kind == 'hf')}, got {path!r}.")
    for key in ("split", "image_column", "label_column", "caption_column"):
        value = data_config.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"`data.{key}` must be a non-empty string, got {value!r}.")
    return data_config


def build_dataset(data_config: dict, resolution: int, need_labels: bool = False, need_captions: bool = False):
    """``data`` section of a training config -> dataset. ``type``: shapes | imagefolder | hf; ``bad_images``: skip
    (default: an image that cannot be decoded is skipped with a warning naming it) | error (stop, naming it);
    ``repeats`` (any type, default 1) repeats the dataset within an epoch."""
    repeats = data_config.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"`data.repeats` must be an integer >= 1, got {repeats!r}.")
    if repeats > MAX_REPEATS:
        raise ValueError(f"`data.repeats` must be a whole number >= 1 and <= {MAX_REPEATS}, got {repeats!r}.")
    dataset = _build_dataset(data_config, resolution, need_labels, need_captions)
    if repeats > 1 and len(dataset) * repeats > MAX_REPEATED_ITEMS:
        raise ValueError(
            f"`data.repeats` {repeats}: the {len(dataset)} images repeated make {len(dataset) * repeats} items per "
            f"epoch, more than {MAX_REPEATED_ITEMS}; use data.repeats <= {max(1, MAX_REPEATED_ITEMS // len(dataset))}."
        )
    return RepeatedDataset(dataset, repeats) if repeats > 1 else dataset


def _build_dataset(data_config: dict, resolution: int, need_labels: bool = False, need_captions: bool = False):
    kind = data_config.get("type", "imagefolder")
    if kind == "shapes":
        from ..shapes import ConceptShapesDataset, ShapesDataset

        concept = {k: data_config[k] for k in ("concept", "concept_fraction", "concept_replaces") if k in data_config}
        seed = int(data_config.get("seed", 0))
        try:
            if concept:  # a new shape for fine-tuning, with prior preservation (shapes.ConceptShapesDataset)
                num_images = int(data_config.get("num_images", 1000))
                return ConceptShapesDataset(num_images, resolution, seed, need_labels=need_labels, **concept)
            return ShapesDataset(int(data_config.get("num_images", 10000)), resolution, seed)
        except ValueError as err:  # the datasets' own names (`concept`) as the config's keys (`data.concept`)
            raise ValueError(re.sub(r"`(concept\w*|num_images)`", r"`data.\1`", str(err))) from None
    if kind == "imagefolder":
        if "path" not in data_config:
            raise ValueError("`data.path` is required for `data.type: imagefolder`.")
        return ImageFolderDataset(
            data_config["path"],
            resolution,
            need_labels,
            need_captions,
            bad_images=data_config.get("bad_images", "skip"),
        )
    if kind == "hf":
        return HFDataset(
            data_config["path"],
            resolution,
            data_config.get("split", "train"),
            data_config.get("image_column", "image"),
            data_config.get("label_column"),
            data_config.get("caption_column"),
            bad_images=data_config.get("bad_images", "skip"),
        )
    raise ValueError(f"`data.type` must be one of {', '.join(repr(t) for t in DATA_TYPES)}; got {kind!r}.")


def collate(items: list[dict]) -> dict:
    batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items])}
    if "class_labels" in items[0]:
        batch["class_labels"] = torch.tensor([it["class_labels"] for it in items], dtype=torch.long)
    if "caption" in items[0]:
        batch["caption"] = [it["caption"] for it in items]
    return batch
