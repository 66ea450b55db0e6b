"""VGG19 feature extractor (torchvision's ``vgg19().features``) for perceptual-style losses.

``VGG19.features`` is an ``nnx.Sequential`` whose indices are exactly torchvision's: the convs sit
at the same positions as ``features.N.weight`` / ``features.N.bias`` in a torchvision state dict,
and the ReLUs and max-pools are parameter-free entries in between, so the generic converter
(``porting.convert.load_state_dict``) fills it; ``porting.reference.vgg.load_torchvision_vgg19``
reads a torchvision checkpoint file. Input NHWC, RGB.

Torch semantics: 3x3 convs with zero padding 1 and bias; ReLU; MaxPool2d(2, 2) with floor mode
(an odd trailing row/column is dropped).

Not a restoration model: not in the model registry.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxrestore.layers import Conv2d, Sequential, max_pool_2x2

# torchvision's configuration "E": channel counts, "M" = max-pool
_CFG_E = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _layer_names() -> tuple[str, ...]:
    names, block, idx = [], 1, 1
    for v in _CFG_E:
        if v == "M":
            names.append(f"pool{block}")
            block, idx = block + 1, 1
        else:
            names += [f"conv{block}_{idx}", f"relu{block}_{idx}"]
            idx += 1
    return tuple(names)


# LAYER_NAMES[i] names torchvision's features[i]: conv1_1, relu1_1, conv1_2, ..., relu5_4, pool5
LAYER_NAMES = _layer_names()
NUM_LAYERS = len(LAYER_NAMES)  # 37
LAYER_INDEX = {n: i for i, n in enumerate(LAYER_NAMES)}

# The five ReLU outputs that SNR-Aware and DarkIR compare (torchvision slices [0:2], [2:7], ...).
RELU_X_1 = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def layer_index(layer: int | str) -> int:
    """Index into ``features`` of a layer given by index or name (``relu3_1``)."""
    if isinstance(layer, str):
        if layer not in LAYER_INDEX:
            raise KeyError(f"unknown VGG19 layer {layer!r}; known: {', '.join(LAYER_NAMES)}")
        return LAYER_INDEX[layer]
    if not 0 <= layer < NUM_LAYERS:
        raise IndexError(f"VGG19 layer index {layer} out of range 0..{NUM_LAYERS - 1}")
    return int(layer)


class VGG19(nnx.Module):
    """The first ``num_layers`` entries of torchvision's ``vgg19().features``.

    ``num_layers=30`` stops after relu5_1 (all the perceptual losses here need); the default builds
    all 37. Weights are torch-default initialised; load real ones with
    ``porting.reference.vgg.load_torchvision_vgg19``.
    """

    def __init__(self, *, rngs: nnx.Rngs, num_layers: int = NUM_LAYERS):
        if not 1 <= num_layers <= NUM_LAYERS:
            raise ValueError(f"num_layers must be in 1..{NUM_LAYERS}, got {num_layers}")
        entries, cin = [], 3
        for name in LAYER_NAMES[:num_layers]:
            if name.startswith("conv"):
                cout = _conv_channels(name)
                entries.append(Conv2d(cin, cout, 3, padding=1, bias=True, rngs=rngs))
                cin = cout
            elif name.startswith("relu"):
                entries.append(jax.nn.relu)
            else:
                entries.append(max_pool_2x2)
        self.num_layers = num_layers
        self.features = Sequential(*entries)

    def __call__(self, x: jax.Array, layers: Sequence[int | str] = RELU_X_1, *,
                 normalize: bool = False) -> list[jax.Array]:
        """Activations after each requested layer (index or name), in the order requested.

        Computation stops after the deepest requested layer. ``normalize=True`` first maps the
        [0, 1] RGB input with the ImageNet mean/std (torchvision's preprocessing); the SNR-Aware
        and DarkIR losses do not normalise.
        """
        idx = [layer_index(layer) for layer in layers]
        if not idx:
            return []
        last = max(idx)
        if last >= self.num_layers:
            raise ValueError(f"layer {LAYER_NAMES[last]} (index {last}) requested but this VGG19 "
                             f"was built with num_layers={self.num_layers}")
        if normalize:
            mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
            std = jnp.asarray(IMAGENET_STD, x.dtype)
            x = (x - mean) / std
        wanted = set(idx)
        found = {}
        for i, layer in enumerate(self.features.layers[:last + 1]):
            x = layer(x)
            if i in wanted:
                found[i] = x
        return [found[i] for i in idx]


def _conv_channels(name: str) -> int:
    block = int(name[4])
    return (64, 128, 256, 512, 512)[block - 1]
