"""Torch modules that reproduce the originals key for key, built from the flax configs.

Each family's module defines the torch class (same constructor keywords as the original, which
are the fields of the flax config dataclass) and ``RELEASE_KEY``: the top-level entry under which
the official release stores its state dict (None for a bare state dict).
"""

from __future__ import annotations

import dataclasses
import importlib

from flaxrestore import models

# family -> (module, class name)
REFERENCES: dict[str, tuple[str, str]] = {
    "restormer": ("porting.reference.restormer", "Restormer"),
    "mprnet": ("porting.reference.mprnet", "MPRNet"),
    "darkir": ("porting.reference.darkir", "DarkIR"),
    "snr": ("porting.reference.snr", "SNRNet"),
    "aecrnet": ("porting.reference.aecrnet", "AECRNet"),
}


def _module(name: str):
    family = models.entry(name).family
    if family not in REFERENCES:
        raise KeyError(f"no torch reference for model family {family!r}")
    return importlib.import_module(REFERENCES[family][0]), REFERENCES[family][1]


def reference_class(family: str) -> type:
    """The torch class of a family (constructor keywords: the fields of its flax config)."""
    if family not in REFERENCES:
        raise KeyError(f"no torch reference for model family {family!r}")
    mod_name, cls_name = REFERENCES[family]
    return getattr(importlib.import_module(mod_name), cls_name)


def build(name: str, **overrides):
    """The torch reference module of a registered variant, torch-default initialised."""
    cfg = models.get_config(name, **overrides)
    return reference_class(models.entry(name).family)(**dataclasses.asdict(cfg))


def release_key(name: str) -> str | None:
    """Where the official checkpoint file keeps the state dict ('params', 'state_dict', ...)."""
    mod, _ = _module(name)
    return getattr(mod, "RELEASE_KEY", None)
