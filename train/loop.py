"""The training loop: data, jitted steps, evaluation, checkpoints, resume, EMA, logs.

Work directory layout (``--workdir DIR``)::

    DIR/recipe.json              the recipe of the run (a resume says what changed)
    DIR/checkpoints/<step>/      orbax checkpoints (train/checkpointing.py)
    DIR/metrics.jsonl, DIR/tb/   metrics as JSON lines and TensorBoard scalars (train/logs.py)
    DIR/export/final, best       Flax model directories of the weights (train/checkpointing.py)

Re-running the same command resumes from the newest intact checkpoint, bit-exact: the data
iterator's state is checkpointed with the weights. Validation (train/evaluation.py) runs every
``eval_every`` steps on the EMA weights when the recipe keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Mapping

import jax
import numpy as np

from flaxrestore import progress
from train import checkpointing
from train import recipe as recipe_lib
from train import schedules
from train import step as step_lib
from train.evaluation import Evaluator, load_val_set
from train.logs import MetricsLog, RowsLog, is_main_process, log
from train.recipe import Recipe


class NonFiniteLoss(RuntimeError):
    """The loss or its gradient became NaN/inf; the run stopped, its last checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    step: int
    state: Any
    evals: list[tuple[int, dict]]
    workdir: str
    model: step_lib.ModelDef | None = None


def _write_recipe(workdir: str, recipe: Recipe) -> None:
    path = os.path.join(workdir, "recipe.json")
    current = json.loads(json.dumps(recipe_lib.to_dict(recipe), default=str))
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != current:
            changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
            log(f"note: the recipe differs from the one this workdir started with in: "
                f"{', '.join(changed)} (continuing with the new one)")
    if is_main_process():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(current, f, indent=2, default=str)
        os.replace(tmp, path)


def _host_batch(recipe: Recipe, item: Mapping[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    batch = {"lq": np.asarray(item["lq"], np.float32), "gt": np.asarray(item["gt"], np.float32)}
    if recipe.stages:
        stage = recipe.stage_at(t)
        rng = np.random.default_rng([recipe.seed, t, jax.process_index()])
        batch = step_lib.progressive_crop(batch, stage.batch_size // jax.process_count(),
                                          stage.patch_size, rng)
    return batch


def train(recipe: Recipe, workdir: str, *, devices=None, max_steps: int | None = None,
          quiet: bool = False) -> RunResult:
    """Trains (or resumes) ``recipe`` in ``workdir``; ``max_steps`` stops early (tests, demos)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh, model, tx = step_lib.setup(recipe, devices)
    main = is_main_process() and not quiet
    if main:
        log(f"recipe {recipe.name}: model {recipe.model} {dict(recipe.model_overrides) or ''}, "
            f"{recipe.total_steps} steps, global batch {recipe.batch_size}, "
            f"{mesh.size} device(s) on {jax.process_count()} host(s), dtype {recipe.dtype}")
        log(f"optimizer: {schedules.describe(recipe.optimizer)}")

    ema = recipe.ema_decay > 0
    abstract = step_lib.abstract_state(model, tx, ema)
    # the newest intact checkpoint, damaged newer ones set aside; before anything is written
    # (with none intact, NoIntactCheckpoint leaves the workdir as it was)
    resumed = checkpointing.resume(workdir, abstract, mesh)
    _write_recipe(workdir, recipe)
    mngr = checkpointing.checkpoint_manager(workdir, recipe)
    saver = checkpointing.Saver(mngr, workdir)
    dmod = recipe_lib.data_module(recipe)
    train_cfg = recipe_lib.data_config(recipe, recipe.data)
    per_host = recipe.batch_size // jax.process_count()
    it = dmod.make_train_iterator(train_cfg, batch_size=per_host, seed=recipe.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    meta = {"best_value": None, "best_step": None}
    if resumed is not None:
        latest, state, data_state, meta = resumed
        it.set_state(data_state)
        if main:
            log(f"resumed from step {latest} in {workdir}")
    else:
        state = step_lib.replicate(mesh, step_lib.init_state(model, tx, ema))

    vgg_graph, frozen = None, {}
    if step_lib.needs_vgg(recipe):
        vgg_graph, vgg_params = step_lib.load_vgg(recipe.vgg_weights,
                                                  allow_random=recipe.vgg_weights == "random")
        frozen = {"vgg": step_lib.replicate(mesh, vgg_params)}

    train_step = step_lib.make_train_step(recipe, model, tx, mesh, vgg_graph)
    val_set = load_val_set(recipe)
    evaluator = Evaluator(recipe, model, mesh, val_set) if val_set else None
    mlog = MetricsLog(workdir)
    rows_log = RowsLog(os.environ.get("TRAIN_ROWS_LOG"))
    evals: list[tuple[int, dict]] = []

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass

    def eval_params(s):
        return checkpointing.eval_params(recipe, s)

    def save(s, t, metrics=None):
        saver.save(t, s, it.get_state(), dict(meta, recipe=recipe.name), metrics)

    def run_eval(s, t):
        values = evaluator(eval_params(s), s["model_state"])
        evals.append((t, values))
        mlog.write(t, "val", values)
        metric = values.get(recipe.best_metric)
        improved = False
        if metric is not None:
            best = meta.get("best_value")
            better = (best is None or (metric < best if recipe.best_metric in ("loss", "lpips")
                                       else metric > best))
            if better:
                meta.update(best_value=float(metric), best_step=int(t))
                improved = True
        if main:
            log(f"step {t}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()) +
                (" (best)" if improved else f" (best {meta['best_value']:.4f} at step "
                                            f"{meta['best_step']})" if meta.get("best_value") else ""))
        return values

    start = int(jax.device_get(state["step"]))
    end = recipe.total_steps if max_steps is None else min(recipe.total_steps, max_steps)
    pbar = progress.bar(recipe.total_steps, desc="train", unit="step", initial=start, enabled=main)
    if start == 0 and evaluator is not None and main:
        base = evaluator.baseline()
        if base:
            mlog.write(0, "val_input", base)
            log("validation of the degraded inputs: " +
                ", ".join(f"{k} {v:.4f}" for k, v in base.items()))

    # XLA:CPU runs simulated devices' collectives on one shared thread pool: two multi-device
    # programs in flight can each hold threads the other needs (a 40 s rendezvous timeout).
    # There, wait for each step; on GPU/TPU the next step is queued while one runs.
    serial = mesh.devices.flat[0].platform == "cpu" and mesh.size > 1
    t = start
    pending = None  # (step, metrics) of the previous step, read after the next is dispatched
    window_t0, window_steps = time.time(), 0
    last_good = mngr.latest_step()
    try:
        while t < end and stop["signal"] is None:
            item = next(it)
            host_rows = _host_batch(recipe, item, t + 1)
            rows_log.write(t + 1, host_rows)
            batch = step_lib.global_batch(mesh, host_rows)
            state, metrics = train_step(state, batch, frozen)
            if serial:
                jax.block_until_ready(metrics)
            saver.check()  # a save that failed in the background stops the run now
            t += 1
            window_steps += 1
            pbar.update()
            if pending is not None:
                _check_finite(pending, last_good, workdir)
            pending = (t, metrics)
            do_log = t % recipe.log_every == 0 or t == end
            do_eval = evaluator is not None and (t % recipe.eval_every == 0 or t == recipe.total_steps)
            do_ckpt = t % recipe.checkpoint_every == 0 or t == end or do_eval
            if do_log or do_eval or do_ckpt:
                _check_finite(pending, last_good, workdir)
                pending = None
            if do_log:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                rate = window_steps / max(time.time() - window_t0, 1e-9)
                window_t0, window_steps = time.time(), 0
                host["steps_per_sec"] = rate
                mlog.write(t, "train", host)
                pbar.set_postfix(loss=f"{host['loss']:.4g}", lr=f"{host['lr']:.3g}", refresh=False)
            values = run_eval(state, t) if do_eval else None
            if do_ckpt:
                save(state, t, metrics=values if values else None)
                last_good = t
        if pending is not None:
            _check_finite(pending, last_good, workdir)
        if stop["signal"] is not None and t != last_good:
            save(state, t)
            last_good = t
            log(f"\nstopped by signal {stop['signal']} at step {t}; checkpoint saved")
        saver.wait()  # SaveFailed if the last save failed
    except BaseException:
        saver.close_quietly()  # the error being raised is the one to report
        raise
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        pbar.close()
        mlog.close()
        rows_log.close()

    if t >= recipe.total_steps:
        final = checkpointing.export_weights(os.path.join(workdir, "export", "final"), recipe, model,
                               eval_params(state), state["model_state"])
        if main:
            log(f"exported the final weights to {final}")
        if meta.get("best_step") is not None:
            best_step = int(meta["best_step"])
            if best_step in mngr.all_steps():
                try:
                    bstate = state if best_step == t else checkpointing.restore_checkpoint(
                        workdir, best_step, abstract, mesh)[0]
                except checkpointing.DamagedCheckpoint as e:
                    bstate = None
                    log(f"warning: export/best not written: {e}")
                if bstate is not None:
                    best = checkpointing.export_weights(os.path.join(workdir, "export", "best"),
                                                        recipe, model, eval_params(bstate),
                                                        bstate["model_state"])
                    if main:
                        log(f"exported the best weights (step {best_step}, {recipe.best_metric} "
                            f"{meta['best_value']:.4f}) to {best}")
    mngr.close()
    return RunResult(t, state, evals, workdir, model)


def _check_finite(pending, last_good, workdir) -> None:
    t, metrics = pending
    if not bool(jax.device_get(metrics["finite"])):
        loss = float(jax.device_get(metrics["loss"]))
        gn = float(jax.device_get(metrics["grad_norm"]))
        where = (f"the last good checkpoint (step {last_good}) is kept in {workdir}/checkpoints"
                 if last_good is not None else "no checkpoint had been written yet")
        raise NonFiniteLoss(f"non-finite training loss at step {t} (loss {loss}, gradient norm "
                            f"{gn}); the update was not applied and the run stopped; {where}")
