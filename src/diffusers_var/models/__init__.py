from .bitwise_vae import BitwiseMultiScaleVAE
from .infinity_transformer import InfinityTransformer2DModel
from .multiscale_vq import MultiScaleVQModel
from .star_transformer import STARTransformer2DModel
from .var_transformer import VARTransformer2DModel

__all__ = [
    "MultiScaleVQModel",
    "BitwiseMultiScaleVAE",
    "VARTransformer2DModel",
    "STARTransformer2DModel",
    "InfinityTransformer2DModel",
]
