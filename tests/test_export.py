"""flaxrestore.export and `python -m flaxrestore export`: ONNX and StableHLO files of each family.

Every family at reduced width is exported to both formats at a size that is not a multiple of
its padding multiple, so the protocol's padding, SNR-Aware's in-graph SNR map and MPRNet's image
output are all inside the file. Expected values come from ``flaxrestore.restore`` (host-side
numpy padding and SNR map, checked against the torch references in test_restore.py), on an
image other than the one export checks itself with; the files are run by their own runtimes
here (onnxruntime, jax.export.deserialize). A wrong padding mode is shown to fail the check.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

import flaxrestore  # noqa: E402
from flaxrestore import checkpoints, models  # noqa: E402
from flaxrestore import __main__ as cli  # noqa: E402
from flaxrestore import export as fexport  # noqa: E402
from flaxrestore.restore import Protocol, Restorer  # noqa: E402

# reduced widths, and an image size off every family's multiple (H, W >= SNR-Aware's 16 for
# its dynamic export's reflect padding)
SMALL = {
    "restormer": ("restormer:motion_deblurring",
                  dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)),
    "mprnet": ("mprnet:deblurring",
               dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1)),
    "darkir": ("darkir:m", dict(width=8, enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1),
                                middle_blk_num_enc=1, middle_blk_num_dec=1)),
    "snr": ("snr", dict(nf=8)),
    "aecrnet": ("aecrnet", dict(ngf=8)),
}
H, W = 19, 22
_NETS, _REFS = {}, {}


def small(family):
    if family not in _NETS:
        name, overrides = SMALL[family]
        _NETS[family] = models.create(name, rngs=nnx.Rngs(0), **overrides)
    return _NETS[family]


def expected(family):
    """flaxrestore.restore of the family's small model, remembered per image: every export
    enters the accelerator lowering mode, which clears jax's caches, so without this each one
    would compile the reference again for the same check images."""
    if family not in _REFS:
        restorer, memo = Restorer(small(family)), {}

        def ref(x):
            key = (x.shape, x.tobytes())
            if key not in memo:
                memo[key] = restorer(x)
            return memo[key]

        _REFS[family] = ref
    return _REFS[family]


def check_image(shape):
    """The image export checks with (its default seed)."""
    return np.random.default_rng(0).random(shape, dtype=np.float32)


def run_file(path, x):
    """The file's output, by its own runtime."""
    if path.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        return session.run(None, {"image": x})[0]
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    assert set(re.findall(r"custom_call @(\w+)", exported.mlir_module())) <= {"shape_assertion"}
    assert exported.platforms == ("cpu", "cuda", "tpu")
    return np.asarray(exported.call(x))


def assert_close(y, ref, tol=1e-4):
    assert y.shape == ref.shape
    rel = np.max(np.abs(y - ref)) / np.max(np.abs(ref))
    assert rel <= tol, rel


def test_dynamic_sizes(tmp_path):
    """SNR-Aware to ONNX and AECR-Net to StableHLO with symbolic batch, height and width: one
    file restores images of several sizes (the check ran two; here a third).

    First in this file: after other ONNX conversions in the same process, jax2onnx 0.17.1
    fails on SNR-Aware's dynamic gathers ("Symbolic dimension 'H' used in a context that
    requires a constant" in its gather lowering); in a fresh process, as the command line runs
    it, the conversion succeeds."""
    for family, fmt in (("snr", "onnx"), ("aecrnet", "stablehlo")):
        path = str(tmp_path / f"{family}.{fmt}")
        report = fexport.export(small(family), path, format=fmt, dynamic=True,
                                reference=expected(family))
        assert report.input_shape == ("B", "H", "W", 3) and len(report.checks) == 2
        x = np.random.default_rng(3).random((3, 21, 17, 3), dtype=np.float32)
        assert_close(run_file(path, x), expected(family)(x))


@pytest.mark.parametrize("family", sorted(SMALL))
def test_family_exports_to_both_formats(family, tmp_path):
    """Both files of each family, checked by export; the ONNX file is run here again on another
    image (the StableHLO file's second compile is left to test_dynamic_sizes)."""
    ref = expected(family)
    x = np.random.default_rng(7).random((1, H, W, 3), dtype=np.float32)
    want, _ = ref(x), ref(check_image((1, H, W, 3)))  # one compile: same shape, no mode switch
    for fmt, suffix in (("onnx", ".onnx"), ("stablehlo", ".stablehlo")):
        path = str(tmp_path / f"{family}{suffix}")
        report = flaxrestore.export(small(family), path, format=fmt, height=H, width=W,
                                    reference=ref)
        assert report.relative <= 1e-4 and os.path.getsize(path) == report.size_bytes
        assert report.input_shape == (1, H, W, 3) and report.format == fmt
        if fmt == "onnx":
            assert_close(run_file(path, x), want)


def test_protocol_mistakes_fail_the_check(tmp_path, monkeypatch):
    """Protocol mistakes change the numbers: zero padding instead of reflect padding, or
    SNR-Aware without its SNR map (a map of ones), and the check refuses the file and removes
    it."""
    original = fexport.pad_to_multiple
    with monkeypatch.context() as m:
        m.setattr(fexport, "pad_to_multiple", lambda a, mult, mode: original(a, mult, "zeros"))
        path = tmp_path / "bad.stablehlo"
        with pytest.raises(fexport.ExportError, match="check failed.*relative"):
            fexport.export(small("aecrnet"), path, height=H, width=W, reference=expected("aecrnet"))
        assert not path.exists()
    no_map = Protocol(16, "reflect", extra_inputs=lambda x: (jnp.ones(x.shape[:3] + (1,)),))
    path = tmp_path / "snr.stablehlo"
    with pytest.raises(fexport.ExportError, match="check failed.*relative"):
        fexport.export(small("snr"), path, height=H, width=W, family="snr", protocol=no_map,
                       reference=expected("snr"))
    assert not path.exists()


def test_blocking_messages(tmp_path):
    """What cannot be exported is refused before anything is written, naming the operation,
    the model line and what to do instead."""
    # jax2onnx's jnp.arange with a symbolic length (AECR-Net's deformable conv)
    with pytest.raises(fexport.ExportError) as e:
        fexport.export(small("aecrnet"), tmp_path / "a.onnx", dynamic=True)
    msg = str(e.value)
    assert "layers.py" in msg and "deform_conv2d" in msg and "jnp.arange(ho)" in msg
    assert "fixed size" in msg and "stablehlo" in msg
    # MPRNet's bilinear resize needs concrete sizes in either format
    with pytest.raises(fexport.ExportError, match=r"(?s)dynamic height/width.*resize_bilinear.*"
                                                  r"fixed size"):
        fexport.export(small("mprnet"), tmp_path / "m.stablehlo", dynamic=True)
    with pytest.raises(fexport.ExportError, match="Einsum.*no bfloat16.*float16.*stablehlo"):
        fexport.export(small("restormer"), tmp_path / "r.onnx", height=H, width=W,
                       dtype="bfloat16")
    assert not list(tmp_path.iterdir())


def _double(x):
    return 2.0 * x


class Composite(nnx.Module):
    """A toy network with an operation jax2onnx has no conversion for (a StableHLO composite)."""

    protocol = Protocol(4, "reflect", clamp=False)

    def __init__(self):
        self.scale = nnx.Param(jnp.ones((3,)))

    def __call__(self, x):
        return jax.lax.composite(_double, name="toy.double")(x) * self.scale[...]


def test_unconvertible_operation_is_named(tmp_path):
    with pytest.raises(fexport.ExportError) as e:
        fexport.export(Composite(), tmp_path / "h.onnx", height=8, width=8)
    msg = str(e.value)
    assert "no ONNX conversion for 'composite' at" in msg and "test_export.py" in msg
    assert "format='stablehlo'" in msg and not list(tmp_path.iterdir())


def test_cli_float16(tmp_path, capsys):
    """The command on a Flax model directory, in float16 (the file's output stays float32)."""
    model_dir = tmp_path / "model"
    checkpoints.save_model(model_dir, "aecrnet", small("aecrnet"), overrides=SMALL["aecrnet"][1])
    out = tmp_path / "a.onnx"
    argv = ["export", "aecrnet", "--weights", str(model_dir), "--format", "onnx",
            "--out", str(out), "--dtype", "float16", "--height", "12", "--width", "10",
            "--batch", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "2x12x10x3" in printed and "float16" in printed
    x = np.random.default_rng(1).random((2, 12, 10, 3), dtype=np.float32)
    y = run_file(str(out), x)
    assert y.dtype == np.float32
    assert_close(y, expected("aecrnet")(x), tol=fexport.TOLERANCE["float16"])
    assert np.max(np.abs(y - expected("aecrnet")(x))) > 1e-6  # it did compute in float16
    assert cli.main(argv[:-4] + ["--dynamic", "--height", "12"]) == 2
    assert cli.main(argv[:-6] + []) == 2  # no size
    assert "--height H --width W, or --dynamic" in capsys.readouterr().err


def test_import_is_lazy():
    code = ("import sys, flaxrestore; flaxrestore.models.names(); "
            "assert callable(flaxrestore.restore); "
            "bad = [m for m in ('onnx', 'jax2onnx', 'onnxruntime', 'flaxrestore.export') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
