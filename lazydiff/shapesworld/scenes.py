"""ShapesWorld scenes: a procedural image domain with exact ground truth.

A scene is an analytic background with *global* structure (gradients, stripes, checkerboards,
dots ...) plus 1-4 flat-coloured objects (6 shapes x 8 colours x 2 sizes). Everything is
rendered with numpy from cached coordinate grids, deterministically from an integer seed
(``numpy.random.Generator(PCG64(seed))``, never global state), with binary, exact masks: no
anti-aliasing, so ``scene.image == scene.background`` wherever no object is, and every
visible object pixel has exactly the object's colour.

Object colours and background colours come from disjoint palettes, so captions are
unambiguous ("a small red star on a teal and beige striped background"), and every object's
colour is additionally checked against the background pixels under it (gradients mix colours).

Sizes are given as ``(height, width)`` (an int means a square canvas).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

#: Object colours: saturated and far apart in RGB (pairwise distance >= 100).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 75, 225),
    "yellow": (250, 225, 30),
    "orange": (250, 135, 20),
    "purple": (140, 40, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

#: Background colours: a palette disjoint from (and >= 75 RGB units away from) every object colour.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "dark grey": (72, 72, 72),
    "pink": (245, 165, 200),
    "sky blue": (130, 195, 240),
    "teal": (20, 125, 130),
    "navy": (25, 35, 105),
    "brown": (125, 75, 40),
    "beige": (220, 200, 150),
    "olive": (120, 120, 35),
    "mint": (165, 230, 185),
    "lavender": (185, 165, 230),
    "maroon": (110, 20, 55),
    "cyan": (50, 205, 210),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "linear", "radial", "stripes", "checker", "dots")
#: Caption of each background kind; {a} is the article of colour {c0}, {c1} the second colour.
_BG_CAPTIONS: dict[str, str] = {
    "solid": "a plain {c0} background", "linear": "{a} {c0} to {c1} gradient background",
    "radial": "{a} {c0} to {c1} radial gradient background", "stripes": "{a} {c0} and {c1} striped background",
    "checker": "{a} {c0} and {c1} checkered background", "dots": "{a} {c0} background with {c1} dots"}

#: Object diameter as a fraction of the canvas' geometric-mean side; the two ranges have a
#: clear gap so "small" and "large" are never ambiguous (at 128x128: 17-24 px vs 35-46 px).
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.13, 0.19), "large": (0.27, 0.36)}

#: Minimum RGB distance between an object's colour and every background pixel under it.
MIN_CONTRAST = 60.0
#: Each object keeps at least this fraction of its full mask visible.
MIN_VISIBLE = 0.70
MAX_OBJECTS = 4

_COLOR_NAMES = tuple(COLORS)
_COLOR_ARRAY = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.int32)
_BG_NAMES = tuple(BACKGROUND_COLORS)
_BG_ARRAY = np.array([BACKGROUND_COLORS[c] for c in _BG_NAMES], dtype=np.float32)
# Pairs of background colours that are clearly distinguishable from each other.
_BG_PAIRS = [
    (i, j)
    for i in range(len(_BG_NAMES))
    for j in range(len(_BG_NAMES))
    if i != j and np.linalg.norm(_BG_ARRAY[i] - _BG_ARRAY[j]) >= 70
]

Size = tuple[int, int]


def as_size(size: int | Sequence[int]) -> Size:
    """Normalise a canvas size to ``(height, width)``."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def article(word: str) -> str:
    """The indefinite article for ``word``: "a" or "an"."""
    return "an" if word[:1] in "aeiou" else "a"


def object_caption(shape: str, color: str, size: str | None = None) -> str:
    """``("star", "green", "small") -> "a small green star"``; without a size: "a green star"."""
    words = " ".join(w for w in (size, color, shape) if w)
    return f"{article(words)} {words}"


def all_classes() -> list[tuple[str, str]]:
    """Every (shape, colour) class, in a fixed order (for zero-shot classification)."""
    return [(s, c) for s in SHAPES for c in _COLOR_NAMES]


def class_prompts(size: str | None = None) -> list[str]:
    """The prompt of every class from :func:`all_classes`, e.g. "a small green star"."""
    return [object_caption(s, c, size) for s, c in all_classes()]


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ShapeObject:
    """One object of a scene. Masks are full-canvas ``(H, W)`` bool arrays."""

    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends, of the full mask
    mask: np.ndarray  # visible part (other objects drawn later may cover a little of it)
    center: tuple[float, float]  # (x, y) in pixels
    full_mask: np.ndarray = field(repr=False)  # the whole silhouette, ignoring occlusion
    diameter: float = 0.0  # in pixels

    @property
    def caption(self) -> str:
        return object_caption(self.shape, self.color, self.size)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]


@dataclass(eq=False)
class Scene:
    """A rendered scene: ``image`` = ``background`` with ``objects`` painted in list order."""

    image: np.ndarray  # (H, W, 3) uint8
    background: np.ndarray  # (H, W, 3) uint8, the analytic background alone
    objects: list[ShapeObject]
    caption: str
    object_captions: list[str]
    background_caption: str
    background_kind: str
    background_colors: tuple[str, str]  # second entry equals the first for solid backgrounds
    seed: int | None = None

    @property
    def size(self) -> Size:
        return self.image.shape[0], self.image.shape[1]


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _grids(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: 1-D ``xs``, ``ys`` and broadcastable ``X (1,W)``, ``Y (H,1)``."""
    xs = np.arange(w, dtype=np.float32) + 0.5
    ys = np.arange(h, dtype=np.float32) + 0.5
    for a in (xs, ys):
        a.flags.writeable = False
    return xs, ys, xs[None, :], ys[:, None]


def _polygon_fold(u: np.ndarray, v: np.ndarray, n: int, inner: float) -> np.ndarray:
    """Inside test for an n-fold symmetric star/polygon with outer radius 1, pointing up.

    Folds every point into the wedge between an outer vertex (angle 0, radius 1) and the next
    inner vertex (angle pi/n, radius ``inner``) and tests the side of that edge. A regular
    polygon is the special case ``inner = cos(pi/n)``.
    """
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(u, -v)  # angle from "up", image y points down
    sector = 2 * math.pi / n
    phi = np.mod(theta, sector)
    beta = np.minimum(phi, sector - phi)
    px, py = rho * np.cos(beta), rho * np.sin(beta)
    bx, by = inner * math.cos(math.pi / n), inner * math.sin(math.pi / n)
    return (bx - 1.0) * py - by * (px - 1.0) >= 0


def _circle(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return (np.abs(u) <= 0.84) & (np.abs(v) <= 0.84)


def _triangle(u, v):
    # Equilateral, pointing up, filling the unit box: apex (0, -0.88), base at v = 0.85.
    apex, base = -0.88, 0.85
    slope = (base - apex) / 1.0  # half-width 1 at the base
    return (v <= base) & (v >= apex + slope * np.abs(u))


def _star(u, v):
    # Five points; a fat inner radius keeps small stars recognisable. A unit star spans
    # v in [-1, 0.809] and u in +-0.951: scale and shift it to fill the unit box.
    return _polygon_fold(u * 0.951, v * 0.951 - 0.0955, 5, 0.5)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 0.92)) | ((av <= 0.32) & (au <= 0.92))


def _heart(u, v):
    # Implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 spans x in +-1.139, y in [-1, 1.236].
    x = u * 1.139
    y = -v * 1.139 + 0.118
    q = x * x + y * y - 1.0
    return q * q * q - x * x * y * y * y <= 0


_SHAPE_FNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "heart": _heart,
}
assert tuple(_SHAPE_FNS) == SHAPES


def _shape_window(shape: str, cx: float, cy: float, radius: float, h: int, w: int):
    """Rasterise a shape in its bounding window only (fast): returns (mask, (x0, y0, x1, y1))."""
    xs, ys, _, _ = _grids(h, w)
    x0, x1 = max(0, int(math.floor(cx - radius))), min(w, int(math.ceil(cx + radius)))
    y0, y1 = max(0, int(math.floor(cy - radius))), min(h, int(math.ceil(cy + radius)))
    u = ((xs[x0:x1] - cx) / radius)[None, :]
    v = ((ys[y0:y1] - cy) / radius)[:, None]
    return _SHAPE_FNS[shape](u, v), (x0, y0, x1, y1)


def shape_mask(shape: str, center: tuple[float, float], diameter: float, size) -> np.ndarray:
    """Full-canvas bool mask of ``shape`` centred at ``center`` (x, y) with the given diameter."""
    h, w = as_size(size)
    win, (x0, y0, x1, y1) = _shape_window(shape, center[0], center[1], diameter / 2, h, w)
    out = np.zeros((h, w), dtype=bool)
    out[y0:y1, x0:x1] = win
    return out


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x0, y0, x1, y1) box of a non-empty mask, exclusive ends."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def size_range_px(size_name: str, canvas) -> tuple[float, float]:
    """Pixel range of object diameters for a size class on a canvas."""
    h, w = as_size(canvas)
    # Scale with the geometric-mean side, but keep large objects inside elongated canvases.
    scale = min(math.sqrt(h * w), 0.5 * min(h, w) / SIZE_RANGES["large"][1])
    lo, hi = SIZE_RANGES[size_name]
    return lo * scale, hi * scale


def sample_diameter(rng: np.random.Generator, size_name: str, canvas) -> float:
    """Draw an object diameter (pixels) for a size class."""
    lo, hi = size_range_px(size_name, canvas)
    return float(rng.uniform(lo, hi))


# --------------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------------

_GRADIENT_LEVELS = 1024  # gradients are quantised to this many colours (below 1 RGB unit apart)


@dataclass
class _Background:
    """A background as a colour table and an index map: ``image = lut[index]``.

    The table makes colour checks exact and cheap: the colours under a mask are among
    ``lut[index[mask].min() : index[mask].max() + 1]``.
    """

    index: np.ndarray  # (H, W) intp
    lut: np.ndarray  # (K, 3) uint8
    kind: str
    colors: tuple[str, str]
    caption: str

    def image(self) -> np.ndarray:
        return np.take(self.lut, self.index, axis=0)

    def allowed_colors(self, win: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
        """Bool vector over COLORS: colours contrasting with the background under ``win``."""
        x0, y0, x1, y1 = window
        idx = self.index[y0:y1, x0:x1][win]
        if len(idx) == 0:
            return np.ones(len(_COLOR_NAMES), bool)
        entries = self.lut[idx.min() : idx.max() + 1].astype(np.int32)
        d2 = ((entries[:, None, :] - _COLOR_ARRAY[None]) ** 2).sum(-1)
        return d2.min(0) >= MIN_CONTRAST**2


def _gradient_lut(c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    t = np.linspace(0.0, 1.0, _GRADIENT_LEVELS, dtype=np.float32)[:, None]
    return np.rint(c0 + t * (c1 - c0)).astype(np.uint8)


def _quantise(t: np.ndarray) -> np.ndarray:
    """Map t in [0, 1] to gradient table indices."""
    return (t * (_GRADIENT_LEVELS - 1) + 0.5).astype(np.intp)


def _bg_caption(kind: str, c0: str, c1: str) -> str:
    return _BG_CAPTIONS[kind].format(a=article(c0), c0=c0, c1=c1)


def _sample_background(rng: np.random.Generator, h: int, w: int) -> _Background:
    """Sample a background (kind, two palette colours, geometry) and build its index map."""
    _, _, X, Y = _grids(h, w)
    m = math.sqrt(h * w)
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    i, j = _BG_PAIRS[int(rng.integers(len(_BG_PAIRS)))]
    n0, n1 = _BG_NAMES[i], _BG_NAMES[j]
    c0, c1 = _BG_ARRAY[i], _BG_ARRAY[j]
    pal = np.stack([c0, c1]).astype(np.uint8)

    if kind == "solid":
        return _Background(np.zeros((h, w), np.intp), pal[:1], kind, (n0, n0), _bg_caption(kind, n0, n0))
    if kind == "linear":
        a = rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(a), math.sin(a)
        corners = [x * ca + y * sa for x in (0, w) for y in (0, h)]
        lo, span = min(corners), max(corners) - min(corners)
        t = (X * (ca / span) + Y * (sa / span)) - lo / span
        return _Background(_quantise(t), _gradient_lut(c0, c1), kind, (n0, n1), _bg_caption(kind, n0, n1))
    if kind == "radial":
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        reach = max(math.hypot(x - cx, y - cy) for x in (0, w) for y in (0, h))
        radius = reach * rng.uniform(0.6, 1.0)
        t = np.minimum(np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) * (1 / radius), 1.0)
        return _Background(_quantise(t), _gradient_lut(c0, c1), kind, (n0, n1), _bg_caption(kind, n0, n1))
    if kind == "stripes":
        a = rng.uniform(0, math.pi)
        half = rng.uniform(0.04, 0.15) * m  # half the period: one band
        phase = rng.uniform(0, 2 * half)
        p = X * (math.cos(a) / half) + (Y * (math.sin(a) / half) + phase / half)
        band = np.floor(p).astype(np.intp) & 1
        return _Background(band, pal, kind, (n0, n1), _bg_caption(kind, n0, n1))
    if kind == "checker":
        cell = rng.uniform(0.06, 0.2) * m
        ox, oy = rng.uniform(0, 2 * cell, size=2)
        par = (np.floor((X + ox) / cell).astype(np.intp) + np.floor((Y + oy) / cell).astype(np.intp)) & 1
        return _Background(par, pal, kind, (n0, n1), _bg_caption(kind, n0, n1))
    # dots: a (possibly staggered) grid of round dots of colour 1 on colour 0
    spacing = rng.uniform(0.08, 0.2) * m
    radius = rng.uniform(0.18, 0.32) * spacing
    ox, oy = rng.uniform(0, spacing, size=2)
    stagger = rng.random() < 0.5
    gy = Y + oy
    gx = X + ox + (np.mod(np.floor(gy / spacing), 2) * (spacing / 2) if stagger else 0.0)
    dx = np.mod(gx, spacing) - spacing / 2
    dy = np.mod(gy, spacing) - spacing / 2
    dot = (dx * dx + dy * dy <= radius * radius).astype(np.intp)
    return _Background(dot, pal, kind, (n0, n1), _bg_caption(kind, n0, n1))


# --------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------


def allowed_colors(background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Bool vector over :data:`COLORS` order: the object colours that contrast (RGB distance
    >= MIN_CONTRAST) with every pixel of ``background`` (H, W, 3) under ``mask`` (H, W)."""
    px = background[mask].astype(np.int32)
    if len(px) == 0:
        return np.ones(len(_COLOR_NAMES), bool)
    packed = np.unique((px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2])  # few distinct colours
    px = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1)
    d2 = ((px[:, None, :] - _COLOR_ARRAY[None]) ** 2).sum(-1)
    return d2.min(0) >= MIN_CONTRAST**2


def _new_object(shape, color, size, diameter, center, win, window, h, w) -> ShapeObject:
    full = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = window
    full[y0:y1, x0:x1] = win
    bx0, by0, bx1, by1 = _mask_bbox(win)
    return ShapeObject(
        shape=shape,
        color=color,
        size=size,
        bbox=(x0 + bx0, y0 + by0, x0 + bx1, y0 + by1),
        mask=full.copy(),
        center=(float(center[0]), float(center[1])),
        full_mask=full,
        diameter=float(diameter),
    )


def compose(background: np.ndarray, objects: Sequence[ShapeObject]) -> np.ndarray:
    """Paint objects (in order, full silhouettes) over a background; returns a new image and
    sets each object's visible ``mask`` in place."""
    img = background.copy()
    owner = np.full(background.shape[:2], -1, dtype=np.int16)
    for k, ob in enumerate(objects):
        owner[ob.full_mask] = k
        img[ob.full_mask] = ob.rgb
    for k, ob in enumerate(objects):
        ob.mask = owner == k
    return img


def _place_objects(rng: np.random.Generator, bg: _Background, bg_image: np.ndarray, n: int):
    """Place up to ``n`` objects by rejection sampling (limited overlap, contrasting colours).

    Returns (objects, image)."""
    h, w = bg.index.shape
    image = bg_image.copy()
    owner = np.full((h, w), -1, dtype=np.int8)  # index of the top object at each pixel
    full_area: list[int] = []
    visible_area: list[int] = []
    placed: list[tuple] = []
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        diameter = sample_diameter(rng, size, (h, w))
        r = diameter / 2
        for _attempt in range(12):
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            win, window = _shape_window(shape, cx, cy, r, h, w)
            x0, y0, x1, y1 = window
            touched: list[int] = []
            if placed:
                hit = np.bincount(owner[y0:y1, x0:x1][win] + 1, minlength=len(placed) + 1)[1:]
                touched = [k for k in range(len(placed)) if hit[k]]
                if any(visible_area[k] - hit[k] < MIN_VISIBLE * full_area[k] for k in touched):
                    continue
            ok = bg.allowed_colors(win, window)
            for k in touched:  # differ from the objects we overlap, so both stay separable
                ok[_COLOR_NAMES.index(placed[k][1])] = False
            choices = np.flatnonzero(ok)
            if len(choices) == 0:
                continue
            color = _COLOR_NAMES[int(choices[rng.integers(len(choices))])]
            for k in touched:
                visible_area[k] -= int(hit[k])
            owner[y0:y1, x0:x1][win] = len(placed)
            image[y0:y1, x0:x1][win] = COLORS[color]
            area = int(win.sum())
            full_area.append(area)
            visible_area.append(area)
            placed.append((shape, color, size, diameter, (cx, cy), win, window))
            break
    objects = [_new_object(*p, h, w) for p in placed]
    if len(objects) > 1:
        for k, ob in enumerate(objects[:-1]):  # the last one is fully visible
            ob.mask = owner == k
    return objects, image


def background_captions() -> list[str]:
    """Every caption :func:`_sample_background` can produce (a finite set), in a fixed order."""
    caps = [_bg_caption("solid", n, n) for n in _BG_NAMES]
    for i, j in _BG_PAIRS:
        caps += [_bg_caption(kind, _BG_NAMES[i], _BG_NAMES[j]) for kind in BACKGROUND_KINDS if kind != "solid"]
    return caps


def scene_caption(object_captions: Sequence[str], background_caption: str) -> str:
    if not object_captions:
        return background_caption
    if len(object_captions) == 1:
        things = object_captions[0]
    else:
        things = ", ".join(object_captions[:-1]) + " and " + object_captions[-1]
    return f"{things} on {background_caption}"


def _make_scene(bg: _Background, bg_image, objects, image, seed) -> Scene:
    caps = [ob.caption for ob in objects]
    return Scene(
        image=image,
        background=bg_image,
        objects=objects,
        caption=scene_caption(caps, bg.caption),
        object_captions=caps,
        background_caption=bg.caption,
        background_kind=bg.kind,
        background_colors=bg.colors,
        seed=seed,
    )


def generate_scene(rng: np.random.Generator, size=(128, 128), seed: int | None = None) -> Scene:
    """Draw a scene from ``rng`` (the building block of :func:`render_scene` and edit tasks)."""
    h, w = as_size(size)
    bg = _sample_background(rng, h, w)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    bg_image = bg.image()
    objects, image = _place_objects(rng, bg, bg_image, n)
    return _make_scene(bg, bg_image, objects, image, seed)


def scene_rng(seed: int) -> np.random.Generator:
    """The generator behind scene/task ``seed``."""
    return np.random.Generator(np.random.PCG64(int(seed)))


def render_scene(seed: int, size=(128, 128)) -> Scene:
    """The scene with this seed, on a canvas of ``size = (height, width)``."""
    return generate_scene(scene_rng(seed), size, seed=int(seed))


def iter_scenes(start_seed: int, n: int, size=(128, 128)) -> Iterator[Scene]:
    """Scenes with seeds ``start_seed, ..., start_seed + n - 1``."""
    for s in range(int(start_seed), int(start_seed) + int(n)):
        yield render_scene(s, size)


def scene_batch(seeds: Sequence[int], size=(128, 128)) -> tuple[np.ndarray, list[str]]:
    """Images ``(N, H, W, 3) uint8`` and captions of the scenes with the given seeds."""
    h, w = as_size(size)
    out = np.empty((len(seeds), h, w, 3), np.uint8)
    caps = []
    for i, s in enumerate(seeds):
        sc = render_scene(s, (h, w))
        out[i] = sc.image
        caps.append(sc.caption)
    return out, caps


def render_object(shape: str, color: str, size: str, canvas_size=(128, 128), seed: int = 0) -> Scene:
    """A scene holding exactly one given object on a random background (seeded), e.g. for
    ShapesCLIP zero-shot class renders. The background is redrawn until it contrasts."""
    if shape not in SHAPES or color not in COLORS or size not in SIZES:
        raise ValueError(f"unknown object ({shape!r}, {color!r}, {size!r}); see SHAPES, COLORS, SIZES")
    h, w = as_size(canvas_size)
    rng = scene_rng(seed)
    diameter = sample_diameter(rng, size, (h, w))
    r = diameter / 2
    for _ in range(1000):  # a solid background always contrasts, so this ends quickly
        bg = _sample_background(rng, h, w)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        win, window = _shape_window(shape, cx, cy, r, h, w)
        if bg.allowed_colors(win, window)[_COLOR_NAMES.index(color)]:
            break
    else:
        raise RuntimeError(f"no contrasting background found for {color} (seed {seed})")
    ob = _new_object(shape, color, size, diameter, (cx, cy), win, window, h, w)
    bg_image = bg.image()
    image = bg_image.copy()
    image[ob.mask] = ob.rgb
    return _make_scene(bg, bg_image, [ob], image, seed)
