"""Torch reference of AECR-Net whose state_dict is key for key the released checkpoint's.

Written from the project's spec (shared/specs/aecrnet.md), not copied from the original. The
released file is ``{'model': state_dict, 'epoch': ..., ...}``; its 34 entries name the two
adaptive mixups ``mix4`` / ``mix5`` (the published code says ``mix1`` / ``mix2``; see
:func:`code_to_release_keys`). The DCNv2 deformable conv is pure torch here (no CUDA extension):
a four-corner bilinear gather with DCNv2's zero-outside rule, checked in the tests against a plain
conv, shifted convs and ``F.grid_sample``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RELEASE_KEY = "model"


def code_to_release_keys(state_dict: dict) -> dict:
    """A state dict saved by the published code (``mix1.w``/``mix2.w``) renamed to the release's
    ``mix4.w``/``mix5.w`` (every other key is the same), so it loads like a released file."""
    rename = {"mix1.w": "mix4.w", "mix2.w": "mix5.w"}
    return {rename.get(k, k): v for k, v in state_dict.items()}


# ------------------------------------------------------------------ modulated deformable conv


def _sample_zero(x: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) sampled bilinearly at float positions py, px of shape (N, P): (N, C, P).

    A position counts only if -1 < py < H and -1 < px < W; each of its four integer neighbours
    outside the image contributes zero.
    """
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    keep = ((py > -1) & (py < h) & (px > -1) & (px < w)).to(x.dtype)
    top, left = torch.floor(py), torch.floor(px)
    fy, fx = py - top, px - left
    top, left = top.long(), left.long()
    total = torch.zeros(n, c, py.shape[1], dtype=x.dtype)
    for r, wr in ((top, 1 - fy), (top + 1, fy)):
        for q, wq in ((left, 1 - fx), (left + 1, fx)):
            valid = ((r >= 0) & (r < h) & (q >= 0) & (q < w)).to(x.dtype)
            lin = (r.clamp(0, h - 1) * w + q.clamp(0, w - 1))
            got = torch.gather(flat, 2, lin.unsqueeze(1).expand(n, c, lin.shape[1]))
            total = total + got * (wr * wq * valid * keep).unsqueeze(1)
    return total


def modulated_deform_conv2d(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1):
    """DCNv2 forward in pure torch, NCHW. ``offset`` (N, 2*G*K, Ho, Wo) interleaved (dy, dx) per
    tap k = i*kw + j within each deformable group g; ``mask`` (N, G*K, Ho, Wo) already activated."""
    s = (stride, stride) if isinstance(stride, int) else tuple(stride)
    p = (padding, padding) if isinstance(padding, int) else tuple(padding)
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    taps = kh * kw
    ho, wo = offset.shape[2:]
    if (ho, wo) != ((h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1,
                    (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1):
        raise ValueError("offset grid does not match the conv output size")
    groups = offset.shape[1] // (2 * taps)
    cg = c // groups
    out_rows = torch.arange(ho, dtype=x.dtype) * s[0] - p[0]
    out_cols = torch.arange(wo, dtype=x.dtype) * s[1] - p[1]
    columns = []  # per group: (N, C/G, K, Ho*Wo)
    for g in range(groups):
        per_tap = []
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                dy = offset[:, g * 2 * taps + 2 * k]
                dx = offset[:, g * 2 * taps + 2 * k + 1]
                py = out_rows.view(1, ho, 1) + i * d[0] + dy
                px = out_cols.view(1, 1, wo) + j * d[1] + dx
                v = _sample_zero(x[:, g * cg:(g + 1) * cg], py.reshape(n, -1), px.reshape(n, -1))
                if mask is not None:
                    v = v * mask[:, g * taps + k].reshape(n, 1, -1)
                per_tap.append(v)
        columns.append(torch.stack(per_tap, dim=2))
    cols = torch.cat(columns, dim=1).reshape(n, c * taps, ho * wo)  # row = c*K + k
    out = torch.einsum("ol,nlp->nop", weight.reshape(cout, c * taps), cols)
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.reshape(n, cout, ho, wo)


class DCN(nn.Module):
    """DCNv2's ``DCN``: weight (out, in, kh, kw), bias, and ``conv_offset_mask`` predicting
    3*G*K channels (interleaved offsets, then the mask logits); offsets/mask start at zero."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1,
                 deformable_groups=1):
        super().__init__()
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *ks))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / math.sqrt(in_channels * ks[0] * ks[1])
        nn.init.uniform_(self.weight, -bound, bound)
        n_om = deformable_groups * 3 * ks[0] * ks[1]
        self.conv_offset_mask = nn.Conv2d(in_channels, n_om, ks, stride=stride, padding=padding,
                                          bias=True)
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x):
        om = self.conv_offset_mask(x)
        a, b, m = torch.chunk(om, 3, dim=1)
        offset = torch.cat((a, b), dim=1)  # a no-op on channel order, as in DCNv2
        return modulated_deform_conv2d(x, offset, torch.sigmoid(m), self.weight, self.bias,
                                       self.stride, self.padding, self.dilation)


# ------------------------------------------------------------------ network deconvolution


def isqrt_newton_schulz(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Coupled Newton-Schulz approximation of a^(-1/2), Frobenius-prescaled, ``iters`` steps."""
    norm = a.norm()
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    y, z = a / norm, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / torch.sqrt(norm)


class FastDeconv(nn.Conv2d):
    """Network deconvolution (groups=1): a conv on whitened im2col patches. Buffers
    ``running_mean`` (k*k*block) and ``running_deconv`` (k*k*block)^2; train mode uses batch
    statistics from zero-padded patches sampled at stride ``sampling_stride*stride``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=1, dilation=1,
                 groups=1, bias=True, eps=1e-5, n_iter=5, momentum=0.1, block=64,
                 sampling_stride=3, freeze=False, freeze_iter=100):
        if groups != 1 or freeze:
            raise NotImplementedError("reference FastDeconv: groups=1, freeze=False only")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        self.eps, self.n_iter, self.momentum = eps, n_iter, momentum
        if block > in_channels:
            block = in_channels
        elif in_channels % block:
            block = math.gcd(block, in_channels)
        self.block = block
        self.num_features = self.kernel_size[0] * self.kernel_size[1] * block
        self.sampling_stride = sampling_stride * self.stride[0]
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_deconv", torch.eye(self.num_features))

    def forward(self, x):
        n, c, h, w = x.shape
        nf, nb = self.num_features, c // self.block
        if self.training:
            s = self.sampling_stride
            if self.kernel_size == (1, 1):
                rows = x.permute(0, 2, 3, 1).reshape(-1, c)[::s * s]
            else:
                rows = F.unfold(x, self.kernel_size, self.dilation, self.padding, s)
                rows = rows.transpose(1, 2).reshape(-1, c * self.kernel_size[0] * self.kernel_size[1])
            rows = rows.reshape(-1, nf, nb).transpose(1, 2).reshape(-1, nf)
            mean = rows.mean(0)
            centred = rows - mean
            cov = centred.t() @ centred / rows.shape[0] + self.eps * torch.eye(nf, dtype=x.dtype)
            deconv = isqrt_newton_schulz(cov, self.n_iter)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
                self.running_deconv.mul_(1 - self.momentum).add_(self.momentum * deconv.detach())
        else:
            mean, deconv = self.running_mean, self.running_deconv
        o = self.out_channels
        wm = self.weight.reshape(o, nf, nb).transpose(1, 2).reshape(-1, nf) @ deconv
        b = -(wm @ mean).reshape(o, nb).sum(1)
        if self.bias is not None:
            b = b + self.bias
        wm = wm.reshape(o, nb, nf).transpose(1, 2).reshape(self.weight.shape)
        return F.conv2d(x, wm, b, self.stride, self.padding, self.dilation)


# ------------------------------------------------------------------ the network


class PALayer(nn.Module):
    def __init__(self, channel):
        super().__init__()
        self.pa = nn.Sequential(nn.Conv2d(channel, channel // 8, 1), nn.ReLU(),
                                nn.Conv2d(channel // 8, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.pa(x)


class CALayer(nn.Module):
    def __init__(self, channel):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.ca = nn.Sequential(nn.Conv2d(channel, channel // 8, 1), nn.ReLU(),
                                nn.Conv2d(channel // 8, channel, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.ca(self.avg_pool(x))


class DehazeBlock(nn.Module):
    def __init__(self, dim, kernel_size=3):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.calayer = CALayer(dim)
        self.palayer = PALayer(dim)

    def forward(self, x):
        r = self.act1(self.conv1(x)) + x
        r = self.palayer(self.calayer(self.conv2(r)))
        return r + x


class DCNBlock(nn.Module):
    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.dcn = DCN(in_channel, out_channel, kernel_size=(3, 3), stride=1, padding=1)

    def forward(self, x):
        return self.dcn(x)


class Mix(nn.Module):
    def __init__(self, m=-0.8):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([float(m)]))
        self.mix_block = nn.Sigmoid()

    def forward(self, fea1, fea2):
        f = self.mix_block(self.w)
        return fea1 * f + fea2 * (1 - f)


class AECRNet(nn.Module):
    """The official ``Dehaze(input_nc, output_nc, ngf)`` with the release's mix4/mix5 names.

    The deformable conv has 4*ngf channels (the original hard-codes 256, i.e. ngf=64).
    ``use_dropout`` and ``padding_type`` are ignored, as in the original. Sizes that are not
    multiples of 4 behave as in the original (crash or a wrong output size).
    """

    def __init__(self, input_nc=3, output_nc=3, ngf=64, use_dropout=False, padding_type="reflect"):
        super().__init__()
        self.down1 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1), nn.ReLU())
        self.down3 = nn.Sequential(nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1), nn.ReLU())
        self.block = DehazeBlock(4 * ngf, 3)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, stride=2, padding=1,
                                                    output_padding=1), nn.ReLU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(2 * ngf, ngf, 3, stride=2, padding=1,
                                                    output_padding=1), nn.ReLU())
        self.up3 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh())
        self.dcn_block = DCNBlock(4 * ngf, 4 * ngf)
        self.deconv = FastDeconv(input_nc, input_nc, kernel_size=3, stride=1, padding=1)
        self.mix4 = Mix(-1.0)
        self.mix5 = Mix(-0.6)

    def forward(self, x):
        d1 = self.down1(self.deconv(x))
        d2 = self.down2(d1)
        d3 = self.down3(d2)
        y = d3
        for _ in range(6):
            y = self.block(y)
        y = self.dcn_block(self.dcn_block(y))
        y = self.up1(self.mix4(d3, y))
        y = self.up2(self.mix5(d2, y))
        return self.up3(y)
