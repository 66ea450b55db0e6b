"""Small helpers shared by the XLA:CPU lowerings."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from flaxrestore.xla_cpu import native


def turned_off(env_var: str) -> bool:
    """True when the environment variable says 0 / false / no / off (unset: on)."""
    return os.environ.get(env_var, "1").strip().lower() in ("0", "false", "no", "off")


def zero_pad_hw(x, top, bottom, left, right):
    """lax.pad on H and W; negative amounts crop."""
    zero = jnp.zeros((), x.dtype)
    return jax.lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def native_float32(*arrays) -> bool:
    """True when the native CPU kernels (:mod:`flaxrestore.xla_cpu.native`) take these arrays:
    all float32 and the kernels built."""
    return all(a.dtype == jnp.float32 for a in arrays) and native.available()


def conv_lib(x, kernel, stride, padding, dilation, groups):
    """The library conv, NHWC / HWIO, symmetric zero padding ``(ph, pw)``."""
    (ph, pw) = padding
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=((ph, ph), (pw, pw)), rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
