"""ShapesWorld edit tasks: (canvas, mask, local prompt, ground truth), deterministic by seed.

Task ``seed`` starts from the scene :func:`render_scene(seed) <lazydiff.shapesworld.scenes.render_scene>`
(same generator, same draws) and then draws an edit from the same generator:

* ``intent``: ``"insert"`` a new object into the hole, ``"remove"`` an object (the prompt names
  the background: "empty background" or the background caption), or ``"replace"`` an object by
  a new one centred at the same place.
* ``kind`` of mask: ``"object"`` (the silhouette(s) dilated by a few pixels up to a coarse blob),
  ``"box"`` (an axis-aligned rectangle) or ``"brush"`` (thick round-brush scribbles: a zigzag
  over the object plus random-walk strokes).
* a target mask ratio, log-uniform in [2%, 60%] (typical edits are small); boxes and brush
  strokes are sized to hit it, object masks grow towards it within their dilation range. The
  realised ratio is stored in ``mask_ratio`` and always lies in [0.02, 0.60].

Ground truth is exact. Objects that the mask would cut are dropped from the scene (canvas and
target), so the hole holds only the analytic background, plus the removed object (canvas) or
the prompted object (target): ``target == canvas`` outside the mask, and inside the mask the
target is ``background`` except at ``new_object.mask``.

Fixed splits (seeds, at any canvas size; the reference size is 128x128). A split is defined by
this code and numpy's PCG64 stream; ``tests/test_shapesworld.py`` pins the first test tasks so
that a change to either cannot go unnoticed:

* ``"train"``: seeds ``0 .. 9_999_999`` (also the seeds to draw training *scenes* from),
* ``"test"``:  the held-out 500 seeds ``10_000_000 .. 10_000_499``,
* ``"val"``:   500 seeds ``10_100_000 .. 10_100_499``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy.ndimage import distance_transform_edt

from .scenes import (
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    _mask_bbox,
    allowed_colors,
    as_size,
    compose,
    generate_scene,
    object_caption,
    sample_diameter,
    scene_caption,
    scene_rng,
    shape_mask,
)

KINDS: tuple[str, ...] = ("object", "box", "brush")
INTENTS: tuple[str, ...] = ("insert", "remove", "replace")
MIN_RATIO, MAX_RATIO = 0.02, 0.60
EMPTY_PROMPT = "empty background"


def edit_prompts() -> list[str]:
    """Every local prompt :func:`make_task` can produce (objects with sizes, the empty background and
    each background caption): the vocabulary a precomputed text-feature table must cover."""
    from .scenes import SIZES, all_classes, background_captions

    objects = [object_caption(s, c, z) for z in SIZES for s, c in all_classes()]
    return objects + [EMPTY_PROMPT] + background_captions()


SPLITS: dict[str, range] = {
    "train": range(0, 10_000_000),
    "test": range(10_000_000, 10_000_500),
    "val": range(10_100_000, 10_100_500),
}

_COLOR_NAMES = tuple(COLORS)


@dataclass(eq=False)
class EditTask:
    """One edit: fill ``mask`` of ``canvas`` according to ``prompt``; ``target`` is the truth."""

    canvas: np.ndarray  # (H, W, 3) uint8, the input image
    mask: np.ndarray  # (H, W) bool, True = regenerate
    prompt: str
    target: np.ndarray  # (H, W, 3) uint8, ground truth after the edit
    background: np.ndarray  # (H, W, 3) uint8, the analytic background (no objects)
    kind: str  # "object" | "box" | "brush"
    intent: str  # "insert" | "remove" | "replace"
    shape: str | None  # the prompted object, None when the prompt names the background
    color: str | None
    size: str | None
    mask_ratio: float
    seed: int
    new_object: ShapeObject | None = None  # the prompted object as drawn in ``target``
    removed_object: ShapeObject | None = None  # the object the edit takes out of ``canvas``
    target_caption: str = ""  # caption of the whole target image (a global prompt)

    @property
    def is_object_edit(self) -> bool:
        """True when the prompt names an object (insert/replace)."""
        return self.shape is not None


def make_split(name: str) -> range:
    """The task seeds of a fixed split: "train", "val" or "test" (500 held-out seeds)."""
    try:
        return SPLITS[name]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; choose one of {sorted(SPLITS)}") from None


def iter_tasks(split: str = "test", size=(128, 128), limit: int | None = None) -> Iterator[EditTask]:
    """The tasks of a split, in order (``limit`` caps how many)."""
    seeds = make_split(split)
    for s in seeds[:limit] if limit is not None else seeds:
        yield make_task(s, size)


def task_to_pil(task: EditTask):
    """``(canvas RGB, mask "L" with 255 = edit, target RGB)`` as PIL images."""
    from PIL import Image

    return (
        Image.fromarray(task.canvas, "RGB"),
        Image.fromarray(task.mask.astype(np.uint8) * 255, "L"),
        Image.fromarray(task.target, "RGB"),
    )


def make_task(seed: int, size=(128, 128), kind: str | None = None, intent: str | None = None) -> EditTask:
    """The edit task with this seed. ``kind``/``intent`` force the mask kind or the intent
    (the scene and every other draw stay the same as without forcing)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {KINDS}")
    if intent is not None and intent not in INTENTS:
        raise ValueError(f"unknown intent {intent!r}; choose one of {INTENTS}")
    h, w = as_size(size)
    rng = scene_rng(seed)
    scene = generate_scene(rng, (h, w), seed=int(seed))
    drawn_kind = KINDS[int(rng.integers(len(KINDS)))]
    drawn_intent = INTENTS[int(rng.integers(len(INTENTS)))]
    kind, intent = kind or drawn_kind, intent or drawn_intent
    if not scene.objects and intent != "insert":
        intent = "insert"  # nothing to remove (placement can fail on tiny canvases)
    for _ in range(100):
        task = _try_task(rng, scene, kind, intent, int(seed))
        if task is not None:
            return task
    raise RuntimeError(f"could not build a {kind}/{intent} task for seed {seed} at {h}x{w}")


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------


def _try_task(rng: np.random.Generator, scene: Scene, kind: str, intent: str, seed: int) -> EditTask | None:
    """One attempt; None when the draws do not give a valid task (the caller redraws)."""
    h, w = scene.size
    m = math.sqrt(h * w)
    ratio = math.exp(rng.uniform(math.log(MIN_RATIO), math.log(MAX_RATIO)))
    objects = scene.objects

    old_i = int(rng.integers(len(objects))) if intent != "insert" else -1
    old = objects[old_i] if old_i >= 0 else None
    new = None
    if intent != "remove":
        new = _draw_new_object(rng, scene, old)
        if new is None:
            return None
    cover = np.zeros((h, w), bool)  # what the mask must contain
    for ob in (old, new):
        if ob is not None:
            cover |= ob.full_mask

    if kind == "object":
        mask = _object_mask(rng, cover, ratio, m)
    elif kind == "box":
        mask = _box_mask(rng, cover, ratio, m)
    else:
        mask = _brush_mask(rng, cover, ratio, m)
    mask_ratio = float(mask.mean())
    if not MIN_RATIO <= mask_ratio <= MAX_RATIO:
        return None

    # Drop the objects the mask would cut, so the hole holds only background (+ old / new).
    kept = [i for i, ob in enumerate(objects) if i == old_i or not (ob.full_mask & mask).any()]
    before = {i: dataclasses.replace(objects[i]) for i in kept}  # compose() sets visible masks
    canvas = compose(scene.background, list(before.values()))
    after = [dataclasses.replace(objects[i]) for i in kept if i != old_i] + ([new] if new else [])
    target = compose(scene.background, after)
    removed = before.get(old_i)

    if new is not None:
        prompt = object_caption(new.shape, new.color, new.size)
    else:
        prompt = EMPTY_PROMPT if rng.random() < 0.5 else scene.background_caption
    return EditTask(
        canvas=canvas,
        mask=mask,
        prompt=prompt,
        target=target,
        background=scene.background,
        kind=kind,
        intent=intent,
        shape=new.shape if new else None,
        color=new.color if new else None,
        size=new.size if new else None,
        mask_ratio=mask_ratio,
        seed=seed,
        new_object=new,
        removed_object=removed,
        target_caption=scene_caption([ob.caption for ob in after], scene.background_caption),
    )


def _draw_new_object(rng: np.random.Generator, scene: Scene, old: ShapeObject | None) -> ShapeObject | None:
    """The prompted object: at ``old``'s place for a replacement, else somewhere free-ish."""
    h, w = scene.size
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    diameter = sample_diameter(rng, size, (h, w))
    r = diameter / 2
    if old is not None:
        jitter = rng.uniform(-0.1, 0.1, size=2) * diameter
        cx = float(np.clip(old.center[0] + jitter[0], r, w - r))
        cy = float(np.clip(old.center[1] + jitter[1], r, h - r))
        full = shape_mask(shape, (cx, cy), diameter, (h, w))
    else:
        # Best of a few random spots: the one overlapping existing objects least.
        occupied = np.zeros((h, w), bool)
        for ob in scene.objects:
            occupied |= ob.full_mask
        best = None
        for _ in range(4):
            c = (float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r)))
            full_c = shape_mask(shape, c, diameter, (h, w))
            clash = int((full_c & occupied).sum())
            if best is None or clash < best[0]:
                best = (clash, c, full_c)
        _, (cx, cy), full = best
    ok = allowed_colors(scene.background, full)
    if old is not None and shape == old.shape:
        ok[_COLOR_NAMES.index(old.color)] = False  # a replacement must change something
    choices = np.flatnonzero(ok)
    if len(choices) == 0:
        return None
    color = _COLOR_NAMES[int(choices[rng.integers(len(choices))])]
    return ShapeObject(
        shape=shape,
        color=color,
        size=size,
        bbox=_mask_bbox(full),
        mask=full,
        center=(cx, cy),
        full_mask=full,
        diameter=diameter,
    )


def _radius_for_ratio(dist: np.ndarray, ratio: float) -> float:
    """The distance threshold r such that about ``ratio`` of the pixels have ``dist <= r``."""
    flat = dist.ravel()
    k = min(len(flat) - 1, max(0, int(round(ratio * len(flat))) - 1))
    return float(np.partition(flat, k)[k])


def _object_mask(rng, cover: np.ndarray, ratio: float, m: float) -> np.ndarray:
    """Object-shaped mask: the silhouette(s) dilated by a few pixels, up to a coarse blob."""
    dist = distance_transform_edt(~cover)
    r_lo, r_hi = max(1.5, 0.015 * m), 0.12 * m
    r = min(max(_radius_for_ratio(dist, ratio), r_lo), r_hi)
    r *= rng.uniform(0.9, 1.1)  # varying precision even at the clamp
    mask = dist <= max(r, r_lo)
    if mask.mean() < MIN_RATIO:  # tiny silhouettes: grow the blob to the minimum ratio
        mask = dist <= _radius_for_ratio(dist, MIN_RATIO)
    return mask


def _box_mask(rng, cover: np.ndarray, ratio: float, m: float) -> np.ndarray:
    """An axis-aligned box of about ``ratio`` of the canvas containing ``cover`` with a margin."""
    h, w = cover.shape
    bx0, by0, bx1, by1 = _mask_bbox(cover)
    margin = int(rng.integers(1, max(2, round(0.04 * m)) + 1))
    need_w, need_h = min(w, bx1 - bx0 + 2 * margin), min(h, by1 - by0 + 2 * margin)
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    area = ratio * h * w
    bw = int(np.clip(round(math.sqrt(area * aspect)), need_w, w))
    bh = int(np.clip(round(area / bw), need_h, h))
    if bw * bh < MIN_RATIO * h * w:  # clipping shrank it: widen
        bw = int(min(w, math.ceil(MIN_RATIO * h * w / bh)))

    def place(lo_edge, hi_edge, extent, length):
        lo = max(0, min(hi_edge + margin - extent, length - extent))
        hi = max(lo, min(max(lo_edge - margin, 0), length - extent))
        return int(rng.integers(lo, hi + 1))

    x0, y0 = place(bx0, bx1, bw, w), place(by0, by1, bh, h)
    mask = np.zeros((h, w), bool)
    mask[y0 : y0 + bh, x0 : x0 + bw] = True
    mask |= cover  # only matters if the canvas clipped the box
    return mask


def _brush_mask(rng, cover: np.ndarray, ratio: float, m: float) -> np.ndarray:
    """Round-brush strokes: a zigzag scribble over ``cover`` plus random-walk strokes, with a
    brush radius tuned to reach about ``ratio`` (never less than what covers ``cover``)."""
    h, w = cover.shape
    r0 = m * rng.uniform(0.02, 0.045) * (1 + 2 * math.sqrt(ratio))
    strokes = [_zigzag(rng, _mask_bbox(cover), r0)]
    length = sum(_polyline_length(s) for s in strokes)
    budget = ratio * h * w / (2 * r0) - length  # stroke length still needed (area ~ 2 r L)
    n_walks = int(rng.integers(1, 4))
    for i in range(n_walks):
        if budget <= 0:
            break
        start = strokes[-1][-1] if i == 0 else (rng.uniform(0, w), rng.uniform(0, h))
        walk = _random_walk(rng, start, budget / (n_walks - i), w, h, m)
        budget -= _polyline_length(walk)
        strokes.append(walk)
    skeleton = np.zeros((h, w), bool)
    for s in strokes:
        _rasterise(skeleton, s)
    dist = distance_transform_edt(~skeleton)
    r_cover = float(dist[cover].max())
    r = max(min(max(_radius_for_ratio(dist, ratio), 0.7 * r0), 1.5 * r0), r_cover)
    mask = dist <= r
    if mask.mean() < MIN_RATIO:
        mask = dist <= _radius_for_ratio(dist, MIN_RATIO)
    return mask


def random_edit_mask(rng: np.random.Generator, size, kind: str | None = None) -> np.ndarray:
    """A box or brush mask for any image (training on your own images, where no object says where the
    hole goes): the tasks' own mask makers around a random spot, a ratio log-uniform in [2%, 60%]."""
    h, w = as_size(size)
    m = math.sqrt(h * w)
    kind = kind or ("box", "brush")[int(rng.integers(2))]
    if kind not in ("box", "brush"):
        raise ValueError(f"random masks are 'box' or 'brush' (an object mask needs an object), got {kind!r}")
    mask = None
    for _ in range(20):
        ratio = math.exp(rng.uniform(math.log(MIN_RATIO), math.log(MAX_RATIO)))
        cover = np.zeros((h, w), bool)  # the spot the mask must contain
        r = max(1, int(0.03 * m))
        cy, cx = int(rng.integers(r, max(r + 1, h - r))), int(rng.integers(r, max(r + 1, w - r)))
        cover[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = True
        mask = (_box_mask if kind == "box" else _brush_mask)(rng, cover, ratio, m)
        if MIN_RATIO <= mask.mean() <= MAX_RATIO:
            break
    return mask


def _zigzag(rng, bbox, r0: float) -> np.ndarray:
    """A back-and-forth scribble over a box, lines at most ~1.8 brush radii apart."""
    x0, y0, x1, y1 = bbox
    horizontal = rng.random() < 0.5
    if not horizontal:  # work in transposed coordinates
        x0, y0, x1, y1 = y0, x0, y1, x1
    extent = y1 - y0
    n = max(1, math.ceil(extent / (rng.uniform(1.2, 1.8) * r0)))
    ys = y0 + (np.arange(n) + 0.5) * extent / n
    pts = []
    for i, y in enumerate(ys):
        a = x0 - rng.uniform(0, 0.5) * r0
        b = x1 + rng.uniform(0, 0.5) * r0
        pts += [(a, y), (b, y)] if i % 2 == 0 else [(b, y), (a, y)]
    pts = np.array(pts, np.float64)
    return pts if horizontal else pts[:, ::-1].copy()


def _random_walk(rng, start, length: float, w: int, h: int, m: float) -> np.ndarray:
    """A smooth random polyline of about ``length`` pixels that bounces off the borders."""
    pts = [np.asarray(start, np.float64)]
    heading = rng.uniform(0, 2 * math.pi)
    done = 0.0
    while done < length:
        step = min(rng.uniform(0.08, 0.2) * m, length - done + 1)
        heading += rng.normal(0, 0.8)
        p = pts[-1] + step * np.array([math.cos(heading), math.sin(heading)])
        if not (0 <= p[0] < w and 0 <= p[1] < h):
            heading += math.pi + rng.normal(0, 0.5)  # bounce back inside
            p = np.clip(p, 0, [w - 1e-3, h - 1e-3])
        done += float(np.linalg.norm(p - pts[-1]))
        pts.append(p)
        if len(pts) > 10_000:
            break
    return np.array(pts)


def _polyline_length(pts: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum()) if len(pts) > 1 else 0.0


def _rasterise(canvas: np.ndarray, pts: np.ndarray) -> None:
    """Set the pixels along a polyline (samples every half pixel)."""
    h, w = canvas.shape
    chunks = [pts[:1]]
    for a, b in zip(pts[:-1], pts[1:]):
        n = int(math.ceil(np.linalg.norm(b - a) / 0.5)) + 1
        chunks.append(a + np.linspace(0, 1, n)[:, None] * (b - a))
    p = np.concatenate(chunks)
    xi = np.clip(p[:, 0].astype(np.intp), 0, w - 1)
    yi = np.clip(p[:, 1].astype(np.intp), 0, h - 1)
    canvas[yi, xi] = True
