"""MPRNet, real denoising on SIDD (Denoising/training.yml, train.py).

    python -m train --config mprnet_denoising --workdir runs/mprnet_sidd \
        --set data.root=/data/SIDD/train --set val_data.root=/data/SIDD/val

80 epochs of 6000 iterations (320 x 300 patches of 256 / 16) on 128 crops; loss sum_i
Charbonnier(clamp(o_i, 0, 1)) (no edge loss); Adam with coupled L2 weight decay 1e-8; warm-up 3
epochs then cosine with T = 117 (ends near 5.5e-5); per-sample MixUp (lambda ~ Beta(0.6, 0.6),
a batch permutation) from epoch 6 on; validation on 256 crops.
"""

from train.configs import _mprnet
from train.recipe import LossTerm, MixupConfig

IPE = 6000


def get_config(arg=None):
    return _mprnet.recipe(
        "mprnet_denoising", "MPRNet SIDD denoising", "mprnet:denoising",
        dict(kind="sidd", root=None), dict(kind="sidd", root=None, val_patch_size=256),
        epochs=80, iters_per_epoch=IPE, t_max=117, patch=128, val_every_epochs=1,
        losses=(LossTerm("charbonnier", 1.0, outputs="all", clamp=True, options={"eps": 1e-3}),),
        weight_decay=1e-8,
        mixup=MixupConfig(kind="per_sample", alpha=0.6, prob=1.0, start_step=5 * IPE))
