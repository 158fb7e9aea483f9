"""The package as users install it: ``pip install .`` (a wheel, not editable) in a fresh virtual environment,
then the README's main command. The wheel must carry the embedded pipelines (they live in the repository's
``pipelines/`` folder). Offline: the wheel is built with ``--no-build-isolation`` from the setuptools installed
here (the ``test`` extra pins it), and installed with ``--no-deps --no-index``; its requirements come from this
environment, so nothing is downloaded: only the distributions the wheel's requirements reach (themselves and
their own requirements, recursively), linked into one folder that a ``.pth`` line adds. A package the command
needs that no requirement brings (the test extra's ``accelerate`` once was one) fails the test."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SOURCES = ["setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "src", "pipelines"]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", minversion="70.1")  # builds wheels without the `wheel` package
    root = tmp_path_factory.mktemp("source")
    for name in SOURCES:  # a copy, so that the build writes no build/ or egg-info into the working tree
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.is_file():
            shutil.copy2(source, root / name)
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(root),
        ]
    )
    (built,) = dist.glob("diffusers_var-*.whl")
    return built


def requirement_closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``requirements`` reach, by canonical name: each requirement whose marker holds
    without extras, then its own requirements, recursively. One not installed here is left out (then whatever
    needs it fails in the fresh environment, as it would for a user without it)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, importlib.metadata.Distribution] = {}
    pending = list(requirements)
    while pending:
        requirement = Requirement(pending.pop())
        name = canonicalize_name(requirement.name)
        if name in found or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            found[name] = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pending.extend(found[name].requires or [])
    return found


def link_distributions(distributions, folder: Path) -> None:
    """Symbolic links in ``folder`` to the top-level modules, packages and metadata of ``distributions``."""
    folder.mkdir()
    for distribution in distributions:
        tops = {Path(f).parts[0] for f in distribution.files or () if not str(f).startswith("..")}
        assert tops, f"{distribution.metadata['Name']} lists no files"
        for top in tops - {"__pycache__"}:
            source = Path(distribution.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)


def test_wheel_ships_the_embedded_pipelines(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for family in ("var-shapes", "star-shapes", "infinity-shapes"):
        folder = REPO_ROOT / "pipelines" / family
        expected = {
            f"diffusers_var/embedded/{family}/{p.relative_to(folder).as_posix()}"
            for p in folder.rglob("*")
            if p.is_file()
        }
        assert expected and expected <= names, sorted(expected - names)[:5]
    assert not [n for n in names if n.endswith((".pyc", ".bin", ".pth", ".pkl"))]


def test_pip_install_then_the_readme_command_works(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert site.is_relative_to(venv), site
    # the fresh environment sees the wheel's requirements from this environment, and nothing else of it
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    requirements = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    reached = requirement_closure(requirements)
    assert {"torch", "diffusers", "transformers"} <= set(reached), sorted(reached)
    link_distributions(reached.values(), tmp_path / "requirements")
    (site / "requirements.pth").write_text(f"{tmp_path / 'requirements'}\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)]
    )

    work = tmp_path / "elsewhere"  # not the repository: nothing may be found through the working directory
    work.mkdir()
    # the installed copy only: no PYTHONPATH (a test run may point it at the working tree's src/)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # where the package is found, without importing it (find_spec of a top-level package runs none of its code)
    located = _run(
        [str(python), "-c", "import importlib.util; print(importlib.util.find_spec('diffusers_var').origin)"],
        cwd=work,
        env=env,
    ).stdout
    assert Path(located.strip()).is_relative_to(venv), located
    command = ["diffusers-var", "generate", "--class-label", "red circle on blue", "--out", "out.png"]  # README's
    result = _run(command, cwd=work, env=env)
    assert (work / "out.png").is_file(), result.stdout + result.stderr
    from PIL import Image

    from diffusers_var import shapes

    judged = shapes.judge_images([Image.open(work / "out.png")])[0]
    assert judged == shapes.ShapeClass("circle", "red", "blue"), judged
    # the embedded pipelines by name, as the README writes them (short and checkout forms), from the wheel's copies
    for command in (
        ["diffusers-var", "generate", "--model", "star-shapes", "--prompt", "a red circle", "--out", "star.png"],
        ["diffusers-var", "generate", "--refiner", "pipelines/var-shapes-refiner", "--out", "code.png"],
    ):
        result = _run(command, cwd=work, env=env)
        assert (work / command[-1]).is_file(), result.stdout + result.stderr
