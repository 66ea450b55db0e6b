"""MPRNet: Flax port vs the torch reference, block by block, for every released variant, its losses
(Charbonnier, edge) and one training step of its recipe."""

import functools

import numpy as np
import pytest
import torch
from flax import nnx

import jax
import jax.numpy as jnp
import porting
from flaxrestore import layers, losses, models
from flaxrestore.models import mprnet as M
from porting import convert, reference
from porting.reference import losses as TL
from porting.reference import mprnet as TM

VARIANTS = models.names("mprnet")
# reduced widths for the expensive checks (gradients, optimizer step)
SMALL = dict(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=1)

# From the spec (counted on the official classes): (n_feat, scale_unetfeats, scale_orsnetfeats),
# unique parameters, and the sum of state_dict numels (the PReLU scalar counted 55 times).
SPEC = {
    "mprnet:deblurring": ((96, 48, 32), 20_127_073, 20_127_127),
    "mprnet:deraining": ((40, 20, 16), 3_637_249, 3_637_303),
    "mprnet:denoising": ((80, 48, 32), 15_741_025, 15_741_079),
}
N_KEYS, N_CABS = 316, 55
# XLA:CPU spends most of these tests compiling; without LLVM optimisation it compiles about
# twice as fast (measured: 30 s -> 14 s CPU for the reduced-width gradient), and the tiny test
# inputs run fast either way. Float32 semantics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Under `pytest -n 2` on 2 cores, torch's second intra-op thread mostly spins: one thread
    # is ~20x cheaper in CPU time here (measured on this file's models).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def prelu_of(ref: TM.MPRNet) -> torch.nn.PReLU:
    return ref.shallow_feat1[1].body[1]


def reference_model(name, seed=0, **overrides) -> TM.MPRNet:
    """The torch reference with random weights, its shared PReLU slope moved off the 0.25 init."""
    torch.manual_seed(seed)
    ref = reference.build(name, **overrides)
    with torch.no_grad():
        prelu_of(ref).weight.fill_(0.1 + 0.3 * torch.rand(()).item())
    return ref


@functools.lru_cache(maxsize=None)
def converted(name):
    """(torch reference, its state dict, the Flax module converted from it) at released widths.

    Built once per variant for this file (conversion and the abstract model are not free);
    tests must not modify them.
    """
    ref = reference_model(name).eval()
    sd = ref.state_dict()
    return ref, sd, porting.torch_to_flax(name, sd)


def jit_forward(module, x):
    graphdef, state = nnx.split(module)
    return jit(lambda s, a: nnx.merge(graphdef, s)(a))(state, jnp.asarray(x))


def rel_diff(flax_value, torch_value, floor=1.0) -> float:
    a, b = np.asarray(flax_value, np.float64), np.asarray(torch_value, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(floor, np.abs(b).max()))


# --------------------------------------------------------------------------- registry, keys

def test_registry_lists_the_three_releases():
    assert set(VARIANTS) == set(SPEC)
    for name, (widths, _, _) in SPEC.items():
        cfg = models.get_config(name)
        assert (cfg.n_feat, cfg.scale_unetfeats, cfg.scale_orsnetfeats) == widths
        assert (cfg.in_c, cfg.out_c, cfg.num_cab, cfg.kernel_size, cfg.reduction, cfg.bias) == \
            (3, 3, 8, 3, 4, False)
    assert M.MPRNet.protocol.multiple == 8
    assert reference.release_key("mprnet:deblurring") == "state_dict"
    (x,) = M.MPRNet.example_inputs(models.get_config("mprnet:deraining"), 2, 16, 24,
                                   np.random.default_rng(0))
    assert x.shape == (2, 16, 24, 3) and x.dtype == np.float32


@pytest.mark.parametrize("name", VARIANTS)
def test_reference_state_dict_matches_release(name):
    (n, s, o), n_unique, n_total = SPEC[name]
    ref, sd, module = converted(name)
    assert len(sd) == N_KEYS
    assert sum(p.numel() for p in ref.parameters()) == n_unique
    assert sum(v.numel() for v in sd.values()) == n_total
    # a few shapes the spec lists explicitly
    assert sd["shallow_feat1.0.weight"].shape == (n, 3, 3, 3)
    assert sd["stage1_encoder.down23.down.1.weight"].shape == (n + 2 * s, n + s, 1, 1)
    assert sd["stage2_encoder.csff_dec3.weight"].shape == (n + 2 * s, n + 2 * s, 1, 1)
    assert sd["stage3_orsnet.orb3.body.8.weight"].shape == (n + o, n + o, 3, 3)
    assert sd["stage3_orsnet.up_dec2.0.up.1.weight"].shape == (n + s, n + 2 * s, 1, 1)
    assert sd["sam23.conv2.weight"].shape == (3, n, 1, 1)
    assert sd["concat23.weight"].shape == (n + o, 2 * n, 3, 3)
    assert "stage1_encoder.csff_enc1.weight" not in sd
    prelu_keys = [k for k, v in sd.items() if v.shape == (1,)]
    assert len(prelu_keys) == N_CABS and all(k.endswith("body.1.weight") for k in prelu_keys)
    assert len({sd[k].data_ptr() for k in prelu_keys}) == 1  # one shared parameter
    # the flax module expects exactly those keys and shapes
    expected = convert.expected_shapes(module)
    assert expected == {k: tuple(v.shape) for k, v in sd.items()}


def test_flax_model_has_one_shared_prelu():
    module = converted("mprnet:deraining")[2]
    layout = convert.torch_layout(module)
    prelu = [slot for k, slot in layout.items() if slot.flax_shape == (1,)]
    assert len(prelu) == N_CABS
    assert len({id(slot.variable) for slot in prelu}) == 1
    assert all(k == "weight" and isinstance(s.variable, nnx.Param)
               for k, s in [(slot.flax_path[-1], slot) for slot in prelu])
    # 316 keys, 262 distinct tensors (the spec's count)
    assert len(jax.tree.leaves(nnx.state(module, nnx.Param))) == N_KEYS - N_CABS + 1
    assert not hasattr(module, "act")  # a local in the original: no top-level `act` key


# --------------------------------------------------------------------------- blocks

_C, _S, _K, _R = 8, 4, 3, 4  # block widths: n_feat, scale_unetfeats, kernel_size, reduction
_ENC = [(2, 8, 12, _C), (2, 4, 6, _C + _S), (2, 2, 3, _C + 2 * _S)]  # encoder/decoder features

# name -> (torch block from (act), flax block from (act, rngs), NHWC input shapes); `act` is the
# PReLU every CAB of the block shares
BLOCKS = {
    "CALayer": (lambda a: TM.CALayer(_C, _R, bias=True),
                lambda a, rngs: M.CALayer(_C, _R, bias=True, rngs=rngs), [(2, 8, 12, _C)]),
    "CAB": (lambda a: TM.CAB(_C, _K, _R, False, a),
            lambda a, rngs: M.CAB(_C, _K, _R, False, a, rngs=rngs), [(2, 8, 12, _C)]),
    "CAB-bias": (lambda a: TM.CAB(_C, _K, _R, True, a),
                 lambda a, rngs: M.CAB(_C, _K, _R, True, a, rngs=rngs), [(2, 8, 12, _C)]),
    "SAM": (lambda a: TM.SAM(_C, 1, False), lambda a, rngs: M.SAM(_C, 1, False, rngs=rngs),
            [(2, 8, 12, _C), (2, 8, 12, 3)]),
    "DownSample": (lambda a: TM.DownSample(_C, _S),
                   lambda a, rngs: M.DownSample(_C, _S, rngs=rngs), [(2, 8, 12, _C)]),
    "DownSample-odd": (lambda a: TM.DownSample(_C, _S),
                       lambda a, rngs: M.DownSample(_C, _S, rngs=rngs), [(2, 7, 9, _C)]),
    "UpSample": (lambda a: TM.UpSample(_C, _S),
                 lambda a, rngs: M.UpSample(_C, _S, rngs=rngs), [(2, 4, 6, _C + _S)]),
    "SkipUpSample": (lambda a: TM.SkipUpSample(_C, _S),
                     lambda a, rngs: M.SkipUpSample(_C, _S, rngs=rngs),
                     [(2, 4, 6, _C + _S), (2, 8, 12, _C)]),
    "Encoder": (lambda a: TM.Encoder(_C, _K, _R, a, False, _S, csff=False),
                lambda a, rngs: M.Encoder(_C, _K, _R, a, False, _S, csff=False, rngs=rngs),
                [(2, 8, 12, _C)]),
    "Encoder-csff": (lambda a: TM.Encoder(_C, _K, _R, a, False, _S, csff=True),
                     lambda a, rngs: M.Encoder(_C, _K, _R, a, False, _S, csff=True, rngs=rngs),
                     [(2, 8, 12, _C)] + _ENC + _ENC),
    "Decoder": (lambda a: TM.Decoder(_C, _K, _R, a, False, _S),
                lambda a, rngs: M.Decoder(_C, _K, _R, a, False, _S, rngs=rngs), _ENC),
    "ORB": (lambda a: TM.ORB(_C + 4, _K, _R, a, False, 2),
            lambda a, rngs: M.ORB(_C + 4, _K, _R, a, False, 2, rngs=rngs), [(2, 8, 12, _C + 4)]),
    "ORSNet": (lambda a: TM.ORSNet(_C, 4, _K, _R, a, False, _S, 1),
               lambda a, rngs: M.ORSNet(_C, 4, _K, _R, a, False, _S, 1, rngs=rngs),
               [(2, 8, 12, _C + 4)] + _ENC + _ENC),
}


def _call_block(block, name, xs):
    if name == "Encoder-csff":
        return block(xs[0], xs[1:4], xs[4:7])
    if name == "Decoder":
        return block(list(xs))
    if name == "ORSNet":
        return block(xs[0], xs[1:4], xs[4:7])
    return block(*xs)


def _flat(out):
    if isinstance(out, (list, tuple)):
        return [o for item in out for o in _flat(item)]
    return [out]


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.both_lowerings
def test_block_forward(block):
    torch.manual_seed(0)
    make_torch, make_flax, shapes = BLOCKS[block]
    t = make_torch(torch.nn.PReLU())
    # abstract: every variable is filled from the torch block below (no random init to compile)
    f = nnx.eval_shape(lambda: make_flax(layers.PReLU(), nnx.Rngs(0)))
    with torch.no_grad():
        for p in t.parameters():
            if p.shape == (1,):  # the PReLU slope
                p.fill_(0.17)
    convert.load_state_dict(f, t.state_dict())
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(sh).astype(np.float32) for sh in shapes]
    with torch.no_grad():
        ref = [nhwc(o) for o in _flat(_call_block(t, block, [nchw(x) for x in xs]))]
    graphdef, state = nnx.split(f)  # one compile per block: cheaper than eager op-by-op
    run = jit(lambda st, a: _call_block(nnx.merge(graphdef, st), block, a))
    out = [np.asarray(o) for o in _flat(run(state, [jnp.asarray(x) for x in xs]))]
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        assert np.abs(o - r).max() <= 1e-5


# --------------------------------------------------------------------------- whole networks

@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward(name):
    ref, _, module = converted(name)
    (x,) = M.MPRNet.example_inputs(module.config, 2, 16, 24, np.random.default_rng(0))
    with torch.no_grad():
        expected = [nhwc(o) for o in ref(nchw(x))]
    outs = jit_forward(module, x)
    assert isinstance(outs, list) and len(outs) == 3  # [stage3, stage2, stage1]
    for o, e in zip(outs, expected):
        assert o.shape == (2, 16, 24, 3)
        assert rel_diff(o, e) <= 1e-4
    # the three stages really differ, so the order is checked by the comparison above
    assert np.abs(expected[0] - expected[1]).max() > 1e-3
    assert np.abs(expected[1] - expected[2]).max() > 1e-3


def test_rejects_sizes_not_multiple_of_8():
    m = converted("mprnet:deraining")[2]
    with pytest.raises(ValueError, match="divisible by 8"):
        m(jnp.zeros((1, 12, 16, 3)))
    with pytest.raises(ValueError, match="input channels"):
        m(jnp.zeros((1, 16, 16, 1)))


# --------------------------------------------------------------------------- conversion

def test_round_trip_is_bit_exact_and_loads_strictly():
    name = "mprnet:deraining"
    ref, sd, module = converted(name)
    back = porting.flax_to_torch(module)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # every PReLU alias written, as one shared tensor
    prelu = [back[k] for k in sd if sd[k].shape == (1,)]
    assert len(prelu) == N_CABS and len({p.data_ptr() for p in prelu}) == 1
    fresh = reference.build(name)
    fresh.load_state_dict(back, strict=True)
    assert torch.equal(prelu_of(fresh).weight, prelu_of(ref).weight)


def test_strict_load_errors():
    """Strict loading names every problem and leaves the module untouched."""
    _, sd, module = converted("mprnet:deraining")
    sd = {k: v.clone() for k, v in sd.items()}
    before = porting.flax_to_numpy(module)

    missing = {k: v for k, v in sd.items() if k != "tail.weight"}
    with pytest.raises(porting.ConversionError, match=r"1 missing key.*\n.*\n\s+tail.weight"):
        porting.load_state_dict(module, missing)

    extra = dict(sd, **{"stage1_encoder.csff_enc1.weight": torch.zeros(40, 40, 1, 1)})
    with pytest.raises(porting.ConversionError, match="unexpected.*\n.*csff_enc1"):
        porting.load_state_dict(module, extra)

    # denoising widths (80/48/32) in the deraining model: every conv is the wrong shape
    wrong = {k: torch.zeros(v.shape) for k, v in converted("mprnet:denoising")[1].items()}
    with pytest.raises(porting.ConversionError, match=f"{N_KEYS - N_CABS} shape mismatch"):
        porting.load_state_dict(module, wrong)
    with pytest.raises(porting.ConversionError,
                       match=r"1 shape mismatch.*\n.*\n\s+tail.weight: \(3, 112, 3, 3\) vs \(3, 56, 3, 3\)"):
        porting.load_state_dict(module, dict(sd, **{"tail.weight": wrong["tail.weight"]}))

    # one PReLU alias that disagrees with the others is no MPRNet checkpoint
    bad = dict(sd)
    bad["stage3_orsnet.orb2.body.5.body.1.weight"] = sd["shallow_feat1.1.body.1.weight"] + 0.5
    with pytest.raises(porting.ConversionError, match="aliases disagree"):
        porting.load_state_dict(module, bad)

    after = porting.flax_to_numpy(module)
    assert all(np.array_equal(after[k], v) for k, v in before.items())

    # partial loads are possible on request, and report what they skipped
    small = models.create_abstract("mprnet:deraining", **SMALL)
    report = porting.load_state_dict(small, {"tail.weight": sd["tail.weight"]}, strict=False)
    assert report["mismatched"] == ["tail.weight"]
    assert len(report["missing"]) == len(convert.torch_layout(small)) - 1


def test_release_file_layout(tmp_path):
    """The official file layout: {'epoch', 'state_dict', 'optimizer'}, maybe 'module.' keys."""
    name = "mprnet:deraining"
    sd = reference_model(name, seed=5, **SMALL).state_dict()
    path = tmp_path / "model_deraining.pth"
    torch.save({"epoch": 250, "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {}}, path)
    module = porting.load_torch_checkpoint(name, path, key=reference.release_key(name), **SMALL)
    back = porting.flax_to_numpy(module)
    assert set(back) == set(sd)
    assert all(np.array_equal(back[k], v.numpy()) for k, v in sd.items())


# --------------------------------------------------------------------------- losses

def _loss_inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)


def _torch_value_and_grad(fn, pred, target, dtype=torch.float32):
    tp = nchw(pred).to(dtype).requires_grad_()
    v = fn(tp, nchw(target).to(dtype))
    v.backward()
    return v.item(), nhwc(tp.grad)


@pytest.mark.parametrize("shape", [(2, 16, 24, 3), (2, 19, 27, 3)])
def test_charbonnier(shape):
    p, t = _loss_inputs(shape)
    v, g = jit(jax.value_and_grad(losses.charbonnier))(jnp.asarray(p), jnp.asarray(t))
    tv, tg = _torch_value_and_grad(TL.CharbonnierLoss(1e-3), p, t)
    assert abs(float(v) - tv) <= 1e-5 * max(1.0, abs(tv))
    assert rel_diff(g, tg, floor=0.0) <= 1e-5
    # eps is squared inside the root: at d = 0 the loss is exactly eps
    assert float(losses.charbonnier(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3)))) == \
        pytest.approx(1e-3, rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 16, 24, 3), (2, 19, 27, 3)])
def test_edge_loss(shape):
    p, t = _loss_inputs(shape, seed=1)
    for eps in (1e-3, 0.1):
        v, g = jit(jax.value_and_grad(losses.edge_loss), static_argnums=2)(
            jnp.asarray(p), jnp.asarray(t), eps)
        tv, tg = _torch_value_and_grad(TL.EdgeLoss(eps=eps), p, t)
        assert abs(float(v) - tv) <= 1e-5 * max(1.0, abs(tv))
        if eps == 0.1:
            assert rel_diff(g, tg, floor=0.0) <= 1e-5
        else:
            # At eps = 1e-3 the gradient d / sqrt(d^2 + eps^2) amplifies float32 rounding of the
            # Laplacians by up to 1/eps: torch float32 itself is ~3e-5 away from float64 here.
            # So: as a whole (L2 norm) the gradient equals torch's to 1e-5, and element-wise it is
            # at least as close to the exact (float64) value as torch float32 is (within 2x).
            g, tg = np.asarray(g, np.float64), np.asarray(tg, np.float64)
            assert np.linalg.norm(g - tg) / np.linalg.norm(tg) <= 1e-5
            _, tg64 = _torch_value_and_grad(TL.EdgeLoss(eps=eps).double(), p, t, torch.float64)
            assert rel_diff(g, tg64, floor=0.0) <= 1e-4
            assert rel_diff(g, tg64, floor=0.0) <= 2 * rel_diff(tg, tg64, floor=0.0)
    # the Laplacian of a constant image vanishes away from the replicate-padded border
    lap = np.asarray(losses.laplacian(jnp.full((1, 16, 16, 3), 0.5)))
    assert np.abs(lap[:, 4:-4, 4:-4]).max() < 1e-6


@pytest.mark.parametrize("recipe", [dict(edge_weight=0.05, clamp=False),
                                    dict(edge_weight=0.0, clamp=True)])
def test_mprnet_loss(recipe):
    rng = np.random.default_rng(2)
    outs = [rng.standard_normal((2, 16, 16, 3)).astype(np.float32) * 0.5 + 0.5 for _ in range(3)]
    target = rng.random((2, 16, 16, 3), dtype=np.float32)
    fn = jit(jax.value_and_grad(lambda o, t: losses.mprnet_loss(o, t, **recipe)))
    v, g = fn([jnp.asarray(o) for o in outs], jnp.asarray(target))
    t_outs = [nchw(o).requires_grad_() for o in outs]
    tv = TL.mprnet_loss(t_outs, nchw(target), **recipe)
    tv.backward()
    assert abs(float(v) - tv.item()) <= 1e-5 * max(1.0, abs(tv.item()))
    for gf, to in zip(g, t_outs):
        assert rel_diff(gf, nhwc(to.grad), floor=0.0) <= 1e-4


# training parity (the recipe's loss, gradients and one Adam step against torch float64):
# tests/test_train_families.py; gradients at the released width: tests/test_released_grads.py
