"""Training data from your own images (``data:`` in a training config), for the two diffusion models.

``data`` is a manifest (JSON lines or CSV, paths relative to it) or a folder holding one:

* ``manifest.jsonl`` / ``manifest.csv``: columns ``image`` and ``prompt``, optional ``mask`` (white =
  the hole; the prompt then describes what goes there, the paper's local prompts) and ``reference``
  (the image after the edit, the target inside the hole; default: the image itself). An evaluation
  folder suite's manifest (``eval/README.md``) is such a file.
* ``metadata.jsonl`` / ``metadata.csv``: Hugging Face imagefolder's ``file_name`` and ``text``.
* no manifest: every image with a same-named ``.txt`` caption beside it.

A row without a mask gets a random box or brush mask of 2–60% of the crop (ShapesWorld's mask makers,
:func:`lazydiff.shapesworld.random_edit_mask`), and its prompt is the image's caption. Images are scaled
so their shorter side is ``image_size`` and cropped square (around the mask where there is one).

Deterministic like the ShapesWorld stream: sample seed ``s`` is row ``perm(s // N)[s % N]`` of the N rows,
a fresh permutation per window of N seeds (an epoch), and every random draw (crop, mask) comes from ``s``,
so a resumed run sees the same data.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..manifest import JSON_SUFFIXES, CSV_SUFFIXES, ManifestError, load_mask, load_rgb, read_rows

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "metadata.jsonl", "metadata.csv")
REQUIRED = ("image", "prompt")
OPTIONAL = ("mask", "reference", "id", "intent", "negative_prompt")  # the last three: eval suites' columns
ALIASES = {"file_name": "image", "text": "prompt", "caption": "prompt"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Row:
    image: Path
    prompt: str
    mask: Optional[Path]
    reference: Optional[Path]
    where: str  # "manifest.jsonl:3", for errors


def find_manifest(data: str) -> Optional[Path]:
    """The manifest file ``data`` names or holds; None for a folder of images with ``.txt`` captions."""
    p = Path(data)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ManifestError(f"data: {data!r} is neither a manifest file nor a folder; give a manifest (.jsonl / .csv "
                            f"with columns image, prompt[, mask, reference]) or a folder holding one")
    for name in MANIFEST_NAMES:
        if (p / name).is_file():
            return p / name
    return None


@functools.lru_cache(maxsize=4)  # once per process (and DataLoader worker), not per batch
def load_rows(data: str, check_files: bool = True) -> List[Row]:
    """Every training row of ``data``; ``check_files``: every listed file checked to exist (the training
    process does it once before the run; its data workers skip it). Files are opened only when used."""
    manifest = find_manifest(data)
    if manifest is None:
        rows = _caption_rows(Path(data))
    else:
        if manifest.suffix.lower() not in JSON_SUFFIXES + CSV_SUFFIXES:
            raise ManifestError(f"data: {manifest} is not a manifest (.jsonl or .csv)")
        root = manifest.parent
        rows = [Row(root / str(r["image"]), str(r["prompt"]), root / str(r["mask"]) if r.get("mask") else None,
                    root / str(r["reference"]) if r.get("reference") else None, f"{manifest}:{r['_line']}")
                for r in read_rows(manifest, REQUIRED, OPTIONAL, ALIASES, what="image")]
    missing = [f"{r.where}: {kind} {path} does not exist" for r in rows if check_files
               for kind, path in (("image", r.image), ("mask", r.mask), ("reference", r.reference))
               if path is not None and not path.is_file()]
    if missing:
        raise ManifestError(f"data: {len(missing)} listed file(s) missing:\n  - " + "\n  - ".join(missing[:20])
                            + ("\n  - ..." if len(missing) > 20 else "") + "\nFix the paths (relative to the manifest) "
                            "or remove those rows")
    return rows


def _caption_rows(folder: Path) -> List[Row]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    rows = [Row(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip(), None, None, str(p))
            for p in images if p.with_suffix(".txt").is_file()]
    if not rows:
        raise ManifestError(f"data: {folder} holds no manifest ({', '.join(MANIFEST_NAMES)}) and no image with a "
                            "same-named .txt caption; write manifest.jsonl with one line per image: "
                            '{"image": "a.png", "prompt": "..."} (optional "mask", "reference")')
    empty = [r.where for r in rows if not r.prompt]
    if empty:
        raise ManifestError(f"data: empty caption for {empty[0]} (its .txt file); write what the image shows")
    return rows


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([n, epoch]).permutation(n)


def row_for_seed(n: int, seed: int) -> int:
    epoch, pos = divmod(int(seed), n)
    return int(_epoch_order(n, epoch)[pos])


def _square_crop(h: int, w: int, size: int, box, rng) -> tuple:
    """Top-left corner of a size x size window in an (h, w) image, holding ``box`` (y0, y1, x0, x1) where it fits."""
    def pick(lo_edge, hi_edge, length):
        lo, hi = 0, length - size
        if box is not None:  # the window must start at or before the box and end at or after it
            lo, hi = max(lo, hi_edge - size), min(hi, lo_edge)
            if lo > hi:  # the box is larger than the window: centre on it
                lo = hi = int(np.clip((lo_edge + hi_edge - size) // 2, 0, length - size))
        return int(rng.integers(lo, hi + 1))

    y0, y1, x0, x1 = box if box is not None else (0, 0, 0, 0)
    return pick(y0, y1, h), pick(x0, x1, w)


def folder_sample(row: Row, seed: int, size: int) -> Dict[str, object]:
    """(canvas, target, mask, prompt) of one row at ``size`` x ``size``, every draw from ``seed``."""
    import PIL.Image

    from ..pipelines.working_size import resize_mask
    from ..shapesworld.tasks import random_edit_mask

    rng = np.random.default_rng(int(seed))
    try:
        image = load_rgb(row.image)
        mask = load_mask(row.mask) if row.mask is not None else None
        target = load_rgb(row.reference) if row.reference is not None else image
    except Exception as err:  # PIL raises many types for broken files
        raise ManifestError(f"{row.where}: could not read an image of this row ({type(err).__name__}: {err}); fix "
                            "or remove the row") from None
    h, w = image.shape[:2]
    for name, arr in (("mask", mask), ("reference", target)):
        if arr is not None and arr.shape[:2] != (h, w):
            raise ManifestError(f"{row.where}: the {name} is {arr.shape[1]}x{arr.shape[0]} but the image is {w}x{h} "
                                "(width x height); they must match")
    scale = size / min(h, w)
    sh, sw = max(size, round(h * scale)), max(size, round(w * scale))

    def resized(arr, resample):
        return np.asarray(PIL.Image.fromarray(arr).resize((sw, sh), resample)) if (sh, sw) != (h, w) else arr

    image = resized(image, PIL.Image.BICUBIC)
    target = image if row.reference is None else resized(target, PIL.Image.BICUBIC)
    box = None
    if mask is not None:
        if (sh, sw) != (h, w):   # a pixel the hole overlaps stays in it, as everywhere masks are resized
            mask = resize_mask(mask, sh, sw)
        if not mask.any():
            raise ManifestError(f"{row.where}: the mask is empty at {size} px (paint the edit region white)")
        ys, xs = np.nonzero(mask)
        box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    top, left = _square_crop(sh, sw, size, box, rng)
    crop = (slice(top, top + size), slice(left, left + size))
    image = np.ascontiguousarray(image[crop])
    target = image if row.reference is None else np.ascontiguousarray(target[crop])
    mask = mask[crop] if mask is not None else random_edit_mask(rng, (size, size))
    return {"canvas": image, "target": target, "mask": mask, "prompt": row.prompt}


def folder_edit_batch(seeds: Sequence[int], size: int, data: str) -> Dict[str, object]:
    """A training batch (the layout of :func:`lazydiff.train.data.edit_batch`) from ``data``'s rows."""
    import torch

    from .data import _images

    rows = load_rows(str(data), check_files=False)   # checked before the run started
    samples = [folder_sample(rows[row_for_seed(len(rows), s)], int(s), size) for s in seeds]
    return {"canvas": _images(np.stack([s["canvas"] for s in samples])),
            "target": _images(np.stack([s["target"] for s in samples])),
            "mask": torch.from_numpy(np.stack([s["mask"] for s in samples]))[:, None],
            "prompt": [s["prompt"] for s in samples]}


def prompts_of(data: str) -> List[str]:
    """Every prompt of ``data`` once (for a text-feature table)."""
    return list(dict.fromkeys(r.prompt for r in load_rows(str(data))))
