"""Writes docs/gpu.md: `python -m train plan` for one published recipe per family on NVIDIA GPUs.

    .venv-gpu/bin/python tools/gpu_table.py                      # compile what is missing
    .venv-gpu/bin/python tools/gpu_table.py --cached-only        # rewrite the page from the cache
    .venv-gpu/bin/python tools/gpu_table.py --budget-minutes 60  # start no compile after an hour

Every (patch, per-GPU batch) stage of each recipe at the paper's global batch on 8 x H100 and
8 x A100 80 GB, in float32 and bfloat16; the stage that needs the most memory also on one 24 GB
GPU (RTX 3090) and one A100 40 GB with the largest per-GPU batch that fits, and how many
gradient-accumulation steps then give the paper's batch. Needs the CUDA plugin (`make
gpu-plan-env`). Plans are kept in ``docs/gpu_plan.jsonl`` (committed next to the page), so the
page can be completed over several runs; rows not compiled yet say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train import plan  # noqa: E402  (stdlib only at import; jax starts in _prepare_process)

RECIPES = ("restormer_motion_deblurring", "mprnet_deblurring", "darkir_lolblur", "snr_lolv1",
           "aecrnet_its")
MACHINES = ("h100:8", "a100-80g:8")
SINGLE = ("rtx3090:1", "a100-40g:1")
DTYPES = ("float32", "bfloat16")
CACHE = os.path.join(ROOT, "docs", "gpu_plan.jsonl")
OUT = os.path.join(ROOT, "docs", "gpu.md")


class _Planner(plan.Planner):
    """Compiles until the deadline, then (or with cached_only) reads the cache alone."""

    def __init__(self, sl, cache, cached_only, deadline):
        super().__init__(sl, cache, log=lambda m: print(m, file=sys.stderr, flush=True))
        self.cached_only, self.deadline = cached_only, deadline

    def out_of_time(self) -> bool:
        return self.cached_only or bool(self.deadline and time.time() > self.deadline)

    def get(self, recipe, patch, batch):
        return self.lookup(recipe, patch, batch) if self.out_of_time() else \
            self.plan(recipe, patch, batch)


def _accumulation(global_batch: int, fitting: int) -> tuple[int, int] | None:
    """(steps, micro-batch): the fewest accumulation steps whose micro-batch fits and divides
    the paper's batch."""
    for steps in range(1, global_batch + 1):
        if global_batch % steps == 0 and global_batch // steps <= fitting:
            return steps, global_batch // steps
    return None


def _hungriest(recipe, stages):
    """The stage with the most pixels per GPU (patch^2 x batch) on 8 GPUs, as on one GPU the
    whole global batch: (patch, global batch)."""
    first, last, patch, batch = max(stages, key=lambda s: s[2] ** 2 * s[3])
    return patch, batch * 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--cached-only", action="store_true", help="compile nothing")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="start no compile after this many minutes")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes to "
                    "compile (the page shows all; the others from the cache)")
    ap.add_argument("--parts", default="machines,single",
                    help="what to compile: machines (8-GPU rows), single (24/40 GB rows)")
    ap.add_argument("--topologies", default=",".join((*MACHINES, *SINGLE)),
                    help="which of the page's GPU machines to compile for (the others from the "
                         "cache)")
    args = ap.parse_args(argv)
    chosen = {n.strip() for n in args.recipes.split(",") if n.strip()}
    parts = {p.strip() for p in args.parts.split(",")}
    wanted = {t.strip() for t in args.topologies.split(",")}
    plan._prepare_process()
    from train import recipe as recipe_lib

    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else None
    cache = plan.Cache(CACHE)
    slices = {name: plan.topology(name) for name in (*MACHINES, *SINGLE)}

    def planner(name, recipe_name, part):
        only = (args.cached_only or recipe_name not in chosen or part not in parts
                or name not in wanted)
        return _Planner(slices[name], cache, only, deadline)

    sections, missing = [], 0
    for name in RECIPES:
        recipe = recipe_lib.load(name)
        lines = [f"### {name} ({recipe.model})", ""]
        stages = plan.stages_of(recipe, 8, None, None)
        for machine in MACHINES:
            sl = slices[machine]
            p = planner(machine, name, "machines")
            lines += [f"{sl.chips} x {sl.chip.generation}:", "",
                      f"    python -m train plan --config {name} --topology {machine} "
                      f"--dtype {','.join(DTYPES)}", "", plan.GPU_HEADER, plan.GPU_SEPARATOR]
            totals = []
            for d in DTYPES:
                r_d = dataclasses.replace(recipe, dtype=d)
                rows = []
                for first, last, patch, batch in stages:
                    r = p.get(r_d, patch, batch)
                    steps = f"{first}-{last}"
                    if r is None:
                        missing += 1
                        lines.append(f"| {d} | {steps} | {patch} | {batch} | | | | | | not "
                                     "compiled yet | | | | |")
                        rows = None
                        continue
                    lines.append(plan.gpu_row(r, steps))
                    if rows is not None:
                        rows.append((first, last, r))
                total = plan.schedule_seconds(rows) if rows else None
                if total is not None:
                    totals.append(f"{d}: {recipe.total_steps} steps take at least "
                                  f"{plan._duration(total)} (FLOP bound)")
            lines += ["", *[f"- {t}" for t in totals], ""]
        patch, global_batch = _hungriest(recipe, stages)
        lines += [f"One GPU, the most memory-hungry stage ({patch}x{patch}, the paper's batch "
                  f"{global_batch}), float32:", "",
                  f"    python -m train plan --config {name} --topology rtx3090:1 --patch {patch} "
                  f"--batch 1 --max-batch", ""]
        for single in SINGLE:
            sl = slices[single]
            p = planner(single, name, "single")
            best, tried = 0, []
            if not p.out_of_time():
                try:
                    best, tried = p.max_batch(recipe, patch, 1)
                except Exception as e:  # noqa: BLE001 (reported on the page)
                    lines.append(f"- {single}: failed: {str(e).splitlines()[0][:200]}")
                    continue
            else:  # read what the cache has
                for b in range(1, global_batch + 1):
                    r = p.lookup(recipe, patch, b)
                    if r is not None:
                        tried.append(r)
                fitting = [r.batch_per_chip for r in tried if r.fits]
                best = max(fitting, default=0)
                # the largest is known once best + 1 failed, or the paper's batch fits
                known = not tried or best >= global_batch or any(
                    not r.fits and r.batch_per_chip == best + 1 for r in tried)
                if not tried or not known:
                    missing += 1
                    lines.append(f"- {sl.chip.generation} ({plan._gib(sl.chip.hbm_bytes)} GiB): "
                                 "not compiled yet" + (f" (fits {best} so far)" if best else ""))
                    continue
            fits = {r.batch_per_chip: r for r in tried}
            acc = _accumulation(global_batch, best) if best else None
            if best >= global_batch:
                r = fits[best]
                lines.append(
                    f"- {sl.chip.generation} ({plan._gib(sl.chip.hbm_bytes)} GiB, usable "
                    f"{plan._gib(r.limit_bytes)}): the paper's batch {global_batch} x {patch}^2 "
                    f"fits in one step ({plan._gib(r.needed_bytes)} GiB needed; tried "
                    f"{', '.join(str(t.batch_per_chip) for t in tried)}): no accumulation needed")
            elif best:
                r = fits[best]
                lines.append(
                    f"- {sl.chip.generation} ({plan._gib(sl.chip.hbm_bytes)} GiB, usable "
                    f"{plan._gib(r.limit_bytes)}): at most {best} x {patch}^2 per step "
                    f"({plan._gib(r.needed_bytes)} GiB needed; tried "
                    f"{', '.join(str(t.batch_per_chip) for t in tried)}); the paper's batch "
                    f"{global_batch} = {acc[0]} accumulation steps of {acc[1]} "
                    f"(`--set grad_accum={acc[0]}` with a per-GPU batch of {global_batch})")
            else:
                lines.append(f"- {sl.chip.generation}: not even one {patch}^2 image fits")
        sections.append("\n".join(lines))
    _write(sections, missing)
    print(f"wrote {OUT} ({missing} configurations not compiled yet)")
    return 0


def _write(sections, missing) -> None:
    gpus = "\n".join(
        f"| {c.generation} | {plan._gib(c.hbm_bytes)} GiB | {c.peak_flops / 1e12:.1f} | "
        f"{c.peak_tf32 / 1e12:.1f} | {c.peak_fp32 / 1e12:.1f} | {c.hbm_bandwidth / 1e9:.0f} GB/s | "
        f"`train/plan/gpus/{c.target_file}` |" for c in plan.GPUS.values())
    todo = f"; {missing} configurations are not compiled yet" if missing else ""
    head = f"""# Planning a GPU run without a GPU

`python -m train plan --topology h100:8` compiles a recipe's real train step (the trainer's
`make_train_step`: model, loss, optimizer, schedule, MixUp, the batch sharded over the GPUs' data
mesh) for NVIDIA GPUs with the CUDA plugin's deviceless compiler, on any host, over an XLA GPU
target description, and reads the compiler's memory analysis. Below: one published recipe per
family, every (patch, per-GPU batch) stage at the paper's global batch on 8 x H100 and 8 x A100
80 GB in float32 and bfloat16, and each recipe's most memory-hungry stage on one 24 GB and one
40 GB GPU. Produced by `.venv-gpu/bin/python tools/gpu_table.py` (plans cached in
`docs/gpu_plan.jsonl`{todo}). Set-up: `make gpu-plan-env` (README).

How to read a row (figures per GPU):

- **needed** = arguments (parameters, optimizer state, the batch shard) + outputs not aliased to
  the donated state + temporaries + code, from the compiled program's memory analysis. Nothing is
  autotuned without a GPU (cuDNN gets no algorithm and no workspace), so it is an estimate from
  below; GEMMs are planned as cuBLAS calls (XLA's Triton GEMM emitter failed deviceless on
  DarkIR's step, so it is off for every plan).
- **usable** = 75% of the GPU's memory: what JAX's allocator preallocates by default. The GPU
  compiler refuses nothing, so **fits** is needed <= usable. With
  `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` more is usable (`--mem-fraction 0.95` plans for it).
- **GFLOP/step**: every operation of the step's jaxpr (`jax.experimental.roofline`; convolutions
  and matmuls as 2 x multiply-adds); the compiled GPU executables have no cost analysis here.
- **FLOP bound ms/step** = max(FLOPs / peak, (arguments + outputs) / bandwidth): a loose lower
  bound from the published peaks below, not a measurement. Unlike the TPU table's roofline it
  has no activation traffic in it (the compiler's byte count is not available for GPU programs),
  and these convolution networks with few channels are usually limited by memory traffic on a
  GPU, so real steps are many times slower. **img/s/GPU** is the same bound in images.
- **float32 means TF32 on these GPUs.** JAX's default matmul precision runs float32 convolutions
  and matmuls on Ampere and Hopper as TF32 on the tensor cores (10-bit mantissa inputs, float32
  accumulation), as PyTorch does for convolutions by default; the float32 rows are bounded by the
  TF32 peak. The trainer uses JAX's default; a recipe chooses with `--set matmul_precision=highest`
  (full float32, bounded by the float32 peak, several times slower) or `bfloat16` compute with
  `--set dtype=bfloat16` (parameters and optimizer state stay float32).
- **micro-batches**: gradient accumulation (`grad_accum`): the per-GPU batch is split into that
  many micro-batches and one optimizer step is applied; memory follows the micro-batch.
- **compile s**: wall time of the deviceless compile on the 2-core host that made the row.

| GPU | memory | bfloat16 TFLOP/s | TF32 | float32 | bandwidth | target description |
|---|---|---|---|---|---|---|
{gpus}

Peaks are dense (no sparsity): NVIDIA's H100 and A100 datasheets, the Ampere GA102 whitepaper
for the RTX 3090 (24 GB; its bfloat16 figure is with float32 accumulation). The target
descriptions come from XLA's `xla/backends/gpu/target_config/specs/` (commits named in each
file); the RTX 3090's is derived from XLA's RTX A6000 file (same GA102 chip; SM count, clock,
memory size and bandwidth changed to the 3090's published figures).

No figure here was measured on a GPU.
"""
    with open(OUT, "w") as f:
        f.write(head + "\n" + "\n\n".join(sections) + "\n")


if __name__ == "__main__":
    sys.exit(main())
