#!/usr/bin/env python
"""Where the VAR image decoder's time goes: the released VQ-VAE decoder (256 px) in several layouts and
compile modes, batch 1 and 64, random weights. Used to pick the decoder path of ``enable_fast_inference``.

    python benchmarks/bench_decoder.py --batch-sizes 1,64

Variants: dtype (bf16 / fp16) x memory format (NCHW / channels-last) x eager / ``torch.compile`` (default and
``max-autotune-no-cudagraphs``); ``-padded``: the RGB output conv with zero-padded output channels, as
``enable_fast_inference(compile_decoder=True)`` runs it. cuDNN autotuning (``cudnn.benchmark``) is on unless
``--no-cudnn-benchmark`` (the pipelines do not turn it on). Prints ms per batch (median of 10 after warm-up) and
peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers_var import MultiScaleVQModel  # noqa: E402
from diffusers_var.pipelines.fast_inference import pad_narrow_convs_  # noqa: E402

VARIANTS = {  # name: (dtype, channels_last, compile mode or None)
    "bf16-nchw-eager": (torch.bfloat16, False, None),
    "bf16-cl-eager": (torch.bfloat16, True, None),
    "bf16-nchw-compile": (torch.bfloat16, False, "default"),
    "bf16-cl-compile": (torch.bfloat16, True, "default"),
    "bf16-cl-compile-padded": (torch.bfloat16, True, "default"),
    "bf16-cl-autotune": (torch.bfloat16, True, "max-autotune-no-cudagraphs"),
    "fp16-cl-compile": (torch.float16, True, "default"),
}


def time_ms(fn, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
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
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-cudnn-benchmark", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    print(f"cudnn.benchmark = {torch.backends.cudnn.benchmark}")
    print("| variant | batch | ms / batch | ms / image | peak GiB |\n|---|---|---|---|---|", flush=True)
    for name in args.variants.split(","):
        dtype, channels_last, mode = VARIANTS[name]
        torch.manual_seed(0)
        vq = MultiScaleVQModel().eval()
        decoder = torch.nn.Sequential(vq.post_quant_conv, vq.decoder).to("cuda", dtype)
        if channels_last:
            decoder = decoder.to(memory_format=torch.channels_last)
        if name.endswith("-padded"):
            pad_narrow_convs_(decoder)
        run = torch.compile(decoder, mode=mode, dynamic=False) if mode else decoder
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            f_hat = torch.randn(batch, vq.config.z_channels, 16, 16, device="cuda", dtype=dtype)
            if channels_last:
                f_hat = f_hat.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                for _ in range(3):
                    run(f_hat)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                ms = time_ms(lambda: run(f_hat))
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"| {name} | {batch} | {ms:.2f} | {ms / batch:.3f} | {peak:.2f} |", flush=True)
        run = decoder = None  # free this variant's memory before the next one
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
