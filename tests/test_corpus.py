"""Every command over the bad-input corpus (``tests/images.py``: :func:`images.make_corpus`).

The corpus holds ordinary photos, odd-but-valid images and every kind of bad
file florist should survive. Whatever the command, each good file is used
exactly once, each bad file is reported exactly once with a reason that says
what is wrong, and the exit status tells the two outcomes apart: training and
evaluating skip bad files (status 0), predicting reports them (status 1).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import images as im  # tests/images.py
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import florist
from florist.cli import app
from florist.data import MANIFEST_HEADER, prepare, read_labels, read_manifest
from florist.export import PARITY_TOLERANCE
from florist.files import atomic_write_csv, read_csv
from florist.serve import DEFAULT_MAX_BYTES, create_app, load_model
from florist.tfrecord import prepare_tfrecords, read_tfrecords

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # broken exif.jpg, on purpose


def assert_reported_once(corpus: im.Corpus, reported: Iterable[tuple[str, str]]) -> None:
    """``reported`` (path, reason) names every bad file exactly once, with the expected reason, and nothing else."""
    reported = list(reported)
    counts = Counter(path for path, _ in reported)
    assert [p for p, n in counts.items() if n > 1] == [], "reported more than once"
    assert sorted(counts) == sorted(map(str, corpus.bad))
    for path, reason in reported:
        assert re.search(corpus.bad[Path(path)], reason.lower()), (path, reason)
        assert "\n" not in reason and len(reason) < 200, "a reason is one short line"


def assert_used_once(corpus: im.Corpus, paths: Iterable[str]) -> None:
    paths = list(paths)
    assert len(paths) == len(set(paths)), "a file used twice"
    assert sorted(paths) == sorted(map(str, corpus.good))


def test_the_corpus_has_every_kind_of_input(corpus: im.Corpus) -> None:
    assert len(corpus.good) >= 55 and len(corpus.bad) >= 20 and len(corpus.ignored) == 6
    assert corpus.classes == ["blue ☁ sky", "green leaves", "red flowers"]
    names = {p.name for p in [*corpus.good, *corpus.bad]}
    for expected in ("animated.gif", "tiny 1x1.png", "bomb 20000.png", "loop a.jpg", "line\nbreak.jpg"):
        assert expected in names
    if sys.platform == "linux":  # file names are bytes there; macOS insists on UTF-8
        assert os.fsdecode(b"latin-1 caf\xe9.jpg") in names


def test_prepare(corpus: im.Corpus, tmp_path: Path) -> None:
    run = tmp_path / "run"
    prepared = prepare(corpus.root, run, eval_fraction=0.25)
    assert prepared.classes == corpus.classes
    # the one warning: a link to a good photo in its own class is an exact copy of it
    assert len(prepared.warnings) == 1 and "link to good.jpg" in prepared.warnings[0]
    assert "exact copies" in prepared.warnings[0]
    assert_used_once(corpus, [it.path for it in prepared.train + prepared.eval])
    assert_reported_once(corpus, [(s.path, s.reason) for s in prepared.skipped])
    # every odd name survives the round trip through the manifests
    classes = read_labels(run)
    assert classes == corpus.classes
    assert read_manifest(run / "train.csv", classes) == prepared.train
    assert read_manifest(run / "eval.csv", classes) == prepared.eval
    assert read_csv(run / "skipped.csv") == [{"path": s.path, "reason": s.reason} for s in prepared.skipped]
    for item in prepared.train + prepared.eval:
        assert classes[item.label] == corpus.class_of(item.path)


def test_prepare_tfrecords_and_train_from_them(
    corpus: im.Corpus, corpus_run: Path, tiny: dict[str, str], tmp_path: Path
) -> None:
    records = tmp_path / "records"
    prepared = prepare_tfrecords(corpus.root, records, eval_fraction=0.25, shards=2)
    assert_reported_once(corpus, [(s.path, s.reason) for s in prepared.skipped])
    filenames = [rec.filename for rec in read_tfrecords(records)]
    assert sorted(filenames) == sorted(p.relative_to(corpus.root).as_posix() for p in corpus.good)
    run = tmp_path / "run"
    florist.train(records, run, mode="head", epochs=3, tta=False, **tiny)  # corpus_run's backbone
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["n_train"] + metrics["n_eval"], metrics["n_skipped"]) == (len(corpus.good), 0)
    assert metrics["features_computed"] == 0, "same bytes as the folder route: served from the cache"


def test_train(corpus: im.Corpus, corpus_run: Path) -> None:
    metrics = json.loads((corpus_run / "metrics.json").read_text(encoding="utf-8"))
    classes = read_labels(corpus_run)
    items = read_manifest(corpus_run / "train.csv", classes) + read_manifest(corpus_run / "eval.csv", classes)
    assert_used_once(corpus, [it.path for it in items])
    assert metrics["n_train"] + metrics["n_eval"] == len(corpus.good)
    assert metrics["n_skipped"] == len(corpus.bad)
    assert_reported_once(corpus, [(r["path"], r["reason"]) for r in read_csv(corpus_run / "skipped.csv")])
    assert metrics["top1"] >= 0.5  # the colours are learnable despite the odd files
    info = json.loads((corpus_run / "run.json").read_text(encoding="utf-8"))
    assert info["n_images"] == len(corpus.good)


def test_evaluate(corpus: im.Corpus, corpus_run: Path) -> None:
    own = florist.evaluate(corpus_run)
    assert own["n"] == json.loads((corpus_run / "metrics.json").read_text(encoding="utf-8"))["n_eval"]
    assert own["skipped"] == []
    everything = florist.evaluate(corpus_run, corpus.root)
    assert everything["n"] == len(corpus.good)
    assert_reported_once(corpus, everything["skipped"])


def test_predict(corpus: im.Corpus, corpus_run: Path) -> None:
    predictions = florist.load(corpus_run).predict(corpus.class_folders(), top_k=2)
    assert sorted(p.path for p in predictions) == sorted(map(str, [*corpus.good, *corpus.bad]))
    assert_reported_once(corpus, [(p.path, p.error) for p in predictions if p.error])
    for p in predictions:
        if not p.error:
            assert len(p.labels) == 2 and set(p.labels) <= set(corpus.classes)


def test_cli_prepare_train_evaluate(
    corpus: im.Corpus, corpus_run: Path, tiny_cli: list[str], tmp_path: Path
) -> None:
    result = runner.invoke(app, ["prepare", str(corpus.root), "--out", str(tmp_path / "prep")])
    assert result.exit_code == 0, result.output
    assert f"{len(corpus.bad)} skipped" in result.stdout

    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(corpus.root), "--out", str(run), "--mode", "head", "--epochs", "3",
                                 "--eval-fraction", "0.25", "--no-tta", *tiny_cli, "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_skipped"] == len(corpus.bad)
    assert f"{len(corpus.bad)} file(s) skipped" in result.stderr

    result = runner.invoke(app, ["evaluate", str(run), str(corpus.root), "--json"])
    assert result.exit_code == 0, result.output
    assert_reported_once(corpus, json.loads(result.stdout)["skipped"])
    result = runner.invoke(app, ["evaluate", str(run)])  # the table shows class names as they are
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in corpus.classes)


def _named(corpus: im.Corpus, *names: str) -> list[Path]:
    by_name = {p.name: p for p in [*corpus.good, *corpus.bad]}
    return [by_name[n] for n in names if n in by_name]  # non-UTF-8 names may be missing (macOS)


#: A few files whose names or contents have broken output before, and one bad file.
ODD_FOR_OUTPUT = (
    "broken exif.jpg", os.fsdecode(b"latin-1 caf\xe9.jpg"), os.fsdecode(b"\xff\xfe invalid utf-8.jpg"),
    "line\nbreak.jpg", "carriage\rreturn.jpg", 'quote " comma, semi;colon.jpg', "empty.jpg",
)


def test_cli_predict_exits_1_and_prints_names_as_bytes(corpus: im.Corpus, corpus_run: Path) -> None:
    """A real process: exit status 1 for the bad file, non-UTF-8 names on stdout as their bytes, stderr quiet."""
    files = _named(corpus, *ODD_FOR_OUTPUT)
    proc = subprocess.run(
        [sys.executable, "-m", "florist", "predict", str(corpus_run), *map(os.fsencode, files), "--csv", "-k", "1"],
        capture_output=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr.decode(errors="replace")[-2000:]
    assert proc.stderr == b"", "no tracebacks, no warnings about the broken EXIF block"
    rows = list(csv.DictReader(io.StringIO(proc.stdout.decode("utf-8", errors="surrogateescape"), newline="")))
    assert [r["path"] for r in rows] == list(map(str, files))
    assert [r["path"] for r in rows if r["error"]] == [str(p) for p in files if p in corpus.bad]


def test_cli_predict_json_lines_stay_valid_utf8(corpus: im.Corpus, corpus_run: Path) -> None:
    """Names that are not UTF-8 come out as escapes that ``json.loads`` turns back into the same path."""
    files = _named(corpus, *ODD_FOR_OUTPUT)
    result = runner.invoke(app, ["predict", str(corpus_run), *map(str, files), "--json"])
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in result.stdout_bytes.decode("utf-8").splitlines()]
    assert [r["path"] for r in rows] == list(map(str, files))
    assert ["error" in r for r in rows] == [p in corpus.bad for p in files]


def test_cli_predict_table_shows_markup_like_names(corpus: im.Corpus, corpus_run: Path) -> None:
    (path,) = _named(corpus, "x] markup.jpg")  # in a folder named "[": the path holds "[/x]"
    result = runner.invoke(app, ["predict", str(corpus_run), str(path.parent)])
    assert result.exit_code == 0, result.output
    assert "[/x]" in result.stdout  # printed, not taken for (broken) markup


def test_audit(corpus: im.Corpus) -> None:
    report = florist.audit(corpus.root)
    assert report.n_files == len(corpus.good) + len(corpus.bad)
    assert report.classes == dict(sorted(Counter(map(corpus.class_of, corpus.good)).items()))
    assert_reported_once(corpus, [(str(corpus.root / f.path), f.reason) for f in report.unreadable])
    bad = {str(p) for p in corpus.bad}
    mentioned = [f.path for f in report.odd] + [t.path for t in report.tiny]
    mentioned += [p for group in report.exact_duplicates + report.near_duplicates for p in group.paths]
    assert not {str(corpus.root / p) for p in mentioned} & bad, "a bad file is only listed as unusable"
    assert "loose.jpg" in [f.path for f in report.odd]  # outside any class folder: the one ignored file named
    assert f"{len(corpus.bad)} file(s) cannot be used (corrupt, empty or not images)" in report.warnings


def test_cli_audit(corpus: im.Corpus) -> None:
    """``--json`` is valid UTF-8 whatever the names; the table prints every name as it is; exit status 0."""
    result = runner.invoke(app, ["audit", str(corpus.root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout_bytes.decode("utf-8"))  # strict: non-UTF-8 names come out as escapes
    assert data == json.loads(json.dumps(florist.audit(corpus.root).to_dict()))
    assert_reported_once(corpus, [(str(corpus.root / f["path"]), f["reason"]) for f in data["unreadable"]])

    # Every row, wide enough that no name is folded over two lines.
    result = runner.invoke(app, ["audit", str(corpus.root), "--limit", "1000"], env={"COLUMNS": "500"})
    assert result.exit_code == 0, result.output
    text = result.stdout_bytes
    assert "[/x] markup.jpg".encode() in text  # a name is printed, not taken for markup
    for path in corpus.bad:
        assert path.name.encode() in text
    if sys.platform == "linux":
        assert b"latin-1 caf\xe9.jpg" in text  # the name's own bytes, as ls prints it
    assert f"{len(corpus.bad)} file(s) cannot be used".encode() in text


@pytest.fixture(scope="module")
def corpus_onnx(corpus: im.Corpus, corpus_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``florist export`` of a copy of :func:`corpus_run` whose eval split lists every corpus file.

    The parity check reads real images from the eval split: here it meets every odd
    name (non-UTF-8 bytes, line breaks...) and every bad file, which it must pass over.
    Returns the ONNX file and the ``--json`` export report.
    """
    folder = tmp_path_factory.mktemp("corpus-export")
    run = shutil.copytree(corpus_run, folder / "run", symlinks=True)
    everything = sorted([*corpus.good, *corpus.bad], key=str)
    atomic_write_csv(run / "eval.csv", MANIFEST_HEADER, [(str(p), corpus.class_of(p), "") for p in everything])
    onnx = folder / "corpus.onnx"
    result = runner.invoke(app, ["export", str(run), "--out", str(onnx), "--check-images", "1000", "--json"])
    assert result.exit_code == 0, result.output
    return onnx, json.loads(result.stdout)


def test_export(corpus: im.Corpus, corpus_run: Path, corpus_onnx: tuple[Path, dict]) -> None:
    onnx, report = corpus_onnx
    assert (report["check_source"], report["check_images"]) == ("eval.csv", len(corpus.good))
    assert report["max_abs_diff"] <= PARITY_TOLERANCE
    model = florist.load(onnx)
    assert model.classes == corpus.classes
    predictions = model.predict(corpus.class_folders(), top_k=2)
    assert sorted(p.path for p in predictions) == sorted(map(str, [*corpus.good, *corpus.bad]))
    assert_reported_once(corpus, [(p.path, p.error) for p in predictions if p.error])
    # The same probabilities as the PyTorch classifier of the run, computed in fp32 like the export.
    reference = florist.load(corpus_run)
    for backbone in reference.backbones:
        backbone.bf16 = False
    expected, errors = reference.predict_proba(corpus.good)
    got, onnx_errors = model.predict_proba(corpus.good)
    assert errors == onnx_errors == {}
    diff = float(np.abs(got - expected).max())
    print(f"ONNX vs PyTorch on {len(corpus.good)} corpus images: max abs probability diff {diff:.2e}")
    assert diff <= PARITY_TOLERANCE


def _readable(path: Path) -> bool:
    """Whether a client could read the file's bytes to upload them (without blocking: a pipe is not)."""
    return path.is_file() and os.access(path, os.R_OK)


@pytest.mark.parametrize("backend", ["pytorch", "onnx"])
def test_serve(corpus: im.Corpus, corpus_run: Path, corpus_onnx: tuple[Path, dict], backend: str) -> None:
    """Every corpus file posted as the raw body: good ones 200 with the model's own answer, bad ones 4xx.

    Files whose bytes cannot be read at all (link loops, broken links, a link to a
    folder, a named pipe, no read permission) never reach a server: a client fails
    to read them first, so there is nothing to post. They are the bad files whose
    reason is about the file system, not the content.
    """
    model = load_model(corpus_run if backend == "pytorch" else corpus_onnx[0])
    unreadable = [p for p in corpus.bad if not _readable(p)]
    assert all(_readable(p) for p in corpus.good)
    for path in unreadable:
        assert re.search("symbolic link|not a regular file|permission denied|cannot be listed", corpus.bad[path])
    expected, _ = model.predict_proba(corpus.good)  # the same model through the Python API
    with TestClient(create_app(model)) as client:
        for path, probs in zip(corpus.good, expected):
            response = client.post("/predict", content=path.read_bytes())
            assert response.status_code == 200, (path, response.text)
            answer = {t["label"]: t["probability"] for t in response.json()["top_k"]}
            # bf16 kernels (the PyTorch back end of a bf16 run) may round differently per batch size
            assert answer == pytest.approx(dict(zip(model.classes, probs.tolist())), abs=2e-3), path
        for path in sorted(set(corpus.bad) - set(unreadable)):
            data = path.read_bytes()
            response = client.post("/predict", content=data)
            error = response.json()["error"]
            assert "\n" not in error and len(error) < 200, "one short line"
            if not data:
                assert response.status_code == 400 and "empty request" in error
            elif len(data) > DEFAULT_MAX_BYTES:
                assert response.status_code == 413 and "20 MB limit" in error
            else:
                assert response.status_code == 415, (path, response.text)
                assert re.search(corpus.bad[path], error.lower()), (path, error)
        assert client.get("/health").json()["status"] == "ok"
