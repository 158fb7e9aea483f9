"""The ``diffusers-var`` command line: every usage error is one line naming the flag (exit code 2, no traceback),
found before anything is generated; many images are generated in bounded batches and written as they come."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from conftest import REPO_ROOT
from diffusers_var import InfinityInpaintPipeline, VARInpaintPipeline, VARPipeline
from diffusers_var.cli import main
from diffusers_var.cli_support import MAX_IMAGES


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's errors
        return stop.code


def _bad_device() -> str:
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


# edit: in-paint {tmp}/in.png with the embedded VAR; a case's own --out / --class-label come later and win
EDIT_IMAGE = ["edit", "--image", "{tmp}/in.png", "--box", "0,0,.5,.5", "--out", "{tmp}/e.png"]
EDIT = [*EDIT_IMAGE, "--class-label", "1"]
EDIT_INFINITY = [*EDIT_IMAGE, "--model", "infinity-shapes", "--prompt", "a red circle on a blue background"]
BAD_ARGUMENTS = [
    (["generate", "--seed", str(2**64)], "--seed"),
    (["generate", "--seed", "-1"], "--seed"),
    (["generate", "--device", _bad_device()], "--device"),
    (["generate", "--out", "{tmp}/no-extension"], "--out"),
    (["generate", "--out", "{tmp}/image.notaformat"], "--out"),
    (["generate", "--out", "{tmp}/image.xbm"], "--out"),  # PIL writes XBM, but not from RGB
    (["generate", "--out", "{tmp}/image.h5"], "--out"),  # a format PIL knows, without its writer plug-in
    (["generate", "--out", "{tmp}/a-file/out.png"], "--out"),  # its folder cannot be made: a file is in the way
    (["generate", "--out", "{tmp}"], "--out"),
    (["generate", "--num-images", "0"], "--num-images"),
    (["generate", "--num-images", str(MAX_IMAGES + 1), "--out", "{tmp}/big/x.png"], "--num-images"),
    (["generate", "--batch-size", "0"], "--batch-size"),
    (["generate", "--top-p", "nan"], "--top-p"),
    (["generate", "--guidance-scale", "inf"], "--guidance-scale"),
    (["generate", "--class-label", "no such class"], "--class-label"),
    ([*EDIT, "--out", "{tmp}/image.notaformat"], "--out"),
    ([*EDIT, "--out", "{tmp}/image.msp"], "--out"),
    ([*EDIT, "--out", "{tmp}/no-extension"], "--out"),
    ([*EDIT, "--out", "{tmp}"], "--out"),
    ([*EDIT, "--out", "{tmp}/a-file/out.png"], "--out"),
    ([*EDIT, "--device", _bad_device()], "--device"),
    ([*EDIT, "--device", "banana"], "--device"),
    (["generate", "--device", "meta"], "--device"),
    (["generate", "--model", "star-shapes", "--prompt", "a", "--class-label", "3"], "--class-label"),
    ([*EDIT_INFINITY, "--class-label", "3"], "--class-label"),
    ([*EDIT, "--height", "0"], "--height"),
    ([*EDIT, "--width", "0"], "--width"),
    ([*EDIT_INFINITY, "--height", "0"], "--height"),
    ([*EDIT, "--height", "64"], "--height"),  # VAR: Infinity-only, as in generate
    ([*EDIT, "--seed", "-5"], "--seed"),
    ([*EDIT, "--seed", "100000000000000000000000"], "--seed"),
    ([*EDIT, "--class-label", "\u00b2"], "--class-label"),  # "²".isdigit() is True, but int() refuses it
    ([*EDIT, "--num-images", "65"], "--num-images"),  # one batch: at most the demo's 64 per request
    (["demo", "--max-images", "0"], "--max-images"),
    (["demo", "--port", "99999"], "--port"),
    (["demo", "--queue-size", "0"], "--queue-size"),
    (["demo", "--queue-size", "10001"], "--queue-size"),
    (["demo", "--concurrency", "65"], "--concurrency"),
    # a blank path ("$UNSET") was read as the default model, or as the current folder
    (["generate", "--model", ""], "--model"),
    (["generate", "--refiner", " "], "--refiner"),
    (["generate", "--lora", ""], "--lora"),
    ([*EDIT, "--model", ""], "--model"),
    ([*EDIT, "--image", ""], "--image"),
    ([*EDIT, "--mask", ""], "--mask"),
    (["sample", "--out", "{tmp}/run", "--model", ""], "--model"),
    (["sample", "--out", "{tmp}/run", "--prompts", ""], "--prompts"),
    (["sample", "--out", "{tmp}/run", "--compile-cache", ""], "--compile-cache"),
    (["evaluate", "--samples", ""], "--samples"),
    (["evaluate", "--samples", "{tmp}", "--reference", ""], "--reference"),
    (["evaluate", "--samples", "{tmp}", "--inception-weights", ""], "--inception-weights"),
    (["evaluate", "--samples", "{tmp}", "--clip-model", ""], "--clip-model"),
    (["demo", "--var", ""], "--var"),
    (["demo", "--var-refiner", ""], "--var-refiner"),
    (["demo", "--compile-cache", ""], "--compile-cache"),
]


def _case_id(argv) -> str:
    return " ".join([argv[0], *(["infinity"] if "infinity-shapes" in argv else []), *argv[-2:]])


# every path flag of every command: the shell expands `--out ~/x` but not `--out=~/x`
PATH_FLAGS = {
    "generate": ["--model", "--refiner", "--out", "--lora"],
    "edit": ["--model", "--image", "--mask", "--out"],
    "train var": ["--config"],
    "sample": ["--model", "--out", "--prompts", "--compile-cache"],
    "evaluate": ["--samples", "--reference", "--inception-weights", "--clip-model", "--save-reference-stats", "--out"],
    "demo": ["--var", "--star", "--infinity", "--var-refiner", "--compile-cache", "--lora"],
}


@pytest.mark.parametrize("command", list(PATH_FLAGS))
def test_path_flags_expand_the_home_folder(command, tmp_path, monkeypatch):
    """The probe: ``--out=~/x`` wrote a folder named '~' in the current one (only the shell's ``--out ~/x`` meant
    the home folder); the parsed value of every path flag is now the path in the home folder."""
    from diffusers_var.cli import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    flags = PATH_FLAGS[command]
    args = build_parser().parse_args([*command.split(), *(f"{flag}=~/{flag[2:]}" for flag in flags)])
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        assert value == ([str(tmp_path / flag[2:])] if flag == "--lora" else str(tmp_path / flag[2:])), flag


def test_training_config_paths_expand_the_home_folder(tmp_path, monkeypatch):
    """A config's `output_dir: ~/runs/x` (or `tokenizer_path`, `data.path`, ...) named a folder '~' in the current one,
    which the run created."""
    from diffusers_var.training import TrainConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("tok", "text", "images", "init"):
        (tmp_path / name).mkdir()
    model = {"depth": 2, "init_from": "~/init"}
    config = TrainConfig.load(
        None,
        [
            "task=star",
            "output_dir=~/runs/x",
            "tokenizer_path=~/tok",
            "text_encoder_path=~/text",
            "data.type=imagefolder",
            "data.path=~/images",
        ],
    )
    assert (config.output_dir, config.tokenizer_path, config.text_encoder_path, config.data["path"]) == (
        str(tmp_path / "runs" / "x"),
        str(tmp_path / "tok"),
        str(tmp_path / "text"),
        str(tmp_path / "images"),
    )
    var = TrainConfig(task="var", tokenizer_path="~/tok", model=model, output_dir="~/v")
    var._expand_home()
    assert var.model["init_from"] == str(tmp_path / "init") and model["init_from"] == "~/init"  # (a copy)


def test_train_refuses_a_config_file_of_another_task(tmp_path, capsys):
    """`train bitwise_tokenizer --config tokenizer.yaml` trained the command's task on the file's keys, failing with
    an unknown-key error about the tokenizer's model settings."""
    config = tmp_path / "tok.yaml"
    config.write_text("task: tokenizer\nmodel: {ch: 32}\n")
    run = tmp_path / "run"
    assert main(["train", "bitwise_tokenizer", "--config", str(config), f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "`task`: the command names 'bitwise_tokenizer', the `--config` file" in err and "`task: tokenizer`" in err
    assert not run.exists()


@pytest.mark.parametrize("argv, flag", BAD_ARGUMENTS, ids=[_case_id(argv) for argv, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_errors_naming_the_flag(argv, flag, tmp_path, capsys, monkeypatch):
    from diffusers_var import cli

    (tmp_path / "a-file").write_text("in the way")
    PIL.Image.new("RGB", (64, 64), "blue").save(tmp_path / "in.png")
    monkeypatch.chdir(tmp_path)  # a case that slips through writes its default --out here
    calls = []
    for pipeline_class in (VARPipeline, VARInpaintPipeline, InfinityInpaintPipeline):
        monkeypatch.setattr(
            pipeline_class, "__call__", lambda self, *a, **k: calls.append(k) or pytest.fail("generated")
        )
    monkeypatch.setattr(cli, "_demo", lambda args: pytest.fail("the demo was started"))  # would serve forever
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    lines = [
        line for line in err.splitlines() if line.strip() and "Loading pipeline components" not in line
    ]  # diffusers' bar
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err
    assert not calls


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--class-label", "999"], "--class-label"),
        (["--prompt", "a purple blob"], "--prompt"),  # (VAR reads its class from --prompt too)
        (["--prompt", "  "], "--prompt"),  # (a blank one drew a random class)
        (["--model", str(REPO_ROOT / "pipelines" / "star-shapes"), "--prompt", " "], "--prompt"),
        (["--model", str(REPO_ROOT / "pipelines" / "infinity-shapes"), "--prompt", "a", "--height", "1"], "--height"),
    ],
)
def test_errors_found_by_the_pipeline_name_the_flag(argv, flag, tmp_path, capsys):
    out = tmp_path / "new-folder" / "out.png"
    assert _exit_code(["generate", *argv, "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and f"`{flag}`" in lines[0], lines
    assert not out.parent.exists()  # (it was made, empty, before the pipeline refused)


def test_whole_number_flags_take_leading_zeros(tmp_path, capsys):
    """``--seed 010`` was refused as not a whole number (Python's ``int(text, 0)``); it is ten, as everywhere."""
    from diffusers_var.cli_support import int_in_range

    assert int_in_range(0)("010") == 10 and int_in_range(0)("0x10") == 16 and int_in_range(1, 8)("08") == 8
    from diffusers_var.cli_support import MAX_BATCH_SIZE
    from diffusers_var.pipelines.pipeline_utils import MAX_BATCH_SIZE as PIPELINE_MAX_BATCH_SIZE

    assert MAX_BATCH_SIZE == PIPELINE_MAX_BATCH_SIZE  # the flags' bound is the pipelines' (no torch import)
    from diffusers_var import cli_support
    from diffusers_var.pipelines import pipeline_utils

    for name in ("MAX_GUIDANCE_SCALE", "MIN_TEMPERATURE"):  # likewise the sampling flags' ranges
        assert getattr(cli_support, name) == getattr(pipeline_utils, name), name
    assert _exit_code(["generate", "--seed", "07", "--out", str(tmp_path / "a.png")]) == 0
    assert _exit_code(["generate", "--seed", "7", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert _exit_code(["generate", "--batch-size", "70000", "--out", str(tmp_path / "c.png")]) == 2
    assert "--batch-size: must be a whole number from 1 to 65536" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", "--out", "{tmp}/out"], "--out"),
        (["generate", "--guidance-scale", "-1"], "--guidance-scale"),
        (["generate", "--top-p", "1.5"], "--top-p"),
        (["generate", "--guidance-scale", "20000"], "--guidance-scale"),  # above the pipelines' 1e4
        (["generate", "--class-label", "3", "--prompt", "green triangle on white"], "--prompt"),
        ([*EDIT, "--prompt", "green triangle on white"], "--prompt"),
        (
            ["edit", "--image", "{tmp}/in.png", "--strength", "2", "--class-label", "1", "--out", "{tmp}/e.png"],
            "--strength",
        ),
        ([*EDIT, "--out", "{tmp}/out"], "--out"),
        ([*EDIT, "--out", "{tmp}/a-file/out.png"], "--out"),
        # legal names whose atomic write's temporary name is too long (the traceback came after generating)
        (["generate", "--out", "{tmp}/" + "a" * 240 + ".png"], "--out"),
        (["generate", "--num-images", "2", "--out", "{tmp}/" + "a" * 226 + ".png"], "--out"),
        ([*EDIT, "--device", "banana"], "--device"),
        ([*EDIT, "--height", "64"], "--height"),
        (["sample", "--class-labels", "1", "--per-class", "1", "--out", "{tmp}/a-file"], "--out"),
        (["sample", "--class-labels", "1", "--per-class", "1", "--out", "{tmp}/a-file/run"], "--out"),
        *[
            pytest.param(argv, "--out", marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc"))
            for argv in (
                [*EDIT, "--out", "/proc/e.png"],
                ["sample", "--class-labels", "1", "--per-class", "1", "--out", "/proc/s"],
            )
        ],
    ],
    ids=lambda value: _case_id(value) if isinstance(value, list) else value,
)
def test_arguments_are_checked_before_the_model_is_loaded(argv, flag, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("in the way")
    PIL.Image.new("RGB", (64, 64), "blue").save(tmp_path / "in.png")
    monkeypatch.setattr(VARPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    assert _exit_code([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and flag in err, err
    assert (tmp_path / "a-file").is_file() and not (tmp_path / "out").exists()


def test_a_name_longer_than_the_file_system_takes_is_one_error_line(tmp_path, monkeypatch, capsys):
    """A path with a name past NAME_MAX (255 bytes): ``Path.exists()`` / ``is_dir()`` raise ENAMETOOLONG instead of
    answering False, which ended these commands in a traceback (exit code 1)."""
    long = str(tmp_path / ("x" * 300))
    PIL.Image.new("RGB", (64, 64), "blue").save(tmp_path / "in.png")
    monkeypatch.setattr(VARPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    sample = ["sample", "--class-labels", "1", "--per-class", "1"]
    for argv, flag in [
        (["generate", "--out", f"{long}/out.png"], "--out"),
        ([*EDIT, "--out", f"{long}/e.png"], "--out"),
        ([*sample, "--out", long], "--out"),
        ([*sample, "--out", f"{tmp_path}/new/{'x' * 300}/run"], "--out"),  # (under a folder not there yet)
        (["sample", "--model", "star-shapes", "--prompts", long, "--out", f"{tmp_path}/run"], "--prompts"),
        (["generate", "--model", long, "--out", f"{tmp_path}/g.png"], "--model"),  # the pipeline folders too
        (["generate", "--refiner", long, "--out", f"{tmp_path}/g.png"], "--refiner"),
        ([*sample, "--model", long, "--out", f"{tmp_path}/run"], "--model"),
        (["demo", "--var", long], "--var"),
    ]:
        assert _exit_code([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: `{flag}`") and len(err.splitlines()) == 1, err
        assert "is 300 bytes long, more than the 255 the file system takes" in err, err
    from diffusers_var.file_utils import path_problem

    assert path_problem(tmp_path / "in.png") is None and path_problem(tmp_path / "not-there" / "x") is None
    # a path past the system's length limit (PATH_MAX, 4096 bytes) of short names: the look-up's own error
    assert "cannot be looked up (File name too long)" in path_problem(tmp_path.joinpath(*["y" * 200] * 25))


def test_many_images_are_named_one_at_a_time(tmp_path):
    """``--num-images`` up to a million: the output names are made one at a time (a list of them all would take
    memory in proportion to the count) and the existing files are listed once."""
    from diffusers_var.cli import check_output, output_name, output_path

    assert output_path(tmp_path / "sq.png", 0, 1) == tmp_path / "sq.png"
    assert output_name(tmp_path / "sq.png", MAX_IMAGES - 1, MAX_IMAGES) == f"sq-{MAX_IMAGES - 1}.png"
    (tmp_path / f"sq-{MAX_IMAGES - 1}.png").mkdir()
    assert "is a folder" in check_output(tmp_path / "sq.png", MAX_IMAGES)
    assert check_output(tmp_path / "sq.png", MAX_IMAGES - 1) is None


def test_many_images_are_generated_in_batches_and_written_as_they_come(tmp_path, monkeypatch, capsys):
    original = VARPipeline.__call__
    batches = []

    def recording_call(self, *args, **kwargs):
        batches.append((kwargs["num_images_per_prompt"], sorted(p.name for p in tmp_path.glob("*.png"))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VARPipeline, "__call__", recording_call)
    assert (
        main(
            [
                "generate",
                "--class-label",
                "red circle on blue",
                "--num-images",
                "5",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "sq.png"),
            ]
        )
        == 0
    )
    assert [size for size, _ in batches] == [2, 2, 1]
    assert batches[2][1] == ["sq-0.png", "sq-1.png", "sq-2.png", "sq-3.png"]  # earlier batches are already on disk
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"sq-{i}.png" for i in range(5)]
    assert "saved 5 images" in capsys.readouterr().out


def test_a_folder_naming_a_module_of_the_package_is_not_a_pipeline(tmp_path, capsys):
    """``_class_name`` is looked up in the package: a name there that is no pipeline class (a submodule) is the
    `--model` error, not a TypeError."""
    (tmp_path / "model_index.json").write_text('{"_class_name": "scalars"}')
    assert main(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: `--model`") and "holds a 'scalars', not a diffusers-var pipeline" in error


@pytest.mark.parametrize("command", ["generate", "edit", "sample"])
def test_a_damaged_model_folder_is_one_error_line(command, tmp_path, capsys):
    """A truncated weights file (a copy cut short) gave diffusers' OSError as a 14-frame traceback."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(REPO_ROOT / "pipelines" / "var-shapes", model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    argv = {
        "generate": ["generate", "--class-label", "1", "--out", str(tmp_path / "x.png")],
        "edit": [*(a.format(tmp=tmp_path) for a in EDIT)],
        "sample": ["sample", "--per-class", "1", "--out", str(tmp_path / "samples")],
    }[command]
    assert _exit_code([*argv, "--model", str(model)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (after diffusers' loading bar)
    assert error.startswith(f"error: `--model` {str(model)!r} does not load: "), error
    assert "diffusion_pytorch_model.safetensors" in error


def test_files_that_the_commands_did_not_write_are_replaced_only_with_overwrite(tmp_path, capsys):
    """``generate --out mine.png`` (and ``edit --image in.png --out in.png``) replaced the user's file silently;
    an image these commands wrote (its EXIF "Software" tag) is replaced as before."""
    mine = tmp_path / "mine.png"
    PIL.Image.new("RGB", (8, 8), (1, 2, 3)).save(mine)
    before = mine.read_bytes()
    generate = ["generate", "--class-label", "1", "--out", str(mine)]
    assert _exit_code(generate) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: `--out` {str(mine)!r} exists and carries no diffusers-var tag"), error
    assert "--overwrite" in error and mine.read_bytes() == before
    edit = [a.format(tmp=tmp_path) for a in EDIT]
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    assert _exit_code([*edit, "--out", str(tmp_path / "in.png")]) == 2  # the input itself
    assert "exists and carries no diffusers-var tag" in capsys.readouterr().err
    assert _exit_code([*generate, "--overwrite"]) == 0
    assert mine.read_bytes() != before
    written = mine.read_bytes()
    assert _exit_code([*generate[:-1], str(mine), "--seed", "3"]) == 0  # its own image: replaced without a word
    assert mine.read_bytes() != written


def test_an_image_too_large_to_decode_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # PIL's decompression-bomb guard, reached cheaply
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    assert _exit_code([a.format(tmp=tmp_path) for a in EDIT]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: `--image`") and "is not an image that can be read" in error, error
    assert len(error.splitlines()) == 1, error  # (it was a DecompressionBombError traceback)


def test_no_import_circle_between_cli_and_demo():
    """``demo`` used to import its flags from ``cli`` while ``cli`` imports ``demo`` (lazily, for gradio): the shared
    pieces live in ``cli_support``, which imports neither."""
    for module, forbidden in (("demo", {"cli"}), ("cli_support", {"cli", "demo"})):
        tree = ast.parse((REPO_ROOT / "src" / "diffusers_var" / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {name for name in imported if name.split(".")[-1] in forbidden}, (module, imported)


def test_embedded_pipelines_are_found_by_name_wherever_the_command_runs(tmp_path, monkeypatch):
    """``--model star-shapes`` (or the checkout's ``pipelines/star-shapes``) names the embedded pipeline when no such
    folder exists where the command runs; an existing folder of that name wins, and other names stay paths."""
    from diffusers_var.embedded_models import embedded_pipelines_dir, resolve_pipeline_folder

    monkeypatch.chdir(tmp_path)
    for name in ("var-shapes", "star-shapes", "infinity-shapes", "var-shapes-refiner"):
        assert resolve_pipeline_folder(name) == embedded_pipelines_dir() / name
        assert resolve_pipeline_folder(f"pipelines/{name}") == embedded_pipelines_dir() / name
    assert resolve_pipeline_folder("elsewhere/star-shapes") == Path("elsewhere/star-shapes")
    assert resolve_pipeline_folder("star-shape") == Path("star-shape")
    (tmp_path / "star-shapes").mkdir()  # a folder of the user's with that name is what they mean
    assert resolve_pipeline_folder("star-shapes").resolve() == tmp_path / "star-shapes"
    assert _exit_code(["generate", "--model", "star-shapes", "--out", str(tmp_path / "x.png")]) == 2


def test_embedded_pipeline_names_its_folder_or_says_which_names_exist():
    import diffusers_var
    from diffusers_var.embedded_models import embedded_pipelines_dir

    assert diffusers_var.embedded_pipeline() == embedded_pipelines_dir() / "var-shapes"
    pipe = diffusers_var.STARPipeline.from_pretrained(diffusers_var.embedded_pipeline("star-shapes"))
    assert isinstance(pipe.transformer, diffusers_var.STARTransformer2DModel)
    with pytest.raises(ValueError, match="`name` must be one of var-shapes, star-shapes"):
        diffusers_var.embedded_pipeline("pipelines/var-shapes")


def test_a_full_disk_is_one_error_line(tmp_path, capsys, monkeypatch):
    """No space left (a full disk or quota) while writing: one line naming --out and what to do, not a traceback."""
    import errno

    from diffusers_var import cli

    def full(image, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cli, "save_image", full)
    out = tmp_path / "out.png"
    assert _exit_code(["generate", "--class-label", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no space left on the device writing") and f"(`--out` {str(out)!r})" in err


def test_edit_reads_image_and_mask_upright_as_their_exif_says(tmp_path):
    """``edit`` took a phone photo's stored pixels (sideways), so the edit and a mask drawn on the upright view did
    not line up with what the user sees."""
    from test_data import sideways_photo

    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:32] = (255, 0, 0)
    halves[32:] = (0, 0, 255)
    sideways_photo(tmp_path / "photo.jpg", halves)
    with PIL.Image.open(tmp_path / "photo.jpg") as stored:
        PIL.ImageOps.exif_transpose(stored).save(tmp_path / "upright.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:16] = 255  # the top band, on the upright view
    sideways_photo(tmp_path / "mask.jpg", np.repeat(mask[..., None], 3, axis=2))
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    outputs = {}
    for name, image, mask_file in (("exif", "photo.jpg", "mask.jpg"), ("upright", "upright.png", "mask.png")):
        argv = ["edit", "--image", str(tmp_path / image), "--mask", str(tmp_path / mask_file), "--class-label", "1"]
        assert _exit_code([*argv, "--seed", "0", "--out", str(tmp_path / f"out-{name}.png")]) == 0
        outputs[name] = np.asarray(PIL.Image.open(tmp_path / f"out-{name}.png").convert("RGB")).astype(int)
    assert np.abs(outputs["exif"] - outputs["upright"]).mean() < 3  # JPEG's rounding apart, the same edit
    assert outputs["exif"][40:, :, 2].mean() > 150  # the blue bottom half kept where the user sees it


def test_a_refiner_that_does_not_fit_the_model_is_named_by_its_flag(tmp_path, capsys):
    """``generate --refiner``: a refiner of another tokenizer or class count was refused with the library's names
    (`refiner`, the drafter's `transformer`), while every other error of the command names its flag."""
    from tiny_components import var_components

    drafter = var_components(seed=0)
    VARPipeline(**drafter).save_pretrained(tmp_path / "drafter")
    VARPipeline(**var_components(seed=1)).save_pretrained(tmp_path / "other-tokenizer")
    other_classes = var_components(seed=0, num_classes=12)["transformer"]
    VARPipeline(transformer=other_classes, vqvae=drafter["vqvae"]).save_pretrained(tmp_path / "other-classes")
    for refiner, reason in (("other-tokenizer", "another tokenizer"), ("other-classes", "num_classes=12")):
        argv = ["generate", "--model", tmp_path / "drafter", "--refiner", tmp_path / refiner, "--class-label", "1"]
        assert _exit_code([str(a) for a in [*argv, "--out", tmp_path / "x.png"]]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: `--refiner`") and reason in error and "`refiner`" not in error, error
        assert "`transformer`" not in error, error


@pytest.mark.parametrize("command, default", [("generate", "out.png"), ("edit", "edited.png")])
def test_out_help_states_its_default(command, default, capsys):
    """``edit --help`` did not say where the image goes without ``--out`` (``generate``'s did)."""
    assert _exit_code([command, "--help"]) == 0
    assert f"(default {default})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "argv, choices",
    [([], "command: one of generate, edit, train"), (["train"], "task: one of tokenizer, bitwise_tokenizer, var")],
)
def test_a_missing_command_lists_the_commands(argv, choices, capsys):
    """The one-line error dropped argparse's usage block, which was the only place the choices appeared."""
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "are required" in err and choices in err, err


def test_out_that_is_a_pipe_or_a_link_is_refused_not_hung_on_or_replaced(tmp_path):
    """An existing named pipe at ``--out``: looking for the tag opened it for reading, which blocks until a writer
    comes (the command hung for good). A symbolic link: the write replaces the link itself with a file, so a user's
    link goes even when it points to an image these commands wrote."""
    import threading

    import PIL.Image

    from diffusers_var.cli import SOFTWARE, SOFTWARE_TAG, check_output

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(check_output(fifo, 1)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert answers and "exists and is not a regular file" in answers[0]
    target = tmp_path / "ours.png"
    exif = PIL.Image.Exif()
    exif[SOFTWARE_TAG] = SOFTWARE
    PIL.Image.new("RGB", (4, 4)).save(target, exif=exif)
    assert check_output(target, 1) is None  # the tagged file itself may be replaced
    (tmp_path / "link.png").symlink_to(target)
    assert "is a symbolic link, which writing would replace with a file" in check_output(tmp_path / "link.png", 1)
    assert check_output(tmp_path / "link.png", 1, overwrite=True) is None


def test_a_negative_value_in_exponent_form_is_a_value_not_a_flag():
    """``--lora-scale -1e-1``: Python 3.11's argparse took only plain negative decimals for values and said the flag
    "expected one argument"; ``-0.5`` and ``--lora-scale=-1e-1`` worked."""
    from diffusers_var.cli import build_parser

    for text, value in (("-1e-1", -0.1), ("-2E3", -2000.0), ("-.5e+1", -5.0), ("-0.5", -0.5)):
        args = build_parser().parse_args(["generate", "--lora", "a.safetensors", "--lora-scale", text])
        assert args.lora_scale == [value]
