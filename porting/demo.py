"""The porting demo: for every registered model, a release-style checkpoint goes through the
whole path (torch reference -> file -> safe read -> strict conversion -> Flax) and the two
implementations are compared on random input."""

from __future__ import annotations

import os
import tempfile
import time


def main(names=None, workdir=None) -> int:
    import torch

    import porting
    from flaxrestore import models
    from porting import reference, verify

    names = names or models.names()
    tmp = workdir or tempfile.mkdtemp(prefix="flaxrestore-demo-")
    os.makedirs(tmp, exist_ok=True)
    print(f"Porting demo: {len(names)} models, checkpoints in {tmp}\n")
    header = f"{'model':<44} {'params':>12} {'keys':>5} {'max|diff|':>10} {'relative':>9} {'time s':>7}  ok"
    print(header)
    print("-" * len(header))
    failures = 0
    for name in names:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        ref = reference.build(name).eval()
        state = ref.state_dict()
        key = reference.release_key(name)
        path = os.path.join(tmp, name.replace(":", "_") + ".pth")
        torch.save({key: state} if key else state, path)
        module = porting.load_torch_checkpoint(name, path)
        report = verify.compare(name, ref, module, batch=2)
        worst = max(report.outputs, key=lambda d: d.rel)
        nparams = sum(p.numel() for p in ref.parameters())
        ok = report.ok(1e-4)
        failures += not ok
        print(f"{name:<44} {nparams:>12,} {len(state):>5} {worst.max_abs:>10.2e} {worst.rel:>9.2e} "
              f"{time.perf_counter() - t0:>7.1f}  {'yes' if ok else 'NO'}", flush=True)
    print(f"\n{len(names) - failures}/{len(names)} models agree within 1e-4 (relative to max(1, max|out|)).")
    return 1 if failures else 0
