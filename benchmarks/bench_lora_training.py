#!/usr/bin/env python
"""GPU memory and speed of LoRA against full fine-tuning, on the released transformer configurations (random weights).

    python benchmarks/bench_lora_training.py --model var-d30 --out outputs/bench-lora      # VAR-d30, 256 px
    python benchmarks/bench_lora_training.py --model infinity-2b --out outputs/bench-lora  # Infinity-2B, 1024 px
    python benchmarks/bench_lora_training.py --smoke                                        # CPU check of the script

For each mode (full fine-tuning / LoRA) and gradient checkpointing (off / on) it builds the transformer on the GPU,
prepares it as ``diffusers-var train`` does (full: float32 weights; LoRA: ``diffusers_var.training.lora.attach_lora``,
rank ``--rank`` on the family's default targets, the frozen base in bf16), and times training steps exactly as the
trainer runs them: bf16 autocast, teacher-forcing forward on the whole token pyramid, cross-entropy (bitwise for
Infinity), backward, gradient clipping, AdamW. Reported per run: trainable parameters, peak GPU memory
(``max_memory_allocated`` over the timed steps) and images/s (median step time after warm-up). A run that does not
fit is reported as OOM. The inputs are random tokens / codes and random text features (Infinity: 128 real tokens of
width 2048), so the frozen image tokenizer and text encoder (not part of what LoRA changes, and precomputable) are
neither built nor timed.

Models: var-d30 (depth 30, width 1920, 30 heads, 256 px: 10 scales up to 16x16, 680 tokens, 1000 classes, batch
``--batch-size``, default 16) and infinity-2b (depth 32, width 2048, 16 heads, shared AdaLN, 1024 x 1024: 13 scales up
to 64x64, 10,521 tokens, 32 bits per token, default batch 2). Prints a markdown table and writes
``results-<model>.json``.

``--inference`` (var-d30) also times generation with ``enable_fast_inference()`` (bf16, CUDA graphs; batch 16, the
original's FID sampling settings) of the base model, with an unfused rank-``--rank`` adapter, and with that adapter
fused: a fused adapter should cost nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers_var import InfinityTransformer2DModel, VARTransformer2DModel  # noqa: E402
from diffusers_var.models.dynamic_resolution import schedule_for_pixels  # noqa: E402
from diffusers_var.training.lora import LoraSettings, attach_lora, trainable_parameters  # noqa: E402

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TEXT_TOKENS = 128


def build(model: str, device):
    """(transformer, make_batch(batch_size) -> (forward kwargs, targets), loss(output, targets)), on ``device``."""
    with torch.device(device):
        if model == "var-d30":
            transformer = VARTransformer2DModel(depth=30, embed_dim=1920, num_heads=30, patch_nums=PATCH_NUMS_256)
        elif model == "var-tiny":
            transformer = VARTransformer2DModel(
                num_classes=10,
                depth=2,
                embed_dim=64,
                num_heads=2,
                vocab_size=64,
                latent_channels=8,
                patch_nums=(1, 2, 3, 4),
            )
        elif model == "infinity-2b":  # keys/infinity/infinity_2b.json (the class defaults)
            transformer = InfinityTransformer2DModel(
                bits_per_token=32,
                text_dim=2048,
                text_max_length=512,
                pool_num_heads=16,
                depth=32,
                embed_dim=2048,
                num_heads=16,
                block_chunks=8,
                shared_adaln=True,
            )
        elif model == "infinity-tiny":
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
        else:
            raise ValueError(f"`--model` must be var-d30, infinity-2b, var-tiny or infinity-tiny, got {model!r}.")
        transformer.init_weights()
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    if model.startswith("var"):

        def make_batch(batch):
            labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
            inputs = transformer.seq_len - transformer.first_len
            tf_input = torch.randn(batch, inputs, cfg.latent_channels, generator=g)
            targets = torch.randint(0, cfg.vocab_size, (batch, transformer.seq_len), generator=g)
            return (
                dict(class_labels=labels.to(device), teacher_forcing_input=tf_input.to(device), drop_labels=True),
                targets.to(device),
            )

        def loss(output, targets):
            return F.cross_entropy(output.logits.reshape(-1, output.logits.shape[-1]), targets.reshape(-1))
    else:
        schedule = schedule_for_pixels(1024, 1024, 16) if model == "infinity-2b" else [(1, 1), (2, 2), (4, 4)]
        tokens = sum(h * w for h, w in schedule)
        text_tokens = min(TEXT_TOKENS, cfg.text_max_length)

        def make_batch(batch):
            inputs = torch.randn(batch, tokens - 1, cfg.bits_per_token, generator=g)
            text = 0.2 * torch.randn(batch, text_tokens, cfg.text_dim, generator=g)
            mask = torch.ones(batch, text_tokens, dtype=torch.bool)
            drop = torch.rand(batch, generator=g) < 0.1
            targets = torch.randint(0, 2, (batch, tokens, cfg.bits_per_token), generator=g)
            return (
                dict(
                    hidden_states=inputs.to(device),
                    text_embeds=text.to(device),
                    text_mask=mask.to(device),
                    scale_schedule=schedule,
                    drop_text=drop.to(device),
                ),
                targets.to(device),
            )

        def loss(output, targets):
            return F.cross_entropy(output.logits.reshape(-1, 2), targets.reshape(-1))

    return transformer, make_batch, loss


def run(model: str, mode: str, checkpointing: bool, batch: int, steps: int, warmup: int, rank: int, device) -> dict:
    transformer, make_batch, loss_fn = build(model, device)
    bf16 = torch.device(device).type == "cuda"
    if mode == "lora":
        attach_lora(transformer, LoraSettings(base="", rank=rank), "bf16" if bf16 else "no")
    transformer.train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    params = trainable_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=bf16)
    record = {
        "model": model,
        "mode": mode,
        "gradient_checkpointing": checkpointing,
        "batch": batch,
        "trainable_parameters": sum(p.numel() for p in params),
        "parameters": sum(p.numel() for p in transformer.parameters()),
    }
    times = []
    try:
        for step in range(warmup + steps):
            if step == warmup and bf16:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            kwargs, targets = make_batch(batch)
            started = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(transformer(**kwargs), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if bf16:
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - started)
        step_s = statistics.median(times)
        record.update(status="ok", step_s=step_s, images_per_s=batch / step_s, loss=float(loss.detach()))
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if bf16 else float("nan")
    except torch.cuda.OutOfMemoryError:
        record.update(status="OOM")
    del transformer, optimizer, params
    gc.collect()
    if bf16:
        torch.cuda.empty_cache()
    return record


def time_generation(pipe, batch: int, repeats: int = 5) -> float:
    """Median seconds of one generation of ``batch`` images (CUDA generator: sampling inside the graphs)."""
    times = []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        pipe(
            class_labels=list(range(batch)),
            guidance_scale=1.5,
            top_k=900,
            top_p=0.96,
            output_type="latent",
            generator=torch.Generator("cuda").manual_seed(i),
        )
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def inference(rank: int, batch: int = 16) -> list[dict]:
    """VAR-d30 generation on the fast path: base, unfused adapter, fused adapter."""
    from diffusers_var import MultiScaleVQModel, VARPipeline
    from diffusers_var.loaders import lora_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = VARTransformer2DModel(depth=30, embed_dim=1920, num_heads=30, patch_nums=PATCH_NUMS_256)
        transformer.init_weights()
        vqvae = MultiScaleVQModel(patch_nums=PATCH_NUMS_256)
    pipe = VARPipeline(transformer=transformer.eval(), vqvae=vqvae.eval())
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_fast_inference()
    records = [{"part": "inference", "adapter": "none", "batch": batch, "seconds": time_generation(pipe, batch)}]
    transformer.add_adapter(lora_config(transformer, rank=rank))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.01)
                parameter.data = parameter.data.to(torch.bfloat16)
    records.append(
        {
            "part": "inference",
            "adapter": f"rank {rank}, unfused",
            "batch": batch,
            "seconds": time_generation(pipe, batch),
        }
    )
    pipe.fuse_lora()
    records.append(
        {
            "part": "inference",
            "adapter": f"rank {rank}, fused",
            "batch": batch,
            "seconds": time_generation(pipe, batch),
        }
    )
    for record in records:
        record["images_per_s"] = batch / record["seconds"]
        print(json.dumps(record), flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="var-d30", help="var-d30 | infinity-2b (tiny ones for --smoke)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: var-d30 16, infinity-2b 2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--out", default="outputs/bench-lora")
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny models, one step each")
    parser.add_argument("--inference", action="store_true", help="var-d30: also time the fast path with adapters")
    args = parser.parse_args(argv)
    if args.smoke:
        device, models, args.steps, args.warmup = "cpu", ["var-tiny", "infinity-tiny"], 1, 1
        batch = args.batch_size or 2
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        device, models = "cuda", [args.model]
        batch = args.batch_size or (16 if args.model.startswith("var") else 2)
    results = []
    for model in models:
        for mode in args.modes.split(","):
            for checkpointing in (False, True):
                record = run(model, mode, checkpointing, batch, args.steps, args.warmup, args.rank, device)
                results.append(record)
                print(json.dumps(record), flush=True)
    timings = inference(args.rank) if args.inference and not args.smoke else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "results-smoke.json" if args.smoke else f"results-{args.model}.json"
    environment = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    record = {"environment": environment, "results": results, "inference": timings}
    (out / name).write_text(json.dumps(record, indent=2))
    print("\n| model | mode | grad. ckpt | batch | trainable params | peak memory (GiB) | images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        memory = f"{r['peak_memory_gib']:.1f}" if r["status"] == "ok" else r["status"]
        speed = f"{r['images_per_s']:.2f}" if r["status"] == "ok" else "-"
        print(
            f"| {r['model']} | {r['mode']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['batch']} | "
            f"{r['trainable_parameters']:,} | {memory} | {speed} |"
        )
    if timings:
        print("\n| fast path (VAR-d30, bf16 + CUDA graphs) | batch | s / generation | images/s |\n|---|---|---|---|")
        for r in timings:
            print(f"| {r['adapter']} | {r['batch']} | {r['seconds']:.3f} | {r['images_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
