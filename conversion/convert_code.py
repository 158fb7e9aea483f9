#!/usr/bin/env python
"""Convert CoDe checkpoints (czg1225/CoDe: a drafter and a refiner VAR sharing one VQ-VAE) into a diffusers folder.

    python conversion/convert_code.py --vae vae_ch160v4096z32.pth --drafter drafter_8.pth --refiner refiner_8.pth \\
        --draft-steps 8 --output code-d30-d16-n8
    python conversion/convert_code.py --vae vae_ch160v4096z32.pth --drafter var_d30.pth --refiner var_d16.pth \\
        --draft-steps 6 --output code-d30-d16-n6           # training-free CoDe with the VAR releases

Both roles are plain VAR state dicts: depth, width, heads, classes, vocabulary, shared AdaLN and the scale schedule
are inferred from the tensors (``--patch-nums`` where they cannot tell), and the two models must share the VQ-VAE,
the scale schedule and the class set. A role trained with ``attn_l2_norm=False`` does not record its heads:
``--drafter-num-heads`` / ``--refiner-num-heads`` give them (default 64 features a head, as released).
``--draft-steps`` (the N a fine-tuned pair was made for; default num_scales - 2) is stored with the pipeline and is
the default of every call. The output holds safetensors only and is written atomically. Load it with
``diffusers_var.VARCoDePipeline.from_pretrained(DIR)``.
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
from diffusers_var.conversion import ConversionError, convert_code_checkpoint
from diffusers_var.conversion.common import (
    OUTPUT_DTYPES,
    add_output_dtype_argument,
    add_vq_tokenizer_arguments,
    vq_tokenizer_kwargs,
    warnings_as_lines,
)


def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vae", required=True, type=nonblank, help="original VQ-VAE checkpoint, e.g. vae_ch160v4096z32.pth"
    )
    parser.add_argument(
        "--drafter", required=True, type=nonblank, help="the large VAR: drafter_N.pth, or var_d30.pth (training-free)"
    )
    parser.add_argument(
        "--refiner", required=True, type=nonblank, help="the small VAR: refiner_N.pth, or var_d16.pth (training-free)"
    )
    parser.add_argument(
        "--draft-steps",
        type=int,
        default=None,
        help="scales the drafter samples, in [1, num_scales - 1] (default num_scales - 2)",
    )
    parser.add_argument("--output", required=True, type=nonblank, help="output folder (diffusers layout)")
    add_vq_tokenizer_arguments(parser)
    add_output_dtype_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    for role in ("drafter", "refiner"):
        parser.add_argument(
            f"--{role}-depth",
            type=int_in_range(1),
            default=None,
            help=f"the number of blocks the {role} checkpoint must have (a missing block is an error)",
        )
        parser.add_argument(
            f"--{role}-num-heads",
            type=int_in_range(1),
            default=None,
            help=f"the {role}'s attention heads, for a checkpoint trained with attn_l2_norm=False (default: width/64)",
        )
    args = parser.parse_args(argv)
    try:
        with warnings_as_lines():  # a drafter smaller than the refiner: "warning: ... did you swap ...?"
            pipe = convert_code_checkpoint(
                args.vae,
                args.drafter,
                args.refiner,
                args.output,
                draft_steps=args.draft_steps,
                dtype=OUTPUT_DTYPES[args.dtype],
                overwrite=args.overwrite,
                drafter_depth=args.drafter_depth,
                drafter_num_heads=args.drafter_num_heads,
                refiner_depth=args.refiner_depth,
                refiner_num_heads=args.refiner_num_heads,
                **vq_tokenizer_kwargs(args),
            )
    except ConversionError as err:  # the library names its arguments (`transformer`); the command its flags
        return print_error(name_flags(str(err), parser_flags(parser)))
    drafter, refiner = pipe.transformer.config, pipe.refiner.config
    print(
        f"wrote {args.output}: CoDe drafter depth {drafter.depth} / width {drafter.embed_dim}, refiner depth "
        f"{refiner.depth} / width {refiner.embed_dim}, draft_steps {pipe.config.draft_steps} of "
        f"{len(drafter.patch_nums)} scales, {drafter.num_classes} classes, patch_nums {list(drafter.patch_nums)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli_support.run_interruptible(main))
