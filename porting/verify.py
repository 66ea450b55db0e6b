"""Side-by-side comparison of the torch reference and the Flax port.

Forward outputs are compared per output; gradients of a scalar loss are compared for the input and
for every parameter (reported per state_dict key, worst first). Float32; on GPU/TPU the comparison
runs with ``jax.default_matmul_precision('highest')``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers, models
from porting import convert, reference


@dataclasses.dataclass
class Diff:
    what: str
    shape: tuple
    max_abs: float
    mean_abs: float
    scale: float  # max(1, max |reference|) for outputs; max |reference| for gradients

    @property
    def rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


@dataclasses.dataclass
class Report:
    name: str
    outputs: list[Diff]
    grads: list[Diff]
    seconds: dict[str, float]

    def worst(self) -> float:
        return max([d.rel for d in self.outputs + self.grads] or [0.0])

    def ok(self, tol: float = 1e-4) -> bool:
        return self.worst() <= tol

    def format(self, top: int = 5) -> str:
        lines = [f"{'output':<28} {'shape':<22} {'max|diff|':>11} {'mean|diff|':>11} {'relative':>10}"]
        for d in self.outputs:
            lines.append(f"{d.what:<28} {str(d.shape):<22} {d.max_abs:11.3e} {d.mean_abs:11.3e} {d.rel:10.3e}")
        if self.grads:
            lines.append(f"gradients: {len(self.grads)} tensors, worst {min(top, len(self.grads))}:")
            for d in sorted(self.grads, key=lambda d: -d.rel)[:top]:
                lines.append(f"  {d.what:<52} {d.max_abs:11.3e} {d.rel:10.3e}")
        return "\n".join(lines)


def _to_torch_input(a: np.ndarray):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t


def _flat_torch_outputs(out) -> list[np.ndarray]:
    import torch

    if isinstance(out, torch.Tensor):
        out = [out]
    res = []
    for o in out:
        a = o.detach().numpy()
        res.append(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)
    return res


def _flat_flax_outputs(out) -> list[jax.Array]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _diff(what, a, b, scale=None) -> Diff:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ, flax {a.shape} vs torch {b.shape}")
    d = np.abs(a - b)
    if scale is None:
        scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    return Diff(what, a.shape, float(d.max(initial=0.0)), float(d.mean()) if d.size else 0.0, scale)


def default_size(name: str) -> tuple[int, int]:
    """A small non-square size the model accepts; odd for models that take any size (DarkIR),
    so that their own internal padding is exercised too."""
    m = getattr(models.entry(name).cls, "size_multiple", 8)
    if m == 1:
        return 13, 21
    return 2 * m if m >= 8 else 16, 3 * m if m >= 8 else 24


def compare(name: str, torch_module=None, flax_module=None, *, batch: int = 2,
            height: int | None = None, width: int | None = None, seed: int = 0,
            grads: bool = False, inputs: Sequence[np.ndarray] | None = None,
            jit: bool = False, **overrides) -> Report:
    """Runs both implementations of ``name`` on the same random inputs and reports the differences.

    Without modules, a torch reference is built with random weights and converted to Flax.
    ``jit=True`` compiles the Flax forward (and gradient) as the trainer and ``flaxrestore.restore``
    do, with :func:`flaxrestore.layers.compiler_options`; otherwise it runs op by op.
    """
    import torch

    entry = models.entry(name)
    seconds = {}
    if torch_module is None:
        torch.manual_seed(seed)
        torch_module = reference.build(name, **overrides)
    torch_module = torch_module.float()
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

    ctx = jax.default_matmul_precision("highest")
    with ctx:
        t_in = [_to_torch_input(a).requires_grad_(grads) for a in inputs]
        t0 = time.perf_counter()
        if grads:
            t_out = torch_module(*t_in)
        else:
            with torch.no_grad():
                t_out = torch_module(*t_in)
        seconds["torch"] = time.perf_counter() - t0
        t_outs = _flat_torch_outputs(t_out)

        f_in = [jnp.asarray(a) for a in inputs]
        t0 = time.perf_counter()
        graphdef, f_params, f_rest = nnx.split(flax_module, nnx.Param, ...)
        compile_options = layers.compiler_options() if jit else None

        def run(fn):
            return jax.jit(fn, compiler_options=compile_options) if jit else fn

        # the rest of the state (AECR-Net's running statistics) is an argument, not a constant:
        # a train-mode call updates it, which a jitted function may only do to its own inputs
        forward = run(lambda p, r, *xs: _flat_flax_outputs(nnx.merge(graphdef, p, r)(*xs)))
        f_outs = [np.asarray(o) for o in forward(f_params, f_rest, *f_in)]
        seconds["flax"] = time.perf_counter() - t0
        if len(f_outs) != len(t_outs):
            raise AssertionError(f"flax returns {len(f_outs)} outputs, torch {len(t_outs)}")
        out_diffs = [_diff(f"output[{i}]" if len(t_outs) > 1 else "output", f, t)
                     for i, (f, t) in enumerate(zip(f_outs, t_outs))]

        grad_diffs = []
        if grads:
            # a fixed random projection of every output makes a scalar loss
            rng = np.random.default_rng(seed + 1)
            weights = [rng.standard_normal(o.shape).astype(np.float32) for o in t_outs]
            t_list = t_out if isinstance(t_out, (list, tuple)) else [t_out]
            loss_t = sum((o * _to_torch_input(w)).mean() for o, w in zip(t_list, weights))
            torch_module.zero_grad()
            loss_t.backward()
            t_grads = {k: p.grad.numpy() for k, p in torch_module.named_parameters(remove_duplicate=False)
                       if p.grad is not None}

            def loss_f(module, *xs):
                outs = _flat_flax_outputs(module(*xs))
                return sum(jnp.mean(o * jnp.asarray(w)) for o, w in zip(outs, weights))

            argnums = (0,) + tuple(range(1, 1 + len(f_in)))

            def grads_of(p, r, *xs):  # nnx.grad: a train-mode call may update r's statistics
                return nnx.grad(loss_f, argnums=argnums)(nnx.merge(graphdef, p, r), *xs)

            g = run(grads_of)(f_params, f_rest, *f_in)
            f_pgrads = convert.state_to_torch_layout(flax_module, g[0])
            for i, (gf, tin) in enumerate(zip(g[1:], t_in)):
                gt = tin.grad.numpy()
                gt = gt.transpose(0, 2, 3, 1) if gt.ndim == 4 else gt
                grad_diffs.append(_diff(f"d loss / d input[{i}]", gf, gt,
                                        float(np.abs(gt).max(initial=0.0))))
            for k, gt in t_grads.items():
                if k not in f_pgrads:
                    raise AssertionError(f"no flax gradient for {k}")
                grad_diffs.append(_diff(f"d loss / d {k}", f_pgrads[k], gt,
                                        float(np.abs(gt).max(initial=0.0))))
    return Report(name, out_diffs, grad_diffs, seconds)
