"""Restormer, Gaussian colour denoising on DFWB (GaussianColorDenoising_Restormer*.yml).

    python -m train --config restormer_gaussian_color_denoising:blind --workdir runs/restormer_dn \
        --set data.root=/data/DFWB --set val_data.root=/data/CBSD68

ARG: ``blind`` (default; sigma ~ U(0, 50) per sample) or ``15`` / ``25`` / ``50`` (the
non-blind YAMLs). Noise is synthesised on the clean crops after augmentation (lq = gt +
N(0, sigma/255), unclipped); validation adds it with a fixed seed (sigma 25 for blind training,
as a single representative level). BiasFree model, MixUp as the other denoising YAMLs.
"""

from train.configs import _restormer


def noise(arg):
    if arg in (None, "", "blind"):
        return dict(noise_sigma_range=(0.0, 50.0)), dict(noise_sigma=25.0), "blind"
    sigma = float(arg)
    return dict(noise_sigma=sigma), dict(noise_sigma=sigma), f"sigma{int(sigma)}"


def get_config(arg=None):
    train_noise, val_noise, tag = noise(arg)
    return _restormer.recipe(
        f"restormer_gaussian_color_denoising:{tag}", f"Restormer Gaussian colour denoising ({tag})",
        "restormer:gaussian_color_denoising", dict(kind="clean", root=None, **train_noise),
        dict(kind="clean", root=None, patch_size=None, **val_noise), mixup=True)
