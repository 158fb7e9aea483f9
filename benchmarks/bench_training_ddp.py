#!/usr/bin/env python
"""Multi-GPU training on accelerate: throughput against one GPU, kill-and-resume, FSDP (run on a GPU host).

    python benchmarks/bench_training_ddp.py --gpus 2 --out outputs/ddp-bench

1. Throughput: VAR-d16 (the released width/depth, 310 M parameters) at 256 px on a released-configuration
   VQ-VAE with random weights (no download), bf16, batch 32 per GPU, on 1 GPU and on ``--gpus`` GPUs with
   ``configs/accelerate_ddp.yaml``; images/s are measured from the training log after the warm-up steps.
2. Resume under DDP: the small shapes VAR (``configs/var_shapes.yaml`` on ``pipelines/var-shapes/vqvae``) trained
   without interruption, and the same run SIGKILLed mid-way (after step 150), SIGKILLed again while writing
   checkpoint 200, then resumed to the end. The exported weights of both must agree.
3. FSDP: the same small VAR under ``configs/accelerate_fsdp.yaml``; the export must load and generate.

Prints a markdown table and writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def launch(
    out: Path,
    name: str,
    gpus: int,
    accelerate_config: str | None,
    overrides: list[str],
    fault: str | None = None,
    task_config: str = "configs/var_shapes.yaml",
) -> tuple[int, float]:
    """One ``accelerate launch`` of the VAR trainer; returns (exit code, wall seconds)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
    if accelerate_config:
        command += ["--config_file", str(REPO / accelerate_config)]
    else:
        command += ["--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    command += ["-m", "diffusers_var.training", "var", "--config", str(REPO / task_config), *overrides]
    env = dict(os.environ)
    env.pop("DIFFUSERS_VAR_FAULT_INJECT", None)
    if fault:
        env["DIFFUSERS_VAR_FAULT_INJECT"] = fault
    started = time.perf_counter()
    with open(out / f"{name}.log", "a") as log:
        code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return code, time.perf_counter() - started


def _clear(out: Path, name: str) -> None:
    """Remove an earlier run of the same name: its checkpoints would be resumed and its log appended to."""
    shutil.rmtree(out / name, ignore_errors=True)
    (out / f"{name}.log").unlink(missing_ok=True)


def steady_images_per_s(log_file: Path, batch_per_step: int, skip_steps: int) -> float:
    """Images/s between the first logged step after ``skip_steps`` and the last one (warm-up excluded)."""
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    # each record's images_per_s is cumulative since the start: recover elapsed time at each logged step
    elapsed = {r["step"]: r["step"] * batch_per_step / r["images_per_s"] for r in records}
    first = min(s for s in elapsed if s >= skip_steps)
    last = max(elapsed)
    return (last - first) * batch_per_step / (elapsed[last] - elapsed[first])


def exported_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--out", default="outputs/ddp-bench")
    parser.add_argument("--steps", type=int, default=120, help="throughput run length")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: throughput,resume,fsdp")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check of the script itself: one process, tiny models, short runs, no FSDP",
    )
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    ddp = None if args.smoke else "configs/accelerate_ddp.yaml"
    if args.smoke:
        args.gpus, args.steps = 1, 40
        skip.add("fsdp")
    total, every, kill_step, kill_checkpoint = (30, 10, 15, 20) if args.smoke else (300, 100, 150, 200)
    results: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "gpus": args.gpus}

    if "throughput" not in skip:
        from diffusers_var import MultiScaleVQModel

        torch.manual_seed(0)
        vq = MultiScaleVQModel(patch_nums=(1, 2, 4)) if args.smoke else MultiScaleVQModel()  # released config, random
        vq.save_pretrained(out / "vq256")
        size = (
            [
                "resolution=64",
                "data.num_images=256",
                "batch_size=4",
                "model.depth=2",
                "model.embed_dim=64",
                "model.num_heads=2",
            ]
            if args.smoke
            else [
                "resolution=256",
                "data.num_images=4096",
                "batch_size=32",
                "model.depth=16",
                "model.embed_dim=1024",
                "model.num_heads=16",
            ]
        )
        per_gpu_batch = int(size[2].split("=")[1])
        common = [
            f"tokenizer_path={out / 'vq256'}",
            *size,
            f"max_steps={args.steps}",
            "model.mlp_ratio=4.0",
            "warmup_steps=10",
            "checkpoint_every=100000",
            "ema_decay=null",
            "sample_every=0",
            "num_workers=4",
            "mixed_precision=" + ("no" if args.smoke else "bf16"),
        ]
        for gpus in sorted({1, args.gpus}):
            name = f"throughput-{gpus}gpu"
            _clear(out, name)
            code, wall = launch(out, name, gpus, ddp if gpus > 1 else None, [f"output_dir={out / name}", *common])
            if code != 0:
                results[name] = {"exit_code": code}
                continue
            ips = steady_images_per_s(out / name / "train_log.jsonl", per_gpu_batch * gpus, skip_steps=args.steps // 4)
            results[name] = {
                "images_per_s": ips,
                "per_gpu_batch": per_gpu_batch,
                "wall_s": wall,
                "model": "tiny (smoke)" if args.smoke else "VAR-d16 256px bf16",
            }
            print(name, results[name], flush=True)

    small = [
        "tokenizer_path=" + str(REPO / "pipelines" / "var-shapes" / "vqvae"),
        "data.num_images=8192",
        f"max_steps={total}",
        f"checkpoint_every={every}",
        "warmup_steps=20",
        "sample_every=0",
        "num_workers=2",
        "log_every=10",
    ] + (["batch_size=8", "mixed_precision=no", "model.depth=2"] if args.smoke else [])
    if "resume" not in skip:
        for name in ("uninterrupted", "interrupted"):
            _clear(out, name)
        code_a, wall_a = launch(out, "uninterrupted", args.gpus, ddp, [f"output_dir={out / 'uninterrupted'}", *small])
        run = [f"output_dir={out / 'interrupted'}", *small]
        codes = [
            launch(out, "interrupted", args.gpus, ddp, run, fault=f"step:{kill_step}")[0],
            launch(out, "interrupted", args.gpus, ddp, run, fault=f"checkpoint:{kill_checkpoint}")[0],
        ]
        leftovers = sorted(p.name for p in (out / "interrupted" / "checkpoints").iterdir())
        codes.append(launch(out, "interrupted", args.gpus, ddp, run)[0])
        entry = {"uninterrupted_exit": code_a, "interrupted_exits": codes, "checkpoints_after_kills": leftovers}
        if code_a == 0 and codes[-1] == 0:
            a, b = exported_weights(out / "uninterrupted"), exported_weights(out / "interrupted")
            entry["max_abs_weight_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
            entry["same_keys"] = sorted(a) == sorted(b)
            entry["final_loss"] = json.loads((out / "uninterrupted" / "train_log.jsonl").read_text().splitlines()[-1])[
                "loss"
            ]
            entry["ddp_images_per_s_small"] = json.loads(
                (out / "uninterrupted" / "train_log.jsonl").read_text().splitlines()[-1]
            )["images_per_s"]
        results["resume"] = entry
        print("resume", entry, flush=True)

    if "fsdp" not in skip:
        _clear(out, "fsdp")
        code, wall = launch(
            out,
            "fsdp",
            args.gpus,
            "configs/accelerate_fsdp.yaml",
            [
                f"output_dir={out / 'fsdp'}",
                *small,
                "max_steps=60",
                "checkpoint_every=30",
                "ema_decay=null",
                "sample_every=0",
            ],
        )  # FSDP takes neither EMA nor sample grids (the trainer says so)
        entry = {"exit_code": code, "wall_s": wall}
        if code == 0:
            from diffusers_var import VARPipeline

            pipe = VARPipeline.from_pretrained(out / "fsdp" / "final").to("cuda")
            pipe.set_progress_bar_config(disable=True)
            image = pipe(class_labels=[3], generator=torch.Generator("cuda").manual_seed(0), output_type="pt").images
            entry["generated"] = list(image.shape)
            log = (out / "fsdp" / "train_log.jsonl").read_text().splitlines()
            entry["loss_first_last"] = [json.loads(log[0])["loss"], json.loads(log[-1])["loss"]]
        results["fsdp"] = entry
        print("fsdp", entry, flush=True)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    one, many = results.get("throughput-1gpu", {}), results.get(f"throughput-{args.gpus}gpu", {})
    if "images_per_s" in one and "images_per_s" in many and args.gpus > 1:
        print(
            f"\n| GPUs | images/s | speed-up |\n|---|---|---|\n| 1 | {one['images_per_s']:.0f} | 1.00x |\n"
            f"| {args.gpus} | {many['images_per_s']:.0f} | {many['images_per_s'] / one['images_per_s']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
