#!/usr/bin/env python
"""Zero-shot editing quality of the embedded pipelines, judged from pixels (``diffusers_var.shapes``).

    python scripts/evaluate_editing.py                                   # all three families, 200 edits each
    python scripts/evaluate_editing.py --families var --num-images 50 --out /tmp/editing
    python scripts/evaluate_editing.py --families var --model /tmp/var-edit --out /tmp/editing   # another folder

Real images of the shapes dataset (held-out seed, never seen in training) are edited by each family's in-painting
pipeline:

* **edit**: the shape's bounding box is masked (a pixel mask; the pipeline generates every latent cell it touches) and
  another shape in another colour is asked for, on the same background (VAR: its class; STAR / Infinity: its
  caption). Success: the judge reads the requested shape and colour. Background: the judge reads the original
  background colour (``background_judge``), and ``outside_pixels_kept`` is the share of the pixels outside the
  generated cells whose nearest palette colour is the original's (the coarse scales' new tokens inside the box
  reach further out: the kept fine tokens are residuals on top of them).
* **edit_margin**: the same box with ``mask_dilation=--mask-dilation`` (one latent cell by default): the pipeline
  also generates the cells around the box, so the new shape's edges are not drawn from the old one's neighbours.
* **ceiling** (``--ceiling``): no model at all. The edited image that the request describes (``shapes.edit_pairs``:
  the target shape in the box) is tokenised with the input's tokens kept where the pipeline keeps them, and decoded:
  the best any model can do under the pipeline's keep rule, for ``mask_dilation`` 0 and ``--mask-dilation``.
* **outpaint**: the outer band (``--band`` pixels) is masked and the original class / caption asked for. Success:
  the judge still reads the original shape and colour (``shape_and_color``; ``all`` adds the background).

Writes ``editing_evaluation.json`` per family into ``--out/<family>`` (default: the pipeline folders, next to their
``evaluation.json``) and prints a Markdown table. Deterministic for a seed (CPU generator).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers_var import InfinityInpaintPipeline, STARInpaintPipeline, VARInpaintPipeline, shapes  # noqa: E402

# family -> (in-painting class, embedded folder, sampling arguments: the model card's recommended ones)
FAMILIES = {
    "var": (VARInpaintPipeline, REPO / "pipelines" / "var-shapes", {}),
    "star": (
        STARInpaintPipeline,
        REPO / "pipelines" / "star-shapes",
        {"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0},
    ),
    "infinity": (InfinityInpaintPipeline, REPO / "pipelines" / "infinity-shapes", {}),
}
EVAL_SEED = 2024  # the images' seed: the embedded models were trained on seed 0


class EditSet(shapes.EditPairs):
    """:class:`diffusers_var.shapes.EditPairs` with the pixels the evaluation feeds the pipelines."""

    def pixels(self) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1]."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255


def make_edit_set(num_images: int, resolution: int = 64, seed: int = EVAL_SEED) -> EditSet:
    """``num_images`` rendered shapes and an edit request for each (:func:`diffusers_var.shapes.edit_pairs`)."""
    pairs = shapes.edit_pairs(np.random.default_rng(seed), num_images, resolution)
    return EditSet(**vars(pairs))


def condition_of(family: str, classes: list) -> dict:
    """The pipeline's condition for the wanted classes: VAR class labels, STAR / Infinity captions."""
    if family == "var":
        return {"class_labels": [shapes.class_id(c.shape, c.color, c.background) for c in classes]}
    return {"prompt": [c.caption for c in classes]}


def edit(
    pipe, family: str, images: torch.Tensor, masks: torch.Tensor, classes: list, seed: int, batch_size: int, **call
) -> np.ndarray:
    """In-paint ``masks`` of ``images`` for ``classes`` in batches; uint8 (N, H, W, 3)."""
    outputs = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(classes), batch_size):
        part = slice(start, start + batch_size)
        out = pipe(
            **condition_of(family, classes[part]),
            image=images[part],
            mask_image=masks[part],
            generator=generator,
            output_type="np",
            **call,
        ).images
        outputs.append((out * 255).round().astype(np.uint8))
    return np.concatenate(outputs)


def nearest_palette(images: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of every pixel: (N, H, W)."""
    palette = np.array([shapes.COLORS[c] for c in shapes.COLOR_NAMES], dtype=np.float32)
    return ((images.astype(np.float32)[..., None, :] - palette) ** 2).sum(-1).argmin(-1)


def generated_pixels(pipe, masks: torch.Tensor, mask_dilation: int = 0) -> np.ndarray:
    """(N, H, W) bool: the pixels of the latent cells the pipeline generates for pixel ``masks``."""
    schedule = pipe._edit_schedule()
    cells = ~pipe.prepare_mask_keep(masks, schedule, len(masks), 1, "cpu", mask_dilation)[-1]
    scale = masks.shape[-1] // schedule[-1][1]
    return cells.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()


def judged_figures(edited: np.ndarray, edit_set: EditSet, outside: np.ndarray) -> dict:
    """The judge's reading of edits of ``edit_set`` (module docstring); ``outside``: the pixels not generated."""
    n = len(edit_set.targets)
    judged = shapes.judge_images(edited)
    same_colour = nearest_palette(edited) == nearest_palette(edit_set.images)
    hit = lambda ok: sum(bool(ok(j, t, o)) for j, t, o in zip(judged, edit_set.targets, edit_set.originals)) / n  # noqa: E731
    # over the images with pixels outside the generated cells (a grown box may cover a whole image)
    kept = [same[out].mean() for same, out in zip(same_colour, outside) if out.any()]
    return {
        "shape_and_color": hit(lambda j, t, o: j is not None and (j.shape, j.color) == (t.shape, t.color)),
        "shape": hit(lambda j, t, o: j is not None and j.shape == t.shape),
        "color": hit(lambda j, t, o: j is not None and j.color == t.color),
        "background_judge": hit(lambda j, t, o: j is not None and j.background == o.background),
        "outside_pixels_kept": float(np.mean(kept)) if kept else 1.0,
        "num_images": n,
    }


def edit_figures(
    pipe, family: str, edit_set: EditSet, seed: int, batch_size: int, mask_dilation: int = 0, **sampling
) -> tuple[dict, np.ndarray]:
    """Ask for each image's target inside its box: the figures (module docstring) and the edited images."""
    masks = edit_set.box_masks()
    edited = edit(
        pipe,
        family,
        edit_set.pixels(),
        masks,
        edit_set.targets,
        seed,
        batch_size,
        mask_dilation=mask_dilation,
        **sampling,
    )
    figures = judged_figures(edited, edit_set, ~generated_pixels(pipe, masks, mask_dilation))
    return {**figures, "mask_dilation": mask_dilation}, edited


@torch.no_grad()
def ceiling_figures(pipe, edit_set: EditSet, mask_dilation: int = 0) -> dict:
    """The judge on the decoded ideal pyramid of every edit: the edited image's tokens wherever the pipeline samples,
    the input's wherever it keeps them (no model involved)."""
    schedule = [tuple(hw) for hw in pipe._edit_schedule()]
    masks = edit_set.box_masks()
    keep = pipe.prepare_mask_keep(masks, schedule, len(masks), 1, "cpu", mask_dilation)
    to_pixels = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # noqa: E731
    inputs, targets = to_pixels(edit_set.images), to_pixels(edit_set.edited)
    if hasattr(pipe, "vqvae"):
        vq = pipe.vqvae
        decoded = vq.decode_indices(vq.encode_indices_keeping(targets, vq.encode_indices(inputs), keep))
    else:
        vae = pipe.vae
        kept = vae.encode(inputs, schedule).bit_labels
        _, labels = vae.teacher_forcing_inputs(vae.encode_features(targets), schedule, keep=keep, kept_bit_labels=kept)
        per_scale = labels.split([h * w for h, w in schedule], dim=1)
        bits = [
            vae.token_bits_to_latent_bits(b.view(b.shape[0], h, w, -1)).permute(0, 2, 3, 1)
            for b, (h, w) in zip(per_scale, schedule)
        ]
        decoded = vae.decode_bit_labels(bits)
    images = ((decoded + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    figures = judged_figures(images, edit_set, ~generated_pixels(pipe, masks, mask_dilation))
    return {**figures, "mask_dilation": mask_dilation}


def evaluate_family(
    family: str,
    edit_set: EditSet,
    pipe=None,
    band: int = 8,
    mask_dilation: int = 1,
    seed: int = 0,
    batch_size: int = 50,
    ceiling: bool = False,
    model=None,
    **sampling,
) -> tuple[dict, dict]:
    """The figures of one family and the images (``{"edit": ..., "edit_margin": ..., "outpaint": ...}``); no
    ``edit_margin`` for ``mask_dilation=0``. ``model``: a folder of the family (default: the embedded one)."""
    pipeline_class, folder, recommended = FAMILIES[family]
    if pipe is None:
        pipe = pipeline_class.from_pretrained(model or folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sampling = {**recommended, **sampling}
    images, n = edit_set.pixels(), len(edit_set.targets)
    start = time.perf_counter()
    results, outputs = {}, {}
    results["edit"], outputs["edit"] = edit_figures(pipe, family, edit_set, seed, batch_size, **sampling)
    if mask_dilation:
        results["edit_margin"], outputs["edit_margin"] = edit_figures(
            pipe, family, edit_set, seed, batch_size, mask_dilation, **sampling
        )
    if ceiling:
        results["ceiling"] = [ceiling_figures(pipe, edit_set, d) for d in sorted({0, mask_dilation})]

    band_masks = edit_set.band_masks(band)
    outpainted = edit(pipe, family, images, band_masks, edit_set.originals, seed + 1, batch_size, **sampling)
    judged_out = shapes.judge_images(outpainted)
    kept = [j is not None and (j.shape, j.color) == (o.shape, o.color) for j, o in zip(judged_out, edit_set.originals)]
    results["outpaint"] = {
        "shape_and_color": sum(kept) / n,
        "all": sum(j == o for j, o in zip(judged_out, edit_set.originals)) / n,
        "band_pixels": band,
        "num_images": n,
    }
    outputs["outpaint"] = outpainted
    results["sampling"] = sampling
    results["model"] = str(model or folder.relative_to(REPO))
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results, outputs


def markdown_table(all_results: dict) -> str:
    rows = [
        "| family | edit: requested shape + colour | edit: background (judge) | edit: pixels outside kept | "
        "edit, mask_dilation: shape + colour / background | out-paint: shape + colour kept | out-paint: all three | "
        "ceiling (no model): shape + colour | sampling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, r in all_results.items():
        e, o = r["edit"], r["outpaint"]
        m = r.get("edit_margin")
        margin = f"{m['shape_and_color']:.3f} / {m['background_judge']:.3f} ({m['mask_dilation']})" if m else "-"
        ceiling = ", ".join(f"{c['shape_and_color']:.3f} ({c['mask_dilation']})" for c in r.get("ceiling", [])) or "-"
        rows.append(
            f"| {family} | {e['shape_and_color']:.3f} | {e['background_judge']:.3f} | "
            f"{e['outside_pixels_kept']:.3f} | {margin} | {o['shape_and_color']:.3f} | {o['all']:.3f} | "
            f"{ceiling} | `{json.dumps(r['sampling'])}` |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (the images use a fixed held-out seed)")
    parser.add_argument("--band", type=int, default=8, help="out-painting: width of the masked outer band in pixels")
    parser.add_argument(
        "--mask-dilation", type=int, default=1, help="edit_margin: latent cells generated around the box (0: skip)"
    )
    parser.add_argument("--ceiling", action="store_true", help="also the decoded ideal pyramids (no model)")
    parser.add_argument("--model", default=None, help="a pipeline folder of the one family (default: the embedded)")
    parser.add_argument("--sampling", default="{}", help="sampling arguments as JSON, e.g. '{\"top_k\": 1}'")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument(
        "--out", default=None, help="folder for <family>/editing_evaluation.json (default: the pipeline folders)"
    )
    args = parser.parse_args(argv)
    if args.model and len(args.families) != 1:
        parser.error("`--model` is a folder of one family: pass `--families` with that family alone.")
    if args.model and not args.out:
        parser.error("`--model`: pass `--out` too (the embedded folders keep the embedded models' figures).")
    if args.mask_dilation < 0:
        parser.error("`--mask-dilation` must be >= 0.")
    try:
        sampling = json.loads(args.sampling)
    except json.JSONDecodeError as err:
        parser.error(f"`--sampling` must be a JSON object: {err}")
    torch.set_grad_enabled(False)
    edit_set = make_edit_set(args.num_images)
    all_results = {}
    for family in args.families:
        results, _ = evaluate_family(
            family,
            edit_set,
            band=args.band,
            mask_dilation=args.mask_dilation,
            seed=args.seed,
            batch_size=args.batch_size,
            ceiling=args.ceiling,
            model=args.model,
            **sampling,
        )
        all_results[family] = results
        folder = Path(args.out) / family if args.out else FAMILIES[family][1]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "editing_evaluation.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"{family}: {json.dumps(results)}", flush=True)
    print(markdown_table(all_results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
