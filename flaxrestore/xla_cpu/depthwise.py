"""Depthwise and grouped convs on XLA:CPU, as shifted multiply-adds with hand-written backwards.

XLA:CPU lowers ``feature_group_count`` convs slowly (DESIGN.md: 96 channels at 256x256, 213 ms
against 28 ms as nine shifted multiply-adds, and far worse for their gradients). The forms here
compute the same numbers (float rounding aside); float32 depthwise convs go to the native kernels
(:mod:`flaxrestore.xla_cpu.native`) when they are built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxrestore.xla_cpu import native
from flaxrestore.xla_cpu.common import native_float32, zero_pad_hw


def depthwise_conv_shifted(x, kernel, dilation=(1, 1)):
    """Depthwise stride-1 conv on an already padded NHWC input; kernel is (kh, kw, 1, C).

    Plain autodiff of this saves every shifted slice for the backward (kh*kw copies of x);
    :func:`depthwise_conv2d` is the same forward with a backward that keeps only x.
    """
    kh, kw = kernel.shape[:2]
    dh, dw = dilation
    ho = x.shape[1] - dh * (kh - 1)
    wo = x.shape[2] - dw * (kw - 1)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = x[:, i * dh:i * dh + ho, j * dw:j * dw + wo, :] * kernel[i, j, 0]
            out = tap if out is None else out + tap
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv2d(x, kernel, padding=(0, 0), dilation=(1, 1)):
    """Depthwise stride-1 conv (zero padding, no bias), NHWC / (kh, kw, 1, C), as shifted
    multiply-adds, with a hand-written backward (residuals: x and the kernel only).

    Backward: dx is the same shifted conv of dy (padded by dilation*(k-1)-padding) with the
    spatially flipped kernel; dkernel[i, j] is the sum over batch and space of the (i, j)-shifted
    padded x times dy. For float32, when :func:`flaxrestore.xla_cpu.native.available`, the three are
    native kernels (:func:`flaxrestore.xla_cpu.native.depthwise_conv`,
    :func:`~flaxrestore.xla_cpu.native.depthwise_kernel_grad`: one pass over memory each); otherwise
    shifted multiply-adds and one reduction per tap.
    """
    ph, pw = padding
    if native_float32(x, kernel):
        kh, kw = kernel.shape[:2]
        out_hw = (x.shape[1] + 2 * ph - dilation[0] * (kh - 1),
                  x.shape[2] + 2 * pw - dilation[1] * (kw - 1))
        return native.depthwise_conv(x, kernel, out_hw, padding, dilation)
    return depthwise_conv_shifted(zero_pad_hw(x, ph, ph, pw, pw), kernel, dilation)


def _depthwise_fwd(x, kernel, padding, dilation):
    return depthwise_conv2d(x, kernel, padding, dilation), (x, kernel)


def _depthwise_bwd(padding, dilation, res, dy):
    x, kernel = res
    ph, pw = padding
    dh, dw = dilation
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    ho, wo = dy.shape[1:3]
    th, tw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    if native_float32(x, dy, kernel):
        # dk in one pass over x and dy instead of one reduction per tap over a shifted copy of x
        dx = native.depthwise_conv(dy, kernel[::-1, ::-1], (h, w), (th, tw), dilation)
        dk = native.depthwise_kernel_grad(x, dy, (kh, kw), padding, dilation)
        return dx, dk
    dyp = zero_pad_hw(dy, th, h + dh * (kh - 1) - ho - th, tw, w + dw * (kw - 1) - wo - tw)
    dx = depthwise_conv_shifted(dyp, kernel[::-1, ::-1], dilation)
    xp = zero_pad_hw(x, ph, ph, pw, pw)
    taps = [jnp.sum(xp[:, i * dh:i * dh + ho, j * dw:j * dw + wo, :] * dy, axis=(0, 1, 2))
            for i in range(kh) for j in range(kw)]
    dk = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return dx.astype(x.dtype), dk


depthwise_conv2d.defvjp(_depthwise_fwd, _depthwise_bwd)


def _grouped_taps(xp, kernel, groups: int, dilation: tuple[int, int]):
    """Valid stride-1 grouped conv of an already padded NHWC ``xp`` as shifted multiply-adds.

    ``kernel`` is HWIO (kh, kw, cin_g, out): kernel[i, j, k, g*cout_g + o] weighs input channel
    g*cin_g + k into output channel g*cout_g + o.
    """
    kh, kw, cin_g, cout = kernel.shape
    cout_g = cout // groups
    dh, dw = dilation
    b = xp.shape[0]
    ho, wo = xp.shape[1] - dh * (kh - 1), xp.shape[2] - dw * (kw - 1)
    kg = kernel.reshape(kh, kw, cin_g, groups, cout_g)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i * dh:i * dh + ho, j * dw:j * dw + wo, :].reshape(b, ho, wo, groups, cin_g)
            for k in range(cin_g):
                t = tap[..., k:k + 1] * kg[i, j, k]  # (b, ho, wo, groups, cout_g)
                out = t if out is None else out + t
    return out.reshape(b, ho, wo, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def grouped_conv_shifted(x, kernel, groups: int, padding: tuple[int, int],
                         dilation: tuple[int, int]):
    """Stride-1 zero-padded grouped conv (no bias), NHWC / HWIO, as shifted multiply-adds.

    The backward differentiates an equivalent channel-expanded depthwise form
    (:func:`_grouped_expanded`): on CPU it compiled in half the time (1.8 s vs 3.6 s) and ran
    2-3x faster at 256x256 than autodiff of this forward (measured on a loaded 2-core machine).
    """
    ph, pw = padding
    return _grouped_taps(zero_pad_hw(x, ph, ph, pw, pw), kernel, groups, dilation)


def _grouped_fwd(x, kernel, groups, padding, dilation):
    return grouped_conv_shifted(x, kernel, groups, padding, dilation), (x, kernel)


def _grouped_expanded(x, kernel, groups, padding, dilation):
    """The same conv as one depthwise conv over cin_g channel-expanded copies of x: copy k holds,
    at output channel g*cout_g + o, input channel g*cin_g + k. Slower forward than
    :func:`_grouped_taps`, but its autodiff keeps every array channel-minor and full width."""
    kh, kw, cin_g, cout = kernel.shape
    b, h, w, _ = x.shape
    xg = x.reshape(b, h, w, groups, cin_g)
    xs = jnp.concatenate([jnp.repeat(xg[..., k], cout // groups, axis=-1) for k in range(cin_g)],
                         axis=-1)
    ks = kernel.reshape(kh, kw, 1, cin_g * cout)  # copy k, channel c -> k * cout + c
    ph, pw = padding
    y = depthwise_conv_shifted(zero_pad_hw(xs, ph, ph, pw, pw), ks, dilation)
    return sum(y[..., k * cout:(k + 1) * cout] for k in range(cin_g))


def _grouped_bwd(groups, padding, dilation, res, dy):
    x, kernel = res
    _, vjp = jax.vjp(lambda x, k: _grouped_expanded(x, k, groups, padding, dilation), x, kernel)
    return vjp(dy)


grouped_conv_shifted.defvjp(_grouped_fwd, _grouped_bwd)


def _taps_sum(xp, kernels, offsets, pad: int, out_hw=None):
    _, hp, wp, _ = xp.shape
    h, w = out_hw or (hp - 2 * pad, wp - 2 * pad)
    out = None
    for k, (dy, dx) in zip(kernels, offsets):
        t = xp[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w, :] * k
        out = t if out is None else out + t
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def offset_taps(xp, kernels, offsets: tuple, pad: int):
    """out[p] = sum_t xp[p + pad + offsets[t]] * kernels[t]: a depthwise conv with arbitrary tap
    offsets (|offset| <= pad) on an input already padded by ``pad``; kernels (T, C).

    Hand-written backward (autodiff padded every tap's cotangent to the full padded size and
    materialised them all): d xp is the same tap sum of dy (padded by 2*pad) at the negated
    offsets; d kernels[t] is the sum over batch and space of the shifted xp times dy.
    """
    return _taps_sum(xp, kernels, offsets, pad)


def _offset_taps_fwd(xp, kernels, offsets, pad):
    return _taps_sum(xp, kernels, offsets, pad), (xp, kernels)


def _offset_taps_bwd(offsets, pad, res, g):
    xp, kernels = res
    neg = tuple((-dy, -dx) for dy, dx in offsets)
    _, hp, wp, _ = xp.shape
    dxp = _taps_sum(zero_pad_hw(g, 2 * pad, 2 * pad, 2 * pad, 2 * pad), kernels, neg, pad, (hp, wp))
    h, w = hp - 2 * pad, wp - 2 * pad
    dk = jnp.stack([jnp.sum(xp[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w, :] * g,
                            axis=(0, 1, 2)) for dy, dx in offsets])
    return dxp.astype(xp.dtype), dk.astype(kernels.dtype)


offset_taps.defvjp(_offset_taps_fwd, _offset_taps_bwd)


def grouped_shifted_applies(kernel_shape, groups: int, stride) -> bool:
    """Whether a grouped (not depthwise) conv takes :func:`grouped_conv_shifted`: stride 1 and at
    most 4 channels per group on either side (DarkIR's DBlock ``extra_conv``, 2 in and 2 out).
    XLA:CPU's library conv took 0.64 s forward and 124 s for the gradient at 256x256 with 64
    channels in groups of 2; this form about 0.1 s and 2 s (shared 2-core machine under load)."""
    kh, kw, cin_g, cout = kernel_shape
    return (groups > 1 and tuple(stride) == (1, 1) and max(cin_g, cout // groups) <= 4
            and not (cin_g == 1 and cout == groups))


# Sums of dilated depthwise branches (DarkIR's spatial attention): ``sum(conv(x) for conv in
# convs)`` for stride-1 depthwise 3x3 convs with padding = dilation. The conv-like arguments are
# ``flaxrestore.layers.Conv2d`` modules (read by attribute: kernel, bias, groups, ...).


def branch_pad(convs, channels: int) -> int | None:
    """The largest dilation when every conv is a stride-1 zero-padded depthwise 3x3 conv with
    padding = dilation on ``channels`` channels (so all can read ONE copy of x padded by it),
    else None."""
    if not convs or not all(
            cv.groups == cv.in_channels == cv.out_channels == channels
            and cv.kernel_size == (3, 3) and cv.stride == (1, 1) and cv.padding == cv.dilation
            and cv.dilation[0] == cv.dilation[1] and cv.padding_mode == "zeros" for cv in convs):
        return None
    return max(cv.dilation[0] for cv in convs)


def dilated_branch_sum(xp, pad: int, convs):
    """sum(conv(x)) from ``xp`` = x zero-padded by ``pad`` on each side (see :func:`branch_pad`),
    as shifted multiply-adds (:func:`offset_taps`); taps at the same offset (the centres) are
    merged. Written per branch, XLA:CPU padded x once per dilation."""
    taps = {}  # (dy, dx) -> summed (C,) weight
    bias = None
    for cv in convs:
        d = cv.dilation[0]
        kernel = cv.kernel[...].astype(xp.dtype)
        for i in range(3):
            for j in range(3):
                key = ((i - 1) * d, (j - 1) * d)
                taps[key] = taps[key] + kernel[i, j, 0] if key in taps else kernel[i, j, 0]
        if cv.bias is not None:
            bb = cv.bias[...].astype(xp.dtype)
            bias = bb if bias is None else bias + bb
    out = offset_taps(xp, jnp.stack(list(taps.values())), tuple(taps), pad)
    return out if bias is None else out + bias


def pointwise_grouped_applies(pointwise, grouped) -> bool:
    """Whether :func:`pointwise_grouped_padded` takes this pair: a 1x1 stride-1 unpadded ungrouped
    conv to ``dw`` channels followed by a 3x3 stride-1 padding-1 zero-padded conv on ``dw``
    channels in groups of 2 (DarkIR's DBlock ``conv1`` then ``extra_conv``)."""
    dw = pointwise.out_channels
    return (grouped.in_channels == dw and grouped.out_channels == dw and grouped.groups * 2 == dw
            and grouped.kernel_size == (3, 3) and grouped.stride == (1, 1)
            and grouped.padding == (1, 1) and grouped.dilation == (1, 1)
            and grouped.padding_mode == "zeros" and pointwise.kernel_size == (1, 1)
            and pointwise.padding == (0, 0) and pointwise.stride == (1, 1)
            and pointwise.groups == 1)


def pointwise_grouped_padded(t, pointwise, grouped, pad: int):
    """``grouped(pointwise(t))`` zero-padded by ``pad`` on each side, for the pair that
    :func:`pointwise_grouped_applies` accepts.

    Computed as one 1x1 conv to two channel-expanded copies (copy k, channel g*2+o = the
    pointwise conv's channel g*2+k: its weight columns gathered, exact), ONE depthwise 3x3 over
    both copies on the input padded by 1 + ``pad``, the two halves summed, and the border zeroed
    by a constant 0/1 mask. Two XLA:CPU problems of the direct form are avoided: it slices a
    size-2 minor axis (groups x 2 channels), which is not vectorised; and the dilated taps'
    centre slice of pad(x) simplifies to x, so XLA fused (recomputed) the grouped conv into the
    tap sum (together 60% of DarkIR-m's forward). The mask keeps the padded array a separate,
    materialised fusion.
    """
    dw = pointwise.out_channels
    w1 = pointwise.kernel[...].astype(t.dtype)[0, 0]  # (c, dw)
    base = (np.arange(dw) // 2) * 2
    cols = np.concatenate([base, base + 1])  # copy 0 then copy 1
    lead = t.shape[:-1]
    xs = (t.reshape(-1, t.shape[-1]) @ w1[:, cols]).reshape(*lead, 2 * dw)
    if pointwise.bias is not None:
        xs = xs + pointwise.bias[...].astype(t.dtype)[cols]
    k = grouped.kernel[...].astype(t.dtype)  # (3, 3, 2, dw): [i, j, k, g*2+o]
    ks = jnp.concatenate([k[:, :, 0], k[:, :, 1]], axis=-1)[:, :, None, :]  # (3, 3, 1, 2dw)
    y = depthwise_conv2d(xs, ks, (1 + pad, 1 + pad))
    y = y[..., :dw] + y[..., dw:]
    if grouped.bias is not None:
        y = y + grouped.bias[...].astype(t.dtype)
    _, h, w, _ = t.shape
    mask = np.zeros((1, h + 2 * pad, w + 2 * pad, 1), np.float32)
    mask[:, pad:pad + h, pad:pad + w] = 1.0
    return y * jnp.asarray(mask, t.dtype)

