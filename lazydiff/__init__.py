"""LazyDiffusion: a diffusion transformer for interactive image editing whose cost scales with the
edited region instead of the canvas (Nitzan et al., arXiv 2404.12382).

Stage 1, :class:`ContextEncoder`, runs once per canvas + mask over the whole canvas; stage 2,
:class:`LazyDecoder`, runs at every denoising step on the hole tokens only.
"""
from .models import (ContextEncoder, FullCanvasDecoder, LazyDecoder, full_canvas_decoder_from_pixart,
                     lazy_decoder_from_pixart)
from .pipelines import (DiffusersInpaintAdapter, EditPipelineOutput, LazyDiffusionPipeline, RegenerateCropPipeline,
                        RegenerateImagePipeline)

from .defaults import load_default

__version__ = "0.1.0"

__all__ = ["ContextEncoder", "LazyDecoder", "FullCanvasDecoder", "lazy_decoder_from_pixart",
           "full_canvas_decoder_from_pixart", "LazyDiffusionPipeline", "RegenerateImagePipeline",
           "RegenerateCropPipeline", "DiffusersInpaintAdapter", "EditPipelineOutput", "load_default"]
