#!/usr/bin/env python
"""Train, evaluate and package an embedded default pipeline on the generated shapes data (run on a GPU).

    python scripts/build_embedded.py --family var --out pipelines/var-shapes
    python scripts/build_embedded.py --family star --out pipelines/star-shapes  # uses pipelines/var-shapes/vqvae
    python scripts/build_embedded.py --family infinity --out pipelines/infinity-shapes

1. trains the tokenizer (VAR: configs/tokenizer_shapes.yaml, Infinity: configs/bitwise_tokenizer_shapes.yaml;
STAR reuses the embedded VAR tokenizer), 2. trains the transformer on it (configs/<family>_shapes.yaml),
3. measures quality on 200 samples with the pixel judge (class labels for VAR, captions for STAR / Infinity),
4. stores the pipeline in float16 (after checking it scores the same as float32) with a model card, atomically.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers_var import InfinityPipeline, STARPipeline, VARPipeline, shapes  # noqa: E402
from diffusers_var.conversion.common import atomic_save_pipeline  # noqa: E402
from diffusers_var.training import TrainConfig, train  # noqa: E402

# family: pipeline class, (tokenizer config or None), transformer config, sampling settings evaluated
FAMILIES = {
    "var": (
        VARPipeline,
        "tokenizer_shapes.yaml",
        "var_shapes.yaml",
        {
            "default": {},
            "cfg2_topk0_topp0": {"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0},
            "cfg4_more_smooth": {"guidance_scale": 4.0, "more_smooth": True},
        },
    ),
    "star": (
        STARPipeline,
        None,
        "star_shapes.yaml",
        {
            "default": {},
            "cfg2_topk0_topp0": {"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0},
        },
    ),
    "infinity": (
        InfinityPipeline,
        "bitwise_tokenizer_shapes.yaml",
        "infinity_shapes.yaml",
        {
            "default": {},
            "cfg2_tau1": {"guidance_scale": 2.0, "tau": 1.0},
        },
    ),
}


def evaluate(pipe, family: str, num_samples: int, **kwargs) -> dict:
    labels = [i % shapes.NUM_CLASSES for i in range(num_samples)]
    pipe.set_progress_bar_config(disable=True)
    condition = (
        {"class_labels": labels} if family == "var" else {"prompt": [shapes.CLASSES[i].caption for i in labels]}
    )
    images = pipe(**condition, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    return shapes.evaluate_generations(images, [shapes.CLASSES[i] for i in labels], images.shape[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="var")
    parser.add_argument("--work", default="outputs/embedded")
    parser.add_argument("--out", default="pipelines/var-shapes")
    parser.add_argument("--tokenizer-minutes", type=float, default=3.0)
    parser.add_argument("--transformer-minutes", type=float, default=4.0)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument(
        "--tokenizer-from",
        default=None,
        help="reuse the tokenizer of an earlier --work folder (its tokenizer/final, train_log.jsonl, "
        "train_config.json and, when present, timing.json)",
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both trainings")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    timings = {}

    pipeline_class, tokenizer_config, transformer_config, settings = FAMILIES[args.family]
    overrides = []
    tok_cfg = None
    tokenizer_work = Path(args.tokenizer_from) / "tokenizer" if args.tokenizer_from else work / "tokenizer"
    if tokenizer_config is not None and args.tokenizer_from:
        if not (tokenizer_work / "final").is_dir():
            raise ValueError(f"`--tokenizer-from`: {tokenizer_work / 'final'} does not exist.")
        overrides.append(f"tokenizer_path={tokenizer_work / 'final'}")
        reused_config = tokenizer_work / "train_config.json"  # the reused run's settings, for the model card
        tok_cfg = TrainConfig.load(reused_config if reused_config.is_file() else REPO / "configs" / tokenizer_config)
        timing = tokenizer_work / "timing.json"
        timings["tokenizer_s"] = json.loads(timing.read_text())["tokenizer_s"] if timing.is_file() else float("nan")
    elif tokenizer_config is not None:
        t0 = time.perf_counter()
        tok_cfg = TrainConfig.load(
            REPO / "configs" / tokenizer_config,
            [f"output_dir={work / 'tokenizer'}", f"time_limit_minutes={args.tokenizer_minutes}", *args.overrides],
        )
        overrides.append(f"tokenizer_path={train(tok_cfg)}")
        timings["tokenizer_s"] = time.perf_counter() - t0
        (tokenizer_work / "timing.json").write_text(json.dumps({"tokenizer_s": timings["tokenizer_s"]}))
    t0 = time.perf_counter()
    tr_cfg = TrainConfig.load(
        REPO / "configs" / transformer_config,
        [
            f"output_dir={work / 'transformer'}",
            f"time_limit_minutes={args.transformer_minutes}",
            *overrides,
            *args.overrides,
        ],
    )
    pipe_dir = train(tr_cfg)
    timings["transformer_s"] = time.perf_counter() - t0

    pipe = pipeline_class.from_pretrained(pipe_dir).to(device)
    results = {name: evaluate(pipe, args.family, args.num_samples, **kw) for name, kw in settings.items()}
    pipe16 = pipeline_class.from_pretrained(pipe_dir, dtype=torch.float16)
    tmp16 = work / "fp16"
    pipe16.save_pretrained(tmp16)
    reloaded = pipeline_class.from_pretrained(tmp16, dtype=torch.float32).to(device)
    results["default_from_fp16_weights"] = evaluate(reloaded, args.family, args.num_samples)

    runs = ["tokenizer", "transformer"] if tokenizer_config else ["transformer"]
    run_dirs = {"tokenizer": tokenizer_work, "transformer": work / "transformer"}
    steps = {
        name: json.loads((run_dirs[name] / "train_log.jsonl").read_text().splitlines()[-1])["step"] for name in runs
    }
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    trained = ", ".join(f"{steps[r]} {r} steps in {timings[r + '_s']:.0f} s" for r in runs)
    condition = (
        "class-conditional"
        if args.family == "var"
        else 'text-to-image (captions such as "a red circle on a blue background")'
    )
    num_classes = shapes.NUM_CLASSES
    tokenizer = tok_cfg.model if tokenizer_config else tr_cfg.tokenizer_path
    card = (
        f"""# {args.family}-shapes: embedded default {pipeline_class.__name__}

A small {condition} model trained by diffusers-var on its generated shapes dataset
(`diffusers_var.shapes`: {num_classes} classes = shape x colour x background, 64x64 px, random size and position).
Weights are stored in float16 (quality checked below against float32); load with `dtype=torch.float32` on a CPU.

- transformer config: {json.dumps(tr_cfg.model)}, {n_params:,} parameters; tokenizer: {tokenizer}
- training: `python scripts/build_embedded.py --family {args.family}` ({trained}) on {gpu}
- configs: {", ".join(f"`configs/{c}`" for c in (tokenizer_config, transformer_config) if c)}

## Measured quality ({args.num_samples} samples, labels i % {num_classes}, seed 0)
Judge: `diffusers_var.shapes.judge_images` (reads shape, colour and background from pixels; 100% on real samples).
Fréchet distance on 8x8 thumbnails against held-out real images of the same classes (real-vs-real floor shown).

| sampling | shape | colour | background | all three | Fréchet (thumbnails) | real-vs-real |
|---|---|---|---|---|---|---|
"""
        + "\n".join(
            f"| {name} {json.dumps(settings.get(name, {}))} | {r['shape']:.3f} | {r['color']:.3f} | "
            f"{r['background']:.3f} | {r['all']:.3f} | "
            f"{r['frechet_thumbnail']:.3f} | {r['frechet_thumbnail_real_vs_real']:.3f} |"
            for name, r in results.items()
        )
        + "\n"
    )
    (tmp16 / "README.md").write_text(card)
    (tmp16 / "evaluation.json").write_text(
        json.dumps({"results": results, "timings": timings, "steps": steps}, indent=2)
    )
    atomic_save_pipeline(_Copy(tmp16), args.out, overwrite=True)
    print(card)
    return 0


class _Copy:
    """Atomic copy of a finished folder through atomic_save_pipeline."""

    def __init__(self, folder: Path):
        self.folder = folder

    def save_pretrained(self, path, safe_serialization=True):
        import shutil

        shutil.copytree(self.folder, path, dirs_exist_ok=True)


if __name__ == "__main__":
    sys.exit(main())
