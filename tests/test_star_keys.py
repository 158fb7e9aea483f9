"""Converter coverage on every real STAR key layout (shared/keys/star), without the multi-GB files.

For every listing the model is built on the meta device from the configuration inferred from the key
shapes (plus the schedule the listing names); every original key must map to exactly one parameter or
buffer of the same shape, and every parameter of the model must be covered.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import keys_dir
from diffusers_var import MultiScaleVQModel, STARTransformer2DModel
from diffusers_var.conversion.star import star_config_from_state_dict, star_key_map
from diffusers_var.conversion.var import vae_config_from_state_dict, vae_key_map
from test_var_keys import assert_complete_mapping


def _listings():
    try:
        return sorted(p.name for p in keys_dir("star").glob("*.json"))
    except BaseException:  # collection must not fail; the tests below report the missing folder
        return ["keys-missing"]


def load_listing(name: str) -> dict:
    return json.loads((keys_dir("star") / name).read_text())


def shapes_of(entries) -> dict[str, tuple[int, ...]]:
    return {entry["key"]: tuple(entry["shape"]) for entry in entries}


@pytest.mark.parametrize("name", _listings())
def test_star_transformer_maps_completely(name):
    listing = load_listing(name)
    shapes = shapes_of(listing["transformer_state_dict"])
    original = listing["VAR_kwargs"]
    config = star_config_from_state_dict(
        shapes,
        snapshot_config={"patch_nums": listing["patch_nums"]},
        rope_theta=original["rope_theta"],
        rope_norm=original["rope_norm"],
        sampler_start_scale=original["sample_from_idx"],
    )
    assert (config["depth"], config["embed_dim"], config["num_heads"]) == (
        original["depth"],
        original["embed_dim"],
        original["num_heads"],
    )
    assert config["text_embed_dim"] == original["in_dim_cross"]
    assert config["cross_attention"] == original["enable_cross"] and config["rope"] == original["rotary_pos_emb"]
    assert config["stable_sampler"] == original["enable_adaptive_norm"]
    assert tuple(config["patch_nums"]) == tuple(original["patch_nums"])
    with torch.device("meta"):
        model = STARTransformer2DModel(**config)
    zeros = lambda n: (config["embed_dim"],) if n == "zero_k_bias" else None  # noqa: E731
    assert_complete_mapping(model, shapes, star_key_map(shapes), zeros)
    derived = sum(1 for k in shapes if k.endswith("zero_k_bias"))
    assert len(shapes) == listing["transformer_num_tensors"]
    assert (
        sum(p.numel() for p in model.parameters()) + derived * config["embed_dim"]
        == listing["transformer_num_elements"]
    )


@pytest.mark.parametrize("name", ["star-256-d16.json", "star-512-d30.json", "star-1024-d30.json"])
def test_star_schedule_inferred_without_trainer_config(name):
    """14 level embeddings identify the 1024 schedule; 10 are ambiguous (256 / 512) and need --patch-nums."""
    if name not in _listings():
        pytest.skip(f"{name} not present")
    listing = load_listing(name)
    shapes = shapes_of(listing["transformer_state_dict"])
    if len(listing["patch_nums"]) == 14:
        assert tuple(star_config_from_state_dict(shapes)["patch_nums"]) == tuple(listing["patch_nums"])
    else:
        from diffusers_var.conversion import ConversionError

        with pytest.raises(ConversionError, match="patch_nums"):
            star_config_from_state_dict(shapes)
        resolution = str(listing["image_size"])
        assert tuple(star_config_from_state_dict(shapes, patch_nums=resolution)["patch_nums"]) == tuple(
            listing["patch_nums"]
        )


@pytest.mark.parametrize("name", ["star-256-d16.json", "star-1024-d30.json"])
def test_star_vae_maps_completely(name):
    if name not in _listings():
        pytest.skip(f"{name} not present")
    listing = load_listing(name)
    shapes = shapes_of(listing["vae_state_dict"])
    config = vae_config_from_state_dict(shapes, listing["patch_nums"])
    with torch.device("meta"):
        model = MultiScaleVQModel(**config)
    key_map = vae_key_map(shapes)
    usage = next(k for k, v in key_map.items() if v == "quantize.codebook_usage")
    assert shapes[usage][0] == len(listing["patch_nums"])
    assert_complete_mapping(model, shapes, key_map, lambda n: None)
