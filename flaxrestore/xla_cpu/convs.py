"""Dense convs on XLA:CPU: the same numbers as the library conv, computed where XLA:CPU is fast.

* :func:`conv2d` - a zero-padded conv with the rules below, and a custom backward whose kernel
  gradient is few, large matmuls (:func:`conv_kernel_grad`; XLA:CPU's kernel-gradient conv was
  about 10x slower than the forward: 4x128x128x96, 3x3, 1.7 s vs 0.2 s);
* :func:`winograd_conv3x3` - Winograd F(2x2, 3x3) for wide 3x3 convs;
* :func:`conv_narrow_out` - convs to at most :data:`NARROW_OUT_MAX` channels (RGB outputs) as
  one matmul and a shifted sum;
* :func:`conv2d_valid`, :func:`conv_transpose` - the unpadded and the transposed conv with
  kernel gradients from matmuls.

Nothing here is called on other platforms (see :mod:`flaxrestore.lowering`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxrestore.xla_cpu import native
from flaxrestore.xla_cpu.common import conv_lib, native_float32, turned_off, zero_pad_hw


def _x_windows(x, kernel_hw, out_hw, stride, padding, dilation, rows=None):
    """The kh*kw windows of zero-padded x that tap (i, j) of a conv reads, each (n, ho, wo, c),
    in (i, j) row-major order; with ``rows = (r0, r1)`` only those output rows."""
    kh, kw = kernel_hw
    ho, wo = out_hw
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    r0, r1 = rows if rows is not None else (0, ho)
    xp = zero_pad_hw(x, ph, ph, pw, pw)
    n, c = xp.shape[0], xp.shape[-1]
    return [jax.lax.slice(xp, (0, i * dh + r0 * sh, j * dw, 0),
                          (n, i * dh + (r1 - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                          (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def conv_kernel_grad_taps(x, dy, kernel_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          groups: int = 1):
    """The kernel gradient of a zero-padded conv (NHWC / HWIO) as one 2-D matmul per tap:
    dkernel[i, j] = (strided (i, j)-shifted padded x)^T @ dy over batch and space."""
    kh, kw, cin_g, cout = kernel_shape
    c = x.shape[-1]
    dy2 = dy.reshape(-1, cout)
    taps = []
    for win in _x_windows(x, (kh, kw), dy.shape[1:3], stride, padding, dilation):
        xs = win.reshape(-1, c)
        if groups == 1:
            taps.append(xs.T @ dy2)
        else:
            g = jnp.einsum("mgc,mgo->cgo", xs.reshape(-1, groups, cin_g),
                           dy2.reshape(-1, groups, cout // groups))
            taps.append(g.reshape(cin_g, cout))
    return jnp.stack(taps).reshape(kernel_shape)


# shifted copies of the narrower side (9x its size for a 3x3 kernel), all held at once, up to
# this size when both sides have similar widths. Trainer step time with this limit / with 32 MB
# (in-process A/B, 2-core machine): SNR-Aware 0.93-0.97 (+103 MiB of XLA temporaries),
# DarkIR-m 0.93 (same memory), AECR-Net 1.00, Restormer 0.96-1.01 (noise). Larger copies
# (MPRNet's convs: 226 MB and more at its patch sizes) are made per block of rows
_IM2COL_MAX_BYTES = 160 << 20


def conv_kernel_grad(x, dy, kernel_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                     groups: int = 1):
    """The kernel gradient of a zero-padded conv (NHWC / HWIO) on CPU, as few, large matmuls.

    For a stride-1, ungrouped conv the side with fewer channels is copied once per tap (x's
    shifted windows if it has fewer channels than dy, else dy shifted onto x's grid) and the
    gradient is ONE matmul with the other side as it is; this replaces kh*kw matmuls whose
    outputs are as narrow as the channel counts (measured on the 2-core machine, 4x128x128
    64->3: 157 ms as taps, 16 ms so; 4x32x32 64->64: 12.5 -> 9.4 ms). When the copies would
    exceed 160 MB with both sides of similar width, the rows are split into blocks of at most
    80 MB of copies, one matmul each, summed. The copies are made by the native kernel
    (:func:`flaxrestore.xla_cpu.native.windows`) where it is built, for float32; else by XLA. Strided or
    grouped convs use :func:`conv_kernel_grad_taps`.
    """
    kh, kw, _, cout = kernel_shape
    n, ho, wo, _ = dy.shape
    c = x.shape[-1]
    narrow = min(c, cout)
    copies = kh * kw * n * x.shape[1] * x.shape[2] * narrow * x.dtype.itemsize
    # a side 8x narrower than the other: the taps would copy 8x more (AECR-Net's 7x7 64->3 at
    # 4x240x240: 1677 ms as taps, 183 ms so, with 135 MB of copies held at once)
    lopsided = 8 * narrow <= max(c, cout)
    if tuple(stride) != (1, 1) or groups != 1 or kh * kw == 1:
        return conv_kernel_grad_taps(x, dy, kernel_shape, stride, padding, dilation, groups)
    # above the limit, blocks of image rows, one matmul each, summed (MPRNet's ORSNet conv at
    # 2x256x256, 128 -> 128: 482 ms as taps, 344 ms in 8 blocks of 32 rows; torch 284 ms)
    blocks = 1 if lopsided else max(1, -(-copies // (_IM2COL_MAX_BYTES // 2)))
    ph, pw = padding
    dh, dw = dilation
    h, w = x.shape[1:3]
    # the windows by the native kernel where it is built (float32; 2x128x128x96, 3x3: 27 ms as
    # XLA's concatenation of slices, 14 ms so)
    use_native = native_float32(x, dy)
    if cout <= c:
        # dkernel[i, j] = x^T @ (dy moved down/right by (i*dh - ph, j*dw - pw) onto x's h x w
        # grid, zeros where it has no value)
        def block(r0, r1):  # x's rows [r0, r1)
            cols = _dy_windows(dy, (kh, kw), (h, w), (ph, pw), dilation, (r0, r1), use_native)
            return x[:, r0:r1].reshape(-1, c).T @ cols.reshape(-1, kh * kw * cout)

        g = _sum_row_blocks(block, h, blocks)
        return g.reshape(c, kh, kw, cout).transpose(1, 2, 0, 3)

    # dkernel[i, j] = (x's (i, j)-shifted window)^T @ dy, all taps in one matmul
    def block(r0, r1):  # dy's rows [r0, r1)
        if use_native:
            cols = native.windows(x, (kh, kw), (r1 - r0, wo), (r0 - ph, -pw), (dh, dw))
        else:
            wins = _x_windows(x, (kh, kw), (ho, wo), stride, padding, dilation, rows=(r0, r1))
            cols = jnp.concatenate(wins, axis=-1)
        return cols.reshape(-1, kh * kw * c).T @ dy[:, r0:r1].reshape(-1, cout)

    g = _sum_row_blocks(block, ho, blocks)  # (kh*kw*c, cout)
    return g.reshape(kh, kw, c, cout)


def _dy_windows(dy, kernel_hw, x_hw, top_left, dilation, rows, use_native: bool):
    """The output gradient dy of a stride-1 conv moved back onto the input's grid, one copy per
    tap side by side on the channel axis: (N, r1 - r0, w, kh*kw*C) with
    ``out[b, r, x, (i*kw + j)*C + c] = dy[b, r0 + r + t - i*dh, x + l - j*dw, c]`` (zero where
    dy has no value), ``top_left = (t, l)`` the conv's top/left padding, ``rows = (r0, r1)``
    the input rows. The kernel gradient is x^T @ this; the input gradient of a conv with few
    output channels is this @ the kernel. By :func:`flaxrestore.xla_cpu.native.windows` when
    ``use_native`` (float32), else as XLA's concatenation of slices of a zero-padded dy."""
    kh, kw = kernel_hw
    h, w = x_hw
    t, l = top_left
    dh, dw = dilation
    r0, r1 = rows
    ho, wo = dy.shape[1:3]
    if use_native:  # written pixel by pixel
        return native.windows(dy, (kh, kw), (r1 - r0, w), (t + r0, l), (-dh, -dw))
    top, left = max(0, (kh - 1) * dh - t), max(0, (kw - 1) * dw - l)
    dyp = zero_pad_hw(dy, top, max(0, t + h - ho), left, max(0, l + w - wo))
    wins = []
    for i in range(kh):
        for j in range(kw):
            r, q = top + t - i * dh + r0, left + l - j * dw
            wins.append(dyp[:, r:r + r1 - r0, q:q + w, :])
    return jnp.concatenate(wins, axis=-1)


def _sum_row_blocks(block, rows: int, blocks: int):
    """sum of block(r0, r1) over ``blocks`` near-equal ranges of [0, rows)."""
    blocks = max(1, min(blocks, rows))
    edges = [rows * k // blocks for k in range(blocks + 1)]
    total = None
    for r0, r1 in zip(edges[:-1], edges[1:]):
        part = block(r0, r1)
        total = part if total is None else total + part
    return total


# Winograd F(2x2, 3x3): input-tile transform B^T d B, kernel transform G g G^T, output
# transform A^T m A (Lavin & Gray, 2016). Entries 0, +-1 and 1/2 only, so the transforms add
# no rounding beyond the additions themselves (measured error vs float64: 2.9e-6 against the
# library conv's 2.0e-6 on a 128-channel conv with unit-scale activations).
_WINO_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINO_AT = ((1, 1, 1, 0), (0, 1, -1, -1))

# CPU convs with at least this many input AND output channels use Winograd when they are not
# differentiated (3x3, stride 1, dilation 1, ungrouped, zero padding <= 2). Measured on the 2-core
# AVX2 machine, ms (Winograd / XNNPACK library conv / torch eager): 1x256x256 128->128
# 115 / 157 / 125; 2x128x256 96->96 33 / 46 / 37; 2x64x128 144->144 19 / 27 / 23; 4x64x64
# 128->128 27 / 39 / 34; 1x256x256 32->32 17 / 17 / 12. At 64 channels there is no gain
# (4x128x128: 34.0 vs 34.1 ms; 4x32x32: 3.3 vs 2.8), hence 96.
WINOGRAD_MIN_CHANNELS = 96
# narrower convs take Winograd on large images only: 64 -> 64 channels at 1x256x256 took 50 ms
# by Winograd against 55 ms (library), at 1x64x64 4.3 against 3.3 ms (2-core AVX2 machine)
WINOGRAD_LARGE_MIN_CHANNELS = 64
WINOGRAD_LARGE_PIXELS = 256 * 256
WINOGRAD_ENV = "FLAXRESTORE_WINOGRAD"


def _winograd_kernel(kernel: jax.Array) -> jax.Array:
    """The transformed kernel (16, C_in, C_out): u[(a, b)] = sum over i, j of
    G[a, i] * G[b, j] * kernel[i, j], as one (16, 9) @ (9, C_in*C_out) matmul (the same sums
    as a three-operand einsum, which XLA:CPU ran 18x slower: 512 -> 512, 28 ms)."""
    kh, kw, cin, cout = kernel.shape
    g = np.asarray(_WINO_G, np.float32)
    gg = np.einsum("ai,bj->abij", g, g).reshape(16, 9)
    u = jnp.dot(jnp.asarray(gg, kernel.dtype), kernel.reshape(9, cin * cout),
                precision=jax.lax.Precision.HIGHEST)
    return u.reshape(16, cin, cout)


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, padding=(1, 1)) -> jax.Array:
    """A 3x3, stride-1, zero-padded NHWC / HWIO conv by Winograd F(2x2, 3x3).

    The output is cut into 2x2 tiles; each tile's 4x4 input window is transformed, the 16
    transformed positions become 16 independent (tiles x C_in) @ (C_in x C_out) matmuls, and
    the products are transformed back: 16 multiplies per tile instead of 36, for two extra
    memory passes. Equal to the direct conv up to float rounding. Each transform is written
    as one broadcast sum over the 16 window positions, which XLA compiles to a single fused
    loop (a per-position formulation compiled to 24 kernels per conv and took twice as long to
    compile, for the same speed).
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"winograd_conv3x3 needs a 3x3 kernel, got {kernel.shape}")
    n, h, w, c = x.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    if native_float32(x, kernel):
        # the transforms by native kernels: XLA fused the output transform into the conv's
        # consumers at 3-4x its own cost
        u = _winograd_kernel(kernel)
        m = jax.lax.dot_general(native.winograd_input(x, padding, (th, tw)), u,
                                (((2,), (1,)), ((0,), (0,))))
        return native.winograd_output(m, (n, ho, wo, kernel.shape[-1]))
    bt, at = (np.asarray(m, np.float32) for m in (_WINO_BT, _WINO_AT))
    # pad an odd output up to whole tiles (the extra row/column is cropped at the end)
    xp = zero_pad_hw(x, ph, ph + 2 * th - ho, pw, pw + 2 * tw - wo)
    # v[(a, b)] = sum over window positions (i, j) of bt[a, i] * bt[b, j] * window[i, j]
    to_v = np.einsum("ai,bj->ijab", bt, bt).reshape(4, 4, 16, 1, 1, 1, 1)
    v = sum(jnp.asarray(to_v[i, j], x.dtype) * xp[None, :, i:i + 2 * th:2, j:j + 2 * tw:2, :]
            for i in range(4) for j in range(4))
    u = _winograd_kernel(kernel)
    m = jax.lax.dot_general(v.reshape(16, -1, c), u, (((2,), (1,)), ((0,), (0,))))
    m = m.reshape(16, n, th, 1, tw, 1, -1)
    # output pixel (2t + p, 2s + q) = sum over (a, b) of at[p, a] * at[q, b] * m[(a, b)], laid
    # out interleaved as (n, t, p, s, q, c)
    to_y = np.einsum("pa,qb->abpq", at, at).reshape(16, 1, 1, 2, 1, 2, 1)
    y = sum(jnp.asarray(to_y[ab], m.dtype) * m[ab] for ab in range(16))
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :ho, :wo]


def _winograd_applies(kernel_shape, stride, padding, dilation, groups, pixels=0) -> bool:
    """Whether conv2d_cpu's forward takes Winograd: 3x3, stride 1, undilated, ungrouped,
    padding <= 2, and at least WINOGRAD_MIN_CHANNELS channels on both sides - or at least
    WINOGRAD_LARGE_MIN_CHANNELS with ``pixels`` (batch x output pixels) >= WINOGRAD_LARGE_PIXELS."""
    kh, kw, cin, cout = kernel_shape
    wide = min(cin, cout) >= WINOGRAD_MIN_CHANNELS or (
        min(cin, cout) >= WINOGRAD_LARGE_MIN_CHANNELS and pixels >= WINOGRAD_LARGE_PIXELS)
    return ((kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and wide and all(0 <= p <= 2 for p in padding)
            and not turned_off(WINOGRAD_ENV))


# convs with at most this many output channels take conv_narrow_out on CPU
NARROW_OUT_MAX = 4


def _narrow_out_applies(kernel_shape, stride, groups) -> bool:
    kh, kw, _, cout = kernel_shape
    return cout <= NARROW_OUT_MAX and kh * kw > 1 and tuple(stride) == (1, 1) and groups == 1


def conv_narrow_out(x, kernel, pads, dilation=(1, 1)):
    """A stride-1, ungrouped NHWC / HWIO conv for very few output channels (an RGB output conv).

    ``pads = ((top, bottom), (left, right))`` zero padding (negative values crop). Every tap's
    contribution comes from ONE matmul of x with the kernel laid out as (C_in, kh*kw*C_out),
    z = x @ K; the output is the sum over taps (i, j) of z's tap channels shifted by (i, j) *
    dilation. The libraries handle 3-channel outputs poorly (measured on the 2-core machine at
    1x256x256: 64 -> 3 3x3 12.7 ms vs 4.2 ms so, torch 9.9; AECR-Net's reflect-padded 7x7
    64 -> 3 on 262x262: 52.8 vs 16.0 ms, torch 47.2). Products and sums in float32 (z is
    float32 whatever x's type), rounded to x's dtype at the end.
    """
    n, h, w, c = x.shape
    kh, kw, cin, cout = kernel.shape
    if cin != c:
        raise ValueError(f"conv_narrow_out: x has {c} channels, the kernel {cin}")
    (top, bottom), (left, right) = pads
    dh, dw = dilation
    ho, wo = h + top + bottom - (kh - 1) * dh, w + left + right - (kw - 1) * dw
    k2 = kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * cout)
    z = jax.lax.dot_general(x.reshape(-1, c), k2, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    z = jax.lax.pad(z.reshape(n, h, w, kh * kw * cout), jnp.zeros((), z.dtype),
                    ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    y = None
    for i in range(kh):
        for j in range(kw):
            t = (i * kw + j) * cout
            part = z[:, i * dh:i * dh + ho, j * dw:j * dw + wo, t:t + cout]
            y = part if y is None else y + part
    return y.astype(x.dtype)


def _conv_input_grad(x, kernel, dy, stride, pads, dilation, groups, conv):
    """dL/dx of ``conv(x, kernel)`` (pads as ((top, bottom), (left, right))), stride 1 and
    ungrouped by matmuls where the conv has few channels on one side:

    * at most NARROW_OUT_MAX output channels (an RGB output conv): dy's windows on x's grid
      (:func:`_dy_windows`, which the kernel gradient builds as well; XLA computes them once)
      times the kernel. dx + dk of AECR-Net's 7x7 64 -> 3 at 4x246x246: 162 ms, 189 ms with the
      library's dx; MPRNet's 3x3 96 -> 3 at 2x256x256: 23 against 30 ms;
    * at most NARROW_OUT_MAX input channels: a narrow-output conv of dy with the flipped kernel
      (MPRNet's 3 -> 96 conv on its 2x256x256 stage images, forward + both gradients: 75 ms
      with the library's input gradient, 24 ms so, torch 36-39 ms);

    a Winograd conv of dy with the flipped kernel (:func:`winograd_conv3x3`) for the 3x3
    convs that take Winograd (:func:`_winograd_applies`, on the transposed channel counts) when
    the native transforms are there (float32); else the library's own (the vjp of ``conv``)."""
    kh, kw, cin, cout = kernel.shape
    if _narrow_out_applies(kernel.shape, stride, groups) and cin > NARROW_OUT_MAX:
        # dx = (dy's windows on x's grid) @ the kernel (XLA's gradient of conv_narrow_out's
        # shifted sum, a sum of kh*kw padded copies, took 510 ms for AECR-Net's 4x246x246 7x7)
        cols = _dy_windows(dy, (kh, kw), x.shape[1:3], (pads[0][0], pads[1][0]), dilation,
                           (0, x.shape[1]), native_float32(x, dy))
        k2 = kernel.transpose(0, 1, 3, 2).reshape(kh * kw * cout, cin).astype(dy.dtype)
        dx = jax.lax.dot_general(cols.reshape(-1, kh * kw * cout), k2, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return dx.reshape(x.shape).astype(x.dtype)
    if _narrow_out_applies((kh, kw, 1, cin), stride, groups):
        dh, dw = dilation
        (t, b), (l, r) = pads
        # the transpose of a stride-1 conv: pad dy by the kernel's reach minus the padding
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        dx = conv_narrow_out(dy, flipped, (((kh - 1) * dh - t, (kh - 1) * dh - b),
                                           ((kw - 1) * dw - l, (kw - 1) * dw - r)), dilation)
        return dx.astype(x.dtype)
    if (native_float32(x, kernel, dy) and tuple(dilation) == (1, 1)
            and _winograd_applies((kh, kw, cout, cin), stride, (2 - pads[0][0], 2 - pads[1][0]),
                                  dilation, groups, x.shape[0] * x.shape[1] * x.shape[2])
            and pads[0][0] == pads[0][1] and pads[1][0] == pads[1][1]):
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        return winograd_conv3x3(dy, flipped, (2 - pads[0][0], 2 - pads[1][0]))
    _, vjp_x = jax.vjp(lambda x: conv(x, kernel), x)
    return vjp_x(dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(x, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
    """The conv (zero padding, no bias) on CPU.

    Convs with at most :data:`NARROW_OUT_MAX` output channels (stride 1, ungrouped): always
    :func:`conv_narrow_out`. Otherwise, not differentiated (inference, evaluation), float32:
    Winograd for 3x3 stride-1 convs with at least :data:`WINOGRAD_MIN_CHANNELS` channels on
    both sides, or :data:`WINOGRAD_LARGE_MIN_CHANNELS` on large images
    (``FLAXRESTORE_WINOGRAD=0``: never; read when the function is traced), else the library
    conv. Differentiated (wider outputs): the kernel gradient from matmuls
    (:func:`conv_kernel_grad`) instead of XLA:CPU's slow kernel-gradient conv; the forward and
    the input gradient (a conv of dy with the flipped kernel) by Winograd where it applies and
    the native transforms are built (float32; measured in-process, training step / torch:
    MPRNet 2x128x128 1.09 -> 0.77, AECR-Net with its VGG loss 0.91 -> 0.74, SNR-Aware
    1.04 -> 0.94; with XLA's own transforms Winograd made MPRNet's step 1.01-1.12x slower),
    else the library conv and its input gradient.
    """
    if _narrow_out_applies(kernel.shape, stride, groups):
        return conv_narrow_out(x, kernel, ((padding[0],) * 2, (padding[1],) * 2), dilation)
    # float32 only: in a 16-bit type the transforms' additions would round more than the conv
    if (x.dtype == jnp.float32 and kernel.dtype == jnp.float32
            and _winograd_applies(kernel.shape, stride, padding, dilation, groups,
                                  x.shape[0] * x.shape[1] * x.shape[2])):
        return winograd_conv3x3(x, kernel, padding)
    return conv_lib(x, kernel, stride, padding, dilation, groups)


def _conv2d_cpu_fwd(x, kernel, stride, padding, dilation, groups):
    if _narrow_out_applies(kernel.shape, stride, groups):
        y = conv_narrow_out(x, kernel, ((padding[0],) * 2, (padding[1],) * 2), dilation)
    elif (native_float32(x, kernel)
            and _winograd_applies(kernel.shape, stride, padding, dilation, groups,
                                  x.shape[0] * x.shape[1] * x.shape[2])):
        y = winograd_conv3x3(x, kernel, padding)
    else:
        y = conv_lib(x, kernel, stride, padding, dilation, groups)
    return y, (x, kernel)


def _conv2d_cpu_bwd(stride, padding, dilation, groups, res, dy):
    x, kernel = res
    dx = _conv_input_grad(
        x, kernel, dy, stride, ((padding[0],) * 2, (padding[1],) * 2), dilation, groups,
        lambda x, k: conv_lib(x, k, stride, padding, dilation, groups))
    dk = conv_kernel_grad(x, dy, kernel.shape, stride, padding, dilation, groups)
    return dx, dk.astype(kernel.dtype)


conv2d.defvjp(_conv2d_cpu_fwd, _conv2d_cpu_bwd)



def _conv2d_valid_fwd_impl(x, kernel, stride, dilation):
    if _narrow_out_applies(kernel.shape, stride, 1):
        return conv_narrow_out(x, kernel, ((0, 0), (0, 0)), dilation)
    sh, sw = stride
    dh, dw = dilation
    kw = kernel.shape[1]
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(sh, sw), padding=((0, 0), (0, sw)), rhs_dilation=(dh, dw),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    wo = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
    return y[:, :, :wo, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_valid_cpu(x, kernel, stride, dilation):
    return _conv2d_valid_fwd_impl(x, kernel, stride, dilation)


def _conv2d_valid_cpu_fwd(x, kernel, stride, dilation):
    return _conv2d_valid_fwd_impl(x, kernel, stride, dilation), (x, kernel)


def _conv2d_valid_cpu_bwd(stride, dilation, res, dy):
    x, kernel = res
    dx = _conv_input_grad(x, kernel, dy, stride, ((0, 0), (0, 0)), dilation, 1,
                          lambda x, k: _conv2d_valid_fwd_impl(x, k, stride, dilation))
    dk = conv_kernel_grad(x, dy, kernel.shape, stride, (0, 0), dilation)
    return dx, dk.astype(kernel.dtype)


_conv2d_valid_cpu.defvjp(_conv2d_valid_cpu_fwd, _conv2d_valid_cpu_bwd)


def conv2d_valid(x: jax.Array, kernel: jax.Array, stride=(1, 1), dilation=(1, 1)) -> jax.Array:
    """An unpadded ('VALID') NHWC/HWIO conv, groups=1, no bias, for XLA:CPU.

    Computed with one zero column appended on the right and that extra output column cropped:
    the numbers are the same (the column only feeds the cropped output), but XLA:CPU runs a
    zero-padding conv on a much faster path than a padding-free one for some shapes (measured on
    the 2-core machine: 7x7 64->3 on 262x262, 1.0 s unpadded vs 0.05 s); convs with at most
    :data:`NARROW_OUT_MAX` outputs are :func:`conv_narrow_out`; the kernel gradient comes from
    matmuls (:func:`conv_kernel_grad`).
    """
    return _conv2d_valid_cpu(x, kernel, tuple(stride), tuple(dilation))


def _conv_transpose_lib(x, kernel, stride, pads, dilation):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=pads, lhs_dilation=stride,
        rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_transpose(x, kernel, stride, pads, dilation):
    """:class:`flaxrestore.layers.ConvTranspose2d`'s lhs-dilated conv (no bias) with a kernel gradient from one
    matmul per tap over the non-zero positions of the dilated input only (XLA:CPU's own kernel
    gradient of an lhs-dilated conv was about 1000x slower than the forward). The input
    gradient is the library's (a strided conv)."""
    return _conv_transpose_lib(x, kernel, stride, pads, dilation)


def _conv_transpose_cpu_fwd(x, kernel, stride, pads, dilation):
    return _conv_transpose_lib(x, kernel, stride, pads, dilation), (x, kernel)


def _conv_transpose_cpu_bwd(stride, pads, dilation, res, dy):
    x, kernel = res
    _, vjp_x = jax.vjp(lambda x: _conv_transpose_lib(x, kernel, stride, pads, dilation), x)
    (dx,) = vjp_x(dy)
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = dy.shape[1:3]

    def axis_range(i, d, lo, s, size, out):
        # input rows a whose dilated position lo + s*a is read by tap i at output row
        # y = lo + s*a - i*d, 0 <= y < out
        a0 = max(0, -((lo - i * d) // s))  # ceil((i*d - lo) / s)
        a1 = min(size - 1, (out - 1 + i * d - lo) // s)
        return a0, a1, lo + s * a0 - i * d

    taps = []
    for i in range(kh):
        a0, a1, y0 = axis_range(i, dilation[0], pads[0][0], stride[0], h, ho)
        for j in range(kw):
            b0, b1, x0 = axis_range(j, dilation[1], pads[1][0], stride[1], w, wo)
            if a1 < a0 or b1 < b0:
                taps.append(jnp.zeros((cin, cout), kernel.dtype))
                continue
            na, nb = a1 - a0 + 1, b1 - b0 + 1
            xs = x[:, a0:a1 + 1, b0:b1 + 1, :].reshape(-1, cin)
            gs = jax.lax.slice(dy, (0, y0, x0, 0),
                               (n, y0 + stride[0] * (na - 1) + 1, x0 + stride[1] * (nb - 1) + 1,
                                cout), (1, stride[0], stride[1], 1)).reshape(-1, cout)
            taps.append(xs.T @ gs)
    dk = jnp.stack(taps).reshape(kernel.shape)
    return dx, dk.astype(kernel.dtype)


conv_transpose.defvjp(_conv_transpose_cpu_fwd, _conv_transpose_cpu_bwd)


# Conv2d.concat_call sums per-piece convs in CPU programs below this many output channels
CONCAT_SPLIT_MAX_OUT = 128


def concat_split_applies(pieces: int, groups: int, out_channels: int) -> bool:
    """Whether the conv of a channel concatenation of ``pieces`` arrays is computed as the sum of
    each piece's conv with its slice of the kernel (``flaxrestore.layers.Conv2d.concat_call``).

    XLA:CPU's conv (YNNPACK) is inefficient with narrow outputs and narrow inputs alike but much
    less so with narrow inputs: SNR-Aware's HRconv at 4x128x128, 128 -> 64 channels, took 130 ms
    as one conv and 2 x 47 ms as two 64 -> 64 convs. With 128 or more outputs the single conv
    wins: SNR-Aware's upconv2 at 4x64x64, 128 -> 256, took 65 ms against 2 x 57 ms for the
    pieces, its input gradient (256 -> 128) 60 ms against 2 x 63 ms (training step: x0.93 with
    upconv1/upconv2 concatenated). Grouped convs form the concatenation.
    """
    return pieces > 1 and groups == 1 and out_channels < CONCAT_SPLIT_MAX_OUT

