"""layers.retain_freed_cpu_memory: a compiled call's temporaries stop page-faulting in again.

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
    from flaxrestore import layers
    applied = layers.retain_freed_cpu_memory()
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):  # temporaries of about 64 MB: a sort of a 16M-element intermediate
        y = jnp.sort(jnp.tile(x, 4) * 1.5)
        return jnp.sum(y[::7]) + jnp.sum(y[1::5])

    x = jnp.arange(4 << 20, dtype=jnp.float32)
    for _ in range(3):
        f(x).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3
    print(applied, int(faults))
""")


def _run(env_extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_stops_page_faults():
    applied, faults = _run({})
    off_applied, off_faults = _run({"FLAXRESTORE_RETAIN_CPU_MEMORY": "0"})
    assert applied and not off_applied
    # without it each call maps its temporaries afresh: one fault per 4 KiB page touched
    assert off_faults > 4000, off_faults
    assert faults < off_faults / 10, (faults, off_faults)


def test_not_applied_for_other_platforms():
    env = dict(os.environ, JAX_PLATFORMS="tpu")
    out = subprocess.run([sys.executable, "-c", "from flaxrestore import layers; "
                          "print(layers.retain_freed_cpu_memory())"],
                         cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"
