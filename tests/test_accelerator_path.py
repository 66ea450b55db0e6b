"""The accelerator path, tested on the CPU: what a TPU or GPU compiles, compared with torch.

In accelerator mode (``flaxrestore.lowering.accelerator_path()``, or
``FLAXRESTORE_LOWERING=accelerator``) a CPU process compiles exactly the program a TPU/GPU gets:
library convs, ``feature_group_count`` depthwise convs, ``reduce_window``, plain autodiff, none of
:mod:`flaxrestore.xla_cpu`. Here every family (reduced widths, constants randomised) runs its
forward and the gradients of a loss for the input and every parameter in that mode, compiled as
the trainer compiles, against the torch reference, by the README's criterion (the float64
yardstick of ``porting verify``). The block tests of each family and the layer tests run in both modes as well
(``@pytest.mark.both_lowerings``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flaxrestore import lowering, models
from porting import reference, verify

FAMILY_SMALL = {
    # (the dual-pixel variant differs in its input channels and skip only: not a lowering matter)
    "restormer:motion_deblurring": dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1),
    "mprnet:deblurring": dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1),
    "darkir:m": dict(width=8, enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1),
                     middle_blk_num_enc=1, middle_blk_num_dec=1),
    "snr": dict(nf=8),
    "aecrnet": dict(ngf=8),
}


@pytest.mark.parametrize("name", sorted(FAMILY_SMALL))
def test_network_on_the_accelerator_path_matches_torch(name):
    """Forward and every gradient, compiled in accelerator mode, against torch (float32 both)."""
    cfg = FAMILY_SMALL[name]
    torch.manual_seed(3)
    ref = reference.build(name, **cfg)
    verify.randomise_constants(ref, seed=3)
    with lowering.accelerator_path():
        report = verify.compare(name, ref, batch=2, grads=True, jit=True, seed=3,
                                model_overrides=cfg)
    assert report.outputs and report.grads, report.format()
    # the README's criterion (porting verify's): each output and gradient within
    # max(1e-4, k x torch float32's own error) of torch's float64 run
    assert report.ok(), report.format()


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r'custom_call_target="([^"]+)"', text)) | set(
        re.findall(r"stablehlo.custom_call @([\w.]+)", text))


def _darkir_grad_program():
    cfg = FAMILY_SMALL["darkir:m"]
    net = models.create("darkir:m", rngs=nnx.Rngs(0), **cfg)
    graph, state = nnx.split(net)
    x = jnp.ones((1, 16, 16, 3), jnp.float32)

    def loss(st, x):
        return jnp.mean(nnx.merge(graph, st)(x) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x)


def test_accelerator_mode_compiles_no_cpu_kernel():
    """The switch really switches: in auto mode a CPU program of DarkIR's gradient holds the
    native kernels (when they build) and no grouped library conv; in accelerator mode it holds no
    flaxrestore kernel and the depthwise convs are feature_group_count convs."""
    from flaxrestore.xla_cpu import native

    auto = _darkir_grad_program().as_text()
    if jax.default_backend() == "cpu" and native.available():
        assert any(c.startswith("flaxrestore_") for c in _custom_calls(auto))
    with lowering.accelerator_path():
        acc = _darkir_grad_program().as_text()
    assert not any(c.startswith("flaxrestore_") for c in _custom_calls(acc)), _custom_calls(acc)
    assert re.search(r"feature_group_count = (?!1\b)\d+", acc)
    assert lowering.mode() == "auto"  # the context restored the mode


def test_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv(lowering.LOWERING_ENV, "accelerator")
    assert lowering.mode() == "accelerator"
    assert "accelerator" in lowering.describe("cpu")
    with lowering.accelerator_path(False):
        assert lowering.mode() == "auto"
    monkeypatch.setenv(lowering.LOWERING_ENV, "gpu-ish")
    with pytest.raises(ValueError, match="expected one of auto, accelerator"):
        lowering.mode()
    monkeypatch.delenv(lowering.LOWERING_ENV)
    assert lowering.mode() == "auto" and "XLA:CPU" in lowering.describe("cpu")


def test_per_platform_branches():
    """A CPU program runs the cpu branch, accelerator mode the other one (tests/test_plan.py
    compiles the default branch for a deviceless TPU from this CPU process)."""
    def f(x):
        return lowering.per_platform(cpu=lambda: x + 1.0, default=lambda: x * 3.0)

    x = jnp.ones((4,), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), 2.0)
    with lowering.accelerator_path():
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), 3.0)
    # eagerly: chosen at once for the default device
    assert float(f(x)[0]) == (2.0 if jax.default_backend() == "cpu" else 3.0)


@pytest.mark.both_lowerings
def test_both_lowerings_variants_run_in_their_mode(request):
    """The `accelerator-path` variant of a `both_lowerings` test traces in accelerator mode and
    the `cpu-lowering` one per platform (until conftest entered the mode, both ran the CPU
    lowering)."""
    accelerator = "accelerator-path" in request.node.name
    assert lowering.mode() == ("accelerator" if accelerator else "auto")
    f = jax.jit(lambda x: lowering.per_platform(cpu=lambda: x + 1.0, default=lambda: x * 3.0))
    expected = 3.0 if accelerator or jax.default_backend() != "cpu" else 2.0
    np.testing.assert_array_equal(np.asarray(f(jnp.ones((2,)))), expected)
