"""Primitives shared by several models, each with PyTorch semantics.

Everything here is channels-last (NHWC). Where JAX/Flax and PyTorch differ by default, the
difference is settled in one place in this file, with a one-line comment saying how.

Parameter naming convention (the converter relies on it, see ``porting/convert.py``):
a conv's weight is ``kernel`` in HWIO layout, its bias ``bias``; a norm's weight is ``scale``.
Every other parameter keeps the torch attribute name.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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
        return jax.random.uniform(key, shape, dtype, -bound, bound)

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


def _use_shifted_depthwise() -> bool:
    # XLA:CPU lowers feature_group_count=C convs slowly (see DESIGN.md); shifted multiply-adds
    # match torch to float rounding and are several times faster there. GPU/TPU use the library conv.
    return jax.default_backend() == "cpu"


def depthwise_conv_shifted(x, kernel, dilation=(1, 1)):
    """Depthwise stride-1 conv on an already padded NHWC input; kernel is (kh, kw, 1, C)."""
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
        kernel = self.kernel[...].astype(x.dtype)
        ph, pw = self.padding
        depthwise = self.groups == self.in_channels == self.out_channels and self.groups > 1
        if self.padding_mode != "zeros" and (ph or pw):
            x = pad2d(x, (ph, ph, pw, pw), self.padding_mode)
            ph = pw = 0
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and not (ph or pw):
            y = x @ kernel[0, 0]  # a 1x1 conv is a matmul over channels
        elif depthwise and self.stride == (1, 1) and _use_shifted_depthwise():
            if ph or pw:
                x = pad2d(x, (ph, ph, pw, pw))
            y = depthwise_conv_shifted(x, kernel, self.dilation)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=self.stride, padding=((ph, ph), (pw, pw)),
                rhs_dilation=self.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


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


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
    """F.normalize: x / max(||x||_2, eps) (eps clamps the norm, it is not added)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


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
