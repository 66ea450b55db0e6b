"""The native CPU kernels (flaxrestore.xla_cpu.native): against torch, against the pure-JAX path they
replace, where they are used, and what happens when they cannot be built."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from flax import nnx

import jax
import jax.numpy as jnp
from flaxrestore import layers, lowering
from flaxrestore.xla_cpu import convs as xla_convs
from flaxrestore.xla_cpu import native

needs_native = pytest.mark.skipif(native._compiler() is None or jax.default_backend() != "cpu",
                                  reason="no C++ compiler on this machine (or not on CPU)")


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _torch_depthwise_grads(x, kernel, dy, pad, dil):
    """torch's depthwise conv2d (groups = C): (kernel gradient HWIO, input gradient NHWC)."""
    c = x.shape[-1]
    tw = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy()).requires_grad_()
    tx = _nchw(x).requires_grad_()
    ty = torch.nn.functional.conv2d(tx, tw, None, 1, pad, dil, groups=c)
    (ty * _nchw(dy)).sum().backward()
    return tw.grad.numpy().transpose(2, 3, 1, 0), tx.grad.numpy().transpose(0, 2, 3, 1)


@needs_native
@pytest.mark.parametrize("shape,k,pad,dil", [
    ((2, 9, 11, 5), 3, (1, 1), (1, 1)),    # Restormer / DarkIR: 3x3, same padding
    ((1, 8, 8, 17), 3, (0, 0), (1, 1)),    # no padding: output smaller than x
    ((3, 7, 10, 4), 3, (2, 2), (2, 2)),    # dilated (DarkIR's dilated branches)
    ((2, 12, 9, 3), 5, (3, 1), (1, 2)),    # 5x5, unequal padding / dilation per axis
    ((1, 5, 6, 1), 3, (3, 3), (1, 1)),     # padding beyond the kernel: output larger than x
    ((2, 33, 40, 48), 3, (1, 1), (1, 1)),  # enough rows and channels to split over threads
])
def test_depthwise_kernel_grad_matches_torch(shape, k, pad, dil):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((k, k, 1, shape[-1])).astype(np.float32)
    ho = shape[1] + 2 * pad[0] - dil[0] * (k - 1)
    wo = shape[2] + 2 * pad[1] - dil[1] * (k - 1)
    dy = rng.standard_normal((shape[0], ho, wo, shape[-1])).astype(np.float32)
    t_kernel, _ = _torch_depthwise_grads(x, kernel, dy, pad, dil)
    assert native.available(), native.load_error()
    got = jax.jit(lambda x, dy: native.depthwise_kernel_grad(x, dy, (k, k), pad, dil))(x, dy)
    assert got.shape == (k, k, 1, shape[-1])
    np.testing.assert_allclose(np.asarray(got), t_kernel, rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("shape,k,pad,dil", [
    ((2, 9, 11, 5), 3, (1, 1), (1, 1)),
    ((1, 8, 8, 17), 3, (0, 0), (1, 1)),
    ((3, 7, 10, 4), 3, (2, 2), (2, 2)),
    ((2, 12, 9, 3), 5, (3, 1), (1, 2)),
    ((1, 5, 6, 1), 3, (3, 3), (1, 1)),
    ((2, 33, 40, 48), 3, (1, 1), (1, 1)),
])
def test_depthwise_conv_and_input_grad_match_torch(shape, k, pad, dil):
    """native.depthwise_conv as the forward (top-left offset = padding) and as the input
    gradient (the flipped kernel, offset dilation * (k - 1) - padding, x's size)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((k, k, 1, shape[-1])).astype(np.float32)
    c = shape[-1]
    tx = _nchw(x).requires_grad_()
    tw = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    ty = torch.nn.functional.conv2d(tx, tw, None, 1, pad, dil, groups=c)
    dy = rng.standard_normal(ty.shape).astype(np.float32)
    (ty * torch.from_numpy(dy)).sum().backward()
    dy = dy.transpose(0, 2, 3, 1)
    out_hw = dy.shape[1:3]
    assert native.available(), native.load_error()
    y = native.depthwise_conv(jnp.asarray(x), jnp.asarray(kernel), out_hw, pad, dil)
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)
    top_left = (dil[0] * (k - 1) - pad[0], dil[1] * (k - 1) - pad[1])
    dx = native.depthwise_conv(jnp.asarray(dy), jnp.asarray(kernel[::-1, ::-1].copy()),
                               shape[1:3], top_left, dil)
    np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)


@needs_native
def test_native_depthwise_rejects_bad_input():
    x = jnp.zeros((1, 6, 6, 4))
    with pytest.raises(ValueError, match="dy has shape"):
        native.depthwise_kernel_grad(x, jnp.zeros((1, 5, 6, 4)), (3, 3), (1, 1))
    with pytest.raises(TypeError, match="float32"):
        native.depthwise_kernel_grad(x.astype(jnp.bfloat16), jnp.zeros((1, 6, 6, 4), jnp.bfloat16),
                                     (3, 3), (1, 1))
    with pytest.raises(ValueError, match="kernel has shape"):
        native.depthwise_conv(x, jnp.zeros((3, 3, 1, 5)), (6, 6), (1, 1))
    with pytest.raises(TypeError, match="float32"):
        native.depthwise_conv(x.astype(jnp.bfloat16), jnp.zeros((3, 3, 1, 4)), (6, 6), (1, 1))


def _depthwise_conv_grads(conv, x, dy):
    graphdef, state = nnx.split(conv)
    grad = jax.jit(jax.grad(lambda st, x: jnp.sum(nnx.merge(graphdef, st)(x) * dy), (0, 1)),
                   compiler_options=lowering.compiler_options())
    g_state, g_x = grad(state, jnp.asarray(x))
    return np.asarray(g_state["kernel"][...]), np.asarray(g_x), grad


@needs_native
@pytest.mark.parametrize("pad,dil", [(1, 1), (2, 2)])
def test_conv2d_depthwise_grads_native_and_jax_paths_match_torch(monkeypatch, pad, dil):
    """Conv2d's depthwise conv and its gradients with the native kernels and with the pure-JAX
    formulation (FLAXRESTORE_NATIVE=0): both equal torch's, and only the first calls them."""
    rng = np.random.default_rng(3)
    c = 12
    conv = layers.Conv2d(c, c, 3, padding=pad, dilation=dil, groups=c, rngs=nnx.Rngs(0))
    x = rng.standard_normal((2, 10, 9, c)).astype(np.float32)
    dy = rng.standard_normal(conv(jnp.asarray(x)).shape).astype(np.float32)
    t_kernel, t_x = _torch_depthwise_grads(x, conv.kernel[...], dy, (pad, pad), (dil, dil))
    tx = _nchw(x)
    tw = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy())
    t_y = torch.nn.functional.conv2d(tx, tw, torch.from_numpy(np.array(conv.bias[...])), 1,
                                     pad, dil, groups=c).numpy().transpose(0, 2, 3, 1)
    texts = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(native.NATIVE_ENV, setting)
        graphdef, state = nnx.split(conv)
        y = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(y), t_y, rtol=1e-5, atol=1e-5)
        g_kernel, g_x, grad = _depthwise_conv_grads(conv, x, dy)
        np.testing.assert_allclose(g_kernel, t_kernel, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g_x, t_x, rtol=1e-4, atol=1e-4)
        texts[setting] = grad.lower(nnx.split(conv)[1], jnp.asarray(x)).as_text()
    for target in ("flaxrestore_depthwise_conv", "flaxrestore_depthwise_kernel_grad"):
        assert target in texts["1"]
        assert target not in texts["0"]


def _windows_reference(src, kernel_hw, out_hw, offset, step):
    """numpy: out[b, y, x, (i*kw + j)*C + c] = src[b, y + oy + i*sy, x + ox + j*sx, c] or 0."""
    b, h, w, c = src.shape
    kh, kw = kernel_hw
    out = np.zeros((b, *out_hw, kh * kw * c), np.float32)
    for i in range(kh):
        for j in range(kw):
            t = i * kw + j
            for y in range(out_hw[0]):
                for x in range(out_hw[1]):
                    sy, sx = y + offset[0] + i * step[0], x + offset[1] + j * step[1]
                    if 0 <= sy < h and 0 <= sx < w:
                        out[:, y, x, t * c:(t + 1) * c] = src[:, sy, sx]
    return out


@needs_native
@pytest.mark.parametrize("shape,kernel_hw,out_hw,offset,step", [
    ((2, 7, 6, 5), (3, 3), (7, 6), (-1, -1), (1, 1)),    # a padded conv's windows of x
    ((1, 9, 8, 3), (3, 3), (9, 8), (2, 2), (-2, -2)),    # dy's windows, dilation 2 (backwards)
    ((2, 6, 7, 4), (5, 3), (2, 5), (1, 0), (1, 1)),      # a block of rows, unpadded, 5x3
    ((1, 4, 5, 2), (3, 3), (7, 8), (-3, -3), (1, 1)),    # padding larger than the kernel
    ((3, 40, 33, 16), (3, 3), (40, 33), (-1, -1), (1, 1)),  # enough work for several threads
])
def test_native_windows_match_numpy(shape, kernel_hw, out_hw, offset, step):
    src = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    got = jax.jit(lambda s: native.windows(s, kernel_hw, out_hw, offset, step))(jnp.asarray(src))
    np.testing.assert_array_equal(np.asarray(got),
                                  _windows_reference(src, kernel_hw, out_hw, offset, step))


@needs_native
def test_native_windows_reject_bad_input():
    with pytest.raises(TypeError, match="float32"):
        native.windows(jnp.zeros((1, 4, 4, 2), jnp.bfloat16), (3, 3), (4, 4))
    with pytest.raises(ValueError, match="NHWC"):
        native.windows(jnp.zeros((4, 4, 2)), (3, 3), (4, 4))


@needs_native
@pytest.mark.parametrize("cin,cout", [(16, 3), (3, 16), (8, 8)])
def test_conv_kernel_grad_native_and_jax_windows_agree(monkeypatch, cin, cout):
    """xla_convs.conv_kernel_grad with the native windows and with XLA's concatenated slices
    (FLAXRESTORE_NATIVE=0): both equal the per-tap matmuls, and only the first calls the
    kernel."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 13, 12, cin)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((2, 13, 12, cout)), jnp.float32)
    shape = (3, 3, cin, cout)
    want = xla_convs.conv_kernel_grad_taps(x, dy, shape, padding=(1, 1))
    for setting in ("1", "0"):
        monkeypatch.setenv(native.NATIVE_ENV, setting)
        fn = jax.jit(lambda x, dy: xla_convs.conv_kernel_grad(x, dy, shape, padding=(1, 1)))
        np.testing.assert_allclose(np.asarray(fn(x, dy)), np.asarray(want), rtol=1e-5, atol=1e-4)
        uses = "flaxrestore_windows" in fn.lower(x, dy).as_text()
        assert uses == (setting == "1")


def _sample_points(rng, n, p, h, w):
    """Positions (N, P) over and around an h x w image: random ones, integers, the exact
    borders -1, 0, H-1, H, just inside and outside them, and far away."""
    py = rng.uniform(-2.5, h + 1.5, (n, p))
    px = rng.uniform(-2.5, w + 1.5, (n, p))
    special_y = [-1.0, -0.999, 0.0, h - 1.0, h - 0.001, float(h), 1e7, -1e7, 2.0, 1.5]
    special_x = [0.5, -1.0, -0.5, w - 1.0, float(w), w - 0.25, 3.0, -1e7, 1e7, 1.0]
    py[0, :len(special_y)] = special_y
    px[0, :len(special_x)] = special_x
    return py.astype(np.float32), px.astype(np.float32)


@needs_native
@pytest.mark.parametrize("shape,points", [((2, 6, 7, 5), 90), ((1, 16, 12, 64), 2000)])
def test_native_bilinear_sample_and_grads_match_the_jax_path(monkeypatch, shape, points):
    """native.bilinear_sample (+ its gradients, through layers._bilinear_gather_zero's custom
    vjp) against the pure-JAX gathers (FLAXRESTORE_NATIVE=0): same values, same gradients for
    the image and both coordinates, and only the native run calls the kernels."""
    rng = np.random.default_rng(8)
    n, h, w, c = shape
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    py, px = (jnp.asarray(a) for a in _sample_points(rng, n, points, h, w))
    py, px = py.reshape(n, points // 2, 2), px.reshape(n, points // 2, 2)  # any (N, *S) works
    g = jnp.asarray(rng.standard_normal((n, points // 2, 2, c)), jnp.float32)
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(native.NATIVE_ENV, setting)
        fn = jax.jit(jax.value_and_grad(
            lambda x, py, px: jnp.sum(layers._bilinear_gather_zero(x, py, px) * g), (0, 1, 2)))
        results[setting] = fn(x, py, px)
        assert ("flaxrestore_bilinear_sample_grad" in fn.lower(x, py, px).as_text()) == (
            setting == "1")
        sample = jax.jit(layers._bilinear_gather_zero)
        results[setting + "y"] = sample(x, py, px)
        assert sample(x, py, px).shape == (n, points // 2, 2, c)
    np.testing.assert_allclose(np.asarray(results["1y"]), np.asarray(results["0y"]), rtol=1e-6,
                               atol=1e-6)
    (v1, g1), (v0, g0) = results["1"], results["0"]
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-5 * float(np.abs(np.asarray(b)).max()))
    # far-away points (flat indices 6 and 7: py = +-1e7) read nothing and get no gradient
    assert not np.asarray(results["1y"])[0, 3:4].any()
    assert not np.asarray(g1[1])[0, 3].any() and not np.asarray(g1[2])[0, 3].any()


@needs_native
def test_native_bilinear_sample_rejects_bad_input():
    img, pts = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 5))
    with pytest.raises(TypeError, match="float32"):
        native.bilinear_sample(img.astype(jnp.bfloat16), pts, pts)
    with pytest.raises(ValueError, match="same N"):
        native.bilinear_sample(img, jnp.zeros((1, 5)), jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="expected float32"):
        native.bilinear_sample_grad(img, pts, pts, jnp.zeros((2, 5, 4)))


def _run_isolated(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    full_env.pop(native.NATIVE_ENV, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300)


_FALLBACK_CHECK = """
    import warnings
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    from flaxrestore import layers
    from flaxrestore.xla_cpu import native
    conv = layers.Conv2d(6, 6, 3, padding=1, groups=6, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((1, 7, 8, 6)).astype(np.float32)
    graphdef, state = nnx.split(conv)
    loss = lambda st, x: jnp.sum(jnp.square(nnx.merge(graphdef, st)(x)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = jax.jit(jax.grad(loss))(state, jnp.asarray(x))["kernel"][...]
    print("AVAILABLE", native.available())
    print("ERROR", str(native.load_error()).replace("\\n", " | "))
    print("WARNED", sum("native CPU kernels unavailable" in str(w.message) for w in caught))
    # the pure-JAX kernel gradient, written out: sum over the shifted padded x times dy
    y = conv(jnp.asarray(x)); dy = 2 * y
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.stack([np.einsum("bhwc,bhwc->c", xp[:, i:i + 7, j:j + 8], np.asarray(dy))
                    for i in range(3) for j in range(3)]).reshape(3, 3, 1, 6)
    print("MAXDIFF", float(np.abs(np.asarray(g) - ref).max()))
"""


def _parse(out: str) -> dict:
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _assert_fell_back(proc, reason: str) -> None:
    """The isolated run found no native kernels (load error containing ``reason``), warned once
    and still computed the right kernel gradient."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _parse(proc.stdout)
    assert got["AVAILABLE"] == "False"
    assert reason in got["ERROR"]
    assert got["WARNED"] == "1"
    assert float(got["MAXDIFF"]) < 1e-4


def test_no_compiler_falls_back_with_a_warning(tmp_path):
    """Without any C++ compiler the gradient still comes out right (pure-JAX path), after one
    warning that names the reason."""
    proc = _run_isolated(_FALLBACK_CHECK, PATH=str(tmp_path), CXX="",
                         FLAXRESTORE_CACHE_DIR=str(tmp_path / "cache"))
    _assert_fell_back(proc, "no C++ compiler")


def test_failing_build_falls_back_with_the_compiler_error(tmp_path):
    """A compiler that fails: the error carries its output; the gradient is still right."""
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake compiler: refusing' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = _run_isolated(_FALLBACK_CHECK, CXX=str(fake),
                         FLAXRESTORE_CACHE_DIR=str(tmp_path / "cache"))
    _assert_fell_back(proc, "refusing")
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache").rglob("*"))


@needs_native
def test_build_is_cached_and_reused(tmp_path):
    """The first process builds into the cache directory (or finds the library another test's
    process built there: a second from-scratch build would cost ~20 s of make test; the build
    itself is what every other native test loads); a second one loads the same file without
    compiling (its compiler would fail)."""
    code = """
        from flaxrestore.xla_cpu import native
        print("AVAILABLE", native.available())
        print("PATH", native.library_path())
        print("ERROR", str(native.load_error()).replace("\\n", " | "))
    """
    cache = os.environ.get(native.CACHE_ENV) or os.path.dirname(native.cache_dir())
    first = _parse(_run_isolated(code, FLAXRESTORE_CACHE_DIR=cache).stdout)
    assert first["AVAILABLE"] == "True", first
    assert first["PATH"].startswith(os.path.join(cache, "native")), first
    # same compiler path and version, but compiling now fails: only a cache hit can succeed
    real = native._compiler()
    wrapper = tmp_path / "bin" / os.path.basename(real)
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then exec {real} --version; fi\n'
                       "exit 1\n")
    wrapper.chmod(0o755)
    second = _parse(_run_isolated(code, FLAXRESTORE_CACHE_DIR=str(cache),
                                  CXX=str(wrapper)).stdout)
    assert second["AVAILABLE"] == "True", second
    assert second["PATH"] == first["PATH"]


@needs_native
@pytest.mark.parametrize("shape,pad", [((2, 7, 9, 11), (1, 1)), ((1, 6, 5, 16), (0, 2)),
                                       ((3, 33, 30, 24), (2, 0))])
def test_native_winograd_transforms_match_numpy(shape, pad):
    """native.winograd_input / winograd_output against their definitions written out in numpy
    (zero-padded 4x4 windows times BT on both sides; AT on both sides, cropped), odd sizes and
    channel counts that leave tails after runs of 8."""
    rng = np.random.default_rng(9)
    n, h, w, c = shape
    ph, pw = pad
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    x = rng.standard_normal(shape).astype(np.float32)
    bt, at = np.asarray(xla_convs._WINO_BT, np.float64), np.asarray(xla_convs._WINO_AT, np.float64)
    xp = np.zeros((n, 2 * th + 2, 2 * tw + 2, c))
    xp[:, ph:ph + h, pw:pw + w] = x[:, :2 * th + 2 - ph, :2 * tw + 2 - pw]
    want_v = np.zeros((16, n * th * tw, c))
    for b in range(n):
        for ty in range(th):
            for tx in range(tw):
                win = xp[b, 2 * ty:2 * ty + 4, 2 * tx:2 * tx + 4]  # (4, 4, C)
                want_v[:, (b * th + ty) * tw + tx] = np.einsum("ai,bj,ijc->abc", bt, bt,
                                                               win).reshape(16, c)
    got_v = jax.jit(lambda a: native.winograd_input(a, pad, (th, tw)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got_v), want_v, rtol=1e-6, atol=1e-5)

    m = rng.standard_normal((16, n * th * tw, c)).astype(np.float32)
    full = np.einsum("pa,qb,abtc->pqtc", at, at, m.reshape(4, 4, -1, c).astype(np.float64))
    full = full.reshape(2, 2, n, th, tw, c).transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th,
                                                                               2 * tw, c)
    got_y = jax.jit(lambda a: native.winograd_output(a, (n, ho, wo, c)))(jnp.asarray(m))
    np.testing.assert_allclose(np.asarray(got_y), full[:, :ho, :wo], rtol=1e-6, atol=1e-5)


@needs_native
def test_native_winograd_rejects_bad_input():
    with pytest.raises(TypeError, match="float32"):
        native.winograd_input(jnp.zeros((1, 4, 4, 2), jnp.bfloat16), (1, 1), (2, 2))
    with pytest.raises(ValueError, match="NHWC"):
        native.winograd_input(jnp.zeros((4, 4, 2)), (1, 1), (2, 2))
    with pytest.raises(ValueError, match=r"need \(16, 8, 3\)"):
        native.winograd_output(jnp.zeros((16, 7, 3)), (2, 3, 4, 3))
