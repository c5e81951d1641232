"""Fetch the flower_photos dataset (or any tarball of class folders) safely.

The archive is streamed to a partial file (resumed with an HTTP Range request
if a previous download was interrupted), checked against its known size and
SHA-256, and only then extracted with the standard library's ``data`` filter,
which refuses absolute paths, ``..`` components and links that point outside
the destination. Extraction goes to a temporary folder that is renamed into
place when complete, so a half-extracted dataset is never mistaken for a whole one.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import FloristError
from .files import sha256_file
from .progress import ProgressFn


@dataclass(frozen=True)
class Archive:
    """A downloadable dataset archive and what it must hash to."""

    url: str
    size: int
    sha256: str
    folder: str  # top-level folder inside the archive


#: TensorFlow's flower_photos (3,670 photos, 5 classes); size and SHA-256 as
#: recorded in tensorflow_datasets' url_checksums/tf_flowers.txt.
FLOWER_PHOTOS = Archive(
    url="https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
    size=228_813_984,
    sha256="4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c",
    folder="flower_photos",
)

#: Refuse archives that would unpack to more than this many bytes.
MAX_EXTRACTED_BYTES = 4 * 1024**3


def default_data_dir() -> Path:
    """Where datasets are kept: ``$FLORIST_DATA`` or the user data folder."""
    if os.environ.get("FLORIST_DATA"):
        return Path(os.environ["FLORIST_DATA"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("florist")) / "datasets"


def fetch(archive: Archive, dest: Path, *, progress: ProgressFn | None = None, timeout: float = 60) -> Path:
    """Download ``archive`` to ``dest/<name>``, resuming a partial file; verify size and SHA-256.

    Raises:
        FloristError: network failure or a transfer that stopped early (the partial file is
            kept, so the next call resumes), or a complete file that does not match its
            checksum (the partial file is removed).
    """
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / Path(archive.url).name
    if final.exists() and final.stat().st_size == archive.size and sha256_file(final) == archive.sha256:
        return final
    partial = final.with_name(final.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    if have > archive.size:
        partial.unlink()
        have = 0
    if have < archive.size:  # a complete partial file (killed before the rename) needs no request
        request = urllib.request.Request(archive.url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:  # server ignored the range: start over
                    have = 0
                with open(partial, "ab" if have else "wb") as f:
                    done = have
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, archive.size)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise FloristError(
                f"download of {archive.url} failed ({e}); run again to resume, or pass DATA=<local copy>"
            ) from None
    size = partial.stat().st_size
    if size < archive.size:  # connection closed early: keep what arrived so the next run resumes
        raise FloristError(
            f"download of {archive.url} stopped after {size} of {archive.size} bytes; run again to resume"
        )
    digest = sha256_file(partial)
    if size != archive.size or digest != archive.sha256:
        partial.unlink()
        raise FloristError(
            f"downloaded file does not match: {size} bytes, sha256 {digest[:16]}... "
            f"(expected {archive.size} bytes, {archive.sha256[:16]}...)"
        )
    os.replace(partial, final)
    return final


def safe_extract(tarball: Path, dest: Path, *, max_bytes: int = MAX_EXTRACTED_BYTES) -> None:
    """Extract ``tarball`` into ``dest`` refusing traversal, outside links, devices and bombs.

    Raises:
        FloristError: for an unsafe or oversized archive (nothing is left in ``dest``).
    """
    if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4 lacks extraction filters
        raise FloristError("this Python cannot extract archives safely: use 3.10.12+, 3.11.4+ or 3.12+")
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tarfile.open(tarball) as tar:
            members = tar.getmembers()
            for m in members:  # the data filter would only strip the leading "/"; refuse instead
                if m.name.startswith(("/", os.sep)) or os.path.isabs(m.name):
                    raise FloristError(f"unsafe archive {tarball.name}: absolute path {m.name!r}")
            total = sum(m.size for m in members if m.isfile())
            if total > max_bytes:
                raise FloristError(f"{tarball.name} would unpack to {total} bytes (> {max_bytes} limit)")
            try:
                tar.extractall(staging, filter="data")
            except tarfile.FilterError as e:
                raise FloristError(f"unsafe archive {tarball.name}: {e}") from None
        for entry in staging.iterdir():
            target = dest / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(entry, target)
    except (tarfile.TarError, EOFError) as e:
        raise FloristError(f"cannot read archive {tarball.name}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download(
    archive: Archive = FLOWER_PHOTOS, dest: str | Path | None = None, *, progress: ProgressFn | None = None
) -> Path:
    """Download and extract ``archive`` (default flower_photos); return the photo folder.

    A folder already extracted is reused without touching the network.
    """
    root = Path(dest) if dest else default_data_dir()
    folder = root / archive.folder
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    tarball = fetch(archive, root, progress=progress)
    safe_extract(tarball, root)
    if not folder.is_dir():
        raise FloristError(f"{tarball.name} did not contain a {archive.folder}/ folder")
    return folder
