import os

# Equivalence checks compare float32 numbers; keep XLA from using reduced-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

try:  # under `pytest -n 2` each worker has one core; torch's extra threads only spin
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass

# what `python -m train` and the benchmarks opt into before jax starts (the memory-saving XLA:CPU
# scheduler, glibc malloc keeping freed memory): the tests run the trainer's code in-process
from flaxrestore.xla_cpu import tuning as _tuning  # noqa: E402

_tuning.tune_cpu_process()
