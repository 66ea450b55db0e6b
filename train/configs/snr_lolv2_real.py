"""SNR-Aware on LOL-v2 real (options/train/LOLv2_real.yml; release LOLv2_real.pth).

    python -m train --config snr_lolv2_real --workdir runs/snr_lolv2_real \
        --set data.root=/data/LOL-v2/Real_captured/Train \
        --set val_data.root=/data/LOL-v2/Real_captured/Test \
        --set vgg_weights=/weights/vgg19.safetensors

No crop: whole images resized to 400x608 (H x W), batch 4; Charbonnier (sum) + 0.1 VGG19
(sum-reduced L1s, unnormalised input; pass the ImageNet weights, nothing is downloaded); Adam
4e-4 (0.9, 0.99), halved at 50k/100k/200k/300k of 600k iterations.
"""

from train.configs import _snr


def get_config(arg=None):
    return _snr.recipe("snr_lolv2_real", "SNR-Aware LOL-v2 real",
                       dict(kind="lolv2", root=None, patch_size=None, resize=(400, 608),
                            augment_mode="hvflip"),
                       dict(kind="lolv2", root=None, patch_size=None), batch=4, vgg_weight=0.1)
