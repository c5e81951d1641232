"""Synthetic test images, generated with Pillow at test time (no binary files in the repo).

Every writer takes the destination path, creates missing parent folders and
returns the path it wrote, so tests read as "make this odd file, then check
what florist does with it". Sizes default to tiny (32x24) to keep tests fast.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

Color = tuple[int, int, int]

SMALL = (32, 24)


def _parent(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def encode(img: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    """The bytes of ``img`` saved in ``fmt`` (for tests that call ``decode_image`` directly)."""
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def make_image(
    path: str | Path,
    size: tuple[int, int] = (64, 48),
    color: Color | int | tuple[int, ...] = (255, 0, 0),
    mode: str = "RGB",
    fmt: str = "JPEG",
    marker: int | None = None,
    **save_kwargs,
) -> Path:
    """Write a solid-colour image.

    ``marker`` (any int) darkens one pixel at a position derived from it, so
    images of one colour still have different bytes (exact duplicates are
    treated specially by the split, so most tests must avoid them).
    """
    img = Image.new(mode, size, color)
    if marker is not None:
        w, h = size
        x, y = marker % w, (marker // w) % h
        img.putpixel((x, y), 0 if mode in ("L", "P", "1", "I;16") else tuple(0 for _ in img.getbands()))
    path = _parent(path)
    img.save(path, fmt, **save_kwargs)
    return path


def make_class_folders(
    root: str | Path,
    classes: Mapping[str, Color],
    n: int | Mapping[str, int] = 6,
    size: tuple[int, int] = SMALL,
    fmt: str = "JPEG",
    ext: str = ".jpg",
) -> Path:
    """Create ``root/<class>/img_XX<ext>`` with ``n`` distinct images per class; return ``root``.

    ``n`` may be a mapping class -> count (0 makes an empty class folder).
    """
    root = Path(root)
    for name, color in classes.items():
        count = n[name] if isinstance(n, Mapping) else n
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            make_image(folder / f"img_{i:02d}{ext}", size=size, color=color, fmt=fmt, marker=i)
    return root


# ---------------------------------------------------------------------------
# Bad or unusual inputs
# ---------------------------------------------------------------------------


def write_truncated_jpeg(path: str | Path, size: tuple[int, int] = SMALL, keep: float = 0.6) -> Path:
    """A real JPEG cut short: only the first ``keep`` fraction of its bytes."""
    rng = np.random.default_rng(0)  # noise, so the entropy-coded data is long enough to cut
    data = encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")
    path = _parent(path)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_zero_byte(path: str | Path) -> Path:
    """An empty file (0 bytes)."""
    path = _parent(path)
    path.write_bytes(b"")
    return path


def write_text_file(path: str | Path, text: str = "#!/bin/sh\necho 'not a flower'\n") -> Path:
    """A text file (by default a shell script)."""
    path = _parent(path)
    path.write_text(text, encoding="utf-8")
    return path


def write_ds_store(folder: str | Path) -> Path:
    """A macOS ``.DS_Store`` hidden file (binary junk, as Finder leaves behind)."""
    path = _parent(Path(folder) / ".DS_Store")
    path.write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(range(256)) * 4)
    return path


def write_bmp_as_jpg(path: str | Path, size: tuple[int, int] = SMALL, color: Color = (10, 200, 30)) -> Path:
    """A BMP file whose name ends in ``.jpg``."""
    return make_image(path, size=size, color=color, fmt="BMP")


def write_png_with_alpha(path: str | Path, size: tuple[int, int] = SMALL) -> Path:
    """RGBA PNG: left third fully transparent red, middle third 50% black, right third opaque blue."""
    w, h = size
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    third = w // 3
    arr[:, :third] = (255, 0, 0, 0)
    arr[:, third : 2 * third] = (0, 0, 0, 128)
    arr[:, 2 * third :] = (0, 0, 255, 255)
    path = _parent(path)
    Image.fromarray(arr, "RGBA").save(path, "PNG")
    return path


def _two_colour_palette_image(size: tuple[int, int], left: Color, right: Color) -> Image.Image:
    w, h = size
    img = Image.new("P", size, 0)
    img.putpalette(list(left) + list(right) + [0, 0, 0] * 254)
    img.paste(1, (w // 2, 0, w, h))
    return img


def write_palette_gif(
    path: str | Path, size: tuple[int, int] = SMALL, left: Color = (255, 0, 0), right: Color = (0, 0, 255)
) -> Path:
    """Palette (mode P) GIF: left half ``left``, right half ``right``; no transparency."""
    path = _parent(path)
    _two_colour_palette_image(size, left, right).save(path, "GIF")
    return path


def write_palette_png_transparent(
    path: str | Path, size: tuple[int, int] = SMALL, left: Color = (0, 255, 0), right: Color = (0, 0, 255)
) -> Path:
    """Palette PNG whose palette entry 0 (the left half) is fully transparent (tRNS chunk)."""
    path = _parent(path)
    _two_colour_palette_image(size, left, right).save(path, "PNG", transparency=0)
    return path


def write_grayscale(
    path: str | Path, size: tuple[int, int] = SMALL, value: int = 100, fmt: str = "PNG"
) -> Path:
    """8-bit grayscale (mode L) image of one grey ``value``."""
    return make_image(path, size=size, color=value, mode="L", fmt=fmt)


def write_cmyk_jpeg(
    path: str | Path, size: tuple[int, int] = SMALL, cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)
) -> Path:
    """CMYK JPEG; the default ink (no cyan, full magenta and yellow) is red."""
    return make_image(path, size=size, color=cmyk, mode="CMYK", fmt="JPEG")


def write_png16(path: str | Path, size: tuple[int, int] = SMALL, value: int = 32896) -> Path:
    """16-bit grayscale PNG (opens as mode ``I;16``); 32896 = 128 * 257 is mid-grey."""
    path = _parent(path)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint16)).save(path, "PNG")
    return path


def write_exif_rotated_jpeg(
    path: str | Path,
    size: tuple[int, int] = (64, 32),
    orientation: int = 6,
    left: Color = (255, 0, 0),
    right: Color = (0, 0, 255),
) -> Path:
    """JPEG stored ``size`` wide/high with left half ``left``, right half ``right`` and an EXIF orientation.

    Orientation 6 means "rotate 90 degrees clockwise to display" (the stored
    left half ends up on top), 8 means counter-clockwise (left ends up at the bottom).
    """
    w, h = size
    img = Image.new("RGB", size, left)
    img.paste(right, (w // 2, 0, w, h))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _parent(path)
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


def write_huge_png_header(path: str | Path, width: int = 30000, height: int = 30000) -> Path:
    """A tiny real PNG whose IHDR claims ``width`` x ``height`` (CRC fixed, so the header is valid).

    Decoding it for real would need gigabytes; a careful reader refuses it from the header alone.
    """
    data = bytearray(encode(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG"))
    # 8-byte signature, then IHDR: length(4) type(4) width(4) height(4) ... crc over type+data.
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path = _parent(path)
    path.write_bytes(bytes(data))
    return path


def make_dangling_symlink(path: str | Path) -> Path:
    """A symlink pointing at a file that does not exist."""
    path = _parent(path)
    path.symlink_to(path.parent / "does-not-exist.jpg")
    return path


def make_fifo(path: str | Path) -> Path:
    """A named pipe (opening it for reading would block until a writer appears)."""
    path = _parent(path)
    os.mkfifo(path)
    return path
