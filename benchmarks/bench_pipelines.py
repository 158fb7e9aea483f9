#!/usr/bin/env python
"""Speed and memory of the pipelines on real model configurations with random weights (no download).

    python benchmarks/bench_pipelines.py --models var-d16,var-d30 --batch-sizes 1,64

For every model, batch size and mode it warms up, times ``--repeats`` full generations (sampling and VAE
decode included, cfg 1.5, top-k 900, top-p 0.96 as in the original's FID setting) and prints the median:
ms per image, images/s, peak GPU memory and effective TFLOP/s (analytic transformer FLOPs + the measured
decoder FLOPs). Modes:
  eager-fp16   our eager code under fp16 autocast (the original's setting; float32 weights)
  fast         ``pipe.enable_fast_inference()``: bf16 blocks and decoder, CUDA graphs per scale
  fast-compile the same with ``compile_decoder=True`` (torch.compile of the image decoder)
It also checks that greedy tokens of the fast path agree with the eager float32 path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers_var import MultiScaleVQModel, VARPipeline, VARTransformer2DModel  # noqa: E402

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MODELS = {  # name: (depth, patch_nums); width 64 * depth and depth heads, as every VAR release
    "var-d16": (16, PATCH_NUMS_256),
    "var-d20": (20, PATCH_NUMS_256),
    "var-d24": (24, PATCH_NUMS_256),
    "var-d30": (30, PATCH_NUMS_256),
}


def build_var(name: str, device) -> VARPipeline:
    depth, patch_nums = MODELS[name]
    torch.manual_seed(0)
    vqvae = MultiScaleVQModel(patch_nums=patch_nums)  # the released VAE configuration
    transformer = VARTransformer2DModel(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums)
    transformer.init_weights()
    pipe = VARPipeline(transformer=transformer.eval(), vqvae=vqvae.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def transformer_flops(transformer: VARTransformer2DModel, rows: int) -> float:
    """Matmul FLOPs of one generation (all scales, ``rows`` = 2 x batch for guidance)."""
    cfg = transformer.config
    C, V = cfg.embed_dim, cfg.vocab_size
    hidden = round(C * cfg.mlp_ratio)
    flops, seen = 0.0, 0
    for begin, end in transformer.begin_ends:
        tokens = end - begin
        seen = end
        per_token = cfg.depth * (2 * (4 * C * C + 2 * C * hidden) + 4 * C * seen) + 2 * C * V + 2 * cfg.latent_channels * C
        flops += rows * tokens * per_token
    return flops


def decoder_flops(pipe: VARPipeline, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    side = pipe.vqvae.latent_size
    f_hat = torch.zeros(1, pipe.vqvae.config.z_channels, side, side, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        pipe.vqvae.decode_latent(f_hat)
    return float(counter.get_total_flops())


def generate(pipe, batch, device, seed=0, **kw):
    return pipe(class_labels=list(range(batch)), guidance_scale=1.5, top_k=900, top_p=0.96,
                generator=torch.Generator(device).manual_seed(seed), output_type="pt", **kw).images


def time_mode(pipe, batch, device, repeats, autocast_dtype=None):
    ctx = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        for _ in range(2):
            generate(pipe, batch, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(pipe, batch, device)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def greedy_tokens(pipe, batch, device):
    seen = []

    def record(p, si, pn, tensors):
        seen.append(tensors["indices"].clone())
        return {}

    pipe(class_labels=list(range(batch)), guidance_scale=4.0, top_k=1, top_p=0.0, generator=torch.Generator(device).manual_seed(0),
         output_type="latent", callback_on_step_end=record, callback_on_step_end_tensor_inputs=["indices"])
    return torch.cat(seen, dim=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="var-d16,var-d30")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--modes", default="eager-fp16,fast")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one fast generation per batch")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU")
        return 1
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    header = f"{'model':8s} {'res':>4s} {'batch':>5s} {'mode':11s} {'dtype':9s} {'ms/image':>9s} {'images/s':>9s} {'peak GiB':>9s} {'TFLOP/s':>8s}"
    print(header)
    for name in args.models.split(","):
        pipe = build_var(name, device)
        res = pipe.vqvae.latent_size * pipe.vqvae.downsample_factor
        dec_flops = decoder_flops(pipe, device)
        eager_tokens = greedy_tokens(pipe, 4, device)
        for mode in args.modes.split(","):
            if mode in ("fast", "fast-compile"):
                pipe.enable_fast_inference(compile_decoder=mode == "fast-compile")
                fast_tokens = greedy_tokens(pipe, 4, device)
                agreement = (fast_tokens == eager_tokens).float().mean().item()
                print(f"  {name}: greedy-token agreement fast (bf16 + graphs) vs eager float32: {agreement:.4f}")
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                seconds, peak = time_mode(pipe, batch, device, args.repeats, torch.float16 if mode == "eager-fp16" else None)
                flops = transformer_flops(pipe.transformer, 2 * batch) + batch * dec_flops
                row = dict(model=name, resolution=res, batch=batch, mode=mode,
                           dtype="fp16-autocast" if mode == "eager-fp16" else str(pipe.transformer.dtype).replace("torch.", ""),
                           ms_per_image=1000 * seconds / batch, images_per_s=batch / seconds, peak_gib=peak,
                           tflops=flops / seconds / 1e12)
                rows.append(row)
                print(f"{name:8s} {res:4d} {batch:5d} {mode:11s} {row['dtype']:9s} {row['ms_per_image']:9.1f} {row['images_per_s']:9.1f} "
                      f"{peak:9.2f} {row['tflops']:8.1f}", flush=True)
                if args.profile and mode.startswith("fast"):
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
                        generate(pipe, batch, device)
                        torch.cuda.synchronize()
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        del pipe
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
