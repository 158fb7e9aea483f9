"""``diffusers-var sample`` on the embedded pipelines (CPU): one process and two processes write the same bytes, a
SIGKILLed run restarted (with another number of processes) writes the same set, prompt files and their metadata,
bad input, and the GPU benchmark script's CPU smoke mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from diffusers_var import STARPipeline, VARPipeline
from diffusers_var.cli import main
from diffusers_var.cli_support import MAX_IMAGES
from diffusers_var.sample import SamplePlan, image_seed, model_files_digest, read_prompts

VAR = REPO_ROOT / "pipelines" / "var-shapes"
STAR = REPO_ROOT / "pipelines" / "star-shapes"
INFINITY = REPO_ROOT / "pipelines" / "infinity-shapes"
# 11 images in batches of 2: six global batches, the last one short; two processes take 3 batches each.
VAR_RUN = [
    "--model",
    str(VAR),
    "--class-labels",
    ",".join(str(i) for i in range(11)),
    "--batch-size",
    "2",
    "--seed",
    "7",
    "--save-npz",
    "--no-progress",
]


def _env() -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DIFFUSERS_VAR_FAULT_INJECT", None)
    return env


def _launch_two_processes(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` with two CPU processes. accelerate's ``--cpu`` starts a single process unless MPI is set
    up, so the processes come from its torchrun launcher (``--multi_gpu``); on a machine without GPUs they are CPU
    processes on gloo (the sample command tells accelerate so)."""
    pytest.importorskip("accelerate", reason="several processes need accelerate: pip install -e '.[eval]'")
    env = _env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    if fault:
        env["DIFFUSERS_VAR_FAULT_INJECT"] = fault
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "diffusers_var.cli",
        "sample",
        "--out",
        str(out),
        *VAR_RUN,
    ]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The launched processes run on one thread each (``_env``); CPU matmul sums split by thread, so the in-process
    runs compared with them must use one thread too (CI leaves OMP_NUM_THREADS unset: torch takes every core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["sample", "--out", str(out), *VAR_RUN]) == 0
    return out


def test_one_process_run_writes_images_metadata_and_npz(one_process):
    files = _files(one_process)
    assert list(files) == [f"{i:06d}.png" for i in range(11)]
    metadata = [json.loads(line) for line in (one_process / "metadata.jsonl").read_text().splitlines()]
    assert [m["index"] for m in metadata] == list(range(11))
    assert [m["class_label"] for m in metadata] == list(range(11))
    assert metadata[1]["class_name"] == "red circle on blue" and metadata[1]["file_name"] == "images/000001.png"
    assert [m["generator_seed"] for m in metadata] == [image_seed(7, i) for i in range(11)]
    with np.load(one_process / "samples.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (11, 64, 64, 3)
        for i in range(11):
            np.testing.assert_array_equal(
                npz["arr_0"][i], np.asarray(Image.open(one_process / "images" / f"{i:06d}.png"))
            )
        np.testing.assert_array_equal(npz["arr_1"], np.arange(11))
    assert not [p for p in (one_process / "images").iterdir() if p.name.startswith(".")]
    # The images are what was asked for: the pixel judge reads most labels back (the model card: 96% at defaults).
    from diffusers_var import shapes

    judged = shapes.judge_images([np.asarray(Image.open(one_process / "images" / f"{i:06d}.png")) for i in range(11)])
    assert sum(j == shapes.CLASSES[i] for i, j in enumerate(judged)) >= 8


def test_two_processes_write_the_same_bytes(one_process, tmp_path):
    out = tmp_path / "two"
    result = _launch_two_processes(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(6 generated by this process" in result.stdout  # the main process did half of the batches
    assert _files(out) == _files(one_process)
    assert (out / "samples.npz").read_bytes() == (one_process / "samples.npz").read_bytes()
    assert (out / "metadata.jsonl").read_text() == (one_process / "metadata.jsonl").read_text()


def test_killed_run_restarted_writes_the_same_set(one_process, tmp_path):
    """Both processes SIGKILL themselves after handing their 2nd batch to the writers (so files may be half written);
    the restart, on one process, regenerates the unfinished batches whole and ends with the same bytes."""
    out = tmp_path / "killed"
    result = _launch_two_processes(out, fault="sample-batch:2")
    assert result.returncode != 0
    finished = sorted(p.name for p in (out / "images").glob("*.png"))
    assert 0 < len(finished) < 11, finished
    assert not (out / "metadata.jsonl").exists()
    assert main(["sample", "--out", str(out), *VAR_RUN]) == 0
    assert _files(out) == _files(one_process)
    assert (out / "samples.npz").read_bytes() == (one_process / "samples.npz").read_bytes()
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".")]


def test_restart_with_other_settings_is_refused(one_process, tmp_path, capsys):
    run = [a if a != "7" else "8" for a in VAR_RUN]  # another --seed
    assert main(["sample", "--out", str(one_process), *run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `--out`") and "seed: 7 -> 8" in err and len(err.strip().splitlines()) == 1
    # A run that stopped before its first image (say at a bad Infinity size) holds nothing: other settings may take it.
    failed = tmp_path / "failed"
    failed.mkdir()
    shutil.copy(one_process / "run.json", failed / "run.json")
    assert main(["sample", "--out", str(failed), *run]) == 0
    assert json.loads((failed / "run.json").read_text())["settings"]["seed"] == 8


def test_batch_streams_are_deterministic_and_tied_to_the_batch_size(one_process, tmp_path, capsys):
    """--rng batch: one generator per global batch; a regenerated batch gives the same bytes, the batch size is part
    of the run's identity, and the images are not those of the per-image streams."""
    out = tmp_path / "batch"
    run = [*VAR_RUN, "--rng", "batch"]
    assert main(["sample", "--out", str(out), *run]) == 0
    first = _files(out)
    (out / "images" / "000003.png").unlink()  # batch 1 (images 2, 3) and the short last batch (image 10) redone
    (out / "images" / "000010.png").unlink()
    assert main(["sample", "--out", str(out), *run]) == 0
    assert _files(out) == first
    metadata = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert (
        metadata[2]["batch_generator_seed"]
        == metadata[3]["batch_generator_seed"]
        != metadata[4]["batch_generator_seed"]
    )
    assert "generator_seed" not in metadata[0]
    assert sum(first[name] != data for name, data in _files(one_process).items()) >= 9
    capsys.readouterr()
    assert main(["sample", "--out", str(out), *[a if a != "2" else "3" for a in run]]) == 2  # another --batch-size
    assert "batch_size: 2 -> 3" in capsys.readouterr().err


def test_prompt_file_metadata_and_per_image_streams(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps(
            {
                "prompt": "a red circle on a blue background",
                "tag": "single_object",
                "include": [{"class": "circle", "count": 1}],
            }
        )
        + "\n\n"
        + json.dumps({"prompt": "a green square on a white background", "tag": "colors"})
        + "\n"
    )
    run = [
        "--model",
        str(STAR),
        "--prompts",
        str(prompts),
        "--images-per-prompt",
        "2",
        "--seed",
        "3",
        "--guidance-scale",
        "2",
        "--top-k",
        "0",
        "--top-p",
        "0",
    ]
    assert main(["sample", "--out", str(tmp_path / "a"), "--batch-size", "4", *run]) == 0
    progress = capsys.readouterr().err
    assert "sampling" in progress and "4/4" in progress and "img/s" in progress  # the progress bar, with a rate
    metadata = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [(m["prompt_index"], m["sample_index"]) for m in metadata] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert metadata[0]["tag"] == "single_object" and metadata[0]["include"] == [{"class": "circle", "count": 1}]
    assert metadata[3]["prompt"] == "a green square on a white background" and metadata[3]["tag"] == "colors"
    settings = json.loads((tmp_path / "a" / "run.json").read_text())["settings"]
    assert settings["sampling"] == {"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0, "more_smooth": False}

    # The same images one at a time: each image's random stream is its own (only float rounding of the batched
    # matmuls may differ between batch sizes, so compare what the image shows, not its bytes).
    assert main(["sample", "--out", str(tmp_path / "b"), "--batch-size", "1", *run]) == 0
    assert (tmp_path / "b" / "metadata.jsonl").read_text() == (tmp_path / "a" / "metadata.jsonl").read_text()
    a, b = (
        [np.asarray(Image.open(tmp_path / d / "images" / f"{i:06d}.png"), dtype=np.float32) for i in range(4)]
        for d in ("a", "b")
    )
    assert np.mean([np.abs(x - y).mean() < 2.0 for x, y in zip(a, b)]) >= 0.75
    assert np.abs(a[0] - a[1]).mean() > 2.0  # two images of one prompt differ: different streams


def test_read_prompts_and_plan(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(text) == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    plan = SamplePlan(labels=list(range(1000)), prompts=None, per_item=50, class_names={})
    assert plan.total == 50_000
    counts = np.bincount([plan.condition(i) for i in range(plan.total)], minlength=1000)
    assert (counts == 50).all()
    assert sorted(plan.condition(i) for i in range(1000)) == list(range(1000))  # every prefix is class-balanced
    seeds = {image_seed(0, i) for i in range(1000)} | {image_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)
    for content, message in (
        ('{"text": "x"}', "non-empty string"),
        ("not json", "is not JSON"),
        ('{"prompt": "x", "seed": 1}', "written by this command"),
        ("", "holds no prompt"),
        ('{"prompt": "x", "score": NaN}', "line 1: NaN is not JSON"),  # metadata.jsonl would not be JSON
        ('{"prompt": "a \\udcff b"}', "prompt 1 holds characters that are not Unicode text"),
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            read_prompts(bad)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("a red circle\n".encode("utf-8-sig"))  # what some editors save
    assert read_prompts(bom) == [{"prompt": "a red circle"}]
    # lines end at \n (or \r\n) only: a form feed or U+2028 inside a prompt (or a JSON string) is part of it
    odd = tmp_path / "odd.txt"
    odd.write_text("line with\u2028separator inside\r\nform\x0cfeed\n", encoding="utf-8", newline="")
    assert read_prompts(odd) == [{"prompt": "line with\u2028separator inside"}, {"prompt": "form\x0cfeed"}]
    odd_json = tmp_path / "odd.jsonl"
    odd_json.write_text(json.dumps({"prompt": "a\u2028b red circle"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_prompts(odd_json) == [{"prompt": "a\u2028b red circle"}]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--per-class", "0"], "`--per-class` must be >= 1"),
        (["--per-class", "1", "--batch-size", "0"], "`--batch-size` must be >= 1"),
        ([], "needs `--per-class N`"),
        (["--class-labels", "0,90"], "`--class-labels` must hold class indices in [0, 89]"),
        (["--class-labels", "a,b"], "`--class-labels` must be comma-separated"),
        (["--class-labels", "0,,1"], "`--class-labels` must be comma-separated"),  # (an empty entry was dropped)
        (["--per-class", "1", "--prompts", "x.txt"], "`--prompts` is for text-to-image"),
        (["--per-class", "1", "--tau", "1"], "`--tau` does not apply to VARPipeline"),
        (["--per-class", "1", "--fp8"], "`--fp8` is an option of the fast path: add `--fast`"),
        (["--per-class", "1", "--fast", "--fp8", "--dtype", "float16"], "`--fp8` runs with `--dtype bfloat16`"),
        (["--per-class", "1", "--compile-cache", "cache"], "`--compile-cache` holds the fast path's compiled code"),
        (["--per-class", "1", "--compile-blocks", "static"], "`--compile-blocks` is an option of the fast path"),
        (["--per-class", "1", "--model", "/nonexistent"], "`--model` '/nonexistent' is not a pipeline folder"),
        (["--per-class", "1", "--device", "gpu0"], "`--device` 'gpu0' is not usable here"),
        (["--per-class", "1", "--device", "foo"], "`--device` 'foo' is not usable here (not a torch device name)"),
        (["--per-class", "1", "--device", "meta"], "`--device` 'meta' is not usable here"),
        (["--per-class", "1", "--guidance-scale", "nan"], "--guidance-scale: must be a finite number"),
        (["--per-class", "1", "--top-k", "-5"], "--top-k: must be a whole number >= 0"),
        (["--class-labels", "0", "--per-class", str(MAX_IMAGES + 1)], f"`--per-class` must be <= {MAX_IMAGES}"),
        (["--class-labels", "0,1", "--per-class", str(MAX_IMAGES // 2 + 1)], f"at most {MAX_IMAGES}"),  # the total
        (["--per-class", "1", "--batch-size", "65537"], "`--batch-size` must be <= 65536"),
        (["--per-class", "1", "--writer-threads", "100000"], "`--writer-threads` must be <= 256"),
        (["--per-class", "1", "--class-labels", ""], "`--class-labels` is empty"),  # (it had meant every class)
        pytest.param(
            ["--per-class", "1", "--device", "cuda"],
            "`--device` 'cuda' is not usable here",
            id="no-cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
        ),
    ],
)
def test_bad_input_is_one_error_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffusers_var.sample._generate_batch", lambda *a, **k: pytest.fail("generated"))
    try:
        code = main(["sample", "--out", str(tmp_path / "o"), "--model", str(VAR), "--no-progress", *argv])
    except SystemExit as exit_:  # the parser's own refusals (a flag's type)
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top-p", "1.5"], "argument --top-p: must be in [0, 1], got '1.5'"),
        (["--top-p", "-0.1"], "argument --top-p: must be in [0, 1], got '-0.1'"),
        (["--guidance-scale", "-1"], "argument --guidance-scale: must be in [0, 10000], got '-1'"),
        (["--guidance-scale", "2e4"], "argument --guidance-scale: must be in [0, 10000], got '2e4'"),
        (["--top-k", "-1"], "argument --top-k: must be a whole number >= 0"),
        (["--model", str(INFINITY), "--tau", "-1"], "argument --tau: must be >= 0.0001, got '-1'"),
        (["--model", str(INFINITY), "--tau", "0"], "argument --tau: must be >= 0.0001, got '0'"),
        (["--model", str(INFINITY), "--width", "0"], "argument --width: must be a whole number >= 1"),
    ],
)
def test_sampling_flags_are_checked_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    """--top-p 1.5, --guidance-scale -1 and --tau -1 were refused only once the model had loaded (generate refuses
    them when parsing); every numeric sampling flag is checked when parsing now, with generate's ranges."""
    from diffusers_var import InfinityPipeline

    for pipeline in (VARPipeline, STARPipeline, InfinityPipeline):
        monkeypatch.setattr(pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    conditions = ["--prompts", str(tmp_path / "p.txt")] if str(INFINITY) in argv else ["--per-class", "1"]
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--out", str(tmp_path / "o"), "--model", str(VAR), *conditions, *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_an_image_of_another_size_is_named_before_any_work(one_process, tmp_path, capsys, monkeypatch):
    """A 32x32 image put into a finished run's images/ (samples.npz deleted, the same command again) ended in
    np.stack's "all input arrays must have the same shape", naming no file; the restart names it, its size and the
    run's, and what to do, before generating anything."""
    out = tmp_path / "run"
    shutil.copytree(one_process, out)
    (out / "samples.npz").unlink()
    Image.new("RGB", (32, 32), "red").save(out / "images" / "000005.png")
    (out / "images" / "000002.png").unlink()  # a batch to generate: the refusal comes first
    with monkeypatch.context() as patch:
        patch.setattr("diffusers_var.sample._generate_batch", lambda *a, **k: pytest.fail("generated"))
        assert main(["sample", "--out", str(out), *VAR_RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for part in (str(out / "images" / "000005.png"), "is 32x32 pixels", "makes 64x64 images", "delete it"):
        assert part in err, err
    (out / "images" / "000005.png").unlink()  # as the message says
    assert main(["sample", "--out", str(out), *VAR_RUN]) == 0
    assert _files(out) == _files(one_process)
    assert (out / "samples.npz").read_bytes() == (one_process / "samples.npz").read_bytes()


def test_code_records_its_draft_steps_and_temperature(tmp_path, capsys):
    """A CoDe folder's run.json left out draft_steps and the temperature when they were the pipeline's own (the
    README: run.json records the values used); they are recorded, compared on a restart like the other settings,
    and a run recorded without them (the same values) still resumes."""
    from diffusers_var import VARCoDePipeline

    var = VARPipeline.from_pretrained(VAR)
    code = VARCoDePipeline.from_var_pipelines(var, var)
    code.save_pretrained(tmp_path / "code")
    out = tmp_path / "run"
    run = ["sample", "--model", str(tmp_path / "code"), "--out", str(out), "--class-labels", "1,2", "--per-class", "1"]
    assert main([*run, "--no-progress"]) == 0
    run_file = out / "run.json"
    content = json.loads(run_file.read_text())
    sampling = content["settings"]["sampling"]
    assert sampling["draft_steps"] == code.config.draft_steps == len(code.scale_schedule()) - 2
    assert sampling["temperature"] == 1.0
    first = _files(out)
    for name in ("draft_steps", "temperature"):  # as runs recorded before
        del content["settings"]["sampling"][name]
    run_file.write_text(json.dumps(content))
    (out / "images" / "000001.png").unlink()
    assert main([*run, "--no-progress"]) == 0
    assert _files(out) == first
    content["settings"]["sampling"]["draft_steps"] = 1  # another run's
    run_file.write_text(json.dumps(content))
    (out / "images" / "000001.png").unlink()
    capsys.readouterr()
    assert main([*run, "--no-progress"]) == 2
    assert "holds a run with other settings (sampling:" in capsys.readouterr().err


@pytest.mark.parametrize("flag, expected", [([], True), (["--compile-blocks", "static"], "static")])
def test_compile_blocks_reaches_the_fast_path(flag, expected, tmp_path, monkeypatch, capsys):
    """``--compile-blocks`` goes to ``enable_fast_inference(compile_blocks=...)`` (default True, i.e. dynamic); the
    sample command hands it to the fast-path set-up, which passes it on for a CUDA device. On the CPU ``--fast`` only
    casts to bfloat16, slower there than float32: the command says so."""
    import diffusers_var.sample as sample_module
    from diffusers_var import cli_support
    from diffusers_var.pipelines import fast_inference

    handed = []
    plain = sample_module.enable_fast_path
    monkeypatch.setattr(sample_module, "enable_fast_path", lambda *args: handed.append(args[5]) or plain(*args))
    argv = ["sample", "--out", str(tmp_path / "o"), "--model", str(VAR), "--class-labels", "0", "--per-class", "1"]
    assert main([*argv, "--no-progress", "--fast", *flag]) == 0
    assert handed == [expected]
    assert "note: --fast on the CPU only casts the model to bfloat16" in capsys.readouterr().err
    assert cli_support.fast_on_cpu_note("cpu", torch.float32) is None
    assert cli_support.fast_on_cpu_note("cuda", torch.bfloat16) is None

    class Stub:  # records what the fast-path set-up asks of a pipeline
        def enable_fast_inference(self, dtype, compile_decoder=False, compile_blocks=False, fp8=False):
            self.kwargs = dict(compile_decoder=compile_decoder, compile_blocks=compile_blocks)

    monkeypatch.setattr(fast_inference, "use_compile_cache", lambda folder: None)
    # the TF32 switches it sets for a CUDA device: stand-ins, so the process keeps its own
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace())
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    stub = Stub()
    cli_support.enable_fast_path(stub, "cuda", torch.bfloat16, compile_blocks=expected)
    assert stub.kwargs == dict(compile_decoder=True, compile_blocks=expected)


def test_compile_blocks_names_its_choices(tmp_path, capsys):
    """An unknown ``--compile-blocks`` value is refused by argparse with the allowed shapes, before anything runs."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "sample",
                "--out",
                str(tmp_path / "o"),
                "--model",
                str(VAR),
                "--per-class",
                "1",
                "--fast",
                "--compile-blocks",
                "fixed",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # argparse's wording (quotes) differs between Python versions
    assert all(word in err for word in ("--compile-blocks", "invalid choice", "fixed", "dynamic", "static-tokens"))
    assert not (tmp_path / "o").exists()


def test_unreadable_prompt_file_names_the_flag_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(STARPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle", encoding="utf-16")  # starts with the byte-order mark 0xff 0xfe
    assert main(["sample", "--out", str(tmp_path / "o"), "--model", str(STAR), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: `--prompts`") and "not UTF-8" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("content", ["{not json", '{"other": 1}', '{"settings": [1]}', '{"settings": {}}', "\udcff"])
def test_a_run_file_that_is_not_ours_is_one_error_line_and_kept(content, tmp_path, capsys, monkeypatch):
    """``--out`` holding a run.json this command did not write (or a damaged one): refused, nothing changed."""
    monkeypatch.setattr("diffusers_var.sample._generate_batch", lambda *a, **k: pytest.fail("generated"))
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    before = (out / "run.json").read_bytes()
    assert main(["sample", "--out", str(out), "--model", str(VAR), "--per-class", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: `--out`") and "run.json" in err and len(err.splitlines()) == 1, err
    assert (out / "run.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_files_that_no_run_wrote_are_never_replaced(tmp_path, capsys, monkeypatch):
    """An image folder's own metadata.jsonl (or a samples.npz) in --out, with no run.json: the run had replaced
    them. A folder where a file goes, and an empty --out (the current folder), are refused too."""
    monkeypatch.setattr("diffusers_var.sample._generate_batch", lambda *a, **k: pytest.fail("generated"))
    common = ["--model", str(VAR), "--per-class", "1", "--class-labels", "0", "--no-progress"]
    for name, make in (
        ("metadata.jsonl", lambda p: p.write_text('{"file_name": "cat.png"}\n')),
        ("samples.npz", lambda p: p.write_text("mine")),
        ("run.json", lambda p: p.mkdir()),
        ("images", lambda p: p.write_text("mine")),
    ):
        out = tmp_path / name.replace(".", "-")
        out.mkdir()
        make(out / name)
        before = sorted(p.name for p in out.iterdir())
        assert main(["sample", "--out", str(out), *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: `--out` {str(out)!r} holds") and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in out.iterdir()) == before
    assert main(["sample", "--out", "", *common]) == 2
    assert "`--out` is empty" in capsys.readouterr().err
    # an images/ folder without run.json, or a run.json of another tool: refused before the model loads (a
    # converted model of several GB took minutes to load first)
    monkeypatch.setattr("diffusers_var.sample.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    foreign = tmp_path / "foreign-images"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "cat.png").write_bytes(b"mine")
    other = tmp_path / "other-run-json"
    other.mkdir()
    (other / "run.json").write_text('{"epoch": 3}')
    for out, message in ((foreign, "has an images/ folder but no run.json"), (other, "that is not this command's")):
        assert main(["sample", "--out", str(out), *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: `--out` {str(out)!r}") and message in err, err
    assert (foreign / "images" / "cat.png").read_bytes() == b"mine" and (
        other / "run.json"
    ).read_text() == '{"epoch": 3}'


def test_a_second_run_into_a_folder_being_written_is_refused(one_process, tmp_path, capsys):
    """Two runs started together into one --out had mixed their images and settings: the first holds the folder."""
    from diffusers_var.sample import exclusive_run

    out = tmp_path / "busy"
    with exclusive_run(out, is_main=True):
        assert main(["sample", "--out", str(out), *VAR_RUN]) == 2
        assert "is being written by another `diffusers-var sample` run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []  # the refused run wrote nothing


def test_a_replaced_model_or_a_damaged_image_is_named_on_resume(one_process, tmp_path, capsys):
    """run.json recorded the model's path only: a folder replaced between a kill and the restart mixed two models.
    An image damaged after it was written is generated again (--save-npz named it, and said to delete it)."""
    model, out = tmp_path / "model", tmp_path / "run"
    shutil.copytree(VAR, model)
    shutil.copytree(one_process, out)
    run = [a if a != str(VAR) else str(model) for a in VAR_RUN]
    run_file = json.loads((out / "run.json").read_text())
    run_file["settings"].update(model=str(model.resolve()), model_files=model_files_digest(model))
    (out / "run.json").write_text(json.dumps(run_file))
    (out / "images" / "000003.png").write_bytes((out / "images" / "000003.png").read_bytes()[:200])
    assert main(["sample", "--out", str(out), *run]) == 0
    assert _files(out) == _files(one_process)
    (out / "images" / "000003.png").unlink()
    assert main(["sample", "--out", str(out), *run]) == 0
    assert _files(out) == _files(one_process)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched: the same model
    assert main(["sample", "--out", str(out), *run]) == 0
    shutil.rmtree(model)
    shutil.copytree(REPO_ROOT / "pipelines" / "var-shapes-refiner", model)  # replaced by another model
    (out / "images" / "000004.png").unlink()
    assert main(["sample", "--out", str(out), *run]) == 2
    assert "the model folder's files (another model" in capsys.readouterr().err


def test_a_resume_without_npz_generates_damaged_images_again(one_process, tmp_path):
    """Without --save-npz a cut-short PNG counted as done: the run finished with an image no reader could open."""
    out = tmp_path / "run"
    shutil.copytree(one_process, out)
    run = [a for a in VAR_RUN if a != "--save-npz"]
    for name, damage in (("000003.png", lambda b: b[:200]), ("000008.png", lambda b: b[: len(b) // 2])):
        path = out / "images" / name
        path.write_bytes(damage(path.read_bytes()))
    assert main(["sample", "--out", str(out), *run]) == 0
    assert _files(out) == _files(one_process)


def test_the_model_digest_leaves_out_only_what_the_run_writes(tmp_path):
    """With ``--out`` the model folder itself, the digest skipped all of ``--out``: the whole model, so a model
    replaced in place was not noticed on restart. The digest reads what loading reads: model_index.json and the
    components' folders."""
    model = tmp_path / "model"
    shutil.copytree(VAR, model)
    before = model_files_digest(model, out=model)
    assert before == model_files_digest(model)  # nothing of a run yet: the whole model counts
    (model / "images").mkdir()
    (model / "images" / "000000.png").write_bytes(b"an image of the run")
    for name in ("run.json", "metadata.jsonl", ".metadata.jsonl.123-456.tmp"):
        (model / name).write_text("{}")
    assert model_files_digest(model, out=model) == before  # the run's own files do not change it
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"replaced")  # another model, same size
    config = model / "transformer" / "config.json"
    config.write_text(config.read_text().replace("{", '{"replaced": 1, ', 1))
    assert model_files_digest(model, out=model) != before
    inside = model / "runs" / "first"  # a run folder inside the model: its own files only are left out
    (inside / "images").mkdir(parents=True)
    (inside / "images" / "000000.png").write_bytes(b"x")
    after = model_files_digest(model, out=inside)
    (inside / "images" / "000001.png").write_bytes(b"y")
    assert model_files_digest(model, out=inside) == after
    # another run beside it, an evaluation report, a note: not what loading reads (a sibling run's images made the
    # first run's restart refused as "another model")
    sibling = model / "runs" / "second"
    (sibling / "images").mkdir(parents=True)
    (sibling / "images" / "000000.png").write_bytes(b"z")
    (sibling / "run.json").write_text("{}")
    (inside / "eval.json").write_text("{}")
    (model / "notes.txt").write_text("mine")
    assert model_files_digest(model, out=inside) == after
    (model / "model_index.json").write_text((model / "model_index.json").read_text() + " ")  # what loading reads
    assert model_files_digest(model, out=inside) != after


def test_a_finished_run_a_copied_model_and_what_a_kill_left(one_process, tmp_path, capsys):
    """A finished run whose images/ was deleted (metadata and npz kept, to save space) is still that run: other
    settings are refused. The same model files at another path (a copy, a moved checkout) resume it. Temporaries of a
    run killed while writing the npz or the metadata go at the restart. A dangling link as --out is named."""
    out = tmp_path / "run"
    shutil.copytree(one_process, out)
    shutil.rmtree(out / "images")
    assert main(["sample", "--out", str(out), *[a if a != "7" else "8" for a in VAR_RUN]]) == 2
    assert "seed: 7 -> 8" in capsys.readouterr().err
    model = tmp_path / "model"
    shutil.copytree(VAR, model)
    (out / ".samples.npz.123-456.tmp").write_bytes(b"a part of an npz")
    (out / ".metadata.jsonl.123-456.tmp").write_text("{}")
    (out / ".run.json.backup.tmp").write_text("mine")  # hidden .tmp files of someone else: not write_atomic's
    (out / "images").mkdir()
    (out / "images" / ".my-notes.tmp").write_text("mine")
    assert main(["sample", "--out", str(out), *[a if a != str(VAR) else str(model) for a in VAR_RUN]]) == 0
    assert sorted(p.name for p in out.rglob(".*.tmp")) == [".my-notes.tmp", ".run.json.backup.tmp"]
    (out / "images" / ".my-notes.tmp").unlink()
    assert _files(out) == _files(one_process)
    assert (out / "samples.npz").read_bytes() == (one_process / "samples.npz").read_bytes()
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    assert main(["sample", "--out", str(link), *VAR_RUN]) == 2
    assert "is a link to" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_a_restart_with_another_batch_size_says_so(one_process, tmp_path, capsys):
    """Per-image streams let a restart change ``--batch-size`` (float rounding may differ): it is said, not silent."""
    out = tmp_path / "run"
    shutil.copytree(one_process, out)
    (out / "images" / "000010.png").unlink()
    (out / "metadata.jsonl").unlink()
    (out / "samples.npz").unlink()
    capsys.readouterr()
    argv = ["sample", "--out", str(out), *[a if a != "2" else "4" for a in VAR_RUN]]
    assert main(argv) == 0
    assert "note: going on with --batch-size 4 in a run started with 2" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["batch_size"] == 2
    assert main(argv) == 0  # finished: the note again, nothing else changes
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        p.name for p in (one_process / "images").iterdir()
    )


def test_a_run_inside_its_model_folder_resumes(one_process, tmp_path, capsys):
    """``--out`` inside the ``--model`` folder: the run's own files are not part of the model's digest, so the same
    command resumes (it was refused as "another model")."""
    model = tmp_path / "model"
    shutil.copytree(VAR, model)
    out = model / "samples"
    argv = ["sample", "--out", str(out), *[a if a != str(VAR) else str(model) for a in VAR_RUN]]
    assert main(argv) == 0
    (out / "images" / "000010.png").unlink()  # as if killed before the last image
    assert main(argv) == 0, capsys.readouterr().err
    assert _files(out) == _files(one_process)


def test_labels_and_sizes_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(VARPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    for argv, message in (
        (["--class-labels", "0,5000", "--per-class", "1"], "`--class-labels` must hold class indices in [0, 89]"),
        (["--class-labels", "0,1", "--per-class", str(MAX_IMAGES // 2 + 1)], f"at most {MAX_IMAGES}"),
    ):
        assert main(["sample", "--out", str(tmp_path / "o"), "--model", str(VAR), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a command: one line saying how to go on, exit code 130, not a traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("diffusers_var.sample._generate_batch", interrupted)
    assert main(["sample", "--out", str(tmp_path / "o"), *VAR_RUN]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted:") and "run the same command again" in err and len(err.splitlines()) == 1


def test_a_run_that_loses_the_lock_leaves_the_folder(tmp_path, monkeypatch):
    """Two runs starting together both see no folder; the one refused the lock must not remove the folder the
    other holds (its lock would then be on a deleted folder, and a third run could start)."""
    import fcntl

    from diffusers_var.sample import exclusive_run

    def held(handle, operation):
        raise BlockingIOError

    monkeypatch.setattr(fcntl, "flock", held)
    out = tmp_path / "race"
    with pytest.raises(ValueError, match="is being written by another"), exclusive_run(out, is_main=True):
        pass
    assert out.is_dir()


def test_a_run_that_fails_before_writing_leaves_no_folder_it_made(tmp_path):
    """The folders ``--out`` needed above it too (only ``out`` itself was removed: empty parents stayed)."""
    from diffusers_var.sample import exclusive_run

    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError, match="load failed"), exclusive_run(out, is_main=True):
        raise RuntimeError("load failed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_text_pipeline_needs_prompts(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path / "o"), "--model", str(STAR), "--per-class", "1"]) == 2
    assert "`--per-class` is for class-conditional" in capsys.readouterr().err
    assert main(["sample", "--out", str(tmp_path / "o"), "--model", str(STAR)]) == 2
    assert "`--prompts FILE` is required" in capsys.readouterr().err


def _run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """``benchmarks/<script> args`` in a fresh process; it must succeed."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / script), *args]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_bench_sample_smoke(tmp_path):
    """The GPU benchmark's CPU mode: builds bench_pipelines.py's tiny VAR, times bench_pipelines.py on it, runs the
    real sample path (--fast) in a worker process and reports speed and memory per batch."""
    out = tmp_path / "bench.json"
    result = _run_benchmark("bench_sample.py", "--smoke", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(row["model"], row["rng"]) for row in rows] == [("var-tiny", "image"), ("var-tiny", "batch")]
    for row in rows:
        assert row["images"] == 8 and row["images_per_s"] > 0
        assert row["reference_images_per_s"] > 0 and row["ratio_to_reference"] > 0
        assert len(row["memory_series"]) == 4 and row["rss_gib_end"] > 0
    assert "images/s (bench_pipelines:" in result.stdout


def test_bench_trace_smoke(tmp_path):
    """The tracing benchmark of ``compile_blocks``' shapes on bench_pipelines.py's tiny VAR, each shapes value in its
    own process: every one traces graphs at the first batch size; at the second only ``"static"`` traces again."""
    out = tmp_path / "trace.json"
    _run_benchmark("bench_trace.py", "--models", "var-tiny", "--batch-sizes", "1,2", "--json", str(out))
    rows = {(row["shapes"], row["batch"]): row for row in json.loads(out.read_text())}
    assert sorted(rows) == [(s, b) for s in ("dynamic", "static", "static-tokens") for b in (1, 2)]
    assert all(rows[shapes, 1]["new_graphs"] > 0 for shapes in ("dynamic", "static-tokens", "static"))
    assert [rows[shapes, 2]["new_graphs"] for shapes in ("dynamic", "static-tokens")] == [0, 0]
    assert rows["static", 2]["new_graphs"] == rows["static", 1]["new_graphs"]  # every piece and scale again
    assert rows["static-tokens", 1]["new_graphs"] > rows["dynamic", 1]["new_graphs"]  # a trace per scale


def test_bench_startup_smoke(tmp_path):
    """The start-up benchmark's CPU mode: two fresh ``sample --fast --compile-cache`` processes one after another,
    each timed from launch to its first images."""
    out = tmp_path / "startup.json"
    _run_benchmark("bench_startup.py", "--smoke", "--processes", "2", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(row["process"], row["cache"]) for row in rows] == [(1, "empty"), (2, "warm")]
    assert all(row["images"] == 2 and row["seconds"] > 0 for row in rows)
    # sample's own account of its start-up, and the rest (interpreter, imports, exit), adding up to the wall time
    phases = ("loading_s", "fast_path_set_up_s", "first_batch_s", "python_and_rest_s")
    for row in rows:
        assert all(row[name] >= 0 for name in phases[:3]) and row["python_and_rest_s"] > 0
        assert sum(row[name] for name in phases) == pytest.approx(row["seconds"])
        assert row["imports_alone_seconds"] > 0  # a process that only imports: the floor under "python and rest"


def test_saved_editing_and_code_pipelines_generate_and_sample(tmp_path, capsys):
    """A saved in-painting / image-to-image pipeline is sampled (and generated) as its family's pipeline, whose
    components it has; a CoDe folder as the class-conditional pipeline it is. They were told to pass `--prompts`
    (CoDe, VAR in-painting), or failed after loading, with a traceback and a half-written run folder."""
    from diffusers_var import STARImg2ImgPipeline, VARCoDePipeline, VARInpaintPipeline, VARPipeline

    var = VARPipeline.from_pretrained(VAR)
    folders = {  # name: (pipeline saved, conditioning flags, images expected, pipeline recorded in run.json)
        "code": (VARCoDePipeline.from_var_pipelines(var, var), ["--class-labels", "1,2", "--per-class", "1"], 2),
        "inpaint": (VARInpaintPipeline.from_pipe(var), ["--class-labels", "1,2", "--per-class", "1"], 2),
        "star_i2i": (STARImg2ImgPipeline.from_pipe(STARPipeline.from_pretrained(STAR)), ["--prompts", "p.txt"], 1),
    }
    (tmp_path / "p.txt").write_text("red circle\n")
    recorded = {"code": "VARCoDePipeline", "inpaint": "VARPipeline", "star_i2i": "STARPipeline"}
    for name, (pipe, flags, count) in folders.items():
        pipe.save_pretrained(tmp_path / name)
        out = tmp_path / f"run-{name}"
        flags = [str(tmp_path / flag) if flag == "p.txt" else flag for flag in flags]
        assert main(["sample", "--model", str(tmp_path / name), "--out", str(out), *flags]) == 0, capsys.readouterr()
        assert len(list((out / "images").iterdir())) == count
        assert json.loads((out / "run.json").read_text())["settings"]["pipeline"] == recorded[name]
    for name, flags in (("inpaint", ["--class-label", "1"]), ("star_i2i", ["--prompt", "red circle"])):
        out = tmp_path / f"{name}.png"
        assert main(["generate", "--model", str(tmp_path / name), *flags, "--out", str(out)]) == 0
        assert Image.open(out).size == (64, 64)


def test_star_stable_sampler_images_do_not_depend_on_the_batch_size(tmp_path):
    """``--rng image``: the stable sampler's commit positions came from one stream per batch, so a STAR model with the
    sampler head drew other images at another ``--batch-size`` (and a restart with another one mixed the two); each
    image now takes a stream derived from its own generator."""
    from diffusers_var import STARTransformer2DModel

    base = STARPipeline.from_pretrained(STAR)
    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    config.update(stable_sampler=True, sampler_start_scale=len(config["patch_nums"]) - 1)
    torch.manual_seed(0)
    STARPipeline.from_pipe(base, transformer=STARTransformer2DModel(**config).eval()).save_pretrained(
        tmp_path / "model"
    )
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green triangle\n")
    runs = {}
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        argv = ["sample", "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.txt")]
        assert main([*argv, "--out", str(out), "--batch-size", str(batch), "--seed", "3", "--no-progress"]) == 0
        runs[batch] = np.stack([np.asarray(PIL.Image.open(out / "images" / f"{i:06d}.png")) for i in range(3)])
    # the same images up to the float rounding of another batch size (one uint8 step); other commit positions
    # changed them by up to 249
    assert np.abs(runs[1].astype(int) - runs[3].astype(int)).max() <= 1


def test_converted_imagenet_code_samples_with_its_fid_recipe(monkeypatch):
    """A 1000-class CoDe folder sampled with the demo's defaults (cfg 4, top-p 0.95); now with sample_CoDe.py's FID
    recipe (cfg 1.5, top-k 600, top-p 0.96, temperature 1.1 on the first seven of its ten scales) where no flag says
    otherwise. A pair of another schedule keeps the pipeline's defaults (the temperatures are per scale)."""
    import argparse

    from diffusers_var import VARCoDePipeline
    from diffusers_var.sample import SAMPLING_FLAGS, _sampling_kwargs
    from tiny_components import code_components

    args = argparse.Namespace(**dict.fromkeys(SAMPLING_FLAGS))
    code = VARCoDePipeline(**code_components(num_classes=1000))
    own = _sampling_kwargs(args, code, "VARPipeline", 1000)  # the tiny schedule: 4 scales
    assert own["guidance_scale"] == 4.0 and "temperature" not in own
    monkeypatch.setattr(code, "scale_schedule", lambda: [(pn, pn) for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])
    recipe = _sampling_kwargs(args, code, "VARPipeline", 1000)
    assert recipe == {
        **own,
        "guidance_scale": 1.5,
        "top_k": 600,
        "top_p": 0.96,
        "more_smooth": False,
        "temperature": [1.1] * 7 + [1.0] * 3,
    }
    args.top_k = 0
    assert _sampling_kwargs(args, code, "VARPipeline", 1000)["top_k"] == 0  # a flag given wins
    assert "temperature" not in _sampling_kwargs(args, code, "VARPipeline", 10)  # not ImageNet


def test_a_run_recorded_with_the_whole_folder_digest_still_resumes(one_process, tmp_path, capsys):
    """Runs recorded their model's digest over every file of its folder (READMEs, reports, other runs); the digest
    reads only what loading reads now, and a run interrupted before that change still resumes on the same folder
    (it was refused as "another model"), not on another one."""
    out = tmp_path / "run"
    shutil.copytree(one_process, out)
    run_file = out / "run.json"
    content = json.loads(run_file.read_text())
    content["settings"]["model_files"] = model_files_digest(VAR, out, whole_folder=True)
    run_file.write_text(json.dumps(content))
    (out / "images" / "000004.png").unlink()
    assert main(["sample", "--out", str(out), *VAR_RUN]) == 0
    assert (out / "images" / "000004.png").is_file()
    content["settings"]["model_files"] = "0123456789abcdef"  # neither digest: another model
    run_file.write_text(json.dumps(content))
    (out / "images" / "000004.png").unlink()
    assert main(["sample", "--out", str(out), *VAR_RUN]) == 2
    assert "the model folder's files (another model" in capsys.readouterr().err


def test_infinity_records_the_size_it_made_and_resumes_a_run_that_recorded_none(tmp_path, capsys):
    """run.json said ``height: null`` for Infinity's default size; it records the size made (the pipeline's
    ``default_size``), and a run recorded with null still resumes as the same run, while another size is refused."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    run = ["--model", str(INFINITY), "--prompts", str(prompts), "--guidance-scale", "1", "--out", str(tmp_path / "a")]
    assert main(["sample", *run]) == 0
    run_file = tmp_path / "a" / "run.json"
    content = json.loads(run_file.read_text())
    assert (content["settings"]["sampling"]["height"], content["settings"]["sampling"]["width"]) == (64, 64)
    content["settings"]["sampling"].update(height=None, width=None)  # as runs recorded before
    run_file.write_text(json.dumps(content))
    (tmp_path / "a" / "images" / "000001.png").unlink()
    assert main(["sample", *run]) == 0
    assert (tmp_path / "a" / "images" / "000001.png").is_file()
    (tmp_path / "a" / "images" / "000001.png").unlink()
    assert main(["sample", *run, "--height", "128", "--width", "128"]) == 2
    assert "holds a run with other settings (sampling:" in capsys.readouterr().err
