"""``enable_fast_inference`` / ``disable_fast_inference`` of STARPipeline and InfinityPipeline on the CPU (the
CUDA-graph replay itself is checked in test_gpu.py), the CUDA-graph wiring with a stand-in graph class, and the
precomputed text feature arguments (``prompt_embeds`` & co.)."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

from diffusers_var import (
    InfinityPipeline,
    MultiScaleVQModel,
    STARPipeline,
    VARPipeline,
    VARTransformer2DModel,
)
from diffusers_var.cli_support import COMPILE_BLOCKS_SHAPES
from diffusers_var.models.blocks import CosineSelfAttention
from diffusers_var.models.star_transformer import STARBlock
from diffusers_var.pipelines import fast_inference, pipeline_var
from test_infinity_pipeline import PROMPT, tiny_pipeline
from test_star_pipeline import make_pipe

PROMPTS = ["a red cat", "the city"]


def star_images(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", PROMPTS)
    return pipe(
        generator=torch.Generator().manual_seed(seed),
        sampler_generator=torch.Generator().manual_seed(seed + 1),
        top_k=10,
        top_p=0.9,
        output_type="pt",
        **kwargs,
    ).images


@pytest.fixture(autouse=True)
def _keep_the_recompile_limit():
    """``compile_blocks="static"`` / ``"static-tokens"`` raise dynamo's recompile limit for the process: put it back
    after each test, so that no test depends on the ones before it."""
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield


def _new_cache_entries(piece, run) -> int:
    """How many compiled entries the below-threshold code of a compiled block piece gains while ``run()`` runs (the
    code is shared by every block and test, so count the difference)."""
    code = piece.below._torchdynamo_orig_callable
    before = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))
    run()
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) - before


def infinity_images(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("guidance_scale", 3.0)
    return pipe(height=32, width=32, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


@pytest.fixture(scope="module")
def star():
    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def infinity():
    return tiny_pipeline()


def own_star(star) -> STARPipeline:
    """The same tiny STAR pipeline with its own copy of the text encoder (enable_fast_inference casts it)."""
    pipe = make_pipe(text=(star.tokenizer, copy.deepcopy(star.text_encoder)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_float32(module) -> bool:
    return all(p.dtype == torch.float32 for p in module.parameters())


def _is_bf16(module) -> bool:
    return all(p.dtype == torch.bfloat16 for p in module.parameters())


# -- enable / disable on the CPU -----------------------------------------------------------------
def test_star_fast_inference_on_cpu(star):
    reference = star_images(star)
    pipe = own_star(star)
    assert pipe.enable_fast_inference(dtype=torch.float32) is pipe
    assert torch.equal(star_images(pipe), reference)  # CPU: exact eager fallback, no graphs captured
    assert not pipe._graph_steps

    pipe.enable_fast_inference()  # bf16
    tr = pipe.transformer
    assert _is_bf16(tr.blocks) and _is_bf16(tr.text_proj) and _is_bf16(tr.sampler.blocks)
    assert _is_float32(tr.head) and _is_float32(tr.sampler.head)
    assert _is_bf16(pipe.vqvae.decoder) and _is_bf16(pipe.vqvae.post_quant_conv) and _is_float32(pipe.vqvae.quantize)
    assert _is_bf16(pipe.text_encoder)
    images = star_images(pipe)
    assert images.shape == reference.shape and images.dtype == torch.float32 and torch.isfinite(images).all()

    assert pipe.disable_fast_inference() is pipe
    assert not pipe._fast_inference and not pipe._use_cuda_graphs
    assert torch.isfinite(star_images(pipe)).all()  # eager path again (weights stay bf16)


def test_star_disable_restores_the_exact_eager_path(star):
    reference = star_images(star, seed=3)
    pipe = own_star(star)
    pipe.enable_fast_inference(dtype=torch.float32).disable_fast_inference()
    assert torch.equal(star_images(pipe, seed=3), reference)


def test_infinity_fast_inference_on_cpu(infinity):
    reference = infinity_images(infinity)
    pipe = tiny_pipeline()
    assert pipe.enable_fast_inference(dtype=torch.float32) is pipe
    assert torch.equal(infinity_images(pipe), reference)
    assert not pipe._graph_steps

    pipe.enable_fast_inference()
    tr = pipe.transformer
    assert _is_bf16(tr.blocks) and _is_bf16(tr.text_pool) and _is_bf16(tr.text_proj)
    assert _is_float32(tr.head) and _is_float32(tr.head_norm) and _is_float32(tr.text_norm)
    assert _is_bf16(pipe.vae.decoder) and _is_float32(pipe.vae.encoder) and _is_bf16(pipe.text_encoder)
    images = infinity_images(pipe)
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.isfinite(infinity_images(pipe, guidance_scale=1.0, negative_prompt=None)).all()  # no guidance rows

    pipe.disable_fast_inference()
    assert not pipe._fast_inference and torch.isfinite(infinity_images(pipe)).all()

    exact = tiny_pipeline().enable_fast_inference(dtype=torch.float32).disable_fast_inference()
    assert torch.equal(infinity_images(exact), reference)


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(dtype="bf16"), "dtype"),
        (dict(dtype=torch.int64), "dtype"),
        (dict(dtype=None), "dtype"),
        (dict(cuda_graphs="yes"), "cuda_graphs"),
        (dict(compile_decoder=1), "compile_decoder"),
        (dict(compile_decoder="max-autotune-cudagraphs"), "compile_decoder"),
        (dict(compile_decoder="reduce-overhead"), "compile_decoder"),
        (dict(compile_decoder="max-autotune"), "compile_decoder"),
        (dict(compile_decoder="fast"), "compile_decoder"),
        (dict(compile_blocks="yes"), "compile_blocks"),
    ],
)
def test_bad_fast_inference_arguments_name_the_parameter(star, infinity, kwargs, parameter):
    torch.manual_seed(0)
    vqvae = MultiScaleVQModel(
        ch=32, ch_mult=(1, 1), num_res_blocks=1, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3)
    )
    var = VARPipeline(
        VARTransformer2DModel(
            num_classes=4, depth=1, embed_dim=32, num_heads=2, vocab_size=64, latent_channels=8, patch_nums=(1, 2, 3)
        ),
        vqvae,
    )
    for pipe in (star, infinity, var):
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            pipe.enable_fast_inference(**kwargs)
        assert not pipe._fast_inference


# -- CUDA-graph wiring, with a stand-in for the graphs ------------------------------------------------
class EagerGraphStandIn:
    """Mimics CUDAGraphScaleSteps on the CPU: static input tensors copied in at every call, shared inputs set
    once per generation, the step re-run on the static tensors (a real graph replays the recorded kernels)."""

    built = []

    def __init__(self, step, example_inputs, reset_cache, shared_inputs=(), generator=None, first_scale=0, pool=None):
        self.step, self.reset_cache, self.generator, self.first_scale = step, reset_cache, generator, first_scale
        self.pool = pool if pool is not None else ("pool of", id(self))
        self.shared_inputs = tuple(t.clone() for t in shared_inputs)
        self.static_inputs = [tuple(None if t is None else t.clone() for t in inputs) for inputs in example_inputs]
        EagerGraphStandIn.built.append(self)

    set_shared_inputs = fast_inference.CUDAGraphScaleSteps.set_shared_inputs
    borrow_generator_state = fast_inference.CUDAGraphScaleSteps.borrow_generator_state

    def __call__(self, scale_index, *inputs):
        index = scale_index - self.first_scale
        for static, value in zip(self.static_inputs[index], inputs):
            if static is not None:
                static.copy_(value)
        if index == 0:
            self.reset_cache()
        return self.step(scale_index, *self.shared_inputs, *self.static_inputs[index])


@pytest.fixture
def stand_in_graphs(monkeypatch):
    EagerGraphStandIn.built = []
    monkeypatch.setattr(fast_inference.FastInferenceMixin, "_cuda_graphs_usable", staticmethod(lambda device: True))
    for module in (fast_inference, pipeline_var):
        monkeypatch.setattr(module, "CUDAGraphScaleSteps", EagerGraphStandIn)
    return EagerGraphStandIn


def test_star_graph_wiring_reuses_one_set_per_rows_and_text_length(star, stand_in_graphs):
    pipe = own_star(star).enable_fast_inference(dtype=torch.float32)
    for prompts in (PROMPTS, ["two dogs", "a boat at sea"], ["one"]):
        assert torch.equal(star_images(pipe, prompt=prompts), star_images(star, prompt=prompts))

    def rows_and_length(key):  # the shapes of the condition (text hidden states) fix a set
        return key[2][0][0][:2]

    assert [rows_and_length(k) for k in pipe._graph_steps] == [(4, 77), (2, 77)] and len(stand_in_graphs.built) == 2
    star_images(pipe, prompt=PROMPTS, max_sequence_length=20)  # another text length: another set
    assert rows_and_length(list(pipe._graph_steps)[-1]) == (4, 20)
    pipe.graph_cache_size = 1
    star_images(pipe, prompt=["one"])
    assert [rows_and_length(k) for k in pipe._graph_steps] == [(2, 77)]  # least recently used sets dropped
    for bad in (0, -1, 1.5, True, "2"):  # refused, not clamped to 1
        pipe.graph_cache_size = bad
        with pytest.raises(ValueError, match="`graph_cache_size`"):
            star_images(pipe, prompt=["one"])


def test_infinity_graph_wiring(infinity, stand_in_graphs):
    pipe = tiny_pipeline().enable_fast_inference(dtype=torch.float32)
    for kwargs in (dict(), dict(prompt="a cat"), dict(negative_prompt="blurry"), dict(guidance_scale=1.0)):
        assert torch.equal(infinity_images(pipe, **kwargs), infinity_images(infinity, **kwargs))
    keys = list(pipe._graph_steps)  # ("transformer", schedule, condition shapes): rows 2 with guidance, 1 without
    assert {k[2][0][0][0] for k in keys} == {1, 2} and len({k[1] for k in keys}) == 1


def tiny_var(seed: int = 0) -> VARPipeline:
    torch.manual_seed(seed)
    vqvae = MultiScaleVQModel(
        ch=32, ch_mult=(1, 1), num_res_blocks=1, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4)
    )
    transformer = VARTransformer2DModel(
        depth=2, embed_dim=64, num_heads=2, vocab_size=64, latent_channels=8, patch_nums=(1, 2, 3, 4), num_classes=10
    )
    transformer.init_weights(init_head=1.0)  # spread-out logits: filtering and sampling matter
    pipe = VARPipeline(transformer=transformer.eval(), vqvae=vqvae.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_var_sampling_graph_wiring(monkeypatch, stand_in_graphs):
    """The whole-scale graphs (sampling inside) with the CPU stand-in: static f_hat and chained scale inputs,
    guidance and top-p read from the shared tensors (one set serves them all; top-k fixes shapes, so it is part of the
    key), the borrowed generator state, and a callback's f_hat written into the static buffers all reproduce the eager
    loop exactly."""
    monkeypatch.setattr(pipeline_var, "CUDAGraphScaleSteps", EagerGraphStandIn)
    monkeypatch.setattr(
        fast_inference.FastInferenceMixin,
        "_graph_sampling_generator",
        lambda self, device, generator: generator if self._use_cuda_graphs else None,
    )
    eager, graphed = tiny_var(), tiny_var().enable_fast_inference(dtype=torch.float32)

    def run(pipe, seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        latent = pipe(class_labels=[1, 4, 9], generator=generator, output_type="latent", **kwargs).images
        return latent, generator.get_state()

    halve = lambda p, si, hw, t: {"latents": t["latents"] * 0.5} if si == 1 else {}  # noqa: E731
    cases = [
        dict(guidance_scale=4.0, top_k=10, top_p=0.9),
        dict(guidance_scale=1.5, top_k=10, top_p=0.7),
        dict(guidance_scale=2.0, top_k=0, top_p=0.96),
        dict(guidance_scale=3.0, top_k=10, top_p=0.9, more_smooth=True),
        dict(guidance_scale=2.0, top_k=10, top_p=0.8, callback_on_step_end=halve),
    ]
    for seed, kwargs in enumerate(cases):
        (reference, reference_state), (latent, state) = run(eager, seed, **kwargs), run(graphed, seed, **kwargs)
        assert torch.equal(latent, reference), kwargs
        assert torch.equal(state, reference_state)  # the caller's generator advanced as in the eager loop
    keys = [(key[0], key[1], key[2].more_smooth, key[3]) for key in graphed._graph_steps]
    assert sorted(keys) == [("sampling", 6, False, 0), ("sampling", 6, False, 10), ("sampling", 6, True, 10)]
    first, _ = run(graphed, 0, **cases[0])
    run(graphed, 1, **cases[1])
    assert not torch.equal(first, run(graphed, 1, **cases[1])[0])  # the returned latent is not the graphs' buffer
    # guided logits for the callback: a copy made inside the graph, as the eager loop makes it
    seen = {}
    for pipe in (eager, graphed):
        run(
            pipe,
            3,
            guidance_scale=4.0,
            top_k=10,
            callback_on_step_end_tensor_inputs=["guided_logits", "model_logits", "tokens", "next_scale_input"],
            callback_on_step_end=lambda p, si, hw, t: (
                seen.setdefault(id(p), []).append([None if v is None else v.clone() for v in t.values()]) or {}
            ),
        )
    for reference, got in zip(seen[id(eager)], seen[id(graphed)]):
        assert all((r is None and g is None) or torch.equal(r, g) for r, g in zip(reference, got))
    # moved or cast, the weights live in other memory: the captured graphs are dropped, not replayed
    assert graphed._graph_steps
    graphed.to("cpu")
    assert not graphed._graph_steps
    latent, _ = run(graphed, 0, **cases[0])
    assert torch.equal(latent, run(eager, 0, **cases[0])[0]) and graphed._graph_steps  # captured anew


def _text_to_image_runs(family: str, star):
    """An eager pipeline, the same one on the fast path (float32), a ``run(pipe, seed, **kwargs) -> (latent,
    generator state)`` and the cases that shape the whole-scale graphs of ``family``."""
    if family == "star":
        eager, graphed = own_star(star), own_star(star).enable_fast_inference(dtype=torch.float32)
        defaults = dict(prompt=PROMPTS, top_k=10, use_stable_sampler=False)
        cases = [
            dict(),
            dict(top_p=0.9, guidance_scale=2.0),
            dict(more_smooth=True),
            dict(prompt=["one"], top_k=0, top_p=0.8),
        ]
    else:
        eager, graphed = tiny_pipeline(), tiny_pipeline().enable_fast_inference(dtype=torch.float32)
        defaults = dict(prompt=PROMPT, guidance_scale=3.0, height=32, width=32)

        def stop_guiding(p, si, hw, tensors):  # a callback that changes the guidance mid-generation
            if si == 2:
                p._guidance_scale = 1.0

        cases = [
            dict(),
            dict(tau=0.5, top_p=0.9),
            dict(guidance_scale=1.0),  # no unconditional rows
            dict(guidance_scale=[3.0, 1.0, 2.0, 4.0, 1.5, 3.0, 2.5], negative_prompt="blurry", tau=0.7),
            dict(callback_on_step_end=stop_guiding),
        ]

    def run(pipe, seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        latent = pipe(generator=generator, output_type="latent", **{**defaults, **kwargs}).images
        return latent, generator.get_state()

    return eager, graphed, run, cases


@pytest.mark.parametrize("family", ["star", "infinity"])
def test_text_to_image_sampling_graph_wiring(family, star, monkeypatch, stand_in_graphs):
    """STAR's and Infinity's whole-scale graphs (sampling inside) with the CPU stand-in: static latents and chained
    scale inputs, guidance / tau / top-p read from the shared tensors, the borrowed generator state, a callback's
    latent written into the static buffers and a callback that changes the guidance all reproduce the eager loop
    exactly; the logits copies handed to a callback equal the eager ones; weights moved by the component's own
    ``.to()`` drop the graphs, and a cast behind the fast path's back is refused."""
    monkeypatch.setattr(
        fast_inference.FastInferenceMixin,
        "_graph_sampling_generator",
        lambda self, device, generator: generator if self._use_cuda_graphs else None,
    )
    eager, graphed, run, cases = _text_to_image_runs(family, star)
    cases.append(dict(callback_on_step_end=lambda p, si, hw, t: {"latents": t["latents"] * 0.5} if si == 2 else {}))
    for seed, kwargs in enumerate(cases):
        (reference, reference_state), (latent, state) = run(eager, seed, **kwargs), run(graphed, seed, **kwargs)
        assert torch.equal(latent, reference), kwargs
        assert torch.equal(state, reference_state)  # the caller's generator advanced as in the eager loop
    assert graphed._graph_steps and all(key[0] == "whole scales" for key in graphed._graph_steps)
    first, _ = run(graphed, 0)
    assert not torch.equal(first, run(graphed, 1)[0])  # the returned latent is not the graphs' buffer
    seen = {}
    names = ["latents", "tokens", "guided_logits", "model_logits", "next_scale_input"]
    for pipe in (eager, graphed):
        run(
            pipe,
            3,
            callback_on_step_end_tensor_inputs=names,
            callback_on_step_end=lambda p, si, hw, t: (
                seen.setdefault(id(p), []).append([None if t[n] is None else t[n].clone() for n in names]) or {}
            ),
        )
    assert len(seen[id(graphed)]) == len(seen[id(eager)]) > 0
    for reference, got in zip(seen[id(eager)], seen[id(graphed)]):
        assert all((r is None and g is None) or torch.equal(r, g) for r, g in zip(reference, got))
    # the component moved by its own .to() / share_memory(): new storage, so the graphs are captured anew
    captured = len(stand_in_graphs.built)
    graphed.transformer.share_memory()
    assert torch.equal(run(graphed, 0)[0], run(eager, 0)[0]) and len(stand_in_graphs.built) == captured + 1
    graphed.transformer.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"`transformer`: its weights were cast from torch.float32 to torch.bfloat16"):
        run(graphed, 0)
    graphed.enable_fast_inference(dtype=torch.float32)  # recast: runs again
    assert torch.isfinite(run(graphed, 0)[0]).all()


def test_star_stable_sampler_keeps_sampling_out_of_the_graphs(star, monkeypatch, stand_in_graphs):
    """The stable sampler's commit steps draw from a second stream: its generations replay the transformer-only graphs
    and sample eagerly, as the eager loop does."""
    monkeypatch.setattr(
        fast_inference.FastInferenceMixin,
        "_graph_sampling_generator",
        lambda self, device, generator: generator if self._use_cuda_graphs else None,
    )
    eager, graphed = own_star(star), own_star(star).enable_fast_inference(dtype=torch.float32)
    assert torch.equal(star_images(graphed), star_images(eager))
    assert [key[0] for key in graphed._graph_steps] == ["transformer"]


@pytest.mark.parametrize("family", ["star", "infinity"])
def test_images_above_the_token_limit_sample_after_the_graphed_step(family, star, monkeypatch, stand_in_graphs):
    """Above ``WHOLE_SCALE_SAMPLING_MAX_TOKENS`` at the last scale (1024 px images) the sampling stays out of the
    graphs: transformer-only graphs, the eager loop's images."""
    monkeypatch.setattr(
        fast_inference.FastInferenceMixin,
        "_graph_sampling_generator",
        lambda self, device, generator: generator if self._use_cuda_graphs else None,
    )
    eager, graphed, run, _ = _text_to_image_runs(family, star)
    for limit, kind in ((fast_inference.WHOLE_SCALE_SAMPLING_MAX_TOKENS, "whole scales"), (3, "transformer")):
        monkeypatch.setattr(fast_inference, "WHOLE_SCALE_SAMPLING_MAX_TOKENS", limit)
        assert torch.equal(run(graphed, 0)[0], run(eager, 0)[0])
        assert list(graphed._graph_steps)[-1][0] == kind


# -- precomputed text features ---------------------------------------------------------------------------
def test_star_prompt_embeds_reproduce_the_prompt(star):
    hidden, mask, pooled, neg_hidden, neg_mask, neg_pooled = star.encode_prompt(PROMPTS)
    embeds = dict(
        prompt_embeds=hidden,
        prompt_attention_mask=mask,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg_hidden,
        negative_prompt_attention_mask=neg_mask,
        negative_pooled_prompt_embeds=neg_pooled,
    )
    assert torch.equal(star_images(star, prompt=None, **embeds), star_images(star))
    twice = star_images(star, prompt=None, num_images_per_prompt=2, **embeds)
    assert torch.equal(twice, star_images(star, num_images_per_prompt=2))
    # prompt features only: the negative half comes from the text encoder
    only = star_images(star, prompt=None, prompt_embeds=hidden, pooled_prompt_embeds=pooled)
    assert only.shape == (2, 3, 8, 8) and torch.isfinite(only).all()

    no_text = STARPipeline(transformer=star.transformer, vqvae=star.vqvae)
    no_text.set_progress_bar_config(disable=True)
    assert torch.equal(star_images(no_text, prompt=None, **embeds), star_images(star))
    with pytest.raises(ValueError, match="`prompt`"):
        star_images(no_text)
    with pytest.raises(ValueError, match="`negative_prompt_embeds`"):
        star_images(no_text, prompt=None, prompt_embeds=hidden, pooled_prompt_embeds=pooled)


def test_star_pipeline_without_text_encoder_saves_and_loads(star, tmp_path):
    STARPipeline(transformer=star.transformer, vqvae=star.vqvae).save_pretrained(
        tmp_path / "p", safe_serialization=True
    )
    loaded = STARPipeline.from_pretrained(tmp_path / "p")
    assert loaded.text_encoder is None and loaded.tokenizer is None


def _star_bad_embeds(star):
    D = star.transformer.config.text_embed_dim
    h, m, p = torch.randn(2, 5, D), torch.ones(2, 5, dtype=torch.long), torch.randn(2, D)
    ok = dict(
        prompt=None,
        prompt_embeds=h,
        prompt_attention_mask=m,
        pooled_prompt_embeds=p,
        negative_prompt_embeds=h.clone(),
        negative_prompt_attention_mask=m,
        negative_pooled_prompt_embeds=p.clone(),
    )
    zero_row = m.clone()
    zero_row[1] = 0
    return [
        (dict(ok, prompt_embeds=torch.randn(2, 5, D + 1)), "prompt_embeds"),
        (dict(ok, prompt_embeds=torch.randn(2, D)), "prompt_embeds"),
        (dict(ok, prompt_embeds=torch.ones(2, 5, D, dtype=torch.long)), "prompt_embeds"),
        (dict(ok, prompt="a cat"), "prompt_embeds"),
        (dict(ok, prompt_attention_mask=torch.ones(2, 6)), "prompt_attention_mask"),
        (dict(ok, prompt_attention_mask=zero_row), "prompt_attention_mask"),
        (dict(ok, pooled_prompt_embeds=None), "pooled_prompt_embeds"),
        (dict(ok, pooled_prompt_embeds=torch.randn(3, D)), "pooled_prompt_embeds"),
        (
            dict(
                ok,
                negative_prompt_embeds=torch.randn(3, 5, D),
                negative_prompt_attention_mask=None,
                negative_pooled_prompt_embeds=torch.randn(3, D),
            ),
            "negative_prompt_embeds",
        ),
        (
            dict(ok, negative_prompt_embeds=torch.randn(2, 7, D), negative_prompt_attention_mask=None),
            "negative_prompt_embeds",
        ),
        (dict(ok, negative_pooled_prompt_embeds=torch.randn(2, D + 1)), "negative_pooled_prompt_embeds"),
        (dict(ok, negative_prompt="ugly"), "negative_prompt_embeds"),
        (dict(prompt="a cat", pooled_prompt_embeds=p[:1]), "pooled_prompt_embeds"),
        (dict(prompt="a cat", negative_prompt_attention_mask=m[:1]), "negative_prompt_attention_mask"),
        (
            dict(
                ok,
                prompt_embeds=torch.randn(2, 500, D),
                prompt_attention_mask=None,
                negative_prompt_embeds=None,
                negative_prompt_attention_mask=None,
                negative_pooled_prompt_embeds=None,
            ),
            "prompt_embeds",
        ),  # > encoder length
    ]


def test_star_bad_prompt_embeds_name_the_parameter(star):
    for kwargs, parameter in _star_bad_embeds(star):
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            star_images(star, **kwargs)


def test_infinity_prompt_embeds_reproduce_the_prompt(infinity):
    embeds, mask, _, _ = infinity.encode_prompt([PROMPT, "a cat"])
    reference = infinity_images(infinity, prompt=[PROMPT, "a cat"])
    assert torch.equal(
        infinity_images(infinity, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask), reference
    )
    assert torch.equal(
        infinity_images(
            infinity, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask.long(), num_images_per_prompt=2
        ),
        infinity_images(infinity, prompt=[PROMPT, "a cat"], num_images_per_prompt=2),
    )
    neg_embeds, neg_mask, _, _ = infinity.encode_prompt(["blurry", "blurry"])
    assert torch.equal(
        infinity_images(
            infinity,
            prompt=None,
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            negative_prompt_embeds=neg_embeds,
            negative_prompt_attention_mask=neg_mask,
        ),
        infinity_images(infinity, prompt=[PROMPT, "a cat"], negative_prompt="blurry"),
    )
    single, single_mask, _, _ = infinity.encode_prompt(PROMPT)
    assert torch.isfinite(
        infinity_images(infinity, prompt=None, prompt_embeds=single)
    ).all()  # mask defaults to all real

    no_text = InfinityPipeline(transformer=infinity.transformer, vae=infinity.vae)
    no_text.set_progress_bar_config(disable=True)
    assert torch.equal(
        infinity_images(no_text, prompt=None, prompt_embeds=single, prompt_attention_mask=single_mask),
        infinity_images(infinity),
    )
    with pytest.raises(ValueError, match="`prompt`"):
        infinity_images(no_text)
    with pytest.raises(ValueError, match="`negative_prompt`"):
        infinity_images(no_text, prompt=None, prompt_embeds=single, negative_prompt="blurry")


def test_infinity_bad_prompt_embeds_name_the_parameter(infinity):
    T, S_max = infinity.transformer.config.text_dim, infinity.prompt_max_length  # 512, as the original tokenises
    e, m = torch.randn(2, 5, T), torch.ones(2, 5, dtype=torch.bool)
    empty_row = m.clone()
    empty_row[0] = False
    cases = [
        (dict(prompt_embeds=torch.randn(2, 5, T + 1)), "prompt_embeds"),
        (dict(prompt_embeds=torch.randn(5, T)), "prompt_embeds"),
        (dict(prompt_embeds=torch.randn(1, S_max + 1, T)), "prompt_embeds"),
        (dict(prompt_embeds=e, prompt=PROMPT), "prompt_embeds"),
        (dict(prompt_embeds=e, prompt_attention_mask=m[:, :4]), "prompt_attention_mask"),
        (dict(prompt_embeds=e, prompt_attention_mask=empty_row), "prompt_attention_mask"),
        (dict(prompt_embeds=e, prompt_attention_mask=m.float()), "prompt_attention_mask"),
        (dict(prompt_attention_mask=m[:1]), "prompt_attention_mask"),
        (dict(prompt_embeds=e, negative_prompt_embeds=torch.randn(1, 5, T)), "negative_prompt_embeds"),
        (dict(prompt_embeds=e, negative_prompt_embeds=torch.randn(2, 5, 7)), "negative_prompt_embeds"),
        (
            dict(prompt_embeds=e, negative_prompt_embeds=e, negative_prompt_attention_mask=m[:, :2]),
            "negative_prompt_attention_mask",
        ),
        (dict(prompt_embeds=e, negative_prompt_embeds=e, negative_prompt="ugly"), "negative_prompt_embeds"),
        (dict(negative_prompt_attention_mask=m[:1]), "negative_prompt_attention_mask"),
    ]
    for kwargs, parameter in cases:
        if "prompt_embeds" in kwargs:
            kwargs.setdefault("prompt", None)
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            infinity_images(infinity, **kwargs)


def _perturbed_var_transformer() -> VARTransformer2DModel:
    """A tiny VAR transformer whose weights are perturbed so that the blocks matter (freshly initialised AdaLN gates,
    1e-5, would make them irrelevant to the output)."""
    torch.manual_seed(0)
    transformer = VARTransformer2DModel(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4), num_classes=10)
    transformer.init_weights()
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return transformer.eval()


def test_var_compiled_blocks_generate_what_the_eager_blocks_do(monkeypatch):
    """``compile_blocks=True`` hands each block's elementwise work to torch.compile, chained across the blocks (keys
    and values written into the cache by the projection piece); in float32 its logits are the eager ones, for
    decoding, teacher forcing and a prefill followed by decoding. A hook on a block, or ``CHAIN_VAR_BLOCKS`` off, runs
    the blocks one by one. The weights are perturbed first: freshly initialised AdaLN gates (1e-5) would make the
    blocks (compiled or not) irrelevant to the output. Bad values name the parameter."""
    transformer = _perturbed_var_transformer()
    condition = (torch.tensor([1, 2, 10, 10]),)
    scale_inputs = [None] + [
        torch.randn(4, e - b, transformer.config.latent_channels) for b, e in transformer.begin_ends[1:]
    ]

    def all_logits():
        cache = transformer.init_kv_cache()
        with torch.no_grad():
            return [transformer.forward_scale(si, condition, cache, x) for si, x in enumerate(scale_inputs)]

    eager = all_logits()
    blocks = list(transformer.blocks)
    transformer.blocks = torch.nn.ModuleList()  # without the blocks the logits must change: they matter here
    assert (all_logits()[-1] - eager[-1]).abs().max() > 1e-2
    transformer.blocks = torch.nn.ModuleList(blocks)

    pipe = VARPipeline(transformer=transformer, vqvae=MultiScaleVQModel(patch_nums=(1, 2, 3, 4)).eval())
    pipe.enable_fast_inference(dtype=torch.float32, compile_blocks=True)
    assert all(hasattr(block.ffn_residual, "_torchdynamo_orig_callable") for block in transformer.blocks)
    assert all(hasattr(block.compiled_attention_inputs, "_torchdynamo_orig_callable") for block in transformer.blocks)
    # decoding runs the chained pieces (no block is called), teacher forcing too under no_grad
    tail_calls = []
    for block in transformer.blocks:
        assert hasattr(block.compiled_block_tail, "_torchdynamo_orig_callable")
        tail = block.compiled_block_tail
        block.compiled_block_tail = lambda *args, tail=tail: tail_calls.append(1) or tail(*args)
    for compiled, reference in zip(all_logits(), eager):
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    assert len(tail_calls) == len(scale_inputs) * (len(transformer.blocks) - 1)
    bias_calls = []  # the qkv bias is concatenated once per block and generation, not at every scale
    plain_bias = CosineSelfAttention.qkv_bias
    CosineSelfAttention.qkv_bias = lambda self: bias_calls.append(1) or plain_bias(self)
    try:
        all_logits()
    finally:
        CosineSelfAttention.qkv_bias = plain_bias
    assert len(bias_calls) == len(transformer.blocks)
    labels = torch.tensor([1, 2, 3, 4])
    teacher_input = torch.cat(scale_inputs[1:], dim=1)
    with torch.no_grad():
        chained = transformer(labels, teacher_input, drop_labels=False).logits
    with torch.enable_grad():  # with autograd the blocks run as they are (training)
        plain = transformer(labels, teacher_input, drop_labels=False).logits
    torch.testing.assert_close(chained, plain.detach(), rtol=1e-5, atol=1e-5)

    # a prefill (CoDe's refiner: the first scales in one block-causal pass into the cache), then decoding
    prefill_scales = 2
    cache = transformer.init_kv_cache()
    with torch.no_grad():
        prefill = transformer.prefill_scale(condition, cache, torch.cat(scale_inputs[1:prefill_scales], dim=1))
        rest = [transformer.forward_scale(si, condition, cache, scale_inputs[si]) for si in range(prefill_scales, 4)]
    torch.testing.assert_close(prefill, torch.cat(eager[:prefill_scales], dim=1), rtol=1e-5, atol=1e-5)
    for compiled, reference in zip(rest, eager[prefill_scales:]):
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)

    # chained, with the KV cache's own copies instead of the projection piece's writes: switched off, or from the
    # rows on where the pieces compiled with dynamic rows stop writing (LARGE_SCALE_MIN_ROWS; here moved to 9 rows)
    writes = []  # token rows of every projection piece that wrote into the cache
    for block in transformer.blocks:
        project = block.compiled_project_into_cache
        block.compiled_project_into_cache = lambda h, *a, project=project: (
            writes.append(h.shape[0] * h.shape[1]) or (project(h, *a))
        )
    all_logits()
    assert writes == [4 * (e - b) for b, e in transformer.begin_ends for _ in transformer.blocks]
    assert transformer._run_block_stack.keywords == {"write_below": fast_inference.LARGE_SCALE_MIN_ROWS}
    dynamic_stack = transformer._run_block_stack
    transformer._run_block_stack = types.MethodType(
        functools.partial(fast_inference._chained_block_stack, write_below=9), transformer
    )
    writes.clear()
    for compiled, reference in zip(all_logits(), eager):
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    assert writes == [4, 4]  # the first scale only (4 rows); the others through the cache's copies
    transformer._run_block_stack = dynamic_stack
    monkeypatch.setattr(fast_inference, "KV_WRITES_IN_PIECE", False)
    tail_calls.clear()
    writes.clear()
    for compiled, reference in zip(all_logits(), eager):
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    assert len(tail_calls) == len(scale_inputs) * (len(transformer.blocks) - 1) and writes == []
    monkeypatch.setattr(fast_inference, "KV_WRITES_IN_PIECE", True)

    # a hook on a block still runs (the blocks run one by one), and so does the switch
    tail_calls.clear()
    hook = transformer.blocks[1].register_forward_hook(lambda module, args, output: output * 0)
    hooked = all_logits()
    hook.remove()
    assert tail_calls == [] and (hooked[-1] - eager[-1]).abs().max() > 1e-2
    monkeypatch.setattr(fast_inference, "CHAIN_VAR_BLOCKS", False)
    for compiled, reference in zip(all_logits(), eager):
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    assert tail_calls == []
    with pytest.raises(ValueError, match="compile_blocks"):
        pipe.enable_fast_inference(compile_blocks="yes")


@pytest.mark.parametrize("shapes", ["static", "static-tokens"])
def test_var_blocks_compiled_per_shape_generate_what_the_eager_blocks_do(monkeypatch, caplog, shapes):
    """``compile_blocks="static"`` / ``"static-tokens"`` compile the block pieces for every scale instead of once with
    dynamic rows; "static" also for every batch size, "static-tokens" keeps the batch dynamic. Dynamo's recompile
    limit is raised so that they all stay compiled, and in float32 the logits are the eager ones at every scale and
    batch size. Static pieces write keys and values into the cache at every scale (dynamic ones below the large
    scales' rows). An unknown value is refused by name; compiling again with other shapes keeps the first and warns."""
    transformer = _perturbed_var_transformer()

    def all_logits(batch):
        condition = (torch.arange(batch) % 11,)
        generator = torch.Generator().manual_seed(batch)
        scale_inputs = [None] + [
            torch.randn(batch, e - b, transformer.config.latent_channels, generator=generator)
            for b, e in transformer.begin_ends[1:]
        ]
        cache = transformer.init_kv_cache()
        with torch.no_grad():
            return [transformer.forward_scale(si, condition, cache, x) for si, x in enumerate(scale_inputs)]

    eager = {batch: all_logits(batch) for batch in (4, 6)}
    pipe = VARPipeline(transformer=transformer, vqvae=MultiScaleVQModel(patch_nums=(1, 2, 3, 4)).eval())
    assert tuple(fast_inference._DYNAMIC_DIMS) == COMPILE_BLOCKS_SHAPES  # the command-line flags' choices
    for wrong in ("per-scale", "Static", 1, ["static"], None):
        with pytest.raises(ValueError, match="`compile_blocks` must be True, False or one of 'dynamic'"):
            pipe.enable_fast_inference(dtype=torch.float32, compile_blocks=wrong)
    assert "compiled_attention_inputs" not in transformer.blocks[0].__dict__  # refused before anything changed
    with torch._dynamo.config.patch(recompile_limit=4):  # below the traces "static" makes: the raise must happen
        pipe.enable_fast_inference(dtype=torch.float32, compile_blocks=shapes)
        assert transformer._run_block_stack.func.__name__ == "_chained_block_stack"
        assert transformer._run_block_stack.keywords == {"write_below": None}
        fast_inference._warn_compiled_before.cache_clear()
        monkeypatch.setattr(fast_inference.logger, "propagate", True)
        with caplog.at_level("WARNING"):  # compiled before: pieces and write rule stay, and a warning says so
            fast_inference.compile_adaln_blocks_(transformer, True)
        assert transformer._run_block_stack.keywords == {"write_below": None}
        assert [r.getMessage() for r in caplog.records if "compiled before" in r.getMessage()] == [
            f"`compile_blocks='dynamic'`: the blocks were compiled before for {shapes!r} shapes (a transformer shared "
            "through `from_pipe`, or enabled twice) and keep them; reload the pipeline to compile them anew."
        ]
        assert torch._dynamo.config.recompile_limit == fast_inference.STATIC_RECOMPILE_LIMIT
        traces = []
        for batch in (4, 6):  # the first batch size traces every scale; the second again only with "static"
            results = []
            piece = transformer.blocks[0].compiled_block_tail
            traces.append(_new_cache_entries(piece, lambda batch=batch: results.extend(all_logits(batch))))
            for compiled, reference in zip(results, eager[batch], strict=True):
                torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    scales = len(transformer.begin_ends)  # dynamic rows trace one or two in all
    assert traces == [scales, scales if shapes == "static" else 0]


def _perturbed_star_pipe(quirk: bool):
    """A tiny STAR pipeline whose weights are perturbed so that the blocks matter (fresh ones barely do)."""
    pipe = make_pipe(quirk=quirk)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for parameter in pipe.transformer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return pipe


@pytest.mark.parametrize("quirk", [False, True])
def test_star_compiled_blocks_generate_what_the_eager_blocks_do(quirk):
    """STAR's blocks (main and stable sampler) with their elementwise work compiled: in float32 greedy generation
    gives the eager tokens and model logits at every scale, with the released checkpoints' cross-attention quirk too
    (weights perturbed so the blocks matter). Compiling twice leaves the blocks as they are."""
    pipe = _perturbed_star_pipe(quirk)

    def run():
        seen = []

        def keep(p, si, hw, tensors):
            seen.append((tensors["tokens"].clone(), tensors["model_logits"].clone()))
            return {}

        pipe(
            prompt=["a red cat", "the city"],
            top_k=1,
            generator=torch.Generator().manual_seed(0),
            sampler_generator=torch.Generator().manual_seed(1),
            output_type="latent",
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=["tokens", "model_logits"],
        )
        return seen

    eager = run()
    pipe.enable_fast_inference(dtype=torch.float32, compile_blocks=True)
    blocks = [m for m in pipe.transformer.modules() if isinstance(m, STARBlock)]
    assert len(blocks) > len(pipe.transformer.blocks)  # the stable sampler's blocks too
    compiled = [block.compiled_ffn_residual for block in blocks]
    assert all(hasattr(piece, "_torchdynamo_orig_callable") for piece in compiled)
    assert fast_inference.compile_star_blocks_(pipe.transformer) == len(blocks)
    assert [block.compiled_ffn_residual for block in blocks] == compiled
    for (tokens, logits), (eager_tokens, eager_logits) in zip(run(), eager, strict=True):
        assert torch.equal(tokens, eager_tokens)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compile_blocks", [True, "static"])
def test_infinity_compiled_blocks_generate_what_the_eager_blocks_do(monkeypatch, compile_blocks):
    """The same for Infinity, whose compiled pieces also hold the 2-D RoPE and the cross-attention query /
    residual: float32 logits of every scale equal the eager ones (weights perturbed so the blocks matter), with the
    pieces compiled once for all shapes or for each scale. The projection piece writes the keys and values into the
    KV cache itself (the cache's copies from the large scales' rows on with dynamic shapes, or with
    ``KV_WRITES_IN_PIECE`` off: the same logits)."""
    pipe = tiny_pipeline()
    transformer = pipe.transformer
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    embeds, mask, _, _ = pipe.encode_prompt([PROMPT, "a cat"], "cpu", 1, False)
    mask[1, -1] = False  # a padded position: the cross-attention mask must still be honoured
    condition = (embeds, mask, torch.tensor([False, True]))  # row 1: the learned unconditional text
    schedule = [(1, 1), (2, 2), (4, 4)]
    bits = transformer.config.bits_per_token
    scale_inputs = [None] + [torch.randn(2, h * w, bits) for h, w in schedule[1:]]

    def all_logits():
        cache = transformer.init_kv_cache(schedule)
        with torch.no_grad():
            return [transformer.forward_scale(si, condition, cache, x) for si, x in enumerate(scale_inputs)]

    eager = all_logits()
    blocks = list(transformer.blocks)
    transformer.blocks = torch.nn.ModuleList()
    assert (all_logits()[-1] - eager[-1]).abs().max() > 1e-2
    transformer.blocks = torch.nn.ModuleList(blocks)

    pipe.enable_fast_inference(dtype=torch.float32, compile_blocks=compile_blocks)
    assert all(
        hasattr(block.compiled_cross_attention_query, "_torchdynamo_orig_callable") for block in transformer.blocks
    )
    results = []
    traces = _new_cache_entries(
        transformer.blocks[0].compiled_attention_inputs_into_cache, lambda: results.extend(all_logits())
    )
    for compiled, reference in zip(results, eager, strict=True):
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    if compile_blocks == "static":
        assert traces == len(schedule)  # one per scale
    else:
        assert 1 <= traces <= 3  # the first call, the second start position, then dynamic

    def rows_of(piece_name):  # token rows of every call of one piece, across the blocks
        calls = []
        for block in transformer.blocks:
            piece = getattr(block, piece_name)
            monkeypatch.setattr(block, piece_name, lambda x, *a, piece=piece: calls.append(x.shape[1]) or piece(x, *a))
        return calls

    writes, copies = rows_of("compiled_attention_inputs_into_cache"), rows_of("compiled_attention_inputs")
    depth = len(transformer.blocks)
    monkeypatch.setattr(fast_inference, "LARGE_SCALE_MIN_ROWS", 2 * 16)  # 2 rows of 16 tokens: the last scale copies
    for compiled, reference in zip(all_logits(), eager, strict=True):
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    if compile_blocks == "static":  # static shapes write at every scale
        assert writes == [h * w for h, w in schedule for _ in range(depth)] and copies == []
    else:
        assert writes == [h * w for h, w in schedule[:2] for _ in range(depth)] and copies == [16] * depth
    writes.clear(), copies.clear()
    monkeypatch.setattr(fast_inference, "KV_WRITES_IN_PIECE", False)
    for compiled, reference in zip(all_logits(), eager, strict=True):
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    assert writes == [] and copies == [h * w for h, w in schedule for _ in range(depth)]
    with pytest.raises(ValueError, match="compile_blocks"):
        pipe.enable_fast_inference(compile_blocks=1)


def test_compiled_pieces_trace_each_row_regime_in_its_own_copy():
    """A compiled piece is two copies with their own code objects (dynamo's compiled code and guards live per code
    object): calls below ``LARGE_SCALE_MIN_ROWS`` token rows (batch x tokens) go to one, calls from it on to the
    other, so the row threshold of the fused GELU and float8 never becomes a guard that piles up recompiles."""
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list

    def piece(block, x_BLC, shift_B1C, *, scale=2):
        return x_BLC * scale + shift_B1C + block.bias

    block = torch.nn.Module()
    block.bias = torch.nn.Parameter(torch.randn(8))
    below, above = fast_inference._row_regime_copies(piece)
    assert fast_inference._row_regime_copies(piece) == (below, above)  # one pair per function, shared by blocks
    assert len({piece.__code__, below.__code__, above.__code__}) == 3
    assert below.__kwdefaults__ == {"scale": 2} and below.__qualname__ != above.__qualname__
    compiled = fast_inference._dynamic_rows(*(torch.compile(types.MethodType(c, block)) for c in (below, above)))
    assert hasattr(compiled, "_torchdynamo_orig_callable")
    went = []
    spies = (
        lambda *a, regime=regime, fn=fn: went.append(regime) or fn(*a)
        for regime, fn in (("below", compiled.below), ("above", compiled.above))
    )
    call = fast_inference._dynamic_rows(*spies)
    split = fast_inference.LARGE_SCALE_MIN_ROWS
    shapes = [(2, 1), (2, 5), (4, 9), (2, split // 2 - 1), (2, split // 2), (4, split // 2 + 3), (1, 7), (3, 11)]
    for batch, tokens in shapes:
        x, shift = torch.randn(batch, tokens, 8), torch.randn(batch, 1, 8)
        torch.testing.assert_close(call(x, shift), x * 2 + shift + block.bias.detach())
    assert went == ["above" if batch * tokens >= split else "below" for batch, tokens in shapes]
    assert not entries(piece.__code__)
    assert 1 <= len(entries(above.__code__)) <= 2 and 1 <= len(entries(below.__code__)) <= 3  # no recompile per size


def test_compiled_pieces_take_per_token_tables_dynamic_from_the_first_call():
    """The (L, P) RoPE tables passed beside a (B, L, C) stream have their token dimension marked dynamic with it: a
    piece traced at one token count serves the next without a recompile (the tables stayed static and guarded the
    count: Infinity-2B recompiled its attention inputs at 4,096 tokens after tracing them at 2,304). The eager
    backend: only the tracing is checked."""
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list

    def piece(block, x_BLC, table_LC):
        return x_BLC * block.scale + table_LC

    block = torch.nn.Module()
    block.scale = torch.nn.Parameter(torch.randn(8))
    below, above = fast_inference._row_regime_copies(piece)
    compiled = fast_inference._dynamic_rows(
        *(torch.compile(types.MethodType(c, block), backend="eager") for c in (below, above))
    )
    split = fast_inference.LARGE_SCALE_MIN_ROWS
    for tokens in (split // 2, split // 2 + 5, split):  # batch 2: every call in the "above" regime
        x, table = torch.randn(2, tokens, 8), torch.randn(tokens, 8)
        torch.testing.assert_close(compiled(x, table), x * block.scale.detach() + table)
    assert len(entries(above.__code__)) == 1 and not entries(below.__code__)


def _star_model_logits(pipe) -> list[torch.Tensor]:
    """The model logits of every scale of one greedy two-prompt STAR generation."""
    seen = []
    pipe(
        prompt=["a red cat", "the city"],
        top_k=1,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=lambda p, si, hw, t: seen.append(t["model_logits"].clone()) or {},
        callback_on_step_end_tensor_inputs=["model_logits"],
    )
    return seen


def test_star_compiled_blocks_step_aside_where_they_are_not_trusted(monkeypatch, caplog):
    """Where STAR's compiled pieces may not run (on CUDA with ``STAR_COMPILED_BLOCKS_ON_CUDA`` off; forced here on
    the CPU), a compiled block runs its own forward instead: the eager logits exactly, no compiled piece called,
    and one warning that names ``compile_blocks``."""
    pipe = _perturbed_star_pipe(quirk=True)

    eager = _star_model_logits(pipe)
    pipe.enable_fast_inference(dtype=torch.float32, compile_blocks=True)
    calls = []
    for block in pipe.transformer.blocks:
        piece = block.compiled_ffn_residual
        block.compiled_ffn_residual = lambda x, piece=piece: calls.append(1) or piece(x)
    assert fast_inference.star_compiled_pieces_run(torch.zeros(1, 2, 3))  # the CPU runs them
    monkeypatch.setattr(fast_inference, "star_compiled_pieces_run", lambda x_BLC: False)
    fast_inference._warn_star_blocks_uncompiled.cache_clear()
    monkeypatch.setattr(fast_inference.logger, "propagate", True)
    with caplog.at_level("WARNING"):
        stepped_aside = _star_model_logits(pipe)
    assert calls == []
    for got, reference in zip(stepped_aside, eager, strict=True):
        torch.testing.assert_close(got, reference, rtol=0, atol=0)
    warnings = [r.getMessage() for r in caplog.records if "compile_blocks" in r.getMessage()]
    assert len(warnings) == 1 and "CUDA" in warnings[0]
    monkeypatch.undo()
    fast_inference._warn_star_blocks_uncompiled.cache_clear()
    assert len(_star_model_logits(pipe)) == len(eager) and len(calls) == len(pipe.transformer.blocks) * len(eager)


def test_star_cross_attention_query_runs_uncompiled_where_it_is_not_trusted(monkeypatch):
    """Where the compiled cross-attention query may not run (on CUDA with ``STAR_COMPILED_CROSS_QUERY_ON_CUDA`` off;
    forced here on the CPU), the blocks run its plain code and every other piece compiled: in float32 the logits of
    the eager path within float32 reordering noise."""
    pipe = _perturbed_star_pipe(quirk=True)

    eager = _star_model_logits(pipe)
    pipe.enable_fast_inference(dtype=torch.float32, compile_blocks=True)
    calls = {"query": 0, "output": 0}
    for block in pipe.transformer.blocks:
        for name, piece_name in (
            ("query", "compiled_cross_attention_query"),
            ("output", "compiled_cross_attention_output"),
        ):
            piece = getattr(block, piece_name)
            setattr(
                block,
                piece_name,
                lambda *a, piece=piece, name=name: calls.__setitem__(name, calls[name] + 1) or piece(*a),
            )
    assert fast_inference.star_compiled_query_runs(torch.zeros(1, 2, 3))  # the CPU runs it compiled
    on_cuda = types.SimpleNamespace(is_cuda=True)  # shipped: blocks and query compiled on CUDA (session 29)
    assert fast_inference.star_compiled_pieces_run(on_cuda) and fast_inference.star_compiled_query_runs(on_cuda)
    monkeypatch.setattr(fast_inference, "STAR_COMPILED_CROSS_QUERY_ON_CUDA", False)
    assert not fast_inference.star_compiled_query_runs(on_cuda) and fast_inference.star_compiled_pieces_run(on_cuda)
    monkeypatch.setattr(fast_inference, "star_compiled_query_runs", lambda rows_BLC: False)
    plain_query = _star_model_logits(pipe)
    scales_run = len(pipe.transformer.blocks) * len(eager)
    assert calls == {"query": 0, "output": scales_run}
    for got, reference in zip(plain_query, eager, strict=True):
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 13])
def test_separable_bicubic_upsampling_equals_the_fused_kernel(size):
    from diffusers_var.models.multiscale_vq import bicubic_up

    x = torch.randn(3, 4, size, size, generator=torch.Generator().manual_seed(size))
    fused, separable = bicubic_up(x, 16), fast_inference.separable_bicubic_up(x, 16)
    assert separable.shape == fused.shape == (3, 4, 16, 16)
    torch.testing.assert_close(separable, fused, rtol=0, atol=2e-6)


def test_padded_narrow_convs_keep_outputs_and_parameter_names():
    conv_rgb, conv_wide = torch.nn.Conv2d(16, 3, 3, 1, 1), torch.nn.Conv2d(3, 16, 3, 1, 1)
    model = torch.nn.Sequential(conv_wide, conv_rgb)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
        names = list(model.state_dict())
        assert fast_inference.pad_narrow_convs_(model) == 2  # 3 and 16 output channels: both under 32
        torch.testing.assert_close(model(x), reference, rtol=1e-6, atol=1e-6)
    assert list(model.state_dict()) == names and model[1].weight.shape == (3, 16, 3, 3)


def _tiny_decoder(family: str) -> torch.nn.Module:
    """A small image decoder of ``family`` (VAR / STAR's, or Infinity's), seeded."""
    from diffusers_var.models.bitwise_vae import BitwiseDecoder
    from diffusers_var.models.multiscale_vq import Decoder

    torch.manual_seed(0)
    if family == "var":
        return Decoder(3, 32, (1, 1, 2), num_res_blocks=1, z_channels=8, dropout=0.0, using_sa=True, using_mid_sa=True)
    return BitwiseDecoder(8, 32, (1, 1, 2), num_res_blocks=1, out_channels=3)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("family", ["var", "infinity"])
def test_subpixel_upsampling_equals_nearest_upsampling_and_conv(family, channels_last):
    """The decoder with its upsamplers in sub-pixel form gives the decoder's output (float32, both layouts, odd and
    even sides), keeps its parameter names, and is given back its own upsamplers."""
    decoder = _tiny_decoder(family)
    for module in decoder.modules():  # upsampler biases are zero at init: make them count
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.bias, std=0.5)
    decoder.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    decoder.to(memory_format=memory_format)
    z = torch.randn(2, 8, 5, 6).contiguous(memory_format=memory_format)
    names = list(decoder.state_dict())
    with torch.no_grad():
        reference = decoder(z)
        assert fast_inference.subpixel_upsample_(decoder) == 2
        subpixel = decoder(z)
        assert fast_inference.subpixel_upsample_(decoder, enabled=False) == 2
        restored = decoder(z)
    assert subpixel.shape == reference.shape == (2, 3, 20, 24)
    torch.testing.assert_close(subpixel, reference, rtol=1e-5, atol=1e-5)
    assert subpixel.is_contiguous(memory_format=memory_format)
    assert torch.equal(restored, reference) and list(decoder.state_dict()) == names


@pytest.mark.parametrize("family", ["var", "infinity"])
def test_channel_sum_group_norm_equals_group_norm(family):
    """The decoders' GroupNorm with statistics from per-channel sums (compiled decoders, from
    ``CHANNEL_SUM_GROUP_NORM_MIN_BATCH`` images on) gives the decoder's output in float32, also for groups far from
    zero (where a plain E[x^2] - E[x]^2 would cancel), compiled and channels-last as the fast path runs it; below the
    threshold it is GroupNorm itself; removed, the norms are their own again."""
    decoder = _tiny_decoder(family)
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    for norm in norms:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    decoder.eval().to(memory_format=torch.channels_last)
    z = torch.randn(3, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    far = torch.randn(3, norms[0].num_channels, 7, 5) * 0.5 + 1e3  # every group far from zero
    with torch.no_grad():
        reference, far_reference = decoder(z), norms[0](far)
        assert fast_inference.channel_sum_group_norm_(decoder, min_batch=3) == len(norms)
        summed, far_summed = decoder(z), norms[0](far)
        compiled = torch.compile(decoder)(z)
        below = decoder(z[:2])  # two images: under the threshold, GroupNorm's own kernel
        assert fast_inference.channel_sum_group_norm_(decoder, enabled=False) == len(norms)
        restored = decoder(z)
        below_reference = decoder(z[:2])
    torch.testing.assert_close(summed, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(far_summed, far_reference, rtol=1e-3, atol=1e-3)
    assert torch.equal(below, below_reference) and torch.equal(restored, reference)
    assert all(type(norm) is torch.nn.GroupNorm for norm in norms)


def test_channel_sum_group_norm_takes_the_sums_on_large_maps_at_any_batch(monkeypatch):
    """Below ``min_batch`` images the norm takes the per-channel sums on maps of at least
    ``CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS`` positions (one 1024 px image's largest maps) and GroupNorm's own kernel on
    smaller maps; with the threshold off (None), GroupNorm on every map."""
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    small, large = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 8, 8) + 3.0
    with torch.no_grad():
        large_reference = norm(large)
    plain_calls = []
    group_norm = torch.nn.functional.group_norm

    def counted(x, *args, **kwargs):
        plain_calls.append(tuple(x.shape))
        return group_norm(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "group_norm", counted)
    monkeypatch.setattr(fast_inference, "CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS", 8 * 8)
    assert fast_inference.channel_sum_group_norm_(norm, min_batch=16) == 1
    with torch.no_grad():
        norm(small)
        summed = norm(large)
        assert plain_calls == [(1, 8, 4, 4)]
        monkeypatch.setattr(fast_inference, "CHANNEL_SUM_GROUP_NORM_MIN_POSITIONS", None)
        norm(large)
    assert plain_calls == [(1, 8, 4, 4), (1, 8, 8, 8)]
    torch.testing.assert_close(summed, large_reference, rtol=1e-5, atol=1e-5)


def test_float8_row_threshold(monkeypatch):
    """``uses_fp8`` takes float8 from ``FP8_MIN_ROWS`` token rows (below ``LARGE_SCALE_MIN_ROWS``), eagerly and in a
    trace with dynamic rows (one more trace there), from ``LARGE_SCALE_MIN_ROWS`` when it is None or when
    ``LARGE_SCALE_MIN_ROWS`` is lower; never with autograd on or without float8 weights."""
    low, high = fast_inference.FP8_MIN_ROWS, fast_inference.LARGE_SCALE_MIN_ROWS
    assert low is not None and low < high
    linear = torch.nn.Linear(16, 16)
    assert not fast_inference.uses_fp8(linear, torch.zeros(high, 16))  # no float8 weights
    linear.register_buffer("weight_fp8", torch.zeros(16, 16), persistent=False)
    with torch.no_grad():
        assert [fast_inference.uses_fp8(linear, torch.zeros(rows, 16)) for rows in (low - 1, low, high)] == [
            False,
            True,
            True,
        ]

        def sign(x):
            return x[0, 0] + 1 if fast_inference.uses_fp8(linear, x) else x[0, 0] - 1

        torch._dynamo.reset()
        traced = torch.compile(sign, dynamic=True, backend="eager")
        assert [traced(torch.zeros(rows, 16)).item() for rows in (low - 1, low, low + 1, high)] == [-1, 1, 1, 1]
    assert not fast_inference.uses_fp8(linear, torch.zeros(high, 16))  # autograd on
    monkeypatch.setattr(fast_inference, "FP8_MIN_ROWS", None)
    with torch.no_grad():
        assert not fast_inference.uses_fp8(linear, torch.zeros(low, 16))
        assert fast_inference.uses_fp8(linear, torch.zeros(high, 16))


def test_compiled_decoders_take_channel_sum_group_norm():
    """``compile_decoder`` installs the per-channel-sum GroupNorm (from 16 images) on the compiled decoder only."""
    from tiny_components import var_components

    pipe = VARPipeline(**var_components(seed=0))
    pipe.enable_fast_inference(dtype=torch.float32, cuda_graphs=False, compile_decoder=True)
    norms = [m for m in pipe.vqvae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    kinds = {type(norm).__dict__.get("_fast_path_kernel") for norm in norms}
    assert kinds and all(key is not None and key[2] is fast_inference._channel_sum_group_norm_forward for key in kinds)
    assert {key[3] for key in kinds} == {(fast_inference.CHANNEL_SUM_GROUP_NORM_MIN_BATCH,)}


def test_subpixel_weights_fold_the_kernel_into_each_phase():
    """One output channel, one input channel: each phase's 2x2 kernel sums the 3x3 taps that read the same small-map
    pixel (even rows: k0 | k1 + k2; odd rows: k0 + k1 | k2; the same along columns)."""
    weight = torch.arange(9.0).view(1, 1, 3, 3)
    phases = fast_inference.subpixel_weights(weight).view(2, 2, 2, 2)
    k = weight[0, 0]
    assert torch.equal(
        phases[0, 0],
        torch.stack([torch.stack([k[0, 0], k[0, 1] + k[0, 2]]), torch.stack([k[1:, 0].sum(), k[1:, 1:].sum()])]),
    )
    assert torch.equal(
        phases[1, 1],
        torch.stack([torch.stack([k[:2, :2].sum(), k[:2, 2].sum()]), torch.stack([k[2, :2].sum(), k[2, 2]])]),
    )
    assert phases.sum(dim=(-1, -2)).eq(weight.sum()).all()  # every phase keeps all nine taps


def test_installed_kernels_follow_the_fast_inference_dtype():
    """The fused FFN GELU and the separable upsampling are bf16 / fp16 shortcuts, installed on the module instances
    from outside: float32 fast inference and ``disable_fast_inference`` give the classes' own methods back."""
    from diffusers_var.models.blocks import FeedForward
    from diffusers_var.models.multiscale_vq import MultiScaleResidualQuantizer

    torch.manual_seed(0)
    transformer = VARTransformer2DModel(depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2), num_classes=4)
    pipe = VARPipeline(transformer=transformer, vqvae=MultiScaleVQModel(patch_nums=(1, 2)).eval())

    def installed():
        ffns = {type(m) is not FeedForward for m in transformer.modules() if isinstance(m, FeedForward)}
        return ffns | {type(pipe.vqvae.quantize) is not MultiScaleResidualQuantizer}

    assert installed() == {False}
    pipe.enable_fast_inference(dtype=torch.bfloat16)
    assert installed() == {True}
    pipe.enable_fast_inference(dtype=torch.float32)
    assert installed() == {False}
    pipe.enable_fast_inference(dtype=torch.float16)
    pipe.disable_fast_inference()
    assert installed() == {False}


def test_a_kernel_is_one_class_shared_by_every_module_and_removable_alone():
    """torch.compile guards on the method a compiled block calls: every feed-forward with the fused GELU must call the
    same one (a per-instance method made each of 30 blocks compile its own graph). Removing one kernel keeps the
    others, and the parameters, names and state dict never change."""
    from diffusers_var.models.blocks import FeedForward

    torch.manual_seed(0)
    transformer = VARTransformer2DModel(depth=3, embed_dim=32, num_heads=2, patch_nums=(1, 2), num_classes=4)
    names = list(transformer.state_dict())
    assert fast_inference.fuse_ffn_gelu_(transformer) == 3
    ffns = [m for m in transformer.modules() if isinstance(m, FeedForward)]
    assert len({type(m) for m in ffns}) == 1 and type(ffns[0]) is not FeedForward
    assert type(ffns[0]).__name__ == "FeedForward" and "forward" not in ffns[0].__dict__
    linear = ffns[0].fc1
    fast_inference._install(linear, "extra_repr", lambda module: "first")
    fast_inference._install(linear, "forward", lambda module, x, scale: x * scale, 2.0)
    fast_inference._install(linear, "forward", lambda module, x, scale: x * scale, 3.0)  # replaces the first
    assert type(linear).__bases__[0].__bases__[0] is torch.nn.Linear  # two kernels, two levels
    assert linear.extra_repr() == "first" and torch.equal(linear(torch.ones(2)), torch.full((2,), 3.0))
    fast_inference._uninstall(linear, "extra_repr")
    assert linear.extra_repr() != "first" and torch.equal(linear(torch.ones(2)), torch.full((2,), 3.0))
    fast_inference._uninstall(linear, "forward")
    assert type(linear) is torch.nn.Linear
    fast_inference.fuse_ffn_gelu_(transformer, enabled=False)
    assert {type(m) for m in ffns} == {FeedForward} and list(transformer.state_dict()) == names


def test_compiled_blocks_with_kernels_share_one_graph(monkeypatch):
    """Twelve blocks with the fused-GELU kernel and compiled residual branches trace one graph, not one per block
    (dynamo's recompile limit is 8: past it a block runs eager), although each has its own stochastic-depth rate
    (identity at inference: the rate must not become a guard). The eager backend: only the tracing is checked."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(fast_inference, "LARGE_SCALE_MIN_ROWS", 0)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    transformer = VARTransformer2DModel(
        depth=12, embed_dim=32, num_heads=2, patch_nums=(1, 2), num_classes=4, drop_path_rate=0.1
    ).eval()
    assert len({block.drop_path.rate for block in transformer.blocks}) == 12
    fast_inference.fuse_ffn_gelu_(transformer)
    assert fast_inference.compile_adaln_blocks_(transformer) == 12
    compiled = [block.ffn_residual for block in transformer.blocks]
    fast_inference.compile_adaln_blocks_(transformer)  # again (a shared transformer): the blocks stay as they are
    assert [block.ffn_residual for block in transformer.blocks] == compiled
    x_BLC, modulation = torch.randn(2, 5, 32), torch.randn(2, 1, 32)
    with torch.no_grad():
        for block in transformer.blocks:
            x_BLC = block.ffn_residual(x_BLC, modulation, modulation, modulation)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("compile_blocks", [True, "static-tokens"])
@pytest.mark.parametrize("family", ["var", "infinity", "star"])
def test_compiled_blocks_trace_no_new_graph_for_another_batch_size(family, compile_blocks, monkeypatch):
    """The compiled block pieces are dynamic in the batch (and, with ``compile_blocks=True``, the token count) from
    their first call: after a generation at one batch size, generations at others trace nothing new (each new graph
    costs seconds of compiling on a GPU, and past dynamo's recompile limit a piece runs eager). The eager backend: only
    the tracing is checked."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    from tiny_components import var_components

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    if family == "var":
        pipe = VARPipeline(**var_components(seed=0))
        pipe.set_progress_bar_config(disable=True)
        run = lambda batch: pipe(class_labels=[1] * batch, output_type="latent")  # noqa: E731
    elif family == "infinity":
        pipe = tiny_pipeline()
        run = lambda batch: pipe(prompt=[PROMPT] * batch, height=32, width=32, output_type="latent")  # noqa: E731
    else:
        pipe = make_pipe()
        pipe.set_progress_bar_config(disable=True)
        run = lambda batch: pipe(prompt=["a red cat"] * batch, output_type="latent")  # noqa: E731
    pipe.enable_fast_inference(dtype=torch.bfloat16, compile_blocks=compile_blocks)
    block = pipe.transformer.blocks[0]
    # the projection piece that writes into the KV cache, traced again for the cache's start position (0, 1: dynamo
    # specialises them) before it goes dynamic
    piece, dynamic_traces = (
        (block.compiled_block_tail, 2) if family == "var" else (block.compiled_attention_inputs_into_cache, 3)
    )
    traces = _new_cache_entries(piece, lambda: run(1))
    # per scale with "static-tokens" (every tiny schedule has at least three), else the first call, then dynamic
    assert traces >= 3 if compile_blocks == "static-tokens" else 1 <= traces <= dynamic_traces
    first = counters["stats"]["unique_graphs"]
    for batch in (4, 2, 3):
        run(batch)
    assert first > 0 and counters["stats"]["unique_graphs"] == first
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "compile_decoder, mode",
    [
        (True, "default"),
        ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ],
)
def test_compile_decoder_takes_a_torch_compile_mode(monkeypatch, compile_decoder, mode):
    """``compile_decoder=True`` compiles the decoder in the default mode, a mode name in that mode (every family)."""
    from tiny_components import var_components

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: calls.append((module, kwargs)))
    var, star, infinity = VARPipeline(**var_components(seed=0)), make_pipe(), tiny_pipeline()
    for pipe, decoder in ((var, var.vqvae.decoder), (star, star.vqvae.decoder), (infinity, infinity.vae.decoder)):
        calls.clear()
        pipe.enable_fast_inference(dtype=torch.float32, compile_decoder=compile_decoder)
        assert calls == [(decoder, {"mode": mode})]


def test_compiled_decoder_traces_three_graphs_for_any_number_of_batch_sizes(monkeypatch):
    """The compiled decoder keeps kernels specialised on the first batch size; the second makes the batch dimension
    dynamic (the convolutions' layout rule splits it at 16: one more graph, which is also where GroupNorm starts to
    take its statistics as per-channel sums), and later sizes trace nothing (one graph per size reached dynamo's
    recompile limit (8) at the ninth size, which then decoded eagerly). The eager backend: only the tracing is
    checked."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    from tiny_components import var_components

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    vqvae = var_components(seed=0)["vqvae"]
    fast_inference.cast_decoder_((vqvae.decoder, vqvae.post_quant_conv), torch.float32, vqvae.decoder)
    graphs = []
    with torch.no_grad():
        for batch in (1, 4, 16, 2, 3, 5, 6, 7, 8, 9, 10, 32, 63, 64, 80, 65):
            image = vqvae.decoder(torch.randn(batch, 8, 4, 4).contiguous(memory_format=torch.channels_last))
            assert image.shape[0] == batch
            graphs.append(counters["stats"]["unique_graphs"])
    assert fast_inference.CHANNEL_SUM_GROUP_NORM_MIN_BATCH == 16
    assert graphs[:3] == [1, 2, 3] and graphs[3:] == [3] * 13
    torch._dynamo.reset()


def test_graph_set_keeps_what_its_step_writes_into_alive(monkeypatch):
    """A captured graph writes into the step's KV cache / buffers by address, so the graph set must keep the step (and
    what it closes over) alive; the cache used to be freed when the constructor returned. The warm-up's temporaries,
    cached for its side stream alone, are handed back before the capture (CUDA stand-ins here)."""
    import contextlib
    import gc
    import weakref

    events = []

    class Stand:
        def __init__(self, *args, **kwargs):
            pass

        wait_stream = register_generator_state = replay = lambda self, *args: None
        pool = lambda self: None  # noqa: E731
        synchronize = lambda self: events.append("synchronize")  # noqa: E731

    @contextlib.contextmanager
    def capture(graph, pool=None):
        events.append("capture")
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("CUDAGraph", "Stream"):
        monkeypatch.setattr(torch.cuda, name, Stand)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stand())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))

    class Cache:
        def __init__(self):
            self.storage = torch.zeros(4)

        def write(self, x):
            self.storage.copy_(x)
            return self.storage * 2

    def build():
        cache = Cache()
        graphs = fast_inference.CUDAGraphScaleSteps(lambda si, x: cache.write(x), [(torch.ones(4),)], lambda: None)
        return graphs, weakref.ref(cache)

    graphs, cache_ref = build()
    assert events == ["synchronize", "empty_cache", "capture"]
    gc.collect()
    assert cache_ref() is not None
    del graphs
    gc.collect()
    assert cache_ref() is None  # it was the graph set that kept it


def _perturbed_tiny_var(embed_dim=64, num_heads=2, mlp_ratio=4.0) -> VARPipeline:
    torch.manual_seed(0)
    transformer = VARTransformer2DModel(
        depth=2, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, patch_nums=(1, 2, 3, 4), num_classes=10
    )
    transformer.init_weights()
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return VARPipeline(transformer=transformer.eval(), vqvae=MultiScaleVQModel(patch_nums=(1, 2, 3, 4)).eval())


def test_float8_copies_follow_weights_changed_in_place(monkeypatch):
    """The float8 copies were made once: weights loaded while the fast path was on (``load_state_dict``, an optimizer
    step) left the float8 scales computing with the old ones, silently. They are remade at the next call."""
    monkeypatch.setattr(fast_inference, "LARGE_SCALE_MIN_ROWS", 1)  # float8 at every scale of the tiny model
    new_weights = _perturbed_tiny_var(embed_dim=64).transformer.state_dict()
    with torch.no_grad():
        for name, value in new_weights.items():
            if name.startswith("blocks.") and value.dim() == 2:
                value.mul_(-1.5)

    def latents(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="latent").images

    fresh = _perturbed_tiny_var()
    fresh.transformer.load_state_dict(new_weights)
    expected = latents(fresh.enable_fast_inference(fp8=True))
    pipe = _perturbed_tiny_var().enable_fast_inference(fp8=True)
    before = latents(pipe)
    pipe.transformer.load_state_dict(new_weights)
    assert fast_inference.fp8_copies_stale(pipe.transformer)
    assert torch.equal(latents(pipe), expected) and not torch.equal(before, expected)
    assert not fast_inference.fp8_copies_stale(pipe.transformer)


def _var_logits(transformer) -> list[torch.Tensor]:
    condition = (torch.tensor([1, 2, 10, 10]),)
    generator = torch.Generator().manual_seed(1)
    cache = transformer.init_kv_cache()
    dtype = transformer.pos_start.dtype
    with torch.no_grad():
        return [
            transformer.forward_scale(
                si,
                condition,
                cache,
                None
                if si == 0
                else torch.randn(4, e - b, transformer.config.latent_channels, generator=generator).to(dtype),
            )
            for si, (b, e) in enumerate(transformer.begin_ends)
        ]


def test_fp8_linears_quantize_the_block_matmuls_and_nothing_else(monkeypatch):
    """``enable_fast_inference(fp8=True)``: the attention and FFN matmuls of the blocks run in float8 where a scale has
    at least ``LARGE_SCALE_MIN_ROWS`` token rows (lowered here so the tiny model takes that path), close to the bf16
    logits but not equal to them; below the threshold nothing changes; ``state_dict`` keeps its keys, and
    ``disable_fast_inference`` drops the float8 copies. Bad values name the parameter."""
    pipe = _perturbed_tiny_var()
    transformer = pipe.transformer
    keys = set(transformer.state_dict())
    bf16 = _var_logits(pipe.enable_fast_inference().transformer)
    pipe.enable_fast_inference(fp8=True)
    assert sum(getattr(m, "weight_fp8", None) is not None for m in transformer.modules()) == 8  # 2 blocks x 4 linears
    for fp8, reference in zip(_var_logits(transformer), bf16):  # the tiny scales are far below 4,096 rows
        assert torch.equal(fp8, reference)

    quantized = []
    quantize = fast_inference.quantize_to_float8
    monkeypatch.setattr(fast_inference, "quantize_to_float8", lambda x: quantized.append(x.shape) or quantize(x))
    monkeypatch.setattr(fast_inference, "LARGE_SCALE_MIN_ROWS", 1)
    fp8 = _var_logits(transformer)
    assert len(quantized) == 4 * 8  # 4 scales x 2 blocks x 4 linears
    for got, reference in zip(fp8, bf16):
        error = (got - reference).norm() / reference.norm()
        assert 0 < error < 0.1, error.item()
    assert set(transformer.state_dict()) == keys

    pipe.disable_fast_inference()
    assert not any(getattr(m, "weight_fp8", None) is not None for m in transformer.modules())
    for case, match in (({"fp8": "yes"}, "`fp8`"), ({"fp8": True, "dtype": torch.float32}, "`fp8=True` needs")):
        with pytest.raises(ValueError, match=match):
            pipe.enable_fast_inference(**case)
    with pytest.raises(ValueError, match="divisible by 16"):
        _perturbed_tiny_var(embed_dim=40).enable_fast_inference(fp8=True)
    # attention widths fit, the FFN's (264) does not: refused before any linear gets float8 weights or a cast
    refused = _perturbed_tiny_var(mlp_ratio=4.125)
    with pytest.raises(ValueError, match="264"):
        refused.enable_fast_inference(fp8=True)
    assert not any(getattr(m, "weight_fp8", None) is not None for m in refused.transformer.modules())
    assert all(p.dtype == torch.float32 for p in refused.transformer.parameters())
    assert not refused._fast_inference


def _first_scale_logits_and_images(pipe, images):
    """The logits of the first scale (whose input does not depend on sampling) and the images of one generation."""
    seen = []
    handle = pipe.transformer.head.register_forward_hook(lambda m, i, out: seen.append(out.detach().float().clone()))
    try:
        result = images(pipe)
    finally:
        handle.remove()
    return seen[0], result


@pytest.mark.parametrize("family", ["star", "infinity"])
def test_text_to_image_fp8_runs_the_block_matmuls_in_float8(star, family, monkeypatch):
    """STAR and Infinity take ``fp8=True`` as VAR does: float8 weights for the attention and FFN linears of the blocks
    only (not the text projection, the cross-attention or STAR's stable sampler); below ``LARGE_SCALE_MIN_ROWS`` token
    rows the images are the bf16 path's; above it the logits move, but stay close; the state dict keeps its keys."""
    make, images = (lambda: own_star(star), star_images) if family == "star" else (tiny_pipeline, infinity_images)
    bf16_logits, bf16_images = _first_scale_logits_and_images(make().enable_fast_inference(), images)
    pipe = make()
    keys = set(pipe.transformer.state_dict())
    pipe.enable_fast_inference(fp8=True)
    transformer = pipe.transformer
    carrying = {
        name for name, module in transformer.named_modules() if getattr(module, "weight_fp8", None) is not None
    }
    leaves = ("attn.to_qkv", "attn.to_out", "ffn.fc1", "ffn.fc2")
    assert carrying == {f"blocks.{i}.{leaf}" for i in range(len(transformer.blocks)) for leaf in leaves}
    logits, fp8_images = _first_scale_logits_and_images(pipe, images)
    assert torch.equal(logits, bf16_logits) and torch.equal(fp8_images, bf16_images)  # tiny scales: all bf16

    quantized = []
    quantize = fast_inference.quantize_to_float8
    monkeypatch.setattr(fast_inference, "quantize_to_float8", lambda x: quantized.append(x.shape) or quantize(x))
    monkeypatch.setattr(fast_inference, "LARGE_SCALE_MIN_ROWS", 1)
    logits, fp8_images = _first_scale_logits_and_images(pipe, images)
    assert len(quantized) >= 4 * len(transformer.blocks)  # every block linear, at every scale
    error = (logits - bf16_logits).norm() / bf16_logits.norm()
    assert 0 < error < 0.1, error.item()
    assert fp8_images.shape == bf16_images.shape and torch.isfinite(fp8_images).all()
    assert set(transformer.state_dict()) == keys
    pipe.disable_fast_inference()
    assert not carrying & {n for n, m in transformer.named_modules() if getattr(m, "weight_fp8", None) is not None}


def test_fp8_rowwise_quantisation_round_trips():
    """Row-wise float8: each row's largest magnitude maps to 448 and the round trip stays within e4m3's precision
    (3 mantissa bits: relative step 1/8 at worst); an all-zero row stays zero instead of dividing by zero."""
    from diffusers_var.pipelines.fast_inference import FLOAT8_MAX, quantize_to_float8

    x = (
        torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
        * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]
    )
    x8, scale = quantize_to_float8(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    restored = x8.float() * scale
    assert torch.equal(x8[:4].float().abs().amax(dim=1), torch.full((4,), FLOAT8_MAX))
    assert torch.all((restored - x).abs() <= x.abs() / 16 + scale * 2**-9)
    assert torch.equal(restored[4], torch.zeros(64))


def test_use_compile_cache_picks_a_lasting_folder(tmp_path, monkeypatch):
    """The folder: the argument, else $DIFFUSERS_VAR_COMPILE_CACHE, else a TORCHINDUCTOR_CACHE_DIR already set, else
    ~/.cache/diffusers_var/torch_compile (under $XDG_CACHE_HOME); Inductor is pointed at it, a file is refused."""
    from diffusers_var import use_compile_cache

    for name in ("DIFFUSERS_VAR_COMPILE_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert use_compile_cache() == tmp_path / "xdg" / "diffusers_var" / "torch_compile"
    assert (tmp_path / "xdg" / "diffusers_var" / "torch_compile").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "diffusers_var" / "torch_compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "user_inductor"))
    assert use_compile_cache() == tmp_path / "user_inductor"
    monkeypatch.setenv("DIFFUSERS_VAR_COMPILE_CACHE", str(tmp_path / "env"))
    assert use_compile_cache() == tmp_path / "env"
    assert use_compile_cache(tmp_path / "given") == tmp_path / "given"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "given")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="`directory` must be a folder"):
        use_compile_cache(tmp_path / "a_file")
    with pytest.raises(ValueError, match="`directory` .* cannot be made"):  # a file where a parent should be
        use_compile_cache(tmp_path / "a_file" / "cache")
    with monkeypatch.context() as patched:  # a read-only or virtual file system (root ignores permission bits)
        patched.setattr(
            Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted"))
        )
        with pytest.raises(ValueError, match="`directory` .* cannot be made: Operation not permitted"):
            use_compile_cache(tmp_path / "elsewhere")  # a raw PermissionError before
    with pytest.raises(ValueError, match="`directory` must be a folder path"):
        use_compile_cache(123)
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_warm_compile_cache_turns_the_compile_worker_pool_off(tmp_path, monkeypatch):
    """A folder that already holds Inductor's compiled graphs made with this torch: one compile thread (no worker pool
    to start), unless TORCHINDUCTOR_COMPILE_THREADS is set; an empty folder, or graphs of another torch version,
    leave the setting alone."""
    import torch._inductor.config as inductor_config

    from diffusers_var import use_compile_cache
    from diffusers_var.pipelines.fast_inference import COMPILE_CACHE_TORCH_FILE

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "restored"))  # put back after the test
    with inductor_config.patch(compile_threads=4):  # (monkeypatch cannot restore a torch config option)
        use_compile_cache(tmp_path / "cold")
        assert inductor_config.compile_threads == 4
        assert (tmp_path / "cold" / COMPILE_CACHE_TORCH_FILE).read_text() == torch.__version__
        (tmp_path / "warm" / "fxgraph" / "ab").mkdir(parents=True)
        (tmp_path / "warm" / COMPILE_CACHE_TORCH_FILE).write_text("1.0.0")  # graphs of another torch: cold
        use_compile_cache(tmp_path / "warm")
        assert inductor_config.compile_threads == 4
        use_compile_cache(tmp_path / "warm")  # now marked with this torch
        assert inductor_config.compile_threads == 1
        inductor_config.compile_threads = 4
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "4")  # the user's choice stands
        use_compile_cache(tmp_path / "warm")
        assert inductor_config.compile_threads == 4


def test_a_second_process_loads_the_compiled_code_from_the_cache(tmp_path):
    """Two fresh processes compile the same function with ``use_compile_cache(folder)``: the first writes Inductor's
    compiled graph, the second finds it there (an FX graph cache hit) instead of compiling it again. A matmul alone:
    Inductor calls the library kernel and needs no C++ compiler on this machine."""
    script = (
        "import sys, torch\n"
        "from torch._dynamo.utils import counters\n"
        "from diffusers_var import use_compile_cache\n"
        "use_compile_cache(sys.argv[1])\n"
        "f = torch.compile(lambda x: x @ x.t())\n"
        "f(torch.randn(4, 8))\n"
        "print(counters['inductor']['fxgraph_cache_hit'], counters['inductor']['fxgraph_cache_miss'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "cache")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    (first_hits, first_misses), (second_hits, second_misses) = (map(int, run.stdout.split()[-2:]) for run in runs)
    assert (first_hits, first_misses) == (0, 1) and (second_hits, second_misses) == (1, 0)


def test_a_higher_precision_after_a_16_bit_fast_path_warns_that_the_weights_stay_rounded(caplog):
    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(0)
    transformer = VARTransformer2DModel(depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2), num_classes=4)
    pipe = VARPipeline(transformer=transformer, vqvae=MultiScaleVQModel(patch_nums=(1, 2)).eval())
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe.enable_fast_inference(dtype=torch.float32)
            assert "keep that rounding" not in caplog.text  # never rounded: nothing to say
            pipe.enable_fast_inference(dtype=torch.bfloat16)
            pipe.enable_fast_inference(dtype=torch.float32)
    finally:
        diffusers_logging.disable_propagation()
    assert "cast the weights to torch.bfloat16; they keep that rounding in torch.float32" in caplog.text
    caplog.clear()
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):  # bf16, then fp16: the coarser bf16 rounding is the one named, each time
            pipe.enable_fast_inference(dtype=torch.float16)
            assert "cast the weights to torch.bfloat16; they keep that rounding in torch.float16" in caplog.text
            caplog.clear()
            pipe.enable_fast_inference(dtype=torch.float32)
            assert "cast the weights to torch.bfloat16; they keep that rounding in torch.float32" in caplog.text
            caplog.clear()
            with tempfile.TemporaryDirectory() as folder:  # a save says the weights carry the rounding
                pipe.save_pretrained(folder)
            assert "cast `transformer`'s weights to torch.bfloat16; the saved weights carry that rounding" in (
                caplog.text
            )
    finally:
        diffusers_logging.disable_propagation()


def test_a_dtype_cast_is_refused_while_the_fast_path_runs():
    """A cast after enable_fast_inference turned the float8 copies into plain floats under the matmuls reading them
    (and left the fast settings naming another dtype), in this pipeline and in every one sharing its modules."""
    pipe = tiny_var()
    pipe.enable_fast_inference(fp8=True)
    fp8_buffers = [m.weight_fp8 for m in pipe.transformer.modules() if hasattr(m, "weight_fp8")]
    assert fp8_buffers and {b.dtype for b in fp8_buffers} == {torch.float8_e4m3fn}
    for cast in (
        lambda: pipe.to(torch.float16),
        lambda: pipe.to("cpu", torch.float32),
        lambda: pipe.to(dtype=torch.float32),
        lambda: VARPipeline.from_pipe(pipe, dtype=torch.float16),
    ):
        with pytest.raises(ValueError, match=r"`dtype`: this pipeline runs the fast path .*disable_fast_inference"):
            cast()
    fp8_buffers = [m.weight_fp8 for m in pipe.transformer.modules() if hasattr(m, "weight_fp8")]
    assert {b.dtype for b in fp8_buffers} == {torch.float8_e4m3fn}
    pipe.to("cpu")  # a move without a cast is fine
    pipe.disable_fast_inference()
    assert pipe.to(torch.float32).transformer.dtype == torch.float32
    with pytest.raises(ValueError, match=r"`compile_decoder` must be True, False or a torch.compile mode .* got 1"):
        pipe.enable_fast_inference(compile_decoder=1)


def test_kv_cache_reserve():
    """``LayerKVCache.reserve`` hands out the next positions of the pre-allocated storage without writing them (the
    chained VAR blocks write keys and values from their projection kernel): it advances the length as ``append``
    does, mixes with it, reallocates for another batch size, refuses overflow and a cache without ``max_length``."""
    from diffusers_var.models.blocks import LayerKVCache

    cache = LayerKVCache(max_length=6)
    like = torch.zeros(2, 1, 3, dtype=torch.bfloat16)
    keys, values, start = cache.reserve(2, 1, 3, 4, like)
    assert start == 0 and cache.length == 1 and keys.shape == values.shape == (2, 6, 3, 4)
    assert keys.dtype == torch.bfloat16 and keys.data_ptr() != values.data_ptr()
    keys[:, :1] = 1.0
    k, v = cache.append(
        torch.full((2, 2, 3, 4), 2.0, dtype=torch.bfloat16), torch.zeros(2, 2, 3, 4, dtype=torch.bfloat16)
    )
    assert cache.length == 3 and k.shape[1] == 3 and k[:, 0].eq(1).all() and k[:, 1:].eq(2).all()
    again, _, start = cache.reserve(2, 3, 3, 4, like)
    assert start == 3 and cache.length == 6 and again.data_ptr() == keys.data_ptr()
    with pytest.raises(ValueError, match="overflow"):
        cache.reserve(2, 1, 3, 4, like)
    cache.reset()
    other, _, start = cache.reserve(5, 2, 3, 4, like)  # another batch size: new storage
    assert start == 0 and other.shape == (5, 6, 3, 4)
    with pytest.raises(ValueError, match="max_length"):
        LayerKVCache().reserve(1, 1, 3, 4, like)


# -- the fast path's casts, marks and hooks ----------------------------------------------------------------------
def test_modules_kept_in_float32_keep_their_exact_values_under_a_16_bit_fast_path():
    """The heads a model keeps in float32 went through bf16 first (the whole module was cast, then the heads back to
    float32): float32 in name, bf16 values for good, unlike ``from_pretrained(dtype=torch.bfloat16)``. A transformers
    text encoder keeps what transformers keeps (T5's ``wo`` in float16)."""
    pipe = tiny_var()
    keep = set(pipe.transformer._keep_in_fp32_modules)
    kept = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if keep & set(k.split("."))}
    assert kept and any(not torch.equal(v, v.bfloat16().float()) for v in kept.values())
    for dtype in (torch.bfloat16, torch.float16):
        pipe.enable_fast_inference(dtype=dtype)
        state = pipe.transformer.state_dict()
        assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v) for k, v in kept.items())
        assert {v.dtype for k, v in state.items() if k not in kept and v.is_floating_point()} == {dtype}

    infinity = tiny_pipeline()
    assert "wo" in infinity.text_encoder._keep_in_fp32_modules
    infinity.enable_fast_inference(dtype=torch.float16)
    wo = [m.wo.weight for m in infinity.text_encoder.modules() if hasattr(m, "wo")]
    assert wo and {w.dtype for w in wo} == {torch.float32}
    assert torch.isfinite(infinity_images(infinity)).all()
    infinity.enable_fast_inference(dtype=torch.bfloat16)  # transformers keeps `wo` in float32 for float16 only
    assert {w.dtype for w in wo} == {torch.bfloat16}


def test_kept_in_float32_follows_each_library():
    class Strict(torch.nn.Module):
        _keep_in_fp32_modules = ["wo"]
        _keep_in_fp32_modules_strict = ["router"]

    assert fast_inference.kept_in_float32(Strict(), torch.float16) == {"wo", "router"}
    assert fast_inference.kept_in_float32(Strict(), torch.bfloat16) == {"router"}
    assert fast_inference.kept_in_float32(Strict(), torch.float32) == set()
    transformer = tiny_var().transformer
    assert fast_inference.kept_in_float32(transformer, torch.bfloat16) == set(transformer._keep_in_fp32_modules)


def test_save_after_a_16_bit_fast_path_names_every_rounded_component(star, caplog):
    """Only the transformer was named: the decoder, the text encoder and CoDe's refiner were saved rounded too."""
    from diffusers.utils import logging as diffusers_logging

    from diffusers_var import VARCoDePipeline
    from tiny_components import code_components

    pipes = {"star": own_star(star), "code": VARCoDePipeline(**code_components())}
    expected = {"star": ("transformer", "vqvae", "text_encoder"), "code": ("transformer", "vqvae", "refiner")}
    for name, pipe in pipes.items():
        pipe.enable_fast_inference(dtype=torch.bfloat16)
        pipe.disable_fast_inference()  # the rounding stays
        caplog.clear()
        diffusers_logging.enable_propagation()
        try:
            with caplog.at_level("WARNING"), tempfile.TemporaryDirectory() as folder:
                pipe.save_pretrained(folder)
        finally:
            diffusers_logging.disable_propagation()
        for component in expected[name]:
            assert f"cast `{component}`'s weights to torch.bfloat16" in caplog.text, (name, component)


def test_offloading_or_casting_hooks_after_the_fast_path_are_refused():
    """The refusal held in one order only: offloading, group offloading or layerwise casting added after
    ``enable_fast_inference`` was taken, and the fast path ran on weights that the hooks move or cast."""
    pipe = tiny_var()
    pipe.enable_fast_inference()
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        with pytest.raises(ValueError, match=rf"`{method}\(\)`: this pipeline runs the fast path"):
            getattr(pipe, method)(device="cuda")
    for add_hooks in (
        lambda t: t.enable_group_offload(
            onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
        ),
        lambda t: t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16),
    ):
        pipe = tiny_var()
        pipe.enable_fast_inference()
        with pytest.raises(ValueError, match=r"\(\)`: this VARTransformer2DModel runs a pipeline's fast path"):
            add_hooks(pipe.transformer)
        pipe.disable_fast_inference()  # off the fast path, the hooks run as diffusers has them
        add_hooks(pipe.transformer)
        assert pipe(class_labels=[1], output_type="pt").images.shape == (1, 3, 8, 8)
    pipe = tiny_var()
    pipe.enable_fast_inference()
    with pytest.raises(ValueError, match=r"`enable_group_offload\(\)`: this pipeline runs the fast path"):
        pipe.enable_group_offload(
            onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
        )


def test_modules_with_kernels_pickle_and_copy_with_their_kernels(tmp_path):
    """``torch.save`` of a component failed while a 16-bit fast path was on (its kernel classes are made at run time,
    so pickle could not find them by name); saved, loaded in a new process or deep-copied, a module keeps them."""
    pipe = tiny_var()
    pipe.enable_fast_inference(dtype=torch.bfloat16)

    def kernels(module):
        return sorted(
            (type(m).__name__, type(m)._fast_path_kernel[1])
            for m in module.modules()
            if hasattr(type(m), "_fast_path_kernel")
        )

    for name in ("transformer", "vqvae"):
        module = getattr(pipe, name)
        assert kernels(module)
        torch.save(module, tmp_path / f"{name}.pt")
        for twin in (torch.load(tmp_path / f"{name}.pt", weights_only=False), copy.deepcopy(module)):
            assert kernels(twin) == kernels(module)
            assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), module.state_dict().values()))
    script = (
        "import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
        "print(sorted({type(x)._fast_path_kernel[1] for x in m.modules() if hasattr(type(x), '_fast_path_kernel')}))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "transformer.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert run.returncode == 0 and run.stdout.strip() == "['forward']", run.stderr


@pytest.mark.parametrize("missing", ["transformer", "vqvae"])
def test_fast_path_of_a_pipeline_without_a_component_names_it(missing):
    components = {"transformer": tiny_var().transformer, "vqvae": tiny_var().vqvae, missing: None}
    pipe = VARPipeline(**components)
    for kwargs in ({}, {"fp8": True}):
        with pytest.raises(ValueError, match=f"has no `{missing}`"):
            pipe.enable_fast_inference(**kwargs)


def test_components_a_fast_pipeline_holds_are_not_hooked_or_cast_through_a_sibling(caplog):
    """A pipeline sharing components with a fast one (``from_pipe`` with its own transformer) cannot offload or cast
    them under the fast pipeline's graphs and kernels, and an eager sibling made before the fast path came on is told
    once that its images are no longer the eager path's."""
    fast = tiny_var()
    sibling = VARPipeline.from_pipe(fast, transformer=tiny_var().transformer)
    fast.enable_fast_inference()
    for change in (
        lambda: sibling.enable_model_cpu_offload(device="cpu"),
        lambda: sibling.enable_sequential_cpu_offload(device="cuda"),
        lambda: sibling.to(torch.float32),
    ):
        with pytest.raises(ValueError, match="`vqvae` of this pipeline is shared with a pipeline that runs the fast"):
            change()
    assert not hasattr(fast.vqvae, "_hf_hook") and fast.vqvae.decoder.conv_in.weight.dtype == torch.bfloat16
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            for _ in range(2):
                sibling(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        diffusers_logging.disable_propagation()
    assert caplog.text.count("shared with a pipeline that runs the fast path, which cast and fitted them") == 1
    fast.disable_fast_inference()
    sibling.to(torch.float32)  # free again


def test_a_cast_of_a_part_of_a_component_behind_the_fast_path_is_refused():
    """The fast path keeps VAR's quantizer in float32 and casts its decoder: a cast of the decoder alone (the first
    and last weights of the VQ-VAE stay float32) is seen too."""
    pipe = tiny_var().enable_fast_inference()
    pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="latent")
    pipe.vqvae.to(torch.float32)
    with pytest.raises(ValueError, match=r"`vqvae`: its weights were cast from torch.bfloat16 to torch.float32"):
        pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="latent")


def test_from_pipe_with_a_new_transformer_says_the_shared_decoder_was_cast(caplog):
    """A pipeline made with from_pipe and a fresh transformer reports the fast path off, but shares the decoder the
    first pipeline's fast path cast to bf16: its images carry that rounding, and a warning now says so (not when it
    shares the fast transformer too, or nothing was cast)."""
    from diffusers.utils import logging as diffusers_logging

    from tiny_components import var_components

    first = VARPipeline(**var_components(seed=0))
    fresh = VARPipeline(**var_components(seed=1)).transformer
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            VARPipeline.from_pipe(first, transformer=fresh)
            assert "enable_fast_inference() cast them" not in caplog.text  # nothing cast yet
            first.enable_fast_inference(dtype=torch.bfloat16)
            sharing = VARPipeline.from_pipe(first)
            assert sharing._fast_inference and "enable_fast_inference() cast them" not in caplog.text
            sibling = VARPipeline.from_pipe(first, transformer=fresh)
    finally:
        diffusers_logging.disable_propagation()
    assert not sibling._fast_inference
    assert "VARPipeline.from_pipe shares `vqvae` (bfloat16) with a pipeline whose enable_fast_inference()" in (
        caplog.text
    )
