"""Calibrated probabilities and the "unknown" answer: the maths on synthetic data, then through a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import florist
from florist.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability,
)
from florist.cli import app
from florist.ood import ACCEPT, OodDetector, fit_detector
from florist.sampling import fold_count, stratified_sample

runner = CliRunner()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _miscalibrated(temperature: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), reported as softmax(z * temperature): calibrated again by ``temperature``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.5, (n, 5))
    labels = np.array([rng.choice(5, p=p) for p in _softmax(logits)])
    return _softmax(logits * temperature), labels


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_temperature_recovers_the_miscalibration(true_t: float) -> None:
    probs, labels = _miscalibrated(true_t)
    fitted = fit_temperature(probs, labels)
    assert fitted == pytest.approx(true_t, rel=0.1)
    before, after = expected_calibration_error(probs, labels), expected_calibration_error(apply_temperature(probs, fitted), labels)
    assert before > 0.05 and after < 0.03


def test_temperature_keeps_the_ranking_and_inverts_exactly() -> None:
    probs, _ = _miscalibrated(0.5, n=200)
    sharper = apply_temperature(probs, 0.4)
    assert (np.argsort(-sharper, 1) == np.argsort(-probs, 1)).all()
    assert sharper.max(1).mean() > probs.max(1).mean()
    np.testing.assert_allclose(apply_temperature(sharper, 1 / 0.4), probs, atol=1e-6)
    np.testing.assert_allclose(sharper.sum(1), 1, atol=1e-6)


def test_ece_bins_add_up_and_see_overconfidence() -> None:
    probs = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 5 + [1] * 5)  # 90% confident, 50% right
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    assert sum(b["share"] for b in reliability(*_miscalibrated(1.0, n=500))) == pytest.approx(1)


def test_detector_scores_far_points_higher_and_accepts_held_out_share() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 32))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        return centres[y] + rng.normal(0, 0.3, (n, 32)), y

    x, y = sample(600)
    detector = fit_detector(x, y)
    fresh, _ = sample(2000)
    strangers = rng.normal(0, 1, (200, 32))  # directions unlike any class
    inside, outside = detector.score(fresh), detector.score(strangers)
    assert np.median(outside) > 3 * np.median(inside)
    accepted = np.mean(~detector.unknown(inside))
    assert abs(accepted - ACCEPT) < 0.03  # the held-out threshold transfers to new photos
    assert detector.unknown(outside).mean() > 0.9
    stored = OodDetector.from_state(detector.state(), detector.threshold)
    np.testing.assert_allclose(stored.score(strangers), outside, rtol=1e-5)


def test_many_photos_set_the_threshold_from_a_stratified_sample(monkeypatch) -> None:
    """Beyond THRESHOLD_PHOTOS the held-out folds use a sample: the threshold still accepts ACCEPT of new photos."""
    from florist import ood

    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (4, 16))
    y = np.repeat(np.arange(4), [900, 600, 300, 8])  # a class far smaller than the others
    x = centres[y] + rng.normal(0, 0.3, (len(y), 16))
    sample = stratified_sample(y, 450, seed=0, minimum=ood.THRESHOLD_FOLDS)
    assert np.all(np.diff(sample) > 0) and 430 <= len(sample) <= 470
    counts = np.bincount(y[sample])
    assert counts[3] >= ood.THRESHOLD_FOLDS and abs(counts[0] / counts[2] - 3) < 0.1, "each class in proportion"
    assert stratified_sample(y, len(y), seed=0).tolist() == list(range(len(y)))
    assert stratified_sample(y, 450, seed=0, minimum=ood.THRESHOLD_FOLDS).tolist() == sample.tolist(), "seeded"

    monkeypatch.setattr(ood, "THRESHOLD_PHOTOS", 450)
    detector = ood.fit_detector(x, y)
    fresh_y = rng.integers(0, 3, 3000)
    fresh = centres[fresh_y] + rng.normal(0, 0.3, (3000, 16))
    assert abs(np.mean(~detector.unknown(detector.score(fresh))) - ACCEPT) < 0.03


def test_the_covariance_of_many_photos_comes_from_a_sample(monkeypatch) -> None:
    """Beyond COVARIANCE_PHOTOS the precision is estimated on a seeded sample; the class means still use every photo."""
    from sklearn.covariance import ledoit_wolf

    from florist import ood

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), [300, 200, 100])
    x = np.eye(3, 12)[y] * 3 + rng.normal(0, 1, (len(y), 12))
    full = ood.OodDetector.fit(x, y)
    monkeypatch.setattr(ood, "COVARIANCE_PHOTOS", 120)
    sampled = ood.OodDetector.fit(x, y, seed=0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([unit[y == c].mean(0) for c in range(3)])
    assert np.allclose(sampled.means, means, atol=1e-6) and np.allclose(full.means, means, atol=1e-6)
    rows = stratified_sample(y, 120, seed=0)
    covariance, _ = ledoit_wolf(unit[rows] - means[y[rows]], assume_centered=True)
    assert np.allclose(sampled.precision, np.linalg.inv(covariance), rtol=1e-4, atol=1e-3)
    assert not np.allclose(sampled.precision, full.precision, rtol=1e-2), "not the full estimate"
    assert np.array_equal(ood.OodDetector.fit(x, y, seed=0).precision, sampled.precision), "seeded"


def test_fold_count_stops_adding_folds_once_the_others_hold_enough() -> None:
    assert fold_count(5, 1500, 10_000) == 5  # a small folder keeps every fold it asked for
    assert fold_count(5, 80_000, 10_000) == 2 and fold_count(5, 20_000, 10_000) == 2
    assert fold_count(5, 14_000, 10_000) == 4  # 3 folds would leave 9,333
    assert fold_count(2, 10**6, 10) == 2 and fold_count(3, 100, 10**6) == 3


def test_a_large_training_part_is_calibrated_with_fewer_folds(photos: Path, tiny: dict, tmp_path: Path, monkeypatch) -> None:
    """Past FOLD_PHOTOS per fold's model the cross-fit uses the fewest folds that reach it (here 2 of the 5 asked)."""
    from florist.training import trust

    monkeypatch.setattr(trust, "FOLD_PHOTOS", 4)
    florist.train(photos, tmp_path / "run", mode="head", cache_dir=tmp_path / "cache", **tiny)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["calibration"]["folds"] == 2


def test_trained_run_is_calibrated_and_answers_unknown(trained_run: Path, photos: Path, tmp_path: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    model_json = json.loads((trained_run / "model.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["folds"] == 5 and calibration["temperature"] == model_json["temperature"]
    assert calibration["heldout_ece_after"] <= calibration["heldout_ece_before"] + 1e-9
    assert metrics["ece"] == pytest.approx(calibration["ece_after"])
    assert metrics["ood"]["threshold"] == model_json["ood_threshold"] > 0

    model = florist.load(trained_run)
    flower = sorted((photos / "red").iterdir())[0]
    stranger = tmp_path / "noise.png"  # coloured noise: nothing like the solid-colour training photos
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(stranger)
    near, far = model.predict([flower, stranger])
    assert near.ood_score < far.ood_score and near.unknown is False
    probs, _ = model.predict_proba([flower])
    assert probs[0].max() == pytest.approx(near.probabilities[0], abs=1e-6)  # predict and predict_proba agree

    everything = model.predict([flower], ood_threshold=-1.0)[0]
    assert everything.unknown is True and everything.labels == near.labels  # the ranking is still given


def test_cli_predict_json_and_threshold(trained_run: Path, photos: Path, exported_onnx: Path) -> None:
    flower = str(sorted((photos / "blue").iterdir())[0])
    row = json.loads(runner.invoke(app, ["predict", str(trained_run), flower, "--json"]).stdout)
    assert isinstance(row["ood_score"], float) and row["unknown"] is False
    result = runner.invoke(app, ["predict", str(trained_run), flower, "--ood-threshold", "-1"])
    assert result.exit_code == 0 and "unknown" in result.stdout
    refused = runner.invoke(app, ["predict", str(exported_onnx), flower, "--ood-threshold", "5"])
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "needs a run folder" in refused.stderr
    plain = json.loads(runner.invoke(app, ["predict", str(exported_onnx), flower, "--json"]).stdout)
    assert "ood_score" not in plain


def test_server_answers_unknown(trained_run: Path, photos: Path) -> None:
    from fastapi.testclient import TestClient

    from florist.serve import create_app, load_model

    model = load_model(trained_run)
    data = sorted((photos / "green").iterdir())[0].read_bytes()
    with TestClient(create_app(model)) as client:
        body = client.post("/predict", files={"file": ("g.jpg", data)}).json()
    assert body["unknown"] is False and body["ood_score"] == pytest.approx(
        florist.load(trained_run).ood_scores([sorted((photos / "green").iterdir())[0]])[0], rel=0.05
    )
    with TestClient(create_app(model, ood_threshold=-1.0)) as client:
        assert client.post("/predict", files={"file": ("g.jpg", data)}).json()["unknown"] is True


def test_run_lists_a_mislabelled_photo_in_label_issues_and_the_report(photos: Path, tiny: dict, tmp_path: Path) -> None:
    import shutil

    from florist.files import read_csv

    data = tmp_path / "photos"
    shutil.copytree(photos, data)
    moved = sorted((data / "red").iterdir())[0]
    moved.rename(data / "blue" / moved.name)  # a red photo filed as blue
    run = tmp_path / "run"
    florist.train(data, run, epochs=10, eval_fraction=0.25, mode="head", **tiny)
    rows = read_csv(run / "label_issues.csv")
    assert rows, "the misfiled photo should be suspected"
    assert Path(rows[0]["path"]).name == moved.name
    assert (rows[0]["given"], rows[0]["suggested"]) == ("blue", "red")
    assert len(rows) <= 3  # the correctly filed photos are left alone
    html = (run / "report.html").read_text()
    section = html[html.index('id="label-issues"') :]
    assert moved.name in section and "data:image/jpeg;base64," in section
