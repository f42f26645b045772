"""Editing a canvas larger than the model works at: downscale it, edit, paste the hole back at full size.

The model edits at most ``max_side`` pixels on a side; only the masked region of its result is upscaled
and pasted into the full-resolution canvas, so every pixel outside the mask keeps its original value
and resolution. Used by the CLI (``--max-side``) and the demo (``LAZYDIFF_MAX_SIDE``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import PIL.Image

from .blending import blend


def working_size(h: int, w: int, max_side: int) -> Tuple[int, int]:
    """(h, w) the model works at: the canvas, or downscaled so its longer side is ``max_side``."""
    if not max_side or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(8, int(round(h * s))), max(8, int(round(w * s)))


def downscale_edit(image: np.ndarray, mask: np.ndarray, sketch: Optional[np.ndarray], max_side: int):
    """-> (image, mask, sketch, scale) at the working size. ``image`` (H, W[, C]) uint8, ``mask`` (H, W) bool,
    ``sketch`` (H, W, 4) RGBA strokes or None. The working mask covers every full-resolution hole pixel
    (any coverage counts), so the pasted region is generated everywhere it is needed."""
    h, w = mask.shape
    wh, ww = working_size(h, w, max_side)
    if (wh, ww) == (h, w):
        return image, mask, sketch, 1.0
    small = np.asarray(PIL.Image.fromarray(image).resize((ww, wh), PIL.Image.LANCZOS))
    cover = np.asarray(PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize((ww, wh), PIL.Image.BOX))
    small_sketch = None
    if sketch is not None:
        small_sketch = np.asarray(PIL.Image.fromarray(sketch, "RGBA").resize((ww, wh), PIL.Image.BOX)).copy()
        small_sketch[..., 3] = np.where(small_sketch[..., 3] > 0, 255, 0)   # strokes stay strokes
    return small, cover > 0, small_sketch, ww / w


def paste_back(original: np.ndarray, mask: np.ndarray, edited: np.ndarray, scale: float,
               blend_mode: str = "feather") -> np.ndarray:
    """The full-resolution result: ``edited`` (working size) upscaled and pasted into ``original`` inside the
    full-resolution ``mask`` only (``blend_mode`` at the seam)."""
    if scale == 1.0 and edited.shape[:2] == original.shape[:2]:
        out = original.copy()
        out[mask] = edited[mask]
        return out
    h, w = mask.shape
    up = np.asarray(PIL.Image.fromarray(edited).resize((w, h), PIL.Image.BICUBIC))
    squeeze = original.ndim == 2
    out = blend(original[..., None] if squeeze else original, up[..., None] if squeeze else up, mask, blend_mode)
    return out[..., 0] if squeeze else out
