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


from flaxrestore import layers as _layers  # noqa: E402  (MPRNet's edge loss below)


def charbonnier(pred: jax.Array, target: jax.Array, eps: float = 1e-3) -> jax.Array:
    """Charbonnier loss, MPRNet's form: mean over every element of sqrt(d^2 + eps^2).

    eps is squared inside the root (1e-3 -> 1e-6). MPRNet (all three tasks): summed over the
    three stage outputs with weight 1 each; see :func:`mprnet_loss`. (SNR-Aware's "cb" loss is
    a different form: a *sum* of sqrt(d^2 + 1e-6).)
    """
    d = pred - target
    return jnp.mean(jnp.sqrt(d * d + eps * eps))


# MPRNet's 5x5 Gaussian: the outer product of this 1-D kernel (which sums to 1).
_EDGE_KERNEL_1D = (0.05, 0.25, 0.4, 0.25, 0.05)


def _conv_gauss(x: jax.Array) -> jax.Array:
    """Depthwise 5x5 Gaussian with replicate padding of 2 on each side (NHWC)."""
    k1 = jnp.asarray(_EDGE_KERNEL_1D, jnp.float32)
    k2 = jnp.outer(k1, k1).astype(x.dtype)
    kernel = jnp.broadcast_to(k2[:, :, None, None], (5, 5, 1, x.shape[-1]))
    return _layers.depthwise_conv_shifted(_layers.pad2d(x, 2, "replicate"), kernel)


def laplacian(x: jax.Array) -> jax.Array:
    """One level of MPRNet's Laplacian pyramid: x - G(U(D(G(x)))).

    G is the 5x5 Gaussian above, D keeps every second pixel from (0, 0), U puts those values
    times 4 back on the even positions of a zero image of the original size.
    """
    filtered = _conv_gauss(x)
    up = jnp.zeros_like(filtered).at[:, ::2, ::2, :].set(filtered[:, ::2, ::2, :] * 4)
    return x - _conv_gauss(up)


def edge_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-3) -> jax.Array:
    """MPRNet's EdgeLoss: Charbonnier (eps 1e-3) between the Laplacians of pred and target.

    The original hard-codes 3 channels; here the Gaussian is applied to each channel, whatever
    their number. MPRNet deblurring and deraining: weight 0.05, summed over the three stage
    outputs (:func:`mprnet_loss`); denoising does not use it.
    """
    return charbonnier(laplacian(pred), laplacian(target), eps)


def mprnet_loss(outputs: Sequence[jax.Array], target: jax.Array, *, edge_weight: float = 0.05,
                clamp: bool = False, eps: float = 1e-3) -> jax.Array:
    """MPRNet's training loss over the list of stage outputs ``[stage3, stage2, stage1]``.

    sum_i charbonnier(o_i, gt) + edge_weight * sum_i edge_loss(o_i, gt), eps 1e-3.
    Recipes: deblurring and deraining use edge_weight=0.05, clamp=False; denoising uses
    edge_weight=0 and clamp=True (each output clamped to [0, 1] before the Charbonnier).
    (The released train.py files call torch.sum on a list and crash; this is the intended sum.)
    """
    if clamp:
        outputs = [jnp.clip(o, 0.0, 1.0) for o in outputs]
    loss_char = 0.0
    for o in outputs:
        loss_char = loss_char + charbonnier(o, target, eps)
    if not edge_weight:
        return loss_char
    loss_edge = 0.0
    for o in outputs:
        loss_edge = loss_edge + edge_loss(o, target, eps)
    return loss_char + edge_weight * loss_edge


# ------------------------------------------------------------------ SNR-Aware (and DarkIR's VGG)

# Per-tap weights of the SNR-Aware / DarkIR VGG losses for relu1_1 .. relu5_1.
PERCEPTUAL_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


def charbonnier_sum(pred: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """SNR-Aware's Charbonnier (``pixel_criterion: cb``): the *sum* over every element of
    sqrt(d^2 + eps), eps = 1e-6 inside the root and not squared (unlike :func:`charbonnier`).

    Recipe: every SNR-Aware release, weight 1 (``pixel_weight`` 1.0); see :func:`snr_loss`.
    """
    d = pred - target
    return jnp.sum(jnp.sqrt(d * d + eps))


def perceptual(pred: jax.Array, target: jax.Array, vgg: "_vgg.VGG19", *,
               layers: Sequence[int | str] = _vgg.RELU_X_1,
               weights: Sequence[float] = PERCEPTUAL_WEIGHTS, reduction: str = "mean",
               normalize: bool = False) -> jax.Array:
    """VGG19 perceptual loss: sum_i w_i * L1(phi_i(pred), phi_i(target)).

    phi_i = VGG19 features after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (torchvision's
    slices [0:2], [2:7], [7:12], [12:21], [21:30]), w = 1/32, 1/16, 1/8, 1/4, 1. Target
    features are constants (stop_gradient). ``reduction`` of each L1: "mean" or "sum".
    ``normalize`` applies ImageNet mean/std first; neither SNR-Aware nor DarkIR does.

    Recipes: SNR-Aware uses reduction="sum", weight 0.1 (LOLv2_real, SID) or 0.02
    (LOLv2_synthetic), none for the other releases (see :func:`snr_loss`). DarkIR uses
    reduction="mean", weight 0.01 (on the output and on the x8-upsampled side output).
    """
    if len(weights) != len(layers):
        raise ValueError(f"{len(weights)} weights for {len(layers)} VGG layers")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    reduce = jnp.mean if reduction == "mean" else jnp.sum
    fp = vgg(pred, layers, normalize=normalize)
    ft = [jax.lax.stop_gradient(f) for f in vgg(target, layers, normalize=normalize)]
    loss = 0.0
    for w, a, b in zip(weights, fp, ft):
        loss = loss + w * reduce(jnp.abs(a - b))
    return loss


# VGG weight of each SNR-Aware release's recipe (0: Charbonnier only).
SNR_VGG_WEIGHT = {"LOLv1": 0.0, "LOLv2_real": 0.1, "LOLv2_synthetic": 0.02, "SID": 0.1,
                  "SMID": 0.0, "SDSD_indoor": 0.0, "SDSD_outdoor": 0.0}


def snr_loss(pred: jax.Array, target: jax.Array, vgg: "_vgg.VGG19 | None" = None, *,
             vgg_weight: float = 0.0) -> jax.Array:
    """SNR-Aware's training loss: charbonnier_sum + vgg_weight * perceptual(reduction="sum").

    vgg_weight per release (``SNR_VGG_WEIGHT``): 0.1 for LOLv2_real and SID (video_base3
    wrapper), 0.02 for LOLv2_synthetic (video_base4), 0 for LOLv1, SMID, SDSD indoor/outdoor
    (video_base4_m). The VGG is torchvision's ImageNet VGG19 (``num_layers=30`` is enough), fed
    the raw [0, 1] RGB output and ground truth, no normalisation.
    """
    loss = charbonnier_sum(pred, target)
    if vgg_weight:
        if vgg is None:
            raise ValueError("snr_loss with vgg_weight > 0 needs the VGG19")
        loss = loss + vgg_weight * perceptual(pred, target, vgg, reduction="sum")
    return loss
