"""Image files for training: decoding to float32, header checks, grey conversion, and ``DataError``.

Files are 8- or 16-bit PNG/JPEG/BMP/TIFF/WebP, decoded by ``flaxrestore.imageio.read_image`` to
float32 in [0, 1], (H, W, C). With ``channels=1`` colour files are converted to grey with ``luma``
(ITU-R 601), like Restormer's grey data.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from flaxrestore.imageio import read_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")

# ITU-R BT.601 luma weights, what cv2.IMREAD_GRAYSCALE and PIL's convert('L') use
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class DataError(ValueError):
    """Unusable training data; the message names the file(s)."""


def luma(img: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (..., 1) grey, float32."""
    return (img @ _LUMA)[..., None]


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def read_header(path: str) -> tuple[tuple[int, int], str]:
    """(width, height) and mode from the file header; DataError if it is not an image.

    Pillow reads the header; a TIFF it cannot open (16-bit grey + alpha, which ``load_image``
    decodes through tifffile) is read by tifffile."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except FileNotFoundError:
        raise DataError(f"missing image file {path}") from None
    except Exception as e:  # PIL.UnidentifiedImageError, OSError, SyntaxError, ...
        header = _tiff_header(path)
        if header is None:
            raise DataError(f"cannot read image file {path}: {e}") from None
        return header


def _tiff_header(path: str) -> tuple[tuple[int, int], str] | None:
    """(width, height) and a Pillow-style mode of a TIFF's first page, or None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            size = (int(page.imagewidth), int(page.imagelength))
            grey = page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK,
                                        tifffile.PHOTOMETRIC.MINISWHITE)
            alpha = bool(page.extrasamples)
    except Exception:  # not a TIFF, or not one tifffile reads either
        return None
    return size, ("LA" if alpha else "L") if grey else ("RGBA" if alpha else "RGB")


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
        arr = luma(arr)
    return np.ascontiguousarray(arr, dtype=np.float32)
