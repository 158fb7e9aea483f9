from .pipeline_infinity import InfinityImg2ImgPipeline, InfinityInpaintPipeline, InfinityPipeline
from .pipeline_star import STARImg2ImgPipeline, STARInpaintPipeline, STARPipeline
from .pipeline_var import VARCoDePipeline, VARImg2ImgPipeline, VARInpaintPipeline, VARPipeline

__all__ = [
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
]
