#!/usr/bin/env python
"""Teach an embedded pipeline a shape it never saw with a LoRA, and measure it with the pixel judge (CPU is enough).

    python scripts/lora_concept.py --family var        # configs/lora_var_shapes.yaml, then the evaluation
    python scripts/lora_concept.py --family star
    python scripts/lora_concept.py --family infinity
    python scripts/lora_concept.py --family star --evaluate-only    # an existing outputs/lora-star-bar/final

The new concept is a "bar" (``diffusers_var.shapes.NEW_SHAPES``: a wide rectangle in any of the 6 colours on any
other background); the judge recognises it by its box (less than 0.8 times as high as wide). STAR and Infinity learn
it from captions ("a red bar on a blue background"). VAR is class-conditional and a LoRA adds no class ids: its
adapter re-purposes the 30 "square" class ids to draw bars (prior preservation keeps the other 60 classes).

Measured on 200 samples each, with the adapter loaded: the concept (bars asked for: the judge must find a bar of the
asked colour on the asked background), and the old classes (VAR: the 60 classes that are not re-purposed; STAR /
Infinity: all 90) against the base pipeline on the same prompts. Writes ``OUTPUT/evaluation.json`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers_var import InfinityPipeline, STARPipeline, VARPipeline, shapes  # noqa: E402
from diffusers_var.training import TrainConfig, train  # noqa: E402

FAMILIES = {  # pipeline class, base folder, sampling settings (as tests/test_embedded.py)
    "var": (VARPipeline, "pipelines/var-shapes", {}),
    "star": (STARPipeline, "pipelines/star-shapes", {"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0}),
    "infinity": (InfinityPipeline, "pipelines/infinity-shapes", {}),
}


def requests(family: str, concept: bool, n: int, replaces: str = "square") -> list[shapes.ShapeClass]:
    """The classes asked for: the concept's 30 colour / background pairs, or the old classes (VAR: the ones the
    adapter does not re-purpose), cycled to ``n``."""
    if concept:
        pool = shapes.concept_classes("bar")
    else:
        pool = [c for c in shapes.CLASSES if family != "var" or c.shape != replaces]
    return [pool[i % len(pool)] for i in range(n)]


def generate(
    pipe, family: str, asked: list[shapes.ShapeClass], sampling: dict, replaces: str = "square", chunk: int = 50
) -> torch.Tensor:
    images = []
    for start in range(0, len(asked), chunk):
        part = asked[start : start + chunk]
        if family == "var":  # a bar is asked for with the id of the square it replaces
            ids = [shapes.class_id(replaces if c.shape == "bar" else c.shape, c.color, c.background) for c in part]
            condition = {"class_labels": ids}
        else:
            condition = {"prompt": [c.caption for c in part]}
        out = pipe(**condition, **sampling, generator=torch.Generator().manual_seed(start), output_type="pt")
        images.append(out.images)
    return torch.cat(images)


def score(images: torch.Tensor, asked: list[shapes.ShapeClass]) -> dict:
    judged = shapes.judge_images(images)
    result = shapes.attribute_accuracy(judged, asked)
    result["bars_found"] = sum(1 for j in judged if j is not None and j.shape == "bar") / len(asked)
    return result


def evaluate(family: str, adapter: Path, n: int) -> dict:
    pipeline_class, base, sampling = FAMILIES[family]
    pipe = pipeline_class.from_pretrained(REPO / base, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    concept, old = requests(family, True, n), requests(family, False, n)
    results = {
        "base": {
            "concept": score(generate(pipe, family, concept, sampling), concept),
            "old": score(generate(pipe, family, old, sampling), old),
        }
    }
    pipe.load_lora_weights(adapter, adapter_name="concept")
    results["lora"] = {
        "concept": score(generate(pipe, family, concept, sampling), concept),
        "old": score(generate(pipe, family, old, sampling), old),
    }
    pipe.fuse_lora()
    results["lora_fused"] = {"concept": score(generate(pipe, family, concept, sampling), concept)}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="var")
    parser.add_argument("--config", default=None, help="default: configs/lora_<family>_shapes.yaml")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    args = parser.parse_args()
    config = TrainConfig.load(args.config or REPO / "configs" / f"lora_{args.family}_shapes.yaml", args.overrides)
    output = Path(config.output_dir)
    timing = {}
    if not args.evaluate_only:
        started = time.perf_counter()
        train(config)
        timing["train_s"] = time.perf_counter() - started
        log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
        timing.update(
            steps=log[-1]["step"],
            peak_memory_mb=max(r.get("peak_memory_mb", 0) for r in log),
            images_per_s=log[-1]["images_per_s"],
            final_loss=log[-1]["loss"],
        )
    started = time.perf_counter()
    results = evaluate(args.family, output / "final", args.num_samples)
    timing["evaluate_s"] = time.perf_counter() - started
    record = {
        "family": args.family,
        "num_samples": args.num_samples,
        "results": results,
        "timing": timing,
        "config": json.loads((output / "train_config.json").read_text()),
    }
    previous = output / "evaluation.json"
    if args.evaluate_only and previous.is_file():  # keep the training figures of the run that made the adapter
        record["timing"] = {**json.loads(previous.read_text()).get("timing", {}), **timing}
    previous.write_text(json.dumps(record, indent=2))
    rows = [("base", "concept"), ("base", "old"), ("lora", "concept"), ("lora", "old"), ("lora_fused", "concept")]
    print(f"| {args.family} | asked | bar found | shape | colour | background | all three |")
    print("|---|---|---|---|---|---|---|")
    for model, asked in rows:
        r = results[model][asked]
        print(
            f"| {model} | {asked} | {r['bars_found']:.3f} | {r['shape']:.3f} | {r['color']:.3f} | "
            f"{r['background']:.3f} | {r['all']:.3f} |"
        )
    print(json.dumps(record["timing"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
