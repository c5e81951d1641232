"""Prediction from a saved run: files, folders, globs, bad files, top-k."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import florist
from florist import FloristError


def test_predict_files_folders_and_globs(trained_run: Path, photos: Path) -> None:
    model = florist.load(trained_run)
    one = sorted((photos / "red").iterdir())[0]
    preds = model.predict([one, photos / "green", str(photos / "blue" / "*_0[0-2].jpg")], top_k=2)
    assert [p.path for p in preds][:1] == [str(one)]
    assert len(preds) == 1 + 8 + 3
    truth = [Path(p.path).parent.name for p in preds]
    assert [p.labels[0] for p in preds] == truth
    for p in preds:
        assert len(p.labels) == 2 and p.probabilities[0] >= p.probabilities[1]
        assert 0.0 <= sum(p.probabilities) <= 1.0 + 1e-6


def test_top_k_is_capped_by_the_number_of_classes(trained_run: Path, photos: Path) -> None:
    pred = florist.load(trained_run).predict([photos / "red"], top_k=10)[0]
    assert sorted(pred.labels) == ["blue", "green", "red"]
    assert sum(pred.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_bad_files_get_errors_not_exceptions(trained_run: Path, photos: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    shutil.copy(sorted((photos / "red").iterdir())[0], good)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    preds = {Path(p.path).name: p for p in florist.load(trained_run).predict([tmp_path])}
    assert preds["good.jpg"].error is None and preds["good.jpg"].labels[0] == "red"
    assert "not an image" in preds["notes.txt"].error
    assert "empty" in preds["empty.jpg"].error
    assert "corrupt" in preds["truncated.jpg"].error
    assert preds["notes.txt"].to_dict() == {"path": str(tmp_path / "notes.txt"), "error": preds["notes.txt"].error}


def test_loaded_model_matches_the_trained_one(photos: Path, tmp_path: Path, tiny: dict[str, str]) -> None:
    trained = florist.train(photos, tmp_path / "run", epochs=3, mode="head", **tiny)
    loaded = florist.load(tmp_path / "run")
    files = sorted((photos / "blue").iterdir())[:4]
    a, _ = trained.predict_proba(files)
    b, _ = loaded.predict_proba(files)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tta_averages_clean_and_mirror(trained_run: Path, photos: Path) -> None:
    model = florist.load(trained_run)
    files = sorted((photos / "green").iterdir())[:3]
    both, _ = model.predict_proba(files)
    model.tta_views = ["clean"]
    clean, _ = model.predict_proba(files)
    model.tta_views = ["flip"]
    flip, _ = model.predict_proba(files)
    np.testing.assert_allclose(both, (clean + flip) / 2, atol=1e-6)


def test_missing_inputs_are_clear_errors(trained_run: Path, tmp_path: Path) -> None:
    model = florist.load(trained_run)
    with pytest.raises(FloristError, match="file not found"):
        model.predict([tmp_path / "nope.jpg"])
    with pytest.raises(FloristError, match="no files match"):
        model.predict([str(tmp_path / "*.png")])
    with pytest.raises(FloristError, match="run folder not found"):
        florist.load(tmp_path / "missing-run")


def test_damaged_or_mismatched_weights_are_refused(trained_run: Path, tmp_path: Path) -> None:
    """model.json holds the weights' SHA-256: a flipped bit, or weights from another run, are refused."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # still a valid safetensors file, with one weight changed
    weights.write_bytes(bytes(data))
    with pytest.raises(FloristError, match=r"model.safetensors does not match model.json"):
        florist.load(run)
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(FloristError, match="does not match"):
        florist.load(run)


def test_pickled_weights_are_never_unpickled(trained_run: Path, tmp_path: Path) -> None:
    """A pickle dropped in as model.safetensors (and its hash written into model.json) is refused unread."""
    import json
    import os

    import torch

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    torch.save({"fc.weight": Exploit()}, run / "model.safetensors")
    meta = json.loads((run / "model.json").read_text())
    from florist.files import sha256_file

    meta["weights_sha256"] = sha256_file(run / "model.safetensors")
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FloristError, match="cannot read"):
        florist.load(run)
    assert not (tmp_path / "pwned").exists()
