"""flaxrestore.metrics against an independent plain-numpy implementation written here.

The reference follows the BasicSR definitions literally: PSNR from the MSE over all pixels,
SSIM window by window with explicit loops (11x11 Gaussian, sigma 1.5, centred moments, 'valid'
positions only), the Y channel from BasicSR's BGR coefficient vector. Float32 results must match
the float64 reference to 1e-6 (PSNR: 1e-6 plus one float32 ulp of the value, since ~40 dB cannot
be represented closer than 3.8e-6 in float32); with jax's x64 mode the two agree to 1e-10.
"""

from __future__ import annotations

import functools

import dm_pix
import jax
import numpy as np
import pytest

from flaxrestore import metrics


# ----------------------------------------------------------------------------- reference


def ref_window(size=11, sigma=1.5):
    w = np.zeros((size, size))
    c = size // 2
    for i in range(size):
        for j in range(size):
            w[i, j] = np.exp(-((i - c) ** 2 + (j - c) ** 2) / (2.0 * sigma * sigma))
    return w / w.sum()


def ref_ssim_plane(x, y, data_range):
    """SSIM of two 2-D float64 arrays, one window position at a time."""
    win = ref_window()
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    h, w = x.shape
    vals = []
    for i in range(h - 10):
        for j in range(w - 10):
            px = x[i:i + 11, j:j + 11]
            py = y[i:i + 11, j:j + 11]
            mx = np.sum(win * px)
            my = np.sum(win * py)
            vx = np.sum(win * (px - mx) ** 2)
            vy = np.sum(win * (py - my) ** 2)
            cxy = np.sum(win * (px - mx) * (py - my))
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def ref_y(img_rgb01):
    """BasicSR to_y_channel on a [0, 1] RGB image, returned on the [0, 1] scale."""
    bgr = img_rgb01[..., ::-1]
    y255 = bgr @ np.array([24.966, 128.553, 65.481]) + 16.0
    return (y255 / 255.0)[..., None]


def ref_prepare(x, crop_border, y_channel, max_val):
    x = np.asarray(x, np.float64)
    if crop_border:
        x = x[crop_border:-crop_border, crop_border:-crop_border, :]
    if y_channel and x.shape[-1] == 3:
        x = ref_y(x / max_val) * max_val
    return x


def ref_psnr(x, y, *, max_val=1.0, crop_border=0, y_channel=False):
    x = ref_prepare(x, crop_border, y_channel, max_val)
    y = ref_prepare(y, crop_border, y_channel, max_val)
    mse = np.mean((x - y) ** 2)
    return 10.0 * np.log10(max_val * max_val / mse)


def ref_ssim(x, y, *, max_val=1.0, crop_border=0, y_channel=False):
    x = ref_prepare(x, crop_border, y_channel, max_val)
    y = ref_prepare(y, crop_border, y_channel, max_val)
    return float(np.mean([ref_ssim_plane(x[..., c], y[..., c], max_val) for c in range(x.shape[-1])]))


# ----------------------------------------------------------------------------- data


def smooth_image(rng, h, w, c):
    """A small image with gradients, an edge and texture (not i.i.d. noise)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.2 + 0.6 * xx, 0.5 + 0.3 * np.sin(6 * yy), 0.3 + 0.4 * yy * xx], -1)[..., :c]
    base[h // 3:, w // 2:] += 0.25  # a step edge
    base += 0.05 * rng.standard_normal((h, w, c))
    return np.clip(base, 0, 1)


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(7)
    gt = np.stack([smooth_image(rng, 26, 30, 3) for _ in range(3)])
    noise = np.array([0.01, 0.05, 0.2])[:, None, None, None]
    pred = np.clip(gt + noise * rng.standard_normal(gt.shape), 0, 1)
    return pred.astype(np.float32), gt.astype(np.float32)


def ulp(v):
    return float(np.spacing(np.float32(abs(v))))


CASES = [
    dict(),
    dict(crop_border=3),
    dict(y_channel=True),
    dict(crop_border=2, y_channel=True),
]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_psnr_and_ssim_match_reference_float32(pairs, kw):
    pred, gt = pairs
    got_p = np.asarray(metrics.psnr(pred, gt, **kw))
    got_s = np.asarray(metrics.ssim(pred, gt, **kw))
    assert got_p.shape == (3,) and got_s.shape == (3,)
    assert got_p.dtype == np.float32 and got_s.dtype == np.float32
    for n in range(3):
        a, b = pred[n].astype(np.float64), gt[n].astype(np.float64)
        rp = ref_psnr(a, b, **kw)
        rs = ref_ssim(a, b, **kw)
        assert abs(got_p[n] - rp) <= 1e-6 + ulp(rp), (n, got_p[n], rp)
        assert abs(got_s[n] - rs) <= 1e-6, (n, got_s[n], rs)
    # The three noise levels must give clearly different, ordered values: not a constant.
    assert got_p[0] > got_p[1] > got_p[2] and got_s[0] > got_s[1] > got_s[2]


def test_max_val_255_and_single_image(pairs):
    pred, gt = pairs
    p255, g255 = pred[1] * 255.0, gt[1] * 255.0
    kw = dict(max_val=255.0, crop_border=1, y_channel=True)
    got_p = metrics.psnr(p255, g255, **kw)
    got_s = metrics.ssim(p255, g255, **kw)
    assert got_p.shape == () and got_s.shape == ()
    rp = ref_psnr(p255.astype(np.float64), g255.astype(np.float64), **kw)
    rs = ref_ssim(p255.astype(np.float64), g255.astype(np.float64), **kw)
    assert abs(float(got_p) - rp) <= 1e-6 + ulp(rp)
    assert abs(float(got_s) - rs) <= 1e-6


def test_grayscale_channel_and_y_noop():
    rng = np.random.default_rng(3)
    gt = smooth_image(rng, 20, 23, 1)
    pred = np.clip(gt + 0.03 * rng.standard_normal(gt.shape), 0, 1)
    for y_channel in (False, True):  # single channel: Y conversion does nothing
        got = float(metrics.ssim(pred.astype(np.float32), gt.astype(np.float32), y_channel=y_channel))
        assert abs(got - ref_ssim(pred, gt)) <= 1e-6


def test_x64_agrees_with_reference_and_dm_pix(pairs):
    """In float64 the implementation equals the reference (and dm-pix's SSIM) to rounding."""
    pred, gt = pairs
    a, b = pred.astype(np.float64), gt.astype(np.float64)
    with jax.enable_x64(True):
        got_s = np.asarray(metrics.ssim(a, b, crop_border=1))
        got_p = np.asarray(metrics.psnr(a, b, crop_border=1))
        assert got_s.dtype == np.float64
        pix_s = np.asarray(dm_pix.ssim(a[:, 1:-1, 1:-1], b[:, 1:-1, 1:-1]))
    for n in range(3):
        assert abs(got_s[n] - ref_ssim(a[n], b[n], crop_border=1)) < 1e-10
        assert abs(got_p[n] - ref_psnr(a[n], b[n], crop_border=1)) < 1e-10
    np.testing.assert_allclose(got_s, pix_s, rtol=0, atol=1e-10)


def test_y_conversion_matches_basicsr():
    rng = np.random.default_rng(0)
    img = rng.random((4, 5, 3))
    got = np.asarray(metrics.rgb_to_y(img.astype(np.float32)))
    np.testing.assert_allclose(got, ref_y(img), atol=1e-6)
    # studio swing: black -> 16/255, white -> 235/255
    ends = np.asarray(metrics.rgb_to_y(np.array([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]], np.float32)))
    np.testing.assert_allclose(ends[0, :, 0], [16 / 255, 235 / 255], atol=1e-6)


def test_jit_matches_eager(pairs):
    pred, gt = pairs
    for fn in (metrics.psnr, metrics.ssim):
        f = functools.partial(fn, crop_border=2, y_channel=True)
        np.testing.assert_allclose(np.asarray(jax.jit(f)(pred, gt)), np.asarray(f(pred, gt)), rtol=1e-6)


def test_identical_images(pairs):
    _, gt = pairs
    assert np.all(np.isinf(np.asarray(metrics.psnr(gt, gt))))
    np.testing.assert_allclose(np.asarray(metrics.ssim(gt, gt)), 1.0, atol=1e-6)


def test_quantize():
    x = np.array([-0.1, 0.0, 0.5, 0.5019, 1.2], np.float32)
    np.testing.assert_allclose(np.asarray(metrics.quantize(x)), [0, 0, 128 / 255, 128 / 255, 1], atol=1e-7)


def test_errors():
    a = np.zeros((2, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(a, a[:, :15])
    with pytest.raises(ValueError, match="crop_border"):
        metrics.psnr(a, a, crop_border=8)
    with pytest.raises(ValueError, match="y_channel"):
        metrics.ssim(a[..., :2], a[..., :2], y_channel=True)
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(a, a, crop_border=3)
    with pytest.raises(ValueError, match="HWC"):
        metrics.psnr(a[0, 0], a[0, 0])
