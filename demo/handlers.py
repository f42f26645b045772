"""What the demo's events do, as plain functions over numpy arrays and dicts (no UI layout here).

:mod:`demo.ui` wires these to Gradio events; ``tests/test_demo_handlers.py`` calls them directly with
the tiny pipelines. User mistakes raise :class:`gradio.Error` with a message that says what to do;
softer problems go through a ``warn`` callable (``gr.Warning`` in the app, ``list.append`` in tests).

Input policy (also shown in the app's "Limits" panel):

* no image -> error; the editor's background is the canvas (transparent pixels are flattened on white);
* empty mask -> error; a mask over (almost) the whole canvas (>= 95%) -> allowed with a warning
  (the edit becomes plain generation and LazyDiffusion has no speed advantage);
* canvas larger than :data:`MAX_CANVAS_SIDE` on a side -> error (and uploads over
  :data:`MAX_UPLOAD_MB` MB are refused by the server); canvases larger than the model's working size
  are edited downscaled, then the result is upscaled and pasted back *inside the mask only*, so every
  pixel outside the mask keeps the original's full-resolution value;
* unreadable / corrupt / unsupported image files -> error;
* empty prompt -> warning (unconditional sampling: for removal the models want "empty background"); prompts
  over :data:`MAX_PROMPT_CHARS` characters -> error; over the model's token limit -> truncated with a
  warning; non-Latin or unknown words -> warning (the models were trained on English captions);
* nothing above touches the user's history: handlers return new state and never mutate their inputs.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import random
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import PIL.Image

import gradio as gr

from lazydiff.pipelines.working_size import downscale_edit
from lazydiff.pipelines.working_size import paste_back as paste_full

log = logging.getLogger("lazydiff.demo")

# --------------------------------------------------------------------------------------------- policy
MAX_UPLOAD_MB = 20                  # server-side upload limit (launch(max_file_size=...))
MAX_CANVAS_SIDE = 4096              # larger canvases are refused
MAX_PROMPT_CHARS = 500              # longer prompts are refused (the UI's textbox stops there too)
FULL_MASK_WARN = 0.95               # masks covering more than this fraction get a warning
MAX_VARIATIONS = 4
MAX_STEPS = 50
MAX_SEED = 2**31 - 1
HISTORY_LIMIT = 30                  # canvases kept per session and tab
HISTORY_BYTES = 256 * 2**20         # ... and at most this many bytes of them
BLANK_SIZE = 256
MASK_RGBA = (255, 0, 200, 140)      # how masks are drawn in the editor (semi-transparent magenta)

Warn = Callable[[str], None]


def _gr_warn(msg: str) -> None:
    gr.Warning(msg)


def UserError(message: str) -> gr.Error:
    """A message for the user (shown as an error toast; no stack trace in the server log)."""
    return gr.Error(message, print_exception=False)


class Cancelled(Exception):
    """The user left (or the event was cancelled) while the pipeline was running."""


# --------------------------------------------------------------------------------------------- images
def _open_image(path: Union[str, os.PathLike]) -> PIL.Image.Image:
    from lazydiff.manifest import open_image

    try:
        return open_image(path)   # upright by its EXIF orientation, as the browser showed it
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        raise UserError(f"Could not read the image file ({type(err).__name__}): it is corrupt or not an image. "
                       "Upload a PNG, JPEG or WebP file.") from None


def to_uint8_array(img: Any, what: str = "image") -> Optional[np.ndarray]:
    """PIL / numpy / file path -> (H, W, C) uint8 with C in (3, 4); None stays None."""
    if img is None:
        return None
    if isinstance(img, (str, os.PathLike)):
        img = _open_image(img)
    if isinstance(img, PIL.Image.Image):
        from lazydiff.pipelines.editing import to_supported_mode

        img = to_supported_mode(img)   # palette, CMYK, 16-bit grey, ... as the library reads them
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        arr = np.asarray(img)
    elif isinstance(img, np.ndarray):
        arr = img
    else:
        raise UserError(f"The {what} has an unsupported type ({type(img).__name__}); send an image.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise UserError(f"The {what} contains NaN or infinite values.")
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise UserError(f"The {what} has an unsupported shape {arr.shape}; send an RGB or RGBA image.")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 2:  # LA
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
    return arr


def flatten_on_white(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) -> (H, W, 3) uint8; transparent pixels become white."""
    if arr.shape[2] == 3:
        return np.ascontiguousarray(arr)
    a = arr[..., 3:4].astype(np.float32) / 255.0
    if (a == 1).all():
        return np.ascontiguousarray(arr[..., :3])
    out = arr[..., :3].astype(np.float32) * a + 255.0 * (1 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _alpha(layer: np.ndarray) -> np.ndarray:
    """Painted pixels of an editor layer: alpha > 0 (RGBA), or non-black (RGB)."""
    if layer.shape[2] == 4:
        return layer[..., 3] > 0
    return layer.max(axis=2) > 0


def _fit_layer(layer: np.ndarray, size: Tuple[int, int], warn: Warn, what: str) -> np.ndarray:
    h, w = size
    if layer.shape[:2] == (h, w):
        return layer
    warn(f"The {what} is {layer.shape[1]}x{layer.shape[0]} but the image is {w}x{h}: it was stretched to fit.")
    mode = "RGBA" if layer.shape[2] == 4 else "RGB"
    return np.asarray(PIL.Image.fromarray(layer, mode).resize((w, h), PIL.Image.NEAREST))


def mask_layer(mask: np.ndarray, rgba=MASK_RGBA) -> np.ndarray:
    """A bool mask drawn as an editor layer (RGBA, transparent where not masked)."""
    out = np.zeros(mask.shape + (4,), np.uint8)
    out[mask] = rgba
    return out


def overlay(rgb: np.ndarray, mask: Optional[np.ndarray] = None, sketch: Optional[np.ndarray] = None,
            rgba=MASK_RGBA) -> np.ndarray:
    """The canvas with the mask tinted (and sketch strokes drawn), as the editor shows it."""
    out = rgb.astype(np.float32)
    if mask is not None:
        a = rgba[3] / 255.0
        out[mask] = out[mask] * (1 - a) + np.array(rgba[:3], np.float32) * a
    if sketch is not None:
        s = sketch[..., 3:4].astype(np.float32) / 255.0
        out = out * (1 - s) + sketch[..., :3].astype(np.float32) * s
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def editor_value(rgb: Optional[np.ndarray], mask: Optional[np.ndarray] = None,
                 sketch: Optional[np.ndarray] = None) -> Optional[Dict[str, Any]]:
    """An ImageEditor value with ``rgb`` as background and one layer: empty, or the mask drawn in the
    mask brush's colour with the sketch's solid strokes on top (what the user would have painted)."""
    if rgb is None:
        return None
    h, w = rgb.shape[:2]
    layer = np.zeros((h, w, 4), np.uint8) if mask is None else mask_layer(mask)
    if sketch is not None:
        on = sketch[..., 3] > 0
        layer[on, :3] = sketch[on, :3]
        layer[on, 3] = 255
    return {"background": rgb, "layers": [layer], "composite": overlay(rgb, mask, sketch)}


def blank_canvas(size: int = BLANK_SIZE, color=(250, 250, 250)) -> np.ndarray:
    return np.full((size, size, 3), color, np.uint8)


# --------------------------------------------------------------------------------------------- the edit's inputs
@dataclass
class Canvas:
    """What the user asked to edit, at full resolution."""

    rgb: np.ndarray                      # (H, W, 3) uint8
    mask: np.ndarray                     # (H, W) bool, True = regenerate
    sketch: Optional[np.ndarray] = None  # (H, W, 4) uint8, opaque pixels = strokes

    @property
    def size(self) -> Tuple[int, int]:
        return self.rgb.shape[:2]

    @property
    def mask_ratio(self) -> float:
        return float(self.mask.mean())


def _check_canvas_size(h: int, w: int) -> None:
    if max(h, w) > MAX_CANVAS_SIDE:
        raise UserError(f"The image is {w}x{h} pixels; the demo accepts up to {MAX_CANVAS_SIDE} pixels on a side. "
                       "Downscale it and upload again (your canvas and history are unchanged).")
    if min(h, w) < 8:
        raise UserError(f"The image is {w}x{h} pixels; it must be at least 8 pixels on a side.")


def split_sketch_layer(layer: np.ndarray, opaque: int = 230, tol: int = 60) -> Tuple[np.ndarray, np.ndarray]:
    """One painted layer of the sketch tab -> (region paint, strokes). Pixels in the mask brush's colour
    (whatever their opacity) or translucent count as region; solid pixels of other colours are strokes."""
    painted = _alpha(layer)
    near_mask = (np.abs(layer[..., :3].astype(np.int16) - np.array(MASK_RGBA[:3], np.int16)) <= tol).all(axis=2)
    translucent = layer[..., 3] < opaque if layer.shape[2] == 4 else np.zeros(painted.shape, bool)
    paint = painted & (near_mask | translucent)
    return paint, painted & ~paint


def strokes_to_mask(strokes: np.ndarray) -> np.ndarray:
    """A mask around sketch strokes: grown by ~4% of the canvas and with enclosed areas filled."""
    from scipy.ndimage import binary_dilation, binary_fill_holes

    r = max(2, int(round(0.04 * min(strokes.shape))))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return binary_fill_holes(binary_dilation(strokes, structure=(yy**2 + xx**2) <= r * r))


def region_with_strokes(paint: np.ndarray, strokes: List[np.ndarray]) -> np.ndarray:
    """The sketch tab's region when strokes share its one layer: a stroke drawn over the pink region
    replaces the pink pixels under it, so stroke pixels within ~4% of the canvas of the pink paint (a
    brush width) and areas they enclose are region; strokes farther out are not (the caller warns)."""
    from scipy.ndimage import binary_dilation, binary_fill_holes

    r = max(2, int(round(0.04 * min(paint.shape))))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    near = binary_dilation(paint, structure=(yy**2 + xx**2) <= r * r)
    region = paint.copy()
    for a in strokes:
        region |= a & near
    return binary_fill_holes(region)


def parse_editor(value: Any, mode: str = "text", warn: Warn = _gr_warn) -> Canvas:
    """An ImageEditor value -> :class:`Canvas`. ``mode``: "text" (every layer paints the mask) or
    "sketch" (layer 0 = mask, layers 1+ = coloured strokes; an empty mask is taken from the strokes)."""
    if value is None or (isinstance(value, dict) and value.get("background") is None):
        if isinstance(value, dict) and value.get("composite") is not None and value.get("layers"):
            raise UserError("There is no image under your strokes: upload an image, pick an example or click "
                           "'Blank canvas' first, then paint the mask.")
        raise UserError("No image: upload an image, pick an example below or click 'Blank canvas', "
                       "then paint the region to change.")
    if not isinstance(value, dict):
        raise UserError("Unexpected editor value: send {'background': image, 'layers': [mask, ...], 'composite': ...}.")
    bg = to_uint8_array(value["background"], "image")
    h, w = bg.shape[:2]
    _check_canvas_size(h, w)
    rgb = flatten_on_white(bg)
    layers = [to_uint8_array(x, "mask layer") for x in (value.get("layers") or []) if x is not None]
    layers = [_fit_layer(x, (h, w), warn, "mask layer" if i == 0 or mode == "text" else "sketch layer")
              for i, x in enumerate(layers)]

    sketch = None
    if mode == "text":
        mask = np.zeros((h, w), bool)
        for layer in layers:
            mask |= _alpha(layer)
    elif mode == "sketch":
        if len(layers) >= 2:  # explicit (API): [mask, sketch strokes, ...]
            mask = _alpha(layers[0])
            stroke_layers = [(layer, _alpha(layer)) for layer in layers[1:]]
        else:  # one layer, as drawn in the UI: mask colour / translucent = region, solid colours = strokes
            mask = np.zeros((h, w), bool)
            stroke_layers = []
            for layer in layers:
                paint, strokes_a = split_sketch_layer(layer)
                mask |= paint
                stroke_layers.append((layer, strokes_a))
            if mask.any():  # strokes painted over the region replace its pixels there: those belong to it
                mask = region_with_strokes(mask, [a for _, a in stroke_layers])
        strokes = np.zeros((h, w), bool)
        sk = np.zeros((h, w, 4), np.uint8)
        for layer, a in stroke_layers:
            sk[a, :3] = layer[a, :3]
            sk[a, 3] = 255
            strokes |= a
        if strokes.any():
            sketch = sk
            if not mask.any():
                mask = strokes_to_mask(strokes)
                warn("No region painted, so the area around your strokes is regenerated. Paint the region with "
                     "the translucent pink brush to choose it yourself.")
            else:
                outside = strokes & ~mask
                sk[outside] = 0
                if not (strokes & mask).any():
                    sketch = None
                    warn("Your sketch lies entirely outside the painted region, so it is ignored and this runs as a "
                         "plain text edit. Draw inside the region to guide the shape and colour.")
                elif outside.mean() > 0.0005:
                    warn(f"{100 * outside.sum() / strokes.sum():.0f}% of your sketch lies outside the painted region "
                         "and is ignored: only strokes inside the region guide the edit.")
        elif mask.any():
            warn("No sketch strokes: this runs as a plain text edit. Draw with a solid colour to guide the shape "
                 "and colour.")
    else:
        raise ValueError(f"mode must be 'text' or 'sketch', got {mode!r}")

    if not mask.any():
        where = "with the brush" if mode == "text" else "with the translucent pink brush (or draw coloured strokes)"
        raise UserError(f"The mask is empty: paint over the region to change {where}, then click Generate.")
    ratio = float(mask.mean())
    if ratio >= FULL_MASK_WARN:
        warn(f"The mask covers {100 * ratio:.0f}% of the canvas: almost nothing of the image is kept as context, "
             "and LazyDiffusion has no speed advantage on such a mask. Paint a smaller region for a real edit.")
    return Canvas(rgb=rgb, mask=mask, sketch=sketch)


_LATIN_OK = ("LATIN", "DIGIT", "SPACE", "HYPHEN", "APOSTROPHE", "COMMA", "FULL STOP")


def clean_prompt(prompt: Any, tokenizer=None, warn: Warn = _gr_warn, what: str = "prompt",
                 empty_ok: bool = False, max_tokens: Optional[int] = None) -> str:
    """Normalise a prompt (NFC, no control characters, single spaces) and warn about what the
    model will not understand. Raises gr.Error for non-strings and over-long prompts."""
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise UserError(f"The {what} must be text, got {type(prompt).__name__}.")
    text = unicodedata.normalize("NFC", prompt)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)
    text = " ".join(text.split())
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"The {what} is {len(text)} characters long; keep it under {MAX_PROMPT_CHARS} "
                       "(a short phrase such as 'a small red star' works best).")
    if not text:
        if not empty_ok:
            warn("Empty prompt: the model paints whatever it finds likely there, sometimes background, sometimes "
                 "an object. To remove something write 'empty background'; to add something describe it, "
                 "e.g. 'a small red star'.")
        return text
    letters = [c for c in text if c.isalpha()]
    non_latin = sorted({c for c in letters if not unicodedata.name(c, "").startswith("LATIN")})
    unknown: List[str] = []
    if tokenizer is not None:
        unk = getattr(tokenizer, "unk_token", None)
        try:
            words = text.split()
            unknown = [wd for wd in words if unk is not None and unk in tokenizer.tokenize(wd)]
        except Exception:  # noqa: BLE001 - a tokenizer hiccup must not break the edit
            unknown = []
        if max_tokens:
            try:
                n = len(tokenizer(text, truncation=False)["input_ids"])
            except Exception:  # noqa: BLE001
                n = 0
            if n > max_tokens:
                warn(f"The {what} is {n} tokens long; the model reads the first {max_tokens} only.")
    if non_latin:
        shown = "".join(non_latin[:12])
        warn(f"The {what} contains non-Latin characters ({shown}). The model was trained on English captions, "
             "so it cannot read them" + (f" (unknown words: {', '.join(unknown[:5])})" if unknown else "") +
             ". Try English, e.g. 'a small red star'.")
    elif unknown:
        warn(f"The model's tokenizer does not know: {', '.join(unknown[:8])}. Those words are ignored.")
    return text


# --------------------------------------------------------------------------------------------- resolution policy
def to_working(canvas: Canvas, max_side: int) -> Tuple[Canvas, float]:
    """The canvas at the model's working size (mask grown so it covers the full-res mask) and the scale."""
    rgb, mask, sketch, scale = downscale_edit(canvas.rgb, canvas.mask, canvas.sketch, max_side)
    return (canvas if scale == 1.0 else Canvas(rgb=rgb, mask=mask, sketch=sketch)), scale


def paste_back(canvas: Canvas, edited: np.ndarray, scale: float) -> np.ndarray:
    """The full-res result: ``edited`` (working size) upscaled and pasted inside the full-res mask only."""
    return paste_full(canvas.rgb, canvas.mask, edited, scale)


# --------------------------------------------------------------------------------------------- history
def new_history() -> Dict[str, Any]:
    """Per-session canvas history (kept in a gr.State): canvases, labels, position, last variations, and
    for each canvas the (mask, sketch) of the edit made from it, so Undo gives them back to retry."""
    return {"items": [], "labels": [], "pos": -1, "variations": [], "inputs": []}


def _copy(h: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if not isinstance(h, dict) or "items" not in h:
        return new_history()
    inputs = list(h.get("inputs") or [])
    return {"items": list(h["items"]), "labels": list(h["labels"]), "pos": int(h["pos"]),
            "variations": list(h.get("variations") or []),
            "inputs": (inputs + [None] * len(h["items"]))[:len(h["items"])]}


def history_set_inputs(h: Dict[str, Any], mask: np.ndarray, sketch: Optional[np.ndarray]) -> Dict[str, Any]:
    """Record the mask and sketch of the edit about to be made from the current canvas."""
    h = _copy(h)
    if h["pos"] >= 0:
        h["inputs"][h["pos"]] = (mask, sketch)
    return h


def history_current_inputs(h: Optional[Dict[str, Any]]) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(mask, sketch) of the edit made from the current canvas, or (None, None)."""
    if not isinstance(h, dict) or h.get("pos", -1) < 0 or h["pos"] >= len(h.get("inputs") or []):
        return None, None
    return h["inputs"][h["pos"]] or (None, None)


def history_current(h: Optional[Dict[str, Any]]) -> Optional[np.ndarray]:
    if not isinstance(h, dict) or not h.get("items") or h["pos"] < 0:
        return None
    return h["items"][h["pos"]]


def same_canvas(a: Optional[np.ndarray], b: Optional[np.ndarray], tol: int = 2) -> bool:
    """Equal up to ``tol`` per channel (a round trip through the browser may nudge values)."""
    if a is None or b is None or a.shape != b.shape:
        return False
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(initial=0)) <= tol


def _history_bytes(h: Dict[str, Any]) -> int:
    arrays = list(h["items"]) + [a for pair in h["inputs"] if pair for a in pair if a is not None]
    return sum(a.nbytes for a in arrays)


def history_push(h: Optional[Dict[str, Any]], img: np.ndarray, label: str) -> Dict[str, Any]:
    """A new history with ``img`` after the current position (the redo branch is dropped)."""
    h = _copy(h)
    keep = h["pos"] + 1
    h["items"], h["labels"] = h["items"][:keep] + [img], h["labels"][:keep] + [label]
    h["inputs"] = h["inputs"][:keep] + [None]
    # Bound memory: oldest entries go first.
    while len(h["items"]) > 1 and (len(h["items"]) > HISTORY_LIMIT or _history_bytes(h) > HISTORY_BYTES):
        h["items"].pop(0)
        h["labels"].pop(0)
        h["inputs"].pop(0)
    h["pos"] = len(h["items"]) - 1
    h["variations"] = []
    return h


def history_replace(h: Dict[str, Any], img: np.ndarray, label: str) -> Dict[str, Any]:
    """Swap the current entry (picking another variation of the same edit)."""
    h2 = _copy(h)
    if h2["pos"] < 0:
        return history_push(h2, img, label)
    h2["items"][h2["pos"]] = img
    h2["labels"][h2["pos"]] = label
    h2["variations"] = list(h.get("variations") or [])
    return h2


def history_move(h: Optional[Dict[str, Any]], to: str, warn: Warn = _gr_warn) -> Dict[str, Any]:
    """``to``: "undo", "redo" or "reset" (back to the first canvas; redo walks forward again)."""
    h = _copy(h)
    n, pos = len(h["items"]), h["pos"]
    if n == 0:
        warn("Nothing in the history yet: generate an edit first.")
        return h
    if to == "undo":
        if pos <= 0:
            warn("Nothing to undo: this is the first canvas of your history.")
        h["pos"] = max(pos - 1, 0)
    elif to == "redo":
        if pos >= n - 1:
            warn("Nothing to redo.")
        h["pos"] = min(pos + 1, n - 1)
    elif to == "reset":
        h["pos"] = 0
    else:
        raise ValueError(to)
    h["variations"] = []
    return h


def history_markdown(h: Optional[Dict[str, Any]]) -> str:
    if not isinstance(h, dict) or not h.get("items"):
        return "History: empty. Each Generate adds a step; Undo / Redo / Reset move through them."
    pos, n = h["pos"], len(h["items"])
    label = h["labels"][pos]
    return f"History: step **{pos + 1} of {n}**, {label}"


# --------------------------------------------------------------------------------------------- the edit
@dataclass
class EditRequest:
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 4.5
    variations: int = 1
    compare: bool = False
    strength: float = 1.0  # sketch edits only
    preview_every: Optional[int] = None

    def steps_run(self, has_sketch: bool) -> int:
        if has_sketch and self.strength < 1.0:
            return min(max(int(round(self.steps * self.strength)), 1), self.steps)
        return self.steps


def normalise_request(prompt, negative_prompt, seed, randomize, steps, guidance, variations, compare,
                      strength=1.0, tokenizer=None, warn: Warn = _gr_warn, mode: str = "text",
                      max_tokens: Optional[int] = None) -> EditRequest:
    """UI values -> a valid :class:`EditRequest` (clamped, with warnings) or gr.Error."""
    def num(x, default, name, cast=float):
        if x is None or (isinstance(x, str) and not x.strip()):
            return default
        try:
            v = cast(float(x))
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number, got {x!r}.") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{name} must be a finite number, got {x!r}.")
        return v

    def clamp(v, lo, hi, name):
        if v < lo or v > hi:
            warn(f"{name} {v} is outside [{lo}, {hi}]; using {min(max(v, lo), hi)}.")
        return min(max(v, lo), hi)

    p = clean_prompt(prompt, tokenizer, warn, "prompt", empty_ok=(mode == "sketch"), max_tokens=max_tokens)
    n = clean_prompt(negative_prompt, tokenizer, warn, "negative prompt", empty_ok=True)
    if randomize:
        seed_v = random.randint(0, MAX_SEED)
    else:
        seed_v = clamp(num(seed, 0, "Seed", lambda v: int(v)), 0, MAX_SEED, "Seed")
    return EditRequest(
        prompt=p, negative_prompt=n, seed=int(seed_v),
        steps=int(clamp(num(steps, 20, "Steps", lambda v: int(round(v))), 1, MAX_STEPS, "Steps")),
        guidance=float(clamp(num(guidance, 4.5, "Guidance"), 0.0, 20.0, "Guidance")),
        variations=int(clamp(num(variations, 1, "Variations", lambda v: int(round(v))), 1, MAX_VARIATIONS, "Variations")),
        compare=bool(compare),
        strength=float(clamp(num(strength, 1.0, "Strength"), 0.05, 1.0, "Strength")),
    )


@dataclass
class Progress:
    phase: str        # "LazyDiffusion" | "RegenerateImage baseline"
    step: int
    total: int


@dataclass
class Preview:
    image: np.ndarray  # working-size RGB canvas with the current estimate inside the mask
    step: int
    total: int


@dataclass
class RunInfo:
    timings: Dict[str, float]
    stats: Dict[str, Any]

    @property
    def model_ms(self) -> float:
        """End-to-end time without the demo's preview rendering."""
        return self.timings.get("total", 0.0) - self.timings.get("callback", 0.0)


@dataclass
class EditResult:
    images: List[np.ndarray]            # full-res RGB variations; images[0] becomes the canvas
    lazy: RunInfo
    request: EditRequest
    canvas_size: Tuple[int, int]        # (H, W) full res
    work_size: Tuple[int, int]          # (H, W) the model saw
    mask_ratio: float                   # of the full-res canvas
    baseline_image: Optional[np.ndarray] = None
    baseline: Optional[RunInfo] = None
    notes: List[str] = field(default_factory=list)

    @property
    def speedup(self) -> Optional[float]:
        if self.baseline is None or self.lazy.model_ms <= 0:
            return None
        return self.baseline.model_ms / self.lazy.model_ms


def _pipeline_error(err: Exception, what: str) -> gr.Error:
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, ValueError):  # the pipelines' validation messages are written for users
        return UserError(f"{what} refused this edit: {err}. Your canvas and history are unchanged.")
    log.exception("%s failed", what)
    return UserError(f"{what} failed on this edit ({type(err).__name__}: {str(err)[:200]}). Your canvas and "
                    "history are unchanged; try again, or with a smaller image or mask.")


def _run(models, canvas: Canvas, req: EditRequest, events: "queue.Queue", cancel: threading.Event) -> EditResult:
    import torch

    from .models import ModelUnavailable

    def note(msg: str) -> None:  # warnings are shown by the consumer, in the request's context
        events.put(("warn", msg))

    try:
        pipe = models.lazy()
    except ModelUnavailable as err:
        raise UserError(f"The model is not available: {err}") from None
    work, scale = to_working(canvas, models.max_side)
    if scale != 1.0:
        note(f"The image is {canvas.size[1]}x{canvas.size[0]}: the model edits it at "
                      f"{work.size[1]}x{work.size[0]}, and only the masked region is pasted back at full "
                      "resolution (everything else keeps its original pixels).")
    sketch = PIL.Image.fromarray(work.sketch, "RGBA") if work.sketch is not None else None
    total = req.steps_run(sketch is not None)
    every = req.preview_every or max(1, math.ceil(total / 6))

    def callback(phase, previews):
        def cb(p, i, t, kwargs):
            if cancel.is_set():
                raise Cancelled()
            events.put(Progress(phase, i + 1, total))
            if previews and (i + 1) % every == 0 and i + 1 < total and "decode_preview" in kwargs:
                events.put(Preview(np.asarray(kwargs["decode_preview"]().convert("RGB")), i + 1, total))
            return None
        return cb

    image, mask = PIL.Image.fromarray(work.rgb), PIL.Image.fromarray(work.mask.astype(np.uint8) * 255)
    common = dict(negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
                  guidance_scale=req.guidance, sketch=sketch,
                  strength=req.strength if sketch is not None else 1.0)
    try:
        with models.lock:
            out = pipe(req.prompt, image, mask, generator=torch.Generator("cpu").manual_seed(req.seed),
                       num_images_per_prompt=req.variations,
                       callback_on_step_end=callback("LazyDiffusion", True), **common)
    except Cancelled:
        raise
    except Exception as err:  # noqa: BLE001
        raise _pipeline_error(err, "LazyDiffusion") from None
    images = [paste_back(canvas, np.asarray(im.convert("RGB")), scale) for im in out.images]
    for key in ("prompt_truncated", "mask_thresholded"):
        if out.stats.get(key):
            note(str(out.stats[key]).capitalize() + ".")
    result = EditResult(images=images, lazy=RunInfo(dict(out.timings), dict(out.stats)), request=req,
                        canvas_size=canvas.size, work_size=work.size, mask_ratio=canvas.mask_ratio)

    if req.compare:
        try:
            base = models.baseline()
        except ModelUnavailable as err:
            note(f"The comparison is unavailable: {err}")
            return result
        try:
            with models.lock:
                bout = base(req.prompt, image, mask, generator=torch.Generator("cpu").manual_seed(req.seed),
                            num_images_per_prompt=1, callback_on_step_end=callback("RegenerateImage baseline", False),
                            **common)
        except Cancelled:
            raise
        except Exception as err:  # noqa: BLE001 - the lazy result stands; the comparison is extra
            note(str(_pipeline_error(err, "The RegenerateImage baseline")))
            return result
        result.baseline_image = paste_back(canvas, np.asarray(bout.images[0].convert("RGB")), scale)
        result.baseline = RunInfo(dict(bout.timings), dict(bout.stats))
    return result


def stream_edit(models, canvas: Canvas, req: EditRequest, cancel: Optional[threading.Event] = None,
                warn: Warn = _gr_warn) -> Iterator[Union[Progress, Preview, EditResult]]:
    """Run the edit in a worker thread; yield :class:`Progress` and :class:`Preview` events while it
    denoises, then the :class:`EditResult`. Closing the generator cancels the run at the next step."""
    cancel = cancel or threading.Event()
    events: "queue.Queue" = queue.Queue()

    def worker():
        try:
            events.put(("done", _run(models, canvas, req, events, cancel)))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            events.put(("error", err))

    thread = threading.Thread(target=worker, name="lazydiff-edit", daemon=True)
    thread.start()
    try:
        while True:
            item = events.get()
            if isinstance(item, tuple):
                kind, payload = item
                if kind == "warn":
                    warn(payload)
                    continue
                if kind == "error":
                    if isinstance(payload, Cancelled):
                        raise UserError("The edit was cancelled.")
                    raise payload if isinstance(payload, gr.Error) else _pipeline_error(payload, "The demo")
                yield payload
                return
            yield item
    finally:
        cancel.set()


def run_edit(models, canvas: Canvas, req: EditRequest, warn: Warn = _gr_warn) -> EditResult:
    """The edit without streaming (for scripts and tests)."""
    result = None
    for ev in stream_edit(models, canvas, req, warn=warn):
        if isinstance(ev, EditResult):
            result = ev
    return result


# --------------------------------------------------------------------------------------------- presenting it
STAGES = (("text", "Text encoder"), ("vae_encode", "VAE encode"), ("context_encoder", "Context encoder (once)"),
          ("denoise", "Denoising"), ("vae_decode", "VAE decode"), ("blend", "Blend"))


def _ms(v: float) -> str:
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"


def _stage_rows(timings: Dict[str, float], steps: int, scale_ms: float, cls: str = "") -> str:
    rows = []
    for key, name in STAGES:
        if key not in timings:
            continue
        v = timings[key]
        extra = f" <span class='ld-sub'>({_ms(v / max(steps, 1))}/step x {steps})</span>" if key == "denoise" else ""
        width = 100 * v / scale_ms if scale_ms > 0 else 0
        rows.append(f"<tr><td class='ld-stage'>{name}{extra}</td><td class='ld-barcell'><div class='ld-bar {cls}' "
                    f"style='width:{max(width, 0.5):.1f}%'></div></td><td class='ld-ms'>{_ms(v)}</td></tr>")
    return "".join(rows)


def speed_html(res: EditResult) -> str:
    """The 'speed made visible' panel: mask %, hole tokens / all tokens, time per stage."""
    st, tm = res.lazy.stats, res.lazy.timings
    hole, tot = int(st.get("hole_tokens", 0)), int(st.get("total_tokens", 0))
    steps = int(st.get("steps", res.request.steps))
    total = res.lazy.model_ms
    kpis = [
        (f"{100 * res.mask_ratio:.1f}%", "of the canvas masked"),
        (f"{hole:,} / {tot:,}", f"tokens denoised ({100 * hole / max(tot, 1):.0f}%)"),
        (_ms(total), f"end to end, {steps} steps"),
    ]
    if res.speedup is not None:
        kpis.append((f"{res.speedup:.1f}x", "faster than full canvas" if res.speedup >= 1 else
                     "the full-canvas time (slower here: tiny canvas or mask)"))
    kpi_html = "".join(f"<div class='ld-kpi'><div class='ld-v'>{v}</div><div class='ld-k'>{k}</div></div>" for v, k in kpis)
    notes = [f"seed {res.request.seed}"]
    h, w = res.canvas_size
    wh, ww = res.work_size
    if (wh, ww) != (h, w):
        notes.append(f"canvas {w}x{h}, model at {ww}x{wh}, pasted back at full res inside the mask")
    else:
        notes.append(f"canvas {w}x{h}, token grid {'x'.join(str(v) for v in st.get('token_grid', ()))}")
    if tm.get("callback"):
        notes.append(f"live previews took {_ms(tm['callback'])} more (not counted)")
    return (f"<div class='ld-stats'><div class='ld-kpis'>{kpi_html}</div>"
            f"<table class='ld-table'>{_stage_rows(tm, steps, max(total, 1e-6))}"
            f"<tr class='ld-total'><td>Total</td><td></td><td class='ld-ms'>{_ms(total)}</td></tr></table>"
            f"<div class='ld-note'>{' · '.join(notes)}</div></div>")


def compare_html(res: EditResult) -> str:
    """Both runs' stage times side by side and the speedup."""
    if res.baseline is None:
        return ""
    lt, bt = res.lazy, res.baseline
    steps = int(lt.stats.get("steps", res.request.steps))
    scale = max(lt.model_ms, bt.model_ms, 1e-6)
    ld = lt.timings.get("denoise", 0.0)
    bd = bt.timings.get("denoise", 0.0)
    dn = f"{bd / ld:.1f}x" if ld > 0 else "n/a"
    hole, tot = int(lt.stats.get("hole_tokens", 0)), int(lt.stats.get("total_tokens", 0))
    return (f"<div class='ld-stats'><div class='ld-kpis'>"
            f"<div class='ld-kpi'><div class='ld-v'>{_ms(lt.model_ms)}</div><div class='ld-k'>LazyDiffusion ({hole:,} tokens/step)</div></div>"
            f"<div class='ld-kpi'><div class='ld-v'>{_ms(bt.model_ms)}</div><div class='ld-k'>RegenerateImage ({tot:,} tokens/step)</div></div>"
            f"<div class='ld-kpi ld-hl'><div class='ld-v'>{res.speedup:.1f}x</div><div class='ld-k'>end-to-end speedup (denoising {dn})</div></div>"
            f"</div><table class='ld-table'><tr><th colspan=3>LazyDiffusion</th></tr>{_stage_rows(lt.timings, steps, scale)}"
            f"<tr><th colspan=3>RegenerateImage (full canvas)</th></tr>{_stage_rows(bt.timings, steps, scale, 'ld-base')}</table>"
            f"<div class='ld-note'>Same canvas, mask, prompt, seed and steps; times exclude live-preview rendering.</div></div>")


# --------------------------------------------------------------------------------------------- downloads
_DOWNLOAD_DIR: Optional[str] = None


def canvas_png(img: Optional[np.ndarray]) -> Optional[str]:
    """Write the canvas to a PNG for the download button (a temp folder, old files pruned)."""
    global _DOWNLOAD_DIR
    if img is None:
        return None
    if _DOWNLOAD_DIR is None or not os.path.isdir(_DOWNLOAD_DIR):
        _DOWNLOAD_DIR = tempfile.mkdtemp(prefix="lazydiff-demo-")
    digest = hashlib.sha1(img.tobytes() + str(img.shape).encode()).hexdigest()[:16]
    path = os.path.join(_DOWNLOAD_DIR, f"canvas-{digest}.png")
    if not os.path.exists(path):
        PIL.Image.fromarray(img).save(path)
    now = time.time()
    for name in os.listdir(_DOWNLOAD_DIR):  # keep the folder small
        p = os.path.join(_DOWNLOAD_DIR, name)
        try:
            if now - os.path.getmtime(p) > 3600:
                os.remove(p)
        except OSError:
            pass
    return path
