"""Training losses, pure JAX on NHWC arrays; ``pred, target`` come first.

Each function's docstring names the recipe that uses it and with which weight. Torch
counterparts (for the equivalence tests) live in ``porting/reference/losses.py``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from flaxrestore import vgg as _vgg


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error over every element and the batch (torch ``nn.L1Loss()``).

    AECR-Net: the reconstruction loss, weight 1 (``--w_loss_l1 1``), between the tanh output
    and the [0, 1] ground truth; total = l1 + w_cr * contrastive_regularization.
    """
    return jnp.mean(jnp.abs(pred - target))


# AECR-Net's per-tap weights for relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
CR_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


def contrastive_regularization(pred: jax.Array, target: jax.Array, negative: jax.Array | None,
                               vgg: "_vgg.VGG19", *, ablation: bool = False,
                               layers: Sequence[int | str] = _vgg.RELU_X_1,
                               weights: Sequence[float] = CR_WEIGHTS,
                               eps: float = 1e-7) -> jax.Array:
    """AECR-Net's contrastive regularization (the official ``ContrastLoss``).

    CR = sum_i w_i * d_i(pred, target) / (d_i(pred, negative) + eps), where d_i is the mean
    absolute difference (over batch, H, W, C: a ratio of batch means, not per sample) of VGG19
    features at relu1_1..relu5_1, w = 1/32, 1/16, 1/8, 1/4, 1 and eps = 1e-7 in the denominator
    only. The anchor ``pred`` is the restored output, the positive ``target`` the clear image and
    the negative the hazy input (one negative per anchor, as the released code). Positive and
    negative features are constants (stop_gradient); gradients flow through VGG into ``pred``
    only. The images go into VGG unnormalised (pred in (-1, 1), the others in [0, 1]).
    ``ablation=True`` drops the negatives: CR = sum_i w_i * d_i(pred, target) (``negative`` may
    then be None).

    Recipe: AECR-Net, total = l1 + w_cr * CR with w_cr = 0.1 (the paper's beta; the official
    code's default ``--w_loss_vgg7`` is 0, i.e. CR off).
    """
    if len(weights) != len(layers):
        raise ValueError(f"{len(weights)} weights for {len(layers)} VGG layers")
    fa = vgg(pred, layers)
    fp = [jax.lax.stop_gradient(f) for f in vgg(target, layers)]
    fn = None
    if not ablation:
        if negative is None:
            raise ValueError("contrastive_regularization needs a negative unless ablation=True")
        fn = [jax.lax.stop_gradient(f) for f in vgg(negative, layers)]
    loss = 0.0
    for i, w in enumerate(weights):
        d_ap = jnp.mean(jnp.abs(fa[i] - fp[i]))
        if ablation:
            loss = loss + w * d_ap
        else:
            loss = loss + w * d_ap / (jnp.mean(jnp.abs(fa[i] - fn[i])) + eps)
    return loss
