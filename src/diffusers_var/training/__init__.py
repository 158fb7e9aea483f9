"""Training with accelerate:
``diffusers-var train tokenizer|bitwise_tokenizer|var|star|infinity --config CONFIG.yaml [key=value ...]``
(``accelerate launch -m diffusers_var.training ...`` for several GPUs)."""

from .engine import TrainConfig, latest_checkpoint, train

__all__ = ["TrainConfig", "latest_checkpoint", "train"]
