"""The demo in a real browser (Debian chromium driven by the playwright Python package).

Launches ``python app.py --tiny`` on a free port, uploads a canvas, paints a stroke on the editor,
types a prompt, ticks the baseline comparison, clicks Generate and checks that the result differs from
the canvas only around the stroke; then paints a second stroke on the written-back canvas and edits
again (the editor keeps working after a write-back). Saves screenshots to runs/screenshots/.

Skips cleanly when chromium or playwright is missing. Never run ``playwright install``: it downloads
a browser; install ``chromium`` with apt and ``pip install playwright`` instead.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "runs" / "screenshots"
CHROMIUM = os.environ.get("LAZYDIFF_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--disable-gpu"]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sync_playwright():
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright as sp
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    return sp


def _serve(args, env, log: Path, startup_s: float = 180):
    """Start ``app.py ARGS`` on a free port; yield its URL until the fixture ends."""
    port = _free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "app.py", *args, "--port", str(port)], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + startup_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"app.py did not start in time:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def app_url(sync_playwright, tmp_path_factory):
    env = dict(os.environ, LAZYDIFF_TINY="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    yield from _serve(["--tiny"], env, tmp_path_factory.mktemp("app") / "app.log")


def _canvas(path: Path, size: int = 128) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 140)], -1).astype(np.uint8)
    img[10:40, 10:40] = (20, 20, 20)
    img[90:120, 80:115] = (250, 225, 30)
    PIL.Image.fromarray(img).save(path)
    return img


def _stroke(page, stage, dx0, dy0, dx1, dy1, n=20):
    bb = stage.bounding_box()
    cx, cy = bb["x"] + bb["width"] / 2, bb["y"] + bb["height"] / 2
    page.mouse.move(cx + dx0, cy + dy0)
    page.mouse.down()
    for i in range(1, n + 1):
        page.mouse.move(cx + dx0 + (dx1 - dx0) * i / n, cy + dy0 + (dy1 - dy0) * i / n)
    page.mouse.up()


def _zoom(page) -> float:
    text = page.locator("#text-editor").inner_text()
    m = re.search(r"(\d+)%", text)
    return int(m.group(1)) / 100 if m else 1.0


def _result(page) -> np.ndarray:
    src = page.locator("#text-result img").first.get_attribute("src")
    return np.asarray(PIL.Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def _wait_history(page, step: int, timeout=90_000):
    page.wait_for_function(f"document.querySelector('#text-history').innerText.includes('step {step} of')",
                           timeout=timeout)


@contextlib.contextmanager
def _page(sync_playwright, url: str, ready: str):
    """A headless Chromium page on ``url`` once ``ready`` (a selector) is there; closed afterwards."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1150})
            page.goto(url)
            page.wait_for_selector(ready, timeout=60_000)
            yield page
        finally:
            browser.close()


def test_paint_prompt_generate_in_chromium(sync_playwright, app_url, tmp_path):
    img = _canvas(tmp_path / "canvas.png")
    h, w = img.shape[:2]
    with _page(sync_playwright, app_url, "#text-editor") as page:
        assert "random-weight test model" in page.locator("#ld-banner").inner_text()

        page.locator("#text-editor input[type=file]").first.set_input_files(str(tmp_path / "canvas.png"))
        page.wait_for_function("document.querySelector('#text-editor').innerText.match(/\\d+%/) && "
                               "!document.querySelector('#text-editor').innerText.includes('Upload an image')",
                               timeout=30_000)
        page.wait_for_timeout(1500)
        stage = page.locator("#text-editor .pixi-target").first
        zoom = _zoom(page)
        half = 40  # screen pixels either side of the stage's centre
        _stroke(page, stage, -half, 0, half, 0)
        page.wait_for_timeout(500)
        page.locator("#text-prompt textarea").fill("a small red circle")
        page.locator("#text-compare input[type=checkbox]").check()
        page.locator("#text-generate").click()
        _wait_history(page, 2)
        page.wait_for_selector("#text-cmp-stats .ld-kpi", timeout=30_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(SHOTS / "demo_text_edit.png"), full_page=True)

        res = _result(page)
        assert res.shape == img.shape
        changed = (res != img).any(axis=2)
        assert changed.any(), "the edit changed nothing"
        ys, xs = np.nonzero(changed)
        # Everything that changed lies in a band around the stroke (its half-length, the brush
        # radius and a margin for the stroke's round caps and the token grid).
        brush, margin = 10, 6
        rx = half / zoom + brush / 2 + margin
        ry = brush / 2 + margin
        assert np.abs(xs - w / 2).max() <= rx and np.abs(ys - h / 2).max() <= ry, (
            f"changes outside the painted area: x {xs.min()}..{xs.max()}, y {ys.min()}..{ys.max()}, "
            f"zoom {zoom}")
        assert changed.mean() < 0.25
        stats = page.locator("#text-stats").inner_text()
        assert "tokens denoised" in stats and "Denoising" in stats
        assert "speedup" in page.locator("#text-cmp-stats").inner_text()

        # The result became the canvas; a new stroke on it gives a second edit.
        page.wait_for_timeout(3000)
        _stroke(page, stage, 0, -half, 0, half)
        page.wait_for_timeout(500)
        page.locator("#text-compare input[type=checkbox]").uncheck()
        page.locator("#text-generate").click()
        _wait_history(page, 3)
        res2 = _result(page)
        changed2 = (res2 != res).any(axis=2)
        ys, xs = np.nonzero(changed2)
        assert changed2.any() and np.abs(xs - w / 2).max() <= ry + 2 and np.abs(ys - h / 2).max() <= rx + 2
        page.locator("#text-undo").click()
        page.wait_for_function("document.querySelector('#text-history').innerText.includes('step 2 of 3')",
                               timeout=30_000)
        page.wait_for_timeout(2000)  # the canvas (and the undone edit's mask) reach the editor after the history
        page.screenshot(path=str(SHOTS / "demo_after_undo.png"), full_page=True)

        # The sketch tab, still empty, takes this tab's canvas when it is opened.
        page.get_by_role("tab", name="Sketch-guided edit").click()
        page.wait_for_function("document.querySelector('#sketch-editor').innerText.match(/\\d+%/) && "
                               "!document.querySelector('#sketch-editor').innerText.includes('Upload an image')",
                               timeout=30_000)


@pytest.fixture(scope="module")
def shipped_app_url(sync_playwright, tmp_path_factory):
    """app.py with the shipped ShapesWorld models (what `python app.py` serves)."""
    if not (REPO / "data" / "models" / "lazy").exists():
        pytest.skip("the shipped models are not in data/models")
    env = {k: v for k, v in os.environ.items() if k != "LAZYDIFF_TINY"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    yield from _serve([], env, tmp_path_factory.mktemp("app") / "app.log", startup_s=240)


def test_shipped_model_example_edit_in_chromium(sync_playwright, shipped_app_url):
    """One click on a ShapesWorld example, Generate with the baseline comparison: the shipped models
    edit inside the example's mask, and the speed panel shows both times."""
    with _page(sync_playwright, shipped_app_url, "#text-examples") as page:
        assert page.locator("#ld-banner").count() == 0  # the banner only warns about random test models
        page.locator("#text-examples img").first.click()  # (the first button is "Download All")
        page.wait_for_function("document.querySelector('#text-prompt textarea').value.length > 0", timeout=30_000)
        page.wait_for_timeout(1500)
        page.locator("#text-compare input[type=checkbox]").check()
        page.locator("#text-generate").click()
        _wait_history(page, 2, timeout=180_000)
        page.wait_for_selector("#text-cmp-stats .ld-kpi", timeout=60_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(SHOTS / "demo_shipped_example.png"), full_page=True)
        stats = page.locator("#text-stats").inner_text()
        assert "tokens denoised" in stats
        assert "speedup" in page.locator("#text-cmp-stats").inner_text()
