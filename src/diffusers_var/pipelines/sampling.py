"""Sampling primitives shared by the next-scale pipelines: guidance ramp, top-k / top-p filtering,
the multinomial "exponential race", Gumbel smoothing and generator handling.

Random numbers are drawn exactly like the original implementations: with one seeded generator the
draws have the same order, shapes and dtypes (so the same seed gives the same image); with a list of
generators every image gets its own stream (row b draws from ``generator[b]``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


# ----------------------------------------------------------------------------------------------
# Guidance and filtering
# ----------------------------------------------------------------------------------------------
def linear_guidance_ramp(guidance_scale: float, scale_index: int, num_scales: int) -> float:
    """VAR/STAR guidance strength at a scale: 0 at the first scale, ``guidance_scale`` at the last."""
    return guidance_scale * scale_index / (num_scales - 1)


def apply_guidance(logits_2BlV: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """Rows [:B] are conditional, rows [B:] unconditional: ``(1 + t) cond - t uncond``.

    ``strength`` is ``t``, or a float32 tensor ``[1 + t, t]`` (see :func:`guidance_table`) that a CUDA graph reads at
    replay; both give the same float32 products."""
    B = logits_2BlV.shape[0] // 2
    if isinstance(strength, torch.Tensor):
        return strength[0] * logits_2BlV[:B] - strength[1] * logits_2BlV[B:]
    return (1 + strength) * logits_2BlV[:B] - strength * logits_2BlV[B:]


def guidance_table(strengths: Sequence[float], device) -> torch.Tensor:
    """(S, 2) float32 rows ``[1 + t, t]``: :func:`apply_guidance`'s tensor form, rounded from the Python floats as the
    scalar form is (so both paths multiply by the same float32 numbers)."""
    return torch.tensor([[1 + t, t] for t in strengths], dtype=torch.float32).to(device, non_blocking=True)


def ramp_table(guidance_scale: float, num_scales: int, device) -> torch.Tensor:
    """:func:`guidance_table` of :func:`linear_guidance_ramp` at every scale: what a whole-scale CUDA graph reads."""
    return guidance_table([linear_guidance_ramp(guidance_scale, si, num_scales) for si in range(num_scales)], device)


def filter_top_k_top_p_(
    logits_BlV: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    fast: bool = False,
    top_p_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: top-k keeps every logit >= the k-th largest (ties survive); then top-p removes, in
    ascending order, the tokens whose cumulative probability is <= 1 - p (never the largest).

    ``fast`` runs top-p over the k kept values only (a k-wide sort instead of a vocabulary-wide one). It
    is the same rule up to float summation order; the default path reproduces the original bit for bit.
    ``top_p_mass``: a float32 device tensor holding ``1 - top_p`` (see :func:`top_p_mass`), read at run time in
    place of ``top_p`` (top-p on): a CUDA graph then replays with another ``top_p``."""
    V = logits_BlV.shape[-1]
    use_top_p = top_p_mass is not None or top_p > 0
    removable = (1 - top_p) if top_p_mass is None else top_p_mass
    if 0 < top_k < V:  # k >= V keeps every token: nothing to filter
        top_values, top_indices = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=fast)
        kth = top_values[..., -1:] if fast else top_values.amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
        if fast and use_top_p:
            ascending = top_values.flip(-1)
            remove = ascending.softmax(dim=-1).cumsum_(dim=-1) <= removable
            remove[..., -1:] = False
            logits_BlV.scatter_(-1, top_indices.flip(-1), ascending.masked_fill(remove, -torch.inf))
            return logits_BlV
    if use_top_p:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= removable
        remove_sorted[..., -1:] = False
        logits_BlV.masked_fill_(remove_sorted.scatter(-1, sorted_idx, remove_sorted), -torch.inf)
    return logits_BlV


def top_p_mass(top_p: float, device) -> torch.Tensor:
    """``1 - top_p`` as a float32 device tensor for :func:`filter_top_k_top_p_`, rounded from the Python value as the
    scalar comparison rounds it (so a graph replay removes exactly the tokens the eager filter removes)."""
    return torch.tensor(1 - top_p, dtype=torch.float32).to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Random draws
# ----------------------------------------------------------------------------------------------
def _exponential(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    return torch.empty(shape, dtype=torch.float32, device=draw_device).exponential_(generator=generator).to(device)


def exponential_draws(shape: tuple[int, ...], generator: GeneratorArg, device) -> torch.Tensor:
    """Exp(1) noise of ``shape`` (leading dim = batch). One generator draws the whole tensor at once;
    a list draws row b from ``generator[b]``."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([_exponential(shape[1:], g, device) for g in generator])
    return _exponential(shape, generator, device)


def sample_from_logits(logits_BlV: torch.Tensor, generator: GeneratorArg, return_confidence: bool = False):
    """One token per row, exactly as ``torch.multinomial(softmax(logits).view(-1, V), 1)`` draws it:
    ``argmax(p / q)`` with ``q ~ Exp(1)`` of shape (B*l, V) (works for a generator on any device).

    With ``return_confidence`` also returns the sampled tokens' probabilities (B, l, 1), which STAR's
    stable sampler ranks positions by."""
    B, length, V = logits_BlV.shape
    probs = logits_BlV.softmax(dim=-1).view(B * length, V)
    if isinstance(generator, (list, tuple)):
        noise = exponential_draws((B, length, V), generator, probs.device).view(B * length, V)
    else:
        noise = exponential_draws((B * length, V), generator, probs.device)
    indices = (probs / noise).argmax(dim=-1)
    if not return_confidence:
        return indices.view(B, length)
    return indices.view(B, length), probs.gather(1, indices[:, None]).view(B, length, 1)


def nan_where_drawn_from_nonfinite(values: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """``values`` (what drawn tokens became: code vectors, bit codes) set to NaN where the draw's probability
    ``confidence`` (broadcast against them) is not finite, i.e. where the logits were NaN or infinite (an adapter
    scaled past the float range, weights that overflow). The argmax over NaN probabilities picks token 0, which gave an
    ordinary-looking image; the NaN reaches the final latents instead, which the pipelines refuse. Elementwise, with
    no device sync: it runs inside the per-scale CUDA graphs too. The result keeps the memory layout of ``values``
    (out-of-place ``masked_fill`` returns a contiguous tensor): Infinity's codes are a channels-last view as in the
    original, and the upsampling and decoder kernels that read them depend on the layout in the last float bits."""
    return values.clone().masked_fill_(~confidence.isfinite(), torch.nan)


def advance_as_sample_from_logits(logits_shape: tuple[int, int, int], generator: GeneratorArg, device) -> None:
    """Advance ``generator`` exactly as :func:`sample_from_logits` on logits of ``logits_shape`` (B, l, V) does, with
    the same draws and nothing else: for draws whose tokens are thrown away."""
    B, length, V = logits_shape
    exponential_draws((B, length, V) if isinstance(generator, (list, tuple)) else (B * length, V), generator, device)


def gumbel_softmax(logits_BlV: torch.Tensor, tau: float, generator: GeneratorArg) -> torch.Tensor:
    """Soft Gumbel-softmax with noise ``-log(Exp(1))`` of the logits' shape, drawn from ``generator``."""
    gumbels = -exponential_draws(tuple(logits_BlV.shape), generator, logits_BlV.device).log()
    return ((logits_BlV + gumbels) / tau).softmax(dim=-1)


def smooth_tau(ratio: float) -> float:
    """VAR's ``more_smooth`` temperature at relative scale position ``ratio`` in [0, 1]."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)


def draw_class_labels(num_classes: int, batch_size: int, generator: GeneratorArg, device) -> torch.LongTensor:
    """Uniform random labels, drawn like the original (``multinomial(uniform, B, replacement=True)``)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([draw_class_labels(num_classes, 1, g, device) for g in generator])
    draw_device = generator.device if generator is not None else torch.device("cpu")
    uniform = torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32, device=draw_device)
    labels = torch.multinomial(uniform, num_samples=batch_size, replacement=True, generator=generator)
    return labels.reshape(batch_size).to(device)


# ----------------------------------------------------------------------------------------------
# STAR's causal-driven stable sampler
# ----------------------------------------------------------------------------------------------
STABLE_SAMPLER_VERSIONS = ("1024", "new")
# The original's absolute thresholds: with version "1024", scales >= 13 take 15 steps, and the steps
# < 5 of scales < 13 propose tokens with the main head.
_LONG_SCHEDULE_FROM_SCALE, _MAIN_HEAD_STEPS = 13, 5
# Steps below this commit random positions (the original replaces the confidences by uniform draws).
RANDOM_COMMIT_STEPS = 5


def stable_sampler_plan(scale_index: int, version: str) -> tuple[int, int]:
    """``(num_steps, main_head_steps)`` at a stable-sampler scale: how many commit steps, and how many
    leading steps propose with the main head (the rest use the sampler head)."""
    if version == "1024":
        long_scale = scale_index >= _LONG_SCHEDULE_FROM_SCALE
        return (15 if long_scale else 8), (0 if long_scale else _MAIN_HEAD_STEPS)
    return 8, 0


def stable_sampler_counts(num_tokens: int, num_steps: int) -> list[int]:
    """Tokens committed per step: the arccos schedule, rounded half to even, zeros raised to one, and
    the last step absorbing the remainder (so the counts sum to ``num_tokens``)."""
    ratios = np.arccos(np.linspace(1.0, 0.0, num_steps)) / (math.pi / 2)
    counts = np.round(ratios / ratios.sum() * num_tokens).astype(np.int64)
    counts[counts == 0] = 1
    counts[-1] += num_tokens - counts.sum()
    return counts.tolist()


def uniform_draws(shape: tuple[int, ...], generator: GeneratorArg, device) -> torch.Tensor:
    """``torch.rand(shape)`` from ``generator`` (the global RNG when None), moved to ``device``. A list of B generators
    draws per image: generator b fills rows b, b + B, ... (the image's rows of every guidance half)."""
    if isinstance(generator, (list, tuple)):
        B, rows = len(generator), shape[0]
        per_image = [uniform_draws((rows // B, *shape[1:]), g, device) for g in generator]  # (rows / B, ...) each
        return torch.stack(per_image, dim=1).reshape(shape)
    draw_device = generator.device if generator is not None else torch.device(device)
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def derived_generator(generator: torch.Generator, salt: bytes) -> torch.Generator:
    """A new generator seeded from ``generator``'s current state and ``salt``, without advancing ``generator``: a
    second random stream that a seed reproduces (STAR's stable sampler draws its commit positions from one)."""
    digest = hashlib.sha256(generator.get_state().cpu().numpy().tobytes() + salt).digest()
    return torch.Generator(generator.device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
