"""The ``diffusers-var`` command: ``generate`` (main job), ``edit`` (in-painting, out-painting, image-to-image),
``train``, ``demo`` (the Gradio app).

Every usage error is one line, ``error: ...`` naming the flag, with exit code 2; the arguments, the device and
the output path are all checked before a model is loaded or an image generated.
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
from pathlib import Path

from .cli_support import (
    IMAGE_SUFFIXES,
    INTERRUPTED,
    MAX_BATCH_SIZE,
    MAX_IMAGES,
    MAX_SEED,
    OneLineErrorParser,
    add_demo_arguments,
    add_lora_arguments,
    check_device,
    class_label_ids,
    expect_pipeline_class,
    float_in_range,
    generation_pipeline_class,
    guidance_scale_flag,
    home_path,
    int_in_range,
    load_loras,
    load_pipeline,
    name_flags,
    nonblank,
    pipeline_class_of,
    pipeline_family,
    print_error,
    top_p_flag,
)
from .conversion.common import folder_problem
from .embedded_models import EMBEDDED_PIPELINES, default_model, resolve_pipeline_folder
from .file_utils import atomic_name_problem, path_problem, write_atomic

DEFAULT_MODEL = default_model()
EMBEDDED_NAMES = ", ".join(EMBEDDED_PIPELINES)
MAX_EDIT_IMAGES = 64  # `edit` makes all its images in one pipeline call (the demo's most per request)
PIPELINE_FLAGS = {  # the pipelines' parameters as ``generate`` / ``edit`` call them: the flag each comes from
    "class_labels": "--class-label",
    "prompt": "--prompt",
    "guidance_scale": "--guidance-scale",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "height": "--height",
    "width": "--width",
    "draft_steps": "--draft-steps",
    "image": "--image",
    "mask_image": "--mask",
    "mask_dilation": "--mask-dilation",
    "strength": "--strength",
}

__all__ = ["DEFAULT_MODEL", "main", "pipeline_class_of", "train_main"]


def output_name(out: Path, index: int, count: int) -> str:
    """The file name of image ``index`` of ``count`` written to ``--out``: ``out``'s own for one image, else
    ``STEM-{index}.EXT`` (``--out squares.png --num-images 4`` -> ``squares-0.png`` .. ``squares-3.png``).
    One name at a time: a list of all of them would take memory in proportion to ``--num-images``."""
    return out.name if count == 1 else f"{out.stem}-{index}{out.suffix}"


def output_path(out: Path, index: int, count: int) -> Path:
    """Where ``generate`` / ``edit`` write image ``index`` of ``count``: :func:`output_name` next to ``out``."""
    return out if count == 1 else out.with_name(output_name(out, index, count))


def _writes_rgb(image_format: str | None) -> bool:
    """Whether PIL saves an RGB image in ``image_format``: some formats it knows take other modes only (XBM) or
    need a plug-in (BUFR, HDF5), and failed only once the images were made."""
    import PIL.Image

    if image_format not in PIL.Image.SAVE:
        return False
    try:
        PIL.Image.new("RGB", (8, 8)).save(io.BytesIO(), format=image_format)
    except Exception:  # noqa: BLE001 - PIL's writers raise OSError, ValueError, KeyError...: any means no
        return False
    return True


# the EXIF "Software" tag of the images generate / edit write: an existing file is replaced only if it carries it
SOFTWARE_TAG, SOFTWARE = 0x0131, "diffusers-var"


def written_here(path: Path) -> bool:
    """Whether the image file ``path`` was written by ``generate`` / ``edit`` (its EXIF "Software" tag)."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return image.getexif().get(SOFTWARE_TAG) == SOFTWARE
    except Exception:  # noqa: BLE001 - not an image PIL reads: not ours
        return False


def check_output(out: Path, count: int, overwrite: bool = False) -> str | None:
    """``None`` when the images can be written to ``--out``, else the one-line reason (checked before generating,
    so a typo costs nothing): an image extension PIL can write, a folder that exists or can be made (made when the
    first image is written), write access, no folder or read-only file in the way of an image, and no existing file
    that these commands did not write (unless ``overwrite``)."""
    import PIL.Image

    suffix = out.suffix.lower()
    formats = PIL.Image.registered_extensions()
    if not suffix:
        return f"`--out` {str(out)!r} has no file extension; add one (.png, .jpg, .webp): it picks the image format"
    if not _writes_rgb(formats.get(suffix)):
        writable = sorted(ext for ext in IMAGE_SUFFIXES if _writes_rgb(formats.get(ext)))
        return f"`--out` {str(out)!r}: PIL cannot write an RGB image as {suffix!r}; use one of {', '.join(writable)}"
    problem = (  # path_problem first: a name too long in out's folder raised in folder_problem (a traceback)
        path_problem(out) or folder_problem(out.parent) or atomic_name_problem(output_path(out, count - 1, count))
    )
    if problem:
        return f"`--out` {str(out)!r}: {problem}"
    if not out.parent.is_dir():  # made when the first image is written
        return None
    existing = set(os.listdir(out.parent))  # one listing, not one look-up per image
    for index in range(count):
        if output_name(out, index, count) not in existing:
            continue
        path = output_path(out, index, count)
        if path.is_dir():
            return f"`--out` {str(path)!r} is a folder; give a file name such as {str(path / 'out.png')!r}"
        if path.exists() and not path.is_file():  # reading a named pipe to look for the tag would block for good
            return f"`--out` {str(path)!r} exists and is not a regular file (a pipe, socket or device); choose another"
        if path.is_symlink() and not overwrite:  # the write replaces the link itself, not the file it points to
            return (
                f"`--out` {str(path)!r} is a symbolic link, which writing would replace with a file; give the file it "
                f"points to ({os.path.realpath(path)!r}) or another name, or pass --overwrite to replace the link"
            )
        if path.exists() and not os.access(path, os.W_OK):
            return f"`--out` {str(path)!r} exists and is not writable"
        if not overwrite and not written_here(path):
            return (
                f"`--out` {str(path)!r} exists and carries no diffusers-var tag (this version writes one in EXIF's "
                "Software field of PNG, JPEG, WebP and TIFF files); choose another name, or pass --overwrite to "
                "replace it"
            )
    return None


def output_and_device_problem(args) -> str | None:
    """``generate``'s and ``edit``'s checks of ``--device`` and ``--out``, before anything is loaded."""
    return check_device("--device", args.device) or check_output(Path(args.out), args.num_images, args.overwrite)


def size_flags_problem(args, pipeline_class: type) -> str | None:
    """``--height/--width`` choose the size of Infinity images only; VAR and STAR models have one size."""
    import diffusers_var

    if (args.height is not None or args.width is not None) and not issubclass(
        pipeline_class, diffusers_var.InfinityPipeline
    ):
        return "`--height/--width` apply to Infinity pipelines only (VAR/STAR sizes are fixed by the model)"
    return None


VAR_LABEL_TWICE = "`--prompt` and `--class-label` both name the class for a VAR model: pass one of them"


def class_labels_of(pipe, label: str, flag: str = "--class-label") -> list[int]:
    """A ``--class-label`` (or the ``flag`` it came from): a class index or a class name (:func:`class_label_ids`);
    ``ValueError`` naming the flag."""
    try:
        return class_label_ids(pipe, label)
    except ValueError as error:
        if label in pipe.shared_labels:  # a name of several classes: the pipeline's message names them
            raise ValueError(f"`{flag}`: {error}") from None
        names = list(pipe.labels)
        known = f"{len(names)} names such as {names[0]!r}" if names else "this model has no class names"
        last = pipe.transformer.config.num_classes - 1
        raise ValueError(
            f"`{flag}` {label!r} is neither a class index (0 to {last}) nor a class name ({known})"
        ) from None


def flag_names(message: str, num_images_flag: str) -> str:
    """A pipeline's error message with its parameters named by the flags they come from (``num_images_per_prompt``
    is ``generate``'s ``--batch-size``, ``edit``'s ``--num-images``)."""
    return name_flags(message, {**PIPELINE_FLAGS, "num_images_per_prompt": num_images_flag})


def save_image(image, path: Path) -> None:
    """``image`` to ``path`` atomically, in the format its extension names (checked by ``check_output``)."""
    import PIL.Image

    image_format = PIL.Image.registered_extensions()[path.suffix.lower()]
    exif = PIL.Image.Exif()
    exif[SOFTWARE_TAG] = SOFTWARE  # (formats without EXIF ignore it: their files are replaced with --overwrite only)
    write_atomic(path, lambda tmp: image.save(tmp, format=image_format, exif=exif))


def _generate(args) -> int:
    import torch

    out = Path(args.out)
    problem = output_and_device_problem(args)
    if problem:
        return print_error(problem)
    model = resolve_pipeline_folder(args.model) if args.model else DEFAULT_MODEL
    try:
        pipeline_class = generation_pipeline_class(model)
    except ValueError as err:
        return print_error(f"`--model` {err}")
    name = pipeline_class.__name__
    if args.refiner is not None and name != "VARPipeline":
        return print_error(f"`--refiner` needs a VAR `--model` (the drafter), got a {name}")
    if args.draft_steps is not None and args.refiner is None and name != "VARCoDePipeline":
        return print_error(
            "`--draft-steps` applies to CoDe only: pass `--refiner PATH`, or a VARCoDePipeline `--model`"
        )
    label_flag = "--class-label"
    if name in ("VARPipeline", "VARCoDePipeline"):
        if args.prompt is not None and args.class_label is not None:
            return print_error(VAR_LABEL_TWICE)
        if args.prompt is not None and not args.prompt.strip():
            return print_error("`--prompt` is empty: give a class name (or `--class-label`), or leave it out")
        if args.prompt and not args.class_label:
            args.class_label, label_flag = args.prompt, "--prompt"
    elif not (args.prompt or "").strip():
        return print_error("`--prompt` is required (and not blank) for text-to-image pipelines")
    elif args.class_label is not None:
        return print_error(f"`--class-label` is for class-conditional (VAR) models; {name} takes `--prompt`")
    problem = size_flags_problem(args, pipeline_class) or _code_flags_problem(args, model)
    if problem:
        return print_error(problem)

    try:
        pipe = load_pipeline(pipeline_class, model, "--model", dtype=getattr(torch, args.dtype)).to(args.device)
        load_loras(pipe, args.lora, args.lora_scale)
    except ValueError as err:  # its messages name the flags
        return print_error(str(err))
    kwargs = {"output_type": "pil"}
    for key in ("guidance_scale", "top_k", "top_p"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    try:
        pipe = _with_refiner(pipe, args, kwargs)
    except ValueError as err:
        return print_error(str(err))
    if name in ("VARPipeline", "VARCoDePipeline"):
        if args.class_label is not None:
            try:
                kwargs["class_labels"] = class_labels_of(pipe, args.class_label, label_flag)
            except ValueError as err:
                return print_error(str(err))
    else:
        kwargs["prompt"] = args.prompt
        if args.height is not None or args.width is not None:
            kwargs.update(height=args.height, width=args.width)

    # Generate in batches and write each image as it comes: memory stays bounded by --batch-size whatever
    # --num-images is. One generator runs through all batches, so a seed and batch size give the same images.
    generator = torch.Generator().manual_seed(args.seed)
    batch_size = min(args.batch_size, args.num_images)
    several = batch_size < args.num_images
    progress = None
    if several:  # one bar over all images instead of one per scale per batch
        from tqdm.auto import tqdm

        pipe.set_progress_bar_config(disable=True)
        progress = tqdm(total=args.num_images, unit="image", desc="generate")
    written = 0
    try:
        while written < args.num_images:
            count = min(batch_size, args.num_images - written)
            images = pipe(num_images_per_prompt=count, generator=generator, **kwargs).images
            out.parent.mkdir(parents=True, exist_ok=True)  # once the pipeline took the arguments: no empty folder
            for image in images:
                save_image(image, output_path(out, written, args.num_images))
                written += 1
            if progress is not None:
                progress.update(len(images))
            del images
    except ValueError as err:  # the pipeline's own argument checks: name the flags, not the Python parameters
        return print_error(flag_names(str(err), "--batch-size"))
    finally:
        if progress is not None:
            progress.close()
    _print_saved(out, args.num_images)
    return 0


def _print_saved(out: Path, count: int) -> None:
    shown = range(count) if count <= 8 else (0, None, count - 1)
    names = ["..." if i is None else str(output_path(out, i, count)) for i in shown]
    print(f"saved {count} image{'s' * (count != 1)}: " + ", ".join(names))


def edit_pipeline_class(model, inpainting: bool) -> type:
    """The in-painting (or image-to-image) pipeline class of the family a pipeline folder holds."""
    import diffusers_var

    found = pipeline_class_of(model)
    try:
        family = pipeline_family(found)
    except ValueError:
        raise ValueError(f"{str(model)!r} holds a {found.__name__}, which has no editing pipeline") from None
    name = family.__name__.replace("Pipeline", "InpaintPipeline" if inpainting else "Img2ImgPipeline")
    return getattr(diffusers_var, name)


def _parse_box(text: str) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box) or box[2] < box[0] or box[3] < box[1]:  # NaN too
        raise ValueError(
            f"`--box` must be four fractions y0,x0,y1,x1 in [0, 1] with y0 <= y1 and x0 <= x1 (e.g. "
            f"0.25,0.25,0.75,0.75), got {text!r}"
        )
    return box


def _edit(args) -> int:
    import PIL.Image
    import torch

    import diffusers_var

    from .pil_images import mask_to_grayscale, open_upright, to_rgb

    masks = [name for name in ("mask", "box") if getattr(args, name) is not None]
    if len(masks) > 1:
        return print_error("pass one of `--mask` and `--box`")
    if masks and args.strength is not None:
        return print_error("`--strength` is for image-to-image, `--mask` / `--box` for in-painting: pass one of them")
    if not masks and args.strength is None:
        return print_error("pass `--mask` / `--box` (in-painting) or `--strength` (image-to-image)")
    if args.outpaint and args.box is None:
        return print_error("`--outpaint` applies to `--box` (a mask file already says what to generate)")
    if args.mask_dilation is not None and not masks:
        return print_error("`--mask-dilation` is for in-painting (`--mask` / `--box`)")
    try:
        box = _parse_box(args.box) if args.box is not None else None
    except ValueError as err:
        return print_error(str(err))
    problem = output_and_device_problem(args)
    if problem:
        return print_error(problem)
    model = resolve_pipeline_folder(args.model) if args.model else DEFAULT_MODEL
    try:
        pipeline_class = edit_pipeline_class(model, inpainting=bool(masks))
    except ValueError as err:
        return print_error(f"`--model` {err}")
    class_conditional = issubclass(pipeline_class, diffusers_var.VARPipeline)
    label = (args.class_label if args.class_label is not None else args.prompt) if class_conditional else None
    if class_conditional and label is None:
        return print_error("`--class-label` (a class index or name) is required for VAR")
    if class_conditional and args.class_label is not None and args.prompt is not None:
        return print_error(VAR_LABEL_TWICE)
    if not class_conditional and not (args.prompt or "").strip():
        return print_error("`--prompt` is required (and not blank) for text-to-image pipelines")
    if not class_conditional and args.class_label is not None:
        return print_error(
            f"`--class-label` is for class-conditional (VAR) models; {pipeline_class.__name__} takes `--prompt`"
        )
    problem = size_flags_problem(args, pipeline_class)
    if problem:
        return print_error(problem)
    images = {}
    for flag, path, convert in (("--image", args.image, to_rgb), ("--mask", args.mask, mask_to_grayscale)):
        try:
            images[flag] = convert(open_upright(path)) if path is not None else None
        except (OSError, PIL.Image.DecompressionBombError, SyntaxError, ValueError) as err:  # what PIL raises
            return print_error(f"`{flag}` {str(path)!r} is not an image that can be read ({err})")

    try:
        pipe = load_pipeline(pipeline_class, model, "--model", dtype=getattr(torch, args.dtype)).to(args.device)
    except ValueError as err:
        return print_error(str(err))
    kwargs = dict(
        image=images["--image"],
        generator=torch.Generator().manual_seed(args.seed),
        num_images_per_prompt=args.num_images,
        output_type="pil",
    )
    for name in ("guidance_scale", "top_k", "top_p", "strength"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.height is not None or args.width is not None:
        kwargs.update(height=args.height, width=args.width)
    try:
        if masks:
            mask = images["--mask"]
            if box is not None:
                size = {k: kwargs[k] for k in ("height", "width") if k in kwargs}
                mask = pipe.box_mask(*box, inpainting=not args.outpaint, **size)
            kwargs["mask_image"] = mask
            if args.mask_dilation is not None:
                kwargs["mask_dilation"] = args.mask_dilation
        if class_conditional:
            kwargs["class_labels"] = class_labels_of(
                pipe, label, "--class-label" if args.class_label is not None else "--prompt"
            )
        else:
            kwargs["prompt"] = args.prompt
        edited = pipe(**kwargs).images
    except ValueError as err:  # the pipeline's own argument checks: name the flags, not the Python parameters
        return print_error(flag_names(str(err), "--num-images"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(edited):
        save_image(image, output_path(out, index, len(edited)))
    _print_saved(out, len(edited))
    return 0


def _code_flags_problem(args, model: Path) -> str | None:
    """``--refiner`` (a VAR pipeline folder) and ``--draft-steps`` (in [1, scales - 1] of the ``--model``'s
    transformer config) checked before anything loads; a config that cannot be read is left to the load."""
    from .pipelines.pipeline_var import VARCoDePipeline, VARPipeline

    if args.refiner is not None:
        try:
            expect_pipeline_class(resolve_pipeline_folder(args.refiner), VARPipeline, exact=True)
        except ValueError as err:
            return f"`--refiner` {err}"
    if args.draft_steps is not None:
        try:
            num_scales = len(json.loads((model / "transformer" / "config.json").read_text())["patch_nums"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            VARCoDePipeline._check_draft_steps(args.draft_steps, num_scales)
        except ValueError as err:
            return name_flags(str(err), PIPELINE_FLAGS)
    return None


def _with_refiner(pipe, args, kwargs):
    """CoDe for ``generate``: ``--refiner`` (a VAR pipeline folder on the same tokenizer) turns a VAR ``--model`` into
    a VARCoDePipeline (the model drafts, the refiner refines); ``--draft-steps`` goes to a CoDe pipeline's call."""
    import torch

    from .pipelines.pipeline_var import VARCoDePipeline, VARPipeline

    if args.refiner is not None:
        if type(pipe) is not VARPipeline:
            raise ValueError(f"`--refiner` needs a VAR `--model` (the drafter), got a {type(pipe).__name__}")
        refiner_folder = resolve_pipeline_folder(args.refiner)
        try:
            refiner_class = expect_pipeline_class(refiner_folder, VARPipeline, exact=True)
        except ValueError as err:
            raise ValueError(f"`--refiner` {err}") from None
        refiner = load_pipeline(refiner_class, refiner_folder, "--refiner", dtype=getattr(torch, args.dtype))
        refiner = refiner.to(args.device)
        try:
            pipe = VARCoDePipeline.from_var_pipelines(pipe, refiner)
        except ValueError as err:  # the library names its parameters: the drafter is `transformer`
            raise ValueError(
                name_flags(str(err), {"refiner": "--refiner", "drafter": "--model", "transformer": "--model"})
            ) from None
    if args.draft_steps is not None:
        if not isinstance(pipe, VARCoDePipeline):
            raise ValueError(
                "`--draft-steps` applies to CoDe only: pass `--refiner PATH`, or a VARCoDePipeline `--model`"
            )
        kwargs["draft_steps"] = args.draft_steps
    return pipe


def _train(args) -> int:
    from .training import TrainConfig, train

    named = {item.split("=", 1)[1].strip() for item in args.overrides if item.split("=", 1)[0].strip() == "task"}
    if named - {args.task}:  # the later override would win over the TASK given first
        return print_error(f"`task`: the command names {args.task!r}, an override names {sorted(named)}; give one.")
    if args.config is not None:  # the command's TASK replaced the file's without a word (its keys then unknown)
        from .training.engine import _parse_config

        try:
            in_file = _parse_config(Path(args.config))
        except (OSError, ValueError):
            in_file = None  # TrainConfig.load names the file and the reason
        if isinstance(in_file, dict) and "task" in in_file and in_file["task"] != args.task:
            return print_error(
                f"`task`: the command names {args.task!r}, the `--config` file {args.config!r} has "
                f"`task: {in_file['task']}`; train {in_file['task']} with this file, or use a config for {args.task}."
            )
    try:
        config = TrainConfig.load(args.config, [f"task={args.task}", *args.overrides])
        export = train(config)
    except ValueError as err:
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: the worker's own message is the last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        return print_error(message)
    if os.environ.get("RANK", "0") == "0":  # once, not by every process of a multi-process launch
        print(f"exported {export}")
    return 0


def _demo(args) -> int:
    try:
        from .demo import run
    except ImportError as err:  # gradio missing: say how to get it instead of a traceback
        return print_error(f"the demo needs gradio ({err}); install it with `pip install gradio`")
    return run(args)


def add_sampling_arguments(parser) -> None:
    """The flags ``generate`` and ``edit`` share, with the same ranges (checked when parsing)."""
    parser.add_argument(
        "--guidance-scale", type=guidance_scale_flag, default=None, help="0 to 10000 (default: the pipeline's)"
    )
    parser.add_argument("--top-k", type=int_in_range(0), default=None, help="default: the pipeline's (0 = off)")
    parser.add_argument("--top-p", type=top_p_flag, default=None, help="0 to 1 (default: the pipeline's; 0 = off)")
    for flag in ("height", "width"):
        parser.add_argument(
            f"--{flag}", type=int_in_range(1), default=None, help=f"Infinity: image {flag} (default: the model's)"
        )
    parser.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0, help=f"0 to {MAX_SEED} (default 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="diffusers-var", description="Next-scale-prediction image generation (VAR, STAR, Infinity)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images with a pipeline folder (default: the embedded VAR)")
    gen.add_argument(
        "--model",
        type=nonblank,
        default=None,
        help=f"pipeline folder, or an embedded one by name ({EMBEDDED_NAMES}; default: var-shapes)",
    )
    gen.add_argument("--prompt", default=None, help="text prompt (STAR / Infinity), or a class name for VAR")
    gen.add_argument("--class-label", default=None, help="VAR: class index or name (default: random)")
    gen.add_argument(
        "--num-images",
        type=int_in_range(1, MAX_IMAGES),
        default=1,
        help=f"images to generate, 1 to {MAX_IMAGES} (default 1); several are written as OUT-0.png, OUT-1.png, ...",
    )
    gen.add_argument(
        "--batch-size",
        type=int_in_range(1, MAX_BATCH_SIZE),
        default=16,
        help="images generated at once (default 16): bounds memory whatever --num-images is",
    )
    add_sampling_arguments(gen)
    gen.add_argument(
        "--refiner",
        type=nonblank,
        default=None,
        metavar="PATH",
        help="CoDe: a small VAR pipeline folder on the same tokenizer that samples the fine scales after "
        "the VAR --model drafted the coarse ones (the embedded one: var-shapes-refiner)",
    )
    gen.add_argument(
        "--draft-steps",
        type=int_in_range(1),
        default=None,
        help="CoDe: scales the drafter samples (default: the pipeline's, num_scales - 2 when built here)",
    )
    gen.add_argument(
        "--out", type=home_path, default="out.png", help="image file; its extension picks the format (default out.png)"
    )
    gen.add_argument(
        "--overwrite", action="store_true", help="replace existing files that diffusers-var did not write"
    )
    add_lora_arguments(gen)
    gen.set_defaults(func=_generate)

    ed = sub.add_parser(
        "edit",
        help="in-paint / out-paint (--mask or --box) or image-to-image (--strength) an image",
        description="Edit IN.png with a pipeline folder (default: the embedded VAR): in-painting "
        "regenerates the white part of --mask (or the --box; --outpaint: all but the "
        "box), image-to-image keeps the image's first scales and samples the share "
        "--strength of them.",
    )
    ed.add_argument(
        "--model",
        type=nonblank,
        default=None,
        help=f"pipeline folder, or an embedded one by name ({EMBEDDED_NAMES}; default: var-shapes)",
    )
    ed.add_argument("--image", type=nonblank, required=True, help="the image to edit (resized to the model's size)")
    ed.add_argument(
        "--mask",
        type=nonblank,
        default=None,
        help="in-painting: mask image, white = generate (the image's size, or the model's last token grid)",
    )
    ed.add_argument(
        "--box",
        default=None,
        metavar="Y0,X0,Y1,X1",
        help="in-painting: the original notebook's box, as fractions of the height / width",
    )
    ed.add_argument("--outpaint", action="store_true", help="with --box: generate everything around the box")
    ed.add_argument(
        "--mask-dilation",
        type=int_in_range(0),
        default=None,
        metavar="CELLS",
        help="in-painting: also generate this many latent cells around the mask (1 lets a new object draw its own "
        "edges; default 0, the notebook's edit)",
    )
    ed.add_argument(
        "--strength",
        type=float_in_range(0.0, 1.0),
        default=None,
        help="image-to-image: share of the scales sampled, in [0, 1] (1 ignores the image)",
    )
    ed.add_argument("--class-label", default=None, help="VAR: class index or name of what to generate")
    ed.add_argument("--prompt", default=None, help="STAR / Infinity: what the edited image shows")
    ed.add_argument(
        "--num-images",
        type=int_in_range(1, MAX_EDIT_IMAGES),
        default=1,
        help=f"edited images, 1 to {MAX_EDIT_IMAGES}: made in one batch (default 1); several are written as "
        "OUT-0.png, OUT-1.png, ...",
    )
    add_sampling_arguments(ed)
    ed.add_argument(
        "--out",
        type=home_path,
        default="edited.png",
        help="image file; its extension picks the format (default edited.png)",
    )
    ed.add_argument("--overwrite", action="store_true", help="replace files diffusers-var did not write")
    ed.set_defaults(func=_edit)

    from .training.engine import TASK_NAMES

    tr = sub.add_parser("train", help="train a tokenizer or a transformer (see configs/)")
    tr.add_argument("task", choices=list(TASK_NAMES))
    tr.add_argument("--config", type=home_path, default=None, help="YAML/JSON training config")
    tr.set_defaults(func=_train)
    tr.epilog = "Any number of key=value overrides may follow, e.g. max_steps=100 data.num_images=500."

    demo = sub.add_parser("demo", help="serve the Gradio demo app (needs `pip install gradio`)")
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    from .evaluation import add_evaluate_parser
    from .sample import add_sample_parser

    add_sample_parser(sub)
    add_evaluate_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        bad = [item for item in extra if "=" not in item]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key=value)")
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever the work was
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {err.filename!r}" if err.filename else ""
        out = f" (`--out` {str(args.out)!r})" if getattr(args, "out", None) else ""
        return print_error(
            f"no space left on the device{where}{out}: free some space and run the same command again (files are "
            "written whole or not at all; a sample run goes on where it stopped)."
        )


def train_main(argv=None) -> int:
    """``diffusers-var-train TASK --config FILE``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
