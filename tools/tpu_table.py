"""Writes docs/tpu.md: `python -m train plan` for one published recipe per family, on v5e-8.

    python tools/tpu_table.py                      # compile what is missing, rewrite the page
    python tools/tpu_table.py --cached-only        # rewrite the page from the cache alone
    python tools/tpu_table.py --budget-minutes 60  # stop compiling after an hour
    python tools/tpu_table.py --recipes snr_lolv1  # compile one recipe's missing rows only

Every (patch, per-chip batch) stage of each recipe in float32 and bfloat16 on ``v5e:2x4``, and
the stage that needs the most memory also on ``v6e:2x4``. A compile of a full-width network for a
TPU takes minutes on a 2-core host, so the plans are kept in ``docs/tpu_plan.jsonl`` (the plan's
cache, committed next to the page) and the page can be completed over several runs; rows not
compiled yet say so.
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
MAIN, OTHER = "v5e:2x4", "v6e:2x4"
DTYPES = ("float32", "bfloat16")
CACHE = os.path.join(ROOT, "docs", "tpu_plan.jsonl")
OUT = os.path.join(ROOT, "docs", "tpu.md")


class OutOfTime(Exception):
    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--cached-only", action="store_true", help="compile nothing")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="start no compile after this many minutes")
    ap.add_argument("--recipes", default=",".join(RECIPES),
                    help="comma-separated recipe names to compile (the page shows every recipe "
                         "of the table; the others from the cache)")
    args = ap.parse_args(argv)
    chosen = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(RECIPES))
    if unknown:
        ap.error(f"--recipes: not in the table: {', '.join(unknown)} (choose from "
                 f"{', '.join(RECIPES)})")
    plan._prepare_process()
    from train import recipe as recipe_lib

    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else None
    cache = plan.Cache(CACHE)
    slices = {name: plan.topology(name) for name in (MAIN, OTHER)}
    # recipes not chosen are read from the cache only
    compiling, reading = ({t: _Planner(sl, cache, cached_only, deadline)
                           for t, sl in slices.items()} for cached_only in (args.cached_only, True))
    sections, missing = [], 0
    for name in RECIPES:
        recipe = recipe_lib.load(name)
        planners = compiling if name in chosen else reading
        sl = slices[MAIN]
        stages = plan.stages_of(recipe, len(sl.devices), None, None)
        cmd = (f"python -m train plan --config {name} --topology {MAIN} --dtype "
               f"{','.join(DTYPES)}")
        lines = [f"### {name} ({recipe.model})", "", f"    {cmd}", "", plan.HEADER,
                 plan.SEPARATOR]
        notes, biggest, by_stage = [], None, {}
        for d in DTYPES:
            r_d = dataclasses.replace(recipe, dtype=d)
            rows = []
            for first, last, patch, batch in stages:
                r = planners[MAIN].get(r_d, patch, batch)
                by_stage.setdefault((patch, batch), {})[d] = r
                steps = f"{first}-{last}"
                if r is None:
                    missing += 1
                    lines.append(f"| {d} | {steps} | {patch} | {batch} | not compiled yet |"
                                 + " |" * 9)
                    continue
                rows.append((first, last, r))
                lines.append(plan.table_row(r, steps, sl.chip, sl.devices_per_chip))
                if d == "float32" and (biggest is None or r.needed_bytes > biggest[2].needed_bytes):
                    biggest = (patch, batch, r)
            if len(rows) == len(stages):
                total = plan.schedule_seconds(rows)
                if total is not None:
                    notes.append(f"{d}: the {recipe.total_steps} steps take at least "
                                 f"{plan._duration(total)} on {MAIN} (roofline bound: sum over the "
                                 f"stages of steps x roofline step time)")
                else:
                    notes.append(f"{d}: a stage does not fit in HBM: see the rows marked **no**")
        # what fits where float32 does not: bfloat16 (compiled above), else float32 with remat
        # (compiled only then: a fitting full-width compile takes up to an hour and a half here)
        for first, last, patch, batch in stages:
            r32, r16 = (by_stage[(patch, batch)].get(d) for d in DTYPES)
            if r32 is None or r32.fits:
                continue
            remat = dataclasses.replace(recipe, remat=True)
            need_remat = r16 is not None and not r16.fits
            planner = planners[MAIN]
            rr = (planner.get(remat, patch, batch) if need_remat
                  else planner.lookup(remat, patch, batch))
            limit = r32.limit_bytes or sl.chip.hbm_bytes / sl.devices_per_chip
            parts = ["bfloat16: not compiled yet" if r16 is None else _verdict("bfloat16", r16)]
            if rr is not None:
                parts.append(_verdict("float32 with `--set remat=True`", rr))
            elif need_remat:
                missing += 1
                parts.append("float32 with `--set remat=True`: not compiled yet")
            notes.append(f"steps {first}-{last} ({batch} x {patch}x{patch} per chip) need more "
                         f"than {plan._gib(r32.needed_bytes)} GiB in float32, over the "
                         f"{plan._gib(limit)} GiB the compiler allows: " + "; ".join(parts))
        if biggest is not None:
            patch, batch, _ = biggest
            o = slices[OTHER]
            ob = batch * len(sl.devices) // len(o.devices)
            lines += ["", f"The stage needing the most memory (float32, {patch}x{patch}) on "
                      f"{OTHER} ({o.chips} x TPU {o.chip.generation}, same global batch):", "",
                      f"    python -m train plan --config {name} --topology {OTHER} --patch "
                      f"{patch} --batch {ob}",
                      "", plan.HEADER, plan.SEPARATOR]
            r = planners[OTHER].get(recipe, patch, ob)
            if r is None:
                missing += 1
                lines.append(f"| float32 | | {patch} | {ob} | not compiled yet |" + " |" * 9)
            else:
                lines.append(plan.table_row(r, "", o.chip, o.devices_per_chip))
        lines += [""] + [f"- {n}" for n in notes] + [""]
        sections.append("\n".join(lines))
    _write(sections, missing)
    print(f"wrote {OUT} ({missing} configurations not compiled yet)")
    return 0


def _verdict(what: str, r) -> str:
    if not r.fits:
        return f"{what} does not fit either (> {plan._gib(r.needed_bytes)} GiB)"
    return (f"{what} fits ({plan._gib(r.needed_bytes)} GiB, roofline "
            f"{1e3 * r.roofline_seconds():.0f} ms/step)")


class _Planner(plan.Planner):
    def __init__(self, sl, cache, cached_only, deadline):
        super().__init__(sl, cache, log=lambda m: print(m, file=sys.stderr, flush=True))
        self.cached_only, self.deadline = cached_only, deadline

    def get(self, recipe, patch, batch):
        if self.cached_only or (self.deadline and time.time() > self.deadline):
            return self.lookup(recipe, patch, batch)
        return self.plan(recipe, patch, batch)


def _write(sections, missing) -> None:
    chips = "\n".join(f"| {c.generation} | {c.hbm_bytes / plan.GiB:.0f} GiB | "
                      f"{c.peak_flops / 1e12:.0f} TFLOP/s | {c.hbm_bandwidth / 1e9:.0f} GB/s |"
                      for c in plan.CHIPS.values())
    todo = f"; {missing} configurations are not compiled yet" if missing else ""
    head = f"""# Planning a TPU run without a TPU

`python -m train plan` compiles a recipe's real train step (the trainer's `make_train_step`: model,
loss, optimizer, schedule, MixUp, the batch sharded over the slice's data mesh) for a TPU slice
with libtpu's deviceless compiler, on any host, and reads the compiler's memory and cost
analyses. Below: one published recipe per family, every (patch, per-chip batch) stage, on a
v5e-8 slice (`{MAIN}`) in float32 and bfloat16, and each recipe's most memory-hungry stage on a
v6e-8 slice (`{OTHER}`). Produced by `python tools/tpu_table.py` (plans cached in
`docs/tpu_plan.jsonl`, so the page is completed over several runs{todo}).

How to read a row (figures per chip):

- **needed** = arguments (parameters, optimizer state, the batch shard) + outputs not aliased to
  the donated state + temporaries + code, from the compiled program's memory analysis. A program
  that does not fit is refused by the TPU compiler; **no** rows give what it said it needed.
  Where a stage does not fit: a smaller per-chip batch (`--batch`, more chips for the same global
  batch), `--set remat=True` (recompute block activations in the backward pass), or
  `--dtype bfloat16`; `--max-batch` finds the largest per-chip batch that fits.
- **GFLOP/step**, **GB/step**: the compiler's cost analysis of the per-chip program.
- **roofline ms/step** = max(FLOPs / peak, bytes / HBM bandwidth): a lower bound on the step
  time from the published chip figures below, not a measurement; real steps are slower
  (convolutions with few channels use a small part of the MXU). **img/s/chip** follows from it.
  XLA's own `optimal_seconds` is not used (it came back negative for the Restormer step).
- float32 matmuls and convolutions at JAX's default precision run as one bfloat16 pass on the
  MXU, so the same peak bounds both dtypes; the bfloat16 rows differ in memory and bytes moved.
- **compile s**: wall time of the compile on the 2-core host that made the row, often shared
  with other jobs (most rows were compiled at low priority beside test runs). The compiler's own
  memory grows with the program: a fitting full-width compile took 11-26 GB of host memory here
  (the most, Restormer's 1 x 384x384 float32 step for v6e: 25.6 GB peak, resident plus swap).

| chip | HBM | peak (bfloat16, dense) | HBM bandwidth |
|---|---|---|---|
{chips}

Published figures: Google Cloud's TPU system architecture pages (v4, v5e, v5p, v6e).

"""
    with open(OUT, "w") as f:
        f.write(head + "\n".join(sections))


if __name__ == "__main__":
    sys.exit(main())
