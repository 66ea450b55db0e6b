"""train.data: layouts, crops/augmentations, determinism, resume, sharding, bad data, demo data."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from train import data as D
from train.data import images
from train.data import layouts as L
from train import degrade
from train.data.transforms import apply_ops, transform_ops


# ----------------------------------------------------------------------------- helpers


def write_png(path, arr):
    """arr float in [0, 1], (H, W, 3) or (H, W) -> 8-bit PNG."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(a).save(path)


def const_img(value, h=20, w=24, c=3):
    return np.full((h, w, c) if c > 1 else (h, w), value, np.float32)


def make_paired(root, n=5, lq="input", gt="target", h=20, w=24, ext=".png"):
    """n pairs whose gt is constant 12 (k + 1) / 255 and lq = gt + 2/255, so a crop identifies its pair."""
    for k in range(n):
        write_png(os.path.join(root, gt, f"img{k}{ext}"), const_img(12 * (k + 1) / 255, h, w))
        write_png(os.path.join(root, lq, f"img{k}{ext}"), const_img((12 * (k + 1) + 2) / 255, h, w))
    return root


def pair_ids(batch):
    return [int(round(float(g.mean()) * 255 / 12)) - 1 for g in batch["gt"]]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["lq"], y["lq"])
        np.testing.assert_array_equal(x["gt"], y["gt"])


# ----------------------------------------------------------------------------- demo data


@pytest.mark.parametrize("deg", degrade.KINDS)
def test_demo_batches(deg):
    cfg = D.DataConfig(kind="demo", degradation=deg, patch_size=32)
    b = next(D.make_train_iterator(cfg, batch_size=3, seed=1))
    assert set(b) == {"lq", "gt"}
    for k in ("lq", "gt"):
        assert b[k].shape == (3, 32, 32, 3) and b[k].dtype == np.float32
        assert b[k].min() >= 0.0 and b[k].max() <= 1.0
    diff = np.abs(b["lq"] - b["gt"]).mean(axis=(1, 2, 3))
    assert np.all(diff > 1e-3), diff  # every sample is actually degraded
    assert np.std(b["gt"]) > 0.05  # natural-image content, not a flat patch


def test_demo_val_fixed_and_held_out():
    cfg = D.DataConfig(kind="demo", degradation="haze", demo_val_size=128)
    v1, v2 = D.make_val_dataset(cfg), D.make_val_dataset(dataclasses_replace(cfg, patch_size=16))
    assert len(v1) == 2 * 4
    for a, b in zip(v1, v2):  # independent of training settings and of any seed
        assert a["name"] == b["name"] and a["lq"].shape == (128, 128, 3)
        np.testing.assert_array_equal(a["lq"], b["lq"])
    imgs = D.demo_images()
    for x in v1:  # gt tiles come from the held-out images only
        stem, top, left = x["name"].rsplit("_", 2)
        assert stem in D.DEMO_VAL_IMAGES
        np.testing.assert_array_equal(x["gt"], imgs[stem][int(top):int(top) + 128, int(left):int(left) + 128])
    whole = D.make_val_dataset(dataclasses_replace(cfg, demo_val_size=None, channels=1))
    assert len(whole) == 2 and whole[0]["lq"].shape == (256, 256, 1)


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_demo_images_shipped():
    imgs = D.demo_images()
    assert len(imgs) >= 6
    total = sum(os.path.getsize(p) for p in _demo_files())
    assert total < 2 * 1024 * 1024
    for img in imgs.values():
        assert img.shape == (256, 256, 3)
        # natural-image statistics: strong neighbour correlation (not noise), real edges
        dx = np.abs(np.diff(img, axis=1)).mean()
        assert dx < 0.5 * np.abs(img - img.mean()).mean()
        assert np.abs(np.diff(img, axis=1)).max() > 0.3


def _demo_files():
    import importlib.resources
    folder = importlib.resources.files("flaxrestore") / "data"
    return [str(p) for p in folder.iterdir() if p.name.endswith(".png")]


def test_degradations_deterministic_and_blur_kernel():
    clean = D.demo_images()["00_mountains"][:40, :40]
    for kind in degrade.KINDS:
        a = degrade.degrade(kind, clean, np.random.default_rng(5))
        b = degrade.degrade(kind, clean, np.random.default_rng(5))
        c = degrade.degrade(kind, clean, np.random.default_rng(6))
        m = degrade.margin(kind)
        assert a[0].shape == (40 - 2 * m, 40 - 2 * m, 3)
        np.testing.assert_array_equal(a[0], b[0])
        assert not np.array_equal(a[0], c[0])
    for s in range(20):
        k = degrade.blur_kernel(np.random.default_rng(s))
        assert k.shape == (15, 15) and abs(k.sum() - 1) < 1e-5 and k.min() >= 0
    # a 'valid' blur of a constant image is the same constant
    flat = np.full((30, 30, 3), 0.4, np.float32)
    lq, gt = degrade.degrade("blur", flat, np.random.default_rng(0))
    np.testing.assert_allclose(lq, 0.4, atol=1e-5)


# ----------------------------------------------------------------------------- determinism, resume, epochs


def test_deterministic_by_seed():
    cfg = D.DataConfig(kind="demo", degradation="noise", patch_size=16)
    a = take(D.make_train_iterator(cfg, batch_size=2, seed=3), 3)
    b = take(D.make_train_iterator(cfg, batch_size=2, seed=3), 3)
    c = take(D.make_train_iterator(cfg, batch_size=2, seed=4), 3)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["gt"], c[0]["gt"])


@pytest.mark.parametrize("kind", ["demo", "paired"])
def test_resume_from_state(tmp_path, kind):
    if kind == "demo":
        cfg = D.DataConfig(kind="demo", degradation="rain", patch_size=16)
    else:
        cfg = D.DataConfig(kind="paired", root=str(make_paired(tmp_path, n=3)), patch_size=8)
    it = D.make_train_iterator(cfg, batch_size=2, seed=0)
    take(it, 4)  # crosses an epoch boundary for the 3-pair dataset
    state = it.get_state()
    expected = take(it, 3)
    fresh = D.make_train_iterator(cfg, batch_size=2, seed=0)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)


def test_epochs_cover_all_pairs_and_reshuffle(tmp_path):
    root = make_paired(tmp_path, n=5)
    cfg = D.DataConfig(kind="paired", root=str(root), patch_size=8, geometric_augs=False)
    it = D.make_train_iterator(cfg, batch_size=5, seed=0)
    epochs = [pair_ids(next(it)) for _ in range(4)]
    for e in epochs:
        assert sorted(e) == [0, 1, 2, 3, 4]
    assert len({tuple(e) for e in epochs}) > 1  # a new order per epoch
    b = next(D.make_train_iterator(cfg, batch_size=5, seed=0))
    np.testing.assert_allclose(b["lq"] - b["gt"], 2 / 255, atol=1e-6)  # lq and gt stay paired


def test_host_sharding(tmp_path):
    root = make_paired(tmp_path, n=5)
    cfg = D.DataConfig(kind="paired", root=str(root), patch_size=8)
    seen = []
    for host in range(2):
        it = D.make_train_iterator(cfg, batch_size=1, seed=0, process_index=host, process_count=2)
        seen.append({pair_ids(next(it))[0] for _ in range(12)})
    assert seen[0] == {0, 2, 4} and seen[1] == {1, 3}
    with pytest.raises(D.DataError, match="gets no data"):
        D.make_train_iterator(cfg, batch_size=1, seed=0, process_index=5, process_count=6)


def test_worker_process_matches_in_process():
    cfg = D.DataConfig(kind="demo", degradation="lowlight", patch_size=16)
    a = take(D.make_train_iterator(cfg, batch_size=2, seed=9), 2)
    it = D.make_train_iterator(dataclasses_replace(cfg, num_workers=1), batch_size=2, seed=9)
    try:
        b = take(it, 2)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    assert_batches_equal(a, b)


# ----------------------------------------------------------------------------- crops and augmentations


class FixedRng:
    """Stands in for a Generator: integers() returns the given values in turn."""

    def __init__(self, ints=(), floats=()):
        self.ints, self.floats = list(ints), list(floats)

    def integers(self, lo, hi):
        v = self.ints.pop(0)
        assert lo <= v < hi
        return v

    def random(self):
        return self.floats.pop(0)


def test_augment_tables():
    x = np.arange(3 * 4 * 2).reshape(3, 4, 2)
    restormer = [lambda a: a, np.flipud, np.rot90, lambda a: np.flipud(np.rot90(a)),
                 lambda a: np.rot90(a, 2), lambda a: np.flipud(np.rot90(a, 2)),
                 lambda a: np.rot90(a, 3), lambda a: np.flipud(np.rot90(a, 3))]
    for m, f in enumerate(restormer):
        got = apply_ops(x, transform_ops("dihedral8", FixedRng([m])))
        np.testing.assert_array_equal(got, f(x))
    # MPRNet on CHW tensors: flip(1) = rows, flip(2) = columns, rot90 over dims (1, 2)
    mpr = [lambda a: a, lambda a: a[::-1], lambda a: a[:, ::-1], np.rot90, lambda a: np.rot90(a, 2),
           lambda a: np.rot90(a, 3), lambda a: np.rot90(a[::-1]), lambda a: np.rot90(a[:, ::-1]), lambda a: a]
    for m, f in enumerate(mpr):
        np.testing.assert_array_equal(apply_ops(x, transform_ops("mprnet9", FixedRng([m]))), f(x))
    # AECR-Net: horizontal flip then counter-clockwise rotation by 90 r
    got = apply_ops(x, transform_ops("hflip_rot4", FixedRng([3], [0.2])))
    np.testing.assert_array_equal(got, np.rot90(x[:, ::-1], 3))
    got = apply_ops(x, transform_ops("hvflip", FixedRng([], [0.9, 0.1])))
    np.testing.assert_array_equal(got, x[::-1])
    # frequencies: mprnet9 keeps the identity twice as often as the others
    rng = np.random.default_rng(0)
    counts = {}
    for _ in range(9000):
        key = str(transform_ops("mprnet9", rng))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 8 and abs(counts["[]"] / 9000 - 2 / 9) < 0.02


def test_augment_applied_identically(tmp_path):
    root = tmp_path / "p"
    rng = np.random.default_rng(0)
    pattern = rng.random((12, 12, 3)).astype(np.float32) * 0.9
    write_png(str(root / "gt" / "a.png"), pattern)
    write_png(str(root / "lq" / "a.png"), pattern + 0.1)
    for mode in D.AUGMENT_MODES:
        cfg = D.DataConfig(kind="paired", root=str(root), patch_size=12, augment_mode=mode)
        b = take(D.make_train_iterator(cfg, batch_size=4, seed=1), 2)
        for batch in b:
            np.testing.assert_allclose(batch["lq"] - batch["gt"], 0.1, atol=1 / 255)


def test_crop_and_pad_small_images(tmp_path):
    root = tmp_path / "p"
    gt = np.linspace(0, 1, 6 * 5 * 3).reshape(6, 5, 3).astype(np.float32)
    write_png(str(root / "target" / "a.png"), gt)
    write_png(str(root / "input" / "a.png"), gt)
    q = np.round(gt * 255) / 255
    for mode, ref in [("symmetric", np.pad(q, ((0, 2), (0, 3), (0, 0)), mode="symmetric")),
                      ("reflect", np.pad(q, ((0, 2), (0, 3), (0, 0)), mode="reflect"))]:
        cfg = D.DataConfig(kind="paired", root=str(root), patch_size=8, pad_mode=mode, geometric_augs=False)
        b = next(D.make_train_iterator(cfg, batch_size=1, seed=0))
        np.testing.assert_allclose(b["gt"][0], ref, atol=1e-6)
    # whole images, no crop
    cfg = D.DataConfig(kind="paired", root=str(root), patch_size=None, geometric_augs=False)
    assert next(D.make_train_iterator(cfg, batch_size=2, seed=0))["gt"].shape == (2, 6, 5, 3)
    # resize before cropping (SNR-Aware's fixed training size); a flat image stays flat
    write_png(str(root / "target" / "b.png"), const_img(0.4, 9, 7))
    write_png(str(root / "input" / "b.png"), const_img(0.4, 9, 7))
    with pytest.raises(ValueError, match="square"):
        D.DataConfig(kind="paired", root=str(root), patch_size=None, resize=(12, 10))
    cfg = D.DataConfig(kind="paired", root=str(root), patch_size=None, resize=(12, 10), augment_mode="hvflip")
    b = next(D.make_train_iterator(cfg, batch_size=2, seed=0))
    assert b["gt"].shape == (2, 12, 10, 3)
    os.remove(root / "target" / "b.png")
    os.remove(root / "input" / "b.png")
    # random crops cover different windows
    big = tmp_path / "big"
    write_png(str(big / "gt" / "a.png"), np.random.default_rng(0).random((40, 40, 3)))
    write_png(str(big / "lq" / "a.png"), np.random.default_rng(0).random((40, 40, 3)))
    cfg = D.DataConfig(kind="paired", root=str(big), patch_size=8, geometric_augs=False)
    b = next(D.make_train_iterator(cfg, batch_size=4, seed=0))
    assert len({b["gt"][i].tobytes() for i in range(4)}) == 4
    np.testing.assert_array_equal(b["lq"], b["gt"])


def test_clean_kind_synthesises_noise(tmp_path):
    root = tmp_path / "clean"
    write_png(str(root / "a.png"), const_img(0.8, 64, 64))
    cfg = D.DataConfig(kind="clean", root=str(root), patch_size=64, noise_sigma=25)
    b = next(D.make_train_iterator(cfg, batch_size=2, seed=0))
    noise = b["lq"] - b["gt"]
    assert abs(noise.std() - 25 / 255) < 0.005 and abs(noise.mean()) < 0.005
    assert b["lq"].max() > 1.05  # Restormer does not clip the noisy input
    blind = dataclasses_replace(cfg, noise_sigma=None, noise_sigma_range=(0.0, 50.0))
    stds = [float((x["lq"] - x["gt"]).std()) for x in take(D.make_train_iterator(blind, batch_size=1, seed=0), 6)]
    assert max(stds) - min(stds) > 0.02  # a different level per sample
    v = D.make_val_dataset(dataclasses_replace(cfg, val_root=str(root)))
    np.testing.assert_array_equal(v[0]["lq"], D.make_val_dataset(cfg)[0]["lq"])  # fixed val noise
    with pytest.raises(ValueError, match="noise_sigma"):
        D.DataConfig(kind="clean", root=str(root))


# ----------------------------------------------------------------------------- dataset layouts


def test_layouts(tmp_path):
    g, l = const_img(0.6, 8, 8), const_img(0.3, 8, 8)
    # GOPRO_Large: <scene>/blur + <scene>/sharp
    for scene in ("GOPR0372_07_00", "GOPR0374_11_00"):
        for f in ("000047.png", "000048.png"):
            write_png(str(tmp_path / "gopro" / scene / "blur" / f), l)
            write_png(str(tmp_path / "gopro" / scene / "sharp" / f), g)
        write_png(str(tmp_path / "gopro" / scene / "blur_gamma" / "000047.png"), l)
    p = D.list_pairs("gopro", str(tmp_path / "gopro"))
    assert [x.name for x in p.pairs] == ["GOPR0372_07_00/000047", "GOPR0372_07_00/000048",
                                         "GOPR0374_11_00/000047", "GOPR0374_11_00/000048"]
    assert all("/blur/" in x.lq and "/sharp/" in x.gt for x in p.pairs)
    # Restormer's cropped GoPro / SIDD
    write_png(str(tmp_path / "crops" / "input_crops" / "0_1.png"), l)
    write_png(str(tmp_path / "crops" / "target_crops" / "0_1.png"), g)
    assert len(D.list_pairs("sidd", str(tmp_path / "crops"))) == 1
    # SIDD-Medium: NOISY_SRGB_010.PNG beside GT_SRGB_010.PNG
    for scene in ("0001_001_S6_00100_00060_3200_L", "0002_001_S6_00100_00020_3200_N"):
        write_png(str(tmp_path / "sidd" / "Data" / scene / "NOISY_SRGB_010.PNG"), l)
        write_png(str(tmp_path / "sidd" / "Data" / scene / "GT_SRGB_010.PNG"), g)
    p = D.list_pairs("sidd", str(tmp_path / "sidd"))
    assert len(p) == 2 and p.pairs[0].gt.endswith("GT_SRGB_010.PNG")
    # LOL v1, LOL-v2 (capitalised), LOLBlur (two levels)
    write_png(str(tmp_path / "lol" / "low" / "2.png"), l)
    write_png(str(tmp_path / "lol" / "high" / "2.png"), g)
    assert len(D.list_pairs("lol", str(tmp_path / "lol"))) == 1
    write_png(str(tmp_path / "v2" / "Low" / "low00001.png"), l)
    write_png(str(tmp_path / "v2" / "Normal" / "low00001.png"), g)
    assert len(D.list_pairs("lolv2", str(tmp_path / "v2"))) == 1
    write_png(str(tmp_path / "lb" / "low_blur_noise" / "0012" / "0001.png"), l)
    write_png(str(tmp_path / "lb" / "high_sharp_scaled" / "0012" / "0001.png"), g)
    assert D.list_pairs("lolblur", str(tmp_path / "lb")).pairs[0].name == "0012/0001"
    # RESIDE ITS: several hazy per clear, larger GT centre-cropped
    gt_big = np.random.default_rng(0).random((12, 14, 3))
    write_png(str(tmp_path / "its" / "clear" / "1.png"), gt_big)
    for beta in ("1_0.8", "2_0.9"):
        write_png(str(tmp_path / "its" / "hazy" / f"1_{beta}.png"), const_img(0.7, 8, 10))
    p = D.list_pairs("reside", str(tmp_path / "its"))
    assert len(p) == 2 and all(x.gt.endswith("1.png") for x in p.pairs)
    v = D.make_val_dataset(D.DataConfig(kind="reside", root=str(tmp_path / "its")))
    assert v[0]["gt"].shape == (8, 10, 3)
    np.testing.assert_allclose(v[0]["gt"], np.round(gt_big[2:10, 2:12] * 255) / 255, atol=1e-6)
    # generic paired with explicit folder names
    write_png(str(tmp_path / "pp" / "rainy" / "a.jpg"), l)
    write_png(str(tmp_path / "pp" / "norain" / "a.png"), g)
    assert len(D.list_pairs("paired", str(tmp_path / "pp"), lq_subdir="rainy", gt_subdir="norain")) == 1
    with pytest.raises(D.DataError, match="not a LOL split"):
        D.list_pairs("lol", str(tmp_path / "v2"))


def test_layout_table_and_unknown_kind_agree(tmp_path):
    from train.data.layouts import LAYOUTS
    assert D.KINDS == ("demo", *LAYOUTS)
    for kind in ("imagenet", "demo"):  # the demo data has no folder layout
        with pytest.raises(ValueError, match="has no folder layout") as e:
            D.list_pairs(kind, str(tmp_path))
        assert str(e.value).rsplit("the layouts are ", 1)[1].split(", ") == list(LAYOUTS)
    for kind in LAYOUTS:  # every entry is wired to a lister: an empty folder is unusable data
        with pytest.raises(D.DataError):
            D.list_pairs(kind, str(tmp_path))


def test_luma_matches_pillow_grey(tmp_path):
    from train.data.images import luma
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    rgb[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3],
                  [128, 128, 128], [254, 1, 127]]
    Image.fromarray(rgb).save(tmp_path / "c.png")
    pillow = np.asarray(Image.open(tmp_path / "c.png").convert("L"), np.float32)[..., None]
    ulp = 0.5 + 1e-2  # Pillow rounds to 8 bits (with 16-bit fixed-point weights)
    assert np.abs(luma(rgb / np.float32(255)) * 255 - pillow).max() <= ulp
    assert np.abs(D.load_image(str(tmp_path / "c.png"), 1) * 255 - pillow).max() <= ulp
    # the demo's grey training and validation images ('haze' keeps gt = the clean image)
    cfg = D.DataConfig(kind="demo", degradation="haze", channels=1, patch_size=None, geometric_augs=False,
                       demo_val_size=None)
    greys = {stem: np.asarray(Image.open(f).convert("L"), np.float32)[..., None]
             for f in _demo_files() for stem in [os.path.basename(f).rsplit(".", 1)[0]]}
    val = D.make_val_dataset(cfg)[0]
    assert np.abs(val["gt"] * 255 - greys[val["name"].rsplit("_", 2)[0]]).max() <= ulp
    gt = next(D.make_train_iterator(cfg, batch_size=1, seed=0))["gt"][0]
    assert min(np.abs(gt * 255 - g).max() for g in greys.values()) <= ulp


def test_val_dataset_folder(tmp_path):
    root = make_paired(tmp_path / "val", n=3, h=20, w=24)
    cfg = D.DataConfig(kind="gopro", root=str(tmp_path / "nowhere"), val_root=str(root))
    v = D.make_val_dataset(cfg)
    assert len(v) == 3 and [x["name"] for x in v] == ["img0", "img1", "img2"]
    assert v[1]["lq"].shape == (20, 24, 3) and v[1]["gt"].dtype == np.float32
    v = D.make_val_dataset(dataclasses_replace(cfg, val_patch_size=16))
    assert v[0]["gt"].shape == (16, 16, 3)


# ----------------------------------------------------------------------------- bad data


def bad_dataset(tmp_path, problem):
    root = make_paired(tmp_path / problem, n=3)
    bad = os.path.join(root, "input", "img1.png")
    if problem == "corrupt":
        with open(bad, "wb") as f:
            f.write(b"this is not a png file")
    elif problem == "missing":
        os.remove(os.path.join(root, "target", "img1.png"))
    elif problem == "size":
        write_png(bad, const_img(0.5, 20, 22))
    elif problem == "graymix":
        write_png(bad, const_img(0.5, 20, 24, c=1))
    elif problem == "truncated":  # a valid header, cut-off pixel data: fails only when decoded
        Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(bad)
        data = open(bad, "rb").read()
        with open(bad, "wb") as f:
            f.write(data[: len(data) // 2])
    return str(root), bad


@pytest.mark.parametrize("problem,pattern", [
    ("corrupt", "cannot read image file .*img1.png"),
    ("missing", "missing partner: .*input/img1.png has no ground truth"),
    ("size", "size mismatch: .*img1.png is 22x20 but its ground truth .*img1.png is 24x20"),
    ("graymix", "grayscale/RGB mix: .*input/img1.png is grayscale"),
])
def test_bad_pairs_raise_or_skip(tmp_path, problem, pattern):
    root, _ = bad_dataset(tmp_path, problem)
    cfg = D.DataConfig(kind="paired", root=root, patch_size=8, geometric_augs=False)
    with pytest.raises(D.DataError, match=pattern):
        D.make_train_iterator(cfg, batch_size=2, seed=0)
    with pytest.raises(D.DataError, match=pattern):
        D.make_val_dataset(cfg)
    plist = D.list_pairs("paired", root, skip_bad=True)
    assert len(plist.pairs) == 2 and len(plist.skipped) == 1
    assert "img1" in plist.skipped[0]
    it = D.make_train_iterator(dataclasses_replace(cfg, skip_bad=True), batch_size=4, seed=0)
    ids = set(pair_ids(next(it)) + pair_ids(next(it)))
    assert ids == {0, 2}


def test_truncated_file_fails_on_load_or_is_skipped(tmp_path):
    root, bad = bad_dataset(tmp_path, "truncated")
    cfg = D.DataConfig(kind="paired", root=root, patch_size=8, geometric_augs=False)
    it = D.make_train_iterator(cfg, batch_size=3, seed=0)
    with pytest.raises(Exception, match="corrupt image file .*img1.png"):
        next(it)
    it = D.make_train_iterator(dataclasses_replace(cfg, skip_bad=True), batch_size=3, seed=0)
    for _ in range(3):
        assert set(pair_ids(next(it))) <= {0, 2}


def test_grey_dataset_and_rgb_to_grey(tmp_path):
    root = tmp_path / "g"
    write_png(str(root / "gt" / "a.png"), const_img(0.5, 16, 16, c=1))
    write_png(str(root / "lq" / "a.png"), const_img(0.25, 16, 16, c=1))
    with pytest.raises(D.DataError, match="grayscale image .*channels=1"):
        D.list_pairs("paired", str(root))
    b = next(D.make_train_iterator(D.DataConfig(kind="paired", root=str(root), channels=1, patch_size=8),
                                   batch_size=1, seed=0))
    assert b["gt"].shape == (1, 8, 8, 1)
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[..., 0] = 1.0
    write_png(str(tmp_path / "c.png"), rgb)
    np.testing.assert_allclose(D.load_image(str(tmp_path / "c.png"), 1), 0.299, atol=1e-6)


def test_sixteen_bit_grey(tmp_path):
    arr = (np.arange(16 * 16).reshape(16, 16) * 250).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    got = D.load_image(str(tmp_path / "x.png"), 1)
    np.testing.assert_allclose(got[..., 0], arr / 65535.0, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow on the cut file
def test_sixteen_bit_grey_alpha_tiff_passes_the_header_check(tmp_path):
    """Pillow cannot open a 16-bit grey + alpha TIFF; the header check reads it with tifffile
    (size and grey), so the pair is accepted and loads, and a colour partner is a grey/RGB mix."""
    imagecodecs = pytest.importorskip("imagecodecs")
    rng = np.random.default_rng(0)
    la = rng.integers(0, 65536, (6, 9, 2)).astype(np.uint16)
    for d in ("input", "target"):
        os.makedirs(tmp_path / d)
        (tmp_path / d / "a.tif").write_bytes(
            imagecodecs.tiff_encode(la, photometric="minisblack", extrasample=2))
    pair = L.Pair(str(tmp_path / "input" / "a.tif"), str(tmp_path / "target" / "a.tif"), "a")
    assert L.check_pair(pair, "paired", channels=1) is None
    assert images.read_header(pair.lq) == ((9, 6), "LA")
    np.testing.assert_allclose(D.load_image(pair.lq, 1)[..., 0], la[..., 0] / 65535.0, atol=1e-7)
    Image.fromarray(np.zeros((6, 9, 3), np.uint8)).save(tmp_path / "target" / "b.png")
    mixed = L.Pair(pair.lq, str(tmp_path / "target" / "b.png"), "a")
    assert "grayscale/RGB mix" in L.check_pair(mixed, "paired", channels=1)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00 not really")
    with pytest.raises(D.DataError, match="cannot read image file"):
        images.read_header(str(tmp_path / "bad.tif"))


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        D.DataConfig(kind="imagenet", root="/x")
    with pytest.raises(ValueError, match="needs root"):
        D.DataConfig(kind="gopro")
    with pytest.raises(ValueError, match="augment_mode"):
        D.DataConfig(augment_mode="rot")
    with pytest.raises(ValueError, match="degradation"):
        D.DataConfig(degradation="snow")
    with pytest.raises(ValueError, match="apply to kind 'clean'"):
        D.DataConfig(kind="gopro", root="/x", noise_sigma=15)
    # a folder name for a layout that does not read it is refused, not ignored
    with pytest.raises(ValueError, match="kind 'paired' only"):
        D.DataConfig(kind="gopro", root="/x", lq_subdir="blur")
    D.DataConfig(kind="paired", root="/x", lq_subdir="blur")
    D.DataConfig(kind="gopro", root="/x", val_kind="paired", gt_subdir="sharp")
