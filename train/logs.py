"""What a run tells its user, written by process 0 only: messages, the progress bar, metrics.

``metrics.jsonl`` holds one JSON object per log / eval event; ``tb/`` holds the same scalars as
TensorBoard event files (written by tensorboardX, no TensorFlow needed:
``tensorboard --logdir WORKDIR/tb``). :class:`RowsLog` is a debugging log of which rows every
process reads.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Mapping

import jax
import numpy as np

from flaxrestore import progress


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    """A message from process 0 (stdout; a progress bar on screen stays on its own line)."""
    if is_main_process():
        progress.write(msg)


class MetricsLog:
    """JSON lines + TensorBoard scalars (tags ``<kind>/<name>``), written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = is_main_process()
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        record = {"step": int(step), "kind": kind, "time": now,
                  **{k: float(v) for k, v in values.items()}}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        for k, v in values.items():
            if np.isfinite(v):
                self.tb.add_scalar(f"{kind}/{k}", float(v), int(step), walltime=now)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            self.tb.close()


class RowsLog:
    """Which rows each process reads: with ``TRAIN_ROWS_LOG=PREFIX`` in the environment, every
    process appends one JSON line per step to ``PREFIX.<process index>.jsonl``: the step, the
    shape of its part of the batch and a CRC-32 of each of its rows (lq and gt bytes, after the
    progressive crop). For debugging a pod's data sharding; the multi-host test checks with it
    that hosts read disjoint rows."""

    def __init__(self, prefix: str | None):
        self._f = open(f"{prefix}.{jax.process_index()}.jsonl", "a") if prefix else None

    def write(self, step: int, batch: Mapping[str, np.ndarray]) -> None:
        if self._f is None:
            return
        n = len(batch["lq"])
        rows = [format(zlib.crc32(batch["gt"][i].tobytes(), zlib.crc32(batch["lq"][i].tobytes())),
                       "08x") for i in range(n)]
        self._f.write(json.dumps({"step": int(step), "process": jax.process_index(),
                                  "shape": list(batch["lq"].shape), "rows": rows}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
