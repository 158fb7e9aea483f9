"""The Gradio demo: one app with a tab per model family (VAR, STAR, Infinity).

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
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from .cli import add_demo_arguments, pipeline_class_of
from .models.dynamic_resolution import supported_pixel_sizes
from .pipelines.pipeline_infinity import InfinityPipeline
from .pipelines.pipeline_star import STARPipeline
from .pipelines.pipeline_var import VARCoDePipeline, VARPipeline

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "pipelines"
DEFAULT = "default"  # sentinel: the embedded pipeline of the family, when it exists
FAMILIES = {  # key -> (tab title, pipeline class, embedded folder)
    "var": ("VAR (class-conditional)", VARPipeline, EMBEDDED_DIR / "var-shapes"),
    "star": ("STAR (text-to-image)", STARPipeline, EMBEDDED_DIR / "star-shapes"),
    "infinity": ("Infinity (text-to-image)", InfinityPipeline, EMBEDDED_DIR / "infinity-shapes"),
}
EMBEDDED_VAR_REFINER = EMBEDDED_DIR / "var-shapes-refiner"  # CoDe's refiner for the embedded var-shapes
MAX_SEED = 2**31 - 1
RANDOM_CLASS = "(random class)"
SHAPE_PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background",
                 "a white square on a green background"]


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
            return None, (f"The embedded {title.split()[0]} pipeline (`pipelines/{embedded.name}`) is not available "
                          f"in this installation. Start the demo with `{flag} PATH` to serve a pipeline folder.")
        spec = embedded
    if isinstance(spec, (str, Path)):
        try:
            found = pipeline_class_of(spec)
            if not issubclass(found, pipeline_class):
                raise ValueError(f"{str(spec)!r} holds a {found.__name__}, not a {pipeline_class.__name__}")
            pipe = found.from_pretrained(spec, dtype=dtype)
        except Exception as err:  # never crash the app for one tab
            logger.exception("could not load %s pipeline from %s", family, spec)
            return None, f"Could not load the {title.split()[0]} pipeline: {err}"
    elif isinstance(spec, pipeline_class):
        pipe = spec
    else:
        raise TypeError(f"`{family}` must be a {pipeline_class.__name__}, a pipeline folder, {DEFAULT!r} or None; got {type(spec).__name__}.")
    if cpu_offload and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    elif device is not None:
        pipe.to(device)
    return pipe, ""


def load_code(var_pipe, refiner: Any, device: str, dtype: torch.dtype):
    """The VAR tab's CoDe pipeline: ``var_pipe`` itself when it is one, else ``var_pipe`` as the drafter with
    ``refiner`` (a VARPipeline, a VAR pipeline folder, ``DEFAULT``: the embedded refiner, or ``None``: no CoDe),
    sharing their weights. Returns ``(pipeline or None, notice)``; a refiner that cannot be used becomes the notice."""
    if var_pipe is None or isinstance(var_pipe, VARCoDePipeline):
        return var_pipe, ""
    if refiner is None:
        return None, ""
    if isinstance(refiner, (str, Path)) and str(refiner) == DEFAULT:
        refiner = EMBEDDED_VAR_REFINER
    try:
        if isinstance(refiner, (str, Path)):
            found = pipeline_class_of(refiner)
            if found is not VARPipeline:
                raise ValueError(f"{str(refiner)!r} holds a {found.__name__}, not a VARPipeline")
            refiner = found.from_pretrained(refiner, dtype=dtype)
        code = VARCoDePipeline.from_var_pipelines(var_pipe, refiner)
    except Exception as err:  # the plain VAR tab still works
        logger.exception("could not set up CoDe with the refiner %s", refiner)
        return None, f"CoDe is not available: {err}"
    if device is not None:
        code.refiner.to(device)
    return code, ""


# -- generation -------------------------------------------------------------------------------------
def _check_count(num_images, max_images: int) -> int:
    if num_images is None or int(num_images) != num_images or not 1 <= int(num_images) <= max_images:
        raise gr.Error(f"Number of images must be a whole number from 1 to {max_images}; got {num_images}.")
    return int(num_images)


def _pick_seed(seed, randomize: bool) -> int:
    if randomize:
        return random.randint(0, MAX_SEED)
    if seed is None or int(seed) != seed or not 0 <= int(seed) <= MAX_SEED:
        raise gr.Error(f"Seed must be a whole number from 0 to {MAX_SEED}; got {seed}.")
    return int(seed)


def _prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error("Please enter a prompt: it is empty.")
    return prompt.strip()


def _run(pipe, lock: threading.Lock, seed: int, num_images: int, **kwargs):
    """Call the pipeline; a ``ValueError`` (bad argument) or any failure becomes a readable ``gr.Error``."""
    start = time.perf_counter()
    try:
        with lock:
            images = pipe(num_images_per_prompt=num_images, generator=torch.Generator().manual_seed(seed),
                          output_type="pil", **kwargs).images
    except ValueError as err:
        raise gr.Error(str(err)) from None
    except Exception as err:  # a readable message in the page, the traceback in the server log
        logger.exception("generation failed")
        raise gr.Error(f"Generation failed ({type(err).__name__}: {err}).") from None
    seconds = time.perf_counter() - start
    width, height = images[0].size
    info = f"{len(images)} image{'s' * (len(images) != 1)} of {width}x{height} px, seed {seed}, {seconds:.2f} s"
    return images, seed, info


# -- user interface ---------------------------------------------------------------------------------
def _seed_row(prefix: str):
    with gr.Row():
        seed = gr.Number(label="Seed (the seed used is shown here after generating)", value=0, precision=0,
                         minimum=0, maximum=MAX_SEED, elem_id=f"{prefix}-seed")
        randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id=f"{prefix}-randomize")
    return seed, randomize


def _outputs(prefix: str):
    gallery = gr.Gallery(label="Images", columns=4, height=360, object_fit="contain", format="png",
                         elem_id=f"{prefix}-gallery")
    info = gr.Textbox(label="Result", interactive=False, elem_id=f"{prefix}-info")
    return gallery, info


def _var_tab(pipe: VARPipeline, common: dict, max_images: int, code: VARCoDePipeline | None = None,
             code_notice: str = ""):
    lock = threading.Lock()
    names = [name for _, name in sorted(pipe.id2label.items())] or [str(i) for i in range(pipe.transformer.config.num_classes)]
    name_to_id = {name: i for i, name in sorted(pipe.id2label.items())} or {str(i): i for i in range(len(names))}
    gr.Markdown(f"Class-conditional VAR: {len(names)} classes; type in the Class box to search them.")
    with gr.Row():
        with gr.Column():
            label = gr.Dropdown([RANDOM_CLASS, *names], value=names[min(1, len(names) - 1)], label="Class",
                                filterable=True, allow_custom_value=True, elem_id="var-class")
            guidance = gr.Slider(0, 10, value=4.0, step=0.1, label="Guidance scale (cfg)")
            with gr.Row():
                top_k = gr.Slider(0, max(pipe.transformer.config.vocab_size, 900), value=900, step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0, 1, value=0.95, step=0.01, label="Top-p (0 = off)")
            more_smooth = gr.Checkbox(label="More smooth (Gumbel-softmax codes)", value=False)
            if code is not None:
                num_scales, refiner = len(code.scale_schedule()), code.refiner.config
                with gr.Row():
                    use_code = gr.Checkbox(label=f"CoDe: this model drafts the coarse scales, a small refiner (depth "
                                                 f"{refiner.depth}, width {refiner.embed_dim}) samples the fine ones",
                                           value=True, elem_id="var-code")
                    draft_steps = gr.Slider(1, num_scales - 1, value=code.config.draft_steps, step=1,
                                            label=f"Draft steps (of {num_scales} scales)", elem_id="var-draft-steps")
            elif code_notice:
                gr.Markdown(code_notice, elem_id="var-code-notice")
            num_images = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Number of images",
                                   elem_id="var-num-images")
            seed, randomize = _seed_row("var")
            button = gr.Button("Generate", variant="primary", elem_id="var-generate")
        with gr.Column():
            gallery, info = _outputs("var")

    def run_var(target, extra: dict, class_name, guidance_scale, top_k, top_p, more_smooth, num_images, seed,
                randomize):
        count = _check_count(num_images, max_images)
        if class_name == RANDOM_CLASS or class_name in (None, ""):
            labels = None
        elif class_name in name_to_id:
            labels = [name_to_id[class_name]]
        else:
            try:  # a class index, or any synonym of a name (e.g. "golden retriever")
                labels = [int(class_name)] if str(class_name).lstrip("-").isdigit() else pipe.get_label_ids([class_name])
            except ValueError:
                raise gr.Error(f"Unknown class {class_name!r}: pick one from the Class list (type to search).") from None
        seed = _pick_seed(seed, randomize)
        return _run(target, lock, seed, count, class_labels=labels, guidance_scale=float(guidance_scale),
                    top_k=int(top_k), top_p=float(top_p), more_smooth=bool(more_smooth), **extra)

    def generate(class_name, guidance_scale, top_k, top_p, more_smooth, num_images, seed, randomize,
                 progress=gr.Progress(track_tqdm=True)):
        return run_var(pipe, {}, class_name, guidance_scale, top_k, top_p, more_smooth, num_images, seed, randomize)

    def generate_code(class_name, guidance_scale, top_k, top_p, more_smooth, num_images, seed, randomize, with_code,
                      steps, progress=gr.Progress(track_tqdm=True)):
        target, extra = (code, {"draft_steps": int(steps)}) if with_code else (pipe, {})
        return run_var(target, extra, class_name, guidance_scale, top_k, top_p, more_smooth, num_images, seed,
                       randomize)

    inputs = [label, guidance, top_k, top_p, more_smooth, num_images, seed, randomize]
    if code is not None:  # the same inputs, then CoDe's two
        generate, inputs = generate_code, inputs + [use_code, draft_steps]
    button.click(generate, inputs, [gallery, seed, info], api_name="generate_var", **common)
    examples = [names[i] for i in sorted({0, len(names) // 3, (2 * len(names)) // 3})]
    gr.Examples([[name, 4.0, 0] for name in examples], [label, guidance, seed], label="Examples")


def _text_controls(prefix: str):
    prompt = gr.Textbox(label="Prompt", placeholder="a red circle on a blue background", lines=2, elem_id=f"{prefix}-prompt")
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
            guidance = gr.Slider(0, 10, value=4.0, step=0.1, label="Guidance scale (cfg)")
            with gr.Row():
                top_k = gr.Slider(0, max(pipe.transformer.config.vocab_size, 600), value=600, step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0, 1, value=0.8, step=0.01, label="Top-p (0 = off)")
            stable = gr.Checkbox(label="Stable sampler" + ("" if has_sampler else " (this checkpoint has no sampler head)"),
                                 value=has_sampler, interactive=has_sampler)
            num_images = gr.Slider(1, max_images, value=min(2, max_images), step=1, label="Number of images")
            seed, randomize = _seed_row("star")
            button = gr.Button("Generate", variant="primary", elem_id="star-generate")
        with gr.Column():
            gallery, info = _outputs("star")

    def generate(prompt, negative_prompt, guidance_scale, top_k, top_p, use_stable_sampler, num_images, seed, randomize,
                 progress=gr.Progress(track_tqdm=True)):
        text = _prompt(prompt)
        count = _check_count(num_images, max_images)
        seed = _pick_seed(seed, randomize)
        return _run(pipe, lock, seed, count, prompt=text, negative_prompt=(negative_prompt or None),
                    guidance_scale=float(guidance_scale), top_k=int(top_k), top_p=float(top_p),
                    use_stable_sampler=bool(use_stable_sampler) and has_sampler,
                    sampler_generator=torch.Generator().manual_seed(seed + 1))

    inputs = [prompt, negative, guidance, top_k, top_p, stable, num_images, seed, randomize]
    gr.on([button.click, prompt.submit], generate, inputs, [gallery, seed, info], api_name="generate_star", **common)
    gr.Examples([[text, 0] for text in SHAPE_PROMPTS], [prompt, seed], label="Examples")


def infinity_sizes(pipe: InfinityPipeline) -> list[str]:
    """Every size (``"HEIGHTxWIDTH"`` in pixels) the pipeline's aspect-ratio templates produce."""
    return [f"{h}x{w}" for h, w in sorted(supported_pixel_sizes(pipe.vae.pixels_per_token), key=lambda s: (s[0] * s[1], s))]


def _parse_size(size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in str(size).lower().replace(" ", "").split("x"))
    except ValueError:
        raise gr.Error(f"Size must look like HEIGHTxWIDTH (e.g. 1024x1024); got {size!r}.") from None
    return height, width


def _infinity_tab(pipe: InfinityPipeline, common: dict, max_images: int):
    lock = threading.Lock()
    sizes = infinity_sizes(pipe)
    squares = [s for s in sizes if s.split("x")[0] == s.split("x")[1]]
    configured = getattr(pipe.config, "default_size", None)  # e.g. [64, 64] for the embedded infinity-shapes
    preferred = [f"{configured[0]}x{configured[1]}"] if configured else []
    default = next((s for s in [*preferred, "1024x1024"] if s in sizes), squares[0])
    gr.Markdown("Text-to-image with Infinity; the size picks an aspect-ratio template and resolution preset. "
                "Type your own HEIGHTxWIDTH to try others (unsupported sizes list the supported ones).")
    with gr.Row():
        with gr.Column():
            prompt, negative = _text_controls("infinity")
            size = gr.Dropdown([(f"{s} (h/w {int(s.split('x')[0]) / int(s.split('x')[1]):.2f})", s) for s in sizes],
                               value=default, label="Size (height x width, px)", filterable=True,
                               allow_custom_value=True, elem_id="infinity-size")
            with gr.Row():
                guidance = gr.Slider(0, 10, value=3.0, step=0.1, label="Guidance scale (cfg)")
                tau = gr.Slider(0.05, 2, value=0.5, step=0.05, label="Tau (temperature)")
            with gr.Row():
                top_k = gr.Slider(0, 1000, value=900, step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0, 1, value=0.97, step=0.01, label="Top-p (0 = off)")
            num_images = gr.Slider(1, max_images, value=min(2, max_images), step=1, label="Number of images")
            seed, randomize = _seed_row("infinity")
            button = gr.Button("Generate", variant="primary", elem_id="infinity-generate")
        with gr.Column():
            gallery, info = _outputs("infinity")

    def generate(prompt, negative_prompt, size, guidance_scale, tau, top_k, top_p, num_images, seed, randomize,
                 progress=gr.Progress(track_tqdm=True)):
        text = _prompt(prompt)
        height, width = _parse_size(size)
        count = _check_count(num_images, max_images)
        seed = _pick_seed(seed, randomize)
        return _run(pipe, lock, seed, count, prompt=text, negative_prompt=(negative_prompt or None), height=height,
                    width=width, guidance_scale=float(guidance_scale), tau=float(tau), top_k=int(top_k), top_p=float(top_p))

    inputs = [prompt, negative, size, guidance, tau, top_k, top_p, num_images, seed, randomize]
    gr.on([button.click, prompt.submit], generate, inputs, [gallery, seed, info], api_name="generate_infinity", **common)
    gr.Examples([[text, 0] for text in SHAPE_PROMPTS], [prompt, seed], label="Examples")


def build_demo(var: Any = DEFAULT, star: Any = DEFAULT, infinity: Any = DEFAULT, device: str | None = None,
               dtype: torch.dtype = torch.float32, cpu_offload: bool = False, max_images: int = 8,
               queue_size: int = 32, concurrency_limit: int = 1, var_refiner: Any = None) -> gr.Blocks:
    """Build the app (queued, not launched).

    ``var``/``star``/``infinity``: a pipeline object, a pipeline folder, ``"default"`` (the embedded
    pipeline when present) or ``None``. ``var_refiner``: CoDe's small refiner for the VAR tab (a VARPipeline, a folder,
    ``"default"``: the embedded ``var-shapes-refiner``, or ``None``); a VARCoDePipeline as ``var`` brings its own.
    ``device`` defaults to CUDA when available. Generation requests run ``concurrency_limit`` at a time across all
    tabs; at most ``queue_size`` wait, and further requests are refused with gradio's "Queue is full" message.
    """
    if not 1 <= max_images <= 64:
        raise ValueError(f"`max_images` must be in [1, 64], got {max_images}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = {key: load_family(key, spec, device, dtype, cpu_offload)
              for key, spec in (("var", var), ("star", star), ("infinity", infinity))}
    code, code_notice = load_code(loaded["var"][0], var_refiner, device, dtype)
    if isinstance(loaded["var"][0], VARCoDePipeline):  # a CoDe folder: its drafter is the tab's plain VAR
        plain = VARPipeline(transformer=code.transformer, vqvae=code.vqvae, id2label=code.id2label or None)
        loaded["var"] = (plain, "")
    common = dict(concurrency_limit=concurrency_limit, concurrency_id="generate")
    builders = {"var": _var_tab, "star": _star_tab, "infinity": _infinity_tab}
    with gr.Blocks(title="diffusers-var demo") as demo:
        gr.Markdown("# diffusers-var: next-scale prediction (VAR, STAR, Infinity)\n"
                    f"Running on `{device}` ({str(dtype).replace('torch.', '')}). Progress follows the scales.")
        with gr.Tabs():
            for key, (title, _, _) in FAMILIES.items():
                pipe, notice = loaded[key]
                with gr.Tab(title, id=key, elem_id=f"tab-{key}"):
                    if pipe is None:
                        gr.Markdown(f"**Not available.** {notice}", elem_id=f"{key}-notice")
                    elif key == "var":
                        _var_tab(pipe, common, max_images, code, code_notice)
                    else:
                        builders[key](pipe, common, max_images)
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency_limit)
    demo.loaded_pipelines = {key: pipe for key, (pipe, _) in loaded.items()}
    demo.loaded_pipelines["var_code"] = code
    return demo


# -- command line -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    specs = {key: (None if str(getattr(args, key)).lower() == "none" else getattr(args, key)) for key in FAMILIES}
    refiner = getattr(args, "var_refiner", None)
    refiner = None if refiner is None or str(refiner).lower() == "none" else refiner
    demo = build_demo(**specs, device=args.device, dtype=getattr(torch, args.dtype), cpu_offload=args.cpu_offload,
                      max_images=args.max_images, queue_size=args.queue_size, concurrency_limit=args.concurrency,
                      var_refiner=refiner)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-var demo", description="Gradio demo for VAR, STAR and Infinity.")
    add_demo_arguments(parser)
    return run(parser.parse_args(argv))
