"""PSNR and SSIM with the conventions of image-restoration papers (BasicSR and the models' test scripts).

Both functions take a batch ``(N, H, W, C)`` or a single image ``(H, W, C)`` and return one value per
image (shape ``(N,)``, or a scalar for a single image). They are pure ``jax.numpy`` code: jit them
with the keywords fixed, e.g. ``jax.jit(functools.partial(psnr, crop_border=4, y_channel=True))``.

Conventions (BasicSR ``calculate_psnr`` / ``calculate_ssim``):

* ``max_val`` is the data range: 1.0 for images in [0, 1], 255.0 for [0, 255].
* ``crop_border=b`` drops ``b`` pixels on every side of H and W before anything else.
* ``y_channel=True`` evaluates the luma of YCbCr, ITU-R BT.601 "studio swing" as BasicSR's
  ``bgr2ycbcr(y_only=True)`` computes it: on the [0, 255] scale
  ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` (so Y lies in [16, 235]); here rescaled to
  the same range as the input (``max_val``). Channels are RGB (BasicSR reads BGR with cv2 and uses
  the mirrored coefficients, which is the same formula). Single-channel inputs are used as they are.
* PSNR = ``10 log10(max_val^2 / MSE)`` with the MSE over all H, W, C of one image (``inf`` when
  the images are identical).
* SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, ``'valid'`` filtering (no
  padding, the ``[5:-5, 5:-5]`` crop of BasicSR), ``C1 = (0.01 max_val)^2``,
  ``C2 = (0.03 max_val)^2``, computed per channel and averaged over the map and the channels.
  This is the definition of ``dm_pix.ssim`` with its defaults (the tests check the two agree in
  float64), but evaluated differently: dm-pix gets the local variances in one pass as
  ``E[x^2] - E[x]^2``, which in float32 cancels catastrophically (measured here: up to 7e-6 off a
  float64 reference on noisy natural images). This module takes the local means with the
  separable Gaussian and then sums the *centred* products ``w (x - mu)^2`` over the 121 window
  taps (two-pass variance), which keeps float32 within ~1e-7 of the float64 value.

Differences to be aware of when comparing with published numbers: BasicSR and the official test
scripts usually quantise the prediction to uint8 before measuring (``img_as_ubyte`` / ``tensor2img``);
these functions measure the values they are given, so clip and round first to reproduce that
(see :func:`quantize`). Restormer's vendored BasicSR computes RGB SSIM with a 3-D Gaussian over
(H, W, C) with replicate padding (``_ssim_3d``), and AECR-Net uses zero padding instead of 'valid';
their RGB SSIMs differ slightly from this standard definition.
"""

from __future__ import annotations

import functools

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["psnr", "ssim", "rgb_to_y", "quantize"]

# BasicSR's bgr2ycbcr(y_only=True) on [0, 1] input, written for RGB channel order.
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def rgb_to_y(img, *, max_val: float = 1.0):
    """Luma (BT.601, studio swing) of an RGB image ``(..., 3)`` -> ``(..., 1)``, in the input's range."""
    img = jnp.asarray(img)
    x = img / max_val
    w = jnp.asarray(_Y_WEIGHTS, dtype=x.dtype)
    y = (jnp.sum(x * w, axis=-1, keepdims=True) + _Y_OFFSET) / 255.0
    return y * max_val


def quantize(img, *, max_val: float = 1.0):
    """Clip to [0, max_val] and round to 8 bits on the same scale (what ``img_as_ubyte`` does)."""
    img = jnp.clip(jnp.asarray(img), 0.0, max_val)
    return jnp.round(img / max_val * 255.0) / 255.0 * max_val


def _prepare(pred, target, max_val, crop_border, y_channel):
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    if pred.ndim not in (3, 4):
        raise ValueError(f"expected an HWC image or an NHWC batch, got shape {pred.shape}")
    dtype = jnp.promote_types(jnp.result_type(pred, target), jnp.float32)
    pred = pred.astype(dtype)
    target = target.astype(dtype)
    b = int(crop_border)
    if b < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if b:
        h, w = pred.shape[-3], pred.shape[-2]
        if 2 * b >= h or 2 * b >= w:
            raise ValueError(f"crop_border={b} leaves nothing of a {h}x{w} image")
        pred = pred[..., b:h - b, b:w - b, :]
        target = target[..., b:h - b, b:w - b, :]
    if y_channel:
        c = pred.shape[-1]
        if c == 3:
            pred = rgb_to_y(pred, max_val=max_val)
            target = rgb_to_y(target, max_val=max_val)
        elif c != 1:
            raise ValueError(f"y_channel needs 3 (RGB) or 1 channels, got {c}")
    return pred, target


def psnr(pred, target, *, max_val: float = 1.0, crop_border: int = 0, y_channel: bool = False):
    """Peak signal-to-noise ratio in dB, one value per image (see the module docstring)."""
    pred, target = _prepare(pred, target, max_val, crop_border, y_channel)
    mse = pix.mse(pred, target)  # mean over the last three axes (H, W, C)
    return 10.0 * jnp.log10(jnp.asarray(max_val, mse.dtype) ** 2 / mse)


def _gaussian_taps(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _local_stats(a, b, taps):
    """Gaussian-weighted local means, variances and covariance over 'valid' windows (two-pass)."""
    k = len(taps)
    h, w = a.shape[-3], a.shape[-2]
    ho, wo = h - k + 1, w - k + 1
    g = [float(t) for t in taps]

    def blur(z):  # separable 'valid' filter over H then W
        z = sum(g[i] * z[..., i:i + ho, :, :] for i in range(k))
        return sum(g[j] * z[..., :, j:j + wo, :] for j in range(k))

    mu_a, mu_b = blur(a), blur(b)
    g_arr = jnp.asarray(taps, a.dtype)

    def row(i, acc):
        # rows i .. i+ho of the input, all columns; the 11 column taps are unrolled and fuse
        ra = lax.dynamic_slice_in_dim(a, i, ho, axis=a.ndim - 3)
        rb = lax.dynamic_slice_in_dim(b, i, ho, axis=b.ndim - 3)
        va, vb, cov = acc
        for j in range(k):
            da = ra[..., :, j:j + wo, :] - mu_a
            db = rb[..., :, j:j + wo, :] - mu_b
            wij = g_arr[i] * g[j]
            va = va + wij * (da * da)
            vb = vb + wij * (db * db)
            cov = cov + wij * (da * db)
        return va, vb, cov

    zeros = jnp.zeros_like(mu_a)
    va, vb, cov = lax.fori_loop(0, k, row, (zeros, zeros, zeros))
    return mu_a, mu_b, va, vb, cov


def ssim(pred, target, *, max_val: float = 1.0, crop_border: int = 0, y_channel: bool = False):
    """Structural similarity, one value per image (see the module docstring)."""
    pred, target = _prepare(pred, target, max_val, crop_border, y_channel)
    h, w = pred.shape[-3], pred.shape[-2]
    if h < 11 or w < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels (after crop_border), got {h}x{w}")
    return _ssim_valid(pred, target, float(max_val))


@functools.partial(jax.jit, static_argnums=(2,))
def _ssim_valid(pred, target, max_val):
    # jitted so that eager calls are one dispatch; inlined when the caller is jitted.
    mu_a, mu_b, va, vb, cov = _local_stats(pred, target, _gaussian_taps(11, 1.5))
    c1 = (0.01 * max_val) ** 2
    c2 = (0.03 * max_val) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (va + vb + c2)
    return jnp.mean(num / den, axis=(-3, -2, -1))
