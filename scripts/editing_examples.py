#!/usr/bin/env python
"""The README's editing pictures (docs/inpainting.png, docs/outpainting.png, docs/img2img.png), made by the embedded
pipelines on the CPU: one row per family (VAR, STAR, Infinity), columns input | mask (grey = generated latent
cells; in-painting: the circle's box with ``--mask-dilation``) | seed 0 | seed 1 (not selected: the first two
seeds).

    python scripts/editing_examples.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers_var import (  # noqa: E402
    InfinityImg2ImgPipeline,
    InfinityInpaintPipeline,
    InfinityPipeline,
    STARImg2ImgPipeline,
    STARInpaintPipeline,
    STARPipeline,
    VARImg2ImgPipeline,
    VARInpaintPipeline,
    VARPipeline,
    shapes,
)

FAMILIES = {  # family -> (plain, in-paint, image-to-image, folder, sampling)
    "var": (VARPipeline, VARInpaintPipeline, VARImg2ImgPipeline, "var-shapes", {}),
    "star": (
        STARPipeline,
        STARInpaintPipeline,
        STARImg2ImgPipeline,
        "star-shapes",
        {"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0},
    ),
    "infinity": (InfinityPipeline, InfinityInpaintPipeline, InfinityImg2ImgPipeline, "infinity-shapes", {}),
}
SCALE = 2  # pixels per image pixel in the figures


def scene(shape: str, color: str, background: str, size: float, center: tuple[float, float]) -> np.ndarray:
    ids = np.array([shapes.class_id(shape, color, background)])
    return shapes.render(ids, np.array([size], dtype=np.float32), np.array([center], dtype=np.float32), 64)[0]


def condition(family: str, target: shapes.ShapeClass, pipe) -> dict:
    if family == "var":
        return {"class_labels": [shapes.class_id(target.shape, target.color, target.background)]}
    return {"prompt": target.caption}


def run(pipe, family, target, seed, sampling, **kwargs) -> np.ndarray:
    out = pipe(
        **condition(family, target, pipe),
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **sampling,
        **kwargs,
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def mask_view(image: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The image with the generated latent cells greyed out."""
    pixels = np.kron(cells, np.ones((64 // cells.shape[0], 64 // cells.shape[1]), dtype=bool))
    return np.where(pixels[..., None], (image * 0.3 + 128 * 0.7).astype(np.uint8), image)


def sheet(rows: list[list[np.ndarray]]) -> PIL.Image.Image:
    gap = 4
    h, w = 64 * SCALE, 64 * SCALE
    canvas = np.full((len(rows) * (h + gap) - gap, len(rows[0]) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = np.kron(
                image, np.ones((SCALE, SCALE, 1), dtype=np.uint8)
            )
    return PIL.Image.fromarray(canvas)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--mask-dilation", type=int, default=2, help="of the in-painting row (the measured setting)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = scene("circle", "red", "blue", 15.0, (30.0, 34.0))
    box = np.zeros((64, 64), dtype=bool)
    box[13:48, 17:52] = True  # the circle's bounding box (and a pixel)
    inpaint_target = shapes.ShapeClass("triangle", "yellow", "blue")
    corner = scene("square", "white", "green", 13.0, (32.0, 32.0))
    img2img_target = shapes.ShapeClass("square", "red", "green")
    figures = {"inpainting": [], "outpainting": [], "img2img": []}
    dilation = {"mask_dilation": args.mask_dilation}
    for family, (plain_class, inpaint_class, img2img_class, folder, sampling) in FAMILIES.items():
        plain = plain_class.from_pretrained(REPO / "pipelines" / folder, dtype=torch.float32)
        inpaint, img2img = inpaint_class.from_pipe(plain), img2img_class.from_pipe(plain)
        for pipe in (inpaint, img2img):
            pipe.set_progress_bar_config(disable=True)
        schedule = inpaint._edit_schedule()
        cells = ~inpaint.prepare_mask_keep(box, schedule, 1, 1, "cpu", args.mask_dilation)[-1][0].numpy()
        figures["inpainting"].append(
            [image, mask_view(image, cells)]
            + [
                run(inpaint, family, inpaint_target, seed, sampling, image=image, mask_image=box, **dilation)
                for seed in (0, 1)
            ]
        )
        band = inpaint.box_mask(0.125, 0.125, 0.875, 0.875, inpainting=False)
        original = shapes.ShapeClass("circle", "red", "blue")
        figures["outpainting"].append(
            [image, mask_view(image, band.numpy())]
            + [run(inpaint, family, original, seed, sampling, image=image, mask_image=band) for seed in (0, 1)]
        )
        figures["img2img"].append(
            [corner]
            + [
                run(img2img, family, img2img_target, 0, sampling, image=corner, strength=strength)
                for strength in (0.5, 0.67, 1.0)
            ]
        )
    for name, rows in figures.items():
        sheet(rows).save(out / f"{name}.png", optimize=True)
        print(f"saved {out / name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
