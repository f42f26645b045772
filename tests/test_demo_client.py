"""The demo's HTTP API through gradio_client, against the app launched on localhost (tiny pipelines).

Covers the two editing endpoints, bad inputs (clear errors, server keeps serving, history kept), two
concurrent clients whose sessions stay separate, the upload limit and the file-serving boundary.
"""
from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from demo import handlers as H  # noqa: E402
from demo.models import ModelSpec, Models  # noqa: E402

pytestmark = pytest.mark.slow  # ~40 s on 2 CPU cores (one in-process server for the module)

REPO = Path(__file__).resolve().parent.parent
FAST = dict(steps=4, randomize_seed=False, seed=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    from demo.ui import build_demo

    demo = build_demo(Models(ModelSpec(tiny=True, max_side=96)))
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture
def client(url):
    return Client(url, verbose=False)


def _canvas(tmp_path: Path, name: str, color, h=64, w=64):
    img = np.full((h, w, 3), 200, np.uint8)
    img[8:24, 8:24] = color
    p = tmp_path / f"{name}.png"
    PIL.Image.fromarray(img).save(p)
    return img, p


def _layer(tmp_path: Path, name: str, mask: np.ndarray, rgba=H.MASK_RGBA):
    p = tmp_path / f"{name}.png"
    PIL.Image.fromarray(H.mask_layer(mask, rgba), "RGBA").save(p)
    return p


def _mask(h=64, w=64, y0=30, y1=50, x0=30, x1=56):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _read(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def _editor(bg, *layers):
    return {"background": handle_file(str(bg)), "layers": [handle_file(str(p)) for p in layers], "composite": None}


def test_text_edit_minimal_call(client, tmp_path):
    img, bg = _canvas(tmp_path, "bg", (255, 0, 0))
    mask = _mask()
    out = client.predict(_editor(bg, _layer(tmp_path, "m", mask)), "a red circle", api_name="/edit")
    result, gallery, stats, seed, history_md, download = out[:6]
    res = _read(result)
    assert res.shape == img.shape and np.array_equal(res[~mask], img[~mask]) and (res[mask] != img[mask]).any()
    assert "tokens denoised" in stats and "of the canvas masked" in stats
    assert "step **2 of 2**" in history_md and np.array_equal(_read(download), res)
    assert isinstance(seed, (int, float))


def test_text_edit_variations_and_compare(client, tmp_path):
    img, bg = _canvas(tmp_path, "bg", (0, 0, 255))
    mask = _mask()
    out = client.predict(_editor(bg, _layer(tmp_path, "m", mask)), "a blue square", variations=2, compare=True,
                         api_name="/edit", **FAST)
    gallery, cmp_lazy, cmp_base, cmp_html = out[1], out[6], out[7], out[8]
    assert len(gallery["value"]) == 2 and gallery["visible"]
    base = _read(cmp_base["value"])
    assert np.array_equal(base[~mask], img[~mask])
    assert "speedup" in cmp_html["value"] and cmp_lazy["visible"]


def test_sketch_edit_two_layers_and_one_layer(client, tmp_path):
    img, bg = _canvas(tmp_path, "bg", (0, 128, 0))
    region = _mask()
    strokes = np.zeros((64, 64), bool)
    strokes[35:45, 35:50] = True
    out = client.predict(_editor(bg, _layer(tmp_path, "m", region, (255, 255, 255, 255)),
                                 _layer(tmp_path, "s", strokes, (250, 225, 30, 255))),
                         "a yellow circle", strength=0.5, api_name="/sketch", **FAST)
    res = _read(out[0])
    assert np.array_equal(res[~region], img[~region]) and "2 steps" in out[2]  # strength 0.5 of 4 steps
    # one layer, as the browser sends it: translucent pink region + solid strokes
    layer = H.mask_layer(region)
    layer[strokes] = (250, 225, 30, 255)
    p = tmp_path / "one.png"
    PIL.Image.fromarray(layer, "RGBA").save(p)
    out = client.predict(_editor(bg, p), api_name="/sketch", **FAST)
    res = _read(out[0])
    assert np.array_equal(res[~region], img[~region])


@pytest.mark.parametrize("case, match", [
    ("no_image", "No image"),
    ("empty_mask", "mask is empty"),
    ("corrupt", "Could not read"),
    ("long_prompt", "characters long"),
    ("huge_canvas", "accepts up to"),
])
def test_bad_inputs_give_clear_errors_and_keep_history(client, tmp_path, case, match):
    img, bg = _canvas(tmp_path, "bg", (255, 0, 0))
    good = _editor(bg, _layer(tmp_path, "m", _mask()))
    first = client.predict(good, "a red circle", api_name="/edit", **FAST)  # history: 2 steps
    prompt = "a red circle"
    if case == "no_image":
        value = {"background": None, "layers": [], "composite": None}
    elif case == "empty_mask":
        value = _editor(bg, _layer(tmp_path, "empty", np.zeros((64, 64), bool)))
    elif case == "corrupt":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 100)
        value = _editor(bad, _layer(tmp_path, "m2", _mask()))
    elif case == "long_prompt":
        value, prompt = good, "a red circle " * 100
    else:
        big = tmp_path / "big.png"
        PIL.Image.new("RGB", (H.MAX_CANVAS_SIDE + 8, 16), "white").save(big)
        value = {"background": handle_file(str(big)), "layers": [], "composite": None}
    with pytest.raises(AppError, match=match):
        client.predict(value, prompt, api_name="/edit", **FAST)
    # the session's history survived the error, and the server still serves
    md, _, canvas = client.predict(api_name="/undo")
    assert "step **1 of 2**" in md and np.array_equal(_read(canvas), img)
    again = client.predict(good, "a red circle", api_name="/edit", **FAST)
    assert np.array_equal(_read(again[0]), _read(first[0]))


def test_non_latin_and_empty_prompts_are_allowed(client, tmp_path):
    img, bg = _canvas(tmp_path, "bg", (255, 0, 0))
    mask = _mask()
    for prompt in ("赤い円", ""):
        out = client.predict(_editor(bg, _layer(tmp_path, "m", mask)), prompt, api_name="/edit", **FAST)
        assert np.array_equal(_read(out[0])[~mask], img[~mask])


def test_two_concurrent_clients_keep_separate_sessions(url, tmp_path):
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    img_a, bg_a = _canvas(tmp_path, "a", (255, 0, 0))
    img_b, bg_b = _canvas(tmp_path, "b", (0, 0, 255))
    layer = _layer(tmp_path, "m", _mask())
    jobs = [c.submit(_editor(bg, layer), "a shape", api_name="/edit", **FAST) for c, bg in ((a, bg_a), (b, bg_b))]
    results = [j.result(timeout=120) for j in jobs]
    for (img, res) in ((img_a, results[0]), (img_b, results[1])):
        assert np.array_equal(_read(res[0])[:24, :24], img[:24, :24])
    # a second edit for A only; each session's undo goes back within its own history
    a.predict(_editor(results[0][0], layer), "another", api_name="/edit", **FAST)
    md_a, _, canvas_a = a.predict(api_name="/undo")
    md_b, _, canvas_b = b.predict(api_name="/undo")
    assert "2 of 3" in md_a and np.array_equal(_read(canvas_a), _read(results[0][0]))
    assert "1 of 2" in md_b and np.array_equal(_read(canvas_b), img_b)


def test_upload_size_limit(url, tmp_path):
    import httpx

    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * ((H.MAX_UPLOAD_MB + 1) * 2**20)
    # the server refuses it ...
    r = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("huge.png", big, "image/png")}, timeout=60)
    assert r.status_code == 413
    # ... and the client is told the limit before uploading
    (tmp_path / "huge.png").write_bytes(big)
    with pytest.raises(ValueError, match="maximum file size"):
        Client(url, verbose=False).predict({"background": handle_file(str(tmp_path / "huge.png")), "layers": [],
                                            "composite": None}, "x", api_name="/edit")


@pytest.mark.parametrize("path", ["/etc/passwd", str(REPO / "app.py"), str(REPO / "demo" / "handlers.py")])
def test_serves_no_files_outside_the_app(url, path):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/file={path}", timeout=10)
    assert info.value.code in (403, 404)
