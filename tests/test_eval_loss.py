"""`python -m eval loss`: held-out denoising error in the hole, object vs background tokens."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eval.cli import main
from eval.denoising_loss import summarise

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "data" / "suites"


def test_loss_on_the_shipped_models(tmp_path, capsys):
    out = tmp_path / "loss"
    assert main(["loss", "--suite", str(SUITES / "shapes-val.yaml"), "--limit", "10", "--timesteps", "300,600",
                 "--out", str(out)]) == 0
    per = pd.read_csv(out / "per_edit.csv")
    assert len(per) == 10 * 2 * 2 and set(per.method) == {"lazy", "regenerate-image"} and set(per.t) == {300, 600}
    assert np.allclose(per.object + per.background, per.hole, rtol=1e-5, atol=1e-6)
    assert (per.object_tokens <= per.hole_tokens).all() and (per.hole_tokens > 0).all()
    assert (per.edge_tokens <= per.hole_tokens - per.object_tokens).all() and (per.edge <= per.background + 1e-9).all()
    assert (per.edge_tokens > 0).all()  # every hole has an edge
    # both methods are scored on the same tokens of each edit
    tokens = per.pivot_table(index="id", columns="method", values=["hole_tokens", "object_tokens"], aggfunc="first")
    assert (tokens["hole_tokens"]["lazy"] == tokens["hole_tokens"]["regenerate-image"]).all()
    assert (tokens["object_tokens"]["lazy"] == tokens["object_tokens"]["regenerate-image"]).all()
    assert (per[per.intent == "remove"].object_tokens == 0).all() and (per[per.intent == "object"].object_tokens > 0).all()
    # trained denoisers predict the noise: far below the error of predicting zeros (E[eps^2] = 1). A
    # misaligned target (other tokens, other noise) would put them near 2.
    mse = per.groupby("method").hole.sum() / per.groupby("method").hole_tokens.sum()
    assert (mse < 0.3).all(), mse
    summary = pd.read_csv(out / "summary.csv")
    row = summary[(summary.by == "all") & (summary.part == "hole") & (summary.method == "lazy")].iloc[0]
    assert row.ratio == pytest.approx(mse["lazy"] / mse["regenerate-image"])
    assert row.ratio_lo <= row.ratio <= row.ratio_hi
    text = (out / "report.md").read_text()
    assert "## By mask size" in text and "## By mask kind" in text and "## By timestep" in text and (out / "loss_ratio.png").stat().st_size > 0
    assert "| background tokens | background at the edge |" in capsys.readouterr().out


def test_random_weights_do_not_predict_the_noise(tmp_path):
    out = tmp_path / "tiny"
    suite = tmp_path / "tiny.yaml"
    suite.write_text("dataset: shapesworld\nsize: 64\nseeds: {start: 10000000, count: 6}\n")
    assert main(["loss", "--suite", str(suite), "--methods", "tiny-lazy,tiny-regenerate-image",
                 "--reference", "tiny-regenerate-image", "--out", str(out)]) == 0
    per = pd.read_csv(out / "per_edit.csv")
    mse = per.groupby("method").hole.sum() / per.groupby("method").hole_tokens.sum()
    assert (mse > 0.5).all(), mse


def test_summary_ratios_and_intervals():
    rows = []
    for i in range(8):
        for m, scale in (("a", 2.0), ("b", 1.0)):
            rows.append(dict(id=f"e{i}", method=m, t=100, kind="box", intent="object", mask_ratio=0.05 + 0.1 * i,
                             hole_tokens=10, object_tokens=4, edge_tokens=3, object=scale * (1 + i) * 0.4,
                             background=scale * 0.6, edge=scale * 0.3, hole=scale * ((1 + i) * 0.4 + 0.6)))
    s = summarise(pd.DataFrame(rows), reference="b", rounds=200)
    a = s[(s.by == "all") & (s.method == "a")].set_index("part")
    assert a.ratio.tolist() == pytest.approx([2.0] * 4)
    assert a.ratio_lo.tolist() == pytest.approx([2.0] * 4) and a.ratio_hi.tolist() == pytest.approx([2.0] * 4)
    assert a.loc["edge", "mse"] == pytest.approx(2 * 0.3 * 8 / 24)
    assert a.loc["object", "mse"] == pytest.approx(2 * sum(0.4 * (1 + i) for i in range(8)) / 32)
    assert s[s.method == "b"].ratio.isna().all()
    assert set(s[s.by == "mask size"].group) == {"0%–10%", "10%–20%", "20%–35%", "≥ 35%"}
    assert s[(s.by == "timestep") & (s.method == "a")].ratio.tolist() == pytest.approx([2.0] * 4)


@pytest.mark.parametrize("args, message", [
    (["--suite", str(SUITES / "folder_example.yaml")], "needs ShapesWorld ground truth"),
    (["--suite", str(SUITES / "shapes-val.yaml"), "--methods", "lazy,regenerate-crop"], "Leave it out of --methods"),
    (["--suite", str(SUITES / "shapes-val.yaml"), "--methods", "lazy,tiny-lazy"], "is not among --methods"),
    (["--suite", str(SUITES / "shapes-val.yaml"), "--timesteps", "200,1000"], "must lie in [0, 999]"),
    pytest.param(["--suite", str(SUITES / "shapes-val.yaml"), "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")),
])
def test_loss_bad_input(tmp_path, capsys, args, message):
    assert main(["loss", "--out", str(tmp_path / "o")] + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_token_errors_edge_and_object_tokens():
    """A 4x4-token square hole: its 12 outer tokens touch known content, the 4 inner ones do not; an
    object drawn in one corner token of the ground truth marks exactly that token."""
    from types import SimpleNamespace

    from eval.denoising_loss import token_errors
    from lazydiff.testing import tiny_lazy_pipeline

    pipe = tiny_lazy_pipeline(seed=0)
    c = pipe.token_cell
    size = 8 * c
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[2 * c:6 * c, 2 * c:6 * c] = True
    reference = background.copy()
    reference[2 * c + 1:3 * c - 1, 2 * c + 1:3 * c - 1] = 255   # inside the hole's top-left token only
    sample = SimpleNamespace(id="s", image=background, mask=mask, reference=reference, background=background,
                             prompt="a red star")
    with torch.no_grad():
        r = token_errors(pipe, sample, (100, 500), seed=0)
    assert r["error"].shape == (2, 16) and (r["error"] > 0).all()
    grid = np.zeros((4, 4), bool)
    grid[1:3, 1:3] = True                    # the inner four, in row-major hole order
    assert r["edge"].tolist() == (~grid).reshape(-1).tolist()
    assert r["object"].tolist() == [True] + [False] * 15


@pytest.mark.parametrize("others", [["lazy"], ["lazy", "stage3"]])
def test_loss_plot_legend_covers_no_data(tmp_path, monkeypatch, others):
    """The legend sits outside every panel (error bars can reach any part of it) and inside the figure."""
    import eval.denoising_loss as dl

    groups = ["0%–10%", "10%–20%", "20%–35%", "≥ 35%"]
    rows = []
    for m in others + ["regenerate-image"]:
        for gi, g in enumerate(groups):
            for pi, part in enumerate(dl.PARTS):
                r = np.nan if m == "regenerate-image" else 1.0 + 0.25 * ((gi + pi) % 4)
                # wide intervals: the bars span the whole height of the panel, wherever a legend would go
                rows.append(dict(by="mask size", group=g, part=part, method=m, edits=10, tokens=100, mse=0.1,
                                 ratio=r, ratio_lo=r - 0.9, ratio_hi=r + 0.9))
    figs = []
    monkeypatch.setattr(dl, "_save", lambda fig, path: figs.append(fig) or path)
    assert dl._plot(pd.DataFrame(rows), others, tmp_path / "loss_ratio.png", "regenerate-image") is not None
    fig = figs[0]
    fig.tight_layout()   # as _save lays it out
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    fig_box = fig.bbox
    for ax in fig.axes:
        leg, box = ax.get_legend(), ax.get_window_extent(renderer)
        lb = leg.get_window_extent(renderer)
        assert not lb.overlaps(box), (lb, box)          # outside the axes: covers no point or error bar
        assert fig_box.x0 <= lb.x0 and lb.x1 <= fig_box.x1 and fig_box.y0 <= lb.y0 and lb.y1 <= fig_box.y1
        for other in fig.axes:                          # nor a neighbouring panel
            assert not lb.overlaps(other.get_window_extent(renderer))
        assert [t.get_text() for t in leg.get_texts()] == [dl.PART_LABELS[p] for p in dl.PARTS]
    dl._plt().close(fig)
