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
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers
from flaxrestore.layers import Conv2d, Sequential
from flaxrestore.models import register


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


def _grouped_taps(xp, kernel, groups: int, dilation: tuple[int, int]):
    """Valid stride-1 grouped conv of an already padded NHWC ``xp`` as shifted multiply-adds.

    ``kernel`` is HWIO (kh, kw, cin_g, out): kernel[i, j, k, g*cout_g + o] weighs input channel
    g*cin_g + k into output channel g*cout_g + o.
    """
    kh, kw, cin_g, cout = kernel.shape
    cout_g = cout // groups
    dh, dw = dilation
    b = xp.shape[0]
    ho, wo = xp.shape[1] - dh * (kh - 1), xp.shape[2] - dw * (kw - 1)
    kg = kernel.reshape(kh, kw, cin_g, groups, cout_g)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i * dh:i * dh + ho, j * dw:j * dw + wo, :].reshape(b, ho, wo, groups, cin_g)
            for k in range(cin_g):
                t = tap[..., k:k + 1] * kg[i, j, k]  # (b, ho, wo, groups, cout_g)
                out = t if out is None else out + t
    return out.reshape(b, ho, wo, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def grouped_conv_shifted(x, kernel, groups: int, padding: tuple[int, int],
                         dilation: tuple[int, int]):
    """Stride-1 zero-padded grouped conv (no bias), NHWC / HWIO, as shifted multiply-adds.

    The backward differentiates an equivalent channel-expanded depthwise form
    (:func:`_grouped_expanded`): on CPU it compiled in half the time (1.8 s vs 3.6 s) and ran
    2-3x faster at 256x256 than autodiff of this forward (measured on a loaded 2-core machine).
    """
    ph, pw = padding
    return _grouped_taps(layers.pad2d(x, (ph, ph, pw, pw)), kernel, groups, dilation)


def _grouped_fwd(x, kernel, groups, padding, dilation):
    return grouped_conv_shifted(x, kernel, groups, padding, dilation), (x, kernel)


def _grouped_expanded(x, kernel, groups, padding, dilation):
    """The same conv as one depthwise conv over cin_g channel-expanded copies of x: copy k holds,
    at output channel g*cout_g + o, input channel g*cin_g + k. Slower forward than
    :func:`_grouped_taps`, but its autodiff keeps every array channel-minor and full width."""
    kh, kw, cin_g, cout = kernel.shape
    b, h, w, _ = x.shape
    xg = x.reshape(b, h, w, groups, cin_g)
    xs = jnp.concatenate([jnp.repeat(xg[..., k], cout // groups, axis=-1) for k in range(cin_g)],
                         axis=-1)
    ks = kernel.reshape(kh, kw, 1, cin_g * cout)  # copy k, channel c -> k * cout + c
    ph, pw = padding
    y = layers.depthwise_conv_shifted(layers.pad2d(xs, (ph, ph, pw, pw)), ks, dilation)
    return sum(y[..., k * cout:(k + 1) * cout] for k in range(cin_g))


def _grouped_bwd(groups, padding, dilation, res, dy):
    x, kernel = res
    _, vjp = jax.vjp(lambda x, k: _grouped_expanded(x, k, groups, padding, dilation), x, kernel)
    return vjp(dy)


grouped_conv_shifted.defvjp(_grouped_fwd, _grouped_bwd)


class GroupedConv2d(Conv2d):
    """A 3x3 stride-1 grouped conv with few channels per group (DBlock's ``extra_conv``).

    Same variables, init and numbers as :class:`layers.Conv2d`. On CPU it runs as
    :func:`grouped_conv_shifted` (XLA:CPU lowers feature_group_count convs slowly, see DESIGN.md:
    at 256x256 with 64 channels in groups of 2 the library conv took 0.64 s forward and 124 s for
    the gradient, this one about 0.1 s and 2 s, on the shared 2-core machine under load);
    elsewhere it is the library conv.
    """

    def __call__(self, x):
        cin_g = self.in_channels // self.groups
        cout_g = self.out_channels // self.groups
        if (not layers._use_shifted_depthwise() or self.stride != (1, 1) or self.groups == 1
                or self.padding_mode != "zeros" or max(cin_g, cout_g) > 4):
            return super().__call__(x)
        y = grouped_conv_shifted(x, self.kernel[...].astype(x.dtype), self.groups, self.padding,
                                 self.dilation)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


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
        z = jnp.fft.rfft2(x, axes=(1, 2))
        re, im = jnp.real(z), jnp.imag(z)
        sq = re * re + im * im
        nonzero = sq > 0
        # |z| and (cos, sin) of angle(z) without jnp.angle, whose gradient is NaN at z = 0;
        # torch defines angle(0) = 0, i.e. (cos, sin) = (1, 0), with zero gradients there.
        r = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
        mag = jnp.where(nonzero, r, 0.0)
        cos = jnp.where(nonzero, re / r, 1.0)
        sin = jnp.where(nonzero, im / r, 0.0)
        mag = self.process1(mag)
        z = jax.lax.complex(mag * cos, mag * sin)
        return jnp.fft.irfft2(z, s=(h, w), axes=(1, 2)).astype(x.dtype)


def _branch_pad(branches, channels: int) -> int | None:
    """The largest dilation when every branch is a stride-1 zero-padded depthwise 3x3 conv with
    padding = dilation on ``channels`` channels and the shifted form is used (CPU), else None."""
    convs = [b.branch.layers[0] for b in branches]
    if not layers._use_shifted_depthwise() or not all(
            cv.groups == cv.in_channels == cv.out_channels == channels
            and cv.kernel_size == (3, 3) and cv.stride == (1, 1) and cv.padding == cv.dilation
            and cv.dilation[0] == cv.dilation[1] and cv.padding_mode == "zeros" for cv in convs):
        return None
    return max(cv.dilation[0] for cv in convs)


def _taps_sum(xp, kernels, offsets, pad: int, out_hw=None):
    _, hp, wp, _ = xp.shape
    h, w = out_hw or (hp - 2 * pad, wp - 2 * pad)
    out = None
    for k, (dy, dx) in zip(kernels, offsets):
        t = xp[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w, :] * k
        out = t if out is None else out + t
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def offset_taps(xp, kernels, offsets: tuple, pad: int):
    """out[p] = sum_t xp[p + pad + offsets[t]] * kernels[t]: a depthwise conv with arbitrary tap
    offsets (|offset| <= pad) on an input already padded by ``pad``; kernels (T, C).

    Hand-written backward (autodiff padded every tap's cotangent to the full padded size and
    materialised them all): d xp is the same tap sum of dy (padded by 2*pad) at the negated
    offsets; d kernels[t] is the sum over batch and space of the shifted xp times dy.
    """
    return _taps_sum(xp, kernels, offsets, pad)


def _offset_taps_fwd(xp, kernels, offsets, pad):
    return _taps_sum(xp, kernels, offsets, pad), (xp, kernels)


def _offset_taps_bwd(offsets, pad, res, g):
    xp, kernels = res
    neg = tuple((-dy, -dx) for dy, dx in offsets)
    _, hp, wp, _ = xp.shape
    dxp = _taps_sum(layers.pad2d(g, 2 * pad), kernels, neg, pad, (hp, wp))
    h, w = hp - 2 * pad, wp - 2 * pad
    dk = jnp.stack([jnp.sum(xp[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w, :] * g,
                            axis=(0, 1, 2)) for dy, dx in offsets])
    return dxp.astype(xp.dtype), dk.astype(kernels.dtype)


offset_taps.defvjp(_offset_taps_fwd, _offset_taps_bwd)


def _dilated_taps(xp, pad: int, branches):
    """sum(branch(x)) from ``xp`` = x zero-padded by ``pad`` on each side (see _branch_pad), as
    shifted multiply-adds (:func:`offset_taps`); taps at the same offset (the centres) merged."""
    taps = {}  # (dy, dx) -> summed (C,) weight
    bias = None
    for branch in branches:
        cv = branch.branch.layers[0]
        d = cv.dilation[0]
        kernel = cv.kernel[...].astype(xp.dtype)
        for i in range(3):
            for j in range(3):
                key = ((i - 1) * d, (j - 1) * d)
                taps[key] = taps[key] + kernel[i, j, 0] if key in taps else kernel[i, j, 0]
        if cv.bias is not None:
            bb = cv.bias[...].astype(xp.dtype)
            bias = bb if bias is None else bias + bb
    out = offset_taps(xp, jnp.stack(list(taps.values())), tuple(taps), pad)
    return out if bias is None else out + bias


def _branch_sum(x, branches):
    """sum(branch(x) for branch in branches); on CPU as shifted multiply-adds on ONE copy of x
    padded by the largest dilation (written per branch, XLA:CPU padded x once per dilation)."""
    pad = _branch_pad(branches, x.shape[-1])
    if pad is None:
        return sum(branch(x) for branch in branches)
    return _dilated_taps(layers.pad2d(x, pad), pad, branches)


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

    def __call__(self, inp):
        x = self.conv1(self.extra_conv(self.norm1(inp)))
        z = _branch_sum(x, self.branches.layers)
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
        self.extra_conv = (GroupedConv2d(dw, dw, 3, padding=1, groups=c, rngs=rngs)
                           if extra_depth_wise else _identity)
        self.branches = Sequential(*[Branch(dw, 1, d, rngs=rngs) for d in dilations])
        self.sca = Sequential(_global_avg_pool, Conv2d(dw // 2, dw // 2, 1, rngs=rngs))
        self.conv3 = Conv2d(dw // 2, c, 1, rngs=rngs)
        self.conv4 = Conv2d(c, ffn, 1, rngs=rngs)
        self.conv5 = Conv2d(ffn // 2, c, 1, rngs=rngs)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)

    def _spatial_cpu(self, t, pad: int):
        """extra_conv(conv1(t)) zero-padded by ``pad`` on each side, on CPU, for DarkIR's
        grouped ``extra_conv`` (3x3, stride 1, padding 1, 2 channels per group in and out), or
        None where that layout does not apply.

        Computed as one 1x1 conv to two channel-expanded copies (copy k, channel g*2+o =
        conv1's channel g*2+k: conv1's weight columns gathered, exact), ONE depthwise 3x3 over
        both copies on the input padded by 1 + ``pad``, the two halves summed, and the border
        zeroed by a constant 0/1 mask. Two XLA:CPU problems of the direct form are avoided: it
        slices a size-2 minor axis (groups x 2 channels), which is not vectorised; and the
        dilated taps' centre slice of pad(x) simplifies to x, so XLA fused (recomputed) the
        grouped conv into the tap sum (together 60% of DarkIR-m's forward). The mask keeps the
        padded array a separate, materialised fusion.
        """
        ec = self.extra_conv
        dw = self.conv1.out_channels
        if (not isinstance(ec, GroupedConv2d) or ec.in_channels != dw or ec.out_channels != dw
                or ec.groups * 2 != dw or ec.kernel_size != (3, 3) or ec.stride != (1, 1)
                or ec.padding != (1, 1) or ec.dilation != (1, 1) or ec.padding_mode != "zeros"
                or self.conv1.kernel_size != (1, 1) or self.conv1.padding != (0, 0)
                or self.conv1.stride != (1, 1) or self.conv1.groups != 1):
            return None
        w1 = self.conv1.kernel[...].astype(t.dtype)[0, 0]  # (c, dw)
        base = (np.arange(dw) // 2) * 2
        cols = np.concatenate([base, base + 1])  # copy 0 then copy 1
        xs = layers.matmul_channels(t, w1[:, cols])
        if self.conv1.bias is not None:
            xs = xs + self.conv1.bias[...].astype(t.dtype)[cols]
        k = ec.kernel[...].astype(t.dtype)  # (3, 3, 2, dw): [i, j, k, g*2+o]
        ks = jnp.concatenate([k[:, :, 0], k[:, :, 1]], axis=-1)[:, :, None, :]  # (3, 3, 1, 2dw)
        y = layers.depthwise_conv2d(xs, ks, (1 + pad, 1 + pad))
        y = y[..., :dw] + y[..., dw:]
        if ec.bias is not None:
            y = y + ec.bias[...].astype(t.dtype)
        _, h, w, _ = t.shape
        mask = np.zeros((1, h + 2 * pad, w + 2 * pad, 1), np.float32)
        mask[:, pad:pad + h, pad:pad + w] = 1.0
        return y * jnp.asarray(mask, t.dtype)

    def __call__(self, inp):
        t = self.norm1(inp)
        pad = _branch_pad(self.branches.layers, self.conv1.out_channels)
        xp = self._spatial_cpu(t, pad) if pad is not None else None
        if xp is not None:
            z = _dilated_taps(xp, pad, self.branches.layers)
        else:
            z = _branch_sum(self.extra_conv(self.conv1(t)), self.branches.layers)
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
    # any H, W: the network pads to padder_size itself (zeros, bottom/right) and crops back
    size_multiple = 1

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
