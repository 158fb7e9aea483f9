#!/usr/bin/env python
"""FID, Inception score and precision/recall (ADM's protocol, ``diffusers-var evaluate``) of the embedded pipelines
against their dataset, for their model cards. Needs the FID Inception weights (see ``diffusers-var evaluate --help``).

    python scripts/evaluate_embedded.py --inception-weights weights-inception-2015-12-05-6726825d.pth --device cuda
    python scripts/evaluate_embedded.py --families var --per-class 20 --device cpu        # smaller, on a CPU

For each family it runs ``diffusers-var sample`` (VAR: ``--per-class K`` over the 90 classes; STAR / Infinity: the 90
captions, ``--images-per-prompt K``; seed 0, the model card's sampling settings) and evaluates the samples against
90 K real images rendered by ``diffusers_var.shapes`` with the same class balance (another seed). A second real set
of that size gives the real-vs-real floor of each metric at this sample size. With ``--clip-model`` the text-to-image
families also get a CLIP score. Results go to ``OUT/<family>.json`` and, with ``--write-cards``, to
``pipelines/<name>/evaluation_adm.json`` and a table in each model card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers_var import shapes  # noqa: E402
from diffusers_var.cli import main as cli  # noqa: E402
from diffusers_var.sample import write_npz  # noqa: E402

# family: (folder, sampling flags of the card's recommended / default setting)
FAMILIES = {
    "var": ("var-shapes", []),
    "star": ("star-shapes", ["--guidance-scale", "2", "--top-k", "0", "--top-p", "0"]),
    "infinity": ("infinity-shapes", []),
}
CARD_START, CARD_END = "<!-- evaluate_embedded.py: start -->", "<!-- evaluate_embedded.py: end -->"


def real_images(count: int, resolution: int, seed: int) -> np.ndarray:
    """``count`` real images, class ``i % 90`` for image i (the samples' balance), from ``seed``."""
    rng = np.random.default_rng(seed)
    ids = np.arange(count) % shapes.NUM_CLASSES
    return np.concatenate(
        [
            shapes.render(
                ids[i : i + 1024], *shapes.sample_layout(rng, len(ids[i : i + 1024]), resolution), resolution
            )
            for i in range(0, count, 1024)
        ]
    )


def evaluate(arguments: list[str]) -> dict:
    output = Path(arguments[arguments.index("--out") + 1])
    if cli(["evaluate", *arguments]) != 0:
        raise SystemExit(f"evaluate failed: {' '.join(arguments)}")
    return json.loads(output.read_text())


def write_card(folder: Path, rows: dict) -> None:
    card = folder / "README.md"
    text = card.read_text()
    table = [
        CARD_START,
        "## FID, Inception score, precision / recall (ADM's protocol)",
        (
            "`diffusers-var evaluate` (FID Inception, ADM's evaluator) of `diffusers-var sample` outputs against real "
            "images of the same classes; `python scripts/evaluate_embedded.py` (the real-vs-real row is the floor at "
            "this sample size)."
        ),
        "",
        "| set | images | FID | Inception score | precision | recall | CLIP score |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        clip = f"{r['clip_score']:.2f}" if "clip_score" in r else "-"
        table.append(
            f"| {name} | {r['num_samples']} | {r['fid']:.3f} | {r['inception_score']:.3f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {clip} |"
        )
    table.append(CARD_END)
    block = "\n".join(table)
    if CARD_START in text:
        text = text[: text.index(CARD_START)] + block + text[text.index(CARD_END) + len(CARD_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    card.write_text(text)
    (folder / "evaluation_adm.json").write_text(json.dumps(rows, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="var,star,infinity")
    parser.add_argument("--per-class", type=int, default=100, help="images per class / caption (default 100: 9,000)")
    parser.add_argument("--inception-weights", default=None, help="default: torch-fidelity's cache file")
    parser.add_argument("--clip-model", default=None, help="also a CLIP score for STAR / Infinity (transformers CLIP)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="outputs/evaluate_embedded")
    parser.add_argument(
        "--write-cards", action="store_true", help="update pipelines/*/README.md and evaluation_adm.json"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    count = args.per_class * shapes.NUM_CLASSES
    common = ["--batch-size", str(args.batch_size)] + (["--device", args.device] if args.device else [])
    weights = ["--inception-weights", args.inception_weights] if args.inception_weights else []

    # The reference (seed 1) and a second real set (seed 2) for the floor; 64 px like the embedded models.
    for name, seed in (("reference", 1), ("real", 2)):
        if not (out / f"{name}.npz").is_file():
            images = real_images(count, 64, seed)
            write_npz(out / f"{name}.npz", {"arr_0": (images.shape, np.uint8, iter([images]))})
    stats = out / "reference_stats.npz"
    floor = evaluate(
        [
            "--samples",
            str(out / "real.npz"),
            "--reference",
            str(out / "reference.npz"),
            "--metrics",
            "fid,is,pr",
            "--save-reference-stats",
            str(stats),
            "--out",
            str(out / "real.json"),
            *weights,
            *common,
        ]
    )
    prompts = out / "captions.txt"
    prompts.write_text("".join(c.caption + "\n" for c in shapes.CLASSES))

    for family in args.families.split(","):
        folder, sampling = FAMILIES[family]
        samples = out / folder
        condition = (
            ["--per-class", str(args.per_class)]
            if family == "var"
            else ["--prompts", str(prompts), "--images-per-prompt", str(args.per_class)]
        )
        if (
            cli(
                [
                    "sample",
                    "--model",
                    str(REPO / "pipelines" / folder),
                    "--out",
                    str(samples),
                    "--seed",
                    "0",
                    *condition,
                    *sampling,
                    *common,
                ]
            )
            != 0
        ):
            raise SystemExit(f"sample failed for {family}")
        metrics = "fid,is,pr" + (",clip" if args.clip_model and family != "var" else "")
        result = evaluate(
            [
                "--samples",
                str(samples),
                "--reference",
                str(stats),
                "--metrics",
                metrics,
                "--out",
                str(out / f"{family}.json"),
                *weights,
                *common,
            ]
            + (["--clip-model", args.clip_model] if "clip" in metrics else [])
        )
        rows = {f"{folder} (seed 0{', ' + ' '.join(sampling) if sampling else ''})": result, "real vs real": floor}
        if args.write_cards:
            write_card(REPO / "pipelines" / folder, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
