"""Stage 1, *prepare*: photos on disk -> classes, validated images, a train/eval split.

A photo folder is ``<root>/<class name>/<images>`` (sub-folders inside a class
folder are searched too), on local disk or under a URL, whose photos are then
read where they are (see :mod:`florist.remote`). Every candidate file is read once: its bytes are
hashed (the hash is the image's identity in the feature cache and in the
manifests) and decoded, so a corrupt or odd file is found here, reported in
``skipped.csv`` with a reason, and never reaches training.

:func:`decode_image` is the single place where bytes become an RGB picture;
training, evaluation and prediction all go through it, so they see the same
pixels.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import remote
from .errors import FloristError, SettingError, literal
from .files import atomic_write_csv, atomic_write_text, json_text, read_csv, sha256_bytes
from .progress import ProgressFn
from .runfiles import EVAL_CSV, LABELS, SKIPPED_CSV, TRAIN_CSV

T = TypeVar("T")

#: Formats accepted, by what the file's content says (not its extension). MPO is
#: the multi-picture JPEG many cameras write; binary PPM (raw RGB behind a short
#: header) is how florist hands on the pixels of raw-pixel TFRecords.
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "PPM"})

#: Default pixel limit (width * height) per image: about 89 megapixels, the same
#: threshold Pillow warns at. Larger images are refused before they are decoded,
#: so a crafted "decompression bomb" header cannot exhaust memory.
DEFAULT_MAX_PIXELS = 89_478_485

#: Largest file read into memory (bytes); bigger files are skipped unread.
MAX_FILE_BYTES = 256 * 1024 * 1024

#: Longest side / shortest side allowed. Preprocessing scales the shorter side up to
#: the network's input size, so a 20000x1 "image" of a few bytes would become
#: 5 million x 256 pixels (minutes of CPU) and 5000000x1 would exhaust memory.
#: Panoramas stay far below this.
MAX_ASPECT_RATIO = 50

#: Held while Pillow reads a header with its DecompressionBombWarning turned into
#: an error. ``warnings.catch_warnings`` swaps process-wide state and is not
#: thread-safe: unguarded, parallel decoding left the "error" filter installed
#: for good. Only the (fast) header read is serialised; decoding stays parallel.
_OPEN_LOCK = threading.Lock()

R = TypeVar("R")


class BadImage(Exception):
    """A single file that cannot be used; the message is the reason shown in ``skipped.csv``."""


@dataclass(frozen=True)
class Item:
    """One usable image: where it is, its class index and its content hash."""

    path: str
    label: int
    sha256: str


@dataclass(frozen=True)
class Skipped:
    """A file that was left out, and why."""

    path: str
    reason: str


@dataclass
class Dataset:
    """The result of scanning a photo folder (before any split)."""

    classes: list[str]
    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """A split dataset, as written to a run folder by :func:`prepare`."""

    classes: list[str]
    train: list[Item]
    eval: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Decoding one image
# ---------------------------------------------------------------------------


def read_file(path: str | Path) -> bytes:
    """Read a regular file's bytes, local or under a URL, turning every failure to read it into :class:`BadImage`.

    Raises:
        BadImage: the file is missing, empty, too large or unreadable.
        florist.remote.Unavailable: a remote file stayed unreadable after retries (an outage,
            not a bad image: retried on the next run, never remembered as bad).
    """
    if remote.is_remote(path):
        return _read_remote(str(path))
    p = Path(path)
    try:
        if not p.is_file():
            raise BadImage(_why_not_a_file(p))
        _check_size(p.stat().st_size)  # before reading: a huge file is refused unread
        return p.read_bytes()
    except PermissionError:
        raise BadImage("permission denied") from None
    except OSError as e:
        raise BadImage(f"cannot read file: {e.strerror or e}") from None


def _read_remote(url: str) -> bytes:
    """:func:`read_file` for a URL: the same reasons for the same faults, with :func:`florist.remote.read_url`'s retries."""
    try:
        data = remote.read_url(url)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except IsADirectoryError:
        raise BadImage("a folder, not a file") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except NotADirectoryError as e:
        raise BadImage(f"cannot read file: {e}") from None
    _check_size(len(data))
    return data


def _check_size(size: int) -> None:
    """A file of ``size`` bytes is no image florist reads: empty, or over :data:`MAX_FILE_BYTES`."""
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise BadImage(f"file too large ({size} bytes > {MAX_FILE_BYTES})")


def _why_not_a_file(p: Path) -> str:
    """The reason shown for a path that is not a regular file (links, folders, pipes, devices)."""
    try:
        p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if p.is_symlink():
            return "broken symbolic link (target not found)"
        if isinstance(e, PermissionError):
            return "permission denied"
        return "file not found" if isinstance(e, FileNotFoundError) else f"cannot read file: {e.strerror or e}"
    if p.is_dir():
        if p.is_symlink():
            return "symbolic link to a folder (not followed)"
        return "folder that cannot be listed (permission denied?)"
    return "not a regular file"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a person would expect to see it.

    Transparent pixels are composited onto white (not black, which is what a
    plain ``convert("RGB")`` gives for many PNGs), 16-bit and float images are
    rescaled to 8 bits instead of clipped, and CMYK is converted by Pillow.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and arr.max() > 255:
            arr = arr * (255.0 / arr.max())
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB :class:`PIL.Image.Image`.

    Args:
        data: the file's bytes.
        max_pixels: refuse images whose header claims more pixels than this.
        draft_size: when given, JPEGs are decoded at the smallest DCT scale whose
            shorter side is still at least this many pixels (much faster for large
            photos; the result is then resized anyway).

    Raises:
        BadImage: with a short reason, for anything that is not a usable image.
    """
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.format not in IMAGE_FORMATS:
            raise BadImage(f"unsupported image format {img.format}")
        width, height = img.size
        if width < 1 or height < 1:
            raise BadImage(f"invalid size {width}x{height}")
        if width * height > max_pixels:
            raise BadImage(f"too many pixels ({width}x{height} > {max_pixels} limit)")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise BadImage(f"extreme aspect ratio ({width}x{height}; the limit is {MAX_ASPECT_RATIO}:1)")
        if draft_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        # Pillow reports truncated or corrupt data with a mix of these.
        raise BadImage(f"corrupt image: {e}") from None


def load_image(path: str | Path, **kwargs) -> Image.Image:
    """Read and decode one file (see :func:`decode_image` for the keyword arguments)."""
    return decode_image(read_file(path), **kwargs)


# ---------------------------------------------------------------------------
# Scanning a folder
# ---------------------------------------------------------------------------


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_class_folders(data_dir: str | Path) -> dict[str, Path]:
    """Map class name -> folder for every non-hidden sub-folder of ``data_dir``.

    Raises:
        FloristError: if ``data_dir`` does not exist or is not a folder.
    """
    root = Path(data_dir)
    if not root.exists():
        raise _not_found(root)
    if not root.is_dir():
        raise _not_a_folder(root)
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError:
        raise FloristError(f"cannot list folder (permission denied): {root}") from None
    for p in entries:
        _check_class_name(p.name)
    return {p.name: p for p in entries}


def _not_found(data_dir: str | Path) -> FloristError:
    return FloristError(f"data folder not found: {data_dir}")


def _not_a_folder(data_dir: str | Path) -> FloristError:
    return FloristError(f"not a folder: {data_dir} (expected <folder>/<class>/<images>)")


def _check_class_name(name: str) -> None:
    if "\n" in name or "\r" in name:
        raise FloristError(f"class folder name with a line break: {name!r} (labels.txt has one per line); rename it")


def files_by_class(data_dir: str | Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Class name -> the candidate files in its folder, for every class folder of ``data_dir``, in a fixed order;
    and for a folder under a URL, each file's version (see :func:`florist.remote.listing`).

    A remote folder's classes and files come from one listing, as a local folder's
    from walking it; files next to the class folders are not photos of any class.

    Raises:
        FloristError: if ``data_dir`` does not exist or is not a folder.
    """
    if not remote.is_remote(data_dir):
        root = remote.local_path(data_dir)
        folders = find_class_folders(root)
        return {name: [str(p) for _, p in class_files(root, folders, [name])] for name in folders}, {}
    url = str(data_dir)
    try:
        listed = remote.listing(url)
    except FileNotFoundError:
        raise _not_found(url) from None
    except NotADirectoryError:
        raise _not_a_folder(url) from None
    by_class: dict[str, list[str]] = defaultdict(list)
    versions: dict[str, str] = {}
    for rel in sorted(listed):
        name, sep, _ = rel.partition("/")
        if sep:
            path = remote.join(url, rel)
            by_class[name].append(path)
            versions[path] = listed[rel]
    for name in by_class:
        _check_class_name(name)
    return dict(sorted(by_class.items())), versions


def _candidate_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` in sorted order, plus what could not be searched.

    Symbolic links to folders are not followed (a link to a parent would loop, a
    link to a sibling would count its images twice) and folders that cannot be
    listed are not searched; both are yielded like files, so reading them reports
    why they were left out instead of losing their contents silently.
    """
    unlisted: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=lambda e: unlisted.append(e.filename)):
        yield from _drain(unlisted)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in links)
        for name in sorted(filenames + links):
            yield Path(dirpath) / name
    yield from _drain(unlisted)


def _drain(paths: list[str]) -> Iterator[Path]:
    while paths:
        yield Path(paths.pop(0))


def check_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Fully decode one image's bytes; return their SHA-256 or raise :class:`BadImage`."""
    decode_image(data, max_pixels=max_pixels, draft_size=64)
    return sha256_bytes(data)


def check_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Read and fully decode one file; return its SHA-256 or raise :class:`BadImage`."""
    return check_bytes(read_file(path), max_pixels)


class CheckMemo:
    """Verdicts of earlier checks, so a re-run does not read and decode every photo again.

    A verdict (the file's SHA-256, or why it is unusable) is reused only while the
    file's identity is unchanged: same device, inode, size and modification time
    (what ``make`` and ``rsync`` trust), or for a remote file the same version in
    the folder's listing (``versions``: ETag, size...), and the same pixel limit. Checking the
    1,500 flower photos takes about a second; looking them up takes a few stat
    calls. A missing, corrupt or foreign memo file just means checking afresh.
    """

    def __init__(self, path: str | Path | None, max_pixels: int, versions: dict[str, str] | None = None):
        self.path = Path(path) if path else None
        self.max_pixels = max_pixels
        self.versions = versions or {}
        self.known: dict[str, list] = {}  # what the memo file held
        self.seen: dict[str, list] = {}  # the verdicts of this check, reused or new
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self.known = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                pass

    def _identity(self, path: str) -> list:
        if path in self.versions:
            return [self.versions[path], self.max_pixels]
        st = os.stat(path)
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, self.max_pixels]

    def recall(self, path: str) -> str | BadImage | None:
        """The remembered verdict on ``path`` (its SHA-256, or the :class:`BadImage` it was) while its
        identity is unchanged; None when it must be checked.

        A lookup is a stat call, so :func:`scan` makes it in its own thread: handing 100,000
        of them to the checking threads cost 2 s of a warm re-train.
        """
        if self.path is None:
            return None
        try:
            identity = self._identity(path)
        except OSError:
            return None
        entry = self.known.get(str(path))
        if not (entry and entry[0] == identity):
            return None
        self.seen[str(path)] = entry
        return entry[2] if entry[1] == "ok" else BadImage(entry[2])

    def wrap(self, check: Callable[[str], str]) -> Callable[[str], str]:
        """``check``, its verdicts recorded for :meth:`save` (on files that can be stat'ed).

        A remote file that could not be read (:class:`florist.remote.Unavailable`) gets no verdict.
        """
        if self.path is None:
            return check

        def recorded(path: str) -> str:
            try:
                identity = self._identity(path)
            except OSError:
                return check(path)
            try:
                entry = [identity, "ok", check(path)]
            except BadImage as e:
                entry = [identity, "bad", str(e)]
            self.seen[str(path)] = entry
            if entry[1] == "ok":
                return entry[2]
            raise BadImage(entry[2])

        return recorded

    def save(self) -> None:
        """Write this check's verdicts (atomically) when they differ from the file's.

        Files gone from the folder drop out of the memo, so it never outgrows the folder.
        """
        if self.path is None or self.seen == self.known:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json_text(self.seen))
        except OSError as e:  # a read-only cache costs speed, never the run
            warnings.warn(f"could not save image checks to {self.path}: {e}", stacklevel=2)


def check_memo_file(cache_root: str | Path, data_dir: str | Path) -> Path:
    """Where :class:`CheckMemo` keeps the verdicts on ``data_dir``'s files (a folder or a URL): one file per folder."""
    where = str(data_dir) if remote.is_remote(data_dir) else os.path.abspath(data_dir)
    key = sha256_bytes(os.fsencode(where))[:24]
    return Path(cache_root) / "checks" / f"{key}.json"


def scan(
    data_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    check_memo: str | Path | None = None,
) -> Dataset:
    """Find classes and validate every image under ``data_dir``.

    Args:
        data_dir: a folder of class folders, or its URL (its photos are read where they are).
        classes: when given (evaluating a trained model), the known class names;
            a class folder not in this list is an error, and labels follow this order.
        max_pixels: per-image pixel limit.
        workers: threads used to read and decode (Pillow releases the GIL).
        progress: called as ``progress(done, total)`` while files are checked.
        check_memo: a JSON file remembering earlier verdicts (see :class:`CheckMemo`);
            None checks every file afresh.

    Raises:
        FloristError: missing folder, no class folders, unknown class folders.
    """
    folders, versions = files_by_class(data_dir)
    if not folders:
        raise FloristError(f"no class folders in {data_dir} (expected {remote.join(data_dir, '<class>/<images>')})")
    if classes is None:
        class_names = list(folders)
    else:
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise FloristError(
                f"class folders not known to the model: {', '.join(map(repr, unknown))}; "
                f"known classes: {', '.join(map(repr, classes))}"
            )
        class_names = list(classes)
    candidates = [(name, path) for name in class_names for path in folders.get(name, ())]
    memo = CheckMemo(check_memo, max_pixels, versions)
    recalled = [memo.recall(p) for _, p in candidates]
    unknown = [p for (_, p), verdict in zip(candidates, recalled) if verdict is None]
    checked = iter(check_all(memo.wrap(lambda p: check_file(p, max_pixels)), unknown, workers, progress))
    results = [next(checked) if verdict is None else verdict for verdict in recalled]
    memo.save()
    index = {name: i for i, name in enumerate(class_names)}
    items: list[Item] = []
    skipped: list[Skipped] = []
    for (name, path), result in zip(candidates, results):
        if isinstance(result, BadImage):
            skipped.append(Skipped(path, str(result)))
        else:
            items.append(Item(path, index[name], result))
    return Dataset(class_names, items, skipped)


def class_files(root: Path, folders: dict[str, Path], class_names: Sequence[str]) -> list[tuple[str, Path]]:
    """``(class, file)`` for every non-hidden file in the named class folders, in a fixed order."""
    return [
        (name, path)
        for name in class_names
        if name in folders
        for path in _candidate_files(folders[name])
        if not _is_hidden(path, root)
    ]


def check_all(
    check: Callable[[T], R], inputs: Sequence[T], workers: int | None, progress: ProgressFn | None
) -> list[R | BadImage]:
    """Run ``check`` on every input in threads (Pillow releases the GIL); a :class:`BadImage`
    is returned in its input's place, any other exception propagates."""

    def one(x: T) -> R | BadImage:
        try:
            return check(x)
        except BadImage as e:
            return e

    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for i, result in enumerate(pool.map(one, inputs), 1):
                results.append(result)
                if progress is not None:
                    progress(i, len(inputs))
        except BaseException:
            pool.shutdown(cancel_futures=True)  # fail now, not after checking every other input
            raise
    return results


# ---------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------


def drop_small_classes(ds: Dataset, minimum: int) -> Dataset:
    """Remove classes with fewer than ``minimum`` valid images, with a warning for each.

    An empty class folder (or one whose files were all skipped) is almost
    always an accident; dropping it keeps the run going and says so. Labels are
    re-numbered so they stay contiguous.

    Raises:
        FloristError: when fewer than two classes remain.
    """
    counts = defaultdict(int)
    for item in ds.items:
        counts[item.label] += 1
    keep = [i for i in range(len(ds.classes)) if counts[i] >= minimum]
    warns = list(ds.warnings)
    for i in range(len(ds.classes)):
        if counts[i] < minimum:
            warns.append(
                f"class {ds.classes[i]!r} left out: {counts[i]} valid image(s), need at least {minimum}"
            )
    if len(keep) < 2:
        found = ", ".join(repr(ds.classes[i]) for i in keep) or "none"
        raise FloristError(
            f"need at least 2 classes with {minimum}+ valid images each; found {len(keep)} ({found})"
        )
    remap = {old: new for new, old in enumerate(keep)}
    items = [Item(it.path, remap[it.label], it.sha256) for it in ds.items if it.label in remap]
    return Dataset([ds.classes[i] for i in keep], items, ds.skipped, warns)



def check_split(eval_fraction: float | None, train_per_class: int | None) -> None:
    """Refuse split arguments that cannot work, naming them in the caller's spelling.

    Raises:
        SettingError: ``train_per_class`` below 1, or (without it) ``eval_fraction`` outside [0, 1).
    """
    if train_per_class is not None:
        if isinstance(train_per_class, bool) or not isinstance(train_per_class, int) or train_per_class < 1:
            raise SettingError(f"{{train_per_class}} must be an integer >= 1, got {literal(train_per_class)}")
    elif not isinstance(eval_fraction, (int, float)) or not 0.0 <= eval_fraction < 1.0:
        raise SettingError(f"{{eval_fraction}} must be in [0, 1), got {literal(eval_fraction)}")


def split(
    ds: Dataset,
    *,
    eval_fraction: float | None = 0.2,
    train_per_class: int | None = None,
    seed: int = 0,
) -> tuple[list[Item], list[Item]]:
    """Stratified train/eval split, reproducible for a given seed.

    Either ``train_per_class`` images of each class go to training and the rest
    to evaluation (the original project's way), or ``eval_fraction`` of each
    class goes to evaluation. Identical files (same SHA-256) always land on
    the same side, so an exact duplicate cannot leak from train into eval. An
    image found under two classes (a label conflict, see :func:`duplicate_groups`)
    goes to train in every class: one copy per side would leak, and an eval image
    whose label contradicts itself cannot be scored fairly.

    Raises:
        FloristError: invalid arguments or a class too small for the request.
    """
    check_split(eval_fraction, train_per_class)
    by_class: dict[int, dict[str, list[Item]]] = defaultdict(dict)
    for item in ds.items:
        by_class[item.label].setdefault(item.sha256, []).append(item)
    train: list[Item] = []
    evaluation: list[Item] = []
    for label in range(len(ds.classes)):
        groups = [by_class[label][h] for h in sorted(by_class[label])]
        rng = random.Random(f"{seed}:{ds.classes[label]}")
        rng.shuffle(groups)
        n = sum(len(g) for g in groups)
        if train_per_class is not None:
            if n < train_per_class + 1:
                raise SettingError(
                    f"class {literal(ds.classes[label])} has {n} valid images; {{train_per_class}} "
                    f"{train_per_class} needs at least {train_per_class + 1}"
                )
            n_train = train_per_class
        else:
            n_eval = math.floor(n * eval_fraction + 0.5) if eval_fraction > 0 else 0
            n_eval = min(max(n_eval, 1 if eval_fraction > 0 else 0), n - 1)
            n_train = n - n_eval
        taken = 0
        for i, group in enumerate(groups):
            # Train takes groups until it holds n_train images; a duplicate group can
            # overshoot, so the last group goes to eval when eval would otherwise be
            # empty (unless it is the class's only content) -- every class is evaluated.
            last_chance = i == len(groups) - 1 and 0 < taken < n_train < n
            (train if taken < n_train and not last_chance else evaluation).extend(group)
            taken += len(group)
    conflicts = {g[0].sha256 for g in duplicate_groups(ds.items) if len({it.label for it in g}) > 1}
    train += [it for it in evaluation if it.sha256 in conflicts]
    evaluation = [it for it in evaluation if it.sha256 not in conflicts]
    return sorted(train, key=_order), sorted(evaluation, key=_order)


def duplicate_groups(items: Iterable[Item]) -> list[list[Item]]:
    """Groups of two or more items with the same content hash (exact duplicates), in path order."""
    by_hash: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_hash[item.sha256].append(item)
    groups = [sorted(g, key=lambda it: it.path) for g in by_hash.values() if len(g) > 1]
    return sorted(groups, key=lambda g: g[0].path)


def duplicate_warnings(ds: Dataset, root: str | Path, limit: int = 5) -> list[str]:
    """What :func:`split` did with exact duplicates, for the user to see (and fix with ``florist audit``)."""

    def rel(path: str) -> str:
        return remote.relative(path, root)

    groups = duplicate_groups(ds.items)
    conflicts = [g for g in groups if len({it.label for it in g}) > 1]
    same = [g for g in groups if len({it.label for it in g}) == 1]
    messages = []
    if same:
        n_files = sum(len(g) for g in same)
        messages.append(
            f"{n_files} files are exact copies within their class ({len(same)} group(s), e.g. "
            f"{' = '.join(rel(it.path) for it in same[0])}); each group is kept on one side of the split"
        )
    for g in conflicts[:limit]:
        names = sorted({ds.classes[it.label] for it in g})
        messages.append(
            f"label conflict: the same image is in classes {', '.join(map(repr, names))} "
            f"({', '.join(rel(it.path) for it in g)}); every copy goes to train, none to eval"
        )
    if len(conflicts) > limit:
        messages.append(f"... and {len(conflicts) - limit} more label conflict(s); run `florist audit` for all")
    return messages


def _order(item: Item) -> tuple[int, str]:
    return item.label, item.path


# ---------------------------------------------------------------------------
# Manifests in a run folder
# ---------------------------------------------------------------------------

MANIFEST_HEADER = ("path", "label", "sha256")


def write_labels(run_dir: str | Path, classes: Sequence[str]) -> None:
    """``labels.txt``: one class name per line, line number = label index."""
    atomic_write_text(Path(run_dir) / LABELS, "".join(f"{c}\n" for c in classes))


def write_skipped(run_dir: str | Path, skipped: Sequence[Skipped]) -> None:
    """``skipped.csv``: every file left out, and why."""
    atomic_write_csv(Path(run_dir) / SKIPPED_CSV, ("path", "reason"), ((s.path, s.reason) for s in skipped))


def write_manifests(run_dir: str | Path, prepared: Prepared) -> None:
    """Write ``labels.txt``, ``train.csv``, ``eval.csv`` and ``skipped.csv`` atomically."""
    run = Path(run_dir)
    write_labels(run, prepared.classes)
    for name, items in ((TRAIN_CSV, prepared.train), (EVAL_CSV, prepared.eval)):
        atomic_write_csv(
            run / name,
            MANIFEST_HEADER,
            ((it.path, prepared.classes[it.label], it.sha256) for it in items),
        )
    write_skipped(run, prepared.skipped)


def read_labels(run_dir: str | Path) -> list[str]:
    """Class names of a run, in label order (line number = label index)."""
    path = Path(run_dir) / LABELS
    if not path.exists():
        raise FloristError(f"no labels.txt in {run_dir}: not a florist run folder")
    text = path.read_text(encoding="utf-8", errors="surrogateescape")  # names as the file system gave them
    return [line for line in text.split("\n") if line]  # not splitlines(): U+2028 etc. may be in a name


def read_manifest(path: str | Path, classes: Sequence[str]) -> list[Item]:
    """Read ``train.csv``/``eval.csv`` back into items (labels by class name)."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        rows = read_csv(path)
    except FileNotFoundError:
        raise FloristError(f"manifest not found: {path}") from None
    try:
        return [Item(r["path"], index[r["label"]], r["sha256"]) for r in rows]
    except KeyError as e:
        raise FloristError(f"malformed manifest {path}: unknown class or column {e}") from None


def prepare(
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    eval_fraction: float | None = 0.2,
    train_per_class: int | None = None,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressFn | None = None,
    check_memo: str | Path | None = None,
) -> Prepared:
    """Scan, validate and split a photo folder; write the manifests when ``out_dir`` is given.

    Either may be a URL (``gs://``, ``s3://``...: see :mod:`florist.remote`); the photos
    of a remote folder are read where they are, and the items and manifests name their URLs.

    Example:
        >>> prepared = florist.prepare("flower_photos", "runs/flowers")  # doctest: +SKIP
        >>> prepared.classes
        ['daisy', 'dandelion', 'roses', 'sunflowers', 'tulips']
    """
    data_dir = remote.where(data_dir)
    ds = scan(data_dir, max_pixels=max_pixels, progress=progress, check_memo=check_memo)
    prepared = split_dataset(ds, eval_fraction=eval_fraction, train_per_class=train_per_class, seed=seed)
    prepared.warnings.extend(duplicate_warnings(ds, data_dir))
    if out_dir is not None:
        with remote.local_output(out_dir) as out:
            write_manifests(out.path, prepared)
    return prepared


def split_dataset(
    ds: Dataset, *, eval_fraction: float | None = 0.2, train_per_class: int | None = None, seed: int = 0
) -> Prepared:
    """Leave out classes too small to split (with a warning), then :func:`split` the rest."""
    needs_eval = train_per_class is not None or (eval_fraction or 0) > 0
    ds = drop_small_classes(ds, minimum=2 if needs_eval else 1)
    train, evaluation = split(ds, eval_fraction=eval_fraction, train_per_class=train_per_class, seed=seed)
    return Prepared(ds.classes, train, evaluation, ds.skipped, ds.warnings)


def iter_paths(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Expand files, folders (searched recursively) and glob patterns into file paths.

    Raises:
        FloristError: for an input that is neither an existing path nor a matching glob.
    """
    import glob

    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            yield from (f for f in _candidate_files(p) if not _is_hidden(f, p))
        elif p.exists() or p.is_symlink():
            yield p
        elif glob.has_magic(str(raw)):
            matches = sorted(glob.glob(str(raw), recursive=True))
            if not matches:
                raise FloristError(f"no files match {raw!r}")
            seen: set[Path] = set()  # "dir/**" matches a folder *and* each sub-folder in it
            for m in matches:
                for f in iter_paths([m]) if Path(m).is_dir() else [Path(m)]:
                    if f not in seen:
                        seen.add(f)
                        yield f
        else:
            raise FloristError(f"file not found: {raw}")
