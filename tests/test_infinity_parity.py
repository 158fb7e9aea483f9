"""Numerical parity of the Infinity family with the original implementation.

Everything is read from ``fixtures/infinity/manifest.json``: the scale schedule and image size, the prompts,
the generation calls (parsed from each tensor's recorded ``call``), the tolerances and the near-tie rules,
so another fixture set (other aspect ratio, spatial patchify, widths, bit counts) runs through the same
tests. The models under test come out of the converter and are loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import ast
import fnmatch
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_matches, fixture_dir, load_manifest
from diffusers_var import InfinityPipeline
from diffusers_var.conversion import convert_infinity_checkpoint

MAX_ERRORS: dict[str, float] = {}
MODELS = ("transformer", "variant")


@pytest.fixture(scope="module")
def fixture():
    path = fixture_dir("infinity")
    return path, load_manifest(path), load_file(path / "reference.safetensors")


def _level_embed_every_chunk(manifest, model: str) -> bool:
    key = "transformer" if model == "transformer" else "variant_transformer"
    return manifest["configs"][key]["kwargs"].get("add_lvl_embeding_only_first_block", 1) == 0


@pytest.fixture(scope="module")
def pipes(fixture, tmp_path_factory):
    path, manifest, _ = fixture
    loaded = {}
    for model in MODELS:
        out = tmp_path_factory.mktemp("converted") / model
        convert_infinity_checkpoint(
            path / "vae.pth",
            path / model / "infinity.pth",
            path / "text_encoder",
            path / "tokenizer",
            out,
            level_embed_every_chunk=_level_embed_every_chunk(manifest, model),
        )
        assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pth", ".pt", ".pkl", ".ckpt"}]
        pipe = InfinityPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        loaded[model] = pipe
    return loaded


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    if MAX_ERRORS:
        print("\nInfinity parity, max abs error per tensor:")
        for name, err in sorted(MAX_ERRORS.items()):
            print(f"  {name:45s} {err:.3g}")


def tolerance(manifest, name):
    table = manifest["recommended_tolerances_float32_cpu"]
    entry = None
    for candidate in (name, name.removeprefix("variant/")):  # the variant's tensors follow the same rules
        entry = (
            entry or table.get(candidate) or next((v for k, v in table.items() if fnmatch.fnmatch(candidate, k)), None)
        )
    if entry is None or "atol" not in entry:
        return "exact"
    return {"atol": entry["atol"], "rtol": entry["rtol"]}


def check(manifest, ref, name, actual):
    reference = ref[name]
    assert_matches(name, actual[: reference.shape[0]], reference, tolerance(manifest, name), MAX_ERRORS)


def schedule(manifest):
    return [tuple(s[1:]) for s in manifest["configs"]["scale_schedule"]]


def padded_reference_text(ref):
    """kv_compact + lens -> padded (B, S, C) features and mask."""
    lens = ref["text/lens"].tolist()
    kv = ref["text/kv_compact"]
    embeds = torch.zeros(len(lens), max(lens), kv.shape[1])
    mask = torch.zeros(len(lens), max(lens), dtype=torch.bool)
    for i, (start, n) in enumerate(zip(ref["text/cu_seqlens_k"].tolist(), lens)):
        embeds[i, :n], mask[i, :n] = kv[start : start + n], True
    return embeds, mask


def test_config_inferred_from_checkpoint(pipes, fixture):
    _, manifest, _ = fixture
    cfg = manifest["configs"]
    for model in MODELS:
        kwargs = cfg["transformer" if model == "transformer" else "variant_transformer"]["kwargs"]
        tc = pipes[model].transformer.config
        assert (tc.depth, tc.embed_dim, tc.num_heads, tc.block_chunks) == (
            kwargs["depth"],
            kwargs["embed_dim"],
            kwargs["num_heads"],
            kwargs["block_chunks"],
        )
        assert (tc.shared_adaln, tc.text_dim, tc.text_max_length) == (
            kwargs["shared_aln"],
            kwargs["text_channels"],
            kwargs["text_maxlen"],
        )
        assert tc.bits_per_token == cfg["bits_per_token"]
    vae = pipes["transformer"].vae
    assert vae.config.codebook_dim == cfg["vae"]["codebook_dim"]
    assert vae.config.spatial_patchify == bool(cfg["apply_spatial_patchify"])
    assert (
        list(vae.config.encoder_ch_mult) == cfg["vae"]["encoder_ch_mult"]
        and vae.config.base_channels == cfg["vae"]["base_ch"]
    )
    assert vae.pixels_per_token * schedule(manifest)[-1][0] == cfg["image_hw"][0]


def test_text_features(pipes, fixture):
    _, manifest, ref = fixture
    pipe = pipes["transformer"]
    tokens = pipe.tokenizer(
        manifest["configs"]["prompts"], max_length=512, padding="max_length", truncation=True, return_tensors="pt"
    )
    width = ref["text/input_ids"].shape[1]
    check(manifest, ref, "text/input_ids", tokens["input_ids"][:, :width])
    check(manifest, ref, "text/attention_mask", tokens["attention_mask"][:, :width])
    embeds, mask, _, _ = pipe.encode_prompt(manifest["configs"]["prompts"], do_classifier_free_guidance=False)
    check(manifest, ref, "text/lens", mask.sum(dim=1))
    check(manifest, ref, "text/kv_compact", embeds[mask])


def _bits_with_near_ties(manifest, ref, name, bits, residual, scale_index):
    """Bit labels: exact, except where the manifest's rule allows a flip (tiny pre-sign residual)."""
    reference = ref[name]
    differ = bits.to(reference.dtype) != reference
    if differ.any():
        floor = manifest["notes"]["vae_min_abs_quantizer_input_per_scale"][scale_index]
        tiny = residual.abs() < min(1e-5, floor)
        assert bool(tiny[differ].all()), (
            f"{name}: {int(differ.sum())} bits differ where the residual is not a near-tie"
        )
    MAX_ERRORS[name] = float(differ.sum())


def test_vae(pipes, fixture):
    _, manifest, ref = fixture
    vae, sched = pipes["transformer"].vae, schedule(manifest)
    with torch.no_grad():
        out = vae.encode(ref["vae/input_image"], sched)
        check(manifest, ref, "vae/encoder_features", out.features)
        check(manifest, ref, "vae/quantized_z", out.quantized)
        for k in range(len(sched)):
            residual = out.quantizer_inputs[k].unsqueeze(2)
            check(manifest, ref, f"vae/quantizer_input/scale_{k:02d}", residual)
            _bits_with_near_ties(
                manifest,
                ref,
                f"vae/bit_labels/scale_{k:02d}",
                out.bit_labels[k].unsqueeze(1),
                residual.squeeze(2).permute(0, 2, 3, 1).unsqueeze(1),
                k,
            )
            if k >= 1:
                check(manifest, ref, f"vae/var_input_area/scale_{k:02d}", out.area_next_inputs[k - 1].unsqueeze(2))
        check(manifest, ref, "vae/reconstruction", vae.decode(out.quantized).sample)
        labels = [ref[f"vae/bit_labels/scale_{k:02d}"][:, 0] for k in range(len(sched))]
        check(manifest, ref, "vae/summed_codes_from_bits", vae.codes_from_bit_labels(labels).unsqueeze(2))
        check(manifest, ref, "vae/reconstruction_from_bits", vae.decode_bit_labels(labels))


def test_bitwise_self_correction(pipes, fixture):
    _, manifest, ref = fixture
    vae, sched = pipes["transformer"].vae, schedule(manifest)
    with torch.no_grad():
        features = vae.encode_features(ref["vae/input_image"])
        inputs, labels = vae.teacher_forcing_inputs(features, sched)
        check(manifest, ref, "bsc/x_BLC_wo_prefix", inputs)
        check(manifest, ref, "bsc/gt_bits", labels)
        call = manifest["tensors"]["bsc_noisy/x_BLC_wo_prefix"]["call"]
        seed = int(re.search(r"np\.random\.seed\((\d+)\)", call).group(1))
        layers = int(re.search(r"noise_apply_layers=(\d+)", call).group(1))
        strength = float(re.search(r"noise_apply_strength=([\d.]+)", call).group(1))
        np.random.seed(seed)
        torch.manual_seed(int(re.search(r"torch\.manual_seed\((\d+)\)", call).group(1)))
        # the original corrupts the whole batch (one draw per scale); the fixture keeps row 0
        inputs, labels = vae.teacher_forcing_inputs(features, sched, layers, strength)
        check(manifest, ref, "bsc_noisy/x_BLC_wo_prefix", inputs)
        check(manifest, ref, "bsc_noisy/gt_bits", labels)


@pytest.mark.parametrize("model", MODELS)
def test_teacher_forcing(pipes, fixture, model):
    _, manifest, ref = fixture
    transformer = pipes[model].transformer
    embeds, mask = padded_reference_text(ref)
    prefix = "" if model == "transformer" else "variant/"
    with torch.no_grad():
        logits = transformer(
            ref["bsc/x_BLC_wo_prefix"],
            embeds,
            mask,
            schedule(manifest),
            drop_text=torch.zeros(len(mask), dtype=torch.bool),
        ).logits
        check(manifest, ref, f"{prefix}tf/logits", logits)
        if f"{prefix}tf/logits_uncond" in ref:
            dropped = transformer(
                ref["bsc/x_BLC_wo_prefix"],
                embeds,
                mask,
                schedule(manifest),
                drop_text=torch.ones(len(mask), dtype=torch.bool),
            ).logits
            check(manifest, ref, f"{prefix}tf/logits_uncond", dropped)


def _generation_cases():
    try:
        manifest = load_manifest(fixture_dir("infinity"))
    except BaseException:  # collection must not fail here; the fixtures' own tests report it
        return ["fixtures-missing"]
    return sorted(name[: -len("/bits")] for name in manifest["tensors"] if re.match(r"(variant/)?gen/.+/bits$", name))


def parse_call(call: str) -> dict:
    """The generation arguments recorded in a tensor's ``call``."""

    def value(key):
        return ast.literal_eval(re.search(rf"{key}=(\[[^\]]*\]|[^,)]+)", call).group(1))

    negative = re.search(r"negative_label_B_or_BLT=encode_prompt\('([^']*)'\)", call)
    return dict(
        prompt=re.search(r"label_B_or_BLT=encode_prompt\('([^']*)'\)", call).group(1),
        negative_prompt=negative.group(1) if negative else None,
        seed=value("g_seed"),
        batch=value("B"),
        cfg=value("cfg_list"),
        tau=value("tau_list"),
        top_k=value("top_k"),
        top_p=value("top_p"),
    )


@pytest.mark.parametrize("case", _generation_cases())
def test_generation(pipes, fixture, case):
    _, manifest, ref = fixture
    if case == "fixtures-missing":
        fixture_dir("infinity")
    pipe = pipes["variant" if case.startswith("variant/") else "transformer"]
    args = parse_call(manifest["tensors"][f"{case}/bits"]["call"])
    height, width = manifest["configs"]["image_hw"]
    seen = {"bits": [], "logits": [], "next_scale_input": []}

    def record(pipeline, scale_index, size, tensors):
        for key in seen:
            if tensors[key] is not None:
                seen[key].append(tensors[key].clone())
        return {}

    def run(output_type, callback=None):
        return pipe(
            args["prompt"],
            negative_prompt=args["negative_prompt"],
            height=height,
            width=width,
            guidance_scale=args["cfg"],
            tau=args["tau"],
            top_k=args["top_k"],
            top_p=args["top_p"],
            num_images_per_prompt=args["batch"],
            generator=torch.Generator().manual_seed(args["seed"]),
            output_type=output_type,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=list(seen) if callback else None,
        ).images

    with torch.no_grad():
        images = run("pt", record)
        latent = run("latent")
    bits = torch.cat(seen["bits"], dim=1)
    reference_bits = ref[f"{case}/bits"]
    if not torch.equal(bits.to(reference_bits.dtype), reference_bits):
        _assert_near_tie(manifest, case, bits, reference_bits, schedule(manifest))
    MAX_ERRORS[f"{case}/bits"] = 0.0
    if f"{case}/raw_logits" in ref:
        check(manifest, ref, f"{case}/raw_logits", torch.cat(seen["logits"], dim=1))
    if f"{case}/next_scale_inputs" in ref:
        check(manifest, ref, f"{case}/next_scale_inputs", torch.cat(seen["next_scale_input"], dim=1))
    check(
        manifest, ref, f"{case}/summed_codes", latent.unsqueeze(2) if ref[f"{case}/summed_codes"].ndim == 5 else latent
    )
    image_float = images * 2 - 1
    check(manifest, ref, f"{case}/image_float", image_float)
    # the original returns ((x + 1) / 2 * 255) truncated to uint8, HWC, BGR
    bgr = ((image_float + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1).flip(-1)
    diff = (bgr.int() - ref[f"{case}/image_uint8_bgr"].int()).abs().max().item()
    MAX_ERRORS[f"{case}/image_uint8_bgr"] = float(diff)
    assert diff <= 1, f"{case}/image_uint8_bgr differs by {diff}"


def _assert_near_tie(manifest, case, bits, reference, sched):
    """The manifest's rule: a differing argmax is acceptable only at a near-tie (a margin below the logit
    tolerance) at the first scale where the bits diverge; everything after that legitimately differs."""
    counts = [h * w for h, w in sched]
    ends = np.cumsum(counts)
    first = int((bits.to(reference.dtype) != reference).any(-1).any(0).nonzero()[0])
    scale = int(np.searchsorted(ends, first, side="right"))
    margin = manifest["notes"]["generation_margins"][case]["min_abs_logit_margin_per_scale"][scale]
    atol = manifest["recommended_tolerances_float32_cpu"]["tf/logits*"]["atol"]
    assert margin < 10 * atol, f"{case}: bits differ at scale {scale} where the smallest reference margin is {margin}"
    pytest.skip(
        f"{case}: bits diverge at scale {scale} at a near-tie (margin {margin:.2g}); later tensors not comparable"
    )
