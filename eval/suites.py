"""Evaluation suites as data: a YAML file names the dataset, which edit tasks to take, and how to
generate them. Validated strictly before any long work starts.

Two dataset types:

* ``shapesworld`` -- the procedural ShapesWorld edit tasks (exact ground truth): a split (or an
  explicit list of task seeds), filtered by mask kind, intent and mask ratio.
* ``folder`` -- a user's own images + masks + prompts, listed in a manifest (JSON lines or CSV with
  columns ``image``, ``mask``, ``prompt``; optional ``id``, ``reference``, ``intent``).

See ``eval/README.md`` for the format and ``data/suites/`` for examples.
"""
from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from lazydiff.manifest import load_mask, load_rgb, open_image, read_rows


class SuiteError(ValueError):
    """A suite file (or a folder suite's data) is invalid; the message says what to fix."""


# ----------------------------------------------------------------------------- schema
COMMON_KEYS: Dict[str, str] = {
    "name": "a short name for reports",
    "description": "free text",
    "dataset": "shapesworld | folder",
    "num_samples": "take the first N samples (after filters); null = all",
    "methods": "default methods when --methods is not given",
    "steps": "denoising steps (int >= 1)",
    "guidance": "classifier-free guidance scale (>= 0; 1 = off)",
    "scheduler": "sampler for every method: ddim | dpm-solver++ | unipc | euler | euler-a (default: each method's own)",
    "seed": "base generation seed; sample i uses seed + i",
    "blend": "hard | feather | poisson",
    "negative_prompt": "negative prompt for every edit",
    "fid_backbone": "shapes-clip | inception (features for FID/KID)",
    "clip_backbone": "shapes-clip | openclip (model for CLIP score)",
    "crop_margin": "context around the hole for local crops, as a fraction of the hole's size",
    "examples": "how many samples to show in the example grid",
}
SHAPESWORLD_KEYS: Dict[str, str] = {
    "split": "train | val | test",
    "seeds": "explicit task seeds: a list, or {start: S, count: N}; overrides split",
    "size": "canvas side in pixels (int) or [height, width]",
    "mask_kinds": "keep tasks whose mask kind is listed (object, box, brush)",
    "intents": "keep tasks whose intent is listed (insert, remove, replace)",
    "mask_ratio": "[lo, hi]: keep tasks whose mask covers lo..hi of the canvas",
}
FOLDER_KEYS: Dict[str, str] = {
    "root": "folder holding the images, masks and manifest (relative to the suite file)",
    "manifest": "JSON-lines (.jsonl) or CSV (.csv) file in root with columns image, mask, prompt",
    "masks": "file (each row's mask column; the default) | random (no mask column: a box or brush mask of 2-60% "
             "per row, drawn from the suite's seed, for images that have none)",
}
DATASETS = ("shapesworld", "folder")
BACKBONES_FID = ("shapes-clip", "inception")
BACKBONES_CLIP = ("shapes-clip", "openclip")
MANIFEST_REQUIRED = ("image", "mask", "prompt")
MANIFEST_OPTIONAL = ("id", "reference", "intent", "negative_prompt")


def _unknown_key_error(key: str, allowed: Sequence[str], source: str, dataset: str) -> SuiteError:
    hint = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    other = ""
    if key in SHAPESWORLD_KEYS and dataset != "shapesworld":
        other = f" ({key!r} applies to dataset: shapesworld only)"
    elif key in FOLDER_KEYS and dataset != "folder":
        other = f" ({key!r} applies to dataset: folder only)"
    return SuiteError(f"{source}: unknown key {key!r}{other}" + (f"; did you mean {hint[0]!r}?" if hint and not other else ".")
                      + f" Allowed keys for dataset {dataset!r}: {', '.join(sorted(allowed))}")


# ----------------------------------------------------------------------------- samples
@dataclass
class EditSample:
    """One edit to run: canvas, mask (True = edit), prompt; ``reference`` is the image the edited
    canvases are compared with for FID (the ground-truth target on ShapesWorld, else the input or
    the manifest's ``reference``). ``meta`` carries dataset-specific fields (kind, intent, shape,
    colour, ...); ``background`` is ShapesWorld's analytic background (None elsewhere)."""

    id: str
    index: int
    prompt: str
    meta: Dict[str, Any] = field(default_factory=dict)
    negative_prompt: Optional[str] = None
    _loader: Optional[Callable[[], Dict[str, Any]]] = field(default=None, repr=False)
    _arrays: Optional[Dict[str, Any]] = field(default=None, repr=False)

    def arrays(self) -> Dict[str, Any]:
        """{"image": (H,W,3) uint8, "mask": (H,W) bool, "reference": (H,W,3) uint8,
        "background": (H,W,3) uint8 or None}; loaded on first use."""
        if self._arrays is None:
            self._arrays = self._loader()
        return self._arrays

    def release(self) -> None:
        """Drop the cached arrays (they are reloaded on demand)."""
        if self._loader is not None:
            self._arrays = None

    @property
    def image(self) -> np.ndarray:
        return self.arrays()["image"]

    @property
    def mask(self) -> np.ndarray:
        return self.arrays()["mask"]

    @property
    def reference(self) -> np.ndarray:
        return self.arrays()["reference"]

    @property
    def background(self) -> Optional[np.ndarray]:
        return self.arrays().get("background")

    @property
    def fingerprint(self) -> str:
        """Hash of what defines the edit (prompt, mask, canvas); a record made for another edit
        under the same id is regenerated on resume."""
        a = self.arrays()
        h = hashlib.sha1()
        h.update(self.prompt.encode())
        h.update(np.packbits(a["mask"]).tobytes())
        h.update(str(a["image"].shape).encode())
        h.update(hashlib.sha1(np.ascontiguousarray(a["image"]).tobytes()).digest())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the suite
@dataclass
class Suite:
    path: str
    name: str
    dataset: str
    raw: Dict[str, Any]
    methods: List[str]
    steps: int = 20
    guidance: float = 4.5
    scheduler: Optional[str] = None   # None: each method samples with its own scheduler
    seed: int = 0
    blend: str = "feather"
    negative_prompt: str = ""
    num_samples: Optional[int] = None
    fid_backbone: str = "shapes-clip"
    clip_backbone: str = "shapes-clip"
    crop_margin: float = 0.2
    examples: int = 6
    description: str = ""
    # shapesworld
    split: str = "test"
    seeds: Optional[List[int]] = None
    size: tuple = (128, 128)
    mask_kinds: Optional[List[str]] = None
    intents: Optional[List[str]] = None
    mask_ratio: Optional[tuple] = None
    # folder
    root: Optional[str] = None
    manifest: Optional[str] = None
    masks: str = "file"

    _samples_cache: Dict[Any, List[EditSample]] = field(default_factory=dict, repr=False)

    # -- samples
    def samples(self, limit: Optional[int] = None) -> List[EditSample]:
        """The suite's samples in order (first ``limit`` of them). Folder suites are checked file by
        file here: every problem is reported in one :class:`SuiteError`."""
        n = self.num_samples if limit is None else (limit if self.num_samples is None else min(limit, self.num_samples))
        if n not in self._samples_cache:
            if self.dataset == "shapesworld":
                self._samples_cache[n] = self._shapesworld_samples(n)
            else:
                self._samples_cache[n] = self._folder_samples(n)
        return self._samples_cache[n]

    def seed_list(self) -> Sequence[int]:
        if self.seeds is not None:
            return self.seeds
        from lazydiff.shapesworld import make_split

        return make_split(self.split)

    def _shapesworld_samples(self, n: Optional[int]) -> List[EditSample]:
        from lazydiff.shapesworld import make_task

        from tqdm.auto import tqdm

        out: List[EditSample] = []
        seeds = self.seed_list()
        total = n if n is not None else len(seeds)
        bar = tqdm(total=total, desc="building ShapesWorld tasks", unit="task", disable=total < 100, leave=False)
        for s in seeds:
            if n is not None and len(out) >= n:
                break
            task = make_task(int(s), self.size)
            if self.mask_kinds and task.kind not in self.mask_kinds:
                continue
            if self.intents and task.intent not in self.intents:
                continue
            if self.mask_ratio and not self.mask_ratio[0] <= task.mask_ratio <= self.mask_ratio[1]:
                continue
            meta = dict(seed=int(task.seed), kind=task.kind, intent=task.intent, shape=task.shape, color=task.color,
                        size=task.size, mask_ratio=float(task.mask_ratio), object_edit=bool(task.shape is not None))
            arrays = dict(image=task.canvas, mask=task.mask.astype(bool), reference=task.target,
                          background=task.background)
            out.append(EditSample(id=f"sw{int(task.seed)}", index=len(out), prompt=task.prompt, meta=meta,
                                  _arrays=arrays))
            bar.update()
        bar.close()
        if not out:
            raise SuiteError(f"{self.path}: no ShapesWorld task passes the filters (mask_kinds={self.mask_kinds}, "
                             f"intents={self.intents}, mask_ratio={self.mask_ratio}) among {len(seeds)} seeds; "
                             "widen the filters")
        if n is not None and len(out) < n and self.num_samples is not None and n == self.num_samples:
            raise SuiteError(f"{self.path}: num_samples is {n} but only {len(out)} of the {len(seeds)} seeds pass the "
                             "filters; lower num_samples, widen the filters or use more seeds")
        return out

    def _folder_samples(self, n: Optional[int]) -> List[EditSample]:
        rows = read_manifest(self.root_path / self.manifest, random_masks=self.masks == "random")
        if n is not None:
            rows = rows[:n]
        return check_folder_rows(rows, self.root_path, str(self.root_path / self.manifest),
                                 random_mask_seed=self.seed if self.masks == "random" else None)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def describe(self) -> str:
        if self.dataset == "shapesworld":
            src = f"ShapesWorld {self.split} split" if self.seeds is None else f"ShapesWorld seeds ({len(self.seeds)})"
            return f"{src}, {self.size[0]}x{self.size[1]}"
        return f"image folder {self.root}"


# ----------------------------------------------------------------------------- folder datasets
def read_manifest(path: Path, random_masks: bool = False) -> List[Dict[str, Any]]:
    """Rows of a JSON-lines or CSV manifest, each checked for the required columns (no ``mask`` column
    with ``random_masks``: the suite draws them)."""
    if not random_masks:
        return read_rows(path, MANIFEST_REQUIRED, MANIFEST_OPTIONAL, error=SuiteError)
    rows = read_rows(path, tuple(k for k in MANIFEST_REQUIRED if k != "mask"), MANIFEST_OPTIONAL + ("mask",),
                     error=SuiteError)
    with_mask = [r["_line"] for r in rows if r.get("mask")]
    if with_mask:
        raise SuiteError(f"{path}:{with_mask[0]}: a mask column with `masks: random`; use the rows' masks "
                         "(`masks: file`, the default) or drop the column")
    return rows


def check_folder_rows(rows: List[Dict[str, Any]], root: Path, source: str,
                      random_mask_seed: Optional[int] = None) -> List[EditSample]:
    """Open every image and mask once, check sizes and masks; one error listing every problem. With
    ``random_mask_seed``, row i's mask is :func:`lazydiff.shapesworld.random_edit_mask` drawn from
    (seed, i) at the image's size instead of a file."""
    import PIL.Image
    from tqdm.auto import tqdm

    problems: List[str] = []
    samples: List[EditSample] = []
    seen_ids: Dict[str, int] = {}
    for i, row in enumerate(tqdm(rows, desc="checking image folder", unit="file", disable=len(rows) < 100,
                                 leave=False)):
        ln = row["_line"]
        paths = {k: root / str(row[k]) for k in ("image", "mask", "reference") if row.get(k)}
        sizes = {}
        for k, p in paths.items():
            if not p.exists():
                problems.append(f"line {ln}: {k} file {p} does not exist")
                continue
            try:
                with PIL.Image.open(p) as im:
                    im.verify()  # cheap integrity check; loaded again in full when used
                sizes[k] = open_image(p).size   # upright (EXIF orientation), as load_rgb / load_mask read it
            except Exception as err:  # PIL raises many types for broken files
                problems.append(f"line {ln}: {k} file {p} is not a readable image ({type(err).__name__}: {err})")
        if "image" in sizes:
            for k in ("mask", "reference"):
                if k in sizes and sizes[k] != sizes["image"]:
                    problems.append(f"line {ln}: {k} {paths[k]} is {sizes[k][0]}x{sizes[k][1]} but image "
                                    f"{paths['image']} is {sizes['image'][0]}x{sizes['image'][1]} (width x height)")
        if "mask" in sizes and not problems_for_line(problems, ln):
            m = load_mask(paths["mask"])
            if not m.any():
                problems.append(f"line {ln}: mask {paths['mask']} is empty (paint the edit region white)")
        sid = str(row.get("id") or Path(str(row["image"])).stem)
        if sid in seen_ids:
            problems.append(f"line {ln}: id {sid!r} repeats line {seen_ids[sid]}; give each row a unique 'id'")
        seen_ids[sid] = ln
        if problems_for_line(problems, ln):
            continue

        drawn = None
        if random_mask_seed is not None:
            from lazydiff.shapesworld import random_edit_mask

            w, h = sizes["image"]
            drawn = random_edit_mask(np.random.default_rng([int(random_mask_seed), i]), (h, w))

        def loader(paths=paths, drawn=drawn):
            image = load_rgb(paths["image"])
            mask = drawn if drawn is not None else load_mask(paths["mask"])
            ref = load_rgb(paths["reference"]) if "reference" in paths else image
            return dict(image=image, mask=mask, reference=ref, background=None)

        meta = dict(intent=row.get("intent"), image_path=str(row["image"]),
                    mask_path="random" if drawn is not None else str(row["mask"]), object_edit=None)
        samples.append(EditSample(id=sid, index=i, prompt=str(row["prompt"]), meta=meta,
                                  negative_prompt=row.get("negative_prompt"), _loader=loader))
    if problems:
        raise SuiteError(f"{source}: {len(problems)} problem(s) with the listed files:\n  - " + "\n  - ".join(problems)
                         + "\nFix or remove these rows (images and masks must be readable and the same size).")
    for s in tqdm(samples, desc="reading masks", unit="mask", disable=len(samples) < 100, leave=False):
        s.meta["mask_ratio"] = float(s.mask.mean())
        s.release()
    return samples


def problems_for_line(problems: List[str], ln: int) -> bool:
    return any(p.startswith(f"line {ln}:") for p in problems)


# ----------------------------------------------------------------------------- loading and validation
def _as_int(v, key, source, lo=None, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise SuiteError(f"{source}: {key} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise SuiteError(f"{source}: {key} must be >= {lo}, got {v}")
    return int(v)


def _as_float(v, key, source, lo=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SuiteError(f"{source}: {key} must be a number, got {v!r}")
    if lo is not None and v < lo:
        raise SuiteError(f"{source}: {key} must be >= {lo}, got {v}")
    return float(v)


def _as_choices(v, key, source, choices):
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v:
        raise SuiteError(f"{source}: {key} must be a non-empty list drawn from {list(choices)}, got {v!r}")
    for x in v:
        if x not in choices:
            hint = difflib.get_close_matches(str(x), list(choices), n=1)
            raise SuiteError(f"{source}: {key} has unknown value {x!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; choose from {list(choices)}")
    return list(v)


def _as_choice(v, key, source, choices):
    if v not in choices:
        hint = difflib.get_close_matches(str(v), list(choices), n=1)
        raise SuiteError(f"{source}: {key} must be one of {list(choices)}, got {v!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return v


def load_suite(path: str) -> Suite:
    """Read and validate a suite file. Raises :class:`SuiteError` naming the problem and the fix."""
    import yaml

    p = Path(path)
    if not p.exists():
        here = Path(__file__).resolve().parent.parent / "data" / "suites"
        avail = sorted(x.name for x in here.glob("*.yaml")) if here.exists() else []
        raise SuiteError(f"suite file {path} not found" + (f"; shipped suites in {here}: {', '.join(avail)}" if avail else ""))
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML: {err}") from None
    return suite_from_dict(raw, str(p), base_dir=p.parent)


def suite_from_dict(raw: Dict[str, Any], source: str = "suite", base_dir: Optional[Path] = None) -> Suite:
    from lazydiff.pipelines import BLEND_MODES

    if not isinstance(raw, dict):
        raise SuiteError(f"{source}: expected a mapping of keys to values at the top level")
    dataset = raw.get("dataset")
    if dataset is None:
        raise SuiteError(f"{source}: missing required key 'dataset' (one of {list(DATASETS)})")
    dataset = _as_choice(dataset, "dataset", source, DATASETS)
    allowed = dict(COMMON_KEYS, **(SHAPESWORLD_KEYS if dataset == "shapesworld" else FOLDER_KEYS))
    for key in raw:
        if key not in allowed:
            raise _unknown_key_error(key, allowed, source, dataset)
    s = Suite(path=source, name=str(raw.get("name") or Path(source).stem), dataset=dataset, raw=dict(raw),
              methods=[], description=str(raw.get("description") or ""))
    if "methods" in raw:
        m = raw["methods"]
        if isinstance(m, str):
            m = [x.strip() for x in m.split(",") if x.strip()]
        if not isinstance(m, list) or not m or not all(isinstance(x, str) for x in m):
            raise SuiteError(f"{source}: methods must be a non-empty list of method names, got {raw['methods']!r}")
        s.methods = m
    if "steps" in raw:
        s.steps = _as_int(raw["steps"], "steps", source, 1)
    if "guidance" in raw:
        s.guidance = _as_float(raw["guidance"], "guidance", source, 0)
    if raw.get("scheduler") is not None:
        from lazydiff.schedulers import SCHEDULERS

        s.scheduler = _as_choice(raw["scheduler"], "scheduler", source, tuple(SCHEDULERS))
    if "seed" in raw:
        s.seed = _as_int(raw["seed"], "seed", source, 0)
    if "blend" in raw:
        s.blend = _as_choice(raw["blend"], "blend", source, BLEND_MODES)
    if "negative_prompt" in raw:
        s.negative_prompt = str(raw["negative_prompt"] or "")
    if "num_samples" in raw:
        s.num_samples = _as_int(raw["num_samples"], "num_samples", source, 1, allow_none=True)
    if "fid_backbone" in raw:
        s.fid_backbone = _as_choice(raw["fid_backbone"], "fid_backbone", source, BACKBONES_FID)
    elif dataset == "folder":
        s.fid_backbone = "inception"
    if "clip_backbone" in raw:
        s.clip_backbone = _as_choice(raw["clip_backbone"], "clip_backbone", source, BACKBONES_CLIP)
    elif dataset == "folder":
        s.clip_backbone = "openclip"
    if "crop_margin" in raw:
        s.crop_margin = _as_float(raw["crop_margin"], "crop_margin", source, 0)
    if "examples" in raw:
        s.examples = _as_int(raw["examples"], "examples", source, 0)

    if dataset == "shapesworld":
        from lazydiff.shapesworld import INTENTS, KINDS, MAX_RATIO, MIN_RATIO, SPLITS

        if "split" in raw:
            s.split = _as_choice(raw["split"], "split", source, tuple(SPLITS))
        if raw.get("seeds") is not None:
            v = raw["seeds"]
            if isinstance(v, dict):
                bad = set(v) - {"start", "count"}
                if bad or not {"start", "count"} <= set(v):
                    raise SuiteError(f"{source}: seeds as a mapping needs exactly the keys start and count, got {sorted(v)}")
                start, count = _as_int(v["start"], "seeds.start", source, 0), _as_int(v["count"], "seeds.count", source, 1)
                s.seeds = list(range(start, start + count))
            elif isinstance(v, list) and v:
                s.seeds = [_as_int(x, "seeds[]", source, 0) for x in v]
            else:
                raise SuiteError(f"{source}: seeds must be a list of integers or {{start: S, count: N}}, got {v!r}")
            if "split" in raw:
                raise SuiteError(f"{source}: give either split or seeds, not both")
        if "size" in raw:
            v = raw["size"]
            if isinstance(v, list) and len(v) == 2:
                s.size = (_as_int(v[0], "size[0]", source, 32), _as_int(v[1], "size[1]", source, 32))
            else:
                n = _as_int(v, "size", source, 32)
                s.size = (n, n)
        if "mask_kinds" in raw:
            s.mask_kinds = _as_choices(raw["mask_kinds"], "mask_kinds", source, KINDS)
        if "intents" in raw:
            s.intents = _as_choices(raw["intents"], "intents", source, INTENTS)
        if "mask_ratio" in raw:
            v = raw["mask_ratio"]
            if not (isinstance(v, list) and len(v) == 2):
                raise SuiteError(f"{source}: mask_ratio must be [lo, hi], got {v!r}")
            lo, hi = (_as_float(x, "mask_ratio", source, 0) for x in v)
            if not lo < hi or lo > MAX_RATIO or hi < MIN_RATIO:
                raise SuiteError(f"{source}: mask_ratio [lo, hi] needs lo < hi and to overlap ShapesWorld's range "
                                 f"[{MIN_RATIO}, {MAX_RATIO}], got {v!r}")
            s.mask_ratio = (lo, hi)
    else:
        for key in ("root", "manifest"):
            if not raw.get(key):
                raise SuiteError(f"{source}: a folder suite needs {key!r} ({FOLDER_KEYS[key]})")
        root = Path(str(raw["root"]))
        if not root.is_absolute() and base_dir is not None:
            root = base_dir / root
        if not root.is_dir():
            raise SuiteError(f"{source}: root folder {root} does not exist")
        s.root = str(root)
        s.manifest = str(raw["manifest"])
        s.masks = _as_choice(raw.get("masks", "file"), "masks", source, ("file", "random"))
        if not (root / s.manifest).exists():
            raise SuiteError(f"{source}: manifest {root / s.manifest} not found")
    return s


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write a file so readers see the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
