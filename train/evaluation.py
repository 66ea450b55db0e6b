"""Evaluation: validation PSNR / SSIM of whole images, with the family's test-time protocol.

:class:`Evaluator` is what the loop calls every ``eval_every`` steps; :func:`evaluate` scores a
saved checkpoint (``python -m train evaluate``). Both use the EMA weights when the recipe keeps
them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import numpy as np

from flaxrestore import models
from flaxrestore import restore as frestore
from train import checkpointing
from train import recipe as recipe_lib
from train import step as step_lib
from train.recipe import Recipe


class _Limited(Sequence):
    """The first ``n`` items of a lazily loaded validation set (all when n is 0)."""

    def __init__(self, items, n: int):
        self.items, self.n = items, (min(n, len(items)) if n else len(items))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        item = self.items[i % self.n]
        return {"lq": np.asarray(item["lq"], np.float32), "gt": np.asarray(item["gt"], np.float32),
                "name": str(item.get("name", i))}


def load_val_set(recipe: Recipe) -> Sequence:
    """The validation pairs (loaded lazily, one at a time, as the evaluation reaches them)."""
    if recipe.val_data is None:
        return []
    mod = recipe_lib.data_module(recipe)
    return _Limited(mod.make_val_dataset(recipe_lib.data_config(recipe, recipe.val_data)),
                    recipe.eval_max_images)


class Evaluator:
    """Validation PSNR / SSIM of whole images with the family's test-time protocol.

    Images are padded (bottom/right) to the model's multiple as the official test scripts do,
    batched by padded shape with one image per device, run sharded over the mesh, cropped back
    and (``eval_clamp``) clamped to [0, 1]. The set is streamed: at most one batch per distinct
    shape is held in memory.
    """

    def __init__(self, recipe: Recipe, model: step_lib.ModelDef, mesh, val_set: Sequence):
        from flaxrestore import metrics

        self.recipe, self.mesh, self.val_set = recipe, mesh, val_set
        self.protocol = models.protocol(recipe.model)
        self.fn = step_lib.make_eval_fn(recipe, model, mesh)
        self.n = mesh.size
        kw = dict(crop_border=recipe.eval_crop_border, y_channel=recipe.eval_y_channel)
        self.psnr = jax.jit(lambda a, b: metrics.psnr(a, b, **kw))
        self.ssim = jax.jit(lambda a, b: metrics.ssim(a, b, **kw))


    def _run(self, params, model_state, group: list) -> list[np.ndarray]:
        """Restores up to ``n`` prepared items of one padded shape (one per device)."""
        sharding = step_lib.batch_sharding(self.mesh)
        full = group + [group[-1]] * (self.n - len(group))
        arrays = []
        for j in range(len(group[0][2])):
            stacked = np.concatenate([inputs[j] for _, _, inputs, _ in full], axis=0)
            arrays.append(jax.make_array_from_callback(stacked.shape, sharding,
                                                       lambda ix, a=stacked: a[ix]))
        out = np.asarray(jax.device_get(self.fn(params, model_state, tuple(arrays))))
        results = []
        for k, (_, _, _, (h, w)) in enumerate(group):
            y = out[k, :h, :w]
            results.append(np.clip(y, 0.0, 1.0) if self.recipe.eval_clamp else y)
        return results

    def stream(self, params, model_state) -> Iterable[tuple[int, dict, np.ndarray]]:
        """(index, item, restored image) for the whole validation set (grouped order)."""
        pending: dict[tuple, list] = {}
        for i in range(len(self.val_set)):
            item = self.val_set[i]
            x = item["lq"][None]
            extras = frestore.host_extra_inputs(self.protocol, x)
            inputs = [frestore.pad_to_multiple(a, self.protocol) for a in [x, *extras]]
            key = tuple(a.shape for a in inputs)
            group = pending.setdefault(key, [])
            group.append((i, item, inputs, x.shape[1:3]))
            if len(group) == self.n:
                for (j, it, _, _), y in zip(group, self._run(params, model_state, group)):
                    yield j, it, y
                del pending[key]
        for group in pending.values():
            for (j, it, _, _), y in zip(group, self._run(params, model_state, group)):
                yield j, it, y

    def restore_all(self, params, model_state) -> list[np.ndarray]:
        """The restored image of every validation item, in the set's order (host numpy, HWC)."""
        out = {i: y for i, _, y in self.stream(params, model_state)}
        return [out[i] for i in range(len(out))]

    def __call__(self, params, model_state) -> dict[str, float]:
        ps, ss = [], []
        for _, item, y in self.stream(params, model_state):
            ps.append(float(self.psnr(y, item["gt"])))
            ss.append(float(self.ssim(y, item["gt"])))
        if not ps:
            return {}
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}

    def baseline(self) -> dict[str, float]:
        """PSNR / SSIM of the degraded inputs themselves (what "no restoration" scores)."""
        ps, ss = [], []
        for i in range(len(self.val_set)):
            it = self.val_set[i]
            if it["lq"].shape != it["gt"].shape:
                return {}
            ps.append(float(self.psnr(it["lq"], it["gt"])))
            ss.append(float(self.ssim(it["lq"], it["gt"])))
        if not ps:
            return {}
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}


def evaluate(recipe: Recipe, workdir: str, *, which: str = "best", devices=None) -> dict[str, float]:
    """Validation metrics of a checkpoint of ``workdir``: 'best', 'latest' or a step number."""
    step, state, model, mesh = checkpointing.load_checkpoint(recipe, workdir, which, devices)
    val_set = load_val_set(recipe)
    if not val_set:
        raise ValueError(f"recipe {recipe.name} has no validation data (val_data)")
    evaluator = Evaluator(recipe, model, mesh, val_set)
    params = checkpointing.eval_params(recipe, state)
    values = evaluator(params, state["model_state"])
    values["step"] = step
    values["images"] = len(val_set)
    return values
