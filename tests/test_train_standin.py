"""A tiny stand-in data module for the trainer tests (the DataConfig / make_train_iterator /
make_val_dataset interface of ``train.data``): smooth random images, lq = gt + fixed noise.

Recipes select it with ``data_module='test_train_standin'``. It keeps the tests of the loop,
the mesh and the resume independent of the real pipeline (tested in its own files).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: str = "standin"
    patch_size: int = 16
    channels: int = 3
    sigma: float = 0.1
    num_images: int = 4
    image_size: int = 24
    nan_at: int = -1  # this batch position gets a NaN in its input (to test the non-finite stop)


def _image(seed: int, size: int, channels: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 4 + 2, size // 4 + 2, channels))
    ys = np.linspace(0, coarse.shape[0] - 1.001, size)
    xs = np.linspace(0, coarse.shape[1] - 1.001, size)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = coarse
    img = ((1 - fy) * (1 - fx) * c[y0][:, x0] + (1 - fy) * fx * c[y0][:, x0 + 1] +
           fy * (1 - fx) * c[y0 + 1][:, x0] + fy * fx * c[y0 + 1][:, x0 + 1])
    return img.astype(np.float32)


class _Iterator:
    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, process_index: int,
                 process_count: int):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.shard = (process_index, process_count)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, self.position, *self.shard])
        self.position += 1
        gts, lqs = [], []
        for _ in range(self.batch_size):
            gt = _image(int(rng.integers(1 << 30)), cfg.patch_size, cfg.channels)
            lq = gt + cfg.sigma * rng.standard_normal(gt.shape).astype(np.float32)
            gts.append(gt)
            lqs.append(lq.astype(np.float32))
        lq = np.stack(lqs)
        if self.position - 1 == cfg.nan_at:
            lq[0, 0, 0, 0] = np.nan
        return {"lq": lq, "gt": np.stack(gts)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


def make_train_iterator(cfg: DataConfig, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1):
    return _Iterator(cfg, batch_size, seed, process_index, process_count)


def make_val_dataset(cfg: DataConfig):
    out = []
    for i in range(cfg.num_images):
        gt = _image(10_000 + i, cfg.image_size, cfg.channels)
        rng = np.random.default_rng(20_000 + i)
        lq = gt + cfg.sigma * rng.standard_normal(gt.shape).astype(np.float32)
        out.append({"lq": lq.astype(np.float32), "gt": gt, "name": f"val{i}"})
    return out


def test_standin_iterator_resumes():
    it = make_train_iterator(DataConfig(), batch_size=2, seed=1)
    next(it)
    state = it.get_state()
    a = next(it)
    it2 = make_train_iterator(DataConfig(), batch_size=2, seed=1)
    it2.set_state(state)
    b = next(it2)
    np.testing.assert_array_equal(a["lq"], b["lq"])
