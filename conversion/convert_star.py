#!/usr/bin/env python
"""Convert original STAR checkpoints (Davinci-XLab/STAR-T2I) into a diffusers folder.

    python conversion/convert_star.py --vae vae_ch160v4096z32.pth \
        --transformer star_rope_d30_1024_drop_3-ar-ckpt-ep1-iter21000.pth --text-encoder CLIP --output star-1024

The transformer file is a training snapshot: only ckpt['trainer']['var_wo_ddp'] is read (optimizer state and
the VAE copy are ignored). Depth, width, heads, text width, cross-attention / RoPE / stable-sampler head and
the scale schedule are inferred (the schedule from the snapshot's trainer config, the token count or the
number of scales; --patch-nums 256|512|1024|1,2,3,... overrides). --text-encoder is a folder with
tokenizer/ and text_encoder/ (the SD-2.x CLIP layout STAR ships) or a T5 folder for the T5 ablation.
The output reproduces the released cross-attention batch quirk (cross_attention_row0_quirk=True) unless
--no-row0-quirk is given. Files are read with torch.load(weights_only=True); the output holds safetensors
only and is written atomically.
"""

import argparse
import signal
import sys

if __name__ == "__main__" and hasattr(signal, "pthread_sigmask"):
    # importing torch and diffusers takes seconds: a Ctrl-C meanwhile is held until cli_support.run_interruptible,
    # which ends the run as at any later moment (one line, exit code 130), not with a traceback from an import
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

from diffusers_var import cli_support
from diffusers_var.cli_support import (
    OneLineErrorParser,
    int_in_range,
    name_flags,
    nonblank,
    parser_flags,
    print_error,
)
from diffusers_var.conversion import ConversionError, convert_star_checkpoint
from diffusers_var.conversion.common import (
    OUTPUT_DTYPES,
    POSITIVE,
    add_output_dtype_argument,
    float_arg,
    patch_nums_arg,
)
from diffusers_var.conversion.star import NAMED_PATCH_NUMS


def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vae", required=True, type=nonblank, help="original VQ-VAE checkpoint (vae_ch160v4096z32.pth)"
    )
    parser.add_argument("--transformer", required=True, type=nonblank, help="original STAR training snapshot (.pth)")
    parser.add_argument(
        "--text-encoder", required=True, type=nonblank, help="folder with tokenizer/ and text_encoder/ (SD-2.x CLIP)"
    )
    parser.add_argument("--output", required=True, type=nonblank, help="output folder (diffusers layout)")
    parser.add_argument(
        "--patch-nums",
        type=patch_nums_arg(NAMED_PATCH_NUMS),
        default=None,
        help="256, 512, 1024 or a comma-separated, strictly increasing schedule",
    )
    parser.add_argument(
        "--rope-theta", type=float_arg(POSITIVE), default=10000.0, help="RoPE base, > 0 (10000 in every release)"
    )
    parser.add_argument(
        "--rope-norm",
        type=float_arg(POSITIVE),
        default=64.0,
        help="normalised RoPE extent, > 0 (64 in every release)",
    )
    parser.add_argument("--no-logit-norm", action="store_true", help="no LayerNorm before the head (no release)")
    parser.add_argument(
        "--sampler-start-scale",
        type=int_in_range(1),
        default=None,
        help="first stable-sampler scale, 1 to num_scales - 1 (default 9, or the last scale of a shorter schedule)",
    )
    parser.add_argument(
        "--no-row0-quirk", action="store_true", help="per-row cross-attention (does not match the original)"
    )
    add_output_dtype_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--depth",
        type=int_in_range(1),
        default=None,
        help="the number of transformer blocks the checkpoint must have (a missing block is an error)",
    )
    args = parser.parse_args(argv)
    try:
        pipe = convert_star_checkpoint(
            args.vae,
            args.transformer,
            args.text_encoder,
            args.output,
            patch_nums=args.patch_nums,
            rope_theta=args.rope_theta,
            rope_norm=args.rope_norm,
            logit_norm=not args.no_logit_norm,
            sampler_start_scale=args.sampler_start_scale,
            cross_attention_row0_quirk=not args.no_row0_quirk,
            dtype=OUTPUT_DTYPES[args.dtype],
            overwrite=args.overwrite,
            depth=args.depth,
        )
    except ConversionError as err:  # the library names its arguments (`transformer`); the command its flags
        return print_error(name_flags(str(err), parser_flags(parser)))
    cfg = pipe.transformer.config
    print(
        f"wrote {args.output}: STAR depth {cfg.depth}, width {cfg.embed_dim}, text width {cfg.text_embed_dim}, "
        f"patch_nums {list(cfg.patch_nums)}, stable sampler {cfg.stable_sampler}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli_support.run_interruptible(main))
