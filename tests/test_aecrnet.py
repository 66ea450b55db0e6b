"""AECR-Net: Flax port vs the torch reference (blocks, the modulated deformable conv, FastDeconv,
the whole network in train and eval mode, gradients, one training step), known-answer checks of
the deformable conv and of network deconvolution, checkpoint layout and round trips, losses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import jax
import jax.numpy as jnp
import porting
from flaxrestore import layers, losses, models
from flaxrestore import vgg as fvgg
from flaxrestore.models import aecrnet as A
from porting import convert, reference, verify
from porting.reference import aecrnet as TA
from porting.reference import losses as TL
from porting.reference import vgg as TV

NAME = "aecrnet"
SMALL = dict(ngf=8)

# The released state_dict (spec section 4), with the release's mix4/mix5 names.
SPEC_SHAPES = {
    "down1.1.weight": (64, 3, 7, 7), "down1.1.bias": (64,),
    "down2.0.weight": (128, 64, 3, 3), "down2.0.bias": (128,),
    "down3.0.weight": (256, 128, 3, 3), "down3.0.bias": (256,),
    "block.conv1.weight": (256, 256, 3, 3), "block.conv1.bias": (256,),
    "block.conv2.weight": (256, 256, 3, 3), "block.conv2.bias": (256,),
    "block.calayer.ca.0.weight": (32, 256, 1, 1), "block.calayer.ca.0.bias": (32,),
    "block.calayer.ca.2.weight": (256, 32, 1, 1), "block.calayer.ca.2.bias": (256,),
    "block.palayer.pa.0.weight": (32, 256, 1, 1), "block.palayer.pa.0.bias": (32,),
    "block.palayer.pa.2.weight": (1, 32, 1, 1), "block.palayer.pa.2.bias": (1,),
    "up1.0.weight": (256, 128, 3, 3), "up1.0.bias": (128,),
    "up2.0.weight": (128, 64, 3, 3), "up2.0.bias": (64,),
    "up3.1.weight": (3, 64, 7, 7), "up3.1.bias": (3,),
    "dcn_block.dcn.weight": (256, 256, 3, 3), "dcn_block.dcn.bias": (256,),
    "dcn_block.dcn.conv_offset_mask.weight": (27, 256, 3, 3),
    "dcn_block.dcn.conv_offset_mask.bias": (27,),
    "deconv.weight": (3, 3, 3, 3), "deconv.bias": (3,),
    "deconv.running_mean": (27,), "deconv.running_deconv": (27, 27),
    "mix4.w": (1,), "mix5.w": (1,),
}
SPEC_PARAMS = {"down1": 9_472, "down2": 73_856, "down3": 295_168, "block": 1_205_089,
               "up1": 295_040, "up2": 73_792, "up3": 9_411, "dcn_block": 652_315, "deconv": 84,
               "mix4": 1, "mix5": 1}


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a))).permute(0, 3, 1, 2).contiguous()


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def _perturb(ref: TA.AECRNet, seed=0):
    """Non-trivial values where the init is special: DCN offsets/mask (zero init), the DCN bias,
    the mix scalars, and FastDeconv's running statistics (0 and I)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        om = ref.dcn_block.dcn.conv_offset_mask
        om.weight.copy_(0.3 * torch.randn(om.weight.shape, generator=g) / om.weight[0].numel() ** 0.5)
        om.bias.copy_(0.5 * torch.randn(om.bias.shape, generator=g))
        ref.dcn_block.dcn.bias.copy_(0.1 * torch.randn(ref.dcn_block.dcn.bias.shape, generator=g))
        ref.mix4.w.add_(0.3 * torch.randn(1, generator=g))
        ref.mix5.w.add_(0.3 * torch.randn(1, generator=g))
        d = ref.deconv
        d.running_mean.copy_(0.4 + 0.1 * torch.randn(d.running_mean.shape, generator=g))
        r = 0.05 * torch.randn(d.running_deconv.shape, generator=g)
        d.running_deconv.copy_(torch.eye(r.shape[0]) * 2.0 + r + r.T)
    return ref


def _abstract(fn):
    """The module ``fn`` builds, without running its random init (tests fill it from torch)."""
    return nnx.eval_shape(fn)


def _from_torch(t, fn):
    f = _abstract(fn)
    convert.load_state_dict(f, t.state_dict())
    return f


# One compiled program per test instead of many eager op-by-op compiles.
_forward = nnx.jit(lambda m, *xs: m(*xs))


@nnx.jit
def _value_and_grads(mod, x, proj):
    """(output, d sum(output * proj) / d (module, x))."""
    def loss(mod, x):
        y = mod(x)
        return jnp.sum(y * proj), y
    (_, y), g = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(mod, x)
    return y, g


_deform_conv2d = jax.jit(layers.deform_conv2d, static_argnums=(5, 6, 7))


def _set_mode(ref, module, mode):
    getattr(ref, mode)()
    getattr(module, mode)()


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                 / max(1.0, float(np.abs(b).max())))


# ------------------------------------------------------------------ layout, registry, init


def test_reference_state_dict_matches_release():
    ref = reference.build(NAME)
    sd = ref.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == SPEC_SHAPES
    assert len(sd) == 34
    assert sum(p.numel() for p in ref.parameters()) == 2_614_229
    for prefix, n in SPEC_PARAMS.items():
        assert sum(p.numel() for k, p in ref.named_parameters() if k.startswith(prefix + ".")) == n
    assert {k for k, _ in ref.named_buffers()} == {"deconv.running_mean", "deconv.running_deconv"}
    assert reference.release_key(NAME) == "model"
    assert convert.expected_shapes(models.create_abstract(NAME)) == SPEC_SHAPES


def test_registry_and_init():
    assert NAME in models.names()
    m = models.create_abstract(NAME)
    assert isinstance(m, A.AECRNet) and A.AECRNet.protocol.multiple == 4
    n_params = sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n_params == 2_614_229
    assert isinstance(m.deconv.running_deconv, nnx.BatchStat)
    # a fresh module is in train mode, as torch; eval()/train() switch FastDeconv
    assert m.deconv.use_running_average is False
    m.eval()
    assert m.deconv.use_running_average is True
    m.train()
    assert m.deconv.use_running_average is False

    # the random init's ranges, on small layers built in one compiled program (an eager
    # random init compiles once per shape); the special values: test_network_init_values
    dcn, ct = nnx.jit(lambda: (
        layers.ModulatedDeformConv2d(16, 8, 3, padding=1, rngs=nnx.Rngs(3)),
        layers.ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1,
                               rngs=nnx.Rngs(4))))()
    np.testing.assert_array_equal(dcn.conv_offset_mask.kernel[...], 0)
    np.testing.assert_array_equal(dcn.conv_offset_mask.bias[...], 0)
    np.testing.assert_array_equal(dcn.bias[...], 0)
    assert 0.8 / 12 < np.abs(np.asarray(dcn.kernel[...])).max() <= 1 / 12  # U(+-1/sqrt(16*9))
    assert 0.8 / 6 < np.abs(np.asarray(ct.kernel[...])).max() <= 1 / 6  # fan_in = out*k*k


def test_network_init_values(monkeypatch):
    """The non-random initial values of the whole network (random draws stubbed out: they are
    checked above, and compiling one per shape is slow)."""
    monkeypatch.setattr(layers, "torch_uniform",
                        lambda fan_in: lambda key, shape, dtype=jnp.float32: jnp.ones(shape, dtype))
    m = models.create(NAME, **SMALL)
    ref = reference.build(NAME, **SMALL)
    for flax_mix, torch_mix, value in ((m.mix4, ref.mix4, -1.0), (m.mix5, ref.mix5, -0.6)):
        np.testing.assert_allclose(flax_mix.w[...], [value], rtol=1e-7)
        np.testing.assert_allclose(torch_mix.w.detach().numpy(), [value], rtol=1e-7)
    for v in (m.dcn_block.dcn.conv_offset_mask.kernel, m.dcn_block.dcn.conv_offset_mask.bias,
              m.dcn_block.dcn.bias, m.deconv.running_mean):
        np.testing.assert_array_equal(v[...], 0)
    np.testing.assert_array_equal(m.deconv.running_deconv[...], np.eye(27))
    np.testing.assert_array_equal(m.dcn_block.dcn.kernel[...], 1)  # the main kernel is drawn


def test_rejects_sizes_not_multiple_of_4():
    m = models.create_abstract(NAME, **SMALL)
    for shape in [(1, 18, 16, 3), (1, 16, 17, 3), (1, 15, 16, 3)]:
        with pytest.raises(ValueError, match="divisible by 4"):
            m(jnp.zeros(shape))
    with pytest.raises(ValueError, match="input channels"):
        m(jnp.zeros((1, 16, 16, 1)))


# ------------------------------------------------------------------ deformable conv


def _naive_offsets(n, h, w, taps, dy, dx):
    """Offsets (N, 2K, H, W) with constant per-tap (dy_k, dx_k), interleaved."""
    off = np.zeros((n, 2 * taps, h, w))
    for k in range(taps):
        off[:, 2 * k] = dy[k]
        off[:, 2 * k + 1] = dx[k]
    return off


def _shifted_conv(x, weight, bias, pad, dy, dx, mask_k):
    """Known answer for integer per-tap offsets: sum over taps of the tap's weight applied to the
    input shifted by (dy_k, dx_k), zero outside the image (float64 numpy, stride 1)."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    margin = 8
    xp = np.pad(x, ((0, 0), (0, 0), (margin, margin), (margin, margin)))
    ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    out = np.zeros((n, o, ho, wo)) + bias[None, :, None, None]
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            r0, c0 = margin - pad + i + dy[k], margin - pad + j + dx[k]
            win = xp[:, :, r0:r0 + ho, c0:c0 + wo]
            out += mask_k[k] * np.einsum("oc,nchw->nohw", weight[:, :, i, j], win)
    return out


def _grid_sample_dcn(x, offset, mask, weight, bias):
    """An independent route for stride 1, padding 1, 3x3: F.grid_sample (bilinear, zeros,
    align_corners=True) at the offset positions (spec 2.2)."""
    n, c, h, w = x.shape
    rows = torch.arange(h, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, dtype=x.dtype).view(1, 1, w)
    out = bias.view(1, -1, 1, 1).expand(n, -1, h, w).clone()
    for i in range(3):
        for j in range(3):
            k = i * 3 + j
            py = rows - 1 + i + offset[:, 2 * k]
            px = cols - 1 + j + offset[:, 2 * k + 1]
            grid = torch.stack([2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1], dim=-1)
            s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out = out + torch.einsum("oc,nchw->nohw", weight[:, :, i, j], s * mask[:, k:k + 1])
    return out


def _both_dcn(x, offset, mask, weight, bias, stride=1, padding=1, dilation=1):
    """(torch reference, flax) outputs of the functional deformable conv, NCHW float64/32."""
    t = TA.modulated_deform_conv2d(torch.from_numpy(x), torch.from_numpy(offset),
                                   None if mask is None else torch.from_numpy(mask),
                                   torch.from_numpy(weight), torch.from_numpy(bias),
                                   stride, padding, dilation).numpy()
    f = _deform_conv2d(
        jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
        jnp.asarray(offset.transpose(0, 2, 3, 1), jnp.float32),
        None if mask is None else jnp.asarray(mask.transpose(0, 2, 3, 1), jnp.float32),
        jnp.asarray(weight.transpose(2, 3, 1, 0), jnp.float32), jnp.asarray(bias, jnp.float32),
        stride, padding, dilation)
    return t, np.asarray(f).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_deform_conv_zero_offset_is_plain_conv(stride, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 11))
    w = rng.standard_normal((5, 4, 3, 3))
    b = rng.standard_normal(5)
    expect = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride,
                      padding, dilation).numpy()
    ho, wo = expect.shape[2:]
    off = np.zeros((2, 18, ho, wo))
    mask = np.ones((2, 9, ho, wo))
    t, f = _both_dcn(x, off, mask, w, b, stride, padding, dilation)
    assert np.abs(t - expect).max() < 1e-12
    assert np.abs(f - expect).max() < 1e-4
    t, f = _both_dcn(x, off, None, w, b, stride, padding, dilation)  # no mask = mask 1
    assert np.abs(t - expect).max() < 1e-12 and np.abs(f - expect).max() < 1e-4


def test_deform_conv_integer_offsets_are_shifted_convs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 9))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    dy = rng.integers(-3, 4, 9)
    dx = rng.integers(-3, 4, 9)
    dy[0], dx[0] = 2, -1  # dy != dx for sure: a swapped (dy, dx) order would fail
    mask_k = rng.random(9)
    off = _naive_offsets(2, 7, 9, 9, dy, dx)
    mask = np.broadcast_to(mask_k[None, :, None, None], (2, 9, 7, 9)).copy()
    expect = _shifted_conv(x, w, b, 1, dy, dx, mask_k)
    t, f = _both_dcn(x, off, mask, w, b)
    assert np.abs(t - expect).max() < 1e-12
    assert np.abs(f - expect).max() < 1e-4
    swapped = _shifted_conv(x, w, b, 1, dx, dy, mask_k)
    assert np.abs(swapped - expect).max() > 0.1


def test_deform_conv_outside_reads_zero():
    # far outside: only the bias remains
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 5, 6))
    w = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    for shift in (100.0, -100.0, 6.0, -6.0):  # +-6: every sample at py >= H or py <= -1
        off = np.zeros((1, 18, 5, 6))
        off[:, 0::2] = shift
        t, f = _both_dcn(x, off, np.ones((1, 9, 5, 6)), w, b)
        expect = np.broadcast_to(b[None, :, None, None], t.shape)
        assert np.abs(t - expect).max() < 1e-12 and np.abs(f - expect).max() < 1e-5
    # half a pixel beyond the border: the outside corner is zero, not clamped to the edge
    ones = np.ones((1, 1, 4, 4))
    w1, b1 = np.ones((1, 1, 1, 1)), np.zeros(1)
    for dy, row, other in ((-0.5, 0, 3), (0.5, 3, 0)):
        off = np.zeros((1, 2, 4, 4))
        off[:, 0] = dy
        t, f = _both_dcn(ones, off, None, w1, b1, padding=0)
        for out in (t, f):
            np.testing.assert_allclose(out[0, 0, row], 0.5, atol=1e-6)
            np.testing.assert_allclose(out[0, 0, other], 1.0, atol=1e-6)


def test_deform_conv_matches_grid_sample():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 7))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    off = 2.5 * rng.standard_normal((2, 18, 6, 7))  # many samples near and beyond the border
    mask = rng.random((2, 9, 6, 7))
    expect = _grid_sample_dcn(*(torch.from_numpy(a) for a in (x, off, mask, w, b))).numpy()
    t, f = _both_dcn(x, off, mask, w, b)
    assert np.abs(t - expect).max() < 1e-12
    assert np.abs(f - expect).max() < 1e-5


@pytest.mark.parametrize("cfg", [dict(kernel_size=3, stride=1, padding=1),
                                 dict(kernel_size=3, stride=2, padding=1, deformable_groups=2),
                                 dict(kernel_size=(3, 2), stride=1, padding=(1, 0))])
@pytest.mark.both_lowerings
def test_dcn_module_forward_and_gradients(cfg):
    torch.manual_seed(0)
    t = TA.DCN(8, 6, cfg["kernel_size"], cfg["stride"], cfg["padding"],
               deformable_groups=cfg.get("deformable_groups", 1))
    with torch.no_grad():
        t.conv_offset_mask.weight.normal_(0, 0.3)
        t.conv_offset_mask.bias.normal_(0, 0.5)
        t.bias.normal_(0, 0.1)
    f = _from_torch(t, lambda: layers.ModulatedDeformConv2d(8, 6, rngs=nnx.Rngs(0), **cfg))
    x = np.random.default_rng(0).standard_normal((2, 9, 10, 8)).astype(np.float32)
    xt = nchw(x).requires_grad_(True)
    out_t = t(xt)
    proj = np.random.default_rng(1).standard_normal(out_t.shape).astype(np.float32)
    (out_t * torch.from_numpy(proj)).sum().backward()

    out_f, (g_mod, g_x) = _value_and_grads(f, jnp.asarray(x), jnp.asarray(proj.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(out_f) - nhwc(out_t)).max() <= 1e-5
    gt_x = nhwc(xt.grad)
    assert np.abs(np.asarray(g_x) - gt_x).max() <= 1e-5 * max(1, np.abs(gt_x).max())
    gf = convert.state_to_torch_layout(f, g_mod)
    for k, p in t.named_parameters():
        assert np.abs(gf[k] - p.grad.numpy()).max() <= 1e-5 * max(1, np.abs(p.grad.numpy()).max()), k


# ------------------------------------------------------------------ FastDeconv


def _fastdeconv_known_answer(x, weight, bias, eps=1e-5):
    """Network deconvolution from its definition (3x3, padding 1, stride 1, block = C), float64
    numpy with an exact inverse square root (eigh): whiten every zero-padded patch with the mean
    and covariance of the patches centred at pixels (3a, 3b), then apply the conv weight."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    p = np.stack([xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=2)
    p = p.transpose(0, 3, 4, 1, 2).reshape(n, h, w, c * 9)  # column c*9 + i*3 + j
    s = p[:, ::3, ::3].reshape(-1, c * 9)
    mu = s.mean(0)
    cov = (s - mu).T @ (s - mu) / len(s) + eps * np.eye(c * 9)
    ev, vec = np.linalg.eigh(cov)
    d = vec @ np.diag(ev ** -0.5) @ vec.T
    out = (p - mu) @ d.T @ weight.reshape(weight.shape[0], -1).T + bias
    return out.transpose(0, 3, 1, 2), mu, d


def test_fastdeconv_known_answers():
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((2, 3, 13, 11))
    t32 = TA.FastDeconv(3, 3, 3, 1, 1, n_iter=40)
    f = _from_torch(t32, lambda: layers.FastDeconv(3, 3, 3, 1, 1, n_iter=40, rngs=nnx.Rngs(0)))
    t = t32.double()
    weight, bias = t.weight.detach().numpy(), t.bias.detach().numpy()
    # eval mode with fresh statistics (mean 0, D = I) is a plain conv
    t.eval()
    with torch.no_grad():
        plain = F.conv2d(torch.from_numpy(x), t.weight, t.bias, padding=1).numpy()
        assert np.abs(t(torch.from_numpy(x)).numpy() - plain).max() < 1e-12
        # train mode, Newton-Schulz run to convergence, equals the definition
        t.train()
        out = t(torch.from_numpy(x)).numpy()
    expect, mu, d = _fastdeconv_known_answer(x, weight, bias)
    assert np.abs(out - expect).max() < 1e-8
    np.testing.assert_allclose(t.running_mean.numpy(), 0.1 * mu, atol=1e-12)
    np.testing.assert_allclose(t.running_deconv.numpy(), 0.9 * np.eye(27) + 0.1 * d, atol=1e-8)
    # the flax layer, same definition
    out_f = np.asarray(_forward(f, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)))
    out_f = out_f.transpose(0, 3, 1, 2)
    assert np.abs(out_f - expect).max() < 1e-4
    np.testing.assert_allclose(np.asarray(f.running_mean[...]), 0.1 * mu, atol=1e-6)
    # 5 iterations are far from converged on correlated patches: eigh would be wrong
    smooth = F.avg_pool2d(torch.from_numpy(x), 5, 1, 2).numpy()
    _, mu5, d_exact = _fastdeconv_known_answer(smooth, weight, bias)
    xp = np.pad(smooth, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cov = np.cov(np.stack([xp[:, :, i:i + 13:3, j:j + 11:3] for i in range(3) for j in range(3)],
                          2).transpose(0, 3, 4, 1, 2).reshape(-1, 27).T, bias=True) + 1e-5 * np.eye(27)
    d5 = np.asarray(layers.isqrt_newton_schulz(jnp.asarray(cov, jnp.float32), 5))
    assert np.abs(d5 - d_exact).max() / np.abs(d_exact).max() > 0.1
    d5_t = TA.isqrt_newton_schulz(torch.from_numpy(cov), 5).numpy()
    assert np.abs(d5 - d5_t).max() <= 1e-5 * np.abs(d5_t).max()


@pytest.mark.parametrize("cfg", [
    dict(in_channels=3, out_channels=3, kernel_size=3, stride=1, padding=1, smooth=True),
    dict(in_channels=8, out_channels=5, kernel_size=3, stride=1, padding=1, block=4),
    dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1, block=4),
    dict(in_channels=6, out_channels=4, kernel_size=1, stride=1, padding=0),
])
def test_fastdeconv_train_eval_and_gradients(cfg):
    cfg = dict(cfg)
    smooth = cfg.pop("smooth", False)
    torch.manual_seed(0)
    t = TA.FastDeconv(**cfg)
    f = _from_torch(t, lambda: layers.FastDeconv(**cfg, rngs=nnx.Rngs(0)))
    assert f.block == t.block and f.num_features == t.num_features
    x = np.random.default_rng(0).random((2, 14, 10, cfg["in_channels"]), dtype=np.float32)
    if smooth:  # correlated patches, as real images (ill-conditioned covariance)
        x = nhwc(F.avg_pool2d(nchw(x), 3, 1, 1))
    for step in range(2):  # two train steps: running statistics accumulate
        t.train()
        f.train()
        xt = nchw(x + step).requires_grad_(True)
        out_t = t(xt)
        proj = np.random.default_rng(step).standard_normal(out_t.shape).astype(np.float32)
        t.zero_grad()
        (out_t * torch.from_numpy(proj)).sum().backward()

        out_f, (g_mod, g_x) = _value_and_grads(f, jnp.asarray(x + step),
                                               jnp.asarray(proj.transpose(0, 2, 3, 1)))
        assert np.abs(np.asarray(out_f) - nhwc(out_t)).max() <= 1e-5
        for name in ("running_mean", "running_deconv"):
            a, b = np.asarray(getattr(f, name)[...]), getattr(t, name).numpy()
            assert np.abs(a - b).max() <= 1e-5 * max(1, np.abs(b).max()), name
        gt_x = nhwc(xt.grad)
        assert np.abs(np.asarray(g_x) - gt_x).max() <= 1e-4 * np.abs(gt_x).max()
        gf = convert.state_to_torch_layout(f, g_mod)
        for k, p in t.named_parameters():
            g = p.grad.numpy()
            assert np.abs(gf[k] - g).max() <= 1e-4 * np.abs(g).max(), k
    # eval: the running statistics, no update
    t.eval()
    f.eval()
    before = np.asarray(f.running_deconv[...]).copy()
    t.zero_grad()
    xt = nchw(x).requires_grad_(True)
    out_t = t(xt)
    (out_t * torch.from_numpy(proj)).sum().backward()
    out_f, (g_mod, g_x) = _value_and_grads(f, jnp.asarray(x), jnp.asarray(proj.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(out_f) - nhwc(out_t)).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(f.running_deconv[...]), before)
    _check_grads(t, convert.state_to_torch_layout(f, g_mod), g_x, xt)


def test_fastdeconv_train_step_under_jit():
    f = _from_torch(TA.FastDeconv(3, 3, 3), lambda: layers.FastDeconv(3, 3, 3, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).random((2, 12, 12, 3), dtype=np.float32))
    eager = nnx.clone(f)
    y_eager = eager(x)
    y_jit = nnx.jit(lambda m, x: m(x))(f, x)
    assert np.abs(np.asarray(y_jit) - np.asarray(y_eager)).max() < 1e-6
    np.testing.assert_allclose(np.asarray(f.running_deconv[...]),
                               np.asarray(eager.running_deconv[...]), atol=1e-6)
    assert np.abs(np.asarray(f.running_deconv[...]) - np.eye(27)).max() > 1e-3  # it did move


# ------------------------------------------------------------------ other layers and blocks


@pytest.mark.parametrize("cfg", [dict(kernel_size=3, stride=2, padding=1, output_padding=1),
                                 dict(kernel_size=4, stride=2, padding=1),
                                 dict(kernel_size=3, stride=1, padding=0, dilation=2),
                                 dict(kernel_size=(3, 5), stride=(2, 3), padding=(0, 2),
                                      output_padding=(1, 2), bias=False)])
def test_conv_transpose(cfg):
    torch.manual_seed(0)
    t = torch.nn.ConvTranspose2d(6, 5, **cfg)
    f = _from_torch(t, lambda: layers.ConvTranspose2d(6, 5, rngs=nnx.Rngs(0), **cfg))
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 6)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(t(nchw(x)))
    out = np.asarray(_forward(f, jnp.asarray(x)))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5
    back = convert.flax_to_torch(f)
    for k, v in t.state_dict().items():
        assert torch.equal(back[k], v)


def _block_pairs():
    return {
        "PALayer": (TA.PALayer(16), lambda: A.PALayer(16, rngs=nnx.Rngs(0))),
        "CALayer": (TA.CALayer(16), lambda: A.CALayer(16, rngs=nnx.Rngs(0))),
        "DehazeBlock": (TA.DehazeBlock(16, 3),
                        lambda: A.DehazeBlock(A.default_conv, 16, 3, rngs=nnx.Rngs(0))),
        "DCNBlock": (TA.DCNBlock(16, 16), lambda: A.DCNBlock(16, 16, rngs=nnx.Rngs(0))),
    }


@pytest.mark.parametrize("block", list(_block_pairs()))
@pytest.mark.both_lowerings
def test_block_forward(block):
    torch.manual_seed(0)
    t, f = _block_pairs()[block]
    if block == "DCNBlock":
        with torch.no_grad():
            t.dcn.conv_offset_mask.weight.normal_(0, 0.2)
    f = _from_torch(t, f)
    x = np.random.default_rng(0).standard_normal((2, 6, 10, 16)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(t(nchw(x)))
    out = np.asarray(_forward(f, jnp.asarray(x)))
    assert np.abs(out - ref).max() <= 1e-5


def test_mix():
    t, f = TA.Mix(-0.6), A.Mix(-0.6)
    convert.load_state_dict(f, t.state_dict())
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 3, 4, 5)).astype(np.float32) for _ in range(2))
    with torch.no_grad():
        ref = nhwc(t(nchw(a), nchw(b)))
    s = 1 / (1 + np.exp(0.6))
    np.testing.assert_allclose(ref, s * a + (1 - s) * b, atol=1e-6)
    assert np.abs(np.asarray(f(jnp.asarray(a), jnp.asarray(b))) - ref).max() <= 1e-6


# ------------------------------------------------------------------ the whole network


def _full_pair(seed=0, **overrides):
    torch.manual_seed(seed)
    ref = _perturb(reference.build(NAME, **overrides), seed)
    return ref, porting.torch_to_flax(NAME, ref.state_dict(), **overrides)


def test_network_forward_full_width_train():
    """Train mode (batch statistics, running statistics updated); eval mode: next test."""
    ref, module = _full_pair()
    _set_mode(ref, module, "train")
    mean0 = ref.deconv.running_mean.clone().numpy()
    x = A.AECRNet.example_inputs(module.config, 2, 20, 28, np.random.default_rng(0))[0]
    with torch.no_grad():
        out_t = nhwc(ref(nchw(x)))
    out_f = np.asarray(_forward(module, jnp.asarray(x)))
    assert out_f.shape == (2, 20, 28, 3)
    assert _rel(out_f, out_t) <= 1e-4
    # random-init outputs are small (|out| ~ 0.03): also relative to the output itself
    assert np.abs(out_f - out_t).max() <= 1e-4 * np.abs(out_t).max()
    for name in ("running_mean", "running_deconv"):  # updated identically
        assert _rel(getattr(module.deconv, name)[...], getattr(ref.deconv, name).numpy()) <= 1e-5
    assert np.abs(ref.deconv.running_mean.numpy() - mean0).max() > 1e-3


def _check_grads(ref, gf, g_x=None, xt=None, tol=1e-4):
    """Flax gradients (torch keys) vs the torch .grad of every parameter (and the input)."""
    named = dict(ref.named_parameters())
    assert set(named) <= set(gf)
    for k, p in named.items():
        g = p.grad.numpy()
        assert np.abs(g).max() > 0, k
        assert np.abs(gf[k] - g).max() <= tol * np.abs(g).max(), k
    if xt is not None:
        gt_x = nhwc(xt.grad)
        assert np.abs(np.asarray(g_x) - gt_x).max() <= tol * np.abs(gt_x).max()


def test_network_forward_and_gradients_eval_full_width():
    """Eval mode at the released width, forward and gradients (train-mode gradients are checked
    in tests/test_train_families.py and test_released_grads.py). 20x28: a multiple of 4, not of 8, and not square."""
    ref, module = _full_pair(seed=1)
    _set_mode(ref, module, "eval")
    x = A.AECRNet.example_inputs(module.config, 2, 20, 28, np.random.default_rng(1))[0]
    xt = nchw(x).requires_grad_(True)
    out_t = ref(xt)
    proj = np.random.default_rng(2).standard_normal(out_t.shape).astype(np.float32)
    (out_t * torch.from_numpy(proj)).sum().backward()
    out_f, (g_mod, g_x) = _value_and_grads(module, jnp.asarray(x),
                                           jnp.asarray(proj.transpose(0, 2, 3, 1)))
    assert out_f.shape == (2, 20, 28, 3)
    assert _rel(out_f, nhwc(out_t)) <= 1e-4
    assert np.abs(out_f - nhwc(out_t)).max() <= 1e-4 * np.abs(nhwc(out_t)).max()
    np.testing.assert_array_equal(module.deconv.running_mean[...], ref.deconv.running_mean.numpy())
    assert len(dict(ref.named_parameters())) == 32
    _check_grads(ref, convert.state_to_torch_layout(module, g_mod), g_x, xt)


# ------------------------------------------------------------------ checkpoints


def test_round_trip_bit_exact():
    ref, module = _full_pair(seed=2)
    sd = ref.state_dict()
    back = porting.flax_to_torch(module)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    ref2 = reference.build(NAME)
    ref2.load_state_dict(back, strict=True)


def test_release_file_and_strict_errors(tmp_path):
    ref, _ = _full_pair(seed=3, **SMALL)
    sd = ref.state_dict()
    opt = torch.optim.Adam(ref.parameters(), 1e-4)
    container = {"epoch": 3, "step": 15000, "max_psnr": 30.1, "max_ssim": 0.95, "ssims": [0.9],
                 "psnrs": [29.0], "losses": [0.1], "model": sd, "optimizer": opt.state_dict()}
    path = tmp_path / "ITS_train_cdnet_test.pk.best"
    torch.save(container, path)
    module = porting.load_torch_checkpoint(NAME, path, **SMALL)
    for k, v in porting.flax_to_numpy(module).items():
        np.testing.assert_array_equal(v, sd[k].numpy())
    # DataParallel prefix
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "dp.pk")
    porting.load_torch_checkpoint(NAME, tmp_path / "dp.pk", **SMALL)
    # the published code's names (mix1/mix2) are not the release's; the helper renames them
    code = {({"mix4.w": "mix1.w", "mix5.w": "mix2.w"}).get(k, k): v for k, v in sd.items()}
    with pytest.raises(porting.ConversionError) as e:
        porting.torch_to_flax(NAME, code, **SMALL)
    assert "mix4.w" in str(e.value) and "mix1.w" in str(e.value)
    porting.torch_to_flax(NAME, TA.code_to_release_keys(code), **SMALL)
    # missing buffer, unexpected key, wrong width
    broken = {k: v for k, v in sd.items() if k != "deconv.running_deconv"}
    broken["deconv.num_batches_tracked"] = torch.tensor(0)
    with pytest.raises(porting.ConversionError) as e:
        porting.torch_to_flax(NAME, broken, **SMALL)
    msg = str(e.value)
    assert "deconv.running_deconv" in msg and "deconv.num_batches_tracked" in msg
    with pytest.raises(porting.ConversionError, match="shape mismatch"):
        porting.torch_to_flax(NAME, sd)  # ngf=8 weights into the released ngf=64 layout


# ------------------------------------------------------------------ losses and training parity


def _vgg_pair(seed=0):
    """Random VGG19 features (relu5_1 deep) in both frameworks. He-initialised, so that, like
    the ImageNet weights, deep features still depend on the input (torch's default init shrinks
    them towards a constant, and the CR ratio of two near-zero distances is then pure rounding)."""
    torch.manual_seed(seed)
    t = TV.VGG19Features(num_layers=30)
    with torch.no_grad():
        for m in t.features:
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.uniform_(-0.05, 0.05)
    f = nnx.eval_shape(lambda: fvgg.VGG19(rngs=nnx.Rngs(0), num_layers=30))
    convert.load_state_dict(f, t.state_dict())
    return t, f


@nnx.jit
def _cr_values_and_grads(vgg, a, p, n):
    def cr(a, p, ablation):
        return losses.contrastive_regularization(a, p, n, vgg, ablation=ablation)
    value, (g_a, g_p) = jax.value_and_grad(cr, argnums=(0, 1))(a, p, False)
    return value, g_a, g_p, cr(a, p, True)


def test_contrastive_regularization():
    tv, fv = _vgg_pair()
    rng = np.random.default_rng(0)
    a = np.tanh(rng.standard_normal((2, 16, 20, 3))).astype(np.float32)
    p, n = (rng.random((2, 16, 20, 3), dtype=np.float32) for _ in range(2))
    lf, ga, gp, lf_ab = _cr_values_and_grads(fv, *(jnp.asarray(v) for v in (a, p, n)))
    with torch.no_grad():
        fa, fp, fn = (tv(nchw(v)) for v in (a, p, n))
    for ablation, l_f, g_f in ((False, lf, ga), (True, lf_ab, None)):
        at = nchw(a).requires_grad_(True)
        lt = TL.ContrastLoss(tv, ablation=ablation)(at, nchw(p), nchw(n))
        lt.backward()
        assert abs(float(l_f) - lt.item()) <= 1e-5 * abs(lt.item())
        if g_f is not None:
            gt = nhwc(at.grad)
            assert np.abs(np.asarray(g_f) - gt).max() <= 1e-4 * np.abs(gt).max()
        # the formula from the features, independently of both loss implementations
        expect = sum(w * (a_ - p_).abs().mean().item()
                     / (1 if ablation else (a_ - n_).abs().mean().item() + 1e-7)
                     for w, a_, p_, n_ in zip((1 / 32, 1 / 16, 1 / 8, 1 / 4, 1), fa, fp, fn))
        assert abs(lt.item() - expect) <= 1e-5 * expect
    # no gradient into the positive (nor, by the same stop_gradient, the negative)
    assert float(jnp.abs(gp).max()) == 0.0


def test_l1():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 5, 6, 3)).astype(np.float32) for _ in range(2))
    assert abs(float(losses.l1(jnp.asarray(a), jnp.asarray(b)))
               - TL.l1(nchw(a), nchw(b)).item()) <= 1e-6
    np.testing.assert_allclose(float(losses.l1(jnp.asarray(a), jnp.asarray(b))),
                               np.abs(a - b).mean(), rtol=1e-6)


def test_compiled_port_matches_torch():
    """verify.compare(jit=True): the network (train mode, as built) compiled as the trainer
    compiles it (lowering.compiler_options: on CPU XNNPACK convolutions), outputs and every
    gradient against torch autograd."""
    report = verify.compare(NAME, batch=1, grads=True, jit=True, seed=4, **SMALL)
    assert report.grads and report.worst() <= 1e-4, report.format()
