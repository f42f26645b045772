"""Editing pipelines: LazyDiffusion and the full-canvas baselines, one call signature for all."""
from .blending import BLEND_MODES, blend
from .diffusers_inpaint import DiffusersInpaintAdapter
from .editing import EditPipelineOutput
from .pipeline_lazy_diffusion import LazyDiffusionPipeline
from .pipeline_regenerate import RegenerateCropPipeline, RegenerateImagePipeline

__all__ = ["LazyDiffusionPipeline", "RegenerateImagePipeline", "RegenerateCropPipeline", "DiffusersInpaintAdapter",
           "EditPipelineOutput", "blend", "BLEND_MODES"]
