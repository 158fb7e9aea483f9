"""Shared test helpers: where the reference fixtures live and how tensors are compared with them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_ROOT = Path(os.environ.get("DIFFUSERS_VAR_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
KEYS_ROOT = Path(os.environ.get("DIFFUSERS_VAR_KEYS", REPO_ROOT.parent / "shared" / "keys"))

# diffusers' pipeline test battery, vendored verbatim (helpers, not tests): run by tests/test_diffusers_battery.py
collect_ignore = ["diffusers_battery"]


def fixture_dir(family: str) -> Path:
    """The reference fixture folder of a model family; skips (with the reason) when it is absent.
    ``.ci/run`` sets DIFFUSERS_VAR_REQUIRE_FIXTURES=1, which turns a missing folder into a failure."""
    path = FIXTURES_ROOT / family
    if not (path / "manifest.json").is_file():
        _reference_missing(f"reference fixtures not found at {path} (set DIFFUSERS_VAR_FIXTURES)")
    return path


def keys_dir(family: str) -> Path:
    path = KEYS_ROOT / family
    if not path.is_dir():
        _reference_missing(f"checkpoint key lists not found at {path} (set DIFFUSERS_VAR_KEYS)")
    return path


def _reference_missing(message: str) -> None:
    """Skip, or fail under DIFFUSERS_VAR_REQUIRE_FIXTURES=1 (CI must never pass by skipping)."""
    if os.environ.get("DIFFUSERS_VAR_REQUIRE_FIXTURES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def assert_ruff_clean(*paths: Path) -> None:
    """``ruff check`` and ``ruff format --check`` pass on ``paths`` with the repository's settings (the pinned ruff of
    the test extra; skipped where it is not installed). Files the package writes may land inside a checkout, whose
    lint command then reads them."""
    import shutil
    import subprocess

    try:
        from ruff.__main__ import find_ruff_bin

        ruff = find_ruff_bin()
    except (ImportError, FileNotFoundError):
        ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    config = ["--config", str(REPO_ROOT / "pyproject.toml"), "--no-cache"]
    for command in (["check", *config], ["format", "--check", "--diff", *config]):
        done = subprocess.run([ruff, *command, *map(str, paths)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"ruff {command[0]}:\n{done.stdout}{done.stderr}"


def load_manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def assert_matches(
    name: str, actual: torch.Tensor, reference: torch.Tensor, tolerance, errors: dict | None = None
) -> None:
    """Compare with the manifest tolerance: "exact" (integers) or {"atol", "rtol"}; records the max error."""
    actual = actual.detach().cpu()
    assert tuple(actual.shape) == tuple(reference.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    )
    if tolerance == "exact" or not reference.is_floating_point():
        assert torch.equal(actual.to(reference.dtype), reference), f"{name}: integer tensor differs from the reference"
        if errors is not None:
            errors[name] = 0.0
        return
    actual = actual.to(reference.dtype)
    if errors is not None:
        errors[name] = (actual - reference).abs().max().item()
    torch.testing.assert_close(
        actual, reference, atol=tolerance["atol"], rtol=tolerance["rtol"], msg=lambda m: f"{name}: {m}"
    )


@contextlib.contextmanager
def tokenizer_warnings(tokenizer):
    """The messages transformers' tokenizer module logs at WARNING inside the block, as a list (its library logger
    does not propagate to pytest's caplog); ``tokenizer``'s warn-once memory is cleared first."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    module_logger = logging.getLogger("transformers.tokenization_utils_base")
    level = module_logger.level
    module_logger.addHandler(handler)
    module_logger.setLevel(logging.WARNING)
    tokenizer.deprecation_warnings.clear()
    try:
        yield messages
    finally:
        module_logger.removeHandler(handler)
        module_logger.setLevel(level)
