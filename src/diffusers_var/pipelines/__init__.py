from .pipeline_infinity import InfinityImg2ImgPipeline, InfinityInpaintPipeline, InfinityPipeline
from .pipeline_star import STARImg2ImgPipeline, STARInpaintPipeline, STARPipeline
from .pipeline_var import VARImg2ImgPipeline, VARInpaintPipeline, VARPipeline

__all__ = ["VARPipeline", "STARPipeline", "InfinityPipeline", "VARInpaintPipeline", "STARInpaintPipeline",
           "InfinityInpaintPipeline", "VARImg2ImgPipeline", "STARImg2ImgPipeline", "InfinityImg2ImgPipeline"]
