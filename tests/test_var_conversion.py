"""Converter behaviour: command line, inference of the schedule, bad checkpoints, atomic writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, fixture_dir, load_manifest
from diffusers_var import VARPipeline
from diffusers_var.conversion import ConversionError, convert_var_checkpoint


@pytest.fixture(scope="module")
def originals():
    path = fixture_dir("var")
    files = load_manifest(path)["files"]
    return path / files["vae_pth"]["path"], path / files["var_pth"]["path"]


def test_command_line_converter(originals, tmp_path):
    vae, var = originals
    out = tmp_path / "converted"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "conversion" / "convert_var.py"),
            "--vae",
            str(vae),
            "--transformer",
            str(var),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert (out / "model_index.json").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pth"))
    VARPipeline.from_pretrained(out)
    # second run without --overwrite refuses and names the parameter
    again = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "conversion" / "convert_var.py"),
            "--vae",
            str(vae),
            "--transformer",
            str(var),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "output" in again.stderr


def test_wrong_patch_nums_rejected(originals):
    vae, var = originals
    with pytest.raises(ConversionError, match="patch-nums"):
        convert_var_checkpoint(vae, var, patch_nums=[1, 2, 3, 4, 5, 6, 7])


def test_training_snapshot_wrapper_is_unwrapped(originals, tmp_path):
    vae, var = originals
    snapshot = {"epoch": 3, "trainer": {"var_wo_ddp": torch.load(var, weights_only=True), "var_opt": {}}}
    torch.save(snapshot, tmp_path / "ar-ckpt-last.pth")
    pipe = convert_var_checkpoint(vae, tmp_path / "ar-ckpt-last.pth")
    reference = convert_var_checkpoint(vae, var)
    for a, b in zip(pipe.transformer.state_dict().values(), reference.transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_truncated_checkpoint(originals, tmp_path):
    vae, var = originals
    data = var.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="transformer.*truncated"):
        convert_var_checkpoint(vae, tmp_path / "cut.pth")


def test_missing_file(originals, tmp_path):
    vae, _ = originals
    with pytest.raises(ValueError, match="transformer"):
        convert_var_checkpoint(vae, tmp_path / "nope.pth")


def test_swapped_files_are_another_family(originals):
    vae, var = originals
    with pytest.raises(ValueError, match="`transformer`"):
        convert_var_checkpoint(vae, vae)
    with pytest.raises(ValueError, match="`vae`"):
        convert_var_checkpoint(var, var)


class Evil:
    """Unpickling this runs code; weights_only=True must refuse it."""

    def __reduce__(self):
        return (print, ("executed",))


def test_pickled_code_is_refused(originals, tmp_path):
    vae, _ = originals
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="transformer"):
        convert_var_checkpoint(vae, tmp_path / "evil.pth")


def test_failed_conversion_leaves_existing_output_intact(originals, tmp_path):
    vae, var = originals
    out = tmp_path / "out"
    convert_var_checkpoint(vae, var, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "cut.pth").write_bytes(var.read_bytes()[:1000])
    with pytest.raises(ValueError):
        convert_var_checkpoint(vae, tmp_path / "cut.pth", out, overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pth", "out"]  # no temp folders left behind
    convert_var_checkpoint(vae, var, out, overwrite=True)  # a real overwrite works
