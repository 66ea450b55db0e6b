"""MPRNet (Zamir et al., CVPR 2021) in Flax NNX, block for block as the official code.

Multi-stage progressive restoration: stage 1 encodes the four image quadrants and decodes the two
halves, stage 2 encodes the halves (fused with stage-1 features) and decodes the whole image,
stage 3 refines at full resolution without downsampling (ORSNet). Supervised attention modules
(SAM) pass features and an intermediate image from stage to stage.

Input and output are NHWC float images in [0, 1]; H and W must be multiples of 8. The forward
returns ``[stage3_img, stage2_img, stage1_img]`` as the original does (element 0 is the result).
Attribute names equal the torch ones, so the official checkpoints convert by path (``porting``).
All 55 channel-attention blocks share ONE PReLU (a single scalar slope), as in the original: it is
a single NNX module referenced from every CAB, and appears in the torch state_dict under each
alias ``...body.1.weight``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers
from flaxrestore.layers import Conv2d, PReLU, Sequential
from flaxrestore.models import Protocol, register


@dataclasses.dataclass(frozen=True)
class MPRNetConfig:
    """Keyword arguments of the original ``MPRNet`` class (defaults: the deblurring release)."""

    in_c: int = 3
    out_c: int = 3
    n_feat: int = 96
    scale_unetfeats: int = 48
    scale_orsnetfeats: int = 32
    num_cab: int = 8
    kernel_size: int = 3
    reduction: int = 4
    bias: bool = False


def conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = False, *,
         rngs: nnx.Rngs) -> Conv2d:
    """The original's conv helper: 'same' zero padding (k // 2), stride 1."""
    return Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias,
                  rngs=rngs)


def _relu(x):
    return jax.nn.relu(x)


def _sigmoid(x):
    return jax.nn.sigmoid(x)


def _half(x):
    # bilinear x0.5 with align_corners=False (no antialiasing): the mean of each 2x2 block
    return layers.resize_bilinear(x, scale_factor=0.5, align_corners=False)


def _double(x):
    return layers.resize_bilinear(x, scale_factor=2, align_corners=False)


class CALayer(nnx.Module):
    """Channel attention: global average pool, squeeze (ReLU), excite (sigmoid), rescale."""

    def __init__(self, channel: int, reduction: int = 16, bias: bool = False, *, rngs: nnx.Rngs):
        self.conv_du = Sequential(Conv2d(channel, channel // reduction, 1, bias=bias, rngs=rngs),
                                  _relu,
                                  Conv2d(channel // reduction, channel, 1, bias=bias, rngs=rngs),
                                  _sigmoid)

    def __call__(self, x):
        y = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x * self.conv_du(y)


class CAB(nnx.Module):
    """Channel attention block: conv, (shared) PReLU, conv, channel attention, residual."""

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, bias: bool, act: PReLU, *,
                 rngs: nnx.Rngs):
        self.CA = CALayer(n_feat, reduction, bias=bias, rngs=rngs)
        self.body = Sequential(conv(n_feat, n_feat, kernel_size, bias=bias, rngs=rngs), act,
                               conv(n_feat, n_feat, kernel_size, bias=bias, rngs=rngs))

    def __call__(self, x):
        return layers.checkpoint_call(self, CAB._forward, x)

    def _forward(self, x):
        return self.CA(self.body(x)) + x


class SAM(nnx.Module):
    """Supervised attention module: predicts an image (+ input image) and gates the features."""

    def __init__(self, n_feat: int, kernel_size: int, bias: bool, *, rngs: nnx.Rngs):
        self.conv1 = conv(n_feat, n_feat, kernel_size, bias=bias, rngs=rngs)
        self.conv2 = conv(n_feat, 3, kernel_size, bias=bias, rngs=rngs)  # 3, not out_c
        self.conv3 = conv(3, n_feat, kernel_size, bias=bias, rngs=rngs)

    def __call__(self, x, x_img):
        x1 = self.conv1(x)
        img = self.conv2(x) + x_img
        x2 = jax.nn.sigmoid(self.conv3(img))
        return x1 * x2 + x, img


class DownSample(nnx.Module):
    def __init__(self, in_channels: int, s_factor: int, *, rngs: nnx.Rngs):
        self.down = Sequential(_half, Conv2d(in_channels, in_channels + s_factor, 1, bias=False,
                                             rngs=rngs))

    def __call__(self, x):
        return self.down(x)


class UpSample(nnx.Module):
    def __init__(self, in_channels: int, s_factor: int, *, rngs: nnx.Rngs):
        self.up = Sequential(_double, Conv2d(in_channels + s_factor, in_channels, 1, bias=False,
                                             rngs=rngs))

    def __call__(self, x):
        return self.up(x)


class SkipUpSample(nnx.Module):
    def __init__(self, in_channels: int, s_factor: int, *, rngs: nnx.Rngs):
        self.up = Sequential(_double, Conv2d(in_channels + s_factor, in_channels, 1, bias=False,
                                             rngs=rngs))

    def __call__(self, x, y):
        return self.up(x) + y


def _cabs(n: int, width: int, kernel_size: int, reduction: int, bias: bool, act: PReLU,
          rngs: nnx.Rngs) -> Sequential:
    return Sequential(*[CAB(width, kernel_size, reduction, bias, act, rngs=rngs) for _ in range(n)])


class Encoder(nnx.Module):
    """Three-level U-Net encoder; with ``csff`` it fuses the previous stage's features per level."""

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, act: PReLU, bias: bool,
                 scale_unetfeats: int, csff: bool, *, rngs: nnx.Rngs):
        w1, w2, w3 = n_feat, n_feat + scale_unetfeats, n_feat + 2 * scale_unetfeats
        self.encoder_level1 = _cabs(2, w1, kernel_size, reduction, bias, act, rngs)
        self.encoder_level2 = _cabs(2, w2, kernel_size, reduction, bias, act, rngs)
        self.encoder_level3 = _cabs(2, w3, kernel_size, reduction, bias, act, rngs)
        self.down12 = DownSample(w1, scale_unetfeats, rngs=rngs)
        self.down23 = DownSample(w2, scale_unetfeats, rngs=rngs)
        self.csff = csff
        if csff:
            self.csff_enc1 = Conv2d(w1, w1, 1, bias=bias, rngs=rngs)
            self.csff_enc2 = Conv2d(w2, w2, 1, bias=bias, rngs=rngs)
            self.csff_enc3 = Conv2d(w3, w3, 1, bias=bias, rngs=rngs)
            self.csff_dec1 = Conv2d(w1, w1, 1, bias=bias, rngs=rngs)
            self.csff_dec2 = Conv2d(w2, w2, 1, bias=bias, rngs=rngs)
            self.csff_dec3 = Conv2d(w3, w3, 1, bias=bias, rngs=rngs)

    def __call__(self, x, encoder_outs=None, decoder_outs=None):
        fuse = encoder_outs is not None and decoder_outs is not None
        if fuse and not self.csff:
            raise ValueError("this Encoder was built without cross-stage feature fusion (csff)")
        enc1 = self.encoder_level1(x)
        if fuse:
            enc1 = enc1 + self.csff_enc1(encoder_outs[0]) + self.csff_dec1(decoder_outs[0])
        enc2 = self.encoder_level2(self.down12(enc1))
        if fuse:
            enc2 = enc2 + self.csff_enc2(encoder_outs[1]) + self.csff_dec2(decoder_outs[1])
        enc3 = self.encoder_level3(self.down23(enc2))
        if fuse:
            enc3 = enc3 + self.csff_enc3(encoder_outs[2]) + self.csff_dec3(decoder_outs[2])
        return [enc1, enc2, enc3]


class Decoder(nnx.Module):
    """Three-level U-Net decoder with channel-attention skip connections."""

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, act: PReLU, bias: bool,
                 scale_unetfeats: int, *, rngs: nnx.Rngs):
        w1, w2, w3 = n_feat, n_feat + scale_unetfeats, n_feat + 2 * scale_unetfeats
        self.decoder_level1 = _cabs(2, w1, kernel_size, reduction, bias, act, rngs)
        self.decoder_level2 = _cabs(2, w2, kernel_size, reduction, bias, act, rngs)
        self.decoder_level3 = _cabs(2, w3, kernel_size, reduction, bias, act, rngs)
        self.skip_attn1 = CAB(w1, kernel_size, reduction, bias, act, rngs=rngs)
        self.skip_attn2 = CAB(w2, kernel_size, reduction, bias, act, rngs=rngs)
        self.up21 = SkipUpSample(w1, scale_unetfeats, rngs=rngs)
        self.up32 = SkipUpSample(w2, scale_unetfeats, rngs=rngs)

    def __call__(self, outs):
        enc1, enc2, enc3 = outs
        dec3 = self.decoder_level3(enc3)
        dec2 = self.decoder_level2(self.up32(dec3, self.skip_attn2(enc2)))
        dec1 = self.decoder_level1(self.up21(dec2, self.skip_attn1(enc1)))
        return [dec1, dec2, dec3]


class ORB(nnx.Module):
    """Original-resolution block: num_cab CABs and a conv (never with bias), plus a residual."""

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, act: PReLU, bias: bool,
                 num_cab: int, *, rngs: nnx.Rngs):
        blocks = [CAB(n_feat, kernel_size, reduction, bias, act, rngs=rngs) for _ in range(num_cab)]
        # the original builds this conv without passing `bias`, so it has none
        self.body = Sequential(*blocks, conv(n_feat, n_feat, kernel_size, rngs=rngs))

    def __call__(self, x):
        return self.body(x) + x


class ORSNet(nnx.Module):
    """Original-resolution subnetwork (stage 3), fed with the stage-2 encoder/decoder features."""

    def __init__(self, n_feat: int, scale_orsnetfeats: int, kernel_size: int, reduction: int,
                 act: PReLU, bias: bool, scale_unetfeats: int, num_cab: int, *, rngs: nnx.Rngs):
        w = n_feat + scale_orsnetfeats
        s = scale_unetfeats
        self.orb1 = ORB(w, kernel_size, reduction, act, bias, num_cab, rngs=rngs)
        self.orb2 = ORB(w, kernel_size, reduction, act, bias, num_cab, rngs=rngs)
        self.orb3 = ORB(w, kernel_size, reduction, act, bias, num_cab, rngs=rngs)
        self.up_enc1 = UpSample(n_feat, s, rngs=rngs)
        self.up_dec1 = UpSample(n_feat, s, rngs=rngs)
        self.up_enc2 = Sequential(UpSample(n_feat + s, s, rngs=rngs), UpSample(n_feat, s, rngs=rngs))
        self.up_dec2 = Sequential(UpSample(n_feat + s, s, rngs=rngs), UpSample(n_feat, s, rngs=rngs))
        self.conv_enc1 = Conv2d(n_feat, w, 1, bias=bias, rngs=rngs)
        self.conv_enc2 = Conv2d(n_feat, w, 1, bias=bias, rngs=rngs)
        self.conv_enc3 = Conv2d(n_feat, w, 1, bias=bias, rngs=rngs)
        self.conv_dec1 = Conv2d(n_feat, w, 1, bias=bias, rngs=rngs)
        self.conv_dec2 = Conv2d(n_feat, w, 1, bias=bias, rngs=rngs)
        self.conv_dec3 = Conv2d(n_feat, w, 1, bias=bias, rngs=rngs)

    def __call__(self, x, encoder_outs, decoder_outs):
        x = self.orb1(x)
        x = x + self.conv_enc1(encoder_outs[0]) + self.conv_dec1(decoder_outs[0])
        x = self.orb2(x)
        x = x + self.conv_enc2(self.up_enc1(encoder_outs[1])) + \
            self.conv_dec2(self.up_dec1(decoder_outs[1]))
        x = self.orb3(x)
        x = x + self.conv_enc3(self.up_enc2(encoder_outs[2])) + \
            self.conv_dec3(self.up_dec2(decoder_outs[2]))
        return x


def _split(x, n: int):
    """The batch-stacked pieces of ``x`` back as a list (inverse of concatenating on axis 0)."""
    return jnp.split(x, n, axis=0)


class MPRNet(nnx.Module):
    # demo.py: reflect-pad to 8, crop; outputs [stage 3, stage 2, stage 1], stage 3 the result
    protocol = Protocol(8, "reflect", outputs="stages")

    def __init__(self, config: MPRNetConfig = MPRNetConfig(), *, rngs: nnx.Rngs):
        cfg = self.config = config
        n, k, r, b = cfg.n_feat, cfg.kernel_size, cfg.reduction, cfg.bias
        s_u, s_o = cfg.scale_unetfeats, cfg.scale_orsnetfeats
        # ONE PReLU for the whole network, as the original (a local there, so no `act` key)
        act = PReLU()

        self.shallow_feat1 = Sequential(conv(cfg.in_c, n, k, bias=b, rngs=rngs),
                                        CAB(n, k, r, b, act, rngs=rngs))
        self.shallow_feat2 = Sequential(conv(cfg.in_c, n, k, bias=b, rngs=rngs),
                                        CAB(n, k, r, b, act, rngs=rngs))
        self.shallow_feat3 = Sequential(conv(cfg.in_c, n, k, bias=b, rngs=rngs),
                                        CAB(n, k, r, b, act, rngs=rngs))
        self.stage1_encoder = Encoder(n, k, r, act, b, s_u, csff=False, rngs=rngs)
        self.stage1_decoder = Decoder(n, k, r, act, b, s_u, rngs=rngs)
        self.stage2_encoder = Encoder(n, k, r, act, b, s_u, csff=True, rngs=rngs)
        self.stage2_decoder = Decoder(n, k, r, act, b, s_u, rngs=rngs)
        self.stage3_orsnet = ORSNet(n, s_o, k, r, act, b, s_u, cfg.num_cab, rngs=rngs)
        self.sam12 = SAM(n, kernel_size=1, bias=b, rngs=rngs)
        self.sam23 = SAM(n, kernel_size=1, bias=b, rngs=rngs)
        self.concat12 = conv(n * 2, n, k, bias=b, rngs=rngs)
        self.concat23 = conv(n * 2, n + s_o, k, bias=b, rngs=rngs)
        self.tail = conv(n + s_o, cfg.out_c, k, bias=b, rngs=rngs)

    def __call__(self, x3_img: jax.Array) -> list[jax.Array]:
        bsz, H, W, c = x3_img.shape
        if H % 8 or W % 8:
            raise ValueError(f"MPRNet needs H and W divisible by 8, got {(H, W)}; "
                             "pad the input (flaxrestore.restore does this for you)")
        if c != self.config.in_c:
            raise ValueError(f"expected {self.config.in_c} input channels, got {c}")
        h, w = H // 2, W // 2
        # The original runs the same modules on each quadrant / half separately. Every op is
        # per-sample, so the pieces are stacked along the batch axis and run in one call:
        # quadrants as [top-left, top-right, bottom-left, bottom-right], halves as [top, bottom].
        top_img, bot_img = x3_img[:, :h], x3_img[:, h:]
        halves_img = jnp.concatenate([top_img, bot_img], axis=0)
        quads_img = jnp.concatenate([top_img[:, :, :w], top_img[:, :, w:],
                                     bot_img[:, :, :w], bot_img[:, :, w:]], axis=0)

        # ---- stage 1: encode quadrants, decode width-concatenated halves
        feat1_q = self.stage1_encoder(self.shallow_feat1(quads_img))
        feat1 = []  # per level: [top; bottom] stacked on the batch axis
        for f in feat1_q:
            f_lt, f_rt, f_lb, f_rb = _split(f, 4)
            top = jnp.concatenate([f_lt, f_rt], axis=2)
            bot = jnp.concatenate([f_lb, f_rb], axis=2)
            feat1.append(jnp.concatenate([top, bot], axis=0))
        res1 = self.stage1_decoder(feat1)
        x2_samfeats, stage1_halves = self.sam12(res1[0], halves_img)
        s1_top, s1_bot = _split(stage1_halves, 2)
        stage1_img = jnp.concatenate([s1_top, s1_bot], axis=1)

        # ---- stage 2: encode halves (with cross-stage fusion), decode the whole image
        x2 = self.shallow_feat2(halves_img)
        x2_cat = self.concat12.concat_call([x2, x2_samfeats])
        feat2_h = self.stage2_encoder(x2_cat, feat1, res1)
        feat2 = [jnp.concatenate(_split(f, 2), axis=1) for f in feat2_h]
        res2 = self.stage2_decoder(feat2)
        x3_samfeats, stage2_img = self.sam23(res2[0], x3_img)

        # ---- stage 3: original-resolution refinement
        x3 = self.shallow_feat3(x3_img)
        x3_cat = self.concat23.concat_call([x3, x3_samfeats])
        x3_cat = self.stage3_orsnet(x3_cat, feat2, res2)
        stage3_img = self.tail(x3_cat)
        return [stage3_img + x3_img, stage2_img, stage1_img]

    @staticmethod
    def example_inputs(config: MPRNetConfig, batch: int, height: int, width: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        return (rng.random((batch, height, width, config.in_c), dtype=np.float32),)


for _name, _cfg, _desc in [
    ("deblurring", MPRNetConfig(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32),
     "GoPro motion deblurring (model_deblurring.pth)"),
    ("deraining", MPRNetConfig(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16),
     "Rain13K deraining (model_deraining.pth)"),
    ("denoising", MPRNetConfig(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32),
     "SIDD real denoising (model_denoising.pth)"),
]:
    register(f"mprnet:{_name}", MPRNet, _cfg, _desc)
