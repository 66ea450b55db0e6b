import os

# Equivalence checks compare float32 numbers; keep XLA from using reduced-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# the suite runs on the CPU; libtpu (the `tpu` extra, for test_plan's deviceless TPU compiles)
# is then loaded only where a TPU topology is asked for
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:  # under `pytest -n 2` each worker has one core; torch's extra threads only spin
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass

# what `python -m train` and the benchmarks opt into before jax starts (the memory-saving XLA:CPU
# scheduler, glibc malloc keeping freed memory): the tests run the trainer's code in-process
from flaxrestore.xla_cpu import tuning as _tuning  # noqa: E402

_tuning.tune_cpu_process()


# Tests marked `both_lowerings` run twice: as the process lowers for its CPU (the XLA:CPU
# lowerings of flaxrestore.xla_cpu) and in accelerator mode (exactly what a TPU/GPU compiles:
# library convs, feature_group_count depthwise convs, plain autodiff, jax.checkpoint).
import pytest  # noqa: E402

# under CI a skip fails (a missing compiler or torch must not pass by running less)
pytest_plugins = ["ci_skips"]


def pytest_configure(config):
    config.addinivalue_line("markers", "both_lowerings: run in auto and in accelerator lowering "
                                       "mode (flaxrestore.lowering)")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_lowerings"):
        metafunc.fixturenames.append("lowering_mode")
        metafunc.parametrize("lowering_mode", ["cpu-lowering", "accelerator-path"])


@pytest.fixture(autouse=True)
def _enter_lowering_mode(request):
    """Runs a `both_lowerings` test inside the mode of its parametrisation. (A fixture named
    `lowering_mode` was shadowed by the parametrisation of that name and never ran: every
    `accelerator-path` variant computed the CPU lowering, found by tools/mutate.py.)"""
    callspec = getattr(request.node, "callspec", None)
    mode = callspec.params.get("lowering_mode") if callspec is not None else None
    from flaxrestore import lowering

    if mode is None or (mode == "cpu-lowering" and lowering.mode() == "auto"):
        yield  # (entering a mode clears jax's caches: only where the mode changes)
        return
    with lowering.accelerator_path(mode == "accelerator-path"):
        assert lowering.mode() == ("accelerator" if mode == "accelerator-path" else "auto")
        yield


# Each family's demo recipe at tiny widths (compile time grows with the number of blocks) with a
# crop the network accepts: (config, patch, --set overrides). The DarkIR and AECR-Net entries
# also switch on the VGG terms of the published recipes (LOLBlur's two perceptual terms,
# ITS's contrastive regularisation), which the demos leave off without VGG weights.
TINY_RECIPES = {
    "restormer": ("restormer_demo:blur", 16, [
        "model_overrides={'dim': 8, 'num_blocks': (1, 0, 0, 0), 'num_refinement_blocks': 0, "
        "'heads': (1, 1, 1, 1)}"]),
    "mprnet": ("mprnet_demo", 16, [
        "model_overrides={'n_feat': 8, 'scale_unetfeats': 4, 'scale_orsnetfeats': 4, "
        "'num_cab': 1}"]),
    "darkir": ("darkir_demo", 16, [  # one level: side output at 1/2
        "model_overrides={'width': 4, 'enc_blk_nums': (1,), 'dec_blk_nums': (1,), "
        "'middle_blk_num_enc': 1, 'middle_blk_num_dec': 1}", "losses.1.weight=0.01",
        "losses.4.weight=0.01"]),
    "snr": ("snr_demo", 32, ["model_overrides={'nf': 8}"]),
    "aecrnet": ("aecrnet_demo", 16, ["model_overrides={'ngf': 8}", "losses.1.weight=0.1"]),
}
