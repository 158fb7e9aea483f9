#!/usr/bin/env python
"""Convert original VAR checkpoints (FoundationVision/VAR .pth files) into a diffusers folder.

    python conversion/convert_var.py --vae vae_ch160v4096z32.pth --transformer var_d16.pth --output var-d16-256

Depth, width, heads, classes, vocabulary, shared AdaLN and the scale schedule are inferred from the tensors.
The originals are read with torch.load(weights_only=True); the output holds safetensors only and is written
atomically (a temporary folder renamed into place).
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
from diffusers_var.conversion import ConversionError, convert_var_checkpoint
from diffusers_var.conversion.common import (
    OUTPUT_DTYPES,
    add_output_dtype_argument,
    add_vq_tokenizer_arguments,
    vq_tokenizer_kwargs,
)


def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vae", required=True, type=nonblank, help="original VQ-VAE checkpoint, e.g. vae_ch160v4096z32.pth"
    )
    parser.add_argument(
        "--transformer", required=True, type=nonblank, help="original VAR checkpoint, e.g. var_d16.pth"
    )
    parser.add_argument("--output", required=True, type=nonblank, help="output folder (diffusers layout)")
    add_vq_tokenizer_arguments(parser)
    add_output_dtype_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--depth",
        type=int_in_range(1),
        default=None,
        help="the number of transformer blocks the checkpoint must have (a missing block is an error)",
    )
    parser.add_argument(
        "--num-heads",
        type=int_in_range(1),
        default=None,
        help="the attention's heads, for a checkpoint trained with attn_l2_norm=False (default: width / 64)",
    )
    args = parser.parse_args(argv)
    try:
        pipe = convert_var_checkpoint(
            args.vae,
            args.transformer,
            args.output,
            dtype=OUTPUT_DTYPES[args.dtype],
            overwrite=args.overwrite,
            depth=args.depth,
            num_heads=args.num_heads,
            **vq_tokenizer_kwargs(args),
        )
    except ConversionError as err:  # the library names its arguments (`transformer`); the command its flags
        return print_error(name_flags(str(err), parser_flags(parser)))
    cfg = pipe.transformer.config
    print(
        f"wrote {args.output}: VAR depth {cfg.depth}, width {cfg.embed_dim}, {cfg.num_classes} classes, "
        f"patch_nums {list(cfg.patch_nums)}, shared AdaLN {cfg.shared_adaln}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli_support.run_interruptible(main))
