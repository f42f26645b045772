"""The demo's one-click examples: ShapesWorld canvases with prepared masks, prompts and sketches.

Files live in ``data/examples``: ``<id>.png`` (canvas), ``<id>_mask.png`` (L, 255 = edit),
``<id>_sketch.png`` (RGBA strokes, sketch examples only) and ``manifest.json``. Regenerate them with

    python -m demo.examples [--size 128] [--out data/examples]

They are drawn from the ShapesWorld *validation* split (never the held-out test split), with
:func:`lazydiff.shapesworld.make_task`, so each has an exact ground truth (``<id>_target.png``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import PIL.Image

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "examples"
MANIFEST = "manifest.json"


@dataclass
class Example:
    id: str
    task: str                         # "text" | "sketch"
    title: str
    prompt: str
    image: np.ndarray                 # (H, W, 3) uint8
    mask: np.ndarray                  # (H, W) bool
    sketch: Optional[np.ndarray] = None  # (H, W, 4) uint8
    strength: float = 0.8

    def editor_value(self):
        from .handlers import editor_value

        return editor_value(self.image, mask=self.mask, sketch=self.sketch)

    def thumbnail(self) -> np.ndarray:
        from .handlers import overlay

        return overlay(self.image, self.mask, self.sketch)


def load_examples(task: Optional[str] = None, folder: Optional[Path] = None) -> List[Example]:
    """The examples of the manifest (``task`` filters "text" / "sketch"); [] when there are none."""
    folder = Path(folder or EXAMPLES_DIR)
    path = folder / MANIFEST
    if not path.exists():
        return []
    out = []
    for e in json.loads(path.read_text())["examples"]:
        if task and e["task"] != task:
            continue
        try:
            image = np.asarray(PIL.Image.open(folder / e["image"]).convert("RGB"))
            mask = np.asarray(PIL.Image.open(folder / e["mask"]).convert("L")) > 127
            sketch = np.asarray(PIL.Image.open(folder / e["sketch"]).convert("RGBA")) if e.get("sketch") else None
        except (OSError, KeyError):
            continue  # a missing file must not take the demo down
        out.append(Example(id=e["id"], task=e["task"], title=e.get("title", e["prompt"]), prompt=e["prompt"],
                           image=image, mask=mask, sketch=sketch, strength=float(e.get("strength", 0.8))))
    return out


# --------------------------------------------------------------------------------------------- generation
def _rough_sketch(obj_mask: np.ndarray, rgb, seed: int) -> np.ndarray:
    """A rough blob of the object's colour, as a user would draw it: the silhouette, eroded and with
    its corners rounded off."""
    from scipy.ndimage import binary_erosion, binary_opening

    m = binary_erosion(obj_mask, iterations=1) if obj_mask.sum() > 60 else obj_mask
    m = binary_opening(m, iterations=2) if m.sum() > 120 else m
    out = np.zeros(m.shape + (4,), np.uint8)
    out[m] = (*rgb, 255)
    return out


def _pick(seed_range, want: dict, size, taken) -> Optional[object]:
    from lazydiff.shapesworld import make_task

    for seed in seed_range:
        if seed in taken:
            continue
        t = make_task(seed, size, kind=want.get("kind"), intent=want.get("intent"))
        lo, hi = want.get("ratio", (0.04, 0.2))
        if not lo <= t.mask_ratio <= hi:
            continue
        if want.get("object") and not t.is_object_edit:
            continue
        taken.add(seed)
        return t
    return None


SPECS = [
    # id, task, what to look for
    ("insert-object", "text", dict(intent="insert", kind="object", object=True, ratio=(0.04, 0.15))),
    ("replace-box", "text", dict(intent="replace", kind="box", object=True, ratio=(0.06, 0.2))),
    ("insert-brush", "text", dict(intent="insert", kind="brush", object=True, ratio=(0.05, 0.2))),
    ("remove-object", "text", dict(intent="remove", kind="object", ratio=(0.03, 0.15))),
    ("sketch-insert", "sketch", dict(intent="insert", kind="box", object=True, ratio=(0.06, 0.2))),
    ("sketch-replace", "sketch", dict(intent="replace", kind="object", object=True, ratio=(0.05, 0.2))),
]


def generate(out: Path = EXAMPLES_DIR, size: int = 128, first_seed: int = 10_100_000) -> List[dict]:
    """Write the example files and the manifest; returns the manifest entries."""
    from lazydiff.shapesworld import make_split

    out.mkdir(parents=True, exist_ok=True)
    val = make_split("val")
    seeds = range(max(first_seed, val.start), val.stop)
    taken: set = set()
    entries = []
    for ex_id, task, want in SPECS:
        t = _pick(seeds, want, (size, size), taken)
        if t is None:
            raise RuntimeError(f"no validation task matches {ex_id}: {want}")
        PIL.Image.fromarray(t.canvas).save(out / f"{ex_id}.png")
        PIL.Image.fromarray(t.mask.astype(np.uint8) * 255, "L").save(out / f"{ex_id}_mask.png")
        PIL.Image.fromarray(t.target).save(out / f"{ex_id}_target.png")
        entry = {"id": ex_id, "task": task, "prompt": t.prompt, "image": f"{ex_id}.png", "mask": f"{ex_id}_mask.png",
                 "target": f"{ex_id}_target.png", "seed": int(t.seed), "split": "val", "kind": t.kind,
                 "intent": t.intent, "mask_ratio": round(float(t.mask_ratio), 4)}
        title = {"insert": "Add", "replace": "Replace with", "remove": "Remove:"}[t.intent]
        entry["title"] = f"{title} {t.prompt}" if t.intent != "remove" else f"Remove an object ({t.prompt})"
        if task == "sketch":
            sk = _rough_sketch(t.new_object.mask & t.mask, t.new_object.rgb, t.seed)
            PIL.Image.fromarray(sk, "RGBA").save(out / f"{ex_id}_sketch.png")
            entry.update(sketch=f"{ex_id}_sketch.png", strength=0.75, title=f"Sketch: {t.prompt}")
        entries.append(entry)
    manifest = {"about": "ShapesWorld validation tasks (lazydiff.shapesworld.make_task) for the demo; "
                         "regenerate with `python -m demo.examples`.", "size": size, "examples": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return entries


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    ap.add_argument("--size", type=int, default=128, help="canvas side in pixels (the models are trained at 128)")
    args = ap.parse_args(argv)
    for e in generate(args.out, args.size):
        print(f"{e['id']:15s} seed {e['seed']}  mask {100 * e['mask_ratio']:.1f}%  {e['prompt']!r}")


if __name__ == "__main__":
    main()
