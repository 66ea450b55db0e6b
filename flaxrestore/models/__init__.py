"""Model registry: ``create("family:variant", rngs=...)`` builds a freshly initialised NNX module.

Each model file calls :func:`register` for its released variants. A variant's config is a frozen
dataclass whose fields are the keyword arguments of the original torch class, so the torch
reference is built with ``TorchClass(**dataclasses.asdict(config))``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config: Any
    description: str = ""

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0]


_REGISTRY: dict[str, Entry] = {}

# Model modules imported lazily on first registry access (keeps `import flaxrestore` cheap).
_MODEL_MODULES = (
    "restormer",
    "mprnet",
    "darkir",
    "snr",
    "aecrnet",
)
_loaded = False


def register(name: str, cls: type, config: Any, description: str = "") -> None:
    if name in _REGISTRY and _REGISTRY[name].cls is not cls:
        raise ValueError(f"model name {name!r} registered twice")
    _REGISTRY[name] = Entry(name, cls, config, description)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _MODEL_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a model file not written yet
            if e.name != f"{__name__}.{mod}":
                raise


def names(family: str | None = None) -> list[str]:
    """Every registered name, e.g. ``restormer:motion_deblurring``; optionally of one family."""
    _load_all()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def families() -> list[str]:
    _load_all()
    return sorted({e.family for e in _REGISTRY.values()})


def entry(name: str) -> Entry:
    _load_all()
    if name not in _REGISTRY:
        # a bare family name resolves when that family has exactly one variant
        fam = [e for e in _REGISTRY.values() if e.family == name]
        if len(fam) == 1:
            return fam[0]
        if fam:  # a family with several variants: name them all
            close = sorted(e.name for e in fam)
        else:
            close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_config(name: str, **overrides):
    cfg = entry(name).config
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def create(name: str, *, rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
    """A freshly initialised module of a registered variant (torch-style init).

    ``overrides`` replace fields of the variant's config (e.g. ``dim=16`` for a small test model).
    """
    e = entry(name)
    return e.cls(get_config(name, **overrides), rngs=rngs if rngs is not None else nnx.Rngs(0))


def create_abstract(name: str, **overrides) -> nnx.Module:
    """The module's structure with shape/dtype placeholders instead of arrays (no compute)."""
    e = entry(name)
    cfg = get_config(name, **overrides)
    return nnx.eval_shape(lambda: e.cls(cfg, rngs=nnx.Rngs(0)))
