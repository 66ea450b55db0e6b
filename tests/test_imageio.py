"""flaxrestore.imageio: 8/16-bit grey/RGB/RGBA PNG, JPEG and TIFF, alpha kept aside, bad files.

The module reads and writes 16-bit colour with libpng (imagecodecs) for PNG and tifffile for TIFF.
The files it reads here come from elsewhere too: encoders written in this test (every PNG filter
type, plain and Adam7-interlaced; a deflate + horizontal-predictor TIFF) and libtiff; the PNGs it
writes are read back by a decoder written in this test, the TIFFs by libtiff. Every 16-bit
comparison is of exact uint16 values, so a swapped byte order, samples cut to 8 bits, a dropped
alpha or reordered channels all fail.
"""

import logging
import struct
import zlib

import imagecodecs
import numpy as np
import tifffile
import pytest
from PIL import Image

from flaxrestore import imageio

RNG = np.random.default_rng(0)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _filtered_rows(a):
    """The rows of a (sub)image as PNG stores them, cycling through filters 0..4 (None, Sub, Up,
    Average, Paeth), each row prefixed by its filter type."""
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
    return b"".join(out)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]  # the passes of an interlaced PNG: first column and row, column and row step


def png16_all_filters(path, a, interlace=False):
    """A 16-bit PNG whose rows cycle through every filter type; interlaced: each Adam7 pass is a
    small image of its own (filters start afresh, empty passes are left out)."""
    h, w, c = a.shape
    if interlace:
        passes = [a[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
        raw = b"".join(_filtered_rows(p) for p in passes if p.size)
    else:
        raw = _filtered_rows(a)
    ct = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n"
                 + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ct, 0, 0, int(interlace)))
                 + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def png16_reference_decode(data):
    """uint16 (H, W, C) of a non-interlaced 16-bit PNG: chunks, inflate, undo each row's filter."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        assert struct.unpack_from(">I", data, pos + 8 + n)[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, ct, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 16 and interlace == 0
    c = {0: 1, 4: 2, 2: 3, 6: 4}[ct]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    bpp, stride = 2 * c, 2 * c * w
    assert len(raw) == h * (stride + 1)
    prev, rows = [0] * stride, []
    for i in range(h):
        f, x = raw[i * (stride + 1)], list(raw[i * (stride + 1) + 1: (i + 1) * (stride + 1)])
        for j in range(stride):
            left = x[j - bpp] if j >= bpp else 0
            up, upleft = prev[j], prev[j - bpp] if j >= bpp else 0
            if f == 1:
                x[j] += left
            elif f == 2:
                x[j] += up
            elif f == 3:
                x[j] += (left + up) // 2
            elif f == 4:
                p = left + up - upleft
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                x[j] += left if pa <= pb and pa <= pc else up if pb <= pc else upleft
            else:
                assert f == 0
            x[j] %= 256
        rows.append(x)
        prev = x
    return np.array(rows, np.uint8).view(">u2").astype(np.uint16).reshape(h, w, c)


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
    a.flat[0] = 0x0102  # changed by a byte swap (0x0201) and by a cut to 8 bits (0x0101)
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



def as_u16(x):
    return np.rint(x * 65535).astype(np.uint16)


def test_reference_png_decoder_undoes_every_filter(tmp_path):
    a = u16((11, 7, 4))
    png16_all_filters(tmp_path / "f.png", a)
    np.testing.assert_array_equal(png16_reference_decode((tmp_path / "f.png").read_bytes()), a)


@pytest.mark.parametrize("channels,alpha", [(3, False), (3, True), (1, True)])
def test_16bit_colour_png_written_is_read_exactly_by_reference_decoder(tmp_path, channels, alpha):
    a = u16((9, 13, channels + alpha))
    path = tmp_path / "w.png"
    imageio.write_image(path, a[..., :channels] / 65535, a[..., -1] / 65535 if alpha else None, 16)
    got = png16_reference_decode(path.read_bytes())
    assert got.shape == a.shape
    np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("channels,alpha", [(3, False), (3, True), (1, True)])
def test_16bit_colour_tiff_written_is_read_exactly_by_libtiff(tmp_path, channels, alpha):
    a = u16((9, 13, channels + alpha))
    path = tmp_path / "w.tif"
    imageio.write_image(path, a[..., :channels] / 65535, a[..., -1] / 65535 if alpha else None, 16)
    want = a[..., [0, 0, 0, 1]] if channels == 1 else a  # 16-bit grey+alpha TIFF is stored as RGBA
    got = imagecodecs.tiff_decode(path.read_bytes())
    assert got.dtype == np.uint16 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    with tifffile.TiffFile(path) as tif:  # alpha marked straight (not premultiplied, not unknown)
        assert tif.pages[0].extrasamples == ((tifffile.EXTRASAMPLE.UNASSALPHA,) if alpha else ())


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16bit_png_from_libpng_exact(tmp_path, channels):
    a = u16((33, 21, channels))
    path = tmp_path / "l.png"
    path.write_bytes(imagecodecs.png_encode(a))  # libpng picks a filter per row
    pic = imageio.read_image(path)
    colour = 1 if channels == 2 else 3
    assert pic.bit_depth == 16 and pic.pixels.shape == (33, 21, colour)
    np.testing.assert_array_equal(as_u16(pic.pixels), a[..., :colour])
    if channels == 3:
        assert pic.alpha is None
    else:
        np.testing.assert_array_equal(as_u16(pic.alpha), a[..., -1])


@pytest.mark.parametrize("shape", [(11, 9), (3, 2)])  # 3x2: some Adam7 passes are empty
def test_16bit_interlaced_png_exact(tmp_path, caplog, shape):
    a = u16(shape + (4,))
    png16_all_filters(tmp_path / "i.png", a, interlace=True)
    pic = imageio.read_image(tmp_path / "i.png")
    np.testing.assert_array_equal(as_u16(pic.pixels), a[..., :3])
    np.testing.assert_array_equal(as_u16(pic.alpha), a[..., 3])
    assert not caplog.records  # libpng's note on how imagecodecs calls it is not shown


def test_16bit_rgb_png_colour_key_is_ignored_as_for_8bit(tmp_path):
    a = u16((4, 5, 3))
    path = tmp_path / "k.png"
    png16_all_filters(path, a)
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4
    path.write_bytes(data[:at] + _chunk(b"tRNS", a[0, 0].astype(">u2").tobytes()) + data[at:])
    pic = imageio.read_image(path)  # libpng alone would add an alpha channel, 0 at a[0, 0]
    assert pic.alpha is None
    np.testing.assert_array_equal(as_u16(pic.pixels), a)


LIBTIFF_LAYOUTS = {  # imagecodecs.tiff_encode (libtiff) arguments
    "lzw": dict(compression="lzw"),
    "lzw-predictor-bigendian-strips": dict(compression="lzw", predictor=True, byteorder=">",
                                           rowsperstrip=5),
    "lzw-planar": dict(compression="lzw", planarconfig="separate"),
    "packbits": dict(compression="packbits"),
    "deflate-tiled": dict(compression="deflate", tile=(16, 16)),
    "uncompressed-strips": dict(rowsperstrip=3),
}


@pytest.mark.parametrize("layout", LIBTIFF_LAYOUTS)
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_tiff_from_libtiff_exact(tmp_path, layout, channels):
    kwargs = LIBTIFF_LAYOUTS[layout]
    a = u16((37, 29, channels))  # not a multiple of the strip or tile size
    planar = kwargs.get("planarconfig") == "separate"
    path = tmp_path / "l.tif"
    path.write_bytes(imagecodecs.tiff_encode(np.moveaxis(a, -1, 0) if planar else a,
                                             photometric="rgb", **kwargs))
    with tifffile.TiffFile(path) as tif:  # the file is what the test says it is
        page = tif.pages[0]
        assert page.compression.name.lower().endswith(kwargs.get("compression", "none"))
        assert page.is_tiled == ("tile" in kwargs) and (page.planarconfig == 2) == planar
        if "tile" in kwargs or "rowsperstrip" in kwargs:
            assert len(page.dataoffsets) > (channels if planar else 1)
    pic = imageio.read_image(path)
    assert pic.bit_depth == 16 and pic.pixels.shape == (37, 29, 3)
    np.testing.assert_array_equal(as_u16(pic.pixels), a[..., :3])
    if channels == 4:
        np.testing.assert_array_equal(as_u16(pic.alpha), a[..., 3])
    else:
        assert pic.alpha is None


def test_16bit_grey_alpha_tiff_from_libtiff(tmp_path):
    a = u16((7, 5, 2))
    path = tmp_path / "la.tif"
    path.write_bytes(imagecodecs.tiff_encode(a, photometric="minisblack", extrasample=2))
    pic = imageio.read_image(path)  # Pillow cannot open this file at all
    assert pic.bit_depth == 16 and pic.pixels.shape == (7, 5, 1)
    np.testing.assert_array_equal(as_u16(pic.pixels[..., 0]), a[..., 0])
    np.testing.assert_array_equal(as_u16(pic.alpha), a[..., 1])


def test_16bit_tiff_premultiplied_alpha_comes_back_straight(tmp_path):
    colour = u16((6, 8, 3))
    alpha = RNG.integers(32768, 65536, (6, 8)).astype(np.uint16)
    alpha[0, 0] = 0
    stored = np.rint(colour * (alpha[..., None] / 65535.0)).astype(np.uint16)
    path = tmp_path / "pm.tif"
    tifffile.imwrite(path, np.dstack([stored, alpha]), photometric="rgb",
                     extrasamples=("assocalpha",))
    pic = imageio.read_image(path)
    np.testing.assert_array_equal(as_u16(pic.alpha), alpha)
    want = colour / 65535.0
    want[0, 0] = 0  # no colour survives a zero alpha
    np.testing.assert_allclose(pic.pixels, want, rtol=0, atol=1.5 / 65535)

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


def test_8bit_rgba_png_with_stray_trns_chunk_is_read(tmp_path):
    a = RNG.integers(0, 256, (3, 4, 4)).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    at = data.index(b"IDAT") - 4  # a tRNS chunk, invalid with RGBA: Pillow ignores it
    (tmp_path / "t.png").write_bytes(data[:at] + _chunk(b"tRNS", b"\0\1\0\2\0\3") + data[at:])
    pic = imageio.read_image(tmp_path / "t.png")
    assert pic.bit_depth == 8
    np.testing.assert_array_equal(np.rint(pic.pixels * 255), a[..., :3])
    np.testing.assert_array_equal(np.rint(pic.alpha * 255), a[..., 3])


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
    (tmp_path / "no_image.tif").write_bytes(b"II*\0\0\0\0\0")  # a TIFF header, no directory
    for name in ("truncated.png", "garbage.png", "empty.tif", "no_image.tif"):
        with pytest.raises(imageio.ImageReadError, match=name):
            imageio.read_image(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        imageio.read_image(tmp_path / "missing.png")


def test_quantize_rounds_and_clips():
    np.testing.assert_array_equal(imageio.quantize(np.array([-0.1, 0.5, 1.2, np.nan]), 8),
                                  [0, 128, 255, 0])
    assert imageio.quantize(np.array([1.0]), 16)[0] == 65535


def exif_orientation_bytes(value):
    exif = Image.Exif()
    exif[0x0112] = value
    data = exif.tobytes()
    return data[6:] if data.startswith(b"Exif\0\0") else data  # a PNG eXIf chunk has no prefix


@pytest.mark.parametrize("where", ["before IDAT", "after IDAT"])
def test_exif_orientation_of_16bit_colour_png(tmp_path, where):
    a = u16((4, 6, 3))
    path = tmp_path / "o.png"
    png16_all_filters(path, a)
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4 if where == "before IDAT" else data.rindex(b"IEND") - 4
    path.write_bytes(data[:at] + _chunk(b"eXIf", exif_orientation_bytes(6)) + data[at:])
    with Image.open(path) as img:
        assert img.getexif()[0x0112] == 6  # the chunk is well formed
    pic = imageio.read_image(path)
    np.testing.assert_array_equal(as_u16(pic.pixels), np.rot90(a, -1))


@pytest.mark.parametrize("depth", [8, 16])
def test_tiff_orientation_tag(tmp_path, depth):
    top = 2 ** depth - 1
    a = RNG.integers(0, top + 1, (4, 6, 3)).astype(np.uint8 if depth == 8 else np.uint16)
    path = tmp_path / "o.tif"
    tifffile.imwrite(path, a, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    pic = imageio.read_image(path)
    assert pic.bit_depth == depth
    np.testing.assert_array_equal(np.rint(pic.pixels * top), np.rot90(a, -1))


@pytest.mark.parametrize("name", ["t.png", "t.tif"])
def test_truncated_16bit_colour_raises_clear_error(tmp_path, name):
    path = tmp_path / name
    imageio.write_image(path, RNG.random((32, 32, 3)), RNG.random((32, 32)), bit_depth=16)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 8):
        path.write_bytes(data[:cut])
        with pytest.raises(imageio.ImageReadError, match=name):
            imageio.read_image(path)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow on the cut file
def test_what_tifffile_logs_about_a_damaged_file_goes_into_the_error(tmp_path, caplog):
    """A TIFF whose first page lies past the end: tifffile logs why while parsing; that reason
    ends up in the ImageReadError, not as a stray log line before it."""
    path = tmp_path / "cut.tif"
    data = imagecodecs.tiff_encode(u16((64, 64, 3)), photometric="rgb")  # libtiff: IFD at the end
    path.write_bytes(data[:len(data) // 2])
    with caplog.at_level(logging.DEBUG, logger="tifffile"):
        with pytest.raises(imageio.ImageReadError, match="tifffile: .*first page"):
            imageio.read_image(path)
    assert not [r for r in caplog.records if r.name == "tifffile"], caplog.records
    # the capture is scoped to the read: tifffile's records log normally afterwards
    with caplog.at_level(logging.WARNING, logger="tifffile"):
        logging.getLogger("tifffile").warning("after the read")
    assert [r.getMessage() for r in caplog.records if r.name == "tifffile"] == ["after the read"]
