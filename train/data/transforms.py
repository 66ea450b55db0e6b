"""Per-sample grain transforms of the training pipeline, and the array helpers they share.

Training pipeline per sample (chained on the dataset in ``train.data.pipeline``; steps 2-4 run as
one ``RandomSteps`` so that they share the sample's generator):

1. load (``LoadPair``; the demo's ``DemoImage`` in ``train.data.sources``): the pair (8- or 16-bit
   PNG/JPEG/BMP/TIFF/WebP, to float32 in [0, 1]), optionally ``resize``-d (bilinear). A bad pair
   becomes None with ``skip_bad`` and grain drops it.
2. ``RandomCrop``: pad bottom/right up to the patch if smaller (``pad_mode``), then the same random
   ``patch_size`` crop of every image of the sample.
3. ``Augment``: the same random geometric augmentation (``augment_mode``) of every image.
4. synthesis: ``AddNoise`` for ``clean`` (``lq = gt + N(0, sigma/255)``, not clipped), the demo's
   ``Degrade`` in ``train.data.sources``.

Augmentation modes, each applied identically to lq and gt:
``dihedral8`` (Restormer): one of identity, flip-ud, rot90, rot90+flip-ud, rot180, rot180+flip-ud,
rot270, rot270+flip-ud, uniformly. ``mprnet9`` (MPRNet): ``randint(0, 9)`` over identity, flip rows,
flip columns, rot90, rot180, rot270, rot90 of the row-flipped, rot90 of the column-flipped,
identity (so identity has probability 2/9). ``hflip_rot4`` (AECR-Net): horizontal flip with p 1/2,
then rotation by 90 r degrees, r in {0, 1, 2, 3}. ``hvflip`` (DarkIR, SNR-Aware): horizontal then
vertical flip, each with p 1/2 (DarkIR flips before cropping; the distribution is the same).
``none``. Rotations are counter-clockwise. ``geometric_augs=False`` turns them all off.

A sample is a dict of same-sized (H, W, C) float32 images: ``{"lq", "gt"}``, or ``{"clean"}`` for
the demo before its degradation. Crop and augmentation treat every image of the dict alike.
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np
from PIL import Image

from train.data.images import DataError, load_image
from train.data.layouts import Pair

log = logging.getLogger(__name__)


# ============================================================================ array helpers


def pad_to(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    ph, pw = max(0, size - img.shape[0]), max(0, size - img.shape[1])
    if not ph and not pw:
        return img
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode)


def center_crop(img: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top:top + h, left:left + w]


def resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = int(hw[0]), int(hw[1])
    if img.shape[:2] == (h, w):
        return img
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32)).resize((w, h), Image.BILINEAR))
              for c in range(img.shape[-1])]
    return np.stack(planes, -1).astype(np.float32)


def transform_ops(mode: str, rng: np.random.Generator) -> list:
    """The random geometric transform as a list of ('flipud'|'fliplr'|('rot', k)), applied in order."""
    if mode == "dihedral8":
        m = int(rng.integers(0, 8))
        ops = [("rot", m // 2)] if m // 2 else []
        return ops + (["flipud"] if m % 2 else [])
    if mode == "mprnet9":
        m = int(rng.integers(0, 9))
        return {0: [], 1: ["flipud"], 2: ["fliplr"], 3: [("rot", 1)], 4: [("rot", 2)], 5: [("rot", 3)],
                6: ["flipud", ("rot", 1)], 7: ["fliplr", ("rot", 1)], 8: []}[m]
    if mode == "hflip_rot4":
        ops = ["fliplr"] if rng.random() < 0.5 else []
        k = int(rng.integers(0, 4))
        return ops + ([("rot", k)] if k else [])
    if mode == "hvflip":
        ops = ["fliplr"] if rng.random() < 0.5 else []
        return ops + (["flipud"] if rng.random() < 0.5 else [])
    return []


def apply_ops(img: np.ndarray, ops: list) -> np.ndarray:
    for op in ops:
        if op == "flipud":
            img = img[::-1]
        elif op == "fliplr":
            img = img[:, ::-1]
        else:
            img = np.rot90(img, op[1], axes=(0, 1))
    return img


def draw_sigma(noise_sigma: float | None, noise_sigma_range: tuple[float, float] | None,
               rng: np.random.Generator) -> float:
    if noise_sigma is not None:
        return float(noise_sigma)
    lo, hi = noise_sigma_range
    return float(rng.uniform(lo, hi))


def add_noise(gt: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """gt + N(0, sigma/255), unclipped (as Restormer)."""
    return gt + rng.standard_normal(gt.shape, dtype=np.float32) * np.float32(sigma / 255.0)


def load_pair(pair: Pair, channels: int, kind: str,
              size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lq, gt) of a file pair, checked to be the same size, optionally resized to ``size``."""
    lq = load_image(pair.lq, channels)
    gt = lq if pair.gt == pair.lq else load_image(pair.gt, channels)
    if kind == "reside" and gt.shape[:2] != lq.shape[:2]:
        if gt.shape[0] < lq.shape[0] or gt.shape[1] < lq.shape[1]:
            raise DataError(f"size mismatch: ground truth {pair.gt} is smaller than hazy {pair.lq}")
        gt = center_crop(gt, *lq.shape[:2])
    if lq.shape != gt.shape:
        raise DataError(f"size mismatch: {pair.lq} is {lq.shape[1]}x{lq.shape[0]} but its ground truth "
                        f"{pair.gt} is {gt.shape[1]}x{gt.shape[0]}")
    if size is not None:
        lq, gt = resize(lq, size), resize(gt, size)
    return lq, gt


# ============================================================================ grain transforms


@dataclasses.dataclass(frozen=True)
class LoadPair(grain.transforms.Map):
    """Pair -> {"lq", "gt"}; None for a bad pair with ``skip_bad`` (grain drops it)."""

    kind: str
    channels: int = 3
    size: tuple[int, int] | None = None
    skip_bad: bool = False

    def map(self, pair: Pair):
        try:
            lq, gt = load_pair(pair, self.channels, self.kind, self.size)
        except DataError as e:
            if not self.skip_bad:
                raise
            log.warning("skipping bad pair: %s", e)
            return None
        return {"lq": lq, "gt": gt}


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
    """The same random size x size window of every image, after padding bottom/right up to it."""

    size: int
    pad_mode: str = "symmetric"

    def random_map(self, sample: dict, rng: np.random.Generator) -> dict:
        s = self.size
        sample = {k: pad_to(v, s, self.pad_mode) for k, v in sample.items()}
        h, w = next(iter(sample.values())).shape[:2]
        top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        return {k: v[top:top + s, left:left + s] for k, v in sample.items()}


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
    """The same random geometric transform (``mode``, one of AUGMENT_MODES) of every image."""

    mode: str

    def random_map(self, sample: dict, rng: np.random.Generator) -> dict:
        ops = transform_ops(self.mode, rng)
        return {k: apply_ops(v, ops) for k, v in sample.items()}


@dataclasses.dataclass(frozen=True)
class AddNoise(grain.transforms.RandomMap):
    """{"gt", ...} -> {"lq": gt + Gaussian noise, "gt"}; sigma fixed or drawn per sample (0-255 scale)."""

    noise_sigma: float | None = None
    noise_sigma_range: tuple[float, float] | None = None

    def random_map(self, sample: dict, rng: np.random.Generator) -> dict:
        gt = np.ascontiguousarray(sample["gt"], dtype=np.float32)
        sigma = draw_sigma(self.noise_sigma, self.noise_sigma_range, rng)
        return {"lq": add_noise(gt, sigma, rng), "gt": gt}


@dataclasses.dataclass(frozen=True)
class RandomSteps(grain.transforms.RandomMap):
    """Random transforms applied in order, all drawing from the sample's one generator.

    One random_map for the chain rather than one per step: the steps draw in turn from one stream,
    so a seed gives the same batches as before the pipeline was split into steps.
    """

    steps: tuple[grain.transforms.RandomMap, ...]

    def random_map(self, sample: dict, rng: np.random.Generator) -> dict:
        for step in self.steps:
            sample = step.random_map(sample, rng)
        return sample


def contiguous(sample: dict) -> dict:
    """Every image as a C-contiguous float32 array (crops and flips leave views)."""
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sample.items()}
