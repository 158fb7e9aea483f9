"""One battery for every pipeline class of the package (with diffusers' own PipelineTesterMixin in
test_diffusers_battery.py): output types, seeds, generator lists, save / load, ``dtype=`` loading, the callback
contract (every declared tensor, a returned latent, diffusers' PipelineCallback, interrupt, deprecated names), CPU
offload with a generation, and bad inputs naming the parameter.

A new pipeline class joins by adding one :class:`Case` to ``CASES``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import cpu_offload
from diffusers.callbacks import PipelineCallback

from diffusers_var import (
    InfinityImg2ImgPipeline,
    InfinityInpaintPipeline,
    InfinityPipeline,
    MultiScaleVQModel,
    STARImg2ImgPipeline,
    STARInpaintPipeline,
    STARPipeline,
    VARCoDePipeline,
    VARImg2ImgPipeline,
    VARInpaintPipeline,
    VARPipeline,
)
from tiny_components import code_components, infinity_components, star_components, var_components

PROMPTS = ["a red circle on a blue background", "a green square"]


def edit_image(size: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, size, size) image in [0, 1] of values k / 255 (exact through PIL and uint8)."""
    return torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(seed)) / 255.0


def lower_mask(side: int) -> torch.Tensor:
    """A latent-grid mask (side, side) that generates all but the top quarter (most tokens of every scale but the
    first are sampled, so guidance and seeds show)."""
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[side // 4 :] = True
    return mask


# the tiny pipelines' sizes: VAR / STAR 8 x 8 pixels, 4 x 4 tokens; Infinity 32 x 32 pixels, 16 x 16 tokens
VQ_IMAGE, VQ_MASK, BITS_IMAGE, BITS_MASK = edit_image(8), lower_mask(4), edit_image(32), lower_mask(16)


def inpaint_bad_inputs(image: torch.Tensor, grid: int) -> list:
    """What every in-painting pipeline refuses, naming the parameter."""
    size = image.shape[-1]
    return [
        ({"mask_image": None}, "mask_image"),
        ({"mask_image": torch.ones(grid - 1, grid - 1)}, "mask_image"),
        ({"mask_image": torch.ones(size + 2, size + 2)}, "mask_image"),
        ({"image": edit_image(size + 4), "mask_image": torch.ones(size, size)}, "mask_image"),
        ({"mask_image": torch.full((grid, grid), 2.0)}, "mask_image"),
        ({"mask_image": "mask"}, "mask_image"),
        ({"mask_dilation": -1}, "mask_dilation"),
        ({"mask_dilation": 1.5}, "mask_dilation"),
        ({"mask_dilation": True}, "mask_dilation"),
        ({"mask_dilation": grid + 1}, "mask_dilation"),  # past every cell (10**9 used to run for seconds)
        ({"mask_image": torch.ones(0, grid, grid)}, "mask_image"),
        ({"mask_image": np.ones((grid, grid, 3), np.float32)}, "mask_image` of shape .* looks like an RGB"),
        ({"mask_image": np.ones((grid, grid), np.longdouble)}, "mask_image` of numpy dtype"),
        ({"mask_image": np.ones((grid, grid), object)}, "mask_image` of numpy dtype"),
        ({"mask_image": torch.ones(grid, grid, dtype=torch.complex64)}, "mask_image` of dtype torch.complex64"),
        *edit_bad_inputs(image),
    ]


def edit_bad_inputs(image: torch.Tensor) -> list:
    """What every editing pipeline refuses about the image, naming the parameter."""
    return [
        ({"image": None}, "image"),
        ({"image_indices": [torch.zeros(1, 1, dtype=torch.long)]}, "image"),
        ({"image": None, "image_indices": [torch.zeros(1, 1, dtype=torch.long)]}, "image_indices"),
        ({"image": image.repeat(3, 1, 1, 1)}, "image"),
        ({"image": image[:, :2]}, "image"),
        ({"image": image * 3}, "image"),
        ({"image": "photo.png"}, "image"),
        ({"image": image[:0]}, "image"),
        ({"image": torch.zeros(3, 0, 0)}, "image"),
        ({"image": [image, image[0]]}, "image"),  # one list, two numbers of dimensions
        ({"image": [image[0], PIL.Image.new("RGB", tuple(image.shape[-2:][::-1]))]}, "image"),  # tensors and PIL
        ({"image": image[0].permute(1, 2, 0).numpy().astype(object)}, "image` of numpy dtype object"),
        ({"image": image.to(torch.complex64)}, "image` of dtype torch.complex64"),
        ({"image": np.ones((*image.shape[-2:], 3), bool)}, "image` must hold floats .* got numpy bool"),
    ]


STRENGTH_BAD_INPUTS = [
    ({"strength": 1.5}, "strength"),
    ({"strength": -0.1}, "strength"),
    ({"strength": float("nan")}, "strength"),
    ({"strength": "0.5"}, "strength"),
]


@dataclass
class Case:
    """One pipeline class under test: how to build it, a two-image call, and its own bad inputs."""

    id: str
    pipeline_class: type
    components: Callable[[], dict]
    batch: Callable[[list], dict]  # the call's batch arguments for items ``[a, b, ...]`` (labels / prompts)
    items: list
    call: dict = field(default_factory=dict)  # fixed sampling arguments
    bad_inputs: list = field(default_factory=list)  # (kwargs, parameter named in the error)


CASES = [
    Case(
        "var",
        VARPipeline,
        lambda: var_components(seed=0),
        lambda items: {"class_labels": items},
        [1, 2],
        call={"top_k": 8},
        bad_inputs=[
            ({"class_labels": [11]}, "class_labels"),
            ({"class_labels": [-2]}, "class_labels"),
            ({"class_labels": [1.5]}, "class_labels"),
            ({"class_labels": []}, "class_labels"),
            ({"class_labels": "cat"}, "class_labels"),
            ({"class_labels": torch.tensor([1, 2], device="meta")}, "class_labels` is a tensor on the meta device"),
            ({"more_smooth": "yes"}, "more_smooth"),
        ],
    ),
    Case(
        "code",
        VARCoDePipeline,
        lambda: code_components(seed=0),
        lambda items: {"class_labels": items},
        [1, 2],
        call={"top_k": [8, 8, 6, 6], "temperature": [1.1, 1.1, 1.0, 1.0]},
        bad_inputs=[
            ({"class_labels": [11]}, "class_labels"),
            ({"draft_steps": 0}, "draft_steps"),
            ({"draft_steps": 4}, "draft_steps"),
            ({"draft_steps": 2.0}, "draft_steps"),
            ({"top_k": [8, 8, 8]}, "top_k"),
            ({"top_k": [8, 8, 8, -1]}, "top_k"),
            ({"temperature": [1.0] * 5}, "temperature"),
            ({"temperature": -1.0}, "temperature"),
            ({"temperature": [1.0, 1.0, 1.0, 1e-300]}, "temperature"),
            ({"more_smooth": "yes"}, "more_smooth"),
        ],
    ),
    Case(
        "star",
        STARPipeline,
        lambda: star_components(seed=0, stable_sampler=False),
        lambda items: {"prompt": items},
        PROMPTS,
        call={"top_k": 10, "top_p": 0.9},
        bad_inputs=[
            ({"prompt": 3}, "prompt"),
            ({"prompt": []}, "prompt"),
            ({"negative_prompt": ["a", "b", "c"]}, "negative_prompt"),
            ({"use_stable_sampler": True}, "use_stable_sampler"),
            ({"sampler_version": "2"}, "sampler_version"),
            ({"max_sequence_length": 0}, "max_sequence_length"),
            ({"max_sequence_length": 1}, "max_sequence_length"),  # no room for the start and end tokens
            ({"max_sequence_length": 10**6}, "max_sequence_length"),
            (  # the negative prompt is encoded to this length: no room for the start and end tokens
                {"prompt_embeds": torch.zeros(2, 1, 32), "prompt": None, "pooled_prompt_embeds": torch.zeros(2, 32)},
                "prompt_embeds",
            ),
            (
                {"negative_prompt_embeds": torch.zeros(2, 3, 32), "negative_pooled_prompt_embeds": torch.zeros(2, 32)},
                "negative_prompt_embeds",
            ),
            (
                {
                    "prompt_embeds": torch.full((2, 4, 32), float("nan")),
                    "prompt": None,
                    "pooled_prompt_embeds": torch.zeros(2, 32),
                },
                "prompt_embeds",
            ),
        ],
    ),
    Case(
        "star_stable_sampler",
        STARPipeline,
        lambda: star_components(seed=0, stable_sampler=True, sampler_start_scale=2),
        lambda items: {"prompt": items},
        PROMPTS,
        call={"top_k": 10, "top_p": 0.9},
        bad_inputs=[({"sampler_generator": 3}, "sampler_generator")],
    ),
    Case(
        "infinity",
        InfinityPipeline,
        lambda: infinity_components(seed=0),
        lambda items: {"prompt": items},
        PROMPTS,
        call={"height": 32, "width": 32, "guidance_scale": 3.0, "top_k": 2},
        bad_inputs=[
            ({"tau": 0.0}, "tau"),
            ({"tau": 1e-300}, "tau"),
            ({"guidance_scale": [3.0] * 6 + [1e39]}, "guidance_scale"),
            ({"height": 10**200, "width": 10**200}, "height"),
            ({"tau": float("nan")}, "tau"),
            ({"guidance_scale": [1.0, 2.0]}, "guidance_scale"),
            ({"height": 0}, "height"),
            ({"width": -8}, "width"),
            ({"height": 5000}, "height"),
            ({"max_sequence_length": 0}, "max_sequence_length"),
            ({"negative_prompt": 3}, "negative_prompt"),
            ({"prompt_embeds": torch.full((2, 4, 32), float("inf")), "prompt": None}, "prompt_embeds"),
        ],
    ),
    # the editing pipelines: one image (and mask) for both labels / prompts
    Case(
        "var_inpaint",
        VARInpaintPipeline,
        lambda: var_components(seed=0),
        lambda items: {"class_labels": items},
        [1, 2],
        call={"top_k": 8, "image": VQ_IMAGE, "mask_image": VQ_MASK},
        bad_inputs=inpaint_bad_inputs(VQ_IMAGE, 4),
    ),
    Case(
        "var_img2img",
        VARImg2ImgPipeline,
        lambda: var_components(seed=0),
        lambda items: {"class_labels": items},
        [1, 2],
        call={"top_k": 8, "image": VQ_IMAGE},
        bad_inputs=STRENGTH_BAD_INPUTS + edit_bad_inputs(VQ_IMAGE),
    ),
    Case(
        "star_inpaint",
        STARInpaintPipeline,
        lambda: star_components(seed=0, stable_sampler=False),
        lambda items: {"prompt": items},
        PROMPTS,
        call={"top_k": 10, "top_p": 0.9, "image": VQ_IMAGE, "mask_image": VQ_MASK},
        bad_inputs=inpaint_bad_inputs(VQ_IMAGE, 4),
    ),
    Case(
        "star_img2img",
        STARImg2ImgPipeline,
        lambda: star_components(seed=0, stable_sampler=True, sampler_start_scale=2),
        lambda items: {"prompt": items},
        PROMPTS,
        call={"top_k": 10, "top_p": 0.9, "image": VQ_IMAGE, "strength": 0.75},
        bad_inputs=STRENGTH_BAD_INPUTS + edit_bad_inputs(VQ_IMAGE),
    ),
    Case(
        "infinity_inpaint",
        InfinityInpaintPipeline,
        lambda: infinity_components(seed=0),
        lambda items: {"prompt": items},
        PROMPTS,
        call={
            "height": 32,
            "width": 32,
            "guidance_scale": 3.0,
            "top_k": 2,
            "image": BITS_IMAGE,
            "mask_image": BITS_MASK,
        },
        bad_inputs=inpaint_bad_inputs(BITS_IMAGE, 16),
    ),
    Case(
        "infinity_img2img",
        InfinityImg2ImgPipeline,
        lambda: infinity_components(seed=0),
        lambda items: {"prompt": items},
        PROMPTS,
        call={"height": 32, "width": 32, "guidance_scale": 3.0, "top_k": 2, "image": BITS_IMAGE},
        bad_inputs=STRENGTH_BAD_INPUTS + edit_bad_inputs(BITS_IMAGE),
    ),
]
COMMON_BAD_INPUTS = [
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": "4"}, "guidance_scale"),
    ({"guidance_scale": 1e39}, "guidance_scale"),  # finite, but the guided logits overflowed: every token 0
    ({"num_images_per_prompt": 10**12}, "num_images_per_prompt"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"output_type": "jpeg"}, "output_type"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"generator": [torch.Generator()]}, "generator"),
    ({"generator": 3}, "generator"),
    ({"callback_on_step_end_tensor_inputs": ["unknown"]}, "callback_on_step_end_tensor_inputs"),
    ({"callback_on_step_end_tensor_inputs": 5}, "callback_on_step_end_tensor_inputs"),
    ({"callback_on_step_end_tensor_inputs": "latents"}, "callback_on_step_end_tensor_inputs"),
    ({"callback_on_step_end": lambda pipe, i, hw, tensors: tensors["latents"]}, "callback_on_step_end"),
    (
        {"callback_on_step_end": lambda pipe, i, hw, tensors: {"latents": tensors["latents"] * float("nan")}},
        "callback_on_step_end",
    ),
    (  # finite, but too large for the decoder: refused rather than NaN images
        {
            "callback_on_step_end": lambda pipe, i, hw, tensors: {
                "latents": tensors["latents"] * (1e30 if i == pipe.num_timesteps - 1 else 1.0)
            }
        },
        "latents` decoded to NaN pixels",
    ),
    ({"callback_on_step_end": lambda pipe, i, hw, tensors: setattr(pipe, "_guidance_scale", "x")}, "pipe._guidance"),
    (  # a misspelt name: it replaced nothing, without a word
        {"callback_on_step_end": lambda pipe, i, hw, tensors: {"latent": tensors["latents"] * 0}},
        r"callback_on_step_end` returned \['latent'\], which are not tensor names",
    ),
    (
        {"callback_on_step_end": lambda pipe, i, hw, tensors: {"latents": tensors["latents"].to(torch.complex64)}},
        "callback_on_step_end` returned `latents` of dtype torch.complex64",
    ),
    (  # a mask handed back as the latent was turned into 0. / 1. without a word
        {"callback_on_step_end": lambda pipe, i, hw, tensors: {"latents": tensors["latents"] > 0}},
        "callback_on_step_end` returned `latents` of dtype torch.bool; it must be a floating-point tensor",
    ),
    (
        {"callback_on_step_end": lambda pipe, i, hw, tensors: {"latents": tensors["latents"].long()}},
        "callback_on_step_end` returned `latents` of dtype torch.int64",
    ),
    (  # torch failed deep in the finite check
        {"callback_on_step_end": lambda pipe, i, hw, tensors: {"latents": tensors["latents"].to("meta")}},
        "callback_on_step_end` returned `latents` on the meta device",
    ),
    ({"callback_on_step_end": "print"}, "callback_on_step_end"),
    ({"return_dict": "yes"}, "return_dict"),
]
_PIPES: dict = {}


def pipeline(case: Case):
    """One pipeline per case for the module (the components are deterministic, so every test sees the same)."""
    if case.id not in _PIPES:
        pipe = case.pipeline_class(**case.components())
        pipe.set_progress_bar_config(disable=True)
        _PIPES[case.id] = pipe
    return _PIPES[case.id]


def run(case: Case, pipe=None, items=None, seed=0, **kwargs):
    """A call of ``pipe`` (default: the case's) on ``items`` (default: two) with a seeded CPU generator."""
    pipe = pipe or pipeline(case)
    kwargs = {
        **case.call,
        **case.batch(case.items if items is None else items),
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
        **kwargs,
    }
    return pipe(**kwargs).images


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request) -> Case:
    return request.param


# -- outputs --------------------------------------------------------------------------------------------------
def test_output_types_and_return_dict(case):
    pt = run(case)
    B, _, H, W = pt.shape
    assert B == 2 and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    np_images = run(case, output_type="np")
    assert np_images.shape == (2, H, W, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = run(case, output_type="pil")
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (W, H) for im in pil)
    latent = run(case, output_type="latent")
    assert latent.ndim == 4 and latent.shape[0] == 2 and latent.dtype == torch.float32
    assert torch.allclose(pipeline(case).decode_latents(latent).add(1).div(2), pt, atol=1e-6)
    as_tuple = pipeline(case)(**case.call, **case.batch(case.items[:1]), output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, 3, H, W)
    # numpy's bools are bools here as for every other flag (scalars.py)
    as_numpy_flag = pipeline(case)(**case.call, **case.batch(case.items[:1]), output_type="pt", return_dict=np.False_)
    assert isinstance(as_numpy_flag, tuple) and as_numpy_flag[0].shape == (1, 3, H, W)


def test_seed_reproduces_and_differs(case):
    assert torch.equal(run(case, seed=5), run(case, seed=5))
    assert not torch.equal(run(case, seed=5), run(case, seed=6))


def test_generator_list_gives_each_image_its_own_stream(case):
    """Every image of a batch made with one generator per image equals that image made alone with its generator."""
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    batch = run(case, generator=generators)
    for i, seed in enumerate((3, 4)):
        alone = run(case, items=case.items[i : i + 1], generator=[torch.Generator().manual_seed(seed)])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_num_images_per_prompt(case):
    assert run(case, num_images_per_prompt=3).shape[0] == 6
    assert run(case, items=case.items[:1], num_images_per_prompt=2, generator=None).shape[0] == 2


# -- persistence ------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact_and_safetensors_only(case, tmp_path):
    pipe = pipeline(case)
    pipe.save_pretrained(tmp_path / "p")
    files = [p.name for p in (tmp_path / "p").rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pth", ".pt", ".pkl", ".ckpt"))]
    assert any(f.endswith(".safetensors") for f in files) and "model_index.json" in files
    loaded = case.pipeline_class.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(case, loaded), run(case))
    pipe.save_pretrained(tmp_path / "q", safe_serialization=False)  # (diffusers' battery asks so) safetensors anyway
    assert not [p for p in (tmp_path / "q").rglob("*") if p.suffix in (".bin", ".pth", ".pt", ".pkl", ".ckpt")]


def test_dtype_loading_keeps_the_fp32_modules(case, tmp_path):
    pipe = pipeline(case)
    pipe.save_pretrained(tmp_path / "p")
    half = case.pipeline_class.from_pretrained(tmp_path / "p", dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    transformer = half.transformer
    assert transformer.dtype == torch.bfloat16
    kept = [
        name
        for name, _ in transformer.named_parameters()
        if set(name.split(".")) & set(transformer._keep_in_fp32_modules)
    ]
    assert kept and all(dict(transformer.named_parameters())[name].dtype == torch.float32 for name in kept)
    assert torch.isfinite(run(case, half)).all()


# -- the callback contract ------------------------------------------------------------------------------------
def test_callback_receives_every_declared_tensor(case):
    pipe = pipeline(case)
    seen = []

    def record(p, scale_index, scale_hw, tensors):
        assert p is pipe and set(tensors) == set(pipe._callback_tensor_inputs)
        seen.append((scale_index, scale_hw, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in tensors.items()}))
        return {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated names are asked for too
        latent = run(
            case,
            output_type="latent",
            callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
        )
    schedule = [
        tuple(hw)
        for hw in (
            pipe.scale_schedule(case.call.get("height"), case.call.get("width"))
            if issubclass(case.pipeline_class, InfinityPipeline)
            else pipe.scale_schedule()
        )
    ]
    assert [s[0] for s in seen] == list(range(len(schedule))) == list(range(pipe.num_timesteps))
    assert [s[1] for s in seen] == schedule
    for si, ((h, w), (_, _, t)) in enumerate(zip(schedule, seen)):
        assert t["latents"].shape == latent.shape and t["latents"].dtype == torch.float32
        assert t["tokens"] is None or t["tokens"].shape[:2] == (2, h * w)
        assert t["guided_logits"].shape[:2] == (2, h * w)
        assert t["model_logits"].shape[0] in (2, 4) and t["model_logits"].shape[1] == h * w
        if si + 1 < len(schedule):
            nh, nw = schedule[si + 1]
            assert t["next_scale_input"].shape[:2] == (2, nh * nw)
        else:
            assert t["next_scale_input"] is None
        for alias, unified in pipe._callback_aliases.items():
            assert (t[alias] is None and t[unified] is None) or torch.equal(t[alias], t[unified])
    assert torch.equal(seen[-1][2]["latents"], latent)

    # the default is ["latents"]; an empty list asks for no tensors (as in diffusers), not for the default
    asked = []
    run(case, output_type="latent", callback_on_step_end=lambda p, si, hw, t: asked.append(set(t)) or {})
    run(
        case,
        output_type="latent",
        callback_on_step_end=lambda p, si, hw, t: asked.append(set(t)) or {},
        callback_on_step_end_tensor_inputs=[],
    )
    assert asked == [{"latents"}] * len(schedule) + [set()] * len(schedule)


def test_callback_returning_latents_replaces_them(case):
    zeros_at_end = run(
        case,
        output_type="latent",
        callback_on_step_end=lambda p, si, hw, t: (
            {"latents": torch.zeros_like(t["latents"])} if si == p.num_timesteps - 1 else {}
        ),
    )
    assert torch.count_nonzero(zeros_at_end) == 0
    plain = run(case, output_type="latent")
    replacement = torch.randn(plain.shape, generator=torch.Generator().manual_seed(3))
    kept = replacement.clone()
    steered = run(
        case,
        output_type="latent",
        callback_on_step_end=lambda p, si, hw, t: {"latents": replacement} if si == 0 else {},
    )
    assert torch.equal(replacement, kept)  # the next scales added into a copy, not into the caller's tensor
    assert not torch.equal(steered, plain) and not torch.equal(steered, replacement)


def test_editing_the_callback_latents_in_place_replaces_them(case):
    """As in diffusers, a callback may edit ``latents`` in place, returned or not: the same as returning a new tensor
    (the next scale's input was built from the latent before the edit). Every scale hands a new tensor: a kept
    history is one latent per scale, not the final one repeated."""

    def halve(replace: bool, returned: bool):
        def callback(pipe, si, hw, tensors):
            if si == pipe.num_timesteps - 2:  # (image-to-image keeps the input's first scales)
                if replace:
                    tensors["latents"] = tensors["latents"] * 0.5
                else:
                    tensors["latents"].mul_(0.5)
            return tensors if returned else None

        return run(case, output_type="latent", callback_on_step_end=callback)

    replaced = halve(replace=True, returned=True)
    assert not torch.equal(replaced, run(case, output_type="latent"))
    assert torch.equal(halve(replace=False, returned=True), replaced)
    assert torch.equal(halve(replace=False, returned=False), replaced)
    history = []
    final = run(case, output_type="latent", callback_on_step_end=lambda p, si, hw, t: history.append(t["latents"]))
    assert len({id(latent) for latent in history}) == len(history)
    assert torch.equal(history[-1], final) and not any(torch.equal(latent, final) for latent in history[:-1])


def test_deprecated_callback_names_still_work(case):
    pipe = pipeline(case)
    latent_alias = next(alias for alias, unified in pipe._callback_aliases.items() if unified == "latents")
    with pytest.warns(FutureWarning, match=latent_alias):
        latent = run(
            case,
            output_type="latent",
            callback_on_step_end_tensor_inputs=[latent_alias],
            callback_on_step_end=lambda p, si, hw, t: {latent_alias: torch.zeros_like(t[latent_alias])},
        )
    assert torch.count_nonzero(latent) == 0

    # `latents` and its alias returned with different tensors: one of them was dropped without a word
    def both(p, si, hw, t):
        return {
            "latents": torch.zeros_like(t["latents"]),
            latent_alias: torch.ones_like(t["latents"]),
        }

    with pytest.raises(ValueError, match=rf"returned \['latents', '{latent_alias}'\] with different tensors"):
        with pytest.warns(FutureWarning, match=latent_alias):
            run(case, callback_on_step_end_tensor_inputs=["latents", latent_alias], callback_on_step_end=both)

    def same(p, si, hw, t):  # one new tensor under both names
        return dict.fromkeys(("latents", latent_alias), torch.zeros_like(t[latent_alias]))

    with pytest.warns(FutureWarning, match=latent_alias):
        latent = run(
            case, output_type="latent", callback_on_step_end_tensor_inputs=[latent_alias], callback_on_step_end=same
        )
    assert torch.count_nonzero(latent) == 0


class RaiseGuidance(PipelineCallback):
    """A diffusers PipelineCallback: after the scale ``cutoff_step_index``, guidance 3 higher."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.config.cutoff_step_index:
            pipeline._guidance_scale += 3.0
        return callback_kwargs


def test_diffusers_pipeline_callback_changes_guidance_and_interrupt_stops(case):
    pipe = pipeline(case)
    start = case.call.get("guidance_scale", 4.0)
    steered = run(
        case, guidance_scale=start, callback_on_step_end=RaiseGuidance(cutoff_step_ratio=None, cutoff_step_index=0)
    )
    assert pipe.guidance_scale == start + 3.0 and pipe.do_classifier_free_guidance
    assert not torch.equal(steered, run(case, guidance_scale=start))
    assert torch.equal(
        steered,
        run(
            case, guidance_scale=start, callback_on_step_end=RaiseGuidance(cutoff_step_ratio=None, cutoff_step_index=0)
        ),
    )

    calls = []

    def stop_after_two(p, si, hw, t):
        calls.append(si)
        p._interrupt = si == 1
        return {}

    images = run(case, callback_on_step_end=stop_after_two)
    assert calls == [0, 1] and pipe.interrupt and images.shape == run(case).shape
    run(case)
    assert not pipe.interrupt  # a new call starts uninterrupted


def test_a_call_from_inside_its_own_callback_is_refused(case):
    """A nested call on the same models would overwrite the running call's guidance, interrupt flag and caches (a
    preview from a callback changed the outer image); one on other model instances runs."""
    pipe = pipeline(case)
    shared = case.pipeline_class.from_pipe(pipe)  # the same model instances
    other = case.pipeline_class(**case.components())
    other.set_progress_bar_config(disable=True)
    nested = []

    def preview(target):
        def callback(p, si, hw, t):
            if si == 0:
                nested.append(run(case, pipe=target, guidance_scale=0.0))
            return {}

        return callback

    for target in (pipe, shared):
        with pytest.raises(RuntimeError, match="called from inside a `callback_on_step_end`.*transformer"):
            run(case, guidance_scale=4.0, callback_on_step_end=preview(target))
    assert torch.equal(
        run(case, guidance_scale=4.0), run(case, guidance_scale=4.0, callback_on_step_end=preview(other))
    )
    assert len(nested) == 1 and pipe.guidance_scale == 4.0 and not pipe.interrupt


def test_a_callback_cannot_change_the_running_models_or_steer_through_what_it_reads(case):
    """Casting, moving, offloading or switching the fast path from a callback changed the models under the running
    generation (torch failed deep in a matmul); the next scale's input handed to a callback is a copy, so editing it
    changes nothing (only ``latents`` steers)."""
    pipe = pipeline(case)
    for method, change in (
        ("to", lambda p: p.to(torch.bfloat16)),
        ("to", lambda p: p.to("cpu")),
        ("enable_fast_inference", lambda p: p.enable_fast_inference()),
        ("disable_fast_inference", lambda p: p.disable_fast_inference()),
        ("enable_model_cpu_offload", lambda p: p.enable_model_cpu_offload(device="cpu")),
    ):

        def callback(p, si, hw, t, change=change):
            if si == 1:
                change(p)
            return {}

        with pytest.raises(RuntimeError, match=rf"`{method}\(\)` was called from inside a `callback_on_step_end`"):
            run(case, callback_on_step_end=callback)
    assert pipe.transformer.dtype == torch.float32 and not pipe._fast_inference

    def zero_the_next_input(p, si, hw, t):
        if t["next_scale_input"] is not None:
            t["next_scale_input"].mul_(0)

    assert torch.equal(
        run(case, callback_on_step_end=zero_the_next_input, callback_on_step_end_tensor_inputs=["next_scale_input"]),
        run(case),
    )


# -- offloading -------------------------------------------------------------------------------------------------
def sequential_offload_to_cpu(pipe) -> None:
    """``enable_sequential_cpu_offload``'s hooks with the CPU as the execution device: what diffusers does
    (accelerate's ``cpu_offload`` per component, the tokenizer of VAR / STAR excluded), minus its refusal of a CPU
    device. The weights live on the meta device between uses, so a parameter used outside its module's forward
    fails."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in pipe._exclude_from_cpu_offload:
            cpu_offload(
                component, execution_device=torch.device("cpu"), offload_buffers=len(component._parameters) > 0
            )


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offload_generates_the_same_images(case, offload):
    """The offloading hooks run for real, with the CPU as the execution device (CI has no accelerator)."""
    pipe = case.pipeline_class(**case.components())
    pipe.set_progress_bar_config(disable=True)
    reference = run(case, pipe)
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        # diffusers' own call takes the CPU and leaves every weight on the meta device (it cannot run or save then)
        with pytest.raises(ValueError, match="`device`: sequential CPU offload"):
            pipe.enable_sequential_cpu_offload(device="cpu")
        assert pipe.transformer.blocks[0].attn.q_bias.device.type == "cpu"
        sequential_offload_to_cpu(pipe)
        assert pipe.transformer.blocks[0].attn.q_bias.device.type == "meta"
    assert torch.equal(run(case, pipe), reference)
    assert torch.equal(run(case, pipe), reference)  # and a second time, after the hooks offloaded again


def test_offload_without_an_accelerator_is_a_value_error_naming_device(case, monkeypatch):
    """Without an accelerator diffusers raised a RuntimeError (and an AssertionError for ``device="cuda"`` on a torch
    built without CUDA) where ``device="cpu"`` got the project's ValueError: the same ValueError for all."""
    monkeypatch.setattr("diffusers_var.pipelines.pipeline_utils.get_device", lambda: "cpu", raising=False)
    pipe = case.pipeline_class(**case.components())
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        with pytest.raises(ValueError, match=rf"^`device`: {method}\(\) found no accelerator"):
            getattr(pipe, method)()
        with pytest.raises(ValueError, match=r"^`device` 'cuda': this machine has no cuda accelerator \(none found\)"):
            getattr(pipe, method)(device="cuda")
    assert pipe.transformer.device.type == "cpu" and not getattr(pipe, "_offload_device", None)


def test_the_execution_device_walks_the_models_only_under_a_hook(case, monkeypatch):
    """diffusers finds the execution device by walking every submodule of every model, several times per call
    (milliseconds of host time for the large models): without a hook the pipeline answers from its first model's
    weights; under a hook anywhere, as diffusers does."""
    from diffusers.hooks import group_offloading

    pipe = case.pipeline_class(**case.components())
    pipe.transformer.blocks[0].register_module("absent", None)  # a child registered as None: the walk skips it
    with monkeypatch.context() as patch:
        patch.setattr(group_offloading, "_get_group_onload_device", lambda module: pytest.fail("diffusers walked"))
        assert pipe._execution_device == torch.device("cpu")
    # a group-offloading hook deep inside one model, as diffusers stores it (a registry in the module's attributes),
    # its onload device a stand-in accelerator: diffusers' answer
    hook = SimpleNamespace(config=SimpleNamespace(onload_device=torch.device("meta")))
    pipe.transformer.blocks[-1]._diffusers_hook = SimpleNamespace(get_hook=lambda name: hook)
    assert pipe._execution_device == torch.device("meta")


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_parameter(case):
    for kwargs, parameter in COMMON_BAD_INPUTS + case.bad_inputs:
        with pytest.raises(ValueError, match=f"`{parameter}"):
            run(case, **kwargs)


# -- loading ----------------------------------------------------------------------------------------------------
EMBEDDED = {"var": "var-shapes", "star": "star-shapes", "infinity": "infinity-shapes"}


def test_bad_loading_arguments_name_the_parameter(case, tmp_path):
    """``from_pretrained`` / ``from_pipe`` refuse what diffusers would ignore (a dtype given as a string loaded
    float32 with a log line) or fail on deep inside (a path that is not a string)."""
    pipe = pipeline(case)
    pipe.save_pretrained(tmp_path)
    for kwargs, parameter in (
        ({"dtype": "float16"}, "dtype"),
        ({"torch_dtype": 5}, "torch_dtype"),
        ({"dtype": {"transformer": "bf16"}}, "dtype"),
    ):
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            case.pipeline_class.from_pretrained(tmp_path, **kwargs)
    for path in (None, 123):
        with pytest.raises(ValueError, match="`pretrained_model_name_or_path`"):
            case.pipeline_class.from_pretrained(path)
    for missing in (tmp_path / "missing", str(tmp_path / "missing")):  # a Path was an AttributeError in diffusers
        with pytest.raises(ValueError, match="is neither a valid local path nor a valid repo id"):
            case.pipeline_class.from_pretrained(missing)
    with pytest.raises(ValueError, match="`dtype`"):
        case.pipeline_class.from_pipe(pipe, dtype="float16")
    # float8 loaded (or failed in diffusers), then the first call failed inside torch
    for float8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        with pytest.raises(ValueError, match=r"`dtype` must be one of torch.float32, .*got torch.float8"):
            case.pipeline_class.from_pretrained(tmp_path, dtype=float8)
        with pytest.raises(ValueError, match=r"`dtype` must be one of torch.float32, .*got torch.float8"):
            pipe.to(float8)
    for bad in (None, 123):
        with pytest.raises(ValueError, match="`save_directory`"):
            pipe.save_pretrained(bad)
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ValueError, match="`save_directory`"):  # a file where a parent folder should be
        pipe.save_pretrained(tmp_path / "a-file" / "pipe")
    assert (tmp_path / "a-file").read_text() == "mine"
    # a model's own from_pretrained took a dtype string for float32 with a log line
    model_class = type(pipe.transformer)
    for kwargs, parameter in (({"dtype": "bfloat16"}, "dtype"), ({"torch_dtype": 3}, "torch_dtype")):
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            model_class.from_pretrained(tmp_path / "transformer", **kwargs)
    # a variant with a slash failed inside safetensors, "" wrote a file no loader reads, a shard size of 0 wrote one
    # file per tensor; nothing is written for any of them
    for kwargs, parameter in (
        ({"variant": "a/b"}, "variant"),
        ({"variant": ""}, "variant"),
        ({"variant": 3}, "variant"),
        ({"max_shard_size": 0}, "max_shard_size"),
        ({"max_shard_size": "-5"}, "max_shard_size"),
        ({"max_shard_size": "lots"}, "max_shard_size"),
    ):
        for saver in (pipe, pipe.transformer):
            with pytest.raises(ValueError, match=f"`{parameter}`"):
                saver.save_pretrained(tmp_path / "refused", **kwargs)
    assert not (tmp_path / "refused").exists()


def test_a_dtype_dict_names_components_or_default(case, tmp_path):
    """A misspelt component in a ``dtype`` dict was ignored without a word (that component loaded float32); diffusers'
    ``"default"`` key sets the others."""
    pipeline(case).save_pretrained(tmp_path)
    components = sorted(case.pipeline_class._get_signature_keys(case.pipeline_class)[0])
    with pytest.raises(ValueError, match=rf"`dtype` names \['transformr'\], .*\({', '.join(components)}\) or 'def"):
        case.pipeline_class.from_pretrained(tmp_path, dtype={"transformr": torch.bfloat16})
    loaded = case.pipeline_class.from_pretrained(
        tmp_path, dtype={"default": torch.bfloat16, "transformer": torch.float32}
    )
    dtypes = {name: c.dtype for name, c in loaded.components.items() if isinstance(c, torch.nn.Module)}
    assert dtypes.pop("transformer") == torch.float32 and set(dtypes.values()) == {torch.bfloat16}, dtypes


def test_components_and_parameters_rebuild_the_same_pipeline(case):
    """diffusers' idiom ``Cls(**pipe.components, **pipe.parameters)``: the same modules and settings (class names,
    ``default_size``, ``draft_steps``), the same images."""
    pipe = pipeline(case)
    rebuilt = case.pipeline_class(**pipe.components, **pipe.parameters)
    rebuilt.set_progress_bar_config(disable=True)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(rebuilt.config) == public(pipe.config)
    assert torch.equal(run(case, rebuilt), run(case, pipe))


def test_from_pipe_refuses_components_of_another_family_and_unknown_arguments(case):
    pipe = pipeline(case)
    other = pipeline(next(c for c in CASES if c.pipeline_class._family != case.pipeline_class._family))
    with pytest.raises(ValueError, match="`transformer` must be a"):
        case.pipeline_class.from_pipe(pipe, transformer=other.transformer)
    with pytest.raises(ValueError, match=r"from_pipe takes components / settings .*got \['bogus'\]"):
        case.pipeline_class.from_pipe(pipe, bogus=1)
    with pytest.raises(ValueError, match="`pipeline` must be a diffusers pipeline"):
        case.pipeline_class.from_pipe("a-folder")
    with pytest.raises(ValueError, match=rf"`pipeline` is a .*{case.pipeline_class.__name__} needs the"):
        case.pipeline_class.from_pipe(other)
    if "text_encoder" in pipe.components:  # any transformers text model, not any module (or a string)
        with pytest.raises(ValueError, match="`text_encoder` must be a transformers PreTrainedModel"):
            case.pipeline_class.from_pipe(pipe, text_encoder=pipe.transformer)
        with pytest.raises(ValueError, match="`tokenizer` must be a transformers PreTrainedTokenizerBase"):
            case.pipeline_class.from_pipe(pipe, tokenizer="abc")


def test_switches_that_do_not_apply_are_refused_and_layerwise_casting_is_named(case):
    """``enable_attention_slicing`` / ``enable_xformers_memory_efficient_attention`` did nothing without a word, a
    changed tensor other than the latents returned by a callback was ignored, and layerwise casting (hooks on the
    layers, not on the component) passed ``enable_fast_inference``'s check and broke every later call."""
    pipe = pipeline(case)
    with pytest.raises(ValueError, match="`enable_attention_slicing` does not apply"):
        pipe.enable_attention_slicing()
    pipe.disable_attention_slicing()  # diffusers' disable calls enable(None): still fine
    with pytest.raises(ValueError, match="`enable_xformers_memory_efficient_attention` does not apply"):
        pipe.enable_xformers_memory_efficient_attention()
    with pytest.raises(ValueError, match=r"returned new values for \['tokens'\]; only `latents` can be replaced"):
        run(
            case,
            callback_on_step_end_tensor_inputs=["tokens"],
            callback_on_step_end=lambda p, si, hw, t: {"tokens": torch.zeros_like(t["tokens"])},
        )
    same = run(case, callback_on_step_end_tensor_inputs=["tokens"], callback_on_step_end=lambda p, si, hw, t: t)
    assert torch.equal(same, run(case))  # the tensors handed back as given: accepted
    cast = case.pipeline_class(**case.components())
    cast.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot be combined with CPU offloading, group offloading or layerwise"):
        cast.enable_fast_inference(dtype=torch.float32)
    assert not cast._fast_inference


def test_a_component_left_out_is_named_at_the_call(case):
    """diffusers lets a pipeline be built with ``None`` for a component; the call then failed deep inside (an
    AttributeError on ``None``). It names the component instead, before any work."""
    pipe = pipeline(case)
    required = type(pipe)._required_components()
    assert {"transformer", "vqvae"} <= set(required) or {"transformer", "vae"} <= set(required)
    for name in required:
        built = case.pipeline_class(**{**pipe.components, name: None})
        with pytest.raises(ValueError, match=f"has no `{name}`"):
            run(case, pipe=built)


def test_nonfinite_logits_are_refused_not_sampled(case):
    """Logits that overflow (every linear layer of the transformer scaled to infinity: a LoRA scale or weights past
    the dtype's range) made the draw's argmax pick token 0 everywhere, an ordinary-looking image; the call refuses
    them, decoded or returned as latents."""
    pipe = pipeline(case)
    overflow = [
        module.register_forward_hook(lambda module, inputs, output: output * float("inf"))
        for module in pipe.transformer.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        for output_type in ("pt", "latent"):
            with pytest.raises(ValueError, match=r"final `latents`.* logits overflowed"):
                run(case, output_type=output_type)
        if "mask_image" in case.call:  # in-painting that keeps every position: no drawn token is used, no error
            assert run(case, mask_image=torch.zeros_like(torch.as_tensor(case.call["mask_image"]))).isfinite().all()
    finally:
        for hook in overflow:
            hook.remove()
    assert run(case).isfinite().all()


def test_numpy_scalars_are_numbers(case):
    """A numpy float (``np.float32(0.5)``, not a Python float subclass as ``np.float64`` is) is a number and a numpy
    integer (what indexing an array gives) an integer: the same images as the Python values."""
    expected = run(case, top_p=0.5, guidance_scale=1.5, top_k=3, num_images_per_prompt=2)
    numpy_values = {"top_p": np.float32(0.5), "guidance_scale": np.float32(1.5), "top_k": np.int64(3)}
    assert torch.equal(run(case, **numpy_values, num_images_per_prompt=np.int32(2)), expected)
    if "class_labels" in case.batch(case.items):  # labels drawn with numpy: an array, or a list of its items
        labels = np.array(case.batch(case.items)["class_labels"])
        assert torch.equal(
            run(case, top_p=0.5, guidance_scale=1.5, top_k=3, class_labels=labels, num_images_per_prompt=2), expected
        )
        assert torch.equal(
            run(case, top_p=0.5, guidance_scale=1.5, top_k=3, class_labels=list(labels), num_images_per_prompt=2),
            expected,
        )
    parameters = inspect.signature(case.pipeline_class.__call__).parameters
    family_values = {  # the family's own integer / bool parameters, as numpy scalars
        "more_smooth": np.bool_(False),
        "draft_steps": np.int64(pipeline(case).config.get("draft_steps") or 1),
        "height": np.int64(expected.shape[-2]),
        "width": np.int64(expected.shape[-1]),
    }
    given = {name: value for name, value in family_values.items() if name in parameters}
    assert given  # every family has at least one of them
    python_values = {name: value.item() for name, value in given.items()}
    common = {"top_p": 0.5, "guidance_scale": 1.5, "top_k": 3, "num_images_per_prompt": 2}
    assert torch.equal(run(case, **common, **given), run(case, **common, **python_values))
    with pytest.raises(ValueError, match="`num_images_per_prompt`"):  # narrower numpy integers wrap around: refused
        run(case, num_images_per_prompt=np.int16(2))


def test_bad_family_specific_arguments_name_the_parameter():
    var = pipeline(CASES[0])
    with pytest.raises(ValueError, match="`label`"):
        var.get_label_ids(None)
    with pytest.raises(ValueError, match="`id2label`"):
        VARPipeline(transformer=var.transformer, vqvae=var.vqvae, id2label=["a"])
    infinity = pipeline(next(case for case in CASES if case.id == "infinity"))
    for default_size in ("64", [64.5, 64], [64], [0, 64]):
        with pytest.raises(ValueError, match="`default_size`"):
            InfinityPipeline(**{**infinity.components, "default_size": default_size})


def test_encode_prompt_checks_its_arguments():
    """``encode_prompt`` is public on its own (DESIGN): it refuses what ``__call__`` refuses, naming the parameter,
    instead of empty features, a torch / tokenizer error or NaN features passed on."""
    for case_id in ("star", "infinity"):
        pipe = pipeline(next(case for case in CASES if case.id == case_id))
        width = 32
        bad_calls = [
            ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
            ({"num_images_per_prompt": -1}, "num_images_per_prompt"),
            ({"num_images_per_prompt": 2.5}, "num_images_per_prompt"),
            ({"max_sequence_length": 0}, "max_sequence_length"),
            ({"max_sequence_length": "10"}, "max_sequence_length"),
            ({"max_sequence_length": 10**6}, "max_sequence_length"),
            ({"max_sequence_length": np.int16(10)}, "max_sequence_length"),
            ({"prompt": None, "prompt_embeds": torch.full((1, 4, width), float("nan"))}, "prompt_embeds"),
            ({"prompt": None, "prompt_embeds": torch.zeros(4, width)}, "prompt_embeds"),
            ({"prompt": None, "prompt_embeds": torch.zeros(1, 4, width + 1)}, "prompt_embeds"),
        ]
        if case_id == "star":  # STAR's features come with their pooled vector
            pooled = {"pooled_prompt_embeds": torch.zeros(1, width)}
            bad_calls = [
                (kwargs | pooled if "prompt_embeds" in kwargs else kwargs, name) for kwargs, name in bad_calls
            ]
            bad_calls.append(({"prompt": None, "prompt_embeds": torch.zeros(1, 1, width)} | pooled, "prompt_embeds"))
        for kwargs, parameter in bad_calls:
            with pytest.raises(ValueError, match=f"`{parameter}`"):
                pipe.encode_prompt(**{"prompt": "a red square", **kwargs})
        # a numpy integer (what indexing an array of lengths gives) counts as the same length
        as_int, as_numpy = (pipe.encode_prompt("a red square", max_sequence_length=n)[0] for n in (10, np.int64(10)))
        assert as_int.shape[1] == 10 and torch.equal(as_int, as_numpy)
    star = pipeline(next(case for case in CASES if case.id == "star"))
    for texts, parameter in (([], "texts"), ([3], "texts")):
        with pytest.raises(ValueError, match=f"`{parameter}`"):
            star.encode_text(texts)
    with pytest.raises(ValueError, match="`max_sequence_length`"):
        star.encode_text(["a"], max_sequence_length=1)


@pytest.mark.parametrize(
    "pipeline_class, make_components",
    [(VARPipeline, var_components), (STARPipeline, lambda: star_components(seed=0, stable_sampler=False))],
    ids=["var", "star"],
)
def test_a_vqvae_that_the_transformer_does_not_fit_is_refused(pipeline_class, make_components):
    """VAR and STAR refuse a tokenizer of another scale schedule, vocabulary or code width, naming the config."""
    components = make_components()
    config = dict(components["vqvae"].config)
    for change, message in (
        ({"patch_nums": (1, 2)}, "`patch_nums` differ"),
        ({"vocab_size": config["vocab_size"] * 2}, "`vocab_size`/`latent_channels`"),
        ({"z_channels": config["z_channels"] * 2}, "`vocab_size`/`latent_channels`"),
    ):
        other = MultiScaleVQModel.from_config({**config, **change})
        with pytest.raises(ValueError, match=message):
            pipeline_class(**{**components, "vqvae": other})


@pytest.mark.parametrize(
    "pipeline_class, make_components, width_name",
    [
        (STARPipeline, lambda: star_components(seed=0, stable_sampler=False), "text_embed_dim"),
        (InfinityPipeline, infinity_components, "text_dim"),
    ],
    ids=["star", "infinity"],
)
def test_a_text_encoder_of_another_width_is_refused(pipeline_class, make_components, width_name):
    """STAR and Infinity refuse, when built (``from_pipe`` builds too), a text encoder whose hidden states are not as
    wide as the transformer's text features, naming both; the first call failed instead, naming the transformer's
    internal ``text_embeds``. Without a text encoder (precomputed features) the transformer is taken."""
    components = make_components()
    config = dict(components["transformer"].config)
    other = type(components["transformer"]).from_config({**config, width_name: 2 * config[width_name]})
    with pytest.raises(ValueError, match=rf"`text_encoder` gives \d+-wide hidden states.*`{width_name}`"):
        pipeline_class(**{**components, "transformer": other})
    pipe = pipeline_class(**{**components, "transformer": other, "text_encoder": None, "tokenizer": None})
    with pytest.raises(ValueError, match=rf"`text_encoder` gives \d+-wide hidden states.*`{width_name}`"):
        type(pipe).from_pipe(pipe, text_encoder=components["text_encoder"], tokenizer=components["tokenizer"])


def test_every_embedded_folder_carries_its_loader_file():
    """diffusers' generic loader needs ``<ClassName>.py`` in the folder: every embedded pipeline has it, importing
    the class its ``model_index.json`` names."""
    folders = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "pipelines").glob("*/model_index.json"))
    assert len(folders) >= 4
    for folder in folders:
        class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
        assert f"from diffusers_var import {class_name}" in (folder / f"{class_name}.py").read_text(), folder


def test_written_loader_files_are_ruff_clean(tmp_path):
    """A folder saved inside a checkout (the README's `conversion/convert_var.py ... --output var-d16-256`) failed the
    README's lint command: ruff format dedented the indented example of ``<ClassName>.py``'s docstring."""
    import diffusers_var
    from conftest import assert_ruff_clean
    from diffusers_var.pipelines.pipeline_utils import write_loader_module

    names = sorted(name for name in diffusers_var.__all__ if name.endswith("Pipeline"))
    assert {"VARPipeline", "VARCoDePipeline", "InfinityInpaintPipeline"} <= set(names)
    assert_ruff_clean(*(write_loader_module(tmp_path, name) for name in names))


def test_diffusers_generic_loader_and_a_folder_of_another_family(case, tmp_path):
    """``DiffusionPipeline.from_pretrained`` loads our folders through diffusers' custom-pipeline mechanism (the
    folder's ``<ClassName>.py`` imports the class from the installed package), for a saved folder and an embedded one;
    a pipeline class of another family refuses the folder naming the parameter."""
    from diffusers import DiffusionPipeline

    pipe = pipeline(case)
    pipe.save_pretrained(tmp_path / "p")
    folders = [tmp_path / "p"]
    if case.id in EMBEDDED:
        folders.append(Path(__file__).resolve().parents[1] / "pipelines" / EMBEDDED[case.id])
    for folder in folders:
        loaded = DiffusionPipeline.from_pretrained(
            folder, custom_pipeline=case.pipeline_class.__name__, trust_remote_code=True
        )
        assert (
            type(loaded) is type(pipe)
            and loaded.transformer.config == case.pipeline_class.from_pretrained(folder).transformer.config
        )
    loaded.set_progress_bar_config(disable=True)
    other = next(c.pipeline_class for c in CASES if c.pipeline_class._family != case.pipeline_class._family)
    with pytest.raises(ValueError, match="`pretrained_model_name_or_path`"):
        other.from_pretrained(tmp_path / "p")


def test_a_component_folder_missing_is_named(case, tmp_path):
    """A pipeline folder without a component's subfolder: diffusers looked in the pipeline folder instead, where
    transformers built an empty tokenizer (Infinity read every prompt as the same unknown tokens, STAR failed deep
    inside). The component given as an argument needs no folder."""
    import shutil

    pipe = pipeline(case)
    pipe.save_pretrained(tmp_path / "p")
    for name in ("tokenizer", "transformer"):
        if not (tmp_path / "p" / name).is_dir():
            continue
        shutil.copytree(tmp_path / "p", tmp_path / name)
        shutil.rmtree(tmp_path / name / name)
        with pytest.raises(ValueError, match=rf"model_index.json names a `{name}` .* no `{name}/` subfolder"):
            case.pipeline_class.from_pretrained(tmp_path / name)
        loaded = case.pipeline_class.from_pretrained(tmp_path / name, **{name: getattr(pipe, name)})
        assert getattr(loaded, name) is getattr(pipe, name)


def test_a_component_that_model_index_lacks_is_named(case, tmp_path):
    """A folder whose model_index.json lacks a component the class needs (a VAR folder loaded as CoDe, which needs a
    refiner): named, with how to pass it, where diffusers said "expected [...] but only {...} were passed"."""
    pipe = pipeline(case)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    name = "refiner" if "refiner" in index else "transformer"
    del index[name]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    hint = r", or build it from two VAR pipelines" if name == "refiner" else r"\.$"
    with pytest.raises(
        ValueError, match=rf"without `{name}`, which {case.pipeline_class.__name__} needs: pass it .*{hint}"
    ):
        case.pipeline_class.from_pretrained(tmp_path)
    loaded = case.pipeline_class.from_pretrained(tmp_path, **{name: getattr(pipe, name)})
    assert getattr(loaded, name) is getattr(pipe, name)


def test_a_damaged_model_index_is_named(tmp_path):
    """A model_index.json that is a JSON list (a TypeError inside diffusers), not JSON (diffusers then said it could
    not reach huggingface.co) or without ``_class_name`` (a bare KeyError) is a ValueError naming the file."""
    case = CASES[0]
    pipeline(case).save_pretrained(tmp_path / "p")
    for content, message in (
        ("[1, 2]", "holds a list, not a JSON object"),
        ("{not json", "model_index.json' cannot be read"),
        ('{"transformer": ["diffusers_var", "VARTransformer2DModel"]}', "names no `_class_name`"),
    ):
        (tmp_path / "p" / "model_index.json").write_text(content)
        with pytest.raises(ValueError, match=re.escape(message)):
            case.pipeline_class.from_pretrained(tmp_path / "p")


def test_save_pretrained_is_atomic_and_keeps_the_users_files(tmp_path, monkeypatch):
    """A new folder appears whole; saving into an existing one keeps files the save does not write and replaces the
    old weights (the shards and index of an earlier sharded save removed last, so that they cannot be loaded
    instead; a user's other weight file is kept); a save that fails leaves the folder as it was (old shards too
    when the failure comes while files move) and no staging folder behind."""
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from diffusers_var import file_utils

    case = CASES[0]
    pipe, target = pipeline(case), tmp_path / "saved"
    pipe.save_pretrained(target, max_shard_size="20KB")
    shards = sorted(p.name for p in (target / "transformer").iterdir())
    assert any("-of-" in name for name in shards) and any(name.endswith(".index.json") for name in shards)
    (target / "notes.txt").write_text("mine")
    (target / "transformer" / "notes.txt").write_text("mine too")
    (target / "transformer" / "diffusion_pytorch_model.bin").write_text("mine as well")
    # files of the same names that no index of ours lists, and other formats: not ours to delete (they were)
    users = [
        "diffusion_pytorch_model-00001-of-00002.bin",
        "diffusion_pytorch_model.bin.index.json",
        "diffusion_pytorch_model-00007-of-00009.safetensors",
    ]
    for name in users:
        (target / "transformer" / name).write_text("the user's")

    real_replace = os.replace
    calls = []

    def fail_on_the_third_move(source, destination):
        if ".saving-" not in str(destination) and Path(destination).name != file_utils.SAVING_MARKER:
            calls.append(destination)  # a file moving into the target
            if len(calls) == 3:
                raise OSError("disk full")
        return real_replace(source, destination)

    monkeypatch.setattr(file_utils.os, "replace", fail_on_the_third_move)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(target)
    monkeypatch.undo()
    assert {p.name for p in (target / "transformer").iterdir()} >= set(shards)  # the old shards not deleted
    # no staging left; the folder, some files new and some old, is marked and refused until a save completes
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == [file_utils.SAVING_MARKER]
    with pytest.raises(ValueError, match="partly rewritten by a save_pretrained that did not finish"):
        case.pipeline_class.from_pretrained(target)
    with pytest.raises(ValueError, match="partly rewritten by a save_pretrained that did not finish"):
        type(pipe.transformer).from_pretrained(target / "transformer")

    pipe.save_pretrained(target)
    assert sorted(p.name for p in (target / "transformer").iterdir()) == sorted(
        [
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors",
            "notes.txt",
            *users,
        ]
    )
    assert (target / "notes.txt").read_text() == "mine" and not (target / file_utils.SAVING_MARKER).exists()
    reloaded = case.pipeline_class.from_pretrained(target)
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(case, reloaded), run(case))

    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    real_save = DiffusionPipeline.save_pretrained

    def save_then_fail(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", save_then_fail)
    for destination in (target, tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            pipe.save_pretrained(destination)
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="`save_directory`"):
        pipe.save_pretrained(tmp_path / "a-file")

    # a file of the user's where a component folder goes: refused before any file moves (nothing new, no marker)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "model_index.json").write_text("the user's")
    (blocked / "vqvae").write_text("a file of the user's")
    with pytest.raises(ValueError, match="`save_directory`: .*vqvae' is a file where the save puts a folder"):
        pipe.save_pretrained(blocked)
    assert sorted(p.name for p in blocked.iterdir()) == ["model_index.json", "vqvae"]
    assert (blocked / "model_index.json").read_text() == "the user's"


def test_a_save_moves_the_users_stale_shards_aside_and_deletes_its_own(tmp_path, monkeypatch):
    """A sharded index and its shards that the new single file makes stale (a loader would read them instead) were
    deleted whoever wrote them; a save of the package tags the indices it writes and deletes only those shards, others
    go into a hidden ``.replaced-<time>`` folder, whole. A folder that cannot be written into is a ValueError naming
    ``save_directory`` (mkdtemp's OSError was not)."""
    from diffusers_var import file_utils

    case = CASES[0]
    pipe, ours, theirs = pipeline(case), tmp_path / "ours", tmp_path / "theirs"
    pipe.save_pretrained(ours, max_shard_size="20KB")
    index = json.loads((ours / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["written_by"] == "diffusers-var"
    shutil.copytree(ours, theirs)
    untagged = theirs / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    untagged.write_text(json.dumps({**index, "metadata": {"total_size": 1}}))  # as another tool writes it
    shard_names = sorted(set(index["weight_map"].values()))
    content = {name: (theirs / "transformer" / name).read_bytes() for name in shard_names}
    for folder in (ours, theirs):
        pipe.save_pretrained(folder)
        assert not [p for p in (folder / "transformer").iterdir() if "-of-" in p.name or ".index" in p.name]
        reloaded = case.pipeline_class.from_pretrained(folder)
        reloaded.set_progress_bar_config(disable=True)
        assert torch.equal(run(case, reloaded), run(case))
    assert not list((ours / "transformer").glob(".replaced-*"))
    (aside,) = (theirs / "transformer").glob(".replaced-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir() if "-of-" in p.name} == content
    assert (aside / untagged.name).is_file()

    monkeypatch.setattr(file_utils.os, "access", lambda path, mode: False)  # a read-only filesystem
    for destination in (ours, tmp_path / "new"):
        with pytest.raises(ValueError, match="`save_directory`: .* is not writable; nothing was saved"):
            pipe.save_pretrained(destination)


@pytest.mark.parametrize("case_id", ["star", "infinity"])
def test_a_sharded_save_over_single_files_loads_the_new_weights(case_id, tmp_path, caplog):
    """The probe: a sharded save over a folder of single weight files left each old ``model.safetensors`` beside the
    new shards and index; transformers reads the single file first, so the text encoder reloaded with the OLD
    weights. The single file of a name and variant now saved as shards is stale: moved aside when nothing says the
    package wrote it (a single file carries no mark), deleted when a converted folder's manifest lists it."""
    import logging

    from diffusers_var.conversion import atomic_save_pipeline

    case = next(case for case in CASES if case.id == case_id)
    pipe = case.pipeline_class(**case.components())  # (its weights change: not the module's shared pipeline)
    plain, converted = tmp_path / "plain", tmp_path / "converted"
    pipe.save_pretrained(plain)
    atomic_save_pipeline(pipe, converted)
    with torch.no_grad():
        for module in pipe.components.values():
            for parameter in module.parameters() if isinstance(module, torch.nn.Module) else ():
                parameter.add_(1.0)
    modules = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]
    assert "text_encoder" in modules
    singles = {name: {p.name: p.read_bytes() for p in (plain / name).glob("*.safetensors")} for name in modules}
    for folder in (plain, converted):
        with caplog.at_level(logging.WARNING, logger="diffusers_var.file_utils"):
            pipe.save_pretrained(folder, max_shard_size="20KB")
        reloaded = case.pipeline_class.from_pretrained(folder)
        for name in modules:
            assert list((folder / name).glob("*.safetensors.index.json")), name  # saved as shards
            expected, got = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
            assert all(torch.equal(expected[key], got[key]) for key in expected), (folder.name, name)
    for name in modules:
        (aside,) = (plain / name).glob(".replaced-*")
        assert {p.name: p.read_bytes() for p in aside.iterdir()} == singles[name]  # the first save's file, whole
        assert not list((converted / name).glob(".replaced-*"))
        assert not [p.name for p in (converted / name).glob("*.safetensors") if "-of-" not in p.name]
    assert "moved weight files that the new save replaces" in caplog.text


def test_a_save_directory_that_cannot_be_saved_into_is_named_before_any_work(tmp_path, monkeypatch):
    """The probe: a dangling link, a name too long for the staging folder beside it (or for the file system), a NUL
    and a folder that takes no new entries (/proc) were raw OS errors (``embedded null byte``, ``[Errno 36]``,
    ``[Errno 20]`` after the whole save) not naming ``save_directory``. Now a ValueError naming it, before anything
    is written."""
    import errno

    from diffusers_var import file_utils

    pipe = pipeline(CASES[0])
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    cases = [
        (tmp_path / "dangling", "it is a link to .*nothing', which leads to nothing"),
        # a name the file system takes, but not the staging folder's beside it
        (tmp_path / ("d" * (limit - 10)), r"the folder name 'd+'\.\.\. is too long: at most \d+ bytes here"),
        (
            tmp_path / ("d" * (limit + 1)),
            rf"the name 'd+'\.\.\. in it is {limit + 1} bytes long, more than the {limit} the file system takes",
        ),
        (tmp_path / "a\x00b", "it holds a NUL character"),
    ]
    for target, message in cases:
        for save in (pipe.save_pretrained, pipe.transformer.save_pretrained):
            with pytest.raises(ValueError, match=rf"^`save_directory` .* cannot be saved into: {message}\.$"):
                save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["dangling"] and not (tmp_path / "nothing").exists()

    def no_entries(prefix, dir):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", f"{dir}/{prefix}x")

    monkeypatch.setattr(file_utils.tempfile, "mkdtemp", no_entries)
    with pytest.raises(ValueError, match=r"^`save_directory`: cannot make a folder in .*No such file or directory"):
        pipe.save_pretrained(tmp_path / "x")


def test_saved_files_get_the_umask_mode(tmp_path):
    """safetensors writes its files 0600: a folder saved by one user could not be loaded by another. Every saved file
    gets the mode a new file has under the process's umask."""
    pipe = pipeline(CASES[0])
    previous = os.umask(0o022)
    try:
        pipe.save_pretrained(tmp_path / "new")
        pipe.save_pretrained(tmp_path / "new")  # into an existing folder: files moved one by one
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert any(str(p).endswith(".safetensors") for p in modes) and set(modes.values()) == {0o644}, modes


def test_a_folder_whose_weights_do_not_fit_its_config_is_refused(case, tmp_path):
    """A pipeline folder holding the config of one model and the weights of another (a copy gone wrong, a mix of two
    saves): diffusers loaded it with a log line, dropping unused weights (other images) or leaving missing ones on
    the meta device (a RuntimeError at the call)."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    pipe, target = pipeline(case), tmp_path / "saved"
    pipe.save_pretrained(target)
    weights = target / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    save_file({**{k: v for k, v in state.items() if k != first}, "blocks.99.extra.weight": state[first]}, weights)
    for load in (
        lambda: case.pipeline_class.from_pretrained(target),
        lambda: type(pipe.transformer).from_pretrained(target, subfolder="transformer"),
    ):
        with pytest.raises(
            ValueError, match=rf"does not hold the weights .*\(missing from the weights: {re.escape(first)};"
        ):
            load()
        with pytest.raises(ValueError, match=r"in the weights but not in the model: blocks\.99\.extra\.weight"):
            load()
    # a component loaded from another component's folder
    tokenizer_class = type(pipe.components.get("vqvae", pipe.components.get("vae")))
    with pytest.raises(ValueError, match=f"does not hold the weights of the {tokenizer_class.__name__}"):
        tokenizer_class.from_pretrained(target, subfolder="transformer")
    # a config that cannot build the model is named with the folder
    config_file = target / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["num_heads"] = "two"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"cannot load a {type(pipe.transformer).__name__} from .*transformer"):
        type(pipe.transformer).from_pretrained(target, subfolder="transformer")
    # a truncated weights file: diffusers' OSError without the folder's part in it
    tokenizer_folder = target / next(name for name in ("vqvae", "vae") if (target / name).is_dir())
    weights = tokenizer_folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="weights file cannot be read"):
        tokenizer_class.from_pretrained(tokenizer_folder)


def test_saving_with_lora_layers_in_is_refused(tmp_path):
    """Injected LoRA layers are saved under PEFT's wrapped names (``base_layer``), a folder that does not load: the
    save is refused, naming the ways out; fused and unloaded, the weights save and load with the adapter in them."""
    from test_lora import add_random_adapter

    case = CASES[0]
    pipe = case.pipeline_class(**case.components())  # its own: the module's shared pipeline stays unadapted
    pipe.set_progress_bar_config(disable=True)
    add_random_adapter(pipe.transformer, "a", scale=0.5)
    for save in (
        lambda: pipe.save_pretrained(tmp_path / "saved"),
        lambda: pipe.transformer.save_pretrained(tmp_path / "t"),
    ):
        with pytest.raises(
            ValueError, match=r"holds LoRA adapters .* `fuse_lora\(\)` and then `unload_lora_weights\(\)`"
        ):
            save()
    assert not (tmp_path / "saved").exists() and not (tmp_path / "t").exists()
    with_adapter = run(case, pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = case.pipeline_class.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(case, reloaded), with_adapter)
    assert not torch.equal(with_adapter, run(case))  # the adapter changed the images


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    """``push_to_hub=True``: the folder is saved (loader module included) before the upload, and a failed upload
    keeps the local save."""
    import huggingface_hub

    case = CASES[0]
    pipe, uploads = pipeline(case), []
    repo = type("Repo", (), {"repo_id": "me/var-test"})
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: repo)
    monkeypatch.setattr(
        "diffusers.utils.hub_utils.load_or_create_model_card",
        lambda repo_id, **kwargs: huggingface_hub.ModelCard("card"),
    )

    def upload(self, folder, repo_id, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in Path(folder).iterdir())))
        raise ConnectionError("offline")

    monkeypatch.setattr(type(pipe), "_upload_folder", upload)
    with pytest.raises(ConnectionError):
        pipe.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/var-test")
    assert uploads and uploads[0][0] == "me/var-test"
    assert {"model_index.json", "VARPipeline.py", "README.md", "transformer"} <= set(uploads[0][1])
    assert (tmp_path / "saved" / "model_index.json").is_file()
