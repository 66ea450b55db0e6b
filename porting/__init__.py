"""The bridge to PyTorch: reference modules, checkpoint conversion and verification.

This is the only package of the project that imports torch (``pip install flaxrestore[torch]``).
"""

from porting.checkpoint import CheckpointError, load_state_dict_file
from porting.convert import (ConversionError, flax_to_numpy, flax_to_torch, load_state_dict,
                             torch_layout, torch_to_flax)


def load_torch_checkpoint(name: str, path, *, key: str | None = None, strict: bool = True,
                          **overrides):
    """Reads a released PyTorch checkpoint file safely and returns the NNX module of ``name``."""
    return torch_to_flax(name, load_state_dict_file(path, key=key), strict=strict, **overrides)


__all__ = ["CheckpointError", "ConversionError", "flax_to_numpy", "flax_to_torch",
           "load_state_dict", "load_state_dict_file", "load_torch_checkpoint", "torch_layout",
           "torch_to_flax"]
