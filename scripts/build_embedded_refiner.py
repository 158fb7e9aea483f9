#!/usr/bin/env python
"""Evaluate and package CoDe's embedded refiner: a small VAR on the var-shapes tokenizer (trained on a CPU core).

    OMP_NUM_THREADS=1 diffusers-var train var --config configs/var_shapes_refiner.yaml     # ~45 min on one core
    OMP_NUM_THREADS=1 python scripts/build_embedded_refiner.py --run outputs/var-shapes-refiner

1. loads the exported refiner (``RUN/final``, the EMA weights) and the embedded drafter ``pipelines/var-shapes``;
2. measures quality with the pixel judge on ``--num-samples`` samples (labels i % 90, seed 0): var-shapes alone, the
   refiner alone, and CoDe (var-shapes drafts, the refiner refines) at every ``draft_steps``, from float16 weights as
   shipped;
3. times var-shapes alone and CoDe on the CPU (float32, this process's threads; median of ``--repeats``);
4. writes the refiner in float16 as a VARPipeline folder (``--out``, default ``pipelines/var-shapes-refiner``) with a
   model card and ``evaluation.json``, atomically.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers_var import VARCoDePipeline, VARPipeline, shapes  # noqa: E402
from diffusers_var.conversion.common import atomic_save_pipeline  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from build_embedded import _Copy  # noqa: E402  (the same atomic copy of a finished folder)


def evaluate(pipe, num_samples: int, **kwargs) -> dict:
    labels = [i % shapes.NUM_CLASSES for i in range(num_samples)]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    return shapes.evaluate_generations(images, [shapes.CLASSES[i] for i in labels], images.shape[-1])


def seconds_per_call(pipe, batch: int, repeats: int, **kwargs) -> float:
    pipe.set_progress_bar_config(disable=True)
    call = dict(class_labels=[i % shapes.NUM_CLASSES for i in range(batch)], output_type="pt", **kwargs)
    pipe(generator=torch.Generator().manual_seed(0), **call)  # warm-up
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        pipe(generator=torch.Generator().manual_seed(r), **call)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="outputs/var-shapes-refiner", help="training output folder (final/ inside)")
    parser.add_argument("--drafter", default=str(REPO / "pipelines" / "var-shapes"))
    parser.add_argument("--out", default=str(REPO / "pipelines" / "var-shapes-refiner"))
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--batch-sizes", default="1,16", help="CPU timing batches")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--training-time", default=None, help="how long the training took, for the model card")
    args = parser.parse_args()
    run = Path(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        # the shipped weights are float16: evaluate those (loaded as float32 for the CPU)
        VARPipeline.from_pretrained(run / "final", dtype=torch.float16).save_pretrained(Path(tmp) / "fp16")
        refiner = VARPipeline.from_pretrained(Path(tmp) / "fp16", dtype=torch.float32)
        drafter = VARPipeline.from_pretrained(args.drafter, dtype=torch.float32)
        code = VARCoDePipeline.from_var_pipelines(drafter, refiner)
        num_scales = len(code.scale_schedule())
        default_n = code.config.draft_steps
        results = {
            "var-shapes alone": evaluate(drafter, args.num_samples),
            "refiner alone": evaluate(refiner, args.num_samples),
        }
        for n in range(1, num_scales):
            results[f"CoDe draft_steps={n}"] = evaluate(code, args.num_samples, draft_steps=n)
        results[f"CoDe draft_steps={default_n}, cfg 2, top-k 0, top-p 0"] = evaluate(
            code, args.num_samples, guidance_scale=2.0, top_k=0, top_p=0.0
        )
        timings = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            alone = seconds_per_call(drafter, batch, args.repeats)
            timings[batch] = {"var-shapes": alone}
            for n in range(1, num_scales):
                timings[batch][f"CoDe N={n}"] = seconds_per_call(code, batch, args.repeats, draft_steps=n)
        out_tmp = Path(tmp) / "out"
        refiner16 = VARPipeline.from_pretrained(Path(tmp) / "fp16", dtype=torch.float16)
        refiner16.save_pretrained(out_tmp, safe_serialization=True)
        card, evaluation = (
            model_card(run, refiner, code, default_n, results, timings, args),
            {
                "results": results,
                "cpu_seconds_per_call": timings,
                "default_draft_steps": default_n,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
            },
        )
        (out_tmp / "README.md").write_text(card)
        (out_tmp / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
        atomic_save_pipeline(_Copy(out_tmp), args.out, overwrite=True)
    print(card)
    return 0


def model_card(
    run: Path, refiner: VARPipeline, code: VARCoDePipeline, default_n: int, results: dict, timings: dict, args
) -> str:
    config = json.loads((run / "train_config.json").read_text())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps, last = log[-1]["step"], log[-1]
    n_refiner = sum(p.numel() for p in refiner.transformer.parameters())
    n_drafter = sum(p.numel() for p in code.transformer.parameters())
    num_scales = len(code.scale_schedule())
    rows = "\n".join(
        f"| {name} | {r['shape']:.3f} | {r['color']:.3f} | {r['background']:.3f} | {r['all']:.3f} | "
        f"{r['frechet_thumbnail']:.3f} |"
        for name, r in results.items()
    )
    batches = list(timings)
    timing_rows = "\n".join(
        f"| {name} | "
        + " | ".join(
            f"{1000 * timings[b][name] / b:.1f} ms ({timings[b]['var-shapes'] / timings[b][name]:.2f}x)"
            for b in batches
        )
        + " |"
        for name in timings[batches[0]]
    )
    return (
        f"""# var-shapes-refiner: CoDe's embedded refiner for var-shapes

A small class-conditional VAR (depth {refiner.transformer.config.depth}, width {refiner.transformer.config.embed_dim},
{n_refiner:,} parameters; var-shapes: depth {code.transformer.config.depth}, {n_drafter:,}) trained by
diffusers-var on the var-shapes tokenizer and data, on one CPU core. It is a plain `VARPipeline` folder (its own copy
of the var-shapes tokenizer); with CoDe the embedded var-shapes drafts the coarse scales and this model the fine
ones:

```python
from diffusers_var import VARCoDePipeline, VARPipeline
drafter = VARPipeline.from_pretrained("pipelines/var-shapes", dtype=torch.float32)
refiner = VARPipeline.from_pretrained("pipelines/var-shapes-refiner", dtype=torch.float32)
pipe = VARCoDePipeline.from_var_pipelines(drafter, refiner)  # draft_steps {default_n} of {num_scales} by default
```

(`diffusers-var generate --refiner pipelines/var-shapes-refiner`, `diffusers-var demo --var-refiner default`.)
Weights are stored in float16 (every figure below is measured from them); load with `dtype=torch.float32` on a CPU.

- training: `diffusers-var train var --config configs/var_shapes_refiner.yaml` ({steps} steps of batch
  {config["batch_size"]}, last logged loss {last["loss"]:.3f}, token accuracy {last["token_accuracy"]:.3f};
  `data.cache_tokens` encodes the {config["data"]["num_images"]} images once), on one CPU core shared with other jobs
- started from var-shapes' embeddings, head and blocks `init_blocks` (config `model.init_from`), then trained as an
  ordinary VAR on all scales: nothing in its training is specific to CoDe's refiner role
- training time: {args.training_time or "see the training log"}

## Quality ({args.num_samples} samples, labels i % {shapes.NUM_CLASSES}, seed 0, pipeline defaults unless stated)
Judge: `diffusers_var.shapes.judge_images` (shape, colour and background read from pixels; 100% on real samples).
Fréchet distance on 8x8 thumbnails against held-out real images (real-vs-real floor
{results["var-shapes alone"]["frechet_thumbnail_real_vs_real"]:.3f}).

| sampling | shape | colour | background | all three | Fréchet (thumbnails) |
|---|---|---|---|---|---|
{rows}

## CPU speed (float32, {torch.get_num_threads()} thread(s), median of {args.repeats} calls)
Milliseconds per image, and the speed-up over var-shapes alone.

| pipeline | """
        + " | ".join(f"batch {b}" for b in batches)
        + """ |
|---|"""
        + "---|" * len(batches)
        + f"""
{timing_rows}
"""
    )


if __name__ == "__main__":
    sys.exit(main())
