"""Damaged checkpoints and failing saves (issue 34), on one process; the two-process job is in
tests/test_multihost.py.

One short run (tiny Restormer, 8 steps, a checkpoint every 2, validation at 4 and 8) makes the
checkpoints 2, 4, 6, 8 that copies of its workdir are damaged in:

* each way a checkpoint gets damaged (files cut short, a blob cut, an item directory or file
  missing, a commit marker missing, orbax's step metadata cut, an empty step directory) makes
  `latest` the checkpoint before it, with one warning naming the step and what failed, and
  nothing renamed by a reader;
* resuming with the newest checkpoints cut (the issue's command pair) continues from the
  newest intact one, sets the damaged ones aside intact under other names, and ends on the
  uninterrupted run's weights, bit for bit;
* with every checkpoint damaged: one error line, exit status 1, no traceback, the workdir
  untouched;
* a damaged best checkpoint: 'best' falls back to the newest intact one with a warning, the
  step asked for by number is refused;
* a save failing in orbax's background writer (disk full, simulated) stops the run with exit
  status 4 naming the cause and the last complete step, which stays restorable even with
  keep_checkpoints=1; a failing model export leaves the previous export in place.

The runs are subprocesses of the command line sharing one compilation cache (the first compiles,
the others load), so that they run the same XLA programs and can be compared bit for bit.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

# a read that fails in tensorstore leaves a callback for orbax's closed asyncio loop, reported
# when it is collected ("Event loop is closed"); the failure itself is what these tests check
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "{'dim': 8, 'num_blocks': (1, 0, 0, 0), 'num_refinement_blocks': 0, 'heads': (1, 1, 1, 1)}"
SETS = [f"model_overrides={TINY}", "batch_size=4", "stages=()", "data.patch_size=16",
        "total_steps=12", "checkpoint_every=2", "keep_checkpoints=4", "eval_every=4",
        "log_every=2", "val_data.demo_val_size=16", "eval_max_images=1"]

# the command line run with a simulated disk that fills while orbax writes checkpoint FULL_AT in
# its background thread (every JSON file and orbax's metadata go through epath's write_text)
FULL_DISK = r"""
import errno, os, sys
from etils import epath
step = sys.argv[1]
cls = type(epath.Path("/"))
write_text = cls.write_text
def full(self, *a, **k):
    if f"/checkpoints/{step}.orbax-checkpoint-tmp" in os.fspath(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
    return write_text(self, *a, **k)
cls.write_text = full
from train.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                XLA_FLAGS="--xla_backend_optimization_level=0",  # tiny programs compile faster
                PYTHONPATH=REPO)


def _args(workdir, *extra, command=()):
    return [*command, "--config", "restormer_demo", "--workdir", str(workdir),
            *[a for o in [*SETS, *extra] for a in ("--set", o)]]


def _train(env, workdir, max_steps, *extra, fault_at=None):
    args = _args(workdir, *extra) + ["--max-steps", str(max_steps)]
    cmd = ([sys.executable, "-c", FULL_DISK, str(fault_at), *args] if fault_at is not None
           else [sys.executable, "-m", "train", *args])
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def base(tmp_path_factory, env):
    """A run of 8 steps: checkpoints 2, 4, 6, 8."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    res = _train(env, workdir, 8)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert _steps(workdir) == [2, 4, 6, 8]
    return workdir


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _copy(base, dst, steps=None):
    """A copy of the run's workdir (only the checkpoints ``steps`` if given)."""
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("export", "xla_cache"))
    for s in _steps(dst):
        if steps is not None and s not in steps:
            shutil.rmtree(os.path.join(dst, "checkpoints", str(s)))
    return dst


def _recipe():
    from train import recipe as recipe_lib

    return recipe_lib.load("restormer_demo", SETS)


def _state(workdir, which):
    from train import checkpointing

    step, state, _, _ = checkpointing.load_checkpoint(_recipe(), str(workdir), str(which))
    return step, jax.tree.map(np.asarray, jax.device_get(state))


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _snapshot(root):
    """Every file and directory under ``root`` with a hash of its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


# --------------------------------------------------------------------------- ways to damage


def cut_files(ckpt):  # the issue's: every file over 1 KiB of the state item cut to 100 bytes
    cut = [f for f in glob.glob(os.path.join(ckpt, "state", "**"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 1024]
    assert cut
    for f in cut:
        os.truncate(f, 100)


def cut_largest_blob(ckpt):  # one array data file loses its tail (orbax's JSON is intact)
    blobs = [f for f in glob.glob(os.path.join(ckpt, "state", "**", "d", "*"), recursive=True)]
    big = max(blobs, key=os.path.getsize)
    os.truncate(big, os.path.getsize(big) // 2)


def missing_item_dir(ckpt):
    shutil.rmtree(os.path.join(ckpt, "state"))


def missing_item_file(ckpt):
    os.remove(os.path.join(ckpt, "data", "metadata"))


def cut_json_item(ckpt):
    os.truncate(os.path.join(ckpt, "meta", "metadata"), 7)


def missing_commit_marker(ckpt):
    os.remove(os.path.join(ckpt, "commit_success.txt"))


def missing_item_commit_marker(ckpt):
    os.remove(os.path.join(ckpt, "data", "commit_success.txt"))


def cut_step_metadata(ckpt):
    os.truncate(os.path.join(ckpt, "_CHECKPOINT_METADATA"), 10)


def empty_step_dir(ckpt):
    shutil.rmtree(ckpt)
    os.mkdir(ckpt)


KINDS = {  # damage -> what the warning must say
    cut_files: "item 'state': JSONDecodeError",
    cut_largest_blob: "item 'state'",
    missing_item_dir: "item 'state' is missing",
    missing_item_file: "item 'data': FileNotFoundError",
    cut_json_item: "item 'meta': JSONDecodeError",
    missing_commit_marker: "the checkpoint has no commit marker",
    missing_item_commit_marker: "item 'data' has no commit marker",
    cut_step_metadata: "_CHECKPOINT_METADATA: JSONDecodeError",
    empty_step_dir: "is missing",
}


@pytest.mark.parametrize("damage", list(KINDS), ids=[f.__name__ for f in KINDS])
def test_each_kind_of_damage_is_found_and_skipped(base, tmp_path, capsys, damage):
    """'latest' of a workdir whose checkpoint 8 is damaged is checkpoint 6, said in one warning
    line; a reader (evaluate, export) renames nothing."""
    work = _copy(base, tmp_path / "run", steps=(6, 8))
    damage(os.path.join(work, "checkpoints", "8"))
    before = _snapshot(work)
    step, state = _state(work, "latest")
    assert step == 6
    _assert_same(state, _state(base, 6)[1])
    warnings = [l for l in capsys.readouterr().out.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: checkpoint 8 cannot be restored (")
    assert KINDS[damage] in warnings[0], warnings[0]
    assert _snapshot(work) == before


def test_resume_sets_damaged_checkpoints_aside_and_continues_bit_identically(base, tmp_path,
                                                                              env):
    """The issue's command pair, shortened: in a run stopped at step 6, checkpoint 6 has an array
    file cut in half and checkpoint 4 every file over 1 KiB of its state cut to 100 bytes. Run
    again to 8, it resumes from 2 with one warning line for each, keeps their files as
    6.damaged and 4.damaged, prints no traceback (a failed array read leaves asyncio echoes),
    and ends on the uninterrupted run's state, bit for bit."""
    work = _copy(base, tmp_path / "run", steps=(2, 4, 6))
    ckpts = os.path.join(work, "checkpoints")
    cut_largest_blob(os.path.join(ckpts, "6"))
    cut_files(os.path.join(ckpts, "4"))
    damaged = {s: _snapshot(os.path.join(ckpts, s)) for s in ("4", "6")}
    res = _train(env, work, 8)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    warnings = [l for l in res.stdout.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 2, res.stdout[-3000:]
    for line, step in zip(warnings, (6, 4)):
        assert line.startswith(f"warning: checkpoint {step} cannot be restored (item 'state': ")
        assert line.endswith(f"set aside as {ckpts}/{step}.damaged; using step 2"), line
    assert "JSONDecodeError" in warnings[1]  # the issue's: orbax's _METADATA cut
    assert "resumed from step 2 in" in res.stdout
    assert "Traceback" not in res.stderr and "never retrieved" not in res.stderr, res.stderr
    for s in ("4", "6"):  # renamed, not deleted or repaired
        assert _snapshot(os.path.join(ckpts, s + ".damaged")) == damaged[s]
    assert _steps(work) == [2, 4, 6, 8]
    for step in (4, 6, 8):  # written again from step 2: the same as the first time
        _assert_same(_state(work, step)[1], _state(base, step)[1])


def test_no_intact_checkpoint_is_one_error_line(base, tmp_path, env):
    """Every checkpoint damaged: one line naming each, exit status 1, no traceback, and not a
    byte of the workdir changed (nor anything added)."""
    work = _copy(base, tmp_path / "run")
    ckpts = os.path.join(work, "checkpoints")
    cut_files(os.path.join(ckpts, "8"))
    missing_item_dir(os.path.join(ckpts, "6"))
    missing_commit_marker(os.path.join(ckpts, "4"))
    cut_json_item(os.path.join(ckpts, "2"))
    before = _snapshot(work)
    res = _train(env, work, 10, "log_every=1")  # (a changed recipe would rewrite recipe.json)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no intact checkpoint in {ckpts}: "), \
        res.stderr
    for step in (8, 6, 4, 2):
        assert f"checkpoint {step}: " in lines[0]
    assert _snapshot(work) == before


def test_damaged_best(base, tmp_path, capsys, monkeypatch):
    """'best' whose checkpoint is damaged: the newest intact one instead, with a warning; that
    step asked for by number is refused in one line (exit status 1 from the command line)."""
    from train import checkpointing
    from train.__main__ import main

    work = _copy(base, tmp_path / "run")
    meta = json.loads((work / "checkpoints" / "8" / "meta" / "metadata").read_text())
    best = meta["best_step"]
    assert best in (4, 8)
    cut_largest_blob(os.path.join(work, "checkpoints", str(best)))
    fallback = 8 if best == 4 else 6
    step, state = _state(work, "best")
    assert step == fallback
    _assert_same(state, _state(base, fallback)[1])
    out = capsys.readouterr().out
    assert f"warning: the best checkpoint (step {best}) cannot be restored (item 'state': " in out
    with pytest.raises(checkpointing.DamagedCheckpoint, match=f"checkpoint {best} in .* cannot "
                                                              "be restored"):
        _state(work, best)

    # the command line: one error line, status 1 (in this process: no jax restart, no cache)
    from flaxrestore.xla_cpu import tuning
    from train import __main__ as cli

    monkeypatch.setattr(tuning, "tune_cpu_process", lambda: {})
    monkeypatch.setattr(cli, "_compilation_cache", lambda workdir: None)
    capsys.readouterr()
    assert main(_args(work, command=["export"]) +
                ["--checkpoint", str(best), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {best} in "), err
    assert not (tmp_path / "out").exists()


def test_failed_save_stops_the_run_and_keeps_the_earlier_checkpoints(base, tmp_path, env):
    """The disk fills while checkpoint 8 is written in the background: the run stops (status 4)
    saying why and that step 6 is the last complete checkpoint; 6 stays restorable although
    keep_checkpoints=1 would drop it once 8 were complete."""
    work = _copy(base, tmp_path / "run", steps=(4, 6))
    res = _train(env, work, 8, "keep_checkpoints=1", fault_at=8)
    assert res.returncode == 4, res.stdout[-2000:] + res.stderr[-3000:]
    assert "resumed from step 6" in res.stdout
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: saving checkpoint 8 failed (OSError: [Errno 28] No space left "
                           "on device"), last
    assert "the last complete checkpoint is step 6 in" in last
    assert _steps(work) == [4, 6]
    _assert_same(_state(work, "latest")[1], _state(base, 6)[1])


def test_failed_export_leaves_the_previous_export(base, tmp_path, monkeypatch):
    """A model export that fails half-written raises SaveFailed and leaves the export that was
    there (same weights) and no partial copy; a later export replaces it."""
    from flaxrestore import checkpoints
    from train import checkpointing

    recipe = _recipe()
    path = str(tmp_path / "export" / "final")
    weights = lambda: jax.tree.map(np.asarray, checkpoints.weights_state(checkpoints.load_model(path)))  # noqa: E731

    def export(step):
        _, state, model, _ = checkpointing.load_checkpoint(recipe, str(base), str(step))
        return checkpointing.export_weights(path, recipe, model,
                                            checkpointing.eval_params(recipe, state),
                                            state["model_state"])

    export(6)
    first = weights()
    real = checkpointing.fcheckpoints.save_model

    def full_disk(directory, *a, **k):
        real(directory, *a, **k)  # the weights are written, model.json is not
        os.remove(os.path.join(directory, "model.json"))
        raise OSError(28, "No space left on device", os.path.join(directory, "model.json"))

    monkeypatch.setattr(checkpointing.fcheckpoints, "save_model", full_disk)
    with pytest.raises(checkpointing.SaveFailed, match=r"writing the model export .*final failed "
                                                       r"\(OSError: .*No space left on device"):
        export(8)
    _assert_same(weights(), first)
    assert sorted(os.listdir(tmp_path / "export")) == ["final"]
    monkeypatch.setattr(checkpointing.fcheckpoints, "save_model", real)
    export(8)
    eight = _state(base, 8)[1]
    _assert_same(weights(), checkpointing.eval_params(recipe, eight))
