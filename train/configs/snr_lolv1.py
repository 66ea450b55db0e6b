"""SNR-Aware on LOL v1 (options/train/LOLv1.yml; release LOLv1.pth).

    python -m train --config snr_lolv1 --workdir runs/snr_lolv1 \
        --set data.root=/data/LOL/our485 --set val_data.root=/data/LOL/eval15

Charbonnier (sum) only; batch 32 of random 128 crops; Adam 4e-4 (0.9, 0.99), halved at 50k,
100k, 200k and 300k of 600k iterations. Validation pads to a multiple of 16 (the official test
resizes 600x400 to 608x400 and back).
"""

from train.configs import _snr


def get_config(arg=None):
    return _snr.recipe("snr_lolv1", "SNR-Aware LOL v1",
                       dict(kind="lol", root=None, patch_size=128),
                       dict(kind="lol", root=None, patch_size=None), batch=32, vgg_weight=0.0)
