"""Edit fine-tuning (``scripts/finetune_editing.py``): the shapes dataset's edit requests, the tokenizers' pyramids
that keep another image's tokens, and a short run of the script for every family."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from diffusers_var import BitwiseMultiScaleVAE, MultiScaleVQModel, shapes

VQ = REPO_ROOT / "pipelines" / "var-shapes" / "vqvae"
BITWISE = REPO_ROOT / "pipelines" / "infinity-shapes" / "vae"
INFINITY_SCHEDULE = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def test_edit_pairs_ask_for_another_shape_and_colour_drawn_inside_the_box():
    pairs = shapes.edit_pairs(np.random.default_rng(5), 40)
    again = shapes.edit_pairs(np.random.default_rng(5), 40)
    assert np.array_equal(pairs.images, again.images) and pairs.targets == again.targets
    assert shapes.judge_images(pairs.images) == pairs.originals
    assert shapes.judge_images(pairs.edited) == pairs.targets
    for original, target in zip(pairs.originals, pairs.targets):
        assert target.shape != original.shape and target.color not in (original.color, original.background)
        assert target.background == original.background
    outside = ~pairs.box_masks().numpy()
    # the edited shape stays inside the original's box: outside it both images are the background
    assert all(np.array_equal(e[o], i[o]) for e, i, o in zip(pairs.edited, pairs.images, outside))
    grown = pairs.box_masks(grow=8)
    assert bool((grown | ~pairs.box_masks()).all()) and int(grown.sum()) > int(pairs.box_masks().sum())


def _random_keep(shapes_hw, batch: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, h, w, generator=generator) < 0.5 for h, w in shapes_hw]


@torch.no_grad()
def test_vq_pyramid_keeping_another_images_tokens():
    vq = MultiScaleVQModel.from_pretrained(VQ).eval()
    pairs = shapes.edit_pairs(np.random.default_rng(0), 3)
    source, target = pixels(pairs.images), pixels(pairs.edited)
    kept, own = vq.encode_indices(source), vq.encode_indices(target)
    grids = [(pn, pn) for pn in vq.config.patch_nums]
    everything = [torch.ones(3, h, w, dtype=torch.bool) for h, w in grids]
    nothing = [torch.zeros(3, h, w, dtype=torch.bool) for h, w in grids]
    assert all(map(torch.equal, vq.encode_indices_keeping(target, kept, everything), kept))
    assert all(map(torch.equal, vq.encode_indices_keeping(target, kept, nothing), own))
    keep = _random_keep(grids, 3, seed=1)
    mixed = vq.encode_indices_keeping(target, kept, keep)
    for k, got, want in zip(keep, mixed, kept):
        assert torch.equal(got[k.flatten(1)], want[k.flatten(1)])
    assert not all(map(torch.equal, mixed, kept)) and not all(map(torch.equal, mixed, own))
    for bad in (keep[:-1], [k.float() for k in keep], [k[:1] for k in keep]):  # a scale short, float, one row
        with pytest.raises(ValueError, match=r"`keep` must hold one \(3, pn, pn\) bool mask per scale"):
            vq.encode_indices_keeping(target, kept, bad)
    with pytest.raises(ValueError, match="`images` has 1 rows and `kept_indices` 3"):
        vq.encode_indices_keeping(target[:1], kept, keep)


@torch.no_grad()
def test_bitwise_labels_keeping_another_images_bits():
    vae = BitwiseMultiScaleVAE.from_pretrained(BITWISE).eval()
    pairs = shapes.edit_pairs(np.random.default_rng(1), 2)
    source, features = pixels(pairs.images), vae.encode_features(pixels(pairs.edited))
    kept = vae.encode(source, INFINITY_SCHEDULE).bit_labels
    plain_inputs, plain_labels = vae.teacher_forcing_inputs(features, INFINITY_SCHEDULE)
    nothing = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in INFINITY_SCHEDULE]
    inputs, labels = vae.teacher_forcing_inputs(features, INFINITY_SCHEDULE, keep=nothing, kept_bit_labels=kept)
    assert torch.equal(inputs, plain_inputs) and torch.equal(labels, plain_labels)
    everything = [torch.ones(2, h, w, dtype=torch.bool) for h, w in INFINITY_SCHEDULE]
    _, labels = vae.teacher_forcing_inputs(features, INFINITY_SCHEDULE, keep=everything, kept_bit_labels=kept)
    assert torch.equal(labels, torch.cat([vae.latent_to_tokens(b.permute(0, 3, 1, 2)) for b in kept], dim=1))
    keep = _random_keep(INFINITY_SCHEDULE, 2, seed=2)
    _, labels = vae.teacher_forcing_inputs(features, INFINITY_SCHEDULE, keep=keep, kept_bit_labels=kept)
    flat_keep = torch.cat([k.flatten(1) for k in keep], dim=1)
    want = torch.cat([vae.latent_to_tokens(b.permute(0, 3, 1, 2)) for b in kept], dim=1)
    assert torch.equal(labels[flat_keep], want[flat_keep]) and not torch.equal(labels, want)


@pytest.mark.parametrize("family", ["var", "star", "infinity"])
def test_finetune_script_writes_a_loadable_pipeline(family, tmp_path):
    out = tmp_path / "edit"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "finetune_editing.py"), "--family", family]
    command += ["--steps", "2", "--batch-size", "4", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 steps in" in result.stdout
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 2 and "`--out`" in again.stderr  # never written over
    if family == "var":  # a folder of the user's named like the script's staging (it deleted one), a taken step
        (tmp_path / "edit2.partial").mkdir()
        (tmp_path / "edit2.partial" / "notes.txt").write_text("mine")
        (tmp_path / "edit2-2").mkdir()
        second = [*command[:-1], str(tmp_path / "edit2"), "--steps", "3", "--save-every", "2"]
        taken = subprocess.run(second, capture_output=True, text=True, timeout=300, check=False)
        assert taken.returncode == 2 and "`--save-every` writes" in taken.stderr
        (tmp_path / "edit2-2").rmdir()
        done = subprocess.run(second, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / "edit2-2" / "transformer").is_dir() and (tmp_path / "edit2" / "transformer").is_dir()
        assert (tmp_path / "edit2.partial" / "notes.txt").read_text() == "mine"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
