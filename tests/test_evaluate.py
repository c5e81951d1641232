"""Evaluation: metric arithmetic, a run's own eval split, other folders, unknown classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import florist
from florist import FloristError
from florist.evaluate import compute_metrics, top_k_accuracy


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed: int) -> None:
    """florist's numpy metrics against scikit-learn's, including classes never predicted or absent."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    classes = list("abcdef")
    y = rng.integers(0, 4, 60)  # e and f never occur
    probs = rng.dirichlet(np.ones(6), 60)
    probs[:, 3] *= 0.01  # d is (almost) never predicted
    m = compute_metrics(y, probs, classes)
    labels = list(range(6))
    pred = probs.argmax(1)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, name in enumerate(classes):
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision[i], recall[i], f1[i]))
        assert got["support"] == support[i]
    assert m["macro_f1"] == pytest.approx(float(np.mean(f1)))


def test_metrics_by_hand() -> None:
    y = [0, 0, 1, 1, 2]
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # 0 -> 0
            [0.2, 0.5, 0.3],  # 0 -> 1 (second choice 2, third 0)
            [0.1, 0.8, 0.1],  # 1 -> 1
            [0.1, 0.8, 0.1],  # 1 -> 1
            [0.3, 0.3, 0.4],  # 2 -> 2
        ]
    )
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["top1"] == pytest.approx(4 / 5)
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert top_k_accuracy(np.array(y), probs, 2) == pytest.approx(4 / 5)
    assert top_k_accuracy(np.array(y), probs, 3) == 1.0
    assert m["top5"] == 1.0  # k is capped at the number of classes


def test_evaluate_own_split_matches_training_metrics(trained_run: Path) -> None:
    metrics = florist.evaluate(trained_run)
    saved = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["n"] == saved["n_eval"]
    assert metrics["top1"] == saved["top1"]
    assert metrics["confusion_matrix"] == saved["confusion_matrix"]


def test_evaluate_other_folder_with_subset_of_classes_and_bad_files(trained_run: Path, photos: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(photos / "red", data / "red")
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    metrics = florist.evaluate(trained_run, data)
    assert metrics["n"] == 8
    assert metrics["per_class"]["red"]["support"] == 8
    assert metrics["top1"] == 1.0
    assert [Path(p).name for p, _ in metrics["skipped"]] == ["broken.jpg"]


def test_unknown_class_folder_is_named(trained_run: Path, photos: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(photos / "red", data / "red")
    shutil.copytree(photos / "red", data / "purple haze")
    with pytest.raises(FloristError, match="'purple haze'"):
        florist.evaluate(trained_run, data)
