"""What limits ShapesWorld prompt accuracy: the classifier or the autoencoder?

``python -m eval ceiling --suite data/suites/shapes.yaml --out runs/ceiling``

Prompt accuracy (``python -m eval quality``) is ShapesCLIP's zero-shot (shape, colour) pick on a crop
around the hole. No generated image can be expected to beat the same classifier on the ground truth
(the *ceiling* the quality report prints). This command breaks that ceiling down by object size and
mask kind, adds the same measure on the ground truth passed through the shipped autoencoder (every
latent-diffusion method can only produce what the autoencoder decodes), and writes the classifier's
shape confusion matrix, so a weak classifier and a lossy autoencoder can be told apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .report import df_table
from .suites import SuiteError, atomic_write_text, load_suite


def autoencode(vae, images: List[np.ndarray]) -> List[np.ndarray]:
    """uint8 (H, W, 3) images -> the autoencoder's reconstruction (latent mode, no sampling)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(vae.device, vae.dtype) / 127.5 - 1.0
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return list(((rec.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def measure(suite_path: str, shapes_clip: Optional[str] = None, autoencoder: Optional[str] = None,
            limit: Optional[int] = None, batch_size: int = 32):
    """-> per-object-edit DataFrame: size, kind, shape, colour, and for "real" / "autoencoder" the
    predicted (shape, colour) and whether it is the prompted pair."""
    import pandas as pd
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from lazydiff.defaults import MODELS_DIR

    from .metrics import ShapesZeroShot, batched, crop_resize, hole_crop_box, load_clip_folder, resolve_shapes_clip, to_batch

    suite = load_suite(suite_path)
    if suite.dataset != "shapesworld":
        raise SuiteError(f"{suite_path}: the ceiling needs ShapesWorld ground truth (dataset: shapesworld), "
                         f"got dataset: {suite.dataset}")
    ae_path = Path(autoencoder) if autoencoder else MODELS_DIR / "autoencoder"
    if not (ae_path / "config.json").exists():
        raise FileNotFoundError(f"no autoencoder at {ae_path} (config.json); pass --autoencoder FOLDER")
    vae = AutoencoderKL.from_pretrained(ae_path).eval()
    clip = load_clip_folder(resolve_shapes_clip(shapes_clip))
    zs = ShapesZeroShot(clip)
    samples = [s for s in suite.samples(limit) if s.meta.get("object_edit")]
    if not samples:
        raise SuiteError(f"{suite_path}" + (f" (--limit {limit})" if limit else "") + " has no object edits (insert or "
                         "replace) to classify; use a suite with those intents, such as data/suites/shapes.yaml")
    rows: List[Dict] = []
    for chunk in tqdm(list(batched(samples, batch_size)), desc="ceiling", unit="batch"):
        refs = [s.reference for s in chunk]
        preds = {}
        for name, imgs in (("real", refs), ("autoencoder", autoencode(vae, refs))):
            crops = [crop_resize(im, hole_crop_box(s.mask, suite.crop_margin), clip.image_size) for im, s in zip(imgs, chunk)]
            preds[name] = zs.predict(to_batch(crops))
        for k, s in enumerate(chunk):
            row = {"sample_id": s.id, "size": s.meta["size"], "kind": s.meta["kind"], "shape": s.meta["shape"],
                   "color": s.meta["color"], "mask_ratio": s.meta["mask_ratio"]}
            for name, p in preds.items():
                row[f"{name}_shape"], row[f"{name}_color"] = p[k]
                row[f"{name}_correct"] = p[k] == (s.meta["shape"], s.meta["color"])
            rows.append(row)
    return pd.DataFrame(rows)


def write_report(df, out: Path, suite_path: str, limit: Optional[int] = None) -> Path:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "ceiling.csv", index=False)
    from .breakdown import confusion_plot, size_groups

    holes = size_groups(df.mask_ratio)
    groups = [("all", df)] + [(f"{size}", d) for size, d in df.groupby("size")] + \
        [(f"{size} / {kind}", d) for (size, kind), d in df.groupby(["size", "kind"])] + \
        [(f"mask {g}", d) for g, d in df.groupby(holes, observed=True)]
    table = [{"objects": name, "n": len(d), "real": f"{100 * d.real_correct.mean():.1f}%",
              "autoencoder": f"{100 * d.autoencoder_correct.mean():.1f}%",
              "real shape": f"{100 * (d.real_shape == d['shape']).mean():.1f}%",
              "real colour": f"{100 * (d.real_color == d['color']).mean():.1f}%"} for name, d in groups]
    plot = confusion_plot({"Shape confusion on real renders (hole crops)": (df["shape"], df["real_shape"])},
                          out / "shape_confusion.png")
    text = ["# ShapesCLIP zero-shot ceiling", "",
            f"`python -m eval ceiling --suite {suite_path}" + (f" --limit {limit}" if limit else "")
            + "`: the object edits' ground truth, cropped around the hole as "
            "`python -m eval quality` crops it; *real* = the rendered ground truth, *autoencoder* = the same after the "
            "shipped autoencoder (encode, decode). *mask …*: by the hole's share of the canvas (the crop grows with "
            "the hole, so a small object is a smaller part of what the classifier sees).", "",
            df_table(pd.DataFrame(table), ["objects", "n", "real", "autoencoder", "real shape", "real colour"]), ""]
    text += [f"![shape confusion]({plot.name})", ""]
    atomic_write_text(out / "ceiling.md", "\n".join(text))
    return out / "ceiling.md"
