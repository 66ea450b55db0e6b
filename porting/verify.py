"""Side-by-side comparison of the torch reference and the Flax port, measured against float64.

A float32 run is never exact, and how far it is from the exact function depends on the network:
deep stacks with large activations (MPRNet's third stage) or gradients that are sums of many
cancelling terms (DarkIR's norm biases) are 1e-4 to 1e-3 off in the original itself. So a fixed
relative tolerance between two float32 runs both fails correct ports and cannot tell how accurate
the port is. The verdict here uses a yardstick instead:

* the torch reference runs a second time in **float64** on the same weights and inputs (the
  float32 values cast exactly); that is the reference answer;
* the torch float32 run and the Flax float32 run are both measured against it, per output and
  per gradient tensor (max |diff| relative to the tensor's scale);
* a tensor passes when Flax's error is within ``max(tol, K x torch's own float32 error)``: the
  port is as accurate as the original, up to a factor K, or within ``tol`` anyway.

``plain=True`` (``--plain``) keeps the float32-against-float32 comparison with a fixed relative
tolerance, for checks that want a bound independent of the reference's noise (the round-trip
tests, or a machine without float64).

With ``layers=True`` every named torch module's output (forward hooks, float32 and float64) is
compared with the output of the Flax submodule at the same attribute path (``nnx.capture`` of
every ``__call__``; an ``nnx.Sequential``'s ``layers[i]`` is torch's child ``i``, as in the
converter), in the order torch finished computing them; the first one outside its yardstick is
where the two implementations part.

On GPU/TPU the comparison runs with ``jax.default_matmul_precision('highest')``. The Flax side runs
on the lowering the process would use (:func:`flaxrestore.lowering.describe` names it), or the
accelerator path inside ``flaxrestore.lowering.accelerator_path()``.
"""

from __future__ import annotations

import copy
import dataclasses
import platform as _platform
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import lowering, models
from porting import convert, reference

# K: how much larger than the original's own float32 error the port's may be.
# Measured (reduced widths, default init with every constant tensor randomised, seeds 0-3, the
# output and every gradient, Flax compiled; README "Equivalence"): on the tensors where the
# criterion matters (Flax's error above the 1e-4 floor), Flax's error against float64 was at most
# 2.3x torch's own on SNR-Aware's attention projections (whose float32 gradients are 1e-3 to 1e-2
# off in torch itself) and 5.9x on one Restormer temperature gradient (a scalar sum of cancelling
# terms; torch's own error there spreads from 1e-5 to 5e-4 between runs one ulp apart). K = 8
# covers that with a margin, and stays far from what a porting error does: a flipped sign, a
# transposed kernel or swapped norm parameters move the tensors they touch by 1e-1 to 1 of their
# scale, 1e3 to 1e7 times torch's float32 error.
K = 8.0
TOL = 1e-4
# Gradients of parameters whose gradient is a small sum of large cancelling terms (a bias after
# a normalisation: DarkIR-m's norm2.bias, 4e-6 where the model's largest gradient entry is
# 4e-2) carry float32 rounding of the terms, not of the sum: judged by their own scale alone a
# correct port failed. Each parameter gradient may also be off by GRAD_FLOOR x the largest
# gradient entry of the whole model (the floor the trainer's tests use); a sign or scale mistake
# in such a tensor is still 1e-4 of it or more.
GRAD_FLOOR = 1e-5
# Module outputs (--layers) are judged by the same yardstick with a floor of LAYER_TOL instead of
# TOL: each block's float32 noise is 1e-7..1e-6 of its scale, where the end-to-end floor 1e-4
# hides a one-block mistake (a normalisation epsilon 1e-5 -> 1e-4 in one Restormer block moved
# that block's output by 1.7e-3 and the network's by 2.5e-5). Measured at release widths: Flax's
# error at most 1.4x torch float32's on every one of Restormer's 516 module outputs.
LAYER_TOL = 1e-6
# float32 runs of torch on the image nudged by one ulp, besides the run on the image itself
NUDGES = 2


@dataclasses.dataclass
class Diff:
    """One tensor. Errors are max |diff|; relative errors divide by ``scale``."""
    what: str
    shape: tuple
    max_abs: float  # |flax32 - torch32| (the plain comparison)
    mean_abs: float
    scale: float  # max(1, max |reference|) for outputs; max |reference| for gradients and blocks
    flax_err: float | None = None  # |flax32 - torch64|
    torch_err: float | None = None  # torch float32's own error: the larger of the two below
    torch_errs: tuple | None = None  # |torch32 - torch64|, then per run on a nudged input
    floor: float = 0.0  # an absolute error always accepted (parameter gradients: GRAD_FLOOR)

    @property
    def rel(self) -> float:
        """Plain: Flax float32 against torch float32, relative to the scale."""
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    def _r(self, e):
        return e / self.scale if self.scale > 0 else e

    @property
    def flax_rel(self) -> float | None:
        return None if self.flax_err is None else self._r(self.flax_err)

    @property
    def torch_rel(self) -> float | None:
        return None if self.torch_err is None else self._r(self.torch_err)

    def bound(self, tol: float = TOL, k: float = K) -> float:
        """The relative error Flax may have: ``max(tol, k x torch's, floor)``, or ``tol`` when
        plain."""
        if self.torch_err is None:
            return tol
        return max(tol, k * self.torch_rel, self._r(self.floor))

    def error(self) -> float:
        """The relative error judged: Flax against float64, or against torch float32 if plain."""
        return self.rel if self.flax_err is None else self.flax_rel

    def margin(self, tol: float = TOL, k: float = K) -> float:
        """error / bound: <= 1 passes (a zero bound, ``--tol 0 --plain``: 0 if exact, else inf)."""
        bound = self.bound(tol, k)
        if bound == 0:
            return 0.0 if self.error() == 0 else float("inf")
        return self.error() / bound

    def ok(self, tol: float = TOL, k: float = K) -> bool:
        return self.error() <= self.bound(tol, k)

    def as_json(self, tol: float, k: float) -> dict:
        return {"what": self.what, "shape": list(self.shape), "scale": self.scale,
                "flax32_vs_torch32": self.max_abs, "mean_abs": self.mean_abs,
                "flax32_vs_float64": self.flax_err, "torch32_vs_float64": self.torch_err,
                "torch32_runs_vs_float64": None if self.torch_errs is None else list(self.torch_errs),
                "relative_error": self.error(), "bound": self.bound(tol, k),
                "floor": self.floor, "ok": self.ok(tol, k)}


@dataclasses.dataclass
class LayerDiff(Diff):
    """The output of one named module (one call of it), judged with :data:`LAYER_TOL` as the
    floor in place of the report's ``tol``."""
    module: str = ""  # torch module path ('' for the whole network)
    kind: str = ""  # torch class name
    call: int = 0  # which call of that module, for modules called more than once
    order: int = 0  # position in torch's completion order

    def bound(self, tol: float = TOL, k: float = K) -> float:
        if self.torch_err is None:  # plain: the report's tolerance
            return tol
        return super().bound(min(tol, LAYER_TOL), k)


@dataclasses.dataclass
class Report:
    name: str
    outputs: list[Diff]
    grads: list[Diff]
    seconds: dict[str, float]
    layers: list[LayerDiff] | None = None
    layers_skipped: list[str] = dataclasses.field(default_factory=list)
    tol: float = TOL
    k: float = K
    plain: bool = False
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)

    def worst(self) -> float:
        """Worst plain relative difference (Flax float32 against torch float32)."""
        return max([d.rel for d in self.outputs + self.grads] or [0.0])

    def _tk(self, tol, k):
        return self.tol if tol is None else tol, self.k if k is None else k

    def failures(self, tol: float | None = None, k: float | None = None) -> list[Diff]:
        """Outputs and gradients outside their bound, then (with layers) the first module."""
        tol, k = self._tk(tol, k)
        bad = [d for d in self.outputs + self.grads if not d.ok(tol, k)]
        first = self.first_departure(tol, k)
        return bad + ([first] if first is not None else [])

    def ok(self, tol: float | None = None, k: float | None = None) -> bool:
        """The verdict: every output and gradient within the yardstick (or the plain tolerance
        when the report was made with ``plain=True``) and, when layers were compared, every
        module output within its own (:class:`LayerDiff`)."""
        return not self.failures(tol, k)

    def worst_margin(self, tol: float | None = None, k: float | None = None) -> Diff | None:
        tol, k = self._tk(tol, k)
        return max(self.outputs + self.grads, key=lambda d: d.margin(tol, k), default=None)

    def first_departure(self, tol: float | None = None, k: float | None = None
                        ) -> LayerDiff | None:
        """The first block (in torch's order) whose output is outside its yardstick."""
        tol, k = self._tk(tol, k)
        for d in self.layers or []:
            if not d.ok(tol, k):
                return d
        return None

    def verdict(self) -> str:
        tol, k = self.tol, self.k
        n = f"{len(self.outputs)} output{'s' * (len(self.outputs) != 1)}" + (
            f" and {len(self.grads)} gradients" if self.grads else "")
        worst = self.worst_margin()
        where = "" if worst is None else (
            f"; tightest: {worst.what} at {worst.margin(tol, k):.2f} of its bound")
        if self.plain:
            crit = f"relative difference to torch float32 <= {tol:g}"
        else:
            crit = f"error against float64 <= max({tol:g}, {k:g} x torch float32's)"
        if self.ok():
            return f"PASS: {n}, {crit}{where}"
        bad = [d for d in self.failures() if not isinstance(d, LayerDiff)]
        layer = self.first_departure()
        parts = []
        if bad:
            first = bad[0]
            parts.append(f"{len(bad)} of {len(self.outputs) + len(self.grads)} tensors outside "
                         f"{crit}; first: {first.what} {first.error():.3e} > "
                         f"{first.bound(tol, k):.3e}")
        if layer is not None:
            parts.append(f"first module outside its yardstick: {layer.module or '<network>'} "
                         f"({layer.kind}) {layer.error():.3e} > {layer.bound(tol, k):.3e}")
        return "FAIL: " + "; ".join(parts)

    def format(self, top: int = 5) -> str:
        tol, k = self.tol, self.k
        lines = []
        if self.plain:
            lines.append(f"{'output':<28} {'shape':<20} {'max|diff|':>11} {'mean|diff|':>11} "
                         f"{'relative':>10}")
            for d in self.outputs:
                lines.append(f"{d.what:<28} {str(d.shape):<20} {d.max_abs:11.3e} {d.mean_abs:11.3e} "
                             f"{d.rel:10.3e}")
            if self.grads:
                lines.append(f"gradients: {len(self.grads)} tensors, worst {min(top, len(self.grads))}:")
                for d in sorted(self.grads, key=lambda d: -d.rel)[:top]:
                    lines.append(f"  {d.what:<52} {d.max_abs:11.3e} {d.rel:10.3e}")
        else:
            lines.append("errors against the torch reference in float64, relative to each tensor's "
                         "scale (max|diff| for f32 vs f32):")
            head = f"{'flax f32':>10} {'torch f32':>10} {'bound':>10} {'max|diff|':>10}"
            lines.append(f"{'output':<28} {'shape':<20} {head}  ok")
            for d in self.outputs:
                lines.append(f"{d.what:<28} {str(d.shape):<20} {self._cols(d)}")
            if self.grads:
                lines.append(f"gradients: {len(self.grads)} tensors, closest to their bound "
                             f"{min(top, len(self.grads))}:")
                lines.append(f"  {'':<50} {head}  ok")
                for d in sorted(self.grads, key=lambda d: -d.margin(tol, k))[:top]:
                    lines.append(f"  {d.what:<50} {self._cols(d)}")
        if self.layers is not None:
            lines.append(self.format_layers())
        return "\n".join(lines)

    def _cols(self, d: Diff) -> str:
        if d.flax_err is None:
            return f"{'':>10} {'':>10} {self.tol:10.3e} {d.max_abs:10.3e}  {'yes' if d.ok(self.tol) else 'NO'}"
        return (f"{d.flax_rel:10.3e} {d.torch_rel:10.3e} {d.bound(self.tol, self.k):10.3e} "
                f"{d.max_abs:10.3e}  {'yes' if d.ok(self.tol, self.k) else 'NO'}")

    def format_layers(self) -> str:
        first = self.first_departure()
        n = len(self.layers or [])
        head = (f"layers: {n} module outputs compared in torch's order"
                + (f" ({len(self.layers_skipped)} modules without a comparable Flax output)"
                   if self.layers_skipped else ""))
        if first is None:
            return head + "; none departs from the yardstick"
        call = f" (call {first.call + 1})" if first.call else ""
        tail = ""
        if first.flax_err is not None:
            tail = f", torch float32 {first.torch_rel:.3e}, bound {first.bound(self.tol, self.k):.3e}"
        return (f"{head}\nfirst departure: {first.module or '<network>'} ({first.kind}){call}, "
                f"output {first.shape}: relative error {first.error():.3e}{tail}")

    def as_json(self) -> dict:
        tol, k = self.tol, self.k
        first = self.first_departure()
        return {
            "name": self.name, "verdict": "pass" if self.ok() else "fail",
            "summary": self.verdict(),
            "criterion": {"mode": "plain" if self.plain else "float64 yardstick", "tol": tol,
                          "k": None if self.plain else k},
            "outputs": [d.as_json(tol, k) for d in self.outputs],
            "gradients": [d.as_json(tol, k) for d in self.grads],
            "layers": None if self.layers is None else {
                "first_departure": None if first is None else first.module,
                "compared": [dict(d.as_json(tol, k), module=d.module, kind=d.kind, call=d.call)
                             for d in self.layers],
                "not_compared": self.layers_skipped},
            "seconds": self.seconds, "environment": self.environment,
        }


def environment(jit: bool = False) -> dict[str, Any]:
    """Versions, platform and the lowering the Flax side ran on."""
    import flax
    import torch

    try:
        from importlib.metadata import version

        own = version("flaxrestore")
    except Exception:  # not installed as a distribution
        own = None
    backend = jax.default_backend()
    return {
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "jax": jax.__version__,
                     "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
                     "flax": flax.__version__, "torch": torch.__version__, "flaxrestore": own},
        "platform": {"jax_backend": backend, "devices": [str(d) for d in jax.devices()],
                     "machine": _platform.machine(), "system": _platform.system(),
                     "torch_device": "cpu"},
        "lowering": {"mode": lowering.mode(), "describe": lowering.describe(backend)},
        "flax_compiled": jit,
    }


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def _to_torch_input(a: np.ndarray, dtype=None):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None:
        t = t.to(dtype)
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t


def _nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _torch_tensors(out) -> list:
    """The tensors of a module's output (a tensor, or a tuple/list of them), in order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _torch_tensors(o)]
    return []


def _flat_torch_outputs(out) -> list[np.ndarray]:
    return [_nhwc(o.detach().numpy()) for o in _torch_tensors(out)]


def _flat_flax_outputs(out) -> list[jax.Array]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _diff(what, flax32, torch32, torch64=None, scale=None, *, output=True, cls=Diff,
          nudged=None, **extra) -> Diff:
    a, b = np.asarray(flax32, np.float64), np.asarray(torch32, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ, flax {a.shape} vs torch {b.shape}")
    ref = b if torch64 is None else np.asarray(torch64, np.float64)
    d = np.abs(a - b)
    if scale is None:
        m = float(np.abs(ref).max(initial=0.0))
        scale = max(1.0, m) if output else m
    flax_err = torch_err = errs = None
    if torch64 is not None:
        flax_err = float(np.abs(a - ref).max(initial=0.0))
        errs = (float(np.abs(b - ref).max(initial=0.0)),)
        for n in nudged or []:
            errs += (float(np.abs(np.asarray(n, np.float64) - ref).max(initial=0.0)),)
        torch_err = max(errs)
    return cls(what, a.shape, float(d.max(initial=0.0)), float(d.mean()) if d.size else 0.0,
               scale, flax_err, torch_err, errs, **extra)


def default_size(name: str) -> tuple[int, int]:
    """A small non-square size the model accepts; odd for models that take any size (DarkIR),
    so that their own internal padding is exercised too."""
    protocol = models.entry(name).protocol
    if protocol.any_size:
        return 13, 21
    m = protocol.multiple
    return 2 * m if m >= 8 else 16, 3 * m if m >= 8 else 24


def randomise_constants(module, seed: int = 0, scale: float = 0.3):
    """Gives every constant parameter of a torch module (norm weights of ones, zero-init biases
    and gammas, temperatures, PReLU slopes) random values around its own, in place: torch's
    default initialisation leaves them uniform, and a uniform tensor hides layout mistakes (a
    transposed or permuted vector of ones is still ones). Buffers are left alone."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _nudge(inputs: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """The inputs with the first (the image) moved one float32 step up or down per element, at
    random; the others (SNR-Aware's map, which the network thresholds) unchanged."""
    x = np.asarray(inputs[0], np.float32)
    up = np.random.default_rng(seed + 2).random(x.shape) < 0.5
    nudged = np.where(up, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf)))
    return [nudged.astype(np.float32)] + list(inputs[1:])


# ---- per-module outputs ----

class _Hooks:
    """Records the output of every named module of a torch network, per call, in completion
    order (a module's output is recorded when its forward returns, so children come first)."""

    def __init__(self, module):
        self.outputs: dict[str, list[list[np.ndarray]]] = {}
        self.kinds: dict[str, str] = {}
        self.order: list[tuple[str, int]] = []
        self._handles = []
        for name, sub in module.named_modules():
            self.kinds[name] = type(sub).__name__
            self._handles.append(sub.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, args, out):
            calls = self.outputs.setdefault(name, [])
            self.order.append((name, len(calls)))
            calls.append([_nhwc(t.detach().numpy().copy()) for t in _torch_tensors(out)])
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def _torch_name(root: nnx.Module, flax_path: Sequence) -> str | None:
    """The torch module path of the NNX submodule at ``flax_path`` (``nnx.Sequential``'s
    ``layers[i]`` is torch's child ``i``), or None if the path leaves the module tree."""
    parts, node, i = [], root, 0
    path = list(flax_path)
    while i < len(path):
        elem = path[i]
        if isinstance(node, nnx.Sequential) and elem == "layers" and i + 1 < len(path):
            elem = path[i + 1]
            node = node.layers[elem]
            i += 2
        else:
            try:
                node = node[elem] if isinstance(elem, int) else getattr(node, elem)
            except (AttributeError, IndexError, KeyError, TypeError):
                return None
            i += 1
        parts.append(str(elem))
    return ".".join(parts)


_RECORDING_CLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` hands its output to the module's recorder."""
    if cls not in _RECORDING_CLASSES:
        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            record = vars(self).get("_verify_record")
            if record is not None:
                record(out)
            return out

        _RECORDING_CLASSES[cls] = type(cls)(cls.__name__, (cls,), {"__call__": __call__})
    return _RECORDING_CLASSES[cls]


def _flax_module_outputs(root: nnx.Module, call) -> dict[str, list[list[np.ndarray] | None]]:
    """Runs ``call(root)`` op by op and returns {torch module path: [output of each call]} for
    every NNX submodule (the root included). ``root`` is modified: pass a throwaway copy.

    Each submodule's class is swapped for a subclass that records what ``__call__`` returns.
    Outputs computed inside a transformation (a ``jax.checkpoint`` or a ``platform_dependent``
    branch) are tracers, not values: such calls are recorded as None and not compared.
    (``nnx.capture(method_outputs=...)`` sows every method's output, those inside such branches
    too, and leaks their tracers; this records ``__call__`` only.)"""
    found: dict[str, list] = {}
    aliases: dict[int, list[str]] = {}
    modules: dict[int, nnx.Module] = {}
    for path, sub in nnx.iter_modules(root):
        name = _torch_name(root, path)
        if name is None:
            continue
        aliases.setdefault(id(sub), []).append(name)
        modules[id(sub)] = sub

    def recorder(names):
        def record(out):
            leaves = jax.tree.leaves(out)
            value = None if any(isinstance(x, jax.core.Tracer) for x in leaves) else [
                np.asarray(x) for x in leaves if hasattr(x, "shape")]
            for n in names:  # a shared module answers under each of its names
                found.setdefault(n, []).append(value)
        return record

    for key, sub in modules.items():
        object.__setattr__(sub, "__class__", _recording_class(type(sub)))
        object.__setattr__(sub, "_verify_record", recorder(aliases[key]))
    call(root)
    return found


def _torch_call(hooks: _Hooks, name: str, group: int, size: int) -> list[np.ndarray]:
    """Outputs of torch calls ``group*size .. group*size+size-1`` of a module, joined on the
    batch axis: the Flax port may run in one call on stacked inputs what torch runs call by call
    (MPRNet's patches)."""
    calls = hooks.outputs[name][group * size:(group + 1) * size]
    if size == 1:
        return calls[0]
    if any(len(c) != len(calls[0]) for c in calls):
        return []
    try:
        return [np.concatenate([c[j] for c in calls], axis=0) for j in range(len(calls[0]))]
    except ValueError:
        return []


def _compare_layers(t32: _Hooks, t64: _Hooks | None, t32b: list[_Hooks] | None,
                    flax_outs: dict) -> tuple[list[LayerDiff], list[str]]:
    """Each module's output in torch's completion order, against the Flax submodule's at the same
    path; a module torch calls n times and Flax n/r times is compared per group of r calls."""
    diffs, skipped = [], []
    seen_skip = set()

    def skip(name, why):
        if name not in seen_skip:
            seen_skip.add(name)
            skipped.append(f"{name or '<network>'} ({t32.kinds[name]}): {why}")

    for order, (name, call) in enumerate(t32.order):
        n_t, fcalls = len(t32.outputs[name]), flax_outs.get(name)
        if fcalls is None:
            skip(name, "no Flax module at this path")
            continue
        if not fcalls or n_t % len(fcalls):
            skip(name, f"called {n_t} times in torch, {len(fcalls)} in Flax")
            continue
        size = n_t // len(fcalls)
        if (call + 1) % size:
            continue  # compared once the group's last call is done
        group = call // size
        touts, fouts = _torch_call(t32, name, group, size), fcalls[group]
        if fouts is None:
            skip(name, "computed inside a transformation on the Flax side")
            continue
        if not touts or len(touts) != len(fouts) or any(
                t.shape != f.shape for t, f in zip(touts, fouts)):
            skip(name, "output shapes differ: torch " + str([t.shape for t in touts]) + ", flax "
                 + str([f.shape for f in fouts]))
            continue
        r64 = _torch_call(t64, name, group, size) if t64 is not None else [None] * len(touts)
        nb = ([[_torch_call(h, name, group, size)[j] for h in t32b] for j in range(len(touts))]
              if t32b else [None] * len(touts))
        for j, (f, t, r, n) in enumerate(zip(fouts, touts, r64, nb)):
            what = (name or "<network>") + (f"[{j}]" if len(touts) > 1 else "")
            diffs.append(_diff(what, f, t, r, output=False, cls=LayerDiff, nudged=n, module=name,
                               kind=t32.kinds[name], call=group, order=order))
    return diffs, skipped


# ---- the comparison ----

# compiled Flax programs, one per architecture (graph definition), kind and lowering: the
# weights, inputs and loss weights are arguments, so verifying several files of one model in a
# process (seeds, a bulk conversion) compiles once
_PROGRAMS: dict = {}


def _flax_program(graphdef, grads: bool, n_in: int, jit: bool):
    """The Flax forward, ``f(params, rest, *inputs) -> outputs``, or with ``grads`` the outputs
    and gradients of the scalar loss, ``f(loss_weights, params, rest, *inputs) -> ((d params,
    d inputs...), outputs)``; jitted with :func:`flaxrestore.lowering.compiler_options` when
    ``jit``, as the trainer and ``flaxrestore.restore`` compile."""
    if not jit:
        return _make_program(graphdef, grads, n_in)
    options = lowering.compiler_options()
    key = (graphdef, grads, n_in, lowering.mode(), jax.default_backend(),
           tuple(sorted((options or {}).items())))
    try:
        hash(key)
    except TypeError:  # an unhashable static attribute: compile for this call only
        return jax.jit(_make_program(graphdef, grads, n_in), compiler_options=options)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(_make_program(graphdef, grads, n_in), compiler_options=options)
    return _PROGRAMS[key]


def _make_program(graphdef, grads: bool, n_in: int):
    # the rest of the state (AECR-Net's running statistics) is an argument, not a constant:
    # a train-mode call updates it, which a jitted function may only do to its own inputs
    if not grads:
        return lambda p, r, *xs: _flat_flax_outputs(nnx.merge(graphdef, p, r)(*xs))

    def grads_of(weights, p, r, *xs):  # nnx.grad: a train-mode call may update r's statistics
        def loss_f(module, *xs):
            outs = _flat_flax_outputs(module(*xs))
            return sum(jnp.mean(o * w) for o, w in zip(outs, weights)), outs

        argnums = (0,) + tuple(range(1, 1 + n_in))
        return nnx.grad(loss_f, argnums=argnums, has_aux=True)(nnx.merge(graphdef, p, r), *xs)
    return grads_of



def compare(name: str, torch_module=None, flax_module=None, *, batch: int = 2,
            height: int | None = None, width: int | None = None, seed: int = 0,
            grads: bool = False, inputs: Sequence[np.ndarray] | None = None,
            jit: bool = False, plain: bool = False, layers: bool = False,
            tol: float = TOL, k: float = K, model_overrides: dict | None = None,
            **overrides) -> Report:
    """Runs both implementations of ``name`` on the same random inputs and reports the differences.

    Without modules, a torch reference is built with random weights and converted to Flax.
    Unless ``plain``, the torch reference also runs in float64 on the same weights and inputs and
    the report judges each tensor by ``max(tol, k x torch float32's error)`` against it
    (:meth:`Report.ok`); ``Report.worst()`` stays the plain float32-against-float32 figure.
    ``layers=True`` also compares every named module's output (:meth:`Report.first_departure`).
    ``model_overrides`` are config fields of the variant (as ``**overrides``, for fields whose
    names collide with this function's keywords: DarkIR's ``width``).
    ``jit=True`` compiles the Flax forward (and gradient) as the trainer and ``flaxrestore.restore``
    do, with :func:`flaxrestore.lowering.compiler_options`; otherwise it runs op by op.
    """
    import torch

    entry = models.entry(name)
    overrides = {**overrides, **(model_overrides or {})}
    seconds = {}
    if torch_module is None:
        torch.manual_seed(seed)
        torch_module = reference.build(name, **overrides)
    torch_module = torch_module.float()
    # the float64 twin and float32 copies for the nudged runs, copied before the float32 run (a
    # train-mode run updates AECR-Net's running statistics)
    torch64 = None if plain else copy.deepcopy(torch_module).double()
    torch32b = [] if plain else [copy.deepcopy(torch_module) for _ in range(NUDGES)]
    if flax_module is None:
        t0 = time.perf_counter()
        flax_module = convert.torch_to_flax(name, torch_module.state_dict(), **overrides)
        seconds["convert"] = time.perf_counter() - t0
    # the same mode on both sides (only AECR-Net's FastDeconv depends on it)
    flax_module.train() if torch_module.training else flax_module.eval()
    if inputs is None:
        h0, w0 = default_size(name)
        rng = np.random.default_rng(seed)
        cfg = models.get_config(name, **overrides)
        inputs = entry.cls.example_inputs(cfg, batch, height or h0, width or w0, rng)
    # the weights of the scalar loss: a fixed random projection of every output
    loss_weights = None

    def run_torch(module, dtype, xs=None):
        nonlocal loss_weights
        t_in = [_to_torch_input(a, dtype).requires_grad_(grads) for a in (xs or inputs)]
        hooks = _Hooks(module) if layers else None
        try:
            with torch.set_grad_enabled(grads):
                t_out = module(*t_in)
        finally:
            if hooks is not None:
                hooks.remove()
        outs = _flat_torch_outputs(t_out)
        pgrads = igrads = None
        if grads:
            if loss_weights is None:
                wrng = np.random.default_rng(seed + 1)
                loss_weights = [wrng.standard_normal(o.shape).astype(np.float32) for o in outs]
            t_list = _torch_tensors(t_out)
            loss = sum((o * _to_torch_input(w, dtype)).mean() for o, w in zip(t_list, loss_weights))
            module.zero_grad()
            loss.backward()
            pgrads = {kk: p.grad.numpy() for kk, p in module.named_parameters(remove_duplicate=False)
                      if p.grad is not None}
            igrads = [_nhwc(t.grad.numpy()) for t in t_in]
        return outs, pgrads, igrads, hooks

    environ = environment(jit)
    with jax.default_matmul_precision("highest"):
        t0 = time.perf_counter()
        t_outs, t_pgrads, t_igrads, t_hooks = run_torch(torch_module, torch.float32)
        seconds["torch"] = time.perf_counter() - t0
        r_outs = r_pgrads = r_igrads = r_hooks = None
        if torch64 is not None:
            t0 = time.perf_counter()
            r_outs, r_pgrads, r_igrads, r_hooks = run_torch(torch64, torch.float64)
            seconds["torch_float64"] = time.perf_counter() - t0
            # A single float32 run's error can be small by luck on a tensor whose value is a sum
            # of cancelling terms (a per-head temperature's gradient: 1e-5 relative on one run,
            # 5e-5 to 5e-4 with the image one float32 step away). Torch's own error is the
            # largest of that run's and NUDGES runs on the image nudged by one ulp per pixel:
            # how far a float32 computation of the original may land from float64.
            t0 = time.perf_counter()
            nudged = [run_torch(m, torch.float32, _nudge(inputs, seed + 10 * i))
                      for i, m in enumerate(torch32b)]
            seconds["torch_nudged"] = time.perf_counter() - t0
            n_outs, n_pgrads, n_igrads, n_hooks = (list(z) for z in zip(*nudged))
        else:
            n_outs = n_pgrads = n_igrads = n_hooks = None

        f_in = [jnp.asarray(a) for a in inputs]
        t0 = time.perf_counter()
        graphdef, f_params, f_rest = nnx.split(flax_module, nnx.Param, ...)
        program = _flax_program(graphdef, grads, len(f_in), jit)
        if not grads:
            f_outs = [np.asarray(o) for o in program(f_params, f_rest, *f_in)]
        else:  # the outputs come with the gradients: one program to compile, not two
            g, aux = program([jnp.asarray(w) for w in loss_weights], f_params, f_rest, *f_in)
            f_outs = [np.asarray(o) for o in aux]
        seconds["flax"] = time.perf_counter() - t0
        if len(f_outs) != len(t_outs):
            raise AssertionError(f"flax returns {len(f_outs)} outputs, torch {len(t_outs)}")
        out_diffs = [_diff(f"output[{i}]" if len(t_outs) > 1 else "output", f, t,
                           None if r_outs is None else r_outs[i],
                           nudged=None if n_outs is None else [n[i] for n in n_outs])
                     for i, (f, t) in enumerate(zip(f_outs, t_outs))]

        grad_diffs = []
        if grads:
            f_pgrads = convert.state_to_torch_layout(flax_module, g[0])
            for i, gf in enumerate(g[1:]):
                grad_diffs.append(_diff(f"d loss / d input[{i}]", gf, t_igrads[i],
                                        None if r_igrads is None else r_igrads[i], output=False,
                                        nudged=None if n_igrads is None else [n[i] for n in n_igrads]))
            for key, gt in t_pgrads.items():
                if key not in f_pgrads:
                    raise AssertionError(f"no flax gradient for {key}")
                grad_diffs.append(_diff(f"d loss / d {key}", f_pgrads[key], gt,
                                        None if r_pgrads is None else r_pgrads[key], output=False,
                                        nudged=None if n_pgrads is None else [n[key] for n in n_pgrads]))
            # the floor of every parameter gradient: GRAD_FLOOR x the model's largest entry
            largest = max((d.scale for d in grad_diffs if d.what.startswith("d loss / d ")
                           and "input[" not in d.what), default=0.0)
            for d in grad_diffs:
                if "input[" not in d.what:
                    d.floor = GRAD_FLOOR * largest

        layer_diffs = skipped = None
        if layers:
            t0 = time.perf_counter()
            # op by op, on a fresh module from the same state: the recording wrappers must not
            # touch the caller's module, and a jitted run returns no intermediate values
            flax_outs = _flax_module_outputs(nnx.merge(graphdef, f_params, f_rest),
                                             lambda m: m(*f_in))
            layer_diffs, skipped = _compare_layers(t_hooks, r_hooks, n_hooks, flax_outs)
            seconds["layers"] = time.perf_counter() - t0
    return Report(name, out_diffs, grad_diffs, seconds, layer_diffs, skipped or [], tol, k, plain,
                  environ)
