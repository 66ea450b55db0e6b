"""SNR-Aware demo: the LOL v1 recipe shrunk to minutes on 2 CPU cores, built-in low-light data.

    python -m train --config snr_demo --workdir runs/snr_demo

ARG: the demo degradation (lowlight, default). Kept: Charbonnier (sum), Adam (0.9, 0.99), the
step-wise halving schedule (at 1/12, 1/6, 1/3 and 1/2 of the run, as 50k..300k of 600k), flips,
the SNR map computed from each crop. Shrunk: nf 16 (transformer width 256), 1200 steps, lr 1e-3,
32-pixel crops, batch 8.
"""

import dataclasses

from train.configs import _snr
from train.schedules import ScheduleConfig


def get_config(arg=None):
    degradation = arg or "lowlight"
    total = 1200
    base = _snr.recipe(
        f"snr_demo:{degradation}", "tiny SNR-Aware on demo data",
        dict(kind="demo", degradation=degradation, patch_size=32),
        dict(kind="demo", degradation=degradation, patch_size=None, demo_val_size=128),
        batch=8, vgg_weight=0.0, total=total, lr=1e-3,
        schedule=ScheduleConfig(kind="multistep", milestones=(100, 200, 400, 600), gamma=0.5))
    return dataclasses.replace(base, model_overrides=dict(nf=16), eval_every=300,
                               checkpoint_every=100, log_every=50)
