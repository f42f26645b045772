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

MAX_SIDE_FACTOR = 4  # past this many times the model's training side, the model works out of its range


def default_max_side(pipe) -> int:
    """``MAX_SIDE_FACTOR`` x the side (pixels) the pipeline's decoder was trained at; 0 when it does not say."""
    native = int(getattr(getattr(pipe, "decoder", None), "config", {}).get("sample_size", 0) or 0)
    return MAX_SIDE_FACTOR * native * int(pipe.vae_scale_factor)


def resize_mask(mask: np.ndarray, th: int, tw: int) -> np.ndarray:
    """(H, W) bool -> (th, tw) bool, smaller or larger: an output pixel is masked if any mask pixel overlaps its
    area, so the resized hole covers the original one. (PIL's BOX filter > 0 misses the cells a pixel only
    grazes: half of all single-pixel holes at 300x200 -> 64x43.)"""
    h, w = mask.shape
    r0, r1 = np.arange(th) * h // th, -(-np.arange(1, th + 1) * h // th)  # [floor, ceil) of each output row's span
    c0, c1 = np.arange(tw) * w // tw, -(-np.arange(1, tw + 1) * w // tw)
    cs = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
    return (cs[r1][:, c1] - cs[r0][:, c1] - cs[r1][:, c0] + cs[r0][:, c0]) > 0


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
    small_sketch = None
    if sketch is not None:
        small_sketch = np.asarray(PIL.Image.fromarray(sketch, "RGBA").resize((ww, wh), PIL.Image.BOX)).copy()
        small_sketch[..., 3] = np.where(resize_mask(sketch[..., 3] > 0, wh, ww), 255, 0)   # strokes stay strokes
    return small, resize_mask(mask, wh, ww), small_sketch, ww / w


def paste_back(original: np.ndarray, mask: np.ndarray, edited: np.ndarray, scale: float,
               blend_mode: str = "feather") -> np.ndarray:
    """The full-resolution result: ``edited`` (working size, ``original``'s channels) upscaled and pasted into
    ``original`` inside the full-resolution ``mask`` only (``blend_mode`` at the seam). An alpha channel (LA,
    RGBA) is opaque inside the mask, as a full-size edit leaves it."""
    if scale == 1.0 and edited.shape[:2] == original.shape[:2]:
        out = original.copy()
        out[mask] = edited[mask]
        return out
    h, w = mask.shape
    up = np.asarray(PIL.Image.fromarray(edited).resize((w, h), PIL.Image.BICUBIC))
    if original.ndim == 2:
        return blend(original[..., None], up[..., None], mask, blend_mode)[..., 0]
    if original.shape[2] not in (2, 4):
        return blend(original, up, mask, blend_mode)
    out = original.copy()
    out[..., :-1] = blend(original[..., :-1], up[..., :-1], mask, blend_mode)
    out[..., -1][mask] = 255
    return out
