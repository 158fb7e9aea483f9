"""VARPipeline behaviour on tiny random components: API contract, round trips, bad inputs, blocks."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_var import MultiScaleVQModel, VARPipeline, VARTransformer2DModel
from diffusers_var.models.blocks import KVCache, block_causal_bias
from diffusers_var.models.multiscale_vq import phi_index
from tiny_components import VAR_PATCH_NUMS, var_components

PATCH_NUMS = VAR_PATCH_NUMS


def tiny_pipeline(seed: int = 0, num_classes: int = 10, shared_adaln: bool = False, id2label=None) -> VARPipeline:
    return VARPipeline(**var_components(seed, num_classes, shared_adaln), id2label=id2label)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def generate(pipe, **kwargs):
    defaults = dict(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="pt", top_k=8)
    defaults.update(kwargs)
    return pipe(**defaults).images


# -- output types and shapes -----------------------------------------------------------------------
def test_output_types(pipe):
    pt = generate(pipe)
    assert pt.shape == (2, 3, 8, 8) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    np_images = generate(pipe, output_type="np")
    assert np_images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = generate(pipe, output_type="pil")
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    latent = generate(pipe, output_type="latent")
    assert latent.shape == (2, 8, 4, 4)
    assert isinstance(pipe(class_labels=3, output_type="pt", return_dict=False), tuple)


def test_seed_reproduces_and_differs(pipe):
    a = generate(pipe, generator=torch.Generator().manual_seed(5))
    b = generate(pipe, generator=torch.Generator().manual_seed(5))
    c = generate(pipe, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_num_images_per_prompt_and_random_labels(pipe):
    assert generate(pipe, class_labels=[1, 2], num_images_per_prompt=3).shape[0] == 6
    assert generate(pipe, class_labels=None, num_images_per_prompt=4).shape[0] == 4
    assert generate(pipe, class_labels=-1, num_images_per_prompt=2).shape[0] == 2


def test_generator_list_gives_per_image_streams(pipe):
    """Image b of a batch generated with generator[b] equals that image generated alone with the same seed."""
    batch = generate(pipe, class_labels=[1, 2], generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    alone = generate(pipe, class_labels=[2], generator=[torch.Generator().manual_seed(4)])
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-5)


def test_guidance_zero_is_conditional_only(pipe):
    """guidance 0: the null-class rows must not change the result (only t * uncond enters the logits)."""
    seen = {}

    def record(p, si, pn, tensors):
        seen.setdefault(si, []).append(tensors["logits"])
        return {}

    generate(pipe, class_labels=[1], guidance_scale=0.0, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["logits"])
    generate(pipe, class_labels=[1], guidance_scale=7.0, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["logits"])
    torch.testing.assert_close(seen[0][0], seen[0][1])  # ramp: no guidance at the first scale
    assert not torch.allclose(seen[3][0], seen[3][1])  # full guidance at the last


def test_callback_can_replace_fhat(pipe):
    def zero_fhat(p, si, pn, tensors):
        return {"f_hat": torch.zeros_like(tensors["f_hat"])} if si == len(PATCH_NUMS) - 1 else {}

    latent = generate(pipe, output_type="latent", callback_on_step_end=zero_fhat)
    assert torch.count_nonzero(latent) == 0


def test_a_returned_fhat_stays_the_callers(pipe):
    """The next scales add to f_hat in place; they must not write into the tensor the callback handed back (a
    caller replaying recorded latents would see them change)."""
    replacement = torch.randn(2, 8, PATCH_NUMS[-1], PATCH_NUMS[-1], generator=torch.Generator().manual_seed(3))
    kept = replacement.clone()
    latent = generate(pipe, output_type="latent", callback_on_step_end=lambda p, si, pn, t: {"f_hat": replacement} if si == 0 else {})
    assert torch.equal(replacement, kept)
    assert not torch.equal(latent, replacement)  # later scales did add to (a copy of) it


def test_labels_and_get_label_ids():
    pipe = tiny_pipeline(id2label={0: "cat, kitty", 1: "dog"})
    assert pipe.get_label_ids(["kitty", "dog", "cat"]) == [0, 1, 0]
    with pytest.raises(ValueError, match="label"):
        pipe.get_label_ids("zebra")
    imagenet = tiny_pipeline(num_classes=1000)
    assert imagenet.get_label_ids(["golden retriever", "tench"]) == [207, 0]
    assert imagenet.id2label[360] == "otter"


# -- persistence -----------------------------------------------------------------------------------
def test_save_load_round_trip_identical(tmp_path):
    pipe = tiny_pipeline(shared_adaln=True, id2label={0: "a", 1: "b"})
    pipe.save_pretrained(tmp_path / "p")
    files = sorted(p.name for p in (tmp_path / "p").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pth", ".pt", ".pkl"))]
    assert "diffusion_pytorch_model.safetensors" in files
    loaded = VARPipeline.from_pretrained(tmp_path / "p")
    assert loaded.id2label == {0: "a", 1: "b"}
    torch.testing.assert_close(generate(pipe), generate(loaded), atol=0, rtol=0)


def test_dtype_loading(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "p")
    half = VARPipeline.from_pretrained(tmp_path / "p", dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16
    images = generate(half)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(class_labels=[10 + 1]), "class_labels"),
        (dict(class_labels=[-2]), "class_labels"),
        (dict(class_labels=[1.5]), "class_labels"),
        (dict(class_labels=[]), "class_labels"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(generator=[torch.Generator()]), "generator"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(callback_on_step_end_tensor_inputs=["latents"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_input_raises_clear_value_error(pipe, kwargs, param):
    with pytest.raises(ValueError, match=param):
        generate(pipe, **kwargs)


def test_mismatched_components_rejected():
    vq = MultiScaleVQModel(ch=32, ch_mult=(1, 2), num_res_blocks=1, vocab_size=32, z_channels=8, patch_nums=(1, 2, 4))
    tr = VARTransformer2DModel(num_classes=4, depth=1, embed_dim=64, num_heads=1, vocab_size=32, latent_channels=8, patch_nums=PATCH_NUMS)
    with pytest.raises(ValueError, match="patch_nums"):
        VARPipeline(transformer=tr, vqvae=vq)


def test_vq_rejects_bad_images(pipe):
    with pytest.raises(ValueError, match="images"):
        pipe.vqvae.encode_indices(torch.zeros(1, 3, 10, 10))
    with pytest.raises(ValueError, match="images"):
        pipe.vqvae.encode_indices(torch.zeros(1, 8, 8))


# -- shared blocks ---------------------------------------------------------------------------------
def test_phi_index_tables_from_spec():
    """The float64-numpy Phi selection, including the exact ties that rounding decides."""
    table = lambda S: [phi_index(si, S, 4) for si in range(S)]  # noqa: E731
    assert table(10) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert table(4) == [0, 1, 2, 3]
    assert table(5) == [0, 1, 2, 2, 3]
    assert table(6) == [0, 0, 1, 2, 3, 3]


def test_block_causal_bias():
    bias = block_causal_bias((1, 2))[0, 0]
    assert bias.shape == (5, 5)
    assert (bias[0, 1:] == float("-inf")).all() and (bias[1:, :] == 0).all() and bias[0, 0] == 0


def test_kv_cached_decoding_equals_block_causal_forward(pipe):
    """Scale-by-scale decoding with the KV cache gives the teacher-forcing logits of the same tokens."""
    tr, vq = pipe.transformer, pipe.vqvae
    torch.manual_seed(0)
    indices = [torch.randint(0, 32, (2, pn * pn)) for pn in PATCH_NUMS]
    labels = torch.tensor([1, 7])
    with torch.no_grad():
        full = tr(labels, vq.teacher_forcing_input(indices), drop_labels=False).logits
        tf_input = vq.teacher_forcing_input(indices)
        cache, cond, pieces = tr.init_kv_cache(), tr.embed_condition(labels), []
        for si, (begin, end) in enumerate(tr.begin_ends):
            scale_input = None if si == 0 else tf_input[:, begin - 1 : end - 1]
            pieces.append(tr.forward_scale(si, cond, cache, scale_input))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_attention_scale_is_clamped_at_100(pipe):
    """exp(min(log_scale, ln 100)): raising a scale above the clamp must not change the output."""
    tr = tiny_pipeline().transformer
    x = torch.randn(1, 5, 64)
    attn = tr.blocks[0].attn
    with torch.no_grad():
        attn.log_scale.fill_(float(np.log(100.0)))
        at_clamp = attn(x)
        attn.log_scale.fill_(9.0)
        above = attn(x)
        attn.log_scale.fill_(2.0)
        below = attn(x)
    torch.testing.assert_close(at_clamp, above)
    assert not torch.allclose(at_clamp, below)


def test_kv_cache_overflow_is_an_error():
    cache = KVCache(1, max_length=2)
    cache[0].append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="overflow"):
        cache[0].append(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def test_gradient_checkpointing_matches(pipe):
    tr = tiny_pipeline().transformer.train()
    tr.config.cond_drop_rate = 0.0
    indices = [torch.randint(0, 32, (2, pn * pn)) for pn in PATCH_NUMS]
    with torch.no_grad():  # the tokenizer is frozen during transformer training
        tf_input = pipe.vqvae.teacher_forcing_input(indices)
    labels = torch.tensor([1, 2])
    plain = tr(labels, tf_input, drop_labels=False).logits
    plain.sum().backward()
    grad_plain = tr.head.weight.grad.clone()
    tr.zero_grad()
    tr.enable_gradient_checkpointing()
    ckpt = tr(labels, tf_input, drop_labels=False).logits
    ckpt.sum().backward()
    torch.testing.assert_close(plain, ckpt)
    torch.testing.assert_close(grad_plain, tr.head.weight.grad)
