"""Peak memory of restoring a large image with tiles, per model (a measurement, not a test).

    .venv/bin/python benchmarks/restore_memory.py                      # 2048x2048, --tile 256
    .venv/bin/python benchmarks/restore_memory.py --models restormer:motion_deblurring --size 1024

Each model runs in a fresh subprocess (so peaks do not mix): a released-width model with random
weights (memory does not depend on the values), a random RGB image of --size x --size,
``Restorer(tile=--tile, tile_overlap=--overlap, batch=--batch)``, and the process's peak resident
set size (ru_maxrss, which includes Python, JAX and the compiled program) is printed with the
wall time. With --untiled, a second subprocess asks XLA how much memory the untiled call would
need (compiled for the full size, not run: ``memory_analysis()`` of the jitted call), to show
that tiling is what makes the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_MODELS = ("restormer:motion_deblurring", "mprnet:deblurring", "darkir:l", "snr", "aecrnet")
GIB = 1024 ** 3


def _child_tiled(name: str, size: int, tile: int, overlap: int, batch: int) -> dict:
    import resource

    import numpy as np
    from flax import nnx

    from flaxrestore import models
    from flaxrestore.restore import Restorer

    module = models.create(name, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).random((size, size, 3), dtype=np.float32)
    start = time.time()
    out = Restorer(module, tile=tile or None, tile_overlap=overlap, batch=batch)(x)  # 0: untiled
    seconds = time.time() - start
    assert out.shape == x.shape and np.isfinite(out).all()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_gib": peak_kib * 1024 / GIB, "seconds": seconds}


def _child_untiled(name: str, size: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flaxrestore import models
    from flaxrestore.restore import forward_jit, protocol_for

    module = models.create_abstract(name)
    module.eval()
    protocol = protocol_for(module)
    graphdef, state = nnx.split(module)
    hp = -(-size // protocol.multiple) * protocol.multiple
    inputs = [jax.ShapeDtypeStruct((1, hp, hp, 3), jnp.float32)]
    if protocol.extra_inputs is not None:
        inputs.append(jax.ShapeDtypeStruct((1, hp, hp, 1), jnp.float32))
    compiled = forward_jit().lower(graphdef, protocol.image, "float32", state, *inputs).compile()
    mem = compiled.memory_analysis()
    total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)
    return {"untiled_xla_gib": total / GIB, "temp_gib": mem.temp_size_in_bytes / GIB}


def _run_child(args: list[str], timeout: float) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=256,
                   help="tile size; 0 runs untiled (careful: see --untiled for the estimate first)")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--limit-gib", type=float, default=8.0)
    p.add_argument("--untiled", action="store_true", help="also report XLA's estimate untiled")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, name, *rest = a.child
        if kind == "tiled":
            result = _child_tiled(name, *map(int, rest))
        else:
            result = _child_untiled(name, int(rest[0]))
        print(json.dumps(result))
        return 0

    print(f"restore {a.size}x{a.size}, tile {a.tile}, overlap {a.overlap}, batch {a.batch}; "
          f"limit {a.limit_gib} GiB peak RSS", flush=True)
    failed = False
    for name in a.models:
        r = _run_child(["tiled", name, str(a.size), str(a.tile), str(a.overlap), str(a.batch)],
                       a.timeout)
        if "error" in r:
            print(f"{name:32s} ERROR {r['error']}", flush=True)
            failed = True
            continue
        ok = r["peak_rss_gib"] <= a.limit_gib
        failed |= not ok
        line = (f"{name:32s} tiled peak RSS {r['peak_rss_gib']:6.2f} GiB  "
                f"{r['seconds']:7.1f} s  {'OK' if ok else 'OVER LIMIT'}")
        if a.untiled:
            u = _run_child(["untiled", name, str(a.size)], a.timeout)
            line += ("  | untiled: " + (u["error"] if "error" in u else
                                        f"XLA needs {u['untiled_xla_gib']:.2f} GiB"))
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
