"""Torch counterparts of ``flaxrestore.losses`` (NCHW), written from the specs, for the tests."""

from __future__ import annotations

import torch
from torch import nn

from porting.reference.vgg import VGG19Features

CR_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
RELU_X_1 = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.l1_loss(pred, target)


class ContrastLoss(nn.Module):
    """AECR-Net's contrastive regularization: sum_i w_i L1(a_i, p_i) / (L1(a_i, n_i) + 1e-7)
    over VGG19 relu1_1..relu5_1 (frozen, unnormalised input); positive/negative detached."""

    def __init__(self, vgg: VGG19Features | None = None, ablation: bool = False):
        super().__init__()
        self.vgg = vgg if vgg is not None else VGG19Features(num_layers=30)
        for p in self.vgg.parameters():
            p.requires_grad_(False)
        self.l1 = nn.L1Loss()
        self.weights = CR_WEIGHTS
        self.ab = ablation

    def forward(self, a, p, n=None):
        a_vgg = self.vgg(a, RELU_X_1)
        p_vgg = [f.detach() for f in self.vgg(p, RELU_X_1)]
        n_vgg = None if self.ab else [f.detach() for f in self.vgg(n, RELU_X_1)]
        loss = 0
        for i, w in enumerate(self.weights):
            d_ap = self.l1(a_vgg[i], p_vgg[i])
            if self.ab:
                loss = loss + w * d_ap
            else:
                loss = loss + w * d_ap / (self.l1(a_vgg[i], n_vgg[i]) + 1e-7)
        return loss


class CharbonnierLoss(nn.Module):
    """MPRNet's Charbonnier: mean of sqrt(d^2 + eps^2), eps = 1e-3."""

    def __init__(self, eps=1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, x, y):
        diff = x - y
        return torch.mean(torch.sqrt(diff * diff + self.eps * self.eps))


class EdgeLoss(nn.Module):
    """MPRNet's edge loss: Charbonnier between one-level Laplacian pyramids, Gaussian 5x5
    (outer product of [.05, .25, .4, .25, .05]) on 3 channels with replicate padding."""

    def __init__(self, channels=3, eps=1e-3):
        super().__init__()
        k = torch.tensor([[0.05, 0.25, 0.4, 0.25, 0.05]])
        self.register_buffer("kernel", (k.t() @ k).unsqueeze(0).repeat(channels, 1, 1, 1),
                             persistent=False)
        self.loss = CharbonnierLoss(eps)

    def conv_gauss(self, img):
        img = nn.functional.pad(img, (2, 2, 2, 2), mode="replicate")
        return nn.functional.conv2d(img, self.kernel, groups=self.kernel.shape[0])

    def laplacian_kernel(self, current):
        filtered = self.conv_gauss(current)
        up = torch.zeros_like(filtered)
        up[:, :, ::2, ::2] = filtered[:, :, ::2, ::2] * 4
        return current - self.conv_gauss(up)

    def forward(self, x, y):
        return self.loss(self.laplacian_kernel(x), self.laplacian_kernel(y))


def mprnet_loss(outputs, target, edge_weight=0.05, clamp=False):
    """Deblurring/deraining: sum of Charbonnier + 0.05 * sum of edge losses over the stage
    outputs. Denoising: edge_weight=0 and clamp=True."""
    char, edge = CharbonnierLoss(), EdgeLoss(target.shape[1])
    if clamp:
        outputs = [torch.clamp(o, 0, 1) for o in outputs]
    loss = sum(char(o, target) for o in outputs)
    if edge_weight:
        loss = loss + edge_weight * sum(edge(o, target) for o in outputs)
    return loss


PERCEPTUAL_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


class CharbonnierSumLoss(nn.Module):
    """SNR-Aware's 'cb' loss: sum of sqrt(d^2 + eps), eps = 1e-6 (not squared)."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x, y):
        diff = x - y
        return torch.sum(torch.sqrt(diff * diff + self.eps))


class VGGPerceptualLoss(nn.Module):
    """sum_i w_i * L1(vgg_i(x), vgg_i(y).detach()) over relu1_1..relu5_1, w = 1/32 .. 1, no input
    normalisation; L1 reduction 'sum' (SNR-Aware) or 'mean' (DarkIR)."""

    def __init__(self, vgg: VGG19Features | None = None, reduction="mean"):
        super().__init__()
        self.vgg = vgg if vgg is not None else VGG19Features(num_layers=30)
        for p in self.vgg.parameters():
            p.requires_grad_(False)
        self.criterion = nn.L1Loss(reduction=reduction)
        self.weights = PERCEPTUAL_WEIGHTS

    def forward(self, x, y):
        fx = self.vgg(x, RELU_X_1)
        fy = self.vgg(y, RELU_X_1)
        loss = 0
        for w, a, b in zip(self.weights, fx, fy):
            loss = loss + w * self.criterion(a, b.detach())
        return loss


def snr_loss(pred, target, vgg=None, vgg_weight=0.0):
    """SNR-Aware: Charbonnier (sum) + vgg_weight * VGG perceptual (sum-reduced L1)."""
    loss = CharbonnierSumLoss()(pred, target)
    if vgg_weight:
        loss = loss + vgg_weight * VGGPerceptualLoss(vgg, reduction="sum")(pred, target)
    return loss


# ------------------------------------------------------------------------------------- DarkIR

class DarkIREdgeLoss(EdgeLoss):
    """DarkIR's EdgeLoss: the same one-level Laplacian as MPRNet's, compared with an MSE."""

    def __init__(self, channels=3):
        super().__init__(channels)
        self.loss = nn.MSELoss()


class FrequencyLoss(nn.Module):
    """DarkIR's FrequencyLoss: MSE between |rfft2| (norm 'backward') amplitudes."""

    def forward(self, x, y):
        ax = torch.fft.rfft2(x, norm="backward").abs()
        ay = torch.fft.rfft2(y, norm="backward").abs()
        return nn.functional.mse_loss(ax, ay)


class EnhanceLoss(nn.Module):
    """DarkIR's side-output loss: the side output is upsampled (nearest, x8) to the ground
    truth's size; 0.8 * L1 + 0.01 * VGG perceptual (mean-reduced L1, GT features detached)."""

    def __init__(self, vgg=None, scale=8, l1_weight=0.8, perceptual_weight=0.01):
        super().__init__()
        self.vgg_loss = VGGPerceptualLoss(vgg, reduction="mean")
        self.scale, self.l1_weight, self.perceptual_weight = scale, l1_weight, perceptual_weight

    def forward(self, out_side, target):
        up = nn.functional.interpolate(out_side, scale_factor=self.scale, mode="nearest")
        return (self.perceptual_weight * self.vgg_loss(up, target)
                + self.l1_weight * nn.functional.l1_loss(up, target))


def darkir_loss(out_side, out, target, vgg=None, perceptual_weight=0.01, edge_weight=50.0,
                side_weight=0.8, side_perceptual_weight=0.01, frequency_weight=0.0, scale=8):
    """DarkIR (LOLBlur recipe): L1 + 0.01 VGG + 50 edge-MSE + EnhanceLoss(side) [+ frequency]."""
    loss = nn.functional.l1_loss(out, target)
    if perceptual_weight:
        loss = loss + perceptual_weight * VGGPerceptualLoss(vgg, reduction="mean")(out, target)
    if edge_weight:
        loss = loss + edge_weight * DarkIREdgeLoss(target.shape[1])(out, target)
    if frequency_weight:
        loss = loss + frequency_weight * FrequencyLoss()(out, target)
    return loss + EnhanceLoss(vgg, scale, side_weight, side_perceptual_weight)(out_side, target)
