"""The ``diffusers-var`` command: ``generate`` (main job), ``edit`` (in-painting, out-painting, image-to-image),
``train``, ``demo`` (the Gradio app)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "pipelines" / "var-shapes"


def pipeline_class_of(model) -> type:
    """The diffusers-var pipeline class a pipeline folder holds (from its ``model_index.json``);
    ``ValueError`` naming the folder when it is not one of ours."""
    import diffusers_var

    model = Path(model)
    if not (model / "model_index.json").is_file():
        raise ValueError(f"{str(model)!r} is not a pipeline folder (no model_index.json)")
    class_name = json.loads((model / "model_index.json").read_text()).get("_class_name")
    pipeline_class = getattr(diffusers_var, class_name, None) if isinstance(class_name, str) else None
    if pipeline_class is None:
        raise ValueError(f"{str(model)!r} holds a {class_name!r}, not a diffusers-var pipeline")
    return pipeline_class


def _generate(args) -> int:
    import torch

    model = Path(args.model) if args.model else DEFAULT_MODEL
    try:
        pipeline_class = pipeline_class_of(model)
    except ValueError as err:
        print(f"error: `--model` {err}", file=sys.stderr)
        return 2
    pipe = pipeline_class.from_pretrained(model, dtype=getattr(torch, args.dtype)).to(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = dict(generator=generator, num_images_per_prompt=args.num_images, output_type="pil")
    for name in ("guidance_scale", "top_k", "top_p"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    name = type(pipe).__name__
    try:
        if name == "VARPipeline":
            if args.prompt and not args.class_label:
                args.class_label = args.prompt
            labels = None
            if args.class_label is not None:
                labels = [int(args.class_label)] if args.class_label.lstrip("-").isdigit() else pipe.get_label_ids([args.class_label])
            images = pipe(class_labels=labels, **kwargs).images
        else:
            if not args.prompt:
                print("error: `--prompt` is required for text-to-image pipelines", file=sys.stderr)
                return 2
            if args.height or args.width:
                if name != "InfinityPipeline":
                    print("error: `--height/--width` apply to Infinity pipelines only (VAR/STAR sizes are fixed by the model)", file=sys.stderr)
                    return 2
                kwargs.update(height=args.height, width=args.width)
            images = pipe(prompt=args.prompt, **kwargs).images
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _save(images, args.out)
    return 0


def _save(images, out) -> None:
    """Save PIL images to ``out`` (``out-0.png``, ``out-1.png``, ... for several) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        paths.append(str(path))
    print("saved " + ", ".join(paths))


def edit_pipeline_class(model, inpainting: bool) -> type:
    """The in-painting (or image-to-image) pipeline class of the family a pipeline folder holds."""
    import diffusers_var

    found = pipeline_class_of(model)
    for family in (diffusers_var.VARPipeline, diffusers_var.STARPipeline, diffusers_var.InfinityPipeline):
        if issubclass(found, family):
            name = family.__name__.replace("Pipeline", "InpaintPipeline" if inpainting else "Img2ImgPipeline")
            return getattr(diffusers_var, name)
    raise ValueError(f"{str(model)!r} holds a {found.__name__}, which has no editing pipeline")


def _parse_box(text: str) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"`--box` must be four fractions y0,x0,y1,x1 (e.g. 0.25,0.25,0.75,0.75), got {text!r}")
    return box


def _edit(args) -> int:
    import PIL.Image
    import torch

    import diffusers_var

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    model = Path(args.model) if args.model else DEFAULT_MODEL
    masks = [name for name in ("mask", "box") if getattr(args, name) is not None]
    if len(masks) > 1:
        return fail("pass one of `--mask` and `--box`")
    if masks and args.strength is not None:
        return fail("`--strength` is for image-to-image, `--mask` / `--box` for in-painting: pass one of them")
    if not masks and args.strength is None:
        return fail("pass `--mask` / `--box` (in-painting) or `--strength` (image-to-image)")
    if args.outpaint and args.box is None:
        return fail("`--outpaint` applies to `--box` (a mask file already says what to generate)")
    try:
        pipeline_class = edit_pipeline_class(model, inpainting=bool(masks))
        image = PIL.Image.open(args.image).convert("RGB")
        mask = PIL.Image.open(args.mask).convert("L") if args.mask else None
    except ValueError as err:
        return fail(f"`--model` {err}")
    except OSError as err:
        return fail(f"could not read an image: {err}")
    pipe = pipeline_class.from_pretrained(model, dtype=getattr(torch, args.dtype)).to(args.device)
    kwargs = dict(image=image, generator=torch.Generator().manual_seed(args.seed),
                  num_images_per_prompt=args.num_images, output_type="pil")
    for name in ("guidance_scale", "top_k", "top_p", "strength"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    try:
        if args.height or args.width:
            if not issubclass(pipeline_class, diffusers_var.InfinityPipeline):
                return fail("`--height/--width` apply to Infinity pipelines only (VAR/STAR sizes are fixed by the "
                            "model)")
            kwargs.update(height=args.height, width=args.width)
        if masks:
            if args.box is not None:
                size = {k: kwargs[k] for k in ("height", "width") if k in kwargs}
                mask = pipe.box_mask(*_parse_box(args.box), inpainting=not args.outpaint, **size)
            kwargs["mask_image"] = mask
        if issubclass(pipeline_class, diffusers_var.VARPipeline):
            label = args.class_label if args.class_label is not None else args.prompt
            if label is None:
                return fail("`--class-label` (a class index or name) is required for VAR")
            kwargs["class_labels"] = [int(label)] if label.lstrip("-").isdigit() else pipe.get_label_ids([label])
        else:
            if not args.prompt:
                return fail("`--prompt` is required for text-to-image pipelines")
            kwargs["prompt"] = args.prompt
        images = pipe(**kwargs).images
    except ValueError as err:
        return fail(str(err))
    _save(images, args.out)
    return 0


def _train(args) -> int:
    from .training import TrainConfig, train

    try:
        config = TrainConfig.load(args.config, [f"task={args.task}", *args.overrides])
        export = train(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {export}")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (kept here so that ``diffusers-var --help`` does not import gradio)."""
    for flag, name, folder in (("--var", "VAR", "var-shapes"), ("--star", "STAR", "star-shapes"),
                               ("--infinity", "Infinity", "infinity-shapes")):
        parser.add_argument(flag, default="default", metavar="PATH",
                            help=f"{name} pipeline folder (default: the embedded pipelines/{folder} when present; "
                                 f"'none' hides the model)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload() on an accelerator")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    parser.add_argument("--max-images", type=int, default=8, help="most images per request (default 8)")
    parser.add_argument("--queue-size", type=int, default=32,
                        help="most waiting requests (default 32); more are told the queue is full")
    parser.add_argument("--concurrency", type=int, default=1, help="generations running at once, all tabs together")


def _demo(args) -> int:
    try:
        from .demo import run
    except ImportError as err:  # gradio missing: say how to get it instead of a traceback
        print(f"error: the demo needs gradio ({err}); install it with `pip install gradio`", file=sys.stderr)
        return 2
    return run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-var", description="Next-scale-prediction image generation (VAR, STAR, Infinity).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images with a pipeline folder (default: the embedded VAR)")
    gen.add_argument("--model", default=None, help=f"pipeline folder (default: {DEFAULT_MODEL})")
    gen.add_argument("--prompt", default=None, help="text prompt (STAR / Infinity), or a class name for VAR")
    gen.add_argument("--class-label", default=None, help="VAR: class index or name (default: random)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    gen.add_argument("--top-k", type=int, default=None, help="default: the pipeline's (0 = off)")
    gen.add_argument("--top-p", type=float, default=None, help="default: the pipeline's (0 = off)")
    gen.add_argument("--height", type=int, default=None, help="Infinity: image height (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="Infinity: image width (default: the model's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--out", default="out.png")
    gen.set_defaults(func=_generate)

    ed = sub.add_parser("edit", help="in-paint / out-paint (--mask or --box) or image-to-image (--strength) an image",
                        description="Edit IN.png with a pipeline folder (default: the embedded VAR): in-painting "
                                    "regenerates the white part of --mask (or the --box; --outpaint: all but the "
                                    "box), image-to-image keeps the image's first scales and samples the share "
                                    "--strength of them.")
    ed.add_argument("--model", default=None, help=f"pipeline folder (default: {DEFAULT_MODEL})")
    ed.add_argument("--image", required=True, help="the image to edit (resized to the model's size)")
    ed.add_argument("--mask", default=None, help="in-painting: mask image, white = generate (the image's size, or "
                                                 "the model's last token grid)")
    ed.add_argument("--box", default=None, metavar="Y0,X0,Y1,X1",
                    help="in-painting: the original notebook's box, as fractions of the height / width")
    ed.add_argument("--outpaint", action="store_true", help="with --box: generate everything around the box")
    ed.add_argument("--strength", type=float, default=None,
                    help="image-to-image: share of the scales sampled, in [0, 1] (1 ignores the image)")
    ed.add_argument("--class-label", default=None, help="VAR: class index or name of what to generate")
    ed.add_argument("--prompt", default=None, help="STAR / Infinity: what the edited image shows")
    ed.add_argument("--num-images", type=int, default=1)
    ed.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    ed.add_argument("--top-k", type=int, default=None, help="default: the pipeline's (0 = off)")
    ed.add_argument("--top-p", type=float, default=None, help="default: the pipeline's (0 = off)")
    ed.add_argument("--height", type=int, default=None, help="Infinity: image height (default: the model's)")
    ed.add_argument("--width", type=int, default=None, help="Infinity: image width (default: the model's)")
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--device", default="cpu")
    ed.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ed.add_argument("--out", default="edited.png")
    ed.set_defaults(func=_edit)

    from .training.engine import TASK_NAMES

    tr = sub.add_parser("train", help="train a tokenizer or a transformer (see configs/)")
    tr.add_argument("task", choices=list(TASK_NAMES))
    tr.add_argument("--config", default=None, help="YAML/JSON training config")
    tr.set_defaults(func=_train)
    tr.epilog = "Any number of key=value overrides may follow, e.g. max_steps=100 data.num_images=500."

    demo = sub.add_parser("demo", help="serve the Gradio demo app (needs `pip install gradio`)")
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        bad = [item for item in extra if "=" not in item]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key=value)")
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


def train_main(argv=None) -> int:
    """``diffusers-var-train TASK --config FILE``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
