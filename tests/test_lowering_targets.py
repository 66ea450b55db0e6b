"""Every family's demo train step lowered for CUDA and for a TPU (``jit(...).trace(...)
.lower(lowering_platforms=...)``: no GPU, no TPU and no compiler plugin needed) holds no CPU
kernel and no custom call at all: what the per-platform seam (``flaxrestore.lowering``) must
keep out of accelerator programs. The same trace lowered for the CPU must hold the project's
native kernels, which proves the check reads the program text it claims to read.

Nothing is compiled here: ``.compile()`` of a CUDA lowering without a CUDA topology would
silently compile for the CPU. Deviceless GPU compiles (``python -m train plan --topology h100:8``)
need the CUDA plugin: ``tests/test_plan.py`` runs one when it is installed.
"""

from __future__ import annotations

import re

import jax
import pytest

from conftest import TINY_RECIPES
from train import recipe as recipe_lib
from train.plan import step_and_arguments

# custom calls an accelerator program may hold; none today (a cuDNN or TPU library call would be
# added here with its reason)
ALLOWED_CUSTOM_CALLS: frozenset[str] = frozenset()


def custom_calls(text: str) -> set[str]:
    """The targets of every custom call in a StableHLO module's text."""
    return set(re.findall(r"custom_call @([\w.$]+)", text)) | set(
        re.findall(r'call_target_name = "([^"]+)"', text))


def _traced(family: str):
    name, patch, sets = TINY_RECIPES[family]
    recipe = recipe_lib.load(name, [*sets, "vgg_weights='random'", "batch_size=2", "stages=()",
                                    f"data.patch_size={patch}"])
    fn, args = step_and_arguments(recipe, jax.devices()[:1], patch, 2)
    return fn.trace(*args)


@pytest.mark.parametrize("family", list(TINY_RECIPES))
def test_train_step_for_cuda_and_tpu_holds_no_cpu_kernel(family):
    traced = _traced(family)
    cpu = custom_calls(traced.lower(lowering_platforms=("cpu",)).as_text())
    assert any(c.startswith("flaxrestore_") for c in cpu), cpu  # the detector sees kernels
    for platform in ("cuda", "tpu"):
        calls = custom_calls(traced.lower(lowering_platforms=(platform,)).as_text())
        assert calls <= ALLOWED_CUSTOM_CALLS, (platform, sorted(calls - ALLOWED_CUSTOM_CALLS))


def test_a_cpu_kernel_put_back_fails_the_cuda_check(monkeypatch):
    """The mistake the check exists for: the seam decided by the host instead of the target."""
    from flaxrestore import lowering

    monkeypatch.setattr(lowering, "per_platform", lambda cpu, default: cpu())
    calls = custom_calls(_traced("snr").lower(lowering_platforms=("cuda",)).as_text())
    assert "flaxrestore_windows" in calls


def test_matmul_precision_of_a_recipe_reaches_every_convolution():
    """``--set matmul_precision=high``: the step's convolutions and matmuls carry that precision
    (on GPUs float32 at JAX's default runs as TF32; a recipe can ask for more). The suite's own
    process default is 'highest' (conftest), so 'high' is what tells the field was applied."""
    name, patch, sets = TINY_RECIPES["snr"]
    texts = {}
    for precision in ("default", "high"):
        recipe = recipe_lib.load(name, [*sets, "batch_size=2", "stages=()",
                                        f"data.patch_size={patch}",
                                        f"matmul_precision='{precision}'"])
        fn, args = step_and_arguments(recipe, jax.devices()[:1], patch, 2)
        texts[precision] = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    convs = re.findall(r"stablehlo.convolution.*", texts["high"])
    assert convs and all("HIGH" in c and "HIGHEST" not in c for c in convs), convs[:2]
    assert "precision = [HIGH, HIGH]" not in texts["default"]
    with pytest.raises(ValueError, match="matmul_precision"):
        recipe_lib.load(name, ["matmul_precision='tf32'"]).validate()
