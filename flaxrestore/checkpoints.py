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
    """Writes ``module``'s weights under ``directory`` (created; must not hold a model already)."""
    directory = os.path.abspath(os.fspath(directory))
    models.entry(name)  # validate the name
    os.makedirs(directory, exist_ok=True)
    state_dir = os.path.join(directory, "state")
    if os.path.exists(state_dir):
        raise FileExistsError(f"{directory} already holds a model checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(state_dir, nnx.to_pure_dict(weights_state(module)))
        ckptr.wait_until_finished()
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
