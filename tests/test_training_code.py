"""The two VAR training options the embedded CoDe refiner uses: ``data.cache_tokens`` (every image encoded once by the
frozen tokenizer) and ``model.init_from`` / ``model.init_blocks`` (start from a trained VAR of the same width)."""

from __future__ import annotations

import pytest
import torch

from diffusers_var import MultiScaleVQModel, VARPipeline, VARTransformer2DModel
from diffusers_var.shapes import NUM_CLASSES, ShapesDataset
from diffusers_var.training import TrainConfig, train
from diffusers_var.training.tasks import (
    TokenCachedDataset,
    _collate_with_tokens,
    build_task,
    init_from_larger_var_,
)

PATCH_NUMS = [1, 2, 4]


def tiny_var(depth: int, width: int = 32) -> VARTransformer2DModel:
    model = VARTransformer2DModel(
        num_classes=NUM_CLASSES,
        depth=depth,
        embed_dim=width,
        num_heads=2,
        vocab_size=64,
        latent_channels=8,
        patch_nums=PATCH_NUMS,
    )
    model.init_weights()
    return model.eval()


def test_token_cache_and_init_from(tmp_path):
    torch.manual_seed(0)
    tokenizer = MultiScaleVQModel(
        ch=32,
        ch_mult=(1, 1, 1),
        num_res_blocks=1,
        vocab_size=64,
        z_channels=8,
        patch_nums=PATCH_NUMS,
        using_sa=False,
        using_mid_sa=False,
    ).eval()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    source = tiny_var(depth=3)
    source.save_pretrained(tmp_path / "source")

    dataset = ShapesDataset(16, 16, 3)
    cached = TokenCachedDataset(dataset, tokenizer, "cpu")
    with torch.no_grad():
        images = torch.stack([dataset[i]["pixel_values"] for i in range(16)])
        encoded = torch.cat(tokenizer.encode_indices(images), dim=1)
    assert len(cached) == 16 and torch.equal(torch.stack([cached[i]["token_indices"] for i in range(16)]), encoded)
    assert cached[5]["class_labels"] == dataset[5]["class_labels"]

    target = tiny_var(depth=2)
    init_from_larger_var_(target, source, [0, 2])
    assert torch.equal(target.blocks[0].attn.to_qkv.weight, source.blocks[0].attn.to_qkv.weight)
    assert torch.equal(target.blocks[1].ffn.fc1.weight, source.blocks[2].ffn.fc1.weight)
    assert torch.equal(target.head.weight, source.head.weight) and torch.equal(target.pos_embed, source.pos_embed)
    with pytest.raises(ValueError, match="`model.init_blocks`"):
        init_from_larger_var_(target, source, [0])
    with pytest.raises(ValueError, match="`model.init_from`"):
        init_from_larger_var_(tiny_var(depth=2, width=64), source)

    # both through the trainer: a short run starts from the source's weights and exports a pipeline
    config = TrainConfig(
        task="var",
        output_dir=str(tmp_path / "run"),
        tokenizer_path=str(tmp_path / "tokenizer"),
        data={"type": "shapes", "num_images": 16, "seed": 3, "cache_tokens": True},
        resolution=16,
        model={
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "init_from": str(tmp_path / "source"),
            "init_blocks": [0, 2],
        },
        batch_size=8,
        max_steps=2,
        learning_rate=1e-6,
        warmup_steps=1,
        ema_decay=None,
        log_every=1,
        checkpoint_every=100,
        mixed_precision="no",
        seed=0,
    )
    task = build_task(config, "cpu")
    assert isinstance(task.dataset, TokenCachedDataset)
    batch = task.collate([task.dataset[i] for i in range(8)])
    torch.manual_seed(0)  # label dropout draws from the global generator
    cached_loss, _ = task.loss(task.model, batch)
    del batch["token_indices"]  # the same batch, encoded at this step
    torch.manual_seed(0)
    encoded_loss, _ = task.loss(task.model, batch)
    torch.testing.assert_close(cached_loss, encoded_loss)
    pipe = VARPipeline.from_pretrained(train(config))
    assert pipe.transformer.config.depth == 2
    torch.testing.assert_close(pipe.transformer.head.weight, source.head.weight, atol=1e-4, rtol=0)  # barely moved


def test_tokenizer_precision(tmp_path):
    """``tokenizer_precision``: the frozen tokenizer's encoder under autocast, its quantiser in float32; a batch that
    overflows in fp16 is encoded again in float32; bad values name the key."""
    from diffusers_var.training.tasks import _frozen_latent

    torch.manual_seed(0)
    tokenizer = MultiScaleVQModel(
        ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, vocab_size=64, z_channels=8, patch_nums=PATCH_NUMS,
        using_sa=False, using_mid_sa=False,
    ).eval()  # fmt: skip
    dataset = ShapesDataset(16, 16, 3)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(16)])
    with torch.no_grad():
        reference = tokenizer.encode_latent(images)
        tokens = torch.cat(tokenizer.quantize_latent(reference), dim=1)
        assert torch.equal(tokens, torch.cat(tokenizer.encode_indices(images), dim=1))
        low = _frozen_latent(tokenizer.encode_latent, images, "bf16")
        assert low.dtype == torch.float32 and not torch.equal(low, reference)  # the encoder ran in bf16
        agreement = (torch.cat(tokenizer.quantize_latent(low), dim=1) == tokens).float().mean().item()
        assert agreement > 0.8, agreement
        assert torch.equal(_frozen_latent(tokenizer.encode_latent, images, "no"), reference)

        tokenizer.encoder.conv_in.weight.mul_(1e6)  # past fp16's range (65,504): the fallback must take over
        reference = tokenizer.encode_latent(images)
        assert torch.isfinite(reference).all()
        with pytest.warns(UserWarning, match="tokenizer_precision=fp16"):
            assert torch.equal(_frozen_latent(tokenizer.encode_latent, images, "fp16"), reference)

    with pytest.raises(ValueError, match="`tokenizer_precision` must be 'no', 'bf16' or 'fp16'"):
        TrainConfig.load(None, ["task=var", "tokenizer_path=x", "tokenizer_precision=fp8"])
    with pytest.raises(ValueError, match="`tokenizer_precision` applies to the frozen tokenizer"):
        TrainConfig.load(None, ["task=tokenizer", "tokenizer_precision=fp16"])


def test_class_labels_are_checked_on_the_cpu(tmp_path):
    """The VAR task checks each batch's class labels against the model's classes where the batch is made (the
    model's own check skips device tensors in training: it would wait for the GPU at every step)."""
    MultiScaleVQModel(
        ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, vocab_size=64, z_channels=8, patch_nums=PATCH_NUMS,
        using_sa=False, using_mid_sa=False,
    ).save_pretrained(tmp_path / "tokenizer")  # fmt: skip

    def task_with(num_classes: int):
        model = {"depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": num_classes}
        config = TrainConfig(
            task="var", output_dir=str(tmp_path / "run"), tokenizer_path=str(tmp_path / "tokenizer"), resolution=16,
            data={"type": "shapes", "num_images": 16, "seed": 3}, model=model,
        )  # fmt: skip
        return build_task(config, "cpu")

    task = task_with(NUM_CLASSES)
    items = [task.dataset[i] for i in range(8)]
    labels = [int(item["class_labels"]) for item in items]
    assert task.collate(items)["class_labels"].tolist() == labels
    with pytest.raises(ValueError, match=rf"`model.num_classes` \(2\) is below the {NUM_CLASSES} classes"):
        task_with(2)  # fewer classes than the data has: refused when the task is built
    with pytest.raises(ValueError, match=rf"`data`: class label {max(labels)} is outside \[0, 1\]"):
        _collate_with_tokens(items, num_classes=2)  # labels the data's first rows did not show
    items[0] = {**items[0], "class_labels": torch.tensor(-1)}
    with pytest.raises(ValueError, match=r"`data`: class label -1 is outside \[0, 89\]"):
        task.collate(items)
