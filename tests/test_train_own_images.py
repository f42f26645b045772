"""Training on your own images (`data:`): manifests and caption folders, deterministic samples, masks kept
inside the crop, clear errors, a short run that resumes exactly, and a T5 text encoder folder."""
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from lazydiff.manifest import ManifestError
from lazydiff.train import train
from lazydiff.train.image_folder import folder_edit_batch, folder_sample, load_rows, row_for_seed

from test_train import _assert_same_tensors, _cfg, _ckpt, autoencoder_export  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "data" / "suites" / "folder_example"


def _image(path, w, h, seed):
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def photos(tmp_path):
    """Three images of different sizes, one with a mask near its right edge, in a JSON-lines manifest."""
    rows = []
    for i, (w, h) in enumerate([(80, 48), (48, 64), (40, 40)]):
        _image(tmp_path / f"p{i}.png", w, h, i)
        rows.append({"image": f"p{i}.png", "prompt": f"photo {i}"})
    mask = np.zeros((48, 80), np.uint8)
    mask[10:20, 66:76] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "m0.png")
    rows[0].update(mask="m0.png", prompt="a red ball")
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_rows_from_a_manifest_an_imagefolder_and_captions(photos, tmp_path_factory):
    rows = load_rows(str(photos))
    assert [r.prompt for r in rows] == ["a red ball", "photo 1", "photo 2"] and rows[0].mask == photos / "m0.png"
    assert load_rows(str(photos / "manifest.jsonl")) == rows   # the file itself, or the folder holding it
    hf = tmp_path_factory.mktemp("hf")   # Hugging Face imagefolder: metadata.jsonl with file_name, text
    _image(hf / "a.jpg", 32, 32, 0)
    (hf / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "a cat"}\n')
    assert [(r.image.name, r.prompt) for r in load_rows(str(hf))] == [("a.jpg", "a cat")]
    txt = tmp_path_factory.mktemp("txt")   # no manifest: images with same-named .txt captions
    _image(txt / "b.png", 32, 32, 1)
    (txt / "b.txt").write_text("a dog\n")
    _image(txt / "uncaptioned.png", 32, 32, 2)
    assert [(r.image.name, r.prompt) for r in load_rows(str(txt))] == [("b.png", "a dog")]
    # an evaluation folder suite's manifest is training data too (mask + reference per row)
    ex = load_rows(str(EXAMPLE))
    assert len(ex) == 4 and all(r.mask is not None and r.reference is not None for r in ex)


def test_samples_are_deterministic_cover_every_row_and_keep_the_mask_in_the_crop(photos):
    rows = load_rows(str(photos))
    assert sorted(row_for_seed(3, s) for s in range(30, 33)) == [0, 1, 2]   # each window of N seeds: every row once
    a, b = folder_sample(rows[0], 7, 32), folder_sample(rows[0], 7, 32)
    assert all(np.array_equal(a[k], b[k]) for k in ("canvas", "target", "mask")) and a["prompt"] == "a red ball"
    from lazydiff.manifest import load_mask
    from lazydiff.pipelines.working_size import resize_mask

    scaled = resize_mask(load_mask(photos / "m0.png"), 32, 53).sum()   # the whole 10x10 mask at 2/3: 8x8 touched
    for seed in range(20):   # 80x48 -> 53x32; the mask at x 66..76 (44..51 scaled) must stay inside the crop
        s = folder_sample(rows[0], seed, 32)
        assert s["canvas"].shape == (32, 32, 3) and s["mask"].shape == (32, 32)
        assert s["mask"].sum() == scaled, s["mask"].sum()
        assert np.array_equal(s["target"], s["canvas"])               # no reference: the image is the target
    ratios = [folder_sample(rows[1], seed, 32)["mask"].mean() for seed in range(20)]   # no mask: random ones
    assert min(ratios) >= 0.02 and max(ratios) <= 0.6 and len(set(ratios)) > 5
    batch = folder_edit_batch(np.arange(1000, 1004), 32, str(photos))
    assert batch["canvas"].shape == (4, 3, 32, 32) and batch["canvas"].dtype == torch.uint8
    assert batch["mask"].shape == (4, 1, 32, 32) and batch["mask"].dtype == torch.bool and len(batch["prompt"]) == 4


def test_bad_data_gets_clear_errors(photos, tmp_path_factory):
    with pytest.raises(ManifestError, match="neither a manifest file nor a folder"):
        load_rows(str(photos / "nowhere"))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ManifestError, match="no manifest .* and no image with a same-named .txt caption"):
        load_rows(str(empty))
    bad = tmp_path_factory.mktemp("bad")
    (bad / "manifest.jsonl").write_text('{"image": "gone.png", "prompt": "x"}\n{"image": "gone2.png"}\n')
    with pytest.raises(ManifestError, match=r"manifest.jsonl:2: missing prompt"):
        load_rows(str(bad))
    (bad / "manifest.jsonl").write_text('{"image": "gone.png", "prompt": "x"}\n')
    with pytest.raises(ManifestError, match=r"1 listed file\(s\) missing:\n  - .*manifest.jsonl:1: image .*gone.png"):
        load_rows(str(bad))
    (bad / "manifest.csv").write_text("image,prompt,mask\np.png,x,m.png\n")   # a mask of another size
    _image(bad / "p.png", 40, 40, 0)
    PIL.Image.new("L", (20, 20), 255).save(bad / "m.png")
    (row,) = load_rows(str(bad / "manifest.csv"))
    with pytest.raises(ManifestError, match=r"manifest.csv:2: the mask is 20x20 but the image is 40x40"):
        folder_sample(row, 0, 32)


def test_config_data_key_is_for_the_diffusion_models_only(tmp_path):
    with pytest.raises(ValueError, match="data .* applies to models 'lazy' and 'regenerate_image'"):
        _cfg("autoencoder", tmp_path / "x", data=str(EXAMPLE))


@pytest.mark.parametrize("model", ["lazy", "regenerate_image"])
def test_training_on_own_images_runs_and_resumes_exactly(model, photos, tmp_path, autoencoder_export, capsys):
    ref, out = tmp_path / "ref", tmp_path / "run"
    train(_cfg(model, ref, autoencoder_export, data=str(photos), steps=3))
    train(_cfg(model, out, autoencoder_export, data=str(photos), steps=3), max_steps_this_run=1)
    train(_cfg(model, out, autoencoder_export, data=str(photos), steps=3))
    _assert_same_tensors(load_file(str(_ckpt(out, 3) / "model.safetensors")),
                         load_file(str(_ckpt(ref, 3) / "model.safetensors")), "model")
    from lazydiff.train.__main__ import main

    (photos / "broken").mkdir()   # a broken manifest fails before the run folder is touched
    (photos / "broken" / "manifest.jsonl").write_text('{"image": "none.png", "prompt": "x"}\n')
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps(dict(_cfg(model, tmp_path / "never", autoencoder_export).to_dict(),
                                        data=str(photos / "broken"))))
    with pytest.raises(SystemExit) as stop:
        main([str(cfg_file)])
    assert stop.value.code == 2 and "1 listed file(s) missing" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_t5_text_encoder_folder_loads_its_encoder_and_trains(tmp_path, autoencoder_export, photos):
    """PixArt-α's text_encoder/ is a T5 checkpoint: AutoModel would build the whole T5 (random decoder) and
    fail on the encoder-only call; it loads as T5EncoderModel, from either kind of T5 checkpoint."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5Model

    from lazydiff.defaults import load_text_encoder, minilm_path
    from lazydiff.train.text_features import encode_prompts

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                   decoder_start_token_id=0)
    for cls in (T5EncoderModel, T5Model):
        folder = tmp_path / cls.__name__
        cls(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        encoder, tokenizer = load_text_encoder(str(folder))
        assert type(encoder).__name__ == "T5EncoderModel"
        hidden, attn = encode_prompts(encoder, tokenizer, ["a red ball", "x"])
        assert hidden.shape[0] == 2 and hidden.shape[-1] == 32
    export = train(_cfg("lazy", tmp_path / "t5run", autoencoder_export, data=str(photos), steps=1,
                        text_encoder=str(tmp_path / "T5EncoderModel")))
    from lazydiff import load_pipeline

    record = json.loads((export / "components.json").read_text())   # what it was trained with, for assembling
    assert record["text_encoder"]["model_type"] == "t5" and record["text_encoder"]["hidden_size"] == 32
    with pytest.raises(ValueError, match=r"trained with the text encoder .*T5EncoderModel'; the one given differs in "
                                         r"hidden_size \(32 there, 384 here\), model_type \(t5 there, bert here\): "
                                         r"pass text_encoder="):
        load_pipeline(str(export), device="cpu", autoencoder=str(autoencoder_export))   # MiniLM by default
    with pytest.raises(ValueError, match=r"trained with the autoencoder .*; the one given differs in block_out_channels"):
        load_pipeline(str(export), device="cpu", text_encoder=str(tmp_path / "T5EncoderModel"))   # the shipped one
    pipe = load_pipeline(str(export), device="cpu", autoencoder=str(autoencoder_export),
                         text_encoder=str(tmp_path / "T5EncoderModel"))
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel"
    pipe.set_progress_bar_config(disable=True)
    img = PIL.Image.open(photos / "p2.png").resize((32, 32))
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    out = pipe(["a red ball", "photo 1"], img, mask, num_inference_steps=2)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)


def test_images_are_read_upright_by_their_exif_orientation(tmp_path):
    """A phone photo stored sideways with an EXIF orientation, and a mask drawn on it as viewers show it: the
    CLI, the demo and the manifest loaders all read the image upright, so the two line up."""
    from demo.handlers import _open_image as demo_open
    from lazydiff.__main__ import _open_image as cli_open
    from lazydiff.manifest import load_rgb, open_image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)   # left half red as stored; orientation 6 shows it rotated 90 degrees clockwise
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    assert PIL.Image.open(tmp_path / "photo.jpg").size == (40, 20)
    for im in (open_image(tmp_path / "photo.jpg"), cli_open(str(tmp_path / "photo.jpg"), "--image"),
               demo_open(tmp_path / "photo.jpg")):
        assert im.size == (20, 40)
    upright = load_rgb(tmp_path / "photo.jpg")
    assert upright.shape == (40, 20, 3) and upright[5, 10, 0] > 200 and upright[35, 10, 0] < 50   # red on top
    PIL.Image.new("L", (20, 40), 255).save(tmp_path / "mask.png")   # drawn on the upright view
    (tmp_path / "manifest.jsonl").write_text('{"image": "photo.jpg", "mask": "mask.png", "prompt": "x"}\n')
    (row,) = load_rows(str(tmp_path))
    assert folder_sample(row, 0, 16)["mask"].all()   # the sizes match: no error
