"""Converter coverage on the real released key layouts (shared/keys/var), without the multi-GB files.

For every release the converted model is built on the meta device from the configuration inferred from
the key shapes; every original key must map to exactly one parameter or buffer of the same shape, and
every parameter / persistent buffer of the model must be covered (nothing left uninitialised).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import keys_dir
from diffusers_var import MultiScaleVQModel, VARTransformer2DModel
from diffusers_var.conversion.var import (
    _expected_derived,
    vae_config_from_state_dict,
    vae_key_map,
    var_config_from_state_dict,
    var_key_map,
)

RELEASES = {  # file: (depth, shared AdaLN, patch_nums)
    "var_d12.json": (12, False, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "var_d16.json": (16, False, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "var_d20.json": (20, False, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "var_d24.json": (24, False, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "var_d30.json": (30, False, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "var_d36.json": (36, True, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
}


def load_shapes(name: str) -> dict[str, tuple[int, ...]]:
    path = keys_dir("var") / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return {entry["key"]: tuple(entry["shape"]) for entry in json.loads(path.read_text())["keys"]}


def assert_complete_mapping(model: torch.nn.Module, shapes: dict, key_map: dict, derived_shape) -> None:
    targets = model.state_dict()  # parameters + persistent buffers
    buffers = dict(model.named_buffers())
    covered = []
    for old, new in key_map.items():
        if new.startswith("@"):
            name = new[1:]
            assert name in buffers or derived_shape(name) is not None, f"{old}: derived target {name} unknown"
            assert tuple(derived_shape(name)) == shapes[old], f"{old}: derived shape mismatch"
            continue
        assert new in targets, f"{old} -> {new}: no such parameter/buffer"
        assert tuple(targets[new].shape) == shapes[old], (
            f"{old} -> {new}: {shapes[old]} vs {tuple(targets[new].shape)}"
        )
        covered.append(new)
    assert len(covered) == len(set(covered)), "two original keys map to the same parameter"
    uninitialised = sorted(set(targets) - set(covered))
    assert not uninitialised, f"parameters/buffers not covered by the checkpoint: {uninitialised[:10]}"


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_var_release_maps_completely(name):
    shapes = load_shapes(name)
    depth, shared, patch_nums = RELEASES[name]
    config = var_config_from_state_dict(shapes)
    assert (config["depth"], config["shared_adaln"], tuple(config["patch_nums"])) == (depth, shared, patch_nums)
    assert config["embed_dim"] == 64 * depth and config["num_heads"] == depth and config["num_classes"] == 1000
    with torch.device("meta"):
        model = VARTransformer2DModel(**config)
    derived = lambda n: tuple(_expected_derived(model, n).shape)  # noqa: E731
    assert_complete_mapping(model, shapes, var_key_map(shapes), derived)
    expected_params = json.loads((keys_dir("var") / name).read_text()).get("num_parameters")
    if expected_params:
        assert sum(p.numel() for p in model.parameters()) == expected_params


@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)])
def test_vae_release_maps_completely(patch_nums):
    shapes = load_shapes("vae_ch160v4096z32.json")
    config = vae_config_from_state_dict(shapes, patch_nums)
    assert (config["ch"], tuple(config["ch_mult"]), config["num_res_blocks"], config["share_quant_resi"]) == (
        160,
        (1, 1, 2, 2, 4),
        2,
        4,
    )
    assert (config["vocab_size"], config["z_channels"]) == (4096, 32)
    with torch.device("meta"):
        model = MultiScaleVQModel(**config)
    assert_complete_mapping(model, shapes, vae_key_map(shapes), lambda n: None)
    assert sum(p.numel() for p in model.parameters()) == 108_948_355
