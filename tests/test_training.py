"""Training on the CPU with tiny models: losses fall, exports load, a SIGKILLed run resumes exactly."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_var import MultiScaleVQModel, VARPipeline
from diffusers_var.training import TrainConfig, latest_checkpoint, train

TOKENIZER_MODEL = {
    "ch": 32,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "vocab_size": 64,
    "z_channels": 8,
    "patch_nums": [1, 2, 4],
    "using_sa": False,
    "using_mid_sa": False,
}
DATA = {"type": "shapes", "num_images": 32, "seed": 3}


def base_config(tmp: Path, **overrides) -> dict:
    config = {
        "output_dir": str(tmp),
        "data": DATA,
        "resolution": 16,
        "batch_size": 8,
        "log_every": 1,
        "warmup_steps": 1,
        "checkpoint_every": 100,
        "mixed_precision": "no",
        "seed": 0,
    }
    config.update(overrides)
    return config


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tokenizer")
    config = TrainConfig(
        **base_config(
            run,
            task="tokenizer",
            model=TOKENIZER_MODEL,
            max_steps=16,
            learning_rate=3e-3,
            weight_decay=0.0,
            ema_decay=None,
        )
    )
    return train(config)


def test_a_tokenizer_run_with_an_unused_phi_layer_resumes(tmp_path):
    """With patch_nums [1, 2, 4] one of the four shared Phi convs is used by no scale: it never gets a gradient, so
    the optimizer keeps no state for it; resuming must not ask for that state (it raised "Missing optimizer state")."""
    config = base_config(
        tmp_path, task="tokenizer", model=TOKENIZER_MODEL, max_steps=2, checkpoint_every=1, ema_decay=None
    )
    train(TrainConfig(**config))
    final = train(TrainConfig(**{**config, "max_steps": 3, "resume": "force"}))
    assert len(losses(tmp_path)) == 3 and (final / "config.json").is_file()


def test_a_resume_with_max_steps_below_the_checkpoint_is_refused_before_anything_changes(tmp_path):
    """resume=force with max_steps 1 under a step-2 checkpoint ran no step, exported the step-2 weights as final/ and
    rewrote train_config.json with max_steps 1. max_steps equal to the checkpoint's step exports it again."""
    config = base_config(
        tmp_path, task="tokenizer", model=TOKENIZER_MODEL, max_steps=2, checkpoint_every=1, ema_decay=None
    )
    train(TrainConfig(**config))
    before = _tree(tmp_path)
    checkpoint = re.escape(repr(str(tmp_path / "checkpoints" / "step-0000002")))
    for resume in ("force", "auto"):
        with pytest.raises(ValueError, match=rf"^`max_steps` 1 is below the step 2 of the checkpoint .*{checkpoint}"):
            train(TrainConfig(**{**config, "max_steps": 1, "resume": resume}))
        assert _tree(tmp_path) == before  # train_config.json, final/, the log and the checkpoints as they were
    final = train(TrainConfig(**config))  # the finished run, exported again from its last checkpoint
    assert len(losses(tmp_path)) == 2 and (final / "config.json").is_file()
    assert json.loads((tmp_path / "train_config.json").read_text())["max_steps"] == 2


def test_a_warm_up_longer_than_the_run_is_warned_about(tmp_path, recwarn):
    """warmup_steps > max_steps: the learning rate never reached `learning_rate`, without a word."""
    config = base_config(
        tmp_path, task="tokenizer", model=TOKENIZER_MODEL, max_steps=2, warmup_steps=4, learning_rate=1e-3
    )
    with pytest.warns(UserWarning, match=r"`warmup_steps` 4 is more than `max_steps` 2: .* not reach `learning_rate`"):
        train(TrainConfig(**config))
    assert all(json.loads(line)["lr"] < 1e-3 for line in (tmp_path / "train_log.jsonl").read_text().splitlines())
    recwarn.clear()
    train(TrainConfig(**{**config, "output_dir": str(tmp_path / "equal"), "warmup_steps": 2}))  # reaches it
    assert not [w for w in recwarn if "warmup_steps" in str(w.message)]


def test_tokenizer_training_reduces_loss_and_exports(tokenizer_dir):
    run = tokenizer_dir.parent
    history = losses(run)
    assert len(history) == 16
    assert sum(history[-4:]) / 4 < 0.9 * sum(history[:4]) / 4, history
    usage = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])["codebook_usage"]
    assert 0 < usage <= 1
    model = MultiScaleVQModel.from_pretrained(tokenizer_dir)
    images = torch.zeros(1, 3, 16, 16)
    assert [t.shape for t in model.encode_indices(images)] == [(1, 1), (1, 4), (1, 16)]
    assert latest_checkpoint(run / "checkpoints").name == "step-0000016"


def var_config(run: Path, tokenizer: Path, **overrides) -> dict:
    settings = {
        "task": "var",
        "tokenizer_path": str(tokenizer),
        "max_steps": 12,
        "learning_rate": 3e-3,
        "model": {"depth": 2, "embed_dim": 64, "num_heads": 2},
        "label_smoothing": 0.1,
        "ema_decay": 0.9,
    }
    settings.update(overrides)
    return base_config(run, **settings)


def test_var_training_reduces_loss_and_exports(tokenizer_dir, tmp_path):
    export = train(TrainConfig(**var_config(tmp_path, tokenizer_dir, sample_every=12)))
    history = losses(tmp_path)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3, history
    assert (tmp_path / "samples" / "step-0000012.png").is_file()
    pipe = VARPipeline.from_pretrained(export)
    assert pipe.transformer.config.num_classes == 90  # the shapes classes
    assert pipe.transformer.config.drop_path_rate == pytest.approx(0.1 * 2 / 24)  # the original trainer's rate
    assert pipe.get_label_ids(["red circle on blue"]) == [pipe.labels["red circle on blue"]]
    images = pipe(class_labels=[0, 5], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def _run_cli(config: dict, path: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DIFFUSERS_VAR_FAULT_INJECT", None)
    if fault:
        env["DIFFUSERS_VAR_FAULT_INJECT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "diffusers_var.training", config["task"], "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _two_processes(*args: str, timeout: int = 600) -> str:
    """``python -m *args`` (a launcher of two CPU processes, one thread each, no injected fault): the output of a
    run that succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFUSERS_VAR_FAULT_INJECT", None)
    result = subprocess.run(
        [sys.executable, "-m", *args], check=False, capture_output=True, text=True, env=env, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def test_killed_run_resumes_to_identical_weights(tokenizer_dir, tmp_path):
    """SIGKILL after step 3, then SIGKILL in the middle of writing checkpoint 4, then resume to the end:
    the result equals an uninterrupted run, and no half-written checkpoint is ever used or kept."""
    straight = var_config(
        tmp_path / "straight", tokenizer_dir, checkpoint_every=2, max_steps=6, data={**DATA, "num_images": 24}
    )
    interrupted = {**straight, "output_dir": str(tmp_path / "interrupted")}
    assert _run_cli(straight, tmp_path / "a.json").returncode == 0

    first = _run_cli(interrupted, tmp_path / "b.json", fault="step:3")
    assert first.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "interrupted" / "checkpoints").name == "step-0000002"
    second = _run_cli(interrupted, tmp_path / "b.json", fault="checkpoint:4")
    assert second.returncode == -signal.SIGKILL
    assert "resumed from" in second.stdout + second.stderr
    leftovers = [p.name for p in (tmp_path / "interrupted" / "checkpoints").iterdir()]
    assert ".tmp-step-0000004" in leftovers  # the half-written save ...
    assert (
        latest_checkpoint(tmp_path / "interrupted" / "checkpoints").name == "step-0000002"
    )  # ... is not a checkpoint
    third = _run_cli(interrupted, tmp_path / "b.json")
    assert third.returncode == 0, third.stderr[-2000:]
    assert not [p for p in (tmp_path / "interrupted" / "checkpoints").iterdir() if p.name.startswith(".tmp")]

    _assert_same_exported_weights(tmp_path / "straight", tmp_path / "interrupted")
    # each resume cut the steps after its checkpoint from the log: every step once, as in the straight run
    steps = {
        run: [json.loads(line)["step"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("straight", "interrupted")
    }
    assert steps["interrupted"] == steps["straight"] == sorted(set(steps["straight"]))


def test_a_diverging_run_stops_before_saving_nan_weights(tmp_path):
    """A learning rate that blows the weights up: the run stops with an error naming the step, writes no checkpoint
    or export of NaN weights and no NaN loss into the log (bare ``NaN`` is not JSON); earlier checkpoints stay."""
    config = base_config(
        tmp_path, task="tokenizer", model=TOKENIZER_MODEL, max_steps=4, checkpoint_every=1, ema_decay=None
    )
    with pytest.raises(ValueError, match="NaN or infinite at step [234]"):  # step 1 is the warm-up's, at lr 0
        train(TrainConfig(**{**config, "learning_rate": 1e30}))
    assert not (tmp_path / "final").exists()
    saved = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [path.name for path in saved] == ["step-0000001"]
    assert all(torch.isfinite(tensor).all() for tensor in load_file(saved[0] / "model.safetensors").values())
    logged = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert logged and all(math.isfinite(loss) for loss in logged)


def test_bad_training_configs(tmp_path):
    with pytest.raises(ValueError, match="task"):
        TrainConfig.load(None, ["task=star2"])
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.load(None, ["task=var", "tokenizer_path=x", "learning_rat=1"])
    with pytest.raises(ValueError, match="tokenizer_path"):
        TrainConfig.load(None, ["task=var"])
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig.load(None, ["task=tokenizer", "mixed_precision=fp8"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: tokenizer\n\tresolution: 16\n")  # a tab: PyYAML's ScannerError is no ValueError
    with pytest.raises(ValueError, match=r"`--config`: cannot read '.*broken.yaml' \(ValueError: while scanning"):
        TrainConfig.load(broken)
    exponent = tmp_path / "lr.yaml"
    exponent.write_text("task: tokenizer\nlearning_rate: 1e-4\n")  # YAML 1.1 reads it as text
    with pytest.raises(ValueError, match=r"`learning_rate` .*write it with a dot, e.g. 1.0e-4"):
        TrainConfig.load(exponent)
    exponent.write_text("task: tokenizer\nlearning_rate: .nan\n")  # a NaN is no number written without a dot
    with pytest.raises(ValueError, match=r"`learning_rate` must be a number > 0, got nan\.$"):
        TrainConfig.load(exponent)
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    PIL.Image.new("RGB", (16, 16)).save(images / "a" / "0.png")
    with pytest.raises(ValueError, match="`output_dir` .* is inside `data.path`"):
        TrainConfig.load(
            None, ["task=tokenizer", "data.type=imagefolder", f"data.path={images}", f"output_dir={images / 'run'}"]
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    from diffusers_var.training.data import build_dataset

    with pytest.raises(ValueError, match="no images"):
        build_dataset({"type": "imagefolder", "path": str(empty)}, 16)
    with pytest.raises(ValueError, match="data.type"):
        build_dataset({"type": "webdataset"}, 16)


def test_fsdp_export_rebuilds_the_plain_model_class():
    """FSDP2 swaps a sharded module's class for an ``FSDP<Name>`` subclass; the export must save the original
    class with the gathered full weights (exercised for real on two GPUs by benchmarks/bench_training_ddp.py)."""
    from diffusers_var import VARTransformer2DModel
    from diffusers_var.training.engine import _unsharded_copy

    class FSDPVARTransformer2DModel(VARTransformer2DModel):  # stand-in for the class FSDP2 creates
        pass

    torch.manual_seed(0)
    sharded = FSDPVARTransformer2DModel(depth=1, embed_dim=32, num_heads=2, num_classes=4, patch_nums=(1, 2))
    full_state = {k: v + 1 for k, v in sharded.state_dict().items()}
    copy = _unsharded_copy(sharded, full_state)
    assert type(copy) is VARTransformer2DModel
    for key, value in copy.state_dict().items():
        assert torch.equal(value, full_state[key]), key


class PlantedPayload:
    """Unpickling this creates the file ``path``: a stand-in for code planted in a run folder."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _weights(folder: Path) -> dict:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def _assert_same_exported_weights(first_run: Path, second_run: Path) -> None:
    """The transformers two runs exported (``final/``) hold the same weights."""
    a, b = _weights(first_run / "final"), _weights(second_run / "final")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_resume_never_unpickles_and_continues_from_safe_state(tokenizer_dir, tmp_path):
    """A run folder holding pickles with a payload (the files accelerate's save_state writes, and loads with
    weights_only=False) is resumed without running it, from the safetensors + JSON state, to the same weights."""
    run = tmp_path / "run"
    config = var_config(run, tokenizer_dir, max_steps=3, checkpoint_every=2, data={**DATA, "num_images": 16})
    reference = _weights(train(TrainConfig(**config)))
    shutil.rmtree(run / "checkpoints" / "step-0000003")
    checkpoint = run / "checkpoints" / "step-0000002"
    marker = tmp_path / "payload-ran"
    for name in (
        "custom_checkpoint_0.pkl",
        "custom_checkpoint_1.pkl",
        "random_states_0.pkl",
        "optimizer.bin",
        "scheduler.bin",
        "sampler.bin",
    ):
        torch.save(PlantedPayload(marker), checkpoint / name)
    resumed = _weights(train(TrainConfig(**config)))
    assert not marker.exists(), "resuming ran code planted in the checkpoint"
    # step 3 ran again after the checkpoint of step 2: logged once (the resume cut the first run's record)
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=0, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_a_damaged_newest_checkpoint_is_skipped_and_kept(tokenizer_dir, tmp_path, capsys):
    """A checkpoint whose files were cut short or lost after it was written (a full disk, a partial copy): resuming
    uses the checkpoint before it, says so, and moves the damaged one aside (kept, out of the way of the saves at
    the same steps and of the rotation); the result equals an uninterrupted run. All damaged is a named error."""
    config = var_config(
        tmp_path / "straight",
        tokenizer_dir,
        max_steps=4,
        checkpoint_every=1,
        keep_checkpoints=2,
        data={**DATA, "num_images": 16},
    )
    reference = _weights(train(TrainConfig(**config)))
    run = tmp_path / "run"
    config = {**config, "output_dir": str(run)}
    train(TrainConfig(**{**config, "max_steps": 3}))
    checkpoints = run / "checkpoints"
    damaged = checkpoints / "step-0000003" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    kept = damaged.read_bytes()
    capsys.readouterr()
    resumed = _weights(train(TrainConfig(**{**config, "resume": "force"})))  # force: max_steps differs
    out = capsys.readouterr().out
    assert "skipped damaged checkpoints (kept): step-0000003: optimizer.safetensors is damaged" in out
    (aside,) = checkpoints.glob("damaged-step-0000003-*")
    assert (aside / "optimizer.safetensors").read_bytes() == kept
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000003", "step-0000004"]
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=0, rtol=0, msg=lambda m, key=key: f"{key}: {m}")

    for checkpoint in checkpoints.glob("step-*"):  # now every one of them
        (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"`resume`: every checkpoint .* is damaged .*model\.safetensors missing"):
        train(TrainConfig(**{**config, "max_steps": 5, "resume": "force"}))


def test_pruning_deletes_only_the_trainers_oldest_checkpoints(tokenizer_dir, tmp_path, capsys):
    """Pruning counts the trainer's checkpoints by step number: a file or folder that only has a checkpoint's name
    is neither counted nor deleted (a stray ``step-0000008`` file once made it delete every real checkpoint), and a
    user's file inside a pruned checkpoint stays, with its folder."""
    from diffusers_var.training.engine import prune_checkpoints

    run = tmp_path / "run"
    config = var_config(
        run, tokenizer_dir, max_steps=2, checkpoint_every=1, keep_checkpoints=1, data={**DATA, "num_images": 16}
    )
    train(TrainConfig(**config))
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002"]
    (checkpoints / "step-0000008").write_text("not a checkpoint")
    (checkpoints / "step-0000001").mkdir()
    (checkpoints / "step-0000001" / "notes.txt").write_text("mine")
    (checkpoints / "step-0000002" / "notes.md").write_text("mine too")
    capsys.readouterr()
    train(TrainConfig(**{**config, "max_steps": 4, "resume": "force"}))
    assert "pruned checkpoint step-0000002, but kept its files ['notes.md']" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step-0000001",
        "step-0000002",
        "step-0000004",
        "step-0000008",
    ]
    assert [p.name for p in (checkpoints / "step-0000002").iterdir()] == ["notes.md"]
    assert (checkpoints / "step-0000001" / "notes.txt").read_text() == "mine"
    assert (checkpoints / "step-0000008").read_text() == "not a checkpoint"
    assert (checkpoints / "step-0000004" / "trainer_state.json").is_file()

    # an unfinished save's folder (.tmp-step-N) is cleaned at the next start, but a file of the user's in it stays:
    # the folder goes aside with it (it was deleted whole)
    unfinished = checkpoints / ".tmp-step-0000099"
    shutil.copytree(checkpoints / "step-0000004", unfinished)
    (unfinished / "notes.txt").write_text("mine")
    shutil.copytree(checkpoints / "step-0000004", checkpoints / ".tmp-step-0000098")  # ours alone: removed
    capsys.readouterr()
    train(TrainConfig(**{**config, "max_steps": 5, "resume": "force"}))
    assert "kept notes.txt of an unfinished checkpoint folder as kept.tmp-step-0000099-" in capsys.readouterr().out
    (aside,) = checkpoints.glob("kept.tmp-step-0000099-*")
    assert [p.name for p in aside.iterdir()] == ["notes.txt"] and (aside / "notes.txt").read_text() == "mine"
    assert not unfinished.exists() and not (checkpoints / ".tmp-step-0000098").exists()
    shutil.rmtree(aside)

    # by step number, not by name: step-10000000 is newer than step-9999998
    for step in (9999998, 10000000):
        shutil.copytree(checkpoints / "step-0000005", checkpoints / f"step-{step:07d}")
    prune_checkpoints(checkpoints, keep=1)
    assert sorted(p.name for p in checkpoints.glob("step-*") if (p / "trainer_state.json").exists()) == [
        "step-10000000"
    ]

    # a pruning killed after it deleted the state file left a damaged folder, which was no checkpoint and never
    # pruned again (an optimizer's worth of disk): older than the newest kept, it goes at the next pruning
    half_pruned = checkpoints / "step-0000003"
    shutil.copytree(checkpoints / "step-10000000", half_pruned)
    (half_pruned / "trainer_state.json").unlink()
    prune_checkpoints(checkpoints, keep=1)
    assert not half_pruned.exists() and (checkpoints / "step-10000000" / "trainer_state.json").is_file()
    assert (checkpoints / "step-0000001" / "notes.txt").read_text() == "mine"


def _killed_safetensors_write(folder: Path) -> Path:
    """The temporary file safetensors leaves when it is SIGKILLed while writing ``folder/optimizer.safetensors`` (it
    writes a sibling temporary file and renames it over the file)."""
    writer = (
        "import sys, torch; from safetensors.torch import save_file; tensors = {'a': torch.ones(8_000_000)}\n"
        "while True: save_file(tensors, sys.argv[1])"
    )
    for _ in range(20):  # (a kill between a rename and the next write leaves none: again)
        process = subprocess.Popen([sys.executable, "-c", writer, str(folder / "optimizer.safetensors")])
        try:
            while not (temporary := [p for p in folder.iterdir() if p.name.startswith(".tmp")]):
                assert process.poll() is None, "the writer stopped"
        finally:
            process.kill()
            process.wait()
        if temporary := [p for p in folder.iterdir() if p.name.startswith(".tmp")]:
            return temporary[0]
    raise AssertionError("no write of safetensors was cut short")


def test_an_unfinished_checkpoint_folder_loses_the_temporary_files_of_its_writes(tmp_path, capsys):
    """A SIGKILL in the middle of a checkpoint's safetensors write leaves safetensors' own temporary file in the
    unfinished ``.tmp-step-N`` folder; the next start kept it as a file of the user's (an optimizer's size, moved to
    ``kept.tmp-step-N-...`` for good). It is the trainer's: removed with the folder's other files. A file of the user's
    with such a name but other contents stays."""
    from diffusers_var.training.checkpoint import SAFETENSORS_TEMPORARY

    config = base_config(tmp_path / "run", task="tokenizer", model=TOKENIZER_MODEL, max_steps=2, checkpoint_every=1)
    train(TrainConfig(**config))
    checkpoints = tmp_path / "run" / "checkpoints"
    unfinished = checkpoints / ".tmp-step-0000003"  # cut short while writing the optimizer state
    unfinished.mkdir()
    for name in ("model.safetensors", "rng_state_0.safetensors", "rng_state_0.json"):
        shutil.copy(checkpoints / "step-0000002" / name, unfinished / name)
    temporary = _killed_safetensors_write(unfinished)
    assert SAFETENSORS_TEMPORARY.match(temporary.name), temporary.name
    (unfinished / ".tmpMine12").write_text("mine")  # the name of one, but not what safetensors writes
    (unfinished / "notes.txt").write_text("mine too")
    cut_early = checkpoints / ".tmp-step-0000004"  # cut short before anything was written but the file's size
    cut_early.mkdir()
    shutil.copy(checkpoints / "step-0000002" / "rng_state_0.json", cut_early / "rng_state_0.json")
    (cut_early / ".tmpa1B2c3").write_bytes(bytes(4096))
    capsys.readouterr()
    train(TrainConfig(**{**config, "max_steps": 4, "resume": "force"}))
    assert "kept .tmpMine12, notes.txt of an unfinished checkpoint folder as kept.tmp-step-0000003-" in (
        capsys.readouterr().out
    )
    (aside,) = checkpoints.glob("kept.tmp-step-0000003-*")
    assert sorted(p.name for p in aside.iterdir()) == [".tmpMine12", "notes.txt"]
    assert (aside / ".tmpMine12").read_text() == "mine"
    assert not list(checkpoints.glob("kept.tmp-step-0000004-*"))  # nothing but the trainer's: removed
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("kept")) == [
        "step-0000003",
        "step-0000004",
    ]


def test_files_and_folders_of_yours_with_a_checkpoints_name_neither_resume_nor_are_replaced(tokenizer_dir, tmp_path):
    """A file of the user's named ``checkpoints/step-0000002`` ended the run with NotADirectoryError after it had
    trained; a folder of the user's named like the newest checkpoint was resumed from (and refused)."""
    run = tmp_path / "run"
    config = var_config(
        run, tokenizer_dir, max_steps=2, checkpoint_every=2, ema_decay=None, data={**DATA, "num_images": 16}
    )
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-0000002").write_text("mine")
    with pytest.raises(
        ValueError,
        match=r"`output_dir`: the run saves its step-2 checkpoint as .*step-0000002', but a file the trainer did not",
    ):
        train(TrainConfig(**config))
    assert not (run / "train_log.jsonl").exists()  # refused before training
    train(TrainConfig(**{**config, "checkpoint_every": 1, "max_steps": 1}))  # a run that does not save step 2
    assert (run / "checkpoints" / "step-0000002").read_text() == "mine"
    os.remove(run / "checkpoints" / "step-0000002")
    (run / "checkpoints" / "step-0000009").mkdir()
    (run / "checkpoints" / "step-0000009" / "notes.txt").write_text("mine")
    train(TrainConfig(**{**config, "max_steps": 2, "resume": "force"}))  # from step-0000001, the trainer's newest
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(ValueError, match=r"saves its step-9 checkpoint as .*step-0000009', but a folder the trainer"):
        # (step 9 is no multiple of checkpoint_every, but a time limit may end the run there)
        train(
            TrainConfig(
                **{**config, "max_steps": 10, "checkpoint_every": 4, "time_limit_minutes": 60, "resume": "force"}
            )
        )
    assert (run / "checkpoints" / "step-0000009" / "notes.txt").read_text() == "mine"


def test_a_full_disk_while_saving_a_checkpoint_is_one_error_line(tokenizer_dir, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, not an OSError: the command's one-line message for
    a full disk missed it, and a traceback ended the run."""
    from safetensors import SafetensorError

    from diffusers_var.cli import main
    from diffusers_var.training import checkpoint

    def full(tensors, path, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(var_config(tmp_path / "run", tokenizer_dir, max_steps=1, ema_decay=None)))
    assert main(["train", "var", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no space left on the device writing ") and "rng_state_0.safetensors" in err
    # space freed: the rerun is not refused over the (empty) folder of the interrupted save, which it clears
    monkeypatch.undo()
    assert main(["train", "var", "--config", str(config)]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000001"]


def test_sample_grids_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run killed (or a disk filled) while it wrote a sample grid left half a PNG in place of the grid before."""
    from diffusers_var.training.tasks import _save_grid

    path = tmp_path / "samples" / "step-0000002.png"
    _save_grid(torch.rand(3, 3, 8, 8), path)
    before = path.read_bytes()
    assert PIL.Image.open(path).size == (24, 8)

    def cut_short(image, fp, *args, **kwargs):
        Path(fp).write_bytes(before[:20])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", cut_short)
    with pytest.raises(OSError, match="No space left"):
        _save_grid(torch.rand(3, 3, 8, 8), path)
    assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]


def test_checkpoint_files_get_the_mode_of_the_umask(tmp_path):
    """safetensors writes its files 0600: a run folder shared with a group (umask 002 / 022) held checkpoints that
    nobody else could resume, beside JSON files of the umask's mode."""
    old = os.umask(0o022)
    try:
        config = base_config(tmp_path, task="tokenizer", model=TOKENIZER_MODEL, max_steps=1, ema_decay=0.9)
        train(TrainConfig(**config))
    finally:
        os.umask(old)
    checkpoint = tmp_path / "checkpoints" / "step-0000001"
    modes = {path.name: path.stat().st_mode & 0o777 for path in checkpoint.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "ema.safetensors", "rng_state_0.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_a_checkpoint_without_its_random_state_is_damaged(tokenizer_dir, tmp_path):
    """A lost RNG file was not damage: the run resumed from that checkpoint with a fresh random state (other label
    dropout than the run it continued); it is skipped like any checkpoint with a file missing."""
    from diffusers_var.training.checkpoint import checkpoint_damage

    source = tokenizer_dir.parent / "checkpoints" / "step-0000016"
    for name in ("rng_state_0.json", "rng_state_0.safetensors"):
        checkpoint = shutil.copytree(source, tmp_path / name / "step-0000016")
        (checkpoint / name).unlink()
        assert checkpoint_damage(checkpoint) == f"{name} missing"


def test_checkpoints_edited_after_saving_are_damaged_or_named(tokenizer_dir, tmp_path):
    """Files that parse but lack what a resume reads are damage (skipped, the checkpoint before is used), not a
    KeyError from deep inside the resume; NaN weights or a scheduler state of another kind are a named error."""
    from diffusers_var.training.checkpoint import STATE_FILE, checkpoint_damage

    source = tokenizer_dir.parent / "checkpoints" / "step-0000016"
    assert checkpoint_damage(source) is None
    edits = {
        "rng": ("rng_state_0.json", lambda _: {}, "rng_state_0.json has no python random state"),
        "optimizer": (STATE_FILE, lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "no optimizer"),
        "scheduler": (STATE_FILE, lambda s: {**s, "scheduler": {}}, "has no scheduler state"),
        # random.setstate's bare "state vector is the wrong size" at the resume, with no fallback
        "rng_size": (
            "rng_state_0.json",
            lambda s: {**s, "python": {**s["python"], "state": s["python"]["state"][:10]}},
            "rng_state_0.json has a python random state of the wrong size",
        ),
        # int() / random.setstate of these failed bare at the resume (or at the next random.gauss)
        "rng_pos": (
            "rng_state_0.json",
            lambda s: {**s, "numpy": {**s["numpy"], "pos": "abc"}},
            "rng_state_0.json has numpy `pos` 'abc', not a whole number in [0, 624]",
        ),
        "rng_gauss": (
            "rng_state_0.json",
            lambda s: {**s, "python": {**s["python"], "gauss_next": "x"}},
            "rng_state_0.json has python `gauss_next` 'x', not a number or null",
        ),
        "rng_has_gauss": (
            "rng_state_0.json",
            lambda s: {**s, "numpy": {**s["numpy"], "has_gauss": 2}},
            "has numpy `has_gauss` 2, not 0 or 1",
        ),
    }
    for name, (file, edit, problem) in edits.items():
        checkpoint = shutil.copytree(source, tmp_path / name / "step-0000016")
        (checkpoint / file).write_text(json.dumps(edit(json.loads((source / file).read_text()))))
        assert problem in checkpoint_damage(checkpoint), name
    # a copy cut short before its model file and state file: damaged (the one before is used), not foreign
    checkpoint = shutil.copytree(source, tmp_path / "cut" / "step-0000016")
    for name in (STATE_FILE, "model.safetensors"):
        (checkpoint / name).unlink()
    assert "trainer_state.json is missing" in checkpoint_damage(checkpoint)
    checkpoint = shutil.copytree(source, tmp_path / "keys" / "step-0000016")
    tensors = load_file(checkpoint / "optimizer.safetensors")
    save_file({key.replace(":", "_"): t for key, t in tensors.items()}, checkpoint / "optimizer.safetensors")
    assert "optimizer.safetensors has keys that are not '<parameter>:<state>'" in checkpoint_damage(checkpoint)
    checkpoint = shutil.copytree(source, tmp_path / "numpy_keys" / "step-0000016")  # an IndexError at the resume
    rng = load_file(checkpoint / "rng_state_0.safetensors")
    save_file({**rng, "numpy_keys": rng["numpy_keys"][:100]}, checkpoint / "rng_state_0.safetensors")
    assert "rng_state_0.safetensors has `numpy_keys` of shape [100], not numpy's 624" in checkpoint_damage(checkpoint)

    run = tmp_path / "run"
    config = var_config(run, tokenizer_dir, max_steps=2, checkpoint_every=2, data={**DATA, "num_images": 16})
    train(TrainConfig(**config))
    model_file = run / "checkpoints" / "step-0000002" / "model.safetensors"
    weights = load_file(model_file)
    key = next(k for k, t in weights.items() if t.is_floating_point())
    save_file({**weights, key: torch.full_like(weights[key], float("nan"))}, model_file)
    with pytest.raises(ValueError, match=r"`resume`: checkpoint .* holds non-finite \(NaN / inf\) weights"):
        train(TrainConfig(**{**config, "max_steps": 3, "resume": "force"}))
    save_file(weights, model_file)
    state_file = run / "checkpoints" / "step-0000002" / STATE_FILE
    saved = json.loads(state_file.read_text())
    scheduler = {k: v for k, v in saved["scheduler"].items() if k != "lr_lambdas"}
    state_file.write_text(json.dumps({**saved, "scheduler": scheduler}))
    with pytest.raises(ValueError, match=r"`resume`: the scheduler state in .* does not fit this run's scheduler"):
        train(TrainConfig(**{**config, "max_steps": 3, "resume": "force"}))
    fewer = {**saved["scheduler"], "base_lrs": saved["scheduler"]["base_lrs"][:1]}  # zip() failed at the first step
    state_file.write_text(json.dumps({**saved, "scheduler": fewer}))
    with pytest.raises(ValueError, match=r"scheduler state .* \(ValueError: 1 base learning rates for 2 optimizer"):
        train(TrainConfig(**{**config, "max_steps": 3, "resume": "force"}))
    state_file.write_text(json.dumps(saved))
    # a moment of another shape failed at the first step; a NaN one was reported as a diverged run; NaN EMA weights
    # became the export
    optimizer_file, ema_file = model_file.with_name("optimizer.safetensors"), model_file.with_name("ema.safetensors")
    moments, shadow = load_file(optimizer_file), load_file(ema_file)
    key = next(k for k in moments if k.endswith(":exp_avg_sq") and moments[k].ndim == 2)
    step_key = next(k for k in moments if k.endswith(":step"))
    for file, tensors, message in (
        (
            optimizer_file,
            {**moments, key: moments[key][:1]},
            rf"has optimizer\.safetensors entry '{re.escape(key)}' of shape \(1, ",
        ),
        (
            optimizer_file,
            {**moments, key: moments[key] * float("nan")},
            rf"has non-finite \(NaN / inf\) values in .*'{re.escape(key)}'",
        ),
        (
            optimizer_file,
            {**moments, key: -moments[key] - 1},
            rf"has negative values in .*'{re.escape(key)}' \(a sum of squares\)",
        ),
        (  # AdamW's bias correction of a negative step was complex: a RuntimeError at the first step
            optimizer_file,
            {**moments, step_key: torch.tensor(-5.0)},
            rf"has optimizer\.safetensors entry '{re.escape(step_key)}' -5\.0, not a step count >= 0",
        ),
        (ema_file, {k: t * float("nan") for k, t in shadow.items()}, r"holds non-finite \(NaN / inf\) EMA weights"),
    ):
        save_file(tensors, file)
        with pytest.raises(ValueError, match=rf"`resume`: checkpoint .*step-0000002' {message}.*changed after it was"):
            train(TrainConfig(**{**config, "max_steps": 3, "resume": "force"}))
        save_file(moments if file == optimizer_file else shadow, file)
    train(TrainConfig(**{**config, "max_steps": 3, "resume": "force"}))  # as saved: it resumes


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny tokenizer run with EMA and checkpoints at steps 2 and 4 (edited copies resume from step 2)."""
    run = tmp_path_factory.mktemp("ema_run")
    config = base_config(
        run, task="tokenizer", model=TOKENIZER_MODEL, max_steps=4, checkpoint_every=2, ema_decay=0.9, weight_decay=0.0
    )
    train(TrainConfig(**config))
    return run, config


def _edit_json(file: str, edit):
    def apply(checkpoint: Path) -> None:
        (checkpoint / file).write_text(json.dumps(edit(json.loads((checkpoint / file).read_text()))))

    return apply


def _edit_tensors(file: str, edit):
    def apply(checkpoint: Path) -> None:
        save_file(edit(load_file(checkpoint / file)), checkpoint / file)

    return apply


def _first_group(state: dict, **changes) -> dict:
    groups = state["optimizer"]["param_groups"]
    return {**state, "optimizer": {**state["optimizer"], "param_groups": [{**groups[0], **changes}, *groups[1:]]}}


def _without_params(state: dict) -> dict:
    groups = state["optimizer"]["param_groups"]
    first = {k: v for k, v in groups[0].items() if k != "params"}
    return {**state, "optimizer": {**state["optimizer"], "param_groups": [first, *groups[1:]]}}


def _python_rng(meta: dict, **changes) -> dict:
    return {**meta, "python": {**meta["python"], **changes}}


# each failed deep inside the resume (a KeyError / TypeError of torch, diffusers or random), or at the first step,
# with no fallback to the checkpoint before
EDITED_CHECKPOINTS = {
    "ema_without_parameters": (
        _edit_json("trainer_state.json", lambda s: {**s, "ema": {"values": s["ema"]["values"]}}),
        "`ema` section without a list of distinct parameter names `parameters`",
    ),
    "ema_true": (_edit_json("trainer_state.json", lambda s: {**s, "ema": True}), "`ema` section without its `values`"),
    "ema_decay": (
        _edit_json("trainer_state.json", lambda s: {**s, "ema": {**s["ema"], "values": {"decay": "x"}}}),
        "ema `decay` 'x', not a number in [0, 1]",
    ),
    "group_without_params": (
        _edit_json("trainer_state.json", _without_params),
        "optimizer param_groups[0] has no list of parameter names `params`",
    ),
    "groups_of_strings": (
        _edit_json("trainer_state.json", lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": ["x"]}}),
        "optimizer param_groups[0] has no list of parameter names `params`",
    ),
    "values_not_a_mapping": (
        _edit_json("trainer_state.json", lambda s: {**s, "optimizer": {**s["optimizer"], "values": {"a": [1]}}}),
        "optimizer values for 'a' that are not a mapping of numbers",
    ),
    "parameter_in_two_groups": (  # loaded without a word
        _edit_json(
            "trainer_state.json",
            lambda s: _first_group(s, params=[*s["optimizer"]["param_groups"][0]["params"], "decoder.conv_in.bias"]),
        ),
        "optimizer param_groups that name a parameter twice (['decoder.conv_in.bias'])",
    ),
    "betas": (
        _edit_json("trainer_state.json", lambda s: _first_group(s, betas=[2, 3])),
        "param_groups[0] has `betas` [2, 3], not two numbers in [0, 1)",
    ),
    "lr": (_edit_json("trainer_state.json", lambda s: _first_group(s, lr="x")), "has `lr` 'x', not a finite number"),
    "scheduler_last_epoch": (
        _edit_json("trainer_state.json", lambda s: {**s, "scheduler": {**s["scheduler"], "last_epoch": "x"}}),
        "scheduler `last_epoch` 'x', not a whole number of steps",
    ),
    "config_list": (
        _edit_json("trainer_state.json", lambda s: {**s, "config": [1]}),
        "has a `config` that is not a mapping",
    ),
    "torch_rng_float": (
        _edit_tensors("rng_state_0.safetensors", lambda t: {**t, "torch": t["torch"].float()}),
        "rng_state_0.safetensors has `torch` of dtype F32, not U8",
    ),
    "python_rng_version": (
        _edit_json("rng_state_0.json", lambda m: _python_rng(m, version=99)),
        "rng_state_0.json has python `version` 99, not 3",
    ),
    "python_rng_negative_word": (
        _edit_json("rng_state_0.json", lambda m: _python_rng(m, state=[-1, *m["python"]["state"][1:]])),
        "rng_state_0.json has a python random state with words out of range",
    ),
}


@pytest.mark.parametrize("case", sorted(EDITED_CHECKPOINTS))
def test_a_checkpoint_edited_after_saving_is_skipped_for_the_one_before(ema_run, tmp_path, capsys, case):
    """JSON that parses and tensors that load, but of a kind the resume cannot use, are damage: the checkpoint is
    skipped with a warning naming it and the entry, kept aside, and the run resumes from the one before."""
    edit, problem = EDITED_CHECKPOINTS[case]
    source, config = ema_run
    run = shutil.copytree(source, tmp_path / "run")
    edit(run / "checkpoints" / "step-0000004")
    capsys.readouterr()
    train(TrainConfig(**{**config, "output_dir": str(run)}))
    out = capsys.readouterr().out
    assert re.search(rf"skipped damaged checkpoints \(kept\): step-0000004: [^\n]*{re.escape(problem)}", out), out
    assert f"resumed from {run / 'checkpoints' / 'step-0000002'} (step 2)" in out
    (aside,) = (run / "checkpoints").glob("damaged-step-0000004-*")
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_an_optimizer_state_torch_refuses_is_a_named_error(ema_run, tmp_path, monkeypatch):
    """What the structural checks let through and torch refuses while loading the optimizer state is a `resume` error
    naming the checkpoint, not torch's traceback."""
    import torch.distributed.checkpoint.state_dict as state_dict

    def refuse(*args, **kwargs):
        raise RuntimeError("a state torch refuses\nmore lines")

    source, config = ema_run
    run = shutil.copytree(source, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    monkeypatch.setattr(state_dict, "set_optimizer_state_dict", refuse)
    checkpoint = re.escape(str(run / "checkpoints" / "step-0000002"))
    message = rf"`resume`: checkpoint '{checkpoint}' has an optimizer state torch cannot load \(RuntimeError: a state"
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**{**config, "output_dir": str(run)}))


def test_undecodable_bytes_in_the_log_are_dropped_on_resume(tmp_path):
    """Bytes that are not UTF-8 in ``train_log.jsonl`` (a disk error, a binary write) stopped the resume with a
    UnicodeDecodeError; they are a damaged line like a half-written one: dropped, the records around them kept."""
    from diffusers_var.training.engine import _cut_log_after

    log = tmp_path / "train_log.jsonl"
    log.write_bytes(b'{"step": 1}\n\xff\xfe\x00garbage\n{"step": 2}\n{"step": 3}\n')
    _cut_log_after(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_changed_config_is_refused_unless_told(tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    config = var_config(run, tokenizer_dir, max_steps=2, checkpoint_every=2, data={**DATA, "num_images": 16})
    train(TrainConfig(**config))
    saved_config = (run / "train_config.json").read_text()

    with pytest.raises(ValueError, match=r"`resume`.*learning_rate 0\.003 -> 0\.001.*resume=never.*resume=force"):
        train(TrainConfig(**{**config, "learning_rate": 1e-3, "max_steps": 3}))
    assert (run / "train_config.json").read_text() == saved_config  # not rewritten by a refused run
    deeper = {**config, "model": {**config["model"], "depth": 3}}
    with pytest.raises(ValueError, match=r"model\.depth 2 -> 3"):
        train(TrainConfig(**deeper))
    with pytest.raises(ValueError, match="`model`: the model weights in checkpoint .* does not fit"):
        train(TrainConfig(**deeper, resume="force"))  # a named error, not a raw state_dict one
    assert (run / "train_config.json").read_text() == saved_config

    # force: continue from the checkpoint, with the new learning rate and schedule (and EMA decay) from here on
    forced = {**config, "learning_rate": 1e-3, "max_steps": 3, "ema_decay": 0.5, "resume": "force"}
    train(TrainConfig(**forced))
    last = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    from diffusers_var.training.engine import _lr_lambda

    assert last["step"] == 3 and last["lr"] == pytest.approx(1e-3 * _lr_lambda(TrainConfig(**forced))(3))
    assert json.loads((run / "train_config.json").read_text())["learning_rate"] == 1e-3
    # the EMA decay too (the loaded EMA state kept 0.9 while train_config.json said 0.5)
    assert (
        json.loads((run / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())["ema"]["values"]["decay"]
        == 0.5
    )

    # never: a fresh run; the previous one's files are moved aside, not deleted
    train(TrainConfig(**{**config, "resume": "never"}))
    (previous,) = (run / "previous-runs").iterdir()
    assert (previous / "checkpoints" / "step-0000003").is_dir() and (previous / "final" / "model_index.json").is_file()
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_model_folder_replaced_at_the_same_path_is_refused(tokenizer_dir, tmp_path, capsys):
    """The resume compared the path strings only: a tokenizer folder swapped for another tokenizer at the same path
    (weights of the same size) resumed without a word. A copy of the same folder at another path still resumes."""
    tokenizer = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    run = tmp_path / "run"
    config = var_config(run, tokenizer, max_steps=2, checkpoint_every=2, ema_decay=None)
    train(TrainConfig(**config))
    weights = next(tokenizer.glob("*.safetensors"))
    original = weights.read_bytes()
    other = load_file(weights)
    save_file({k: t + 0.01 if t.is_floating_point() else t for k, t in other.items()}, weights, {"format": "pt"})
    assert weights.stat().st_size == len(original)
    message = rf"`resume`: .*: tokenizer_path the files of '{re.escape(str(tokenizer))}' are not those the run started"
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**config))
    weights.write_bytes(original)
    moved = shutil.copytree(tokenizer, tmp_path / "elsewhere" / "tok")
    capsys.readouterr()
    train(TrainConfig(**{**config, "max_steps": 3, "tokenizer_path": str(moved), "resume": "force"}))
    assert "continuing step-0000002 with changed max_steps\n" in capsys.readouterr().out  # the same files
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_relative_data_path_resumed_from_another_folder_is_another_folder(tmp_path, monkeypatch):
    """``data.path`` is compared resolved; a model folder by its files, less a run folder inside it."""
    from diffusers_var.training.engine import input_differences, input_fingerprints

    for name in ("a", "b"):
        (tmp_path / name / "images").mkdir(parents=True)
    config = TrainConfig(task="tokenizer", data={"type": "imagefolder", "path": "images"})
    monkeypatch.chdir(tmp_path / "a")
    started = input_fingerprints(config)
    assert started == {"data.path": {"path": str(tmp_path / "a" / "images")}}
    assert input_differences(started, input_fingerprints(config)) == {}
    monkeypatch.chdir(tmp_path / "b")
    assert list(input_differences(started, input_fingerprints(config))) == ["data.path"]
    # a run folder inside a model folder: what the run writes there is not part of the model's files
    (tmp_path / "tok" / "config.json").parent.mkdir()
    (tmp_path / "tok" / "config.json").write_text("{}")
    config = TrainConfig(task="var", tokenizer_path=str(tmp_path / "tok"), output_dir=str(tmp_path / "tok" / "run"))
    started = input_fingerprints(config)
    (tmp_path / "tok" / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "tok" / "run" / "train_log.jsonl").write_text("{}")
    assert input_differences(started, input_fingerprints(config)) == {}
    (tmp_path / "tok" / "README.md").write_text("notes")  # files no loader reads: a README, other formats' weights
    (tmp_path / "tok" / "flax_model.msgpack").write_bytes(b"0")
    (tmp_path / "tok" / "weights.safetensors").write_bytes(b"0")
    started = input_fingerprints(config)
    (tmp_path / "tok" / "README.md").write_text("other notes")
    os.remove(tmp_path / "tok" / "flax_model.msgpack")
    assert input_differences(started, input_fingerprints(config)) == {}
    (tmp_path / "tok" / "config.json").write_text('{"vocab_size": 8}')
    assert list(input_differences(started, input_fingerprints(config))) == ["tokenizer_path"]
    # a model folder inside the run's output_dir: its files count (leaving the run's folder out left out all of them)
    inside = TrainConfig(task="var", tokenizer_path=str(tmp_path / "tok"), output_dir=str(tmp_path))
    started = input_fingerprints(inside)
    (tmp_path / "tok" / "config.json").write_text('{"vocab_size": 9}')
    assert list(input_differences(started, input_fingerprints(inside))) == ["tokenizer_path"]
    # model.init_from: a resume takes the checkpoint's weights, not its, so only its string is compared
    config = TrainConfig(task="var", tokenizer_path=str(tmp_path / "tok"), model={"init_from": str(tmp_path / "tok")})
    assert "model.init_from" not in input_fingerprints(config)


def test_a_trainer_state_with_a_bad_step_count_is_named(tokenizer_dir, tmp_path):
    """``step`` / ``accelerator_step`` of ``trainer_state.json`` set the resumed counters: anything but a whole number
    is an error naming the file and the key, not ``int()``'s message."""
    from diffusers_var.training.checkpoint import STATE_FILE, read_training_state

    checkpoint = shutil.copytree(tokenizer_dir.parent / "checkpoints" / "step-0000016", tmp_path / "step-0000016")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert read_training_state(checkpoint)["step"] == 16
    for key, value in (("step", "abc"), ("step", -1), ("accelerator_step", 2.5), ("step", True)):
        (checkpoint / STATE_FILE).write_text(json.dumps({**state, key: value}))
        with pytest.raises(ValueError, match=rf"`resume`: .*{STATE_FILE}.* has `{key}`"):
            read_training_state(checkpoint)


def test_checkpoints_of_the_pickle_format_are_refused(tokenizer_dir, tmp_path):
    old = tmp_path / "checkpoints" / "step-0000004"
    old.mkdir(parents=True)
    torch.save({"step": 4}, old / "custom_checkpoint_0.pkl")
    config = var_config(tmp_path, tokenizer_dir, max_steps=2)
    with pytest.raises(ValueError, match=r"`resume`.*pickle files \(custom_checkpoint_0.pkl\).*resume=never"):
        train(TrainConfig(**config))


def test_adamw_is_fused_on_cuda_except_under_fsdp(tokenizer_dir, tmp_path):
    """The update is one fused kernel on CUDA (as the original trainers'); FSDP and the CPU keep the default.
    Built on CPU parameters here: only the choice is checked (PyTorch accepts fused on the CPU too)."""
    from diffusers_var.training.engine import _adamw

    config = TrainConfig(**var_config(tmp_path, tokenizer_dir, max_steps=1))
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "weight_decay": 0.0}]
    assert _adamw(groups, config, torch.device("cuda"), fsdp=False).defaults["fused"] is True
    for device, fsdp in (("cuda", True), ("cpu", False)):
        optimizer = _adamw(groups, config, torch.device(device), fsdp=fsdp)
        assert not optimizer.defaults["fused"] and optimizer.defaults["lr"] == config.learning_rate


def test_a_resumed_run_keeps_its_own_optimizer_implementation(tokenizer_dir, tmp_path, monkeypatch):
    """A checkpoint saved by an unfused AdamW (the CPU, or a run before the fused one) resumed where the optimizer is
    fused (CUDA): the groups keep ``fused=True`` (the saved ``fused=None`` would come back with the groups, and fp16
    loss scaling then fails), and the learning rate still comes from the checkpoint. Fused on the CPU stands in."""
    from diffusers_var.training import engine

    run = tmp_path / "run"
    config = var_config(run, tokenizer_dir, max_steps=2, checkpoint_every=1, ema_decay=None)
    train(TrainConfig(**config))
    shutil.rmtree(run / "checkpoints" / "step-0000002")
    built = []

    def fused_adamw(groups, config, device, fsdp):
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.adam_betas), fused=True)
        built.append(optimizer)
        return optimizer

    monkeypatch.setattr(engine, "_adamw", fused_adamw)
    train(TrainConfig(**config))
    (optimizer,) = built
    assert [group["fused"] for group in optimizer.param_groups] == [True, True]
    assert all(state["step"].item() == 2 for state in optimizer.state.values())  # one step loaded, one taken


def test_allow_tf32_turns_tf32_on_for_the_run(tokenizer_dir, tmp_path):
    """``allow_tf32: true`` (the original VAR trainer's default) sets PyTorch's TF32 switches for matmuls and
    convolutions; the default leaves them as they are."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        train(TrainConfig(**var_config(tmp_path / "default", tokenizer_dir, max_steps=1, ema_decay=None)))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        train(
            TrainConfig(**var_config(tmp_path / "tf32", tokenizer_dir, max_steps=1, ema_decay=None, allow_tf32=True))
        )
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(
    "override, key",
    [
        ("grad_clip=-1", "grad_clip"),
        ("ema_decay=-0.5", "ema_decay"),
        ("ema_decay=1", "ema_decay"),
        ("learning_rate=NaN", "learning_rate"),
        ("learning_rate=abc", "learning_rate"),
        ("batch_size=2.5", "batch_size"),
        ("max_steps=true", "max_steps"),
        ("warmup_steps=-1", "warmup_steps"),
        ("seed=-1", "seed"),
        ("adam_betas=[1.5,0.9]", "adam_betas"),
        ("min_lr_ratio=2", "min_lr_ratio"),
        ("weight_decay=-0.1", "weight_decay"),
        ("time_limit_minutes=0", "time_limit_minutes"),
        ("resolution=0", "resolution"),
        ("resume=sometimes", "resume"),
        ("data.bad_images=ignore", "data.bad_images"),
        ("model=3", "model"),
        ("allow_tf32=maybe", "allow_tf32"),
        ("gradient_checkpointing=1", "gradient_checkpointing"),
    ],
)
def test_config_values_are_checked(override, key):
    with pytest.raises(ValueError, match=f"`{re.escape(key)}`"):
        TrainConfig.load(None, ["task=tokenizer", override])


def test_num_workers_is_bounded_by_the_machines_cpus(monkeypatch):
    """`num_workers=100000` passed the check and the data loader forked processes until the machine gave out."""
    from diffusers_var.training import engine

    monkeypatch.setattr(engine.os, "cpu_count", lambda: 2)
    assert TrainConfig.load(None, ["task=tokenizer", "num_workers=8"]).num_workers == 8  # 4 x 2 CPUs
    for value in ("9", "100000"):
        with pytest.raises(ValueError, match=rf"`num_workers` must be .*<= 8 \(4 x the 2 CPU\(s\).*got {value}\.$"):
            TrainConfig.load(None, ["task=tokenizer", f"num_workers={value}"])
    monkeypatch.setattr(engine.os, "cpu_count", lambda: None)  # unknown: one CPU
    with pytest.raises(ValueError, match=r"`num_workers` must be .*<= 4 "):
        TrainConfig.load(None, ["task=tokenizer", "num_workers=5"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of a multi-GPU launch config")
def test_multi_gpu_launch_config_on_a_cpu_machine_is_one_run(tokenizer_dir, tmp_path):
    """``accelerate launch --config_file configs/accelerate_ddp.yaml`` on a machine without a GPU used to start two
    independent single-process runs writing the same folder: now the two processes are one DDP run on the CPU."""
    config = var_config(
        tmp_path / "run",
        tokenizer_dir,
        max_steps=2,
        checkpoint_every=2,
        ema_decay=None,
        data={**DATA, "num_images": 16},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    output = _two_processes(
        "accelerate.commands.launch",
        "--config_file",
        str(Path(__file__).resolve().parents[1] / "configs" / "accelerate_ddp.yaml"),
        "-m",
        "diffusers_var.training",
        "var",
        "--config",
        str(tmp_path / "config.json"),
        "mixed_precision=no",
    )
    assert "on 2 process(es)" in output
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert (checkpoint / "rng_state_0.safetensors").is_file() and (checkpoint / "rng_state_1.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


def test_fsdp_checkpoints_resume_across_shards(tmp_path):
    """The FSDP path of the checkpoint format (gather to rank 0 on save, re-shard on load) on two CPU processes with
    FSDP2 over gloo (benchmarks/bench_training_ddp.py runs the whole trainer under FSDP on GPUs)."""
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 is not available in this torch build")
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without gloo")
    worker = Path(__file__).resolve().parent / "fsdp_checkpoint_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            str(tmp_path / "checkpoint"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["files"] == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng_state_0.json",
        "rng_state_0.safetensors",
        "rng_state_1.json",
        "rng_state_1.safetensors",
        "trainer_state.json",
    ]
    assert report["step"] == 3 and report["accelerator_step"] == 7
    assert report["model_diff"] == 0 and report["optimizer_diff"] == 0 and report["lr"][0] == report["lr"][1]


# ----------------------------------------------------------------------------------------------
# Bad configs: one-line errors naming the key, found before the model is built or the output folder touched
# ----------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
TRANSFORMER_KEYS = {
    "var": ["tokenizer_path=x"],
    "star": ["tokenizer_path=x", "text_encoder_path=tiny-clip"],
    "infinity": ["tokenizer_path=x", "text_encoder_path=tiny-t5"],
}


@pytest.mark.parametrize(
    "task, overrides, match",
    [
        ("tokenizer", ["model.foo=1"], r"unknown key `model\.foo` for task tokenizer .*ch_mult, .*vocab_size"),
        ("bitwise_tokenizer", ["model.foo=1"], r"unknown key `model\.foo`.*codebook_dim"),
        ("var", ["model.foo=1"], r"unknown key `model\.foo` for task var .*depth, .*init_from"),
        ("star", ["model.foo=1"], r"unknown key `model\.foo`.*init_head.*rope"),
        ("infinity", ["model.foo=1"], r"unknown key `model\.foo`.*block_chunks"),
        ("var", ["model.vocab_size=5"], r"`model\.vocab_size` is set by the trainer \(from the tokenizer\)"),
        ("star", ["model.text_embed_dim=5"], r"`model\.text_embed_dim` is set by the trainer"),
        # STAR's loss trains no stable-sampler head: the export carried a random one that generation used by default
        ("star", ["model.stable_sampler=true"], r"`model\.stable_sampler`: task star does not train the stable-sam"),
        ("star", ["model.sampler_depth=2"], r"`model\.sampler_depth`: task star does not train the stable-sampler"),
        ("star", ["model.sampler_start_scale=2"], r"`model\.sampler_start_scale`: task star does not train"),
        ("tokenizer", ["model.vocab_size=-5"], r"`model\.vocab_size` must be a whole number >= 1, got -5"),
        ("var", ["model.depth=2.5"], r"`model\.depth` must be a whole number >= 1"),
        ("tokenizer", ["model.using_sa=1"], r"`model\.using_sa` must be true or false"),
        ("tokenizer", ["model.patch_nums=[1,-2]"], r"`model\.patch_nums` must be a non-empty list"),
        ("var", ["model.mlp_ratio=abc"], r"`model\.mlp_ratio` must be a finite number"),
        ("var", ["model.mlp_ratio=0"], r"`model\.mlp_ratio` must be a finite number > 0, got 0"),
        ("var", ["model.drop_path_rate=2"], r"`model\.drop_path_rate` must be in \[0, 1\), got 2"),
        ("infinity", ["model.drop_path_rate=-0.5"], r"`model\.drop_path_rate` must be in \[0, 1\)"),
        ("var", ["model.norm_eps=-1"], r"`model\.norm_eps` must be a finite number > 0"),
        ("tokenizer", ["model.beta=-1"], r"`model\.beta` must be a finite number >= 0"),
        ("tokenizer", ["model.dropout=-1"], r"`model\.dropout` must be in \[0, 1\)"),
        ("tokenizer", ["model.in_channels=1"], r"`model\.in_channels` must be 3 \(the training images are RGB\)"),
        ("bitwise_tokenizer", ["model.out_channels=4"], r"`model\.out_channels` must be 3"),
        ("var", ['model.init_blocks=[0,"a"]'], r"`model\.init_blocks` must be a list of block indices"),
        # (it was ignored without a word)
        ("var", ["model.init_blocks=[0,1]"], r"`model\.init_blocks` picks the blocks copied from `model\.init_from`"),
    ],
)
def test_model_keys_are_checked_against_the_model_class(task, overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.load(None, [f"task={task}", *TRANSFORMER_KEYS.get(task, []), *overrides])


def test_model_keys_with_a_lora_section_are_refused():
    base = REPO / "pipelines" / "var-shapes"
    with pytest.raises(ValueError, match=r"`model`: a LoRA run adapts the transformer of `lora\.base`.*depth"):
        TrainConfig.load(None, ["task=var", f"lora.base={base}", "model.depth=2"])


def readme_train_commands() -> list[list[str]]:
    """The training commands of README.md (code blocks, and inline ones in backquotes) as ``[TASK, ARGS...]``; those
    with a ``...`` placeholder are left out."""
    import shlex

    text = (REPO / "README.md").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.startswith("    ") or current:
            current += line.strip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                logical.append(current)
                current = ""
    logical += re.findall(r"`(diffusers-var train [^`]*)`", text)
    commands = []
    for line in logical:
        if not line.startswith(("diffusers-var train", "accelerate launch", "torchrun")):
            continue
        words = shlex.split(line, comments=True)
        if words[:2] == ["diffusers-var", "train"]:
            commands.append(words[2:])
        elif "diffusers_var.training" in words and words[0] in ("accelerate", "torchrun"):
            commands.append(words[words.index("diffusers_var.training") + 1 :])
    return [command for command in commands if "..." not in command]


def test_every_readme_train_command_is_a_valid_config(tmp_path, monkeypatch):
    """README's LoRA example took `configs/star_shapes.yaml` (a full run's `model` keys) with a `lora` section: it
    failed. Every documented train command must pass the config check (its placeholder folders made to exist)."""
    monkeypatch.chdir(tmp_path)
    for name in ("configs", "pipelines"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "MY_PIPELINE").symlink_to(REPO / "pipelines" / "star-shapes")
    for folder in (
        "my_images",
        "my_concept",
        "outputs/tokenizer-shapes/final",
        "outputs/bitwise-tokenizer-shapes/final",
        "path/to/clip",
        "path/to/flan-t5-xl",
    ):
        (tmp_path / folder).mkdir(parents=True)
    commands = readme_train_commands()
    assert len(commands) >= 9 and any("lora.base=pipelines/star-shapes" in c for c in commands), commands
    for task, *args in commands:
        config, overrides = None, []
        for index, arg in enumerate(args):
            if arg == "--config":
                config = args[index + 1]
            elif "=" in arg and args[index - 1] != "--config":
                overrides.append(arg)
        try:
            TrainConfig.load(config, [f"task={task}", *overrides])
        except ValueError as err:
            raise AssertionError(f"README: `train {task} {' '.join(args)}`: {err}") from None


@pytest.mark.parametrize(
    "task, override, readers",
    [
        ("star", "bsc_flip_prob=0.5", "infinity"),
        ("star", "bsc_num_scales=2", "infinity"),
        ("star", "bsq_commit_weight=1", "bitwise_tokenizer"),
        ("star", "recon_l1_weight=2", "tokenizer, bitwise_tokenizer"),
        ("star", "data.cache_tokens=true", "var"),
        ("var", "text_encoder_path=tiny-clip", "star, infinity"),
        ("infinity", "vq_loss_weight=2", "tokenizer"),
        ("bitwise_tokenizer", "text_encoder_path=tiny-t5", "star, infinity"),
        ("bitwise_tokenizer", "cond_drop_rate=0.2", "var, star, infinity"),
        ("tokenizer", "label_smoothing=0.1", "var, star, infinity"),
        ("tokenizer", f"tokenizer_path={REPO}", "var, star, infinity"),
        ("tokenizer", "data.caption_column=text", "star, infinity"),
    ],
)
def test_keys_another_task_reads_are_refused(task, override, readers):
    """README: every value is checked. A key only another task reads was taken and did nothing (`bsc_flip_prob` on a
    STAR run, `cond_drop_rate` on a tokenizer); set to its default it stays harmless."""
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"`{re.escape(key)}` .* is not read by `task: {task}`, only by {readers};"):
        TrainConfig.load(None, [f"task={task}", *TRANSFORMER_KEYS.get(task, []), override])
    star = ["task=star", f"tokenizer_path={REPO}", "text_encoder_path=tiny-clip"]
    TrainConfig.load(None, [*star, "bsc_flip_prob=0.3", "data.cache_tokens=false"])


def test_every_shipped_config_validates_and_resumes_past_keys_of_other_tasks(tmp_path, monkeypatch):
    """The configs in configs/ pass the check of their task; a run saved with a key its task does not read (before
    such keys were refused) still resumes once the key is removed: that key did not change what was trained."""
    from diffusers_var.training.engine import _config_snapshot, config_differences

    monkeypatch.chdir(tmp_path)
    for name in ("configs", "pipelines"):
        (tmp_path / name).symlink_to(REPO / name)
    for folder in ("outputs/tokenizer-shapes/final", "outputs/bitwise-tokenizer-shapes/final"):
        (tmp_path / folder).mkdir(parents=True)
    shipped = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("accelerate_"))
    assert len(shipped) == 9
    for path in shipped:
        TrainConfig.load(Path("configs") / path.name)
    current = _config_snapshot(
        TrainConfig.load(None, ["task=star", f"tokenizer_path={REPO}", "text_encoder_path=tiny-clip"])
    )
    saved = {**current, "bsc_flip_prob": 0.5, "data": {**current["data"], "cache_tokens": True}}
    assert config_differences(saved, current) == {}
    assert list(config_differences({**saved, "cond_drop_rate": 0.3}, current)) == ["cond_drop_rate"]


def _error_line(capsys) -> str:
    """The command's stderr: exactly one line, the error."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_cli_model_errors_are_one_line_and_nothing_is_created(tmp_path, capsys):
    from diffusers_var.cli import main

    run = tmp_path / "run"
    common = ["train", "tokenizer", f"output_dir={run}", f"model={json.dumps(TOKENIZER_MODEL)}", "resolution=16"]
    assert main([*common, "model.foo=1"]) == 2
    assert "`model.foo`" in _error_line(capsys)
    assert main([*common, "model.vocab_size=-5"]) == 2
    assert "`model.vocab_size`" in _error_line(capsys)
    # an error of the model constructor itself names the section (and here the key, which its message names)
    assert main([*common, "model.ch=30"]) == 2
    assert re.match(r"error: `model`: cannot build a MultiScaleVQModel .*`model\.ch`", _error_line(capsys))
    # an override naming another task would have won over the TASK given first, without a word
    assert main(["train", "var", f"output_dir={run}", "task=tokenizer"]) == 2
    assert "`task`: the command names 'var', an override names ['tokenizer']" in _error_line(capsys)
    assert main(["train", "var", f"output_dir={run}", "tokenizer_path=x", "model.init_blocks=[0,1,7]"]) == 2
    assert _error_line(capsys).startswith("error: `model.init_blocks` picks the blocks copied from `model.init_from`")
    assert not run.exists()


def test_path_keys_name_a_missing_folder(tmp_path, capsys):
    missing = tmp_path / "missing"
    cases = [
        (["task=var", f"tokenizer_path={missing}"], "tokenizer_path"),
        (["task=star", f"tokenizer_path={tmp_path}", f"text_encoder_path={missing}"], "text_encoder_path"),
        (["task=var", f"tokenizer_path={tmp_path}", f"model.init_from={missing}"], "model.init_from"),
        (["task=tokenizer", "data.type=imagefolder", f"data.path={missing}"], "data.path"),
        (["task=tokenizer", "data.type=hf", f"data.path={missing}"], "data.path"),
        (["task=var", f"lora.base={missing}"], "lora.base"),
    ]
    for overrides, key in cases:
        with pytest.raises(ValueError, match=f"`{re.escape(key)}`: '{re.escape(str(missing))}' does not exist"):
            TrainConfig.load(None, overrides)
    from diffusers_var.cli import main

    assert main(["train", "var", f"tokenizer_path={missing}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "`tokenizer_path`" in _error_line(capsys) and not (tmp_path / "run").exists()
    # a folder of another model: named, not a failure inside diffusers' loader
    transformer = REPO / "pipelines" / "var-shapes" / "transformer"
    config = TrainConfig(task="var", tokenizer_path=str(transformer), output_dir=str(tmp_path / "run"), resolution=64)
    with pytest.raises(ValueError, match=r"`tokenizer_path`: .* holds a VARTransformer2DModel, not a MultiScaleVQ"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_is_named(tmp_path, capsys):
    from diffusers_var.cli import main

    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for output_dir in (file, file / "run"):
        assert main(["train", "tokenizer", f"output_dir={output_dir}", "max_steps=1"]) == 2
        assert "`output_dir`" in _error_line(capsys)
    assert file.read_text() == "mine"
    run = tmp_path / "run"  # a file where the run's checkpoints folder goes
    run.mkdir()
    (run / "checkpoints").write_text("mine")
    with pytest.raises(ValueError, match="`output_dir`"):
        train(TrainConfig(**base_config(run, task="tokenizer", model=TOKENIZER_MODEL, max_steps=1)))
    assert (run / "checkpoints").read_text() == "mine"
    (run / "checkpoints").unlink()
    (run / "final").mkdir()  # a folder of the user's where the run exports: named as train's, no conversion flag
    (run / "final" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="`output_dir`: .*final.* the run's final export replaces only") as error:
        train(TrainConfig(**base_config(run, task="tokenizer", model=TOKENIZER_MODEL, max_steps=1)))
    assert "--overwrite" not in str(error.value)
    assert sorted(p.name for p in run.rglob("*")) == ["final", "notes.txt"]


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.num_images.x=1", r"`data\.num_images` is 10000, not a mapping of keys"),
        ("max_steps.x=1", r"`max_steps` takes a single value"),
        ("data..seed=1", "is not a config key"),
        ("data.num_images=abc", r"`data\.num_images` must be a whole number >= 1, got 'abc'"),
        ("data.seed=-1", r"`data\.seed` must be a whole number"),
        ("data.nmu=1", r"unknown `data` keys \['nmu'\]"),
        ("data.path=my_images", r"`data\.path` .* but `data\.type` is 'shapes'"),
    ],
)
def test_bad_data_overrides_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.load(None, ["task=tokenizer", override])


def test_a_dotted_override_keeps_the_sections_other_keys(tmp_path):
    """``data.num_images=4`` alone used to replace the whole default ``data`` section (its ``type: shapes`` lost);
    a dotted override sets that one key, in the default section or the config file's, for every section."""
    assert TrainConfig.load(None, ["task=tokenizer", "data.num_images=4"]).data == {"type": "shapes", "num_images": 4}
    base = REPO / "pipelines" / "var-shapes"
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {"task": "tokenizer", "data": {**DATA, "bad_images": "error"}, "model": TOKENIZER_MODEL, "resolution": 16}
        )
    )
    config = TrainConfig.load(path, ["data.seed=5", "model.vocab_size=32"])
    assert config.data == {**DATA, "bad_images": "error", "seed": 5}
    assert config.model == {**TOKENIZER_MODEL, "vocab_size": 32}
    path.write_text(json.dumps({"task": "var", "lora": {"base": str(base), "rank": 4, "dropout": 0.1}}))
    assert TrainConfig.load(path, ["lora.rank=8"]).lora == {"base": str(base), "rank": 8, "dropout": 0.1}
    # a whole section given without a dot replaces the section
    assert TrainConfig.load(None, ["task=tokenizer", 'data={"type": "shapes", "seed": 1}']).data == {
        "type": "shapes",
        "seed": 1,
    }
    # lists and mappings in YAML's flow style, as a config file writes them (they had to be quoted JSON)
    overrides = ["lora.target_modules=[to_qkv, proj]", "lora.rank=4.0", "adam_betas=[0.9,0.99]"]
    config = TrainConfig.load(path, overrides)
    assert config.lora["target_modules"] == ["to_qkv", "proj"] and config.adam_betas == (0.9, 0.99)
    from diffusers_var.training.lora import settings_of

    assert settings_of(config).rank == 4 and isinstance(settings_of(config).rank, int)  # as top-level keys take it
    assert TrainConfig.load(None, ["task=tokenizer", "data={type: shapes, seed: 2}"]).data == {
        "type": "shapes",
        "seed": 2,
    }
    assert TrainConfig.load(None, ["task=tokenizer", "output_dir=[runs] 1"]).output_dir == "[runs] 1"  # a name


def test_a_run_on_an_image_folder_resumes_with_the_same_config():
    """The default ``data`` section's keys (``num_images``) were compared with an image-folder run's own section, so
    ``resume=auto`` refused every unchanged image-folder config."""
    from diffusers_var.training.engine import _config_snapshot, config_differences

    config = TrainConfig(task="tokenizer", data={"type": "imagefolder", "path": "images"})
    assert config_differences(_config_snapshot(config), _config_snapshot(config)) == {}


def test_the_lora_base_and_init_from_written_another_way_are_the_same_place(tmp_path, monkeypatch):
    """A resume from another working folder, with ``lora.base`` or ``model.init_from`` written relative instead of
    absolute, was refused as a changed config; another folder still is."""
    from diffusers_var.training.engine import _config_snapshot, config_differences

    defaults = _config_snapshot(TrainConfig())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines" / "var-shapes").mkdir(parents=True)
    absolute = str(tmp_path / "pipelines" / "var-shapes")
    for key in ("lora", "model"):
        name = "base" if key == "lora" else "init_from"
        saved, current = {**defaults, key: {name: absolute}}, {**defaults, key: {name: "pipelines/var-shapes"}}
        assert config_differences(saved, current) == {}
        assert f"{key}.{name}" in config_differences(saved, {**defaults, key: {name: "pipelines/other"}})


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "failing",
    [
        "resolution=24",
        "batch_size=64",
        "model.foo=1",
        "data.num_images=abc",
        "gradient_accumulation_steps=3",
        pytest.param("mixed_precision=fp16", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU")),
    ],
    ids=[
        "model-check",
        "data-size-check",
        "unknown-model-key",
        "bad-data-value",
        "accumulation-past-an-epoch",
        "fp16-on-the-cpu",
    ],
)
def test_failing_checks_leave_the_output_folder_as_it_was(tmp_path, capsys, failing):
    """``resume=never`` moved the previous run to previous-runs/ before the data and model checks failed; every
    check now runs before anything in output_dir changes (and a missing output_dir is not created)."""
    from diffusers_var.cli import main

    run = tmp_path / "run"
    for name, content in {
        "checkpoints/step-0000002/model.safetensors": b"weights",
        "final/model_index.json": b"{}",
        "samples/step-0000002.png": b"png",
        "train_log.jsonl": b'{"step": 1}\n',
        "train_config.json": b"{}",
        "notes.txt": b"the user's",
    }.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(content)
    before = _tree(run)
    common = ["train", "tokenizer", f"model={json.dumps(TOKENIZER_MODEL)}", "resolution=16", "data.num_images=16"]
    assert main([*common, f"output_dir={run}", "batch_size=8", "resume=never", failing]) == 2
    assert f"`{failing.split('=')[0]}`" in _error_line(capsys)
    assert _tree(run) == before
    assert main([*common, f"output_dir={tmp_path / 'new'}", "batch_size=8", failing]) == 2
    assert not (tmp_path / "new").exists()


def test_resume_never_keeps_an_export_that_a_killed_export_left_aside(tmp_path, capsys):
    """An export killed mid-swap leaves the previous final/ in its staging folder (``old/``); a ``resume=never`` run
    then found no final/ to move to previous-runs/, and its own export's clean-up restored the old one only to replace
    it. It is put back first now and moves with the run. A file named previous-runs is an error naming output_dir."""
    import os
    import socket

    from diffusers_var.cli import main
    from diffusers_var.conversion.common import STAGING_MARKER, WRITER

    run = tmp_path / "run"
    staging = run / ".final.tmp-killed"
    (staging / "old").mkdir(parents=True)
    (staging / "old" / "model_index.json").write_text('{"the": "previous export"}')
    dead = max(os.getpid(), 4_000_000) + 1  # no such process
    marker = {"written_by": WRITER, "output": str(run / "final"), "host": socket.gethostname(), "pid": dead}
    (staging / STAGING_MARKER).write_text(json.dumps(marker))
    (run / "train_log.jsonl").write_text('{"step": 1}\n')
    common = ["train", "tokenizer", f"model={json.dumps(TOKENIZER_MODEL)}", "resolution=16", "data.num_images=16"]
    args = [*common, f"output_dir={run}", "batch_size=8", "max_steps=1", "resume=never"]
    assert main(args) == 0
    (previous,) = (run / "previous-runs").iterdir()
    assert (previous / "final" / "model_index.json").read_text() == '{"the": "previous export"}'
    assert (run / "final" / "config.json").is_file() and not staging.exists()

    shutil.rmtree(run / "previous-runs")
    (run / "previous-runs").write_text("a file of the user's")
    capsys.readouterr()
    assert main(args) == 2
    assert "`output_dir`" in _error_line(capsys)
    assert (run / "previous-runs").read_text() == "a file of the user's"


def test_a_folder_of_undecodable_images_is_refused_before_output_dir_is_made(tmp_path, capsys):
    """PIL's verify() passes a PNG whose pixel data is broken: the run found out at its first batch, after making
    output_dir; one item is now decoded with the other checks."""
    from diffusers_var.cli import main
    from test_data import broken_stream_png

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        broken_stream_png(images / f"{i}.png")
    run = tmp_path / "run"
    common = ["train", "tokenizer", f"model={json.dumps(TOKENIZER_MODEL)}", "resolution=16", "batch_size=2"]
    assert main([*common, f"output_dir={run}", "data.type=imagefolder", f"data.path={images}"]) == 2
    assert "none of the 4 images could be read" in _error_line(capsys)
    assert not run.exists()


def test_a_fresh_start_keeps_what_an_earlier_run_left(tmp_path):
    """A folder without a checkpoint (a user's own train_config.json, a run whose checkpoints were deleted):
    ``resume=auto`` starts afresh and had replaced those files and the export; they are moved to previous-runs/ as
    with never."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's")
    train(TrainConfig(**base_config(run, task="tokenizer", model=TOKENIZER_MODEL, max_steps=1, ema_decay=None)))
    (run / "train_config.json").write_text("# my notes\n")
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    shutil.rmtree(run / "checkpoints")  # a finished run without checkpoints: its export is the previous run's too
    export = {p.relative_to(run): p.read_bytes() for p in (run / "final").rglob("*") if p.is_file()}
    train(TrainConfig(**base_config(run, task="tokenizer", model=TOKENIZER_MODEL, max_steps=1, ema_decay=None)))
    (previous,) = (run / "previous-runs").iterdir()
    assert {p.relative_to(previous): p.read_bytes() for p in (previous / "final").rglob("*") if p.is_file()} == export
    assert (previous / "train_config.json").read_text() == "# my notes\n"
    assert (previous / "train_log.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'
    assert (run / "notes.txt").read_text() == "the user's"  # not a run's file: left where it is
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 1 and len(losses(run)) == 1


def test_a_second_run_in_the_same_output_dir_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two runs in one output_dir at once: the second resumed from the first's checkpoints while they were written,
    logged its steps into the same file and crashed with a bare OSError. The running one holds a lock; the other is
    refused with one line, before it changes anything."""
    import fcntl

    from diffusers_var.cli import main
    from diffusers_var.training.engine import LOCK_FILE

    run = tmp_path / "run"
    config = base_config(run, task="tokenizer", model=TOKENIZER_MODEL, max_steps=1, ema_decay=None)
    train(TrainConfig(**config))
    lock_file = run / LOCK_FILE
    assert lock_file.is_file()  # left in the folder: it locks nothing once its process is gone
    before = _tree(run)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "max_steps": 2, "resume": "force"}))
    with lock_file.open("w") as held:  # another run, holding the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(["train", "tokenizer", "--config", str(path)]) == 2
        assert f"another training run is using {str(run)!r}" in _error_line(capsys)
        assert _tree(run) == before
        other = tmp_path / "other"  # another folder is free
        assert main(["train", "tokenizer", "--config", str(path), f"output_dir={other}"]) == 0
    assert main(["train", "tokenizer", "--config", str(path)]) == 0  # released: the run resumes
    assert len(losses(run)) == 2


def test_a_second_run_in_one_process_may_change_mixed_precision(tmp_path):
    """accelerate keeps the first Accelerator's mixed precision for the process and refused the next run's
    ("AcceleratorState has already been initialized"): a notebook had to restart between runs."""
    for precision in ("bf16", "no"):
        run = tmp_path / precision
        settings = base_config(run, task="tokenizer", model=TOKENIZER_MODEL, max_steps=1, ema_decay=None)
        train(TrainConfig(**{**settings, "mixed_precision": precision}))
        assert len(losses(run)) == 1


def test_accumulated_updates_end_with_the_epoch_and_never_skip_batches(tokenizer_dir, tmp_path, monkeypatch):
    """Five batches an epoch with two accumulated a step: accelerate updates after batches 2, 4 and 5, so six steps
    are two whole epochs. Counted as two updates an epoch, the run skipped the next epoch's first batches as if
    it resumed there, and each epoch after the first started elsewhere."""
    from accelerate import Accelerator
    from accelerate.data_loader import DataLoaderShard

    skips, epochs = [], []
    real_skip, real_set_epoch = Accelerator.skip_first_batches, DataLoaderShard.set_epoch
    monkeypatch.setattr(
        Accelerator, "skip_first_batches", lambda self, loader, n: skips.append(n) or real_skip(self, loader, n)
    )
    monkeypatch.setattr(
        DataLoaderShard, "set_epoch", lambda self, epoch: epochs.append(epoch) or real_set_epoch(self, epoch)
    )
    config = var_config(
        tmp_path, tokenizer_dir, max_steps=6, gradient_accumulation_steps=2, data={**DATA, "num_images": 40}
    )
    train(TrainConfig(**config))
    assert skips == []
    assert sorted(set(epochs)) == [0, 1]  # (accelerate sets each epoch a second time as it starts iterating)
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_a_run_with_accumulation_resumed_mid_epoch_equals_an_uninterrupted_one(tokenizer_dir, tmp_path):
    """Five batches an epoch, two accumulated a step (three updates an epoch): killed after step 5 and resumed from
    the checkpoint of step 4, inside the second epoch, the run skips exactly the batches of that epoch's first update
    and ends with the weights of a run that was never stopped."""
    straight = var_config(
        tmp_path / "straight",
        tokenizer_dir,
        max_steps=7,
        checkpoint_every=2,
        gradient_accumulation_steps=2,
        data={**DATA, "num_images": 40},
        ema_decay=None,
    )
    interrupted = {**straight, "output_dir": str(tmp_path / "interrupted")}
    assert _run_cli(straight, tmp_path / "a.json").returncode == 0
    assert _run_cli(interrupted, tmp_path / "b.json", fault="step:5").returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "interrupted" / "checkpoints").name == "step-0000004"
    resumed = _run_cli(interrupted, tmp_path / "b.json")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    _assert_same_exported_weights(tmp_path / "straight", tmp_path / "interrupted")


def test_one_pair_of_parameter_groups_for_every_trained_model():
    """The transformer's and a LoRA text encoder's parameters share one (decayed, not decayed) pair, and
    ``resume=force`` puts the config's weight decay back on the decayed one (a pair per model left a LoRA run with
    two empty groups, which torch's checkpoint loader refuses: such a run could not resume)."""
    from diffusers_var.training.engine import _apply_hyperparameters, _param_groups

    config = TrainConfig.load(None, ["task=tokenizer", "weight_decay=0.2", "learning_rate=0.01"])
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    groups = _param_groups([first, second], 0.05)
    assert [len(group["params"]) for group in groups] == [2, 2]  # the two weights, the two biases
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    _apply_hyperparameters(optimizer, scheduler, config)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.2, 0.0]
    assert all(group["initial_lr"] == 0.01 for group in optimizer.param_groups)


def test_linear_lr_schedule():
    """``lr_schedule=linear`` (the original VAR trainer's lin0 shape): warm-up, the peak for the first 5% of the
    remaining steps, then a straight line down to ``min_lr_ratio``; cosine stays the default."""
    from diffusers_var.training.engine import _lr_lambda

    overrides = ["task=tokenizer", "warmup_steps=2", "min_lr_ratio=0.1"]
    # as lin0, the line ends at the last step: 100 steps after the warm-up here
    linear = _lr_lambda(TrainConfig.load(None, [*overrides, "max_steps=103", "lr_schedule=linear"]))
    assert [linear(step) for step in (0, 1)] == [0.5, 1.0]
    assert linear(2) == linear(6) == 1.0  # held: progress 0 and 0.04
    assert linear(2 + 52.5) == pytest.approx(0.1 + 0.9 * 0.5)  # progress 0.525: halfway down the line
    assert linear(102) == pytest.approx(0.1) and linear(500) == pytest.approx(0.1)
    cosine = _lr_lambda(TrainConfig.load(None, [*overrides, "max_steps=102"]))
    assert cosine(52) == pytest.approx(0.1 + 0.9 * 0.5) and cosine(6) < 1.0
    with pytest.raises(ValueError, match="`lr_schedule` must be one of 'cosine', 'linear', got 'step'"):
        TrainConfig.load(None, ["task=tokenizer", "lr_schedule=step"])


def test_compiled_training_saves_and_exports_the_bare_model(tokenizer_dir, tmp_path):
    """``torch_compile: true`` (accelerate's inductor backend): the checkpoint and the export carry the model's own
    parameter names, not torch.compile's wrapper's (the export failed on the wrapper), and the run resumes without
    compiling (the key may change on resume)."""
    model = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    config = var_config(tmp_path, tokenizer_dir, max_steps=2, checkpoint_every=1, ema_decay=None, model=model)
    export = train(TrainConfig(**{**config, "torch_compile": True}))
    names = set(load_file(tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert names == set(VARPipeline.from_pretrained(export).transformer.state_dict())
    assert not any("_orig_mod" in name for name in names)
    train(TrainConfig(**{**config, "torch_compile": False}))  # resume=auto: nothing left to train, no refusal
    assert len(losses(tmp_path)) == 2
    with pytest.raises(ValueError, match="`torch_compile` must be true or false"):
        TrainConfig.load(None, ["task=tokenizer", "torch_compile=yes"])


def test_tokenizer_tasks_train_without_a_config_at_their_models_size(tmp_path, capsys):
    """``train tokenizer max_steps=1`` (and ``bitwise_tokenizer``) without ``--config`` failed: ``resolution``
    defaulted to 64, which neither task's default model takes (256 px). Left out, it is now the size the task's model
    settings need, recorded in the run's config; the transformer tasks keep 64 (their tokenizer decides)."""
    from diffusers_var.cli import main

    assert TrainConfig.load(None, ["task=tokenizer"]).resolution == 256  # the release VQ-VAE's settings
    assert TrainConfig.load(None, ["task=bitwise_tokenizer"]).resolution == 256  # 16 px a token: 16x16 tokens
    assert TrainConfig(task="bitwise_tokenizer", model={"encoder_ch_mult": [1, 2, 2]}).resolution == 64
    # 2 px a token: its schedules have 32 and 64; 64, the size earlier runs recorded, so they resume
    assert TrainConfig(task="bitwise_tokenizer", model={"encoder_ch_mult": [1, 2]}).resolution == 64
    assert TrainConfig(task="tokenizer", resolution=32).resolution == 32  # given: kept
    assert TrainConfig(task="var").resolution == 64
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        PIL.Image.new("RGB", (40, 40), (100 * k, 50, 0)).save(images / f"{k}.png")
    small = {
        "tokenizer": [f"model={json.dumps(TOKENIZER_MODEL)}"],  # patch_nums [1, 2, 4], 2 stride-2 levels: 16 px
        "bitwise_tokenizer": [  # 4 px a token: 64 px
            "model.base_channels=32",
            "model.encoder_ch_mult=[1,2,2]",
            "model.decoder_ch_mult=[1,2,2]",
            "model.num_res_blocks=1",
            "model.codebook_dim=8",
        ],
    }
    for task, size in (("tokenizer", 16), ("bitwise_tokenizer", 64)):
        run = tmp_path / task
        common = ["data.type=imagefolder", f"data.path={images}", f"output_dir={run}", "max_steps=1", "batch_size=2"]
        assert main(["train", task, *common, *small[task], "ema_decay=null", "warmup_steps=0"]) == 0, (
            capsys.readouterr().err
        )
        assert json.loads((run / "train_config.json").read_text())["resolution"] == size
        assert (run / "final").is_dir()


def test_weight_decay_spares_what_the_original_trainers_spare():
    """The originals' ``nowd_keys``: VAR decays its class embedding (ours had spared every 'embedding'), Infinity
    spares its learned unconditional text (``cfg_uncond``) and text-pooling query (``mat_q``), which ours decayed."""
    from diffusers_var.training.engine import _param_groups
    from tiny_components import infinity_components, var_components

    for components, decayed, spared in (
        (var_components(), {"class_embedding.weight", "head.weight"}, {"level_embedding.weight", "pos_start"}),
        (infinity_components(), set(), {"uncond_text_embeds", "text_pool.learned_query", "level_embedding.weight"}),
    ):
        transformer = components["transformer"]
        names = {id(param): name for name, param in transformer.named_parameters()}
        decay, no_decay = (
            {names[id(param)] for param in group["params"]} for group in _param_groups([transformer], 0.05)
        )
        assert decayed <= decay and spared <= no_decay and not any(name.endswith("bias") for name in decay)
        assert {name for name in decay if "log_scale" in name or "adaln_offset" in name} == set()


def test_the_main_process_syncs_only_checkpoint_files(tmp_path, monkeypatch):
    """Rank 0 fsynced every entry of the checkpoint folder, and another rank's temporary file of an atomic write,
    listed and then renamed away, was a FileNotFoundError that ended the run (the FSDP test, under load)."""
    import types

    from accelerate.utils import DistributedType

    from diffusers_var.training import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.NO,
        process_index=0,
        is_main_process=True,
        num_processes=2,
        step=3,
        scaler=None,
        unwrap_model=lambda m: m,
    )
    folder = tmp_path / ".tmp-step-0000003"
    folder.mkdir()
    (folder / ".rng_state_1.json.12-34.tmp").write_text("another rank's, about to be renamed")
    synced, real_sync = [], checkpoint.sync_to_disk

    def sync(path):
        if path.parent == folder and path.name.startswith("."):
            raise FileNotFoundError(2, "No such file or directory", str(path))  # renamed away since it was listed
        synced.append(path.name)
        real_sync(path)

    monkeypatch.setattr(checkpoint, "sync_to_disk", sync)
    checkpoint.save_training_state(
        folder, accelerator, model, types.SimpleNamespace(optimizer=optimizer), scheduler, None, 3, {"task": "test"}
    )
    assert checkpoint.is_training_checkpoint(folder)
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= set(synced)


def test_var_counts_the_classes_of_every_hf_row_without_decoding_images(monkeypatch, tmp_path):
    """The class count came from the first 2,000 rows, decoded: a dataset sorted by label (2,000 rows of class 0,
    then class 1) trained one class and stopped at the first batch of class 1."""
    import types

    from diffusers_var.training.data import HFDataset, RepeatedDataset
    from diffusers_var.training.tasks import VARTask

    class Rows:
        column_names = ["image", "label"]

        def __init__(self, labels, features=None):
            self.labels, self.features = labels, features

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, key):
            if key == "label":
                return list(self.labels)
            raise AssertionError("an image was decoded")

    fake = types.ModuleType("datasets")
    fake.Image = type("Image", (), {})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    shapes = types.SimpleNamespace(data={"type": "hf"})
    for labels, features, expected in (
        ([0] * 2000 + [1] * 3, None, 2),
        ([0, 2, 1], {"label": types.SimpleNamespace(num_classes=5)}, 5),  # a ClassLabel: classes no row has count
    ):
        fake.load_from_disk = lambda path, labels=labels, features=features: Rows(labels, features)
        dataset = HFDataset(str(tmp_path), 8, label_column="label")
        for wrapped in (dataset, RepeatedDataset(dataset, 2)):
            task = types.SimpleNamespace(dataset=wrapped, config=shapes)
            assert VARTask._classes(task) == (expected, None)


def test_data_repeats_has_an_upper_bound(tmp_path, capsys):
    """`data.repeats=1000000000` passed the checks; a traceback asked for 256 GB (the loader's shuffle)."""
    from diffusers_var.cli import main
    from diffusers_var.training.data import build_dataset

    run = tmp_path / "run"
    assert main(["train", "tokenizer", "data.repeats=1000000000", f"output_dir={run}"]) == 2
    assert "`data.repeats` must be a whole number >= 1 and <= 1000000, got 1000000000" in capsys.readouterr().err
    assert not run.exists()
    with pytest.raises(ValueError, match=r"`data\.repeats` 1000000: the 1000 images repeated make 1000000000 items"):
        build_dataset({"type": "shapes", "num_images": 1000, "repeats": 10**6}, 16)


def test_tokenizer_sample_grids_of_fewer_than_eight_images(tmp_path):
    """The reconstruction grid took images 0..7: a dataset of 4 stopped with an IndexError after step 1."""
    config = base_config(
        tmp_path,
        task="tokenizer",
        model=TOKENIZER_MODEL,
        data={**DATA, "num_images": 4},
        batch_size=4,
        max_steps=1,
        sample_every=1,
        ema_decay=None,
    )
    train(TrainConfig(**config))
    with PIL.Image.open(tmp_path / "samples" / "step-0000001.png") as grid:
        assert grid.size == (4 * 16, 2 * 16)  # the 4 images over their 4 reconstructions


def test_a_fresh_start_refuses_to_move_a_model_folder_the_config_reads(tmp_path):
    """`resume=never` with output_dir=tokrun and tokenizer_path=tokrun/final moved the tokenizer to previous-runs/
    (and a fresh start without a checkpoint moves final/ too)."""
    torch.manual_seed(0)
    MultiScaleVQModel(**TOKENIZER_MODEL).save_pretrained(tmp_path / "final")
    config = base_config(
        tmp_path,
        task="var",
        tokenizer_path=str(tmp_path / "final"),
        model={"depth": 2, "embed_dim": 64, "num_heads": 2},
        max_steps=1,
    )
    for resume in ("never", "auto"):
        with pytest.raises(ValueError, match=r"`tokenizer_path` '.*final' is inside .*would move to .*previous-runs"):
            train(TrainConfig(**config, resume=resume))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # nothing moved or made


def test_ddp_trains_a_tokenizer_with_an_unused_phi_layer(tmp_path):
    """patch_nums [1, 2, 4] with 4 shared Phi convs leaves one unused: DDP stopped at the second step ("Expected to
    have finished reduction in the prior iteration"). Two CPU processes over gloo."""
    from diffusers_var.training.tasks import has_unused_parameters

    config = base_config(tmp_path / "run", task="tokenizer", model=TOKENIZER_MODEL, max_steps=3, ema_decay=None)
    assert has_unused_parameters(TrainConfig(**config))
    assert not has_unused_parameters(TrainConfig(**{**config, "model": {**TOKENIZER_MODEL, "share_quant_resi": 3}}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    output = _two_processes(
        *("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffusers_var.training"),
        *("tokenizer", "--config", str(tmp_path / "config.json")),
        timeout=300,
    )
    assert "on 2 process(es)" in output and (tmp_path / "run" / "final" / "config.json").is_file()
