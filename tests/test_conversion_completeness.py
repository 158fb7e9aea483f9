"""Every original key is consumed and every parameter filled, for all three families: a checkpoint missing a block
(in the middle, or the last one where the depth is known) or any single key is a clear ConversionError listing what
is missing, never a shallower model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import fixture_dir, keys_dir
from diffusers_var.conversion import ConversionError
from diffusers_var.conversion.infinity import convert_infinity_transformer, load_infinity_transformer_state_dict
from diffusers_var.conversion.star import convert_star_transformer, load_star_snapshot
from diffusers_var.conversion.var import convert_var_transformer, var_config_from_state_dict


def _without(state_dict: dict, prefix: str) -> dict:
    kept = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    assert len(kept) < len(state_dict), prefix
    return kept


def _var_state_dict() -> dict:
    return torch.load(fixture_dir("var") / "var.pth", weights_only=True)


def _star_state_dict() -> tuple[dict, dict]:
    return load_star_snapshot(fixture_dir("star") / "star_transformer.pth")


def _infinity_state_dict() -> dict:
    return load_infinity_transformer_state_dict(fixture_dir("infinity") / "transformer" / "infinity.pth")


def test_var_missing_blocks_and_keys():
    state_dict = _var_state_dict()  # 2 blocks
    assert convert_var_transformer(state_dict).config.depth == 2
    with pytest.raises(ConversionError, match=r"`transformer`: no keys for blocks \[0\]"):
        convert_var_transformer(_without(state_dict, "blocks.0."))
    with pytest.raises(ConversionError, match=r"no keys for blocks \[1\].*--depth"):  # the last block: --depth knows
        convert_var_transformer(_without(state_dict, "blocks.1."), depth=2)
    with pytest.raises(ConversionError, match=r"missing \['blocks.1.ffn.fc2.bias'\]"):
        convert_var_transformer(_without(state_dict, "blocks.1.ffn.fc2.bias"))


def test_var_heads_without_l2_norm_come_from_the_argument():
    """A checkpoint trained with ``attn_l2_norm=False`` has no per-head scales, so nothing in it counts the heads:
    ``num_heads`` gives them (the fixture's 2 heads of 32 features); by default 64 features a head, as released."""
    state_dict = {k: v for k, v in _var_state_dict().items() if "scale_mul_1H11" not in k}  # width 64
    model = convert_var_transformer(state_dict, num_heads=2)
    assert (model.config.num_heads, model.config.attn_l2_norm) == (2, False)
    assert convert_var_transformer(state_dict, depth=2).config.num_heads == 1  # (the release layout has 1 block)
    with pytest.raises(ConversionError, match=r"`num_heads` must divide the width 64, got 3"):
        convert_var_transformer(state_dict, num_heads=3)
    with pytest.raises(ConversionError, match=r"`num_heads`: the checkpoint's attention has 2 heads, got 4"):
        convert_var_transformer(_var_state_dict(), num_heads=4)
    wide = {k: v for k, v in state_dict.items()}
    wide["class_emb.weight"] = torch.zeros(11, 96)
    with pytest.raises(ConversionError, match=r"width 96 is not 64 features a head.*--num-heads"):
        var_config_from_state_dict(wide)


def test_release_layout_catches_a_removed_last_block():
    """VAR-d16's released key layout (width 64 x 16 heads) without its last block: refused with no --depth."""
    path = keys_dir("var") / "var_d16.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    shapes = {e["key"]: tuple(e["shape"]) for e in json.loads(path.read_text())["keys"]}
    state_dict = {
        k: torch.empty(shape, device="meta") for k, shape in shapes.items() if not k.startswith("blocks.15.")
    }
    with pytest.raises(ConversionError, match=r"no keys for blocks \[15\].*release layout"):
        var_config_from_state_dict(state_dict)


def test_star_missing_blocks_and_keys():
    state_dict, snapshot = _star_state_dict()  # 3 blocks
    kwargs = dict(snapshot_config=snapshot)
    assert convert_star_transformer(state_dict, **kwargs).config.depth == 3
    with pytest.raises(ConversionError, match=r"no keys for blocks \[1\]"):
        convert_star_transformer(_without(state_dict, "blocks.1."), **kwargs)
    with pytest.raises(
        ConversionError, match=r"no keys for blocks \[2\]"
    ):  # the case: every blocks.2.* removed
        convert_star_transformer(_without(state_dict, "blocks.2."), depth=3, **kwargs)
    key = next(k for k in state_dict if k.startswith("blocks.0.cross_attn."))
    with pytest.raises(ConversionError, match="missing"):
        convert_star_transformer(_without(state_dict, key), **kwargs)


def test_infinity_missing_blocks_and_keys():
    state_dict = _infinity_state_dict()
    depth = convert_infinity_transformer(state_dict).config.depth
    block = next(k for k in state_dict if k.startswith("block_chunks.0.module.0."))
    prefix = block[: block.index("module.0.") + len("module.0.")]
    with pytest.raises(ConversionError, match=r"no keys for block_chunks"):
        convert_infinity_transformer(_without(state_dict, prefix))
    with pytest.raises(ConversionError, match=r"--depth"):
        convert_infinity_transformer(state_dict, depth=depth + 2)
    with pytest.raises(ConversionError, match="missing"):
        convert_infinity_transformer(_without(state_dict, "head.weight"))


def test_infinity_a_stray_block_index_or_a_huge_depth_is_refused_at_once():
    """The probe: one stray key ``block_chunks.0.module.100000000...`` or ``--depth 200000000`` built the set of
    every (chunk, block) pair, then ran out of memory after ~100 s. The missing blocks are now found as VAR's are
    (the first few, walked lazily), and the message counts the rest."""
    state_dict = _infinity_state_dict()
    stray = {**state_dict, "block_chunks.0.module.1000000000.ffn.fc1.bias": torch.zeros(4)}
    with pytest.raises(ConversionError, match=r"no keys for block_chunks\.C\.module\.J .*'\.\.\.'\] \(\d{10}\)"):
        convert_infinity_transformer(stray)
    with pytest.raises(ConversionError, match=r"'\.\.\.'\] \(\d{9}\).*`--depth` 200000000"):
        convert_infinity_transformer(state_dict, depth=200_000_000)
