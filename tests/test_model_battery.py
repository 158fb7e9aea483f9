"""One battery for every model class (the spirit of diffusers' ModelTesterMixin): save / load, ``dtype=`` loading
with ``_keep_in_fp32_modules``, documented config arguments, and for the transformers: scale-by-scale decoding equals
the teacher-forcing forward, gradient checkpointing gives the same gradients, and offloading hooks and layerwise
casting work (every parameter is used inside its module's forward), and diffusers' ``set_attention_backend`` routes
every attention call.

A new model class joins by adding one :class:`ModelCase` to ``CASES``.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import cpu_offload
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from torch.overrides import TorchFunctionMode

from diffusers_var import (
    BitwiseMultiScaleVAE,
    InfinityTransformer2DModel,
    MultiScaleVQModel,
    STARTransformer2DModel,
    VARTransformer2DModel,
)
from tiny_components import infinity_components, star_components, var_components

INFINITY_SCHEDULE = [(1, 1), (2, 2), (4, 4)]


def _perturbed(model):
    """Freshly initialised AdaLN gates (1e-5) make the blocks irrelevant: spread the weights so they matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model.eval()


def _var_transformer():
    return _perturbed(var_components(seed=0)["transformer"])


def _star_transformer(stable_sampler):
    return lambda: _perturbed(star_components(seed=0, stable_sampler=stable_sampler)["transformer"])


def _infinity_transformer():
    return _perturbed(infinity_components(seed=0)["transformer"])


# -- the teacher-forcing call and the decoding condition of each transformer --------------------------------------
def _var_io(model, B=2):
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([1, model.config.num_classes])[:B]
    tf_input = torch.randn(B, model.seq_len - model.first_len, model.config.latent_channels, generator=g)
    schedule = [(pn, pn) for pn in model.config.patch_nums]
    return (lambda: model(labels, tf_input, drop_labels=False).logits), (labels,), tf_input, schedule


def _star_io(model, B=2):
    g = torch.Generator().manual_seed(1)
    D = model.config.text_embed_dim
    hidden, pooled = torch.randn(B, 5, D, generator=g), torch.randn(B, D, generator=g)
    mask = torch.ones(B, 5, dtype=torch.long)
    mask[1, -2:] = 0
    tf_input = torch.randn(B, model.seq_len - 1, model.config.latent_channels, generator=g)
    schedule = [(pn, pn) for pn in model.config.patch_nums]
    return (lambda: model(tf_input, hidden, mask, pooled).logits), (hidden, mask, pooled), tf_input, schedule


def _infinity_io(model, B=2):
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(B, 6, model.config.text_dim, generator=g)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[1, -3:] = False
    drop = torch.tensor([False, True])[:B]  # row 1: the learned unconditional text
    L = sum(h * w for h, w in INFINITY_SCHEDULE)
    tf_input = torch.randn(B, L - 1, model.config.bits_per_token, generator=g)
    return (
        (lambda: model(tf_input, embeds, mask, INFINITY_SCHEDULE, drop_text=drop).logits),
        (embeds, mask, drop),
        tf_input,
        INFINITY_SCHEDULE,
    )


@dataclass
class ModelCase:
    id: str
    model_class: type
    build: Callable
    io: Callable | None = None  # transformers: (teacher forcing, decoding condition, inputs, schedule)


CASES = [
    ModelCase("var", VARTransformer2DModel, _var_transformer, _var_io),
    ModelCase("star", STARTransformer2DModel, _star_transformer(False), _star_io),
    ModelCase("star_stable_sampler", STARTransformer2DModel, _star_transformer(True), _star_io),
    ModelCase("infinity", InfinityTransformer2DModel, _infinity_transformer, _infinity_io),
    ModelCase("multiscale_vq", MultiScaleVQModel, lambda: var_components(seed=0)["vqvae"]),
    ModelCase("bitwise_vae", BitwiseMultiScaleVAE, lambda: infinity_components(seed=0)["vae"]),
]
TRANSFORMERS = [case for case in CASES if case.io is not None]


def case_ids(cases):
    return [case.id for case in cases]


def _decode_all(model, condition, tf_input, schedule):
    """Logits of every scale decoded one by one with the KV cache, the teacher-forcing inputs as the scale inputs."""
    cache, pieces, begin = model.init_kv_cache(schedule), [], 0
    first = schedule[0][0] * schedule[0][1]
    for si, (h, w) in enumerate(schedule):
        scale_input = None if si == 0 else tf_input[:, begin - first : begin - first + h * w]
        out = model.forward_scale(si, condition, cache, scale_input)
        pieces.append(out[0] if isinstance(out, tuple) else out)
        begin += h * w
    return torch.cat(pieces, dim=1)


def _output(case, model):
    """A deterministic output of the model (teacher-forcing logits, or a tokenizer's decoded latent)."""
    with torch.no_grad():
        if case.io is not None:
            return case.io(model)[0]()
        if isinstance(model, MultiScaleVQModel):
            images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
            return model.decode_indices(model.encode_indices(images))
        images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # a 4 x 4 latent
        return model.decode_bit_labels(model.encode(images, INFINITY_SCHEDULE).bit_labels)


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_save_load_round_trip_and_dtype_loading(case, tmp_path):
    model = case.build()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = case.model_class.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(_output(case, loaded), _output(case, model))
    half = case.model_class.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    keep = set(half._keep_in_fp32_modules or ())
    for name, parameter in half.named_parameters():
        assert parameter.dtype == (torch.float32 if keep & set(name.split(".")) else torch.bfloat16), name
    if case.io is None:  # a bf16 tokenizer takes float32 images and codes (the Bitwise VAE's convs had refused them)
        decoded = _output(case, half)  # (bf16 may quantise near-ties to other codes: shapes and values checked)
        assert decoded.shape == _output(case, model).shape and bool(torch.isfinite(decoded).all())


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_a_damaged_shard_index_is_named(case, tmp_path):
    """diffusers reads a sharded model's index without checks: JSONDecodeError, KeyError, AttributeError or TypeError
    from deep inside, naming neither the file nor the model."""
    folder = tmp_path / "m"
    case.build().save_pretrained(folder, max_shard_size="20KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    good = json.loads(index.read_text())
    assert len(set(good["weight_map"].values())) > 1
    for text, problem in (
        ("{not json", "not JSON"),
        ("[]", "a JSON list, not an object"),
        ("{}", "no `weight_map`"),
        ('{"weight_map": []}', "no `weight_map`"),
        (json.dumps({**good, "weight_map": {name: 5 for name in good["weight_map"]}}), "not all shard file names"),
        (json.dumps({"weight_map": good["weight_map"]}), "no `metadata`"),
    ):
        index.write_text(text)
        with pytest.raises(ValueError, match=rf"{case.model_class.__name__} from .*shard index {index.name} is "):
            case.model_class.from_pretrained(folder)
        with pytest.raises(ValueError, match=re.escape(problem)):
            case.model_class.from_pretrained(folder)
    index.write_text(json.dumps(good))
    assert torch.equal(_output(case, case.model_class.from_pretrained(folder).eval()), _output(case, case.build()))


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_loading_refuses_what_does_not_fit_and_saving_is_atomic(case, tmp_path):
    """Weights that do not fit the config (diffusers: a log line, then missing weights on the meta device or unused
    ones dropped) and a config that cannot build the model are ValueErrors naming the folder; a save that fails
    leaves the folder as it was."""
    import json

    from safetensors.torch import load_file, save_file

    model, folder = case.build(), tmp_path / "m"
    model.save_pretrained(folder)
    loaded, info = case.model_class.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("diffusers.models.modeling_utils.safetensors.torch.save_file", fail)
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="`save_directory`"):
        model.save_pretrained(tmp_path / "a-file")
    for path in (None, 3, [str(folder)]):  # a TypeError from pathlib before
        with pytest.raises(ValueError, match="`pretrained_model_name_or_path` must be a folder or a Hub repo id"):
            case.model_class.from_pretrained(path)
    with pytest.raises(ValueError, match="`subfolder` must be a folder name"):
        case.model_class.from_pretrained(folder, subfolder=1)

    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != first}, weights)
    with pytest.raises(
        ValueError, match=rf"does not hold the weights .*\(missing from the weights: {re.escape(first)}\)"
    ):
        case.model_class.from_pretrained(folder)
    floating = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 1 and v.numel() > 1)
    save_file({**state, floating: state[floating][:-1].clone()}, weights)  # a weight of another shape
    with pytest.raises(
        ValueError, match=rf"{re.escape(repr(str(folder)))} does not hold the weights .*expected shape"
    ):
        case.model_class.from_pretrained(folder)
    # what the message offers: the weights that fit load, the others keep their initialisation (they were left on the
    # meta device, and the model failed at its first call)
    partial, info = case.model_class.from_pretrained(folder, ignore_mismatched_sizes=True, output_loading_info=True)
    assert [key for key, *_ in info["mismatched_keys"]] == [floating]
    tensors = dict((*partial.named_parameters(), *partial.named_buffers()))
    assert not [name for name, tensor in tensors.items() if tensor.is_meta]
    assert all(torch.equal(tensors[k], v) for k, v in state.items() if k != floating)
    assert tensors[floating].shape == state[floating].shape and torch.isfinite(tensors[floating]).all()
    assert torch.isfinite(_output(case, partial)).all()
    config = json.loads((folder / "config.json").read_text())
    size = next(  # the first size-like argument
        name
        for name, parameter in inspect.signature(case.model_class.__init__).parameters.items()
        if type(parameter.default) is int and parameter.default > 1
    )
    (folder / "config.json").write_text(json.dumps({**config, size: "x"}))
    with pytest.raises(ValueError, match=rf"{case.model_class.__name__}"):
        case.model_class.from_pretrained(folder)


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_weights_are_safetensors_and_variants_keep_each_other(case, tmp_path, caplog):
    """Only safetensors are written (a pickle can run code when loaded): ``safe_serialization=False`` (which diffusers'
    own test battery passes) says so and writes safetensors. A ``.bin`` that diffusers' own save wrote still loads
    (torch's weights-only reader). Saving a variant leaves the default weights (sharded here) in place, and the other
    way round."""
    from diffusers import ModelMixin

    model, folder = case.build(), tmp_path / "m"
    expected = _output(case, model)
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(folder, safe_serialization=False)
    assert "writes safetensors only" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ModelMixin.save_pretrained(model, tmp_path / "pickled", safe_serialization=False)
    torch.testing.assert_close(_output(case, case.model_class.from_pretrained(tmp_path / "pickled")), expected)
    model.save_pretrained(folder, max_shard_size="50KB")
    shards = sorted(p.name for p in folder.iterdir() if "-of-" in p.name)
    assert len(shards) > 1
    model.save_pretrained(folder, variant="fp16")
    assert sorted(p.name for p in folder.iterdir() if "-of-" in p.name) == shards
    for variant in (None, "fp16"):
        torch.testing.assert_close(_output(case, case.model_class.from_pretrained(folder, variant=variant)), expected)
    model.save_pretrained(folder, max_shard_size="100KB")  # fewer shards: those the new index does not list go
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    fewer = sorted(p.name for p in folder.iterdir() if "-of-" in p.name and ".fp16" not in p.name)
    assert fewer == sorted(set(index["weight_map"].values()))
    model.save_pretrained(folder)  # the default weights as one file: its stale shards go, the variant stays
    assert not [p for p in folder.iterdir() if "-of-" in p.name and ".fp16" not in p.name]
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").is_file()


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_config_arguments_of_the_wrong_kind_are_named(case):
    """Each config argument is checked against its annotation before anything is built (``num_heads=0`` was a
    ZeroDivisionError, ``depth="6"`` a TypeError, ``quant_resi=NaN`` silently dropped layers)."""
    bad_values = {
        "int": [-1, 2.5, "6", True],
        "float": [float("nan"), "x"],
        "bool": ["yes", 1],
        "Sequence[int]": [[], [0]],
    }
    checked = 0
    for name, parameter in inspect.signature(case.model_class.__init__).parameters.items():
        for value in bad_values.get(str(parameter.annotation).removesuffix(" | None"), []):
            with pytest.raises(ValueError, match=rf"`{name}` of {case.model_class.__name__} must be"):
                case.model_class(**{name: value})
            checked += 1
    assert checked >= 8, checked


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_attention_processor_switches_are_refused_not_ignored(case):
    """diffusers' xformers / NPU / XLA switches walk attention processors, which these models do not have: they
    returned without a word. Turning them off stays harmless."""
    model = case.build()
    for method in (
        "enable_xformers_memory_efficient_attention",
        "enable_npu_flash_attention",
        "enable_xla_flash_attention",
    ):
        with pytest.raises(ValueError, match=rf"`{method}` does not apply to {case.model_class.__name__}.*backend"):
            getattr(model, method)()
    model.disable_xformers_memory_efficient_attention()
    model.disable_npu_flash_attention()
    model.disable_xla_flash_attention()


@pytest.mark.parametrize("case", TRANSFORMERS, ids=case_ids(TRANSFORMERS))
def test_a_config_too_large_to_build_is_refused_before_allocating(case):
    """``depth=300000`` filled 15 GiB for a minute before failing; an ``embed_dim`` of 30,000 took 20 s and 14 GiB."""
    config = {key: value for key, value in case.build().config.items() if not key.startswith("_")}
    with pytest.raises(ValueError, match=rf"`depth` of {case.model_class.__name__} must be at most 1024 blocks"):
        case.model_class.from_config({**config, "depth": 300_000})
    wide = {
        "embed_dim": 2**20,
        "num_heads": 2**16,
        **({"pool_num_heads": 2**16} if "pool_num_heads" in config else {}),
    }
    with pytest.raises(ValueError, match=rf"{case.model_class.__name__} of `depth` .* would hold about"):
        case.model_class.from_config({**config, **wide})


def test_star_stable_sampler_scale_index_is_one_it_runs():
    """-1 read the last scale, an index past the schedule was an IndexError, one below ``sampler_start_scale`` ran."""
    model = next(case for case in CASES if case.id == "star_stable_sampler").build()
    first, last = model.config.sampler_start_scale, len(model.config.patch_nums) - 1
    for bad in (-1, first - 1, last + 1, 1.5, True):
        with pytest.raises(ValueError, match=rf"`scale_index` must be .* \[{first}, {last}\]"):
            model.sampler_scale_logits(bad, torch.zeros(2, 1, 8), torch.zeros(1, 1, 8), torch.zeros(2, 8))


def test_infinity_configs_without_ffn_or_with_heads_rope_cannot_split_are_refused():
    """The FFN width rounds to a multiple of 256 (0 built a model without FFNs); a head of 2 features built with q / k
    twice v's width under 2D RoPE, one of 6 failed at the first call. STAR refused the same heads already."""
    case = next(case for case in CASES if case.model_class is InfinityTransformer2DModel)
    config = {key: value for key, value in case.build().config.items() if not key.startswith("_")}
    C = config["embed_dim"]
    for heads in (C // 2, C // 6):
        if C % heads == 0:
            with pytest.raises(ValueError, match=r"`embed_dim` / `num_heads` must be an integer divisible by 4"):
                InfinityTransformer2DModel(**{**config, "num_heads": heads})
    with pytest.raises(ValueError, match=r"`mlp_ratio` 0.5 gives an FFN of width 0 for embed_dim 32"):
        InfinityTransformer2DModel(
            **{**config, "embed_dim": 32, "num_heads": 4, "pool_num_heads": 4, "mlp_ratio": 0.5}
        )


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_every_config_argument_is_documented(case):
    """diffusers' convention: one ``name (`type`, defaults to ...)`` entry per config argument in the class
    docstring."""
    doc = inspect.getdoc(case.model_class)
    for name in list(inspect.signature(case.model_class.__init__).parameters)[1:]:
        assert re.search(rf"^\s*{name} \(`[^`]+`, (defaults to|\*optional\*)", doc, re.M), (
            f"{case.model_class.__name__}: `{name}`"
        )


@pytest.mark.parametrize("case", TRANSFORMERS, ids=case_ids(TRANSFORMERS))
def test_scale_by_scale_decoding_equals_teacher_forcing(case):
    model = case.build()
    teacher_forcing, condition, tf_input, schedule = case.io(model)
    with torch.no_grad():
        torch.testing.assert_close(
            _decode_all(model, condition, tf_input, schedule), teacher_forcing(), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("case", TRANSFORMERS, ids=case_ids(TRANSFORMERS))
def test_decoding_out_of_order_is_refused(case):
    """Scales run in order on one cache per generation: a skipped scale, a repeated one, a cache left over from the
    last generation, a missing cache or an index outside the schedule get a ValueError naming the parameter."""
    model = case.build()
    _, condition, tf_input, schedule = case.io(model)
    first = schedule[0][0] * schedule[0][1]
    second = tf_input[:, : schedule[1][0] * schedule[1][1]]
    with torch.no_grad():
        cache = model.init_kv_cache(schedule)
        with pytest.raises(ValueError, match=r"`scale_index` 1 starts at token .*holds 0"):
            model.forward_scale(1, condition, cache, second)  # scale 0 skipped
        model.forward_scale(0, condition, cache, None)
        with pytest.raises(ValueError, match=rf"`scale_index` 0 starts at token 0, but its `kv_cache` holds {first}"):
            model.forward_scale(0, condition, cache, None)  # repeated, or the last generation's cache
        with pytest.raises(ValueError, match=r"`scale_index` must be an int in \[0, \d+\]"):
            model.forward_scale(len(schedule), condition, cache, second)
        with pytest.raises(ValueError, match=r"needs the `kv_cache` of `init_kv_cache\(\)`, got NoneType"):
            model.forward_scale(0, condition, None, None)
        cache.reset()
        model.forward_scale(0, condition, cache, None)  # a reset cache starts a new generation
        model.forward_scale(torch.tensor(1), condition, cache, second)  # (a 0-d integer tensor is an index too)
        cache.reset()  # ... also in another precision: the storage follows the keys' dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.forward_scale(0, condition, cache, None)
        cache.reset()
        model.forward_scale(0, condition, cache, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # within a generation: cast into the storage it has
            out = model.forward_scale(1, condition, cache, second)
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()
        cache.reset()
        model.forward_scale(0, condition, cache, None)
        with pytest.raises(ValueError, match=r"`(scale_input|kv_cache)`"):  # another batch mid-generation: named
            model.forward_scale(1, tuple(t[:1] for t in condition), cache, second[:1])
        deeper = type(model).from_config({**model.config, "depth": 2 * model.config.depth})
        with pytest.raises(ValueError, match=r"`kv_cache` has \d+ layers and this model \d+ blocks"):
            deeper.forward_scale(0, condition, model.init_kv_cache(schedule), None)


def test_family_specific_arguments_are_checked():
    """VAR: a dropout ``rate`` outside [0, 1] and a ``logits_from`` that is no whole number; STAR: a text row without
    a real token (it attended to nothing) and a cache schedule that is not the model's (it was ignored)."""
    var = _var_transformer()
    _, (labels,), tf_input, _ = _var_io(var)
    for rate in (1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match=r"`rate` must be a probability in \[0, 1\]"):
            var.drop_labels(labels, rate=rate)
    for logits_from in (True, 2.5):
        with torch.no_grad(), pytest.raises(ValueError, match="`logits_from` must be in"):
            var(labels, tf_input, logits_from=logits_from)
    star = _star_transformer(False)()
    _, (hidden, mask, pooled), tf_input, schedule = _star_io(star)
    mask = mask.clone()
    mask[1] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="`encoder_attention_mask`: every row needs at least one"):
        star(tf_input, hidden, mask, pooled)
    star.config.cross_attention_row0_quirk = True  # (every row reads row 0's text: row 1's mask is never read)
    with torch.no_grad():
        assert torch.isfinite(star(tf_input, hidden, mask, pooled).logits).all()
    # training under the quirk: the dropped rows still run, and a row attending to nothing is NaN on some CUDA
    # kernels (NaN * 0 in their backward), so every row the cross-attention runs has a real token
    reached = []
    hooks = [
        block.cross_attn.register_forward_pre_hook(lambda _, args: reached.append(args[2]))
        for block in star.blocks
        if block.cross_attn is not None
    ]
    star(tf_input, hidden, mask, pooled).logits.sum().backward()
    for hook in hooks:
        hook.remove()
    assert reached and all(bool(seen.bool().any(dim=1).all()) for seen in reached)
    assert all(torch.equal(seen[0].bool(), mask[0].bool()) for seen in reached)  # row 0's text is as given
    assert all(torch.isfinite(p.grad).all() for p in star.parameters() if p.grad is not None)
    assert star.init_kv_cache(schedule[:2]).schedule == schedule[:2]
    with pytest.raises(ValueError, match=r"`scale_schedule` must be the model's schedule"):
        star.init_kv_cache([(7, 7)])
    sampled = _star_transformer(True)()  # the stable sampler's inputs: shapes named, not a torch.cat error
    _, (hidden, mask, pooled), tf_input, _ = _star_io(sampled)
    with torch.no_grad():
        states = sampled(tf_input, hidden, mask, pooled).hidden_states
        begin = sampled.begin_ends[sampled.config.sampler_start_scale][0]
        known = torch.zeros(2, sampled.seq_len - begin, sampled.config.latent_channels)
        ones = torch.ones(2, sampled.seq_len - begin)
        assert sampled.forward_sampler(states, known, ones, pooled).shape[:2] == ones.shape
        for args, parameter in [
            ((states[:, 1:], known, ones, pooled), "hidden_states"),
            ((states, known[:1], ones, pooled), "known_embeddings"),
            ((states, known, ones[:, 1:], pooled), "known_mask"),
        ]:
            with pytest.raises(ValueError, match=f"`{parameter}` must have shape"):
                sampled.forward_sampler(*args)


# the condition of an empty batch, and the parameter the error must name
EMPTY_BATCHES = {
    "var": (lambda condition: (condition[0][:0],), "class_labels"),
    "star": (lambda condition: tuple(t[:0] for t in condition), "pooled_text_embeds"),
    "infinity": (lambda condition: tuple(t[:0] for t in condition), "text_embeds"),
}


@pytest.mark.parametrize("case", TRANSFORMERS, ids=case_ids(TRANSFORMERS))
def test_an_empty_batch_is_named(case):
    """A batch of no rows failed inside the attention's reshape; the tokenizers return empty results instead."""
    model = case.build()
    _, condition, _, schedule = case.io(model)
    empty, parameter = EMPTY_BATCHES[case.id.split("_")[0]]
    with torch.no_grad(), pytest.raises(ValueError, match=f"`{parameter}`.*empty"):
        model.forward_scale(0, empty(condition), model.init_kv_cache(schedule), None)


# the teacher-forcing call with one input row against the condition's two, and the parameter the error must name
ROW_MISMATCHES = {
    "var": (lambda model, condition, tf_input: model(condition[0], tf_input[:1]), "teacher_forcing_input"),
    "star": (lambda model, condition, tf_input: model(tf_input[:1], *condition), "pooled_text_embeds"),
    "infinity": (
        lambda model, condition, tf_input: model(tf_input[:1], *condition[:2], INFINITY_SCHEDULE),
        "hidden_states",
    ),
}


@pytest.mark.parametrize("case", TRANSFORMERS, ids=case_ids(TRANSFORMERS))
def test_teacher_forcing_rows_must_match_the_condition(case):
    """One input row against the condition's two, and an input that is a numpy array, are named."""
    model = case.build()
    _, condition, tf_input, _ = case.io(model)
    call, parameter = ROW_MISMATCHES[case.id.split("_")[0]]
    with torch.no_grad(), pytest.raises(ValueError, match=f"`{parameter}`"):
        call(model, condition, tf_input)
    family, array = case.id.split("_")[0], tf_input.numpy()
    with torch.no_grad(), pytest.raises(ValueError, match=r"must have shape .*got ndarray"):
        if family == "var":
            model(condition[0], array)
        elif family == "star":
            model(array, *condition)
        else:
            model(array, *condition[:2], INFINITY_SCHEDULE)


def test_infinity_drop_text_must_be_one_bool_per_row():
    """A (1,) mask would broadcast over every row (all texts dropped), an int mask would index."""
    model = _infinity_transformer()
    _, (embeds, mask, _), tf_input, _ = _infinity_io(model)
    for drop in (torch.tensor([True]), torch.tensor([0, 1]), [False, True]):
        with torch.no_grad(), pytest.raises(ValueError, match=r"`drop_text` must be a bool tensor of shape \(2,\)"):
            model(tf_input, embeds, mask, INFINITY_SCHEDULE, drop_text=drop)


@pytest.mark.parametrize("case", TRANSFORMERS, ids=case_ids(TRANSFORMERS))
def test_gradient_checkpointing_gives_the_same_gradients(case):
    model = case.build().train()
    model.config.cond_drop_rate = 0.0
    teacher_forcing = case.io(model)[0]

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(0)
        loss = teacher_forcing().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed_loss, checkpointed = loss_and_grads()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", TRANSFORMERS, ids=case_ids(TRANSFORMERS))
def test_decoding_under_offload_hooks_and_layerwise_casting(case):
    """accelerate's offload hooks keep the weights on the meta device between uses: a parameter read outside its
    module's forward fails. Layerwise casting stores the linears / embeddings in float8 and upcasts them in their
    forward: a weight read directly would be float8."""
    model = case.build()
    _, condition, tf_input, schedule = case.io(model)
    with torch.no_grad():
        reference = _decode_all(model, condition, tf_input, schedule)
        offloaded = case.build()
        cpu_offload(offloaded, execution_device=torch.device("cpu"), offload_buffers=True)
        assert next(offloaded.blocks.parameters()).device.type == "meta"
        assert torch.equal(_decode_all(offloaded, condition, tf_input, schedule), reference)
        cast = case.build()
        cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        assert cast.blocks[0].ffn.fc1.weight.dtype == torch.float8_e4m3fn
        low = _decode_all(cast, condition, tf_input, schedule)
    assert low.shape == reference.shape and torch.isfinite(low).all()
    assert 0 < (low - reference).norm() / reference.norm() < 0.2  # float8 weights: close, not equal
    # the inputs follow the model's dtype: another compute dtype failed inside torch at the first call
    with pytest.raises(ValueError, match=r"`compute_dtype` torch.bfloat16 is not the dtype .*\(torch.float32\)"):
        case.build().enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    half = case.build().to(torch.bfloat16)  # diffusers' way: the model in its compute dtype first
    half.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(_decode_all(half, condition, tf_input, schedule)).all()


@pytest.mark.parametrize("case", [case for case in CASES if case.io is None], ids=lambda case: case.id)
def test_the_image_tokenizers_refuse_layerwise_casting(case):
    """Their inputs took the float8 dtype of the stored weights: every encode and decode failed inside torch."""
    with pytest.raises(ValueError, match=r"`enable_layerwise_casting\(\)`: .* does not take layerwise casting"):
        case.build().to(torch.bfloat16).enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16
        )


@pytest.fixture
def attention_backend_restored():
    """diffusers' ``set_attention_backend`` sets the process-wide active backend (``reset_attention_backend`` only
    clears attention processors, which these models do not have): put the active one back after the test."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = active


@pytest.mark.parametrize("case", TRANSFORMERS, ids=case_ids(TRANSFORMERS))
def test_set_attention_backend_routes_every_attention_call(case, monkeypatch, attention_backend_restored):
    """DESIGN: attention goes through diffusers' ``dispatch_attention_fn``, so ``model.set_attention_backend(name)``
    picks the kernel of every attention call (self- and cross-attention, teacher forcing and KV-cached decoding);
    a name diffusers does not know is a ValueError naming the backends."""
    model = case.build()
    teacher_forcing, condition, tf_input, schedule = case.io(model)
    with torch.no_grad():
        reference, reference_decoded = teacher_forcing(), _decode_all(model, condition, tf_input, schedule)
    math_backend = AttentionBackendName._NATIVE_MATH
    routed_calls, kernel_calls = [], []  # calls through the backend; calls of PyTorch's attention, however imported
    math_attention = _AttentionBackendRegistry._backends[math_backend]
    monkeypatch.setitem(
        _AttentionBackendRegistry._backends,
        math_backend,
        lambda *args, **kwargs: routed_calls.append(1) or math_attention(*args, **kwargs),
    )

    class CountAttentionKernels(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:  # the same builtin under every import of it
                kernel_calls.append(1)
            return func(*args, **(kwargs or {}))

    model.set_attention_backend("_native_math")
    with torch.no_grad(), CountAttentionKernels():
        routed = teacher_forcing()
        forward_calls = len(routed_calls)
        decoded = _decode_all(model, condition, tf_input, schedule)
    # every attention call went through the backend (none called PyTorch's kernel directly), at least one per block
    # in the forward and one per block and scale in the decoding
    assert len(routed_calls) == len(kernel_calls), (len(routed_calls), len(kernel_calls))
    assert forward_calls >= len(model.blocks)
    assert len(routed_calls) - forward_calls >= len(model.blocks) * len(schedule)
    torch.testing.assert_close(routed, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, reference_decoded, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must be one of the following"):
        model.set_attention_backend("no_such_kernel")


TOKENIZERS = [case for case in CASES if case.io is None]


@pytest.mark.parametrize("case", TOKENIZERS, ids=case_ids(TOKENIZERS))
def test_sliced_decoding_gives_the_same_images(case):
    """``enable_slicing`` (diffusers' switch) decodes a slice of images at a time: the same images as the whole
    batch, one decoder call per slice; ``disable_slicing`` goes back; a bad slice size is refused; tiling says it is
    absent."""
    model = case.build().eval()
    with torch.no_grad():
        if isinstance(model, MultiScaleVQModel):
            latents = torch.randn(5, model.config.z_channels, 2, 2, generator=torch.Generator().manual_seed(0))
            decode = model.decode_latent
        else:
            latents = torch.randn(5, model.config.codebook_dim, 4, 4, generator=torch.Generator().manual_seed(0))
            decode = lambda x: model.decode(x).sample  # noqa: E731
        whole = decode(latents)
        calls = []
        handle = model.decoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        model.enable_slicing(2)
        sliced = decode(latents)
        model.enable_slicing()
        one_by_one = decode(latents)
        model.disable_slicing()
        again = decode(latents)
        handle.remove()
    assert calls == [2, 2, 1, 1, 1, 1, 1, 1, 5]
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, whole)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="slice_size"):
            model.enable_slicing(bad)
    with pytest.raises(NotImplementedError):
        model.enable_tiling()


def _tokenizer_calls(model):
    """``(encode(images), decode(latents), decode_tokens(tokens), tokens, latent_channels, latent_name,
    tokens_name)`` of a tokenizer, on 8 x 8 images."""
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if isinstance(model, MultiScaleVQModel):
        tokens = model.encode_indices(images)
        return (
            model.encode_indices,
            model.decode_latent,
            model.decode_indices,
            tokens,
            model.config.z_channels,
            "f_hat",
            "indices",
        )
    tokens = model.encode(images, INFINITY_SCHEDULE).bit_labels
    return (
        lambda x: model.encode(x, INFINITY_SCHEDULE),
        lambda x: model.decode(x).sample,
        model.decode_bit_labels,
        tokens,
        model.config.codebook_dim,
        "latents",
        "bit_labels",
    )


@pytest.mark.parametrize("case", TOKENIZERS, ids=case_ids(TOKENIZERS))
def test_bad_tokenizer_inputs_name_the_parameter(case):
    """The tokenizers' public encode / decode calls refuse what they cannot use, naming the parameter, instead of a
    torch error from inside, tokens of garbage or NaN images: images outside [-1, 1] (0..255, uint8), NaN images or
    latents, latents of the wrong width or so large that they decode to non-finite pixels, tokens of a float dtype,
    outside the vocabulary / not bits, of two batch sizes, or with the scales out of order."""
    model = case.build().eval()
    encode, decode, decode_tokens, tokens, channels, latent_name, tokens_name = _tokenizer_calls(model)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.isfinite(decode_tokens(tokens)).all()  # the good input works, and what is legitimate:
        encode(images * 1.2)  # a resampling overshoot past [-1, 1]
        narrow = [t.int() if isinstance(model, MultiScaleVQModel) else t.bool() for t in tokens]  # int32 / bool
        assert torch.equal(decode_tokens(narrow), decode_tokens(tokens))
        assert torch.isfinite(decode_tokens(tokens[:2])).all()  # the first scales only
        for bad in (
            images * 127.5 + 127.5,
            ((images + 1) * 127.5).to(torch.uint8),
            images.clone().fill_(float("nan")),
        ):
            with pytest.raises(ValueError, match="`images`"):
                encode(bad)
        latents = torch.randn(2, channels, 4, 4, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(decode(latents)).all()
        nan = torch.full_like(latents, float("nan"))
        for bad in (latents[:, :1], nan, torch.full_like(latents, 1e30), latents.long()):  # NaNs, by overflow
            with pytest.raises(ValueError, match=f"`{latent_name}`"):
                decode(bad)
        high = model.config.vocab_size if isinstance(model, MultiScaleVQModel) else 2
        for bad in (
            [t.float() for t in tokens],
            [t.clone().fill_(high) for t in tokens],
            [torch.full_like(t, -1, dtype=torch.long) for t in tokens],
            [tokens[0].repeat(2, *[1] * (tokens[0].ndim - 1))] + list(tokens[1:]),
            list(reversed(tokens)),
            [],
        ):
            with pytest.raises(ValueError, match=f"`{tokens_name}"):
                decode_tokens(bad)
        multiples = rf"`images` height and width must be multiples of {model.downsample_factor}"
        with pytest.raises(ValueError, match=multiples):
            encode(torch.zeros(2, 3, 9, 9))  # the encoder's strided convs would drop the last row and column
        # the training entry points check shapes only (no sync each step), but a dtype costs nothing: uint8 pixels
        # were read as floats of 0..255
        if isinstance(model, MultiScaleVQModel):
            trainers = (model.encode_latent, model)
        else:
            trainers = (model.encode_features, lambda x: model(x, INFINITY_SCHEDULE))
        for train_call in trainers:
            with pytest.raises(
                ValueError, match=r"`images` must be a floating-point tensor in \[-1, 1\], got torch.uint8"
            ):
                train_call(((images + 1) * 127.5).to(torch.uint8))


def test_multiscale_vq_patch_nums_and_training_forward():
    """``patch_nums`` of the encode calls are whole numbers (2.5 was read as 2); the training forward of a bf16 model
    takes float32 images (it fed them to the bf16 convolutions)."""
    vq = var_components(seed=0)["vqvae"].eval()
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert [t.shape[1] for t in vq.encode_indices(images, patch_nums=np.array([1, 4]))] == [1, 16]
        for bad in ([1, 1.5], [1.0, 2.0], ["1", "2"], [True, 2]):
            with pytest.raises(ValueError, match="`patch_nums` must be a list of strictly increasing"):
                vq.encode_indices(images, patch_nums=bad)
    out = vq.to(torch.bfloat16).train()(images)
    assert torch.isfinite(out[1]) and out[0].shape == images.shape


def test_bitwise_teacher_forcing_inputs_check_their_arguments():
    """Training inputs of a schedule that does not end at the features' size, of images instead of features, or
    with noise settings outside their range came back without a word (or failed inside numpy)."""
    vae = infinity_components(seed=0)["vae"].eval()
    with torch.no_grad():
        features = vae.encode_features(torch.zeros(1, 3, 8, 8))
        inputs, labels = vae.teacher_forcing_inputs(features, INFINITY_SCHEDULE, 2, 0.3)
        assert labels.shape[1] == sum(h * w for h, w in INFINITY_SCHEDULE)
        for args, parameter in [
            ((features, [(1, 1), (2, 2)]), "scale_schedule"),
            ((features, [(1, 1), (4, 4), (2, 2), (4, 4)]), "scale_schedule"),
            ((torch.zeros(1, 3, 4, 4), INFINITY_SCHEDULE), "features_BdHW"),
            ((features, INFINITY_SCHEDULE, -1), "noise_apply_layers"),
            ((features, INFINITY_SCHEDULE, 2, float("nan")), "noise_apply_strength"),
            ((features, INFINITY_SCHEDULE, 2, 5.0), "noise_apply_strength"),
        ]:
            with pytest.raises(ValueError, match=f"`{parameter}`"):
                vae.teacher_forcing_inputs(*args)
        # the kept bits of edit fine-tuning: an IndexError, a torch.where error or a TypeError from inside
        kept = vae.encode(torch.zeros(1, 3, 8, 8), INFINITY_SCHEDULE).bit_labels
        keep = [torch.zeros(b.shape[:3], dtype=torch.bool) for b in kept]  # (patch factor 1 here)
        plain = vae.teacher_forcing_inputs(features, INFINITY_SCHEDULE)[1]
        kept_nothing = vae.teacher_forcing_inputs(features, INFINITY_SCHEDULE, keep=keep, kept_bit_labels=kept)[1]
        assert torch.equal(kept_nothing, plain)  # nothing kept: the plain labels
        for kwargs, parameter in [
            ({"keep": keep[:-1], "kept_bit_labels": kept}, "`keep` must hold one bool mask per scale"),
            ({"keep": [k.float() for k in keep], "kept_bit_labels": kept}, "`keep` must hold one bool mask per scale"),
            ({"keep": keep}, "`keep` and `kept_bit_labels` go together"),
            ({"keep": keep, "kept_bit_labels": [b.float() for b in kept]}, "`kept_bit_labels` must hold one"),
            ({"keep": keep, "kept_bit_labels": kept[1:] + kept[:1]}, "`kept_bit_labels` must hold one"),
        ]:
            with pytest.raises(ValueError, match=parameter):
                vae.teacher_forcing_inputs(features, INFINITY_SCHEDULE, **kwargs)


def test_bitwise_schedules_take_whole_numbers_only():
    """``int()`` would read a 1.5 grid side as 1: the schedule's entries are whole numbers, (h, w) or (1, h, w)."""
    vae = infinity_components(seed=0)["vae"].eval()
    images = torch.zeros(1, 3, 8, 8)
    with torch.no_grad():
        for good in (np.array([[1, 1], [2, 2], [4, 4]], dtype=np.int16), torch.tensor([[1, 1], [2, 2], [4, 4]])):
            assert vae.encode(images, good).bit_labels[-1].shape[1:3] == (4, 4)
        for bad in (
            [(1, 1), (2, 2), (4.0, 4.0)],
            [(1, 1), (2, 2.5), (4, 4)],
            [(1, 1), (True, 2), (4, 4)],
            torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]),
            4,
        ):
            with pytest.raises(ValueError, match="`scale_schedule`"):
                vae.encode(images, bad)


def test_infinity_from_scratch_init_is_the_original_trainers():
    """``InfinityTransformer2DModel.init_weights``: every residual output, the cross-attention's included, divided by
    sqrt(2 depth) (the original's ``special_init`` scales ``ca.proj`` too), and the AdaLN multipliers of the original
    trainer's script (``--aln`` 1e-3, ``--alng`` 5e-6)."""
    depth, width = 8, 256
    model = InfinityTransformer2DModel(
        bits_per_token=8, text_dim=32, text_max_length=8, pool_num_heads=2, depth=depth, embed_dim=width, num_heads=4
    )
    torch.manual_seed(0)
    model.init_weights()
    std = (1 / width / 3) ** 0.5  # the truncated normal's, before any scaling
    block = model.blocks[3]
    for linear in (block.attn.to_out, block.ffn.fc2, block.cross_attn.to_out):
        assert abs(linear.weight.std().item() / (std / (2 * depth) ** 0.5) - 1) < 0.1
    assert abs(block.cross_attn.to_q.weight.std().item() / std - 1) < 0.1  # not a residual output: unscaled
    assert block.shared_adaln  # Infinity's per-block offsets to the shared AdaLN: randn / sqrt(C), then multiplied
    gates, scales = block.adaln_offset[:, :, :2], block.adaln_offset[:, :, 2:]
    assert abs(scales.std().item() / (1e-3 / width**0.5) - 1) < 0.1
    assert abs(gates.std().item() / (5e-6 / width**0.5) - 1) < 0.1
