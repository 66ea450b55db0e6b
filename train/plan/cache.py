"""Plans already made (a JSON-lines file) and the planner that consults it: a cached plan is
used only while the lowered program it was compiled from is unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from train.plan.compile import Result, compile_lowered, lower_step, versions
from train.plan.targets import Slice


def _key(recipe_dict: dict, topology_name: str, patch: int, batch: int, vers: dict) -> str:
    blob = json.dumps({"recipe": recipe_dict, "topology": topology_name, "patch": patch,
                       "batch": batch, "versions": vers}, sort_keys=True, default=str)
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


class Planner:
    """Compiles (or finds in the cache) one configuration at a time.

    The cache is looked up by recipe, stage, topology and versions; the entry found is used only
    if the program lowered now is the one it was compiled from (``Result.program``, a hash of
    the lowered StableHLO), so a change to a model file or to the train step is recompiled.
    Lowering costs seconds, compiling minutes. :meth:`lookup` trusts the cache without lowering
    (for pages written from committed plans)."""

    def __init__(self, sl: Slice, cache: Cache, refresh: bool = False, log=print,
                 mem_fraction: float = 0.75):
        self.slice, self.cache, self.refresh, self.log = sl, cache, refresh, log
        self.mem_fraction = mem_fraction
        self.versions = versions(sl.platform)

    def key(self, recipe, patch: int, batch_per_chip: int) -> str:
        from train import recipe as recipe_lib

        rdict = json.loads(json.dumps(recipe_lib.to_dict(recipe), default=str))
        if rdict.get("grad_accum", 1) == 1:  # keys of plans made before the field existed
            rdict.pop("grad_accum", None)
        if rdict.get("matmul_precision", "default") == "default":
            rdict.pop("matmul_precision", None)
        name = self.slice.name
        if self.slice.platform == "cuda":  # what the fit is judged against
            name += f"@{self.mem_fraction:g}"
        return _key(rdict, name, patch, batch_per_chip, self.versions)

    def lookup(self, recipe, patch: int, batch_per_chip: int) -> Result | None:
        """The cached plan, or None (compiles nothing, lowers nothing)."""
        return self.cache.get(self.key(recipe, patch, batch_per_chip))

    def plan(self, recipe, patch: int, batch_per_chip: int) -> Result:
        key = self.key(recipe, patch, batch_per_chip)
        hit = None if self.refresh else self.cache.get(key)
        lowered, program = lower_step(recipe, self.slice, patch, batch_per_chip)
        if hit is not None and hit.program == program:
            return hit
        why = "" if hit is None else (" (the program changed since it was cached)" if hit.program
                                      else " (cached without a program hash)")
        unit = self.slice.unit
        self.log(f"compiling {recipe.name} ({recipe.dtype}{', remat' if recipe.remat else ''}) "
                 f"for {self.slice.name}: {batch_per_chip} x {patch}x{patch} per {unit}{why} ...")
        result = compile_lowered(recipe, self.slice, lowered, program, patch, batch_per_chip,
                                 self.mem_fraction)
        self.log(f"  {'fits' if result.fits else 'does not fit'} "
                 f"({result.needed_bytes / 1024 ** 3:.2f} GiB), compiled in "
                 f"{result.compile_seconds:.0f} s")
        self.cache.put(key, result)
        return result

    def max_batch(self, recipe, patch: int, start: int) -> tuple[int, list[Result]]:
        """The largest per-chip batch that fits (0 if not even 1): bracketing by doubling, then
        bisection with guesses from the linear growth of memory with the batch."""
        tried: dict[int, Result] = {}
        step = recipe.grad_accum  # micro-batches must split

        def fits(b: int) -> bool:
            tried[b] = self.plan(recipe, patch, b * step)
            return tried[b].fits

        lo, hi = 0, None  # lo fits (0: nothing known), hi does not
        b = max(1, start // step)
        while hi is None:
            if fits(b):
                lo, b = b, self._guess(tried, b * 2, step)
            else:
                hi = b
        while hi - lo > 1:
            if lo == 0:
                b = 1
            else:
                b = min(hi - 1, max(lo + 1, self._guess(tried, (lo + hi) // 2, step)))
            if fits(b):
                lo = b
            else:
                hi = b
        return lo * step, [tried[k] for k in sorted(tried)]

    def _guess(self, tried: dict[int, Result], fallback: int, step: int = 1) -> int:
        ok = sorted((b, r.needed_bytes) for b, r in tried.items() if r.fits)
        limit = self.slice.chip.hbm_bytes // self.slice.devices_per_chip
        if self.slice.platform == "cuda":
            limit = int(self.mem_fraction * limit)
        bad = [r.limit_bytes for r in tried.values() if r.limit_bytes and not r.fits]
        limit = min(bad) if bad else limit
        if len(ok) >= 2:
            (b0, m0), (b1, m1) = ok[-2], ok[-1]
            per = (m1 - m0) / (b1 - b0)
            if per > 0:
                return max(1, int((limit - m1) / per) + b1)
        return fallback
