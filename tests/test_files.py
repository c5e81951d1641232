"""files: atomic writes, CSV/JSON that round-trip any file name, the run-folder lock."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from florist.errors import FloristError
from florist.files import (
    LOCK_NAME,
    atomic_write_csv,
    atomic_write_json,
    folder_lock,
    read_csv,
    remove_stale_temporaries,
)

ODD_NAMES = [
    "plain.jpg",
    "carriage\rreturn.jpg",
    "line\nbreak.jpg",
    "cr\r\nlf.jpg",
    'quote " comma, semi;colon.jpg',
    "tab\there.jpg",
    "rose\u0301 🌸 日本.jpg",
    "para\u2029graph.jpg",
    os.fsdecode(b"latin-1 caf\xe9.jpg"),  # not UTF-8: a lone surrogate in Python
    "",
]


def test_csv_round_trips_any_file_name(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    atomic_write_csv(path, ("path", "n"), [(name, i) for i, name in enumerate(ODD_NAMES)])
    assert [row["path"] for row in read_csv(path)] == ODD_NAMES
    assert [row["n"] for row in read_csv(path)] == [str(i) for i in range(len(ODD_NAMES))]
    assert b"latin-1 caf\xe9.jpg" in path.read_bytes(), "the name's own bytes, not a replacement"
    assert path.read_bytes().startswith(b"path,n\nplain.jpg,0\n"), "ordinary rows stay unquoted"


def test_json_with_non_utf8_names_stays_valid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    atomic_write_json(path, {"paths": ODD_NAMES})
    text = path.read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert json.loads(text)["paths"] == ODD_NAMES
    atomic_write_json(path, {"name": "rosé"})
    assert "rosé" in path.read_text(encoding="utf-8"), "escapes only when needed"


def _hold_in_child(folder: Path) -> int:
    """Fork a process that takes ``folder``'s lock and then waits to be killed; return its pid."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no florist work beyond the lock, then wait
        try:
            with folder_lock(folder):
                os.write(ready_w, b"x")
                signal.pause()
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    return pid


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with folder_lock(run):
        with pytest.raises(FloristError, match="being written by another florist process"):
            with folder_lock(run):
                pass
    pid = _hold_in_child(run)  # another process
    try:
        with pytest.raises(FloristError, match=r"being written by another florist process \(it holds .*\.florist\.lock"):
            with folder_lock(run):
                pass
    finally:
        os.kill(pid, signal.SIGKILL)  # a killed holder: the OS drops its lock
        os.waitpid(pid, 0)
    with folder_lock(run):
        pass
    assert (run / LOCK_NAME).exists()


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".model.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    (tmp_path / "model.json").write_text("{}")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "model.json"]


def test_run_files_and_cache_shards_are_flushed_to_disk_but_not_entry_by_entry(tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    from florist.store import FeatureCache

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write_json(tmp_path / "metrics.json", {"top1": 0.5})
    assert len(synced) == 1, "a run's file must reach the disk before it replaces the old one"
    cache = FeatureCache(tmp_path / "cache", "key")
    values = np.arange(8, dtype=np.float32)
    for i in range(100):
        cache.put(f"{i:064x}", values + i)
    assert len(synced) == 1, "entries are appended to an open shard, not flushed one by one"
    cache.flush()
    assert len(synced) == 2, "a shard reaches the disk before it is published"
    np.testing.assert_array_equal(cache.get(f"{7:064x}"), values + 7)
