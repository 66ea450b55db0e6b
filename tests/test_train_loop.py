"""The training loop end to end through the command line: a non-finite loss stops the run with
a clear message and keeps the last good checkpoint; ``--list``; the run features (progressive
stages, keep-last-N plus best, export/best, EMA in evaluation and export, resuming) and the
command lines ``train evaluate`` / ``train export`` / ``python -m train.demo`` /
``python -m porting demo``, with the evaluation checked against a PSNR computed by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    from train import checkpointing, recipe as recipe_lib

    recipe = recipe_lib.load("restormer_demo", overrides)
    step, state, _, _ = checkpointing.load_checkpoint(recipe, str(tmp_path), "latest")
    assert step == 6
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_cli_list():
    res = subprocess.run([sys.executable, "-m", "train", "--list"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "restormer_demo" in res.stdout and "restormer_motion_deblurring" in res.stdout


def test_multihost_options_reach_jax_distributed_initialize(monkeypatch, tmp_path, capsys):
    """What a pod host passes on the command line is what JAX's coordination service gets (a
    flag parsed and then dropped would leave the job on JAX's defaults), and multi-host options
    without --distributed are refused rather than ignored."""
    from flaxrestore.xla_cpu import tuning
    from train.__main__ import main

    class Started(Exception):
        pass

    seen = {}

    def initialize(**kw):
        seen.update(kw)
        raise Started  # stop before any training

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(tuning, "tune_cpu_process", lambda: {})
    monkeypatch.delenv("TRAIN_DISTRIBUTED", raising=False)
    common = ["--config", "restormer_demo", "--workdir", str(tmp_path)]
    hosts = ["--coordinator", "10.1.2.3:8476", "--num-processes", "4", "--process-id", "3",
             "--heartbeat-timeout", "15"]
    with pytest.raises(Started):
        main(common + ["--distributed"] + hosts)
    assert seen == {"coordinator_address": "10.1.2.3:8476", "num_processes": 4, "process_id": 3,
                    "heartbeat_timeout_seconds": 15}
    seen.clear()
    with pytest.raises(SystemExit):
        main(common + hosts[-2:])
    assert "--heartbeat-timeout: multi-host options, given without --distributed" in \
        capsys.readouterr().err
    for bad in ("0", "soon"):
        with pytest.raises(SystemExit):
            main(common + ["--distributed", "--heartbeat-timeout", bad])
        assert "must be a positive number of seconds" in capsys.readouterr().err
    assert not seen
    monkeypatch.setenv("TRAIN_DISTRIBUTED", "1")  # the environment's switch counts as the flag
    with pytest.raises(Started):
        main(common + hosts[-2:])
    assert seen == {"heartbeat_timeout_seconds": 15}


# ------------------------------------------------------------------------------ run features

FEATURES = [f"model_overrides={TINY}", "batch_size=4", "data.patch_size=16",
            "stages=((3, 16, 4), (6, 8, 2))", "total_steps=6", "checkpoint_every=1",
            "keep_checkpoints=2", "eval_every=1", "log_every=1", "ema_decay=0.5",
            "val_data.demo_val_size=32", "eval_max_images=2", "optimizer.lr=2e-2"]

# one process for the command lines (jax starts once): train, evaluate, export, then the two
# demos, shortened (python -m train.demo's PSNR cannot rise in 2 steps: only that it runs)
CLI_SCRIPT = r"""
import contextlib, io, json, os, sys
from train.__main__ import main
workdir, out, sets = sys.argv[1], sys.argv[2], [a for o in sys.argv[3:] for a in ("--set", o)]
common = ["--config", "restormer_demo", "--workdir", workdir, *sets]
assert main(common) == 0
text = io.StringIO()
with contextlib.redirect_stdout(text):
    assert main(["evaluate", "--checkpoint", "latest", *common]) == 0
print("EVALUATE " + text.getvalue().strip().splitlines()[-1])
assert main(["export", "--checkpoint", "best", "--out", out, *common]) == 0
os.environ.pop("TRAIN_ROWS_LOG")  # (rows of the main run only)
# resume: a copy of the run without its last checkpoint and exports, run again with the same
# command line (the test compares the two runs' final weights)
import shutil
again = workdir + "_again"
shutil.copytree(workdir, again)
shutil.rmtree(os.path.join(again, "checkpoints", "6"))
shutil.rmtree(os.path.join(again, "export"))
assert main(["--config", "restormer_demo", "--workdir", again, *sets]) == 0
from train import demo
config = os.path.join(workdir, "tiny_demo.py")  # the demo's recipe, shrunk
with open(config, "w") as f:
    f.write("import dataclasses\nfrom train import recipe\n"
            f"def get_config(arg=None):\n    return recipe.load('restormer_demo', {sets[1::2]!r})\n")
demo.main(["--workdir", os.path.join(workdir, "demo"), "--config", config, "--steps", "2"])
from porting import demo as pdemo
assert pdemo.main(names=["aecrnet"], workdir=os.path.join(workdir, "porting_demo")) == 0
print("CLI DONE")
"""


def _val_psnr_by_hand(module, recipe, n):
    """Mean PSNR of ``module`` on the first ``n`` validation tiles, in numpy (clamped output,
    data range 1, no border, RGB): independent of train.evaluation.Evaluator and flaxrestore.metrics."""
    from train import evaluation

    values = []
    for item in evaluation.load_val_set(recipe)[:n]:
        y = np.clip(np.asarray(module(item["lq"][None]))[0], 0.0, 1.0).astype(np.float64)
        mse = np.mean((y - item["gt"].astype(np.float64)) ** 2)
        values.append(10.0 * np.log10(1.0 / mse))
    return float(np.mean(values))


def test_run_features_and_command_lines(tmp_path, env):
    """One short run crossing a progressive-stage boundary, with EMA, per-step checkpoints and
    validation, then `train evaluate`, `train export`, `python -m train.demo` and `python -m
    porting demo` (one model):

    * steps 1-3 read 4 rows of 16 px, steps 4-6 2 rows of 8 px (the stage switch is at the
      right step), as TRAIN_ROWS_LOG records them;
    * the checkpoints left are the last 2 plus the best validation step;
    * a copy of the run without its last checkpoint, run again, resumes at step 5 and ends on
      the same weights, bit for bit (a SIGKILLed run resuming: tests/test_multihost.py);
    * export/best holds the best step's EMA weights, export/final the last EMA weights (not the
      raw ones), and `train export --checkpoint best` writes the same;
    * `train evaluate` scores the EMA weights: its PSNR equals one computed by hand in numpy
      from the exported model, and differs from the raw weights' PSNR.
    """
    from flaxrestore import checkpoints
    from train import checkpointing, recipe as recipe_lib, step as step_lib

    workdir, out = tmp_path / "run", tmp_path / "exported_best"
    e = dict(env, TRAIN_ROWS_LOG=str(tmp_path / "rows"))
    res = subprocess.run([sys.executable, "-c", CLI_SCRIPT, str(workdir), str(out), *FEATURES],
                         env=e, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "CLI DONE" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]

    # progressive stages: (batch, patch) per step
    rows = [json.loads(l) for l in (tmp_path / "rows.0.jsonl").read_text().splitlines()]
    assert [(r["step"], r["shape"]) for r in rows] == [
        (1, [4, 16, 16, 3]), (2, [4, 16, 16, 3]), (3, [4, 16, 16, 3]),
        (4, [2, 8, 8, 3]), (5, [2, 8, 8, 3]), (6, [2, 8, 8, 3])], rows

    # keep-last-2 plus the best
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["psnr"] for r in records if r["kind"] == "val"}
    assert sorted(val) == [1, 2, 3, 4, 5, 6]
    best = max(val, key=val.get)
    kept = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert kept == sorted({5, 6, best}), (kept, val)
    print("validation PSNR per step", val, "kept", kept)

    recipe = recipe_lib.load("restormer_demo", FEATURES)
    weights = lambda d: jax.tree.map(np.asarray, checkpoints.weights_state(checkpoints.load_model(d)))  # noqa: E731

    def state_of(step):
        return jax.device_get(checkpointing.load_checkpoint(recipe, str(workdir), str(step))[1])

    last, at_best = state_of(6), state_of(best)
    for exported, state in ((workdir / "export" / "final", last),
                            (workdir / "export" / "best", at_best), (out, at_best)):
        w = weights(exported)
        for a, b, raw in zip(jax.tree.leaves(w), jax.tree.leaves(state["ema"]),
                             jax.tree.leaves(state["params"])):
            np.testing.assert_array_equal(a, b)
        assert any(np.abs(a - r).max() > 0 for a, r in zip(jax.tree.leaves(w),
                                                          jax.tree.leaves(state["params"])))

    # evaluate: the EMA weights' PSNR, computed independently
    ev = json.loads(res.stdout.split("EVALUATE ", 1)[1].splitlines()[0])
    assert ev["step"] == 6 and ev["images"] == 2
    final = checkpoints.load_model(workdir / "export" / "final")
    by_hand = _val_psnr_by_hand(final, recipe, 2)
    assert abs(ev["psnr"] - by_hand) < 1e-3, (ev, by_hand)
    assert abs(ev["psnr"] - val[6]) < 1e-6  # and what the run logged (same function)
    model = step_lib.build_model(recipe)
    raw = _val_psnr_by_hand(model.module(last["params"], last["model_state"]), recipe, 2)
    assert abs(raw - by_hand) > 1e-3, (raw, by_hand)

    # the copy without checkpoint 6 resumed at step 5, in the second stage (data position,
    # optimizer, EMA and random key restored), and ended on the same weights, bit for bit
    assert "resumed from step 5" in res.stdout, res.stdout[-3000:]
    for a, b in zip(jax.tree.leaves(weights(workdir / "export" / "final")),
                    jax.tree.leaves(weights(tmp_path / "run_again" / "export" / "final"))):
        np.testing.assert_array_equal(a, b)

    # the demos ran through
    assert "exported PyTorch weights" in res.stdout and "(OK, limit 1e-4)" in res.stdout
    assert list((workdir / "demo" / "images").glob("*_before_after_gt.png"))
    assert "1/1 models agree" in res.stdout.split("Porting demo", 1)[1]
