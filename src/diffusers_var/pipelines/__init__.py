from .pipeline_infinity import InfinityPipeline
from .pipeline_star import STARPipeline
from .pipeline_var import VARPipeline

__all__ = ["VARPipeline", "STARPipeline", "InfinityPipeline"]
