"""Frozen text encoders for STAR / Infinity training.

``text_encoder_path`` in a training config is either

* a folder with a transformers text encoder in ``text_encoder/`` and its tokenizer in ``tokenizer/`` (the
  layout of a STAR / Infinity pipeline folder, of Stable-Diffusion-2.x's ``CLIP/`` folder, and of the test
  fixtures), e.g. a downloaded ``openai/clip-vit-large-patch14`` saved that way, or a ``flan-t5`` encoder;
* a plain transformers model folder holding the model and its tokenizer side by side, as downloaded from the Hub
  (``google/flan-t5-xl``: only its encoder is used; ``openai/clip-vit-large-patch14``: only its text model);
  the encoder class follows ``config.json``'s ``model_type``: ``clip_text_model`` / ``clip`` ->
  ``CLIPTextModel``, ``t5`` / ``mt5`` / ``umt5`` -> ``T5EncoderModel``; or
* ``"tiny-clip"`` / ``"tiny-t5"``: a small, randomly initialised encoder (fixed seed) with a byte-level
  tokenizer (one token per UTF-8 byte, any text), built by :func:`build_tiny_text_encoder`. Its features
  carry no pretrained meaning, but a transformer trained on them learns to read them; it is small enough
  (well under 1 MB in fp16) to ship inside an embedded pipeline folder. The embedded shapes pipelines use it.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TEXT_ENCODERS = ("tiny-clip", "tiny-t5")
BYTE_VOCAB_OFFSET = 4  # <pad>, <unk>, <s>, </s> come first


def _byte_level_tokenizer(max_length: int, with_bos: bool):
    """A fast tokenizer mapping every UTF-8 byte to one token (ids 4..259), plus ``</s>`` (and ``<s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({ch: BYTE_VOCAB_OFFSET + i for i, ch in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    template = "<s> $A </s>" if with_bos else "$A </s>"
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_length,
    )


def build_tiny_text_encoder(
    kind: str = "tiny-clip", hidden_size: int = 128, num_layers: int = 2, max_length: int = 77, seed: int = 0
):
    """A deterministic random text encoder + byte-level tokenizer: ``(text_encoder, tokenizer)``.

    ``tiny-clip``: ``CLIPTextModel`` (causal, pooled output = the ``</s>`` state) as STAR uses;
    ``tiny-t5``: ``T5EncoderModel`` as Infinity uses. Same seed -> same weights on every machine.
    """
    if kind not in TINY_TEXT_ENCODERS:
        raise ValueError(f"`text_encoder_path`: built-in encoders are {TINY_TEXT_ENCODERS}, got {kind!r}.")
    tokenizer = _byte_level_tokenizer(max_length, with_bos=kind == "tiny-clip")
    vocab_size = len(tokenizer)
    fork = torch.random.fork_rng(devices=[])  # leave the caller's RNG untouched
    with fork:
        torch.manual_seed(seed)
        if kind == "tiny-clip":
            from transformers import CLIPTextConfig, CLIPTextModel

            config = CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=max(1, hidden_size // 32),
                max_position_embeddings=max_length,
                projection_dim=hidden_size,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            model = CLIPTextModel(config)
        else:
            from transformers import T5Config, T5EncoderModel

            config = T5Config(
                vocab_size=vocab_size,
                d_model=hidden_size,
                d_kv=32,
                d_ff=2 * hidden_size,
                num_layers=num_layers,
                num_heads=max(1, hidden_size // 32),
                feed_forward_proj="gated-gelu",
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            model = T5EncoderModel(config)
            _local_relative_attention_(model)
    return model.eval(), tokenizer


def _local_relative_attention_(model) -> None:
    """Give a random T5 encoder word order. Freshly initialised relative-position biases are tiny, so every
    head averages over the whole caption and the features are a bag of bytes ("red circle on blue" and "blue
    circle on red" encode alike). Here each head reads a fixed window of neighbours (left or right, near or
    far), so a byte's feature carries its context and the order of words survives in the frozen features."""
    from transformers.models.t5.modeling_t5 import T5Attention

    attention = model.encoder.block[0].layer[0].SelfAttention
    config = model.config
    windows = [(-6, -1), (1, 6), (-16, -7), (7, 16)]  # (first, last) relative offset per head, cycled
    offsets = torch.arange(-config.relative_attention_max_distance + 1, config.relative_attention_max_distance)
    buckets = T5Attention._relative_position_bucket(
        offsets,
        bidirectional=True,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )
    bias = torch.zeros_like(attention.relative_attention_bias.weight)  # (buckets, heads)
    for head in range(config.num_heads):
        first, last = windows[head % len(windows)]
        in_window = (offsets >= first) & (offsets <= last)
        bias[buckets[in_window], head] = 8.0
    with torch.no_grad():
        attention.relative_attention_bias.weight.copy_(bias)


def save_tiny_text_encoder(output_dir: str | Path, kind: str = "tiny-clip", **kwargs) -> Path:
    """Write a built-in encoder in the ``text_encoder/`` + ``tokenizer/`` layout (usable as ``text_encoder_path``)."""
    output_dir = Path(output_dir)
    model, tokenizer = build_tiny_text_encoder(kind, **kwargs)
    model.save_pretrained(output_dir / "text_encoder")
    tokenizer.save_pretrained(output_dir / "tokenizer")
    return output_dir


def load_text_encoder(path: str, device=None):
    """``text_encoder_path`` -> ``(text_encoder, tokenizer)``, frozen, in eval mode, on ``device``."""
    if path in TINY_TEXT_ENCODERS:
        model, tokenizer = build_tiny_text_encoder(path)
    else:
        import json

        from transformers import AutoTokenizer

        root = Path(path)
        if (root / "text_encoder" / "config.json").is_file() and (root / "tokenizer").is_dir():
            model_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
        elif (root / "config.json").is_file():  # a plain transformers folder, e.g. google/flan-t5-xl as downloaded
            model_dir = tokenizer_dir = root
        else:
            raise ValueError(
                f"`text_encoder_path`: {path!r} must hold `text_encoder/` (a transformers model) and "
                f"`tokenizer/`, or be a transformers model folder with its tokenizer (config.json, "
                f"tokenizer files), or one of {TINY_TEXT_ENCODERS}."
            )
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
        if model_type in ("clip_text_model", "clip"):
            from transformers import CLIPTextModel as model_class
        elif model_type in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel as model_class
        else:
            raise ValueError(f"`text_encoder_path`: unsupported text encoder type {model_type!r} (CLIP or T5).")
        try:
            model = model_class.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as err:
            message = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(
                f"`text_encoder_path`: cannot load a {model_class.__name__} from {str(model_dir)!r} "
                f"({type(err).__name__}: {message})."
            ) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"`text_encoder_path`: no usable tokenizer in {str(tokenizer_dir)!r} ({err}).") from None
    # float32 as the pipelines compute text features (transformers 5 would keep a float16 checkpoint in float16)
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False), tokenizer


def text_hidden_size(text_encoder) -> int:
    config = text_encoder.config
    return int(getattr(config, "hidden_size", None) or config.d_model)
