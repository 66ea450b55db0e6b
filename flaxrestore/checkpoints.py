"""Flax model checkpoints: an orbax directory of the module's weights plus the model's name.

Layout of a model directory::

    DIR/model.json     {"name": "restormer:motion_deblurring", "overrides": {...}, "format": 1}
    DIR/state/         orbax StandardCheckpointer of nnx.state(module, nnx.Param, nnx.BatchStat)

``python -m porting convert`` writes it, the trainer exports it, ``flaxrestore restore`` reads it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flaxrestore import models

FORMAT = 1
WEIGHT_TYPES = (nnx.Param, nnx.BatchStat)


def weights_state(module: nnx.Module) -> nnx.State:
    return nnx.state(module, nnx.Any(*WEIGHT_TYPES))


def save_model(directory: str | os.PathLike, name: str, module: nnx.Module,
               overrides: dict[str, Any] | None = None) -> str:
    """Writes ``module``'s weights under ``directory`` (created; must not hold a model already).

    In a job of several processes every process calls it with the same (replicated) weights, as
    orbax's save is a collective; process 0 alone creates the directory and writes the files, so
    ``directory`` must be storage that every process sees (a shared file system, a bucket).
    """
    directory = os.path.abspath(os.fspath(directory))
    models.entry(name)  # validate the name
    state_dir = os.path.join(directory, "state")
    if os.path.exists(state_dir):
        raise FileExistsError(f"{directory} already holds a model checkpoint")
    primary = jax.process_index() == 0
    if jax.process_count() > 1:  # every process has looked before process 0 starts writing
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"flaxrestore save_model {directory}")
    if primary:
        os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(state_dir, nnx.to_pure_dict(weights_state(module)))
        ckptr.wait_until_finished()
    if primary:
        meta = {"format": FORMAT, "name": name, "overrides": overrides or {}}
        with open(os.path.join(directory, "model.json"), "w") as f:
            json.dump(meta, f, indent=2)
    return directory


def is_model_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "model.json"))


def read_meta(directory: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(directory), "model.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a flaxrestore model directory (no model.json)")
    with open(path) as f:
        return json.load(f)


def load_model(directory: str | os.PathLike, name: str | None = None) -> nnx.Module:
    """Rebuilds the module saved by :func:`save_model`; ``name`` must agree if given."""
    directory = os.path.abspath(os.fspath(directory))
    meta = read_meta(directory)
    if name is not None and name != meta["name"]:
        raise ValueError(f"{directory} holds {meta['name']!r}, not {name!r}")
    overrides = {k: tuple(v) if isinstance(v, list) else v  # JSON turned tuples into lists
                 for k, v in meta.get("overrides", {}).items()}
    module = models.create_abstract(meta["name"], **overrides)
    target = nnx.to_pure_dict(weights_state(module))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(directory, "state"), target)
    state = weights_state(module)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(module, state)
    return module


def _flat_weights(module: nnx.Module) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(weights_state(module))
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}


def save_safetensors(path: str | os.PathLike, name: str, module: nnx.Module,
                     overrides: dict[str, Any] | None = None) -> str:
    """Writes the Flax weights (NNX paths joined by '.', Flax layouts) to a safetensors file."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    save_file({k: np.ascontiguousarray(v) for k, v in _flat_weights(module).items()}, path,
              metadata={"flaxrestore_model": name, "format": str(FORMAT),
                        "flaxrestore_overrides": json.dumps(overrides or {})})
    return path


def load_safetensors(path: str | os.PathLike, name: str | None = None, **overrides) -> nnx.Module:
    """Reads a file written by :func:`save_safetensors`; strict on keys, shapes and dtypes."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = os.fspath(path)
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    stored = meta.get("flaxrestore_model")
    if name is None:
        if stored is None:
            raise ValueError(f"{path} does not say which model it holds; pass the model name")
        name = stored
    elif stored is not None and stored != name:
        raise ValueError(f"{path} holds {stored!r}, not {name!r}")
    if not overrides and stored == name:
        overrides = {k: tuple(v) if isinstance(v, list) else v
                     for k, v in json.loads(meta.get("flaxrestore_overrides", "{}")).items()}
    arrays = load_file(path)
    module = models.create_abstract(name, **overrides)
    flat = nnx.to_flat_state(weights_state(module))
    keys = {".".join(map(str, p)) for p, _ in flat}
    missing, unexpected = sorted(keys - set(arrays)), sorted(set(arrays) - keys)
    bad = [f"{k}: {arrays[k].shape} vs {tuple(v.shape)}" for p, v in flat
           if (k := ".".join(map(str, p))) in arrays and arrays[k].shape != tuple(v.shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{path} does not match {name!r}: missing {missing[:20]}, "
                         f"unexpected {unexpected[:20]}, shape mismatches {bad[:20]}")
    for p, v in flat:
        v.set_value(jax.numpy.asarray(arrays[".".join(map(str, p))]))
    nnx.update(module, nnx.from_flat_state(flat))
    return module
