"""Restormer, Gaussian grey denoising on DFWB (GaussianGrayDenoising_Restormer*.yml).

    python -m train --config restormer_gaussian_gray_denoising:blind --workdir runs/restormer_gray \
        --set data.root=/data/DFWB --set val_data.root=/data/Set12

ARG: ``blind`` (sigma ~ U(0, 50)) or ``15`` / ``25`` / ``50``. Images are read as one grey
channel (colour files converted with ITU-R 601 luma); 1-in/1-out BiasFree model; MixUp.
"""

from train.configs import _restormer
from train.configs.restormer_gaussian_color_denoising import noise


def get_config(arg=None):
    train_noise, val_noise, tag = noise(arg)
    return _restormer.recipe(
        f"restormer_gaussian_gray_denoising:{tag}", f"Restormer Gaussian grey denoising ({tag})",
        "restormer:gaussian_gray_denoising",
        dict(kind="clean", root=None, channels=1, **train_noise),
        dict(kind="clean", root=None, channels=1, patch_size=None, **val_noise), mixup=True)
