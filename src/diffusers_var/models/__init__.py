from .bitwise_vae import BitwiseMultiScaleVAE
from .infinity_transformer import InfinityTransformer2DModel
from .multiscale_vq import MultiScaleVQModel
from .var_transformer import VARTransformer2DModel

__all__ = ["MultiScaleVQModel", "VARTransformer2DModel", "BitwiseMultiScaleVAE", "InfinityTransformer2DModel"]
