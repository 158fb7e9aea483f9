from .code import convert_code_checkpoint
from .common import ConversionError, atomic_save_pipeline, check_output_dir, load_checkpoint
from .infinity import convert_bitwise_vae, convert_infinity_checkpoint, convert_infinity_transformer
from .star import convert_star_checkpoint, convert_star_transformer
from .var import convert_vae, convert_var_checkpoint, convert_var_transformer

__all__ = [
    "ConversionError",
    "atomic_save_pipeline",
    "check_output_dir",
    "convert_bitwise_vae",
    "convert_code_checkpoint",
    "convert_infinity_checkpoint",
    "convert_infinity_transformer",
    "convert_star_checkpoint",
    "convert_star_transformer",
    "convert_vae",
    "convert_var_checkpoint",
    "convert_var_transformer",
    "load_checkpoint",
]
