from .pipeline_var import VARPipeline

__all__ = ["VARPipeline"]
