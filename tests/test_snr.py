"""SNR-Aware: Flax port vs the torch reference (SNR map, attention, network, gradients), sizes,
checkpoints (bare state dict, strict loading), its losses and one-step training parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import porting
from flaxrestore import losses, models, vgg
from flaxrestore.models import snr as S
from porting import convert, reference, verify
from porting.reference import losses as TL
from porting.reference import snr as TS
from porting.reference.vgg import VGG19Features

NAME = "snr"
SMALL = dict(nf=8)  # transformer width 128, 8 heads of 8, FFN 256


def _nchw(a):
    return torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2).contiguous()


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))


def _perturb(module: torch.nn.Module, seed=0):
    """Random LayerNorm weights/biases (their init is ones / zeros) and 3x larger first convs.

    The larger first convs give the 4x4-patch tokens more spatial contrast. With nearly alike
    tokens the attention's query/key gradients are a float32 cancellation residue (both
    frameworks then agree only to ~1e-3 relative on those tiny tensors), which tests nothing.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layer_norm" in name:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
            elif name.startswith("conv_first") and name.endswith("weight"):
                p.mul_(3.0)
    return module


def _mask(valid: np.ndarray, height: int, width: int, rng) -> np.ndarray:
    """A continuous SNR map whose 16x16 blocks have mean clearly above 0.5 where ``valid``
    (B, ceil(H/16), ceil(W/16)) is True and clearly below elsewhere."""
    level = np.where(valid, 0.8, 0.2)
    level = np.repeat(np.repeat(level, 16, 1), 16, 2)[:, :height, :width, None]
    return (level + rng.uniform(-0.15, 0.15, level.shape)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# registry, state dict


def test_registry_and_state_dict_matches_release():
    assert models.names("snr") == ["snr"]
    cfg = models.get_config(NAME)
    assert (cfg.nf, cfg.front_RBs, cfg.back_RBs, cfg.HR_in) == (64, 1, 1, True)
    assert reference.release_key(NAME) is None
    ref = reference.build(NAME)
    sd = ref.state_dict()
    assert len(sd) == 118
    assert sum(p.numel() for p in ref.parameters()) == 39_124_099
    assert not list(ref.buffers())
    # shapes the spec lists explicitly
    assert sd["conv_first_1.weight"].shape == (64, 3, 3, 3)
    assert sd["conv_first_2.weight"].shape == (64, 64, 3, 3)
    assert sd["feature_extraction.0.conv2.weight"].shape == (64, 64, 3, 3)
    assert sd["upconv1.weight"].shape == (256, 128, 3, 3)
    assert sd["HRconv.weight"].shape == (64, 128, 3, 3)
    assert sd["conv_last.bias"].shape == (3,)
    assert sd["transformer.layer_stack.5.slf_attn.w_qs.weight"].shape == (512, 1024)
    assert sd["transformer.layer_stack.0.slf_attn.fc.weight"].shape == (1024, 512)
    assert sd["transformer.layer_stack.3.pos_ffn.w_1.weight"].shape == (2048, 1024)
    assert sd["transformer.layer_stack.3.pos_ffn.layer_norm.bias"].shape == (1024,)
    assert sd["recon_trunk_light.5.conv2.bias"].shape == (64,)
    assert "transformer.layer_stack.0.slf_attn.w_qs.bias" not in sd
    assert list(sd)[:2] == ["conv_first_1.weight", "conv_first_1.bias"]
    assert list(sd)[-1] == "recon_trunk_light.5.conv2.bias"
    expected = convert.expected_shapes(models.create_abstract(NAME))
    assert expected == {k: tuple(v.shape) for k, v in sd.items()}
    with pytest.raises(ValueError, match="HR_in"):
        models.create(NAME, HR_in=False, **SMALL)


# --------------------------------------------------------------------------------------------
# SNR map


def test_snr_map_matches_torch():
    rng = np.random.default_rng(0)
    x_rand = rng.random((2, 37, 52, 3), dtype=np.float32) ** 2  # batch 2, odd, non-square
    x_demo, _ = S.SNRNet.example_inputs(models.get_config(NAME), 2, 32, 48, rng)
    jitted = jax.jit(S.snr_map)
    for x in (x_rand, x_demo):
        ref = _nhwc(TS.snr_map(_nchw(x)))
        eager = np.asarray(S.snr_map(jnp.asarray(x)))
        assert eager.shape == x.shape[:3] + (1,) and eager.dtype == np.float32
        assert np.abs(eager - ref).max() <= 1e-6
        assert np.abs(np.asarray(jitted(x)) - ref).max() <= 1e-6
        assert eager.min() >= 0.0 and eager.max() <= 1.0
    # the blur is OpenCV's 5x5 box filter with reflect-101 borders: check one corner by hand
    img = rng.random((1, 6, 7, 3), dtype=np.float32)
    rows, cols = [2, 1, 0, 1, 2], [2, 1, 0, 1, 2]
    corner = img[0][np.ix_(rows, cols)].mean(axis=(0, 1))
    assert np.allclose(np.asarray(S.box_blur5(img))[0, 0, 0], corner, atol=1e-6)
    # and the map of a flat image is 1 / (1 + 1e-4 / light) everywhere (noise 0)
    flat = np.full((1, 8, 8, 3), 0.25, np.float32)
    light = 0.25 * (0.299 + 0.587 + 0.114)
    want = (light / 1e-4) / (light / 1e-4 + 1e-4)
    assert np.allclose(np.asarray(S.snr_map(flat)), want, atol=1e-6)


# --------------------------------------------------------------------------------------------
# blocks


def test_patch_tokens_match_unfold_and_fold():
    rng = np.random.default_rng(1)
    fea = rng.standard_normal((2, 10, 14, 5)).astype(np.float32)  # remainder rows and columns
    tokens = S.patches_to_tokens(jnp.asarray(fea))
    ref = F.unfold(_nchw(fea), kernel_size=4, stride=4).permute(0, 2, 1).numpy()
    assert tokens.shape == (2, 6, 80)
    np.testing.assert_array_equal(np.asarray(tokens), ref)
    back = S.tokens_to_patches(tokens, 10, 14)
    ref_back = F.fold(torch.from_numpy(ref).permute(0, 2, 1), (10, 14), kernel_size=4, stride=4)
    np.testing.assert_array_equal(np.asarray(back), _nhwc(ref_back))
    assert np.all(np.asarray(back)[:, 8:] == 0) and np.all(np.asarray(back)[:, :, 12:] == 0)


@pytest.mark.parametrize("block", ["attention", "encoder_layer"])
@pytest.mark.both_lowerings
def test_attention_full_width_with_masks(block):
    """The attention layer (and a whole encoder layer) at the released width 1024, with a mask
    that excludes some keys of image 0 and every key of image 1."""
    torch.manual_seed(0)
    if block == "attention":
        t = TS.MultiHeadAttention(8, 1024, 64, 64)
        f = S.MultiHeadAttention(8, 1024, 64, 64, rngs=nnx.Rngs(0))
    else:
        t = TS.EncoderLayer(1024, 2048, 8, 64, 64)
        f = S.EncoderLayer(1024, 2048, 8, 64, 64, rngs=nnx.Rngs(0))
    _perturb(t)
    convert.load_state_dict(f, t.state_dict())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 12, 1024)).astype(np.float32)
    p = rng.uniform(0.0, 1.0, (2, 12)).astype(np.float32)
    p[0, :4] = [0.9, 0.2, 0.7, 0.4]
    p[1] = 0.3  # all keys of image 1 masked: uniform attention
    key_t = torch.from_numpy(np.where(p <= 0.5, 0.0, p)).unsqueeze(1)
    with torch.no_grad():
        ref = t(torch.from_numpy(x), key_t).numpy()
    out = np.asarray(f(jnp.asarray(x), jnp.asarray(p > 0.5)))
    assert np.abs(out - ref).max() <= 1e-5
    if block == "attention":
        # masking changes image 0's result; image 1's equals uniform attention over all keys
        free = np.asarray(f(jnp.asarray(x), None))
        assert np.abs(free[0] - out[0]).max() > 1e-3
        h = f.layer_norm(jnp.asarray(x[1:]))
        v = np.asarray(f.w_vs(h))
        uniform = np.asarray(f.fc(jnp.broadcast_to(v.mean(axis=1, keepdims=True), v.shape)))
        assert np.abs(out[1] - (uniform[0] + x[1])).max() <= 1e-4


@pytest.mark.parametrize("block", ["attention", "feed_forward"])
def test_layer_norms_on_low_variance_tokens(block):
    """The transformer's pre-LayerNorms on tokens of small variance (std 1e-3, features of a
    dark image), where their eps matters: 1e-6 as the original, not torch's default 1e-5. On
    unit-variance tokens (the test above) an eps of 1e-5 moves the output by less than 1e-5,
    and tools/mutate.py's snr-layernorm-eps survived it."""
    torch.manual_seed(1)
    if block == "attention":
        t, f = TS.MultiHeadAttention(4, 64, 16, 16), S.MultiHeadAttention(4, 64, 16, 16,
                                                                          rngs=nnx.Rngs(0))
    else:
        t, f = TS.PositionwiseFeedForward(64, 128), S.PositionwiseFeedForward(64, 128,
                                                                             rngs=nnx.Rngs(0))
    _perturb(t)
    convert.load_state_dict(f, t.state_dict())
    x = (1e-3 * np.random.default_rng(3).standard_normal((2, 12, 64))).astype(np.float32)
    with torch.no_grad():
        ref = t(torch.from_numpy(x)).numpy()
    out = np.asarray(f(jnp.asarray(x)))
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


# --------------------------------------------------------------------------------------------
# network


def test_forward_full_width_mixed_and_fully_masked():
    """Released width, batch 2, 32x48: image 0 has attended and masked key patches, image 1
    has every key masked."""
    torch.manual_seed(3)
    ref = _perturb(reference.build(NAME).eval(), seed=3)
    module = porting.torch_to_flax(NAME, ref.state_dict())
    rng = np.random.default_rng(3)
    x = rng.random((2, 32, 48, 3), dtype=np.float32)
    valid = np.array([[[True, False, True], [False, True, False]],
                      [[False, False, False], [False, False, False]]])
    mask = _mask(valid, 32, 48, rng)
    key_valid = np.asarray(S.patch_key_valid(jnp.asarray(mask[:, ::4, ::4])))
    np.testing.assert_array_equal(key_valid, valid.reshape(2, -1))
    report = verify.compare(NAME, ref, module, inputs=(x, mask))
    assert report.outputs[0].shape == (2, 32, 48, 3)
    assert report.worst() <= 1e-4, report.format()


def test_forward_quarter_size_not_multiple_of_4():
    """40x56: the quarter-size features (10x14) leave a strip the transformer never sees; the
    original fills it with zeros, and so does the port."""
    torch.manual_seed(4)
    ref = _perturb(reference.build(NAME, **SMALL).eval(), seed=4)
    module = porting.torch_to_flax(NAME, ref.state_dict(), **SMALL)
    rng = np.random.default_rng(4)
    x = rng.random((2, 40, 56, 3), dtype=np.float32)
    mask = _mask(rng.random((2, 3, 4)) < 0.5, 40, 56, rng)
    report = verify.compare(NAME, ref, module, inputs=(x, mask), **SMALL)
    assert report.worst() <= 1e-4, report.format()


# op by op (~20 s of make test, what a user differentiating without jax.jit runs) under slow
@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True])
def test_gradients_reduced_width(jit):
    """Compiled as the trainer compiles (lowering.compiler_options), and op by op."""
    torch.manual_seed(5)
    ref = _perturb(reference.build(NAME, **SMALL), seed=5)
    module = porting.torch_to_flax(NAME, ref.state_dict(), **SMALL)
    rng = np.random.default_rng(5)
    x = rng.random((2, 32, 32, 3), dtype=np.float32)
    valid = np.array([[[True, False], [True, True]], [[False, False], [False, False]]])
    report = verify.compare(NAME, ref, module, inputs=(x, _mask(valid, 32, 32, rng)),
                            grads=True, jit=jit, **SMALL)
    assert len(report.grads) == 118 + 2  # every parameter, the image and the map
    assert report.worst() <= 1e-4, report.format()


def test_example_inputs():
    cfg = models.get_config(NAME)
    x, mask = S.SNRNet.example_inputs(cfg, 2, 32, 32, np.random.default_rng(0))
    assert x.shape == (2, 32, 32, 3) and mask.shape == (2, 32, 32, 1)
    assert x.dtype == mask.dtype == np.float32
    valid = np.asarray(S.patch_key_valid(jnp.asarray(mask[:, ::4, ::4])))
    assert valid.any() and not valid.all()
    np.testing.assert_array_equal(mask, np.asarray(S.snr_map(x)))


def _small_module(seed=0):
    # converted from the torch reference: models.create's eager random init costs ~20 s of CPU
    torch.manual_seed(seed)
    return porting.torch_to_flax(NAME, reference.build(NAME, **SMALL).state_dict(), **SMALL)


def test_sizes():
    module = _small_module()
    assert S.SNRNet.protocol.multiple == 16
    with pytest.raises(ValueError, match="divisible by 4"):
        module(jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match="3 input channels"):
        module(jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="mask must be"):
        module(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(6)
    # restore(): any size, padded to 16 and cropped, the map computed at the original size
    x = rng.random((2, 30, 21, 3), dtype=np.float32) * 0.3
    out = S.restore(module, x)
    assert out.shape == x.shape
    pads = ((0, 0), (0, 2), (0, 11), (0, 0))
    pad, m = np.pad(x, pads, mode="reflect"), np.pad(np.asarray(S.snr_map(x)), pads, mode="reflect")
    np.testing.assert_allclose(np.asarray(out), np.asarray(module(pad, m))[:, :30, :21], atol=1e-6)
    # on a multiple of 16 it is the plain call; without a mask the module computes the map
    np.testing.assert_array_equal(np.asarray(S.restore(module, pad)), np.asarray(module(pad)))
    np.testing.assert_array_equal(np.asarray(module(pad)),
                                  np.asarray(module(pad, S.snr_map(jnp.asarray(pad)))))


# --------------------------------------------------------------------------------------------
# checkpoints


def test_release_file_round_trip(tmp_path):
    """A released-style file (bare state dict, possibly DataParallel 'module.' keys) -> Flax ->
    torch is bit-exact and loads strictly into the reference."""
    torch.manual_seed(7)
    ref = _perturb(reference.build(NAME), seed=7)
    sd = ref.state_dict()
    path = tmp_path / "LOLv1.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    module = porting.load_torch_checkpoint(NAME, path)
    back = convert.flax_to_torch(module)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    fresh = reference.build(NAME)
    fresh.load_state_dict(back, strict=True)


def test_strict_load_errors():
    sd = reference.build(NAME, **SMALL).state_dict()
    bad = dict(sd, **{"transformer.position_enc.table": torch.zeros(1),
                      "recon_trunk.0.conv1.bias": torch.zeros(9)})
    del bad["transformer.layer_stack.2.slf_attn.w_ks.weight"]
    # (no variant name: it would scan every registered model for a better match, slowly)
    with pytest.raises(convert.ConversionError) as e:
        convert.load_state_dict(models.create_abstract(NAME, **SMALL), bad)
    msg = str(e.value)
    assert "1 missing key(s), 1 unexpected key(s), 1 shape mismatch(es)" in msg
    assert "transformer.layer_stack.2.slf_attn.w_ks.weight" in msg
    assert "transformer.position_enc.table" in msg
    assert "recon_trunk.0.conv1.bias: (9,) vs (8,)" in msg
    # reduced-width weights into the released width: every width differs
    abstract = models.create_abstract(NAME)
    with pytest.raises(convert.ConversionError, match="shape mismatch"):
        convert.load_state_dict(abstract, sd)
    # a non-strict load reports what it skipped
    report = convert.load_state_dict(_small_module(), bad, strict=False)
    assert report["missing"] == ["transformer.layer_stack.2.slf_attn.w_ks.weight"]
    assert report["unexpected"] == ["transformer.position_enc.table"]
    assert report["mismatched"] == ["recon_trunk.0.conv1.bias"]


# --------------------------------------------------------------------------------------------
# losses and training parity


def _vgg_pair(seed=0):
    torch.manual_seed(seed)
    tv = VGG19Features(num_layers=30).eval()
    fv = nnx.eval_shape(lambda: vgg.VGG19(rngs=nnx.Rngs(0), num_layers=30))
    convert.load_state_dict(fv, tv.state_dict())
    return tv, fv


def test_losses_match_torch():
    """Charbonnier (sum) and the VGG perceptual loss (sum and mean reductions). Their gradients
    are checked through the whole network by the training-parity test below."""
    tv, fv = _vgg_pair()
    rng = np.random.default_rng(8)
    pred = rng.random((1, 16, 20, 3), dtype=np.float32)
    target = rng.random((1, 16, 20, 3), dtype=np.float32)
    pt, tt = _nchw(pred), _nchw(target)

    cb = losses.charbonnier_sum(jnp.asarray(pred), jnp.asarray(target))
    cb_t = TL.CharbonnierSumLoss()(pt, tt)
    assert abs(float(cb) - cb_t.item()) / abs(cb_t.item()) <= 1e-6
    d = pred.astype(np.float64) - target  # by hand: a sum of sqrt(d^2 + 1e-6)
    assert abs(float(cb) - np.sqrt(d * d + 1e-6).sum()) / float(cb) <= 1e-5

    with torch.no_grad():
        for reduction in ("sum", "mean"):
            got = losses.perceptual(jnp.asarray(pred), jnp.asarray(target), fv,
                                    reduction=reduction)
            want = TL.VGGPerceptualLoss(tv, reduction=reduction)(pt, tt).item()
            assert abs(float(got) - want) / abs(want) <= 1e-5
        # the sum form from the features, independently of both loss implementations
        feats = [tv(_nchw(a)) for a in (pred, target)]
        expect = sum(w * (a - b).abs().sum().item()
                     for w, a, b in zip(losses.PERCEPTUAL_WEIGHTS, *feats))
        got = losses.perceptual(jnp.asarray(pred), jnp.asarray(target), fv, reduction="sum")
        assert abs(float(got) - expect) / expect <= 1e-5
        total = losses.snr_loss(jnp.asarray(pred), jnp.asarray(target), fv, vgg_weight=0.02)
        assert abs(float(total) - (float(cb) + 0.02 * expect)) / float(total) <= 1e-5
    assert float(losses.snr_loss(jnp.asarray(pred), jnp.asarray(target))) == float(cb)
    assert set(losses.SNR_VGG_WEIGHT.values()) == {0.0, 0.1, 0.02}
