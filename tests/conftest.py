"""Shared fixtures: deterministic canvases and masks, and tiny random pipelines (CPU, offline)."""
import os

import numpy as np
import PIL.Image
import pytest


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread():
    """The tiny test models are far faster on one thread (2-thread sync overhead dominates tensors this
    small, 10-30x worse on a busy 2-core machine). Set OMP_NUM_THREADS to choose otherwise."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_canvas():
    """make_canvas(width, height, mode="RGB", seed=0) -> a PIL image with smooth structure plus noise."""

    def make(width, height, mode="RGB", seed=0):
        rng = np.random.RandomState(seed)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([40 + 160 * xx / max(width - 1, 1), 40 + 160 * yy / max(height - 1, 1),
                         np.full_like(xx, 120.0)], -1)
        rgb = np.clip(base + rng.randint(-30, 31, base.shape), 0, 255).astype(np.uint8)
        img = PIL.Image.fromarray(rgb, "RGB")
        if mode == "RGB":
            return img
        if mode in ("RGBA", "LA"):
            img = img.convert(mode)
            arr = np.asarray(img).copy()
            arr[..., -1] = rng.randint(0, 256, arr.shape[:2])  # non-trivial alpha, must survive untouched
            return PIL.Image.fromarray(arr, mode)
        return img.convert(mode)

    return make


@pytest.fixture(scope="session")
def make_mask():
    """make_mask(width, height, box=(x0, y0, x1, y1)) -> a binary "L" mask (255 = edit) of that box."""

    def make(width, height, box):
        arr = np.zeros((height, width), np.uint8)
        x0, y0, x1, y1 = box
        arr[y0:y1, x0:x1] = 255
        return PIL.Image.fromarray(arr, "L")

    return make


@pytest.fixture(autouse=True)
def _fresh_pipeline_caches(request):
    """The module-scoped pipelines are shared between tests: empty their caches (prompt embeddings,
    canvas latents, context) before each test so that no result depends on the order of tests."""
    for name in ("lazy_pipe", "regen_pipe", "crop_pipe"):
        if name in request.fixturenames:
            pipe = request.getfixturevalue(name)
            if hasattr(pipe, "clear_caches"):
                pipe.clear_caches()
    yield


@pytest.fixture(scope="module")
def lazy_pipe():
    from lazydiff.testing import tiny_lazy_pipeline

    return tiny_lazy_pipeline(seed=0)


@pytest.fixture(scope="module")
def regen_pipe():
    from lazydiff.testing import tiny_regenerate_pipeline

    return tiny_regenerate_pipeline(seed=0)


@pytest.fixture(scope="module")
def crop_pipe():
    from lazydiff.testing import tiny_regenerate_pipeline

    return tiny_regenerate_pipeline(seed=0, crop=True)
