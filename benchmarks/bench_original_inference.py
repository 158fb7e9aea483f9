#!/usr/bin/env python
"""Inference speed of the original VAR code (issue 20's "original" column), to run beside ``bench_pipelines.py`` in
the same session on the same machine.

    git clone https://github.com/FoundationVision/VAR .originals/VAR      # outside the package (git-ignored)
    python benchmarks/bench_original_inference.py --original .originals/VAR --models var-d16,var-d30 --batch-sizes 1,64
    python benchmarks/bench_pipelines.py --models var-d16 --batch-sizes 1,64 --modes fast-compile-all   # ours
    python benchmarks/bench_original_inference.py --original .originals/VAR --smoke      # CPU check of the script

The original repository's ``build_vae_var`` builds the released configurations (VQ-VAE ch 160, 4,096 codes; VAR-dN:
width 64 N, N heads, 1,000 classes) with random weights (its own initialisation, seeded), and
``VAR.autoregressive_infer_cfg`` generates, set up as its ``demo_sample.ipynb`` does: TF32 on, cuDNN deterministic
without benchmarking (this limits cuDNN's convolution algorithms for its VQ-VAE decode; ours leaves both flags at
PyTorch's defaults), ``torch.inference_mode`` and fp16 autocast. The sampling settings are ``bench_pipelines.py``'s
for VAR (cfg 1.5, top-k 900, top-p 0.96, labels 0 .. B-1, seed 0). Without flash-attn or xFormers installed, the
original's attention is PyTorch's ``scaled_dot_product_attention``. For every model and batch size: two warm-up
generations, then the median (and min-max) of ``--repeats`` timed ones, images/s, and the allocated peak GPU memory of
the timed ones. One model per process is not needed here (nothing is compiled); the models run one after another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_training_original import build_original_models

SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)  # bench_pipelines.py's VAR_SAMPLING
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def time_original(var, batch: int, device: str, repeats: int, warmups: int = 2) -> dict:
    import torch

    labels = torch.arange(batch, device=device)
    cuda = device == "cuda"

    def generate():
        with torch.inference_mode(), torch.autocast(device, enabled=cuda, dtype=torch.float16, cache_enabled=True):
            return var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, **SAMPLING)

    for _ in range(warmups):
        generate()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        images = generate()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if not torch.isfinite(images).all():
        raise RuntimeError("the original's images are not finite")
    median = statistics.median(times)
    return {
        "batch": batch,
        "ms_per_image": 1e3 * median / batch,
        "ms_per_batch": [round(1e3 * t, 2) for t in times],
        "images_per_s": batch / median,
        "images_per_s_range": [batch / max(times), batch / min(times)],
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="a checkout of github.com/FoundationVision/VAR")
    parser.add_argument("--models", default="var-d16,var-d30", help="comma-separated var-dN (N: 16, 20, 24, 30)")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script: depth 2, 3 scales, batch 1")
    args = parser.parse_args()
    original = Path(args.original)
    if not (original / "models" / "var.py").is_file():
        parser.error(f"--original {original} is not a checkout of FoundationVision/VAR (no models/var.py)")
    depths = []
    for name in (m for m in args.models.split(",") if m):
        depth = name.removeprefix("var-d")
        if not name.startswith("var-d") or not depth.isdigit() or int(depth) < 1:
            parser.error(f"--models takes var-dN names (e.g. var-d16,var-d30), got {name!r}")
        depths.append(int(depth))
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batch-sizes takes positive whole numbers, e.g. 1,64; got {args.batch_sizes!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        parser.error("this benchmark needs a CUDA GPU (or --smoke for a check of the script)")
    patch_nums, repeats = (PATCH_NUMS[:3], 1) if args.smoke else (PATCH_NUMS, args.repeats)
    if args.smoke:
        depths, batches = [2], [1]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # demo_sample.ipynb
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")

    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    print("| model | batch | ms per image | images/s (min-max) | peak allocated / reserved GiB |")
    print("|---|---|---|---|---|")
    for depth in depths:
        vae, var = build_original_models(original, device, 0, depth=depth, patch_nums=patch_nums, num_classes=1000)
        vae.eval(), var.eval()
        var.rng = torch.Generator(device)  # the original makes it on dist.get_device(): CUDA whenever there is one
        for parameter in (*vae.parameters(), *var.parameters()):
            parameter.requires_grad_(False)
        for batch in batches:
            row = time_original(var, batch, device, repeats)
            results[f"var-d{depth}/{batch}"] = row
            low, high = row["images_per_s_range"]
            memory = f"{row['peak_allocated_gib']:.2f} / {row['peak_reserved_gib']:.2f}" if device == "cuda" else "-"
            print(
                f"| var-d{depth} | {batch} | {row['ms_per_image']:.2f} | {row['images_per_s']:.1f} "
                f"({low:.1f}-{high:.1f}) | {memory} |",
                flush=True,
            )
        del vae, var
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
