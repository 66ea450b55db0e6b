"""flaxrestore: JAX/Flax ports of Restormer, MPRNet, DarkIR, SNR-Aware and AECR-Net."""

__version__ = "0.1.0"

from flaxrestore import models  # noqa: E402,F401


def __getattr__(name):
    # lazy: `flaxrestore.restore(module, image, ...)` without importing the inference code up front
    if name == "restore":
        import importlib

        return importlib.import_module("flaxrestore.restore")  # a callable module, see restore.py
    raise AttributeError(f"module 'flaxrestore' has no attribute {name!r}")
