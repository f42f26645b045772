"""ONNX Runtime for the decoders' denoising steps (lazydiff/models/onnx_backend.py).

Tolerance: float32 rounding. ONNX Runtime runs the same arithmetic with its own kernels, so outputs
are compared with ``allclose`` (per forward) and within 2/255 per pixel for whole edits; the pixels
outside the mask stay bit-identical whatever the backend.
"""
import copy
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from lazydiff.models.onnx_backend import OnnxRunner, onnxruntime_available
from lazydiff.pipelines.editing import prepare_edit
from lazydiff.testing import tiny_lazy_pipeline, tiny_regenerate_pipeline
from test_fast_inference import decoder_and_args, run

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed")


def lazy_args(dec, k, b, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, 16, generator=g), torch.randn(b, k, 24, generator=g),
            torch.randperm(64, generator=g)[:k].sort().values[None].repeat(b, 1), (8, 8))


@pytest.mark.parametrize("which", ["lazy", "full"])
def test_onnx_step_matches_pytorch(which):
    dec, args, text, tmask = decoder_and_args(which)
    ref = [run(dec, args, t, text, tmask) for t in (999, 500)]
    dec.use_onnx_runtime()
    got = [run(dec, args, t, text, tmask) for t in (999, 500)]
    assert dec.onnx_runner.exports == 1
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
        assert not torch.equal(a, torch.zeros_like(a))


def test_per_sample_timesteps_stay_in_pytorch():
    """The graph folds the modulation into its LayerNorms with one vector for the whole batch; a batch
    whose rows have different timesteps (the pipelines never make one) runs the PyTorch path."""
    dec, args, text, tmask = decoder_and_args("lazy")
    t = torch.tensor([999, 500])
    with torch.no_grad():
        cond = dec.prepare_text(text, tmask)
        ref = dec(*args, t, text, tmask, text_conditioning=cond).sample
        dec.use_onnx_runtime()
        got = dec(*args, t, text, tmask, text_conditioning=cond).sample
        assert dec.onnx_runner.exports == 0 and torch.equal(got, ref)
        dec(*args, torch.tensor([500, 500]), text, tmask, text_conditioning=cond)  # shared: the graph
    assert dec.onnx_runner.exports == 1


def test_the_graph_is_the_documented_step_function():
    """export_decoder_step is written node by node; DecoderStep is the same function in PyTorch (the
    readable reference), and both equal the decoder's own forward."""
    import onnxruntime as ort

    from lazydiff.models.onnx_backend import DecoderStep, export_decoder_step

    dec, args, text, tmask = decoder_and_args("lazy")
    captured = {}
    dec.use_onnx_runtime()
    runner = dec.onnx_runner

    class Spy:  # records what the decoder feeds its graph
        def __call__(self, module, inputs):
            captured["inputs"] = inputs
            return runner(module, inputs)

    dec.onnx_runner = Spy()
    got = run(dec, args, 500, text, tmask)
    inputs = captured["inputs"]
    assert not bool(inputs["key_padding_mask"].all())          # the padded prompt's mask reaches the graph
    with torch.no_grad():
        reference = DecoderStep(dec)(**inputs)
    session = ort.InferenceSession(export_decoder_step(dec), providers=["CPUExecutionProvider"])
    graph = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
    assert torch.allclose(graph, reference, atol=1e-5, rtol=1e-4), (graph - reference).abs().max()
    dec.onnx_runner = None
    assert torch.allclose(got, run(dec, args, 500, text, tmask), atol=1e-5, rtol=1e-4)


def test_context_encoder_matches_pytorch():
    pipe = tiny_lazy_pipeline()
    rng = np.random.default_rng(1)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255
    edit = prepare_edit(PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                        PIL.Image.fromarray(mask), pipe.token_cell)
    enc = pipe.encode_canvas(edit, "cpu")
    with torch.no_grad():
        ref = pipe.context_encoder(enc["masked_latents"], enc["mask_latent"], enc["hole_index"]).context
        pipe.enable_onnx_runtime(parts="context_encoder")
        assert pipe.decoder.onnx_runner is None and pipe.vae_encode_runner is None
        got = pipe._context_in_onnx(enc)
    assert pipe.context_encoder_runner.exports == 1
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
    assert pipe._context_in_onnx(enc) is None                   # with gradients on: PyTorch (training)


def test_one_export_serves_every_hole_size_batch_and_prompt_length():
    dec, _, _, _ = decoder_and_args("lazy")
    g = torch.Generator().manual_seed(3)
    cases = [(13, 2, 7), (1, 1, 7), (40, 2, 3), (64, 4, 11)]   # hole tokens, batch, text tokens
    refs = []
    for k, b, length in cases:
        text, tmask = torch.randn(b, length, 32, generator=g), torch.ones(b, length)
        refs.append((lazy_args(dec, k, b), text, tmask))
    expected = [run(dec, a, 250, text, tmask) for a, text, tmask in refs]
    dec.use_onnx_runtime()
    for (a, text, tmask), ref in zip(refs, expected):
        out = run(dec, a, 250, text, tmask)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert dec.onnx_runner.exports == 1


def test_weight_changes_rebuild_the_graph():
    dec, args, text, tmask = decoder_and_args("lazy")
    dec.use_onnx_runtime()
    before = run(dec, args, 500, text, tmask)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in dec.state_dict().items()}
    dec.load_state_dict(state)
    after = run(dec, args, 500, text, tmask)
    assert dec.onnx_runner.exports == 2
    dec.use_onnx_runtime(False)
    ref = run(dec, args, 500, text, tmask)
    assert torch.allclose(after, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before, after, atol=1e-4)


def test_paths_it_does_not_cover_stay_in_pytorch():
    dec, args, text, tmask = decoder_and_args("lazy")
    dec.use_onnx_runtime()
    b, k = args[0].shape[:2]
    token_mask = torch.ones(b, k)
    token_mask[0, -3:] = 0
    run(dec, args, 500, text, tmask, token_mask=token_mask)            # padded batch
    run(dec, args, 500, text, tmask, fast=False)                      # diffusers blocks asked for
    dec.train()
    with torch.enable_grad():                                         # training
        dec(*args, torch.tensor([500] * b), text, tmask).sample.sum().backward()
    dec.eval()
    assert dec.onnx_runner.exports == 0
    dec64 = copy.deepcopy(dec).double()                               # other dtypes
    a64 = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    run(dec64, a64, 500, text.double(), tmask)
    assert dec64.onnx_runner.exports == 0


def test_copies_rebuild_their_own_session():
    dec, args, text, tmask = decoder_and_args("full")
    dec.use_onnx_runtime()
    run(dec, args, 500, text, tmask)
    twin = copy.deepcopy(dec)
    assert twin.onnx_runner is not dec.onnx_runner and twin.onnx_runner.session is None
    assert torch.allclose(run(twin, args, 500, text, tmask), run(dec, args, 500, text, tmask))
    assert twin.onnx_runner.exports == 1


@pytest.mark.parametrize("make", [tiny_lazy_pipeline, tiny_regenerate_pipeline])
def test_whole_edit_with_onnx_runtime(make):
    pipe = make()
    rng = np.random.default_rng(0)
    img = PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255

    def edit():
        return pipe("a red star", img, PIL.Image.fromarray(mask), num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0)).images[0]

    ref = np.asarray(edit()).astype(int)
    pipe.enable_onnx_runtime()
    pipe.clear_caches()                     # encode the canvas again, now through ONNX Runtime
    out = np.asarray(edit()).astype(int)
    assert pipe.decoder.onnx_runner.exports == 1 and pipe.vae_decode_runner.exports == 1
    assert pipe.vae_encode_runner.exports == 1 and pipe.text_encoder_runner.exports == 1
    if hasattr(pipe, "context_encoder"):
        assert pipe.context_encoder_runner.exports == 1
    else:
        assert pipe.context_encoder_runner is None      # the part is ignored where there is nothing to run
    assert np.abs(out - ref).max() <= 2
    outside = mask == 0
    assert np.array_equal(out[outside], np.asarray(img).astype(int)[outside])
    # The runners swapped out (PyTorch again, bit-identical to the first edit) and back (no new export).
    runners = pipe.onnx_runners
    assert runners["decoder.onnx_runner"] is pipe.decoder.onnx_runner and runners["vae_decode_runner"] is not None
    pipe.onnx_runners = {}
    assert all(r is None for r in pipe.onnx_runners.values())
    pipe.clear_caches()
    assert np.array_equal(np.asarray(edit()).astype(int), ref)
    pipe.onnx_runners = runners
    pipe.clear_caches()
    assert np.array_equal(np.asarray(edit()).astype(int), out) and pipe.decoder.onnx_runner.exports == 1
    with pytest.raises(ValueError, match="unknown runner attributes"):
        pipe.onnx_runners = {"vae_runner": None}
    assert pipe.onnx_runners == runners                 # a refused assignment changes nothing


def test_vae_decode_matches_pytorch_at_every_crop_size():
    pipe = tiny_lazy_pipeline()
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(1, 4, h, w, generator=g) for h, w in ((6, 6), (3, 9), (16, 16))] + [torch.randn(2, 4, 5, 7, generator=g)]
    with torch.no_grad():
        refs = [pipe.vae_decode(z) for z in zs]
        pipe.enable_onnx_runtime()
        outs = [pipe.vae_decode(z) for z in zs]
    assert pipe.vae_decode_runner.exports == 1
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()
    pipe.enable_onnx_runtime(False)
    assert pipe.vae_decode_runner is None and pipe.decoder.onnx_runner is None


def test_vae_encode_matches_pytorch_and_leaves_hooked_encodes_to_pytorch():
    pipe = tiny_lazy_pipeline()
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(1, 3, h, w, generator=g) * 2 - 1 for h, w in ((32, 32), (16, 48))] + [torch.rand(2, 3, 24, 40, generator=g)]
    with torch.no_grad():
        refs = [pipe.vae_encode(x) for x in xs]
        pipe.enable_onnx_runtime()
        hooked = pipe.vae_encode(xs[0])                 # not plain: the canvas cache may have hooks on
        outs = [pipe.vae_encode(x, plain=True) for x in xs]
    assert torch.equal(hooked, refs[0])
    assert pipe.vae_encode_runner.exports == 1
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()


def test_text_encoder_matches_pytorch_at_every_prompt_length():
    pipe = tiny_lazy_pipeline()
    prompts = ["", "a red star", "a large blue hexagon on a striped background, near the top left corner"]
    refs = [pipe._encode_one(p, 120, "cpu")[0] for p in prompts]
    pipe.clear_caches()
    pipe.enable_onnx_runtime(parts="text_encoder")
    outs = [pipe._encode_one(p, 120, "cpu")[0] for p in prompts]
    assert pipe.text_encoder_runner.exports == 1                  # one graph for every length
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()


def test_weights_too_big_for_one_graph_say_what_to_do(monkeypatch):
    import lazydiff.models.onnx_backend as ob

    pipe = tiny_lazy_pipeline()
    pipe.enable_onnx_runtime(parts="text_encoder")
    monkeypatch.setattr(ob, "MAX_GRAPH_WEIGHT_BYTES", 1000)
    with pytest.raises(RuntimeError, match="without \"text_encoder\""):
        pipe._encode_one("a red star", 120, "cpu")


def test_missing_onnxruntime_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import fails as if not installed
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        OnnxRunner()


@pytest.mark.parametrize("choice, parts", [([], "denoising steps, context encoder, VAE, text encoder"), (["vae"], "VAE")])
def test_runtime_benchmark_flag_runs_every_method_in_onnx_runtime(tmp_path, choice, parts):
    from eval.cli import main

    out = tmp_path / "r"
    assert main(["runtime", "--preset", "tiny", "--mask-ratios", "0.25", "--steps", "2", "--repeats", "1",
                 "--warmup", "0", "--onnx-runtime", *choice, "--out", str(out)]) == 0
    assert f"ONNX Runtime: {parts} (every method)" in (out / "report.md").read_text()


def test_vae_only_keeps_the_steps_in_pytorch_and_bad_parts_are_refused():
    pipe = tiny_regenerate_pipeline()
    pipe.enable_onnx_runtime(parts=("vae",))
    assert pipe.decoder.onnx_runner is None
    assert pipe.vae_decode_runner is not None and pipe.vae_encode_runner is not None
    pipe.enable_onnx_runtime(parts="decoder")
    assert pipe.decoder.onnx_runner is not None and pipe.vae_decode_runner is None
    with pytest.raises(ValueError, match="subset of"):
        pipe.enable_onnx_runtime(parts=("vae", "text"))
    assert pipe.decoder.onnx_runner is not None       # a refused call changes nothing


def test_runtime_benchmark_rejects_onnx_runtime_outside_cpu_fp32():
    from eval.runtime import RuntimeError_, RuntimeOptions, validate

    with pytest.raises(RuntimeError_, match="CPU fp32"):
        validate(RuntimeOptions(out="x", preset="tiny", dtype="bf16", onnx_runtime=True))


def test_demo_turns_it_on_for_cpu_pipelines_unless_told_not_to():
    from demo.models import ModelSpec, Models, ModelUnavailable

    lazy = Models(ModelSpec(tiny=True)).lazy()                                        # auto, on a CPU
    assert lazy.decoder.onnx_runner.exports == 1 and lazy.vae_decode_runner.exports == 1  # warmed up at load
    assert lazy.vae_encode_runner.exports == 1 and lazy.text_encoder_runner.exports == 1
    assert Models(ModelSpec(tiny=True, onnx_runtime="off")).lazy().decoder.onnx_runner is None
    assert Models(ModelSpec(tiny=True, onnx_runtime="on")).baseline().decoder.onnx_runner is not None
    with pytest.raises(ModelUnavailable, match="auto, on or off"):
        Models(ModelSpec(tiny=True, onnx_runtime="fast")).lazy()
    assert ModelSpec.from_env({"LAZYDIFF_ONNX_RUNTIME": "OFF"}).onnx_runtime == "off"
    everything = ("decoder", "context_encoder", "vae", "text_encoder")
    big = tiny_lazy_pipeline(sample_size=128)                  # 4,096 tokens: all parts at any size
    assert Models(ModelSpec()).onnx_parts(big) == everything
    assert Models(ModelSpec(onnx_runtime="on")).onnx_parts(big) == everything
    assert Models(ModelSpec(onnx_runtime="off")).onnx_parts(big) == ()


def test_demo_keeps_modules_too_big_for_one_graph_in_pytorch(monkeypatch):
    import lazydiff.models.onnx_backend as ob
    from demo.models import ModelSpec, Models

    pipe = tiny_lazy_pipeline()
    sizes = {name: ob.weight_bytes(getattr(pipe, name)) for name in ("decoder", "context_encoder", "vae", "text_encoder")}
    monkeypatch.setattr(ob, "MAX_GRAPH_WEIGHT_BYTES", sizes["text_encoder"] - 1)   # as if it were T5-XXL
    expected = tuple(n for n in ("decoder", "context_encoder", "vae") if sizes[n] < sizes["text_encoder"])
    assert Models(ModelSpec()).onnx_parts(pipe) == expected
    monkeypatch.setattr(ob, "MAX_GRAPH_WEIGHT_BYTES", 0)                           # nothing fits
    assert Models(ModelSpec(onnx_runtime="on")).onnx_parts(pipe) == ()


@pytest.mark.slow
def test_vae_backend_benchmark_writes_paired_numbers(tmp_path):
    """``python -m eval.runtime --vae-backends OUT`` on tiny inputs (the SD-VAE-sized exports take ~1 min)."""
    import json

    from eval.runtime import main

    assert main(["--vae-backends", str(tmp_path), "--repeats", "1", "--encode-size", "32", "--crop-latent", "4"]) == 0
    res = json.loads((tmp_path / "vae_backends.json").read_text())
    assert res["max_abs_diff"]["decode"] < 1e-3 and res["max_abs_diff"]["encode"] < 1e-3
    assert res["decode_speedup_paired"] > 0 and len(res["ms"]["encode/onnxruntime"]) == 1


def test_runtime_modes_parse_their_own_options(monkeypatch):
    import eval.runtime as rt

    seen = {}
    monkeypatch.setattr(rt, "run_step_sweep", lambda out, **kw: seen.setdefault("sweep", (out, kw)))
    monkeypatch.setattr(rt, "run_vae_backends", lambda out, **kw: seen.setdefault("vae", (out, kw)))
    assert rt.main(["--step-sweep", "S", "--onnx-runtime", "--size", "512"]) == 0
    assert rt.main(["--vae-backends", "V", "--encode-size", "1024", "--crop-latent", "72"]) == 0
    assert seen["sweep"] == ("S", {"size": 512, "width": 384, "depth": 12, "onnx_runtime": True})
    assert seen["vae"] == ("V", {"crop_latent": 72, "encode_size": 1024, "repeats": 3})


def test_weights_are_checked_once_per_edit_and_again_at_the_next():
    """Inside an edit (dit.edit_scope) the graphs' weight keys are computed once; a weight change
    between two edits still rebuilds the graph and changes the result."""
    from lazydiff.models import dit

    pipe = tiny_lazy_pipeline()
    pipe.enable_onnx_runtime()
    rng = np.random.default_rng(0)
    img = PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255
    calls = []
    key = dit._param_key

    def counting(params):
        calls.append(len(params))
        return key(params)

    def edit():
        return np.asarray(pipe("a red star", img, PIL.Image.fromarray(mask), num_inference_steps=4,
                               generator=torch.Generator().manual_seed(0)).images[0]).astype(int)

    dit._param_key = counting
    try:
        before = edit()
        n_decoder = len(list(pipe.decoder.parameters()))
        assert calls.count(n_decoder) == 1                  # 4 steps, one check of the decoder's weights
        with torch.no_grad():
            pipe.decoder.trunk.proj_out.weight.mul_(1.5)    # in place: only the version counter changes
        after = edit()
    finally:
        dit._param_key = key
    assert pipe.decoder.onnx_runner.exports == 2
    assert np.abs(after - before).max() > 0
    with dit.edit_scope():
        assert dit.once_per_edit(pipe, "x", lambda: 1) == dit.once_per_edit(pipe, "x", lambda: 2) == 1
    assert dit.once_per_edit(pipe, "x", lambda: 2) == 2    # outside a scope: computed every time


@pytest.mark.parametrize("make", [tiny_lazy_pipeline, tiny_regenerate_pipeline])
def test_flop_counts_include_what_ran_in_onnx_runtime(make):
    """The FLOP recorder hooks the modules' forward; ONNX Runtime bypasses it, so the runners report
    their calls too. The same edit counts the same FLOPs on either backend, stage by stage."""
    from eval.flops import CallRecorder
    from lazydiff.models.onnx_backend import CALL_OBSERVERS

    pipe = make()
    img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255
    rec = CallRecorder(pipe)

    def counted():
        pipe.clear_caches()
        rec.start()
        pipe("a red star", img, PIL.Image.fromarray(mask), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        return rec.flops(rec.stop())

    ref = counted()
    pipe.enable_onnx_runtime()
    got = counted()
    assert pipe.vae_decode_runner.exports == 1 and pipe.text_encoder_runner.exports == 1  # it did run there
    for stage in ("text", "vae_encode", "context_encoder", "denoise", "vae_decode", "total"):
        assert got[stage] == pytest.approx(ref[stage]), stage
    assert ref["vae_decode"] > 0 and (ref["context_encoder"] > 0) == hasattr(pipe, "context_encoder")
    assert not CALL_OBSERVERS  # nothing listens outside a recording
