"""VGG19's 2x2 max-pool on XLA:CPU: a max over a reshape with its own gradient.

XLA:CPU's select-and-scatter gradient of ``reduce_window`` was 8x slower (4x240x240x64, forward +
gradient: 97 ms against 12 ms; torch 59 ms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _windows_2x2(x: jax.Array) -> jax.Array:
    """(N, H//2, 2, W//2, 2, C): the 2x2 windows of NHWC x (an odd last row/column dropped)."""
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    return _windows_2x2(x).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_2x2_bwd(res, g):
    """The whole gradient goes to the FIRST maximum of each window in row-major order (torch's
    max_pool2d backward and XLA's select-and-scatter do the same), nothing to dropped rows."""
    x, y = res
    n, h, w, c = x.shape
    win = _windows_2x2(x)
    taken = jnp.zeros(y.shape, bool)
    rows = []
    for i in range(2):
        cols = []
        for j in range(2):
            first = (win[:, :, i, :, j] == y) & ~taken if (i, j) != (1, 1) else ~taken
            taken = taken | first
            cols.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
        rows.append(jnp.stack(cols, axis=3))
    dx = jnp.stack(rows, axis=2).reshape(n, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)
