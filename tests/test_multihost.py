"""The trainer as a pod runs it: 2 processes x 2 simulated CPU devices on localhost, each started
with ``python -m train ... --distributed --coordinator 127.0.0.1:PORT --num-processes 2
--process-id I`` (JAX's coordination service, gloo collectives), against 1 process x 4 devices.

One test, four launches (they share the expensive part, starting and compiling):

A. 1 process x 4 devices, uninterrupted, fed the same global batches as the pod: this module is
   also a data module (``data_module='test_multihost'``) that runs ``train.data``'s real
   pipeline for both hosts of a 2-host run and concatenates their rows in process order.
B. 2 processes x 2 devices on the real ``train.data``; process 0 (the coordinator, also the one
   that writes checkpoints) is SIGKILLed once checkpoint 6 is complete: process 1 must stop by
   itself, and nothing is exported.
C. both processes started again with the same command, after the last checkpoint (``done``) was
   cut short (its state files cut to 100 bytes, issue 34) and with the one before unreadable
   for process 1 alone (an I/O error, simulated): both must choose the same checkpoint, the one
   before those two, set the two aside, resume from it and finish.
D. alongside C, a copy of B's work directory run again with a disk that fills (simulated) while
   process 0 writes the next checkpoint: process 0 stops with exit status 4 naming the cause
   and the last complete checkpoint, process 1 stops too (within seconds, not orbax's barrier
   timeouts), and the checkpoints written before are intact.

Checked: at every step the two processes read disjoint rows whose concatenation is A's global
batch (``TRAIN_ROWS_LOG``, a per-process log of row checksums written by ``train.loop``); the
parameters of checkpoint 4 and C's final export equal A's (bit-exact: measured so; the
reductions run in the same order); process 1 writes no logs, metrics or exports and prints
nothing (a Python audit hook records every file it opens for writing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from train import data as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = "{'dim': 8, 'num_blocks': (1, 0, 0, 0), 'num_refinement_blocks': 0, 'heads': (1, 1, 1, 1)}"
TOTAL = 12
SETS = [f"model_overrides={TINY}", "batch_size=8", "stages=()", "data.patch_size=16",
        f"total_steps={TOTAL}", "checkpoint_every=2", f"keep_checkpoints={TOTAL}", "log_every=1",
        f"eval_every={TOTAL}", "val_data.demo_val_size=32", "eval_max_images=4"]
# restormer_demo keeps its batch MixUp (a permutation of the global batch, drawn in the step)


# --------------------------------------------------------------------------------------------
# data module for run A: the real pipeline of a 2-host run, both hosts in one process


@dataclasses.dataclass(frozen=True)
class DataConfig(D.DataConfig):
    hosts: int = 2  # the host count whose rows this process reads (all of them)


class _Hosts:
    def __init__(self, cfg: DataConfig, batch_size: int, seed: int):
        base = D.DataConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(D.DataConfig)})
        per = batch_size // cfg.hosts
        self.its = [D.make_train_iterator(base, batch_size=per, seed=seed, process_index=h,
                                          process_count=cfg.hosts) for h in range(cfg.hosts)]

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.its]
        return {k: np.concatenate([p[k] for p in parts]) for k in ("lq", "gt")}

    def get_state(self):
        return {"hosts": [it.get_state() for it in self.its]}

    def set_state(self, state):
        for it, s in zip(self.its, state["hosts"]):
            it.set_state(s)


def make_train_iterator(cfg, *, batch_size, seed, process_index=0, process_count=1):
    assert process_count == 1, "the emulation is for a single process"
    return _Hosts(cfg, batch_size, seed)


make_val_dataset = D.make_val_dataset


# --------------------------------------------------------------------------------------------
# processes

# every process is started through this, equivalent to `python -m train ARGS`: a Python audit
# hook first records each file the process opens for writing (and each directory it makes,
# renames or removes) under the work directory
LAUNCH = r"""
import os, sys
workdir, record = os.path.abspath(sys.argv[1]), sys.argv[2]
out = open(record, "a", buffering=1)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE)
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir",
                   "shutil.rmtree"):
        path, writes = args[0], True
    else:
        return
    if writes and isinstance(path, (str, bytes, os.PathLike)):
        p = os.path.abspath(os.fsdecode(path))
        if p.startswith(workdir + os.sep):
            out.write(event + " " + os.path.relpath(p, workdir) + "\n")

sys.addaudithook(hook)

# simulated faults (tests of issue 34): this process cannot read checkpoint TEST_UNREADABLE_STEP
# (an I/O error), or its disk is full while it writes checkpoint TEST_DISK_FULL_AT
import errno
if os.environ.get("TEST_UNREADABLE_STEP"):
    import orbax.checkpoint as ocp
    restore = ocp.Checkpointer.restore
    def unreadable(self, directory, *a, **k):
        if os.path.basename(os.fspath(directory)) == os.environ["TEST_UNREADABLE_STEP"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(directory))
        return restore(self, directory, *a, **k)
    ocp.Checkpointer.restore = unreadable
if os.environ.get("TEST_DISK_FULL_AT"):
    from etils import epath
    cls = type(epath.Path("/"))
    write_text = cls.write_text
    def full(self, *a, **k):
        if f"/checkpoints/{os.environ['TEST_DISK_FULL_AT']}.orbax-checkpoint-tmp" in os.fspath(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
        return write_text(self, *a, **k)
    cls.write_text = full

sys.argv = ["train", *sys.argv[3:]]
from train.__main__ import main
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, rows_log: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRAIN_ROWS_LOG=rows_log,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0",  # tiny programs compile faster
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


class Processes:
    """Started processes, each in its own process group; all of them are killed on exit."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args, env, log_path, record) -> subprocess.Popen:
        cmd = [sys.executable, "-c", LAUNCH, args[args.index("--workdir") + 1], record, *args]
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log_path, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()


def _train_args(workdir, extra=()):
    return ["--config", "restormer_demo", "--workdir", str(workdir),
            *[a for o in [*SETS, *extra] for a in ("--set", o)]]


def _pod(procs, tmp, workdir, tag, faults=None, rows="rows_pod", writes="writes"):
    """Starts both processes of a 2-host job; ``faults``: process -> environment (see LAUNCH)."""
    port = _free_port()
    out = []
    for i in range(2):
        args = _train_args(workdir) + ["--distributed", "--coordinator", f"127.0.0.1:{port}",
                                       "--num-processes", "2", "--process-id", str(i)]
        env = dict(_env(2, str(tmp / rows)), **(faults or {}).get(i, {}))
        out.append(procs.start(args, env, tmp / f"{tag}.{i}.log", str(tmp / f"{writes}.{i}")))
    return out


def _cut_files(checkpoint):
    """The damage of issue 34: every file over 1 KiB of the state item cut to 100 bytes."""
    for dirpath, _, files in os.walk(checkpoint / "state"):
        for f in files:
            if os.path.getsize(os.path.join(dirpath, f)) > 1024:
                os.truncate(os.path.join(dirpath, f), 100)


def _wait(ps, timeout, tmp, tag):
    deadline = time.time() + timeout
    for p in ps:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{tag}: still running after {timeout} s\n" + _logs(tmp, tag))
    return [p.returncode for p in ps]


def _logs(tmp, tag) -> str:
    out = []
    for f in sorted(tmp.glob(f"{tag}*.log")):
        text = [l for l in f.read_text().splitlines() if not l.startswith("    @ ")]
        out.append(f"--- {f.name}\n" + "\n".join(text[-30:]))
    return "\n".join(out)


def _rows(prefix) -> dict[int, dict[int, list[str]]]:
    """step -> process -> row checksums (the last record of a step wins: a resumed run reads
    again the steps after its checkpoint)."""
    out: dict[int, dict[int, list[str]]] = {}
    for f in prefix.parent.glob(prefix.name + ".*.jsonl"):
        for r in map(json.loads, f.read_text().splitlines()):
            out.setdefault(r["step"], {})[r["process"]] = r["rows"]
    return out


def check_rows(pod, single, steps):
    """Each step: the two processes read disjoint rows, together the single process's batch."""
    for t in steps:
        p0, p1 = pod[t][0], pod[t][1]
        assert len(p0) == len(p1) == 4, (t, pod[t])
        assert not set(p0) & set(p1), f"step {t}: the processes read the same rows {pod[t]}"
        assert p0 + p1 == single[t][0], f"step {t}: {pod[t]} vs one process {single[t]}"


def _params_of_checkpoint(workdir, step):
    from train import checkpointing, recipe as recipe_lib

    recipe = recipe_lib.load("restormer_demo", SETS)
    import jax

    _, state, _, _ = checkpointing.load_checkpoint(recipe, str(workdir), str(step),
                                          devices=jax.devices()[:1])
    return jax.tree.map(np.asarray, jax.device_get(state["params"]))


def _exported(workdir, which="final"):
    import jax

    from flaxrestore import checkpoints

    module = checkpoints.load_model(os.path.join(workdir, "export", which))
    return jax.tree.map(np.asarray, checkpoints.weights_state(module))


# 2 x 2 and 1 x 4 devices do not sum the gradients in the same order (gloo across processes):
# measured 6e-8 (one float32 ulp of the weights) after 4 and after 12 steps, where each AdamW step moves a weight by
# about lr = 1e-3. A process that skipped the all-reduce (its own half-batch gradient) or
# resumed with another optimizer state, data position or random key lands ~lr away.
TOLERANCE = 1e-5  # 1% of lr


def _assert_close(a, b, what):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb))
    print(f"{what}: max |difference| {worst:.3g}")
    assert worst <= TOLERANCE, f"{what}: max |difference| {worst}"


def test_two_processes_train_as_one(tmp_path):
    single, pod = tmp_path / "single", tmp_path / "pod"
    with Processes() as procs:
        # A: one process, four devices, the pod's data; the pod's first run starts alongside
        a = procs.start(_train_args(single, ["data_module='test_multihost'"]),
                        _env(4, str(tmp_path / "rows_single")), tmp_path / "A.log",
                        str(tmp_path / "writes.A"))
        b = _pod(procs, tmp_path, pod, "B")
        deadline = time.time() + 300
        while not (pod / "checkpoints" / "6").is_dir():  # renamed there once complete
            assert time.time() < deadline, "no checkpoint 6 after 300 s\n" + _logs(tmp_path, "B")
            assert b[0].poll() is None and b[1].poll() is None, _logs(tmp_path, "B")
            time.sleep(0.01)
        os.killpg(b[0].pid, signal.SIGKILL)  # the coordinator, mid-run: no handler runs
        codes = _wait(b, 60, tmp_path, "B")
        assert codes[0] == -signal.SIGKILL
        assert codes[1] != 0, "the surviving process finished a run whose peer was killed"
        assert not (pod / "export").exists()
        done = max(int(d.name) for d in (pod / "checkpoints").iterdir() if d.name.isdigit())
        assert 6 <= done < TOTAL
        full = tmp_path / "pod_full"
        shutil.copytree(pod, full)

        # C: the same command again on both processes resumes, past checkpoint `done` (cut) and
        # `done - 2` (process 1 cannot read it)
        _cut_files(pod / "checkpoints" / str(done))
        c = _pod(procs, tmp_path, pod, "C", faults={1: {"TEST_UNREADABLE_STEP": str(done - 2)}})
        # D: the disk fills while process 0 writes the next checkpoint
        d = _pod(procs, tmp_path, full, "D", faults={0: {"TEST_DISK_FULL_AT": str(done + 2)}},
                 rows="rows_full", writes="writes.D")
        d_codes = _wait(d, 300, tmp_path, "D")
        assert _wait(c, 300, tmp_path, "C") == [0, 0], _logs(tmp_path, "C")
        assert _wait([a], 300, tmp_path, "A") == [0], _logs(tmp_path, "A")

    # D: stopped, saying why, on both processes; the checkpoints before are intact
    assert d_codes[0] == 4 and d_codes[1] != 0, (d_codes, _logs(tmp_path, "D"))
    error = (tmp_path / "D.0.log").read_text().strip().splitlines()[-1]
    assert error.startswith(f"error: saving checkpoint {done + 2} failed (OSError: [Errno 28] No "
                            "space left on device"), _logs(tmp_path, "D")
    assert f"the last complete checkpoint is step {done} in {full}" in error
    assert sorted(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit()) == \
        list(range(2, done + 1, 2))
    _assert_close(_params_of_checkpoint(full, done), _params_of_checkpoint(single, done),
                  f"checkpoint {done} after the failed save")

    log0 = (tmp_path / "C.0.log").read_text()
    ckpts = pod / "checkpoints"
    assert (f"warning: checkpoint {done} cannot be restored (item 'state': JSONDecodeError: "
            in log0), log0[-3000:]
    assert (f"warning: checkpoint {done - 2} cannot be restored (on process 1: item 'state': "
            f"OSError: [Errno 5] Input/output error: '{ckpts / str(done - 2)}'); set aside as "
            f"{ckpts / str(done - 2)}.damaged; using step {done - 4}") in log0, log0[-3000:]
    assert f"resumed from step {done - 4}" in log0, log0[-3000:]
    assert (ckpts / f"{done}.damaged").is_dir() and (ckpts / f"{done - 2}.damaged").is_dir()
    assert "4 device(s) on 2 host(s)" in log0

    # every step: disjoint halves that make up the single process's global batch
    pod_rows, single_rows = _rows(tmp_path / "rows_pod"), _rows(tmp_path / "rows_single")
    assert sorted(pod_rows) == sorted(single_rows) == list(range(1, TOTAL + 1))
    check_rows(pod_rows, single_rows, range(1, TOTAL + 1))

    # same weights: after 4 steps (the killed run's checkpoint) and at the end (resumed)
    _assert_close(_params_of_checkpoint(pod, 4), _params_of_checkpoint(single, 4),
                 "2 x 2 vs 1 x 4 devices after 4 steps")
    _assert_close(_exported(pod), _exported(single), "resumed 2 x 2 vs 1 x 4, final")
    _assert_close(_exported(pod, "best"), _exported(single, "best"), "export/best")

    # only process 0 logs and exports: one train record per step, process 1 silent
    records = [json.loads(l) for l in (pod / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert sorted(set(train_steps)) == list(range(1, TOTAL + 1))
    resumed = [s for s in train_steps if s > done]
    assert resumed == list(range(done + 1, TOTAL + 1)), train_steps  # no duplicates
    assert [r["step"] for r in records if r["kind"] == "val"] == [TOTAL]
    for tag in ("B", "C"):
        quiet = [l for l in (tmp_path / f"{tag}.1.log").read_text().splitlines()
                 if l.startswith(("recipe ", "optimizer:", "train:", "step ", "exported",
                                  "resumed"))]
        assert not quiet, quiet
    writes1 = (tmp_path / "writes.1").read_text().splitlines()
    paths1 = {l.split(" ", 1)[1] for l in writes1}
    assert not paths1, paths1  # nor checkpoints (orbax writes the replicated arrays once)
    writes0 = {l.split(" ", 1)[1] for l in (tmp_path / "writes.0").read_text().splitlines()}
    assert "metrics.jsonl" in writes0 and any(p.startswith("export/final") for p in writes0)


def test_check_rows_fails_when_a_process_reads_the_other_rows():
    """The row check above can fail: a process reading its peer's rows (a wrong process index
    reaching the data pipeline), or the global batch assembled in another order."""
    single = {1: {0: ["a", "b", "c", "d", "e", "f", "g", "h"]}}
    check_rows({1: {0: ["a", "b", "c", "d"], 1: ["e", "f", "g", "h"]}}, single, [1])
    with pytest.raises(AssertionError, match="same rows"):
        check_rows({1: {0: ["a", "b", "c", "d"], 1: ["a", "b", "c", "d"]}}, single, [1])
    with pytest.raises(AssertionError, match="one process"):
        check_rows({1: {0: ["e", "f", "g", "h"], 1: ["a", "b", "c", "d"]}}, single, [1])
