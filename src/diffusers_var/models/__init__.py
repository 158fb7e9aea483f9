from .multiscale_vq import MultiScaleVQModel
from .star_transformer import STARTransformer2DModel
from .var_transformer import VARTransformer2DModel

__all__ = ["MultiScaleVQModel", "VARTransformer2DModel", "STARTransformer2DModel"]
