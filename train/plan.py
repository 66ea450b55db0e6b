"""Plan a TPU run without a TPU: compile a recipe's real train step for a TPU slice, deviceless.

    python -m train plan --config restormer_motion_deblurring --topology v5e:2x4
    python -m train plan --config mprnet_deblurring --topology v6e:2x2 --dtype float32,bfloat16
    python -m train plan --config restormer_demo --topology v5e:2x2 --batch 4 --patch 64 --max-batch

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

Needs the ``tpu`` extra (``pip install -e '.[tpu]'``: libtpu matching the pinned jax).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

GiB = 1024 ** 3

TPU_EXTRA_HINT = ("the TPU compiler (libtpu) is not installed; install the 'tpu' extra: "
                  "pip install -e '.[tpu]' (jax[tpu]==0.10.2, which brings libtpu 0.0.42.1)")

EXAMPLE_TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5e:2x4", "v5p:2x2x1", "v6e:2x2", "v6e:2x4")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one TPU chip (Google Cloud's TPU system-architecture pages).

    ``peak_flops``: the MXU's dense bfloat16 peak. float32 matmuls and convolutions at JAX's
    default precision run as one bfloat16 pass on the MXU, so the same peak bounds them (with
    ``jax_default_matmul_precision='highest'`` they take about 6 passes)."""

    generation: str
    hbm_bytes: int        # per chip
    peak_flops: float     # bfloat16, per chip
    hbm_bandwidth: float  # bytes/s, per chip


CHIPS = {  # keyed by jax's device_kind
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}


class PlanError(RuntimeError):
    """A plan that cannot be made (no libtpu, an unknown topology, a batch that does not split)."""


# ------------------------------------------------------------------------------------ topology


def _prepare_process() -> None:
    """Before jax starts: CPU as the process's own backend (libtpu then stays quiet about the
    missing TPU), and libtpu allowed to load beside other jax processes of this host (it takes a
    lock file otherwise, which only matters when real TPU chips are driven)."""
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


@dataclasses.dataclass
class Slice:
    name: str
    devices: list
    chip: Chip
    chips: int

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips


def topology(name: str) -> Slice:
    """The devices of a named TPU slice (``v5e:2x4``: generation, then chips per dimension)."""
    if libtpu_version() is None:
        raise PlanError(TPU_EXTRA_HINT)
    from jax.experimental import topologies

    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", name):
        raise PlanError(f"topology {name!r}: expected GENERATION:AxB[xC], e.g. "
                        f"{', '.join(EXAMPLE_TOPOLOGIES)}")
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


# ------------------------------------------------------------------------------------ one plan


@dataclasses.dataclass
class Result:
    """One compiled configuration, per chip (what the cache stores)."""

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
    limit_bytes: int = 0        # the compiler's HBM limit where it said so (else 0)
    flops: float = 0.0
    bytes_accessed: float = 0.0
    compile_seconds: float = 0.0
    message: str = ""
    versions: dict = dataclasses.field(default_factory=dict)
    created: str = ""

    def roofline_seconds(self) -> float:
        chip = _chip(self.chip)
        return max(self.flops / chip.peak_flops, self.bytes_accessed / chip.hbm_bandwidth)

    def bound(self) -> str:
        chip = _chip(self.chip)
        return "compute" if self.flops / chip.peak_flops >= self.bytes_accessed / chip.hbm_bandwidth \
            else "memory"


def _chip(generation: str) -> Chip:
    return next(c for c in CHIPS.values() if c.generation == generation)


def _versions() -> dict:
    import jax

    from flaxrestore import __version__

    return {"jax": jax.__version__, "libtpu": libtpu_version(), "flaxrestore": __version__}


def _key(recipe_dict: dict, topology_name: str, patch: int, batch: int, versions: dict) -> str:
    blob = json.dumps({"recipe": recipe_dict, "topology": topology_name, "patch": patch,
                       "batch": batch, "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Cache:
    """Plans already computed: JSON lines ``{"key": ..., "result": {...}}`` (the last line of a
    key wins). None as the path keeps nothing."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        self.entries[rec["key"]] = rec["result"]

    def get(self, key: str) -> Result | None:
        rec = self.entries.get(key)
        return Result(**rec) if rec is not None else None

    def put(self, key: str, result: Result) -> None:
        self.entries[key] = dataclasses.asdict(result)
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "result": dataclasses.asdict(result)}) + "\n")


def default_cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flaxrestore", "tpu_plan.jsonl")


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


def _io_shapes(recipe, model, patch: int):
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


def compile_step(recipe, sl: Slice, patch: int, batch_per_chip: int) -> Result:
    """Builds the recipe's train step over the slice and compiles it (no cache)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train import schedules, step as step_lib

    mesh = step_lib.make_mesh(sl.devices)
    model = step_lib.build_model(recipe)
    tx = schedules.make_optimizer(recipe.optimizer)
    rep, data = step_lib.replicated(mesh), step_lib.batch_sharding(mesh)

    def abstract(tree, sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            tree)

    state = abstract(step_lib.abstract_state(model, tx, recipe.ema_decay > 0), rep)
    cin, cout = _io_shapes(recipe, model, patch)
    n = batch_per_chip * len(sl.devices)
    batch = {"lq": jax.ShapeDtypeStruct((n, patch, patch, cin), jnp.float32, sharding=data),
             "gt": jax.ShapeDtypeStruct((n, patch, patch, cout), jnp.float32, sharding=data)}
    vgg_graph, frozen = None, {}
    if step_lib.needs_vgg(recipe):
        from flaxrestore import vgg as fvgg

        net = nnx.eval_shape(lambda: fvgg.VGG19(rngs=nnx.Rngs(0), num_layers=30))
        vgg_graph, vgg_params = nnx.split(net, nnx.Param)
        frozen = {"vgg": abstract(nnx.to_pure_dict(vgg_params), rep)}
    fn = step_lib.make_train_step(recipe, model, tx, mesh, vgg_graph)
    result = Result(recipe=recipe.name, topology=sl.name, chip=sl.chip.generation,
                    dtype=recipe.dtype, remat=bool(recipe.remat), patch=patch,
                    batch_per_chip=batch_per_chip, fits=False, versions=_versions(),
                    created=time.strftime("%Y-%m-%d"))
    t0 = time.perf_counter()
    lowered = fn.lower(state, batch, frozen)
    leaked = sorted(set(re.findall(r"flaxrestore_\w+", lowered.as_text())))
    if leaked:  # the seam failed: a CPU kernel in a TPU program would not even compile
        raise PlanError(f"CPU kernels in the TPU program: {', '.join(leaked)}")
    try:
        compiled = lowered.compile()
    except Exception as e:  # the compiler refuses a program that does not fit in HBM
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
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result.argument_bytes = int(mem.argument_size_in_bytes)
    result.output_bytes = int(mem.output_size_in_bytes - mem.alias_size_in_bytes)
    result.temp_bytes = int(mem.temp_size_in_bytes)
    result.code_bytes = int(mem.generated_code_size_in_bytes)
    result.needed_bytes = (result.argument_bytes + result.output_bytes + result.temp_bytes
                           + result.code_bytes)
    result.flops = float(cost.get("flops", 0.0))
    result.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    result.fits = True
    return result


class Planner:
    """Compiles (or finds in the cache) one configuration at a time."""

    def __init__(self, sl: Slice, cache: Cache, refresh: bool = False, log=print):
        self.slice, self.cache, self.refresh, self.log = sl, cache, refresh, log
        self.versions = _versions()

    def key(self, recipe, patch: int, batch_per_chip: int) -> str:
        from train import recipe as recipe_lib

        rdict = json.loads(json.dumps(recipe_lib.to_dict(recipe), default=str))
        return _key(rdict, self.slice.name, patch, batch_per_chip, self.versions)

    def lookup(self, recipe, patch: int, batch_per_chip: int) -> Result | None:
        """The cached plan, or None (compiles nothing)."""
        return self.cache.get(self.key(recipe, patch, batch_per_chip))

    def plan(self, recipe, patch: int, batch_per_chip: int) -> Result:
        key = self.key(recipe, patch, batch_per_chip)
        hit = None if self.refresh else self.cache.get(key)
        if hit is not None:
            return hit
        self.log(f"compiling {recipe.name} ({recipe.dtype}{', remat' if recipe.remat else ''}) "
                 f"for {self.slice.name}: {batch_per_chip} x {patch}x{patch} per chip ...")
        result = compile_step(recipe, self.slice, patch, batch_per_chip)
        self.log(f"  {'fits' if result.fits else 'does not fit'} "
                 f"({_gib(result.needed_bytes)} GiB), compiled in {result.compile_seconds:.0f} s")
        self.cache.put(key, result)
        return result

    def max_batch(self, recipe, patch: int, start: int) -> tuple[int, list[Result]]:
        """The largest per-chip batch that fits (0 if not even 1): bracketing by doubling, then
        bisection with guesses from the linear growth of memory with the batch."""
        tried: dict[int, Result] = {}

        def fits(b: int) -> bool:
            tried[b] = self.plan(recipe, patch, b)
            return tried[b].fits

        lo, hi = 0, None  # lo fits (0: nothing known), hi does not
        b = max(1, start)
        while hi is None:
            if fits(b):
                lo, b = b, self._guess(tried, b * 2)
            else:
                hi = b
        while hi - lo > 1:
            if lo == 0:
                b = 1
            else:
                b = min(hi - 1, max(lo + 1, self._guess(tried, (lo + hi) // 2)))
            if fits(b):
                lo = b
            else:
                hi = b
        return lo, [tried[k] for k in sorted(tried)]

    def _guess(self, tried: dict[int, Result], fallback: int) -> int:
        ok = sorted((b, r.needed_bytes) for b, r in tried.items() if r.fits)
        limit = self.slice.chip.hbm_bytes // self.slice.devices_per_chip
        bad = [r.limit_bytes for r in tried.values() if r.limit_bytes]
        limit = min(bad) if bad else limit
        if len(ok) >= 2:
            (b0, m0), (b1, m1) = ok[-2], ok[-1]
            per = (m1 - m0) / (b1 - b0)
            if per > 0:
                return max(1, int((limit - m1) / per) + b1)
        return fallback


# ------------------------------------------------------------------------------------ report


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def stages_of(recipe, devices: int, batch: int | None, patch: int | None):
    """[(first step, last step, patch, per-chip batch)]: the recipe's stages with distinct
    (patch, batch) merged, or the one configuration asked for."""
    if batch is not None or patch is not None:
        st = recipe.stage_at(1)
        p = patch or st.patch_size
        b = batch or _per_device(recipe, st.batch_size, devices)
        return [(1, recipe.total_steps, p, b)]
    out, first = [], 1
    stages = recipe.stages or (recipe.stage_at(1),)
    for s in stages:
        b = _per_device(recipe, s.batch_size, devices)
        if out and out[-1][2:] == (s.patch_size, b):
            out[-1] = (out[-1][0], s.until, s.patch_size, b)
        else:
            out.append((first, s.until, s.patch_size, b))
        first = s.until + 1
    if not out or not out[0][2]:
        raise PlanError(f"recipe {recipe.name!r} has no patch size: pass --patch")
    return out


def _per_device(recipe, global_batch: int, devices: int) -> int:
    if global_batch % devices:
        raise PlanError(f"recipe {recipe.name!r}: global batch {global_batch} does not split over "
                        f"{devices} devices; pass --batch (per chip)")
    return global_batch // devices


HEADER = ("| dtype | steps | patch | batch/chip | arguments GiB | temporaries GiB | needed GiB "
          "| HBM GiB | fits | GFLOP/step | GB/step | roofline ms/step | img/s/chip | compile s |")
SEPARATOR = "|" + "---|" * (HEADER.count("|") - 1)


def table_row(r: Result, steps: str, sl_chip: Chip, devices_per_chip: int) -> str:
    hbm = sl_chip.hbm_bytes / devices_per_chip
    if not r.fits:
        need = f"> {_gib(r.needed_bytes)}" if r.needed_bytes else "?"
        return (f"| {r.dtype} | {steps} | {r.patch} | {r.batch_per_chip} | | | {need} | "
                f"{_gib(hbm)} | **no** | | | | | {r.compile_seconds:.0f} |")
    t = r.roofline_seconds()
    return (f"| {r.dtype} | {steps} | {r.patch} | {r.batch_per_chip} | {_gib(r.argument_bytes)} | "
            f"{_gib(r.temp_bytes)} | {_gib(r.needed_bytes)} | {_gib(hbm)} | yes | "
            f"{r.flops / 1e9:.1f} | {r.bytes_accessed / 1e9:.2f} | {1e3 * t:.1f} ({r.bound()}) | "
            f"{r.batch_per_chip * devices_per_chip / t:.1f} | {r.compile_seconds:.0f} |")


def schedule_seconds(rows: Sequence[tuple[int, int, Result]]) -> float | None:
    """Roofline wall time of the whole schedule (None if a stage does not fit)."""
    if any(not r.fits for _, _, r in rows):
        return None
    return sum((last - first + 1) * r.roofline_seconds() for first, last, r in rows)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"


# ------------------------------------------------------------------------------------ command


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan (python -m train plan)")
    g.add_argument("--topology", help="plan: TPU slice name, e.g. " + ", ".join(EXAMPLE_TOPOLOGIES))
    g.add_argument("--batch", type=int, help="plan: per-chip batch (default: each stage's global "
                   "batch / chips)")
    g.add_argument("--patch", type=int, help="plan: training patch size (default: each stage's)")
    g.add_argument("--dtype", help="plan: compute dtype(s), comma-separated, e.g. "
                   "float32,bfloat16 (default: the recipe's)")
    g.add_argument("--max-batch", action="store_true",
                   help="plan: also search the largest per-chip batch that fits")
    g.add_argument("--cache", default=None,
                   help=f"plan: JSON-lines cache of compiled plans (default {default_cache_path()}; "
                        "'none' keeps nothing)")
    g.add_argument("--refresh", action="store_true", help="plan: recompile cached plans")


def run(args, overrides: Sequence[str]) -> int:
    """``python -m train plan``: prints the per-chip table; exit 0, or 2 on a plan error."""
    _prepare_process()
    try:
        return _run(args, overrides)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, overrides: Sequence[str]) -> int:
    if not args.topology:
        raise PlanError("plan needs --topology (e.g. v5e:2x4)")
    if args.batch is not None and args.batch < 1:
        raise PlanError("--batch must be >= 1")
    if args.patch is not None and args.patch < 8:
        raise PlanError("--patch must be >= 8")
    sl = topology(args.topology)
    from train import recipe as recipe_lib

    recipe = recipe_lib.load(args.config, overrides)
    try:
        recipe.validate()
    except ValueError as e:
        raise PlanError(str(e)) from None
    dtypes = args.dtype.split(",") if args.dtype else [recipe.dtype]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise PlanError(f"--dtype {d!r}: float32, bfloat16 or float16")
    cache_path = None if (args.cache or "").lower() == "none" else (args.cache or default_cache_path())
    planner = Planner(sl, Cache(cache_path), refresh=args.refresh,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    stages = stages_of(recipe, len(sl.devices), args.batch, args.patch)
    per = f" per device ({sl.devices_per_chip} per chip)" if sl.devices_per_chip > 1 else " per chip"
    print(f"{recipe.name} ({recipe.model}) on {sl.name}: {sl.chips} x TPU {sl.chip.generation}, "
          f"{len(sl.devices)} devices; figures{per}")
    print(f"chip: {_gib(sl.chip.hbm_bytes)} GiB HBM, {sl.chip.peak_flops / 1e12:.0f} TFLOP/s "
          f"bfloat16 peak, {sl.chip.hbm_bandwidth / 1e9:.0f} GB/s HBM (published figures)")
    print()
    print(HEADER)
    print(SEPARATOR)
    summaries = []
    for d in dtypes:
        r_dtype = dataclasses.replace(recipe, dtype=d)
        rows = []
        for first, last, patch, batch in stages:
            r = planner.plan(r_dtype, patch, batch)
            rows.append((first, last, r))
            print(table_row(r, f"{first}-{last}", sl.chip, sl.devices_per_chip), flush=True)
        if args.max_batch:
            for first, last, patch, batch in stages:
                best, tried = planner.max_batch(r_dtype, patch, batch)
                summaries.append(f"{d}, patch {patch}: the largest batch that fits is {best} per "
                                 f"{'chip' if sl.devices_per_chip == 1 else 'device'} "
                                 f"(tried {', '.join(str(t.batch_per_chip) for t in tried)})")
        total = schedule_seconds(rows)
        if total is not None:
            summaries.append(f"{d}: the schedule's {recipe.total_steps} steps take at least "
                             f"{_duration(total)} on this slice (roofline bound)")
        else:
            bad = [r for _, _, r in rows if not r.fits]
            summaries.append(f"{d}: {len(bad)} stage(s) do not fit: try a smaller --batch, "
                             f"--set remat=True, or --dtype bfloat16")
    print()
    for s in summaries:
        print(s)
    print("roofline: max(FLOPs / peak, bytes / bandwidth) per step, a lower bound; needed = "
          "arguments + outputs not aliased + temporaries + code")
    return 0
