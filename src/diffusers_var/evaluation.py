"""``diffusers-var evaluate``: FID, Inception score and precision/recall as OpenAI's ADM evaluation suite computes
them (the suite VAR's FID-50k comes from), and CLIP score for text-to-image samples.

Protocol (``guided-diffusion/evaluations/evaluator.py``):

* Features: the FID Inception-v3 (TensorFlow's 2015-12-05 graph, :mod:`diffusers_var.fid_inception`) on uint8 images,
  resized to 299 px by TensorFlow 1's bilinear resize inside the network; ``pool_3`` (2048) for FID and
  precision/recall, ``pool_3 @ W`` (the softmax layer without its bias) for the Inception score.
* FID: Fréchet distance of Gaussians fitted in float64 (``np.cov``); the trace of ``sqrtm(S1 S2)`` is taken as the sum
  of the singular values of ``S1^1/2 S2^1/2`` (the same number: their squares are the eigenvalues of ``S1 S2``),
  without scipy and without taking square roots of round-off when the covariances are singular (fewer images than
  2,048 dimensions). A reference ``.npz``'s ``mu`` / ``sigma`` (ADM's reference batches) are used as is whenever it
  has them, as ADM does, unless they are the statistics of its own ``inception_pool_3`` features and not marked as
  given (a ``--save-reference-stats`` file made from images): then FID comes from the features (the same distance).
* Inception score: ``exp(E[KL(p(y|x) || p(y))])`` over splits of 5,000 images, averaged (10 splits for 50k).
* Precision / recall: Kynkäänniemi et al.'s k-NN manifolds (k = 3) on ``pool_3``: a sample is inside the reference
  manifold if it lies within the distance of some reference image to that image's 3rd nearest neighbour. ADM
  computes the squared distances in float16 where finite; here they are float32.
* CLIP score: ``100 * max(cos(image, text), 0)`` averaged over images (Hessel et al.; torchmetrics' definition), with
  a ``transformers`` CLIPModel: open_clip requires torchvision, which this project does not install.

Weights are never downloaded here: the Inception file comes from ``--inception-weights`` or torch-fidelity's cache
(``$TORCH_HOME/hub/checkpoints``), the CLIP model from ``--clip-model`` (a folder, or a Hub id in the Hugging Face
cache). A missing file is an error that says what to put where.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .cli_support import IMAGE_SUFFIXES, check_device, home_path, nonblank
from .fid_inception import WEIGHTS_FILENAMES, WEIGHTS_URL, FIDInceptionV3
from .file_utils import atomic_name_problem, files_under, json_lines, path_problem, text_lines, write_atomic
from .sample import IMAGES_DIR, METADATA_FILE, NPZ_FILE, RUN_FILE, read_run_file

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score
PR_NEIGHBOURHOOD = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
METRICS = ("fid", "is", "pr", "clip")
FEATURE_DIM = 2048  # pool_3
# in a --save-reference-stats file: its mu / sigma are the reference's own (ADM's TensorFlow statistics), which FID
# uses, rather than those of its features
GIVEN_STATISTICS_KEY = "statistics_given"
# stored mu / sigma "are" the statistics of the stored features when they differ by at most this much (relative to
# the largest entry): rounding only (np.cov of the same features on another BLAS, or stored as float32)
SAME_STATISTICS_TOLERANCE = 1e-6


# ----------------------------------------------------------------------------------------------
# Image sets: a sample folder, an image folder or an .npz
# ----------------------------------------------------------------------------------------------
class ImageSet:
    """Images read in batches of uint8 (N, H, W, 3), in a fixed order, without holding the set in memory.

    ``path``: a ``diffusers-var sample`` folder (``images/`` in ``metadata.jsonl`` order, with its prompts; its
    ``samples.npz`` where ``images/`` was deleted), an image folder (searched recursively, sorted by path), or an
    ``.npz`` with ``arr_0`` (ADM's sample / reference batches). ``notes``: one-line notes for the user (what was read
    in place of what, what was left out)."""

    def __init__(self, path, flag: str):
        self.path, self.flag = Path(path), flag
        self.prompts: list[str] | None = None
        self.prompt_problem: str | None = None  # why the prompts cannot be CLIP-scored (the other metrics need none)
        self.files: list[Path] | None = None
        self.stored: dict[str, np.ndarray] = {}
        self.notes: list[str] = []
        problem = path_problem(self.path)
        if problem:  # (is_file / is_dir raised it: a traceback)
            raise ValueError(f"`{flag}` {str(self.path)!r}: {problem}.")
        run_metadata = None  # the metadata.jsonl of a sample run read from its samples.npz
        suffixes, left_out = ", ".join(IMAGE_SUFFIXES), ""
        if is_sample_run(self.path) and not (self.path / IMAGES_DIR).is_dir():
            # a finished run whose images/ was deleted to save space (the README suggests it): its npz holds them
            run, present = self.path, [name for name in (RUN_FILE, METADATA_FILE) if (self.path / name).is_file()]
            if not (run / NPZ_FILE).is_file():
                raise ValueError(
                    f"`{flag}` {str(run)!r} is a `diffusers-var sample` run folder ({', '.join(present)}) with "
                    f"neither its {IMAGES_DIR}/ folder nor {NPZ_FILE}: no images to evaluate; run its sample command "
                    f"again to generate them (with --save-npz, {NPZ_FILE} keeps them if {IMAGES_DIR}/ is deleted)."
                )
            self.path = run / NPZ_FILE
            run_metadata = run / METADATA_FILE if METADATA_FILE in present else None
            self.notes.append(f"`{flag}` {str(run)!r} has no {IMAGES_DIR}/ folder: evaluating its {NPZ_FILE}.")
        if self.path.suffix.lower() == ".npz" and self.path.is_file():
            self.kind = "npz"
            self.keys = _npz_keys(self.path, flag)
            self.length = _npz_shape(self.path, "arr_0", flag)[0] if "arr_0" in self.keys else 0
            self.stored = _npz_statistics(self.path, self.keys, flag)
            if run_metadata is not None:
                entries = _metadata_entries(run_metadata, flag)
                if len(entries) == self.length:
                    self._take_prompts(entries, run_metadata)
                else:  # (ADM's arr_0 is in index order, as metadata.jsonl: a count that differs cannot be paired)
                    self.prompt_problem = (
                        f"`{flag}` {str(run_metadata)!r} lists {len(entries)} images, {str(self.path)!r} holds "
                        f"{self.length}"
                    )
        elif (self.path / IMAGES_DIR).is_dir() and (self.path / METADATA_FILE).is_file():
            self.kind = "samples"
            entries = _metadata_entries(self.path / METADATA_FILE, flag)
            self.files = [self.path / entry["file_name"] for entry in entries]
            missing = [f for f in self.files if not f.is_file()]
            if missing:
                raise ValueError(
                    f"`{flag}` {str(self.path / METADATA_FILE)!r} lists {len(missing)} file(s) that are not there, "
                    f"the first {str(missing[0])!r}."
                )
            self._take_prompts(entries, self.path / METADATA_FILE)
        elif (unfinished := unfinished_run(self.path)) is not None:
            raise ValueError(
                f"`{flag}` {str(self.path)!r} is {'' if unfinished == self.path else 'in '}a "
                f"`diffusers-var sample` run that has not finished (no {METADATA_FILE} yet); run the same sample "
                "command again to finish it."
            )
        elif self.path.is_dir():
            self.kind = "folder"
            found = files_under(self.path, lambda name: True, broken_links=True)
            self.files = [f for f in found if f.suffix.lower() in IMAGE_SUFFIXES]
            others = sorted({f.suffix.lower() or "no suffix" for f in found if f.suffix.lower() not in IMAGE_SUFFIXES})
            if others:  # said, so that a set smaller than its folder is no surprise
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                left_out = f"{len(found) - len(self.files)} file(s) of other types left out ({shown})"
                if self.files:
                    self.notes.append(f"`{flag}` {str(self.path)!r}: {left_out}; images are {suffixes}.")
        else:
            raise ValueError(
                f"`{flag}` {str(self.path)!r} is not an image folder, a `diffusers-var sample` folder or an .npz file."
            )
        if self.files is not None:
            self.length = len(self.files)
        if self.kind != "npz" and self.length == 0:
            raise ValueError(
                f"`{flag}` {str(self.path)!r} holds no images ({suffixes}){'; ' + left_out if left_out else ''}."
            )

    def _take_prompts(self, entries: list[dict], metadata: Path) -> None:
        """The prompts of a sample run's ``metadata.jsonl`` entries (text-to-image runs: each entry has one)."""
        if all("prompt" in entry for entry in entries):
            self.prompts = [entry["prompt"] for entry in entries]
            bad = next((i for i, p in enumerate(self.prompts) if not isinstance(p, str) or not p.strip()), None)
            if bad is not None:  # (the CLIP tokenizer's own message named neither the flag nor the line)
                self.prompt_problem = (
                    f"`{self.flag}` {str(metadata)!r}: entry {bad + 1} has a `prompt` that is not a "
                    f"non-empty string ({self.prompts[bad]!r})"
                )

    @functools.cached_property
    def uses_given_statistics(self) -> bool:
        """Whether FID takes the stored ``mu`` / ``sigma``, as ADM's evaluator does whenever a reference has them
        (its reference batches hold images and their own TensorFlow statistics). One exception: ``mu`` / ``sigma``
        that are the statistics of the stored ``inception_pool_3`` features (up to rounding) and not marked as given
        (:data:`GIVEN_STATISTICS_KEY`), as in a file of ``--save-reference-stats`` made from images: FID comes from
        the features, the same distance, computed exactly also for fewer images than dimensions."""
        stored = self.arrays("mu", "sigma", "inception_pool_3")
        if "mu" not in stored or "sigma" not in stored:
            return False
        features = stored.get("inception_pool_3")
        if features is None or self.has_key(GIVEN_STATISTICS_KEY) or len(features) < 2:
            return True
        return not _same_statistics((stored["mu"], stored["sigma"]), feature_statistics(features))

    @property
    def has_features(self) -> bool:
        """Images, or stored Inception features: what precision/recall need (statistics alone are not enough)."""
        return self.length > 0 or self.has_key("inception_pool_3")

    def has_key(self, key: str) -> bool:
        """Whether the set is an .npz holding an array named ``key``."""
        return self.kind == "npz" and key in self.keys

    def arrays(self, *keys: str) -> dict[str, np.ndarray]:
        """Small arrays stored beside the images in an .npz (``mu``, ``sigma``, ``inception_pool_3``), read and
        checked (finite, float, consistent shapes) when the set was opened."""
        return {key: self.stored[key] for key in keys if key in self.stored}

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self.kind == "npz":
            yield from _npz_batches(self.path, "arr_0", batch_size, self.flag)
            return
        from PIL import Image

        from .pil_images import to_rgb

        batch: list[np.ndarray] = []
        for path in self.files:
            try:
                with Image.open(path) as image:
                    array = np.asarray(to_rgb(image))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL raises all of these
                raise ValueError(f"`{self.flag}`: cannot read the image {str(path)!r} ({_reason(err)}).") from None
            if batch and (len(batch) == batch_size or array.shape != batch[0].shape):  # one size per batch
                yield np.stack(batch)
                batch = []
            batch.append(array)
        if batch:
            yield np.stack(batch)


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# What a damaged or foreign .npz raises inside numpy / zipfile (a CRC or truncation error mid-read included).
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


def is_sample_run(path: Path) -> bool:
    """Whether ``path`` is a ``diffusers-var sample`` run folder by what the run writes beside ``images/``: its
    run.json, or metadata.jsonl with samples.npz (an image folder may have a metadata.jsonl of its own)."""
    return ((path / RUN_FILE).is_file() and read_run_file(path / RUN_FILE) is not None) or (
        (path / METADATA_FILE).is_file() and (path / NPZ_FILE).is_file()
    )


def unfinished_run(path: Path) -> Path | None:
    """The unfinished ``diffusers-var sample`` run folder that ``path`` is, or whose ``images/`` folder it is: it has
    the run's ``run.json`` and ``images/`` but no ``metadata.jsonl`` yet (``None``: not one)."""
    for run in (path, path.parent if path.name == IMAGES_DIR else None):
        if run is not None and (run / RUN_FILE).is_file() and (run / IMAGES_DIR).is_dir():
            return run if not (run / METADATA_FILE).is_file() else None
    return None


def _npz_keys(path: Path, flag: str) -> list[str]:
    """The array names of an .npz, or one error naming the flag when it is not a readable zip of .npy files."""
    try:
        with open(path, "rb") as file:
            magic = file.read(6)
    except OSError as err:
        raise ValueError(f"`{flag}` {str(path)!r} cannot be read ({_reason(err)}).") from None
    if magic == b"\x93NUMPY":
        raise ValueError(f"`{flag}` {str(path)!r} is a .npy array, not an .npz archive (write it with np.savez).")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"`{flag}` {str(path)!r} is not an .npz archive (not a whole zip file).")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except _NPZ_ERRORS as err:
        raise ValueError(f"`{flag}` {str(path)!r} is a damaged .npz archive ({_reason(err)}).") from None
    return [name[: -len(".npy")] for name in names if name.endswith(".npy")]


def _npz_statistics(path: Path, keys: list[str], flag: str) -> dict[str, np.ndarray]:
    """``mu``, ``sigma`` and ``inception_pool_3`` of an .npz, checked: float arrays of shapes (D,), (D, D) and
    (N, D) with D = 2048 (pool_3), all finite; and some images or statistics to use."""
    stored = {}
    for key in ("mu", "sigma", "inception_pool_3"):
        if key not in keys:
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                array = data[key]
        except ValueError as err:
            if "allow_pickle" in str(err):
                message = f"`{flag}` {str(path)!r}: `{key}` is an object (pickled) array, not numbers."
                raise ValueError(message) from None
            raise ValueError(f"`{flag}` {str(path)!r}: `{key}` cannot be read ({_reason(err)}).") from None
        except _NPZ_ERRORS as err:
            raise ValueError(f"`{flag}` {str(path)!r}: `{key}` cannot be read ({_reason(err)}).") from None
        expected = {"mu": "(2048,)", "sigma": "(2048, 2048)", "inception_pool_3": "(N, 2048)"}[key]
        shape_ok = {
            "mu": array.shape == (FEATURE_DIM,),
            "sigma": array.shape == (FEATURE_DIM, FEATURE_DIM),
            "inception_pool_3": array.ndim == 2 and array.shape[1:] == (FEATURE_DIM,),
        }[key]
        if not np.issubdtype(array.dtype, np.floating) or not shape_ok:
            raise ValueError(
                f"`{flag}` {str(path)!r}: `{key}` must be a float array of shape {expected} (Inception pool_3), "
                f"got {array.dtype} {array.shape}."
            )
        if not np.isfinite(array).all():
            raise ValueError(f"`{flag}` {str(path)!r}: `{key}` holds NaN or infinite values.")
        # a covariance is symmetric with a non-negative diagonal (cheap necessary checks; FID would go negative)
        if key == "sigma" and (not np.allclose(array, array.T, rtol=1e-4, atol=1e-6) or (np.diag(array) < 0).any()):
            raise ValueError(
                f"`{flag}` {str(path)!r}: `sigma` is not a covariance matrix (symmetric, non-negative diagonal)."
            )
        if key == "sigma" and (problem := _covariance_problem(np.linalg.eigvalsh(array.astype(np.float64)))):
            # (FID dropped the negative eigenvalues and clamped its result at 0: a perfect score from a bad file)
            raise ValueError(f"`{flag}` {str(path)!r}: `sigma` is not a covariance matrix ({problem}).")
        stored[key] = array
    if ("mu" in stored) != ("sigma" in stored):
        raise ValueError(f"`{flag}` {str(path)!r} has only one of `mu` and `sigma` (FID needs both).")
    return stored


def _same_statistics(given: tuple[np.ndarray, ...], computed: tuple[np.ndarray, ...]) -> bool:
    """Whether each given array equals the computed one up to :data:`SAME_STATISTICS_TOLERANCE`."""
    return all(
        np.abs(g - c).max() <= SAME_STATISTICS_TOLERANCE * max(np.abs(c).max(), np.finfo(np.float64).tiny)
        for g, c in zip(given, computed)
    )


def _metadata_entries(path: Path, flag: str) -> list[dict]:
    """The entries of a sample folder's metadata.jsonl, each an object with a string ``file_name``."""
    try:
        lines = text_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"`{flag}` {str(path)!r} cannot be read ({_reason(err)}).") from None
    entries = []
    for number, entry in json_lines(lines, path, flag):
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise ValueError(f"`{flag}` {str(path)!r} line {number} has no `file_name`.")
        entries.append(entry)
    return entries


def _npz_member(path: Path, key: str, flag: str):
    try:
        archive = zipfile.ZipFile(path)
    except _NPZ_ERRORS as err:
        raise ValueError(f"`{flag}` {str(path)!r} is a damaged .npz archive ({_reason(err)}).") from None
    try:
        member = archive.open(f"{key}.npy")
    except KeyError:
        archive.close()
        raise ValueError(f"`{flag}` {str(path)!r} has no `{key}` array.") from None
    try:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
    except _NPZ_ERRORS as err:
        member.close()
        archive.close()
        raise ValueError(f"`{flag}` {str(path)!r}: `{key}` cannot be read ({_reason(err)}).") from None
    if key == "arr_0" and (dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran_order or 0 in shape[1:3]):
        archive.close()
        order = " in Fortran order (np.asfortranarray; save np.ascontiguousarray(images))" if fortran_order else ""
        raise ValueError(
            f"`{flag}` {str(path)!r}: `arr_0` must be uint8 images (N, H, W, 3) as ADM's batches, got {dtype} "
            f"{shape}{order}."
        )
    return archive, member, shape, dtype


def _npz_shape(path: Path, key: str, flag: str) -> tuple[int, ...]:
    archive, member, shape, _ = _npz_member(path, key, flag)
    member.close()
    archive.close()
    return shape


def _npz_batches(path: Path, key: str, batch_size: int, flag: str) -> Iterator[np.ndarray]:
    """``arr_0`` streamed from the zip member (a 50k batch at 256 px is 9.8 GB), as ADM's evaluator reads it."""
    archive, member, shape, dtype = _npz_member(path, key, flag)
    row = int(np.prod(shape[1:])) * dtype.itemsize
    with archive, member:
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            try:
                batch = np.frombuffer(member.read(count * row), dtype=dtype).reshape(count, *shape[1:])
            except _NPZ_ERRORS as err:  # a truncated or corrupt member
                raise ValueError(f"`{flag}` {str(path)!r}: `{key}` cannot be read ({_reason(err)}).") from None
            yield batch


# ----------------------------------------------------------------------------------------------
# Inception features
# ----------------------------------------------------------------------------------------------
def inception_weights_path(path: str | None = None) -> Path:
    """The FID Inception weight file: ``path``, else torch-fidelity's (or pytorch-fid's) file in torch's hub cache."""
    if path is not None:
        problem = path_problem(path)
        if problem:
            raise ValueError(f"`--inception-weights` {path!r}: {problem}.")
        if not Path(path).is_file():
            raise ValueError(f"`--inception-weights` {path!r} is not a file.")
        return Path(path)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHTS_FILENAMES:
        if (cache / name).is_file():
            return cache / name
    raise ValueError(
        f"the FID Inception weights are not on this machine: put {WEIGHTS_FILENAMES[0]} (from {WEIGHTS_URL}; "
        f"torch-fidelity's file, the same as pytorch-fid's {WEIGHTS_FILENAMES[1]}) into {cache}/, or pass "
        f"`--inception-weights FILE`."
    )


def load_inception(path, device="cpu") -> FIDInceptionV3:
    """The FID Inception with the weights in ``path`` (a torch state dict, read with ``weights_only=True``)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, not torch's at all, or a pickle needing code (refused)
        raise ValueError(
            f"`--inception-weights`: could not read the Inception weights {str(path)!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); download it again."
        ) from None
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{str(path)!r} does not hold the FID Inception weights ({str(err).splitlines()[0]})."
        ) from None
    return model.requires_grad_(False).eval().to(device)


@contextlib.contextmanager
def _full_float32():
    """No TF32 in the feature network (cuDNN allows it by default): the features stay as close to TensorFlow's as the
    CPU gives them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def inception_features(
    model: FIDInceptionV3, images: ImageSet, batch_size: int = 64, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(pool_3 (N, 2048), unbiased logits (N, 1008)), float32, in the set's order."""
    device = next(model.parameters()).device
    pools, logits = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=images.length, unit="img", desc=f"Inception {images.path.name}", dynamic_ncols=True)
    with _full_float32():
        for batch in images.batches(batch_size):
            features = model(torch.from_numpy(np.array(batch)).to(device).permute(0, 3, 1, 2))  # a writable copy
            pools.append(features.pool.cpu().numpy())
            logits.append(features.logits_unbiased.cpu().numpy())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return np.concatenate(pools), np.concatenate(logits)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {len(features)}.")
    features = features.astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


# How far below 0 a covariance's smallest eigenvalue may lie, relative to the largest in magnitude: rounding only.
# np.cov in float64 of 2 to 1,000 pool_3-like feature vectors (rank-deficient, as ADM's and pytorch-fid's statistics
# of small sets) gives about -1e-15, the same matrix stored as float32 about -1e-8: a wide margin over both.
PSD_TOLERANCE = 1e-6


def _covariance_problem(eigenvalues: np.ndarray) -> str | None:
    """Why a symmetric matrix with these eigenvalues is not a covariance (not positive semi-definite beyond
    :data:`PSD_TOLERANCE`), else None."""
    smallest, largest = eigenvalues.min(), eigenvalues.max()
    if smallest < -PSD_TOLERANCE * max(abs(smallest), abs(largest), np.finfo(np.float64).tiny):
        return f"not positive semi-definite: its eigenvalues range from {smallest:.6g} to {largest:.6g}"
    return None


def _psd_sqrt(matrix: np.ndarray, name: str) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    problem = _covariance_problem(values)
    if problem:  # (its negative eigenvalues were dropped, and the distance clamped at 0)
        raise ValueError(f"`{name}` is not a covariance matrix ({problem}).")
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # (clipping rounding's tiny negatives only)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` (the module docstring says how the root is taken).
    A sigma that is not positive semi-definite (beyond rounding: :data:`PSD_TOLERANCE`) is a ValueError."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"the two feature statistics differ in shape: {mu1.shape} / {sigma1.shape} vs {mu2.shape} / "
            f"{sigma2.shape}."
        )
    covmean_trace = np.linalg.svd(_psd_sqrt(sigma1, "sigma1") @ _psd_sqrt(sigma2, "sigma2"), compute_uv=False).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * covmean_trace)
    return max(distance, 0.0)  # a distance: identical statistics give 0 up to float rounding (-1.7e-12 was seen)


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """:func:`frechet_distance` of the Gaussians fitted to two feature sets. With fewer images than dimensions the
    covariances' roots come from the images: ``tr sqrtm(S1 S2)`` is the nuclear norm of ``X1 X2^T`` (centred features)
    over ``sqrt((n1 - 1)(n2 - 1))``, an (n1, n2) problem instead of two (2048, 2048) ones, and exact."""
    if min(len(features1), len(features2)) < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {len(features1)} and {len(features2)}.")
    if max(len(features1), len(features2)) > features1.shape[1]:
        return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
    x1, x2 = (np.asarray(f, dtype=np.float64) for f in (features1, features2))
    diff = x1.mean(axis=0) - x2.mean(axis=0)
    x1, x2 = x1 - x1.mean(axis=0), x2 - x2.mean(axis=0)
    n1, n2 = len(x1) - 1, len(x2) - 1
    covmean_trace = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    return max(float(diff @ diff + (x1**2).sum() / n1 + (x2**2).sum() / n2 - 2 * covmean_trace), 0.0)


def inception_score(logits_unbiased: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception score: ``exp(mean KL(p(y|x) || p(y)))`` per split of ``split_size`` images, averaged."""
    logits = torch.from_numpy(np.asarray(logits_unbiased, dtype=np.float64))
    scores = []
    for start in range(0, len(logits), split_size):
        log_p = logits[start : start + split_size].log_softmax(dim=1)
        # log p(y) as a logsumexp: a class whose probability underflows to 0 in every image gave log 0 and 0 * inf
        log_marginal = log_p.logsumexp(dim=0, keepdim=True) - math.log(len(log_p))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ADM's _batch_pairwise_distances: |u|^2 - 2 u.v + |v|^2, clamped at 0
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_(min=0)


def _rows_per_chunk(cols: int) -> int:
    return max(1, 2**27 // max(1, cols))  # about 512 MB of float32 distances at a time


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour (the point itself is the 0-th, as in ADM)."""
    step = _rows_per_chunk(len(features))
    return torch.cat(
        [
            _squared_distances(features[start : start + step], features).kthvalue(k + 1, dim=1).values
            for start in range(0, len(features), step)
        ]
    )


def _inside(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` within the radius of at least one point of ``manifold``."""
    step = _rows_per_chunk(len(manifold))
    inside = [
        (_squared_distances(points[start : start + step], manifold) <= radii[None]).any(dim=1)
        for start in range(0, len(points), step)
    ]
    return torch.cat(inside).sum().item() / len(points)  # float64, as ADM's np.mean (float32 gave 5/6 as 0.83333331)


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURHOOD, device="cpu"
) -> tuple[float, float]:
    """Improved precision (samples inside the reference manifold) and recall (reference inside the samples')."""
    if min(len(reference), len(samples)) <= k:
        raise ValueError(
            f"precision/recall need more than {k} images on each side, got {len(reference)} and {len(samples)}."
        )
    ref = torch.as_tensor(reference, dtype=torch.float32, device=device)
    gen = torch.as_tensor(samples, dtype=torch.float32, device=device)
    return _inside(gen, ref, manifold_radii(ref, k)), _inside(ref, gen, manifold_radii(gen, k))


# ----------------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------------
def load_clip(name_or_path: str, device="cpu"):
    """(model, tokenizer, image processor) of a ``transformers`` CLIP checkpoint: a folder, or a Hub id already in
    the Hugging Face cache (or downloadable where there is network)."""
    from transformers import AutoTokenizer, CLIPModel

    try:  # transformers >= 5: the PIL/numpy processor (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    try:
        # never a download (the README's promise): a Hub id is read from the local cache
        model = CLIPModel.from_pretrained(name_or_path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        processor = ImageProcessor.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"`--clip-model` {name_or_path!r} could not be loaded ({reason}). Pass a folder holding a "
            f"CLIPModel with its tokenizer and preprocessor_config.json (CLIPModel / CLIPProcessor "
            f"save_pretrained), or put the Hub model into the Hugging Face cache on a machine with network "
            f"(`hf download {DEFAULT_CLIP_MODEL}`)."
        ) from None
    return model.requires_grad_(False).eval().to(device), tokenizer, processor


@torch.no_grad()
def clip_scores(clip, images: ImageSet, prompts: list[str], batch_size: int = 64) -> np.ndarray:
    """Per-image CLIP score ``100 * max(cos, 0)`` of image i with ``prompts[i]``."""
    from PIL import Image

    model, tokenizer, processor = clip
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    scores, start = [], 0
    for batch in images.batches(batch_size):
        texts = prompts[start : start + len(batch)]
        start += len(batch)
        pixels = processor(images=[Image.fromarray(a) for a in batch], return_tensors="pt")["pixel_values"]
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = model(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            pixel_values=pixels.to(device),
        )
        cosine = (out.image_embeds.float() * out.text_embeds.float()).sum(dim=-1)  # both unit vectors
        scores.append((100 * cosine.clamp(min=0)).cpu().numpy())
    if start != len(prompts):
        raise ValueError(f"{start} images for {len(prompts)} prompts.")
    return np.concatenate(scores)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def _reference_size(reference: ImageSet | None) -> int | None:
    """Images or stored features of the reference; ``None`` for none, or for statistics (``mu``, ``sigma``) only."""
    if reference is None:
        return None
    if reference.length:
        return reference.length
    features = reference.arrays("inception_pool_3").get("inception_pool_3")
    return None if features is None else len(features)


def _metrics(args, samples: ImageSet, reference: ImageSet | None) -> list[str]:
    """The metrics to compute, settled before any feature pass: ``auto`` leaves out what the set sizes cannot give
    (FID: 2 images a side; precision/recall: more than k, and the reference's images or features); a metric asked
    for by name that they cannot give is a ValueError naming ``--metrics``."""
    n_ref = _reference_size(reference)
    stats_only = reference is not None and n_ref is None
    uses_stats = reference is not None and reference.uses_given_statistics
    fid_possible = samples.length >= 2 and (uses_stats or (n_ref or 0) >= 2)
    pr_possible = n_ref is not None and min(samples.length, n_ref) > PR_NEIGHBOURHOOD
    if args.metrics == "auto":
        chosen = ["is"] + (["clip"] if samples.prompts and not samples.prompt_problem else [])
        if samples.prompt_problem:
            print(f"note: --metrics auto left out clip: {samples.prompt_problem}.", file=sys.stderr)
        chosen += (["fid"] if reference is not None and fid_possible else []) + (["pr"] if pr_possible else [])
        needs = (("FID", "at least 2", fid_possible), ("pr", f"more than {PR_NEIGHBOURHOOD}", pr_possible))
        left_out = [
            f"{name} (it needs {need} images on each side)"
            for name, need, possible in needs
            if reference is not None and not possible and not (name == "pr" and stats_only)
        ]
        if left_out:
            print(f"note: --metrics auto left out {' and '.join(left_out)}.", file=sys.stderr)
    else:
        chosen = [m.strip() for m in args.metrics.split(",") if m.strip()]
        bad = [m for m in chosen if m not in METRICS]
        if bad or not chosen:
            raise ValueError(
                f"`--metrics` must be 'auto' or a comma-separated subset of {', '.join(METRICS)}, "
                f"got {args.metrics!r}."
            )
    if reference is None and ({"fid", "pr"} & set(chosen)):
        raise ValueError("`--reference` is required for FID and precision/recall.")
    if n_ref is None:
        reference_size = "reference statistics only"
    elif reference.length:
        reference_size = f"{n_ref} reference image(s)"
    else:  # (an empty `inception_pool_3` was reported as "reference statistics")
        reference_size = f"{n_ref} reference feature vector(s) (`inception_pool_3`)"
    sizes = f"{samples.length} sample(s), {reference_size}"
    if "fid" in chosen and not fid_possible:
        raise ValueError(f"`--metrics` fid needs at least 2 images on each side, got {sizes}; leave it out.")
    if "pr" in chosen and stats_only:
        raise ValueError(
            f"`--metrics` pr: `--reference` {args.reference!r} holds statistics only; precision/recall need its "
            "images or `inception_pool_3` features (or leave pr out of --metrics)."
        )
    if "pr" in chosen and not pr_possible:
        raise ValueError(
            f"`--metrics` pr needs more than {PR_NEIGHBOURHOOD} images on each side, got {sizes}; leave it out."
        )
    if "clip" in chosen and samples.prompt_problem:
        raise ValueError(f"`--metrics clip`: {samples.prompt_problem}.")
    if "clip" in chosen and not samples.prompts:
        raise ValueError(
            "`--metrics clip` needs the prompts: evaluate a `diffusers-var sample` folder of a "
            "text-to-image run (its metadata.jsonl holds them)."
        )
    return [m for m in METRICS if m in chosen]


def run_evaluate(args) -> dict:
    if args.batch_size < 1:
        raise ValueError(f"`--batch-size` must be >= 1, got {args.batch_size}.")
    samples = ImageSet(args.samples, "--samples")
    if samples.length == 0:
        raise ValueError(f"`--samples` {args.samples!r} has no `arr_0` images.")
    reference = ImageSet(args.reference, "--reference") if args.reference else None
    for note in samples.notes + (reference.notes if reference is not None else []):
        print(f"note: {note}", file=sys.stderr)
    if reference is not None and not reference.length and not reference.arrays("inception_pool_3"):
        if not reference.arrays("mu", "sigma"):
            raise ValueError(
                f"`--reference` {args.reference!r} has neither images (`arr_0`) nor statistics (`mu`, `sigma`)."
            )
    if args.save_reference_stats:
        if reference is None:
            raise ValueError(
                "`--save-reference-stats` saves the statistics of `--reference`, which is not given (the samples' "
                "statistics are not saved)."
            )
        if not reference.length and not reference.arrays("inception_pool_3"):
            raise ValueError(
                f"`--save-reference-stats`: `--reference` {args.reference!r} holds statistics only, no images or "
                f"features to save."
            )
        count = reference.length or len(reference.arrays("inception_pool_3").get("inception_pool_3", ()))
        if count < 2:  # (it failed after both Inception passes, the results lost)
            raise ValueError(
                f"`--save-reference-stats`: `--reference` {args.reference!r} has {count} image; statistics (a mean "
                "and a covariance) need at least 2."
            )
    inputs = [Path(p) for p in (args.samples, args.reference) if p]
    for flag, target, ours in (
        ("--save-reference-stats", args.save_reference_stats, _is_reference_statistics),
        ("--out", args.out, _is_results_file),
    ):
        if target is not None:
            check_output_file(flag, target, inputs, ours)
    if args.save_reference_stats and Path(args.save_reference_stats).suffix.lower() != ".npz":
        raise ValueError(  # (--reference tells an .npz by its suffix: the file written was refused there)
            f"`--save-reference-stats` must name an .npz file, which `--reference` reads back, got "
            f"{args.save_reference_stats!r}."
        )
    if (
        args.out
        and args.save_reference_stats
        and Path(args.out).resolve() == Path(args.save_reference_stats).resolve()
    ):
        raise ValueError("`--out` and `--save-reference-stats` name the same file; give each its own.")
    metrics = _metrics(args, samples, reference)
    if ("fid" in metrics or args.save_reference_stats) and reference is not None and reference.uses_given_statistics:
        features = reference.arrays("inception_pool_3").get("inception_pool_3", ())
        if len(features) >= 2 and not reference.has_key(GIVEN_STATISTICS_KEY):  # (a silent choice otherwise)
            print(
                f"note: `--reference` {args.reference!r}: its `mu` / `sigma` are not the statistics of its "
                "`inception_pool_3` features; FID uses the given `mu` / `sigma`, as ADM's evaluator does "
                "(precision/recall use the features).",
                file=sys.stderr,
            )
    problem = check_device("--device", args.device)
    if problem:
        raise ValueError(problem)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = not args.no_progress
    # Load every network before the long feature passes, so that a missing file fails at once.
    inception = None
    if {"fid", "is", "pr"} & set(metrics):
        weights = inception_weights_path(args.inception_weights)
        inception = load_inception(weights, device)
    clip = None
    if "clip" in metrics:
        try:
            clip = load_clip(args.clip_model, device)
        except ValueError as err:
            if args.metrics != "auto":
                raise
            # auto asks for what applies: without the CLIP model the other metrics still come, said in a note
            print(f"note: --metrics auto left out clip: {err} (or pass --metrics fid,is,pr).", file=sys.stderr)
            metrics = [metric for metric in metrics if metric != "clip"]

    result = {"samples": str(samples.path), "num_samples": samples.length}
    if inception is not None:
        result["inception_weights"] = str(weights)
        pool, logits = _finite_features(inception_features(inception, samples, args.batch_size, progress), samples)
        if "is" in metrics:
            result["inception_score"] = inception_score(logits)
    if reference is not None and ({"fid", "pr"} & set(metrics) or args.save_reference_stats):
        result["reference"] = str(reference.path)
        stored = reference.arrays("mu", "sigma", "inception_pool_3")
        ref_pool = stored.get("inception_pool_3")
        if ref_pool is None and reference.length:
            ref_pool, _ = _finite_features(
                inception_features(
                    inception or load_inception(inception_weights_path(args.inception_weights), device),
                    reference,
                    args.batch_size,
                    progress,
                ),
                reference,
            )
        result["num_reference"] = None if ref_pool is None else len(ref_pool)
        # ADM's reference batches carry their TensorFlow statistics: FID uses them, as ADM does. A file of
        # --save-reference-stats carries the features, which give its own statistics, and keeps the given ones
        # (marked by GIVEN_STATISTICS_KEY) when its reference had them (ImageSet.uses_given_statistics).
        use_stats = reference.uses_given_statistics
        if "fid" in metrics:
            result["fid"] = (
                frechet_distance(*feature_statistics(pool), stored["mu"], stored["sigma"])
                if use_stats
                else frechet_distance_of_features(pool, ref_pool)
            )
        if "pr" in metrics:
            if ref_pool is None:
                raise ValueError(
                    f"`--reference` {args.reference!r} holds statistics only; precision/recall need its "
                    f"images or `inception_pool_3` features (or leave pr out of --metrics)."
                )
            result["precision"], result["recall"] = precision_recall(ref_pool, pool, device=device)
    if clip is not None:
        scores = clip_scores(clip, samples, samples.prompts, args.batch_size)
        result["clip_score"] = float(scores.mean())
        result["clip_model"] = args.clip_model
    result["protocol"] = PROTOCOL_START + (
        ": TF-Inception pool_3 FID, Inception score (splits of 5000), precision/recall "
        "(k=3)" + ("; CLIP score 100*max(cos,0)" if clip is not None else "")
    )
    bad = [key for key in METRIC_KEYS if key in result and not np.isfinite(result[key])]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} came out as NaN or infinite: the features are not finite (check "
            f"`--inception-weights` / `--clip-model` and the images)."
        )
    if args.save_reference_stats:  # last: a failed write still prints the results (LateWriteError)
        target = Path(args.save_reference_stats)
        if use_stats:  # the reference's own statistics (ADM's), which FID used: the next runs use them too
            arrays = {"mu": stored["mu"], "sigma": stored["sigma"], GIVEN_STATISTICS_KEY: np.array(True)}
        else:
            arrays = dict(zip(("mu", "sigma"), feature_statistics(ref_pool)))
        arrays["inception_pool_3"] = ref_pool
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, lambda tmp: _savez(tmp, arrays))
        except OSError as err:
            message = f"`--save-reference-stats` {str(target)!r} was not written ({_reason(err)})."
            raise LateWriteError(message, result) from None
        result["reference_stats"] = str(target)
    return result


def _finite_features(features: tuple[np.ndarray, np.ndarray], images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    if not all(np.isfinite(f).all() for f in features):
        raise ValueError(
            f"the Inception features of `{images.flag}` {str(images.path)!r} hold NaN or infinite values (check "
            f"`--inception-weights`)."
        )
    return features


METRIC_KEYS = ("inception_score", "fid", "precision", "recall", "clip_score")
PROTOCOL_START = "ADM evaluator"
# every key a results file of this command holds: a JSON file with others is someone else's
RESULT_KEYS = {
    "samples",
    "num_samples",
    "inception_weights",
    "reference",
    "num_reference",
    "clip_model",
    "protocol",
    "reference_stats",
    *METRIC_KEYS,
}


class LateWriteError(ValueError):
    """A file that could not be written after the metrics were computed: the results are printed all the same."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def check_output_file(flag: str, path: str, inputs: list[Path] = (), ours=None) -> None:
    """Refuse, before any work, an output file that cannot be written (a folder, a path whose folder is a file or
    cannot be made / written into, a name too long for :func:`write_atomic`'s temporary file), one that is an input
    or inside an input folder, and an existing file that ``ours(path)`` does not recognise as this command's output
    (it would be replaced)."""
    from .conversion.common import folder_problem

    if not str(path).strip():
        raise ValueError(f"`{flag}` is empty; give a file name.")
    target = Path(path)
    problem = path_problem(target)
    if problem:
        raise ValueError(f"`{flag}` {path!r}: {problem}.")
    if target.is_dir():
        raise ValueError(f"`{flag}` {path!r} is a folder, not a file.")
    # (a name too long for write_atomic's temporary file failed only after the feature passes)
    problem = folder_problem(target.parent) or atomic_name_problem(target)
    if problem:
        raise ValueError(f"`{flag}` {path!r}: {problem}.")
    resolved = target.resolve()
    read_there = target.suffix.lower() in IMAGE_SUFFIXES or target.name in (METADATA_FILE, RUN_FILE)
    for source in inputs:
        source = source.resolve()
        if resolved == source or (read_there and source in resolved.parents):  # (eval.json in a run folder is fine)
            raise ValueError(f"`{flag}` {path!r} is an input of this evaluation (or inside one); write elsewhere.")
    if target.is_file() and ours is not None and not ours(target):
        raise ValueError(
            f"`{flag}` {path!r} exists and is not a file this command wrote; choose another name (or delete it)."
        )


def _is_results_file(path: Path) -> bool:
    """A JSON results file of ``evaluate --out``."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(results, dict)
        and {"samples", "num_samples", "protocol"} <= set(results) <= RESULT_KEYS
        and str(results["protocol"]).startswith(PROTOCOL_START)
    )


def _is_reference_statistics(path: Path) -> bool:
    """An ``.npz`` of ``--save-reference-stats``: the statistics and the features, nothing else (pytorch-fid's
    ``--save-stats`` files hold only mu and sigma: someone else's)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False
    return keys in ({"mu", "sigma", "inception_pool_3"}, {"mu", "sigma", "inception_pool_3", GIVEN_STATISTICS_KEY})


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would add ".npz" to the temporary name
        np.savez(file, **arrays)


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="FID, Inception score, precision/recall (ADM's protocol) and CLIP score of a sample set",
        description="Evaluate samples (a `diffusers-var sample` folder, an image folder or an ADM .npz) against a "
        "reference (an image folder, or an .npz with images `arr_0` and/or statistics `mu`/`sigma`). "
        "Prints the results as JSON.",
    )
    parser.add_argument(
        "--samples", type=nonblank, required=True, help="sample folder, image folder or .npz (arr_0 uint8 NHWC)"
    )
    parser.add_argument(
        "--reference",
        type=nonblank,
        default=None,
        help="image folder or .npz (ADM's reference batch, or a file of --save-reference-stats)",
    )
    parser.add_argument(
        "--metrics",
        default="auto",
        help="auto (IS; FID and pr with --reference; clip for prompts) or a subset of fid,is,pr,clip",
    )
    parser.add_argument(
        "--inception-weights",
        type=nonblank,
        default=None,
        help="FID Inception weight file (default: torch-fidelity's cache file in $TORCH_HOME/hub/checkpoints)",
    )
    parser.add_argument(
        "--clip-model",
        type=nonblank,
        default=DEFAULT_CLIP_MODEL,
        help=f"transformers CLIP folder or cached Hub id (default {DEFAULT_CLIP_MODEL})",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--save-reference-stats",
        type=home_path,
        default=None,
        metavar="FILE.npz",
        help="write the --reference's mu, sigma and features here (reuse it as --reference); needs --reference",
    )
    parser.add_argument("--out", type=home_path, default=None, help="also write the JSON results here")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=evaluate_command)
    return parser


def evaluate_command(args) -> int:
    late_error = None
    try:
        result = run_evaluate(args)
    except LateWriteError as err:
        result, late_error = err.result, str(err)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text, flush=True)  # before --out: a failed write does not lose the results
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(args.out), lambda tmp: tmp.write_text(text + "\n"))
        except OSError as err:
            late_error = late_error or f"`--out` {args.out!r} was not written ({_reason(err)})."
    if late_error:
        print(f"error: {late_error}", file=sys.stderr)
        return 2
    return 0
