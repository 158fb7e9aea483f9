#!/usr/bin/env python
"""Speed and memory of the pipelines on real model configurations with random weights (no download).

    python benchmarks/bench_pipelines.py --models var-d16,var-d30 --batch-sizes 1,64
    python benchmarks/bench_pipelines.py --models infinity-2b,star-d30
    python benchmarks/bench_pipelines.py --models code-d30-d16-n8 --batch-sizes 1,64 --modes eager-fp16,fast
    python benchmarks/bench_pipelines.py --dry-run          # tiny configurations on the CPU: checks the script

For every model, batch size and mode it warms up, times ``--repeats`` full generations (sampling and VAE
decode included) and prints the median: ms per image, images/s, peak GPU memory (allocated: live tensors; reserved:
what the process holds, which also counts the temporaries of CUDA graphs that the allocated peak misses) and effective
TFLOP/s (analytic transformer FLOPs + the measured decoder FLOPs). Models and their sampling settings:
  var-d16 .. var-d30  256 px, cfg 1.5, top-k 900, top-p 0.96 (the original's FID setting); batches 1, 64
  code-d30-d16-n8, code-d30-d16-n6   CoDe (VARCoDePipeline): a VAR-d30 drafter for the first 8 / 6 of the 10 scales,
                      a VAR-d16 refiner for the rest; VAR's sampling settings plus CoDe's per-scale temperature
                      ([1.1] * 7 + [1.0] * 3, as infer_CoDe.py); batches 1, 64. Compare with var-d30 run in its own
                      process (one model per process)
  star-d16            STAR's released 256 px model (depth 16, width 1024, 10 scales, keys/star/star-256-d16.json)
  star-d30            STAR's released 1024 px model (depth 30, width 1920, 14 scales, CLIP-H text width 1024,
                      77 text tokens, row-0 cross-attention as released), cfg 4, top-k 600, top-p 0.8; batch 1
  infinity-2b         Infinity-2B at 1024 x 1024 (13 scales, T5-XL text width 2048, 32-bit BSQ VAE d32),
                      cfg 3, tau 0.5, top-k 900, top-p 0.97; batches 1, 4
  infinity-2b-256     the same model at 256 x 256 (its 0.06M schedule: 16 x 16 tokens at the last scale)
  var-tiny, code-tiny, star-tiny, infinity-tiny   tiny configurations for ``--dry-run`` / CPU checks
The text-to-image models get random precomputed text features of the real shapes (``prompt_embeds``): the text
encoders (CLIP-H, flan-T5-XL) are neither built nor timed. Modes:
  eager-fp16   our eager code under fp16 autocast (the original VAR's setting; float32 weights); VAR default
  eager-bf16   our eager code under bf16 autocast (the original STAR / Infinity setting); STAR / Infinity default
  eager        our eager code in float32
  fast         ``pipe.enable_fast_inference()``: bf16 blocks and decoder, CUDA graphs per scale
  fast-compile the same with ``compile_decoder=True`` (torch.compile of the image decoder)
  fast-compile-all  also ``compile_blocks=True`` (torch.compile of each block's elementwise work)
  fast-compile-all-fp8  also ``fp8=True`` (float8 matmuls in the blocks at scales of at least 4,096 token rows;
                        opt-in)
  fast-compile-all-autotune  ``fast-compile-all`` with the decoder compiled in ``max-autotune-no-cudagraphs`` mode
                        (``compile_decoder="max-autotune-no-cudagraphs"``: convolution kernels benchmarked at compile)
  fast-compile-all-subpixel  ``fast-compile-all`` with the decoder's upsamplers in sub-pixel form
                        (``fast_inference.subpixel_upsample_``: one 2x2 conv on the small map, opt-in until measured)
  fast-compile-all-unchained  ``fast-compile-all`` with VAR's blocks compiled piece by piece, each block on its own
                        (``fast_inference.CHAIN_VAR_BLOCKS = False``: the code before the chained blocks)
  fast-compile-all-kvcopy  ``fast-compile-all`` with the compiled projection pieces (VAR's chained blocks,
                        Infinity's blocks) leaving the KV-cache writes to the cache's own copies
                        (``fast_inference.KV_WRITES_IN_PIECE = False``)
  fast-compile-all-gelu-always  ``fast-compile-all`` with fc1's bias + GELU in the matmul epilogue at every scale,
                        not only from 4,096 token rows (``fast_inference.FUSED_GELU_MIN_ROWS = 1``)
  fast-compile-all-static-tokens  ``compile_blocks="static-tokens"``: the block pieces compiled for every scale, the
                        batch dimension dynamic
  fast-compile-all-static  ``compile_blocks="static"``: the block pieces compiled for every scale and batch size
                        (the static modes raise dynamo's recompile limit for the rest of the process: give them a
                        process of their own, as ``gpu_session.sh chain`` does)
  fast-compile-all-static-tokens-fp8  ``"static-tokens"`` with ``fp8=True`` (for the text-to-image models at 1024 px)
  fast-compile-all-static-fp8  ``"static"`` with ``fp8=True`` (VAR at batch 64)
  fast-compile-all-static-tokens-fp8-kvcopy  ``"static-tokens"`` with ``fp8=True`` and the cache's own copies (the
                        A/B of Infinity's in-piece KV-cache writes)
  fast-compile-all-static-tokens-fp8-crossquery  ``"static-tokens"`` with ``fp8=True`` and STAR's cross-attention
                        query compiled on CUDA too (the default since session 29, so the same as
                        ``fast-compile-all-static-tokens-fp8``; kept for session 28's commands)
  fast-compile-all-static-tokens-fp8-plainquery  ``"static-tokens"`` with ``fp8=True`` and STAR's cross-attention
                        query uncompiled on CUDA (``fast_inference.STAR_COMPILED_CROSS_QUERY_ON_CUDA = False``)
  fast-compile-all-static-tokens-fp8-persistent  ``"static-tokens"`` with ``fp8=True`` and Inductor's row
                        reductions of up to 16,384 features in one pass (``torch._inductor.config.triton.multi_kernel
                        = 2``: persistent reductions forced, the row kept in registers; the default loops twice over
                        rows above 1,024 features, e.g. fc2's float8 input of 8,192 features)
  fast-compile-all-gnsums  ``fast-compile-all`` with the decoder's GroupNorm statistics as per-channel sums at
                        every batch size (``fast_inference.channel_sum_group_norm_(min_batch=1)``; the default
                        takes them from 16 images on)
  fast-compile-all-static-tokens-fp8-gnsums  both (the text-to-image models at batch 1: a 1024 px image is as
                        many decoder positions as 16 images of 256 px)
  fast-compile-all-static-tokens-fp8-gnsums-large  the same as ``fast-compile-all-static-tokens-fp8`` since session
                        30 (the sums at any batch size on maps of 512 x 512 positions and more,
                        ``fast_inference.CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS``); kept for session 30's commands
  fast-compile-all-static-tokens-fp8-nolargesums  without them (GroupNorm below 16 images, as before session 30)
  fast-compile-all-static-tokens-fp8-fp8rows2048  the same as ``fast-compile-all-static-tokens-fp8`` since session
                        30 (float8 matmuls from 2,048 token rows, ``fast_inference.FP8_MIN_ROWS``); kept for
                        session 30's commands
  fast-compile-all-static-tokens-fp8-fp8rows4096  float8 from 4,096 rows everywhere (as before session 30)
  fast-compile-all-static-fp8-fp8rows4096  the same for ``fast-compile-all-static-fp8`` (VAR at batch 64)
  fast-compile-all-static-tokens-fp8-eagersampling  STAR / Infinity sampling eagerly after the graphed transformer
                        step (the whole-scale graphs, used up to 16 x 16 tokens since session 32, turned off)
It also checks that greedy tokens (bits for Infinity) of the fast path agree with the eager float32 path.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config  # the -persistent modes set its multi_kernel
from diffusers.models.attention_dispatch import attention_backend
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers_var import (  # noqa: E402
    BitwiseMultiScaleVAE,
    InfinityPipeline,
    InfinityTransformer2DModel,
    MultiScaleVQModel,
    STARPipeline,
    STARTransformer2DModel,
    VARCoDePipeline,
    VARPipeline,
    VARTransformer2DModel,
)
from diffusers_var.models.dynamic_resolution import schedule_for_pixels  # noqa: E402
from diffusers_var.models.infinity_transformer import infinity_ffn_dim  # noqa: E402
from diffusers_var.pipelines import fast_inference  # noqa: E402
from diffusers_var.pipelines.fast_inference import channel_sum_group_norm_, subpixel_upsample_  # noqa: E402

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MODELS = {  # name: (depth, patch_nums); width 64 * depth and depth heads, as every VAR release
    "var-d16": (16, PATCH_NUMS_256),
    "var-d20": (20, PATCH_NUMS_256),
    "var-d24": (24, PATCH_NUMS_256),
    "var-d30": (30, PATCH_NUMS_256),
}


PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)  # STAR 1024 px (convert_star / keys/star)
PATCH_NUMS_STAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # STAR 256 px (keys/star/star-256-d16.json)
TINY_PATCH_NUMS = (1, 2, 3, 4)
TINY_VQVAE = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, vocab_size=64, z_channels=8, patch_nums=TINY_PATCH_NUMS)


def build_var(name: str, device) -> VARPipeline:
    torch.manual_seed(0)
    if name == "var-tiny":
        vqvae = MultiScaleVQModel(**TINY_VQVAE)
        transformer = VARTransformer2DModel(
            num_classes=10,
            depth=2,
            embed_dim=64,
            num_heads=2,
            vocab_size=64,
            latent_channels=8,
            patch_nums=TINY_PATCH_NUMS,
        )
        transformer.init_weights()
        pipe = VARPipeline(transformer=transformer.eval(), vqvae=vqvae.eval())
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    depth, patch_nums = MODELS[name]
    vqvae = MultiScaleVQModel(patch_nums=patch_nums)  # the released VAE configuration
    transformer = VARTransformer2DModel(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums)
    transformer.init_weights()
    pipe = VARPipeline(transformer=transformer.eval(), vqvae=vqvae.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def transformer_flops(transformer: VARTransformer2DModel, rows: int, num_scales: int | None = None) -> float:
    """Matmul FLOPs of one generation (all scales, or the first ``num_scales``; ``rows`` = 2 x batch for guidance)."""
    cfg = transformer.config
    C, V = cfg.embed_dim, cfg.vocab_size
    hidden = round(C * cfg.mlp_ratio)
    flops, seen = 0.0, 0
    for begin, end in transformer.begin_ends[:num_scales]:
        tokens = end - begin
        seen = end
        per_token = (
            cfg.depth * (2 * (4 * C * C + 2 * C * hidden) + 4 * C * seen) + 2 * C * V + 2 * cfg.latent_channels * C
        )
        flops += rows * tokens * per_token
    return flops


def decoder_flops(pipe: VARPipeline, device) -> float:
    side = pipe.vqvae.latent_size
    f_hat = torch.zeros(1, pipe.vqvae.config.z_channels, side, side, device=device)
    return counted_flops(lambda: pipe.vqvae.decode_latent(f_hat))


def counted_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


VAR_SAMPLING = dict(guidance_scale=1.5, top_k=900, top_p=0.96)  # the original's FID setting


def run_pipeline(pipe, inputs: dict, sampling: dict, device, seed: int, overrides: dict):
    """``pipe(**inputs)`` with the model's ``sampling`` settings (``overrides`` win), a seeded generator on
    ``device`` and ``output_type="pt"`` unless overridden; returns the images."""
    kw = {"output_type": "pt", **sampling, **overrides}
    return pipe(**inputs, generator=torch.Generator(device).manual_seed(seed), **kw).images


def generate(pipe, batch, device, seed=0, **kw):
    return run_pipeline(pipe, dict(class_labels=list(range(batch))), VAR_SAMPLING, device, seed, kw)


def recorded_greedy(generate_fn, tensor_name: str, pipe, batch, device, **kw) -> torch.Tensor:
    """Greedy generation (top-k 1) through ``generate_fn``, recording ``tensor_name`` (the sampled tokens or
    bits) at every scale with the step callback; returns them concatenated over scales."""
    seen = []
    generate_fn(
        pipe,
        batch,
        device,
        top_k=1,
        top_p=0.0,
        output_type="latent",
        callback_on_step_end_tensor_inputs=[tensor_name],
        callback_on_step_end=lambda p, si, scale, tensors: seen.append(tensors[tensor_name].clone()) or {},
        **kw,
    )
    return torch.cat(seen, dim=1)


def gpu_timeline(prof) -> str:
    """One generation's GPU work from a torch.profiler trace: how many kernels ran, their summed time, and how much of
    the span from the first kernel's start to the last one's end the GPU was busy (the rest: gaps between kernels,
    launch latency inside CUDA graphs included, and waits for the host)."""
    from torch.autograd import DeviceType

    intervals = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA
    )
    if not intervals:
        return "no CUDA kernels traced"
    busy, covered_until = 0.0, intervals[0][0]
    for start, end in intervals:
        if end > covered_until:
            busy += end - max(start, covered_until)
            covered_until = end
    span = intervals[-1][1] - intervals[0][0]
    kernel_time = sum(end - start for start, end in intervals)
    return (
        f"{len(intervals)} GPU kernels / copies, {kernel_time / 1e3:.2f} ms summed; busy {busy / 1e3:.2f} ms of a "
        f"{span / 1e3:.2f} ms span (idle {(span - busy) / 1e3:.2f} ms, {(span - busy) / len(intervals):.2f} us per "
        "kernel)"
    )


# kernel name fragments -> category, first match wins (cuDNN's attention before its convolutions)
KERNEL_CATEGORIES = (
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("convolution", ("fprop", "dgrad", "cudnn_convolution")),
    ("image decoder (Triton, around its convolutions)", ("convolution_",)),
    ("float8 scaling (Triton: amax, cast)", ("_scaled_mm__to_copy_abs",)),
    ("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma", "scaled_mm", "f8f8")),
    ("compiled (Triton)", ("triton_",)),
    (
        "eager elementwise / reductions",
        (
            "elementwise",
            "reduce_kernel",
            "vectorized",
            "index",
            "scatter",
            "sort",
            "topk",
            "gather",
            "softmax",
            "distribution",
            "cat",
            "copy",
        ),
    ),
)
PROFILER_PSEUDO_EVENTS = ("Command Buffer Full", "cudaStreamIsCapturing", "cudaGraphLaunch", "Activity Buffer")
HOST_CALLS = ("aten::", "cuda", "cuLaunch", "cuMem", "cuStream")  # operators and runtime calls (not cudnn_ kernels)


def kernel_categories(prof) -> str:
    """The GPU time of one traced generation by kind of kernel (name fragments: :data:`KERNEL_CATEGORIES`), with
    the profiler's pseudo-events (a full command buffer, capture checks, graph launches) left out, and the three
    largest kernels of each kind."""
    from torch.autograd import DeviceType

    totals, largest = {}, {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA and not getattr(event, "self_device_time_total", 0):
            continue
        name = event.key
        if name.startswith(PROFILER_PSEUDO_EVENTS + HOST_CALLS):
            continue
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if not us:
            continue
        lowered = name.lower()
        kind = next((k for k, parts in KERNEL_CATEGORIES if any(part in lowered for part in parts)), "other")
        totals[kind] = totals.get(kind, 0.0) + us
        largest.setdefault(kind, []).append((us, event.count, name[:70]))
    lines = [f"{sum(totals.values()) / 1e3:.2f} ms of kernels by kind:"]
    for kind, us in sorted(totals.items(), key=lambda item: -item[1]):
        top = sorted(largest[kind], reverse=True)[:3]
        lines.append(f"    {kind}: {us / 1e3:.2f} ms; " + "; ".join(f"{n} x{c} {t / 1e3:.2f} ms" for t, c, n in top))
    return "\n".join(lines)


def chrome_python_frames(prof, events) -> list:
    """The calls of this package's functions from the profiler's exported chrome trace, on ``events``' clock: some
    PyTorch builds (the device's 2.11) give ``prof.events()`` no Python function events though the trace holds them.
    The two clocks differ by a constant, read off the first operator both hold."""
    import os
    import tempfile

    from torch.autograd import DeviceType

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as file:
            trace = json.load(file)["traceEvents"]
    operators = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    if not operators:
        return []
    first = min(operators, key=lambda e: e.time_range.start)
    same = [e for e in trace if e.get("ph") == "X" and e.get("name") == first.name]
    offset = min(e["ts"] for e in same) - first.time_range.start
    return [
        [e["name"].split("diffusers_var/")[-1], e["ts"] - offset, e["ts"] + e["dur"] - offset]
        for e in trace
        if e.get("cat") == "python_function" and "diffusers_var/" in e.get("name", "")
    ]


def write_trace(prof, path: str) -> None:
    """The traced generation, gzipped JSON (needs ``with_stack``): ``{"kernels": [[name, start_us, end_us,
    launch_us, lines], ...], "frames": [[line, start_us, end_us], ...]}``. ``launch_us``: when the host issued the
    kernel (its launch, or the graph launch that replayed it); ``lines``: up to three innermost lines of this package
    on the issuing stack, innermost first. ``frames``: every call of a function of this package, so that what the
    host did while the GPU waited can be read (``benchmarks/read_trace.py``)."""
    import numpy as np
    from torch.autograd import DeviceType

    events = prof.events()
    host = {event.id: event for event in events if event.device_type != DeviceType.CUDA}  # (frames share ids)
    ours = [e for e in events if e.device_type != DeviceType.CUDA and "diffusers_var/" in e.name]
    frames = [[e.name.split("diffusers_var/")[-1], e.time_range.start, e.time_range.end] for e in ours]
    frames = frames or chrome_python_frames(prof, events)
    starts = np.array([f[1] for f in frames], dtype=np.float64)
    ends = np.array([f[2] for f in frames], dtype=np.float64)
    lines_of = {}

    def issuing_lines(launch) -> list[str]:
        """The innermost frames of this package around the launch: by its parents, else by time (a runtime event
        the profiler gave no parent)."""
        if launch.id not in lines_of:
            lines, caller = [], launch
            while caller is not None and len(lines) < 3:
                if "diffusers_var/" in caller.name:
                    lines.append(caller.name.split("diffusers_var/")[-1])
                caller = caller.cpu_parent
            if not lines and len(frames):
                t = launch.time_range.start
                around = np.flatnonzero((starts <= t) & (ends >= t))
                lines = [frames[i][0] for i in around[np.argsort(ends[around] - starts[around])][:3]]
            lines_of[launch.id] = lines
        return lines_of[launch.id]

    kernels = []
    for event in events:
        if event.device_type != DeviceType.CUDA:
            continue
        launch = host.get(getattr(event, "linked_correlation_id", 0))
        lines = issuing_lines(launch) if launch is not None else []
        launch_us = launch.time_range.start if launch is not None else None
        kernels.append([event.name[:100], event.time_range.start, event.time_range.end, launch_us, lines])
    with gzip.open(path, "wt") as file:
        json.dump({"kernels": kernels, "frames": frames}, file)
    print(f"  trace: {len(kernels)} kernels, {len(frames)} calls of this package -> {path}")


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_mode(pipe, batch, device, repeats, autocast_dtype=None, generate_fn=None, warmups=2):
    """``(every timed run's seconds, peak allocated GiB, peak reserved GiB)`` of ``repeats`` generations after
    ``warmups``."""
    generate_fn = generate_fn or generate
    device_type = torch.device(device).type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        for _ in range(warmups):
            generate_fn(pipe, batch, device)
        synchronize(device)
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate_fn(pipe, batch, device)
            synchronize(device)
            times.append(time.perf_counter() - start)
    if device_type != "cuda":
        return times, float("nan"), float("nan")
    # allocated: tensors alive at the peak; reserved: what the process holds from the GPU, which also counts the
    # temporaries of CUDA graphs (freed into the graphs' private pools at capture, never allocated again at replay)
    allocated, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    return times, allocated, reserved


def greedy_tokens(pipe, batch, device):
    return recorded_greedy(generate, "tokens", pipe, batch, device, guidance_scale=4.0)


# ----------------------------------------------------------------------------------------------
# CoDe: a large VAR drafts the coarse scales, a small one refines the fine ones
# ----------------------------------------------------------------------------------------------
CODE_MODELS = {"code-d30-d16-n8": (30, 16, 8), "code-d30-d16-n6": (30, 16, 6)}  # drafter depth, refiner depth, N


def build_code(name: str, device) -> VARCoDePipeline:
    torch.manual_seed(0)
    if name == "code-tiny":
        vqvae = MultiScaleVQModel(**TINY_VQVAE)
        models = [
            VARTransformer2DModel(
                num_classes=10,
                depth=depth,
                embed_dim=width,
                num_heads=2,
                vocab_size=64,
                latent_channels=8,
                patch_nums=TINY_PATCH_NUMS,
            )
            for depth, width in ((2, 64), (1, 32))
        ]
        draft_steps = 2
    else:
        drafter_depth, refiner_depth, draft_steps = CODE_MODELS[name]
        vqvae = MultiScaleVQModel(patch_nums=PATCH_NUMS_256)
        models = [
            VARTransformer2DModel(depth=d, embed_dim=64 * d, num_heads=d, patch_nums=PATCH_NUMS_256)
            for d in (drafter_depth, refiner_depth)
        ]
    for model in models:
        model.init_weights()
    pipe = VARCoDePipeline(
        transformer=models[0].eval(), refiner=models[1].eval(), vqvae=vqvae.eval(), draft_steps=draft_steps
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def code_sampling(pipe: VARCoDePipeline) -> dict:
    """VAR's FID setting and CoDe's per-scale temperature: 1.1 but on the last three scales (infer_CoDe.py)."""
    num_scales = len(pipe.transformer.config.patch_nums)
    return dict(VAR_SAMPLING, temperature=[1.1] * (num_scales - 3) + [1.0] * 3)


def generate_code(pipe, batch, device, seed=0, **kw):
    return run_pipeline(pipe, dict(class_labels=list(range(batch))), code_sampling(pipe), device, seed, kw)


def greedy_code(pipe, batch, device):
    return recorded_greedy(generate_code, "tokens", pipe, batch, device, guidance_scale=4.0)


def code_transformer_flops(pipe: VARCoDePipeline, rows: int) -> float:
    """The drafter's scales 0..N-1, and the refiner over the whole pyramid (its prefill covers scales 0..N)."""
    return transformer_flops(pipe.transformer, rows, pipe.config.draft_steps) + transformer_flops(pipe.refiner, rows)


# ----------------------------------------------------------------------------------------------
# STAR
# ----------------------------------------------------------------------------------------------
STAR_TEXT_TOKENS = 77  # CLIP's padded length
STAR_SAMPLING = dict(guidance_scale=4.0, top_k=600, top_p=0.8)  # the STAR demo / pipeline defaults
# name: (depth, patch_nums), width 64 * depth and depth heads: star-256-d16.json (256 px, 10 scales) and
# star-1024-d30.json (14 scales)
RELEASED_STAR = {"star-d16": (16, PATCH_NUMS_STAR_256), "star-d30": (30, PATCH_NUMS_1024)}


def build_star(name: str, device) -> STARPipeline:
    torch.manual_seed(0)
    if name == "star-tiny":
        vqvae = MultiScaleVQModel(**TINY_VQVAE)
        transformer = STARTransformer2DModel(
            depth=2,
            embed_dim=64,
            num_heads=2,
            vocab_size=64,
            latent_channels=8,
            patch_nums=TINY_PATCH_NUMS,
            text_embed_dim=32,
            num_legacy_classes=0,
            cross_attention_row0_quirk=True,
        )
    else:  # the released configurations (keys/star/*.json, VAR_kwargs), as convert_star builds them
        depth, patch_nums = RELEASED_STAR[name]
        vqvae = MultiScaleVQModel(patch_nums=patch_nums)  # VAR's released VQ-VAE with STAR's schedule
        transformer = STARTransformer2DModel(
            depth=depth,
            embed_dim=64 * depth,
            num_heads=depth,
            patch_nums=patch_nums,
            text_embed_dim=1024,
            num_legacy_classes=1000,
            cross_attention_row0_quirk=True,
        )
    transformer.init_weights()
    pipe = STARPipeline(transformer=transformer.eval(), vqvae=vqvae.eval(), text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


_TEXT = {}  # (model kind, batch, device, width) -> text features: made once, outside the timed generations


def star_text(pipe: STARPipeline, batch: int, device) -> dict:
    """Random CLIP-like features: 77 positions, 16 real tokens for the prompt, 2 (BOS, EOS) for the empty negative."""
    key = ("star", batch, str(device), pipe.transformer.config.text_embed_dim)
    if key not in _TEXT:
        _TEXT[key] = _star_text(pipe, batch, device)
    return _TEXT[key]


def _star_text(pipe: STARPipeline, batch: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    D = pipe.transformer.config.text_embed_dim
    mask, neg_mask = (torch.zeros(batch, STAR_TEXT_TOKENS, dtype=torch.long) for _ in range(2))
    mask[:, :16] = 1
    neg_mask[:, :2] = 1
    text = dict(
        prompt_embeds=torch.randn(batch, STAR_TEXT_TOKENS, D, generator=g),
        prompt_attention_mask=mask,
        pooled_prompt_embeds=torch.randn(batch, D, generator=g),
        negative_prompt_embeds=torch.randn(batch, STAR_TEXT_TOKENS, D, generator=g),
        negative_prompt_attention_mask=neg_mask,
        negative_pooled_prompt_embeds=torch.randn(batch, D, generator=g),
    )
    return {k: v.to(device) for k, v in text.items()}


def generate_star(pipe, batch, device, seed=0, **kw):
    return run_pipeline(pipe, star_text(pipe, batch, device), STAR_SAMPLING, device, seed, kw)


def greedy_star(pipe, batch, device):
    return recorded_greedy(generate_star, "tokens", pipe, batch, device)


def star_transformer_flops(
    transformer: STARTransformer2DModel, rows: int, text_tokens: int = STAR_TEXT_TOKENS
) -> float:
    """Matmul FLOPs of one generation (``rows`` = 2 x batch). With the released row-0 cross-attention only one row
    attends to the text. The text keys / values are counted once per generation (the fast path computes them once)."""
    cfg = transformer.config
    C, V, D = cfg.embed_dim, cfg.vocab_size, cfg.text_embed_dim
    hidden = round(C * cfg.mlp_ratio)
    cross_rows = (1 if cfg.cross_attention_row0_quirk else rows) if cfg.cross_attention else 0
    flops = rows * 2 * D * C + cross_rows * cfg.depth * text_tokens * 2 * D * 2 * C  # start token; text keys / values
    for begin, end in transformer.begin_ends:
        tokens = end - begin
        self_part = (
            cfg.depth * (2 * (4 * C * C + 2 * C * hidden) + 4 * C * end) + 2 * C * V + 2 * cfg.latent_channels * C
        )
        cross_part = cfg.depth * (2 * 2 * C * C + 4 * C * text_tokens)
        flops += rows * tokens * self_part + cross_rows * tokens * cross_part
    return flops


# ----------------------------------------------------------------------------------------------
# Infinity
# ----------------------------------------------------------------------------------------------
INFINITY_TEXT_TOKENS = 32  # T5 tokens of a typical prompt (trimmed to the longest prompt, as the pipeline does)
INFINITY_SAMPLING = dict(guidance_scale=3.0, tau=0.5, top_k=900, top_p=0.97)


def build_infinity(name: str, device) -> InfinityPipeline:
    torch.manual_seed(0)
    if name == "infinity-tiny":
        vae = BitwiseMultiScaleVAE(
            base_channels=24, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], num_res_blocks=1, codebook_dim=4
        )
        transformer = InfinityTransformer2DModel(
            bits_per_token=4,
            text_dim=32,
            text_max_length=24,
            pool_num_heads=2,
            depth=2,
            embed_dim=64,
            num_heads=2,
            block_chunks=2,
        )
        size = 32
    else:  # infinity-2b(-256): keys/infinity/infinity_2b.json + vae_d32.json (the class defaults)
        vae = BitwiseMultiScaleVAE(
            base_channels=128,
            encoder_ch_mult=(1, 2, 4, 4, 4),
            decoder_ch_mult=(1, 2, 4, 4, 4),
            num_res_blocks=2,
            codebook_dim=32,
        )
        transformer = InfinityTransformer2DModel(
            bits_per_token=32,
            text_dim=2048,
            text_max_length=512,
            pool_num_heads=16,
            depth=32,
            embed_dim=2048,
            num_heads=16,
            mlp_ratio=4.0,
            block_chunks=8,
            shared_adaln=True,
            num_level_embeddings=15,
        )
        size = 256 if name.endswith("-256") else 1024
    transformer.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5)  # as in sessions 8-28: the blocks matter
    pipe = InfinityPipeline(
        transformer=transformer.eval(), vae=vae.eval(), text_encoder=None, tokenizer=None, default_size=[size, size]
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def infinity_text(pipe: InfinityPipeline, batch: int, device) -> dict:
    """Random T5-like features of ``INFINITY_TEXT_TOKENS`` real tokens; the negative half is the learned empty text."""
    key = ("infinity", batch, str(device), pipe.transformer.config.text_dim)
    if key not in _TEXT:
        g = torch.Generator().manual_seed(1)
        tokens = min(INFINITY_TEXT_TOKENS, pipe.transformer.config.text_max_length)
        embeds = 0.2 * torch.randn(batch, tokens, pipe.transformer.config.text_dim, generator=g)
        _TEXT[key] = dict(
            prompt_embeds=embeds.to(device),
            prompt_attention_mask=torch.ones(batch, tokens, dtype=torch.bool, device=device),
        )
    return _TEXT[key]


def generate_infinity(pipe, batch, device, seed=0, **kw):
    return run_pipeline(pipe, infinity_text(pipe, batch, device), INFINITY_SAMPLING, device, seed, kw)


def greedy_infinity(pipe, batch, device):
    return recorded_greedy(generate_infinity, "tokens", pipe, batch, device)


def infinity_schedule(pipe: InfinityPipeline):
    height, width = pipe.config.default_size
    return schedule_for_pixels(height, width, pipe.vae.pixels_per_token)


def infinity_transformer_flops(pipe: InfinityPipeline, rows: int, text_tokens: int = INFINITY_TEXT_TOKENS) -> float:
    """Matmul FLOPs of one generation (``rows`` = 2 x batch with guidance): blocks (self-attention over the cached
    pyramid, cross-attention to the text, FFN), bit head, input projection; the text pooling / projection and
    every block's text keys / values once per generation."""
    tr = pipe.transformer
    cfg = tr.config
    C, T, bits = cfg.embed_dim, cfg.text_dim, cfg.bits_per_token
    S = min(text_tokens, cfg.text_max_length)
    ffn = infinity_ffn_dim(C, cfg.mlp_ratio)
    flops = rows * S * (2 * T * 2 * C + 2 * (T * C + C * C)) + rows * 2 * C * C  # pooling kv, text MLP, pooled query
    flops += rows * 2 * C * 6 * C + rows * cfg.depth * S * 2 * C * 2 * C  # shared AdaLN; text keys / values
    seen = 0
    for h, w in infinity_schedule(pipe):
        tokens = h * w
        seen += tokens
        per_token = (
            cfg.depth * (2 * (4 * C * C + 2 * C * C + 2 * C * ffn) + 4 * C * seen + 4 * C * S)
            + 2 * C * 2 * bits
            + 2 * bits * C
        )
        flops += rows * tokens * per_token
    return flops


def infinity_decoder_flops(pipe: InfinityPipeline, device) -> float:
    h, w = pipe.vae.latent_schedule(infinity_schedule(pipe))[-1]
    latent = torch.zeros(1, pipe.vae.config.codebook_dim, h, w, device=device)
    return counted_flops(lambda: pipe.vae.decode(latent))


class Bench:
    """What the timing loop needs from a model: its pipeline and how to generate, check and count it."""

    def __init__(self, name: str, device, decode_slice: int | None = None):
        self.name = name
        if name.startswith("code-"):
            self.build, self.generate, self.greedy = build_code, generate_code, greedy_code
            self.default_batches, self.default_modes, self.greedy_batch = "1,64", "eager-fp16,fast", 4
        elif name.startswith("var-"):
            self.build, self.generate, self.greedy = build_var, generate, greedy_tokens
            self.default_batches, self.default_modes, self.greedy_batch = "1,64", "eager-fp16,fast", 4
        elif name.startswith("star-"):
            self.build, self.generate, self.greedy = build_star, generate_star, greedy_star
            self.default_batches, self.default_modes, self.greedy_batch = "1", "eager-bf16,fast", 1
        else:
            self.build, self.generate, self.greedy = build_infinity, generate_infinity, greedy_infinity
            self.default_batches, self.default_modes, self.greedy_batch = "1,4", "eager-bf16,fast", 1
        if name.endswith("-tiny"):
            self.default_batches = "1,2"
        self.decode_slice = decode_slice
        self.pipe = self._built(device)
        self.fresh = True

    def _built(self, device):
        pipe = self.build(self.name, device)
        if self.decode_slice:
            (pipe.vae if isinstance(pipe, InfinityPipeline) else pipe.vqvae).enable_slicing(self.decode_slice)
        return pipe

    def rebuild(self, device) -> None:
        """A fresh float32 pipeline (same seed, same weights) after a mode changed the dtypes."""
        del self.pipe
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        self.pipe = self._built(device)
        self.fresh = True

    def resolution(self) -> int:
        if isinstance(self.pipe, InfinityPipeline):
            return self.pipe.config.default_size[0]
        return self.pipe.vqvae.latent_size * self.pipe.vqvae.downsample_factor

    def decoder_flops(self, device) -> float:
        if isinstance(self.pipe, InfinityPipeline):
            return infinity_decoder_flops(self.pipe, device)
        return decoder_flops(self.pipe, device)

    def transformer_flops(self, batch: int) -> float:
        if isinstance(self.pipe, InfinityPipeline):
            return infinity_transformer_flops(self.pipe, 2 * batch)  # cfg 3: guidance rows
        if isinstance(self.pipe, STARPipeline):
            return star_transformer_flops(self.pipe.transformer, 2 * batch)
        if isinstance(self.pipe, VARCoDePipeline):
            return code_transformer_flops(self.pipe, 2 * batch)
        return transformer_flops(self.pipe.transformer, 2 * batch)


AUTOCAST = {"eager-fp16": torch.float16, "eager-bf16": torch.bfloat16}
AUTOCAST_LABEL = {"eager-fp16": "fp16-autocast", "eager-bf16": "bf16-autocast"}
MODES = (
    "eager",
    "eager-fp16",
    "eager-bf16",
    "fast",
    "fast-compile",
    "fast-compile-all",
    "fast-compile-all-fp8",
    "fast-compile-all-autotune",
    "fast-compile-all-subpixel",
    "fast-compile-all-unchained",
    "fast-compile-all-kvcopy",
    "fast-compile-all-gelu-always",
    "fast-compile-all-static-tokens",
    "fast-compile-all-static",
    "fast-compile-all-static-tokens-fp8",
    "fast-compile-all-static-fp8",
    "fast-compile-all-static-tokens-fp8-kvcopy",
    "fast-compile-all-static-tokens-fp8-crossquery",
    "fast-compile-all-static-tokens-fp8-plainquery",
    "fast-compile-all-gnsums",
    "fast-compile-all-static-tokens-fp8-gnsums",
    "fast-compile-all-static-tokens-fp8-gnsums-large",
    "fast-compile-all-static-tokens-fp8-nolargesums",
    "fast-compile-all-static-tokens-fp8-fp8rows2048",
    "fast-compile-all-static-tokens-fp8-fp8rows4096",
    "fast-compile-all-static-fp8-fp8rows4096",
    "fast-compile-all-static-tokens-fp8-persistent",
    "fast-compile-all-static-tokens-fp8-eagersampling",
)
SDPA_BACKENDS = {  # --sdpa-first: PyTorch's own order after the one named
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
DECODER_MODES = {"-autotune": "max-autotune-no-cudagraphs"}  # mode suffix: compile mode
BLOCK_SHAPES = {f"fast-compile-all-{shapes}": shapes for shapes in ("static-tokens", "static")}  # compile_blocks=
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-fp8"] = "static"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-gnsums"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-gnsums-large"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-nolargesums"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-fp8rows2048"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-fp8rows4096"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-fp8-fp8rows4096"] = "static"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-kvcopy"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-crossquery"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-plainquery"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-persistent"] = "static-tokens"
BLOCK_SHAPES["fast-compile-all-static-tokens-fp8-eagersampling"] = "static-tokens"
DEFAULT_GN_MIN_POSITIONS = fast_inference.CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS
DEFAULT_FP8_MIN_ROWS = fast_inference.FP8_MIN_ROWS
KNOWN_MODELS = (
    tuple(MODELS)
    + tuple(CODE_MODELS)
    + ("star-d30", "star-d16", "infinity-2b", "infinity-2b-256", "var-tiny", "code-tiny", "star-tiny", "infinity-tiny")
)


def host_syncs(bench, batch: int, device) -> str:
    """The places where one generation waited for the GPU (torch's sync debug mode), by how often.

    Each place is the innermost frame of this package (or of this script) on the stack when the sync happened, then
    the frame that raised it where that one is elsewhere (torch's own Python), so a sync inside a torch helper is
    traced to the line of ours that called it.
    """
    import collections
    import traceback
    import warnings

    places = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        ours = [
            frame
            for frame in traceback.extract_stack()[:-1]
            if "diffusers_var" in frame.filename or frame.filename.endswith("bench_pipelines.py")
        ]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        if not ours or (ours[-1].filename, ours[-1].lineno) != (filename, lineno):
            where += f" via {Path(filename).name}:{lineno}"
        places[where] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            bench.generate(bench.pipe, batch, device)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return ", ".join(f"{place} x{count}" for place, count in places.most_common()) or "none"


def var_greedy_reaches_fp8(bench) -> bool:
    """Whether the greedy check's batch (both guidance halves) reaches the float8 row threshold at VAR's last scale."""
    side = bench.pipe.transformer.config.patch_nums[-1]
    return 2 * bench.greedy_batch * side * side >= fast_inference.fp8_min_rows()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default=None, help=f"comma-separated, from {', '.join(KNOWN_MODELS)} (default var-d16,var-d30)"
    )
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="default per model: VAR and CoDe 1,64; star-d30 1; infinity-2b 1,4; tiny 1,2",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"from {', '.join(MODES)}; default per model: VAR and CoDe "
        "eager-fp16,fast; "
        "STAR / Infinity eager-bf16,fast",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--device", default="cuda", help="cuda (default) or cpu (timings on the CPU only check the script)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny models on the CPU, one repeat: checks the script end to end "
        "(default models var-tiny,star-tiny,infinity-tiny)",
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of one fast generation per batch"
    )
    parser.add_argument(
        "--trace",
        default=None,
        help="with --profile: also write the traced generation's events to this .json.gz (every kernel with the "
        "host operator that launched it and that operator's stack in this package; read it with "
        "benchmarks/read_trace.py)",
    )
    parser.add_argument(
        "--decode-slice",
        type=int,
        default=None,
        help="decode this many images at a time (the tokenizer's enable_slicing): lower peak memory at large batches",
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="after each fast mode's timings, one more generation with torch.cuda.set_sync_debug_mode('warn'): "
        "prints each place that waited for the GPU (a host sync idles the GPU while the host launches what "
        "follows), with how often",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="torch.backends.cudnn.benchmark = True (cuDNN times its convolution kernels per shape; the pipelines "
        "leave this process-wide switch to the user)",
    )
    parser.add_argument(
        "--sdpa-first",
        choices=tuple(SDPA_BACKENDS),
        default=None,
        help="try this scaled_dot_product_attention kernel first for the whole process (the others follow in "
        "PyTorch's order, as fallbacks for the shapes it refuses); PyTorch's starting order is flash, "
        "memory-efficient, math, cuDNN, which it may change at the first CUDA attention call (the script prints the "
        "order it ends with)",
    )
    parser.add_argument(
        "--attention-backend",
        default=None,
        help="diffusers' attention backend for the whole process (diffusers.models.attention_dispatch."
        "attention_backend, what pipe.transformer.set_attention_backend sets), e.g. _native_cudnn (CUDA only); "
        "default diffusers' (native SDPA)",
    )
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.repeats = "cpu", 1
        args.models = args.models or "var-tiny,code-tiny,star-tiny,infinity-tiny"
    args.models = args.models or "var-d16,var-d30"
    names = args.models.split(",")
    unknown = [n for n in names if n not in KNOWN_MODELS] + [
        m for m in (args.modes or "").split(",") if m and m not in MODES
    ]
    if unknown:
        parser.error(f"unknown model or mode: {', '.join(unknown)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or --dry-run / --device cpu for a check of the script)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    rows, process_settings = [], contextlib.ExitStack()  # held until main returns
    if args.sdpa_first:  # entered for the rest of the process: the CUDA graphs capture the kernel picked
        if device.type == "cuda":  # PyTorch may set its CUDA kernel order at the first attention call: make it first
            probe = torch.zeros(1, 1, 8, 64, device=device, dtype=torch.bfloat16)
            torch.nn.functional.scaled_dot_product_attention(probe, probe, probe)
            print(f"SDPA order after a first CUDA attention call: {torch._C._get_sdp_priority_order()}")
        first = SDPA_BACKENDS[args.sdpa_first]
        order = [first] + [b for b in SDPA_BACKENDS.values() if b != first]
        process_settings.enter_context(sdpa_kernel(order, set_priority=True))
        print(f"SDPA order: {torch._C._get_sdp_priority_order()}")
    if args.attention_backend:  # diffusers checks the name (ValueError: not registered)
        process_settings.enter_context(attention_backend(args.attention_backend))
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name()
        print(
            f"GPU: {gpu}, torch {torch.__version__}, cudnn.benchmark {args.cudnn_benchmark}, "
            f"SDPA first: {args.sdpa_first or 'PyTorch default'}, "
            f"attention backend: {args.attention_backend or 'native'}"
        )
    else:
        print(f"CPU ({args.device}; timings only check the script), torch {torch.__version__}")
    width = max([8] + [len(n) for n in names])
    header = (
        f"{'model':{width}s} {'res':>4s} {'batch':>5s} {'mode':11s} {'dtype':9s} "
        f"{'ms/image':>9s} {'images/s':>9s} {'peak GiB':>9s} {'reserved':>9s} {'TFLOP/s':>8s} ms/image min-max"
    )
    print(header)
    for name in names:
        bench = Bench(name, device, args.decode_slice)
        res = bench.resolution()
        dec_flops = bench.decoder_flops(device)
        eager_tokens = bench.greedy(bench.pipe, bench.greedy_batch, device)
        for mode in (args.modes or bench.default_modes).split(","):
            if not bench.fresh:
                bench.rebuild(device)
            if mode.startswith("fast"):
                extra = {"compile_blocks": BLOCK_SHAPES.get(mode, True)} if mode.startswith("fast-compile-all") else {}
                if mode.endswith("-fp8") or "-fp8-" in mode:
                    extra["fp8"] = True
                suffix = next((suffix for suffix in DECODER_MODES if mode.endswith(suffix)), None)
                compile_decoder = DECODER_MODES[suffix] if suffix else mode != "fast"
                fast_inference.CHAIN_VAR_BLOCKS = not mode.endswith("-unchained")
                fast_inference.KV_WRITES_IN_PIECE = not mode.endswith("-kvcopy")
                fast_inference.STAR_COMPILED_CROSS_QUERY_ON_CUDA = not mode.endswith("-plainquery")
                fast_inference.FUSED_GELU_MIN_ROWS = 1 if mode.endswith("-gelu-always") else None
                multi_kernel = 2 if mode.endswith("-persistent") else 0
                if torch._inductor.config.triton.multi_kernel != multi_kernel:  # dynamo's guards do not see it
                    torch._dynamo.reset()
                    torch._inductor.config.triton.multi_kernel = multi_kernel
                bench.pipe.enable_fast_inference(compile_decoder=compile_decoder, **extra)
                if mode.endswith("-eagersampling"):  # no whole-scale graphs: the transformer-only ones
                    bench.pipe._graph_sampling_generator = lambda device, generator: None
                else:
                    bench.pipe.__dict__.pop("_graph_sampling_generator", None)
                if mode.endswith("-subpixel"):
                    subpixel_upsample_(getattr(bench.pipe, "vqvae", None) or bench.pipe.vae)
                large_map = None if mode.endswith("-nolargesums") else DEFAULT_GN_MIN_POSITIONS
                fp8_rows = None if mode.endswith("-fp8rows4096") else DEFAULT_FP8_MIN_ROWS
                if (fast_inference.CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS, fast_inference.FP8_MIN_ROWS) != (
                    large_map,
                    fp8_rows,
                ):  # read when traced
                    torch._dynamo.reset()
                    fast_inference.CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS = large_map
                    fast_inference.FP8_MIN_ROWS = fp8_rows
                if mode.endswith("-gnsums"):  # at every batch size (the default: from 16 images on)
                    channel_sum_group_norm_(
                        (getattr(bench.pipe, "vqvae", None) or bench.pipe.vae).decoder, min_batch=1
                    )
                bench.fresh = False
            for batch in (int(b) for b in (args.batch_sizes or bench.default_batches).split(",")):
                times, peak, reserved = time_mode(
                    bench.pipe,
                    batch,
                    device,
                    args.repeats,
                    AUTOCAST.get(mode),
                    bench.generate,
                    warmups=1 if args.dry_run else 2,
                )
                seconds = statistics.median(times)
                flops = bench.transformer_flops(batch) + batch * dec_flops
                dtype = AUTOCAST_LABEL.get(mode) or str(bench.pipe.transformer.dtype).replace("torch.", "")
                row = dict(
                    model=name,
                    resolution=res,
                    batch=batch,
                    mode=mode,
                    dtype=dtype,
                    ms_per_image=1000 * seconds / batch,
                    images_per_s=batch / seconds,
                    ms_per_image_range=[1000 * min(times) / batch, 1000 * max(times) / batch],
                    peak_gib=peak,
                    peak_reserved_gib=reserved,
                    cudnn_benchmark=args.cudnn_benchmark,
                    sdpa_first=args.sdpa_first,
                    attention_backend=args.attention_backend,
                    tflops=flops / seconds / 1e12,
                )
                rows.append(row)
                print(
                    f"{name:{width}s} {res:4d} {batch:5d} {mode:11s} {row['dtype']:9s} "
                    f"{row['ms_per_image']:9.1f} {row['images_per_s']:9.1f} {peak:9.2f} {reserved:9.2f} "
                    f"{row['tflops']:8.1f} {row['ms_per_image_range'][0]:.2f}-{row['ms_per_image_range'][1]:.2f}",
                    flush=True,
                )
                if args.sync_debug and mode.startswith("fast") and device.type == "cuda":
                    print(f"  sync-debug: {host_syncs(bench, batch, device)}", flush=True)
                if args.profile and mode.startswith("fast") and device.type == "cuda":
                    started = time.perf_counter()
                    with torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                        with_stack=bool(args.trace),
                    ) as prof:
                        bench.generate(bench.pipe, batch, device)
                        torch.cuda.synchronize()
                    wall_ms = 1000 * (time.perf_counter() - started)
                    events = prof.key_averages()
                    launches = sum(
                        e.count
                        for e in events
                        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
                    )
                    print(
                        f"  profile: {wall_ms:.1f} ms wall with the profiler on; {launches} eager kernel launches; "
                        f"{sum(e.count for e in events if e.key == 'cudaGraphLaunch')} graph launches"
                    )
                    print(f"  profile: {gpu_timeline(prof)}")
                    print(f"  profile: {kernel_categories(prof)}")
                    print(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=100))
                    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
                    if args.trace:
                        write_trace(prof, args.trace.replace(".json.gz", f"_{name}_b{batch}.json.gz"))
            if mode.startswith("fast"):  # after the timings: compiled code specialises on the first batch size it sees
                fast_tokens = bench.greedy(bench.pipe, bench.greedy_batch, device)
                agreement = (fast_tokens == eager_tokens).float().mean().item()
                note = (
                    (
                        f" (batch {bench.greedy_batch} is below the float8 row threshold: the bf16 matmuls ran; "
                        "tests/test_gpu.py checks float8 greedy agreement)"
                    )
                    if "-fp8" in mode and isinstance(bench.pipe, VARPipeline) and not var_greedy_reaches_fp8(bench)
                    else ""
                )
                print(f"  {name}: greedy-token agreement {mode} vs eager float32: {agreement:.4f}{note}")
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
