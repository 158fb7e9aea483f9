"""Training the Infinity tokenizer and the text-to-image transformers (STAR, Infinity) on the CPU with tiny
models: losses fall, exports load with their pipelines and generate, bad configs name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import fixture_dir
from diffusers_var import BitwiseMultiScaleVAE, InfinityPipeline, MultiScaleVQModel, STARPipeline
from diffusers_var.training import TrainConfig, train
from diffusers_var.training.text_encoders import build_tiny_text_encoder, load_text_encoder, save_tiny_text_encoder

DATA = {"type": "shapes", "num_images": 32, "seed": 3}
BITWISE_MODEL = {
    "base_channels": 24,
    "encoder_ch_mult": [1],
    "decoder_ch_mult": [1],
    "num_res_blocks": 1,
    "codebook_dim": 4,
}
VQ_MODEL = {
    "ch": 32,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "vocab_size": 64,
    "z_channels": 8,
    "patch_nums": [1, 2, 4],
    "using_sa": False,
    "using_mid_sa": False,
}


def base_config(tmp: Path, **overrides) -> dict:
    config = {
        "output_dir": str(tmp),
        "data": DATA,
        "resolution": 16,
        "batch_size": 8,
        "log_every": 1,
        "warmup_steps": 1,
        "checkpoint_every": 100,
        "mixed_precision": "no",
        "seed": 0,
        "weight_decay": 0.0,
        "ema_decay": None,
    }
    config.update(overrides)
    return config


def log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def falls(history: list[float], n: int = 3) -> bool:
    return sum(history[-n:]) / n < sum(history[:n]) / n


@pytest.fixture(scope="module")
def bitwise_vae_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bitwise")
    return train(
        TrainConfig(
            **base_config(
                run, task="bitwise_tokenizer", model=BITWISE_MODEL, max_steps=12, learning_rate=3e-3, sample_every=12
            )
        )
    )


def test_bitwise_tokenizer_training_reduces_loss_and_exports(bitwise_vae_dir):
    run = bitwise_vae_dir.parent
    records = log(run)
    history = [r["loss"] for r in records]
    assert len(history) == 12 and falls(history), history
    assert 0 < records[-1]["bit_balance"] <= 1 and records[-1]["commit"] >= 0
    assert (run / "samples" / "step-0000012.png").is_file()
    vae = BitwiseMultiScaleVAE.from_pretrained(bitwise_vae_dir)
    out = vae.encode(torch.zeros(1, 3, 16, 16), [(s, s) for s in (1, 2, 4, 6, 8, 12, 16)])
    assert [tuple(b.shape) for b in out.bit_labels][-1] == (1, 16, 16, 4)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    """An untrained VQ tokenizer is enough to train a transformer on its (deterministic) tokens."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vq") / "vq"
    MultiScaleVQModel(**VQ_MODEL).save_pretrained(path)
    return path


def test_star_training_reduces_loss_and_exports(vq_dir, tmp_path):
    config = base_config(
        tmp_path,
        task="star",
        tokenizer_path=str(vq_dir),
        text_encoder_path="tiny-clip",
        max_steps=10,
        learning_rate=3e-3,
        cond_drop_rate=0.25,
        model={"depth": 2, "embed_dim": 64, "num_heads": 2},
        sample_every=10,
    )
    export = train(TrainConfig(**config))
    history = [r["loss"] for r in log(tmp_path)]
    assert falls(history), history
    assert (tmp_path / "samples" / "step-0000010.png").is_file()
    pipe = STARPipeline.from_pretrained(export)
    assert {"text_encoder", "tokenizer"} <= {p.name for p in export.iterdir()}
    assert pipe.transformer.config.text_embed_dim == pipe.text_encoder.config.hidden_size
    assert pipe.transformer.config.drop_path_rate == pytest.approx(0.1 * 2 / 24)  # the original trainer's rate
    images = pipe(
        prompt=["a red circle on a blue background", "a green square on a white background"],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 16, 16, 3)


def test_star_training_warns_of_long_captions_once_per_run(vq_dir, tmp_path, capfd):
    """The pipeline's truncation warning ("`prompt[0]`, `prompt[1]` ... longer than the text encoder's 77 tokens")
    was logged at every step, naming rows of the batch as prompts."""
    import warnings

    import PIL.Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        PIL.Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"caption {i} " + "a red circle on a blue background " * 4)
    config = base_config(
        tmp_path / "run",
        task="star",
        tokenizer_path=str(vq_dir),
        text_encoder_path="tiny-clip",
        data={"type": "imagefolder", "path": str(images)},
        batch_size=2,
        max_steps=3,
        model={"depth": 1, "embed_dim": 32, "num_heads": 2},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(TrainConfig(**config))
    truncation = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(truncation) == 1 and "training captions longer than the text encoder's 77 tokens" in truncation[0]
    assert "`prompt[" not in capfd.readouterr().err


def test_infinity_training_reduces_loss_and_exports(bitwise_vae_dir, tmp_path):
    config = base_config(
        tmp_path,
        task="infinity",
        tokenizer_path=str(bitwise_vae_dir),
        text_encoder_path="tiny-t5",
        max_steps=10,
        learning_rate=3e-3,
        bsc_flip_prob=0.2,
        cond_drop_rate=0.25,
        model={"depth": 2, "embed_dim": 64, "num_heads": 2, "drop_path_rate": 0.0},
        sample_every=10,
    )
    export = train(TrainConfig(**config))
    records = log(tmp_path)
    assert falls([r["loss"] for r in records]), records
    assert 0.5 <= records[-1]["bit_accuracy"] <= 1
    assert (tmp_path / "samples" / "step-0000010.png").is_file()
    pipe = InfinityPipeline.from_pretrained(export)
    assert pipe.transformer.config.bits_per_token == 4 and pipe.transformer.config.block_chunks == 2
    images = pipe(
        prompt="a red circle on a blue background",
        height=16,
        width=16,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 16, 16, 3)


def test_tiny_text_encoders_are_deterministic_and_round_trip(tmp_path):
    a, tokenizer = build_tiny_text_encoder("tiny-t5")
    b, _ = build_tiny_text_encoder("tiny-t5")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    ids = tokenizer(["héllo"])["input_ids"][0]
    assert len(ids) == len("héllo".encode()) + 1 and ids[-1] == tokenizer.eos_token_id  # one token per byte + </s>
    model, loaded = load_text_encoder(str(save_tiny_text_encoder(tmp_path / "clip", "tiny-clip")))
    assert type(model).__name__ == "CLIPTextModel" and not any(p.requires_grad for p in model.parameters())
    assert loaded(["abc"])["input_ids"] == build_tiny_text_encoder("tiny-clip")[1](["abc"])["input_ids"]


def test_text_encoder_path_accepts_a_plain_transformers_folder(tmp_path):
    """README's `text_encoder_path=path/to/flan-t5`: a Hub download is one folder (config.json, weights and tokenizer
    files side by side, the whole encoder-decoder for flan-t5), not text_encoder/ + tokenizer/."""
    from transformers import T5ForConditionalGeneration

    encoder, tokenizer = build_tiny_text_encoder("tiny-t5", hidden_size=64, num_layers=1)
    torch.manual_seed(0)
    full = T5ForConditionalGeneration(encoder.config)  # the layout of google/flan-t5-* (decoder included)
    full.save_pretrained(tmp_path / "flan-t5")
    tokenizer.save_pretrained(tmp_path / "flan-t5")
    model, loaded = load_text_encoder(str(tmp_path / "flan-t5"))
    assert type(model).__name__ == "T5EncoderModel"
    for name, value in model.state_dict().items():
        assert torch.equal(value, full.state_dict()[name]), name
    assert loaded(["abc"])["input_ids"] == tokenizer(["abc"])["input_ids"]


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-t5"])
def test_tiny_text_encoders_know_word_order(kind):
    """Swapping the two colours must change the features: a bag-of-bytes encoder (the old tiny-t5, pooled
    cosine 0.99997) made the embedded Infinity swap shape and background colours in 40 of 90 samples."""
    model, tokenizer = build_tiny_text_encoder(kind)
    captions = ["a red circle on a blue background", "a blue circle on a red background"]
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask[..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0) < 0.995
    # the bytes of "red" read differently before " circle" and before " background"
    ids = batch.input_ids.tolist()
    red = tokenizer("red", add_special_tokens=False).input_ids
    start0 = next(i for i in range(len(ids[0])) if ids[0][i : i + len(red)] == red)
    start1 = next(i for i in range(len(ids[1])) if ids[1][i : i + len(red)] == red)
    red0, red1 = hidden[0, start0 : start0 + len(red)], hidden[1, start1 : start1 + len(red)]
    assert torch.nn.functional.cosine_similarity(red0, red1, dim=-1).mean() < 0.99


def test_fixture_text_encoder_folders_load():
    """The reference fixtures' folders have the `text_encoder/` + `tokenizer/` layout `text_encoder_path` expects."""
    clip, _ = load_text_encoder(str(fixture_dir("star") / "text_encoder_sd21_layout"))
    t5, _ = load_text_encoder(str(fixture_dir("infinity")))
    assert type(clip).__name__ == "CLIPTextModel" and type(t5).__name__ == "T5EncoderModel"


def test_bad_text_training_configs(tmp_path, bitwise_vae_dir):
    with pytest.raises(ValueError, match="text_encoder_path"):
        TrainConfig.load(None, ["task=star", "tokenizer_path=x"])
    with pytest.raises(ValueError, match="BitwiseMultiScaleVAE"):
        TrainConfig.load(None, ["task=infinity", "text_encoder_path=tiny-t5"])
    with pytest.raises(ValueError, match="bsc_flip_prob"):
        TrainConfig.load(None, ["task=infinity", "tokenizer_path=x", "text_encoder_path=tiny-t5", "bsc_flip_prob=1.5"])
    with pytest.raises(ValueError, match="cond_drop_rate"):
        TrainConfig.load(None, ["task=star", "tokenizer_path=x", "text_encoder_path=tiny-clip", "cond_drop_rate=-0.1"])
    with pytest.raises(ValueError, match="bsq_inv_temperature"):
        TrainConfig.load(None, ["task=bitwise_tokenizer", "bsq_inv_temperature=0"])
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.load(None, ["task=bitwise_tokenizer", "bsq_commit=1"])
    with pytest.raises(ValueError, match="text_encoder_path.*text_encoder/"):
        train(
            TrainConfig(
                **base_config(
                    tmp_path,
                    task="infinity",
                    tokenizer_path=str(bitwise_vae_dir),
                    text_encoder_path=str(tmp_path),
                    max_steps=1,
                )
            )
        )
    with pytest.raises(ValueError, match="mlp_ratio"):
        train(
            TrainConfig(
                **base_config(
                    tmp_path,
                    task="infinity",
                    tokenizer_path=str(bitwise_vae_dir),
                    text_encoder_path="tiny-t5",
                    model={"depth": 2, "embed_dim": 32, "num_heads": 2},
                    max_steps=1,
                )
            )
        )
    with pytest.raises(ValueError, match="resolution.*supported"):
        train(
            TrainConfig(
                **base_config(tmp_path, task="bitwise_tokenizer", model=BITWISE_MODEL, resolution=24, max_steps=1)
            )
        )
    from diffusers_var.cli import main

    assert main(["train", "star", "tokenizer_path=x"]) == 2  # the ValueError is printed, not raised


def test_infinity_model_errors_name_their_key_before_output_dir_is_made(bitwise_vae_dir, tmp_path, capsys):
    """`model.pool_num_heads=3` was reported as `model.num_heads` (the pooling layer's own check), and a
    `model.num_level_embeddings` below the schedule's scales failed at the first step, after output_dir was made."""
    from diffusers_var.cli import main

    run = tmp_path / "run"
    common = [
        "train",
        "infinity",
        f"tokenizer_path={bitwise_vae_dir}",
        "text_encoder_path=tiny-t5",
        "resolution=16",
        "batch_size=8",
        "max_steps=1",
        f"data={json.dumps(DATA)}",
        'model={"depth": 2, "embed_dim": 64, "num_heads": 2}',
        f"output_dir={run}",
    ]
    for override, message in (
        ("model.pool_num_heads=3", "`model.embed_dim` (64) must be divisible by `model.pool_num_heads` (3)"),
        ("model.num_level_embeddings=3", "`model.num_level_embeddings` (3) must be at least the 7 scales"),
        # a CLIP encoder failed at the first step (its 77 positions, the pipeline's 512 tokens), after output_dir
        ("text_encoder_path=tiny-clip", "`text_encoder_path`: Infinity encodes captions of up to 512 tokens, but"),
        ("bsc_num_scales=8", "`bsc_num_scales` must be in [0, 7]"),  # was clamped to the 7 scales without a word
    ):
        assert main([*common, override]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
        assert not run.exists()


def test_hf_data_names_the_column_the_task_needs(tmp_path, capsys):
    """`data.type=hf` without `data.caption_column` crashed STAR / Infinity with a bare KeyError: 'caption' at the
    first step, after output_dir was made (VAR without `data.label_column` with KeyError: 'class_labels')."""
    from diffusers_var.cli import main

    for task, extra, column in (
        ("star", ["text_encoder_path=tiny-clip"], "caption_column"),
        ("infinity", ["text_encoder_path=tiny-t5"], "caption_column"),
        ("var", [], "label_column"),
    ):
        overrides = [f"task={task}", f"tokenizer_path={tmp_path}", *extra, "data.type=hf", f"data.path={tmp_path}"]
        with pytest.raises(ValueError, match=rf"`data\.{column}` is required for `task: {task}` with `data.type: hf`"):
            TrainConfig.load(None, overrides)
        assert TrainConfig.load(None, [*overrides, f"data.{column}=c"]).data[column] == "c"
    run = tmp_path / "run"
    star = [f"tokenizer_path={tmp_path}", "text_encoder_path=tiny-clip", "data.type=hf", f"data.path={tmp_path}"]
    assert main(["train", "star", *star, f"output_dir={run}"]) == 2
    assert "`data.caption_column` is required" in capsys.readouterr().err and not run.exists()


def test_killed_infinity_run_resumes_to_identical_weights(bitwise_vae_dir, tmp_path):
    """Bitwise Self-Correction draws from the numpy RNG and text dropout from torch's: both are restored."""
    from safetensors.torch import load_file

    from test_training import _run_cli

    straight = base_config(
        tmp_path / "straight",
        task="infinity",
        tokenizer_path=str(bitwise_vae_dir),
        text_encoder_path="tiny-t5",
        max_steps=4,
        checkpoint_every=2,
        learning_rate=3e-3,
        bsc_flip_prob=0.3,
        cond_drop_rate=0.5,
        ema_decay=0.9,
        model={"depth": 2, "embed_dim": 64, "num_heads": 2},
        data={**DATA, "num_images": 16},
    )
    interrupted = {**straight, "output_dir": str(tmp_path / "interrupted")}
    assert _run_cli(straight, tmp_path / "a.json").returncode == 0
    assert _run_cli(interrupted, tmp_path / "b.json", fault="step:3").returncode != 0
    resumed = _run_cli(interrupted, tmp_path / "b.json")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr
    a = load_file(tmp_path / "straight" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "interrupted" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_bsq_straight_through_passes_reconstruction_gradients_to_the_encoder():
    """The multi-scale BSQ forward is the hard code, its backward the identity: the reconstruction loss must
    reach the encoder (a missing detach once made this gradient exactly zero)."""
    from diffusers_var import BitwiseMultiScaleVAE

    torch.manual_seed(0)
    vae = BitwiseMultiScaleVAE(
        base_channels=32, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], num_res_blocks=1, codebook_dim=8
    )
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, encoded = vae(images, [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)])
    torch.nn.functional.mse_loss(recon, images).backward()
    grad = vae.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # the forward value is still the hard code: the sum over scales of upsampled +-1/sqrt(d) codes
    torch.testing.assert_close(encoded.quantized.detach(), vae.codes_from_bit_labels(encoded.bit_labels))


def test_new_infinity_models_pool_the_text_with_the_originals_head_size():
    """The original's text pooling has heads of 128 features, of 64 in models wider than 4,096 (infinity_20b: 2,048
    T5 features are 32 heads there, not 16); a config's own ``pool_num_heads`` is kept."""
    from diffusers_var.training.tasks import _original_pool_heads

    for width, heads in ((2048, 16), (4096, 16), (4608, 32)):
        model_args = {"embed_dim": width}
        _original_pool_heads(model_args, 2048)
        assert model_args["pool_num_heads"] == heads, width
    model_args = {}  # the model's default width (2,048)
    _original_pool_heads(model_args, 32)
    assert model_args["pool_num_heads"] == 1
    model_args = {"embed_dim": 4608, "pool_num_heads": 4}
    _original_pool_heads(model_args, 2048)
    assert model_args["pool_num_heads"] == 4
