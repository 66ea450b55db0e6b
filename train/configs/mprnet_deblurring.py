"""MPRNet, motion deblurring on GoPro (Deblurring/training.yml, train.py).

    python -m train --config mprnet_deblurring --workdir runs/mprnet_gopro \
        --set data.root=/data/GoPro/train --set val_data.root=/data/GoPro/test

3000 epochs of 132 iterations (2103 pairs / 16), 256 crops; loss sum_i Charbonnier(o_i) +
0.05 sum_i EdgeLoss(o_i) over the three stages; warm-up 3 epochs then cosine with T = 2997;
validation on 256 centre crops every 20 epochs. Not reproduced: the original's photometric
augmentation (random saturation 0.8-1.2 on 1/3 of the pairs; its gamma change is a no-op).
"""

from train.configs import _mprnet


def get_config(arg=None):
    return _mprnet.recipe(
        "mprnet_deblurring", "MPRNet GoPro deblurring", "mprnet:deblurring",
        dict(kind="gopro", root=None), dict(kind="gopro", root=None, val_patch_size=256),
        epochs=3000, iters_per_epoch=132, t_max=2997, patch=256, val_every_epochs=20,
        losses=(_mprnet.CHARBONNIER_ALL, _mprnet.EDGE_ALL))
