"""Restormer, real image denoising on SIDD (Denoising/Options/RealDenoising_Restormer.yml).

    python -m train --config restormer_real_denoising --workdir runs/restormer_sidd \
        --set data.root=/data/SIDD/train --set val_data.root=/data/SIDD/val

BiasFree LayerNorm model; MixUp (one lambda ~ Beta(1.2, 1.2) per batch, probability 1/2).
``data.root``: Restormer's 512x512 SIDD crops (``input_crops/`` + ``target_crops/``) or SIDD-Medium.
"""

from train.configs import _restormer


def get_config(arg=None):
    return _restormer.recipe(
        "restormer_real_denoising", "Restormer SIDD real denoising", "restormer:real_denoising",
        dict(kind="sidd", root=None), dict(kind="sidd", root=None, patch_size=None), mixup=True)
