"""diffusers' common pipeline battery over every pipeline class of diffusers-var.

``PipelineTesterMixin`` is diffusers' own, vendored byte for byte from diffusers v0.40.0 under
``tests/diffusers_battery/`` (see its README.md). Each pipeline class gets a ``unittest.TestCase`` as diffusers'
``tests/pipelines/dit/test_dit.py`` (VAR: class-conditional parameters) and ``tests/pipelines/pixart_sigma`` /
``hunyuandit`` (STAR, Infinity: text-to-image parameters) write theirs, on the tiny components of
``tiny_components.py``. What cannot apply to a next-scale model is taken out, each with a one-line reason: it has no
``num_inference_steps`` and no initial noise ``latents``; VAR and STAR produce the size fixed by the model (no
``height`` / ``width``). Tests that fail because a pipeline lacks a feature stay and fail until the pipeline has it.

Most of the battery's offload / float16 tests need an accelerator (``torch_device``, from ``DIFFUSERS_TEST_DEVICE``
or the available hardware) and skip on a CPU-only machine. diffusers' ``enable_full_determinism()`` is not called:
it switches ``torch.use_deterministic_algorithms`` for the whole pytest process, and the pipelines are deterministic
on the CPU anyway.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import pkgutil
import re
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import diffusers.pipelines
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diffusers_var
import diffusers_var.pipelines
from diffusers_battery.pipelines.pipeline_params import (
    CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS,
    CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS,
    IMAGE_INPAINTING_BATCH_PARAMS,
    IMAGE_INPAINTING_PARAMS,
    IMAGE_TO_IMAGE_IMAGE_PARAMS,
    IMAGE_VARIATION_BATCH_PARAMS,
    IMAGE_VARIATION_PARAMS,
    TEXT_GUIDED_IMAGE_INPAINTING_BATCH_PARAMS,
    TEXT_GUIDED_IMAGE_INPAINTING_PARAMS,
    TEXT_GUIDED_IMAGE_VARIATION_BATCH_PARAMS,
    TEXT_GUIDED_IMAGE_VARIATION_PARAMS,
    TEXT_TO_IMAGE_BATCH_PARAMS,
    TEXT_TO_IMAGE_PARAMS,
)
from diffusers_battery.pipelines.test_pipelines_common import PipelineLatentTesterMixin, PipelineTesterMixin, to_np
from diffusers_battery.testing_utils import require_torch_accelerator, torch_device
from diffusers_var import (
    InfinityImg2ImgPipeline,
    InfinityInpaintPipeline,
    InfinityPipeline,
    STARImg2ImgPipeline,
    STARInpaintPipeline,
    STARPipeline,
    VARCoDePipeline,
    VARImg2ImgPipeline,
    VARInpaintPipeline,
    VARPipeline,
)
from diffusers_var.pipelines.pipeline_utils import NextScalePipeline
from tiny_components import code_components, infinity_components, star_components, var_components

VENDORED = Path(__file__).resolve().parent / "diffusers_battery"
PROMPT = "A painting of a squirrel eating a burger"


def dummy_generator(device, seed: int) -> torch.Generator:
    """A seeded CPU generator (the pipelines' original draw order); the global one on mps, as diffusers' tests do."""
    if str(device).startswith("mps"):
        return torch.manual_seed(seed)
    return torch.Generator(device="cpu").manual_seed(seed)


class NextScaleTesterMixin(PipelineTesterMixin):
    """What every next-scale pipeline shares; the subclasses add the pipeline, its parameters and components."""

    # next-scale prediction has no denoising steps and no initial noise latents to pass in
    required_optional_params = PipelineTesterMixin.required_optional_params - {"num_inference_steps", "latents"}
    # the transformers run their own SDPA attention, not diffusers' attention processors: no slicing / xformers switch
    test_attention_slicing = False
    test_xformers_attention = False
    # diffusers' layerwise casting and group offloading hooks must work on these transformers (on, as PixArt-Sigma)
    test_layerwise_casting = True
    test_group_offloading = True

    def setUp(self):
        super().setUp()
        # the battery's encode_prompt test finds the class by name in `diffusers.pipelines`: make ours visible there
        patcher = mock.patch.object(
            diffusers.pipelines, self.pipeline_class.__name__, self.pipeline_class, create=True
        )
        patcher.start()
        self.addCleanup(patcher.stop)

    # the mixin's batched call copies `num_inference_steps`, which a next-scale pipeline does not take; on CUDA the
    # matmuls and convolutions pick other kernels for another batch size (H200: up to 6e-4 apart, same tokens)
    def test_inference_batch_single_identical(self, batch_size=3, expected_max_diff=1e-4):
        expected_max_diff = 1e-3 if torch_device == "cuda" else expected_max_diff
        self._test_inference_batch_single_identical(
            batch_size=batch_size, expected_max_diff=expected_max_diff, additional_params_copy_to_batched_inputs=[]
        )


class TextToImageTesterMixin(NextScaleTesterMixin):
    """STAR and Infinity: text-to-image parameters, as diffusers' PixArt-Sigma / HunyuanDiT tests."""

    # no attention processors to hand `cross_attention_kwargs` to (taken out by PixArt / HunyuanDiT too)
    params = TEXT_TO_IMAGE_PARAMS - {"cross_attention_kwargs"}
    batch_params = TEXT_TO_IMAGE_BATCH_PARAMS

    def prompt_embeds_inputs(self, pipe, prompt) -> dict:
        """The ``__call__`` keyword arguments that replace ``prompt`` when the text encoder is dropped."""
        raise NotImplementedError

    # the mixin drops the optional text encoder but keeps a prompt: pass its embeddings instead, as HunyuanDiT's does
    def test_save_load_optional_components(self, expected_max_difference=1e-4):
        components = self.get_dummy_components()
        pipe = self.pipeline_class(**components)
        pipe.to(torch_device)
        pipe.set_progress_bar_config(disable=None)

        inputs = self.get_dummy_inputs(torch_device)
        embeds = self.prompt_embeds_inputs(pipe, inputs.pop("prompt"))
        inputs.update(embeds)

        # set all optional components to None
        for optional_component in pipe._optional_components:
            setattr(pipe, optional_component, None)

        torch.manual_seed(0)
        output = pipe(**inputs)[0]

        with tempfile.TemporaryDirectory() as tmpdir:
            pipe.save_pretrained(tmpdir, safe_serialization=False)
            pipe_loaded = self.pipeline_class.from_pretrained(tmpdir)
            pipe_loaded.to(torch_device)
            pipe_loaded.set_progress_bar_config(disable=None)

        for optional_component in pipe._optional_components:
            self.assertTrue(
                getattr(pipe_loaded, optional_component) is None,
                f"`{optional_component}` did not stay set to None after loading.",
            )

        inputs = self.get_dummy_inputs(torch_device)
        inputs.pop("prompt")
        inputs.update(embeds)
        torch.manual_seed(0)
        output_loaded = pipe_loaded(**inputs)[0]

        max_diff = np.abs(to_np(output) - to_np(output_loaded)).max()
        self.assertLess(max_diff, expected_max_difference)


class VARPipelineBatteryTests(NextScaleTesterMixin, unittest.TestCase):
    pipeline_class = VARPipeline
    params = CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS
    batch_params = CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS

    def get_dummy_components(self):
        return var_components(seed=0)

    def get_dummy_inputs(self, device, seed=0):
        return {"class_labels": [1], "generator": dummy_generator(device, seed), "top_k": 4, "output_type": "np"}


class VARCoDePipelineBatteryTests(VARPipelineBatteryTests):
    """CoDe: the tiny VAR as drafter of the first two scales, a narrower one-block VAR as refiner of the last two."""

    pipeline_class = VARCoDePipeline

    def get_dummy_components(self):
        return code_components(seed=0)

    @require_torch_accelerator
    def test_group_offloading_inference(self):
        """diffusers' version offloads only the components it knows by name (``transformer``, ``unet``, ...) and
        leaves the refiner on the CPU: the same check with the drafter and the refiner offloaded."""

        def run(offload: dict | None):
            torch.manual_seed(0)
            pipe = self.pipeline_class(**self.get_dummy_components())
            if offload is None:
                pipe.to(torch_device)
            else:
                for model in (pipe.transformer, pipe.refiner):
                    model.enable_group_offload(torch.device(torch_device), **offload)
                pipe.vqvae.to(torch_device)
            return pipe(**self.get_dummy_inputs(torch_device))[0]

        reference = run(None)
        for offload in ({"offload_type": "block_level", "num_blocks_per_group": 1}, {"offload_type": "leaf_level"}):
            np.testing.assert_allclose(run(offload), reference, atol=1e-4)


class STARPipelineBatteryTests(TextToImageTesterMixin, unittest.TestCase):
    pipeline_class = STARPipeline
    # the image size is fixed by the model's scale schedule
    params = TextToImageTesterMixin.params - {"height", "width"}

    def get_dummy_components(self):
        return star_components(seed=0, stable_sampler=False)

    def get_dummy_inputs(self, device, seed=0):
        return {
            "prompt": PROMPT,
            "generator": dummy_generator(device, seed),
            "guidance_scale": 5.0,
            "top_k": 4,
            "output_type": "np",
        }

    def prompt_embeds_inputs(self, pipe, prompt) -> dict:
        embeds, mask, pooled, negative_embeds, negative_mask, negative_pooled = pipe.encode_prompt(
            prompt, device=torch_device
        )
        return {
            "prompt_embeds": embeds,
            "prompt_attention_mask": mask,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds,
            "negative_prompt_attention_mask": negative_mask,
            "negative_pooled_prompt_embeds": negative_pooled,
        }


class STARStableSamplerPipelineBatteryTests(STARPipelineBatteryTests):
    """STAR with the stable-sampler head (star-1024-sampler): used from scale 2 of 4 (``use_stable_sampler=None``)."""

    def get_dummy_components(self):
        return star_components(seed=0, stable_sampler=True, sampler_start_scale=2)


class InfinityPipelineBatteryTests(TextToImageTesterMixin, unittest.TestCase):
    pipeline_class = InfinityPipeline

    def get_dummy_components(self):
        return infinity_components(seed=0)

    def get_dummy_inputs(self, device, seed=0):
        return {
            "prompt": PROMPT,
            "height": 32,
            "width": 32,
            "generator": dummy_generator(device, seed),
            "guidance_scale": 5.0,
            "top_k": 2,
            "output_type": "np",
        }

    def prompt_embeds_inputs(self, pipe, prompt) -> dict:
        # the unconditional half is the learned unconditional text, which needs no text encoder
        embeds, mask, _, _ = pipe.encode_prompt(prompt, device=torch_device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


# -- the editing pipelines (in-painting, image-to-image) --------------------------------------------------------
def dummy_image(size: int) -> torch.Tensor:
    """A (1, 3, size, size) image in [0, 1] of values k / 255, so its pt / np / PIL forms are the same pixels."""
    return torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(0)) / 255.0


def dummy_mask(side: int) -> torch.Tensor:
    """A latent-grid mask (side, side) generating all but the top quarter."""
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[side // 4 :] = True
    return mask


class EditTesterMixin(PipelineLatentTesterMixin):
    """diffusers' image-input battery (pt / np / PIL inputs and outputs), as its image-to-image tests use it."""

    image_params = IMAGE_TO_IMAGE_IMAGE_PARAMS
    # the input image is tokenised by the pipeline; its tokens (`image_indices`) are not VAE latents to sample
    image_latents_params = frozenset()

    # the tokenizers are multi-scale quantizers, not AutoencoderKL-compatible VAEs to swap in
    @unittest.skip("no AutoencoderKL-compatible `vae` component: the tokenizer is a multi-scale quantizer")
    def test_multi_vae(self):
        pass


class VARInpaintPipelineBatteryTests(EditTesterMixin, VARPipelineBatteryTests):
    pipeline_class = VARInpaintPipeline
    # the image size is fixed by the model's scale schedule
    params = (IMAGE_INPAINTING_PARAMS - {"height", "width"}) | CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS
    batch_params = IMAGE_INPAINTING_BATCH_PARAMS | CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS

    def get_dummy_inputs(self, device, seed=0):
        return {**super().get_dummy_inputs(device, seed), "image": dummy_image(8), "mask_image": dummy_mask(4)}


class VARImg2ImgPipelineBatteryTests(EditTesterMixin, VARPipelineBatteryTests):
    pipeline_class = VARImg2ImgPipeline
    # the image size is fixed by the model's scale schedule
    params = (IMAGE_VARIATION_PARAMS - {"height", "width"}) | CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS
    batch_params = IMAGE_VARIATION_BATCH_PARAMS | CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS

    def get_dummy_inputs(self, device, seed=0):
        return {**super().get_dummy_inputs(device, seed), "image": dummy_image(8), "strength": 0.75}


class STARInpaintPipelineBatteryTests(EditTesterMixin, STARPipelineBatteryTests):
    pipeline_class = STARInpaintPipeline
    # the image size is fixed by the model's scale schedule
    params = TEXT_GUIDED_IMAGE_INPAINTING_PARAMS - {"height", "width"}
    batch_params = TEXT_GUIDED_IMAGE_INPAINTING_BATCH_PARAMS

    def get_dummy_inputs(self, device, seed=0):
        return {**super().get_dummy_inputs(device, seed), "image": dummy_image(8), "mask_image": dummy_mask(4)}


class STARImg2ImgPipelineBatteryTests(EditTesterMixin, STARStableSamplerPipelineBatteryTests):
    pipeline_class = STARImg2ImgPipeline
    # the image size is fixed by the model's scale schedule
    params = TEXT_GUIDED_IMAGE_VARIATION_PARAMS - {"height", "width"}
    batch_params = TEXT_GUIDED_IMAGE_VARIATION_BATCH_PARAMS

    def get_dummy_inputs(self, device, seed=0):
        return {**super().get_dummy_inputs(device, seed), "image": dummy_image(8), "strength": 0.75}


class InfinityInpaintPipelineBatteryTests(EditTesterMixin, InfinityPipelineBatteryTests):
    pipeline_class = InfinityInpaintPipeline
    params = TEXT_GUIDED_IMAGE_INPAINTING_PARAMS
    batch_params = TEXT_GUIDED_IMAGE_INPAINTING_BATCH_PARAMS

    def get_dummy_inputs(self, device, seed=0):
        return {**super().get_dummy_inputs(device, seed), "image": dummy_image(32), "mask_image": dummy_mask(16)}


class InfinityImg2ImgPipelineBatteryTests(EditTesterMixin, InfinityPipelineBatteryTests):
    pipeline_class = InfinityImg2ImgPipeline
    params = TEXT_GUIDED_IMAGE_VARIATION_PARAMS
    batch_params = TEXT_GUIDED_IMAGE_VARIATION_BATCH_PARAMS

    def get_dummy_inputs(self, device, seed=0):
        return {**super().get_dummy_inputs(device, seed), "image": dummy_image(32), "strength": 0.75}


BATTERIES = [
    VARPipelineBatteryTests,
    VARCoDePipelineBatteryTests,
    STARPipelineBatteryTests,
    STARStableSamplerPipelineBatteryTests,
    InfinityPipelineBatteryTests,
    VARInpaintPipelineBatteryTests,
    VARImg2ImgPipelineBatteryTests,
    STARInpaintPipelineBatteryTests,
    STARImg2ImgPipelineBatteryTests,
    InfinityInpaintPipelineBatteryTests,
    InfinityImg2ImgPipelineBatteryTests,
]


# -- every pipeline class has a battery ---------------------------------------------------------------
def package_pipeline_classes() -> set[type]:
    """Every ``DiffusionPipeline`` subclass defined in ``diffusers_var`` (the package namespace and every module of
    ``diffusers_var.pipelines``, so a task pipeline counts as soon as its module exists)."""
    modules = [diffusers_var, diffusers_var.pipelines]
    for info in pkgutil.walk_packages(diffusers_var.pipelines.__path__, "diffusers_var.pipelines."):
        modules.append(importlib.import_module(info.name))
    return {
        value
        for module in modules
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, DiffusionPipeline)
        and value.__module__.startswith("diffusers_var")
        and value is not NextScalePipeline  # the shared base, not a pipeline one loads
    }


def test_every_pipeline_class_has_a_battery():
    covered = {battery.pipeline_class for battery in BATTERIES}
    missing = sorted(cls.__qualname__ for cls in package_pipeline_classes() - covered)
    assert not missing, f"pipeline classes without a PipelineTesterMixin test case in {__name__}: {missing}"


# -- the vendored files are diffusers' -----------------------------------------------------------------
def _vendored_table(columns: int) -> list[list[str]]:
    """Rows of README.md's tables with ``columns`` backquoted cells (the last one a sha256)."""
    row = re.compile(r"^\|" + r" `([^`]+)` \|" * columns + r"$")
    rows = [
        list(match.groups())
        for line in (VENDORED / "README.md").read_text().splitlines()
        if (match := row.match(line))
    ]
    assert rows and all(re.fullmatch(r"[0-9a-f]{64}", r[-1]) for r in rows)
    return rows


def test_vendored_files_are_byte_identical_to_diffusers():
    """README.md lists every vendored file with its sha256 at the pinned commit; nothing else may be added."""
    verbatim = {local: digest for local, _source, digest in _vendored_table(3)}
    partial = {local for local, _function, _source, _digest in _vendored_table(4)}
    for local, digest in verbatim.items():
        assert hashlib.sha256((VENDORED / local).read_bytes()).hexdigest() == digest, (
            f"{local} differs from diffusers'"
        )
    present = {
        path.relative_to(VENDORED).as_posix()
        for path in VENDORED.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert present - {"README.md"} == set(verbatim) | partial


def test_minimal_modules_copy_their_functions_verbatim():
    """The two stand-ins for diffusers' big model test modules hold the imported functions copied verbatim."""
    for local, function, _source, digest in _vendored_table(4):
        text = (VENDORED / local).read_text()
        nodes = [node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name == function]
        assert len(nodes) == 1, f"{local} must define {function} once"
        segment = ast.get_source_segment(text, nodes[0])
        assert hashlib.sha256(segment.encode()).hexdigest() == digest, f"{local}: {function} differs from diffusers'"


# -- from_pipe keeps every component's dtype -------------------------------------------------------------
def _component_dtypes(pipe) -> dict:
    return {
        name: component.dtype for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)
    }


@pytest.mark.parametrize(
    "pipeline_class, make_components, inputs",
    [
        (STARPipeline, lambda: star_components(seed=0, stable_sampler=False), {"prompt": PROMPT, "top_k": 4}),
        (
            InfinityPipeline,
            lambda: infinity_components(seed=0),
            {"prompt": PROMPT, "height": 32, "width": 32, "top_k": 2},
        ),
    ],
    ids=["STARPipeline", "InfinityPipeline"],
)
def test_from_pipe_keeps_component_dtypes(pipeline_class, make_components, inputs):
    """``from_pipe`` shares the components: a float16 text encoder stays float16 (in both pipelines) and the new
    pipeline gives the same images."""
    components = make_components()
    components["text_encoder"] = components["text_encoder"].to(torch.float16)
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    dtypes = _component_dtypes(pipe)
    assert dtypes["text_encoder"] == torch.float16

    def generate(p):
        torch.manual_seed(0)
        return p(**inputs, generator=torch.Generator().manual_seed(0), output_type="np").images

    images = generate(pipe)
    new_pipe = pipeline_class.from_pipe(pipe)
    new_pipe.set_progress_bar_config(disable=True)
    new_images = generate(new_pipe)
    problems = []  # all of them in one message
    if _component_dtypes(new_pipe) != dtypes:
        problems.append(f"the new pipeline's component dtypes are {_component_dtypes(new_pipe)}, not {dtypes}")
    if _component_dtypes(pipe) != dtypes:
        problems.append(f"the original pipeline's component dtypes became {_component_dtypes(pipe)}")
    if not np.array_equal(new_images, images):
        problems.append(f"the images differ (max abs difference {np.abs(new_images - images).max():.3g})")
    assert not problems, "; ".join(problems)
