"""Original STAR checkpoints (training snapshots of Davinci-XLab/STAR-T2I) -> diffusers.

The transformer files are ``torch.save({'epoch', 'iter', 'trainer': {...}})`` snapshots; the weights are
``trainer['var_wo_ddp']`` and everything else (optimizer, VAE copy) is ignored. Sizes, text width, the
presence of cross-attention / RoPE / the stable-sampler head come from tensor shapes; the scale schedule
from ``--patch-nums``, else the snapshot's ``trainer['config']['patch_nums']``, else the token count
(``pos_1LC``) or the number of scales when that identifies a known schedule. RoPE theta / norm, the logit
norm and the sampler's first scale cannot be read from weights: the release values are the defaults.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import torch

from ..models.star_transformer import STARTransformer2DModel
from .common import (
    KNOWN_PATCH_NUMS,
    POSITIVE,
    QUANT_RESI_RANGE,
    ConversionError,
    atomic_save_pipeline,
    cast_for_output,
    check_depth,
    check_dtype,
    check_finite,
    check_float,
    check_folder,
    check_inputs,
    check_output_dir,
    check_patch_nums,
    check_switch,
    check_tokenizer_fits,
    check_whole_number,
    check_zero_buffer,
    count_blocks,
    find_state_dict,
    load_checkpoint,
    load_into,
    reading_checkpoint,
    rename_keys,
)
from .var import _load_vae, _shape, convert_vae

_ATTN_RULES = [
    (r"attn\.scale_mul_1H11", r"attn.log_scale"),
    (r"attn\.(q_bias|v_bias)", r"attn.\1"),
    (r"attn\.zero_k_bias", r"@zero_k_bias"),
    (r"attn\.mat_qkv\.weight", r"attn.to_qkv.weight"),
    (r"attn\.proj\.(weight|bias)", r"attn.to_out.\1"),
    (r"cross_attn\.scale_mul_1H11", r"cross_attn.log_scale"),
    (r"cross_attn\.(q_bias|v_bias)", r"cross_attn.\1"),
    (r"cross_attn\.zero_k_bias", r"@zero_k_bias"),
    (r"cross_attn\.mat_q\.weight", r"cross_attn.to_q.weight"),
    (r"cross_attn\.mat_kv\.weight", r"cross_attn.to_kv.weight"),
    (r"cross_attn\.proj\.(weight|bias)", r"cross_attn.to_out.\1"),
    (r"ffn\.(fc1|fc2)\.(weight|bias)", r"ffn.\1.\2"),
]


def _block_rules(original_prefix: str, new_prefix: str) -> list[tuple[str, str]]:
    """Per-block rules under ``original_prefix.N.``; the block index becomes group 1, so the inner
    replacement's group references shift by one."""
    rules = []
    for pattern, repl in _ATTN_RULES:
        shifted = re.sub(r"\\(\d)", lambda m: "\\" + str(int(m.group(1)) + 1), repl)
        rules.append(
            (
                rf"{original_prefix}\.(\d+)\.{pattern}",
                shifted if repl.startswith("@") else rf"{new_prefix}.\1.{shifted}",
            )
        )
    return rules


# (original key regex, diffusers key); "@name" = derived buffer, verified to be zero.
STAR_KEY_RULES = [
    (r"pos_start", r"pos_start"),
    (r"pos_1LC", r"pos_embed"),
    (r"word_embed\.(weight|bias)", r"input_proj.\1"),
    (r"class_emb\.weight", r"class_embedding.weight"),
    (r"lvl_embed\.weight", r"level_embedding.weight"),
    (r"encoder_proj\.(weight|bias)", r"text_proj.\1"),
    (r"head_logits\.(weight|bias)", r"head.\1"),
    *_block_rules(r"blocks", "blocks"),
    # stable-sampler head (star-1024-sampler)
    (r"word_embed_head\.(weight|bias)", r"sampler.input_proj.\1"),
    (r"lvl_embed_2\.weight", r"sampler.level_embedding.weight"),
    (r"pos_start_last", r"sampler.pos_start"),
    (r"encoder_proj2\.(weight|bias)", r"sampler.text_proj.\1"),
    (r"head_proj\.(weight|bias)", r"sampler.fuse_proj.\1"),
    (r"head_logits2\.(weight|bias)", r"sampler.head.\1"),
    *_block_rules(r"feat_extract_blocks", "sampler.blocks"),
]

_STAR_REQUIRED = ("pos_start", "word_embed.weight", "lvl_embed.weight", "encoder_proj.weight", "head_logits.weight")

# Resolution names accepted for --patch-nums.
NAMED_PATCH_NUMS = {"256": KNOWN_PATCH_NUMS[680], "512": KNOWN_PATCH_NUMS[2240], "1024": KNOWN_PATCH_NUMS[9451]}


def star_key_map(keys) -> dict[str, str]:
    return rename_keys(keys, STAR_KEY_RULES, "transformer")


def check_star_patch_nums(patch_nums) -> tuple[int, ...] | None:
    """The ``patch_nums`` argument: None, a resolution name ("256" / "512" / "1024") or a schedule (at least two
    strictly increasing positive integers), as a tuple; checked before a checkpoint is read."""
    if patch_nums is None:
        return None
    if isinstance(patch_nums, str):
        if patch_nums not in NAMED_PATCH_NUMS:
            raise ConversionError(
                f"`patch_nums`: unknown resolution {patch_nums!r}; use one of {sorted(NAMED_PATCH_NUMS)} or a list."
            )
        return tuple(NAMED_PATCH_NUMS[patch_nums])
    return check_patch_nums(patch_nums)


def rope_max_side(rope_norm: float) -> int:
    """The largest scale side STAR's normalised RoPE resolves. Every scale spans ``[0, rope_norm]`` along each side,
    its neighbouring tokens ``rope_norm / (side - 1)`` apart (``normalized_rope_2d_table``; STAR's spec 3.3), so
    beyond ``rope_norm + 1`` (65 for the release's 64) they sit less than one position apart, finer than any model
    was trained at (the 1024 px schedule ends at 64, neighbours 64/63 apart). A larger last scale, which nothing in
    a RoPE checkpoint bounds, converted and then asked hundreds of GB at generation (``1,2,3,100000``)."""
    return math.floor(rope_norm) + 1


def infer_star_patch_nums(
    state_dict: Mapping, patch_nums=None, snapshot_config: Mapping | None = None, rope_norm: float = 64.0
) -> tuple[int, ...]:
    """Scale schedule: explicit (list or "256"/"512"/"1024") > the snapshot's trainer config > the token
    count of ``pos_1LC`` > the number of level embeddings when only one known schedule has it. With RoPE (no
    ``pos_1LC``) the last scale's side is at most :func:`rope_max_side` of ``rope_norm``."""
    num_scales = _shape(state_dict["lvl_embed.weight"])[0]
    patch_nums = check_star_patch_nums(patch_nums)
    source = "`patch_nums`"
    if patch_nums is None and snapshot_config is not None and snapshot_config.get("patch_nums") is not None:
        patch_nums, source = snapshot_config["patch_nums"], "the snapshot's trainer config"
    if patch_nums is None and "pos_1LC" in state_dict:
        patch_nums, source = KNOWN_PATCH_NUMS.get(_shape(state_dict["pos_1LC"])[1]), "the pos_1LC token count"
    if patch_nums is None:
        candidates = [p for p in KNOWN_PATCH_NUMS.values() if len(p) == num_scales]
        if len(candidates) != 1:
            raise ConversionError(
                f"`patch_nums`: the checkpoint has {num_scales} scales, which does not identify the schedule; pass "
                f"--patch-nums 256, 512, 1024 or a comma-separated list."
            )
        patch_nums, source = candidates[0], "the number of scales"
    patch_nums = check_patch_nums(patch_nums)
    origin = "" if source == "`patch_nums`" else f" from {source}"
    if len(patch_nums) != num_scales:
        raise ConversionError(
            f"`patch_nums`{origin} {patch_nums} has {len(patch_nums)} scales, but the checkpoint has {num_scales}."
        )
    if "pos_1LC" in state_dict and _shape(state_dict["pos_1LC"])[1] != sum(p * p for p in patch_nums):
        raise ConversionError(f"`patch_nums` {patch_nums} does not match the checkpoint's pos_1LC token count.")
    limit = rope_max_side(check_float(rope_norm, "rope_norm", POSITIVE))
    if "pos_1LC" not in state_dict and patch_nums[-1] > limit:
        raise ConversionError(
            f"`patch_nums`{origin} {patch_nums} ends with a scale of side {patch_nums[-1]}; STAR's normalised RoPE "
            f"resolves sides up to {limit} (`rope_norm` + 1): every scale spans [0, {rope_norm:g}] along each side, "
            "and a larger side puts neighbouring tokens less than one position apart (the 1024 px release ends at "
            "64)."
        )
    return patch_nums


def star_config_from_state_dict(
    state_dict: Mapping,
    patch_nums=None,
    snapshot_config: Mapping | None = None,
    rope_theta: float = 10000.0,
    rope_norm: float = 64.0,
    logit_norm: bool = True,
    sampler_start_scale: int | None = None,
    cross_attention_row0_quirk: bool = True,
    depth: int | None = None,
) -> dict:
    missing = [k for k in _STAR_REQUIRED if k not in state_dict]
    if missing:
        raise ConversionError(f"`transformer`: not a STAR transformer checkpoint (missing {missing}).")
    C = _shape(state_dict["pos_start"])[-1]
    heads_key = "blocks.0.attn.scale_mul_1H11"
    num_heads = _shape(state_dict[heads_key])[1] if heads_key in state_dict else None
    depth = count_blocks(state_dict, "blocks", "transformer", depth, num_heads, C)
    if depth == 0:
        raise ConversionError("`transformer`: the checkpoint has no transformer blocks.")
    patch_nums = infer_star_patch_nums(state_dict, patch_nums, snapshot_config, rope_norm)
    sampler_depth = count_blocks(state_dict, "feat_extract_blocks", "transformer")
    if sampler_start_scale is None:  # 9 in every release; a shorter (test) schedule starts at its last scale
        sampler_start_scale = min(9, len(patch_nums) - 1)
    elif check_whole_number(sampler_start_scale, "sampler_start_scale") >= len(patch_nums):
        raise ConversionError(
            f"`sampler_start_scale` must be in [1, {len(patch_nums) - 1}] for the {len(patch_nums)} scales of "
            f"{patch_nums}, got {sampler_start_scale!r}."
        )
    return {
        "depth": depth,
        "embed_dim": C,
        "num_heads": num_heads,
        "mlp_ratio": _shape(state_dict["blocks.0.ffn.fc1.weight"])[0] / C,
        "vocab_size": _shape(state_dict["head_logits.weight"])[0],
        "latent_channels": _shape(state_dict["word_embed.weight"])[1],
        "patch_nums": list(patch_nums),
        "text_embed_dim": _shape(state_dict["encoder_proj.weight"])[1],
        "cross_attention": "blocks.0.cross_attn.mat_q.weight" in state_dict,
        "rope": "pos_1LC" not in state_dict,
        "rope_theta": check_float(rope_theta, "rope_theta", POSITIVE),
        "rope_norm": check_float(rope_norm, "rope_norm", POSITIVE),
        "logit_norm": check_switch(logit_norm, "logit_norm"),
        "num_legacy_classes": _shape(state_dict["class_emb.weight"])[0] - 1 if "class_emb.weight" in state_dict else 0,
        "stable_sampler": sampler_depth > 0,
        "sampler_depth": sampler_depth or 3,
        "sampler_start_scale": int(sampler_start_scale),
        "cross_attention_row0_quirk": check_switch(cross_attention_row0_quirk, "cross_attention_row0_quirk"),
        "norm_eps": 1e-6,
        "cond_drop_rate": 0.1,
        "drop_path_rate": 0.1 * depth / 24,
    }


def convert_star_transformer(state_dict: Mapping, **config_kwargs) -> STARTransformer2DModel:
    config = star_config_from_state_dict(state_dict, **config_kwargs)
    try:
        model = STARTransformer2DModel(**config)
    except ValueError as err:
        raise ConversionError(f"`transformer`: {err}") from None
    converted = {}
    for old, new in star_key_map(state_dict).items():
        if new.startswith("@"):  # zero_k_bias buffers: must really be zero
            check_zero_buffer(state_dict[old], old, "transformer")
        else:
            converted[new] = state_dict[old]
    load_into(model, converted, "transformer")
    check_finite("transformer", transformer=model)
    return model.eval()


def load_star_snapshot(path) -> tuple[dict, dict | None]:
    """(transformer state dict, trainer config or None) from a training snapshot or a plain state dict."""
    obj = load_checkpoint(path, "transformer")
    state_dict = find_state_dict(
        obj,
        [("trainer", "var_wo_ddp"), ("model",), ("state_dict",)],
        lambda sd: "encoder_proj.weight" in sd and "lvl_embed.weight" in sd,
        "transformer",
    )
    trainer = obj.get("trainer") if isinstance(obj, Mapping) else None
    config = trainer.get("config") if isinstance(trainer, Mapping) else None
    return state_dict, config if isinstance(config, Mapping) else None


def _load_text_components(text_encoder_dir):
    """Tokenizer + text encoder from a folder with ``tokenizer/`` and ``text_encoder/`` subfolders
    (the SD-2.x layout STAR uses) or a single folder holding both."""
    from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = check_folder(text_encoder_dir, "text_encoder")
    encoder_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    try:
        config = AutoConfig.from_pretrained(encoder_dir, local_files_only=True)
        model_class = {"clip_text_model": CLIPTextModel, "t5": T5EncoderModel}.get(config.model_type)
        if model_class is None:
            raise ConversionError(
                f"`text_encoder`: unsupported text encoder type {config.model_type!r} (CLIP text or T5 expected)."
            )
        # float32 whatever its config says (transformers reads a saved dtype): --dtype casts it afterwards
        encoder = model_class.from_pretrained(
            encoder_dir, local_files_only=True, use_safetensors=None, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except ConversionError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; each becomes a message naming the flag
        raise ConversionError(
            f"`text_encoder`: cannot load a tokenizer and text encoder from {str(root)!r}: {err}"
        ) from None
    return tokenizer, encoder.eval()


def convert_star_checkpoint(
    vae_path: str | os.PathLike,
    transformer_path: str | os.PathLike,
    text_encoder_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    patch_nums: Sequence[int] | str | None = None,
    rope_theta: float = 10000.0,
    rope_norm: float = 64.0,
    logit_norm: bool = True,
    sampler_start_scale: int | None = None,
    cross_attention_row0_quirk: bool = True,
    quant_resi: float = 0.5,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    depth: int | None = None,
):
    """Convert an original VQ-VAE + STAR snapshot + text-encoder folder into a :class:`STARPipeline`.

    ``cross_attention_row0_quirk`` (default True) reproduces the released code's cross-attention batch
    quirk so outputs match the original. ``depth``: the number of blocks the checkpoint must have (by default every
    block index present, and the release layout's depth where it applies). When ``output_dir`` is given the pipeline
    is written there atomically (safetensors only). Returns the pipeline.
    """
    from ..pipelines.pipeline_star import STARPipeline

    # what can be checked before a checkpoint is read
    check_star_patch_nums(patch_nums)
    check_float(rope_theta, "rope_theta", POSITIVE)
    check_float(rope_norm, "rope_norm", POSITIVE)
    check_float(quant_resi, "quant_resi", QUANT_RESI_RANGE)
    check_depth(depth)
    if sampler_start_scale is not None:  # (its largest value, num_scales - 1, once the schedule is known)
        check_whole_number(sampler_start_scale, "sampler_start_scale")
    check_switch(logit_norm, "logit_norm")
    check_switch(cross_attention_row0_quirk, "cross_attention_row0_quirk")
    dtype = check_dtype(dtype)
    if output_dir is not None:  # before reading multi-GB checkpoints
        check_output_dir(output_dir, overwrite)
    # every input before any is read
    check_inputs(files={"transformer": transformer_path, "vae": vae_path}, folders={"text_encoder": text_encoder_dir})
    star_sd, snapshot_config = load_star_snapshot(transformer_path)
    with reading_checkpoint("transformer", transformer_path):
        transformer = convert_star_transformer(
            star_sd,
            patch_nums=patch_nums,
            snapshot_config=snapshot_config,
            rope_theta=rope_theta,
            rope_norm=rope_norm,
            logit_norm=logit_norm,
            sampler_start_scale=sampler_start_scale,
            cross_attention_row0_quirk=cross_attention_row0_quirk,
            depth=depth,
        )
    vae_sd = _load_vae(vae_path)
    with reading_checkpoint("vae", vae_path):
        vqvae = convert_vae(vae_sd, transformer.config.patch_nums, quant_resi)
    if (
        vqvae.config.vocab_size != transformer.config.vocab_size
        or vqvae.config.z_channels != transformer.config.latent_channels
    ):
        raise ConversionError(
            f"`vae` (vocab {vqvae.config.vocab_size}, z {vqvae.config.z_channels}) does not belong to `transformer` "
            f"(vocab {transformer.config.vocab_size}, z {transformer.config.latent_channels})."
        )
    tokenizer, text_encoder = _load_text_components(text_encoder_dir)
    check_finite("text_encoder", text_encoder=text_encoder)
    width = getattr(text_encoder.config, "hidden_size", None) or getattr(text_encoder.config, "d_model", None)
    if width != transformer.config.text_embed_dim:
        raise ConversionError(
            f"`text_encoder` width {width} does not match "
            f"the transformer's text width {transformer.config.text_embed_dim}."
        )
    pipe = STARPipeline(transformer=transformer, vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer)
    check_tokenizer_fits(tokenizer, text_encoder, "text_encoder", pipe.text_max_length)  # what the pipeline pads to
    cast_for_output(dtype, transformer=transformer, vqvae=vqvae, text_encoder=text_encoder)
    if output_dir is not None:
        atomic_save_pipeline(pipe, output_dir, overwrite=overwrite)
    return pipe
