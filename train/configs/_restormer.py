"""Shared pieces of the Restormer recipes (spec restormer_mprnet.md section 1.7).

All 13 official YAMLs share: L1 loss on the single output; AdamW lr 3e-4, betas (0.9, 0.999),
decoupled weight decay 1e-4, no decay exclusions; clip_grad_norm_ 0.01 every step; no EMA; no
warm-up; 300k iterations with CosineAnnealingRestartCyclicLR (periods 92k + 208k, eta_mins
3e-4 then 1e-6: flat, then a cosine to 1e-6); progressive training (the loader always yields 384
crops at 8 per GPU on 8 GPUs = 64 global; each iteration keeps a random subset and one random
crop: patches 128/160/192/256/320/384 with global batches 64/40/32/16/8/8, stage boundaries
92k/156k/204k/240k/276k/300k); 8-way dihedral augmentation; bottom/right padding of small
images with the edge-duplicating mirror (cv2 BORDER_REFLECT = numpy 'symmetric'); seed 100;
validation every 4k iterations with pad-to-8 inference. Only the denoising YAMLs use MixUp (one
lambda ~ Beta(1.2, 1.2) per batch, applied with probability 1/2).
"""

from __future__ import annotations

from train.recipe import LossTerm, MixupConfig, Recipe, Stage
from train.schedules import OptimizerConfig, ScheduleConfig

STAGE_ENDS = (92_000, 156_000, 204_000, 240_000, 276_000, 300_000)
PATCHES = (128, 160, 192, 256, 320, 384)
GLOBAL_BATCHES = (64, 40, 32, 16, 8, 8)  # mini_batch_sizes 8/5/4/2/1/1 per GPU x 8 GPUs

OPTIMIZER = OptimizerConfig(
    name="adamw", lr=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, grad_clip_norm=0.01,
    schedule=ScheduleConfig(kind="cosine_restart_cyclic", periods=(92_000, 208_000),
                            restart_weights=(1.0, 1.0), eta_mins=(3e-4, 1e-6)))

MIXUP = MixupConfig(kind="batch", alpha=1.2, prob=0.5)


def recipe(name: str, description: str, model: str, data: dict, val_data: dict | None, *,
           mixup: bool = False, y_channel: bool = False) -> Recipe:
    data = dict(dict(patch_size=384, geometric_augs=True, augment_mode="dihedral8",
                     pad_mode="symmetric", num_workers=0), **data)
    return Recipe(
        name=name, description=description, model=model, data=data, val_data=val_data,
        batch_size=64, total_steps=300_000,
        stages=tuple(Stage(u, p, b) for u, p, b in zip(STAGE_ENDS, PATCHES, GLOBAL_BATCHES)),
        losses=(LossTerm("l1"),), optimizer=OPTIMIZER,
        mixup=MIXUP if mixup else MixupConfig(), ema_decay=0.0, seed=100,
        eval_every=4000, eval_y_channel=y_channel, checkpoint_every=4000, keep_checkpoints=3,
        log_every=100)
