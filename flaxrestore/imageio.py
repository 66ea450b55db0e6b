"""Reading and writing images for restoration: PNG, JPEG and TIFF, 8 or 16 bit, grey, RGB or RGBA.

Pixels come out as float32 in [0, 1], HxWxC with C = 1 (grey) or 3 (RGB); an alpha channel is kept
aside (:attr:`Picture.alpha`) so that a model only ever sees colour, and is put back on writing.
Writing keeps the bit depth asked for (the CLI passes the input's). This module owns that contract
(which library handles which file, the [0, 1] scaling and rounding, alpha, EXIF orientation, clear
errors); the file formats themselves are left to maintained libraries:

- Pillow: JPEG, 8-bit PNG and TIFF (palette, CMYK, bilevel, ... converted to RGB(A)) and 16-bit grey
  PNG/TIFF, which it reads and writes exactly.
- imagecodecs' libpng (``png_decode``/``png_encode``): 16-bit PNG with more than one channel
  (grey+alpha, RGB, RGBA; interlaced too), read and written. This module walks the chunk list
  itself for what png_decode does not give: the eXIf chunk, and whether the file is complete.
- tifffile (its LZW/Deflate/PackBits codecs from imagecodecs): 16-bit TIFF with more than one
  channel (RGB, RGBA, grey+alpha; any strip/tile layout and compression), read and written.

Pillow alone is not enough for 16-bit colour: it cannot write it, it reads it as 8 bits per sample
(its RGB/RGBA modes are 8 bit), and it cannot open 16-bit grey+alpha TIFF at all. Other TIFFs stay
with Pillow rather than tifffile because tifffile returns samples as stored, and Pillow converts
what 8-bit TIFFs hold (palette, CMYK, YCbCr, min-is-white, bilevel, premultiplied alpha) to RGB(A).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import struct
import threading
import zlib

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


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


def _exif_orientation(data: bytes | None) -> int:
    """The orientation tag of raw EXIF bytes (a PNG eXIf chunk), 1 when absent or malformed."""
    from PIL import Image

    if not data:
        return 1
    try:
        exif = Image.Exif()
        exif.load(data)
        return int(exif.get(0x0112, 1))
    except Exception:
        return 1


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """Turns stored pixels upright according to the EXIF orientation tag (1..8)."""
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.swapaxes(0, 1), 6: lambda x: np.rot90(x, -1),
           7: lambda x: x[::-1, ::-1].swapaxes(0, 1), 8: lambda x: np.rot90(x, 1)}
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


class _DropInterlaceWarning(logging.Filter):
    """libpng's warning that png_read_image reads an interlaced file without being told to.

    imagecodecs' png_decode calls png_read_image as is, which then turns interlace handling on by
    itself and decodes exactly; the warning would only tell a user about imagecodecs' internals.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Interlace handling should be turned on" not in record.getMessage()


class _Capture(logging.Filter):
    """Keeps the calling thread's records of a logger out of the log and in ``messages``: what
    tifffile logs while parsing a damaged file goes into the error :func:`read_image` raises
    (other reading threads' records pass through to their own captures or the log)."""

    def __init__(self):
        super().__init__()
        self.thread, self.messages = threading.get_ident(), []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.messages.append(record.getMessage())
        return False


@contextlib.contextmanager
def _captured(logger: str):
    log, capture = logging.getLogger(logger), _Capture()
    log.addFilter(capture)
    try:
        yield capture.messages
    finally:
        log.removeFilter(capture)


def _read_png16_colour(path: str) -> tuple[np.ndarray, int] | None:
    """uint16 (H, W, C) and EXIF orientation of a 16-bit PNG with C = 2, 3 or 4, else None."""
    import imagecodecs

    with open(path, "rb") as f:
        # the signature, then IHDR: length 13, type, width and height (4 bytes each), bit depth
        # and colour type; anything else goes to Pillow (grey, palette, 8 bits or fewer, ...)
        head = f.read(33)
        if (len(head) < 33 or head[8:16] != b"\0\0\0\x0dIHDR" or head[24] != 16
                or head[25] not in (2, 4, 6)):
            return None
        data = head + f.read()
    # the chunk list: libpng stops after the pixel data, and so would see neither a cut-off end
    # nor an eXIf chunk after IDAT (where PNG allows it)
    exif, pos = None, 8
    while True:
        if pos + 12 > len(data):
            raise ImageReadError(f"{path}: truncated PNG (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise ImageReadError(f"{path}: truncated PNG ({kind!r} chunk cut off)")
        if kind == b"IEND":
            break
        # the first eXIf; a damaged one (CRC) is read as no EXIF, as malformed EXIF is
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if kind == b"eXIf" and exif is None and zlib.crc32(data[pos + 4: end - 4]) == crc:
            exif = data[pos + 8: end - 4]
        pos = end
    log, drop = logging.getLogger("imagecodecs"), _DropInterlaceWarning()
    log.addFilter(drop)
    try:
        a = imagecodecs.png_decode(data)
    finally:
        log.removeFilter(drop)
    if head[25] == 2:  # libpng makes a tRNS colour key of an RGB file into alpha: ignored, as
        a = a[..., :3]  # it is for 8-bit RGB (Pillow) and was before
    return a, _exif_orientation(exif)


def _read_tiff16_colour(path: str) -> tuple[np.ndarray, int] | None:
    """uint16 (H, W, C) and orientation of the first page of a 16-bit RGB(A) or grey+alpha TIFF.

    None for any other TIFF (8 bit, single channel, float, CMYK, ...), which Pillow reads.
    Alpha comes back unassociated (straight), as Pillow gives it for 8 bits.
    """
    import tifffile
    from tifffile import EXTRASAMPLE, PHOTOMETRIC, SAMPLEFORMAT

    with tifffile.TiffFile(path) as tif:
        try:
            page = tif.pages.first
        except IndexError:  # no image in it: Pillow says so
            return None
        if (page.bitspersample != 16 or page.samplesperpixel == 1
                or page.sampleformat != SAMPLEFORMAT.UINT
                or page.photometric not in (PHOTOMETRIC.RGB, PHOTOMETRIC.MINISBLACK)):
            return None
        if page.axes not in ("YXS", "SYX"):
            raise ImageReadError(f"{path}: unsupported TIFF layout (axes {page.axes})")
        a = page.asarray()
        if page.axes == "SYX":  # planar configuration 2: one plane per sample
            a = np.moveaxis(a, 0, -1)
        orientation = page.tags.valueof(274, 1)
        extra = page.extrasamples[0] if page.extrasamples else EXTRASAMPLE.UNSPECIFIED
    colour = 3 if page.photometric == PHOTOMETRIC.RGB else 1
    if a.shape[-1] < colour:
        raise ImageReadError(f"{path}: RGB TIFF with {a.shape[-1]} samples per pixel")
    if a.shape[-1] == colour or extra not in (EXTRASAMPLE.ASSOCALPHA, EXTRASAMPLE.UNASSALPHA):
        return np.ascontiguousarray(a[..., :colour]), orientation
    a = a[..., : colour + 1].astype(np.uint16)
    if extra == EXTRASAMPLE.ASSOCALPHA:  # colour stored multiplied by alpha
        alpha = a[..., -1:].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            straight = np.where(alpha > 0, a[..., :-1] * 65535.0 / alpha, 0.0)
        a[..., :-1] = np.rint(np.clip(straight, 0, 65535))
    return a, orientation


def _read_with_pillow(path: str) -> tuple[np.ndarray, int, str, int]:
    """Pixels, bit depth, mode (L, LA, RGB or RGBA) and orientation of all but 16-bit colour."""
    from PIL import Image

    with Image.open(path) as img:
        mode = img.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            arr, depth, mode = np.asarray(img).astype(np.uint16), 16, "L"
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
        return arr, depth, mode, _orientation(img)


def read_image(path: str | os.PathLike) -> Picture:
    """Reads a PNG/JPEG/TIFF into a :class:`Picture` (float32 [0, 1], alpha kept aside).

    Raises :class:`ImageReadError` (or FileNotFoundError) with the reason for anything unreadable.
    """
    from PIL import UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path}")
    notes: list[str] = []
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
        sixteen_colour = None
        if magic == _PNG_SIGNATURE:
            sixteen_colour = _read_png16_colour(path)
        elif magic[:4] in _TIFF_MAGIC:
            with _captured("tifffile") as notes:
                sixteen_colour = _read_tiff16_colour(path)
        if sixteen_colour is not None:
            (arr, orientation), depth = sixteen_colour, 16
            mode = _MODES[arr.shape[-1]]
        else:
            arr, depth, mode, orientation = _read_with_pillow(path)
    except ImageReadError:
        raise
    # ValueError: tifffile's TiffFileError and numpy; RuntimeError: imagecodecs' PngError and others
    except (UnidentifiedImageError, OSError, SyntaxError, struct.error, zlib.error, EOFError,
            ValueError, RuntimeError) as e:
        said = f"; tifffile: {'; '.join(notes)}" if notes else ""
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e}){said}") from None
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


def _write_png16(path: str, q: np.ndarray) -> None:
    """A 16-bit PNG (libpng) of a uint16 (H, W, C) array, C = 2 grey+alpha, 3 RGB, 4 RGBA.

    png_encode takes native-order uint16 (C-contiguous) and stores it big-endian, as PNG does.
    libpng's adaptive per-row filters with zlib's RLE strategy: on 16-bit continuous tone (what a
    model's output quantizes to; the low byte is noise to deflate's string matching) that is about
    3x faster than the default strategy and a few percent smaller (zlib level hardly matters with
    it); only 8-bit data scaled to 16 bits compresses worse (about 1.5x).
    """
    import imagecodecs

    data = imagecodecs.png_encode(np.ascontiguousarray(q, np.uint16),
                                  strategy=imagecodecs.PNG.STRATEGY.RLE)
    with open(path, "wb") as f:
        f.write(data)


def _write_tiff16(path: str, q: np.ndarray) -> None:
    """An uncompressed 16-bit TIFF (tifffile) of a uint16 (H, W, C) array, C = 3 RGB, 4 RGBA."""
    import tifffile

    tifffile.imwrite(path, q, photometric="rgb", metadata=None,
                     extrasamples=("unassalpha",) if q.shape[-1] == 4 else None)


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
        if ext == ".png":
            _write_png16(path, q)
        else:
            if c == 2:  # Pillow, and so many tools built on it, cannot open 16-bit grey+alpha TIFF
                q = q[..., [0, 0, 0, 1]]
            _write_tiff16(path, q)
        return path
    if bit_depth == 16:  # grey: Pillow handles I;16 for PNG and TIFF
        Image.fromarray(q[..., 0]).save(path)
        return path
    mode = _MODES[c]
    img = Image.fromarray(q[..., 0] if c == 1 else q)
    if img.mode != mode:
        img = img.convert(mode)
    # JPEG: no chroma subsampling (4:4:4), a restored image should not lose colour detail
    img.save(path, **({"quality": quality, "subsampling": 0} if jpeg else {}))
    return path
