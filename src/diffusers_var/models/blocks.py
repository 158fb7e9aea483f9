"""Building blocks that two or more of the next-scale transformers (VAR, STAR, Infinity) share.

Scale schedules and the block-causal mask, the KV cache for scale-by-scale decoding, L2-normalised ("cosine")
self-attention with the 2-D rotary embedding, the tanh-GELU FFN, and the AdaLN modulation / block / head norm of
VAR and Infinity. What one family alone uses lives in its model file.

Every parameter is used inside the ``forward`` of the module that owns it, and sub-modules are entered through
their ``__call__``: offloading hooks (accelerate's, diffusers' group offloading), layerwise casting and PEFT
adapters all work by wrapping ``forward``. The GPU fast path (fused kernels, float8, compiled pieces) is installed
onto these modules from ``pipelines/fast_inference.py``; nothing here depends on it.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from ..scalars import is_integer

# exp(clamp(log_scale, max=ln 100)): the original clamps the learned per-head logit scale at 100.
MAX_LOG_ATTN_SCALE = math.log(100.0)


# ----------------------------------------------------------------------------------------------
# Scale schedules
# ----------------------------------------------------------------------------------------------
def validate_patch_nums(patch_nums: Sequence[int], name: str = "patch_nums") -> tuple[int, ...]:
    if hasattr(patch_nums, "tolist"):  # a tensor / numpy array of them
        patch_nums = patch_nums.tolist()
    if (
        isinstance(patch_nums, (str, bytes))
        or not isinstance(patch_nums, Sequence)
        or not all(is_integer(p) for p in patch_nums)
    ):  # (int() would read 2.5 as 2)
        raise ValueError(f"`{name}` must be a list of strictly increasing positive integers, got {patch_nums!r}.")
    patch_nums = tuple(int(p) for p in patch_nums)
    if len(patch_nums) < 2:
        raise ValueError(f"`{name}` needs at least two scales, got {patch_nums}.")
    if any(p < 1 for p in patch_nums) or any(b <= a for a, b in zip(patch_nums, patch_nums[1:])):
        raise ValueError(f"`{name}` must be strictly increasing positive integers, got {patch_nums}.")
    return patch_nums


def square_schedule(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
    """``[(pn, pn), ...]``: VAR / STAR token grids in the ``(h, w)`` form every pipeline uses."""
    return [(pn, pn) for pn in patch_nums]


def scale_token_counts(patch_nums: Sequence[int]) -> list[int]:
    return [pn * pn for pn in patch_nums]


def scale_begin_ends(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
    """Token range ``[begin, end)`` of every scale in the flattened pyramid."""
    ranges, begin = [], 0
    for count in scale_token_counts(patch_nums):
        ranges.append((begin, begin + count))
        begin += count
    return ranges


def scale_level_ids(patch_nums: Sequence[int], device=None) -> torch.LongTensor:
    """(1, L) int64: the scale index of every token of the pyramid (VAR's ``lvl_1L``)."""
    return level_ids_from_counts(scale_token_counts(patch_nums), device)


def level_ids_from_counts(token_counts: Sequence[int], device=None) -> torch.LongTensor:
    """(1, L) int64 scale index of every token, for scales of any shape (``token_counts`` = h*w per scale)."""
    ids = [torch.full((count,), si, dtype=torch.long) for si, count in enumerate(token_counts)]
    return torch.cat(ids).unsqueeze(0).to(device)


def block_causal_bias(patch_nums: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, L, L) additive mask: 0 where level(query) >= level(key), -inf elsewhere."""
    level = scale_level_ids(patch_nums, device)[0]
    allowed = level[:, None] >= level[None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return bias[None, None]


def block_causal_mask(patch_nums: Sequence[int], device=None) -> torch.BoolTensor:
    """(1, 1, L, L) boolean mask (True = may attend); dtype-agnostic form of :func:`block_causal_bias`."""
    return block_causal_mask_from_counts(scale_token_counts(patch_nums), device)


def block_causal_mask_from_counts(token_counts: Sequence[int], device=None) -> torch.BoolTensor:
    """:func:`block_causal_mask` for scales of any shape (``token_counts`` = h*w per scale)."""
    level = level_ids_from_counts(token_counts, device)[0]
    return (level[:, None] >= level[None, :])[None, None]


# ----------------------------------------------------------------------------------------------
# KV cache for scale-by-scale decoding
# ----------------------------------------------------------------------------------------------
class LayerKVCache:
    """Keys/values of one attention layer, appended scale by scale along the sequence axis.

    Storage is pre-allocated when the total length is known, so decoding does not re-concatenate
    the whole history at every scale.
    """

    def __init__(self, max_length: int | None = None):
        self.max_length = max_length
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.length = 0
        self.memo: dict = {}  # per-generation values that depend only on the condition (AdaLN modulation, text k/v)
        self.storage: tuple[torch.Tensor, int] | None = None  # (flat buffer, layer index): see KVCache.share_storage

    def append(self, key_BLHD: torch.Tensor, value_BLHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_length is None:
            if self._keys is None:
                self._keys, self._values = key_BLHD, value_BLHD
            else:
                self._keys = torch.cat((self._keys, key_BLHD), dim=1)
                self._values = torch.cat((self._values, value_BLHD), dim=1)
            self.length += key_BLHD.shape[1]
            return self._keys, self._values
        B, L, H, D = key_BLHD.shape
        keys, values, start = self.reserve(B, L, H, D, key_BLHD)
        keys[:, start : start + L] = key_BLHD
        values[:, start : start + L] = value_BLHD
        return keys[:, : start + L], values[:, : start + L]

    def reserve(self, batch: int, length: int, heads: int, head_dim: int, like: torch.Tensor):
        """Room for ``length`` more positions without writing them: ``(keys, values, start)``, the whole (batch,
        max_length, heads, head_dim) storage and the first new position. The caller writes the new keys and values at
        ``[start, start + length)`` (e.g. from the kernel that computes them, instead of a copy) and reads the first
        ``start + length`` positions. Only for a cache with ``max_length``."""
        if self.max_length is None:
            raise ValueError("`reserve` needs a KV cache with `max_length` (pre-allocated storage).")
        new_len = self.length + length
        if new_len > self.max_length:
            raise ValueError(f"KV cache overflow: {new_len} tokens > max_length={self.max_length}.")
        keys = self._keys
        if keys is not None and keys.shape[0] != batch and self.length:
            raise ValueError(
                f"`kv_cache` holds {keys.shape[0]} rows of this generation, the scale brings {batch}: one batch per "
                "generation (`kv_cache.reset()` or a new cache for another)."
            )
        # new storage for a new generation of another batch, dtype or device (reset() keeps the old, whose addresses
        # CUDA graphs hold); within a generation the keys are cast into the storage they started in
        fits = keys is not None and (keys.shape[0], keys.dtype, keys.device) == (batch, like.dtype, like.device)
        if keys is None or (not self.length and not fits):
            self._keys, self._values = self._allocate((batch, self.max_length, heads, head_dim), like)
        start, self.length = self.length, new_len
        return self._keys, self._values, start

    def _allocate(self, shape, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value storage of ``shape``: views of the shared buffer when it has room (``KVCache.share_storage``),
        else new tensors."""
        numel = math.prod(shape)
        if self.storage is not None:
            flat, index = self.storage
            start = 2 * index * numel
            if flat.dtype == like.dtype and flat.device == like.device and flat.numel() >= start + 2 * numel:
                return flat[start : start + numel].view(shape), flat[start + numel : start + 2 * numel].view(shape)
        return like.new_empty(shape), like.new_empty(shape)

    def reset(self) -> None:
        """Forget the cached tokens but keep the storage (its addresses stay valid for CUDA graphs)."""
        self.length = 0
        self.memo.clear()
        if self.max_length is None:  # (grown by concatenation: nothing to keep)
            self._keys = self._values = None

    def memoize(self, key: str, compute: Callable):
        """``compute()`` once per generation: the condition is the same at every scale, so e.g. the AdaLN
        modulation is computed at the first scale and reused (for large models a third of the weights read)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


def may_read_values(tensor: torch.Tensor, training: bool) -> bool:
    """Whether a check of ``tensor``'s values (a host sync) may run: never inside a CUDA graph capture, nor off the
    CPU while ``training`` (it would wait for the device at every step and break a compiled graph)."""
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return tensor.device.type == "cpu" or not training


def check_ffn_width(dim: int, mlp_ratio: float) -> int:
    """``round(dim * mlp_ratio)``, the FFN width of VAR's and STAR's blocks; a ValueError naming ``mlp_ratio`` when
    that is no unit at all."""
    width = round(dim * mlp_ratio)
    if width < 1:
        raise ValueError(f"`mlp_ratio` {mlp_ratio} gives an FFN of width {width} for embed_dim {dim}; it needs >= 1.")
    return width


def memoized(cache: LayerKVCache | None, key: str, compute: Callable):
    """``compute()``, once per generation when decoding with ``cache`` (every call when training)."""
    return compute() if cache is None else cache.memoize(key, compute)


class KVCache:
    """One :class:`LayerKVCache` per transformer block, plus ``head`` for model-level per-generation values.
    ``schedule``: the ``(h, w)`` token grids of the generation it serves."""

    def __init__(self, num_layers: int, schedule: Sequence[tuple[int, int]]):
        self.schedule = [tuple(hw) for hw in schedule]
        max_length = sum(h * w for h, w in self.schedule)
        self.layers = [LayerKVCache(max_length) for _ in range(num_layers)]
        self.head = LayerKVCache()

    def __getitem__(self, index: int) -> LayerKVCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def share_storage(self, flat: torch.Tensor) -> "KVCache":
        """Keep the keys and values in ``flat`` (a 1-D tensor of the cache's dtype and device, layer i's keys and
        values one after the other from offset ``2 i n``, n = batch x max_length x heads x head_dim) when it has room.
        Caches of models that never run at the same time (CoDe's drafter and refiner, whose CUDA graph sets each keep
        their cache) can share one buffer, so they take the memory of the larger one only."""
        for index, layer in enumerate(self.layers):
            layer.storage = (flat, index)
        return self

    def scale_range(self, scale_index: int) -> tuple[int, int]:
        """Token range ``[begin, end)`` of a scale in the flattened pyramid."""
        begin = sum(h * w for h, w in self.schedule[:scale_index])
        h, w = self.schedule[scale_index]
        return begin, begin + h * w

    def reset(self) -> None:
        for layer in (*self.layers, self.head):
            layer.reset()


def square_kv_cache(num_layers: int, patch_nums: Sequence[int], scale_schedule=None) -> KVCache:
    """The KV cache of one VAR / STAR generation: room for the scales of ``scale_schedule`` (the ``(h, w)`` grids
    of the model's own schedule, or its first ones for a generation that stops early; default all of them)."""
    schedule = square_schedule(patch_nums)
    if scale_schedule is not None:
        if [tuple(hw) for hw in scale_schedule] != schedule[: len(scale_schedule)] or not len(scale_schedule):
            raise ValueError(
                f"`scale_schedule` must be the model's schedule {schedule} or its first scales, got "
                f"{list(scale_schedule)}."
            )
        schedule = schedule[: len(scale_schedule)]
    return KVCache(num_layers, schedule)


def check_decoding_step(kv_cache, scale_index, num_layers: int) -> None:
    """Scale-by-scale decoding runs the scales in order on one cache per generation (of this model: ``num_layers``
    blocks): a ValueError for anything else, instead of attention over a wrong prefix or an error from deep inside a
    block."""
    if not isinstance(kv_cache, KVCache):
        raise ValueError(
            "decoding one scale (`scale_index`) needs the `kv_cache` of `init_kv_cache()`, got "
            f"{type(kv_cache).__name__}."
        )
    if len(kv_cache) != num_layers:
        raise ValueError(
            f"`kv_cache` has {len(kv_cache)} layers and this model {num_layers} blocks: it is another model's cache; "
            "make one with this model's `init_kv_cache()`."
        )
    num_scales = len(kv_cache.schedule)
    whole = not isinstance(scale_index, bool) and (
        isinstance(scale_index, numbers.Integral)
        or (
            torch.is_tensor(scale_index)
            and scale_index.ndim == 0
            and not scale_index.is_floating_point()
            and scale_index.dtype != torch.bool
        )
    )
    if not whole or not 0 <= int(scale_index) < num_scales:
        raise ValueError(
            f"`scale_index` must be an int in [0, {num_scales - 1}] for this `kv_cache`, got {scale_index!r}."
        )
    begin, _ = kv_cache.scale_range(int(scale_index))
    if kv_cache.layers and kv_cache.length != begin:  # (a model without blocks caches nothing)
        raise ValueError(
            f"`scale_index` {scale_index} starts at token {begin}, but its `kv_cache` holds {kv_cache.length}: run "
            "the scales in order from 0, with a new cache (`init_kv_cache()`) or `kv_cache.reset()` per generation."
        )


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth on a residual branch (identity at eval or rate 0)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:  # at inference the rate is never read: no compile guard on it
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class ExternalBiasLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose ``forward`` may take the bias as an argument: the originals add biases that
    live on the attention module (a learned q / v bias and a fixed zero k bias) inside one ``F.linear``.

    It is an ``nn.Linear`` (state-dict key ``weight``), so offloading hooks, layerwise casting and PEFT's LoRA layers
    (which pass extra arguments on to the base layer) treat it like any linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class FeedForward(nn.Module):
    """fc2(GELU_tanh(fc1(x))); the output width is ``out_dim`` (default: ``dim``)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim if out_dim is None else out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ----------------------------------------------------------------------------------------------
# 2-D rotary position embedding (interleaved channel pairs; first half of the pairs = row, second = column)
# ----------------------------------------------------------------------------------------------
def apply_interleaved_rotary(x_BLHD: torch.Tensor, cos_LP: torch.Tensor, sin_LP: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2p, 2p+1) of every head by the per-token angles: (a, b) -> (a cos - b sin, a sin + b cos).
    Computed in float32 (low-precision angles would blur positions), cast back."""
    cos = cos_LP.to(x_BLHD.device, torch.float32)[None, :, None]
    sin = sin_LP.to(x_BLHD.device, torch.float32)[None, :, None]
    pairs = x_BLHD.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * a - sin * b, sin * a + cos * b), dim=-1).flatten(-2).type_as(x_BLHD)


class Rotary2D:
    """The ``rotary`` argument of :class:`CosineSelfAttention`: per-token cos / sin tables (L, head_dim // 2) of one
    token range (STAR builds them from its normalised RoPE, Infinity from its grid RoPE)."""

    def __init__(self, cos_LP: torch.Tensor, sin_LP: torch.Tensor):
        self.cos, self.sin = cos_LP, sin_LP

    @staticmethod
    def rotate(q_BLHD: torch.Tensor, k_BLHD: torch.Tensor, cos_LP: torch.Tensor, sin_LP: torch.Tensor):
        return apply_interleaved_rotary(q_BLHD, cos_LP, sin_LP), apply_interleaved_rotary(k_BLHD, cos_LP, sin_LP)

    def __call__(self, q_BLHD: torch.Tensor, k_BLHD: torch.Tensor):
        return self.rotate(q_BLHD, k_BLHD, self.cos, self.sin)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
class CosineSelfAttention(nn.Module):
    """Multi-head self-attention with a fused bias-free qkv projection, learned q/v biases (k has none),
    and optionally L2-normalised q/k with a clamped learned per-head logit scale (softmax scale 1).

    ``rotary`` (optional, :class:`Rotary2D`) is applied after the normalisation and the per-head scale (Infinity), or
    with ``rotary_before_norm`` before them (STAR); the two orders differ only by float rounding, which a sampler
    with a sharp Gumbel temperature (VAR's ``more_smooth``) amplifies. ``kv_cache`` turns the layer into an
    incremental decoder over the cached sequence.
    """

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True, rotary_before_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`embed_dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm, self.rotary_before_norm = attn_l2_norm, rotary_before_norm
        self.to_qkv = ExternalBiasLinear(dim, 3 * dim)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        if attn_l2_norm:
            # log of the per-head logit scale; initialised to ln 4 as in the original.
            self.log_scale = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self,
        x_BLC: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
        rotary: Rotary2D | None = None,
    ) -> torch.Tensor:
        tables = () if rotary is None else (rotary.cos, rotary.sin)
        q, k, v, softmax_scale = self.project(x_BLC, None, *tables)
        return self.to_out(self.attend(q, k, v, softmax_scale, attn_mask, kv_cache))

    def qkv_bias(self) -> torch.Tensor:
        """The (3C,) bias of the fused projection: the learned q bias, zeros for k, the learned v bias."""
        return torch.cat((self.q_bias, self.zero_k_bias.to(self.q_bias.dtype), self.v_bias))

    def project(self, x_BLC: torch.Tensor, qkv_bias: torch.Tensor | None = None, rotary_cos=None, rotary_sin=None):
        """``(q, k, v, softmax_scale)``, each (B, L, H, D), q and k L2-normalised with q scaled per head and rotated
        by the (L, D / 2) tables ``rotary_cos`` / ``rotary_sin`` when given (in the order of ``rotary_before_norm``).
        ``qkv_bias``: :meth:`qkv_bias` computed by the caller (e.g. once per generation), else here."""
        B, L, C = x_BLC.shape
        bias = self.qkv_bias() if qkv_bias is None else qkv_bias
        qkv = self.to_qkv(x_BLC, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)
        rotate = rotary_cos is not None
        if rotate and self.rotary_before_norm:
            q, k = Rotary2D.rotate(q, k, rotary_cos, rotary_sin)
        softmax_scale = 0.25 / math.sqrt(self.head_dim)
        if self.attn_l2_norm:
            head_scale = self.log_scale.clamp_max(MAX_LOG_ATTN_SCALE).exp().transpose(1, 2)  # (1, 1, H, 1)
            q, k, softmax_scale = F.normalize(q, dim=-1).mul(head_scale), F.normalize(k, dim=-1), 1.0
        if rotate and not self.rotary_before_norm:
            q, k = Rotary2D.rotate(q, k, rotary_cos, rotary_sin)
        return q, k, v, softmax_scale

    @staticmethod
    def attend(q, k, v, softmax_scale: float, attn_mask=None, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        """The KV cache and attention: (B, L, H, D) inputs -> (B, L, C), before ``to_out``."""
        B, L = q.shape[:2]
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        out = dispatch_attention_fn(q, k, v, attn_mask=attn_mask, scale=softmax_scale)
        return out.reshape(B, L, -1)


# ----------------------------------------------------------------------------------------------
# AdaLN (VAR, Infinity)
# ----------------------------------------------------------------------------------------------
class AdaLNModulation(nn.Module):
    """SiLU then Linear(cond_dim -> chunks * dim); output viewed as (B, 1, chunks, dim)."""

    def __init__(self, cond_dim: int, dim: int, chunks: int):
        super().__init__()
        self.dim, self.chunks = dim, chunks
        self.linear = nn.Linear(cond_dim, chunks * dim)

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(cond_BD)).view(-1, 1, self.chunks, self.dim)


class AdaLNSelfAttentionBlock(nn.Module):
    """Pre-norm transformer block modulated by a condition vector (VAR / Infinity style).

    The 6 modulation vectors are ``gamma1, gamma2, scale1, scale2, shift1, shift2`` (in that order):
    ``x += gamma1 * Attn(LN(x) * (1 + scale1) + shift1)``; ``x += gamma2 * FFN(LN(x) * (1 + scale2) + shift2)``.
    With ``shared_adaln`` the caller passes the shared (B, 1, 6, C) modulation and the block adds its own
    learned offset ``adaln_offset`` instead of owning a Linear.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_adaln: bool = False,
        attn_l2_norm: bool = True,
        drop_path: float = 0.0,
        ffn_dim: int | None = None,
    ):
        super().__init__()
        self.dim, self.shared_adaln = dim, shared_adaln
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn = CosineSelfAttention(dim, num_heads, attn_l2_norm=attn_l2_norm)
        self.ffn = FeedForward(dim, check_ffn_width(dim, mlp_ratio) if ffn_dim is None else ffn_dim)
        self.drop_path = DropPath(drop_path)
        if shared_adaln:
            self.adaln_offset = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        else:
            self.adaln = AdaLNModulation(dim, dim, 6)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2)``, each (B, 1, C); the ``1 +`` is taken here
        so that decoding, which memoizes this once per generation, does not redo it in every block at every scale."""
        if self.shared_adaln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.adaln_offset + cond).unbind(2)
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.adaln(cond).unbind(2)
        return gamma1, gamma2, scale1.add(1), scale2.add(1), shift1, shift2

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
        rotary: Rotary2D | None = None,
    ) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = memoized(kv_cache, "adaln", lambda: self.modulation(cond))
        x_BLC = self.self_attention_residual(x_BLC, gamma1, scale1, shift1, attn_mask, kv_cache, rotary)
        return self.ffn_residual(x_BLC, gamma2, scale2, shift2)

    # The two residual branches are separate methods: the fast path compiles them (pipelines/fast_inference.py).
    def self_attention_residual(self, x_BLC, gamma, scale_plus_one, shift, attn_mask=None, kv_cache=None, rotary=None):
        attended = self.attn(self.norm(x_BLC).mul(scale_plus_one).add_(shift), attn_mask, kv_cache, rotary)
        return x_BLC + self.drop_path(attended * gamma)

    def ffn_residual(self, x_BLC, gamma, scale_plus_one, shift) -> torch.Tensor:
        ffn_out = self.ffn(self.norm(x_BLC).mul(scale_plus_one).add_(shift))
        return x_BLC + self.drop_path(ffn_out * gamma)


class AdaLNHeadNorm(nn.Module):
    """Condition-modulated LayerNorm before the output head: ``LN(x) * (1 + scale) + shift``."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.adaln = AdaLNModulation(cond_dim, dim, 2)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, memo: LayerKVCache | None = None) -> torch.Tensor:
        scale, shift = memoized(memo, "head_adaln", lambda: self.adaln(cond_BD).unbind(2))
        return self.norm(x_BLC).mul(scale.add(1)).add_(shift)


# ----------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------
def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """trunc_normal with absolute bounds +-2, as the original initialiser uses."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


@torch.no_grad()
def init_linear_and_embedding_weights_(
    model: nn.Module, std: float, extra_params: Sequence[torch.Tensor] = ()
) -> None:
    """Truncated normal (``std``, bounds +-2) for every Linear / Embedding weight and ``extra_params``; zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            truncated_normal_(module.weight, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            truncated_normal_(module.weight, std)
    for param in extra_params:
        if param is not None:
            truncated_normal_(param, std)


@torch.no_grad()
def init_adaln_transformer_weights_(
    model: nn.Module,
    std: float,
    extra_params: Sequence[torch.Tensor] = (),
    init_adaln: float = 0.5,
    init_adaln_gamma: float = 1e-5,
    init_head: float = 0.02,
) -> None:
    """The original VAR / Infinity initialisation of a model with ``blocks`` of :class:`AdaLNSelfAttentionBlock`,
    ``head`` and ``head_norm``: truncated normal (``std``) for Linear / Embedding weights and ``extra_params``,
    zero biases, a small head, residual outputs (cross-attention's too) divided by sqrt(2 depth), near-zero AdaLN
    gates."""
    C, depth = model.config.embed_dim, len(model.blocks)
    init_linear_and_embedding_weights_(model, std, extra_params)
    model.head.weight.mul_(init_head)
    model.head.bias.zero_()
    model.head_norm.adaln.linear.weight.mul_(init_adaln)
    model.head_norm.adaln.linear.bias.zero_()
    for block in model.blocks:
        block.attn.to_out.weight.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        if getattr(block, "cross_attn", None) is not None:  # Infinity's: a residual output as well
            block.cross_attn.to_out.weight.div_(math.sqrt(2 * depth))
        if block.attn.attn_l2_norm:
            block.attn.log_scale.fill_(math.log(4.0))
        block.attn.q_bias.zero_()
        block.attn.v_bias.zero_()
        if block.shared_adaln:
            block.adaln_offset.copy_(torch.randn_like(block.adaln_offset) / C**0.5)
            block.adaln_offset[:, :, 2:].mul_(init_adaln)
            block.adaln_offset[:, :, :2].mul_(init_adaln_gamma)
        else:
            block.adaln.linear.weight[2 * C :].mul_(init_adaln)
            block.adaln.linear.weight[: 2 * C].mul_(init_adaln_gamma)
