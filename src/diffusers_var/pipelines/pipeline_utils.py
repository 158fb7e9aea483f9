"""What every next-scale pipeline shares: the state of a call (diffusers' properties), the callback contract, the
input checks common to all families, output conversion, and ``from_pipe`` that keeps each component's dtype.

The callback contract (all families)
------------------------------------
``callback_on_step_end(pipe, scale_index, scale_hw, tensors)`` runs once per scale, after the scale's tokens were
added to the running latent. ``scale_index`` counts scales (``pipe.num_timesteps`` of them); ``scale_hw`` is the
scale's token grid ``(h, w)``; ``tensors`` holds the names asked for in ``callback_on_step_end_tensor_inputs``
(default ``["latents"]``):

* ``"latents"``: the running latent (B, C, H, W) float32 (VAR / STAR: f_hat; Infinity: the summed codes), i.e.
  what ``output_type="latent"`` returns after the last scale. A callback may return a new ``"latents"``; it replaces
  the running latent (a copy is taken) and the next scale's input is derived from it.
* ``"tokens"``: the scale's sampled tokens: (B, h*w) codebook indices (VAR / STAR), (B, h*w, bits) bits (Infinity).
* ``"guided_logits"``: the logits the tokens are drawn from, after guidance (and Infinity's ``tau``), before top-k /
  top-p: (B, h*w, vocab) (VAR / STAR), (B, h*w, bits, 2) (Infinity).
* ``"model_logits"``: the transformer's logits of every row, conditional rows first, before guidance.
* ``"next_scale_input"``: the next scale's input tokens (B, h'*w', C) (None after the last scale).

A family may add its own (STAR's stable-sampler trace). The names of the first release stay as deprecated aliases
(a ``FutureWarning``): VAR / STAR ``"f_hat"`` (= latents), ``"indices"`` (= tokens), ``"logits"`` (= guided_logits);
Infinity ``"summed_codes"`` (= latents), ``"bits"`` (= tokens), ``"logits"`` (= model_logits).

diffusers' ``PipelineCallback`` objects work: ``guidance_scale``, ``do_classifier_free_guidance``, ``num_timesteps``
and ``interrupt`` are pipeline properties, and a callback may change ``pipe._guidance_scale`` for the next scales
or set ``pipe._interrupt = True`` to stop after the current scale (the image is decoded from the latent so far).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import math
import os
import typing
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_device

from ..file_utils import (
    SAFETENSORS_ONLY,
    model_index_components,
    refuse_interrupted_save,
    save_folder_atomic,
    write_text_atomic,
)
from ..models.loading import (
    FAST_PATH_ATTRIBUTE,
    PUSH_KWARGS,
    any_submodule,
    check_dtype_argument,
    check_save_arguments,
    push_folder_to_hub,
    refuse_lora_layers,
)
from ..models.multiscale_vq import area_down
from ..models.slicing import NaNDecodeError, check_token_values
from ..pil_images import mask_to_grayscale, to_grayscale, to_rgb
from ..scalars import is_bool, is_integer, is_number
from .fast_inference import FastInferenceMixin, rounded_to
from .sampling import GeneratorArg

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
UNIFIED_CALLBACK_TENSORS = ["latents", "tokens", "guided_logits", "model_logits", "next_scale_input"]
# Bounds that keep the sampled logits finite in float32: guidance multiplies them by up to (1 + scale), a temperature
# divides them; beyond these every logit overflowed to inf / NaN and every token came out 0.
MAX_GUIDANCE_SCALE = 1e4
MIN_TEMPERATURE = 1e-4
# A bound far above any batch that fits a GPU: a mistyped count fails here, not deep in an allocation.
MAX_BATCH_SIZE = 2**16

CallbackArg = Callable[[Any, int, tuple, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None

logger = logging.get_logger(__name__)

# every next-scale pipeline class, by name (a folder's model_index.json names its class)
_PIPELINE_CLASSES: dict[str, type] = {}
# set while ``from_pipe`` builds a pipeline: its trailing ``.to(dtype)`` must not cast the shared components
_KEEP_COMPONENT_DTYPES = contextvars.ContextVar("keep_component_dtypes", default=False)
# ids of the model components whose generation is inside its `callback_on_step_end` (a nested call on them is refused)
_MODELS_IN_CALLBACK = contextvars.ContextVar("models_in_callback", default=frozenset())


# ----------------------------------------------------------------------------------------------
# Argument checks shared by every family (each names the parameter and the allowed values)
# ----------------------------------------------------------------------------------------------
def check_finite_number(
    value, name: str, low: float | None = None, high: float | None = None, low_inclusive: bool = True
) -> float:
    """``value`` as a float: a real number (not NaN / inf) within ``[low, high]`` (``(low, high]`` without
    ``low_inclusive``)."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    below = value < low if low_inclusive else value <= low
    if (low is not None and below) or (high is not None and value > high):
        bounds = (
            f"{'[' if low_inclusive else '('}{low if low is not None else '-inf'}, "
            f"{high if high is not None else 'inf'}]"
        )
        raise ValueError(f"`{name}` must be in {bounds}, got {value!r}.")
    return float(value)


def per_scale_values(
    value, num_scales: int, name: str, low: float = 0.0, low_inclusive: bool = True, high: float | None = None
) -> list[float]:
    """A finite number broadcast to every scale, or a list with one finite number per scale."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_scales
    if len(values) != num_scales:
        raise ValueError(f"`{name}` has {len(values)} entries but the schedule has {num_scales} scales.")
    return [check_finite_number(v, name, low, high, low_inclusive=low_inclusive) for v in values]


def check_guidance_scale(value, num_scales: int | None = None, name: str = "guidance_scale"):
    """A finite number in ``[0, MAX_GUIDANCE_SCALE]``; with ``num_scales``, also a list with one per scale."""
    if num_scales is not None:
        return per_scale_values(value, num_scales, name, 0.0, high=MAX_GUIDANCE_SCALE)
    return check_finite_number(value, name, 0.0, MAX_GUIDANCE_SCALE)


def check_temperature(value, num_scales: int, name: str = "temperature") -> list[float]:
    """One temperature for every scale, or one per scale, each in ``[MIN_TEMPERATURE, inf)``."""
    return per_scale_values(value, num_scales, name, MIN_TEMPERATURE)


def per_scale(value, num_scales: int) -> list:
    """A per-scale setting as a list: a list / tuple as it is, a scalar repeated for every scale."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_scales


def check_common_inputs(
    top_k, top_p, output_type, num_images_per_prompt, return_dict=True, num_scales: int | None = None
) -> None:
    """The sampling and output arguments every family takes. With ``num_scales``, ``top_k`` may also be a list with
    one value per scale."""
    listed = num_scales is not None and isinstance(top_k, (list, tuple))
    if not all(is_integer(k) and k >= 0 for k in (top_k if listed else [top_k])):
        per_scale_note = " or a list of them, one per scale" if num_scales is not None else ""
        raise ValueError(f"`top_k` must be an integer >= 0 (0 disables top-k){per_scale_note}, got {shorten(top_k)}.")
    if listed and len(top_k) != num_scales:
        raise ValueError(f"`top_k` has {len(top_k)} entries but the schedule has {num_scales} scales.")
    check_finite_number(top_p, "top_p", 0.0, 1.0)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    check_num_images_per_prompt(num_images_per_prompt)
    check_bool(return_dict, "return_dict")


def check_component_folders(folder: str, model_index: dict, names: set[str]) -> None:
    """Every component of ``names`` that ``model_index`` (a pipeline folder's ``model_index.json``) names with a
    library and class has its subfolder in ``folder``: without it diffusers looks in the pipeline folder itself,
    where transformers builds an empty tokenizer (every prompt became the same unknown tokens) or fails deep inside."""
    for name in sorted(set(model_index_components(model_index)) & names):
        if not os.path.isdir(os.path.join(folder, name)):
            library, class_name = model_index[name]
            raise ValueError(
                f"`pretrained_model_name_or_path` {folder!r}: model_index.json names a `{name}` "
                f"({library}.{class_name}) but the folder has no `{name}/` subfolder; restore it, or pass "
                f"`{name}=...` to from_pretrained."
            )


def check_num_images_per_prompt(num_images_per_prompt) -> None:
    if not is_integer(num_images_per_prompt) or not 1 <= num_images_per_prompt <= MAX_BATCH_SIZE:
        raise ValueError(
            f"`num_images_per_prompt` must be an integer in [1, {MAX_BATCH_SIZE}], got {num_images_per_prompt!r}."
        )


def check_bool(value, name: str) -> None:
    if not is_bool(value):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_generator(generator: GeneratorArg, batch_size: int) -> None:
    """``generator`` for a batch of ``batch_size`` images (prompts x ``num_images_per_prompt``), which is checked
    against :data:`MAX_BATCH_SIZE` here, where every family knows it."""
    if batch_size > MAX_BATCH_SIZE:
        raise ValueError(
            f"a call generates at most {MAX_BATCH_SIZE} images (prompts / labels x `num_images_per_prompt`), got "
            f"{batch_size}; generate in several calls (or with `diffusers-var sample`)."
        )
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of length {len(generator)}, but the batch has {batch_size} images "
                f"(prompts x num_images_per_prompt); pass one generator per image or a single generator."
            )
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError("`generator` list must contain only torch.Generator objects.")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"`generator` must be a torch.Generator, a list of them, or None; got {type(generator).__name__}."
        )


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            f"`{name}` must be a string or a non-empty list of strings (or pass `{name}_embeds`), "
            f"got {shorten(prompt)}."
        )
    check_unicode_texts(prompts, name, prompt)
    return list(prompts)


def check_unicode_texts(texts, name: str, given) -> None:
    """Refuse texts that hold lone surrogates (the tokenizers fail on them with a TypeError); ``given``: what the
    caller passed as ``name``, for the message."""
    if not all(is_unicode_text(text) for text in texts):
        raise ValueError(
            f"`{name}` holds characters that are not Unicode text (lone surrogates, as undecodable bytes of a file "
            f"name or terminal become), got {shorten(given)}."
        )


def is_unicode_text(text: str) -> bool:
    """``text`` encodes as UTF-8: no lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shorten(value, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters (an 800 kB prompt must not be repeated in a message)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def text_encoder_width(text_encoder) -> int | None:
    """The feature width of a transformers text encoder (``hidden_size``, T5's ``d_model``), or None."""
    config = getattr(text_encoder, "config", None)
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def check_text_encoder_width(text_encoder, width: int | None, name: str) -> None:
    """A ValueError when ``text_encoder``'s hidden states are not ``width`` wide (the transformer's ``name``), at
    construction (``from_pipe`` too) instead of at the first call."""
    encoder_width = text_encoder_width(text_encoder)
    if encoder_width is not None and width is not None and encoder_width != width:
        raise ValueError(
            f"`text_encoder` gives {encoder_width}-wide hidden states, but the transformer takes text features "
            f"{width} wide (`{name}`); pass the text encoder the transformer was trained with."
        )


def check_text_embeds(
    embeds,
    mask,
    width: int | None,
    name: str,
    mask_name: str,
    batch_size: int | None = None,
    max_length: int | None = None,
    empty_rows: bool = False,
    right_padded: bool = False,
) -> None:
    """Precomputed text features ``embeds`` (B, N, width), finite, and their optional padding ``mask`` (B, N) (1 /
    True for real tokens, at least one per row unless ``empty_rows``; with ``right_padded``, each row's real tokens
    first); ``batch_size`` / ``max_length`` pin B / bound N; ``width`` None: any width. The errors name the parameters
    (``name``, ``mask_name``)."""
    if (
        not torch.is_tensor(embeds)
        or embeds.ndim != 3
        or embeds.shape[0] < 1
        or embeds.shape[1] < 1
        or (width is not None and embeds.shape[2] != width)
    ):
        shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
        raise ValueError(f"`{name}` must be a floating-point (batch, tokens, {width or 'width'}) tensor, got {shape}.")
    if not embeds.is_floating_point():  # (complex too: its imaginary part would be dropped)
        raise ValueError(f"`{name}` must be a floating-point tensor, got one of dtype {embeds.dtype}.")
    for tensor, tensor_name in ((embeds, name), (mask, mask_name)):
        if torch.is_tensor(tensor) and tensor.is_meta:  # a shape without values: its checks would fail deep down
            raise ValueError(f"`{tensor_name}` is a tensor on the meta device (a shape without values).")
    if batch_size is not None and embeds.shape[0] != batch_size:
        raise ValueError(f"`{name}` has {embeds.shape[0]} rows but the batch has {batch_size}; they must match.")
    if max_length is not None and embeds.shape[1] > max_length:
        raise ValueError(f"`{name}` has {embeds.shape[1]} tokens; the model takes at most {max_length}.")
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"`{name}` holds NaN or infinite values.")
    if mask is not None:
        if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(embeds.shape[:2]):
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(
                f"`{mask_name}` must be a bool or integer tensor of shape {tuple(embeds.shape[:2])} "
                f"(the shape of `{name}` without its last dimension), got {shape}."
            )
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(
                f"`{mask_name}` must be a bool or integer tensor (True / 1 for real tokens), got one of dtype "
                f"{mask.dtype}."
            )
        if not empty_rows and not bool(mask.bool().any(dim=1).all()):
            raise ValueError(f"`{mask_name}`: every row needs at least one real (non-padding) token.")
        if right_padded and bool((mask[:, 1:].bool() & ~mask[:, :-1].bool()).any()):
            raise ValueError(
                f"`{mask_name}` must pad on the right (each row's real tokens first, then its padding), as the "
                "tokenizer pads; a row has padding before a real token."
            )


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def images_to_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) float in [0, 1] -> "pt" tensor, "np" array (B, H, W, 3) or "pil" list."""
    if output_type == "pt":
        return images
    array = VaeImageProcessor.pt_to_numpy(images.float().cpu())
    return array if output_type == "np" else VaeImageProcessor.numpy_to_pil(array)


# ----------------------------------------------------------------------------------------------
# The shared pipeline layer
# ----------------------------------------------------------------------------------------------
def _holds_a_hook(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a submodule carries an accelerate (``_hf_hook``) or diffusers (``_diffusers_hook``: group
    offloading, layerwise casting) hook."""
    return any_submodule(module, lambda sub: "_hf_hook" in sub.__dict__ or "_diffusers_hook" in sub.__dict__)


class NextScalePipeline(DiffusionPipeline, FastInferenceMixin):
    """The base of every next-scale ``DiffusionPipeline``: the call's state as diffusers' properties, the one callback
    contract (module docstring), the shared end of a call, and ``from_pipe`` without dtype casts.

    A family pipeline defines ``_callback_tensor_inputs`` (unified names, its own extras, deprecated aliases),
    ``_callback_aliases`` (deprecated name -> unified name), :meth:`decode_latents` and
    :meth:`_next_scale_input`."""

    _callback_aliases: dict[str, str] = {}
    _missing_component_hint: str = ""  # how else to build the pipeline, for a folder that lacks a component
    _family: str = ""  # pipelines of one family load from each other's folders (text / class, in-painting, ...)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _PIPELINE_CLASSES[cls.__name__] = cls  # by the name model_index.json stores

    # diffusers drops the model_index.json keys of "compatible" classes without its "please verify your
    # model_index.json" warning: a same-family folder's extra components (a CoDe refiner) are a note of ours instead
    has_compatibles = True

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        return [other for other in _PIPELINE_CLASSES.values() if other._family == cls._family]

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' answer without its cost: diffusers walks every submodule of every model several times per call
        looking for offloading hooks (milliseconds of host time per generation for the large models); one cheap walk
        says whether any hook is attached, and without one the answer is the first model's device, as diffusers
        finds it."""
        names, _ = self._get_signature_keys(self)
        models = [
            model for model in (getattr(self, name, None) for name in names) if isinstance(model, torch.nn.Module)
        ]
        if not any(_holds_a_hook(model) for model in models):
            for model in models:
                tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
                if tensor is not None:
                    return tensor.device
                break  # a first model without tensors: diffusers' own rules
        return super()._execution_device

    def _refuse_offload_on_fast_path(self, method: str) -> None:
        self._refuse_during_callback(method)
        if self._fast_inference:
            raise ValueError(
                f"`{method}()`: this pipeline runs the fast path (enable_fast_inference), whose CUDA graphs and "
                "fitted modules cannot follow weights that move at every call; call disable_fast_inference() first."
            )
        self._refuse_on_components_held_fast(method)

    def _components_held_fast(self) -> list[str]:
        """The components that a pipeline's fast path holds (this one's, or another's sharing them: ``from_pipe``)."""
        return [
            name
            for name, module in self.components.items()
            if isinstance(module, torch.nn.Module) and getattr(module, FAST_PATH_ATTRIBUTE, False)
        ]

    @staticmethod
    def _shared_with_a_fast_pipeline(held: list[str]) -> str:
        return (
            f"{', '.join(f'`{name}`' for name in held)} of this pipeline {'is' if len(held) == 1 else 'are'} shared "
            "with a pipeline that runs the fast path"
        )

    def _refuse_on_components_held_fast(self, method: str) -> None:
        held = self._components_held_fast()
        if held:  # its hooks or casts would move the weights under the other pipeline's graphs and fitted kernels
            raise ValueError(
                f"`{method}`: {self._shared_with_a_fast_pipeline(held)} (enable_fast_inference); call "
                "disable_fast_inference() on that pipeline first, or build this one from its own components."
            )

    def _refuse_during_callback(self, method: str) -> None:
        """``method`` changes the models (their dtype, device, hooks or fast path) under a running generation when
        called from its ``callback_on_step_end``: its KV cache and graphs keep the old ones, and torch failed deep
        in a matmul."""
        running = _MODELS_IN_CALLBACK.get()
        if any(id(module) in running for module in self._call_state_models().values()):
            raise RuntimeError(
                f"`{method}()` was called from inside a `callback_on_step_end` of a running generation of these "
                "models; call it after the generation returns."
            )

    def _check_offload_device(self, method: str, device, sequential: bool = False) -> None:
        """``device`` of an offload: None (the accelerator found) or an accelerator of this machine; the CPU too for
        model offload (its hooks then run, moving nothing). diffusers raised a RuntimeError without an accelerator,
        an AssertionError for one torch was not built for, and took the CPU for sequential offload (below)."""
        found = get_device()
        if device is None:
            if found == "cpu":
                cpu = "" if sequential else '; `device="cpu"` runs its hooks without moving anything'
                raise ValueError(
                    f"`device`: {method}() found no accelerator (CUDA, XPU, MPS, ...) on this machine; offloading "
                    f"keeps the weights on the CPU and moves them onto an accelerator when they run{cpu}."
                )
            return
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError):
            raise ValueError(f"`device` must be a torch device or its name, got {device!r}.") from None
        if kind == "cpu" and sequential:
            raise ValueError(
                "`device`: sequential CPU offload moves each layer onto an accelerator when it runs; on the CPU "
                "there is nothing to offload to (and diffusers would leave the weights on the meta device)."
            )
        if kind not in ("cpu", found):
            raise ValueError(
                f"`device` {device!r}: this machine has no {kind} accelerator "
                f"({'none found' if found == 'cpu' else f'it has {found}'})."
            )

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = None):
        """diffusers' model offload, refused while the fast path is on (:meth:`disable_fast_inference` first) and
        without an accelerator (``device="cpu"`` runs the hooks without moving anything)."""
        self._refuse_offload_on_fast_path("enable_model_cpu_offload")
        if device is None and gpu_id is None:  # diffusers' LoRA loading turns offloading back on without a device:
            device = getattr(self, "_offload_device", None)  # the one chosen before (``"cpu"`` had failed)
        self._check_offload_device("enable_model_cpu_offload", device)
        return super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_group_offload(self, *args, **kwargs):
        """diffusers' group offloading, refused while the fast path is on (:meth:`disable_fast_inference` first)."""
        self._refuse_offload_on_fast_path("enable_group_offload")
        return super().enable_group_offload(*args, **kwargs)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = None):
        """diffusers' sequential offload onto an accelerator ``device``. A CPU ``device`` is refused: diffusers takes
        it and leaves every weight on the meta device, so the pipeline can then neither run nor be saved. Refused
        while the fast path is on, as :meth:`enable_model_cpu_offload`, and without an accelerator."""
        self._refuse_offload_on_fast_path("enable_sequential_cpu_offload")
        self._check_offload_device("enable_sequential_cpu_offload", device, sequential=True)
        return super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    _guidance_scale = None
    _per_scale_guidance = False  # whether guidance_scale may be a list with one value per scale
    _num_timesteps: int | None = None
    _interrupt: bool = False

    # -- the state of a call (diffusers' names) --------------------------------------------------------------------
    @property
    def guidance_scale(self):
        """The guidance scale of the running call; a callback may change ``pipe._guidance_scale`` for later scales."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """VAR / STAR: ``(1 + t) cond - t uncond``, 0 is no guidance (Infinity overrides: 1 is)."""
        return self._guidance_scale is not None and self._guidance_scale != 0

    @property
    def num_timesteps(self) -> int | None:
        """The number of scales of the running (or last) call."""
        return self._num_timesteps

    @property
    def num_scales(self) -> int | None:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _call_state_models(self) -> dict[str, torch.nn.Module]:
        """The components that hold a call's state (KV caches, CUDA graphs, adapter scales): the models, not the
        text encoders."""
        return {name: module for name, module in self.components.items() if isinstance(module, ModelMixin)}

    def _begin_call(self, guidance_scale, num_scales: int) -> None:
        running = _MODELS_IN_CALLBACK.get()
        shared = [name for name, module in self._call_state_models().items() if id(module) in running]
        if shared:  # the inner call would overwrite the outer one's guidance, interrupt flag, caches and graphs
            raise RuntimeError(
                f"{type(self).__name__} was called from inside a `callback_on_step_end` of a generation that uses "
                f"the same {', '.join(shared)}: the models hold the running call's state. Generate after that call "
                "returns, or with a pipeline of other model instances."
            )
        held = self._components_held_fast() if not self._fast_inference else []
        if held and not self.__dict__.get("_warned_held_fast"):  # said once per pipeline
            logger.warning(
                f"{type(self).__name__}: {self._shared_with_a_fast_pipeline(held)}, which cast and fitted them: this "
                "pipeline's images are not its eager path's. Call enable_fast_inference() here too, or build it from "
                "its own components for the eager path."
            )
            self.__dict__["_warned_held_fast"] = True
        # a per-scale list is copied: a callback editing `pipe._guidance_scale` in place edited the caller's list
        guidance_scale = list(guidance_scale) if isinstance(guidance_scale, list) else guidance_scale
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, num_scales, False

    def _guidance_state(self) -> tuple:
        """What :meth:`_guidance_changed` compares with: ``pipe._guidance_scale`` and, for a per-scale list, its
        items (a callback may assign a new value or edit the list in place)."""
        value = self._guidance_scale
        return value, tuple(value) if isinstance(value, list) else None

    def _guidance_changed(self, state: tuple) -> bool:
        """Whether ``pipe._guidance_scale`` changed since :meth:`_guidance_state` gave ``state`` (a new value, or a
        list's items replaced: by identity, so a NaN written in place counts as a change and is checked)."""
        value, items = state
        if self._guidance_scale is not value:
            return True
        return items is not None and (len(value) != len(items) or any(a is not b for a, b in zip(value, items)))

    # -- callbacks --------------------------------------------------------------------------------------------------
    def check_callback_inputs(
        self, callback_on_step_end: CallbackArg, tensor_inputs
    ) -> tuple[Callable | None, list[str]]:
        """``(callback, names)``: a diffusers ``PipelineCallback`` brings its own ``tensor_inputs``; names default to
        ``["latents"]`` and must be in ``_callback_tensor_inputs`` (deprecated aliases warn once per call)."""
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback_on_step_end.tensor_inputs
        if tensor_inputs is not None and (
            isinstance(tensor_inputs, str)
            or not isinstance(tensor_inputs, (list, tuple))
            or not all(isinstance(name, str) for name in tensor_inputs)
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a list of names from {self._callback_tensor_inputs}, "
                f"got {tensor_inputs!r}."
            )
        names = ["latents"] if tensor_inputs is None else list(tensor_inputs)  # [] asks for none, as in diffusers
        bad = [name for name in names if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got {bad}."
            )
        old = [name for name in names if name in self._callback_aliases]
        if old and callback_on_step_end is not None:
            renames = ", ".join(f"{name!r} -> {self._callback_aliases[name]!r}" for name in old)
            warnings.warn(
                f"callback tensor names {old} are deprecated and will be removed in the next release; use "
                f"the names every pipeline shares ({renames}).",
                FutureWarning,
                stacklevel=3,
            )
        return callback_on_step_end, names

    def _step_callback(
        self, callback, names: list[str], scale_index: int, scale_hw: tuple[int, int], tensors: dict[str, Any]
    ) -> torch.Tensor | None:
        """Run ``callback`` for one scale with the requested ``names`` from ``tensors`` (unified names; aliases are
        filled in here). Returns the latent it hands back in place of ``tensors["latents"]``, or ``None``.

        The callback gets a copy of the running latent, a new one every scale (the loop adds into the running latent
        in place: a kept history would be the final latent over and over). As in diffusers, editing it in place
        counts as replacing it, returned or not."""
        for alias, unified in self._callback_aliases.items():
            tensors.setdefault(alias, tensors.get(unified))
        latent_names = ["latents"] + [
            alias for alias, unified in self._callback_aliases.items() if unified == "latents"
        ]
        handed = {name: tensors[name] for name in names}
        for name in names:  # the live buffer of the next scale's input: an in-place edit steered the generation
            if self._callback_aliases.get(name, name) == "next_scale_input" and tensors[name] is not None:
                handed[name] = tensors[name].clone()
        snapshot = None
        if any(name in latent_names for name in names) and tensors["latents"] is not None:
            snapshot = tensors["latents"].clone()
            handed.update({name: snapshot for name in names if name in latent_names})
        guidance_before = self._guidance_state()
        running = _MODELS_IN_CALLBACK.get()
        token = _MODELS_IN_CALLBACK.set(running | {id(module) for module in self._call_state_models().values()})
        try:
            out = callback(self, scale_index, tuple(scale_hw), handed)
        finally:
            _MODELS_IN_CALLBACK.reset(token)
        if self._guidance_changed(guidance_before):  # a callback may change it for the next scales
            check_guidance_scale(
                self._guidance_scale,
                self._num_timesteps if self._per_scale_guidance else None,
                "pipe._guidance_scale (set by callback_on_step_end)",
            )
        if out is None:
            out = {}
        elif not isinstance(out, dict):
            raise ValueError(
                f"`callback_on_step_end` must return a dict of tensors to replace (or None), got {type(out).__name__}."
            )
        unknown = sorted(str(name) for name in out if name not in self._callback_tensor_inputs)
        if unknown:  # a misspelt "latents" was dropped without a word
            raise ValueError(
                f"`callback_on_step_end` returned {unknown}, which are not tensor names of this pipeline; it may "
                f"return names from {self._callback_tensor_inputs} (only `latents` replaces a tensor)."
            )
        replaced = sorted(  # handed back as given (diffusers' callbacks return every tensor they were handed)
            name
            for name in out
            if name not in latent_names and out[name] is not tensors.get(name) and out[name] is not handed.get(name)
        )
        if replaced:  # (they were ignored without a word)
            raise ValueError(
                f"`callback_on_step_end` returned new values for {replaced}; only `latents` can be replaced, the "
                "other tensors are for reading (return them as given, or leave them out)."
            )
        returned = [  # the latent names whose tensor the callback replaced
            (name, out[name])
            for name in latent_names
            if out.get(name) is not None and out[name] is not snapshot and out[name] is not tensors["latents"]
        ]
        if any(other is not returned[0][1] for _, other in returned[1:]):  # one would have been dropped silently
            raise ValueError(
                f"`callback_on_step_end` returned {[name for name, _ in returned]} with different tensors; they name "
                "the same latent (the others are deprecated aliases of `latents`): return one of them."
            )
        name, new = returned[0] if returned else (None, None)
        if new is None and snapshot is not None and not torch.equal(snapshot, tensors["latents"]):
            name, new = next(name for name in names if name in latent_names), snapshot  # edited in place
        if new is None:
            return None
        if torch.is_tensor(new) and not new.is_floating_point():  # bool / integer / complex: silently converted
            raise ValueError(
                f"`callback_on_step_end` returned `{name}` of dtype {new.dtype}; it must be a floating-point tensor."
            )
        if torch.is_tensor(new) and new.is_meta:
            raise ValueError(
                f"`callback_on_step_end` returned `{name}` on the meta device (a shape without values); return a "
                "tensor with data."
            )
        if not torch.is_tensor(new) or tuple(new.shape) != tuple(tensors["latents"].shape):
            raise ValueError(
                f"`callback_on_step_end` returned `{name}` of shape "
                f"{tuple(new.shape) if torch.is_tensor(new) else type(new).__name__}; expected "
                f"{tuple(tensors['latents'].shape)}."
            )
        if not bool(torch.isfinite(new).all()):
            raise ValueError(f"`callback_on_step_end` returned `{name}` with NaN or infinite values.")
        # a copy: the next scales add into the running latent in place
        return new.to(device=tensors["latents"].device, dtype=torch.float32, copy=True)

    def _take_callback_latents(
        self,
        new_latents,
        latents,
        si: int,
        graphs,
        next_input_of: Callable | None = None,
        rows_of: Callable | None = None,
        in_place: bool = False,
    ):
        """A callback's latent (:meth:`_step_callback`'s copy) as the running latent of the scale loop: ``(latents,
        the next scale's input)``. With whole-scale graphs (or ``in_place``: a buffer whose memory layout the kernels
        follow) it is copied into the running buffer, and with graphs the next scale's transformer input
        (``rows_of(next_input)``) into its static input. ``next_input_of(latents)`` and ``rows_of`` default to the
        VQ families' ``_next_scale_input(latents, si)`` and ``_guidance_rows``."""
        next_input_of = next_input_of or (lambda f_hat: self._next_scale_input(f_hat, si))
        rows_of = rows_of or self._guidance_rows
        if graphs is not None or in_place:
            new_latents = latents.copy_(new_latents)
        next_input = next_input_of(new_latents)
        if graphs is not None and next_input is not None:
            graphs.scale_inputs[si + 1].copy_(rows_of(next_input))
        return new_latents, next_input

    # -- the end of a call ------------------------------------------------------------------------------------------
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The final running latent -> images (B, 3, H, W) in [-1, 1] (family-specific)."""
        raise NotImplementedError

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Decode the final latent (unless ``"latent"``), free offload hooks and wrap the output."""
        causes = (
            "the transformer's logits overflowed at some scale (a LoRA `lora_scale` / `adapter_weights` too large for "
            "the dtype, or weights that are: a folder whose weights hold NaN / inf loads without a check), or a "
            "`callback_on_step_end` wrote such values"
        )
        if output_type == "latent":
            if not bool(latents.isfinite().all()):  # one sync, at the end of the call
                raise ValueError(f"the call's final `latents` hold NaN / infinite values: either {causes}.")
            images = latents.contiguous()  # (Infinity sums its codes channels-last, as the original)
        else:
            try:
                decoded = self.decode_latents(latents)
            except NaNDecodeError:
                raise ValueError(
                    f"the call's final `latents` decoded to NaN pixels: {causes}, or the latents are too large for "
                    "the decoder, or the decoder's dtype is too narrow for them (float16: use bfloat16)."
                ) from None
            images = images_to_output((decoded + 1) / 2, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- diffusers switches that do not apply ---------------------------------------------------------------------
    def enable_attention_slicing(self, slice_size="auto"):
        """Not for these pipelines (diffusers' version did nothing without a word): their attention runs in
        PyTorch's ``scaled_dot_product_attention`` kernels, not diffusers' attention processors."""
        if slice_size is None:  # diffusers' disable_attention_slicing()
            return
        raise ValueError(
            "`enable_attention_slicing` does not apply: the transformers run PyTorch's scaled_dot_product_attention "
            "kernels (memory-efficient already). For less memory at large batches, decode in slices "
            "(`pipe.vqvae.enable_slicing()` / `pipe.vae.enable_slicing()`)."
        )

    def enable_xformers_memory_efficient_attention(self, attention_op=None):
        """Not for these pipelines (diffusers' version did nothing without a word, xformers installed or not)."""
        raise ValueError(
            "`enable_xformers_memory_efficient_attention` does not apply: the transformers run PyTorch's "
            "scaled_dot_product_attention kernels; to choose another kernel, call "
            "`pipe.transformer.set_attention_backend(...)` (diffusers' attention backends)."
        )

    # -- loading and saving --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, refusing a folder (or Hub repo) that holds a pipeline of another family
        (its components would load with warnings and fail only when called), and a ``dtype`` / ``torch_dtype`` that
        is not a ``torch.dtype`` (or a dict of them per component), which diffusers ignores with a log line. Without
        a ``dtype`` every component loads in float32 (text encoders too)."""
        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise ValueError(
                "`pretrained_model_name_or_path` must be a folder or a Hub repo id (str or path), got "
                f"{type(pretrained_model_name_or_path).__name__}."
            )
        # a str from here: diffusers tells a Hub id from a folder with str methods (a missing Path folder crashed)
        pretrained_model_name_or_path = os.fspath(pretrained_model_name_or_path)
        for name in ("dtype", "torch_dtype"):
            check_dtype_argument(kwargs.get(name), name, components=cls._get_signature_keys(cls)[0])
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            # float32 for every component, as diffusers loads its own models: transformers 5 would otherwise load a
            # text encoder in the dtype its config names (the embedded ones store float16 weights)
            kwargs["dtype"] = torch.float32
        refuse_interrupted_save(pretrained_model_name_or_path)
        try:
            config = cls.load_config(
                pretrained_model_name_or_path, **{k: kwargs[k] for k in _LOAD_CONFIG_KWARGS if k in kwargs}
            )
        except (OSError, ValueError, EnvironmentError) as err:
            config = None  # let diffusers report what is wrong with the path, unless it is a folder of a pipeline
            index = os.path.join(pretrained_model_name_or_path, "model_index.json")
            if os.path.isfile(index):  # diffusers then says it could not reach huggingface.co
                raise ValueError(
                    f"`pretrained_model_name_or_path`: {index!r} cannot be read: {' '.join(str(err).split())[:300]}"
                ) from None
        if config is not None and not isinstance(config, dict):
            raise ValueError(
                f"`pretrained_model_name_or_path` {pretrained_model_name_or_path!r}: its model_index.json holds a "
                f"{type(config).__name__}, not a JSON object; it is not a pipeline folder that diffusers saved."
            )
        local_index = config is not None and os.path.isdir(pretrained_model_name_or_path)
        if local_index and "_class_name" not in config:
            raise ValueError(  # (diffusers: a bare KeyError)
                f"`pretrained_model_name_or_path` {pretrained_model_name_or_path!r}: its model_index.json names no "
                "`_class_name`; it is not a pipeline folder that diffusers saved."
            )
        saved = config.get("_class_name") if isinstance(config, dict) else None
        if saved is not None and saved != cls.__name__:
            saved_class = _PIPELINE_CLASSES.get(saved) if isinstance(saved, str) else None
            if getattr(saved_class, "_family", None) != cls._family:
                raise ValueError(
                    f"`pretrained_model_name_or_path` {str(pretrained_model_name_or_path)!r} holds a {saved!r}, "
                    f"not a pipeline of the {cls.__name__} family; load it with its own class "
                    f"(`diffusers-var generate --model` reads the class from model_index.json)."
                )
            unused = sorted(set(cls._get_init_keys(saved_class)) - set(cls._get_init_keys(cls)) - {"self"})
            if unused:
                logger.warning(
                    f"{str(pretrained_model_name_or_path)!r} holds a {saved}: {cls.__name__} does not use its "
                    f"{', '.join(unused)} and loads without them (`{saved}.from_pretrained` loads them)."
                )
        if local_index:
            expected, _ = cls._get_signature_keys(cls)
            missing = sorted(set(expected) - set(cls._optional_components) - set(config) - set(kwargs))
            if missing:  # (diffusers: "expected [...] but only {...} were passed")
                raise ValueError(
                    f"`pretrained_model_name_or_path` {pretrained_model_name_or_path!r} holds a "
                    f"{config['_class_name']} without {', '.join(f'`{name}`' for name in missing)}, which "
                    f"{cls.__name__} needs: pass {'them' if len(missing) > 1 else 'it'} to from_pretrained "
                    f"({', '.join(f'{name}=...' for name in missing)}){cls._missing_component_hint}."
                )
            check_component_folders(pretrained_model_name_or_path, config, set(cls._get_init_keys(cls)) - set(kwargs))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' ``save_pretrained``, plus the small module that lets diffusers' generic loader find the class,
        e.g. ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="VARPipeline", trust_remote_code=True)`` (it
        imports this class from the installed ``diffusers_var``; loading with the class itself runs no code).
        Written through a staging folder (:func:`~diffusers_var.file_utils.save_folder_atomic`): an interrupted save
        leaves ``save_directory`` as it was, and files of yours in it are kept."""
        if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory):
            raise ValueError(f"`save_directory` must be a folder path (str or os.PathLike), got {save_directory!r}.")
        if not kwargs.pop("safe_serialization", True):
            logger.warning(SAFETENSORS_ONLY)
        check_save_arguments(kwargs.get("variant"), kwargs.get("max_shard_size", "10GB"))
        hub = {key: kwargs.pop(key) for key in PUSH_KWARGS if key in kwargs}
        push_to_hub = kwargs.pop("push_to_hub", False)

        def save(folder: Path) -> None:
            super(NextScalePipeline, self).save_pretrained(folder, push_to_hub=False, **kwargs)
            write_loader_module(folder, type(self).__name__)

        for name, component in self.components.items():
            if isinstance(component, torch.nn.Module):
                refuse_lora_layers(component, name)
                rounding = rounded_to(component)
                if rounding is not None:
                    logger.warning(
                        f"save_pretrained: enable_fast_inference cast `{name}`'s weights to {rounding}; the saved "
                        f"weights carry that rounding (save from a pipeline loaded afresh for full precision)."
                    )
        target = save_folder_atomic(Path(save_directory), save)
        if push_to_hub:  # diffusers' upload, of the folder as saved (a failed upload keeps the local save)
            push_folder_to_hub(self, target, is_pipeline=True, **hub)

    def register_modules(self, **modules):
        """diffusers' ``register_modules``, refusing a component of the wrong class (a transformer of another family
        failed only when called, e.g. through ``from_pipe(pipe, transformer=...)``)."""
        self._check_component_types(**modules)
        super().register_modules(**modules)

    def _check_component_types(self, **modules) -> None:
        expected = _component_types(type(self))
        for name, module in modules.items():
            if module is not None and name in expected and not isinstance(module, expected[name]):
                raise ValueError(
                    f"`{name}` must be a {expected[name].__name__}, got a {type(module).__name__} (a component of "
                    "another family?)."
                )
        # the text towers are any transformers model / tokenizer (CLIP, T5, ...): of those kinds, at least
        text_encoder, tokenizer = modules.get("text_encoder"), modules.get("tokenizer")
        if text_encoder is not None or tokenizer is not None:
            from transformers import PreTrainedModel, PreTrainedTokenizerBase

            for name, value, kind, example in (
                ("text_encoder", text_encoder, PreTrainedModel, "CLIPTextModel, T5EncoderModel"),
                ("tokenizer", tokenizer, PreTrainedTokenizerBase, "CLIPTokenizer, T5TokenizerFast"),
            ):
                if value is not None and not isinstance(value, kind):
                    raise ValueError(
                        f"`{name}` must be a transformers {kind.__name__} ({example}, ...), got a "
                        f"{type(value).__name__}."
                    )

    @classmethod
    def _required_components(cls) -> list[str]:
        return [name for name in _component_types(cls) if name not in cls._optional_components]

    def _check_required_components(self) -> None:
        """At the start of a call: every required component is there (a pipeline built with ``None`` for one, as
        diffusers allows, failed deep inside the call)."""
        missing = [name for name in self._required_components() if getattr(self, name, None) is None]
        if missing:
            names = ", ".join(f"`{name}`" for name in missing)
            raise ValueError(
                f"this {type(self).__name__} has no {names} (built with None); pass it to the constructor, "
                "`from_pipe` or `from_pretrained`."
            )

    # -- from_pipe keeps each component's dtype ------------------------------------------------------------------
    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs):
        """diffusers' ``from_pipe`` (the new pipeline shares the components, no weights are copied), except that
        each component keeps its dtype: diffusers casts every component to float32 (or ``dtype``), which, the
        components being shared, also casts those of ``pipeline``. ``dtype=`` still casts, when given (the shared
        components: ``pipeline``'s too).
        ``enable_fast_inference()`` / ``disable_fast_inference()`` cast and fit the modules, so their switches live on
        the transformer: pipelines sharing it share them (each captures its own CUDA graphs)."""
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        check_dtype_argument(dtype, per_component=False)
        if not isinstance(pipeline, DiffusionPipeline):
            raise ValueError(f"`pipeline` must be a diffusers pipeline, got {type(pipeline).__name__}.")
        accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"{cls.__name__}.from_pipe takes components / settings {accepted}, got {unknown}.")
        missing = [
            name
            for name in cls._required_components()
            if name not in kwargs and not isinstance(pipeline.components.get(name), _component_types(cls)[name])
        ]
        if missing and isinstance(pipeline, NextScalePipeline) and pipeline._family != cls._family:
            raise ValueError(
                f"`pipeline` is a {type(pipeline).__name__} ({pipeline._family} family); {cls.__name__} "
                f"needs the {cls._family} family's {missing}: pass them, or start from a {cls._family} pipeline."
            )
        if missing:  # (diffusers' own message does not say how to give them)
            raise ValueError(
                f"{cls.__name__} needs {missing}, which `pipeline` ({type(pipeline).__name__}) does not hold: pass "
                f"them as keyword arguments, e.g. {cls.__name__}.from_pipe(pipeline, {missing[0]}=...)."
            )
        token = _KEEP_COMPONENT_DTYPES.set(True)
        try:
            new = super().from_pipe(pipeline, **kwargs)
        finally:
            _KEEP_COMPONENT_DTYPES.reset(token)
        if not new._fast_inference:  # a new transformer, but a decoder or text encoder the fast path cast and fitted
            roundings = {
                name: rounded_to(component)
                for name, component in new.components.items()
                if isinstance(component, torch.nn.Module)
            }
            fitted = [
                f"`{name}` ({str(dtype).removeprefix('torch.')})"
                for name, dtype in roundings.items()
                if dtype is not None
            ]
            if fitted:
                logger.warning(
                    f"{cls.__name__}.from_pipe shares {', '.join(fitted)} with a pipeline whose "
                    "enable_fast_inference() cast them; this pipeline runs eager with them as they are (rounded), "
                    "and reports the fast path off. Pass fresh components, or enable the fast path here too."
                )
        return new.to(dtype=dtype) if dtype is not None else new

    def to(self, *args, **kwargs):
        if _KEEP_COMPONENT_DTYPES.get() and not args and set(kwargs) == {"dtype"}:
            return self
        dtypes = [a for a in args if isinstance(a, torch.dtype)] + [
            kwargs[name] for name in ("dtype", "torch_dtype") if kwargs.get(name) is not None
        ]
        for dtype in dtypes:
            check_dtype_argument(dtype, per_component=False)
        self._refuse_during_callback("to")
        casts = bool(dtypes)
        if casts and not self._fast_inference:
            self._refuse_on_components_held_fast("dtype")
        if casts and self._fast_inference:
            # the fast path holds the modules in its dtype, with float8 copies beside some weights (a cast would
            # turn them into plain floats under the matmuls that read them) and kernels fitted to both
            raise ValueError(
                "`dtype`: this pipeline runs the fast path (enable_fast_inference), which set its components' dtypes "
                "(shared by every pipeline made from it with from_pipe); call disable_fast_inference() first, or "
                "enable_fast_inference(dtype=...) for another fast dtype."
            )
        moved = super().to(*args, **kwargs)
        self._invalidate_graphs()  # captured CUDA graphs (this pipeline's and its siblings') read the old memory
        return moved

    # -- small shared helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _guidance_rows(x_BlC: torch.Tensor, guided: bool = True) -> torch.Tensor:
        """The transformer input of both guidance halves (same tokens for the conditional and unconditional rows)."""
        return x_BlC.repeat(2, 1, 1) if guided else x_BlC


@functools.cache
def _component_types(pipeline_class: type) -> dict[str, type]:
    """The components of ``pipeline_class`` whose ``__init__`` annotation is one class (name -> class)."""
    hints = typing.get_type_hints(pipeline_class.__init__)
    return {name: hint for name, hint in hints.items() if isinstance(hint, type) and issubclass(hint, torch.nn.Module)}


_LOAD_CONFIG_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


class MultiScaleVQPipelineMixin:
    """What VAR and STAR share through their tokenizer (``vqvae``, a ``MultiScaleVQModel``): the check that a
    transformer fits it, the next scale's input and the decode of f_hat."""

    def _check_vqvae_fits(self, transformer, vqvae) -> None:
        """A ValueError unless ``transformer`` predicts ``vqvae``'s tokens (scale schedule, vocabulary, code width);
        either may be None (a pipeline loaded without it)."""
        self._check_component_types(transformer=transformer, vqvae=vqvae)
        if transformer is None or vqvae is None:
            return
        if tuple(transformer.config.patch_nums) != tuple(vqvae.config.patch_nums):
            raise ValueError(
                f"transformer and vqvae `patch_nums` differ: {transformer.config.patch_nums} vs "
                f"{vqvae.config.patch_nums}."
            )
        if (
            transformer.config.vocab_size != vqvae.config.vocab_size
            or transformer.config.latent_channels != vqvae.config.z_channels
        ):
            raise ValueError(
                "transformer `vocab_size`/`latent_channels` must match the vqvae's `vocab_size`/`z_channels`."
            )

    def _next_scale_input(self, f_hat: torch.Tensor, scale_index: int) -> torch.Tensor | None:
        """The input tokens (B, l', Cv) of the scale after ``scale_index``: f_hat area-downsampled to its grid."""
        patch_nums = self.vqvae.config.patch_nums
        if scale_index == len(patch_nums) - 1:
            return None
        return area_down(f_hat, patch_nums[scale_index + 1]).flatten(2).transpose(1, 2)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cv, h, h) -> images (B, 3, H, W) in [-1, 1]."""
        return self.vqvae.decode_latent(latents)


def write_loader_module(folder, class_name: str) -> Path:
    """``folder/<class_name>.py``: one import of ``class_name`` from the installed package, which diffusers'
    custom-pipeline mechanism loads (the only pipeline class the module holds, as diffusers requires; named after the
    class because diffusers caches these modules by file name within a process). Written atomically."""
    path = Path(folder) / f"{class_name}.py"
    # ruff-clean as written (a folder saved inside a checkout is linted with it): the unindented last line keeps
    # ruff format from dedenting the indented example, as it does to a docstring's common indentation
    text = (
        f'"""Loads this folder with diffusers\' generic loader (needs ``pip install diffusers-var``):\n\n'
        f'    DiffusionPipeline.from_pretrained(folder, custom_pipeline="{class_name}", trust_remote_code=True)\n\n'
        f"diffusers-var's own ``{class_name}.from_pretrained`` never runs this file.\n"
        f'"""\n\nfrom diffusers_var import {class_name}  # noqa: F401\n'
    )
    write_text_atomic(path, text)
    return path


def flatten_labels(class_labels) -> list:
    """``class_labels`` as a flat list: an int, a list of ints, a list of lists of ints (diffusers' DiT batches
    labels that way), or a 1-D tensor / numpy array; numpy integers become Python ints."""
    if isinstance(class_labels, torch.Tensor) and class_labels.is_meta:  # (torch: "Cannot copy out of meta tensor")
        raise ValueError("`class_labels` is a tensor on the meta device (a shape without values); pass one with data.")
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        return class_labels.flatten().tolist()
    if isinstance(class_labels, np.integer) or is_integer(class_labels):  # a label is converted at once
        return [int(class_labels)]
    if isinstance(class_labels, (list, tuple)):
        flat = []
        for entry in class_labels:
            flat.extend(entry if isinstance(entry, (list, tuple, np.ndarray)) else [entry])
        return [int(entry) if isinstance(entry, np.integer) else entry for entry in flat]
    return class_labels


def repeat_rows(t: torch.Tensor | None, times: int, device) -> torch.Tensor | None:
    """``t``'s rows each repeated ``times`` times consecutively (``num_images_per_prompt``), on ``device``."""
    return None if t is None else t.to(device).repeat_interleave(times, dim=0)


# ----------------------------------------------------------------------------------------------
# Editing: in-painting, out-painting and image-to-image (the task pipelines of every family)
# ----------------------------------------------------------------------------------------------
# How it works: the input image is tokenised with the pipeline's own tokenizer, and at every scale the tokens
# outside the region to generate replace the sampled ones before they enter the running latent (and so the next
# scale's input): the model fills the region in context. Every random draw still happens, for every position, as
# in VAR's zero-shot editing notebook (``demo_zero_shot_edit.ipynb``).
#
# The mask of a scale (the notebook's rule): the latent-grid mask (1 = keep the input), resized to the scale's grid
# by bilinear interpolation (``align_corners=False``), then ``> 0.5``; scales of at most 3 tokens always keep the
# input. A pixel mask is first reduced to the latent grid: a cell is generated when any of its pixels is white.
SMALLEST_KEPT_TOKENS = 3  # scales with at most this many tokens always keep the input (the notebook's ``pn*pn <= 3``)


class TokenForcing:
    """The ``forcing`` hook of a family's ``_sample_scales`` that keeps an input image's tokens.

    Args:
        keep: per scale, (B, h, w) bool: True where the input's token replaces the sampled one.
        tokens: per scale, the input's tokens: (B, h*w) codebook indices (VAR / STAR) or (B, h, w, bits) bits
            (Infinity).
        codes: VAR / STAR: per scale, the input's code maps (B, C, h, w) (the codebook vectors of ``tokens``);
            ``None`` for bits.

    Called as ``forcing(k, code_map, indices) -> (code_map, indices)`` (VAR / STAR) or ``forcing(k, bits) -> bits``
    (Infinity). It only runs tensor operations on its own buffers, so VAR's whole-scale CUDA graphs capture it: the
    graphs keep a :meth:`static_copy` and every call refills it with :meth:`copy_`.
    """

    def __init__(self, keep: list[torch.Tensor], tokens: list[torch.Tensor], codes: list[torch.Tensor] | None = None):
        self.keep, self.tokens, self.codes = list(keep), list(tokens), None if codes is None else list(codes)

    def __call__(self, scale_index: int, *sampled: torch.Tensor | None):
        keep = self.keep[scale_index]
        if self.codes is None:  # Infinity: (B, h, w, bits)
            (bits,) = sampled
            return torch.where(keep[..., None], self.tokens[scale_index].to(bits.dtype), bits)
        code_map, indices = sampled
        # in the memory layout of the original's blend ``gt * force + h * (1 - force)`` (a 1x1 map's channels-last
        # strides send the tokenizer's upsampling and Phi conv down other kernels: rounding that more_smooth
        # amplifies), with torch.where's values: an overflowed sampled code (inf, NaN) that no position keeps stays out
        codes = self.codes[scale_index].to(code_map.dtype)
        force_B1hw = keep[:, None].int()
        blended = codes * force_B1hw + code_map * (1 - force_B1hw)
        code_map = blended.copy_(torch.where(keep[:, None], codes, code_map))
        if indices is not None:  # STAR's more_smooth has no hard tokens
            indices = torch.where(keep.flatten(1), self.tokens[scale_index], indices)
        return code_map, indices

    def known_tokens(self, scale_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VAR / STAR: ``(keep (B, l), codes (B, l, C), indices (B, l))`` of a scale, the kept positions' input codes
        and tokens (zeros elsewhere): what a sampler that commits a scale's positions step by step (STAR's stable
        sampler) commits before its first step."""
        keep_Bl = self.keep[scale_index].flatten(1)
        codes_BlC = self.codes[scale_index].flatten(2).transpose(1, 2).float()
        return keep_Bl, codes_BlC * keep_Bl[..., None], self.tokens[scale_index] * keep_Bl

    def _buffers(self) -> list[torch.Tensor]:
        return self.keep + self.tokens + (self.codes or [])

    def static_copy(self) -> "TokenForcing":
        """A copy with its own buffers (what a CUDA graph captures)."""
        clone = lambda ts: [t.clone() for t in ts]  # noqa: E731
        return TokenForcing(clone(self.keep), clone(self.tokens), None if self.codes is None else clone(self.codes))

    def copy_(self, other: "TokenForcing") -> "TokenForcing":
        """Copy ``other``'s masks and tokens into this one's buffers (same shapes)."""
        for mine, theirs in zip(self._buffers(), other._buffers()):
            mine.copy_(theirs, non_blocking=True)
        return self


def warn_eager_forcing(pipe) -> None:
    """Say once per pipeline that a ``forcing`` hook other than a :class:`TokenForcing` keeps VAR's sampling out of
    the whole-scale CUDA graphs (only the transformer steps are replayed): no silent slowdown."""
    if not getattr(pipe, "_warned_eager_forcing", False):
        logger.warning(
            f"{type(pipe).__name__}: the `forcing` hook is not a TokenForcing, so it cannot run inside the "
            "fast path's whole-scale CUDA graphs; sampling runs eagerly (the transformer steps stay "
            "graphs)."
        )
        pipe._warned_eager_forcing = True


def _spatial_size_of(value, name: str, image: bool) -> tuple[int, int, int]:
    """``(batch, height, width)`` of one image (``image``) or mask entry (PIL, numpy or torch), or a ValueError naming
    ``name``. Images: numpy (H, W, C) / (B, H, W, C), torch (C, H, W) / (B, C, H, W). Masks: (H, W), numpy
    (H, W, 1) / (B, H, W) / (B, H, W, 1), torch (B, H, W) / (B, 1, H, W)."""
    if isinstance(value, PIL.Image.Image):
        if 0 in value.size:
            raise ValueError(f"`{name}` is an empty image ({value.width}x{value.height}).")
        _check_pil_mode(value, name, "RGB" if image else "L")
        return 1, value.height, value.width
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if isinstance(value, torch.Tensor) and value.is_meta:  # a shape without values: torch would fail deep down
            raise ValueError(f"`{name}` is a tensor on the meta device (a shape without values); pass one with data.")
        numpy = isinstance(value, np.ndarray)
        shape = tuple(value.shape)
        if 0 in shape:
            raise ValueError(f"`{name}` is empty (shape {shape}).")
        if image and value.ndim in (3, 4):
            height_width = shape[-3:-1] if numpy else shape[-2:]
            return (1 if value.ndim == 3 else shape[0]), *height_width
        if not image and value.ndim == 2:
            return 1, *shape
        if not image and value.ndim == 3:
            return (1, *shape[:2]) if numpy and shape[-1] == 1 else (shape[0], *shape[1:])
        if not image and value.ndim == 4:
            return (shape[0], *shape[1:3]) if numpy else (shape[0], *shape[2:])
    kind = f"a {value.ndim}-D array" if isinstance(value, (np.ndarray, torch.Tensor)) else type(value).__name__
    what = "images" if image else "masks"
    raise ValueError(f"`{name}` entries must be PIL images, numpy arrays or torch tensors of {what}, got {kind}.")


def _check_pil_mode(image: PIL.Image.Image, name: str, mode: str) -> None:
    """A ValueError naming ``name`` when PIL cannot convert ``image``'s mode to ``mode`` (``"La"``, ``"LAB"`` to
    grayscale), tried on one pixel before any work."""
    try:
        (to_rgb if mode == "RGB" else to_grayscale)(image.crop((0, 0, 1, 1)))
    except ValueError as error:
        raise ValueError(
            f"`{name}` is a PIL image of mode {image.mode!r}, which PIL cannot convert to {mode!r} ({error}); pass "
            "an RGB, RGBA, grayscale (L, LA, I;16) or palette (P) image."
        ) from error


# a [0, 1] image's resampling undershoot, or the darkest pixel of a [-1, 1] image that is almost all light grey
UNDERSHOOT = 0.05


def as_tensor(value: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """``torch.as_tensor``, also of the numpy views that flips and rotations make (negative strides, which torch
    refuses); an array or tensor of another kind of number than bool, integer or float (object, complex, numpy's
    long double) is a ValueError naming ``name``."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.dtype.itemsize > 8:
            raise ValueError(f"`{name}` of numpy dtype {value.dtype} is not supported: use uint8, bool or float.")
        if any(stride < 0 for stride in value.strides):
            value = np.ascontiguousarray(value)
    values = torch.as_tensor(value)
    if values.is_complex():
        raise ValueError(f"`{name}` of dtype {values.dtype} is not supported: use uint8, bool or float.")
    return values


def image_batch_and_size(image, name: str = "image") -> tuple[int, int, int]:
    """``(batch, height, width)`` of an ``image`` argument: a PIL image, a numpy array ((H, W, 3) or (B, H, W, 3),
    float in [0, 1] or uint8), a torch tensor ((3, H, W) or (B, 3, H, W) in [0, 1]; [-1, 1] is taken as is, as
    diffusers' ``VaeImageProcessor`` does), or a list of these (all of one size). A ValueError names ``name``."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"`{name}` is an empty list.")
    sizes = []
    for item in items:
        batch, height, width = _spatial_size_of(item, name, image=True)
        if isinstance(item, (np.ndarray, torch.Tensor)):
            channels = item.shape[-1] if isinstance(item, np.ndarray) else item.shape[-3]
            if channels != 3:
                raise ValueError(
                    f"`{name}` must have 3 (RGB) channels, got an array of shape {tuple(item.shape)} "
                    "(numpy: channels last; torch: channels first)."
                )
            if item.dtype != np.uint8 and item.dtype != torch.uint8:
                values = as_tensor(item, name)
                if not values.is_floating_point():
                    kind = f"numpy {item.dtype}" if isinstance(item, np.ndarray) else str(values.dtype)
                    raise ValueError(f"`{name}` must hold floats in [0, 1] or uint8 values, got {kind}.")
                lowest = float(values.min())
                if not bool(torch.isfinite(values).all()) or lowest < -1 or values.max() > 1:
                    raise ValueError(f"`{name}` must hold finite floats in [0, 1] (or uint8), got values outside.")
                if -UNDERSHOOT < lowest < 0:
                    warnings.warn(
                        f"`{name}` has values just below 0 (min {lowest:.3g}), so it is read as a [-1, 1] image, as "
                        "diffusers' VaeImageProcessor reads any image with a negative value; clamp a [0, 1] image "
                        "with resampling undershoot first (`image.clamp(0, 1)`).",
                        UserWarning,
                        stacklevel=2,
                    )
        sizes.append((batch, height, width))
    if len({size[1:] for size in sizes}) != 1:
        raise ValueError(
            f"`{name}`: every image of the list must have the same size, got "
            f"{sorted({size[1:] for size in sizes})} (height, width)."
        )
    # diffusers' image processor stacks a list as it is: one kind of image, arrays of one number of dimensions
    kinds = {
        "PIL images"
        if isinstance(item, PIL.Image.Image)
        else f"{'numpy arrays' if isinstance(item, np.ndarray) else 'torch tensors'} of {item.ndim} dimensions"
        for item in items
    }
    if len(kinds) != 1:
        raise ValueError(
            f"`{name}`: a list must hold one kind of image (all PIL images, all numpy arrays or all torch tensors, "
            f"arrays and tensors with one number of dimensions), got {', '.join(sorted(kinds))}."
        )
    return sum(size[0] for size in sizes), sizes[0][1], sizes[0][2]


def _processor_input(image):
    """What diffusers' ``VaeImageProcessor`` takes: PIL images in RGB (an RGBA or grayscale PNG too), arrays and
    tensors as float in [0, 1] image by image (uint8 / 255; a float image with a negative value is in [-1, 1]). The
    processor decides [-1, 1] for a whole batch from any negative value: a [0, 1] or uint8 image beside a [-1, 1] one
    was read as [-1, 1] and came out with other colours."""
    if isinstance(image, (list, tuple)):
        return [_processor_input(item) for item in image]
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image.astype(np.float32) / 255
    if isinstance(image, np.ndarray):  # a copy: torch.from_numpy refuses the negative strides of flips and rotations
        return _unit_range_per_image(torch.from_numpy(np.ascontiguousarray(image))).numpy()
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        return image.float() / 255
    return _unit_range_per_image(image)


def _unit_range_per_image(values: torch.Tensor) -> torch.Tensor:
    """A float image (3-D) or batch of images (4-D, any layout) with every image that has a negative value mapped from
    [-1, 1] to [0, 1]."""
    batch = values if values.ndim == 4 else values[None]
    negative = batch.amin(dim=(1, 2, 3)) < 0
    if not bool(negative.any()):
        return values
    batch = torch.where(negative[:, None, None, None], (batch + 1) / 2, batch)
    return batch if values.ndim == 4 else batch[0]


def mask_to_tensor(mask_image, name: str = "mask_image", sizes=()) -> torch.Tensor:
    """A mask (white / 1 / True = generate) as (B, 1, H, W) float in [0, 1]: PIL images (converted to grayscale),
    numpy arrays ((H, W), (H, W, 1), (B, H, W), (B, H, W, 1)) or torch tensors ((H, W), (B, H, W), (B, 1, H, W)),
    bool, uint8 (0-255; one whose largest value is 1 holds 0 / 1, as ``(seg > 0).astype(np.uint8)`` makes, and so
    does a PIL image, 16-bit too), integer 0 / 1 or float in [0, 1], or a list of these. A numpy (H, W, 3 or 4)
    array is refused as an RGB(A) image, unless its last two sizes are one of the mask ``sizes`` the caller takes
    ((height, width) pairs): then it is a batch of masks of a grid 3 or 4 wide (``None``: a mask checked before,
    always read so)."""
    items = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    if not items:
        raise ValueError(f"`{name}` is an empty list.")
    masks = []
    for item in items:
        _spatial_size_of(item, name, image=False)  # the type check
        if isinstance(item, PIL.Image.Image):
            gray = np.asarray(mask_to_grayscale(item), dtype=np.float32)
            values = torch.from_numpy(gray / 255 if gray.max() > 1 else gray)[None, None]  # 0-255, or 0 / 1
        else:
            values = as_tensor(item, name)
            if isinstance(item, np.ndarray):  # numpy masks are channels-last
                rgb = values.ndim == 3 and values.shape[-1] in (3, 4)
                if rgb and sizes is not None and tuple(values.shape[1:]) not in sizes:
                    raise ValueError(
                        f"`{name}` of shape {tuple(item.shape)} looks like an RGB(A) image; a mask has one channel: "
                        "(H, W) or (H, W, 1), or a batch (B, H, W, 1)."
                    )
                if values.ndim == 3 and values.shape[-1] == 1:
                    values = values[None]
                if values.ndim == 4:
                    values = values.permute(0, 3, 1, 2)
            values = values.reshape(-1, 1, *values.shape[-2:]) if values.ndim < 4 else values
            if values.shape[1] != 1:
                layouts = (
                    "numpy masks are channels-last: (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1)"
                    if isinstance(item, np.ndarray)
                    else "torch masks: (H, W), (B, H, W) or (B, 1, H, W)"
                )
                raise ValueError(f"`{name}` must have a single channel, got shape {tuple(item.shape)} ({layouts}).")
            if values.dtype == torch.uint8 and values.max() > 1:  # 0-255; a uint8 mask of 0 / 1 is read as 0 / 1
                values = values.float() / 255
            elif values.dtype != torch.bool and not values.is_floating_point():  # 0 / 1 masks (np.zeros(..., int))
                if bool(((values != 0) & (values != 1)).any()):
                    raise ValueError(
                        f"`{name}` of integers ({item.dtype if isinstance(item, np.ndarray) else values.dtype}) must "
                        "hold 0 / 1 (1 = generate), or be bool, uint8 "
                        "or float in [0, 1]."
                    )
            values = values.float()
            if not bool(torch.isfinite(values).all()) or values.min() < 0 or values.max() > 1:
                raise ValueError(f"`{name}` float values must be finite and in [0, 1] (white / 1 = generate).")
        masks.append(values.cpu())
    if len({tuple(m.shape[-2:]) for m in masks}) != 1:
        raise ValueError(f"`{name}`: every mask of the list must have the same size.")
    return torch.cat(masks)


def latent_grid_mask(mask_BHW: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """A binary mask (B, 1, H, W) reduced to the latent grid (B, h, w) bool: a cell is generated when any of its
    pixels is (windows of ``adaptive_max_pool2d``; at the grid's own size the mask is kept as is)."""
    return torch.nn.functional.adaptive_max_pool2d(mask_BHW.float(), tuple(grid_hw))[:, 0] > 0.5


def scale_keep_masks(generate_Bhw: torch.Tensor, schedule) -> list[torch.Tensor]:
    """The notebook's per-scale rule: ``keep = 1 - generate`` on the latent grid, resized to each scale's grid by
    bilinear interpolation (``align_corners=False``) and ``> 0.5``; scales of at most 3 tokens keep everything.
    Returns per scale (B, h, w) bool (True = the input's token)."""
    keep = (~generate_Bhw).float()[:, None]
    masks = []
    for h, w in schedule:
        if h * w <= SMALLEST_KEPT_TOKENS:
            masks.append(torch.ones(keep.shape[0], h, w, dtype=torch.bool, device=keep.device))
        else:
            resized = torch.nn.functional.interpolate(keep, size=(h, w), mode="bilinear", align_corners=False)
            masks.append(resized[:, 0] > 0.5)
    return masks


def box_grid_mask(
    grid_hw: tuple[int, int], y0: float, x0: float, y1: float, x1: float, inpainting: bool = True
) -> torch.Tensor:
    """The notebook's ``get_edit_mask`` box on a (h, w) latent grid, as our mask (True = generate): the box
    ``[round(y0 h):round(y1 h), round(x0 w):round(x1 w)]`` (Python's round: half to even) is generated when
    ``inpainting``, else everything outside it is (out-painting). The notebook's mask is the opposite (1 = keep)."""
    for name, value in (("y0", y0), ("x0", x0), ("y1", y1), ("x1", x1)):
        check_finite_number(value, name, 0.0, 1.0)
    if y1 < y0 or x1 < x0:
        raise ValueError(f"the box must have `y0` <= `y1` and `x0` <= `x1`, got y0={y0}, y1={y1}, x0={x0}, x1={x1}.")
    check_bool(inpainting, "inpainting")
    h, w = grid_hw
    box = torch.zeros(h, w, dtype=torch.bool)
    box[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = True
    return box if inpainting else ~box


def edit_batch_sizes(num_prompts: int, num_images_per_prompt: int) -> tuple[int, ...]:
    """The batch an input image or mask may have: one for all, one per prompt / label, or one per generated image."""
    return tuple(sorted({1, num_prompts, num_prompts * num_images_per_prompt}))


def expand_rows(t: torch.Tensor, num_prompts: int, num_images_per_prompt: int) -> torch.Tensor:
    """``t``'s rows for every generated image: a single row shared by all, one row per prompt repeated
    ``num_images_per_prompt`` times (as the condition's rows are), or already one per image."""
    if t.shape[0] == 1:
        return t.expand(num_prompts * num_images_per_prompt, *t.shape[1:]).contiguous()
    if t.shape[0] == num_prompts:
        return t.repeat_interleave(num_images_per_prompt, dim=0)
    return t


class NextScaleEditMixin:
    """What the in-painting and image-to-image pipelines of every family share: the input image (or its tokens),
    their checks, and the :class:`TokenForcing` their scale loop runs with. A family's tokenizer supplies
    ``_pixels_per_token()``, ``encode_image_tokens(images, schedule)``,
    ``_check_image_indices(image_indices, schedule)`` and ``_make_token_forcing(tokens, keep)`` (:class:`VQEditTokens`,
    :class:`BitwiseEditTokens`, listed before this mixin among a pipeline's bases); the pipeline may override
    :meth:`_edit_schedule`."""

    def _token_forcing(self, tokens: list[torch.Tensor], keep: list[torch.Tensor]) -> TokenForcing | None:
        """The scale loop's ``forcing`` hook, or None where no position of any scale is kept (``strength=1.0``; a
        mask always keeps the first scales): then the call is the plain pipeline's, bit for bit (a blend that keeps
        nothing still gives the code maps another memory layout, and the decoder rounds by it)."""
        if not bool(torch.stack([k.any() for k in keep]).any()):  # one sync, before the loop
            return None
        return self._make_token_forcing(tokens, keep)

    def _edit_schedule(self, height=None, width=None) -> list[tuple[int, int]]:
        self._check_required_components()  # the schedule comes first in an editing call, before check_inputs
        return [tuple(hw) for hw in self.scale_schedule()]

    @property
    def image_processor(self) -> VaeImageProcessor:
        """diffusers' image processor of the pipeline's images (resize, [0, 1] -> [-1, 1])."""
        self._check_required_components()  # (an AttributeError here would be hidden by diffusers' __getattr__)
        return VaeImageProcessor(vae_scale_factor=self._pixels_per_token(), do_resize=True, do_normalize=True)

    def pixel_size(self, schedule) -> tuple[int, int]:
        """The image size (height, width) in pixels of a scale schedule."""
        h, w = schedule[-1]
        return h * self._pixels_per_token(), w * self._pixels_per_token()

    # -- checks --------------------------------------------------------------------------------------------------
    def check_image_inputs(
        self, image, image_indices, schedule, num_prompts: int, num_images_per_prompt: int = 1
    ) -> tuple[int, int, int] | None:
        """Exactly one of ``image`` / ``image_indices``: one for all, one per prompt / label, or one per generated
        image. Returns the image's ``(batch, height, width)`` (``None`` for tokens)."""
        if (image is None) == (image_indices is None):
            raise ValueError(
                "pass exactly one of `image` (PIL, numpy or torch in [0, 1]) and `image_indices` (the "
                f"input's tokens per scale), got {'both' if image is not None else 'neither'}."
            )
        if image is not None:
            size = image_batch_and_size(image)
            batch = size[0]
        else:
            batch = self._check_image_indices(image_indices, schedule)
        if batch not in edit_batch_sizes(num_prompts, num_images_per_prompt):
            name = "image" if image is not None else "image_indices"
            raise ValueError(
                f"`{name}` holds {batch} images but there are {num_prompts} prompts / labels and "
                f"{num_prompts * num_images_per_prompt} images to generate: give one image, one per "
                "prompt / label, or one per generated image."
            )
        return size if image is not None else None

    def check_mask_input(
        self,
        mask_image,
        schedule,
        image_size: tuple[int, int, int] | None,
        num_prompts: int,
        num_images_per_prompt: int = 1,
        mask_dilation: int = 0,
    ) -> None:
        """``mask_image`` at the image's size (or, for ``image_indices``, the pipeline's pixel size) or at the
        latent grid (the last scale's grid): one for all, one per prompt / label, or one per generated image;
        ``mask_dilation`` a whole number of latent cells from 0 to the grid's longer side (which already reaches
        every cell)."""
        longest = max(schedule[-1])
        if not is_integer(mask_dilation) or not 0 <= mask_dilation <= longest:
            raise ValueError(
                f"`mask_dilation` must be a whole number of latent cells in [0, {longest}] (0: the mask as given; "
                f"{longest} reaches every cell of the {schedule[-1][0]}x{schedule[-1][1]} grid), got "
                f"{mask_dilation!r}."
            )
        if mask_image is None:
            raise ValueError(
                "`mask_image` is required (white / 1 / True = generate); see `box_mask()` for the "
                "original notebook's box masks."
            )
        grid = tuple(schedule[-1])
        pixels = tuple(image_size[1:]) if image_size is not None else self.pixel_size(schedule)
        mask = mask_to_tensor(mask_image, sizes=(grid, pixels))
        if tuple(mask.shape[-2:]) not in (grid, pixels):
            what = "the image's size" if image_size is not None else "the pipeline's image size"
            raise ValueError(
                f"`mask_image` is {mask.shape[-2]}x{mask.shape[-1]}, but {what} is "
                f"{pixels[0]}x{pixels[1]} and the latent grid (the last scale's tokens) is "
                f"{grid[0]}x{grid[1]}; give the mask at one of these sizes."
            )
        if mask.shape[0] not in edit_batch_sizes(num_prompts, num_images_per_prompt):
            raise ValueError(
                f"`mask_image` holds {mask.shape[0]} masks but there are {num_prompts} prompts / labels "
                f"and {num_prompts * num_images_per_prompt} images to generate: give one mask, one per "
                "prompt / label, or one per generated image."
            )

    # -- preparation ---------------------------------------------------------------------------------------------
    def prepare_image_tokens(
        self, image, image_indices, schedule, num_prompts: int, num_images_per_prompt: int, device
    ) -> list[torch.Tensor]:
        """The input's tokens per scale, one row per generated image: ``image`` resized to the pipeline's size and
        tokenised (once per distinct image), or ``image_indices``."""
        if image is not None:
            height, width = self.pixel_size(schedule)
            pixels = self.image_processor.preprocess(_processor_input(image), height=height, width=width)
            tokens = self.encode_image_tokens(pixels.to(device=device, dtype=torch.float32), schedule)
        else:
            tokens = [t.to(device) for t in image_indices]
        return [
            expand_rows(self._as_scale_tokens(t, si, schedule), num_prompts, num_images_per_prompt)
            for si, t in enumerate(tokens)
        ]

    def _as_scale_tokens(self, tokens: torch.Tensor, scale_index: int, schedule) -> torch.Tensor:
        """The family's token layout of one scale (identity; Infinity converts bit labels)."""
        return tokens

    def prepare_mask_keep(
        self, mask_image, schedule, num_prompts: int, num_images_per_prompt: int, device, mask_dilation: int = 0
    ) -> list[torch.Tensor]:
        """Per scale, (B, h, w) bool: where the input's tokens are kept (the notebook's rule, module comment), after
        the latent-grid mask grew by ``mask_dilation`` cells on every side (8-connected)."""
        mask = mask_to_tensor(mask_image, sizes=None) >= 0.5  # (checked by check_mask_input); diffusers' binarisation
        generate = latent_grid_mask(mask, schedule[-1]).to(device)
        if mask_dilation:
            size = 2 * mask_dilation + 1
            generate = torch.nn.functional.max_pool2d(generate[:, None].float(), size, 1, mask_dilation)[:, 0] > 0.5
        return [expand_rows(keep, num_prompts, num_images_per_prompt) for keep in scale_keep_masks(generate, schedule)]

    @staticmethod
    def strength_keep(strength: float, schedule, batch_size: int, device) -> list[torch.Tensor]:
        """Image-to-image: the first ``S - int(S * strength)`` scales keep the input, the others are sampled
        (diffusers' ``strength``: the share of the steps that run)."""
        num_sampled = min(int(len(schedule) * strength), len(schedule))
        kept = len(schedule) - num_sampled
        return [
            torch.full((batch_size, h, w), si < kept, dtype=torch.bool, device=device)
            for si, (h, w) in enumerate(schedule)
        ]


class NextScaleInpaintMixin(NextScaleEditMixin):
    """In-painting / out-painting: ``mask_image`` says where to generate."""

    def kept_token_grid(self, mask_image, mask_dilation: int = 0, height=None, width=None, image=None) -> torch.Tensor:
        """(B, h, w) bool on the last scale's token grid: where in-painting ``image`` with ``mask_image`` (white =
        generate; one mask or several, at the image's size, or without ``image`` the pipeline's, or at the grid's)
        keeps the input's tokens, ``mask_dilation`` applied; the mask sizes the call refuses, this refuses too. Shows
        before generating what a mask keeps: a region smaller than a cell keeps nothing (Infinity: the grid of
        ``height`` x ``width``, default the pipeline's size)."""
        schedule = self._edit_schedule(height, width)
        image_size = image_batch_and_size(image) if image is not None else None
        pixels = tuple(image_size[1:]) if image_size is not None else self.pixel_size(schedule)
        mask = mask_to_tensor(mask_image, sizes=(tuple(schedule[-1]), pixels))  # once: (B, 1, H, W)
        self.check_mask_input(mask, schedule, image_size, mask.shape[0], 1, mask_dilation)
        return self.prepare_mask_keep(mask, schedule, mask.shape[0], 1, "cpu", mask_dilation)[-1]

    def box_mask(self, y0: float, x0: float, y1: float, x1: float, inpainting: bool = True) -> torch.Tensor:
        """The latent-grid mask (h, w) bool (True = generate) of the original notebook's
        ``get_edit_mask(patch_nums, y0, x0, y1, x1, inpainting)``: with ``inpainting`` the box
        ``[round(y0 h):round(y1 h), round(x0 w):round(x1 w)]`` is generated (Python's round, half to even), else
        everything around it (out-painting). Coordinates are fractions of the image's height / width. The notebook's
        mask means the opposite (1 = keep)."""
        return box_grid_mask(self._edit_schedule()[-1], y0, x0, y1, x1, inpainting)


class VQEditTokens:
    """The tokenizer's part of editing for VAR and STAR (``self.vqvae``, a multi-scale VQ-VAE): tokens are the
    codebook indices of every scale, as ``vqvae.encode_indices`` returns them ((B, pn*pn) each)."""

    def _pixels_per_token(self) -> int:
        return self.vqvae.downsample_factor

    def encode_image_tokens(self, images: torch.Tensor, schedule) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> the codebook indices of every scale."""
        return self.vqvae.encode_indices(images)

    def _check_image_indices(self, image_indices, schedule) -> int:
        if not isinstance(image_indices, (list, tuple)) or len(image_indices) != len(schedule):
            raise ValueError(
                f"`image_indices` must be a list of {len(schedule)} LongTensors (B, pn*pn), one per "
                "scale, as `vqvae.encode_indices` returns them."
            )
        batch = None
        for si, (tokens, (h, w)) in enumerate(zip(image_indices, schedule)):
            if (
                not torch.is_tensor(tokens)
                or tokens.ndim != 2
                or tokens.shape[1] != h * w
                or tokens.dtype not in (torch.int32, torch.int64)
                or (batch is not None and tokens.shape[0] != batch)
            ):
                got = f"{tuple(tokens.shape)} {tokens.dtype}" if torch.is_tensor(tokens) else type(tokens).__name__
                raise ValueError(
                    f"`image_indices[{si}]` must be an int64 / int32 tensor of shape (B, {h * w}) with the "
                    f"batch of the other scales, got {got}."
                )
            batch = tokens.shape[0]
        check_token_values(image_indices, 0, self.vqvae.config.vocab_size - 1, "image_indices")
        return batch

    def _make_token_forcing(self, tokens: list[torch.Tensor], keep: list[torch.Tensor]) -> TokenForcing:
        tokens = [t.long() for t in tokens]
        codes = [self.vqvae.quantize.embed(t, k.shape[-1]).float() for t, k in zip(tokens, keep)]
        return TokenForcing(keep, tokens, codes)


class BitwiseEditTokens:
    """The tokenizer's part of editing for Infinity (``self.vae``, a bitwise multi-scale VAE): tokens are the bits of
    every scale. ``image_indices`` are the bit labels ``vae.encode(images, schedule).bit_labels`` returns (per scale
    (B, h, w, codebook_dim) in the latent layout); the loop works on token bits (B, h, w, bits_per_token)."""

    def _pixels_per_token(self) -> int:
        return self.vae.pixels_per_token

    def encode_image_tokens(self, images: torch.Tensor, schedule) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> the bit labels of every scale (latent layout)."""
        dtype = next(self.vae.encoder.parameters()).dtype
        features = self.vae.encode_features(images.to(dtype)).float()
        return self.vae.quantize(features, schedule).bit_labels

    def _as_scale_tokens(self, bit_labels: torch.Tensor, scale_index: int, schedule) -> torch.Tensor:
        h, w = schedule[scale_index]
        tokens = self.vae.latent_to_tokens(bit_labels.permute(0, 3, 1, 2).long())
        return tokens.reshape(bit_labels.shape[0], h, w, -1)

    def _check_image_indices(self, image_indices, schedule) -> int:
        latent = self.vae.latent_schedule(schedule)
        d = self.vae.config.codebook_dim
        if not isinstance(image_indices, (list, tuple)) or len(image_indices) != len(schedule):
            raise ValueError(
                f"`image_indices` must be a list of {len(schedule)} bit-label tensors (B, h, w, {d}), "
                "one per scale, as `vae.encode(images, scale_schedule).bit_labels` returns them."
            )
        batch = None
        for si, (bits, (h, w)) in enumerate(zip(image_indices, latent)):
            if (
                not torch.is_tensor(bits)
                or tuple(bits.shape[1:]) != (h, w, d)
                or bits.is_floating_point()
                or (batch is not None and bits.shape[0] != batch)
            ):
                got = f"{tuple(bits.shape)} {bits.dtype}" if torch.is_tensor(bits) else type(bits).__name__
                raise ValueError(
                    f"`image_indices[{si}]` must be an integer / bool tensor of shape (B, {h}, {w}, {d}) "
                    f"with the batch of the other scales, got {got}."
                )
            batch = bits.shape[0]
        check_token_values(image_indices, 0, 1, "image_indices")  # bits
        return batch

    def _make_token_forcing(self, tokens: list[torch.Tensor], keep: list[torch.Tensor]) -> TokenForcing:
        return TokenForcing(keep, [t.long() for t in tokens])
