"""The ``diffusers-var`` command: ``generate`` (main job), ``train``, ``demo`` (the Gradio app)."""

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
    try:
        pipe = _with_refiner(pipe, args, kwargs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = type(pipe).__name__
    try:
        if name in ("VARPipeline", "VARCoDePipeline"):
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        paths.append(str(path))
    print("saved " + ", ".join(paths))
    return 0


def _with_refiner(pipe, args, kwargs):
    """CoDe for ``generate``: ``--refiner`` (a VAR pipeline folder on the same tokenizer) turns a VAR ``--model`` into
    a VARCoDePipeline (the model drafts, the refiner refines); ``--draft-steps`` goes to a CoDe pipeline's call."""
    import torch

    from .pipelines.pipeline_var import VARCoDePipeline, VARPipeline

    if args.refiner is not None:
        if type(pipe) is not VARPipeline:
            raise ValueError(f"`--refiner` needs a VAR `--model` (the drafter), got a {type(pipe).__name__}")
        try:
            refiner_class = pipeline_class_of(args.refiner)
        except ValueError as err:
            raise ValueError(f"`--refiner` {err}") from None
        if refiner_class is not VARPipeline:
            raise ValueError(f"`--refiner` {args.refiner!r} holds a {refiner_class.__name__}, not a VARPipeline")
        refiner = refiner_class.from_pretrained(args.refiner, dtype=getattr(torch, args.dtype)).to(args.device)
        pipe = VARCoDePipeline.from_var_pipelines(pipe, refiner)
    if args.draft_steps is not None:
        if not isinstance(pipe, VARCoDePipeline):
            raise ValueError("`--draft-steps` applies to CoDe only: pass `--refiner PATH`, or a VARCoDePipeline "
                             "`--model`")
        kwargs["draft_steps"] = args.draft_steps
    return pipe


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
    parser.add_argument("--var-refiner", default="none", metavar="PATH",
                        help="a small VAR pipeline folder on the VAR model's tokenizer: the VAR tab then offers CoDe "
                             "(the VAR model drafts the coarse scales, this one refines the fine ones); 'default' is "
                             "the embedded pipelines/var-shapes-refiner (default: none)")
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
    gen.add_argument("--refiner", default=None, metavar="PATH",
                     help="CoDe: a small VAR pipeline folder on the same tokenizer that samples the fine scales after "
                          "the VAR --model drafted the coarse ones")
    gen.add_argument("--draft-steps", type=int, default=None,
                     help="CoDe: scales the drafter samples (default: the pipeline's, num_scales - 2 when built here)")
    gen.add_argument("--height", type=int, default=None, help="Infinity: image height (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="Infinity: image width (default: the model's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--out", default="out.png")
    gen.set_defaults(func=_generate)

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
