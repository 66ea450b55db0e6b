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
    """Depthwise 5x5 Gaussian with replicate padding of 2 on each side (NHWC).

    The kernel is an outer product, so it runs as a 5-tap pass over rows then one over columns:
    equal to torch's 5x5 depthwise conv up to float rounding (~2e-7), and on CPU about 3x faster
    to compile and to run than 25 taps (a library depthwise conv is slower still there).
    """
    k1 = [jnp.asarray(v, x.dtype) for v in _EDGE_KERNEL_1D]
    h, w = x.shape[1], x.shape[2]
    xp = _layers.pad2d(x, 2, "replicate")
    rows = sum(xp[:, i:i + h] * k1[i] for i in range(5))
    return sum(rows[:, :, j:j + w] * k1[j] for j in range(5))


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


# ------------------------------------------------------------------------------------- DarkIR

def darkir_edge_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """DarkIR's EdgeLoss: mean squared error between the one-level Laplacians (:func:`laplacian`,
    the same Gaussian pyramid as MPRNet's, replicate padding) of pred and target.

    Recipe: DarkIR (LOLBlur), weight 50 (``edge_weight``), on the full-resolution output; see
    :func:`darkir_loss`. (MPRNet's :func:`edge_loss` uses a Charbonnier instead of the MSE.)
    """
    d = laplacian(pred) - laplacian(target)
    return jnp.mean(d * d)


def frequency_amplitude_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """DarkIR's FrequencyLoss: MSE (mean) between the amplitudes |rfft2| (norm "backward", over
    H and W) of pred and target.

    Recipe: off in DarkIR's LOLBlur recipe (``frequency: False``; weight 0 in
    :func:`darkir_loss`). Older DarkIR LOL/LOLv2 runs switched it on with the edge weight, 50.
    """
    def amplitude(x):
        z = jnp.fft.rfft2(x, axes=(1, 2))
        sq = jnp.real(z) ** 2 + jnp.imag(z) ** 2
        nz = sq > 0  # |z| with a zero (torch's) instead of a NaN gradient at z = 0
        return jnp.where(nz, jnp.sqrt(jnp.where(nz, sq, 1.0)), 0.0)

    d = amplitude(pred) - amplitude(target)
    return jnp.mean(d * d)


def upsample_nearest(x: jax.Array, scale: int) -> jax.Array:
    """torch ``F.interpolate(x, scale_factor=scale, mode='nearest')`` for an integer scale, NHWC."""
    return jnp.repeat(jnp.repeat(x, scale, axis=1), scale, axis=2)


def darkir_side_loss(out_side: jax.Array, target: jax.Array, vgg: "_vgg.VGG19", *,
                     scale: int = 8, l1_weight: float = 0.8,
                     perceptual_weight: float = 0.01) -> jax.Array:
    """DarkIR's EnhanceLoss on the low-resolution side output (``model(x, side_loss=True)[0]``).

    s = nearest-neighbour upsampling of ``out_side`` by ``scale`` (8 = 2 ** number of encoder
    levels) to the ground truth's size (the ground truth is never downsampled);
    loss = l1_weight * L1(s, target) + perceptual_weight * perceptual(s, target, reduction="mean").

    Recipe: DarkIR (LOLBlur), l1_weight 0.8 (``enhance_weight``), perceptual_weight 0.01, added
    with weight 1 to the total (:func:`darkir_loss`).
    """
    s = upsample_nearest(out_side, scale)
    if s.shape != target.shape:
        raise ValueError(f"side output {out_side.shape} upsampled x{scale} is {s.shape}, target "
                         f"is {target.shape}: train DarkIR on crops whose sides are multiples of "
                         f"{scale}")
    loss = l1_weight * l1(s, target)
    if perceptual_weight:
        loss = loss + perceptual_weight * perceptual(s, target, vgg, reduction="mean")
    return loss


def darkir_loss(out_side: jax.Array, out: jax.Array, target: jax.Array, vgg: "_vgg.VGG19", *,
                perceptual_weight: float = 0.01, edge_weight: float = 50.0,
                side_weight: float = 0.8, side_perceptual_weight: float = 0.01,
                frequency_weight: float = 0.0, scale: int = 8) -> jax.Array:
    """DarkIR's training loss on ``(out_side, out) = model(lq, side_loss=True)``.

    l1(out, gt) + perceptual_weight * perceptual(out, gt, reduction="mean")
    + edge_weight * darkir_edge_loss(out, gt)
    + darkir_side_loss(out_side, gt, l1_weight=side_weight, perceptual_weight=side_perceptual_weight)
    [+ frequency_weight * frequency_amplitude_loss(out, gt)].

    Recipe (LOLBlur, DarkIR-m): the defaults: 1, 0.01, 50, 0.8, 0.01, frequency off; VGG19 =
    torchvision's ImageNet weights (``num_layers=30``), fed raw [0, 1] RGB (no normalisation).
    Optimizer: AdamW lr 5e-4, betas (0.9, 0.9), weight decay 1e-3, cosine to 1e-6 over 500
    epochs stepped per epoch; batch 16, 256x256 crops.
    """
    loss = l1(out, target)
    if perceptual_weight:
        loss = loss + perceptual_weight * perceptual(out, target, vgg, reduction="mean")
    if edge_weight:
        loss = loss + edge_weight * darkir_edge_loss(out, target)
    if frequency_weight:
        loss = loss + frequency_weight * frequency_amplitude_loss(out, target)
    return loss + darkir_side_loss(out_side, target, vgg, scale=scale, l1_weight=side_weight,
                                   perceptual_weight=side_perceptual_weight)
