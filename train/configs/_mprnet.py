"""Shared pieces of the MPRNet recipes (spec restormer_mprnet.md section 2.6).

Common to the three tasks: global batch 16 (DataParallel on 4 GPUs); Adam lr 2e-4, betas
(0.9, 0.999), eps 1e-8; GradualWarmupScheduler (multiplier 1, 3 epochs) into CosineAnnealingLR
(eta_min 1e-6), stepped once per epoch; no gradient clipping, no EMA; MPRNet's 9-way geometric
augmentation (``randint(0, 8)``), reflect padding of small images; seed 1234. The loss sums over
the three stage outputs. An "epoch" is one pass over the dataset (drop_last False), so
``iters_per_epoch`` is ceil(pairs / 16) of the dataset the paper used; set
``optimizer.schedule.iters_per_epoch`` (and ``total_steps``) for another dataset size.
"""

from __future__ import annotations

from train.recipe import LossTerm, MixupConfig, Recipe
from train.schedules import OptimizerConfig, ScheduleConfig


def recipe(name: str, description: str, model: str, data: dict, val_data: dict | None, *,
           epochs: int, iters_per_epoch: int, t_max: int, patch: int, val_every_epochs: int,
           losses: tuple[LossTerm, ...], weight_decay: float = 0.0,
           mixup: MixupConfig = MixupConfig()) -> Recipe:
    data = dict(dict(patch_size=patch, geometric_augs=True, augment_mode="mprnet9",
                     pad_mode="reflect", num_workers=0), **data)
    opt = OptimizerConfig(
        name="adam", lr=2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
        schedule=ScheduleConfig(kind="warmup_cosine_per_epoch", iters_per_epoch=iters_per_epoch,
                                warmup_epochs=3, t_max=t_max, eta_min=1e-6))
    every = val_every_epochs * iters_per_epoch
    return Recipe(
        name=name, description=description, model=model, data=data, val_data=val_data,
        batch_size=16, total_steps=epochs * iters_per_epoch, losses=losses, optimizer=opt,
        mixup=mixup, seed=1234, eval_every=every, checkpoint_every=min(every, 5000),
        keep_checkpoints=3, log_every=100)


CHARBONNIER_ALL = LossTerm("charbonnier", 1.0, outputs="all", options={"eps": 1e-3})
EDGE_ALL = LossTerm("edge", 0.05, outputs="all", options={"eps": 1e-3})
