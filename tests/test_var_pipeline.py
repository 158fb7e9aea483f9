"""VARPipeline behaviour on tiny random components: API contract, round trips, bad inputs, blocks."""

from __future__ import annotations

import numpy as np
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


# -- family behaviour (the shared batteries cover outputs, seeds, save / load, callbacks, bad inputs) -----------------
def test_random_labels_and_nested_labels(pipe):
    assert generate(pipe, class_labels=None, num_images_per_prompt=4).shape[0] == 4
    assert generate(pipe, class_labels=-1, num_images_per_prompt=2).shape[0] == 2
    # diffusers' DiT batches labels as lists: [[1], [2]] is [1, 2]
    assert torch.equal(generate(pipe, class_labels=[[1], [2]]), generate(pipe, class_labels=[1, 2]))


def test_guidance_zero_is_conditional_only(pipe):
    """guidance 0: the null-class rows must not change the result (only t * uncond enters the logits)."""
    seen = {}

    def record(p, si, hw, tensors):
        seen.setdefault(si, []).append(tensors["guided_logits"])
        return {}

    for guidance in (0.0, 7.0):
        generate(
            pipe,
            class_labels=[1],
            guidance_scale=guidance,
            callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=["guided_logits"],
        )
    torch.testing.assert_close(seen[0][0], seen[0][1])  # ramp: no guidance at the first scale
    assert not torch.allclose(seen[3][0], seen[3][1])  # full guidance at the last


def test_labels_and_get_label_ids():
    pipe = tiny_pipeline(id2label={0: "cat, kitty", 1: "dog"})
    assert pipe.get_label_ids(["kitty", "dog", "cat"]) == [0, 1, 0]
    with pytest.raises(ValueError, match="label"):
        pipe.get_label_ids("zebra")
    imagenet = tiny_pipeline(num_classes=1000)
    assert imagenet.get_label_ids(["golden retriever", "tench"]) == [207, 0]
    assert imagenet.id2label[360] == "otter"


def test_a_name_of_several_classes_and_a_class_the_model_lacks_are_refused(tmp_path):
    """A synonym two classes share mapped to the last of them without a word (ImageNet's "crane" gave 517, the
    machine, never 134, the bird); a class index beyond the transformer's classes was accepted until a call used it.
    Shared names stay (ImageNet has 18) but name no class; the indices are checked when the pipeline is built, and so
    when it loads."""
    imagenet = tiny_pipeline(num_classes=1000)
    assert imagenet.shared_labels["crane"] == [134, 517] and len(imagenet.shared_labels) == 18
    with pytest.raises(ValueError, match=r"`label` 'crane' names several classes: 134 \('crane'\), 517 \('crane'\)"):
        imagenet.get_label_ids(["tench", "crane"])
    assert "crane" not in imagenet.labels and imagenet.get_label_ids(["giant panda"]) == [388]
    from diffusers_var.cli import class_labels_of

    with pytest.raises(ValueError, match=r"^`--class-label`: `label` 'crane' names several classes: 134"):
        class_labels_of(imagenet, "crane")  # (not "neither a class index nor a class name")
    pipe = tiny_pipeline(id2label={0: "cat, kitty", 1: "dog, kitty"})
    with pytest.raises(ValueError, match=r"'kitty' names several classes: 0 \('cat, kitty'\), 1 \('dog, kitty'\)"):
        pipe.get_label_ids("kitty")
    for id2label, message in (
        ({0: "a", 10: "b"}, r"class indices \[10\], but the transformer's classes are 0 to 9"),
        ({-1: "none"}, r"class indices \[-1\]"),
        ({1: "a", "1": "b"}, r"gives class indices \[1\] twice"),
        ({"²": "a"}, "must be a dict from class index to class name"),
    ):
        with pytest.raises(ValueError, match=rf"`id2label` .*{message}"):
            tiny_pipeline(id2label=id2label)
    pipe = tiny_pipeline(id2label={0: "a", 9: "b"})
    pipe.save_pretrained(tmp_path / "p")
    config = tmp_path / "p" / "model_index.json"
    config.write_text(config.read_text().replace('"9": "b"', '"12": "b"'))
    with pytest.raises(ValueError, match=r"`id2label` names class indices \[12\]"):
        VARPipeline.from_pretrained(tmp_path / "p")


def test_id2label_survives_save_and_load(tmp_path):
    pipe = tiny_pipeline(id2label={0: "a", 1: "b"})
    pipe.save_pretrained(tmp_path / "p")
    assert VARPipeline.from_pretrained(tmp_path / "p").id2label == {0: "a", 1: "b"}


def test_mismatched_components_rejected():
    vq = MultiScaleVQModel(ch=32, ch_mult=(1, 2), num_res_blocks=1, vocab_size=32, z_channels=8, patch_nums=(1, 2, 4))
    tr = VARTransformer2DModel(
        num_classes=4, depth=1, embed_dim=64, num_heads=1, vocab_size=32, latent_channels=8, patch_nums=PATCH_NUMS
    )
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


def test_teacher_forcing_input_is_what_sampling_feeds_each_scale(pipe):
    """The tokenizer's teacher-forcing input (training) equals the next-scale inputs the sampler builds scale by scale
    (both add each scale's codes to f_hat with the same rule)."""
    vq = pipe.vqvae
    torch.manual_seed(0)
    indices = [torch.randint(0, 32, (2, pn * pn)) for pn in PATCH_NUMS]
    f_hat, pieces = torch.zeros(2, 8, PATCH_NUMS[-1], PATCH_NUMS[-1]), []
    for si, (idx, pn) in enumerate(zip(indices, PATCH_NUMS)):
        _, next_map = vq.next_scale_input(si, f_hat, vq.quantize.embed(idx, pn))
        if si + 1 < len(PATCH_NUMS):
            pieces.append(next_map.flatten(2).transpose(1, 2))
    torch.testing.assert_close(torch.cat(pieces, dim=1), vq.teacher_forcing_input(indices), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f_hat, vq.indices_to_fhat(indices), atol=1e-6, rtol=1e-6)


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
    cache = KVCache(1, [(1, 1), (1, 1)])
    cache[0].append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="overflow"):
        cache[0].append(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
