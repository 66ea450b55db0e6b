"""The one seam where the lowering of a primitive is chosen for the platform being compiled for.

The users of this package train on TPUs and GPUs; the CPU is where it is developed and tested.
Some primitives in :mod:`flaxrestore.layers` have two formulations of the same function:

* the **accelerator path**: the library ops as XLA expects them on every platform (one
  ``lax.conv_general_dilated`` per conv, ``feature_group_count`` depthwise convs,
  ``reduce_window`` max-pool, plain autodiff, ``jax.checkpoint`` for rematerialisation). This is
  what a TPU or GPU runs;
* the **XLA:CPU path** (:mod:`flaxrestore.xla_cpu`): rewrites and native kernels that make the
  same numbers fast on XLA:CPU (shifted depthwise convs, Winograd, kernel gradients as matmuls,
  the deformable conv's sampling in C++, ...). They only make sense on a CPU.

Which one a program gets is decided by :func:`per_platform`, never by asking
``jax.default_backend()`` while tracing. By default (mode ``auto``) it is
``jax.lax.platform_dependent``: both formulations are traced and the lowering keeps the one for
the platform the program is lowered for, so a train step jitted over TPU devices (or compiled
for a deviceless TPU topology from a CPU host) contains no CPU kernel, and one jitted over CPU
devices gets the CPU path, whatever the process's default backend is. Called eagerly (outside
``jit``), the choice is made at once for the default device.

The **accelerator mode** makes every platform, the CPU included, compile exactly what a TPU/GPU
would run, so the accelerator path can be tested for equivalence on a CPU machine:

* ``FLAXRESTORE_LOWERING=accelerator`` in the environment, or
* ``with flaxrestore.lowering.accelerator_path(): ...`` around the tracing. The mode is not part
  of jax's cache keys, so entering and leaving the context clears jax's caches
  (``jax.clear_caches()``): functions traced before are traced again inside it.

The mode is read when a function is traced.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, TypeVar

import jax

T = TypeVar("T")

LOWERING_ENV = "FLAXRESTORE_LOWERING"
MODES = ("auto", "accelerator")

_local = threading.local()


def mode() -> str:
    """The lowering mode in force while tracing: ``auto`` (per compile target, the default) or
    ``accelerator`` (the accelerator path on every platform). A context set by
    :func:`accelerator_path` wins over ``$FLAXRESTORE_LOWERING``."""
    forced = getattr(_local, "mode", None)
    if forced is not None:
        return forced
    value = os.environ.get(LOWERING_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{LOWERING_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@contextlib.contextmanager
def accelerator_path(enabled: bool = True):
    """While tracing inside this context, every platform (the CPU included) gets the lowering a
    TPU/GPU runs; ``enabled=False`` restores the per-platform choice inside it."""
    previous = getattr(_local, "mode", None)
    # jax caches traced functions by identity, without this switch in the key: forget them on
    # the way in and out so that a function traced in one mode is not reused in the other
    jax.clear_caches()
    _local.mode = "accelerator" if enabled else "auto"
    try:
        yield
    finally:
        _local.mode = previous
        jax.clear_caches()


def per_platform(*, cpu: Callable[[], T], default: Callable[[], T]) -> T:
    """``cpu()`` in programs lowered for the CPU, ``default()`` (the accelerator path) for every
    other platform, and for all of them in accelerator mode.

    Both are functions of no arguments (closures over the arrays they use) that return the same
    pytree of shapes and dtypes. In ``auto`` mode both are traced (``jax.lax.platform_dependent``)
    and only the one for the lowering platform reaches the compiled program.
    """
    if mode() == "accelerator":
        return default()
    return jax.lax.platform_dependent(cpu=cpu, default=default)


def describe(platform: str | None = None) -> str:
    """A line naming the lowering a program for ``platform`` (default: jax's default backend)
    gets in the current mode, for reports."""
    platform = platform or jax.default_backend()
    if mode() == "accelerator":
        return f"accelerator path on {platform} ({LOWERING_ENV}=accelerator or accelerator_path())"
    if platform == "cpu":
        return "XLA:CPU lowerings (flaxrestore.xla_cpu)"
    return f"accelerator path on {platform}"


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """XLA compile options for jitted model calls on ``platform`` (default: jax's default
    backend), for ``jax.jit(..., compiler_options=...)``: on the CPU
    :func:`flaxrestore.xla_cpu.tuning.compiler_options` (XNNPACK convolutions), elsewhere None
    (XLA's defaults). They choose libraries inside XLA:CPU, not the program, so accelerator mode
    keeps them."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return None
    from flaxrestore.xla_cpu import tuning

    return tuning.compiler_options("cpu")
