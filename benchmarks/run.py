"""Flax vs the torch reference: forward and training-step times, in one process, interleaved.

    .venv/bin/python benchmarks/run.py                                   # one variant per family
    .venv/bin/python benchmarks/run.py --models restormer mprnet:deraining --sizes 256 --repeats 5
    .venv/bin/python benchmarks/run.py --no-train --sizes 256 512 --out docs/benchmarks.md

For every model (``--models`` takes registry names or family names; a family means its
representative variant):

* forward, batch 1, at each ``--sizes`` (square): the Flax module jitted (timed after the
  compile, which is timed on its own: lowering + XLA compile), the torch reference module as the
  original runs it (eager, ``torch.no_grad()``, NCHW) and the same module in channels-last
  memory format. Both sides hold the same weights (the torch module's, converted), and the
  largest output difference is printed as a sanity check.
* training step, batch ``--train-batch`` (4) at the recipe's patch size (its first progressive
  stage): the trainer's own jitted step (``train.step.make_train_step`` on a one-device mesh:
  the recipe's loss, optimizer, clipping) against the torch reference in train mode with the
  same loss (the torch counterparts in ``porting.reference.losses``) and the matching
  ``torch.optim`` optimizer (zero_grad, forward, loss, backward, clip, step), eager NCHW.

Each repeat runs Flax, torch, torch channels-last back to back (after one warm-up call of each),
so a load change on the machine hits all of them alike; the table reports medians and the ratio
Flax / torch (NCHW eager). Torch runs on ``--threads`` intra-op threads (default: all cores);
XLA:CPU uses every core.

Peak memory ("peak +RSS"): the largest increase of the process's resident set during one extra
call, sampled every 2 ms by a thread reading /proc/self/statm, above the RSS just before the
call (after ``malloc_trim``). It is what the call needs beyond what is already resident (weights,
compiled program, cached allocator blocks not returned to the OS), so it is a lower bound on the
working set and only roughly comparable between frameworks. For Flax the XLA buffer assignment
("XLA temp") is printed too: the temporaries the compiled program allocates, exactly.

Results go to ``--out`` (default docs/benchmarks.md) as a markdown table with the machine (CPU
model, cores, versions) and the command line. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import functools
import gc
import os
import platform
import re
import statistics
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
from flaxrestore import lowering as _lowering  # noqa: E402
from flaxrestore.xla_cpu import tuning as _tuning  # noqa: E402

# as `python -m train` does, before jax starts; torch shares the heap
RETAINS_MEMORY = _tuning.tune_cpu_process()["retain_freed_memory"]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import porting  # noqa: E402
from flaxrestore import models  # noqa: E402
from porting import reference  # noqa: E402

# family -> (representative variant, its training recipe)
FAMILIES = {
    "restormer": ("restormer:motion_deblurring", "restormer_motion_deblurring"),
    "mprnet": ("mprnet:deblurring", "mprnet_deblurring"),
    "darkir": ("darkir:m", "darkir_lolblur"),
    "snr": ("snr", "snr_lolv1"),
    "aecrnet": ("aecrnet", "aecrnet_its"),
}
# variants whose own recipe differs from the family's
RECIPES = {
    "restormer:deraining": "restormer_deraining",
    "restormer:real_denoising": "restormer_real_denoising",
    "restormer:gaussian_color_denoising": "restormer_gaussian_color_denoising",
    "restormer:gaussian_gray_denoising": "restormer_gaussian_gray_denoising",
    "restormer:single_image_defocus_deblurring": "restormer_defocus_deblurring",
    "mprnet:deraining": "mprnet_deraining",
    "mprnet:denoising": "mprnet_denoising",
}

MIB = 1024 ** 2


# --------------------------------------------------------------------------------------------
# measuring


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_rss_increase(fn) -> int:
    """Bytes: max RSS sampled during ``fn()`` minus RSS before it."""
    _trim()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return peak[0] - base


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0


MEM_TOTAL = _mem_total()  # bytes of RAM (0 if unknown), read once

# Return freed memory to the OS before a timed call only above this share of the machine's memory.
TRIM_ABOVE = 0.5
_TRIMS = {"timed": 0, "above": TRIM_ABOVE}  # trimmed timed calls (for the notes); threshold


def timed(fn) -> float:
    # Untimed, before the call: when the process holds more than --trim-above of the machine's
    # memory, return what the previous calls freed to the OS, then make one untimed call, which
    # faults the memory in again: the timed call then runs warm, as every step of a training
    # loop after the first does. Without the trim glibc kept torch's freed activations and XLA's
    # temporaries both resident and Restormer's training step (13.8 GB of XLA temporaries at
    # 4x128x128) ran out of the 24 GB machine's memory; timing the call right after the trim
    # measured the page faults more than the step (Restormer 4x128: 3.9 million faults, Flax
    # 36-38 s cold against 17 s warm, torch 32-35 s against 16-17 s). Below the threshold, freed
    # memory stays for reuse, for both frameworks, as in a training or inference process
    # (retain_freed_cpu_memory).
    if not RETAINS_MEMORY or not MEM_TOTAL or _rss() > _TRIMS["above"] * MEM_TOTAL:
        _trim()
        fn()
        _TRIMS["timed"] += 1
    else:
        gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _trim_note(before: int) -> str:
    n = _TRIMS["timed"] - before
    return (f", freed memory returned to the OS and faulted in again by an untimed call before "
            f"{n} timed calls" if n else "")


def interleaved(fns: dict, repeats: int, label: str) -> dict[str, list[float]]:
    """One warm-up call of each, then ``repeats`` rounds calling each once, in order."""
    times = {k: [] for k in fns}
    for k, f in fns.items():
        t = timed(f)
        print(f"    {label} warm-up {k}: {t:.3f}s", flush=True)
    for r in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f))
        print(f"    {label} round {r + 1}/{repeats}: " +
              ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    return times


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------------------------
# models


def resolve(items: list[str]) -> list[str]:
    names = models.names()
    out = []
    for item in items:
        if item == "all":
            out += [v for v, _ in FAMILIES.values()]
        elif item in FAMILIES:
            out.append(FAMILIES[item][0])
        elif item in names:
            out.append(item)
        else:
            raise SystemExit(f"unknown model {item!r}; families: {', '.join(FAMILIES)}; "
                             f"names: {', '.join(names)}")
    return list(dict.fromkeys(out))


def recipe_for(name: str):
    from train import recipe as recipe_lib

    family = models.entry(name).family
    spec = RECIPES.get(name, FAMILIES[family][1])
    rec = recipe_lib.load(spec)
    if rec.model != name:
        rec = dataclasses.replace(rec, model=name)
    return spec, rec


def torch_inputs(name: str, arrays, channels_last: bool = False):
    xs = [_nchw(a) for a in arrays]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    return xs


@dataclasses.dataclass
class Row:
    model: str
    what: str  # "forward 256x256" / "train 128x128 x4"
    flax: float
    torch: float
    torch_cl: float | None
    compile_s: float
    flax_mem: int | None
    torch_mem: int | None
    xla_temp: int | None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.flax / self.torch


def bench_forward(name: str, ref: torch.nn.Module, net: nnx.Module, size: int, repeats: int,
                  channels_last: bool, memory: bool) -> Row:
    entry = models.entry(name)
    cfg = models.get_config(name)
    arrays = entry.cls.example_inputs(cfg, 1, size, size, np.random.default_rng(0))
    graph, state = nnx.split(net)

    # the options the trainer and flaxrestore.restore compile with (FLAXRESTORE_XNN_CONVS=0: none)
    @functools.partial(jax.jit, compiler_options=_lowering.compiler_options())
    def fwd(state, *xs):
        return nnx.merge(graph, state)(*xs)

    xs = [jnp.asarray(a) for a in arrays]
    t0 = time.perf_counter()
    compiled = fwd.lower(state, *xs).compile()
    compile_s = time.perf_counter() - t0
    try:
        xla_temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001 - not every backend reports it
        xla_temp = None
    print(f"  forward {size}x{size}: compiled in {compile_s:.1f}s, XLA temp {_mib(xla_temp)} MiB",
          flush=True)

    tx = torch_inputs(name, arrays)
    fns = {"flax": lambda: jax.block_until_ready(compiled(state, *xs))}

    def run_torch(inputs):
        with torch.no_grad():
            return ref(*inputs)

    fns["torch"] = lambda: run_torch(tx)
    if channels_last:
        import copy

        ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
        tcl = torch_inputs(name, arrays, channels_last=True)

        def run_cl():
            with torch.no_grad():
                return ref_cl(*tcl)

        fns["torch_cl"] = run_cl
    # the same numbers on both sides (a sanity check, printed)
    y = np.asarray(_first(compiled(state, *xs)))
    yt = _first(run_torch(tx)).numpy().transpose(0, 2, 3, 1)
    diff = float(np.max(np.abs(y - yt)))
    print(f"  forward {size}x{size}: max |flax - torch| = {diff:.2e}", flush=True)
    trims = _TRIMS["timed"]
    times = interleaved(fns, repeats, f"forward {size}")
    trim_note = _trim_note(trims)
    flax_mem = torch_mem = None
    if memory:
        flax_mem = peak_rss_increase(fns["flax"])
        torch_mem = peak_rss_increase(fns["torch"])
    med = {k: statistics.median(v) for k, v in times.items()}
    return Row(name, f"forward {size}x{size}", med["flax"], med["torch"], med.get("torch_cl"),
               compile_s, flax_mem, torch_mem, xla_temp, note=f"max diff {diff:.1e}{trim_note}")


# --------------------------------------------------------------------------------------------
# training step


def torch_loss(recipe, ref_vgg):
    """The recipe's loss on torch tensors: fn(outputs, gt, lq) with outputs (main, all, side)."""
    from porting.reference import losses as L

    terms = []
    for t in recipe.losses:
        if not t.weight:
            continue
        o = dict(t.options)
        if t.kind == "l1":
            fn = L.l1
        elif t.kind == "mse":
            fn = torch.nn.functional.mse_loss
        elif t.kind == "charbonnier":
            fn = L.CharbonnierLoss(o.get("eps", 1e-3))
        elif t.kind == "charbonnier_sum":
            fn = L.CharbonnierSumLoss(o.get("eps", 1e-6))
        elif t.kind == "edge":
            fn = L.EdgeLoss(3, o.get("eps", 1e-3))
        elif t.kind == "laplacian_mse":
            fn = L.DarkIREdgeLoss(3)
        elif t.kind == "frequency":
            fn = L.FrequencyLoss()
        elif t.kind == "perceptual":
            fn = L.VGGPerceptualLoss(ref_vgg, reduction=o.get("reduction", "mean"))
        elif t.kind == "contrastive":
            cr = L.ContrastLoss(ref_vgg)
            fn = lambda p, g, lq, cr=cr: cr(p, g, lq)  # noqa: E731
        else:
            raise ValueError(f"no torch counterpart for loss kind {t.kind!r}")
        terms.append((t, fn))

    def loss(main, all_, side, gt, lq):
        total = 0.0
        for t, fn in terms:
            if t.outputs == "main":
                preds = [main]
            elif t.outputs == "all":
                preds = list(all_)
            else:
                preds = [torch.nn.functional.interpolate(side, scale_factor=gt.shape[2] // side.shape[2],
                                                         mode="nearest")]
            for p in preds:
                if t.clamp:
                    p = torch.clamp(p, 0, 1)
                v = fn(p, gt, lq) if t.kind == "contrastive" else fn(p, gt)
                total = total + t.weight * v
        return total

    return loss


def torch_optimizer(cfg, params):
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def bench_train(name: str, ref: torch.nn.Module, net: nnx.Module, batch: int, repeats: int,
                channels_last: bool, memory: bool, remat: bool = False) -> Row:
    import copy

    from porting.reference.vgg import VGG19Features
    from train import schedules
    from train import step as S

    spec, recipe = recipe_for(name)
    patch = recipe.stage_at(1).patch_size or int(recipe.data.get("patch_size") or 256)
    recipe = dataclasses.replace(recipe, batch_size=batch, stages=(), remat=remat)
    rng = np.random.default_rng(0)
    arrays = models.entry(name).cls.example_inputs(models.get_config(name), batch, patch, patch,
                                                   rng)
    lq = arrays[0]
    gt = np.clip(lq + 0.05 * rng.standard_normal(lq.shape), 0, 1).astype(np.float32)

    # ---- flax: the trainer's step, with the torch module's weights
    model = S.build_model(recipe)
    params, model_state = S.split_module(net)
    model = dataclasses.replace(model, params=params, model_state=model_state)
    ref_vgg = vgg_graph = None
    frozen = {}
    if S.needs_vgg(recipe):
        ref_vgg = VGG19Features(num_layers=30).eval()
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_vgg_{os.getpid()}.npz")
        np.savez(path, **{k: v.numpy() for k, v in ref_vgg.state_dict().items()})
        vgg_graph, vgg_params = S.load_vgg(path)
        os.remove(path)
        frozen = {"vgg": vgg_params}
    mesh = S.make_mesh(jax.devices()[:1])
    tx = schedules.make_optimizer(recipe.optimizer)
    step = S.make_train_step(recipe, model, tx, mesh, vgg_graph)
    holder = {"state": S.replicate(mesh, S.init_state(model, tx, bool(recipe.ema_decay)))}
    data = S.global_batch(mesh, {"lq": lq, "gt": gt})
    frozen = S.replicate(mesh, frozen)
    t0 = time.perf_counter()
    compiled = step.lower(holder["state"], data, frozen).compile()
    compile_s = time.perf_counter() - t0
    try:
        xla_temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001
        xla_temp = None
    print(f"  train {patch}x{patch} x{batch} ({spec}): compiled in {compile_s:.1f}s, XLA temp "
          f"{_mib(xla_temp)} MiB", flush=True)

    def flax_step():
        holder["state"], metrics = compiled(holder["state"], data, frozen)
        jax.block_until_ready(metrics["loss"])
        return metrics

    # ---- torch: the reference module, the same loss and optimizer, eager
    loss_fn = torch_loss(recipe, ref_vgg)

    def make_torch_step(module, cl):
        module.train()
        opt = torch_optimizer(recipe.optimizer, module.parameters())
        tl, tg = torch_inputs(name, [lq, gt], cl)
        family = models.entry(name).family
        if family == "snr":
            from porting.reference.snr import snr_map
        clip = recipe.optimizer.grad_clip_norm

        def run():
            opt.zero_grad(set_to_none=True)
            side = None
            if recipe.forward == "side":
                side, out = module(tl, side_loss=True)
            elif family == "snr":
                out = module(tl, snr_map(tl))
            else:
                out = module(tl)
            all_ = tuple(out) if isinstance(out, (list, tuple)) else (out,)
            loss = loss_fn(all_[0], all_, side, tg, tl)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            opt.step()
            return loss

        return run

    ref_train = copy.deepcopy(ref)
    fns = {"flax": flax_step, "torch": make_torch_step(ref_train, False)}
    if channels_last:
        ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
        fns["torch_cl"] = make_torch_step(ref_cl, True)
    l_flax = float(flax_step()["loss"])
    _trim()
    l_torch = float(fns["torch"]().detach())
    print(f"  train: first loss flax {l_flax:.5g} torch {l_torch:.5g}", flush=True)
    trims = _TRIMS["timed"]
    times = interleaved(fns, repeats, f"train {patch}")
    trim_note = _trim_note(trims)
    flax_mem = torch_mem = None
    if memory:
        flax_mem = peak_rss_increase(flax_step)
        torch_mem = peak_rss_increase(fns["torch"])
    med = {k: statistics.median(v) for k, v in times.items()}
    what = f"train {patch}x{patch} x{batch}" + (" remat" if remat else "")
    return Row(name, what, med["flax"], med["torch"],
               med.get("torch_cl"), compile_s, flax_mem, torch_mem, xla_temp,
               note=f"{spec}, first loss {l_flax:.4g} / {l_torch:.4g}{trim_note}")


# --------------------------------------------------------------------------------------------
# report


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch on {torch.get_num_threads()} threads; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")


def _mib(v) -> str:
    return "-" if v is None else f"{v / MIB:.0f}"


def table(rows: list[Row]) -> str:
    head = ("| model | measurement | Flax (s) | torch (s) | torch channels-last (s) | "
            "Flax / torch | compile (s) | peak +RSS Flax / torch (MiB) | XLA temp (MiB) | notes |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        cl = "-" if r.torch_cl is None else f"{r.torch_cl:.3f}"
        lines.append(f"| {r.model} | {r.what} | {r.flax:.3f} | {r.torch:.3f} | {cl} | "
                     f"**{r.ratio:.2f}** | {r.compile_s:.1f} | {_mib(r.flax_mem)} / "
                     f"{_mib(r.torch_mem)} | {_mib(r.xla_temp)} | {r.note} |")
    return "\n".join(lines)


_RUN_LINE = re.compile(r"^\* (\d{4}-\d\d-\d\d \d\d:\d\d), load ([\d./]+): `([^`]*)`")
_STARTED = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")  # names this run in the report
_ROW_LINE = re.compile(r"^\| ([^|]+?) \| ((?:forward|train) [^|]+?) \| ")


def _previous_report(path: str) -> tuple[list[str], dict[tuple[str, str], str], list[str], str]:
    """(run lines, table rows by (model, measurement), failure lines, machine) of an earlier
    report."""
    runs, rows, failures, mach = [], {}, [], ""
    if not os.path.exists(path):
        return runs, rows, failures, mach
    with open(path) as f:
        for line in f.read().splitlines():
            if line.startswith("Machine: "):
                mach = line[len("Machine: "):].rstrip(".")
            elif _RUN_LINE.match(line):
                runs.append(line)
            elif (m := _ROW_LINE.match(line)):
                rows[(m.group(1), m.group(2))] = line
            elif line.startswith("* ") and " FAILED: " in line:
                failures.append(line)
    return runs, rows, failures, mach


def write_markdown(path: str, rows: list[Row], argv: list[str],
                   failures: list[str] = (), merge: bool = False) -> None:
    """Writes the report. With ``merge``, rows of an earlier report at ``path`` that this run did
    not measure are kept (a row measured again is replaced), and the list of runs grows; an
    earlier report from another machine (its ``Machine:`` line differs) is replaced instead."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    command = f"python benchmarks/run.py {' '.join(argv)}"
    this_run = f"* {_STARTED}, load {load}: `{command}`"
    runs, old_rows, old_failures, old_machine = (_previous_report(path) if merge
                                                 else ([], {}, [], ""))
    if old_machine and old_machine != machine():
        print(f"--merge: {path} was measured on another machine ({old_machine}); its rows are "
              "not merged, the report starts again", file=sys.stderr, flush=True)
        runs, old_rows, old_failures = [], {}, []
    # the report is rewritten after every measurement: this run's own earlier line is replaced
    runs = [ln for ln in runs if _RUN_LINE.match(ln).group(1, 3) != (_STARTED, command)]
    new_lines = table(rows).splitlines()
    header, new_rows = new_lines[:2], new_lines[2:]
    by_key = dict(old_rows)
    for r, line in zip(rows, new_rows):
        by_key[(r.model, r.what)] = line
    order = {n: i for i, n in enumerate(
        n for fam in FAMILIES for n in models.names(fam))}

    def sort_key(key):
        model, what = key
        kind, _, rest = what.partition(" ")
        size = int(rest.split("x")[0]) if rest[:1].isdigit() else 0
        return (order.get(model, len(order)), kind != "forward", size, what)

    all_rows = [by_key[k] for k in sorted(by_key, key=sort_key)]
    fail_lines = [ln for ln in old_failures if not any(ln.startswith(f"* {r.model} ")
                                                       for r in rows)]
    fail_lines += [f"* {f_}" for f_ in failures]
    text = f"""# Benchmarks: Flax vs the torch reference

Machine: {machine()}.

Runs that produced the rows below (date, load average over 1/5/15 min when the report was
written, command); `--merge` adds a run's rows to the earlier ones:

{chr(10).join(runs + [this_run])}

A load above the core count means other processes competed for the CPU; torch's OpenMP threads
lose much more to such contention than XLA's thread pool, so ratios measured under load favour
Flax.

float32; forward at batch 1 (Flax jitted with the trainer's compile options, timed after
compiling; torch eager under no_grad, NCHW as the originals run, and channels-last); training
step (forward + backward + optimizer) at batch 4 (`--train-batch`) and the recipe's first patch
size (Flax: the trainer's jitted step; torch: the reference module, the same loss and optimizer,
eager NCHW). Medians of interleaved
rounds (`--repeats`, `--train-repeats`) after one warm-up call each. Both frameworks share the
process and its malloc, which keeps freed memory for reuse (as the trainer sets it up:
`flaxrestore.xla_cpu.tuning.retain_freed_cpu_memory`); only when the process holds more than half the
machine's memory (`--trim-above`) is freed memory returned to the OS before a timed call, and
then one untimed call faults it in again, so that the timed call runs warm as the steps of a
training loop do (the row's notes say when that happened).
**Flax / torch** is Flax over torch NCHW eager; below 1 Flax is faster. Compile: lowering + XLA
compile of that program (once per shape; on CPU with `flaxrestore.lowering.compiler_options()`:
3x3 convolutions on XNNPACK, `FLAXRESTORE_XNN_CONVS=0` for XLA's defaults; 3x3 convolutions
with >= 96 channels (64 on large images) by Winograd, in training too where the native kernels
are built, `FLAXRESTORE_WINOGRAD=0` for the library conv).
Peak +RSS: the
largest resident-set increase sampled during one extra call above the resident set before it
(a lower bound on the working set: weights, the compiled program and allocator caches already
resident are not counted); XLA temp:
the temporaries of the compiled Flax program from XLA's buffer assignment. Max diff: largest
|Flax - torch| of the forward output with the same weights; first loss: the training loss of the
first step on each side.

{chr(10).join(header + all_rows)}
"""
    if fail_lines:
        text += "\nFailed measurements:\n\n" + "\n".join(fail_lines) + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["all"],
                   help="registry names or families (restormer, mprnet, darkir, snr, aecrnet; "
                        "'all': one variant per family)")
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512],
                   help="forward sizes (square, batch 1); none with --sizes 0")
    p.add_argument("--repeats", type=int, default=3, help="timed forward rounds (median)")
    p.add_argument("--train-repeats", type=int, default=3, help="timed training-step rounds")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--no-forward", action="store_true", help="skip the forward passes")
    p.add_argument("--no-channels-last", action="store_true",
                   help="skip torch channels-last in the forward")
    p.add_argument("--train-channels-last", action="store_true",
                   help="also time a channels-last torch training step")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    p.add_argument("--trim-above", type=float, default=TRIM_ABOVE,
                   help="return freed memory to the OS before a timed call only when the process "
                        "holds more than this share of the machine's memory (default "
                        f"{TRIM_ABOVE}; 0: before every call). Higher measures the steady state "
                        "of bigger models but risks running out of memory")
    p.add_argument("--remat", action="store_true",
                   help="Flax training step with the recipe's remat=True (recompute blocks in "
                        "the backward: less memory; the torch step is unchanged)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"),
                   help="markdown report ('' to skip)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an earlier report at --out that this run does not "
                        "measure again (one table from several runs)")
    args = p.parse_args(argv)
    if not 0.0 <= args.trim_above <= 1.0:
        p.error(f"--trim-above must be within [0, 1], got {args.trim_above}")
    _TRIMS["above"] = args.trim_above
    torch.set_num_threads(args.threads)
    names = resolve(args.models)
    print(machine(), flush=True)
    rows: list[Row] = []
    failures: list[str] = []
    for name in names:
        print(f"== {name}", flush=True)
        ref = reference.build(name).eval()
        net = porting.torch_to_flax(name, ref.state_dict())
        net.eval()
        jobs = []
        if not args.no_forward:
            jobs += [(f"forward {s}x{s}", lambda s=s: bench_forward(
                name, ref, net, s, args.repeats, not args.no_channels_last, not args.no_memory))
                for s in args.sizes if s > 0]
        if not args.no_train:
            jobs.append(("train", lambda: bench_train(
                name, ref, net, args.train_batch, args.train_repeats, args.train_channels_last,
                not args.no_memory, args.remat)))
        for what, job in jobs:
            try:
                rows.append(job())
                print("  " + table(rows[-1:]).splitlines()[-1], flush=True)
            except Exception as e:  # noqa: BLE001 - report it and go on with the next one
                print(f"  {what} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                failures.append(f"{name} {what} FAILED: {type(e).__name__}: {str(e)[:200]}")
            if args.out:  # written after every measurement, so a long run leaves partial results
                write_markdown(args.out, rows, argv, failures, args.merge)
        del ref, net
        gc.collect()
    print(table(rows))
    if args.out:
        write_markdown(args.out, rows, argv, failures, args.merge)
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
