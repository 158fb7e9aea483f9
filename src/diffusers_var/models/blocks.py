"""Building blocks shared by the next-scale-prediction transformers (VAR, STAR, Infinity).

Everything here is family-agnostic: scale schedules, the block-causal mask, the KV cache used for
scale-by-scale decoding, L2-normalised ("cosine") self-attention, the tanh-GELU FFN and the AdaLN
modulation / block / head norm.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention_dispatch import dispatch_attention_fn

# exp(clamp(log_scale, max=ln 100)): the original clamps the learned per-head logit scale at 100.
MAX_LOG_ATTN_SCALE = math.log(100.0)


# ----------------------------------------------------------------------------------------------
# Scale schedules
# ----------------------------------------------------------------------------------------------
def validate_patch_nums(patch_nums: Sequence[int], name: str = "patch_nums") -> tuple[int, ...]:
    patch_nums = tuple(int(p) for p in patch_nums)
    if len(patch_nums) < 2:
        raise ValueError(f"`{name}` needs at least two scales, got {patch_nums}.")
    if any(p < 1 for p in patch_nums) or any(b <= a for a, b in zip(patch_nums, patch_nums[1:])):
        raise ValueError(f"`{name}` must be strictly increasing positive integers, got {patch_nums}.")
    return patch_nums


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
        self.memo: dict = {}  # per-generation values that depend only on the condition (AdaLN modulation)

    def append(self, key_BLHD: torch.Tensor, value_BLHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_len = self.length + key_BLHD.shape[1]
        if self.max_length is None:
            if self._keys is None:
                self._keys, self._values = key_BLHD, value_BLHD
            else:
                self._keys = torch.cat((self._keys, key_BLHD), dim=1)
                self._values = torch.cat((self._values, value_BLHD), dim=1)
        else:
            if new_len > self.max_length:
                raise ValueError(f"KV cache overflow: {new_len} tokens > max_length={self.max_length}.")
            if self._keys is None or self._keys.shape[0] != key_BLHD.shape[0]:
                shape = (key_BLHD.shape[0], self.max_length, *key_BLHD.shape[2:])
                self._keys = key_BLHD.new_empty(shape)
                self._values = value_BLHD.new_empty(shape)
            self._keys[:, self.length : new_len] = key_BLHD
            self._values[:, self.length : new_len] = value_BLHD
        self.length = new_len
        return self._keys[:, :new_len], self._values[:, :new_len]

    def reset(self) -> None:
        """Forget the cached tokens but keep the storage (its addresses stay valid for CUDA graphs)."""
        self.length = 0
        self.memo.clear()

    def memoize(self, key: str, compute: Callable):
        """``compute()`` once per generation: the condition is the same at every scale, so e.g. the AdaLN
        modulation is computed at the first scale and reused (for large models a third of the weights read)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


class KVCache:
    """One :class:`LayerKVCache` per transformer block."""

    def __init__(self, num_layers: int, max_length: int | None = None):
        self.layers = [LayerKVCache(max_length) for _ in range(num_layers)]
        self.head = LayerKVCache()  # memo for model-level per-generation values (head modulation)

    def __getitem__(self, index: int) -> LayerKVCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def reset(self) -> None:
        for layer in (*self.layers, self.head):
            layer.reset()


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth on a residual branch (identity at eval or rate 0)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class FeedForward(nn.Module):
    """fc2(GELU_tanh(fc1(x))); the output width is ``out_dim`` (default: ``dim``).

    ``fused_gelu`` (set by :func:`fuse_ffn_gelu_`): on CUDA, without autograd and for at least ``FUSED_GELU_MIN_ROWS``
    token rows, fc1's bias and the tanh GELU run in the cuBLASLt epilogue of its matmul, so the wide hidden activation
    is written once instead of written, read and written again by a separate GELU kernel (H100, VAR-d30 batch 64:
    637 -> 612 ms). Fewer rows keep the plain matmul: cuBLASLt's small-row kernels are slower (VAR-d16 batch 1:
    +4.8 ms)."""

    fused_gelu: bool = False
    FUSED_GELU_MIN_ROWS = 4096

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim if out_dim is None else out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_fp8(self.fc1, x):  # the GELU then fuses with the quantisation of fc2's input (compiled blocks)
            return linear_forward(self.fc2, F.gelu(linear_forward(self.fc1, x), approximate="tanh"))
        if self.fused_gelu and x.is_cuda and not torch.is_grad_enabled() and x.numel() >= self.FUSED_GELU_MIN_ROWS * x.shape[-1]:
            # on CUDA ``_addmm_activation(use_gelu=True)`` is the tanh approximation (exact erf GELU on the CPU)
            hidden = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(hidden.view(*x.shape[:-1], -1))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def fuse_ffn_gelu_(model: nn.Module, enabled: bool = True) -> int:
    """Set :attr:`FeedForward.fused_gelu` to ``enabled`` in every feed-forward of ``model``; returns how many."""
    feed_forwards = [m for m in model.modules() if isinstance(m, FeedForward)]
    for feed_forward in feed_forwards:
        feed_forward.fused_gelu = bool(enabled)
    return len(feed_forwards)


# float8 linears (opt-in: ``VARPipeline.enable_fast_inference(fp8=True)``)
FLOAT8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_ROWS = 4096  # fewer token rows keep the bf16 matmul: the quantisation would cost more than it saves


def quantize_to_float8(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise float8 (e4m3) quantisation: ``(x8, scale)`` with ``x ~= x8 * scale``, ``scale`` (M, 1) float32 chosen
    so that each row's largest magnitude maps to 448 (an all-zero row gets a tiny scale and stays zero)."""
    scale = x_MK.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FLOAT8_MAX
    return (x_MK.float() / scale).to(torch.float8_e4m3fn), scale


def uses_fp8(linear: nn.Linear, x: torch.Tensor) -> bool:
    """Whether :func:`linear_forward` takes the float8 path: ``linear`` carries float8 weights
    (:func:`quantize_linears_fp8_`), no autograd, and at least ``FP8_MIN_ROWS`` token rows."""
    return (getattr(linear, "weight_fp8", None) is not None and not torch.is_grad_enabled()
            and x.numel() >= FP8_MIN_ROWS * x.shape[-1])


_MODULE_BIAS = object()


def linear_forward(linear: nn.Linear, x: torch.Tensor, bias=_MODULE_BIAS) -> torch.Tensor:
    """``F.linear(x, linear.weight, bias)`` (``bias`` defaults to the module's), or, when :func:`uses_fp8`, the same
    product in float8: activations quantised per row, weights per output channel, float32 accumulation, output in
    ``x``'s dtype (H100, one VAR-d30 block's matmuls and elementwise work at 32k rows, compiled: 4.42 -> 3.64 ms)."""
    bias = linear.bias if bias is _MODULE_BIAS else bias
    if not uses_fp8(linear, x):
        return F.linear(x, linear.weight, bias)
    x8, x_scale = quantize_to_float8(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(x8, linear.weight_fp8.t(), scale_a=x_scale, scale_b=linear.weight_fp8_scale,
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])


def fp8_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears that ``fp8=True`` runs in float8: attention (qkv, out) and FFN (fc1, fc2) of every
    :class:`CosineSelfAttention` / :class:`FeedForward` of ``model``. A ValueError if one has a width that
    ``torch._scaled_mm`` cannot take (not a multiple of 16), raised before anything is changed."""
    linears = []
    for module in model.modules():
        if isinstance(module, CosineSelfAttention):
            linears += [module.to_qkv, module.to_out]
        elif isinstance(module, FeedForward):
            linears += [module.fc1, module.fc2]
    for linear in linears:
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"float8 matmuls need widths divisible by 16, got a {linear.in_features} -> "
                             f"{linear.out_features} linear; use `fp8=False` for this model.")
    return linears


def quantize_linears_fp8_(model: nn.Module, enabled: bool = True) -> int:
    """Give (``enabled``) or take back the float8 copies of the weights of :func:`fp8_linears`: per output channel
    scaled e4m3 weights, as non-persistent buffers ``weight_fp8`` / ``weight_fp8_scale`` (``state_dict`` and
    ``save_pretrained`` are unchanged; the original weights stay). Returns how many linears carry float8 weights now."""
    if not enabled:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                for name in ("weight_fp8", "weight_fp8_scale"):
                    module._buffers.pop(name, None)
        return 0
    linears = fp8_linears(model)  # all widths checked before the first buffer is added
    for linear in linears:
        with torch.no_grad():
            weight8, scale = quantize_to_float8(linear.weight)
        linear.register_buffer("weight_fp8", weight8, persistent=False)
        linear.register_buffer("weight_fp8_scale", scale.t().contiguous(), persistent=False)  # (1, N)
    return len(linears)


class CosineSelfAttention(nn.Module):
    """Multi-head self-attention with a fused bias-free qkv projection, learned q/v biases (k has none),
    and optionally L2-normalised q/k with a clamped learned per-head logit scale (softmax scale 1).

    ``rotary`` (optional) is a callable ``(q_BLHD, k_BLHD) -> (q, k)`` applied after normalisation;
    ``kv_cache`` turns the layer into an incremental decoder over the cached sequence.
    """

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`embed_dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
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
        rotary: Callable | None = None,
    ) -> torch.Tensor:
        q, k, v, softmax_scale = self.project(x_BLC)
        return linear_forward(self.to_out, self.attend(q, k, v, softmax_scale, attn_mask, kv_cache, rotary))

    def project(self, x_BLC: torch.Tensor):
        """Pure tensor work before the cache: ``(q, k, v, softmax_scale)``, each (B, L, H, D), q and k
        L2-normalised with q scaled per head (``torch.compile`` fuses these elementwise ops)."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias.to(self.q_bias.dtype), self.v_bias))
        qkv = linear_forward(self.to_qkv, x_BLC, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # each (B, L, H, D)
        if self.attn_l2_norm:
            head_scale = self.log_scale.clamp_max(MAX_LOG_ATTN_SCALE).exp().transpose(1, 2)  # (1, 1, H, 1)
            return F.normalize(q, dim=-1).mul(head_scale), F.normalize(k, dim=-1), v, 1.0
        return q, k, v, 0.25 / math.sqrt(self.head_dim)

    def attend(self, q, k, v, softmax_scale: float, attn_mask=None, kv_cache: LayerKVCache | None = None,
               rotary: Callable | None = None) -> torch.Tensor:
        """Rotary embedding, the KV cache and attention: (B, L, H, D) inputs -> (B, L, C), before ``to_out``."""
        B, L = q.shape[:2]
        if rotary is not None:
            q, k = rotary(q, k)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        out = dispatch_attention_fn(q, k, v, attn_mask=attn_mask, scale=softmax_scale)
        return out.reshape(B, L, -1)


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
    learned offset ``adaln_offset`` instead of owning a Linear. ``rotary`` is a :class:`Rotary2D` (its cos / sin
    tables are applied inside :meth:`attention_inputs`, which ``compile_adaln_blocks_`` compiles).
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
        self.ffn = FeedForward(dim, round(dim * mlp_ratio) if ffn_dim is None else ffn_dim)
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
        rotary: "Rotary2D | None" = None,
    ) -> torch.Tensor:
        if kv_cache is not None:
            modulation = kv_cache.memoize("adaln", lambda: self.modulation(cond))
        else:
            modulation = self.modulation(cond)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation
        x_BLC = self.self_attention_residual(x_BLC, gamma1, scale1, shift1, attn_mask, kv_cache, rotary)
        return self.ffn_residual(x_BLC, gamma2, scale2, shift2)

    # The pure tensor pieces below are what ``compile_adaln_blocks_`` hands to torch.compile; the KV cache
    # (Python state) stays between them, in ``self_attention_residual``.
    def self_attention_residual(self, x_BLC, gamma, scale_plus_one, shift, attn_mask=None, kv_cache=None,
                                rotary: "Rotary2D | None" = None) -> torch.Tensor:
        tables = () if rotary is None else (rotary.cos, rotary.sin)  # rotated inside the compiled piece
        q, k, v, softmax_scale = self.attention_inputs(x_BLC, scale_plus_one, shift, *tables)
        return self.attention_residual(x_BLC, self.attn.attend(q, k, v, softmax_scale, attn_mask, kv_cache), gamma)

    def attention_inputs(self, x_BLC, scale_plus_one, shift, rotary_cos=None, rotary_sin=None):
        q, k, v, softmax_scale = self.attn.project(self.norm(x_BLC).mul(scale_plus_one).add_(shift))
        if rotary_cos is not None:
            q, k = apply_interleaved_rotary(q, rotary_cos, rotary_sin), apply_interleaved_rotary(k, rotary_cos, rotary_sin)
        return q, k, v, softmax_scale

    def attention_residual(self, x_BLC, attended_BLC, gamma) -> torch.Tensor:
        return x_BLC + self.drop_path(linear_forward(self.attn.to_out, attended_BLC) * gamma)

    def ffn_residual(self, x_BLC, gamma, scale_plus_one, shift) -> torch.Tensor:
        ffn_out = self.ffn(self.norm(x_BLC).mul(scale_plus_one).add_(shift))
        return x_BLC + self.drop_path(ffn_out * gamma)


def compile_adaln_blocks_(model: nn.Module) -> int:
    """``torch.compile`` the pure tensor pieces of every :class:`AdaLNSelfAttentionBlock` of ``model`` (in place,
    parameter names unchanged). At batch 1 a block's time is mostly its ~26 tiny elementwise kernels (LayerNorm,
    modulation, q/k normalisation, gating); compiled, they fuse into a few. The compiled code is shared by all
    blocks (same class) and becomes dynamic in the token count after the first new scale, so a generation
    compiles a handful of graphs, not one per block and scale. Returns the number of blocks."""
    blocks = [m for m in model.modules() if isinstance(m, AdaLNSelfAttentionBlock)]
    for block in blocks:
        names = ["attention_inputs", "attention_residual", "ffn_residual"]
        if isinstance(block, AdaLNCrossAttentionBlock):
            names += ["cross_attention_query", "cross_attention_residual"]
        for name in names:
            setattr(block, name, torch.compile(getattr(block, name)))
    return len(blocks)


class AdaLNHeadNorm(nn.Module):
    """Condition-modulated LayerNorm before the output head: ``LN(x) * (1 + scale) + shift``."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.adaln = AdaLNModulation(cond_dim, dim, 2)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, memo: LayerKVCache | None = None) -> torch.Tensor:
        if memo is not None:
            scale, shift = memo.memoize("head_adaln", lambda: self.adaln(cond_BD).unbind(2))
        else:
            scale, shift = self.adaln(cond_BD).unbind(2)
        return self.norm(x_BLC).mul(scale.add(1)).add_(shift)


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """trunc_normal with absolute bounds +-2, as the original initialiser uses."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


# ----------------------------------------------------------------------------------------------
# Normalised 2D rotary position embedding (STAR) and text cross-attention
# ----------------------------------------------------------------------------------------------
def normalized_rope_2d_table(
    patch_nums: Sequence[int], head_dim: int, theta: float = 10000.0, norm: float = 64.0, device=None
) -> torch.Tensor:
    """(L, head_dim // 2) complex64 rotation table of the whole token pyramid (STAR's "normalized RoPE").

    Inside a scale of side ``p`` token ``r * p + c`` sits at ``x = c / (p - 1) * norm``,
    ``y = r / (p - 1) * norm`` (both 0 when ``p == 1``), so every scale spans the same square. Each row
    holds ``head_dim / 4`` x-rotations followed by as many y-rotations, with frequencies
    ``theta ** (-4 j / head_dim)``.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}.")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
    tables = []
    for pn in patch_nums:
        t = torch.arange(pn * pn, dtype=torch.float32, device=device)
        x, y = t % pn, torch.div(t, pn, rounding_mode="floor")
        if pn > 1:  # division then multiplication, in float32, like the original
            x, y = x / (pn - 1) * norm, y / (pn - 1) * norm
        angles = torch.cat((torch.outer(x, freqs), torch.outer(y, freqs)), dim=-1)
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(tables, dim=0)


def rope_rotary(table_LD2: torch.Tensor) -> "Rotary2D":
    """The ``rotary`` callable of :class:`CosineSelfAttention` for rows of a complex rotation table."""
    return Rotary2D(table_LD2.real, table_LD2.imag)


class CosineCrossAttention(nn.Module):
    """Multi-head cross-attention from the token stream to encoder (text) states, with the same
    L2-normalised q/k and clamped learned per-head scale as :class:`CosineSelfAttention` (softmax scale 1).

    q has a learned bias; the fused kv projection has a bias only on v. ``context_mask`` (B, Lc) marks
    the valid context positions (1 / True); padded positions are never attended.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`embed_dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        self.log_scale = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.to_out = nn.Linear(dim, dim)

    def context_keys_values(self, context_BLcD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised keys and values (B, Lc, H, D) of the context; fixed for a generation, so decoding
        computes them once (see ``LayerKVCache.memoize``)."""
        B, Lc = context_BLcD.shape[:2]
        kv_bias = torch.cat((self.zero_k_bias.to(self.v_bias.dtype), self.v_bias))
        kv = F.linear(context_BLcD.to(self.to_kv.weight.dtype), self.to_kv.weight, kv_bias)
        k, v = kv.view(B, Lc, 2, self.num_heads, self.head_dim).unbind(dim=2)
        return F.normalize(k, dim=-1), v

    def forward(self, x_BLC: torch.Tensor, context_BLcD: torch.Tensor, context_mask: torch.Tensor | None = None,
                context_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        Lc = context_BLcD.shape[1]
        q = F.linear(x_BLC, self.to_q.weight, self.q_bias).view(B, L, self.num_heads, self.head_dim)
        k, v = self.context_keys_values(context_BLcD) if context_kv is None else context_kv
        head_scale = self.log_scale.clamp_max(MAX_LOG_ATTN_SCALE).exp().transpose(1, 2)  # (1, 1, H, 1)
        q = F.normalize(q, dim=-1).mul(head_scale)
        attn_mask = None if context_mask is None else context_mask.to(torch.bool).view(B, 1, 1, Lc)
        out = dispatch_attention_fn(q, k, v, attn_mask=attn_mask, scale=1.0)
        return self.to_out(out.reshape(B, L, C))


# ----------------------------------------------------------------------------------------------
# 2-D rotary position embedding (interleaved channel pairs; first half of the pairs = row, second = column)
# ----------------------------------------------------------------------------------------------
def normalized_grid_positions(height: int, width: int, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row / column position of every token of an ``height x width`` map (row-major) on a reference grid:
    ``round(i * H_ref / height)`` in float32 with round-half-to-even, so every scale spans the same grid."""
    rows = (torch.arange(height) * (grid_hw[0] / height)).round()
    cols = (torch.arange(width) * (grid_hw[1] / width)).round()
    return rows[:, None].expand(height, width).reshape(-1), cols[None, :].expand(height, width).reshape(-1)


def rope_2d_cos_sin(scale_hw: Sequence[tuple[int, int]], grid_hw: tuple[int, int], head_dim: int, base: float = 10000.0):
    """cos / sin tables, each (L, head_dim // 2), for all scales of a schedule concatenated (row-major)."""
    half = head_dim // 2
    # int64 exponents as in the original, so the frequencies are bit-identical
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64) / half))
    angles = []
    for h, w in scale_hw:
        rows, cols = normalized_grid_positions(h, w, grid_hw)
        angles.append(torch.cat((torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)), dim=-1))
    angles = torch.cat(angles)
    return torch.cos(angles), torch.sin(angles)


def apply_interleaved_rotary(x_BLHD: torch.Tensor, cos_LP: torch.Tensor, sin_LP: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2p, 2p+1) of every head by the per-token angles: (a, b) -> (a cos - b sin, a sin + b cos).
    Computed in float32 (low-precision angles would blur positions), cast back."""
    cos = cos_LP.to(x_BLHD.device, torch.float32)[None, :, None]
    sin = sin_LP.to(x_BLHD.device, torch.float32)[None, :, None]
    pairs = x_BLHD.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * a - sin * b, sin * a + cos * b), dim=-1).flatten(-2).type_as(x_BLHD)


class Rotary2D:
    """The ``rotary`` callable of :class:`CosineSelfAttention` for one token range of a cos/sin table."""

    def __init__(self, cos_LP: torch.Tensor, sin_LP: torch.Tensor):
        self.cos, self.sin = cos_LP, sin_LP

    def __call__(self, q_BLHD: torch.Tensor, k_BLHD: torch.Tensor):
        return apply_interleaved_rotary(q_BLHD, self.cos, self.sin), apply_interleaved_rotary(k_BLHD, self.cos, self.sin)


# ----------------------------------------------------------------------------------------------
# Cross-attention to a padded context (text), and the AdaLN block that uses it
# ----------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` to a context of another width, with padding mask.

    k/v come from one bias-free projection of the context plus a learned v bias (k has none); the softmax
    scale is ``1/sqrt(head_dim)``. With ``learned_query`` the query is a single learned token
    (``(1, num_heads, head_dim)``): the layer then pools the context into one vector per sample.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, learned_query: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width ({dim}) must be divisible by `num_heads` ({num_heads}).")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if learned_query:
            self.learned_query = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
            self.to_q = None
        else:
            self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        self.to_out = nn.Linear(dim, dim)

    def context_keys_values(self, context_BSC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, S, H, D) of the context; fixed for a generation, so decoding computes them once."""
        B, S = context_BSC.shape[:2]
        bias = torch.cat((self.zero_k_bias.to(self.v_bias.dtype), self.v_bias))
        kv = F.linear(context_BSC, self.to_kv.weight, bias).view(B, S, 2, self.num_heads, self.head_dim)
        return kv.unbind(dim=2)

    def forward(self, x_BLC: torch.Tensor | None, context_BSC: torch.Tensor, context_mask_BS: torch.Tensor | None = None,
                context_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B = context_BSC.shape[0]
        k, v = self.context_keys_values(context_BSC) if context_kv is None else context_kv
        if self.to_q is None:
            q = self.learned_query.to(k.dtype).unsqueeze(0).expand(B, 1, -1, -1)
        else:
            q = self.query(x_BLC)
        return self.to_out(self.attend(q, k, v, context_mask_BS))

    def query(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> queries (B, L, H, D)."""
        return self.to_q(x_BLC).unflatten(-1, (self.num_heads, self.head_dim))

    def attend(self, q, k, v, context_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the context (padded positions masked): (B, L, H, D) queries -> (B, L, C), before ``to_out``."""
        mask = None if context_mask_BS is None else context_mask_BS[:, None, None, :].to(torch.bool)
        return dispatch_attention_fn(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5).flatten(2)


class AdaLNCrossAttentionBlock(AdaLNSelfAttentionBlock):
    """:class:`AdaLNSelfAttentionBlock` with an un-gated cross-attention residual between self-attention
    and FFN: ``x += CrossAttn(LayerNorm_affine(x), context)`` (no AdaLN on that branch)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, ffn_dim: int, norm_eps: float = 1e-6,
                 shared_adaln: bool = False, drop_path: float = 0.0):
        super().__init__(dim, num_heads, norm_eps=norm_eps, shared_adaln=shared_adaln, attn_l2_norm=True,
                         drop_path=drop_path, ffn_dim=ffn_dim)
        self.cross_attn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)

    def forward(self, x_BLC, cond, context_BSC, context_mask_BS=None, attn_mask=None, kv_cache=None, rotary=None):
        if kv_cache is not None:  # decoding: the condition and the text are fixed for the whole generation
            modulation = kv_cache.memoize("adaln", lambda: self.modulation(cond))
            context_kv = kv_cache.memoize("cross_kv", lambda: self.cross_attn.context_keys_values(context_BSC))
        else:
            modulation, context_kv = self.modulation(cond), None
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation
        x_BLC = self.self_attention_residual(x_BLC, gamma1, scale1, shift1, attn_mask, kv_cache, rotary)
        if context_kv is None:
            context_kv = self.cross_attn.context_keys_values(context_BSC)
        attended = self.cross_attn.attend(self.cross_attention_query(x_BLC), *context_kv, context_mask_BS)
        x_BLC = self.cross_attention_residual(x_BLC, attended)
        return self.ffn_residual(x_BLC, gamma2, scale2, shift2)

    # pure pieces of the cross-attention branch (compiled by ``compile_adaln_blocks_`` like the others)
    def cross_attention_query(self, x_BLC):
        return self.cross_attn.query(self.cross_attn_norm(x_BLC))

    def cross_attention_residual(self, x_BLC, attended_BLC):
        return x_BLC + self.cross_attn.to_out(attended_BLC)


@torch.no_grad()
def init_linear_and_embedding_weights_(model: nn.Module, std: float, extra_params: Sequence[torch.Tensor] = ()) -> None:
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
def init_adaln_transformer_weights_(model: nn.Module, std: float, extra_params: Sequence[torch.Tensor] = (),
                                    init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
    """The original VAR / Infinity initialisation of a model with ``blocks`` of :class:`AdaLNSelfAttentionBlock`,
    ``head`` and ``head_norm``: truncated normal (``std``) for Linear / Embedding weights and ``extra_params``,
    zero biases, a small head, residual outputs divided by sqrt(2 depth), near-zero AdaLN gates."""
    C, depth = model.config.embed_dim, len(model.blocks)
    init_linear_and_embedding_weights_(model, std, extra_params)
    model.head.weight.mul_(init_head)
    model.head.bias.zero_()
    model.head_norm.adaln.linear.weight.mul_(init_adaln)
    model.head_norm.adaln.linear.bias.zero_()
    for block in model.blocks:
        block.attn.to_out.weight.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
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
