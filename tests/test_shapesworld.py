"""ShapesWorld: determinism, exact ground truth, coverage of the vocabulary, edit tasks, splits."""

import itertools

import numpy as np
import pytest

from lazydiff.shapesworld import (
    COLORS,
    EMPTY_PROMPT,
    INTENTS,
    KINDS,
    MAX_RATIO,
    MIN_CONTRAST,
    MIN_RATIO,
    MIN_VISIBLE,
    SHAPES,
    SIZES,
    all_classes,
    class_prompts,
    iter_scenes,
    make_split,
    make_task,
    object_caption,
    render_object,
    render_scene,
    scene_batch,
    task_to_pil,
)
from lazydiff.shapesworld.__main__ import main as cli_main

N_SCENES = 400
N_TASKS = 240


@pytest.fixture(scope="module")
def scenes():
    return list(iter_scenes(0, N_SCENES))


@pytest.fixture(scope="module")
def tasks():
    return [make_task(s) for s in range(1000, 1000 + N_TASKS)]


def _task_arrays(t):
    return [t.canvas, t.mask, t.target, t.background]


# ------------------------------------------------------------------------------ scenes


def test_scene_determinism():
    a, b, c = render_scene(7), render_scene(7), render_scene(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.background, b.background)
    assert a.caption == b.caption
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, c.image)
    # iteration and batching give the very same scenes
    it = list(iter_scenes(7, 2))
    assert np.array_equal(it[0].image, a.image) and np.array_equal(it[1].image, c.image)
    imgs, caps = scene_batch([7, 8])
    assert imgs.shape == (2, 128, 128, 3) and imgs.dtype == np.uint8
    assert np.array_equal(imgs[1], c.image) and caps == [a.caption, c.caption]


def test_scene_ground_truth_is_exact(scenes):
    for sc in scenes:
        assert sc.image.shape == sc.background.shape == (128, 128, 3)
        assert sc.image.dtype == sc.background.dtype == np.uint8
        assert 1 <= len(sc.objects) <= 4
        covered = np.zeros((128, 128), bool)
        for ob in sc.objects:
            assert ob.mask.dtype == bool and ob.mask.any()
            assert not (ob.mask & covered).any(), "visible masks must not overlap"
            assert not (ob.mask & ~ob.full_mask).any()
            assert ob.mask.sum() >= MIN_VISIBLE * ob.full_mask.sum()
            assert (sc.image[ob.mask] == COLORS[ob.color]).all()
            x0, y0, x1, y1 = ob.bbox
            assert ob.full_mask[y0:y1, x0:x1].sum() == ob.full_mask.sum()
            # never the colour of the background under it
            d = np.linalg.norm(sc.background[ob.full_mask].astype(float) - COLORS[ob.color], axis=1)
            assert d.min() >= MIN_CONTRAST
            covered |= ob.mask
        assert np.array_equal(sc.image[~covered], sc.background[~covered])


def test_vocabulary_is_reachable(scenes):
    assert len(SHAPES) >= 6 and len(COLORS) == 8 and SIZES == ("small", "large")
    seen = {(ob.shape, ob.color, ob.size) for sc in scenes for ob in sc.objects}
    assert seen == set(itertools.product(SHAPES, COLORS, SIZES))
    kinds = {sc.background_kind for sc in scenes}
    assert kinds == {"solid", "linear", "radial", "stripes", "checker", "dots"}
    assert len({c for sc in scenes for c in sc.background_colors}) >= 10


def test_sizes_are_separable(scenes):
    small = [ob.diameter for sc in scenes for ob in sc.objects if ob.size == "small"]
    large = [ob.diameter for sc in scenes for ob in sc.objects if ob.size == "large"]
    assert 14 <= min(small) and max(small) < min(large) - 8 and max(large) <= 50


def test_captions(scenes):
    for sc in scenes[:50]:
        for ob, cap in zip(sc.objects, sc.object_captions):
            assert cap == ob.caption == f"a {ob.size} {ob.color} {ob.shape}"
            assert cap in sc.caption
        assert sc.caption.endswith(" on " + sc.background_caption)
        assert sc.background_caption.endswith("background") or "dots" in sc.background_caption
        assert all(name in sc.background_caption for name in sc.background_colors)
    assert object_caption("star", "green", "small") == "a small green star"
    assert object_caption("circle", "orange") == "an orange circle"


def test_render_object_enumerates_classes():
    classes = all_classes()
    assert len(classes) == len(set(classes)) == len(SHAPES) * len(COLORS)
    assert class_prompts("small")[0] == object_caption(*classes[0], "small")
    for i, ((shape, color), size) in enumerate(itertools.product(classes, SIZES)):
        sc = render_object(shape, color, size, seed=i)
        (ob,) = sc.objects
        assert (ob.shape, ob.color, ob.size) == (shape, color, size)
        assert (sc.image[ob.mask] == COLORS[color]).all()
        assert np.array_equal(sc.image[~ob.mask], sc.background[~ob.mask])
    with pytest.raises(ValueError):
        render_object("dodecahedron", "red", "small")


@pytest.mark.parametrize("size", [(96, 160), (160, 96), 256, (64, 64)])
def test_other_canvas_sizes(size):
    h, w = (size, size) if isinstance(size, int) else size
    for seed in range(5):
        sc = render_scene(seed, size)
        assert sc.image.shape == (h, w, 3) and sc.objects
        for ob in sc.objects:
            assert ob.mask.shape == (h, w) and (sc.image[ob.mask] == COLORS[ob.color]).all()
        t = make_task(seed, size)
        assert t.canvas.shape == t.target.shape == (h, w, 3) and t.mask.shape == (h, w)
        assert MIN_RATIO <= t.mask_ratio <= MAX_RATIO
        assert np.array_equal(t.canvas[~t.mask], t.target[~t.mask])


# ------------------------------------------------------------------------------ tasks


def test_task_determinism():
    a, b, c = make_task(5), make_task(5), make_task(6)
    assert all(np.array_equal(x, y) for x, y in zip(_task_arrays(a), _task_arrays(b)))
    assert (a.prompt, a.kind, a.intent, a.mask_ratio) == (b.prompt, b.kind, b.intent, b.mask_ratio)
    assert not all(np.array_equal(x, y) for x, y in zip(_task_arrays(a), _task_arrays(c)))
    # a task starts from the scene with the same seed
    assert np.array_equal(a.background, render_scene(5).background)


def test_task_ground_truth(tasks):
    for t in tasks:
        assert t.mask.dtype == bool and t.canvas.dtype == t.target.dtype == np.uint8
        assert t.mask_ratio == pytest.approx(t.mask.mean())
        assert MIN_RATIO <= t.mask_ratio <= MAX_RATIO
        assert np.array_equal(t.canvas[~t.mask], t.target[~t.mask]), "edit leaks outside the mask"
        hole_bg = t.mask.copy()
        if t.new_object is not None:
            ob = t.new_object
            assert not (ob.full_mask & ~t.mask).any(), "the prompted object must fit in the mask"
            assert (t.target[ob.full_mask] == COLORS[ob.color]).all()
            assert (t.shape, t.color, t.size) == (ob.shape, ob.color, ob.size)
            assert t.prompt == object_caption(ob.shape, ob.color, ob.size)
            d = np.linalg.norm(t.background[ob.full_mask].astype(float) - COLORS[ob.color], axis=1)
            assert d.min() >= MIN_CONTRAST
            hole_bg &= ~ob.full_mask
        else:
            assert t.intent == "remove" and t.shape is t.color is t.size is None
            assert t.prompt in (EMPTY_PROMPT, _background_caption(t.seed))
        # inside the hole, apart from the new object, the truth is the analytic background
        assert np.array_equal(t.target[hole_bg], t.background[hole_bg])
        if t.intent == "insert":
            assert t.removed_object is None
            assert np.array_equal(t.canvas[t.mask], t.background[t.mask])
        else:
            ob = t.removed_object
            assert not (ob.full_mask & ~t.mask).any()
            assert (t.canvas[ob.full_mask] == COLORS[ob.color]).all()


def _background_caption(seed):
    return render_scene(seed).background_caption


def test_task_distribution(tasks):
    ratios = np.array([t.mask_ratio for t in tasks])
    assert (ratios < 0.05).any() and (ratios > 0.4).any()
    assert 0.05 < np.median(ratios) < 0.25  # typical edits are small
    assert {t.kind for t in tasks} == set(KINDS)
    assert {t.intent for t in tasks} == set(INTENTS)
    for kind in ("box", "brush"):
        assert max(t.mask_ratio for t in tasks if t.kind == kind) > 0.35
    boxes = [t for t in tasks if t.kind == "box"]
    for t in boxes:  # a box is a filled axis-aligned rectangle
        rows, cols = np.flatnonzero(t.mask.any(1)), np.flatnonzero(t.mask.any(0))
        assert t.mask.sum() == len(rows) * len(cols)
    prompts = {t.prompt for t in tasks}
    assert EMPTY_PROMPT in prompts and any(p.endswith("background") and p != EMPTY_PROMPT for p in prompts)


def test_forced_kind_and_intent():
    for kind, intent in itertools.product(KINDS, INTENTS):
        t = make_task(42, kind=kind, intent=intent)
        assert (t.kind, t.intent) == (kind, intent)
        assert np.array_equal(t.background, make_task(42).background)
    with pytest.raises(ValueError):
        make_task(0, kind="lasso")


def test_task_to_pil():
    canvas, mask, target = task_to_pil(make_task(3))
    assert canvas.mode == target.mode == "RGB" and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


# ------------------------------------------------------------------------------ splits


def test_splits():
    train, test, val = make_split("train"), make_split("test"), make_split("val")
    assert len(test) == 500 and list(test[:2]) == [10_000_000, 10_000_001]
    assert len(val) == 500
    for a, b in [(train, test), (train, val), (val, test)]:
        assert max(a.start, b.start) >= min(a.stop, b.stop), "splits overlap"
    with pytest.raises(ValueError):
        make_split("dev")


# (prompt, kind, intent, mask pixels, canvas sum, target sum) of the first test tasks at 128x128
FROZEN_TEST_TASKS = [
    ("a large purple star", "object", "insert", 891, 7670742, 7604407),
    ("a large red square", "box", "insert", 4088, 6266699, 6153443),
    ("a small blue square", "object", "insert", 1812, 5943210, 5928770),
    ("a large blue heart", "object", "replace", 1297, 7906320, 7805925),
    ("empty background", "object", "remove", 1228, 6033333, 6044243),
]


def test_test_split_is_frozen():
    """The held-out tasks must never change silently, or results on them stop comparing. Sums
    get a small tolerance for last-bit float differences between CPUs. If the generator is
    changed on purpose, update these values and say so wherever results are reported."""
    for seed, (prompt, kind, intent, n_mask, s_canvas, s_target) in zip(make_split("test"), FROZEN_TEST_TASKS):
        t = make_task(seed)
        assert (t.prompt, t.kind, t.intent) == (prompt, kind, intent)
        assert abs(int(t.mask.sum()) - n_mask) <= 0.01 * n_mask
        assert abs(int(t.canvas.sum()) - s_canvas) <= 2000  # a few pixels
        assert abs(int(t.target.sum()) - s_target) <= 2000


def test_cli_preview(tmp_path, capsys):
    cli_main(["preview", "--out", str(tmp_path), "--n", "2", "--scale", "1"])
    assert (tmp_path / "scenes.png").stat().st_size > 0 and (tmp_path / "tasks.png").stat().st_size > 0
    cli_main(["bench", "--n", "20", "--tasks", "2"])
    assert "scenes/s" not in capsys.readouterr().err
