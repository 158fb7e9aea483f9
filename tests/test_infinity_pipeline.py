"""InfinityPipeline behaviour on tiny random components (no downloads) that the shared batteries do not cover:
sizes and templates, truncation, the callback's scale grids, the offload order, and converter errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils import logging

from conftest import fixture_dir, tokenizer_warnings
from diffusers_var import InfinityPipeline, embedded_pipeline
from diffusers_var.conversion import ConversionError, convert_infinity_checkpoint
from tiny_components import infinity_components

PROMPT = "a photo of a red fox sitting in the snow"


def tiny_pipeline(spatial_patchify: bool = False) -> InfinityPipeline:
    pipe = InfinityPipeline(**infinity_components(0, spatial_patchify))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def generate(pipe, **kwargs):
    args = dict(prompt=PROMPT, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="pt")
    args.update(kwargs)
    return pipe(**args).images


def test_unsupported_size_lists_supported_sizes(pipe):
    with pytest.raises(ValueError, match=r"32x32"):
        generate(pipe, height=1000, width=1000)


def test_an_unsupported_default_size_says_where_it_came_from(pipe):
    """Without height / width the size comes from ``default_size``, else 1024 x 1024: the error blamed
    "`height`/`width` 1024x1024", which the caller never gave; it now says where the size came from."""
    assert pipe.config.default_size is None
    no_default = r" not given: 1024, as the pipeline has no `default_size`\) is not near any supported size"
    with pytest.raises(ValueError, match=rf"^`height`/`width` 1024x1024 \(`height` and `width`{no_default}"):
        generate(pipe, height=None, width=None)
    with pytest.raises(ValueError, match=rf"^`height`/`width` 32x1024 \(`width`{no_default}"):
        generate(pipe, width=None)
    sized = InfinityPipeline(**{**pipe.components, "default_size": [1000, 1000]})
    with pytest.raises(ValueError, match=r"^`height`/`width` 1000x1000 \(`height` and `width` not given: the pipel"):
        generate(sized, height=None, width=None)
    assert generate(sized, height=32, width=32).shape == (1, 3, 32, 32)


def test_an_aspect_ratio_far_from_every_template_is_refused(pipe):
    """Only the area was checked: any aspect ratio took the nearest template (the embedded infinity-shapes model made
    a 148x444 image of a 64x1000 request, and took 1x65536) while 100x100 was refused. Now height / width must be
    within 25% of a template's, as the area of a preset's."""
    assert pipe.scale_schedule(54, 72)[-1] == (27, 36)  # 3:4, exactly
    assert pipe.scale_schedule(32, 30)[-1] == (16, 16)  # 1:1, within 25%
    assert pipe.scale_schedule(48, 14)[-1] == (27, 9)  # 3:1 (54x18), within 25%
    for height, width in ((60, 14), (14, 60), (64, 1000), (1, 65536), (4000, 16)):
        with pytest.raises(ValueError, match=rf"`height`/`width` {height}x{width} is not near any supported .*32x32"):
            generate(pipe, height=height, width=width)


def test_a_size_exactly_25_percent_from_a_template_is_taken():
    """48x64 is 1.25x per side from the embedded model's 60x80 template, within the documented 25%: floating point
    made the ratio 1.2500000000000002 and the size was refused."""
    embedded = InfinityPipeline.from_pretrained(str(embedded_pipeline("infinity-shapes")), dtype=torch.float32)
    for height, width in ((48, 64), (64, 48)):
        assert embedded.scale_schedule(height, width) == embedded.scale_schedule(60 * height // 48, 60 * width // 48)


def test_bad_negative_prompt_text_is_named(pipe):
    """A negative prompt with lone surrogates failed inside the tokenizer with a TypeError; ``prompt`` was checked."""
    for negative in ("a\udc80", ["x", "\ud800"]):
        prompt = [PROMPT] * (2 if isinstance(negative, list) else 1)
        with pytest.raises(ValueError, match="^`negative_prompt` holds characters that are not Unicode text"):
            generate(pipe, prompt=prompt, negative_prompt=negative)
        with pytest.raises(ValueError, match="^`negative_prompt` holds characters that are not Unicode text"):
            pipe.encode_prompt(prompt, negative_prompt=negative)


def test_a_prompt_longer_than_the_tokenizers_nominal_length_raises_no_transformers_warning(pipe):
    """The tokens of a prompt are counted untruncated: transformers warned of "indexing errors" past the tokenizer's
    nominal 77 though the pipeline keeps 512 tokens and cuts longer prompts itself, with its own warning."""
    with tokenizer_warnings(pipe.tokenizer) as messages:
        embeds, *_ = pipe.encode_prompt("a red circle " * 40, negative_prompt="x")
    assert embeds.shape[1] > pipe.tokenizer.model_max_length and not any("indexing errors" in m for m in messages)


def test_long_prompt_is_truncated_at_512_tokens_with_warning(pipe):
    """The original tokenises every prompt to 512 T5 tokens, whatever the transformer's text_max_length (the rows of
    its learned unconditional text, 32 here): a prompt was cut at those rows, which changed even the features kept
    (T5 is bidirectional) and every image of a small model with a long prompt. Longer than 512: cut, with a warning.
    The learned unconditional text serves prompts up to its rows: a longer prompt that guidance mixes with it (no
    negative prompt) is cut to those rows with a warning (the original fails there); precomputed features that long
    are refused by name."""
    logger = logging.get_logger("diffusers_var.pipelines.pipeline_infinity")
    messages = []
    handler = type(
        "H", (__import__("logging").Handler,), {"emit": lambda self, record: messages.append(record.getMessage())}
    )()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # diffusers' battery leaves the pipeline modules' loggers at FATAL
    rows = pipe.transformer.config.text_max_length
    long_prompt = " ".join(["a photo of a red fox"] * 10)
    try:
        whole, mask, _, _ = pipe.encode_prompt(long_prompt, do_classifier_free_guidance=False)
        assert messages == [] and rows < whole.shape[1] == int(mask.sum()) < 512  # kept whole
        with_negative, _, _, _ = pipe.encode_prompt(long_prompt, negative_prompt="blurry")
        assert messages == [] and torch.equal(with_negative, whole)
        cut, cut_mask, _, _ = pipe.encode_prompt(long_prompt)  # guided by the learned unconditional text
        assert cut.shape[1] == rows and cut_mask.all() and "the learned unconditional text's" in messages[-1]
        alone, _, _, _ = pipe.encode_prompt(long_prompt, do_classifier_free_guidance=False, max_sequence_length=rows)
        assert torch.equal(cut, alone)  # the prompt encoded at that length, not its features cut
        explicit, _, _, _ = pipe.encode_prompt(long_prompt, max_sequence_length=512)  # the default, given: the same
        assert torch.equal(explicit, cut)
        _, _, negative_embeds, negative_mask = pipe.encode_prompt([long_prompt, "a fox"], negative_prompt=["", "x"])
        given, _, _, _ = pipe.encode_prompt(  # a negative row without real tokens takes the learned text too
            [long_prompt, "a fox"],
            negative_prompt_embeds=negative_embeds,
            negative_prompt_attention_mask=negative_mask,
        )
        assert int(given[0].abs().sum(dim=-1).gt(0).sum()) == rows
        messages.clear()
        too_long, mask, _, _ = pipe.encode_prompt(" ".join(["a photo of a red fox"] * 100), negative_prompt="x")
        guided = generate(pipe, prompt=long_prompt)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert too_long.shape[1] == 512 and mask.all() and any("truncated" in m for m in messages)
    unguided = generate(pipe, prompt=long_prompt, guidance_scale=1.0)
    negative = generate(pipe, prompt=long_prompt, negative_prompt=long_prompt[:40])
    assert all(torch.isfinite(images).all() for images in (guided, unguided, negative))
    with pytest.raises(ValueError, match=rf"`prompt_embeds` rows \[0\] have more than the {rows} tokens"):
        generate(
            pipe, prompt=None, prompt_embeds=whole, prompt_attention_mask=torch.ones(whole.shape[:2], dtype=torch.bool)
        )
    with pytest.raises(ValueError, match=r"`max_sequence_length` must be an integer in \[1, 512\]"):
        pipe.encode_prompt(long_prompt, max_sequence_length=513)


def same(a, b) -> bool:
    return a is b is None or (a is not None and b is not None and torch.equal(a, b))


def test_text_inputs_a_user_may_give(pipe):
    """A left-padding tokenizer is padded on the right (the trim keeps the first columns); a text-only pipeline
    takes precomputed features; numpy negative prompts and non-tensor features are named errors."""
    reference = pipe.encode_prompt([PROMPT, "a cat"])
    pipe.tokenizer.padding_side = "left"
    try:
        left = pipe.encode_prompt([PROMPT, "a cat"])
    finally:
        pipe.tokenizer.padding_side = "right"
    assert all(same(a, b) for a, b in zip(left, reference))
    text_only = InfinityPipeline(transformer=None, vae=None, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    embeds, mask, _, _ = pipe.encode_prompt(PROMPT)
    again = text_only.encode_prompt(None, prompt_embeds=embeds, prompt_attention_mask=mask)
    assert all(same(a, b) for a, b in zip(again, pipe.encode_prompt(PROMPT)))
    with pytest.raises(ValueError, match="`negative_prompt` must be a string or a list"):
        generate(pipe, prompt=[PROMPT, "a cat"], negative_prompt=np.array(["x", "y"]))
    transformer, schedule = pipe.transformer, pipe.scale_schedule(32, 32)
    inputs = torch.zeros(1, sum(h * w for h, w in schedule) - 1, transformer.config.bits_per_token)
    with pytest.raises(ValueError, match=r"`text_embeds` must be a \(B, S, "):
        transformer(inputs, embeds[0].tolist(), mask, schedule)
    with pytest.raises(ValueError, match=r"`text_embeds` must be a \(B, S, "):
        transformer(inputs, embeds[0], mask, schedule)  # 2-D: named as such, not as a row-count mismatch


def test_non_square_and_patchify():
    pipe = tiny_pipeline(spatial_patchify=True)
    # 0.06M preset of the 0.75 (h/w) template: 15 x 20 tokens, 4 px per token with the 2x2 patchify
    images = generate(pipe, height=60, width=80, guidance_scale=2.0, tau=1.0, top_k=900, top_p=0.97)
    assert images.shape == (1, 3, 60, 80)


def test_seeded_generation_is_reproducible_and_callback_runs_per_scale(pipe):
    scales = []
    first = generate(pipe, guidance_scale=3.0, callback_on_step_end=lambda p, i, hw, t: scales.append(hw) or {})
    assert scales == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]
    assert torch.equal(first, generate(pipe, guidance_scale=3.0))
    per_image = generate(
        pipe, prompt=[PROMPT, PROMPT], generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    )
    assert per_image.shape[0] == 2


def test_an_empty_negative_prompt_is_per_row(pipe):
    """``""`` in a list of negative prompts is that row's learned unconditional text, whatever the other rows ask: a
    row's image does not depend on its neighbours' negatives. As precomputed features, a negative row without real
    tokens means the same; a one-item list for two prompts is refused (one string per prompt, or one string)."""
    prompts, other = [PROMPT, "a blue cube"], "a green square"

    def two(**kwargs):
        generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
        return generate(pipe, **{"prompt": prompts, "generator": generators, "guidance_scale": 3.0, **kwargs})

    without, mixed, both = two(), two(negative_prompt=["", other]), two(negative_prompt=[other, other])
    assert torch.equal(mixed[0], without[0]) and torch.equal(mixed[1], both[1])
    assert not torch.equal(mixed[1], without[1])
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(prompts, negative_prompt=["", other])
    assert not negative_mask[0].any() and negative_mask[1].any() and not negative_embeds[0].any()
    from_embeds = two(
        prompt=None,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative_embeds,
        negative_prompt_attention_mask=negative_mask,
    )
    assert torch.equal(from_embeds, mixed)
    with pytest.raises(ValueError, match=r"`negative_prompt` must be a string or a list with one string per prompt"):
        two(negative_prompt=[other])
    with pytest.raises(ValueError, match=r"`prompt_attention_mask`: every row needs at least one real"):
        two(prompt=None, prompt_embeds=embeds, prompt_attention_mask=torch.zeros_like(mask))


def test_text_masks_must_pad_on_the_right(pipe):
    """The original keeps each prompt's first ``len`` features and guides them with the first ``len`` rows of the
    learned unconditional text: a left-padded mask put those rows beside other positions, and gave another image
    with guidance than the same features padded on the right. Such masks are refused by name."""
    embeds, mask, _, _ = pipe.encode_prompt(["a red", "a blue square on a green background"])
    assert not mask[0].all() and mask[1].all()
    length, S = int(mask[0].sum()), mask.shape[1]
    left, left_mask = torch.zeros_like(embeds), torch.zeros_like(mask)
    left[:, S - length :], left_mask[:, S - length :] = embeds[0, :length], True
    left[1], left_mask[1] = embeds[1], mask[1]
    for name, prompt in (("prompt", None), ("negative_prompt", [PROMPT, PROMPT])):
        with pytest.raises(ValueError, match=rf"`{name}_attention_mask` must pad on the right"):
            generate(pipe, prompt=prompt, **{f"{name}_embeds": left, f"{name}_attention_mask": left_mask})
    with pytest.raises(ValueError, match=r"`prompt_attention_mask` must pad on the right"):
        pipe.encode_prompt(None, prompt_embeds=left, prompt_attention_mask=left_mask)
    right = generate(pipe, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, guidance_scale=3.0)
    assert right.shape == (2, 3, 32, 32)


def test_precomputed_prompts_longer_than_the_learned_text_are_refused_before_the_call(pipe):
    """Prompt texts are truncated to the learned unconditional text's rows where guidance mixes them with it;
    precomputed features cannot be: they used to fail inside the transformer, naming a prompt the user never gave."""
    rows = pipe.transformer.config.text_max_length
    long = torch.randn(2, rows + 3, 32)
    mask = torch.ones(2, rows + 3, dtype=torch.bool)
    mask[0, rows:] = False  # row 0 fits, row 1 does not
    calls = []
    with pytest.raises(
        ValueError, match=r"`prompt_embeds` rows \[1\] have more than the 32 tokens.*`text_max_length`"
    ):
        generate(pipe, prompt=None, prompt_embeds=long, prompt_attention_mask=mask, callback_on_step_end=calls.append)
    assert calls == []  # refused in check_inputs, before the first scale
    negative_mask = torch.zeros(2, 4, dtype=torch.bool)
    negative_mask[1] = True  # row 1 has its own negative, row 0 takes the learned text and fits
    kept = dict(prompt=None, prompt_embeds=long, prompt_attention_mask=mask, num_images_per_prompt=1)
    assert generate(
        pipe, **kept, negative_prompt_embeds=torch.randn(2, 4, 32), negative_prompt_attention_mask=negative_mask
    ).shape == (2, 3, 32, 32)
    assert generate(pipe, **kept, guidance_scale=1.0).shape == (2, 3, 32, 32)  # no guidance: no learned text


def test_a_callback_cannot_turn_guidance_on_in_a_call_started_without_it(pipe):
    """A call with guidance 1 at every scale runs no unconditional rows: a callback raising the guidance is refused
    (it changed nothing before); one lowering a guided call's guidance to 1 works."""

    def set_guidance(value):
        def callback(p, i, hw, tensors):
            if i == 1:
                p._guidance_scale = value
            return {}

        return callback

    with pytest.raises(ValueError, match=r"a callback set `guidance_scale` to 3\.0, but this call started without"):
        generate(pipe, guidance_scale=1.0, callback_on_step_end=set_guidance(3.0))
    assert not torch.equal(
        generate(pipe, guidance_scale=3.0, callback_on_step_end=set_guidance(1.0)), generate(pipe, guidance_scale=3.0)
    )


def test_a_callback_may_edit_the_per_scale_guidance_list_in_place(pipe):
    """The loop noticed only a new object in ``pipe._guidance_scale``: a list edited in place kept the old guidance
    (and a NaN written into it went unchecked), and the edit changed the caller's list. The call now works on a copy
    and notices an edit as it notices an assignment."""

    def edit(change):
        def callback(p, i, hw, tensors):
            if i == 0:
                change(p)
            return {}

        return callback

    def in_place(p):
        p._guidance_scale[1:] = [1.0] * 6

    def assign(p):
        p._guidance_scale = [3.0] + [1.0] * 6

    guidance = [3.0] * 7
    edited = generate(pipe, guidance_scale=guidance, callback_on_step_end=edit(in_place))
    assert guidance == [3.0] * 7  # the caller's list as it was
    assert torch.equal(edited, generate(pipe, guidance_scale=guidance, callback_on_step_end=edit(assign)))
    assert not torch.equal(edited, generate(pipe, guidance_scale=guidance))

    def nan_in_place(p):
        p._guidance_scale[3] = float("nan")

    with pytest.raises(ValueError, match=r"`pipe._guidance_scale \(set by callback_on_step_end\)` must be a finite"):
        generate(pipe, guidance_scale=guidance, callback_on_step_end=edit(nan_in_place))


def test_offload_sequence_moves_text_encoder_first():
    assert InfinityPipeline.model_cpu_offload_seq.split("->")[0] == "text_encoder"


def test_converter_errors_name_the_parameter(tmp_path):
    path = fixture_dir("infinity")
    with pytest.raises(ConversionError, match="transformer"):
        convert_infinity_checkpoint(
            path / "vae.pth", tmp_path / "missing.pth", path / "text_encoder", path / "tokenizer"
        )
    with pytest.raises(ConversionError, match="vae"):  # a transformer file given as the VAE
        convert_infinity_checkpoint(
            path / "transformer/infinity.pth",
            path / "transformer/infinity.pth",
            path / "text_encoder",
            path / "tokenizer",
        )
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match="transformer"):
        convert_infinity_checkpoint(path / "vae.pth", tmp_path / "bad.pth", path / "text_encoder", path / "tokenizer")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="output"):
        convert_infinity_checkpoint(
            path / "vae.pth", path / "transformer/infinity.pth", path / "text_encoder", path / "tokenizer", out
        )


def test_converter_refuses_a_tokenizer_that_is_not_the_text_encoders_and_names_float16_overflow(tmp_path):
    """A folder without tokenizer files (every word unknown: the prompts were ignored) or another model's tokenizer
    (ids beyond T5's table: an IndexError at generation) converted without a word; a T5 weight beyond float16's range
    was blamed on the checkpoint (T5 was loaded in float16, where it turned infinite)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import fixture_dir as fixtures

    path = fixture_dir("infinity")
    checkpoints = (path / "vae.pth", path / "transformer/infinity.pth", path / "text_encoder")
    for tokenizer, message in (
        (path / "text_encoder", "reads plain words .* as unknown tokens"),
        (fixtures("star") / "text_encoder_sd21_layout" / "tokenizer", "has 520 tokens, more than the text encoder.s"),
    ):
        with pytest.raises(ConversionError, match=f"`tokenizer`: the tokenizer {message}"):
            convert_infinity_checkpoint(*checkpoints, tokenizer, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    shutil.copytree(path / "text_encoder", tmp_path / "t5")
    weights = load_file(tmp_path / "t5" / "model.safetensors")
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    weights[key] = weights[key].clone()
    weights[key][0, 0] = 1e5
    save_file(weights, tmp_path / "t5" / "model.safetensors", metadata={"format": "pt"})
    t5 = (path / "vae.pth", path / "transformer/infinity.pth", tmp_path / "t5", path / "tokenizer")
    with pytest.raises(ConversionError, match=rf"`dtype` float16: `text_encoder.{key}` holds values up to 1e\+05"):
        convert_infinity_checkpoint(*t5, dtype=torch.float16)
    pipe = convert_infinity_checkpoint(*t5, dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == torch.bfloat16


def test_converter_reads_a_sharded_directory(tmp_path):
    import json

    from safetensors.torch import save_file

    path = fixture_dir("infinity")
    state_dict = torch.load(path / "transformer/infinity.pth", weights_only=True)
    keys = sorted(state_dict)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    folder = tmp_path / "sharded"
    folder.mkdir()
    for name, names in shards.items():
        save_file({k: state_dict[k].contiguous() for k in names}, folder / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pipe = convert_infinity_checkpoint(path / "vae.pth", folder, path / "text_encoder", path / "tokenizer")
    reference = convert_infinity_checkpoint(
        path / "vae.pth", path / "transformer/infinity.pth", path / "text_encoder", path / "tokenizer"
    )
    for (name, a), b in zip(pipe.transformer.state_dict().items(), reference.transformer.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli(tmp_path):
    import runpy
    from pathlib import Path

    path = fixture_dir("infinity")
    script = Path(__file__).resolve().parents[1] / "conversion" / "convert_infinity.py"
    main = runpy.run_path(str(script))["main"]
    args = [
        "--vae",
        str(path / "vae.pth"),
        "--transformer",
        str(path / "transformer/infinity.pth"),
        "--text-encoder",
        str(path / "text_encoder"),
        "--tokenizer",
        str(path / "tokenizer"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert main(args) == 2  # refuses to overwrite without --overwrite
    assert main(args + ["--overwrite"]) == 0


def test_tau_multiplies_by_its_reciprocal_as_the_original(pipe):
    """The original scales the logits by ``.mul(1 / tau)``; a division rounds differently for a tau that is not a power
    of two (a third of the logits 1 ulp off at tau 0.7), enough to flip a sampled bit at a near-tie. The guided logits
    a callback sees are the model's, times 1 / tau, mixed by cfg, bit for bit."""
    seen = []
    generate(
        pipe,
        tau=0.7,
        guidance_scale=3.0,
        callback_on_step_end=lambda p, si, hw, t: seen.append((t["model_logits"], t["guided_logits"])) or {},
        callback_on_step_end_tensor_inputs=["model_logits", "guided_logits"],
    )
    for model_logits, guided_logits in seen:
        scaled = model_logits.mul(1 / 0.7)
        B = scaled.shape[0] // 2
        expected = 3.0 * scaled[:B] + (1 - 3.0) * scaled[B:]
        assert torch.equal(guided_logits.flatten(1), expected.flatten(1))


def test_bsq_codes_are_the_originals_scale_exactly():
    """The binary spherical quantiser's value is ``q_scale * (+-1)`` with ``q_scale = 1 / sqrt(d)`` in the original; a
    division by sqrt(d) rounds to the neighbouring float32 for some d (24: 1.8e-7 off in the quantised latent)."""
    from diffusers_var.models.bitwise_vae import BitwiseMultiScaleVAE

    for d in (14, 16, 24, 32):
        residual = torch.randn(2, d, 3, 3, generator=torch.Generator().manual_seed(d))
        bits, quantized = BitwiseMultiScaleVAE._bsq(residual)
        z = torch.nn.functional.normalize(residual, dim=1)
        zhat = (1.0 / d**0.5) * torch.where(z > 0, torch.tensor(1.0), torch.tensor(-1.0))
        assert torch.equal(quantized, z + (zhat - z)), d  # the original's straight-through sum, bit for bit


def test_codes_and_decoder_input_keep_the_originals_channels_last_layout(pipe):
    """The original's codes are a channels-last view (``rearrange(codes, 'b ... d -> b d ...')``) and its running sum
    and decoder input follow it. The trilinear upsampling and the decoder's convolutions take other CPU kernels for
    another layout: the image drifted up to 3.6e-4 from the original's on 0.6M-pixel schedules (a spec-review beside
    the original); with the layout kept it is within 8e-6 and the summed codes are equal."""
    from diffusers_var.pipelines.sampling import nan_where_drawn_from_nonfinite

    codes = torch.randn(2, 3, 4, 5).permute(0, 3, 1, 2)  # (B, d, h, w), channels-last as the bits give them
    confidence = torch.ones(2, 5, 3, 4)
    confidence[1, 0, 2, 3] = torch.inf
    kept = nan_where_drawn_from_nonfinite(codes, confidence)
    assert kept.stride() == codes.stride() and kept[1, 0, 2, 3].isnan() and kept.isnan().sum() == 1
    seen = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        generate(pipe)
    finally:
        hook.remove()
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last) and seen[0].shape[2] > 1
    # a callback's contiguous latents go on channels-last: the same image as without it
    layouts = []

    def make_contiguous(p, si, hw, t):
        layouts.append(t["latents"].is_contiguous(memory_format=torch.channels_last))
        return {"latents": t["latents"].contiguous()}

    images = generate(pipe, callback_on_step_end=make_contiguous)
    assert len(layouts) > 2 and all(layouts) and torch.equal(images, generate(pipe))
    latents = generate(pipe, output_type="latent")  # returned in the usual layout (a view(B, -1) works)
    assert latents.is_contiguous() and torch.equal(pipe.decode_latents(latents), pipe.decode_latents(seen[0]))
