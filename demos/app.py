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

try:
    from diffusers_var.demo import build_demo, main
except ModuleNotFoundError as err:  # gradio missing: one line, as `diffusers-var demo` says it, not a traceback
    if err.name != "gradio" or __name__ != "__main__":
        raise
    sys.exit(f"error: the demo needs gradio ({err}); install it with `pip install gradio`")

__all__ = ["build_demo", "main"]

if __name__ == "__main__":
    sys.exit(main())
