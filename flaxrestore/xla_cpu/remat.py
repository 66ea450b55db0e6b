"""Materialisation and rematerialisation that survive XLA:CPU's simplifier.

XLA:CPU removes ``optimization_barrier`` (the barrier of ``jax.checkpoint``) and fuses cheap
producers into every consumer; the forms here give it values it cannot prove equal to others.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed into its own buffer (XLA:CPU).

    XLA:CPU fuses cheap elementwise producers into every consumer, and it strips
    ``optimization_barrier``. A chain of residual adds (x + f(x) + g(...) ...) is then never
    stored: each consumer - above all the transposes the backward inserts for weight gradients -
    re-computes the whole chain (SNR-Aware's 6-layer transformer: its gradient took 1.2 s without
    this, 0.55 s with it). A dot with an 8x8 identity is not fused and costs a memory pass.
    Exact for finite values (x * 1 + 0 * y); an inf in a row of 8 turns that row into NaN.
    """
    if x.size % 8:
        return x
    return _identity_dot(x, 8)


def _identity_dot(x: jax.Array, k: int, gate: jax.Array | None = None) -> jax.Array:
    """x @ (k x k identity * gate) over rows of k elements: x itself for finite values."""
    eye = jnp.eye(k, dtype=x.dtype)
    if gate is not None:
        eye = eye * gate
    y = jnp.dot(x.reshape(-1, k), eye, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape)


def _distinct_copy(x: jax.Array, after: jax.Array) -> jax.Array:
    """``x`` through a dot with a small identity (exact for finite values): a value XLA cannot
    prove equal to ``x``, so a recomputation from it is not merged with the original. The
    identity is scaled by ``1 + 0 * after[0]`` so that the copy, and what is computed from it,
    cannot be scheduled before ``after`` exists (NaN in ``after`` gives NaN)."""
    k = next(k for k in (8, 4, 2, 1) if x.size % k == 0)
    gate = 1 + 0 * jax.lax.stop_gradient(after).reshape(-1)[0].astype(x.dtype)
    return _identity_dot(x, k, gate)


def recompute_in_backward(fn):
    """``fn(state, *args)`` saving only its arguments; the backward re-runs it (CPU form).

    ``jax.checkpoint`` marks the recomputation with an optimization barrier, which XLA:CPU
    removes, after which common-subexpression elimination merges the recomputation with the
    forward and every activation stays alive again (measured: no memory saved). Here the
    backward recomputes from a distinct copy of the array arguments, which nothing merges and
    which waits for the incoming gradient.
    """
    @jax.custom_vjp
    def run(state, *args):
        return fn(state, *args)

    def fwd(state, *args):
        return fn(state, *args), (state, args)

    def bwd(res, dy):
        state, args = res
        first = jax.tree.leaves(dy)[0]
        args = tuple(_distinct_copy(a, first) if isinstance(a, jax.Array)
                     and jnp.issubdtype(a.dtype, jnp.floating) else a for a in args)
        _, vjp = jax.vjp(fn, state, *args)
        return vjp(dy)

    run.defvjp(fwd, bwd)
    return run
