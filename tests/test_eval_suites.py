"""Suite files and method names are validated strictly, before any long work starts."""
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from eval.methods import MethodError, register_method, resolve_methods, unregister_method
from eval.suites import SuiteError, load_suite, suite_from_dict

ROOT = Path(__file__).resolve().parent.parent
SUITES = ROOT / "data" / "suites"


def test_shipped_suites_load():
    s = load_suite(str(SUITES / "shapes.yaml"))
    assert s.dataset == "shapesworld" and s.num_samples == 500 and s.split == "test"
    assert s.methods == ["lazy", "regenerate-image", "regenerate-crop"]
    first = s.samples(limit=3)
    assert [x.id for x in first] == ["sw10000000", "sw10000001", "sw10000002"]
    assert first[0].image.shape == (128, 128, 3) and first[0].mask.dtype == bool
    v = load_suite(str(SUITES / "shapes-val.yaml"))  # validation edits: disjoint from the test split
    assert v.split == "val" and v.num_samples == 200 and v.steps == s.steps and v.guidance == s.guidance
    assert not {x.id for x in v.samples(limit=20)} & {x.id for x in s.samples(limit=20)}
    big = load_suite(str(SUITES / "shapes-large-holes.yaml"))  # large holes, seeds in no split, no training stream
    from lazydiff.shapesworld.tasks import SPLITS
    from lazydiff.train.data import TRAIN_SEED_BASE

    seeds = big.seed_list()
    assert not any(set(seeds) & set(r) for r in SPLITS.values()) and max(seeds) < TRAIN_SEED_BASE
    assert big.steps == s.steps and big.guidance == s.guidance and big.crop_margin == s.crop_margin
    few = big.samples(limit=5)
    assert all(x.meta["mask_ratio"] >= 0.35 and x.meta["object_edit"] for x in few)
    f = load_suite(str(SUITES / "folder_example.yaml"))
    samples = f.samples()
    assert len(samples) == 4 and samples[0].image.shape == (128, 128, 3)
    assert samples[0].reference.shape == samples[0].image.shape and samples[0].mask.any()


def test_unknown_key_names_key_and_allowed_ones():
    with pytest.raises(SuiteError) as e:
        suite_from_dict({"dataset": "shapesworld", "stpes": 10}, "s.yaml")
    msg = str(e.value)
    assert "'stpes'" in msg and "did you mean 'steps'? Allowed keys" in msg and "mask_kinds" in msg
    with pytest.raises(SuiteError, match="applies to dataset: folder only"):
        suite_from_dict({"dataset": "shapesworld", "manifest": "m.jsonl"}, "s.yaml")
    with pytest.raises(SuiteError, match="missing required key 'dataset'"):
        suite_from_dict({"steps": 3}, "s.yaml")


@pytest.mark.parametrize("raw, needle", [
    ({"dataset": "shapesworl"}, "did you mean 'shapesworld'"),
    ({"dataset": "shapesworld", "mask_kinds": ["boxx"]}, "did you mean 'box'"),
    ({"dataset": "shapesworld", "intents": ["delete"]}, "unknown value 'delete'"),
    ({"dataset": "shapesworld", "steps": 0}, "steps must be >= 1"),
    ({"dataset": "shapesworld", "guidance": "high"}, "guidance must be a number"),
    ({"dataset": "shapesworld", "split": "tset"}, "did you mean 'test'"),
    ({"dataset": "shapesworld", "mask_ratio": [0.5, 0.1]}, "mask_ratio"),
    ({"dataset": "shapesworld", "fid_backbone": "inceptoin"}, "did you mean 'inception'"),
    ({"dataset": "shapesworld", "blend": "soft"}, "blend must be one of"),
    ({"dataset": "folder", "manifest": "m.jsonl"}, "needs 'root'"),
])
def test_bad_values(raw, needle):
    with pytest.raises(SuiteError, match=needle):
        suite_from_dict(raw, "s.yaml")


def test_filters_and_seeds():
    s = suite_from_dict({"dataset": "shapesworld", "seeds": {"start": 10_000_000, "count": 40}, "size": 64,
                         "mask_kinds": ["box"], "intents": ["insert", "replace"]}, "s.yaml")
    got = s.samples()
    assert got and all(x.meta["kind"] == "box" and x.meta["intent"] in ("insert", "replace") for x in got)
    assert [x.index for x in got] == list(range(len(got)))
    s = suite_from_dict({"dataset": "shapesworld", "seeds": [10_000_000], "num_samples": 5}, "s.yaml")
    with pytest.raises(SuiteError, match="only 1 of the 1 seeds"):
        s.samples()


def test_method_names_suggest_fixes():
    with pytest.raises(MethodError) as e:
        resolve_methods(["lazzy", "regenerate-imag"], check=False)
    assert "did you mean 'lazy'" in str(e.value) and "'regenerate-image'" in str(e.value)
    with pytest.raises(MethodError, match="given twice"):
        resolve_methods(["tiny-lazy", "tiny-lazy"])
    with pytest.raises(MethodError, match="does not exist"):
        resolve_methods(["diffusers-inpaint:/nonexistent/sd2"])
    with pytest.raises(MethodError) as e:  # a path that is not there: say so, not "unknown method"
        resolve_methods(["/nonexistent/model-export"], check=False)
    assert "method folder /nonexistent/model-export does not exist" in str(e.value)
    with pytest.raises(MethodError) as e:
        resolve_methods(["lazzy"], check=False)
    assert "'tiny-lazy'? Known methods" in str(e.value) and "?." not in str(e.value)
    register_method("my-method", lambda device, dtype: None, "test")
    try:
        assert resolve_methods(["my-method"])[0].label == "my-method"
    finally:
        unregister_method("my-method")


def _copy_example(tmp_path):
    dst = tmp_path / "folder"
    shutil.copytree(SUITES / "folder_example", dst)
    return dst


def _suite(tmp_path, root, manifest="manifest.jsonl"):
    p = tmp_path / "suite.yaml"
    p.write_text(f"dataset: folder\nroot: {root}\nmanifest: {manifest}\nfid_backbone: shapes-clip\n"
                 "clip_backbone: shapes-clip\n")
    return load_suite(str(p))


def test_folder_errors_list_every_bad_file(tmp_path):
    root = _copy_example(tmp_path)
    (root / "images" / "edit01.png").write_bytes(b"not a png at all")
    PIL.Image.new("L", (64, 64), 255).save(root / "masks" / "edit02.png")   # wrong size
    rows = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    rows.append({"image": "images/missing.png", "mask": "masks/edit00.png", "prompt": "x"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SuiteError) as e:
        _suite(tmp_path, root).samples()
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "edit01.png is not a readable image" in msg
    assert "masks/edit02.png is 64x64 but image" in msg
    assert "missing.png does not exist" in msg


def test_folder_manifest_csv_and_column_errors(tmp_path):
    root = _copy_example(tmp_path)
    (root / "m.csv").write_text("image,mask,prompt\nimages/edit00.png,masks/edit00.png,a red star\n")
    s = _suite(tmp_path, root, "m.csv")
    (x,) = s.samples()
    assert x.prompt == "a red star" and x.id == "edit00"
    assert np.array_equal(x.reference, x.image)    # no reference column: compare with the input
    (root / "bad.csv").write_text("image,prompt\nimages/edit00.png,a red star\n")
    with pytest.raises(SuiteError, match="missing mask"):
        _suite(tmp_path, root, "bad.csv").samples()
    (root / "bad2.jsonl").write_text('{"image": "images/edit00.png", "mask": "masks/edit00.png", "prompt": "x", '
                                     '"captoin": "y"}\n')
    with pytest.raises(SuiteError, match="unknown column"):
        _suite(tmp_path, root, "bad2.jsonl").samples()
    PIL.Image.new("L", (128, 128), 0).save(root / "masks" / "edit00.png")
    with pytest.raises(SuiteError, match="is empty"):
        _suite(tmp_path, root, "m.csv").samples()


@pytest.mark.parametrize("argv", [
    ["quality", "--suite", str(SUITES / "shapes.yaml"), "--methods", "tiny-lazy"],
    ["compare", "a", "b"],
    ["ceiling", "--suite", str(SUITES / "shapes.yaml")],
    ["loss", "--suite", str(SUITES / "shapes-val.yaml")],
    ["runtime", "--preset", "tiny"],
])
def test_out_that_is_a_file_is_refused_and_kept(tmp_path, capsys, argv):
    from eval.cli import main

    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert main(argv + ["--out", str(out)]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_every_option_with_a_default_states_it_in_its_help():
    import argparse

    from eval.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [f"{name} {a.option_strings[0]}" for name, p in sub.choices.items() for a in p._actions
              if a.option_strings and a.default not in (None, argparse.SUPPRESS) and a.default is not False
              and "default" not in (a.help or "")]
    assert silent == []


def test_folder_suite_with_random_masks_for_images_that_have_none(tmp_path):
    """`masks: random`: a box or brush mask per row from the suite's seed, at each image's size; the same
    masks on every load, other ones with another seed; a mask column is refused (which masks would count?)."""
    rows = []
    for i, (w, h) in enumerate([(40, 30), (32, 48), (36, 36)]):
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": f"photo {i}"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"dataset": "folder", "root": str(tmp_path), "manifest": "m.jsonl", "masks": "random", "seed": 3}
    samples = suite_from_dict(raw, "s.yaml").samples()
    assert [s.mask.shape for s in samples] == [(30, 40), (48, 32), (36, 36)]
    assert all(0.02 <= s.mask.mean() <= 0.6 for s in samples) and samples[0].meta["mask_path"] == "random"
    again = suite_from_dict(raw, "s.yaml").samples()
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(samples, again))
    other = suite_from_dict(dict(raw, seed=4), "s.yaml").samples()
    assert not all(np.array_equal(a.mask, b.mask) for a, b in zip(samples, other))
    PIL.Image.new("L", (40, 30), 255).save(tmp_path / "mask.png")
    (tmp_path / "m.jsonl").write_text(json.dumps(dict(rows[0], mask="mask.png")) + "\n")
    with pytest.raises(SuiteError, match="a mask column with `masks: random`"):
        suite_from_dict(raw, "s.yaml").samples()
    with pytest.raises(SuiteError, match="masks must be one of \\['file', 'random'\\]"):
        suite_from_dict(dict(raw, masks="rnd"), "s.yaml")
