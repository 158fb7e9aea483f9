"""What ``compile_blocks``' shapes cost in dynamo tracing, the part of a start-up that torch.compile's caches on disk
do not save (each new process traces the Python code again; only inductor's compiled graphs are loaded):

    python benchmarks/bench_trace.py --models var-d16 --shapes dynamic,static-tokens,static --batch-sizes 1,2

Each shapes value runs in a fresh process (the piece code is shared by every block, and dynamo's caches live as long
as the process). The pieces are compiled with the ``eager`` backend, so the figures are dynamo's tracing alone, no
inductor: for every batch size, the first generation's time minus the second's, and the graphs dynamo made. Random
weights of the real configuration, float32 (on the CPU the fast path only casts); ``OMP_NUM_THREADS=1`` on a small
machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers_var.cli_support import COMPILE_BLOCKS_SHAPES as SHAPES  # noqa: E402


def measure(model: str, shapes: str, batch_sizes: list[int], device: str) -> list[dict]:
    """In this process: the tracing time and graph count of each batch size's first generation."""
    from bench_pipelines import build_var
    from torch._dynamo.utils import counters

    torch.compile = functools.partial(torch.compile, backend="eager")  # dynamo alone
    pipe = build_var(model, torch.device(device))
    pipe.set_progress_bar_config(disable=True)
    # no CUDA graphs: their capture would count as tracing
    compile_blocks = True if shapes == "dynamic" else shapes
    pipe.enable_fast_inference(dtype=torch.float32, cuda_graphs=False, compile_blocks=compile_blocks)
    num_classes = pipe.transformer.config.num_classes

    def seconds(batch: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            generator = torch.Generator(device).manual_seed(0)
            pipe(class_labels=[i % num_classes for i in range(batch)], output_type="latent", generator=generator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    rows = []
    for batch in batch_sizes:
        graphs = counters["stats"]["unique_graphs"]
        first, again = seconds(batch), seconds(batch)
        rows.append(
            dict(
                model=model,
                shapes=shapes,
                batch=batch,
                first_s=first,
                again_s=again,
                tracing_s=first - again,
                new_graphs=counters["stats"]["unique_graphs"] - graphs,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="var-d16", help="comma-separated bench_pipelines.py VAR models")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--batch-sizes", default="1,2", help="comma-separated, one after another in each process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model:shapes, run in this process
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.one:
        model, shapes = args.one.split(":")
        print(json.dumps(measure(model, shapes, batch_sizes, args.device)))
        return
    for shapes in args.shapes.split(","):
        if shapes not in SHAPES:
            parser.error(f"--shapes: {shapes!r} is not one of {', '.join(SHAPES)}")
    rows = []
    header = ("model", "shapes", "batch", "first s", "again s", "tracing s", "graphs")
    print("{:8s} {:13s} {:>5s} {:>8s} {:>8s} {:>9s} {:>6s}".format(*header))
    for model in args.models.split(","):
        for shapes in args.shapes.split(","):
            command = [sys.executable, __file__, "--one", f"{model}:{shapes}", "--batch-sizes", args.batch_sizes]
            result = subprocess.run(command + ["--device", args.device], capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"{model} {shapes} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
            for row in json.loads(result.stdout.strip().splitlines()[-1]):
                rows.append(row)
                print(
                    f"{model:8s} {shapes:13s} {row['batch']:5d} {row['first_s']:8.1f} {row['again_s']:8.1f} "
                    f"{row['tracing_s']:9.1f} {row['new_graphs']:6d}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
