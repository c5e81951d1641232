"""Property-based tests (hypothesis): arbitrary and mutated bytes never crash the readers.

Image bytes go through :func:`florist.data.decode_image` / :func:`~florist.data.check_bytes`
(every stage decodes there); TFRecord bytes through the record framing, the
``tf.train.Example`` parser and :func:`florist.tfrecord.read_image_bytes`. Whatever
the input, the only exceptions allowed are florist's own (:class:`BadImage` for one
image, :class:`FloristError` for a data file), and memory stays bounded by the pixel
limit: a header claiming more pixels is refused before anything is allocated.
"""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib

import images as im  # tests/images.py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from florist.data import BadImage, check_bytes, decode_image
from florist.errors import FloristError
from florist.tfrecord import (
    ImageRecord,
    _parse_image_record,
    iter_records,
    read_image_bytes,
    record_ref,
    scan_records,
    write_record,
)

# Loaded machines make single examples slow now and then: no per-example deadline,
# a bounded number of examples instead.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Pixel limit used while fuzzing: any header claiming more is refused, so a mutated
#: size field costs at most a few MB, however large the number it ends up holding.
FUZZ_MAX_PIXELS = 1_000_000


def _seed_images() -> dict[str, bytes]:
    """Small valid images in every accepted format (and some odd modes) to mutate."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": im.encode(noise, "JPEG", quality=80),
        "progressive": im.encode(noise, "JPEG", progressive=True),
        "exif": im.encode(noise, "JPEG", exif=exif.tobytes()),
        "cmyk": im.encode(noise.convert("CMYK"), "JPEG"),
        "png": im.encode(noise, "PNG"),
        "rgba": im.encode(noise.convert("RGBA"), "PNG"),
        "png16": im.encode(Image.fromarray(np.full((6, 5), 40000, dtype=np.uint16)), "PNG"),
        "palette": im.encode(noise.convert("P"), "PNG", transparency=0),
        "gif": im.encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp": im.encode(noise, "BMP"),
        "webp": im.encode(noise, "WEBP"),
    }


SEEDS = _seed_images()


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> bytes:
    """A seed's bytes with a few random byte edits, a cut or an insertion."""
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "overwrite"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        else:  # overwrite: favours header fields such as sizes and lengths
            chunk = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff", b"\xff\xd9"]))
            data[pos : pos + len(chunk)] = chunk
    return bytes(data)


def _decode_or_refuse(data: bytes) -> None:
    """Decode ``data`` (full size and draft) allowing only :class:`BadImage` to escape."""
    for kwargs in ({}, {"draft_size": 32}):
        try:
            img = decode_image(data, max_pixels=FUZZ_MAX_PIXELS, **kwargs)
        except BadImage as e:
            assert str(e), "a refusal says why"
        else:
            assert img.mode == "RGB" and img.width * img.height <= FUZZ_MAX_PIXELS


@FUZZ
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"\xff\xd8\xff")
@example(b"GIF89a")
@example(b"BM")
@example(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    _decode_or_refuse(data)


@FUZZ
@given(mutated(SEEDS))
def test_mutated_images_decode_or_are_refused_cleanly(data: bytes) -> None:
    _decode_or_refuse(data)
    try:
        digest = check_bytes(data, max_pixels=FUZZ_MAX_PIXELS)
    except BadImage:
        return
    assert len(digest) == 64


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid 2x2 PNG whose header (with a correct CRC) claims ``width`` x ``height``."""
    data = bytearray(im.encode(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2**31 - 1), st.data())
def test_claimed_sizes_over_the_limit_are_refused_from_the_header(width: int, data: st.DataObject) -> None:
    """Any header over the pixel limit is refused at once, without allocating the image."""
    height = data.draw(st.integers(FUZZ_MAX_PIXELS // width + 1, 2**31 - 1), label="height")
    png = _png_claiming(width, height)
    start = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadImage, match="too many pixels"):
        decode_image(png, max_pixels=FUZZ_MAX_PIXELS)
    assert time.perf_counter() - start < 2.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 64  # MiB


# ---------------------------------------------------------------------------
# TFRecords
# ---------------------------------------------------------------------------


def _framed(*payloads: bytes) -> bytes:
    buf = io.BytesIO()
    for p in payloads:
        write_record(buf, p)
    return buf.getvalue()


GOOD_RECORD = ImageRecord(
    image=SEEDS["png"], label=1, text="red", filename="red/a.png", height=12, width=16, format="png"
).to_example()


def _read_all(path) -> None:
    """Every way florist reads a TFRecord file; only FloristError/BadImage may escape."""
    try:
        for offset, data in iter_records(path):
            try:
                record = _parse_image_record(data)
            except BadImage:
                continue
            assert isinstance(record.image, bytes) and isinstance(record.label, int)
    except FloristError as e:
        assert str(path) in str(e)
    for offset in (0, 16, 10**12):
        try:
            read_image_bytes(record_ref(path, offset))
        except BadImage as e:
            assert str(e)
    offsets, problem = scan_records(path)  # what preparing data reads: whole records, and why it stopped
    assert problem is None or (str(path) in str(problem) and problem.offset not in offsets)


@FUZZ
@given(st.binary(max_size=512))
def test_random_tfrecord_files_are_refused_cleanly(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "random.tfrecord"
    path.write_bytes(data)
    _read_all(path)


@FUZZ
@given(st.binary(max_size=512))
def test_random_payloads_in_valid_framing_are_refused_cleanly(
    tmp_path_factory: pytest.TempPathFactory, payload: bytes
) -> None:
    """Checksums pass, so the protobuf parser and the field checks see arbitrary bytes."""
    path = tmp_path_factory.mktemp("fuzz") / "payload.tfrecord"
    path.write_bytes(_framed(payload, GOOD_RECORD))
    _read_all(path)


@FUZZ
@given(mutated({"record": GOOD_RECORD}))
def test_mutated_examples_in_valid_framing_are_refused_cleanly(
    tmp_path_factory: pytest.TempPathFactory, payload: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "mutated.tfrecord"
    path.write_bytes(_framed(payload))
    _read_all(path)
    try:
        image = read_image_bytes(record_ref(path, 0))
    except BadImage:
        return
    _decode_or_refuse(image)  # whatever the record holds goes on to the image decoder


@FUZZ
@given(mutated({"file": _framed(GOOD_RECORD, GOOD_RECORD)}))
def test_mutated_tfrecord_files_are_refused_cleanly(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    """Damaged framing (lengths, checksums, truncation) is caught by the CRCs and size checks."""
    path = tmp_path_factory.mktemp("fuzz") / "damaged.tfrecord"
    path.write_bytes(data)
    _read_all(path)
