"""``python -m train plan``: the command line and the per-chip / per-GPU table it prints."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from train.plan.cache import Cache, Planner, default_cache_path
from train.plan.compile import Result
from train.plan.targets import (DEFAULT_GPU_MEM_FRACTION, EXAMPLE_TOPOLOGIES, GiB, Chip, PlanError,
                                Slice, prepare_process, topology)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _per_device(recipe, global_batch: int, devices: int) -> int:
    if global_batch % devices:
        raise PlanError(f"recipe {recipe.name!r}: global batch {global_batch} does not split over "
                        f"{devices} devices; pass --batch (per chip or GPU)")
    return global_batch // devices


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


HEADER = ("| dtype | steps | patch | batch/chip | arguments GiB | temporaries GiB | needed GiB "
          "| HBM GiB | fits | GFLOP/step | GB/step | roofline ms/step | img/s/chip | compile s |")
SEPARATOR = "|" + "---|" * (HEADER.count("|") - 1)
GPU_HEADER = ("| dtype | steps | patch | batch/GPU | micro-batches | arguments GiB | temporaries GiB "
              "| needed GiB | usable GiB | fits | GFLOP/step | FLOP bound ms/step | img/s/GPU "
              "| compile s |")
GPU_SEPARATOR = "|" + "---|" * (GPU_HEADER.count("|") - 1)


def header(sl: Slice) -> tuple[str, str]:
    return (GPU_HEADER, GPU_SEPARATOR) if sl.platform == "cuda" else (HEADER, SEPARATOR)


def table_row(r: Result, steps: str, sl_chip: Chip, devices_per_chip: int) -> str:
    if r.platform == "cuda":
        return gpu_row(r, steps)
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


def gpu_row(r: Result, steps: str) -> str:
    """A GPU plan: every figure is known whether or not it fits (the compiler refuses nothing)."""
    t = r.roofline_seconds()
    return (f"| {r.dtype} | {steps} | {r.patch} | {r.batch_per_chip} | {r.grad_accum} | "
            f"{_gib(r.argument_bytes)} | {_gib(r.temp_bytes)} | {_gib(r.needed_bytes)} | "
            f"{_gib(r.limit_bytes)} | {'yes' if r.fits else '**no**'} | {r.flops / 1e9:.1f} | "
            f"{1e3 * t:.1f} | {r.batch_per_chip / t:.1f} | {r.compile_seconds:.0f} |")


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


def describe(sl: Slice) -> list[str]:
    """The lines that say what was compiled for and which published figures bound it."""
    c = sl.chip
    if sl.platform == "cuda":
        return [f"GPU: {_gib(c.hbm_bytes)} GiB, peaks {c.peak_flops / 1e12:.1f} TFLOP/s bfloat16, "
                f"{c.peak_tf32 / 1e12:.1f} TF32 (float32 at JAX's default precision), "
                f"{c.peak_fp32 / 1e12:.1f} float32 ('highest'), {c.hbm_bandwidth / 1e9:.0f} GB/s "
                "(published figures, dense)"]
    return [f"chip: {_gib(c.hbm_bytes)} GiB HBM, {c.peak_flops / 1e12:.0f} TFLOP/s bfloat16 "
            f"peak, {c.hbm_bandwidth / 1e9:.0f} GB/s HBM (published figures)"]


FOOTNOTE_TPU = ("roofline: max(FLOPs / peak, bytes / bandwidth) per step, a lower bound; needed = "
                "arguments + outputs not aliased + temporaries + code")
FOOTNOTE_GPU = ("usable = --mem-fraction x the GPU's memory (JAX preallocates 75% by default; "
                "XLA_PYTHON_CLIENT_MEM_FRACTION changes it); needed = arguments + outputs not "
                "aliased + temporaries + code, from the deviceless compile (nothing autotuned: "
                "cuDNN workspaces are not counted, so it is an estimate from below; GEMMs as "
                "cuBLAS calls, Triton GEMMs off); FLOPs from the step's jaxpr "
                "(jax.experimental.roofline); FLOP bound = max(FLOPs / peak for the dtype and "
                "precision, (arguments + outputs) / bandwidth): a loose lower bound (the "
                "activations' memory traffic, which usually dominates these convolution nets "
                "on GPUs, is not in it)")


# ------------------------------------------------------------------------------------ command


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan (python -m train plan)")
    g.add_argument("--topology", help="plan: a TPU slice or GPU:COUNT, e.g. "
                   + ", ".join(EXAMPLE_TOPOLOGIES))
    g.add_argument("--batch", type=int, help="plan: per-chip (per-GPU) batch (default: each "
                   "stage's global batch / chips)")
    g.add_argument("--patch", type=int, help="plan: training patch size (default: each stage's)")
    g.add_argument("--dtype", help="plan: compute dtype(s), comma-separated, e.g. "
                   "float32,bfloat16 (default: the recipe's)")
    g.add_argument("--max-batch", action="store_true",
                   help="plan: also search the largest per-chip batch that fits")
    g.add_argument("--mem-fraction", type=float, default=DEFAULT_GPU_MEM_FRACTION,
                   help="plan, GPUs: the share of GPU memory a step may use (default 0.75, JAX's "
                        "preallocation; XLA_PYTHON_CLIENT_MEM_FRACTION at run time)")
    g.add_argument("--cache", default=None,
                   help=f"plan: JSON-lines cache of compiled plans (default {default_cache_path()}; "
                        "'none' keeps nothing)")
    g.add_argument("--refresh", action="store_true", help="plan: recompile cached plans")


def run(args, overrides: Sequence[str]) -> int:
    """``python -m train plan``: prints the per-chip table; exit 0, or 2 on a plan error."""
    prepare_process()
    try:
        return _run(args, overrides)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, overrides: Sequence[str]) -> int:
    if not args.topology:
        raise PlanError("plan needs --topology (e.g. v5e:2x4 or h100:8)")
    if args.batch is not None and args.batch < 1:
        raise PlanError("--batch must be >= 1")
    if args.patch is not None and args.patch < 8:
        raise PlanError("--patch must be >= 8")
    if not 0 < args.mem_fraction <= 1:
        raise PlanError("--mem-fraction must be in (0, 1]")
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
    sl = topology(args.topology)
    cache_path = None if (args.cache or "").lower() == "none" else (args.cache or default_cache_path())
    planner = Planner(sl, Cache(cache_path), refresh=args.refresh,
                      log=lambda m: print(m, file=sys.stderr, flush=True),
                      mem_fraction=args.mem_fraction)
    stages = stages_of(recipe, len(sl.devices), args.batch, args.patch)
    unit = sl.unit
    if sl.platform == "cuda":
        print(f"{recipe.name} ({recipe.model}) on {sl.name}: {sl.chips} x {sl.chip.generation} "
              f"GPU; figures per GPU")
    else:
        per = f" per device ({sl.devices_per_chip} per chip)" if sl.devices_per_chip > 1 else \
            " per chip"
        print(f"{recipe.name} ({recipe.model}) on {sl.name}: {sl.chips} x TPU "
              f"{sl.chip.generation}, {len(sl.devices)} devices; figures{per}")
    for line in describe(sl):
        print(line)
    print()
    head, sep = header(sl)
    print(head)
    print(sep)
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
                                 f"{unit if sl.devices_per_chip == 1 else 'device'} "
                                 f"(tried {', '.join(str(t.batch_per_chip) for t in tried)})")
        total = schedule_seconds(rows)
        where = "on this slice" if sl.platform != "cuda" else "on these GPUs"
        if total is not None:
            summaries.append(f"{d}: the schedule's {recipe.total_steps} steps take at least "
                             f"{_duration(total)} {where} "
                             f"({'FLOP' if sl.platform == 'cuda' else 'roofline'} bound)")
        else:
            bad = [r for _, _, r in rows if not r.fits]
            summaries.append(f"{d}: {len(bad)} stage(s) do not fit: try a smaller --batch, "
                             f"--set grad_accum=N, --set remat=True, or --dtype bfloat16")
    print()
    for s in summaries:
        print(s)
    print(FOOTNOTE_GPU if sl.platform == "cuda" else FOOTNOTE_TPU)
    return 0
