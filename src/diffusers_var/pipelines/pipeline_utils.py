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
import math
import warnings
from typing import Any, Callable

import torch

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from .fast_inference import FastInferenceMixin
from .sampling import GeneratorArg

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
UNIFIED_CALLBACK_TENSORS = ["latents", "tokens", "guided_logits", "model_logits", "next_scale_input"]

CallbackArg = Callable[[Any, int, tuple, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None

# set while ``from_pipe`` builds a pipeline: its trailing ``.to(dtype)`` must not cast the shared components
_KEEP_COMPONENT_DTYPES = contextvars.ContextVar("keep_component_dtypes", default=False)


# ----------------------------------------------------------------------------------------------
# Argument checks shared by every family (each names the parameter and the allowed values)
# ----------------------------------------------------------------------------------------------
def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite_number(value, name: str, low: float | None = None, high: float | None = None,
                        low_inclusive: bool = True) -> float:
    """``value`` as a float: a real number (not NaN / inf) within ``[low, high]`` (``(low, high]`` without
    ``low_inclusive``)."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    below = value < low if low_inclusive else value <= low
    if (low is not None and below) or (high is not None and value > high):
        bounds = f"{'[' if low_inclusive else '('}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"`{name}` must be in {bounds}, got {value!r}.")
    return float(value)


def per_scale_values(value, num_scales: int, name: str, low: float = 0.0, low_inclusive: bool = True) -> list[float]:
    """A finite number broadcast to every scale, or a list with one finite number per scale."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_scales
    if len(values) != num_scales:
        raise ValueError(f"`{name}` has {len(values)} entries but the schedule has {num_scales} scales.")
    return [check_finite_number(v, name, low, low_inclusive=low_inclusive) for v in values]


def per_scale(value, num_scales: int) -> list:
    """A per-scale setting as a list: a list / tuple as it is, a scalar repeated for every scale."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_scales


def check_common_inputs(top_k, top_p, output_type, num_images_per_prompt, return_dict=True,
                        num_scales: int | None = None) -> None:
    """The sampling and output arguments every family takes. With ``num_scales``, ``top_k`` may also be a list with
    one value per scale."""
    listed = num_scales is not None and isinstance(top_k, (list, tuple))
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in (top_k if listed else [top_k])):
        per_scale_note = " or a list of them, one per scale" if num_scales is not None else ""
        raise ValueError(f"`top_k` must be an integer >= 0 (0 disables top-k){per_scale_note}, got {shorten(top_k)}.")
    if listed and len(top_k) != num_scales:
        raise ValueError(f"`top_k` has {len(top_k)} entries but the schedule has {num_scales} scales.")
    check_finite_number(top_p, "top_p", 0.0, 1.0)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}.")
    if not isinstance(return_dict, bool):
        raise ValueError(f"`return_dict` must be True or False, got {return_dict!r}.")


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_generator(generator: GeneratorArg, batch_size: int) -> None:
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of length {len(generator)}, but the batch has {batch_size} images "
                f"(prompts x num_images_per_prompt); pass one generator per image or a single generator."
            )
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError("`generator` list must contain only torch.Generator objects.")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator, a list of them, or None; got {type(generator).__name__}.")


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"`{name}` must be a string or a non-empty list of strings (or pass `{name}_embeds`), "
                         f"got {shorten(prompt)}.")
    return list(prompts)


def shorten(value, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters (an 800 kB prompt must not be repeated in a message)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_text_embeds(embeds, mask, width: int, name: str, mask_name: str, batch_size: int | None = None,
                      max_length: int | None = None) -> None:
    """Precomputed text features ``embeds`` (B, N, width), finite, and their optional padding ``mask`` (B, N) (1 /
    True for real tokens, at least one per row); ``batch_size`` / ``max_length`` pin B / bound N. The errors name
    the parameters (``name``, ``mask_name``)."""
    if not torch.is_tensor(embeds) or embeds.ndim != 3 or embeds.shape[0] < 1 or embeds.shape[1] < 1 \
            or embeds.shape[2] != width or not embeds.is_floating_point():
        shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
        raise ValueError(f"`{name}` must be a floating-point (batch, tokens, {width}) tensor, got {shape}.")
    if batch_size is not None and embeds.shape[0] != batch_size:
        raise ValueError(f"`{name}` has {embeds.shape[0]} rows but the batch has {batch_size}; they must match.")
    if max_length is not None and embeds.shape[1] > max_length:
        raise ValueError(f"`{name}` has {embeds.shape[1]} tokens; the model takes at most {max_length}.")
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"`{name}` holds NaN or infinite values.")
    if mask is not None:
        if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(embeds.shape[:2]) or mask.is_floating_point() or mask.is_complex():
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"`{mask_name}` must be a bool or integer tensor of shape {tuple(embeds.shape[:2])} "
                             f"(the shape of `{name}` without its last dimension), got {shape}.")
        if not bool(mask.bool().any(dim=1).all()):
            raise ValueError(f"`{mask_name}`: every row needs at least one real (non-padding) token.")


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
class NextScalePipeline(DiffusionPipeline, FastInferenceMixin):
    """The base of every next-scale ``DiffusionPipeline``: the call's state as diffusers' properties, the one callback
    contract (module docstring), the shared end of a call, and ``from_pipe`` without dtype casts.

    A family pipeline defines ``_callback_tensor_inputs`` (unified names, its own extras, deprecated aliases),
    ``_callback_aliases`` (deprecated name -> unified name), :meth:`decode_latents` and
    :meth:`_next_scale_input`."""

    _callback_aliases: dict[str, str] = {}
    _guidance_scale = None
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

    def _begin_call(self, guidance_scale, num_scales: int) -> None:
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, num_scales, False

    # -- callbacks --------------------------------------------------------------------------------------------------
    def check_callback_inputs(self, callback_on_step_end: CallbackArg, tensor_inputs) -> tuple[Callable | None, list[str]]:
        """``(callback, names)``: a diffusers ``PipelineCallback`` brings its own ``tensor_inputs``; names default to
        ``["latents"]`` and must be in ``_callback_tensor_inputs`` (deprecated aliases warn once per call)."""
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback_on_step_end.tensor_inputs
        names = list(tensor_inputs or ["latents"])
        bad = [name for name in names if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, "
                             f"got {bad}.")
        old = [name for name in names if name in self._callback_aliases]
        if old and callback_on_step_end is not None:
            renames = ", ".join(f"{name!r} -> {self._callback_aliases[name]!r}" for name in old)
            warnings.warn(f"callback tensor names {old} are deprecated and will be removed in the next release; use "
                          f"the names every pipeline shares ({renames}).", FutureWarning, stacklevel=3)
        return callback_on_step_end, names

    def _step_callback(self, callback, names: list[str], scale_index: int, scale_hw: tuple[int, int],
                       tensors: dict[str, Any]) -> torch.Tensor | None:
        """Run ``callback`` for one scale with the requested ``names`` from ``tensors`` (unified names; aliases are
        filled in here). Returns the latent it hands back in place of ``tensors["latents"]``, or ``None``."""
        for alias, unified in self._callback_aliases.items():
            tensors.setdefault(alias, tensors.get(unified))
        out = callback(self, scale_index, tuple(scale_hw), {name: tensors[name] for name in names}) or {}
        latent_names = ["latents"] + [alias for alias, unified in self._callback_aliases.items() if unified == "latents"]
        for name in latent_names:  # the first name whose tensor the callback replaced
            new = out.get(name)
            if new is not None and new is not tensors["latents"]:
                if not torch.is_tensor(new) or tuple(new.shape) != tuple(tensors["latents"].shape):
                    raise ValueError(f"callback_on_step_end returned `{name}` of shape "
                                     f"{tuple(new.shape) if torch.is_tensor(new) else type(new).__name__}; expected "
                                     f"{tuple(tensors['latents'].shape)}.")
                # a copy: the next scales add into the running latent in place
                return new.to(device=tensors["latents"].device, dtype=torch.float32, copy=True)
        return None

    # -- the end of a call ------------------------------------------------------------------------------------------
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The final running latent -> images (B, 3, H, W) in [-1, 1] (family-specific)."""
        raise NotImplementedError

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Decode the final latent (unless ``"latent"``), free offload hooks and wrap the output."""
        if output_type == "latent":
            images = latents
        else:
            images = images_to_output((self.decode_latents(latents) + 1) / 2, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- from_pipe keeps each component's dtype ------------------------------------------------------------------
    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs):
        """diffusers' ``from_pipe`` (the new pipeline shares the components, no weights are copied), except that
        each component keeps its dtype: diffusers casts every component to float32 (or ``dtype``), which, the
        components being shared, also casts those of ``pipeline``. ``dtype=`` still casts, when given."""
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        token = _KEEP_COMPONENT_DTYPES.set(True)
        try:
            new = super().from_pipe(pipeline, **kwargs)
        finally:
            _KEEP_COMPONENT_DTYPES.reset(token)
        return new.to(dtype=dtype) if dtype is not None else new

    def to(self, *args, **kwargs):
        if _KEEP_COMPONENT_DTYPES.get() and not args and set(kwargs) == {"dtype"}:
            return self
        return super().to(*args, **kwargs)

    # -- small shared helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _guidance_rows(x_BlC: torch.Tensor, guided: bool = True) -> torch.Tensor:
        """The transformer input of both guidance halves (the same tokens for the conditional and unconditional rows)."""
        return x_BlC.repeat(2, 1, 1) if guided else x_BlC



def flatten_labels(class_labels) -> list:
    """``class_labels`` as a flat list: an int, a list of ints, a list of lists of ints (diffusers' DiT batches
    labels that way), or a 1-D tensor."""
    if isinstance(class_labels, torch.Tensor):
        return class_labels.flatten().tolist()
    if isinstance(class_labels, int) and not isinstance(class_labels, bool):
        return [class_labels]
    if isinstance(class_labels, (list, tuple)):
        flat = []
        for entry in class_labels:
            flat.extend(entry if isinstance(entry, (list, tuple)) else [entry])
        return flat
    return class_labels


def repeat_rows(t: torch.Tensor | None, times: int, device) -> torch.Tensor | None:
    """``t``'s rows each repeated ``times`` times consecutively (``num_images_per_prompt``), on ``device``."""
    return None if t is None else t.to(device).repeat_interleave(times, dim=0)
