"""Model registry: ``create("family:variant", rngs=...)`` builds a freshly initialised NNX module.

Each model file calls :func:`register` for its released variants. A variant's config is a frozen
dataclass whose fields are the keyword arguments of the original torch class, so the torch
reference is built with ``TorchClass(**dataclasses.asdict(config))``.

Each network class declares how it is called in a class attribute ``protocol`` (a
:class:`Protocol`): the padding its test scripts apply, its extra inputs, which output is the
image, its training side output. Restoring (``flaxrestore.restore``), evaluation and training
(``train/``) all read that one declaration.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable, Sequence

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a family's network is called, at test time and in training.

    ``multiple``/``pad_mode``: the official test scripts pad H and W (bottom/right) to a multiple
    of ``multiple`` with this torch padding mode ('reflect' without edge repeat, 'zeros',
    'replicate') and crop the result back. ``any_size``: the network accepts any H, W itself
    (it pads internally), so the multiple is what its scripts do, not a requirement.
    ``extra_inputs``: maps computed from the unpadded image (jax-traceable), passed to the
    network after it; they are padded, flipped and tiled along with the image.
    ``outputs``: 'image' (the network returns the restored image) or 'stages' (a list of images,
    the restored one first: MPRNet). ``side_output``: the keyword that makes the training forward
    return ``(side, image)`` with a low-resolution side output (DarkIR's ``side_loss``).
    ``clamp``: the scripts clamp the result to [0, 1] before saving.
    """

    multiple: int
    pad_mode: str
    any_size: bool = False
    extra_inputs: Callable[[Any], tuple[Any, ...]] | None = None
    outputs: str = "image"
    side_output: str | None = None
    clamp: bool = True

    def __post_init__(self):
        if self.outputs not in ("image", "stages"):
            raise ValueError(f"outputs must be 'image' or 'stages', got {self.outputs!r}")

    def inputs(self, x) -> tuple:
        """The network's inputs for image batch ``x`` (NHWC): ``x`` and its extra inputs."""
        return (x, *self.extra_inputs(x)) if self.extra_inputs else (x,)

    def images(self, out) -> Sequence:
        """Every image output of the network, the restored image first."""
        if self.outputs == "stages":
            return tuple(out)
        if isinstance(out, (tuple, list)):
            raise TypeError("the model returned several outputs; its protocol must say which to use")
        return (out,)

    def image(self, out):
        """The restored image among the network's outputs."""
        return self.images(out)[0]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config: Any
    description: str = ""

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def protocol(self) -> Protocol:
        return self.cls.protocol


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
    if not isinstance(getattr(cls, "protocol", None), Protocol):
        raise TypeError(f"{cls.__name__} declares no calling protocol (class attribute "
                        "`protocol = Protocol(...)`)")
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


def protocol(model: str | nnx.Module) -> Protocol:
    """The calling protocol of a registered model name or family, or of a model instance."""
    if isinstance(model, str):
        _load_all()
        family = [e for e in _REGISTRY.values() if e.family == model]
        return family[0].protocol if family else entry(model).protocol
    p = getattr(type(model), "protocol", None)
    if not isinstance(p, Protocol):
        raise ValueError(f"{type(model).__name__} declares no calling protocol; pass protocol=...")
    return p


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
