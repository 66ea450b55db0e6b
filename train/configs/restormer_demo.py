"""Restormer demo: the real-denoising recipe shrunk to minutes on 2 CPU cores, built-in data.

    python -m train --config restormer_demo --workdir runs/restormer_demo
    python -m train --config restormer_demo:blur --workdir runs/restormer_demo_blur

ARG: the demo degradation (noise, default; blur, lowlight, haze, rain). Kept from the published
recipe: L1, AdamW (0.9, 0.999) with decoupled weight decay 1e-4, gradient clipping at norm 0.01,
the flat-then-cosine CosineAnnealingRestartCyclicLR (periods in the 92:208 proportion),
progressive patches/batches (two stages), dihedral augmentation and, for noise, batch MixUp.
Shrunk: a width-8 one-block-per-level Restormer, 250 steps, lr 1e-3, 32- then 48-pixel crops.
"""

import dataclasses

from train.configs import _restormer
from train.recipe import Stage
from train.schedules import ScheduleConfig

TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 1, 1))


def get_config(arg=None):
    degradation = arg or "noise"
    data = dict(kind="demo", degradation=degradation, patch_size=48)
    if degradation == "noise":
        data["noise_sigma_range"] = (10.0, 40.0)
    val = dict(data, patch_size=None, demo_val_size=128)
    if degradation == "noise":
        val = dict(val, noise_sigma_range=None, noise_sigma=25.0)
    base = _restormer.recipe(f"restormer_demo:{degradation}", "tiny Restormer on demo data",
                             "restormer:real_denoising", data, val, mixup=degradation == "noise")
    total = 250
    lr = 1e-3
    return dataclasses.replace(
        base, model_overrides=TINY, batch_size=8, total_steps=total,
        stages=(Stage(125, 32, 8), Stage(total, 48, 4)),
        optimizer=dataclasses.replace(
            base.optimizer, lr=lr,
            schedule=ScheduleConfig(kind="cosine_restart_cyclic", periods=(77, 173),
                                    restart_weights=(1.0, 1.0), eta_mins=(lr, 1e-6))),
        eval_every=50, checkpoint_every=50, log_every=25, seed=100)
