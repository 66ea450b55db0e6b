"""Converter, checkpoint reading and the porting CLI, on Restormer."""

import os
import json
import pickle
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import porting
from flaxrestore import checkpoints, models
from porting import CheckpointError, ConversionError, convert, reference

SMALL = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
NAME = "restormer:motion_deblurring"


@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(0)
    return reference.build(NAME, **SMALL).state_dict()


def _flax_arrays(module):
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(checkpoints.weights_state(module))}


def test_round_trip_bit_exact(small_sd):
    module = porting.torch_to_flax(NAME, small_sd, **SMALL)
    back = porting.flax_to_torch(module)
    assert set(back) == set(small_sd)
    for k, v in small_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


FAMILY_SMALL = {
    "restormer:dual_pixel_defocus_deblurring": SMALL,
    "mprnet:deblurring": dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1),
    "darkir:m": dict(width=8, enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1),
                     middle_blk_num_enc=1, middle_blk_num_dec=1),
    "snr": dict(nf=8),
    "aecrnet": dict(ngf=8),
}


@pytest.mark.parametrize("name", sorted(FAMILY_SMALL))
def test_export_keeps_the_release_key_order(name):
    """flax_to_torch lists keys as the original's state_dict() does (so as the released files),
    not in the alphabetical order of NNX's attribute traversal."""
    torch.manual_seed(1)
    sd = reference.build(name, **FAMILY_SMALL[name]).state_dict()
    back = porting.flax_to_torch(porting.torch_to_flax(name, sd, **FAMILY_SMALL[name]))
    assert list(back) == list(sd)
    assert list(back) != sorted(back)  # the check above is not trivially alphabetical


def test_conv_layout(small_sd):
    module = porting.torch_to_flax(NAME, small_sd, **SMALL)
    w = small_sd["patch_embed.proj.weight"].numpy()  # (O, I, kh, kw)
    k = np.asarray(module.patch_embed.proj.kernel[...])  # (kh, kw, I, O)
    assert k.shape == (3, 3, 3, 8)
    assert k[1, 2, 0, 5] == w[5, 0, 1, 2]


def test_orbax_and_safetensors_bit_exact(tmp_path, small_sd):
    module = porting.torch_to_flax(NAME, small_sd, **SMALL)
    ref = _flax_arrays(module)
    checkpoints.save_model(tmp_path / "m", NAME, module, SMALL)
    for loaded in (checkpoints.load_model(tmp_path / "m"),
                   checkpoints.load_safetensors(
                       checkpoints.save_safetensors(tmp_path / "m.safetensors", NAME, module, SMALL))):
        got = _flax_arrays(loaded)
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
    # a directory that holds a model is never written over
    before = (tmp_path / "m" / "model.json").read_text()
    with pytest.raises(FileExistsError, match="already holds"):
        checkpoints.save_model(tmp_path / "m", NAME, module, {})
    assert (tmp_path / "m" / "model.json").read_text() == before


@pytest.mark.parametrize("container", ["params", "params_ema", "state_dict", "model_state_dict", "model", None])
def test_containers_and_module_prefix(tmp_path, small_sd, container):
    sd = {("module." + k if container == "state_dict" else k): v for k, v in small_sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({container: sd, "epoch": 3} if container else sd, path)
    module = porting.load_torch_checkpoint(NAME, path, **SMALL)
    back = porting.flax_to_torch(module)
    assert all(torch.equal(back[k], small_sd[k]) for k in small_sd)


def test_safetensors_input(tmp_path, small_sd):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in small_sd.items()}, tmp_path / "w.safetensors")
    module = porting.load_torch_checkpoint(NAME, tmp_path / "w.safetensors", **SMALL)
    assert torch.equal(porting.flax_to_torch(module)["output.weight"], small_sd["output.weight"])


# ---- bad input: one clear error each, nothing half-loaded ----

def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        porting.load_torch_checkpoint(NAME, p)
    with pytest.raises(FileNotFoundError):
        porting.load_torch_checkpoint(NAME, tmp_path / "absent.pth")


def test_truncated_file(tmp_path, small_sd):
    p = tmp_path / "full.pth"
    torch.save({"params": small_sd}, p)
    data = p.read_bytes()
    t = tmp_path / "truncated.pth"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        porting.load_torch_checkpoint(NAME, t, **SMALL)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    p = tmp_path / "evil.pth"
    torch.save({"params": {"x": torch.zeros(1)}, "payload": _Exploit()}, p)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        porting.load_torch_checkpoint(NAME, p)
    assert not marker.exists(), "the payload ran"
    # a plain pickle (not a torch zip) with a payload is refused as well
    q = tmp_path / "evil_legacy.pth"
    with open(q, "wb") as f:
        pickle.dump({"params": _Exploit()}, f)
    with pytest.raises(CheckpointError):
        porting.load_torch_checkpoint(NAME, q)
    assert not marker.exists(), "the payload ran"


def test_missing_unexpected_and_mismatched_keys(small_sd):
    sd = dict(small_sd)
    del sd["output.weight"]
    del sd["latent.0.attn.temperature"]
    sd["extra.weight"] = torch.zeros(3)
    sd["patch_embed.proj.weight"] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(ConversionError) as e:
        porting.torch_to_flax(NAME, sd, **SMALL)
    msg = str(e.value)
    assert "2 missing key(s), 1 unexpected key(s), 1 shape mismatch(es)" in msg
    for k in ("output.weight", "latent.0.attn.temperature", "extra.weight",
              "patch_embed.proj.weight: (8, 3, 5, 5) vs (8, 3, 3, 3)"):
        assert k in msg


def test_nothing_half_loaded(small_sd):
    module = models.create(NAME, rngs=nnx.Rngs(5), **SMALL)
    before = _flax_arrays(module)
    sd = dict(small_sd)
    del sd["output.weight"]
    with pytest.raises(ConversionError):
        convert.load_state_dict(module, sd)
    after = _flax_arrays(module)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_partial_load_only_on_request(small_sd):
    sd = dict(small_sd)
    del sd["output.weight"]
    module = porting.torch_to_flax(NAME, sd, strict=False, **SMALL)
    back = porting.flax_to_torch(module)
    assert torch.equal(back["patch_embed.proj.weight"], small_sd["patch_embed.proj.weight"])


def test_wrong_variant_name_suggests_the_right_one():
    torch.manual_seed(0)
    sd = reference.build("restormer:real_denoising").state_dict()
    with pytest.raises(ConversionError) as e:
        porting.torch_to_flax("restormer:motion_deblurring", sd)
    msg = str(e.value)
    assert "unexpected" in msg or "missing" in msg
    assert "restormer:real_denoising" in msg and "restormer:gaussian_color_denoising" in msg
    gray = reference.build("restormer:gaussian_gray_denoising").state_dict()
    with pytest.raises(ConversionError, match="shape mismatch[\\s\\S]*gaussian_gray_denoising"):
        porting.torch_to_flax("restormer:real_denoising", gray)


def test_weights_of_another_family_are_named():
    """MPRNet weights loaded under a Restormer name: the error says which family they are."""
    torch.manual_seed(0)
    sd = reference.build("mprnet:deraining", **FAMILY_SMALL["mprnet:deblurring"]).state_dict()
    with pytest.raises(ConversionError) as e:
        porting.torch_to_flax(NAME, sd, **SMALL)
    msg = str(e.value)
    assert "look like a mprnet model" in msg and "mprnet:deraining" in msg
    assert convert.guess_family({"patch_embed.proj.weight": 0}) is None  # too little to tell
    assert convert.guess_family({k: 0 for k in sd}) == "mprnet"


# ---- command line, end to end on a real-size variant ----

# Runs several `python -m porting` commands in one fresh process (one import of torch and jax
# instead of one per command), each through the module's command-line entry point; prints
# one JSON line per command: exit status, stdout, stderr.
_CLI_SCRIPT = r"""
import contextlib, io, json, runpy, sys
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["porting", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("porting", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    print("RESULT " + json.dumps({"returncode": code, "stdout": out.getvalue(),
                                  "stderr": err.getvalue()}))
"""


def _run_all(*commands):
    """`python -m porting ARGS` for each command, in order, in one process."""
    proc = subprocess.run([sys.executable, "-c", _CLI_SCRIPT,
                           json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == len(commands), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [types.SimpleNamespace(**r) for r in results]


def test_cli_convert_export_verify(tmp_path):
    name = "restormer:gaussian_gray_denoising"
    torch.manual_seed(3)
    sd = reference.build(name).state_dict()
    torch.save({"params": sd}, tmp_path / "release.pth")

    convert_r, export_r, verify_r, wrong_r = _run_all(
        ["convert", name, tmp_path / "release.pth", tmp_path / "flax", "--safetensors"],
        ["export", name, tmp_path / "flax", tmp_path / "back.pth"],
        ["verify", name, tmp_path / "back.pth", "--jit", "--batch", "1", "--height", "8", "--width",
         "16"],
        ["convert", "restormer:motion_deblurring", tmp_path / "release.pth", tmp_path / "other"])

    assert convert_r.returncode == 0, convert_r.stderr
    assert (tmp_path / "flax" / "model.safetensors").exists()

    assert export_r.returncode == 0, export_r.stderr
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == ["params"]
    assert set(back["params"]) == set(sd)
    assert all(torch.equal(back["params"][k], sd[k]) for k in sd)

    assert verify_r.returncode == 0, verify_r.stdout + verify_r.stderr
    assert "PASS" in verify_r.stdout and "max|diff|" in verify_r.stdout
    # a failing verdict's exit status 1: tests/test_verify.py (corrupted directories, --against)

    assert wrong_r.returncode == 2
    assert "does not match" in wrong_r.stderr and "gaussian_gray_denoising" in wrong_r.stderr
    assert not (tmp_path / "other").exists()


def test_cli_help(capsys):
    from porting.__main__ import main

    for cmd in ("convert", "export", "verify", "demo"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "usage" in capsys.readouterr().out
