"""DarkIR (Feijoo et al., CVPR 2025): low-light enhancement and deblurring, in Flax NNX.

An encoder of EBlocks (spatial attention "SpAM" plus a frequency-domain MLP "FreMLP"), a decoder
of DBlocks (dilated spatial attention "Di-SpAM" plus a gated FFN), additive skips, and a global
residual. Block for block and name for name as the official ``archs/DarkIR.py``, so the released
checkpoints (``{'params': state_dict}``) convert by attribute path (``porting``).

Input and output are NHWC float images in [0, 1]. Any H and W: the network zero-pads the bottom
and right to a multiple of 8 itself and crops back, exactly as the original (FFTs and global
average pools see the padded map, so this padding is part of the function).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers
from flaxrestore.layers import Conv2d, Sequential
from flaxrestore.models import Protocol, register


@dataclasses.dataclass(frozen=True)
class DarkIRConfig:
    """Keyword arguments of the original ``DarkIR`` class (lists become tuples)."""

    img_channel: int = 3
    width: int = 32
    middle_blk_num_enc: int = 2
    middle_blk_num_dec: int = 2
    enc_blk_nums: tuple[int, ...] = (1, 2, 3)
    dec_blk_nums: tuple[int, ...] = (3, 1, 1)
    dilations: tuple[int, ...] = (1, 4, 9)
    extra_depth_wise: bool = True


def LayerNorm2d(channels: int) -> layers.ChannelLayerNorm:
    """The original's LayerNorm2d: per-pixel LN over channels, biased variance, eps 1e-6.

    Its hand-written backward is the exact LN gradient, so plain autodiff is a faithful port.
    """
    return layers.ChannelLayerNorm(channels, eps=1e-6)


def _global_avg_pool(x):
    return jnp.mean(x, axis=(1, 2), keepdims=True)  # AdaptiveAvgPool2d(1)


def _leaky_relu_01(x):
    return jax.nn.leaky_relu(x, negative_slope=0.1)


def _pixel_shuffle_2(x):
    return layers.pixel_shuffle(x, 2)


class FreMLP(nnx.Module):
    """Frequency MLP: a per-bin 1x1 MLP on the magnitudes of rfft2, the phase kept.

    rfft2 / irfft2 over H and W (axes 1, 2 in NHWC), norm "backward" (the convs expect the
    unnormalised magnitudes), ``s=(H, W)`` on the inverse so odd widths come back right.
    """

    def __init__(self, nc: int, expand: int = 2, *, rngs: nnx.Rngs):
        self.process1 = Sequential(Conv2d(nc, expand * nc, 1, rngs=rngs), _leaky_relu_01,
                                   Conv2d(expand * nc, nc, 1, rngs=rngs))

    def __call__(self, x):
        _, h, w, _ = x.shape
        # jnp.fft takes float32/64 only: a bfloat16 x is transformed (and its MLP run) in float32
        z = jnp.fft.rfft2(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axes=(1, 2))
        re, im = jnp.real(z), jnp.imag(z)
        sq = re * re + im * im
        nonzero = sq > 0
        # |z| and the phase angle(z) = atan2(im, re), as torch.angle; at z = 0 torch's angle is
        # 0 with zero gradients, where atan2's gradient would be NaN: (1, 0) is taken there.
        # cos/sin of the angle, not re/|z| and im/|z|: on real bins (im = 0, the DC bin among
        # them) d cos / d re is exactly 0 through atan2, where re/|z| leaves float32 rounding
        # (measured up to 6e-8 per unit; DarkIR-m's norm2.bias gradients came out 500x further
        # from float64 than torch's)
        r = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
        mag = jnp.where(nonzero, r, 0.0)
        angle = jnp.arctan2(jnp.where(nonzero, im, 0.0), jnp.where(nonzero, re, 1.0))
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        mag = self.process1(mag)
        z = jax.lax.complex(mag * cos, mag * sin)
        return jnp.fft.irfft2(z, s=(h, w), axes=(1, 2)).astype(x.dtype)


class Branch(nnx.Module):
    """One depthwise 3x3 branch with dilation d (padding d)."""

    def __init__(self, c: int, DW_Expand: int, dilation: int = 1, *, rngs: nnx.Rngs):
        dw = DW_Expand * c
        self.branch = Sequential(Conv2d(dw, dw, 3, padding=dilation, dilation=dilation, groups=dw,
                                        rngs=rngs))

    def __call__(self, x):
        return self.branch(x)


def _identity(x):
    return x


class EBlock(nnx.Module):
    """Encoder block: SpAM (depthwise conv, gate, channel attention) then FreMLP used
    multiplicatively: out = y + gamma * (y * FreMLP(LN(y)))."""

    def __init__(self, c: int, DW_Expand: int = 2, dilations=(1,), extra_depth_wise: bool = False,
                 *, rngs: nnx.Rngs):
        dw = DW_Expand * c
        self.gamma = nnx.Param(jnp.zeros((1, 1, 1, c), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((1, 1, 1, c), jnp.float32))
        self.extra_conv = (Conv2d(c, c, 3, padding=1, groups=c, rngs=rngs) if extra_depth_wise
                           else _identity)
        self.conv1 = Conv2d(c, dw, 1, rngs=rngs)
        self.branches = Sequential(*[Branch(c, DW_Expand, d, rngs=rngs) for d in dilations])
        self.sca = Sequential(_global_avg_pool, Conv2d(dw // 2, dw // 2, 1, rngs=rngs))
        self.conv3 = Conv2d(dw // 2, c, 1, rngs=rngs)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.freq = FreMLP(c, expand=2, rngs=rngs)

    def _branch_convs(self):
        return [branch.branch.layers[0] for branch in self.branches.layers]

    def __call__(self, inp):
        x = self.conv1(self.extra_conv(self.norm1(inp)))
        z = layers.depthwise_branch_sum(x, self._branch_convs())  # sum of the dilated branches
        z = layers.simple_gate(z)
        x = self.conv3(self.sca(z) * z)
        y = inp + self.beta[...] * x
        x = y * self.freq(self.norm2(y))
        return y + x * self.gamma[...]


class DBlock(nnx.Module):
    """Decoder block: Di-SpAM (1x1 expand, grouped 3x3, summed dilated depthwise branches, gate,
    channel attention) then a gated FFN."""

    def __init__(self, c: int, DW_Expand: int = 2, FFN_Expand: int = 2, dilations=(1,),
                 extra_depth_wise: bool = False, *, rngs: nnx.Rngs):
        dw = DW_Expand * c
        ffn = FFN_Expand * c
        self.gamma = nnx.Param(jnp.zeros((1, 1, 1, c), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((1, 1, 1, c), jnp.float32))
        self.conv1 = Conv2d(c, dw, 1, rngs=rngs)
        # groups=c on 2c channels: each group maps 2 channels to 2 (not depthwise)
        self.extra_conv = (Conv2d(dw, dw, 3, padding=1, groups=c, rngs=rngs)
                           if extra_depth_wise else _identity)
        self.branches = Sequential(*[Branch(dw, 1, d, rngs=rngs) for d in dilations])
        self.sca = Sequential(_global_avg_pool, Conv2d(dw // 2, dw // 2, 1, rngs=rngs))
        self.conv3 = Conv2d(dw // 2, c, 1, rngs=rngs)
        self.conv4 = Conv2d(c, ffn, 1, rngs=rngs)
        self.conv5 = Conv2d(ffn // 2, c, 1, rngs=rngs)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)

    def _branch_convs(self):
        return [branch.branch.layers[0] for branch in self.branches.layers]

    def __call__(self, inp):
        t = self.norm1(inp)
        # conv1, extra_conv, then the sum of the dilated branches
        pre = (self.conv1,) + ((self.extra_conv,) if isinstance(self.extra_conv, Conv2d) else ())
        z = layers.depthwise_branch_sum(t, self._branch_convs(), pre=pre)
        z = layers.simple_gate(z)  # sg1
        x = self.conv3(self.sca(z) * z)
        y = inp + self.beta[...] * x
        x = self.conv5(layers.simple_gate(self.conv4(self.norm2(y))))  # sg2
        return y + x * self.gamma[...]


class CustomSequential(nnx.Module):
    """The original's block container: its children live in ``modules_list`` (state_dict keys
    ``encoders.1.modules_list.0....``)."""

    def __init__(self, *blocks):
        self.modules_list = Sequential(*blocks)

    def __call__(self, x):
        for block in self.modules_list.layers:
            x = block(x)
        return x


class DarkIR(nnx.Module):
    # any H, W: the network pads to padder_size itself (zeros, bottom/right) and crops back;
    # inference.py zero-pads to 8 all the same. Training adds the 1/8-scale side output.
    protocol = Protocol(8, "zeros", any_size=True, side_output="side_loss")

    def __init__(self, config: DarkIRConfig = DarkIRConfig(), *, rngs: nnx.Rngs):
        cfg = self.config = config
        width, ch = cfg.width, cfg.img_channel
        edw = cfg.extra_depth_wise
        self.intro = Conv2d(ch, width, 3, padding=1, rngs=rngs)
        self.ending = Conv2d(width, ch, 3, padding=1, rngs=rngs)

        encoders, downs, ups, decoders = [], [], [], []
        chan = width
        for num in cfg.enc_blk_nums:
            encoders.append(CustomSequential(*[EBlock(chan, extra_depth_wise=edw, rngs=rngs)
                                               for _ in range(num)]))
            downs.append(Conv2d(chan, 2 * chan, 2, stride=2, rngs=rngs))
            chan *= 2
        # EBlocks never receive `dilations` in the original: one dilation-1 branch each
        self.middle_blks_enc = CustomSequential(*[EBlock(chan, extra_depth_wise=edw, rngs=rngs)
                                                  for _ in range(cfg.middle_blk_num_enc)])
        self.middle_blks_dec = CustomSequential(*[
            DBlock(chan, dilations=tuple(cfg.dilations), extra_depth_wise=edw, rngs=rngs)
            for _ in range(cfg.middle_blk_num_dec)])
        for num in cfg.dec_blk_nums:
            ups.append(Sequential(Conv2d(chan, 2 * chan, 1, bias=False, rngs=rngs),
                                  _pixel_shuffle_2))
            chan //= 2
            decoders.append(CustomSequential(*[
                DBlock(chan, dilations=tuple(cfg.dilations), extra_depth_wise=edw, rngs=rngs)
                for _ in range(num)]))
        # ModuleLists in the original; nnx.Sequential gives the same child indices
        self.encoders = Sequential(*encoders)
        self.decoders = Sequential(*decoders)
        self.ups = Sequential(*ups)
        self.downs = Sequential(*downs)
        # (the original's empty `middle_blks` ModuleList holds no weights and is left out)
        self.padder_size = 2 ** len(cfg.enc_blk_nums)
        # only used for the training side loss; present in every released checkpoint
        self.side_out = Conv2d(width * 2 ** len(cfg.enc_blk_nums), ch, 3, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array, side_loss: bool = False):
        """Restored image (NHWC, same size as ``x``); with ``side_loss=True`` the tuple
        ``(out_side, out)`` as the original, ``out_side`` at 1/8 of the padded size, uncropped."""
        _, h, w, c = x.shape
        if c != self.config.img_channel:
            raise ValueError(f"expected {self.config.img_channel} input channels, got {c}")
        p = self.padder_size
        x = layers.pad2d(x, (0, (p - h % p) % p, 0, (p - w % p) % p))  # zeros, bottom/right
        feat = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders.layers, self.downs.layers):
            feat = encoder(feat)
            skips.append(feat)
            feat = down(feat)
        x_light = self.middle_blks_enc(feat)
        feat = self.middle_blks_dec(x_light) + x_light
        for decoder, up, skip in zip(self.decoders.layers, self.ups.layers, skips[::-1]):
            feat = decoder(up(feat) + skip)
        out = (self.ending(feat) + x)[:, :h, :w, :]
        if side_loss:
            return self.side_out(x_light), out
        return out

    @staticmethod
    def example_inputs(config: DarkIRConfig, batch: int, height: int, width: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        return (rng.random((batch, height, width, config.img_channel), dtype=np.float32),)


register("darkir:m", DarkIR, DarkIRConfig(width=32),
         "DarkIR-m, width 32: LOLBlur (DarkIR_384.pt), multi-task (DarkIR_1k_cr_mt.pt), "
         "unpaired sets (DarkIR_allLOL.pt)")
register("darkir:l", DarkIR, DarkIRConfig(width=64),
         "DarkIR-l, width 64: LOLBlur / Real-LOLBlur (DarkIR_64width.pt)")
