"""Plan a TPU or GPU run without one: compile a recipe's real train step for a TPU slice or a GPU
machine, deviceless.

    python -m train plan --config restormer_motion_deblurring --topology v5e:2x4
    python -m train plan --config mprnet_deblurring --topology v6e:2x2 --dtype float32,bfloat16
    python -m train plan --config restormer_demo --topology v5e:2x2 --batch 4 --patch 64 --max-batch
    python -m train plan --config darkir_lolblur --topology h100:8 --dtype float32,bfloat16
    python -m train plan --config snr_lolv1 --topology rtx3090:1 --max-batch

libtpu's compiler builds programs for a TPU topology described by name
(``jax.experimental.topologies.get_topology_desc``), no TPU attached. The plan builds the
trainer's own step (:func:`train.step.make_train_step`: the model, loss, optimizer, schedule,
MixUp and EMA of the recipe, the batch sharded on the slice's 1-D data mesh, the state
replicated), lowers it for the slice and compiles it, then reads, per chip:

* HBM: the compiler's memory analysis (arguments, outputs not aliased to them, temporaries,
  code); a program that does not fit is refused by the compiler itself, and its message says how
  much it needed;
* FLOPs and bytes of one step (the compiler's cost analysis of the per-chip program);
* a roofline bound of the step time, ``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)`` from the
  chip's published peaks (:data:`CHIPS`): a lower bound, not a measurement. XLA's own
  ``optimal_seconds`` is not used (it came back negative for the Restormer step).

Each stage of a progressive recipe is planned at its (patch, global batch / chips) unless
``--batch`` / ``--patch`` say otherwise; ``--max-batch`` searches the largest per-chip batch that
fits. Compiles take minutes on a small host, so results are kept in a JSON-lines cache keyed by
recipe, stage, topology, dtype and versions (``--cache``; ``--refresh`` recompiles).

GPUs (``h100:N``, ``a100-80g:N``, ``a100-40g:N``, ``rtx3090:N``): the CUDA plugin's deviceless
topology built from an XLA GPU target description (``train/plan/gpus/``, sources named in each
file). The GPU compiler refuses no program, so the fit is judged here against ``--mem-fraction``
of the GPU's memory; its executables have no cost analysis, so FLOPs come from the step's jaxpr
(``jax.experimental.roofline``).

TPU plans need the ``tpu`` extra (``pip install -e '.[tpu]'``: libtpu matching the pinned jax);
GPU plans the CUDA plugin (``make gpu-plan-env``: a separate environment, see the README).

Rooms: :mod:`.targets` (what is compiled for, published figures), :mod:`.compile` (one plan),
:mod:`.cache` (the cache and the planner), :mod:`.report` (the command and its table).
"""

from train.plan.cache import Cache, Planner, _key, default_cache_path  # noqa: F401
from train.plan.compile import (Result, _oom_sizes, compile_lowered, compile_step,  # noqa: F401
                                count_flops, lower_step, step_and_arguments)
from train.plan.report import (GPU_HEADER, GPU_SEPARATOR, HEADER, SEPARATOR,  # noqa: F401
                               _duration, _gib, add_arguments, gpu_row, header, run,
                               schedule_seconds, stages_of, table_row)
from train.plan.targets import (CHIPS, EXAMPLE_TOPOLOGIES, GPUS, GiB, Chip, PlanError,  # noqa: F401
                                Slice, chip_named, cuda_plugin_version, gpu_topology,
                                libtpu_version, topology, tpu_topology)
from train.plan.targets import prepare_process as _prepare_process  # noqa: F401
