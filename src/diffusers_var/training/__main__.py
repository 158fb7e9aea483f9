"""``python -m diffusers_var.training TASK --config FILE [key=value ...]`` (also under ``accelerate launch -m``)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
