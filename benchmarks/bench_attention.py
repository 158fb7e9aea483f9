#!/usr/bin/env python
"""The self-attention of one generation, kernel by kernel: PyTorch's scaled_dot_product_attention kernels (flash,
memory-efficient, cuDNN, and PyTorch's default choice) on the shapes the fast path gives them (issue 20).

    python benchmarks/bench_attention.py --models var-d16,var-d30,star-d30,infinity-2b --batch-sizes 1,4,64

For every scale of a model's schedule the queries are that scale's tokens and the keys / values every token so far
(the KV cache), guidance rows included (2 x batch), in the layout the blocks hand over ((B, L, H, D) tensors viewed as
(B, H, L, D)), bf16. One call per block and scale; the figure is the sum over a generation (depth x scales) of the
median time of ``--repeats`` CUDA-event timed calls, per kernel, with the largest difference from the flash kernel's
output. Each kernel is also captured in a CUDA graph and replayed once (the fast path replays its attention inside
graphs), and the result compared with the eager call. A kernel that refuses a shape is reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MODELS = {  # name: (depth, heads, head dim, side of each scale's square token map)
    "var-d16": (16, 16, 64, VAR_256),
    "var-d30": (30, 30, 64, VAR_256),
    "star-d30": (30, 30, 64, (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)),
    "infinity-2b": (32, 16, 128, (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)),
}
KERNELS = {  # "default": PyTorch's own choice (its priority order and the shape's checks)
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def attention(kernel: str, q, k, v):
    with sdpa_kernel([KERNELS[kernel]]) if KERNELS[kernel] is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


def time_call(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls, each between two CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_replay_error(kernel: str, q, k, v) -> float:
    """Capture the call in a CUDA graph, replay it and return the largest difference from the eager call."""
    eager = attention(kernel, q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention(kernel, q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(kernel, q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    return (out.float() - eager.float()).abs().max().item()


def bench_model(name: str, batch: int, repeats: int) -> dict:
    depth, heads, head_dim, sides = MODELS[name]
    rows, total_tokens = 2 * batch, sum(s * s for s in sides)
    g = torch.Generator("cuda").manual_seed(0)

    def blhd(length):  # the blocks' (B, L, H, D) layout, viewed as (B, H, L, D)
        return torch.randn(rows, length, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(
            1, 2
        )

    k_all, v_all = blhd(total_tokens), blhd(total_tokens)
    result = {"model": name, "batch": batch}
    seen = 0
    per_kernel = {kernel: 0.0 for kernel in KERNELS}
    errors = {kernel: 0.0 for kernel in KERNELS}
    graph_errors = {kernel: 0.0 for kernel in KERNELS}
    refused = {}
    for side in sides:
        length = side * side
        seen += length
        q, k, v = blhd(length), k_all[:, :, :seen], v_all[:, :, :seen]
        reference = attention("flash", q, k, v).float()
        for kernel in KERNELS:
            if kernel in refused:
                continue
            try:
                out = attention(kernel, q, k, v)
            except RuntimeError as err:
                refused[kernel] = f"scale {side}x{side}: {str(err).splitlines()[0][:160]}"
                continue
            errors[kernel] = max(errors[kernel], (out.float() - reference).abs().max().item())
            per_kernel[kernel] += depth * time_call(lambda kernel=kernel: attention(kernel, q, k, v), repeats)
            if side == sides[-1]:
                graph_errors[kernel] = graph_replay_error(kernel, q, k, v)
    for kernel in KERNELS:
        if kernel in refused:
            result[kernel] = {"refused": refused[kernel]}
        else:
            result[kernel] = {
                "ms_per_generation": round(per_kernel[kernel], 3),
                "largest_difference_from_flash": errors[kernel],
                "graph_replay_difference": graph_errors[kernel],
            }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-sizes", default="1", help="images per generation (2x rows with guidance)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        parser.error(f"--models takes names from {', '.join(MODELS)}; got {args.models!r}")
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batch-sizes takes positive whole numbers, e.g. 1,4; got {args.batch_sizes!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU")
        return 1
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| model | batch | " + " | ".join(f"{k} ms / generation" for k in KERNELS) + " | cuDNN vs flash |")
    print("|---|---|" + "---|" * (len(KERNELS) + 1))
    results = []
    for name in names:
        for batch in batches:
            row = bench_model(name, batch, args.repeats)
            results.append(row)
            cells = [
                f"{row[k]['ms_per_generation']:.2f} (diff {row[k]['largest_difference_from_flash']:.1e}, "
                f"graph {row[k]['graph_replay_difference']:.1e})"
                if "refused" not in row[k]
                else f"refused: {row[k]['refused']}"
                for k in KERNELS
            ]
            ratio = (
                f"{row['cudnn']['ms_per_generation'] / row['flash']['ms_per_generation']:.2f}x"
                if "refused" not in row["cudnn"] and "refused" not in row["flash"]
                else "-"
            )
            print(f"| {name} | {batch} | " + " | ".join(cells) + f" | {ratio} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
