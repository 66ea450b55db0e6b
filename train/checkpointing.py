"""Checkpoints of a run and the weights it exports.

``WORKDIR/checkpoints/<step>/`` is an orbax checkpoint of three items: ``state`` (parameters,
optimizer, EMA, model state, step; host numpy arrays), ``data`` (the data iterator's state, JSON)
and ``meta`` (the best validation metric so far). Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a kill at any moment leaves the previous ones loadable.
The last ``keep_checkpoints`` saves are kept plus the one with the best validation metric.

``WORKDIR/export/{final,best}`` are Flax model directories (:mod:`flaxrestore.checkpoints`), which
``python -m porting export NAME DIR OUT.pth`` turns into PyTorch.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxrestore import checkpoints as fcheckpoints
from train import step as step_lib
from train.logs import is_main_process
from train.recipe import Recipe


ITEMS = ("state", "data", "meta")


def checkpoint_manager(workdir: str, recipe: Recipe, *, read_only: bool = False) -> ocp.CheckpointManager:
    cm = ocp.checkpoint_managers
    best_min = recipe.best_metric in ("loss", "lpips")
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=max(1, recipe.keep_checkpoints)),
        cm.BestN(get_metric_fn=lambda m: m[recipe.best_metric], reverse=best_min, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=recipe.async_checkpoints)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 item_names=ITEMS, options=options)


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract_state, mesh):
    """(state replicated on ``mesh``, data-iterator state, meta) of checkpoint ``step``."""
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_state)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return (step_lib.replicate(mesh, restored["state"]), _from_jsonable(restored["data"]),
            restored["meta"])


def host_state(state):
    """The replicated train state as host numpy arrays, what the checkpoints store. (Saving the
    device arrays themselves made orbax slice every replica eagerly: ~10 s per save with 8
    simulated devices, most of it compiling slices.)"""
    return jax.tree.map(np.asarray, jax.device_get(state))


def eval_params(recipe: Recipe, state) -> Any:
    """The weights that are evaluated and exported: the EMA copy when the recipe keeps one."""
    return state["ema"] if recipe.ema_decay > 0 else state["params"]


def save(mngr: ocp.CheckpointManager, step: int, state, data_state, meta, metrics=None) -> None:
    """Saves checkpoint ``step`` (``data_state``: the data iterator's ``get_state()``)."""
    mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(host_state(state)),
        data=ocp.args.JsonSave(_jsonable(data_state)),
        meta=ocp.args.JsonSave(dict(meta, step=int(step), time=time.time()))),
        metrics=metrics, force=True)


def export_weights(path: str, recipe: Recipe, model: step_lib.ModelDef, params, model_state) -> str:
    """Writes a Flax model directory (replacing one already there)."""
    module = model.module(jax.device_get(params), jax.device_get(model_state), train=False)
    if is_main_process() and os.path.exists(path):
        shutil.rmtree(path)
    if jax.process_count() > 1:  # after the old copy is gone
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"export {path}")
    # every process takes part (orbax's save is a collective); process 0 writes the files
    return fcheckpoints.save_model(path, recipe.model, module, dict(recipe.model_overrides))


# grain's iterator state holds bytes, which orbax's JSON items cannot
def _jsonable(obj):
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_jsonable(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def load_checkpoint(recipe: Recipe, workdir: str, which: str = "best", devices=None):
    """(step, state, model, mesh) of a checkpoint of ``workdir``: 'best', 'latest' or a step."""
    workdir = os.path.abspath(workdir)
    mesh, model, tx = step_lib.setup(recipe, devices)
    abstract = step_lib.abstract_state(model, tx, recipe.ema_decay > 0)
    mngr = checkpoint_manager(workdir, recipe, read_only=True)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        latest = mngr.latest_step()
        if which == "latest":
            step = latest
        elif which == "best":
            # the latest checkpoint's meta names the best step: that item alone is read
            meta = mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            step = meta.get("best_step")
            if step is None or step not in steps:
                step = latest
        else:
            step = int(which)
            if step not in steps:
                raise KeyError(f"no checkpoint for step {step}; have {sorted(steps)}")
        state, _, _ = restore_checkpoint(mngr, step, abstract, mesh)
    finally:
        mngr.close()
    return step, state, model, mesh


def export_checkpoint(recipe: Recipe, workdir: str, out: str, *, which: str = "best",
                      devices=None) -> str:
    """Writes the weights of a checkpoint (EMA weights if the recipe keeps them) as a Flax model
    directory, which ``python -m porting export`` converts to a PyTorch file."""
    step, state, model, mesh = load_checkpoint(recipe, workdir, which, devices)
    return export_weights(os.path.abspath(out), recipe, model, eval_params(recipe, state),
                          state["model_state"])
