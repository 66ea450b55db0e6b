"""Gradient accumulation (``Recipe.grad_accum``, ``train.step.make_train_step``): N micro-batches
and one optimizer update give the full batch's step.

* In float64 on two simulated CPU devices, for Restormer (L1: a mean over the batch; AdamW,
  its recipe's clipping at 0.01, batch MixUp at probability 1) and SNR-Aware (Charbonnier-sum:
  a sum over the batch; Adam, clipping at 1e-3), both with EMA: the N = 2 and N = 4 steps equal
  the full-batch step (loss, its terms, gradient norm, gradients, parameters, optimizer state,
  EMA) to 1e-12 relative. Fails for: forgetting the 1/N of a mean term (loss x N), scaling a
  sum term by 1/N (loss / N), N optimizer updates instead of one (parameters moved N times, Adam
  counting N steps), MixUp per micro-batch (other pairs mixed: the loss differs), clipping or EMA
  per micro-batch, gradients accumulated in too low a precision.
* Each micro-batch is made of its own device's rows (a split that sends rows to another device
  gives the same numbers, so this is checked directly on the split and on the compiled
  program: no all-to-all, all-gather or collective-permute beyond the full-batch program's).
* Every kind in ``LOSS_KINDS`` whose table says 'mean' or 'sum' adds up over micro-batches
  (fails for a wrong reduction in the table); AECR-Net's contrastive term, which does not, and
  models with batch statistics are refused with a message that says why.
* The recipe field: validation (>= 1, every stage's per-device batch splits), ``--set``,
  ``python -m train show``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import recipe as recipe_lib
from train import step as step_lib
from train.recipe import LossTerm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny widths, as tests/test_train_families.py
RESTORMER = ("restormer_demo", 8, [
    "model_overrides={'dim': 8, 'num_blocks': (1, 0, 0, 0), 'num_refinement_blocks': 0, "
    "'heads': (1, 1, 1, 1)}", "mixup.prob=1.0"])
SNR = ("snr_demo", 32, ["model_overrides={'nf': 8}", "optimizer.grad_clip_norm=1e-3"])

STEP_SCRIPT = textwrap.dedent('''
    import dataclasses, json, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from concurrent.futures import ThreadPoolExecutor

    assert jax.config.jax_enable_x64 and jax.device_count() == 2, jax.devices()
    from flaxrestore import layers, lowering
    from train import recipe as R, schedules, step as S

    FAMILIES = json.loads(sys.argv[1])
    COLLECTIVES = ("all-to-all", "all-gather", "collective-permute")


    def float64_layers():
        """Two layers round float64 to float32 (they compute in float32 at least, and at most):
        add_bias sums a bias gradient in float32 (meant for 16-bit activations) and
        ChannelLayerNorm normalises in float32. The bias gradients' float32 sums, whose order
        depends on the batch split, then differ by 1e-8..1e-6 (measured); here both compute in
        float64. float32 programs are unchanged."""
        layers.add_bias = lambda y, b: y + b.astype(y.dtype)
        float32_norm = layers.ChannelLayerNorm.__call__

        def norm(self, x):
            if x.dtype != jnp.float64:
                return float32_norm(self, x)
            mu = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
            y = (x - mu if self.center else x) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
            return y + self.bias[...] if self.bias is not None else y

        layers.ChannelLayerNorm.__call__ = norm


    def f64(tree):
        return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


    def relative(a, b):
        """max |a - b| / max |b| over a tree's leaves."""
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(la) == len(lb) and la
        scale = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in lb)
        return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for x, y in zip(la, lb)) / scale


    def adam(opt_state):
        return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu"))
                if hasattr(s, "mu")][0]


    def count(hlo, op):
        return hlo.count(f" {op}(") + hlo.count(f" {op}-start(")


    float64_layers()
    mesh = S.make_mesh()
    report = {}

    # the split itself: micro-batch i holds, on device d, rows of device d's own block
    rows = S.global_batch(mesh, {"x": np.arange(8, dtype=np.int32)})["x"]
    for n in (2, 4):
        micro = jax.jit(lambda x, n=n: S.split_micro_batches(x, n, mesh))(rows)
        local = {}
        for shard in micro.addressable_shards:
            local.setdefault(shard.device.id, []).extend(np.ravel(shard.data).tolist())
        owner = {s.device.id: set(np.asarray(s.data).tolist()) for s in rows.addressable_shards}
        report[f"split_{n}"] = {"ok": all(set(v) == owner[d] for d, v in local.items()),
                                "micro": np.asarray(micro).tolist()}

    with lowering.accelerator_path():  # library convs: XLA:CPU's narrow convs sum in float32
        jobs, t0 = [], time.time()
        for family, (name, patch, sets) in FAMILIES.items():
            recipe = R.load(name, [*sets, "batch_size=8", "stages=()", f"data.patch_size={patch}",
                                   "ema_decay=0.9"])
            model = S.build_model(recipe)
            model.params = f64(model.params)
            tx = schedules.make_optimizer(recipe.optimizer)
            rng = np.random.default_rng(7)
            gt = rng.random((8, patch, patch, 3))
            lq = np.clip(0.6 * gt + 0.05 * rng.standard_normal(gt.shape), 0.0, 1.0)
            for n in (1, 2, 4):
                r = dataclasses.replace(recipe, grad_accum=n)
                r.validate(num_devices=mesh.size)
                state = S.replicate(mesh, S.init_state(model, tx, True))
                args = (state, S.global_batch(mesh, {"lq": lq, "gt": gt}), {})
                lowered = S.make_train_step(r, model, tx, mesh).lower(*args)
                jobs.append((family, n, r, lowered, args))
        report["lower_s"], t0 = time.time() - t0, time.time()
        with ThreadPoolExecutor(2) as pool:  # XLA compiles outside the GIL
            compiled = list(pool.map(lambda j: j[3].compile(
                compiler_options={"xla_backend_optimization_level": 0}), jobs))
        report["compile_s"] = time.time() - t0

    results, t0 = {}, time.time()
    for (family, n, r, _, args), c in zip(jobs, compiled):
        before = jax.device_get(args[0])
        new, metrics = jax.device_get(c(*args))
        hlo = c.as_text()
        results[family, n] = (before, new, metrics, {op: count(hlo, op) for op in COLLECTIVES}, r)
    report["run_s"] = time.time() - t0

    for family in FAMILIES:
        before, full, m_full, coll_full, recipe = results[family, 1]
        b1 = recipe.optimizer.b1
        g_full = jax.tree.map(lambda m: m / (1 - b1), adam(full["opt_state"]).mu)
        for n in (2, 4):
            _, acc, m_acc, coll_acc, _ = results[family, n]
            g_acc = jax.tree.map(lambda m: m / (1 - b1), adam(acc["opt_state"]).mu)
            moved = relative(full["params"], before["params"])  # the full step's size
            report[f"{family}_{n}"] = {
                "metrics": {k: abs(float(m_acc[k]) - float(m_full[k])) /
                            max(abs(float(m_full[k])), 1e-300) for k in m_full},
                "metric_values": {k: float(v) for k, v in m_acc.items()},
                "clipped_gradient": relative(g_acc, g_full),
                "params": relative(acc["params"], full["params"]),
                "step_of_params": relative(
                    jax.tree.map(lambda a, b: a - b, acc["params"], before["params"]),
                    jax.tree.map(lambda a, b: a - b, full["params"], before["params"])),
                "ema": relative(acc["ema"], full["ema"]),
                "opt_state": relative(acc["opt_state"], full["opt_state"]),
                "adam_count": int(adam(acc["opt_state"]).count),
                "step": int(acc["step"]),
                "moved": moved,
                "clip": recipe.optimizer.grad_clip_norm,
                "collectives": coll_acc, "collectives_full": coll_full,
                "float64": all(np.asarray(a).dtype == np.float64
                               for a in jax.tree.leaves(acc["params"])),
            }
    print("REPORT " + json.dumps(report))
''')


@pytest.fixture(scope="module")
def step_report():
    """Runs STEP_SCRIPT in a process of its own: 2 simulated CPU devices, jax_enable_x64."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1", PYTHONPATH=REPO)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # multi-device CPU programs are not cached
    families = {"restormer": RESTORMER, "snr": SNR}
    res = subprocess.run([sys.executable, "-c", STEP_SCRIPT, json.dumps(families)], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("REPORT ")][-1]
    report = json.loads(line[len("REPORT "):])
    print(json.dumps(report, indent=1))
    return report


@pytest.mark.parametrize("family", ["restormer", "snr"])
@pytest.mark.parametrize("n", [2, 4])
def test_accumulated_step_equals_full_batch_float64(step_report, family, n):
    r = step_report[f"{family}_{n}"]
    print(family, n, {k: r[k] for k in ("clipped_gradient", "params", "step_of_params", "ema",
                                        "opt_state")}, r["metrics"])
    assert r["float64"]
    # the step did something measurable: weights moved, and the clip was active
    assert r["moved"] > 1e-6, r["moved"]
    assert r["metric_values"]["grad_norm"] > 10 * r["clip"] > 0
    assert r["step"] == 1 and r["adam_count"] == 1  # one optimizer update, not n
    for k, v in r["metrics"].items():
        assert v <= 1e-12, (k, v)
    for k in ("clipped_gradient", "params", "step_of_params", "ema", "opt_state"):
        assert r[k] <= 1e-12, (k, r[k])


def test_micro_batches_stay_on_their_device(step_report):
    """A split that takes micro-batch i as rows [i B/N, (i+1) B/N) is correct arithmetic (the
    step equals the full batch's) but moves rows between devices: the first check sees the
    rows land elsewhere, the second an all-to-all in the compiled program (measured: 2)."""
    assert step_report["split_2"]["micro"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert step_report["split_2"]["ok"] and step_report["split_4"]["ok"]
    for family in ("restormer", "snr"):
        for n in (2, 4):
            r = step_report[f"{family}_{n}"]
            for op, k in r["collectives"].items():
                assert k <= r["collectives_full"][op], (family, n, op, r["collectives"],
                                                        r["collectives_full"])


# ------------------------------------------------------------------------ the loss table


class _Features:
    """A stand-in for the VGG19 of the perceptual and contrastive terms, called as they call it:
    five feature maps per image (a random 3x3 conv, tanh, 2x2 average pools), float64. The terms'
    batch reduction is theirs, not the network's (VGG19 sees one image at a time); a float64
    VGG19 costs about 30 s here."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.kernels = [jnp.asarray(rng.standard_normal((3, 3, c, 4)) / (3 * np.sqrt(c)))
                        for c in (3, 4, 4, 4, 4)]

    def __call__(self, x, layers, normalize=False):
        out = []
        for i, k in enumerate(self.kernels[:len(layers)]):
            if i:
                n, h, w, c = x.shape
                x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
            x = jnp.tanh(jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC")))
            out.append(x)
        return out


def test_every_loss_kind_adds_up_over_micro_batches():
    """For each term of LOSS_KINDS (both perceptual reductions, the contrastive term with and
    without its negatives): N micro-batch values from ``make_loss(recipe, N)`` sum to the full
    batch's, in float64. Fails if the table calls a mean a sum or a sum a mean. The contrastive
    term with negatives, marked 'none', really does not add up (why it is refused)."""
    n = 2
    terms = [LossTerm(k) for k in step_lib.LOSS_KINDS if k not in ("perceptual", "contrastive")]
    terms += [LossTerm("perceptual", options={"reduction": "mean"}),
              LossTerm("perceptual", options={"reduction": "sum"}),
              LossTerm("contrastive", options={"ablation": True}),
              LossTerm("contrastive")]
    with jax.enable_x64(True):
        vgg = _Features()
        rng = np.random.default_rng(3)
        gt = jnp.asarray(rng.random((4, 16, 16, 3)))
        lq = jnp.asarray(np.clip(0.5 * gt + 0.1 * rng.standard_normal(gt.shape), 0, 1))
        pred = jnp.asarray(np.clip(gt + 0.05 * rng.standard_normal(gt.shape), 0, 1))
        seen = set()

        def value(recipe, micro_batches=1):
            """jitted: the term's value on (pred, gt, lq), or one micro-batch's share of it."""
            fn = step_lib.make_loss(recipe, micro_batches)
            return jax.jit(lambda p, g, l: fn(step_lib.Outputs(p, (p,)), g, l, vgg)[0])

        halves = list(zip(*(jnp.split(a, n) for a in (pred, gt, lq))))
        for term in terms:
            recipe = recipe_lib.Recipe(losses=(term,))
            full = value(recipe)(pred, gt, lq)
            assert full.dtype == jnp.float64
            reduction = step_lib.batch_reduction(term)
            if reduction == "none":
                with pytest.raises(ValueError, match="does not add up over micro-batches"):
                    step_lib.make_loss(recipe, micro_batches=n)
                # what the refusal protects against: neither the mean nor the sum of the
                # micro-batch values is the full batch's
                whole = value(recipe)
                values = [whole(*h) for h in halves]
                for wrong in (sum(values) / n, sum(values)):
                    assert abs(float(wrong - full)) > 1e-6 * abs(float(full)), (wrong, full)
                continue
            share = value(recipe, n)
            total = sum(share(*h) for h in halves)
            rel = abs(float(total - full)) / abs(float(full))
            print(f"{term.kind} {dict(term.options)} ({reduction}): micro-batches vs full batch "
                  f"{rel:.1e}")
            assert rel <= 1e-13, (term, rel)
            seen.add(term.kind)
    assert seen == set(step_lib.LOSS_KINDS), seen


# ------------------------------------------------------------------------ refusals


AECRNET = ["model_overrides={'ngf': 8}", "batch_size=4", "stages=()"]


def test_refused_for_aecrnet_with_reasons():
    # the demo: contrastive term off, FastDeconv's batch statistics still there
    recipe = recipe_lib.load("aecrnet_demo", [*AECRNET, "grad_accum=2"])
    with pytest.raises(ValueError, match=r"grad_accum=2 refused.*statistics of the batch.*"
                                         r"FastDeconv.*per micro-batch") as err:
        step_lib.setup(recipe, jax.devices()[:1])
    assert "contrastive" not in str(err.value)
    print(err.value)
    # the ITS recipe's contrastive term on as well: both reasons
    recipe = recipe_lib.load("aecrnet_demo", [*AECRNET, "grad_accum=2", "losses.1.weight=0.1"])
    with pytest.raises(ValueError, match=r"grad_accum=2 refused: loss term 'contrastive' \(weight "
                                         r"0.1\) is no sum or mean over samples.*divides two "
                                         r"means over the whole batch.*FastDeconv") as err:
        step_lib.setup(recipe, jax.devices()[:1])
    print(err.value)
    # make_train_step refuses too (callers that build the step without setup: plan, benchmarks)
    model = step_lib.build_model(recipe)
    with pytest.raises(ValueError, match="grad_accum=2 refused"):
        step_lib.make_train_step(recipe, model, None, step_lib.make_mesh(jax.devices()[:1]))
    # grad_accum=1 is what it always was
    step_lib.setup(recipe_lib.load("aecrnet_demo", AECRNET), jax.devices()[:1])


def test_contrastive_term_refused_on_any_model_and_its_ablation_accepted():
    base = recipe_lib.load("restormer_demo", [RESTORMER[2][0], "grad_accum=2"])
    cr = dataclasses.replace(base, losses=(LossTerm("l1"), LossTerm("contrastive", 0.1)))
    problems = step_lib.grad_accum_problems(cr, {})
    assert len(problems) == 1 and "'contrastive'" in problems[0], problems
    ablation = dataclasses.replace(base, losses=(
        LossTerm("l1"), LossTerm("contrastive", 0.1, options={"ablation": True})))
    assert step_lib.grad_accum_problems(ablation, {}) == []
    off = dataclasses.replace(base, losses=(LossTerm("l1"), LossTerm("contrastive", 0.0)))
    assert step_lib.grad_accum_problems(off, {}) == []


# ------------------------------------------------------------------------ the recipe field


def test_recipe_field_validation_set_and_show():
    recipe = recipe_lib.load("restormer_demo", ["grad_accum=4"])
    assert recipe.grad_accum == 4 and recipe_lib.Recipe().grad_accum == 1
    recipe.validate(num_devices=1)  # stages of 8 and 4 per device split into 4
    # restormer_demo's second stage has 4 per device: not into 8; on 2 devices 2 per device
    with pytest.raises(ValueError, match=r"batch size 4 is 4 per device on 1 device\(s\), which "
                                         r"does not split into grad_accum=8"):
        recipe_lib.load("restormer_demo", ["grad_accum=8"]).validate(num_devices=1)
    with pytest.raises(ValueError, match=r"batch size 4 is 2 per device on 2 device"):
        recipe.validate(num_devices=2)
    for bad in ("0", "-1", "1.5", "True"):
        with pytest.raises(ValueError, match="grad_accum must be an integer >= 1"):
            recipe_lib.load("snr_demo", [f"grad_accum={bad}"]).validate()
    recipe_lib.load("snr_demo", ["grad_accum=8"]).validate(num_devices=1)  # batch 8

    from train.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["show", "--config", "snr_demo", "--set", "grad_accum=4"]) == 0
    assert json.loads(out.getvalue())["grad_accum"] == 4


def test_split_micro_batches_shapes_and_refusal():
    mesh = step_lib.make_mesh(jax.devices()[:1])
    x = jnp.arange(12 * 2).reshape(12, 2)
    y = step_lib.split_micro_batches(x, 3, mesh)
    assert y.shape == (3, 4, 2)
    np.testing.assert_array_equal(y.reshape(12, 2), x)  # one device: consecutive rows
    with pytest.raises(ValueError, match="does not split into grad_accum=5"):
        step_lib.split_micro_batches(x, 5, mesh)
