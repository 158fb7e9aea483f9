"""``diffusers-var sample``: many images from a pipeline folder, for FID-50k style evaluations.

The same command runs on one process or under ``accelerate launch --num_processes N`` (GPUs or CPU processes)
and writes the same files:

* Image ``i`` draws from its own ``torch.Generator`` seeded from ``(--seed, i)`` (:func:`image_seed`), so its
  random stream depends neither on the number of processes nor on the batch size. (``--rng batch``: one generator
  per global batch instead, which lets VAR's fast path sample inside its CUDA graphs; images then depend on the batch
  size, still not on the number of processes.)
* Images are generated in fixed *global* batches: batch ``b`` always holds images ``[b * B, (b + 1) * B)``.
  A batch's floating-point results depend on its composition (matmul blocking changes with the batch size;
  converted STAR models even read the first prompt of the batch), so processes share out whole batches and a
  batch is always generated whole. The same command on the same hardware then gives the same bytes whatever
  the number of processes, and a restarted run regenerates an interrupted batch exactly.
* Every image is written atomically (a temporary file renamed into place). A killed run, restarted with the
  same command (any number of processes), skips the batches whose images all exist and finishes the rest.
  ``DIR/run.json`` records the settings; a restart with other settings is refused.

Outputs: ``DIR/images/NNNNNN.png``, ``DIR/metadata.jsonl`` (one line per image, in index order, written when
the run is complete) and, with ``--save-npz``, ``DIR/samples.npz`` in the layout of OpenAI's ADM evaluation
suite (``arr_0``: uint8 (N, H, W, 3); ``arr_1``: the class labels of class-conditional runs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import logging
import os
import signal
import sys
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cli_support import (
    COMPILE_BLOCKS_SHAPES,
    MAX_BATCH_SIZE,
    MAX_IMAGES,
    MIN_TEMPERATURE,
    check_device,
    enable_fast_path,
    fast_on_cpu_note,
    float_in_range,
    generation_pipeline_class,
    guidance_scale_flag,
    home_path,
    int_in_range,
    load_pipeline,
    name_flags,
    nonblank,
    pipeline_family,
    top_p_flag,
)
from .conversion.common import folder_problem
from .embedded_models import default_model, resolve_pipeline_folder
from .file_utils import (
    files_under,
    is_atomic_temporary,
    json_lines,
    model_index_components,
    path_problem,
    text_lines,
    write_atomic,
)
from .pipelines.pipeline_utils import (
    check_common_inputs,
    check_guidance_scale,
    check_temperature,
    is_unicode_text,
)
from .scalars import is_integer

logger = logging.getLogger(__name__)
IMAGES_DIR = "images"
RUN_FILE = "run.json"
METADATA_FILE = "metadata.jsonl"
NPZ_FILE = "samples.npz"
MAX_WRITER_THREADS = 256
# The original VAR code's FID-50k setting (its README and paper): the default for converted ImageNet models.
IMAGENET_FID_SAMPLING = {"guidance_scale": 1.5, "top_k": 900, "top_p": 0.96, "more_smooth": False}
# CoDe's (sample_CoDe.py, 10 scales): cfg 1.5, top-k 600, top-p 0.96, the temperature 1.1 on the first seven scales
CODE_IMAGENET_FID_SAMPLING = {**IMAGENET_FID_SAMPLING, "top_k": 600, "temperature": [1.1] * 7 + [1.0] * 3}
# Keys this command writes into metadata.jsonl; a prompt file's own fields must not reuse them.
RESERVED_METADATA = (
    "index",
    "file_name",
    "class_label",
    "class_name",
    "prompt_index",
    "sample_index",
    "seed",
    "generator_seed",
    "batch_generator_seed",
)
# Sampling flags and the pipelines that take them.
SAMPLING_FLAGS = {
    "guidance_scale": ("VARPipeline", "STARPipeline", "InfinityPipeline"),
    "top_k": ("VARPipeline", "STARPipeline", "InfinityPipeline"),
    "top_p": ("VARPipeline", "STARPipeline", "InfinityPipeline"),
    "more_smooth": ("VARPipeline", "STARPipeline"),
    "tau": ("InfinityPipeline",),
    "height": ("InfinityPipeline",),
    "width": ("InfinityPipeline",),
}


def _hash_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1  # 63 bits


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s own generator: 63 bits of SHA-256 of ``(seed, index)``. A hash rather than
    ``seed + index``, so that runs with neighbouring seeds do not share images."""
    return _hash_seed(f"diffusers-var/sample/{seed}/{index}")


def batch_seed(seed: int, batch: int, batch_size: int) -> int:
    """The seed of global batch ``batch``'s generator (``--rng batch``; also STAR's stable-sampler stream)."""
    return _hash_seed(f"diffusers-var/sample/{seed}/batch/{batch_size}/{batch}")


# ----------------------------------------------------------------------------------------------
# What to generate
# ----------------------------------------------------------------------------------------------
@dataclass
class SamplePlan:
    """Image ``i``'s condition, for any ``i >= 0`` (indices past ``total`` pad a short last batch on the fast path).

    Class-conditional: ``labels[i % len(labels)]``, so every prefix of the run is class-balanced (with
    ``--per-class 50`` over 1000 classes: the papers' 50 images per class). Text: prompt ``i // per_item``, its
    ``i % per_item``-th image (GenEval's layout of N samples per prompt)."""

    labels: list[int] | None
    prompts: list[dict] | None
    per_item: int
    class_names: dict[int, str]

    @property
    def total(self) -> int:
        return self.per_item * len(self.labels if self.labels is not None else self.prompts)

    def condition(self, index: int):
        if self.labels is not None:
            return self.labels[index % len(self.labels)]
        return self.prompts[(index // self.per_item) % len(self.prompts)]["prompt"]

    def metadata(self, index: int, seed: int, width: int, batch_size: int | None = None) -> dict:
        """``batch_size``: ``--rng batch`` runs, whose images draw from their batch's generator."""
        entry = {"index": index, "file_name": f"{IMAGES_DIR}/{index:0{width}d}.png"}
        if self.labels is not None:
            label = self.labels[index % len(self.labels)]
            entry["class_label"] = label
            if label in self.class_names:
                entry["class_name"] = self.class_names[label]
        else:
            prompt_index = index // self.per_item
            entry.update(prompt_index=prompt_index, sample_index=index % self.per_item, **self.prompts[prompt_index])
        if batch_size is None:
            entry.update(seed=seed, generator_seed=image_seed(seed, index))
        else:
            entry.update(seed=seed, batch_generator_seed=batch_seed(seed, index // batch_size, batch_size))
        return entry


def read_prompts(path) -> list[dict]:
    """``--prompts`` file: ``.jsonl`` / ``.json`` holds one JSON object per line with a ``"prompt"`` and any other
    fields (GenEval's ``tag``, ``include``, ...), copied into ``metadata.jsonl``; any other file holds one prompt a
    line. Blank lines are skipped."""
    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise ValueError(f"`--prompts` {str(path)!r}: {problem}.")
    if not path.is_file():
        raise ValueError(f"`--prompts` {str(path)!r} is not a file.")
    try:
        lines = text_lines(path.read_text(encoding="utf-8-sig"))  # (a byte-order mark is not the first prompt's)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"`--prompts` {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8."
        ) from None
    except OSError as err:
        raise ValueError(f"`--prompts` {str(path)!r} cannot be read ({err.strerror or err}).") from None
    if path.suffix.lower() not in (".jsonl", ".json"):
        entries = [{"prompt": line.strip()} for line in lines if line.strip()]
    else:
        entries = []
        for number, entry in json_lines(lines, path, "--prompts"):
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
                raise ValueError(
                    f"`--prompts` {str(path)!r} line {number}: each line must be a JSON object with a "
                    f'non-empty string "prompt".'
                )
            clash = sorted(set(entry) & set(RESERVED_METADATA))
            if clash:
                raise ValueError(
                    f"`--prompts` {str(path)!r} line {number}: the fields {clash} are written by this "
                    f"command; rename them."
                )
            entries.append(entry)
    if not entries:
        raise ValueError(f"`--prompts` {str(path)!r} holds no prompt.")
    for number, entry in enumerate(entries, 1):
        if not is_unicode_text(entry["prompt"]):
            raise ValueError(
                f"`--prompts` {str(path)!r}: prompt {number} holds characters that are not Unicode text (lone "
                "surrogates, e.g. from undecodable bytes); fix the file."
            )
    return entries


def parse_class_labels(text: str, num_classes: int) -> list[int]:
    """``--class-labels 0,5,17`` (``-1`` is the null class, as in the pipeline)."""
    if not text.strip():
        raise ValueError("`--class-labels` is empty; give class indices (0,5,17) or leave the flag out for all.")
    try:
        labels = [int(item) for item in text.strip().removesuffix(",").split(",")]  # (a trailing comma is harmless)
    except ValueError:
        raise ValueError(f"`--class-labels` must be comma-separated class indices, got {text!r}.") from None
    bad = [label for label in labels if not -1 <= label < num_classes]
    if not labels or bad:
        raise ValueError(
            f"`--class-labels` must hold class indices in [0, {num_classes - 1}] (or -1, the null class), "
            f"got {text!r}."
        )
    return labels


def check_flags(args, family_name: str) -> None:
    """The flag errors that need only the pipeline's class (before a long model load)."""
    if family_name == "VARPipeline":
        for flag, value in (("--prompts", args.prompts), ("--images-per-prompt", args.images_per_prompt)):
            if value is not None:
                raise ValueError(
                    f"`{flag}` is for text-to-image pipelines; this is a class-conditional VAR "
                    f"(use --per-class / --class-labels)."
                )
        if args.per_class is None and args.class_labels is None:
            raise ValueError(
                "a class-conditional model needs `--per-class N` (N images of every class; the papers "
                "use 50 over the 1000 ImageNet classes) and/or `--class-labels`."
            )
    else:
        for flag, value in (("--per-class", args.per_class), ("--class-labels", args.class_labels)):
            if value is not None:
                raise ValueError(f"`{flag}` is for class-conditional pipelines; {family_name} takes `--prompts FILE`.")
        if args.prompts is None:
            raise ValueError(f"`--prompts FILE` is required for {family_name} (one prompt a line, or JSONL).")
    for name, pipelines in SAMPLING_FLAGS.items():
        value = getattr(args, name)
        if value is not None and value is not False and family_name not in pipelines:
            raise ValueError(f"`--{name.replace('_', '-')}` does not apply to {family_name}.")
    if args.fp8 and not args.fast:
        raise ValueError("`--fp8` is an option of the fast path: add `--fast`.")
    if args.fp8 and args.dtype not in (None, "bfloat16"):  # (found after the model loaded, naming Python arguments)
        raise ValueError(
            f"`--fp8` runs with `--dtype bfloat16` (the default with --fast), got `--dtype {args.dtype}`."
        )
    if args.compile_cache is not None and not args.fast:
        raise ValueError("`--compile-cache` holds the fast path's compiled code: add `--fast`.")
    if args.compile_blocks is not None and not args.fast:
        raise ValueError("`--compile-blocks` is an option of the fast path: add `--fast`.")


def check_out(out: Path) -> None:
    """``--out`` must be a folder that exists or can be made, and that we may write into, without files of its
    names that no run wrote; checked before the model is loaded, creating nothing."""
    problem = path_problem(out)
    if problem:  # (is_symlink / exists raised it: a traceback)
        raise ValueError(f"`--out` {str(out)!r}: {problem}.")
    if out.is_symlink() and not out.exists():
        raise ValueError(f"`--out` {str(out)!r} is a link to {os.readlink(out)!r}, which does not exist.")
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"`--out` {str(out)!r} is a file; sample writes a folder ({IMAGES_DIR}/, {METADATA_FILE}): give a "
            f"folder's name."
        )
    problem = folder_problem(out)
    if problem:
        raise ValueError(f"`--out` {str(out)!r}: {problem}.")
    in_the_way = [name for name in (RUN_FILE, METADATA_FILE, NPZ_FILE) if (out / name).exists()]
    if any(not (out / name).is_file() for name in in_the_way) or (out / IMAGES_DIR).is_file():
        raise ValueError(
            f"`--out` {str(out)!r} holds a folder named {RUN_FILE} / {METADATA_FILE} / {NPZ_FILE} or a file named "
            f"{IMAGES_DIR}, where sample writes its own; choose another --out."
        )
    if in_the_way and RUN_FILE not in in_the_way:  # (an image folder's own metadata.jsonl, say)
        raise ValueError(
            f"`--out` {str(out)!r} holds {', '.join(in_the_way)} but no {RUN_FILE}: files that no sample run wrote, "
            "which this one would replace; choose another --out."
        )
    _refuse_images_without_run_file(out)  # (these two need no model: refused before it loads)
    if RUN_FILE in in_the_way:
        _run_file_content(out)


@contextlib.contextmanager
def exclusive_run(out: Path, is_main: bool):
    """One run writes into ``out`` at a time: its main process holds an exclusive lock on the folder itself (no lock
    file left behind), which the system drops when the process ends, killed too (two runs started together had mixed
    their images and settings). The lock is the local machine's: runs on two machines sharing a network folder are
    not kept apart. Creates ``out``; a run that fails before writing anything leaves no empty folder it made."""
    if not is_main:
        yield
        return
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
    out.mkdir(parents=True, exist_ok=True)
    handle = os.open(out, os.O_RDONLY)
    owned = False  # only the run holding the lock may remove the folder (another may have made it and hold it)
    try:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not on this system (Windows): no lock
            pass
        except BlockingIOError:
            raise ValueError(
                f"`--out` {str(out)!r} is being written by another `diffusers-var sample` run; wait for it to end "
                "or choose another --out."
            ) from None
        except OSError as err:  # a filesystem without locks
            logger.warning("cannot lock %s (%s); do not start a second run into it", out, err)
        owned = True
        yield
    except BaseException:
        if made and owned and not any(out.iterdir()):
            for folder in made:  # the parents it made too, while empty (another process may have filled one)
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise
    finally:
        os.close(handle)


def build_plan(
    args, family_name: str, num_classes: int | None, class_names: dict[int, str], prompts: list[dict] | None = None
) -> SamplePlan:
    """What to generate; ``prompts``: the ``--prompts`` file already read (:func:`read_prompts`), else it is read
    here. A run of more than ``MAX_IMAGES`` images is refused."""
    if family_name == "VARPipeline":
        labels = (
            parse_class_labels(args.class_labels, num_classes)
            if args.class_labels is not None
            else list(range(num_classes))
        )
        plan = SamplePlan(labels=labels, prompts=None, per_item=args.per_class or 1, class_names=class_names)
        flag, items = "--per-class", f"{len(labels)} classes"
    else:
        prompts = prompts if prompts is not None else read_prompts(args.prompts)
        plan = SamplePlan(labels=None, prompts=prompts, per_item=args.images_per_prompt or 1, class_names={})
        flag, items = "--images-per-prompt", f"{len(prompts)} prompts"
    if plan.total > MAX_IMAGES:
        raise ValueError(
            f"`{flag}` {plan.per_item} over {items} makes {plan.total} images; a run holds at most {MAX_IMAGES} "
            f"(split it into several --out folders)."
        )
    return plan


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
class Processes:
    """This process's place among the sampling processes: accelerate's ``PartialState`` when a launcher started
    several (``accelerate launch``, torchrun), else one plain process (accelerate's global state left untouched)."""

    def __init__(self, device: str | None):
        problem = check_device("--device", device)
        if problem:
            raise ValueError(problem)
        requested = torch.device(device) if device is not None else None
        self._state, self.index, self.count = None, 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            self.device = requested or torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return
        try:
            from accelerate import PartialState
        except ImportError:
            raise ValueError("sampling on several processes needs accelerate (pip install accelerate).") from None
        # CPU processes: accelerate sets up gloo only when told `cpu=True` (start them with torchrun, e.g.
        # `accelerate launch --multi_gpu` on a machine without GPUs: `accelerate launch --cpu` starts one process
        # unless MPI is set up).
        cpu = (
            (requested is not None and requested.type == "cpu")
            or not torch.cuda.is_available()
            or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        )
        self._state = PartialState(cpu=cpu)
        self.index, self.count = self._state.process_index, self._state.num_processes
        if requested is not None and requested.type != "cpu":
            raise ValueError("`--device`: under accelerate launch every process takes its own device; leave it out.")
        device = requested if requested is not None else self._state.device
        self.device = torch.device("cpu") if device.type == "cpu" else device

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        if self._state is not None and self.count > 1:
            self._state.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    # PIL writes no time stamp or other varying chunk: the same pixels give the same bytes.
    write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def write_npz(path: Path, arrays: dict[str, tuple[tuple[int, ...], np.dtype, Iterator[np.ndarray]]]) -> None:
    """An ``np.savez`` file written array by array from chunks (50,000 images at 256 px are 9.8 GB: memory stays
    flat). ``arrays``: name -> (shape, dtype, iterator of C-ordered chunks along the first axis). Fixed time stamps,
    so the same arrays give the same bytes."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, (shape, dtype, chunks) in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with archive.open(info, "w", force_zip64=True) as member:
                    header = {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                        "fortran_order": False,
                        "shape": tuple(shape),
                    }
                    np.lib.format.write_array_header_1_0(member, header)
                    written = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        member.write(chunk.tobytes())
                        written += chunk.shape[0] if chunk.ndim else 1
                    if written != (shape[0] if shape else 1):
                        raise RuntimeError(f"{name}: {written} rows written for shape {shape}")

    write_atomic(path, write)


def completed_indices(
    images_dir: Path, total: int, width: int, verify: bool = True, size: tuple[int, int] | None = None
) -> set[int]:
    """The indices whose images are in ``images_dir``. With ``verify``, an image there that does not read as a whole
    PNG (cut short or damaged after it was written: its chunks and checksums, about 0.2 ms each) is not done: it is
    generated again, with a warning naming it. ``size``: the run's (height, width); an image of another size (not
    this run's: put there by hand) is a ValueError naming it, before any work, rather than replaced unasked or
    stacked into samples.npz."""
    names = {entry.name for entry in os.scandir(images_dir)} if images_dir.is_dir() else set()
    done = {i for i in range(total) if f"{i:0{width}d}.png" in names}
    if not verify:
        return done
    from PIL import Image

    damaged, other_size = [], []
    for i in sorted(done):
        path = images_dir / f"{i:0{width}d}.png"
        try:
            with Image.open(path) as image:
                image.verify()
                found = (image.height, image.width)
        except Exception:  # noqa: BLE001 - whatever PIL raises, the file is no usable image of the run
            damaged.append(i)
            continue
        if size is not None and found != tuple(size):
            other_size.append((path, found))
    if damaged:
        shown = ", ".join(f"{i:0{width}d}.png" for i in damaged[:5]) + (" ..." if len(damaged) > 5 else "")
        logger.warning("%d unreadable image(s) in %s are generated again: %s", len(damaged), images_dir, shown)
    if other_size:
        path, (h, w) = other_size[0]
        which, it = (
            (f"the image {str(path)!r} is", "it")
            if len(other_size) == 1
            else (f"{len(other_size)} images are not the run's size, the first {str(path)!r}:", "them")
        )
        raise ValueError(
            f"{which} {w}x{h} pixels, but this run makes {size[1]}x{size[0]} images; delete {it} and run the same "
            f"command again to generate {it} anew."
        )
    return done - set(damaged)


def _fault_injection(batches_done: int) -> None:
    """Test hook (as the trainer's): DIFFUSERS_VAR_FAULT_INJECT=sample-batch:N SIGKILLs this process once it has
    generated N batches and handed their images to the writer threads (some may be half written)."""
    if os.environ.get("DIFFUSERS_VAR_FAULT_INJECT") == f"sample-batch:{batches_done}":
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def _sampling_kwargs(args, pipe, family_name: str, num_classes: int | None) -> dict:
    """Sampling settings: the flags given, else the papers' FID setting for converted ImageNet VARs, else the
    pipeline's defaults (recorded explicitly so that run.json says what was used)."""
    given = {
        name: getattr(args, name)
        for name in SAMPLING_FLAGS
        if getattr(args, name) is not None and getattr(args, name) is not False
    }  # 0 (top-k off) is a value
    defaults = {
        name: p.default
        for name, p in inspect.signature(type(pipe).__call__).parameters.items()
        if name in SAMPLING_FLAGS and p.default is not inspect.Parameter.empty
    }
    if num_classes == 1000 and type(pipe).__name__ == "VARPipeline":  # the papers' recipes for converted ImageNet VARs
        defaults.update(IMAGENET_FID_SAMPLING)
    elif num_classes == 1000 and type(pipe).__name__ == "VARCoDePipeline" and len(pipe.scale_schedule()) == 10:
        defaults.update(CODE_IMAGENET_FID_SAMPLING)
    return {**defaults, **given}


def _fill_pipeline_defaults(pipe, family_name: str, sampling: dict) -> dict:
    """The settings left to the pipeline that the flags and recipes do not set, set to the values it uses, so that
    run.json says what was made: Infinity's ``height`` / ``width`` (its ``default_size``, else 1024), the
    ``temperature`` of the pipelines that take one (VAR, CoDe) and CoDe's ``draft_steps`` (its config's). Returns
    what was filled: runs recorded before this hold None or nothing there, which meant the same values."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    filled = {}
    if family_name == "InfinityPipeline":
        sizes = dict(zip(("height", "width"), pipe.config.get("default_size") or (1024, 1024)))
        filled.update({name: size for name, size in sizes.items() if sampling.get(name) is None})
    if "temperature" in parameters and "temperature" not in sampling:
        filled["temperature"] = parameters["temperature"].default
    if "draft_steps" in parameters:  # (no flag sets it; a folder's config may hold any value)
        filled["draft_steps"] = pipe.config.get("draft_steps")
    sampling.update(filled)
    return filled


def _image_size(pipe, family_name: str, sampling: dict) -> tuple[int, int]:
    """(height, width) of the images the run makes: its last scale's token grid in the tokenizer's pixels."""
    if family_name == "InfinityPipeline":
        height, width = pipe.scale_schedule(sampling["height"], sampling["width"])[-1]
        per_token = pipe.vae.pixels_per_token
    else:
        height, width = pipe.scale_schedule()[-1]
        per_token = pipe.vqvae.downsample_factor
    return height * per_token, width * per_token


def _check_sampling(pipe, family_name: str, sampling: dict) -> None:
    """The pipeline's own checks of the sampling settings, their errors naming the flags they come from."""
    try:
        check_common_inputs(sampling.get("top_k", 0), sampling.get("top_p", 0.0), "np", 1)
        if family_name == "InfinityPipeline":
            num_scales = len(pipe.scale_schedule(sampling.get("height"), sampling.get("width")))
            check_guidance_scale(sampling.get("guidance_scale"), num_scales)
            check_temperature(sampling.get("tau"), num_scales, "tau")
        else:
            check_guidance_scale(sampling.get("guidance_scale"))
    except ValueError as err:
        flags = {name: f"--{name.replace('_', '-')}" for name in SAMPLING_FLAGS}
        raise ValueError(name_flags(str(err), flags)) from None


def _generate_batch(
    pipe,
    family_name: str,
    plan: SamplePlan,
    indices: list[int],
    seed: int,
    sampling: dict,
    device: torch.device,
    batch_stream: int,
    per_image: bool,
) -> np.ndarray:
    """uint8 (B, H, W, 3) images of ``indices``: each drawn from its own generator on ``device`` (``per_image``), or
    all from one generator seeded with ``batch_stream`` (:func:`batch_seed` of the global batch; ``--rng batch``)."""
    if per_image:
        generators = [torch.Generator(device).manual_seed(image_seed(seed, i)) for i in indices]
    else:
        generators = torch.Generator(device).manual_seed(batch_stream)
    conditions = [plan.condition(i) for i in indices]
    if family_name == "VARPipeline":
        inputs = {"class_labels": conditions}
    else:
        inputs = {"prompt": conditions}
        if family_name == "STARPipeline" and not per_image:
            # The stable sampler's commit positions: with per-image generators the pipeline derives one stream per
            # image from each (so an image does not depend on the batch it is in); --rng batch takes the batch's.
            inputs["sampler_generator"] = torch.Generator(device).manual_seed(batch_stream ^ 1)
    images = pipe(**inputs, generator=generators, num_images_per_prompt=1, output_type="pt", **sampling).images
    # The rounding of diffusers' numpy_to_pil, on the device, so only uint8 crosses to the host.
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _plan_from_configs(model: Path, args, family_name: str, prompts: list[dict] | None) -> None:
    """:func:`build_plan`'s label and size checks before the model loads, with the class count of its transformer's
    config: a typo costs no model load. A folder whose config cannot be read is left to the load to name."""
    num_classes = None
    if family_name == "VARPipeline":
        try:
            num_classes = int(json.loads((model / "transformer" / "config.json").read_text())["num_classes"])
        except (OSError, ValueError, KeyError, TypeError):
            return
    build_plan(args, family_name, num_classes, {}, prompts)


LOADED_SUFFIXES = (".json", ".safetensors", ".model", ".txt")  # configs, weights, sentencepiece, vocabularies


def _loaded_files(model: Path) -> list[Path]:
    """The files of the pipeline folder ``model`` that loading it reads: ``model_index.json`` and the folders of the
    components it names. A folder without a readable index (one model, a text encoder or a tokenizer): its configs,
    safetensors weights (``.bin`` ones where it has none), sentencepiece models and vocabularies, not the other
    formats' weights or a README a loader never reads."""
    try:
        index = json.loads((model / "model_index.json").read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        files = list(files_under(model, lambda name: True))
        suffixes = LOADED_SUFFIXES if any(f.suffix == ".safetensors" for f in files) else (*LOADED_SUFFIXES, ".bin")
        return [f for f in files if f.suffix in suffixes]
    folders = [model / name for name in model_index_components(index)]
    return [model / "model_index.json"] + [
        path for folder in folders if folder.is_dir() for path in files_under(folder, lambda name: True)
    ]


def model_files_digest(
    model: Path,
    out: Path | None = None,
    whole_folder: bool = False,
    edges: bool = False,
    leave_out: Path | None = None,
) -> str:
    """A digest of what loading the pipeline folder reads (``model_index.json`` and its components' folders): the
    files' names and sizes, and the contents of the small ones (configs, tokenizers; the weights may be many GB). A
    copy or a re-download of the same folder gives the same digest; a folder replaced by another model in the
    meantime does not, so a restarted run cannot mix the two. Other runs' folders inside the model folder, and files
    such as an evaluation's report, are not part of it; nor is what the run in ``out`` writes, where ``out`` is inside
    a component's folder. ``whole_folder``: every file of the folder, as runs recorded it before (their restart is
    still recognised). ``edges``: the first and last MiB of the larger files too (weights retrained or fine-tuned
    into a file of the same size differ there: what training records of its model folders). ``leave_out``: a folder
    inside ``model`` whose files are not part of it (a training run's ``output_dir``)."""
    listing = []
    run_files = (
        [] if out is None else [(out / name).resolve() for name in (IMAGES_DIR, RUN_FILE, METADATA_FILE, NPZ_FILE)]
    )
    if leave_out is not None and leave_out.resolve().is_relative_to(model.resolve()):  # (a model folder inside
        run_files.append(leave_out.resolve())  # the run's would otherwise leave out every file of it)
    for path in files_under(model, lambda name: True) if whole_folder else _loaded_files(model):
        resolved = path.resolve()
        if any(resolved.is_relative_to(run_file) for run_file in run_files) or (
            out is not None and resolved.parent == out.resolve() and is_atomic_temporary(path.name)
        ):
            continue
        size = path.stat().st_size
        if size < 2**20:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        elif edges:
            with path.open("rb") as f:
                head = f.read(2**20)
                f.seek(max(2**20, size - 2**20))
                content = hashlib.sha256(head + f.read()).hexdigest()
        else:
            content = None
        listing.append((str(path.relative_to(model)), size, content))
    return hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()[:16]


RUN_SETTINGS_ALWAYS = {"model", "seed", "total"}  # in every run.json this command wrote, older versions too


def _write_run_file(run_file: Path, settings: dict, batch_size: int) -> None:
    """``run.json``: the settings a restart must match, and the batch size the run started with (it may change)."""
    content = json.dumps({"settings": settings, "batch_size": batch_size}, indent=2) + "\n"
    write_atomic(run_file, lambda tmp: tmp.write_text(content))


def read_run_file(run_file: Path) -> dict | None:
    """The content of a run.json this command wrote (a ``"settings"`` object with the keys every version records),
    else None (unreadable, or another program's)."""
    try:
        content = json.loads(run_file.read_text())
        recorded = content["settings"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return content if isinstance(recorded, dict) and RUN_SETTINGS_ALWAYS <= set(recorded) else None


def _run_file_content(out: Path) -> dict:
    """``out``'s run file, or a ValueError naming ``--out`` when it is not this command's."""
    content = read_run_file(out / RUN_FILE)
    if content is None:
        raise ValueError(
            f"`--out` {str(out)!r} holds a {RUN_FILE} that is not this command's (unreadable, or no "
            f'"settings" object); choose another --out, or remove that file if the folder is yours to reuse.'
        )
    return content


def _refuse_images_without_run_file(out: Path) -> None:
    if (out / IMAGES_DIR).exists() and not (out / RUN_FILE).exists():
        raise ValueError(
            f"`--out` {str(out)!r} has an images/ folder but no {RUN_FILE}: not a folder of this "
            f"command; choose another --out."
        )


def _check_run_file(
    out: Path, settings: dict, processes: Processes, batch_size: int, filled: dict | None = None
) -> None:
    """Refuse to mix two different runs in one folder; the main process records the settings of a new one, and says
    when a restart changes the batch size. ``filled``: sampling settings this run left to the pipeline, which an
    older run recorded as None or not at all (the same value)."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        content = _run_file_content(out)
        recorded = content["settings"]
        earlier_sampling = recorded.get("sampling")
        if filled and isinstance(earlier_sampling, dict):
            left = {name: value for name, value in filled.items() if earlier_sampling.get(name) is None}
            recorded = {**recorded, "sampling": {**earlier_sampling, **left}}
        if "model_files" in recorded and recorded["model_files"] != settings.get("model_files"):
            # a run recorded before the digest read only what loading reads: its whole-folder digest, if it matches
            model = Path(settings["model"])
            if model.is_dir() and recorded["model_files"] == model_files_digest(model, out, whole_folder=True):
                settings = {**settings, "model_files": recorded["model_files"]}
        same_model_files = "model_files" in recorded and recorded["model_files"] == settings.get("model_files")
        differ = sorted(
            k
            for k in set(recorded) | set(settings)
            if recorded.get(k) != settings.get(k)
            and (k in recorded or k != "model_files")  # (not in older runs)
            and not (k == "model" and same_model_files)  # the same files at another path: a copy, a moved checkout
        )
        images = out / IMAGES_DIR
        has_images = images.is_dir() and any(
            e.name.endswith(".png") and not e.name.startswith(".") for e in os.scandir(images)
        )
        # (or what a finished run wrote: its images/ may have been deleted to save space)
        started = has_images or (out / METADATA_FILE).is_file() or (out / NPZ_FILE).is_file()
        if differ and started:
            changes = "; ".join(
                "the model folder's files (another model, or its weights or configs replaced)"
                if k == "model_files"
                else f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}"
                for k in differ[:4]
            )
            raise ValueError(
                f"`--out` {str(out)!r} holds a run with other settings ({changes}); restart it with "
                f"its own command or choose another --out."
            )
        if differ and processes.is_main:  # a run that failed before its first image (bad size, ...): nothing to keep
            _write_run_file(run_file, settings, batch_size)
        earlier = content.get("batch_size")  # (not in older runs)
        if started and not differ and processes.is_main and is_integer(earlier) and earlier != batch_size:
            print(
                f"note: going on with --batch-size {batch_size} in a run started with {earlier}: the same random "
                "streams, but the images made from here may differ from an uninterrupted run's by float rounding.",
                file=sys.stderr,
            )
    elif processes.is_main:
        _refuse_images_without_run_file(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_run_file(run_file, settings, batch_size)


@contextlib.contextmanager
def _loading_bars(enabled: bool):
    """diffusers' / transformers' loading bars only where ours is shown (the main process, without --no-progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in saved:
        lib.enable_progress_bar() if enabled else lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_enabled in saved:
            lib.enable_progress_bar() if was_enabled else lib.disable_progress_bar()


class _Progress:
    """The main process's progress bar over all processes' images: it counts the finished files on disk (at most
    once a second), so it needs no communication between processes."""

    def __init__(self, enabled: bool, images_dir: Path, total: int, done: int, width: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", desc="sampling", dynamic_ncols=True)
        self.images_dir, self.total, self.width, self.last = images_dir, total, width, 0.0

    def update(self, force: bool = False) -> None:
        if self.bar is None or (not force and time.monotonic() - self.last < 1.0):
            return
        self.last = time.monotonic()
        done = sum(1 for e in os.scandir(self.images_dir) if e.name.endswith(".png") and not e.name.startswith("."))
        self.bar.update(max(0, min(done, self.total) - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.update(force=True)
            self.bar.close()


def _compile_seconds() -> float | None:
    """Seconds this process spent in torch.compile so far (tracing and code generation, cache hits included), from
    dynamo's own timers; None where this torch does not keep them."""
    try:
        from torch._dynamo.utils import compilation_time_metrics

        return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))
    except (ImportError, AttributeError, TypeError):
        return None


def run_sample(args, on_batch: Callable[[dict], None] | None = None) -> dict:
    """The ``sample`` command (``args`` as its parser makes them). ``on_batch(info)`` is called after each batch
    this process generated (benchmarks/bench_sample.py records speed and memory with it). Returns a summary."""
    for flag, value, low, high in (
        ("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE),  # one pipeline call
        ("--per-class", args.per_class, 1, MAX_IMAGES),
        ("--images-per-prompt", args.images_per_prompt, 1, MAX_IMAGES),
        ("--seed", args.seed, 0, None),  # any size: image_seed hashes it
        ("--writer-threads", args.writer_threads, 1, MAX_WRITER_THREADS),
    ):
        if value is not None and value < low:
            raise ValueError(f"`{flag}` must be >= {low}, got {value}.")
        if value is not None and high is not None and value > high:
            raise ValueError(f"`{flag}` must be <= {high}, got {value}.")
    if not str(args.out).strip():
        raise ValueError("`--out` is empty; give the folder to write the run into.")
    model = resolve_pipeline_folder(args.model) if args.model else default_model()
    try:
        pipeline_class = generation_pipeline_class(model)
    except ValueError as err:
        raise ValueError(f"`--model` {err}") from None
    family_name = pipeline_family(pipeline_class).__name__  # what the flags follow (CoDe: VAR's)
    check_flags(args, family_name)
    prompts = read_prompts(args.prompts) if args.prompts is not None else None  # a bad file costs no model load
    _plan_from_configs(model, args, family_name, prompts)
    out = Path(args.out)
    check_out(out)
    started_run = time.perf_counter()
    processes = Processes(args.device)
    device = processes.device
    # held until the run ends; taken before the model loads, so a second run into out stops at once
    with exclusive_run(out, processes.is_main):
        # --fast keeps float32 weights and casts what the fast path casts; otherwise --dtype is the weights' dtype.
        dtype = getattr(torch, args.dtype or ("bfloat16" if args.fast else "float32"))
        with _loading_bars(processes.is_main and not args.no_progress):
            pipe = load_pipeline(pipeline_class, model, "--model", dtype=torch.float32 if args.fast else dtype).to(
                device
            )
        pipe.set_progress_bar_config(disable=True)
        num_classes = pipe.transformer.config.num_classes if family_name == "VARPipeline" else None
        class_names = dict(getattr(pipe, "id2label", None) or {})
        plan = build_plan(args, family_name, num_classes, class_names, prompts)
        sampling = _sampling_kwargs(args, pipe, family_name, num_classes)
        filled = _fill_pipeline_defaults(pipe, family_name, sampling)
        _check_sampling(pipe, family_name, sampling)  # before the run folder is written to
        loaded = time.perf_counter()
        if args.fast:
            enable_fast_path(pipe, device, dtype, args.fp8, args.compile_cache, args.compile_blocks or True)
            if processes.is_main and (note := fast_on_cpu_note(device, dtype)):
                print(note, file=sys.stderr)
        # where a process's start-up goes (the first batch holds the compiles and CUDA graph captures of --fast)
        startup = {"load_seconds": loaded - started_run, "fast_path_seconds": time.perf_counter() - loaded}

        total, batch_size = plan.total, args.batch_size
        width = max(6, len(str(total - 1)))
        settings = {
            "model": str(model.resolve()),
            "model_files": model_files_digest(model, out),
            "pipeline": type(pipe).__name__,
            "seed": args.seed,
            "total": total,
            "labels": plan.labels,
            "per_class": plan.per_item if plan.labels is not None else None,
            "prompts_sha256": None
            if plan.prompts is None
            else hashlib.sha256(json.dumps(plan.prompts, sort_keys=True).encode()).hexdigest(),
            "images_per_prompt": plan.per_item if plan.prompts is not None else None,
            "sampling": sampling,
            "fast": bool(args.fast),
            "fp8": bool(args.fp8),
            "dtype": str(dtype).replace("torch.", ""),
            # CPU and CUDA generators draw different numbers from one seed; with per-image streams the batch size may
            # change on a restart (the random streams do not depend on it; only float rounding does).
            "device_type": device.type,
            "rng": args.rng,
        }
        if args.rng == "batch":  # each image depends on its batch's stream, so on the batch size
            settings["batch_size"] = batch_size
        _check_run_file(out, settings, processes, batch_size, filled)
        images_dir = out / IMAGES_DIR
        if processes.is_main:
            images_dir.mkdir(parents=True, exist_ok=True)
            for entry in os.scandir(images_dir):  # half-written files of a killed run (write_atomic's names only)
                if is_atomic_temporary(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
            for name in (METADATA_FILE, NPZ_FILE, RUN_FILE):  # (its write_atomic temporaries beside them too)
                for stale in out.glob(f".{name}.*.tmp"):
                    if is_atomic_temporary(stale.name, of=name) and not stale.is_symlink():
                        stale.unlink(missing_ok=True)
        processes.barrier()  # nobody writes before every process has listed what is done
        done = completed_indices(images_dir, total, width, size=_image_size(pipe, family_name, sampling))
        num_batches = (total + batch_size - 1) // batch_size
        pending = [
            b
            for b in range(num_batches)
            if any(i not in done for i in range(b * batch_size, min((b + 1) * batch_size, total)))
        ]
        mine = pending[processes.index :: processes.count]
        processes.barrier()

        progress = _Progress(processes.is_main and not args.no_progress, images_dir, total, len(done), width)
        threads = args.writer_threads or max(1, min(8, (os.cpu_count() or 2) // max(1, processes.count)))
        written, waited, started = 0, 0.0, time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as writer:
            in_flight: deque[list] = deque()
            for number, b in enumerate(mine, 1):
                indices = list(range(b * batch_size, min((b + 1) * batch_size, total)))
                # The fast path captures CUDA graphs and compiles per batch size: pad a short last batch with images
                # past the end (generated, then dropped) instead of capturing and compiling a second size.
                padded = indices + list(range(total, total + batch_size - len(indices))) if args.fast else indices
                images = _generate_batch(
                    pipe,
                    family_name,
                    plan,
                    padded,
                    args.seed,
                    sampling,
                    device,
                    batch_seed(args.seed, b, batch_size),
                    per_image=args.rng == "image",
                )
                futures = [
                    writer.submit(write_png, images_dir / f"{i:0{width}d}.png", images[k])
                    for k, i in enumerate(indices)
                    if i not in done
                ]
                in_flight.append(futures)
                written += len(futures)
                if number == 1:
                    startup["first_batch_seconds"] = time.perf_counter() - started
                    startup["compile_seconds"] = _compile_seconds()
                _fault_injection(number)
                # At most two batches wait for the writers: host memory stays flat however long the run.
                while len(in_flight) > 2:
                    tic = time.perf_counter()
                    for future in in_flight.popleft():
                        future.result()
                    waited += time.perf_counter() - tic
                progress.update()
                if on_batch is not None:
                    on_batch(
                        {
                            "batch": b,
                            "images": written,
                            "seconds": time.perf_counter() - started,
                            "writer_wait_seconds": waited,
                        }
                    )
            for futures in in_flight:
                for future in futures:
                    future.result()
        seconds = time.perf_counter() - started
        processes.barrier()
        progress.close()

        summary = {
            "out": str(out),
            "total": total,
            "generated_here": written,
            "batches_here": len(mine),
            "seconds": seconds,
            "processes": processes.count,
            "startup": startup,
        }
        if processes.is_main:
            missing = total - len(completed_indices(images_dir, total, width, verify=False))  # (checked at the start)
            if missing:  # another process failed; its launcher reports why
                raise RuntimeError(
                    f"{missing} images are missing in {images_dir}; run the same command again to finish."
                )
            per_batch = batch_size if args.rng == "batch" else None
            lines = (json.dumps(plan.metadata(i, args.seed, width, per_batch)) + "\n" for i in range(total))
            write_atomic(out / METADATA_FILE, lambda tmp: tmp.write_text("".join(lines)))
            if args.save_npz:
                write_samples_npz(out / NPZ_FILE, images_dir, total, width, plan)
                summary["npz"] = str(out / NPZ_FILE)
            print(
                f"{total} images in {images_dir} ({written} generated by this process in {seconds:.1f} s); "
                f"metadata in {out / METADATA_FILE}" + (f"; {out / NPZ_FILE}" if args.save_npz else "")
            )
            first_batch = startup.get("first_batch_seconds")
            print(
                f"start-up: loading {startup['load_seconds']:.1f} s, "
                f"fast path set-up {startup['fast_path_seconds']:.1f} s"
                + (f", first batch {first_batch:.1f} s" if first_batch is not None else "")
                + (
                    f", of which torch.compile {startup['compile_seconds']:.1f} s"
                    if startup.get("compile_seconds")
                    else ""
                )
            )
        # No barrier after this: the other processes need not wait (perhaps past a collective timeout) for the npz.
        return summary


def write_samples_npz(path: Path, images_dir: Path, total: int, width: int, plan: SamplePlan) -> None:
    """ADM's sample batch: ``arr_0`` uint8 (N, H, W, 3) in index order, ``arr_1`` int64 labels (class-conditional)."""
    from PIL import Image

    def load(i: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        path = images_dir / f"{i:0{width}d}.png"
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:  # damaged after it was written (its write is atomic)
            raise ValueError(
                f"`--save-npz`: the image {str(path)!r} cannot be read ({err}); delete it and run the same command "
                "again to generate it anew."
            ) from None
        if shape is not None and array.shape != shape:  # (the restart checked them; replaced since, by hand)
            raise ValueError(
                f"`--save-npz`: the image {str(path)!r} is {array.shape[1]}x{array.shape[0]} pixels, the run's "
                f"images {shape[1]}x{shape[0]}; delete it and run the same command again to generate it anew."
            )
        return array

    first = load(0)

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, total, 256):
            yield np.stack([load(i, first.shape) for i in range(start, min(start + 256, total))])

    arrays = {"arr_0": ((total, *first.shape), np.uint8, chunks())}
    if plan.labels is not None:
        labels = np.array([plan.condition(i) for i in range(total)], dtype=np.int64)
        arrays["arr_1"] = ((total,), np.int64, iter([labels]))
    write_npz(path, arrays)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sample",
        help="sample many images (FID-50k, GenEval, ...) on one process or under accelerate launch",
        description="Sample images into DIR/images/NNNNNN.png with DIR/metadata.jsonl (and DIR/samples.npz). "
        "Runs unchanged under `accelerate launch --num_processes N -m diffusers_var.cli sample ...`; "
        "rerun the same command to finish an interrupted run.",
    )
    parser.add_argument(
        "--model",
        type=nonblank,
        default=None,
        help="pipeline folder, or an embedded one by name (var-shapes, star-shapes, infinity-shapes; default: "
        "var-shapes)",
    )
    parser.add_argument("--out", type=home_path, required=True, help="output folder")
    group = parser.add_argument_group("class-conditional (VAR)")
    group.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="images per class (the papers' FID-50k: 50 over the 1000 ImageNet classes); a run holds at most "
        f"{MAX_IMAGES} images",
    )
    group.add_argument(
        "--class-labels",
        default=None,
        help="comma-separated class indices (default: every class); -1 is the null class: write a list that starts "
        "with it as --class-labels=-1,5 (argparse reads a lone -1,5 as a flag)",
    )
    group = parser.add_argument_group("text-to-image (STAR, Infinity)")
    group.add_argument(
        "--prompts",
        type=nonblank,
        default=None,
        help='prompt file: one prompt a line, or .jsonl objects with "prompt" and any metadata',
    )
    group.add_argument(
        "--images-per-prompt",
        type=int,
        default=None,
        help=f"images per prompt (default 1); a run holds at most {MAX_IMAGES} images",
    )
    group = parser.add_argument_group(
        "sampling (default: the pipeline's; converted ImageNet VARs: the FID setting cfg 1.5, top-k 900, top-p 0.96; "
        "CoDe pairs: cfg 1.5, top-k 600, top-p 0.96, temperature 1.1 on the first seven scales)"
    )
    # (ranges checked when parsing, as generate's: a bad value costs no model load)
    group.add_argument("--guidance-scale", type=guidance_scale_flag, default=None, help="0 to 10000")
    group.add_argument("--top-k", type=int_in_range(0), default=None, help="0 = off")
    group.add_argument("--top-p", type=top_p_flag, default=None, help="0 to 1 (0 = off)")
    group.add_argument("--more-smooth", action="store_true", help="VAR / STAR: Gumbel-softmax smoothing")
    group.add_argument(
        "--tau",
        type=float_in_range(MIN_TEMPERATURE),
        default=None,
        help=f"Infinity: temperature, >= {MIN_TEMPERATURE:g}",
    )
    group.add_argument("--height", type=int_in_range(1), default=None, help="Infinity: image height")
    group.add_argument("--width", type=int_in_range(1), default=None, help="Infinity: image width")
    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=0, help="image i draws from a generator seeded from (seed, i)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help=f"images per batch (per process), 1 to {MAX_BATCH_SIZE}; the same command and batch size give the same "
        "bytes",
    )
    group.add_argument(
        "--rng",
        choices=["image", "batch"],
        default="image",
        help="image (default): a generator per image, seeded from (seed, index): its random numbers do not depend "
        "on the batch size (the pixels may, by float rounding). batch: one generator per global batch (VAR's fast "
        "path then samples inside "
        "its CUDA graphs); still the same files on any number of processes, but the images change "
        "with --batch-size",
    )
    group.add_argument(
        "--fast",
        action="store_true",
        help="the GPU fast path (bf16, CUDA graphs, compiled decoder / blocks); see README 'Speed'",
    )
    group.add_argument("--fp8", action="store_true", help="with --fast: float8 block matmuls (H100 / H200)")
    group.add_argument(
        "--compile-blocks",
        choices=COMPILE_BLOCKS_SHAPES,
        default=None,
        help="with --fast on a GPU: the shapes the block code is compiled for. dynamic (default): once for every "
        "scale; static-tokens: each scale for itself; static: each scale at this batch size (every batch of a run "
        "has one size), the fastest at large batches (VAR on an H100), with the longest first compile "
        "(README 'Speed')",
    )
    group.add_argument(
        "--compile-cache",
        type=nonblank,
        default=None,
        help="with --fast on a GPU: folder of torch.compile's caches, shared by the processes of a machine so that "
        "only the first compiles (default $DIFFUSERS_VAR_COMPILE_CACHE, else ~/.cache/diffusers_var/torch_compile)",
    )
    group.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights' dtype (default float32); with --fast the fast path's dtype (default bfloat16)",
    )
    group.add_argument(
        "--device",
        default=None,
        help="default: the process's GPU under accelerate launch, else cuda when available, else cpu",
    )
    group.add_argument(
        "--save-npz", action="store_true", help="also write DIR/samples.npz (ADM's layout, arr_0 uint8 NHWC)"
    )
    group.add_argument(
        "--writer-threads", type=int, default=None, help=f"PNG writer threads per process (1 to {MAX_WRITER_THREADS})"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=sample_command)
    return parser


def sample_command(args) -> int:
    try:
        run_sample(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
