"""Crash safety: ``florist train`` killed (SIGKILL) at chosen and random points, rerun, same result.

A kill point is a real ``florist train`` process ended by SIGKILL: at a chosen
file write (``tests/crashpoint.py``: mid-write, complete but not yet renamed, or
just renamed) or at a random moment. Each chain of kills ends with a plain
rerun of the same command, which must complete, reuse the cache entries the
killed runs left, never read a half-written file, and produce the model an
uninterrupted run produces. Two runs sharing one feature cache at the same
time must both succeed and leave every entry valid.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cache_entries
from safetensors.torch import load_file

import florist
from florist import FloristError
from florist.bundle import is_complete
from florist.files import folder_lock
from florist.runfiles import CHECKPOINT
from florist.store import SHARD_MB_ENV
from florist.training.network import load_checkpoint

CRASHPOINT = Path(__file__).with_name("crashpoint.py")

HEAD = {"mode": "head", "epochs": 5, "eval_fraction": 0.25}
HEAD_ARGS = ["--mode", "head", "--epochs", "5", "--eval-fraction", "0.25"]
#: 18 training images, batches of 6, 4 steps: epoch 1 = steps 1-3, epoch 2 = step 4; a checkpoint after each.
FINETUNE = {"mode": "finetune", "blocks": 1, "eval_fraction": 0.25, "steps": 4, "batch_size": 6, "warmup": 0.25}
FINETUNE_ARGS = [
    "--mode", "finetune", "--blocks", "1", "--eval-fraction", "0.25", "--steps", "4", "--batch-size", "6", "--warmup", "0.25"
]
#: Feature cache shards (each published by one rename).
ENTRY = "*.shard"
#: Entries of the head runs below: 18 training images x (clean, flip) + 6 eval images x (clean, flip).
HEAD_ENTRIES = 48
#: Shards of 4 tiny-network feature rows (1 KiB each), so a run publishes many and can be killed between them.
SHARD_MB = str(4 * 1024 / 2**20)


@pytest.fixture(autouse=True, scope="module")
def _small_shards() -> None:
    """Every process of this module, the killed ones included, publishes a shard every 4 feature rows."""
    before = os.environ.get(SHARD_MB_ENV)
    os.environ[SHARD_MB_ENV] = SHARD_MB
    yield
    if before is None:
        os.environ.pop(SHARD_MB_ENV)
    else:
        os.environ[SHARD_MB_ENV] = before


def train_cmd(photos: Path, run: Path, cache: Path, args: list[str]) -> list[str]:
    return ["train", str(photos), "--out", str(run), "--cache-dir", str(cache), "--quiet", *args]


def killed_at(crash_at: str, argv: list[str]) -> None:
    """Run ``florist`` until it kills itself at ``crash_at`` (see tests/crashpoint.py)."""
    env = {**os.environ, "FLORIST_CRASH_AT": crash_at}
    proc = subprocess.run([sys.executable, str(CRASHPOINT), *argv], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {crash_at}: {proc.stderr.decode()[-3000:]}"


def killed_at_random(argv: list[str], cache: Path, rng: random.Random) -> bool:
    """Start ``florist``, SIGKILL it a random moment after it has written something new to the cache.

    Returns False when it finished before the kill came (then nothing was killed).
    """
    before = set(cache.rglob(ENTRY))
    proc = subprocess.Popen([sys.executable, "-m", "florist", *argv], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and not set(cache.rglob(ENTRY)) - before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            return False
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def valid_entries(cache: Path) -> int:
    """How many entries the cache holds; each must pass its checksum (no torn shard under a final name)."""
    return len(cache_entries(cache))


def assert_unfinished(run: Path) -> None:
    with pytest.raises(FloristError, match="no finished model"):
        florist.load(run)


def assert_same_model(run: Path, reference: Path, cache: Path, reference_cache: Path) -> None:
    """The same weights as the reference run; exactly the same when the cached features are.

    Features recomputed after a kill go through the network in smaller batches; CPU
    kernels may round a batch of 1 differently from a batch of 18, so bit-identity
    of the weights is required exactly when every cached feature is bit-identical.
    """
    ours, theirs = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    ours_cached, theirs_cached = cache_entries(cache), cache_entries(reference_cache)
    assert ours_cached.keys() == theirs_cached.keys()
    features_identical = all(np.array_equal(ours_cached[k], theirs_cached[k]) for k in ours_cached)
    for k in ours:
        if features_identical:
            assert torch.equal(ours[k], theirs[k]), k
        else:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5)
    for name in ("train.csv", "eval.csv", "labels.txt"):
        assert (run / name).read_bytes() == (reference / name).read_bytes()
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp")), "a killed run's temporaries are cleaned up"


@pytest.fixture(scope="module")
def head_reference(
    photos: Path, tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """An uninterrupted head run with its own, initially empty cache: (run, cache)."""
    root = tmp_path_factory.mktemp("head-reference")
    florist.train(photos, root / "run", cache_dir=root / "cache", **HEAD, **tiny)
    assert valid_entries(root / "cache") == HEAD_ENTRIES
    return root / "run", root / "cache"


@pytest.mark.slow
def test_killed_while_caching_features_resumes_to_the_same_model(
    photos: Path, tiny: dict[str, str], tiny_cli: list[str], tmp_path: Path, head_reference: tuple[Path, Path]
) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = train_cmd(photos, run, cache, [*HEAD_ARGS, *tiny_cli])

    killed_at(f"{ENTRY}:3:torn", argv)  # mid-write of the 3rd shard
    first = valid_entries(cache)
    assert 0 < first < HEAD_ENTRIES, "the two shards published before the kill"
    assert len(list(cache.rglob(".*.tmp"))) >= 1, "the torn shard exists only as a temporary file"
    assert_unfinished(run)

    killed_at(f"{ENTRY}:4:before", argv)  # rerun: 3 more shards, killed with the 4th written but not renamed
    second = valid_entries(cache)
    assert first < second < HEAD_ENTRIES

    seed = random.randrange(2**32)
    print(f"random kill: seed {seed}")  # shown if the test fails
    killed_at_random(argv, cache, random.Random(seed))  # a moment while caching, training or writing
    cached = valid_entries(cache)

    if not is_complete(run):  # the random kill may come after model.json, as the process exits
        florist.train(photos, run, cache_dir=cache, **HEAD, **tiny)
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["features_computed"] == HEAD_ENTRIES - cached, "every entry the killed runs wrote is reused"
    assert valid_entries(cache) == HEAD_ENTRIES
    assert_same_model(run, head_reference[0], cache, head_reference[1])


@pytest.mark.slow
def test_killed_while_writing_the_run_folder_resumes_to_the_same_model(
    photos: Path, tiny: dict[str, str], tiny_cli: list[str], tmp_path: Path, head_reference: tuple[Path, Path]
) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = train_cmd(photos, run, cache, [*HEAD_ARGS, *tiny_cli])

    killed_at("metrics.json:1:after", argv)  # features cached, head trained, metrics written
    assert valid_entries(cache) == HEAD_ENTRIES
    assert json.loads((run / "metrics.json").read_text())["n_train"] == 18
    assert_unfinished(run)

    killed_at("model.safetensors:1:torn", argv)  # mid-write of the weights
    assert not (run / "model.safetensors").exists()
    assert_unfinished(run)

    killed_at("model.json:1:before", argv)  # weights written, completion mark not yet
    assert (run / "model.safetensors").exists() and not (run / "model.json").exists()
    assert_unfinished(run)

    florist.train(photos, run, cache_dir=cache, **HEAD, **tiny)  # no --overwrite: the run never finished
    assert json.loads((run / "metrics.json").read_text())["features_computed"] == 0
    assert_same_model(run, head_reference[0], cache, head_reference[1])


@pytest.mark.slow
def test_finetune_killed_mid_checkpoint_resumes_from_the_last_good_one(
    photos: Path, tiny: dict[str, str], tiny_cli: list[str], tmp_path: Path
) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = train_cmd(photos, run, cache, [*FINETUNE_ARGS, *tiny_cli])

    # killed mid-write of the 16th shard, while caching pixels and warm-start features (24 + 30 entries)
    killed_at(f"{ENTRY}:16:torn", argv)
    assert 0 < valid_entries(cache) < 24 + 30
    assert not (run / CHECKPOINT).exists()

    # rerun: epoch 1's checkpoint written, killed in the middle of writing epoch 2's
    killed_at(f"{CHECKPOINT}:2:torn", argv)
    valid_entries(cache)
    checkpoint = load_checkpoint(run, torch.load(run / CHECKPOINT, weights_only=True)["fingerprint"])
    assert checkpoint is not None and checkpoint["history"]["step"] == [3], "epoch 1's checkpoint, intact"
    assert_unfinished(run)

    florist.train(photos, run, cache_dir=cache, **FINETUNE, **tiny)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["finetune"]["resumed_from_epoch"] == 1
    assert metrics["features_computed"] == 0
    assert not (run / CHECKPOINT).exists()

    reference = tmp_path / "reference"
    florist.train(photos, reference, cache_dir=tmp_path / "reference-cache", **FINETUNE, **tiny)
    assert json.loads((reference / "metrics.json").read_text())["finetune"]["resumed_from_epoch"] == 0
    assert_same_model(run, reference, cache, tmp_path / "reference-cache")


@pytest.mark.slow
def test_two_runs_sharing_one_cache_at_once(
    photos: Path, tiny_cli: list[str], tmp_path: Path, head_reference: tuple[Path, Path]
) -> None:
    """Both compute the same entries at the same time: both succeed, every entry is whole, same models."""
    cache = tmp_path / "cache"
    args = [*HEAD_ARGS, *tiny_cli]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "florist", *train_cmd(photos, tmp_path / f"run{i}", cache, args)],
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode()[-3000:]
    assert valid_entries(cache) == HEAD_ENTRIES
    computed = [json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["features_computed"] for i in range(2)]
    assert HEAD_ENTRIES <= sum(computed) <= 2 * HEAD_ENTRIES  # each entry computed by one run or by both
    for i in range(2):
        assert_same_model(tmp_path / f"run{i}", head_reference[0], cache, head_reference[1])


def test_a_second_train_into_a_busy_run_folder_is_refused(
    photos: Path, tiny: dict[str, str], tmp_path: Path
) -> None:
    """While one process writes a run folder, another train into it fails at once and touches nothing."""
    run = tmp_path / "run"
    with folder_lock(run):
        with pytest.raises(FloristError, match="being written by another florist process"):
            florist.train(photos, run, **HEAD, **tiny)
    assert sorted(p.name for p in run.iterdir()) == [".florist.lock"]
