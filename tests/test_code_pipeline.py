"""VARCoDePipeline beyond the parity fixtures: building it from two VAR pipelines (and refusing mismatched ones),
save / load with ``draft_steps``, the generator contract, the prefill against the scale-by-scale path, and the fast
path's CUDA-graph wiring (with the CPU stand-in of test_fast_inference.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from diffusers_var import (
    MultiScaleVQModel,
    VARCoDePipeline,
    VARImg2ImgPipeline,
    VARPipeline,
    VARTransformer2DModel,
)
from diffusers_var.pipelines import fast_inference, pipeline_var
from test_fast_inference import EagerGraphStandIn
from tiny_components import VAR_PATCH_NUMS, code_components, var_components


def code_pipe(**kwargs) -> VARCoDePipeline:
    pipe = VARCoDePipeline(**{**code_components(seed=0), **kwargs})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, seed=0, generator=None, **kwargs):
    kwargs = {"class_labels": [1, 4, 9], "top_k": 10, "top_p": 0.9, "output_type": "latent", **kwargs}
    return pipe(generator=generator or torch.Generator().manual_seed(seed), **kwargs).images


def var_pipe(components) -> VARPipeline:
    pipe = VARPipeline(transformer=components["transformer"], vqvae=components["vqvae"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- building ----------------------------------------------------------------------------------------------------
def test_from_var_pipelines_shares_the_weights_and_checks_the_tokenizer():
    components = code_components(seed=0)
    drafter = var_pipe(components)
    refiner = VARPipeline(transformer=components["refiner"], vqvae=components["vqvae"])
    pipe = VARCoDePipeline.from_var_pipelines(drafter, refiner, draft_steps=3)
    assert (
        pipe.transformer is drafter.transformer and pipe.refiner is refiner.transformer and pipe.vqvae is drafter.vqvae
    )
    assert pipe.config.draft_steps == 3
    # a tokenizer with equal weights (another copy) is the same tokenizer
    copy = MultiScaleVQModel.from_config(components["vqvae"].config)
    copy.load_state_dict(components["vqvae"].state_dict())
    VARCoDePipeline.from_var_pipelines(drafter, VARPipeline(transformer=components["refiner"], vqvae=copy))
    # the same tokenizer in bf16 (loaded so, or cast by enable_fast_inference), on either side
    coarse = MultiScaleVQModel.from_config(components["vqvae"].config)
    coarse.load_state_dict(components["vqvae"].state_dict())
    coarse.to(torch.bfloat16)
    VARCoDePipeline.from_var_pipelines(drafter, VARPipeline(transformer=components["refiner"], vqvae=coarse))
    VARCoDePipeline.from_var_pipelines(VARPipeline(transformer=components["transformer"], vqvae=coarse), refiner)
    with torch.no_grad():
        coarse.quantize.embedding.weight[0, 0] += 0.25  # more than bf16's rounding: another codebook
    with pytest.raises(ValueError, match="`refiner`.*tokenizer"):
        VARCoDePipeline.from_var_pipelines(drafter, VARPipeline(transformer=components["refiner"], vqvae=coarse))
    with torch.no_grad():
        copy.quantize.embedding.weight[0, 0] += 1  # another codebook: refused
    with pytest.raises(ValueError, match="`refiner`.*tokenizer"):
        VARCoDePipeline.from_var_pipelines(drafter, VARPipeline(transformer=components["refiner"], vqvae=copy))
    other = var_components(seed=0, num_classes=12)  # another class count
    with pytest.raises(ValueError, match="`refiner`.*num_classes"):
        VARCoDePipeline.from_var_pipelines(
            drafter, VARPipeline(transformer=other["transformer"], vqvae=components["vqvae"])
        )
    with pytest.raises(ValueError, match="`refiner`"):
        VARCoDePipeline.from_var_pipelines(drafter, pipe)
    with pytest.raises(ValueError, match="`draft_steps`"):
        VARCoDePipeline.from_var_pipelines(drafter, refiner, draft_steps=4)


def test_constructor_refuses_a_refiner_of_another_schedule_or_codebook():
    components = code_components(seed=0)
    for kwargs, name in (
        (dict(patch_nums=(1, 2, 4)), "patch_nums"),
        (dict(vocab_size=64), "vocab_size"),
        (dict(latent_channels=4), "latent_channels"),
    ):
        config = {
            **dict(
                num_classes=10,
                depth=1,
                embed_dim=32,
                num_heads=1,
                vocab_size=32,
                latent_channels=8,
                patch_nums=VAR_PATCH_NUMS,
            ),
            **kwargs,
        }
        with pytest.raises(ValueError, match=f"`refiner` has {name}"):
            VARCoDePipeline(**{**components, "refiner": VARTransformer2DModel(**config)})
    assert VARCoDePipeline(**{**components, "draft_steps": None}).config.draft_steps == 2  # num_scales - 2
    stored = VARCoDePipeline(**{**components, "draft_steps": np.int64(1)}).config.draft_steps  # numpy's: stored as int
    assert stored == 1 and type(stored) is int
    # a refiner that is no VAR transformer: named before its config is read (a KeyError / AttributeError before)
    for refiner in ("a-folder", torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="`refiner` must be a VARTransformer2DModel"):
            VARCoDePipeline(**{**components, "refiner": refiner})
    # without a drafter the refiner's schedule bounds draft_steps (99 was stored, and a call failed with IndexError)
    with pytest.raises(ValueError, match=r"`draft_steps` must be an integer in \[1, 3\]"):
        VARCoDePipeline(**{**components, "transformer": None, "draft_steps": 99})
    # models swapped in after construction are checked at the call (an IndexError or misleading errors before)
    code = VARCoDePipeline(**components)
    code.refiner = VARTransformer2DModel(**{**config, "patch_nums": (1, 2, 4)})
    with pytest.raises(ValueError, match="`refiner` has patch_nums"):
        code(class_labels=[1], output_type="latent")
    code.refiner, code.transformer = components["refiner"], code.refiner
    with pytest.raises(ValueError, match="`refiner` has patch_nums"):
        code(class_labels=[1], output_type="latent")
    code.transformer = None  # named as a component left out is in every pipeline
    with pytest.raises(ValueError, match="has no `transformer`"):
        code(class_labels=[1], output_type="latent")
    code.transformer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="`transformer` must be a VARTransformer2DModel, got a Linear"):
        code(class_labels=[1], output_type="latent")


def test_save_load_keeps_draft_steps_and_the_images(tmp_path):
    pipe = code_pipe(draft_steps=1)
    pipe.save_pretrained(tmp_path / "p")
    loaded = VARCoDePipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.draft_steps == 1 and loaded.refiner.config.depth == 1
    assert torch.equal(latents(loaded), latents(pipe))
    assert torch.equal(latents(loaded, draft_steps=3), latents(pipe, draft_steps=3))  # a call's draft_steps wins
    assert not torch.equal(latents(loaded, draft_steps=3), latents(loaded))


def test_task_pipelines_load_a_code_folder_with_one_plain_note(tmp_path, caplog):
    """A CoDe folder loads into the other VAR pipelines without its refiner, with a note of ours instead of diffusers'
    "please verify your model_index.json"."""
    code_pipe(draft_steps=1).save_pretrained(tmp_path / "p")
    for pipeline_class in (VARPipeline, VARImg2ImgPipeline):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pipe = pipeline_class.from_pretrained(tmp_path / "p")
        assert not hasattr(pipe, "refiner") or pipe.components.get("refiner") is None
        assert "verify your" not in caplog.text
        assert (
            f"holds a VARCoDePipeline: {pipeline_class.__name__} does not use its draft_steps, refiner" in caplog.text
        )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        VARCoDePipeline.from_pretrained(tmp_path / "p")
    assert "does not use" not in caplog.text and "verify your" not in caplog.text


# -- the generator contract ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("more_smooth", [False, True])
def test_refiner_stage_restarts_from_the_calls_generator_state(more_smooth):
    """The refiner stage's draws start from the generator's state at the start of the call (the original re-seeds): so
    with random labels both stages get the same labels, and the refined scales do not depend on how many draws the
    drafter made; without more_smooth the generator ends where a plain VAR call leaves it."""
    pipe = code_pipe()
    g = torch.Generator().manual_seed(7)
    pipe(
        class_labels=None,
        num_images_per_prompt=3,
        top_k=10,
        generator=g,
        output_type="latent",
        more_smooth=more_smooth,
    )
    plain = torch.Generator().manual_seed(7)
    var_pipe(code_components(seed=0))(
        class_labels=None,
        num_images_per_prompt=3,
        top_k=10,
        generator=plain,
        output_type="latent",
        more_smooth=more_smooth,
    )
    assert (
        torch.equal(g.get_state(), plain.get_state()) != more_smooth
    )  # more_smooth: the drafter's Gumbel draws differ
    # a list of generators: each one restarts likewise
    batch = latents(pipe, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = latents(pipe, class_labels=[4], generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_image", [False, True])
def test_discarded_resamples_are_only_drawn_unless_a_callback_asks(per_image, monkeypatch):
    """Without a callback asking for ``"draft_resamples"``, the refiner draws the re-samples' random numbers without
    filtering and sampling (the tokens are thrown away), and its prefill computes the logits of its first scale alone:
    the same images and generator end states as when they are computed, for one generator and for one per image."""

    def generators():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3)] if per_image else torch.Generator().manual_seed(5)

    pipe, seen = code_pipe(), []

    def keep(p, si, hw, tensors):
        seen.append(tensors["draft_resamples"])
        return {}

    samples, head_rows = [], []
    sample = pipeline_var.sample_from_logits
    monkeypatch.setattr(pipeline_var, "sample_from_logits", lambda *a, **k: samples.append(1) or sample(*a, **k))
    pipe.refiner.head.register_forward_pre_hook(lambda module, args: head_rows.append(args[0].shape[1]))
    asked, plain = generators(), generators()
    with_tokens = latents(
        pipe,
        generator=asked,
        temperature=1.3,
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["draft_resamples"],
    )
    sampled_with_tokens, head_rows_with_tokens = len(samples), head_rows[:]
    drawn_only = latents(pipe, generator=plain, temperature=1.3)
    num_scales, draft_steps = len(VAR_PATCH_NUMS), pipe.config.draft_steps
    # one draw per scale, plus the drafted scales' re-samples when they are computed
    assert (sampled_with_tokens, len(samples) - sampled_with_tokens) == (num_scales + draft_steps, num_scales)
    # the refiner's head: the prefill's positions up to its first scale, or that scale's alone; then one per scale
    begin, end = pipe.refiner.begin_ends[draft_steps]
    later = [pn * pn for pn in VAR_PATCH_NUMS[draft_steps + 1 :]]
    assert head_rows_with_tokens == [end, *later] and head_rows[len(head_rows_with_tokens) :] == [end - begin, *later]
    assert any(resamples is not None for resamples in seen)
    assert torch.equal(with_tokens, drawn_only)
    for a, b in zip(asked if per_image else [asked], plain if per_image else [plain]):
        assert torch.equal(a.get_state(), b.get_state())


def test_a_callback_reading_the_prefill_gets_every_position():
    """A callback that asks for ``"prefill_logits"`` alone gets the logits of every position up to the refiner's first
    scale (the head runs over all of them), and the images stay those of a call without it."""
    pipe, seen = code_pipe(), {}
    draft_steps = pipe.config.draft_steps
    plain = latents(pipe, seed=3)
    with_prefill = latents(
        pipe,
        seed=3,
        callback_on_step_end=lambda p, si, hw, t: seen.__setitem__(si, t["prefill_logits"]) or {},
        callback_on_step_end_tensor_inputs=["prefill_logits"],
    )
    end = pipe.refiner.begin_ends[draft_steps][1]
    assert seen[draft_steps].shape == (6, end, pipe.refiner.config.vocab_size)
    assert all(seen[si] is None for si in seen if si != draft_steps)
    assert torch.equal(with_prefill, plain)


def test_one_model_in_both_roles_equals_plain_var():
    """The same transformer as drafter and refiner: CoDe samples the tokens a plain VAR call samples (same seed)."""
    components = code_components(seed=0)
    pipe = VARCoDePipeline(
        transformer=components["transformer"],
        refiner=components["transformer"],
        vqvae=components["vqvae"],
        draft_steps=2,
    )
    pipe.set_progress_bar_config(disable=True)
    tokens = {}
    for name, p in (("code", pipe), ("var", var_pipe(components))):
        latents(
            p,
            callback_on_step_end_tensor_inputs=["tokens"],
            callback_on_step_end=lambda _, si, hw, t, name=name: tokens.setdefault(name, []).append(t["tokens"]) or {},
        )
    assert all(torch.equal(a, b) for a, b in zip(tokens["code"], tokens["var"])) and len(tokens["code"]) == 4


def test_prefill_equals_the_scale_by_scale_cache():
    """The refiner's prefill (one block-causal pass that fills the KV cache) gives the logits, and leaves the cache,
    that decoding scale by scale gives."""
    transformer = code_components(seed=0)["refiner"]
    B, S = 3, len(VAR_PATCH_NUMS)
    labels = torch.tensor([1, 2, 10])
    inputs = torch.randn(B, transformer.seq_len - 1, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = transformer.init_kv_cache()
        stepwise = [
            transformer.forward_scale(si, (labels,), cache, None if si == 0 else inputs[:, b - 1 : e - 1])
            for si, (b, e) in enumerate(transformer.begin_ends)
        ]
        for k in range(1, S - 1):
            prefix = inputs[:, : transformer.begin_ends[k][1] - 1]
            prefill_cache = transformer.init_kv_cache()
            prefill = transformer.prefill_scale((labels,), prefill_cache, prefix)
            torch.testing.assert_close(prefill, torch.cat(stepwise[: k + 1], dim=1), atol=1e-5, rtol=1e-5)
            b, e = transformer.begin_ends[k + 1]
            after = transformer.forward_scale(k + 1, (labels,), prefill_cache, inputs[:, b - 1 : e - 1])
            torch.testing.assert_close(after, stepwise[k + 1], atol=1e-5, rtol=1e-5)
            # scale k's logits alone (the head skips the positions before it), the same cache
            begin = transformer.begin_ends[k][0]
            last_cache = transformer.init_kv_cache()
            last = transformer.prefill_scale((labels,), last_cache, prefix, logits_from=begin)
            assert last.shape == (B, transformer.begin_ends[k][1] - begin, transformer.config.vocab_size)
            torch.testing.assert_close(last, prefill[:, begin:], atol=1e-6, rtol=1e-6)
            after = transformer.forward_scale(k + 1, (labels,), last_cache, inputs[:, b - 1 : e - 1])
            torch.testing.assert_close(after, stepwise[k + 1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="`logits_from`.*\\[0, 4\\]"):
            transformer.prefill_scale((labels,), transformer.init_kv_cache(), inputs[:, :4], logits_from=5)
        with pytest.raises(ValueError, match="`logits_from`.*`scale_index`"):
            transformer(labels, None, scale_index=0, kv_cache=transformer.init_kv_cache(), logits_from=1)
        with pytest.raises(ValueError, match="`kv_cache`"):
            transformer.prefill_scale((labels,), cache, inputs[:, :4])  # a filled cache
        with pytest.raises(ValueError, match="`teacher_forcing_input`"):
            transformer.prefill_scale((labels,), transformer.init_kv_cache(), inputs[:, :5])  # not whole scales


# -- fast path ------------------------------------------------------------------------------------------------------
@pytest.fixture
def stand_in_graphs(monkeypatch):
    EagerGraphStandIn.built = []
    monkeypatch.setattr(fast_inference.FastInferenceMixin, "_cuda_graphs_usable", staticmethod(lambda device: True))
    for module in (fast_inference, pipeline_var):
        monkeypatch.setattr(module, "CUDAGraphScaleSteps", EagerGraphStandIn)
    return EagerGraphStandIn


@pytest.mark.parametrize("sampling_in_graphs", [True, False])
def test_graph_wiring_of_both_stages(monkeypatch, stand_in_graphs, sampling_in_graphs):
    """Graph sets per stage (the drafter's scales; the refiner's prefill with its re-sampling, then its scales), whole
    scales with sampling inside (CUDA generator) or the transformer steps only (CPU generator), reproduce the eager
    CoDe loop exactly: latents, the generator's end state, the callback's tensors."""
    if sampling_in_graphs:
        monkeypatch.setattr(
            fast_inference.FastInferenceMixin,
            "_graph_sampling_generator",
            lambda self, device, generator: generator if self._use_cuda_graphs else None,
        )
    eager, graphed = code_pipe(), code_pipe().enable_fast_inference(dtype=torch.float32)
    halve = lambda p, si, hw, t: {"latents": t["latents"] * 0.5} if si in (1, 2) else {}  # noqa: E731
    cases = [
        dict(guidance_scale=4.0),
        dict(top_k=[10, 10, 5, 0], temperature=[1.2, 1.1, 1.0, 0.9], top_p=0.7),
        dict(more_smooth=True, temperature=1.3),
        dict(draft_steps=1),
        dict(draft_steps=3, top_p=0.0),
        dict(callback_on_step_end=halve),
        dict(class_labels=None, num_images_per_prompt=2),
    ]
    for seed, kwargs in enumerate(cases):
        g_eager, g_graphed = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(
            latents(graphed, generator=g_graphed, **kwargs), latents(eager, generator=g_eager, **kwargs)
        ), kwargs
        assert torch.equal(g_graphed.get_state(), g_eager.get_state())
    # one set per stage: the drafter's scales 0..N-1, the refiner's N..S-1 (the prefill first)
    keys = list(graphed._graph_steps)
    assert stand_in_graphs.built and all(
        key[0] == ("sampling" if sampling_in_graphs else "transformer") for key in keys
    )
    models = {id(graphed.transformer): "drafter", id(graphed.refiner): "refiner"}
    model_at = 6 if sampling_in_graphs else 3  # then the scales and whether the first one is a prefill
    stages = {(models[key[model_at]], key[model_at + 1], key[model_at + 2]) for key in keys}
    assert {("drafter", range(0, 2), False), ("refiner", range(2, 4), True)} <= stages
    if sampling_in_graphs:  # the two stages of one generation share the KV buffer and the graph memory pool
        latents(graphed, seed=9)
        drafter_set, refiner_set = list(graphed._graph_steps.values())[-2:]
        assert drafter_set.memory is refiner_set.memory and drafter_set.pool == refiner_set.pool
        storage = drafter_set.memory.kv_storage
        sizes = [
            2 * len(m.blocks) * 6 * length * m.config.embed_dim
            for m, length in ((graphed.transformer, 5), (graphed.refiner, 30))
        ]  # rows 6, cum_2 = 5, L = 30
        assert storage.numel() == max(sizes)
    seen = {}
    names = [
        "tokens",
        "guided_logits",
        "model_logits",
        "next_scale_input",
        "prefill_logits",
        "draft_resamples",
        "latents",
    ]
    for pipe in (eager, graphed):
        latents(
            pipe,
            seed=3,
            callback_on_step_end_tensor_inputs=names,
            callback_on_step_end=lambda p, si, hw, t: (
                seen.setdefault(id(p), []).append(
                    [v if v is None or isinstance(v, list) else v.clone() for v in t.values()]
                )
                or {}
            ),
        )
    for reference, got in zip(seen[id(eager)], seen[id(graphed)], strict=True):
        for r, g in zip(reference, got, strict=True):
            assert (r is None and g is None) or (
                torch.equal(r, g) if torch.is_tensor(r) else all(map(torch.equal, r, g))
            )


def test_fp8_covers_both_models_and_refuses_a_refiner_it_cannot_take():
    """``fp8=True`` gives the drafter's and the refiner's block linears float8 weights; a refiner whose FFN width is
    not a multiple of 16 is refused, naming the width, before any model is cast or quantised."""
    pipe = code_pipe().enable_fast_inference(fp8=True)
    for model in (pipe.transformer, pipe.refiner):
        assert sum(getattr(m, "weight_fp8", None) is not None for m in model.modules()) == 4 * len(model.blocks)
    components = code_components(seed=0)
    refiner = VARTransformer2DModel(
        num_classes=10,
        depth=1,
        embed_dim=32,
        num_heads=1,
        mlp_ratio=4.125,
        vocab_size=32,
        latent_channels=8,
        patch_nums=VAR_PATCH_NUMS,
    )  # FFN width 132
    refused = code_pipe(refiner=refiner.eval(), transformer=components["transformer"], vqvae=components["vqvae"])
    with pytest.raises(ValueError, match="132"):
        refused.enable_fast_inference(fp8=True)
    for model in (refused.transformer, refused.refiner):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert not any(getattr(m, "weight_fp8", None) is not None for m in model.modules())
    assert not refused._fast_inference


def test_kv_caches_can_share_one_buffer():
    """``KVCache.share_storage``: the layers' keys and values are views of the buffer when it has room (CoDe's two
    stages keep one buffer on the fast path), new tensors otherwise; decoding is the same either way."""
    transformer = code_components(seed=0)["refiner"]
    labels, B = torch.tensor([1, 2]), 2
    inputs = torch.randn(B, transformer.seq_len - 1, 8, generator=torch.Generator().manual_seed(1))

    def decode(cache):
        with torch.no_grad():
            return [
                transformer.forward_scale(si, (labels,), cache, None if si == 0 else inputs[:, b - 1 : e - 1])
                for si, (b, e) in enumerate(transformer.begin_ends)
            ]

    reference = decode(transformer.init_kv_cache())
    needed = 2 * len(transformer.blocks) * B * transformer.seq_len * transformer.config.embed_dim
    for numel, shared in ((needed, True), (needed - 1, False)):
        flat = torch.full((numel,), float("nan"))
        cache = transformer.init_kv_cache().share_storage(flat)
        assert all(torch.equal(a, b) for a, b in zip(decode(cache), reference))
        keys = cache.layers[0]._keys
        assert (keys.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()) == shared


def test_code_refuses_a_drafter_switched_without_its_refiner():
    """A VAR pipeline sharing CoDe's drafter switches the drafter alone: the CoDe pipeline says which call puts both
    stages back on one footing, instead of running a fitted drafter beside an unfitted refiner."""
    code = code_pipe()
    VARPipeline.from_pipe(code).enable_fast_inference(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"call `enable_fast_inference\(\)` or `disable_fast_inference\(\)`"):
        code(class_labels=[1], top_k=10, output_type="latent")
    code.enable_fast_inference(dtype=torch.float32)
    assert code(class_labels=[1], top_k=10, output_type="latent").images.shape[0] == 1


def test_from_pipe_of_a_var_pipeline_names_the_missing_refiner():
    """A VAR pipeline holds no refiner: the error says how to give one (diffusers' own listed the expected names)."""
    var = VARPipeline(**var_components(seed=0))
    with pytest.raises(
        ValueError, match=r"VARCoDePipeline needs \['refiner'\].*from_pipe\(pipeline, refiner=\.\.\.\)"
    ):
        VARCoDePipeline.from_pipe(var)
    code = VARCoDePipeline.from_pipe(var, refiner=code_components(seed=0)["refiner"])
    assert code.transformer is var.transformer and code.vqvae is var.vqvae
