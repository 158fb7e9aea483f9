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


def test_a_bit_flipped_checkpoint_is_refused(originals, tmp_path):
    """The probe: a zip-format .pth with one byte of a tensor flipped (not truncated) converted silently, because
    torch.load does not check the zip's CRC-32s."""
    import struct
    import zipfile

    vae, var = originals
    with zipfile.ZipFile(var) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)  # a tensor's bytes
    data = bytearray(var.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    data[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0xFF
    (tmp_path / "flipped.pth").write_bytes(data)
    pattern = rf"`transformer`: '.*flipped\.pth' is corrupted: its member '{member.filename}' fails its CRC-32"
    with pytest.raises(ConversionError, match=pattern + r".*re-download it"):
        convert_var_checkpoint(vae, tmp_path / "flipped.pth")


def test_a_checkpoint_whose_tensor_record_is_short_is_refused(originals, tmp_path, capsys):
    """The probe: a zip-format .pth whose tensor record is shorter than its tensor (its CRC-32 valid) loaded, because
    the memory-mapped torch.load reads the tensor's bytes from the record's offset without checking its size: the
    tensor's tail came from the next zip header. The records' sizes are now checked against the loaded storages'."""
    import copy
    import re
    import zipfile

    vae, var = originals
    torch.save(torch.load(var, weights_only=True), tmp_path / "whole.pth")
    with zipfile.ZipFile(tmp_path / "whole.pth") as source, zipfile.ZipFile(tmp_path / "short.pth", "w") as short:
        records = [info for info in source.infolist() if re.search(r"/data/\d+\Z", info.filename)]
        victim = max(records, key=lambda info: info.file_size)
        for info in source.infolist():
            data = source.read(info)
            short.writestr(copy.copy(info), data[:-8] if info is victim else data)  # stored, a valid CRC-32
    pattern = (
        rf"`transformer`: '.*short\.pth' is corrupted: its member '{victim.filename}' holds {victim.file_size - 8}"
    )
    with pytest.raises(ConversionError, match=pattern + r" bytes, the size of none of its tensors"):
        convert_var_checkpoint(vae, tmp_path / "short.pth")
    rc, err = _run_main(
        "convert_var.py", ["--vae", vae, "--transformer", tmp_path / "short.pth", "--output", tmp_path / "out"], capsys
    )
    _assert_one_line_error(rc, err, "error: `--transformer`: ", "is corrupted: its member")
    assert not (tmp_path / "out").exists()


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


def test_a_checkpoint_holding_nan_is_refused(originals, tmp_path):
    """NaN weights would convert into a pipeline that draws NaN images: refused, naming the converted weight."""
    vae, var = originals
    state = torch.load(var, map_location="cpu", weights_only=True)
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="NaN or infinite values: converted to `transformer.head"):
        convert_var_checkpoint(vae, tmp_path / "nan.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _run_main(script: str, argv, capsys) -> tuple[int, str]:
    """A converter's ``main`` as the command line runs it: (exit code, stderr); argparse errors exit."""
    import runpy

    main = runpy.run_path(str(REPO_ROOT / "conversion" / script))["main"]
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    return rc, capsys.readouterr().err


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_patch_nums_must_be_strictly_increasing_before_converting(originals, tmp_path, capsys):
    """The audit: VAR / CoDe ``--patch-nums 0,1,2,3,4``, ``4,3,2,1``, ``--patch-nums=-1,2,3,4`` were a ValueError
    traceback (rc 1) from the model after both checkpoints were read; now a one-line error when parsing."""
    vae, var = originals
    for value in ("0,1,2,3,4", "4,3,2,1", "-1,2,3,4", "4"):
        runs = {
            "convert_var.py": ["--vae", vae, "--transformer", var],
            "convert_code.py": ["--vae", vae, "--drafter", var, "--refiner", var],
        }
        for script, argv in runs.items():
            rc, err = _run_main(script, argv + ["--output", tmp_path / "out", f"--patch-nums={value}"], capsys)
            _assert_one_line_error(rc, err, "--patch-nums", "strictly increasing positive integers")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="strictly increasing"):  # the library: a ConversionError too
        convert_var_checkpoint(vae, var, patch_nums=[4, 3, 2, 1])
    argv = ["--vae", vae, "--transformer", tmp_path, "--output", tmp_path / "o"]
    rc, err = _run_main("convert_var.py", argv, capsys)
    _assert_one_line_error(rc, err, "`--transformer`", "is a folder; give the checkpoint file")  # not "no such file"


def test_float_flags_have_ranges(originals, capsys):
    """The audit: STAR ``--rope-theta nan`` (written to the config), ``--rope-norm 0``, VAR / CoDe ``--quant-resi
    inf`` or ``7`` were accepted, VAR ``--quant-resi nan`` failed with an unrelated message. Checked when parsing
    (the checkpoints here do not exist), and by the library."""
    from diffusers_var.conversion.star import load_star_snapshot, star_config_from_state_dict
    from diffusers_var.conversion.var import convert_vae

    var_argv = ["--vae", "v.pth", "--transformer", "t.pth", "--output", "out"]
    code_argv = ["--vae", "v.pth", "--drafter", "d.pth", "--refiner", "r.pth", "--output", "out"]
    star_argv = ["--vae", "v.pth", "--transformer", "t.pth", "--text-encoder", "te", "--output", "out"]
    for value in ("nan", "inf", "7", "0", "-0.5"):
        for script, argv in (("convert_var.py", var_argv), ("convert_code.py", code_argv)):
            rc, err = _run_main(script, argv + ["--quant-resi", value], capsys)
            _assert_one_line_error(rc, err, "--quant-resi", "finite number in (1e-06, 1]")
    for flag, value in (("--rope-theta", "nan"), ("--rope-theta", "-1"), ("--rope-norm", "0"), ("--rope-norm", "inf")):
        rc, err = _run_main("convert_star.py", star_argv + [flag, value], capsys)
        _assert_one_line_error(rc, err, flag, "finite number > 0")

    vae, _ = originals
    vae_sd = torch.load(vae, weights_only=True)
    with pytest.raises(ConversionError, match="`quant_resi` must be a finite number"):
        convert_vae(vae_sd, (1, 2, 3, 4), quant_resi=float("nan"))
    star_sd, snapshot = load_star_snapshot(fixture_dir("star") / "star_transformer.pth")
    with pytest.raises(ConversionError, match="`rope_theta` must be a finite number > 0"):
        star_config_from_state_dict(star_sd, snapshot_config=snapshot, rope_theta=float("nan"))


def test_depth_states_its_range(originals, capsys):
    """The audit: ``--depth -1`` said "more blocks than -1" without the allowed values."""
    from diffusers_var.conversion.var import convert_var_transformer

    vae, var = originals
    rc, err = _run_main(
        "convert_var.py", ["--vae", vae, "--transformer", var, "--output", "o", "--depth", "-1"], capsys
    )
    _assert_one_line_error(rc, err, "--depth", ">= 1")
    with pytest.raises(ConversionError, match=r"`depth` must be a whole number of blocks >= 1, got -1"):
        convert_var_transformer(torch.load(var, weights_only=True), depth=-1)


def test_legacy_format_checkpoint_is_read(originals, tmp_path):
    """A valid checkpoint saved with ``_use_new_zipfile_serialization=False`` was refused as "truncated or corrupted"
    (mmap needs the zip format); it is read without mmap, still with weights_only."""
    from diffusers_var.conversion import load_checkpoint

    _, var = originals
    state_dict = torch.load(var, weights_only=True)
    torch.save(state_dict, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "legacy.pth", "transformer")
    assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    torch.save({"x": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match="transformer.*arbitrary code"):  # still weights_only
        load_checkpoint(tmp_path / "evil.pth", "transformer")


def test_an_unreadable_infinity_shard_is_one_error_naming_the_file(tmp_path):
    """The audit: a truncated ``.safetensors`` shard in an Infinity shard folder was a SafetensorError traceback."""
    from safetensors.torch import save_file

    from diffusers_var.conversion.infinity import load_infinity_transformer_state_dict

    shards = tmp_path / "shards"
    shards.mkdir()
    save_file(
        {"cfg_uncond": torch.zeros(4, 8), "word_embed.weight": torch.zeros(8, 4)}, shards / "model-1.safetensors"
    )
    data = (shards / "model-1.safetensors").read_bytes()
    (shards / "model-1.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ConversionError, match=r"`transformer`: '.*model-1\.safetensors' is not a readable safetensors"
    ):
        load_infinity_transformer_state_dict(shards)
    (shards / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ConversionError, match="`transformer`: cannot read the shard index"):
        load_infinity_transformer_state_dict(shards)


def test_infinity_shards_are_read_as_their_index_maps_them(tmp_path):
    """The probe: a key that the index puts in one shard but that another shard holds too (with other values) was
    taken from whichever shard came last, silently; a shard name in the index could be an absolute path or leave
    the folder through '..'. Each tensor now comes from the shard the index names, and such folders are refused."""
    import json

    from safetensors.torch import save_file

    from diffusers_var.conversion.infinity import load_infinity_transformer_state_dict

    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"cfg_uncond": torch.ones(4, 8)}, shards / "model-1.safetensors")
    save_file({"word_embed.weight": torch.ones(8, 4)}, shards / "model-2.safetensors")
    index = shards / "model.safetensors.index.json"

    def write_index(**weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    write_index(cfg_uncond="model-1.safetensors", **{"word_embed.weight": "model-2.safetensors"})
    assert bool((load_infinity_transformer_state_dict(shards)["cfg_uncond"] == 1).all())
    # the same key, zeroed, in the shard read last
    save_file({"word_embed.weight": torch.ones(8, 4), "cfg_uncond": torch.zeros(4, 8)}, shards / "model-2.safetensors")
    with pytest.raises(ConversionError, match=r"`transformer`: .*'cfg_uncond' is in two shards"):
        load_infinity_transformer_state_dict(shards)
    index.unlink()  # no index: every shard file of the folder, each key still read once
    with pytest.raises(ConversionError, match=r"'cfg_uncond' is in two shards, '.*model-1\.safetensors' and"):
        load_infinity_transformer_state_dict(shards)
    write_index(cfg_uncond="model-1.safetensors", **{"word_embed.weight": "model-2.safetensors"})
    save_file({"word_embed.weight": torch.ones(8, 4)}, shards / "model-2.safetensors")
    save_file({"cfg_uncond": torch.ones(4, 8), "word_embed.weight": torch.zeros(8, 4)}, shards / "model-1.safetensors")
    with pytest.raises(
        ConversionError, match=r"1\.safetensors' holds 'word_embed\.weight', which the index .* assigns"
    ):
        load_infinity_transformer_state_dict(shards)
    save_file({"cfg_uncond": torch.ones(4, 8)}, shards / "model-1.safetensors")
    write_index(cfg_uncond="model-2.safetensors", **{"word_embed.weight": "model-2.safetensors"})
    with pytest.raises(
        ConversionError, match=r"assigns 'cfg_uncond' to '.*model-2\.safetensors', which does not hold"
    ):
        load_infinity_transformer_state_dict(shards)
    outside = tmp_path / "outside.safetensors"
    save_file({"cfg_uncond": torch.zeros(4, 8)}, outside)
    for name in (str(outside), "../outside.safetensors", "sub/../../outside.safetensors"):
        write_index(cfg_uncond=name, **{"word_embed.weight": "model-2.safetensors"})
        with pytest.raises(ConversionError, match=r"`transformer`: the shard index '.*index\.json' names the shard"):
            load_infinity_transformer_state_dict(shards)


def test_code_with_swapped_roles_converts_with_a_warning(tmp_path, capsys):
    """CoDe drafts with the large model and refines with the small one; any pair converts (training-free CoDe),
    but a drafter smaller than its refiner is a one-line warning (the roles were probably swapped)."""
    import warnings

    from diffusers_var.conversion import convert_code_checkpoint
    from diffusers_var.conversion.common import ConversionWarning

    path = fixture_dir("code")
    files = {k: path / v["path"] for k, v in load_manifest(path)["files"].items() if k.endswith("_pth")}
    argv = ["--vae", files["vae_pth"], "--drafter", files["refiner_pth"], "--refiner", files["drafter_pth"]]
    rc, err = _run_main("convert_code.py", argv + ["--output", tmp_path / "swapped"], capsys)
    assert rc == 0 and (tmp_path / "swapped" / "model_index.json").is_file()
    assert err.startswith("warning: the drafter is the smaller model") and err.count("\n") == 1, err
    assert "did you swap --drafter and --refiner?" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)  # the usual order: no warning
        convert_code_checkpoint(files["vae_pth"], files["drafter_pth"], files["refiner_pth"])


def test_edited_checkpoints_are_one_error_line_naming_the_file(originals, tmp_path, capsys):
    """The audit: a key removed or of another rank, an impossible size or a stray block index made raw tracebacks
    (KeyError, IndexError, ZeroDivisionError; a stray index of 10**9 a list of a billion missing blocks). Each is one
    error line naming the flag; the block message lists the first missing indices only."""
    vae, var = originals
    state = torch.load(var, map_location="cpu", weights_only=True)
    vae_state = torch.load(vae, map_location="cpu", weights_only=True)
    edits = {
        "no_fc1": ("transformer", {k: v for k, v in state.items() if k != "blocks.0.ffn.fc1.weight"}),
        "flat_class_emb": ("transformer", {**state, "class_emb.weight": state["class_emb.weight"].flatten()}),
        "flat_word_embed": ("transformer", {**state, "word_embed.weight": state["word_embed.weight"].flatten()}),
        "stray_block": ("transformer", {**state, "blocks.1000000000.attn.q_bias": torch.zeros(4)}),
        "empty_conv_in": ("vae", {**vae_state, "encoder.conv_in.weight": torch.zeros(0, 3, 3, 3)}),
        "integer_head": ("transformer", {**state, "head.weight": state["head.weight"].long()}),
        "complex_head": ("transformer", {**state, "head.weight": state["head.weight"].to(torch.complex64)}),
    }
    for name, (flag, edited) in edits.items():
        torch.save(edited, tmp_path / f"{name}.pth")
        files = {"vae": vae, "transformer": var, flag: tmp_path / f"{name}.pth"}
        argv = ["--vae", files["vae"], "--transformer", files["transformer"], "--output", tmp_path / name]
        rc, err = _run_main("convert_var.py", argv, capsys)
        _assert_one_line_error(rc, err, f"`--{flag}`")
        assert not (tmp_path / name).exists()
        if name == "stray_block":
            assert "'...'" in err and len(err) < 1000, err


def test_half_precision_output_keeps_the_heads_in_float32_and_names_an_overflow(originals, tmp_path):
    """``_keep_in_fp32_modules`` (the logit head and its norm) stay float32 in a float16 / bfloat16 output, as every
    loader keeps them; a weight beyond float16's range is refused naming ``dtype`` (it became inf, and the
    finite-weights check blamed the checkpoint)."""
    from safetensors import safe_open

    vae, var = originals
    out = tmp_path / "half"
    convert_var_checkpoint(vae, var, out, dtype=torch.float16)
    with safe_open(out / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        dtypes = {key: weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert {dtypes[k] for k in dtypes if k.startswith(("head.", "head_norm."))} == {"F32"}
    assert "F16" in {dtypes[k] for k in dtypes if k.startswith("blocks.")}
    state = torch.load(var, map_location="cpu", weights_only=True)
    state["blocks.0.ffn.fc1.weight"][0, 0] = 1e6
    torch.save(state, tmp_path / "large.pth")
    with pytest.raises(ValueError, match=r"`dtype` float16: `transformer.blocks.0.ffn.fc1.weight` holds values up to"):
        convert_var_checkpoint(vae, tmp_path / "large.pth", tmp_path / "out", dtype=torch.float16)
    assert convert_var_checkpoint(vae, tmp_path / "large.pth", dtype=torch.bfloat16) is not None


def test_overwrite_takes_back_what_our_own_saves_wrote_into_a_converted_folder(originals, tmp_path):
    """``--overwrite`` refused a converted folder after a ``save_pretrained`` of ours into it: a variant's weights were
    not in the converter's manifest, and a killed save's staging folder (marked) counted as the user's files. A
    file of the user's is still refused."""
    from diffusers_var.file_utils import STAGING_MARKER

    vae, var = originals
    out = tmp_path / "out"
    pipe = convert_var_checkpoint(vae, var, out)
    pipe.save_pretrained(out, variant="fp16")
    pipe.transformer.save_pretrained(out / "transformer", variant="ema")  # a model's save into a component folder
    assert (out / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (out / "transformer" / "diffusion_pytorch_model.ema.safetensors").is_file()
    killed = out / ".saving-k_930314"
    (killed / "new" / "transformer").mkdir(parents=True)
    (killed / STAGING_MARKER).write_text('{"host": "elsewhere", "pid": 1}')
    (killed / "new" / "transformer" / "config.json").write_text("{}")
    convert_var_checkpoint(vae, var, out, overwrite=True)
    assert not killed.exists() and not (out / "transformer" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert not (out / "transformer" / "diffusion_pytorch_model.ema.safetensors").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write \\(notes.txt\\)"):
        convert_var_checkpoint(vae, var, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_cosine_trained_tokenizer_converts_with_using_znorm(originals, tmp_path):
    """``using_znorm=True`` (a tokenizer trained to pick codes by cosine similarity; nothing in its weights says so)
    reaches the converted tokenizer, whose encoder then picks the most similar code, not the nearest one."""
    vae, var = originals
    out = tmp_path / "cosine"
    command = [sys.executable, str(REPO_ROOT / "conversion" / "convert_var.py"), "--vae", str(vae)]
    command += ["--transformer", str(var), "--output", str(out), "--using-znorm"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    vqvae = VARPipeline.from_pretrained(out).vqvae
    assert vqvae.config.using_znorm and not convert_var_checkpoint(vae, var).vqvae.config.using_znorm
    quantizer = vqvae.quantize
    codebook = torch.zeros_like(quantizer.embedding.weight)
    codebook[0, :2] = torch.tensor([1.0, 0.3])  # nearest to (1, 0): squared distance 0.09, cosine 0.958
    codebook[1:, 0] = 5.0  # cosine 1, squared distance 16
    codebook[1:, 1] = -torch.arange(1, codebook.shape[0]).float()  # (all but code 1 less similar than it)
    codebook[1, 1] = 0.0
    with torch.no_grad():
        quantizer.embedding.weight.copy_(codebook)
    z_NC = torch.zeros(1, codebook.shape[1])
    z_NC[0, 0] = 1.0
    assert quantizer.nearest_code(z_NC).item() == 1
    quantizer.using_znorm = False
    assert quantizer.nearest_code(z_NC).item() == 0


def test_code_roles_without_l2_norm_take_their_heads_per_role(tmp_path, capsys):
    """A CoDe pair trained with ``attn_l2_norm=False`` does not record its heads: ``--drafter-num-heads`` /
    ``--refiner-num-heads`` give them (the converter had no such flag, so such a pair could not be converted), the
    errors name the role's flag, and ``--using-znorm`` reaches the shared VQ-VAE."""
    path = fixture_dir("code")
    files = {k: path / v["path"] for k, v in load_manifest(path)["files"].items() if k.endswith("_pth")}
    for role in ("drafter", "refiner"):  # the fixture's drafter: width 64, 2 heads; refiner: width 32, 1 head
        state = torch.load(files[f"{role}_pth"], map_location="cpu", weights_only=True)
        torch.save({k: v for k, v in state.items() if "scale_mul_1H11" not in k}, tmp_path / f"{role}.pth")
    argv = ["--vae", files["vae_pth"], "--drafter", tmp_path / "drafter.pth", "--refiner", tmp_path / "refiner.pth"]
    rc, err = _run_main("convert_code.py", argv + ["--output", tmp_path / "no_heads"], capsys)
    # 64 features a head make the drafter the release layout of 1 block: its 3 blocks are refused, naming its flag
    assert rc == 2 and "`--drafter`: more blocks than 1" in err and "pass --drafter-depth" in err, err
    rc, err = _run_main("convert_code.py", argv + ["--output", tmp_path / "no_heads", "--drafter-depth", "3"], capsys)
    assert rc == 2 and "`--refiner-num-heads`: the checkpoint's width 32 is not 64 features a head" in err, err
    assert "pass --refiner-num-heads" in err and not (tmp_path / "no_heads").exists()
    rc, err = _run_main("convert_code.py", argv + ["--output", tmp_path / "bad", "--drafter-num-heads", "3"], capsys)
    assert rc == 2 and "`--drafter-num-heads` must divide the width 64, got 3" in err, err
    heads = ["--drafter-num-heads", "2", "--refiner-num-heads", "1", "--using-znorm"]
    rc, err = _run_main("convert_code.py", argv + ["--output", tmp_path / "out", *heads], capsys)
    assert rc == 0, err
    from diffusers_var import VARCoDePipeline

    pipe = VARCoDePipeline.from_pretrained(tmp_path / "out")
    assert (pipe.transformer.config.num_heads, pipe.refiner.config.num_heads) == (2, 1)
    assert not pipe.transformer.config.attn_l2_norm and not pipe.refiner.config.attn_l2_norm
    assert pipe.vqvae.config.using_znorm


def test_converter_command_lines_name_the_flags(originals, tmp_path, capsys, monkeypatch):
    """README: a converter's error is one line naming the flag. The library's messages name its arguments
    (`transformer`, `output`, `text-encoder`); the commands printed those, unlike the other commands."""
    vae, var = originals
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    var_argv = ["--vae", vae, "--transformer", "missing.pth", "--output", "o"]
    rc, err = _run_main("convert_var.py", var_argv, capsys)
    assert (rc, err) == (2, "error: `--transformer`: no such file 'missing.pth'.\n"), err
    rc, err = _run_main("convert_var.py", ["--vae", vae, "--transformer", var, "--output", "out"], capsys)
    _assert_one_line_error(rc, err, "error: `--output`: ", "out' already exists")
    star = fixture_dir("star")
    star_argv = ["--vae", star / "vae.pth", "--transformer", star / "star_transformer.pth", "--output", "o"]
    rc, err = _run_main("convert_star.py", [*star_argv, "--text-encoder", "none"], capsys)
    assert (rc, err) == (2, "error: `--text-encoder`: no such folder 'none'.\n"), err
    infinity = fixture_dir("infinity")
    infinity_argv = ["--vae", infinity / "vae.pth", "--transformer", infinity / "transformer/infinity.pth"]
    infinity_argv += ["--text-encoder", infinity / "tokenizer", "--output", "o"]  # no encoder in that folder
    rc, err = _run_main("convert_infinity.py", [*infinity_argv, "--tokenizer", infinity / "tokenizer"], capsys)
    _assert_one_line_error(rc, err, "error: `--text-encoder`: cannot load a T5 encoder")
    rc, err = _run_main("convert_infinity.py", [*infinity_argv, "--tokenizer", "none"], capsys)
    assert (rc, err) == (2, "error: `--tokenizer`: no such folder 'none'.\n"), err
    code_argv = ["--vae", vae, "--drafter", var, "--refiner", "missing.pth", "--output", "o"]
    rc, err = _run_main("convert_code.py", code_argv, capsys)
    assert (rc, err) == (2, "error: `--refiner`: no such file 'missing.pth'.\n"), err
    rc, err = _run_main(
        "convert_code.py", [*code_argv[:4], "--refiner", var, "--output", "o", "--draft-steps", "9"], capsys
    )
    _assert_one_line_error(rc, err, "error: `--draft-steps`")


def test_converter_paths_expand_the_home_folder(originals, tmp_path, capsys, monkeypatch):
    """The probe: the shell expands ``--output ~/x`` but not ``--output=~/x``; the converters made a folder named
    '~' in the current one, and ``--transformer=~/var.pth`` was "no such file". Every path flag expands it."""
    import shutil

    import diffusers_var.conversion

    vae, var = originals
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    shutil.copy(vae, home / "vae.pth")
    shutil.copy(var, home / "var.pth")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    rc, err = _run_main("convert_var.py", ["--vae=~/vae.pth", "--transformer=~/var.pth", "--output=~/out"], capsys)
    assert rc == 0, err
    assert (home / "out" / "model_index.json").is_file() and not list(work.iterdir())

    # the other converters: what each hands the library (stopped there)
    received = {}

    def stop(*args, **kwargs):
        received["args"] = args
        raise ConversionError("stopped")

    flags = {
        "convert_star.py": ["--vae", "--transformer", "--text-encoder", "--output"],
        "convert_infinity.py": ["--vae", "--transformer", "--text-encoder", "--tokenizer", "--output"],
        "convert_code.py": ["--vae", "--drafter", "--refiner", "--output"],
    }
    for script, names in flags.items():
        function = f"{script[:-3]}_checkpoint"
        monkeypatch.setattr(diffusers_var.conversion, function, stop)
        rc, err = _run_main(script, [f"{name}=~/{name[2:]}" for name in names], capsys)
        assert (rc, err) == (2, "error: stopped\n"), err
        assert received["args"] == tuple(str(home / name[2:]) for name in names), script
