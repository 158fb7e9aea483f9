"""Gradio demo for VAR, STAR and Infinity: ``python demos/app.py [--var PATH] [--star PATH] [--infinity PATH]``.

The app lives in :mod:`diffusers_var.demo` (also ``diffusers-var demo``); this file is a launcher that
re-exports :func:`build_demo` and :func:`main`.
"""

import sys
from pathlib import Path

try:
    import diffusers_var  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers_var.demo import build_demo, main  # noqa: E402

__all__ = ["build_demo", "main"]

if __name__ == "__main__":
    sys.exit(main())
