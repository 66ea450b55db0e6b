"""DarkIR: Flax port vs the independent torch reference (blocks, both released variants, gradients,
checkpoint round trips, strict loading), DarkIR's training losses, and one-step training parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import porting
from flaxrestore import layers, models
from flaxrestore.models import darkir as D
from flaxrestore.xla_cpu import depthwise as xla_depthwise
from porting import checkpoint, convert, reference
from porting.reference import darkir as TD

VARIANTS = ["darkir:m", "darkir:l"]
# A reduced configuration with every kind of block (EBlock, DBlock with dilations 1/4/9, down,
# up, skip, side_out) for the gradient / training-step checks. Their compile time grows with the
# number of blocks, not their width, so it has one level (pads to a multiple of 2, side output at
# 1/2); the released depths are checked by the (slow) full-width gradient tests.
TINY = dict(width=4, enc_blk_nums=(1,), dec_blk_nums=(1,), middle_blk_num_enc=1,
            middle_blk_num_dec=1)
# From the spec (counted on the official classes): state_dict entries, parameters, side_out params.
SPEC_COUNTS = {"darkir:m": (343, 3_321_638, 6_915), "darkir:l": (343, 12_957_254, 13_827)}


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random gates and norms: beta/gamma start at zero (every block an identity) and the norms at
    ones/zeros, so without this most of the network would be left untested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("beta", "gamma")) or ".norm" in name or name.startswith("norm"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _rel(a, b) -> float:
    """max |a - b| relative to max(1, max |b|) (the whole-network criterion)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def _grad_rel(a, b) -> float:
    """max |a - b| relative to max |b| (the gradient criterion)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())


# --------------------------------------------------------------------------------------------
# state dict layout


@pytest.mark.parametrize("name", VARIANTS)
def test_reference_state_dict_matches_release(name):
    ref = reference.build(name)
    sd = ref.state_dict()
    n_keys, n_params, n_side = SPEC_COUNTS[name]
    c = models.get_config(name).width
    assert len(sd) == n_keys
    assert sum(p.numel() for p in ref.parameters()) == n_params
    assert sd["side_out.weight"].numel() + sd["side_out.bias"].numel() == n_side
    # shapes the spec lists explicitly
    assert sd["intro.weight"].shape == (c, 3, 3, 3)
    assert sd["ups.0.0.weight"].shape == (16 * c, 8 * c, 1, 1) and "ups.0.0.bias" not in sd
    assert sd["downs.2.weight"].shape == (8 * c, 4 * c, 2, 2)
    assert sd["encoders.2.modules_list.1.gamma"].shape == (1, 4 * c, 1, 1)
    assert sd["encoders.0.modules_list.0.extra_conv.weight"].shape == (c, 1, 3, 3)
    assert sd["decoders.2.modules_list.0.extra_conv.weight"].shape == (2 * c, 2, 3, 3)
    assert sd["middle_blks_dec.modules_list.1.branches.2.branch.0.weight"].shape == (16 * c, 1, 3, 3)
    assert sd["middle_blks_enc.modules_list.0.freq.process1.2.weight"].shape == (8 * c, 16 * c, 1, 1)
    assert sd["side_out.weight"].shape == (3, 8 * c, 3, 3)
    assert not any(k.startswith("middle_blks.") or "module." in k for k in sd)
    # the flax module expects exactly those keys and shapes
    expected = convert.expected_shapes(models.create_abstract(name))
    assert expected == {k: tuple(v.shape) for k, v in sd.items()}
    assert reference.release_key(name) == "params"


def test_registry():
    assert models.names("darkir") == sorted(VARIANTS)
    assert models.get_config("darkir:l").width == 64
    assert isinstance(models.create_abstract("darkir:m", **TINY), D.DarkIR)
    ln = D.LayerNorm2d(4)  # LayerNorm2d: eps 1e-6, weight ones, bias zeros
    assert ln.eps == 1e-6 and np.all(np.asarray(ln.scale[...]) == 1) and not np.any(ln.bias[...])
    m = convert.torch_to_flax("darkir:m", reference.build("darkir:m", **TINY).state_dict(), **TINY)
    with pytest.raises(ValueError, match="input channels"):
        m(jnp.zeros((1, 16, 16, 1)))


# --------------------------------------------------------------------------------------------
# blocks


BLOCKS = {  # name -> (torch block, flax block) constructors for c channels
    "LayerNorm2d": (lambda c: TD.LayerNorm2d(c), lambda c, r: D.LayerNorm2d(c)),
    "FreMLP": (lambda c: TD.FreMLP(c), lambda c, r: D.FreMLP(c, rngs=r)),
    "EBlock": (lambda c: TD.EBlock(c, extra_depth_wise=True),
               lambda c, r: D.EBlock(c, extra_depth_wise=True, rngs=r)),
    "EBlock-no-extra-dw": (lambda c: TD.EBlock(c), lambda c, r: D.EBlock(c, rngs=r)),
    "DBlock": (lambda c: TD.DBlock(c, dilations=[1, 4, 9], extra_depth_wise=True),
               lambda c, r: D.DBlock(c, dilations=(1, 4, 9), extra_depth_wise=True, rngs=r)),
    "DBlock-no-extra-dw": (lambda c: TD.DBlock(c, dilations=[1, 2]),
                           lambda c, r: D.DBlock(c, dilations=(1, 2), rngs=r)),
    "grouped-conv": (lambda c: torch.nn.Conv2d(c, c, 3, padding=1, groups=c // 2),
                     lambda c, r: layers.Conv2d(c, c, 3, padding=1, groups=c // 2, rngs=r)),
}


def _block_pair(block: str, c: int, seed: int):
    """The torch block with random weights (gates and norms too) and the Flax block holding them
    (built abstractly: no Flax initialisation to compile)."""
    torch.manual_seed(seed)
    make_t, make_f = BLOCKS[block]
    t = make_t(c)
    if block == "LayerNorm2d":
        with torch.no_grad():
            t.weight.add_(0.3 * torch.randn(c))
            t.bias.add_(0.3 * torch.randn(c))
    _perturb(t, seed)
    f = nnx.eval_shape(lambda: make_f(c, nnx.Rngs(0)))
    convert.load_state_dict(f, t.state_dict())
    return t, f


@pytest.mark.parametrize("block,hw", [(b, (13, 19)) for b in BLOCKS]
                         + [("FreMLP", (16, 20)), ("FreMLP", (12, 17)), ("EBlock", (16, 20))])
@pytest.mark.both_lowerings
def test_block_forward(block, hw):
    """Blocks at odd (and for the FFT also even) sizes, <= 1e-5 max abs diff; the odd widths
    check irfft2's ``s`` and the Hermitian-redundant columns."""
    c = 32 if block == "grouped-conv" else 16
    t, f = _block_pair(block, c, seed=0)
    x = np.random.default_rng(0).standard_normal((2, *hw, c)).astype(np.float32)
    with torch.no_grad():
        ref = _nhwc(t(_nchw(x)))
    out = np.asarray(f(jnp.asarray(x)))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5, np.abs(out - ref).max()


@pytest.mark.parametrize("block", ["FreMLP", "grouped-conv"])
@pytest.mark.both_lowerings
def test_block_gradients_under_jit(block):
    """Gradients w.r.t. input and every parameter through jax.jit(jax.grad): the FFT path and
    the grouped conv's hand-written backward. (Every other block's gradients are checked in the
    whole network by tests/test_train_families.py and test_released_grads.py.)"""
    t, f = _block_pair(block, 8, seed=1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 11, 15, 8)).astype(np.float32)
    w = rng.standard_normal((2, 11, 15, 8)).astype(np.float32)

    xt = _nchw(x).requires_grad_(True)
    (t(xt) * _nchw(w)).mean().backward()

    @nnx.jit
    def grads(module, x):
        return nnx.grad(lambda m, x: jnp.mean(m(x) * w), argnums=(0, 1))(module, x)

    gm, gx = grads(f, jnp.asarray(x))
    assert _grad_rel(gx, _nhwc(xt.grad)) <= 1e-4
    fg = convert.state_to_torch_layout(f, gm)
    for k, p in t.named_parameters():
        assert _grad_rel(fg[k], p.grad.numpy()) <= 1e-4, k


@pytest.mark.parametrize("cin,cout,groups,pad,dil", [(12, 24, 4, 2, 2), (8, 8, 4, 0, 1),
                                                     (6, 12, 3, 3, 1)])
def test_grouped_conv_shifted_configs(cin, cout, groups, pad, dil):
    """The shifted grouped conv and its hand-written backward for other group shapes, paddings
    and dilations than DBlock's, against torch's grouped conv."""
    torch.manual_seed(10)
    t = torch.nn.Conv2d(cin, cout, 3, padding=pad, dilation=dil, groups=groups, bias=False)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 9, 8, cin)).astype(np.float32)
    xt = _nchw(x).requires_grad_(True)
    yt = t(xt)
    w = rng.standard_normal(_nhwc(yt).shape).astype(np.float32)
    (yt * _nchw(w)).sum().backward()
    kernel = jnp.asarray(t.weight.detach().numpy().transpose(2, 3, 1, 0))

    @jax.jit
    def fwd_grad(k, x):
        f = lambda k, x: xla_depthwise.grouped_conv_shifted(  # noqa: E731
            x, k, groups, (pad, pad), (dil, dil))
        return f(k, x), jax.grad(lambda k, x: jnp.sum(f(k, x) * w), argnums=(0, 1))(k, x)

    y, (gk, gx) = fwd_grad(kernel, jnp.asarray(x))
    assert np.abs(np.asarray(y) - _nhwc(yt)).max() <= 1e-5
    assert _grad_rel(gx, _nhwc(xt.grad)) <= 1e-5
    assert _grad_rel(gk, t.weight.grad.numpy().transpose(2, 3, 1, 0)) <= 1e-5


def test_fremlp_zero_spectrum_bins():
    """Bins with |z| = 0 (a zero channel, a constant channel): torch's angle(0) = 0; the port must
    give the same forward and finite, equal gradients (jnp.angle's gradient there is NaN)."""
    t, f = _block_pair("FreMLP", 4, seed=2)
    x = np.random.default_rng(2).standard_normal((1, 6, 7, 4)).astype(np.float32)
    x[..., 0] = 0.0
    x[..., 1] = 0.5
    xt = _nchw(x).requires_grad_(True)
    out_t = t(xt)
    out_t.sum().backward()
    graphdef, state = nnx.split(f)

    @jax.jit
    def fwd_and_grad(state, x):
        fn = lambda y: nnx.merge(graphdef, state)(y)  # noqa: E731
        return fn(x), jax.grad(lambda y: jnp.sum(fn(y)))(x)

    out_f, gx = fwd_and_grad(state, jnp.asarray(x))
    assert np.abs(np.asarray(out_f) - _nhwc(out_t)).max() <= 1e-5
    assert np.all(np.isfinite(np.asarray(gx)))
    assert np.abs(np.asarray(gx) - _nhwc(xt.grad)).max() <= 1e-5


# --------------------------------------------------------------------------------------------
# whole network


def _jitted_forward(module):
    """One compile for both calls: the plain forward and the side_loss forward."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), m(x, side_loss=True)

    return lambda x: run(state, x)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward_odd_size(name):
    """Released widths, batch 2, 61x83 (padded to 64x88 inside), side_loss off and on."""
    torch.manual_seed(3)
    ref = _perturb(reference.build(name).eval(), seed=3)
    module = porting.torch_to_flax(name, ref.state_dict())
    (x,) = D.DarkIR.example_inputs(models.get_config(name), 2, 61, 83, np.random.default_rng(3))
    with torch.no_grad():
        out_t = ref(_nchw(x))
        side_t, out2_t = ref(_nchw(x), side_loss=True)
    out_f, (side_f, out2_f) = _jitted_forward(module)(jnp.asarray(x))
    assert out_f.shape == (2, 61, 83, 3) and side_f.shape == (2, 8, 11, 3)
    assert _rel(out_f, _nhwc(out_t)) <= 1e-4
    assert _rel(out2_f, _nhwc(out2_t)) <= 1e-4
    assert _rel(side_f, _nhwc(side_t)) <= 1e-4
    # the blocks were really active: the output is far from the input
    assert np.abs(_nhwc(out_t) - x).mean() > 0.1


@pytest.mark.slow  # several CPU-minutes to compile; test_released_grads covers every block
@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_full_width(name):
    """Released widths, odd size (padded inside): d loss / d input and every parameter, with the
    side output and the restored image both in the loss."""
    torch.manual_seed(4)
    ref = _perturb(reference.build(name), seed=4)
    module = porting.torch_to_flax(name, ref.state_dict())
    rng = np.random.default_rng(4)
    x = rng.random((1, 13, 21, 3), dtype=np.float32)
    w_out = rng.standard_normal((1, 13, 21, 3)).astype(np.float32)
    w_side = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)

    xt = _nchw(x).requires_grad_(True)
    side_t, out_t = ref(xt, side_loss=True)
    ((out_t * _nchw(w_out)).mean() + (side_t * _nchw(w_side)).mean()).backward()

    def loss(m, x):
        side, out = m(x, side_loss=True)
        return jnp.mean(out * w_out) + jnp.mean(side * w_side)

    gm, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(module, jnp.asarray(x))
    assert _grad_rel(gx, _nhwc(xt.grad)) <= 1e-4
    fg = convert.state_to_torch_layout(module, gm)
    worst = {k: _grad_rel(fg[k], p.grad.numpy()) for k, p in ref.named_parameters()}
    assert len(worst) == 343
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    assert not bad, bad


def test_padding_is_zeros_bottom_right():
    """An odd-sized input gives the top-left crop of the output for its zero-padded version (and
    the same side output): the network pads with zeros at the bottom/right, nothing else."""
    torch.manual_seed(5)
    ref = _perturb(reference.build("darkir:m", **TINY), seed=5)
    m = convert.torch_to_flax("darkir:m", ref.state_dict(), **TINY)  # pads to a multiple of 2
    run = nnx.jit(lambda m, x: m(x, side_loss=True))
    x = np.random.default_rng(5).random((1, 13, 21, 3), dtype=np.float32)
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    side_a, out_a = run(m, jnp.asarray(x))
    side_b, out_b = run(m, jnp.asarray(padded))
    assert out_a.shape == (1, 13, 21, 3) and side_a.shape == (1, 7, 11, 3)
    np.testing.assert_allclose(np.asarray(out_a), np.asarray(out_b)[:, :13, :21], atol=1e-6)
    np.testing.assert_allclose(np.asarray(side_a), np.asarray(side_b), atol=1e-6)
    # the padded border changes the valid region (global pooling / FFT see it)
    edge = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
    assert np.abs(np.asarray(run(m, jnp.asarray(edge))[1])[:, :13, :21] - out_a).max() > 1e-4


# --------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("name", VARIANTS)
def test_release_file_round_trip(name, tmp_path):
    """A release-style file ({'params': state_dict}) -> Flax -> torch is bit-exact, strict."""
    torch.manual_seed(6)
    ref = _perturb(reference.build(name), seed=6)
    sd = ref.state_dict()
    path = tmp_path / "DarkIR_release.pt"
    torch.save({reference.release_key(name): sd}, path)
    loaded = checkpoint.load_state_dict_file(path)
    module = convert.torch_to_flax(name, loaded)
    back = convert.flax_to_torch(module)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    fresh = reference.build(name)
    fresh.load_state_dict(back, strict=True)


def test_strict_load_errors():
    """Strict loading names every missing key, unexpected key and shape mismatch.

    (Errors are provoked through ``convert.load_state_dict`` on the abstract module; with a
    variant name ``torch_to_flax`` also searches every registered model for a match, which builds
    each of them abstractly and is left to the converter's own tests.)"""
    sd = reference.build("darkir:m").state_dict()
    broken = dict(sd)
    del broken["decoders.1.modules_list.0.conv4.bias"]
    broken["middle_blks.0.weight"] = torch.zeros(1)
    broken["encoders.0.modules_list.0.beta"] = torch.zeros(1, 16, 1, 1)
    module = models.create_abstract("darkir:m")
    with pytest.raises(convert.ConversionError) as info:
        convert.load_state_dict(module, broken)
    msg = str(info.value)
    assert "1 missing key(s), 1 unexpected key(s), 1 shape mismatch(es)" in msg
    assert "decoders.1.modules_list.0.conv4.bias" in msg and "middle_blks.0.weight" in msg
    assert "encoders.0.modules_list.0.beta: (1, 16, 1, 1) vs (1, 32, 1, 1)" in msg
    # DarkIR-l weights into DarkIR-m: all but the two 3-channel biases mismatch; darkir:l fits
    large = {k: tuple(v.shape) for k, v in reference.build("darkir:l").state_dict().items()}
    with pytest.raises(convert.ConversionError,
                       match=r"0 missing key\(s\), 0 unexpected key\(s\), 341 shape"):
        convert.load_state_dict(module, {k: np.zeros(v, np.float32) for k, v in large.items()})
    assert convert.matching_variants(large, family="darkir") == ["darkir:l"]
    # a non-strict load fills what matches and reports the rest (the failed loads left the
    # module untouched)
    report = convert.load_state_dict(module, broken, strict=False)
    assert report == {"missing": ["decoders.1.modules_list.0.conv4.bias"],
                      "unexpected": ["middle_blks.0.weight"],
                      "mismatched": ["encoders.0.modules_list.0.beta"]}
    np.testing.assert_array_equal(np.asarray(module.intro.bias[...]), sd["intro.bias"].numpy())


# --------------------------------------------------------------------------------------------
# losses and training parity


def _vgg_pair(seed: int):
    """The torch VGG19 features (random weights, nothing downloaded) and the converted Flax one."""
    from flaxrestore import vgg as fvgg
    from porting.reference.vgg import VGG19Features

    torch.manual_seed(seed)
    vgg_t = VGG19Features(num_layers=30)
    vgg_f = nnx.eval_shape(lambda: fvgg.VGG19(rngs=nnx.Rngs(0), num_layers=30))
    convert.load_state_dict(vgg_f, vgg_t.state_dict())
    return vgg_t, vgg_f


def test_losses_match_torch():
    """Each DarkIR loss term: value and gradient w.r.t. both outputs. (The recipe total, without
    the frequency term as in the recipe, is checked by tests/test_train_families.py.)"""
    from flaxrestore import losses as L
    from porting.reference import losses as TL

    vgg_t, vgg_f = _vgg_pair(7)
    rng = np.random.default_rng(7)
    gt = rng.random((2, 32, 40, 3), dtype=np.float32)
    out = np.clip(gt + 0.2 * rng.standard_normal(gt.shape), -0.2, 1.2).astype(np.float32)
    side = rng.random((2, 4, 5, 3), dtype=np.float32)

    # (edge, frequency, side): value and gradient w.r.t. (side, out)
    def torch_terms(side, out, gt):
        return [TL.DarkIREdgeLoss()(out, gt), TL.FrequencyLoss()(out, gt),
                TL.EnhanceLoss(vgg_t)(side, gt)]

    @nnx.jit
    def flax_terms(vgg_f, side, out, gt):
        terms = [lambda s, o: L.darkir_edge_loss(o, gt),
                 lambda s, o: L.frequency_amplitude_loss(o, gt),
                 lambda s, o: L.darkir_side_loss(s, gt, vgg_f)]
        return [jax.value_and_grad(t, argnums=(0, 1))(side, out) for t in terms]

    results = flax_terms(vgg_f, jnp.asarray(side), jnp.asarray(out), jnp.asarray(gt))
    for i, (value, (g_side, g_out)) in enumerate(results):
        st, ot = _nchw(side).requires_grad_(True), _nchw(out).requires_grad_(True)
        vt = torch_terms(st, ot, _nchw(gt))[i]
        vt.backward()
        assert abs(float(value) - vt.item()) <= 1e-5 * max(1.0, abs(vt.item())), i
        assert float(value) > 0
        for gf, tt in ((g_side, st), (g_out, ot)):
            if tt.grad is None:  # the term does not depend on this output
                assert not np.any(np.asarray(gf)), i
            else:
                assert _grad_rel(gf, _nhwc(tt.grad)) <= 1e-4, i
    # the total adds the frequency term only when asked (off in the recipe)
    args = (jnp.asarray(side[:1]), jnp.asarray(out[:1]), jnp.asarray(gt[:1]))
    no_vgg = dict(perceptual_weight=0.0, side_perceptual_weight=0.0)
    base = float(L.darkir_loss(*args, vgg_f, **no_vgg))
    with_f = float(L.darkir_loss(*args, vgg_f, frequency_weight=2.0, **no_vgg))
    freq = float(L.frequency_amplitude_loss(args[1], args[2]))
    assert abs(with_f - base - 2.0 * freq) <= 1e-5 * with_f
    # the side output must come out at target size / scale
    with pytest.raises(ValueError, match="multiples of 8"):
        L.darkir_side_loss(jnp.zeros((1, 3, 5, 3)), jnp.zeros((1, 30, 40, 3)), vgg_f)


# One AdamW step of the LOLBlur loss (L1 + VGG + edge + side terms) through the trainer's own step,
# against torch float64 (loss, every gradient, the updated weights): tests/test_train_families.py.
# Input gradients of the whole network against float64: tests/test_verify.py (verify --grads).
