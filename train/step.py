"""The jitted train and eval steps over a device mesh, and what they need.

One code path from one CPU to a TPU pod: a 1-D mesh ``('data',)`` over every device of every
host (``jax.make_mesh``), the batch sharded on ``'data'``, parameters, optimizer state and EMA
replicated, the state buffers donated to the step. Multi-host runs assemble each host's part of
the batch into one global array with ``jax.make_array_from_process_local_data``. XLA inserts the
gradient all-reduce; there is no pmap and no hand-written collective.

The train state is a plain pytree (pure dicts of arrays), so orbax saves and restores it as is::

    {"step": int32[], "params": {...}, "model_state": {...}, "opt_state": ..., "ema": {...}}

``model_state`` holds the model's non-parameter variables (AECR-Net's FastDeconv running
statistics, updated by the training forward); ``ema`` is empty unless the recipe sets
``ema_decay``. Random numbers of step ``t`` come from ``fold_in(key(seed), t)``, so a resumed
run draws exactly what an uninterrupted one would. With ``grad_accum`` N > 1 the step runs each
device's batch as N micro-batches in a ``lax.scan`` and applies one update, the full batch's
(``make_train_step``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxrestore import layers as flayers
from flaxrestore import lowering
from flaxrestore import losses as flosses
from flaxrestore import models
from train import schedules
from train.recipe import LossTerm, MixupConfig, Recipe

DATA_AXIS = "data"



# --------------------------------------------------------------------------------------------
# mesh and sharding


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over ``devices`` (default: every device of every host)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's rows of the batch -> global arrays sharded on 'data' (works on 1 to N hosts)."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def replicate(mesh, tree):
    """Places a host-side pytree (identical on every host) replicated on the mesh."""
    sharding = replicated(mesh)

    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(sharding, a, a.shape)

    return jax.tree.map(put, tree)


# --------------------------------------------------------------------------------------------
# model


@dataclasses.dataclass
class ModelDef:
    """The static halves of a model (train- and eval-mode graphdefs) and its initial weights."""

    name: str
    overrides: dict
    train_graph: Any
    eval_graph: Any
    params: dict
    model_state: dict
    cls: type

    def module(self, params, model_state=None, *, train: bool = False) -> nnx.Module:
        graph = self.train_graph if train else self.eval_graph
        return nnx.merge(graph, params, model_state if model_state is not None else self.model_state)


def build_model(recipe: Recipe, seed: int | None = None) -> ModelDef:
    """The model's graphdefs (train and eval mode) and freshly initialised weights (torch-style
    init, seeded; the values depend only on the seed)."""
    overrides = dict(recipe.model_overrides)
    seed = recipe.seed if seed is None else seed
    module = models.create(recipe.model, rngs=nnx.Rngs(seed), **overrides)
    module.train()
    train_graph, params, rest = nnx.split(module, nnx.Param, ...)
    module.eval()
    eval_graph, _, _ = nnx.split(module, nnx.Param, ...)
    return ModelDef(recipe.model, overrides, train_graph, eval_graph, nnx.to_pure_dict(params),
                    nnx.to_pure_dict(rest), type(module))


def setup(recipe: Recipe, devices: Sequence[jax.Device] | None = None):
    """(mesh, model, optimizer) of a run of ``recipe`` on ``devices`` (all by default), after
    checking that the recipe suits that many devices and hosts."""
    mesh = make_mesh(devices)
    recipe.validate(num_devices=mesh.size, process_count=jax.process_count())
    model = build_model(recipe)
    check_grad_accum(recipe, model)
    return mesh, model, schedules.make_optimizer(recipe.optimizer)


def split_module(module: nnx.Module) -> tuple[dict, dict]:
    _, params, rest = nnx.split(module, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _cast_floating(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        tree)


# --------------------------------------------------------------------------------------------
# losses


@dataclasses.dataclass
class Outputs:
    """The model's outputs, normalised: ``main`` the restored image, ``all`` every image output
    (MPRNet: stage 3, 2, 1), ``side`` DarkIR's low-resolution side output (or None)."""

    main: jax.Array
    all: tuple[jax.Array, ...]
    side: jax.Array | None = None


def wants_side_output(recipe: Recipe) -> bool:
    """Whether a loss term of the recipe reads the model's training side output."""
    return any(t.weight and t.outputs == "side" for t in recipe.losses)


def run_forward(module: nnx.Module, lq: jax.Array, *, side: bool = False) -> Outputs:
    """The model on ``lq`` through its calling protocol (extra inputs, which output is the
    image); ``side=True`` also asks for the training side output the protocol names."""
    protocol = models.protocol(module)
    inputs = protocol.inputs(lq)
    if side:
        if protocol.side_output is None:
            raise ValueError(f"{type(module).__name__} has no side output")
        side_out, out = module(*inputs, **{protocol.side_output: True})
        return Outputs(out, (out,), side_out)
    images = tuple(protocol.images(module(*inputs)))
    return Outputs(images[0], images)


LossFn = Callable[..., jax.Array]


class LossKind(NamedTuple):
    """One kind of loss term: ``fn(pred, gt, lq, vgg, **options)``, whether it needs the VGG19,
    and how its value reduces over the batch, which gradient accumulation needs to add
    micro-batches up to the full batch: 'mean' (each of N micro-batches counts 1/N), 'sum'
    (micro-batch values add up) or 'none' (not over samples: refused with ``grad_accum`` > 1,
    ``why`` says why); or a function of the term's options giving one of these."""

    fn: LossFn
    vgg: bool
    batch: str | Callable[[Mapping[str, Any]], str]
    why: str = ""


# every kind from flaxrestore.losses
LOSS_KINDS: dict[str, LossKind] = {
    "l1": LossKind(lambda p, g, lq, vgg: flosses.l1(p, g), False, "mean"),
    "mse": LossKind(lambda p, g, lq, vgg: jnp.mean(jnp.square(p - g)), False, "mean"),
    # MPRNet: mean of sqrt(d^2 + eps^2), eps 1e-3
    "charbonnier": LossKind(lambda p, g, lq, vgg, **kw: flosses.charbonnier(p, g, **kw), False,
                            "mean"),
    # SNR-Aware: sum of sqrt(d^2 + 1e-6)
    "charbonnier_sum": LossKind(
        lambda p, g, lq, vgg, **kw: flosses.charbonnier_sum(p, g, **kw), False, "sum"),
    # MPRNet: Charbonnier (mean) between one-level Laplacian-pyramid residuals of each image
    "edge": LossKind(lambda p, g, lq, vgg, **kw: flosses.edge_loss(p, g, **kw), False, "mean"),
    # DarkIR: MSE between the same Laplacian residuals
    "laplacian_mse": LossKind(lambda p, g, lq, vgg: flosses.darkir_edge_loss(p, g), False,
                              "mean"),
    # DarkIR (off in its LOLBlur recipe): MSE of |rfft2| amplitudes (per image, over H and W)
    "frequency": LossKind(lambda p, g, lq, vgg: flosses.frequency_amplitude_loss(p, g), False,
                          "mean"),
    # VGG19 relu1_1..relu5_1 L1s (SNR-Aware reduction 'sum', DarkIR 'mean')
    "perceptual": LossKind(lambda p, g, lq, vgg, **kw: flosses.perceptual(p, g, vgg, **kw), True,
                           lambda opts: opts.get("reduction", "mean")),
    # AECR-Net: the negative is the hazy input itself. Each VGG level divides two means over
    # the whole batch, which no sum of micro-batch values gives (the ablation, without the
    # negatives, is a plain mean)
    "contrastive": LossKind(
        lambda p, g, lq, vgg, **kw: flosses.contrastive_regularization(p, g, lq, vgg, **kw), True,
        lambda opts: "mean" if opts.get("ablation") else "none",
        why="AECR-Net's contrastive regularization divides two means over the whole batch "
            "(anchor-positive over anchor-negative VGG distance), which no sum of "
            "micro-batch values gives"),
}


def _options(term: LossTerm) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(term.options).items()}


def _kind(term: LossTerm) -> LossKind:
    if term.kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {term.kind!r}; known: {', '.join(LOSS_KINDS)}")
    return LOSS_KINDS[term.kind]


def _term_fn(term: LossTerm) -> LossFn:
    """``fn(pred, gt, lq, vgg) -> scalar`` for one term (before its weight)."""
    fn = _kind(term).fn
    opts = _options(term)
    return lambda p, g, lq, vgg: fn(p, g, lq, vgg, **opts)


def batch_reduction(term: LossTerm) -> str:
    """How ``term``'s value reduces over the batch: 'mean', 'sum' or 'none' (see LossKind)."""
    batch = _kind(term).batch
    reduction = batch(_options(term)) if callable(batch) else batch
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss term {term.kind}: unknown batch reduction {reduction!r}")
    return reduction


def needs_vgg(recipe: Recipe) -> bool:
    return any(t.weight and t.kind in LOSS_KINDS and LOSS_KINDS[t.kind].vgg for t in recipe.losses)


def _part_names(terms: Sequence[LossTerm]) -> list[str]:
    """The metric name of each term's value: ``loss_<kind>[_<outputs>][_<index>]``."""
    names: list[str] = []
    for i, t in enumerate(terms):
        names.append(f"loss_{t.kind}" + (f"_{t.outputs}" if t.outputs != "main" else "") +
                     (f"_{i}" if f"loss_{t.kind}" in names else ""))
    return names


def make_loss(recipe: Recipe, micro_batches: int = 1) -> Callable[
        [Outputs, jax.Array, jax.Array, Any], tuple[jax.Array, dict]]:
    """total loss and its named terms from the model outputs, the target and the input, in
    float32 (float64 where the target is, as in the float64 tests).

    ``micro_batches`` N > 1: the loss of one of N equal micro-batches, scaled so that the N
    values add up to the full batch's: a term that averages over the batch counts 1/N, one that
    sums over it counts fully (``batch_reduction``); any other term is refused. The returned
    function's ``part_names`` lists the keys of its terms."""
    terms = [t for t in recipe.losses if t.weight]
    fns = [_term_fn(t) for t in terms]
    names = _part_names(terms)
    scales = [1.0] * len(terms)
    if micro_batches > 1:
        for i, t in enumerate(terms):
            reduction = batch_reduction(t)
            if reduction == "none":
                raise ValueError(f"loss term {t.kind} does not add up over micro-batches: "
                                 f"{_kind(t).why}")
            scales[i] = 1.0 / micro_batches if reduction == "mean" else 1.0

    def loss(outs: Outputs, gt, lq, vgg):
        real = jnp.promote_types(gt.dtype, jnp.float32)
        total = jnp.zeros((), real)
        parts = {}
        for t, fn, name, scale in zip(terms, fns, names, scales):
            if t.outputs == "main":
                preds = [outs.main]
            elif t.outputs == "all":
                preds = list(outs.all)
            elif t.outputs == "side":
                if outs.side is None:
                    raise ValueError(f"loss term {t.kind} wants the side output, which the "
                                     "forward did not ask for")
                factor = gt.shape[1] // outs.side.shape[1]
                preds = [flosses.upsample_nearest(outs.side, factor)]
            else:
                raise ValueError(f"unknown outputs {t.outputs!r} (main, all, side)")
            value = jnp.zeros((), real)
            for p in preds:
                p = p.astype(real)
                if t.clamp:
                    p = jnp.clip(p, 0.0, 1.0)
                value = value + fn(p, gt, lq, vgg).astype(real)
            if scale != 1.0:
                value = value * scale
            parts[name] = value
            total = total + t.weight * value
        return total, parts

    loss.part_names = tuple(names)
    return loss


def grad_accum_problems(recipe: Recipe, model_state: Mapping | None = None) -> list[str]:
    """Why ``recipe.grad_accum`` > 1 would not give the full batch's step (empty: it does):
    loss terms whose value is no sum or mean over samples, and a model with state that its
    training forward computes from the batch (``model_state``: batch statistics such as
    AECR-Net's FastDeconv whitening), which micro-batches would compute per micro-batch."""
    if recipe.grad_accum <= 1:
        return []
    problems = []
    for t in recipe.losses:
        if t.weight and t.kind in LOSS_KINDS and batch_reduction(t) == "none":
            problems.append(f"loss term {t.kind!r} (weight {t.weight:g}) is no sum or mean over "
                            f"samples: {_kind(t).why}; set its weight to 0 to accumulate")
    if model_state is not None and jax.tree.leaves(model_state):
        held = ", ".join(sorted(jax.tree_util.keystr(path) for path, _ in
                                jax.tree_util.tree_leaves_with_path(model_state)))
        problems.append(f"{recipe.model} keeps statistics of the batch ({held}: e.g. AECR-Net's "
                        "FastDeconv whitening, computed from each training batch): with "
                        "micro-batches they would be computed per micro-batch, which is not "
                        "the full batch's step")
    return problems


def check_grad_accum(recipe: Recipe, model: ModelDef) -> None:
    problems = grad_accum_problems(recipe, model.model_state)
    if problems:
        raise ValueError(f"recipe {recipe.name!r}: grad_accum={recipe.grad_accum} refused: " +
                         "; ".join(problems) + ". Use grad_accum=1 (a smaller batch or remat "
                         "saves memory instead)")


# --------------------------------------------------------------------------------------------
# VGG19 for perceptual / contrastive terms


def load_vgg(path: str | None, *, allow_random: bool = False):
    """(graphdef, params) of a VGG19 up to relu5_1 with ImageNet weights read from ``path``.

    ``path``: a ``.safetensors`` or ``.npz`` file with torchvision's keys (``features.N.weight``
    OIHW, ``features.N.bias``), e.g. written from ``vgg19-dcbb9e9d.pth`` with
    ``python -m porting`` or safetensors. Nothing is downloaded. ``path='random'`` builds an
    untrained VGG (only to exercise the plumbing in tests; such a loss is meaningless).
    """
    from flaxrestore import vgg as fvgg

    net = fvgg.VGG19(rngs=nnx.Rngs(0), num_layers=30)
    if path is None:
        raise ValueError("this recipe has a VGG19 loss term: pass the ImageNet VGG19 weights with "
                         "--set vgg_weights=/path/vgg19.safetensors (torchvision keys; nothing is "
                         "downloaded), or set that term's weight to 0")
    if path != "random":
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            arrays = load_file(path)
        elif path.endswith(".npz"):
            arrays = dict(np.load(path))
        else:
            raise ValueError(f"VGG weights must be .safetensors or .npz (torchvision keys), got {path}")
        for i, layer in enumerate(net.features.layers):
            if not hasattr(layer, "kernel"):
                continue
            w, b = f"features.{i}.weight", f"features.{i}.bias"
            if w not in arrays or b not in arrays:
                raise KeyError(f"{path}: missing {w} / {b}")
            kernel = np.transpose(arrays[w], (2, 3, 1, 0))  # OIHW -> HWIO
            if kernel.shape != layer.kernel.shape:
                raise ValueError(f"{path}: {w} has shape {arrays[w].shape}, expected the "
                                 f"torchvision VGG19 layout")
            layer.kernel.set_value(jnp.asarray(kernel, jnp.float32))
            layer.bias.set_value(jnp.asarray(arrays[b], jnp.float32))
    elif not allow_random:
        raise ValueError("vgg_weights='random' is only for tests")
    graph, params = nnx.split(net, nnx.Param)
    return graph, nnx.to_pure_dict(params)


# --------------------------------------------------------------------------------------------
# augmentations inside the step


def mixup(key, lq, gt, cfg: MixupConfig, step):
    """Restormer's batch MixUp or MPRNet's per-sample MixUp (see MixupConfig)."""
    if cfg.kind == "none":
        return lq, gt
    k_perm, k_lam, k_use = jax.random.split(key, 3)
    n = lq.shape[0]
    perm = jax.random.permutation(k_perm, n)
    if cfg.kind == "batch":
        lam = jax.random.beta(k_lam, cfg.alpha, cfg.alpha).reshape(1, 1, 1, 1)
    elif cfg.kind == "per_sample":
        lam = jax.random.beta(k_lam, cfg.alpha, cfg.alpha, (n,)).reshape(n, 1, 1, 1)
    else:
        raise ValueError(f"unknown mixup kind {cfg.kind!r}")
    use = (step >= cfg.start_step) & (jax.random.uniform(k_use) < cfg.prob)
    lam = jnp.where(use, lam, 1.0).astype(lq.dtype)
    return lam * lq + (1 - lam) * lq[perm], lam * gt + (1 - lam) * gt[perm]


def progressive_crop(batch: Mapping[str, np.ndarray], batch_size: int, patch: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """BasicSR's progressive training on host: ``batch_size`` random rows (without replacement)
    of the loaded batch, all cropped at one random offset to ``patch`` x ``patch``."""
    n, h, w = next(iter(batch.values())).shape[:3]
    out = dict(batch)
    if batch_size < n:
        idx = np.sort(rng.choice(n, batch_size, replace=False))
        out = {k: v[idx] for k, v in out.items()}
    if patch < h or patch < w:
        y = int((h - patch) * rng.random())
        x = int((w - patch) * rng.random())
        out = {k: v[:, y:y + patch, x:x + patch] for k, v in out.items()}
    return out


# --------------------------------------------------------------------------------------------
# state and steps


def init_state(model: ModelDef, tx: optax.GradientTransformation, ema: bool) -> dict:
    """The step-0 train state (one jitted program: eagerly, every optimizer-state leaf would
    compile its own zeros_like)."""

    def make(params, model_state):
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "model_state": model_state,
            "opt_state": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params) if ema else {},
        }

    return jax.jit(make)(model.params, model.model_state)


def abstract_state(model: ModelDef, tx, ema: bool) -> dict:
    return jax.eval_shape(lambda: init_state(model, tx, ema))


def _tree_select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


# the gradient norm of the metrics and of the finite check (flat on CPU; see schedules)
grad_global_norm = schedules.global_norm


def _real_dtype(tree):
    """float32, or float64 where a floating leaf of ``tree`` is (the float64 tests)."""
    return functools.reduce(jnp.promote_types, [
        a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)],
        jnp.dtype(jnp.float32))


def split_micro_batches(x: jax.Array, n: int, mesh) -> jax.Array:
    """A global batch ``(B, ...)`` sharded on 'data' -> ``(n, B / n, ...)``, micro-batch ``i``
    made of the ``i``-th ``B / (D n)`` rows of every device's ``B / D`` (``D`` devices on
    'data'), so that each micro-batch is sharded on 'data' like the batch and no row leaves
    its device: ``(B, ...) -> (D, n, B/(D n), ...) -> (n, D, B/(D n), ...) -> (n, B/n, ...)``."""
    d = mesh.shape[DATA_AXIS]
    rows = x.shape[0]
    if rows % (d * n):
        raise ValueError(f"a batch of {rows} on {d} device(s) ({rows / d:g} per device) does not "
                         f"split into grad_accum={n} micro-batches")
    m = rows // (d * n)
    rest = x.shape[1:]
    x = jnp.swapaxes(x.reshape((d, n, m) + rest), 0, 1).reshape((n, d * m) + rest)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, DATA_AXIS)))


def make_train_step(recipe: Recipe, model: ModelDef, tx: optax.GradientTransformation, mesh,
                    vgg_graph=None) -> Callable:
    """``step(state, batch, frozen) -> (state, metrics)``, jitted over ``mesh``.

    ``batch``: {"lq", "gt"} global arrays sharded on 'data'; ``frozen``: {"vgg": params} or {}.
    A non-finite loss or gradient leaves the state unchanged (metrics['finite'] == 0) so the
    caller can stop with the last good weights.

    ``recipe.grad_accum`` N > 1: after MixUp over the whole batch, each device's rows are split
    into N micro-batches (``split_micro_batches``); a ``lax.scan`` runs forward and backward on
    one micro-batch at a time, summing gradients (float32), loss and loss terms (each scaled by
    its batch reduction, ``make_loss``), and the optimizer (clipping, schedule, EMA, the
    non-finite check) runs once on the sums: the full batch's step, with one micro-batch's
    activations alive at a time. Refused where that would not hold (``grad_accum_problems``).
    """
    check_grad_accum(recipe, model)
    accum = int(recipe.grad_accum)
    loss_fn = make_loss(recipe, micro_batches=accum)
    lr_fn = schedules.learning_rate(recipe.optimizer)
    dtype = jnp.dtype(recipe.dtype)
    base_key = jax.random.key(recipe.seed)
    ema_decay = float(recipe.ema_decay)
    side = wants_side_output(recipe)
    data = batch_sharding(mesh)

    def step(state, batch, frozen):
        t = state["step"]
        key = jax.random.fold_in(base_key, t)
        # float32, or float64 where the parameters are (the float64 tests, jax_enable_x64):
        # the batch, the loss, and the compute dtype of a float32 recipe
        real = _real_dtype(state["params"])
        compute = real if dtype == jnp.float32 else dtype
        lq, gt = batch["lq"].astype(real), batch["gt"].astype(real)
        lq, gt = mixup(key, lq, gt, recipe.mixup, t)
        vgg = nnx.merge(vgg_graph, frozen["vgg"]) if vgg_graph is not None else None

        def objective_on(lq, gt):
            def objective(params):
                p = _cast_floating(params, compute) if compute != jnp.float32 else params
                module = model.module(p, state["model_state"], train=True)
                with flayers.rematerialize(recipe.remat):
                    outs = run_forward(module, lq.astype(compute), side=side)
                loss, parts = loss_fn(outs, gt, lq, vgg)
                _, rest = split_module(module)
                return loss, (parts, rest)

            return objective

        if accum == 1:
            (loss, (parts, new_model_state)), grads = jax.value_and_grad(
                objective_on(lq, gt), has_aux=True)(state["params"])
        else:
            loss, parts, grads = accumulate(state["params"], lq, gt, objective_on, real)
            new_model_state = state["model_state"]  # empty: refused otherwise
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = grad_global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        ema = state["ema"]
        if ema_decay:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        new_model_state = jax.tree.map(lambda a, b: a.astype(b.dtype), new_model_state,
                                       state["model_state"])
        candidate = {"params": params, "opt_state": opt_state, "ema": ema,
                     "model_state": new_model_state}
        kept = _tree_select(ok, candidate, {k: state[k] for k in candidate})
        new_state = dict(kept, step=t + ok.astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(t), "finite": ok, **parts}
        return new_state, metrics

    def accumulate(params, lq, gt, objective_on, real):
        """(loss, parts, gradients) of the batch as sums over ``accum`` micro-batches."""
        micro = (split_micro_batches(lq, accum, mesh), split_micro_batches(gt, accum, mesh))

        def one(carry, xs):
            g_sum, loss_sum, parts_sum = carry
            lq_i, gt_i = (jax.lax.with_sharding_constraint(x, data) for x in xs)
            (loss_i, (parts_i, _)), g = jax.value_and_grad(
                objective_on(lq_i, gt_i), has_aux=True)(params)
            g_sum = jax.tree.map(lambda s_, g_: s_ + g_.astype(s_.dtype), g_sum, g)
            parts_sum = {k: v + parts_i[k].astype(v.dtype) for k, v in parts_sum.items()}
            return (g_sum, loss_sum + loss_i.astype(loss_sum.dtype), parts_sum), None

        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                              params),
                 jnp.zeros((), real), {k: jnp.zeros((), real) for k in loss_fn.part_names})
        (g_sum, loss, parts), _ = jax.lax.scan(one, zeros, micro)
        grads = jax.tree.map(lambda g_, p: g_.astype(p.dtype), g_sum, params)
        return loss, parts, grads

    rep = replicated(mesh)
    return jax.jit(with_precision(step, recipe.matmul_precision), in_shardings=(rep, data, rep),
                   out_shardings=(rep, rep), donate_argnums=(0,),
                   compiler_options=lowering.compiler_options(_platform(mesh)))


def with_precision(fn: Callable, precision: str) -> Callable:
    """``fn`` traced under ``jax.default_matmul_precision(precision)``; "default" leaves JAX's
    own (the process's setting) in force and returns ``fn`` itself."""
    if precision == "default":
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        with jax.default_matmul_precision(precision):
            return fn(*args)

    return wrapped


def make_eval_fn(recipe: Recipe, model: ModelDef, mesh) -> Callable:
    """``fn(params, model_state, inputs) -> restored`` (the main output, float32), jitted; the
    ``inputs`` tuple (image, then any extra maps) is sharded on 'data', the result replicated."""
    compute = jnp.dtype(recipe.dtype)
    select = models.protocol(recipe.model).image

    def fn(params, model_state, inputs):
        p = _cast_floating(params, compute) if compute != jnp.float32 else params
        module = model.module(p, model_state, train=False)
        out = select(module(*[x.astype(compute) for x in inputs]))
        return out.astype(jnp.float32)

    rep = replicated(mesh)
    return jax.jit(with_precision(fn, recipe.matmul_precision),
                   in_shardings=(rep, rep, batch_sharding(mesh)), out_shardings=rep,
                   compiler_options=lowering.compiler_options(_platform(mesh)))


def _platform(mesh) -> str:
    return mesh.devices.flat[0].platform
