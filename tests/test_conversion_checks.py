"""The converters' checks of their arguments and of the checkpoints' values, in every family: what is refused, that
the error names the argument (the command line: its flag) and that it comes before the slow work."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import fixture_dir, load_manifest
from diffusers_var.conversion import (
    ConversionError,
    convert_code_checkpoint,
    convert_infinity_checkpoint,
    convert_star_checkpoint,
    convert_var_checkpoint,
)
from test_var_conversion import _assert_one_line_error, _run_main


def _var():
    path = fixture_dir("var")
    return path / "vae.pth", path / "var.pth"


def _star():
    path = fixture_dir("star")
    return path / "vae.pth", path / "star_transformer.pth", path / "text_encoder_sd21_layout"


def _infinity():
    path = fixture_dir("infinity")
    return path / "vae.pth", path / "transformer" / "infinity.pth", path / "text_encoder", path / "tokenizer"


def _code():
    path = fixture_dir("code")
    files = {k: path / v["path"] for k, v in load_manifest(path)["files"].items() if k.endswith("_pth")}
    return files["vae_pth"], files["drafter_pth"], files["refiner_pth"]


def _edited(source, tmp_path, name: str, key: str, value: float):
    """A copy of the checkpoint ``source`` (a plain state dict or a STAR snapshot) with ``value`` in ``key``."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    state = checkpoint["trainer"]["var_wo_ddp"] if "trainer" in checkpoint else checkpoint
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    torch.save(checkpoint, tmp_path / name)
    return tmp_path / name


def _text_encoder_with_nan(folder, tmp_path):
    """A copy of a text-encoder folder (its model.safetensors somewhere inside) with one NaN weight."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "text_encoder_nan"
    shutil.copytree(folder, copy)
    weights = next(copy.rglob("model.safetensors"))
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return copy


# ----------------------------------------------------------------------------------------------
# NaN / inf weights: every family, with or without an output folder, naming the argument
# ----------------------------------------------------------------------------------------------
def test_nan_or_inf_weights_are_refused_in_every_family_naming_the_argument(tmp_path):
    """A checkpoint holding NaN / inf was checked only while writing the output: a pipeline returned without
    ``output_dir`` held them silently, and the error named no argument. Now every converted model is checked, the
    error names the argument whose checkpoint held them, and no output folder is made."""
    vae, var = _var()
    bad_vae = _edited(vae, tmp_path, "vae_inf.pth", "decoder.conv_out.weight", float("inf"))
    with pytest.raises(ConversionError, match=r"^`vae`: the checkpoint holds NaN or infinite values: converted to "):
        convert_var_checkpoint(bad_vae, var)  # no output_dir
    with pytest.raises(ConversionError, match=r"^`transformer`: .*converted to `transformer\.head\.weight`"):
        convert_var_checkpoint(vae, _edited(var, tmp_path, "var_nan.pth", "head.weight", float("nan")))
    # an infinite weight is the checkpoint's fault, not float16's (the cast's range check came first)
    with pytest.raises(ConversionError, match=r"^`vae`: the checkpoint holds NaN"):
        convert_var_checkpoint(bad_vae, var, dtype=torch.float16)

    code_vae, drafter, refiner = _code()
    bad_refiner = _edited(refiner, tmp_path, "refiner_nan.pth", "head.weight", float("nan"))
    with pytest.raises(ConversionError, match=r"^`refiner`: .*NaN or infinite values: converted to `refiner\.head"):
        convert_code_checkpoint(code_vae, drafter, bad_refiner)
    bad_drafter = _edited(drafter, tmp_path, "drafter_nan.pth", "head.weight", float("nan"))
    with pytest.raises(ConversionError, match=r"^`drafter`: .*converted to `transformer\.head"):
        convert_code_checkpoint(code_vae, bad_drafter, refiner)

    star_vae, star, text = _star()
    bad_star = _edited(star, tmp_path, "star_nan.pth", "head_logits.weight", float("nan"))
    with pytest.raises(ConversionError, match=r"^`transformer`: .*converted to `transformer\.head\.weight`"):
        convert_star_checkpoint(star_vae, bad_star, text)
    with pytest.raises(ConversionError, match=r"^`text_encoder`: the checkpoint holds NaN .*`text_encoder\."):
        convert_star_checkpoint(star_vae, star, _text_encoder_with_nan(text, tmp_path / "star"))

    inf_vae, infinity, t5, tokenizer = _infinity()
    vae_state = torch.load(inf_vae, map_location="cpu", weights_only=True)
    vae_state["vae"] = dict(vae_state["vae"])
    key = next(k for k, v in vae_state["vae"].items() if k.startswith("decoder.") and v.is_floating_point())
    vae_state["vae"][key] = vae_state["vae"][key].clone().fill_(float("inf"))
    torch.save(vae_state, tmp_path / "infinity_vae_inf.pth")
    with pytest.raises(ConversionError, match=r"^`vae`: the checkpoint holds NaN or infinite values: .* `vae\."):
        convert_infinity_checkpoint(tmp_path / "infinity_vae_inf.pth", infinity, t5, tokenizer)
    bad_infinity = _edited(infinity, tmp_path, "infinity_nan.pth", "head.weight", float("nan"))
    with pytest.raises(ConversionError, match=r"^`transformer`: .*converted to `transformer\.head\.weight`"):
        convert_infinity_checkpoint(inf_vae, bad_infinity, t5, tokenizer)
    with pytest.raises(ConversionError, match=r"^`text_encoder`: the checkpoint holds NaN .*`text_encoder\."):
        convert_infinity_checkpoint(inf_vae, infinity, _text_encoder_with_nan(t5, tmp_path / "inf"), tokenizer)


def test_the_command_line_names_the_flag_of_a_checkpoint_holding_nan_and_leaves_no_folder(tmp_path, capsys):
    """The probe: ``--output np/x/y/out`` with an infinite VAE weight said "the checkpoint holds NaN or infinite
    values" naming no flag, and left the empty folders np/x/y behind."""
    vae, var = _var()
    bad_vae = _edited(vae, tmp_path, "vae_inf.pth", "decoder.conv_out.weight", float("inf"))
    out = tmp_path / "np" / "x" / "y" / "out"
    rc, err = _run_main("convert_var.py", ["--vae", bad_vae, "--transformer", var, "--output", out], capsys)
    _assert_one_line_error(rc, err, "error: `--vae`: the checkpoint holds NaN or infinite values")
    assert not (tmp_path / "np").exists()


# ----------------------------------------------------------------------------------------------
# dtype
# ----------------------------------------------------------------------------------------------
def test_dtype_is_one_of_the_command_lines_and_checked_before_any_checkpoint_is_read(tmp_path):
    """``dtype="float16"``, None or torch.int8 were a TypeError from inside the cast after the whole conversion;
    float64 and float8 were written silently. Now a ConversionError naming ``dtype`` and its values, before any
    checkpoint is read (the paths here do not exist); the command line's names are accepted as well."""
    missing = tmp_path / "missing.pth"
    calls = {
        "var": lambda dtype: convert_var_checkpoint(missing, missing, dtype=dtype),
        "code": lambda dtype: convert_code_checkpoint(missing, missing, missing, dtype=dtype),
        "star": lambda dtype: convert_star_checkpoint(missing, missing, tmp_path, dtype=dtype),
        "infinity": lambda dtype: convert_infinity_checkpoint(missing, missing, tmp_path, tmp_path, dtype=dtype),
    }
    for family, call in calls.items():
        for dtype in ("float64", "half", None, torch.int8, torch.float64, torch.float8_e4m3fn, torch.complex64):
            with pytest.raises(ConversionError, match=r"^`dtype` must be one of torch\.float32, torch\.bfloat16"):
                call(dtype)
        with pytest.raises(ConversionError, match="no such file"):  # an allowed one: on to the paths
            call("bfloat16")
    vae, var = _var()
    pipe = convert_var_checkpoint(vae, var, dtype="float16")
    assert pipe.transformer.blocks[0].ffn.fc1.weight.dtype == torch.float16


def test_on_off_arguments_are_true_or_false_before_any_checkpoint_is_read(tmp_path):
    """``bool()`` read ``using_znorm="no"`` (and ``logit_norm`` / ``cross_attention_row0_quirk`` /
    ``level_embed_every_chunk`` = "false", 0.5, None) as on / off without a word; now a ConversionError naming the
    argument, before any checkpoint is read (the paths here do not exist). numpy's bools are booleans."""
    import numpy as np

    missing = tmp_path / "missing.pth"
    calls = {
        "using_znorm": lambda v: convert_var_checkpoint(missing, missing, using_znorm=v),
        "using_znorm ": lambda v: convert_code_checkpoint(missing, missing, missing, using_znorm=v),
        "logit_norm": lambda v: convert_star_checkpoint(missing, missing, tmp_path, logit_norm=v),
        "cross_attention_row0_quirk": lambda v: convert_star_checkpoint(
            missing, missing, tmp_path, cross_attention_row0_quirk=v
        ),
        "level_embed_every_chunk": lambda v: convert_infinity_checkpoint(
            missing, missing, tmp_path, tmp_path, level_embed_every_chunk=v
        ),
    }
    for name, call in calls.items():
        for value in ("no", "false", 0.5, None, 1):
            with pytest.raises(ConversionError, match=rf"^`{name.strip()}` must be True or False, got"):
                call(value)
        for value in (True, np.bool_(False)):  # accepted: on to the paths
            with pytest.raises(ConversionError, match="no such file"):
                call(value)


# ----------------------------------------------------------------------------------------------
# STAR's sampler_start_scale and the last scale of a RoPE schedule
# ----------------------------------------------------------------------------------------------
def test_star_sampler_start_scale_is_a_whole_number_in_the_schedule(tmp_path, capsys):
    """2.5 became 2, True 1, '2' 2; nan was "not a checkpoint of the expected layout"; an out-of-range value was
    refused only by the model, after the transformer was read, as "`--transformer`: `--sampler-start-scale` ..."."""
    vae, star, text = _star()
    missing = tmp_path / "missing.pth"
    for value in (2.5, True, "2", float("nan"), 0, -1):
        with pytest.raises(ConversionError, match=r"^`sampler_start_scale` must be a whole number >= 1, got"):
            convert_star_checkpoint(missing, missing, text, sampler_start_scale=value)
    with pytest.raises(ConversionError, match=r"^`sampler_start_scale` must be in \[1, 3\] for the 4 scales"):
        convert_star_checkpoint(vae, star, text, sampler_start_scale=4)
    assert convert_star_checkpoint(vae, star, text, sampler_start_scale=3).transformer.config.sampler_start_scale == 3
    capsys.readouterr()  # (transformers' loading bars)
    argv = ["--vae", vae, "--transformer", star, "--text-encoder", text, "--output", tmp_path / "out"]
    rc, err = _run_main("convert_star.py", argv + ["--sampler-start-scale", "-1"], capsys)
    _assert_one_line_error(rc, err, "--sampler-start-scale", ">= 1")
    rc, err = _run_main("convert_star.py", argv + ["--sampler-start-scale", "4"], capsys)
    _assert_one_line_error(rc, err, "error: `--sampler-start-scale` must be in [1, 3]")
    assert "--transformer" not in err and not (tmp_path / "out").exists()


def test_star_rope_schedule_ends_within_what_the_normalised_rope_resolves(tmp_path, capsys):
    """``--patch-nums 1,2,3,100000`` for a RoPE checkpoint (nothing in it bounds the sides) converted, then asked
    320 GB at generation. The last side is at most ``rope_norm + 1`` (neighbours at least one position apart)."""
    from diffusers_var.conversion.star import load_star_snapshot, star_config_from_state_dict

    vae, star, text = _star()
    state_dict, snapshot = load_star_snapshot(star)
    assert star_config_from_state_dict(state_dict, patch_nums=(1, 2, 3, 65))["patch_nums"] == [1, 2, 3, 65]
    for patch_nums in ((1, 2, 3, 66), (1, 2, 3, 100000)):
        with pytest.raises(ConversionError, match=r"^`patch_nums` .* ends with a scale of side \d+; .* up to 65"):
            star_config_from_state_dict(state_dict, patch_nums=patch_nums)
    assert star_config_from_state_dict(state_dict, patch_nums=(1, 2, 3, 129), rope_norm=128.0)["patch_nums"][-1] == 129
    with pytest.raises(ConversionError, match=r"^`patch_nums` from the snapshot's trainer config .* side 100000"):
        star_config_from_state_dict(state_dict, snapshot_config={"patch_nums": (1, 2, 3, 100000)})
    argv = ["--vae", vae, "--transformer", star, "--text-encoder", text, "--output", tmp_path / "out"]
    rc, err = _run_main("convert_star.py", argv + ["--patch-nums", "1,2,3,100000"], capsys)
    _assert_one_line_error(rc, err, "error: `--patch-nums` (1, 2, 3, 100000) ends with a scale of side 100000")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Input paths: all checked before any checkpoint is read
# ----------------------------------------------------------------------------------------------
def test_every_input_path_is_checked_before_any_checkpoint_is_read(tmp_path, capsys):
    """A missing ``--vae`` / ``--text-encoder`` / ``--tokenizer`` was reported only after the transformer was read
    and converted (minutes for a release). The transformer here is not a checkpoint at all: reading it first would
    be the error instead."""
    unreadable = tmp_path / "unreadable.pth"
    unreadable.write_bytes(b"not a checkpoint")
    star_vae, _, text = _star()
    inf_vae, _, t5, tokenizer = _infinity()
    code_vae, drafter, _ = _code()
    runs = [
        ("convert_var.py", ["--vae", "none.pth", "--transformer", unreadable], "`--vae`: no such file"),
        ("convert_code.py", ["--vae", code_vae, "--drafter", unreadable, "--refiner", "none.pth"], "`--refiner`"),
        ("convert_code.py", ["--vae", "none.pth", "--drafter", unreadable, "--refiner", drafter], "`--vae`"),
        ("convert_star.py", ["--vae", "none.pth", "--transformer", unreadable, "--text-encoder", text], "`--vae`"),
        (
            "convert_star.py",
            ["--vae", star_vae, "--transformer", unreadable, "--text-encoder", "none"],
            "`--text-encoder`: no such folder 'none'",
        ),
        (
            "convert_star.py",
            ["--vae", star_vae, "--transformer", unreadable, "--text-encoder", star_vae],
            "`--text-encoder`: '" + str(star_vae) + "' is a file, not a folder",
        ),
    ]
    infinity = ["--vae", inf_vae, "--transformer", unreadable, "--text-encoder", t5, "--tokenizer", tokenizer]
    for index, flag in ((1, "--vae"), (5, "--text-encoder"), (7, "--tokenizer")):
        argv = list(infinity)
        argv[index] = "none"
        runs.append(("convert_infinity.py", argv, f"`{flag}`: no such "))
    for script, argv, needle in runs:
        rc, err = _run_main(script, argv + ["--output", tmp_path / "out"], capsys)
        _assert_one_line_error(rc, err, "error: " + needle)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match=r"^`text_encoder`: no such folder"):  # the library names the argument
        convert_star_checkpoint(star_vae, unreadable, tmp_path / "none")


# ----------------------------------------------------------------------------------------------
# zero_k_bias: refused when not zero, in every family
# ----------------------------------------------------------------------------------------------
def test_a_zero_k_bias_buffer_that_is_not_zero_is_refused_in_every_family(tmp_path):
    """Infinity dropped a non-zero or NaN ``zero_k_bias`` silently (only its shape was checked); STAR refused it,
    VAR called it a wrong scale schedule. One shared check now, naming the buffer."""
    from diffusers_var.conversion.infinity import convert_infinity_transformer, load_infinity_transformer_state_dict
    from diffusers_var.conversion.star import convert_star_transformer, load_star_snapshot
    from diffusers_var.conversion.var import convert_var_transformer

    _, infinity, _, _ = _infinity()
    _, var = _var()
    _, star, _ = _star()
    infinity_state = load_infinity_transformer_state_dict(infinity)
    var_state = torch.load(var, map_location="cpu", weights_only=True)
    star_state, snapshot = load_star_snapshot(star)
    convert = {
        "infinity": (infinity_state, convert_infinity_transformer, {}),
        "var": (var_state, convert_var_transformer, {}),
        "star": (star_state, convert_star_transformer, {"snapshot_config": snapshot}),
    }
    for family, (state, function, kwargs) in convert.items():
        keys = [k for k in state if k.endswith("zero_k_bias")]
        assert keys, family
        for key in (keys[0], keys[-1]):
            for value in (float("nan"), 0.5):
                edited = dict(state)
                edited[key] = state[key].clone()
                edited[key][0] = value
                with pytest.raises(ConversionError, match=rf"^`transformer`: buffer '{key}' should be all zeros"):
                    function(edited, **kwargs)
