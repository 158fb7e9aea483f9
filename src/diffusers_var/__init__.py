"""diffusers-var: next-scale-prediction image generators (VAR, STAR, Infinity) as diffusers components.

Importing this package makes its classes resolvable by ``model_index.json``, so
``VARPipeline.from_pretrained(folder)`` (likewise STAR / Infinity) works after ``import diffusers_var``.
"""

__version__ = "0.1.0"

from .embedded_models import embedded_pipeline
from .models.bitwise_vae import BitwiseMultiScaleVAE
from .models.infinity_transformer import InfinityTransformer2DModel
from .models.multiscale_vq import MultiScaleVQModel
from .models.star_transformer import STARTransformer2DModel
from .models.var_transformer import VARTransformer2DModel
from .pipelines.fast_inference import use_compile_cache
from .pipelines.pipeline_infinity import InfinityImg2ImgPipeline, InfinityInpaintPipeline, InfinityPipeline
from .pipelines.pipeline_star import STARImg2ImgPipeline, STARInpaintPipeline, STARPipeline
from .pipelines.pipeline_var import VARCoDePipeline, VARImg2ImgPipeline, VARInpaintPipeline, VARPipeline

__all__ = [
    "MultiScaleVQModel",
    "BitwiseMultiScaleVAE",
    "VARTransformer2DModel",
    "STARTransformer2DModel",
    "InfinityTransformer2DModel",
    "VARPipeline",
    "VARCoDePipeline",
    "STARPipeline",
    "InfinityPipeline",
    "VARInpaintPipeline",
    "STARInpaintPipeline",
    "InfinityInpaintPipeline",
    "VARImg2ImgPipeline",
    "STARImg2ImgPipeline",
    "InfinityImg2ImgPipeline",
    "use_compile_cache",
    "embedded_pipeline",
]
