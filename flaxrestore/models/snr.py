"""SNR-Aware low-light enhancement (Xu et al., CVPR 2022) in Flax NNX, block for block.

The network (``low_light_transformer`` in the original) takes a low-light RGB image in [0, 1]
and its SNR map, both NHWC: ``model(x, mask)`` with x (B, H, W, 3) and mask (B, H, W, 1); with
``mask=None`` the map is computed from x by :func:`snr_map`, as the official data pipeline does.

Data flow: three convs (the last two stride 2) to quarter resolution; residual blocks; then two
branches over the quarter-size features: a short-range one (6 residual blocks) and a long-range
one (a 6-layer transformer over non-overlapping 4x4 feature patches, whose keys are masked where
the patch's mean SNR is <= 0.5). The SNR map blends them (high SNR -> local branch), then
residual blocks, two PixelShuffle upsamplers with skips, and a global residual.

Sizes. H and W must be multiples of 4 (the original fails on its skip concatenations
otherwise; here a ValueError says so). They should be multiples of 16 (``SNRNet.protocol.multiple``): when
H/4 or W/4 is not a multiple of 4, the original drops the remainder rows/columns of the quarter
feature map before the transformer and leaves the transformer output there zero. That behaviour
is reproduced exactly, not corrected. :func:`restore` pads an image to a multiple of 16 and crops.

Widths. The original hard-codes the decoder (64 channels), the transformer's model width 1024
(= 64 * 16, a 4x4 patch of 64 channels), its FFN width 2048 and its 8 heads of 64, so only
nf = 64 runs there. Here those numbers are derived from nf (16*nf, 32*nf, 8 heads of nf), equal to
the original's at nf = 64, so that reduced-width models exist for tests; the torch reference
(porting/reference/snr.py) does the same.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers
from flaxrestore.layers import Conv2d, Sequential
from flaxrestore.models import Protocol, register

PATCH = 4  # transformer tokens are 4x4 patches of the quarter-resolution features
MASK_THRESHOLD = 0.5  # a key patch is attended to iff its mean SNR is > 0.5
MASK_FILL = -1e9  # logit of a masked key (not -inf: all keys masked gives uniform attention)
N_LAYERS = 6
N_HEAD = 8


@dataclasses.dataclass(frozen=True)
class SNRConfig:
    """Keyword arguments of the original ``low_light_transformer`` class.

    Only ``nf``, ``front_RBs``, ``back_RBs`` and ``HR_in`` matter; ``nframes``, ``groups``,
    ``center``, ``predeblur`` and ``w_TSA`` are EDVR leftovers the network ignores. ``HR_in``
    must be True (the original's forward crashes otherwise).
    """

    nf: int = 64
    nframes: int = 5
    groups: int = 8
    front_RBs: int = 5
    back_RBs: int = 10
    center: int | None = None
    predeblur: bool = False
    HR_in: bool = False
    w_TSA: bool = True


def lrelu(x):
    return jax.nn.leaky_relu(x, 0.1)


def _opaque(p: jax.Array) -> jax.Array:
    """An identity XLA's simplifier and LLVM cannot see through (a select; NaN stays NaN).

    Used where bit-level agreement with torch matters: the SNR map divides by
    |dark - light| + 1e-4, so one ulp of difference in the grays can become 1e-4 in the map.
    XLA would otherwise contract a product and the following add into an FMA (torch rounds the
    product) and turn a division by a broadcast into a multiplication by its reciprocal (torch
    divides). optimization_barrier, reduce_precision and bitcast round trips are simplified away.
    """
    return jnp.where(jnp.isnan(p), jnp.asarray(jnp.nan, p.dtype), p)


def _gray(x: jax.Array) -> jax.Array:
    # ITU-R 601 luma on RGB, evaluated left to right with rounded products, as torch does
    return (_opaque(x[..., 0:1] * 0.299) + _opaque(x[..., 1:2] * 0.587)
            + _opaque(x[..., 2:3] * 0.114))


def box_blur5(x: jax.Array) -> jax.Array:
    """OpenCV ``cv2.blur(x, (5, 5))``: 5x5 mean, reflect-101 borders (torch/numpy 'reflect').

    The 25 taps are summed in row-major order, then multiplied by 1/25 (torch turns a division
    by a scalar into that multiplication; the torch reference sums in the same order, so the two
    agree to the last bit on CPU).
    """
    h, w = x.shape[1:3]
    if h < 3 or w < 3:
        raise ValueError(f"the SNR map's 5x5 reflect blur needs H, W >= 3, got {(h, w)}")
    xp = layers.pad2d(x, 2, "reflect")
    acc = None
    for i in range(5):
        for j in range(5):
            tap = xp[:, i:i + h, j:j + w, :]
            acc = tap if acc is None else acc + tap
    return acc * (1.0 / 25.0)


def snr_map(x: jax.Array, eps: float = 1e-4) -> jax.Array:
    """The SNR map of an NHWC RGB batch in [0, 1]: (B, H, W, 1) float in [0, 1]. Jit-able.

    light = gray(5x5 box blur of x), dark = gray(x), snr = light / (|dark - light| + 1e-4),
    divided by (its per-image maximum + 1e-4) and clamped to [0, 1]. Not learned and not part of
    the torch module: the original computes it in its data pipeline (on the crop, after flips).
    """
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"snr_map expects an NHWC RGB batch (B, H, W, 3), got {x.shape}")
    dark = _gray(x)
    light = _gray(box_blur5(x))
    noise = jnp.abs(dark - light)
    snr = light / (noise + eps)
    peak = jnp.max(snr, axis=(1, 2, 3), keepdims=True)
    # a true division, as torch does (see _opaque)
    return jnp.clip(snr / _opaque(jnp.broadcast_to(peak + eps, snr.shape)), 0.0, 1.0)


class ResidualBlock_noBN(nnx.Module):
    """x + conv2(relu(conv1(x))), 3x3 convs with bias; init kaiming-normal(fan_in) * 0.1, bias 0."""

    def __init__(self, nf: int = 64, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(nf, nf, 3, padding=1, rngs=rngs)
        self.conv2 = Conv2d(nf, nf, 3, padding=1, rngs=rngs)
        for conv in (self.conv1, self.conv2):
            kshape = conv.kernel.shape
            std = math.sqrt(2.0 / (kshape[0] * kshape[1] * kshape[2]))
            conv.kernel.set_value(0.1 * std * jax.random.normal(rngs.params(), kshape, jnp.float32))
            conv.bias.set_value(jnp.zeros(conv.bias.shape, jnp.float32))

    def __call__(self, x):
        return x + self.conv2(jax.nn.relu(self.conv1(x)))


class Linear(nnx.Linear):
    """nnx.Linear computed as one 2-D matmul over all leading axes (:func:`layers.matmul_channels`):
    the gradient of nnx.Linear's dot over (B, L, D) contracts two axes for the kernel, which
    XLA:CPU runs on a slower path."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layers.matmul_channels(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = layers.add_bias(y, self.bias[...])
        return y


def _torch_linear(d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    init = layers.torch_uniform(d_in)  # torch nn.Linear default init
    return Linear(d_in, d_out, use_bias=bias, kernel_init=init, bias_init=init, rngs=rngs)


class MultiHeadAttention(nnx.Module):
    """Pre-LN multi-head self-attention with a key mask; projections without bias."""

    def __init__(self, n_head: int, d_model: int, d_k: int, d_v: int, *, rngs: nnx.Rngs):
        self.n_head, self.d_k, self.d_v = n_head, d_k, d_v
        self.w_qs = _torch_linear(d_model, n_head * d_k, False, rngs)
        self.w_ks = _torch_linear(d_model, n_head * d_k, False, rngs)
        self.w_vs = _torch_linear(d_model, n_head * d_v, False, rngs)
        self.fc = _torch_linear(n_head * d_v, d_model, False, rngs)
        self.layer_norm = layers.ChannelLayerNorm(d_model, eps=1e-6)

    def __call__(self, x: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
        """x (B, L, d_model); key_valid (B, L) bool, False = key excluded for every query."""
        b, n, _ = x.shape
        h = self.layer_norm(x)  # one LN for q, k and v (the same tensor)
        q = self.w_qs(h).reshape(b, n, self.n_head, self.d_k)  # head-major split of the width
        k = self.w_ks(h).reshape(b, n, self.n_head, self.d_k)
        v = self.w_vs(h).reshape(b, n, self.n_head, self.d_v)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q / (self.d_k ** 0.5), k)
        if key_valid is not None:
            # logits stay float32 here: -1e9 overflows float16
            logits = jnp.where(key_valid[:, None, None, :], logits,
                               jnp.asarray(MASK_FILL, logits.dtype))
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, self.n_head * self.d_v)
        return layers.materialize(self.fc(out) + x)  # see layers.materialize


class PositionwiseFeedForward(nnx.Module):
    """Pre-LN FFN: x + w_2(relu(w_1(LN(x))))."""

    def __init__(self, d_in: int, d_hid: int, *, rngs: nnx.Rngs):
        self.w_1 = _torch_linear(d_in, d_hid, True, rngs)
        self.w_2 = _torch_linear(d_hid, d_in, True, rngs)
        self.layer_norm = layers.ChannelLayerNorm(d_in, eps=1e-6)

    def __call__(self, x):
        return layers.materialize(self.w_2(jax.nn.relu(self.w_1(self.layer_norm(x)))) + x)


class EncoderLayer(nnx.Module):
    def __init__(self, d_model: int, d_inner: int, n_head: int, d_k: int, d_v: int, *,
                 rngs: nnx.Rngs):
        self.slf_attn = MultiHeadAttention(n_head, d_model, d_k, d_v, rngs=rngs)
        self.pos_ffn = PositionwiseFeedForward(d_model, d_inner, rngs=rngs)

    def __call__(self, x, key_valid=None):
        return self.pos_ffn(self.slf_attn(x, key_valid))


class PatchTransformer(nnx.Module):
    """The original's ``Encoder_patch66``: a stack of encoder layers, no positional encoding, no
    final LayerNorm. ``layer_stack`` is a Sequential only for its torch-style indices; the layers
    are called one by one with the key mask."""

    def __init__(self, d_model: int, d_inner: int, n_layers: int, n_head: int, d_k: int,
                 d_v: int, *, rngs: nnx.Rngs):
        self.layer_stack = Sequential(*[EncoderLayer(d_model, d_inner, n_head, d_k, d_v, rngs=rngs)
                                        for _ in range(n_layers)])

    def __call__(self, x, key_valid=None):
        for layer in self.layer_stack.layers:
            x = layer(x, key_valid)
        return x


def patches_to_tokens(fea: jax.Array) -> jax.Array:
    """torch ``F.unfold(kernel 4, stride 4)`` + transpose: (B, H, W, C) -> (B, L, C*16).

    Remainder rows/columns are dropped; tokens run row-major over the patch grid and each token
    is ordered (channel, ky, kx) like torch's unfold.
    """
    b, h, w, c = fea.shape
    hp, wp = h // PATCH, w // PATCH
    t = fea[:, :hp * PATCH, :wp * PATCH, :].reshape(b, hp, PATCH, wp, PATCH, c)
    return t.transpose(0, 1, 3, 5, 2, 4).reshape(b, hp * wp, c * PATCH * PATCH)


def tokens_to_patches(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """torch ``nn.Fold`` of non-overlapping 4x4 patches back to (B, height, width, C); the
    remainder rows/columns that unfold dropped come back as zeros (as in torch)."""
    b, n, d = tokens.shape
    c = d // (PATCH * PATCH)
    hp, wp = height // PATCH, width // PATCH
    t = tokens.reshape(b, hp, wp, c, PATCH, PATCH).transpose(0, 1, 4, 2, 5, 3)
    t = t.reshape(b, hp * PATCH, wp * PATCH, c)
    return jnp.pad(t, ((0, 0), (0, height - hp * PATCH), (0, width - wp * PATCH), (0, 0)))


def patch_key_valid(mask_q: jax.Array) -> jax.Array:
    """(B, h, w, 1) quarter-size SNR map -> (B, L) bool: the 4x4 patch's mean SNR is > 0.5."""
    b, h, w, _ = mask_q.shape
    hp, wp = h // PATCH, w // PATCH
    m = mask_q[:, :hp * PATCH, :wp * PATCH, 0].reshape(b, hp, PATCH, wp, PATCH)
    p = m.transpose(0, 1, 3, 2, 4).reshape(b, hp * wp, PATCH * PATCH).mean(axis=-1)
    return p > MASK_THRESHOLD


class SNRNet(nnx.Module):
    """The SNR-aware low-light network (``low_light_transformer``). NHWC in and out."""

    # the SNR map comes from the unpadded input (box blur 5, reflect-101); H, W padded to 16 so
    # the 4x4 patch fold is exact (the original needs 4, exact at 16)
    protocol = Protocol(16, "reflect", extra_inputs=lambda x: (snr_map(x),))

    def __init__(self, config: SNRConfig = SNRConfig(), *, rngs: nnx.Rngs):
        cfg = self.config = config
        if not cfg.HR_in:
            raise ValueError("SNR-Aware needs HR_in=True: the original builds different first "
                             "convs for HR_in=False and its forward then fails")
        nf = cfg.nf
        self.conv_first_1 = Conv2d(3, nf, 3, 1, 1, rngs=rngs)
        self.conv_first_2 = Conv2d(nf, nf, 3, 2, 1, rngs=rngs)
        self.conv_first_3 = Conv2d(nf, nf, 3, 2, 1, rngs=rngs)
        self.feature_extraction = Sequential(*[ResidualBlock_noBN(nf, rngs=rngs)
                                               for _ in range(cfg.front_RBs)])
        self.recon_trunk = Sequential(*[ResidualBlock_noBN(nf, rngs=rngs)
                                        for _ in range(cfg.back_RBs)])
        self.upconv1 = Conv2d(nf * 2, nf * 4, 3, 1, 1, rngs=rngs)
        self.upconv2 = Conv2d(nf * 2, nf * 4, 3, 1, 1, rngs=rngs)
        self.HRconv = Conv2d(nf * 2, nf, 3, 1, 1, rngs=rngs)
        self.conv_last = Conv2d(nf, 3, 3, 1, 1, rngs=rngs)
        d_model = nf * PATCH * PATCH
        self.transformer = PatchTransformer(d_model, 2 * d_model, N_LAYERS, N_HEAD, nf, nf,
                                            rngs=rngs)
        self.recon_trunk_light = Sequential(*[ResidualBlock_noBN(nf, rngs=rngs) for _ in range(6)])

    @staticmethod
    def check_size(height: int, width: int) -> None:
        if height % 4 or width % 4:
            raise ValueError(
                f"SNR-Aware needs H and W divisible by 4 (16 to be exact), got {(height, width)}; "
                "pad the input, e.g. with flaxrestore.models.snr.restore(model, x)")

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: (B, H, W, 3) in [0, 1]; mask: the SNR map (B, H, W, 1), computed if None."""
        b, h, w, c = x.shape
        self.check_size(h, w)
        if c != 3:
            raise ValueError(f"SNR-Aware expects 3 input channels, got {c}")
        if mask is None:
            mask = snr_map(x)
        if mask.shape != (b, h, w, 1):
            raise ValueError(f"mask must be (B, H, W, 1) = {(b, h, w, 1)}, got {mask.shape}")

        f1 = lrelu(self.conv_first_1(x))
        f2 = lrelu(self.conv_first_2(f1))
        f3 = lrelu(self.conv_first_3(f2))
        fea = self.feature_extraction(f3)
        fea_light = self.recon_trunk_light(fea)

        hq, wq = fea.shape[1:3]
        # torch's legacy nearest resize by exactly 1/4 picks the top-left pixel of each 4x4 cell
        mask_q = mask[:, ::4, ::4, :].astype(fea.dtype)
        tokens = layers.materialize(patches_to_tokens(fea))
        tokens = self.transformer(tokens, patch_key_valid(mask_q))
        fea_global = tokens_to_patches(tokens, hq, wq)
        fea = fea_global * (1 - mask_q) + fea_light * mask_q

        out = self.recon_trunk(fea)
        out = lrelu(layers.pixel_shuffle(self.upconv1.concat_call([out, f3]), 2))
        out = lrelu(layers.pixel_shuffle(self.upconv2.concat_call([out, f2]), 2))
        out = lrelu(self.HRconv.concat_call([out, f1]))
        return self.conv_last(out) + x

    @staticmethod
    def example_inputs(config: SNRConfig, batch: int, height: int, width: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(x, mask): a dim image and its SNR map (:func:`snr_map`).

        The image is flat except for noisy 16x16 blocks, so its map has patches on both sides of
        the transformer's 0.5 threshold (flat: near 1, noisy: near 0).
        """
        base = rng.uniform(0.15, 0.35, (batch, 1, 1, 3)).astype(np.float32)
        gh, gw = -(-height // 16), -(-width // 16)
        noisy = rng.random((batch, gh, gw)) < 0.5
        if gh * gw > 1:  # at least one flat and one noisy block per image
            noisy[:, 0, 0], noisy[:, -1, -1] = False, True
        amp = rng.uniform(0.01, 0.05, (batch, gh, gw)) * noisy
        amp = np.repeat(np.repeat(amp, 16, 1), 16, 2)[:, :height, :width, None]
        x = base + amp * rng.standard_normal((batch, height, width, 3))
        x = np.clip(x, 0.0, 1.0).astype(np.float32)
        return x, np.array(snr_map(x), np.float32)  # a writable copy (torch.from_numpy warns)


def restore(model: SNRNet, x: jax.Array, mask: jax.Array | None = None, *,
            multiple: int = SNRNet.protocol.multiple, pad_mode: str = "reflect") -> jax.Array:
    """Runs ``model`` on images of any size: pads bottom/right to ``multiple`` and crops back.

    The SNR map is computed at the original size (when not given), then padded like the image,
    so the map of the valid region is the one the original pipeline would compute.
    ``pad_mode`` takes torch's names (reflect, replicate, zeros, circular).
    """
    x = jnp.asarray(x)
    if mask is None:
        mask = snr_map(x)
    h, w = x.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = pad_mode
        if mode == "reflect" and (ph >= h or pw >= w):
            mode = "replicate"  # reflect cannot pad by more than the size - 1
        x = layers.pad2d(x, (0, ph, 0, pw), mode)
        mask = layers.pad2d(jnp.asarray(mask), (0, ph, 0, pw), mode)
    return model(x, mask)[:, :h, :w, :]


register("snr", SNRNet, SNRConfig(nf=64, front_RBs=1, back_RBs=1, HR_in=True, predeblur=True),
         "SNR-Aware low-light enhancement; one architecture for all seven releases "
         "(LOLv1.pth, LOLv2_real.pth, LOLv2_synthetic.pth, sid_G.pth, smid_G.pth, indoor_G.pth, "
         "outdoor_G.pth); call model(x, mask) with the SNR map, or model(x)")
