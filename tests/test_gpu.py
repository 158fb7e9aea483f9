"""GPU-only checks of the fast path (skipped without CUDA; run them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir, load_manifest
from diffusers_var.conversion import convert_var_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY_CASES = ("greedy_cfg1", "greedy_cfg4", "uncond")


def _tokens(pipe, manifest, ref, case):
    spec = manifest["generation_cases"][case]
    kw = spec["kwargs"]
    labels = ref["gen_labels"].tolist() if kw["label_B"] == "gen_labels" else [kw["label_B"]] * kw["B"]
    seen = []
    pipe(class_labels=labels, guidance_scale=kw["cfg"], top_k=kw["top_k"], top_p=kw["top_p"], output_type="latent",
         generator=torch.Generator().manual_seed(kw["g_seed"]), callback_on_step_end_tensor_inputs=["indices"],
         callback_on_step_end=lambda p, si, pn, t: seen.append(t["indices"].cpu()) or {})
    return seen


@pytest.fixture(scope="module")
def fixture():
    path = fixture_dir("var")
    manifest = load_manifest(path)
    return path, manifest, load_file(path / "reference.safetensors")


def _pipe(fixture):
    path, manifest, _ = fixture
    files = manifest["files"]
    return convert_var_checkpoint(path / files["vae_pth"]["path"], path / files["var_pth"]["path"]).to("cuda")


def test_cuda_graphs_in_float32_reproduce_the_reference(fixture):
    _, manifest, ref = fixture
    pipe = _pipe(fixture).enable_fast_inference(dtype=torch.float32)
    for case in GREEDY_CASES + ("stoch",):
        prefix = manifest["generation_cases"][case]["prefix"]
        for si, idx in enumerate(_tokens(pipe, manifest, ref, case)):
            assert torch.equal(idx, ref[f"{prefix}idx_s{si}"]), (case, si)


def test_bf16_fast_path_agrees_with_float32_tokens(fixture):
    _, manifest, ref = fixture
    pipe = _pipe(fixture)
    eager = {case: torch.cat(_tokens(pipe, manifest, ref, case), dim=1) for case in GREEDY_CASES}
    pipe.enable_fast_inference()
    fast = {case: torch.cat(_tokens(pipe, manifest, ref, case), dim=1) for case in GREEDY_CASES}
    agreement = torch.cat([(fast[c] == eager[c]).flatten() for c in GREEDY_CASES]).float().mean().item()
    print(f"bf16 + CUDA graphs vs float32 eager greedy-token agreement: {agreement:.4f}")
    assert agreement >= 0.99
