from .common import ConversionError, atomic_save_pipeline, load_checkpoint
from .var import convert_var_checkpoint, convert_var_transformer, convert_vae

__all__ = ["ConversionError", "atomic_save_pipeline", "load_checkpoint", "convert_var_checkpoint", "convert_var_transformer", "convert_vae"]
