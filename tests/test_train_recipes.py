"""The recipes against the spec files: every recipe loads and validates; each recipe's loss,
assembled by the trainer from its terms, equals the reference composition in flaxrestore.losses
(mprnet_loss, darkir_loss, snr_loss, AECR-Net's l1 + beta CR); optimizer settings per recipe;
the trainer's VGG19 weight reader agrees with porting's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxrestore import losses as L
from train import recipe as recipe_lib
from train import step as step_lib


def test_every_recipe_validates():
    for name, _ in recipe_lib.list_configs():
        r = recipe_lib.load(name)
        r.validate(num_devices=1)
        assert r.total_steps > 0 and r.batch_size > 0, name
        for t in r.losses:
            assert t.kind in step_lib.LOSS_KINDS, (name, t.kind)


class StubVGG:
    """Stands in for VGG19 (any callable with its signature): five cheap 'feature maps'."""

    def __call__(self, x, layers, normalize=False):
        assert not normalize  # none of the recipes normalises
        return [x, 2.0 * x, jnp.square(x), jnp.tanh(x), x[:, ::2, ::2] * 3.0][:len(layers)]


def _batch(rng, n=2, s=16, c=3):
    gt = jnp.asarray(rng.random((n, s, s, c), dtype=np.float32))
    lq = jnp.asarray(rng.random((n, s, s, c), dtype=np.float32))
    return gt, lq


def _pred(rng, gt, scale=0.2):
    return gt + scale * jnp.asarray(rng.standard_normal(gt.shape).astype(np.float32))


def _ours(recipe, outs, gt, lq, vgg=None):
    total, _ = step_lib.make_loss(recipe)(outs, gt, lq, vgg)
    return float(total)


@pytest.mark.parametrize("name", ["mprnet_deblurring", "mprnet_deraining", "mprnet_denoising"])
def test_mprnet_losses(name):
    rng = np.random.default_rng(0)
    gt, lq = _batch(rng)
    outs = [_pred(rng, gt, 0.3) for _ in range(3)]  # also outside [0, 1], for the clamp
    r = recipe_lib.load(name)
    denoise = name == "mprnet_denoising"
    want = L.mprnet_loss(outs, gt, edge_weight=0.0 if denoise else 0.05, clamp=denoise)
    got = _ours(r, step_lib.Outputs(outs[0], tuple(outs)), gt, lq)
    assert got == pytest.approx(float(want), rel=1e-6)


def test_darkir_loss():
    rng = np.random.default_rng(1)
    gt, lq = _batch(rng, s=32)
    out = _pred(rng, gt)
    side = jnp.asarray(rng.random((2, 4, 4, 3), dtype=np.float32))
    vgg = StubVGG()
    r = recipe_lib.load("darkir_lolblur")
    want = L.darkir_loss(side, out, gt, vgg)
    got = _ours(r, step_lib.Outputs(out, (out,), side), gt, lq, vgg)
    assert got == pytest.approx(float(want), rel=1e-6)
    assert step_lib.wants_side_output(r)  # so the train step asks DarkIR for its side output
    assert not step_lib.wants_side_output(recipe_lib.load("restormer_demo"))
    with pytest.raises(ValueError, match="side output, which restormer"):
        recipe_lib.apply_overrides(recipe_lib.load("restormer_demo"),
                                   ["losses=({'kind': 'l1', 'outputs': 'side'},)"]).validate(
            num_devices=1, process_count=1)


@pytest.mark.parametrize("name,w", [("snr_lolv1", 0.0), ("snr_lolv2_real", 0.1),
                                    ("snr_lolv2_synthetic", 0.02)])
def test_snr_losses(name, w):
    rng = np.random.default_rng(2)
    gt, lq = _batch(rng)
    out = _pred(rng, gt)
    vgg = StubVGG()
    want = L.snr_loss(out, gt, vgg, vgg_weight=w)
    got = _ours(recipe_lib.load(name), step_lib.Outputs(out, (out,)), gt, lq, vgg)
    assert got == pytest.approx(float(want), rel=1e-6)


def test_aecrnet_loss():
    rng = np.random.default_rng(3)
    gt, lq = _batch(rng)
    out = jnp.tanh(_pred(rng, gt))
    vgg = StubVGG()
    want = L.l1(out, gt) + 0.1 * L.contrastive_regularization(out, gt, lq, vgg)
    got = _ours(recipe_lib.load("aecrnet_its"), step_lib.Outputs(out, (out,)), gt, lq, vgg)
    assert got == pytest.approx(float(want), rel=1e-6)


def test_restormer_loss_is_l1():
    rng = np.random.default_rng(4)
    gt, lq = _batch(rng)
    out = _pred(rng, gt)
    got = _ours(recipe_lib.load("restormer_deraining"), step_lib.Outputs(out, (out,)), gt, lq)
    assert got == pytest.approx(float(jnp.mean(jnp.abs(out - gt))), rel=1e-6)


def test_optimizers_of_the_recipes():
    def o(name):
        c = recipe_lib.load(name).optimizer
        return c.name, c.lr, c.b1, c.b2, c.weight_decay, c.grad_clip_norm

    assert o("mprnet_deblurring") == ("adam", 2e-4, 0.9, 0.999, 0.0, 0.0)
    assert o("mprnet_denoising") == ("adam", 2e-4, 0.9, 0.999, 1e-8, 0.0)  # coupled L2
    assert o("darkir_lolblur") == ("adamw", 5e-4, 0.9, 0.9, 1e-3, 0.0)     # decoupled
    assert o("snr_lolv1") == ("adam", 4e-4, 0.9, 0.99, 0.0, 0.0)
    assert o("aecrnet_its") == ("adam", 1e-4, 0.9, 0.999, 0.0, 0.0)
    assert o("restormer_real_denoising") == ("adamw", 3e-4, 0.9, 0.999, 1e-4, 0.01)
    r = recipe_lib.load("mprnet_denoising")
    assert (r.mixup.kind, r.mixup.alpha, r.mixup.start_step) == ("per_sample", 0.6, 5 * 6000)
    r = recipe_lib.load("restormer_real_denoising")
    assert (r.mixup.kind, r.mixup.alpha, r.mixup.prob) == ("batch", 1.2, 0.5)
    assert recipe_lib.load("restormer_motion_deblurring").mixup.kind == "none"
    sizes = {n: (recipe_lib.load(n).batch_size, recipe_lib.load(n).total_steps)
             for n in ("mprnet_deblurring", "mprnet_deraining", "mprnet_denoising",
                       "darkir_lolblur", "snr_lolv1", "snr_lolv2_real", "aecrnet_its")}
    assert sizes == {"mprnet_deblurring": (16, 396_000), "mprnet_deraining": (16, 214_250),
                     "mprnet_denoising": (16, 480_000), "darkir_lolblur": (16, 318_500),
                     "snr_lolv1": (32, 600_000), "snr_lolv2_real": (4, 600_000),
                     "aecrnet_its": (16, 500_000)}


def test_vgg_weights_reader_matches_porting(tmp_path):
    torch = pytest.importorskip("torch")
    from flax import nnx

    from porting.reference import vgg as tvgg

    ref = tvgg.VGG19Features(num_layers=30)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    torch.save(ref.state_dict(), tmp_path / "vgg.pth")
    np.savez(tmp_path / "vgg.npz", **sd)
    want = nnx.to_pure_dict(nnx.state(tvgg.load_torchvision_vgg19(tmp_path / "vgg.pth",
                                                                  num_layers=30), nnx.Param))
    _, got = step_lib.load_vgg(str(tmp_path / "vgg.npz"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="vgg_weights"):
        step_lib.load_vgg(None)
