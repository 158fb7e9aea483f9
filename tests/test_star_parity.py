"""Numerical parity of the STAR family with the original implementation.

Everything is read from ``fixtures/star/manifest.json``: the build arguments (scale schedule, RoPE theta /
norm, logit norm, sampler start), the prompts, every generation call (its keyword arguments are parsed
from the recorded call), the per-call sampling trace and the tolerances. Any fixture set made the same
way (14 scales, another RoPE, no logit norm, ...) runs through the same tests. The model under test is
the converter's output loaded back with ``STARPipeline.from_pretrained``.
"""

from __future__ import annotations

import ast
import fnmatch
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_matches, fixture_dir, load_manifest
from diffusers_var import STARPipeline
from diffusers_var.conversion import convert_star_checkpoint
from diffusers_var.models.star_transformer import rope_rotary

MAX_ERRORS: dict[str, float] = {}
FALLBACK_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # float tensors the manifest's table does not name (confidences)


@pytest.fixture(scope="module")
def star_fixture():
    path = fixture_dir("star")
    return path, load_manifest(path), load_file(path / "reference.safetensors")


def conversion_kwargs(manifest) -> dict:
    var_kwargs = manifest["models"]["var_kwargs"]
    return dict(
        rope_theta=var_kwargs["rope_theta"],
        rope_norm=var_kwargs["rope_norm"],
        logit_norm=var_kwargs["enable_logit_norm"],
        sampler_start_scale=var_kwargs["sample_from_idx"],
    )


def text_encoder_folder(path, manifest):
    return path / next(name.rstrip("/") for name in manifest["files"] if name.startswith("text_encoder"))


@pytest.fixture(scope="module")
def pipe(star_fixture, tmp_path_factory):
    path, manifest, _ = star_fixture
    out = tmp_path_factory.mktemp("converted") / "star"
    convert_star_checkpoint(
        path / "vae.pth",
        path / "star_transformer.pth",
        text_encoder_folder(path, manifest),
        out,
        **conversion_kwargs(manifest),
    )
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pth", ".pt", ".pkl", ".ckpt"}]
    return STARPipeline.from_pretrained(out)


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    if MAX_ERRORS:
        families: dict[str, float] = {}
        for name, err in MAX_ERRORS.items():
            family = re.sub(r"call\d+", "callNNN", name)
            families[family] = max(families.get(family, 0.0), err)
        print("\nSTAR parity, max abs error per tensor family:")
        for name, err in sorted(families.items()):
            print(f"  {name:50s} {err:.3g}")


def tolerance(manifest, name: str, reference: torch.Tensor):
    if not reference.is_floating_point():
        return "exact"
    for patterns, value in manifest["tolerances_float32_cpu"].items():
        if not isinstance(value, dict):
            continue
        for pattern in patterns.split(" / "):
            pattern = pattern.split(" (")[0].strip()
            if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(name, pattern + "*"):
                return {"atol": value["atol"], "rtol": value.get("rtol", 0.0)}
    return FALLBACK_TOLERANCE


def check(manifest, ref, name, actual):
    assert_matches(name, actual, ref[name], tolerance(manifest, name, ref[name]), MAX_ERRORS)


def test_config_inferred_from_checkpoint(pipe, star_fixture):
    _, manifest, _ = star_fixture
    var_kwargs, cfg = manifest["models"]["var_kwargs"], pipe.transformer.config
    assert list(cfg.patch_nums) == list(var_kwargs["patch_nums"])
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (
        var_kwargs["depth"],
        var_kwargs["embed_dim"],
        var_kwargs["num_heads"],
    )
    assert cfg.text_embed_dim == var_kwargs["in_dim_cross"] and cfg.cross_attention == var_kwargs["enable_cross"]
    assert cfg.stable_sampler == var_kwargs["enable_adaptive_norm"] and cfg.rope == var_kwargs["rotary_pos_emb"]
    assert cfg.cross_attention_row0_quirk  # converted checkpoints reproduce the released behaviour
    vae_kwargs = manifest["models"]["vae_kwargs"]
    assert (pipe.vqvae.config.vocab_size, pipe.vqvae.config.z_channels, pipe.vqvae.config.ch) == (
        vae_kwargs["vocab_size"],
        vae_kwargs["z_channels"],
        vae_kwargs["ch"],
    )


def test_rope_table(pipe, star_fixture):
    _, manifest, ref = star_fixture
    table = pipe.transformer.rope_table()
    check(manifest, ref, "rope.freqs_cis_real", table.real)
    check(manifest, ref, "rope.freqs_cis_imag", table.imag)
    # the blocks get the rows of a scale as their own contiguous real tables (the compiled pieces read them), equal to
    # the table's real and imaginary parts
    rotary = rope_rotary(table[5:14])
    for part, expected in ((rotary.cos, table[5:14].real), (rotary.sin, table[5:14].imag)):
        assert part.is_contiguous() and part.dtype == torch.float32 and torch.equal(part, expected)
        assert part.untyped_storage().data_ptr() != table.untyped_storage().data_ptr()


def test_vq_tokenizer(pipe, star_fixture):
    _, manifest, ref = star_fixture
    vq, images = pipe.vqvae, ref["vae.input_images"]
    S = len(pipe.transformer.config.patch_nums)
    with torch.no_grad():
        check(manifest, ref, "vae.f_latent", vq.encode_latent(images))
        indices = vq.encode_indices(images)
        for k in range(S):
            check(manifest, ref, f"vae.gt_idx.scale{k:02d}", indices[k])
        check(manifest, ref, "vae.gt_idx_BL", torch.cat(indices, dim=1))
        check(manifest, ref, "vae.f_hat_final", vq.encode_fhat(images)[-1])
        check(manifest, ref, "vae.recon_last", vq.decode_indices(indices))
        check(manifest, ref, "vae.teacher_forcing_input_x_BLCv_wo_first_l", vq.teacher_forcing_input(indices))


def test_text_encoder(pipe, star_fixture):
    _, manifest, ref = star_fixture
    prompts = manifest["generator_config"]["prompts"]
    B = len(prompts)
    tokens = pipe.tokenizer(
        prompts + [""],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    check(manifest, ref, "text.input_ids", tokens.input_ids)
    check(manifest, ref, "text.attention_mask", tokens.attention_mask)
    hidden, mask, pooled, neg_hidden, neg_mask, neg_pooled = pipe.encode_prompt(prompts)
    check(manifest, ref, "text.last_hidden_state", torch.cat((hidden, neg_hidden[:1])))
    check(manifest, ref, "text.pooler_output", torch.cat((pooled, neg_pooled[:1])))
    check(manifest, ref, "text.attention_mask", torch.cat((mask, neg_mask[:1])))
    assert neg_hidden.shape[0] == B


def test_teacher_forcing(pipe, star_fixture):
    _, manifest, ref = star_fixture
    tr = pipe.transformer
    x = ref["vae.teacher_forcing_input_x_BLCv_wo_first_l"]
    hs, am, pooled = ref["text.last_hidden_state"], ref["text.attention_mask"], ref["text.pooler_output"]
    with torch.no_grad():
        out = tr(x, hs[:2], am[:2], pooled[:2])
        check(manifest, ref, "tf.logits_B2", out.logits)
        check(manifest, ref, "tf.final_hidden_B2", out.hidden_states)
        V = out.logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), ref["vae.gt_idx_BL"].reshape(-1))
        check(manifest, ref, "tf.loss_B2", loss.reshape(1))
        for b in range(2):  # each sample alone: no cross-batch leakage, pins the row-0 quirk
            single = tr(x[b : b + 1], hs[b : b + 1], am[b : b + 1], pooled[b : b + 1]).logits
            check(manifest, ref, f"tf.logits_B1_sample{b}", single)
        if "sampler_tf.logits" in ref and tr.has_stable_sampler:
            begin = tr.begin_ends[tr.config.sampler_start_scale][0]
            known = pipe.vqvae.codebook[ref["vae.gt_idx_BL"][:, begin:]]
            logits = tr.forward_sampler(out.hidden_states, known, ref["sampler_tf.mask"], pooled[:2])
            check(manifest, ref, "sampler_tf.logits", logits)


def test_row0_quirk_flag_off_is_per_row(pipe, star_fixture):
    """Without the quirk, row b of a batch equals sample b run alone (the correct behaviour)."""
    _, _, ref = star_fixture
    tr = pipe.transformer
    x = ref["vae.teacher_forcing_input_x_BLCv_wo_first_l"]
    hs, am, pooled = ref["text.last_hidden_state"], ref["text.attention_mask"], ref["text.pooler_output"]
    tr.register_to_config(cross_attention_row0_quirk=False)
    try:
        with torch.no_grad():
            batched = tr(x, hs[:2], am[:2], pooled[:2]).logits
            torch.testing.assert_close(batched[1:], ref["tf.logits_B1_sample1"], atol=2e-4, rtol=1e-4)
            assert (batched[1:] - ref["tf.logits_B2"][1:]).abs().max() > 1e-2
    finally:
        tr.register_to_config(cross_attention_row0_quirk=True)


# ----------------------------------------------------------------------------------------------
# Generations
# ----------------------------------------------------------------------------------------------
def parse_generation_call(call: str) -> dict:
    """Keyword arguments of the recorded ``autoregressive_infer_cfg`` call (+ a preceding global seed)."""
    global_seed = re.search(r"torch\.manual_seed\((\d+)\)", call)
    expr = call.split(";")[-1].strip()
    node = ast.parse(expr, mode="eval").body
    kwargs = {kw.arg: kw.value for kw in node.keywords}
    literal = {k: ast.literal_eval(v) for k, v in kwargs.items() if isinstance(v, ast.Constant)}
    literal["global_seed"] = int(global_seed.group(1)) if global_seed else None
    return literal


def _generation_cases():
    try:
        path = fixture_dir("star")
    except BaseException:  # collection must not fail; the fixture's own tests report it
        return ["fixtures-missing"]
    return sorted(name for name in load_manifest(path)["calls"] if name.startswith("gen_"))


@pytest.mark.parametrize("case", _generation_cases())
def test_generation(pipe, star_fixture, case):
    if case == "fixtures-missing":
        fixture_dir("star")
    _, manifest, ref = star_fixture
    spec = manifest["calls"][case]
    kwargs = parse_generation_call(spec["call"])
    B = kwargs["B"]
    prompts, negatives = spec["prompts"][:B], spec["prompts"][B:]
    seen = {}

    def record(pipeline, scale_index, patch_num, tensors):
        seen[scale_index] = {k: (v.clone() if v is not None else None) for k, v in tensors.items()}
        return {}

    call = dict(
        prompt=prompts,
        negative_prompt=negatives,
        guidance_scale=kwargs["cfg"],
        top_k=kwargs["top_k"],
        top_p=kwargs["top_p"],
        more_smooth=kwargs["more_smooth"],
        use_stable_sampler=kwargs["w_mask"],
        sampler_version=kwargs["sample_version"],
    )
    with torch.no_grad():
        out = pipe(
            **call,
            generator=torch.Generator().manual_seed(kwargs["g_seed"]),
            sampler_generator=torch.Generator().manual_seed(kwargs["global_seed"] or 0),
            output_type="pt",
            callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=list(STARPipeline._callback_tensor_inputs),
        )
        latent = pipe(
            **call,
            generator=torch.Generator().manual_seed(kwargs["g_seed"]),
            sampler_generator=torch.Generator().manual_seed(kwargs["global_seed"] or 0),
            output_type="latent",
        ).images
    S = len(pipe.transformer.config.patch_nums)
    assert sorted(seen) == list(range(S))
    sampler_start = pipe.transformer.config.sampler_start_scale if kwargs["w_mask"] else S
    if f"{case}.idx_BL" in ref:
        check(manifest, ref, f"{case}.idx_BL", torch.cat([seen[s]["indices"] for s in range(S)], dim=1))
    if f"{case}.mixed_logits_BLV" in ref:
        check(manifest, ref, f"{case}.mixed_logits_BLV", torch.cat([seen[s]["logits"] for s in range(S)], dim=1))
    if f"{case}.mixed_logits_plain_scales" in ref:
        plain = torch.cat([seen[s]["logits"] for s in range(sampler_start)], dim=1)
        check(manifest, ref, f"{case}.mixed_logits_plain_scales", plain)
    # every recorded sampling call: (scale, step) -> the scale's per-step trace
    for entry in spec.get("sample_calls", []):
        prefix = f"{case}.call{entry['call']:03d}"
        step_trace = seen[entry["scale"]]
        for suffix, key in (("mixed_logits", "step_logits"), ("idx", "step_indices"), ("conf", "step_confidences")):
            if f"{prefix}.{suffix}" in ref:
                check(manifest, ref, f"{prefix}.{suffix}", step_trace[key][entry["step"]])
    check(manifest, ref, f"{case}.f_hat", seen[S - 1]["f_hat"])
    check(manifest, ref, f"{case}.f_hat", latent)
    if f"{case}.image" in ref:
        check(manifest, ref, f"{case}.image", out.images)


def test_plain_checkpoint_emulation(star_fixture, tmp_path):
    """A checkpoint without the sampler keys (star-256/512/1024 layout) converts and gives the same
    w_mask=False generations; asking it for the stable sampler is a clear error."""
    path, manifest, ref = star_fixture
    snapshot = torch.load(path / "star_transformer.pth", map_location="cpu", weights_only=True)
    sampler_prefixes = (
        "feat_extract_blocks.",
        "word_embed_head.",
        "pos_start_last",
        "head_logits2.",
        "encoder_proj2.",
        "head_proj.",
        "lvl_embed_2.",
    )
    weights = snapshot["trainer"]["var_wo_ddp"]
    snapshot["trainer"]["var_wo_ddp"] = {k: v for k, v in weights.items() if not k.startswith(sampler_prefixes)}
    torch.save(snapshot, tmp_path / "plain.pth")
    plain = convert_star_checkpoint(
        path / "vae.pth", tmp_path / "plain.pth", text_encoder_folder(path, manifest), **conversion_kwargs(manifest)
    )
    assert not plain.transformer.has_stable_sampler
    case = next(
        name
        for name in _generation_cases()
        if not parse_generation_call(manifest["calls"][name]["call"])["w_mask"] and f"{name}.idx_BL" in ref
    )
    kwargs = parse_generation_call(manifest["calls"][case]["call"])
    prompts = manifest["calls"][case]["prompts"][: kwargs["B"]]
    latent = plain(
        prompts,
        guidance_scale=kwargs["cfg"],
        top_k=kwargs["top_k"],
        top_p=kwargs["top_p"],
        generator=torch.Generator().manual_seed(kwargs["g_seed"]),
        output_type="latent",
    ).images
    check(manifest, ref, f"{case}.f_hat", latent)
    with pytest.raises(ValueError, match="use_stable_sampler"):
        plain(prompts, use_stable_sampler=True, output_type="latent")


def test_command_line_converter(star_fixture, tmp_path, capsys):
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("convert_star", REPO_ROOT / "conversion" / "convert_star.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    path, manifest, _ = star_fixture
    common = ["--vae", str(path / "vae.pth"), "--text-encoder", str(text_encoder_folder(path, manifest))]
    assert cli.main(common + ["--transformer", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "a")]) == 2
    assert "`--transformer`" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert (
        cli.main(common + ["--transformer", str(path / "star_transformer.pth"), "--output", str(tmp_path / "b")]) == 0
    )
    assert (tmp_path / "b" / "model_index.json").is_file()
    assert (
        cli.main(common + ["--transformer", str(path / "star_transformer.pth"), "--output", str(tmp_path / "b")]) == 2
    )
    assert "`--output`" in capsys.readouterr().err


def test_converter_refuses_a_tokenizer_of_another_text_encoder_and_casts_the_text_encoder(star_fixture, tmp_path):
    """A CLIP text encoder with a T5 tokenizer converted, then failed deep inside transformers at generation (512
    positions asked of 77); ``--dtype`` left STAR's text encoder float32 while Infinity's followed it."""
    import shutil

    from diffusers_var.conversion import ConversionError

    path, manifest, _ = star_fixture
    folder = text_encoder_folder(path, manifest)
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.rmtree(mixed / "tokenizer")
    shutil.copytree(fixture_dir("infinity") / "tokenizer", mixed / "tokenizer")
    with pytest.raises(ConversionError, match="`text_encoder`: the tokenizer"):
        convert_star_checkpoint(
            path / "vae.pth", path / "star_transformer.pth", mixed, tmp_path / "refused", **conversion_kwargs(manifest)
        )
    assert not (tmp_path / "refused").exists()
    pipe = convert_star_checkpoint(
        path / "vae.pth", path / "star_transformer.pth", folder, dtype=torch.float16, **conversion_kwargs(manifest)
    )
    assert pipe.text_encoder.dtype == torch.float16
    # a text encoder saved in float16 (its config says so, and transformers loads it so) becomes float32 by default
    half = tmp_path / "half"
    shutil.copytree(folder, half)
    encoder_dir = half / "text_encoder" if (half / "text_encoder").is_dir() else half
    type(pipe.text_encoder).from_pretrained(encoder_dir).half().save_pretrained(encoder_dir)
    assert type(pipe.text_encoder).from_pretrained(encoder_dir).dtype == torch.float16
    pipe = convert_star_checkpoint(
        path / "vae.pth", path / "star_transformer.pth", half, **conversion_kwargs(manifest)
    )
    assert pipe.text_encoder.dtype == torch.float32
