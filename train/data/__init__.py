"""Paired training data on grain: dataset layouts, crops and augmentations, and the built-in demo data.

API (what the trainer uses)
---------------------------

``DataConfig``
    Frozen dataclass describing one data source (fields documented on the class).

``make_train_iterator(cfg, *, batch_size, seed, process_index=0, process_count=1)``
    A ``grain.DatasetIterator`` yielding ``{"lq": float32 (B, P, P, C), "gt": float32 (B, P, P, C)}``
    in [0, 1] (NHWC; ``lq`` from synthetic Gaussian noise is left unclipped, as Restormer does), with
    ``B = batch_size`` the PER-HOST batch and ``P = cfg.patch_size``. Infinite: epochs repeat, each
    one reshuffled. Deterministic given ``seed``; ``num_workers`` 0 and 1 give the same batches, more
    workers a different (still deterministic) order, since each worker builds whole batches from its
    slice of the stream, so keep ``num_workers`` fixed across a run and its resumes. Host ``process_index``
    of ``process_count`` reads only its shard (every ``process_count``-th file pair of the sorted
    list). ``iterator.get_state()`` / ``iterator.set_state(state)`` save and restore the exact
    position (the state is a small JSON-able dict; store it in the checkpoint).

``make_train_dataset(...)``
    The same pipeline as a ``grain.IterDataset`` (same arguments), for composing further.

``make_val_dataset(cfg) -> Sequence[dict]``
    Full-size images ``{"lq": float32 (H, W, C), "gt": float32 (H, W, C), "name": str}``, in a fixed
    order, loaded lazily on indexing. It reads ``cfg.val_root`` (layout ``cfg.val_kind`` or
    ``cfg.kind``), or ``cfg.root`` when no ``val_root`` is set (so a separate validation
    ``DataConfig`` works too). For ``kind='demo'`` it is a fixed set of tiles cut from shipped images
    that training never sees, degraded with a fixed seed.

``list_pairs(kind, root, ...) -> PairList``
    The sorted, checked file pairs of a dataset folder, and what was skipped.

``DataError``
    Raised for unusable data; the message names the file(s).

Dataset layouts (``kind``; ``root`` is the split folder, e.g. ``.../GoPro/train``)
----------------------------------------------------------------------------------

=========  ===============================================================================
paired     ``root/<lq>/**`` and ``root/<gt>/**`` matched by relative path without extension.
           ``<lq>``/``<gt>`` are ``lq_subdir``/``gt_subdir`` or found among
           lq|input|inp|low|hazy|noisy|blur|blurred|rain|rainy|degraded and
           gt|target|groundtruth|high|normal|clear|sharp|clean|norain.
gopro      ``input/`` + ``target/`` (MPRNet; Restormer's ``input_crops/`` + ``target_crops/``),
           or the GOPRO_Large release ``<scene>/blur/*.png`` + ``<scene>/sharp/*.png``.
sidd       ``input/`` + ``target/`` (or ``groundtruth/``, or the ``*_crops`` folders), or the
           SIDD-Medium release: ``**/NOISY_SRGB_<k>.PNG`` next to ``GT_SRGB_<k>.PNG``.
lol        LOL v1: ``low/`` + ``high/`` (``our485`` for training, ``eval15`` for testing).
lolv2      LOL-v2 (``Real_captured`` or ``Synthetic``, split ``Train``/``Test``): ``Low/`` + ``Normal/``.
lolblur    LOLBlur: ``low_blur_noise/<scene>/<frame>.png`` + ``high_sharp_scaled/<scene>/<frame>.png``.
reside     RESIDE: ``hazy/<id>_<...>.<ext>`` + ``clear/<id>.<ext>`` (ITS/OTS; several hazy
           images share one clear image) or + ``gt/<id>.<ext>`` (SOTS). A ground truth larger
           than its hazy image is centre-cropped to it (ITS: 640x480 vs 620x460), as AECR-Net does.
clean      Only clean images (``root/**``); ``lq = gt + N(0, sigma/255)`` synthesised after crop
           and augmentation with ``noise_sigma`` or ``noise_sigma_range`` (Restormer's Gaussian
           denoising on DFWB). The noisy input is not clipped. Validation adds noise with a fixed
           per-image seed.
demo       Built-in: clean images shipped in ``flaxrestore/data`` degraded on the fly with
           ``degradation`` (blur, noise, lowlight, haze, rain; see ``train.degrade``).
=========  ===============================================================================

(AECR-Net's own loader reads HDF5 files; use the RESIDE image folders here instead.)

Training pipeline per sample: load the pair (8- or 16-bit PNG/JPEG/BMP/TIFF/WebP, to float32 in
[0, 1]), optionally ``resize`` both (bilinear), pad bottom/right up to the patch if smaller
(``pad_mode``), take the same random ``patch_size`` crop of both, apply the same random
geometric augmentation (``augment_mode``), then synthesise noise for ``clean``.

Augmentation modes, each applied identically to lq and gt:
``dihedral8`` (Restormer): one of identity, flip-ud, rot90, rot90+flip-ud, rot180, rot180+flip-ud,
rot270, rot270+flip-ud, uniformly. ``mprnet9`` (MPRNet): ``randint(0, 9)`` over identity, flip rows,
flip columns, rot90, rot180, rot270, rot90 of the row-flipped, rot90 of the column-flipped,
identity (so identity has probability 2/9). ``hflip_rot4`` (AECR-Net): horizontal flip with p 1/2,
then rotation by 90 r degrees, r in {0, 1, 2, 3}. ``hvflip`` (DarkIR, SNR-Aware): horizontal then
vertical flip, each with p 1/2 (DarkIR flips before cropping; the distribution is the same).
``none``. Rotations are counter-clockwise. ``geometric_augs=False`` turns them all off.

Bad data: a file that cannot be decoded, an lq without its gt (or the reverse), lq/gt of different
sizes, and a grayscale/RGB mix (a grayscale file in an RGB dataset, or a pair with one of each)
raise ``DataError`` naming the file. With ``skip_bad=True`` such pairs are skipped and counted
instead: problems found when listing (headers are read for every pair) are logged once with their
count; a file that only fails when fully decoded is logged and skipped when it is reached. With
``channels=1`` colour files are converted to grey (ITU-R 601 luma), like Restormer's grey data.

Randomness: a per-host seed is derived from ``(seed, process_index)``; grain derives a generator for
each element from it and the element's position, so crops, augmentations and degradations depend
only on the seed and the position in the stream, not on timing, threads or worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grain
import numpy as np
from PIL import Image

from flaxrestore.imageio import read_image
from train import degrade as _degrade

__all__ = [
    "DataConfig", "DataError", "PairList", "make_train_iterator", "make_train_dataset",
    "make_val_dataset", "list_pairs", "load_image", "demo_images", "KINDS", "AUGMENT_MODES",
]

log = logging.getLogger(__name__)

KINDS = ("demo", "paired", "gopro", "lol", "lolv2", "lolblur", "reside", "sidd", "clean")
AUGMENT_MODES = ("dihedral8", "mprnet9", "hflip_rot4", "hvflip", "none")
PAD_MODES = ("symmetric", "reflect", "constant", "edge")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LQ_NAMES = ("lq", "input", "inp", "low", "hazy", "noisy", "blur", "blurred", "rain", "rainy", "degraded")
GT_NAMES = ("gt", "target", "groundtruth", "high", "normal", "clear", "sharp", "clean", "norain")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")

# Demo data: the held-out images of the validation set (by file-name stem); the others train.
DEMO_VAL_IMAGES = ("01_city", "05_beach")
_DEMO_REPEATS = 16  # each training image appears this many times per (virtual) epoch


class DataError(ValueError):
    """Unusable training data; the message names the file(s)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One paired-image data source (see the module docstring for the layouts).

    kind: dataset layout, one of ``KINDS``.
    root: the split folder (unused for ``demo``).
    degradation: demo only; blur, noise, lowlight, haze or rain.
    patch_size: training crop size P; 0 or None trains on whole images (all must then be equal).
    channels: 3 (RGB) or 1 (grey).
    geometric_augs / augment_mode: see the module docstring.
    pad_mode: how images smaller than the patch are padded on the bottom/right before cropping
        (numpy mode names): 'symmetric' = cv2 BORDER_REFLECT (Restormer), 'reflect' = torch /
        torchvision 'reflect' (MPRNet), 'constant' = zeros (DarkIR).
    resize: (H, W) to resize both images to before cropping (SNR-Aware's 400x608 LOLv2-real and
        512x960 SID recipes; bilinear via Pillow, which is close to but not bit-equal with cv2).
    noise_sigma: fixed Gaussian noise level on the 0-255 scale (kind 'clean'; demo 'noise').
    noise_sigma_range: (lo, hi): a level drawn uniformly per sample (blind denoising, (0, 50)).
    skip_bad: count, log and skip bad pairs instead of raising.
    val_root / val_kind: validation split (``make_val_dataset``); val_kind defaults to kind.
    val_patch_size: centre-crop validation images to this size (MPRNet's val); None = full size.
    demo_val_size: demo validation tile size (tiles of the held-out 256x256 images); None = whole.
    lq_subdir / gt_subdir: folder names for kind 'paired' (auto-detected when None).
    num_workers: grain worker processes (0 = in-process; reading threads still prefetch).
    read_threads / prefetch: grain's in-process reading threads and prefetch buffer (elements).
    """

    kind: str = "demo"
    root: str | None = None
    degradation: str = "noise"
    patch_size: int | None = 64
    channels: int = 3
    geometric_augs: bool = True
    augment_mode: str = "dihedral8"
    pad_mode: str = "symmetric"
    resize: tuple[int, int] | None = None
    noise_sigma: float | None = None
    noise_sigma_range: tuple[float, float] | None = None
    skip_bad: bool = False
    val_root: str | None = None
    val_kind: str | None = None
    val_patch_size: int | None = None
    demo_val_size: int | None = 128
    lq_subdir: str | None = None
    gt_subdir: str | None = None
    num_workers: int = 0
    read_threads: int = 2
    prefetch: int = 16

    def __post_init__(self):
        for name in ("resize", "noise_sigma_range"):  # lists from command-line overrides
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        problems = []
        for name in ("resize", "noise_sigma_range"):
            v = getattr(self, name)
            if v is not None and len(v) != 2:
                problems.append(f"{name} must have two values, got {v!r}")
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} is not one of {KINDS}")
        if self.val_kind is not None and self.val_kind not in KINDS:
            problems.append(f"val_kind {self.val_kind!r} is not one of {KINDS}")
        if self.kind == "demo" and self.degradation not in _degrade.KINDS:
            problems.append(f"degradation {self.degradation!r} is not one of {_degrade.KINDS}")
        if self.kind not in ("demo",) and not self.root and not self.val_root:
            problems.append(f"kind {self.kind!r} needs root (the dataset split folder)")
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        if self.augment_mode not in AUGMENT_MODES:
            problems.append(f"augment_mode {self.augment_mode!r} is not one of {AUGMENT_MODES}")
        if self.pad_mode not in PAD_MODES:
            problems.append(f"pad_mode {self.pad_mode!r} is not one of {PAD_MODES}")
        if self.patch_size is not None and self.patch_size < 0:
            problems.append(f"patch_size must be positive, got {self.patch_size}")
        if (self.kind != "demo" and not self.patch_size and self.geometric_augs
                and self.augment_mode in ("dihedral8", "mprnet9", "hflip_rot4")):
            problems.append(f"augment_mode {self.augment_mode!r} rotates by 90 degrees, which needs square "
                            "crops: set patch_size, or use augment_mode 'hvflip' / 'none' for whole images")
        if self.noise_sigma is not None and self.noise_sigma_range is not None:
            problems.append("set noise_sigma or noise_sigma_range, not both")
        noisy = self.noise_sigma is not None or self.noise_sigma_range is not None
        if self.kind == "clean" and not noisy:
            problems.append("kind 'clean' needs noise_sigma or noise_sigma_range")
        if noisy and not (self.kind == "clean" or (self.kind == "demo" and self.degradation == "noise")):
            problems.append("noise_sigma / noise_sigma_range apply to kind 'clean' and the demo 'noise' "
                            f"degradation only, not kind {self.kind!r}")
        if self.num_workers < 0 or self.read_threads < 1:
            problems.append("num_workers must be >= 0 and read_threads >= 1")
        if problems:
            raise ValueError("invalid DataConfig: " + "; ".join(problems))


# ============================================================================ images


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _header(path: str) -> tuple[tuple[int, int], str]:
    """(width, height) and mode from the file header; DataError if it is not an image."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except FileNotFoundError:
        raise DataError(f"missing image file {path}") from None
    except Exception as e:  # PIL.UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"cannot read image file {path}: {e}") from None


def load_image(path: str, channels: int = 3) -> np.ndarray:
    """Decode an image file to float32 (H, W, channels) in [0, 1]; DataError naming the file.

    Decoding is ``flaxrestore.imageio.read_image`` (8- and 16-bit grey/RGB, EXIF orientation; an
    alpha channel is dropped).
    """
    try:
        arr = read_image(path).pixels
    except FileNotFoundError:
        raise DataError(f"missing image file {path}") from None
    except Exception as e:  # ImageReadError and anything else the decoder raises
        msg = str(e)
        if msg.startswith(f"{path}: "):
            msg = msg[len(path) + 2:]
        raise DataError(f"corrupt image file {path}: {msg}") from None
    if arr.shape[-1] == 1:
        if channels == 3:
            raise DataError(f"grayscale image {path} in an RGB dataset (channels=3); "
                            "set channels=1 for grey data")
    elif channels == 1:
        # ITU-R 601 luma, what cv2.IMREAD_GRAYSCALE and PIL's convert('L') use
        arr = (arr @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    return np.ascontiguousarray(arr, dtype=np.float32)


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


# ============================================================================ dataset listing


@dataclasses.dataclass(frozen=True)
class Pair:
    lq: str
    gt: str
    name: str  # relative path of the lq file without extension (for logs and saved outputs)


@dataclasses.dataclass(frozen=True)
class PairList:
    pairs: tuple[Pair, ...]
    skipped: tuple[str, ...] = ()  # one message per skipped pair / file

    def __len__(self):
        return len(self.pairs)


def _walk(folder: str) -> dict[str, str]:
    """Relative path without extension -> full path, for every image under folder."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if not _is_image(f):
                continue
            full = os.path.join(dirpath, f)
            key = os.path.splitext(os.path.relpath(full, folder))[0].replace(os.sep, "/")
            if key in out:
                raise DataError(f"two images with the same name in {folder}: {out[key]} and {full}")
            out[key] = full
    return out


def _subdir(root: str, names: Sequence[str], given: str | None, what: str) -> str:
    if given is not None:
        path = os.path.join(root, given)
        if not os.path.isdir(path):
            raise DataError(f"{what} folder {path} does not exist")
        return path
    entries = {e.lower(): e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))}
    found = [entries[n] for n in names if n in entries]
    if len(found) != 1:
        raise DataError(f"cannot tell the {what} folder in {root}: expected exactly one of {list(names)}, "
                        f"found {sorted(entries.values())}")
    return os.path.join(root, found[0])


def _match(lq_dir: str, gt_dir: str, problems: list[str]) -> list[Pair]:
    lq, gt = _walk(lq_dir), _walk(gt_dir)
    for k in sorted(set(lq) - set(gt)):
        problems.append(f"missing partner: {lq[k]} has no ground truth {os.path.join(gt_dir, k)}.*")
    for k in sorted(set(gt) - set(lq)):
        problems.append(f"missing partner: ground truth {gt[k]} has no input {os.path.join(lq_dir, k)}.*")
    return [Pair(lq[k], gt[k], k) for k in sorted(set(lq) & set(gt))]


def _first_existing(root: str, options: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    low = {e.lower(): e for e in os.listdir(root)}
    for a, b in options:
        if a in low and b in low and os.path.isdir(os.path.join(root, low[a])):
            return os.path.join(root, low[a]), os.path.join(root, low[b])
    return None


def _raw_pairs(kind: str, root: str, lq_subdir, gt_subdir, problems: list[str]) -> list[Pair]:
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root} does not exist")
    if kind == "paired":
        return _match(_subdir(root, LQ_NAMES, lq_subdir, "input"), _subdir(root, GT_NAMES, gt_subdir, "ground-truth"),
                      problems)
    if kind in ("gopro", "sidd"):
        dirs = _first_existing(root, [("input", "target"), ("input_crops", "target_crops"),
                                      ("input", "groundtruth"), ("input_crops", "groundtruth_crops")])
        if dirs:
            return _match(*dirs, problems)
        if kind == "gopro":
            pairs = []
            for scene in sorted(os.listdir(root)):
                d = os.path.join(root, scene)
                if os.path.isdir(os.path.join(d, "blur")) and os.path.isdir(os.path.join(d, "sharp")):
                    pairs += [dataclasses.replace(p, name=f"{scene}/{p.name}")
                              for p in _match(os.path.join(d, "blur"), os.path.join(d, "sharp"), problems)]
            if pairs or problems:
                return pairs
            raise DataError(f"{root} is not a GoPro split: expected input/ + target/, input_crops/ + "
                            "target_crops/, or <scene>/blur/ + <scene>/sharp/ (GOPRO_Large)")
        pairs = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                m = re.match(r"NOISY_(SRGB_\d+\.\w+)$", f, re.IGNORECASE)
                if not m:
                    continue
                gt_name = next((g for g in filenames if g.upper() == ("GT_" + m.group(1)).upper()), None)
                lq_path = os.path.join(dirpath, f)
                rel = os.path.splitext(os.path.relpath(lq_path, root))[0].replace(os.sep, "/")
                if gt_name is None:
                    problems.append(f"missing partner: {lq_path} has no GT_{m.group(1)} beside it")
                else:
                    pairs.append(Pair(lq_path, os.path.join(dirpath, gt_name), rel))
        if pairs or problems:
            return pairs
        raise DataError(f"{root} is not a SIDD split: expected input/ + target/ (or groundtruth/, or the "
                        "*_crops folders), or SIDD-Medium scene folders with NOISY_SRGB_*/GT_SRGB_* files")
    if kind == "lol":
        dirs = _first_existing(root, [("low", "high")])
        if not dirs:
            raise DataError(f"{root} is not a LOL split: expected low/ + high/ (e.g. our485/ or eval15/)")
        return _match(*dirs, problems)
    if kind == "lolv2":
        dirs = _first_existing(root, [("low", "normal")])
        if not dirs:
            raise DataError(f"{root} is not a LOL-v2 split: expected Low/ + Normal/ "
                            "(e.g. Real_captured/Train/ or Synthetic/Test/)")
        return _match(*dirs, problems)
    if kind == "lolblur":
        dirs = _first_existing(root, [("low_blur_noise", "high_sharp_scaled")])
        if not dirs:
            raise DataError(f"{root} is not a LOLBlur split: expected low_blur_noise/ + high_sharp_scaled/")
        return _match(*dirs, problems)
    if kind == "reside":
        dirs = _first_existing(root, [("hazy", "clear"), ("hazy", "gt")])
        if not dirs:
            raise DataError(f"{root} is not a RESIDE split: expected hazy/ + clear/ (ITS, OTS) or hazy/ + gt/ (SOTS)")
        hazy, clear = _walk(dirs[0]), _walk(dirs[1])
        pairs = []
        for k in sorted(hazy):
            head, _, base = k.rpartition("/")
            cid = (head + "/" if head else "") + base.split("_", 1)[0]
            if cid in clear:
                pairs.append(Pair(hazy[k], clear[cid], k))
            else:
                problems.append(f"missing partner: {hazy[k]} has no clear image {os.path.join(dirs[1], cid)}.*")
        return pairs
    if kind == "clean":
        files = _walk(root)
        return [Pair(files[k], files[k], k) for k in sorted(files)]
    raise ValueError(f"kind {kind!r} has no folder layout")


def _check_pair(pair: Pair, kind: str, channels: int) -> str | None:
    try:
        (lw, lh), lmode = _header(pair.lq)
        if pair.gt == pair.lq:
            gw, gh, gmode = lw, lh, lmode
        else:
            (gw, gh), gmode = _header(pair.gt)
    except DataError as e:
        return str(e)
    lgray, ggray = lmode in _GRAY_MODES, gmode in _GRAY_MODES
    if lgray != ggray:
        g, c = (pair.lq, pair.gt) if lgray else (pair.gt, pair.lq)
        return f"grayscale/RGB mix: {g} is grayscale ({'mode ' + (lmode if lgray else gmode)}) but its partner {c} is colour"
    if lgray and channels == 3:
        return f"grayscale image {pair.lq} in an RGB dataset (channels=3); set channels=1 for grey data"
    if kind == "reside":
        if gw < lw or gh < lh:
            return f"size mismatch: ground truth {pair.gt} ({gw}x{gh}) is smaller than hazy {pair.lq} ({lw}x{lh})"
    elif (lw, lh) != (gw, gh):
        return f"size mismatch: {pair.lq} is {lw}x{lh} but its ground truth {pair.gt} is {gw}x{gh}"
    return None


def list_pairs(kind: str, root: str, *, channels: int = 3, skip_bad: bool = False,
               lq_subdir: str | None = None, gt_subdir: str | None = None, check: bool = True,
               shard: tuple[int, int] = (0, 1)) -> PairList:
    """Sorted file pairs of a dataset split, with every header checked (see the module docstring).

    ``shard=(i, n)`` keeps every n-th pair starting at i of the sorted list *before* the header
    checks, so a host opens only its own files (and a skipped bad pair never moves pairs between
    hosts).
    """
    problems: list[str] = []
    pairs = _raw_pairs(kind, root, lq_subdir, gt_subdir, problems)
    index, count = shard
    pairs = pairs[index::count]
    if check and pairs:
        with ThreadPoolExecutor(8) as ex:
            verdicts = list(ex.map(lambda p: _check_pair(p, kind, channels), pairs))
        problems += [v for v in verdicts if v]
        pairs = [p for p, v in zip(pairs, verdicts) if v is None]
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix the data or set skip_bad=True to skip bad pairs")
    if problems:
        log.warning("skipping %d bad pair(s)/file(s) in %s; first: %s", len(problems), root, problems[0])
    if not pairs:
        raise DataError(f"no usable image pairs in {root} (layout {kind!r})")
    return PairList(tuple(pairs), tuple(problems))


# ============================================================================ per-sample transforms


def _pad_to(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    ph, pw = max(0, size - img.shape[0]), max(0, size - img.shape[1])
    if not ph and not pw:
        return img
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode)


def _center_crop(img: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top:top + h, left:left + w]


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = int(hw[0]), int(hw[1])
    if img.shape[:2] == (h, w):
        return img
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32)).resize((w, h), Image.BILINEAR))
              for c in range(img.shape[-1])]
    return np.stack(planes, -1).astype(np.float32)


def _transform_ops(mode: str, rng: np.random.Generator) -> list:
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


def _apply_ops(img: np.ndarray, ops: list) -> np.ndarray:
    for op in ops:
        if op == "flipud":
            img = img[::-1]
        elif op == "fliplr":
            img = img[:, ::-1]
        else:
            img = np.rot90(img, op[1], axes=(0, 1))
    return img


def _noise_sigma(cfg: DataConfig, rng: np.random.Generator) -> float:
    if cfg.noise_sigma is not None:
        return float(cfg.noise_sigma)
    lo, hi = cfg.noise_sigma_range
    return float(rng.uniform(lo, hi))


def _load_pair(pair: Pair, cfg: DataConfig, kind: str) -> tuple[np.ndarray, np.ndarray]:
    lq = load_image(pair.lq, cfg.channels)
    gt = lq if pair.gt == pair.lq else load_image(pair.gt, cfg.channels)
    if kind == "reside" and gt.shape[:2] != lq.shape[:2]:
        if gt.shape[0] < lq.shape[0] or gt.shape[1] < lq.shape[1]:
            raise DataError(f"size mismatch: ground truth {pair.gt} is smaller than hazy {pair.lq}")
        gt = _center_crop(gt, *lq.shape[:2])
    if lq.shape != gt.shape:
        raise DataError(f"size mismatch: {pair.lq} is {lq.shape[1]}x{lq.shape[0]} but its ground truth "
                        f"{pair.gt} is {gt.shape[1]}x{gt.shape[0]}")
    if cfg.resize is not None:
        lq, gt = _resize(lq, cfg.resize), _resize(gt, cfg.resize)
    return lq, gt


class _TrainSample:
    """grain random_map: record -> {'lq', 'gt'} (or None for a skipped bad pair)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __call__(self, record: Any, rng: np.random.Generator):
        cfg = self.cfg
        p = cfg.patch_size or 0
        if cfg.kind == "demo":
            name, img = _demo_images_cached()[record]
            if cfg.channels == 1:
                img = (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
            m = _degrade.margin(cfg.degradation)
            size = (p or img.shape[0]) + 2 * m
            src = np.pad(img, ((m, m), (m, m), (0, 0)), mode="symmetric") if m else img
            src = _pad_to(src, size, cfg.pad_mode)
            top = int(rng.integers(0, src.shape[0] - size + 1))
            left = int(rng.integers(0, src.shape[1] - size + 1))
            clean = src[top:top + size, left:left + size]
            if cfg.geometric_augs:
                clean = _apply_ops(clean, _transform_ops(cfg.augment_mode, rng))
            clean = np.ascontiguousarray(clean, dtype=np.float32)
            lq, gt = _degrade.degrade(cfg.degradation, clean, rng, noise_sigma=cfg.noise_sigma,
                                      noise_sigma_range=cfg.noise_sigma_range)
            return {"lq": lq, "gt": gt}
        try:
            lq, gt = _load_pair(record, cfg, cfg.kind)
        except DataError as e:
            if not cfg.skip_bad:
                raise
            log.warning("skipping bad pair: %s", e)
            return None
        if p:
            lq, gt = _pad_to(lq, p, cfg.pad_mode), _pad_to(gt, p, cfg.pad_mode)
            top = int(rng.integers(0, lq.shape[0] - p + 1))
            left = int(rng.integers(0, lq.shape[1] - p + 1))
            lq, gt = lq[top:top + p, left:left + p], gt[top:top + p, left:left + p]
        if cfg.geometric_augs:
            ops = _transform_ops(cfg.augment_mode, rng)
            lq, gt = _apply_ops(lq, ops), _apply_ops(gt, ops)
        gt = np.ascontiguousarray(gt, dtype=np.float32)
        if cfg.kind == "clean":
            sigma = _noise_sigma(cfg, rng)
            lq = gt + rng.standard_normal(gt.shape, dtype=np.float32) * np.float32(sigma / 255.0)
        return {"lq": np.ascontiguousarray(lq, dtype=np.float32), "gt": gt}


# ============================================================================ public API


def _host_seeds(seed: int, process_index: int) -> tuple[int, int]:
    s = np.random.SeedSequence([int(seed) % 2**32, int(process_index)]).generate_state(2)
    return int(s[0]), int(s[1])


def _train_records(cfg: DataConfig, process_index: int, process_count: int) -> list:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    if cfg.kind == "demo":
        names = [n for n, _ in _demo_images_cached()]
        train_idx = [i for i, n in enumerate(names) if n not in DEMO_VAL_IMAGES]
        records = [i for _ in range(_DEMO_REPEATS) for i in train_idx]
        where = "the demo images"
    else:
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
        return list(plist.pairs)
    shard = records[process_index::process_count]
    if not shard:
        raise DataError(f"host {process_index} of {process_count} gets no data: only {len(records)} "
                        f"training pair(s) in {where}")
    return shard


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
    records = _train_records(cfg, process_index, process_count)
    shuffle_seed, map_seed = _host_seeds(seed, process_index)
    ds = (grain.MapDataset.source(records)
          .shuffle(seed=shuffle_seed)   # before repeat: a new permutation every epoch
          .repeat(None)
          .random_map(_TrainSample(cfg), seed=map_seed))
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
    """Infinite, deterministic, resumable per-host iterator of training batches (module docstring)."""
    return iter(make_train_dataset(cfg, batch_size=batch_size, seed=seed, process_index=process_index,
                                   process_count=process_count))


class _ValSet(Sequence):
    """Lazily loaded validation pairs: ``ds[i] -> {'lq', 'gt', 'name'}``."""

    def __init__(self, cfg: DataConfig, kind: str, pairs: Sequence[Pair]):
        self.cfg, self.kind, self.pairs = cfg, kind, tuple(pairs)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        pair = self.pairs[i]
        lq, gt = _load_pair(pair, self.cfg, self.kind)
        if self.kind == "clean":
            rng = np.random.default_rng([0, i])  # fixed per image, like the test scripts' seed(0)
            sigma = _noise_sigma(self.cfg, rng)
            lq = gt + rng.standard_normal(gt.shape, dtype=np.float32) * np.float32(sigma / 255.0)
        vp = self.cfg.val_patch_size
        if vp:
            lq, gt = _center_crop(lq, min(vp, lq.shape[0]), min(vp, lq.shape[1])), \
                _center_crop(gt, min(vp, gt.shape[0]), min(vp, gt.shape[1]))
        return {"lq": np.ascontiguousarray(lq, np.float32), "gt": np.ascontiguousarray(gt, np.float32),
                "name": pair.name}


def _demo_val(cfg: DataConfig) -> list[dict]:
    out = []
    size = cfg.demo_val_size
    m = _degrade.margin(cfg.degradation)
    k = 0
    for name, img in _demo_images_cached():
        if name not in DEMO_VAL_IMAGES:
            continue
        if cfg.channels == 1:
            img = (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        h, w = img.shape[:2]
        s = size or h
        src = np.pad(img, ((m, m), (m, m), (0, 0)), mode="symmetric") if m else img
        for top in range(0, h - s + 1, s):
            for left in range(0, w - s + 1, s):
                clean = np.ascontiguousarray(src[top:top + s + 2 * m, left:left + s + 2 * m], np.float32)
                rng = np.random.default_rng([12345, _degrade.KINDS.index(cfg.degradation), k])
                lq, gt = _degrade.degrade(cfg.degradation, clean, rng, noise_sigma=cfg.noise_sigma,
                                          noise_sigma_range=cfg.noise_sigma_range)
                out.append({"lq": lq, "gt": gt, "name": f"{name}_{top}_{left}"})
                k += 1
    return out


def make_val_dataset(cfg: DataConfig) -> Sequence[dict]:
    """Validation pairs at full size (or ``val_patch_size`` centre crops), in a fixed order."""
    kind = cfg.val_kind or cfg.kind
    if kind == "demo":
        return _demo_val(cfg)
    root = cfg.val_root or cfg.root
    if not root:
        raise ValueError("make_val_dataset needs val_root (or root) for a folder dataset")
    plist = list_pairs(kind, root, channels=cfg.channels, skip_bad=cfg.skip_bad,
                       lq_subdir=cfg.lq_subdir, gt_subdir=cfg.gt_subdir)
    return _ValSet(cfg, kind, plist.pairs)
