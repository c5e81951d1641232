"""TFRecord interchange: the record format against its spec, round trips, corruption, training on records."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import images as im
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import florist
from florist import FloristError
from florist.cli import app
from florist.data import BadImage, prepare, read_manifest
from florist.tfrecord import (
    ImageRecord,
    decode_example,
    encode_example,
    is_record_data,
    masked_crc32c,
    prepare_records,
    prepare_tfrecords,
    read_image_bytes,
    read_tfrecords,
    record_offsets,
    record_ref,
    scan_record_data,
    write_record,
)

runner = CliRunner()


# ---------------------------------------------------------------------------
# An independent reference of the format, written from the spec
# ---------------------------------------------------------------------------


def crc32c_reference(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): slow, obviously correct."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def framed(data: bytes) -> bytes:
    """One record: uint64 length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", mask(crc32c_reference(length))) + data + struct.pack(
        "<I", mask(crc32c_reference(data))
    )


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def example_bytes(features: dict[str, bytes]) -> bytes:
    """tf.train.Example{features{feature: map<name, Feature>}} from already-encoded Feature messages."""
    entries = b"".join(field(1, field(1, k.encode()) + field(2, v)) for k, v in sorted(features.items()))
    return field(1, entries)


def int64_feature(*values: int, packed: bool = True) -> bytes:
    if packed:
        return field(3, field(1, b"".join(varint(v) for v in values)))
    return field(3, b"".join(varint(1 << 3 | 0) + varint(v) for v in values))


def bytes_feature(*values: bytes) -> bytes:
    return field(1, b"".join(field(1, v) for v in values))


def image_example(image: bytes, label: int, text: str = "", filename: str = "x.jpg") -> bytes:
    features = {"image/encoded": bytes_feature(image), "image/class/label": int64_feature(label)}
    if text:
        features["image/class/text"] = bytes_feature(text.encode())
    features["image/filename"] = bytes_feature(filename.encode())
    return example_bytes(features)


def write_records(path: Path, payloads: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(framed(p) for p in payloads))
    return path


# ---------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------


def test_crc_is_crc32c_masked_as_the_spec_says() -> None:
    assert crc32c_reference(b"123456789") == 0xE3069283  # the published CRC-32C check value
    for data in (b"", b"123456789", bytes(range(256)) * 3):
        assert masked_crc32c(data) == mask(crc32c_reference(data))


def test_written_records_are_framed_byte_for_byte_as_specified(tmp_path: Path) -> None:
    payloads = [b"", b"a", bytes(range(256)) * 5]
    with open(tmp_path / "x.tfrecord", "wb") as f:
        for p in payloads:
            write_record(f, p)
    assert (tmp_path / "x.tfrecord").read_bytes() == b"".join(framed(p) for p in payloads)
    assert record_offsets(tmp_path / "x.tfrecord") == [0, 16, 33]


def test_example_encoding_matches_the_protobuf_wire_format() -> None:
    encoded = encode_example({"image/class/label": 300, "image/encoded": b"\xff\xd8", "name": "é"})
    expected = example_bytes(
        {
            "image/class/label": int64_feature(300),
            "image/encoded": bytes_feature(b"\xff\xd8"),
            "name": bytes_feature("é".encode()),
        }
    )
    assert encoded == expected
    floats = encode_example({"f": [0.5, -2.0]})
    assert floats == example_bytes({"f": field(2, field(1, struct.pack("<2f", 0.5, -2.0)))})


def test_examples_written_elsewhere_decode_packed_or_not() -> None:
    for packed in (True, False):
        data = example_bytes({"n": int64_feature(1, 2, 300, packed=packed), "b": bytes_feature(b"x", b"")})
        assert decode_example(data) == {"n": [1, 2, 300], "b": [b"x", b""]}


# ---------------------------------------------------------------------------
# prepare --format tfrecord: round trip
# ---------------------------------------------------------------------------


@pytest.fixture
def mixed_photos(photos: Path, tmp_path: Path) -> Path:
    """The colour photos plus a PNG and an EXIF-rotated JPEG (stored 64x32, shown 32x64)."""
    root = shutil.copytree(photos, tmp_path / "photos")
    im.make_image(root / "blue" / "sub" / "extra.png", size=(30, 20), color=(20, 20, 230), fmt="PNG")
    im.write_exif_rotated_jpeg(root / "red" / "rotated.jpg", size=(64, 32), left=(230, 0, 0), right=(200, 20, 20))
    return root


def test_round_trip_keeps_every_field_and_the_original_bytes(mixed_photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    prepared = prepare_tfrecords(mixed_photos, out, shards=3, eval_fraction=0.25)
    assert sorted(p.name for p in out.glob("*.tfrecord")) == [
        *(f"eval-0000{k}-of-00003.tfrecord" for k in range(3)),
        *(f"train-0000{k}-of-00003.tfrecord" for k in range(3)),
    ]
    classes = (out / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert classes == ["blue", "green", "red"]
    records = list(read_tfrecords(out))
    assert len(records) == 26 == len(prepared.train) + len(prepared.eval)
    assert sorted(r.filename for r in records) == sorted(
        p.relative_to(mixed_photos).as_posix() for p in mixed_photos.rglob("*.*")
    )
    for r in records:
        source = mixed_photos / r.filename
        assert r.image == source.read_bytes()
        assert r.text == classes[r.label] == Path(r.filename).parts[0]
        with Image.open(source) as img:
            assert (r.width, r.height) == img.size  # as stored: EXIF rotation is the reader's business
            assert r.format == img.format.lower()
    by_name = {r.filename: r for r in records}
    assert by_name["red/rotated.jpg"].width == 64 and by_name["red/rotated.jpg"].height == 32
    assert by_name["blue/sub/extra.png"].format == "png"


def test_records_are_mixed_across_shards_and_old_shards_removed(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    prepare_tfrecords(photos, out, shards=2, eval_fraction=0.25)
    first = [r.label for r in read_tfrecords(out / "train-00000-of-00002.tfrecord")]
    assert len(set(first)) > 1  # shuffled before sharding, not one class per file
    prepare_tfrecords(photos, out, eval_fraction=0.25)
    assert sorted(p.name for p in out.iterdir()) == ["eval.tfrecord", "labels.txt", "skipped.csv", "train.tfrecord"]
    assert len(list(read_tfrecords(out))) == 24


# ---------------------------------------------------------------------------
# Corruption and bad records
# ---------------------------------------------------------------------------


@pytest.fixture
def three_records(tmp_path: Path) -> Path:
    image = im.encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")
    folder = tmp_path / "data"
    (folder).mkdir()
    (folder / "labels.txt").write_text("red\nblue\n")
    return write_records(folder / "all.tfrecord", [image_example(image, i % 2, filename=f"{i}.png") for i in range(3)])


def test_corrupt_data_names_the_file_and_the_record_offset(three_records: Path) -> None:
    raw = bytearray(three_records.read_bytes())
    second = record_offsets(three_records)[1]
    raw[second + 12 + 5] ^= 0x01  # one bit inside the second record's data
    three_records.write_bytes(bytes(raw))
    with pytest.raises(FloristError, match=rf"all\.tfrecord: corrupt record at byte {second} \(data checksum"):
        list(read_tfrecords(three_records))
    ds = scan_record_data(three_records, ["red", "blue"])  # preparing data: that record is a reported skip
    assert [(s.path, s.reason) for s in ds.skipped] == [
        (record_ref(three_records, second), f"corrupt record at byte {second} (data checksum mismatch)")
    ]
    assert [it.path for it in ds.items] == [record_ref(three_records, o) for o in record_offsets(three_records)[::2]]
    with pytest.raises(BadImage, match=f"byte {second}"):  # during feature extraction: that image is skipped
        read_image_bytes(record_ref(three_records, second))


def test_corrupt_length_and_truncation_are_reported(three_records: Path) -> None:
    raw = three_records.read_bytes()
    first, second, third = record_offsets(three_records)
    three_records.write_bytes(raw[:second] + bytes([raw[second] ^ 0x40]) + raw[second + 1 :])
    with pytest.raises(FloristError, match=f"corrupt record at byte {second} \\(length checksum"):
        record_offsets(three_records)
    ds = scan_record_data(three_records, ["red", "blue"])
    assert [it.path for it in ds.items] == [record_ref(three_records, first)]
    assert [(s.path, s.reason) for s in ds.skipped] == [
        (record_ref(three_records, second), f"corrupt record at byte {second} (length checksum mismatch); nothing after it can be read")
    ]
    three_records.write_bytes(raw[:-3])
    with pytest.raises(FloristError, match=f"truncated record at byte {third} \\(file ends at byte {len(raw) - 3}"):
        list(read_tfrecords(three_records))
    ds = scan_record_data(three_records, ["red", "blue"])
    assert len(ds.items) == 2
    assert [s.reason for s in ds.skipped] == [
        f"truncated record at byte {third} (file ends at byte {len(raw) - 3}); nothing after it can be read"
    ]


def test_a_file_that_is_not_a_tfrecord_says_so(tmp_path: Path) -> None:
    jpeg = im.make_image(tmp_path / "photo.jpg")
    with pytest.raises(FloristError, match="photo.jpg: .* at byte 0 .*is it a TFRecord file"):
        prepare_records(jpeg)


def test_records_that_disagree_with_labels_txt_are_skipped(three_records: Path) -> None:
    image = im.encode(Image.new("RGB", (8, 8)), "PNG")
    folder = three_records.parent
    write_records(
        three_records,
        [image_example(image, 0, "red"), image_example(image, 2, filename="z.png"), image_example(image, 1, "red")],
    )
    _, unknown, mismatch = record_offsets(three_records)
    ds = scan_record_data(folder, ["red", "blue"])
    assert len(ds.items) == 1
    assert [(s.path, s.reason) for s in ds.skipped] == [
        (record_ref(three_records, unknown), "label 2 is not in labels.txt, which lists 2 classes (0-based)"),
        (record_ref(three_records, mismatch), "label 1 is 'blue' in labels.txt but image/class/text is 'red'"),
    ]
    (folder / "labels.txt").unlink()
    with pytest.raises(FloristError, match="no labels.txt next to the TFRecord files"):
        prepare_records(folder)


def test_a_record_without_an_image_or_with_a_bad_one_is_skipped(three_records: Path) -> None:
    good = [image_example(im.encode(Image.new("RGB", (8, 8), c), "PNG"), i % 2) for i, c in enumerate(["red", "green", "blue", "black"])]
    write_records(three_records, [image_example(b"not an image", 0), example_bytes({"image/class/label": int64_feature(0)}), *good])
    first, second = record_offsets(three_records)[:2]
    prepared = prepare_records(three_records, eval_fraction=0.5)
    assert [(s.path, s.reason) for s in prepared.skipped] == [
        (record_ref(three_records, first), "not an image (unrecognised content)"),
        (record_ref(three_records, second), "no single bytes feature 'image/encoded'"),
    ]
    assert len(prepared.train) == 2 and len(prepared.eval) == 2
    with pytest.raises(FloristError, match=f"record at byte {second}: no single bytes feature 'image/encoded'"):
        list(read_tfrecords(three_records))


def test_split_needs_train_and_eval_names_or_none(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "records"
    prepare_tfrecords(photos, out)
    shutil.copy(out / "train.tfrecord", out / "more.tfrecord")
    with pytest.raises(FloristError, match="cannot tell which split more.tfrecord belongs to"):
        prepare_records(out)
    assert is_record_data(out) and is_record_data(out / "train.tfrecord") and not is_record_data(photos)


# ---------------------------------------------------------------------------
# Training on records
# ---------------------------------------------------------------------------


def _shas(path: Path) -> set[str]:
    return {it.sha256 for it in read_manifest(path, ["blue", "green", "red"])}


def test_single_file_is_split_like_the_photo_folder(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    prepare_tfrecords(photos, out, eval_fraction=0)  # every photo in train.tfrecord
    from_records = prepare_records(out / "train.tfrecord", eval_fraction=0.25, seed=3)
    from_folder = prepare(photos, eval_fraction=0.25, seed=3)
    for a, b in ((from_records.train, from_folder.train), (from_records.eval, from_folder.eval)):
        assert [(it.label, it.sha256) for it in a] == [(it.label, it.sha256) for it in b]


def test_training_on_records_matches_the_folder_route(
    photos: Path, trained_run: Path, tmp_path: Path, tiny: dict[str, str]
) -> None:
    """Same photos, same split and seed: same eval images, same top-1, the same weights."""
    records, run = tmp_path / "records", tmp_path / "run"
    prepare_tfrecords(photos, records, shards=2, eval_fraction=0.25)
    # as trained_run: same photos, backbone, epochs, eval_fraction
    florist.train(records, run, epochs=10, mode="head", **tiny)
    folder_metrics = json.loads((trained_run / "metrics.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert _shas(run / "eval.csv") == _shas(trained_run / "eval.csv")
    assert _shas(run / "train.csv") == _shas(trained_run / "train.csv")
    assert metrics["top1"] == folder_metrics["top1"] == 1.0
    assert metrics["n_train"] == 18 and metrics["n_eval"] == 6
    ours, theirs = load_file(run / "model.safetensors"), load_file(trained_run / "model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert florist.evaluate(run)["top1"] == 1.0  # eval.csv names records; evaluate reads them back


# ---------------------------------------------------------------------------
# The original TensorFlow project's layout: raw pixels, <name> <index> labels
# ---------------------------------------------------------------------------


def raw_example(image: Image.Image, label: int, pixels: bytes | None = None) -> bytes:
    """A record as the original project's ``pre_input.py`` wrote it: raw RGB bytes, height, width, label.

    ``pixels`` replaces the image's bytes (a record whose size disagrees with its height and width).
    """
    rgb = image.convert("RGB")
    return example_bytes(
        {
            "image": bytes_feature(rgb.tobytes() if pixels is None else pixels),  # row-major H x W x 3, no encoding
            "image/height": int64_feature(rgb.height),
            "image/width": int64_feature(rgb.width),
            "label": int64_feature(label),
        }
    )


def write_original_layout(photos: Path, out: Path, eval_fraction: float = 0.25) -> Path:
    """florist's split of ``photos`` as ``training_set.tfrecord``, ``eval_set.tfrecord`` and ``labels.txt``."""
    prepared = prepare(photos, eval_fraction=eval_fraction)
    out.mkdir(parents=True)
    # "<class name> <index> " lines, not in index order, so the indices must be read, not the line numbers
    order = sorted(range(len(prepared.classes)), reverse=True)
    (out / "labels.txt").write_text("".join(f"{prepared.classes[i]} {i} \n" for i in order))
    for name, items in (("training_set", prepared.train), ("eval_set", prepared.eval)):
        write_records(out / f"{name}.tfrecord", [raw_example(Image.open(it.path), it.label) for it in items])
    return out


def test_the_original_projects_records_train_and_evaluate_like_the_photos(
    photos: Path, trained_run: Path, tmp_path: Path, tiny: dict[str, str]
) -> None:
    records, run = write_original_layout(photos, tmp_path / "original"), tmp_path / "run"
    prepared = prepare_records(records)
    assert prepared.classes == ["blue", "green", "red"] and not prepared.skipped
    assert (len(prepared.train), len(prepared.eval)) == (18, 6)
    first = next(read_tfrecords(records / "eval_set.tfrecord"))
    assert first.format == "raw" and Image.open(io.BytesIO(first.image)).size == (first.width, first.height)
    florist.train(records, run, epochs=10, mode="head", **tiny)  # as trained_run, from the JPEGs
    metrics = json.loads((run / "metrics.json").read_text())
    folder_metrics = json.loads((trained_run / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_eval"]) == (folder_metrics["n_train"], folder_metrics["n_eval"])
    assert abs(metrics["top1"] - folder_metrics["top1"]) <= 0.005
    assert florist.evaluate(run)["top1"] == metrics["top1"]
    on_records = florist.evaluate(trained_run, records)  # a JPEG-trained model on the records' eval_set
    assert on_records["n"] == 6 and abs(on_records["top1"] - folder_metrics["top1"]) <= 0.005


def test_bad_raw_records_are_reported_skips(photos: Path, tmp_path: Path, tiny: dict[str, str]) -> None:
    records = write_original_layout(photos, tmp_path / "original")
    train_file = records / "training_set.tfrecord"
    good = Image.open(next((photos / "red").iterdir()))
    rgb = good.convert("RGB")
    short = raw_example(good, 2, pixels=rgb.tobytes()[:-1])
    raw = train_file.read_bytes()
    wrong_size, unknown = len(raw), len(raw) + len(framed(short))
    train_file.write_bytes(raw + framed(short) + framed(raw_example(good, 7)) + framed(raw_example(good, 2))[:-5])
    truncated = unknown + len(framed(raw_example(good, 7)))
    prepared = prepare_records(records)
    assert [(s.path, s.reason) for s in prepared.skipped] == [
        (
            record_ref(train_file, truncated),
            f"truncated record at byte {truncated} (file ends at byte {train_file.stat().st_size}); "
            "nothing after it can be read",
        ),
        (
            record_ref(train_file, wrong_size),
            f"raw pixels of {rgb.width * rgb.height * 3 - 1} bytes do not fill image/height x image/width x 3 = "
            f"{rgb.height} x {rgb.width} x 3 = {rgb.width * rgb.height * 3} bytes",
        ),
        (record_ref(train_file, unknown), "label 7 is not in labels.txt, which lists 3 classes (0-based)"),
    ]
    assert (len(prepared.train), len(prepared.eval)) == (18, 6)
    florist.train(records, tmp_path / "run", epochs=2, mode="head", **tiny)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_skipped"] == 3


def test_cli_prepare_tfrecord(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    result = runner.invoke(app, ["prepare", str(photos), "--out", str(out), "--format", "tfrecord", "--shards", "2"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("train-0000?-of-00002.tfrecord"))) == 2
    assert sum(1 for _ in read_tfrecords(out)) == 24
    for args, message in (
        (["--format", "zip"], "--format must be one of csv, tfrecord"),
        (["--shards", "2"], "--shards applies to --format tfrecord"),
        (["--format", "tfrecord", "--shards", "0"], "--shards must be >= 1"),
    ):
        result = runner.invoke(app, ["prepare", str(photos), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_cli_train_on_a_file_that_is_not_a_tfrecord_is_one_line(tmp_path: Path, tiny_cli: list[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.txt").write_text("red\nblue\n")
    im.make_image(tmp_path / "photo.jpg").rename(data / "all.tfrecord")
    result = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), "--quiet", *tiny_cli])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "all.tfrecord: truncated record at byte 0" in result.output or "all.tfrecord: corrupt record at byte 0" in result.output
    assert "is it a TFRecord file?" in result.output


def test_image_record_encodes_the_standard_feature_names() -> None:
    record = ImageRecord(b"\x89PNG", 1, "roses", "roses/a.png", 3, 4, "png")
    assert decode_example(record.to_example()) == {
        "image/encoded": [b"\x89PNG"],
        "image/format": [b"png"],
        "image/height": [3],
        "image/width": [4],
        "image/class/label": [1],
        "image/class/text": [b"roses"],
        "image/filename": [b"roses/a.png"],
    }
