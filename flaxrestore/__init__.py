"""flaxrestore: JAX/Flax ports of Restormer, MPRNet, DarkIR, SNR-Aware and AECR-Net."""

__version__ = "0.1.0"

from flaxrestore import models  # noqa: E402,F401
