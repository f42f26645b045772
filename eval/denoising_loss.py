"""``python -m eval loss``: held-out denoising error inside the hole, on object and background tokens.

The training loss on edits no model was trained on, measured with each pipeline's own components:
for every edit of a ShapesWorld suite and a few fixed timesteps, the target canvas is noised with
seeded noise and the pipeline's denoiser (``make_denoiser``, the same step a pipeline samples with:
context encoder + hole tokens for LazyDiffusion, the whole canvas for RegenerateImage) predicts the
noise. The squared error on the hole's tokens is split into tokens that cover the prompted object
(the ground truth differs from the analytic background there) and pure-background tokens, and the
background tokens at the hole's edge (next to a known token; chessboard distance 1) are reported too.

It needs no sampling and no classifier, so it moves with training long before prompt accuracy does,
and it tells which part of the hole a model fills worse. Ratios against ``--reference`` come with
95% intervals from a paired bootstrap over the edits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .breakdown import KIND_ORDER, size_groups, size_labels
from .report import _plt, _save, md_table
from .suites import SuiteError, atomic_write_text, load_suite

DEFAULT_TIMESTEPS = (200, 400, 600)
PARTS = ("object", "background", "edge", "hole")   # "edge": background tokens next to a known token
PART_LABELS = {"object": "object tokens", "background": "background tokens", "edge": "background at the edge",
               "hole": "whole hole"}
BOOTSTRAP_ROUNDS = 2000


@dataclass
class LossOptions:
    suite: str
    out: str
    methods: List[str] = field(default_factory=lambda: ["lazy", "regenerate-image"])
    reference: str = "regenerate-image"
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS
    limit: Optional[int] = None
    seed: int = 0
    device: str = "cpu"


def token_errors(pipe, sample, timesteps: Sequence[int], seed: int, device: str = "cpu") -> Dict[str, np.ndarray]:
    """Squared noise-prediction error per hole token of one edit, at each timestep (a batch of them).

    -> {"error": (T, |H|) mean over channels, "object": (|H|,) bool: which hole tokens touch the
    prompted object (where the reference differs from the analytic background), "edge": (|H|,) bool:
    which touch a token outside the hole (8-neighbourhood)}."""
    from lazydiff.models.dit import gather_tokens, token_mask_from_pixels
    from lazydiff.pipelines.editing import StageTimer, prepare_edit, to_tensor

    edit = prepare_edit(sample.image, sample.mask, pipe.token_cell)
    if edit.padded_size != tuple(sample.mask.shape):
        raise SuiteError(f"{sample.id}: the canvas ({sample.mask.shape[1]}x{sample.mask.shape[0]}) is not a multiple "
                         f"of the model's token cell ({pipe.token_cell} px)")
    n = len(timesteps)
    t = torch.tensor(list(timesteps), device=device)
    text, text_mask = pipe.encode_prompt(sample.prompt, None, False, n, device)
    enc = pipe.encode_canvas(edit, device)
    to_working, denoise, to_hole_tokens = pipe.make_denoiser(enc, edit, text, text_mask, n, device,
                                                             StageTimer(torch.device(device)))
    x0 = pipe.vae_encode(to_tensor(sample.reference, device, torch.float32))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(device, x0.dtype).expand(n, -1, -1, -1)
    xt = pipe.scheduler.add_noise(x0.expand(n, -1, -1, -1), noise, t)
    eps = denoise(to_working(xt).to(pipe.model_dtype), t).float()
    pred = to_hole_tokens(eps)
    target = pipe.hole_tokens_of(noise.float(), enc["hole_index"])
    err = ((pred[..., : target.shape[-1]] - target) ** 2).mean(-1)
    background = sample.background
    obj_px = np.zeros(sample.mask.shape, bool) if background is None else \
        (sample.reference != background).any(-1) & sample.mask
    obj_tokens = token_mask_from_pixels(torch.from_numpy(obj_px)[None, None].float(), pipe.token_cell).flatten(1)
    is_obj = gather_tokens(obj_tokens.float()[..., None], enc["hole_index"])[0, :, 0] > 0
    from scipy import ndimage

    hole = enc["token_mask"][0].cpu().numpy().astype(bool)                       # (gh, gw)
    near = ndimage.binary_dilation(~hole, np.ones((3, 3), bool))  # outside the canvas is not known content
    edge = near.reshape(-1)[enc["hole_index"][0].cpu().numpy()]
    return {"error": err.cpu().numpy(), "object": is_obj.cpu().numpy(), "edge": edge}


def measure(opts: LossOptions):
    """-> DataFrame, a row per (edit, method, timestep): id, method, t, kind, intent, mask_ratio, the hole's
    token counts (hole, object, edge) and the summed squared error on its object, background, edge
    (background tokens next to a known token) and all tokens."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .methods import resolve_methods

    if "regenerate-crop" in opts.methods:
        raise SuiteError("regenerate-crop runs RegenerateImage's decoder on a resized crop: its denoising loss "
                         "at the canvas' resolution is regenerate-image's. Leave it out of --methods")
    if opts.reference not in opts.methods:
        raise SuiteError(f"--reference {opts.reference!r} is not among --methods {','.join(opts.methods)}")
    suite = load_suite(opts.suite)
    if suite.dataset != "shapesworld":
        raise SuiteError(f"{opts.suite}: the object / background split needs ShapesWorld ground truth "
                         f"(dataset: shapesworld), got dataset: {suite.dataset}")
    methods = resolve_methods(opts.methods)
    samples = suite.samples(opts.limit)
    rows: List[Dict] = []
    for m in methods:
        pipe = m.load(opts.device, torch.float32)
        pipe.canvas_cache = "off"  # every edit is a fresh canvas
        with torch.no_grad():
            for i, s in enumerate(tqdm(samples, desc=f"denoising loss, {m.label}", unit="edit")):
                res = token_errors(pipe, s, opts.timesteps, opts.seed * 1_000_003 + i, opts.device)
                err, obj = res["error"], res["object"]
                edge = res["edge"] & ~obj
                for k, ts in enumerate(opts.timesteps):
                    rows.append(dict(id=s.id, method=m.label, t=int(ts), kind=s.meta.get("kind"),
                                     intent=s.meta.get("intent"), mask_ratio=float(s.meta.get("mask_ratio", s.mask.mean())),
                                     hole_tokens=int(len(obj)), object_tokens=int(obj.sum()), edge_tokens=int(edge.sum()),
                                     object=float(err[k][obj].sum()), background=float(err[k][~obj].sum()),
                                     edge=float(err[k][edge].sum()), hole=float(err[k].sum())))
        del pipe
    return pd.DataFrame(rows)


def summarise(per, reference: str, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0):
    """Rows (by, group, part, method, edits, tokens, mse, ratio, ratio_lo, ratio_hi): mean squared error per
    token of each part of the hole, and its ratio to ``reference`` with a 95% paired-bootstrap interval
    (edits resampled; both methods keep their own errors on each resampled edit)."""
    import pandas as pd

    per = per.assign(size=size_groups(per.mask_ratio).astype(str), background_tokens=per.hole_tokens - per.object_tokens)
    counts = {p: f"{p}_tokens" for p in PARTS}
    info = per.drop_duplicates("id").set_index("id")[["kind", "size"]]

    def per_edit(rows):  # sums over the timesteps of each (edit, method)
        return rows.groupby(["id", "method"], sort=False)[list(PARTS) + list(counts.values())].sum() \
            .reset_index().join(info, on="id")

    edits = per_edit(per)
    rng = np.random.default_rng(seed)
    groupings = [("all", None, ["all"]),
                 ("mask size", "size", [g for g in size_labels() if g in set(edits["size"])]),
                 ("mask kind", "kind", [k for k in KIND_ORDER if k in set(edits.kind)]),
                 ("timestep", "t", sorted(set(per.t)))]
    methods = list(dict.fromkeys(edits.method))
    out = []
    for by, col, groups in groupings:
        for group in groups:
            sub = edits if col is None else per_edit(per[per.t == group]) if col == "t" else edits[edits[col] == group]
            for part in PARTS:
                err = sub.pivot(index="id", columns="method", values=part)
                tok = sub.pivot(index="id", columns="method", values=counts[part])
                idx = rng.integers(0, len(err), (rounds, len(err))) if len(err) > 1 else None
                ref_e = err[reference].to_numpy()
                for m in methods:
                    e, n = err[m].to_numpy(), tok[m].to_numpy()
                    mse = e.sum() / n.sum() if n.sum() else math.nan
                    ratio = lo = hi = math.nan
                    if m != reference and n.sum() and ref_e.sum() > 0:
                        ratio = e.sum() / ref_e.sum()  # same tokens for both methods: a ratio of means
                        if idx is not None:
                            num, den = e[idx].sum(1), ref_e[idx].sum(1)
                            ok = den > 0  # a resample without tokens of this part has no ratio
                            if ok.any():
                                lo, hi = np.percentile(num[ok] / den[ok], [2.5, 97.5])
                    out.append(dict(by=by, group=group, part=part, method=m, edits=int((n > 0).sum()), tokens=int(n.sum()),
                                    mse=mse, ratio=ratio, ratio_lo=lo, ratio_hi=hi))
    return pd.DataFrame(out)


def write_report(per, summary, out: Path, opts: LossOptions) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    per.to_csv(out / "per_edit.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    others = [m for m in dict.fromkeys(summary.method) if m != opts.reference]
    L = [f"# Denoising loss in the hole: {', '.join(dict.fromkeys(summary.method))}", "",
         f"`python -m eval loss --suite {opts.suite} --methods {','.join(opts.methods)} --reference {opts.reference}"
         f" --timesteps {','.join(map(str, opts.timesteps))}" + (f" --limit {opts.limit}" if opts.limit else "") + "`", "",
         f"Mean squared noise-prediction error per hole token (fixed seeded noise, timesteps "
         f"{', '.join(map(str, opts.timesteps))}), on tokens that cover the prompted object, on the rest of "
         f"the hole (background) and on the background tokens at the hole's edge (next to a token outside the "
         f"hole). *ratio* = method / {opts.reference} on the same tokens; in brackets its 95% interval "
         f"(paired bootstrap over the edits, {BOOTSTRAP_ROUNDS} rounds).", ""]
    methods = list(dict.fromkeys(summary.method))
    overall = summary[summary.by == "all"]
    mse_rows = [{"tokens": PART_LABELS[part], **{m: f"{overall[(overall.part == part) & (overall.method == m)].mse.iloc[0]:.4f}"
                                                 for m in methods}} for part in PARTS]
    L += ["## Mean squared error per token, all edits", "", md_table(mse_rows, ["tokens"] + methods), ""]
    for by in dict.fromkeys(summary.by):
        sub = summary[summary.by == by]
        rows = []
        for group in dict.fromkeys(sub.group):
            g = sub[sub.group == group]
            for m in others:
                row = {by: group, "edits": int(g.edits.max())}
                if len(others) > 1:
                    row["method"] = m
                for part in PARTS:
                    r = g[(g.part == part) & (g.method == m)].iloc[0]
                    row[PART_LABELS[part]] = "–" if not np.isfinite(r.ratio) else (
                        f"{r.ratio:.2f}" + (f" ({r.ratio_lo:.2f}–{r.ratio_hi:.2f})" if np.isfinite(r.ratio_lo) else ""))
                rows.append(row)
        title = "All edits" if by == "all" else f"By {by}"
        L += [f"## {title}: error ratio to {opts.reference}", "", md_table(rows, list(rows[0])), ""]
    plot = _plot(summary, others, out / "loss_ratio.png", opts.reference)
    if plot is not None:
        L += [f"![ratio to {opts.reference} by mask size]({plot.name})", ""]
    return atomic_write_text(out / "report.md", "\n".join(L)) or out / "report.md"


def _plot(summary, others: Sequence[str], path: Path, reference: str) -> Optional[Path]:
    sub = summary[(summary.by == "mask size") & summary.method.isin(others)]
    if sub.empty:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(others), figsize=(6 * len(others), 4.4), squeeze=False)
    for ax, m in zip(axes[0], others):
        s = sub[sub.method == m]
        groups = list(dict.fromkeys(s.group))
        x = np.arange(len(groups))
        for i, part in enumerate(PARTS):
            p = s[s.part == part].set_index("group").loc[groups]
            err = np.vstack([p.ratio - p.ratio_lo, p.ratio_hi - p.ratio]).clip(min=0)
            ax.errorbar(x + (i - 1.5) * 0.1, p.ratio, yerr=np.nan_to_num(err), fmt="o-", capsize=3,
                        label=PART_LABELS[part])
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, groups)
        ax.set_xlabel("mask size")
        ax.set_ylabel(f"error ratio, {m} / {reference}")
        ax.set_title(f"denoising error in the hole: {m} / {reference}")
        # below the axes, not inside: error bars reach every part of the panel, and "best" only avoids points
        ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    return _save(fig, path)


def main(args) -> int:
    opts = LossOptions(suite=args.suite, out=args.out, methods=args.methods, reference=args.reference,
                       timesteps=args.timesteps, limit=args.limit, seed=args.seed, device=args.device)
    if opts.limit is not None and opts.limit < 1:
        raise SuiteError("--limit must be >= 1")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SuiteError(f"--device {opts.device}: no CUDA device on this machine; use --device cpu")
    if any(not 0 <= t < 1000 for t in opts.timesteps):
        raise SuiteError(f"--timesteps must lie in [0, 999], got {','.join(map(str, opts.timesteps))}")
    per = measure(opts)
    summary = summarise(per, opts.reference)
    report = write_report(per, summary, Path(opts.out), opts)
    print(Path(report).read_text())
    print(f"wrote {opts.out}/report.md, summary.csv, per_edit.csv, loss_ratio.png")
    return 0
