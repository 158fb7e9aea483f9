"""Numerical parity of CoDe (VARCoDePipeline) with the original czg1225/CoDe code.

Everything is driven by ``fixtures/code/manifest.json`` (models, scale schedule, every case with its exact call and
tolerances), so another fixture set made the same way runs through the same tests. The pipeline under test is the
output of ``conversion/convert_code.py``, loaded back with ``VARCoDePipeline.from_pretrained``; the plain-VAR runs of
the fixture go through ``VARPipeline`` on the same converted models.
"""

from __future__ import annotations

import re
import runpy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, assert_matches, fixture_dir, load_manifest
from diffusers_var import VARCoDePipeline, VARPipeline
from diffusers_var.pipelines.sampling import draw_class_labels

MAX_ERRORS: dict[str, float] = {}
CONVERTER = REPO_ROOT / "conversion" / "convert_code.py"
RECORDED = ["latents", "tokens", "guided_logits", "next_scale_input", "prefill_logits", "draft_resamples"]


@pytest.fixture(scope="module")
def code_fixture():
    path = fixture_dir("code")
    return path, load_manifest(path), load_file(path / "reference.safetensors")


def convert(path, manifest, out, refiner_key="refiner_pth", draft_steps=None) -> VARCoDePipeline:
    """``conversion/convert_code.py`` (its ``main``, as the command line runs it), then ``from_pretrained``."""
    files = manifest["files"]
    argv = [
        "--vae",
        str(path / files["vae_pth"]["path"]),
        "--drafter",
        str(path / files["drafter_pth"]["path"]),
        "--refiner",
        str(path / files[refiner_key]["path"]),
        "--output",
        str(out),
        "--draft-steps",
        str(draft_steps or manifest["config"]["draft_steps"]),
    ]
    assert runpy.run_path(str(CONVERTER))["main"](argv) == 0
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pth", ".pt", ".pkl"}]
    pipe = VARCoDePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(code_fixture, tmp_path_factory):
    path, manifest, _ = code_fixture
    return convert(path, manifest, tmp_path_factory.mktemp("converted") / "code")


@pytest.fixture(scope="module")
def self_pipe(code_fixture, tmp_path_factory):
    """The drafter checkpoint in both roles (infer_CoDe.py --training_free with equal depths)."""
    path, manifest, _ = code_fixture
    return convert(path, manifest, tmp_path_factory.mktemp("converted") / "selfcollab", refiner_key="drafter_pth")


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    if MAX_ERRORS:
        print("\nCoDe parity, max abs error per tensor:")
        for name, err in sorted(MAX_ERRORS.items()):
            print(f"  {name:40s} {err:.3g}")
        kinds = {}
        for name, err in MAX_ERRORS.items():
            kind = re.sub(r"^c\d+_j\d+_", "", name.split("_", 1)[-1])  # without the case (and recipe sample) prefix
            kind = re.sub(r"_s\d+$", "", kind)
            kinds[kind] = max(kinds.get(kind, 0.0), err)
        print(
            "CoDe parity, max abs error per tensor kind: "
            + ", ".join(f"{k} {v:.3g}" for k, v in sorted(kinds.items()))
        )


def check(manifest, ref, name, actual):
    tolerance = manifest["tensors"][name]["tolerance"]
    if isinstance(tolerance, str):  # "exact", "exact (diagnostic)"
        tolerance = "exact"
    assert_matches(name, actual, ref[name], tolerance, MAX_ERRORS)


def _cases(kinds, with_plain_runs: bool = False):
    try:
        path = fixture_dir("code")
    except BaseException:  # collection must not fail here; the fixtures' own tests report it
        return ["fixtures-missing"]
    return [
        name
        for name, spec in load_manifest(path)["generation_cases"].items()
        if spec["kind"] in kinds and (spec.get("plain") or not with_plain_runs)
    ]


def _labels(kwargs, ref):
    """``(class_labels, num_images_per_prompt)`` of a case's ``label_B``."""
    label_arg, B = kwargs["label_B"], kwargs["B"]
    if label_arg == "gen_labels":
        return ref["gen_labels"].tolist(), 1
    if label_arg is None:
        return None, B
    return [label_arg], B  # an int: every image gets it (-1 = null class)


def generate(pipe, kwargs, ref, generator=None, record=None, **overrides):
    class_labels, per_label = _labels(kwargs, ref)
    seen = {} if record is None else record

    def rec(p, si, hw, tensors):
        seen[si] = {k: v.clone() if torch.is_tensor(v) else v for k, v in tensors.items()}
        return {}

    call = dict(
        class_labels=class_labels,
        num_images_per_prompt=per_label,
        guidance_scale=kwargs["cfg"],
        top_k=kwargs["top_k"],
        top_p=kwargs["top_p"],
        temperature=kwargs["temp"],
        more_smooth=kwargs["more_smooth"],
        draft_steps=kwargs["exit_num"],
        output_type="pt",
        callback_on_step_end=rec,
        callback_on_step_end_tensor_inputs=RECORDED,
    )
    call.update(overrides)
    generator = generator or torch.Generator().manual_seed(kwargs["g_seed"])
    return pipe(generator=generator, **call).images, seen


def expected_end_state(kwargs, manifest, batch) -> torch.Tensor:
    """The generator state after a CoDe call, from the spec's list of draws (CODE.md 3.5): the refiner's stage restarts
    from the seed: [labels] -> N re-sample draws (B l_a, V) -> per fine scale a draw (B l_k, V) [+ a Gumbel draw]."""
    g = torch.Generator().manual_seed(kwargs["g_seed"])
    num_classes, V = manifest["config"]["num_classes"], manifest["config"]["vae"]["vocab_size"]
    if kwargs["label_B"] is None:
        torch.multinomial(torch.full((1, num_classes), 1.0 / num_classes), batch, replacement=True, generator=g)
    counts = [pn * pn for pn in manifest["config"]["patch_nums"]]
    N = kwargs["exit_num"]
    for si, count in enumerate(counts):
        torch.empty(batch * count, V).exponential_(generator=g)
        if si >= N and kwargs["more_smooth"]:
            torch.empty(batch, count, V).exponential_(generator=g)
    return g.get_state()


def check_code_run(manifest, ref, prefix, N, images, seen, latent=None):
    S = len(manifest["config"]["patch_nums"])
    assert sorted(seen) == list(range(S))  # the callback ran at every scale of both stages
    for k in range(S):
        check(manifest, ref, f"{prefix}logits_s{k}", seen[k]["guided_logits"])
        check(manifest, ref, f"{prefix}idx_s{k}", seen[k]["tokens"])
        if f"{prefix}fhat_s{k}" in ref:
            check(manifest, ref, f"{prefix}fhat_s{k}", seen[k]["latents"])
        assert (seen[k]["prefill_logits"] is None) == (k != N) and (seen[k]["draft_resamples"] is None) == (k != N)
    resamples = seen[N]["draft_resamples"]
    assert len(resamples) == N
    for a, tokens in enumerate(resamples):  # the refiner's discarded re-samples of the drafted scales
        check(manifest, ref, f"{prefix}dummy_idx_s{a}", tokens)
    check(manifest, ref, f"{prefix}prefill_logits", seen[N]["prefill_logits"])
    check(manifest, ref, f"{prefix}draft_fhat", seen[N - 1]["latents"])
    check(manifest, ref, f"{prefix}token_hub", torch.cat([seen[k]["next_scale_input"] for k in range(N)], dim=1))
    check(manifest, ref, f"{prefix}fhat", seen[S - 1]["latents"])
    if latent is not None:
        check(manifest, ref, f"{prefix}fhat", latent)
    check(manifest, ref, f"{prefix}img", images)


# -- conversion -------------------------------------------------------------------------------------------------
def test_config_inferred_from_checkpoints(pipe, code_fixture):
    _, manifest, _ = code_fixture
    config = manifest["config"]
    assert pipe.config.draft_steps == config["draft_steps"]
    for model, role in ((pipe.transformer, "drafter"), (pipe.refiner, "refiner")):
        cfg, expected = model.config, config[role]
        assert list(cfg.patch_nums) == list(config["patch_nums"])
        assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (
            expected["depth"],
            expected["embed_dim"],
            expected["num_heads"],
        )
        assert (cfg.num_classes, cfg.shared_adaln) == (expected["num_classes"], expected["shared_aln"])
    assert pipe.vqvae.config.vocab_size == config["vae"]["vocab_size"]


def test_converter_errors_name_the_argument(code_fixture, tmp_path, capsys):
    path, manifest, _ = code_fixture
    files = manifest["files"]
    base = ["--vae", str(path / files["vae_pth"]["path"]), "--drafter", str(path / files["drafter_pth"]["path"])]
    main = runpy.run_path(str(CONVERTER))["main"]
    S = len(manifest["config"]["patch_nums"])
    cases = [
        (["--refiner", str(path / files["refiner_pth"]["path"]), "--draft-steps", str(S)], "`--draft-steps`"),
        (["--refiner", str(path / files["refiner_pth"]["path"]), "--draft-steps", "0"], "`--draft-steps`"),
        (["--refiner", str(path / files["vae_pth"]["path"])], "`--refiner`"),  # a VQ-VAE, not a VAR
        (["--refiner", str(tmp_path / "missing.pth")], "`--refiner`"),
    ]
    for extra, named in cases:
        assert main(base + extra + ["--output", str(tmp_path / "out")]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_training_forward_on_a_prefix(pipe, code_fixture):
    """CoDe's ``VAR.forward(..., mask_l=P)``: the teacher-forcing forward over the first P positions."""
    _, manifest, ref = code_fixture
    for case, spec in manifest["generation_cases"].items():
        if spec["kind"] != "fwd":
            continue
        with torch.no_grad():
            for model, name in ((pipe.transformer, "fwd_draft_logits"), (pipe.refiner, "fwd_refine_logits")):
                check(manifest, ref, name, model(ref["fwd_labels"], ref["fwd_x"], drop_labels=False).logits)


# -- generation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases({"code"}))
def test_generation(pipe, code_fixture, case):
    _, manifest, ref = code_fixture
    if case == "fixtures-missing":
        fixture_dir("code")
    spec = manifest["generation_cases"][case]
    kwargs, prefix, N = spec["kwargs"], spec["prefix"], spec["kwargs"]["exit_num"]
    generator, latent_generator = (torch.Generator().manual_seed(kwargs["g_seed"]) for _ in range(2))
    with torch.no_grad():
        images, seen = generate(pipe, kwargs, ref, generator)
        # no callback asks for the discarded re-samples: they are only drawn (the same numbers, no tokens)
        no_callback = dict(callback_on_step_end=None, callback_on_step_end_tensor_inputs=None)
        latent, _ = generate(pipe, kwargs, ref, latent_generator, output_type="latent", **no_callback)
    check_code_run(manifest, ref, prefix, N, images, seen, latent)
    assert torch.equal(latent_generator.get_state(), generator.get_state())
    batch = images.shape[0]
    if kwargs["label_B"] is None:  # drawn from the generator, by both stages alike
        labels = draw_class_labels(
            manifest["config"]["num_classes"], batch, torch.Generator().manual_seed(kwargs["g_seed"]), "cpu"
        )
        check(manifest, ref, f"{prefix}labels", labels)
    # the caller's generator ends where the refiner stage leaves it ...
    assert torch.equal(generator.get_state(), expected_end_state(kwargs, manifest, batch))
    if not kwargs["more_smooth"]:  # ... which, without more_smooth, is where a plain VAR call leaves it
        plain = torch.Generator().manual_seed(kwargs["g_seed"])
        class_labels, per_label = _labels(kwargs, ref)
        VARPipeline(transformer=pipe.transformer, vqvae=pipe.vqvae)(
            class_labels=class_labels,
            num_images_per_prompt=per_label,
            guidance_scale=kwargs["cfg"],
            top_k=kwargs["top_k"],
            top_p=kwargs["top_p"],
            generator=plain,
            output_type="latent",
        )
        assert torch.equal(generator.get_state(), plain.get_state())


@pytest.mark.parametrize("case", _cases({"code", "selfcollab"}, with_plain_runs=True))
def test_plain_var_runs_of_both_models(pipe, code_fixture, case):
    """The fixture's plain ``autoregressive_infer_cfg`` runs of the drafter and of the refiner (scalar top_k, no
    temperature) through VARPipeline on the converted models."""
    _, manifest, ref = code_fixture
    if case == "fixtures-missing":
        fixture_dir("code")
    spec = manifest["generation_cases"][case]
    kwargs = spec["kwargs"]
    plain_runs = spec["plain"]
    models = {"plaindraft": pipe.transformer, "plainrefine": pipe.refiner}
    S = len(manifest["config"]["patch_nums"])
    for run_name, run in plain_runs.items():
        call = run["call"]  # e.g. "img = var_draft.autoregressive_infer_cfg(B=2, ..., cfg=4.0, top_k=1, ...)"
        values = dict(re.findall(r"(\w+)=([\w.+-]+)", call.split("(", 1)[1]))
        plain_kwargs = {
            **kwargs,
            "cfg": float(values["cfg"]),
            "top_p": float(values["top_p"]),
            "g_seed": int(values["g_seed"]),
            "more_smooth": values["more_smooth"] == "True",
        }
        seen = plain_var_run(
            models[run_name], pipe.vqvae, plain_kwargs, ref, top_k=int(values["top_k"]), temperature=1.0
        )
        images = seen["images"]
        name = f"{spec['prefix']}{run_name}_"
        for k in range(S):
            check(manifest, ref, f"{name}logits_s{k}", seen[k]["guided_logits"])
            check(manifest, ref, f"{name}idx_s{k}", seen[k]["tokens"])
        check(manifest, ref, f"{name}fhat", seen[S - 1]["latents"])
        check(manifest, ref, f"{name}img", images)


@pytest.mark.parametrize("case", _cases({"selfcollab"}))
def test_one_checkpoint_in_both_roles(self_pipe, code_fixture, case):
    """The drafter's checkpoint as drafter and refiner: CoDe then reproduces the plain drafter run (same seed)."""
    _, manifest, ref = code_fixture
    if case == "fixtures-missing":
        fixture_dir("code")
    spec = manifest["generation_cases"][case]
    kwargs, prefix, N = spec["kwargs"], spec["prefix"], spec["kwargs"]["exit_num"]
    with torch.no_grad():
        images, seen = generate(self_pipe, kwargs, ref)
    check_code_run(manifest, ref, prefix, N, images, seen)
    if all(spec.get("vs_plaindraft", {}).get("idx_equal", {}).values()):  # the fixture found them equal: so must we
        plain = plain_var_run(self_pipe.transformer, self_pipe.vqvae, kwargs, ref)
        for k in range(len(manifest["config"]["patch_nums"])):
            assert torch.equal(seen[k]["tokens"], plain[k]["tokens"])


def plain_var_run(transformer, vqvae, kwargs, ref, **overrides) -> dict:
    """VARPipeline on one of the models with a case's settings (its per-scale lists); the callback's tensors per
    scale."""
    var = VARPipeline(transformer=transformer, vqvae=vqvae)
    var.set_progress_bar_config(disable=True)
    seen = {}
    class_labels, per_label = _labels(kwargs, ref)
    call = dict(
        class_labels=class_labels,
        num_images_per_prompt=per_label,
        guidance_scale=kwargs["cfg"],
        top_k=kwargs["top_k"],
        top_p=kwargs["top_p"],
        temperature=kwargs["temp"],
        more_smooth=kwargs["more_smooth"],
        output_type="pt",
        generator=torch.Generator().manual_seed(kwargs["g_seed"]),
        callback_on_step_end_tensor_inputs=["guided_logits", "tokens", "latents"],
        callback_on_step_end=lambda p, si, hw, t: seen.update({si: {k: v.clone() for k, v in t.items()}}) or {},
    )
    call.update(overrides)
    with torch.no_grad():
        seen["images"] = var(**call).images
    return seen


@pytest.mark.parametrize("case", _cases({"draftall"}))
def test_draft_steps_equal_to_the_scale_count(pipe, code_fixture, case):
    """``draft_steps = S`` crashes the original after a complete drafter run; ours refuses it up front. What the
    original computed before crashing is a plain VAR run, which VARPipeline reproduces with the per-scale lists."""
    _, manifest, ref = code_fixture
    if case == "fixtures-missing":
        fixture_dir("code")
    spec = manifest["generation_cases"][case]
    kwargs, prefix = spec["kwargs"], spec["prefix"]
    S = len(manifest["config"]["patch_nums"])
    assert kwargs["exit_num"] == S
    with pytest.raises(ValueError, match="`draft_steps`"):
        generate(pipe, kwargs, ref)
    seen = plain_var_run(pipe.transformer, pipe.vqvae, kwargs, ref)
    for k in range(S):
        check(manifest, ref, f"{prefix}logits_s{k}", seen[k]["guided_logits"])
        check(manifest, ref, f"{prefix}idx_s{k}", seen[k]["tokens"])
    check(manifest, ref, f"{prefix}fhat", seen[S - 1]["latents"])


@pytest.mark.parametrize("case", _cases({"recipe"}))
def test_sample_code_recipe(pipe, code_fixture, case):
    """The loop body of sample_CoDe.py (one image per call, label i, g_seed j) and its PNG bytes (trunc(255 x))."""
    _, manifest, ref = code_fixture
    if case == "fixtures-missing":
        fixture_dir("code")
    spec = manifest["generation_cases"][case]
    S = len(manifest["config"]["patch_nums"])
    body = spec.get("executed_body", "")
    cfg = float(re.search(r"cfg=([\d.]+)", body).group(1)) if "cfg=" in body else 1.5
    top_p = float(re.search(r"top_p=([\d.]+)", body).group(1)) if "top_p=" in body else 0.96
    # the original indexes its lists by scale: entries past the last scale are never read
    top_k, temperature = spec["bindings"]["newk"][:S], spec["bindings"]["temp"][:S]
    for label in spec["classes"]:
        for seed in spec["seeds_j"]:
            name = f"{spec['prefix']}c{label}_j{seed}_"
            seen = {}
            with torch.no_grad():
                images = pipe(
                    class_labels=[label],
                    guidance_scale=cfg,
                    top_k=top_k,
                    top_p=top_p,
                    temperature=temperature,
                    more_smooth=False,
                    draft_steps=spec["draft_steps"],
                    output_type="pt",
                    generator=torch.Generator().manual_seed(seed),
                    callback_on_step_end_tensor_inputs=["tokens", "latents"],
                    callback_on_step_end=lambda p, si, hw, t: (
                        seen.update({si: {k: v.clone() for k, v in t.items()}}) or {}
                    ),
                ).images
            for k in range(S):
                check(manifest, ref, f"{name}idx_s{k}", seen[k]["tokens"])
            check(manifest, ref, f"{name}fhat", seen[S - 1]["latents"])
            check(manifest, ref, f"{name}img", images)
            png = torch.from_numpy((images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))  # trunc, as the script
            tolerance, reference = manifest["tensors"][f"{name}png"]["tolerance"], ref[f"{name}png"]
            difference = (png.int() - reference.int()).abs()
            MAX_ERRORS[f"{name}png"] = difference.max().item()
            assert difference.max() <= tolerance["max_abs_diff"]
            assert (difference > 0).float().mean() <= tolerance["max_fraction_differing"]


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_parameter(pipe, code_fixture):
    _, manifest, ref = code_fixture
    S = len(manifest["config"]["patch_nums"])
    call = dict(
        class_labels=[1],
        top_k=[10] * S,
        temperature=[1.0] * S,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    for kwargs, parameter in [
        ({"draft_steps": 0}, "draft_steps"),
        ({"draft_steps": S}, "draft_steps"),
        ({"draft_steps": 1.5}, "draft_steps"),
        ({"draft_steps": True}, "draft_steps"),
        ({"top_k": [10] * (S - 1)}, "top_k"),
        ({"top_k": [10] * (S + 6)}, "top_k"),
        ({"top_k": [10.0] * S}, "top_k"),
        ({"temperature": [1.0] * (S + 1)}, "temperature"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": [1.0] * (S - 1) + [float("nan")]}, "temperature"),
    ]:
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            pipe(**{**call, **kwargs})
    var = VARPipeline(transformer=pipe.transformer, vqvae=pipe.vqvae)
    for kwargs, parameter in [({"top_k": [10] * (S - 1)}, "top_k"), ({"temperature": [1.0, 2.0]}, "temperature")]:
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            var(**{**call, **kwargs})
