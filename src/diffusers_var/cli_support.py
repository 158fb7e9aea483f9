"""What the ``diffusers-var`` command and the Gradio demo share: which pipeline class a folder holds (where the
embedded pipelines live: :mod:`diffusers_var.embedded_models`), the demo's flags and one-line argument errors.

Both :mod:`diffusers_var.cli` and :mod:`diffusers_var.demo` import this module and neither imports the other
(the demo used to import the command's helpers while the command imported the demo).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

from .embedded_models import EMBEDDED_PIPELINES

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
# Most images one command writes (``generate --num-images``, a ``sample`` run): 20x an FID-50k run, and few
# enough that the command's bookkeeping (file names, metadata.jsonl) stays small next to the images themselves.
MAX_IMAGES = 1_000_000
# the most images one pipeline call draws (``pipeline_utils.MAX_BATCH_SIZE``), here too so that building a parser does
# not import torch
MAX_BATCH_SIZE = 2**16
# the pipelines' bounds on guidance and temperature (``pipeline_utils.MAX_GUIDANCE_SCALE`` / ``MIN_TEMPERATURE``), here
# too so that the flags are checked when parsing, before a model loads, without importing torch
MAX_GUIDANCE_SCALE = 1e4
MIN_TEMPERATURE = 1e-4
# ``enable_fast_inference(compile_blocks=...)``'s shapes (``fast_inference.compile_blocks_shapes``), for the
# command-line flags; written here too so that building a parser does not import torch
COMPILE_BLOCKS_SHAPES = ("dynamic", "static-tokens", "static")
# the file a LoRA folder is read from (diffusers' ``LORA_WEIGHT_NAME_SAFE``), here too so that building a parser does
# not import torch
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
# The image formats generate / edit offer for --out (those PIL writes from RGB) and evaluate reads from image folders.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# The demo's counts, which ``diffusers-var demo`` takes as flags and ``diffusers_var.demo.build_demo`` as arguments:
# argument -> (flag, lowest, highest); both check them against this table.
DEMO_RANGES = {
    "max_images": ("--max-images", 1, 64),
    "queue_size": ("--queue-size", 1, 10_000),
    "concurrency_limit": ("--concurrency", 1, 64),
}


def demo_count_problem(name: str, value) -> str | None:
    """``None`` when ``value`` is a whole number (not a bool) in the :data:`DEMO_RANGES` range of ``name``, else a
    one-line reason naming the argument and its flag."""
    flag, low, high = DEMO_RANGES[name]
    whole = not isinstance(value, bool) and (
        isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    )
    if whole and low <= value <= high:
        return None
    return f"`{name}` ({flag}) must be a whole number from {low} to {high}, got {value!r}"


def pipeline_class_of(model) -> type:
    """The diffusers-var pipeline class a pipeline folder holds (from its ``model_index.json``);
    ``ValueError`` naming the folder when it is not one of ours."""
    import diffusers_var

    from .file_utils import path_problem

    model = Path(model)
    problem = path_problem(model)  # before is_file(), which raises on a name past the file system's limit
    if problem:
        raise ValueError(f"{str(model)[:80]!r} cannot be a pipeline folder: {problem}")
    if not (model / "model_index.json").is_file():
        raise ValueError(
            f"{str(model)!r} is not a pipeline folder (no model_index.json); the embedded pipelines are "
            f"{', '.join(EMBEDDED_PIPELINES)}"
        )
    try:
        class_name = json.loads((model / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{str(model)!r} has an unreadable model_index.json ({err})") from None
    pipeline_class = getattr(diffusers_var, class_name, None) if isinstance(class_name, str) else None
    if not isinstance(pipeline_class, type) or not hasattr(pipeline_class, "_family"):  # not a name of a module
        raise ValueError(f"{str(model)!r} holds a {class_name!r}, not a diffusers-var pipeline")
    return pipeline_class


def pipeline_family(pipeline_class: type) -> type:
    """The family's generating pipeline (VARPipeline, STARPipeline, InfinityPipeline) that ``pipeline_class`` is or
    derives from: its in-painting / image-to-image pipelines and CoDe share its components."""
    import diffusers_var

    for family in (diffusers_var.VARPipeline, diffusers_var.STARPipeline, diffusers_var.InfinityPipeline):
        if issubclass(pipeline_class, family):
            return family
    raise ValueError(f"{pipeline_class.__name__} is not a pipeline of the VAR, STAR or Infinity family")


def generation_pipeline_class(model) -> type:
    """The class a generating command (generate, sample) loads a pipeline folder as: the folder's own for the
    families' pipelines and CoDe; the family's generating pipeline for a saved in-painting / image-to-image one,
    whose calls need an input image (the same components load either way)."""
    import diffusers_var

    found = pipeline_class_of(model)
    if issubclass(found, diffusers_var.VARCoDePipeline):
        return found
    try:
        return pipeline_family(found)
    except ValueError as err:
        raise ValueError(f"{str(model)!r}: {err}") from None


def load_pipeline(pipeline_class: type, folder, flag: str, **kwargs):
    """``pipeline_class.from_pretrained(folder, **kwargs)``; a folder that does not load (damaged weights, a config
    that does not fit them, a save that did not finish) is a ValueError naming ``flag`` and the folder."""
    try:
        return pipeline_class.from_pretrained(folder, **kwargs)
    except (ValueError, OSError) as err:
        raise ValueError(f"`{flag}` {str(folder)!r} does not load: {' '.join(str(err).split())}") from None


def expect_pipeline_class(model, expected: type, exact: bool = False) -> type:
    """:func:`pipeline_class_of`, which must be ``expected`` (or, unless ``exact``, a subclass of it: a
    VARCoDePipeline folder serves as a VAR); ``ValueError`` naming the folder and both classes otherwise."""
    found = pipeline_class_of(model)
    if found is not expected and (exact or not issubclass(found, expected)):
        raise ValueError(f"{str(model)!r} holds a {found.__name__}, not a {expected.__name__}")
    return found


def class_label_ids(pipe, label: str) -> list[int]:
    """The class ids a typed class means: a class index (the pipeline checks its range), else a class name or any
    synonym (``pipe.get_label_ids``, a ValueError when unknown). ``int`` decides what is an index: ``str.isdigit``
    also accepts characters such as ``²`` that ``int`` refuses."""
    try:
        return [int(label)]
    except ValueError:
        return pipe.get_label_ids([label])


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line, ``error: ...`` naming the flag, exit code 2 (argparse prints the whole usage
    block first, which buries the message)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a negative value in exponent form (`--lora-scale -1e-1`) is a value, not a flag: Python 3.11's pattern takes
        # only plain decimals, and argparse said the flag "expected one argument"
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        if message.startswith("the following arguments are required:"):  # the usage line listed a command's choices
            missing = [name.strip() for name in message.split(":", 1)[1].split(",")]
            choices = [  # a command's or positional's allowed values (not a flag's: its error names them)
                f"{action.metavar or action.dest}: one of {', '.join(map(str, action.choices))}"
                for action in self._actions
                if not action.option_strings and action.choices and (action.metavar or action.dest) in missing
            ]
            message += f" ({'; '.join(choices)})" if choices else ""
        self.exit(2, f"error: {' '.join(message.split())}\n")


def int_in_range(low: int | None = None, high: int | None = None):
    """An argparse ``type`` accepting whole numbers in ``[low, high]`` (argparse puts the flag before the error)."""

    def parse(text: str) -> int:
        value = None
        for base in (10, 0):  # decimal (leading zeros too: "08"), then 0x / 0o / 0b literals
            try:
                value = int(text, base)
                break
            except ValueError:
                continue
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f"from {low} to {high}"
                if low is not None and high is not None
                else f">= {low}"
                if low is not None
                else f"<= {high}"
            )
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds}, got {text!r}")
        return value

    return parse


def home_path(text: str) -> str:
    """An argparse ``type`` for a path: a leading ``~`` is the home folder. The shell expands ``--out ~/x`` but not
    ``--out=~/x``, which wrote into a folder named ``~`` in the current one."""
    return os.path.expanduser(text)


def nonblank(text: str) -> str:
    """An argparse ``type`` for a path or name: a blank value (``--model "$UNSET"``) is refused, naming the flag,
    rather than read as the default or as the current folder; a path's ``~`` is expanded (:func:`home_path`; no
    name starts with one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be blank (a path or name), got {text!r}")
    return home_path(text)


def finite_float(text: str) -> float:
    """An argparse ``type`` for a finite float: NaN and infinity are refused here, naming the flag."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def float_in_range(low: float, high: float | None = None):
    """An argparse ``type`` for a finite float in ``[low, high]`` (checked before any model is loaded)."""

    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be in [{low:g}, {high:g}], got {text!r}"
                if high is not None
                else f"must be >= {low:g}, got {text!r}"
            )
        return value

    return parse


def guidance_scale_flag(text: str) -> float:
    """An argparse ``type`` for ``--guidance-scale`` (generate, edit, sample): the pipelines' range."""
    return float_in_range(0.0, MAX_GUIDANCE_SCALE)(text)


def top_p_flag(text: str) -> float:
    """An argparse ``type`` for ``--top-p`` (generate, edit, sample): a probability, 0 = off."""
    return float_in_range(0.0, 1.0)(text)


def lora_flag_error(err: ValueError, path: str) -> ValueError:
    """A LoRA loader's error about ``path``, naming the ``--lora`` flag instead of the Python parameter."""
    message = str(err).replace("`pretrained_model_name_or_path_or_dict`", "`--lora`")
    message = message.replace(
        "(pass `weight_name=` for another file name)", "(or pass the path of the .safetensors file)"
    )
    return ValueError(message if message.startswith("`--lora`") else f"`--lora` {path!r}: {message}")


def load_loras(pipe, paths: list[str] | None, scales: list[float] | None) -> list[str]:
    """``pipe.load_lora_weights`` of every ``--lora`` (adapters ``lora_0``, ``lora_1``, ...), then ``set_adapters``
    with the ``--lora-scale`` values (one for all, or one per adapter; default 1.0). Returns the adapter names."""
    paths, scales = list(paths or []), list(scales or [])
    if not paths:
        if scales:
            raise ValueError("`--lora-scale` needs `--lora PATH`.")
        return []
    if len(scales) not in (0, 1, len(paths)):
        raise ValueError(f"`--lora-scale`: give one scale, or one per `--lora` ({len(paths)}), got {len(scales)}.")
    seen = {}
    for path in paths:
        key = os.path.expanduser(path)
        if os.path.isdir(key):  # the file a folder is read from: `--lora DIR --lora DIR/<that file>` is one adapter
            key = os.path.join(key, LORA_WEIGHT_NAME_SAFE)
        key = os.path.realpath(key) if os.path.exists(key) else path
        if key in seen:
            raise ValueError(
                f"`--lora` {path!r} is given twice (as {seen[key]!r} too): an adapter applies once; for a stronger "
                "effect raise its `--lora-scale`."
            )
        seen[key] = path
    names = [f"lora_{i}" for i in range(len(paths))]
    for name, path in zip(names, paths):
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except ValueError as err:
            raise lora_flag_error(err, path) from None
    weights = scales * len(paths) if len(scales) == 1 else (scales or [1.0] * len(paths))
    pipe.set_adapters(names, adapter_weights=[float(w) for w in weights])
    return names


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        type=nonblank,
        default=None,
        metavar="PATH",
        help="LoRA adapter: a folder with pytorch_lora_weights.safetensors or a .safetensors file "
        "(repeat for several)",
    )
    parser.add_argument(
        "--lora-scale",
        action="append",
        type=finite_float,
        default=None,
        metavar="S",
        help="adapter strength (default 1.0; 0 = the base model): one for all, or one per --lora",
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (kept out of :mod:`diffusers_var.demo` so that ``diffusers-var --help`` does not import
    gradio). Ranges are checked here, so a bad value is a one-line error before gradio starts."""
    for flag, name, folder in (
        ("--var", "VAR", "var-shapes"),
        ("--star", "STAR", "star-shapes"),
        ("--infinity", "Infinity", "infinity-shapes"),
    ):
        parser.add_argument(
            flag,
            type=nonblank,
            default="default",
            metavar="PATH",
            help=f"{name} pipeline folder (default: the embedded pipelines/{folder} when present; "
            f"'none' hides the model)",
        )
    parser.add_argument(
        "--var-refiner",
        type=nonblank,
        default="none",
        metavar="PATH",
        help="a small VAR pipeline folder on the VAR model's tokenizer: the VAR tab then offers CoDe "
        "(the VAR model drafts the coarse scales, this one refines the fine ones); 'default' is "
        "the embedded pipelines/var-shapes-refiner (default: none)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights' dtype (default float32); with --fast the fast path's dtype (default bfloat16)",
    )
    parser.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload() on an accelerator")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the GPU fast path for every served pipeline (CUDA graphs, compiled decoder / blocks; README 'Speed')",
    )
    parser.add_argument(
        "--compile-cache",
        type=nonblank,
        default=None,
        metavar="DIR",
        help="with --fast on a GPU: folder of torch.compile's caches, so that a restarted demo does not compile "
        "again (default $DIFFUSERS_VAR_COMPILE_CACHE, else ~/.cache/diffusers_var/torch_compile)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int_in_range(1, 65535), default=7860, help="1 to 65535 (default 7860)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    ranges = {flag: (low, high) for flag, low, high in DEMO_RANGES.values()}
    parser.add_argument(
        "--max-images",
        type=int_in_range(*ranges["--max-images"]),
        default=8,
        help="most images per request, {} to {} (default 8)".format(*ranges["--max-images"]),
    )
    parser.add_argument(
        "--queue-size",
        type=int_in_range(*ranges["--queue-size"]),
        default=32,
        help="most waiting requests, {} to {} (default 32); more are told the queue is full".format(
            *ranges["--queue-size"]
        ),
    )
    parser.add_argument(
        "--concurrency",
        type=int_in_range(*ranges["--concurrency"]),
        default=1,
        help="generations running at once, all tabs together, {} to {} (default 1)".format(*ranges["--concurrency"]),
    )
    add_lora_arguments(parser)  # each adapter goes to the tab of the family it was made for


FAST_ON_CPU_NOTE = (
    "note: --fast on the CPU only casts the model to {dtype} (CUDA graphs and compiled code are GPU-only); most CPUs "
    "run bfloat16 / float16 matmuls several times slower than float32: leave out --fast on a CPU."
)


def fast_on_cpu_note(device, dtype) -> str | None:
    """The note for ``--fast`` on a CPU in a 16-bit dtype (slower there than float32, the run without ``--fast``)."""
    import torch

    if torch.device(device).type != "cpu" or torch.finfo(dtype).bits == 32:
        return None
    return FAST_ON_CPU_NOTE.format(dtype=str(dtype).replace("torch.", ""))


def enable_fast_path(pipe, device, dtype, fp8: bool = False, compile_cache=None, compile_blocks=True) -> None:
    """``--fast`` of ``sample`` and ``demo``: the pipeline's fast path as benchmarks/bench_pipelines.py's
    ``fast-compile-all`` mode runs it on a GPU (``dtype`` blocks and decoder, CUDA graphs, compiled decoder and block
    elementwise code where the pipeline has them, compiled for the shapes ``compile_blocks`` names, torch.compile's
    caches in ``compile_cache``: see :func:`diffusers_var.use_compile_cache`); on a CPU only the casts. TF32 for the
    float32 matmuls (heads) as that benchmark: the fast path trades precision for speed anyway."""
    import inspect

    import torch

    from .pipelines.fast_inference import use_compile_cache

    kwargs = {"dtype": dtype}
    if torch.device(device).type == "cuda":
        use_compile_cache(compile_cache)  # only the first process on a machine compiles
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        kwargs["compile_decoder"] = True
        if "compile_blocks" in inspect.signature(pipe.enable_fast_inference).parameters:
            kwargs["compile_blocks"] = compile_blocks
    if fp8:
        kwargs["fp8"] = True
    pipe.enable_fast_inference(**kwargs)


def check_device(flag: str, device: str | None) -> str | None:
    """``None`` when ``device`` can hold a tensor here, else a one-line reason naming ``flag`` (a CUDA device on a
    CPU build, a GPU index that does not exist, a misspelt device)."""
    if device is None:
        return None
    import torch

    available = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())])
    try:
        requested = torch.device(device)
        if requested.type == "meta":
            raise ValueError("a placeholder device that holds no data")
        if requested.type == "cuda":  # checked without a CUDA context (every process of a launch would open one)
            if not torch.cuda.is_available():
                raise ValueError("this machine has no CUDA device")
            if requested.index is not None and requested.index >= torch.cuda.device_count():
                raise ValueError(f"there are {torch.cuda.device_count()} CUDA devices")
        elif requested.type != "cpu":
            torch.empty(1, device=requested)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if reason.startswith("Expected one of"):  # torch lists every device type it knows
            reason = "not a torch device name"
        reason = reason.split(". ")[0]  # torch's backend errors go on to list every dispatch key
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        return f"`{flag}` {device!r} is not usable here ({reason}); available: {available}"
    return None


def name_flags(message: str, flags: dict[str, str]) -> str:
    """A pipeline's error message with its parameters (``flags``' keys) named by the flags they come from."""
    for parameter, flag in flags.items():
        message = message.replace(f"`{parameter}`", f"`{flag}`")
    return message


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each long flag of ``parser`` by its argument name, either spelling (``text_encoder`` and ``text-encoder`` ->
    ``--text-encoder``), for :func:`name_flags`: the converters' library errors name the arguments, their command
    lines the flags."""
    flags = {}
    for action in parser._actions:
        for flag in action.option_strings[:1]:
            if flag.startswith("--") and action.dest != "help":
                flags[action.dest] = flags[flag[2:]] = flag
    return flags


INTERRUPTED = (
    "interrupted: files are written whole or not at all; run the same command again to go on (sample and train "
    "resume where they stopped)."
)


def run_interruptible(main: Callable[[], int]) -> int:
    """``main()``'s exit code; Ctrl-C prints one line (:data:`INTERRUPTED`) and gives 130, not a traceback from
    wherever the work was. The conversion scripts block SIGINT before their imports: unblocked here, a Ctrl-C
    pressed while they imported arrives inside this ``try``."""
    try:
        if hasattr(signal, "pthread_sigmask"):  # (not on Windows)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return main()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def print_error(message: str) -> int:
    """Print ``error: message`` (one line) and return the exit code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
