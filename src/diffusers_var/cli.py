"""The ``diffusers-var`` command: ``generate`` (main job), ``train``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "pipelines" / "var-shapes"


def _generate(args) -> int:
    import torch

    import json

    import diffusers_var

    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not (model / "model_index.json").is_file():
        print(f"error: `--model` {str(model)!r} is not a pipeline folder (no model_index.json)", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    class_name = json.loads((model / "model_index.json").read_text()).get("_class_name")
    pipeline_class = getattr(diffusers_var, class_name, None) if isinstance(class_name, str) else None
    if pipeline_class is None:
        print(f"error: `--model` {str(model)!r} holds a {class_name!r}, not a diffusers-var pipeline", file=sys.stderr)
        return 2
    pipe = pipeline_class.from_pretrained(model, dtype=dtype).to(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = dict(generator=generator, num_images_per_prompt=args.num_images, output_type="pil")
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-var", description="Next-scale-prediction image generation (VAR, STAR, Infinity).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images with a pipeline folder (default: the embedded VAR)")
    gen.add_argument("--model", default=None, help=f"pipeline folder (default: {DEFAULT_MODEL})")
    gen.add_argument("--prompt", default=None, help="text prompt (STAR / Infinity), or a class name for VAR")
    gen.add_argument("--class-label", default=None, help="VAR: class index or name (default: random)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
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
