"""Remote storage: ``gs://``, ``s3://``, ``memory://`` (any fsspec URL) wherever florist takes a path.

Photos are *streamed*; the few other files a run needs are *staged*.

* A photo under a URL (in a photo folder given to ``train``, ``prepare`` or
  ``evaluate``, a manifest, or ``predict``'s inputs) is read where it is, whole,
  by whichever thread or worker process checks or decodes it (:func:`read_url`):
  a 2 TB bucket needs no 2 TB of local disk. A transient failure is retried with
  exponential backoff; a missing object is not, it is a bad image like an
  unreadable local file. A photo folder is listed once (:func:`listing`); the
  listing's version of each file (ETag, size...) stands in for a local file's
  modification time, so a re-run checks again only the photos that changed.
  Nothing keeps photos on local disk except :func:`keeping_photos`, which finetune
  mode uses to keep what it reads again, within the run's disk budget.
* Other inputs (TFRecord data, a run folder to evaluate or predict with: a few
  files) are copied into a local folder under ``$FLORIST_CACHE/remote/``. Each
  file is fetched again only when the listing's ETag/size/modification time
  differs from the copy's, so a second run on the same data downloads nothing.
  Files are downloaded to a temporary name and renamed, so a killed download
  never leaves a truncated copy behind.
* An output (a run folder, prepared data) is written into a local working
  folder and uploaded when the work ends: everything once it succeeds, with
  ``model.json`` (the completion mark) last; what is there so far when it
  fails, so a re-run can resume from ``checkpoint.pt``. While it runs, new and
  changed files (checkpoints, TensorBoard logs) are uploaded every
  :data:`SYNC_EVERY_S` seconds, so a pre-empted cloud job loses at most that much.
* The feature cache stays on a filesystem (:func:`require_local`): its shards are
  read in the hot loop, and a node-local disk (or a shared network filesystem) is
  what a cloud job has anyway.

Under ``torchrun`` every process reads the photos of its own share; one process
per machine (``LOCAL_RANK`` 0) stages the other inputs while the others wait at
a barrier, and only rank 0, the process that writes the run folder, uploads.

fsspec keeps a filesystem instance per process and thread (and makes new ones
after a fork), so every read asks fsspec for it (:func:`_filesystem`) rather than
keeping one: a DataLoader worker, forked or spawned, then reads with its own.

Credentials and endpoints come from fsspec's usual sources: ``gcloud auth
application-default login`` for ``gs://``, ``AWS_*`` variables or
``~/.aws/credentials`` for ``s3://`` (``AWS_ENDPOINT_URL`` for an S3-compatible
server), or ``FSSPEC_<PROTOCOL>_<OPTION>`` variables.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import distributed as dist
from .errors import FloristError
from .files import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text, read_csv
from .runfiles import MANIFESTS, MODEL_JSON, RUN_JSON

log = logging.getLogger("florist")

#: Seconds between uploads of a remote output's new and changed files while it is written.
SYNC_EVERY_S = 60.0
#: Listing fields that identify a file's version, whichever of them the filesystem reports.
VERSION_FIELDS = ("size", "ETag", "etag", "md5Hash", "crc32c", "generation", "LastModified", "updated", "mtime",
                  "created")
#: Attempts at reading a remote photo before a transient failure is final.
READ_ATTEMPTS = 5
#: Seconds before the first retry; each further retry waits up to twice as long as the one before.
FIRST_BACKOFF_S = 0.5
#: Failures that trying again cannot mend: nothing there, a folder, access refused.
PERMANENT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class Unavailable(FloristError):
    """A remote file could not be read after :data:`READ_ATTEMPTS` attempts (network, throttling, outage)."""


def is_remote(path: str | os.PathLike[str] | None) -> bool:
    """True for a URL that needs fsspec (``gs://``, ``s3://``, ``memory://``...); False for local paths and ``file://``."""
    if path is None or isinstance(path, os.PathLike):
        return False
    text = str(path)
    if "://" not in text and "::" not in text:
        return False
    from fsspec.utils import get_protocol

    return get_protocol(text) not in ("file", "local")


def local_path(path: str | os.PathLike[str]) -> Path:
    """A local path as a :class:`~pathlib.Path`, with a ``file://`` prefix removed."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith(("file://", "local://")):
        from fsspec.implementations.local import LocalFileSystem

        return Path(LocalFileSystem._strip_protocol(text))
    return Path(text)


def where(path: str | os.PathLike[str]) -> str | Path:
    """Where to read ``path``: a URL as it is (its files are read remotely), a local path as a :class:`Path`."""
    return str(path) if is_remote(path) else local_path(path)


def require_local(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a local :class:`~pathlib.Path`; a URL is an error naming ``what``."""
    if is_remote(path):
        raise FloristError(
            f"{what} must be a local folder, got {path}: it is read file by file while training; "
            "on a cloud machine use its local disk"
        )
    return local_path(path)


ENV_CACHE = "FLORIST_CACHE"


def default_cache_dir() -> Path:
    """florist's local cache: ``$FLORIST_CACHE`` if set, else the user cache folder (e.g. ``~/.cache/florist``).

    It holds the feature cache and, under ``remote/``, the local copies of remote TFRecord data and
    run folders and the photos a run keeps (:func:`keeping_photos`).
    """
    if os.environ.get(ENV_CACHE):
        return require_local(os.environ[ENV_CACHE], f"the feature cache (${ENV_CACHE})")
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("florist"))


def join(base: str | os.PathLike[str], name: str) -> str:
    """``base/name`` for a local path or a URL."""
    if is_remote(base):
        return f"{str(base).rstrip('/')}/{name}"
    return str(local_path(base) / name)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """A whole file, local or remote."""
    if not is_remote(path):
        return local_path(path).read_bytes()
    fs, rpath = _filesystem(str(path))
    with _storage_errors(str(path)):
        return fs.cat_file(rpath)


def read_url(url: str) -> bytes:
    """A remote photo's bytes, read whole; from the photo cache when :func:`keeping_photos` holds it.

    Transient failures are retried with exponential backoff (:data:`READ_ATTEMPTS`).

    Raises:
        FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError: at once, untried again.
        Unavailable: every attempt failed otherwise.
        FloristError: ``url``'s filesystem cannot be used (its package is missing...).
    """
    cache = PhotoCache.active()
    data = cache.get(url) if cache else None
    if data is None:
        data = _fetch(url)
        if cache:
            cache.put(url, data)
    return data


def _fetch(url: str) -> bytes:
    """``url``'s bytes, with :data:`READ_ATTEMPTS` attempts spaced by exponential backoff with jitter.

    The jitter (each wait drawn between half and all of its step) keeps the decoding
    workers that failed together from all retrying at the same moment.
    """
    fs, rpath = _filesystem(url)
    attempt = 1
    while True:
        try:
            return fs.cat_file(rpath)
        except PERMANENT_ERRORS:
            raise
        except Exception as e:  # botocore, google.auth and aiohttp errors share no base class
            if attempt == READ_ATTEMPTS:
                raise Unavailable(f"could not read {url} ({attempt} attempts): {type(e).__name__}: {e}") from e
            step = FIRST_BACKOFF_S * 2 ** (attempt - 1)
            log.debug("reading %s failed (%s: %s); retrying in up to %.1fs", url, type(e).__name__, e, step)
            time.sleep(random.uniform(step / 2, step))
            attempt += 1


def listing(url: str) -> dict[str, str]:
    """``{relative name: version}`` of every non-hidden file under the remote folder ``url``, in one listing.

    Raises:
        FileNotFoundError: nothing is at ``url``.
        NotADirectoryError: ``url`` is a file.
        FloristError: the storage cannot be read, or a name would leave the folder (``..``).
    """
    fs, rpath = _filesystem(url)
    with _storage_errors(url):
        fs.invalidate_cache(rpath)
        files = _listing(fs, rpath, recursive=True)
        if files or fs.isdir(rpath):
            return files
        is_file = fs.isfile(rpath)
    raise NotADirectoryError(url) if is_file else FileNotFoundError(url)


def folder_names(url: str) -> list[str] | None:
    """The names directly in the remote folder ``url`` (one listing, not recursive); None when it is a file.

    Raises:
        FloristError: nothing is at ``url``, or the storage cannot be read.
    """
    fs, rpath = _filesystem(url)
    fs.invalidate_cache(rpath)
    with _storage_errors(url):
        if fs.info(rpath)["type"] == "file":
            return None
        return [PurePosixPath(name).name for name in fs.ls(rpath, detail=False)]


def relative(path: str, root: str | os.PathLike[str]) -> str:
    """``path`` relative to the folder ``root`` it is in, both local paths or both URLs."""
    if is_remote(root):
        prefix = str(root).rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path
    return os.path.relpath(path, root)


@dataclass(frozen=True)
class Staged:
    """The local stand-in for a path the user gave.

    Attributes:
        url: the path as given.
        path: the local file or folder to use instead (``url`` itself when it is local, or a photo
            folder read where it is: see :func:`florist.inputs.data_input`).
        folder: the local copy of the remote folder ``folder_url`` that ``path`` is in
            (None when nothing was staged).
    """

    url: str
    path: Path | str
    folder: Path | None = None
    folder_url: str = ""

    @property
    def is_remote(self) -> bool:
        return self.folder is not None

    def to_url(self, local: str) -> str:
        """A local path inside the copy (a file, or a TFRecord ``file#offset``) as the URL it came from."""
        if self.folder is None:
            return local
        folder = str(self.folder)
        if not (local == folder or local.startswith(folder + os.sep)):
            return local
        return self.folder_url.rstrip("/") + local[len(folder) :].replace(os.sep, "/")

    @contextmanager
    def naming_urls(self) -> Iterator[None]:
        """Errors raised inside name the URL, not the local copy the user never asked for."""
        try:
            yield
        except FloristError as e:
            if self.folder is None:
                raise
            raise FloristError(str(e).replace(str(self.folder), self.folder_url.rstrip("/"))) from None


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


@contextmanager
def local_input(
    path: str | os.PathLike[str],
    *,
    only: Iterable[str] | None = None,
    siblings: Iterable[str] = (),
    root: str | Path | None = None,
) -> Iterator[Staged]:
    """A local copy of a file or folder (the path itself when it is local); errors inside name the URL.

    Args:
        only: for a folder, fetch just these files in it (e.g. a run's ``model.json``
            and weights) rather than everything under it.
        siblings: for a file, also fetch these files next to it when they exist
            (a TFRecord file's ``labels.txt``).
        root: cache folder to stage under (default :func:`default_cache_dir`).
    """
    staged = stage(path, only=only, siblings=siblings, root=root) if is_remote(path) else _as_local(path)
    with staged.naming_urls():
        yield staged


def stage(
    url: str | os.PathLike[str],
    *,
    only: Iterable[str] | None = None,
    siblings: Iterable[str] = (),
    root: str | Path | None = None,
) -> Staged:
    """Bring the local copy of ``url`` up to date (see :func:`local_input`); local paths pass through.

    Raises:
        FloristError: ``url`` does not exist, its filesystem's package is missing, or a
            remote name would land outside the copy (``..``).
    """
    if not is_remote(url):
        return _as_local(url)
    url = str(url)
    fs, rpath = _filesystem(url)
    fs.invalidate_cache(rpath)
    with _storage_errors(url):
        is_file = fs.info(rpath)["type"] == "file"
    if is_file:
        folder, name = rpath.rsplit("/", 1)
        folder_url, wanted = url.rsplit("/", 1)[0], {name, *siblings}
    else:
        folder, name, folder_url, wanted = rpath, None, url, None if only is None else set(only)
    local = _staging_root(root) / _key("in", fs.unstrip_protocol(folder))
    if _fetches_here():
        with _storage_errors(url):
            _refresh(fs, folder, local, wanted)
    dist.barrier()
    return Staged(url, local / name if name else local, local, folder_url)


def list_files(url: str) -> list[str]:
    """Every non-hidden file a remote file, folder or glob pattern names, as URLs.

    Folders are searched recursively, as :func:`florist.data.iter_paths` does locally.
    Files in a folder are named after the folder's URL as given; glob matches in fsspec's form.

    Raises:
        FloristError: nothing matches, or the storage cannot be read.
    """
    with _storage_errors(url):
        return _list_files(url)


def _list_files(url: str) -> list[str]:
    fs, rpath = _filesystem(url)
    fs.invalidate_cache()
    if not glob.has_magic(rpath):
        if fs.isdir(rpath):
            return [url.rstrip("/") + f[len(rpath) :] for f in sorted(fs.find(rpath)) if not _hidden(f[len(rpath) :])]
        if fs.isfile(rpath):
            return [url]
        raise FloristError(f"file not found: {url}")
    files: list[str] = []
    for match in sorted(fs.glob(rpath)):
        if fs.isdir(match):
            files += [f for f in sorted(fs.find(match)) if not _hidden(f[len(match) :])]
        elif not _hidden(PurePosixPath(match).name):
            files.append(match)
    if not files:
        raise FloristError(f"no files match {url!r}")
    return [fs.unstrip_protocol(f) for f in dict.fromkeys(files)]


def _refresh(fs: Any, folder: str, local: Path, wanted: set[str] | None) -> None:
    """Make ``local`` a copy of the remote ``folder`` (or of the ``wanted`` files directly in it).

    The listing's version fields of each copied file are kept in ``<local>.json``;
    a file whose fields are unchanged is not fetched again. Local copies of files
    that are gone remotely are removed.
    """
    local.mkdir(parents=True, exist_ok=True)
    state_file = local.parent / f"{local.name}.json"
    try:
        state: dict[str, str] = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    if wanted is None:
        listing = _listing(fs, folder, recursive=True)
        gone = set(state) - set(listing)
    else:
        listing = {k: v for k, v in _listing(fs, folder, recursive=False).items() if k in wanted}
        gone = wanted - set(listing)
    for rel in gone:
        (local / rel).unlink(missing_ok=True)
        state.pop(rel, None)
    todo = [rel for rel, version in listing.items() if state.get(rel) != version or not (local / rel).is_file()]
    if todo:
        log.info("fetching %d file(s) from %s", len(todo), fs.unstrip_protocol(folder))
        _download(fs, [f"{folder}/{rel}" for rel in todo], [local / rel for rel in todo])
    state.update({rel: listing[rel] for rel in todo})
    atomic_write_json(state_file, state)


def _listing(fs: Any, folder: str, recursive: bool) -> dict[str, str]:
    """``{relative name: version}`` of the non-hidden files under (or directly in) ``folder``."""
    infos = fs.find(folder, detail=True) if recursive else {i["name"]: i for i in fs.ls(folder, detail=True)}
    out = {}
    for name, info in infos.items():
        rel = name[len(folder) :].lstrip("/")
        if info.get("type") != "file" or not rel or _hidden(rel):
            continue
        if any(part in ("", ".", "..") for part in rel.split("/")):
            raise FloristError(f"refusing to read {fs.unstrip_protocol(name)}: its name leaves the folder")
        out[rel] = _version(info)
    return out


def _version(info: dict[str, Any]) -> str:
    """What the listing says about a file's version, as one comparable string."""
    fields = {}
    for key in VERSION_FIELDS:
        if key in info:
            value = info[key]
            fields[key] = str(value.timestamp() if hasattr(value, "timestamp") else value)
    return json.dumps(fields, sort_keys=True)


def _download(fs: Any, rpaths: list[str], lpaths: list[Path]) -> None:
    """Fetch files (concurrently where the filesystem can), each landing under its name only when complete."""
    temps = []
    for lpath in lpaths:
        lpath.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{lpath.name}.", suffix=".part", dir=lpath.parent)
        os.close(fd)
        temps.append(tmp)
    try:
        fs.get(rpaths, temps)
        for tmp, lpath in zip(temps, lpaths):
            os.replace(tmp, lpath)
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Photos kept for a run that reads them again
# ---------------------------------------------------------------------------

#: The photo cache in force, as ``"<budget in bytes> <folder>"``: an environment variable, so that
#: DataLoader workers find it whether they were forked or spawned.
ENV_PHOTO_CACHE = "FLORIST_PHOTO_CACHE"
#: Name prefix of the photo caches' folders under ``$FLORIST_CACHE/remote/``.
PHOTO_CACHE_PREFIX = "photos-"
#: A photo cache folder this much older than its last change, whose owner lock is free, was left by a killed run.
ABANDONED_AFTER_S = 60.0


@dataclass(frozen=True)
class PhotoCache:
    """Remote photos fetched during one run, kept in a local folder, at most ``budget`` bytes of them.

    Nothing is evicted: what reads photos again is a pass over the same photos in
    the same order (finetune's warm start, its pixel decoding, its eval views), for
    which a least-recently-used cache would drop each photo just before it is
    needed again; keeping the first photos that fit serves that share of every
    later pass, and the rest are fetched again.

    Space is reserved under a lock shared by the run's threads and worker
    processes before a photo is written, and each photo is written under a
    temporary name and then renamed: the folder never holds more than ``budget``
    bytes of photos, half-written ones included, and a reader finds a whole photo or none.
    """

    folder: Path
    budget: int

    @property
    def files(self) -> Path:
        """Where the photos are, each named by the SHA-256 of its URL."""
        return self.folder / "files"

    @staticmethod
    def active() -> PhotoCache | None:
        """The cache :func:`keeping_photos` set up for this process or its parent, if any."""
        value = os.environ.get(ENV_PHOTO_CACHE)
        if not value:
            return None
        budget, folder = value.split(" ", 1)
        return PhotoCache(Path(folder), int(budget))

    def get(self, url: str) -> bytes | None:
        try:
            return self._path(url).read_bytes()
        except OSError:  # not kept (or the run is ending and removed the folder)
            return None

    def put(self, url: str, data: bytes) -> None:
        """Keep ``data`` if it fits in what is left of the budget; a failed write only costs a later fetch."""
        path = self._path(url)
        if path.exists() or not self._reserve(len(data)):
            return
        try:
            atomic_write_bytes(path, data, sync=False)  # the folder does not outlive the run
        except OSError as e:
            self._reserve(-len(data))
            log.debug("could not keep %s in %s: %s", url, self.files, e)

    def _path(self, url: str) -> Path:
        return self.files / hashlib.sha256(url.encode("utf-8", errors="surrogateescape")).hexdigest()

    def _reserve(self, n: int) -> bool:
        """Count ``n`` more bytes as held, if the total stays within the budget (False when it would not)."""
        from filelock import FileLock

        used_file = self.folder / "reserved"
        with FileLock(self.folder / "reserve.lock", poll_interval=0.005):
            try:
                used = int(used_file.read_text(encoding="ascii"))
            except (OSError, ValueError):
                used = 0
            if used + n > self.budget:
                return False
            atomic_write_text(used_file, str(used + n))
            return True


@contextmanager
def keeping_photos(budget: int, root: str | Path | None = None) -> Iterator[PhotoCache | None]:
    """While the block runs, keep the remote photos :func:`read_url` fetches, up to ``budget`` bytes (0: none).

    The cache is a new folder under ``<root>/remote/`` (default :func:`default_cache_dir`),
    removed when the block ends. Per run rather than shared by runs: a remote photo
    may change between two runs, and a copy kept across them could only be trusted
    after asking the storage for its version, a request per photo, about what
    fetching it costs; and a later run needs few photos anyway, since the feature
    cache holds what was computed from them. Under ``torchrun`` each process of a
    machine keeps its share of the budget. A folder left behind by a killed run is
    removed by the next one.
    """
    if budget <= 0:
        yield None
        return
    from filelock import FileLock

    base = _staging_root(root)
    base.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(base)
    folder = Path(tempfile.mkdtemp(prefix=PHOTO_CACHE_PREFIX, dir=base))
    owner = FileLock(folder / "owner.lock", timeout=0)
    owner.acquire()
    cache = PhotoCache(folder, budget // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cache.files.mkdir()
    previous = os.environ.get(ENV_PHOTO_CACHE)
    os.environ[ENV_PHOTO_CACHE] = f"{cache.budget} {folder}"
    try:
        yield cache
    finally:
        if previous is None:
            os.environ.pop(ENV_PHOTO_CACHE, None)
        else:
            os.environ[ENV_PHOTO_CACHE] = previous
        shutil.rmtree(folder, ignore_errors=True)
        owner.release()


def _remove_abandoned(base: Path) -> None:
    """Remove photo caches whose run was killed: unchanged for a while, and nobody holds their owner lock."""
    from filelock import FileLock, Timeout

    for folder in base.glob(f"{PHOTO_CACHE_PREFIX}*"):
        try:
            if time.time() - folder.stat().st_mtime < ABANDONED_AFTER_S:
                continue
            lock = FileLock(folder / "owner.lock", timeout=0)
            lock.acquire()
        except (OSError, Timeout):
            continue  # gone already, or its run is alive
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            lock.release()


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


@contextmanager
def local_output(
    path: str | os.PathLike[str],
    *,
    fetch: Sequence[str] = (),
    replaces: Sequence[str] = (),
    root: str | Path | None = None,
    sync_every: float | None = None,
) -> Iterator[Staged]:
    """A local folder to write ``path``'s contents into, uploaded to ``path`` when it is remote.

    Args:
        fetch: name patterns of files directly in the folder that the caller reads from an existing output
            (``model.json`` to refuse overwriting a finished run, ``checkpoint.pt`` to
            resume); they are downloaded first. One the caller deletes is deleted remotely.
        replaces: name patterns of remote files the new output supersedes: those it
            does not write again are deleted (stale TFRecord shards). Nothing else
            already in the remote folder is touched.
        root: cache folder for the working folder (default: the feature cache's).
        sync_every: seconds between uploads while the block runs (default :data:`SYNC_EVERY_S`).
    """
    if not is_remote(path):
        yield _as_local(path)
        return
    url = str(path)
    fs, rpath = _filesystem(url)
    local = _staging_root(root) / _key("out", fs.unstrip_protocol(rpath))
    staged = Staged(url, local, local, url)
    known: set[str] = set()
    if _fetches_here():
        shutil.rmtree(local, ignore_errors=True)  # the remote folder is the truth
        local.mkdir(parents=True)
        fs.invalidate_cache(rpath)
        with _storage_errors(url):
            if fs.isfile(rpath):
                raise FloristError(f"output path exists and is not a folder: {url}")
            listing = _listing(fs, rpath, recursive=False) if fs.exists(rpath) else {}
            wanted = [rel for rel in listing if _matches(rel, fetch)]
            _download(fs, [f"{rpath}/{rel}" for rel in wanted], [local / rel for rel in wanted])
        known = {rel for rel in listing if _matches(rel, (*fetch, *replaces))}
    dist.barrier()
    if not dist.is_main():  # rank 0 writes the folder and uploads it
        with staged.naming_urls():
            yield staged
        return
    mirror = _Mirror(fs, rpath, local, known)
    try:
        with staged.naming_urls(), _uploading(mirror, SYNC_EVERY_S if sync_every is None else sync_every):
            yield staged
    except BaseException:
        try:
            mirror.push(final=False)  # what a re-run can resume from
        except Exception as e:
            log.warning("could not upload %s to %s: %s", local, url, e)
        raise
    try:
        mirror.push(final=True)
    except Exception as e:
        raise FloristError(f"could not upload to {url}: {type(e).__name__}: {e}; the output is in {local}") from e
    shutil.rmtree(local, ignore_errors=True)


class _Mirror:
    """Uploads a local folder's new and changed files; deletes remote files it knows the folder deleted."""

    def __init__(self, fs: Any, rpath: str, local: Path, known: set[str]):
        self.fs, self.rpath, self.local = fs, rpath, local
        self.known = set(known)  # remote files that mirror local ones
        self.sent: dict[str, tuple[int, int]] = {}  # (size, mtime) of each file when uploaded
        self.lock = threading.Lock()

    def push(self, final: bool) -> None:
        """Upload what changed since the last push; ``final`` also uploads the completion mark, last."""
        with self.lock:
            files = {}
            for path in self.local.rglob("*"):
                rel = path.relative_to(self.local).as_posix()
                if path.is_file() and not _hidden(rel):
                    stat = path.stat()
                    files[rel] = (stat.st_size, stat.st_mtime_ns)
            changed = [rel for rel, sig in files.items() if self.sent.get(rel) != sig]
            mark = [rel for rel in changed if rel == MODEL_JSON]
            batches = [[rel for rel in changed if rel != MODEL_JSON], mark if final else []]
            for batch in batches:
                if batch:
                    self.fs.put([str(self.local / rel) for rel in batch], [f"{self.rpath}/{rel}" for rel in batch])
                    self.sent.update({rel: files[rel] for rel in batch})
                    self.known.update(batch)
            for rel in sorted(self.known - set(files)):
                try:
                    self.fs.rm_file(f"{self.rpath}/{rel}")
                except FileNotFoundError:
                    pass
                self.known.discard(rel)
                self.sent.pop(rel, None)


@contextmanager
def _uploading(mirror: _Mirror, every: float) -> Iterator[None]:
    """Push ``mirror`` every ``every`` seconds in a background thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                mirror.push(final=False)
            except Exception as e:  # the final upload reports failures; keep training
                log.warning("could not upload to %s yet: %s", mirror.fs.unstrip_protocol(mirror.rpath), e)

    thread = threading.Thread(target=loop, name="florist-upload", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def relocate(run_dir: str | Path, data: Staged) -> None:
    """Name remote input files by their URLs in a run folder's manifests and ``run.json``, not by local copies.

    So ``evaluate RUN`` on another machine fetches the run's eval images itself.
    """
    if not data.is_remote:
        return
    run = Path(run_dir)
    for name in MANIFESTS:
        rows = read_csv(run / name) if (run / name).is_file() else []
        if rows:
            header = list(rows[0])
            atomic_write_csv(
                run / name, header, ([data.to_url(r[h]) if h == "path" else r[h] for h in header] for r in rows)
            )
    info = run / RUN_JSON
    if info.is_file():
        meta = json.loads(info.read_text(encoding="utf-8"))
        meta["data_dir"] = data.url
        atomic_write_json(info, meta)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _as_local(path: str | os.PathLike[str]) -> Staged:
    return Staged(os.fspath(path), local_path(path))


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path within it, as a florist error when that fails."""
    import fsspec

    try:
        fs, rpath = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise FloristError(f"{url}: {e} (pip install 'florist[cloud]' installs s3fs and gcsfs)") from None
    except ValueError as e:
        raise FloristError(f"{url}: {e}") from None
    return fs, rpath.rstrip("/")


@contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """Failures of the storage library (missing object, credentials, network) as one-line florist errors."""
    try:
        yield
    except FloristError:
        raise
    except FileNotFoundError:
        raise FloristError(f"not found: {url}") from None
    except Exception as e:  # botocore, google.auth and aiohttp errors share no base class
        raise FloristError(f"could not read {url}: {type(e).__name__}: {e}") from e


def _fetches_here() -> bool:
    """One process per machine downloads: the only one, or torchrun's ``LOCAL_RANK`` 0."""
    return dist.world_size() == 1 or int(os.environ.get("LOCAL_RANK", "0")) == 0


def _staging_root(root: str | Path | None) -> Path:
    if root is None:
        root = default_cache_dir()
    return Path(root).resolve() / "remote"


def _key(kind: str, url: str) -> str:
    """A short folder name for a URL's local copy."""
    return f"{kind}-{hashlib.sha256(url.encode()).hexdigest()[:20]}"


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/") if part)


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)
