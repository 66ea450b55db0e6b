"""MPRNet demo: the deblurring recipe shrunk to minutes on 2 CPU cores, built-in data.

    python -m train --config mprnet_demo --workdir runs/mprnet_demo
    python -m train --config mprnet_demo:rain --workdir runs/mprnet_demo_rain

ARG: the demo degradation (blur, default; rain, noise, ...). Kept: the three-stage Charbonnier +
0.05 edge loss, Adam (0.9, 0.999), 3-epoch warm-up into a per-epoch cosine (an "epoch" here is
25 steps), the 9-way augmentation. Shrunk: widths 8/4/4, one CAB per ORB, 300 steps, lr 1e-3,
32-pixel crops, batch 8.
"""

import dataclasses

from train.configs import _mprnet

TINY = dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1)


def get_config(arg=None):
    degradation = arg or "blur"
    ipe, epochs = 25, 12
    base = _mprnet.recipe(
        f"mprnet_demo:{degradation}", "tiny MPRNet on demo data", "mprnet:deblurring",
        dict(kind="demo", degradation=degradation),
        dict(kind="demo", degradation=degradation, patch_size=None, demo_val_size=128),
        epochs=epochs, iters_per_epoch=ipe, t_max=epochs - 3, patch=32, val_every_epochs=4,
        losses=(_mprnet.CHARBONNIER_ALL, _mprnet.EDGE_ALL))
    return dataclasses.replace(
        base, model_overrides=TINY, batch_size=8,
        optimizer=dataclasses.replace(base.optimizer, lr=1e-3), checkpoint_every=50,
        log_every=25)
