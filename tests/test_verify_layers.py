"""`verify --layers` judges every module's output (porting.verify.LAYER_TOL, K x torch float32's
own error) and names the first one outside its yardstick: a normalisation-epsilon mistake in one
block of a release-width Restormer (1e-5 -> 1e-6, Flax side only) leaves the network's output
far inside the end-to-end bound (1e-4) and fails the layer verdict at that block; the unmutated
port passes the same check."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from porting import convert, reference, verify  # noqa: E402

NAME = "restormer:motion_deblurring"  # release widths: dim 48, blocks (4, 6, 6, 8), 4 refinement


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = reference.build(NAME)
    verify.randomise_constants(tm, 0)
    return tm, tm.state_dict()


def _norms(fm):
    return [(path, m) for path, m in nnx.iter_graph(fm)
            if type(m).__name__ == "ChannelLayerNorm" and hasattr(m, "eps")]


def test_a_correct_port_passes_the_layer_verdict(pair):
    tm, sd = pair
    rep = verify.compare(NAME, tm, convert.torch_to_flax(NAME, sd), height=16, width=16,
                         layers=True)
    assert rep.layers and rep.first_departure() is None, rep.format_layers()
    assert rep.ok(), rep.verdict()


def test_one_blocks_norm_epsilon_fails_the_layer_verdict_and_is_named(pair):
    tm, sd = pair
    fm = convert.torch_to_flax(NAME, sd)
    (norm,) = [m for path, m in _norms(fm) if path[:4] == ("encoder_level2", "layers", 2, "norm1")]
    norm.eps = norm.eps / 10
    rep = verify.compare(NAME, tm, fm, height=16, width=16, layers=True)
    out = rep.outputs[0]
    assert out.ok(rep.tol, rep.k)  # end to end, the mistake hides in float32 noise ...
    first = rep.first_departure()
    print(f"output {out.error():.2e} (bound {out.bound(rep.tol, rep.k):.2e}); "
          f"{rep.format_layers()}")
    assert first is not None and first.module == "encoder_level2.2.norm1", first
    assert not rep.ok() and "encoder_level2.2.norm1" in rep.verdict()  # ... not here
