#!/usr/bin/env python
"""Train, evaluate and package an embedded default pipeline on the generated shapes data (run on a GPU).

    python scripts/build_embedded.py --family var --work outputs/embedded --out pipelines/var-shapes

1. trains the tokenizer (configs/tokenizer_shapes.yaml), 2. trains the transformer on it
(configs/var_shapes.yaml), 3. measures quality on 200 samples with the pixel judge, 4. stores the pipeline
in float16 (after checking it scores the same as float32) with a model card, atomically.
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

from diffusers_var import VARPipeline, shapes  # noqa: E402
from diffusers_var.conversion.common import atomic_save_pipeline  # noqa: E402
from diffusers_var.training import TrainConfig, train  # noqa: E402

SETTINGS = {  # name: sampling kwargs evaluated; "default" = the pipeline's own defaults
    "default": {},
    "cfg2_topk0_topp0": {"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0},
    "cfg4_more_smooth": {"guidance_scale": 4.0, "more_smooth": True},
}


def evaluate(pipe: VARPipeline, num_samples: int, device: str, **kwargs) -> dict:
    labels = [i % shapes.NUM_CLASSES for i in range(num_samples)]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    return shapes.evaluate_generations(images, [shapes.CLASSES[i] for i in labels], images.shape[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["var"], default="var")
    parser.add_argument("--work", default="outputs/embedded")
    parser.add_argument("--out", default="pipelines/var-shapes")
    parser.add_argument("--tokenizer-minutes", type=float, default=3.0)
    parser.add_argument("--transformer-minutes", type=float, default=4.0)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both trainings")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    timings = {}

    t0 = time.perf_counter()
    tok_cfg = TrainConfig.load(REPO / "configs" / "tokenizer_shapes.yaml",
                               [f"output_dir={work / 'tokenizer'}", f"time_limit_minutes={args.tokenizer_minutes}", *args.overrides])
    tokenizer_dir = train(tok_cfg)
    timings["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    var_cfg = TrainConfig.load(REPO / "configs" / "var_shapes.yaml",
                               [f"output_dir={work / 'var'}", f"tokenizer_path={tokenizer_dir}",
                                f"time_limit_minutes={args.transformer_minutes}", *args.overrides])
    pipe_dir = train(var_cfg)
    timings["transformer_s"] = time.perf_counter() - t0

    pipe = VARPipeline.from_pretrained(pipe_dir).to(device)
    results = {name: evaluate(pipe, args.num_samples, device, **kw) for name, kw in SETTINGS.items()}
    pipe16 = VARPipeline.from_pretrained(pipe_dir, dtype=torch.float16)
    tmp16 = work / "fp16"
    pipe16.save_pretrained(tmp16)
    reloaded = VARPipeline.from_pretrained(tmp16, dtype=torch.float32).to(device)
    results["default_from_fp16_weights"] = evaluate(reloaded, args.num_samples, device)

    steps = {name: json.loads((work / name / "train_log.jsonl").read_text().splitlines()[-1])["step"] for name in ("tokenizer", "var")}
    card = f"""# var-shapes: embedded default VAR pipeline

A small class-conditional VAR trained by diffusers-var on its generated shapes dataset
(`diffusers_var.shapes`: {shapes.NUM_CLASSES} classes = shape x colour x background, 64x64 px, random size and position).
Weights are stored in float16 (quality checked below against float32); load with `dtype=torch.float32` on a CPU.

- tokenizer: `MultiScaleVQModel` {json.dumps({k: tok_cfg.model[k] for k in tok_cfg.model})}
- transformer: `VARTransformer2DModel` {json.dumps(var_cfg.model)}, {sum(p.numel() for p in pipe.transformer.parameters()):,} parameters
- training: `python scripts/build_embedded.py --family var` ({steps['tokenizer']} tokenizer steps in {timings['tokenizer_s']:.0f} s,
  {steps['var']} transformer steps in {timings['transformer_s']:.0f} s) on {torch.cuda.get_device_name() if device == 'cuda' else platform.processor()}
- configs: `configs/tokenizer_shapes.yaml`, `configs/var_shapes.yaml`

## Measured quality ({args.num_samples} samples, labels i % {shapes.NUM_CLASSES}, seed 0)
Judge: `diffusers_var.shapes.judge_images` (reads shape, colour and background from pixels; 100% on real samples).
Fréchet distance on 8x8 thumbnails against held-out real images of the same classes (real-vs-real floor shown).

| sampling | shape | colour | background | all three | Fréchet (thumbnails) | real-vs-real |
|---|---|---|---|---|---|---|
""" + "\n".join(
        f"| {name} {json.dumps(SETTINGS.get(name, {}))} | {r['shape']:.3f} | {r['color']:.3f} | {r['background']:.3f} | {r['all']:.3f} | "
        f"{r['frechet_thumbnail']:.3f} | {r['frechet_thumbnail_real_vs_real']:.3f} |" for name, r in results.items()
    ) + "\n"
    (tmp16 / "README.md").write_text(card)
    (tmp16 / "evaluation.json").write_text(json.dumps({"results": results, "timings": timings, "steps": steps}, indent=2))
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
