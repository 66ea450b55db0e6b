"""Torch reference of Restormer whose state_dict is key for key the official release's.

Written from the project's spec (shared/specs/restormer_mprnet.md), not copied from the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RELEASE_KEY = "params"


class _BiasFreeLN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x: (..., C)
        var = x.var(-1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + 1e-5) * self.weight


class _WithBiasLN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class LayerNorm(nn.Module):
    def __init__(self, dim, LayerNorm_type):
        super().__init__()
        self.body = _BiasFreeLN(dim) if LayerNorm_type == "BiasFree" else _WithBiasLN(dim)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.body(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        return y.reshape(b, h, w, c).permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hid = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, 2 * hid, 1, bias=bias)
        self.dwconv = nn.Conv2d(2 * hid, 2 * hid, 3, padding=1, groups=2 * hid, bias=bias)
        self.project_out = nn.Conv2d(hid, dim, 1, bias=bias)

    def forward(self, x):
        a, g = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * g)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        heads = self.num_heads
        q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        out = attn.softmax(dim=-1) @ v
        return self.project_out(out.reshape(b, c, h, w))


class TransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_c=3, embed_dim=48, bias=False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, 3, padding=1, bias=bias)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class Restormer(nn.Module):
    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
                 num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66,
                 bias=False, LayerNorm_type="WithBias", dual_pixel_task=False):
        super().__init__()

        def blocks(n, width, h):
            return nn.Sequential(*[TransformerBlock(width, h, ffn_expansion_factor, bias,
                                                    LayerNorm_type) for _ in range(n)])

        d2, d4, d8 = int(dim * 2), int(dim * 4), int(dim * 8)
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = blocks(num_blocks[0], dim, heads[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = blocks(num_blocks[1], d2, heads[1])
        self.down2_3 = Downsample(d2)
        self.encoder_level3 = blocks(num_blocks[2], d4, heads[2])
        self.down3_4 = Downsample(d4)
        self.latent = blocks(num_blocks[3], d8, heads[3])
        self.up4_3 = Upsample(d8)
        self.reduce_chan_level3 = nn.Conv2d(d8, d4, 1, bias=bias)
        self.decoder_level3 = blocks(num_blocks[2], d4, heads[2])
        self.up3_2 = Upsample(d4)
        self.reduce_chan_level2 = nn.Conv2d(d4, d2, 1, bias=bias)
        self.decoder_level2 = blocks(num_blocks[1], d2, heads[1])
        self.up2_1 = Upsample(d2)
        self.decoder_level1 = blocks(num_blocks[0], d2, heads[0])
        self.refinement = blocks(num_refinement_blocks, d2, heads[0])
        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, d2, 1, bias=bias)
        self.output = nn.Conv2d(d2, out_channels, 3, padding=1, bias=bias)

    def forward(self, inp_img):
        e1_in = self.patch_embed(inp_img)
        e1 = self.encoder_level1(e1_in)
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        lat = self.latent(self.down3_4(e3))
        x = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(lat), e3], 1)))
        x = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(x), e2], 1)))
        x = self.refinement(self.decoder_level1(torch.cat([self.up2_1(x), e1], 1)))
        if self.dual_pixel_task:
            return self.output(x + self.skip_conv(e1_in))
        return self.output(x) + inp_img
