"""Shared layers checked against torch directly (the model tests cover them inside the networks)."""

import numpy as np
import pytest
import torch
from flax import nnx

import jax
import jax.numpy as jnp
from flaxrestore import layers, lowering
from flaxrestore.xla_cpu import convs as xla_convs
from flaxrestore.xla_cpu import native, tuning


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("kernel_size,stride,sizes,cout", [
    (3, 1, (5, 3), 7), (3, 2, (4, 4, 2), 7), (1, 1, (6, 2), 7),
    (3, 1, (5, 3), xla_convs.CONCAT_SPLIT_MAX_OUT)])  # the last: the concatenating path on CPU
@pytest.mark.both_lowerings
def test_conv_concat_call_matches_torch_cat_conv(kernel_size, stride, sizes, cout):
    """concat_call([a, b, ...]) is torch's conv(cat([a, b, ...], 1)): output and gradients."""
    rng = np.random.default_rng(0)
    cin = sum(sizes)
    conv = layers.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, rngs=nnx.Rngs(0))
    xs = [rng.standard_normal((2, 9, 11, c)).astype(np.float32) for c in sizes]
    dy_shape = conv(jnp.concatenate(xs, -1)).shape
    dy = rng.standard_normal(dy_shape).astype(np.float32)

    graphdef, state = nnx.split(conv)

    def f(state, *pieces):
        return jnp.sum(nnx.merge(graphdef, state).concat_call(pieces) * dy)

    kernel, bias = conv.kernel[...], conv.bias[...]
    y = conv.concat_call([jnp.asarray(x) for x in xs])
    g_state, *g_xs = jax.grad(f, argnums=tuple(range(1 + len(xs))))(state, *map(jnp.asarray, xs))
    grads = [g_state["kernel"][...], g_state["bias"][...], *g_xs]

    tw = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy()).requires_grad_()
    tb = torch.from_numpy(np.asarray(bias).copy()).requires_grad_()
    txs = [_nchw(x).requires_grad_() for x in xs]
    ty = torch.nn.functional.conv2d(torch.cat(txs, 1), tw, tb, stride, kernel_size // 2)
    (ty * _nchw(dy)).sum().backward()

    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), tw.grad.numpy().transpose(2, 3, 1, 0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[1]), tb.grad.numpy(), rtol=1e-4, atol=1e-4)
    for g, tx in zip(grads[2:], txs):
        np.testing.assert_allclose(np.asarray(g), tx.grad.numpy().transpose(0, 2, 3, 1),
                                   rtol=1e-4, atol=1e-4)


def test_conv_concat_call_rejects_wrong_channel_total():
    conv = layers.Conv2d(6, 4, 3, padding=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[4, 3\].*sum 7.*6 input channels"):
        conv.concat_call([jnp.zeros((1, 5, 5, 4)), jnp.zeros((1, 5, 5, 3))])


def _torch_conv_reference(conv, x, dy, stride, pad, dil=1, double=False):
    """torch's conv2d with Conv2d's weights on x: (y, kernel gradient as HWIO, input gradient as
    NHWC) for the upstream gradient dy, all numpy; in float64 with ``double``."""
    cast = (lambda t: t.double()) if double else (lambda t: t)
    tw = cast(torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy()))
    tw.requires_grad_()
    tx = cast(_nchw(x)).requires_grad_()
    ty = torch.nn.functional.conv2d(tx, tw, cast(torch.from_numpy(np.array(conv.bias[...]))),
                                    stride, pad, dil)
    (ty * cast(_nchw(dy))).sum().backward()
    return (ty.detach().numpy().transpose(0, 2, 3, 1), tw.grad.numpy().transpose(2, 3, 1, 0),
            tx.grad.numpy().transpose(0, 2, 3, 1))


def _conv_output_and_grads(conv, x, rng, options):
    """Conv2d's output on x and, for a random upstream gradient dy drawn from rng, the gradients
    of the state and of x; eagerly or compiled with lowering.compiler_options() (the trainer's).
    Returns (y, state gradient, x gradient, dy)."""
    graphdef, state = nnx.split(conv)

    def apply(st, x):
        return nnx.merge(graphdef, st)(x)

    dy = rng.standard_normal(apply(state, jnp.asarray(x)).shape).astype(np.float32)
    fwd, grad = apply, jax.grad(lambda st, x: jnp.sum(apply(st, x) * dy), (0, 1))
    if options == "compiled":
        fwd = jax.jit(apply, compiler_options=lowering.compiler_options())
        grad = jax.jit(grad, compiler_options=lowering.compiler_options())
    y = fwd(state, jnp.asarray(x))
    g_state, g_x = grad(state, jnp.asarray(x))
    return y, g_state, g_x, dy


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,hw", [
    (8, 3, 3, 1, 1, 1, (9, 11)),    # cout < cin: dy shifted onto x's grid, one matmul
    (6, 6, 3, 1, 1, 1, (8, 8)),     # equal: dy side
    (3, 8, 3, 1, 1, 1, (10, 7)),    # cin < cout: x's windows, one matmul
    (5, 4, 3, 1, 2, 2, (9, 9)),     # dilation with padding 2 (DarkIR-style), dy side
    (4, 6, 5, 1, 0, 1, (12, 10)),   # no padding, 5x5: output smaller than x, x side
    (6, 4, 3, 1, 0, 1, (7, 9)),     # no padding, dy side (negative shifts crop)
    (4, 5, 3, 1, 3, 1, (6, 6)),     # padding > kernel//2: output larger than x
    (4, 6, 3, 2, 1, 1, (9, 10)),    # stride 2: per-tap matmuls
])
@pytest.mark.parametrize("options", ["eager", "compiled"])
@pytest.mark.both_lowerings
def test_conv_gradients_match_torch(cin, cout, k, stride, pad, dil, hw, options):
    """Conv2d's CPU backward (input gradient + the kernel gradient as matmuls, every path of
    xla_convs.conv_kernel_grad) against torch autograd; eagerly (XLA's default libraries) and
    compiled with lowering.compiler_options() as the trainer compiles (on CPU: XNNPACK convs)."""
    rng = np.random.default_rng(1)
    conv = layers.Conv2d(cin, cout, k, stride, pad, dil, rngs=nnx.Rngs(0))
    x = rng.standard_normal((2, *hw, cin)).astype(np.float32)
    dy = rng.standard_normal(conv(jnp.asarray(x)).shape).astype(np.float32)
    graphdef, state = nnx.split(conv)
    grad = jax.grad(lambda st, x: jnp.sum(nnx.merge(graphdef, st)(x) * dy), (0, 1))
    if options == "compiled":
        grad = jax.jit(grad, compiler_options=lowering.compiler_options())
    g_state, g_x = grad(state, jnp.asarray(x))

    _, t_kernel, t_x = _torch_conv_reference(conv, x, dy, stride, pad, dil)
    np.testing.assert_allclose(np.asarray(g_state["kernel"][...]), t_kernel,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_x), t_x, rtol=1e-4, atol=1e-4)


# Winograd against torch in float64, as max |error| / max(1, max |reference|) (README's measure):
# the worst measured (2-core AVX2) were 4.2e-7 forward, 4.6e-7 kernel gradient and 1.3e-6 input
# gradient (that one with FLAXRESTORE_NATIVE=0, eager); torch's own float32 conv is 1.0e-6 off on
# the same forwards. README promises 1e-5 (blocks) and 1e-4 (gradients); these bounds are tighter.
WINOGRAD_FWD_TOL = 2e-6
WINOGRAD_GRAD_TOL = 1e-5


def _rel_err(got, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("pad", [0, 1, 2])
@pytest.mark.parametrize("hw,cin,cout", [((8, 10), 5, 7), ((7, 9), 5, 7), ((9, 6), 19, 11)])
@pytest.mark.parametrize("native_setting", ["1", "0"])
def test_winograd_conv3x3_matches_torch(monkeypatch, pad, hw, cin, cout, native_setting):
    """The Winograd F(2x2, 3x3) conv against torch's conv2d, odd and even sizes, every padding
    it takes (any channel count: the function itself has no minimum; 19 and 11 channels leave
    tails after the native kernels' runs of 8), with the transforms by the native kernels and
    by XLA (FLAXRESTORE_NATIVE=0)."""
    monkeypatch.setenv("FLAXRESTORE_NATIVE", native_setting)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, *hw, cin)).astype(np.float32)
    k = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
    fn = jax.jit(lambda x, k: xla_convs.winograd_conv3x3(x, k, (pad, pad)))
    native_used = "flaxrestore_winograd_output" in fn.lower(jnp.asarray(x), jnp.asarray(k)).as_text()
    assert native_used == (native_setting == "1" and native.available())
    y = fn(jnp.asarray(x), jnp.asarray(k))
    ty = torch.nn.functional.conv2d(_nchw(x).double(),
                                    torch.from_numpy(k.transpose(3, 2, 0, 1).copy()).double(),
                                    padding=pad)
    assert y.shape == (2, hw[0] + 2 * pad - 2, hw[1] + 2 * pad - 2, cout)
    assert _rel_err(y, ty.numpy().transpose(0, 2, 3, 1)) <= WINOGRAD_FWD_TOL
    with pytest.raises(ValueError, match="3x3"):
        xla_convs.winograd_conv3x3(jnp.asarray(x), jnp.zeros((5, 5, 5, 7)), (pad, pad))


@pytest.mark.parametrize("cin,cout,pad,hw", [
    (96, 96, 1, (9, 11)),   # odd output: one padded tile row/column, cropped
    (128, 96, 0, (8, 10)),  # no padding
    (96, 112, 2, (7, 6)),   # padding 2
])
@pytest.mark.parametrize("options", ["eager", "compiled"])
@pytest.mark.parametrize("native_setting", ["1", "0"])
def test_winograd_conv_and_gradients_match_torch(monkeypatch, cin, cout, pad, hw, options,
                                                  native_setting):
    """Conv2d on CPU with >= WINOGRAD_MIN_CHANNELS channels against torch: the forward (by
    Winograd) and, when differentiated, the gradients (forward and input gradient by Winograd
    with the native transforms, by the library conv with FLAXRESTORE_NATIVE=0)."""
    assert min(cin, cout) >= xla_convs.WINOGRAD_MIN_CHANNELS
    monkeypatch.setenv("FLAXRESTORE_NATIVE", native_setting)
    rng = np.random.default_rng(5)
    conv = layers.Conv2d(cin, cout, 3, 1, pad, rngs=nnx.Rngs(0))
    x = rng.standard_normal((2, *hw, cin)).astype(np.float32)
    y, g_state, g_x, dy = _conv_output_and_grads(conv, x, rng, options)

    t_y, t_kernel, t_x = _torch_conv_reference(conv, x, dy, 1, pad, double=True)
    assert _rel_err(y, t_y) <= WINOGRAD_FWD_TOL
    assert _rel_err(g_state["kernel"][...], t_kernel) <= WINOGRAD_GRAD_TOL
    assert _rel_err(g_x, t_x) <= WINOGRAD_GRAD_TOL


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU conv lowering")
def test_winograd_where_it_applies(monkeypatch):
    """Which CPU convs take the Winograd path: 3x3, stride 1, undilated, ungrouped, padding <= 2,
    >= WINOGRAD_MIN_CHANNELS on both sides, not turned off; and that it really replaces the
    library conv in a compiled forward, but not in a differentiated one."""
    monkeypatch.delenv(xla_convs.WINOGRAD_ENV, raising=False)
    n = xla_convs.WINOGRAD_MIN_CHANNELS
    applies = xla_convs._winograd_applies
    assert applies((3, 3, n, n), (1, 1), (1, 1), (1, 1), 1)
    assert not applies((3, 3, n - 1, 2 * n), (1, 1), (1, 1), (1, 1), 1)
    assert not applies((3, 3, 2 * n, n - 1), (1, 1), (1, 1), (1, 1), 1)
    assert not applies((5, 5, n, n), (1, 1), (2, 2), (1, 1), 1)
    assert not applies((3, 3, n, n), (2, 2), (1, 1), (1, 1), 1)
    assert not applies((3, 3, n, n), (1, 1), (2, 2), (2, 2), 1)
    assert not applies((3, 3, n, n), (1, 1), (1, 1), (1, 1), 2)
    assert not applies((3, 3, n, n), (1, 1), (3, 3), (1, 1), 1)
    # narrower convs on large images only
    m, big = xla_convs.WINOGRAD_LARGE_MIN_CHANNELS, xla_convs.WINOGRAD_LARGE_PIXELS
    assert applies((3, 3, m, m), (1, 1), (1, 1), (1, 1), 1, big)
    assert not applies((3, 3, m, m), (1, 1), (1, 1), (1, 1), 1, big - 1)
    assert not applies((3, 3, m - 1, n), (1, 1), (1, 1), (1, 1), 1, big)

    conv = layers.Conv2d(n, n, 3, padding=1, bias=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(conv)
    x = jnp.ones((1, 8, 8, n))

    def convs_in(grad: bool) -> int:
        # a new function each time: the switch is read when a function is traced
        def fwd(st, x):
            return nnx.merge(graphdef, st)(x)

        fn = jax.grad(lambda st, x: jnp.sum(fwd(st, x) ** 2), 1) if grad else fwd
        return jax.jit(fn).lower(state, x).compile().as_text().count(" convolution(")

    # forward only: no library conv left; differentiated: Winograd for the forward and the input
    # gradient where the native transforms are built, else the library's forward and input grad
    assert convs_in(grad=False) == 0
    assert convs_in(grad=True) == (0 if native.available() else 2)
    monkeypatch.setenv("FLAXRESTORE_NATIVE", "0")
    assert convs_in(grad=False) == 0 and convs_in(grad=True) == 2
    monkeypatch.delenv("FLAXRESTORE_NATIVE")
    # bfloat16 keeps the library conv
    y = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)).lower(
        jax.tree.map(lambda a: a.astype(jnp.bfloat16), state), x.astype(jnp.bfloat16))
    assert y.compile().as_text().count(" convolution(") == 1
    monkeypatch.setenv(xla_convs.WINOGRAD_ENV, "0")
    assert not applies((3, 3, n, n), (1, 1), (1, 1), (1, 1), 1)
    assert convs_in(grad=False) == 1 and convs_in(grad=True) == 2


@pytest.mark.parametrize("cin,cout,k,pad,dil,hw", [
    (16, 3, 3, 1, 1, (9, 11)),   # an RGB output conv
    (3, 16, 3, 1, 1, (8, 7)),    # an RGB input conv: the input gradient takes the narrow form
    (8, 1, 5, 2, 2, (12, 10)),   # one output channel, 5x5, dilation 2
    (4, 4, 3, 3, 1, (6, 7)),     # padding > the kernel's reach: output larger than x
    (2, 3, 7, 0, 1, (13, 12)),   # unpadded 7x7 (negative transposed padding in the gradient)
    (6, 2, 3, 3, 1, (6, 7)),     # narrow output, padding > reach: dy's windows crop x's grid
])
@pytest.mark.parametrize("options", ["eager", "compiled"])
@pytest.mark.parametrize("native_setting", ["1", "0"])
def test_narrow_conv_and_gradients_match_torch(monkeypatch, cin, cout, k, pad, dil, hw, options,
                                               native_setting):
    """Conv2d with <= NARROW_OUT_MAX output (or input) channels on CPU - one matmul to every
    tap's channels, then a shifted sum - against torch: output, kernel and input gradients,
    with the native windows and with XLA's (FLAXRESTORE_NATIVE=0)."""
    assert min(cin, cout) <= xla_convs.NARROW_OUT_MAX
    monkeypatch.setenv("FLAXRESTORE_NATIVE", native_setting)
    rng = np.random.default_rng(6)
    conv = layers.Conv2d(cin, cout, k, 1, pad, dil, rngs=nnx.Rngs(0))
    x = rng.standard_normal((2, *hw, cin)).astype(np.float32)
    y, g_state, g_x, dy = _conv_output_and_grads(conv, x, rng, options)
    t_y, t_kernel, t_x = _torch_conv_reference(conv, x, dy, 1, pad, dil)
    np.testing.assert_allclose(np.asarray(y), t_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_state["kernel"][...]), t_kernel, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_x), t_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin,cout,dil", [(6, 3, 1), (3, 5, 2)])
@pytest.mark.both_lowerings
def test_narrow_valid_conv_matches_torch(cin, cout, dil):
    """layers.conv2d_valid (AECR-Net's reflect-padded 7x7s) on the narrow path: output and both
    gradients against torch's unpadded conv."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 15, 14, cin)).astype(np.float32)
    k = (0.2 * rng.standard_normal((7, 7, cin, cout))).astype(np.float32)
    opts = lowering.compiler_options()
    y = jax.jit(lambda x, k: layers.conv2d_valid(x, k, 1, dil), compiler_options=opts)(
        jnp.asarray(x), jnp.asarray(k))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    gx, gk = jax.jit(jax.grad(lambda x, k: jnp.sum(layers.conv2d_valid(x, k, 1, dil) * dy),
                              (0, 1)), compiler_options=opts)(jnp.asarray(x), jnp.asarray(k))
    tx = _nchw(x).requires_grad_()
    tk = torch.from_numpy(k.transpose(3, 2, 0, 1).copy()).requires_grad_()
    ty = torch.nn.functional.conv2d(tx, tk, dilation=dil)
    (ty * _nchw(dy)).sum().backward()
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gk), tk.grad.numpy().transpose(2, 3, 1, 0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU conv lowering")
def test_narrow_conv_where_it_applies():
    """Which convs take the narrow path (stride 1, ungrouped, kernel > 1x1, <= NARROW_OUT_MAX
    outputs), that it replaces the library conv in the compiled program (forward, and the input
    gradients of narrow-input and narrow-output convs), and that bfloat16 keeps its dtype and stays close."""
    n = xla_convs.NARROW_OUT_MAX
    applies = xla_convs._narrow_out_applies
    assert applies((3, 3, 64, n), (1, 1), 1) and applies((7, 7, 64, 1), (1, 1), 1)
    assert not applies((3, 3, 64, n + 1), (1, 1), 1)
    assert not applies((3, 3, 64, 3), (2, 2), 1)
    assert not applies((3, 3, 2, 3), (1, 1), 3)
    assert not applies((1, 1, 64, 3), (1, 1), 1)

    def convs_in(cin, cout, grad_x):
        conv = layers.Conv2d(cin, cout, 3, padding=1, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(conv)
        x = jnp.ones((1, 8, 8, cin))

        def fwd(st, x):
            return nnx.merge(graphdef, st)(x)

        fn = jax.grad(lambda st, x: jnp.sum(fwd(st, x) ** 2), 1) if grad_x else fwd
        return jax.jit(fn).lower(state, x).compile().as_text().count(" convolution(")

    assert convs_in(16, 3, grad_x=False) == 0
    assert convs_in(16, 8, grad_x=False) == 1
    # 3 -> 16 differentiated for x: the library forward, the input gradient the narrow way
    assert convs_in(3, 16, grad_x=True) == 1
    # 16 -> 3 differentiated for x: the narrow forward, the input gradient from dy's windows
    # times the kernel
    assert convs_in(16, 3, grad_x=True) == 0

    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 9, 9, 32)).astype(np.float32)
    k = (0.2 * rng.standard_normal((3, 3, 32, 3))).astype(np.float32)
    yb = xla_convs.conv2d(jnp.asarray(x, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), (1, 1),
                           (1, 1))
    assert yb.dtype == jnp.bfloat16
    y32 = xla_convs.conv2d(jnp.asarray(x), jnp.asarray(k), (1, 1), (1, 1))
    np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(y32), rtol=0.02, atol=0.05)
    with pytest.raises(ValueError, match="16 channels, the kernel 32"):
        xla_convs.conv_narrow_out(jnp.zeros((1, 5, 5, 16)), jnp.asarray(k), ((1, 1), (1, 1)))


@pytest.mark.parametrize("cin,cout,k,stride,pad,out_pad", [
    (6, 4, 3, 2, 1, 1), (4, 8, 4, 2, 1, 0), (5, 3, 3, 1, 1, 0)])
@pytest.mark.both_lowerings
def test_conv_transpose_compiled_matches_torch(cin, cout, k, stride, pad, out_pad):
    """ConvTranspose2d output and gradients, compiled with lowering.compiler_options(), against
    torch's conv_transpose2d."""
    rng = np.random.default_rng(3)
    conv = layers.ConvTranspose2d(cin, cout, k, stride, pad, out_pad, rngs=nnx.Rngs(0))
    x = rng.standard_normal((2, 7, 9, cin)).astype(np.float32)
    graphdef, state = nnx.split(conv)
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x),
                  compiler_options=lowering.compiler_options())
    y = fwd(state, jnp.asarray(x))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda st, x: jnp.sum(nnx.merge(graphdef, st)(x) * dy), (0, 1)),
                   compiler_options=lowering.compiler_options())
    g_state, g_x = grad(state, jnp.asarray(x))

    # the Flax kernel is torch's weight flipped in H and W, laid out (kh, kw, in, out)
    tw = torch.from_numpy(np.asarray(conv.kernel[...])[::-1, ::-1].transpose(2, 3, 0, 1).copy())
    tw.requires_grad_()
    tx = _nchw(x).requires_grad_()
    ty = torch.nn.functional.conv_transpose2d(tx, tw, torch.from_numpy(np.array(conv.bias[...])),
                                              stride, pad, out_pad)
    (ty * _nchw(dy)).sum().backward()
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_state["kernel"][...]),
                               tw.grad.numpy().transpose(2, 3, 0, 1)[::-1, ::-1],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_x), tx.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-4, atol=1e-4)


def _library_calls(compiled_text: str) -> dict[str, str]:
    """{op: library} for the convolutions and dots of a compiled CPU module: 'ynn' when the op
    sits in a YNNPACK fusion, else 'plain' (left to the thunk runtime)."""
    import re

    bodies, current = {}, None
    for line in compiled_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            bodies[current] = []
        elif current and " = " in line:
            bodies[current].append(line)
    found = {}
    for line in compiled_text.splitlines():
        called = re.search(r"calls=%([\w.\-]+)", line)
        in_ynn = "__ynn_fusion" in line and called
        for op in ("convolution", "dot"):
            if in_ynn and any(f" {op}(" in b for b in bodies.get(called.group(1), [])):
                found[op] = "ynn"
            elif f" {op}(" in line and "fusion(" not in line:
                found.setdefault(op, "plain")
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compile options")
def test_cpu_compiler_options_move_convs_off_ynnpack_only():
    """The options take effect: the conv leaves YNNPACK, the dot stays there."""
    x = jnp.ones((1, 32, 32, 64))
    k = jnp.ones((3, 3, 64, 64))
    m = jnp.ones((64, 64))

    def f(x, k, m):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(-1, 64) @ m

    lowered = jax.jit(f).lower(x, k, m)
    assert _library_calls(lowered.compile().as_text()) == {"convolution": "ynn", "dot": "ynn"}
    options = lowering.compiler_options()
    assert options == tuning.CPU_COMPILER_OPTIONS
    assert _library_calls(lowered.compile(options).as_text()) == {"convolution": "plain",
                                                                   "dot": "ynn"}


def test_compiler_options_where_they_apply(monkeypatch):
    monkeypatch.delenv(tuning.CPU_COMPILER_OPTIONS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert lowering.compiler_options("cpu") == tuning.CPU_COMPILER_OPTIONS
    assert lowering.compiler_options("gpu") is None and lowering.compiler_options("tpu") is None
    monkeypatch.setenv(tuning.CPU_COMPILER_OPTIONS_ENV, "0")
    assert lowering.compiler_options("cpu") is None
    monkeypatch.delenv(tuning.CPU_COMPILER_OPTIONS_ENV)
    # a user's own setting of either flag wins over ours
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert lowering.compiler_options("cpu") is None


def test_conv_kernel_grad_paths_agree_with_taps():
    """The one-matmul kernel gradients equal the per-tap ones on sizes where both are used."""
    rng = np.random.default_rng(2)
    for cin, cout in [(16, 3), (3, 16), (8, 8)]:
        x = jnp.asarray(rng.standard_normal((2, 13, 12, cin)), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((2, 13, 12, cout)), jnp.float32)
        shape = (3, 3, cin, cout)
        a = xla_convs.conv_kernel_grad(x, dy, shape, padding=(1, 1))
        b = xla_convs.conv_kernel_grad_taps(x, dy, shape, padding=(1, 1))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cin,cout,pad,dil", [(8, 8, 1, 1), (4, 6, 1, 1), (6, 5, 2, 2),
                                               (5, 6, 0, 1)])
@pytest.mark.parametrize("native", ["1", "0"])
def test_conv_kernel_grad_row_blocks_agree_with_taps(monkeypatch, cin, cout, pad, dil, native):
    """Above the copy limit the one-matmul kernel gradient runs over blocks of rows (both the
    dy-windows and the x-windows form, uneven blocks, padding and dilation; the windows by the
    native kernel where it is built, and by XLA): equal to the taps."""
    monkeypatch.setenv("FLAXRESTORE_NATIVE", native)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 11, 9, cin)), jnp.float32)
    ho, wo = 11 + 2 * pad - 2 * dil, 9 + 2 * pad - 2 * dil
    dy = jnp.asarray(rng.standard_normal((2, ho, wo, cout)), jnp.float32)
    shape = (3, 3, cin, cout)
    b = xla_convs.conv_kernel_grad_taps(x, dy, shape, padding=(pad, pad), dilation=(dil, dil))
    one = xla_convs.conv_kernel_grad(x, dy, shape, padding=(pad, pad), dilation=(dil, dil))
    monkeypatch.setattr(xla_convs, "_IM2COL_MAX_BYTES", 2 * 9 * 2 * 3 * 9 * min(cin, cout) * 4)
    hlo = jax.jit(lambda x, dy: xla_convs.conv_kernel_grad(
        x, dy, shape, padding=(pad, pad), dilation=(dil, dil))).lower(x, dy).as_text()
    assert hlo.count("dot_general") >= 3  # several row blocks, one matmul each
    blocked = xla_convs.conv_kernel_grad(x, dy, shape, padding=(pad, pad), dilation=(dil, dil))
    np.testing.assert_allclose(np.asarray(one), np.asarray(b), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(4, 64, 32), (3, 5, 7)])
@pytest.mark.both_lowerings
def test_materialize_is_an_exact_identity(dtype, shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 1e3, dtype)
    x = x.at[(0,) * len(shape)].set(0.0).at[(1,) * len(shape)].set(-1e-30)  # zero, denormal
    y = jax.jit(layers.materialize)(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                  np.asarray(x.astype(jnp.float32)))
    g = jax.grad(lambda v: jnp.sum(layers.materialize(v).astype(jnp.float32) * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), 3.0)


def test_materialize_is_an_identity_dot_in_cpu_programs_only():
    """In a CPU program the value is computed once into a buffer by a dot with an 8x8 identity
    over rows of 8 (XLA would otherwise fuse the chain into both consumers); in accelerator mode
    (what a TPU/GPU compiles) materialize is nothing at all."""
    def f(a, b):
        s = layers.materialize(a + b * 2.0)
        return s.T @ b, s @ b.T

    a = jnp.ones((64, 32))

    def optimised_hlo():
        return jax.jit(lambda a, b: f(a, b)).lower(a, a).compile().as_text()

    if jax.default_backend() == "cpu":
        assert "f32[256,8]" in optimised_hlo()  # 2048 elements as 256 rows of 8
    with lowering.accelerator_path():
        assert "f32[256,8]" not in optimised_hlo()


def _cab_stack(n=6, width=16):
    from flaxrestore.models.mprnet import CAB

    rngs = nnx.Rngs(0)
    act = layers.PReLU()  # shared by every block, as in MPRNet
    return nnx.Sequential(*[CAB(width, 3, 4, False, act, rngs=rngs) for _ in range(n)])


def _cab_loss_and_grad(remat: bool):
    model = _cab_stack()
    graph, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 16)), jnp.float32)

    def loss(state, x):
        return jnp.mean(jnp.square(nnx.merge(graph, state)(x)))

    def f(state, x):
        with layers.rematerialize(remat):
            return jax.value_and_grad(loss, argnums=(0, 1))(state, x)

    compiled = jax.jit(f).lower(state, x).compile()
    return compiled(state, x), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.both_lowerings
def test_rematerialize_keeps_values_and_gradients():
    (l0, (gs0, gx0)), _ = _cab_loss_and_grad(False)
    (l1, (gs1, gx1)), _ = _cab_loss_and_grad(True)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx0), rtol=1e-5, atol=1e-8)
    leaves0 = jax.tree_util.tree_leaves_with_path(gs0)
    for (path, a), b in zip(leaves0, jax.tree.leaves(gs1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-8,
                                   err_msg=jax.tree_util.keystr(path))
    # the shared PReLU slope collects the gradient of all six blocks, non-zero
    slopes = [np.asarray(v) for p, v in leaves0 if "weight" in jax.tree_util.keystr(p)]
    assert slopes and all(np.all(s != 0) for s in slopes)


def test_rematerialize_lowers_cpu_memory():
    """The recomputing blocks need far fewer XLA temporaries. Checked in a fresh process (XLA
    reads its flags when the backend starts) under XLA:CPU's default, concurrency-optimized
    scheduler: under the memory-saving one the trainer selects, this 6-block toy is already
    small without remat (3.6 MB); the gain there shows on real sizes (MPRNet's step at
    256x256 x4: 22.7 -> 15.6 GB, README)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the XLA buffer figure checked here is the CPU one")
    import os
    import subprocess
    import sys

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from test_layers import _cab_loss_and_grad\n"
            "print(_cab_loss_and_grad(False)[1], _cab_loss_and_grad(True)[1])" % tests_dir)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(tests_dir), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    plain, remat = map(int, out.stdout.split()[-2:])
    assert remat < 0.8 * plain, (remat, plain)


def test_rematerialize_restores_the_previous_setting():
    with layers.rematerialize(True):
        with layers.rematerialize(False):
            assert not layers._REMAT["on"]
        assert layers._REMAT["on"]
    assert not layers._REMAT["on"]


def test_add_bias_sums_a_bfloat16_gradient_in_float32():
    """In bfloat16 a bias's gradient is a sum over every batch and pixel position: summed in
    bfloat16 it stalls (here at 2048 of about 8200: a partial sum of 256 no longer grows by
    adding values near 1), so add_bias sums it in float32."""
    rng = np.random.default_rng(11)
    y = jnp.zeros((2, 64, 64, 4), jnp.bfloat16)
    dy = jnp.asarray(rng.random((2, 64, 64, 4)) + 0.5, jnp.bfloat16)

    def loss(b):
        return jnp.sum((layers.add_bias(y, b) * dy).astype(jnp.float32))

    g = jax.jit(jax.grad(loss))(jnp.zeros((4,), jnp.float32))
    expected = np.asarray(dy, np.float64).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-3)


def test_channel_layer_norm_of_bfloat16_computes_its_statistics_in_float32():
    """A bfloat16 input (a residual stream with a large common offset, mean 64) is normalised
    with float32 statistics: the result is the float64 layer norm of the same bfloat16 values,
    rounded once to bfloat16. In bfloat16 the mean alone is off by up to a quarter (its spacing
    at 64 is 0.5)."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(64.0 + 4.0 * rng.standard_normal((2, 5, 7, 32)), jnp.bfloat16)
    norm = layers.ChannelLayerNorm(32, eps=1e-5)
    y = jax.jit(norm)(x)
    assert y.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    mu = x64.mean(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    # one bfloat16 rounding of values below 4 in magnitude: at most 2^-8 * 4 / 2 = 0.008
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=0.01)
