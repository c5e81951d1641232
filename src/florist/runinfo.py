"""``run.json``: what it takes to reproduce a run.

Written into every run folder next to the model: the command line, the seed
and full training config, the versions of the packages that shape the result,
a hash of the data (every image's path relative to the data folder, its class
and its content hash), the florist git commit when florist runs from a checkout,
and the machine. Two runs with the same ``data_sha256``, config and versions
are expected to give the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import remote
from .data import Item

PACKAGES = ("florist", "torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "scikit-learn")


def package_versions() -> dict[str, str | None]:
    """Installed version of each package that affects results (None if absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def data_hash(data_dir: str | Path, classes: Sequence[str], items: Sequence[Item]) -> str:
    """SHA-256 over (relative path, class, content hash) of every image used, in a fixed order.

    The same photos give the same hash in a local folder and under a URL.
    """
    h = hashlib.sha256()
    rows = sorted((_relative(it.path, data_dir), classes[it.label], it.sha256) for it in items)
    for row in rows:
        h.update("\t".join(row).encode("utf-8", errors="surrogateescape") + b"\n")  # any file name
    return h.hexdigest()


def _relative(path: str, data_dir: str | Path) -> str:
    """``path`` relative to the data folder as the user names it (a TFRecord file's folder for its records)."""
    if remote.is_remote(data_dir):
        return remote.relative(path, data_dir)
    root = Path(os.path.abspath(data_dir))
    if root.is_file():  # a TFRecord file: its records are named "<file>#<offset>"
        root = root.parent
    # Symlinks are not followed, since a photo may link to a file stored anywhere else.
    return os.path.relpath(os.path.abspath(path), root)


def git_commit() -> str | None:
    """The commit of the florist checkout this code runs from, if it is one."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def run_info(data_dir: str | Path, classes: Sequence[str], items: Sequence[Item], config: dict[str, Any]) -> dict:
    """Everything :mod:`florist.train` writes to ``run.json``."""
    return {
        "command": sys.argv,
        "data_dir": str(data_dir) if remote.is_remote(data_dir) else str(Path(data_dir).resolve()),
        "data_sha256": data_hash(data_dir, classes, items),
        "n_images": len(items),
        "seed": config.get("seed"),
        "config": config,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
    }
