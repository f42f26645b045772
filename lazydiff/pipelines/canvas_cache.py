"""Encode a crop of the canvas as if the VAE encoder saw the whole canvas.

The incremental canvas-latent cache (:meth:`EditPipelineMixin.masked_canvas_latents`) re-encodes only
crops around the pixels that changed and pastes them into the cached latent. A plain crop encode
differs from the full encode by more than boundary effects: an ``AutoencoderKL`` encoder normalises
with **GroupNorm over the whole image** and its mid block runs **self-attention over every latent
position**, so a crop sees other statistics and fewer keys. We therefore record, during each full
encode and for every encoder GroupNorm, the per-group sums of x and x² **per latent cell**, and the
keys/values of the encoder's attention layers. A crop encode then normalises each layer with the
statistics of the *whole new canvas* (recorded sums outside the refreshed region + the crop's own
sums inside it) and attends over the recorded keys/values with the crop's fresh ones inside the
refreshed region; the record is updated with the fresh values, so it always describes the current
canvas (SIGE-style incremental statistics). What remains is the crop's boundary effect on the
activations of the refreshed region, kept small by the context margin. Which crops: :func:`refresh_boxes`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Box = Tuple[int, int, int, int]  # (y0, y1, x0, x1) in latent cells


def refresh_boxes(changed: np.ndarray, scale: int, paste_margin: int, context_margin: int) -> List[Tuple[Box, Box]]:
    """Latent-cell boxes the incremental canvas cache re-encodes for changed pixels ``changed`` (Hp, Wp)
    bool, with a VAE of ``scale``x downsampling.

    -> [(paste box, crop box)], each (y0, y1, x0, x1) in latent cells: the paste box covers the changed
    cells plus ``paste_margin``; the crop box adds ``context_margin`` cells of context for the encoder.
    Boxes whose crops overlap are merged."""
    hp, wp = changed.shape
    h, w = hp // scale, wp // scale
    cells = changed.reshape(h, scale, w, scale).any(axis=(1, 3))
    pm, cm = int(paste_margin), int(context_margin)

    def grow(b, m):
        return (max(b[0] - m, 0), min(b[1] + m, h), max(b[2] - m, 0), min(b[3] + m, w))

    from scipy import ndimage

    labels, _ = ndimage.label(cells)
    boxes = [grow((sl[0].start, sl[0].stop, sl[1].start, sl[1].stop), pm) for sl in ndimage.find_objects(labels)]

    def overlap(a, b):
        a, b = grow(a, cm), grow(b, cm)
        return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]

    merged = []  # merge boxes whose crops overlap, until none do
    while boxes:
        box = boxes.pop()
        hit = next((i for i, other in enumerate(merged) if overlap(box, other)), None)
        if hit is None:
            merged.append(box)
        else:  # the union may now overlap others: put it back in the queue
            other = merged.pop(hit)
            boxes.append((min(box[0], other[0]), max(box[1], other[1]), min(box[2], other[2]), max(box[3], other[3])))
    return [(b, grow(b, cm)) for b in merged]


def crop_cells(boxes: List[Tuple[Box, Box]]) -> int:
    """Latent cells the crops of :func:`refresh_boxes` cover (what a partial re-encode encodes)."""
    return sum((c[1] - c[0]) * (c[3] - c[2]) for _, c in boxes)


@dataclass
class EncoderRecord:
    """What one full encode saw: GroupNorm statistics and attention keys/values, by module name."""

    latent_size: Tuple[int, int]
    cells: Dict[str, Tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)  # (sum x, sum x², n per cell)
    kv: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)                 # {"k"|"v": (B, h, w, C)}
    attn_grid: Dict[str, Tuple[int, int]] = field(default_factory=dict)


def _attention_modules(encoder: nn.Module):
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in encoder.named_modules() if isinstance(m, Attention)]


def supported(vae) -> bool:
    """Only diffusers ``AutoencoderKL``-style encoders (``vae.encoder`` with GroupNorms) are handled."""
    return isinstance(getattr(vae, "encoder", None), nn.Module)


@contextlib.contextmanager
def record_encoder(vae, latent_size: Tuple[int, int]) -> Iterator[EncoderRecord]:
    """Hooks that record GroupNorm statistics and attention keys/values during a full encode. The
    encode's numerics are unchanged (the hooks only read)."""
    rec = EncoderRecord(latent_size=tuple(latent_size))
    handles, patched = [], []
    for name, m in vae.encoder.named_modules():
        if isinstance(m, nn.GroupNorm):
            m.forward = _recording_group_norm(m, name, rec)
            patched.append(m)
    for name, attn in _attention_modules(vae.encoder):
        def grid_hook(mod, args, kwargs, name=name):
            x = args[0] if args else kwargs["hidden_states"]
            if x.ndim == 4:
                rec.attn_grid[name] = (int(x.shape[-2]), int(x.shape[-1]))
        handles.append(attn.register_forward_pre_hook(grid_hook, with_kwargs=True))
        for which, lin in (("k", attn.to_k), ("v", attn.to_v)):
            def kv_hook(mod, args, out, name=name, which=which):
                grid = rec.attn_grid.get(name)
                if grid is not None and out.ndim == 3 and out.shape[1] == grid[0] * grid[1]:
                    rec.kv.setdefault(name, {})[which] = out.detach().reshape(out.shape[0], grid[0], grid[1], -1).clone()
            handles.append(lin.register_forward_hook(kv_hook))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward


def _cell_sums(x: torch.Tensor, groups: int, grid: Tuple[int, int]):
    """Per-group sums of x and x² over each latent cell: (N, G, h, w) float32 each, and the element
    count per cell. ``x`` is (N, C, H, W) with H = h*f, or (N, C, h*f*w*f) (attention layout)."""
    n, c = x.shape[:2]
    h, w = grid
    if x.ndim == 3:
        f = int(round((x.shape[-1] / (h * w)) ** 0.5))
        x = x.reshape(n, c, h * f, w * f)
    f = x.shape[-2] // h
    if x.shape[-2] != h * f or x.shape[-1] != w * f or f < 1:
        return None
    xs = x.float().reshape(n, groups, c // groups, h, f, w, f)
    return xs.sum(dim=(2, 4, 6)), xs.square().sum(dim=(2, 4, 6)), (c // groups) * f * f


def _recording_group_norm(mod: nn.GroupNorm, name: str, rec: EncoderRecord):
    """GroupNorm forward that also keeps per-latent-cell sums (output bit-identical: the plain call)."""
    def forward(x):
        sums = _cell_sums(x, mod.num_groups, rec.latent_size)
        if sums is not None:
            rec.cells[name] = sums
        return F.group_norm(x, mod.num_groups, mod.weight if mod.affine else None, mod.bias if mod.affine else None,
                            mod.eps)
    return forward


def _incremental_group_norm(mod: nn.GroupNorm, cells, crop: Box, paste: Box):
    """GroupNorm of a crop with the statistics of the whole canvas: the recorded per-cell sums outside
    ``paste`` plus the crop's own sums inside it (which then replace the recorded ones)."""
    s1, s2, per_cell = cells
    cy0, cy1, cx0, cx1 = crop
    py0, py1, px0, px1 = paste

    def forward(x):
        fresh = _cell_sums(x, mod.num_groups, (cy1 - cy0, cx1 - cx0))
        n, c = x.shape[:2]
        if fresh is None or fresh[0].shape[0] != s1.shape[0]:
            return F.group_norm(x, mod.num_groups, mod.weight if mod.affine else None,
                                mod.bias if mod.affine else None, mod.eps)
        f1 = fresh[0][..., py0 - cy0:py1 - cy0, px0 - cx0:px1 - cx0]
        f2 = fresh[1][..., py0 - cy0:py1 - cy0, px0 - cx0:px1 - cx0]
        s1[..., py0:py1, px0:px1] = f1       # the record now describes the new canvas
        s2[..., py0:py1, px0:px1] = f2
        count = per_cell * s1.shape[-2] * s1.shape[-1]
        mean = s1.double().sum(dim=(-2, -1)) / count
        var = (s2.double().sum(dim=(-2, -1)) / count - mean.square()).clamp_min(0)
        rstd = torch.rsqrt(var + mod.eps)
        xs = x.reshape(n, mod.num_groups, -1)
        y = ((xs - mean[..., None].to(x.dtype)) * rstd[..., None].to(x.dtype)).reshape(x.shape)
        if mod.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * mod.weight.view(shape) + mod.bias.view(shape)
        return y
    return forward


@contextlib.contextmanager
def crop_as_part_of_canvas(vae, rec: EncoderRecord, crop: Box, paste: Box):
    """While active, ``vae.encode`` of the pixels of latent box ``crop`` normalises with whole-canvas
    GroupNorm statistics (recorded cell sums outside ``paste``, the crop's own inside) and its
    attention layers attend over the recorded keys/values of the whole canvas with the crop's own
    inside ``paste``. The record is updated inside ``paste`` (the canvas there is now the crop's)."""
    patched, handles = [], []
    for name, m in vae.encoder.named_modules():
        if isinstance(m, nn.GroupNorm) and name in rec.cells:
            m.forward = _incremental_group_norm(m, rec.cells[name], crop, paste)
            patched.append(m)
    lh, lw = rec.latent_size
    cy0, cy1, cx0, cx1 = crop
    py0, py1, px0, px1 = paste
    for name, attn in _attention_modules(vae.encoder):
        kv, grid = rec.kv.get(name), rec.attn_grid.get(name)
        if not kv or len(kv) != 2 or grid is None or grid[0] % lh or grid[1] % lw:
            continue
        f = grid[0] // lh   # attention grid cells per latent cell (1 for SD's VAE: the mid block)
        if grid[1] // lw != f:
            continue
        ch, cw = (cy1 - cy0) * f, (cx1 - cx0) * f

        for which, lin in (("k", attn.to_k), ("v", attn.to_v)):
            def merge(mod, args, out, which=which, kv=kv, f=f, ch=ch, cw=cw):
                if out.ndim != 3 or out.shape[1] != ch * cw:
                    return out
                fresh = out.reshape(out.shape[0], ch, cw, -1)
                full = kv[which]
                full[:, py0 * f:py1 * f, px0 * f:px1 * f] = \
                    fresh[:, (py0 - cy0) * f:(py1 - cy0) * f, (px0 - cx0) * f:(px1 - cx0) * f].to(full.dtype)
                return full.reshape(full.shape[0], -1, full.shape[-1]).to(out.dtype)
            handles.append(lin.register_forward_hook(merge))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward
