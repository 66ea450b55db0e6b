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
