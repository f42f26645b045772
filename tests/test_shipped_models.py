"""The models shipped in data/models: they load through `load_default`, edit a held-out task without
touching pixels outside the mask, and ShapesCLIP recognises real ShapesWorld objects."""
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from lazydiff import load_default
from lazydiff.shapesworld import make_task

MODELS = Path(__file__).resolve().parent.parent / "data" / "models"
pytestmark = pytest.mark.skipif(not (MODELS / "lazy").exists(), reason="data/models not present")


def test_shipped_models_fit_the_size_budget_and_are_safetensors():
    files = [p for p in MODELS.rglob("*") if p.is_file() and "training" not in p.parts]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 60 * 2 ** 20
    for kind in ("lazy", "regenerate-image"):
        sched = json.loads((MODELS / kind / "scheduler" / "scheduler_config.json").read_text())
        assert sched["clip_sample"] is False  # clipping x0 to [-1, 1] destroys unit-variance latents


@pytest.mark.parametrize("folder", ["autoencoder", "lazy", "regenerate-image", "shapes-clip"])
def test_every_shipped_model_has_a_model_card(folder):
    card = (MODELS / folder / "README.md").read_text()
    assert len(card) > 500, f"{folder}/README.md is (almost) empty"
    for what in ("python -m lazydiff.train", "steps", "wall time", "H200"):
        assert what in card, f"{folder}/README.md does not state {what!r}"
    logs = list((MODELS / folder / "training").rglob("train_info.json"))
    assert logs, f"{folder}/training/ has no train_info.json"
    for info in logs:  # the card states each stage's steps as recorded by the run
        assert f"{json.loads(info.read_text())['steps']}" in card, info


@pytest.mark.parametrize("kind", ["lazy", "regenerate-image", "regenerate-crop"])
def test_load_default_edits_a_held_out_task(kind):
    pipe = load_default(kind)
    pipe.set_progress_bar_config(disable=True)
    task = make_task(10_000_002, size=(128, 128))          # test split: "a small blue square", object mask
    image, mask = PIL.Image.fromarray(task.canvas), PIL.Image.fromarray((task.mask * 255).astype(np.uint8))
    out = pipe(prompt=task.prompt, image=image, mask_image=mask, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0)).images[0]
    res = np.asarray(out)
    assert res.shape == task.canvas.shape
    outside = task.mask < 0.5
    assert np.array_equal(res[outside], task.canvas[outside])
    assert np.abs(res[~outside].astype(int) - task.canvas[~outside]).mean() > 5  # the hole was repainted


def test_shapes_clip_recognises_real_objects():
    from eval.metrics import ShapesZeroShot, crop_resize, hole_crop_box, load_clip_folder, to_batch

    torch.manual_seed(0)
    bundle = load_clip_folder(MODELS / "shapes-clip")
    zs = ShapesZeroShot(bundle)
    crops, labels = [], []
    for seed in range(20_000_000, 20_000_048):
        t = make_task(seed, size=(128, 128), kind="object", intent="insert")
        crops.append(crop_resize(t.target, hole_crop_box(t.mask, 0.2), bundle.image_size))
        labels.append((t.shape, t.color))
    acc = np.mean([p == y for p, y in zip(zs.predict(to_batch(crops)), labels)])
    assert acc >= 0.6, acc   # measured 35/48 = 0.73 for the shipped model; chance is 1/48


def test_edit_cli_with_a_scheduler_and_a_bad_input(tmp_path, capsys):
    from lazydiff.__main__ import main

    task = make_task(10_000_002, size=(128, 128))
    PIL.Image.fromarray(task.canvas).save(tmp_path / "in.png")
    PIL.Image.fromarray((task.mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    common = ["edit", "--image", str(tmp_path / "in.png"), "--prompt", task.prompt, "--steps", "3"]
    main(common + ["--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.png"),
                   "--scheduler", "dpm-solver++"])
    out = np.asarray(PIL.Image.open(tmp_path / "out.png"))
    assert np.array_equal(out[task.mask < 0.5], task.canvas[task.mask < 0.5]) and "hole tokens" in capsys.readouterr().out
    # --num-images: variations in one batch, named -0, -1; image i is the one --seed i gives alone
    main(common + ["--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "var.png"), "--num-images", "2"])
    main(common + ["--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "seed1.png"), "--seed", "1"])
    var1, seed1 = (np.asarray(PIL.Image.open(tmp_path / f), int) for f in ("var-1.png", "seed1.png"))
    assert (tmp_path / "var-0.png").exists() and np.abs(var1 - seed1).max() <= 2 and "var-0.png, " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--num-images must be >= 1"):
        main(common + ["--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "n0.png"), "--num-images", "0"])
    # a canvas over 4x the training side (a phone photo): edited at 512 px, the hole pasted back at full size
    big = np.asarray(PIL.Image.fromarray(task.canvas).resize((1024, 768), PIL.Image.BICUBIC))
    big_rgba = np.dstack([big, np.full(big.shape[:2], 128, np.uint8)])
    big_mask = np.zeros((768, 1024), np.uint8)
    big_mask[300:420, 400:560] = 255
    PIL.Image.fromarray(big_rgba, "RGBA").save(tmp_path / "big.png")
    PIL.Image.fromarray(big_mask).save(tmp_path / "big_mask.png")
    capsys.readouterr()
    main(["edit", "--image", str(tmp_path / "big.png"), "--mask", str(tmp_path / "big_mask.png"), "--prompt",
          task.prompt, "--steps", "2", "--out", str(tmp_path / "big_out.png")])
    assert "edited at 512x384, the hole pasted back at full size" in capsys.readouterr().out
    out_big = np.asarray(PIL.Image.open(tmp_path / "big_out.png"))
    hole = big_mask > 0
    assert out_big.shape == (768, 1024, 4) and np.array_equal(out_big[~hole], big_rgba[~hole])
    assert (out_big[hole][:, 3] == 255).all() and (out_big[hole][:, :3] != big[hole]).any()
    PIL.Image.new("L", (64, 64), 255).save(tmp_path / "small.png")   # a mask of another size: a clear error
    with pytest.raises(SystemExit, match="error: .*size"):
        main(common + ["--mask", str(tmp_path / "small.png"), "--out", str(tmp_path / "bad.png")])
    assert not (tmp_path / "bad.png").exists()
    rgba = np.dstack([task.canvas, np.full(task.canvas.shape[:2], 255, np.uint8)])
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "in_rgba.png")  # a transparent canvas to a JPEG
    capsys.readouterr()
    main(["edit", "--image", str(tmp_path / "in_rgba.png"), "--prompt", task.prompt, "--steps", "1",
          "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.jpg")])
    assert PIL.Image.open(tmp_path / "out.jpg").mode == "RGB" and "transparency dropped" in capsys.readouterr().out


def test_edit_cli_rejects_bad_arguments_before_loading_a_model(tmp_path, monkeypatch):
    import lazydiff.defaults
    from lazydiff.__main__ import main

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded for a command that cannot succeed")

    monkeypatch.setattr(lazydiff.defaults, "load_pipeline", no_loading)
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    ok = ["edit", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "in.png"), "--prompt", "x"]
    for extra, message in [(["--out", str(tmp_path / "missing" / "o.png")], "--out: folder .* does not exist"),
                           (["--out", str(tmp_path / "o")], "--out: .* needs an image file extension"),
                           (["--out", str(tmp_path / "o.png"), "--sketch", str(tmp_path / "no.png")],
                            "--sketch: no such file"),
                           (["--out", str(tmp_path / "in.png")], "--out .* is the input canvas"),
                           (["--out", str(tmp_path / "o.png"), "--strength", "0.5"], "--strength applies to sketch"),
                           (["--out", str(tmp_path / "o.png"), "--device", "gpu"], "--device: 'gpu' is not a device"),
                           (["--out", str(tmp_path / "o.png"), "--max-side", "-1"], "--max-side must be 0 .* or at least 32"),
                           (["--out", str(tmp_path / "o.png"), "--device", "cpu", "--cuda-graphs"],
                            "--cuda-graphs needs a CUDA device")]:
        with pytest.raises(SystemExit, match=message):
            main(ok + extra)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(SystemExit, match="--mask: .* is not an image"):
        main(ok[:3] + ["--mask", str(tmp_path / "text.png"), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert not (tmp_path / "o.png").exists()


def test_load_pipeline_names_folders_and_exports(tmp_path):
    from lazydiff import load_pipeline

    with pytest.raises(ValueError, match="neither a shipped model nor a folder.*training export"):
        load_pipeline("defualt")
    with pytest.raises(ValueError, match="no model_index.json and no decoder/"):
        load_pipeline(str(tmp_path))
    # data/models/lazy is laid out as `python -m lazydiff.train` exports: it loads as a folder, with the
    # shipped autoencoder, and edits exactly as load_default("lazy")
    task = make_task(10_000_002, size=(128, 128))
    image, mask = PIL.Image.fromarray(task.canvas), PIL.Image.fromarray((task.mask * 255).astype(np.uint8))
    outs = []
    for pipe in (load_pipeline(str(MODELS / "lazy"), device="cpu"), load_pipeline("default", device="cpu")):
        assert type(pipe).__name__ == "LazyDiffusionPipeline"
        pipe.set_progress_bar_config(disable=True)
        outs.append(np.asarray(pipe(task.prompt, image, mask, num_inference_steps=2,
                                    generator=torch.Generator().manual_seed(0)).images[0]))
    assert np.array_equal(outs[0], outs[1])
    assert type(load_pipeline(str(MODELS / "regenerate-image"), device="cpu", crop=True)).__name__ == "RegenerateCropPipeline"
