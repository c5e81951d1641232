"""Small file helpers shared by every stage: atomic writes and hashing.

Every file florist writes goes through :func:`atomic_write_bytes`, so a run that
is killed half-way never leaves a truncated file behind that a later run would
trust: the data goes to a temporary file in the same folder, is flushed to disk
and only then renamed over the final name (``os.replace`` is atomic on POSIX
and Windows when both names are on one filesystem).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from .errors import FloristError

#: Lock file held in a run folder while a florist process writes to it.
LOCK_NAME = ".florist.lock"


@contextmanager
def atomic_open(path: str | Path, *, sync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to stream into; it replaces ``path`` only when the block ends without error.

    For files too large to build in memory first (TFRecord shards); small files use
    :func:`atomic_write_bytes`. ``sync=False`` skips flushing to disk before the
    rename: after a power cut the file may then be whole, absent or damaged (never
    a mix of old and new), which suits files checked on every read (cache entries).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one (``sync``: see :func:`atomic_open`)."""
    with atomic_open(path, sync=sync) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomic UTF-8 text write (see :func:`atomic_write_bytes`).

    File names that are not valid UTF-8 reach Python as lone surrogates
    (``os.fsdecode``); they are written back as the original bytes, so a path
    read from the file again names the same file.
    """
    atomic_write_bytes(path, text.encode("utf-8", errors="surrogateescape"))


def json_text(obj: Any, indent: int | None = None) -> str:
    """JSON that is valid UTF-8 whatever its strings hold.

    Strings holding non-UTF-8 bytes (file names, see :func:`atomic_write_text`)
    make the whole text use ``\\uXXXX`` escapes, which ``json.loads`` turns back
    into the same strings.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=indent, ensure_ascii=True)
    return text


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomic, human-readable JSON write (see :func:`json_text`)."""
    atomic_write_text(path, json_text(obj, indent=2) + "\n")


def write_csv(f: TextIO, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """CSV with a header row, RFC 4180 quoting and ``\\n`` line ends, so any file name round-trips.

    The csv module quotes fields holding ``\\n`` but, with ``\\n`` line ends, not those
    holding a lone ``\\r``, which its reader then takes for a line end: such rows are
    written with every field quoted.
    """
    plain = csv.writer(f, lineterminator="\n")
    quoted = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_ALL)
    plain.writerow(header)
    for row in rows:
        (quoted if any("\r" in str(v) for v in row) else plain).writerow(row)


def atomic_write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Atomic CSV write (see :func:`write_csv` and :func:`atomic_write_text`)."""
    buf = io.StringIO(newline="")
    write_csv(buf, header, rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Read a CSV written by :func:`atomic_write_csv` into a list of dicts."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``: the identity of an image's content in caches and manifests."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large weight files need little memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold ``folder/.florist.lock`` while writing into ``folder``; a second writer fails at once.

    Two runs writing one folder would leave a mix of both (the weights of one,
    the ``model.json`` of the other). The lock is an OS file lock (``filelock``),
    released by the OS when its process dies, so a killed run never leaves the
    folder locked.

    Raises:
        FloristError: another process holds the lock.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FloristError(
            f"{folder} is being written by another florist process (it holds {folder / LOCK_NAME}); "
            "wait for it to finish or use another output folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete temporary files a killed writer left in ``folder`` (call only while holding its lock)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
