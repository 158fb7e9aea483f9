"""In-painting, out-painting and image-to-image for every family (``VARInpaintPipeline``, ``VARImg2ImgPipeline`` and
the STAR / Infinity counterparts), on the tiny components of ``tiny_components.py``: the properties of next-scale
editing, the mask rules, and the fast path's forcing inside VAR's whole-scale graphs. The batteries
(``test_pipeline_battery.py``, ``test_diffusers_battery.py``) cover outputs, persistence, callbacks, offloading and
bad inputs; ``test_var_parity.py`` the original notebook's edit.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffusers_var.pipelines.fast_inference as fast_inference
import diffusers_var.pipelines.pipeline_var as pipeline_var
from diffusers_var import (
    InfinityImg2ImgPipeline,
    InfinityInpaintPipeline,
    InfinityPipeline,
    STARImg2ImgPipeline,
    STARInpaintPipeline,
    STARPipeline,
    VARImg2ImgPipeline,
    VARInpaintPipeline,
    VARPipeline,
)
from diffusers_var.pipelines.pipeline_utils import (
    SMALLEST_KEPT_TOKENS,
    TokenForcing,
    latent_grid_mask,
    scale_keep_masks,
)
from test_fast_inference import EagerGraphStandIn, tiny_var
from tiny_components import infinity_components, star_components, var_components

PROMPTS = ["a red circle on a blue background", "a green square"]
# family -> (text / class pipeline, in-paint class, image-to-image class, the call's condition and sampling arguments)
FAMILIES = {
    "var": (
        lambda: VARPipeline(**var_components(seed=0)),
        VARInpaintPipeline,
        VARImg2ImgPipeline,
        {"class_labels": [1, 2], "top_k": 8},
    ),
    "star": (
        lambda: STARPipeline(**star_components(seed=0, stable_sampler=False)),
        STARInpaintPipeline,
        STARImg2ImgPipeline,
        {"prompt": PROMPTS, "top_k": 10, "top_p": 0.9},
    ),
    "star_stable_sampler": (
        lambda: STARPipeline(**star_components(seed=0, sampler_start_scale=2)),
        STARInpaintPipeline,
        STARImg2ImgPipeline,
        {"prompt": PROMPTS, "top_k": 10, "top_p": 0.9},
    ),
    "infinity": (
        lambda: InfinityPipeline(**infinity_components(seed=0)),
        InfinityInpaintPipeline,
        InfinityImg2ImgPipeline,
        {"prompt": PROMPTS, "height": 32, "width": 32, "top_k": 2},
    ),
    # 2x2 latent positions per token: bit labels and token bits have different layouts
    "infinity_patchify": (
        lambda: InfinityPipeline(**infinity_components(seed=0, spatial_patchify=True)),
        InfinityInpaintPipeline,
        InfinityImg2ImgPipeline,
        {"prompt": PROMPTS, "height": 64, "width": 64, "top_k": 2},
    ),
}
_PIPES: dict = {}


def pipes(family: str):
    """``(plain, inpaint, img2img)`` of a family; the task pipelines made with ``from_pipe`` (shared weights)."""
    if family not in _PIPES:
        make, inpaint_class, img2img_class, _ = FAMILIES[family]
        plain = make()
        trio = (plain, inpaint_class.from_pipe(plain), img2img_class.from_pipe(plain))
        for pipe in trio:
            pipe.set_progress_bar_config(disable=True)
        _PIPES[family] = trio
    return _PIPES[family]


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def size_kwargs(family: str) -> dict:
    call = FAMILIES[family][3]
    return {k: call[k] for k in ("height", "width") if k in call}


def schedule_of(family: str) -> list[tuple[int, int]]:
    return pipes(family)[1]._edit_schedule(**size_kwargs(family))


def input_image(family: str, seed: int = 0, batch: int = 1) -> torch.Tensor:
    height, width = pipes(family)[1].pixel_size(schedule_of(family))
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def run(pipe, family: str, seed: int = 0, output_type: str = "pt", **kwargs):
    call = {
        **FAMILIES[family][3],
        "generator": torch.Generator().manual_seed(seed),
        "output_type": output_type,
        **kwargs,
    }
    return pipe(**call).images


def traced(pipe, family: str, **kwargs):
    """``(images, tokens of every scale)`` of a call (the tokens that entered the running latent)."""
    seen = []
    images = run(
        pipe,
        family,
        callback_on_step_end_tensor_inputs=["tokens"],
        callback_on_step_end=lambda p, si, hw, t: seen.append(t["tokens"].clone()) or {},
        **kwargs,
    )
    return images, seen


def input_tokens(family: str, image: torch.Tensor, batch: int = 2) -> list[torch.Tensor]:
    """The input's tokens per scale in the loop's layout (indices (B, h*w) or bits (B, h*w, bits)), one row per
    image."""
    pipe = pipes(family)[1]
    tokens = pipe.prepare_image_tokens(image, None, schedule_of(family), 1, batch, "cpu")
    return [t.flatten(1, 2) if t.ndim == 4 else t for t in tokens]


def reconstruction(family: str, image: torch.Tensor) -> torch.Tensor:
    """The tokenizer's reconstruction of ``image`` (in [0, 1]) at the pipeline's size."""
    pipe, schedule = pipes(family)[1], schedule_of(family)
    pixels = pipe.image_processor.preprocess(image, *pipe.pixel_size(schedule))
    with torch.no_grad():
        tokens = pipe.encode_image_tokens(pixels, schedule)
        decoded = pipe.vae.decode_bit_labels(tokens) if hasattr(pipe, "vae") else pipe.vqvae.decode_indices(tokens)
    return (decoded + 1) / 2


def grid_mask(family: str, rows=slice(None), cols=slice(None)) -> torch.Tensor:
    h, w = schedule_of(family)[-1]
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


# -- sharing weights ------------------------------------------------------------------------------------------
def test_from_pipe_shares_every_component(family):
    plain, inpaint, img2img = pipes(family)
    for name, component in plain.components.items():
        assert getattr(inpaint, name) is component and getattr(img2img, name) is component, name


# -- in-painting ---------------------------------------------------------------------------------------------
def test_tokens_outside_the_mask_are_the_inputs_at_every_scale(family):
    _, inpaint, _ = pipes(family)
    image, mask = input_image(family), inpaint.box_mask(0.25, 0.3, 0.8, 0.9, **size_kwargs(family))
    _, tokens = traced(inpaint, family, image=image, mask_image=mask)
    keep = inpaint.prepare_mask_keep(mask, schedule_of(family), 1, 2, "cpu")
    reference = input_tokens(family, image)
    generated = 0
    for si, (got, want, kept) in enumerate(zip(tokens, reference, keep)):
        kept = kept.flatten(1)
        assert torch.equal(got[kept], want[kept]), f"scale {si}: a kept token differs from the input's"
        generated += int((~kept).sum())
    assert generated > 0 and not torch.equal(torch.cat(tokens, 1), torch.cat(reference, 1))  # something was sampled


def test_mask_dilation_grows_the_generated_cells(family):
    """``mask_dilation=1`` generates the 3x3 neighbourhood of every masked latent cell (then the notebook's rule per
    scale): the last scale keeps exactly the cells outside it, and the kept tokens are still the input's."""
    _, inpaint, _ = pipes(family)
    schedule = schedule_of(family)
    h, w = schedule[-1]
    mask = grid_mask(family, slice(1, 2), slice(w - 2, w - 1))
    grown = grid_mask(family, slice(0, 3), slice(w - 3, w))
    keep = inpaint.prepare_mask_keep(mask, schedule, 1, 1, "cpu", mask_dilation=1)
    assert torch.equal(keep[-1][0], ~grown)
    assert [torch.equal(a, b) for a, b in zip(keep, inpaint.prepare_mask_keep(grown, schedule, 1, 1, "cpu"))] == [
        True
    ] * len(schedule)
    image = input_image(family, seed=3)
    images, tokens = traced(inpaint, family, image=image, mask_image=mask, mask_dilation=1)
    assert torch.equal(images, run(inpaint, family, image=image, mask_image=grown))
    kept = keep[-1].flatten(1).expand(tokens[-1].shape[0], -1)
    assert torch.equal(tokens[-1][kept], input_tokens(family, image)[-1][kept])


def test_kept_token_grid_says_what_a_mask_keeps_before_generating(family):
    """``kept_token_grid``: the last scale's cells a mask keeps, as the call keeps them; a region smaller than a
    cell keeps nothing when out-painting around it (the demo refuses that instead of regenerating everything)."""
    _, inpaint, _ = pipes(family)
    schedule, size = schedule_of(family), size_kwargs(family)
    h, w = schedule[-1]
    mask = grid_mask(family, slice(1, 2), slice(w - 2, w - 1))
    for dilation in (0, 1):
        expected = inpaint.prepare_mask_keep(mask, schedule, 1, 1, "cpu", mask_dilation=dilation)[-1]
        assert torch.equal(inpaint.kept_token_grid(mask, dilation, **size), expected)
    height, width = inpaint.pixel_size(schedule)
    dab = torch.zeros(height, width, dtype=torch.bool)
    dab[height // 2 - 1 : height // 2 + 1, width // 2 - 1 : width // 2 + 1] = True  # inside no whole cell
    assert not inpaint.kept_token_grid(~dab, **size).any() and inpaint.kept_token_grid(dab, **size).any()
    with pytest.raises(ValueError, match="mask_dilation"):
        inpaint.kept_token_grid(mask, -1, **size)
    with pytest.raises(ValueError, match="mask_image"):
        inpaint.kept_token_grid("mask.png", **size)
    # what the call refuses, this refuses too (it read an RGB array as a batch of masks W x 3 and gave H grids)
    with pytest.raises(ValueError, match="looks like an RGB"):
        inpaint.kept_token_grid(np.zeros((height, width, 3), np.float32), **size)
    with pytest.raises(ValueError, match=r"`mask_image` is an empty image \(0x0\)"):
        inpaint.kept_token_grid(PIL.Image.new("L", (0, 0)), **size)
    # a mask at neither the image's (default: the pipeline's) size nor the grid's, as the call refuses it
    photo = torch.rand(3, 2 * height, 2 * width)
    with pytest.raises(ValueError, match=rf"`mask_image` is {height}x{width}, but the image's size is"):
        inpaint.kept_token_grid(dab, image=photo, **size)
    with pytest.raises(ValueError, match=rf"`mask_image` is {2 * height}x{2 * width}, but the pipeline's image size"):
        inpaint.kept_token_grid(torch.zeros(2 * height, 2 * width, dtype=torch.bool), **size)
    large_dab = dab.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(inpaint.kept_token_grid(large_dab, image=photo, **size), inpaint.kept_token_grid(dab, **size))


def test_an_empty_pil_image_or_mask_is_refused(family):
    """A 0-pixel PIL image was edited as whatever resizing it gave, and a 0-pixel PIL mask failed inside torch's
    pooling; arrays of no pixels were refused already."""
    _, inpaint, img2img = pipes(family)
    for width, height in ((0, 0), (0, 5)):
        empty = PIL.Image.new("RGB", (width, height))
        with pytest.raises(ValueError, match=rf"`image` is an empty image \({width}x{height}\)"):
            run(img2img, family, image=empty, strength=0.5)
        with pytest.raises(ValueError, match=rf"`mask_image` is an empty image \({width}x{height}\)"):
            run(inpaint, family, image=input_image(family), mask_image=empty.convert("L"))


def test_a_pil_mode_pil_cannot_convert_is_named(family):
    """A PIL image of a mode PIL cannot convert to RGB / grayscale ("La"; "LAB" for a mask) raised PIL's own
    "conversion from La to L not supported", naming neither the parameter nor what to pass."""
    _, inpaint, img2img = pipes(family)
    image = input_image(family)
    height, width = image.shape[-2:]
    la = PIL.Image.new("La", (width, height))
    with pytest.raises(ValueError, match=r"`image` is a PIL image of mode 'La', which PIL cannot convert to 'RGB'"):
        run(img2img, family, image=la, strength=0.5)
    for mode in ("La", "LAB"):
        with pytest.raises(ValueError, match=rf"`mask_image` is a PIL image of mode '{mode}'.*'L'"):
            run(inpaint, family, image=image, mask_image=PIL.Image.new(mode, (width, height)))


def test_star_stable_sampler_sees_the_kept_tokens_from_its_first_step():
    """In-painting with STAR's stable sampler: the kept positions' input codes are committed before a scale's first
    step, so every sampler-head pass conditions on them (it saw its own samples there before, and the input came back
    only after the scale); the kept tokens still end up as the input's."""
    family = "star_stable_sampler"
    _, inpaint, _ = pipes(family)
    image = input_image(family, seed=2)
    schedule = schedule_of(family)
    h, w = schedule[-1]
    mask = grid_mask(family, slice(0, h // 2))  # generate the top half
    keep = inpaint.prepare_mask_keep(mask, schedule, len(PROMPTS), 1, "cpu")
    codes = [inpaint.vqvae.embed_tokens(t).float() for t in input_tokens(family, image)]
    start = inpaint.transformer.config.sampler_start_scale
    seen = []
    sampler_logits = inpaint.transformer.sampler_scale_logits

    def spy(scale_index, hidden, committed, pooled):
        seen.append((scale_index, committed.clone()))
        return sampler_logits(scale_index, hidden, committed, pooled)

    inpaint.transformer.sampler_scale_logits = spy
    try:
        images, tokens = traced(inpaint, family, image=image, mask_image=mask)
    finally:
        del inpaint.transformer.sampler_scale_logits
    checked = 0
    for scale_index, committed in seen:
        kept = keep[scale_index].flatten(1)  # (B, l)
        assert scale_index >= start
        torch.testing.assert_close(committed[kept], codes[scale_index][kept], rtol=0, atol=0)
        checked += int(kept.sum())
    assert checked and {k for k, _ in seen} == set(range(start, len(schedule)))
    last = keep[-1].flatten(1)
    assert torch.equal(tokens[-1][last], input_tokens(family, image)[-1][last])


def test_all_false_mask_returns_the_reconstruction(family):
    _, inpaint, _ = pipes(family)
    image = input_image(family, seed=1)
    images, tokens = traced(inpaint, family, image=image, mask_image=grid_mask(family, slice(0, 0)))
    for got, want in zip(tokens, input_tokens(family, image)):
        assert torch.equal(got, want)
    torch.testing.assert_close(images, reconstruction(family, image).expand_as(images), atol=1e-5, rtol=0)


def test_all_true_mask_keeps_only_the_smallest_scales(family):
    """The rule's always-kept scales (at most 3 tokens) come from the input, nothing else: the same images as
    image-to-image keeping exactly those scales, and other images than without an input at all."""
    plain, inpaint, img2img = pipes(family)
    schedule = schedule_of(family)
    image, everything = input_image(family, seed=2), grid_mask(family)
    keep = inpaint.prepare_mask_keep(everything, schedule, 1, 1, "cpu")
    always = [h * w <= SMALLEST_KEPT_TOKENS for h, w in schedule]
    assert [bool(k.all()) for k in keep] == always and [bool(k.any()) for k in keep] == always
    images = run(inpaint, family, image=image, mask_image=everything)
    strength = (len(schedule) - sum(always) + 0.5) / len(schedule)  # int(S * strength) = the scales not kept
    assert torch.equal(images, run(img2img, family, image=image, strength=strength))
    assert not torch.equal(images, run(plain, family))


def test_image_and_its_tokens_give_the_same_edit(family):
    _, inpaint, img2img = pipes(family)
    schedule, image = schedule_of(family), input_image(family, seed=3)
    mask = grid_mask(family, slice(1, None))
    height, width = inpaint.pixel_size(schedule)
    with torch.no_grad():
        tokens = inpaint.encode_image_tokens(inpaint.image_processor.preprocess(image, height, width), schedule)
    assert torch.equal(
        run(inpaint, family, image=image, mask_image=mask), run(inpaint, family, image_indices=tokens, mask_image=mask)
    )
    assert torch.equal(run(img2img, family, image=image), run(img2img, family, image_indices=tokens))
    # the right shapes in a dtype that is not taken (VQ tokens: int16; bits: float): the dtype is named
    wrong = torch.float32 if family.startswith("infinity") else torch.int16
    with pytest.raises(ValueError, match=rf"`image_indices\[0\]` must be .* got \([0-9, ]+\) {wrong}"):
        run(img2img, family, image_indices=[t.to(wrong) for t in tokens])
    # meta-device tensors (a shape without values) are named, not failed on deep inside torch
    with pytest.raises(ValueError, match="`image_indices` holds tensors on the meta device"):
        run(img2img, family, image_indices=[t.to("meta") for t in tokens])
    with pytest.raises(ValueError, match="`image` is a tensor on the meta device"):
        run(img2img, family, image=torch.empty(1, 3, height, width, device="meta"))
    with pytest.raises(ValueError, match="`mask_image` is a tensor on the meta device"):
        run(inpaint, family, image=image, mask_image=torch.empty(1, height, width, device="meta"))


def test_image_formats_give_the_same_edit():
    """A PIL image (RGBA too), a uint8 array and a float tensor of the same pixels are the same input."""
    _, inpaint, _ = pipes("var")
    pixels = (input_image("var", seed=9) * 255).round().byte()
    array = pixels[0].permute(1, 2, 0).numpy()
    mask = grid_mask("var", slice(1, None))
    reference = run(inpaint, "var", image=pixels / 255.0, mask_image=mask)
    for image in (array, PIL.Image.fromarray(array), PIL.Image.fromarray(array).convert("RGBA"), [array]):
        assert torch.equal(run(inpaint, "var", image=image, mask_image=mask), reference), type(image)
    # a 16-bit grayscale PNG and mask (mode I;16) are scaled to 8 bits; PIL's convert had clipped them to white
    gray16 = PIL.Image.fromarray((array[..., 0].astype(np.uint16) * 257))
    gray8 = PIL.Image.fromarray(array[..., 0]).convert("RGB")
    assert torch.equal(
        run(inpaint, "var", image=gray16, mask_image=mask), run(inpaint, "var", image=gray8, mask_image=mask)
    )
    mask16 = PIL.Image.fromarray(mask.numpy().astype(np.uint16) * 65535)
    assert torch.equal(
        run(inpaint, "var", image=gray8, mask_image=mask16), run(inpaint, "var", image=gray8, mask_image=mask)
    )
    # a 16-bit mask of 0 / 1 (a segmentation saved as uint16) holds 0 / 1 as an 8-bit one does; scaled, it was empty
    binary = mask.numpy().astype(np.uint16)
    for binary16 in (PIL.Image.fromarray(binary), PIL.Image.fromarray(binary.astype(np.int32))):  # modes I;16, I
        assert torch.equal(
            run(inpaint, "var", image=gray8, mask_image=binary16), run(inpaint, "var", image=gray8, mask_image=mask)
        )
    assert PIL.Image.fromarray(binary).mode == "I;16" and mask.sum() > 0


def test_flipped_and_rotated_numpy_inputs_are_taken_as_they_look(family):
    """numpy views with negative strides (``np.fliplr``, ``[::-1]``, ``np.rot90``) of images and masks, which
    ``torch.as_tensor`` refuses, are the same inputs as their contiguous copies."""
    _, inpaint, img2img = pipes(family)
    image = input_image(family, seed=6)[0].permute(1, 2, 0).numpy()
    height, width = image.shape[:2]
    mask = np.zeros((height, width), dtype=np.float32)
    mask[: height // 2, : width // 4] = 1
    for view in (np.fliplr(image), image[::-1], np.rot90(image, 2)):
        assert torch.equal(
            run(img2img, family, image=view, strength=0.5), run(img2img, family, image=view.copy(), strength=0.5)
        )
    for view in (np.fliplr(mask), np.fliplr(mask > 0), np.fliplr((mask * 255).astype(np.uint8))):
        assert torch.equal(
            run(inpaint, family, image=image, mask_image=view),
            run(inpaint, family, image=image, mask_image=view.copy()),
        )


def test_an_image_just_below_zero_is_read_as_minus_one_to_one_with_a_warning(family):
    """diffusers' rule reads an image with a negative value as [-1, 1]; a [0, 1] image with a little undershoot would
    silently wash out, so that case is said."""
    _, _, img2img = pipes(family)
    image = input_image(family, seed=7)
    undershoot = image.clone()
    undershoot[0, 0, 0, 0] = -1e-3
    with pytest.warns(UserWarning, match=r"`image` has values just below 0 \(min -0.001\).*clamp"):
        run(img2img, family, image=undershoot, strength=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*just below 0")
        run(img2img, family, image=image * 2 - 1, strength=0.5)  # a [-1, 1] image: as diffusers reads it
        run(img2img, family, image=image, strength=0.5)


def test_each_image_of_a_batch_is_read_in_its_own_range(family):
    """diffusers' image processor reads a whole batch as [-1, 1] when any value of it is negative: a [0, 1] or uint8
    image beside a [-1, 1] one came out with other colours. Each image keeps its own range (the README's rule)."""
    _, _, img2img = pipes(family)
    image, other = input_image(family, seed=9), input_image(family, seed=10)
    as_uint8 = (image * 255).round().to(torch.uint8)

    def pair(batch):  # one image per prompt / label; strength 0: the tokenizer's reconstruction of each, no draw
        return run(img2img, family, image=batch, strength=0.0)

    other_alone = run(img2img, family, image=other, strength=0.0)
    for first, batch in (
        (image, [image[0], other[0] * 2 - 1]),
        (image, torch.cat([image, other * 2 - 1])),
        (as_uint8, [as_uint8[0], other[0] * 2 - 1]),
        (image, np.stack([image[0].permute(1, 2, 0).numpy(), (other[0] * 2 - 1).permute(1, 2, 0).numpy()])),
    ):
        images = pair(batch)
        first_alone = run(img2img, family, image=first, strength=0.0)
        torch.testing.assert_close(images[:1], first_alone[:1], atol=1e-5, rtol=0)
        torch.testing.assert_close(images[1:], other_alone[1:], atol=1e-5, rtol=0)


def test_var_task_pipelines_take_the_temperature():
    """``temperature`` (one value or one per scale) works in VAR's task pipelines as in VARPipeline."""
    plain, inpaint, img2img = pipes("var")
    num_scales = len(schedule_of("var"))
    image = input_image("var", seed=8)
    for temperature in (0.01, [0.01] * num_scales):  # the tiny logits are flat: only a sharp temperature shows
        assert torch.equal(
            run(img2img, "var", image=image, strength=1.0, temperature=temperature),
            run(plain, "var", temperature=temperature),
        )
    assert not torch.equal(run(plain, "var", temperature=0.01), run(plain, "var"))
    assert not torch.equal(
        run(inpaint, "var", image=image, mask_image=grid_mask("var", slice(1, None)), temperature=0.01),
        run(inpaint, "var", image=image, mask_image=grid_mask("var", slice(1, None))),
    )
    for pipe, extra in ((img2img, {}), (inpaint, {"mask_image": grid_mask("var")})):
        with pytest.raises(ValueError, match="`temperature`"):
            run(pipe, "var", image=image, temperature=0.0, **extra)
        with pytest.raises(ValueError, match="`temperature`"):
            run(pipe, "var", image=image, temperature=[1.0, 2.0], **extra)


def test_pixel_masks_become_latent_grid_masks(family):
    """A pixel mask (at the image's size; PIL, numpy or torch) edits exactly what its latent-grid reduction edits: a
    cell is generated when any of its pixels is white."""
    _, inpaint, _ = pipes(family)
    schedule, image = schedule_of(family), input_image(family, seed=4)
    height, width = inpaint.pixel_size(schedule)
    (h, w), per_token = schedule[-1], height // schedule[-1][0]
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[height // 2 :, : per_token + 1] = 255  # the left column of cells and one pixel of the next
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[h // 2 :, :2] = True
    assert torch.equal(latent_grid_mask(torch.from_numpy(pixels)[None, None] / 255, (h, w))[0], expected)
    reference = run(inpaint, family, image=image, mask_image=expected)
    for mask in (
        PIL.Image.fromarray(pixels),
        pixels,
        torch.from_numpy(pixels > 0),
        torch.from_numpy(pixels)[None] / 255.0,
        (pixels > 0).astype(int),  # 0 / 1 integers, what np.zeros(..., int) makes
        torch.from_numpy(pixels > 0).long(),
        (pixels > 0).astype(np.uint8),  # uint8 0 / 1 (not 0-255): it edited nothing, silently
        torch.from_numpy(pixels > 0).to(torch.uint8),
        PIL.Image.fromarray((pixels > 0).astype(np.uint8)),
    ):
        assert torch.equal(run(inpaint, family, image=image, mask_image=mask), reference), type(mask)
    with pytest.raises(ValueError, match=r"`mask_image` of integers \(int64\) must hold 0 / 1"):  # numpy's name
        run(inpaint, family, image=image, mask_image=(pixels > 0).astype(np.int64) * 2)
    with pytest.raises(ValueError, match=r"`mask_image` of integers \(torch.int64\) must hold 0 / 1"):
        run(inpaint, family, image=image, mask_image=torch.from_numpy(pixels > 0).long() * 2)
    with pytest.raises(ValueError, match=r"`image` must hold floats in \[0, 1\] or uint8 values, got numpy int64"):
        run(inpaint, family, image=np.zeros((height, width, 3), dtype=np.int64), mask_image=expected)


def test_one_image_per_prompt_or_per_generated_image(family):
    """Each image of a batch is edited as it would be alone (a generator per image)."""
    _, inpaint, _ = pipes(family)
    call = FAMILIES[family][3]
    condition = {k: call[k] for k in ("class_labels", "prompt") if k in call}
    images = input_image(family, seed=5, batch=2)
    masks = torch.stack([grid_mask(family, slice(1, None)), grid_mask(family, slice(None), slice(2, None))])
    batch = run(
        inpaint, family, image=images, mask_image=masks, generator=[torch.Generator().manual_seed(s) for s in (7, 8)]
    )
    for i, seed in enumerate((7, 8)):
        alone = run(
            inpaint,
            family,
            **{k: v[i : i + 1] for k, v in condition.items()},
            image=images[i : i + 1],
            mask_image=masks[i],
            generator=[torch.Generator().manual_seed(seed)],
        )
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    per_image = run(inpaint, family, image=images.repeat(2, 1, 1, 1), mask_image=masks[:1], num_images_per_prompt=2)
    assert per_image.shape[0] == 4


def test_a_numpy_batch_of_masks_of_a_grid_four_wide_is_not_an_rgba_image():
    """numpy (B, H, W) is a batch of masks; its width of 3 or 4 made it an "RGB(A) image" although it had the latent
    grid's size (the tiny VAR grid is 4 x 4). The same masks as torch tensors give the same images."""
    _, inpaint, _ = pipes("var")
    image = input_image("var", seed=11, batch=2)
    masks = np.zeros((2, 4, 4), np.float32)
    masks[0, :2] = masks[1, :, 2:] = 1
    assert torch.equal(
        run(inpaint, "var", image=image, mask_image=masks),
        run(inpaint, "var", image=image, mask_image=torch.from_numpy(masks)),
    )
    with pytest.raises(ValueError, match="looks like an RGB"):  # (H, W, 3) at no mask size is still an image
        run(inpaint, "var", image=image, mask_image=np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 8, 8\) \(numpy masks are channels-last"):
        run(inpaint, "var", image=image, mask_image=np.zeros((1, 1, 8, 8), np.float32))  # channels-first numpy
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 8, 8\) \(torch masks: \(H, W\)"):
        run(inpaint, "var", image=image, mask_image=torch.zeros(1, 2, 8, 8))


def test_box_mask_rounds_half_to_even_like_the_notebook():
    pipe = pipes("var")[1]  # a 4 x 4 latent grid
    mask = pipe.box_mask(0.125, 0.375, 0.625, 0.875)  # rows round(0.5)=0 .. round(2.5)=2, columns round(1.5)=2 .. 4
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 2:4] = True
    assert torch.equal(mask, expected)
    assert torch.equal(pipe.box_mask(0.125, 0.375, 0.625, 0.875, inpainting=False), ~expected)
    assert pipes("infinity")[1].box_mask(0.0, 0.0, 0.5, 0.25, height=32, width=32).sum() == 8 * 4
    for bad, name in (
        ((0.5, 0.0, 0.25, 1.0), "y0"),
        ((-0.1, 0.0, 1.0, 1.0), "y0"),
        ((0.0, 0.0, 1.0, float("nan")), "x1"),
    ):
        with pytest.raises(ValueError, match=name):
            pipe.box_mask(*bad)


def test_scale_masks_follow_the_notebook_rule():
    """bilinear (align_corners=False) of the keep side, > 0.5; scales of at most 3 tokens keep everything."""
    generate = torch.zeros(1, 8, 8, dtype=torch.bool)
    generate[:, 2:6, 2:6] = True
    keep = scale_keep_masks(generate, [(1, 1), (1, 3), (2, 2), (4, 4), (8, 8)])
    assert keep[0].all() and keep[1].all()  # 1 and 3 tokens
    # 2 x 2: each sample sits between pixels 1 | 2 and 5 | 6 on both axes, 3 of its 4 neighbours kept: 0.75, kept
    assert keep[2].all()
    ring = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(keep[3][0], ring)
    assert torch.equal(keep[4], ~generate)


# -- image-to-image --------------------------------------------------------------------------------------------
def test_strength_one_is_the_plain_pipeline(family):
    plain, _, img2img = pipes(family)
    assert torch.equal(run(img2img, family, image=input_image(family), strength=1.0), run(plain, family))


def test_strength_zero_returns_the_reconstruction(family):
    _, _, img2img = pipes(family)
    image = input_image(family, seed=6)
    images = run(img2img, family, image=image, strength=0.0)
    torch.testing.assert_close(images, reconstruction(family, image).expand_as(images), atol=1e-5, rtol=0)


def test_strength_keeps_the_first_scales_exactly(family):
    _, _, img2img = pipes(family)
    schedule, image = schedule_of(family), input_image(family, seed=7)
    _, tokens = traced(img2img, family, image=image, strength=0.5)
    kept = len(schedule) - int(len(schedule) * 0.5)
    reference = input_tokens(family, image)
    assert all(torch.equal(tokens[si], reference[si]) for si in range(kept))
    assert not torch.equal(torch.cat(tokens[kept:], 1), torch.cat(reference[kept:], 1))


# -- the fast path: forcing inside VAR's whole-scale CUDA graphs -------------------------------------------------
@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """The CPU stand-in of the CUDA graphs (test_fast_inference): the graph path's wiring, run eagerly."""
    EagerGraphStandIn.built = []
    monkeypatch.setattr(fast_inference.FastInferenceMixin, "_cuda_graphs_usable", staticmethod(lambda device: True))
    for module in (fast_inference, pipeline_var):
        monkeypatch.setattr(module, "CUDAGraphScaleSteps", EagerGraphStandIn)
    monkeypatch.setattr(
        fast_inference.FastInferenceMixin,
        "_graph_sampling_generator",
        lambda self, device, generator: generator if self._use_cuda_graphs else None,
    )
    return EagerGraphStandIn


def test_var_graphs_run_the_forcing_from_their_static_copy(graphs_on_cpu):
    """In-painting and image-to-image under ``enable_fast_inference()``: the whole-scale graphs (sampling inside) put
    the input's tokens back from their static copy, refilled per call, and give the eager images and generator
    state; one graph set per (batch, settings) serves every image and mask."""
    eager = tiny_var()
    graphed = tiny_var().enable_fast_inference(dtype=torch.float32)
    pairs = [
        (VARInpaintPipeline.from_pipe(eager), VARInpaintPipeline.from_pipe(graphed)),
        (VARImg2ImgPipeline.from_pipe(eager), VARImg2ImgPipeline.from_pipe(graphed)),
    ]
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = [
        torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool),
        torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool),
    ]
    cases = [
        (pairs[0], {"mask_image": masks[0], "image": images[:1]}),
        (pairs[0], {"mask_image": masks[1], "image": images[1:]}),
        (pairs[0], {"mask_image": masks[0], "image": images[1:], "more_smooth": True}),
        (pairs[1], {"strength": 0.5, "image": images[:1]}),
        (pairs[1], {"strength": 0.75, "image": images[1:]}),
    ]
    for seed, ((reference_pipe, pipe), edit) in enumerate(cases):
        results = []
        for p in (reference_pipe, pipe):
            generator = torch.Generator().manual_seed(seed)
            latent = p(
                class_labels=[1, 4],
                generator=generator,
                guidance_scale=3.0,
                top_k=10,
                top_p=0.9,
                output_type="latent",
                **edit,
            ).images
            results.append((latent, generator.get_state()))
        assert torch.equal(results[0][0], results[1][0]), edit
        assert torch.equal(results[0][1], results[1][1])

    def keys(p):  # (top_k, more_smooth, forcing): masks, images and strengths are not part of the key
        return sorted((key[3], key[2].more_smooth, key[5]) for key in p._graph_steps)

    assert keys(pairs[0][1]) == [(10, False, True), (10, True, True)] and keys(pairs[1][1]) == [(10, False, True)]
    assert not graphed._graph_steps  # from_pipe passed fast inference on; each pipeline captures its own graphs


def test_var_graphs_fall_back_to_eager_for_other_forcing_hooks_and_say_so(graphs_on_cpu, caplog):
    pipe = tiny_var().enable_fast_inference(dtype=torch.float32)
    keep_first = lambda si, code_map, indices: (code_map * 0, indices) if si == 0 else (code_map, indices)  # noqa: E731
    labels = torch.tensor([1, 2])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            pipe._begin_call(4.0, 4)
            pipe._sample_scales(labels, 10, 0.9, False, torch.Generator().manual_seed(0), forcing=keep_first)
    warnings = [r for r in caplog.records if "cannot run inside" in r.getMessage()]
    assert len(warnings) == 1  # once per pipeline
    assert not [key for key in pipe._graph_steps if key[0] == "sampling"]  # sampling stayed eager
    forcing = TokenForcing(
        [torch.ones(2, n, n, dtype=torch.bool) for n in (1, 2, 3, 4)],
        [torch.zeros(2, n * n, dtype=torch.long) for n in (1, 2, 3, 4)],
        [torch.zeros(2, 8, n, n) for n in (1, 2, 3, 4)],
    )
    pipe._begin_call(4.0, 4)
    pipe._sample_scales(labels, 10, 0.9, False, torch.Generator().manual_seed(0), forcing=forcing)
    assert [key for key in pipe._graph_steps if key[0] == "sampling"]  # a TokenForcing runs in the graphs


def test_fast_switches_are_shared_by_pipelines_sharing_the_transformer(graphs_on_cpu, monkeypatch):
    """``enable_fast_inference`` casts and fits modules that ``from_pipe`` shares, so its switches live on the
    transformer: a derived pipeline's switch is its source's too (no pipeline runs the eager path on fitted modules).
    Each pipeline's captured graphs are freed when the switches change or the weights move, through it or a sibling,
    and a sibling's first call leaves the others' graphs (and the float8 copies they read) alone."""
    monkeypatch.setattr(fast_inference, "uses_fp8", lambda linear, x: False)  # float8 copies made, matmuls eager

    def generate(pipe):
        pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), top_k=10, output_type="latent")

    def captured(pipe):  # without reading `_graph_steps`, which frees stale sets
        return len(pipe.__dict__.get("_graph_sets", ()))

    source = tiny_var()
    derived = VARImg2ImgPipeline.from_pipe(source)
    derived.enable_fast_inference(fp8=True)
    assert source._fast_inference and source._use_cuda_graphs and source._fast_dtype == torch.bfloat16
    generate(source)
    fp8_weight = source.transformer.blocks[0].attn.to_qkv.weight_fp8
    sibling = VARPipeline.from_pipe(source)
    generate(sibling)  # its first call: the float8 copies stay, so do the source's graphs
    assert source.transformer.blocks[0].attn.to_qkv.weight_fp8 is fp8_weight
    assert captured(source) == 1 and captured(sibling) == 1
    sibling.to("cpu")  # (a move or cast) every sibling's graphs are stale
    assert captured(sibling) == 0 and not source._graph_steps
    generate(source)
    derived.disable_fast_inference()
    assert not source._fast_inference and captured(derived) == 0
    generate(source)  # graphs off: its stale sets are freed at its next call
    assert captured(source) == 0
    source.enable_fast_inference()
    assert derived._fast_inference and not VARPipeline.from_pipe(derived)._graph_steps


def test_image_processor_of_a_pipeline_without_its_tokenizer_names_it():
    """diffusers' ``__getattr__`` turned the property's AttributeError (no ``vqvae``) into "no attribute
    'image_processor'"; the pipeline's own check names the missing component."""
    plain = pipes("var")[0]
    with pytest.raises(ValueError, match=r"this VARInpaintPipeline has no `vqvae` \(built with None\)"):
        VARInpaintPipeline.from_pipe(plain, vqvae=None).image_processor


def test_forced_code_maps_keep_the_memory_layout_of_the_originals_blend():
    """The forced code map is the original's ``gt * force + h * (1 - force)``, layout included: a 1x1 map of
    channels-last strides comes out in NCHW strides, which the tokenizer's upsampling and Phi conv then read as the
    original does (with ``torch.where`` it kept (C, 1, C, C) and VAR's 512 px edits with ``more_smooth`` drifted from
    the original by up to 7e-3 in f_hat); larger channels-last maps stay channels-last."""
    sides, C = (1, 2, 3), 8
    keep = [torch.rand(1, n, n, generator=torch.Generator().manual_seed(n)) < 0.5 for n in sides]
    codes = [torch.randn(1, n * n, C).transpose(1, 2).reshape(1, C, n, n) for n in sides]  # as the tokenizer embeds
    forcing = TokenForcing(keep, [torch.zeros(1, n * n, dtype=torch.long) for n in sides], codes)
    for index, side in enumerate(sides):
        sampled = torch.randn(1, side * side, C).transpose(1, 2).reshape(1, C, side, side)
        sampled.masked_fill_(keep[index][:, None], float("nan"))  # overflowed where the given codes replace them
        code_map, _ = forcing(index, sampled, None)
        expected = torch.where(keep[index][:, None], codes[index], sampled)
        assert torch.equal(code_map, expected)
        assert code_map.stride() == ((C, 1, 1, 1) if side == 1 else (C * side * side, 1, side * C, C))
