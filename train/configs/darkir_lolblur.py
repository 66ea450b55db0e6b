"""DarkIR-m on LOLBlur (the historical options/train/LOLBlur.yml; spec darkir_snr.md A7).

    python -m train --config darkir_lolblur --workdir runs/darkir_lolblur \
        --set data.root=/data/LOLBlur/train --set val_data.root=/data/LOLBlur/test \
        --set vgg_weights=/weights/vgg19.safetensors

AdamW lr 5e-4, betas (0.9, 0.9), decoupled weight decay 1e-3; CosineAnnealingLR over 500 epochs
to 1e-6, stepped per epoch (637 iterations: 10,200 pairs / 16); batch 16, 256 crops (zero
padding of smaller images), horizontal and vertical flips. The model is called with
side_loss=True; loss = L1(out) + 0.01 VGG(out) + 50 MSE(Laplacian) + 0.8 L1(side x8) + 0.01
VGG(side x8) with VGG19 (ImageNet, unnormalised input, mean L1s at relu1_1..relu5_1): pass its
weights (torchvision keys in .safetensors/.npz; nothing is downloaded). Validation each epoch on
the full test images, PSNR of the unclamped output (as DarkIR's testing.py).
"""

from train.recipe import LossTerm, Recipe
from train.schedules import OptimizerConfig, ScheduleConfig

IPE, EPOCHS = 637, 500

LOSSES = (
    LossTerm("l1", 1.0),
    LossTerm("perceptual", 0.01, options={"reduction": "mean"}),
    LossTerm("laplacian_mse", 50.0),
    LossTerm("l1", 0.8, outputs="side"),
    LossTerm("perceptual", 0.01, outputs="side", options={"reduction": "mean"}),
)


def get_config(arg=None):
    return Recipe(
        name="darkir_lolblur", description="DarkIR-m LOLBlur low-light deblurring",
        model="darkir:m",
        data=dict(kind="lolblur", root=None, patch_size=256, geometric_augs=True,
                  augment_mode="hvflip", pad_mode="constant", num_workers=0),
        val_data=dict(kind="lolblur", root=None, patch_size=None),
        batch_size=16, total_steps=EPOCHS * IPE, losses=LOSSES,
        optimizer=OptimizerConfig(
            name="adamw", lr=5e-4, b1=0.9, b2=0.9, eps=1e-8, weight_decay=1e-3,
            schedule=ScheduleConfig(kind="cosine_per_epoch", iters_per_epoch=IPE, t_max=EPOCHS,
                                    eta_min=1e-6)),
        seed=0, eval_every=IPE, eval_clamp=False, checkpoint_every=IPE, keep_checkpoints=3,
        log_every=100)
