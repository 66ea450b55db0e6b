"""MPRNet, deraining on Rain13K (Deraining/training.yml, train.py).

    python -m train --config mprnet_deraining --workdir runs/mprnet_rain13k \
        --set data.root=/data/Rain13K/train --set val_data.root=/data/Rain13K/test/Rain100L

250 epochs of 857 iterations (13,712 pairs / 16), 256 crops; Charbonnier + 0.05 EdgeLoss summed
over the three stages; warm-up 3 epochs then cosine with T = 247 (lr ends at 1.008e-6);
validation on 128 centre crops of Rain100L every 5 epochs.
"""

from train.configs import _mprnet


def get_config(arg=None):
    return _mprnet.recipe(
        "mprnet_deraining", "MPRNet Rain13K deraining", "mprnet:deraining",
        dict(kind="paired", root=None), dict(kind="paired", root=None, val_patch_size=128),
        epochs=250, iters_per_epoch=857, t_max=247, patch=256, val_every_epochs=5,
        losses=(_mprnet.CHARBONNIER_ALL, _mprnet.EDGE_ALL))
