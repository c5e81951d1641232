"""The feature store: cached network outputs in large append-only shard files.

One folder per cache key (see :func:`florist.features.feature_key`) holds shard
files. A shard is written by one process, front to back, to a temporary file and
published by an atomic rename once it reaches :func:`shard_bytes` or its writer
closes; so a killed run loses only the shard it was filling, and processes
sharing a store (concurrent runs, ``torchrun`` ranks, machines on one network
filesystem) never write the same file and need no lock. A reader lists the
folder once, reads each shard's index and then fetches rows with one read
per run of consecutive rows: a warm run opens a few files, not one per image.

Layout of a shard (little-endian), an index at the end like a zip file's::

    rows       n x row_nbytes   the arrays, back to back
    hashes     n x 32           the SHA-256 of each row's image (its key)
    digests    n x 16           BLAKE2b-128 of each row's bytes
    footer     JSON             {"format", "rows", "dtype", "shape"}
    trailer    8-byte footer length, then MAGIC

Every row is checked against its digest when read: a damaged row (or a footer
whose shape was damaged, which misaligns every row) is recomputed, never
trained on. Stores written before shards existed hold one safetensors file per
image; their entries are still served, checked as before, and copied into
shards as they are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .files import atomic_open, sha256_bytes

log = logging.getLogger("florist")

#: Last bytes of every shard file.
MAGIC = b"FLSHARD1"
SHARD_SUFFIX = ".shard"
#: Environment variable: shard size in MB (default :data:`DEFAULT_SHARD_MB`).
SHARD_MB_ENV = "FLORIST_SHARD_MB"
#: Big enough that a million photos make a few hundred files, small enough that a
#: killed extraction loses at most a minute or so of work.
DEFAULT_SHARD_MB = 256.0
#: Most bytes one read fetches: large enough to stream, small enough not to matter in memory.
READ_BYTES = 16 * 2**20
#: A writer's temporary file untouched this long belongs to a process that died.
STALE_S = 3600.0
_DIGEST = 16
_SHA = 32
_TRAILER = 8 + len(MAGIC)
_LEGACY_DIR = re.compile(r"[0-9a-f]{2}")


def shard_bytes() -> int:
    """How large a shard grows before it is published (``$FLORIST_SHARD_MB``)."""
    raw = os.environ.get(SHARD_MB_ENV, "")
    try:
        mb = float(raw) if raw else DEFAULT_SHARD_MB
    except ValueError:
        mb = DEFAULT_SHARD_MB
    return max(1, int(mb * 2**20))


def row_digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST).digest()


@dataclass
class Shard:
    """One published shard: where it is and what its index says."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    shas: list[str]
    digests: bytes

    @property
    def row_nbytes(self) -> int:
        return int(self.dtype.itemsize * np.prod(self.shape, dtype=np.int64))

    def digest(self, row: int) -> bytes:
        return self.digests[row * _DIGEST : (row + 1) * _DIGEST]


def read_index(path: Path) -> Shard:
    """A shard's index, read from its end.

    Raises:
        ValueError: not a whole shard (damaged, or written by something else).
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < _TRAILER:
            raise ValueError("too short")
        f.seek(size - _TRAILER)
        trailer = f.read(_TRAILER)
        if trailer[8:] != MAGIC:
            raise ValueError("no shard trailer")
        footer_len = int.from_bytes(trailer[:8], "little")
        f.seek(size - _TRAILER - footer_len)
        footer = json.loads(f.read(footer_len))
        n, dtype, shape = int(footer["rows"]), np.dtype(footer["dtype"]), tuple(int(d) for d in footer["shape"])
        shard = Shard(path, dtype, shape, [], b"")
        tables = n * (_SHA + _DIGEST)
        if n * shard.row_nbytes + tables + footer_len + _TRAILER != size:
            raise ValueError("sizes do not add up")
        f.seek(n * shard.row_nbytes)
        hashes = f.read(n * _SHA)
        shard.shas = [hashes[i : i + _SHA].hex() for i in range(0, len(hashes), _SHA)]
        shard.digests = f.read(n * _DIGEST)
    return shard


class ShardWriter:
    """Rows appended to a temporary file, published as one shard by :meth:`close`."""

    def __init__(self, folder: Path, dtype: np.dtype, shape: tuple[int, ...]):
        name = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}{SHARD_SUFFIX}"
        self.path = folder / name
        self.dtype, self.shape = dtype, shape
        self.shas: list[str] = []
        self.digests: list[bytes] = []
        self.nbytes = 0
        self._stack = ExitStack()
        self._file = self._stack.enter_context(atomic_open(self.path))  # one flush to disk per shard

    def append(self, sha: str, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        self._file.write(data)
        self.shas.append(sha)
        self.digests.append(row_digest(data))
        self.nbytes += len(data)

    def close(self) -> Shard:
        """Write the index and publish the shard under its final name."""
        footer = json.dumps(
            {"format": "florist-shard", "rows": len(self.shas), "dtype": self.dtype.str, "shape": list(self.shape)}
        ).encode()
        self._file.write(b"".join(bytes.fromhex(s) for s in self.shas))
        self._file.write(b"".join(self.digests))
        self._file.write(footer + len(footer).to_bytes(8, "little") + MAGIC)
        self._stack.close()
        return Shard(self.path, self.dtype, self.shape, self.shas, b"".join(self.digests))

    def discard(self) -> None:
        """Drop the rows (the temporary file is removed)."""
        with suppress(Exception):
            self._stack.__exit__(OSError, OSError("discarded"), None)


class FeatureCache:
    """The shards of one cache key: ``<root>/<key>/*.shard``.

    :meth:`get` and :meth:`get_many` serve rows (checked), :meth:`put` appends to
    this process's open shard, :meth:`flush` publishes it. A cache that cannot be
    written (read-only, disk full) costs speed, never the run: one warning, then
    nothing more is written.
    """

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self.limit = shard_bytes()
        self._shards: list[Shard] = []
        self._index: dict[str, tuple[int, int]] = {}
        self._seen: set[Path] = set()
        self._files: dict[int, BinaryIO] = {}
        self._writer: ShardWriter | None = None
        self._write_failed = False
        self._scanned = False
        self._legacy = False

    # -- reading ---------------------------------------------------------

    def _scan(self) -> None:
        """Index shards published since the last scan (oldest first, so newer rows win)."""
        self._scanned = True
        try:
            entries = sorted(os.scandir(self.dir), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.endswith(SHARD_SUFFIX) and not entry.name.startswith(".") and path not in self._seen:
                self._seen.add(path)
                try:
                    self._add(read_index(path))
                except (OSError, ValueError, KeyError) as e:
                    log.warning("feature cache: removing damaged shard %s (%s)", path, e)
                    with suppress(OSError):
                        path.unlink()
            elif _LEGACY_DIR.fullmatch(entry.name) and entry.is_dir():
                if not self._legacy:
                    log.info("feature cache %s holds per-image files of an older florist: they are read, "
                             "checked and copied into shards (the old files may then be deleted)", self.dir)
                self._legacy = True

    def _add(self, shard: Shard) -> None:
        i = len(self._shards)
        self._shards.append(shard)
        self._index.update((sha, (i, row)) for row, sha in enumerate(shard.shas))

    def __contains__(self, sha: str) -> bool:
        """Whether an entry is stored (unchecked: :meth:`get` checks it)."""
        if not self._scanned:
            self._scan()
        return sha in self._index or (self._legacy and self._legacy_path(sha).exists())

    def get(self, sha: str) -> np.ndarray | None:
        """The stored array, or None when absent or damaged."""
        return self.get_many([sha]).get(0)

    def get_many(self, shas: Sequence[str | None]) -> dict[int, np.ndarray]:
        """Position in ``shas`` -> stored array, for every entry that is stored and intact.

        Rows are read in file order, one read per run of consecutive rows (of at most :data:`READ_BYTES`).
        """
        if not self._scanned:
            self._scan()
        located = sorted((self._index[s], i) for i, s in enumerate(shas) if s and s in self._index)
        found: dict[int, np.ndarray] = {}
        start = 0
        while start < len(located):
            (shard_i, first), _ = located[start]
            most = max(1, READ_BYTES // max(1, self._shards[shard_i].row_nbytes))
            end = start + 1
            while end < len(located) and end - start < most and located[end][0] == (shard_i, first + end - start):
                end += 1
            self._read_run(shard_i, first, [i for _, i in located[start:end]], shas, found)
            start = end
        if self._legacy:
            for i, sha in enumerate(shas):
                if sha and i not in found:
                    array = self._legacy_get(sha)
                    if array is not None:
                        found[i] = array
                        self.put(sha, array)
        return found

    def _read_run(self, shard_i: int, first: int, positions: list[int], shas: Sequence[str | None],
                  found: dict[int, np.ndarray]) -> None:
        shard = self._shards[shard_i]
        size = shard.row_nbytes
        try:
            data = self._read_at(shard_i, first * size, size * len(positions))
        except OSError:
            return
        for k, i in enumerate(positions):
            row = memoryview(data)[k * size : (k + 1) * size]
            if len(row) == size and row_digest(row) == shard.digest(first + k):
                found[i] = np.frombuffer(row, dtype=shard.dtype).reshape(shard.shape)
            else:  # damaged on disk: forget it, so it is recomputed and stored again
                self._index.pop(shas[i], None)  # type: ignore[arg-type]

    def _read_at(self, shard_i: int, offset: int, size: int) -> bytes:
        """``size`` bytes of a shard from ``offset`` (its file stays open until :meth:`close`)."""
        if shard_i not in self._files:
            self._files[shard_i] = open(self._shards[shard_i].path, "rb")  # closed by close()
        f = self._files[shard_i]
        f.seek(offset)
        return f.read(size)

    def _legacy_path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.safetensors"

    def _legacy_get(self, sha: str) -> np.ndarray | None:
        """An entry of the per-image layout, served only while its checksum matches."""
        from safetensors import safe_open

        try:
            with safe_open(self._legacy_path(sha), framework="np") as f:
                expected = (f.metadata() or {}).get("sha256")
                array = f.get_tensor("features")
        except Exception:  # absent, unreadable, not safetensors
            return None
        actual = sha256_bytes(f"{array.dtype.str}{array.shape}".encode() + np.ascontiguousarray(array).tobytes())
        return array if expected == actual else None

    # -- writing ---------------------------------------------------------

    def put(self, sha: str, array: np.ndarray) -> None:
        """Append an entry to this process's open shard (published when full, or by :meth:`flush`)."""
        if self._write_failed:
            return
        array = np.asarray(array)
        try:
            writer = self._writer
            if writer is not None and (writer.dtype != array.dtype or writer.shape != array.shape):
                self.flush()
                writer = None
            if writer is None:
                self._remove_stale_temporaries()
                writer = self._writer = ShardWriter(self.dir, array.dtype, array.shape)
            writer.append(sha, array)
            if writer.nbytes >= self.limit:
                self.flush()
        except OSError as e:
            self._give_up_writing(e)

    def flush(self) -> None:
        """Publish the open shard, if any."""
        writer, self._writer = self._writer, None
        if writer is None or not writer.shas:
            if writer is not None:
                writer.discard()
            return
        try:
            self._add(writer.close())
            self._seen.add(writer.path)
        except OSError as e:
            writer.discard()
            self._give_up_writing(e)

    def close(self) -> None:
        """Publish the open shard and close the files read."""
        self.flush()
        for f in self._files.values():
            with suppress(OSError):
                f.close()
        self._files.clear()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _give_up_writing(self, error: OSError) -> None:
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        if not self._write_failed:
            log.warning("cannot write the feature cache %s (%s); going on without caching", self.dir, error)
        self._write_failed = True

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary shards of writers that died (untouched for :data:`STALE_S`)."""
        with suppress(OSError):
            for entry in os.scandir(self.dir):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    with suppress(OSError):
                        if time.time() - entry.stat().st_mtime > STALE_S:
                            os.unlink(entry.path)

    def shas(self) -> list[str]:
        """The image hashes of every published entry (unchecked: :meth:`get_many` checks them)."""
        if not self._scanned:
            self._scan()
        return sorted(self._index)


def cache_keys(root: str | Path) -> list[str]:
    """The cache keys under ``root`` that hold shards."""
    return sorted({p.parent.name for p in Path(root).glob(f"*/*{SHARD_SUFFIX}")})
