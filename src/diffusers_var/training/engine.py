"""The training loop, on accelerate: one device, the CPU, or DDP / FSDP through ``accelerate launch``.

Mixed precision, gradient accumulation and checkpointing, EMA weights, warm-up + cosine LR, checkpoints
every N steps (written to a temporary folder and renamed, the last K kept) with automatic resume from
the newest complete one, TensorBoard (when installed) plus a JSONL log, and a final export as a
diffusers folder that the pipelines load directly.

Checkpoints are safetensors + JSON (:mod:`.checkpoint`), never pickles, so resuming a run folder of unknown
origin cannot run code. A resume checks that the config is the one the checkpoint was trained with (``resume``:
``auto`` refuses a changed config naming the keys, ``never`` starts afresh, ``force`` continues with the new one).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

from ..file_utils import is_hub_repo_id, make_folder, write_text_atomic
from .checkpoint import (
    bare_model,
    checkpoint_damage,
    is_training_checkpoint,
    load_training_state,
    read_training_state,
    remove_training_checkpoint,
    save_training_state,
    sync_to_disk,
    written_by_trainer,
)
from .data import BAD_IMAGE_POLICIES, check_data_section
from .text_encoders import TINY_TEXT_ENCODERS

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)\Z")
TEMPORARY_CHECKPOINT = re.compile(r"\.tmp-step-(\d+)\Z")
TASK_NAMES = ("tokenizer", "bitwise_tokenizer", "var", "star", "infinity")
TOKENIZER_TASKS = ("tokenizer", "bitwise_tokenizer")
LR_SCHEDULES = ("cosine", "linear")
LINEAR_SCHEDULE_HOLD = 0.05  # "linear": the share of the post-warm-up steps at the peak rate (the original's lin0)
TEXT_TASKS = ("star", "infinity")
RESUME_MODES = ("auto", "never", "force")
MAX_WORKERS_PER_CPU = 4  # `num_workers` may be at most this many loader processes per CPU of the machine
# data.type hf: the column each task needs (key, what it holds, an example name)
HF_COLUMNS = {
    "var": ("label_column", "class labels", "label"),
    "star": ("caption_column", "captions", "text"),
    "infinity": ("caption_column", "captions", "text"),
}
# the keys that only some tasks read: key -> those tasks (every other key is read by every task; `lora` and
# `tokenizer_precision` have checks of their own). Set for another task, they would do nothing without a word.
TASK_KEYS = {
    "tokenizer_path": ("var", "star", "infinity"),
    "text_encoder_path": TEXT_TASKS,
    "label_smoothing": ("var", "star", "infinity"),
    "cond_drop_rate": ("var", "star", "infinity"),
    "recon_l1_weight": TOKENIZER_TASKS,
    "recon_l2_weight": TOKENIZER_TASKS,
    "vq_loss_weight": ("tokenizer",),
    "bsq_commit_weight": ("bitwise_tokenizer",),
    "bsq_entropy_weight": ("bitwise_tokenizer",),
    "bsq_codebook_entropy_weight": ("bitwise_tokenizer",),
    "bsq_inv_temperature": ("bitwise_tokenizer",),
    "bsc_flip_prob": ("infinity",),
    "bsc_num_scales": ("infinity",),
    "data.cache_tokens": ("var",),
    "data.label_column": ("var",),
    "data.caption_column": TEXT_TASKS,
}
DATA_KEY_DEFAULTS = {"data.cache_tokens": False, "data.label_column": None, "data.caption_column": None}
# keys that may change between a run and its resume: they do not change what is trained
RESUME_SAFE_KEYS = {
    "output_dir",
    "torch_compile",
    "resume",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
    "num_workers",
    "time_limit_minutes",
    "data.bad_images",
}
PATH_KEYS = {"tokenizer_path", "text_encoder_path", "data.path", "lora.base", "model.init_from"}
SECTIONS = ("data", "model", "lora")  # the config keys that hold keys of their own (``data.num_images=500``)
LOCK_FILE = ".diffusers-var-train.lock"  # the run lock (_RunLock); never moved with a run's files, never deleted
RUN_FILES = ("checkpoints", "final", "samples", "logs", "train_log.jsonl", "train_config.json")
FRESH_START_FILES = ("final", "samples", "logs", "train_log.jsonl", "train_config.json")  # what a new run rewrites


@dataclass
class TrainConfig:
    """Everything a run needs; loaded from YAML/JSON (see ``configs/``) with ``key=value`` overrides."""

    task: str = "var"  # tokenizer | bitwise_tokenizer | var | star | infinity
    output_dir: str = "outputs/run"
    data: dict = field(default_factory=lambda: {"type": "shapes", "num_images": 10000})
    # None: the task's default, what its model settings need (tokenizer: the model's image size; bitwise_tokenizer:
    # 64 where Infinity's schedules have it for its VAE, else their smallest square); 64 for the transformer tasks,
    # whose tokenizer fixes it
    resolution: int | None = None
    model: dict = field(default_factory=dict)  # constructor arguments of the trained model
    tokenizer_path: str | None = None  # frozen tokenizer for transformer training
    text_encoder_path: str | None = (
        None  # star / infinity: folder with text_encoder/ + tokenizer/, or tiny-clip / tiny-t5
    )
    batch_size: int = 32
    max_steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    adam_betas: tuple = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    # after the warm-up: "cosine" to min_lr_ratio, or "linear" as the original VAR trainer's lin0 schedule (flat for
    # the first 5% of the remaining steps, then a straight line to min_lr_ratio)
    lr_schedule: str = "cosine"
    grad_clip: float = 2.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    # var / star / infinity: autocast for the frozen image tokenizer's encoder (its quantiser stays float32); fp16
    # keeps TF32's 10-bit mantissa at twice its tensor-core rate
    tokenizer_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    allow_tf32: bool = False  # TF32 for float32 matmuls and convolutions on GPUs (the original VAR trainer's default)
    # torch.compile the trained model (accelerate's inductor backend; `accelerate launch --dynamo_backend inductor`
    # does the same): a minute or so of compiling at the start, then faster steps
    torch_compile: bool = False
    ema_decay: float | None = 0.999  # None: no EMA
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0: no sample images during training
    seed: int = 0
    time_limit_minutes: float | None = None  # stop early (checkpoint + export) once this much wall time is spent
    num_workers: int = 0
    label_smoothing: float = 0.0  # transformer tasks
    cond_drop_rate: float = 0.1  # class / text dropout for classifier-free guidance
    recon_l1_weight: float = 1.0  # tokenizer task
    recon_l2_weight: float = 1.0
    vq_loss_weight: float = 1.0
    bsq_commit_weight: float = 0.25  # bitwise_tokenizer: commitment of the normalised latent to its BSQ code
    bsq_entropy_weight: float = 0.1  # bitwise_tokenizer: entropy penalty (per-sample minus codebook entropy)
    bsq_codebook_entropy_weight: float = 1.0  # bitwise_tokenizer: weight of the codebook term inside the penalty
    bsq_inv_temperature: float = 100.0  # bitwise_tokenizer: sharpness of the soft bit assignment of the entropy terms
    bsc_flip_prob: float = 0.3  # infinity: Bitwise Self-Correction maximum flip probability (0 disables)
    bsc_num_scales: int | None = None  # infinity: scales that get flipped bits (None: all)
    # what to do with a run already in output_dir: "auto" resumes its newest checkpoint when the config is the same
    # (and refuses, naming the differing keys, when it is not), "never" starts afresh, "force" resumes from the
    # checkpoint with the new settings; "never" moves the previous run's files to output_dir/previous-runs/, and
    # "auto" without a checkpoint moves there the files it would rewrite (a train_config.json of the user's own too)
    resume: str = "auto"
    lora: dict | None = None  # LoRA fine-tuning of a pipeline: lora.base, lora.rank, ... (diffusers_var.training.lora)

    def __post_init__(self):
        if self.resolution is None:  # resolved here, so a run's recorded config holds the size it trains at
            from .tasks import default_resolution

            self.resolution = default_resolution(self.task, self.model)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
        values: dict[str, Any] = {}
        if path is not None:
            try:
                values = _parse_config(Path(path))
            except (OSError, ValueError) as err:
                reason = " ".join(f"{type(err).__name__}: {err}".split())  # YAML's messages span lines
                raise ValueError(f"`--config`: cannot read {str(path)!r} ({reason})") from None
            if not isinstance(values, dict):
                raise ValueError(
                    f"`--config`: {str(path)!r} must hold a mapping of config keys, not a {type(values).__name__}."
                )
        known = {f.name for f in fields(cls)}
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(
                    f"override {item!r} must look like key=value (e.g. max_steps=100 or data.num_images=500)."
                )
            key, raw = item.split("=", 1)
            _set_override(values, key, _override_value(raw), known)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(known)}.")
        for name in ("data", "model"):
            if name in values and not isinstance(values[name], dict):
                raise ValueError(f"`{name}` must be a mapping (e.g. {name}.key=value), got {values[name]!r}.")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check every value (types and ranges) and name the key in the error; integral floats become ints."""
        if self.task not in TASK_NAMES:
            raise ValueError(f"`task` must be one of {', '.join(repr(t) for t in TASK_NAMES)}, got {self.task!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"`lr_schedule` must be one of {', '.join(repr(s) for s in LR_SCHEDULES)}, got {self.lr_schedule!r}."
            )
        for name in ("mixed_precision", "tokenizer_precision"):
            if getattr(self, name) not in ("no", "bf16", "fp16"):
                raise ValueError(f"`{name}` must be 'no', 'bf16' or 'fp16', got {getattr(self, name)!r}.")
        if self.tokenizer_precision != "no" and self.task in TOKENIZER_TASKS:
            raise ValueError(
                f"`tokenizer_precision` applies to the frozen tokenizer of var / star / infinity; task "
                f"{self.task!r} trains the tokenizer itself under `mixed_precision`."
            )
        if self.resume not in RESUME_MODES:
            raise ValueError(
                f"`resume` must be one of {', '.join(repr(m) for m in RESUME_MODES)}, got {self.resume!r}."
            )
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"`output_dir` must be a folder path, got {self.output_dir!r}.")
        self._expand_home()
        for name in ("data", "model"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"`{name}` must be a mapping, got {getattr(self, name)!r}.")  # noqa: TRY004 - config errors are ValueErrors
        bad_images = self.data.get("bad_images", "skip")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(
                f"`data.bad_images` must be one of {', '.join(repr(p) for p in BAD_IMAGE_POLICIES)}, "
                f"got {bad_images!r}."
            )
        self.data = check_data_section(self.data)
        # the column the task's loss reads (no name is assumed): missing, the run failed at its first batch
        needed = HF_COLUMNS.get(self.task)
        if self.data.get("type") == "hf" and needed and not self.data.get(needed[0]):
            column, what, example = needed
            raise ValueError(
                f"`data.{column}` is required for `task: {self.task}` with `data.type: hf`: the dataset column "
                f"holding the {what} (e.g. data.{column}={example})."
            )
        for name in ("gradient_checkpointing", "allow_tf32", "torch_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(  # noqa: TRY004 - every config error is a ValueError (the command line prints those)
                    f"`{name}` must be true or false, got {getattr(self, name)!r}."
                )
        for name in (
            "batch_size",
            "max_steps",
            "gradient_accumulation_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "resolution",
        ):
            self._check(name, integer=True, low=1)
        for name in ("warmup_steps", "sample_every"):
            self._check(name, integer=True, low=0)
        # each loader worker is a process of its own: an unbounded count forked until the machine gave out
        cpus = os.cpu_count() or 1
        self._check(
            "num_workers",
            integer=True,
            low=0,
            high=MAX_WORKERS_PER_CPU * cpus,
            hint=f" ({MAX_WORKERS_PER_CPU} x the {cpus} CPU(s) of this machine)",
        )
        self._check("seed", integer=True, low=0, high=2**32 - 1)  # numpy's seed range
        self._check("bsc_num_scales", integer=True, low=0, optional=True)
        self._check("learning_rate", low=0, low_open=True)
        self._check("grad_clip", low=0, low_open=True)
        self._check("time_limit_minutes", low=0, low_open=True, optional=True)
        self._check("ema_decay", low=0, high=1, low_open=True, high_open=True, optional=True, hint=" (null: no EMA)")
        self._check("weight_decay", low=0)
        self._check("min_lr_ratio", low=0, high=1)
        for name in ("cond_drop_rate", "bsc_flip_prob", "label_smoothing"):
            self._check(name, low=0, high=1)
        for name in (
            "recon_l1_weight",
            "recon_l2_weight",
            "vq_loss_weight",
            "bsq_commit_weight",
            "bsq_entropy_weight",
            "bsq_codebook_entropy_weight",
        ):
            self._check(name, low=0)
        self._check("bsq_inv_temperature", low=0, low_open=True)
        betas = self.adam_betas
        if not (
            isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"`adam_betas` must be two numbers in [0, 1), e.g. [0.9, 0.95], got {betas!r}.")
        self.adam_betas = tuple(float(b) for b in betas)
        self._check_task_keys()
        if self.lora is not None:
            from .lora import LoraSettings

            LoraSettings.parse(self.lora, self.task)
            for name in ("tokenizer_path", "text_encoder_path"):
                # the adapter is loaded into lora.base, so it must learn on that pipeline's own components
                if getattr(self, name) is not None:
                    part = "tokenizer" if name == "tokenizer_path" else "text encoder"
                    raise ValueError(
                        f"`{name}`: a LoRA run trains on the {part} of `lora.base`, the pipeline its adapter is "
                        f"loaded into; remove `{name}` (set: {getattr(self, name)!r})."
                    )
        elif self.task not in TOKENIZER_TASKS and not self.tokenizer_path:
            kind = "BitwiseMultiScaleVAE" if self.task == "infinity" else "MultiScaleVQModel"
            raise ValueError(f"`tokenizer_path` (a trained {kind} folder) is required for `task: {self.task}`.")
        if self.task in TEXT_TASKS and not self.text_encoder_path and self.lora is None:
            raise ValueError(
                f"`text_encoder_path` is required for `task: {self.task}`: a folder with `text_encoder/` and "
                "`tokenizer/` sub-folders (or a plain transformers model folder), or 'tiny-clip' / 'tiny-t5' "
                "(see diffusers_var.training.text_encoders)."
            )
        from .tasks import check_model_section

        check_model_section(self)
        self._check_paths()

    def _expand_home(self) -> None:
        """A leading ``~`` of a path key is the home folder, as the command line's path flags read it (a config
        file's ``output_dir: ~/runs/x`` made a folder named ``~`` in the current one)."""

        def expanded(value):
            return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value

        for name in ("output_dir", "tokenizer_path", "text_encoder_path"):
            setattr(self, name, expanded(getattr(self, name)))
        for section, key in (("data", "path"), ("model", "init_from"), ("lora", "base")):
            values = getattr(self, section)
            if isinstance(values, dict) and expanded(values.get(key)) != values.get(key):
                setattr(self, section, {**values, key: expanded(values[key])})  # a copy: the caller's dict stays

    def _check_task_keys(self) -> None:
        """A key that the task does not read, set to other than its default, is an error naming the key and the
        tasks that read it (README: every value is checked; `bsc_flip_prob` on a STAR run did nothing)."""
        defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
        for key, tasks in TASK_KEYS.items():
            if self.task in tasks:
                continue
            if key.startswith("data."):
                value, default = self.data.get(key[5:], DATA_KEY_DEFAULTS[key]), DATA_KEY_DEFAULTS[key]
            else:
                value, default = getattr(self, key), defaults[key]
            if value != default:
                raise ValueError(
                    f"`{key}` ({value!r}) is not read by `task: {self.task}`, only by {', '.join(tasks)}; remove it "
                    f"(or set it to its default, {default!r})."
                )

    def _check_paths(self) -> None:
        """Path-valued keys name places that exist (a loader would fail deep inside diffusers / huggingface_hub,
        e.g. with its "couldn't connect to huggingface.co" text), and ``output_dir`` is or can become a folder."""
        if self.tokenizer_path:
            _check_folder("tokenizer_path", self.tokenizer_path, hub_ids=True)
        if self.text_encoder_path and self.text_encoder_path not in TINY_TEXT_ENCODERS:
            _check_folder("text_encoder_path", self.text_encoder_path)
        if self.model.get("init_from") is not None:
            _check_folder("model.init_from", self.model["init_from"], hub_ids=True)
        kind = self.data.get("type", "imagefolder")
        if kind != "shapes":  # imagefolder: a folder; hf: a saved dataset folder, or a dataset name on the Hub
            _check_folder("data.path", self.data["path"], hub_ids=kind == "hf", bare_names=kind == "hf")
        output_dir = Path(self.output_dir)
        if kind == "imagefolder" and output_dir.resolve().is_relative_to(Path(self.data["path"]).resolve()):
            raise ValueError(  # its sample grids would become training images (and a class) of the next run
                f"`output_dir` {str(output_dir)!r} is inside `data.path` {self.data['path']!r}: put the run folder "
                "next to the images, not among them."
            )
        if output_dir.is_symlink() and not output_dir.exists():
            raise ValueError(f"`output_dir`: {str(output_dir)!r} is a broken symbolic link.")
        if output_dir.exists() and not output_dir.is_dir():
            raise ValueError(
                f"`output_dir`: {str(output_dir)!r} is a file, not a folder (the run folder, created when missing)."
            )
        from ..conversion.common import folder_problem

        problem = folder_problem(output_dir)  # its nearest existing parent: a folder, writable
        if problem:
            raise ValueError(f"`output_dir`: {str(output_dir)!r} cannot be created as a folder: {problem}.")

    def _check(
        self,
        name: str,
        integer: bool = False,
        low=None,
        high=None,
        low_open: bool = False,
        high_open: bool = False,
        optional: bool = False,
        hint: str = "",
    ) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        ok = _is_number(value) and (not integer or float(value).is_integer())
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            kind = "a whole number" if integer else "a number"
            bounds = [
                f"{'>' if low_open else '>='} {low}" if low is not None else "",
                f"{'<' if high_open else '<='} {high}" if high is not None else "",
            ]
            if isinstance(value, str) and _is_float_text(value):  # PyYAML reads 1e-4 (no dot) as text
                hint += f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-4)"
            raise ValueError(
                f"`{name}` must be {kind} {' and '.join(b for b in bounds if b)}{' or null' if optional else ''}"
                f"{hint}, got {value!r}."
            )
        setattr(self, name, int(value) if integer else float(value))


def _is_float_text(text: str) -> bool:
    """Whether ``text`` is a finite number that YAML read as a string (``1e-4``, no dot); nan / inf are not."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _section_defaults() -> dict[str, dict]:
    """The default of each section of keys (``data``, ``model``): what a dotted override of a section that neither
    the config file nor an earlier override gave is merged into."""
    return {f.name: f.default_factory() for f in fields(TrainConfig) if f.default_factory is not MISSING}


def _override_value(raw: str):
    """An override's value: JSON (``100``, ``null``, ``[0.9, 0.95]``), a list or mapping in YAML's flow style
    without quotes (``[to_q, to_k]``, as in a config file), else the text itself (a path may begin with ``[``)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    if raw.strip().startswith(("[", "{")):
        import yaml

        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        if isinstance(value, (list, dict)):
            return value
    return raw


def _set_override(values: dict, key: str, value, known: set[str]) -> None:
    """Apply one ``key=value`` override. A dotted key sets only that key of its section and keeps the others (the
    config file's section, else the default one: ``data.num_images=500`` alone still trains on the shapes);
    ``section=...`` without a dot replaces the whole section."""
    *parents, leaf = key.split(".")
    if not all(parents) or not leaf:
        raise ValueError(f"override {key}=...: {key!r} is not a config key (e.g. max_steps or data.num_images).")
    if parents and parents[0] in known and parents[0] not in SECTIONS:
        raise ValueError(
            f"override `{key}`: `{parents[0]}` takes a single value, not keys; sections of keys are "
            f"{', '.join(f'`{s}`' for s in SECTIONS)}."
        )
    target = values
    for depth, parent in enumerate(parents):
        current = target.get(parent)
        if current is None:
            default = _section_defaults().get(parent) if depth == 0 else None
            target[parent] = current = copy.deepcopy(default) if isinstance(default, dict) else {}
        elif not isinstance(current, dict):
            section = ".".join(parents[: depth + 1])
            raise ValueError(
                f"override `{key}`: `{section}` is {current!r}, not a mapping of keys, so it has no key "
                f"{'.'.join(parents[depth + 1 :] + [leaf])!r} (set `{section}=...` itself)."
            )
        target = current
    target[leaf] = value


def _check_folder(key: str, value, hub_ids: bool = False, bare_names: bool = False) -> None:
    """``value`` of the path-valued config key ``key`` is an existing folder (or, where the loader also takes Hub
    ids, shaped like one: its download is left to the loader, whose errors name the key as well)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"`{key}` must be a folder path, got {value!r}.")
    path = Path(value)
    if path.is_dir():
        return
    if path.exists():
        raise ValueError(f"`{key}`: {str(value)!r} is a file, not a folder.")
    # "org/name": a model on the Hub, which from_pretrained looks up when no such local folder exists; datasets
    # also have bare names ("mnist")
    if (hub_ids or bare_names) and is_hub_repo_id(str(value), bare_names=bare_names):
        return
    where = "" if path.is_absolute() else f" under the current folder {os.getcwd()!r}"
    raise ValueError(f"`{key}`: {str(value)!r} does not exist (no such folder{where}).")


def _check_finite_loss(accelerator, loss: torch.Tensor, step: int) -> None:
    """Stop a run whose loss is NaN or infinite on any process before it is logged, checkpointed or exported."""
    _stop_if_diverged(accelerator, torch.isfinite(loss.detach()), "loss is", step)


def _check_finite_weights(accelerator, parameters, step: int) -> None:
    """Stop before NaN or infinite trained weights are checkpointed."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in parameters]  # FSDP: shards
    finite = torch.stack([p.isfinite().all() for p in local]).all() if local else torch.tensor(True)
    _stop_if_diverged(accelerator, finite, "trained weights are", step)


def _stop_if_diverged(accelerator, finite: torch.Tensor, what: str, step: int) -> None:
    """A ValueError when ``finite`` (a bool scalar) is False on any process: all agree, or the others would hang.
    The checkpoints saved so far are kept."""
    if not bool(accelerator.gather(finite.reshape(1).to(accelerator.device)).all()):
        raise ValueError(
            f"the {what} NaN or infinite at step {step} (training diverged); nothing of this step was saved and the "
            "checkpoints before it are kept: lower `learning_rate` (or the loss weights, or `lora.alpha`) and train "
            "again."
        )


def _is_number(value) -> bool:
    """A finite int or float (not a bool, a string or NaN: ``key=abc`` overrides arrive as strings)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _StepCounter:
    """Global optimisation step (saved in ``trainer_state.json`` of each checkpoint)."""

    def __init__(self):
        self.step = 0


def checkpoints_newest_first(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint folders the trainer wrote (whole or damaged), newest first (temporary ones, from an interrupted
    save, are ignored, and so is a file or folder of yours that only has a checkpoint's name)."""
    checkpoint_dir = Path(checkpoint_dir)  # a str too (it raised AttributeError)
    if not checkpoint_dir.is_dir():
        return []
    done = [
        (int(m.group(1)), p)
        for p in checkpoint_dir.iterdir()
        if (m := CHECKPOINT_PATTERN.match(p.name)) and written_by_trainer(p)
    ]
    return [path for _, path in sorted(done, reverse=True)]


def _check_checkpoint_paths_free(config: TrainConfig, checkpoint_dir: Path, start: int) -> None:
    """A ``ValueError`` (before anything is trained) when a file or folder the trainer did not write has the name of a
    checkpoint this run will save after step ``start``: the save would fail after the training (or replace an empty
    folder of yours). With a time limit any step may be the last one saved."""
    if not checkpoint_dir.is_dir():
        return
    for path in sorted(checkpoint_dir.iterdir()):
        temporary = TEMPORARY_CHECKPOINT.match(path.name)
        m = CHECKPOINT_PATTERN.match(path.name) or temporary
        # (a temporary folder is an interrupted save of ours, possibly still empty: the clean-up of unfinished saves
        # takes it away or aside)
        if not m or (temporary and path.is_dir()):
            continue
        step = int(m.group(1))
        if not start < step <= config.max_steps:
            continue
        saved = step % config.checkpoint_every == 0 or step == config.max_steps or config.time_limit_minutes
        if saved and not (path.is_dir() and written_by_trainer(path)):
            kind = "folder" if path.is_dir() else "file"
            raise ValueError(
                f"`output_dir`: the run saves its step-{step} checkpoint as {str(path)!r}, but a {kind} the trainer "
                "did not write is there; move or rename it (it is left alone), or use another output_dir."
            )


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` of the trainer's checkpoints, by step number, and the trainer's damaged
    checkpoint folders older than the last one kept (a pruning killed after it removed the state file left one: no
    longer a checkpoint, it was never pruned again). A file or folder that only has a checkpoint's name is not one: it
    is neither counted nor touched; files of someone else in a checkpoint are kept (with its folder)."""
    written = checkpoints_newest_first(checkpoint_dir)  # whole or damaged
    whole = [path for path in written if is_training_checkpoint(path)]
    if len(whole) < keep:
        return
    for old in written[written.index(whole[keep - 1]) + 1 :]:  # (keep_checkpoints >= 1)
        kept = remove_training_checkpoint(old)
        if kept:
            print(f"pruned checkpoint {old.name}, but kept its files {kept} (not written by the trainer)")


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint folder (temporary ones, from an interrupted save, are ignored)."""
    found = checkpoints_newest_first(checkpoint_dir)
    return found[0] if found else None


def resumable_checkpoint(checkpoint_dir: str | os.PathLike, is_main: bool = True) -> Path | None:
    """The newest checkpoint that is whole: a damaged one (a file missing or cut short, say by a full disk or a
    copy) is skipped with a warning and left where it is, and the one before it is used; all damaged is an error."""
    damaged = []
    for checkpoint in checkpoints_newest_first(checkpoint_dir):
        problem = checkpoint_damage(checkpoint)
        if problem is None:
            if damaged and is_main:
                skipped = "; ".join(f"{path.name}: {why}" for path, why in damaged)
                print(f"warning: resuming from {checkpoint.name}; skipped damaged checkpoints (kept): {skipped}")
            return checkpoint
        damaged.append((checkpoint, problem))
    if damaged:
        details = "; ".join(f"{path.name}: {why}" for path, why in damaged)
        raise ValueError(
            f"`resume`: every checkpoint in {str(checkpoint_dir)!r} is damaged ({details}); set resume=never to "
            "start a fresh run (the previous run's files are moved aside, nothing is deleted)."
        )
    return None


def _unsharded_copy(sharded, full_state: dict):
    """A plain (unsharded) instance of an FSDP-wrapped diffusers model holding ``full_state``. FSDP2 swaps the
    module's class for a subclass of ``FSDPModule``; the export needs the original class and full tensors."""
    from diffusers import ModelMixin

    plain_class = next(c for c in type(sharded).__mro__ if issubclass(c, ModelMixin) and "FSDP" not in c.__name__)
    copy = plain_class.from_config(sharded.config)
    copy.load_state_dict(full_state)
    return copy.eval()


def _fault_injection(event: str, step: int) -> None:
    """Test hook: DIFFUSERS_VAR_FAULT_INJECT=event:step SIGKILLs this process there (resume tests)."""
    spec = os.environ.get("DIFFUSERS_VAR_FAULT_INJECT")
    if spec and spec == f"{event}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        after_warmup = step - config.warmup_steps
        if config.lr_schedule == "linear":  # lin0 reaches the end at the last step (max_steps - 1)
            progress = min(1.0, after_warmup / max(1, config.max_steps - 1 - config.warmup_steps))
            shape = min(1.0, (1 - progress) / (1 - LINEAR_SCHEDULE_HOLD))
        else:
            progress = min(1.0, after_warmup / max(1, config.max_steps - config.warmup_steps))
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape

    return factor


# our names of the originals' no-decay keys (pos_1LC / pos_start, lvl_embed, scale_mul, ada_gss, cfg_uncond, mat_q)
NO_WEIGHT_DECAY = ("pos_", "level_embedding", "log_scale", "adaln_offset", "uncond_text_embeds", "learned_query")


def _param_groups(models: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """The trainable parameters of ``models`` in two groups, decayed first: no weight decay where the original
    trainers have none (their ``nowd_keys``): biases, norms and other 1-d parameters, position and level tables, the
    attention's head scales, AdaLN offsets, Infinity's learned unconditional text and text-pooling query; the class
    embedding is decayed, as VAR's trainer does. One pair for all models: a LoRA run (the transformer's and the text
    encoder's adapters) has no parameter without decay, and torch's checkpoint loader accepts one empty group, not
    two."""
    decay, no_decay = [], []
    for model in models:
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            skip = param.ndim < 2 or any(k in name for k in NO_WEIGHT_DECAY)
            (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], config: TrainConfig, device: torch.device, fsdp: bool) -> torch.optim.AdamW:
    """AdamW, fused on CUDA as in the original trainers: one kernel for the update, and with fp16 loss scaling the
    overflow check stays on the GPU (the kernel skips the update itself, so accelerate's ``step_was_skipped`` stays
    False; the schedule steps with the step count either way). FSDP keeps the multi-tensor update."""
    fused = torch.device(device).type == "cuda" and not fsdp
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=tuple(config.adam_betas), **({"fused": True} if fused else {})
    )


def _flat(values: dict, prefix: str = "") -> dict:
    """``{"data": {"path": x}}`` -> ``{"data.path": x}`` (lists and tuples stay values)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _parse_config(path: Path) -> Any:
    """A config file's values: YAML (``.yaml`` / ``.yml``) or JSON; a YAML error (no ValueError) as a ValueError."""
    text = path.read_text()
    if not str(path).endswith((".yaml", ".yml")):
        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from None


def _config_snapshot(config: TrainConfig) -> dict:
    """The config as JSON values (what ``train_config.json`` and each checkpoint hold)."""
    return json.loads(json.dumps(asdict(config), default=list))


def config_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """Keys whose values differ between a checkpoint's config and the current one: ``{key: (old, new)}``, nested keys
    dotted (``model.depth``). Keys missing from ``saved`` (an older version) compare against their defaults, a
    section as a whole (the default ``data`` section's keys are not the keys of a run's own ``data`` section);
    :data:`RESUME_SAFE_KEYS` are ignored; path keys naming the same place (relative / absolute) are equal."""
    old, new = _flat({**_config_snapshot(TrainConfig()), **saved}), _flat(current)
    differences = {}
    for key in sorted(set(old) | set(new)):
        if key in RESUME_SAFE_KEYS or key.split(".")[0] in RESUME_SAFE_KEYS:
            continue
        if key in TASK_KEYS and new.get("task") not in TASK_KEYS[key]:  # a run saved before such keys were refused
            continue
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if (
            key in PATH_KEYS
            and isinstance(a, str)
            and isinstance(b, str)
            and os.path.realpath(a) == os.path.realpath(b)
        ):
            continue
        differences[key] = (a, b)
    return differences


def input_fingerprints(config: TrainConfig) -> dict[str, dict]:
    """What the path keys of ``config`` point to as the run starts, recorded in each checkpoint for the resume to
    compare (the config holds only the path strings: a tokenizer folder replaced by another at the same path resumed
    without a word). A model folder a resume reads (``tokenizer_path``, ``text_encoder_path``, ``lora.base``):
    its resolved path and a digest of its files (``generate``'s: names, sizes, the small files' contents, the first and
    last MiB of the weights). ``data.path``: its resolved path (an image folder may hold millions of files; their
    contents are not read). Hub ids and the built-in text encoders' names are left out (their strings are compared)."""
    from ..sample import model_files_digest

    inputs = {}
    for key, value in _flat(_config_snapshot(config)).items():
        if (
            key not in PATH_KEYS
            or not isinstance(value, str)
            or value in TINY_TEXT_ENCODERS
            or not os.path.isdir(value)
        ):
            continue
        if key == "model.init_from":  # a resume replaces its weights by the checkpoint's (its string is compared)
            continue
        path = Path(value).resolve()
        inputs[key] = {"path": str(path)}
        if key != "data.path":
            inputs[key]["files"] = model_files_digest(path, edges=True, leave_out=Path(config.output_dir))
    return inputs


def input_differences(recorded: dict, current: dict[str, dict]) -> dict[str, str]:
    """The keys whose folders are not those the resumed run recorded (:func:`input_fingerprints`), each with what
    changed. A model folder's files count, not its path (a copy or a moved folder is the same model); ``data.path``
    is compared resolved (a relative path resumed from another working folder names other images)."""
    changes = {}
    for key, old in recorded.items():
        if key not in PATH_KEYS or not isinstance(old, dict) or not isinstance(old.get("path"), str):
            continue  # (not of this version: its path string was compared)
        new = current.get(key)
        if new is None:
            changes[key] = f"{old['path']!r} when the run started, now no local folder"
        elif key == "data.path" and new["path"] != old["path"]:
            changes[key] = f"{old['path']!r} when the run started, now {new['path']!r}"
        elif key != "data.path" and new.get("files") != old.get("files"):
            moved = "" if new["path"] == old["path"] else f" (then at {old['path']!r})"
            changes[key] = (
                f"the files of {new['path']!r} are not those the run started with{moved}: another model, or its "
                "weights or configs replaced"
            )
    return changes


def _move_previous_run(output_dir: Path, names=RUN_FILES) -> Path | None:
    """A fresh start: move an earlier run's files ``names`` to ``output_dir/previous-runs/<time>/`` (nothing is
    deleted or replaced: ``resume=never`` moves them all, a fresh start otherwise those the run would rewrite, such as
    ``train_config.json``, which may be the user's own)."""
    present = [output_dir / name for name in names if (output_dir / name).exists()]
    if not present:
        return None
    base = output_dir / "previous-runs" / time.strftime("%Y%m%d-%H%M%S")
    target, n = base, 1
    while target.exists():
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    make_folder(target, "output_dir")  # (a file named previous-runs: a ValueError, not NotADirectoryError)
    for path in present:
        os.replace(path, target / path.name)
    return target


def _check_inputs_stay(config: TrainConfig, output_dir: Path) -> None:
    """A fresh start moves an earlier run's files aside (:func:`_move_previous_run`): a model folder the config reads
    inside one of them (``output_dir=tokrun`` with ``tokenizer_path=tokrun/final``) would go to previous-runs/, and
    the config would name nothing from then on. A ``ValueError`` naming the key, before anything is moved."""
    names = RUN_FILES if config.resume == "never" else FRESH_START_FILES
    moved = [(output_dir / name).resolve() for name in names if (output_dir / name).exists()]
    lora_base = config.lora.get("base") if isinstance(config.lora, dict) else None
    for key, value in (
        ("tokenizer_path", config.tokenizer_path),
        ("text_encoder_path", config.text_encoder_path),
        ("lora.base", lora_base),
        ("model.init_from", config.model.get("init_from")),
    ):
        if not isinstance(value, str) or value in TINY_TEXT_ENCODERS or not os.path.exists(value):
            continue
        path = Path(value).resolve()
        inside = next((target for target in moved if path.is_relative_to(target)), None)
        if inside is not None:
            raise ValueError(
                f"`{key}` {value!r} is inside {str(inside)!r}, which this fresh start (resume={config.resume}) would "
                f"move to {str(output_dir / 'previous-runs')!r} with the earlier run's files; use another output_dir "
                f"(or copy the model out of it first)."
            )


def _forget_other_precision(mixed_precision: str, world_size: int) -> None:
    """A second ``train()`` in one process (a notebook) with another ``mixed_precision``: accelerate keeps the first
    run's for the whole process and refuses any other. A lone process starts accelerate's state afresh instead;
    launched processes run one training each and keep theirs."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if world_size == 1 and shared and shared.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()


def _resume_point(
    config: TrainConfig, output_dir: Path, is_main: bool, inputs: dict[str, dict]
) -> tuple[Path | None, int]:
    """The checkpoint to resume from and its step (``(None, 0)``: start afresh), following ``config.resume``
    (``inputs``: the run's :func:`input_fingerprints`). Every process reads the same folder and comes to the same
    answer; nothing is moved here (``resume=never`` moves the previous run aside only once every check has passed, see
    :func:`train`)."""
    if config.resume == "never":
        return None, 0
    checkpoint = resumable_checkpoint(output_dir / "checkpoints", is_main)
    if checkpoint is None:
        return None, 0
    saved = read_training_state(checkpoint)  # refuses a checkpoint of accelerate's pickle format
    # past max_steps the loop would not run: the checkpoint's weights exported as final/ under a config saying fewer
    # steps (max_steps equal to the step: a finished run exports its last checkpoint again)
    step = saved["step"]
    if step > config.max_steps:
        raise ValueError(
            f"`max_steps` {config.max_steps} is below the step {step} of the checkpoint this run would resume from, "
            f"{str(checkpoint)!r}; set max_steps >= {step} to continue it (max_steps={step} exports it again), "
            "resume=never to start a fresh run (the previous run's files are moved to previous-runs/), or use "
            "another output_dir."
        )
    differences = {
        key: f"{old!r} -> {new!r}"
        for key, (old, new) in config_differences(saved.get("config") or {}, _config_snapshot(config)).items()
    }
    recorded = saved.get("inputs") if isinstance(saved.get("inputs"), dict) else {}
    for key in set(recorded) & set(inputs):  # what the paths point to is compared instead of their strings
        differences.pop(key, None)
    differences = dict(sorted({**differences, **input_differences(recorded, inputs)}.items()))
    if differences and config.resume == "auto":
        changes = ", ".join(f"{key} {change}" for key, change in differences.items())
        raise ValueError(
            f"`resume`: the config differs from the run being resumed in {str(output_dir)!r} (checkpoint "
            f"{checkpoint.name}): {changes}. Set resume=never to start a fresh run (the previous run's files "
            "are moved to previous-runs/), resume=force to continue from the checkpoint with the new "
            "settings, or use another output_dir."
        )
    if differences and is_main:
        print(f"resume=force: continuing {checkpoint.name} with changed {', '.join(differences)}")
    return checkpoint, step


def _apply_hyperparameters(optimizer, scheduler, config: TrainConfig, ema=None) -> None:
    """``resume=force``: the loaded optimizer / scheduler / EMA carry the old run's hyper-parameters; put the current
    config's in (learning rate and its schedule, weight decay of the decayed group, betas, the EMA decay)."""
    if ema is not None:  # the loaded state set the old decay, while train_config.json records the new one
        ema.decay = config.ema_decay
    factor = _lr_lambda(config)
    for index, group in enumerate(optimizer.param_groups):
        group["weight_decay"] = config.weight_decay if index == 0 else 0.0  # _param_groups: the decayed group first
        group["betas"] = tuple(config.adam_betas)
        group["initial_lr"] = config.learning_rate
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.base_lrs = [config.learning_rate] * len(optimizer.param_groups)
    inner._last_lr = [config.learning_rate * factor(inner.last_epoch)] * len(optimizer.param_groups)
    for group, lr in zip(optimizer.param_groups, inner._last_lr):
        group["lr"] = lr


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.current_accelerator() is not None
    return torch.cuda.is_available()


def _cut_log_after(log_file: Path, step: int) -> None:
    """Resuming from the checkpoint of ``step`` runs the steps after it again: their records (and a line a kill left
    half written, or bytes that are not UTF-8) leave the JSONL log, which then holds each step once."""
    if not log_file.is_file():
        return
    kept = []
    for raw in log_file.read_bytes().splitlines():  # line by line: undecodable bytes are damage of their line only
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except ValueError:  # (UnicodeDecodeError is one)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            kept.append(line)
    write_text_atomic(log_file, "".join(f"{line}\n" for line in kept))


class _RunLock:
    """An exclusive ``flock`` on ``OUTPUT_DIR/.diffusers-var-train.lock``, held by the main process for the whole run:
    a second run in the same folder would resume from the checkpoints of the first while it writes them. The kernel
    releases it when the process ends, however it ends (a lock file left behind locks nothing)."""

    def __init__(self):
        self.descriptor = None

    def acquire(self, output_dir: Path, create: bool) -> None:
        """Take the lock (no-op when held); ``create=False`` only where the lock file exists (the checks before the
        output folder is changed create nothing). A ``ValueError`` when another process holds it."""
        if self.descriptor is not None or fcntl is None:
            return
        path = output_dir / LOCK_FILE
        try:
            descriptor = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            if create:
                raise
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ValueError(
                f"`output_dir`: another training run is using {str(output_dir)!r} (it holds {LOCK_FILE}); wait for it "
                "to end, or use another output_dir."
            ) from None
        except OSError as err:  # a file system without flock (some network mounts): train, unguarded
            os.close(descriptor)
            print(f"warning: cannot lock {str(path)!r} ({err}); make sure no other run uses this output_dir")
            return
        self.descriptor = descriptor

    def release(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing the only descriptor of the file releases the flock
            self.descriptor = None


def train(config: TrainConfig) -> Path:
    """Run (or resume) training; returns the exported folder."""
    lock = _RunLock()
    try:
        return _train(config, lock)
    finally:
        lock.release()  # a second run in this process (a notebook) may take the folder


def _train(config: TrainConfig, lock: _RunLock) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        DistributedType,
        ProjectConfiguration,
        set_seed,
    )

    from ..conversion.common import ConversionError, check_output_dir, clean_stale_staging
    from . import lora
    from .tasks import build_task, has_unused_parameters

    # also for a TrainConfig built in Python; like every check below, before anything in output_dir is changed
    config.validate()
    lora_settings = lora.settings_of(config)

    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    trackers = []
    try:
        import tensorboard  # noqa: F401

        trackers = ["tensorboard"]
    except ImportError:
        pass
    # `accelerate launch` with several processes on a machine without a GPU (e.g. configs/accelerate_ddp.yaml on a
    # laptop): accelerate would make each process a separate single-device run, all writing the same folder. Ask for
    # its CPU mode instead, which joins them into one DDP run over gloo.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = world_size > 1 and not _has_accelerator_device()
    if config.mixed_precision == "fp16" and not _has_accelerator_device():  # accelerate would train in float32
        raise ValueError(
            "`mixed_precision` 'fp16' needs a GPU: on the CPU accelerate trains in float32 instead. Use 'bf16' or "
            "'no' here."
        )
    _forget_other_precision(config.mixed_precision, world_size)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # batches from pinned host memory, copied while the previous step runs
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        log_with=trackers or None,
        # one scheduler step per optimizer step on any number of GPUs (accelerate's default steps it once per
        # process, which ran the warm-up + cosine schedule twice as fast under 2-GPU DDP)
        step_scheduler_with_optimizer=False,
        # only then: DDP's search for unused parameters costs a pass over the graph at every step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        if has_unused_parameters(config)
        else None,
    )
    if accelerator.num_processes != world_size:  # never let independent runs share one output folder
        raise ValueError(
            f"`accelerate launch` started {world_size} processes, but accelerate set up "
            f"{accelerator.num_processes} ({accelerator.distributed_type.value}); they would train "
            "separately into the same output_dir. Check the launch config (num_processes, GPUs available)."
        )
    if on_cpu:
        accelerator.print(f"no GPU: the {world_size} processes train together on the CPU (DDP over gloo)")
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    set_seed(config.seed)
    if accelerator.distributed_type == DistributedType.FSDP:
        if config.ema_decay:  # each rank would average its own shard only
            raise ValueError(
                "`ema_decay`: EMA weights are not supported under FSDP (each rank averages its own shard); "
                "set ema_decay=null or train with DDP."
            )
        if config.sample_every:  # sampling a sharded model needs every rank, the sample grid is drawn on rank 0
            raise ValueError("`sample_every`: sample grids are not drawn under FSDP; set sample_every=0.")
        if lora_settings is not None:
            raise ValueError(
                "`lora`: LoRA fine-tuning runs under DDP (each GPU holds the frozen base model), not FSDP."
            )
    snapshot = _config_snapshot(config)  # before a time limit shortens max_steps
    if accelerator.is_main_process and output_dir.is_dir():  # a folder a run may be using: it is ours from here
        lock.acquire(output_dir, create=False)
    inputs = input_fingerprints(config)  # what the paths point to now: a resume compares, each checkpoint records
    resume_from, resume_step = _resume_point(config, output_dir, accelerator.is_main_process, inputs)
    if config.resume != "never":  # (with resume=never a previous export is moved aside, not replaced)
        # refuse now rather than after training
        check_output_dir(output_dir / "final", overwrite=True, name="output_dir", replacer="the run's final export")
        if checkpoint_dir.exists() and not checkpoint_dir.is_dir():  # (resume=never moves it aside with the run)
            raise ValueError(f"`output_dir`: {str(checkpoint_dir)!r} is a file, not the run's checkpoints folder.")
        _check_checkpoint_paths_free(config, checkpoint_dir, resume_step)

    if resume_from is None:
        _check_inputs_stay(config, output_dir)

    # the data and the model: their checks fail here, before the output folder is touched
    task = build_task(config, accelerator.device)
    model = task.model
    text_encoder = getattr(task, "trainable_text_encoder", None)  # LoRA with lora.train_text_encoder
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    groups = _param_groups([m for m in (model, text_encoder) if m is not None], config.weight_decay)
    optimizer = _adamw(groups, config, accelerator.device, accelerator.distributed_type == DistributedType.FSDP)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    loader = torch.utils.data.DataLoader(
        task.dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.num_workers,
        collate_fn=task.collate,
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
        pin_memory=accelerator.device.type == "cuda",
    )
    if len(loader) == 0:
        raise ValueError(f"`batch_size` {config.batch_size} is larger than the dataset ({len(task.dataset)} images).")
    batches_per_process = len(loader) // accelerator.num_processes  # accelerate's shards drop the last (drop_last)
    if batches_per_process == 0:
        raise ValueError(
            f"`batch_size` {config.batch_size}: the {len(task.dataset)} images make {len(loader)} batch(es), fewer "
            f"than the {accelerator.num_processes} processes, so a process would have none; use a smaller batch_size."
        )
    if config.gradient_accumulation_steps > batches_per_process:  # accelerate ends an accumulation with the epoch
        raise ValueError(
            f"`gradient_accumulation_steps` {config.gradient_accumulation_steps} is more than the "
            f"{batches_per_process} batches of an epoch on each of the {accelerator.num_processes} process(es) "
            f"({len(task.dataset)} images, batch_size {config.batch_size}): an update ends with the epoch, so it "
            f"would average {batches_per_process} batches. Use at most {batches_per_process}, a smaller batch_size "
            "or more images."
        )
    task.dataset[0]  # decoded: a folder whose images all fail to decode stops here, before output_dir is made

    # every check has passed: only now is the output folder changed
    accelerator.wait_for_everyone()  # every process has read the folder (_resume_point) before it changes
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(output_dir, create=True)  # (held since the start where the folder and its lock file existed)
        now = None if config.resume == "never" else resumable_checkpoint(checkpoint_dir, is_main=False)
        if now != resume_from:  # a run that ended meanwhile saved a checkpoint this run did not check
            raise ValueError(
                f"`output_dir`: another run changed the checkpoints in {str(output_dir)!r} while this one started; "
                "run the command again."
            )
        if resume_from is None:  # a fresh start: the files of an earlier run there are kept, never replaced
            # (resume=never moves all of them; otherwise the folder holds no checkpoint to resume from). An export
            # killed mid-swap left the previous final/ in its staging folder: put back first, it moves with the run
            clean_stale_staging(output_dir / "final")
            moved = _move_previous_run(output_dir, RUN_FILES if config.resume == "never" else FRESH_START_FILES)
            if moved is not None:
                print(f"starting afresh (resume={config.resume}): moved the previous run's files to {moved}")
        make_folder(checkpoint_dir, "output_dir")
        for stale in checkpoint_dir.glob(".tmp-step-*"):  # half-written by an interrupted save
            if TEMPORARY_CHECKPOINT.match(stale.name) and stale.is_dir() and not stale.is_symlink():
                # our files only (with the temporary file of a write cut short): a file of someone else's stays
                kept = remove_training_checkpoint(stale, unfinished=True)
                if kept:  # out of the way of the save of that step, with what it holds
                    aside = stale.with_name(f"kept{stale.name}-{time.strftime('%Y%m%d-%H%M%S')}")
                    os.replace(stale, aside)
                    print(f"kept {', '.join(kept[:3])} of an unfinished checkpoint folder as {aside.name}")
        if resume_from is not None:  # damaged checkpoints after it: out of the way of the saves to come, kept
            for damaged in checkpoints_newest_first(checkpoint_dir):
                if damaged == resume_from:
                    break
                aside = damaged.with_name(f"damaged-{damaged.name}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(damaged, aside)
                print(f"kept the damaged checkpoint {damaged.name} as {aside.name}")
    accelerator.wait_for_everyone()
    if text_encoder is not None:
        model, text_encoder, optimizer, loader, scheduler = accelerator.prepare(
            model, text_encoder, optimizer, loader, scheduler
        )
        task.trainable_text_encoder = text_encoder  # the loss calls it through its (DDP) wrapper
        # one module holding both, so the checkpoint's model and optimizer states name every trained parameter. The
        # bare models: torch's state dicts leave out DDP's `module.`, named_parameters() does not, so under DDP the
        # trained names (and the EMA's) matched none of the saved weights and a checkpoint held no weights
        checkpointed = torch.nn.ModuleDict(
            {"transformer": bare_model(accelerator, model), "text_encoder": bare_model(accelerator, text_encoder)}
        )
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        checkpointed = model
    # here, not through Accelerator(dynamo_backend=...): accelerate keeps the first run's settings for the whole
    # process, so a second run in one process would not compile (`accelerate launch --dynamo_backend` compiled it)
    if config.torch_compile and not hasattr(model, "_orig_mod"):
        model = torch.compile(model)
    trained_models = [m for m in (model, text_encoder) if m is not None]

    def trainable_parameters():  # every trainable parameter, in a fixed order (all of the model's in full training)
        return lora.trainable_parameters(*(bare_model(accelerator, m) for m in trained_models))

    counter = _StepCounter()
    ema = None
    if config.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable_parameters(), decay=config.ema_decay, foreach=True)
        ema.to(accelerator.device)

    accelerator.print(
        f"{config.task}: {accelerator.distributed_type.value} on {accelerator.num_processes} process(es), "
        f"{accelerator.device.type}, mixed precision {accelerator.mixed_precision}"
    )
    if resume_from is not None:
        state = load_training_state(
            resume_from, accelerator, checkpointed, optimizer, scheduler, ema, trainable_only=lora_settings is not None
        )
        counter.step = int(state["step"])
        if config.resume == "force" and config_differences(state.get("config") or {}, snapshot):
            _apply_hyperparameters(optimizer, scheduler, config, ema)
        if ema is not None:
            ema.to(accelerator.device)  # the EMA shadow weights are loaded on the CPU
        accelerator.print(f"resumed from {resume_from} (step {counter.step})")
    # not an error: a run extended later (resume=force, a larger max_steps) finishes its warm-up; warned only once
    # every check has passed, so a refused run says only why
    if config.warmup_steps > config.max_steps and accelerator.is_main_process:
        peak = config.learning_rate * config.max_steps / config.warmup_steps
        warnings.warn(
            f"`warmup_steps` {config.warmup_steps} is more than `max_steps` {config.max_steps}: the learning rate "
            f"will not reach `learning_rate` {config.learning_rate:g} within max_steps (its last step trains at "
            f"{peak:.3g}).",
            UserWarning,
            stacklevel=2,
        )
    log_file = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:  # only now that the run is known to start or resume with this config
        write_text_atomic(output_dir / "train_config.json", json.dumps(snapshot, indent=2))
        if resume_from is not None:
            _cut_log_after(log_file, counter.step)
    if trackers:  # TensorBoard hides the events of the steps to be run again
        purge = {"tensorboard": {"purge_step": counter.step + 1}} if resume_from is not None else {}
        accelerator.init_trackers("train", config={k: str(v) for k, v in asdict(config).items()}, init_kwargs=purge)

    def save_checkpoint(step: int) -> None:
        _check_finite_weights(accelerator, trainable_parameters(), step)  # never a checkpoint of NaN weights
        final = checkpoint_dir / f"step-{step:07d}"
        tmp = checkpoint_dir / f".tmp-step-{step:07d}"
        # safetensors + JSON only (never pickles); every rank writes its RNG state here
        save_training_state(
            tmp,
            accelerator,
            checkpointed,
            optimizer,
            scheduler,
            ema,
            step,
            snapshot,
            trainable_only=lora_settings is not None,
            inputs=inputs,
        )
        accelerator.wait_for_everyone()
        _fault_injection("checkpoint", step)
        if accelerator.is_main_process:
            os.replace(tmp, final)
            sync_to_disk(checkpoint_dir)  # the rename itself
            prune_checkpoints(checkpoint_dir, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    # accelerate also updates at an epoch's end, after the last batches short of a whole accumulation
    updates_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    progress = None
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, initial=counter.step, desc=f"train {config.task}")
    model.train()
    started, images_seen = time.perf_counter(), 0
    finite_grads = torch.tensor(True, device=accelerator.device)  # every gradient norm since the start was finite
    try:  # the bar is closed before an error is printed, not after it
        while counter.step < config.max_steps:
            epoch = counter.step // updates_per_epoch
            loader.set_epoch(epoch)
            skip = (counter.step % updates_per_epoch) * config.gradient_accumulation_steps
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in epoch_loader:
                with accelerator.accumulate(*trained_models):
                    loss, metrics = task.loss(model, batch)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(trainable_parameters(), config.grad_clip)
                        if grad_norm is not None and config.mixed_precision != "fp16":  # (fp16 skips such steps)
                            finite_grads &= torch.isfinite(torch.as_tensor(grad_norm)).to(finite_grads.device)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                images_seen += batch["pixel_values"].shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                counter.step += 1
                if ema is not None:
                    ema.step(trainable_parameters())
                if progress is not None:
                    progress.update(1)  # the loss is shown at logged steps only: reading it waits for the GPU
                out_of_time = (
                    config.time_limit_minutes is not None
                    and time.perf_counter() - started > 60 * config.time_limit_minutes
                )
                if (
                    config.time_limit_minutes is not None
                ):  # all ranks must agree, or the one that stops alone hangs the rest
                    out_of_time = bool(
                        accelerator.gather(torch.tensor([out_of_time], device=accelerator.device)).any()
                    )
                logging = counter.step % config.log_every == 0 or counter.step == config.max_steps or out_of_time
                checkpointing = (
                    counter.step % config.checkpoint_every == 0 or counter.step == config.max_steps or out_of_time
                )
                if logging or checkpointing:  # a step that reads the loss anyway, or would save the weights
                    _check_finite_loss(accelerator, loss, counter.step)
                    # a non-finite gradient norm clipped every update of its step to nothing (or to NaN)
                    _stop_if_diverged(accelerator, finite_grads, "gradient norms were", counter.step)
                if logging:
                    loss_value = loss.item()  # waits for the GPU, so the time below counts the steps' work
                    elapsed = time.perf_counter() - started
                    record = {
                        "step": counter.step,
                        "loss": loss_value,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "images_per_s": images_seen / max(elapsed, 1e-9),
                        "peak_memory_mb": round(_peak_memory_mb(accelerator.device), 1),
                        **{name: float(value) for name, value in metrics.items()},
                    }
                    accelerator.log(record, step=counter.step)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.4f}")
                    if accelerator.is_main_process:
                        with log_file.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                if config.sample_every and counter.step % config.sample_every == 0 and accelerator.is_main_process:
                    task.save_samples(
                        bare_model(accelerator, model), output_dir / "samples" / f"step-{counter.step:07d}.png"
                    )
                _fault_injection("step", counter.step)
                if checkpointing:
                    save_checkpoint(counter.step)
                if out_of_time:
                    accelerator.print(f"time limit of {config.time_limit_minutes} min reached at step {counter.step}")
                    config.max_steps = counter.step
                if counter.step >= config.max_steps:
                    break
    finally:
        if progress is not None:
            progress.close()

    accelerator.wait_for_everyone()  # the weights exported below passed the last checkpoint's check, at this step
    export_dir = output_dir / "final"
    trained = bare_model(accelerator, model)
    if ema is not None:  # never under FSDP (refused at the start): each rank holds the whole model; rank 0 exports it
        ema.store(trainable_parameters())
        ema.copy_to(trainable_parameters())
    try:
        if lora_settings is not None:
            if accelerator.is_main_process:
                summary = {
                    "steps": counter.step,
                    "seconds": time.perf_counter() - started,
                    "device": accelerator.device.type,
                    "processes": accelerator.num_processes,
                }
                lora.export_lora(
                    config,
                    task,
                    trained,
                    bare_model(accelerator, text_encoder) if text_encoder else None,
                    export_dir,
                    summary,
                )
        elif accelerator.distributed_type == DistributedType.FSDP:
            full_state = accelerator.get_state_dict(model)  # a collective: gathers the shards onto the main process
            if accelerator.is_main_process:
                plain = _unsharded_copy(trained, full_state)
                task.export(plain, export_dir)
        elif accelerator.is_main_process:
            task.export(trained, export_dir)
    except ConversionError as err:  # a failed write of the export: the training key is output_dir
        raise ValueError(str(err).replace("`output`", "`output_dir`", 1)) from None
    if ema is not None:
        ema.restore(trainable_parameters())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir
