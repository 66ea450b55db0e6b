"""`python -m train plan`: the trainer's step compiled for a TPU slice by libtpu's deviceless
compiler (the ``tpu`` extra, which ``make test`` installs), no TPU attached.

The one real compile here is the demo recipe that compiles fastest for a TPU (SNR-Aware's, ~20 s
here; AECR-Net's took ~120 s) at one 16x16 image per chip: a full-width network takes minutes.
Its CPU programs hold native kernels (windows, narrow convs), so a leak would show; the leak test
below lowers AECR-Net's step, whose CPU path has native kernels of three kinds. docs/tpu.md holds
the full-size plans (``tools/tpu_table.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from train import plan, recipe as recipe_lib
from train.__main__ import main

DEMO = ["plan", "--config", "snr_demo", "--topology", "v5e:2x2", "--batch", "1",
        "--patch", "16"]
# AECR-Net's CPU path has native kernels of three kinds (the leak test lowers it, compiles nothing)
LEAKY = ["plan", "--config", "aecrnet_demo", "--topology", "v5e:2x2", "--batch", "1",
         "--patch", "16"]


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| float") or line.startswith("| bfloat")]


@pytest.fixture(scope="module")
def compiled_demo(tmp_path_factory):
    """The demo step planned once through the command line (stdout, stderr, cache file)."""
    cache = tmp_path_factory.mktemp("plan") / "plan.jsonl"
    proc = subprocess.run([sys.executable, "-m", "train", *DEMO, "--cache", str(cache)],
                          capture_output=True, text=True, timeout=1200)
    return proc, cache


def test_demo_step_compiles_for_a_tpu_slice(compiled_demo):
    proc, cache = compiled_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiling snr_demo" in proc.stderr
    assert "4 x TPU v5e" in proc.stdout and "16.00 GiB HBM" in proc.stdout
    (row,) = _rows(proc.stdout)
    dtype, _, patch, batch, args_gib, temp_gib, needed_gib, hbm, fits = row[:9]
    assert (dtype, patch, batch, fits) == ("float32", "16", "1", "yes")
    assert float(hbm) == 16.0 and 0 < float(needed_gib) < float(hbm)
    (rec,) = [json.loads(line)["result"] for line in cache.read_text().splitlines()]
    assert rec["fits"] and rec["chip"] == "v5e" and rec["flops"] > 0 and rec["bytes_accessed"] > 0
    # the per-chip arguments hold the replicated parameters and Adam's two moments (float32),
    # counted here from the recipe's model, and the chip's shard of the batch
    recipe = recipe_lib.load("snr_demo")
    from train import step as step_lib

    model = step_lib.build_model(recipe)
    import jax

    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(model.params))
    # (the TPU lays small tensors out in padded tiles: SNR's three copies measured 3.43 x 4 x n,
    # so a fourth copy, an EMA or a replicated batch, would pass 4 x)
    assert rec["argument_bytes"] >= 3 * 4 * n_params
    assert rec["argument_bytes"] < 4 * 4 * n_params
    assert rec["needed_bytes"] == (rec["argument_bytes"] + rec["output_bytes"] + rec["temp_bytes"]
                                   + rec["code_bytes"])
    # one image of 16x16 through a conv net: at least 2 x (MACs of its first 3x3 conv) per pixel
    assert rec["flops"] > 2 * 16 * 16 * 9 * 3 * 8


def test_second_plan_comes_from_the_cache(compiled_demo, capsys):
    proc, cache = compiled_demo
    assert main([*DEMO, "--cache", str(cache)]) == 0
    again = capsys.readouterr()
    assert "compiling" not in again.err
    assert _rows(again.out) == _rows(proc.stdout)


def test_cache_key_separates_dtype_stage_and_topology():
    recipe = recipe_lib.load("aecrnet_demo")
    sl = plan.Slice("v5e:2x2", [None] * 4, plan.CHIPS["TPU v5 lite"], 4)
    p = plan.Planner(sl, plan.Cache(None))
    base = p.key(recipe, 16, 1)
    assert base == p.key(recipe_lib.load("aecrnet_demo"), 16, 1)
    assert base != p.key(dataclasses.replace(recipe, dtype="bfloat16"), 16, 1)
    assert base != p.key(recipe, 32, 1) and base != p.key(recipe, 16, 2)
    other = plan.Planner(dataclasses.replace(sl, name="v5e:2x4"), plan.Cache(None))
    assert base != other.key(recipe, 16, 1)


def test_cpu_kernels_leaking_into_a_tpu_program_fail_the_plan(monkeypatch, capsys):
    """The seam chosen by the host process (the bug this plan guards against): the lowering for
    the TPU then carries the CPU kernels, and the plan refuses it, naming them."""
    from flaxrestore import lowering

    monkeypatch.setattr(lowering, "per_platform", lambda cpu, default: cpu())
    assert main([*LEAKY, "--cache", "none"]) == 2
    err = capsys.readouterr().err
    assert "CPU kernels in the TPU program" in err and "flaxrestore_bilinear_sample" in err


def test_without_libtpu_the_error_names_the_tpu_extra():
    code = ("import sys; sys.modules['libtpu'] = None\n"
            "from train.__main__ import main\n"
            f"sys.exit(main({DEMO!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "libtpu" in proc.stderr and "'.[tpu]'" in proc.stderr


@pytest.mark.parametrize("name,says", [("v5e:3x3", "not divisible"), ("v9z:2x2", "v9z"),
                                       ("bogus", "GENERATION:AxB")])
def test_unknown_topologies_are_refused_clearly(name, says, capsys):
    assert main(["plan", "--config", "aecrnet_demo", "--topology", name, "--cache", "none"]) == 2
    err = capsys.readouterr().err
    assert says in err and "v5e:2x4" in err


def test_topology_devices_and_chip_figures():
    sl = plan.topology("v5e:2x4")
    assert (sl.chips, len(sl.devices), sl.chip.generation) == (8, 8, "v5e")
    assert sl.chip.hbm_bytes == 16 * plan.GiB
    v4 = plan.topology("v4:2x2x1")  # v4: two devices (TensorCores) per chip here
    assert v4.chips == 4 and v4.devices_per_chip == len(v4.devices) // 4


def test_stages_follow_the_recipe_per_chip():
    r = recipe_lib.load("restormer_motion_deblurring")
    stages = plan.stages_of(r, 8, None, None)
    # the paper's per-GPU batches on 8 GPUs are the per-chip batches on 8 chips
    assert [(p, b) for _, _, p, b in stages] == [(128, 8), (160, 5), (192, 4), (256, 2), (320, 1),
                                                 (384, 1)]
    assert [(f, l) for f, l, _, _ in stages][:2] == [(1, 92_000), (92_001, 156_000)]
    assert stages[-1][1] == r.total_steps
    with pytest.raises(plan.PlanError, match="does not split over 16"):
        plan.stages_of(r, 16, None, None)  # global batch 40 / 16
    assert plan.stages_of(r, 16, 2, None) == [(1, r.total_steps, 128, 2)]
    # consecutive stages with the same (patch, per-chip batch) are one row
    merged = dataclasses.replace(r, stages=(recipe_lib.Stage(10, 64, 8), recipe_lib.Stage(20, 64, 8),
                                            recipe_lib.Stage(30, 96, 8)))
    assert plan.stages_of(merged, 8, None, None) == [(1, 20, 64, 1), (21, 30, 96, 1)]


def test_roofline_is_the_slower_of_compute_and_memory():
    r = plan.Result("x", "v5e:2x4", "v5e", "float32", False, 128, 8, True,
                    flops=197e12 * 0.5, bytes_accessed=819e9 * 0.25)
    assert r.roofline_seconds() == pytest.approx(0.5) and r.bound() == "compute"
    r.bytes_accessed = 819e9 * 2
    assert r.roofline_seconds() == pytest.approx(2.0) and r.bound() == "memory"
    rows = [(1, 10, r), (11, 30, dataclasses.replace(r, bytes_accessed=819e9 * 1))]
    assert plan.schedule_seconds(rows) == pytest.approx(10 * 2.0 + 20 * 1.0)
    assert plan.schedule_seconds(rows + [(31, 40, dataclasses.replace(r, fits=False))]) is None


def test_the_compilers_out_of_memory_message_is_read():
    # as libtpu 0.0.42.1 words it (an AECR-Net demo step at 3000 x 64x64 per v5e chip)
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (27.48G) exceeds available HBM (15.75G).")
    assert plan._oom_sizes(msg) == (int(27.48 * 1024 ** 3), int(15.75 * 1024 ** 3))
    assert plan._oom_sizes("INTERNAL: something else") is None


def test_a_cached_plan_is_recompiled_after_a_model_change(monkeypatch, tmp_path):
    """The cache is checked by the lowered program: a change to a model file (here SNR-Aware's
    output conv made to add 0.5) recompiles; an unchanged program is a hit. Compiles are
    counted, not run (the real compile is the fixture's above)."""
    import jax

    from flaxrestore.models import snr
    from train.plan import cache as cache_lib

    compiled = []

    def fake_compile(recipe, sl, lowered, program, patch, batch, mem_fraction):
        compiled.append(program)
        return plan.Result(recipe.name, sl.name, sl.chip.generation, recipe.dtype, False, patch,
                           batch, True, program=program)

    monkeypatch.setattr(cache_lib, "compile_lowered", fake_compile)
    recipe = recipe_lib.load("snr_demo")
    sl = plan.topology("v5e:2x2")
    planner = plan.Planner(sl, plan.Cache(str(tmp_path / "plans.jsonl")))
    first = planner.plan(recipe, 16, 1)
    assert planner.plan(recipe, 16, 1).program == first.program and len(compiled) == 1
    original = snr.SNRNet.__call__

    def changed(self, *args, **kwargs):
        return jax.tree.map(lambda a: a + 0.5, original(self, *args, **kwargs))

    monkeypatch.setattr(snr.SNRNet, "__call__", changed)

    again = plan.Planner(sl, plan.Cache(str(tmp_path / "plans.jsonl"))).plan(recipe, 16, 1)
    assert len(compiled) == 2 and again.program != first.program


def _cuda_plugin() -> bool:
    return plan.cuda_plugin_version() is not None


@pytest.mark.slow
@pytest.mark.skipif(not _cuda_plugin(), reason="needs the CUDA plugin (make gpu-plan-env; "
                    "make test-gpu-plan runs this test there)")
def test_demo_step_compiles_for_h100s(tmp_path):
    """A deviceless H100 compile of the trainer's step (SNR-Aware's demo, two GPUs): per-GPU
    memory from the compiler, the fit judged against 75% of 80 GB, FLOPs from the jaxpr."""
    cache = tmp_path / "plan.jsonl"
    proc = subprocess.run([sys.executable, "-m", "train", "plan", "--config", "snr_demo",
                           "--topology", "h100:2", "--batch", "1", "--patch", "16", "--cache",
                           str(cache)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 x h100 GPU" in proc.stdout
    (rec,) = [json.loads(line)["result"] for line in cache.read_text().splitlines()]
    assert rec["platform"] == "cuda" and rec["fits"] and rec["flops_source"] == "jaxpr"
    assert rec["limit_bytes"] == int(0.75 * plan.GPUS["h100"].hbm_bytes)
    assert 0 < rec["needed_bytes"] < rec["limit_bytes"] and rec["flops"] > 2 * 16 * 16 * 9 * 3 * 8
