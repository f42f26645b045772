"""LazyDiffusion: a diffusion transformer for interactive image editing whose cost scales with the
edited region instead of the canvas (Nitzan et al., arXiv 2404.12382).

Stage 1, :class:`ContextEncoder`, runs once per canvas + mask over the whole canvas; stage 2,
:class:`LazyDecoder`, runs at every denoising step on the hole tokens only.
"""
from importlib import import_module

__version__ = "0.1.0"

# Imported on first use: `python -m lazydiff.shapesworld` and the training data workers need neither
# diffusers nor transformers, which take seconds to import.
_EXPORTS = {
    "ContextEncoder": ".models", "LazyDecoder": ".models", "FullCanvasDecoder": ".models",
    "lazy_decoder_from_pixart": ".models", "full_canvas_decoder_from_pixart": ".models",
    "LazyDiffusionPipeline": ".pipelines", "RegenerateImagePipeline": ".pipelines",
    "RegenerateCropPipeline": ".pipelines", "DiffusersInpaintAdapter": ".pipelines",
    "EditPipelineOutput": ".pipelines", "load_default": ".defaults", "load_pipeline": ".defaults",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lazydiff' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
