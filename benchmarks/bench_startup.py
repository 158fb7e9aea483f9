#!/usr/bin/env python
"""Start-up of the fast path: how long a fresh ``diffusers-var sample --fast`` process takes to its first images, with
an empty compile cache and then with the cache the earlier processes left (``--compile-cache``, issue 20's target:
<= 30 s for a second process on the same machine).

    python benchmarks/bench_startup.py                      # GPU: var-d16 at 256 px, batch 64, 3 processes
    python benchmarks/bench_startup.py --models var-d16,var-d30 --processes 2 --json startup.json
    python benchmarks/bench_startup.py --smoke              # CPU check of the script (the embedded var-shapes)

The model is built once as ``bench_pipelines.py`` builds it (random weights, real configuration) and saved to a
temporary folder (not timed). Then ``--processes`` processes run one after another, each the real command a user
runs: ``python -m diffusers_var.cli sample --fast --compile-cache DIR --batch-size B --class-labels 0..B-1
--per-class 1`` (one batch: its wall time is the time to the first fast images, the PNG files included). The first
process finds ``DIR`` empty and compiles (decoder and block code, then CUDA graph capture); the later ones load
Inductor's compiled graphs from ``DIR`` (torch.compile still traces the Python code, and the CUDA graphs are
captured again: neither is cached by PyTorch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

from diffusers_var.cli_support import COMPILE_BLOCKS_SHAPES  # noqa: E402

TARGET_SECONDS = 30.0


def run_process(
    model: Path, out: Path, cache: Path, batch: int, device: str, extra_env: dict | None = None, compile_blocks=None
) -> dict:
    """One fresh ``sample --fast`` process (``--compile-blocks compile_blocks`` when given); its wall time from launch
    to exit and its last output line."""
    command = [
        sys.executable,
        "-m",
        "diffusers_var.cli",
        "sample",
        "--model",
        str(model),
        "--out",
        str(out),
        "--fast",
        "--compile-cache",
        str(cache),
        "--batch-size",
        str(batch),
        "--class-labels",
        ",".join(str(i) for i in range(batch)),
        "--per-class",
        "1",
        "--seed",
        "0",
        "--no-progress",
        "--device",
        device,
    ] + (["--compile-blocks", compile_blocks] if compile_blocks else [])
    started = time.perf_counter()
    result = subprocess.run(command, env=child_env(extra_env), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"sample failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    images = len(list((out / "images").glob("*.png")))
    row = {"seconds": seconds, "images": images, "cache_mib": folder_mib(cache)}
    # sample's own account: "start-up: loading X s, fast path set-up Y s, first batch Z s"
    for line in result.stdout.splitlines():
        if line.startswith("start-up:"):
            for part in line[len("start-up:") :].split(","):
                name, value = part.strip().removesuffix(" s").rsplit(" ", 1)
                row[name.replace(" ", "_").replace("-", "_") + "_s"] = float(value)
    phases = sum(v for k, v in row.items() if k.endswith("_s") and not k.startswith("of_which"))
    row["python_and_rest_s"] = seconds - phases  # interpreter and imports, writing the last files, exit
    return row


def child_env(extra_env: dict | None = None) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra_env or {})}


def import_seconds() -> float:
    """Wall time of a process that imports ``diffusers_var.cli`` (diffusers, transformers, torch) and exits."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import diffusers_var.cli"], env=child_env(), check=True)
    return time.perf_counter() - started


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="var-d16", help="comma-separated bench_pipelines.py VAR models")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (--smoke: 2)")
    parser.add_argument("--processes", type=int, default=3, help="processes per model, one after another")
    parser.add_argument("--smoke", action="store_true", help="the embedded var-shapes on the CPU: checks the script")
    parser.add_argument(
        "--compile-blocks",
        choices=COMPILE_BLOCKS_SHAPES,
        default=None,
        help="sample's --compile-blocks (default: sample's default, dynamic)",
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--warm-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one more warm-cache process with this environment variable set (repeatable: one process each), e.g. "
        "TORCHINDUCTOR_COMPILE_THREADS=1 (no compile worker pool when everything comes from the cache)",
    )
    args = parser.parse_args()
    variants = [None]
    for item in args.warm_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--warm-env must be NAME=VALUE, got {item!r}")
        variants.append({key: value})
    batch = args.batch_size or (2 if args.smoke else 64)
    if args.processes < 2:
        parser.error("--processes must be at least 2 (the first fills the cache)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as scratch:
        scratch = Path(scratch)
        for name in ["var-shapes"] if args.smoke else args.models.split(","):
            if args.smoke:
                model, device = REPO / "pipelines" / "var-shapes", "cpu"
            else:
                import torch
                from bench_sample import build

                if not torch.cuda.is_available():
                    print("this benchmark needs a CUDA GPU (or --smoke for a check of the script)")
                    return 1
                model, device = scratch / name, "cuda"
                build(name, model, device)
            cache = scratch / f"cache-{name}"
            runs = [None] * args.processes + variants[1:]  # the plain processes, then one per --warm-env
            for index, extra_env in enumerate(runs):
                row = {"model": name, "batch": batch, "process": index + 1, "cache": "empty" if index == 0 else "warm"}
                if extra_env:
                    row["env"] = extra_env
                out = scratch / f"out-{name}-{index}"
                row.update(run_process(model, out, cache, batch, device, extra_env, args.compile_blocks))
                rows.append(row)
                phases = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in row.items() if k.endswith("_s"))
                label = row["cache"] + " cache" + "".join(f", {k}={v}" for k, v in (extra_env or {}).items())
                print(
                    f"{name:10s} batch {batch:3d} process {index + 1} ({label}): "
                    f"{row['seconds']:7.1f} s to {row['images']} images ({phases}); cache {row['cache_mib']:.0f} MiB",
                    flush=True,
                )
            warm = [r["seconds"] for r in rows if r["model"] == name and r["cache"] == "warm" and "env" not in r]
            print(
                f"{name}: first process {rows[-len(runs)]['seconds']:.1f} s, later ones "
                f"{min(warm):.1f}-{max(warm):.1f} s (target <= {TARGET_SECONDS:.0f} s)"
            )
            imports = import_seconds()
            for row in rows[-len(runs) :]:
                row["imports_alone_seconds"] = imports
            print(f"a process that only imports the CLI and exits: {imports:.1f} s (within 'python and rest')")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
