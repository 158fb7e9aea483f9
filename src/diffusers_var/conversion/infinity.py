"""Original Infinity checkpoints -> diffusers.

* Transformer: a plain state dict (``infinity_2b_reg.pth``), a training snapshot (``ckpt['trainer']['gpt_fsdp']``)
  or the sharded directory of Infinity-8B (an index json plus safetensors / torch shards).
* VAE: ``{'vae': state_dict}`` with or without the ``.conv`` / ``.norm`` wrapper level in the names.

Every hyper-parameter the shapes determine is inferred. Only ``level_embed_every_chunk`` (the original
``add_lvl_embeding_only_first_block=0``, never used by a release) cannot be seen in the tensors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.bitwise_vae import BitwiseMultiScaleVAE
from ..models.infinity_transformer import InfinityTransformer2DModel, infinity_ffn_dim
from .common import (
    ConversionError,
    atomic_save_pipeline,
    cast_for_output,
    check_depth,
    check_dtype,
    check_finite,
    check_inputs,
    check_output_dir,
    check_switch,
    check_tokenizer_fits,
    check_zero_buffer,
    find_state_dict,
    first_missing,
    load_checkpoint,
    load_into,
    load_safetensors,
    reading_checkpoint,
    rename_keys,
)

# After block_chunks.{c}.module.{j} -> blocks.{n}; "@name" = derived buffer (checked, not stored).
INFINITY_KEY_RULES = [
    (r"cfg_uncond", r"uncond_text_embeds"),
    (r"pos_start", r"pos_start"),
    (r"text_norm\.weight", r"text_norm.weight"),
    (r"text_proj_for_sos\.ca\.mat_q", r"text_pool.learned_query"),
    (r"text_proj_for_sos\.ca\.mat_kv\.weight", r"text_pool.to_kv.weight"),
    (r"text_proj_for_sos\.ca\.v_bias", r"text_pool.v_bias"),
    (r"text_proj_for_sos\.ca\.zero_k_bias", r"@zero_k_bias"),
    (r"text_proj_for_sos\.ca\.proj\.(weight|bias)", r"text_pool.to_out.\1"),
    (r"text_proj_for_ca\.0\.(weight|bias)", r"text_proj.fc1.\1"),
    (r"text_proj_for_ca\.2\.(weight|bias)", r"text_proj.fc2.\1"),
    (r"lvl_embed\.weight", r"level_embedding.weight"),
    (r"word_embed\.(weight|bias)", r"input_proj.\1"),
    (r"shared_ada_lin\.1\.(weight|bias)", r"shared_modulation.linear.\1"),
    (r"head_nm\.ada_lin\.1\.(weight|bias)", r"head_norm.adaln.linear.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
    (r"blocks\.(\d+)\.ada_gss", r"blocks.\1.adaln_offset"),
    (r"blocks\.(\d+)\.ada_lin\.1\.(weight|bias)", r"blocks.\1.adaln.linear.\2"),
    (r"blocks\.(\d+)\.sa\.mat_qkv\.weight", r"blocks.\1.attn.to_qkv.weight"),
    (r"blocks\.(\d+)\.sa\.(q_bias|v_bias)", r"blocks.\1.attn.\2"),
    (r"blocks\.(\d+)\.sa\.scale_mul_1H11", r"blocks.\1.attn.log_scale"),
    (r"blocks\.(\d+)\.(?:sa|ca)\.zero_k_bias", r"@zero_k_bias"),
    (r"blocks\.(\d+)\.sa\.proj\.(weight|bias)", r"blocks.\1.attn.to_out.\2"),
    (r"blocks\.(\d+)\.ca\.mat_q\.(weight|bias)", r"blocks.\1.cross_attn.to_q.\2"),
    (r"blocks\.(\d+)\.ca\.mat_kv\.weight", r"blocks.\1.cross_attn.to_kv.weight"),
    (r"blocks\.(\d+)\.ca\.v_bias", r"blocks.\1.cross_attn.v_bias"),
    (r"blocks\.(\d+)\.ca\.proj\.(weight|bias)", r"blocks.\1.cross_attn.to_out.\2"),
    (r"blocks\.(\d+)\.ca_norm\.(weight|bias)", r"blocks.\1.cross_attn_norm.\2"),
    (r"blocks\.(\d+)\.ffn\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.ffn.\2.\3"),
]

# Both layouts: wrapped (``conv1.conv.weight``, ``norm1.norm.weight``) and plain (``conv1.weight``).
VAE_KEY_RULES = [
    (
        r"(.+\.(?:conv_in|conv_out|conv1|conv2|nin_shortcut|downsample\.conv|upsample\.conv))(?:\.conv)?\.(weight|bias)",
        r"\1.\2",
    ),
    (r"(.+\.(?:norm1|norm2|norm_out))(?:\.norm)?\.(weight|bias)", r"\1.\2"),
    (r"quantizer?\.lfq\.mask", r"@lfq_mask"),
]

_TRANSFORMER_REQUIRED = (
    "cfg_uncond",
    "pos_start",
    "word_embed.weight",
    "head.weight",
    "lvl_embed.weight",
    "text_proj_for_sos.ca.mat_q",
)
_VAE_REQUIRED = ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out")


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _vae_get(state_dict: Mapping, prefix: str) -> tuple[int, ...] | None:
    """Shape of ``prefix.weight`` in either naming (``prefix.conv.weight`` / ``prefix.norm.weight``)."""
    for key in (f"{prefix}.weight", f"{prefix}.conv.weight", f"{prefix}.norm.weight"):
        if key in state_dict:
            return _shape(state_dict[key])
    return None


# ----------------------------------------------------------------------------------------------
# Configuration inference
# ----------------------------------------------------------------------------------------------
def _block_index_map(keys, depth: int | None = None) -> dict[str, str]:
    """``block_chunks.{c}.module.{j}.`` -> ``blocks.{c * per_chunk + j}.``: every chunk holds the same blocks
    ``0 .. per_chunk - 1`` (a ConversionError lists the missing ones); ``depth``, when given, must be their number."""
    depth = check_depth(depth)
    pairs = {
        (int(m.group(1)), int(m.group(2))) for k in keys if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k))
    }
    if not pairs:
        raise ConversionError("`transformer`: the checkpoint has no transformer blocks (block_chunks.*).")
    num_chunks = max(c for c, _ in pairs) + 1
    per_chunk = max(j for _, j in pairs) + 1
    if depth is not None and depth % num_chunks == 0:
        per_chunk = max(per_chunk, depth // num_chunks)
    # walked lazily, as count_blocks does: the grid of a stray index (or --depth) of 10**8 is not built
    grid = ((c, j) for c in range(num_chunks) for j in range(per_chunk))
    missing = first_missing(grid, pairs, num_chunks * per_chunk - len(pairs))
    if missing or (depth is not None and depth != num_chunks * per_chunk):
        detail = f"no keys for block_chunks.C.module.J (C, J) in {missing}" if missing else ""
        detail = detail or f"{num_chunks * per_chunk} blocks"
        source = f"; `--depth` {depth}" if depth is not None else ""
        raise ConversionError(
            f"`transformer`: {detail}: a truncated or edited checkpoint ({num_chunks} chunks of "
            f"{per_chunk} blocks{source})."
        )
    return {f"block_chunks.{c}.module.{j}.": f"blocks.{c * per_chunk + j}." for c, j in pairs}


def infinity_config_from_state_dict(
    state_dict: Mapping, level_embed_every_chunk: bool = False, depth: int | None = None
) -> dict:
    missing = [k for k in _TRANSFORMER_REQUIRED if k not in state_dict]
    if missing:
        raise ConversionError(f"`transformer`: not an Infinity transformer checkpoint (missing {missing}).")
    text_max_length, text_dim = _shape(state_dict["cfg_uncond"])
    C = _shape(state_dict["pos_start"])[-1]
    blocks = _block_index_map(state_dict, depth)
    depth = len(blocks)
    chunks = len({k.split(".")[1] for k in blocks})
    ffn_dim = _shape(state_dict["block_chunks.0.module.0.ffn.fc1.weight"])[0]
    mlp_ratio = ffn_dim / C
    if infinity_ffn_dim(C, mlp_ratio) != ffn_dim:
        raise ConversionError(f"`transformer`: FFN width {ffn_dim} is not round(C * r / 256) * 256 for C={C}.")
    return {
        "bits_per_token": _shape(state_dict["word_embed.weight"])[1],
        "text_dim": text_dim,
        "text_max_length": text_max_length,
        "pool_num_heads": _shape(state_dict["text_proj_for_sos.ca.mat_q"])[1],
        "depth": depth,
        "embed_dim": C,
        "num_heads": _shape(state_dict["block_chunks.0.module.0.sa.scale_mul_1H11"])[1],
        "mlp_ratio": mlp_ratio,
        "block_chunks": chunks,
        "shared_adaln": "shared_ada_lin.1.weight" in state_dict,
        "level_embed_every_chunk": check_switch(level_embed_every_chunk, "level_embed_every_chunk"),
        "num_level_embeddings": _shape(state_dict["lvl_embed.weight"])[0],
        "norm_eps": 1e-6,
        "cond_drop_rate": 0.1,
        "drop_path_rate": 0.1,
    }


def vae_config_from_state_dict(state_dict: Mapping, spatial_patchify: bool = False) -> dict:
    missing = [k for k in _VAE_REQUIRED if _vae_get(state_dict, k) is None]
    if missing:
        raise ConversionError(f"`vae`: not an Infinity BSQ VAE checkpoint (missing {missing}).")
    base = _vae_get(state_dict, "encoder.conv_in")[0]

    def mults(part: str, level_name: str) -> list[int]:
        levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(rf"{part}\.{level_name}\.(\d+)\.", k))})
        if levels != list(range(len(levels))):
            raise ConversionError(f"`vae`: {part} levels {levels} are not contiguous (truncated checkpoint?).")
        widths = [_vae_get(state_dict, f"{part}.{level_name}.{i}.block.0.conv1")[0] for i in levels]
        if any(w % base for w in widths):
            raise ConversionError(f"`vae`: {part} widths {widths} are not multiples of the base width {base}.")
        return [w // base for w in widths]

    num_res_blocks = len(
        {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    )
    return {
        "in_channels": _vae_get(state_dict, "encoder.conv_in")[1],
        "out_channels": _vae_get(state_dict, "decoder.conv_out")[0],
        "base_channels": base,
        "encoder_ch_mult": mults("encoder", "down"),
        "decoder_ch_mult": mults("decoder", "up"),
        "num_res_blocks": num_res_blocks,
        "codebook_dim": _vae_get(state_dict, "encoder.conv_out")[0],
        "spatial_patchify": check_switch(spatial_patchify, "spatial_patchify"),
    }


# ----------------------------------------------------------------------------------------------
# Key maps and conversion
# ----------------------------------------------------------------------------------------------
def infinity_key_map(keys) -> dict[str, str]:
    keys = list(keys)
    prefixes = _block_index_map(keys)
    flat = {}
    for key in keys:
        m = re.match(r"block_chunks\.\d+\.module\.\d+\.", key)
        flat[key] = prefixes[m.group(0)] + key[m.end() :] if m else key
    renamed = rename_keys(flat.values(), INFINITY_KEY_RULES, "transformer")
    return {old: renamed[new] for old, new in flat.items()}


def vae_key_map(keys) -> dict[str, str]:
    return rename_keys(keys, VAE_KEY_RULES, "vae")


def _convert(model, state_dict: Mapping, key_map: dict, param_name: str, derived_shape) -> None:
    converted = {}
    for old, new in key_map.items():
        if new == "@zero_k_bias":  # the key projection has no bias: must really be zero (it is not converted)
            check_zero_buffer(state_dict[old], old, param_name, derived_shape(new[1:]))
            continue
        if new.startswith("@"):
            if _shape(state_dict[old]) != derived_shape(new[1:]):
                raise ConversionError(
                    f"`{param_name}`: buffer {old!r} has shape {_shape(state_dict[old])}, "
                    f"expected {derived_shape(new[1:])}."
                )
            continue
        if new in converted:
            raise ConversionError(f"`{param_name}`: two keys map to {new!r} (both wrapped and plain names present?).")
        converted[new] = state_dict[old]
    load_into(model, converted, param_name)


def derived_buffer_shape(config: dict, name: str) -> tuple[int, ...]:
    if name == "zero_k_bias":
        return (config["embed_dim"],)
    if name == "lfq_mask":
        return (config["codebook_dim"],)
    raise KeyError(name)


def convert_infinity_transformer(
    state_dict: Mapping, level_embed_every_chunk: bool = False, depth: int | None = None
) -> InfinityTransformer2DModel:
    config = infinity_config_from_state_dict(state_dict, level_embed_every_chunk, depth)
    model = InfinityTransformer2DModel(**config)
    _convert(model, state_dict, infinity_key_map(state_dict), "transformer", lambda n: derived_buffer_shape(config, n))
    check_finite("transformer", transformer=model)
    return model.eval()


def convert_bitwise_vae(state_dict: Mapping, spatial_patchify: bool = False) -> BitwiseMultiScaleVAE:
    config = vae_config_from_state_dict(state_dict, spatial_patchify)
    model = BitwiseMultiScaleVAE(**config)
    _convert(model, state_dict, vae_key_map(state_dict), "vae", lambda n: derived_buffer_shape(config, n))
    check_finite("vae", vae=model)
    return model.eval()


def _looks_like_transformer(sd: Mapping) -> bool:
    return "cfg_uncond" in sd and "word_embed.weight" in sd


def load_infinity_transformer_state_dict(path: str | os.PathLike) -> dict:
    """A ``.pth`` state dict / training snapshot, or a directory of shards (with an index json)."""
    path = Path(path)
    if not path.is_dir():
        obj = load_checkpoint(path, "transformer")
        return find_state_dict(
            obj, [("trainer", "gpt_fsdp"), ("model",), ("state_dict",)], _looks_like_transformer, "transformer"
        )
    index = path  # what is being read, for the message
    weight_map = None  # key -> the shard file the index names for it
    try:
        indexes = sorted(path.glob("*.index.json"))
        if indexes:
            index = indexes[0]
            weight_map = {
                key: _shard_in_folder(path, name, index)
                for key, name in json.loads(index.read_text())["weight_map"].items()
            }
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pth"})
    except ConversionError:  # a shard name outside the folder
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # unreadable, not JSON, no weight_map
        raise ConversionError(
            f"`transformer`: cannot read the shard index or folder {str(index)!r}: {err!r}"
        ) from None
    if not shards:
        raise ConversionError(f"`transformer`: directory {str(path)!r} holds no shard files.")
    state_dict, source = {}, {}  # source: key -> the shard it was read from
    for shard in shards:
        if not shard.is_file():
            raise ConversionError(f"`transformer`: shard {str(shard)!r} listed in the index is missing.")
        # every shard read through the checked loaders: an unreadable one is an error naming the flag and the file
        tensors = (
            load_safetensors(shard, "transformer")
            if shard.suffix == ".safetensors"
            else load_checkpoint(shard, "transformer")
        )
        for key in tensors:
            # a key held twice (or where the index does not put it) was taken from whichever shard came last
            if key in source:
                raise ConversionError(
                    f"`transformer`: {key!r} is in two shards, {str(source[key])!r} and {str(shard)!r}; a sharded "
                    "checkpoint holds each tensor once (an edited or mixed-up folder?)."
                )
            if weight_map is not None and weight_map.get(key) != shard:
                listed = f"assigns to {str(weight_map[key])!r}" if key in weight_map else "does not list"
                raise ConversionError(
                    f"`transformer`: shard {str(shard)!r} holds {key!r}, which the index {str(index)!r} {listed}; "
                    "a sharded checkpoint holds each tensor once, in the shard its index names."
                )
            source[key] = shard
        state_dict.update(tensors)
    missing = [key for key in weight_map or () if key not in state_dict]
    if missing:
        raise ConversionError(
            f"`transformer`: the index {str(index)!r} assigns {missing[0]!r} to {str(weight_map[missing[0]])!r}, "
            f"which does not hold it ({len(missing)} of the index's tensors are missing)."
        )
    if not _looks_like_transformer(state_dict):
        raise ConversionError(f"`transformer`: the shards in {str(path)!r} are not an Infinity transformer.")
    return state_dict


def _shard_in_folder(folder: Path, name, index: Path) -> Path:
    """The file a shard index names: a file name in the index's folder. An absolute path or one through ``..``
    would read a file from anywhere (the index is data, maybe downloaded)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConversionError(
            f"`transformer`: the shard index {str(index)!r} names the shard {name!r}, which is not a file in its "
            f"folder {str(folder)!r}; shard names are relative paths inside it (no absolute paths, no '..')."
        )
    return folder / name


def load_bitwise_vae_state_dict(path: str | os.PathLike) -> dict:
    obj = load_checkpoint(path, "vae")

    def looks_right(sd) -> bool:
        return _vae_get(sd, "encoder.conv_in") is not None

    return find_state_dict(obj, [("vae",), ("trainer", "vae"), ("state_dict",)], looks_right, "vae")


def convert_infinity_checkpoint(
    vae_path: str | os.PathLike,
    transformer_path: str | os.PathLike,
    text_encoder_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    level_embed_every_chunk: bool = False,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    depth: int | None = None,
):
    """Convert an original Infinity VAE + transformer and a T5 encoder / tokenizer folder into an
    :class:`InfinityPipeline`; written atomically (safetensors only) when ``output_dir`` is given. ``depth``: the
    number of blocks the checkpoint must have (by default every chunk must hold the same, complete set of blocks)."""
    from transformers import AutoTokenizer, T5EncoderModel

    from ..pipelines.pipeline_infinity import InfinityPipeline

    check_depth(depth)
    check_switch(level_embed_every_chunk, "level_embed_every_chunk")
    dtype = check_dtype(dtype)
    if output_dir is not None:  # before reading multi-GB checkpoints
        check_output_dir(output_dir, overwrite)
    # every input before any is read: the transformer (a .pth or a folder of shards), the VAE, the two folders
    if Path(transformer_path).is_dir():
        check_inputs(files={"vae": vae_path})
    else:
        check_inputs(files={"transformer": transformer_path, "vae": vae_path})
    check_inputs(folders={"text_encoder": text_encoder_path, "tokenizer": tokenizer_path})
    transformer_sd = load_infinity_transformer_state_dict(transformer_path)
    with reading_checkpoint("transformer", transformer_path):
        transformer = convert_infinity_transformer(transformer_sd, level_embed_every_chunk, depth)
    vae_sd = load_bitwise_vae_state_dict(vae_path)
    with reading_checkpoint("vae", vae_path):
        d = vae_config_from_state_dict(vae_sd)["codebook_dim"]
    bits = transformer.config.bits_per_token
    if bits not in (d, 4 * d):
        raise ConversionError(
            f"`vae` (codebook_dim {d}) does not belong to `transformer` "
            f"({bits} bits per token: expected {d} or {4 * d})."
        )
    with reading_checkpoint("vae", vae_path):
        vae = convert_bitwise_vae(vae_sd, spatial_patchify=bits == 4 * d)
    try:
        # float32 first: cast_for_output refuses a weight beyond float16's range by name (it turned infinite while
        # loading, and the finite-weights check blamed the checkpoint)
        text_encoder = T5EncoderModel.from_pretrained(text_encoder_path, dtype=torch.float32, use_safetensors=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; each becomes a message naming the flag
        raise ConversionError(
            f"`text-encoder`: cannot load a T5 encoder (safetensors) from {str(text_encoder_path)!r}: {err}"
        ) from None
    if text_encoder.config.d_model != transformer.config.text_dim:
        raise ConversionError(
            f"`text-encoder` width {text_encoder.config.d_model} != "
            f"the transformer's text width {transformer.config.text_dim}."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, legacy=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; each becomes a message naming the flag
        raise ConversionError(f"`tokenizer`: cannot load a tokenizer from {str(tokenizer_path)!r}: {err}") from None
    check_tokenizer_fits(tokenizer, text_encoder, "tokenizer")
    check_finite("text_encoder", text_encoder=text_encoder)
    cast_for_output(dtype, transformer=transformer, vae=vae, text_encoder=text_encoder)
    pipe = InfinityPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    if output_dir is not None:
        atomic_save_pipeline(pipe, output_dir, overwrite=overwrite)
    return pipe
