"""Torch reference of the SNR-Aware low-light network whose state_dict is key for key the release's.

Written from the project's spec (shared/specs/darkir_snr.md, part B), not copied from the
original. It runs on CPU (the original moves an unused location grid to CUDA; that grid fed
nothing and is left out). Widths that the original hard-codes for nf = 64 (1024-wide tokens,
2048-wide FFN, 8 heads of 64) are derived from nf, equal at nf = 64, as in the Flax port.

The released files (LOLv1.pth, ..., outdoor_G.pth) are bare state dicts: ``RELEASE_KEY = None``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RELEASE_KEY = None


def box_blur5(x: torch.Tensor) -> torch.Tensor:
    """cv2.blur 5x5 (reflect-101 borders) of an NCHW tensor; taps summed in row-major order."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (2, 2, 2, 2), mode="reflect")
    acc = None
    for i in range(5):
        for j in range(5):
            tap = xp[:, :, i:i + h, j:j + w]
            acc = tap if acc is None else acc + tap
    return acc * (1.0 / 25.0)


def snr_map(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The SNR map of the official data pipeline for an NCHW RGB batch: (B, 1, H, W) in [0, 1]."""

    def gray(t):
        return t[:, 0:1] * 0.299 + t[:, 1:2] * 0.587 + t[:, 2:3] * 0.114

    dark = gray(x)
    light = gray(box_blur5(x))
    noise = torch.abs(dark - light)
    snr = light / (noise + eps)
    peak = snr.reshape(snr.shape[0], -1).max(dim=1)[0].view(-1, 1, 1, 1)
    return torch.clamp(snr / (peak + eps), min=0.0, max=1.0)


class ResidualBlock_noBN(nn.Module):
    def __init__(self, nf=64):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            with torch.no_grad():
                conv.weight.mul_(0.1)
                conv.bias.zero_()

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class MultiHeadAttention(nn.Module):
    def __init__(self, n_head, d_model, d_k, d_v):
        super().__init__()
        self.n_head, self.d_k, self.d_v = n_head, d_k, d_v
        self.w_qs = nn.Linear(d_model, n_head * d_k, bias=False)
        self.w_ks = nn.Linear(d_model, n_head * d_k, bias=False)
        self.w_vs = nn.Linear(d_model, n_head * d_v, bias=False)
        self.fc = nn.Linear(n_head * d_v, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x, mask=None):
        """x (B, L, D); mask (B, 1, L): keys whose entry is 0 are excluded."""
        b, n, _ = x.shape
        residual = x
        x = self.layer_norm(x)
        q = self.w_qs(x).view(b, n, self.n_head, self.d_k).transpose(1, 2)
        k = self.w_ks(x).view(b, n, self.n_head, self.d_k).transpose(1, 2)
        v = self.w_vs(x).view(b, n, self.n_head, self.d_v).transpose(1, 2)
        logits = torch.matmul(q / (self.d_k ** 0.5), k.transpose(2, 3))
        if mask is not None:
            logits = logits.masked_fill(mask.unsqueeze(1) == 0, -1e9)
        attn = F.softmax(logits, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).contiguous().view(b, n, -1)
        return self.fc(out) + residual


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_in, d_hid):
        super().__init__()
        self.w_1 = nn.Linear(d_in, d_hid)
        self.w_2 = nn.Linear(d_hid, d_in)
        self.layer_norm = nn.LayerNorm(d_in, eps=1e-6)

    def forward(self, x):
        return self.w_2(F.relu(self.w_1(self.layer_norm(x)))) + x


class EncoderLayer(nn.Module):
    def __init__(self, d_model, d_inner, n_head, d_k, d_v):
        super().__init__()
        self.slf_attn = MultiHeadAttention(n_head, d_model, d_k, d_v)
        self.pos_ffn = PositionwiseFeedForward(d_model, d_inner)

    def forward(self, x, mask=None):
        return self.pos_ffn(self.slf_attn(x, mask))


class PatchEncoder(nn.Module):
    """The original's Encoder_patch66 (no positional encoding, no final norm, dropout 0)."""

    def __init__(self, d_model, d_inner, n_layers, n_head, d_k, d_v):
        super().__init__()
        self.layer_stack = nn.ModuleList(
            [EncoderLayer(d_model, d_inner, n_head, d_k, d_v) for _ in range(n_layers)])

    def forward(self, x, mask=None):
        for layer in self.layer_stack:
            x = layer(x, mask)
        return x


class SNRNet(nn.Module):
    """``low_light_transformer(nf, nframes, groups, front_RBs, back_RBs, center, predeblur, HR_in,
    w_TSA)``; ``forward(x, mask)`` with x (B, 3, H, W) and the SNR map mask (B, 1, H, W)."""

    def __init__(self, nf=64, nframes=5, groups=8, front_RBs=5, back_RBs=10, center=None,
                 predeblur=False, HR_in=False, w_TSA=True):
        super().__init__()
        if not HR_in:
            raise ValueError("SNR-Aware needs HR_in=True (the original's forward fails otherwise)")
        self.nf = nf
        self.conv_first_1 = nn.Conv2d(3, nf, 3, 1, 1, bias=True)
        self.conv_first_2 = nn.Conv2d(nf, nf, 3, 2, 1, bias=True)
        self.conv_first_3 = nn.Conv2d(nf, nf, 3, 2, 1, bias=True)
        self.feature_extraction = nn.Sequential(*[ResidualBlock_noBN(nf) for _ in range(front_RBs)])
        self.recon_trunk = nn.Sequential(*[ResidualBlock_noBN(nf) for _ in range(back_RBs)])
        self.upconv1 = nn.Conv2d(nf * 2, nf * 4, 3, 1, 1, bias=True)
        self.upconv2 = nn.Conv2d(nf * 2, nf * 4, 3, 1, 1, bias=True)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.HRconv = nn.Conv2d(nf * 2, nf, 3, 1, 1, bias=True)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1, bias=True)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1)
        d_model = nf * 16
        self.transformer = PatchEncoder(d_model, 2 * d_model, 6, 8, nf, nf)
        self.recon_trunk_light = nn.Sequential(*[ResidualBlock_noBN(nf) for _ in range(6)])

    def forward(self, x, mask):
        f1 = self.lrelu(self.conv_first_1(x))
        f2 = self.lrelu(self.conv_first_2(f1))
        f3 = self.lrelu(self.conv_first_3(f2))
        fea = self.feature_extraction(f3)
        fea_light = self.recon_trunk_light(fea)

        h, w = fea.shape[-2:]
        mask = F.interpolate(mask, size=[h, w], mode="nearest")

        tokens = F.unfold(fea, kernel_size=4, stride=4).permute(0, 2, 1)  # (B, L, C*16)
        key = F.unfold(mask, kernel_size=4, stride=4).mean(dim=1, keepdim=True)  # (B, 1, L)
        key = torch.where(key <= 0.5, torch.zeros_like(key), key)
        tokens = self.transformer(tokens, key)
        fea_global = F.fold(tokens.permute(0, 2, 1), output_size=(h, w), kernel_size=4, stride=4)

        fea = fea_global * (1 - mask) + fea_light * mask
        out = self.recon_trunk(fea)
        out = self.lrelu(self.pixel_shuffle(self.upconv1(torch.cat([out, f3], dim=1))))
        out = self.lrelu(self.pixel_shuffle(self.upconv2(torch.cat([out, f2], dim=1))))
        out = self.lrelu(self.HRconv(torch.cat([out, f1], dim=1)))
        return self.conv_last(out) + x
