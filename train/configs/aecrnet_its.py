"""AECR-Net on RESIDE ITS, validated on SOTS indoor (spec aecrnet.md sections 5-7).

    python -m train --config aecrnet_its --workdir runs/aecrnet_its \
        --set data.root=/data/RESIDE/ITS --set val_data.root=/data/RESIDE/SOTS/indoor \
        --set vgg_weights=/weights/vgg19.safetensors

The official code's settings: Adam lr 1e-4 (the paper says 2e-4: --set optimizer.lr=2e-4),
betas (0.9, 0.999), no weight decay; per-step cosine lr0 (1 + cos(pi t / T)) / 2 over T =
500,000 iterations, no warm-up; batch 16 of 240 crops; horizontal flip then a random 90-degree
rotation; seed 666; evaluation every 5000 steps on the whole test images. Loss = L1 + 0.1 CR, the
contrastive regularization with VGG19 (ImageNet weights, unnormalised input) and the hazy input
as the negative; 0.1 is the paper's beta (the code's default --w_loss_vgg7 is 0, i.e. CR off:
--set losses.1.weight=0). FastDeconv uses batch statistics in training and updates its running
statistics. (The original reads HDF5 files; point ``data.root`` at the RESIDE image folders.)
"""

from train.recipe import LossTerm, Recipe
from train.schedules import OptimizerConfig, ScheduleConfig

TOTAL = 500_000


def get_config(arg=None):
    return Recipe(
        name="aecrnet_its", description="AECR-Net RESIDE ITS dehazing", model="aecrnet",
        data=dict(kind="reside", root=None, patch_size=240, geometric_augs=True,
                  augment_mode="hflip_rot4", num_workers=0),
        val_data=dict(kind="reside", root=None, patch_size=None),
        batch_size=16, total_steps=TOTAL,
        losses=(LossTerm("l1", 1.0), LossTerm("contrastive", 0.1)),
        optimizer=OptimizerConfig(
            name="adam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8,
            schedule=ScheduleConfig(kind="cosine_per_step", t_max=TOTAL, eta_min=0.0, offset=1)),
        seed=666, eval_every=5000, checkpoint_every=5000, keep_checkpoints=3, log_every=100)
