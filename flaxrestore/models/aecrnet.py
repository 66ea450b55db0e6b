"""AECR-Net (Wu et al., CVPR 2021, "Contrastive Learning for Compact Single Image Dehazing").

The official ``Dehaze`` network in Flax NNX, block for block: a FastDeconv (network
deconvolution) on the input, a reflect-padded 7x7 conv and two stride-2 convs down, ONE FA block
(channel + pixel attention) applied six times with shared weights, ONE modulated deformable conv
(DCNv2) applied twice with shared weights, two adaptive mixups, two transposed convs and a
reflect-padded 7x7 conv with tanh out. No global residual; input in [0, 1], output in (-1, 1).

Input and output are NHWC; H and W must be multiples of 4 (the original crashes or returns a
wrong size otherwise, so this port rejects them). ``.train()`` / ``.eval()`` switch FastDeconv
between batch and running statistics, as in torch; like a fresh torch module, a new model is in
train mode, so call ``.eval()`` for inference.

The mixes are named ``mix4`` / ``mix5`` as in the released checkpoint (the published code calls
the same two modules ``mix1`` / ``mix2``): ``mix4`` mixes the 4*ngf-channel encoder feature
(init -1), ``mix5`` the 2*ngf-channel one (init -0.6).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers
from flaxrestore.layers import Conv2d, ConvTranspose2d, FastDeconv, ModulatedDeformConv2d, Sequential
from flaxrestore.models import Protocol, register


@dataclasses.dataclass(frozen=True)
class AECRNetConfig:
    """Keyword arguments of the original ``Dehaze`` class.

    ``use_dropout`` and ``padding_type`` are accepted and ignored, as in the original. The original
    hard-codes the deformable conv to 256 channels (so only ngf=64 runs there); here it is
    4*ngf, which is the same for ngf=64 and lets reduced widths run.
    """

    input_nc: int = 3
    output_nc: int = 3
    ngf: int = 64
    use_dropout: bool = False
    padding_type: str = "reflect"


def _reflect3(x):
    return layers.pad2d(x, 3, "reflect")  # torch ReflectionPad2d(3): no edge repeat


class ValidConv2d(Conv2d):
    """A padding-free Conv2d (the reflect-padded 7x7s): same variables and numbers as
    :class:`Conv2d`, computed by :func:`layers.conv2d_valid` (XLA:CPU's padding-free conv path is
    slow for the 64->3 output conv: 0.67 s of a 1.1 s forward at 256x256)."""

    def __call__(self, x):
        if self.padding != (0, 0) or self.groups != 1:
            return super().__call__(x)
        y = layers.conv2d_valid(x, self.kernel[...].astype(x.dtype), self.stride, self.dilation)
        if self.bias is not None:
            y = layers.add_bias(y, self.bias[...])
        return y


def default_conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, *,
                 rngs: nnx.Rngs) -> Conv2d:
    return Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias,
                  rngs=rngs)


class PALayer(nnx.Module):
    """Pixel attention: one sigmoid map per pixel, broadcast over channels."""

    def __init__(self, channel: int, *, rngs: nnx.Rngs):
        self.pa = Sequential(Conv2d(channel, channel // 8, 1, bias=True, rngs=rngs), jax.nn.relu,
                             Conv2d(channel // 8, 1, 1, bias=True, rngs=rngs), jax.nn.sigmoid)

    def __call__(self, x):
        return x * self.pa(x)


class CALayer(nnx.Module):
    """Channel attention: global average pool, squeeze-excite, per-channel sigmoid scale."""

    def __init__(self, channel: int, *, rngs: nnx.Rngs):
        self.ca = Sequential(Conv2d(channel, channel // 8, 1, bias=True, rngs=rngs), jax.nn.relu,
                             Conv2d(channel // 8, channel, 1, bias=True, rngs=rngs), jax.nn.sigmoid)

    def __call__(self, x):
        return x * self.ca(jnp.mean(x, axis=(1, 2), keepdims=True))


class DehazeBlock(nnx.Module):
    """FFA-Net's FA block: conv-relu, local residual, conv, channel attn, pixel attn, residual."""

    def __init__(self, conv, dim: int, kernel_size: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(dim, dim, kernel_size, bias=True, rngs=rngs)
        self.conv2 = conv(dim, dim, kernel_size, bias=True, rngs=rngs)
        self.calayer = CALayer(dim, rngs=rngs)
        self.palayer = PALayer(dim, rngs=rngs)

    def __call__(self, x):
        res = jax.nn.relu(self.conv1(x)) + x
        res = self.palayer(self.calayer(self.conv2(res)))
        return res + x


class DCNBlock(nnx.Module):
    """Holds the DCNv2 ``DCN`` (3x3, stride 1, padding 1) under the attribute ``dcn``."""

    def __init__(self, in_channel: int, out_channel: int, *, rngs: nnx.Rngs):
        self.dcn = ModulatedDeformConv2d(in_channel, out_channel, 3, stride=1, padding=1,
                                         rngs=rngs)

    def __call__(self, x):
        return self.dcn(x)


class Mix(nnx.Module):
    """Adaptive mixup: sigmoid(w) * fea1 + (1 - sigmoid(w)) * fea2, one learnable scalar w."""

    def __init__(self, m: float = -0.8):
        self.w = nnx.Param(jnp.full((1,), m, jnp.float32))

    def __call__(self, fea1, fea2):
        f = jax.nn.sigmoid(self.w[...]).astype(fea1.dtype)
        return fea1 * f + fea2 * (1 - f)


class AECRNet(nnx.Module):
    # H, W must be multiples of 4 (the original crashes or grows otherwise): reflect-pad to 4
    # and crop is this port's documented extension; the tanh output is clamped to [0, 1]
    protocol = Protocol(4, "reflect")

    def __init__(self, config: AECRNetConfig = AECRNetConfig(), *, rngs: nnx.Rngs):
        cfg = self.config = config
        ngf = cfg.ngf
        relu = jax.nn.relu
        # attribute order = the original's registration order = its state_dict order
        self.down1 = Sequential(_reflect3, ValidConv2d(cfg.input_nc, ngf, 7, rngs=rngs), relu)
        self.down2 = Sequential(Conv2d(ngf, ngf * 2, 3, stride=2, padding=1, rngs=rngs), relu)
        self.down3 = Sequential(Conv2d(ngf * 2, ngf * 4, 3, stride=2, padding=1, rngs=rngs), relu)
        self.block = DehazeBlock(default_conv, ngf * 4, 3, rngs=rngs)
        self.up1 = Sequential(ConvTranspose2d(ngf * 4, ngf * 2, 3, stride=2, padding=1,
                                              output_padding=1, rngs=rngs), relu)
        self.up2 = Sequential(ConvTranspose2d(ngf * 2, ngf, 3, stride=2, padding=1,
                                              output_padding=1, rngs=rngs), relu)
        self.up3 = Sequential(_reflect3, ValidConv2d(ngf, cfg.output_nc, 7, rngs=rngs),
                              jnp.tanh)
        self.dcn_block = DCNBlock(ngf * 4, ngf * 4, rngs=rngs)
        self.deconv = FastDeconv(cfg.input_nc, cfg.input_nc, 3, stride=1, padding=1, rngs=rngs)
        self.mix4 = Mix(-1.0)
        self.mix5 = Mix(-0.6)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if h % 4 or w % 4:
            raise ValueError(f"AECR-Net needs H and W divisible by 4, got {(h, w)} (the original "
                             "crashes or returns a wrong size); pad the input to a "
                             "multiple of 4 and crop the output")
        if c != self.config.input_nc:
            raise ValueError(f"expected {self.config.input_nc} input channels, got {c}")
        x_deconv = self.deconv(x)
        x_down1 = self.down1(x_deconv)
        x_down2 = self.down2(x_down1)
        x_down3 = self.down3(x_down2)
        y = x_down3
        for _ in range(6):  # one FA block, six times
            y = self.block(y)
        y = self.dcn_block(self.dcn_block(y))  # one DCN, twice
        y = self.up1(self.mix4(x_down3, y))
        y = self.up2(self.mix5(x_down2, y))
        return self.up3(y)

    @staticmethod
    def example_inputs(config: AECRNetConfig, batch: int, height: int, width: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """A hazy image batch in [0, 1] (no normalisation, as the original)."""
        return (rng.random((batch, height, width, config.input_nc), dtype=np.float32),)


register("aecrnet", AECRNet, AECRNetConfig(),
         "AECR-Net dehazing, Dehaze(3, 3) (ITS/SOTS, Dense-Haze, NH-HAZE releases share it)")
