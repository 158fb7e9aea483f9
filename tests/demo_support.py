"""Helpers shared by the demo tests: optional tools, tiny pipeline folders, and a served app.

The demo tests need gradio (and the browser test Playwright + a Chromium binary). Where a tool is missing
they skip with the reason; ``DIFFUSERS_VAR_REQUIRE_BROWSER=1`` (set by ``.ci/run``) turns that into a
failure so CI never passes by skipping them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the app under test

REQUIRE = os.environ.get("DIFFUSERS_VAR_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # git-ignored: screenshots of the browser test


def missing(reason: str):
    """Skip (or, under DIFFUSERS_VAR_REQUIRE_BROWSER=1, fail) because a tool is not installed. Called at import
    time it skips the whole module (or fails its collection)."""
    if REQUIRE:
        pytest.fail(f"{reason} (DIFFUSERS_VAR_REQUIRE_BROWSER=1 requires it)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing(f"{module} is not installed ({err}); install it with `{install}`")


def tiny_folders(root: Path) -> dict[str, Path | None]:
    """Save tiny random STAR (16 px) and Infinity (32 px) pipelines under ``root``; a family whose text
    fixtures are absent is ``None`` (its tab then shows the missing-model notice)."""
    folders: dict[str, Path | None] = {}
    try:
        from test_star_pipeline import make_pipe

        make_pipe(patch_nums=(1, 2, 4, 8)).save_pretrained(root / "star")
        folders["star"] = root / "star"
    except pytest.skip.Exception:
        folders["star"] = None
    try:
        from test_infinity_pipeline import tiny_pipeline

        tiny_pipeline().save_pretrained(root / "infinity")
        folders["infinity"] = root / "infinity"
    except pytest.skip.Exception:
        folders["infinity"] = None
    return folders


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(demo):
    """Launch ``demo`` on 127.0.0.1 in this process; yields its URL; closes it afterwards."""
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, share=False)
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()
