"""Where a method wins or loses on ShapesWorld: prompt accuracy and background error by mask kind and
by mask size, and shape accuracy by prompted shape with the shape confusion, from a quality run's
per-sample table (the "By mask kind and size" and "By prompted shape" sections of report.md)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .report import _plt, _save, grouped_bars

MASK_RATIO_BINS = (0.0, 0.1, 0.2, 0.35, 1.0)   # the suites' masks cover 2-60% of the canvas
KIND_ORDER = ("object", "box", "brush")
NEEDED = ("method", "mask_ratio", "kind", "prompt_correct", "bg_mae")


def size_labels(bins: Sequence[float] = MASK_RATIO_BINS) -> List[str]:
    """The mask-size groups' names: "0%–10%", ..., "≥ 35%"."""
    return [f"{lo:.0%}–{hi:.0%}" if hi < 1 else f"≥ {lo:.0%}" for lo, hi in zip(bins[:-1], bins[1:])]


def size_groups(mask_ratio, bins: Sequence[float] = MASK_RATIO_BINS):
    """Each mask ratio's group of :func:`size_labels` (a pandas Categorical)."""
    import pandas as pd

    return pd.cut(mask_ratio.astype(float), list(bins), labels=size_labels(bins), right=False)


def wilson(k: float, n: int, z: float = 1.96):
    """95% Wilson score interval (lo, hi) of a proportion k / n: inside [0, 1] and not empty at 0% or 100%
    (the normal interval is zero-wide there, and passes 100% in small groups); (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def breakdown(per, bins: Sequence[float] = MASK_RATIO_BINS):
    """Rows (by, group, method, n_object_edits, prompt_acc, shape_acc, n_remove, bg_mae, the 95% Wilson
    interval of prompt_acc (prompt_acc_lo, prompt_acc_hi) and bg_mae's 95% half-width bg_mae_ci95); None
    when ``per`` lacks the ShapesWorld columns (folder suites)."""
    import pandas as pd

    if per is None or not all(c in per.columns for c in NEEDED) or per.kind.isna().all():
        return None
    per = per.assign(size=size_groups(per.mask_ratio, bins))
    rows = []
    for by, col, order in (("mask kind", "kind", [k for k in KIND_ORDER if k in set(per.kind)]),
                           ("mask size", "size", size_labels(bins))):
        for group in order:
            if not (per[col] == group).any():  # e.g. a suite of large holes only
                continue
            for method in dict.fromkeys(per.method):
                sub = per[(per[col] == group) & (per.method == method)]
                obj = sub[sub.prompt_correct.notna()]
                rem = sub[sub.bg_mae.notna()]
                acc = obj.prompt_correct.astype(float).mean() if len(obj) else math.nan
                ceiling = obj.gt_prompt_correct.astype(float).mean() if len(obj) and "gt_prompt_correct" in obj \
                    else math.nan  # the classifier on the ground truth: what a perfect edit scores here
                rows.append({"by": by, "group": group, "method": method, "n_object_edits": len(obj),
                             "prompt_acc": acc, "prompt_acc_ceiling": ceiling,
                             **dict(zip(("prompt_acc_lo", "prompt_acc_hi"),
                                        wilson(obj.prompt_correct.astype(float).sum(), len(obj)))),
                             "shape_acc": obj.shape_correct.astype(float).mean() if len(obj) and "shape_correct" in obj
                             else math.nan,
                             "n_remove": len(rem), "bg_mae": rem.bg_mae.astype(float).mean() if len(rem) else math.nan,
                             "bg_mae_ci95": 1.96 * rem.bg_mae.astype(float).std(ddof=1) / math.sqrt(len(rem))
                             if len(rem) > 1 else math.nan})
    return pd.DataFrame(rows)


def markdown(df) -> List[str]:
    """One table per grouping: a row per group, each method's accuracy and background error side by side."""
    methods = list(dict.fromkeys(df.method))
    L = []
    for by in dict.fromkeys(df.by):
        sub = df[df.by == by]
        ceil = "prompt_acc_ceiling" in sub and np.isfinite(sub.prompt_acc_ceiling.astype(float)).any()
        head = ([by, "object edits"] + (["ceiling (ground truth)"] if ceil else []) + [f"{m} prompt acc." for m in methods]
                + ["remove edits"] + [f"{m} bg MAE" for m in methods])
        L += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for group in dict.fromkeys(sub.group):
            g = sub[sub.group == group].set_index("method")
            acc = [f"{g.prompt_acc[m]:.1%}" if np.isfinite(g.prompt_acc[m]) else "–" for m in methods]
            bg = [f"{g.bg_mae[m]:.2f}" if np.isfinite(g.bg_mae[m]) else "–" for m in methods]
            c = g.prompt_acc_ceiling.astype(float).iloc[0] if ceil else math.nan
            L.append("| " + " | ".join([str(group), str(int(g.n_object_edits.iloc[0]))]
                                       + ([f"{c:.1%}" if np.isfinite(c) else "–"] if ceil else []) + acc
                                       + [str(int(g.n_remove.iloc[0]))] + bg) + " |")
        L.append("")
    return L


def plot(df, path: Path) -> Optional[Path]:
    """Bars of prompt accuracy (with each group's ceiling) and, where there are remove edits, background
    error, by mask kind and by mask size, one bar per method; the error bars are 95% intervals of each
    cell's mean (accuracy: Wilson; background error: normal), none for a cell of one edit or none."""
    if df is None or df.empty:
        return None
    plt = _plt()
    methods = list(dict.fromkeys(df.method))
    groupings = list(dict.fromkeys(df.by))
    panels = [("prompt_acc", "n_object_edits", "prompt accuracy (%)", 100)]
    if df.n_remove.sum() > 0:
        panels.append(("bg_mae", "n_remove", "bg MAE in hole (0-255)", 1))
    fig, axes = plt.subplots(len(panels), len(groupings), figsize=(4.6 * len(groupings), 3.0 * len(panels) + 0.4),
                             squeeze=False)
    for j, by in enumerate(groupings):
        sub = df[df.by == by]
        groups = list(dict.fromkeys(sub.group))
        for i_row, (col, ncol, label, scale) in enumerate(panels):
            cells = {m: sub[sub.method == m].set_index("group").reindex(groups) for m in methods}
            series = {}
            for m, g in cells.items():
                v = g[col].to_numpy(dtype=float)
                if col == "prompt_acc" and "prompt_acc_lo" in g:  # asymmetric, inside 0-100% (older CSVs: _ci95)
                    lo, hi = g.prompt_acc_lo.to_numpy(dtype=float), g.prompt_acc_hi.to_numpy(dtype=float)
                    err = np.stack([v - lo, hi - v])
                else:
                    err = g[f"{col}_ci95"].to_numpy(dtype=float)
                series[m] = (v * scale, err * scale)
            counts = cells[methods[0]][ncol]
            ax = axes[i_row][j]
            grouped_bars(ax, [f"{g}\n(n={int(c)})" for g, c in zip(groups, counts)], series, f"{label} by {by}")
            if col == "prompt_acc":
                if "prompt_acc_ceiling" in sub:  # the classifier on the ground truth, per group
                    ceil = cells[methods[0]].prompt_acc_ceiling.to_numpy(dtype=float) * 100
                    ax.scatter(np.arange(len(groups)), ceil, marker="_", s=900, color="black", zorder=3,
                               label="ceiling (ground truth)")
                ax.set_ylim(0, 140)  # room for the legend (two rows) above the bars and ceilings
                ax.set_yticks(range(0, 101, 20))
                if j == 0:
                    ax.legend(fontsize=7, loc="upper left", ncol=2, markerscale=0.3)  # inside the panel
    return _save(fig, path)


def object_edits(per):
    """The per-sample rows of object edits that ShapesCLIP classified."""
    return per[per.target_shape.notna() & per.pred_shape.notna()]


def by_shape(per):
    """Rows (shape, method, n_object_edits, shape_acc, prompt_acc, prompt_acc_ceiling) for each prompted
    shape; None without the ShapesWorld columns."""
    import pandas as pd

    need = ("method", "target_shape", "pred_shape", "shape_correct", "prompt_correct")
    if per is None or not all(c in per.columns for c in need):
        return None
    obj = object_edits(per)
    if obj.empty:
        return None
    rows = []
    for shape in sorted(set(obj.target_shape)):
        for method in dict.fromkeys(obj.method):
            sub = obj[(obj.target_shape == shape) & (obj.method == method)]
            rows.append({"shape": shape, "method": method, "n_object_edits": len(sub),
                         "shape_acc": sub.shape_correct.astype(float).mean(),
                         "prompt_acc": sub.prompt_correct.astype(float).mean(),
                         "prompt_acc_ceiling": sub.gt_prompt_correct.astype(float).mean()
                         if "gt_prompt_correct" in sub else math.nan})
    return pd.DataFrame(rows)


def shape_markdown(df) -> List[str]:
    methods = list(dict.fromkeys(df.method))
    head = ["prompted shape", "object edits", "ceiling (ground truth)"] + [f"{m} shape acc." for m in methods] \
        + [f"{m} prompt acc." for m in methods]
    L = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for shape in dict.fromkeys(df["shape"]):
        g = df[df["shape"] == shape].set_index("method")
        c = float(g.prompt_acc_ceiling.iloc[0])
        L.append("| " + " | ".join([shape, str(int(g.n_object_edits.iloc[0])), f"{c:.1%}" if np.isfinite(c) else "–"]
                                   + [f"{g.shape_acc[m]:.1%}" for m in methods]
                                   + [f"{g.prompt_acc[m]:.1%}" for m in methods]) + " |")
    return L + [""]


def confusion_plot(panels, path: Path, xlabel: str = "ShapesCLIP's zero-shot shape") -> Path:
    """Row-normalised shape confusion matrices side by side; ``panels`` maps a title to (prompted shapes,
    predicted shapes), two equal-length sequences."""
    import pandas as pd

    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.4), squeeze=False)
    rows = sorted({x for true, _ in panels.values() for x in true})   # the same rows and columns in every panel
    shapes = sorted(set(rows) | {x for _, pred in panels.values() for x in pred})
    for ax, (title, (true, pred)) in zip(axes[0], panels.items()):
        true, pred = pd.Series(list(true), name="prompted"), pd.Series(list(pred), name="predicted")
        m = pd.crosstab(true, pred).reindex(index=rows, columns=shapes, fill_value=0)
        frac = m.div(m.sum(axis=1), axis=0)
        ax.imshow(frac.values, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(frac.columns)), frac.columns, rotation=45, ha="right")
        ax.set_yticks(range(len(frac.index)), frac.index)
        for i in range(frac.shape[0]):
            for j in range(frac.shape[1]):
                ax.text(j, i, "–" if np.isnan(frac.values[i, j]) else f"{frac.values[i, j]:.2f}", ha="center",
                        va="center", fontsize=8,
                        color="white" if frac.values[i, j] > 0.5 else "black")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("prompted shape")
        ax.set_title(title, fontsize=10)
    return _save(fig, path)  # no colour bar: each cell prints its share
