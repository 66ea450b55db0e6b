"""Checkpoints of a run and the weights it exports.

``WORKDIR/checkpoints/<step>/`` is an orbax checkpoint of three items: ``state`` (parameters,
optimizer, EMA, model state, step; host numpy arrays), ``data`` (the data iterator's state, JSON)
and ``meta`` (the best validation metric so far). Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a kill at any moment leaves the previous ones loadable.
The last ``keep_checkpoints`` saves are kept plus the one with the best validation metric.

Damaged checkpoints (a workdir copied or synced and cut short, a file system that lost the tail
of a file): a checkpoint counts as intact only when every process of the job restores all of it
(every item, read in full) and its commit markers are there. Resuming, the newest intact one is
used; each damaged newer one is named in one line and set aside as ``<step>.damaged`` (renamed,
never deleted; orbax no longer lists it). With none intact a :class:`NoIntactCheckpoint` says so
and nothing is renamed or written. ``evaluate`` / ``export`` (:func:`load_checkpoint`) skip
damaged checkpoints the same way but leave them where they are (a training run may be using the
directory). A save that fails (:class:`SaveFailed`) leaves the earlier checkpoints as they were.

``WORKDIR/export/{final,best}`` are Flax model directories (:mod:`flaxrestore.checkpoints`), which
``python -m porting export NAME DIR OUT.pth`` turns into PyTorch; they are written next to their
place and renamed into it, so a failed export leaves the previous one in place.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxrestore import checkpoints as fcheckpoints
from train import step as step_lib
from train.logs import is_main_process, log
from train.recipe import Recipe


ITEMS = ("state", "data", "meta")
COMMIT_MARKER = "commit_success.txt"  # orbax's, in the step directory and in each item's
STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step metadata file (JSON)
SET_ASIDE = ".damaged"  # suffix of a damaged checkpoint's directory once set aside


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message is one line for the user."""


class NoIntactCheckpoint(CheckpointError):
    """The work directory has checkpoints but none that restores completely (or none at all)."""


class DamagedCheckpoint(CheckpointError):
    """The checkpoint asked for by its step cannot be restored."""


class SaveFailed(CheckpointError):
    """Writing a checkpoint or a model export failed; what was written before is intact."""


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


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
    return ocp.CheckpointManager(checkpoints_dir(workdir), item_names=ITEMS, options=options)


# ------------------------------------------------------------------------------ reading

def list_steps(directory: str) -> list[int]:
    """The steps of the finished checkpoints in ``directory``, ascending: what CheckpointManager
    lists (its name format), found without building one. In a job of several processes process 0
    lists them and broadcasts the list (orbax's ``single_host_load_and_broadcast``), so that every
    process goes through the same candidates."""
    fmt = ocp.step.standard_name_format(single_host_load_and_broadcast=True)
    exists = os.path.isdir(directory)
    if jax.process_count() > 1:  # (find_all broadcasts only when the directory exists)
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if not exists:
        return []
    return sorted(m.step for m in fmt.find_all(directory))


def restore_args(abstract_state, items=ITEMS) -> dict[str, ocp.args.CheckpointArgs]:
    """How each item is read: the train state into host numpy arrays shaped like
    ``abstract_state``, the other items as JSON."""
    out = {}
    if "state" in items:
        target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_state)
        out["state"] = ocp.args.StandardRestore(target)
    out.update({k: ocp.args.JsonRestore() for k in items if k != "state"})
    return out


class _Unreadable(Exception):
    """What is wrong with one checkpoint on this process (the message names it)."""


def _oneline(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def _read_here(directory: str, step: int, args: dict[str, ocp.args.CheckpointArgs]) -> dict:
    """Reads the items ``args`` names of checkpoint ``step`` on this process alone, or raises
    :class:`_Unreadable` saying what failed."""
    path = os.path.join(directory, str(step))
    if not os.path.isdir(path):
        raise _Unreadable("its directory is gone")
    # Orbax writes a commit marker into the step directory and into each item directory when a
    # save completes, but on a local disk it trusts the directory's final name (atomic rename)
    # and reads without the markers. Asking with the commit-file protocol (what orbax uses on
    # object stores) checks that they are there: a copy of a workdir cut short may lack them.
    commit_file = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
    for item in args:
        if not os.path.isdir(os.path.join(path, item)):
            raise _Unreadable(f"item '{item}' is missing")
    for where, label in [(path, "the checkpoint"),
                         *((os.path.join(path, item), f"item '{item}'") for item in args)]:
        if not ocp.step.is_path_finalized(where, atomicity_options=commit_file):
            raise _Unreadable(f"{label} has no commit marker ({COMMIT_MARKER}): its save or its "
                              "copy did not finish")
    # Written by hand: orbax's reader of this file logs an error and carries on without it
    try:
        with open(os.path.join(path, STEP_METADATA)) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise _Unreadable(f"{STEP_METADATA}: {_oneline(e)}") from None
    # a Checkpointer of this process alone: orbax's restore ends with a barrier of all
    # processes, which a process whose read failed would never reach (its handlers read
    # without barriers)
    me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                            active_processes={jax.process_index()})
    out = {}
    _quiet_echoes(path)
    _ECHOES["reading"] = True
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                              multiprocessing_options=me) as ckptr:
            for item, arg in args.items():  # one at a time, to say which item failed
                try:
                    out[item] = ckptr.restore(path, args=ocp.args.Composite(**{item: arg}))[item]
                except Exception as e:  # whatever a damaged file makes orbax / tensorstore raise
                    _ECHOES["failed"] = True
                    raise _Unreadable(f"item '{item}': {_oneline(e)}") from None
    finally:
        _ECHOES["reading"] = False
    return out


_ECHOES = {"paths": set(), "installed": False, "failed": False, "reading": False}


def _quiet_echoes(path: str) -> None:
    """Drops the late echoes of a failed read of checkpoint ``path`` (called before reading
    it), which is reported in one line. Orbax reads an item's arrays as asyncio tasks on an
    event loop of its own and, at the first failure, closes that loop while tensorstore still
    finishes the other reads: their callbacks find the loop closed (an unraisable "Event loop is
    closed" RuntimeError, printed with a traceback by tensorstore's threads, possibly before the
    failure reaches this module) and asyncio logs each task whose error nobody retrieved, with
    its traceback, whenever it is collected (mid-training, or at exit). Only these are dropped:
    that unraisable error while a checkpoint is read or after one failed, and asyncio's "never
    retrieved" records whose error names a checkpoint read here."""
    import logging
    import sys

    _ECHOES["paths"].add(os.path.join(path, ""))
    if _ECHOES["installed"]:
        return
    _ECHOES["installed"] = True
    previous = sys.unraisablehook

    def unraisable(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
                and (_ECHOES["failed"] or _ECHOES["reading"])):
            previous(u)

    def keep(record) -> bool:
        if not record.getMessage().startswith("Task exception was never retrieved"):
            return True
        error = str(record.exc_info[1]) if record.exc_info else record.getMessage()
        return not any(p in error for p in _ECHOES["paths"])

    sys.unraisablehook = unraisable
    logging.getLogger("asyncio").addFilter(keep)


_NOTE_BYTES = 480


def _agree(what: str | None) -> str | None:
    """What failed reading one checkpoint on any process of the job (None: every process read
    it): the processes accept or refuse a checkpoint together."""
    if jax.process_count() == 1:
        return what
    from jax.experimental import multihost_utils

    row = np.zeros(_NOTE_BYTES + 1, np.uint8)
    if what is not None:
        text = what.encode()[:_NOTE_BYTES]
        row[0] = 1
        row[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row))
    for p, r in enumerate(rows):
        if r[0]:
            text = bytes(r[1:]).rstrip(b"\0").decode(errors="replace")
            return text if p == 0 else f"on process {p}: {text}"
    return None


def read(directory: str, step: int, args: dict[str, ocp.args.CheckpointArgs]):
    """(items, None) where every process restored the items ``args`` names of checkpoint
    ``step`` completely, else (None, what failed)."""
    try:
        out, what = _read_here(directory, step, args), None
    except _Unreadable as e:
        out, what = None, str(e)
    what = _agree(what)
    return (None, what) if what is not None else (out, None)


def _set_aside(directory: str, step: int) -> str:
    """Renames checkpoint ``step`` to ``<step>.damaged`` (``.damaged-2``, ... if taken) on
    process 0, so that orbax no longer lists it; returns the new path."""
    src = os.path.join(directory, str(step))
    dst, n = src + SET_ASIDE, 1
    if is_main_process():
        while os.path.exists(dst):
            n += 1
            dst = f"{src}{SET_ASIDE}-{n}"
        try:
            os.rename(src, dst)
        except OSError as e:
            raise CheckpointError(f"checkpoint {step} cannot be restored and cannot be set aside "
                                  f"({_oneline(e)})") from e
    _sync(f"set aside checkpoint {step}")
    return dst


def newest_intact(directory: str, args: dict[str, ocp.args.CheckpointArgs], *,
                  steps=None, set_aside: bool = False) -> tuple[int, dict] | None:
    """(step, items) of the newest checkpoint that every process restores completely; None
    where there is no checkpoint at all. Each damaged newer one is named in one warning line and,
    with ``set_aside``, renamed out of orbax's sight; with none intact, raises
    :class:`NoIntactCheckpoint` and renames nothing."""
    steps = list_steps(directory) if steps is None else list(steps)
    if not steps:
        return None
    damaged = []
    for step in sorted(steps, reverse=True):
        out, what = read(directory, step, args)
        if what is None:
            break
        damaged.append((step, what))
    else:
        raise NoIntactCheckpoint(
            f"no intact checkpoint in {directory}: " +
            "; ".join(f"checkpoint {s}: {what}" for s, what in damaged) +
            ("; nothing was changed (move the damaged checkpoints elsewhere to train afresh)"
             if set_aside else ""))
    for s, what in damaged:
        aside = f"; set aside as {_set_aside(directory, s)}" if set_aside else ""
        log(f"warning: checkpoint {s} cannot be restored ({what}){aside}; using step {step}")
    return step, out


def _host_items(mesh, items: dict):
    """(state replicated on ``mesh``, data-iterator state, meta) from what :func:`read` gave."""
    return (step_lib.replicate(mesh, items["state"]), _from_jsonable(items["data"]),
            items["meta"])


def resume(workdir: str, abstract_state, mesh):
    """(step, state, data-iterator state, meta) of the newest intact checkpoint of a run,
    setting the damaged newer ones aside; None for a run without checkpoints."""
    found = newest_intact(checkpoints_dir(workdir), restore_args(abstract_state), set_aside=True)
    if found is None:
        return None
    step, items = found
    return (step, *_host_items(mesh, items))


def restore_checkpoint(workdir: str, step: int, abstract_state, mesh):
    """(state replicated on ``mesh``, data-iterator state, meta) of checkpoint ``step``;
    :class:`DamagedCheckpoint` if it cannot be restored."""
    directory = checkpoints_dir(workdir)
    items, what = read(directory, step, restore_args(abstract_state))
    if what is not None:
        raise DamagedCheckpoint(f"checkpoint {step} in {directory} cannot be restored ({what})")
    return _host_items(mesh, items)


# ------------------------------------------------------------------------------ writing

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


class Saver:
    """Saves of a run, and what became of them: orbax writes a checkpoint in the background;
    :meth:`check` (every step, no waiting) and :meth:`wait` raise :class:`SaveFailed` naming
    the cause and the last complete checkpoint once it failed. Orbax deletes the checkpoints that
    the keep-policy drops only after the new one has been written, so a failed save leaves them
    all. The run stops there rather than retrying at the next interval: a full disk or a
    permission stays so, and a run that goes on without checkpoints risks more than it saves.

    In a job of several processes a failed write leaves orbax's threads of that save waiting at
    barriers for the other processes (which wait for them in turn, up to orbax's timeouts of
    minutes); the command line then exits at once (``train.__main__``), and the other processes
    stop as after a crash of this one."""

    def __init__(self, mngr: ocp.CheckpointManager, workdir: str):
        self.mngr, self.workdir = mngr, workdir
        self.good = mngr.latest_step()  # the newest checkpoint known to be complete
        self.pending = None  # the step being written in the background

    def _failed(self, step: int, e: BaseException) -> SaveFailed:
        where = (f"the last complete checkpoint is step {self.good} in "
                 f"{checkpoints_dir(self.workdir)}; run the same command again to resume from it"
                 if self.good is not None else "no checkpoint had been completed")
        what = f"checkpoint {step}" if step is not None else "a checkpoint"
        return SaveFailed(f"saving {what} failed ({_oneline(_root_cause(e))}); the "
                          f"run stopped; the checkpoints written before are intact, {where}")

    def wait(self) -> None:
        """Waits for the save in the background; raises :class:`SaveFailed` if it failed."""
        # orbax's wait joins threads that, where a write failed in a job of several processes,
        # wait at barriers the failed process never reaches: watch for the failure meanwhile
        while self.pending is not None and self.mngr.is_saving_in_progress():
            self.check()
            time.sleep(0.02)
        try:
            self.mngr.wait_until_finished()
        except Exception as e:
            raise self._failed(self.pending, e) from e
        if self.pending is not None:
            self.good, self.pending = self.pending, None

    def check(self) -> None:
        """Raises :class:`SaveFailed` if the save in the background has failed (no waiting)."""
        try:
            self.mngr.check_for_errors()
        except Exception as e:
            raise self._failed(self.pending, e) from e

    def save(self, step: int, state, data_state, meta, metrics=None) -> None:
        self.wait()
        try:
            save(self.mngr, step, state, data_state, meta, metrics)
        except Exception as e:
            raise self._failed(step, e) from e
        self.pending = step

    def close_quietly(self) -> None:
        """Waits for the save in the background and closes the manager while another error is
        being reported (a failed save leaves orbax threads that would otherwise end in
        tracebacks at exit). Not in a job of several processes: there that waits at barriers
        that the other processes may never reach."""
        if jax.process_count() > 1:
            return
        try:
            self.mngr.close()
        except Exception:
            pass


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` chain (where a library wrapped the I/O
    error that caused it)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def export_weights(path: str, recipe: Recipe, model: step_lib.ModelDef, params, model_state) -> str:
    """Writes a Flax model directory at ``path`` (replacing one already there). It is written
    at ``<path>.partial`` and renamed into place once complete: a failed write
    (:class:`SaveFailed`) leaves the previous export as it was."""
    path = os.path.abspath(path)
    module = model.module(jax.device_get(params), jax.device_get(model_state), train=False)
    partial, old = path + ".partial", path + ".old"
    if is_main_process():
        for p in (partial, old):  # left by an export that failed or was killed
            if os.path.exists(p):
                shutil.rmtree(p)
    _sync(f"export {path} start")
    try:
        # every process takes part (orbax's save is a collective); process 0 writes the files
        fcheckpoints.save_model(partial, recipe.model, module, dict(recipe.model_overrides))
    except Exception as e:
        if is_main_process():
            shutil.rmtree(partial, ignore_errors=True)
        raise SaveFailed(f"writing the model export {path} failed "
                         f"({_oneline(_root_cause(e))}); the export there before is unchanged") from e
    if is_main_process():
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    _sync(f"export {path} done")
    return path


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def _best_step(directory: str, steps) -> int | None:
    """The best step the newest readable ``meta`` item names (that item alone is read)."""
    for step in sorted(steps, reverse=True):
        items, _ = read(directory, step, restore_args(None, items=("meta",)))
        if items is not None:
            return items["meta"].get("best_step")
    return None


def load_checkpoint(recipe: Recipe, workdir: str, which: str = "best", devices=None):
    """(step, state, model, mesh) of a checkpoint of ``workdir``: 'best', 'latest' or a step.

    'latest' is the newest intact checkpoint; 'best' the best validation step, or the newest
    intact checkpoint (with a warning) if that one cannot be restored; a step number must
    restore itself (:class:`DamagedCheckpoint` if not). Damaged checkpoints are left in place.
    """
    directory = checkpoints_dir(workdir)
    if which not in ("best", "latest"):
        try:
            asked = int(which)
        except ValueError:
            raise CheckpointError(f"--checkpoint must be best, latest or a step number, "
                                  f"not {which!r}") from None
    mesh, model, tx = step_lib.setup(recipe, devices)
    abstract = step_lib.abstract_state(model, tx, recipe.ema_decay > 0)
    args = restore_args(abstract)
    steps = list_steps(directory)
    if not steps:
        raise NoIntactCheckpoint(f"no checkpoint in {directory}")
    found = None
    if which == "best":
        best = _best_step(directory, steps)
        if best is not None and best in steps:
            items, what = read(directory, best, args)
            if what is None:
                found = best, items
            else:
                log(f"warning: the best checkpoint (step {best}) cannot be restored ({what}); "
                    "using the newest intact checkpoint instead")
                steps = [s for s in steps if s != best]
        found = found or newest_intact(directory, args, steps=steps)
    elif which == "latest":
        found = newest_intact(directory, args, steps=steps)
    else:
        if asked not in steps:
            raise DamagedCheckpoint(f"no checkpoint for step {asked} in {directory}; have "
                                    f"{sorted(steps)}")
        items, what = read(directory, asked, args)
        if what is not None:
            raise DamagedCheckpoint(f"checkpoint {asked} in {directory} cannot be restored "
                                    f"({what})")
        found = asked, items
    if found is None:  # only checkpoints of which the best was one, and it is damaged
        raise NoIntactCheckpoint(f"no intact checkpoint in {directory}")
    step, items = found
    return step, _host_items(mesh, items)[0], model, mesh


def export_checkpoint(recipe: Recipe, workdir: str, out: str, *, which: str = "best",
                      devices=None) -> str:
    """Writes the weights of a checkpoint (EMA weights if the recipe keeps them) as a Flax model
    directory, which ``python -m porting export`` converts to a PyTorch file."""
    step, state, model, mesh = load_checkpoint(recipe, workdir, which, devices)
    return export_weights(os.path.abspath(out), recipe, model, eval_params(recipe, state),
                          state["model_state"])
