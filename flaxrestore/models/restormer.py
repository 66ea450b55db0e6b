"""Restormer (Zamir et al., CVPR 2022) in Flax NNX, block for block as the official code.

Input and output are NHWC float images; H and W must be multiples of 8. Attribute names equal
the torch ones, so the official checkpoints convert by path (``porting``).
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
class RestormerConfig:
    """Keyword arguments of the original ``Restormer`` class."""

    inp_channels: int = 3
    out_channels: int = 3
    dim: int = 48
    num_blocks: tuple[int, ...] = (4, 6, 6, 8)
    num_refinement_blocks: int = 4
    heads: tuple[int, ...] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.66
    bias: bool = False
    LayerNorm_type: str = "WithBias"
    dual_pixel_task: bool = False


class LayerNorm(nnx.Module):
    """Channel LayerNorm with the original's two flavours ('BiasFree' or anything else)."""

    def __init__(self, dim: int, LayerNorm_type: str):
        # BiasFree divides the uncentred x by the centred std; WithBias is a plain LN (eps 1e-5)
        self.body = layers.ChannelLayerNorm(dim, eps=1e-5, center=LayerNorm_type != "BiasFree")

    def __call__(self, x):
        return self.body(x)


class FeedForward(nnx.Module):
    """Gated-Dconv feed-forward network (GDFN)."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool, *, rngs: nnx.Rngs):
        hidden = int(dim * ffn_expansion_factor)  # truncates, as the original
        self.project_in = Conv2d(dim, hidden * 2, 1, bias=bias, rngs=rngs)
        self.dwconv = Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias,
                             rngs=rngs)
        self.project_out = Conv2d(hidden, dim, 1, bias=bias, rngs=rngs)

    def __call__(self, x):
        x = self.dwconv(self.project_in(x))
        x1, x2 = jnp.split(x, 2, axis=-1)
        return self.project_out(layers.gelu(x1) * x2)


class Attention(nnx.Module):
    """Multi-Dconv head transposed attention (MDTA): channel-by-channel attention per head."""

    def __init__(self, dim: int, num_heads: int, bias: bool, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.temperature = nnx.Param(jnp.ones((num_heads, 1, 1), jnp.float32))
        self.qkv = Conv2d(dim, dim * 3, 1, bias=bias, rngs=rngs)
        self.qkv_dwconv = Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias,
                                 rngs=rngs)
        self.project_out = Conv2d(dim, dim, 1, bias=bias, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv_dwconv(self.qkv(x))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        # heads are head-major over channels: channel = head * (c / heads) + i
        q, k, v = (t.reshape(b, h * w, self.num_heads, c // self.num_heads) for t in (q, k, v))
        # F.normalize(dim=-1) of q and k over the spatial axis, applied to their product
        # instead: (q / |q|)^T (k / |k|) = q^T k / (|q| |k|^T), equal to float rounding, and the
        # normalized copies of q and k (and their gradients) are never formed. Measured for the
        # attention's gradient at 4x128x128, 96 channels: 189 -> 166 ms (CPU).
        qn = layers.l2_norm(q, axis=1)  # (b, heads, c / heads), clamped at eps like F.normalize
        kn = layers.l2_norm(k, axis=1)
        attn = jnp.einsum("bnhc,bnhd->bhcd", q, k) / (qn[..., :, None] * kn[..., None, :])
        attn = attn * self.temperature[...].astype(q.dtype)
        attn = jax.nn.softmax(attn, axis=-1)
        out = jnp.einsum("bhcd,bnhd->bnhc", attn, v).reshape(b, h, w, c)
        return self.project_out(out)


class TransformerBlock(nnx.Module):
    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                 LayerNorm_type: str, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = Attention(dim, num_heads, bias, rngs=rngs)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias, rngs=rngs)

    def __call__(self, x):
        return layers.checkpoint_call(self, TransformerBlock._forward, x)

    def _forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nnx.Module):
    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False, *, rngs: nnx.Rngs):
        self.proj = Conv2d(in_c, embed_dim, 3, padding=1, bias=bias, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


# module-level functions, not lambdas, in the Sequentials below: a lambda is a new object per
# instance, so two models of one configuration would have different graph definitions and a
# program compiled for one (porting.verify's cache, a jit with the graph static) not fit the other
def _unshuffle2(x):
    return layers.pixel_unshuffle(x, 2)


def _shuffle2(x):
    return layers.pixel_shuffle(x, 2)


class Downsample(nnx.Module):
    def __init__(self, n_feat: int, *, rngs: nnx.Rngs):
        self.body = Sequential(Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False, rngs=rngs),
                               _unshuffle2)

    def __call__(self, x):
        return self.body(x)


class Upsample(nnx.Module):
    def __init__(self, n_feat: int, *, rngs: nnx.Rngs):
        self.body = Sequential(Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False, rngs=rngs),
                               _shuffle2)

    def __call__(self, x):
        return self.body(x)


class Restormer(nnx.Module):
    # test.py / demo.py: reflect-pad bottom/right to 8, crop; the dual-pixel variant takes the
    # channel concatenation [left, right]
    protocol = Protocol(8, "reflect")

    def __init__(self, config: RestormerConfig = RestormerConfig(), *, rngs: nnx.Rngs):
        cfg = self.config = config
        dim, nb, heads = cfg.dim, cfg.num_blocks, cfg.heads

        def blocks(n, width, h):
            return Sequential(*[TransformerBlock(width, h, cfg.ffn_expansion_factor, cfg.bias,
                                                 cfg.LayerNorm_type, rngs=rngs) for _ in range(n)])

        d2, d4, d8 = int(dim * 2), int(dim * 4), int(dim * 8)
        # the patch embedding never has a bias in the original (built without `bias`)
        self.patch_embed = OverlapPatchEmbed(cfg.inp_channels, dim, rngs=rngs)
        self.encoder_level1 = blocks(nb[0], dim, heads[0])
        self.down1_2 = Downsample(dim, rngs=rngs)
        self.encoder_level2 = blocks(nb[1], d2, heads[1])
        self.down2_3 = Downsample(d2, rngs=rngs)
        self.encoder_level3 = blocks(nb[2], d4, heads[2])
        self.down3_4 = Downsample(d4, rngs=rngs)
        self.latent = blocks(nb[3], d8, heads[3])
        self.up4_3 = Upsample(d8, rngs=rngs)
        self.reduce_chan_level3 = Conv2d(d8, d4, 1, bias=cfg.bias, rngs=rngs)
        self.decoder_level3 = blocks(nb[2], d4, heads[2])
        self.up3_2 = Upsample(d4, rngs=rngs)
        self.reduce_chan_level2 = Conv2d(d4, d2, 1, bias=cfg.bias, rngs=rngs)
        self.decoder_level2 = blocks(nb[1], d2, heads[1])
        self.up2_1 = Upsample(d2, rngs=rngs)
        self.decoder_level1 = blocks(nb[0], d2, heads[0])
        self.refinement = blocks(cfg.num_refinement_blocks, d2, heads[0])
        self.dual_pixel_task = cfg.dual_pixel_task
        if cfg.dual_pixel_task:
            self.skip_conv = Conv2d(dim, d2, 1, bias=cfg.bias, rngs=rngs)
        self.output = Conv2d(d2, cfg.out_channels, 3, padding=1, bias=cfg.bias, rngs=rngs)

    def __call__(self, inp_img: jax.Array) -> jax.Array:
        b, h, w, c = inp_img.shape
        if h % 8 or w % 8:
            raise ValueError(f"Restormer needs H and W divisible by 8, got {(h, w)}; "
                             "pad the input (flaxrestore.restore does this for you)")
        if c != self.config.inp_channels:
            raise ValueError(f"expected {self.config.inp_channels} input channels, got {c}")
        inp_enc_level1 = self.patch_embed(inp_img)
        out_enc_level1 = self.encoder_level1(inp_enc_level1)
        out_enc_level2 = self.encoder_level2(self.down1_2(out_enc_level1))
        out_enc_level3 = self.encoder_level3(self.down2_3(out_enc_level2))
        latent = self.latent(self.down3_4(out_enc_level3))

        x = jnp.concatenate([self.up4_3(latent), out_enc_level3], axis=-1)
        x = self.decoder_level3(self.reduce_chan_level3(x))
        x = jnp.concatenate([self.up3_2(x), out_enc_level2], axis=-1)
        x = self.decoder_level2(self.reduce_chan_level2(x))
        x = jnp.concatenate([self.up2_1(x), out_enc_level1], axis=-1)
        x = self.refinement(self.decoder_level1(x))
        if self.dual_pixel_task:
            return self.output(x + self.skip_conv(inp_enc_level1))
        return self.output(x) + inp_img

    @staticmethod
    def example_inputs(config: RestormerConfig, batch: int, height: int, width: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        return (rng.random((batch, height, width, config.inp_channels), dtype=np.float32),)


_WITH_BIAS = RestormerConfig()
_BIAS_FREE = RestormerConfig(LayerNorm_type="BiasFree")
for _name, _cfg, _desc in [
    ("motion_deblurring", _WITH_BIAS, "GoPro motion deblurring (motion_deblurring.pth)"),
    ("single_image_defocus_deblurring", _WITH_BIAS, "DPDD single-image defocus deblurring"),
    ("dual_pixel_defocus_deblurring",
     RestormerConfig(inp_channels=6, dual_pixel_task=True), "DPDD dual-pixel defocus, input [L, R]"),
    ("deraining", _WITH_BIAS, "Rain13K deraining (deraining.pth)"),
    ("gaussian_color_denoising", _BIAS_FREE, "Gaussian colour denoising (blind and sigma 15/25/50)"),
    ("gaussian_gray_denoising",
     RestormerConfig(inp_channels=1, out_channels=1, LayerNorm_type="BiasFree"),
     "Gaussian grey denoising (blind and sigma 15/25/50)"),
    ("real_denoising", _BIAS_FREE, "SIDD real denoising (real_denoising.pth)"),
]:
    register(f"restormer:{_name}", Restormer, _cfg, _desc)
