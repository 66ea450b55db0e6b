"""SNR-Aware on LOL-v2 synthetic (options/train/LOLv2_synthetic.yml; release LOLv2_synthetic.pth).

    python -m train --config snr_lolv2_synthetic --workdir runs/snr_lolv2_syn \
        --set data.root=/data/LOL-v2/Synthetic/Train --set val_data.root=/data/LOL-v2/Synthetic/Test \
        --set vgg_weights=/weights/vgg19.safetensors

Batch 32 of random 128 crops (from 384x384); Charbonnier (sum) + 0.02 VGG19 (sum-reduced L1s);
Adam 4e-4 (0.9, 0.99), halved at 50k/100k/200k/300k of 600k iterations. (The SID, SMID and SDSD
recipes read the originals' .npy video frames, which ``train.data`` has no loader for.)
"""

from train.configs import _snr


def get_config(arg=None):
    return _snr.recipe("snr_lolv2_synthetic", "SNR-Aware LOL-v2 synthetic",
                       dict(kind="lolv2", root=None, patch_size=128),
                       dict(kind="lolv2", root=None, patch_size=None), batch=32, vgg_weight=0.02)
