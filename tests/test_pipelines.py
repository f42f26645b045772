"""End-to-end tests of LazyDiffusionPipeline and the baselines, on tiny random models (CPU, offline).

The tiny pipelines (lazydiff.testing) use an AutoencoderKL with 2x downsampling and patch size 2, so one
token covers a 4x4 pixel cell. Nothing here measures quality: only shapes, plumbing and invariants.
"""
import json
import math
import os
import string

import numpy as np
import PIL.Image
import pytest
import torch

from lazydiff import (DiffusersInpaintAdapter, LazyDiffusionPipeline, RegenerateCropPipeline,
                      RegenerateImagePipeline)
from lazydiff.schedulers import SCHEDULERS, make_scheduler
from lazydiff.testing import tiny_lazy_pipeline

PROMPT = "a small red star"
W, H = 48, 32                      # default canvas (width x height)
BOX = (10, 6, 22, 15)              # default mask box (x0, y0, x1, y1)
STAGES = ("text", "vae_encode", "context_encoder", "denoise", "vae_decode", "blend", "total")


def edit(pipe, image, mask, seed=0, steps=2, **kw):
    kw.setdefault("guidance_scale", 4.5)
    return pipe(PROMPT, image, mask, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kw)


def arr(img):
    return np.asarray(img)


def mask_bool(mask_img):
    return np.asarray(mask_img) > 127


def hole_token_grid(mask, cell):
    """The token mask computed independently of the library: any masked pixel in a cell -> hole token."""
    h, w = mask.shape
    hp, wp = math.ceil(h / cell) * cell, math.ceil(w / cell) * cell
    padded = np.zeros((hp, wp), bool)
    padded[:h, :w] = mask
    return padded.reshape(hp // cell, cell, wp // cell, cell).any(axis=(1, 3))


def assert_outside_identical(out_img, in_img, mask):
    o, i = arr(out_img), arr(in_img)
    assert out_img.size == in_img.size and out_img.mode == in_img.mode
    assert np.array_equal(o[~mask], i[~mask]), "pixels outside the mask changed"
    assert (o[mask] != i[mask]).any(), "nothing was generated inside the mask"


class Recorder:
    """Forward pre-hook that records the first positional/keyword input of a module."""

    def __init__(self, module, name):
        self.name, self.calls = name, []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({"x": kwargs.get(self.name, args[0] if args else None), "args": args, "kwargs": kwargs})

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------- 1. |H| tokens
def _irregular_mask(w, h):
    m = np.zeros((h, w), np.uint8)
    m[5:14, 9:21] = 255          # a box
    m[h - 3:, w - 2:] = 255      # a corner block touching the padded border
    m[2, 40] = 255               # a single pixel
    return PIL.Image.fromarray(m)


@pytest.mark.parametrize("guidance,num_images,batch", [(4.5, 1, 2), (1.0, 1, 1), (3.0, 2, 4)])
def test_lazy_decoder_receives_exactly_the_hole_tokens(lazy_pipe, make_canvas, guidance, num_images, batch):
    w, h = 47, 33
    image, mask_img = make_canvas(w, h), _irregular_mask(w, h)
    tokens = hole_token_grid(mask_bool(mask_img), lazy_pipe.token_cell)
    assert lazy_pipe.token_cell == lazy_pipe.vae_scale_factor * lazy_pipe.patch_size == 4
    n_hole = int(tokens.sum())
    assert 0 < n_hole < tokens.size // 2
    dec, enc = Recorder(lazy_pipe.decoder, "hole_latents"), Recorder(lazy_pipe.context_encoder, "masked_latents")
    try:
        out = edit(lazy_pipe, image, mask_img, steps=2, guidance_scale=guidance, num_images_per_prompt=num_images)
    finally:
        dec.remove(), enc.remove()
    assert len(dec.calls) == 2                                         # one decoder call per step
    for call in dec.calls:
        assert tuple(call["x"].shape) == (batch, n_hole, 4 * 2 * 2)    # |H| tokens, CFG batch doubled
        index = call["kwargs"].get("hole_index", call["args"][2] if len(call["args"]) > 2 else None)
        assert np.array_equal(index[0].numpy(), np.flatnonzero(tokens))
    # The context encoder runs once, over the whole (padded) canvas latent.
    assert len(enc.calls) == 1
    assert tuple(enc.calls[0]["x"].shape[-2:]) == (tokens.shape[0] * 2, tokens.shape[1] * 2)
    assert out.stats["hole_tokens"] == n_hole and out.stats["total_tokens"] == tokens.size
    assert len(out.images) == num_images


def test_full_canvas_decoder_receives_every_token(regen_pipe, make_canvas):
    w, h = 47, 33
    image, mask_img = make_canvas(w, h), _irregular_mask(w, h)
    rec = Recorder(regen_pipe.decoder, "latents")
    try:
        out = edit(regen_pipe, image, mask_img, steps=2)
    finally:
        rec.remove()
    assert len(rec.calls) == 2
    assert all(tuple(c["x"].shape) == (2, 4, 36 // 2, 48 // 2) for c in rec.calls)  # padded 36x48 canvas
    assert out.stats["total_tokens"] == 9 * 12


# ----------------------------------------------------------------------------- 2. latents outside H
def test_noisy_latent_outside_hole_changes_nothing(lazy_pipe, make_canvas, make_mask):
    w, h = 45, 30
    image, mask_img = make_canvas(w, h), make_mask(w, h, (9, 5, 23, 17))
    tokens = hole_token_grid(mask_bool(mask_img), 4)
    hole_latent = torch.from_numpy(np.kron(tokens, np.ones((2, 2), bool)))   # token mask at latent resolution
    shape = (1, 4, tokens.shape[0] * 2, tokens.shape[1] * 2)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    base = arr(edit(lazy_pipe, image, mask_img, latents=latents).images[0])

    outside = latents + 5.0 * torch.randn(shape, generator=torch.Generator().manual_seed(1)) * (~hole_latent)
    assert not torch.equal(outside, latents)
    assert np.array_equal(arr(edit(lazy_pipe, image, mask_img, latents=outside, seed=7).images[0]), base)

    inside = latents + 1.0 * (hole_latent & (torch.arange(shape[-1]) % 2 == 0))
    assert not np.array_equal(arr(edit(lazy_pipe, image, mask_img, latents=inside).images[0]), base)


# ----------------------------------------------------------------------------- 3. bit-identical outside
SIZES = [(61, 45), (27, 53), (10, 7)]          # (width, height): odd landscape, odd portrait, tiny
MODES = ["RGB", "RGBA", "L", "LA"]
BLENDS = ["hard", "feather", "poisson"]


def _two_region_mask(w, h):
    m = np.zeros((h, w), np.uint8)
    m[int(h * 0.6):, int(w * 0.55):] = 255                                    # touches the bottom-right corner
    m[int(h * 0.1):max(int(h * 0.25), int(h * 0.1) + 1), int(w * 0.1):max(int(w * 0.3), int(w * 0.1) + 1)] = 255
    return PIL.Image.fromarray(m)


def _cases():
    for si, size in enumerate(SIZES):
        for mode in MODES:                                 # lazy: every size x mode x blend
            for blend in BLENDS:
                yield "lazy", size, mode, blend
        for kind in ("regenerate-image", "regenerate-crop"):
            for bi, blend in enumerate(BLENDS):            # baselines: every size x blend; modes rotate
                yield kind, size, MODES[(si + bi + (kind == "regenerate-crop")) % 4], blend


@pytest.mark.parametrize("kind,size,mode,blend", list(_cases()),
                         ids=[f"{k}-{s[0]}x{s[1]}-{m}-{b}" for k, s, m, b in _cases()])
def test_unmasked_pixels_bit_identical(request, make_canvas, kind, size, mode, blend):
    pipe = request.getfixturevalue({"lazy": "lazy_pipe", "regenerate-image": "regen_pipe",
                                    "regenerate-crop": "crop_pipe"}[kind])
    w, h = size
    image, mask_img = make_canvas(w, h, mode, seed=w), _two_region_mask(w, h)
    out = edit(pipe, image, mask_img, steps=1, guidance_scale=1.0, blend=blend)
    assert len(out.images) == 1
    assert_outside_identical(out.images[0], image, mask_bool(mask_img))


def test_numpy_inputs(lazy_pipe, make_canvas):
    image = arr(make_canvas(W, H))
    mask = np.zeros((H, W), bool)
    mask[6:15, 10:22] = True
    out = edit(lazy_pipe, image, mask, steps=1)
    assert out.images[0].mode == "RGB" and out.images[0].size == (W, H)
    assert_outside_identical(out.images[0], PIL.Image.fromarray(image), mask)
    # float images in [0, 1] are accepted too
    out_f = edit(lazy_pipe, image.astype(np.float32) / 255.0, mask, steps=1)
    assert np.array_equal(arr(out_f.images[0])[~mask], image[~mask])


# ----------------------------------------------------------------------------- 4. save -> load
@pytest.mark.parametrize("kind", ["lazy", "regenerate-image"])
def test_pipeline_save_load_identical_outputs(request, make_canvas, make_mask, tmp_path, kind):
    pipe = request.getfixturevalue("lazy_pipe" if kind == "lazy" else "regen_pipe")
    cls = LazyDiffusionPipeline if kind == "lazy" else RegenerateImagePipeline
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    before = edit(pipe, image, mask_img)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == cls.__name__
    weights = ["vae", "decoder"] + (["context_encoder"] if kind == "lazy" else [])
    for folder in weights + ["text_encoder"]:
        files = os.listdir(tmp_path / folder)
        assert any(f.endswith(".safetensors") for f in files), (folder, files)
        assert not any(f.endswith(".bin") for f in files), (folder, files)
    loaded = cls.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is cls and type(loaded.decoder) is type(pipe.decoder)
    after = edit(loaded, image, mask_img)
    assert np.array_equal(arr(before.images[0]), arr(after.images[0]))
    other = RegenerateImagePipeline if kind == "lazy" else LazyDiffusionPipeline  # another model's folder
    with pytest.raises(ValueError, match=f"holds a {cls.__name__}, not a {other.__name__}.*load_pipeline"):
        other.from_pretrained(tmp_path)
    if kind != "lazy":  # the same model run on a crop
        assert type(RegenerateCropPipeline.from_pretrained(tmp_path)) is RegenerateCropPipeline


def test_from_pretrained_on_a_model_folder_names_load_pipeline():
    from lazydiff import defaults

    for cls, name in ((LazyDiffusionPipeline, "lazy"), (RegenerateImagePipeline, "regenerate-image")):
        with pytest.raises(ValueError, match=r"data/models' layout.*lazydiff.load_pipeline"):
            cls.from_pretrained(defaults.MODELS_DIR / name)


# ----------------------------------------------------------------------------- 6. seeds
@pytest.mark.parametrize("fixture", ["lazy_pipe", "regen_pipe"])
def test_same_seed_same_image_different_seed_different(request, make_canvas, make_mask, fixture):
    pipe = request.getfixturevalue(fixture)
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    a = arr(edit(pipe, image, mask_img, seed=0, steps=1).images[0])
    b = arr(edit(pipe, image, mask_img, seed=0, steps=1).images[0])
    c = arr(edit(pipe, image, mask_img, seed=1, steps=1).images[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_num_images_per_prompt_gives_distinct_images(lazy_pipe, make_canvas, make_mask):
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    out = edit(lazy_pipe, image, mask_img, num_images_per_prompt=2)
    assert len(out.images) == 2
    assert not np.array_equal(arr(out.images[0]), arr(out.images[1]))
    for img in out.images:
        assert_outside_identical(img, image, mask_bool(mask_img))
    # one generator per image: each image is the one its seed gives alone
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    pair = lazy_pipe(PROMPT, image, mask_img, num_inference_steps=1, num_images_per_prompt=2, generator=gens()).images
    alone = lazy_pipe(PROMPT, image, mask_img, num_inference_steps=1, generator=torch.Generator().manual_seed(4)).images
    assert np.array_equal(arr(pair[1]), arr(alone[0])) and not np.array_equal(arr(pair[0]), arr(pair[1]))
    images_only = lazy_pipe(PROMPT, image, mask_img, num_inference_steps=1, return_dict=False)
    assert isinstance(images_only, tuple) and isinstance(images_only[0][0], PIL.Image.Image)


# ----------------------------------------------------------------------------- 7. baselines end to end
def test_regenerate_image_end_to_end(regen_pipe, make_canvas, make_mask):
    image, mask_img = make_canvas(W, H, "RGBA"), make_mask(W, H, BOX)
    out = edit(regen_pipe, image, mask_img, steps=2)
    assert isinstance(regen_pipe, RegenerateImagePipeline)
    assert_outside_identical(out.images[0], image, mask_bool(mask_img))
    assert out.stats["steps"] == 2 and out.stats["total_tokens"] == (H // 4) * (W // 4)
    assert "context_encoder" not in out.timings
    assert all(out.timings[k] >= 0 for k in STAGES if k != "context_encoder")


@pytest.mark.parametrize("scheduler,sketch", [("ddim", False), ("ddim", True), ("dpm-solver++", False)])
def test_regenerate_resets_tokens_outside_the_hole_to_the_noised_canvas_latent(make_canvas, make_mask, scheduler,
                                                                                 sketch):
    """After each step but the last, every latent cell outside the hole tokens is the masked-canvas latent
    noised to the next timestep with the edit's own noise; the hole evolves freely. Off: they drift."""
    from lazydiff.pipelines.editing import prepare_edit
    from lazydiff.testing import tiny_regenerate_pipeline

    pipe = tiny_regenerate_pipeline(seed=0)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    enc = pipe.encode_canvas(prepare_edit(image, mask_img, pipe.token_cell), "cpu")
    known = enc["masked_latents"]
    outside = ~enc["token_mask"].repeat_interleave(2, -2).repeat_interleave(2, -1)[:, None].expand_as(known)
    noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(3))
    kw = dict(sketch=_sketch(W, H), strength=0.75) if sketch else {}

    def run(reset):
        pipe.reset_outside_hole, seen = reset, []
        pipe(PROMPT, image, mask_img, num_inference_steps=4, latents=noise, blend="hard",
             callback_on_step_end=lambda p, i, t, k: seen.append(k["latents"].clone()), **kw)
        return seen, pipe.scheduler.timesteps

    seen, ts = run(True)
    start = len(ts) - len(seen)  # SDEdit starts part-way down the schedule
    assert len(seen) == (3 if sketch else 4)
    for i in range(len(seen) - 1):
        pipe.scheduler.set_timesteps(4)  # add_noise of a multistep solver reads its step index
        pipe.scheduler._step_index = start + i + 1 if hasattr(pipe.scheduler, "_step_index") else None
        expected = pipe.scheduler.add_noise(known, noise, ts[start + i + 1:start + i + 2])
        assert torch.allclose(seen[i][outside], expected[outside], atol=1e-6), f"step {i}"
        assert not torch.allclose(seen[i][~outside], expected[~outside], atol=1e-3)  # the hole is generated
    drifted, _ = run(False)
    assert not torch.allclose(drifted[0][outside], seen[0][outside], atol=1e-3)
    pipe.reset_outside_hole = True


def test_regenerate_crop_end_to_end(crop_pipe, make_canvas, make_mask):
    w, h = 96, 64
    image, mask_img = make_canvas(w, h), make_mask(w, h, (60, 40, 72, 50))
    rec = Recorder(crop_pipe.decoder, "latents")
    try:
        out = edit(crop_pipe, image, mask_img, steps=2, resolution=32, crop_margin=0.25)
    finally:
        rec.remove()
    assert isinstance(crop_pipe, RegenerateCropPipeline)
    assert_outside_identical(out.images[0], image, mask_bool(mask_img))
    y0, y1, x0, x1 = out.stats["crop_box"]
    assert y0 <= 40 and y1 >= 50 and x0 <= 60 and x1 >= 72                      # the crop contains the mask
    assert (y1 - y0) < h and (x1 - x0) < w                                      # ... and is smaller than the canvas
    th, tw = out.stats["crop_resized_to"]
    assert max(th, tw) == 32 and th % 4 == 0 and tw % 4 == 0                    # resized to the model resolution
    assert len(rec.calls) == 2 and tuple(rec.calls[0]["x"].shape[-2:]) == (th // 2, tw // 2)
    assert out.stats["mask_ratio"] == pytest.approx(mask_bool(mask_img).mean())
    assert out.timings["total"] >= out.timings["denoise"] >= 0


def test_regenerate_crop_keeps_thin_strokes_when_shrinking_the_crop(crop_pipe, make_canvas, monkeypatch):
    """A 1-px stroke on a crop shrunk ~4x: every stroke pixel still lands on a masked pixel of the model's
    input (nearest-neighbour shrinking kept one pixel in four), and a crop grown to size is not widened."""
    w = h = 160
    m = np.zeros((h, w), np.uint8)
    for i in range(120):
        m[30 + i // 3, 20 + i] = 255  # a shallow hairline
    seen = []
    original = crop_pipe.run_edit

    def spy(prompt, image, mask_image, *a, **kw):
        seen.append(np.asarray(mask_image) > 0)
        return original(prompt, image, mask_image, *a, **kw)

    monkeypatch.setattr(crop_pipe, "run_edit", spy)
    out = edit(crop_pipe, make_canvas(w, h), PIL.Image.fromarray(m), steps=1, resolution=32, crop_margin=0.0)
    y0, y1, x0, x1 = out.stats["crop_box"]
    th, tw = out.stats["crop_resized_to"]
    assert th < y1 - y0  # shrunk
    ys, xs = np.nonzero(m[y0:y1, x0:x1])
    assert seen[-1][ys * th // (y1 - y0), xs * tw // (x1 - x0)].all()
    assert seen[-1].mean() < 0.15  # a thin line, not a filled crop
    small = np.zeros((h, w), np.uint8)
    small[40:48, 40:52] = 255  # a 12 x 8 box grown to 32 px: exactly the box, scaled
    edit(crop_pipe, make_canvas(w, h), PIL.Image.fromarray(small), steps=1, resolution=32, crop_margin=0.0)
    assert seen[-1].mean() == pytest.approx(8 / 12, abs=0.03)  # 8 of 12 rows of the square crop


def _tiny_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16), len(vocab)


@pytest.fixture(scope="module")
def sd_inpaint(tmp_path_factory):
    """A tiny random StableDiffusionInpaintPipeline, built offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, vocab_size = _tiny_clip_tokenizer(tmp_path_factory.mktemp("clip-tok"))
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                        intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                        vocab_size=vocab_size, max_position_embeddings=16)).eval()
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1).eval()
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                          scheduler=DDIMScheduler(steps_offset=1), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_inpaint_adapter_end_to_end(sd_inpaint, make_canvas, make_mask):
    w, h = 33, 23                                         # odd: the adapter pads, it never resamples
    image, mask_img = make_canvas(w, h), make_mask(w, h, (8, 5, 20, 16))
    mask = mask_bool(mask_img)
    adapter = DiffusersInpaintAdapter(sd_inpaint)
    rec = Recorder(sd_inpaint.unet, "sample")
    steps_seen = []
    try:
        out = adapter(PROMPT, image, mask_img, num_inference_steps=2, guidance_scale=3.0, blend="feather",
                      generator=torch.Generator().manual_seed(0),
                      callback_on_step_end=lambda p, i, t, kw: steps_seen.append(i))  # returns None: allowed
    finally:
        rec.remove()
    assert_outside_identical(out.images[0], image, mask)
    assert steps_seen == [0, 1]
    assert len(rec.calls) == 2 and tuple(rec.calls[0]["x"].shape[-2:]) == (24 // 2, 34 // 2)  # padded, not resized
    assert out.stats["steps"] == 2 and out.stats["mask_ratio"] == pytest.approx(mask.mean())
    assert out.timings["total"] >= 0 and out.timings["blend"] >= 0
    # other modes and blends keep size, mode and every unmasked pixel too
    image_l = make_canvas(w, h, "LA")
    out_l = adapter(PROMPT, image_l, mask_img, num_inference_steps=1, guidance_scale=1.0, blend="poisson",
                    generator=torch.Generator().manual_seed(0))
    assert_outside_identical(out_l.images[0], image_l, mask)
    with pytest.raises(ValueError, match="resize the mask"):
        adapter(PROMPT, image, make_mask(w + 1, h, (1, 1, 5, 5)))


def test_diffusers_inpaint_adapter_takes_a_named_scheduler(sd_inpaint, make_canvas, make_mask):
    from eval.quality import use_scheduler

    w, h = 32, 24
    image, mask_img = make_canvas(w, h), make_mask(w, h, (8, 5, 20, 16))
    adapter = DiffusersInpaintAdapter(sd_inpaint)
    own = sd_inpaint.scheduler
    try:
        use_scheduler(adapter, "dpm-solver++", "sd-inpaint")   # what `eval quality --scheduler` does
        assert type(sd_inpaint.scheduler).__name__ == "DPMSolverMultistepScheduler"
        assert sd_inpaint.scheduler.config.steps_offset == own.config.steps_offset
        out = adapter(PROMPT, image, mask_img, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        assert_outside_identical(out.images[0], image, mask_bool(mask_img))
    finally:
        sd_inpaint.scheduler = own


# ----------------------------------------------------------------------------- 8. sketch guidance
def _sketch(w, h):
    s = np.zeros((h, w, 4), np.uint8)
    s[8:12, 12:20] = (255, 0, 0, 255)      # a red stroke inside the mask
    s[25:28, 30:40] = (0, 0, 255, 255)     # a stroke outside the mask: ignored
    return PIL.Image.fromarray(s, "RGBA")


def test_sketch_guidance(lazy_pipe, make_canvas, make_mask):
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    sketch = _sketch(W, H)
    plain = edit(lazy_pipe, image, mask_img, steps=2)
    rec = Recorder(lazy_pipe.decoder, "hole_latents")
    try:
        half = edit(lazy_pipe, image, mask_img, steps=2, sketch=sketch, strength=0.5)
    finally:
        rec.remove()
    assert half.stats["steps"] == 1 and len(rec.calls) == 1             # SDEdit: starts half-way down
    assert half.stats["sketch_pixels"] == 4 * 8                         # only strokes inside the mask count
    assert_outside_identical(half.images[0], image, mask_bool(mask_img))
    assert not np.array_equal(arr(half.images[0]), arr(plain.images[0]))
    full = edit(lazy_pipe, image, mask_img, steps=2, sketch=sketch, strength=1.0)
    assert full.stats["steps"] == 2
    assert np.array_equal(arr(full.images[0]), arr(plain.images[0]))    # strength 1 ignores the colours
    # the scheduler is not left in a half-way state: a plain edit afterwards is unchanged
    assert np.array_equal(arr(edit(lazy_pipe, image, mask_img, steps=2).images[0]), arr(plain.images[0]))


@pytest.mark.parametrize("strength", [0.0, -0.2, 1.5, float("nan")])
def test_bad_strength_raises(lazy_pipe, make_canvas, make_mask, strength):
    with pytest.raises(ValueError, match="strength must be in"):
        edit(lazy_pipe, make_canvas(W, H), make_mask(W, H, BOX), sketch=_sketch(W, H), strength=strength)


def test_sketch_of_wrong_size_raises(lazy_pipe, make_canvas, make_mask):
    with pytest.raises(ValueError, match="sketch is"):
        edit(lazy_pipe, make_canvas(W, H), make_mask(W, H, BOX), sketch=_sketch(W + 4, H), strength=0.5)


def test_sketch_without_strokes_inside_the_mask_raises(lazy_pipe, make_canvas, make_mask):
    outside_only = np.zeros((H, W, 4), np.uint8)
    outside_only[25:28, 30:40] = (0, 0, 255, 255)  # a stroke outside BOX only
    for sketch in (PIL.Image.fromarray(outside_only, "RGBA"), PIL.Image.new("RGBA", (W, H))):
        with pytest.raises(ValueError, match="no strokes inside the mask.*sketch=None"):
            edit(lazy_pipe, make_canvas(W, H), make_mask(W, H, BOX), sketch=sketch, strength=0.5)


@pytest.mark.parametrize("fixture", ["lazy_pipe", "regen_pipe", "crop_pipe"])
def test_output_type_np_is_the_pil_images_as_float_arrays(request, make_canvas, make_mask, fixture):
    pipe = request.getfixturevalue(fixture)
    image, mask_img = make_canvas(W, H, "RGBA"), make_mask(W, H, BOX)
    pil = edit(pipe, image, mask_img, num_images_per_prompt=2).images
    arrays = edit(pipe, image, mask_img, num_images_per_prompt=2, output_type="np").images
    assert isinstance(arrays, np.ndarray) and arrays.dtype == np.float32 and arrays.shape == (2, H, W, 4)
    assert np.array_equal(arrays, np.stack([np.asarray(p, np.float32) / 255.0 for p in pil]))
    assert edit(pipe, image, mask_img, output_type="np", return_dict=False)[0].shape == (1, H, W, 4)
    with pytest.raises(ValueError, match="output_type must be 'pil'.*'np'"):
        edit(pipe, image, mask_img, output_type="latent")


@pytest.mark.parametrize("fixture", ["lazy_pipe", "regen_pipe", "crop_pipe"])
def test_a_list_of_prompts_edits_once_per_prompt_in_one_batch(request, make_canvas, make_mask, fixture):
    """diffusers' convention: images come prompt by prompt, num_images_per_prompt each; image k is what a
    one-prompt call with the same generator gives (up to float rounding of the larger batch)."""
    pipe = request.getfixturevalue(fixture)
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    prompts, negatives = ["a red star", "a blue heart"], ["blurry", None]
    out = pipe(prompts, image, mask_img, negative_prompt=negatives, num_inference_steps=2, num_images_per_prompt=2,
               generator=[torch.Generator().manual_seed(s) for s in range(4)])
    assert len(out.images) == 4
    singles = [pipe(prompts[k // 2], image, mask_img, negative_prompt=negatives[k // 2], num_inference_steps=2,
                    generator=torch.Generator().manual_seed(k)).images[0] for k in range(4)]
    for k in range(4):
        assert np.abs(np.asarray(out.images[k], int) - np.asarray(singles[k], int)).max() <= 2, k
    other = pipe(prompts[1], image, mask_img, negative_prompt="blurry", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert not np.array_equal(np.asarray(other), np.asarray(singles[0]))   # the prompt matters


def test_prompt_lists_are_checked(lazy_pipe, make_canvas, make_mask):
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    with pytest.raises(ValueError, match="prompt is an empty list"):
        lazy_pipe([], image, mask_img, num_inference_steps=1)
    with pytest.raises(ValueError, match="a list of strings, got a list holding int"):
        lazy_pipe(["a red star", 3], image, mask_img, num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_prompt is a list of 1 for 2 prompt"):
        lazy_pipe(["a red star", "a blue heart"], image, mask_img, negative_prompt=["blurry"], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"3 generators for 4 image\(s\) \(2 prompt\(s\) x num_images_per_prompt=2\)"):
        lazy_pipe(["a red star", "a blue heart"], image, mask_img, num_inference_steps=1, num_images_per_prompt=2,
                  generator=[torch.Generator() for _ in range(3)])


def test_other_pil_modes_are_edited_in_the_nearest_supported_mode(lazy_pipe, make_canvas, make_mask):
    """Palette PNGs, CMYK JPEGs, 1-bit and 16-bit grey files are common: edited, not refused. The result has
    the converted mode; outside the mask it is the converted canvas; 16-bit grey is scaled, not clipped."""
    rgb, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    outside = ~(np.asarray(mask_img) > 127)
    grey16 = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    cases = {"P": (rgb.convert("P", palette=PIL.Image.ADAPTIVE), "RGB"),
             "P+transparency": (rgb.convert("P", palette=PIL.Image.ADAPTIVE), "RGBA"),
             "CMYK": (rgb.convert("CMYK"), "RGB"), "1": (rgb.convert("1"), "L"),
             "I;16": (PIL.Image.fromarray(grey16), "L")}
    cases["P+transparency"][0].info["transparency"] = 0
    for name, (image, want) in cases.items():
        out = edit(lazy_pipe, image, mask_img).images[0]
        assert out.mode == want and out.size == (W, H), name
        if name == "I;16":   # 257 * v -> v exactly: the 8-bit grey levels come back
            assert np.array_equal(np.asarray(out)[outside], np.asarray(rgb.convert("L"))[outside])
        elif name != "P+transparency":
            assert np.array_equal(np.asarray(out)[outside], np.asarray(image.convert(want))[outside]), name


def test_common_call_mistakes_get_messages_that_say_what_to_do(lazy_pipe, make_canvas, make_mask):
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    with pytest.raises(ValueError, match="generator must be a torch.Generator .*manual_seed"):
        lazy_pipe(PROMPT, image, mask_img, num_inference_steps=1, generator=0)
    with pytest.raises(ValueError, match="'noise_pred'.* not available.*'latents' and 'pred_x0'"):
        lazy_pipe(PROMPT, image, mask_img, num_inference_steps=1, callback_on_step_end=lambda *a: None,
                  callback_on_step_end_tensor_inputs=["noise_pred"])
    with pytest.raises(ValueError, match="negative_prompt must be a string, a list of strings, or None; got int"):
        lazy_pipe(PROMPT, image, mask_img, num_inference_steps=1, negative_prompt=3)
    with pytest.warns(UserWarning, match="strength=0.5 is ignored without a sketch"):
        edit(lazy_pipe, image, mask_img, steps=1, strength=0.5)
    native = lazy_pipe.decoder.config.sample_size * lazy_pipe.vae_scale_factor
    big = 4 * native + 8
    with pytest.warns(UserWarning, match=f"over 4x the {native}-px side.*downscale"):
        edit(lazy_pipe, make_canvas(big, 16), make_mask(big, 16, (0, 0, 8, 8)), steps=1)


# ----------------------------------------------------------------------------- 9. callbacks
def test_callback_on_step_end_and_preview(lazy_pipe, make_canvas, make_mask):
    image, mask_img = make_canvas(W, H, "RGBA"), make_mask(W, H, BOX)
    n_hole = int(hole_token_grid(mask_bool(mask_img), 4).sum())
    seen, previews = [], []

    def callback(pipe, step, t, kwargs):
        assert pipe is lazy_pipe
        seen.append((step, int(t), tuple(kwargs["latents"].shape), float(kwargs["latents"].abs().sum())))
        if step == 1:
            previews.append(kwargs["decode_preview"]())

    base = edit(lazy_pipe, image, mask_img, steps=3)
    out = edit(lazy_pipe, image, mask_img, steps=3, callback_on_step_end=callback)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert len({s[1] for s in seen}) == 3                              # three distinct timesteps
    assert all(s[2] == (1, n_hole, 16) and np.isfinite(s[3]) for s in seen)
    assert len(previews) == 1 and isinstance(previews[0], PIL.Image.Image)
    assert previews[0].size == image.size and previews[0].mode == image.mode
    assert np.array_equal(arr(out.images[0]), arr(base.images[0]))    # an observing callback changes nothing
    assert out.timings["callback"] >= 0

    def zero_latents(pipe, step, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 2 else None

    edited = edit(lazy_pipe, image, mask_img, steps=3, callback_on_step_end=zero_latents)
    assert not np.array_equal(arr(edited.images[0]), arr(base.images[0]))   # returned latents are used


@pytest.mark.parametrize("fixture", ["regen_pipe", "crop_pipe"])
def test_baseline_callbacks_and_whole_canvas_preview(request, make_canvas, make_mask, fixture):
    pipe = request.getfixturevalue(fixture)
    image, mask_img = make_canvas(W, H, "L"), make_mask(W, H, BOX)
    seen = []

    def callback(p, step, t, kwargs):
        preview = kwargs["decode_preview"]()
        seen.append((step, kwargs["latents"].ndim, preview.size, preview.mode))

    edit(pipe, image, mask_img, steps=2, guidance_scale=1.0, callback_on_step_end=callback)
    assert [s[0] for s in seen] == [0, 1]
    assert all(s[1] == 4 and s[2] == image.size and s[3] == "L" for s in seen)   # full latents; canvas preview


# ----------------------------------------------------------------------------- 10. context (pipeline level)
def test_content_under_the_mask_is_not_seen(lazy_pipe, make_canvas, make_mask):
    """Stage 1 encodes E(I * (1 - M)): pixels under the mask must not influence the result."""
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    altered = arr(image).copy()
    altered[mask_bool(mask_img)] = 255 - altered[mask_bool(mask_img)]
    a = edit(lazy_pipe, image, mask_img, blend="hard").images[0]
    b = edit(lazy_pipe, PIL.Image.fromarray(altered), mask_img, blend="hard").images[0]
    assert np.array_equal(arr(a), arr(b))


# ----------------------------------------------------------------------------- 11. bad input
def _bad_cases(make_canvas, make_mask):
    img, mask = make_canvas(W, H), make_mask(W, H, BOX)
    nan_img = arr(img).astype(np.float32) / 255
    nan_img[3, 4, 1] = np.nan
    nan_lat = torch.zeros(1, 4, H // 2, W // 2)
    nan_lat[0, 1, 2, 3] = float("nan")
    return {
        "mask-size": (dict(image=img, mask_image=make_mask(W - 1, H, (1, 1, 5, 5))), "resize the mask"),
        "empty-mask": (dict(image=img, mask_image=make_mask(W, H, (0, 0, 0, 0))), "empty"),
        "no-mask": (dict(image=img, mask_image=None), "mask_image is required"),
        "steps-0": (dict(image=img, mask_image=mask, num_inference_steps=0), "num_inference_steps must be"),
        "guidance-neg": (dict(image=img, mask_image=mask, guidance_scale=-1.0), "guidance_scale must be"),
        "nan-image": (dict(image=nan_img, mask_image=mask), "NaN"),
        "nan-latents": (dict(image=img, mask_image=mask, latents=nan_lat), "NaN"),
        "latents-shape": (dict(image=img, mask_image=mask, latents=torch.zeros(1, 4, H, W)), "latents must be"),
        "blend-mode": (dict(image=img, mask_image=mask, blend="overlay"), "blend must be one of"),
        "array-shape": (dict(image=np.zeros((H, W, 2), np.uint8), mask_image=mask), r"\(H, W, 3\) or \(H, W, 4\)"),
        "prompt-type": (dict(prompt=None, image=img, mask_image=mask), "prompt must be a string"),
        "images-per-prompt": (dict(image=img, mask_image=mask, num_images_per_prompt=0), "num_images_per_prompt"),
        "generator-list": (dict(image=img, mask_image=mask, generator=[torch.Generator().manual_seed(i) for i in range(3)]),
                           "one generator per image"),
    }


BAD = ["mask-size", "empty-mask", "no-mask", "steps-0", "guidance-neg", "nan-image", "nan-latents", "latents-shape",
       "blend-mode", "array-shape", "prompt-type", "images-per-prompt", "generator-list"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_helpful_value_error(lazy_pipe, make_canvas, make_mask, case):
    kwargs, phrase = _bad_cases(make_canvas, make_mask)[case]
    with pytest.raises(ValueError, match=phrase):
        lazy_pipe(**{"prompt": PROMPT, "num_inference_steps": 1, **kwargs})


@pytest.mark.parametrize("case", ["mask-size", "empty-mask", "array-shape", "steps-0"])
def test_bad_input_raises_in_baselines(regen_pipe, crop_pipe, make_canvas, make_mask, case):
    kwargs, phrase = _bad_cases(make_canvas, make_mask)[case]
    for pipe in (regen_pipe, crop_pipe):
        with pytest.raises(ValueError, match=phrase):
            pipe(**{"prompt": PROMPT, "num_inference_steps": 1, **kwargs})


def _mask_variants():
    box = np.zeros((H, W), np.uint8)
    box[6:15, 10:22] = 255
    layer = np.zeros((H, W, 4), np.uint8)                 # a painted layer: transparent background,
    layer[6:15, 10:22] = (200, 30, 30, 255)               # opaque strokes of any colour
    layer_white_bg = layer.copy()
    layer_white_bg[box == 0] = (255, 255, 255, 0)         # transparent pixels do not count, whatever their RGB
    L = PIL.Image.fromarray(box)
    return {"L": L, "RGB": L.convert("RGB"), "RGBA-opaque": L.convert("RGBA"), "LA-opaque": L.convert("LA"),
            "1": L.convert("1"), "P": L.convert("P"), "layer": PIL.Image.fromarray(layer, "RGBA"),
            "layer-white-bg": PIL.Image.fromarray(layer_white_bg, "RGBA"), "numpy-bool": box > 0,
            "numpy-01": (box > 0).astype(np.uint8), "numpy-float": (box > 0).astype(np.float32)}


@pytest.mark.parametrize("variant", list(_mask_variants()))
def test_mask_formats_mean_the_same_hole(variant):
    """White (or True, or an opaque painted pixel) = edit, whatever the mask's format."""
    from lazydiff.pipelines.editing import prepare_mask

    notes = {}
    mask = prepare_mask(_mask_variants()[variant], (H, W), notes)
    expected = np.zeros((H, W), bool)
    expected[6:15, 10:22] = True
    assert mask.dtype == bool and np.array_equal(mask, expected)
    assert notes == {}


def test_opaque_rgba_mask_in_pipeline(lazy_pipe, make_canvas):
    image = make_canvas(W, H)
    out = edit(lazy_pipe, image, _mask_variants()["RGBA-opaque"], steps=1)
    expected = np.zeros((H, W), bool)
    expected[6:15, 10:22] = True
    assert out.stats["mask_ratio"] == pytest.approx(expected.mean())
    assert_outside_identical(out.images[0], image, expected)


def test_full_canvas_mask(lazy_pipe, make_canvas):
    image = make_canvas(W, H, "RGBA")
    out = edit(lazy_pipe, image, np.ones((H, W), bool), steps=1, blend="poisson")
    assert out.stats["hole_tokens"] == out.stats["total_tokens"] == (H // 4) * (W // 4)
    assert out.stats["mask_ratio"] == 1.0
    result = arr(out.images[0])
    assert result.shape == (H, W, 4) and np.all(result[..., 3] == 255)
    assert (result[..., :3] != arr(image)[..., :3]).any(axis=-1).mean() > 0.5
    hard = edit(lazy_pipe, image, np.ones((H, W), bool), steps=1, blend="hard")
    assert np.array_equal(arr(hard.images[0]), result)      # no border: nothing for Poisson/feather to match


def test_non_binary_mask_is_thresholded_with_warning(lazy_pipe, make_canvas):
    image = make_canvas(W, H)
    m = np.zeros((H, W), np.uint8)
    m[6:15, 10:22] = 200           # >= 50%: hole
    m[20:26, 30:40] = 100          # < 50%: kept
    with pytest.warns(UserWarning, match="non-binary mask"):
        out = edit(lazy_pipe, image, PIL.Image.fromarray(m), steps=1)
    assert "mask_thresholded" in out.stats
    assert_outside_identical(out.images[0], image, m >= 128)
    assert out.stats["hole_tokens"] == int(hole_token_grid(m >= 128, 4).sum())


def test_too_long_prompt_is_truncated_with_warning(lazy_pipe, make_canvas, make_mask):
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    long_prompt = " ".join(["a small red star on a blue background"] * 3)   # > 8 tokens
    with pytest.warns(UserWarning, match="truncated"):
        out = lazy_pipe(long_prompt, image, mask_img, num_inference_steps=1, max_sequence_length=8)
    assert "prompt_truncated" in out.stats
    assert "8 tokens" in out.stats["prompt_truncated"]
    ok = lazy_pipe("a red star", image, mask_img, num_inference_steps=1, max_sequence_length=8)
    assert "prompt_truncated" not in ok.stats
    # past the tokenizer's own limit (32 tokens) the default max_sequence_length is capped, and reported too
    with pytest.warns(UserWarning, match="truncated"):
        out = lazy_pipe(" ".join(["a red star"] * 20), image, mask_img, num_inference_steps=1)
    assert "prompt_truncated" in out.stats


# ----------------------------------------------------------------------------- 12. text cache
def test_text_embeddings_cached_per_prompt(make_canvas, make_mask):
    pipe = tiny_lazy_pipeline(seed=0)
    calls = []
    pipe.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(tuple((kwargs.get("input_ids", args[0] if args else None))[0].tolist())),
        with_kwargs=True)
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    first = edit(pipe, image, mask_img, steps=1)
    assert len(calls) == 2                                  # prompt + negative prompt (CFG), once each
    second = edit(pipe, image, mask_img, steps=1)
    assert len(calls) == 2                                  # cached: the text encoder did not run again
    assert np.array_equal(arr(first.images[0]), arr(second.images[0]))
    prompt_ids = tuple(pipe.tokenizer(PROMPT)["input_ids"])
    assert calls.count(prompt_ids) == 1
    pipe("a blue circle", image, mask_img, num_inference_steps=1)
    assert len(calls) == 3                                  # a new prompt is encoded; "" is still cached


# ----------------------------------------------------------------------------- 13. timings and stats
def test_timings_and_stats(lazy_pipe, make_canvas):
    w, h = 47, 33
    image, mask_img = make_canvas(w, h), _irregular_mask(w, h)
    mask = mask_bool(mask_img)
    tokens = hole_token_grid(mask, 4)
    out = edit(lazy_pipe, image, mask_img, steps=3)
    assert set(STAGES) <= set(out.timings)
    assert all(isinstance(out.timings[k], float) and out.timings[k] >= 0 for k in STAGES)
    assert out.timings["total"] > 0
    assert sum(out.timings[k] for k in STAGES if k != "total") <= out.timings["total"] * 1.001 + 0.1
    s = out.stats
    assert s["hole_tokens"] == int(tokens.sum())
    assert s["total_tokens"] == tokens.size == 9 * 12
    assert s["mask_ratio"] == pytest.approx(mask.mean())
    assert s["steps"] == 3
    assert tuple(s["token_grid"]) == tokens.shape


def test_vae_decodes_only_the_region_around_the_hole(lazy_pipe, make_canvas, make_mask):
    w, h = 96, 64
    image, mask_img = make_canvas(w, h), make_mask(w, h, (40, 24, 52, 34))
    rec = Recorder(lazy_pipe.vae.decoder, "sample")
    try:
        out = edit(lazy_pipe, image, mask_img, steps=1)
    finally:
        rec.remove()
    assert len(rec.calls) == 1
    lh, lw = rec.calls[0]["x"].shape[-2:]
    m = lazy_pipe.decode_margin
    # hole tokens span latent rows 12..17 and cols 20..25; the decoded latent is that box plus the margin
    assert (lh, lw) == (6 + 2 * m, 6 + 2 * m) and lh * lw < (h // 2) * (w // 2) / 4
    assert_outside_identical(out.images[0], image, mask_bool(mask_img))


# ----------------------------------------------------------------------------- 15. schedulers
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers(make_canvas, make_mask, name):
    pipe = tiny_lazy_pipeline(seed=0)
    ddim_config = pipe.scheduler.config
    pipe.scheduler = make_scheduler(name, ddim_config)
    cls_name, extra = SCHEDULERS[name]
    assert type(pipe.scheduler).__name__ == cls_name and all(pipe.scheduler.config[k] == v for k, v in extra.items())
    assert pipe.scheduler.config.timestep_spacing == ddim_config.timestep_spacing  # betas and spacing carry over
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    rec = Recorder(pipe.decoder, "hole_latents")
    try:
        a = edit(pipe, image, mask_img, steps=2)
        sk = edit(pipe, image, mask_img, steps=4, sketch=_sketch(W, H), strength=0.5, guidance_scale=1.0)
        b = edit(pipe, image, mask_img, steps=2)
    finally:
        rec.remove()
    assert len(rec.calls) == 2 + 2 + 2 and a.stats["steps"] == 2 and sk.stats["steps"] == 2
    assert_outside_identical(a.images[0], image, mask_bool(mask_img))
    assert_outside_identical(sk.images[0], image, mask_bool(mask_img))
    assert np.array_equal(arr(a.images[0]), arr(b.images[0]))   # no scheduler state leaks between calls


def test_make_scheduler_refuses_unknown_names_and_keeps_the_prediction_type():
    config = tiny_lazy_pipeline(seed=0).scheduler.config
    with pytest.raises(ValueError, match="dpm-solver\\+\\+"):
        make_scheduler("dpmpp", config)
    v = make_scheduler("euler", {**config, "prediction_type": "v_prediction"})  # e.g. an SD 2 inpainting model
    assert v.config.prediction_type == "v_prediction" and v.config.num_train_timesteps == config.num_train_timesteps


def test_decoder_in_another_dtype_than_the_context_encoder(make_canvas, make_mask):
    """bf16 decoder, fp32 context encoder: the context encoder gets its inputs in its own dtype."""
    from lazydiff.testing import tiny_lazy_pipeline

    pipe = tiny_lazy_pipeline(seed=0)
    pipe.decoder.to(torch.bfloat16)
    image, mask_img = make_canvas(W, H), make_mask(W, H, BOX)
    out = edit(pipe, image, mask_img, steps=1)
    assert_outside_identical(out.images[0], image, mask_bool(mask_img))
