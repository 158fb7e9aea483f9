"""The Gradio demo: one app with a tab per model family (VAR, STAR, Infinity), and an Edit tab (in-painting,
out-painting and image-to-image with any of them: paint the region on the image).

``diffusers-var demo`` (or ``python demos/app.py``) serves the embedded default pipelines found under
``pipelines/`` (``var-shapes``, ``star-shapes``, ``infinity-shapes``); ``--var/--star/--infinity PATH`` serve
other (e.g. converted) pipeline folders. A tab whose model is missing shows a notice instead of controls.
``--var-refiner PATH`` (or a converted CoDe folder as ``--var``) makes the VAR tab offer CoDe: the VAR model drafts
the coarse scales, the small refiner samples the fine ones.
Bad input raises a readable :class:`gradio.Error` (shown in the page) and the app keeps serving.

Needs ``pip install gradio`` (the ``demo`` extra).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
import torch

from .cli_support import (
    OneLineErrorParser,
    add_demo_arguments,
    check_device,
    class_label_ids,
    demo_count_problem,
    enable_fast_path,
    expect_pipeline_class,
    pipeline_class_of,
    print_error,
)
from .embedded_models import embedded_pipelines_dir, resolve_pipeline_folder
from .models.dynamic_resolution import supported_pixel_sizes
from .pil_images import SIXTEEN_BIT_MODES, to_rgb, upright
from .pipelines.pipeline_infinity import InfinityImg2ImgPipeline, InfinityInpaintPipeline, InfinityPipeline
from .pipelines.pipeline_star import STARImg2ImgPipeline, STARInpaintPipeline, STARPipeline
from .pipelines.pipeline_var import VARCoDePipeline, VARImg2ImgPipeline, VARInpaintPipeline, VARPipeline
from .scalars import is_number
from .shapes import CLASSES, class_id, render

logger = logging.getLogger(__name__)

EMBEDDED_DIR = embedded_pipelines_dir()
DEFAULT = "default"  # sentinel: the embedded pipeline of the family, when it exists
FAMILIES = {  # key -> (tab title, pipeline class, embedded folder)
    "var": ("VAR (class-conditional)", VARPipeline, EMBEDDED_DIR / "var-shapes"),
    "star": ("STAR (text-to-image)", STARPipeline, EMBEDDED_DIR / "star-shapes"),
    "infinity": ("Infinity (text-to-image)", InfinityPipeline, EMBEDDED_DIR / "infinity-shapes"),
}
EMBEDDED_VAR_REFINER = EMBEDDED_DIR / "var-shapes-refiner"  # CoDe's refiner for the embedded var-shapes
MAX_SEED = 2**31 - 1
RANDOM_CLASS = "(random class)"
SHAPE_PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a white square on a green background",
]
# a CoDe pipeline (folder) as the VAR model, and a refiner too: which refiner? Refused, naming both
CODE_AND_REFINER = (
    "{refiner} and a CoDe pipeline as {var} do not go together: the CoDe pipeline brings its own refiner; leave out "
    "{refiner}, or give {var} a plain VAR pipeline"
)


def user_error(message: str):
    """A ``gr.Error`` for a user's mistake: shown in the page, not printed as a traceback in the server's log
    (failures of the generation itself still are)."""
    return gr.Error(message, print_exception=False)


def number_slider(*args, **kwargs) -> gr.Slider:
    """``gr.Slider(...)`` whose HTTP API value that is no number (nothing, text) or out of its range is a readable
    error naming the slider: gradio's own bounds check raised a TypeError for the first, shown as its generic "the app
    has raised an exception", and named no slider for the second.
    (The check wraps the instance's ``preprocess``: a subclass of a gradio component writes a .pyi stub beside
    this module.)"""
    slider = gr.Slider(*args, **kwargs)
    gradio_preprocess = slider.preprocess

    def preprocess(payload):
        if (
            isinstance(payload, bool)
            or not isinstance(payload, (int, float))
            or math.isnan(payload)
            or not slider.minimum <= payload <= slider.maximum  # (gradio's own message names no slider)
        ):
            raise user_error(
                f"{slider.label or 'A slider'} must be a number from {slider.minimum:g} to {slider.maximum:g}; "
                f"got {payload!r}."
            )
        return gradio_preprocess(payload)

    slider.preprocess = preprocess
    return slider


def whole_number_box(name: str, minimum: int, maximum: int, **kwargs) -> gr.Number:
    """``gr.Number(precision=0, ...)`` whose HTTP API value must be a whole number in ``[minimum, maximum]`` (or
    nothing): gradio's own check raised a TypeError on text (its generic "the app has raised an exception") and its
    ``precision=0`` rounded 2.5 to 2 without a word. ``name`` names the box in the message."""
    box = gr.Number(precision=0, minimum=minimum, maximum=maximum, **kwargs)
    gradio_preprocess = box.preprocess

    def preprocess(payload):
        if payload is not None and not (_is_whole(payload) and minimum <= payload <= maximum):
            raise user_error(f"{name} must be a whole number from {minimum} to {maximum}; got {payload!r}.")
        return gradio_preprocess(payload)

    box.preprocess = preprocess
    return box


# -- loading ----------------------------------------------------------------------------------------


def load_family(family: str, spec: Any, device: str, dtype: torch.dtype, cpu_offload: bool = False):
    """Resolve a tab's model: ``spec`` is a pipeline object, a pipeline folder, ``DEFAULT`` (the embedded
    folder when it exists) or ``None`` (no model). Returns ``(pipeline or None, notice)``; loading errors
    become the notice, so a bad folder never stops the other tabs."""
    title, pipeline_class, embedded = FAMILIES[family]
    flag = f"--{family}"
    if spec is None:
        return None, f"No {title.split()[0]} model is served. Start the demo with `{flag} PATH` to add one."
    if isinstance(spec, (str, Path)) and str(spec) == DEFAULT:
        if not (embedded / "model_index.json").is_file():
            return None, (
                f"The embedded {title.split()[0]} pipeline (`pipelines/{embedded.name}`) is not available "
                f"in this installation. Start the demo with `{flag} PATH` to serve a pipeline folder."
            )
        spec = embedded
    if isinstance(spec, (str, Path)):
        spec = resolve_pipeline_folder(spec)
        try:
            pipe = expect_pipeline_class(spec, pipeline_class).from_pretrained(spec, dtype=dtype)
        except Exception as err:  # never crash the app for one tab
            logger.exception("could not load %s pipeline from %s", family, spec)
            return None, f"Could not load the {title.split()[0]} pipeline: {err}"
    elif isinstance(spec, pipeline_class):
        pipe = spec
    else:
        raise TypeError(
            f"`{family}` must be a {pipeline_class.__name__}, a pipeline folder, {DEFAULT!r} or None; "
            f"got {type(spec).__name__}."
        )
    if cpu_offload and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    elif device is not None:
        pipe.to(device)
    return pipe, ""


def attach_loras(pipelines: dict, paths: list[str] | None, scales: list[float] | None = None) -> dict[str, str]:
    """Load each ``--lora`` into the served pipeline of the family it was made for (its file says which
    transformer); ``--lora-scale`` as in ``diffusers-var generate``. Returns ``{family: description}`` for the tabs.
    A ``ValueError`` when an adapter fits no served pipeline."""
    from .cli_support import load_loras, lora_flag_error
    from .loaders import NextScaleLoraLoaderMixin

    paths, scales = list(paths or []), list(scales or [])
    if len(scales) not in (0, 1, len(paths)) or (scales and not paths):
        raise ValueError(f"`--lora-scale`: give one scale, or one per `--lora` ({len(paths)}), got {len(scales)}.")
    chosen: dict[str, list[tuple[str, float]]] = {}
    for i, path in enumerate(paths):
        try:
            _, family = NextScaleLoraLoaderMixin.lora_state_dict(path, return_family_metadata=True)
        except ValueError as err:
            raise lora_flag_error(err, path) from None
        made_for = (family or {}).get("transformer_class")
        served = [
            key
            for key, pipe in pipelines.items()
            if pipe is not None
            and (made_for is None or made_for in {c.__name__ for c in type(pipe.transformer).__mro__})
        ]
        if len(served) != 1:
            what = f"made for a {made_for}, which no tab serves" if made_for else "does not say which family it is for"
            raise ValueError(f"`--lora` {path}: {what}; serve the matching pipeline (--var/--star/--infinity).")
        scale = scales[0] if len(scales) == 1 else (scales[i] if scales else 1.0)
        chosen.setdefault(served[0], []).append((path, scale))
    notes = {}
    for key, entries in chosen.items():
        load_loras(pipelines[key], [path for path, _ in entries], [scale for _, scale in entries])
        notes[key] = ", ".join(f"`{Path(path).name}` (scale {scale:g})" for path, scale in entries)
    return notes


def load_code(var_pipe, refiner: Any, device: str, dtype: torch.dtype):
    """The VAR tab's CoDe pipeline: ``var_pipe`` itself when it is one (it brings its own refiner: a ``refiner`` as
    well is a ``ValueError``), else ``var_pipe`` as the drafter with ``refiner`` (a VARPipeline, a VAR pipeline folder,
    ``DEFAULT``: the embedded refiner, or ``None``: no CoDe), sharing their weights. Returns
    ``(pipeline or None, notice)``; a refiner that cannot be used becomes the notice."""
    if isinstance(var_pipe, VARCoDePipeline) and refiner is not None:
        raise ValueError(CODE_AND_REFINER.format(var="`var` (--var)", refiner="`var_refiner` (--var-refiner)"))
    if var_pipe is None or isinstance(var_pipe, VARCoDePipeline):
        return var_pipe, ""
    if refiner is None:
        return None, ""
    if isinstance(refiner, (str, Path)) and str(refiner) == DEFAULT:
        refiner = EMBEDDED_VAR_REFINER
    try:
        if isinstance(refiner, (str, Path)):
            refiner = resolve_pipeline_folder(refiner)
            refiner = expect_pipeline_class(refiner, VARPipeline, exact=True).from_pretrained(refiner, dtype=dtype)
        code = VARCoDePipeline.from_var_pipelines(var_pipe, refiner)
    except Exception as err:  # the plain VAR tab still works
        logger.exception("could not set up CoDe with the refiner %s", refiner)
        return None, f"CoDe is not available: {err}"
    if device is not None:
        code.refiner.to(device)
    return code, ""


# -- generation -------------------------------------------------------------------------------------
def _is_whole(value) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and float(value).is_integer()
    )


def _check_count(num_images, max_images: int) -> int:
    if not _is_whole(num_images) or not 1 <= int(num_images) <= max_images:
        raise user_error(f"Number of images must be a whole number from 1 to {max_images}; got {num_images}.")
    return int(num_images)


def _whole(value, label: str) -> int:
    """A slider's value as an int; the sliders step by 1, but the HTTP API can send 2.5 (truncating it would run
    with another value than asked), NaN or nothing. Ranges are the pipeline's to check."""
    if not _is_whole(value):
        raise user_error(f"{label} must be a whole number; got {value}.")
    return int(value)


def _number(value, label: str) -> float:
    """A slider's value as a float (the HTTP API can send nothing or text); finiteness and ranges are the
    pipeline's to check."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise user_error(f"{label} must be a number; got {value}.")
    return float(value)


def _pick_seed(seed, randomize: bool) -> int:
    if randomize:
        return random.randint(0, MAX_SEED)
    if not _is_whole(seed) or not 0 <= int(seed) <= MAX_SEED:
        raise user_error(f"Seed must be a whole number from 0 to {MAX_SEED}; got {seed}.")
    return int(seed)


def _prompt(prompt) -> str:
    if not isinstance(prompt, str):  # (only the HTTP API can send this)
        raise user_error(f"The prompt must be text, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise user_error("Please enter a prompt: it is empty.")
    return prompt.strip()


def _negative_prompt(negative_prompt) -> str | None:
    """The optional negative prompt, stripped as the prompt is; empty or only spaces: none."""
    if negative_prompt is not None and not isinstance(negative_prompt, str):  # (only the HTTP API can send this)
        raise user_error(f"The negative prompt must be text, got {type(negative_prompt).__name__}.")
    return (negative_prompt or "").strip() or None


def _run(pipe, lock: threading.Lock, seed: int, num_images: int, **kwargs):
    """Call the pipeline; a ``ValueError`` (bad argument) or any failure becomes a readable ``gr.Error``."""
    start = time.perf_counter()
    try:
        with lock:
            images = pipe(
                num_images_per_prompt=num_images,
                generator=torch.Generator().manual_seed(seed),
                output_type="pil",
                **kwargs,
            ).images
    except ValueError as err:
        raise user_error(str(err)) from None
    except Exception as err:  # a readable message in the page, the traceback in the server log
        logger.exception("generation failed")
        raise gr.Error(f"Generation failed ({type(err).__name__}: {err}).") from None
    seconds = time.perf_counter() - start
    width, height = images[0].size  # said as the size choices are, height x width
    info = f"{len(images)} image{'s' * (len(images) != 1)} of {height}x{width} px, seed {seed}, {seconds:.2f} s"
    return images, seed, info


# -- user interface ---------------------------------------------------------------------------------
def _seed_row(prefix: str):
    with gr.Row():
        seed = whole_number_box(
            "Seed",
            0,
            MAX_SEED,
            label="Seed (the seed used is shown here after generating)",
            value=0,
            elem_id=f"{prefix}-seed",
        )
        randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id=f"{prefix}-randomize")
    return seed, randomize


def _outputs(prefix: str):
    gallery = gr.Gallery(
        label="Images", columns=4, height=360, object_fit="contain", format="png", elem_id=f"{prefix}-gallery"
    )
    info = gr.Textbox(label="Result", interactive=False, elem_id=f"{prefix}-info")
    return gallery, info


def _var_tab(
    pipe: VARPipeline, common: dict, max_images: int, code: VARCoDePipeline | None = None, code_notice: str = ""
):
    lock = threading.Lock()
    names = [name for _, name in sorted(pipe.id2label.items())] or [
        str(i) for i in range(pipe.transformer.config.num_classes)
    ]
    name_to_id = {name: i for i, name in sorted(pipe.id2label.items())} or {str(i): i for i in range(len(names))}
    gr.Markdown(f"Class-conditional VAR: {len(names)} classes; type in the Class box to search them.")
    with gr.Row():
        with gr.Column():
            label = gr.Dropdown(
                [RANDOM_CLASS, *names],
                value=names[min(1, len(names) - 1)],
                label="Class",
                filterable=True,
                allow_custom_value=True,
                elem_id="var-class",
            )
            guidance = number_slider(0, 10, value=4.0, step=0.1, label="Guidance scale (cfg)")
            with gr.Row():
                top_k = number_slider(
                    0, max(pipe.transformer.config.vocab_size, 900), value=900, step=1, label="Top-k (0 = off)"
                )
                top_p = number_slider(0, 1, value=0.95, step=0.01, label="Top-p (0 = off)")
            more_smooth = gr.Checkbox(label="More smooth (Gumbel-softmax codes)", value=False)
            if code is not None:
                num_scales, refiner = len(code.scale_schedule()), code.refiner.config
                with gr.Row():
                    use_code = gr.Checkbox(
                        label=f"CoDe: this model drafts the coarse scales, a small refiner (depth "
                        f"{refiner.depth}, width {refiner.embed_dim}) samples the fine ones",
                        value=True,
                        elem_id="var-code",
                    )
                    draft_steps = number_slider(
                        1,
                        num_scales - 1,
                        value=code.config.draft_steps,
                        step=1,
                        label=f"Draft steps (of {num_scales} scales)",
                        elem_id="var-draft-steps",
                    )
            elif code_notice:
                gr.Markdown(code_notice, elem_id="var-code-notice")
            num_images = number_slider(
                1, max_images, value=min(4, max_images), step=1, label="Number of images", elem_id="var-num-images"
            )
            seed, randomize = _seed_row("var")
            button = gr.Button("Generate", variant="primary", elem_id="var-generate")
        with gr.Column():
            gallery, info = _outputs("var")

    def run_var(
        target, extra: dict, class_name, guidance_scale, top_k, top_p, more_smooth, num_images, seed, randomize
    ):
        count = _check_count(num_images, max_images)
        if class_name is not None and not isinstance(class_name, (str, int)):  # (only the HTTP API can send this)
            raise user_error(f"The class must be a name or an index, got {type(class_name).__name__}.")
        if isinstance(class_name, str):  # typed into the searchable list: spaces around it, as the Edit tab takes
            class_name = class_name.strip()
        if class_name == RANDOM_CLASS or class_name in (None, ""):
            labels = None
        elif class_name in name_to_id:
            labels = [name_to_id[class_name]]
        else:
            try:  # a class index, or any synonym of a name (e.g. "golden retriever")
                labels = class_label_ids(pipe, str(class_name))
            except ValueError:
                raise user_error(
                    f"Unknown class {class_name!r}: pick one from the Class list (type to search)."
                ) from None
        seed = _pick_seed(seed, randomize)
        return _run(
            target,
            lock,
            seed,
            count,
            class_labels=labels,
            guidance_scale=_number(guidance_scale, "Guidance scale"),
            top_k=_whole(top_k, "Top-k"),
            top_p=_number(top_p, "Top-p"),
            more_smooth=bool(more_smooth),
            **extra,
        )

    def generate(
        class_name,
        guidance_scale,
        top_k,
        top_p,
        more_smooth,
        num_images,
        seed,
        randomize,
        progress=gr.Progress(track_tqdm=True),
    ):
        return run_var(pipe, {}, class_name, guidance_scale, top_k, top_p, more_smooth, num_images, seed, randomize)

    def generate_code(
        class_name,
        guidance_scale,
        top_k,
        top_p,
        more_smooth,
        num_images,
        seed,
        randomize,
        with_code,
        steps,
        progress=gr.Progress(track_tqdm=True),
    ):
        target, extra = (code, {"draft_steps": _whole(steps, "Draft steps")}) if with_code else (pipe, {})
        return run_var(
            target, extra, class_name, guidance_scale, top_k, top_p, more_smooth, num_images, seed, randomize
        )

    inputs = [label, guidance, top_k, top_p, more_smooth, num_images, seed, randomize]
    if code is not None:  # the same inputs, then CoDe's two
        generate, inputs = generate_code, inputs + [use_code, draft_steps]
    button.click(generate, inputs, [gallery, seed, info], api_name="generate_var", **common)
    examples = [names[i] for i in sorted({0, len(names) // 3, (2 * len(names)) // 3})]
    gr.Examples([[name, 4.0, 0] for name in examples], [label, guidance, seed], label="Examples")


def _text_controls(prefix: str):
    prompt = gr.Textbox(
        label="Prompt", placeholder="a red circle on a blue background", lines=2, elem_id=f"{prefix}-prompt"
    )
    negative = gr.Textbox(label="Negative prompt (optional)", value="", elem_id=f"{prefix}-negative-prompt")
    return prompt, negative


def _star_tab(pipe: STARPipeline, common: dict, max_images: int):
    lock = threading.Lock()
    has_sampler = bool(pipe.transformer.has_stable_sampler)
    side = pipe.transformer.config.patch_nums[-1]
    gr.Markdown(f"Text-to-image with STAR; output size is fixed by the model ({side}x{side} tokens).")
    with gr.Row():
        with gr.Column():
            prompt, negative = _text_controls("star")
            guidance = number_slider(0, 10, value=4.0, step=0.1, label="Guidance scale (cfg)")
            with gr.Row():
                top_k = number_slider(
                    0, max(pipe.transformer.config.vocab_size, 600), value=600, step=1, label="Top-k (0 = off)"
                )
                top_p = number_slider(0, 1, value=0.8, step=0.01, label="Top-p (0 = off)")
            stable = gr.Checkbox(
                label="Stable sampler" + ("" if has_sampler else " (this checkpoint has no sampler head)"),
                value=has_sampler,
                interactive=has_sampler,
            )
            num_images = number_slider(1, max_images, value=min(2, max_images), step=1, label="Number of images")
            seed, randomize = _seed_row("star")
            button = gr.Button("Generate", variant="primary", elem_id="star-generate")
        with gr.Column():
            gallery, info = _outputs("star")

    def generate(
        prompt,
        negative_prompt,
        guidance_scale,
        top_k,
        top_p,
        use_stable_sampler,
        num_images,
        seed,
        randomize,
        progress=gr.Progress(track_tqdm=True),
    ):  # noqa: B008 - gradio's way to ask for a progress bar
        text = _prompt(prompt)
        count = _check_count(num_images, max_images)
        seed = _pick_seed(seed, randomize)
        return _run(
            pipe,
            lock,
            seed,
            count,
            prompt=text,
            negative_prompt=_negative_prompt(negative_prompt),
            guidance_scale=_number(guidance_scale, "Guidance scale"),
            top_k=_whole(top_k, "Top-k"),
            top_p=_number(top_p, "Top-p"),
            use_stable_sampler=bool(use_stable_sampler) and has_sampler,
            sampler_generator=torch.Generator().manual_seed(seed + 1),
        )

    inputs = [prompt, negative, guidance, top_k, top_p, stable, num_images, seed, randomize]
    gr.on([button.click, prompt.submit], generate, inputs, [gallery, seed, info], api_name="generate_star", **common)
    gr.Examples([[text, 0] for text in SHAPE_PROMPTS], [prompt, seed], label="Examples")


def infinity_sizes(pipe: InfinityPipeline) -> list[str]:
    """Every size (``"HEIGHTxWIDTH"`` in pixels) the pipeline's aspect-ratio templates produce."""
    return [
        f"{h}x{w}" for h, w in sorted(supported_pixel_sizes(pipe.vae.pixels_per_token), key=lambda s: (s[0] * s[1], s))
    ]


def _parse_size(size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in str(size).lower().replace(" ", "").split("x"))
    except ValueError:
        raise user_error(f"Size must look like HEIGHTxWIDTH (e.g. 1024x1024); got {size!r}.") from None
    return height, width


def _infinity_tab(pipe: InfinityPipeline, common: dict, max_images: int):
    lock = threading.Lock()
    sizes = infinity_sizes(pipe)
    squares = [s for s in sizes if s.split("x")[0] == s.split("x")[1]]
    configured = getattr(pipe.config, "default_size", None)  # e.g. [64, 64] for the embedded infinity-shapes
    preferred = [f"{configured[0]}x{configured[1]}"] if configured else []
    default = next((s for s in [*preferred, "1024x1024"] if s in sizes), squares[0])
    gr.Markdown(
        "Text-to-image with Infinity; the size picks an aspect-ratio template and resolution preset. "
        "Type your own HEIGHTxWIDTH to try others (unsupported sizes list the supported ones)."
    )
    with gr.Row():
        with gr.Column():
            prompt, negative = _text_controls("infinity")
            size = gr.Dropdown(
                [(f"{s} (h/w {int(s.split('x')[0]) / int(s.split('x')[1]):.2f})", s) for s in sizes],
                value=default,
                label="Size (height x width, px)",
                filterable=True,
                allow_custom_value=True,
                elem_id="infinity-size",
            )
            with gr.Row():
                guidance = number_slider(0, 10, value=3.0, step=0.1, label="Guidance scale (cfg)")
                tau = number_slider(0.05, 2, value=0.5, step=0.05, label="Tau (temperature)")
            with gr.Row():
                top_k = number_slider(0, 1000, value=900, step=1, label="Top-k (0 = off)")
                top_p = number_slider(0, 1, value=0.97, step=0.01, label="Top-p (0 = off)")
            num_images = number_slider(1, max_images, value=min(2, max_images), step=1, label="Number of images")
            seed, randomize = _seed_row("infinity")
            button = gr.Button("Generate", variant="primary", elem_id="infinity-generate")
        with gr.Column():
            gallery, info = _outputs("infinity")

    def generate(
        prompt,
        negative_prompt,
        size,
        guidance_scale,
        tau,
        top_k,
        top_p,
        num_images,
        seed,
        randomize,
        progress=gr.Progress(track_tqdm=True),
    ):  # noqa: B008 - gradio's way to ask for a progress bar
        text = _prompt(prompt)
        height, width = _parse_size(size)
        count = _check_count(num_images, max_images)
        seed = _pick_seed(seed, randomize)
        return _run(
            pipe,
            lock,
            seed,
            count,
            prompt=text,
            negative_prompt=_negative_prompt(negative_prompt),
            height=height,
            width=width,
            guidance_scale=_number(guidance_scale, "Guidance scale"),
            tau=_number(tau, "Tau"),
            top_k=_whole(top_k, "Top-k"),
            top_p=_number(top_p, "Top-p"),
        )

    inputs = [prompt, negative, size, guidance, tau, top_k, top_p, num_images, seed, randomize]
    gr.on(
        [button.click, prompt.submit], generate, inputs, [gallery, seed, info], api_name="generate_infinity", **common
    )
    gr.Examples([[text, 0] for text in SHAPE_PROMPTS], [prompt, seed], label="Examples")


# -- editing ----------------------------------------------------------------------------------------
EDIT_MODES = (
    "In-paint: regenerate the painted region",
    "Out-paint: keep the painted region, regenerate the rest",
    "Image-to-image: keep the image's coarse scales",
)
EDIT_PIPELINES = {
    "var": (VARInpaintPipeline, VARImg2ImgPipeline),
    "star": (STARInpaintPipeline, STARImg2ImgPipeline),
    "infinity": (InfinityInpaintPipeline, InfinityImg2ImgPipeline),
}
EDIT_EXAMPLE_SIZE = 256  # px: the example image is drawn large enough to paint on (the pipeline resizes it)
MAX_EDIT_PIXELS = 4096 * 4096  # an upload above is refused: a tiny PNG of 100 megapixels took 3 GB of server memory


def edit_example_image(shape: str = "circle", color: str = "red", background: str = "blue") -> np.ndarray:
    """A shapes-dataset image (uint8 (256, 256, 3)) to edit when none is uploaded."""
    scale = EDIT_EXAMPLE_SIZE / 64
    ids = np.array([class_id(shape, color, background)])
    return render(
        ids,
        np.array([15.0 * scale], dtype=np.float32),
        np.array([[30.0 * scale, 34.0 * scale]], dtype=np.float32),
        EDIT_EXAMPLE_SIZE,
    )[0]


def _too_large(size: str) -> gr.Error:
    return user_error(
        f"The image to edit is too large ({size}): at most {MAX_EDIT_PIXELS // 10**6} megapixels "
        f"({math.isqrt(MAX_EDIT_PIXELS)}x{math.isqrt(MAX_EDIT_PIXELS)}); make it smaller first."
    )


def decode_editor_image(file) -> np.ndarray | None:
    """An image the Edit tab's editor received, as uint8 pixels decoded the way a browser shows the file: turned
    upright by its EXIF orientation, a 16-bit grayscale PNG scaled to 8 bits (PIL's own conversion, which gradio's
    editor used, clips it to white), RGBA when it has transparency, else RGB. ``file`` is what gradio hands the
    editor's decoder: an uploaded file (``.path``; the HTTP API) or PNG bytes (the page's canvas). An image of more
    than ``MAX_EDIT_PIXELS`` is refused from its header, before it is decoded; a file that is no image PIL can read
    (text, SVG, a truncated PNG) is a readable ``gr.Error`` too (gradio's own decoding showed only "Error")."""
    if file is None:
        return None
    source = io.BytesIO(file) if isinstance(file, (bytes, bytearray, memoryview)) else getattr(file, "path", file)
    name = getattr(file, "orig_name", None)
    what = f"The uploaded file {name!r}" if name else "The uploaded image"
    try:
        with PIL.Image.open(source) as image:
            width, height = image.size
            if width * height > MAX_EDIT_PIXELS:  # the header's size: nothing decoded yet
                raise _too_large(f"{width}x{height} pixels")
            image = upright(image)  # decodes it
    except PIL.Image.DecompressionBombError:  # above twice PIL's limit (`diffusers-var demo` sets it to ours)
        raise _too_large(f"more than {2 * PIL.Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except PIL.UnidentifiedImageError:
        raise user_error(
            f"{what} is not an image this demo can read (PNG, JPEG, WebP, GIF, BMP, TIFF, ...; not SVG)."
        ) from None
    except gr.Error:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL's errors for a damaged or truncated file
        raise user_error(f"{what} could not be decoded: it is damaged or cut short ({err}).") from None
    try:
        if image.mode not in (*SIXTEEN_BIT_MODES, "I", "F") and (
            "A" in image.getbands() or "transparency" in image.info
        ):
            return np.asarray(image.convert("RGBA"))
        return np.asarray(to_rgb(image))
    except (OSError, ValueError) as err:  # a mode PIL cannot convert
        raise user_error(f"{what} has pixels (PIL mode {image.mode}) this demo cannot turn into RGB: {err}.") from None


def painted_mask(editor: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 (H, W, 3), painted (H, W) bool)`` from a ``gr.ImageEditor`` value: the background and where any
    layer has paint (or, without layers, where the composite differs from the background)."""
    if editor is not None and not isinstance(editor, dict):  # (only the HTTP API can send this)
        raise user_error(f"The image editor's value must be its background, layers and composite, got {editor!r}.")
    background = None if not editor else editor.get("background")
    if background is None:
        raise user_error("Upload an image to edit (or use the example) first.")
    background = np.asarray(background)
    if background.dtype != np.uint8:  # Gradio's editor gives 8-bit images; anything else would wrap or take NaN
        raise user_error(f"The image to edit must be 8-bit (uint8) pixels, got {background.dtype}.")
    if background.ndim not in (2, 3) or (background.ndim == 3 and background.shape[-1] not in (1, 2, 3, 4)):
        raise user_error(
            "The image to edit must be (height, width) grayscale or (height, width, channels) pixels with 1 to 4 "
            f"channels (gray, gray + alpha, RGB, RGBA), got shape {background.shape}."
        )
    if background.shape[0] * background.shape[1] > MAX_EDIT_PIXELS:
        # every copy below is of the full image; the pipeline resizes it to the model's size anyway
        raise _too_large(f"{background.shape[1]}x{background.shape[0]} pixels")
    layers = editor.get("layers")
    if layers is not None and not isinstance(layers, (list, tuple)):  # (only the HTTP API can send this)
        raise user_error(f"The image editor's layers must be a list of images, got {type(layers).__name__}.")
    image = _on_white(background)
    painted = np.zeros(image.shape[:2], dtype=bool)
    for layer in layers or []:
        layer = np.asarray(layer)
        if layer.shape[:2] != painted.shape:  # (only the HTTP API can send this: the editor's layers match)
            raise user_error(
                f"A painted layer of {layer.shape[1] if layer.ndim > 1 else '?'}x{layer.shape[0]} pixels does not "
                f"match the image's {painted.shape[1]}x{painted.shape[0]}."
            )
        has_alpha = layer.ndim == 3 and layer.shape[-1] == 4  # paint is where a layer is opaque (else not black)
        painted |= (layer[..., 3] if has_alpha else layer.reshape(*painted.shape, -1).max(-1)) > 0
    composite = editor.get("composite")
    if not painted.any() and composite is not None and np.asarray(composite).shape[:2] == painted.shape:
        painted = (np.abs(_on_white(np.asarray(composite)).astype(int) - image.astype(int)) > 0).any(-1)
    return image.astype(np.uint8), painted


def _on_white(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB of an editor image ((H, W) or (H, W, 1 to 4)): grayscale repeated, transparent parts on white as
    the page shows them (the colour under a fully transparent pixel is arbitrary)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] in (2, 4):  # gray + alpha, RGBA
        alpha = pixels[..., -1:].astype(np.float32) / 255
        pixels = np.rint(pixels[..., :-1] * alpha + 255 * (1 - alpha)).astype(pixels.dtype)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels[..., :3]


def nearest_infinity_size(pipe: InfinityPipeline, height: int, width: int) -> tuple[int, int]:
    """The supported size closest to ``height x width`` in aspect ratio, then in area."""
    sizes = supported_pixel_sizes(pipe.vae.pixels_per_token)
    ratio = math.log(height / width)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), abs(s[0] * s[1] - height * width)))


def _edit_tab(pipes: dict, common: dict, max_images: int):
    """One tab for every served family: paint on the image, pick a mode and what to generate."""
    titles = {key: FAMILIES[key][0].split()[0] for key in pipes}
    editors = {key: tuple(cls.from_pipe(pipe) for cls in EDIT_PIPELINES[key]) for key, pipe in pipes.items()}
    locks = {key: threading.Lock() for key in pipes}
    for inpaint, img2img in editors.values():
        inpaint.set_progress_bar_config(disable=True)
        img2img.set_progress_bar_config(disable=True)
    first = next(iter(pipes))
    gr.Markdown(
        "Edit an image with a served model: paint the region with the brush (white), choose what happens to "
        "it, and say what to generate (VAR: a class name; STAR / Infinity: a prompt). In-painting generates the "
        "cells of the model's token grid that the painted region touches (plus the Margin) and, at each coarser "
        "scale, the cells lying mostly inside it (the first, 1x1 scale always keeps the image); the other cells "
        "keep the image's tokens. The result is decoded from all scales and what the regenerated coarse tokens draw "
        "reaches past the region, so the unpainted part stays close to the image but can change too (edges, even "
        "the background's colour). Out-painting does the same for what is outside the painted region; "
        "image-to-image keeps the image's coarse scales and samples the others. The image is resized to the "
        "model's size."
    )
    with gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(
                value={"background": edit_example_image(), "layers": [], "composite": None},
                type="numpy",
                image_mode="RGBA",
                transforms=(),
                layers=False,
                brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed", default_size=24),
                canvas_size=(EDIT_EXAMPLE_SIZE, EDIT_EXAMPLE_SIZE),
                height=360,
                format="png",
                label="Image: paint the region",
                elem_id="edit-image",
            )
            # gradio's editor decodes what it receives with PIL's convert("RGBA"): through the HTTP API (the file
            # itself) a 16-bit grayscale PNG came out white, a photo's EXIF rotation was ignored, and an undecodable
            # or too large file was gradio's bare "Error". The page sends its canvas as PNG, which decodes the same.
            editor.convert_and_format_image = lambda file, flatten_on_white=False: decode_editor_image(file)
            model = gr.Radio([(titles[key], key) for key in pipes], value=first, label="Model", elem_id="edit-model")
            mode = gr.Radio(list(EDIT_MODES), value=EDIT_MODES[0], label="Mode", elem_id="edit-mode")
            what = gr.Textbox(
                label="What to generate (VAR: class name or index; STAR / Infinity: prompt)",
                value=CLASSES[class_id("square", "yellow", "blue")].caption
                if first != "var"
                else "yellow square on blue",
                elem_id="edit-what",
            )
            with gr.Row():
                strength = number_slider(
                    0,
                    1,
                    value=0.5,
                    step=0.05,
                    label="Strength (image-to-image: share of the scales sampled)",
                    elem_id="edit-strength",
                )
                guidance = number_slider(0, 10, value=4.0, step=0.1, label="Guidance scale (cfg)")
            mask_dilation = number_slider(
                0,
                3,
                value=0,
                step=1,
                label="Margin (in-/out-painting: latent cells also generated around the region; 1-2 help a new "
                "object draw its own edges)",
                elem_id="edit-mask-dilation",
            )
            num_images = number_slider(1, max_images, value=min(2, max_images), step=1, label="Number of images")
            seed, randomize = _seed_row("edit")
            button = gr.Button("Edit", variant="primary", elem_id="edit-generate")
        with gr.Column():
            gallery, info = _outputs("edit")

    def run_edit(
        editor_value,
        family,
        mode_name,
        text,
        strength,
        guidance_scale,
        num_images,
        seed,
        randomize,
        mask_dilation=0,
        progress=gr.Progress(track_tqdm=True),
    ):
        if family not in editors:
            raise user_error(f"Pick a served model: {', '.join(titles.values())}.")
        if mode_name not in EDIT_MODES:  # (the HTTP API can send any text)
            raise user_error(f"Pick a mode: {'; '.join(EDIT_MODES)}.")
        image, painted = painted_mask(editor_value)
        count = _check_count(num_images, max_images)
        inpaint, img2img = editors[family]
        kwargs = dict(image=image, guidance_scale=_number(guidance_scale, "Guidance scale"))
        if mode_name == EDIT_MODES[2]:
            pipe, kwargs["strength"] = img2img, _number(strength, "Strength")
        else:
            if not painted.any():
                raise user_error("Paint the region with the brush first (nothing is painted).")
            if mode_name == EDIT_MODES[1] and painted.all():  # out-painting keeps what is painted
                raise user_error("Out-paint keeps the painted region: the whole image is painted, nothing is left.")
            pipe = inpaint
            kwargs["mask_image"] = painted if mode_name == EDIT_MODES[0] else ~painted
            kwargs["mask_dilation"] = _whole(mask_dilation, "Margin")
        if family == "infinity" and not pipe.config.get("default_size"):  # else the size the model was trained for
            kwargs["height"], kwargs["width"] = nearest_infinity_size(pipe, *image.shape[:2])
        if mode_name == EDIT_MODES[1]:  # a kept region smaller than the token grid's cells keeps nothing
            size = {key: kwargs[key] for key in ("height", "width") if key in kwargs}
            try:
                kept = pipe.kept_token_grid(kwargs["mask_image"], kwargs["mask_dilation"], image=image, **size)
            except ValueError as err:
                raise user_error(str(err)) from None
            if not kept.any():
                grid = "x".join(map(str, kept.shape[-2:]))
                raise user_error(
                    f"Out-paint keeps whole cells of the model's {grid} token grid: the painted region covers none "
                    "(with this Margin), so nothing would be kept. Paint a larger region, or lower the Margin."
                )
        if family == "var":
            name = str(text or "").strip()
            if not name:
                raise user_error("Say what to generate: a class name (or index).")
            try:
                kwargs["class_labels"] = class_label_ids(pipe, name)
            except ValueError:
                raise user_error(f"Unknown class {name!r}: use a name of the VAR tab's Class list.") from None
        else:
            kwargs["prompt"] = _prompt(text)
        seed = _pick_seed(seed, randomize)
        return _run(pipe, locks[family], seed, count, **kwargs)

    inputs = [editor, model, mode, what, strength, guidance, num_images, seed, randomize, mask_dilation]
    gr.on([button.click, what.submit], run_edit, inputs, [gallery, seed, info], api_name="edit", **common)


DEMO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # build_demo's dtype (--dtype's choices)

# build_demo's delete_cache: every 10 minutes, the app's temporary files (generated images, uploads) older than an hour
DELETE_CACHE = (600, 3600)


def build_demo(
    var: Any = DEFAULT,
    star: Any = DEFAULT,
    infinity: Any = DEFAULT,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
    max_images: int = 8,
    queue_size: int = 32,
    concurrency_limit: int = 1,
    loras: list[str] | None = None,
    lora_scales: list[float] | None = None,
    var_refiner: Any = None,
    fast: bool = False,
    compile_cache: str | Path | None = None,
    delete_cache: tuple[int, int] | None = DELETE_CACHE,
) -> gr.Blocks:
    """Build the app (queued, not launched).

    ``var``/``star``/``infinity``: a pipeline object, a pipeline folder, ``"default"`` (the embedded
    pipeline when present) or ``None``. ``var_refiner``: CoDe's small refiner for the VAR tab (a VARPipeline, a folder,
    ``"default"``: the embedded ``var-shapes-refiner``, or ``None``); a VARCoDePipeline as ``var`` brings its own.
    ``device`` defaults to CUDA when available. Generation requests run ``concurrency_limit`` at a time across all
    tabs; at most ``queue_size`` wait, and further requests are refused with gradio's "Queue is full" message.
    ``loras`` (``--lora``): LoRA adapters, each loaded into the pipeline of its family, at ``lora_scales``
    (:func:`attach_loras`). ``fast`` (``--fast``): every served pipeline (and the Edit tab's, made from them) on
    the fast path in ``dtype`` from float32 weights, compiled on a GPU with torch.compile's caches in
    ``compile_cache`` (:func:`diffusers_var.use_compile_cache`); without it ``dtype`` is the weights' dtype.
    ``delete_cache``: ``(frequency, age)`` in seconds, gradio's ``gr.Blocks(delete_cache=...)``: every ``frequency``
    seconds the files this app wrote to gradio's temporary folder (generated images, uploads) that are older than
    ``age`` are deleted, and all of them when the server stops (default every 10 minutes, those older than an hour);
    ``None`` keeps them. A bad setting is a ``ValueError`` naming it (the checks of ``diffusers-var demo``'s flags).
    """
    for name, value in (
        ("max_images", max_images),
        ("queue_size", queue_size),
        ("concurrency_limit", concurrency_limit),
    ):
        problem = demo_count_problem(name, value)
        if problem:
            raise ValueError(f"{problem}.")
    max_images, queue_size, concurrency_limit = int(max_images), int(queue_size), int(concurrency_limit)
    if delete_cache is not None and not (
        isinstance(delete_cache, (tuple, list))
        and len(delete_cache) == 2
        and all(_is_whole(seconds) and seconds >= 1 for seconds in delete_cache)
    ):
        raise ValueError(
            "`delete_cache` must be None (keep the files) or (frequency, age): two whole numbers of seconds, at "
            f"least 1, got {delete_cache!r}."
        )
    problem = check_device("device", device)
    if problem:
        raise ValueError(f"{problem}.")
    if dtype not in DEMO_DTYPES:  # (a string or an integer dtype failed in every tab's load, shown as "Not available")
        allowed = ", ".join(str(d) for d in DEMO_DTYPES)
        raise ValueError(f"`dtype` must be one of {allowed}, got {dtype!r}.")
    if var is None and star is None and infinity is None:
        raise ValueError("nothing to serve: `var`, `star` and `infinity` are all None; give at least one.")
    if lora_scales is not None and not (
        isinstance(lora_scales, (list, tuple)) and all(is_number(scale) for scale in lora_scales)
    ):
        raise ValueError(f"`lora_scales` must be a list of numbers, got {lora_scales!r}.")
    if fast and cpu_offload:
        raise ValueError("`fast` (--fast) cannot be combined with `cpu_offload` (--cpu-offload): choose one.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cpu_offload and torch.device(device).type == "cpu":  # it moves weights to an accelerator per call
        raise ValueError(
            "`cpu_offload` (--cpu-offload) keeps the weights on the CPU between calls on an accelerator; the demo "
            "runs on the CPU here: leave it out, or pass a GPU `device` (--device cuda)."
        )
    weights_dtype = torch.float32 if fast else dtype
    loaded = {
        key: load_family(key, spec, device, weights_dtype, cpu_offload)
        for key, spec in (("var", var), ("star", star), ("infinity", infinity))
    }
    code, code_notice = load_code(loaded["var"][0], var_refiner, device, weights_dtype)
    if isinstance(loaded["var"][0], VARCoDePipeline):  # a CoDe folder: its drafter is the tab's plain VAR
        plain = VARPipeline(transformer=code.transformer, vqvae=code.vqvae, id2label=code.id2label or None)
        loaded["var"] = (plain, "")
    lora_notes = attach_loras({key: pipe for key, (pipe, _) in loaded.items()}, loras, lora_scales)
    if fast:  # before the Edit tab's pipelines are made from these: they inherit it
        for pipe in [pipe for pipe, _ in loaded.values()] + [code]:
            if pipe is not None:
                enable_fast_path(pipe, device, dtype, compile_cache=compile_cache)
    common = {"concurrency_limit": concurrency_limit, "concurrency_id": "generate"}
    builders = {"var": _var_tab, "star": _star_tab, "infinity": _infinity_tab}
    delete_cache = None if delete_cache is None else tuple(int(seconds) for seconds in delete_cache)
    with gr.Blocks(title="diffusers-var demo", delete_cache=delete_cache) as demo:
        gr.Markdown(
            "# diffusers-var: next-scale prediction (VAR, STAR, Infinity)\n"
            f"Running on `{device}` ({str(dtype).replace('torch.', '')}{', fast path' if fast else ''}). "
            "Progress follows the scales."
        )
        with gr.Tabs():
            for key, (title, _, _) in FAMILIES.items():
                pipe, notice = loaded[key]
                with gr.Tab(title, id=key, elem_id=f"tab-{key}"):
                    if pipe is None:
                        gr.Markdown(f"**Not available.** {notice}", elem_id=f"{key}-notice")
                    else:
                        if key in lora_notes:
                            gr.Markdown(f"LoRA: {lora_notes[key]}", elem_id=f"{key}-lora")
                        if key == "var":
                            _var_tab(pipe, common, max_images, code, code_notice)
                        else:
                            builders[key](pipe, common, max_images)
            served = {key: pipe for key, (pipe, _) in loaded.items() if pipe is not None}
            with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
                if served:
                    _edit_tab(served, common, max_images)
                else:
                    gr.Markdown("**Not available.** No model is served.", elem_id="edit-notice")
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency_limit)
    demo.loaded_pipelines = {key: pipe for key, (pipe, _) in loaded.items()}
    demo.loaded_pipelines["var_code"] = code
    return demo


# -- command line -----------------------------------------------------------------------------------
def model_flags_problem(specs: dict[str, Any], refiner: Any) -> str | None:
    """The command line's check of ``--var/--star/--infinity/--var-refiner`` before anything is loaded: a folder given
    there must hold a pipeline of its family (:func:`build_demo` turns a bad folder into a tab notice, which a person
    who named the folder would not see in the terminal), and something must be served. ``DEFAULT``: the embedded
    pipeline, whose absence stays a notice."""
    if all(spec is None for spec in specs.values()):
        return (
            "nothing to serve: `--var`, `--star` and `--infinity` are all 'none'; leave one out (its embedded "
            "pipeline) or give a pipeline folder"
        )
    for key, spec in specs.items():
        if spec is not None and str(spec) != DEFAULT:
            try:
                expect_pipeline_class(resolve_pipeline_folder(spec), FAMILIES[key][1])
            except ValueError as err:
                return f"`--{key}` {err}"
    if refiner is not None:
        if specs["var"] is None:
            return "`--var-refiner` refines a VAR model's images: it needs `--var` (not 'none')"
        if str(refiner) != DEFAULT:
            try:
                expect_pipeline_class(resolve_pipeline_folder(refiner), VARPipeline, exact=True)
            except ValueError as err:
                return f"`--var-refiner` {err}"
        if str(specs["var"]) != DEFAULT and issubclass(
            pipeline_class_of(resolve_pipeline_folder(specs["var"])), VARCoDePipeline
        ):
            return CODE_AND_REFINER.format(var="`--var`", refiner="`--var-refiner`")
    return None


def run(args: argparse.Namespace) -> int:
    """Serve the app for parsed :func:`add_demo_arguments` flags; a bad value is a one-line error (exit code 2)."""
    problem = check_device("--device", args.device)
    if problem:
        return print_error(problem)
    try:  # before loading anything; the server's own message for this blamed the port ("": the server's default)
        socket.getaddrinfo(args.host or None, args.port)
    except (socket.gaierror, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or err
        return print_error(
            f"`--host {args.host}`: not a name or address this machine can resolve ({reason}); e.g. 127.0.0.1 (this "
            "machine only) or 0.0.0.0 (every network interface)."
        )
    if args.compile_cache is not None and not args.fast:
        return print_error("`--compile-cache` holds the fast path's compiled code: add `--fast`.")
    specs = {key: (None if str(getattr(args, key)).lower() == "none" else getattr(args, key)) for key in FAMILIES}
    refiner = getattr(args, "var_refiner", None)
    refiner = None if refiner is None or str(refiner).lower() == "none" else refiner
    problem = model_flags_problem(specs, refiner)
    if problem:
        return print_error(problem)
    try:
        demo = build_demo(
            **specs,
            device=args.device,
            dtype=getattr(torch, args.dtype or ("bfloat16" if args.fast else "float32")),
            cpu_offload=args.cpu_offload,
            max_images=args.max_images,
            queue_size=args.queue_size,
            concurrency_limit=args.concurrency,
            loras=getattr(args, "lora", None),
            lora_scales=getattr(args, "lora_scale", None),
            var_refiner=refiner,
            fast=args.fast,
            compile_cache=args.compile_cache,
        )
    except ValueError as err:
        return print_error(err)
    if not any(demo.loaded_pipelines[key] is not None for key in FAMILIES):  # no embedded pipeline installed either
        return print_error("nothing to serve: no embedded pipeline here; give one with `--var/--star/--infinity PATH`")
    try:
        # uploads: a decompression bomb is refused as it is decoded, a large file before that
        PIL.Image.MAX_IMAGE_PIXELS = MAX_EDIT_PIXELS
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size="50mb")
    except OSError as err:  # the port is taken, or the host is not an address of this machine
        return print_error(f"`--host {args.host} --port {args.port}`: cannot serve there ({err})")
    return 0


def main(argv=None) -> int:
    parser = OneLineErrorParser(prog="diffusers-var demo", description="Gradio demo for VAR, STAR and Infinity.")
    add_demo_arguments(parser)
    return run(parser.parse_args(argv))
