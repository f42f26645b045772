"""Reports: Markdown tables, PNG plots (matplotlib, Agg) and the paper's numbers for comparison."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

# SPEC §3: the paper's numbers (secondary sources; approximate). 10K images at 1024², CLIP = raw cosine.
PAPER_QUALITY = [
    # (method, CLIP cosine, FID, our label)
    ("SD2-inpaint on crop", 0.21, 6.95, None),
    ("SDXL inpainting", 0.21, 6.88, None),
    ("RegenerateCrop", 0.19, 9.35, "regenerate-crop"),
    ("RegenerateImage", 0.19, 7.38, "regenerate-image"),
    ("LazyDiffusion", 0.19, 7.70, "lazy"),
]
PAPER_RUNTIME_MS = {"context_encoder": 73.0, "vae_encode": 97.0, "vae_decode": 176.0, "text": 21.0,
                    "decoder_step_10pct": 28.0, "decoder_step_full": 374.0}
PAPER_DISPLAY = {"lazy": "LazyDiffusion", "regenerate-image": "RegenerateImage", "regenerate-crop": "RegenerateCrop",
                 "tiny-lazy": "LazyDiffusion (tiny random)", "tiny-regenerate-image": "RegenerateImage (tiny random)",
                 "tiny-regenerate-crop": "RegenerateCrop (tiny random)"}
COLORS = {"lazy": "#d62728", "regenerate-image": "#1f77b4", "regenerate-crop": "#2ca02c"}


def color_for(label: str, i: int) -> str:
    base = label[5:] if label.startswith("tiny-") else label
    if base in COLORS:
        return COLORS[base]
    import matplotlib

    # other labels (folders, "followup/lazy", ...): tab10 without the three colours above, so that no
    # other series is drawn in, e.g., LazyDiffusion's red
    free = [c for c in matplotlib.colormaps["tab10"].colors
            if matplotlib.colors.to_hex(c) not in COLORS.values()]
    return matplotlib.colors.to_hex(free[i % len(free)])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plain_number(v: float) -> str:
    """A tick value as a plain number: 0.01, 0.25, 1, 20, 300,000 (no "2×10⁻¹")."""
    v = float(f"{v:.6g}")
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    return np.format_float_positional(v, trim="-")


def _plain_log_locator(max_ticks: int = 8):
    """Major ticks of a log axis at 1-2-5 times a power of ten inside the view (1-3 or powers of ten
    when that makes more than ``max_ticks``; 1-2-3-5, every digit or a few round values when it makes
    fewer), recomputed whenever the limits change."""
    import matplotlib.ticker as mticker

    class PlainLogLocator(mticker.Locator):
        def __call__(self):
            return self.tick_values(*self.axis.get_view_interval())

        def tick_values(self, vmin, vmax):
            lo, hi = sorted((float(vmin), float(vmax)))
            if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= 0:
                return []
            lo = max(lo, hi * 1e-12)
            decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)

            def within(mantissas):
                return [m * 10.0 ** e for e in decades for m in mantissas if lo <= m * 10.0 ** e <= hi]

            for mantissas in ((1, 2, 5), (1, 3), (1,)):   # the finest that fits
                ticks = within(mantissas)
                if len(ticks) <= max_ticks:
                    break
            if len(ticks) > max_ticks:  # more decades than ticks: every k-th power of ten
                ticks = ticks[:: math.ceil(len(ticks) / max_ticks)]
            if len(ticks) < 4 and 2 <= len(within((1, 2, 3, 5))) <= max_ticks:   # a narrow range
                ticks = within((1, 2, 3, 5))
            if len(ticks) < 2:
                ticks = within(range(1, 10))
            if len(ticks) < 2:          # a range inside one 1-9 step: a few round values inside it
                ticks = [t for t in mticker.MaxNLocator(nbins=4, steps=[1, 2, 5, 10]).tick_values(lo, hi)
                         if lo <= t <= hi and t > 0]
            return ticks

    return PlainLogLocator()


def plain_log_ticks(ax, which: str = "xy") -> None:
    """Label the log axes of ``ax`` with plain numbers (0.1, 0.2, 0.5, 1, 2, ...): matplotlib's log
    formatter prints "10⁻¹" and, when a range spans under a decade, "2×10⁻¹" on minor ticks. Minor
    ticks stay as unlabelled marks."""
    import matplotlib.ticker as mticker

    for name in which:
        axis = ax.xaxis if name == "x" else ax.yaxis
        if axis.get_scale() != "log":
            continue
        axis.set_major_locator(_plain_log_locator(9 if name == "x" else 8))
        axis.set_major_formatter(mticker.FuncFormatter(lambda v, _pos: plain_number(v)))
        axis.set_minor_formatter(mticker.NullFormatter())


def _log_axes(ax, ylabel: str, title: str, legend_size: int) -> None:
    """Log-log axes over the mask ratio, as every runtime plot draws them, with plain-number ticks."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("mask ratio")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    # below the axes: inside, with several methods, it covered the lines
    ax.legend(fontsize=legend_size, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            return "n/a"
        a = abs(float(v))
        if a != 0 and (a >= 1e6 or a < 1e-3):
            return f"{float(v):.3g}"
        if a >= 100:
            return f"{float(v):,.1f}"
        return f"{float(v):.{digits}g}" if a < 1 else f"{float(v):.{max(digits - 1, 1)}g}" if a < 10 else f"{float(v):.2f}"
    return str(v)


def md_table(rows: Sequence[Dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    headers = list(headers or columns)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def df_table(df, columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    cols = [c for c in columns if c in df.columns]
    hdr = None
    if headers is not None:
        hdr = [h for c, h in zip(columns, headers) if c in df.columns]
    return md_table(df[cols].to_dict("records"), cols, hdr)


# ----------------------------------------------------------------------------- quality plots
def grouped_bars(ax, labels: Sequence[str], series: Dict[str, tuple], title: str) -> None:
    """A group of bars per x label, one bar per series ``{name: (values, 95% half-widths, or a (2, N) array of
    lower and upper lengths, or None)}``, in the method colours (NaN values and intervals draw nothing)."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(labels))
    for i, (name, (vals, err)) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(np.asarray(vals, float)), width,
               yerr=None if err is None else np.asarray(err, float), capsize=2,  # NaN: no error bar
               color=color_for(name, i), label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)


def bar_charts(summary, metrics: Sequence[tuple], path: Path, title: str = "",
               references: Optional[Dict[str, tuple]] = None) -> Optional[Path]:
    """One bar chart per (column, label, lower_is_better) for every method in ``summary``;
    ``references`` maps a column to (value, label), drawn as a dashed line (e.g. the ceiling)."""
    metrics = [m for m in metrics if m[0] in summary.columns and summary[m[0]].notna().any()]
    if not metrics:
        return None
    plt = _plt()
    n = len(metrics)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows), squeeze=False)
    labels = list(summary["method"])
    for k, (col, label, lower) in enumerate(metrics):
        ax = axes[k // cols][k % cols]
        vals = summary[col].astype(float).to_numpy()
        bars = ax.bar(range(len(labels)), np.nan_to_num(vals), color=[color_for(l, i) for i, l in enumerate(labels)])
        for b, v in zip(bars, vals):  # the value beyond the bar's end (below a negative one, e.g. KID)
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), fmt(v, 3), ha="center",
                    va="top" if v < 0 else "bottom", fontsize=7)
        ax.margins(y=0.12)  # room for the values inside the frame
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=7)
        ax.set_title(f"{label} ({'lower' if lower else 'higher'} is better)", fontsize=8)
        ref = (references or {}).get(col)
        if ref is not None and np.isfinite(ref[0]):
            ax.axhline(ref[0], color="0.35", linestyle="--", linewidth=1)
            ax.text(len(labels) - 0.5, ref[0], f"{ref[1]}: {fmt(ref[0], 3)}", ha="right", va="bottom", fontsize=7,
                    color="0.25")
            ax.set_ylim(top=max(ax.get_ylim()[1], ref[0] * 1.12))
        ax.tick_params(axis="y", labelsize=7)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return path


def example_grid(rows: List[Dict], methods: Sequence[str], path: Path, reference_label: str = "reference") -> Optional[Path]:
    """rows: {"image", "mask", "reference", "prompt", "outputs": {method: array}} -> PNG grid."""
    if not rows:
        return None
    plt = _plt()
    ncol = len(methods) + 2
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol, 2.05 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        shown = row["image"].astype(np.float32).copy()
        m = row["mask"]
        shown[m] = 0.55 * shown[m] + 0.45 * np.array([255, 0, 255], np.float32)
        panels = [("input + mask", shown.astype(np.uint8))]
        panels += [(meth, row["outputs"].get(meth)) for meth in methods]
        panels.append((reference_label, row["reference"]))
        for c, (name, img) in enumerate(panels):
            ax = axes[r][c]
            ax.axis("off")
            if img is not None:
                ax.imshow(img, interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=7)
        axes[r][0].text(0, -0.06, row["prompt"][:40], transform=axes[r][0].transAxes, fontsize=6, va="top")
    _save(fig, path)
    return path


# ----------------------------------------------------------------------------- runtime plots
def _iqr(d, col):
    """Error bars from ``col``'s quartile columns; none for a table without them (a console table)."""
    if f"{col}_q1" not in d or f"{col}_q3" not in d:
        return None
    return [d[col] - d[f"{col}_q1"], d[f"{col}_q3"] - d[col]]


def runtime_plots(df, out: Path, fit: Optional[Dict] = None) -> Dict[str, Path]:
    """Latency vs mask ratio, speedup vs mask ratio, per-step time vs hole tokens (with the fit),
    and a stacked per-stage breakdown. ``df`` is runtime.csv (one row per method x ratio); a table
    of the console's columns only (no quartiles, no stages) gives the plots without error bars and
    without the breakdown."""
    plt = _plt()
    paths: Dict[str, Path] = {}
    methods = list(dict.fromkeys(df["method"]))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, m in enumerate(methods):
        d = df[df.method == m].sort_values("mask_ratio")
        c = color_for(m, i)
        axes[0].errorbar(d.mask_ratio, d.total_ms, yerr=_iqr(d, "total_ms"), marker="o", color=c, label=m, capsize=2)
        axes[1].errorbar(d.mask_ratio, d.denoise_ms_per_step, yerr=_iqr(d, "denoise_ms_per_step"),
                         marker="o", color=c, label=m, capsize=2)
    spread = "median, IQR" if _iqr(df, "total_ms") is not None else "median"
    for ax, t in zip(axes, (f"end-to-end edit latency ({spread})", f"denoiser time per step ({spread})")):
        _log_axes(ax, "ms", t, 7)
    paths["latency"] = _save(fig, out / "latency_vs_mask_ratio.png")

    # Speed-ups are over the full-canvas baseline: none without it in the run (``--methods lazy``).
    others = [(i, m) for i, m in enumerate(methods) if not m.endswith("regenerate-image")]
    if len(others) < len(methods) and others:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for i, m in others:
            d = df[df.method == m].sort_values("mask_ratio")
            c = color_for(m, i)
            ax.plot(d.mask_ratio, d.speedup_vs_full, marker="o", color=c, label=f"{m}: end-to-end")
            ax.plot(d.mask_ratio, d.denoise_speedup_vs_full, marker="s", ls="--", color=c, alpha=0.7, label=f"{m}: per step")
            if "flops_ratio_vs_full" in d:
                ax.plot(d.mask_ratio, d.flops_ratio_vs_full, ls=":", color=c, alpha=0.7, label=f"{m}: FLOP ratio (end-to-end)")
        ax.axhline(1.0, color="k", lw=0.8)
        _log_axes(ax, "speed-up over RegenerateImage (x)", "speed-up vs mask ratio (same backbone, dtype, threads)", 6)
        paths["speedup"] = _save(fig, out / "speedup_vs_mask_ratio.png")

    lazy = [m for m in methods if m.endswith("lazy")]
    if lazy:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        d = df[df.method == lazy[0]].sort_values("hole_tokens")
        ax.errorbar(d.hole_tokens, d.denoise_ms_per_step, yerr=_iqr(d, "denoise_ms_per_step"), marker="o", ls="none",
                    color=color_for(lazy[0], 0), label=f"{lazy[0]} ({spread})")
        if fit and fit.get("slope_ms_per_token") is not None:
            xs = np.linspace(0, float(d.hole_tokens.max()), 50)
            ax.plot(xs, fit["intercept_ms"] + fit["slope_ms_per_token"] * xs, "k--",
                    label=f"fit (ratio ≤ {fit['max_ratio']:g}): {fit['intercept_ms']:.3g} ms + "
                          f"{fit['slope_ms_per_token'] * 1e3:.3g} µs·N, R²={fit['r2']:.3f}")
        full = [m for m in methods if m.endswith("regenerate-image")]
        if full:
            f = df[df.method == full[0]]
            ax.axhline(float(f.denoise_ms_per_step.median()), color=color_for(full[0], 1), ls=":",
                       label=f"{full[0]} ({int(f.total_tokens.iloc[0])} tokens)")
        ax.set_xlabel("hole tokens |H|")
        ax.set_ylabel("ms per denoising step")
        ax.set_title("per-step denoiser time vs hole tokens", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
        paths["per_step"] = _save(fig, out / "per_step_vs_hole_tokens.png")

    stages = [c for c in ("stage_text_ms", "stage_vae_encode_ms", "stage_context_encoder_ms", "stage_denoise_ms",
                          "stage_vae_decode_ms", "stage_blend_ms", "stage_other_ms") if c in df.columns]
    if not stages:
        return paths
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(df)), 4))
    d = df.sort_values(["mask_ratio", "method"]).reset_index(drop=True)
    # seconds where edits take that long (paper shape on a CPU), so the axis does not read 700000
    scale, unit = (1e3, "s") if d[stages].fillna(0).sum(axis=1).max() >= 1e4 else (1.0, "ms")
    bottom = np.zeros(len(d))
    cmap = _plt().get_cmap("tab10")
    for k, s in enumerate(stages):
        v = d[s].fillna(0).to_numpy(float) / scale
        ax.bar(range(len(d)), v, bottom=bottom, color=cmap(k), label=s[6:-3].replace("_", " "))
        bottom += v
    ax.set_xticks(range(len(d)))
    few = len(d) <= 6   # a handful of bars: labels read across; many: rotated to fit
    ax.set_xticklabels([f"{m}\n{r:g}" if few else f"{m} {r:g}" for m, r in zip(d.method, d.mask_ratio)],
                       rotation=0 if few else 90, fontsize=7 if few else 6)
    ax.set_ylabel(f"{unit} (median per stage)")
    ax.set_title("per-stage breakdown (method / mask ratio)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    paths["stages"] = _save(fig, out / "stage_breakdown.png")
    return paths
