"""TFRecord interchange: a prepared split as standard ``tf.train.Example`` records, and back.

``florist prepare PHOTOS --out RUN --format tfrecord`` packs the photos into
``train.tfrecord`` and ``eval.tfrecord`` (or shards ``train-00000-of-00004.tfrecord``
...) next to ``labels.txt``, so the data travels as a few files and TensorFlow
reads it with ``tf.data.TFRecordDataset``. ``florist train`` takes such a file or
folder as its data (see :func:`prepare_records`).

Record framing (TensorFlow's format), little-endian::

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
    masked_crc32c(b) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8  (mod 2**32), crc = CRC-32C(b)

Every record read is checked against both checksums; a mismatch or a truncated
file is a :class:`FloristError` naming the file and the record's byte offset.

Each record's data is a ``tf.train.Example`` with the feature names TensorFlow's
image pipelines use: ``image/encoded`` (the original file's bytes, untouched),
``image/format``, ``image/height``, ``image/width`` (as stored, before any EXIF
rotation, which is what ``tf.io.decode_image`` returns), ``image/class/label``
(0-based line of ``labels.txt``), ``image/class/text`` and ``image/filename``
(path relative to the photo folder). The Example message is declared from its
field numbers with protobuf's descriptor API, so no TensorFlow is needed.

Inside florist a record is addressed as ``"<file>#<byte offset>"`` (see
:func:`record_ref`); :func:`read_image_bytes` resolves it, so the feature
extraction, ``train.csv``/``eval.csv`` of a run and ``florist evaluate RUN`` work
on records exactly as on files.
"""

from __future__ import annotations

import functools
import io
import os
import random
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import google_crc32c
from PIL import Image

from . import remote
from .data import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    Dataset,
    Item,
    Prepared,
    Skipped,
    check_all,
    check_bytes,
    prepare,
    read_file,
    read_labels,
    split_dataset,
    write_labels,
    write_skipped,
)
from .errors import FloristError, SettingError, literal
from .files import atomic_open, sha256_bytes
from .progress import ProgressFn
from .runfiles import LABELS

SUFFIX = ".tfrecord"
SPLITS = ("train", "eval")
FORMATS = ("csv", "tfrecord")

_HEADER = struct.Struct("<QI")  # data length, masked CRC of the 8 length bytes
_FOOTER = struct.Struct("<I")  # masked CRC of the data
_MASK_DELTA = 0xA282EAD8

FeatureValue = bytes | str | int | float | Sequence[bytes | str | int | float]


# ---------------------------------------------------------------------------
# Record framing
# ---------------------------------------------------------------------------


class RecordError(FloristError):
    """A record that cannot be read: a truncated file or a checksum mismatch.

    ``reason`` is the message without the file name (``"corrupt record at byte 24
    (data checksum mismatch)"``), for lists that name the record already;
    ``offset`` is where the record starts.
    """

    def __init__(self, path: Path, offset: int, reason: str):
        super().__init__(f"{path}: {reason}")
        self.offset, self.reason = offset, reason


def masked_crc32c(data: bytes) -> int:
    """TensorFlow's masked CRC-32C: rotate right by 15 bits and add a constant.

    The mask keeps the checksum of data that itself contains checksums from being trivial.
    """
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def write_record(f: BinaryIO, data: bytes) -> None:
    """Append one framed record to an open binary file."""
    length = struct.pack("<Q", len(data))
    f.write(length + struct.pack("<I", masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data)))


def _read_header(f: BinaryIO, path: Path, offset: int, size: int) -> int | None:
    """The data length of the record at ``offset`` (None at a clean end of file), checked."""
    header = f.read(_HEADER.size)
    if not header:
        return None
    hint = "; is it a TFRecord file?" if offset == 0 else ""
    truncated = f"truncated record at byte {offset} (file ends at byte {size}){hint}"
    if len(header) < _HEADER.size:
        raise RecordError(path, offset, truncated)
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise RecordError(path, offset, f"corrupt record at byte {offset} (length checksum mismatch){hint}")
    if offset + _HEADER.size + length + _FOOTER.size > size:
        raise RecordError(path, offset, truncated)
    return length


def _read_data(f: BinaryIO, path: Path, offset: int, length: int) -> bytes:
    data = f.read(length)
    (data_crc,) = _FOOTER.unpack(f.read(_FOOTER.size))
    if masked_crc32c(data) != data_crc:
        raise RecordError(path, offset, f"corrupt record at byte {offset} (data checksum mismatch)")
    return data


def _open(path: Path) -> tuple[BinaryIO, int]:
    try:
        return open(path, "rb"), path.stat().st_size
    except OSError as e:
        raise FloristError(f"cannot read {path}: {e.strerror or e}") from None


def iter_records(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, data)`` of every record in one TFRecord file, both checksums verified.

    Raises:
        FloristError: unreadable file, truncated or corrupt record (names file and offset).
    """
    path = Path(path)
    f, size = _open(path)
    with f:
        offset = 0
        while (length := _read_header(f, path, offset, size)) is not None:
            yield offset, _read_data(f, path, offset, length)
            offset += _HEADER.size + length + _FOOTER.size


def record_offsets(path: str | Path) -> list[int]:
    """Byte offset of every record, reading only the (checked) headers; data is verified on read.

    Raises:
        RecordError: a truncated file or a damaged header (see :func:`scan_records`).
    """
    offsets, problem = scan_records(path)
    if problem is not None:
        raise problem
    return offsets


def scan_records(path: str | Path) -> tuple[list[int], RecordError | None]:
    """The offsets of the whole records a file starts with, and what ended it early (None: nothing).

    After a truncated record or a damaged length nothing further can be framed, so
    the records before it are all a damaged file still offers.
    """
    path = Path(path)
    f, size = _open(path)
    offsets: list[int] = []
    with f:
        offset = 0
        try:
            while (length := _read_header(f, path, offset, size)) is not None:
                offsets.append(offset)
                offset += _HEADER.size + length + _FOOTER.size
                f.seek(offset)
        except RecordError as e:
            return offsets, e
    return offsets, None


def read_record(path: str | Path, offset: int) -> bytes:
    """The data of the record starting at ``offset``, both checksums verified."""
    path = Path(path)
    f, size = _open(path)
    with f:
        f.seek(offset)
        length = _read_header(f, path, offset, size)
        if length is None:
            raise FloristError(f"{path}: no record at byte {offset} (file ends at byte {size})")
        return _read_data(f, path, offset, length)


# ---------------------------------------------------------------------------
# tf.train.Example
# ---------------------------------------------------------------------------


@functools.cache
def _example_type() -> type:
    """A protobuf message class wire-compatible with ``tf.train.Example``.

    Declared in code from the field numbers of the message family (Example.features = 1;
    Features.feature = 1, a map<string, Feature>; Feature is a oneof of bytes_list = 1,
    float_list = 2, int64_list = 3; each list's value = 1, numbers packed), in a private
    descriptor pool so it never clashes with TensorFlow's own classes in one process.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="florist/tf_example.proto", package="florist.tf", syntax="proto3")

    def add(name: str, *fields: dict, into=None) -> descriptor_pb2.DescriptorProto:
        message = (into.nested_type if into is not None else file.message_type).add(name=name)
        for spec in fields:
            message.field.add(**spec)
        return message

    def spec(name: str, number: int, type_: int, type_name: str | None, label: int, **extra) -> dict:
        named = {"type_name": type_name} if type_name else {}  # only message fields name a type
        return {"name": name, "number": number, "type": type_, "label": label, **named, **extra}

    def repeated(name: str, number: int, type_: int, type_name: str | None = None) -> dict:
        return spec(name, number, type_, type_name, field.LABEL_REPEATED)

    def single(name: str, number: int, type_: int, type_name: str | None = None, **extra) -> dict:
        return spec(name, number, type_, type_name, field.LABEL_OPTIONAL, **extra)

    add("BytesList", repeated("value", 1, field.TYPE_BYTES))
    add("FloatList", repeated("value", 1, field.TYPE_FLOAT))
    add("Int64List", repeated("value", 1, field.TYPE_INT64))
    feature = add(
        "Feature",
        single("bytes_list", 1, field.TYPE_MESSAGE, ".florist.tf.BytesList", oneof_index=0),
        single("float_list", 2, field.TYPE_MESSAGE, ".florist.tf.FloatList", oneof_index=0),
        single("int64_list", 3, field.TYPE_MESSAGE, ".florist.tf.Int64List", oneof_index=0),
    )
    feature.oneof_decl.add(name="kind")
    features = add("Features", repeated("feature", 1, field.TYPE_MESSAGE, ".florist.tf.Features.FeatureEntry"))
    entry = add(
        "FeatureEntry",
        single("key", 1, field.TYPE_STRING),
        single("value", 2, field.TYPE_MESSAGE, ".florist.tf.Feature"),
        into=features,
    )
    entry.options.map_entry = True
    add("Example", single("features", 1, field.TYPE_MESSAGE, ".florist.tf.Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("florist.tf.Example"))


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """Serialise ``{name: value or list of values}`` as a ``tf.train.Example``.

    bytes and str (UTF-8) become a bytes_list, int an int64_list, float a float_list.
    Map entries are written in key order, so equal input gives equal bytes.
    """
    example = _example_type()()
    for key, value in features.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        feature = example.features.feature[key]
        if all(isinstance(v, (bytes, str)) for v in values):
            # surrogateescape: a file name that is not UTF-8 keeps its original bytes
            feature.bytes_list.value.extend(_utf8(v) if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(values)
        else:
            raise TypeError(f"feature {key!r}: values must be all bytes/str, all int or all float, got {values!r}")
    return example.SerializeToString(deterministic=True)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def decode_example(data: bytes) -> dict[str, list]:
    """A ``tf.train.Example``'s features as ``{name: list of bytes, int or float}``.

    Raises:
        google.protobuf.message.DecodeError: when ``data`` is not a serialised Example.
    """
    example = _example_type()()
    example.ParseFromString(data)
    out: dict[str, list] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[key] = list(getattr(feature, kind).value) if kind else []
    return out


# ---------------------------------------------------------------------------
# Image records
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image as stored in a record."""

    image: bytes  # the image file's bytes: the original file's, or a binary PPM for raw pixels
    label: int  # 0-based index into labels.txt
    text: str  # class name
    filename: str  # path relative to the photo folder ("roses/123.jpg")
    height: int
    width: int
    format: str  # "jpeg", "png", ..., "raw" for a record of raw pixels

    def to_example(self) -> bytes:
        return encode_example(
            {
                "image/encoded": self.image,
                "image/format": self.format,
                "image/height": self.height,
                "image/width": self.width,
                "image/class/label": self.label,
                "image/class/text": self.text,
                "image/filename": self.filename,
            }
        )


#: The original TensorFlow project's schema (its ``pre_input.py``): raw uint8 RGB pixels,
#: row-major ``height x width x 3``, with no encoding, and a 0-based ``label``.
RAW_PIXELS = "image"


def _parse_image_record(data: bytes) -> ImageRecord:
    """An :class:`ImageRecord` from an Example in florist's (TensorFlow's) schema or the raw-pixel one.

    Raises:
        BadImage: not an Example, or not one of an image (the reason, without the record's name).
    """
    from google.protobuf.message import DecodeError

    try:
        features = decode_example(data)
    except DecodeError as e:
        raise BadImage(f"not a tf.train.Example ({e})") from None

    def one(key: str, kind: type, default=None):
        values = features.get(key, [])
        if not values and default is not None:
            return default
        if len(values) != 1 or not isinstance(values[0], kind):
            raise BadImage(f"no single {kind.__name__} feature {key!r}")
        return values[0]

    if "image/encoded" not in features and RAW_PIXELS in features:
        return _raw_pixel_record(one(RAW_PIXELS, bytes), one("image/height", int), one("image/width", int), one("label", int))
    text = one("image/class/text", bytes, b"")
    filename = one("image/filename", bytes, b"")
    return ImageRecord(
        image=one("image/encoded", bytes),
        label=one("image/class/label", int),
        text=text.decode("utf-8", errors="surrogateescape"),  # the names florist wrote, byte for byte
        filename=filename.decode("utf-8", errors="surrogateescape"),
        height=one("image/height", int, 0),
        width=one("image/width", int, 0),
        format=one("image/format", bytes, b"").decode("ascii", errors="replace"),
    )


def _raw_pixel_record(pixels: bytes, height: int, width: int, label: int) -> ImageRecord:
    """A raw-pixel record's image as a binary PPM (a header, then the same bytes), so it decodes like any file.

    PPM is lossless and needs no encoding step, so the pixels and their hash are the record's own.
    """
    if height <= 0 or width <= 0 or len(pixels) != height * width * 3:
        raise BadImage(
            f"raw pixels of {len(pixels)} bytes do not fill image/height x image/width x 3 = "
            f"{height} x {width} x 3 = {max(height, 0) * max(width, 0) * 3} bytes"
        )
    ppm = b"P6\n%d %d\n255\n" % (width, height) + pixels
    return ImageRecord(ppm, label, "", "", height, width, "raw")


def _record_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob(f"*{SUFFIX}") if p.is_file())
        if not files:
            raise FloristError(f"no *{SUFFIX} files in {path}")
        return files
    if not path.exists():
        raise FloristError(f"TFRecord file not found: {path}")
    return [path]


def read_tfrecords(path: str | Path) -> Iterator[ImageRecord]:
    """Every image record in a TFRecord file, or in a folder's ``*.tfrecord`` files in name order.

    Example:
        >>> for rec in florist.tfrecord.read_tfrecords("runs/flowers/eval.tfrecord"):  # doctest: +SKIP
        ...     print(rec.filename, rec.text, len(rec.image))

    Raises:
        FloristError: corrupt or truncated records, records that are not image Examples.
    """
    for file in _record_files(path):
        for offset, data in iter_records(file):
            try:
                yield _parse_image_record(data)
            except BadImage as e:
                raise FloristError(f"{file}: record at byte {offset}: {e}") from None


# ---------------------------------------------------------------------------
# Writing a prepared split
# ---------------------------------------------------------------------------


def shard_names(split: str, shards: int) -> list[str]:
    """``train.tfrecord`` for one shard, else ``train-00000-of-00004.tfrecord`` ... (TensorFlow's naming)."""
    if shards == 1:
        return [f"{split}{SUFFIX}"]
    return [f"{split}-{k:05d}-of-{shards:05d}{SUFFIX}" for k in range(shards)]


def _image_record(item: Item, classes: Sequence[str], root: str | Path) -> ImageRecord:
    """Read an item's file back (it must still be the file that was checked) as a record."""
    try:
        data = read_file(item.path)
    except BadImage as e:
        raise FloristError(f"{item.path}: {e}") from None
    if sha256_bytes(data) != item.sha256:
        raise FloristError(f"{item.path} changed while it was being prepared; run prepare again")
    # Header only: the size as stored, which is what tf.io.decode_image returns (no EXIF rotation).
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        fmt = "jpeg" if img.format == "MPO" else (img.format or "").lower()
    return ImageRecord(
        image=data,
        label=item.label,
        text=classes[item.label],
        filename=Path(remote.relative(item.path, root)).as_posix(),
        height=height,
        width=width,
        format=fmt,
    )


def write_tfrecords(
    out_dir: str | Path,
    prepared: Prepared,
    root: str | Path,
    *,
    shards: int = 1,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Write the train and eval items of ``prepared`` as records in ``out_dir``.

    Records are written in a seeded random order, so each shard holds a mix of
    classes (what a streaming reader with a shuffle buffer needs). Each file is
    written atomically; shards of an earlier run with another shard count are removed.

    Args:
        root: the photo folder (or its URL) the items' paths are under (``image/filename`` is relative to it).
        shards: files per split (fewer for a split with fewer images).

    Returns:
        The files written.
    """
    if shards < 1:
        raise SettingError(f"{{shards}} must be >= 1, got {literal(shards)}")
    out = Path(out_dir)
    written: list[Path] = []
    total, done = len(prepared.train) + len(prepared.eval), 0
    for split, items in zip(SPLITS, (prepared.train, prepared.eval)):
        order = list(items)
        random.Random(f"{seed}:{split}").shuffle(order)
        n = max(1, min(shards, len(order)))
        names = shard_names(split, n)
        for k, name in enumerate(names):
            with atomic_open(out / name) as f:
                for item in order[k * len(order) // n : (k + 1) * len(order) // n]:
                    write_record(f, _image_record(item, prepared.classes, root).to_example())
                    done += 1
                    if progress is not None:
                        progress(done, total)
            written.append(out / name)
        stale = {*out.glob(f"{split}-*-of-*{SUFFIX}"), out / f"{split}{SUFFIX}"} - set(written)
        for path in stale:
            path.unlink(missing_ok=True)
    return written


def prepare_tfrecords(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    shards: int = 1,
    eval_fraction: float | None = 0.2,
    train_per_class: int | None = None,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressFn | None = None,
) -> Prepared:
    """:func:`florist.data.prepare`, written as TFRecords: the split's records, ``labels.txt``, ``skipped.csv``.

    Example:
        >>> florist.tfrecord.prepare_tfrecords("flower_photos", "runs/flowers-tfr", shards=4)  # doctest: +SKIP
    """
    if shards < 1:
        raise SettingError(f"{{shards}} must be >= 1, got {literal(shards)}")
    # A remote photo folder is read where it is; an earlier prepare's shards in a remote
    # out_dir are replaced, as write_tfrecords does locally.
    data_dir = remote.where(data_dir)
    with remote.local_output(out_dir, replaces=[f"*{SUFFIX}"]) as out:
        prepared = prepare(
            data_dir,
            None,
            eval_fraction=eval_fraction,
            train_per_class=train_per_class,
            seed=seed,
            max_pixels=max_pixels,
            progress=progress,
        )
        write_tfrecords(out.path, prepared, data_dir, shards=shards, seed=seed)
        write_labels(out.path, prepared.classes)
        write_skipped(out.path, prepared.skipped)
    return prepared


# ---------------------------------------------------------------------------
# Records as training data
# ---------------------------------------------------------------------------

_REF_SEP = "#"


def record_ref(path: str | Path, offset: int) -> str:
    """The name florist gives a record wherever it expects an image path: ``"<file>#<offset>"``."""
    return f"{path}{_REF_SEP}{offset}"


def parse_ref(source: str) -> tuple[str, int] | None:
    """``(file, offset)`` for a :func:`record_ref` string, None for anything else (a plain path)."""
    path, sep, offset = str(source).rpartition(_REF_SEP)
    if not sep or not path or not offset.isdigit() or os.path.exists(source):
        return None
    return path, int(offset)


def read_image_bytes(source: str | Path) -> bytes:
    """The image bytes of a file, or of the record a :func:`record_ref` names.

    Raises:
        BadImage: the file or record cannot be read (a reason, as for any unusable image).
    """
    ref = parse_ref(str(source))
    if ref is None:
        return read_file(source)
    path, offset = ref
    try:
        return _parse_image_record(read_record(path, offset)).image
    except FloristError as e:
        raise BadImage(str(e)) from None


def is_record_data(path: str | Path) -> bool:
    """True for a file (a TFRecord) or a folder holding ``*.tfrecord`` files; False for a photo folder.

    A URL is told by one listing of what is directly in it (see :func:`florist.remote.folder_names`).
    """
    if remote.is_remote(path):
        names = remote.folder_names(str(path))
        return names is None or any(name.endswith(SUFFIX) for name in names)
    path = Path(path)
    return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.glob(f"*{SUFFIX}")))


def _splits_of(path: Path) -> dict[str | None, list[Path]]:
    """Files per split when the names say it (``train*``/``eval*``), else all under ``None``."""
    files = _record_files(path)
    by_split = {s: [f for f in files if f.name.startswith(s)] for s in SPLITS}
    if not all(by_split.values()):
        return {None: files}
    other = sorted(set(files) - set(by_split["train"]) - set(by_split["eval"]))
    if other:
        raise FloristError(
            f"{path}: cannot tell which split {other[0].name} belongs to "
            f"(expected only train*{SUFFIX} and eval*{SUFFIX} files)"
        )
    return by_split


def _check_record(ref: str, classes: Sequence[str], max_pixels: int) -> tuple[int, str, str]:
    """Read, verify and decode one record: ``(label, filename, sha256)``; any problem is a :class:`BadImage`."""
    path, offset = parse_ref(ref)  # type: ignore[misc]  # refs made by prepare_records
    try:
        record = _parse_image_record(read_record(path, offset))
    except RecordError as e:
        raise BadImage(e.reason) from None
    if not 0 <= record.label < len(classes):
        raise BadImage(f"label {record.label} is not in labels.txt, which lists {len(classes)} classes (0-based)")
    if record.text and record.text != classes[record.label]:
        raise BadImage(
            f"label {record.label} is {classes[record.label]!r} in labels.txt but image/class/text is {record.text!r}"
        )
    return record.label, record.filename or ref, check_bytes(record.image, max_pixels)


def record_classes(folder: Path) -> list[str]:
    """Class names in label order from the ``labels.txt`` beside records.

    Two forms are read: florist's (and TensorFlow's) one name per line, the line
    number being the label; and the original project's ``<name> <index> `` lines,
    recognised when every line ends in a number and the numbers are 0..N-1.
    """
    if not (folder / LABELS).is_file():
        raise FloristError(f"no labels.txt next to the TFRecord files in {folder} (one class name per line)")
    lines = read_labels(folder)
    split = [line.rstrip().rpartition(" ") for line in lines]
    indices = [index for _, sep, index in split if sep and index.isdigit()]
    if len(indices) == len(lines) and sorted(map(int, indices)) == list(range(len(lines))):
        names = {int(index): name.rstrip() for name, _, index in split}
        return [names[i] for i in range(len(lines))]
    return lines


def _file_records(files: Sequence[Path]) -> tuple[list[str], list[Skipped]]:
    """Refs of every whole record in ``files``, and a skip for each file's unreadable tail.

    Raises:
        FloristError: a file whose first record cannot be framed (not a TFRecord file).
    """
    refs: list[str] = []
    skipped: list[Skipped] = []
    for file in files:
        offsets, problem = scan_records(file)
        if problem is not None and not offsets:
            raise problem
        refs += [record_ref(file, o) for o in offsets]
        if problem is not None:
            skipped.append(Skipped(record_ref(file, problem.offset), f"{problem.reason}; nothing after it can be read"))
    return refs, skipped


def prepare_records(
    path: str | Path,
    *,
    eval_fraction: float | None = 0.2,
    train_per_class: int | None = None,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> Prepared:
    """What :func:`florist.data.prepare` gives for a photo folder, for TFRecord data.

    ``path`` is a TFRecord file or a folder of ``*.tfrecord`` files, with
    ``labels.txt`` beside them (see :func:`record_classes`). Records in florist's
    schema (``image/encoded``, as ``prepare --format tfrecord`` writes and
    TensorFlow's image pipelines use) and in the original project's raw-pixel
    schema (:data:`RAW_PIXELS`) are read. When the folder has ``train*`` and
    ``eval*`` files (florist's ``train.tfrecord``, the original project's
    ``training_set.tfrecord`` / ``eval_set.tfrecord``) that is the split; otherwise
    all records are split like photos, by ``eval_fraction``/``train_per_class``
    and ``seed``. Every record is checked and its image decoded once. A record
    that cannot be used (damaged, truncated, not an image, a label labels.txt does
    not list) is listed in ``skipped`` under its :func:`record_ref`, as an
    unusable photo is. Items are ordered by label and ``image/filename``, as a
    photo folder's are by path, so the same photos give the same model either way.

    Raises:
        FloristError: no records, no ``labels.txt``, a file that is not a TFRecord file.
    """
    path = Path(path)
    refs, skipped = _framed(_splits_of(path))
    classes = record_classes(path if path.is_dir() else path.parent)
    checked, bad, order = _checked(refs, classes, max_pixels, workers, progress)
    skipped += bad
    if None in refs:
        ds = Dataset(classes, checked[None], skipped)
        prepared = split_dataset(ds, eval_fraction=eval_fraction, train_per_class=train_per_class, seed=seed)
    else:
        prepared = Prepared(classes, checked["train"], checked["eval"], skipped)
        if train_per_class is not None:
            prepared.warnings.append(f"--train-per-class ignored: the split comes from the record files in {path}")
    for part in (prepared.train, prepared.eval):
        part.sort(key=order)
    return prepared


def scan_record_data(
    path: str | Path, classes: Sequence[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None
) -> Dataset:
    """Records to evaluate a model on, labelled in the model's ``classes``: what :func:`florist.data.scan` is for photos.

    A folder split by file names gives its ``eval*`` files; otherwise every record is used.

    Raises:
        FloristError: as :func:`prepare_records`, and a class in ``labels.txt`` the model does not know.
    """
    path = Path(path)
    by_split = _splits_of(path)
    split = "eval" if "eval" in by_split else None
    refs, skipped = _framed({split: by_split[split]})
    own = record_classes(path if path.is_dir() else path.parent)
    unknown = [c for c in own if c not in classes]
    if unknown:
        raise FloristError(
            f"classes in {path}'s labels.txt not known to the model: {', '.join(map(repr, unknown))}; "
            f"known classes: {', '.join(map(repr, classes))}"
        )
    checked, bad, order = _checked(refs, own, max_pixels, workers, None)
    index = [list(classes).index(c) for c in own]
    items = [replace(it, label=index[it.label]) for it in sorted(checked[split], key=order)]
    return Dataset(list(classes), items, skipped + bad)


def _framed(by_split: Mapping[str | None, Sequence[Path]]) -> tuple[dict[str | None, list[str]], list[Skipped]]:
    """Refs of each split's whole records, and a skip for each file's unreadable tail (see :func:`_file_records`)."""
    refs: dict[str | None, list[str]] = {}
    skipped: list[Skipped] = []
    for split, files in by_split.items():
        refs[split], tails = _file_records(files)
        skipped += tails
    return refs, skipped


def _checked(
    refs: Mapping[str | None, Sequence[str]],
    classes: Sequence[str],
    max_pixels: int,
    workers: int | None,
    progress: ProgressFn | None,
) -> tuple[dict[str | None, list[Item]], list[Skipped], Callable[[Item], tuple]]:
    """The usable records of each split, the skipped ones (all checked in one pass), and their order.

    The order (a sort key) is by label and ``image/filename``, as a photo folder's
    is by path, so the same photos give the same model either way.
    """
    every = [ref for split_refs in refs.values() for ref in split_refs]
    results = dict(zip(every, check_all(lambda ref: _check_record(ref, classes, max_pixels), every, workers, progress)))
    skipped = [Skipped(ref, str(r)) for ref, r in results.items() if isinstance(r, BadImage)]
    good = {ref: r for ref, r in results.items() if not isinstance(r, BadImage)}
    checked = {split: [Item(ref, good[ref][0], good[ref][2]) for ref in rs if ref in good] for split, rs in refs.items()}
    return checked, skipped, lambda it: (it.label, good[it.path][1], it.path)
