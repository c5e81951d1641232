"""Suspect labels (florist.labels, `florist audit --labels`): out-of-fold heads ranked by cleanlab."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_photos
from typer.testing import CliRunner

import florist
from florist.cli import app
from florist.errors import FloristError
from florist.labels import out_of_fold_probabilities, rank_label_issues

MOVED = {"red/red_03.jpg": "green", "blue/blue_07.jpg": "red"}


@pytest.fixture(scope="module")
def mislabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three colour classes of 12 photos with two filed under the wrong class."""
    root = write_photos(tmp_path_factory.mktemp("mislabelled"), n_per_class=12)
    for path, wrong in MOVED.items():
        shutil.move(root / path, root / wrong / Path(path).name)
    return root


def test_moved_photos_are_found_with_their_true_class(mislabelled: Path, tiny: dict[str, str]) -> None:
    report = florist.audit(mislabelled, labels=True, folds=3, **tiny)
    found = {i.path: i for i in report.label_issues}
    for path, wrong in MOVED.items():
        issue = found[f"{wrong}/{Path(path).name}"]
        assert (issue.given, issue.suggested) == (wrong, path.split("/")[0])
        assert 0 <= issue.score < 0.5
    assert len(found) <= 4  # a few honest doubts at most: the colours are easy
    scores = [i.score for i in report.label_issues]
    assert scores == sorted(scores)  # most suspect first
    assert any("look mislabelled" in w for w in report.warnings)
    rows = report.to_dict()["label_issues"]
    assert set(rows[0]) == {"path", "given", "suggested", "score"}


def test_a_clean_folder_has_no_suspects(photos: Path, tiny: dict[str, str]) -> None:
    report = florist.audit(photos, labels=True, folds=4, **tiny)
    assert report.label_issues == [] and report.settings["labels"] and report.settings["folds"] == 4
    assert florist.audit(photos).label_issues == []  # off unless asked


def test_audit_reports_the_folds_it_fitted(photos: Path, tiny: dict[str, str], monkeypatch) -> None:
    """A folder whose other folds hold FIT_PHOTOS with fewer folds is fitted, and reported, with fewer."""
    import florist.labels

    monkeypatch.setattr(florist.labels, "FIT_PHOTOS", 6)  # 2 folds of 24 photos leave 12
    assert florist.audit(photos, labels=True, folds=4, **tiny).settings["folds"] == 2


def test_out_of_fold_probabilities_come_from_heads_that_never_saw_the_row() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    features = rng.normal(0, 1, (40, 8)) + labels[:, None] * 3.0
    features[5] = features[25]  # a class-0 row that looks like class 1
    probs = out_of_fold_probabilities(features, labels, folds=4, c=1.0)
    assert probs.shape == (40, 2) and np.allclose(probs.sum(1), 1)
    assert probs[5, 0] < 0.5 < probs[0, 0]
    ranked, scores = rank_label_issues(labels, probs)
    assert ranked[0] == 5 and scores[5] == scores.min()


def test_each_fold_of_a_large_folder_is_fitted_on_a_sample(monkeypatch) -> None:
    """Beyond FIT_PHOTOS a fold's regression sees a stratified sample of the other folds, and no more folds are
    fitted than it takes for them to hold FIT_PHOTOS; every row is still scored."""
    from sklearn.linear_model import LogisticRegression

    import florist.labels

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    features = rng.normal(0, 1, (len(labels), 8)) + np.eye(3, 8)[labels] * 4.0
    features[7] = features[600]  # a class-0 row that looks like class 1
    fitted_on: list[np.ndarray] = []
    fit = LogisticRegression.fit
    monkeypatch.setattr(LogisticRegression, "fit", lambda self, x, y, **kw: fitted_on.append(y) or fit(self, x, y, **kw))
    monkeypatch.setattr(florist.labels, "FIT_PHOTOS", 300)
    probs = out_of_fold_probabilities(features, labels, folds=4, c=1.0)
    assert len(fitted_on) == 2 and all(len(y) <= 303 for y in fitted_on), "2 folds of 1,000 leave 500 >= 300"
    assert all(abs(np.bincount(y)[0] / len(y) - 0.5) < 0.02 for y in fitted_on), "each class in proportion"
    assert probs.shape == (1000, 3) and np.allclose(probs.sum(1), 1)
    assert probs[7].argmax() == 1 and probs[7, 0] == probs[labels == 0, 0].min(), "the swapped row stands out"


def test_bad_settings_are_one_line_errors(photos: Path, tiny: dict[str, str]) -> None:
    with pytest.raises(FloristError, match="folds must be >= 2"):
        out_of_fold_probabilities(np.zeros((4, 2)), np.array([0, 0, 1, 1]), folds=1)
    with pytest.raises(FloristError, match="needs at least 9 photos per class; the smallest class has 8"):
        florist.audit(photos, labels=True, folds=9, **tiny)


def test_audit_labels_from_the_command_line(mislabelled: Path, tiny_cli: list[str]) -> None:
    cli = CliRunner()
    flags = [f for f in tiny_cli if f.startswith(("--backbone", "--weights"))]
    done = cli.invoke(app, ["audit", str(mislabelled), "--labels", "--folds", "3", *flags], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "suspect label" in done.output and "filed as red, looks like blue" in done.output
    done = cli.invoke(app, ["audit", str(mislabelled), "--labels", "--folds", "3", "--json", *flags])
    paths = {i["path"] for i in json.loads(done.stdout)["label_issues"]}
    assert {f"{wrong}/{Path(p).name}" for p, wrong in MOVED.items()} <= paths
