"""LoRA adapters for the next-scale pipelines, the diffusers way (PEFT).

The three transformers are diffusers ``PeftAdapterMixin`` models (``add_adapter``, ``set_adapter``,
``disable_adapters``, ``enable_adapters``, ``load_lora_adapter``, ...), and the pipelines load and save adapters
with diffusers' LoRA API through the mixins below, subclasses of diffusers' ``LoraBaseMixin``:
``load_lora_weights``, ``save_lora_weights``, ``fuse_lora``, ``unfuse_lora``, ``set_adapters``,
``unload_lora_weights``, ``get_active_adapters``, ``delete_adapters``, ``enable_lora`` / ``disable_lora``.

Files are diffusers' format: ``pytorch_lora_weights.safetensors`` (safetensors only), PEFT key names
(``transformer.blocks.0.attn.to_qkv.lora_A.weight``; ``text_encoder.`` keys for a text-encoder adapter, ``refiner.``
keys for the refiner of a ``VARCoDePipeline``), the
``LoraConfig`` in the ``lora_adapter_metadata`` header entry. The header also names the transformer class the adapter
was made for (``diffusers_var_lora``); loading an adapter made for another family, or for a transformer of another
shape, is a ``ValueError`` that says what does not fit.

Default target modules (:data:`LORA_TARGET_GROUPS`, regular expressions over module names, full match):

========================  ==========================================================  ==================
group                     modules                                                     families
========================  ==========================================================  ==================
``attention``             ``blocks.N.attn.to_qkv``, ``blocks.N.attn.to_out``          all (default)
``ffn``                   ``blocks.N.ffn.fc1``, ``blocks.N.ffn.fc2``                  all (default)
``cross_attention``       ``blocks.N.cross_attn.to_q`` / ``to_kv`` / ``to_out``       STAR, Infinity (default)
``adaln``                 ``blocks.N.adaln.linear``, ``shared_modulation.linear``,    VAR, Infinity (optional)
                          ``head_norm.adaln.linear``
``class_embedding``       ``class_embedding`` (an ``nn.Embedding``: one row per class)  VAR (optional)
========================  ==========================================================  ==================

The STAR stable-sampler head, the output heads, the input projections and Infinity's text pooling are never
targeted by default (pass ``target_modules`` to :func:`lora_config` for anything else).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import re
from typing import Callable

import torch
from diffusers.loaders.lora_base import (
    LORA_ADAPTER_METADATA_KEY,
    LORA_WEIGHT_NAME_SAFE,
    LoraBaseMixin,
    _fetch_state_dict,
)
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA
from diffusers.utils import is_peft_available, logging
from safetensors import SafetensorError
from torch import nn

from .file_utils import SAFETENSORS_ONLY, is_hub_repo_id, write_atomic
from .models.loading import any_submodule
from .scalars import is_bool, is_number

logger = logging.get_logger(__name__)

FAMILY_METADATA_KEY = "diffusers_var_lora"  # safetensors header entry: the transformer class an adapter is for

LORA_TARGET_GROUPS = {
    "attention": r"blocks\.\d+\.attn\.(?:to_qkv|to_out)",
    "ffn": r"blocks\.\d+\.ffn\.(?:fc1|fc2)",
    "cross_attention": r"blocks\.\d+\.cross_attn\.(?:to_q|to_kv|to_out)",
    "adaln": r"blocks\.\d+\.adaln\.linear|shared_modulation\.linear|head_norm\.adaln\.linear",
    "class_embedding": r"class_embedding",
}
# per transformer class: (groups it has, groups targeted by default)
FAMILY_LORA_GROUPS = {
    "VARTransformer2DModel": (("attention", "ffn", "adaln", "class_embedding"), ("attention", "ffn")),
    "STARTransformer2DModel": (("attention", "ffn", "cross_attention"), ("attention", "ffn", "cross_attention")),
    "InfinityTransformer2DModel": (
        ("attention", "ffn", "cross_attention", "adaln"),
        ("attention", "ffn", "cross_attention"),
    ),
}
# text encoders (transformers models): their attention projections
TEXT_ENCODER_LORA_TARGETS = {
    "clip_text_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "t5": ["q", "k", "v", "o"],
    "mt5": ["q", "k", "v", "o"],
    "umt5": ["q", "k", "v", "o"],
}


def _family_of(transformer_or_class) -> str:
    cls = transformer_or_class if isinstance(transformer_or_class, type) else type(transformer_or_class)
    for base in cls.__mro__:
        if base.__name__ in FAMILY_LORA_GROUPS:
            return base.__name__
    raise ValueError(f"`transformer`: LoRA targets are defined for {sorted(FAMILY_LORA_GROUPS)}, got {cls.__name__}.")


def lora_target_modules(transformer_or_class, targets: list[str] | tuple[str, ...] | None = None) -> str:
    """The ``target_modules`` regular expression of a ``LoraConfig`` for a transformer (instance or class):
    the union of the :data:`LORA_TARGET_GROUPS` named in ``targets`` (default: the family's defaults)."""
    family = _family_of(transformer_or_class)
    available, default = FAMILY_LORA_GROUPS[family]
    targets = default if targets is None else targets
    if isinstance(targets, str):
        targets = [targets]
    unknown = [t for t in targets if t not in available]
    if not targets or unknown:
        raise ValueError(f"`targets` for {family} must be a non-empty list of {list(available)}, got {list(targets)}.")
    return "|".join(f"(?:{LORA_TARGET_GROUPS[t]})" for t in targets)


def lora_config(
    transformer_or_class,
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: list[str] | None = None,
    target_modules=None,
    rank_name: str = "rank",
    **kwargs,
):
    """A ``peft.LoraConfig`` for a transformer: rank ``rank``, ``lora_alpha`` (default: ``rank``, i.e. scale 1),
    ``lora_dropout``, and the modules of ``targets`` (:func:`lora_target_modules`) unless ``target_modules`` (PEFT's
    own form: a list of names or a regular expression) is given. Extra keyword arguments go to ``LoraConfig``.
    Given a transformer (not its class), a rank above every targeted layer's full rank is a ``ValueError`` naming
    ``rank_name``."""
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"`rank` must be an integer >= 1, got {rank!r}.")
    alpha = rank if alpha is None else alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"`alpha` must be a positive number, got {alpha!r}.")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
    if target_modules is None:
        target_modules = lora_target_modules(transformer_or_class, targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=target_modules,
        init_lora_weights=kwargs.pop("init_lora_weights", True),
        **kwargs,
    )
    if isinstance(transformer_or_class, nn.Module):
        check_rank_fits(transformer_or_class, config, rank_name)
    return config


def check_rank_fits(model: nn.Module, config, parameter: str) -> None:
    """A ``ValueError`` naming ``parameter`` when ``config.r`` is more than the full rank (``min(in, out)``) of every
    layer the config targets in ``model``: such a rank only adds parameters (and memory: 100,000 took a process
    past 24 GB), never expressiveness."""
    from peft.tuners.tuners_utils import check_target_module_exists

    full_ranks = [
        min(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and check_target_module_exists(config, name)
    ]
    if full_ranks and config.r > max(full_ranks):
        raise ValueError(
            f"`{parameter}` {config.r} is more than the full rank of every targeted layer (at most {max(full_ranks)}, "
            f"the smaller of a layer's input and output widths); use at most {max(full_ranks)}."
        )


def add_text_encoder_adapter(text_encoder: nn.Module, config, adapter_name: str = "default") -> None:
    """Add a LoRA adapter to a transformers text encoder with PEFT itself (``inject_adapter_in_model``): transformers'
    own ``add_adapter`` / ``load_adapter`` may demand a newer PEFT than diffusers does, and every other LoRA operation
    on the text encoder (fuse, scale, switch, unload) is PEFT's layer API anyway."""
    from peft import inject_adapter_in_model

    if adapter_name in getattr(text_encoder, "peft_config", {}):
        raise ValueError(f"`adapter_name` {adapter_name!r} is already loaded in the text encoder.")
    inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)
    match_adapter_mode(text_encoder, adapter_name)


def match_adapter_mode(model: nn.Module, adapter_name: str) -> None:
    """Put the layers PEFT made for adapter ``adapter_name`` in ``model``'s mode (``model.training``). PEFT makes
    them in training mode whatever the model's: an adapter trained with ``lora_dropout`` > 0 and loaded into a model
    in eval mode would drop activations at inference (from the global random state: a seed no longer reproduces the
    image). The wrappers' own flags follow too (DoRA caches its norm only outside training); their base layers keep
    theirs."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        module.training = model.training
        for attr in (*module.adapter_layer_names, *module.other_param_names):
            container = getattr(module, attr, None)
            if isinstance(container, nn.Module):  # ModuleDict, ParameterDict
                container.training = model.training
            if isinstance(container, nn.ModuleDict) and adapter_name in container:
                container[adapter_name].train(model.training)


def text_encoder_lora_config(
    text_encoder, rank: int = 16, alpha: float | None = None, dropout: float = 0.0, rank_name: str = "rank"
):
    """A ``peft.LoraConfig`` on the attention projections of a CLIP / T5 text encoder (a rank above their full rank
    is a ``ValueError`` naming ``rank_name``)."""
    from peft import LoraConfig

    model_type = getattr(text_encoder.config, "model_type", "")
    if model_type not in TEXT_ENCODER_LORA_TARGETS:
        raise ValueError(
            f"`text_encoder`: LoRA targets are defined for {sorted(TEXT_ENCODER_LORA_TARGETS)} models, "
            f"got {model_type!r}."
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=float(dropout),
        target_modules=TEXT_ENCODER_LORA_TARGETS[model_type],
        init_lora_weights=True,
    )
    check_rank_fits(text_encoder, config, rank_name)
    return config


# ----------------------------------------------------------------------------------------------
# Does a LoRA state dict fit a model?
# ----------------------------------------------------------------------------------------------
_LORA_PARTS = r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
# PEFT's saved names: the part, then its tensor (none for embedding parameters); an adapter name in between (keys of
# a model's own state_dict, ``lora_A.default.weight``) is not one: PEFT loads such a file as no weights at all
_LORA_KEY = re.compile(r"(?P<module>.+)\." + _LORA_PARTS + r"(?:\.weight|\.bias)?\Z")
_LORA_KEY_WITH_ADAPTER_NAME = re.compile(r".+\." + _LORA_PARTS + r"\.(?P<adapter>[^.]+)(?:\.weight|\.bias)?\Z")


def _adapter_name_hint(keys) -> str:
    """What to say when a key that is no LoRA key holds an adapter's name, as a model's own state_dict does."""
    for key in keys:
        named = _LORA_KEY_WITH_ADAPTER_NAME.match(key) if isinstance(key, str) else None
        if named:
            return (
                f"; `{named['adapter']}` looks like an adapter name, as in a model's own state_dict: take the weights "
                "from peft's get_peft_model_state_dict(model, adapter_name=...), which leaves it out"
            )
    return ""


def _base_module(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _module_dims(module: nn.Module) -> tuple[int, int] | None:
    """(input width, output width) of a layer LoRA can adapt (Linear: features, Embedding: rows / width)."""
    module = _base_module(module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def check_adapter_name(name, parameter: str = "adapter_name") -> None:
    """A ValueError naming ``parameter`` unless ``name`` can key PEFT's torch ``ModuleDict``s: a non-empty string
    without ``.`` that is not one of their attributes (``train``, ``eval``, ``to``, ``keys``, ...: torch refused it
    deep inside PEFT with a KeyError)."""
    if not isinstance(name, str) or not name.strip() or "." in name or hasattr(nn.ModuleDict(), name):
        raise ValueError(
            f"`{parameter}` must be a non-empty string without `.` that is not an attribute of torch's ModuleDict "
            f"(such as train, eval, to, keys), got {name!r}."
        )


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def lora_config_problems(config) -> list[str]:
    """What is wrong with the ranks and scales of a ``LoraConfig`` read from a file (PEFT itself checks them only
    while it injects layers, or not at all: ``lora_alpha`` NaN gives NaN outputs). Empty when they are usable."""
    problems = []
    if not _is_positive_int(config.r):
        problems.append(f"its LoraConfig's `r` must be an integer >= 1, got {config.r!r}")
    if not _is_positive_number(config.lora_alpha):
        problems.append(f"its LoraConfig's `lora_alpha` must be a positive number, got {config.lora_alpha!r}")
    for field, is_valid, what in (
        ("rank_pattern", _is_positive_int, "integers >= 1"),
        ("alpha_pattern", _is_positive_number, "positive numbers"),
    ):
        pattern = getattr(config, field, None) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and is_valid(v) for k, v in pattern.items()):
            problems.append(f"its LoraConfig's `{field}` must map module names to {what}, got {pattern!r}")
    # the rest fails deep inside PEFT or torch while the layers are injected, or loads something else than was saved
    dropout = config.lora_dropout
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        problems.append(f"its LoraConfig's `lora_dropout` must be a number in [0, 1), got {dropout!r}")
    targets = config.target_modules
    if not (
        isinstance(targets, str)
        or (isinstance(targets, (list, tuple, set)) and targets and all(isinstance(t, str) for t in targets))
    ):
        problems.append(
            f"its LoraConfig's `target_modules` must be a regular expression or a list of module names, got "
            f"{targets!r}"
        )
    # the file's weights replace the initial ones; other initialisations (pissa, olora, ...) change the base weights
    init = config.init_lora_weights
    if not (init is True or init is False or init == "gaussian"):
        problems.append(f"its LoraConfig's `init_lora_weights` must be true, false or 'gaussian', got {init!r}")
    if config.modules_to_save:  # whole trained copies of layers: a LoRA file holds no such weights
        problems.append(f"its LoraConfig's `modules_to_save` must be empty, got {config.modules_to_save!r}")
    return problems


def _configured_rank(config, module_name: str) -> int:
    """The rank PEFT gives ``module_name`` under ``config`` (``rank_pattern`` first, then ``r``)."""
    from peft.utils.other import get_pattern_key

    pattern = config.rank_pattern or {}
    return pattern.get(get_pattern_key(pattern.keys(), module_name), config.r)


def _layer_ranks(state_dict: dict) -> dict[str, dict[str, int]]:
    """``{layer: {"lora_A": rank, "lora_B": rank}}`` from the LoRA matrices of a state dict (PEFT names): A is
    (rank, inputs), B (outputs, rank), for Linear and Embedding layers alike. Vectors (DoRA's magnitude, lora_B's
    bias) and tensors of other dimensions have no rank."""
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in state_dict.items():
        match = _LORA_KEY.match(key) if isinstance(key, str) else None
        if match is None or match["part"] == "lora_magnitude_vector" or key.endswith(".bias") or tensor.ndim != 2:
            continue
        side = match["part"][-1]
        ranks.setdefault(match["module"], {})[f"lora_{side}"] = tensor.shape[0] if side == "A" else tensor.shape[1]
    return ranks


def lora_rank_problems(ranks: dict[str, dict[str, int]], config=None) -> list[str]:
    """What is wrong with the ranks of :func:`_layer_ranks`: a layer with lora_A or lora_B alone, the two of other
    ranks, a rank below 1, and, given the adapter's usable ``LoraConfig``, a rank other than the one it gives the
    layer (``r`` or ``rank_pattern``). One check for loading and saving: a file saved is a file that loads."""
    problems = []
    for name, found in sorted(ranks.items(), key=lambda item: _natural_key(item[0])):
        if len(found) == 1:
            (have,) = found
            problems.append(f"`{name}` has {have} but no {'lora_B' if have == 'lora_A' else 'lora_A'} weights")
        elif found["lora_A"] != found["lora_B"]:
            problems.append(f"`{name}`: lora_A has rank {found['lora_A']}, lora_B has rank {found['lora_B']}")
        elif found["lora_A"] < 1:
            problems.append(f"`{name}` has rank {found['lora_A']}; ranks must be >= 1")
    if config is not None and not problems:
        for name, found in sorted(ranks.items(), key=lambda item: _natural_key(item[0])):
            configured = _configured_rank(config, name)
            if found["lora_A"] != configured:
                problems.append(f"`{name}` has rank {found['lora_A']}, the LoraConfig says {configured}")
    return problems


def lora_mismatches(state_dict: dict[str, torch.Tensor], model: nn.Module, config=None) -> list[str]:
    """What keeps ``state_dict`` (PEFT key names, no component prefix) from fitting ``model``: keys that name no
    adaptable layer, tensors whose shapes do not match the layer's widths, layers whose ``lora_A`` and ``lora_B``
    disagree on the rank (or lack one of the two), and, when the adapter's ``LoraConfig`` (``config``) is known,
    unusable ranks or scales, ranks other than the config's, and layers it targets in ``model`` that the file does not
    cover (a transformer of another depth). Empty when it fits. Everything PEFT and torch would otherwise fail on
    half-way through injecting the adapter is found here, before anything changes."""
    modules = dict(model.named_modules())
    problems, covered = [], set()
    if config is not None:
        problems += lora_config_problems(config)
    matrices = {}  # the LoRA matrices of the model's layers, for the rank checks
    magnitudes = set()  # layers with DoRA's magnitude vector
    for key, tensor in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None:
            problems.append(
                f"`{key}` is not a LoRA key (PEFT names: `<module>.lora_A.weight` / `.lora_B.weight`)"
                f"{_adapter_name_hint([key])}"
            )
            continue
        name, part = match["module"], match["part"]
        dims = _module_dims(modules[name]) if name in modules else None
        if dims is None:
            problems.append(f"`{key}`: no adaptable layer `{name}` in {type(model).__name__}")
            continue
        covered.add(name)
        d_in, d_out = dims
        # DoRA's magnitude and lora_B's bias (PEFT's lora_bias) are vectors; the LoRA matrices are matrices
        vector = part == "lora_magnitude_vector" or key.endswith(".bias")
        if tensor.ndim != (1 if vector else 2):
            problems.append(f"`{key}` has {tensor.ndim} dimensions, {'1' if vector else '2'} expected")
            continue
        if part == "lora_magnitude_vector":
            magnitudes.add(name)
        if vector:
            if tensor.shape[0] != d_out:
                problems.append(f"`{key}` has {tensor.shape[0]} entries, `{name}` has {d_out} outputs")
            continue
        if part == "lora_A" and tensor.shape[1] != d_in:
            problems.append(f"`{key}` reads {tensor.shape[1]} inputs, `{name}` has {d_in}")
        elif part == "lora_B" and tensor.shape[0] != d_out:
            problems.append(f"`{key}` writes {tensor.shape[0]} outputs, `{name}` has {d_out}")
        elif part == "lora_embedding_A" and tensor.shape[-1] != d_in:
            problems.append(f"`{key}` has {tensor.shape[-1]} rows, `{name}` has {d_in}")
        elif part == "lora_embedding_B" and tensor.shape[0] != d_out:
            problems.append(f"`{key}` has width {tensor.shape[0]}, `{name}` has {d_out}")
        matrices[key] = tensor
    ranks = _layer_ranks(matrices)
    problems += lora_rank_problems(ranks, None if problems else config)  # (the config's ranks: a usable config)
    # DoRA: a magnitude per adapted layer, exactly when the config says use_dora (diffusers infers it, without
    # metadata, from any magnitude key); otherwise torch failed on meta tensors, or layers ran as plain LoRA
    use_dora = bool(config.use_dora) if config is not None else bool(magnitudes)
    adapted = set(ranks)
    if use_dora and adapted - magnitudes:
        missing = sorted(adapted - magnitudes, key=_natural_key)
        problems.append(
            f"DoRA (`use_dora`{' in its LoraConfig' if config is not None and config.use_dora else ''}) but no "
            f"`lora_magnitude_vector` for {len(missing)} layers (e.g. `{missing[0]}`)"
        )
    if not use_dora and magnitudes:
        problems.append(
            f"`lora_magnitude_vector` weights (DoRA) for {sorted(magnitudes, key=_natural_key)[:3]}, but its "
            "LoraConfig's `use_dora` is false"
        )
    if magnitudes - adapted:
        problems.append(
            f"`lora_magnitude_vector` without lora_A / lora_B weights for "
            f"{sorted(magnitudes - adapted, key=_natural_key)[:3]}"
        )
    if config is not None and not problems:
        from peft.tuners.tuners_utils import check_target_module_exists

        targeted = {
            name
            for name, module in modules.items()
            if name
            and _module_dims(module) is not None
            and "lora_" not in name
            and "base_layer" not in name
            and check_target_module_exists(config, name)
        }
        missing = sorted(targeted - covered, key=_natural_key)
        if missing:
            problems.append(
                f"the adapter has no weights for {len(missing)} targeted layers of this "
                f"{type(model).__name__} (e.g. `{missing[0]}`): it was made for a transformer of another "
                f"depth or layout"
            )
    return problems


def lora_tensor_problems(state_dict: dict) -> list[str]:
    """Values of a LoRA state dict that are no usable weights: not tensors, not floating point (torch refuses them
    only while copying into the injected layers), or not finite (a NaN adapter would load without a word and turn
    every image to noise). Empty when all are usable."""
    problems = []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            problems.append(f"`{key}` is a {type(value).__name__}, not a tensor")
        elif not value.is_floating_point():
            problems.append(f"`{key}` holds {str(value.dtype).removeprefix('torch.')} values, not floating point")
        elif not bool(torch.isfinite(value).all()):
            problems.append(f"`{key}` holds NaN or infinite values")
    return problems


def _component_metadata(metadata: dict | None, component: str) -> dict:
    """The ``LoraConfig`` entries of one component in a file's metadata (keys ``"<component>.<field>"``)."""
    prefix = f"{component}."
    return {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)}


def _update_hotswapped_config(config, metadata: dict, state_dict: dict) -> None:
    """After a hot-swap, the adapter's ``LoraConfig`` as the file describes it (rank, alpha and their per-layer
    patterns from its metadata; without metadata the rank of its tensors, alpha unchanged): saving the adapter
    afterwards wrote the old rank beside tensors of the new one, a file that does not load."""
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        if key in metadata:
            setattr(config, key, metadata[key])
    if "r" not in metadata:
        ranks = {tensor.shape[1] for key, tensor in state_dict.items() if ".lora_B." in key and tensor.ndim == 2}
        if len(ranks) == 1:
            config.r = ranks.pop()


def _check_hotswap_layers(model: nn.Module, adapter_name: str, state_dict: dict, component: str) -> None:
    """A ValueError (before anything changes) unless the file's LoRA weights cover the layers ``adapter_name``
    adapts in ``model``, no more and no fewer: PEFT's hot-swap raised its own RuntimeError half-way otherwise. Neither
    may adapt an embedding layer: PEFT's hot-swap takes a layer's name from ``lora_*.<adapter>.weight`` keys, which
    an embedding's parameters (``lora_embedding_A.<adapter>``) lack, and fails half-way with a KeyError."""
    adapted, embeddings = set(), set()
    for name, module in model.named_modules():
        for part in ("lora_A", "lora_embedding_A"):
            if adapter_name in getattr(module, part, {}):
                adapted.add(name)
                if part == "lora_embedding_A":
                    embeddings.add(name)
    given = set()
    for key in state_dict:
        if match := _LORA_KEY.match(key):
            given.add(match["module"])
            if match["part"].startswith("lora_embedding_"):
                embeddings.add(match["module"])
    if embeddings:
        raise ValueError(
            f"`hotswap`: hot-swapping does not support adapters on embedding layers ({sorted(embeddings)}; "
            "PEFT's hot-swap takes Linear and Conv2d LoRA weights only). Load the file under another `adapter_name`, "
            f"or remove adapter {adapter_name!r} first (`delete_adapters({adapter_name!r})` or "
            "`unload_lora_weights()`) and load it again."
        )
    if given != adapted:
        extra, missing = sorted(given - adapted, key=_natural_key), sorted(adapted - given, key=_natural_key)
        said = [
            f"layers it does not adapt: {extra[:3]}" if extra else "",
            f"none for: {missing[:3]}" if missing else "",
        ]
        raise ValueError(
            f"`hotswap`: the file's LoRA weights must target the layers adapter {adapter_name!r} adapts in the "
            f"{component}; it has "
            f"{'; '.join(part for part in said if part)}. Load it as another adapter instead."
        )


def _refuse_unknown_arguments(method: str, kwargs: dict, known: str) -> None:
    """A ValueError naming the keyword arguments ``method`` does not take (diffusers' ignored them, typos too)."""
    if kwargs:
        raise ValueError(f"`{method}` takes {known}; got unknown arguments {sorted(kwargs)}.")


def _safetensors_files(folder: str) -> list[str]:
    """The ``.safetensors`` files of ``folder`` (not hidden, not in subfolders), sorted; none if it cannot be read."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(
        name
        for name in names
        if name.endswith(".safetensors") and not name.startswith(".") and os.path.isfile(os.path.join(folder, name))
    )


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _json_safe(metadata, parameter: str) -> dict | None:
    """A ``LoraConfig`` or its ``to_dict()`` for the file header: sets become sorted lists (diffusers does the
    same)."""
    if metadata is None:
        return None
    if callable(getattr(metadata, "to_dict", None)):  # the LoraConfig itself
        metadata = metadata.to_dict()
    if not isinstance(metadata, dict):
        raise ValueError(f"`{parameter}` must be a LoraConfig or its to_dict(), got {type(metadata).__name__}.")
    return {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}


def _some(problems: list[str], shown: int = 3) -> str:
    return "; ".join(problems[:shown]) + (f"; ... ({len(problems)} problems)" if len(problems) > shown else "")


def _check_saved_metadata(metadata: dict | None, tensors: dict, parameter: str) -> None:
    """An adapter's ``LoraConfig`` as a file header: JSON, a LoraConfig, and the ranks of the tensors those it gives
    each layer (``r``, ``rank_pattern``; Linear and Embedding layers), checked as load_lora_weights checks them, so
    that it takes the file back."""
    ranks = _layer_ranks(tensors)
    problems = lora_rank_problems(ranks)
    if problems:
        raise ValueError(f"`{parameter.replace('adapter_metadata', 'layers')}`: {_some(problems)}.")
    if not metadata:
        return
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{parameter}` must hold JSON values (a LoraConfig.to_dict()): {err}.") from None
    from peft import LoraConfig

    try:  # the loader builds this LoraConfig from the header
        config = LoraConfig(**metadata)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{parameter}` is not a LoraConfig ({_first_line(err)}).") from None
    problems = lora_config_problems(config) or lora_rank_problems(ranks, config)
    if problems:
        raise ValueError(f"`{parameter}`: {_some(problems)}.")


_SOURCE = "`pretrained_model_name_or_path_or_dict`"
_LORA_STATE_DICT_ARGUMENTS = (
    "weight_name, subfolder, use_safetensors, local_files_only, cache_dir, force_download, proxies, token, revision"
)
_FUSE_SNAPSHOT = "_diffusers_var_fuse_snapshot"  # a LoRA layer's base weight and scales before fuse_lora


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_local_path(path: str) -> bool:
    """Whether ``path`` can only mean a local file or folder: not a Hub repository id (``org/name``: one slash at
    most, no leading ``.`` / ``/`` / ``~``, no ``..``), or a ``.safetensors`` file name."""
    return not is_hub_repo_id(path, bare_names=True) or path.endswith(".safetensors")


@contextlib.contextmanager
def _restored_on_failure(models: list[nn.Module], adapter_name: str, hotswap: bool = False):
    """Load adapter ``adapter_name`` into ``models`` all or nothing. When the load fails half-way, PEFT has already
    wrapped layers, and diffusers' clean-up leaves the wrappers in place (and, for a failed hot-swap, deletes the
    adapter it was to replace): put each model back as it was. Layers wrapped for this adapter are unwrapped; layers
    that were LoRA layers before get back their per-adapter entries (``lora_A``, ``lora_B``, ``r``, ``scaling``, ...:
    the same objects), active / merged adapters and enabled state; then the configs, ``requires_grad`` flags and, for
    ``hotswap``, the weights the adapter had (replaced in place; LoRA weights are small enough to copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = []
    for model in models:
        attributes = {k: model.__dict__[k] for k in ("peft_config", "_hf_peft_config_loaded") if k in model.__dict__}
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                entries = {
                    attr: dict(getattr(module, attr).items())
                    for attr in (*module.adapter_layer_names, *module.other_param_names)
                    if hasattr(module, attr)
                }
                state = (copy.copy(module._active_adapter), module._disable_adapters, list(module.merged_adapters))
                layers[name] = (entries, state)
        adapter_weights = {}
        if hotswap:
            for name, parameter in model.named_parameters():
                if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                    adapter_weights[name] = parameter.detach().clone()
        configs = dict(attributes.get("peft_config") or {})
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        saved.append((model, attributes, configs, layers, adapter_weights, flags))
    try:
        yield
    except BaseException:
        for model, attributes, configs, layers, adapter_weights, flags in saved:
            for name, module in list(model.named_modules()):
                if not isinstance(module, BaseTunerLayer):
                    continue
                if name not in layers:  # wrapped for this adapter: the original layer takes its place again
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, module.get_base_layer())
                    continue
                entries, (active, disabled, merged) = layers[name]
                for attr, before in entries.items():
                    container = getattr(module, attr)
                    for key in [k for k in container.keys() if k not in before]:
                        del container[key]
                    for key, value in before.items():
                        container[key] = value
                module._active_adapter, module._disable_adapters = active, disabled
                module.merged_adapters[:] = merged
            for key in ("peft_config", "_hf_peft_config_loaded"):
                model.__dict__.pop(key, None)
            model.__dict__.update(attributes)
            if "peft_config" in attributes:  # the same dict object, with its former entries
                attributes["peft_config"].clear()
                attributes["peft_config"].update(configs)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in adapter_weights:
                        parameter.data = adapter_weights[name].to(parameter.device)
                    if name in flags:
                        parameter.requires_grad_(flags[name])
        raise


# ----------------------------------------------------------------------------------------------
# The pipelines' loader
# ----------------------------------------------------------------------------------------------
class NextScaleLoraLoaderMixin(LoraBaseMixin):
    r"""Load, save, fuse and switch LoRA adapters of a next-scale pipeline's transformer (and, for the text-to-image
    families, of its text encoder; for CoDe, of its refiner) with diffusers' LoRA API. See the module docstring for
    the file format.

    Beyond diffusers: ``unfuse_lora`` gives back the weights the layers had before ``fuse_lora`` bit for bit (fusing
    keeps a copy of the fused layers' base weights on the CPU until they are unfused or unloaded), and the adapter
    scales ``fuse_lora(lora_scale=...)`` applied; loading checks that the file fits the transformer (family, widths,
    depth) before anything is changed.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"
    text_encoder_name = "text_encoder"
    _lora_transformer_class = ""  # the transformer class of the family (written into saved files)

    # -- reading -------------------------------------------------------------------------------------------------
    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        r"""The LoRA state dict of a folder (``pytorch_lora_weights.safetensors``, or ``weight_name=``), a
        ``.safetensors`` file, a Hub repository id, or a dict. safetensors only.

        With ``return_lora_metadata=True`` returns ``(state_dict, metadata)`` (the ``LoraConfig`` entries, prefixed
        by component, or None), and with ``return_family_metadata=True`` also the family entry (dict or None).
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        return_family_metadata = kwargs.pop("return_family_metadata", False)
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, (str, os.PathLike, dict)):
            raise ValueError(
                "`pretrained_model_name_or_path_or_dict` must be a folder, a .safetensors file, a Hub "
                f"repository id or a state dict, got {type(source).__name__}."
            )
        weight_name = kwargs.pop("weight_name", None)
        not_safetensors = weight_name is not None and not str(weight_name).endswith(".safetensors")
        if kwargs.pop("use_safetensors", True) is False or not_safetensors:
            raise ValueError("`weight_name`: LoRA files are safetensors only (pickled .bin files are not loaded).")
        if weight_name is not None and os.path.basename(str(weight_name)) != str(weight_name):
            raise ValueError(  # as save_lora_weights: a file of the folder, never one beside or above it
                f"`weight_name` must be a file name in the folder (`subfolder=` for one below), got {weight_name!r}."
            )
        subfolder = kwargs.pop("subfolder", None)
        hub = {
            key: kwargs.pop(key, default)
            for key, default in (
                ("local_files_only", None),
                ("cache_dir", None),
                ("force_download", False),
                ("proxies", None),
                ("token", None),
                ("revision", None),
            )
        }
        _refuse_unknown_arguments(
            "lora_state_dict", kwargs, f"return_lora_metadata, return_family_metadata, {_LORA_STATE_DICT_ARGUMENTS}"
        )
        from_hub = False
        where = _SOURCE  # what errors name: the file, or the Hub repository
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isfile(path):
                if not path.endswith(".safetensors"):
                    raise ValueError(f"{_SOURCE}: {path!r} is not a .safetensors file.")
                if subfolder:
                    raise ValueError(f"`subfolder` applies to a folder or a Hub repository, not to the file {path!r}.")
                if weight_name is not None and os.path.basename(path) != weight_name:  # it was ignored
                    raise ValueError(
                        f"`weight_name` {weight_name!r} names a file of a folder or a Hub repository; "
                        f"{_SOURCE} is the file {path!r} itself."
                    )
            elif os.path.isdir(path):
                folder = os.path.join(path, subfolder) if subfolder else path
                path = os.path.join(folder, weight_name or LORA_WEIGHT_NAME_SAFE)
                candidates = _safetensors_files(folder) if not weight_name and not os.path.isfile(path) else []
                if len(candidates) == 1:  # the folder's only .safetensors file, as diffusers takes it
                    path = os.path.join(folder, candidates[0])
                if not os.path.isfile(path):
                    found = f"; it holds {candidates[:5]}" if candidates else ""
                    hint = "" if weight_name else f" (pass `weight_name=` for another file name{found})"
                    raise ValueError(f"{_SOURCE}: no {weight_name or LORA_WEIGHT_NAME_SAFE} in {str(folder)!r}{hint}.")
            elif _is_local_path(path):  # diffusers would ask the Hub about it, or talk of offline mode
                raise ValueError(f"{_SOURCE} {path!r}: no such file or folder.")
            else:
                from_hub = True
            where = f"{_SOURCE} {path!r}"
            if not from_hub:  # diffusers reads a local file as folder + weight_name
                source, weight_name, subfolder = os.path.dirname(os.path.abspath(path)), os.path.basename(path), None
        try:
            state_dict, metadata, file_metadata = _fetch_state_dict(
                pretrained_model_name_or_path_or_dict=source,
                weight_name=weight_name,
                use_safetensors=True,
                subfolder=subfolder,
                **hub,
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                allow_pickle=False,
                return_file_metadata=True,
            )
        except json.JSONDecodeError as err:  # diffusers parses the LoraConfig header entry
            raise ValueError(f"{where}: the `{LORA_ADAPTER_METADATA_KEY}` header entry is not JSON ({err}).") from None
        except (OSError, ValueError, SafetensorError) as err:
            if from_hub:  # a repository id, or a typo of a local path: say both
                raise ValueError(
                    f"{where}: no such file or folder, and no LoRA could be loaded from the Hub repository of that "
                    f"name ({_first_line(err)})."
                ) from None
            raise ValueError(f"{where}: not a readable safetensors file ({_first_line(err)}).") from None
        except Exception as err:  # noqa: BLE001 - the Hub client's network errors (httpx / requests), when offline
            if not from_hub:
                raise
            raise ValueError(
                f"{where}: no such file or folder, and the Hub could not be asked for a repository of that name "
                f"({type(err).__name__}: {_first_line(err)})."
            ) from None
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"{where}: the `{LORA_ADAPTER_METADATA_KEY}` header entry is not a JSON object.")
        family = None
        if file_metadata and file_metadata.get(FAMILY_METADATA_KEY):
            try:
                family = json.loads(file_metadata[FAMILY_METADATA_KEY])
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: the `{FAMILY_METADATA_KEY}` header entry is not JSON ({err}).") from None
            if not isinstance(family, dict):
                raise ValueError(f"{where}: the `{FAMILY_METADATA_KEY}` header entry is not a JSON object.")
        out = (state_dict,)
        if return_lora_metadata:
            out += (metadata,)
        if return_family_metadata:
            out += (family,)
        return out if len(out) > 1 else state_dict

    def _split_by_component(self, state_dict: dict) -> dict[str, dict]:
        """``{component: state dict without its prefix}``. A dict whose keys carry no component prefix (e.g.
        ``peft.get_peft_model_state_dict(pipe.transformer)``) is the transformer's."""
        prefixes = [getattr(self, f"{c}_name", c) for c in self._lora_loadable_modules]
        if not any(key.split(".", 1)[0] in prefixes for key in state_dict):
            return {self.transformer_name: dict(state_dict)}
        parts = {prefix: {} for prefix in prefixes}
        unknown = []
        for key, value in state_dict.items():
            prefix, _, rest = key.partition(".")
            if prefix in parts:
                parts[prefix][rest] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"`pretrained_model_name_or_path_or_dict`: keys {unknown[:3]} belong to none of this "
                f"pipeline's LoRA components {prefixes}."
            )
        return {prefix: part for prefix, part in parts.items() if part}

    def check_lora_state_dict(
        self, state_dict: dict, metadata: dict | None = None, family: dict | None = None, source_name: str = _SOURCE
    ) -> None:
        """``ValueError`` when a LoRA state dict (with component prefixes, or the transformer's without) cannot be
        loaded into this pipeline: values that are no finite floating-point tensors, made for another transformer
        class, keys naming no layer, widths, ranks or depth that differ, an unusable ``LoraConfig`` in ``metadata``.
        ``source_name``: how the messages name the file (default: the parameter)."""
        if not isinstance(state_dict, dict) or not state_dict:
            raise ValueError(f"{source_name} holds no tensors.")
        if not all(isinstance(key, str) and "lora" in key for key in state_dict):
            raise ValueError(
                f"{source_name}: invalid LoRA checkpoint: every key must contain `lora` (PEFT names such as "
                "`transformer.blocks.0.attn.to_qkv.lora_A.weight`)."
            )
        unusable = lora_tensor_problems(state_dict)
        if unusable:
            shown = "; ".join(unusable[:3]) + (f"; ... ({len(unusable)} tensors)" if len(unusable) > 3 else "")
            raise ValueError(f"{source_name}: not usable LoRA weights: {shown}.")
        transformer = getattr(self, self.transformer_name, None)
        if family and transformer is not None:
            made_for = family.get("transformer_class")
            if made_for and made_for not in {c.__name__ for c in type(transformer).__mro__}:
                made_by = family.get("pipeline_class", "another pipeline")
                raise ValueError(
                    f"{source_name}: this LoRA was made for a {made_for} "
                    f"({made_by}); this pipeline's transformer is a {type(transformer).__name__}."
                )
        problems = []
        for component, part in self._split_by_component(state_dict).items():
            model = getattr(self, component, None)
            if model is None:
                problems.append(f"the adapter has {component} weights but this pipeline has no {component}")
                continue
            config = None
            prefixed = _component_metadata(metadata, component)
            if prefixed:
                from peft import LoraConfig

                try:
                    config = LoraConfig(**prefixed)
                except (TypeError, ValueError) as err:
                    raise ValueError(
                        f"{source_name}: the {component} LoRA metadata is not a LoraConfig ({_first_line(err)})."
                    ) from None
            problems += [f"{component}: {p}" for p in lora_mismatches(part, model, config)]
        if problems:
            shown = _some(problems, 4)
            raise ValueError(
                f"{source_name}: this LoRA does not fit the pipeline's "
                f"{type(transformer).__name__ if transformer is not None else 'models'}: {shown}."
            )

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, hotswap: bool = False, **kwargs
    ):
        r"""Load a LoRA into the transformer (and text encoder, when the file has ``text_encoder.`` keys; CoDe's
        refiner, ``refiner.`` keys) as adapter ``adapter_name`` (default ``default_0``, ``default_1``, ...), made
        active.

        Args:
            pretrained_model_name_or_path_or_dict: a folder holding ``pytorch_lora_weights.safetensors``, a
                ``.safetensors`` file, a Hub repository id, or a state dict (PEFT key names, with ``transformer.`` /
                ``text_encoder.`` prefixes or, for the transformer alone, without).
            adapter_name: the adapter's name (``set_adapters``, ``delete_adapters``).
            hotswap: replace the weights of the already loaded adapter ``adapter_name`` in place (diffusers'; the
                transformer's and refiner's adapters, not on embedding layers).
            kwargs: ``weight_name``, ``subfolder``, ``local_files_only``, ``low_cpu_mem_usage``, ... (diffusers').

        A ``ValueError`` (before anything changes) when the file cannot be read, holds no usable weights, or was made
        for another family or transformer shape (widths, ranks, depth); if loading fails all the same, every model is
        put back as it was.
        """
        if adapter_name is not None:  # it becomes a key of PEFT's torch ModuleDicts
            check_adapter_name(adapter_name)
        if not is_bool(hotswap):
            raise ValueError(f"`hotswap` must be True or False, got {hotswap!r}.")
        hotswap = bool(hotswap)
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        # diffusers ignores the rest without a word (adaptor_name=, lora_scale=, ...)
        unknown = {k: v for k, v in kwargs.items() if k not in _LORA_STATE_DICT_ARGUMENTS.split(", ")}
        _refuse_unknown_arguments(
            "load_lora_weights",
            unknown,
            f"pretrained_model_name_or_path_or_dict, adapter_name, hotswap, low_cpu_mem_usage, "
            f"{_LORA_STATE_DICT_ARGUMENTS}",
        )
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            source = dict(source)
        state_dict, metadata, family = self.lora_state_dict(
            source, return_lora_metadata=True, return_family_metadata=True, **kwargs
        )
        source_name = _SOURCE if isinstance(source, dict) else f"{_SOURCE} {os.fspath(source)!r}"
        self.check_lora_state_dict(state_dict, metadata, family, source_name=source_name)
        parts = self._split_by_component(state_dict)
        loaded = self._loaded_adapter_names()
        if adapter_name is None:  # the first free of default_0, default_1, ... over every component's adapters
            adapter_name = next(f"default_{i}" for i in itertools.count() if f"default_{i}" not in loaded)
        model_components = [c for c in self._lora_loadable_modules if c != self.text_encoder_name]
        if hotswap:
            holders = [
                c for c in model_components if adapter_name in getattr(getattr(self, c, None), "peft_config", {})
            ]
            if not holders:
                raise ValueError(f"`hotswap`: no adapter {adapter_name!r} to replace (loaded: {sorted(loaded)}).")
            if parts.get(self.text_encoder_name):
                raise ValueError(f"`hotswap`: hot-swapping applies to the adapters of {model_components} only.")
            # each model holding the adapter gets the file's weights for it, and the file has none for another
            for component in [c for c in model_components if c in holders or c in parts]:
                _check_hotswap_layers(getattr(self, component), adapter_name, parts.get(component) or {}, component)
        if not hotswap and adapter_name in loaded:
            raise ValueError(
                f"`adapter_name` {adapter_name!r} is already loaded (loaded: {sorted(loaded)}): pick another name, "
                "or pass `hotswap=True` to replace its weights."
            )
        self._unfuse_before("load_lora_weights")
        models = [getattr(self, c) for c in parts]
        # after disable_lora the pipeline stays disabled until enable_lora: PEFT makes new layers enabled, and an
        # adapter reaching layers the others do not would run only there
        layers = list(self._lora_layers(self._lora_loadable_modules))
        disabled = bool(layers) and all(layer.disable_adapters for layer in layers)
        with _restored_on_failure(models, adapter_name, hotswap):
            for component in [c for c in model_components if c in parts]:  # the transformer (CoDe: and refiner)
                model = getattr(self, component)
                model.load_lora_adapter(
                    parts[component],
                    prefix=None,
                    adapter_name=adapter_name,
                    metadata=_component_metadata(metadata, component) or None,
                    _pipeline=self,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                    hotswap=hotswap,
                )
                if hotswap:  # the layers took the new rank and scale; the adapter's config kept the old ones
                    _update_hotswapped_config(
                        model.peft_config[adapter_name], _component_metadata(metadata, component), parts[component]
                    )
                match_adapter_mode(model, adapter_name)
            text_part = parts.get(self.text_encoder_name)
            if text_part:
                meta = _component_metadata(metadata, self.text_encoder_name) or None
                self._load_text_encoder_adapter(text_part, meta, adapter_name)
            if disabled:
                for layer in self._lora_layers(list(parts)):
                    layer.enable_adapters(False)

    def _loaded_adapter_names(self) -> set[str]:
        return {name for names in self.get_list_adapters().values() for name in names}

    def _load_text_encoder_adapter(self, state_dict: dict, metadata: dict | None, adapter_name: str) -> None:
        """PEFT's ``inject_adapter_in_model`` + ``set_peft_model_state_dict`` on the text encoder, with the
        ``LoraConfig`` of the file header (or, without one, the ranks and layers of the tensors and scale 1)."""
        from peft import LoraConfig, set_peft_model_state_dict

        if metadata:
            config = LoraConfig(**metadata)
        else:
            ranks = {
                key.rsplit(".lora_B", 1)[0]: value.shape[1]
                for key, value in state_dict.items()
                if ".lora_B." in key and value.ndim == 2
            }
            rank = max(ranks.values())
            config = LoraConfig(
                r=rank,
                lora_alpha=rank,
                target_modules=sorted(ranks),
                rank_pattern={name: r for name, r in ranks.items() if r != rank},
                alpha_pattern={name: r for name, r in ranks.items() if r != rank},
            )
        text_encoder = getattr(self, self.text_encoder_name)
        add_text_encoder_adapter(text_encoder, config, adapter_name)
        result = set_peft_model_state_dict(text_encoder, state_dict, adapter_name=adapter_name)
        unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
        if unexpected:
            raise ValueError(
                f"`pretrained_model_name_or_path_or_dict`: text encoder LoRA keys {unexpected[:3]} were not used."
            )

    # -- writing -------------------------------------------------------------------------------------------------
    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor | nn.Module] | None = None,
        text_encoder_lora_layers: dict[str, torch.Tensor | nn.Module] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        text_encoder_lora_adapter_metadata: dict | None = None,
        refiner_lora_layers: dict[str, torch.Tensor | nn.Module] | None = None,
        refiner_lora_adapter_metadata: dict | None = None,
    ):
        r"""Write ``pytorch_lora_weights.safetensors`` (or ``weight_name``) into ``save_directory``.

        Args:
            transformer_lora_layers: the transformer's LoRA weights, e.g.
                ``peft.utils.get_peft_model_state_dict(pipe.transformer, adapter_name="default")``.
            text_encoder_lora_layers: the text encoder's (STAR / Infinity), likewise.
            refiner_lora_layers: the refiner's (:class:`VARCoDePipeline`), likewise (``refiner.`` keys).
            transformer_lora_adapter_metadata: the adapter's ``LoraConfig.to_dict()``
                (``pipe.transformer.peft_config["default"].to_dict()``); without it a loader takes the rank from the
                tensors and scale 1 (``lora_alpha = rank``), as diffusers does. Likewise for the text encoder
                (``text_encoder_lora_adapter_metadata``) and the refiner (``refiner_lora_adapter_metadata``).
            is_main_process, save_function: diffusers' (several processes; a custom writer of ``(tensors, path)``).
            safe_serialization: ``False`` is noted and ignored (safetensors only: a pickle can run code).
        """
        if not safe_serialization and is_main_process:
            logger.warning(SAFETENSORS_ONLY)
        if weight_name is not None and (
            not isinstance(weight_name, str)
            or not weight_name.endswith(".safetensors")
            or os.path.basename(weight_name) != weight_name  # a path would write outside save_directory
        ):
            raise ValueError(f"`weight_name` must be a file name ending with .safetensors, got {weight_name!r}.")
        given = {  # component (the key prefix): its layers and metadata
            "transformer": (transformer_lora_layers, transformer_lora_adapter_metadata),
            "text_encoder": (text_encoder_lora_layers, text_encoder_lora_adapter_metadata),
            "refiner": (refiner_lora_layers, refiner_lora_adapter_metadata),
        }
        lora_layers, lora_metadata = {}, {}
        for component, (layers, metadata) in given.items():
            if not layers:
                continue
            if component not in cls._lora_loadable_modules:
                raise ValueError(f"`{component}_lora_layers`: {cls.__name__} has no {component.replace('_', ' ')}.")
            lora_layers[component] = layers
            lora_metadata[component] = _json_safe(metadata, f"{component}_lora_adapter_metadata")
        if not lora_layers:
            raise ValueError(
                f"Pass {' or '.join(f'`{c}_lora_layers`' for c in cls._lora_loadable_modules)} (none was given)."
            )
        for component, layers in lora_layers.items():  # what load_lora_weights would refuse, refused before writing
            parameter = f"{component}_lora_layers"
            tensors = layers.state_dict() if isinstance(layers, torch.nn.Module) else layers
            problems = lora_tensor_problems(tensors)
            if problems:
                raise ValueError(
                    f"`{parameter}` must map names to tensors (finite, floating point): {'; '.join(problems[:3])}."
                )
            not_lora = [key for key in tensors if not isinstance(key, str) or not _LORA_KEY.match(key)]
            if not_lora:
                raise ValueError(
                    f"`{parameter}`: {not_lora[:3]} are no LoRA weights (PEFT's names: `<module>.lora_A.weight` / "
                    f"`.lora_B.weight`, e.g. `blocks.0.attn.to_qkv.lora_A.weight`){_adapter_name_hint(not_lora)}."
                )
            prefixed = [key for key in tensors if key.startswith(f"{component}.")]
            if prefixed:  # the file would hold `transformer.transformer.`, which no load finds
                raise ValueError(
                    f"`{parameter}`: {prefixed[:3]} start with `{component}.`, which the save adds; pass the names "
                    "without it."
                )
            _check_saved_metadata(lora_metadata[component], tensors, parameter.replace("layers", "adapter_metadata"))
        if os.path.isfile(save_directory):  # diffusers only logs this and writes nothing
            raise ValueError(f"`save_directory` {str(save_directory)!r} is a file, not a folder.")
        header = {"format": "pt"}
        packed = {f"{prefix}.{k}": v for prefix, meta in lora_metadata.items() if meta for k, v in meta.items()}
        if packed:
            header[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        family = {"pipeline_class": cls.__name__, "transformer_class": cls._lora_transformer_class}
        header[FAMILY_METADATA_KEY] = json.dumps(family, sort_keys=True)

        def write(tensors, path):
            """Atomically: a reader (or a crash mid-write) never sees half a file, and a file already there stays
            whole until the new one is complete (diffusers writes in place)."""
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
            if save_function is not None:  # a custom save_function may write nothing (other processes)
                write_atomic(path, lambda tmp: save_function(tensors, str(tmp)), may_write_nothing=True)
            else:
                write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=lora_layers,
            lora_metadata={},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=write,
            safe_serialization=True,
        )

    # -- fusing (exactly reversible) ---------------------------------------------------------------------------
    def _lora_layers(self, components):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for component in components:
            model = getattr(self, component, None)
            if isinstance(model, nn.Module):
                for module in model.modules():
                    if isinstance(module, BaseTunerLayer):
                        yield module

    def _check_components(self, components) -> list[str]:
        if isinstance(components, str):  # one name, as adapter_names takes it (a string was split into letters)
            components = [components]
        components = list(self._lora_loadable_modules if components is None else components)
        bad = [c for c in components if c not in self._lora_loadable_modules]
        if not components or bad:
            raise ValueError(
                f"`components` must be a non-empty list of {self._lora_loadable_modules}, got {components}."
            )
        return components

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        r"""Merge the active adapters (or ``adapter_names``), scaled by ``lora_scale``, into the weights of
        ``components`` (default: every LoRA component): inference then costs what the base model costs (the fast path
        runs fused adapters at full speed). :meth:`unfuse_lora` restores the weights exactly."""
        _refuse_unknown_arguments("fuse_lora", kwargs, "components, lora_scale, safe_fusing, adapter_names")
        if not is_bool(safe_fusing):
            raise ValueError(f"`safe_fusing` must be True or False, got {safe_fusing!r}.")
        components = self._check_components(components)
        if not is_number(lora_scale) or not math.isfinite(lora_scale):
            raise ValueError(f"`lora_scale` must be a finite number, got {lora_scale!r}.")
        lora_scale = float(lora_scale)
        if adapter_names is not None:  # diffusers fuses nothing, without a word, for a name it does not know
            adapter_names = self._check_adapter_names(adapter_names)
        layers = list(self._lora_layers(components))
        # PEFT merges disabled adapters, then its next forward unmerges them by subtracting the update again: the
        # base weights ended off by rounding, nothing fused, and fuse + unload + save shipped the base model
        disabled = [c for c in components if any(layer.disable_adapters for layer in self._lora_layers([c]))]
        if disabled:
            raise ValueError(
                f"`fuse_lora`: the adapters of {disabled} are disabled (`disable_lora()`); call `enable_lora()` "
                "first, then `fuse_lora()`."
            )
        if adapter_names is not None:
            # once one adapter is merged, PEFT's forward skips the unmerged ones: the others active stopped running
            left_out = sorted({a for layer in layers for a in layer.active_adapters} - set(adapter_names))
            if left_out:
                raise ValueError(
                    f"`adapter_names` {adapter_names} leaves out the active adapters {left_out}, which would stop "
                    "running once the others are fused; fuse all active adapters, or `set_adapters(...)` first."
                )
        for layer in layers:  # PEFT failed half-way (a layer merged, its delta then applied twice): refuse first
            fused = adapter_names if adapter_names is not None else layer.active_adapters
            with_bias = [a for a in fused if getattr(layer, "lora_bias", {}).get(a)]
            if with_bias and getattr(layer.get_base_layer(), "bias", None) is None:
                raise ValueError(
                    f"`fuse_lora`: adapter {with_bias[0]!r} has a LoRA bias (lora_bias=True) but its layer "
                    f"{type(layer.get_base_layer()).__name__} has no bias to merge it into; it can run unfused only."
                )
        for layer in self._lora_layers(components):
            # the weights before the first fusion (later ones add to them), kept on the layer: a pipeline sharing
            # the transformer (from_pipe, CoDe) unfuses it exactly too
            if _FUSE_SNAPSHOT not in layer.__dict__:
                weight = layer.get_base_layer().weight.detach().to("cpu", copy=True)
                layer.__dict__[_FUSE_SNAPSHOT] = (weight, dict(layer.scaling))
            else:  # an adapter loaded since the first fusion: its scale before this one
                for adapter, scale in layer.scaling.items():
                    layer.__dict__[_FUSE_SNAPSHOT][1].setdefault(adapter, scale)
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=bool(safe_fusing),
            adapter_names=adapter_names,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        r"""Undo :meth:`fuse_lora` for ``components`` (default: every LoRA component): the layers get back the exact
        weights they had before fusing, and the adapters their scales (diffusers' own unfuse subtracts the update
        again, which is exact only up to float rounding, and keeps ``lora_scale`` in the adapter scales)."""
        _refuse_unknown_arguments("unfuse_lora", kwargs, "components")
        components = self._check_components(components)
        super().unfuse_lora(components=components)
        for layer in self._lora_layers(components):
            saved = layer.__dict__.pop(_FUSE_SNAPSHOT, None)
            if saved is not None:
                weight, scaling = saved
                base_weight = layer.get_base_layer().weight
                with torch.no_grad():
                    base_weight.copy_(weight.to(base_weight.device, base_weight.dtype))
                layer.scaling.update({k: v for k, v in scaling.items() if k in layer.scaling})

    def _unfuse_before(self, method: str) -> None:
        """Unfuse fused adapters exactly (:meth:`unfuse_lora`) before ``method``, after which PEFT unmerges them on its
        own by subtracting the update again (base weights off by float rounding) and the fused bookkeeping went stale
        (``set_adapters`` refused "fused" adapters that no weight held any more)."""
        if any(_FUSE_SNAPSHOT in layer.__dict__ for layer in self._lora_layers(self._lora_loadable_modules)):
            logger.warning(f"`{method}` with fused adapters: unfused them first (`unfuse_lora()`), as PEFT would.")
            self.unfuse_lora()

    def disable_lora(self):
        """diffusers' ``disable_lora`` (the base model's outputs); fused adapters are unfused first, exactly."""
        self._unfuse_before("disable_lora")
        super().disable_lora()

    def unload_lora_weights(self):
        """Remove every adapter; the models are the plain base models again. Fused adapters stay fused (diffusers'
        behaviour: ``fuse_lora`` then ``unload_lora_weights`` keeps the merged weights without the LoRA layers);
        call :meth:`unfuse_lora` first for the base weights."""
        super().unload_lora_weights()  # (the LoRA layers go, with the snapshots they hold)

    def _check_adapter_names(self, adapter_names, parameter: str = "adapter_names") -> list[str]:
        """``adapter_names`` (a name or a non-empty list of names) as a list; a ``ValueError`` naming ``parameter``,
        the unknown names and the loaded ones when some are not loaded."""
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"`{parameter}` must be a name or a non-empty list of names, got {adapter_names!r}.")
        loaded = self._loaded_adapter_names()
        missing = [n for n in names if n not in loaded]
        if missing:
            raise ValueError(f"`{parameter}`: {missing} not loaded (loaded: {sorted(loaded)}).")
        return list(names)

    def delete_adapters(self, adapter_names: list[str] | str):
        """Remove the adapters ``adapter_names`` from every component (diffusers' ``delete_adapters``, which ignores
        names it does not know: here they are a ``ValueError``). Fused adapters are unfused first, exactly, so the base
        weights keep no deleted adapter's update."""
        names = self._check_adapter_names(adapter_names)
        # a fused adapter's update lives in the base weights, which deleting its layers would keep for good
        self._unfuse_before("delete_adapters")
        super().delete_adapters(names)
        # diffusers forgets a text encoder's adapter config only when transformers' own loader put it there (a flag
        # that PEFT's inject_adapter_in_model, which add_text_encoder_adapter uses, does not set)
        text_encoder = getattr(self, "text_encoder", None)
        configs = getattr(text_encoder, "peft_config", None)
        if isinstance(configs, dict):
            for name in names:
                configs.pop(name, None)
            if not configs:
                del text_encoder.peft_config

    def set_adapters(self, adapter_names: list[str] | str, adapter_weights=None):
        r"""Activate ``adapter_names`` with ``adapter_weights`` (a number per adapter, default 1.0; 0 gives the base
        model's outputs; or a dict ``{component: number}`` per adapter). diffusers' ``set_adapters``, with the
        arguments checked."""
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"`adapter_names` must be a name or a non-empty list of names, got {adapter_names!r}.")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"`adapter_weights` has {len(weights)} entries for {len(names)} adapters.")
        if len(set(names)) != len(names):  # peft kept both, and the last weight won without a word
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"`adapter_names` names {repeated} more than once; give each adapter once.")

        def is_scale(value) -> bool:
            return value is None or (is_number(value) and math.isfinite(value))

        def as_python(value):  # numpy scalars as Python floats, for peft
            return float(value) if is_number(value) else value

        for weight in weights:
            if isinstance(weight, dict):  # per component; diffusers drops unknown components with a warning only
                unknown = [c for c in weight if c not in self._lora_loadable_modules]
                if unknown or not all(is_scale(v) for v in weight.values()):
                    raise ValueError(
                        f"`adapter_weights`: a dict maps components {self._lora_loadable_modules} to finite "
                        f"numbers, got {weight!r}."
                    )
            elif not is_scale(weight):
                raise ValueError(
                    f"`adapter_weights` must be finite numbers (one per adapter), got {adapter_weights!r}."
                )
        if adapter_weights is not None:
            adapter_weights = [
                {c: as_python(v) for c, v in w.items()} if isinstance(w, dict) else as_python(w) for w in weights
            ]
        names = self._check_adapter_names(names)
        if any(_FUSE_SNAPSHOT in layer.__dict__ for layer in self._lora_layers(self._lora_loadable_modules)):
            raise ValueError(
                "`set_adapters` on fused adapters: the weights hold them at the scales they were fused with; call "
                "`unfuse_lora()` first, then `set_adapters(...)` (and `fuse_lora()` again)."
            )
        super().set_adapters(names, adapter_weights)


class VARLoraLoaderMixin(NextScaleLoraLoaderMixin):
    """LoRA loading for :class:`VARPipeline` (the transformer)."""

    _lora_transformer_class = "VARTransformer2DModel"


class STARLoraLoaderMixin(NextScaleLoraLoaderMixin):
    """LoRA loading for :class:`STARPipeline` (the transformer and, optionally, the text encoder)."""

    _lora_loadable_modules = ["transformer", "text_encoder"]
    _lora_transformer_class = "STARTransformer2DModel"


class InfinityLoraLoaderMixin(NextScaleLoraLoaderMixin):
    """LoRA loading for :class:`InfinityPipeline` (the transformer and, optionally, the text encoder)."""

    _lora_loadable_modules = ["transformer", "text_encoder"]
    _lora_transformer_class = "InfinityTransformer2DModel"


@functools.lru_cache(maxsize=None)
def _is_tuner_layer_class(cls: type) -> bool:
    """``issubclass(cls, BaseTunerLayer)``, remembered per class: an ABC's ``isinstance`` costs about a microsecond,
    for every module of a walk that runs at every fast generation."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return issubclass(cls, BaseTunerLayer)


def adapter_state(model: nn.Module | None) -> tuple:
    """A hashable summary of what the LoRA layers of ``model`` compute now (adapters, active ones, merged ones,
    scales, enabled, and where and how large their weights are: a hot-swap to another rank gives them new storage,
    which captured CUDA graphs would not read): it changes whenever loading, fusing, switching or scaling adapters
    changes the outputs."""
    if model is None or not is_peft_available():
        return ()
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any_submodule(model, lambda module: _is_tuner_layer_class(type(module))):
        return ()  # (asked at every fast generation: the named walk below costs milliseconds on the large models)
    state = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            scaling = getattr(module, "scaling", {})
            state.append(
                (
                    name,
                    tuple(module.active_adapters),
                    tuple(module.merged_adapters),
                    module.disable_adapters,
                    tuple(sorted((k, float(v)) for k, v in scaling.items())),
                    tuple(
                        (key, weight.data_ptr(), tuple(weight.shape))
                        for key, weight in module.named_parameters()
                        if "lora_" in key
                    ),
                )
            )
    return tuple(state)
