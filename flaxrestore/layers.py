"""Primitives shared by several models, each with PyTorch semantics.

Everything here is channels-last (NHWC). Where JAX/Flax and PyTorch differ by default, the
difference is settled in one place in this file, with a one-line comment saying how.

Parameter naming convention (the converter relies on it, see ``porting/convert.py``):
a conv's weight is ``kernel`` in HWIO layout, its bias ``bias``; a norm's weight is ``scale``.
Every other parameter keeps the torch attribute name.

How a primitive is computed is asked of one seam, :func:`flaxrestore.lowering.per_platform`:
programs compiled for a TPU or GPU get the library ops written here (``conv_general_dilated``,
``feature_group_count`` depthwise convs, ``reduce_window``, ``jax.checkpoint``); programs
compiled for the CPU get the XLA:CPU lowerings of :mod:`flaxrestore.xla_cpu`, which compute the
same numbers faster there. ``FLAXRESTORE_LOWERING=accelerator`` (or
``lowering.accelerator_path()``) gives a CPU process the accelerator path, for testing it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import lowering
from flaxrestore.xla_cpu import convs as xla_convs
from flaxrestore.xla_cpu import depthwise as xla_depthwise
from flaxrestore.xla_cpu import pooling as xla_pooling
from flaxrestore.xla_cpu import remat as xla_remat
from flaxrestore.xla_cpu import sampling as xla_sampling

# nnx.Sequential is used as-is; the converter treats its `layers` list as torch's child indices.
Sequential = nnx.Sequential

# torch.nn.functional.gelu defaults to the exact erf form; jax.nn.gelu defaults to tanh.
gelu = functools.partial(jax.nn.gelu, approximate=False)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def torch_uniform(fan_in: int):
    """PyTorch's default conv/linear init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):  # under jit / eval_shape
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        # Eagerly, every new shape would compile its own XLA program; numpy seeded by the key
        # draws the same kind of numbers without compiling (deterministic given the key).
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        values = np.random.default_rng(seed).uniform(-bound, bound, shape)
        return jnp.asarray(values, dtype=dtype)

    return init


# numpy's pad-mode names for torch's padding_mode / F.pad modes.
_PAD_MODES = {"zeros": "constant", "constant": "constant", "reflect": "reflect",
              "replicate": "edge", "circular": "wrap"}


def pad2d(x: jax.Array, pad: Sequence[int] | int, mode: str = "zeros") -> jax.Array:
    """Pads H and W of an NHWC array. ``pad`` is (top, bottom, left, right) or one int.

    ``mode`` takes torch's names: zeros/constant, reflect (no edge repeat), replicate, circular.
    """
    if isinstance(pad, int):
        pad = (pad, pad, pad, pad)
    t, b, l, r = pad
    if mode not in _PAD_MODES:
        raise ValueError(f"unknown padding mode {mode!r}; expected one of {sorted(_PAD_MODES)}")
    return jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), mode=_PAD_MODES[mode])


def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged. In CPU programs it is computed into a buffer of its own
    (:func:`flaxrestore.xla_cpu.remat.materialize`: XLA:CPU otherwise re-computes a chain of
    cheap residual adds in every consumer); elsewhere ``x`` itself."""
    return lowering.per_platform(cpu=lambda: xla_remat.materialize(x), default=lambda: x)


_REMAT = {"on": False}


@contextlib.contextmanager
def rematerialize(enabled: bool = True):
    """While tracing inside this context, blocks called through :func:`checkpoint_call`
    (Restormer's TransformerBlock, MPRNet's CAB) keep only their inputs for the backward pass and
    recompute their activations there: less memory for about one more forward pass of compute.
    The trainer turns it on with the recipe field ``remat``. On CPU (measured): MPRNet's
    gradient at 2x128x128 needs 1.9 GB of XLA temporaries instead of 2.8 GB; Restormer's does
    not drop, its peak lies inside the backward pass. GPU/TPU programs use ``jax.checkpoint``."""
    previous = _REMAT["on"]
    _REMAT["on"] = bool(enabled)
    try:
        yield
    finally:
        _REMAT["on"] = previous


def checkpoint_call(module: nnx.Module, fn, *args):
    """``fn(module, *args)``; inside :func:`rematerialize`, its activations are recomputed in
    the backward pass instead of stored. ``module`` must not update its own state in ``fn``
    (no batch statistics); ``args`` are arrays."""
    if not _REMAT["on"]:
        return fn(module, *args)
    graph, state = nnx.split(module)

    def pure(state, *a):
        return fn(nnx.merge(graph, state), *a)

    # XLA:CPU strips jax.checkpoint's barrier and merges the recomputation away: CPU programs
    # recompute from a copy it cannot merge (flaxrestore.xla_cpu.remat.recompute_in_backward)
    return lowering.per_platform(
        cpu=lambda: xla_remat.recompute_in_backward(pure)(state, *args),
        default=lambda: jax.checkpoint(pure)(state, *args))


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` over the last axis, in ``y``'s dtype, with the bias's gradient summed in
    float32: in a 16-bit ``y`` the gradient is a sum over every batch and pixel position, which
    in bfloat16 stalls (SNR-Aware's output-conv biases came out at a quarter of their float32
    norm at 2x32x32). float32 ``y`` is added as it is."""
    if y.dtype == jnp.float32:
        return y + bias.astype(y.dtype)
    return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


def matmul_channels(x, kernel2d):
    """x (..., C) @ kernel (C, O) as one 2-D matmul: XLA:CPU runs the gradient of a matmul that
    contracts several leading axes (the kernel gradient of a 4-D x) about 3x slower."""
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ kernel2d).reshape(*lead, kernel2d.shape[-1])


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input: explicit symmetric padding, groups, dilation, padding_mode.

    ``kernel`` is HWIO, i.e. (kh, kw, in/groups, out); ``bias`` is (out,). Initialised like torch.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 rngs: nnx.Rngs):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        fan_in = (in_channels // groups) * kh * kw
        init = torch_uniform(fan_in)
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_channels // groups, out_channels)))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return lowering.per_platform(cpu=lambda: self.apply(x, cpu=True),
                                     default=lambda: self.apply(x, cpu=False))

    def apply(self, x: jax.Array, *, cpu: bool) -> jax.Array:
        """The conv with its bias, by the library conv or (``cpu``) its XLA:CPU lowering, without
        asking the seam (for code that is itself one side of a :func:`lowering.per_platform`)."""
        y = self._conv(x, self.kernel[...].astype(x.dtype), cpu=cpu)
        if self.bias is not None:
            y = add_bias(y, self.bias[...])
        return y

    def concat_call(self, xs: Sequence[jax.Array]) -> jax.Array:
        """``self(jnp.concatenate(xs, axis=-1))``. In CPU programs, for fewer than
        ``xla_cpu.convs.CONCAT_SPLIT_MAX_OUT`` outputs, the conv of each piece with its slice of
        the kernel's input channels is summed instead of forming the concatenation (equal up to
        float summation order; see :func:`flaxrestore.xla_cpu.convs.concat_split_applies`)."""
        xs = list(xs)
        sizes = [int(x.shape[-1]) for x in xs]
        if sum(sizes) != self.in_channels:
            raise ValueError(f"concat_call: pieces with {sizes} channels (sum {sum(sizes)}) for a "
                             f"conv with {self.in_channels} input channels")
        dtype = jnp.result_type(*xs)
        kernel = self.kernel[...].astype(dtype)

        def split():
            y, start = None, 0
            for x, c in zip(xs, sizes):
                part = self._conv(x.astype(dtype), kernel[:, :, start:start + c, :], cpu=True)
                y = part if y is None else y + part
                start += c
            return y

        def whole(cpu: bool):
            return self._conv(jnp.concatenate(xs, axis=-1).astype(dtype), kernel, cpu=cpu)

        cpu = (split if xla_convs.concat_split_applies(len(xs), self.groups, self.out_channels)
               else lambda: whole(True))
        y = lowering.per_platform(cpu=cpu, default=lambda: whole(False))
        if self.bias is not None:
            y = add_bias(y, self.bias[...])
        return y

    def _conv(self, x: jax.Array, kernel: jax.Array, cpu: bool) -> jax.Array:
        """The conv without bias: the library conv, or with ``cpu`` its XLA:CPU lowering
        (:mod:`flaxrestore.xla_cpu`: depthwise and few-channel grouped convs as shifted
        multiply-adds, dense convs with Winograd / narrow-output forms and matmul gradients)."""
        ph, pw = self.padding
        if self.padding_mode != "zeros" and (ph or pw):
            x = pad2d(x, (ph, ph, pw, pw), self.padding_mode)
            ph = pw = 0
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and not (ph or pw):
            return matmul_channels(x, kernel[0, 0])  # a 1x1 conv is a matmul over channels
        if not cpu:
            return jax.lax.conv_general_dilated(
                x, kernel, window_strides=self.stride, padding=((ph, ph), (pw, pw)),
                rhs_dilation=self.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups)
        depthwise = self.groups == self.in_channels == self.out_channels and self.groups > 1
        if depthwise and self.stride == (1, 1):
            return xla_depthwise.depthwise_conv2d(x, kernel, (ph, pw), self.dilation)
        if xla_depthwise.grouped_shifted_applies(kernel.shape, self.groups, self.stride):
            return xla_depthwise.grouped_conv_shifted(x, kernel, self.groups, (ph, pw),
                                                      self.dilation)
        return xla_convs.conv2d(x, kernel, self.stride, (ph, pw), self.dilation, self.groups)


def depthwise_branch_sum(x: jax.Array, branches: Sequence[Conv2d],
                         pre: Sequence[Conv2d] = ()) -> jax.Array:
    """``sum(conv(y) for conv in branches)`` where ``y`` is ``x`` through the convs of ``pre`` in
    order: parallel depthwise convs (DarkIR's dilated 3x3 branches) on one input.

    In CPU programs, when every branch is a stride-1 depthwise 3x3 with padding = dilation, the
    branches are shifted multiply-adds on ONE copy of ``y`` padded by the largest dilation, and a
    ``pre`` of a 1x1 conv then a 3x3 conv in groups of 2 is computed straight into that padded
    copy (:mod:`flaxrestore.xla_cpu.depthwise`)."""
    branches, pre = list(branches), list(pre)

    def chain(cpu: bool):
        y = x
        for conv in pre:
            y = conv.apply(y, cpu=cpu)
        return y

    def default():
        y = chain(False)
        return sum(conv.apply(y, cpu=False) for conv in branches)

    def cpu():
        channels = pre[-1].out_channels if pre else x.shape[-1]
        pad = xla_depthwise.branch_pad(branches, channels)
        if pad is None:
            y = chain(True)
            return sum(conv.apply(y, cpu=True) for conv in branches)
        if len(pre) >= 2 and xla_depthwise.pointwise_grouped_applies(pre[-2], pre[-1]):
            y = x
            for conv in pre[:-2]:
                y = conv.apply(y, cpu=True)
            yp = xla_depthwise.pointwise_grouped_padded(y, pre[-2], pre[-1], pad)
        else:
            yp = pad2d(chain(True), pad)
        return xla_depthwise.dilated_branch_sum(yp, pad, branches)

    return lowering.per_platform(cpu=cpu, default=default)


class ChannelLayerNorm(nnx.Module):
    """LayerNorm over the channel (last) axis with torch's conventions: biased variance, eps inside
    the sqrt (Flax's default eps is 1e-6 and its fast variance is E[x^2]-E[x]^2; neither is used).

    ``center=False`` is Restormer's BiasFree form: the *uncentred* x divided by the centred std,
    with no bias. It is not RMSNorm.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, center: bool = True):
        self.eps = eps
        self.center = center
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32)) if center else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        num = x - mu if self.center else x
        y = num * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(dtype)


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
    """torch.nn.PixelUnshuffle in NHWC: out channel c*r*r + i*r + j holds in[c] at (r*y+i, r*x+j).

    TF's space_to_depth puts the channel fastest and does not match.
    """
    b, h, w, c = x.shape
    if h % r or w % r:
        raise ValueError(f"pixel_unshuffle: spatial size {(h, w)} not divisible by {r}")
    x = x.reshape(b, h // r, r, w // r, r, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """torch.nn.PixelShuffle in NHWC, the exact inverse of :func:`pixel_unshuffle`."""
    b, h, w, c = x.shape
    if c % (r * r):
        raise ValueError(f"pixel_shuffle: {c} channels not divisible by {r * r}")
    x = x.reshape(b, h, w, c // (r * r), r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


def l2_norm(x: jax.Array, axis: int, eps: float = 1e-12, keepdims: bool = False) -> jax.Array:
    """max(||x||_2, eps) over ``axis``: the divisor of F.normalize (eps clamps the norm, it is
    not added)."""
    return jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)), eps)



def _bilinear_taps(n_in: int, n_out: int, scale_factor: float | None, align_corners: bool):
    """Source indices and weights of torch's 1-D bilinear (linear) interpolation, antialias off."""
    import numpy as np

    f32 = np.float32  # torch computes the source coordinates in float32 for float32 images
    dst = np.arange(n_out, dtype=f32)
    if align_corners:
        scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0.0)
        src = scale * dst
    else:
        # torch uses 1/scale_factor when the caller gave one, else in/out; negatives clamp to 0
        scale = f32(1.0 / scale_factor) if scale_factor is not None else f32(n_in) / f32(n_out)
        # torch's kernel fuses this multiply-add (one rounding): emulate it in float64
        src = (np.float64(scale) * np.float64(dst + f32(0.5)) - 0.5).astype(f32)
        src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(f32)
    return i0, i1, f32(1.0) - w1, w1


def resize_bilinear(x: jax.Array, size: Sequence[int] | int | None = None,
                    scale_factor: Sequence[float] | float | None = None,
                    align_corners: bool = False) -> jax.Array:
    """F.interpolate(mode='bilinear') on NHWC: no antialiasing, torch's source-index rule.

    Give ``size`` (H, W) or ``scale_factor`` as torch does; with a scale factor the output is
    floor(in * s) and the source coordinates use 1/s (torch's default recompute_scale_factor).
    jax.image.resize antialiases when shrinking and does not match torch there.
    """
    h, w = x.shape[1], x.shape[2]
    if (size is None) == (scale_factor is None):
        raise ValueError("resize_bilinear: give exactly one of size and scale_factor")
    if size is not None:
        oh, ow = _pair(size)
        sh = sw = None
    else:
        sh, sw = (scale_factor, scale_factor) if not isinstance(scale_factor, (tuple, list)) \
            else scale_factor
        oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    for axis, n_in, n_out, s in ((1, h, oh, sh), (2, w, ow, sw)):
        i0, i1, w0, w1 = _bilinear_taps(n_in, n_out, s, align_corners)
        shape = [1, 1, 1, 1]
        shape[axis] = n_out
        a = jnp.take(x, i0, axis=axis)
        b = jnp.take(x, i1, axis=axis)
        x = a * w0.reshape(shape).astype(x.dtype) + b * w1.reshape(shape).astype(x.dtype)
    return x


class PReLU(nnx.Module):
    """torch.nn.PReLU over the channel (last) axis; ``weight`` has torch's shape (num_parameters,).

    One instance may be shared by many modules (MPRNet): the converter then sees its ``weight``
    under every alias, as torch's state_dict does.
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.25):
        self.weight = nnx.Param(jnp.full((num_parameters,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.weight[...].astype(x.dtype)
        return jnp.where(x >= 0, x, a * x)


def simple_gate(x: jax.Array) -> jax.Array:
    """NAFNet/DarkIR SimpleGate: split the channel (last) axis into halves, first * second."""
    a, b = jnp.split(x, 2, axis=-1)
    return a * b


# --------------------------------------------------------------------------------------------
# Transposed conv, modulated deformable conv (DCNv2) and network deconvolution (FastDeconv).
# First used by AECR-Net; written to be usable by any model.


class ConvTranspose2d(nnx.Module):
    """torch.nn.ConvTranspose2d on NHWC input (groups=1).

    ``kernel`` is the HWIO kernel of the equivalent stride-1 conv over the stride-dilated input:
    torch's weight (in, out, kh, kw) flipped in both spatial axes and laid out (kh, kw, in, out)
    (the converter's rule does the flip + swap). torch's ``padding`` p becomes
    dilation*(k-1)-p zeros on each side of the dilated input, plus ``output_padding`` at the end.
    Initialised like torch (its fan_in is taken from weight dim 1: out_channels*kh*kw).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, groups: int = 1, bias: bool = True, dilation=1, *,
                 rngs: nnx.Rngs):
        if groups != 1:
            raise NotImplementedError("ConvTranspose2d: only groups=1 is implemented")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.output_padding = _pair(output_padding)
        self.dilation = _pair(dilation)
        for op, s, d in zip(self.output_padding, self.stride, self.dilation):
            if not (op < s or op < d):  # the same check torch makes
                raise ValueError(f"output_padding {self.output_padding} must be smaller than "
                                 f"stride {self.stride} or dilation {self.dilation}")
        kh, kw = self.kernel_size
        init = torch_uniform(out_channels * kh * kw)
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_channels, out_channels)))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        pads = tuple((d * (k - 1) - p, d * (k - 1) - p + op) for k, p, op, d in
                     zip(self.kernel_size, self.padding, self.output_padding, self.dilation))
        kernel = self.kernel[...].astype(x.dtype)
        # in CPU programs with a kernel gradient from matmuls (XLA:CPU's kernel gradient of an
        # lhs-dilated conv took 40-50 s at 4x60x60x256)
        y = lowering.per_platform(
            cpu=lambda: xla_convs.conv_transpose(x, kernel, self.stride, pads, self.dilation),
            default=lambda: jax.lax.conv_general_dilated(
                x, kernel, window_strides=(1, 1), padding=pads, lhs_dilation=self.stride,
                rhs_dilation=self.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")))
        if self.bias is not None:
            y = add_bias(y, self.bias[...])
        return y


def _bilinear_gather_zero(x: jax.Array, py: jax.Array, px: jax.Array) -> jax.Array:
    """Bilinear samples of x (N, H, W, C) at (py, px) (N, *S), zero outside: (N, *S, C).

    DCNv2's rule: a point is zero when py <= -1, px <= -1, py >= H or px >= W; otherwise each of
    its four neighbours that falls outside the image contributes zero (not clamped).
    """
    if xla_sampling.applies(x, py, px):
        # in CPU programs by a native kernel (XLA:CPU's gathers and scatter: AECR-Net's
        # 64x64x256 deformable conv spent 134 ms per call in them)
        return lowering.per_platform(cpu=lambda: xla_sampling.bilinear_sample_zero(x, py, px),
                                     default=lambda: _bilinear_gather_zero_xla(x, py, px))
    return _bilinear_gather_zero_xla(x, py, px)


def _bilinear_gather_zero_xla(x: jax.Array, py: jax.Array, px: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c)
    inside = (py > -1) & (px > -1) & (py < h) & (px < w)
    y0 = jnp.floor(py)
    x0 = jnp.floor(px)
    ly, lx = py - y0, px - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)
    out = 0.0
    for dy, wy in ((0, 1.0 - ly), (1, ly)):
        for dx, wx in ((0, 1.0 - lx), (1, lx)):
            yy, xx = y0 + dy, x0 + dx
            ok = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            idx = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
            vals = jax.vmap(lambda a, i: a[i])(flat, idx.reshape(n, -1)).reshape(*idx.shape, c)
            out = out + vals * jnp.where(ok, wy * wx, 0.0).astype(x.dtype)[..., None]
    return out


def deform_conv2d(x: jax.Array, offset: jax.Array, mask: jax.Array | None, kernel: jax.Array,
                  bias: jax.Array | None = None, stride=1, padding=0, dilation=1) -> jax.Array:
    """Modulated deformable conv (DCNv2; ``torchvision.ops.deform_conv2d`` semantics) on NHWC.

    x: (N, H, W, C). kernel: HWIO (kh, kw, C, O). With K = kh*kw taps, tap k = i*kw + j, and G
    deformable groups (channel blocks of C/G): offset (N, Ho, Wo, 2*G*K) holds *interleaved*
    pairs, channel g*2K + 2k = dy and g*2K + 2k + 1 = dx; mask (N, Ho, Wo, G*K), channel g*K + k,
    already activated (DCNv2's DCN applies the sigmoid before calling this), or None for 1.
    Tap k of output (y, x) reads the input at (y*sh - ph + i*dh + dy, x*sw - pw + j*dw + dx),
    bilinearly, zero outside the image.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, h, w, c = x.shape
    kh, kw, cin, cout = kernel.shape
    k = kh * kw
    if cin != c:
        raise ValueError(f"deform_conv2d: kernel expects {cin} input channels, got {c}")
    if offset.shape[-1] % (2 * k):
        raise ValueError(f"deform_conv2d: offset has {offset.shape[-1]} channels, not a "
                         f"multiple of 2*{k}")
    groups = offset.shape[-1] // (2 * k)
    if c % groups:
        raise ValueError(f"deform_conv2d: {c} channels not divisible by {groups} offset groups")
    ho, wo = offset.shape[1:3]
    expect = tuple((size + 2 * p - d * (kk - 1) - 1) // st + 1 for size, p, d, kk, st in
                   ((h, ph, dh, kh, sh), (w, pw, dw, kw, sw)))
    if (ho, wo) != expect:
        raise ValueError(f"deform_conv2d: offset grid {(ho, wo)} != conv output size {expect}")
    off = offset.reshape(n, ho, wo, groups, k, 2)
    tap_i = jnp.repeat(jnp.arange(kh), kw) * dh  # (K,) row of tap k
    tap_j = jnp.tile(jnp.arange(kw), kh) * dw
    base_y = (jnp.arange(ho) * sh - ph)[:, None] + tap_i[None, :]  # (Ho, K)
    base_x = (jnp.arange(wo) * sw - pw)[:, None] + tap_j[None, :]  # (Wo, K)
    py = base_y[None, :, None, None, :].astype(x.dtype) + off[..., 0]  # (N, Ho, Wo, G, K)
    px = base_x[None, None, :, None, :].astype(x.dtype) + off[..., 1]
    if mask is not None:
        mask = mask.reshape(n, ho, wo, groups, k)
    cg = c // groups
    cols = []
    for g in range(groups):
        s = _bilinear_gather_zero(x[..., g * cg:(g + 1) * cg], py[:, :, :, g], px[:, :, :, g])
        if mask is not None:
            s = s * mask[:, :, :, g, :, None].astype(x.dtype)
        cols.append(s)  # (N, Ho, Wo, K, C/G)
    cols = cols[0] if groups == 1 else jnp.concatenate(cols, axis=-1)
    y = jnp.einsum("nyxkc,kco->nyxo", cols, kernel.reshape(k, c, cout).astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


class ModulatedDeformConv2d(nnx.Module):
    """DCNv2's ``DCN`` module: offsets and mask from an internal conv, then a deformable conv.

    ``conv_offset_mask`` (a zero-initialised Conv2d with the same kernel/stride/padding, no
    dilation, as DCNv2 builds it) gives 3*G*K channels: the first 2*G*K are the interleaved
    (dy, dx) offsets, the last G*K pass through a sigmoid to become the mask. ``kernel`` (HWIO)
    is initialised U(+-1/sqrt(in*kh*kw)) and ``bias`` to zero, as DCNv2 does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, deformable_groups: int = 1, *, rngs: nnx.Rngs):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.deformable_groups = deformable_groups
        kh, kw = self.kernel_size
        self.kernel = nnx.Param(torch_uniform(in_channels * kh * kw)(
            rngs.params(), (kh, kw, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        n_om = deformable_groups * 3 * kh * kw
        self.conv_offset_mask = Conv2d(in_channels, n_om, self.kernel_size, self.stride,
                                       self.padding, bias=True, rngs=rngs)
        self.conv_offset_mask.kernel.set_value(jnp.zeros((kh, kw, in_channels, n_om), jnp.float32))
        self.conv_offset_mask.bias.set_value(jnp.zeros((n_om,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        om = self.conv_offset_mask(x)
        n_off = 2 * self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, mask = om[..., :n_off], jax.nn.sigmoid(om[..., n_off:])
        return deform_conv2d(x, offset, mask, self.kernel[...], self.bias[...], self.stride,
                             self.padding, self.dilation)


def isqrt_newton_schulz(a: jax.Array, num_iters: int) -> jax.Array:
    """A^(-1/2) by a fixed number of coupled Newton-Schulz iterations (Frobenius prescaling).

    Not converged for ill-conditioned A after few iterations; FastDeconv relies on exactly this
    truncated value, so do not replace it by an eigendecomposition.
    """
    dim = a.shape[-1]
    norm = jnp.sqrt(jnp.sum(jnp.square(a)))
    y = a / norm
    eye = jnp.eye(dim, dtype=a.dtype)
    z = eye
    for _ in range(num_iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / jnp.sqrt(norm)


class FastDeconv(nnx.Module):
    """Network deconvolution (Ye et al., ICLR 2020; upstream ``FastDeconv``), groups=1, on NHWC.

    A conv whose input patches are whitened: in train mode (``use_running_average=False``, the
    default, as a fresh torch module) the patch mean mu and D = Cov^(-1/2) (``n_iter``
    Newton-Schulz steps) come from im2col patches sampled with stride ``sampling_stride*stride``
    and zero padding, pooled over the batch, and the running statistics (``nnx.BatchStat``
    ``running_mean`` (F,), ``running_deconv`` (F, F), F = k*k*block) move by ``momentum``; in
    eval mode (``module.eval()``) the running ones are used. Either way the whitening is folded
    into the kernel: W' = W D, b' = b - W' mu, then a plain conv.

    Patch columns are ordered (c, i, j), then regrouped into C/block blocks of F columns each
    (column f*(C/block) + g goes to block g), exactly as upstream. ``bias=False`` is taken as a
    zero bias (upstream would fail); ``freeze`` is not implemented.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=1,
                 dilation=1, groups: int = 1, bias: bool = True, eps: float = 1e-5,
                 n_iter: int = 5, momentum: float = 0.1, block: int = 64,
                 sampling_stride: int = 3, freeze: bool = False, freeze_iter: int = 100, *,
                 use_running_average: bool = False, rngs: nnx.Rngs):
        if groups != 1:
            raise NotImplementedError("FastDeconv: only groups=1 is implemented")
        if freeze:
            raise NotImplementedError("FastDeconv: freeze=True is not implemented")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.eps, self.n_iter, self.momentum = eps, n_iter, momentum
        if block > in_channels:
            block = in_channels
        elif in_channels % block:
            block = math.gcd(block, in_channels)
        self.block = block
        kh, kw = self.kernel_size
        self.num_features = kh * kw * block
        self.sampling_stride = sampling_stride * self.stride[0]
        self.use_running_average = use_running_average
        init = torch_uniform(in_channels * kh * kw)
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_channels, out_channels)))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,))) if bias else None
        nf = self.num_features
        self.running_mean = nnx.BatchStat(jnp.zeros((nf,), jnp.float32))
        self.running_deconv = nnx.BatchStat(jnp.eye(nf, dtype=jnp.float32))

    def _patches(self, x: jax.Array) -> jax.Array:
        """Sampled patch matrix (M, F), rows = patches of all images, columns regrouped."""
        n, h, w, c = x.shape
        kh, kw = self.kernel_size
        s = self.sampling_stride
        if (kh, kw) == (1, 1):
            cols = x.reshape(-1, c)[::s * s]  # every s^2-th pixel of the flattened batch
        else:
            ph, pw = self.padding
            dh, dw = self.dilation
            xp = pad2d(x, (ph, ph, pw, pw))
            ho = (h + 2 * ph - dh * (kh - 1) - 1) // s + 1
            wo = (w + 2 * pw - dw * (kw - 1) - 1) // s + 1
            taps = [xp[:, i * dh:i * dh + (ho - 1) * s + 1:s, j * dw:j * dw + (wo - 1) * s + 1:s, :]
                    for i in range(kh) for j in range(kw)]
            cols = jnp.stack(taps, axis=-1).reshape(n * ho * wo, c * kh * kw)  # column c*K + t
        nb = c // self.block
        return cols.reshape(-1, self.num_features, nb).transpose(0, 2, 1).reshape(
            -1, self.num_features)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        c = x.shape[-1]
        if c != self.in_channels:
            raise ValueError(f"FastDeconv expects {self.in_channels} channels, got {c}")
        nf, nb = self.num_features, c // self.block
        if use_running_average:
            mean = self.running_mean[...].astype(x.dtype)
            deconv = self.running_deconv[...].astype(x.dtype)
        else:
            cols = self._patches(x)
            mean = jnp.mean(cols, axis=0)
            xc = cols - mean
            cov = (xc.T @ xc) / xc.shape[0] + self.eps * jnp.eye(nf, dtype=x.dtype)
            deconv = isqrt_newton_schulz(cov, self.n_iter)
            m = self.momentum
            self.running_mean[...] = jax.lax.stop_gradient(
                (1 - m) * self.running_mean[...] + m * mean)
            self.running_deconv[...] = jax.lax.stop_gradient(
                (1 - m) * self.running_deconv[...] + m * deconv)
        kh, kw = self.kernel_size
        o = self.out_channels
        kernel = self.kernel[...].astype(x.dtype)
        w = kernel.transpose(3, 2, 0, 1).reshape(o, nf, nb).transpose(0, 2, 1).reshape(-1, nf)
        w = w @ deconv  # (O * C/block, F)
        b = -(w @ mean).reshape(o, nb).sum(axis=1)
        if self.bias is not None:
            b = b + self.bias[...].astype(x.dtype)
        w = w.reshape(o, nb, nf).transpose(0, 2, 1).reshape(o, c, kh, kw).transpose(2, 3, 1, 0)
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=self.stride, padding=((ph, ph), (pw, pw)),
            rhs_dilation=self.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + b


def conv2d_valid(x: jax.Array, kernel: jax.Array, stride=1, dilation=1) -> jax.Array:
    """An unpadded ('VALID') NHWC/HWIO conv, groups=1, no bias (AECR-Net's reflect-padded convs
    after their explicit pad). In CPU programs :func:`flaxrestore.xla_cpu.convs.conv2d_valid`."""
    stride, dilation = _pair(stride), _pair(dilation)
    return lowering.per_platform(
        cpu=lambda: xla_convs.conv2d_valid(x, kernel, stride, dilation),
        default=lambda: jax.lax.conv_general_dilated(
            x, kernel, window_strides=stride, padding=((0, 0), (0, 0)), rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC")))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(kernel_size=2, stride=2), floor mode (an odd last row/column dropped), on
    NHWC: ``reduce_window``; in CPU programs a max over a (2, 2) reshape with its own gradient
    (:func:`flaxrestore.xla_cpu.pooling.max_pool_2x2`; the whole gradient of a window goes to
    its first maximum, as in torch)."""
    return lowering.per_platform(
        cpu=lambda: xla_pooling.max_pool_2x2(x),
        default=lambda: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                              (1, 2, 2, 1), "VALID"))
