"""STARPipeline behaviour on tiny random components built from configs (no download).

The tokenizer and text encoder are the tiny local CLIP of the STAR fixtures (SD-2.x folder layout).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_var import STARPipeline
from tiny_components import star_components, star_text_components

SMALL_SCHEDULE = (1, 2, 3, 4)
LONG_SCHEDULE = tuple(range(1, 15))  # 14 scales like the 1024 model, tiny sides


text_components = star_text_components


def make_pipe(patch_nums=SMALL_SCHEDULE, stable_sampler=True, sampler_start_scale=2, quirk=False, text=None, seed=0) -> STARPipeline:
    return STARPipeline(**star_components(seed, patch_nums, stable_sampler, sampler_start_scale, quirk, text))


@pytest.fixture(scope="module")
def text():
    return text_components()


@pytest.fixture(scope="module")
def pipe(text):
    return make_pipe(text=text)


def generate(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", ["a red cat", "the city"])
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("top_k", 10)
    kwargs.setdefault("top_p", 0.9)
    return pipe(generator=torch.Generator().manual_seed(seed), sampler_generator=torch.Generator().manual_seed(seed + 1), **kwargs).images


# -- bad inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["a", 3]), "prompt"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt"),
        (dict(prompt="a", top_k=-1), "top_k"),
        (dict(prompt="a", top_p=1.5), "top_p"),
        (dict(prompt="a", guidance_scale=-1.0), "guidance_scale"),
        (dict(prompt="a", output_type="jpeg"), "output_type"),
        (dict(prompt="a", sampler_version="old"), "sampler_version"),
        (dict(prompt="a", num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt=["a", "b"], generator=[torch.Generator()]), "generator"),
        (dict(prompt="a", sampler_generator=3), "sampler_generator"),
        (dict(prompt="a", callback_on_step_end_tensor_inputs=["nope"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_inputs_name_the_parameter(pipe, kwargs, parameter):
    with pytest.raises(ValueError, match=f"`{parameter}`"):
        pipe(**kwargs)


def test_stable_sampler_requires_the_head(text):
    plain = make_pipe(stable_sampler=False, text=text)
    with pytest.raises(ValueError, match="`use_stable_sampler"):
        plain("a red cat", use_stable_sampler=True)
    assert generate(plain, prompt="a red cat").shape == (1, 8, 4, 4)  # None = off without the head


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long_prompt = "a red cat " * 60
    with caplog.at_level(logging.WARNING):
        hidden, mask, *_ = pipe.encode_prompt([long_prompt, "the city"])
    assert "truncated" in caplog.text
    assert hidden.shape[1] == pipe.tokenizer.model_max_length and mask[0].all()


# -- outputs ----------------------------------------------------------------------------------------
def test_output_types(pipe):
    pt = generate(pipe, output_type="pt", num_images_per_prompt=2)
    assert pt.shape == (4, 3, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    np_images = generate(pipe, output_type="np", num_images_per_prompt=2)
    assert np_images.shape == (4, 8, 8, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = generate(pipe, output_type="pil")
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) for im in pil)
    assert generate(pipe).shape == (2, 8, 4, 4)
    images, = pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False)
    assert images.shape == (1, 3, 8, 8)


def test_seeded_generation_is_reproducible_and_seed_dependent(pipe):
    a, b = generate(pipe, seed=3), generate(pipe, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(pipe, seed=4))


def test_generator_list_gives_each_image_its_own_stream(pipe):
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    both = pipe(["a red cat", "a red cat"], generator=gens, use_stable_sampler=False, output_type="latent").images
    again = pipe(["a red cat", "a red cat"], generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
                 use_stable_sampler=False, output_type="latent").images
    assert torch.equal(both, again) and not torch.equal(both[0], both[1])


def test_encode_prompt_alone(pipe):
    hidden, mask, pooled, neg_hidden, neg_mask, neg_pooled = pipe.encode_prompt("a red cat", num_images_per_prompt=3)
    D = pipe.text_encoder.config.hidden_size
    assert hidden.shape == (3, 77, D) and pooled.shape == (3, D) and mask.shape == (3, 77)
    assert torch.equal(hidden[0], hidden[2]) and neg_mask[0].sum() == 2  # "" = [BOS, EOS]
    _, _, _, _, _, custom = pipe.encode_prompt(["a"], negative_prompt="blurry")
    assert not torch.allclose(custom, neg_pooled[:1])


def test_callback_runs_once_per_scale_and_can_replace_f_hat(pipe):
    calls = []

    def callback(pipeline, scale_index, patch_num, tensors):
        calls.append((scale_index, patch_num, tuple(tensors["step_indices"].shape)))
        return {"f_hat": torch.zeros_like(tensors["f_hat"])}

    latent = generate(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["f_hat", "step_indices"])
    S = len(SMALL_SCHEDULE)
    assert [c[0] for c in calls] == list(range(S)) and [c[1] for c in calls] == list(SMALL_SCHEDULE)
    assert calls[0][2] == (1, 2, 1) and calls[-1][2] == (8, 2, 16)  # K = 8 sampler steps at the last scale
    assert torch.count_nonzero(latent) == 0


def test_more_smooth_and_both_sampler_versions_run(pipe):
    for kwargs in (dict(more_smooth=True, use_stable_sampler=False), dict(sampler_version="1024"), dict(sampler_version="new")):
        assert torch.isfinite(generate(pipe, **kwargs)).all()


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "star", safe_serialization=True)
    files = [p for p in (tmp_path / "star").rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pth", ".pt", ".pkl", ".ckpt"}]
    assert (tmp_path / "star" / "model_index.json").is_file()
    loaded = STARPipeline.from_pretrained(tmp_path / "star")
    def public(config):
        return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))

    assert public(loaded.transformer.config) == public(pipe.transformer.config)
    assert torch.equal(generate(loaded, seed=2), generate(pipe, seed=2))


# -- model -------------------------------------------------------------------------------------------
def _teacher_forcing_batch(pipe, batch=2):
    tr = pipe.transformer
    torch.manual_seed(1)
    x = torch.randn(batch, tr.seq_len - 1, tr.config.latent_channels)
    hidden, mask, pooled, *_ = pipe.encode_prompt(["a red cat", "the city at night"][:batch])
    return x, hidden, mask, pooled


def test_row0_quirk_flag(text):
    correct, quirky = make_pipe(text=text, quirk=False), make_pipe(text=text, quirk=True)
    x, hidden, mask, pooled = _teacher_forcing_batch(correct)
    with torch.no_grad():
        batched = correct.transformer(x, hidden, mask, pooled).logits
        alone = correct.transformer(x[1:], hidden[1:], mask[1:], pooled[1:]).logits
        torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-5)
        leaked = quirky.transformer(x, hidden, mask, pooled).logits
        assert (leaked[1:] - alone).abs().max() > 1e-3  # row 1 received row 0's cross-attention
        torch.testing.assert_close(leaked[:1], batched[:1], atol=1e-5, rtol=1e-5)


def test_long_schedule_sampler_runs_with_15_steps_and_block_diagonal_training(text):
    pipe = make_pipe(patch_nums=LONG_SCHEDULE, sampler_start_scale=9, text=text)
    steps = {}
    latent = generate(pipe, callback_on_step_end=lambda p, si, pn, t: steps.__setitem__(si, t["step_indices"].shape[0]) or {},
                      callback_on_step_end_tensor_inputs=["step_indices"], prompt="a red cat")
    assert latent.shape == (1, 8, 14, 14)
    assert [steps[s] for s in range(9)] == [1] * 9 and [steps[s] for s in range(9, 14)] == [8, 8, 8, 8, 15]
    tr = pipe.transformer
    x, hidden, mask, pooled = _teacher_forcing_batch(pipe)
    begin = tr.begin_ends[9][0]
    known = torch.randn(2, tr.seq_len - begin, 8)
    with torch.no_grad():
        out = tr(x, hidden, mask, pooled)
        logits = tr.forward_sampler(out.hidden_states, known, torch.ones(2, tr.seq_len - begin), pooled)
        assert logits.shape == (2, tr.seq_len - begin, 64)
    # block-diagonal per scale, the leading text token attends and is attended everywhere
    attn = tr.sampler_attention_mask()[0, 0]
    sides = LONG_SCHEDULE[9:]
    assert attn.shape == (1 + sum(p * p for p in sides),) * 2 and attn[0].all() and attn[:, 0].all()
    assert attn[1, 1 : 1 + sides[0] ** 2].all() and not attn[1, 1 + sides[0] ** 2 :].any()


def test_gradient_checkpointing_matches(pipe):
    tr = pipe.transformer
    x, hidden, mask, pooled = _teacher_forcing_batch(pipe)
    reference = tr(x, hidden, mask, pooled).logits
    tr.enable_gradient_checkpointing()
    try:
        logits = tr(x, hidden, mask, pooled).logits
        logits.sum().backward()
        assert tr.blocks[0].attn.to_qkv.weight.grad is not None
        torch.testing.assert_close(logits, reference)
    finally:
        tr.disable_gradient_checkpointing()
        tr.zero_grad(set_to_none=True)


def test_t5_text_path_pools_over_all_positions(text):
    from transformers import T5Config, T5EncoderModel

    tokenizer, _ = text
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    pipe = make_pipe(stable_sampler=False, text=(tokenizer, t5))
    hidden, mask, pooled, *_ = pipe.encode_prompt(["a red cat"])
    assert hidden.shape == (1, 120, 32)
    torch.testing.assert_close(pooled, hidden.mean(dim=1))
    assert generate(pipe, prompt="a red cat").shape == (1, 8, 4, 4)
