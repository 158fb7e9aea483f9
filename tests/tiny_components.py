"""Tiny, deterministic components of every pipeline family, for the test suite (nothing is downloaded).

One function per family returns the keyword arguments of its pipeline (``Pipeline(**components)``), built
from configs after ``torch.manual_seed(seed)``. The tokenizers (and STAR's tiny CLIP text tower) are the
local files of the reference fixtures (``conftest.fixture_dir``: skips, or fails under
DIFFUSERS_VAR_REQUIRE_FIXTURES=1, when they are absent).
"""

from __future__ import annotations

import torch

from conftest import fixture_dir
from diffusers_var import (
    BitwiseMultiScaleVAE,
    InfinityTransformer2DModel,
    MultiScaleVQModel,
    STARTransformer2DModel,
    VARTransformer2DModel,
)

VAR_PATCH_NUMS = (1, 2, 3, 4)  # 8 x 8 images
STAR_PATCH_NUMS = (1, 2, 3, 4)  # 8 x 8 images


def var_components(seed: int = 0, num_classes: int = 10, shared_adaln: bool = False) -> dict:
    """``VARPipeline`` components: ``transformer`` (2 blocks, width 64) and ``vqvae`` (vocabulary 32)."""
    torch.manual_seed(seed)
    vqvae = MultiScaleVQModel(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, vocab_size=32, z_channels=8, patch_nums=VAR_PATCH_NUMS
    )
    transformer = VARTransformer2DModel(
        num_classes=num_classes,
        depth=2,
        embed_dim=64,
        num_heads=2,
        vocab_size=32,
        latent_channels=8,
        patch_nums=VAR_PATCH_NUMS,
        shared_adaln=shared_adaln,
    )
    transformer.init_weights(init_adaln_gamma=0.1)
    return {"transformer": transformer.eval(), "vqvae": vqvae.eval()}


def code_components(seed: int = 0, num_classes: int = 10, draft_steps: int = 2) -> dict:
    """``VARCoDePipeline`` components: the ``transformer`` (drafter) and ``vqvae`` of :func:`var_components` and a
    narrower, shallower ``refiner`` (1 block, width 32) on the same tokenizer."""
    components = var_components(seed=seed, num_classes=num_classes)
    refiner = VARTransformer2DModel(
        num_classes=num_classes,
        depth=1,
        embed_dim=32,
        num_heads=1,
        vocab_size=32,
        latent_channels=8,
        patch_nums=VAR_PATCH_NUMS,
    )
    refiner.init_weights(init_adaln_gamma=0.1)
    return {**components, "refiner": refiner.eval(), "draft_steps": draft_steps}


def star_text_components():
    """STAR's text tower: the tiny local CLIP (SD-2.x folder layout) of the STAR fixtures, as
    ``(tokenizer, text_encoder)``."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = fixture_dir("star") / "text_encoder_sd21_layout"
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return tokenizer, CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()


def star_components(
    seed: int = 0,
    patch_nums=STAR_PATCH_NUMS,
    stable_sampler: bool = True,
    sampler_start_scale: int = 2,
    quirk: bool = False,
    text=None,
) -> dict:
    """``STARPipeline`` components: ``transformer`` (3 blocks, width 32; with the stable-sampler head when
    ``stable_sampler``), ``vqvae`` (vocabulary 64), ``text_encoder`` and ``tokenizer`` (``text``: a
    ``(tokenizer, text_encoder)`` pair to reuse, default :func:`star_text_components`)."""
    torch.manual_seed(seed)
    tokenizer, text_encoder = text or star_text_components()
    vqvae = MultiScaleVQModel(
        ch=32, ch_mult=(1, 1), num_res_blocks=1, vocab_size=64, z_channels=8, patch_nums=patch_nums
    )
    transformer = STARTransformer2DModel(
        depth=3,
        embed_dim=32,
        num_heads=2,
        vocab_size=64,
        latent_channels=8,
        patch_nums=patch_nums,
        text_embed_dim=text_encoder.config.hidden_size,
        num_legacy_classes=10,
        stable_sampler=stable_sampler,
        sampler_start_scale=sampler_start_scale,
        cross_attention_row0_quirk=quirk,
    )
    transformer.init_weights(init_head=1.0)
    with torch.no_grad():  # give the zero-initialised biases and the heads some spread
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {
        "transformer": transformer.eval(),
        "vqvae": vqvae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }


def infinity_components(seed: int = 0, spatial_patchify: bool = False) -> dict:
    """``InfinityPipeline`` components: ``transformer`` (2 blocks, width 64), ``vae`` (codebook_dim 4), a random
    1-layer ``text_encoder`` (T5, d_model 32) and the fixtures' T5 ``tokenizer``."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    # a pipeline's parts agree on the text length: the releases' tokenizer and transformer both take 512 tokens
    tokenizer = AutoTokenizer.from_pretrained(fixture_dir("infinity") / "tokenizer", legacy=True, model_max_length=24)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=128, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu"
        )
    ).eval()
    vae = BitwiseMultiScaleVAE(
        base_channels=24,
        encoder_ch_mult=[1, 1],
        decoder_ch_mult=[1, 1],
        num_res_blocks=1,
        codebook_dim=4,
        spatial_patchify=spatial_patchify,
    ).eval()
    transformer = InfinityTransformer2DModel(
        bits_per_token=vae.bits_per_token,
        text_dim=32,
        text_max_length=32,  # the diffusers battery's prompt has 28 tokens here
        pool_num_heads=2,
        depth=2,
        embed_dim=64,
        num_heads=2,
        block_chunks=2,
    ).eval()
    # AdaLN multipliers larger than the original trainer's (1e-3 / 5e-6): a random tiny model whose text and guidance
    # visibly change its images
    transformer.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
