"""`python -m eval runtime` on the tiny pipelines, and the FLOP counter."""
import numpy as np
import pandas as pd
import pytest
import torch

from eval.cli import main
from eval.flops import context_encoder_flops, count_with_torch, decoder_flops
from eval.runtime import RuntimeError_, RuntimeOptions, centred_mask, token_count, token_grid, validate

REQUIRED = ["method", "mask_ratio", "hole_tokens", "total_tokens", "steps", "total_ms", "denoise_ms_per_step",
            "speedup_vs_full", "flops", "total_ms_q1", "total_ms_q3", "total_ms_iqr", "denoise_ms_per_step_iqr",
            "stage_text_ms", "stage_vae_encode_ms", "stage_context_encoder_ms", "stage_denoise_ms",
            "stage_vae_decode_ms", "stage_blend_ms", "flops_denoise_per_step", "flops_ratio_vs_full",
            "speedup_vs_full_paired"]


def test_runtime_tiny_writes_csv_plots_and_report(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["runtime", "--preset", "tiny", "--mask-ratios", "0.05,0.5", "--steps", "2", "--repeats", "2",
               "--warmup", "0", "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out / "runtime.csv")
    assert set(REQUIRED) <= set(df.columns)
    assert len(df) == 6 and set(df.method) == {"lazy", "regenerate-image", "regenerate-crop"}
    assert (df.steps == 2).all() and (df.total_ms > 0).all() and (df.flops > 0).all()
    full = df[df.method == "regenerate-image"]
    assert np.allclose(full.speedup_vs_full, 1.0) and (full.hole_tokens < full.total_tokens).all()
    lazy = df[df.method == "lazy"].sort_values("mask_ratio")
    assert lazy.hole_tokens.is_monotonic_increasing and (lazy.flops_context_encoder > 0).all()
    assert (full.flops_context_encoder == 0).all()
    runs = pd.read_csv(out / "runtime_runs.csv")
    assert len(runs) == 12 and list(runs.method[:3]) == ["lazy", "regenerate-image", "regenerate-crop"]  # interleaved
    for f in ("latency_vs_mask_ratio.png", "speedup_vs_mask_ratio.png", "per_step_vs_hole_tokens.png",
              "stage_breakdown.png", "report.md", "fit.json", "config.json"):
        assert (out / f).exists(), f
    printed = capsys.readouterr().out
    assert "speedup_vs_full" in printed and "regenerate-crop" in printed


def test_runtime_of_the_lazy_method_alone(tmp_path, capsys):
    """Without the baseline in the run there is no speed-up to plot; the rest is written."""
    out = tmp_path / "r"
    assert main(["runtime", "--preset", "tiny", "--methods", "lazy", "--mask-ratios", "0.1,0.25", "--steps", "2",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    assert (out / "latency_vs_mask_ratio.png").exists() and (out / "report.md").exists()
    assert not (out / "speedup_vs_mask_ratio.png").exists()
    # a per-step fit through 2 points is exact: the report says its R² means nothing
    assert "(2 points)" in (out / "report.md").read_text() and "say nothing here" in (out / "report.md").read_text()

    # --replot redraws the plots from the run's files, timing nothing
    (out / "latency_vs_mask_ratio.png").unlink()
    report = (out / "report.md").read_text()
    assert main(["runtime", "--replot", str(out)]) == 0
    assert (out / "latency_vs_mask_ratio.png").exists() and (out / "report.md").read_text() == report
    assert main(["runtime", "--replot", str(tmp_path)]) == 2   # not a run's folder: a clear error
    assert "not a finished mask sweep" in capsys.readouterr().err
    assert main(["runtime", "--replot", str(out), "--steps", "3"]) == 2   # it takes no options
    # a table with the console's columns only (a GPU run whose CSVs did not come back): no error bars, no stages
    import pandas as pd

    console = tmp_path / "console"
    console.mkdir()
    table = pd.read_csv(out / "runtime.csv")
    table[["method", "mask_ratio", "hole_tokens", "total_tokens", "total_ms", "denoise_ms_per_step"]].to_csv(
        console / "runtime.csv", index=False)
    assert main(["runtime", "--replot", str(console)]) == 0
    assert sorted(p.name for p in console.glob("*.png")) == ["latency_vs_mask_ratio.png", "per_step_vs_hole_tokens.png"]


def test_runtime_validation():
    with pytest.raises(RuntimeError_, match="did you mean 'paper-shape'"):
        validate(RuntimeOptions(out="x", preset="paper-shap"))
    with pytest.raises(RuntimeError_, match="did you mean 'lazy'"):
        validate(RuntimeOptions(out="x", methods=["lazzy"]))
    with pytest.raises(RuntimeError_, match="mask ratios"):
        validate(RuntimeOptions(out="x", mask_ratios=[0.0]))
    with pytest.raises(RuntimeError_, match="--cuda-graphs needs a CUDA device"):
        validate(RuntimeOptions(out="x", device="cpu", cuda_graphs=True))


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.37, 0.8, 1.0])
def test_centred_mask_area(ratio):
    m = centred_mask(128, ratio)
    assert abs(m.mean() - ratio) < 0.01
    ys, xs = np.nonzero(m)
    assert abs((ys.min() + ys.max()) / 2 - 63.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 63.5) <= 1
    assert token_count(m, 16) >= m.sum() / 256


def _tiny_models(heads=2, head_dim=8, caption=32, layers=2):
    from lazydiff.models import ContextEncoder, FullCanvasDecoder, LazyDecoder

    common = dict(in_channels=4, patch_size=2, num_layers=layers, num_attention_heads=heads,
                  attention_head_dim=head_dim, caption_channels=caption, sample_size=16)
    enc = ContextEncoder(latent_channels=4, patch_size=2, num_layers=layers, num_attention_heads=heads,
                         attention_head_dim=head_dim, context_dim=24, sample_size=16)
    return LazyDecoder(context_dim=24, **common).eval(), FullCanvasDecoder(**common).eval(), enc.eval()


def test_analytic_flops_match_torch_counter():
    lazy, full, enc = _tiny_models()
    b, text_len, k = 2, 7, 37
    t = torch.tensor([500] * b)
    text, tmask = torch.randn(b, text_len, 32), torch.ones(b, text_len)
    idx = torch.arange(k)[None].repeat(b, 1)
    got = count_with_torch(lambda: lazy(torch.randn(b, k, 16), torch.randn(b, k, 24), idx, (16, 16), t, text, tmask))
    assert got == pytest.approx(decoder_flops(lazy, k, text_len, b), rel=1e-6)
    got = count_with_torch(lambda: full(torch.randn(b, 4, 32, 32), torch.randn(b, 4, 32, 32), torch.randn(b, 1, 32, 32),
                                        t, text, tmask))
    assert got == pytest.approx(decoder_flops(full, 256, text_len, b), rel=1e-6)
    got = count_with_torch(lambda: enc(torch.randn(1, 4, 32, 32), torch.randn(1, 1, 32, 32)))
    assert got == pytest.approx(context_encoder_flops(enc, 256), rel=1e-6)


def test_flop_ratio_tracks_token_ratio():
    # Paper-shape proportions (width 384, 4,096 tokens, 120 text tokens, 4096-d captions).
    cfg = dict(in_channels=4, out_channels=4, patch_size=2, num_layers=12, num_attention_heads=6,
               attention_head_dim=64, caption_channels=4096, use_additional_conditions=True)
    lazy_cfg = dict(cfg, context_dim=384)
    n = 4096
    for ratio in (0.01, 0.1, 0.25):
        k = int(n * ratio)
        lazy, full = decoder_flops(lazy_cfg, k, 120, 2), decoder_flops(cfg, n, 120, 2)
        assert lazy < full
        # Linear layers scale with the tokens, attention with their square: the FLOP ratio lies
        # between the token ratio and its square, and near the token ratio for linear-dominated widths.
        assert 0.8 * n / k <= full / lazy <= (n / k) ** 2
    # Beyond a per-step fixed cost (caption projection, text keys/values), cost grows ~linearly with |H|.
    fixed = decoder_flops(lazy_cfg, 0, 120, 2)
    assert fixed > 0
    assert (decoder_flops(lazy_cfg, 410, 120, 2) - fixed) / (decoder_flops(lazy_cfg, 41, 120, 2) - fixed) \
        == pytest.approx(10, rel=0.15)


@pytest.mark.parametrize("kind", ["lazy", "regenerate-image"])
def test_flop_recorder_counts_cuda_graph_replays(kind, make_canvas, make_mask):
    """A step replayed from a CUDA graph runs no decoder Python; the pipeline's graph_replay_hook tells
    the recorder, which counts the decoder call made while that graph was recorded, also when the
    graph was recorded in an earlier edit (a follow-up replays every step), so FLOPs are not
    undercounted. (A stand-in CUDA runtime on this CPU: its replays re-run ATen ops, no decoder code.)"""
    from eval.flops import CallRecorder
    from lazydiff.testing import FakeCUDA, tiny_lazy_pipeline, tiny_regenerate_pipeline, use_fake_cuda_graphs

    pipe = (tiny_lazy_pipeline if kind == "lazy" else tiny_regenerate_pipeline)(seed=0)
    rec = CallRecorder(pipe)
    img, mask = make_canvas(64, 64), make_mask(64, 64, (20, 16, 44, 40))

    def edit(steps):
        rec.start()
        pipe("a red star", img, mask, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        return rec.flops(rec.stop())

    eager = edit(3)
    fake = FakeCUDA()
    use_fake_cuda_graphs(pipe, fake)
    recorded = edit(3)     # eager step, recording step, one replay
    followup = edit(5)     # five replays of the graph recorded above
    assert fake.replays == 2 + 5   # the recording step replays too
    for counted in (recorded, followup):
        assert counted["denoise_per_step"] == pytest.approx(eager["denoise_per_step"])
    assert recorded["denoise"] == pytest.approx(eager["denoise"])
    assert followup["denoise"] == pytest.approx(eager["denoise"] * 5 / 3)
    rec.enabled = False
    pipe("a red star", img, mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert rec.flops(rec.calls)["denoise"] == pytest.approx(followup["denoise"])  # outside a recording: nothing counted


@pytest.mark.parametrize("kind", ["lazy", "regenerate-image"])
def test_decode_crop_box_is_what_the_pipelines_decode(kind, make_canvas, make_mask):
    """The FLOP ceiling counts the crop decode from decode_crop_box; both pipelines decode exactly it."""
    from eval.flops import CallRecorder
    from lazydiff.pipelines.editing import decode_crop_box
    from lazydiff.testing import tiny_lazy_pipeline, tiny_regenerate_pipeline

    pipe = (tiny_lazy_pipeline if kind == "lazy" else tiny_regenerate_pipeline)(seed=0)
    rec = CallRecorder(pipe)
    rec.start()
    box = (20, 16, 44, 40)  # x0, y0, x1, y1 in pixels
    pipe("a red star", make_canvas(96, 96), make_mask(96, 96, box), num_inference_steps=1,
         generator=torch.Generator().manual_seed(0))
    decoded = [c[1] for c in rec.stop() if c[0] == "vae_decode"]
    m = np.zeros((96, 96), bool)
    m[16:40, 20:44] = True
    token_mask = token_grid(m, pipe.token_cell)
    y0, y1, x0, x1 = decode_crop_box(token_mask, pipe.patch_size, pipe.decode_margin)
    assert decoded == [(1, decoded[0][1], y1 - y0, x1 - x0)]
    assert (y1 - y0) < 96 // pipe.vae_scale_factor  # a crop, not the whole canvas


def test_flop_ceiling_grows_with_the_transformer(tmp_path):
    """Counted on meta-device models: the paper-shape preset's own FLOPs, and a larger transformer
    (fixed SD-VAE) gives a higher end-to-end ratio; a follow-up edit (no encode) beats a first edit."""
    from eval.runtime import run_flop_ceiling

    rows = run_flop_ceiling(str(tmp_path), ratios=(0.1,), models=((12, 384), (28, 1152)))
    small, paper = rows
    assert small["hole_tokens"] == token_count(centred_mask(1024, 0.1), 16) == 484 and small["total_tokens"] == 4096
    cfg = dict(in_channels=4, patch_size=2, num_layers=12, num_attention_heads=6, attention_head_dim=64,
               caption_channels=4096, use_additional_conditions=True)
    assert small["full_steps"] == pytest.approx(20 * decoder_flops(cfg, 4096, 120, 2, text_prepared=True), rel=1e-3)
    assert small["vae_encode"] == paper["vae_encode"] > small["vae_decode"] > 0
    for r in rows:
        # a new mask on an encoded canvas re-encodes crops (about a third of the canvas at 10%) and
        # runs the context encoder again: between a first edit and a same-mask follow-up
        assert 0.2 * r["vae_encode"] < r["vae_encode_new_mask"] < 0.5 * r["vae_encode"]
        assert r["first_edit_ratio"] < r["new_mask_ratio"] < r["followup_ratio"] < r["step_ratio"]
    assert paper["followup_ratio"] > small["followup_ratio"] and paper["first_edit_ratio"] > small["first_edit_ratio"]
    assert (tmp_path / "flop_ceiling.md").exists() and (tmp_path / "flop_ceiling.png").exists()


def test_runtime_command_runs_the_other_measurements_without_out(tmp_path, monkeypatch, capsys):
    import eval.runtime as rt
    from eval.cli import main

    calls = []
    monkeypatch.setattr(rt, "run_flop_ceiling", lambda out, size, steps: calls.append((out, size, steps)))
    assert main(["runtime", "--flop-ceiling", str(tmp_path), "--size", "512"]) == 0
    assert rt.main(["--flop-ceiling", str(tmp_path)]) == 0          # python -m eval.runtime: the same command
    assert calls == [(str(tmp_path), 512, 20), (str(tmp_path), 1024, 20)]
    with pytest.raises(SystemExit):
        main(["runtime", "--help"])
    assert "--flop-ceiling OUT" in capsys.readouterr().out
    with pytest.raises(SystemExit):   # the mask sweep still needs --out
        main(["runtime", "--preset", "tiny"])


def _runtime_rows(ratios, methods=("lazy", "followup/lazy", "regenerate-image", "followup/regenerate-image")):
    rows = []
    for i, m in enumerate(methods):
        full = "regenerate-image" in m
        for r in ratios:
            t = (3e5 if full else 1e5 * (1 + r)) / (1 + i % 2)
            step = 1e4 if full else 4e3 * r
            rows.append(dict(method=m, mask_ratio=r, total_ms=t, total_ms_q1=0.95 * t, total_ms_q3=1.05 * t,
                             denoise_ms_per_step=step, denoise_ms_per_step_q1=0.9 * step,
                             denoise_ms_per_step_q3=1.1 * step, speedup_vs_full=3e5 / t,
                             denoise_speedup_vs_full=1e4 / step, flops_ratio_vs_full=2.5e5 / t,
                             hole_tokens=int(4096 * r), total_tokens=4096, stage_denoise_ms=0.8 * t,
                             stage_vae_decode_ms=0.2 * t))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("ratios", [[0.1], [0.1, 0.25], [0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]])
def test_runtime_log_axes_label_plain_numbers(tmp_path, monkeypatch, ratios):
    """Every log axis of the runtime report labels its ticks 0.1, 0.2, 1, 10, 100,000: never "2×10⁻¹"
    or "10⁵" (matplotlib's log labels, which it also puts on minor ticks when a range is short)."""
    import eval.report as rep

    figs = []
    monkeypatch.setattr(rep, "_save", lambda fig, path: figs.append(fig) or path)
    rep.runtime_plots(_runtime_rows(ratios), tmp_path)
    log_axes = [(ax, name, axis) for fig in figs for ax in fig.axes
                for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)) if axis.get_scale() == "log"]
    assert len(log_axes) == 6   # latency: 2 panels x 2 axes; speed-up: 2 axes
    for fig in figs:
        fig.canvas.draw()
    for ax, name, axis in log_axes:
        lo, hi = sorted(axis.get_view_interval())
        shown = [(t.get_position()[0 if name == "x" else 1], t.get_text())
                 for t in axis.get_ticklabels(which="both") if t.get_text() and t.get_visible()]
        shown = [(v, s) for v, s in shown if lo <= v <= hi]
        assert len(shown) >= 2, (ax.get_title(), name, shown)
        for v, s in shown:
            assert float(s.replace(",", "")) == pytest.approx(v, rel=1e-6), (ax.get_title(), name, s)
        if name == "x":
            assert "0.1" in [s for _, s in shown]
    rep._plt().close("all")


def test_plain_number_tick_labels():
    from eval.report import plain_number

    assert [plain_number(v) for v in (0.01, 0.2, 0.30000000000000004, 1.0, 5, 20.0, 1000, 300000.0, 1e-5)] == \
        ["0.01", "0.2", "0.3", "1", "5", "20", "1000", "300,000", "0.00001"]


def test_runtime_help_lists_every_measurements_options_with_defaults(capsys):
    from eval.cli import RUNTIME_MODES

    with pytest.raises(SystemExit):
        main(["runtime", "--help"])
    text = " ".join(capsys.readouterr().out.split())   # unwrapped
    assert "--vae-backends OUT the paper-shape VAE in PyTorch vs ONNX Runtime, interleaved; takes --repeats=3 " \
           "--encode-size=512 --crop-latent=52 --threads=N" in text
    assert "--encode-size N with --vae-backends: side of the encoded canvas, pixels (default 512)" in text
    assert "--crop-latent N with --vae-backends" in text and "(default 52)" in text
    assert "--step-sweep OUT" in text and "--width=384 --depth=12 --size=1024 --onnx-runtime --threads=N" in text
    assert "--size=1024 --steps=20 --threads=N" in text and "--levers-repeats=5 --levers-backends" in text
    for mode, (_, options) in RUNTIME_MODES.items():
        assert f"--{mode} OUT" in text
        for name in options:
            assert f"--{name}" in text, name


@pytest.mark.parametrize("args, message", [
    (["--vae-backends", "V", "--encode-siz", "64"], "unknown option --encode-siz for --vae-backends; did you mean "
                                                   "--encode-size?"),
    (["--vae-backends", "V", "--crop_latent=4"], "did you mean --crop-latent?"),
    (["--vae-backends", "V", "--repets", "1"], "did you mean --repeats?"),
    (["--vae-backends", "V", "--steps", "3"], "--steps is not an option of --vae-backends; --vae-backends takes "
                                              "--repeats=3 --encode-size=512 --crop-latent=52 --threads=N"),
    (["--vae-backends", "V", "--out", "x"], "--out is not an option of --vae-backends"),
    (["--levers", "L", "--levers-repeat", "3"], "did you mean --levers-repeats?"),
    (["--levers", "L", "--threads", "2"], "--threads is not an option of --levers"),
    (["--levers", "L", "--encode-size", "2"], "--encode-size is not an option of --levers"),
    (["--step-sweep", "S", "--widht", "256"], "did you mean --width?"),
    (["--step-sweep", "S", "--onnx-runtime", "all"], "unexpected argument 'all'"),
    (["--flop-ceiling", "F", "--sise", "512"], "did you mean --size?"),
    (["--flop-ceiling", "F", "--vae-backends", "V"], "--flop-ceiling and --vae-backends are separate measurements"),
])
def test_runtime_measurements_refuse_options_they_do_not_take(monkeypatch, capsys, args, message):
    import eval.runtime as rt

    for name in ("run_flop_ceiling", "run_vae_backends", "run_levers", "run_step_sweep"):
        monkeypatch.setattr(rt, name, lambda *a, **k: pytest.fail("ran despite a bad option"))
    assert main(["runtime"] + args) == 2
    assert message in capsys.readouterr().err
    assert rt.main(args) == 2   # python -m eval.runtime: the same


def test_runtime_measurements_take_their_own_options(monkeypatch, capsys):
    import eval.runtime as rt

    seen = []
    monkeypatch.setattr(rt, "run_vae_backends", lambda out, **kw: seen.append(("vae", out, kw)))
    monkeypatch.setattr(rt, "run_levers", lambda out, repeats, backends_only: seen.append(("levers", out, repeats,
                                                                                           backends_only)))
    monkeypatch.setattr(rt, "run_flop_ceiling", lambda out, size, steps: seen.append(("flops", out, size, steps)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(("threads", n)))
    assert main(["runtime", "--vae-backends", "V"]) == 0
    assert main(["runtime", "--repeats=2", "--vae-backends=V", "--crop-latent", "8", "--threads", "1"]) == 0
    assert main(["runtime", "--levers", "L", "--levers-repeats", "2", "--levers-backends"]) == 0
    assert main(["runtime", "--levers", "L"]) == 0
    assert main(["runtime", "--flop-ceiling", "F", "--steps", "10"]) == 0
    assert seen == [("vae", "V", {"crop_latent": 52, "encode_size": 512, "repeats": 3}),
                    ("threads", 1), ("vae", "V", {"crop_latent": 8, "encode_size": 512, "repeats": 2}),
                    ("levers", "L", 2, True), ("levers", "L", 5, False), ("flops", "F", 1024, 10)]
    # the mask sweep refuses the other measurements' own options, which it would ignore
    assert main(["runtime", "--preset", "tiny", "--out", "unused", "--crop-latent", "8"]) == 2
    assert "--crop-latent is an option of --vae-backends OUT" in capsys.readouterr().err
    assert main(["runtime", "--preset", "tiny", "--out", "unused", "--levers-backends"]) == 2
    assert main(["runtime", "--preset", "tiny", "--out", "unused", "--vae-back", "V"]) == 2   # abbreviated
    assert "give --vae-backends in full" in capsys.readouterr().err
    assert seen[-1] == ("flops", "F", 1024, 10)   # nothing else ran
