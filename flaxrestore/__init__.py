"""flaxrestore: JAX/Flax ports of Restormer, MPRNet, DarkIR, SNR-Aware and AECR-Net."""

__version__ = "0.1.0"

from flaxrestore import models  # noqa: E402,F401


def __getattr__(name):
    # lazy: `flaxrestore.restore(module, image, ...)` and `flaxrestore.export(module, path, ...)`
    # without importing the inference or export code (onnx, jax2onnx) up front
    if name in ("restore", "export"):
        import importlib

        return importlib.import_module(f"flaxrestore.{name}")  # callable modules, see restore.py
    raise AttributeError(f"module 'flaxrestore' has no attribute {name!r}")
