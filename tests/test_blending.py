"""Unit tests for lazydiff.pipelines.blending: hard / feather / Poisson paste inside the pixel mask."""
import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from lazydiff.pipelines.blending import BLEND_MODES, blend, feather_alpha, poisson_blend


def _images(h=37, w=53, seed=0):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    smooth = np.stack([60 + 100 * xx / w, 60 + 100 * yy / h, 60 + 50 * (xx + yy) / (h + w)], -1)
    original = np.clip(smooth + rng.randint(-15, 16, smooth.shape), 0, 255).astype(np.uint8)
    generated = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
    return original, generated


def _blob_mask(h=37, w=53):
    yy, xx = np.mgrid[0:h, 0:w]
    mask = (yy - 15) ** 2 / 64 + (xx - 20) ** 2 / 120 <= 1          # an ellipse
    mask |= (yy >= h - 6) & (xx >= w - 9)                            # a block touching the canvas corner
    return mask


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_outside_mask_bit_identical(mode):
    original, generated = _images()
    mask = _blob_mask()
    out = blend(original, generated, mask, mode)
    assert out.shape == original.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], original[~mask])
    # ... and something was pasted inside (the test would pass trivially if blend returned the original)
    assert (out[mask] != original[mask]).any(axis=-1).mean() > 0.5


def test_hard_pastes_generated_pixels_exactly():
    original, generated = _images()
    mask = _blob_mask()
    out = blend(original, generated, mask, "hard")
    assert np.array_equal(out[mask], generated[mask])


def test_poisson_removes_constant_colour_offset():
    """A decoded region that is the original shifted by a constant colour (a VAE colour cast over the
    whole decoded region) is seamless-cloned back to the original; a hard paste keeps the cast."""
    original, _ = _images()
    mask = _blob_mask()
    offset = np.array([30, -25, 18])
    generated = np.clip(original.astype(int) + offset, 0, 255).astype(np.uint8)
    assert np.array_equal(generated.astype(int) - original, np.broadcast_to(offset, original.shape))  # no clipping

    hard = blend(original, generated, mask, "hard").astype(int)
    assert np.allclose(hard[mask] - original[mask], offset)

    pois = blend(original, generated, mask, "poisson").astype(int)
    err = np.abs(pois[mask] - original[mask].astype(int))
    assert err.max() <= 1, f"Poisson blend kept the offset: max error {err.max()}"
    assert np.array_equal(pois[~mask], original[~mask])


def test_poisson_solver_matches_border_and_gradients():
    """Float-level check of poisson_blend: gradients of the generated image inside, original on the border."""
    rng = np.random.RandomState(1)
    original = rng.rand(20, 24, 2) * 100
    generated = rng.rand(20, 24, 2) * 100
    mask = np.zeros((20, 24), bool)
    mask[5:14, 6:17] = True
    out = poisson_blend(original, generated, mask)
    assert np.array_equal(out[~mask], original[~mask])
    # Discrete Poisson equation at every masked pixel: 4 f_p - sum f_q = 4 g_p - sum g_q (all neighbours on-canvas).
    lap = lambda a: 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    inner = mask[1:-1, 1:-1]
    assert np.allclose(lap(out)[inner], lap(generated)[inner], atol=1e-6)


def test_feather_alpha_monotone_from_border_inwards():
    mask = _blob_mask(60, 70)
    radius = 6.0
    alpha = feather_alpha(mask, radius)
    assert alpha.dtype == np.float32 and alpha.shape == mask.shape
    assert np.all(alpha[~mask] == 0)
    assert np.all(alpha[mask] > 0) and np.all(alpha <= 1)
    assert alpha.max() == 1.0
    # Monotone in the distance to the border: sorted by distance, alpha never decreases.
    dist = distance_transform_edt(mask)[mask]
    order = np.argsort(dist, kind="stable")
    assert np.all(np.diff(alpha[mask][order]) >= 0)
    # A ramp, not a step: several distinct levels below 1.
    assert len(np.unique(alpha[mask & (alpha < 1)])) >= 3
    # Along one row from the ellipse's left border to its centre, alpha rises monotonically.
    row = alpha[15, 9:21]
    assert np.all(np.diff(row) >= 0) and row[0] < row[-1]


def test_feather_blend_is_a_convex_combination():
    original, generated = _images()
    mask = _blob_mask()
    out = blend(original, generated, mask, "feather", feather_radius=4).astype(int)
    lo = np.minimum(original, generated).astype(int) - 1
    hi = np.maximum(original, generated).astype(int) + 1
    assert np.all((out >= lo) & (out <= hi))
    # Deep inside the mask (alpha = 1) the generated pixels are used as they are.
    deep = distance_transform_edt(mask) >= 4
    assert deep.any() and np.array_equal(out[deep], generated[deep])
    # Right at the border the result is a mix, not the generated pixels.
    border = mask & (distance_transform_edt(mask) == 1)
    assert (out[border] != generated[border]).any()


def test_feather_radius_zero_is_hard():
    original, generated = _images()
    mask = _blob_mask()
    assert np.array_equal(blend(original, generated, mask, "feather", feather_radius=0),
                          blend(original, generated, mask, "hard"))


def test_empty_mask_returns_original_and_unknown_mode_raises():
    original, generated = _images()
    empty = np.zeros(original.shape[:2], bool)
    for mode in BLEND_MODES:
        assert np.array_equal(blend(original, generated, empty, mode), original)
    with pytest.raises(ValueError, match="unknown blend mode"):
        blend(original, generated, _blob_mask(), "multiply")


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_full_canvas_mask_gives_the_generated_image(mode):
    """A mask covering everything has no seam: every mode must return the generated pixels (the Poisson
    system has no boundary and used to be singular; feathering used a phantom border)."""
    original, generated = _images(12, 15)
    out = blend(original, generated, np.ones((12, 15), bool), mode)
    assert np.array_equal(out, generated)
