"""The training loop, on accelerate: one device, the CPU, or DDP / FSDP through ``accelerate launch``.

Mixed precision, gradient accumulation and checkpointing, EMA weights, warm-up + cosine LR, checkpoints
every N steps (written to a temporary folder and renamed, the last K kept) with automatic resume from
the newest complete one, TensorBoard (when installed) plus a JSONL log, and a final export as a
diffusers folder that the pipelines load directly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)\Z")
TASK_NAMES = ("tokenizer", "bitwise_tokenizer", "var", "star", "infinity")
TOKENIZER_TASKS = ("tokenizer", "bitwise_tokenizer")
TEXT_TASKS = ("star", "infinity")


@dataclass
class TrainConfig:
    """Everything a run needs; loaded from YAML/JSON (see ``configs/``) with ``key=value`` overrides."""

    task: str = "var"  # tokenizer | bitwise_tokenizer | var | star | infinity
    output_dir: str = "outputs/run"
    data: dict = field(default_factory=lambda: {"type": "shapes", "num_images": 10000})
    resolution: int = 64
    model: dict = field(default_factory=dict)  # constructor arguments of the trained model
    tokenizer_path: str | None = None  # frozen tokenizer for transformer training
    text_encoder_path: str | None = None  # star / infinity: folder with text_encoder/ + tokenizer/, or tiny-clip / tiny-t5
    batch_size: int = 32
    max_steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    adam_betas: tuple = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 2.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
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
    lora: dict | None = None  # LoRA fine-tuning of a pipeline: lora.base, lora.rank, ... (diffusers_var.training.lora)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        values: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            if str(path).endswith((".yaml", ".yml")):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. max_steps=100 or data.num_images=500).")
            key, raw = item.split("=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            target = values
            *parents, leaf = key.split(".")
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(known)}.")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.task not in TASK_NAMES:
            raise ValueError(f"`task` must be one of {', '.join(repr(t) for t in TASK_NAMES)}, got {self.task!r}.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"`mixed_precision` must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        for name in ("batch_size", "max_steps", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}.")
        if self.lora is not None:
            from .lora import LoraSettings

            LoraSettings.parse(self.lora, self.task)  # tokenizer and text encoder default to the base pipeline's
        elif self.task not in TOKENIZER_TASKS and not self.tokenizer_path:
            kind = "BitwiseMultiScaleVAE" if self.task == "infinity" else "MultiScaleVQModel"
            raise ValueError(f"`tokenizer_path` (a trained {kind} folder) is required for `task: {self.task}`.")
        if self.task in TEXT_TASKS and not self.text_encoder_path and self.lora is None:
            raise ValueError(f"`text_encoder_path` is required for `task: {self.task}`: a folder with `text_encoder/` and "
                             "`tokenizer/` sub-folders, or 'tiny-clip' / 'tiny-t5' (see diffusers_var.training.text_encoders).")
        for name in ("cond_drop_rate", "bsc_flip_prob", "label_smoothing"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)!r}.")
        for name in ("recon_l1_weight", "recon_l2_weight", "vq_loss_weight", "bsq_commit_weight", "bsq_entropy_weight",
                     "bsq_codebook_entropy_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}.")
        if float(self.bsq_inv_temperature) <= 0:
            raise ValueError(f"`bsq_inv_temperature` must be > 0, got {self.bsq_inv_temperature!r}.")
        if self.bsc_num_scales is not None and int(self.bsc_num_scales) < 0:
            raise ValueError(f"`bsc_num_scales` must be >= 0 or null (all scales), got {self.bsc_num_scales!r}.")


class _StepCounter:
    """Global optimisation step, saved inside accelerate checkpoints."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Newest complete checkpoint folder (temporary ones, from an interrupted save, are ignored)."""
    if not checkpoint_dir.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return max(done)[1] if done else None


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
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings, position / level tables and AdaLN offsets."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or any(k in name for k in ("pos_", "embedding", "log_scale", "adaln_offset"))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(config: TrainConfig) -> Path:
    """Run (or resume) training; returns the exported folder."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed

    from . import lora
    from .tasks import build_task

    lora_settings = lora.settings_of(config)

    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    trackers = []
    try:
        import tensorboard  # noqa: F401

        trackers = ["tensorboard"]
    except ImportError:
        pass
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=trackers or None,
        # one scheduler step per optimizer step on any number of GPUs (accelerate's default steps it once per
        # process, which ran the warm-up + cosine schedule twice as fast under 2-GPU DDP)
        step_scheduler_with_optimizer=False,
    )
    set_seed(config.seed)
    if accelerator.distributed_type == DistributedType.FSDP:
        if config.ema_decay:  # accelerate checkpoints a registered object from rank 0 only: the other shards' EMA would be lost
            raise ValueError("`ema_decay`: EMA weights are not supported under FSDP (each rank averages its own shard and "
                             "checkpoints keep rank 0's only); set ema_decay=null or train with DDP.")
        if config.sample_every:  # sampling a sharded model needs every rank, the sample grid is drawn on rank 0
            raise ValueError("`sample_every`: sample grids are not drawn under FSDP; set sample_every=0.")
        if lora_settings is not None:
            raise ValueError("`lora`: LoRA fine-tuning runs under DDP (each GPU holds the frozen base model), "
                             "not FSDP.")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_dir.mkdir(exist_ok=True)
        for stale in checkpoint_dir.glob(".tmp-*"):  # half-written by an interrupted save
            shutil.rmtree(stale, ignore_errors=True)
        (output_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2, default=list))
    accelerator.wait_for_everyone()

    task = build_task(config, accelerator.device)
    model = task.model
    text_encoder = getattr(task, "trainable_text_encoder", None)  # LoRA with lora.train_text_encoder
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    groups = _param_groups(model, config.weight_decay)
    if text_encoder is not None:
        groups += _param_groups(text_encoder, config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    loader = torch.utils.data.DataLoader(
        task.dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, num_workers=config.num_workers,
        collate_fn=task.collate, generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
    )
    if len(loader) == 0:
        raise ValueError(f"`batch_size` {config.batch_size} is larger than the dataset ({len(task.dataset)} images).")
    if text_encoder is not None:
        model, text_encoder, optimizer, loader, scheduler = accelerator.prepare(model, text_encoder, optimizer, loader,
                                                                                scheduler)
        task.trainable_text_encoder = text_encoder  # the loss calls it through its (DDP) wrapper
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trained_models = [m for m in (model, text_encoder) if m is not None]

    def trainable_parameters():  # every trainable parameter, in a fixed order (all of the model's in full training)
        return lora.trainable_parameters(*(accelerator.unwrap_model(m) for m in trained_models))

    if lora_settings is not None:  # checkpoints hold the LoRA weights only
        lora.register_checkpoint_hooks(accelerator)
    counter = _StepCounter()
    accelerator.register_for_checkpointing(counter)
    ema = None
    if config.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable_parameters(), decay=config.ema_decay, foreach=True)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    accelerator.print(f"{config.task}: {accelerator.distributed_type.value} on {accelerator.num_processes} process(es), "
                      f"{accelerator.device.type}, mixed precision {accelerator.mixed_precision}")
    resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if ema is not None:
            ema.to(accelerator.device)  # load_state puts the EMA shadow weights on the CPU: move them back to the GPU
        accelerator.print(f"resumed from {resume_from} (step {counter.step})")
    if trackers:
        accelerator.init_trackers("train", config={k: str(v) for k, v in asdict(config).items()})

    def save_checkpoint(step: int) -> None:
        final = checkpoint_dir / f"step-{step:07d}"
        tmp = checkpoint_dir / f".tmp-step-{step:07d}"
        accelerator.save_state(str(tmp))  # every rank writes its RNG state here
        accelerator.wait_for_everyone()
        _fault_injection("checkpoint", step)
        if accelerator.is_main_process:
            os.replace(tmp, final)
            done = sorted(p for p in checkpoint_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name))
            for old in done[: -config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    updates_per_epoch = max(1, len(loader) // config.gradient_accumulation_steps)
    log_file = output_dir / "train_log.jsonl"
    progress = None
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, initial=counter.step, desc=f"train {config.task}")
    model.train()
    started, images_seen = time.perf_counter(), 0
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
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
            out_of_time = config.time_limit_minutes is not None and time.perf_counter() - started > 60 * config.time_limit_minutes
            if config.time_limit_minutes is not None:  # all ranks must agree, or the one that stops alone hangs the rest
                out_of_time = bool(accelerator.gather(torch.tensor([out_of_time], device=accelerator.device)).any())
            if counter.step % config.log_every == 0 or counter.step == config.max_steps or out_of_time:
                elapsed = time.perf_counter() - started
                record = {"step": counter.step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "images_per_s": images_seen / max(elapsed, 1e-9),
                          "peak_memory_mb": round(_peak_memory_mb(accelerator.device), 1), **metrics}
                accelerator.log(record, step=counter.step)
                if accelerator.is_main_process:
                    with log_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if config.sample_every and counter.step % config.sample_every == 0 and accelerator.is_main_process:
                task.save_samples(accelerator.unwrap_model(model), output_dir / "samples" / f"step-{counter.step:07d}.png")
            _fault_injection("step", counter.step)
            if counter.step % config.checkpoint_every == 0 or counter.step == config.max_steps or out_of_time:
                save_checkpoint(counter.step)
            if out_of_time:
                accelerator.print(f"time limit of {config.time_limit_minutes} min reached at step {counter.step}")
                config.max_steps = counter.step
            if counter.step >= config.max_steps:
                break
    if progress is not None:
        progress.close()

    accelerator.wait_for_everyone()
    export_dir = output_dir / "final"
    trained = accelerator.unwrap_model(model)
    if ema is not None:  # never under FSDP (refused at the start): each rank holds the whole model; rank 0 exports it
        ema.store(trainable_parameters())
        ema.copy_to(trainable_parameters())
    if lora_settings is not None:
        if accelerator.is_main_process:
            summary = {"steps": counter.step, "seconds": time.perf_counter() - started,
                       "device": accelerator.device.type, "processes": accelerator.num_processes}
            lora.export_lora(config, task, trained, accelerator.unwrap_model(text_encoder) if text_encoder else None,
                             export_dir, summary)
    elif accelerator.distributed_type == DistributedType.FSDP:
        full_state = accelerator.get_state_dict(model)  # a collective: gathers the shards onto the main process
        if accelerator.is_main_process:
            plain = _unsharded_copy(trained, full_state)
            task.export(plain, export_dir)
    elif accelerator.is_main_process:
        task.export(trained, export_dir)
    if ema is not None:
        ema.restore(trainable_parameters())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir
