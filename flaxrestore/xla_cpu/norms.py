"""The global L2 norm of a gradient tree on XLA:CPU: one flat vector instead of a reduction per
leaf.

With one reduction per leaf (``optax.global_norm``), XLA:CPU's memory scheduler kept activation
cotangents alive far longer: MPRNet's training step at 256x256 x1 planned 8.2 GB of temporaries
instead of 5.7 GB. The flat vector costs one copy of the gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, over one concatenated vector (float32 at least;
    float64 stays float64)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    flat = jnp.concatenate([jnp.ravel(g).astype(dtype) for g in leaves])
    return jnp.sqrt(jnp.vdot(flat, flat))
