"""LoRA fine-tuning: the ``lora`` section of a training config.

``diffusers-var train var|star|infinity --config CONFIG lora.base=PIPELINE_FOLDER lora.rank=16`` (or a ``lora:``
section in the YAML, see ``configs/lora_*_shapes.yaml``) trains PEFT LoRA adapters on the transformer of a
pretrained pipeline (and optionally on its text encoder) with the full trainer's machinery (accelerate, mixed
precision, gradient checkpointing, several GPUs, EMA, checkpoints with resume after SIGKILL), and exports
``OUTPUT/final/pytorch_lora_weights.safetensors`` (diffusers' LoRA format) with a model card. The image tokenizer is
always frozen; the base weights of the transformer and text encoder are never changed.

Keys of the ``lora`` section:

* ``base`` (required): the pipeline folder to fine-tune (``model_index.json``; its ``transformer/``, its tokenizer
  ``vqvae/`` or ``vae/`` and, for STAR / Infinity, ``text_encoder/`` + ``tokenizer/``).
* ``rank`` (16), ``alpha`` (default: ``rank``, i.e. scale 1), ``dropout`` (0.0).
* ``targets``: groups of :data:`diffusers_var.loaders.LORA_TARGET_GROUPS` (default: the family's: attention and FFN,
  plus cross-attention for STAR / Infinity; optional: ``adaln``, and for VAR ``class_embedding``), or
  ``target_modules``: PEFT's own form (module names, or one regular expression).
* ``train_text_encoder`` (false; STAR / Infinity): also train a LoRA on the text encoder's attention projections,
  of rank ``text_encoder_rank`` (default ``rank``).
* ``adapter_name`` ("default").

Checkpoints hold only the trainable (LoRA) weights with the optimizer state, so they stay small for large models.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..loaders import (
    FAMILY_LORA_GROUPS,
    add_text_encoder_adapter,
    check_adapter_name,
    lora_config,
    text_encoder_lora_config,
)

LORA_TASKS = ("var", "star", "infinity")
TOKENIZER_FOLDERS = {"var": "vqvae", "star": "vqvae", "infinity": "vae"}
PIPELINE_CLASSES = {"var": "VARPipeline", "star": "STARPipeline", "infinity": "InfinityPipeline"}
TRANSFORMER_CLASSES = {
    "var": "VARTransformer2DModel",
    "star": "STARTransformer2DModel",
    "infinity": "InfinityTransformer2DModel",
}


@dataclass
class LoraSettings:
    """The ``lora`` section of a training config (module docstring)."""

    base: str
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] | None = None
    target_modules: str | list[str] | None = None
    train_text_encoder: bool = False
    text_encoder_rank: int | None = None
    adapter_name: str = "default"

    @classmethod
    def parse(cls, section, task: str) -> "LoraSettings":
        """Validate a config's ``lora`` section for ``task``; a ``ValueError`` names the key."""
        if not isinstance(section, dict):
            raise ValueError(
                f"`lora` must be a mapping of LoRA settings (lora.base, lora.rank, ...), got {section!r}."
            )
        if task not in LORA_TASKS:
            raise ValueError(f"`lora`: LoRA fine-tuning applies to the transformer tasks {LORA_TASKS}, not {task!r}.")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown `lora` keys {unknown}; known: {sorted(known)}.")
        if not section.get("base"):
            raise ValueError("`lora.base` (the pipeline folder to fine-tune, e.g. pipelines/var-shapes) is required.")
        settings = cls(**section)
        if not isinstance(settings.base, str):
            raise ValueError(f"`lora.base` must be a pipeline folder path, got {settings.base!r}.")
        base = Path(settings.base)
        index = base / "model_index.json"
        if not base.exists():
            raise ValueError(f"`lora.base`: {str(base)!r} does not exist (no such folder).")
        if not index.is_file():
            raise ValueError(f"`lora.base`: {str(base)!r} is not a pipeline folder (no model_index.json).")
        try:
            content = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"`lora.base`: cannot read {str(index)!r} as JSON ({err}).") from None
        if not isinstance(content, dict):
            raise ValueError(
                f"`lora.base`: {str(index)!r} holds a {type(content).__name__}, not a pipeline's model_index.json "
                "(a JSON object)."
            )
        class_name = content.get("_class_name")
        if class_name != PIPELINE_CLASSES[task]:
            raise ValueError(
                f"`lora.base`: {str(base)!r} holds a {class_name}; `task: {task}` fine-tunes a "
                f"{PIPELINE_CLASSES[task]}."
            )
        for name in ("rank",) + (("text_encoder_rank",) if settings.text_encoder_rank is not None else ()):
            value = getattr(settings, name)
            whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
            if not whole or value < 1:  # (4.0, as the top-level keys take it)
                raise ValueError(f"`lora.{name}` must be an integer >= 1, got {value!r}.")
            setattr(settings, name, int(value))
        alpha = settings.alpha
        if alpha is not None and (
            not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0
        ):
            raise ValueError(f"`lora.alpha` must be a positive number, got {settings.alpha!r}.")
        if not isinstance(settings.dropout, (int, float)) or not 0 <= settings.dropout < 1:
            raise ValueError(f"`lora.dropout` must be in [0, 1), got {settings.dropout!r}.")
        if settings.targets is not None:
            groups = FAMILY_LORA_GROUPS[TRANSFORMER_CLASSES[task]][0]
            targets = [settings.targets] if isinstance(settings.targets, str) else settings.targets
            if not isinstance(targets, list) or not targets or any(t not in groups for t in targets):
                raise ValueError(
                    f"`lora.targets` for {task} must be a non-empty list of {list(groups)}, got {settings.targets!r}."
                )
            settings.targets = targets
        if not isinstance(settings.train_text_encoder, bool):
            raise ValueError(f"`lora.train_text_encoder` must be true or false, got {settings.train_text_encoder!r}.")
        if settings.train_text_encoder and task == "var":
            raise ValueError("`lora.train_text_encoder`: VAR has no text encoder.")
        if settings.text_encoder_rank is not None and not settings.train_text_encoder:  # it would do nothing
            raise ValueError(
                "`lora.text_encoder_rank` is the rank of the text encoder's adapter, trained only with "
                "`lora.train_text_encoder: true`; set that too, or remove `lora.text_encoder_rank`."
            )
        check_adapter_name(settings.adapter_name, "lora.adapter_name")
        modules = settings.target_modules
        if modules is not None and not (
            (isinstance(modules, str) and modules.strip())
            or (isinstance(modules, list) and modules and all(isinstance(m, str) and m.strip() for m in modules))
        ):  # a name (or regular expression) of modules, or a list of names: PEFT's forms
            raise ValueError(
                "`lora.target_modules` must be a module name / regular expression or a non-empty list of module "
                f"names (e.g. [to_qkv, proj]), got {modules!r}."
            )
        return settings

    def component(self, name: str) -> Path:
        path = Path(self.base) / name
        if not path.is_dir():
            raise ValueError(f"`lora.base`: {str(path)!r} does not exist.")
        return path


def settings_of(config) -> LoraSettings | None:
    return None if config.lora is None else LoraSettings.parse(config.lora, config.task)


def tokenizer_path(config) -> str:
    """The frozen image tokenizer: ``tokenizer_path``, or in a LoRA run the ``lora.base`` pipeline's (the config
    check refuses ``tokenizer_path`` with a ``lora`` section)."""
    settings = settings_of(config)
    if settings is None:
        return config.tokenizer_path
    return str(settings.component(TOKENIZER_FOLDERS[config.task]))


def text_encoder_path(config) -> str:
    """The text encoder: ``text_encoder_path``, or in a LoRA run the ``lora.base`` pipeline folder (``text_encoder/``
    + ``tokenizer/``; the config check refuses ``text_encoder_path`` with a ``lora`` section)."""
    settings = settings_of(config)
    if settings is None:
        return config.text_encoder_path
    settings.component("text_encoder")
    return str(Path(settings.base))


def transformer_for_training(config, model_class, build):
    """The transformer to train: ``build()`` (a new model, full training), or with a ``lora`` section the base
    pipeline's transformer with a fresh LoRA adapter (:func:`attach_lora`)."""
    settings = settings_of(config)
    if settings is None:
        return build()
    folder = settings.component("transformer")
    try:
        model = model_class.from_pretrained(folder)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:
        message = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"`lora.base`: cannot load a {model_class.__name__} from {str(folder)!r} ({type(err).__name__}: "
            f"{message})."
        ) from None
    if config.task == "var" and model.config.cond_drop_rate != config.cond_drop_rate:
        model.register_to_config(cond_drop_rate=config.cond_drop_rate)  # VAR drops labels inside its forward
    return attach_lora(model, settings, config.mixed_precision)


def attach_lora(model, settings: LoraSettings, mixed_precision: str = "no"):
    """Freeze ``model`` and add a fresh LoRA adapter (float32, the only trainable weights). With mixed precision the
    frozen base weights are stored in bf16 / fp16 (its ``_keep_in_fp32_modules`` stay float32), as diffusers' LoRA
    scripts do: they are only read, under autocast, so full precision copies would double their memory for nothing."""
    from ..pipelines.fast_inference import cast_module_

    model.requires_grad_(False)
    if mixed_precision in ("bf16", "fp16"):
        cast_module_(model, torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
    config = lora_config(
        model,
        settings.rank,
        settings.alpha,
        settings.dropout,
        settings.targets,
        settings.target_modules,
        rank_name="lora.rank",
    )
    try:
        model.add_adapter(config, adapter_name=settings.adapter_name)
    except ValueError as err:  # PEFT: target modules that match nothing in the model
        if settings.target_modules is None:
            raise
        raise ValueError(f"`lora.target_modules` {settings.target_modules!r}: {err}") from None
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model


def text_encoder_for_training(config, text_encoder):
    """With ``lora.train_text_encoder``: the text encoder with a fresh LoRA adapter (its only trainable weights), in
    train mode; else ``None`` (the text encoder stays frozen)."""
    settings = settings_of(config)
    if settings is None or not settings.train_text_encoder:
        return None
    rank = settings.text_encoder_rank or settings.rank
    alpha = settings.alpha and settings.alpha * rank / settings.rank  # the transformer adapter's scale
    text_encoder.requires_grad_(False)
    rank_name = "lora.text_encoder_rank" if settings.text_encoder_rank else "lora.rank"
    config = text_encoder_lora_config(text_encoder, rank, alpha, settings.dropout, rank_name=rank_name)
    add_text_encoder_adapter(text_encoder, config, settings.adapter_name)
    for parameter in text_encoder.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return text_encoder.train()


def trainable_parameters(*models) -> list[nn.Parameter]:
    """The parameters that receive gradients, in a fixed order (EMA and gradient clipping use it)."""
    return [p for model in models if model is not None for p in model.parameters() if p.requires_grad]


def _has_adapter(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def export_lora(config, task, transformer, text_encoder, output_dir: Path, summary: dict) -> None:
    """Write the adapter (``pytorch_lora_weights.safetensors``) and a model card (``README.md``) into ``output_dir``,
    atomically."""
    from peft.utils import get_peft_model_state_dict

    from ..conversion.common import atomic_save_pipeline

    settings = settings_of(config)
    name = settings.adapter_name
    pipeline_class = type(task.pipeline(transformer))
    layers = {
        "transformer_lora_layers": get_peft_model_state_dict(transformer, adapter_name=name),
        "transformer_lora_adapter_metadata": transformer.peft_config[name].to_dict(),
    }
    if text_encoder is not None:
        layers.update(
            text_encoder_lora_layers=get_peft_model_state_dict(text_encoder, adapter_name=name),
            text_encoder_lora_adapter_metadata=text_encoder.peft_config[name].to_dict(),
        )
    card = model_card(config, settings, pipeline_class.__name__, transformer, summary)

    class _Folder:
        def save_pretrained(self, path, safe_serialization=True):
            pipeline_class.save_lora_weights(path, **layers)
            Path(path, "README.md").write_text(card)
            Path(path, "lora_config.json").write_text(
                json.dumps({"lora": asdict(settings), "task": config.task, **summary}, indent=2, default=str)
            )

    atomic_save_pipeline(_Folder(), output_dir, overwrite=True)


SHAPES_ONLY_DATA_KEYS = ("num_images", "seed", "concept", "concept_replaces", "concept_fraction")


def _python_string(text: str) -> str:
    """``text`` as the Python string literal ruff format writes: double quotes unless single quotes need fewer
    escapes (JSON's escapes are Python's)."""
    literal = json.dumps(text, ensure_ascii=False)
    if text.count('"') > text.count("'"):
        literal = "'" + literal[1:-1].replace('\\"', '"').replace("'", "\\'") + "'"
    return literal


def _python_assignment(name: str, text: str, line_length: int = 119) -> str:
    """``name = "text"`` as ruff format writes it at ``line_length`` (the repository's): a line too long whose string
    fits on a line of its own is wrapped in parentheses; a string too long for that stays on the line."""
    literal = _python_string(text)
    line = f"{name} = {literal}"
    if len(line) > line_length and 4 + len(literal) <= line_length:
        return f"{name} = (\n    {literal}\n)"
    return line


def model_card(config, settings: LoraSettings, pipeline_class: str, transformer, summary: dict) -> str:
    """A diffusers-style LoRA model card: base model, how to load, what was trained on what."""
    config_dict = transformer.peft_config[settings.adapter_name]
    targets = config_dict.target_modules
    targets = targets if isinstance(targets, str) else sorted(targets)
    trained = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    total = sum(p.numel() for p in transformer.parameters())
    data = dict(config.data)
    shapes = data.get("type", "shapes") == "shapes"
    if not shapes:  # the shapes' own settings say nothing of an image folder's run
        data = {k: v for k, v in data.items() if k not in SHAPES_ONLY_DATA_KEYS}
    caption = ""
    if config.task != "var" and shapes and data.get("concept"):
        concept = data["concept"]
        caption = f'\nTrigger: captions such as "a red {concept} on a blue background" (`{concept}`).'
    elif config.task == "var" and not shapes:
        caption = "\nThe class folders train the base's classes of the same names (`pipe.labels`)."
    elif config.task == "var" and data.get("concept_replaces"):
        caption = (
            f"\nThe class ids of `{data['concept_replaces']}` now draw a `{data.get('concept')}` (a "
            "class-conditional model learns no new ids: the adapter re-purposes existing classes)."
        )
    te = "yes (LoRA on its attention projections)" if settings.train_text_encoder else "no (frozen)"
    # the paths as variables: the calls stay short whatever the paths, so the block is as ruff format writes it
    base_line = _python_assignment("base", str(settings.base))
    lora_line = _python_assignment("lora", f"{config.output_dir}/final")
    adapter_line = _python_assignment("adapter", settings.adapter_name)
    return f"""---
base_model: {settings.base}
library_name: diffusers
tags:
- lora
- diffusers-var
- {config.task}
---

# LoRA for {pipeline_class} (`{settings.base}`)

Trained with `diffusers-var train {config.task}` (LoRA: rank {settings.rank}, alpha {settings.alpha or settings.rank},
dropout {settings.dropout}); text encoder trained: {te}. The image tokenizer is frozen.{caption}

- target modules: `{targets}` ({trained:,} trainable of {total:,} transformer parameters)
- data: `{json.dumps(data)}`, resolution {config.resolution}
- training: {summary.get("steps")} steps of batch {config.batch_size}, learning rate {config.learning_rate}, mixed
  precision {config.mixed_precision}, {summary.get("seconds", float("nan")):.0f} s on {summary.get("device")}

## Use

```python
import torch
from diffusers_var import {pipeline_class}

{base_line}
{lora_line}
{adapter_line}
pipe = {pipeline_class}.from_pretrained(base, dtype=torch.float32)
pipe.load_lora_weights(lora, adapter_name=adapter)
pipe.fuse_lora(lora_scale=1.0)  # optional: full speed (also under enable_fast_inference())
```

or `diffusers-var generate --model {settings.base} --lora {config.output_dir}/final --lora-scale 1.0 ...`.
Files: `pytorch_lora_weights.safetensors` (PEFT key names, safetensors), `lora_config.json` (the settings).
"""
