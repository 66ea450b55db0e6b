"""Dataset folder layouts: ``LAYOUTS`` maps each ``kind`` to the function that lists its file pairs.

Layouts (``kind``; ``root`` is the split folder, e.g. ``.../GoPro/train``)
--------------------------------------------------------------------------

=========  ===============================================================================
paired     ``root/<lq>/**`` and ``root/<gt>/**`` matched by relative path without extension.
           ``<lq>``/``<gt>`` are ``lq_subdir``/``gt_subdir`` or found among
           lq|input|inp|low|hazy|noisy|blur|blurred|rain|rainy|degraded and
           gt|target|groundtruth|high|normal|clear|sharp|clean|norain.
gopro      ``input/`` + ``target/`` (MPRNet; Restormer's ``input_crops/`` + ``target_crops/``),
           or the GOPRO_Large release ``<scene>/blur/*.png`` + ``<scene>/sharp/*.png``.
lol        LOL v1: ``low/`` + ``high/`` (``our485`` for training, ``eval15`` for testing).
lolv2      LOL-v2 (``Real_captured`` or ``Synthetic``, split ``Train``/``Test``): ``Low/`` + ``Normal/``.
lolblur    LOLBlur: ``low_blur_noise/<scene>/<frame>.png`` + ``high_sharp_scaled/<scene>/<frame>.png``.
reside     RESIDE: ``hazy/<id>_<...>.<ext>`` + ``clear/<id>.<ext>`` (ITS/OTS; several hazy
           images share one clear image) or + ``gt/<id>.<ext>`` (SOTS). A ground truth larger
           than its hazy image is centre-cropped to it (ITS: 640x480 vs 620x460), as AECR-Net does.
sidd       ``input/`` + ``target/`` (or ``groundtruth/``, or the ``*_crops`` folders), or the
           SIDD-Medium release: ``**/NOISY_SRGB_<k>.PNG`` next to ``GT_SRGB_<k>.PNG``.
clean      Only clean images (``root/**``); ``lq = gt + N(0, sigma/255)`` synthesised after crop
           and augmentation with ``noise_sigma`` or ``noise_sigma_range`` (Restormer's Gaussian
           denoising on DFWB). The noisy input is not clipped. Validation adds noise with a fixed
           per-image seed.
demo       Built-in, no folder (``train.data.sources``): clean images shipped in ``flaxrestore/data``
           degraded on the fly with ``degradation`` (blur, noise, lowlight, haze, rain; see
           ``train.degrade``).
=========  ===============================================================================

(AECR-Net's own loader reads HDF5 files; use the RESIDE image folders here instead.)

Checks: ``list_pairs`` reads every pair's headers. An lq without its gt (or the reverse), a file
that cannot be opened, lq/gt of different sizes, and a grayscale/RGB mix (a grayscale file in an
RGB dataset, or a pair with one of each) raise ``DataError`` naming the file; with
``skip_bad=True`` such pairs are skipped, counted and logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from train.data.images import GRAY_MODES, DataError, is_image, read_header

log = logging.getLogger(__name__)

LQ_NAMES = ("lq", "input", "inp", "low", "hazy", "noisy", "blur", "blurred", "rain", "rainy", "degraded")
GT_NAMES = ("gt", "target", "groundtruth", "high", "normal", "clear", "sharp", "clean", "norain")


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


# ============================================================================ folder helpers


def _walk(folder: str) -> dict[str, str]:
    """Relative path without extension -> full path, for every image under folder."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if not is_image(f):
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


# ============================================================================ layouts
#
# Every layout is called as layout(root, problems, lq_subdir, gt_subdir) on an existing folder and
# returns the sorted pairs; a missing partner is appended to problems, a folder that does not have
# the layout at all raises DataError. Only 'paired' reads lq_subdir / gt_subdir.

Layout = Callable[[str, list[str], str | None, str | None], list[Pair]]

_SPLIT_FOLDERS = [("input", "target"), ("input_crops", "target_crops"),
                  ("input", "groundtruth"), ("input_crops", "groundtruth_crops")]


def _paired(root, problems, lq_subdir, gt_subdir):
    return _match(_subdir(root, LQ_NAMES, lq_subdir, "input"), _subdir(root, GT_NAMES, gt_subdir, "ground-truth"),
                  problems)


def _gopro(root, problems, lq_subdir, gt_subdir):
    dirs = _first_existing(root, _SPLIT_FOLDERS)
    if dirs:
        return _match(*dirs, problems)
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


def _sidd(root, problems, lq_subdir, gt_subdir):
    dirs = _first_existing(root, _SPLIT_FOLDERS)
    if dirs:
        return _match(*dirs, problems)
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


def _two_folders(lq: str, gt: str, what: str, expected: str) -> Layout:
    """A layout of two fixed sibling folders (names matched case-insensitively)."""

    def layout(root, problems, lq_subdir, gt_subdir):
        dirs = _first_existing(root, [(lq, gt)])
        if not dirs:
            raise DataError(f"{root} is not a {what} split: expected {expected}")
        return _match(*dirs, problems)

    return layout


def _reside(root, problems, lq_subdir, gt_subdir):
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


def _clean(root, problems, lq_subdir, gt_subdir):
    files = _walk(root)
    return [Pair(files[k], files[k], k) for k in sorted(files)]


LAYOUTS: dict[str, Layout] = {
    "paired": _paired,
    "gopro": _gopro,
    "lol": _two_folders("low", "high", "LOL", "low/ + high/ (e.g. our485/ or eval15/)"),
    "lolv2": _two_folders("low", "normal", "LOL-v2",
                          "Low/ + Normal/ (e.g. Real_captured/Train/ or Synthetic/Test/)"),
    "lolblur": _two_folders("low_blur_noise", "high_sharp_scaled", "LOLBlur",
                            "low_blur_noise/ + high_sharp_scaled/"),
    "reside": _reside,
    "sidd": _sidd,
    "clean": _clean,
}


def raw_pairs(kind: str, root: str, lq_subdir: str | None, gt_subdir: str | None,
              problems: list[str]) -> list[Pair]:
    """All pairs of the layout, unchecked; missing partners are appended to ``problems``."""
    layout = LAYOUTS.get(kind)
    if layout is None:
        raise ValueError(f"kind {kind!r} has no folder layout; the layouts are {', '.join(LAYOUTS)}")
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root} does not exist")
    return layout(root, problems, lq_subdir, gt_subdir)


# ============================================================================ checks


def check_pair(pair: Pair, kind: str, channels: int) -> str | None:
    """What is wrong with the pair according to the file headers, or None."""
    try:
        (lw, lh), lmode = read_header(pair.lq)
        if pair.gt == pair.lq:
            gw, gh, gmode = lw, lh, lmode
        else:
            (gw, gh), gmode = read_header(pair.gt)
    except DataError as e:
        return str(e)
    lgray, ggray = lmode in GRAY_MODES, gmode in GRAY_MODES
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
    pairs = raw_pairs(kind, root, lq_subdir, gt_subdir, problems)
    index, count = shard
    pairs = pairs[index::count]
    if check and pairs:
        with ThreadPoolExecutor(8) as ex:
            verdicts = list(ex.map(lambda p: check_pair(p, kind, channels), pairs))
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
