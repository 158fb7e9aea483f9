#!/usr/bin/env python
"""Convert original Infinity checkpoints (FoundationVision/Infinity) into a diffusers folder.

    python conversion/convert_infinity.py --vae infinity_vae_d32reg.pth --transformer infinity_2b_reg.pth \\
        --text-encoder flan-t5-xl/ --tokenizer flan-t5-xl/ --output infinity-2b

``--transformer`` is a .pth state dict or the sharded directory of Infinity-8B (with its VAE
infinity_vae_d56_f8_14_patchify.pth). Width, depth, heads, chunks, bits, text width, VAE levels and spatial
patchify are inferred from the tensors. Originals are read with torch.load(weights_only=True); the output
holds safetensors only and is written atomically.
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
from diffusers_var.conversion import ConversionError, convert_infinity_checkpoint
from diffusers_var.conversion.common import OUTPUT_DTYPES, add_output_dtype_argument


def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vae", required=True, type=nonblank, help="original BSQ VAE checkpoint, e.g. infinity_vae_d32reg.pth"
    )
    parser.add_argument(
        "--transformer",
        required=True,
        type=nonblank,
        help="infinity_2b_reg.pth, or the infinity_8b_weights/ directory",
    )
    parser.add_argument(
        "--text-encoder",
        required=True,
        type=nonblank,
        help="folder of a transformers T5EncoderModel (google/flan-t5-xl), safetensors",
    )
    parser.add_argument("--tokenizer", required=True, type=nonblank, help="folder of the T5 tokenizer")
    parser.add_argument("--output", required=True, type=nonblank, help="output folder (diffusers layout)")
    parser.add_argument(
        "--level-embed-every-chunk",
        action="store_true",
        help="the original add_lvl_embeding_only_first_block=0 (no release uses it; not visible in the weights)",
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
        pipe = convert_infinity_checkpoint(
            args.vae,
            args.transformer,
            args.text_encoder,
            args.tokenizer,
            args.output,
            level_embed_every_chunk=args.level_embed_every_chunk,
            dtype=OUTPUT_DTYPES[args.dtype],
            overwrite=args.overwrite,
            depth=args.depth,
        )
    except ConversionError as err:  # the library names its arguments (`transformer`); the command its flags
        return print_error(name_flags(str(err), parser_flags(parser)))
    cfg = pipe.transformer.config
    print(
        f"wrote {args.output}: Infinity depth {cfg.depth}, width {cfg.embed_dim}, {cfg.bits_per_token} bits/token, "
        f"VAE d={pipe.vae.config.codebook_dim} (patchify {pipe.vae.config.spatial_patchify})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli_support.run_interruptible(main))
