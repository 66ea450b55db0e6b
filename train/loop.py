"""The training loop: data, jitted steps, orbax checkpoints, resume, EMA, evaluation, logs.

Work directory layout (``--workdir DIR``)::

    DIR/recipe.json              the recipe of the run (a resume warns if it changed)
    DIR/checkpoints/<step>/      orbax: state (params, optimizer, EMA, model state, step),
                                 data (iterator state), meta (best metric so far)
    DIR/metrics.jsonl            one JSON object per log / eval event
    DIR/tb/events.out.tfevents.* TensorBoard scalars (written here without TensorFlow)
    DIR/export/final, best       Flax model directories (flaxrestore.checkpoints), which
                                 ``python -m porting export NAME DIR OUT.pth`` turns into PyTorch

Re-running the same command resumes from the newest complete checkpoint (orbax writes each one to
a temporary directory and renames it when complete, so a kill at any moment leaves the previous
checkpoints loadable). Checkpoints are kept for the last ``keep_checkpoints`` saves plus the one
with the best validation metric.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import math
import os
import signal
import socket
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flaxrestore import checkpoints as fcheckpoints
from flaxrestore import layers as flayers
from flaxrestore import models
from train import recipe as recipe_lib
from train import schedules
from train import step as step_lib
from train.recipe import Recipe


class NonFiniteLoss(RuntimeError):
    """The loss or its gradient became NaN/inf; the run stopped, its last checkpoint is kept."""


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# TensorBoard event files without TensorFlow: TFRecord framing + the Event protobuf, encoded by
# hand (Event{wall_time=1 double, step=2 int64, file_version=3 string, summary=5};
# Summary{value=1 repeated}; Summary.Value{tag=1 string, simple_value=2 float}).


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _len_delimited(num: int, payload: bytes) -> bytes:
    return _field(num, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int | None = None, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    out = _field(1, 1) + struct.pack("<d", wall_time)
    if step is not None:
        out += _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _len_delimited(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _len_delimited(1, _len_delimited(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
            for tag, v in scalars.items())
        out += _len_delimited(5, summary)
    return out


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data +
            struct.pack("<I", masked_crc32c(data)))


def read_tfrecords(path: str) -> list[bytes]:
    """The records of a TFRecord file, checking both CRCs (used by the tests)."""
    out = []
    with open(path, "rb") as f:
        blob = f.read()
    i = 0
    while i < len(blob):
        header = blob[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", blob[i + 8:i + 12])
        data = blob[i + 12:i + 12 + n]
        (dcrc,) = struct.unpack("<I", blob[i + 12 + n:i + 16 + n])
        if hcrc != masked_crc32c(header) or dcrc != masked_crc32c(data):
            raise ValueError(f"{path}: corrupt record at byte {i}")
        out.append(data)
        i += 16 + n
    return out


class TensorBoardWriter:
    """Appends scalar summaries to ``DIR/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._f.write(tfrecord(encode_event(time.time(), file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if np.isfinite(v)}
        if values:
            self._f.write(tfrecord(encode_event(time.time(), step=step, scalars=values)))
            self._f.flush()

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------------------------
# feedback


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A one-line progress bar (redrawn in a terminal, one line per update otherwise)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.time()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, lr: float, rate: float) -> str:
        frac = step / max(self.total, 1)
        width = 24
        filled = int(width * frac)
        bar = "#" * filled + "-" * (width - filled)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        line = (f"[{bar}] {step}/{self.total} {100 * frac:5.1f}% | {rate:6.2f} it/s | "
                f"ETA {_fmt_time(eta)} | loss {loss:.4g} | lr {lr:.3g}")
        if self.enabled:
            if self.tty:
                print("\r" + line, end="", flush=True)
            else:
                print(line, flush=True)
        return line

    def newline(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


class MetricsLog:
    """JSON lines + TensorBoard, written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = is_main_process()
        if self.enabled:
            self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = TensorBoardWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": time.time(),
                  **{k: float(v) for k, v in values.items()}}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        self.tb.scalars(step, {f"{kind}/{k}": v for k, v in values.items()})

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            self.tb.close()


# --------------------------------------------------------------------------------------------
# data


def data_module(recipe: Recipe):
    return importlib.import_module(recipe.data_module)


def data_config(recipe: Recipe, fields: Mapping[str, Any]):
    mod = data_module(recipe)
    if dataclasses.is_dataclass(fields):
        return fields
    return mod.DataConfig(**dict(fields))


def _jsonable(obj):
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_jsonable(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


class _Limited(Sequence):
    """The first ``n`` items of a lazily loaded validation set (all when n is 0)."""

    def __init__(self, items, n: int):
        self.items, self.n = items, (min(n, len(items)) if n else len(items))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        item = self.items[i % self.n]
        return {"lq": np.asarray(item["lq"], np.float32), "gt": np.asarray(item["gt"], np.float32),
                "name": str(item.get("name", i))}


def load_val_set(recipe: Recipe) -> Sequence:
    """The validation pairs (loaded lazily, one at a time, as the evaluation reaches them)."""
    if recipe.val_data is None:
        return []
    mod = data_module(recipe)
    return _Limited(mod.make_val_dataset(data_config(recipe, recipe.val_data)),
                    recipe.eval_max_images)


# --------------------------------------------------------------------------------------------
# evaluation


class Evaluator:
    """Validation PSNR / SSIM of whole images with the family's test-time protocol.

    Images are padded (bottom/right) to the model's multiple as the official test scripts do,
    batched by padded shape with one image per device, run sharded over the mesh, cropped back
    and (``eval_clamp``) clamped to [0, 1]. The set is streamed: at most one batch per distinct
    shape is held in memory.
    """

    def __init__(self, recipe: Recipe, model: step_lib.ModelDef, mesh, val_set: Sequence):
        from flaxrestore import metrics, restore as frestore

        self.recipe, self.mesh, self.val_set = recipe, mesh, val_set
        self.protocol = frestore.protocol_for(family=models.entry(recipe.model).family)
        self.fn = step_lib.make_eval_fn(recipe, model, mesh)
        self.n = mesh.size
        kw = dict(crop_border=recipe.eval_crop_border, y_channel=recipe.eval_y_channel)
        self.psnr = jax.jit(lambda a, b: metrics.psnr(a, b, **kw))
        self.ssim = jax.jit(lambda a, b: metrics.ssim(a, b, **kw))

    def _pad(self, a: np.ndarray) -> np.ndarray:
        m = self.protocol.multiple
        ph, pw = -a.shape[1] % m, -a.shape[2] % m
        if not (ph or pw):
            return a
        mode = flayers._PAD_MODES[self.protocol.pad_mode]
        return np.pad(a, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)

    def _run(self, params, model_state, group: list) -> list[np.ndarray]:
        """Restores up to ``n`` prepared items of one padded shape (one per device)."""
        sharding = step_lib.batch_sharding(self.mesh)
        full = group + [group[-1]] * (self.n - len(group))
        arrays = []
        for j in range(len(group[0][2])):
            stacked = np.concatenate([inputs[j] for _, _, inputs, _ in full], axis=0)
            arrays.append(jax.make_array_from_callback(stacked.shape, sharding,
                                                       lambda ix, a=stacked: a[ix]))
        out = np.asarray(jax.device_get(self.fn(params, model_state, tuple(arrays))))
        results = []
        for k, (_, _, _, (h, w)) in enumerate(group):
            y = out[k, :h, :w]
            results.append(np.clip(y, 0.0, 1.0) if self.recipe.eval_clamp else y)
        return results

    def stream(self, params, model_state) -> Iterable[tuple[int, dict, np.ndarray]]:
        """(index, item, restored image) for the whole validation set (grouped order)."""
        pending: dict[tuple, list] = {}
        for i in range(len(self.val_set)):
            item = self.val_set[i]
            x = item["lq"][None]
            extras = list(self.protocol.extra_inputs(x)) if self.protocol.extra_inputs else []
            inputs = [self._pad(a) for a in [x, *extras]]
            key = tuple(a.shape for a in inputs)
            group = pending.setdefault(key, [])
            group.append((i, item, inputs, x.shape[1:3]))
            if len(group) == self.n:
                for (j, it, _, _), y in zip(group, self._run(params, model_state, group)):
                    yield j, it, y
                del pending[key]
        for group in pending.values():
            for (j, it, _, _), y in zip(group, self._run(params, model_state, group)):
                yield j, it, y

    def restore_all(self, params, model_state) -> list[np.ndarray]:
        """The restored image of every validation item, in the set's order (host numpy, HWC)."""
        out = {i: y for i, _, y in self.stream(params, model_state)}
        return [out[i] for i in range(len(out))]

    def __call__(self, params, model_state) -> dict[str, float]:
        ps, ss = [], []
        for _, item, y in self.stream(params, model_state):
            ps.append(float(self.psnr(y, item["gt"])))
            ss.append(float(self.ssim(y, item["gt"])))
        if not ps:
            return {}
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}

    def baseline(self) -> dict[str, float]:
        """PSNR / SSIM of the degraded inputs themselves (what "no restoration" scores)."""
        ps, ss = [], []
        for i in range(len(self.val_set)):
            it = self.val_set[i]
            if it["lq"].shape != it["gt"].shape:
                return {}
            ps.append(float(self.psnr(it["lq"], it["gt"])))
            ss.append(float(self.ssim(it["lq"], it["gt"])))
        if not ps:
            return {}
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}


# --------------------------------------------------------------------------------------------
# checkpoints


ITEMS = ("state", "data", "meta")


def checkpoint_manager(workdir: str, recipe: Recipe, *, read_only: bool = False) -> ocp.CheckpointManager:
    cm = ocp.checkpoint_managers
    best_min = recipe.best_metric in ("loss", "lpips")
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=max(1, recipe.keep_checkpoints)),
        cm.BestN(get_metric_fn=lambda m: m[recipe.best_metric], reverse=best_min, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=recipe.async_checkpoints)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 item_names=ITEMS, options=options)


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract_state, mesh):
    """(state replicated on ``mesh``, data-iterator state, meta) of checkpoint ``step``."""
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_state)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return step_lib.replicate(mesh, restored["state"]), restored["data"], restored["meta"]


def host_state(state):
    """The replicated train state as host numpy arrays, what the checkpoints store. (Saving the
    device arrays themselves made orbax slice every replica eagerly: ~10 s per save with 8
    simulated devices, most of it compiling slices.)"""
    return jax.tree.map(np.asarray, jax.device_get(state))


def export_weights(path: str, recipe: Recipe, model: step_lib.ModelDef, params, model_state) -> str:
    """Writes a Flax model directory (replacing one already there)."""
    import shutil

    module = model.module(jax.device_get(params), jax.device_get(model_state), train=False)
    if is_main_process() and os.path.exists(path):
        shutil.rmtree(path)
    if jax.process_count() > 1:  # after the old copy is gone
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"export {path}")
    if is_main_process():
        return fcheckpoints.save_model(path, recipe.model, module, dict(recipe.model_overrides))
    # the other hosts only take part in orbax's save (a collective; the replicated weights are
    # written by host 0): no directory, no model.json of theirs (tests/test_multihost.py)
    from flax import nnx

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "state"),
                   nnx.to_pure_dict(fcheckpoints.weights_state(module)))
        ckptr.wait_until_finished()
    return path


# --------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class RunResult:
    step: int
    state: Any
    evals: list[tuple[int, dict]]
    workdir: str
    model: step_lib.ModelDef | None = None


def _setup(recipe: Recipe, devices=None):
    mesh = step_lib.make_mesh(devices)
    recipe.validate(num_devices=mesh.size, process_count=jax.process_count())
    model = step_lib.build_model(recipe)
    tx = schedules.make_optimizer(recipe.optimizer)
    return mesh, model, tx


def _write_recipe(workdir: str, recipe: Recipe) -> None:
    path = os.path.join(workdir, "recipe.json")
    current = json.loads(json.dumps(recipe_lib.to_dict(recipe), default=str))
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != current:
            changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
            log(f"note: the recipe differs from the one this workdir started with in: "
                f"{', '.join(changed)} (continuing with the new one)")
    if is_main_process():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(current, f, indent=2, default=str)
        os.replace(tmp, path)


def _host_batch(recipe: Recipe, item: Mapping[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    batch = {"lq": np.asarray(item["lq"], np.float32), "gt": np.asarray(item["gt"], np.float32)}
    if recipe.stages:
        stage = recipe.stage_at(t)
        rng = np.random.default_rng([recipe.seed, t, jax.process_index()])
        batch = step_lib.progressive_crop(batch, stage.batch_size // jax.process_count(),
                                          stage.patch_size, rng)
    return batch


class RowsLog:
    """Which rows each process reads: with ``TRAIN_ROWS_LOG=PREFIX`` in the environment, every
    process appends one JSON line per step to ``PREFIX.<process index>.jsonl``: the step, the
    shape of its part of the batch and a CRC-32 of each of its rows (lq and gt bytes, after the
    progressive crop). For debugging a
    pod's data sharding; the multi-host test checks with it that hosts read disjoint rows."""

    def __init__(self, prefix: str | None):
        self._f = open(f"{prefix}.{jax.process_index()}.jsonl", "a") if prefix else None

    def write(self, step: int, batch: Mapping[str, np.ndarray]) -> None:
        if self._f is None:
            return
        n = len(batch["lq"])
        rows = [format(zlib.crc32(batch["gt"][i].tobytes(), zlib.crc32(batch["lq"][i].tobytes())),
                       "08x") for i in range(n)]
        self._f.write(json.dumps({"step": int(step), "process": jax.process_index(),
                                  "shape": list(batch["lq"].shape), "rows": rows}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def train(recipe: Recipe, workdir: str, *, devices=None, max_steps: int | None = None,
          quiet: bool = False) -> RunResult:
    """Trains (or resumes) ``recipe`` in ``workdir``; ``max_steps`` stops early (tests, demos)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh, model, tx = _setup(recipe, devices)
    main = is_main_process() and not quiet
    if main:
        log(f"recipe {recipe.name}: model {recipe.model} {dict(recipe.model_overrides) or ''}, "
            f"{recipe.total_steps} steps, global batch {recipe.batch_size}, "
            f"{mesh.size} device(s) on {jax.process_count()} host(s), dtype {recipe.dtype}")
        log(f"optimizer: {schedules.describe(recipe.optimizer)}")
    _write_recipe(workdir, recipe)

    ema = recipe.ema_decay > 0
    abstract = step_lib.abstract_state(model, tx, ema)
    mngr = checkpoint_manager(workdir, recipe)
    dmod = data_module(recipe)
    train_cfg = data_config(recipe, recipe.data)
    per_host = recipe.batch_size // jax.process_count()
    it = dmod.make_train_iterator(train_cfg, batch_size=per_host, seed=recipe.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    meta = {"best_value": None, "best_step": None}
    latest = mngr.latest_step()
    if latest is not None:
        state, data_state, meta = restore_checkpoint(mngr, latest, abstract, mesh)
        it.set_state(_from_jsonable(data_state))
        if main:
            log(f"resumed from step {latest} in {workdir}")
    else:
        state = step_lib.replicate(mesh, step_lib.init_state(model, tx, ema))

    vgg_graph, frozen = None, {}
    if step_lib.needs_vgg(recipe):
        vgg_graph, vgg_params = step_lib.load_vgg(recipe.vgg_weights,
                                                  allow_random=recipe.vgg_weights == "random")
        frozen = {"vgg": step_lib.replicate(mesh, vgg_params)}

    train_step = step_lib.make_train_step(recipe, model, tx, mesh, vgg_graph)
    val_set = load_val_set(recipe)
    evaluator = Evaluator(recipe, model, mesh, val_set) if val_set else None
    mlog = MetricsLog(workdir)
    rows_log = RowsLog(os.environ.get("TRAIN_ROWS_LOG"))
    evals: list[tuple[int, dict]] = []

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass

    def eval_params(s):
        return s["ema"] if ema else s["params"]

    def save(s, t, metrics=None):
        data_state = _jsonable(it.get_state())
        meta_now = dict(meta, step=int(t), recipe=recipe.name, time=time.time())
        mngr.save(int(t), args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state(s)), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta_now)), metrics=metrics, force=True)

    def run_eval(s, t):
        values = evaluator(eval_params(s), s["model_state"])
        evals.append((t, values))
        mlog.write(t, "val", values)
        metric = values.get(recipe.best_metric)
        improved = False
        if metric is not None:
            best = meta.get("best_value")
            better = (best is None or (metric < best if recipe.best_metric in ("loss", "lpips")
                                       else metric > best))
            if better:
                meta.update(best_value=float(metric), best_step=int(t))
                improved = True
        if main:
            progress.newline()
            log(f"step {t}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()) +
                (" (best)" if improved else f" (best {meta['best_value']:.4f} at step "
                                            f"{meta['best_step']})" if meta.get("best_value") else ""))
        return values

    start = int(jax.device_get(state["step"]))
    end = recipe.total_steps if max_steps is None else min(recipe.total_steps, max_steps)
    progress = Progress(recipe.total_steps, start, enabled=main)
    if start == 0 and evaluator is not None and main:
        base = evaluator.baseline()
        if base:
            mlog.write(0, "val_input", base)
            log("validation of the degraded inputs: " +
                ", ".join(f"{k} {v:.4f}" for k, v in base.items()))

    # XLA:CPU runs simulated devices' collectives on one shared thread pool: two multi-device
    # programs in flight can each hold threads the other needs (a 40 s rendezvous timeout).
    # There, wait for each step; on GPU/TPU the next step is queued while one runs.
    serial = mesh.devices.flat[0].platform == "cpu" and mesh.size > 1
    t = start
    pending = None  # (step, metrics) of the previous step, read after the next is dispatched
    window_t0, window_steps = time.time(), 0
    last_good = mngr.latest_step()
    try:
        while t < end and stop["signal"] is None:
            item = next(it)
            host_rows = _host_batch(recipe, item, t + 1)
            rows_log.write(t + 1, host_rows)
            batch = step_lib.global_batch(mesh, host_rows)
            state, metrics = train_step(state, batch, frozen)
            if serial:
                jax.block_until_ready(metrics)
            t += 1
            window_steps += 1
            if pending is not None:
                _check_finite(pending, last_good, workdir)
            pending = (t, metrics)
            do_log = t % recipe.log_every == 0 or t == end
            do_eval = evaluator is not None and (t % recipe.eval_every == 0 or t == recipe.total_steps)
            do_ckpt = t % recipe.checkpoint_every == 0 or t == end or do_eval
            if do_log or do_eval or do_ckpt:
                _check_finite(pending, last_good, workdir)
                pending = None
            if do_log:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                rate = window_steps / max(time.time() - window_t0, 1e-9)
                window_t0, window_steps = time.time(), 0
                host["steps_per_sec"] = rate
                mlog.write(t, "train", host)
                progress.update(t, host["loss"], host["lr"], rate)
            values = run_eval(state, t) if do_eval else None
            if do_ckpt:
                save(state, t, metrics=values if values else None)
                last_good = t
        if pending is not None:
            _check_finite(pending, last_good, workdir)
        if stop["signal"] is not None and t != last_good:
            save(state, t)
            last_good = t
            log(f"\nstopped by signal {stop['signal']} at step {t}; checkpoint saved")
    finally:
        mngr.wait_until_finished()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        progress.newline()
        mlog.close()
        rows_log.close()

    if t >= recipe.total_steps:
        final = export_weights(os.path.join(workdir, "export", "final"), recipe, model,
                               eval_params(state), state["model_state"])
        if main:
            log(f"exported the final weights to {final}")
        if meta.get("best_step") is not None:
            best_step = int(meta["best_step"])
            if best_step in mngr.all_steps():
                bstate = state if best_step == t else restore_checkpoint(mngr, best_step, abstract,
                                                                         mesh)[0]
                best = export_weights(os.path.join(workdir, "export", "best"), recipe, model,
                                      eval_params(bstate), bstate["model_state"])
                if main:
                    log(f"exported the best weights (step {best_step}, {recipe.best_metric} "
                        f"{meta['best_value']:.4f}) to {best}")
    mngr.close()
    return RunResult(t, state, evals, workdir, model)


def _check_finite(pending, last_good, workdir) -> None:
    t, metrics = pending
    if not bool(jax.device_get(metrics["finite"])):
        loss = float(jax.device_get(metrics["loss"]))
        gn = float(jax.device_get(metrics["grad_norm"]))
        where = (f"the last good checkpoint (step {last_good}) is kept in {workdir}/checkpoints"
                 if last_good is not None else "no checkpoint had been written yet")
        raise NonFiniteLoss(f"non-finite training loss at step {t} (loss {loss}, gradient norm "
                            f"{gn}); the update was not applied and the run stopped; {where}")


def load_checkpoint(recipe: Recipe, workdir: str, which: str = "best", devices=None):
    """(step, state, model, mesh) of a checkpoint of ``workdir``: 'best', 'latest' or a step."""
    workdir = os.path.abspath(workdir)
    mesh, model, tx = _setup(recipe, devices)
    abstract = step_lib.abstract_state(model, tx, recipe.ema_decay > 0)
    mngr = checkpoint_manager(workdir, recipe, read_only=True)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        latest = mngr.latest_step()
        if which == "latest":
            step = latest
        elif which == "best":
            _, _, meta = restore_checkpoint(mngr, latest, abstract, mesh)
            step = meta.get("best_step")
            if step is None or step not in steps:
                step = latest
        else:
            step = int(which)
            if step not in steps:
                raise KeyError(f"no checkpoint for step {step}; have {sorted(steps)}")
        state, _, _ = restore_checkpoint(mngr, step, abstract, mesh)
    finally:
        mngr.close()
    return step, state, model, mesh


def evaluate(recipe: Recipe, workdir: str, *, which: str = "best", devices=None) -> dict[str, float]:
    """Validation metrics of a checkpoint of ``workdir``: 'best', 'latest' or a step number."""
    step, state, model, mesh = load_checkpoint(recipe, workdir, which, devices)
    val_set = load_val_set(recipe)
    if not val_set:
        raise ValueError(f"recipe {recipe.name} has no validation data (val_data)")
    evaluator = Evaluator(recipe, model, mesh, val_set)
    params = state["ema"] if recipe.ema_decay > 0 else state["params"]
    values = evaluator(params, state["model_state"])
    values["step"] = step
    values["images"] = len(val_set)
    return values


def export_checkpoint(recipe: Recipe, workdir: str, out: str, *, which: str = "best",
                      devices=None) -> str:
    """Writes the weights of a checkpoint (EMA weights if the recipe keeps them) as a Flax model
    directory, which ``python -m porting export`` converts to a PyTorch file."""
    step, state, model, mesh = load_checkpoint(recipe, workdir, which, devices)
    params = state["ema"] if recipe.ema_decay > 0 else state["params"]
    return export_weights(os.path.abspath(out), recipe, model, params, state["model_state"])
