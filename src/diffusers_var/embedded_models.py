"""Where the embedded default pipelines live (``var-shapes``, ``star-shapes``, ``infinity-shapes``,
``var-shapes-refiner``): inside the package of a wheel, or the repository's ``pipelines/`` folder of a checkout, and
how a name given on the command line finds them. Imports nothing of the package, so the package's ``__init__`` can
offer :func:`embedded_pipeline`."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def embedded_pipelines_dir() -> Path:
    """The folder holding the embedded default pipelines (``var-shapes``, ``star-shapes``, ``infinity-shapes``).

    A wheel (``pip install .``) ships them inside the package as ``diffusers_var/embedded/``; a source checkout
    or an editable install reads the repository's ``pipelines/`` folder.
    """
    packaged = PACKAGE_DIR / "embedded"
    if (packaged / "var-shapes" / "model_index.json").is_file():
        return packaged
    return PACKAGE_DIR.parents[1] / "pipelines"


EMBEDDED_PIPELINES = ("var-shapes", "star-shapes", "infinity-shapes", "var-shapes-refiner")


def embedded_pipeline(name: str = "var-shapes") -> Path:
    """The folder of an embedded pipeline (``var-shapes``, ``star-shapes``, ``infinity-shapes``,
    ``var-shapes-refiner``) for ``from_pretrained``, from a source checkout or a wheel alike."""
    if name not in EMBEDDED_PIPELINES:
        raise ValueError(f"`name` must be one of {', '.join(EMBEDDED_PIPELINES)}, got {name!r}")
    folder = embedded_pipelines_dir() / name
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"the embedded pipeline {name!r} is not part of this installation (no {folder})")
    return folder


def resolve_pipeline_folder(model: str | Path) -> Path:
    """A pipeline folder named on the command line: the path itself when it exists, else, for the name of an
    embedded pipeline (``var-shapes``, ``star-shapes``, ``infinity-shapes``, ``var-shapes-refiner``; also in the
    checkout's form ``pipelines/NAME``), the embedded copy, so the same commands work from a wheel."""
    from .file_utils import path_problem

    path = Path(model)
    if path_problem(path):  # a name too long to look up: left to the folder's checks, which name the flag
        return path
    if path.exists() or path.name not in EMBEDDED_PIPELINES or str(path.parent) not in (".", "pipelines"):
        return path
    embedded = embedded_pipelines_dir() / path.name
    return embedded if (embedded / "model_index.json").is_file() else path


def default_model() -> Path:
    """The folder ``diffusers-var generate`` / ``sample`` use without ``--model``: the embedded VAR."""
    return embedded_pipelines_dir() / "var-shapes"
