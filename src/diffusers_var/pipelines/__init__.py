from .pipeline_infinity import InfinityPipeline
from .pipeline_star import STARPipeline
from .pipeline_var import VARCoDePipeline, VARPipeline

__all__ = ["VARPipeline", "VARCoDePipeline", "STARPipeline", "InfinityPipeline"]
