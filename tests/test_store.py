"""The sharded feature store: rows round-trip, shards are published whole, damage is caught, old caches are read."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from florist.files import sha256_bytes
from florist.store import MAGIC, SHARD_MB_ENV, STALE_S, FeatureCache, read_index


def sha(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def rows(n: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def filled(root: Path, data: np.ndarray, start: int = 0) -> FeatureCache:
    with FeatureCache(root, "key") as cache:
        for i, row in enumerate(data):
            cache.put(sha(start + i), row)
    return cache


def test_rows_round_trip_through_one_shard_in_any_order(tmp_path):
    data = rows(50)
    filled(tmp_path, data)
    assert len(list((tmp_path / "key").iterdir())) == 1, "one file for 50 rows, no temporaries left"
    cache = FeatureCache(tmp_path, "key")
    order = [7, 3, 49, 0, 8, 9, 10]
    got = cache.get_many([sha(i) for i in order] + [None, sha(999)])
    assert sorted(got) == list(range(len(order)))  # the unknown and the missing are simply absent
    for k, i in enumerate(order):
        np.testing.assert_array_equal(got[k], data[i])
    assert sha(5) in cache and sha(999) not in cache
    assert cache.get(sha(999)) is None


def test_long_runs_of_rows_are_read_in_bounded_pieces(tmp_path, monkeypatch):
    from florist import store

    data = rows(40)
    filled(tmp_path, data)
    reads = []
    real_read_at = FeatureCache._read_at
    monkeypatch.setattr(store, "READ_BYTES", 7 * 6 * 4)  # 7 rows a read
    monkeypatch.setattr(FeatureCache, "_read_at", lambda self, i, offset, n: reads.append(n) or real_read_at(self, i, offset, n))
    got = FeatureCache(tmp_path, "key").get_many([sha(i) for i in range(40)])
    np.testing.assert_array_equal(np.stack([got[i] for i in range(40)]), data)
    assert reads == [7 * 24] * 5 + [5 * 24], "front to back, 7 rows at a time"


def test_a_shard_is_published_when_it_reaches_its_size(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARD_MB_ENV, str(10 * 6 * 4 / 2**20))  # 10 rows of 6 float32
    data = rows(35)
    cache = FeatureCache(tmp_path, "key")
    for i, row in enumerate(data[:25]):
        cache.put(sha(i), row)
    assert len(list((tmp_path / "key").glob("*.shard"))) == 2, "two full shards published while writing"
    assert len(FeatureCache(tmp_path, "key").get_many([sha(i) for i in range(35)])) == 20, "not the open one"
    for i, row in enumerate(data[25:], start=25):
        cache.put(sha(i), row)
    cache.close()
    shards = sorted((tmp_path / "key").glob("*.shard"))
    assert [len(read_index(p).shas) for p in shards] == [10, 10, 10, 5]
    got = FeatureCache(tmp_path, "key").get_many([sha(i) for i in range(35)])
    np.testing.assert_array_equal(np.stack([got[i] for i in range(35)]), data)


def test_a_damaged_row_is_refused_and_a_newer_copy_wins(tmp_path):
    data = rows(4)
    filled(tmp_path, data)
    (shard,) = (tmp_path / "key").glob("*.shard")
    raw = bytearray(shard.read_bytes())
    raw[2 * 6 * 4 + 3] ^= 0x10  # a bit inside row 2's numbers: still a valid float
    shard.write_bytes(bytes(raw))
    got = FeatureCache(tmp_path, "key").get_many([sha(i) for i in range(4)])
    assert sorted(got) == [0, 1, 3]
    filled(tmp_path, data[2:3], start=2)  # recomputed by a later run
    got = FeatureCache(tmp_path, "key").get_many([sha(i) for i in range(4)])
    np.testing.assert_array_equal(np.stack([got[i] for i in range(4)]), data)


@pytest.mark.parametrize("damage", ["truncated", "footer", "shape"])
def test_a_damaged_shard_is_removed_never_misread(tmp_path, damage, caplog):
    filled(tmp_path, rows(8))
    (shard,) = (tmp_path / "key").glob("*.shard")
    raw = shard.read_bytes()
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "footer":
        raw = raw[: -len(MAGIC)] + b"XXXXXXXX"
    else:  # the footer still parses, but names 3 numbers a row instead of 6: every row misaligned
        raw = raw.replace(b'"shape": [6]', b'"shape": [3]')
    shard.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="florist"):
        got = FeatureCache(tmp_path, "key").get_many([sha(i) for i in range(8)])
    assert got == {}
    if damage != "shape":
        assert not shard.exists() and "damaged shard" in caplog.text


def test_an_unfinished_shard_is_invisible_and_cleaned_up_once_stale(tmp_path):
    """A writer killed before publishing leaves a temporary file no reader looks at."""
    cache = FeatureCache(tmp_path, "key")
    for i, row in enumerate(rows(3)):
        cache.put(sha(i), row)  # never flushed: as if killed here
    cache._writer._file.flush()
    (tmp,) = (tmp_path / "key").glob(".*.tmp")
    assert FeatureCache(tmp_path, "key").get_many([sha(i) for i in range(3)]) == {}
    filled(tmp_path, rows(1), start=10)
    assert tmp.exists(), "a live writer's file is left alone"
    old = time.time() - STALE_S - 60
    os.utime(tmp, (old, old))
    filled(tmp_path, rows(1), start=11)
    assert not tmp.exists(), "a dead writer's file is removed"


def test_concurrent_writers_publish_their_own_shards(tmp_path):
    """Two processes (here two stores) writing one key at once: no lock, nothing lost or mixed."""
    a, b = FeatureCache(tmp_path, "key"), FeatureCache(tmp_path, "key")
    data = rows(20)
    for i in range(10):
        a.put(sha(i), data[i])
        b.put(sha(10 + i), data[10 + i])
        b.put(sha(i), data[i])  # both computed the same image
    a.close()
    b.close()
    assert len(list((tmp_path / "key").glob("*.shard"))) == 2
    got = FeatureCache(tmp_path, "key").get_many([sha(i) for i in range(20)])
    np.testing.assert_array_equal(np.stack([got[i] for i in range(20)]), data)


def test_rows_of_another_shape_or_type_go_to_their_own_shard(tmp_path):
    with FeatureCache(tmp_path, "key") as cache:
        cache.put(sha(0), np.arange(6, dtype=np.float32))
        cache.put(sha(1), np.arange(12, dtype=np.uint8).reshape(3, 4))
    got = FeatureCache(tmp_path, "key").get_many([sha(0), sha(1)])
    assert got[0].dtype == np.float32 and got[1].dtype == np.uint8 and got[1].shape == (3, 4)
    np.testing.assert_array_equal(got[1], np.arange(12).reshape(3, 4))


def _legacy_entry(root: Path, image_sha: str, array: np.ndarray, checksum: str | None = None) -> Path:
    """An entry as florist wrote them before shards: one safetensors file per image."""
    path = root / "key" / image_sha[:2] / f"{image_sha}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = sha256_bytes(f"{array.dtype.str}{array.shape}".encode() + array.tobytes())
    path.write_bytes(save({"features": array}, metadata={"sha256": checksum or digest}))
    return path


def test_an_older_per_image_cache_is_read_checked_and_copied_into_shards(tmp_path, caplog):
    data = rows(3)
    _legacy_entry(tmp_path, sha(0), data[0])
    _legacy_entry(tmp_path, sha(1), data[1], checksum="0" * 64)  # damaged: its checksum no longer matches
    with caplog.at_level(logging.INFO, logger="florist"), FeatureCache(tmp_path, "key") as cache:
        got = cache.get_many([sha(0), sha(1), sha(2)])
    assert list(got) == [0] and np.array_equal(got[0], data[0])
    assert "older florist" in caplog.text
    (shard,) = (tmp_path / "key").glob("*.shard")
    assert read_index(shard).shas == [sha(0)], "the good entry now lives in a shard"
