#!/usr/bin/env python
"""Where the VAR image decoder's time goes: the released VQ-VAE decoder (256 px) in several layouts and
compile modes, batch 1 and 64, random weights. Used to pick the decoder path of ``enable_fast_inference``.

    python benchmarks/bench_decoder.py --batch-sizes 1,64

Variants: dtype (bf16 / fp16) x memory format (NCHW / channels-last) x eager / ``torch.compile`` (default and
``max-autotune-no-cudagraphs``); ``-padded``: the RGB output conv with zero-padded output channels, as
``enable_fast_inference(compile_decoder=True)`` runs it; ``-subpixel``: the upsamplers in sub-pixel form
(``fast_inference.subpixel_upsample_``). cuDNN autotuning (``cudnn.benchmark``) is on unless
``--no-cudnn-benchmark`` (the pipelines do not turn it on). Prints ms per batch (median of 10 after warm-up) and
peak memory. ``--device cpu`` runs the float32 variants on the CPU (wall clock, no peak memory).

    OMP_NUM_THREADS=1 python benchmarks/bench_decoder.py --device cpu --batch-sizes 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers_var import MultiScaleVQModel  # noqa: E402
from diffusers_var.pipelines.fast_inference import pad_narrow_convs_, subpixel_upsample_  # noqa: E402

VARIANTS = {  # name: (dtype, channels_last, compile mode or None)
    "bf16-nchw-eager": (torch.bfloat16, False, None),
    "bf16-cl-eager": (torch.bfloat16, True, None),
    "bf16-nchw-compile": (torch.bfloat16, False, "default"),
    "bf16-cl-compile": (torch.bfloat16, True, "default"),
    "bf16-cl-compile-padded": (torch.bfloat16, True, "default"),
    "bf16-cl-compile-padded-subpixel": (torch.bfloat16, True, "default"),
    "bf16-nchw-eager-subpixel": (torch.bfloat16, False, None),
    "bf16-cl-autotune": (torch.bfloat16, True, "max-autotune-no-cudagraphs"),
    "fp16-cl-compile": (torch.float16, True, "default"),
}
CPU_VARIANTS = {
    "fp32-nchw-eager": (torch.float32, False, None),
    "fp32-nchw-eager-subpixel": (torch.float32, False, None),
}


def time_ms(fn, repeats: int = 10, device: str = "cuda") -> float:
    times = []
    for _ in range(repeats):
        if device == "cpu":
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--variants", default=None, help="default: every variant of the device")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-cudnn-benchmark", action="store_true")
    args = parser.parse_args()
    device = args.device
    variants = VARIANTS if device == "cuda" else CPU_VARIANTS
    names = args.variants.split(",") if args.variants else list(variants)
    unknown = [name for name in names if name not in variants]
    if unknown:
        print(f"unknown --variants {unknown} for {device}: choose from {', '.join(variants)}", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu)", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if device == "cuda":
        print(f"cudnn.benchmark = {torch.backends.cudnn.benchmark}")
    print("| variant | batch | ms / batch | ms / image | peak GiB |\n|---|---|---|---|---|", flush=True)
    for name in names:
        dtype, channels_last, mode = variants[name]
        torch.manual_seed(0)
        vq = MultiScaleVQModel().eval()
        decoder = torch.nn.Sequential(vq.post_quant_conv, vq.decoder).to(device, dtype)
        if channels_last:
            decoder = decoder.to(memory_format=torch.channels_last)
        if "-padded" in name:
            pad_narrow_convs_(decoder)
        if name.endswith("-subpixel"):
            subpixel_upsample_(decoder)
        run = torch.compile(decoder, mode=mode, dynamic=False) if mode else decoder
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            f_hat = torch.randn(batch, vq.config.z_channels, 16, 16, device=device, dtype=dtype)
            if channels_last:
                f_hat = f_hat.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                for _ in range(3 if device == "cuda" else 1):
                    run(f_hat)
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                ms = time_ms(lambda: run(f_hat), args.repeats, device)
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device == "cuda" else "-"
            print(f"| {name} | {batch} | {ms:.2f} | {ms / batch:.3f} | {peak} |", flush=True)
        run = decoder = None  # free this variant's memory before the next one
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
