"""Restormer, deraining on Rain13K (Deraining/Options/Deraining_Restormer.yml).

    python -m train --config restormer_deraining --workdir runs/restormer_rain13k \
        --set data.root=/data/Rain13K/train --set val_data.root=/data/Rain13K/test/Rain100L

``data.root``: ``input/`` + ``target/`` (auto-detected names). Validation PSNR on the Y channel
(``test_y_channel: true``), as the YAML.
"""

from train.configs import _restormer


def get_config(arg=None):
    return _restormer.recipe(
        "restormer_deraining", "Restormer Rain13K deraining", "restormer:deraining",
        dict(kind="paired", root=None), dict(kind="paired", root=None, patch_size=None),
        y_channel=True)
