#!/usr/bin/env python
"""Throughput and memory of ``diffusers-var sample --fast`` (the real code path) on random-weight VAR models.

    python benchmarks/bench_sample.py                    # GPU: var-d16,var-d30 at 256 px, batch 64, 40 batches each
    python benchmarks/bench_sample.py --models var-d30 --batches 100 --json sample.json
    python benchmarks/bench_sample.py --smoke            # CPU check of the script: tiny VAR, a few small batches

For each model it builds the pipeline exactly as ``bench_pipelines.py`` does (same configuration, seed and random
weights), saves it to a temporary folder and then, each in a fresh process (compiled code is shared by every model
of a class within a process):

1. ``bench_pipelines.py``'s own figure for that model: ``fast-compile-all``, the same batch size, one CUDA generator
   (sampling inside the CUDA graphs), median of 3 batches;
2. ``diffusers-var sample --fast --batch-size B --rng R`` over ``--batches`` batches (labels 0..B-1 in every batch, as
   the benchmark's), through :func:`diffusers_var.sample.run_sample`: loading from the folder, the generators, PNG
   writing, everything; once with ``--rng image`` (the default: a CUDA generator per image, so VAR samples outside
   its CUDA graphs) and once with ``--rng batch`` (one CUDA generator per batch, sampling inside the graphs, as (1)).
   A per-batch hook records the time, GPU memory (allocated, and the peak of that batch) and the host's resident
   memory.

It prints the steady images/s of ``sample`` (batches after ``--warmup``), its ratio to (1), the wall time this
implies for 50,000 images (warm-up included), and memory after the warm-up against the end of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

FULL_RUN = 50_000


def resident_gib() -> float:
    """This process's resident host memory (Linux /proc; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def build(name: str, folder: Path, device: str) -> None:
    """The random-weight pipeline of ``bench_pipelines.py``, saved as a pipeline folder."""
    import torch
    from bench_pipelines import build_var

    pipe = build_var(name, device)
    pipe.save_pretrained(folder)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker(args) -> int:
    """One ``sample`` run in this process; writes its per-batch records to ``args.json``."""
    import torch

    from diffusers_var.sample import add_sample_parser, run_sample

    cuda = torch.cuda.is_available() and not args.smoke
    parser = argparse.ArgumentParser()
    add_sample_parser(parser.add_subparsers())
    batch = args.batch_size
    sample_args = parser.parse_args(
        [
            "sample",
            "--model",
            args.model_dir,
            "--out",
            args.out_dir,
            "--fast",
            "--batch-size",
            str(batch),
            "--class-labels",
            ",".join(str(i) for i in range(batch)),
            "--per-class",
            str(args.batches),
            "--seed",
            "0",
            "--no-progress",
            "--device",
            "cuda" if cuda else "cpu",
            "--rng",
            args.rng,
        ]
    )
    records = []

    def on_batch(info: dict) -> None:
        record = {**info, "rss_gib": resident_gib()}
        if cuda:
            record["allocated_gib"] = torch.cuda.memory_allocated() / 2**30
            record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        records.append(record)
        print(
            f"  batch {len(records):4d}: {info['images']:6d} images, {info['seconds']:8.2f} s, "
            f"peak {record.get('peak_gib', float('nan')):6.2f} GiB, rss {record['rss_gib']:6.2f} GiB",
            flush=True,
        )

    started = time.perf_counter()
    summary = run_sample(sample_args, on_batch=on_batch)
    summary["wall_seconds"] = time.perf_counter() - started  # loading, compiling and writing included
    Path(args.json).write_text(json.dumps({"summary": summary, "records": records}))
    return 0


def reference_figure(name: str, batch: int, smoke: bool, scratch: Path) -> float | None:
    """``bench_pipelines.py``'s images/s for the same model and batch (``fast-compile-all``; ``fast`` on the CPU)."""
    out = scratch / f"reference-{name}.json"
    command = [
        sys.executable,
        str(HERE / "bench_pipelines.py"),
        "--models",
        name,
        "--batch-sizes",
        str(batch),
        "--json",
        str(out),
    ]
    command += (
        ["--modes", "fast", "--device", "cpu", "--repeats", "1"]
        if smoke
        else ["--modes", "fast-compile-all", "--repeats", "3"]
    )
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        print(f"  bench_pipelines.py failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return None
    return json.loads(out.read_text())[0]["images_per_s"]


def summarize(name: str, rng: str, batch: int, warmup: int, result: dict, reference: float | None) -> dict:
    records = result["records"]
    warmup = min(warmup, len(records) - 1)
    first, last = records[warmup], records[-1]
    steady = (last["images"] - first["images"]) / max(1e-9, last["seconds"] - first["seconds"])
    implied = first["seconds"] + (FULL_RUN - first["images"]) / steady
    row = {
        "model": name,
        "rng": rng,
        "batch": batch,
        "images": last["images"],
        "images_per_s": steady,
        "reference_images_per_s": reference,
        "ratio_to_reference": steady / reference if reference else None,
        "warmup_seconds": first["seconds"],
        "implied_50k_seconds": implied,
        "rss_gib_after_warmup": first["rss_gib"],
        "rss_gib_end": last["rss_gib"],
        "writer_wait_seconds": last["writer_wait_seconds"],
        "wall_seconds": result["summary"]["wall_seconds"],
    }
    if "peak_gib" in first:
        steady_records = records[warmup:]
        row.update(
            peak_gib_after_warmup=first["peak_gib"],
            peak_gib_end=last["peak_gib"],
            peak_gib_max=max(r["peak_gib"] for r in steady_records),
            allocated_gib_after_warmup=first["allocated_gib"],
            allocated_gib_end=last["allocated_gib"],
        )
    row["memory_series"] = [
        {k: r[k] for k in ("images", "seconds", "rss_gib", "peak_gib", "allocated_gib") if k in r} for r in records
    ]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated VAR models of bench_pipelines.py (default var-d16,var-d30; --smoke: var-tiny)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (--smoke: 2)")
    parser.add_argument("--batches", type=int, default=None, help="batches per run (default 40; --smoke: 4)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="batches left out of the rate (default 3; --smoke: 1)"
    )
    parser.add_argument(
        "--rng",
        default="image,batch",
        help="sample's --rng modes to time, each in its own process (default image,batch: a generator "
        "per image, the default, and one per batch, which keeps VAR's sampling in the CUDA graphs)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip bench_pipelines.py's figure")
    parser.add_argument("--smoke", action="store_true", help="tiny VAR on the CPU: checks the script end to end")
    parser.add_argument("--json", default=None, help="also write the rows (with the memory series) here")
    parser.add_argument("--keep", default=None, help="keep the model folders and samples in this folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_size = args.batch_size or (2 if args.smoke else 64)
    args.batches = args.batches or (4 if args.smoke else 40)
    if args.worker:
        return worker(args)
    bad = [mode for mode in args.rng.split(",") if mode not in ("image", "batch")]
    if bad:
        parser.error(f"--rng takes image and / or batch, got {', '.join(bad)}")
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    if args.batches <= warmup:
        parser.error(f"--batches ({args.batches}) must exceed --warmup ({warmup})")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or --smoke for a CPU check of the script)")
        return 1
    names = (args.models or ("var-tiny" if args.smoke else "var-d16,var-d30")).split(",")
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_sample_"))
    scratch.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    print(
        f"{'GPU: ' + torch.cuda.get_device_name() if device == 'cuda' else 'CPU (--smoke)'}, torch {torch.__version__}"
    )
    rows = []
    try:
        for name in names:
            folder = scratch / f"{name}-model"
            build(name, folder, device)
            reference = None if args.no_reference else reference_figure(name, args.batch_size, args.smoke, scratch)
            for rng in args.rng.split(","):
                out, result_file = scratch / f"{name}-{rng}-samples", scratch / f"{name}-{rng}.json"
                shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--model-dir",
                    str(folder),
                    "--out-dir",
                    str(out),
                    "--batch-size",
                    str(args.batch_size),
                    "--batches",
                    str(args.batches),
                    "--json",
                    str(result_file),
                    "--rng",
                    rng,
                ] + (["--smoke"] if args.smoke else [])
                print(
                    f"{name}: sample --fast --rng {rng}, batch {args.batch_size}, {args.batches} batches", flush=True
                )
                if subprocess.run(command, check=False).returncode != 0:
                    print(f"{name}: the sample run failed")
                    return 1
                row = summarize(name, rng, args.batch_size, warmup, json.loads(result_file.read_text()), reference)
                rows.append(row)
                ratio = f"{row['ratio_to_reference']:.3f}" if row["ratio_to_reference"] else "-"
                peak = (
                    f"{row['peak_gib_after_warmup']:.2f} -> {row['peak_gib_end']:.2f} GiB (max "
                    f"{row['peak_gib_max']:.2f})"
                    if "peak_gib_end" in row
                    else "-"
                )
                reference_text = f"{reference:.1f}" if reference else "-"
                print(
                    f"{name} --rng {rng}: {row['images_per_s']:.1f} images/s (bench_pipelines: {reference_text}; "
                    f"ratio {ratio}); warm-up {row['warmup_seconds']:.1f} s; 50k images: "
                    f"{row['implied_50k_seconds'] / 60:.1f} min; GPU peak per batch {peak}; host RSS "
                    f"{row['rss_gib_after_warmup']:.2f} -> {row['rss_gib_end']:.2f} GiB; writer wait "
                    f"{row['writer_wait_seconds']:.2f} s",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
