"""Loading and saving of the package's models: diffusers' ``ModelMixin.from_pretrained`` / ``save_pretrained``,
checked. diffusers loads weights that do not fit the config with a log line (missing ones stay on the meta device and
fail at the first call; unused ones are dropped, so a folder whose config and weights disagree generates other
images), and saves into the target folder file by file."""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable

import torch
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, _add_variant, logging
from safetensors import SafetensorError
from torch import nn

from ..file_utils import (
    SAFETENSORS_ONLY,
    refuse_interrupted_save,
    save_folder_atomic,
    write_atomic,
)
from ..scalars import is_bool, is_integer, is_number

logger = logging.get_logger(__name__)


def any_submodule(module: nn.Module, predicate) -> bool:
    """Whether ``predicate`` holds for ``module`` or any submodule: a walk over the ``_modules`` dicts, without
    ``named_modules``' names and memo set (a fraction of its cost; the pipelines ask at every call)."""
    stack = [module]
    while stack:
        current = stack.pop()
        if current is None:  # (a child registered as None)
            continue
        if predicate(current):
            return True
        children = current.__dict__["_modules"]
        if children:
            stack += children.values()  # (a generator per module cost three times the walk)
    return False


PUSH_KWARGS = ("repo_id", "token", "private", "commit_message", "create_pr")
# what building a model from a config of wrong types or values raises from inside torch (a negative dimension,
# num_heads 0, a string size)
_BUILD_ERRORS = (TypeError, ValueError, ZeroDivisionError, RuntimeError)
# set on a model while a pipeline's fast path (enable_fast_inference) holds it fitted: its offloading and casting
# hooks would move or cast the weights the fast path's kernels and CUDA graphs read
FAST_PATH_ATTRIBUTE = "_diffusers_var_fast_path_on"


class ConfigBuildError(ValueError):
    """A config that does not build the model (raised by ``from_config``; ``from_pretrained`` adds the folder)."""


def _initialise_skipped_(model: nn.Module) -> None:
    """The weights that ``ignore_mismatched_sizes=True`` skipped as their model's initialisation gives them (a model
    built from the same config), in the dtype and device of the loaded ones: diffusers left them on the meta device,
    and the model failed at its first call."""
    skipped = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if not skipped:
        return
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        initialised = type(model).from_config(model.config)
    fresh = dict((*initialised.named_parameters(), *initialised.named_buffers()))
    kept_in_float32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name in skipped:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        loaded = next((t for t in (*owner.parameters(), *model.parameters()) if not t.is_meta), None)
        dtype = loaded.dtype if loaded is not None and fresh[name].is_floating_point() else fresh[name].dtype
        if fresh[name].is_floating_point() and kept_in_float32 & set(name.split(".")):
            dtype = torch.float32
        device = loaded.device if loaded is not None else torch.device("cpu")
        value = fresh[name].detach().to(device, dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
        else:
            owner._buffers[leaf] = value


def _listed(keys, limit: int = 5) -> str:
    keys = sorted(str(k) for k in keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def lora_adapter_names(module) -> list[str]:
    """The PEFT adapters injected into ``module`` (LoRA layers wrapping its own), ``[]`` without any."""
    if "peft" not in sys.modules:  # no adapter can have been injected without importing peft
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(layer, BaseTunerLayer) for layer in module.modules()):
        return []
    return sorted(getattr(module, "peft_config", None) or {}) or ["(unnamed)"]


def refuse_lora_layers(module, name: str) -> None:
    """A ValueError when ``module`` holds injected LoRA layers: its saved weights would carry PEFT's wrapped names
    (``...base_layer.weight``, ``lora_A``), which no loader maps back to the model."""
    adapters = lora_adapter_names(module)
    if adapters:
        raise ValueError(
            f"`save_pretrained`: the {name} holds LoRA adapters {adapters}, whose layers would be saved under PEFT's "
            "wrapped names, a folder that does not load. Save the adapters with `save_lora_weights`; to save the "
            "weights with the adapters in them, call `fuse_lora()` and then `unload_lora_weights()` first "
            "(`unload_lora_weights()` alone leaves the base weights)."
        )


def push_folder_to_hub(
    owner,
    folder: Path,
    is_pipeline: bool,
    repo_id=None,
    token=None,
    private=None,
    commit_message=None,
    create_pr=False,
) -> None:
    """What diffusers' ``save_pretrained(push_to_hub=True)`` does after saving: create the repository (named after
    the folder by default), write the model card, upload the folder (``owner``: the pipeline or model)."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
    from huggingface_hub import create_repo

    repo_id = create_repo(repo_id or folder.name, exist_ok=True, private=private, token=token).repo_id
    card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=is_pipeline))
    write_atomic(folder / "README.md", lambda tmp: card.save(str(tmp)))
    owner._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)


# config arguments that are sizes or counts: a whole number >= 1 (other integers >= 0); checked whatever builds the
# model (and by training's `model.*` keys)
SIZE_ARGUMENTS = {
    "in_channels", "out_channels", "ch", "base_channels", "vocab_size", "z_channels", "codebook_dim", "quant_conv_ks",
    "num_classes", "depth", "embed_dim", "num_heads", "latent_channels", "text_embed_dim", "sampler_depth",
    "bits_per_token", "text_dim", "text_max_length", "pool_num_heads", "block_chunks", "num_level_embeddings",
}  # fmt: skip


# float config arguments with a range: (low, high, whether low itself is allowed, whether high is), None unbounded
FLOAT_RANGES = {
    "mlp_ratio": (0.0, None, False, False),
    "norm_eps": (0.0, None, False, False),
    "rope_theta": (0.0, None, False, False),
    "rope_norm": (0.0, None, False, False),
    "beta": (0.0, None, True, False),
    "cond_drop_rate": (0.0, 1.0, True, True),
    "dropout": (0.0, 1.0, True, False),
    "drop_path_rate": (0.0, 1.0, True, False),
}


def _float_range_problem(name: str, value: float) -> str | None:
    if name not in FLOAT_RANGES:
        return None
    low, high, low_in, high_in = FLOAT_RANGES[name]
    above = value >= low if low_in else value > low
    if high is None:
        return None if above else f"a finite number {'>=' if low_in else '>'} {low:g}"
    below = value <= high if high_in else value < high
    return None if above and below else f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def config_problem(name: str, annotation: str, value) -> str | None:
    """What is wrong with the config argument ``name`` = ``value`` for its annotation (``int``, ``float``, ``bool``,
    ``Sequence[int]``, optionally ``| None``), or ``None``."""
    if annotation.endswith(" | None"):
        if value is None:
            return None
        annotation = annotation[: -len(" | None")]
    if annotation == "int":
        low = 1 if name in SIZE_ARGUMENTS else 0
        return None if is_integer(value) and value >= low else f"a whole number >= {low}"
    if annotation == "float":
        if not is_number(value) or not math.isfinite(value):
            return "a finite number"
        return _float_range_problem(name, value)
    if annotation == "bool":
        return None if is_bool(value) else "true or false"
    if annotation == "Sequence[int]":
        good = isinstance(value, (list, tuple)) and value and all(is_integer(v) and v >= 1 for v in value)
        return None if good else "a non-empty list of whole numbers >= 1"
    return None


def check_config_arguments(model_class: type, signature: inspect.Signature, arguments: dict) -> None:
    """A ValueError naming the first config argument of ``model_class`` whose value does not fit its annotation."""
    for name, parameter in signature.parameters.items():
        if name in arguments and isinstance(parameter.annotation, str):
            problem = config_problem(name, parameter.annotation, arguments[name])
            if problem:
                raise ValueError(f"`{name}` of {model_class.__name__} must be {problem}, got {arguments[name]!r}.")


# the dtypes the models compute in (float8 runs only as the fast path's matmul weights)
LOADING_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_shard_index(folder: Path, variant, model_name: str) -> None:
    """A sharded model's index as diffusers reads it (without checks: a damaged one raised a JSONDecodeError,
    KeyError or TypeError from deep inside): a ValueError naming the file instead."""
    path = folder / _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant if isinstance(variant, str) else None)
    if not path.is_file():
        return
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"not JSON: {err}"
    else:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(index, dict):
            problem = f"a JSON {type(index).__name__}, not an object"
        elif not isinstance(weight_map, dict):
            problem = "no `weight_map` object of weight names to shard file names"
        elif not all(isinstance(shard, str) for shard in weight_map.values()):
            problem = "a `weight_map` whose values are not all shard file names"
        elif not isinstance(index.get("metadata"), dict):
            problem = "no `metadata` object"
        else:
            return
    raise ValueError(
        f"cannot load a {model_name} from {str(folder)!r}: its shard index {path.name} is damaged ({problem}); save "
        "or convert it again."
    )


# the most parameters a config may build (10x the largest released model, Infinity-20B) and the most blocks (the
# released models have a few dozen): a typo such as depth=300000 filled the memory for a minute before failing, and
# blocks of a tiny width cost their Python objects' memory whatever their parameters
MAX_MODEL_PARAMETERS = 2 * 10**11
MAX_DEPTH = 1024


def check_model_size(model_class: type, arguments: dict) -> None:
    """A ValueError when a transformer's config would build more than :data:`MAX_MODEL_PARAMETERS` parameters,
    before anything is allocated. The estimate counts the blocks' attention, FFN and AdaLN matrices and the
    vocabulary / class tables: a lower bound."""
    if "depth" not in arguments or "embed_dim" not in arguments:
        return
    depth, width = arguments["depth"], arguments["embed_dim"]
    if depth > MAX_DEPTH:
        raise ValueError(f"`depth` of {model_class.__name__} must be at most {MAX_DEPTH} blocks, got {depth}.")
    per_block = (4 + 2 * float(arguments.get("mlp_ratio", 4.0)) + 6) * width**2
    tables = (2 * arguments.get("vocab_size", 0) + arguments.get("num_classes", 0)) * width
    estimate = depth * per_block + tables
    if estimate > MAX_MODEL_PARAMETERS:
        raise ValueError(
            f"{model_class.__name__} of `depth` {depth}, `embed_dim` {width} (and the FFN / vocabulary sizes) would "
            f"hold about {estimate:.2g} parameters, more than the {MAX_MODEL_PARAMETERS:.0e} this package builds; "
            "check the config."
        )


def check_dtype_argument(
    dtype, name: str = "dtype", per_component: bool = True, components: Iterable[str] | None = None
) -> None:
    """A loading ``dtype``: None, a ``torch.dtype``, or (``per_component``, as ``from_pretrained`` takes it) a dict
    of them by component name (one of ``components`` when given, or diffusers' ``"default"`` for the others);
    diffusers ignores anything else with a log line and loads float32 (a misspelt component too)."""
    values = dtype.values() if per_component and isinstance(dtype, dict) else [dtype]
    if not all(value is None or isinstance(value, torch.dtype) for value in values):
        forms = " or a dict of them by component name" if per_component else ""
        raise ValueError(f"`{name}` must be a torch.dtype (e.g. torch.float16){forms}, got {dtype!r}.")
    other = [value for value in values if value is not None and value not in LOADING_DTYPES]
    if other:  # float8 loaded, then failed inside torch ("add_stub" not implemented) or in diffusers' loading
        allowed = ", ".join(str(value) for value in LOADING_DTYPES)
        raise ValueError(
            f"`{name}` must be one of {allowed}, got {other[0]} (float8: enable_fast_inference(fp8=True))."
        )
    if per_component and isinstance(dtype, dict) and components is not None:
        components = sorted(components)
        unknown = [key for key in dtype if key not in components and key != "default"]
        if unknown:
            raise ValueError(
                f"`{name}` names {unknown}, which are no components of this pipeline: its keys are component names "
                f"({', '.join(components)}) or 'default' (the dtype of the others)."
            )


def check_save_arguments(variant=None, max_shard_size="10GB") -> None:
    """``save_pretrained``'s ``variant`` (None, or a name of letters, digits and underscores: it goes into the weight
    file names, where a ``/`` failed deep inside safetensors and ``""`` wrote a file no loader reads) and
    ``max_shard_size`` (a positive number of bytes, or ``"<number><TB|GB|MB|KB>"``: 0 wrote one file per tensor)."""
    import re

    from huggingface_hub.serialization._base import parse_size_to_int

    if variant is not None and not (isinstance(variant, str) and re.fullmatch(r"\w+", variant)):
        raise ValueError(
            f"`variant` must be None or a name of letters, digits and underscores (e.g. 'fp16'), got {variant!r}."
        )
    try:
        size = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    except ValueError:
        size = None
    if not is_integer(size) or size <= 0:
        raise ValueError(
            f"`max_shard_size` must be a positive number of bytes or a size such as '10GB' (units TB, GB, MB, KB), "
            f"got {max_shard_size!r}."
        )


class CheckedLoadingMixin:
    """``from_pretrained`` refuses a folder whose weights do not fit its config (missing, unused or misshapen weights,
    named with the folder), a config that cannot build the model, and a folder a killed save left half rewritten;
    ``save_pretrained`` writes through a staging folder (an interrupted save leaves the folder as it was) and refuses
    a model holding injected LoRA layers. Its subclasses' config arguments are checked against their annotations
    when the model is built (a ValueError naming the argument, not a ZeroDivisionError from inside). Put before
    ``ModelMixin`` in the bases."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)  # (diffusers reads the config arguments from the signature, which this keeps)
        def checked_init(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            check_config_arguments(cls, signature, bound.arguments)
            bound.apply_defaults()
            check_model_size(cls, bound.arguments)
            init(self, *args, **kwargs)

        cls.__init__ = checked_init

    def _refuse_hooks_on_fast_path(self, method: str) -> None:
        if getattr(self, FAST_PATH_ATTRIBUTE, False):
            raise ValueError(
                f"`{method}()`: this {type(self).__name__} runs a pipeline's fast path (enable_fast_inference), whose "
                "fitted modules and CUDA graphs cannot follow weights moved or cast at every call; call the "
                "pipeline's disable_fast_inference() first."
            )

    def enable_group_offload(self, *args, **kwargs):
        """diffusers' group offloading, refused while a pipeline's fast path holds this model."""
        self._refuse_hooks_on_fast_path("enable_group_offload")
        return super().enable_group_offload(*args, **kwargs)

    # diffusers' per-processor attention switches reach no layer here (they returned without a word): the
    # transformers' attention calls go through ``dispatch_attention_fn``, whose kernel ``set_attention_backend`` picks
    def _refuse_attention_switch(self, method: str, valid: bool) -> None:
        if valid:
            raise ValueError(
                f"`{method}` does not apply to {type(self).__name__}: it has no attention processors. The "
                "transformers' attention goes through diffusers' attention dispatcher: "
                "`transformer.set_attention_backend(name)` picks its kernel (e.g. 'xformers', '_native_npu')."
            )

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        self._refuse_attention_switch("enable_xformers_memory_efficient_attention", valid)

    def set_use_npu_flash_attention(self, valid: bool) -> None:
        self._refuse_attention_switch("enable_npu_flash_attention", valid)

    def set_use_xla_flash_attention(self, use_xla_flash_attention: bool, partition_spec=None, **kwargs) -> None:
        self._refuse_attention_switch("enable_xla_flash_attention", use_xla_flash_attention)

    # why a model refuses diffusers' layerwise casting (None: it takes it)
    _layerwise_casting_refusal: str | None = None

    def enable_layerwise_casting(self, *args, **kwargs):
        """diffusers' layerwise casting, for a model in its ``compute_dtype`` already: the models cast their inputs
        to their own dtype, so another compute dtype failed inside torch at the first call (float32 inputs into
        bf16 weights). Refused while a pipeline's fast path holds this model, and by the image tokenizers."""
        self._refuse_hooks_on_fast_path("enable_layerwise_casting")
        if self._layerwise_casting_refusal:
            raise ValueError(f"`enable_layerwise_casting()`: {type(self).__name__} {self._layerwise_casting_refusal}")
        bound = inspect.signature(super().enable_layerwise_casting).bind(*args, **kwargs)
        compute_dtype = bound.arguments.get("compute_dtype")
        if compute_dtype is not None and compute_dtype != self.dtype:
            raise ValueError(
                f"`compute_dtype` {compute_dtype} is not the dtype this {type(self).__name__} is in ({self.dtype}), "
                "to which it casts its inputs: load it with `dtype=` that dtype (or `.to()` it) first, or leave "
                "`compute_dtype` out."
            )
        return super().enable_layerwise_casting(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        for name in ("dtype", "torch_dtype"):  # diffusers ignores another value with a log line and loads float32
            check_dtype_argument(kwargs.get(name), name, per_component=False)
        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise ValueError(
                "`pretrained_model_name_or_path` must be a folder or a Hub repo id (str or path), got "
                f"{type(pretrained_model_name_or_path).__name__}."
            )
        subfolder = kwargs.get("subfolder") or ""
        if not isinstance(subfolder, (str, os.PathLike)):
            raise ValueError(f"`subfolder` must be a folder name (str), got {type(subfolder).__name__}.")
        folder = Path(pretrained_model_name_or_path, subfolder)
        where = f"{str(folder)!r}"
        refuse_interrupted_save(folder)
        check_shard_index(folder, kwargs.get("variant"), cls.__name__)
        output_loading_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("ignore_mismatched_sizes"):  # a deliberate partial load: diffusers' own behaviour
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
            _initialise_skipped_(model)
            return (model, info) if output_loading_info else model
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except (ConfigBuildError, SafetensorError) as err:  # (other errors, out of memory say, pass unchanged)
            message = " ".join(str(err).split())[:400]
            raise ValueError(f"cannot load a {cls.__name__} from {where}: {message}; check its config.json.") from err
        except OSError as err:
            if "Unable to load weights" not in str(err):  # diffusers' wrapping of a damaged weights file
                raise
            detail = " ".join(str(err).split())[:300]
            raise ValueError(
                f"cannot load a {cls.__name__} from {where}: its weights file cannot be read, truncated or damaged "
                f"({detail}); save or convert it again."
            ) from err
        except ValueError as err:
            if "expected shape" not in str(err):  # diffusers' refusal of a weight of another shape, without the folder
                raise
            shape = " ".join(str(err).split(". ")[0].split())[:300]
            raise ValueError(
                f"{where} does not hold the weights of the {cls.__name__} its config describes ({shape}); a folder "
                "of another model or a changed config? `ignore_mismatched_sizes=True` loads the weights that fit."
            ) from None
        missing, unused = info["missing_keys"], info["unexpected_keys"]
        misshapen = [key for key, *_ in info["mismatched_keys"]]
        if missing or unused or misshapen:
            problems = [
                f"{what}: {_listed(keys)}"
                for what, keys in (
                    ("missing from the weights", missing),
                    ("in the weights but not in the model", unused),
                    ("of another shape than the config gives", misshapen),
                )
                if keys
            ]
            raise ValueError(
                f"{where} does not hold the weights of the {cls.__name__} its config describes ("
                + "; ".join(problems)
                + "): config.json and the weights come from different models, or a save was interrupted."
            )
        return (model, info) if output_loading_info else model

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; a config whose values do not build the model is a :class:`ConfigBuildError`
        (a ValueError) naming the class, not a TypeError / ZeroDivisionError from inside the constructor."""
        try:
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except _BUILD_ERRORS as err:
            message = " ".join(f"{type(err).__name__}: {err}".split())[:400]
            raise ConfigBuildError(f"the config does not build a {cls.__name__} ({message})") from err

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        save_function=None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size="10GB",
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ):
        """diffusers' ``save_pretrained`` (the same arguments: a pipeline's save passes those it finds in the
        signature), through a staging folder."""
        if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory):
            raise ValueError(f"`save_directory` must be a folder path (str or os.PathLike), got {save_directory!r}.")
        check_save_arguments(variant, max_shard_size)
        if not is_main_process:  # the main process saves (diffusers' other processes rewrote the weights in place)
            return
        if not safe_serialization:
            logger.warning(SAFETENSORS_ONLY)
        refuse_lora_layers(self, type(self).__name__)
        hub = {key: kwargs.pop(key) for key in PUSH_KWARGS if key in kwargs}
        settings = dict(
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=True,
            variant=variant,
            max_shard_size=max_shard_size,
            use_flashpack=use_flashpack,
        )

        def save(folder: Path) -> None:
            super(CheckedLoadingMixin, self).save_pretrained(folder, **settings, **kwargs)

        target = save_folder_atomic(Path(save_directory), save)
        if push_to_hub:
            push_folder_to_hub(self, target, is_pipeline=False, **hub)
