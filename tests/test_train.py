"""Training: the whole pipeline on synthetic photos, reproducibility, caching, safety of the run folder."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE
from safetensors.torch import load_file

import florist
from florist import FloristError, TrainConfig
from florist.bundle import MODEL_JSON
from florist.errors import SettingError
from florist.training.linear import class_weight_vector, fit_head
from florist.training.modes import head as head_mode
from florist.training.registry import resolve


def test_train_writes_a_complete_run(trained_run: Path) -> None:
    for name in ("labels.txt", "train.csv", "eval.csv", "skipped.csv", "model.safetensors", "model.json", "metrics.json"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "labels.txt").read_text().splitlines() == ["blue", "green", "red"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["n_train"] == 18 and metrics["n_eval"] == 6
    assert metrics["top1"] == 1.0  # solid colours are trivially separable
    assert metrics["top5"] == 1.0
    assert set(metrics["per_class"]) == {"blue", "green", "red"}
    assert np.trace(np.array(metrics["confusion_matrix"])) == 6
    assert {"prepare_s", "features_s", "train_s", "total_s"} <= set(metrics["timings"])


def test_bundle_is_plain_tensors_and_json(trained_run: Path, tiny_backbone) -> None:
    meta = json.loads((trained_run / MODEL_JSON).read_text())
    assert meta["classes"] == ["blue", "green", "red"]
    assert meta["backbones"][0]["timm_name"] == TINY_BACKBONE
    assert meta["preprocessing"][0]["input_size"] == tiny_backbone.data_config["input_size"] == [3, 160, 160]
    assert meta["preprocessing"][0]["mean"] == tiny_backbone.data_config["mean"]
    assert meta["tta_views"] == ["clean", "flip"]
    state = load_file(str(trained_run / "model.safetensors"))
    assert state["fc.weight"].shape == (3, tiny_backbone.num_features)


def test_tensorboard_logs_loss_accuracy_lr(trained_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "top1/train", "top1/eval", "lr"} <= tags
    losses = [e.value for e in acc.Scalars("loss/train")]
    assert len(losses) == 10 and losses[-1] < losses[0]


def test_second_train_reuses_cached_features(photos: Path, tmp_path: Path, tiny: dict) -> None:
    cache = tmp_path / "cache"
    florist.train(photos, tmp_path / "a", epochs=1, cache_dir=cache, mode="head", **tiny)
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    florist.train(photos, tmp_path / "b", epochs=1, cache_dir=cache, lr=0.01, mode="head", **tiny)
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert first["features_computed"] == 2 * 24  # clean + flip view of every image
    assert second["features_computed"] == 0


def test_same_seed_same_weights_other_seed_differs(photos: Path, tmp_path: Path, tiny: dict) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        florist.train(photos, tmp_path / name, epochs=2, seed=seed, mode="head", **tiny)
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors"))["fc.weight"] for n in "abc")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()


def test_refuses_to_overwrite_a_finished_run(
    trained_run: Path, photos: Path, tmp_path: Path, tiny: dict
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(FloristError, match="already holds a trained model"):
        florist.train(photos, run, epochs=1, mode="head", **tiny)
    assert (run / "model.safetensors").read_bytes() == before
    florist.train(photos, run, epochs=1, seed=9, overwrite=True, mode="head", **tiny)
    assert (run / "model.safetensors").read_bytes() != before


def test_interrupted_run_does_not_look_finished(
    photos: Path, tmp_path: Path, tiny: dict, monkeypatch
) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    # florist.train is the function; the module lives in sys.modules.
    monkeypatch.setattr(sys.modules["florist.training.pipeline"], "save_bundle", crash)
    with pytest.raises(KeyboardInterrupt):
        florist.train(photos, tmp_path / "run", epochs=1, mode="head", **tiny)
    assert not (tmp_path / "run" / MODEL_JSON).exists()
    with pytest.raises(FloristError, match="no finished model"):
        florist.load(tmp_path / "run")


def test_no_temporary_files_left_behind(trained_run: Path) -> None:
    assert not [p for p in trained_run.rglob("*.tmp")]


def _toy_features(n_per_class: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (len(n_per_class), 16))
    x = np.concatenate([c + rng.normal(0, 1, (n, 16)) for c, n in zip(centres, n_per_class)]).astype(np.float32)
    y = np.concatenate([np.full(n, i) for i, n in enumerate(n_per_class)])
    return x, y


def test_balanced_class_weights() -> None:
    w = class_weight_vector(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])
    x, y = _toy_features((90, 10))
    head, _ = fit_head(x, y, 2, TrainConfig(class_weights="balanced", epochs=5))
    plain, _ = fit_head(x, y, 2, TrainConfig(epochs=5))
    bias = lambda h: (h.fc.bias[1] - h.fc.bias[0]).item()  # noqa: E731
    assert bias(head) > bias(plain)  # the rare class is favoured more with balancing


def test_sgd_exponential_decay_and_exact_steps() -> None:
    x, y = _toy_features((20, 20, 20))
    cfg = TrainConfig(optimizer="sgd", lr=0.4, decay_rate=0.5, decay_steps=10, steps=20, batch_size=16)
    head, history = fit_head(x, y, 3, cfg)
    assert history.step[-1] == 20
    assert history.lr[-1] == pytest.approx(0.4 * 0.5 ** (20 / 10))
    pred = head(torch.as_tensor(x)).argmax(1).numpy()
    assert (pred == y).mean() > 0.9


def test_max_steps_cuts_the_epochs_of_a_large_training_set() -> None:
    x, y = _toy_features((40, 40))  # 80 examples: 3 batches of 32 an epoch
    _, capped = fit_head(x, y, 2, TrainConfig(epochs=10, max_steps=7))
    assert capped.step == [3, 6, 7]  # two whole epochs and the start of a third
    _, under = fit_head(x, y, 2, TrainConfig(epochs=2, max_steps=7))
    assert under.step == [3, 6]
    _, exact = fit_head(x, y, 2, TrainConfig(steps=9, max_steps=7))
    assert exact.step[-1] == 9  # steps asks for an exact number
    assert resolve(mode="head").max_steps == head_mode.MAX_STEPS
    with pytest.raises(SettingError, match="max_steps"):
        resolve(mode="tune-top", max_steps=100)


def test_label_smoothing_and_dropout_change_training() -> None:
    x, y = _toy_features((20, 20))
    _, plain = fit_head(x, y, 2, TrainConfig(epochs=20))
    _, smooth = fit_head(x, y, 2, TrainConfig(epochs=20, label_smoothing=0.3))
    assert smooth.loss[-1] > plain.loss[-1] + 0.1  # smoothed targets cannot reach zero loss
    head, _ = fit_head(x, y, 2, TrainConfig(epochs=1, dropout=0.5))
    assert head.dropout.p == 0.5


def test_train_per_class_and_no_eval(photos: Path, tmp_path: Path, tiny: dict) -> None:
    florist.train(photos, tmp_path / "a", epochs=1, train_per_class=5, mode="head", **tiny)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_eval"]) == (15, 9)
    florist.train(photos, tmp_path / "b", epochs=1, eval_fraction=0.0, mode="head", **tiny)
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_eval"]) == (24, 0)
    assert "top1" not in metrics


@pytest.mark.slow
def test_flowers_head_reaches_90_percent(flower_photos: Path, tmp_path: Path) -> None:
    """The issue's acceptance run: default settings, 80/20 split of the shared flower photos."""
    model = florist.train(flower_photos, tmp_path / "flowers", cache_dir=tmp_path / "cache", mode="head")
    metrics = json.loads((tmp_path / "flowers" / "metrics.json").read_text())
    assert metrics["n_eval"] == 300
    assert metrics["top1"] >= 0.90
    pred = model.predict([flower_photos / "daisy" / sorted(p.name for p in (flower_photos / "daisy").iterdir())[0]])
    assert pred[0].labels[0] in model.classes


def test_precision_is_stored_and_keys_the_cache(photos: Path, tmp_path: Path, tiny: dict) -> None:
    from florist.features import feature_key

    models = {
        p: florist.train(photos, tmp_path / p, epochs=2, precision=p, mode="head", **tiny)
        for p in ("fp32", "bf16")
    }
    for precision, model in models.items():
        meta = json.loads((tmp_path / precision / MODEL_JSON).read_text())
        assert meta["bf16"] is (precision == "bf16")
        assert florist.load(tmp_path / precision).backbone.bf16 is (precision == "bf16")
    assert feature_key(models["fp32"].backbone) != feature_key(models["bf16"].backbone)
    assert models["fp32"].predict([photos / "red"])[0].labels[0] == "red"
    assert models["bf16"].predict([photos / "red"])[0].labels[0] == "red"


def test_several_backbones_concatenate_cached_features(photos: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    both = florist.train(photos, tmp_path / "both", backbone="efficientnet_lite0,efficientnet_lite1", epochs=3, cache_dir=cache, mode="head")
    meta = json.loads((tmp_path / "both" / MODEL_JSON).read_text())
    assert [b["name"] for b in meta["backbones"]] == ["efficientnet_lite0", "efficientnet_lite1"]
    assert [c["input_size"][-1] for c in meta["preprocessing"]] == [224, 240]
    assert meta["head"]["in_features"] == 2560
    assert json.loads((tmp_path / "both" / "metrics.json").read_text())["top1"] == 1.0
    # each backbone is cached on its own: training with just one of them computes nothing
    florist.train(photos, tmp_path / "one", backbone="efficientnet_lite1", epochs=1, cache_dir=cache, mode="head")
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["features_computed"] == 0
    files = sorted((photos / "green").iterdir())[:3]
    np.testing.assert_allclose(both.predict_proba(files)[0], florist.load(tmp_path / "both").predict_proba(files)[0], atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"backbone": "efficientnet_lite0,efficientnet_lite1", "mode": "finetune"}, "is for mode='head'"),
        ({"backbone": "efficientnet_lite0,efficientnet_lite0"}, "lists a network twice"),
        ({"backbone": "efficientnet_lite0,efficientnet_lite1", "weights": "w.safetensors"}, "single backbone"),
    ],
)
def test_backbone_lists_are_checked(photos: Path, tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(FloristError, match=message):
        florist.train(photos, tmp_path / "run", **{"mode": "head", **overrides})


def test_run_json_records_how_to_reproduce(
    trained_run: Path, photos: Path, tmp_path: Path, tiny: dict
) -> None:
    info = json.loads((trained_run / "run.json").read_text())
    assert info["n_images"] == 24 and info["seed"] == 0
    assert info["config"]["epochs"] == 10
    assert info["versions"]["torch"] == importlib.metadata.version("torch")
    assert info["versions"]["timm"]
    assert len(info["data_sha256"]) == 64
    # the data hash follows content: change one image and it changes
    copy = tmp_path / "photos"
    shutil.copytree(photos, copy)
    florist.train(copy, tmp_path / "a", epochs=1, mode="head", **tiny)
    same = json.loads((tmp_path / "a" / "run.json").read_text())["data_sha256"]
    victim = sorted((copy / "red").iterdir())[0]
    from PIL import Image

    Image.new("RGB", (50, 50), (250, 0, 0)).save(victim)
    florist.train(copy, tmp_path / "b", epochs=1, mode="head", **tiny)
    changed = json.loads((tmp_path / "b" / "run.json").read_text())["data_sha256"]
    assert same == info["data_sha256"]
    assert changed != same


def test_photos_that_are_symlinks_to_elsewhere(photos: Path, tmp_path: Path, tiny: dict) -> None:
    """A class folder of links to files stored elsewhere (a common way to make subsets)."""
    linked = tmp_path / "linked"
    for source in sorted(photos.rglob("*.jpg")):
        target = linked / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    florist.train(linked, tmp_path / "run", epochs=1, mode="head", **tiny)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["n_images"] == 24 and len(info["data_sha256"]) == 64


def test_the_cross_fit_reuses_the_features_the_final_fit_read(photos: Path, tiny: dict, tmp_path: Path, monkeypatch) -> None:
    """Head mode's calibration folds take their rows from memory, not the store: fewer reads, the same model."""
    from florist.store import FeatureCache
    from florist.training.job import Remembered

    settings = {"mode": "head", "epochs": 2, "eval_fraction": 0.25, "cache_dir": tmp_path / "cache", **tiny}
    florist.train(photos, tmp_path / "warm-up", **settings)  # fill the store
    read = []
    real_get_many = FeatureCache.get_many
    monkeypatch.setattr(FeatureCache, "get_many", lambda self, shas: read.append(len(shas)) or real_get_many(self, shas))
    florist.train(photos, tmp_path / "remembering", **settings)
    remembering = sum(read)
    read.clear()
    monkeypatch.setattr(Remembered, "get", lambda self, key, items: None)
    florist.train(photos, tmp_path / "reading", **settings)
    # 24 photos: the final fit reads 18 train x 2 views + 6 eval x 2 views; the detector would read 24 clean
    # rows and each of the 5 folds its 14-15 + 3-4 photos x 2 views again
    assert remembering == 48 and sum(read) == 48 + 24 + 5 * 36
    ours, theirs = (load_file(tmp_path / run / "model.safetensors") for run in ("remembering", "reading"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
