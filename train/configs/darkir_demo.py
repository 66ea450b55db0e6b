"""DarkIR demo: the LOLBlur recipe shrunk to minutes on 2 CPU cores, built-in low-light data.

    python -m train --config darkir_demo --workdir runs/darkir_demo
    python -m train --config darkir_demo --workdir runs/darkir_demo_vgg \
        --set vgg_weights=/weights/vgg19.safetensors --set losses.1.weight=0.01 \
        --set losses.4.weight=0.01

ARG: the demo degradation (lowlight, default; blur, ...). Kept: AdamW (0.9, 0.9) with weight
decay 1e-3, per-epoch cosine (an "epoch" is 25 steps), flips, the side output and the L1 + 50
Laplacian-MSE + 0.8 side-L1 terms. The two VGG terms are off (weight 0) unless you pass VGG19
weights as above: no weights ship and nothing is downloaded. Shrunk: width 8, one block per
level, 300 steps, lr 1e-3, 32-pixel crops, batch 8.
"""

import dataclasses

from train.configs import darkir_lolblur

TINY = dict(width=8, enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1), middle_blk_num_enc=1,
            middle_blk_num_dec=1)


def get_config(arg=None):
    degradation = arg or "lowlight"
    base = darkir_lolblur.get_config()
    ipe, epochs = 25, 12
    losses = tuple(dataclasses.replace(t, weight=0.0) if t.kind == "perceptual" else t
                   for t in base.losses)
    return dataclasses.replace(
        base, name=f"darkir_demo:{degradation}", description="tiny DarkIR on demo data",
        model_overrides=TINY, losses=losses,
        data=dict(base.data, kind="demo", degradation=degradation, patch_size=32),
        val_data=dict(kind="demo", degradation=degradation, patch_size=None, demo_val_size=128),
        batch_size=8, total_steps=ipe * epochs,
        optimizer=dataclasses.replace(
            base.optimizer, lr=1e-3,
            schedule=dataclasses.replace(base.optimizer.schedule, iters_per_epoch=ipe,
                                         t_max=epochs)),
        eval_every=100, checkpoint_every=50, log_every=25)
