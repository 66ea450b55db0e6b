"""``DataConfig``: one data source and its options, checked when constructed."""

from __future__ import annotations

import dataclasses

from train import degrade as _degrade
from train.data.layouts import LAYOUTS

KINDS = ("demo", *LAYOUTS)
AUGMENT_MODES = ("dihedral8", "mprnet9", "hflip_rot4", "hvflip", "none")
PAD_MODES = ("symmetric", "reflect", "constant", "edge")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One paired-image data source.

    kind: dataset layout, one of ``KINDS``: 'demo' (built-in, ``train.data.sources``) or a folder
        layout of ``train.data.layouts``.
    root: the split folder (unused for ``demo``).
    degradation: demo only; blur, noise, lowlight, haze or rain.
    patch_size: training crop size P; 0 or None trains on whole images (all must then be equal).
    channels: 3 (RGB) or 1 (grey).
    geometric_augs / augment_mode: see ``train.data.transforms``.
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
    lq_subdir / gt_subdir: folder names for kind 'paired' (auto-detected when None); refused
        for other kinds (they find their own folders).
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
        if (self.lq_subdir or self.gt_subdir) and "paired" not in (self.kind, self.val_kind):
            problems.append("lq_subdir / gt_subdir name the folders of kind 'paired' only; kind "
                            f"{self.kind!r} finds its own folders")
        if self.num_workers < 0 or self.read_threads < 1:
            problems.append("num_workers must be >= 0 and read_threads >= 1")
        if problems:
            raise ValueError("invalid DataConfig: " + "; ".join(problems))
