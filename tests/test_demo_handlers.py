"""Unit tests of the demo's event logic (demo/handlers.py), called directly with the tiny pipelines."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

gr = pytest.importorskip("gradio")

from demo import handlers as H  # noqa: E402
from demo.examples import load_examples  # noqa: E402
from demo.models import ModelSpec, Models, ModelUnavailable  # noqa: E402


@pytest.fixture(scope="module")
def models():
    m = Models(ModelSpec(tiny=True, max_side=64))
    m.lazy()
    return m


def canvas_rgb(h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 180, np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 255, 3)
    return img


def layer_from_mask(mask, rgba=H.MASK_RGBA):
    return H.mask_layer(mask, rgba)


def box_mask(h=64, w=64, y0=10, y1=30, x0=12, x1=40):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


class Notes(list):
    def __call__(self, msg):
        self.append(msg)


# --------------------------------------------------------------------------------------------- parse_editor
def test_parse_editor_mask_from_layer_alpha():
    rgb, mask = canvas_rgb(), box_mask()
    c = H.parse_editor({"background": rgb, "layers": [layer_from_mask(mask)], "composite": None}, warn=Notes())
    assert c.rgb.shape == (64, 64, 3) and c.rgb.dtype == np.uint8
    assert np.array_equal(c.mask, mask) and c.sketch is None


@pytest.mark.parametrize("value", [None, {"background": None, "layers": [], "composite": None}, {}])
def test_parse_editor_no_image(value):
    with pytest.raises(gr.Error, match="No image"):
        H.parse_editor(value, warn=Notes())


def test_parse_editor_strokes_without_image():
    val = {"background": None, "layers": [np.zeros((8, 8, 4), np.uint8)], "composite": np.zeros((8, 8, 4), np.uint8)}
    with pytest.raises(gr.Error, match="no image under your strokes"):
        H.parse_editor(val, warn=Notes())


def test_parse_editor_empty_mask_refused():
    val = {"background": canvas_rgb(), "layers": [np.zeros((64, 64, 4), np.uint8)], "composite": None}
    with pytest.raises(gr.Error, match="mask is empty"):
        H.parse_editor(val, warn=Notes())
    with pytest.raises(gr.Error, match="mask is empty"):
        H.parse_editor({"background": canvas_rgb(), "layers": [], "composite": None}, warn=Notes())


def test_parse_editor_full_mask_allowed_with_warning():
    notes = Notes()
    c = H.parse_editor({"background": canvas_rgb(), "layers": [layer_from_mask(np.ones((64, 64), bool))]}, warn=notes)
    assert c.mask.all()
    assert any("covers 100%" in n for n in notes)


def test_parse_editor_flattens_transparency_and_grey():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white
    c = H.parse_editor({"background": rgba, "layers": [layer_from_mask(box_mask(32, 32, 2, 8, 2, 8))]}, warn=Notes())
    assert (c.rgb == 255).all()
    grey = np.full((32, 32), 77, np.uint8)
    c = H.parse_editor({"background": grey, "layers": [layer_from_mask(box_mask(32, 32, 2, 8, 2, 8))]}, warn=Notes())
    assert c.rgb.shape == (32, 32, 3) and (c.rgb == 77).all()


def test_parse_editor_layer_size_mismatch_is_stretched():
    notes = Notes()
    small = layer_from_mask(box_mask(32, 32, 0, 16, 0, 16))
    c = H.parse_editor({"background": canvas_rgb(), "layers": [small]}, warn=notes)
    assert c.mask[:32, :32].all() and not c.mask[32:, 32:].any()
    assert any("stretched" in n for n in notes)


def test_parse_editor_rejects_huge_canvas():
    huge = np.zeros((H.MAX_CANVAS_SIDE + 1, 8, 3), np.uint8)
    with pytest.raises(gr.Error, match="accepts up to"):
        H.parse_editor({"background": huge, "layers": []}, warn=Notes())


def test_parse_editor_corrupt_or_unsupported_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    for p in (bad, txt):
        with pytest.raises(gr.Error, match="Could not read"):
            H.parse_editor({"background": str(p), "layers": []}, warn=Notes())


def test_parse_editor_reads_file_paths(tmp_path):
    rgb, mask = canvas_rgb(), box_mask()
    PIL.Image.fromarray(rgb).save(tmp_path / "bg.png")
    PIL.Image.fromarray(layer_from_mask(mask), "RGBA").save(tmp_path / "m.png")
    c = H.parse_editor({"background": str(tmp_path / "bg.png"), "layers": [str(tmp_path / "m.png")]}, warn=Notes())
    assert np.array_equal(c.rgb, rgb) and np.array_equal(c.mask, mask)


# --------------------------------------------------------------------------------------------- sketch layers
def test_sketch_one_layer_region_and_strokes():
    region = box_mask(64, 64, 10, 40, 10, 40)
    layer = layer_from_mask(region)
    layer[20:25, 15:35] = (220, 30, 30, 255)  # a solid red stroke inside the region
    notes = Notes()
    c = H.parse_editor({"background": canvas_rgb(), "layers": [layer]}, "sketch", warn=notes)
    assert np.array_equal(c.mask, region)
    assert c.sketch is not None and (c.sketch[20:25, 15:35, :3] == (220, 30, 30)).all()
    assert c.sketch[..., 3].astype(bool).sum() == 5 * 20
    assert not notes


def test_sketch_strokes_reaching_far_outside_the_region_are_ignored_with_a_warning():
    region = box_mask(64, 64, 10, 40, 10, 30)
    layer = layer_from_mask(region)
    layer[20:23, 12:60] = (35, 75, 225, 255)  # a stroke from inside the region to near the right edge
    notes = Notes()
    c = H.parse_editor({"background": canvas_rgb(), "layers": [layer]}, "sketch", warn=notes)
    assert c.mask[20:23, 12:30].all()                    # its part over the region replaced pink: region
    assert not c.mask[:, 40:].any()                      # the far part does not grow the region
    assert not c.sketch[:, 40:, 3].any() and c.sketch[20:23, 12:30, 3].all()
    assert any("outside the painted region" in n for n in notes)


def test_sketch_entirely_outside_the_region_runs_as_a_text_edit_with_a_warning():
    region = box_mask(64, 64, 10, 30, 10, 30)
    layer = layer_from_mask(region)
    layer[50:53, 45:60] = (35, 75, 225, 255)  # a stroke far from the region
    notes = Notes()
    c = H.parse_editor({"background": canvas_rgb(), "layers": [layer]}, "sketch", warn=notes)
    assert np.array_equal(c.mask, region) and c.sketch is None  # not an SDEdit of the region's own pixels
    assert any("entirely outside the painted region" in n for n in notes)


def test_sketch_strokes_only_region_grows_around_them():
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[30:34, 20:44] = (35, 75, 225, 255)
    notes = Notes()
    c = H.parse_editor({"background": canvas_rgb(), "layers": [layer]}, "sketch", warn=notes)
    strokes = layer[..., 3] > 0
    assert c.mask[strokes].all() and c.mask.sum() > strokes.sum() and not c.mask[0:5].any()
    assert any("around your strokes" in n for n in notes)


def test_sketch_two_layers_explicit_and_no_strokes_warns():
    region = box_mask()
    strokes = np.zeros((64, 64, 4), np.uint8)
    strokes[15:20, 15:30] = (30, 170, 50, 255)
    mask_white = np.zeros((64, 64, 4), np.uint8)
    mask_white[region] = 255  # an opaque white mask layer counts as region in the explicit form
    c = H.parse_editor({"background": canvas_rgb(), "layers": [mask_white, strokes]}, "sketch", warn=Notes())
    assert np.array_equal(c.mask, region) and c.sketch[15:20, 15:30, 3].all()
    notes = Notes()
    c = H.parse_editor({"background": canvas_rgb(), "layers": [layer_from_mask(region)]}, "sketch", warn=notes)
    assert c.sketch is None and any("No sketch strokes" in n for n in notes)


# --------------------------------------------------------------------------------------------- prompts
def test_clean_prompt_normalises_and_limits(models):
    tok = models.lazy().tokenizer
    notes = Notes()
    assert H.clean_prompt("  a  red\tcircle\x00\n ", tok, notes) == "a red circle"
    assert not notes
    with pytest.raises(gr.Error, match="characters long"):
        H.clean_prompt("a" * (H.MAX_PROMPT_CHARS + 1), tok, notes)
    with pytest.raises(gr.Error, match="must be text"):
        H.clean_prompt(123, tok, notes)


def test_clean_prompt_warnings(models):
    tok = models.lazy().tokenizer
    notes = Notes()
    assert H.clean_prompt("", tok, notes) == "" and "Empty prompt" in notes[-1]
    notes = Notes()
    assert H.clean_prompt("", tok, notes, empty_ok=True) == "" and not notes
    notes = Notes()
    assert H.clean_prompt("赤い円", tok, notes) == "赤い円"
    assert any("non-Latin" in n for n in notes)
    notes = Notes()
    H.clean_prompt("a red circle " * 30, tok, notes, max_tokens=32)
    assert any("reads the first 32" in n for n in notes)


def test_normalise_request_clamps_and_randomises():
    notes = Notes()
    r = H.normalise_request("a red circle", None, 5, False, 500, 99, 9, True, 0.0, warn=notes)
    assert (r.seed, r.steps, r.guidance, r.variations, r.compare) == (5, H.MAX_STEPS, 20.0, H.MAX_VARIATIONS, True)
    assert r.strength == 0.05 and len(notes) == 4
    r = H.normalise_request("x", "", None, True, None, None, None, None, warn=Notes())
    assert 0 <= r.seed <= H.MAX_SEED and r.steps == 20 and r.guidance == 4.5 and r.variations == 1
    with pytest.raises(gr.Error, match="Steps must be a number"):
        H.normalise_request("x", "", 0, False, "many", 4.5, 1, False, warn=Notes())


# --------------------------------------------------------------------------------------------- resolution policy
def test_downscale_and_paste_back_keeps_unmasked_pixels_at_full_res():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    mask = box_mask(300, 200, 100, 160, 50, 120)
    canvas = H.Canvas(rgb=rgb, mask=mask)
    work, scale = H.to_working(canvas, 64)
    assert work.size == (64, 43) and scale == pytest.approx(43 / 200)
    # the working mask covers the full-res mask after upscaling
    up = np.asarray(PIL.Image.fromarray(work.mask.astype(np.uint8) * 255).resize((200, 300), PIL.Image.NEAREST)) > 0
    assert up[mask].mean() > 0.95
    edited = np.zeros((64, 43, 3), np.uint8)
    out = H.paste_back(canvas, edited, scale)
    assert out.shape == rgb.shape
    assert np.array_equal(out[~mask], rgb[~mask])
    assert (out[mask] != rgb[mask]).any()


def test_downscale_keeps_thin_strokes_and_paste_back_keeps_alpha_outside_the_hole():
    from lazydiff.pipelines.working_size import downscale_edit, paste_back

    mask = np.zeros((300, 200), bool)
    mask[:, 4] = True   # columns [4, 5) straddle working columns 0 [0, 4.65) and 1: both must hold the stroke
    rgba = np.dstack([np.full((300, 200, 3), 90, np.uint8), np.full((300, 200), 40, np.uint8)])
    small, small_mask, _, scale = downscale_edit(rgba, mask, None, 64)
    assert small.shape == (64, 43, 4) and small_mask[:, :2].all() and not small_mask[:, 2:].any()
    out = paste_back(rgba, mask, np.full_like(small, 200), scale)
    assert np.array_equal(out[~mask], rgba[~mask]) and (out[mask][:, 3] == 255).all()


def test_working_size_identity_below_limit():
    from lazydiff.pipelines.working_size import working_size

    assert working_size(100, 60, 128) == (100, 60)
    assert working_size(1000, 500, 128) == (128, 64)
    assert working_size(1000, 500, 0) == (1000, 500)   # 0: no limit


# --------------------------------------------------------------------------------------------- history
def test_history_push_undo_redo_reset_and_immutability():
    a, b, c = (np.full((4, 4, 3), v, np.uint8) for v in (1, 2, 3))
    h0 = H.new_history()
    h1 = H.history_push(h0, a, "start")
    h2 = H.history_push(h1, b, "edit 1")
    h3 = H.history_push(h2, c, "edit 2")
    assert h0["items"] == [] and len(h1["items"]) == 1  # inputs never mutated
    assert H.history_current(h3) is c and "3 of 3" in H.history_markdown(h3)
    notes = Notes()
    u = H.history_move(h3, "undo", notes)
    assert H.history_current(u) is b and H.history_current(h3) is c
    u = H.history_move(H.history_move(u, "undo", notes), "undo", notes)
    assert H.history_current(u) is a and any("Nothing to undo" in n for n in notes)
    r = H.history_move(u, "redo", notes)
    assert H.history_current(r) is b
    branch = H.history_push(r, c, "other")  # the redo branch is dropped
    assert len(branch["items"]) == 3 and H.history_current(branch) is c
    reset = H.history_move(branch, "reset", notes)
    assert H.history_current(reset) is a and len(reset["items"]) == 3
    assert H.history_current(H.history_move(reset, "redo", notes)) is b


def test_history_is_bounded():
    h = H.new_history()
    for i in range(H.HISTORY_LIMIT + 5):
        h = H.history_push(h, np.full((2, 2, 3), i % 255, np.uint8), f"{i}")
    assert len(h["items"]) == H.HISTORY_LIMIT and h["labels"][-1] == str(H.HISTORY_LIMIT + 4)


def test_history_move_on_empty_history_warns():
    notes = Notes()
    h = H.history_move(None, "undo", notes)
    assert h["items"] == [] and notes


# --------------------------------------------------------------------------------------------- the edit
def test_run_edit_tiny_text(models):
    rgb, mask = canvas_rgb(), box_mask()
    req = H.EditRequest(prompt="a red circle", seed=3, steps=4, variations=2)
    res = H.run_edit(models, H.Canvas(rgb, mask), req, warn=Notes())
    assert len(res.images) == 2
    for im in res.images:
        assert im.shape == rgb.shape and np.array_equal(im[~mask], rgb[~mask])
    assert (res.images[0][mask] != rgb[mask]).any()
    st = res.lazy.stats
    assert 0 < st["hole_tokens"] < st["total_tokens"] and res.mask_ratio == pytest.approx(mask.mean())
    for key in ("text", "vae_encode", "context_encoder", "denoise", "vae_decode", "total"):
        assert key in res.lazy.timings
    html = H.speed_html(res)
    assert f"{st['hole_tokens']} / {st['total_tokens']}" in html and "Context encoder" in html
    assert res.baseline is None and H.compare_html(res) == ""
    # same seed -> same result
    again = H.run_edit(models, H.Canvas(rgb, mask), req, warn=Notes())
    assert all(np.array_equal(a, b) for a, b in zip(again.images, res.images))


def test_run_edit_compare_with_baseline(models):
    rgb, mask = canvas_rgb(), box_mask()
    res = H.run_edit(models, H.Canvas(rgb, mask), H.EditRequest(prompt="a star", seed=1, steps=3, compare=True),
                     warn=Notes())
    assert res.baseline is not None and res.baseline_image.shape == rgb.shape
    assert np.array_equal(res.baseline_image[~mask], rgb[~mask])
    assert res.speedup > 0 and "speedup" in H.compare_html(res)
    html = H.speed_html(res)
    assert "faster than full canvas" in html or "the full-canvas time" in html


def test_run_edit_sketch_and_downscaled(models):
    rgb = canvas_rgb(160, 96)
    mask = box_mask(160, 96, 40, 100, 20, 70)
    sketch = np.zeros((160, 96, 4), np.uint8)
    sketch[60:80, 30:60] = (250, 225, 30, 255)
    notes = Notes()
    res = H.run_edit(models, H.Canvas(rgb, mask, sketch), H.EditRequest(prompt="", steps=4, strength=0.5), warn=notes)
    out = res.images[0]
    assert out.shape == rgb.shape and np.array_equal(out[~mask], rgb[~mask])
    assert res.work_size == (64, 38) and res.lazy.stats["steps"] == 2  # strength 0.5 of 4 steps
    assert any("edits it at" in n for n in notes)
    assert "model at 38x64" in H.speed_html(res)


def test_stream_edit_yields_progress_and_previews(models):
    events = list(H.stream_edit(models, H.Canvas(canvas_rgb(), box_mask()),
                                H.EditRequest(prompt="a circle", steps=6, preview_every=2), warn=Notes()))
    kinds = [type(e).__name__ for e in events]
    assert kinds[-1] == "EditResult"
    assert kinds.count("Progress") == 6 and kinds.count("Preview") == 2  # steps 2 and 4 (not the last)
    assert events[kinds.index("Preview")].image.shape == (64, 64, 3)


def test_stream_edit_closed_early_cancels_and_frees_the_model(models):
    stream = H.stream_edit(models, H.Canvas(canvas_rgb(), box_mask()), H.EditRequest(prompt="x", steps=30),
                           warn=Notes())
    next(stream)  # first progress event
    stream.close()
    assert models.lock.acquire(timeout=30)  # the worker stops at the next step and releases the model
    models.lock.release()


class _Broken:
    def __init__(self, err):
        self.err = err
        self.lock = threading.Lock()
        self.max_side = 64

    def lazy(self):
        if isinstance(self.err, ModelUnavailable):
            raise self.err

        def pipe(*a, **k):
            raise self.err
        return pipe


@pytest.mark.parametrize("err, match", [(ModelUnavailable("no weights here"), "not available: no weights here"),
                                        (RuntimeError("CUDA out of memory"), "failed on this edit"),
                                        (ValueError("mask_image is empty"), "refused this edit")])
def test_pipeline_failures_become_clear_errors(err, match):
    with pytest.raises(gr.Error, match=match):
        H.run_edit(_Broken(err), H.Canvas(canvas_rgb(), box_mask()), H.EditRequest(prompt="x", steps=2), warn=Notes())


# --------------------------------------------------------------------------------------------- models, examples, app
def test_models_missing_folder_and_defaults(tmp_path, monkeypatch):
    m = Models(ModelSpec(model_dir=str(tmp_path / "nope")))
    with pytest.raises(ModelUnavailable, match="not a folder"):
        m.lazy()
    import lazydiff.defaults

    monkeypatch.setattr(lazydiff.defaults, "MODELS_DIR", tmp_path)
    m = Models(ModelSpec())
    with pytest.raises(ModelUnavailable, match="--tiny"):
        m.lazy()
    assert not m.baseline_available()


def test_models_from_pretrained_folder(tmp_path):
    from lazydiff.testing import tiny_lazy_pipeline

    from lazydiff.testing import tiny_regenerate_pipeline

    tiny_lazy_pipeline().save_pretrained(tmp_path / "lazy")
    m = Models(ModelSpec(model_dir=str(tmp_path / "lazy"), baseline_dir=str(tmp_path / "missing")))
    assert type(m.lazy()).__name__ == "LazyDiffusionPipeline" and m.banner is None
    assert not m.baseline_available()
    tiny_regenerate_pipeline().save_pretrained(tmp_path / "base")
    m = Models(ModelSpec(model_dir=str(tmp_path / "lazy"), baseline_dir=str(tmp_path / "base")))
    assert type(m.baseline()).__name__ == "RegenerateImagePipeline"


def test_models_from_a_model_folder_in_data_models_layout():
    shipped = Path(__file__).resolve().parent.parent / "data" / "models"   # laid out as training exports are
    if not (shipped / "lazy").is_dir():
        pytest.skip("data/models not present")
    m = Models(ModelSpec(model_dir=str(shipped / "lazy"), baseline_dir=str(shipped / "lazy"), onnx_runtime="off",
                         device="cpu"))
    assert type(m.lazy()).__name__ == "LazyDiffusionPipeline"
    with pytest.raises(ModelUnavailable, match="holds a LazyDiffusionPipeline, not a RegenerateImagePipeline"):
        m.baseline()


def test_spec_from_env():
    s = ModelSpec.from_env({"LAZYDIFF_TINY": "1", "LAZYDIFF_MODEL": "/x", "LAZYDIFF_MAX_SIDE": "96"})
    assert s.tiny and s.model_dir == "/x" and s.working_max_side == 96
    assert ModelSpec.from_env({}).working_max_side == 512 and not ModelSpec.from_env({}).tiny


def test_examples_round_trip_through_the_editor_format():
    exs = load_examples()
    assert {e.task for e in exs} == {"text", "sketch"} and len(exs) >= 4
    for e in exs:
        c = H.parse_editor(e.editor_value(), e.task, warn=Notes())
        assert np.array_equal(c.rgb, e.image)
        if e.task == "text":
            assert np.array_equal(c.mask, e.mask)
        else:
            assert c.mask[e.mask].all() and c.sketch is not None
            assert np.array_equal(c.sketch[..., 3] > 0, e.sketch[..., 3] > 0)
        assert e.prompt


def test_canvas_png(tmp_path):
    p = H.canvas_png(canvas_rgb())
    assert np.array_equal(np.asarray(PIL.Image.open(p)), canvas_rgb())
    assert H.canvas_png(None) is None


def test_build_demo_api_names():
    from demo.ui import build_demo

    demo = build_demo(Models(ModelSpec(tiny=True)))
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"edit", "sketch", "undo", "redo", "reset"} <= names
    assert demo.models.is_tiny


def test_app_main_without_models_says_how_to_proceed(tmp_path, monkeypatch, capsys):
    import lazydiff.defaults

    monkeypatch.setattr(lazydiff.defaults, "MODELS_DIR", tmp_path)
    for var in ("LAZYDIFF_MODEL", "LAZYDIFF_TINY", "LAZYDIFF_BASELINE"):
        monkeypatch.delenv(var, raising=False)
    import app

    assert app.main(["--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--tiny" in err and "--model" in err


def test_app_listens_on_all_interfaces_in_a_space_and_locally_elsewhere(monkeypatch):
    import app

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "someone/lazydiffusion")
    assert app.parse_args([]).host == "0.0.0.0"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "10.0.0.5")
    assert app.parse_args([]).host == "10.0.0.5"
    assert app.parse_args(["--host", "127.0.0.1"]).host == "127.0.0.1"


# --------------------------------------------------------------------------------------------- UI event functions
OUT_NAMES = ("result", "gallery", "stats", "seed", "history", "history_md", "download", "cmp_lazy", "cmp_base",
             "cmp_html")


def test_edit_event_streams_then_publishes_and_keeps_history_on_error(models):
    from demo import ui

    outs = {k: k for k in OUT_NAMES}
    rgb, mask = canvas_rgb(), box_mask()
    value = {"background": rgb, "layers": [layer_from_mask(mask)], "composite": None}
    h0 = H.new_history()
    ups = list(ui._edit_events(models, "text", value, "a red circle", 1.0, "", 7, False, 6, 4.5, 2, False, h0, None,
                               outs))
    assert all(set(u) == {"result"} for u in ups[:-1]) and len(ups) >= 2  # live previews first
    final = ups[-1]
    assert set(final) == set(OUT_NAMES) and final["seed"] == 7
    h = final["history"]
    assert len(h["items"]) == 2 and np.array_equal(h["items"][0], rgb) and len(h["variations"]) == 2
    assert h0["items"] == []  # the input state is never mutated
    # picking the second variation replaces the current step
    new, md, path, img = ui._pick(h, gr.SelectData(None, {"index": 1, "value": None}))
    assert img is h["variations"][1] and len(new["items"]) == 2 and "variation 2" in md
    # a failing edit leaves the history as it was
    empty = {"background": H.history_current(new), "layers": [], "composite": None}
    with pytest.raises(gr.Error, match="mask is empty"):
        list(ui._edit_events(models, "text", empty, "x", 1.0, "", 0, False, 4, 4.5, 1, False, new, None, outs))
    hist, md, path, img = ui._move("undo", new)
    assert np.array_equal(img, rgb) and "1 of 2" in md
    back = ui._to_editor(hist)  # Undo gives the mask of the undone edit back, ready to try again
    assert np.array_equal(back["background"], rgb) and np.array_equal(back["layers"][0][..., 3] > 0, mask)
    assert not ui._to_editor(ui._move("redo", hist)[0])["layers"][0][..., 3].any()  # the result: no mask
    # editing the current canvas again does not duplicate it in the history
    value2 = {"background": H.history_current(new), "layers": [layer_from_mask(mask)], "composite": None}
    final2 = list(ui._edit_events(models, "text", value2, "a star", 1.0, "", 1, False, 4, 4.5, 1, False, new, None,
                                  outs))[-1]
    assert len(final2["history"]["items"]) == 3
    ed = ui._to_editor(final2["history"])
    assert ed["background"] is final2["history"]["items"][-1] and not ed["layers"][0][..., 3].any()


def test_switching_tabs_carries_the_canvas_into_an_empty_editor():
    from demo import ui

    rgb = canvas_rgb()
    other = H.history_push(H.new_history(), rgb, "the image you started from")
    carried = ui._carry_canvas(other, {"background": None, "layers": [], "composite": None})
    assert np.array_equal(carried["background"], rgb)
    assert isinstance(ui._carry_canvas(other, {"background": rgb[::-1], "layers": [], "composite": None}),
                      type(gr.skip()))                       # an editor with its own image keeps it
    assert isinstance(ui._carry_canvas(H.new_history(), None), type(gr.skip()))


def test_uploads_in_other_pil_modes_become_rgb_arrays_as_the_library_reads_them():
    from demo.handlers import to_uint8_array

    grey = np.arange(256, dtype=np.uint16).reshape(16, 16)
    arr = to_uint8_array(PIL.Image.fromarray(grey * 257))           # 16-bit grey: scaled, not clipped to white
    assert arr.shape == (16, 16, 3) and np.array_equal(arr[..., 0], grey.astype(np.uint8))
    pal = PIL.Image.fromarray(np.stack([grey.astype(np.uint8)] * 3, -1)).convert("P", palette=PIL.Image.ADAPTIVE)
    assert to_uint8_array(pal).shape == (16, 16, 3)
    assert to_uint8_array(PIL.Image.new("CMYK", (8, 8))).shape == (8, 8, 3)
