"""Pasting generated pixels back into the canvas, inside the *pixel* mask only.

Every mode leaves each pixel outside the mask bit-identical to the input; they differ in how the
seam is hidden:

- ``hard``: generated pixels inside the mask, as they are.
- ``feather``: an alpha ramp that runs from the mask border inwards over ``feather_radius`` pixels.
- ``poisson``: gradient-domain (seamless) cloning, as the paper uses: inside the mask, solve
  ``Δf = Δg`` with ``f = original`` on the border, so colour shifts at the seam disappear.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

BLEND_MODES = ("hard", "feather", "poisson")


def default_feather_radius(shape) -> float:
    return max(2.0, round(0.03 * min(shape[:2])))


def feather_alpha(mask: np.ndarray, radius: Optional[float] = None) -> np.ndarray:
    """Alpha in [0, 1]: 0 outside the mask, rising to 1 at ``radius`` pixels inside it."""
    from scipy.ndimage import distance_transform_edt

    radius = default_feather_radius(mask.shape) if radius is None else float(radius)
    if radius <= 0 or mask.all():  # a mask covering everything has no seam to hide
        return mask.astype(np.float32)
    dist = distance_transform_edt(mask)  # distance to the nearest unmasked pixel, >= 1 inside
    return np.clip(dist / radius, 0.0, 1.0).astype(np.float32)


def poisson_blend(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seamless cloning of ``generated`` into ``original`` over ``mask`` (H, W, C) float arrays."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import factorized

    if mask.all():  # no border to match: the system would be singular; the generated image is the answer
        return generated.astype(np.float64)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    n = ys.size
    index = np.full((h, w), -1, dtype=np.int64)
    index[ys, xs] = np.arange(n)
    orig = original.astype(np.float64)
    gen = generated.astype(np.float64)
    diag = np.zeros(n)
    rhs = np.zeros((n, orig.shape[2]))
    rows, cols = [], []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)  # off-canvas neighbours: no constraint
        p = np.nonzero(inside)[0]
        qy, qx = ny[p], nx[p]
        diag[p] += 1
        rhs[p] += gen[ys[p], xs[p]] - gen[qy, qx]  # guidance field: the generated image's gradients
        q = index[qy, qx]
        unknown = q >= 0
        rows.append(p[unknown])
        cols.append(q[unknown])
        rhs[p[~unknown]] += orig[qy[~unknown], qx[~unknown]]  # Dirichlet border: the original
    rows = np.concatenate(rows + [np.arange(n)])
    cols = np.concatenate(cols + [np.arange(n)])
    vals = np.concatenate([-np.ones(rows.size - n), diag])
    solve = factorized(coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsc())
    out = orig.copy()
    for c in range(orig.shape[2]):
        out[ys, xs, c] = solve(rhs[:, c])
    return out


def mask_bbox(mask: np.ndarray, border: int = 0):
    """Bounding box (y0, y1, x0, x1) of a non-empty (H, W) bool mask, grown by ``border`` pixels and
    clipped to the canvas. Row/column ``any`` instead of ``nonzero``: a few ms less at 1024²."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return (max(rows[0] - border, 0), min(rows[-1] + 1 + border, mask.shape[0]),
            max(cols[0] - border, 0), min(cols[-1] + 1 + border, mask.shape[1]))


def paste_masked(dst: np.ndarray, src: np.ndarray, mask: np.ndarray, box=None) -> None:
    """``dst[mask] = src[mask]`` in place, touching only the mask's bounding box (``box`` if known).
    A masked copy instead of boolean indexing, which gathers and scatters every pixel (~20 ms at 1024²)."""
    y0, y1, x0, x1 = mask_bbox(mask) if box is None else box
    m = mask[y0:y1, x0:x1]
    np.copyto(dst[y0:y1, x0:x1], src[y0:y1, x0:x1], where=m[..., None] if dst.ndim == 3 else m)


def blend(original: np.ndarray, generated: np.ndarray, mask: np.ndarray, mode: str = "feather",
          feather_radius: Optional[float] = None) -> np.ndarray:
    """Paste ``generated`` into ``original`` (H, W, C uint8) inside ``mask`` (H, W bool) -> uint8."""
    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {mode!r}; choose one of {BLEND_MODES}")
    out = original.copy()
    if not mask.any():
        return out
    # Work on the mask's bounding box (plus a 1-px border for the Poisson boundary) only.
    y0, y1, x0, x1 = box = mask_bbox(mask, border=1)
    if mode == "hard":
        paste_masked(out, generated, mask, box)
        return out
    m = mask[y0:y1, x0:x1]
    o = original[y0:y1, x0:x1].astype(np.float32)
    g = generated[y0:y1, x0:x1].astype(np.float32)
    if mode == "feather":
        a = feather_alpha(m, feather_radius)[..., None]
        res = a * g + (1 - a) * o
    else:
        res = poisson_blend(o, g, m)
    res = np.clip(np.rint(res), 0, 255).astype(np.uint8)
    np.copyto(out[y0:y1, x0:x1], res, where=m[..., None])
    return out
