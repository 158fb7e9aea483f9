"""diffusers-var: next-scale-prediction image generators (VAR, STAR, Infinity) as diffusers components.

Importing this package makes its classes resolvable by ``model_index.json``, so
``VARPipeline.from_pretrained(folder)`` works after ``import diffusers_var``.
"""

__version__ = "0.1.0"

from .models.multiscale_vq import MultiScaleVQModel
from .models.star_transformer import STARTransformer2DModel
from .models.var_transformer import VARTransformer2DModel
from .pipelines.pipeline_star import STARPipeline
from .pipelines.pipeline_var import VARPipeline

__all__ = ["MultiScaleVQModel", "VARTransformer2DModel", "VARPipeline", "STARTransformer2DModel", "STARPipeline"]
