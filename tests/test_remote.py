"""Remote paths (fsspec's memory filesystem, an S3 server on loopback) and torchrun feature extraction."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from conftest import cache_entries
from safetensors.torch import load as load_tensors
from servers import free_port  # tests/servers.py
from typer.testing import CliRunner

import florist
from florist import FloristError, remote
from florist.cli import app
from florist.inputs import localize
from florist.remote import default_cache_dir

runner = CliRunner()
HEAD = {"mode": "head", "eval_fraction": 0.25}


@pytest.fixture
def mem() -> str:
    """A fresh folder on fsspec's in-process memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _memfs():
    return fsspec.filesystem("memory")


def _upload(local: Path, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(str(local), path, recursive=True)


def _files(url: str) -> dict[str, bytes]:
    """``{relative name: content}`` of every file under a URL."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {name[len(path) :].lstrip("/"): fs.cat_file(name) for name in fs.find(path)}


# ---------------------------------------------------------------------------
# Paths and staging
# ---------------------------------------------------------------------------


def test_urls_are_told_from_local_paths(photos: Path, tmp_path: Path) -> None:
    assert remote.is_remote("s3://bucket/photos") and remote.is_remote("gs://b/x") and remote.is_remote("memory://x")
    assert not remote.is_remote("photos/roses") and not remote.is_remote(Path("s3:/x"))
    assert not remote.is_remote(f"file://{tmp_path}")
    assert remote.local_path(f"file://{tmp_path}") == tmp_path
    assert remote.join("s3://b/runs/x/", "metrics.json") == "s3://b/runs/x/metrics.json"
    with pytest.raises(FloristError, match="must be a local folder"):
        remote.require_local("gs://bucket/cache", "the feature cache")
    with pytest.raises(FloristError, match="cache_dir must be a local folder, got memory://cache"):
        florist.train(tmp_path, tmp_path / "run", cache_dir="memory://cache")
    with pytest.raises(FloristError, match="unknown-proto"):
        remote.stage("unknown-proto://x/y")
    florist.prepare(f"file://{photos}", f"file://{tmp_path}/prep")  # file:// is a local path
    assert (tmp_path / "prep" / "train.csv").read_text().splitlines()[1].startswith(str(photos))


def test_input_is_fetched_once_and_follows_remote_changes(mem: str, tmp_path: Path) -> None:
    fs = _memfs()
    fs.pipe({f"{mem}/a/one.txt": b"1", f"{mem}/two.txt": b"2", f"{mem}/.hidden": b"h"})
    staged = remote.stage(mem, root=tmp_path)
    assert staged.is_remote and staged.path.parent == (tmp_path / "remote").resolve()
    assert sorted(p.relative_to(staged.path).as_posix() for p in staged.path.rglob("*") if p.is_file()) == [
        "a/one.txt", "two.txt"]
    first = (staged.path / "two.txt").stat().st_mtime_ns

    time.sleep(0.01)
    assert remote.stage(mem, root=tmp_path).path == staged.path
    assert (staged.path / "two.txt").stat().st_mtime_ns == first, "unchanged files are not fetched again"

    fs.pipe(f"{mem}/two.txt", b"2 changed")
    fs.rm(f"{mem}/a/one.txt")
    remote.stage(mem, root=tmp_path)
    assert (staged.path / "two.txt").read_bytes() == b"2 changed"
    assert not (staged.path / "a" / "one.txt").exists(), "a file deleted remotely is deleted locally"
    assert staged.to_url(str(staged.path / "two.txt")) == f"{mem}/two.txt"
    assert staged.to_url("/elsewhere/x.jpg") == "/elsewhere/x.jpg"

    single = remote.stage(f"{mem}/two.txt", siblings=["labels.txt"], root=tmp_path)
    assert single.path.read_bytes() == b"2 changed" and single.path.name == "two.txt"
    assert localize([f"{mem}/two.txt#7", "local.jpg"], root=tmp_path) == [f"{single.path}#7", "local.jpg"]

    with pytest.raises(FloristError, match=f"not found: {mem}/nope"):
        remote.stage(f"{mem}/nope", root=tmp_path)
    with pytest.raises(FloristError, match=f"no finished model in {mem}"):  # errors name the URL
        florist.load(mem)


def test_output_is_uploaded_on_success_with_model_json_last(mem: str, tmp_path: Path, monkeypatch) -> None:
    fs = _memfs()
    fs.pipe({f"{mem}/model.json": b"old", f"{mem}/old.tfrecord": b"o", f"{mem}/keep.txt": b"k"})
    calls: list[list[str]] = []
    put = fs.put
    monkeypatch.setattr(fs, "put", lambda lpaths, rpaths: (calls.append(rpaths), put(lpaths, rpaths)))

    with remote.local_output(mem, fetch=["model.json"], replaces=["*.tfrecord"], root=tmp_path) as out:
        assert (out.path / "model.json").read_bytes() == b"old", "asked-for files are fetched"
        assert not (out.path / "keep.txt").exists()
        (out.path / "model.json").unlink()
        (out.path / "tb").mkdir()
        (out.path / "tb" / "events").write_bytes(b"e")
        (out.path / "model.safetensors").write_bytes(b"w")
        (out.path / "new.tfrecord").write_bytes(b"n")
        (out.path / "model.json").write_bytes(b"new")
        assert calls == [], "nothing is uploaded while the block runs (sync_every 60 s)"
    assert calls[-1] == [f"{mem.removeprefix('memory://')}/model.json"], "the completion mark goes last"
    assert _files(mem) == {
        "model.json": b"new", "model.safetensors": b"w", "tb/events": b"e", "new.tfrecord": b"n", "keep.txt": b"k",
    }, "old.tfrecord was replaced; keep.txt is not the output's business"
    assert not out.path.exists(), "the local working folder is removed after the upload"


def test_output_is_uploaded_while_written_and_on_failure(mem: str, tmp_path: Path) -> None:
    fs = _memfs()
    with pytest.raises(KeyboardInterrupt):
        with remote.local_output(mem, root=tmp_path, sync_every=0.05) as out:
            (out.path / "checkpoint.pt").write_bytes(b"epoch 1")
            deadline = time.monotonic() + 20
            while not fs.exists(f"{mem}/checkpoint.pt") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fs.cat_file(f"{mem}/checkpoint.pt") == b"epoch 1", "uploaded in the background"
            (out.path / "checkpoint.pt").write_bytes(b"epoch 2")
            (out.path / "model.json").write_bytes(b"{}")
            raise KeyboardInterrupt
    assert _files(mem) == {"checkpoint.pt": b"epoch 2"}, "a failed run uploads its progress, never model.json"


# ---------------------------------------------------------------------------
# train -> evaluate -> predict with every path on memory://
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mem_run(
    photos: Path, tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """Photos on memory://, a head-mode run trained from there into memory://; and its cache folder."""
    root = f"memory://{uuid.uuid4().hex[:8]}"
    _upload(photos, f"{root}/photos")
    cache = tmp_path_factory.mktemp("mem-cache")
    florist.train(f"{root}/photos", f"{root}/runs/head", cache_dir=cache, **HEAD, **tiny)
    yield root, cache
    _memfs().rm(root.removeprefix("memory://"), recursive=True)


def test_train_evaluate_predict_on_memory(mem_run: tuple[str, Path]) -> None:
    root, cache = mem_run
    run = f"{root}/runs/head"
    files = _files(run)
    assert {"model.json", "model.safetensors", "metrics.json", "run.json", "train.csv", "eval.csv"} <= set(files)
    assert any(name.startswith("tb/events.out.tfevents") for name in files), "TensorBoard logs travel with the run"
    assert "checkpoint.pt" not in files
    assert not list((cache / "remote").glob("out-*")), "no local copy of the run is left behind"
    eval_rows = files["eval.csv"].decode().splitlines()[1:]
    assert eval_rows and all(row.startswith(f"{root}/photos/") for row in eval_rows), "manifests name the URLs"
    assert not list((cache / "remote").glob("*")), "the photos were read where they are: nothing staged or kept"
    assert json.loads(files["run.json"])["data_dir"] == f"{root}/photos"

    metrics = json.loads(files["metrics.json"])
    assert florist.evaluate(run)["top1"] == pytest.approx(metrics["top1"])
    on_folder = florist.evaluate(run, f"{root}/photos")
    assert on_folder["n"] == 24 and on_folder["top1"] == 1.0

    predictions = florist.load(run).predict([f"{root}/photos/red", f"{root}/photos/blue/*_0[12].jpg"], top_k=1)
    assert [p.path for p in predictions[:2]] == [f"{root}/photos/red/red_00.jpg", f"{root}/photos/red/red_01.jpg"]
    assert [p.labels[0] for p in predictions] == ["red"] * 8 + ["blue"] * 2
    assert predictions[-1].path.endswith("/photos/blue/blue_02.jpg")


def test_tfrecords_on_memory_train_the_same_model(
    mem_run: tuple[str, Path], tiny: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    root, cache = mem_run
    records = f"{root}/records"
    florist.prepare(f"{root}/photos", f"{root}/prep", eval_fraction=0.25)
    rows = _files(f"{root}/prep")["train.csv"].decode().splitlines()[1:]
    assert len(rows) == 18 and all(row.startswith(f"{root}/photos/") for row in rows)

    florist.tfrecord.prepare_tfrecords(f"{root}/photos", records, shards=2, eval_fraction=0.25)
    florist.tfrecord.prepare_tfrecords(f"{root}/photos", records, shards=1, eval_fraction=0.25)
    assert sorted(_files(records)) == ["eval.tfrecord", "labels.txt", "skipped.csv", "train.tfrecord"], (
        "the 2-shard files were replaced"
    )
    florist.train(records, f"{root}/runs/tfr", cache_dir=cache, **HEAD, **tiny)
    from_folder = load_tensors(_files(f"{root}/runs/head")["model.safetensors"])
    from_records = load_tensors(_files(f"{root}/runs/tfr")["model.safetensors"])
    assert all(torch.equal(from_folder[k], from_records[k]) for k in from_folder)

    rows = _files(f"{root}/runs/tfr")["eval.csv"].decode().splitlines()[1:]
    assert rows and all(row.startswith(f"{records}/eval.tfrecord#") for row in rows)
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path))  # cold cache: the records must be fetched and read
    assert florist.evaluate(f"{root}/runs/tfr")["top1"] == 1.0
    assert list((tmp_path / "remote").glob("in-*/eval.tfrecord"))


@pytest.mark.slow
def test_finetune_resumes_from_a_remote_checkpoint(
    photos: Path, mem: str, tiny: dict[str, str], tmp_path: Path
) -> None:
    """A run killed after its first epoch left checkpoint.pt remotely; the re-run resumes from it."""
    import florist.training.network as ft

    settings = {"mode": "finetune", "eval_fraction": 0.25, "steps": 4, "batch_size": 9, "warmup": 0.25}
    settings.update(tiny)
    original = ft._Tracker.__call__

    def crash_after_checkpoint(self, history):
        original(self, history)
        raise KeyboardInterrupt("simulated pre-emption")

    ft._Tracker.__call__ = crash_after_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            florist.train(photos, f"{mem}/run", **settings)
    finally:
        ft._Tracker.__call__ = original
    assert set(_files(f"{mem}/run")) >= {"checkpoint.pt"} and "model.json" not in _files(f"{mem}/run")

    florist.train(photos, f"{mem}/run", **settings)
    files = _files(f"{mem}/run")
    assert json.loads(files["metrics.json"])["finetune"]["resumed_from_epoch"] == 1
    assert "model.json" in files and "checkpoint.pt" not in files


# ---------------------------------------------------------------------------
# An S3 server on loopback (moto), through the command line
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A moto S3 server on 127.0.0.1 with a bucket holding the photos; the environment points s3fs at it."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": nowhere,
            "AWS_SHARED_CREDENTIALS_FILE": nowhere,
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.filesystem("s3").mkdir("florist-test")
        _upload(photos, "s3://florist-test/photos")
        yield "s3://florist-test"
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_cli_train_evaluate_predict_on_s3(s3: str, tiny_cli: list[str]) -> None:
    run = f"{s3}/runs/cli"
    args = ["--mode", "head", "--eval-fraction", "0.25", "--quiet", *tiny_cli]
    result = runner.invoke(app, ["train", f"{s3}/photos", "--out", run, *args, "--json"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.output)
    assert {"model.json", "model.safetensors", "metrics.json", "eval.csv"} <= set(_files(run))

    result = runner.invoke(app, ["evaluate", run, "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["top1"] == pytest.approx(trained["top1"])

    result = runner.invoke(app, ["predict", run, f"{s3}/photos/green", "--top-k", "1", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 8 and {p["label"] for p in lines} == {"green"}
    assert lines[0]["path"] == f"{s3}/photos/green/green_00.jpg"

    again = runner.invoke(app, ["train", f"{s3}/photos", "--out", run, *args])
    assert again.exit_code == 2
    assert f"{run} already holds a trained model" in " ".join(again.output.split())


def test_storage_failures_are_one_line_errors(s3: str, monkeypatch) -> None:
    import s3fs

    with pytest.raises(FloristError, match=f"not found: {s3}/no-such-run"):
        florist.evaluate(f"{s3}/no-such-run")
    result = runner.invoke(app, ["predict", f"{s3}/no-such-run", "x.jpg"])
    assert result.exit_code == 2 and "not found: s3://" in result.output

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(FloristError, match=f"could not read {s3}/photos: NoCredentialsError"):
            florist.prepare(f"{s3}/photos")
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------
# Streaming: remote photos are read where they are, by whichever process decodes them
# ---------------------------------------------------------------------------


@pytest.fixture
def reads(monkeypatch) -> dict[str, list]:
    """Every fetch from remote storage (``fetched``) and staged download (``staged``); each photo kept
    (``kept``: its URL, and how many fetches came before); the most bytes a photo cache held after a write (``peak``)."""
    seen: dict[str, list] = {"fetched": [], "staged": [], "kept": [], "peak": [0]}
    fetch, download, put = remote._fetch, remote._download, remote.PhotoCache.put

    def fetching(url: str) -> bytes:
        seen["fetched"].append(url)
        return fetch(url)

    def downloading(fs, rpaths, lpaths) -> None:
        seen["staged"] += rpaths
        download(fs, rpaths, lpaths)

    def keeping(self: remote.PhotoCache, url: str, data: bytes) -> None:
        put(self, url, data)
        held = sum(f.stat().st_size for f in self.files.iterdir())  # temporary files included
        seen["peak"][0] = max(seen["peak"][0], held)
        if self._path(url).is_file():
            seen["kept"].append((url, len(seen["fetched"])))

    monkeypatch.setattr(remote, "_fetch", fetching)
    monkeypatch.setattr(remote, "_download", downloading)
    monkeypatch.setattr(remote.PhotoCache, "put", keeping)
    return seen


def _weights(run: str | Path) -> dict[str, torch.Tensor]:
    data = _files(run)["model.safetensors"] if remote.is_remote(run) else (Path(run) / "model.safetensors").read_bytes()
    return load_tensors(data)


def test_photos_on_s3_are_streamed_and_train_the_local_model(
    photos: Path, s3: str, tiny: dict[str, str], tmp_path: Path, reads: dict[str, list]
) -> None:
    """Head mode from s3://: no photo touches the local disk, and the model is the local folder's, bit for bit."""
    local = florist.train(photos, tmp_path / "local", cache_dir=tmp_path / "c1", **HEAD, **tiny)
    reads["fetched"].clear()
    run = f"{s3}/runs/streamed"
    streamed = florist.train(f"{s3}/photos", run, cache_dir=tmp_path / "c2", **HEAD, **tiny)

    assert reads["staged"] == [] and reads["kept"] == [], "head mode stages and keeps no photo"
    assert not list((tmp_path / "c2" / "remote").glob("*")), "nothing under $FLORIST_CACHE/remote/"
    assert len(reads["fetched"]) >= 24 and all(u.startswith(f"{s3}/photos/") for u in reads["fetched"])
    ours, theirs = _weights(run), _weights(tmp_path / "local")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), "the same model"
    paths = [str(p) for p in sorted(photos.rglob("*.jpg"))]
    np.testing.assert_allclose(streamed.predict_proba(paths)[0], local.predict_proba(paths)[0], rtol=0, atol=1e-6)

    files = _files(run)
    info, local_info = json.loads(files["run.json"]), json.loads((tmp_path / "local" / "run.json").read_text())
    assert info["data_dir"] == f"{s3}/photos" and info["data_sha256"] == local_info["data_sha256"]
    rows = files["train.csv"].decode().splitlines()[1:]
    assert len(rows) == 18 and all(row.startswith(f"{s3}/photos/") for row in rows), "manifests name the URLs"

    reads["fetched"].clear()
    again = florist.train(f"{s3}/photos", tmp_path / "again", cache_dir=tmp_path / "c1", **HEAD, **tiny)
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["features_computed"] == 0, (
        "the S3 photos hit the features the local folder's run cached: same bytes, same keys"
    )
    assert again.classes == local.classes
    reads["fetched"].clear()
    florist.train(f"{s3}/photos", tmp_path / "warm", cache_dir=tmp_path / "c2", **HEAD, **tiny)
    assert len(reads["fetched"]) == florist.report.SAMPLE_IMAGES, (
        "a re-run reads only the photos TensorBoard shows: the checks are remembered by ETag, the features cached"
    )


@pytest.mark.slow
def test_finetune_from_s3_keeps_photos_within_the_disk_budget(
    photos: Path, s3: str, tiny: dict[str, str], tmp_path: Path, reads: dict[str, list]
) -> None:
    """finetune reads each photo in several passes; a budget below the photos' total keeps some of them, never more."""
    total = sum(p.stat().st_size for p in photos.rglob("*.jpg"))
    budget_mb = total / 3 / 1e6
    settings = {"mode": "finetune", "eval_fraction": 0.25, "steps": 2, "batch_size": 9, "warmup": 0.5, **tiny}
    local = florist.train(photos, tmp_path / "local", cache_dir=tmp_path / "c1", **settings)
    reads["fetched"].clear()
    streamed = florist.train(
        f"{s3}/photos", tmp_path / "run", cache_dir=tmp_path / "c2", disk_budget=budget_mb, **settings
    )

    assert 0 < reads["peak"][0] <= budget_mb * 1e6, "some photos were kept, never more bytes than the budget"
    assert len(reads["kept"]) < 24 and reads["staged"] == []
    assert len(set(reads["fetched"])) == 24 and len(reads["fetched"]) > 24, "photos beyond the budget fetched again"
    for url, fetches in reads["kept"]:
        assert url not in reads["fetched"][fetches:], "once kept, a photo is read from its local copy"
    assert not list((tmp_path / "c2" / "remote").glob("*")), "the run's photo cache is removed at its end"
    ours, theirs = _weights(tmp_path / "run"), _weights(tmp_path / "local")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    paths = [str(p) for p in sorted(photos.rglob("*.jpg"))]
    np.testing.assert_allclose(streamed.predict_proba(paths)[0], local.predict_proba(paths)[0], atol=1e-5)


def test_photo_cache_holds_at_most_its_budget_and_goes_with_its_run(tmp_path: Path, monkeypatch) -> None:
    abandoned = tmp_path / "remote" / f"{remote.PHOTO_CACHE_PREFIX}killed"
    (abandoned / "files").mkdir(parents=True)
    os.utime(abandoned, (time.time() - 2 * remote.ABANDONED_AFTER_S,) * 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes on this machine share the budget
    with remote.keeping_photos(20, root=tmp_path) as cache:
        assert not abandoned.exists(), "a killed run's cache is removed"
        assert cache.budget == 10 and remote.PhotoCache.active() == cache, "workers find it in the environment"
        for name in "abc":
            cache.put(f"memory://x/{name}.jpg", name.encode() * 4)
        assert cache.get("memory://x/a.jpg") == b"aaaa" and cache.get("memory://x/b.jpg") == b"bbbb"
        assert cache.get("memory://x/c.jpg") is None, "12 bytes would exceed the 10-byte budget"
        assert sum(f.stat().st_size for f in cache.files.iterdir()) == 8
    assert remote.PhotoCache.active() is None and not cache.folder.exists()
    with remote.keeping_photos(0, root=tmp_path) as nothing:
        assert nothing is None and remote.PhotoCache.active() is None


def test_transient_read_failures_are_retried_with_backoff(mem: str, monkeypatch) -> None:
    fs = _memfs()
    fs.pipe(f"{mem}/a.jpg", b"photo")
    calls: list[str] = []
    waits: list[float] = []
    failures = [ConnectionError("reset by peer")] * 2
    cat_file = type(fs).cat_file  # fsspec makes an instance per thread: patch them all

    def flaky(self, path, *args, **kwargs):
        calls.append(path)
        if failures:
            raise failures.pop(0)
        return cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "cat_file", flaky)
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    assert remote.read_url(f"{mem}/a.jpg") == b"photo" and len(calls) == 3
    first = remote.FIRST_BACKOFF_S
    assert first / 2 <= waits[0] <= first and first <= waits[1] <= 2 * first, f"exponential backoff: {waits}"

    calls.clear()
    waits.clear()
    failures[:] = [TimeoutError("slow down")] * remote.READ_ATTEMPTS
    with pytest.raises(remote.Unavailable, match=rf"could not read {mem}/a.jpg \(5 attempts\): TimeoutError: slow"):
        remote.read_url(f"{mem}/a.jpg")
    assert len(calls) == remote.READ_ATTEMPTS and len(waits) == remote.READ_ATTEMPTS - 1

    calls.clear()
    waits.clear()
    with pytest.raises(florist.data.BadImage, match="^file not found$"):
        florist.data.read_file(f"{mem}/gone.jpg")
    assert len(calls) == 1 and waits == [], "a missing object is not retried"


def test_a_photo_gone_since_the_listing_is_skipped_and_an_outage_stops_prepare(
    photos: Path, mem: str, tmp_path: Path, monkeypatch
) -> None:
    _upload(photos, f"{mem}/photos")
    fs = _memfs()
    cat_file = type(fs).cat_file  # fsspec makes an instance per thread: patch them all
    gone, down = f"{mem}/photos/red/red_03.jpg".removeprefix("memory://"), []

    def storage(self, path, *args, **kwargs):
        if path == gone:
            raise FileNotFoundError(path)
        if down:
            raise ConnectionError("network is unreachable")
        return cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "cat_file", storage)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    memo = tmp_path / "checks.json"
    prepared = florist.data.prepare(f"{mem}/photos", eval_fraction=0.25, check_memo=memo)
    assert [(s.path, s.reason) for s in prepared.skipped] == [(f"memory://{gone}", "file not found")]
    assert len(prepared.train) + len(prepared.eval) == 23

    fs.pipe(f"{mem}/photos/red/new.jpg", (photos / "red" / "red_00.jpg").read_bytes())
    down.append(True)
    with pytest.raises(FloristError, match=r"^could not read memory://.*/red/new.jpg \(5 attempts\): ConnectionError"):
        florist.data.prepare(f"{mem}/photos", eval_fraction=0.25, check_memo=memo)
    assert f"memory://{gone}" in json.loads(memo.read_text()), "the verdicts of the first check are kept"


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_decoding_workers_read_s3_in_their_own_processes(
    photos: Path, s3: str, tiny_backbone, start: str, tmp_path: Path
) -> None:
    """fsspec makes each worker process its own S3 filesystem; spawned workers find the photo cache too."""
    from torch.utils.data import DataLoader

    from florist.features import _ImageFiles
    from florist.files import sha256_bytes

    names = ["red/red_00.jpg", "green/green_01.jpg", "blue/blue_02.jpg"]
    files = _ImageFiles([f"{s3}/photos/{n}" for n in names], tiny_backbone.data_config, ["clean"])
    with remote.keeping_photos(10**6, root=tmp_path) as cache:
        loader = DataLoader(files, batch_size=1, num_workers=1, multiprocessing_context=start)
        rows = [(int(i), sha, error) for i, _, (sha,), (error,) in loader]
        assert len(list(cache.files.iterdir())) == 3, "the worker kept what it fetched"
    assert rows == [(i, sha256_bytes((photos / n).read_bytes()), "") for i, n in enumerate(names)]


# ---------------------------------------------------------------------------
# torchrun: two processes extract the features one process would
# ---------------------------------------------------------------------------


def _assert_same_cache_and_head(single_cache: Path, shared_cache: Path, one, two: dict[str, torch.Tensor]) -> None:
    """Cached features and the trained head of a several-process run equal one process's, to float rounding."""
    single, double = cache_entries(single_cache), cache_entries(shared_cache)
    assert len(single) == 48, "24 images x (clean, flip)"
    assert single.keys() == double.keys(), "the same cache entries"
    for key in single:
        np.testing.assert_allclose(double[key], single[key], rtol=1e-5, atol=1e-4, err_msg=str(key))
    expected = {**one.head.state_dict(), **one.ood.state()}  # the head, then the out-of-distribution detector
    assert two.keys() == expected.keys()
    for name, tensor in two.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN_HEAD = ["-m", "florist", "train", "--mode", "head", "--eval-fraction", "0.25", "--quiet"]


@pytest.mark.slow
def test_torchrun_feature_extraction_matches_one_process(
    photos: Path, s3: str, tiny: dict[str, str], tiny_cli: list[str], tmp_path: Path
) -> None:
    """2 CPU processes (gloo), data and run on S3, each extracting its half: the cached features and
    the head of one process on the local folder, to float rounding.

    Not bit for bit: which other images share a batch can change the last bits of a convolution
    (measured on an AVX2-only CPU: up to 2e-5 on features of size ~10; none with AVX512-BF16).
    """
    one = florist.train(photos, tmp_path / "one", **HEAD, cache_dir=tmp_path / "c1", **tiny)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = f"{s3}/runs/ddp"
    result = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node=2", *TRAIN_HEAD, f"{s3}/photos", "--out", run,
         "--cache-dir", str(tmp_path / "c2"), *tiny_cli],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_cache_and_head(tmp_path / "c1", tmp_path / "c2", one, load_tensors(_files(run)["model.safetensors"]))
    assert not list((tmp_path / "c2" / "remote").glob("out-*")), "rank 0 uploaded the run and cleaned up"
    metrics = json.loads(_files(run)["metrics.json"])
    assert np.isclose(metrics["top1"], 1.0)
    assert metrics["features_computed"] == 48, "the processes' shares add up to every image and view"


@pytest.mark.slow
def test_two_machines_share_extraction_through_one_store(
    photos: Path, tiny: dict[str, str], tiny_cli: list[str], tmp_path: Path
) -> None:
    """README's cluster command, with two launchers on this host standing in for two machines.

    Each ``torchrun --nnodes=2`` joins one c10d rendezvous, extracts its share into the
    one feature store both see (a network filesystem on a cluster), and the run equals one process's.
    """
    one = florist.train(photos, tmp_path / "one", **HEAD, cache_dir=tmp_path / "c1", **tiny)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                  f"--rdzv-id={uuid.uuid4().hex[:8]}"]
    nodes = [
        subprocess.Popen(
            [*TORCHRUN, *rendezvous, *TRAIN_HEAD, str(photos), "--out", str(tmp_path / "run"),
             "--cache-dir", str(tmp_path / "shared"), *tiny_cli],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(2)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    two = load_tensors((tmp_path / "run" / "model.safetensors").read_bytes())
    _assert_same_cache_and_head(tmp_path / "c1", tmp_path / "shared", one, two)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["features_computed"] == 48, "the machines' shares add up to every image and view"


def test_default_cache_must_be_local(monkeypatch) -> None:
    monkeypatch.setenv("FLORIST_CACHE", "gs://bucket/cache")
    with pytest.raises(FloristError, match=r"\$FLORIST_CACHE"):
        default_cache_dir()
