"""What a plan compiles for: TPU slices (libtpu's deviceless topologies) and GPU machines (the
CUDA plugin's deviceless topologies with an XLA GPU target description), and their published
figures. Standard library only at import: jax starts after :func:`prepare_process`."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re

GiB = 1024 ** 3

TPU_EXTRA_HINT = ("the TPU compiler (libtpu) is not installed; install the 'tpu' extra: "
                  "pip install -e '.[tpu]' (jax[tpu]==0.10.2, which brings libtpu 0.0.42.1)")
GPU_EXTRA_HINT = ("the CUDA compiler plugin (jax-cuda12-plugin) is not installed in this "
                  "environment; `make gpu-plan-env` builds .venv-gpu with it (about 5.8 GB), then "
                  "run .venv-gpu/bin/python -m train plan ... (see README, 'Planning a GPU run')")

EXAMPLE_TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5e:2x4", "v5p:2x2x1", "v6e:2x2", "v6e:2x4",
                      "h100:8", "a100-80g:8", "a100-40g:1", "rtx3090:1")

# JAX preallocates this fraction of a GPU's memory for its allocator by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); a program fits when it needs at most that much
DEFAULT_GPU_MEM_FRACTION = 0.75


class PlanError(RuntimeError):
    """A plan that cannot be made (no compiler, an unknown topology, a batch that does not split)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one accelerator (one TPU chip or one GPU), dense (no sparsity).

    ``peak_flops``: bfloat16. On a TPU float32 matmuls and convolutions at JAX's default
    precision run as one bfloat16 pass on the MXU, so the same peak bounds them (with
    ``jax_default_matmul_precision='highest'`` they take about 6 passes). On Ampere and Hopper
    GPUs JAX's default precision runs them as TF32 on the tensor cores (``peak_tf32``);
    ``'highest'`` runs them in full float32 (``peak_fp32``)."""

    generation: str
    hbm_bytes: int        # per chip / GPU
    peak_flops: float     # bfloat16
    hbm_bandwidth: float  # bytes/s
    platform: str = "tpu"
    peak_tf32: float = 0.0
    peak_fp32: float = 0.0
    target_file: str = ""  # GPUs: the XLA target description in train/plan/gpus/

    def peak(self, dtype: str, precision: str = "default") -> float:
        """The peak that bounds a step's convolutions and matmuls in ``dtype``."""
        if self.platform == "tpu" or dtype in ("bfloat16", "float16"):
            return self.peak_flops
        return self.peak_fp32 if precision == "highest" else self.peak_tf32


CHIPS = {  # keyed by jax's device_kind; Google Cloud's TPU system-architecture pages
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}

# GPUs by the name --topology takes. Memory: the device_memory_size of the target description
# (what the device reports). Peaks, dense: NVIDIA's H100 datasheet (SXM5: 989.4 bfloat16, 494.7
# TF32, 66.9 float32 TFLOP/s, 3.35 TB/s), A100 datasheet (312 / 156 / 19.5; 2039 GB/s for the
# 80 GB SXM4, 1555 GB/s for 40 GB), the Ampere GA102 whitepaper for the GeForce RTX 3090
# (bfloat16 with float32 accumulation 71, TF32 35.6, float32 35.6 TFLOP/s; 936 GB/s).
GPUS = {
    "h100": Chip("h100", 84942979072, 989.4e12, 3.35e12, "cuda", 494.7e12, 66.9e12,
                 "h100_sxm.txtpb"),
    "a100-80g": Chip("a100-80g", 85100068864, 312e12, 2.039e12, "cuda", 156e12, 19.5e12,
                     "a100_sxm_80.txtpb"),
    "a100-40g": Chip("a100-40g", 42331013120, 312e12, 1.555e12, "cuda", 156e12, 19.5e12,
                     "a100_sxm_40.txtpb"),
    "rtx3090": Chip("rtx3090", 24 * GiB, 71e12, 936e9, "cuda", 35.6e12, 35.6e12, "rtx3090.txtpb"),
}


def chip_named(generation: str) -> Chip:
    for c in (*CHIPS.values(), *GPUS.values()):
        if c.generation == generation:
            return c
    raise KeyError(generation)


def prepare_process() -> None:
    """Before jax starts: CPU as the process's own backend (libtpu then stays quiet about the
    missing TPU, and the CUDA plugin does not look for a GPU), and libtpu allowed to load beside
    other jax processes of this host (it takes a lock file otherwise, which only matters when
    real TPU chips are driven)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_version() -> str | None:
    try:
        import libtpu  # noqa: F401  (a small package: the compiler loads when jax asks for it)
    except ImportError:
        return None
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cuda_plugin_version() -> str | None:
    if importlib.util.find_spec("jax_plugins") is None:
        return None
    try:
        return importlib.metadata.version("jax-cuda12-plugin")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass
class Slice:
    """The devices a plan compiles for: a TPU slice or a machine of ``chips`` GPUs."""

    name: str
    devices: list
    chip: Chip
    chips: int

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def unit(self) -> str:
        return "GPU" if self.platform == "cuda" else "chip"


_GPU_NAME = re.compile(r"([a-z0-9-]+):(\d+)")


def topology(name: str) -> Slice:
    """The devices of a TPU slice (``v5e:2x4``: generation, then chips per dimension) or of a GPU
    machine (``h100:8``: a GPU of :data:`GPUS`, then how many)."""
    m = _GPU_NAME.fullmatch(name)
    if m and m.group(1) in GPUS:
        return gpu_topology(m.group(1), int(m.group(2)))
    return tpu_topology(name)


def tpu_topology(name: str) -> Slice:
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", name):
        raise PlanError(f"topology {name!r}: expected GENERATION:AxB[xC] for a TPU slice or "
                        f"GPU:COUNT with GPU one of {', '.join(GPUS)}; e.g. "
                        f"{', '.join(EXAMPLE_TOPOLOGIES)}")
    if libtpu_version() is None:
        raise PlanError(TPU_EXTRA_HINT)
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # jax raises JaxRuntimeError(INVALID_ARGUMENT: ...) for bad names
        msg = str(e).split("\n")[0]
        raise PlanError(f"libtpu does not accept topology {name!r} ({msg}); names it accepts "
                        f"include {', '.join(EXAMPLE_TOPOLOGIES)}") from None
    devices = list(topo.devices)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise PlanError(f"topology {name!r} has {kind!r} chips, which have no published figures "
                        f"here (known: {', '.join(c.generation for c in CHIPS.values())})")
    chips = math.prod(int(d) for d in name.split(":", 1)[1].split("x"))
    return Slice(name, devices, CHIPS[kind], chips)


def gpu_target_config(gpu: str) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpus", GPUS[gpu].target_file)
    with open(path) as f:
        return f.read()


def gpu_topology(gpu: str, count: int) -> Slice:
    """``count`` compile-only GPUs of one machine, described by the XLA target description of
    ``gpu`` (no GPU attached)."""
    if not 1 <= count <= 64:
        raise PlanError(f"{gpu}:{count}: between 1 and 64 GPUs")
    if cuda_plugin_version() is None:
        raise PlanError(GPU_EXTRA_HINT)
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(gpu),
                                            topology=f"1x1x{count}")
    except Exception as e:
        raise PlanError(f"the CUDA plugin refused the {gpu} target description "
                        f"({str(e).splitlines()[0]})") from None
    return Slice(f"{gpu}:{count}", list(topo.devices), GPUS[gpu], count)
