#!/usr/bin/env python
"""Fine-tune an embedded pipeline's transformer for in-painting / editing (CPU is enough), on token pyramids that
keep an input image's tokens the way the in-painting pipelines do.

    python scripts/finetune_editing.py --family var --out /tmp/var-edit          # then check the folder, and
    python scripts/finetune_editing.py --family var --evaluate /tmp/var-edit    # generation and editing figures

Why: the embedded models saw whole images only. In an edit their coarse scales keep the old shape's tokens (the
notebook's rule keeps a token unless the mask covers most of it) and the model, conditioned on the new class, still
follows the old outline. Here each training example is what an edit sees:

* an **edit** (``--edit-share``): a real shape image (the input), its shape's bounding box as the mask (grown by
  one latent cell in ``--grow-share`` of them: the decoder draws a cell from its neighbours too, so a new shape needs
  a margin of generated cells), and the request of :func:`diffusers_var.shapes.edit_pairs`: another shape in another
  colour on the same background. The target pyramid keeps the input's tokens where the pipeline keeps them (per
  scale, the notebook's rule) and quantises the rest from the residual of the edited image
  (``encode_indices_keeping``; Infinity: ``teacher_forcing_inputs(keep=...)``). The loss covers the generated
  tokens only: the kept ones are the input's whatever the model says.
* an **out-paint** (``--outpaint-share``): the outer band is masked and the image itself is the target.
* a **plain** example (the rest): the whole pyramid of a shape image, as in the original training, so that
  generation stays as it was.

Condition dropout for classifier-free guidance is the original training's (VAR: the transformer's own label drop;
STAR: empty captions; Infinity: the learned unconditional rows), 10%. The weights are an exponential moving average
(``--ema``). Writes ``--out``: a copy of the source folder whose transformer is the fine-tuned one (safetensors,
float16 like the embedded folders; every other file unchanged).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers_var import (  # noqa: E402
    InfinityInpaintPipeline,
    InfinityPipeline,
    STARInpaintPipeline,
    STARPipeline,
    VARInpaintPipeline,
    VARPipeline,
    shapes,
)

FAMILIES = {  # pipeline class, in-painting class (its schedule), embedded folder
    "var": (VARPipeline, VARInpaintPipeline, REPO / "pipelines" / "var-shapes"),
    "star": (STARPipeline, STARInpaintPipeline, REPO / "pipelines" / "star-shapes"),
    "infinity": (InfinityPipeline, InfinityInpaintPipeline, REPO / "pipelines" / "infinity-shapes"),
}
COND_DROP = 0.1
OUTPAINT_BAND = 8  # pixels, as scripts/evaluate_editing.py


def training_batch(rng: np.random.Generator, n: int, resolution: int, cell: int, args) -> dict:
    """``n`` examples: inputs and targets in [-1, 1] (N, 3, H, W), pixel masks (N, H, W) bool (True = generate),
    ``edited`` (N,) bool (False: a plain example, the whole pyramid is the target) and the targets' classes."""
    pairs = shapes.edit_pairs(rng, n, resolution)
    kind = rng.choice(3, n, p=[args.edit_share, args.outpaint_share, 1 - args.edit_share - args.outpaint_share])
    grown = torch.from_numpy(rng.random(n) < args.grow_share)[:, None, None]
    edit, outpaint = torch.from_numpy(kind == 0)[:, None, None], torch.from_numpy(kind == 1)[:, None, None]
    boxes = torch.where(grown, pairs.box_masks(cell), pairs.box_masks())
    masks = torch.where(edit, boxes, outpaint & pairs.band_masks(OUTPAINT_BAND))
    # out-paints and plain examples are their own targets
    targets = np.where((kind == 0)[:, None, None, None], pairs.edited, pairs.images)
    classes = [t if k == 0 else o for k, t, o in zip(kind, pairs.targets, pairs.originals)]

    def to_pixels(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)

    return {
        "inputs": to_pixels(pairs.images),
        "targets": to_pixels(targets),
        "masks": masks,
        "edited": torch.from_numpy(kind < 2),
        "classes": classes,
    }


def keep_masks(pipe, batch: dict, schedule) -> list[torch.Tensor]:
    """Per scale (N, h, w) bool: where the in-painting pipeline ``pipe`` keeps the input's tokens for the batch's
    masks (its own rule); nothing is kept for plain examples."""
    keep = pipe.prepare_mask_keep(batch["masks"], schedule, len(batch["masks"]), 1, "cpu")
    return [k & batch["edited"][:, None, None] for k in keep]


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions with weight 1 (``logits`` (..., K), ``labels`` and ``weights`` (...))."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    weights = weights.reshape(-1).float()
    return (losses * weights).sum() / weights.sum().clamp_min(1)


def captions(classes: list, rng: np.random.Generator) -> list[str]:
    """Captions with condition dropout (``""``)."""
    return ["" if rng.random() < COND_DROP else c.caption for c in classes]


@torch.no_grad()
def vq_edit_pyramid(pipe, batch: dict, schedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAR / STAR: the teacher-forcing input, the target tokens (N, L) and the loss weights (N, L) of a batch."""
    vq, keep = pipe.vqvae, keep_masks(pipe, batch, schedule)
    tokens = vq.encode_indices_keeping(batch["targets"], vq.encode_indices(batch["inputs"]), keep)
    weights = torch.cat([~k.flatten(1) for k in keep], dim=1)
    return vq.teacher_forcing_input(tokens), torch.cat(tokens, dim=1), weights


def var_loss(pipe, model, batch: dict, schedule, rng) -> torch.Tensor:
    tf_input, targets, weights = vq_edit_pyramid(pipe, batch, schedule)
    labels = torch.tensor([shapes.class_id(c.shape, c.color, c.background) for c in batch["classes"]])
    logits = model(labels, tf_input, drop_labels=True).logits
    return masked_cross_entropy(logits, targets, weights)


def star_loss(pipe, model, batch: dict, schedule, rng) -> torch.Tensor:
    tf_input, targets, weights = vq_edit_pyramid(pipe, batch, schedule)
    with torch.no_grad():
        hidden, mask, pooled = pipe.encode_text(captions(batch["classes"], rng), "cpu")
    logits = model(tf_input, hidden, mask, pooled).logits
    return masked_cross_entropy(logits, targets, weights)


def infinity_loss(pipe, model, batch: dict, schedule, rng) -> torch.Tensor:
    vae = pipe.vae
    keep = keep_masks(pipe, batch, schedule)
    with torch.no_grad():
        kept = vae.encode(batch["inputs"], schedule).bit_labels
        inputs, labels = vae.teacher_forcing_inputs(
            vae.encode_features(batch["targets"]), schedule, keep=keep, kept_bit_labels=kept
        )
        embeds, text_mask, _, _ = pipe.encode_prompt(
            [c.caption for c in batch["classes"]], "cpu", do_classifier_free_guidance=False
        )
    drop = torch.from_numpy(rng.random(len(batch["classes"])) < COND_DROP)
    logits = model(inputs, embeds, text_mask, schedule, drop_text=drop).logits.view(*labels.shape, 2)
    weights = torch.cat([~k.flatten(1) for k in keep], dim=1)[..., None].expand(labels.shape)
    return masked_cross_entropy(logits, labels.long(), weights)


LOSSES = {"var": var_loss, "star": star_loss, "infinity": infinity_loss}


def _script(name: str):
    """Another script of this folder as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def evaluate(family: str, folder: Path, num_images: int = 200) -> dict:
    """Generation with the model card's sampling settings (``build_embedded.py``: 200 samples, the pixel judge) and
    editing (``evaluate_editing.py``: tight box, ``mask_dilation`` 1 and 2, out-painting) of the pipeline in
    ``folder``."""
    build, editing = _script("build_embedded"), _script("evaluate_editing")
    pipeline_class, _, _, settings = build.FAMILIES[family]
    pipe = pipeline_class.from_pretrained(folder, dtype=torch.float32)
    generation = {name: build.evaluate(pipe, family, num_images, **kwargs) for name, kwargs in settings.items()}
    edit_set = editing.make_edit_set(num_images)
    inpaint = editing.FAMILIES[family][0].from_pipe(pipe)
    results, _ = editing.evaluate_family(family, edit_set, pipe=inpaint, mask_dilation=1)
    margin2, _ = editing.edit_figures(inpaint, family, edit_set, 0, 50, 2, **results["sampling"])
    results["model"] = str(folder)
    return {"generation": generation, "editing": {**results, "edit_margin_2": margin2}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(FAMILIES), required=True)
    parser.add_argument(
        "--evaluate",
        default=None,
        metavar="FOLDER",
        help="no training: measure generation and editing of FOLDER (a pipeline of --family) and write "
        "FOLDER/edit_finetuning.json",
    )
    parser.add_argument("--model", default=None, help="the pipeline folder to start from (default: the embedded one)")
    parser.add_argument("--out", default=None, help="folder for the fine-tuned pipeline (must not exist)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the exported weights (0: none)")
    parser.add_argument("--edit-share", type=float, default=0.5)
    parser.add_argument("--outpaint-share", type=float, default=0.1)
    parser.add_argument("--grow-share", type=float, default=0.7, help="edits whose box grows by one latent cell")
    parser.add_argument("--seed", type=int, default=0, help="the training images' seed (the evaluation uses 2024)")
    parser.add_argument("--save-every", type=int, default=0, help="also write OUT-<step> every this many steps")
    parser.add_argument(
        "--save-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="dtype of the written weights (the embedded folders store float16; they load as float32)",
    )
    args = parser.parse_args(argv)
    if args.evaluate:
        torch.set_grad_enabled(False)
        figures = evaluate(args.family, Path(args.evaluate))
        text = json.dumps(figures, indent=1) + "\n"
        (Path(args.evaluate) / "edit_finetuning.json").write_text(text)
        print(text)
        return 0
    if args.out is None:
        parser.error("`--out` is required for training (or pass `--evaluate FOLDER`).")
    if not 0 <= args.edit_share + args.outpaint_share <= 1:
        parser.error("`--edit-share` + `--outpaint-share` must be in [0, 1].")
    out = Path(args.out)
    if out.exists():
        parser.error(f"`--out`: {out} exists; give a new folder.")
    taken = [f"{out}-{step}" for step in range(args.save_every, args.steps, args.save_every or args.steps)]
    taken = [name for name in taken if args.save_every and Path(name).exists()]
    if taken:
        parser.error(f"`--save-every` writes {taken[0]}, which exists; give another `--out`.")

    pipeline_class, inpaint_class, folder = FAMILIES[args.family]
    pipe = pipeline_class.from_pretrained(args.model or folder, dtype=torch.float32)
    inpaint = inpaint_class.from_pipe(pipe)  # the same components; its keep rule and schedule
    schedule = [tuple(hw) for hw in inpaint._edit_schedule()]
    cell = 64 // schedule[-1][1]  # pixels per latent cell at the embedded models' 64 px
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema > 0 else model
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup_steps))
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    loss_of = LOSSES[args.family]
    start = time.perf_counter()

    source = Path(args.model or folder)

    def export(path: Path) -> None:
        """The source folder with the averaged transformer in place of its own (every other file unchanged),
        written next to ``path`` and renamed into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))  # ours alone
        try:
            partial = staging / path.name
            shutil.copytree(source, partial)
            shutil.rmtree(partial / "transformer")  # (the copy's)
            copy.deepcopy(ema).to(getattr(torch, args.save_dtype)).save_pretrained(partial / "transformer")
            os.replace(partial, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    for step in range(1, args.steps + 1):
        batch = training_batch(rng, args.batch_size, 64, cell, args)
        loss = loss_of(inpaint, model, batch, schedule, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 2.0)
        optimizer.step()
        warmup.step()
        if ema is not model:
            with torch.no_grad():
                for averaged, trained in zip(ema.parameters(), model.parameters()):
                    averaged.lerp_(trained, 1 - args.ema)
        if step % 50 == 0 or step == 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            export(Path(f"{out}-{step}"))
    export(out)
    print(f"{args.steps} steps in {time.perf_counter() - start:.0f} s; the pipeline is in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
