"""The deformable conv's bilinear sampling on XLA:CPU, by the native kernels.

XLA:CPU lowers the sampling as four element-wise gathers and its gradient as a scatter:
AECR-Net's 64x64x256 deformable conv (9 taps) spent about 134 ms per call in them, its gradient
413 ms against 58 ms here (1x64x64).
"""

from __future__ import annotations

import jax

from flaxrestore.xla_cpu import native
from flaxrestore.xla_cpu.common import native_float32


@jax.custom_vjp
def _sample_native(x: jax.Array, py: jax.Array, px: jax.Array) -> jax.Array:
    return native.bilinear_sample(x, py, px)


def _sample_native_fwd(x, py, px):
    return native.bilinear_sample(x, py, px), (x, py, px)


def _sample_native_bwd(res, g):
    return native.bilinear_sample_grad(*res, g)


_sample_native.defvjp(_sample_native_fwd, _sample_native_bwd)


def applies(x: jax.Array, py: jax.Array, px: jax.Array) -> bool:
    """Whether :func:`bilinear_sample_zero` takes these arrays (float32, native kernels built)."""
    return native_float32(x, py, px)


def bilinear_sample_zero(x: jax.Array, py: jax.Array, px: jax.Array) -> jax.Array:
    """Bilinear samples of x (N, H, W, C) at (py, px) (N, *S), zero outside: (N, *S, C), by
    :func:`flaxrestore.xla_cpu.native.bilinear_sample` (DCNv2's rule, as
    ``flaxrestore.layers.bilinear_gather_zero``). Requires :func:`applies`."""
    n, _, _, c = x.shape
    return _sample_native(x, py.reshape(n, -1), px.reshape(n, -1)).reshape(*py.shape, c)
