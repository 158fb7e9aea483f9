"""Converter coverage on the real released Infinity key layouts (shared/keys/infinity), without the files.

Every json there is mapped: the configuration is inferred from the key shapes, the model is built on the
meta device, every original key must land on one parameter / buffer of the same shape, and every parameter
and persistent buffer of the model must be covered.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import keys_dir
from diffusers_var import BitwiseMultiScaleVAE, InfinityTransformer2DModel
from diffusers_var.conversion.infinity import (
    derived_buffer_shape,
    infinity_config_from_state_dict,
    infinity_key_map,
    vae_config_from_state_dict,
    vae_key_map,
)
from test_var_keys import assert_complete_mapping


def _key_files():
    try:
        return sorted(p.name for p in keys_dir("infinity").glob("*.json"))
    except BaseException:  # collection must not fail; the test reports the missing folder
        return ["keys-missing"]


def load(name):
    data = json.loads((keys_dir("infinity") / name).read_text())
    return data, {entry["name"]: tuple(entry["shape"]) for entry in data["keys"]}


def _strip_wrappers(shapes):
    """The plain-name layout the original VAE loader also accepts (no ``.conv`` / ``.norm`` level)."""
    return {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in shapes.items()}


@pytest.mark.parametrize("name", _key_files())
def test_release_maps_completely(name):
    if name == "keys-missing":
        keys_dir("infinity")
    data, shapes = load(name)
    if name.startswith("vae"):
        expected = data["config"]
        layouts = [shapes, _strip_wrappers(shapes)]
        for layout in layouts:
            config = vae_config_from_state_dict(layout, spatial_patchify=bool(expected["apply_spatial_patchify"]))
            assert (
                config["codebook_dim"] == expected["codebook_dim"] and config["base_channels"] == expected["base_ch"]
            )
            assert (
                config["encoder_ch_mult"] == expected["encoder_ch_mult"]
                and config["decoder_ch_mult"] == expected["decoder_ch_mult"]
            )
            with torch.device("meta"):
                model = BitwiseMultiScaleVAE(**config)
            assert model.downsample_factor * model.patch_factor == 16
            assert_complete_mapping(model, layout, vae_key_map(layout), lambda n: derived_buffer_shape(config, n))
    else:
        expected = data["config"]
        config = infinity_config_from_state_dict(shapes)
        assert (config["depth"], config["embed_dim"], config["num_heads"], config["block_chunks"]) == (
            expected["depth"],
            expected["embed_dim"],
            expected["num_heads"],
            expected["block_chunks"],
        )
        assert (
            config["bits_per_token"] == expected["head_out_features_V"] // 2
            and config["pool_num_heads"] == expected["pool_heads"]
        )
        assert config["shared_adaln"] == expected["shared_aln"]
        with torch.device("meta"):
            model = InfinityTransformer2DModel(**config)
        assert_complete_mapping(model, shapes, infinity_key_map(shapes), lambda n: derived_buffer_shape(config, n))
    if data.get("num_parameters"):
        assert sum(p.numel() for p in model.parameters()) == data["num_parameters"]
