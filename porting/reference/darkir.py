"""Torch reference of DarkIR whose state_dict is key for key the official release's (343 keys).

Written from the project's spec (shared/specs/darkir_snr.md, part A), not copied from the
original. The released files are ``torch.save({'params': state_dict})``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RELEASE_KEY = "params"


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over the channel axis of NCHW, biased variance, eps 1e-6."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(dim=1, keepdim=True)
        var = (x - mu).square().mean(dim=1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class SimpleGate(nn.Module):
    def forward(self, x):
        first, second = torch.chunk(x, 2, dim=1)
        return first * second


class CustomSequential(nn.Module):
    """Block container whose children sit in ``modules_list`` (as in the released keys)."""

    def __init__(self, *blocks):
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)

    def forward(self, x):
        for m in self.modules_list:
            x = m(x)
        return x


class FreMLP(nn.Module):
    def __init__(self, nc, expand=2):
        super().__init__()
        self.process1 = nn.Sequential(nn.Conv2d(nc, expand * nc, 1),
                                      nn.LeakyReLU(0.1),
                                      nn.Conv2d(expand * nc, nc, 1))

    def forward(self, x):
        h, w = x.shape[-2:]
        spec = torch.fft.rfft2(x, norm="backward")
        amplitude, phase = spec.abs(), spec.angle()
        amplitude = self.process1(amplitude)
        spec = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
        return torch.fft.irfft2(spec, s=(h, w), norm="backward")


class Branch(nn.Module):
    def __init__(self, c, DW_Expand, dilation=1):
        super().__init__()
        ch = DW_Expand * c
        self.branch = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation,
                                              groups=ch))

    def forward(self, x):
        return self.branch(x)


class EBlock(nn.Module):
    def __init__(self, c, DW_Expand=2, dilations=(1,), extra_depth_wise=False):
        super().__init__()
        dw = DW_Expand * c
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.extra_conv = (nn.Conv2d(c, c, 3, padding=1, groups=c) if extra_depth_wise
                           else nn.Identity())
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.branches = nn.ModuleList([Branch(c, DW_Expand, dilation=d) for d in dilations])
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg1 = SimpleGate()
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.freq = FreMLP(c, expand=2)

    def forward(self, inp):
        t = self.conv1(self.extra_conv(self.norm1(inp)))
        z = self.sg1(sum(b(t) for b in self.branches))
        t = self.conv3(z * self.sca(z))
        y = inp + self.beta * t
        return y + self.gamma * (y * self.freq(self.norm2(y)))


class DBlock(nn.Module):
    def __init__(self, c, DW_Expand=2, FFN_Expand=2, dilations=(1,), extra_depth_wise=False):
        super().__init__()
        dw = DW_Expand * c
        ffn = FFN_Expand * c
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.extra_conv = (nn.Conv2d(dw, dw, 3, padding=1, groups=c) if extra_depth_wise
                           else nn.Identity())
        self.branches = nn.ModuleList([Branch(dw, 1, dilation=d) for d in dilations])
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg1 = SimpleGate()
        self.sg2 = SimpleGate()
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)

    def forward(self, inp):
        t = self.extra_conv(self.conv1(self.norm1(inp)))
        z = self.sg1(sum(b(t) for b in self.branches))
        t = self.conv3(z * self.sca(z))
        y = inp + self.beta * t
        t = self.conv5(self.sg2(self.conv4(self.norm2(y))))
        return y + self.gamma * t


class DarkIR(nn.Module):
    def __init__(self, img_channel=3, width=32, middle_blk_num_enc=2, middle_blk_num_dec=2,
                 enc_blk_nums=(1, 2, 3), dec_blk_nums=(3, 1, 1), dilations=(1, 4, 9),
                 extra_depth_wise=True):
        super().__init__()
        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.middle_blks = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.downs = nn.ModuleList()
        chan = width
        for n in enc_blk_nums:
            self.encoders.append(CustomSequential(
                *[EBlock(chan, extra_depth_wise=extra_depth_wise) for _ in range(n)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks_enc = CustomSequential(
            *[EBlock(chan, extra_depth_wise=extra_depth_wise) for _ in range(middle_blk_num_enc)])
        self.middle_blks_dec = CustomSequential(
            *[DBlock(chan, dilations=list(dilations), extra_depth_wise=extra_depth_wise)
              for _ in range(middle_blk_num_dec)])
        for n in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False),
                                          nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(CustomSequential(
                *[DBlock(chan, dilations=list(dilations), extra_depth_wise=extra_depth_wise)
                  for _ in range(n)]))
        self.padder_size = 2 ** len(enc_blk_nums)
        self.side_out = nn.Conv2d(width * 2 ** len(enc_blk_nums), img_channel, 3, padding=1)

    def forward(self, input, side_loss=False, use_adapter=None):
        h, w = input.shape[-2:]
        p = self.padder_size
        x0 = F.pad(input, (0, (p - w % p) % p, 0, (p - h % p) % p), value=0.0)
        x = self.intro(x0)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            x = enc(x)
            skips.append(x)
            x = down(x)
        x_light = self.middle_blks_enc(x)
        x = self.middle_blks_dec(x_light) + x_light
        for dec, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = dec(up(x) + skip)
        out = (self.ending(x) + x0)[:, :, :h, :w]
        if side_loss:
            return self.side_out(x_light), out
        return out
