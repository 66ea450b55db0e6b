"""Torch VGG19 ``features`` stack with torchvision's key layout (``features.N.weight/bias``).

torchvision is not installed here; this module builds the same ``nn.Sequential`` (convs, ReLUs,
max-pools at torchvision's indices), so a torchvision ``vgg19`` state dict loads into it after
dropping the ``classifier.*`` entries. ``load_torchvision_vgg19`` reads such a file safely and
returns the Flax :class:`flaxrestore.vgg.VGG19`.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from flaxrestore import vgg as flax_vgg

LAYER_NAMES = flax_vgg.LAYER_NAMES
NUM_LAYERS = flax_vgg.NUM_LAYERS


class VGG19Features(nn.Module):
    """``self.features`` = the first ``num_layers`` entries of torchvision's vgg19().features."""

    def __init__(self, num_layers: int = NUM_LAYERS):
        super().__init__()
        mods, cin = [], 3
        widths = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
        for name in LAYER_NAMES[:num_layers]:
            if name.startswith("conv"):
                cout = widths[int(name[4])]
                mods.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1))
                cin = cout
            elif name.startswith("relu"):
                mods.append(nn.ReLU(inplace=False))
            else:
                mods.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, layers: Sequence[int | str] = flax_vgg.RELU_X_1,
                normalize: bool = False) -> list[torch.Tensor]:
        """NCHW input; activations after each requested layer, in the order requested."""
        idx = [flax_vgg.layer_index(layer) for layer in layers]
        if normalize:
            mean = torch.tensor(flax_vgg.IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(flax_vgg.IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x - mean) / std
        found = {}
        for i, layer in enumerate(self.features[:max(idx) + 1]):
            x = layer(x)
            if i in idx:
                found[i] = x
        return [found[i] for i in idx]


def load_torchvision_vgg19(path: str | os.PathLike, *,
                           num_layers: int = NUM_LAYERS) -> "flax_vgg.VGG19":
    """A Flax VGG19 holding the weights of a torchvision ``vgg19`` checkpoint file.

    The file is read safely (``porting.checkpoint``). The ``classifier.*`` entries, and the
    ``features.N.*`` entries of layers beyond ``num_layers``, are dropped explicitly; everything
    else must match exactly (strict load: a missing, unexpected or mis-shaped key raises).
    """
    from flax import nnx

    from porting.checkpoint import load_state_dict_file
    from porting.convert import load_state_dict

    state = load_state_dict_file(path)
    kept = {}
    for k, v in state.items():
        if k.startswith("classifier."):
            continue
        parts = k.split(".")
        if (len(parts) == 3 and parts[0] == "features" and parts[1].isdigit()
                and int(parts[1]) >= num_layers):
            continue
        kept[k] = v
    module = nnx.eval_shape(lambda: flax_vgg.VGG19(rngs=nnx.Rngs(0), num_layers=num_layers))
    load_state_dict(module, kept, strict=True)  # no name: VGG is not a registered variant
    return module
