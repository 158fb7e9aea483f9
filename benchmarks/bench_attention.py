#!/usr/bin/env python
"""The self-attention of one generation, kernel by kernel: PyTorch's scaled_dot_product_attention kernels (flash,
memory-efficient, cuDNN, and PyTorch's default choice) on the shapes the fast path gives them (issue 20).

    python benchmarks/bench_attention.py --models var-d16,var-d30,star-d30,infinity-2b --batch-sizes 1,4,64

For every scale of a model's schedule the queries are that scale's tokens and the keys / values every token so far
(the KV cache), guidance rows included (2 x batch), in the layout the blocks hand over ((B, L, H, D) tensors viewed as
(B, H, L, D)), bf16. Each kernel's calls are captured in a CUDA graph (``--calls`` calls of one scale), as the fast
path replays its attention, and the replays are timed with CUDA events: GPU time, no host launch cost. The figure is
the sum over a generation (one call per block and scale) of the median of ``--repeats`` replays. A kernel that refuses
a scale (cuDNN's checks turn down a single key, the first scale of every model) is listed with the scales it
refused, and the totals of every kernel are also given over the scales that all kernels ran. Also printed: PyTorch's
kernel order after a first CUDA attention call (PyTorch may reorder it then, e.g. cuDNN first on Hopper with a recent
cuDNN) and the kernel its default choice picks at each model's last scale.
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


def kernel_context(kernel: str):
    return sdpa_kernel([KERNELS[kernel]]) if KERNELS[kernel] is not None else contextlib.nullcontext()


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


def graph_time(kernel: str, q, k, v, calls: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Milliseconds per call (median over ``repeats`` replays of a graph of ``calls`` calls) and the graph's output;
    raises RuntimeError when the kernel refuses the shape or cannot be captured."""
    with kernel_context(kernel):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            attention(q, k, v)  # refusals raise here, before any capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                out = attention(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times), out


def default_choice(q, k, v) -> str:
    """The kernel PyTorch's default picks for these inputs (after its first-call set-up)."""
    choice = torch._fused_sdp_choice(q, k, v, scale=q.shape[-1] ** -0.5)
    return {int(b): name for name, b in KERNELS.items() if b is not None}.get(int(choice), f"other ({int(choice)})")


def bench_model(name: str, batch: int, calls: int, repeats: int) -> dict:
    depth, heads, head_dim, sides = MODELS[name]
    rows, total_tokens = 2 * batch, sum(s * s for s in sides)
    g = torch.Generator("cuda").manual_seed(0)

    def blhd(length):  # the blocks' (B, L, H, D) layout, viewed as (B, H, L, D)
        shape = (rows, length, heads, head_dim)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)

    k_all, v_all = blhd(total_tokens), blhd(total_tokens)
    ms = {kernel: {} for kernel in KERNELS}  # kernel -> side -> ms per generation at that scale (depth calls)
    largest_difference = {kernel: 0.0 for kernel in KERNELS}
    refused = {kernel: [] for kernel in KERNELS}
    seen, last_choice = 0, None
    for side in sides:
        seen += side * side
        q, k, v = blhd(side * side), k_all[:, :, :seen], v_all[:, :, :seen]
        reference = attention(q, k, v).float()  # PyTorch's default choice, eager
        for kernel in KERNELS:
            try:
                per_call, out = graph_time(kernel, q, k, v, calls, repeats)
            except RuntimeError as err:
                refused[kernel].append(f"{side}x{side}: {str(err).splitlines()[0][:120]}")
                continue
            ms[kernel][side] = depth * per_call
            largest_difference[kernel] = max(largest_difference[kernel], (out.float() - reference).abs().max().item())
        if side == sides[-1]:
            last_choice = default_choice(q, k, v)
    common = [s for s in sides if all(s in ms[kernel] for kernel in KERNELS)]
    result = {"model": name, "batch": batch, "default_choice_at_last_scale": last_choice, "common_scales": common}
    for kernel in KERNELS:
        result[kernel] = {
            "ms_per_generation": round(sum(ms[kernel].values()), 4),
            "ms_over_common_scales": round(sum(ms[kernel][s] for s in common), 4),
            "per_scale_ms": {str(s): round(t, 4) for s, t in ms[kernel].items()},
            "largest_difference_from_default": largest_difference[kernel],
            "refused": refused[kernel],
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-sizes", default="1", help="images per generation (2x rows with guidance)")
    parser.add_argument("--calls", type=int, default=10, help="attention calls per captured graph")
    parser.add_argument("--repeats", type=int, default=10, help="timed replays per kernel and scale")
    parser.add_argument("--json", help="write the results here (after every row)")
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    if not names or any(m not in MODELS for m in names):
        parser.error(f"--models takes names from {', '.join(MODELS)}; got {args.models!r}")
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batch-sizes takes positive whole numbers, e.g. 1,4; got {args.batch_sizes!r}")
    if args.calls < 1 or args.repeats < 1:
        parser.error(f"--calls and --repeats must be at least 1, got {args.calls} and {args.repeats}")
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU")
        return 1
    probe = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    print(f"SDPA kernel order before any CUDA attention call: {torch._C._get_sdp_priority_order()}")
    attention(probe, probe, probe)
    print(
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
        f"SDPA kernel order after the first call: {torch._C._get_sdp_priority_order()} "
        f"({', '.join(f'{b.name}={int(b)}' for b in KERNELS.values() if b is not None)})"
    )
    print(
        "| model | batch | "
        + " | ".join(f"{k} ms / generation (common scales)" for k in KERNELS)
        + " | default picks |"
    )
    print("|---|---|" + "---|" * (len(KERNELS) + 1))
    results = []
    for name in names:
        for batch in batches:
            row = bench_model(name, batch, args.calls, args.repeats)
            results.append(row)
            cells = []
            for kernel in KERNELS:
                r = row[kernel]
                cell = f"{r['ms_per_generation']:.3f} ({r['ms_over_common_scales']:.3f})"
                if r["refused"]:
                    cell += f", refused {len(r['refused'])} scales: {r['refused'][0]}"
                cells.append(cell)
            print(
                f"| {name} | {batch} | " + " | ".join(cells) + f" | {row['default_choice_at_last_scale']} |",
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
