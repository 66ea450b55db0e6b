"""PyTorch state_dict <-> Flax NNX module, by attribute path plus a few rules per layer type.

The NNX modules use the torch attribute names, so a torch key is the NNX path joined by dots,
with three generic adjustments:

* ``nnx.Sequential`` is transparent: its ``layers[i]`` is torch's child ``i``.
* a rule per (layer type, variable name) renames and re-lays-out a variable
  (``Conv2d.kernel`` HWIO <-> ``weight`` OIHW, a norm's ``scale`` <-> ``weight``, ...);
* any other 4-D variable is a channels-last broadcast parameter, (1,1,1,C) <-> (1,C,1,1);
  every other variable is copied as is.

A module shared at several places (MPRNet's single PReLU) appears under every alias, as it does
in torch's state_dict: every alias must hold the same value on import and all are written on export.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers, models


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _identity(a):
    return a


def _t(*perm):
    return lambda a: np.transpose(a, perm)


OIHW_TO_HWIO = Rule("weight", _t(2, 3, 1, 0), _t(3, 2, 0, 1))
LINEAR = Rule("weight", _t(1, 0), _t(1, 0))
NORM_SCALE = Rule("weight", _identity, _identity)
CHANNELS_LAST_4D = Rule("", _t(0, 2, 3, 1), _t(0, 3, 1, 2))
COPY = Rule("", _identity, _identity)

# (layer type, NNX variable name) -> rule. Looked up along the class's MRO. Models that bring a
# new layer type add its rule here (one line), never a per-model key table.
RULES: dict[type, dict[str, Rule]] = {
    layers.Conv2d: {"kernel": OIHW_TO_HWIO},
    layers.ChannelLayerNorm: {"scale": NORM_SCALE},
    nnx.Linear: {"kernel": LINEAR},
    nnx.LayerNorm: {"scale": NORM_SCALE},
    nnx.BatchNorm: {"scale": NORM_SCALE, "mean": Rule("running_mean", _identity, _identity),
                    "var": Rule("running_var", _identity, _identity)},
}

# Variable types that live in a torch state_dict (parameters and registered buffers).
STATE_TYPES = (nnx.Param, nnx.BatchStat)


class ConversionError(ValueError):
    """A checkpoint does not fit a model. The message names every problem."""


@dataclasses.dataclass
class Slot:
    variable: nnx.Variable
    rule: Rule
    flax_path: tuple

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(self.variable.shape)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(self.rule.to_torch(np.empty(self.flax_shape, np.float32)).shape)


def _rule_for(owner: nnx.Module, name: str, variable: nnx.Variable) -> Rule:
    for klass in type(owner).__mro__:
        rule = RULES.get(klass, {}).get(name)
        if rule is not None:
            return rule
    return CHANNELS_LAST_4D if len(variable.shape) == 4 else COPY


def _children(module: nnx.Module) -> Iterable[tuple[str, Any, Any]]:
    """(torch name, flax path element, child) for each public attribute, in definition order."""
    if isinstance(module, nnx.Sequential):
        for i, layer in enumerate(module.layers):
            yield str(i), ("layers", i), layer
        return
    for k, v in vars(module).items():
        if k.startswith("_"):
            continue
        yield k, (k,), v


def torch_layout(module: nnx.Module) -> dict[str, Slot]:
    """Every torch state_dict key of ``module`` mapped to the NNX variable that holds it."""
    out: dict[str, Slot] = {}

    def walk(mod, prefix, path):
        for tname, fpath, child in _children(mod):
            key = prefix + tname
            if isinstance(child, nnx.Variable):
                if isinstance(child, STATE_TYPES):
                    rule = _rule_for(mod, tname, child)
                    out[prefix + (rule.torch_name or tname)] = Slot(child, rule, path + fpath)
            elif isinstance(child, nnx.Module):
                walk(child, key + ".", path + fpath)

    walk(module, "", ())
    return out


def expected_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Torch key -> torch shape of every entry the module's state_dict has."""
    return {k: s.torch_shape for k, s in torch_layout(module).items()}


def _as_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # a torch tensor; porting is the only package that sees these
        import torch

        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(v)


def _family(name: str) -> str:
    return models.entry(name).family


def _match_problems(layout_shapes: Mapping[str, tuple], given: Mapping[str, tuple]):
    missing = [k for k in layout_shapes if k not in given]
    unexpected = [k for k in given if k not in layout_shapes]
    mismatched = [(k, given[k], layout_shapes[k]) for k in layout_shapes
                  if k in given and tuple(given[k]) != tuple(layout_shapes[k])]
    return missing, unexpected, mismatched


def _variant_shapes(name: str, overrides: tuple) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of variant ``name``, from its torch reference on the meta device:
    instant, where tracing the Flax module's init takes seconds per variant (a wrong name's
    error message looked at every variant of the family: 38 s for Restormer). The Flax layout
    equals it key for key and shape for shape (tests/test_convert.py)."""
    return dict(_meta_state_dict(models.entry(name).family,
                                 models.get_config(name, **dict(overrides))))


def matching_variants(state_shapes: Mapping[str, tuple], family: str | None = None,
                      **overrides) -> list[str]:
    """Registered names (of ``family``, or all) whose state_dict has exactly these keys/shapes."""
    found = []
    for name in models.names(family):
        try:
            shapes = _variant_shapes(name, tuple(sorted(overrides.items())))
        except Exception:  # a variant that cannot be built with these overrides is no candidate
            continue
        if not any(_match_problems(shapes, state_shapes)):
            found.append(name)
    return found


@functools.lru_cache(maxsize=None)
def _meta_state_dict(family: str, cfg) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(key, shape) of every state_dict entry, in order, of ``family``'s torch reference built
    from ``cfg`` on torch's meta device (no memory, no init); cached per config."""
    import torch

    from porting import reference

    with torch.device("meta"):
        sd = reference.reference_class(family)(**dataclasses.asdict(cfg)).state_dict()
    return tuple((k, tuple(v.shape)) for k, v in sd.items())


def _meta_state_dict_keys(family: str, cfg) -> tuple[str, ...]:
    return tuple(k for k, _ in _meta_state_dict(family, cfg))


def _family_top_level(family: str) -> frozenset[str]:
    """First components of the state_dict keys of a family's first variant."""
    first = models.entry(models.names(family)[0])
    return frozenset(k.split(".", 1)[0] for k in _meta_state_dict_keys(family, first.config))


def guess_family(state: Mapping[str, Any]) -> str | None:
    """The registered family whose top-level module names best match ``state``'s keys
    (Jaccard similarity of the name sets at least 0.8), or None."""
    tops = {k.split(".", 1)[0] for k in state}
    best, score = None, 0.0
    for family in models.families():
        try:
            theirs = _family_top_level(family)
        except Exception:
            continue
        j = len(tops & theirs) / max(1, len(tops | theirs))
        if j > score:
            best, score = family, j
    return best if score >= 0.8 else None


def _format_problems(name, missing, unexpected, mismatched, limit=50) -> str:
    lines = [f"checkpoint does not match {name!r}: {len(missing)} missing key(s), "
             f"{len(unexpected)} unexpected key(s), {len(mismatched)} shape mismatch(es)"]

    def section(title, items):
        if items:
            lines.append(f"  {title}:")
            lines.extend(f"    {it}" for it in items[:limit])
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")

    section("missing", list(missing))
    section("unexpected", list(unexpected))
    section("shape mismatch (checkpoint vs model)",
            [f"{k}: {tuple(g)} vs {tuple(e)}" for k, g, e in mismatched])
    return "\n".join(lines)


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True,
                    name: str | None = None, overrides: Mapping[str, Any] | None = None
                    ) -> dict[str, list[str]]:
    """Fills ``module``'s variables from a torch-layout state dict, in place.

    Strict by default: every variable filled, every tensor used, every shape right; otherwise a
    :class:`ConversionError` naming all problems is raised and ``module`` is left untouched. With
    ``strict=False`` the matching entries are loaded and the rest reported in the returned dict
    (``missing``, ``unexpected``, ``mismatched``).
    """
    layout = torch_layout(module)
    arrays = {k: _as_numpy(v) for k, v in state_dict.items()}
    shapes = {k: s.torch_shape for k, s in layout.items()}
    missing, unexpected, mismatched = _match_problems(shapes, {k: a.shape for k, a in arrays.items()})

    # aliases of one shared variable must agree
    by_var: dict[int, list[str]] = {}
    for k, slot in layout.items():
        by_var.setdefault(id(slot.variable), []).append(k)
    conflicts = []
    for keys in by_var.values():
        present = [k for k in keys if k in arrays and shapes[k] == arrays[k].shape]
        for k in present[1:]:
            if not np.array_equal(arrays[k], arrays[present[0]]):
                conflicts.append(f"{k} differs from its alias {present[0]} (one shared parameter)")

    if strict and (missing or unexpected or mismatched or conflicts):
        msg = _format_problems(name or type(module).__name__, missing, unexpected, mismatched)
        if conflicts:
            msg += "\n  shared parameter aliases disagree:\n" + "\n".join(f"    {c}" for c in conflicts)
        if name is not None and not conflicts:
            # the other variants of the same family (a wrong variant name is the usual mistake)
            others = [n for n in matching_variants({k: a.shape for k, a in arrays.items()},
                                                   _family(name), **(overrides or {}))
                      if n != name]
            if others:
                msg += f"\n  these weights match {', '.join(others)}: load them under that name"
            else:
                family = guess_family(arrays)
                if family is not None and family != _family(name):
                    msg += (f"\n  these weights look like a {family} model (their top-level "
                            f"modules are {family}'s): try one of {', '.join(models.names(family))}")
        raise ConversionError(msg)

    bad = set(missing) | {k for k, _, _ in mismatched}
    done: set[int] = set()
    for k, slot in layout.items():
        if k in bad or id(slot.variable) in done or k not in arrays:
            continue
        value = slot.rule.to_flax(arrays[k])
        dtype = slot.variable.get_value().dtype
        # a copy: jnp.asarray may alias a contiguous numpy/torch buffer that torch later
        # updates in place (optimizer steps, running statistics)
        slot.variable.set_value(jnp.array(np.ascontiguousarray(value), dtype=dtype, copy=True))
        done.add(id(slot.variable))
    return {"missing": missing, "unexpected": unexpected, "mismatched": [k for k, _, _ in mismatched]}


def torch_to_flax(name: str, state_dict: Mapping[str, Any], *, strict: bool = True,
                  **overrides) -> nnx.Module:
    """A new NNX module of variant ``name`` holding the weights of a torch-layout state dict."""
    if strict:
        module = models.create_abstract(name, **overrides)  # no random init: every slot is filled
    else:
        module = models.create(name, **overrides)
    load_state_dict(module, state_dict, strict=strict, name=name, overrides=overrides)
    return module


def flax_to_numpy(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's weights as a torch-layout dict of numpy arrays (every alias written)."""
    out = {}
    for k, slot in torch_layout(module).items():
        out[k] = np.ascontiguousarray(slot.rule.to_torch(np.asarray(slot.variable.get_value())))
    return out


def reference_key_order(module: nnx.Module) -> list[str] | None:
    """The state_dict key order of the torch reference of ``module``, or None when ``module``
    is not a registered model class (or its reference cannot be built on the meta device)."""
    cfg = getattr(module, "config", None)
    family = next((models.entry(n).family for n in models.names()
                   if models.entry(n).cls is type(module)), None)
    if family is None or not dataclasses.is_dataclass(cfg):
        return None
    try:
        return list(_meta_state_dict_keys(family, cfg))
    except Exception:  # no reference, an unhashable config, a constructor needing real values
        return None


def flax_to_torch(module: nnx.Module) -> dict[str, "torch.Tensor"]:
    """The module's weights as a torch state dict with the original keys and layouts.

    Aliases of one shared flax variable share one torch tensor, as in the original. Keys come
    in the torch reference's ``state_dict()`` order (the order of the released files).
    """
    import torch

    out, seen = {}, {}
    for k, slot in torch_layout(module).items():
        vid = id(slot.variable)
        if vid not in seen:
            arr = np.ascontiguousarray(slot.rule.to_torch(np.asarray(slot.variable.get_value())))
            seen[vid] = torch.from_numpy(arr.copy())
        out[k] = seen[vid]
    order = reference_key_order(module)
    if order is not None and set(order) == set(out):
        out = {k: out[k] for k in order}
    return out


def state_to_torch_layout(module: nnx.Module, state: nnx.State) -> dict[str, np.ndarray]:
    """Maps a state shaped like ``module``'s parameters (e.g. its gradients) to torch keys."""
    clone = nnx.clone(module)
    nnx.update(clone, state)
    return flax_to_numpy(clone)


# Layer types added with AECR-Net. ConvTranspose2d: torch weight (in, out, kh, kw) <-> the
# spatially flipped HWIO kernel of the equivalent conv over the stride-dilated input.
CONV_TRANSPOSE_FLIP = Rule("weight", lambda a: np.transpose(a[:, :, ::-1, ::-1], (2, 3, 0, 1)),
                           lambda a: np.transpose(a[::-1, ::-1], (2, 3, 0, 1)))
RULES[layers.ConvTranspose2d] = {"kernel": CONV_TRANSPOSE_FLIP}
RULES[layers.ModulatedDeformConv2d] = {"kernel": OIHW_TO_HWIO}
RULES[layers.FastDeconv] = {"kernel": OIHW_TO_HWIO}
