"""Reading and writing images for restoration: PNG, JPEG and TIFF, 8 or 16 bit, grey, RGB or RGBA.

Pixels come out as float32 in [0, 1], HxWxC with C = 1 (grey) or 3 (RGB); an alpha channel is kept
aside (:attr:`Picture.alpha`) so that a model only ever sees colour, and is put back on writing.
Writing keeps the bit depth asked for (the CLI passes the input's).

Pillow reads 16-bit grey natively but reduces 16-bit RGB/RGBA PNG and TIFF to 8 bits. For those
the file is decoded twice through Pillow's own decoder (so every PNG filter, TIFF compression and
predictor is handled by Pillow/libtiff), once unpacking the high byte of each sample and once the
low byte, and the two are recombined exactly. 16-bit colour files are written by a small encoder
here (PNG: zlib + filter 0; TIFF: baseline, uncompressed), which Pillow cannot do.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys
import zlib

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class ImageReadError(ValueError):
    """A file that cannot be read as an image, with the reason."""


@dataclasses.dataclass
class Picture:
    """An image as a model sees it, plus what is needed to write the result the same way."""

    pixels: np.ndarray  # float32 (H, W, C), C in {1, 3}, values in [0, 1]
    alpha: np.ndarray | None = None  # float32 (H, W) in [0, 1], or None
    bit_depth: int = 8  # 8 or 16: the depth of the file it came from
    path: str | None = None

    @property
    def is_gray(self) -> bool:
        return self.pixels.shape[-1] == 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape[:2]


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in EXTENSIONS


# ----------------------------------------------------------------------------------------- read


def _orientation(img) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF is not worth failing a restore over
        return 1


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """Turns stored pixels upright according to the EXIF orientation tag (1..8)."""
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.swapaxes(0, 1), 6: lambda x: np.rot90(x, -1),
           7: lambda x: x[::-1, ::-1].swapaxes(0, 1), 8: lambda x: np.rot90(x, 1)}
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


def _swap_rawmode(rawmode: str) -> str:
    """The rawmode that unpacks the *other* byte of each 16-bit sample than ``rawmode`` does."""
    native_little = sys.byteorder == "little"
    for tail, other in ((";16B", ";16L"), (";16L", ";16B"),
                        (";16N", ";16B" if native_little else ";16L")):
        if rawmode.endswith(tail):
            return rawmode[: -len(tail)] + other
    raise ImageReadError(f"unsupported 16-bit sample layout {rawmode!r}")


def _decode_with_rawmode(path: str, rawmode: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        tile = img.tile[0]
        args = tile.args
        args = (rawmode,) + tuple(args[1:]) if isinstance(args, tuple) else rawmode
        img.tile = [tile._replace(args=args)]
        img.load()
        return np.asarray(img).copy()


def _rawmode_of(tile) -> str:
    return tile.args[0] if isinstance(tile.args, tuple) else tile.args


def _read_16bit_colour(path: str, img) -> np.ndarray:
    """uint16 (H, W, C) of a 16-bit RGB/RGBA/grey+alpha file that Pillow would cut to 8 bits."""
    if len(img.tile) != 1:
        raise ImageReadError(f"{path}: unsupported 16-bit layout ({len(img.tile)} tiles/strips "
                             "with different decoders); re-save it as PNG")
    rawmode = _rawmode_of(img.tile[0])
    if rawmode == "LA;16B":  # PNG grey+alpha: four bytes per pixel, read them as 8-bit RGBA
        b = _decode_with_rawmode(path, "RGBA").astype(np.uint16)
        return np.stack([b[..., 0] * 256 + b[..., 1], b[..., 2] * 256 + b[..., 3]], axis=-1)
    high = _decode_with_rawmode(path, rawmode).astype(np.uint16)
    low = _decode_with_rawmode(path, _swap_rawmode(rawmode)).astype(np.uint16)
    return high * 256 + low


def _sixteen_bit_colour(img) -> bool:
    """True for files whose samples are 16 bit but that Pillow opens in an 8-bit colour mode."""
    if img.mode not in ("RGB", "RGBA", "LA") or not img.tile:
        return False
    rawmode = _rawmode_of(img.tile[0])
    return isinstance(rawmode, str) and ";16" in rawmode


def read_image(path: str | os.PathLike) -> Picture:
    """Reads a PNG/JPEG/TIFF into a :class:`Picture` (float32 [0, 1], alpha kept aside).

    Raises :class:`ImageReadError` (or FileNotFoundError) with the reason for anything unreadable.
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as img:
            sixteen_colour = _sixteen_bit_colour(img)  # before anything loads (and drops .tile)
            mode = img.mode
            if sixteen_colour:
                arr, depth = _read_16bit_colour(path, img), 16
                mode = {2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
            elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                arr, depth = np.asarray(img).astype(np.uint16), 16
                mode = "L"
            elif mode == "I":  # 32-bit int container, used by some decoders for 16-bit grey
                arr = np.asarray(img)
                if arr.min() < 0 or arr.max() > 65535:
                    raise ImageReadError(f"{path}: 32-bit integer images are not supported")
                arr, depth, mode = arr.astype(np.uint16), 16, "L"
            elif mode in ("L", "RGB", "RGBA", "LA"):
                arr, depth = np.asarray(img), 8
            elif mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
                has_alpha = mode in ("PA", "RGBa", "La") or "transparency" in img.info
                if mode == "1":
                    target = "L"
                else:
                    target = "RGBA" if has_alpha else "RGB"
                arr, depth, mode = np.asarray(img.convert(target)), 8, target
            else:
                raise ImageReadError(f"{path}: unsupported pixel mode {img.mode!r} "
                                     "(expected 8/16-bit grey, RGB or RGBA)")
            orientation = _orientation(img)
    except (UnidentifiedImageError, OSError, SyntaxError, struct.error, zlib.error, EOFError) as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    arr = _apply_orientation(arr, orientation)
    scale = 65535.0 if depth == 16 else 255.0
    x = arr.astype(np.float32) / np.float32(scale)
    alpha = None
    if mode in ("RGBA", "LA"):
        x, alpha = x[..., :-1], x[..., -1]
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ImageReadError(f"{path}: empty image")
    return Picture(np.ascontiguousarray(x), None if alpha is None else np.ascontiguousarray(alpha),
                   depth, path)


# ---------------------------------------------------------------------------------------- write


def quantize(x: np.ndarray, bit_depth: int) -> np.ndarray:
    """[0, 1] floats to uint8/uint16 with clipping and rounding to nearest."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    top = 255.0 if bit_depth == 8 else 65535.0
    q = np.rint(np.clip(np.nan_to_num(np.asarray(x, np.float32), nan=0.0), 0.0, 1.0) * top)
    return q.astype(np.uint8 if bit_depth == 8 else np.uint16)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_png16(path: str, a: np.ndarray) -> None:
    """A 16-bit PNG of a uint16 (H, W, C) array, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA."""
    h, w, c = a.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = a.astype(">u2").reshape(h, w * c).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1)  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + _png_chunk(b"IEND", b""))


def write_tiff16(path: str, a: np.ndarray) -> None:
    """A baseline little-endian uncompressed 16-bit TIFF of a uint16 (H, W, C) array."""
    h, w, c = a.shape
    data = np.ascontiguousarray(a.astype("<u2")).tobytes()
    bps_offset = 8
    bps = struct.pack("<" + "H" * c, *([16] * c)) if c > 2 else b""
    data_offset = bps_offset + len(bps)
    ifd_offset = data_offset + len(data)
    ifd_offset += ifd_offset % 2
    short, long_ = 3, 4
    entries = [(256, long_, 1, w), (257, long_, 1, h),
               (258, short, c, bps_offset if c > 2 else None),
               (259, short, 1, 1),  # no compression
               (262, short, 1, 2 if c >= 3 else 1),  # RGB or black-is-zero
               (273, long_, 1, data_offset), (277, short, 1, c), (278, long_, 1, h),
               (279, long_, 1, len(data)), (284, short, 1, 1)]
    if c in (2, 4):
        entries.append((338, short, 1, 2))  # extra sample: unassociated alpha
    out = bytearray(b"II" + struct.pack("<HI", 42, ifd_offset)) + bps + data
    out += b"\0" * (ifd_offset - len(out))
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        if tag == 258 and c <= 2:  # up to two shorts fit in the entry itself
            out += struct.pack("<HHI", tag, kind, count) + struct.pack("<" + "H" * c, *([16] * c)).ljust(4, b"\0")
        elif kind == short and count == 1:
            out += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, kind, count, value)
    out += struct.pack("<I", 0)
    with open(path, "wb") as f:
        f.write(bytes(out))


def write_image(path: str | os.PathLike, pixels: np.ndarray, alpha: np.ndarray | None = None,
                bit_depth: int = 8, *, quality: int = 95) -> str:
    """Writes float [0, 1] pixels (H, W, 1|3), with an optional alpha, as PNG/JPEG/TIFF by extension.

    JPEG is 8 bit only and has no alpha (both are dropped with no error: that is the format).
    16-bit grey with alpha as TIFF is stored as RGBA (grey replicated), which readers understand.
    """
    from PIL import Image

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"cannot write {path}: unknown image extension (use one of {EXTENSIONS})")
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
        raise ValueError(f"expected (H, W, 1|3) pixels, got shape {pixels.shape}")
    jpeg = ext in (".jpg", ".jpeg")
    if jpeg:
        bit_depth, alpha = 8, None
    planes = pixels if alpha is None else np.concatenate([pixels, np.asarray(alpha)[..., None]], -1)
    q = quantize(planes, bit_depth)
    c = q.shape[-1]
    if bit_depth == 16 and c > 1:
        if ext != ".png" and c == 2:  # Pillow cannot read 16-bit grey+alpha TIFF: store as RGBA
            q = q[..., [0, 0, 0, 1]]
        (write_png16 if ext == ".png" else write_tiff16)(path, q)
        return path
    if bit_depth == 16:  # grey: Pillow handles I;16 for PNG and TIFF
        Image.fromarray(q[..., 0]).save(path)
        return path
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c]
    img = Image.fromarray(q[..., 0] if c == 1 else q)
    if img.mode != mode:
        img = img.convert(mode)
    # JPEG: no chroma subsampling (4:4:4), a restored image should not lose colour detail
    img.save(path, **({"quality": quality, "subsampling": 0} if jpeg else {}))
    return path
