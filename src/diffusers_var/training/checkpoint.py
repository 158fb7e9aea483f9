"""Training checkpoints that resume without unpickling anything.

accelerate's ``save_state`` writes the optimizer, scheduler, RNG states and registered objects with ``torch.save``
and its ``load_state`` reads registered objects with ``weights_only=False``: resuming a run folder from someone else
would run whatever a planted ``custom_checkpoint_0.pkl`` holds. A checkpoint here is tensors in safetensors files
and everything else in JSON, and resuming reads only those files (a ``.pkl`` / ``.bin`` in the folder is ignored):

    step-0000500/
      trainer_state.json          format, step, scheduler / grad-scaler / optimizer hyper-parameters, EMA scalars,
                                  the run's config and what its paths pointed to (to refuse a resume with a
                                  changed config or a replaced model folder)
      model.safetensors           the trained model's full state dict (FQNs of the unwrapped model)
      optimizer.safetensors       per-parameter optimizer tensors, keyed "<parameter FQN>:<name>" (e.g. exp_avg)
      ema.safetensors             EMA shadow weights keyed by parameter FQN (when EMA is on)
      rng_state_<rank>.safetensors + rng_state_<rank>.json    torch / CUDA / numpy / python RNG states of each rank

The model and optimizer states go through ``torch.distributed.checkpoint.state_dict``: on one device and under DDP
they are the local (replicated) state dicts; under FSDP they are gathered to full tensors on rank 0 when saving and
re-sharded on every rank when loading, so a checkpoint does not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT = "diffusers-var-training-checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
PICKLE_SUFFIXES = {".pkl", ".bin", ".pt", ".pth", ".ckpt"}
# optimizer settings that choose an implementation, not a hyperparameter: a resumed run keeps its own
OPTIMIZER_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def bare_model(accelerator, model):
    """``model`` without accelerate's wrappers (DDP, mixed precision) and without torch.compile's (``torch_compile``
    or accelerate's ``dynamo_backend``): the module whose parameter names the checkpoints and exported pipelines
    use."""
    # the compiled wrapper first: unwrapping it through accelerate re-points it at the bare module, and a compiled
    # DDP model would lose its no_sync (every accumulation micro-step would all-reduce)
    return accelerator.unwrap_model(getattr(model, "_orig_mod", model))


def _state_dict_options(accelerator, for_save: bool, strict: bool = True):
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    sharded = accelerator.distributed_type == DistributedType.FSDP
    if for_save:  # full tensors on rank 0 only (the others get empty dicts), on the CPU
        return StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    return StateDictOptions(full_state_dict=sharded, strict=strict)


def _trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    # a copy: safetensors refuses tensors sharing storage, and the file must not alias live training tensors
    return tensor.detach().to("cpu", copy=True).contiguous()


def _json_value(value):
    """JSON form of the non-tensor values of optimizer / scheduler / EMA state (numbers, bools, None, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file``, with the mode the umask gives: safetensors writes 0600, so another user sharing the run folder
    could not resume it (the JSON files beside it get the umask's mode). A failed write is the ``OSError`` every other
    write raises (safetensors raises its own error, "... No space left on device (os error 28)", which the command's
    one-line message for a full disk did not recognise)."""
    try:
        save_file(tensors, path)
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
    umask = os.umask(0)  # read here, not from file_utils: this module has no package imports (tests load it alone)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(
        json.dumps(data, indent=1) + "\n"
    )  # floats round-trip exactly (repr), NaN / inf as Python writes them


def sync_to_disk(path: Path) -> None:
    """``fsync`` a file or folder: the checkpoint's files reach the disk before the rename that makes it one, so a
    power cut cannot leave a renamed checkpoint with empty files."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- random number generators --------------------------------------------------------------------------
def _save_rng(folder: Path, rank: int) -> None:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    _save_tensors(tensors, folder / f"rng_state_{rank}.safetensors")
    _write_json(
        folder / f"rng_state_{rank}.json",
        {
            "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
            "numpy": {"pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        },
    )


def _load_rng(folder: Path, rank: int) -> bool:
    tensors_file, json_file = folder / f"rng_state_{rank}.safetensors", folder / f"rng_state_{rank}.json"
    if not (tensors_file.is_file() and json_file.is_file()):
        return False
    tensors, meta = load_file(tensors_file), json.loads(json_file.read_text())
    py, np_meta = meta["python"], meta["numpy"]
    # each state built before any is set (their kinds and sizes were checked by checkpoint_damage)
    python_state = (int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"])
    numpy_state = (
        "MT19937",
        tensors["numpy_keys"].numpy().astype(np.uint32),
        int(np_meta["pos"]),
        int(np_meta["has_gauss"]),
        float(np_meta["cached_gaussian"]),
    )
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return True


# -- save ----------------------------------------------------------------------------------------------
def save_training_state(
    folder: Path,
    accelerator,
    model,
    optimizer,
    scheduler,
    ema,
    step: int,
    config: dict,
    trainable_only: bool = False,
    inputs: dict | None = None,
) -> None:
    """Write a checkpoint into ``folder``. Every process calls it (under FSDP gathering the state is a collective);
    each writes its own RNG state, the main process everything else. ``trainable_only`` (LoRA): the model file holds
    the trained weights only (the frozen base comes from the base pipeline again on resume). ``inputs``: what the
    config's paths pointed to (the engine's ``input_fingerprints``), for the resume to compare."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _state_dict_options(accelerator, for_save=True)
    model_state = get_model_state_dict(model, options=options)
    if trainable_only:
        trained = _trainable_names(bare_model(accelerator, model))
        model_state = {name: t for name, t in model_state.items() if name in trained}
    optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer, options=options)
    folder.mkdir(parents=True, exist_ok=True)
    _save_rng(folder, accelerator.process_index)
    for rng_file in folder.glob(f"rng_state_{accelerator.process_index}.*"):  # each rank its own, before the rename
        sync_to_disk(rng_file)
    if not accelerator.is_main_process:
        return
    _save_tensors({name: _cpu(t) for name, t in model_state.items()}, folder / "model.safetensors")
    optimizer_tensors, optimizer_values = {}, {}
    for fqn, entries in optimizer_state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                optimizer_tensors[f"{fqn}:{name}"] = _cpu(value)
            else:
                optimizer_values.setdefault(fqn, {})[name] = _json_value(value)
    _save_tensors(optimizer_tensors, folder / "optimizer.safetensors")
    state: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "accelerator_step": int(accelerator.step),
        "num_processes": int(accelerator.num_processes),
        "optimizer": {"param_groups": _json_value(optimizer_state["param_groups"]), "values": optimizer_values},
        "scheduler": _json_value(scheduler.state_dict()),
        "grad_scaler": _json_value(accelerator.scaler.state_dict()) if accelerator.scaler is not None else None,
        "ema": None,
        "config": config,
        "inputs": inputs or {},
        "trainable_only": bool(trainable_only),
    }
    if ema is not None:  # EMA of the trained parameters, in their order
        ema_state = ema.state_dict()
        names = [name for name, p in bare_model(accelerator, model).named_parameters() if p.requires_grad]
        _save_tensors(
            {name: _cpu(t) for name, t in zip(names, ema_state.pop("shadow_params"))}, folder / "ema.safetensors"
        )
        ema_state.pop("collected_params", None)
        state["ema"] = {"values": _json_value(ema_state), "parameters": names}
    for written in folder.iterdir():
        # not another rank's temporary file of an atomic write (it was renamed away while listed: FileNotFoundError
        # on rank 0 under load); the other ranks sync their own files
        if CHECKPOINT_FILES.match(written.name):
            sync_to_disk(written)
    _write_json(folder / STATE_FILE, state)  # last: a folder without it is not a checkpoint
    sync_to_disk(folder / STATE_FILE)
    sync_to_disk(folder)


# the files save_training_state writes: pruning deletes these, and a folder only when nothing else is left in it
CHECKPOINT_FILES = re.compile(
    r"(trainer_state\.json|(model|optimizer|ema)\.safetensors|rng_state_\d+\.(safetensors|json))\Z"
)


# the temporary file safetensors (0.8: Rust's tempfile crate, ".tmp" and 6 random letters or digits) writes beside
# the file it saves and renames over it: a save killed while writing leaves it in the unfinished checkpoint folder
SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}\Z")


def _is_safetensors_temporary(path: Path) -> bool:
    """Whether ``path`` is safetensors' temporary file of a save cut short: its name, and what it holds so far. A
    file of yours with such a name is not."""
    if not SAFETENSORS_TEMPORARY.match(path.name) or path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        return False
    # safetensors creates it empty, sizes it to the whole file (zeros until its write buffer is flushed), then writes
    # the header's length (8 bytes) and its JSON
    return not head or (len(head) == 9 and (head[8:9] == b"{" or not any(head)))


def is_training_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint this package wrote (whole or damaged): its ``trainer_state.json`` names
    the format. A folder or file that only has a checkpoint's name is someone else's."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("format") == FORMAT


def written_by_trainer(folder: Path) -> bool:
    """Whether ``folder``, named like a checkpoint, is one the trainer wrote: whole or damaged (it holds a file of
    :data:`CHECKPOINT_FILES`), or of accelerate's pickle format, which earlier versions wrote (a resume refuses it). A
    folder of yours that only has a checkpoint's name is not, nor is a file."""
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.is_file()]
    except OSError:  # (a file, or a folder that cannot be read)
        return False
    return any(CHECKPOINT_FILES.match(name) or Path(name).suffix in PICKLE_SUFFIXES for name in names)


def remove_training_checkpoint(folder: Path, unfinished: bool = False) -> list[str]:
    """Delete a checkpoint's files (the state file first: a half-deleted folder is no checkpoint), then the folder
    if nothing else is in it. Returns the names of the files kept (not written by this package). ``unfinished``: the
    trainer's staging folder of a save that was cut short, whose safetensors temporary files are the save's too."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    kept = []
    for path in sorted(folder.iterdir()):
        ours = path.is_file() and not path.is_symlink() and CHECKPOINT_FILES.match(path.name)
        if ours or (unfinished and _is_safetensors_temporary(path)):
            path.unlink()
        else:
            kept.append(path.name)
    if not kept:
        folder.rmdir()
    return kept


def _is_int(value) -> bool:  # (this module has no package imports: scalars.is_integer is not at hand)
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value) -> bool:  # what _json_value writes for a non-tensor optimizer value
    return (
        value is None
        or isinstance(value, (bool, int, float))
        or (isinstance(value, list) and all(_is_scalar(v) for v in value))
    )


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _param_group_problem(index: int, group) -> str | None:
    """What a saved optimizer param group lacks for the resume's AdamW (its keys fail later, deep inside torch: a
    missing ``params`` as a KeyError, ``betas`` out of [0, 1) as a complex bias correction at the first step)."""
    where = f"{STATE_FILE} optimizer param_groups[{index}]"
    if not isinstance(group, dict) or not _is_names(group.get("params")):
        return f"{where} has no list of parameter names `params`"
    for key in ("lr", "weight_decay", "eps", "initial_lr"):
        if key in group and not (_is_real(group[key]) and math.isfinite(group[key]) and group[key] >= 0):
            return f"{where} has `{key}` {group[key]!r}, not a finite number >= 0"
    betas = group.get("betas")
    if "betas" in group and not (
        isinstance(betas, list) and len(betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in betas)
    ):
        return f"{where} has `betas` {betas!r}, not two numbers in [0, 1)"
    return None


def _scheduler_problem(scheduler) -> str | None:
    """What the saved LR scheduler state lacks (``last_epoch`` of another type failed at the first step)."""
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("base_lrs"), list):
        return f"{STATE_FILE} has no scheduler state"
    for key in ("base_lrs", "_last_lr"):
        rates = scheduler.get(key, [])
        if not isinstance(rates, list) or not all(_is_real(r) and math.isfinite(r) for r in rates):
            return f"{STATE_FILE} has scheduler `{key}` {rates!r}, not a list of finite numbers"
    for key in ("last_epoch", "_step_count"):
        if key in scheduler and not (_is_int(scheduler[key]) and scheduler[key] >= -1):
            return f"{STATE_FILE} has scheduler `{key}` {scheduler[key]!r}, not a whole number of steps"
    return None


# EMAModel.load_state_dict's checks, which it makes only after comparing (TypeError for a string decay) or not at all
_EMA_VALUES = {
    "decay": (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "min_decay": (lambda v: isinstance(v, float) and 0 <= v <= 1, "a float in [0, 1]"),
    "optimization_step": (lambda v: _is_int(v) and v >= 0, "a whole number"),
    "update_after_step": (lambda v: _is_int(v) and v >= 0, "a whole number"),
    "use_ema_warmup": (lambda v: isinstance(v, bool), "true or false"),
    "inv_gamma": (lambda v: _is_real(v) and math.isfinite(v), "a finite number"),
    "power": (lambda v: _is_real(v) and math.isfinite(v), "a finite number"),
}


def _ema_problem(ema) -> str | None:
    if ema is None or ema is False:  # a run without EMA
        return None
    if not isinstance(ema, dict) or not isinstance(ema.get("values"), dict):
        return f"{STATE_FILE} has an `ema` section without its `values`"
    names = ema.get("parameters")
    if not _is_names(names) or len(set(names)) != len(names):
        return f"{STATE_FILE} has an `ema` section without a list of distinct parameter names `parameters`"
    for key, (fits, kind) in _EMA_VALUES.items():
        if key in ema["values"] and not fits(ema["values"][key]):
            return f"{STATE_FILE} has ema `{key}` {ema['values'][key]!r}, not {kind}"
    return None


def _state_structure_problem(state: dict) -> str | None:
    """What ``trainer_state.json`` lacks that a resume reads (it parses, but was cut or edited): each key of another
    type failed deep inside the resume (or torch, or diffusers), with no fallback to the checkpoint before."""
    optimizer = state.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list):
        return f"{STATE_FILE} has no optimizer param_groups"
    for index, group in enumerate(optimizer["param_groups"]):
        if problem := _param_group_problem(index, group):
            return problem
    counts = Counter(name for group in optimizer["param_groups"] for name in group["params"])
    if twice := sorted(name for name, count in counts.items() if count > 1):  # (torch loaded it without a word)
        return f"{STATE_FILE} has optimizer param_groups that name a parameter twice ({twice[:3]})"
    values = optimizer.get("values")
    if not isinstance(values, dict):
        return f"{STATE_FILE} has no optimizer values"
    for fqn, entries in values.items():
        if not isinstance(entries, dict) or not all(_is_scalar(v) for v in entries.values()):
            return f"{STATE_FILE} has optimizer values for {fqn!r} that are not a mapping of numbers"
    if problem := _scheduler_problem(state.get("scheduler")):
        return problem
    if state.get("grad_scaler") is not None and not isinstance(state["grad_scaler"], dict):
        return f"{STATE_FILE} has a `grad_scaler` that is not a mapping"
    if problem := _ema_problem(state.get("ema")):
        return problem
    for key in ("config", "inputs"):  # compared with the current run's (None: a run saved before they were)
        if state.get(key) is not None and not isinstance(state[key], dict):
            return f"{STATE_FILE} has a `{key}` that is not a mapping"
    return None


def _rng_structure_problem(meta) -> str | None:
    python, numpy = (meta.get(key) if isinstance(meta, dict) else None for key in ("python", "numpy"))
    if not isinstance(python, dict) or not {"version", "state", "gauss_next"} <= python.keys():
        return "has no python random state"
    state = python["state"]  # Mersenne Twister: 624 words and a position (random.setstate's own check is bare)
    if not isinstance(state, list) or len(state) != 625 or not all(isinstance(v, int) for v in state):
        return "has a python random state of the wrong size"
    # 32-bit words and a position in [0, 624]: setstate's OverflowError / "invalid state" otherwise
    if not all(0 <= v < 2**32 for v in state[:-1]) or not 0 <= state[-1] <= 624:
        return "has a python random state with words out of range"
    if python["version"] != random.Random.VERSION or not _is_int(python["version"]):  # what random.getstate writes
        return f"has python `version` {python['version']!r}, not {random.Random.VERSION}"
    if python["gauss_next"] is not None and not _is_real(python["gauss_next"]):
        return f"has python `gauss_next` {python['gauss_next']!r}, not a number or null"
    if not isinstance(numpy, dict) or not {"pos", "has_gauss", "cached_gaussian"} <= numpy.keys():
        return "has no numpy random state"
    if not _is_int(numpy["pos"]) or not 0 <= numpy["pos"] <= 624:  # (int() of it failed bare at the resume)
        return f"has numpy `pos` {numpy['pos']!r}, not a whole number in [0, 624]"
    if numpy["has_gauss"] not in (0, 1) or isinstance(numpy["has_gauss"], (bool, float)):
        return f"has numpy `has_gauss` {numpy['has_gauss']!r}, not 0 or 1"
    if not _is_real(numpy["cached_gaussian"]):
        return f"has numpy `cached_gaussian` {numpy['cached_gaussian']!r}, not a number"
    return None


def _rng_tensors_problem(shapes: dict[str, list[int]], dtypes: dict[str, str]) -> str | None:
    """What ``rng_state_<rank>.safetensors`` lacks (from its header: names, shapes and dtypes), or ``None``."""
    if shapes.get("torch") != list(torch.get_rng_state().shape):
        return f"has no torch random state of shape {list(torch.get_rng_state().shape)} ({shapes.get('torch')})"
    if shapes.get("numpy_keys") != [624]:  # (a shorter one failed with a bare IndexError at the resume)
        return f"has `numpy_keys` of shape {shapes.get('numpy_keys')}, not numpy's 624 words"
    # torch.set_rng_state takes bytes only (a TypeError at the resume); numpy's keys are integer words
    for key, dtype in sorted(dtypes.items()):
        wanted = ("I64", "I32", "U32") if key == "numpy_keys" else ("U8",)
        if (key in ("torch", "numpy_keys") or key.startswith("cuda_")) and dtype not in wanted:
            return f"has `{key}` of dtype {dtype}, not {' / '.join(wanted)}"
    return None


# -- load ----------------------------------------------------------------------------------------------
def checkpoint_damage(folder: Path) -> str | None:
    """Why a checkpoint folder of ours cannot be resumed (a file missing, truncated or not parseable), or ``None``
    when it is whole. Reads only headers and JSON. A folder that is not of this format (accelerate's pickles) is
    not damaged but foreign: :func:`read_training_state` refuses it."""
    from safetensors import safe_open

    state_file = folder / STATE_FILE
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as err:
            return f"{STATE_FILE} is unreadable ({err})"
    elif (folder / "model.safetensors").exists() or any(
        CHECKPOINT_FILES.match(path.name) for path in folder.iterdir() if path.is_file()
    ):  # files of ours without the state file, written last: a save cut short, or a copy
        return f"{STATE_FILE} is missing"
    else:
        return None  # not one of ours: read_training_state says what it is
    if not isinstance(state, dict):
        return f"{STATE_FILE} holds no mapping"
    if state.get("format") == FORMAT and (problem := _state_structure_problem(state)):
        return problem
    needed = ["model.safetensors", "optimizer.safetensors"] + (["ema.safetensors"] if state.get("ema") else [])
    # every saving rank's RNG state: without it the resume would draw other dropout / flips than the run it continues
    processes = state.get("num_processes")
    processes = processes if isinstance(processes, int) and not isinstance(processes, bool) and processes > 0 else 1
    needed += [f"rng_state_{rank}.{suffix}" for rank in range(processes) for suffix in ("safetensors", "json")]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for json_file in sorted(folder.glob("rng_state_*.json")):
        try:
            problem = _rng_structure_problem(json.loads(json_file.read_text()))
        except (OSError, ValueError) as err:
            return f"{json_file.name} is unreadable ({err})"
        if problem:
            return f"{json_file.name} {problem}"
    for tensors_file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(tensors_file, "pt") as opened:  # validates the header and that the data covers the file
                shapes = {key: list(opened.get_slice(key).get_shape()) for key in opened.keys()}
                dtypes = {key: opened.get_slice(key).get_dtype() for key in opened.keys()}
        except Exception as err:  # safetensors raises its own error type for a damaged file
            return f"{tensors_file.name} is damaged ({str(err).splitlines()[0]})"
        if tensors_file.name == "optimizer.safetensors" and (odd := [k for k in shapes if ":" not in k]):
            return f"optimizer.safetensors has keys that are not '<parameter>:<state>' ({odd[:2]})"
        if tensors_file.name.startswith("rng_state_") and (problem := _rng_tensors_problem(shapes, dtypes)):
            return f"{tensors_file.name} {problem}"
    return None


def read_training_state(folder: Path) -> dict:
    """``trainer_state.json`` of a checkpoint; a ``ValueError`` naming ``resume`` for anything else (in particular a
    checkpoint of accelerate's pickle format, which is never unpickled)."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        kind = (
            f"holds pickle files ({', '.join(pickles[:4])}), which are never loaded since unpickling can run code"
            if pickles
            else f"has no {STATE_FILE}"
        )
        raise ValueError(
            f"`resume`: checkpoint {str(folder)!r} is not a diffusers-var checkpoint that can be resumed "
            f"safely: it {kind}. Set resume=never to start a fresh run (the previous run's files are moved "
            "aside, nothing is deleted), or use another output_dir."
        )
    try:
        state = json.loads(state_file.read_text())
    except ValueError as err:
        raise ValueError(
            f"`resume`: {str(state_file)!r} is not valid JSON ({err}); set resume=never to start afresh."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"`resume`: {str(state_file)!r} is not a diffusers-var checkpoint of format version "
            f"{FORMAT_VERSION}; set resume=never to start afresh."
        )
    for key in ("step", "accelerator_step"):  # counters the resume sets from this file
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"`resume`: {str(state_file)!r} has `{key}` {value!r}, not a whole number of steps; set "
                "resume=never to start afresh."
            )
    return state


def _check_fits(kind: str, expected: dict[str, tuple], found: dict[str, torch.Tensor], folder: Path) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(found[k].shape) != expected[k])
    if missing or extra or wrong:
        detail = "; ".join(
            f"{what} {names[:4]}{' ...' if len(names) > 4 else ''}"
            for what, names in (("missing", missing), ("unexpected", extra), ("wrong shapes", wrong))
            if names
        )
        raise ValueError(
            f"`model`: the {kind} in checkpoint {str(folder)!r} does not fit the configured model ({detail}); "
            "a changed architecture (the `model` section, or a LoRA run's `lora.rank` / `lora.targets`) cannot be "
            "resumed: set resume=never to start a fresh run."
        )


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all()))


def _changed_after_saving(folder: Path, problem: str) -> ValueError:
    return ValueError(
        f"`resume`: checkpoint {str(folder)!r} {problem}; it was changed after it was saved. Move it out of the "
        "checkpoints folder to resume from the one before, or set resume=never."
    )


def _check_optimizer_tensors(per_parameter: dict[str, dict], parameters: dict, folder: Path) -> None:
    """The optimizer's per-parameter tensors fit their parameters and are finite (a moment of another shape failed at
    the first step; a NaN second moment made the first update NaN, reported as a diverged run)."""
    for fqn, values in sorted(per_parameter.items()):
        for name, tensor in sorted(values.items()):
            entry = f"optimizer.safetensors entry '{fqn}:{name}'"
            parameter = parameters.get(fqn)
            if parameter is not None and tensor.ndim and tuple(tensor.shape) != tuple(parameter.shape):
                shape = tuple(parameter.shape)
                raise _changed_after_saving(folder, f"has {entry} of shape {tuple(tensor.shape)}, not {shape}")
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise _changed_after_saving(folder, f"has non-finite (NaN / inf) values in {entry}")
            if name in ("exp_avg_sq", "max_exp_avg_sq") and bool((tensor < 0).any()):
                raise _changed_after_saving(folder, f"has negative values in {entry} (a sum of squares)")
            # a step count below 0 made AdamW's bias correction complex ("result type ComplexFloat") at the first step
            if name == "step" and (tensor.numel() != 1 or tensor.is_complex() or float(tensor) < 0):
                raise _changed_after_saving(folder, f"has {entry} {tensor.tolist()}, not a step count >= 0")


def load_training_state(
    folder: Path, accelerator, model, optimizer, scheduler, ema, trainable_only: bool = False
) -> dict:
    """Restore what :func:`save_training_state` wrote; returns ``trainer_state.json``.
    Reads safetensors and JSON only."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = read_training_state(folder)
    ignored = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if ignored:
        logger.warning("ignoring %s in %s: pickle files are never loaded", ", ".join(ignored), folder)
    unwrapped = bare_model(accelerator, model)
    if bool(state.get("trainable_only", False)) != trainable_only:
        raise ValueError(
            f"`lora`: checkpoint {str(folder)!r} is of a {'LoRA' if not trainable_only else 'full'} run; "
            "set resume=never to start a fresh run."
        )
    shapes = {name: tuple(t.shape) for name, t in unwrapped.state_dict().items()}
    if trainable_only:
        trained = _trainable_names(unwrapped)
        shapes = {name: shape for name, shape in shapes.items() if name in trained}
    model_state = load_file(folder / "model.safetensors")
    _check_fits("model weights", shapes, model_state, folder)
    if non_finite := _non_finite(model_state):  # never saved so (save_checkpoint refuses NaN weights)
        raise _changed_after_saving(folder, f"holds non-finite (NaN / inf) weights ({non_finite[:3]})")
    set_model_state_dict(
        model, model_state, options=_state_dict_options(accelerator, False, strict=not trainable_only)
    )

    optimizer_tensors = load_file(folder / "optimizer.safetensors")
    per_parameter: dict[str, dict] = {}
    for key, tensor in optimizer_tensors.items():
        fqn, name = key.rsplit(":", 1)
        per_parameter.setdefault(fqn, {})[name] = tensor
    _check_optimizer_tensors(per_parameter, dict(unwrapped.named_parameters()), folder)
    for fqn, values in state["optimizer"]["values"].items():
        per_parameter.setdefault(fqn, {}).update(values)
    param_groups = [dict(group) for group in state["optimizer"]["param_groups"]]
    pairs = len(optimizer.optimizer.param_groups)
    if len(param_groups) != pairs and len(param_groups) % pairs == 0:
        # a checkpoint of the earlier layout, a (decayed, not decayed) pair per trained model (a LoRA run with its
        # text encoder): merged into this run's one pair, each group keeping its saved settings
        param_groups = [
            {**param_groups[i], "params": [fqn for group in param_groups[i::pairs] for fqn in group["params"]]}
            for i in range(pairs)
        ]
    implementation = {k: v for k, v in optimizer.optimizer.defaults.items() if k in OPTIMIZER_IMPLEMENTATION_KEYS}
    for group in param_groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        # how this run's optimizer updates (fused on CUDA, not on the CPU), not how the saving run's did: the saved
        # flag would come back with the groups, and a fused optimizer told it is not breaks fp16 loss scaling
        group.update(implementation)
    grouped = {fqn for group in param_groups for fqn in group["params"]}
    trained = {name for name, p in unwrapped.named_parameters() if p.requires_grad}
    if grouped != trained:
        raise ValueError(
            f"`model`: the optimizer state in checkpoint {str(folder)!r} is for other trainable parameters "
            f"(e.g. {sorted(grouped ^ trained)[:3]}); set resume=never to start a fresh run."
        )
    # Not strict: a parameter that never had a gradient (e.g. a Phi layer no scale uses) has no optimizer state to
    # save, and starts without one again, as it would have; the groups were compared above.
    try:
        set_optimizer_state_dict(
            model,
            optimizer.optimizer,
            {"state": per_parameter, "param_groups": param_groups},
            options=_state_dict_options(accelerator, for_save=False, strict=False),
        )
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        # checkpoint_damage checked the structure, not every value torch checks itself. Only this run's own model
        # and optimizer were set so far (the RNG states come last), and the run stops: nothing half-applied outlives it
        raise _changed_after_saving(
            folder, f"has an optimizer state torch cannot load ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    try:
        scheduler.load_state_dict(state["scheduler"])
        rates, groups = len(state["scheduler"]["base_lrs"]), len(optimizer.optimizer.param_groups)
        if rates != groups:  # (its zip() would fail at the first step)
            raise ValueError(f"{rates} base learning rates for {groups} optimizer groups")
    except (KeyError, TypeError, ValueError, IndexError) as err:  # parsed, but not a state of this scheduler
        raise ValueError(
            f"`resume`: the scheduler state in {str(folder / STATE_FILE)!r} does not fit this run's scheduler "
            f"({type(err).__name__}: {err}); it was changed after it was saved. Move the checkpoint out of the "
            "checkpoints folder to resume from the one before, or set resume=never."
        ) from None
    if accelerator.scaler is not None and state.get("grad_scaler"):
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    accelerator.step = int(state["accelerator_step"])  # gradient accumulation's micro-step counter

    if ema is not None:
        if not state.get("ema"):
            raise ValueError(
                f"`ema_decay`: checkpoint {str(folder)!r} was trained without EMA; set ema_decay=null or resume=never."
            )
        shadow = load_file(folder / "ema.safetensors")
        names = state["ema"]["parameters"]
        _check_fits(
            "EMA weights",
            {name: tuple(p.shape) for name, p in unwrapped.named_parameters() if p.requires_grad},
            shadow,
            folder,
        )
        if sorted(names) != sorted(shadow):  # (distinct names: checkpoint_damage)
            raise _changed_after_saving(folder, f"has EMA `parameters` in {STATE_FILE} other than ema.safetensors's")
        if non_finite := _non_finite(shadow):  # the export would be the EMA weights: NaN
            raise _changed_after_saving(folder, f"holds non-finite (NaN / inf) EMA weights ({non_finite[:3]})")
        ema.load_state_dict({**state["ema"]["values"], "shadow_params": [shadow[name] for name in names]})
    if not _load_rng(folder, accelerator.process_index):
        logger.warning(
            "no random state for process %d in %s (it was saved by %d processes): this process continues "
            "with a fresh random state",
            accelerator.process_index,
            folder,
            state.get("num_processes", 0),
        )
    return state
