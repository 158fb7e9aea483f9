from .pipeline_infinity import InfinityPipeline
from .pipeline_var import VARPipeline

__all__ = ["VARPipeline", "InfinityPipeline"]
