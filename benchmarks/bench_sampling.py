#!/usr/bin/env python
"""Top-k / top-p filtering of VAR's logits on the GPU: the original's rule (top-p over a vocabulary-wide sort) and the
k-wide variant that ``enable_fast_inference`` uses on CUDA (top-p over the k sorted top-k values).

    python benchmarks/bench_sampling.py                 # rows of VAR batch 1 and 64 (guided halves), vocabulary 4096

Rows: every scale's token count times the batch (VAR 256 px: 680 tokens per image over 10 scales); the table gives
ms for the largest scale (16x16) and for all ten scales of one generation, median of 20 after warm-up, and
checks that the k-wide variant keeps the same tokens as the original rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_decoder import time_ms  # noqa: E402  (CUDA-event median)

from diffusers_var.pipelines.sampling import filter_top_k_top_p_  # noqa: E402

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VARIANTS = {
    "vocabulary-wide sort (original)": lambda x, k, p: filter_top_k_top_p_(x, k, p),
    "k-wide (fast path)": lambda x, k, p: filter_top_k_top_p_(x, k, p, fast=True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU")
        return 1
    print(
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; "
        f"top-k {args.top_k}, top-p {args.top_p}, vocabulary {args.vocab}"
    )
    print("| variant | batch | last scale, ms | all scales, ms |\n|---|---|---|---|")
    g = torch.Generator("cuda").manual_seed(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        scales = [3 * torch.randn(batch, pn * pn, args.vocab, device="cuda", generator=g) for pn in PATCH_NUMS_256]
        reference = [filter_top_k_top_p_(x.clone(), args.top_k, args.top_p) for x in scales]
        k_wide = [filter_top_k_top_p_(x.clone(), args.top_k, args.top_p, fast=True) for x in scales]
        same = sum(int(torch.equal(a.isfinite(), b.isfinite())) for a, b in zip(reference, k_wide))
        for name, fn in VARIANTS.items():
            work = [x.clone() for x in scales]
            for _ in range(3):  # warm-up
                [fn(x, args.top_k, args.top_p) for x in work]
            torch.cuda.synchronize()
            last = time_ms(lambda: fn(work[-1], args.top_k, args.top_p), repeats=20)
            total = time_ms(lambda: [fn(x, args.top_k, args.top_p) for x in work], repeats=20)
            print(f"| {name} | {batch} | {last:.3f} | {total:.3f} |")
        print(
            f"(batch {batch}: the k-wide variant keeps exactly "
            f"the original's tokens at {same} of {len(scales)} scales)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
