"""Repeated calls of a jitted forward with the same shapes reuse the compiled program: no
retracing and no new XLA compile (a small-width model of every family)."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.monitoring
import numpy as np
import pytest
from flax import nnx

from flaxrestore import lowering, models

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"

SMALL = {
    "restormer:motion_deblurring": dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1),
    "mprnet:deblurring": dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1),
    "darkir:m": dict(width=4, enc_blk_nums=(1,), dec_blk_nums=(1,), middle_blk_num_enc=1,
                     middle_blk_num_dec=1),
    "snr": dict(nf=8),
    "aecrnet": dict(ngf=8),
}

_compiles = [0]
_listening = [False]


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE:
        _compiles[0] += 1


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compiles (jax.monitoring events) inside the block."""
    if not _listening[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening[0] = True
    start = _compiles[0]
    box = {}
    try:
        yield box
    finally:
        box["n"] = _compiles[0] - start


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_does_not_recompile(name):
    module = models.create(name, rngs=nnx.Rngs(0), **SMALL[name])
    module.eval()
    graph, state = nnx.split(module)
    traces = [0]

    # compiled as the trainer, benchmarks and restore compile (lowering.compiler_options)
    @functools.partial(jax.jit, compiler_options=lowering.compiler_options())
    def forward(state, *xs):
        traces[0] += 1  # runs only while tracing
        return nnx.merge(graph, state)(*xs)

    entry, cfg = models.entry(name), models.get_config(name, **SMALL[name])
    rng = np.random.default_rng(0)

    def inputs(size):
        return entry.cls.example_inputs(cfg, 1, size, size, rng)

    jax.block_until_ready(forward(state, *inputs(16)))  # the one compile of this shape
    assert traces[0] == 1
    with count_compiles() as same:
        for _ in range(3):  # fresh arrays of the same shape and dtype, new values
            jax.block_until_ready(forward(state, *inputs(16)))
    assert same["n"] == 0 and traces[0] == 1, (same, traces)
    assert forward._cache_size() == 1



def test_compile_counter_sees_compiles():
    """The listener does count compiles (so the zero above is a real zero): a new shape of a
    jitted function compiles once, the same shape again does not."""
    f = jax.jit(lambda x: x * 2 + 1)
    with count_compiles() as first:
        f(np.zeros((3, 5), np.float32)).block_until_ready()
    with count_compiles() as again:
        f(np.ones((3, 5), np.float32)).block_until_ready()
    assert first["n"] == 1 and again["n"] == 0, (first, again)
