"""Synthetic degradations for the built-in demo data: blur, noise, low light, haze, rain.

Each function takes a clean float32 HxWxC crop in [0, 1] (with ``margin(kind)`` extra pixels on
every side, which only blur uses) and a ``numpy.random.Generator``, and returns ``(lq, gt)`` of the
inner size, both in [0, 1]. All randomness comes from the generator, so a fixed seed gives a fixed
pair. They are written for speed on small patches (a few milliseconds for 64x64 on one core), not
for photometric realism; the models only need a consistent mapping to learn within minutes.

* blur: a random 15x15 kernel, half the time a Gaussian (sigma 0.8-2.5), half the time a motion
  blur (a line of length 5-15 at a random angle, sub-pixel accurate), applied 'valid' on the
  margin so the border is real image content, as in GoPro.
* noise: additive white Gaussian noise, sigma (on the 0-255 scale) fixed or drawn uniformly.
* lowlight: gamma darkening (gamma 1.5-2.5) and scaling (0.1-0.35) with a slight colour cast,
  then signal-dependent (shot + read) Gaussian noise and 8-bit quantisation, as in LOL.
* haze: the atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d), with a depth-like
  map d (far at the top, plus a smooth random field), beta 0.6-2.2, a bright airlight 0.7-1.0.
* rain: additive streaks (the O = B + S model): a few hundred thin slanted segments of length 6-22
  with a common angle, softened with a 3-tap blur.
"""

from __future__ import annotations

import numpy as np

KINDS = ("blur", "noise", "lowlight", "haze", "rain")
_BLUR_K = 15


def margin(kind: str) -> int:
    """Extra pixels needed on each side of the output crop."""
    return _BLUR_K // 2 if kind == "blur" else 0


def degrade(kind: str, clean: np.ndarray, rng: np.random.Generator, *, noise_sigma=None,
            noise_sigma_range=None) -> tuple[np.ndarray, np.ndarray]:
    if kind not in KINDS:
        raise ValueError(f"unknown demo degradation {kind!r}; choose one of {KINDS}")
    m = margin(kind)
    gt = clean[m:clean.shape[0] - m, m:clean.shape[1] - m] if m else clean
    if kind == "blur":
        lq = _conv_valid(clean, blur_kernel(rng))
    elif kind == "noise":
        if noise_sigma is not None:
            sigma = float(noise_sigma)
        else:
            lo, hi = noise_sigma_range if noise_sigma_range is not None else (10.0, 50.0)
            sigma = rng.uniform(lo, hi)
        lq = gt + rng.standard_normal(gt.shape, dtype=np.float32) * np.float32(sigma / 255.0)
    elif kind == "lowlight":
        lq = _lowlight(gt, rng)
    elif kind == "haze":
        lq = _haze(gt, rng)
    else:
        lq = _rain(gt, rng)
    lq = np.clip(lq, 0.0, 1.0).astype(np.float32)
    return lq, np.ascontiguousarray(gt, dtype=np.float32)


# ----------------------------------------------------------------------------- blur


def blur_kernel(rng: np.random.Generator, size: int = _BLUR_K) -> np.ndarray:
    c = size // 2
    if rng.random() < 0.5:
        sigma = rng.uniform(0.8, 2.5)
        ax = np.arange(size) - c
        g = np.exp(-0.5 * (ax / sigma) ** 2)
        k = np.outer(g, g)
    else:
        length = rng.uniform(5.0, size)
        angle = rng.uniform(0.0, np.pi)
        t = np.linspace(-length / 2, length / 2, int(4 * length) + 1)
        ys = c + t * np.sin(angle)
        xs = c + t * np.cos(angle)
        k = np.zeros((size, size))
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        fy, fx = ys - y0, xs - x0
        for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                            (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            yy, xx = np.clip(y0 + dy, 0, size - 1), np.clip(x0 + dx, 0, size - 1)
            np.add.at(k, (yy, xx), wgt)
    return (k / k.sum()).astype(np.float32)


def _conv_valid(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """'valid' correlation of an HxWxC image with a kxk kernel (sum of shifted copies)."""
    kh, kw = k.shape
    h, w = img.shape[0] - kh + 1, img.shape[1] - kw + 1
    out = np.zeros((h, w, img.shape[2]), np.float32)
    for i, j in zip(*np.nonzero(k > 1e-6)):
        out += k[i, j] * img[i:i + h, j:j + w]
    return out


# ----------------------------------------------------------------------------- low light


def _lowlight(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(1.5, 2.5)
    scale = rng.uniform(0.1, 0.35)
    cast = 1.0 + rng.uniform(-0.08, 0.08, size=gt.shape[-1])
    dark = scale * np.power(gt, gamma) * cast.astype(np.float32)
    shot = rng.uniform(0.002, 0.01)
    read = rng.uniform(0.002, 0.01)
    std = np.sqrt(shot * dark + read * read)
    dark = dark + std * rng.standard_normal(gt.shape, dtype=np.float32)
    return np.round(np.clip(dark, 0, 1) * 255.0) / 255.0


# ----------------------------------------------------------------------------- haze


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    g = rng.random((cells + 1, cells + 1))
    ty = np.linspace(0, cells, h, endpoint=False)
    tx = np.linspace(0, cells, w, endpoint=False)
    iy, ix = ty.astype(int), tx.astype(int)
    fy, fx = (ty - iy)[:, None], (tx - ix)[None, :]
    top = g[iy][:, ix] * (1 - fx) + g[iy][:, ix + 1] * fx
    bot = g[iy + 1][:, ix] * (1 - fx) + g[iy + 1][:, ix + 1] * fx
    return top * (1 - fy) + bot * fy


def _haze(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = gt.shape[:2]
    rows = np.linspace(1.0, 0.0, h)[:, None] * np.ones((1, w))  # top of the frame is far away
    depth = 0.6 * rows + 0.4 * _smooth_field(rng, h, w)
    beta = rng.uniform(0.6, 2.2)
    t = np.exp(-beta * depth)[..., None].astype(np.float32)
    airlight = rng.uniform(0.7, 1.0) + rng.uniform(-0.03, 0.03, size=gt.shape[-1])
    return gt * t + airlight.astype(np.float32) * (1.0 - t)


# ----------------------------------------------------------------------------- rain


def _rain(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = gt.shape[:2]
    n = int(rng.uniform(0.02, 0.06) * h * w / 10)
    angle = rng.uniform(-0.35, 0.35)  # radians from vertical, shared by all streaks
    length = rng.uniform(6, 22, size=n)
    y0 = rng.uniform(-10, h, size=n)
    x0 = rng.uniform(-10, w + 10, size=n)
    bright = rng.uniform(0.5, 1.0, size=n)
    steps = np.linspace(0.0, 1.0, 24)
    ys = (y0[:, None] + steps[None, :] * length[:, None] * np.cos(angle)).round().astype(int)
    xs = (x0[:, None] + steps[None, :] * length[:, None] * np.sin(angle)).round().astype(int)
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    layer = np.zeros((h, w), np.float32)
    np.maximum.at(layer, (ys[ok], xs[ok]), np.broadcast_to(bright[:, None], ys.shape)[ok])
    soft = layer.copy()
    soft[:, 1:] += 0.35 * layer[:, :-1]
    soft[:, :-1] += 0.35 * layer[:, 1:]
    alpha = rng.uniform(0.5, 0.85)
    return gt + alpha * np.clip(soft, 0, 1)[..., None]
