"""Learning-rate schedules and optimizers of the published recipes, as optax objects.

A schedule maps optax's update count ``c`` (0 for the first update) to a learning rate. The
originals count iterations from 1 (``t = c + 1``) and some step their scheduler once per epoch;
each function below states the original's rule in those terms, and ``tests/test_schedules.py``
checks every one against its closed-form formula and the values quoted in the specs.

Optimizers: torch's ``Adam(weight_decay=w)`` adds ``w * p`` to the gradient before the moments
(coupled L2); ``AdamW`` shrinks the weights by ``lr * w * p`` beside the Adam step (decoupled).
Gradient clipping (``clip_grad_norm_``) acts on the raw gradient, before either.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


# --------------------------------------------------------------------------------------------
# schedules


def constant(lr: float) -> Schedule:
    return lambda count: jnp.full((), lr, jnp.float32) + 0.0 * count


def cosine_restart_cyclic(base_lr: float, periods: Sequence[int], restart_weights: Sequence[float],
                          eta_mins: Sequence[float]) -> Schedule:
    """BasicSR's ``CosineAnnealingRestartCyclicLR`` (Restormer), stepped every iteration.

    With ``e = c`` (the scheduler's ``last_epoch`` when iteration ``c + 1`` runs), the cycle ``i``
    is the first with ``e <= cumsum(periods)[i]``, and
    ``lr = eta_min_i + w_i * (base_lr - eta_min_i) / 2 * (1 + cos(pi * (e - start_i) / period_i))``
    with ``start_i`` the previous cumulative boundary (0 for the first cycle).
    """
    periods = [int(p) for p in periods]
    bounds = [sum(periods[:i + 1]) for i in range(len(periods))]
    starts = [0] + bounds[:-1]
    if not (len(periods) == len(restart_weights) == len(eta_mins)):
        raise ValueError("periods, restart_weights and eta_mins must have the same length")

    def schedule(count):
        e = jnp.asarray(count, jnp.float32)
        # index of the first cycle whose cumulative boundary is >= e (the last one past the end)
        idx = jnp.sum(jnp.asarray(bounds, jnp.float32) < e).astype(jnp.int32)
        idx = jnp.minimum(idx, len(periods) - 1)
        start = jnp.asarray(starts, jnp.float32)[idx]
        period = jnp.asarray(periods, jnp.float32)[idx]
        w = jnp.asarray(restart_weights, jnp.float32)[idx]
        eta = jnp.asarray(eta_mins, jnp.float32)[idx]
        return eta + w * 0.5 * (base_lr - eta) * (1.0 + jnp.cos(jnp.pi * (e - start) / period))

    return schedule


def warmup_cosine_per_epoch(base_lr: float, iters_per_epoch: int, warmup_epochs: int, t_max: int,
                            eta_min: float) -> Schedule:
    """MPRNet: GradualWarmupScheduler (multiplier 1) into CosineAnnealingLR, stepped per epoch.

    With the 1-based epoch ``E = c // iters_per_epoch + 1``: ``lr = base * E / warmup`` for
    ``E <= warmup``, then ``eta_min + (base - eta_min) / 2 * (1 + cos(pi * (E - warmup - 1) / t_max))``
    (epochs ``warmup`` and ``warmup + 1`` both run at the base lr).
    """

    def schedule(count):
        epoch = (jnp.asarray(count, jnp.int32) // iters_per_epoch + 1).astype(jnp.float32)
        warm = base_lr * epoch / warmup_epochs
        cos = eta_min + 0.5 * (base_lr - eta_min) * (
            1.0 + jnp.cos(jnp.pi * (epoch - warmup_epochs - 1) / t_max))
        return jnp.where(epoch <= warmup_epochs, warm, cos)

    return schedule


def cosine_per_epoch(base_lr: float, iters_per_epoch: int, t_max: int, eta_min: float) -> Schedule:
    """torch ``CosineAnnealingLR(T_max, eta_min)`` stepped once per epoch (DarkIR).

    With the 0-based epoch ``k = c // iters_per_epoch``:
    ``lr = eta_min + (base - eta_min) / 2 * (1 + cos(pi * k / t_max))``.
    """

    def schedule(count):
        k = (jnp.asarray(count, jnp.int32) // iters_per_epoch).astype(jnp.float32)
        return eta_min + 0.5 * (base_lr - eta_min) * (1.0 + jnp.cos(jnp.pi * k / t_max))

    return schedule


def cosine_per_step(base_lr: float, t_max: int, eta_min: float = 0.0, offset: int = 1) -> Schedule:
    """A cosine evaluated at iteration ``t = c + offset``:
    ``eta_min + (base - eta_min) / 2 * (1 + cos(pi * t / t_max))``.

    AECR-Net computes ``lr0 * (1 + cos(pi * t / T)) / 2`` before iteration ``t`` (1-based), so
    ``offset = 1``; SNR-Aware's ``CosineAnnealingLR_Restart`` (eta_min 1e-7) is stepped before each
    iteration, giving the same ``t = c + 1``.
    """

    def schedule(count):
        t = jnp.asarray(count, jnp.float32) + offset
        t = jnp.minimum(t, t_max)
        return eta_min + 0.5 * (base_lr - eta_min) * (1.0 + jnp.cos(jnp.pi * t / t_max))

    return schedule


def multistep(base_lr: float, milestones: Sequence[int], gamma: float, offset: int = 1) -> Schedule:
    """``lr = base * gamma ** #{m : m <= c + offset}`` (SNR-Aware's MultiStepLR_Restart, which
    is stepped to iteration ``t = c + 1`` before that iteration runs)."""
    ms = jnp.asarray(sorted(int(m) for m in milestones), jnp.int32)

    def schedule(count):
        t = jnp.asarray(count, jnp.int32) + offset
        n = jnp.sum(ms <= t)
        return base_lr * jnp.power(jnp.float32(gamma), n.astype(jnp.float32))

    return schedule


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Which schedule and its arguments; ``build(lr)`` gives the optax schedule.

    kind: 'constant' | 'cosine_restart_cyclic' | 'warmup_cosine_per_epoch' | 'cosine_per_epoch' |
    'cosine_per_step' | 'multistep'. Fields a kind does not use are ignored.
    """

    kind: str = "constant"
    periods: tuple[int, ...] = ()
    restart_weights: tuple[float, ...] = ()
    eta_mins: tuple[float, ...] = ()
    eta_min: float = 0.0
    iters_per_epoch: int = 1
    warmup_epochs: int = 0
    t_max: int = 1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.5
    offset: int = 1

    def build(self, lr: float) -> Schedule:
        k = self.kind
        if k == "constant":
            return constant(lr)
        if k == "cosine_restart_cyclic":
            return cosine_restart_cyclic(lr, self.periods, self.restart_weights, self.eta_mins)
        if k == "warmup_cosine_per_epoch":
            return warmup_cosine_per_epoch(lr, self.iters_per_epoch, self.warmup_epochs,
                                           self.t_max, self.eta_min)
        if k == "cosine_per_epoch":
            return cosine_per_epoch(lr, self.iters_per_epoch, self.t_max, self.eta_min)
        if k == "cosine_per_step":
            return cosine_per_step(lr, self.t_max, self.eta_min, self.offset)
        if k == "multistep":
            return multistep(lr, self.milestones, self.gamma, self.offset)
        raise ValueError(f"unknown schedule kind {k!r}")


# --------------------------------------------------------------------------------------------
# optimizers


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """torch-style optimizer settings.

    name: 'adam' or 'adamw'. ``weight_decay`` is coupled L2 (added to the gradient) for 'adam'
    and decoupled (``p -= lr * wd * p``) for 'adamw', as in torch. ``grad_clip_norm`` > 0 clips
    the global L2 norm of the raw gradient first (``clip_grad_norm_``).
    """

    name: str = "adam"
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    schedule: ScheduleConfig = ScheduleConfig()


def learning_rate(cfg: OptimizerConfig) -> Schedule:
    return cfg.schedule.build(cfg.lr)


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together (``optax.global_norm``); in CPU programs over one flat
    vector of every leaf (:func:`flaxrestore.xla_cpu.norms.global_norm`: XLA:CPU's scheduler
    otherwise keeps activation cotangents alive longer)."""
    from flaxrestore import lowering
    from flaxrestore.xla_cpu import norms

    return lowering.per_platform(cpu=lambda: norms.global_norm(tree),
                                 default=lambda: _optax_global_norm(tree))


def _optax_global_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    return optax.global_norm(jax.tree.map(lambda g: g.astype(dtype), tree))


def clip_grad_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))`` (optax's
    ``clip_by_global_norm`` has no 1e-6, which matters at Restormer's max_norm of 0.01)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    sched = learning_rate(cfg)
    parts = []
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        parts.append(clip_grad_norm_torch(cfg.grad_clip_norm))
    if cfg.name == "adam":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))  # coupled L2
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    elif cfg.name == "adamw":
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))  # decoupled, times lr below
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}; expected 'adam' or 'adamw'")
    parts.append(optax.scale_by_learning_rate(sched))
    return optax.chain(*parts)


def describe(cfg: OptimizerConfig) -> str:
    wd = ""
    if cfg.weight_decay:
        wd = f", weight_decay {cfg.weight_decay:g} ({'decoupled' if cfg.name == 'adamw' else 'coupled L2'})"
    clip = f", clip grad norm {cfg.grad_clip_norm:g}" if cfg.grad_clip_norm else ""
    return (f"{cfg.name} lr {cfg.lr:g} betas ({cfg.b1:g}, {cfg.b2:g}) eps {cfg.eps:g}{wd}{clip}, "
            f"schedule {cfg.schedule.kind}")
