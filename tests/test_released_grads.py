"""Gradients at the released widths, for all five families, in ``make test``.

The per-family files check gradients at reduced widths (every layer type, cheap to compile) and
the released widths only under ``slow``. Here each family runs at its widest released width (the
channel counts, heads, expansion factors and transformer width of the official checkpoints) with
one block per level, on the smallest input that reaches every level (a 1x1 bottleneck for the
U-Nets, DarkIR's side output included; three 4x4-patch tokens, one masked, for SNR-Aware's
transformer: with a single unmasked key its softmax is constant and the query projection gets
no gradient): d loss / d input and d loss / d every parameter against the torch reference run
in float64 on the same weights, so the expectation carries no float32 noise of its own. Depth (blocks per level) changes no layer's
shape or code path; the released depths are in the slow tests of the family files.

Criterion: for the input and every parameter tensor, max |g_jax - g_torch| <= 1e-4 max |g_torch|
(README: gradients to 1e-4 relative), and no tensor's gradient is identically zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import porting
from porting import convert, reference

TOL = 1e-4
# XLA's backend optimisations off: compiling the five gradients took 64 CPU-s optimised, 31 s
# without, and the worst errors stayed of the same order (Restormer's 3.5e-5 against 2.2e-5; all
# others <= 7e-6). The optimised programs, the trainer's, are tested in test_train_families.py
# and the family files.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _perturb(ref: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values where the init is special (ones / zeros), so that nothing is an
    identity: norms, temperatures, DarkIR's gates, AECR-Net's DCN offsets/mask and mixes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if "norm" in name or last in ("temperature", "gamma", "beta", "w"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif "conv_offset_mask" in name:
                fan = p[0].numel() if p.dim() > 1 else 1
                p.copy_((0.3 / fan ** 0.5 if p.dim() > 1 else 0.5) * torch.randn(p.shape, generator=g))
            elif name.startswith("conv_first") and last == "weight":  # SNR: more token contrast
                p.mul_(3.0)
    return ref


def _snr_inputs(n, h, w, rng):
    """A dim image and an SNR map whose 4x4-patch means lie on both sides of 0.5."""
    x = rng.uniform(0.1, 0.4, (n, h, w, 3)).astype(np.float32)
    level = np.where((np.arange(w) // 16) % 2 == 0, 0.8, 0.2)[None, None, :, None]
    mask = (np.broadcast_to(level, (n, h, w, 1)) + rng.uniform(-0.1, 0.1, (n, h, w, 1)))
    return x, mask.astype(np.float32)


# family: (registry name, depth overrides (widths untouched), batch, height, width, train mode,
# call keywords)
CASES = {
    "restormer": ("restormer:motion_deblurring",
                  dict(num_blocks=(1, 1, 1, 1), num_refinement_blocks=1), 1, 8, 8, False, {}),
    "mprnet": ("mprnet:deblurring", dict(num_cab=1), 1, 8, 8, False, {}),
    # side_loss: the side output (its training loss) too, else side_out gets no gradient
    "darkir": ("darkir:l", dict(enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1),
                                middle_blk_num_enc=1, middle_blk_num_dec=1), 1, 8, 8, False,
               dict(side_loss=True)),
    # three tokens at quarter resolution (1 x 3), patch means 0.8, 0.2, 0.8
    "snr": ("snr", {}, 1, 16, 48, False, {}),
    # train mode: FastDeconv whitens with batch statistics (its eval mode at the released width
    # is in test_aecrnet.py); 2 x 12 x 12 gives 32 sampled patches for its 27 x 27 covariance
    "aecrnet": ("aecrnet", {}, 2, 12, 12, True, {}),
}


def _nchw64(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float64))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("family", list(CASES))
def test_gradients_at_released_width_match_torch_float64(family):
    name, depth, n, h, w, train, kwargs = CASES[family]
    seed = sorted(CASES).index(family) + 11
    torch.manual_seed(seed)
    ref = _perturb(reference.build(name, **depth), seed)
    module = porting.torch_to_flax(name, ref.state_dict(), **depth)
    ref = ref.double().train(train)
    module.train() if train else module.eval()

    rng = np.random.default_rng(seed)
    if family == "snr":
        x, mask = _snr_inputs(n, h, w, rng)
        extra = [mask]
    else:
        x = rng.random((n, h, w, 3), dtype=np.float32)
        extra = []

    # torch, float64: loss = sum over outputs of mean(output * fixed random projection)
    xt = _nchw64(x).requires_grad_(True)
    outs_t = ref(xt, *[_nchw64(e) for e in extra], **kwargs)
    outs_t = list(outs_t) if isinstance(outs_t, (tuple, list)) else [outs_t]
    projs = [rng.standard_normal(o.shape).astype(np.float32) for o in outs_t]  # NCHW
    sum((o * torch.from_numpy(p.astype(np.float64))).mean() for o, p in zip(outs_t, projs)).backward()

    # flax, float32, one jitted gradient with respect to the parameters and the input (nnx.grad
    # inside: in train mode FastDeconv writes its running statistics), compiled unoptimised
    projs_f = [jnp.asarray(p.transpose(0, 2, 3, 1)) for p in projs]
    graphdef, state = nnx.split(module)

    def grads(state, x, extra):
        def loss(m, x):
            outs = m(x, *extra, **kwargs)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            return sum(jnp.mean(o * p) for o, p in zip(outs, projs_f))
        return nnx.grad(loss, argnums=(0, 1))(nnx.merge(graphdef, state), x)

    g_params, g_x = jax.jit(grads, compiler_options=FAST_COMPILE)(
        state, jnp.asarray(x), tuple(jnp.asarray(e) for e in extra))

    grads_f = convert.state_to_torch_layout(module, g_params)
    grads_t = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    grads_t["<input>"] = xt.grad.permute(0, 2, 3, 1).numpy()
    grads_f["<input>"] = np.asarray(g_x)
    assert set(grads_t) <= set(grads_f)
    report = {}
    for k, g_t in grads_t.items():
        scale = float(np.abs(g_t).max())
        assert scale > 0, f"{k}: zero gradient in torch (the test would compare nothing)"
        report[k] = float(np.abs(np.asarray(grads_f[k], np.float64) - g_t).max()) / scale
    worst = sorted(report.items(), key=lambda kv: -kv[1])[:5]
    print(family, len(report), "tensors; worst", worst)
    assert worst[0][1] <= TOL, worst
