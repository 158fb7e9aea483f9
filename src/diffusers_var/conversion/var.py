"""Original VAR checkpoints (``vae_ch160v4096z32.pth``, ``var_d{12..36}.pth``) -> diffusers.

Every hyper-parameter that the tensor shapes determine is inferred from them; the scale schedule is read
from the ``lvl_1L`` buffer when present, else recognised from the token count (256 / 512 / 1024 sets),
else must be given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from ..models.blocks import block_causal_bias, scale_level_ids
from ..models.multiscale_vq import MultiScaleVQModel
from ..models.var_transformer import VARTransformer2DModel
from .common import (
    KNOWN_PATCH_NUMS,
    QUANT_RESI_RANGE,
    ConversionError,
    atomic_save_pipeline,
    cast_for_output,
    check_depth,
    check_dtype,
    check_finite,
    check_float,
    check_inputs,
    check_output_dir,
    check_patch_nums,
    check_switch,
    check_zero_buffer,
    count_blocks,
    find_state_dict,
    load_checkpoint,
    load_into,
    reading_checkpoint,
    rename_keys,
)

# (original key regex, diffusers key); "@name" = derived buffer, verified against the model's own.
VAR_KEY_RULES = [
    (r"pos_start", r"pos_start"),
    (r"pos_1LC", r"pos_embed"),
    (r"lvl_1L", r"@level_ids"),
    (r"attn_bias_for_masking", r"@block_causal_bias"),
    (r"word_embed\.(weight|bias)", r"input_proj.\1"),
    (r"class_emb\.weight", r"class_embedding.weight"),
    (r"lvl_embed\.weight", r"level_embedding.weight"),
    (r"shared_ada_lin\.1\.(weight|bias)", r"shared_modulation.linear.\1"),
    (r"blocks\.(\d+)\.ada_gss", r"blocks.\1.adaln_offset"),
    (r"blocks\.(\d+)\.ada_lin\.1\.(weight|bias)", r"blocks.\1.adaln.linear.\2"),
    (r"blocks\.(\d+)\.attn\.scale_mul_1H11", r"blocks.\1.attn.log_scale"),
    (r"blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"blocks.\1.attn.\2"),
    (r"blocks\.(\d+)\.attn\.zero_k_bias", r"@blocks.\1.attn.zero_k_bias"),
    (r"blocks\.(\d+)\.attn\.mat_qkv\.weight", r"blocks.\1.attn.to_qkv.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.to_out.\2"),
    (r"blocks\.(\d+)\.ffn\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.ffn.\2.\3"),
    (r"head_nm\.ada_lin\.1\.(weight|bias)", r"head_norm.adaln.linear.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
]

VAE_KEY_RULES = [
    (r"quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)", r"quantize.phi.\1.\2"),  # PhiPartiallyShared
    (r"quantize\.quant_resi\.qresi\.(weight|bias)", r"quantize.phi.0.\1"),  # PhiShared
    (r"quantize\.quant_resi\.(\d+)\.(weight|bias)", r"quantize.phi.\1.\2"),  # PhiNonShared
    (r"quantize\.ema_vocab_hit_SV", r"quantize.codebook_usage"),
    (r"quantize\.embedding\.weight", r"quantize.embedding.weight"),
    (r"((?:encoder|decoder)\..+)", r"\1"),
    (r"((?:post_)?quant_conv\.(?:weight|bias))", r"\1"),
]

_VAR_REQUIRED = ("class_emb.weight", "pos_1LC", "head.weight", "word_embed.weight", "lvl_embed.weight")
_VAE_REQUIRED = ("quantize.embedding.weight", "encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight")


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


# ----------------------------------------------------------------------------------------------
# Configuration inference
# ----------------------------------------------------------------------------------------------
def infer_patch_nums(
    state_dict: Mapping, patch_nums: Sequence[int] | None = None, param_name: str = "transformer"
) -> tuple[int, ...]:
    """Scale schedule: explicit > the ``lvl_1L`` buffer's values > the known schedule for L."""
    L = _shape(state_dict["pos_1LC"])[1]
    if patch_nums is not None:
        patch_nums = check_patch_nums(patch_nums)
        if sum(p * p for p in patch_nums) != L:
            raise ConversionError(
                f"`--patch-nums` {patch_nums} gives {sum(p * p for p in patch_nums)} tokens, "
                f"but the checkpoint has L={L}."
            )
        return patch_nums
    levels = state_dict.get("lvl_1L")
    if isinstance(levels, torch.Tensor) and levels.device.type != "meta":
        counts = torch.bincount(levels.flatten().long()).tolist()
        sides = [round(c**0.5) for c in counts]
        if all(s * s == c for s, c in zip(sides, counts)) and len(sides) >= 2:
            return check_patch_nums(sides)
    if L in KNOWN_PATCH_NUMS:
        return KNOWN_PATCH_NUMS[L]
    raise ConversionError(f"`{param_name}`: cannot infer the scale schedule from L={L} tokens; pass --patch-nums.")


def var_config_from_state_dict(
    state_dict: Mapping,
    patch_nums: Sequence[int] | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> dict:
    missing = [k for k in _VAR_REQUIRED if k not in state_dict]
    if missing:
        raise ConversionError(f"`transformer`: not a VAR transformer checkpoint (missing {missing}).")
    num_classes_plus_null, C = _shape(state_dict["class_emb.weight"])
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in state_dict
    num_heads = _num_heads(state_dict, attn_l2_norm, C, num_heads)
    depth = count_blocks(state_dict, "blocks", "transformer", depth, num_heads, C)
    if depth == 0:
        raise ConversionError("`transformer`: the checkpoint has no transformer blocks.")
    patch_nums = infer_patch_nums(state_dict, patch_nums)
    return {
        "num_classes": num_classes_plus_null - 1,
        "depth": depth,
        "embed_dim": C,
        "num_heads": num_heads,
        "mlp_ratio": _shape(state_dict["blocks.0.ffn.fc1.weight"])[0] / C,
        "vocab_size": _shape(state_dict["head.weight"])[0],
        "latent_channels": _shape(state_dict["word_embed.weight"])[1],
        "patch_nums": list(patch_nums),
        "shared_adaln": "shared_ada_lin.1.weight" in state_dict,
        "attn_l2_norm": attn_l2_norm,
        "norm_eps": 1e-6,
        "cond_drop_rate": 0.1,
        "drop_path_rate": 0.1 * depth / 24,
    }


def _num_heads(state_dict: Mapping, attn_l2_norm: bool, width: int, num_heads: int | None) -> int:
    """The attention's heads: the L2-normalised attention's per-head scales count them; without them the weights
    do not (``--num-heads``; by default 64 features a head, as in every release)."""
    if attn_l2_norm:
        found = _shape(state_dict["blocks.0.attn.scale_mul_1H11"])[1]
        if num_heads is not None and num_heads != found:
            raise ConversionError(f"`num_heads`: the checkpoint's attention has {found} heads, got {num_heads}.")
        return found
    if num_heads is None:
        if width % 64:
            raise ConversionError(
                f"`num_heads`: the checkpoint's width {width} is not 64 features a head and its attention does not "
                "say how many heads it has; pass --num-heads."
            )
        return width // 64
    if width % num_heads:
        raise ConversionError(f"`num_heads` must divide the width {width}, got {num_heads}.")
    return num_heads


def vae_config_from_state_dict(
    state_dict: Mapping, patch_nums: Sequence[int], quant_resi: float = 0.5, using_znorm: bool = False
) -> dict:
    missing = [k for k in _VAE_REQUIRED if k not in state_dict]
    if missing:
        raise ConversionError(f"`vae`: not a VAR VQ-VAE checkpoint (missing {missing}).")
    quant_resi = check_float(quant_resi, "quant_resi", QUANT_RESI_RANGE)
    vocab_size, z_channels = _shape(state_dict["quantize.embedding.weight"])
    ch = _shape(state_dict["encoder.conv_in.weight"])[0]
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = [_shape(state_dict[f"encoder.down.{i}.block.0.conv1.weight"])[0] // ch for i in levels]
    num_res_blocks = len(
        {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    )
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in state_dict):
        share = len({k.split(".")[3] for k in state_dict if k.startswith("quantize.quant_resi.qresi_ls.")})
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in state_dict):
        share = 1
    elif any(re.match(r"quantize\.quant_resi\.\d+\.", k) for k in state_dict):
        share = 0
    else:  # no Phi convs at all: Phi is the identity
        share, quant_resi = 4, 0.0
    if share == 0 and len({k.split(".")[2] for k in state_dict if k.startswith("quantize.quant_resi.")}) != len(
        patch_nums
    ):
        raise ConversionError(
            "`vae`: one Phi conv per scale, but their number differs from the transformer's scale count."
        )
    last = len(levels) - 1
    return {
        "in_channels": _shape(state_dict["encoder.conv_in.weight"])[1],
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "dropout": 0.0,
        "vocab_size": vocab_size,
        "z_channels": z_channels,
        "patch_nums": list(patch_nums),
        "quant_resi": quant_resi,
        "share_quant_resi": share,
        "using_znorm": check_switch(using_znorm, "using_znorm"),
        "beta": 0.25,
        "using_sa": f"encoder.down.{last}.attn.0.qkv.weight" in state_dict,
        "using_mid_sa": "encoder.mid.attn_1.qkv.weight" in state_dict,
        "quant_conv_ks": _shape(state_dict["quant_conv.weight"])[-1],
    }


# ----------------------------------------------------------------------------------------------
# Key maps and state-dict conversion
# ----------------------------------------------------------------------------------------------
def var_key_map(keys) -> dict[str, str]:
    return rename_keys(keys, VAR_KEY_RULES, "transformer")


def vae_key_map(keys) -> dict[str, str]:
    return rename_keys(keys, VAE_KEY_RULES, "vae")


def _expected_derived(model: VARTransformer2DModel, name: str) -> torch.Tensor:
    patch_nums = model.config.patch_nums
    if name == "level_ids":
        return scale_level_ids(patch_nums)
    if name == "block_causal_bias":
        return block_causal_bias(patch_nums)
    if name.endswith("zero_k_bias"):
        return torch.zeros(model.config.embed_dim)
    raise KeyError(name)


def convert_var_transformer(
    state_dict: Mapping,
    patch_nums: Sequence[int] | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> VARTransformer2DModel:
    config = var_config_from_state_dict(state_dict, patch_nums, depth, num_heads)
    model = VARTransformer2DModel(**config)
    converted = {}
    for old, new in var_key_map(state_dict).items():
        if new.endswith("zero_k_bias"):  # the key projection has no bias: must really be zero
            check_zero_buffer(state_dict[old], old, "transformer", tuple(_expected_derived(model, new[1:]).shape))
        elif new.startswith("@"):
            expected = _expected_derived(model, new[1:])
            if _shape(state_dict[old]) != tuple(expected.shape) or not torch.equal(
                state_dict[old].to(expected.dtype), expected
            ):
                raise ConversionError(
                    f"`transformer`: buffer {old!r} does not match the scale schedule {config['patch_nums']} "
                    "(wrong --patch-nums?)."
                )
        else:
            converted[new] = state_dict[old]
    load_into(model, converted, "transformer")
    check_finite("transformer", transformer=model)
    return model.eval()


def convert_vae(
    state_dict: Mapping, patch_nums: Sequence[int], quant_resi: float = 0.5, using_znorm: bool = False
) -> MultiScaleVQModel:
    config = vae_config_from_state_dict(state_dict, patch_nums, quant_resi, using_znorm)
    model = MultiScaleVQModel(**config)
    converted = {new: state_dict[old] for old, new in vae_key_map(state_dict).items()}
    usage = converted.get("quantize.codebook_usage")
    if usage is not None and tuple(usage.shape) != tuple(model.quantize.codebook_usage.shape):
        # usage statistics are per scale; like the original, keep our own buffer when the count differs
        converted["quantize.codebook_usage"] = model.quantize.codebook_usage.clone()
    load_into(model, converted, "vae")
    check_finite("vae", vqvae=model)
    return model.eval()


def _load_var(path) -> dict:
    obj = load_checkpoint(path, "transformer")
    return find_state_dict(
        obj,
        [("trainer", "var_wo_ddp"), ("model",), ("state_dict",)],
        lambda sd: "class_emb.weight" in sd,
        "transformer",
    )


def _load_vae(path) -> dict:
    obj = load_checkpoint(path, "vae")
    return find_state_dict(
        obj,
        [("trainer", "vae_local"), ("model",), ("state_dict",)],
        lambda sd: "quantize.embedding.weight" in sd,
        "vae",
    )


def check_arguments(patch_nums=None, quant_resi: float = 0.5, depth: int | None = None, num_heads=None) -> None:
    """What can be checked before a checkpoint is read (VAR, CoDe)."""
    if patch_nums is not None:
        check_patch_nums(patch_nums)
    check_float(quant_resi, "quant_resi", QUANT_RESI_RANGE)
    check_depth(depth)
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise ConversionError(f"`num_heads` must be a whole number >= 1, got {num_heads!r}.")


def convert_var_checkpoint(
    vae_path: str | os.PathLike,
    transformer_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    patch_nums: Sequence[int] | None = None,
    quant_resi: float = 0.5,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    depth: int | None = None,
    num_heads: int | None = None,
    using_znorm: bool = False,
):
    """Convert an original VQ-VAE + VAR checkpoint pair into a :class:`VARPipeline` (``depth``: the number of blocks
    the checkpoint must have; by default every block index present, and the release layout's depth where it applies;
    ``num_heads``: the attention's heads, which a checkpoint trained with ``attn_l2_norm=False`` does not record; by
    default 64 features a head, as in every release; ``using_znorm``: the VQ-VAE was trained to pick codes by
    cosine similarity, which its weights do not record either).

    When ``output_dir`` is given the pipeline is written there atomically (safetensors only).
    Returns the pipeline.
    """
    from ..pipelines.pipeline_var import VARPipeline

    check_arguments(patch_nums, quant_resi, depth, num_heads)
    check_switch(using_znorm, "using_znorm")
    dtype = check_dtype(dtype)
    if output_dir is not None:  # before reading multi-GB checkpoints
        check_output_dir(output_dir, overwrite)
    check_inputs(files={"transformer": transformer_path, "vae": vae_path})  # every input before any is read
    var_sd = _load_var(transformer_path)
    vae_sd = _load_vae(vae_path)
    with reading_checkpoint("transformer", transformer_path):
        transformer = convert_var_transformer(var_sd, patch_nums, depth, num_heads)
    with reading_checkpoint("vae", vae_path):
        vqvae = convert_vae(vae_sd, transformer.config.patch_nums, quant_resi, using_znorm)
    if (
        vqvae.config.vocab_size != transformer.config.vocab_size
        or vqvae.config.z_channels != transformer.config.latent_channels
    ):
        raise ConversionError(
            f"`vae` (vocab {vqvae.config.vocab_size}, z {vqvae.config.z_channels}) does not belong to `transformer` "
            f"(vocab {transformer.config.vocab_size}, z {transformer.config.latent_channels})."
        )
    cast_for_output(dtype, transformer=transformer, vqvae=vqvae)
    pipe = VARPipeline(transformer=transformer, vqvae=vqvae)
    if output_dir is not None:
        atomic_save_pipeline(pipe, output_dir, overwrite=overwrite)
    return pipe
