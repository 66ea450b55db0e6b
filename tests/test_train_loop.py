"""The training loop end to end through the command line: a demo run killed with SIGKILL and
re-run resumes and ends with exactly the weights of an uninterrupted run; a non-finite loss stops
the run with a clear message and keeps the last good checkpoint; ``--list``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "{'dim': 8, 'num_blocks': (1, 0, 0, 0), 'num_refinement_blocks': 0, 'heads': (1, 1, 1, 1)}"
BASE = [f"model_overrides={TINY}", "batch_size=4", "stages=()", "data.patch_size=16",
        "val_data=None", "log_every=5"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS="--xla_backend_optimization_level=0",  # compiles faster; tiny programs
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    return e


def _cmd(workdir, overrides, config="restormer_demo"):
    sets = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, "-m", "train", "--config", config, "--workdir", str(workdir), *sets]


def _final_weights(workdir):
    from flaxrestore import checkpoints

    module = checkpoints.load_model(os.path.join(workdir, "export", "final"))
    return jax.tree.map(np.asarray, checkpoints.weights_state(module))


def _train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def test_sigkill_then_rerun_resumes_bit_exact(tmp_path, env):
    overrides = BASE + ["total_steps=40", "checkpoint_every=5"]
    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    res = subprocess.run(_cmd(a, overrides), env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]

    proc = subprocess.Popen(_cmd(b, overrides), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not os.path.isdir(b / "checkpoints" / "10") and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: as a crash or a pulled plug
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (b / "export").exists()

    res = subprocess.run(_cmd(b, overrides), env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "resumed from step" in res.stdout, res.stdout
    resumed_at = int(res.stdout.split("resumed from step")[1].split()[0])
    assert 10 <= resumed_at < 40

    wa, wb = _final_weights(a), _final_weights(b)
    for x, y in zip(jax.tree.leaves(wa), jax.tree.leaves(wb)):
        np.testing.assert_array_equal(x, y)  # bit-exact
    la, lb = _train_losses(a), _train_losses(b)
    assert all(la[s] == lb[s] for s in lb if s > resumed_at), (la, lb)
    assert max(lb) == 40


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, env):
    # the stand-in data puts a NaN into the 7th batch (position 6)
    overrides = BASE + ["data_module='test_train_standin'", "data={'patch_size': 16, 'nan_at': 6}",
                        "total_steps=20", "checkpoint_every=2"]
    res = subprocess.run(_cmd(tmp_path, overrides), env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-4000:]
    assert "non-finite training loss at step 7" in res.stderr, res.stderr[-2000:]
    assert "last good checkpoint (step 6)" in res.stderr
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps[-1] == 6, steps
    from train import loop, recipe as recipe_lib

    recipe = recipe_lib.load("restormer_demo", overrides)
    step, state, _, _ = loop.load_checkpoint(recipe, str(tmp_path), "latest")
    assert step == 6
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_cli_list():
    res = subprocess.run([sys.executable, "-m", "train", "--list"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "restormer_demo" in res.stdout and "restormer_motion_deblurring" in res.stdout
