from .multiscale_vq import MultiScaleVQModel
from .var_transformer import VARTransformer2DModel

__all__ = ["MultiScaleVQModel", "VARTransformer2DModel"]
