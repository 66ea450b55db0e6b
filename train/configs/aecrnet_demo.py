"""AECR-Net demo: the ITS recipe shrunk to minutes on 2 CPU cores, built-in hazy data.

    python -m train --config aecrnet_demo --workdir runs/aecrnet_demo
    python -m train --config aecrnet_demo --workdir runs/aecrnet_demo_cr \
        --set vgg_weights=/weights/vgg19.safetensors --set losses.1.weight=0.1

ARG: the demo degradation (haze, default). Kept: L1, Adam (0.9, 0.999), the per-step cosine to
0, flips and 90-degree rotations, FastDeconv batch statistics. The contrastive term is off
(weight 0) unless VGG19 weights are passed as above: none ship, nothing is downloaded. Shrunk:
ngf 16, 1500 steps, lr 1e-3, 32-pixel crops, batch 8.
"""

import dataclasses

from train.configs import aecrnet_its
from train.schedules import ScheduleConfig


def get_config(arg=None):
    degradation = arg or "haze"
    base = aecrnet_its.get_config()
    total = 1500
    losses = tuple(dataclasses.replace(t, weight=0.0) if t.kind == "contrastive" else t
                   for t in base.losses)
    return dataclasses.replace(
        base, name=f"aecrnet_demo:{degradation}", description="tiny AECR-Net on demo data",
        model_overrides=dict(ngf=16), losses=losses,
        data=dict(base.data, kind="demo", degradation=degradation, patch_size=32),
        val_data=dict(kind="demo", degradation=degradation, patch_size=None, demo_val_size=128),
        batch_size=8, total_steps=total,
        optimizer=dataclasses.replace(
            base.optimizer, lr=1e-3,
            schedule=ScheduleConfig(kind="cosine_per_step", t_max=total, eta_min=0.0, offset=1)),
        eval_every=300, checkpoint_every=100, log_every=50, seed=666)
