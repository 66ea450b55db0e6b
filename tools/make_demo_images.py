"""Generate the small clean images shipped in ``flaxrestore/data/`` for the built-in demo data.

Run once (the output is committed):

    .venv/bin/python tools/make_demo_images.py

Every image is procedurally painted from a fixed seed, so the files are reproducible and carry
no third-party licence. The scenes mix what restoration networks learn from in natural photos:
sharp edges (buildings, trunks, bricks), fine textures (grass, bark, sand, fabric), smooth
gradients (sky, shaded spheres) and small bright details (windows, flowers, the sun). Each scene
is painted at twice the final resolution and box-filtered down, so edges are anti-aliased
like a camera's rather than jagged.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from PIL import Image

SIZE = 256
SS = 2  # supersampling factor
N = SIZE * SS


# ----------------------------------------------------------------------------- helpers


def _grid():
    y, x = np.mgrid[0:N, 0:N].astype(np.float64)
    return y / N, x / N  # in [0, 1)


def value_noise(rng, cells, size=N):
    """Smooth random field: a cells x cells random grid bilinearly upsampled to size x size."""
    g = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    f = f * f * (3 - 2 * f)  # smoothstep, no visible grid lines
    a = g[i][:, i]
    b = g[i][:, i + 1]
    c = g[i + 1][:, i]
    d = g[i + 1][:, i + 1]
    fy, fx = f[:, None], f[None, :]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def fractal(rng, base=4, octaves=6, persistence=0.55, size=N):
    out = np.zeros((size, size))
    amp, total = 1.0, 0.0
    for o in range(octaves):
        out += amp * value_noise(rng, base * 2**o, size)
        total += amp
        amp *= persistence
    return out / total


def ridge(rng, n=N, rough=0.6):
    """1-D midpoint-displacement profile (a mountain skyline), values around 0."""
    m = 1
    h = np.array([0.0, 0.0])
    scale = 1.0
    while m < n:
        mid = 0.5 * (h[:-1] + h[1:]) + rng.normal(0, scale, m)
        new = np.empty(2 * m + 1)
        new[0::2] = h
        new[1::2] = mid
        h = new
        m *= 2
        scale *= rough
    return h[:n]


def lerp(a, b, t):
    t = np.asarray(t)[..., None] if np.ndim(t) == 2 else t
    return a * (1 - t) + b * t


def paint(img, mask, color):
    """Alpha-blend a colour (3,) or an image (N,N,3) into img where mask (N,N) in [0,1]."""
    m = np.clip(mask, 0, 1)[..., None]
    img[:] = img * (1 - m) + np.asarray(color) * m


def disc(y, x, cy, cx, r):
    return ((y - cy) ** 2 + (x - cx) ** 2 <= r * r).astype(np.float64)


def rect(y, x, y0, x0, y1, x1):
    return ((y >= y0) & (y < y1) & (x >= x0) & (x < x1)).astype(np.float64)


def sky(y, top, bottom):
    return lerp(np.array(top), np.array(bottom), y)


def finish(img):
    img = np.clip(img, 0, 1)
    img = img.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))
    return Image.fromarray(np.round(img * 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- scenes


def mountains(rng):
    y, x = _grid()
    img = sky(y, (0.25, 0.45, 0.85), (0.85, 0.8, 0.75))
    clouds = fractal(rng, 3, 5)
    paint(img, np.clip((clouds - 0.55) * 4, 0, 1) * (y < 0.5), (0.97, 0.97, 0.98))
    paint(img, disc(y, x, 0.18, 0.78, 0.06), (1.0, 0.95, 0.7))
    for depth, (lvl, col) in enumerate([(0.42, (0.45, 0.5, 0.65)), (0.55, (0.25, 0.33, 0.3))]):
        h = lvl + 0.25 * ridge(rng) / (2 + depth)
        rock = fractal(rng, 8, 5)
        m = (y > h[None, :]).astype(np.float64)
        tex = np.array(col) * (0.7 + 0.6 * rock[..., None])
        paint(img, m, tex)
        if depth == 0:  # snow caps
            paint(img, m * (y < h[None, :] + 0.04) * (rock > 0.45), (0.95, 0.95, 0.97))
    grass = fractal(rng, 32, 4, 0.7)
    ground = y > 0.72 + 0.02 * np.sin(x * 9)
    g = np.stack([0.25 + 0.3 * grass, 0.45 + 0.35 * grass, 0.12 + 0.1 * grass], -1)
    g *= (0.6 + 0.6 * y)[..., None]
    paint(img, ground, g)
    return img


def city(rng):
    y, x = _grid()
    img = sky(y, (0.95, 0.6, 0.35), (0.35, 0.3, 0.55))
    x0 = 0.0
    while x0 < 1.0:
        w = rng.uniform(0.08, 0.18)
        top = rng.uniform(0.15, 0.55)
        col = rng.uniform(0.15, 0.5, 3) * np.array([1.0, 0.95, 0.9])
        b = rect(y, x, top, x0, 1.0, x0 + w)
        wall = np.array(col) * (0.85 + 0.3 * fractal(rng, 16, 3)[..., None])
        paint(img, b, wall)
        paint(img, rect(y, x, top, x0, 1.0, x0 + 0.012), col * 0.6)  # shaded edge
        wy, wx = rng.uniform(0.025, 0.04), rng.uniform(0.02, 0.035)
        lit = rng.random((64, 64)) < 0.45
        iy = ((y - top - 0.02) / wy).astype(int)
        ix = ((x - x0 - 0.015) / wx).astype(int)
        fy = (y - top - 0.02) / wy - iy
        fx = (x - x0 - 0.015) / wx - ix
        win = b * (fy > 0.3) * (fx > 0.3) * (y > top + 0.02) * (x < x0 + w - 0.015) * (y < 0.85)
        on = lit[np.clip(iy, 0, 63), np.clip(ix, 0, 63)]
        paint(img, win * on, (1.0, 0.85, 0.45))
        paint(img, win * ~on, (0.12, 0.14, 0.2))
        x0 += w + rng.uniform(0.0, 0.03)
    road = rect(y, x, 0.85, 0, 1.01, 1.01)
    paint(img, road, np.array((0.2, 0.2, 0.22)) * (0.8 + 0.4 * fractal(rng, 64, 2)[..., None]))
    paint(img, road * (np.abs(y - 0.925) < 0.006) * ((x * 10) % 1 < 0.5), (0.95, 0.9, 0.3))
    return img


def still_life(rng):
    y, x = _grid()
    img = sky(y, (0.55, 0.5, 0.45), (0.3, 0.27, 0.25))
    # wooden table with grain
    grain = np.sin((y * 40 + 6 * fractal(rng, 4, 4)) * np.pi) * 0.5 + 0.5
    wood = np.stack([0.5 + 0.2 * grain, 0.32 + 0.12 * grain, 0.15 + 0.05 * grain], -1)
    paint(img, y > 0.55, wood)
    # checkered cloth
    cloth = rect(y, x, 0.6, 0.05, 1.01, 0.45)
    check = ((np.floor(x * 24) + np.floor(y * 24)) % 2)[..., None]
    paint(img, cloth, lerp(np.array((0.85, 0.1, 0.1)), np.array((0.95, 0.95, 0.92)), check[..., 0]))
    light = np.array([-0.5, -0.6, 0.62])
    light /= np.linalg.norm(light)
    for cy, cx, r, col in [(0.55, 0.3, 0.14, (0.9, 0.5, 0.1)), (0.62, 0.66, 0.17, (0.2, 0.5, 0.9)),
                           (0.74, 0.5, 0.08, (0.3, 0.8, 0.3))]:
        m = disc(y, x, cy, cx, r)
        ny, nx = (y - cy) / r, (x - cx) / r
        nz = np.sqrt(np.clip(1 - ny**2 - nx**2, 0, 1))
        shade = np.clip(ny * light[0] + nx * light[1] + nz * light[2], 0, 1)
        spec = shade**40
        paint(img, disc(y, x, cy + r * 0.95, cx + r * 0.3, r * 0.9) * (y > cy + 0.3 * r) * 0.35, (0, 0, 0))
        paint(img, m, np.array(col) * (0.25 + 0.75 * shade[..., None]) + spec[..., None])
    return img


def bricks(rng):
    y, x = _grid()
    rows = 14
    ry = y * rows
    row = np.floor(ry)
    shift = (row % 2) * 0.5
    bx = x * 6 + shift
    fy, fx = ry - row, bx - np.floor(bx)
    idx = (row * 13 + np.floor(bx)).astype(int) % 97
    tint = rng.uniform(0.75, 1.15, 97)[idx]
    grit = fractal(rng, 64, 3)
    brick = np.stack([0.62 * tint, 0.28 * tint, 0.2 * tint], -1) * (0.8 + 0.4 * grit[..., None])
    mortar = (fy < 0.1) | (fx < 0.035)
    img = brick.copy()
    paint(img, mortar, np.stack([0.75 + 0.1 * grit] * 3, -1))
    # a window with a frame and a plant
    paint(img, rect(y, x, 0.25, 0.3, 0.7, 0.7), (0.9, 0.9, 0.88))
    paint(img, rect(y, x, 0.28, 0.33, 0.67, 0.67), sky(y, (0.5, 0.7, 0.95), (0.8, 0.9, 1.0)))
    paint(img, rect(y, x, 0.28, 0.495, 0.67, 0.505) + rect(y, x, 0.47, 0.33, 0.48, 0.67), (0.9, 0.9, 0.88))
    # shadow gradient from the left
    img *= (0.7 + 0.3 * x)[..., None]
    for _ in range(40):
        cy, cx = rng.uniform(0.6, 0.72), rng.uniform(0.32, 0.68)
        paint(img, disc(y, x, cy, cx, rng.uniform(0.01, 0.025)), rng.uniform([0.1, 0.4, 0.05], [0.3, 0.7, 0.2]))
    paint(img, rect(y, x, 0.7, 0.3, 0.78, 0.7), (0.55, 0.3, 0.2))
    return img


def meadow(rng):
    y, x = _grid()
    bg = fractal(rng, 3, 3)
    img = np.stack([0.3 + 0.3 * bg, 0.5 + 0.3 * bg, 0.25 + 0.2 * bg], -1)  # out-of-focus background
    for _ in range(60):  # bokeh
        cy, cx, r = rng.uniform(0, 0.5), rng.uniform(0, 1), rng.uniform(0.02, 0.06)
        paint(img, disc(y, x, cy, cx, r) * 0.25, (1.0, 1.0, 0.85))
    for _ in range(220):  # grass blades
        x0, y0 = rng.uniform(0, 1), rng.uniform(0.45, 1.05)
        h, lean = rng.uniform(0.15, 0.4), rng.uniform(-0.15, 0.15)
        t = np.clip((y0 - y) / h, 0, 1)
        cx = x0 + lean * t**2
        wdt = 0.006 * (1 - t)
        m = (np.abs(x - cx) < wdt) * (y < y0) * (y > y0 - h)
        paint(img, m, np.array([0.15, 0.45, 0.1]) * rng.uniform(0.6, 1.4))
    for _ in range(25):  # flowers
        cy, cx = rng.uniform(0.45, 0.9), rng.uniform(0.05, 0.95)
        r = rng.uniform(0.02, 0.04)
        col = rng.choice([(0.95, 0.9, 0.2), (0.95, 0.3, 0.4), (0.9, 0.9, 0.95), (0.6, 0.3, 0.85)])
        ang = np.arctan2(y - cy, x - cx)
        rr = np.hypot(y - cy, x - cx)
        petals = rr < r * (0.6 + 0.4 * np.abs(np.cos(2.5 * ang)))
        paint(img, petals, col)
        paint(img, disc(y, x, cy, cx, r * 0.3), (0.9, 0.6, 0.1))
    return img


def beach(rng):
    y, x = _grid()
    img = sky(y, (0.3, 0.55, 0.9), (0.75, 0.85, 0.95))
    clouds = fractal(rng, 4, 6)
    paint(img, np.clip((clouds - 0.5) * 3, 0, 1) * (y < 0.4), (1, 1, 1))
    sea = y > 0.4
    waves = 0.5 + 0.5 * np.sin(y * 200 * (0.3 + y) + 3 * fractal(rng, 16, 3))
    water = np.stack([0.05 + 0.1 * waves, 0.35 + 0.15 * waves, 0.55 + 0.15 * waves], -1)
    water *= (0.7 + 0.5 * (y - 0.4))[..., None]
    paint(img, sea, water)
    shore = 0.7 + 0.04 * np.sin(x * 12 + 1) + 0.02 * fractal(rng, 8, 3)
    paint(img, (y > shore) * (y < shore + 0.015), (0.97, 0.97, 0.97))  # foam
    sand = fractal(rng, 96, 3, 0.8)
    s = np.stack([0.85 + 0.1 * sand, 0.75 + 0.1 * sand, 0.55 + 0.1 * sand], -1)
    paint(img, y > shore + 0.012, s)
    # a striped umbrella
    pole = rect(y, x, 0.6, 0.295, 0.92, 0.305)
    paint(img, pole, (0.3, 0.25, 0.2))
    top = (y > 0.55) * (y < 0.62) * (np.abs(x - 0.3) < (y - 0.55) * 2.2)
    stripes = ((np.arctan2(x - 0.3, y - 0.5) * 6) % 1 < 0.5)
    paint(img, top * stripes, (0.9, 0.15, 0.15))
    paint(img, top * ~stripes, (0.97, 0.95, 0.9))
    return img


def forest(rng):
    y, x = _grid()
    img = sky(y, (0.75, 0.85, 0.8), (0.45, 0.55, 0.4))
    fog = fractal(rng, 4, 4)
    for depth in range(3):
        n = 6 + 4 * depth
        for _ in range(n):
            cx = rng.uniform(-0.05, 1.05)
            w = rng.uniform(0.015, 0.03) * (1 + depth)
            bark = np.sin((x - cx) / w * 7 + 4 * fractal(rng, 24, 3)) * 0.5 + 0.5
            shade = 0.35 + 0.25 * depth
            col = np.stack([0.35 * (0.6 + 0.5 * bark), 0.25 * (0.6 + 0.5 * bark), 0.18 * (0.6 + 0.5 * bark)], -1)
            col = lerp(np.array((0.6, 0.68, 0.6)), col, shade + 0.1)
            paint(img, np.abs(x - cx) < w, col)
        leaves = fractal(rng, 12 * (depth + 1), 4, 0.6)
        canopy = (leaves > 0.52 - 0.03 * depth) * (y < 0.35 + 0.1 * depth)
        paint(img, canopy, np.stack([0.1 + 0.2 * leaves, 0.3 + 0.3 * leaves, 0.08 + 0.1 * leaves], -1))
    paint(img, (y > 0.85) * 1.0, np.stack([0.3 + 0.1 * fog, 0.25 + 0.1 * fog, 0.15 + 0.05 * fog], -1))
    paint(img, np.clip(fog - 0.4, 0, 0.3) * (y > 0.5), (0.9, 0.92, 0.9))
    return img


def fabric(rng):
    y, x = _grid()
    # woven plaid with folds: diagonal shading, fine thread texture, sharp stripe edges
    warp = ((x * 16) % 1 < 0.35)
    weft = ((y * 16) % 1 < 0.35)
    base = np.array((0.2, 0.3, 0.55))
    img = np.broadcast_to(base, (N, N, 3)).copy()
    paint(img, warp * 0.6, (0.85, 0.75, 0.3))
    paint(img, weft * 0.6, (0.7, 0.15, 0.15))
    paint(img, ((x * 4) % 1 < 0.04) | ((y * 4) % 1 < 0.04), (0.95, 0.95, 0.95))
    threads = 0.5 + 0.5 * np.sin((x + y) * N * 0.7) * np.sin((x - y) * N * 0.7)
    img *= (0.85 + 0.15 * threads)[..., None]
    folds = 0.5 + 0.5 * np.sin(x * 9 + y * 4 + 2 * fractal(rng, 3, 3))
    img *= (0.55 + 0.6 * folds)[..., None]
    # a button
    paint(img, disc(y, x, 0.62, 0.35, 0.07), (0.9, 0.88, 0.8))
    for dy, dx in [(-0.02, -0.02), (-0.02, 0.02), (0.02, -0.02), (0.02, 0.02)]:
        paint(img, disc(y, x, 0.62 + dy, 0.35 + dx, 0.009), (0.2, 0.18, 0.15))
    return img


SCENES = [mountains, city, still_life, bricks, meadow, beach, forest, fabric]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = pathlib.Path(__file__).resolve().parent.parent
    p.add_argument("--out", default=str(here / "flaxrestore" / "data"))
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, scene in enumerate(SCENES):
        rng = np.random.default_rng(1000 + i)
        im = finish(scene(rng))
        path = out / f"{i:02d}_{scene.__name__}.png"
        im.save(path, optimize=True)
        total += path.stat().st_size
        print(f"{path} {path.stat().st_size / 1024:.0f} KiB")
    print(f"total {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
