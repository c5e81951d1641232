"""Paths as users and manifests give them -> local files that can be read.

:func:`expand_inputs` takes what ``florist predict`` takes: files, folders and
glob patterns, local or remote. :func:`localize` takes the paths of a manifest,
which may name remote files or records inside TFRecord files (``<file>#<offset>``).
Remote files are fetched per folder into the local cache (see :mod:`florist.remote`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import remote
from .data import iter_paths
from .tfrecord import parse_ref, record_ref


def localize(paths: Sequence[str], root: str | Path | None = None) -> list[str]:
    """Local copies of remote files (and of TFRecord records named ``<file>#<offset>``); local paths pass through.

    Files are fetched per remote folder, only those asked for, and kept for next time.
    """

    def split(path: str) -> tuple[str, int | None]:
        ref = parse_ref(path)
        return ref if ref else (path, None)

    wanted: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        file, _ = split(path)
        if remote.is_remote(file):
            folder, name = file.rsplit("/", 1)
            wanted[folder].add(name)
    copies = {folder: remote.stage(folder, only=names, root=root).path for folder, names in wanted.items()}
    out = []
    for path in paths:
        file, offset = split(path)
        if remote.is_remote(file):
            folder, name = file.rsplit("/", 1)
            file = str(copies[folder] / name)
        out.append(file if offset is None else record_ref(file, offset))
    return out


def expand_inputs(inputs: Iterable[str | os.PathLike[str]], root: str | Path | None = None) -> list[tuple[str, str]]:
    """``(name to show, local file)`` for files, folders and glob patterns, local or remote.

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
