"""Compare several `quality` runs of the same suite: a sweep of sampling settings, or two model exports.

    python -m eval compare runs/val/g4.5 runs/val/g7.5 runs/val/steps10 --out runs/val/compare

Writes ``compare.md`` (one row per run and method, and each run's difference from the first run with a
95% interval from the paired per-edit differences), ``compare.csv`` and ``compare.png``. The runs must
hold the same edits (same suite and ``--limit``): the differences are paired edit by edit, so noise
common to both runs (the task, the seed) cancels.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .report import _plt, fmt, grouped_bars

# (summary column, per-sample column or None, label, lower is better, shown as a percentage)
METRICS = (
    ("prompt_acc", "prompt_correct", "prompt accuracy", False, True),
    ("shape_acc", "shape_correct", "shape accuracy", False, True),
    ("color_acc", "color_correct", "colour accuracy", False, True),
    ("bg_mae", "bg_mae", "bg MAE in hole (remove edits)", True, False),
    ("hole_mae_target", "hole_mae_target", "hole MAE vs ground truth", True, False),
    ("fid", None, "FID", True, False),
    ("fid_local", None, "local FID", True, False),
    ("latency_ms_median", None, "median latency (ms)", True, False),
)
SETTINGS = ("steps", "guidance", "scheduler", "dtype", "pipeline_set")


class CompareError(ValueError):
    """The runs cannot be compared; the message says why."""


def _load(run: Path) -> Dict:
    import pandas as pd

    files = {name: run / name for name in ("summary.csv", "per_sample.csv", "run.json")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise CompareError(f"{run} is not a finished quality run (missing {', '.join(missing)}); run "
                           f"`python -m eval quality ... --out {run}` (or add --metrics-only) first")
    try:
        info = json.loads(files["run.json"].read_text())
        summary, per = pd.read_csv(files["summary.csv"]), pd.read_csv(files["per_sample.csv"])
    except (OSError, ValueError) as err:  # JSONDecodeError and pandas' ParserError / EmptyDataError are ValueErrors
        raise CompareError(f"{run} holds an unreadable result file ({type(err).__name__}: {err}); rescore it with "
                           f"`python -m eval quality ... --out {run} --metrics-only`") from None
    if "method" not in summary.columns or not {"method", "sample_id"} <= set(per.columns):
        raise CompareError(f"{run}: summary.csv / per_sample.csv lack the method and sample_id columns; rescore it "
                           f"with `python -m eval quality ... --out {run} --metrics-only`")
    info.setdefault("scheduler", None)  # runs made before the option existed used each method's own
    return {"dir": run, "summary": summary, "per": per, "info": info}


def _labels(runs: List[Dict], labels: Optional[Sequence[str]]) -> List[str]:
    if labels:
        if len(labels) != len(runs):
            raise CompareError(f"--labels has {len(labels)} names for {len(runs)} runs")
        return list(labels)
    varying = [k for k in SETTINGS if len({str(r["info"].get(k)) for r in runs}) > 1]
    if not varying:
        return [r["dir"].name for r in runs]
    set_keys = list(dict.fromkeys(k for r in runs for k in (r["info"].get("pipeline_set") or {})))

    def show(k, v):
        if k == "scheduler":
            return v or "own sampler"
        if k == "pipeline_set":  # every option set in any run, with its default where a run left it alone
            from .quality import pipeline_attributes

            defaults = pipeline_attributes()
            return ", ".join(f"{a}={(v or {}).get(a, defaults.get(a))}" for a in set_keys)
        return {"steps": f"{v} steps", "guidance": f"guidance {v}"}.get(k, str(v))

    return [", ".join(show(k, r["info"].get(k)) for k in varying) for r in runs]


def _paired_delta(ref, other, method: str, col: str):
    """Mean per-edit difference (other - ref) on the edits both scored, and the half-width of its 95% interval."""
    a = ref[ref.method == method].set_index("sample_id")[col]
    b = other[other.method == method].set_index("sample_id")[col]
    both = a.dropna().index.intersection(b.dropna().index)
    if len(both) < 2:
        return float("nan"), float("nan")
    d = b.loc[both].astype(float).to_numpy() - a.loc[both].astype(float).to_numpy()
    return float(d.mean()), float(1.96 * d.std(ddof=1) / math.sqrt(len(d)))


def compare(run_dirs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None):
    """-> (markdown, long DataFrame); writes compare.md / .csv / .png into ``out``."""
    import pandas as pd

    if len(run_dirs) < 2:
        raise CompareError("give at least two quality runs to compare")
    runs = [_load(Path(d)) for d in run_dirs]
    first = runs[0]
    for r in runs[1:]:  # paired differences need the same edits
        for key, name in (("suite_raw", "suite"), ("limit", "--limit")):
            mine, theirs = r["info"].get(key), first["info"].get(key)
            if mine != theirs:
                paths = (r["info"].get("suite"), first["info"].get("suite"))
                shown = (f" ({paths[0]} vs {paths[1]})" if paths[0] != paths[1] else f" ({paths[0]} was edited between "
                         "the runs)") if key == "suite_raw" else f" ({mine or 'none'} vs {theirs or 'none'})"
                raise CompareError(f"{r['dir']} and {first['dir']} differ in {name}{shown}: they hold different edits, "
                                   "so they cannot be compared edit by edit. Rerun them on the same suite and --limit")
    names = _labels(runs, labels)
    methods = [m for m in first["summary"].method if all(m in set(r["summary"].method) for r in runs)]
    if not methods:
        raise CompareError("the runs have no method in common")
    rows = []
    for name, r in zip(names, runs):
        for m in methods:
            s = r["summary"][r["summary"].method == m].iloc[0]
            row = {"run": name, "dir": str(r["dir"]), "method": m,
                   **{k: r["info"].get(k) for k in SETTINGS}}
            for col, per_col, _, _, _ in METRICS:
                row[col] = float(s[col]) if col in s and pd.notna(s[col]) else float("nan")
                if per_col and per_col in r["per"].columns and r is not first:
                    row[f"{col}_delta"], row[f"{col}_ci95"] = _paired_delta(first["per"], r["per"], m, per_col)
            rows.append(row)
    df = pd.DataFrame(rows)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    df.to_csv(outp / "compare.csv", index=False)
    md = _markdown(df, names, methods, runs)
    (outp / "compare.md").write_text(md + "\n")
    _plot(df, names, methods, outp / "compare.png")
    return md, df


def _cell(row, col, pct):
    v = row.get(col)
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:.1%}" if pct else fmt(v)


def _markdown(df, names, methods, runs) -> str:
    shown = [m for m in METRICS if df[m[0]].notna().any()]
    info = runs[0]["info"]
    L = ["# Comparison of quality runs", "",
         f"- suite: `{info.get('suite')}`" + (f", --limit {info['limit']}" if info.get("limit") else ""),
         f"- runs (first = reference for the differences): " + "; ".join(f"**{n}** (`{r['dir']}`)" for n, r in zip(names, runs)),
         "- differences: mean over the edits both runs scored, ± the half-width of a 95% interval of the paired "
         "per-edit differences (a difference inside it is noise)", ""]
    # the runs' own warnings (FID on too few samples): a comparison inherits them
    warned = dict.fromkeys(w for r in runs for w in (r["info"].get("extras") or {}).get("warnings") or [])
    L += [f"**Warning: {w}**" for w in warned] + ([""] if warned else [])
    L += ["| run | method | " + " | ".join(m[2] for m in shown) + " |", "|---" * (len(shown) + 2) + "|"]
    for _, row in df.iterrows():
        L.append(f"| {row['run']} | {row['method']} | " + " | ".join(_cell(row, m[0], m[4]) for m in shown) + " |")
    paired = [m for m in shown if f"{m[0]}_delta" in df.columns]
    if paired:
        L += ["", "Difference from the first run (paired, per edit):", "",
              "| run | method | " + " | ".join(m[2] for m in paired) + " |", "|---" * (len(paired) + 2) + "|"]
        for _, row in df[df.run != names[0]].iterrows():
            cells = []
            for col, _, _, _, pct in paired:
                d, ci = row.get(f"{col}_delta"), row.get(f"{col}_ci95")
                if d is None or not np.isfinite(d):
                    cells.append("n/a")
                else:
                    cells.append(f"{d * 100:+.1f} ± {ci * 100:.1f} pts" if pct else f"{d:+.2f} ± {ci:.2f}")
            L.append(f"| {row['run']} | {row['method']} | " + " | ".join(cells) + " |")
    L += ["", "![comparison](compare.png)"]
    return "\n".join(L)


def _plot(df, names, methods, path: Path) -> Path:
    plt = _plt()
    shown = [m for m in METRICS if df[m[0]].notna().any()]
    cols = min(2, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 0.9 * len(names) + 2) * cols, 3.0 * rows), squeeze=False)
    labels = [n.replace(", ", "\n") for n in names]
    for k, (col, _, label, lower, pct) in enumerate(shown):
        ax = axes[k // cols][k % cols]
        scale = 100 if pct else 1
        series = {}
        for m in methods:
            sub = df[df.method == m].set_index("run").reindex(names)
            # the paired interval of the difference, drawn on each run but the first
            err = sub[f"{col}_ci95"].to_numpy(dtype=float) * scale if f"{col}_ci95" in sub.columns else None
            series[m] = (sub[col].to_numpy(dtype=float) * scale, err)
        grouped_bars(ax, labels, series, f"{label}{' (%)' if pct else ''} ({'lower' if lower else 'higher'} is better)")
    for k in range(len(shown), rows * cols):
        axes[k // cols][k % cols].axis("off")
    # one legend above the panels: inside a panel it covered the first bars
    handles, names_ = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("error bars: 95% interval of the paired difference from the first run", fontsize=8, y=0.975)
    fig.tight_layout(rect=(0, 0, 1, 0.955))  # room for the legend (_save's tight_layout would take it back)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
