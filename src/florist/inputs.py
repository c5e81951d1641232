"""Paths as users and manifests give them -> paths that can be read.

:func:`expand_inputs` takes what ``florist predict`` takes: files, folders and
glob patterns, local or remote. :func:`localize` takes the paths of a manifest,
which may name remote files or records inside TFRecord files (``<file>#<offset>``).
:func:`data_input` takes the data folder of ``train`` and ``evaluate``. Remote
photos are read where they are; TFRecord files, read record by record at any
offset, are fetched per folder into the local cache (see :mod:`florist.remote`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import remote
from .data import iter_paths
from .tfrecord import is_record_data, parse_ref, record_ref


def localize(paths: Sequence[str], root: str | Path | None = None) -> list[str]:
    """Paths that can be read: records inside remote TFRecord files (``<file>#<offset>``) get local copies
    of their files; everything else (local paths, remote photos, read where they are) passes through.

    Record files are fetched per remote folder, only those asked for, and kept for next time.
    """
    wanted: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        ref = parse_ref(path)
        if ref and remote.is_remote(ref[0]):
            folder, name = ref[0].rsplit("/", 1)
            wanted[folder].add(name)
    copies = {folder: remote.stage(folder, only=names, root=root).path for folder, names in wanted.items()}
    out = []
    for path in paths:
        ref = parse_ref(path)
        if ref and remote.is_remote(ref[0]):
            folder, name = ref[0].rsplit("/", 1)
            path = record_ref(Path(copies[folder]) / name, ref[1])
        out.append(path)
    return out


def expand_inputs(inputs: Iterable[str | os.PathLike[str]], root: str | Path | None = None) -> list[tuple[str, str]]:
    """``(name to show, path to read)`` for files, folders and glob patterns, local or remote.

    Folders are searched recursively and hidden files skipped, locally and remotely alike.

    Raises:
        FloristError: an input that matches nothing.
    """
    pairs: list[tuple[str, str]] = []
    for raw in inputs:
        if not remote.is_remote(raw):
            pairs += [(str(p), str(p)) for p in iter_paths([str(remote.local_path(raw))])]
            continue
        urls = remote.list_files(str(raw))
        pairs += zip(urls, localize(urls, root))
    return pairs


@contextmanager
def data_input(path: str | Path, *, siblings: Iterable[str] = (), root: str | Path | None = None) -> Iterator[
    remote.Staged
]:
    """The data of ``train`` or ``evaluate``: a photo folder where it is, a URL's included; TFRecord data under a
    URL as a local copy (with ``siblings`` of a single file, such as its ``labels.txt``; see
    :func:`florist.remote.local_input`).
    """
    if remote.is_remote(path) and not is_record_data(path):
        yield remote.Staged(str(path), str(path))
        return
    with remote.local_input(path, siblings=siblings, root=root) as staged:
        yield staged
