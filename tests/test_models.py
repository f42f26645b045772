"""Model-level tests: PixArt-α initialisation equivalence, the context encoder, save/load of each model."""
import os

import pytest
import torch

import lazydiff
from lazydiff import ContextEncoder, FullCanvasDecoder, LazyDecoder
from lazydiff.models.dit import hole_indices, patchify, token_mask_from_pixels, unpatchify

PIXART_CONFIG = dict(num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
                     cross_attention_dim=24, out_channels=8, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6)


def _random_pixart(sample_size=8, seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    pixart = PixArtTransformer2DModel(sample_size=sample_size, **PIXART_CONFIG).eval()
    with torch.no_grad():  # randomise everything (incl. zero-initialised layers) so agreement is not trivial
        for p in pixart.parameters():
            p.normal_(0, 0.3)
    return pixart


@pytest.fixture(scope="module", params=[8, 128], ids=["pixart-256", "pixart-1024-extra-conds"])
def pixart_case(request):
    """(pixart, inputs) at a non-square 8x12 latent; sample_size=128 turns on resolution/aspect conditioning."""
    ss = request.param
    pixart = _random_pixart(ss)
    g = torch.Generator().manual_seed(1)
    b, h, w = 2, 8, 12
    inputs = dict(
        x=torch.randn(b, 4, h, w, generator=g),
        text=torch.randn(b, 5, 32, generator=g),
        t=torch.tensor([10, 700]),
        text_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),   # sample 0 has two padding tokens
        added=({"resolution": torch.tensor([[64.0, 96.0]] * b), "aspect_ratio": torch.tensor([[2 / 3]] * b)}
               if ss == 128 else None),
    )
    return pixart, inputs


def _pixart_out(pixart, inp, text_mask="default", added="default"):
    added = inp["added"] if added == "default" else added
    text_mask = inp["text_mask"] if isinstance(text_mask, str) else text_mask
    with torch.no_grad():
        return pixart(inp["x"], encoder_hidden_states=inp["text"], timestep=inp["t"],
                      added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None},
                      encoder_attention_mask=text_mask).sample


def _lazy_out(lazy, inp, context, text_mask="default", added="default"):
    added = inp["added"] if added == "default" else added
    text_mask = inp["text_mask"] if isinstance(text_mask, str) else text_mask
    b, _, h, w = inp["x"].shape
    grid = (h // 2, w // 2)
    index = torch.arange(grid[0] * grid[1]).expand(b, -1)   # every token is a hole token
    with torch.no_grad():
        out = lazy(patchify(inp["x"], 2), context, index, grid, inp["t"], inp["text"], text_mask,
                   added_cond_kwargs=added).sample
    return unpatchify(out, grid, 2)


def _close(a, b, rtol=1e-4):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() <= rtol * scale


def test_lazy_decoder_from_pixart_reproduces_pixart(pixart_case):
    pixart, inp = pixart_case
    lazy = lazydiff.lazy_decoder_from_pixart(pixart, context_dim=16).eval()
    assert isinstance(lazy, LazyDecoder)
    assert lazy.config.use_additional_conditions == (pixart.config.sample_size == 128)
    ref = _pixart_out(pixart, inp)
    n = inp["x"].shape[-2] * inp["x"].shape[-1] // 4
    for ctx_seed in (0, 1):  # context projection is zero: any context gives PixArt's output
        context = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(ctx_seed)) * 10
        out = _lazy_out(lazy, inp, context)
        assert out.shape == ref.shape == (2, 8, 8, 12)
        assert _close(out, ref), f"max err {(out - ref).abs().max():.3g} vs scale {ref.abs().max():.3g}"


def test_pixart_equivalence_respects_text_mask_and_extra_conditions(pixart_case):
    """The conditions the equivalence is checked under really matter (so the check is not vacuous)."""
    pixart, inp = pixart_case
    lazy = lazydiff.lazy_decoder_from_pixart(pixart, context_dim=16).eval()
    n = inp["x"].shape[-2] * inp["x"].shape[-1] // 4
    context = torch.zeros(2, n, 16)
    unmasked = torch.ones_like(inp["text_mask"])
    ref_unmasked = _pixart_out(pixart, inp, text_mask=unmasked)
    assert not _close(ref_unmasked, _pixart_out(pixart, inp), rtol=1e-2)     # the text mask matters
    assert _close(_lazy_out(lazy, inp, context, text_mask=unmasked), ref_unmasked)
    if inp["added"] is not None:
        other = {"resolution": torch.tensor([[128.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[2.0]] * 2)}
        ref_other = _pixart_out(pixart, inp, added=other)
        assert not _close(ref_other, _pixart_out(pixart, inp), rtol=1e-2)   # resolution conditioning matters
        assert _close(_lazy_out(lazy, inp, context, added=other), ref_other)
        with pytest.raises(ValueError, match="added_cond_kwargs"):
            _lazy_out(lazy, inp, context, added=None)


def test_full_canvas_decoder_from_pixart_reproduces_pixart(pixart_case):
    pixart, inp = pixart_case
    full = lazydiff.full_canvas_decoder_from_pixart(pixart).eval()
    assert isinstance(full, FullCanvasDecoder)
    ref = _pixart_out(pixart, inp)
    g = torch.Generator().manual_seed(3)
    masked = torch.randn(inp["x"].shape, generator=g) * 5
    mask = (torch.rand(2, 1, *inp["x"].shape[-2:], generator=g) > 0.5).float()
    with torch.no_grad():
        out = full(inp["x"], masked, mask, inp["t"], inp["text"], inp["text_mask"],
                   added_cond_kwargs=inp["added"]).sample
    assert out.shape == ref.shape
    assert _close(out, ref), f"max err {(out - ref).abs().max():.3g} vs scale {ref.abs().max():.3g}"


def test_nonzero_context_projection_changes_lazy_output():
    pixart = _random_pixart(8)
    g = torch.Generator().manual_seed(1)
    inp = dict(x=torch.randn(1, 4, 8, 8, generator=g), text=torch.randn(1, 5, 32, generator=g),
               t=torch.tensor([300]), text_mask=torch.ones(1, 5, dtype=torch.long), added=None)
    lazy = lazydiff.lazy_decoder_from_pixart(pixart, context_dim=16).eval()
    patch_dim = lazy.patch_dim
    assert torch.count_nonzero(lazy.proj_in.weight[:, patch_dim:]) == 0          # zero-initialised context columns
    ctx_a = torch.randn(1, 16, 16, generator=g)
    ctx_b = torch.randn(1, 16, 16, generator=g)
    assert torch.equal(_lazy_out(lazy, inp, ctx_a), _lazy_out(lazy, inp, ctx_b))
    with torch.no_grad():
        lazy.proj_in.weight[:, patch_dim:].normal_(0, 0.3, generator=g)
    a, b = _lazy_out(lazy, inp, ctx_a), _lazy_out(lazy, inp, ctx_b)
    assert not _close(a, b, rtol=1e-2)
    assert not _close(a, _pixart_out(pixart, inp), rtol=1e-2)


def test_fresh_lazy_decoder_context_columns_start_at_zero():
    dec = LazyDecoder(in_channels=4, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                      caption_channels=16, context_dim=12, sample_size=8)
    assert dec.proj_in.weight.shape == (16, 16 + 12)
    assert torch.count_nonzero(dec.proj_in.weight[:, 16:]) == 0
    assert torch.count_nonzero(dec.proj_in.weight[:, :16]) > 0


# ----------------------------------------------------------------------------- context encoder
def _tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return ContextEncoder(latent_channels=4, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=8,
                          context_dim=12, sample_size=16).eval()


def _encoder_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 20, generator=g)
    mask = torch.zeros(1, 1, 16, 20)
    mask[..., 2:5, 3:7] = 1                       # hole near the top-left corner
    return latents * (1 - mask), mask


def test_context_encoder_outputs_hole_tokens_only():
    enc = _tiny_encoder()
    masked, mask = _encoder_inputs()
    token_mask = token_mask_from_pixels(mask, 2)
    index = hole_indices(token_mask)
    n_hole = int(token_mask.sum())
    assert n_hole == 2 * 3                         # rows 1..2 x cols 1..3 of the 8x10 token grid
    with torch.no_grad():
        full = enc(masked, mask).context
        holes = enc(masked, mask, hole_index=index).context
    assert full.shape == (1, 8 * 10, 12)
    assert holes.shape == (1, n_hole, 12)
    assert torch.allclose(holes, full[:, index[0]], atol=1e-6)


def test_context_encoder_sees_the_whole_canvas():
    """Content far from the hole changes the hole's context tokens: the encoder is global, not local."""
    enc = _tiny_encoder()
    masked, mask = _encoder_inputs()
    index = hole_indices(token_mask_from_pixels(mask, 2))
    far = masked.clone()
    far[..., 12:, 16:] += 2.0                      # bottom-right corner, many tokens away from the hole
    with torch.no_grad():
        a = enc(masked, mask, hole_index=index).context
        b = enc(far, mask, hole_index=index).context
    assert (a - b).abs().max() > 1e-3


# ----------------------------------------------------------------------------- save / load
def _model_cases():
    enc = _tiny_encoder()
    lazy = LazyDecoder(in_channels=4, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                       caption_channels=16, context_dim=12, sample_size=8).eval()
    full = FullCanvasDecoder(in_channels=4, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                             caption_channels=16, sample_size=8).eval()
    with torch.no_grad():  # make outputs depend on every weight (the output layers start at zero)
        for m in (lazy, full):
            for p in m.parameters():
                p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:4] = 1
    index = hole_indices(token_mask_from_pixels(mask, 2))
    text = torch.randn(1, 3, 16, generator=g)
    t = torch.tensor([500])
    ctx = torch.randn(1, index.shape[1], 12, generator=g)
    return [
        ("context_encoder", enc, lambda m: m(x * (1 - mask), mask, hole_index=index).context),
        ("lazy_decoder", lazy, lambda m: m(patchify(x, 2)[:, index[0]], ctx, index, (4, 4), t, text).sample),
        ("full_decoder", full, lambda m: m(x, x * (1 - mask), mask, t, text).sample),
    ]


@pytest.mark.parametrize("case", range(3), ids=["ContextEncoder", "LazyDecoder", "FullCanvasDecoder"])
def test_model_save_load_roundtrip_safetensors(case, tmp_path):
    name, model, run = _model_cases()[case]
    with torch.no_grad():
        before = run(model)
    model.save_pretrained(tmp_path / name)
    files = sorted(os.listdir(tmp_path / name))
    assert "config.json" in files
    assert any(f.endswith(".safetensors") for f in files), files
    assert not any(f.endswith(".bin") for f in files), files
    loaded = type(model).from_pretrained(tmp_path / name).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config)
    with torch.no_grad():
        after = run(loaded)
    assert torch.equal(before, after)
    assert before.abs().max() > 0  # a real output, not zeros


def test_lazy_decoder_on_hole_tokens_equals_masked_attention_over_all_tokens():
    """Running on the gathered hole tokens (with their gathered positions and context) is the same as running
    on every token with attention restricted to the hole: checks the position/context gather, not just shapes."""
    torch.manual_seed(0)
    lazy = LazyDecoder(in_channels=4, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=8,
                       caption_channels=16, context_dim=12, sample_size=8).eval()
    with torch.no_grad():
        for p in lazy.parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    grid = (4, 6)
    n = grid[0] * grid[1]
    tokens = torch.randn(1, n, 16, generator=g)
    context = torch.randn(1, n, 12, generator=g)
    text = torch.randn(1, 3, 16, generator=g)
    t = torch.tensor([400])
    hole = torch.zeros(grid, dtype=torch.bool)
    hole[1:3, 2:5] = True
    hole[3, 0] = True
    index = hole_indices(hole[None])
    with torch.no_grad():
        sparse = lazy(tokens[:, index[0]], context[:, index[0]], index, grid, t, text).sample
        dense = lazy(tokens, context, torch.arange(n)[None], grid, t, text,
                     token_mask=hole.flatten()[None].long()).sample[:, index[0]]
        # the same tokens placed at other grid positions give a different answer (positions are used)
        shifted = lazy(tokens[:, index[0]], context[:, index[0]], (index + 1) % n, grid, t, text).sample
    assert sparse.shape == (1, 7, 16)
    assert _close(sparse, dense, rtol=1e-5)
    assert not _close(sparse, shifted, rtol=1e-3)
