"""Shared pieces of the SNR-Aware recipes (spec darkir_snr.md B9).

Common: Adam lr 4e-4 (LOL recipes), betas (0.9, 0.99), no weight decay; the scheduler is stepped
every iteration (MultiStepLR_Restart: halve at 50k, 100k, 200k, 300k of 600k); no warm-up;
horizontal and vertical flips (the 90-degree rotation is commented out in the original); the SNR
map is computed by the model from the (cropped, flipped) input; loss = Charbonnier *sum*
(sqrt(d^2 + 1e-6)) + w * VGG19 perceptual with *sum*-reduced L1s (w 0.1 or 0.02, 0 = off). The
original seed key is misspelled (no fixed seed); 0 here.
"""

from __future__ import annotations

from train.recipe import LossTerm, Recipe
from train.schedules import OptimizerConfig, ScheduleConfig


def recipe(name: str, description: str, data: dict, val_data: dict | None, *, batch: int,
           vgg_weight: float, total: int = 600_000, lr: float = 4e-4,
           schedule: ScheduleConfig | None = None) -> Recipe:
    losses = [LossTerm("charbonnier_sum", 1.0, options={"eps": 1e-6})]
    if vgg_weight:
        losses.append(LossTerm("perceptual", vgg_weight, options={"reduction": "sum"}))
    schedule = schedule or ScheduleConfig(kind="multistep",
                                          milestones=(50_000, 100_000, 200_000, 300_000),
                                          gamma=0.5)
    data = dict(dict(geometric_augs=True, augment_mode="hvflip", num_workers=0), **data)
    return Recipe(
        name=name, description=description, model="snr", data=data, val_data=val_data,
        batch_size=batch, total_steps=total, losses=tuple(losses),
        optimizer=OptimizerConfig(name="adam", lr=lr, b1=0.9, b2=0.99, eps=1e-8,
                                  schedule=schedule),
        seed=0, eval_every=5000, checkpoint_every=5000, keep_checkpoints=3, log_every=100)
