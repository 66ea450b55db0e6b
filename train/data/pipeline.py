"""The grain pipelines: per-host training batches and validation sets.

Randomness: per-host seeds for the shuffle and for the random transforms are derived from
``(seed, process_index)``; grain derives a generator for each element from its seed and the
element's position, so crops, augmentations and degradations depend only on the seed and the
position in the stream, not on timing, threads or worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from train.data import sources
from train.data.config import DataConfig
from train.data.transforms import Augment, RandomCrop, RandomSteps, contiguous


def _host_seeds(seed: int, process_index: int) -> tuple[int, int]:
    """Seeds for the shuffle and for the random transforms of one host."""
    s = np.random.SeedSequence([int(seed) % 2**32, int(process_index)]).generate_state(2)
    return int(s[0]), int(s[1])


def _absl_flags_ready() -> None:
    # grain's worker processes read absl flags; outside an absl.app program they are unparsed,
    # which makes mp_prefetch fail. Mark them parsed (all defaults) when nobody has.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_dataset(cfg: DataConfig, *, batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
    """The training pipeline as a grain IterDataset (see ``make_train_iterator``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    src = sources.train_source(cfg, process_index, process_count)
    shuffle_seed, map_seed = _host_seeds(seed, process_index)
    ds = (grain.MapDataset.source(src.records)
          .shuffle(seed=shuffle_seed)   # before repeat: a new permutation every epoch
          .repeat(None)
          .map(src.load))               # None for a skipped bad pair; grain drops those
    steps = []
    if cfg.patch_size:
        steps.append(RandomCrop(cfg.patch_size + 2 * src.margin, cfg.pad_mode))
    if cfg.geometric_augs:
        steps.append(Augment(cfg.augment_mode))
    if src.synthesise is not None:
        steps.append(src.synthesise)
    if steps:
        ds = ds.random_map(RandomSteps(tuple(steps)), seed=map_seed)
    ds = ds.map(contiguous)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.prefetch))
    it = it.batch(batch_size, drop_remainder=True)
    if cfg.num_workers > 0:
        _absl_flags_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=2))
    return it


def make_train_iterator(cfg: DataConfig, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """Infinite, deterministic, resumable per-host iterator of training batches (``train.data``)."""
    return iter(make_train_dataset(cfg, batch_size=batch_size, seed=seed, process_index=process_index,
                                   process_count=process_count))


def make_val_dataset(cfg: DataConfig) -> Sequence[dict]:
    """Validation pairs at full size (or ``val_patch_size`` centre crops), in a fixed order."""
    if (cfg.val_kind or cfg.kind) == "demo":
        return sources.demo_val_set(cfg)
    return sources.folder_val_set(cfg)
