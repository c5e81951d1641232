"""Stage 1 (prepare): scanning, validating, decoding, splitting and the manifests.

All images are generated with Pillow in ``tmp_path`` (see ``tests/images.py``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import resource
import shutil
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import images as im  # tests/images.py (pytest puts tests/ on sys.path)
import pytest
from PIL import Image

from florist.data import (
    BadImage,
    Dataset,
    Item,
    check_file,
    decode_image,
    drop_small_classes,
    iter_paths,
    load_image,
    prepare,
    read_labels,
    read_manifest,
    scan,
    split,
)
from florist.errors import FloristError

RED = (220, 20, 20)
BLUE = (20, 20, 220)
TWO = {"red": RED, "blue": BLUE}

REAL_FLOWERS = Path(__file__).resolve().parents[2] / "shared/data/flower_photos"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def near(pixel, expected, tol: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def prepare_with(tmp_path: Path, add_bad) -> tuple:
    """Two good classes plus whatever ``add_bad(red_folder)`` writes.

    Returns (prepared, rows of skipped.csv, root).
    """
    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    add_bad(root / "red")
    out = tmp_path / "run"
    prepared = prepare(root, out, eval_fraction=0.25)
    return prepared, read_rows(out / "skipped.csv"), root


def only_skip(prepared, rows, path: Path) -> str:
    """Assert ``path`` is the one skipped file (in the result and in skipped.csv); return its reason."""
    assert [s.path for s in prepared.skipped] == [str(path)]
    assert rows == [{"path": str(path), "reason": prepared.skipped[0].reason}]
    assert str(path) not in {it.path for it in prepared.train + prepared.eval}
    # the good images were all kept
    assert len(prepared.train) + len(prepared.eval) == 8
    return prepared.skipped[0].reason.lower()


def items_for(counts: dict[str, int], dup_groups: dict[str, list[int]] | None = None) -> Dataset:
    """An in-memory dataset (no files) with ``counts[c]`` items per class; fake but distinct hashes.

    ``dup_groups[c]`` lists group sizes of identical content to add to class ``c``.
    """
    classes = list(counts)
    items = []
    for label, name in enumerate(classes):
        for i in range(counts[name]):
            items.append(Item(f"{name}/{i:03d}.jpg", label, f"{name}-{i}"))
        for g, size in enumerate((dup_groups or {}).get(name, [])):
            for j in range(size):
                items.append(Item(f"{name}/dup{g}_{j}.jpg", label, f"{name}-dup{g}"))
    return Dataset(classes, items)


# ---------------------------------------------------------------------------
# bad files are skipped with a reason
# ---------------------------------------------------------------------------


def test_truncated_jpeg_is_skipped_as_corrupt(tmp_path):
    bad = []
    prepared, rows, _ = prepare_with(tmp_path, lambda d: bad.append(im.write_truncated_jpeg(d / "cut.jpg")))
    reason = only_skip(prepared, rows, bad[0])
    assert "corrupt" in reason or "truncated" in reason


@pytest.mark.parametrize("keep", [0.02, 0.3, 0.6, 0.95])
def test_truncated_jpeg_at_any_point_raises_bad_image(tmp_path, keep):
    path = im.write_truncated_jpeg(tmp_path / "cut.jpg", keep=keep)
    with pytest.raises(BadImage, match=r"(?i)corrupt|truncated|not an image"):
        load_image(path)


def test_zero_byte_file_is_skipped(tmp_path):
    bad = []
    prepared, rows, _ = prepare_with(tmp_path, lambda d: bad.append(im.write_zero_byte(d / "empty.jpg")))
    reason = only_skip(prepared, rows, bad[0])
    assert "empty" in reason and "0 bytes" in reason


def test_shell_script_is_skipped_as_not_an_image(tmp_path):
    bad = []
    prepared, rows, _ = prepare_with(tmp_path, lambda d: bad.append(im.write_text_file(d / "install.sh")))
    assert "not an image" in only_skip(prepared, rows, bad[0])


def test_txt_file_in_class_folder_is_skipped(tmp_path):
    bad = []
    prepared, rows, _ = prepare_with(
        tmp_path, lambda d: bad.append(im.write_text_file(d / "notes.txt", "photos from grandma's garden\n"))
    )
    assert "not an image" in only_skip(prepared, rows, bad[0])


def test_hidden_files_and_folders_are_ignored_entirely(tmp_path):
    def add(d: Path) -> None:
        im.write_ds_store(d)
        im.make_image(d / ".thumbs" / "t.jpg", size=im.SMALL)  # hidden sub-folder
        im.make_image(d / "._img_00.jpg", size=im.SMALL)  # AppleDouble file

    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    add(root / "red")
    im.make_image(root / ".cache" / "x.jpg", size=im.SMALL)  # hidden "class" folder
    prepared = prepare(root, tmp_path / "run", eval_fraction=0.25)
    assert prepared.classes == ["blue", "red"]
    assert prepared.skipped == []
    assert read_rows(tmp_path / "run" / "skipped.csv") == []
    all_paths = {it.path for it in prepared.train + prepared.eval}
    assert len(all_paths) == 8 and not any("/." in p for p in all_paths)


def test_bmp_with_jpg_extension_is_accepted_by_content(tmp_path):
    path = im.write_bmp_as_jpg(tmp_path / "photos" / "red" / "really_a_bmp.jpg", color=(10, 200, 30))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == im.SMALL
    assert img.getpixel((5, 5)) == (10, 200, 30)  # BMP is lossless: exact pixels
    im.make_class_folders(tmp_path / "photos", TWO, n=4)
    prepared = prepare(tmp_path / "photos", eval_fraction=0.25)
    assert prepared.skipped == []
    assert str(path) in {it.path for it in prepared.train + prepared.eval}


def test_unsupported_format_is_skipped(tmp_path):
    bad = []
    prepared, rows, _ = prepare_with(
        tmp_path, lambda d: bad.append(im.make_image(d / "scan.jpg", size=im.SMALL, fmt="TIFF"))
    )
    assert "unsupported image format tiff" in only_skip(prepared, rows, bad[0])


def test_unreadable_file_is_skipped_with_permission_denied(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    locked = im.make_image(root / "red" / "locked.jpg", size=im.SMALL)
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    with mock.patch.object(Path, "read_bytes", autospec=True, side_effect=read_bytes):
        prepared = prepare(root, tmp_path / "run", eval_fraction=0.25)
    rows = read_rows(tmp_path / "run" / "skipped.csv")
    assert only_skip(prepared, rows, locked) == "permission denied"


def test_dangling_symlink_is_skipped(tmp_path):
    bad = []
    prepared, rows, _ = prepare_with(tmp_path, lambda d: bad.append(im.make_dangling_symlink(d / "gone.jpg")))
    reason = only_skip(prepared, rows, bad[0])
    assert "not found" in reason and "link" in reason


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: (d / "a.jpg").symlink_to("b.jpg") or (d / "b.jpg").symlink_to("a.jpg"), "symbolic link loop"),
        (lambda d: (d / "a.jpg").symlink_to("a.jpg"), "symbolic link loop"),
        (lambda d: (d / "a.jpg").symlink_to("."), "symbolic link to a folder (not followed)"),
    ],
)
def test_link_loops_and_links_to_folders_are_reported_not_followed(tmp_path, make, reason):
    """A link back to the class folder would loop (or count images twice): reported once, never followed."""
    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    make(root / "red")
    prepared = prepare(root, eval_fraction=0.25)
    links = sorted(str(p) for p in (root / "red").iterdir() if p.is_symlink())
    assert sorted(s.path for s in prepared.skipped) == links
    assert {s.reason for s in prepared.skipped} == {reason}
    assert len(prepared.train) + len(prepared.eval) == 8


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path):
    """Its images are not silently lost (as root every folder can be listed, so listing is made to fail)."""
    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    locked = root / "red" / "locked"
    im.make_image(locked / "inside.jpg", size=im.SMALL)
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    with mock.patch("os.scandir", scandir):
        prepared = prepare(root, eval_fraction=0.25)
    assert [(s.path, s.reason) for s in prepared.skipped] == [
        (str(locked), "folder that cannot be listed (permission denied?)")
    ]
    assert len(prepared.train) + len(prepared.eval) == 8


def test_fifo_is_skipped_without_blocking(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    fifo = im.make_fifo(root / "red" / "pipe.jpg")
    result: dict = {}

    def run() -> None:
        result["prepared"] = prepare(root, tmp_path / "run", eval_fraction=0.25)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "prepare blocked on a FIFO"
    rows = read_rows(tmp_path / "run" / "skipped.csv")
    assert only_skip(result["prepared"], rows, fifo) == "not a regular file"


# ---------------------------------------------------------------------------
# decoding odd-but-valid images to RGB
# ---------------------------------------------------------------------------


def test_png_with_alpha_composites_onto_white(tmp_path):
    img = load_image(im.write_png_with_alpha(tmp_path / "a.png", size=(30, 10)))
    assert img.mode == "RGB" and img.size == (30, 10)
    assert img.getpixel((2, 5)) == (255, 255, 255)  # fully transparent -> white, not black or red
    assert near(img.getpixel((15, 5)), (127, 127, 127), tol=1)  # 50% black over white
    assert img.getpixel((25, 5)) == (0, 0, 255)  # opaque stays as is


def test_palette_gif_decodes_to_its_colours(tmp_path):
    img = load_image(im.write_palette_gif(tmp_path / "p.gif", left=(255, 0, 0), right=(0, 0, 255)))
    assert img.mode == "RGB" and img.size == im.SMALL
    assert img.getpixel((2, 2)) == (255, 0, 0)
    assert img.getpixel((30, 20)) == (0, 0, 255)


def test_palette_png_with_transparency_composites_onto_white(tmp_path):
    path = im.write_palette_png_transparent(tmp_path / "p.png", left=(0, 255, 0), right=(0, 0, 255))
    assert Image.open(path).mode == "P"
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (255, 255, 255)  # transparent palette entry -> white, not green
    assert img.getpixel((30, 20)) == (0, 0, 255)


def test_grayscale_image_becomes_grey_rgb(tmp_path):
    img = load_image(im.write_grayscale(tmp_path / "g.png", value=100))
    assert img.mode == "RGB" and img.size == im.SMALL
    assert img.getpixel((3, 3)) == (100, 100, 100)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = im.write_cmyk_jpeg(tmp_path / "c.jpg", cmyk=(0, 255, 255, 0))
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == im.SMALL
    assert near(img.getpixel((10, 10)), (255, 0, 0))


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    path = im.write_png16(tmp_path / "16.png", value=32896)
    assert Image.open(path).mode == "I;16"
    img = load_image(path)
    assert img.mode == "RGB"
    assert near(img.getpixel((4, 4)), (128, 128, 128), tol=1)  # 32896 / 257 = 128, not clipped to 255


@pytest.mark.parametrize(
    "orientation, top, bottom", [(6, (255, 0, 0), (0, 0, 255)), (8, (0, 0, 255), (255, 0, 0))]
)
def test_exif_rotated_jpeg_is_turned_upright(tmp_path, orientation, top, bottom):
    path = im.write_exif_rotated_jpeg(tmp_path / "r.jpg", size=(64, 32), orientation=orientation)
    assert Image.open(path).size == (64, 32)
    img = load_image(path)
    assert img.size == (32, 64)  # transposed
    assert near(img.getpixel((16, 4)), top, tol=20)
    assert near(img.getpixel((16, 60)), bottom, tol=20)
    # the reduced-size (draft) decode used while scanning is turned upright too
    w, h = decode_image(path.read_bytes(), draft_size=8).size
    assert h == 2 * w and w >= 8


def test_every_decoded_mode_is_rgb(tmp_path):
    writers = [
        im.write_png_with_alpha,
        im.write_palette_gif,
        im.write_palette_png_transparent,
        im.write_grayscale,
        im.write_cmyk_jpeg,
        im.write_png16,
        im.write_exif_rotated_jpeg,
        im.write_bmp_as_jpg,
    ]
    for i, writer in enumerate(writers):
        path = writer(tmp_path / f"f{i}")
        img = load_image(path)
        assert img.mode == "RGB", writer.__name__
        # and it goes through the scanner too
        assert len(check_file(path)) == 64


# ---------------------------------------------------------------------------
# pixel limits
# ---------------------------------------------------------------------------


def test_huge_png_header_is_refused_quickly_without_allocating(tmp_path):
    bad = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    prepared, rows, _ = prepare_with(tmp_path, lambda d: bad.append(im.write_huge_png_header(d / "bomb.png")))
    elapsed = time.perf_counter() - start
    rss_grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert bad[0].stat().st_size < 200  # it really is a tiny file
    assert "too many pixels" in only_skip(prepared, rows, bad[0])
    assert elapsed < 5
    assert rss_grew_mib < 200  # decoding 30000x30000 RGB would need ~2.5 GiB


def test_huge_header_below_pillows_own_limit_is_refused_by_max_pixels(tmp_path):
    path = im.write_huge_png_header(tmp_path / "big.png", width=4000, height=3000)
    with pytest.raises(BadImage, match=r"too many pixels \(4000x3000 > 1000000 limit\)"):
        load_image(path, max_pixels=1_000_000)


def test_max_pixels_refuses_a_small_image(tmp_path):
    data = (im.make_image(tmp_path / "s.png", size=(20, 20), fmt="PNG")).read_bytes()
    with pytest.raises(BadImage, match="too many pixels"):
        decode_image(data, max_pixels=100)
    assert decode_image(data, max_pixels=400).size == (20, 20)  # exactly at the limit is fine


@pytest.mark.parametrize("size", [(51, 1), (1, 200), (5_000_000, 1)])
def test_extreme_aspect_ratio_is_refused_before_decoding(size):
    """Preprocessing scales the short side up: a 5000000x1 line would need terabytes."""
    data = im.encode(Image.new("L", size), "PNG")
    start = time.perf_counter()
    with pytest.raises(BadImage, match=rf"extreme aspect ratio \({size[0]}x{size[1]}; the limit is 50:1\)"):
        decode_image(data)
    assert time.perf_counter() - start < 5


def test_aspect_ratio_up_to_the_limit_is_fine():
    assert decode_image(im.encode(Image.new("RGB", (50, 1)), "PNG")).size == (50, 1)
    assert decode_image(im.encode(Image.new("RGB", (1, 1)), "PNG")).size == (1, 1)


def test_max_pixels_is_applied_by_prepare(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=3, size=(10, 10))
    big = im.make_image(root / "red" / "big.jpg", size=(40, 40))
    prepared = prepare(root, eval_fraction=0.25, max_pixels=100)
    assert [s.path for s in prepared.skipped] == [str(big)]
    assert "too many pixels" in prepared.skipped[0].reason


def test_parallel_decoding_leaves_global_warning_filters_alone(tmp_path):
    """Decoding runs in threads; it must not leave process-wide warning filters changed."""
    data = im.encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    before = list(warnings.filters)
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: decode_image(data), range(300)))
        assert warnings.filters == before


# ---------------------------------------------------------------------------
# folders and classes
# ---------------------------------------------------------------------------


def test_empty_class_folder_is_dropped_with_a_warning(tmp_path):
    colours = {"red": RED, "blue": BLUE, "green": (0, 200, 0)}
    root = im.make_class_folders(tmp_path / "photos", colours, n={"red": 4, "blue": 4, "green": 0})
    prepared = prepare(root, tmp_path / "run", eval_fraction=0.25)
    assert prepared.classes == ["blue", "red"]
    assert len(prepared.warnings) == 1 and "'green'" in prepared.warnings[0]
    assert "0 valid image" in prepared.warnings[0]
    assert read_labels(tmp_path / "run") == ["blue", "red"]
    assert len(prepared.train) == 6 and len(prepared.eval) == 2


def test_class_whose_files_are_all_bad_is_dropped(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    im.write_text_file(root / "junk" / "a.txt")
    im.write_zero_byte(root / "junk" / "b.jpg")
    prepared = prepare(root, eval_fraction=0.25)
    assert prepared.classes == ["blue", "red"]
    assert any("'junk'" in w for w in prepared.warnings)
    assert len(prepared.skipped) == 2


def test_single_class_is_an_error(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", {"red": RED}, n=4)
    with pytest.raises(FloristError, match="need at least 2 classes"):
        prepare(root)


def test_two_folders_but_one_empty_is_an_error(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n={"red": 4, "blue": 0})
    with pytest.raises(FloristError, match=r"need at least 2 classes.*found 1 \('red'\)"):
        prepare(root)


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(FloristError, match="not found"):
        prepare(tmp_path / "nope")


def test_data_dir_that_is_a_file_is_an_error(tmp_path):
    f = im.make_image(tmp_path / "photo.jpg", size=im.SMALL)
    with pytest.raises(FloristError, match="not a folder"):
        prepare(f)


def test_data_dir_without_class_folders_is_an_error(tmp_path):
    im.make_image(tmp_path / "photos" / "loose.jpg", size=im.SMALL)
    with pytest.raises(FloristError, match="no class folders"):
        prepare(tmp_path / "photos")


def test_images_in_sub_folders_of_a_class_are_found(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    nested = im.make_image(root / "red" / "2023" / "summer" / "deep.png", size=im.SMALL, fmt="PNG")
    ds = scan(root)
    digest = hashlib.sha256(nested.read_bytes()).hexdigest()
    assert Item(str(nested), ds.classes.index("red"), digest) in ds.items


def test_scan_with_known_classes_keeps_label_order_and_rejects_unknown(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=2)
    ds = scan(root, classes=["red", "green", "blue"])
    assert ds.classes == ["red", "green", "blue"]
    assert {it.label for it in ds.items if "/red/" in it.path} == {0}
    assert {it.label for it in ds.items if "/blue/" in it.path} == {2}
    with pytest.raises(FloristError, match=r"not known to the model: 'blue'"):
        scan(root, classes=["red"])


def test_class_folder_with_a_line_break_is_an_error(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", {"red": RED, "two\nlines": BLUE}, n=3)
    with pytest.raises(FloristError, match=r"class folder name with a line break: 'two\\nlines'"):
        prepare(root)


def test_class_names_with_unicode_line_separators_round_trip(tmp_path):
    """labels.txt is split on \\n only: U+2028 or U+0085 inside a name is part of the name."""
    names = {"para\u2029graph": RED, "next\x85line": BLUE, "form\x0cfeed": (0, 200, 0)}
    root = im.make_class_folders(tmp_path / "photos", names, n=3)
    prepared = prepare(root, tmp_path / "run", eval_fraction=0.3)
    assert read_labels(tmp_path / "run") == prepared.classes == sorted(names)


def test_unicode_and_space_class_names_round_trip(tmp_path):
    names = {"fleur de lis": RED, "rosé 玫瑰": BLUE, "tulip": (0, 200, 0)}
    root = im.make_class_folders(tmp_path / "photos", names, n=4)
    run = tmp_path / "run"
    prepared = prepare(root, run, eval_fraction=0.25)
    assert sorted(names) == prepared.classes
    assert read_labels(run) == prepared.classes
    assert (run / "labels.txt").read_bytes().decode("utf-8").splitlines() == prepared.classes
    assert read_manifest(run / "train.csv", read_labels(run)) == prepared.train
    assert read_manifest(run / "eval.csv", read_labels(run)) == prepared.eval
    for item in prepared.train + prepared.eval:
        assert Path(item.path).parent.name == prepared.classes[item.label]


# ---------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------


def test_split_is_reproducible_per_seed():
    ds = items_for({"a": 20, "b": 20, "c": 20})
    assert split(ds, seed=1) == split(ds, seed=1)
    assert split(ds, seed=1) != split(ds, seed=2)
    # a class's split depends on its name, not on the other classes
    ds2 = items_for({"a": 20, "z": 7})
    a_eval = {it.path for it in split(ds, seed=1)[1] if it.path.startswith("a/")}
    assert a_eval == {it.path for it in split(ds2, seed=1)[1] if it.path.startswith("a/")}


def test_eval_fraction_gives_per_class_counts():
    ds = items_for({"a": 8, "b": 12, "c": 5, "d": 2})
    train, evaluation = split(ds, eval_fraction=0.25)
    n_eval = Counter(ds.classes[it.label] for it in evaluation)
    n_train = Counter(ds.classes[it.label] for it in train)
    assert n_eval == {"a": 2, "b": 3, "c": 1, "d": 1}  # round(8/4), round(12/4), round(1.25), at least 1
    assert n_train == {"a": 6, "b": 9, "c": 4, "d": 1}


def test_eval_fraction_zero_puts_everything_in_train():
    ds = items_for({"a": 3, "b": 3})
    train, evaluation = split(ds, eval_fraction=0.0)
    assert len(train) == 6 and evaluation == []


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, None])
def test_invalid_eval_fraction_is_an_error(bad):
    with pytest.raises(FloristError, match=r"^eval_fraction must be in \[0, 1\), got ") as caught:
        split(items_for({"a": 3, "b": 3}), eval_fraction=bad)
    assert caught.value.for_cli().startswith("--eval-fraction must be")


def test_train_per_class_gives_exactly_n_train():
    ds = items_for({"a": 5, "b": 9, "c": 4})
    train, evaluation = split(ds, train_per_class=3, seed=7)
    assert Counter(it.label for it in train) == {0: 3, 1: 3, 2: 3}
    assert Counter(it.label for it in evaluation) == {0: 2, 1: 6, 2: 1}


def test_train_per_class_too_large_names_class_and_counts():
    ds = items_for({"a": 5, "small one": 3})
    with pytest.raises(FloristError, match=r"class 'small one' has 3 valid images.*3 needs at least 4"):
        split(ds, train_per_class=3)
    with pytest.raises(FloristError, match=">= 1"):
        split(ds, train_per_class=0)


def test_train_per_class_error_through_prepare(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n={"red": 6, "blue": 2})
    with pytest.raises(FloristError, match=r"'blue' has 2 valid images.*needs at least 6"):
        prepare(root, train_per_class=5)


def test_no_path_in_both_train_and_eval_and_nothing_lost():
    ds = items_for({"a": 17, "b": 9}, dup_groups={"a": [3, 2], "b": [4]})
    for seed in range(20):
        train, evaluation = split(ds, eval_fraction=0.3, seed=seed)
        tp, ep = {it.path for it in train}, {it.path for it in evaluation}
        assert not tp & ep
        assert tp | ep == {it.path for it in ds.items}
        assert len(train) + len(evaluation) == len(ds.items)


def test_duplicates_always_land_on_the_same_side():
    ds = items_for({"a": 10, "b": 10}, dup_groups={"a": [3, 2, 2], "b": [5]})
    for seed in range(30):
        for kwargs in ({"eval_fraction": 0.2}, {"eval_fraction": 0.5}, {"train_per_class": 4}):
            train, evaluation = split(ds, seed=seed, **kwargs)
            train_hashes = {it.sha256 for it in train}
            eval_hashes = {it.sha256 for it in evaluation}
            assert not train_hashes & eval_hashes, (seed, kwargs)


def test_mostly_duplicate_class_still_gets_an_eval_image():
    """Duplicate groups must not swallow a class's whole eval share."""
    ds = items_for({"a": 1, "b": 6}, dup_groups={"a": [3]})  # a: 4 files, only 2 distinct contents
    for seed in range(40):
        for kwargs in ({"eval_fraction": 0.25}, {"train_per_class": 2}):
            train, evaluation = split(ds, seed=seed, **kwargs)
            assert Counter(it.label for it in evaluation)[0] >= 1, (seed, kwargs)
            assert Counter(it.label for it in train)[0] >= 1, (seed, kwargs)


def test_identical_files_on_disk_stay_together(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=6)
    for copy in range(3):
        shutil.copy(root / "red" / "img_00.jpg", root / "red" / f"copy_{copy}.jpg")
    dup_hash = hashlib.sha256((root / "red" / "img_00.jpg").read_bytes()).hexdigest()
    for seed in range(10):
        prepared = prepare(root, eval_fraction=0.3, seed=seed)
        in_train = [it for it in prepared.train if it.sha256 == dup_hash]
        in_eval = [it for it in prepared.eval if it.sha256 == dup_hash]
        assert len(in_train) + len(in_eval) == 4
        assert not (in_train and in_eval)


def test_image_in_two_classes_goes_to_train_in_both():
    """A label conflict (same bytes under two classes) never reaches eval, so it cannot leak."""
    ds = items_for({"a": 10, "b": 10})
    ds.items += [Item("a/same.jpg", 0, "shared"), Item("b/same.jpg", 1, "shared")]
    for seed in range(30):  # with 3 of 11 per class in train, a copy would go to eval in most seeds
        for kwargs in ({"eval_fraction": 0.5}, {"train_per_class": 3}):
            train, evaluation = split(ds, seed=seed, **kwargs)
            assert [it.path for it in train if it.sha256 == "shared"] == ["a/same.jpg", "b/same.jpg"]
            assert not {it.sha256 for it in train} & {it.sha256 for it in evaluation}
            assert len(train) + len(evaluation) == 22


def test_prepare_reports_duplicates_and_conflicts(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=6)
    shutil.copy(root / "red" / "img_00.jpg", root / "red" / "copy.jpg")
    shutil.copy(root / "red" / "img_01.jpg", root / "blue" / "misfiled.jpg")
    prepared = prepare(root, eval_fraction=0.5, seed=0)
    same, conflict = prepared.warnings
    assert "2 files are exact copies within their class" in same and "red/copy.jpg" in same
    assert "label conflict" in conflict and "'blue', 'red'" in conflict
    assert "blue/misfiled.jpg" in conflict and "red/img_01.jpg" in conflict
    conflict_hash = hashlib.sha256((root / "red" / "img_01.jpg").read_bytes()).hexdigest()
    assert not [it for it in prepared.eval if it.sha256 == conflict_hash]
    assert len([it for it in prepared.train if it.sha256 == conflict_hash]) == 2


def test_drop_small_classes_renumbers_labels():
    ds = items_for({"a": 3, "b": 1, "c": 3})
    kept = drop_small_classes(ds, minimum=2)
    assert kept.classes == ["a", "c"]
    assert {it.label for it in kept.items if it.path.startswith("c/")} == {1}
    assert kept.warnings == ["class 'b' left out: 1 valid image(s), need at least 2"]


# ---------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------


def test_prepare_writes_the_four_manifests(tmp_path):
    names = {"red": RED, "blue": BLUE, "green": (0, 200, 0)}
    root = im.make_class_folders(tmp_path / "photos", names, n=5)
    im.write_zero_byte(root / "green" / "zero.jpg")
    run = tmp_path / "run"
    prepared = prepare(root, run, eval_fraction=0.2, seed=3)
    assert sorted(p.name for p in run.iterdir()) == ["eval.csv", "labels.txt", "skipped.csv", "train.csv"]

    labels = (run / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == ["blue", "green", "red"] == prepared.classes
    for name, items in (("train.csv", prepared.train), ("eval.csv", prepared.eval)):
        with open(run / name, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            assert next(reader) == ["path", "label", "sha256"]
            rows = list(reader)
        assert len(rows) == len(items)
        for (path, label, digest), item in zip(rows, items):
            assert path == item.path
            assert labels.index(label) == item.label  # line i of labels.txt is class index i
            assert Path(path).parent.name == label
            assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert len(prepared.train) == 12 and len(prepared.eval) == 3
    zero = str(root / "green" / "zero.jpg")
    assert read_rows(run / "skipped.csv") == [{"path": zero, "reason": "empty file (0 bytes)"}]


def test_prepare_without_out_dir_writes_nothing(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=3)
    before = sorted(tmp_path.rglob("*"))
    prepared = prepare(root)
    assert sorted(tmp_path.rglob("*")) == before
    assert len(prepared.train) + len(prepared.eval) == 6


def test_read_labels_and_manifest_errors(tmp_path):
    with pytest.raises(FloristError, match="no labels.txt"):
        read_labels(tmp_path)
    with pytest.raises(FloristError, match="manifest not found"):
        read_manifest(tmp_path / "train.csv", ["a"])
    (tmp_path / "train.csv").write_text("path,label,sha256\nx.jpg,zebra,00\n", encoding="utf-8")
    with pytest.raises(FloristError, match="unknown class or column 'zebra'"):
        read_manifest(tmp_path / "train.csv", ["a"])


def test_progress_is_reported(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=3)
    calls = []
    prepare(root, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]


# ---------------------------------------------------------------------------
# iter_paths
# ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "in"
    im.make_image(root / "a.jpg", size=im.SMALL)
    im.make_image(root / "b.png", size=im.SMALL, fmt="PNG")
    im.make_image(root / "sub" / "c.jpg", size=im.SMALL)
    im.make_image(root / "sub" / "deeper" / "d.jpg", size=im.SMALL)
    im.write_ds_store(root / "sub")
    return root


def test_iter_paths_single_file(tree):
    assert list(iter_paths([tree / "a.jpg"])) == [tree / "a.jpg"]
    assert list(iter_paths([str(tree / "b.png")])) == [tree / "b.png"]


def test_iter_paths_folder_is_recursive_and_skips_hidden(tree):
    assert list(iter_paths([tree])) == [
        tree / "a.jpg",
        tree / "b.png",
        tree / "sub" / "c.jpg",
        tree / "sub" / "deeper" / "d.jpg",
    ]


def test_iter_paths_glob(tree):
    assert list(iter_paths([str(tree / "*.jpg")])) == [tree / "a.jpg"]
    assert list(iter_paths([str(tree / "**" / "*.jpg")])) == [
        tree / "a.jpg",
        tree / "sub" / "c.jpg",
        tree / "sub" / "deeper" / "d.jpg",
    ]


def test_iter_paths_recursive_glob_of_folders_yields_each_file_once(tree):
    paths = list(iter_paths([str(tree / "**")]))
    assert sorted(paths) == sorted(set(paths))
    sub = tree / "sub"
    assert set(paths) == {tree / "a.jpg", tree / "b.png", sub / "c.jpg", sub / "deeper" / "d.jpg"}


def test_iter_paths_missing_path_or_empty_glob_is_an_error(tree):
    with pytest.raises(FloristError, match="file not found"):
        list(iter_paths([tree / "nope.jpg"]))
    with pytest.raises(FloristError, match="no files match"):
        list(iter_paths([str(tree / "*.gif")]))


def test_iter_paths_mixes_inputs_in_order(tree):
    got = list(iter_paths([tree / "b.png", str(tree / "sub" / "deeper"), str(tree / "*.jpg")]))
    assert got == [tree / "b.png", tree / "sub" / "deeper" / "d.jpg", tree / "a.jpg"]


# ---------------------------------------------------------------------------
# the real flower photos, when present
# ---------------------------------------------------------------------------


def test_prepare_real_flower_photos(tmp_path):
    if not REAL_FLOWERS.is_dir():
        pytest.skip(f"real flower photos not present at {REAL_FLOWERS}")
    prepared = prepare(REAL_FLOWERS, tmp_path / "run", eval_fraction=0.2)
    assert prepared.classes == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert prepared.skipped == []
    same, conflict = prepared.warnings  # the subset's real duplicates (see tests/test_audit.py)
    assert same.startswith("4 files are exact copies within their class (2 group(s)")
    assert "roses/15922772266_1167a06620.jpg, tulips/15922772266_1167a06620.jpg" in conflict
    assert len(prepared.train) == 1200 and len(prepared.eval) == 300
    assert Counter(it.label for it in prepared.eval) == {i: 60 for i in range(5)}
    assert not {it.path for it in prepared.train} & {it.path for it in prepared.eval}


# ---------------------------------------------------------------------------
# remembered checks
# ---------------------------------------------------------------------------


def test_a_rescan_reuses_remembered_verdicts_until_a_file_changes(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=4)
    (root / "red" / "broken.jpg").write_bytes(b"not an image")
    memo = tmp_path / "cache" / "checks.json"
    first = scan(root, check_memo=memo)
    assert memo.is_file()

    with mock.patch("florist.data.check_file", side_effect=AssertionError("read again")):
        again = scan(root, check_memo=memo)  # nothing changed: no file is read
    assert again == first and [s.reason for s in again.skipped] == [s.reason for s in first.skipped]

    changed = root / "blue" / sorted(os.listdir(root / "blue"))[0]
    Image.new("RGB", (40, 30), (120, 200, 40)).save(changed, "JPEG")
    fixed = root / "red" / "broken.jpg"
    Image.new("RGB", (40, 30), RED).save(fixed, "JPEG")
    rescanned = scan(root, check_memo=memo)
    assert rescanned.skipped == []  # the repaired file is checked again
    sha = {it.path: it.sha256 for it in rescanned.items}
    assert sha[str(changed)] == hashlib.sha256(changed.read_bytes()).hexdigest() != {
        it.path: it.sha256 for it in first.items
    }[str(changed)]
    assert scan(root) == rescanned  # and the same as checking everything afresh

    fixed.unlink()
    scan(root, check_memo=memo)
    assert str(fixed) not in json.loads(memo.read_text())  # a removed file leaves the memo too


def test_a_damaged_check_memo_means_checking_afresh(tmp_path):
    root = im.make_class_folders(tmp_path / "photos", TWO, n=2)
    memo = tmp_path / "checks.json"
    memo.write_text("{not json")
    assert scan(root, check_memo=memo) == scan(root)
    memo.write_text('{"x": 1}')
    assert scan(root, check_memo=memo) == scan(root)
