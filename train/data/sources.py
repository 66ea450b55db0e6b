"""Where samples come from: dataset folders (``train.data.layouts``) and the built-in demo data.

A ``TrainSource`` is this host's records plus the transforms that begin and end a sample: ``load``
(record -> images) before the shared crop and augmentation, ``synthesise`` (makes ``lq``) after.

Demo (``kind='demo'``): the clean images shipped in ``flaxrestore/data`` degraded on the fly with
``degradation`` (blur, noise, lowlight, haze, rain; see ``train.degrade``). ``DEMO_VAL_IMAGES`` are
held out: validation is a fixed set of tiles cut from them, degraded with a fixed seed.

Folders: the checked pairs of ``list_pairs``; host ``process_index`` of ``process_count`` keeps
every ``process_count``-th pair of the sorted list. Validation loads pairs lazily on indexing;
for ``clean`` it adds noise with a fixed per-image seed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from collections.abc import Sequence

import grain
import numpy as np

from train import degrade as _degrade
from train.data.config import DataConfig
from train.data.images import DataError, load_image, luma
from train.data.layouts import Pair, list_pairs
from train.data.transforms import AddNoise, LoadPair, add_noise, center_crop, draw_sigma, load_pair

# the held-out images of the demo validation set (by file-name stem); the others train
DEMO_VAL_IMAGES = ("01_city", "05_beach")
_DEMO_REPEATS = 16  # each training image appears this many times per (virtual) epoch


# ============================================================================ demo


def demo_images() -> dict[str, np.ndarray]:
    """The shipped clean demo images, float32 (256, 256, 3) in [0, 1], by file-name stem."""
    return dict(_demo_images_cached())


@functools.lru_cache(maxsize=1)
def _demo_images_cached() -> tuple[tuple[str, np.ndarray], ...]:
    folder = importlib.resources.files("flaxrestore") / "data"
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.lower().endswith(".png"):
            with importlib.resources.as_file(entry) as p:
                arr = load_image(str(p), 3)
            arr.setflags(write=False)
            out.append((entry.name.rsplit(".", 1)[0], arr))
    if not out:
        raise DataError(f"no demo images found in {folder}; is the flaxrestore package data installed?")
    return tuple(out)


def _demo_image(index: int, channels: int, margin: int) -> np.ndarray:
    img = _demo_images_cached()[index][1]
    if channels == 1:
        img = luma(img)
    return np.pad(img, ((margin, margin), (margin, margin), (0, 0)), mode="symmetric") if margin else img


@dataclasses.dataclass(frozen=True)
class DemoImage(grain.transforms.Map):
    """Demo image index -> {"clean"}, mirrored out by ``margin`` on every side for ``Degrade``."""

    channels: int = 3
    margin: int = 0

    def map(self, index: int) -> dict:
        return {"clean": _demo_image(index, self.channels, self.margin)}


@dataclasses.dataclass(frozen=True)
class Degrade(grain.transforms.RandomMap):
    """{"clean"} (with the degradation's margin) -> {"lq", "gt"} by ``train.degrade.degrade``."""

    degradation: str
    noise_sigma: float | None = None
    noise_sigma_range: tuple[float, float] | None = None

    def random_map(self, sample: dict, rng: np.random.Generator) -> dict:
        clean = np.ascontiguousarray(sample["clean"], dtype=np.float32)
        lq, gt = _degrade.degrade(self.degradation, clean, rng, noise_sigma=self.noise_sigma,
                                  noise_sigma_range=self.noise_sigma_range)
        return {"lq": lq, "gt": gt}


def demo_val_set(cfg: DataConfig) -> list[dict]:
    """Tiles of the held-out images, each degraded with its own fixed seed."""
    out = []
    size = cfg.demo_val_size
    m = _degrade.margin(cfg.degradation)
    k = 0
    for index, (name, img) in enumerate(_demo_images_cached()):
        if name not in DEMO_VAL_IMAGES:
            continue
        h, w = img.shape[:2]
        s = size or h
        src = _demo_image(index, cfg.channels, m)
        for top in range(0, h - s + 1, s):
            for left in range(0, w - s + 1, s):
                clean = np.ascontiguousarray(src[top:top + s + 2 * m, left:left + s + 2 * m], np.float32)
                rng = np.random.default_rng([12345, _degrade.KINDS.index(cfg.degradation), k])
                lq, gt = _degrade.degrade(cfg.degradation, clean, rng, noise_sigma=cfg.noise_sigma,
                                          noise_sigma_range=cfg.noise_sigma_range)
                out.append({"lq": lq, "gt": gt, "name": f"{name}_{top}_{left}"})
                k += 1
    return out


# ============================================================================ folders


class FolderValSet(Sequence):
    """Lazily loaded validation pairs: ``ds[i] -> {'lq', 'gt', 'name'}``."""

    def __init__(self, cfg: DataConfig, kind: str, pairs: Sequence[Pair]):
        self.cfg, self.kind, self.pairs = cfg, kind, tuple(pairs)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        cfg, pair = self.cfg, self.pairs[i]
        lq, gt = load_pair(pair, cfg.channels, self.kind, cfg.resize)
        if self.kind == "clean":
            rng = np.random.default_rng([0, i])  # fixed per image, like the test scripts' seed(0)
            lq = add_noise(gt, draw_sigma(cfg.noise_sigma, cfg.noise_sigma_range, rng), rng)
        vp = cfg.val_patch_size
        if vp:
            lq, gt = center_crop(lq, min(vp, lq.shape[0]), min(vp, lq.shape[1])), \
                center_crop(gt, min(vp, gt.shape[0]), min(vp, gt.shape[1]))
        return {"lq": np.ascontiguousarray(lq, np.float32), "gt": np.ascontiguousarray(gt, np.float32),
                "name": pair.name}


def folder_val_set(cfg: DataConfig) -> FolderValSet:
    kind = cfg.val_kind or cfg.kind
    root = cfg.val_root or cfg.root
    if not root:
        raise ValueError("make_val_dataset needs val_root (or root) for a folder dataset")
    plist = list_pairs(kind, root, channels=cfg.channels, skip_bad=cfg.skip_bad,
                       lq_subdir=cfg.lq_subdir, gt_subdir=cfg.gt_subdir)
    return FolderValSet(cfg, kind, plist.pairs)


# ============================================================================ training sources


@dataclasses.dataclass(frozen=True)
class TrainSource:
    records: list  # this host's shard: file pairs, or demo image indices
    load: grain.transforms.Map  # record -> sample (None drops it)
    synthesise: grain.transforms.RandomMap | None = None  # after crop + augmentation: makes "lq"
    margin: int = 0  # pixels on every side that ``synthesise`` consumes; crops grow by 2 * margin


def train_source(cfg: DataConfig, process_index: int = 0, process_count: int = 1) -> TrainSource:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    if cfg.kind == "demo":
        names = [n for n, _ in _demo_images_cached()]
        train_idx = [i for i, n in enumerate(names) if n not in DEMO_VAL_IMAGES]
        records = [i for _ in range(_DEMO_REPEATS) for i in train_idx]
        shard = records[process_index::process_count]
        if not shard:
            raise DataError(f"host {process_index} of {process_count} gets no data: only {len(records)} "
                            "training pair(s) in the demo images")
        m = _degrade.margin(cfg.degradation)
        return TrainSource(shard, DemoImage(cfg.channels, m),
                           Degrade(cfg.degradation, cfg.noise_sigma, cfg.noise_sigma_range), m)
    if not cfg.root:
        raise ValueError(f"kind {cfg.kind!r} needs root for training")
    try:
        plist = list_pairs(cfg.kind, cfg.root, channels=cfg.channels, skip_bad=cfg.skip_bad,
                           lq_subdir=cfg.lq_subdir, gt_subdir=cfg.gt_subdir,
                           shard=(process_index, process_count))
    except DataError as e:
        if "no usable image pairs" in str(e) and process_count > 1:
            raise DataError(f"host {process_index} of {process_count} gets no data: {e}") from None
        raise
    noise = AddNoise(cfg.noise_sigma, cfg.noise_sigma_range) if cfg.kind == "clean" else None
    return TrainSource(list(plist.pairs), LoadPair(cfg.kind, cfg.channels, cfg.resize, cfg.skip_bad), noise)
