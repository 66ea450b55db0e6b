"""Restormer, single-image defocus deblurring on DPDD (DefocusDeblur_Single_8bit_Restormer.yml).

    python -m train --config restormer_defocus_deblurring --workdir runs/restormer_dpdd \
        --set data.root=/data/DPDD/train --set val_data.root=/data/DPDD/val

``data.root``: a paired folder (``inputC/`` + ``target/``, or the crops of Restormer's
``generate_patches_dpdd.py``; set ``data.lq_subdir`` / ``data.gt_subdir`` if the names differ).
The dual-pixel variant (6-channel [L, R] input, 16-bit) has no loader here yet.
"""

from train.configs import _restormer


def get_config(arg=None):
    common = dict(kind="paired", root=None, lq_subdir="inputC", gt_subdir="target")
    return _restormer.recipe(
        "restormer_defocus_deblurring", "Restormer DPDD single-image defocus deblurring",
        "restormer:single_image_defocus_deblurring", common, dict(common, patch_size=None))
