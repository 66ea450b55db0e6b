"""flaxrestore.restore and `python -m flaxrestore`: protocols, tiling, ensemble, CLI.

Expected values never come from restore itself: each family's test-time protocol is re-done in
torch on the independent reference module with the same weights (F.pad with the mode the original
scripts use, forward, pick the output, crop, clamp); the tiling check uses a conv-only module whose
output depends on a bounded neighbourhood, and on the real networks (whose global operators see
each tile alone) the stitched result is compared with the tiles run in torch and blended by the
spec's window; the ensemble with the 8 transformed torch runs averaged; the CLI's outputs are
compared with the torch reference.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxrestore
from flaxrestore import checkpoints, imageio, layers, models
from flaxrestore import __main__ as cli
from flaxrestore.restore import Protocol, Restorer

RNG = np.random.default_rng(0)

# reduced widths: (registry name, overrides, the protocol written out here from the specs)
SMALL = {
    "restormer": ("restormer:motion_deblurring",
                  dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1), 8, "reflect"),
    "mprnet": ("mprnet:deblurring", dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1),
               8, "reflect"),
    "darkir": ("darkir:m", dict(width=8, enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1),
                                middle_blk_num_enc=1, middle_blk_num_dec=1), 8, "constant"),
    "snr": ("snr", dict(nf=8), 16, "reflect"),
    "aecrnet": ("aecrnet", dict(ngf=8), 4, "reflect"),
}


class ConvNet(nnx.Module):
    """Three 3x3 convs: each output pixel depends on a 7x7 neighbourhood (radius 3)."""

    def __init__(self, rngs):
        self.c1 = layers.Conv2d(3, 8, 3, padding=1, rngs=rngs)
        self.c2 = layers.Conv2d(8, 8, 3, padding=1, rngs=rngs)
        self.c3 = layers.Conv2d(8, 3, 3, padding=1, rngs=rngs)

    def __call__(self, x):
        return self.c3(jax.nn.relu(self.c2(jax.nn.relu(self.c1(x))))) + x


BOUNDED = Protocol(4, "reflect", clamp=False)


def _pad(a, multiple, mode):
    ph, pw = -a.shape[1] % multiple, -a.shape[2] % multiple
    return np.pad(a, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


@pytest.fixture(scope="module")
def convnet():
    return ConvNet(nnx.Rngs(0))


_PAIRS = {}


def small_pair(family):
    """(torch reference, Flax module with the same weights) at reduced width, built once.

    Converting torch-initialised weights is much cheaper here than a Flax random init, whose
    every parameter shape compiles its own random kernel.
    """
    if family not in _PAIRS:
        torch = pytest.importorskip("torch")
        import porting
        from porting import reference

        name, over, _, _ = SMALL[family]
        torch.manual_seed(0)
        ref = reference.build(name, **over).eval()
        _PAIRS[family] = (ref, porting.torch_to_flax(name, ref.state_dict(), **over))
    return _PAIRS[family]


@pytest.fixture(scope="module")
def small_restormer():
    return small_pair("restormer")[1]


def torch_protocol(family, ref, x, clamp=True):
    """The original scripts' test-time protocol in torch: pad bottom/right, run, pick, crop."""
    import torch
    import torch.nn.functional as F

    _, _, multiple, mode = SMALL[family]
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    h, w = t.shape[-2:]
    pad = (0, -w % multiple, 0, -h % multiple)
    args = [F.pad(t, pad, mode=mode)]
    if family == "snr":  # the SNR map of the unpadded image, padded like it
        from flaxrestore.models.snr import snr_map as model_snr_map

        m = torch.from_numpy(np.array(model_snr_map(jnp.asarray(x)))).permute(0, 3, 1, 2)
        args.append(F.pad(m, pad, mode=mode))
    with torch.no_grad():
        out = ref(*args)
    if family == "mprnet":
        out = out[0]  # stage 3
    out = out[..., :h, :w].permute(0, 2, 3, 1).numpy()
    return np.clip(out, 0, 1) if clamp else out


# --------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("tile,overlap,batch,n", [(16, 12, 3, 1), (24, 16, 4, 2), (20, 14, 1, 1)])
def test_tiled_equals_untiled_on_bounded_model(convnet, tile, overlap, batch, n):
    x = RNG.random((n, 37, 53, 3), dtype=np.float32)  # odd sizes, padded to 40 x 56
    direct = np.asarray(convnet(jnp.asarray(_pad(x, 4, "reflect"))))[:, :37, :53]
    untiled = flaxrestore.restore(convnet, x, protocol=BOUNDED)
    tiled = flaxrestore.restore(convnet, x, protocol=BOUNDED, tile=tile, tile_overlap=overlap,
                                batch=batch)
    assert tiled.shape == x.shape
    np.testing.assert_allclose(untiled, direct, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tiled, untiled, atol=1e-6, rtol=0)


def test_tiling_check_is_sensitive(convnet):
    # an overlap whose zero margin (overlap // 4 = 1) is below the receptive radius (3) must show
    x = RNG.random((1, 37, 53, 3), dtype=np.float32)
    untiled = flaxrestore.restore(convnet, x, protocol=BOUNDED)
    tiled = flaxrestore.restore(convnet, x, protocol=BOUNDED, tile=16, tile_overlap=4)
    assert np.abs(tiled - untiled).max() > 1e-3


def test_tile_geometry():
    from flaxrestore.restore import tile_starts

    assert tile_starts(40, 16, 8) == [0, 8, 16, 24]
    assert tile_starts(41, 16, 8) == [0, 8, 16, 24, 25]  # last aligned to the border
    assert tile_starts(10, 16, 8) == [0]
    with pytest.raises(ValueError, match="smaller than the multiple"):
        Restorer(ConvNet(nnx.Rngs(0)), protocol=Protocol(8, "reflect"), tile=4)
    with pytest.raises(ValueError, match="overlap"):
        Restorer(ConvNet(nnx.Rngs(0)), protocol=BOUNDED, tile=16, tile_overlap=16)


# ---------------------------------------------------- tiles and ensemble on the real networks


def _starts(size, tile, overlap):
    """Tile offsets from the spec: stride tile - overlap, the last tile flush with the end."""
    if tile >= size:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _edge_weight(length, overlap, near_start, near_end):
    """The spec's blend window along one axis: zero for overlap // 4 pixels at an edge shared
    with a neighbouring tile, then rising linearly to 1 over overlap - 2 * (overlap // 4)."""
    margin = overlap // 4
    rise = overlap - 2 * margin
    w = np.ones(length)
    ramp = np.array([min(1.0, max(0.0, (d - margin + 1) / (rise + 1))) for d in range(length)])
    if near_start:
        w = w * ramp
    if near_end:
        w = w * ramp[::-1]
    return w


def _dihedral(a, k, inverse=False):
    """The k-th of the 8 rotations/flips of NHWC ``a`` (rot90 k % 4 times, then a left-right
    flip for k >= 4), or its inverse."""
    if not inverse:
        a = np.rot90(a, k % 4, axes=(1, 2))
        return a[:, :, ::-1] if k >= 4 else a
    a = a[:, :, ::-1] if k >= 4 else a
    return np.rot90(a, -(k % 4), axes=(1, 2))


def torch_restore(family, ref, x, extras=(), *, tile=None, overlap=0, ensemble=False,
                  with_tiles=False):
    """The restore protocol written out around the torch reference: for each of the 8 (or 1)
    dihedral transforms of the image (and of its extra maps), pad bottom/right to the family's
    multiple, run the whole padded image or each tile, blend the tiles with the spec's window,
    crop, transform back; average; clamp. With ``with_tiles`` also every pixel's min and max
    over the tiles that cover it with a positive weight (untransformed runs only)."""
    import torch

    _, _, multiple, mode = SMALL[family]
    n, h, w = x.shape[:3]
    acc, lo, hi = 0.0, None, None
    ks = range(8) if ensemble else [0]
    for k in ks:
        xs = [np.ascontiguousarray(_dihedral(a, k)) for a in (x, *extras)]
        hh, ww = xs[0].shape[1:3]
        pads = ((0, 0), (0, -hh % multiple), (0, -ww % multiple), (0, 0))
        xs = [np.pad(a, pads, mode=mode) for a in xs]
        hp, wp = xs[0].shape[1:3]
        th, tw = (hp, wp) if tile is None else (min(tile, hp), min(tile, wp))
        out = np.zeros((n, hp, wp, 3))
        weight = np.zeros((hp, wp))
        lo_k, hi_k = np.full((n, hp, wp, 3), np.inf), np.full((n, hp, wp, 3), -np.inf)
        for y0 in _starts(hp, th, overlap):
            for x0 in _starts(wp, tw, overlap):
                args = [torch.from_numpy(np.ascontiguousarray(a[:, y0:y0 + th, x0:x0 + tw]))
                        .permute(0, 3, 1, 2) for a in xs]
                with torch.no_grad():
                    y = ref(*args).permute(0, 2, 3, 1).numpy().astype(np.float64)
                win = np.outer(_edge_weight(th, overlap, y0 > 0, y0 + th < hp),
                               _edge_weight(tw, overlap, x0 > 0, x0 + tw < wp))
                out[:, y0:y0 + th, x0:x0 + tw] += y * win[..., None]
                weight[y0:y0 + th, x0:x0 + tw] += win
                cover = (win > 0)[None, :, :, None]
                sl = (slice(None), slice(y0, y0 + th), slice(x0, x0 + tw))
                lo_k[sl] = np.where(cover, np.minimum(lo_k[sl], y), lo_k[sl])
                hi_k[sl] = np.where(cover, np.maximum(hi_k[sl], y), hi_k[sl])
        out = out / weight[None, :, :, None]
        acc = acc + _dihedral(out[:, :hh, :ww], k, inverse=True)
        if k == 0:
            lo, hi = lo_k[:, :h, :w], hi_k[:, :h, :w]
    result = np.clip(acc / len(ks), 0, 1).astype(np.float32)
    return (result, lo, hi) if with_tiles else result


REAL_TILING = {  # case: (family, registry name or None for SMALL's, image size, tile, overlap)
    "restormer": ("restormer", None, 37, 24, 12),  # channel attention: global per tile
    "snr": ("snr", None, 37, 32, 16),  # SNR map as a second input; transformer over the tile
    "dual_pixel": ("restormer", "restormer:dual_pixel_defocus_deblurring", 29, 16, 8),
}


@pytest.mark.parametrize("case", list(REAL_TILING))
def test_tiles_and_ensemble_on_real_networks_match_torch(case):
    """Multi-tile stitching and the x8 ensemble on the real networks (global operators, so
    tiling changes the numbers) against the protocol written out around the torch reference;
    every stitched pixel lies between the outputs of the tiles that cover it (the seam bound)."""
    torch = pytest.importorskip("torch")
    import porting
    from porting import reference

    family, name, size, tile, overlap = REAL_TILING[case]
    if name is None:
        ref, module = small_pair(family)
    else:
        over = SMALL[family][1]
        torch.manual_seed(3)
        ref = reference.build(name, **over).eval()
        module = porting.torch_to_flax(name, ref.state_dict(), **over)
    rng = np.random.default_rng(11)
    channels = 6 if case == "dual_pixel" else 3
    x = rng.uniform(0.05, 0.6, (1, size, size, channels)).astype(np.float32)
    extras = ()
    if family == "snr":
        from flaxrestore.models.snr import snr_map  # checked against a float64 spec: test_snr.py

        extras = (np.array(snr_map(jnp.asarray(x)), np.float32),)
    image = (x[0, ..., :3], x[0, ..., 3:]) if case == "dual_pixel" else x[0]

    tiled = flaxrestore.restore(module, image, tile=tile, tile_overlap=overlap)
    expected, lo, hi = torch_restore(family, ref, x, extras, tile=tile, overlap=overlap,
                                     with_tiles=True)
    np.testing.assert_allclose(tiled, expected[0], atol=1e-4, rtol=0)
    # seam bound, from the tiles alone: no blend weight reaches outside the covering tiles
    assert np.all(tiled >= np.clip(lo[0], 0, 1) - 1e-4) and np.all(tiled <= np.clip(hi[0], 0, 1) + 1e-4)
    # the tiles really differ from one whole-image run (global operators see each tile alone),
    # so an implementation that ignored `tile` would fail the comparison above
    whole = torch_restore(family, ref, x, extras)
    assert np.abs(expected - whole).max() > 1e-3

    both = flaxrestore.restore(module, image, tile=tile, tile_overlap=overlap, ensemble=True)
    expected = torch_restore(family, ref, x, extras, tile=tile, overlap=overlap, ensemble=True)
    np.testing.assert_allclose(both, expected[0], atol=1e-4, rtol=0)
    assert np.abs(expected - torch_restore(family, ref, x, extras, tile=tile,
                                           overlap=overlap)).max() > 1e-3


# ------------------------------------------------------------------------------ protocols


@pytest.mark.parametrize("family", sorted(SMALL))
def test_one_tile_equals_untiled_and_the_protocol(family):
    ref, module = small_pair(family)
    assert models.protocol(family).multiple == SMALL[family][2]
    x = RNG.uniform(0.05, 0.6, (1, 21, 27, 3)).astype(np.float32)  # odd sizes
    expected = torch_protocol(family, ref, x)
    untiled = flaxrestore.restore(module, x)
    one_tile = flaxrestore.restore(module, x, tile=64, tile_overlap=8)
    tol = 1e-4 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(untiled, expected, atol=tol, rtol=0)
    np.testing.assert_allclose(one_tile, untiled, atol=1e-6, rtol=0)
    if family == "aecrnet":  # restore ran an eval-mode view; the caller's module is untouched
        assert module.deconv.use_running_average is False


def _snr_map_float64(x):
    """SNR map written out from the spec (B2), in float64 with an explicit 25-tap box filter."""
    p = np.pad(x.astype(np.float64), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    blur = sum(p[:, i:i + h, j:j + w] for i in range(5) for j in range(5)) / 25
    grey = lambda a: 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]  # noqa: E731
    snr = grey(blur) / (np.abs(grey(x) - grey(blur)) + 1e-4)
    snr = snr / (snr.max(axis=(1, 2), keepdims=True) + 1e-4)
    return np.clip(snr, 0, 1)[..., None]


def test_snr_map_protocol():
    x = RNG.random((2, 19, 23, 3), dtype=np.float32) * 0.3
    (got,) = models.protocol("snr").extra_inputs(x)
    assert got.shape == (2, 19, 23, 1)
    # float32 rounding of the blur is amplified by 1/(noise + 1e-4): compare relatively
    np.testing.assert_allclose(got, _snr_map_float64(x), rtol=1e-3, atol=1e-6)


def test_dual_pixel_pair():
    torch = pytest.importorskip("torch")
    import porting
    from porting import reference

    name, over = "restormer:dual_pixel_defocus_deblurring", SMALL["restormer"][1]
    torch.manual_seed(1)
    ref = reference.build(name, **over).eval()
    module = porting.torch_to_flax(name, ref.state_dict(), **over)
    left, right = (RNG.random((21, 27, 3), dtype=np.float32) for _ in range(2))
    got = flaxrestore.restore(module, (left, right))
    expected = torch_protocol("restormer", ref, np.concatenate([left, right], -1)[None])[0]
    assert got.shape == (21, 27, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="dual-pixel"):
        flaxrestore.restore(module, left)


def test_cli_dual_pixel_right_views(tmp_path, capsys):
    """--input takes the left views, --right the right views (matched in sorted order)."""
    torch = pytest.importorskip("torch")
    from porting import reference

    name, over = "restormer:dual_pixel_defocus_deblurring", SMALL["restormer"][1]
    torch.manual_seed(2)
    ref = reference.build(name, **over).eval()
    torch.save({"params": ref.state_dict()}, tmp_path / "dp.pth")
    for side in ("L", "R"):
        os.makedirs(tmp_path / side)
    pairs = {}
    for stem in ("a", "b"):
        left, right = (RNG.random((19, 26, 3)) for _ in range(2))
        imageio.write_image(tmp_path / "L" / f"{stem}.png", left, bit_depth=16)
        imageio.write_image(tmp_path / "R" / f"{stem}.png", right, bit_depth=16)
        pairs[stem] = [imageio.read_image(tmp_path / s / f"{stem}.png").pixels for s in ("L", "R")]
    config = [a for k, v in over.items() for a in ("--config", f"{k}={v}")]
    base = ["restore", name, "--weights", str(tmp_path / "dp.pth"), "--input", str(tmp_path / "L")]
    rc = cli.main(base + ["--right", str(tmp_path / "R"), "--output", str(tmp_path / "out")] + config)
    assert rc == 0
    for stem, (left, right) in pairs.items():
        out = imageio.read_image(tmp_path / "out" / f"{stem}.png")
        expected = torch_protocol("restormer", ref, np.concatenate([left, right], -1)[None])[0]
        assert out.bit_depth == 16 and out.pixels.shape == (19, 26, 3)
        np.testing.assert_allclose(out.pixels, expected, atol=1e-4, rtol=0)
    capsys.readouterr()
    # without --right, or with a different number of right views: a clear error, nothing written
    assert cli.main(base + ["--output", str(tmp_path / "o2")] + config) == 2
    assert "--right" in capsys.readouterr().err
    os.remove(tmp_path / "R" / "b.png")
    assert cli.main(base + ["--right", str(tmp_path / "R"), "--output", str(tmp_path / "o3")]
                    + config) == 2
    assert "--right gives 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o2") and not os.path.exists(tmp_path / "o3")


def test_grey_and_colour_mismatch(small_restormer):
    torch = pytest.importorskip("torch")
    import porting
    from porting import reference

    name, over = "restormer:gaussian_gray_denoising", SMALL["restormer"][1]
    torch.manual_seed(2)
    ref = reference.build(name, **over).eval()
    grey_model = porting.torch_to_flax(name, ref.state_dict(), **over)
    rgb = RNG.random((21, 27, 3), dtype=np.float32)
    # a grey model on colour: each channel is restored as its own grey image
    expected = torch_protocol("restormer", ref, rgb.transpose(2, 0, 1)[..., None])
    np.testing.assert_allclose(flaxrestore.restore(grey_model, rgb),
                               expected[..., 0].transpose(1, 2, 0), atol=1e-4)
    # a colour model on grey: the grey image replicated to RGB, the result averaged
    grey = rgb[..., :1]
    ref_rgb = small_pair("restormer")[0]
    full = torch_protocol("restormer", ref_rgb, np.repeat(grey, 3, -1)[None], clamp=False)[0]
    out = flaxrestore.restore(small_restormer, grey)
    assert out.shape == (21, 27, 1)
    np.testing.assert_allclose(out[..., 0], np.clip(full.mean(-1), 0, 1), atol=1e-4)


def test_self_ensemble(convnet):
    x = RNG.random((1, 18, 26, 3), dtype=np.float32)
    got = flaxrestore.restore(convnet, x, protocol=BOUNDED, ensemble=True)
    acc = np.zeros_like(x)
    for flip in (False, True):
        for k in range(4):
            t = np.rot90(x, k, axes=(1, 2))
            t = t[:, :, ::-1] if flip else t
            y = flaxrestore.restore(convnet, np.ascontiguousarray(t), protocol=BOUNDED)
            y = y[:, :, ::-1] if flip else y
            acc += np.rot90(y, -k, axes=(1, 2))
    np.testing.assert_allclose(got, acc / 8, atol=1e-6)
    assert np.abs(got - flaxrestore.restore(convnet, x, protocol=BOUNDED)).max() > 1e-3


def test_bfloat16(convnet):
    x = RNG.random((1, 18, 26, 3), dtype=np.float32)
    f32 = flaxrestore.restore(convnet, x, protocol=BOUNDED)
    b16 = flaxrestore.restore(convnet, x, protocol=BOUNDED, dtype=jnp.bfloat16)
    assert b16.dtype == np.float32
    assert 0 < np.abs(b16 - f32).max() < 0.05


# -------------------------------------------------------------------------------------- CLI


def _write_inputs(d):
    """An input folder: 8/16-bit, grey, RGBA, JPEG, TIFF, odd sizes, and one corrupt file.

    Every size pads to 24 x 32, so the network compiles for two batch shapes only."""
    os.makedirs(d)
    q = lambda a, top: (np.rint(a * top) / top).astype(np.float32)  # noqa: E731
    files = {  # name: (pixels, alpha, bit depth)
        "a.png": (q(RNG.random((21, 27, 3)), 255), None, 8),
        "b.png": (q(RNG.random((21, 27, 3)), 65535), None, 16),  # batched with a.png
        "c.png": (q(RNG.random((21, 27, 1)), 255), None, 8),  # grey through an RGB model
        "d.png": (q(RNG.random((19, 30, 3)), 255), q(RNG.random((19, 30)), 255), 8),
        "e.tif": (q(RNG.random((24, 25, 3)), 65535), q(RNG.random((24, 25)), 65535), 16),
        "f.jpg": (q(np.linspace(0.1, 0.8, 20 * 28 * 3).reshape(20, 28, 3), 255), None, 8),
    }
    for name, (px, alpha, depth) in files.items():
        imageio.write_image(os.path.join(d, name), px, alpha, depth)
    with open(os.path.join(d, "z_bad.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    return files


def test_cli_folder_converting_torch_checkpoint_on_the_fly(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    ref, _ = small_pair("restormer")
    name, over, _, _ = SMALL["restormer"]
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    files = _write_inputs(str(tmp_path / "in"))
    config = [a for k, v in over.items() for a in ("--config", f"{k}={v}")]
    rc = cli.main(["restore", name, "--weights", str(tmp_path / "w.pth"), "--input",
                   str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--batch", "2"]
                  + config)
    err = capsys.readouterr().err
    assert rc == 1  # one file failed
    assert "FAILED" in err and "z_bad.png" in err and "restored 6 of 7" in err
    assert sorted(os.listdir(tmp_path / "out")) == sorted(files)
    for fname, (_, alpha, depth) in files.items():
        src = imageio.read_image(tmp_path / "in" / fname)
        out = imageio.read_image(tmp_path / "out" / fname)
        assert out.bit_depth == src.bit_depth == depth
        assert out.pixels.shape == src.pixels.shape
        if alpha is not None:
            np.testing.assert_array_equal(out.alpha, src.alpha)
        else:
            assert out.alpha is None
        x = src.pixels if not src.is_gray else np.repeat(src.pixels, 3, -1)
        expected = torch_protocol("restormer", ref, x[None], clamp=False)[0]
        if src.is_gray:
            expected = expected.mean(-1, keepdims=True)
        expected = np.clip(expected, 0, 1)
        err = np.abs(out.pixels - expected)
        if fname.endswith(".jpg"):
            assert err.mean() < 4 / 255  # JPEG re-encoding of the result
        else:  # quantisation to the file's depth, nothing more
            assert err.max() < 0.51 / (2 ** depth - 1) + 1e-5


def test_cli_tiles_ensemble_bfloat16_flax_directory(tmp_path, small_restormer, monkeypatch):
    """The CLI with tiles and the x8 ensemble, from a Flax model directory, in float32 and in
    bfloat16, against the protocol written out around the torch reference (float32)."""
    pytest.importorskip("torch")
    name, over, _, _ = SMALL["restormer"]
    ref, _ = small_pair("restormer")
    model_dir = checkpoints.save_model(tmp_path / "model", name, small_restormer, overrides=over)
    loaded = []

    def spy(*args, **kwargs):  # to check which weights the CLI used
        loaded.append(load_weights(*args, **kwargs))
        return loaded[-1]

    load_weights = cli.load_weights
    monkeypatch.setattr(cli, "load_weights", spy)
    os.makedirs(tmp_path / "in")
    imageio.write_image(tmp_path / "in" / "big.png", RNG.random((40, 35, 3)), bit_depth=16)
    src = imageio.read_image(tmp_path / "in" / "big.png").pixels
    expected = torch_restore("restormer", ref, src[None], tile=24, overlap=8, ensemble=True)[0]
    outs = {}
    for dtype in ("float32", "bfloat16"):
        rc = cli.main(["restore", name, "--weights", model_dir, "--input",
                       str(tmp_path / "in" / "*.png"), "--output", str(tmp_path / dtype),
                       "--tile", "24", "--tile-overlap", "8", "--ensemble", "--dtype", dtype])
        assert rc == 0
        outs[dtype] = imageio.read_image(tmp_path / dtype / "big.png").pixels
    for module in loaded:
        for a, b in zip(jax.tree.leaves(nnx.state(module, nnx.Param)),
                        jax.tree.leaves(nnx.state(small_restormer, nnx.Param))):
            np.testing.assert_array_equal(a, b)  # the Flax directory held these weights
    # float32: the torch expectation up to the 16-bit quantisation of the output file
    assert np.abs(outs["float32"] - expected).max() < 0.51 / 65535 + 1e-4
    # bfloat16 (8 mantissa bits) really ran, and stays within its rounding of the expectation
    err = np.abs(outs["bfloat16"] - expected)
    assert 1e-3 < err.max() < 0.05 and err.mean() < 0.01, (err.max(), err.mean())


def test_cli_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "w.pth").write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(cli.CliError, match=r"torch extra"):
        cli.load_weights("restormer:motion_deblurring", str(tmp_path / "w.pth"))
    imageio.write_image(tmp_path / "x.png", np.zeros((4, 4, 3)))
    assert cli.main(["restore", "restormer:motion_deblurring", "--weights", str(tmp_path / "no"),
                     "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "weights not found" in capsys.readouterr().err
    assert cli.main(["restore", "nosuchmodel", "--weights", str(tmp_path / "w.pth"),
                     "--input", str(tmp_path / "w.pth"), "--output", str(tmp_path / "o")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli.main(["restore", "restormer:motion_deblurring", "--weights", str(tmp_path / "w.pth"),
                     "--input", str(tmp_path / "*.webp"), "--output", str(tmp_path / "o")]) == 2
    assert "no input matches" in capsys.readouterr().err


def test_cli_reads_safetensors_without_torch(tmp_path, small_restormer, monkeypatch):
    import porting
    from safetensors.numpy import save_file

    name, over, _, _ = SMALL["restormer"]
    save_file(porting.flax_to_numpy(small_restormer), str(tmp_path / "w.safetensors"))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    module = cli.load_weights(name, str(tmp_path / "w.safetensors"), overrides=over)
    for a, b in zip(jax.tree.leaves(nnx.state(module, nnx.Param)),
                    jax.tree.leaves(nnx.state(small_restormer, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_cli_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in models.names():
        assert name in out


def test_package_does_not_import_torch():
    code = ("import sys, flaxrestore, flaxrestore.imageio, flaxrestore.__main__; "
            "flaxrestore.restore; import flaxrestore.restore as r; assert callable(r); "
            "assert 'torch' not in sys.modules and 'porting' not in sys.modules, "
            "[m for m in sys.modules if m.split('.')[0] in ('torch', 'porting')]")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
