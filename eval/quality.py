"""``python -m eval quality``: run every edit of a suite with each method, keep every output, then
score them (FID / KID, local FID, CLIP score, latency and, on ShapesWorld, prompt accuracy,
background error and the unmasked-pixels check).

Layout of ``--out``::

    images/<method>/<sample>.png     every edited canvas (lossless)
    records/<method>/<sample>.json   one record per edit, written atomically (temp file + os.replace)
    records/<method>/_settings.json  what the records were made with (checked on resume)
    records.jsonl, per_sample.csv, summary.csv, plots/*.png, report.md

Resuming: a sample counts as done when its record exists, matches the sample and its image is on
disk; rerunning the same command skips it. Sharding: under ``accelerate launch`` each process
takes samples ``i % num_processes == process_index``; after all processes finish, the main
process computes every metric from the records and images on disk (so 1 and N processes give the
same numbers).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .methods import Method, MethodError, resolve_methods
from .suites import EditSample, Suite, atomic_write_text, load_suite

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class QualityOptions:
    suite: str
    out: str
    methods: Optional[List[str]] = None
    limit: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    scheduler: Optional[str] = None   # overrides the suite's
    device: Optional[str] = None
    dtype: str = "fp32"
    shapes_clip: Optional[str] = None
    inception_weights: Optional[str] = None
    clip_model: Optional[str] = None
    clip_weights: Optional[str] = None
    batch_size: int = 32
    overwrite: bool = False
    metrics_only: bool = False
    no_report: bool = False
    pipeline_set: Dict[str, Any] = field(default_factory=dict)  # pipeline attributes, e.g. reset_outside_hole


@dataclass
class QualityResult:
    out: Path
    generated: Dict[str, int] = field(default_factory=dict)   # this process
    skipped: Dict[str, int] = field(default_factory=dict)     # this process
    summary: Any = None                                       # pandas DataFrame (main process)
    per_sample: Any = None
    warnings: List[str] = field(default_factory=list)         # what the numbers cannot be trusted for (main process)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _atomic_png(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- set-up (validate everything first)
@dataclass
class Backbones:
    shapes_clip: Any = None      # ClipBundle or None
    clip: Any = None             # ClipBundle for CLIP score
    fid_feature: Any = None      # nn.Module for FID / KID
    fid_name: str = ""
    fid_size: int = 0            # input side the local crops are resized to
    notes: List[str] = field(default_factory=list)


def prepare_backbones(suite: Suite, opts: QualityOptions, build: bool, device: str = "cpu") -> Backbones:
    """Check (and with ``build``, load) every metric backbone; raises MetricWeightsError early."""
    from .metrics import (ClipImageFeatures, InceptionFeatures, MetricWeightsError, check_inception_weights,
                          load_clip_folder, load_openclip, resolve_shapes_clip)

    b = Backbones()
    need_shapes = suite.fid_backbone == "shapes-clip" or suite.clip_backbone == "shapes-clip" \
        or suite.dataset == "shapesworld"
    if need_shapes:
        folder = resolve_shapes_clip(opts.shapes_clip)
        if build:
            b.shapes_clip = load_clip_folder(folder, device)
            if b.shapes_clip.note:
                b.notes.append(f"ShapesCLIP from {folder}: {b.shapes_clip.note}")
        else:
            from .metrics import CONFIG_NAME, WEIGHTS_NAME

            missing = [str(folder / n) for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).exists()]
            if missing:
                load_clip_folder(folder)  # raises the full message
    if suite.fid_backbone == "inception":
        path = check_inception_weights(opts.inception_weights)
        if build:
            b.fid_feature = InceptionFeatures(str(path)).to(device)
            b.fid_name, b.fid_size = f"Inception-v3 (torchmetrics, antialias={b.fid_feature.antialias})", 299
    elif build:
        b.fid_feature = ClipImageFeatures(b.shapes_clip)
        b.fid_name, b.fid_size = "ShapesCLIP image embedding", b.shapes_clip.image_size
    if suite.clip_backbone == "openclip":
        if build:
            b.clip = load_openclip(opts.clip_model, opts.clip_weights, device)
        else:
            w = opts.clip_weights or os.environ.get("LAZYDIFF_CLIP_WEIGHTS")
            if not w or not Path(w).expanduser().exists():
                load_openclip(opts.clip_model, opts.clip_weights)  # raises the full message
    elif build:
        b.clip = b.shapes_clip
    if build and b.fid_feature is None:
        raise MetricWeightsError("no FID backbone could be built")
    return b


def settings_for(method: Method, suite: Suite, opts: QualityOptions, steps: int, guidance: float) -> Dict[str, Any]:
    """What a method's records depend on; a resumed run must match it."""
    settings = {"method": method.spec, "steps": steps, "guidance": guidance, "seed": suite.seed, "blend": suite.blend,
                "negative_prompt": suite.negative_prompt, "dtype": opts.dtype, "dataset": suite.dataset,
                "size": list(suite.size) if suite.dataset == "shapesworld" else None}
    scheduler = scheduler_for(suite, opts)
    if scheduler is not None:  # absent, not None, when unset: runs made before the key existed still resume
        settings["scheduler"] = scheduler
    if opts.pipeline_set:  # absent when unset, as the scheduler
        settings["pipeline_set"] = dict(opts.pipeline_set)
    return settings


def parse_pipeline_set(items) -> Dict[str, Any]:
    """``["reset_outside_hole=false", "decode_margin=8"]`` -> {name: value}, values read as YAML (as the
    training command's ``--set``)."""
    import yaml

    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"--set {item!r}: expected ATTRIBUTE=VALUE, e.g. --set reset_outside_hole=false")
        out[key] = yaml.safe_load(raw)
    return out


def pipeline_attributes() -> Dict[str, Any]:
    """Settable options of this library's pipelines (class attributes that are plain values) -> default."""
    from diffusers import DiffusionPipeline

    from lazydiff import DiffusersInpaintAdapter, LazyDiffusionPipeline, RegenerateCropPipeline, RegenerateImagePipeline

    names: Dict[str, Any] = {}
    for cls in (LazyDiffusionPipeline, RegenerateImagePipeline, RegenerateCropPipeline, DiffusersInpaintAdapter):
        for key in dir(cls):
            value = getattr(cls, key, None)
            if key.startswith("_") or hasattr(DiffusionPipeline, key):  # diffusers' own (config_name, ...)
                continue
            if isinstance(value, (bool, int, float, str)) and key not in names:
                names[key] = value
    return names


def check_pipeline_set(values: Dict[str, Any]) -> None:
    """Refuse names that no pipeline has (typos) and values of the wrong type, before anything runs."""
    import difflib

    known = pipeline_attributes()
    for key, value in values.items():
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            raise ValueError(f"--set {key}: no pipeline has this option" + (f"; did you mean {hint[0]!r}?" if hint else "")
                             + f" Options: {', '.join(sorted(known))}")
        have = known[key]
        if type(value) is not type(have) and not (isinstance(have, float) and type(value) is int):
            raise ValueError(f"--set {key}={value!r}: expected a {type(have).__name__} (default {have!r})")


def apply_pipeline_set(pipe, values: Dict[str, Any]) -> None:
    """Set the options ``pipe`` has (a method without one, e.g. ``reset_outside_hole`` on LazyDiffusion, keeps its own)."""
    for key, value in values.items():
        if hasattr(type(pipe), key):
            setattr(pipe, key, value)


def scheduler_for(suite: Suite, opts: QualityOptions) -> Optional[str]:
    """The sampler every method uses in this run (None: each method's own)."""
    return opts.scheduler or suite.scheduler


def use_scheduler(pipe, name: Optional[str], label: str):
    """Swap ``pipe``'s sampler for ``name`` (a :data:`lazydiff.schedulers.SCHEDULERS` name), from its own config."""
    if name is None:
        return pipe
    from lazydiff.schedulers import make_scheduler

    if getattr(pipe, "scheduler", None) is None:
        raise MethodError(f"method {label!r} has no swappable scheduler; run it without --scheduler")
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe


# ----------------------------------------------------------------------------- generation
def _done(rec_path: Path, img_path: Path, sample: EditSample) -> bool:
    if not rec_path.exists() or not img_path.exists():
        return False
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return rec.get("fingerprint") == sample.fingerprint


def edit_sample(pipe, sample: EditSample, steps: int, guidance: float, seed: int, blend: str, negative: str):
    import PIL.Image

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    image = PIL.Image.fromarray(sample.image, "RGB")
    mask = PIL.Image.fromarray(sample.mask.astype(np.uint8) * 255, "L")
    return pipe(sample.prompt, image, mask, negative_prompt=sample.negative_prompt if sample.negative_prompt is not None
                else negative, num_inference_steps=steps, guidance_scale=guidance, generator=gen, blend=blend)


def per_sample_checks(edited: np.ndarray, sample: EditSample, dataset: str) -> Dict[str, Any]:
    """Cheap metrics computed right after each edit (no model needed)."""
    from .metrics import hole_mae, unmasked_violations

    a = sample.arrays()
    rec: Dict[str, Any] = {"unmasked_violations": unmasked_violations(edited, a["image"], a["mask"])}
    if dataset == "shapesworld":
        rec["hole_mae_target"] = hole_mae(edited, a["reference"], a["mask"])
        if sample.meta.get("intent") == "remove" and a.get("background") is not None:
            rec["bg_mae"] = hole_mae(edited, a["background"], a["mask"])
            rec["bg_mae_input"] = hole_mae(a["image"], a["background"], a["mask"])  # doing nothing
    return rec


def generate(methods: List[Method], samples: List[EditSample], suite: Suite, opts: QualityOptions, out: Path,
             steps: int, guidance: float, rank: int, world: int, device: str) -> QualityResult:
    from tqdm.auto import tqdm

    res = QualityResult(out=out)
    dtype = DTYPES[opts.dtype]
    for method in methods:
        rec_dir, img_dir = out / "records" / method.label, out / "images" / method.label
        mine = [s for s in samples if s.index % world == rank]
        todo = [s for s in mine if not _done(rec_dir / f"{s.id}.json", img_dir / f"{s.id}.png", s)]
        res.skipped[method.label] = len(mine) - len(todo)
        res.generated[method.label] = 0
        if not todo:
            continue
        pipe = use_scheduler(method.load(device, dtype), scheduler_for(suite, opts), method.label)
        if hasattr(pipe, "canvas_cache"):
            pipe.canvas_cache = "exact"  # scores must not depend on the order of the edits (--set may say otherwise)
        apply_pipeline_set(pipe, opts.pipeline_set)
        bar = tqdm(todo, desc=f"[{rank}/{world}] {method.label}", unit="edit", position=rank, leave=True,
                   dynamic_ncols=True)
        for s in bar:
            gen_seed = suite.seed + s.index
            out_img = edit_sample(pipe, s, steps, guidance, gen_seed, suite.blend, suite.negative_prompt)
            result = out_img.images[0].convert("RGB")
            edited = np.asarray(result)
            img_path = img_dir / f"{s.id}.png"
            _atomic_png(img_path, result)
            rec = {"method": method.label, "method_spec": method.spec, "sample_id": s.id, "index": s.index,
                   "fingerprint": s.fingerprint, "prompt": s.prompt, "seed": gen_seed,
                   "image": str(img_path.relative_to(out)), "latency_ms": float(out_img.timings.get("total", float("nan"))),
                   "timings": dict(out_img.timings), "stats": dict(out_img.stats), "meta": s.meta,
                   "rank": rank, "time": _dt.datetime.now().isoformat(timespec="seconds")}
            rec.update(per_sample_checks(edited, s, suite.dataset))
            # The image is on disk before its record: a record always points at a complete image.
            atomic_write_text(rec_dir / f"{s.id}.json", json.dumps(rec, default=_json_default))
            res.generated[method.label] += 1
            if suite.dataset == "folder":
                s.release()
        bar.close()
        del pipe
    return res


# ----------------------------------------------------------------------------- metrics
def load_records(out: Path, methods: List[Method], samples: List[EditSample]) -> List[Dict[str, Any]]:
    records, missing = [], []
    for m in methods:
        for s in samples:
            p = out / "records" / m.label / f"{s.id}.json"
            try:
                rec = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                missing.append(f"{m.label}/{s.id}")
                continue
            if rec.get("fingerprint") != s.fingerprint:
                missing.append(f"{m.label}/{s.id} (stale)")
                continue
            records.append(rec)
    if missing:
        raise RuntimeError(f"{len(missing)} edit(s) have no record (e.g. {', '.join(missing[:5])}); rerun the same "
                           "command to finish them (finished edits are skipped)")
    return records


def _load_png(out: Path, rel: str) -> np.ndarray:
    import PIL.Image

    with PIL.Image.open(out / rel) as im:
        return np.asarray(im.convert("RGB"))


def compute_metrics(out: Path, methods: List[Method], samples: List[EditSample], suite: Suite, backbones: Backbones,
                    batch_size: int = 32):
    """-> (summary DataFrame, per-sample DataFrame, extras dict)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .metrics import ShapesZeroShot, batched, clip_cosines, crop_resize, frechet_and_kernel, hole_crop_box, to_batch

    records = load_records(out, methods, samples)
    by_key = {(r["method"], r["sample_id"]): r for r in records}
    S = backbones.fid_size
    clip = backbones.clip
    boxes = {}
    for s in samples:
        boxes[s.id] = hole_crop_box(s.mask, suite.crop_margin)
        if suite.dataset == "folder":
            s.release()

    def whole(img):
        if img.shape[0] == S and img.shape[1] == S:
            return img
        return crop_resize(img, (0, img.shape[0], 0, img.shape[1]), S)

    def feats(images: List[np.ndarray]) -> torch.Tensor:
        return backbones.fid_feature(to_batch(images)).detach().double().cpu()

    # -- references (ground truth / inputs): whole, local crops, CLIP, zero-shot ceiling
    zs = ShapesZeroShot(backbones.shapes_clip) if (suite.dataset == "shapesworld" and backbones.shapes_clip) else None
    real_w, real_l, gt_cos, gt_pred = [], [], [], {}
    for chunk in tqdm(list(batched(samples, batch_size)), desc="features: references", unit="batch"):
        refs = [s.reference for s in chunk]
        crops = [crop_resize(s.reference, boxes[s.id], S) for s in chunk]
        real_w.append(feats([whole(r) for r in refs]))
        real_l.append(feats(crops))
        clip_crops = [crop_resize(s.reference, boxes[s.id], clip.image_size) for s in chunk]
        gt_cos.extend(clip_cosines(clip, to_batch(clip_crops), [s.prompt for s in chunk]).tolist())
        if zs is not None:
            obj = [(s, c) for s, c in zip(chunk, clip_crops) if s.meta.get("object_edit")]
            if obj:
                for (s, _), p in zip(obj, zs.predict(to_batch([c for _, c in obj]))):
                    gt_pred[s.id] = p
        if suite.dataset == "folder":
            for s in chunk:
                s.release()
    real_w, real_l = torch.cat(real_w), torch.cat(real_l)

    fake_w, fake_l, rows = {}, {}, []
    for m in methods:
        fw, fl = [], []
        for chunk in tqdm(list(batched(samples, batch_size)), desc=f"features: {m.label}", unit="batch"):
            recs = [by_key[(m.label, s.id)] for s in chunk]
            imgs = [_load_png(out, r["image"]) for r in recs]
            fw.append(feats([whole(i) for i in imgs]))
            fl.append(feats([crop_resize(i, boxes[s.id], S) for i, s in zip(imgs, chunk)]))
            clip_crops = [crop_resize(i, boxes[s.id], clip.image_size) for i, s in zip(imgs, chunk)]
            cos_l = clip_cosines(clip, to_batch(clip_crops), [s.prompt for s in chunk])
            cos_w = clip_cosines(clip, to_batch([i for i in imgs]) if len({i.shape for i in imgs}) == 1 else
                                 to_batch([whole(i) for i in imgs]), [s.prompt for s in chunk])
            preds = {}
            if zs is not None:
                obj = [(s, c) for s, c in zip(chunk, clip_crops) if s.meta.get("object_edit")]
                if obj:
                    preds = {s.id: p for (s, _), p in zip(obj, zs.predict(to_batch([c for _, c in obj])))}
            for k, (s, r) in enumerate(zip(chunk, recs)):
                row = {"method": m.label, "sample_id": s.id, "index": s.index, "prompt": s.prompt,
                       "mask_ratio": s.meta.get("mask_ratio"), "kind": s.meta.get("kind"), "intent": s.meta.get("intent"),
                       "hole_tokens": r["stats"].get("hole_tokens"), "total_tokens": r["stats"].get("total_tokens"),
                       "latency_ms": r["latency_ms"], "clip_cosine": float(cos_l[k]),
                       "clip_score_x100": 100.0 * max(float(cos_l[k]), 0.0), "clip_cosine_whole": float(cos_w[k]),
                       "clip_score_x100_whole": 100.0 * max(float(cos_w[k]), 0.0),
                       "unmasked_violations": r["unmasked_violations"], "hole_mae_target": r.get("hole_mae_target"),
                       "bg_mae": r.get("bg_mae"), "bg_mae_input": r.get("bg_mae_input"), "image": r["image"],
                       "seed": r["seed"], "rank": r.get("rank")}
                for st, v in r["timings"].items():
                    row[f"t_{st}_ms"] = v
                if zs is not None and s.meta.get("object_edit"):
                    ps, pc = preds[s.id]
                    row.update(target_shape=s.meta["shape"], target_color=s.meta["color"], pred_shape=ps, pred_color=pc,
                               prompt_correct=bool(ps == s.meta["shape"] and pc == s.meta["color"]),
                               shape_correct=bool(ps == s.meta["shape"]), color_correct=bool(pc == s.meta["color"]))
                    gs, gc = gt_pred[s.id]
                    row["gt_prompt_correct"] = bool(gs == s.meta["shape"] and gc == s.meta["color"])
                rows.append(row)
            if suite.dataset == "folder":
                for s in chunk:
                    s.release()
        fake_w[m.label], fake_l[m.label] = torch.cat(fw), torch.cat(fl)

    whole_d = frechet_and_kernel(backbones.fid_feature, real_w, fake_w)
    local_d = frechet_and_kernel(backbones.fid_feature, real_l, fake_l)
    per = pd.DataFrame(rows)
    summary_rows = []
    for m in methods:
        d = per[per.method == m.label]
        row = {"method": m.label, "n": int(len(d)),
               "fid": whole_d[m.label]["fid"], "kid": whole_d[m.label]["kid"], "kid_std": whole_d[m.label]["kid_std"],
               "fid_local": local_d[m.label]["fid"], "kid_local": local_d[m.label]["kid"],
               "clip_cosine": float(d.clip_cosine.mean()), "clip_score_x100": float(d.clip_score_x100.mean()),
               "clip_cosine_whole": float(d.clip_cosine_whole.mean()),
               "clip_score_x100_whole": float(d.clip_score_x100_whole.mean()),
               "clip_cosine_reference": float(np.mean(gt_cos)) if gt_cos else float("nan"),
               "latency_ms_mean": float(d.latency_ms.mean()), "latency_ms_median": float(d.latency_ms.median()),
               "unmasked_violating_samples": int((d.unmasked_violations > 0).sum()),
               "unmasked_violating_pixels": int(d.unmasked_violations.sum())}
        if suite.dataset == "shapesworld":
            obj = d[d.get("prompt_correct").notna()] if "prompt_correct" in d else d.iloc[:0]
            row.update(n_object_edits=int(len(obj)),
                       prompt_acc=float(obj.prompt_correct.astype(float).mean()) if len(obj) else float("nan"),
                       shape_acc=float(obj.shape_correct.astype(float).mean()) if len(obj) else float("nan"),
                       color_acc=float(obj.color_correct.astype(float).mean()) if len(obj) else float("nan"),
                       prompt_acc_ceiling=float(obj.gt_prompt_correct.astype(float).mean()) if len(obj) else float("nan"))
            rem = d[d.bg_mae.notna()] if "bg_mae" in d else d.iloc[:0]
            row.update(n_remove=int(len(rem)),
                       bg_mae=float(rem.bg_mae.mean()) if len(rem) else float("nan"),
                       bg_mae_input=float(rem.bg_mae_input.mean()) if len(rem) else float("nan"),
                       hole_mae_target=float(d.hole_mae_target.mean()))
        order = ["text", "vae_encode", "context_encoder", "crop_resize", "denoise", "vae_decode", "blend", "total"]
        stage_cols = [c for c in d.columns if c.startswith("t_") and c.endswith("_ms")]
        stage_cols.sort(key=lambda c: order.index(c[2:-3]) if c[2:-3] in order else len(order))
        for col in stage_cols:
            if d[col].notna().any():
                row[f"mean_{col[2:]}"] = float(d[col].mean())
        summary_rows.append(row)
    summary = pd.DataFrame(summary_rows)
    extras = {"n_reference": int(real_w.shape[0]), "fid_backbone": backbones.fid_name,
              "clip_backbone": f"{clip.name} ({clip.source})"}
    return summary, per, extras


# ----------------------------------------------------------------------------- report
def sample_size_warnings(summary, n_reference: int, n_features: Optional[int], feature_name: str = "") -> List[str]:
    """Warnings for FID / KID computed on too few samples to mean much. A Fréchet distance fits a
    covariance to each feature set: N samples give it rank at most N - 1, so it needs N > F (at least
    F + 1 samples for F-dimensional features) to be full-rank; with fewer the numbers depend on N more
    than on the images. KID is unbiased from 2 samples on; with N <= its subset size (1000) every
    subset is the whole set, so ``kid_std`` is ~0 and says nothing. Reporting only: no number changes."""
    if not n_features or summary is None or not len(summary):
        return []
    n_fake = int(summary["n"].min())
    n = min(n_fake, int(n_reference))
    if n > n_features:
        return []
    per_set = (f"{n_fake} edits per method and {n_reference} reference images" if n_fake != n_reference
               else f"{n} edits per method and as many reference images")
    return [f"FID and local FID are computed on too few samples to mean much: {per_set}, with {n_features}-d "
            f"features{f' ({feature_name})' if feature_name else ''}. Their covariances need at least "
            f"{n_features + 1} samples per set (more than the feature dimension) to be full-rank; with {n}, FID "
            f"depends on N more than on the images: compare methods only at equal N, and read FID from runs of "
            f"{n_features + 1} edits or more. KID has no such minimum but is noisy at this N."]


SUMMARY_METRICS = [
    ("fid", "FID (whole)", True), ("kid", "KID (whole)", True), ("fid_local", "local FID (hole crops)", True),
    ("clip_cosine", "CLIP cosine (hole crop)", False), ("prompt_acc", "prompt accuracy", False),
    ("bg_mae", "background MAE in hole (remove)", True), ("hole_mae_target", "MAE vs ground truth in hole", True),
    ("latency_ms_mean", "mean edit latency (ms)", True),
]


def write_report(out: Path, summary, per, extras: Dict[str, Any], methods: List[Method], samples: List[EditSample],
                 suite: Suite, backbones: Backbones, steps: int, guidance: float, opts: QualityOptions, world: int) -> Path:
    from .report import PAPER_DISPLAY, PAPER_QUALITY, bar_charts, df_table, example_grid, md_table

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    refs = {}  # what the bars should be read against: the classifier's ceiling, doing nothing
    if "prompt_acc_ceiling" in summary:
        refs["prompt_acc"] = (float(summary.prompt_acc_ceiling.iloc[0]), "real renders")
    if "bg_mae_input" in summary:
        refs["bg_mae"] = (float(summary.bg_mae_input.iloc[0]), "input, unedited")
    bars = bar_charts(summary, SUMMARY_METRICS, plots / "metrics.png", title=f"{suite.name}: {len(samples)} edits",
                      references=refs)
    rows = []
    for s in samples[: suite.examples]:
        outputs = {}
        for m in methods:
            r = per[(per.method == m.label) & (per.sample_id == s.id)]
            if len(r):
                outputs[m.label] = _load_png(out, r.iloc[0]["image"])
        rows.append({"image": s.image, "mask": s.mask, "reference": s.reference, "prompt": s.prompt, "outputs": outputs})
    grid = example_grid(rows, [m.label for m in methods], plots / "examples.png",
                        "ground truth" if suite.dataset == "shapesworld" else "reference")

    from . import breakdown as bd

    by_group = bd.breakdown(per)
    by_group_plot = bd.plot(by_group, plots / "breakdown.png") if by_group is not None else None
    if by_group is not None:
        by_group.to_csv(out / "breakdown.csv", index=False)
    shapes = bd.by_shape(per)
    shapes_plot = None
    if shapes is not None:
        shapes.to_csv(out / "by_shape.csv", index=False)
        obj = bd.object_edits(per)
        shapes_plot = bd.confusion_plot({m: (g.target_shape, g.pred_shape) for m, g in obj.groupby("method", sort=False)},
                                        plots / "shape_confusion.png")

    untrained = [m.label for m in methods if not m.trained]
    warn = []
    if untrained:
        warn.append(f"**Random-weight pipelines ({', '.join(untrained)}): these numbers test plumbing only and mean nothing.**")
    warn += [f"**{n}**" for n in backbones.notes]
    warn += [f"**Warning: {w}**" for w in extras.get("warnings", [])]
    L = [f"# Quality report: {suite.name}", ""]
    for w in warn:   # a paragraph each
        L += [w, ""]
    L += [f"- data: {suite.describe()}; {len(samples)} edits" + (f" (--limit {opts.limit})" if opts.limit else ""),
          f"- methods: {', '.join(f'`{m.spec}`' for m in methods)}; {steps} steps, guidance {guidance}, sampler "
          f"{scheduler_for(suite, opts) or 'of each method'}, blend "
          f"{suite.blend}, dtype {opts.dtype}, generation seed {suite.seed} + sample index"
          + "".join(f", {k}={v}" for k, v in opts.pipeline_set.items()),
          f"- FID/KID features: {extras['fid_backbone']}; reference set: "
          + ("ground-truth targets" if suite.dataset == "shapesworld" else "input images (or the manifest's references)")
          + f" ({extras['n_reference']} images); local = square crops around the hole (margin {suite.crop_margin}) "
          f"resized to {backbones.fid_size}px",
          f"- CLIP model: {extras['clip_backbone']}", f"- processes: {world}; torch {torch.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs", ""]
    L += ["## Summary", "",
          df_table(summary, ["method", "n", "fid", "kid", "fid_local", "kid_local", "clip_cosine", "clip_score_x100",
                             "clip_cosine_whole", "latency_ms_mean"],
                   ["method", "n", "FID ↓", "KID ↓", "local FID ↓", "local KID ↓", "CLIP cos ↑ (paper conv.)",
                    "CLIPScore ↑ (torchmetrics conv.)", "CLIP cos whole", "latency ms"]), ""]
    if suite.dataset == "shapesworld":
        L += ["### ShapesWorld checks", "",
              df_table(summary, ["method", "n_object_edits", "prompt_acc", "shape_acc", "color_acc", "prompt_acc_ceiling",
                                 "n_remove", "bg_mae", "bg_mae_input", "hole_mae_target", "unmasked_violating_samples",
                                 "unmasked_violating_pixels"],
                       ["method", "object edits", "prompt acc ↑", "shape acc", "colour acc", "ceiling (on ground truth)",
                        "remove edits", "bg MAE ↓", "bg MAE of input", "MAE vs GT in hole ↓", "samples w/ changed "
                        "unmasked px", "changed unmasked px"]), "",
              "- *prompt accuracy*: ShapesCLIP zero-shot over all (shape, colour) pairs on a crop around the hole "
              "picks the prompted pair (insert/replace edits); the ceiling is the same classifier on the ground-truth "
              "render.",
              "- *bg MAE*: mean absolute error (0-255) inside the hole against the analytic background, for remove edits "
              "(prompt names the background); *bg MAE of input* is doing nothing (the object left in place).",
              "- *unmasked pixels*: pixels outside the mask that differ from the input; must be 0.", ""]
    else:
        L += ["- unmasked pixels changed: " + ", ".join(f"{r.method}: {r.unmasked_violating_pixels}"
                                                       for r in summary.itertuples()), ""]
    if bars:
        L += [f"![metrics](plots/{bars.name})", ""]
    if by_group is not None:
        L += ["## By mask kind and mask size", "",
              "Prompt accuracy over the object edits and background MAE over the remove edits of each group "
              "(`breakdown.csv`). Small groups are noisy: the plot's bars carry 95% intervals.", ""]
        L += bd.markdown(by_group)
        if by_group_plot:
            L += [f"![by mask kind and size](plots/{by_group_plot.name})", ""]
    if shapes is not None:
        L += ["## By prompted shape", "",
              "Shape accuracy of the object edits by the shape the prompt names (`by_shape.csv`), and which shape "
              "ShapesCLIP sees instead (rows: prompted shape, normalised). The ceiling is prompt accuracy on the "
              "ground truth.", ""]
        L += bd.shape_markdown(shapes)
        L += [f"![shape confusion](plots/{shapes_plot.name})", ""]
    if grid:
        L += ["## Examples", "", f"![examples](plots/{grid.name})", ""]
    L += ["## Latency per stage (mean ms, from the pipelines' out.timings)", "",
          df_table(summary, ["method"] + [c for c in summary.columns if c.startswith("mean_")]), "",
          "Latency here is measured while generating (possibly several processes sharing the CPU); use "
          "`python -m eval runtime` for controlled timings.", ""]
    L += ["## Beside the paper (different data, models and scale)", "",
          "**Not comparable in absolute terms.** The paper: 10K internal images at 1024², CLIP ViT text-image cosine, "
          "Inception FID, PixArt-XL-sized models trained on ~220M images (numbers from secondary sources, SPEC §3). "
          f"Ours: {suite.describe()}, {len(samples)} edits, {extras['clip_backbone'].split(' (')[0]} cosine, FID on "
          f"{extras['fid_backbone']}, small models trained on ShapesWorld. Compare orderings and relative gaps only.", ""]
    ours = {r["method"]: r for r in summary.to_dict("records")}
    prow = []
    for name, clip_v, fid_v, label in PAPER_QUALITY:
        o = ours.get(label) or ours.get(f"tiny-{label}") if label else None
        prow.append({"method": name, "paper_clip": clip_v, "paper_fid": fid_v,
                     "our_clip": o["clip_cosine"] if o else None, "our_fid": o["fid"] if o else None,
                     "our_local_fid": o["fid_local"] if o else None})
    for lab, o in ours.items():
        if lab not in [p[3] for p in PAPER_QUALITY] and lab[5:] not in [p[3] for p in PAPER_QUALITY]:
            prow.append({"method": PAPER_DISPLAY.get(lab, lab), "our_clip": o["clip_cosine"], "our_fid": o["fid"],
                         "our_local_fid": o["fid_local"]})
    L += [md_table(prow, ["method", "paper_clip", "paper_fid", "our_clip", "our_fid", "our_local_fid"],
                   ["method", "paper CLIP (raw cos)", "paper FID (Inception, 1024²)", "ours CLIP (raw cos)",
                    "ours FID", "ours local FID"]), ""]
    L += ["## Conventions", "",
          "- CLIP score is computed between the local prompt and a square crop around the hole (`clip_cosine`, the "
          "paper's raw cosine) and reported also as torchmetrics' `100·max(cos, 0)` (`clip_score_x100`); "
          "`*_whole` use the whole canvas.",
          "- FID/KID: torchmetrics `FrechetInceptionDistance` / `KernelInceptionDistance` with a custom feature "
          "extractor; KID uses subsets of min(1000, N) with a fixed seed (so with N <= 1000 every subset is the whole "
          "set and `kid_std` in summary.csv is ~0: not an uncertainty). "
          + ("torchmetrics' Inception resizes with antialias=True (the default since 1.8; older papers used False)."
             if suite.fid_backbone == "inception" else "FID on ShapesCLIP features is not comparable with Inception FID."),
          "- Files: `summary.csv` (one row per method), `per_sample.csv`, `records.jsonl`, `images/<method>/`.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(L))
    return path


# ----------------------------------------------------------------------------- entry point
def run_quality(opts: QualityOptions) -> QualityResult:
    from accelerate import PartialState

    # 1. Validate everything before any long work.
    suite = load_suite(opts.suite)
    methods = resolve_methods(opts.methods or suite.methods)
    steps = opts.steps or suite.steps
    guidance = suite.guidance if opts.guidance is None else opts.guidance
    if opts.scheduler is not None:  # fail before any generation, not at the first method's load
        from lazydiff.schedulers import check_scheduler_name

        check_scheduler_name(opts.scheduler)
    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {opts.dtype!r}")
    check_pipeline_set(opts.pipeline_set)
    use_cpu = (opts.device == "cpu" or not torch.cuda.is_available()
               or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    state = PartialState(cpu=use_cpu)   # cpu=True makes torchrun-launched processes a gloo group (MULTI_CPU)
    rank, world = state.process_index, state.num_processes
    prepare_backbones(suite, opts, build=False)   # every process: fail fast on missing weights
    device = opts.device or str(state.device)
    backbones = prepare_backbones(suite, opts, build=True, device=device) if state.is_main_process else None
    samples = suite.samples(opts.limit)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for m in methods:
        sp = out / "records" / m.label / "_settings.json"
        want = settings_for(m, suite, opts, steps, guidance)
        if sp.exists() and not opts.overwrite:
            have = json.loads(sp.read_text())
            if have != want:
                diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
                raise ValueError(f"{out} already holds {m.label} results made with other settings {diff} "
                                 "(old, new); use a new --out, or --overwrite to regenerate them")
        state.wait_for_everyone()
        if state.is_main_process:
            if opts.overwrite and sp.exists():
                for f in (out / "records" / m.label).glob("*.json"):
                    f.unlink()
            atomic_write_text(sp, json.dumps(want, indent=2))
    state.wait_for_everyone()

    # 2. Generate (sharded), skipping finished samples.
    if opts.metrics_only:
        try:
            load_records(out, methods, samples)
        except RuntimeError as err:  # nothing to score yet: a user error, not a crash
            raise ValueError(f"--metrics-only scores what is on disk, and {out} lacks some of it: "
                             f"{err.args[0].split(';')[0]}; run the same command without --metrics-only to generate "
                             "them") from None
        res = QualityResult(out=out)
    else:
        res = generate(methods, samples, suite, opts, out, steps, guidance, rank, world, device)
    state.wait_for_everyone()
    if not state.is_main_process:
        return res

    # 3. Metrics and report, from everything on disk.
    summary, per, extras = compute_metrics(out, methods, samples, suite, backbones, opts.batch_size)
    extras["fid_feature_dim"] = getattr(backbones.fid_feature, "num_features", None)
    extras["warnings"] = sample_size_warnings(summary, extras["n_reference"], extras["fid_feature_dim"],
                                              extras["fid_backbone"])
    records = load_records(out, methods, samples)
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(r, default=_json_default) + "\n" for r in records))
    tmp = out / ".per_sample.csv.tmp"
    per.to_csv(tmp, index=False)
    os.replace(tmp, out / "per_sample.csv")
    tmp = out / ".summary.csv.tmp"
    summary.to_csv(tmp, index=False)
    os.replace(tmp, out / "summary.csv")
    atomic_write_text(out / "run.json", json.dumps({
        "suite": suite.path, "suite_raw": suite.raw, "methods": [m.spec for m in methods], "steps": steps,
        "guidance": guidance, "scheduler": scheduler_for(suite, opts), "pipeline_set": opts.pipeline_set or None,
        "limit": opts.limit, "processes": world,
        "dtype": opts.dtype, "device": device,
        "extras": extras, "notes": backbones.notes, "torch": torch.__version__}, indent=2, default=_json_default))
    if not opts.no_report:
        write_report(out, summary, per, extras, methods, samples, suite, backbones, steps, guidance, opts, world)
    res.summary, res.per_sample, res.warnings = summary, per, extras["warnings"]
    return res


def print_summary(summary) -> None:
    from .report import fmt

    cols = [c for c in ("method", "n", "fid", "kid", "fid_local", "clip_cosine", "clip_score_x100", "prompt_acc",
                        "bg_mae", "unmasked_violating_pixels", "latency_ms_mean") if c in summary.columns]
    widths = [max(len(c), *(len(fmt(v)) for v in summary[c])) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in summary[cols].itertuples(index=False):
        print("  ".join(fmt(v).ljust(w) for v, w in zip(r, widths)))
