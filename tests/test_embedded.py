"""The embedded default pipelines under pipelines/: they load on the CPU, generate, and the pixel judge
scores a fixed-seed batch above the issue's targets (>= 90% for shape, colour and background)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO_ROOT
from diffusers_var import InfinityPipeline, STARPipeline, VARCoDePipeline, VARPipeline, shapes

NUM_SAMPLES = 90  # one per class


def _folder(name):
    path = REPO_ROOT / "pipelines" / name
    assert (path / "model_index.json").is_file(), f"embedded pipeline {path} is missing"
    return path


def _score(images, labels):
    return shapes.evaluate_generations(images, [shapes.CLASSES[i] for i in labels], images.shape[-1])


# (folder, pipeline class, sampling): STAR at the model card's recommended setting for this small model
# (guidance 2, no top-k / top-p filtering); the original's STAR defaults score 93 / 98.5 / 98 % on 200 GPU samples
# (model card) but sit near 90 % here. VAR and Infinity at their defaults.
EMBEDDED = [
    ("var-shapes", VARPipeline, {}),
    ("star-shapes", STARPipeline, dict(guidance_scale=2.0, top_k=0, top_p=0.0)),
    ("infinity-shapes", InfinityPipeline, {}),
]


@pytest.mark.parametrize("name, pipeline_class, sampling", EMBEDDED, ids=[e[0] for e in EMBEDDED])
def test_embedded_pipeline_generates_what_was_asked(name, pipeline_class, sampling):
    pipe = pipeline_class.from_pretrained(_folder(name), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(NUM_SAMPLES))
    condition = (
        {"class_labels": labels}
        if pipeline_class is VARPipeline
        else {"prompt": [shapes.CLASSES[i].caption for i in labels]}
    )
    images = pipe(**condition, **sampling, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (NUM_SAMPLES, 3, 64, 64)
    score = _score(images, labels)
    print(f"{name}:", score)
    for attribute in ("shape", "color", "background"):
        assert score[attribute] >= 0.9, score


def test_embedded_code_generates_what_was_asked():
    """CoDe out of the box: var-shapes drafts the coarse scales, the embedded refiner the fine ones (default
    draft_steps)."""
    drafter = VARPipeline.from_pretrained(_folder("var-shapes"), dtype=torch.float32)
    refiner = VARPipeline.from_pretrained(_folder("var-shapes-refiner"), dtype=torch.float32)
    pipe = VARCoDePipeline.from_var_pipelines(drafter, refiner)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.refiner.config.depth < pipe.transformer.config.depth
    labels = [i % shapes.NUM_CLASSES for i in range(200)]  # the model card's 200 samples (issue 23)
    images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    score = _score(images, labels)
    print("CoDe var-shapes + var-shapes-refiner:", score)
    for attribute in ("shape", "color", "background"):
        assert score[attribute] >= 0.9, score


def test_refiner_model_card():
    folder = _folder("var-shapes-refiner")
    card = (folder / "README.md").read_text()
    assert "CPU speed" in card and "configs/var_shapes_refiner.yaml" in card
    evaluation = json.loads((folder / "evaluation.json").read_text())
    default = evaluation["results"][f"CoDe draft_steps={evaluation['default_draft_steps']}"]
    assert min(default["shape"], default["color"], default["background"]) >= 0.9
    assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".pth", ".pt", ".pkl"}]


@pytest.mark.parametrize("name", ["var-shapes", "star-shapes", "infinity-shapes"])
def test_model_cards_and_sizes(name):
    folder = _folder(name)
    card = (folder / "README.md").read_text()
    assert "Measured quality" in card and "build_embedded.py" in card
    assert json.loads((folder / "evaluation.json").read_text())["results"]["default"]["shape"] >= 0.9
    assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".pth", ".pt", ".pkl"}]


def test_embedded_pipelines_fit_the_size_budget():
    total = sum(p.stat().st_size for p in (REPO_ROOT / "pipelines").rglob("*") if p.is_file())
    # three pipelines and CoDe's refiner (a VARPipeline folder with its own copy of the var-shapes tokenizer)
    assert total < 36 * 2**20, f"pipelines/ is {total / 2**20:.1f} MiB"


def test_generate_command_uses_the_embedded_var(tmp_path):
    from diffusers_var.cli import main

    out = tmp_path / "out.png"
    assert main(["generate", "--class-label", "red circle on blue", "--out", str(out)]) == 0
    assert out.is_file()
    assert (
        main(
            [
                "generate",
                "--model",
                str(_folder("star-shapes")),
                "--prompt",
                "a green square on a white background",
                "--out",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )
    judged = shapes.judge_images([__import__("PIL.Image").Image.open(tmp_path / "s.png")])[0]
    assert judged is not None
    assert (
        main(
            [
                "generate",
                "--model",
                str(_folder("infinity-shapes")),
                "--prompt",
                "a yellow triangle on a green background",
                "--seed",
                "0",
                "--out",
                str(tmp_path / "i.png"),
            ]
        )
        == 0
    )
    judged = shapes.judge_images([__import__("PIL.Image").Image.open(tmp_path / "i.png")])[0]
    assert judged == shapes.ShapeClass("triangle", "yellow", "green"), judged


def test_generate_command_with_a_refiner(tmp_path, capsys, monkeypatch):
    """``--refiner`` turns the VAR model into CoDe's drafter; ``--draft-steps`` needs CoDe; a refiner of another
    family or tokenizer is a one-line error, given before anything loads (the drafter loaded first)."""
    from diffusers_var import cli
    from diffusers_var.cli import main

    refiner = str(_folder("var-shapes-refiner"))
    out = tmp_path / "code.png"
    assert (
        main(
            [
                "generate",
                "--refiner",
                refiner,
                "--draft-steps",
                "3",
                "--class-label",
                "blue square on yellow",
                "--num-images",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (tmp_path / "code-0.png").is_file() and (tmp_path / "code-1.png").is_file()
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded before the flags' check"))
    assert main(["generate", "--draft-steps", "3", "--out", str(out)]) == 2
    assert "`--draft-steps`" in capsys.readouterr().err
    assert main(["generate", "--refiner", refiner, "--draft-steps", "6", "--out", str(out)]) == 2
    assert "`--draft-steps` must be an integer in [1, 5]" in capsys.readouterr().err
    assert main(["generate", "--refiner", str(_folder("star-shapes")), "--out", str(out)]) == 2
    assert "`--refiner`" in capsys.readouterr().err
