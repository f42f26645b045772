"""`python -m eval quality` plumbing on tiny random pipelines and a tiny random open_clip model.

Numbers from these models mean nothing; the tests check files, resume, errors and that metrics
come out finite with the right shapes.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from eval.cli import main
from eval.methods import register_method, unregister_method
from eval.metrics import (ClipImageFeatures, MetricWeightsError, ShapesZeroShot, frechet_and_kernel, load_clip_folder,
                          write_tiny_clip)
from eval.quality import QualityOptions, run_quality


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(write_tiny_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("suite") / "tiny.yaml"
    p.write_text("dataset: shapesworld\nsplit: test\nsize: 64\nsteps: 2\nexamples: 2\n"
                 "methods: [tiny-lazy, tiny-regenerate-crop]\n")
    return str(p)


class Counting:
    """Wraps a pipeline and counts edits."""

    calls = 0

    def __init__(self, pipe):
        self.pipe = pipe

    def set_progress_bar_config(self, **kw):
        self.pipe.set_progress_bar_config(**kw)

    @property
    def scheduler(self):  # swappable, as on the pipelines (eval quality --scheduler)
        return self.pipe.scheduler

    @scheduler.setter
    def scheduler(self, value):
        self.pipe.scheduler = value

    def __call__(self, *a, **kw):
        Counting.calls += 1
        return self.pipe(*a, **kw)


@pytest.fixture
def counting_method():
    from lazydiff.testing import tiny_lazy_pipeline

    Counting.calls = 0
    register_method("counting", lambda device, dtype: Counting(tiny_lazy_pipeline()), "counts calls", trained=False)
    yield "counting"
    unregister_method("counting")


def test_open_clip_loader_and_zero_shot(tiny_clip):
    b = load_clip_folder(tiny_clip)
    assert "random" in b.note and b.image_size == 32
    imgs = torch.randint(0, 255, (3, 3, 40, 40), dtype=torch.uint8)
    feats = ClipImageFeatures(b)
    assert feats(imgs).shape == (3, 16) and feats.num_features == 16
    assert len(ShapesZeroShot(b).predict(imgs)) == 3
    t = b.encode_texts(["a red star", "a blue circle"], normalize=True)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    real, fake = feats(imgs).double(), feats(imgs.flip(0)).double() + 0.1
    d = frechet_and_kernel(feats, real, {"a": fake, "b": real[:1]})
    assert math.isfinite(d["a"]["fid"]) and math.isfinite(d["a"]["kid"]) and math.isnan(d["b"]["fid"])


def test_quality_run_resume_and_metrics(tmp_path, tiny_clip, suite_file, counting_method):
    out = tmp_path / "q"
    opts = QualityOptions(suite=suite_file, out=str(out), methods=[counting_method, "tiny-regenerate-crop"], limit=2,
                          shapes_clip=tiny_clip, device="cpu")
    res = run_quality(opts)
    assert Counting.calls == 2 and res.generated == {"counting": 2, "tiny-regenerate-crop": 2}
    # Resume with a larger limit: only the 2 new samples are generated.
    opts.limit = 4
    res = run_quality(opts)
    assert Counting.calls == 4 and res.generated["counting"] == 2 and res.skipped["counting"] == 2
    # Again: nothing to do.
    res = run_quality(opts)
    assert Counting.calls == 4 and res.generated["counting"] == 0

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.method) == ["counting", "tiny-regenerate-crop"]
    for col in ("fid", "kid", "fid_local", "clip_cosine", "clip_score_x100", "latency_ms_mean", "hole_mae_target"):
        assert np.isfinite(summary[col]).all(), col
    assert (summary.unmasked_violating_pixels == 0).all()
    assert (summary.clip_score_x100 >= 0).all() and (summary.clip_cosine.abs() <= 1).all()
    per = pd.read_csv(out / "per_sample.csv")
    assert len(per) == 8 and set(per.sample_id) == {f"sw{10_000_000 + i}" for i in range(4)}
    assert np.allclose(per.clip_score_x100, 100 * np.maximum(per.clip_cosine, 0))
    obj = per[per.prompt_correct.notna()]
    assert len(obj) and set(obj.prompt_correct.unique()) <= {True, False}
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["image"].endswith(".png")
    for f in ("report.md", "plots/metrics.png", "plots/examples.png", "plots/breakdown.png", "breakdown.csv",
              "by_shape.csv", "plots/shape_confusion.png"):
        assert (out / f).exists(), f
    report = (out / "report.md").read_text()
    assert "mean nothing" in report and "Beside the paper" in report and "LazyDiffusion" in report
    assert "## By mask kind and mask size" in report and "## By prompted shape" in report
    by_shape = pd.read_csv(out / "by_shape.csv")
    assert by_shape.n_object_edits.sum() == len(obj)  # every object edit, once per method

    # A killed run loses only the sample in flight: a missing record is regenerated on resume.
    (out / "records" / "counting" / "sw10000001.json").unlink()
    res = run_quality(opts)
    assert res.generated["counting"] == 1 and Counting.calls == 5

    # Other settings in the same folder: refused (records would be mixed).
    opts.steps = 3
    with pytest.raises(ValueError, match="other settings"):
        run_quality(opts)


def test_missing_inception_weights_fail_before_generation(tmp_path, tiny_clip, counting_method, monkeypatch):
    monkeypatch.delenv("LAZYDIFF_INCEPTION_WEIGHTS", raising=False)
    p = tmp_path / "s.yaml"
    p.write_text("dataset: shapesworld\nsize: 64\nsteps: 2\nfid_backbone: inception\n")
    opts = QualityOptions(suite=str(p), out=str(tmp_path / "o"), methods=[counting_method], limit=1,
                          shapes_clip=tiny_clip, device="cpu")
    with pytest.raises(MetricWeightsError, match="--inception-weights"):
        run_quality(opts)
    assert Counting.calls == 0
    opts.inception_weights = str(tmp_path / "nope.pth")
    with pytest.raises(MetricWeightsError, match="not found"):
        run_quality(opts)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    opts.inception_weights = str(tmp_path / "broken.pth")
    with pytest.raises(MetricWeightsError, match="could not load"):
        run_quality(opts)
    assert Counting.calls == 0


def test_missing_shapes_clip_and_cli_errors(tmp_path, suite_file, counting_method, capsys):
    opts = QualityOptions(suite=suite_file, out=str(tmp_path / "o"), methods=[counting_method], limit=1,
                          shapes_clip=str(tmp_path / "no-clip"), device="cpu")
    with pytest.raises(MetricWeightsError, match="ShapesCLIP not found"):
        run_quality(opts)
    assert Counting.calls == 0
    rc = main(["quality", "--suite", suite_file, "--out", str(tmp_path / "o"), "--methods", "tiny-lazzy"])
    assert rc == 2 and "did you mean 'tiny-lazy'" in capsys.readouterr().err
    rc = main(["quality", "--suite", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_bar_charts_draw_reference_lines(tmp_path, monkeypatch):
    """The quality plot draws the ceiling beside the prompt accuracy bars (and skips a NaN reference)."""
    from eval import report

    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig) or path)
    summary = pd.DataFrame({"method": ["lazy", "regenerate-image"], "prompt_acc": [0.27, 0.25], "bg_mae": [18.0, 16.0]})
    report.bar_charts(summary, [("prompt_acc", "prompt accuracy", False), ("bg_mae", "bg MAE", True)],
                      tmp_path / "m.png", references={"prompt_acc": (0.835, "real renders"), "bg_mae": (float("nan"), "x")})
    acc_ax, bg_ax = figs[0].axes[:2]
    assert [tuple(line.get_ydata()) for line in acc_ax.lines] == [(0.835, 0.835)]
    assert acc_ax.get_ylim()[1] >= 0.835 and not bg_ax.lines
    # each value is printed beyond its bar's end, inside the frame: above a positive bar, below a negative one
    summary["kid"] = [-1.4, 2.0]
    report.bar_charts(summary, [("kid", "KID", True)], tmp_path / "k.png")
    ax = figs[1].axes[0]
    assert [t.get_va() for t in ax.texts] == ["top", "bottom"]
    lo, hi = ax.get_ylim()
    assert lo < -1.4 * 1.05 and hi > 2.0 * 1.05


def test_scheduler_override_is_used_recorded_and_guarded(tmp_path, tiny_clip, suite_file):
    from lazydiff.testing import tiny_lazy_pipeline

    seen = []

    class Recording(Counting):
        def __call__(self, *a, **kw):
            seen.append(type(self.pipe.scheduler).__name__)
            return self.pipe(*a, **kw)

    register_method("recording", lambda device, dtype: Recording(tiny_lazy_pipeline()), "records the sampler",
                    trained=False)
    try:
        out = tmp_path / "q"
        opts = QualityOptions(suite=suite_file, out=str(out), methods=["recording"], limit=1, shapes_clip=tiny_clip,
                              device="cpu", scheduler="dpm-solver++", no_report=True)
        run_quality(opts)
        assert seen == ["DPMSolverMultistepScheduler"]
        settings = json.loads((out / "records" / "recording" / "_settings.json").read_text())
        assert settings["scheduler"] == "dpm-solver++"
        assert json.loads((out / "run.json").read_text())["scheduler"] == "dpm-solver++"
        opts.scheduler = None  # the method's own DDIM would mix samplers in one folder
        with pytest.raises(ValueError, match="other settings"):
            run_quality(opts)
        # Without --scheduler the settings carry no key, so folders made before it existed still resume.
        opts2 = QualityOptions(suite=suite_file, out=str(tmp_path / "own"), methods=["recording"], limit=1,
                               shapes_clip=tiny_clip, device="cpu", no_report=True)
        run_quality(opts2)
        assert seen[-1] == "DDIMScheduler"
        assert "scheduler" not in json.loads((tmp_path / "own" / "records" / "recording" / "_settings.json").read_text())
    finally:
        unregister_method("recording")


def test_scheduler_in_suite_and_cli(tmp_path, capsys):
    from eval.suites import SuiteError, load_suite

    p = tmp_path / "s.yaml"
    p.write_text("dataset: shapesworld\nsize: 64\nscheduler: unipc\n")
    assert load_suite(str(p)).scheduler == "unipc"
    p.write_text("dataset: shapesworld\nsize: 64\nscheduler: dpm\n")
    with pytest.raises(SuiteError, match="dpm-solver\\+\\+"):
        load_suite(str(p))
    with pytest.raises(SystemExit):
        main(["quality", "--suite", str(p), "--out", str(tmp_path / "o"), "--scheduler", "dpm"])
    assert "invalid choice" in capsys.readouterr().err


def test_set_pipeline_option_is_applied_recorded_compared_and_checked(tmp_path, tiny_clip, suite_file, capsys):
    from eval.compare import compare
    from eval.quality import parse_pipeline_set

    assert parse_pipeline_set(["reset_outside_hole=false", "decode_margin=8"]) == {"reset_outside_hole": False,
                                                                                  "decode_margin": 8}
    runs = []
    for opt in ({}, {"reset_outside_hole": False}):
        out = tmp_path / ("default" if not opt else "no-reset")
        run_quality(QualityOptions(suite=suite_file, out=str(out), methods=["tiny-regenerate-image", "tiny-lazy"],
                                   limit=2, shapes_clip=tiny_clip, device="cpu", no_report=True, pipeline_set=opt))
        runs.append(out)
    settings = json.loads((runs[1] / "records" / "tiny-regenerate-image" / "_settings.json").read_text())
    assert settings["pipeline_set"] == {"reset_outside_hole": False}
    assert "pipeline_set" not in json.loads((runs[0] / "records" / "tiny-lazy" / "_settings.json").read_text())
    per = [pd.read_csv(r / "per_sample.csv").set_index(["method", "sample_id"]) for r in runs]
    # the option changes the baseline's images; LazyDiffusion has no such option and gives the same ones
    assert not np.allclose(per[0].loc["tiny-regenerate-image", "hole_mae_target"],
                           per[1].loc["tiny-regenerate-image", "hole_mae_target"])
    assert np.allclose(per[0].loc["tiny-lazy", "hole_mae_target"], per[1].loc["tiny-lazy", "hole_mae_target"])
    _, df = compare([str(r) for r in runs], str(tmp_path / "cmp"))
    assert list(dict.fromkeys(df.run)) == ["reset_outside_hole=True", "reset_outside_hole=False"]
    for bad, msg in ((["reset_outside_hol=false"], "did you mean 'reset_outside_hole'"),
                     (["reset_outside_hole=3"], "expected a bool"), (["=1"], "ATTRIBUTE=VALUE")):
        code = main(["quality", "--suite", suite_file, "--out", str(tmp_path / "bad"), "--shapes-clip", tiny_clip,
                     "--device", "cpu", "--methods", "tiny-regenerate-image", *sum((["--set", b] for b in bad), [])])
        assert code == 2 and msg in capsys.readouterr().err
        assert not (tmp_path / "bad" / "records").exists()  # refused before anything ran


def test_compare_runs_pairs_edits_and_refuses_different_ones(tmp_path, tiny_clip, suite_file, capsys):
    from eval.compare import CompareError, compare

    runs = []
    for steps in (2, 3):
        out = tmp_path / f"s{steps}"
        run_quality(QualityOptions(suite=suite_file, out=str(out), methods=["tiny-lazy"], limit=3, steps=steps,
                                   shapes_clip=tiny_clip, device="cpu", no_report=True))
        runs.append(str(out))
    md, df = compare(runs, str(tmp_path / "cmp"))
    assert list(df.run) == ["2 steps", "3 steps"] and (tmp_path / "cmp" / "compare.png").exists()
    # the paired difference is the mean of the per-edit differences
    a, b = (pd.read_csv(f"{r}/per_sample.csv").set_index("sample_id").hole_mae_target for r in runs)
    assert df.hole_mae_target_delta.iloc[1] == pytest.approx((b - a.loc[b.index]).mean())
    assert "Difference from the first run" in md and "3 steps" in (tmp_path / "cmp" / "compare.md").read_text()
    assert md.count("FID and local FID are computed on too few samples") == 1  # the runs' warning, once

    other = tmp_path / "limit2"   # other edits: no paired comparison
    run_quality(QualityOptions(suite=suite_file, out=str(other), methods=["tiny-lazy"], limit=2, steps=2,
                               shapes_clip=tiny_clip, device="cpu", no_report=True))
    with pytest.raises(CompareError, match=r"differ in --limit \(2 vs 3\): they hold different edits"):
        compare([runs[0], str(other)], str(tmp_path / "cmp2"))
    rc = main(["compare", runs[0], str(tmp_path / "nothing"), "--out", str(tmp_path / "cmp3")])
    assert rc == 2 and "not a finished quality run" in capsys.readouterr().err
    (other / "per_sample.csv").write_text("")            # a truncated file: a clear error, not a traceback
    rc = main(["compare", runs[0], str(other), "--out", str(tmp_path / "cmp4")])
    assert rc == 2 and "unreadable" in capsys.readouterr().err and not (tmp_path / "cmp4").exists()


def test_breakdown_by_mask_kind_and_size():
    from eval.breakdown import breakdown

    per = pd.DataFrame({
        "method": ["a"] * 6 + ["b"] * 6,
        "mask_ratio": [0.05, 0.05, 0.15, 0.5, 0.05, 0.15] * 2,
        "kind": ["box", "box", "object", "brush", "box", "object"] * 2,
        "prompt_correct": [True, False, True, None, None, False] + [True, True, None, None, None, False],
        "shape_correct": [True, False, True, None, None, False] + [True, True, None, None, None, False],
        "bg_mae": [None, None, None, 9.0, 3.0, None] + [None, None, 4.0, 8.0, 2.0, None],
    })
    df = breakdown(per).set_index(["by", "group", "method"])
    assert df.loc[("mask kind", "box", "a"), "prompt_acc"] == 0.5 and df.loc[("mask kind", "box", "a"), "bg_mae"] == 3.0
    assert df.loc[("mask kind", "object", "b"), "prompt_acc"] == 0.0 and df.loc[("mask kind", "object", "b"), "bg_mae"] == 4.0
    assert df.loc[("mask size", "0%–10%", "b"), "n_object_edits"] == 2
    assert df.loc[("mask size", "0%–10%", "b"), "bg_mae"] == 2.0
    assert df.loc[("mask size", "≥ 35%", "a"), "bg_mae"] == 9.0
    assert math.isnan(df.loc[("mask size", "≥ 35%", "a"), "prompt_acc"])
    assert list(dict.fromkeys(df.reset_index().query("by == 'mask kind'").group)) == ["object", "box", "brush"]
    assert breakdown(per.drop(columns=["kind"])) is None   # folder suites have no mask kinds
    assert df.prompt_acc_ceiling.isna().all()              # no ground-truth scores in this table
    per["gt_prompt_correct"] = [True, True, False, None, None, True] * 2
    df = breakdown(per).set_index(["by", "group", "method"])
    assert df.loc[("mask kind", "box", "a"), "prompt_acc_ceiling"] == 1.0   # over the group's object edits
    assert df.loc[("mask size", "10%–20%", "b"), "prompt_acc_ceiling"] == 1.0   # b's object edit there: the 6th
    assert df.loc[("mask size", "10%–20%", "a"), "prompt_acc_ceiling"] == 0.5
    from eval.breakdown import markdown
    assert "| box | 2 | 100.0% | 50.0% | 100.0% |" in "\n".join(markdown(df.reset_index()))
    # accuracy intervals are Wilson's: inside 0-100%, and not zero-wide at 0% or 100% (b's 2 of 2 box edits)
    lo, hi = df.loc[("mask kind", "box", "b"), ["prompt_acc_lo", "prompt_acc_hi"]]
    assert 0.3 < lo < 1 and hi == pytest.approx(1.0)
    lo, hi = df.loc[("mask size", "10%–20%", "a"), ["prompt_acc_lo", "prompt_acc_hi"]]   # 1 of 2
    assert 0 < lo < 0.5 < hi < 1
    assert (df.prompt_acc_lo.dropna() >= 0).all() and (df.prompt_acc_hi.dropna() <= 1).all()


def test_grouped_bars_draw_no_error_bar_where_there_is_no_interval():
    from eval.report import _plt, grouped_bars

    plt = _plt()
    fig, ax = plt.subplots()
    grouped_bars(ax, ["first run", "second run"], {"lazy": ([0.5, 0.6], [float("nan"), 0.1]),
                                                   "other": ([0.5, 0.6], np.array([[0.1, 0.2], [0.05, 0.0]]))}, "t")
    segments = [c.errorbar.lines[2][0].get_segments() for c in ax.containers if hasattr(c, "errorbar")]
    assert [len(s) for s in segments[0]] == [0, 2]   # the reference run (NaN) has none, not a zero-wide one
    assert segments[1][0][:, 1].tolist() == pytest.approx([0.4, 0.55])   # asymmetric: (lower, upper) lengths
    plt.close(fig)


def test_by_shape_and_its_confusion_plot(tmp_path, monkeypatch):
    from eval.breakdown import by_shape, confusion_plot, shape_markdown

    per = pd.DataFrame({
        "method": ["a"] * 5 + ["b"] * 5,
        "target_shape": ["star", "star", "heart", "heart", None] * 2,
        "pred_shape": ["star", "circle", "circle", "heart", None] + ["star", "star", "heart", "heart", None],
        "shape_correct": [True, False, False, True, None] + [True, True, True, True, None],
        "prompt_correct": [True, False, False, False, None] + [True, True, True, False, None],
        "gt_prompt_correct": [True, True, True, False, None] * 2,
    })
    df = by_shape(per).set_index(["shape", "method"])
    assert list(df.index.get_level_values(0).unique()) == ["heart", "star"]  # remove edits (no shape) left out
    assert df.loc[("star", "a"), "shape_acc"] == 0.5 and df.loc[("star", "b"), "shape_acc"] == 1.0
    assert df.loc[("heart", "a"), "prompt_acc"] == 0.0 and df.loc[("heart", "b"), "prompt_acc"] == 0.5
    assert df.loc[("heart", "a"), "prompt_acc_ceiling"] == 0.5 and df.loc[("star", "b"), "n_object_edits"] == 2
    assert "| star | 2 | 100.0% | 50.0% | 100.0% | 50.0% | 100.0% |" in shape_markdown(df.reset_index())
    assert by_shape(per.drop(columns=["pred_shape"])) is None  # folder suites
    obj = per[per.target_shape.notna()]
    path = confusion_plot({m: (g.target_shape, g.pred_shape) for m, g in obj.groupby("method")}, tmp_path / "c.png")
    assert path.exists() and path.stat().st_size > 1000
    figs = []
    monkeypatch.setattr("eval.breakdown._save", lambda fig, p: figs.append(fig) or p)
    confusion_plot({m: (g.target_shape, g.pred_shape) for m, g in obj.groupby("method")}, tmp_path / "c.png")
    shown = [[t.get_text() for t in ax.get_xticklabels()] for ax in figs[0].axes]
    assert shown == [["circle", "heart", "star"]] * 2   # b never saw a circle: the same columns as a, side by side


def test_metrics_only_without_records_says_to_generate(tmp_path, tiny_clip, suite_file, capsys):
    rc = main(["quality", "--suite", suite_file, "--out", str(tmp_path / "o"), "--methods", "tiny-lazy", "--limit", "1",
               "--metrics-only", "--shapes-clip", tiny_clip, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "no record" in err and "without --metrics-only" in err and "Traceback" not in err


def test_fid_on_fewer_samples_than_feature_dimensions_is_flagged(tmp_path, tiny_clip, suite_file, capsys):
    """The tiny ShapesCLIP has 16-d features: FID's covariances need 17 samples per set. A 3-edit run says
    so in report.md, on the console and in run.json."""
    out = tmp_path / "o"
    assert main(["quality", "--suite", suite_file, "--out", str(out), "--methods", "tiny-lazy", "--limit", "3",
                 "--shapes-clip", tiny_clip, "--device", "cpu"]) == 0
    console = " ".join(capsys.readouterr().out.split())
    report = " ".join((out / "report.md").read_text().split())
    for text in (console, report):
        assert "FID and local FID are computed on too few samples to mean much: 3 edits per method and as many " \
               "reference images, with 16-d features" in text
        assert "at least 17 samples per set" in text and "read FID from runs of 17 edits or more" in text
    assert "WARNING: FID and local FID" in console and "**Warning: FID and local FID" in report
    assert "`kid_std` in summary.csv is ~0" in report
    info = json.loads((out / "run.json").read_text())
    assert info["extras"]["fid_feature_dim"] == 16 and len(info["extras"]["warnings"]) == 1
    summary = pd.read_csv(out / "summary.csv")   # still computed and reported, with the warning beside it
    assert np.isfinite(summary.fid).all() and summary.n.tolist() == [3]


def test_sample_size_warnings():
    from eval.quality import sample_size_warnings

    def summary(*n):
        return pd.DataFrame({"method": [f"m{i}" for i in range(len(n))], "n": list(n)})

    assert sample_size_warnings(summary(500, 500), 500, 128, "ShapesCLIP image embedding") == []
    assert sample_size_warnings(summary(129), 129, 128) == []          # N = F + 1: full rank
    (w,) = sample_size_warnings(summary(128, 128), 128, 128, "ShapesCLIP image embedding")
    assert "128 edits per method and as many reference images, with 128-d features (ShapesCLIP image " \
           "embedding)" in w and "at least 129 samples per set" in w
    (w,) = sample_size_warnings(summary(20, 20), 500, 128)             # --limit 20: the fake sets are short
    assert "20 edits per method and 500 reference images" in w and "with 20, FID depends on N" in w
    (w,) = sample_size_warnings(summary(500), 500, 2048, "Inception-v3")  # a folder suite scored with Inception
    assert "at least 2049 samples per set" in w
    assert sample_size_warnings(summary(3), 3, None) == []            # no FID backbone: nothing to say
