"""tune-top: splitting the backbone, training the top on cached activations, saving and reloading it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import florist
from florist import FloristError
from florist.backbones import Backbone, BackboneSpec, create_backbone
from florist.features import feature_key
from florist.training.blocks import TopConfig, fit_top, split_backbone
from florist.training.loop import Watch


def test_bottom_then_top_equals_the_whole_backbone(tiny_backbone: Backbone) -> None:
    split = split_backbone(tiny_backbone, 2)  # the tiny net's 5 blocks: one per stage
    assert split.activation_shape == (32, 20, 20)
    x = torch.randn(2, *tiny_backbone.data_config["input_size"])
    with torch.inference_mode():
        whole = tiny_backbone.model(x)
        parts = split.top(split.bottom(x))
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    assert split.top_prefixes == ["blocks.3.0.", "blocks.4.0.", "conv_head.", "bn2."]
    assert "blocks.2.0." not in split.top_prefixes


def test_block_count_is_checked(tiny_backbone: Backbone) -> None:
    with pytest.raises(FloristError, match="between 1 and 5"):
        split_backbone(tiny_backbone, 6)


def test_unsupported_architecture_is_a_clear_error() -> None:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    backbone = Backbone(model, BackboneSpec("resnet18", "resnet18", "file", "x"), {"input_size": [3, 64, 64]})
    with pytest.raises(FloristError, match="use mode='head'") as caught:
        split_backbone(backbone, 2)
    assert caught.value.for_cli().startswith("--mode tune-top supports")


def test_fit_top_learns_and_keeps_bn_statistics(tiny: dict[str, str]) -> None:
    backbone = create_backbone(tiny["backbone"], tiny["weights"])  # its own copy: this test trains it
    split = split_backbone(backbone, 1)
    bn = backbone.model.bn2
    mean_before = bn.running_mean.clone()
    rng = np.random.default_rng(0)
    images = torch.zeros(2, *backbone.data_config["input_size"])
    images[0, 0] = 1.0  # red
    images[1, 2] = 1.0  # blue
    with torch.inference_mode():
        base = split.bottom(images).numpy()
    acts = np.concatenate([base[i] + rng.normal(0, 0.05, (12, *split.activation_shape)) for i in range(2)])
    acts = acts.astype(np.float16)
    y = np.repeat([0, 1], 12)
    head = torch.nn.Sequential()
    head.add_module("fc", torch.nn.Linear(backbone.num_features, 2))
    before = backbone.model.conv_head.weight.clone()
    cfg = TopConfig(epochs=4, steps=None, batch_size=8, lr_head=0.01, lr_top=1e-3, weight_decay=0.0,
                    label_smoothing=0.0, warmup=0.1, seed=0)
    curves = fit_top(split, head, acts, y, cfg, eval_acts=[acts], watch=Watch(eval_labels=y))
    assert curves.eval_top1[-1] == 1.0
    assert curves.step[-1] == 4 * 3
    assert not torch.equal(backbone.model.conv_head.weight, before)  # the top really trained
    torch.testing.assert_close(bn.running_mean, mean_before)  # statistics frozen
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_tune_top_run_saves_and_reloads_the_tuned_blocks(
    photos: Path, tmp_path: Path, tiny: dict[str, str], tiny_backbone: Backbone
) -> None:
    run = tmp_path / "run"
    model = florist.train(photos, run, mode="tune-top", blocks=2, epochs=8, views=1, **tiny)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "tune-top" and metrics["top1"] == 1.0
    state = load_file(str(run / "model.safetensors"))
    tuned = sorted(k for k in state if k.startswith("backbone."))
    top = ("backbone.blocks.3.0.", "backbone.blocks.4.0.", "backbone.conv_head.", "backbone.bn2.")
    assert tuned and all(k.startswith(top) for k in tuned)
    assert all(any(k.startswith(p) for k in tuned) for p in top)
    assert not torch.equal(state["backbone.conv_head.weight"], tiny_backbone.model.conv_head.weight)

    loaded = florist.load(run)
    assert loaded.backbone.tuned_id == model.backbone.tuned_id is not None
    assert feature_key(loaded.backbone) != feature_key(tiny_backbone)  # never mixes cached features
    files = sorted((photos / "red").iterdir())[:3]
    a, _ = model.predict_proba(files)
    b, _ = loaded.predict_proba(files)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert florist.evaluate(run)["top1"] == metrics["top1"]
    assert metrics["calibration"]["folds"] == 2 and model.temperature == loaded.temperature != 1.0
    # The detector scores the pretrained network's features, in the trained model as in the loaded one.
    np.testing.assert_allclose(model.ood_scores(files), loaded.ood_scores(files), rtol=1e-4)
    assert all(r.tuned_id is None for r in loaded.reference) and loaded.reference is not loaded.backbones


def test_bf16_autocast_training_also_learns(photos: Path, tmp_path: Path, tiny: dict[str, str]) -> None:
    florist.train(
        photos, tmp_path / "run", mode="tune-top", blocks=1, epochs=8, views=1, precision="bf16", **tiny
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["top1"] == 1.0
    assert metrics["history"]["loss"][-1] < metrics["history"]["loss"][0]


def test_a_backbone_without_efficientnet_blocks_cannot_be_split(tiny_backbone: Backbone) -> None:
    import timm

    from florist.training.blocks import can_split

    resnet = Backbone(timm.create_model("test_resnet"), tiny_backbone.spec, tiny_backbone.data_config)
    assert can_split(tiny_backbone) and not can_split(resnet)
    with pytest.raises(FloristError, match="not ResNet; use mode='head'"):
        split_backbone(resnet, 1)


def test_tune_top_over_several_backbones_trains_an_ensemble(photos: Path, tmp_path: Path) -> None:
    """One member per network (own top blocks, head, cross-fit and temperature), saved as one bundle."""
    run = tmp_path / "run"
    names = ["efficientnet_lite0", "efficientnet_lite1"]
    model = florist.train(photos, run, mode="tune-top", backbone=",".join(names), epochs=3, views=1)
    metrics = json.loads((run / "metrics.json").read_text())
    members = metrics["ensemble"]["members"]
    assert [m["backbone"] for m in members] == names and [m["weight"] for m in members] == [0.5, 0.5]
    assert all(m["temperature"] != 1.0 and m["calibration"]["folds"] == 2 for m in members)
    assert metrics["top1"] == 1.0 and metrics["calibration"]["temperature"] == model.temperature
    head = json.loads((run / "model.json").read_text())["head"]
    assert head["type"] == "ensemble" and [h["in_features"] for h in head["members"]] == [1280, 1280]
    assert head["temperatures"] == [m["temperature"] for m in members]
    state = load_file(str(run / "model.safetensors"))
    assert {k.split(".")[0] for k in state} == {"members", "backbone", "backbone1", "ood"}
    assert [(run / "tb" / name).is_dir() for name in names] == [True, True]
    html = (run / "report.html").read_text()
    assert 'id="ensemble"' in html and all(f"training curves of {name}" in html for name in names)

    loaded = florist.load(run)
    assert [b.tuned_id for b in loaded.backbones] == [b.tuned_id for b in model.backbones]
    assert all(b.tuned_id is not None for b in loaded.backbones)
    files = sorted((photos / "green").iterdir())[:3]
    np.testing.assert_allclose(model.predict_proba(files)[0], loaded.predict_proba(files)[0], atol=1e-5)
    assert florist.evaluate(run)["top1"] == metrics["top1"]
    assert loaded.predict(files)[0].labels[0] == "green"
