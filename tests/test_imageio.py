"""flaxrestore.imageio: 8/16-bit grey/RGB/RGBA PNG, JPEG and TIFF, alpha kept aside, bad files.

16-bit colour files are produced here by encoders written in this test (every PNG filter type;
a deflate + horizontal-predictor TIFF), independent of the writer under test.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flaxrestore import imageio

RNG = np.random.default_rng(0)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_all_filters(path, a):
    """A 16-bit PNG whose rows cycle through filter types 0..4 (None, Sub, Up, Average, Paeth)."""
    h, w, c = a.shape
    bpp = 2 * c
    rows = a.astype(">u2").reshape(h, w * c).view(np.uint8).astype(np.int32)
    out = []
    for i in range(h):
        x = rows[i]
        up = rows[i - 1] if i else np.zeros_like(x)
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        f = i % 5
        if f == 0:
            pred = 0
        elif f == 1:
            pred = left
        elif f == 2:
            pred = up
        elif f == 3:
            pred = (left + up) // 2
        else:
            pa, pb, pc = np.abs(up - upleft), np.abs(left - upleft), np.abs(left + up - 2 * upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        out.append(bytes([f]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    ct = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ct, 0, 0, 0))
                 + _chunk(b"IDAT", zlib.compress(b"".join(out))) + _chunk(b"IEND", b""))


def tiff16_deflate_predictor(path, a):
    """A big-endian 16-bit RGB(A) TIFF, deflate-compressed with the horizontal predictor."""
    h, w, c = a.shape
    d = a.astype(np.int64)
    d[:, 1:] = d[:, 1:] - d[:, :-1]
    data = zlib.compress((d % 65536).astype(">u2").tobytes())
    bps = struct.pack(">" + "H" * c, *([16] * c))
    data_off = 8 + len(bps)
    ifd_off = data_off + len(data) + (data_off + len(data)) % 2
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, 8), (259, 3, 1, 8), (262, 3, 1, 2),
               (273, 4, 1, data_off), (277, 3, 1, c), (278, 4, 1, h), (279, 4, 1, len(data)),
               (284, 3, 1, 1), (317, 3, 1, 2)] + ([(338, 3, 1, 2)] if c == 4 else [])
    out = bytearray(b"MM" + struct.pack(">HI", 42, ifd_off)) + bps + data
    out += b"\0" * (ifd_off - len(out))
    out += struct.pack(">H", len(entries))
    for tag, kind, count, value in entries:
        if kind == 3 and count == 1:
            out += struct.pack(">HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack(">HHII", tag, kind, count, value)
    with open(path, "wb") as fh:
        fh.write(bytes(out + struct.pack(">I", 0)))


def u16(shape):
    a = RNG.integers(0, 65536, shape).astype(np.uint16)
    a.flat[0] = 257  # a value whose low byte differs from its high byte's 8-bit reduction
    return a


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_png_every_filter_exact(tmp_path, channels):
    a = u16((9, 13, channels))  # odd sizes
    path = str(tmp_path / "x.png")
    png16_all_filters(path, a)
    assert Image.open(path).mode in ("RGB", "RGBA")  # Pillow alone would give 8 bits
    pic = imageio.read_image(path)
    assert pic.bit_depth == 16 and pic.pixels.shape == (9, 13, 3)
    np.testing.assert_array_equal(np.rint(pic.pixels * 65535).astype(np.uint16), a[..., :3])
    if channels == 4:
        np.testing.assert_array_equal(np.rint(pic.alpha * 65535).astype(np.uint16), a[..., 3])
    else:
        assert pic.alpha is None


def test_16bit_grey_alpha_png(tmp_path):
    a = u16((7, 5, 2))
    path = str(tmp_path / "la.png")
    png16_all_filters(path, a)
    pic = imageio.read_image(path)
    assert pic.bit_depth == 16 and pic.pixels.shape == (7, 5, 1)
    np.testing.assert_array_equal(np.rint(pic.pixels[..., 0] * 65535).astype(np.uint16), a[..., 0])
    np.testing.assert_array_equal(np.rint(pic.alpha * 65535).astype(np.uint16), a[..., 1])


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_tiff_compressed_exact(tmp_path, channels):
    a = u16((6, 11, channels))
    path = str(tmp_path / "x.tif")
    tiff16_deflate_predictor(path, a)
    pic = imageio.read_image(path)
    assert pic.bit_depth == 16
    got = np.rint(pic.pixels * 65535).astype(np.uint16)
    np.testing.assert_array_equal(got, a[..., :3])
    if channels == 4:
        np.testing.assert_array_equal(np.rint(pic.alpha * 65535).astype(np.uint16), a[..., 3])


@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff"])
@pytest.mark.parametrize("channels,alpha", [(3, False), (3, True), (1, False), (1, True)])
@pytest.mark.parametrize("depth", [8, 16])
def test_write_read_round_trip(tmp_path, ext, channels, alpha, depth):
    top = 2 ** depth - 1
    q = RNG.integers(0, top + 1, (5, 7, channels + alpha))
    x = (q / top).astype(np.float32)
    path = str(tmp_path / f"x{ext}")
    imageio.write_image(path, x[..., :channels], x[..., channels] if alpha else None, depth)
    pic = imageio.read_image(path)
    assert pic.bit_depth == depth
    if depth == 16 and channels == 1 and alpha and ext != ".png":  # stored as RGBA
        assert pic.pixels.shape == (5, 7, 3)
        pic.pixels = pic.pixels[..., :1]
    assert pic.pixels.shape == (5, 7, channels)
    np.testing.assert_array_equal(np.rint(pic.pixels * top), q[..., :channels])
    if alpha:
        np.testing.assert_array_equal(np.rint(pic.alpha * top), q[..., channels])
    else:
        assert pic.alpha is None


def test_16bit_grey_read_by_pillow_writer(tmp_path):
    a = u16((4, 6))
    path = str(tmp_path / "g16.png")
    Image.fromarray(a).save(path)
    pic = imageio.read_image(path)
    assert pic.bit_depth == 16 and pic.is_gray
    np.testing.assert_array_equal(np.rint(pic.pixels[..., 0] * 65535).astype(np.uint16), a)


def test_jpeg_rgb_and_grey(tmp_path):
    x = np.full((8, 9, 3), 0.5, np.float32)
    x[..., 0] = 0.2
    imageio.write_image(tmp_path / "c.jpg", x, alpha=np.ones((8, 9)), bit_depth=16)  # JPEG: 8 bit, no alpha
    pic = imageio.read_image(tmp_path / "c.jpg")
    assert pic.bit_depth == 8 and pic.alpha is None and pic.pixels.shape == (8, 9, 3)
    assert np.abs(pic.pixels - x).max() < 3 / 255
    imageio.write_image(tmp_path / "g.jpeg", x[..., :1])
    assert imageio.read_image(tmp_path / "g.jpeg").pixels.shape == (8, 9, 1)


def test_palette_with_transparency_becomes_rgba(tmp_path):
    img = Image.new("P", (4, 3))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    pic = imageio.read_image(tmp_path / "p.png")
    assert pic.pixels.shape == (3, 4, 3) and pic.alpha is not None
    assert pic.alpha[1, 1] == 1.0 and pic.alpha[0, 0] == 0.0
    np.testing.assert_array_equal(pic.pixels[1, 1], [0, 1, 0])


def test_exif_orientation_applied(tmp_path):
    a = RNG.integers(0, 256, (4, 6, 3)).astype(np.uint8)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    img.save(tmp_path / "o.png", exif=exif.tobytes())
    pic = imageio.read_image(tmp_path / "o.png")
    np.testing.assert_array_equal(np.rint(pic.pixels * 255).astype(np.uint8), np.rot90(a, -1))


def test_corrupt_files_raise_clear_errors(tmp_path):
    good = tmp_path / "good.png"
    imageio.write_image(good, RNG.random((32, 32, 3)).astype(np.float32))
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "empty.tif").write_bytes(b"")
    for name in ("truncated.png", "garbage.png", "empty.tif"):
        with pytest.raises(imageio.ImageReadError, match=name):
            imageio.read_image(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        imageio.read_image(tmp_path / "missing.png")


def test_quantize_rounds_and_clips():
    np.testing.assert_array_equal(imageio.quantize(np.array([-0.1, 0.5, 1.2, np.nan]), 8),
                                  [0, 128, 255, 0])
    assert imageio.quantize(np.array([1.0]), 16)[0] == 65535
