"""The recipes' learning-rate schedules against their closed-form formulas (written here from the
spec files, independently of train/schedules.py) and the values the specs quote; the optax
optimizers against torch.optim (Adam with coupled L2, AdamW decoupled, clip_grad_norm_)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import recipe as recipe_lib
from train import schedules as S


def _eval(schedule, counts):
    return np.asarray(jax.vmap(schedule)(jnp.asarray(counts, jnp.int32)), np.float64)


def _check(schedule, formula, counts, rtol=2e-6, atol=1e-10):
    got = _eval(schedule, counts)
    want = np.asarray([formula(c) for c in counts])
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)  # float32 near eta_min


# ------------------------------------------------------------------------------- Restormer

def restormer_lr(t):  # t: 1-based iteration; spec restormer_mprnet.md 1.7
    e = t - 1
    if e <= 92000:
        return 3e-4
    return 1e-6 + 0.5 * (3e-4 - 1e-6) * (1 + math.cos(math.pi * (e - 92000) / 208000))


def test_restormer_cosine_restart_matches_formula_and_spec_values():
    sched = S.cosine_restart_cyclic(3e-4, (92000, 208000), (1, 1), (3e-4, 1e-6))
    ts = [1, 2, 1000, 92000, 92001, 92002, 100000, 150000, 196000, 250000, 299999, 300000]
    _check(sched, lambda c: restormer_lr(c + 1), [t - 1 for t in ts])
    # values quoted in the spec (verified there with BasicSR's scheduler)
    for t, v in [(150_000, 2.462e-4), (196_000, 1.505e-4), (250_000, 4.16e-5), (300_000, 1.0e-6)]:
        assert _eval(sched, [t - 1])[0] == pytest.approx(v, rel=2e-3)


def test_restormer_recipe_uses_that_schedule():
    r = recipe_lib.load("restormer_motion_deblurring")
    sched = S.learning_rate(r.optimizer)
    ts = np.arange(1, 300_001, 997)
    _check(sched, lambda c: restormer_lr(c + 1), ts - 1)
    o = r.optimizer
    assert (o.name, o.lr, o.b1, o.b2, o.weight_decay, o.grad_clip_norm) == (
        "adamw", 3e-4, 0.9, 0.999, 1e-4, 0.01)
    assert r.total_steps == 300_000
    assert [s.until for s in r.stages] == [92000, 156000, 204000, 240000, 276000, 300000]
    assert [s.patch_size for s in r.stages] == [128, 160, 192, 256, 320, 384]
    assert [s.batch_size for s in r.stages] == [64, 40, 32, 16, 8, 8]
    assert r.batch_size == 64 and r.data["patch_size"] == 384
    assert r.stage_at(92000).patch_size == 128 and r.stage_at(92001).patch_size == 160
    assert r.stage_at(300000).patch_size == 384


# --------------------------------------------------------------------------------- MPRNet

def mprnet_lr(c, ipe, T, base=2e-4, eta=1e-6, warm=3):
    e = c // ipe + 1  # 1-based epoch
    if e <= warm:
        return base * e / warm
    return eta + 0.5 * (base - eta) * (1 + math.cos(math.pi * (e - warm - 1) / T))


@pytest.mark.parametrize("task,epochs,T,ipe", [("deblurring", 3000, 2997, 132),
                                                ("deraining", 250, 247, 857),
                                                ("denoising", 80, 117, 6000)])
def test_mprnet_warmup_cosine(task, epochs, T, ipe):
    sched = S.warmup_cosine_per_epoch(2e-4, ipe, 3, T, 1e-6)
    counts = sorted({0, 1, ipe - 1, ipe, 2 * ipe, 3 * ipe - 1, 3 * ipe, 4 * ipe - 1, 4 * ipe,
                     5 * ipe, epochs * ipe // 2, epochs * ipe - 1})
    _check(sched, lambda c: mprnet_lr(c, ipe, T), counts)
    assert _eval(sched, [0])[0] == pytest.approx(2e-4 / 3, rel=1e-6)
    assert _eval(sched, [3 * ipe])[0] == pytest.approx(2e-4, rel=1e-6)  # epochs 3 and 4 at 2e-4
    r = recipe_lib.load(f"mprnet_{task}") if _has_recipe(f"mprnet_{task}") else None
    if r is not None:
        assert r.total_steps == epochs * ipe
        _check(S.learning_rate(r.optimizer), lambda c: mprnet_lr(c, ipe, T), counts)


def test_mprnet_spec_end_values():
    derain = S.warmup_cosine_per_epoch(2e-4, 857, 3, 247, 1e-6)
    assert _eval(derain, [250 * 857 - 1])[0] == pytest.approx(1.008e-6, rel=2e-3)
    denoise = S.warmup_cosine_per_epoch(2e-4, 6000, 3, 117, 1e-6)
    assert _eval(denoise, [80 * 6000 - 1])[0] == pytest.approx(5.5e-5, rel=2e-2)


# ------------------------------------------------------------------------ DarkIR, SNR, AECR

def test_darkir_cosine_per_epoch():
    ipe = 637
    sched = S.cosine_per_epoch(5e-4, ipe, 500, 1e-6)
    formula = lambda c: 1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + math.cos(math.pi * (c // ipe) / 500))
    _check(sched, formula, [0, 1, ipe - 1, ipe, 250 * ipe + 3, 500 * ipe - 1])


def test_snr_multistep_and_cosine():
    ms = S.multistep(4e-4, (50000, 100000, 200000, 300000), 0.5)
    formula = lambda c: 4e-4 * 0.5 ** sum(m <= c + 1 for m in (50000, 100000, 200000, 300000))
    _check(ms, formula, [0, 49998, 49999, 50000, 99999, 150000, 199999, 299999, 599999])
    assert _eval(ms, [49999])[0] == pytest.approx(2e-4)  # iteration 50000 runs at the halved lr
    cos = S.cosine_per_step(1e-4, 200000, 1e-7)
    formula = lambda c: 1e-7 + 0.5 * (1e-4 - 1e-7) * (1 + math.cos(math.pi * (c + 1) / 200000))
    _check(cos, formula, [0, 1, 99999, 199998, 199999], rtol=1e-5)


def test_aecrnet_cosine_per_step():
    sched = S.cosine_per_step(1e-4, 500000, 0.0)
    formula = lambda c: 0.5 * (1 + math.cos(math.pi * (c + 1) / 500000)) * 1e-4
    counts = [0, 1, 1000, 250000, 499998]
    _check(sched, formula, counts)
    assert abs(_eval(sched, [499999])[0]) < 1e-12  # the last iteration runs at 0


def _has_recipe(name):
    return any(n == name for n, _ in recipe_lib.list_configs())


def test_every_recipe_loads_and_schedules_are_finite():
    for name, doc in recipe_lib.list_configs():
        assert "python -m train" in (__import__(f"train.configs.{name}", fromlist=["x"]).__doc__ or ""), name
        r = recipe_lib.load(name)
        lrs = _eval(S.learning_rate(r.optimizer), np.linspace(0, r.total_steps - 1, 7).astype(int))
        assert np.all(np.isfinite(lrs)) and np.all(lrs >= 0), name


# ------------------------------------------------------------------------ optimizers vs torch

def _torch_run(kind, wd, clip, lr_values, grads, p0):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = cls([p], lr=lr_values[0], betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    for lr, g in zip(lr_values, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = torch.tensor(g, dtype=torch.float64)
        if clip:
            torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
    return p.detach().numpy()


@pytest.mark.parametrize("kind,wd,clip", [("adam", 0.0, 0.0), ("adam", 1e-2, 0.0),
                                          ("adamw", 1e-1, 0.0), ("adamw", 1e-4, 0.01)])
def test_optimizer_matches_torch(kind, wd, clip):
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(0)
        p0 = rng.standard_normal(5)
        grads = [rng.standard_normal(5) for _ in range(6)]
        sched_cfg = S.ScheduleConfig(kind="multistep", milestones=(3,), gamma=0.5)
        cfg = S.OptimizerConfig(name=kind, lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=wd,
                                grad_clip_norm=clip, schedule=sched_cfg)
        tx = S.make_optimizer(cfg)
        lr_fn = S.learning_rate(cfg)
        p = jnp.asarray(p0)
        state = tx.init(p)
        lrs = []
        for i, g in enumerate(grads):
            lrs.append(float(lr_fn(i)))
            upd, state = tx.update(jnp.asarray(g), state, p)
            p = p + upd
        want = _torch_run(kind, wd, clip, lrs, grads, p0)
        np.testing.assert_allclose(np.asarray(p), want, rtol=1e-10, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_overrides():
    r = recipe_lib.load("restormer_motion_deblurring",
                        ["optimizer.lr=1e-3", "total_steps=10", "model_overrides.dim=8",
                         "data.patch_size=32", "stages=()", "optimizer.schedule.kind='constant'"])
    assert r.optimizer.lr == 1e-3 and r.total_steps == 10 and r.model_overrides["dim"] == 8
    assert r.data["patch_size"] == 32 and r.stages == ()
    assert r.optimizer.schedule.kind == "constant"
    with pytest.raises(KeyError):
        recipe_lib.load("restormer_motion_deblurring", ["optimizer.nope=1"])


@pytest.mark.parametrize("max_norm", [1e-3, 10.0])
@pytest.mark.both_lowerings
def test_clip_grad_norm_matches_torch_on_several_tensors(max_norm):
    """clip_grad_norm_torch, jitted as the trainer's step is (in accelerator mode: the global
    norm TPUs and GPUs compute), against torch.nn.utils.clip_grad_norm_ on three tensors of
    different scales: ONE norm over all of them, scale min(1, max_norm / (norm + 1e-6)) (the
    1e-6 matters at small norms, Restormer's max_norm is 0.01), gradients below max_norm left
    alone."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    grads = {"a": rng.standard_normal((3, 4)) * 1e-3, "b": rng.standard_normal(5) * 3e-4,
             "c": rng.standard_normal((2, 2, 3, 2)) * 1e-4}
    grads = {k: v.astype(np.float32) for k, v in grads.items()}
    tx = S.clip_grad_norm_torch(max_norm)
    clipped, _ = jax.jit(lambda g: tx.update(g, tx.init(g)))(jax.tree.map(jnp.asarray, grads))

    params = [torch.nn.Parameter(torch.zeros(v.shape, dtype=torch.float64)) for v in grads.values()]
    for p, g in zip(params, grads.values()):
        p.grad = torch.tensor(g, dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    for (k, got), p in zip(clipped.items(), params):
        np.testing.assert_allclose(np.asarray(got), p.grad.numpy(), rtol=2e-6, atol=0, err_msg=k)
