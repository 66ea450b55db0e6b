"""tuning.retain_freed_cpu_memory: a compiled call's temporaries stop page-faulting in again.

Each case runs in a fresh interpreter: the setting is process-wide and must precede jax's
backend start."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import resource, sys
    from flaxrestore.xla_cpu import tuning
    applied = tuning.retain_freed_cpu_memory()
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):  # temporaries of about 148 MB: two cumulative sums and a reversal of 64 MB each
        y = jnp.cumsum(jnp.tile(x, 4) * 1.5)
        z = y[::-1] * y
        return jnp.sum(z[::7]) + jnp.sum(jnp.cumsum(z)[1::5])

    x = jnp.arange(4 << 20, dtype=jnp.float32)
    for _ in range(3):
        f(x).block_until_ready()
    faults = []
    for _ in range(10):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    print(applied, *faults)
""")


def _run(env_extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, *faults = out.stdout.strip().splitlines()[-1].split()
    return applied == "True", sorted(int(n) for n in faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_stops_page_faults():
    applied, faults = _run({})
    off_applied, off_faults = _run({"FLAXRESTORE_RETAIN_CPU_MEMORY": "0"})
    assert applied and not off_applied
    # without it every call maps its temporaries afresh: one fault per 4 KiB page touched
    assert off_faults[0] > 4000, off_faults
    # with it freed blocks are reused and most calls fault nothing. Some calls still grow the heap
    # to a new high-water mark while it fragments (measured: 2-8 of the first 80 calls, up to 4
    # of 10 right after warm-up, none after about 20 calls), so the test counts fault-free calls,
    # which cannot happen without it
    fault_free = sum(n < 100 for n in faults)
    assert fault_free >= 3, (faults, off_faults)


def test_not_applied_for_other_platforms():
    env = dict(os.environ, JAX_PLATFORMS="tpu")
    out = subprocess.run([sys.executable, "-c", "from flaxrestore.xla_cpu import tuning; "
                          "print(tuning.retain_freed_cpu_memory())"],
                         cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"
