"""One plan: the recipe's real train step lowered for a TPU slice or GPU machine, compiled
deviceless, and its per-device memory and cost read back (:class:`Result`)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time

from train.plan.targets import GiB, PlanError, Slice, chip_named, cuda_plugin_version, \
    libtpu_version

# XLA's Triton GEMM emitter fails deviceless on some of these programs ("Couldn't find output
# tile sizes that satisfy hlo: dot f32[66048,64]" for DarkIR's 2 x 256^2 step on H100): GPU plans
# are compiled with GEMMs as cuBLAS calls instead (operands materialised rather than fused into a
# Triton GEMM, so if anything the temporaries are counted from above on that account)
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@dataclasses.dataclass
class Result:
    """One compiled configuration, per chip / GPU (what the cache stores)."""

    recipe: str
    topology: str
    chip: str
    dtype: str
    remat: bool
    patch: int
    batch_per_chip: int
    fits: bool
    argument_bytes: int = 0
    output_bytes: int = 0       # outputs not aliased to (donated) arguments
    temp_bytes: int = 0
    code_bytes: int = 0
    needed_bytes: int = 0       # argument + unaliased output + temp + code; or the compiler's
    limit_bytes: int = 0        # TPU: the compiler's HBM limit where it said so; GPU: usable
    flops: float = 0.0
    bytes_accessed: float = 0.0
    compile_seconds: float = 0.0
    message: str = ""
    versions: dict = dataclasses.field(default_factory=dict)
    created: str = ""
    program: str = ""           # sha256 of the lowered program (what the cache is checked by)
    platform: str = "tpu"
    grad_accum: int = 1
    precision: str = "default"  # jax_default_matmul_precision of the step
    flops_source: str = "compiler"

    def roofline_seconds(self) -> float:
        chip = chip_named(self.chip)
        return max(self.flops / chip.peak(self.dtype, self.precision),
                   self.bytes_accessed / chip.hbm_bandwidth)

    def bound(self) -> str:
        chip = chip_named(self.chip)
        compute = self.flops / chip.peak(self.dtype, self.precision)
        return "compute" if compute >= self.bytes_accessed / chip.hbm_bandwidth else "memory"


def versions(platform: str = "tpu") -> dict:
    import jax

    from flaxrestore import __version__

    out = {"jax": jax.__version__, "flaxrestore": __version__}
    if platform == "cuda":
        out["jax_cuda12_plugin"] = cuda_plugin_version()
    else:
        out["libtpu"] = libtpu_version()
    return out


# what libtpu says when a program does not fit, e.g. "RESOURCE_EXHAUSTED: Ran out of memory on
# HBM, the total memory required for HLO temporaries (27.48G) exceeds available HBM (15.75G)."
_OOM = re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM "
                  r"\(([\d.]+)([KMGT]?)i?B?\)")
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def _oom_sizes(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from the compiler's out-of-memory message, or None."""
    m = _OOM.search(message)
    if not m:
        return None
    return (int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)]))


def _io_shapes(model, patch: int):
    """(lq channels, gt channels): the model's image input and its main output."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from train import step as step_lib

    module = model.module(model.params, train=False)
    example = type(module).example_inputs(module.config, 1, 16, 16, np.random.default_rng(0))
    cin = int(example[0].shape[-1])

    def fwd(x):
        return step_lib.run_forward(model.module(model.params, train=False), x).main

    out = jax.eval_shape(fwd, jax.ShapeDtypeStruct((1, patch, patch, cin), jnp.float32))
    return cin, int(out.shape[-1])


def step_and_arguments(recipe, devices, patch: int, batch_per_device: int):
    """The recipe's jitted train step over ``devices`` and abstract (state, batch, frozen)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train import schedules, step as step_lib

    mesh = step_lib.make_mesh(devices)
    model = step_lib.build_model(recipe)
    tx = schedules.make_optimizer(recipe.optimizer)
    rep, data = step_lib.replicated(mesh), step_lib.batch_sharding(mesh)

    def abstract(tree, sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            tree)

    state = abstract(step_lib.abstract_state(model, tx, recipe.ema_decay > 0), rep)
    cin, cout = _io_shapes(model, patch)
    n = batch_per_device * len(devices)
    batch = {"lq": jax.ShapeDtypeStruct((n, patch, patch, cin), jnp.float32, sharding=data),
             "gt": jax.ShapeDtypeStruct((n, patch, patch, cout), jnp.float32, sharding=data)}
    vgg_graph, frozen = None, {}
    if step_lib.needs_vgg(recipe):
        from flaxrestore import vgg as fvgg

        net = nnx.eval_shape(lambda: fvgg.VGG19(rngs=nnx.Rngs(0), num_layers=30))
        vgg_graph, vgg_params = nnx.split(net, nnx.Param)
        frozen = {"vgg": abstract(nnx.to_pure_dict(vgg_params), rep)}
    fn = step_lib.make_train_step(recipe, model, tx, mesh, vgg_graph)
    return fn, (state, batch, frozen)


def lower_step(recipe, sl: Slice, patch: int, batch_per_chip: int):
    """(lowered program, its sha256): the step lowered for the slice; refuses a program that
    holds the project's CPU kernels (the per-platform seam failed)."""
    fn, args = step_and_arguments(recipe, sl.devices, patch, batch_per_chip)
    lowered = fn.lower(*args)
    text = lowered.as_text()
    leaked = sorted(set(re.findall(r"flaxrestore_\w+", text)))
    if leaked:  # the seam failed: a CPU kernel in a TPU/GPU program would not even compile
        raise PlanError(f"CPU kernels in the {sl.unit.replace('chip', 'TPU')} program: "
                        f"{', '.join(leaked)}")
    return lowered, hashlib.sha256(text.encode()).hexdigest()[:24]


def count_flops(recipe, sl: Slice, patch: int, batch_per_chip: int) -> float:
    """FLOPs of one step per device from the program's jaxpr (``jax.experimental.roofline``:
    every operation, convolutions and matmuls as 2 x multiply-adds), for GPU programs, whose
    compiled executables have no cost analysis here. Traced on the accelerator path, with one
    micro-batch per step (accumulating micro-batches does the same arithmetic)."""
    from jax.experimental import roofline

    from flaxrestore import lowering

    flat = dataclasses.replace(recipe, grad_accum=1)
    # it warns (through absl) of every op without a rule (sharding moves, ...), which it skips
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with lowering.accelerator_path():
            fn, args = step_and_arguments(flat, sl.devices, patch, batch_per_chip)
            _, res = roofline.roofline(fn)(*args)
    finally:
        absl.setLevel(level)
    return float(res.unfused_flops) / len(sl.devices)


def compile_lowered(recipe, sl: Slice, lowered, program: str, patch: int, batch_per_chip: int,
                    mem_fraction: float) -> Result:
    """Compiles a lowered step deviceless and reads its memory (and, on a TPU, cost) analysis."""
    result = Result(recipe=recipe.name, topology=sl.name, chip=sl.chip.generation,
                    dtype=recipe.dtype, remat=bool(recipe.remat), patch=patch,
                    batch_per_chip=batch_per_chip, fits=False, versions=versions(sl.platform),
                    created=time.strftime("%Y-%m-%d"), program=program, platform=sl.platform,
                    grad_accum=recipe.grad_accum,
                    precision=recipe.matmul_precision)
    gpu = sl.platform == "cuda"
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=GPU_COMPILER_OPTIONS if gpu else {})
    except Exception as e:  # the TPU compiler refuses a program that does not fit in HBM
        result.compile_seconds = time.perf_counter() - t0
        text = str(e)
        sizes = _oom_sizes(text)
        if sizes is None and "RESOURCE_EXHAUSTED" not in text:
            raise
        result.message = text.split("\n")[0][:300]
        if sizes:
            result.needed_bytes, result.limit_bytes = sizes
        return result
    result.compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    result.argument_bytes = int(mem.argument_size_in_bytes)
    result.output_bytes = int(mem.output_size_in_bytes - mem.alias_size_in_bytes)
    result.temp_bytes = int(mem.temp_size_in_bytes)
    result.code_bytes = int(mem.generated_code_size_in_bytes)
    result.needed_bytes = (result.argument_bytes + result.output_bytes + result.temp_bytes
                           + result.code_bytes)
    if gpu:
        # the GPU compiler refuses nothing: fit is judged against what JAX's allocator may use
        result.limit_bytes = int(mem_fraction * sl.chip.hbm_bytes)
        result.fits = result.needed_bytes <= result.limit_bytes
        result.flops = count_flops(recipe, sl, patch, batch_per_chip)
        result.flops_source = "jaxpr"
        # a lower bound of the bytes moved: the state and the batch are read once
        result.bytes_accessed = float(result.argument_bytes + result.output_bytes)
        return result
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result.flops = float(cost.get("flops", 0.0))
    result.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    result.fits = True
    return result


def compile_step(recipe, sl: Slice, patch: int, batch_per_chip: int,
                 mem_fraction: float = 0.75) -> Result:
    """Builds the recipe's train step over the slice and compiles it (no cache)."""
    lowered, program = lower_step(recipe, sl, patch, batch_per_chip)
    return compile_lowered(recipe, sl, lowered, program, patch, batch_per_chip, mem_fraction)
