"""Restormer, motion deblurring on GoPro (Motion_Deblurring/Options/Deblurring_Restormer.yml).

    python -m train --config restormer_motion_deblurring --workdir runs/restormer_gopro \
        --set data.root=/data/GoPro/train --set val_data.root=/data/GoPro/test

``data.root``: GoPro training split, Restormer's 512x512 crops (``input_crops/`` +
``target_crops/``, from its ``generate_patches_gopro.py``) or the GOPRO_Large release layout.
Validation: whole images, PSNR on RGB. The recipe itself is in ``_restormer.py``.
"""

from train.configs import _restormer


def get_config(arg=None):
    return _restormer.recipe(
        "restormer_motion_deblurring", "Restormer GoPro motion deblurring",
        "restormer:motion_deblurring", dict(kind="gopro", root=None),
        dict(kind="gopro", root=None, patch_size=None))
