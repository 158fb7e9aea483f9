"""Writing converted / exported folders: ``--overwrite`` replaces only folders diffusers-var wrote and never deletes
a user's file; interrupted saves leave staging folders that later saves clean up (only ours, recognisably)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT
from diffusers_var.conversion import ConversionError, atomic_save_pipeline
from diffusers_var.conversion.common import MANIFEST_NAME, STAGING_MARKER


class FakePipeline:
    """Writes a small diffusers-like pipeline folder (no model needed to test the file handling)."""

    def __init__(self, tag: str = "new", class_name: str = "VARPipeline"):
        self.tag, self.class_name = tag, class_name

    def save_pretrained(self, path, safe_serialization=True):
        (path / "transformer").mkdir(parents=True)
        (path / "model_index.json").write_text(json.dumps({"_class_name": self.class_name, "transformer": ["x", "y"]}))
        (path / "transformer" / "config.json").write_text("{}")
        (path / "transformer" / "diffusion_pytorch_model.safetensors").write_text(self.tag)


def contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_never_deletes_files_it_did_not_write(tmp_path):
    user = tmp_path / "home"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (user / "data").mkdir()
    (user / "data" / "table.csv").write_text("1,2")
    with pytest.raises(ConversionError, match="`output`.*not a pipeline or model folder written by diffusers-var"):
        atomic_save_pipeline(FakePipeline(), user, overwrite=True)
    assert contents(user) == {"notes.txt": "mine", "data/table.csv": "1,2"}

    ours = tmp_path / "converted"
    atomic_save_pipeline(FakePipeline("v1"), ours)
    assert json.loads((ours / MANIFEST_NAME).read_text())["files"] == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]
    (ours / "notes.txt").write_text("mine")  # a user's file inside a folder of ours is kept as well
    with pytest.raises(ConversionError, match="notes.txt"):
        atomic_save_pipeline(FakePipeline("v2"), ours, overwrite=True)
    assert contents(ours)["transformer/diffusion_pytorch_model.safetensors"] == "v1"
    (ours / "notes.txt").unlink()
    (ours / "transformer" / "my-runs").mkdir()  # an empty folder of the user's was deleted with the output
    with pytest.raises(ConversionError, match="transformer/my-runs/"):
        atomic_save_pipeline(FakePipeline("v2"), ours, overwrite=True)
    (ours / "transformer" / "my-runs").rmdir()
    atomic_save_pipeline(FakePipeline("v2"), ours, overwrite=True)
    assert contents(ours)["transformer/diffusion_pytorch_model.safetensors"] == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "home"]  # no staging folder left

    # a folder written before manifests: replaced when it is ours and every file in it is rewritten
    legacy = tmp_path / "legacy"
    atomic_save_pipeline(FakePipeline("v1"), legacy)
    (legacy / MANIFEST_NAME).unlink()
    atomic_save_pipeline(FakePipeline("v2"), legacy, overwrite=True)
    (legacy / MANIFEST_NAME).unlink()
    (legacy / "README.md").write_text("my notes")
    with pytest.raises(ConversionError, match="README.md"):
        atomic_save_pipeline(FakePipeline("v3"), legacy, overwrite=True)
    assert (legacy / "README.md").read_text() == "my notes"
    other = tmp_path / "sd"
    FakePipeline(class_name="StableDiffusionPipeline").save_pretrained(other)
    with pytest.raises(ConversionError, match="not a pipeline or model folder written by diffusers-var"):
        atomic_save_pipeline(FakePipeline(), other, overwrite=True)


def test_command_line_overwrite_refuses_the_current_folder_and_foreign_folders(tmp_path, monkeypatch, capsys):
    """The issue's case: ``convert_var.py ... --output . --overwrite`` in a folder of other files deleted them.
    The output is checked before the checkpoints are read, so missing checkpoints do not matter here."""
    import runpy

    (tmp_path / "notes.txt").write_text("mine")
    main = runpy.run_path(str(REPO_ROOT / "conversion" / "convert_var.py"))["main"]
    monkeypatch.chdir(tmp_path)
    for output in (".", str(tmp_path)):
        assert main(["--vae", "vae.pth", "--transformer", "var.pth", "--output", output, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: `--output`") and err.count("\n") == 1, err
    assert contents(tmp_path) == {"notes.txt": "mine"}


@pytest.mark.parametrize("script", ["convert_var", "convert_star", "convert_infinity", "convert_code"])
def test_ctrl_c_in_a_converter_is_one_line(script, monkeypatch, capsys):
    """Ctrl-C in a conversion script printed a traceback from wherever the work was (the CLI printed one line)."""
    import argparse
    import runpy

    from diffusers_var.cli_support import INTERRUPTED

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(REPO_ROOT / "conversion" / f"{script}.py"), run_name="__main__")
    assert stopped.value.code == 130 and capsys.readouterr().err == INTERRUPTED + "\n"


def test_ctrl_c_while_a_converter_imports_is_one_line(tmp_path):
    """The probe: Ctrl-C in a converter's first seconds (torch and diffusers importing, before run_interruptible)
    printed a traceback and the process died of SIGINT (returncode -2). Here the signal comes while torch imports."""
    from diffusers_var.cli_support import INTERRUPTED

    interrupt_on_import = textwrap.dedent(
        """
        import os, runpy, signal, sys

        class CtrlC:  # Ctrl-C as the import of torch starts
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, CtrlC())
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """
    )
    argv = ["--vae", "vae.pth", "--transformer", "t.pth", "--output", str(tmp_path / "out")]
    runs = {
        script: subprocess.Popen(
            [sys.executable, "-c", interrupt_on_import, str(REPO_ROOT / "conversion" / f"{script}.py"), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in ("convert_var", "convert_star", "convert_infinity", "convert_code")
    }
    for script, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert (run.returncode, err) == (130, INTERRUPTED + "\n"), (script, run.returncode, err[-2000:])
    assert not (tmp_path / "out").exists()


def test_interrupted_saves_are_cleaned_up_and_only_ours(tmp_path):
    out = tmp_path / "out"
    # a save SIGKILLed half-way leaves its staging folder ...
    # common.py alone (importing diffusers_var would triple this test's time); it needs the package only after saving
    common_py = REPO_ROOT / "src/diffusers_var/conversion/common.py"
    code = textwrap.dedent(f"""
        import importlib.util, os, signal
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("common", {str(common_py)!r})
        common = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(common)
        atomic_save_pipeline = common.atomic_save_pipeline

        class Dies:
            def save_pretrained(self, path, safe_serialization=True):
                Path(path).mkdir()
                (Path(path) / "model_index.json").write_text("{{}}")
                os.kill(os.getpid(), signal.SIGKILL)

        atomic_save_pipeline(Dies(), {str(out)!r})
    """)
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".out.tmp-*")
    # ... next to a user's folder that merely looks like one (no marker): it is never touched
    lookalike = tmp_path / ".out.tmp-mine"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    atomic_save_pipeline(FakePipeline("v1"), out)
    assert not left.exists() and (lookalike / "keep.txt").read_text() == "mine"
    assert contents(out)["transformer/diffusion_pytorch_model.safetensors"] == "v1"


@pytest.mark.parametrize("name", ["out", "out[d16]*?"])  # glob characters: the staging was never found
def test_a_save_stopped_mid_swap_restores_the_previous_output(tmp_path, name):
    out = tmp_path / name
    atomic_save_pipeline(FakePipeline("v1"), out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = tmp_path / f".{name}.tmp-abc123"  # as left by a process killed between its two renames
    staging.mkdir()
    (staging / STAGING_MARKER).write_text(
        json.dumps(
            {"written_by": "diffusers-var", "output": str(out.resolve()), "host": os.uname().nodename, "pid": dead.pid}
        )
    )
    os.replace(out, staging / "old")
    with pytest.raises(ConversionError, match="already exists"):  # restored first, then refused without overwrite
        atomic_save_pipeline(FakePipeline("v2"), out)
    assert contents(out)["transformer/diffusion_pytorch_model.safetensors"] == "v1" and not staging.exists()


def test_an_old_output_that_cannot_be_removed_stays_recognisably_ours(tmp_path, monkeypatch, caplog):
    """The probe: ``--overwrite`` when part of the previous output could not be deleted (a read-only subfolder) left
    ``.out.tmp-*/old/...`` hidden for good: ``rmtree(ignore_errors=True)`` deleted the staging marker first, so no
    later run knew the folder for ours. The marker is now removed last and kept when something is left; a warning
    names the folder, and the next conversion (another process) removes it. (Simulated: tests may run as root, which
    permission bits do not stop.)"""
    import logging
    import shutil

    from diffusers_var.conversion import common

    out = tmp_path / "out"
    atomic_save_pipeline(FakePipeline("v1"), out)
    real_rmtree = shutil.rmtree

    def rmtree_but_old_transformer(path, ignore_errors=False):  # as rmtree does with a read-only old/transformer
        for folder, _, files in os.walk(path, topdown=False):
            for name in files:
                if "old/transformer" not in os.path.join(folder, name):
                    os.unlink(os.path.join(folder, name))
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    monkeypatch.setattr(common.shutil, "rmtree", rmtree_but_old_transformer)
    with caplog.at_level(logging.WARNING, logger=common.__name__):
        atomic_save_pipeline(FakePipeline("v2"), out, overwrite=True)
    monkeypatch.setattr(common.shutil, "rmtree", real_rmtree)
    assert contents(out)["transformer/diffusion_pytorch_model.safetensors"] == "v2"
    (left,) = tmp_path.glob(".out.tmp-*")
    old_files = ["old/transformer/config.json", "old/transformer/diffusion_pytorch_model.safetensors"]
    assert sorted(contents(left)) == [STAGING_MARKER, *old_files]
    assert f"could not remove all of {left}" in caplog.text

    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # the next conversion runs in another process
    dead.wait()
    marker = json.loads((left / STAGING_MARKER).read_text())
    (left / STAGING_MARKER).write_text(json.dumps({**marker, "pid": dead.pid}))
    atomic_save_pipeline(FakePipeline("v3"), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert contents(out)["transformer/diffusion_pytorch_model.safetensors"] == "v3"


def _main_of(script: str):
    import runpy

    return runpy.run_path(str(REPO_ROOT / "conversion" / script))["main"]


def test_an_unwritable_output_is_refused_before_converting(tmp_path, monkeypatch, capsys):
    """The audit's cases: ``--output somefile.pth/sub`` (FileExistsError) and ``--output rodir/out`` (PermissionError
    from mkdtemp) were tracebacks after the whole conversion. Now one line naming `output`, before any checkpoint is
    read (the checkpoints here do not exist: reading them would be the error instead)."""
    import errno
    import tempfile

    (tmp_path / "somefile.pth").write_text("mine")
    rodir = tmp_path / "rodir"
    rodir.mkdir()
    # a folder we may not write into, for any user (root ignores permission bits): refuse files made in it
    temporary_file, mkdtemp = tempfile.TemporaryFile, tempfile.mkdtemp

    def refuse(original):
        def make(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir) == os.path.realpath(rodir):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return original(*args, dir=dir, **kwargs)

        return make

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse(temporary_file))
    monkeypatch.setattr(tempfile, "mkdtemp", refuse(mkdtemp))
    runs = {
        "convert_var.py": ["--vae", "vae.pth", "--transformer", "var.pth"],
        "convert_code.py": ["--vae", "vae.pth", "--drafter", "d.pth", "--refiner", "r.pth"],
    }
    for script, argv in runs.items():
        main = _main_of(script)
        for output, reason in ((tmp_path / "somefile.pth" / "sub", "is a file"), (rodir / "out", "Permission")):
            assert main(argv + ["--output", str(output)]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: `--output`") and reason in err and err.count("\n") == 1, (script, err)
    with pytest.raises(ConversionError, match="`output`.*Permission denied"):
        atomic_save_pipeline(FakePipeline(), rodir / "out")
    assert contents(tmp_path) == {"somefile.pth": "mine"} and not any(rodir.iterdir())


def test_an_output_its_save_cannot_make_or_move_is_refused_before_converting(tmp_path, monkeypatch, capsys):
    """The probe: ``--output`` with a 250-byte name converted fully, then failed on the name of the staging folder
    beside it (14 bytes longer); an existing output folder that is not writable, with ``--overwrite``, failed only
    at the final rename (moving a folder into another needs write access to it). Both are refused with the other
    output checks now, before any checkpoint is read (those here do not exist)."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    long = tmp_path / ("o" * (limit - 5))
    main = _main_of("convert_var.py")
    argv = ["--vae", "vae.pth", "--transformer", "var.pth"]
    assert main(argv + ["--output", str(long)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `--output`: cannot write") and err.count("\n") == 1, err
    assert f"is too long: at most {limit - 14} bytes here" in err, err
    with pytest.raises(ConversionError, match="^`output`: cannot write .* is too long: at most"):
        atomic_save_pipeline(FakePipeline(), long)
    with pytest.raises(ConversionError, match="^`output`: .* holds a NUL character"):  # (a bare ValueError)
        atomic_save_pipeline(FakePipeline(), tmp_path / "a\x00b")

    out = tmp_path / "out"
    atomic_save_pipeline(FakePipeline("v1"), out)
    real_access = os.access  # (root may write anywhere: a folder we may not write into, simulated)
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(out) and real_access(path, mode))
    assert main(argv + ["--output", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `--output`: cannot write") and "the folder is not writable" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_a_failed_write_is_one_error_naming_output_and_keeps_the_previous_output(tmp_path, error):
    """A full disk while saving: an OSError from a config write, a SafetensorError from safetensors' writer (it
    reports I/O errors so). Both become a ConversionError naming `output`; the previous output stays, no staging
    folder is left."""
    import errno

    from safetensors import SafetensorError

    class DiskFull(FakePipeline):
        def save_pretrained(self, path, safe_serialization=True):
            super().save_pretrained(path, safe_serialization)
            if error == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device", str(path / "vqvae" / "config.json"))
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "out"
    atomic_save_pipeline(FakePipeline("v1"), out)
    with pytest.raises(ConversionError, match="`output`.*No space left on device"):
        atomic_save_pipeline(DiskFull("v2"), out, overwrite=True)
    assert contents(out)["transformer/diffusion_pytorch_model.safetensors"] == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_output_folder_gets_the_mode_of_the_umask(tmp_path):
    """The converted folder was always 0755 (``mkdtemp`` makes 0700, then a fixed chmod); its subfolders and files
    follow the umask, as ``save_pretrained``'s do."""
    for name, umask, mode in (("private", 0o077, 0o700), ("shared", 0o022, 0o755)):
        previous = os.umask(umask)
        try:
            atomic_save_pipeline(FakePipeline("v1"), tmp_path / name)
        finally:
            os.umask(previous)
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_a_refused_save_leaves_no_folder_it_made(tmp_path):
    """The probe: a save refused after its output's parent folders were made (``--output np/x/y/out``, a pipeline
    holding NaN) left the empty folders np/x/y behind. Those it made are removed again; a folder that was there
    before (empty or not) is kept."""
    import torch

    class NaNPipeline(FakePipeline):
        components = {"transformer": torch.nn.Linear(1, 1, bias=False)}

    class FailingPipeline(FakePipeline):
        def save_pretrained(self, path, safe_serialization=True):
            raise OSError(28, "No space left on device")

    torch.nn.init.constant_(NaNPipeline.components["transformer"].weight, float("nan"))
    with pytest.raises(ConversionError, match="NaN or infinite values"):
        atomic_save_pipeline(NaNPipeline(), tmp_path / "np" / "x" / "y" / "out")
    (tmp_path / "kept").mkdir()
    with pytest.raises(ConversionError, match="`output`: writing .* No space left on device"):
        atomic_save_pipeline(FailingPipeline(), tmp_path / "kept" / "x" / "y" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    atomic_save_pipeline(FakePipeline(), tmp_path / "kept" / "x" / "out")  # a save that works keeps them
    assert (tmp_path / "kept" / "x" / "out" / "model_index.json").is_file()
