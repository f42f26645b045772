"""Reading users' image files, and manifests of images with prompts (JSON lines or CSV, one row per image,
paths relative to the manifest).

:func:`open_image` is how the CLI, the demo and the loaders below open a file: EXIF orientation applied,
as image viewers and browsers show it (a phone photo stored sideways, with a mask drawn on what the user
saw, must not come out rotated). Manifests are shared by training on your own images (``data:`` in a
training config, :mod:`lazydiff.train.image_folder`) and the evaluation's folder suites (:mod:`eval.suites`),
so a suite's manifest is also training data.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Type

import numpy as np

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")


class ManifestError(ValueError):
    """A manifest (or a file it lists) is invalid; the message says what to fix."""


def read_rows(path: Path, required: Sequence[str], optional: Sequence[str], aliases: Mapping[str, str] = None,
              error: Type[ValueError] = ManifestError, what: str = "edit") -> List[Dict[str, Any]]:
    """Rows of a JSON-lines or CSV manifest, each with its ``_line`` number, checked for the ``required``
    columns (non-empty) and for columns that are neither required nor ``optional``. ``aliases`` renames
    columns first (e.g. Hugging Face imagefolder's ``file_name`` / ``text``)."""
    path = Path(path)
    aliases = dict(aliases or {})
    if not path.exists():
        raise error(f"manifest {path} not found; write a JSON-lines or CSV file with columns {', '.join(required)}")
    rows: List[Dict[str, Any]] = []
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise error(f"{path}:{ln}: not valid JSON ({err.msg}); write one JSON object per line") from None
                if not isinstance(row, dict):
                    raise error(f"{path}:{ln}: expected a JSON object with keys {', '.join(required)}")
                row["_line"] = ln
                rows.append(row)
    elif suffix in CSV_SUFFIXES:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for ln, row in enumerate(reader, 2):
                row = {k.strip(): v for k, v in row.items() if k is not None}
                row["_line"] = ln
                rows.append(row)
    else:
        raise error(f"manifest {path}: unsupported extension {suffix!r}; use .jsonl (JSON lines) or .csv")
    if not rows:
        raise error(f"manifest {path} is empty; add one line per {what} with {', '.join(required)}")
    allowed = set(required) | set(optional) | {"_line"}
    for i, row in enumerate(rows):
        row = rows[i] = {aliases.get(k, k): v for k, v in row.items()}
        missing = [k for k in required if not row.get(k)]
        if missing:
            raise error(f"{path}:{row['_line']}: missing {', '.join(missing)}; every row needs {', '.join(required)}"
                        f" (optional: {', '.join(optional)})")
        extra = [k for k in row if k not in allowed]
        if extra:
            raise error(f"{path}:{row['_line']}: unknown column(s) {', '.join(map(repr, extra))}; allowed: "
                        f"{', '.join(list(required) + list(optional))}")
    return rows


def open_image(path) -> "PIL.Image.Image":
    """The image in ``path``, loaded (the file is closed) and turned upright by its EXIF orientation."""
    import PIL.Image
    import PIL.ImageOps

    with PIL.Image.open(path) as im:
        im.load()
        upright = PIL.ImageOps.exif_transpose(im)
        return upright if upright is not im else im.copy()


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; any mode PIL reads (alpha dropped)."""
    return np.asarray(open_image(path).convert("RGB"))


def load_mask(path: Path) -> np.ndarray:
    """(H, W) bool, white (>= 128) = edit; an RGBA / LA mask's opaque pixels count too."""
    im = open_image(path)
    if im.mode in ("RGBA", "LA"):
        arr = np.maximum(np.asarray(im.convert("L")), np.asarray(im.getchannel("A")))
    else:
        arr = np.asarray(im.convert("L"))
    return arr >= 128
