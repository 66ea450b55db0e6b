"""Process and compiler settings for the XLA:CPU backend.

Nothing here runs at import: the entry points that want these settings (``python -m train``,
``python -m flaxrestore``, the benchmarks) call :func:`tune_cpu_process` before jax starts its
backend, and jitted model calls take :func:`compiler_options` for the platform they compile for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxrestore.xla_cpu.common import conv_lib, turned_off

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def prefer_memory_saving_cpu_scheduler() -> None:
    """Adds :data:`CPU_SCHEDULER_FLAG` to ``XLA_FLAGS`` unless the user set that flag.

    XLA:CPU's concurrency-optimized scheduler (on by default) keeps many more activations alive
    at once: Restormer's training step at 4x128x128 planned 40 GB of temporaries with it and ran
    out of memory; a one-block-per-level Restormer gradient needed 9.3 GB with it, 3.4 GB
    without. XLA reads the flag when the backend starts, so call this before the first jax
    computation (the trainer's and the benchmarks' entry points do, before jax starts). Per-jit ``compiler_options``
    are accepted but do not reach this pass (jax 0.10).
    """
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + CPU_SCHEDULER_FLAG).strip()


# XLA:CPU (jax 0.10) gives YNNPACK single dots, reductions and single convolutions by default.
# These options keep the first two there and give the convolutions to XNNPACK instead.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}
CPU_COMPILER_OPTIONS_ENV = "FLAXRESTORE_XNN_CONVS"


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """XLA compile options for this package's jitted model calls on ``platform`` (default: jax's
    default backend), for ``jax.jit(..., compiler_options=...)``; None where there are none.

    On CPU, :data:`CPU_COMPILER_OPTIONS`: 3x3 convolutions on XNNPACK rather than YNNPACK.
    Measured on the 2-core AVX2 machine: 64->64 channels at 1x256x256 65 -> 40 ms, 96->96 at
    128x128 26 -> 19 ms; SNR-Aware forward 256 x0.87, Restormer x0.96 (see docs/benchmarks.md).
    None (XLA's defaults) off CPU, with ``FLAXRESTORE_XNN_CONVS=0``, when ``XLA_FLAGS`` sets
    either fusion flag itself (the user's choice wins), or when this jaxlib rejects the options.
    Compiled results equal the defaults' to float rounding (the tests compare both with torch).
    """
    import os

    if platform is None:
        platform = jax.default_backend()
    if platform != "cpu":
        return None
    if turned_off(CPU_COMPILER_OPTIONS_ENV):
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if any(name in flags for name in CPU_COMPILER_OPTIONS):
        return None
    return dict(CPU_COMPILER_OPTIONS) if _cpu_options_accepted() else None


@functools.cache
def _cpu_options_accepted() -> bool:
    # a newer jaxlib may rename the enum values: compile a tiny conv once and fall back if refused
    x = jnp.zeros((1, 4, 4, 2), jnp.float32)
    k = jnp.zeros((3, 3, 2, 2), jnp.float32)
    try:
        jax.jit(conv_lib, static_argnums=(2, 3, 4, 5)).lower(
            x, k, (1, 1), (1, 1), (1, 1), 1).compile(dict(CPU_COMPILER_OPTIONS))
    except Exception as err:  # noqa: BLE001 - any refusal means: use XLA's defaults
        import warnings

        warnings.warn(f"XLA rejected flaxrestore's CPU compile options, using its defaults: {err}",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


RETAIN_MEMORY_ENV = "FLAXRESTORE_RETAIN_CPU_MEMORY"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")
# TPU chips show up as these device files on a TPU VM; libtpu alone (installed for the deviceless
# compiles of `python -m train plan`) leaves jax on the CPU
_TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def _accelerator_likely() -> bool:
    """Whether jax, left to choose (no JAX_PLATFORMS), would probably start a GPU or TPU."""
    import glob
    import importlib.util

    if any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS):
        return True
    return (importlib.util.find_spec("libtpu") is not None
            and any(glob.glob(pattern) for pattern in _TPU_DEVICE_FILES))


def retain_freed_cpu_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the OS; True if applied.

    Each call of a compiled XLA:CPU program allocates its temporaries as one block (SNR-Aware's
    training step at 4x128x128: 477 MiB; DarkIR-m's at 4x256x256: 6.2 GB) from a worker thread,
    for which glibc maps fresh pages and unmaps them on free. Touching them again costs a page
    fault per 4 KiB. Measured on the 2-core machine: SNR-Aware 130,000 faults per step, 2.05 s
    -> 1.70 s without them; DarkIR-m 2.2 million faults and 14 s of system time per step,
    25.8 s -> 17.3 s. With one malloc arena, no mmap-served allocations and no trimming, the
    block is reused from the heap (0 faults). The price is that the process keeps its peak heap
    until it exits (the next step needs it anyway), and that while the heap fragments a few early
    steps grow it to a new high-water mark (SNR-Aware 4x128: steps 1, 2 and 6 of 25, resident
    2.4 -> 3.3 GB, then 0 faults).

    Applied only where it helps and is safe: glibc (Linux), the CPU backend (skipped when
    ``JAX_PLATFORMS`` names another platform, or a GPU plugin is installed or libtpu with TPU
    device files present, unless ``JAX_PLATFORMS=cpu``), not disabled with ``FLAXRESTORE_RETAIN_CPU_MEMORY=0``. Call it before
    jax starts its backend (threads that already allocated keep their arenas); the trainer's
    entry point (``python -m train``) and the benchmarks do, before anything else.
    """
    import ctypes
    import os

    if turned_off(RETAIN_MEMORY_ENV):
        return False
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and platforms.split(",")[0] != "cpu":
        return False
    if not platforms and _accelerator_likely():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    # one arena: glibc serves a large request of a non-main arena by mmap whatever M_MMAP_MAX says
    ok = mallopt(m_arena_max, 1) == 1
    ok = mallopt(m_mmap_max, 0) == 1 and ok
    # never trim the heap's top: -1 reaches glibc as SIZE_MAX (the int limit, 2 GiB, let
    # DarkIR-m's 6.2 GB step temporaries be returned and faulted in again every step)
    ok = mallopt(m_trim_threshold, -1) == 1 and ok
    return ok


def cpu_when_no_accelerator() -> bool:
    """Sets ``JAX_PLATFORMS=cpu`` where jax would end up on the CPU anyway (no GPU plugin, and
    libtpu installed without TPU device files); True if set. libtpu, installed for the
    deviceless compiles of ``python -m train plan``, otherwise prints its start-up errors
    ("Failed to find host bounds ...", "unexpected worker hostname ...") on every start of a
    CPU-only process. Nothing is changed where ``JAX_PLATFORMS`` is set or an accelerator may be
    present. Call it before jax starts."""
    import os

    import sys

    if os.environ.get("JAX_PLATFORMS", "").strip() or _accelerator_likely():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already (flaxrestore's package import): jax read the
        # environment then; its backends start later, so the setting still takes effect
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def tune_cpu_process() -> dict[str, bool]:
    """The process-wide settings for CPU runs, for an entry point to call before jax starts:
    :func:`cpu_when_no_accelerator`, :func:`prefer_memory_saving_cpu_scheduler` and
    :func:`retain_freed_cpu_memory`. Returns which were applied."""
    cpu_only = cpu_when_no_accelerator()
    prefer_memory_saving_cpu_scheduler()
    return {"cpu_platform_set": cpu_only, "memory_saving_scheduler": True,
            "retain_freed_memory": retain_freed_cpu_memory()}
