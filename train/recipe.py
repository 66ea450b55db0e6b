"""Training recipes: a frozen dataclass per run, loaded from ``train/configs/NAME.py``.

A config file holds, in its docstring, the command that runs it, and defines
``get_config(arg: str | None = None) -> Recipe``. ``--config NAME:ARG`` passes ``ARG`` (e.g. a
noise level). ``--set key=value`` overrides any field afterwards, with dotted paths into the
nested configs (``optimizer.lr=1e-3``, ``data.root=/data/GoPro``, ``model_overrides.dim=16``,
``stages=()``); values are Python literals, anything else is taken as a string.

All batch sizes are global (summed over every device of every host), as the papers state them
for their multi-GPU runs.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import os
import pkgutil
import types
from typing import Any, Mapping, Sequence

from train.schedules import OptimizerConfig, ScheduleConfig

__all__ = ["LossTerm", "MixupConfig", "OptimizerConfig", "Recipe", "ScheduleConfig", "Stage",
           "apply_overrides", "data_config", "data_module", "list_configs", "load"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A progressive-training stage: used for 1-based iterations up to ``until`` (inclusive)."""

    until: int
    patch_size: int
    batch_size: int


@dataclasses.dataclass(frozen=True)
class MixupConfig:
    """Mixing augmentation of (lq, gt) pairs inside the train step.

    kind 'none'; 'batch': one ``lam ~ Beta(alpha, alpha)`` for the whole batch and a random
    permutation, applied with probability ``prob`` (Restormer: alpha 1.2, prob 0.5);
    'per_sample': one ``lam`` per sample (MPRNet: alpha 0.6). From 0-based step ``start_step`` on.
    """

    kind: str = "none"
    alpha: float = 1.2
    prob: float = 1.0
    start_step: int = 0


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One weighted term of the training loss (see ``train.step.LOSS_KINDS``).

    ``outputs``: 'main' (the restored image), 'all' (summed over every output the model returns,
    MPRNet's three stages) or 'side' (DarkIR's 1/8-scale side output, nearest-upsampled x8).
    ``clamp`` clamps predictions to [0, 1] first (MPRNet denoising). ``options`` are the kind's
    keyword arguments (``eps``, ``reduction``, ...).
    """

    kind: str
    weight: float = 1.0
    outputs: str = "main"
    clamp: bool = False
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str = ""
    description: str = ""
    # model: a registry name and overrides of its config fields (tiny widths for demos)
    model: str = "restormer:motion_deblurring"
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # keyword arguments of train.data.DataConfig for training and validation
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    val_data: Mapping[str, Any] | None = None
    # the module providing DataConfig, make_train_iterator and make_val_dataset (your own
    # datasets plug in here with the same three names)
    data_module: str = "train.data"
    batch_size: int = 8
    total_steps: int = 1000
    stages: tuple[Stage, ...] = ()
    losses: tuple[LossTerm, ...] = (LossTerm("l1"),)
    optimizer: OptimizerConfig = OptimizerConfig()
    mixup: MixupConfig = MixupConfig()
    ema_decay: float = 0.0
    seed: int = 0
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    # recompute block activations in the backward pass (Restormer's transformer blocks, MPRNet's
    # CABs; flaxrestore.layers.rematerialize): less memory, about one more forward of compute
    remat: bool = False
    # gradient accumulation: each device's batch is split into this many micro-batches, run one
    # after another (a scan), their gradients summed and ONE optimizer update applied, equal to
    # the full batch's step: activation memory of a micro-batch, the time of the full batch.
    # Refused for loss terms that are no sum or mean over samples and for models with batch
    # statistics (train.step.grad_accum_problems). Every stage's per-device batch must split.
    grad_accum: int = 1
    # precision of float32 matmuls and convolutions in the train and eval steps: "default" (JAX's
    # own: on Ampere/Hopper GPUs TF32 on the tensor cores, on TPUs one bfloat16 MXU pass, on CPUs
    # full float32), or "high" / "highest" (jax.default_matmul_precision: 3 bfloat16 passes /
    # full float32, several times slower on GPUs and TPUs)
    matmul_precision: str = "default"
    # validation
    eval_every: int = 1000
    eval_crop_border: int = 0
    eval_y_channel: bool = False
    eval_max_images: int = 0  # 0: all
    eval_clamp: bool = True  # clamp outputs to [0, 1] before the metrics
    best_metric: str = "psnr"
    # checkpoints and logs
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 50
    # path of VGG19 ImageNet weights for perceptual / contrastive terms (never downloaded)
    vgg_weights: str | None = None

    @property
    def model_family(self) -> str:
        return self.model.split(":", 1)[0]

    def stage_at(self, t: int) -> Stage:
        """The stage of 1-based iteration ``t``: the first whose boundary is >= t."""
        if not self.stages:
            return Stage(self.total_steps, int(self.data.get("patch_size", 0)), self.batch_size)
        for s in self.stages:
            if t <= s.until:
                return s
        return self.stages[-1]

    def validate(self, num_devices: int = 1, process_count: int = 1) -> None:
        problems = []
        sizes = [self.batch_size] + [s.batch_size for s in self.stages]
        for b in sizes:
            if b % num_devices:
                problems.append(f"batch size {b} is not divisible by the {num_devices} data-parallel "
                                "devices")
            if b % process_count:
                problems.append(f"batch size {b} is not divisible by the {process_count} hosts")
        if self.matmul_precision not in ("default", "high", "highest"):
            problems.append(f"matmul_precision must be default, high or highest, got "
                            f"{self.matmul_precision!r}")
        n = self.grad_accum
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            problems.append(f"grad_accum must be an integer >= 1, got {n!r}")
        elif n > 1:
            # the batches that are trained: the stages' (the loaded batch is only cropped from)
            for b in sorted({s.batch_size for s in self.stages} or {self.batch_size}):
                if b % num_devices == 0 and (b // num_devices) % n:
                    problems.append(
                        f"batch size {b} is {b // num_devices} per device on {num_devices} "
                        f"device(s), which does not split into grad_accum={n} micro-batches")
        patch = self.data.get("patch_size")
        for s in self.stages:
            if s.batch_size > self.batch_size:
                problems.append(f"stage batch {s.batch_size} exceeds the loaded batch {self.batch_size}")
            if patch is not None and s.patch_size > patch:
                problems.append(f"stage patch {s.patch_size} exceeds the loaded patch {patch}")
        if self.stages and [s.until for s in self.stages] != sorted(s.until for s in self.stages):
            problems.append("stage boundaries must increase")
        for t in self.losses:
            if t.outputs not in ("main", "all", "side"):
                problems.append(f"loss term {t.kind}: unknown outputs {t.outputs!r} (main, all, side)")
            elif t.outputs == "side" and t.weight:
                from flaxrestore import models

                if models.protocol(self.model).side_output is None:
                    problems.append(f"loss term {t.kind} reads a side output, which "
                                    f"{self.model} does not have")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"unknown dtype {self.dtype!r}")
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# loading


def _configs_package():
    return importlib.import_module("train.configs")


def list_configs() -> list[tuple[str, str]]:
    """(name, first docstring line) of every config file in ``train/configs``."""
    pkg = _configs_package()
    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        doc = (mod.__doc__ or "").strip().splitlines()
        out.append((info.name, doc[0] if doc else ""))
    return out


def _import_config(name: str) -> types.ModuleType:
    if name.endswith(".py") and os.path.isfile(name):
        spec = importlib.util.spec_from_file_location(
            f"_train_config_{os.path.basename(name)[:-3]}", name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(f"train.configs.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"train.configs.{name}":
            raise
        known = ", ".join(n for n, _ in list_configs())
        raise KeyError(f"no recipe {name!r} in train/configs; known: {known}") from None


def load(spec: str, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe of ``NAME``, ``NAME:ARG`` or ``path/to/file.py[:ARG]``, with ``--set`` overrides."""
    name, _, arg = spec.partition(":")
    mod = _import_config(name)
    recipe = mod.get_config(arg or None)
    if not recipe.name:
        recipe = dataclasses.replace(recipe, name=spec)
    return apply_overrides(recipe, overrides)


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(old: Any, new: Any) -> Any:
    if isinstance(new, list):
        new = tuple(new)
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, tuple) and old and dataclasses.is_dataclass(old[0]) and isinstance(new, tuple):
        kind = type(old[0])
        return tuple(kind(*v) if isinstance(v, tuple) else kind(**v) if isinstance(v, dict) else v
                     for v in new)
    return new


def _set(obj: Any, path: list[str], value: Any) -> Any:
    key, rest = path[0], path[1:]
    if dataclasses.is_dataclass(obj):
        names = {f.name for f in dataclasses.fields(obj)}
        if key not in names:
            raise KeyError(f"{type(obj).__name__} has no field {key!r}; fields: {', '.join(sorted(names))}")
        old = getattr(obj, key)
        new = _set(old, rest, value) if rest else _coerce(old, value)
        return dataclasses.replace(obj, **{key: new})
    if isinstance(obj, Mapping) or obj is None:
        d = dict(obj or {})
        if rest:
            d[key] = _set(d.get(key), rest, value)
        else:
            d[key] = _coerce(d.get(key), value)
        return d
    if isinstance(obj, tuple) and key.isdigit():
        items = list(obj)
        i = int(key)
        items[i] = _set(items[i], rest, value) if rest else _coerce(items[i], value)
        return tuple(items)
    raise KeyError(f"cannot set {'.'.join(path)} inside a {type(obj).__name__}")


def apply_overrides(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        recipe = _set(recipe, key.strip().split("."), parse_value(text.strip()))
    return recipe


def data_module(recipe: Recipe) -> types.ModuleType:
    """The module that provides the recipe's data (``DataConfig``, ``make_train_iterator``,
    ``make_val_dataset``): ``train.data`` unless the recipe names another."""
    return importlib.import_module(recipe.data_module)


def data_config(recipe: Recipe, fields: Mapping[str, Any]):
    """``fields`` (``recipe.data`` or ``recipe.val_data``) as the data module's ``DataConfig``."""
    if dataclasses.is_dataclass(fields):
        return fields
    return data_module(recipe).DataConfig(**dict(fields))


def to_dict(recipe: Recipe) -> dict:
    """JSON-friendly form (for the workdir's recipe.json)."""
    return dataclasses.asdict(recipe)
