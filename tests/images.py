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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


def write_animated_gif(path: str | Path, colors: Sequence[Color], size: tuple[int, int] = SMALL) -> Path:
    """A looping GIF with one solid frame per colour (florist uses the first frame)."""
    frames = [Image.new("RGB", size, c) for c in colors]
    path = _parent(path)
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def write_huge_jpeg_header(path: str | Path, width: int = 20000, height: int = 20000) -> Path:
    """A small real JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    struct.pack_into(">HH", data, sof + 5, height, width)  # marker(2) length(2) precision(1) height width
    path = _parent(path)
    path.write_bytes(bytes(data))
    return path


def write_huge_gif_header(path: str | Path, width: int = 20000, height: int = 20000) -> Path:
    """A small real GIF whose logical screen and frame claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("P", (4, 4), 0), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)  # logical screen descriptor
    frame = data.find(b"\x2c")  # image descriptor: separator, left, top, width, height
    struct.pack_into("<HH", data, frame + 5, width, height)
    path = _parent(path)
    path.write_bytes(bytes(data))
    return path


def _noise(size: tuple[int, int], color: Color, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(np.clip(np.array(color) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def write_noisy(path: str | Path, color: Color, seed: int, fmt: str = "JPEG", size=(48, 40), **kwargs) -> Path:
    """A noisy solid-colour photo (distinct bytes per seed)."""
    path = _parent(path)
    _noise(size, color, seed).save(path, fmt, **kwargs)
    return path


def write_corrupt_jpeg(path: str | Path, seed: int = 0) -> Path:
    """A JPEG whose Huffman table is overwritten with random bytes (header intact, data undecodable)."""
    data = bytearray(encode(_noise((48, 40), (90, 90, 90), seed), "JPEG"))
    dht = data.find(b"\xff\xc4")
    data[dht + 4 : dht + 40] = np.random.default_rng(seed).integers(0, 256, 36, dtype=np.uint8).tobytes()
    path = _parent(path)
    path.write_bytes(bytes(data))
    return path


def write_corrupt_png(path: str | Path, keep: float | None = None) -> Path:
    """A PNG whose compressed pixel data is zeroed (or, with ``keep``, which is cut short)."""
    data = bytearray(encode(_noise((48, 40), (90, 90, 90), 1), "PNG"))
    if keep is not None:
        data = data[: int(len(data) * keep)]
    else:
        idat = data.find(b"IDAT")
        data[idat + 10 : idat + 40] = bytes(30)
    path = _parent(path)
    path.write_bytes(bytes(data))
    return path


def write_broken_exif_jpeg(path: str | Path, color: Color = (200, 30, 30)) -> Path:
    """A JPEG with an EXIF block whose IFD entries are garbage: the picture itself is fine."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bytearray(encode(_noise((48, 40), color, 2), "JPEG", exif=exif.tobytes()))
    start = data.find(b"Exif\x00\x00") + 6
    data[start + 8 : start + 20] = b"\xff" * 12
    path = _parent(path)
    path.write_bytes(bytes(data))
    return path


def write_sparse_file(path: str | Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk space (a hole), starting with a JPEG signature."""
    path = _parent(path)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff")
        f.truncate(size)
    return path


# ---------------------------------------------------------------------------
# The bad-input corpus
# ---------------------------------------------------------------------------


@dataclass
class Corpus:
    """A photo folder full of bad and odd files, and what florist must make of each.

    Attributes:
        root: ``root/<class>/...``; pass it to prepare/train/evaluate, or its class
            folders (:meth:`class_folders`) to predict.
        classes: the class folder names (all end up with valid images), sorted.
        good: every file that must be used exactly once (odd but valid images too).
        bad: every file that must be skipped and reported exactly once ->
            a regular expression its reason must match (lower case).
        ignored: hidden files and folders, and files directly in ``root``: neither
            used nor reported by prepare/train/evaluate.
        notes: why some odd files count as good, for the reader of a failing test.
    """

    root: Path
    classes: list[str]
    good: list[Path] = field(default_factory=list)
    bad: dict[Path, str] = field(default_factory=dict)
    ignored: list[Path] = field(default_factory=list)
    notes: dict[Path, str] = field(default_factory=dict)

    def class_of(self, path: str | Path) -> str:
        """The class a file belongs to (its top folder under ``root``)."""
        return Path(path).relative_to(self.root).parts[0]

    def class_folders(self) -> list[Path]:
        return [self.root / c for c in self.classes]

    def __len__(self) -> int:
        return len(self.good) + len(self.bad) + len(self.ignored)


#: The corpus's classes: names with spaces and non-ASCII letters, and their colours.
CORPUS_CLASSES: dict[str, Color] = {
    "blue ☁ sky": (30, 50, 210),
    "green leaves": (30, 170, 40),
    "red flowers": (200, 30, 30),
}


def make_corpus(root: str | Path, plain_per_class: int = 5) -> Corpus:
    """Write the bad-input corpus under ``root`` (fresh folder) and say what each file is.

    Every class gets ``plain_per_class`` ordinary JPEGs plus a share of the odd-but-valid
    files (wrong extensions, 1x1 and thin images, CMYK, 16-bit, alpha, palettes,
    animated GIF, EXIF rotations, WebP, nested folders, links to images, file names
    with spaces, Unicode, control characters, markup and glob characters, and bytes
    that are not UTF-8), and of the bad ones (truncated and corrupt JPEG/PNG, empty,
    text, HTML, TIFF/ICO, 20000x20000 "bomb" headers in PNG/JPEG/GIF, a 1-pixel-high
    line, link loops, a dangling link, a link to a folder, a named pipe, a 300 MB
    sparse file, and a file and a folder without read permission when the tests do
    not run as root, which can read anything). Files the file system refuses (names
    that are not UTF-8 on macOS) are left out of the corpus.
    """
    root = Path(root)
    corpus = Corpus(root, sorted(CORPUS_CLASSES))
    names = list(CORPUS_CLASSES)
    seed = iter(range(10_000))

    def folder(i: int) -> Path:
        return root / names[i % len(names)]

    def colour(i: int) -> Color:
        return CORPUS_CLASSES[names[i % len(names)]]

    def good(path: Path, note: str = "") -> None:
        corpus.good.append(path)
        if note:
            corpus.notes[path] = note

    for i, name in enumerate(names):
        for k in range(plain_per_class):
            good(write_noisy(root / name / f"{name} {k:02d}.jpg", CORPUS_CLASSES[name], next(seed)))

    # --- odd but valid images: (file name, writer(path, colour)) spread over the classes
    odd: list[tuple[str, Callable[[Path, Color], Path], str]] = [
        ("png named.jpg", lambda p, c: write_noisy(p, c, next(seed), "PNG"), "PNG content, .jpg name"),
        ("jpeg named.png", lambda p, c: write_noisy(p, c, next(seed)), "JPEG content, .png name"),
        ("bitmap.jpg", lambda p, c: write_bmp_as_jpg(p, color=c), "BMP content, .jpg name"),
        ("no extension", lambda p, c: write_noisy(p, c, next(seed)), "JPEG without an extension"),
        ("SHOUTING.JPEG", lambda p, c: write_noisy(p, c, next(seed)), ""),
        ("tiny 1x1.png", lambda p, c: make_image(p, (1, 1), c, fmt="PNG"), "1x1 pixel: upscaled like any photo"),
        ("tiny 1x1.jpg", lambda p, c: make_image(p, (1, 1), c), "1x1 pixel: upscaled like any photo"),
        ("thin 2x90.png", lambda p, c: make_image(p, (2, 90), c, fmt="PNG"), "45:1, under the aspect limit"),
        ("cmyk.jpg", lambda p, c: write_cmyk_jpeg(p), "CMYK JPEG"),
        ("grey 16-bit.png", lambda p, c: write_png16(p), "16-bit greyscale PNG"),
        ("grey.png", lambda p, c: write_grayscale(p), ""),
        ("alpha.png", lambda p, c: write_png_with_alpha(p), "RGBA: composited on white"),
        ("palette transparent.png", lambda p, c: write_palette_png_transparent(p, right=c), ""),
        ("palette.gif", lambda p, c: write_palette_gif(p, left=c, right=c), ""),
        ("animated.gif", lambda p, c: write_animated_gif(p, [c, (0, 0, 0), (255, 255, 255)]), "first frame used"),
        ("exif 3.jpg", lambda p, c: write_exif_rotated_jpeg(p, orientation=3, left=c, right=c), "EXIF rotation"),
        ("exif 6.jpg", lambda p, c: write_exif_rotated_jpeg(p, orientation=6, left=c, right=c), "EXIF rotation"),
        ("exif 8.jpg", lambda p, c: write_exif_rotated_jpeg(p, orientation=8, left=c, right=c), "EXIF rotation"),
        ("broken exif.jpg", lambda p, c: write_broken_exif_jpeg(p, c), "garbage EXIF: pixels used as stored"),
        ("progressive.jpg", lambda p, c: write_noisy(p, c, next(seed), progressive=True), ""),
        ("trailing junk.jpg", lambda p, c: _append(write_noisy(p, c, next(seed)), b"junk" * 64), "bytes after EOI"),
        ("photo.webp", lambda p, c: write_noisy(p, c, next(seed), "WEBP"), ""),
        ("nested/deeper/leaf.jpg", lambda p, c: write_noisy(p, c, next(seed)), "found in sub-folders"),
        ("rose\u0301 NFD.jpg", lambda p, c: write_noisy(p, c, next(seed)), "decomposed Unicode"),
        ("🌸 emoji.jpg", lambda p, c: write_noisy(p, c, next(seed)), ""),
        ("\u202eright-to-left gpj.jpg", lambda p, c: write_noisy(p, c, next(seed)), "RTL override character"),
        ("zero\u200bwidth.jpg", lambda p, c: write_noisy(p, c, next(seed)), ""),
        ("日本語の写真.jpg", lambda p, c: write_noisy(p, c, next(seed)), ""),
        ("line\nbreak.jpg", lambda p, c: write_noisy(p, c, next(seed)), "newline in the name"),
        ("carriage\rreturn.jpg", lambda p, c: write_noisy(p, c, next(seed)), "CR in the name"),
        ("tab\there.jpg", lambda p, c: write_noisy(p, c, next(seed)), ""),
        ('quote " comma, semi;colon.jpg', lambda p, c: write_noisy(p, c, next(seed)), "CSV special characters"),
        ("[draft] rose?*.jpg", lambda p, c: write_noisy(p, c, next(seed)), "glob and markup characters"),
        ("[/x] markup.jpg", lambda p, c: write_noisy(p, c, next(seed)), "in a folder named '[': a markup tag"),
        ("frame#3", lambda p, c: write_noisy(p, c, next(seed)), "looks like a TFRecord reference"),
        ("-dash first.jpg", lambda p, c: write_noisy(p, c, next(seed)), "looks like an option"),
        (" leading and trailing space.jpg ", lambda p, c: write_noisy(p, c, next(seed)), ""),
        ("back\\slash.jpg", lambda p, c: write_noisy(p, c, next(seed)), ""),
        ("percent %s %d $HOME.jpg", lambda p, c: write_noisy(p, c, next(seed)), "format and shell characters"),
        ("long " + "n" * 230 + ".jpg", lambda p, c: write_noisy(p, c, next(seed)), "a 240-byte name"),
        (os.fsdecode(b"latin-1 caf\xe9.jpg"), lambda p, c: write_noisy(p, c, next(seed)), "name is not UTF-8"),
        (os.fsdecode(b"\xff\xfe invalid utf-8.jpg"), lambda p, c: write_noisy(p, c, next(seed)), "not UTF-8"),
    ]
    for i, (name, writer, note) in enumerate(odd):
        try:
            good(writer(folder(i) / name, colour(i)), note)
        except (OSError, UnicodeError):  # a file system that refuses this name
            continue
    target = corpus.good[0]
    good(_link(target.parent / "link to good.jpg", target.name), "symbolic link to an image")

    # --- bad files: (file name, writer(path), regular expression the reason must match)
    bad: list[tuple[str, Callable[[Path], Path], str]] = [
        ("truncated.jpg", lambda p: write_truncated_jpeg(p, keep=0.6), r"corrupt.*truncated"),
        ("truncated early.jpg", lambda p: write_truncated_jpeg(p, keep=0.05), r"corrupt.*truncated"),
        ("corrupt huffman.jpg", lambda p: write_corrupt_jpeg(p), r"corrupt"),
        ("truncated.png", lambda p: write_corrupt_png(p, keep=0.5), r"corrupt.*truncated"),
        ("corrupt data.png", lambda p: write_corrupt_png(p), r"corrupt"),
        ("empty.jpg", write_zero_byte, r"empty file \(0 bytes\)"),
        ("notes.txt", lambda p: write_text_file(p, "picked on sunday\n"), r"not an image"),
        ("script.jpg", write_text_file, r"not an image"),
        ("page.html.jpg", lambda p: write_text_file(p, "<!doctype html><title>404</title>"), r"not an image"),
        ("scan.tiff", lambda p: make_image(p, SMALL, fmt="TIFF"), r"unsupported image format tiff"),
        ("icon.ico", lambda p: make_image(p, SMALL, fmt="ICO"), r"unsupported image format ico"),
        ("bomb 20000.png", lambda p: write_huge_png_header(p, 20000, 20000), r"too many pixels"),
        ("bomb 20000.jpg", write_huge_jpeg_header, r"too many pixels"),
        ("bomb 20000.gif", write_huge_gif_header, r"too many pixels"),
        ("line 5000000x1.png", lambda p: make_image(p, (5_000_000, 1), fmt="PNG"), r"extreme aspect ratio"),
        ("self loop.jpg", lambda p: _link(p, "self loop.jpg"), r"symbolic link loop"),
        ("dangling.jpg", lambda p: _link(p, "gone.jpg"), r"broken symbolic link"),
        ("folder link", lambda p: _link(p, "."), r"symbolic link to a folder"),
        ("pipe.jpg", make_fifo, r"not a regular file"),
        ("huge sparse.jpg", lambda p: write_sparse_file(p, 300 * 1024 * 1024), r"file too large"),
    ]
    for i, (name, writer, reason) in enumerate(bad):
        corpus.bad[writer(folder(i) / name)] = reason
    loop_a, loop_b = _link(folder(0) / "loop a.jpg", "loop b.jpg"), _link(folder(0) / "loop b.jpg", "loop a.jpg")
    corpus.bad[loop_a] = corpus.bad[loop_b] = r"symbolic link loop"
    locked = write_noisy(folder(1) / "no read permission.jpg", colour(1), next(seed))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: then it is just a good image
        good(locked, "mode 000, but this user (root) can read it")
    else:
        corpus.bad[locked] = r"permission denied"
    inside = write_noisy(folder(2) / "locked folder" / "inside.jpg", colour(2), next(seed))
    inside.parent.chmod(0)
    if os.access(inside.parent, os.R_OK | os.X_OK):  # root again
        good(inside, "in a mode-000 folder, but this user (root) can read it")
    else:
        corpus.bad[inside.parent] = r"folder that cannot be listed"

    # --- ignored: hidden entries, files outside the class folders
    corpus.ignored += [
        write_ds_store(folder(0)),
        make_image(folder(1) / "._AppleDouble.jpg", SMALL),
        make_image(folder(2) / ".thumbnails" / "t.jpg", SMALL),
        make_image(root / ".cache" / "x.jpg", SMALL),
        write_text_file(root / "README.txt", "photos/<class>/<image>\n"),
        make_image(root / "loose.jpg", SMALL),
    ]
    return corpus


def _link(path: Path, target: str) -> Path:
    path = _parent(path)
    path.symlink_to(target)
    return path


def _append(path: Path, data: bytes) -> Path:
    with open(path, "ab") as f:
        f.write(data)
    return path
