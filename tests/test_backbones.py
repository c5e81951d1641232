"""Backbones: offline weights map correctly, preprocessing is timm's, weights files are safe."""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from florist.backbones import (
    BUNDLED,
    create_backbone,
    load_checkpoint,
    map_state_dict,
)
from florist.errors import FloristError, SettingError
from florist.features import build_transform

DAISY = 985
PALACE = 698


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "cache"))
    # Never use (or fill) a user's hub caches: an accidentally cached resnet18 would
    # otherwise make the "offline" test pass for the wrong reason.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", keep_classifier=True)


@pytest.fixture(scope="module")
def lite0_features():
    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def sample_images() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {Path(f).name: Image.fromarray(img) for f, img in zip(data.filenames, data.images)}


def _probabilities(backbone, image: Image.Image) -> torch.Tensor:
    x = build_transform(backbone.data_config)(image).unsqueeze(0)
    with torch.no_grad():
        return backbone.model(x).softmax(-1)[0]


def test_imagenet_indices_are_what_the_test_assumes():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    assert info.index_to_description(DAISY) == "daisy"
    assert info.index_to_description(PALACE) == "palace"


def test_lite0_sees_a_daisy(lite0, sample_images):
    probs = _probabilities(lite0, sample_images["flower.jpg"])
    assert DAISY in probs.topk(3).indices.tolist()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_bundled_weights_see_a_palace(name, lite0, sample_images):
    backbone = lite0 if name == "efficientnet_lite0" else create_backbone(name, keep_classifier=True)
    assert backbone.spec.weights == "bundled"
    assert backbone.spec.timm_name == BUNDLED[name].timm_name
    probs = _probabilities(backbone, sample_images["china.jpg"])
    assert int(probs.argmax()) == PALACE
    # Garbage weights give an almost flat distribution; mapped ones are confident.
    assert float(probs.max()) > 0.2


def test_data_config_is_timms(lite0):
    cfg = lite0.data_config
    assert cfg["input_size"] == [3, 224, 224]
    assert cfg["crop_pct"] == pytest.approx(0.875)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == pytest.approx([0.5, 0.5, 0.5])
    assert cfg["std"] == pytest.approx([0.5, 0.5, 0.5])
    assert cfg.get("crop_mode", "center") == "center"


def test_lite2_data_config():
    cfg = create_backbone("efficientnet_lite2").data_config
    assert cfg["input_size"] == [3, 260, 260]
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == pytest.approx([0.5, 0.5, 0.5])


def test_feature_backbone_returns_pooled_features(lite0_features):
    assert lite0_features.num_features == 1280
    with torch.no_grad():
        out = lite0_features.model(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1280)
    assert not any(p.requires_grad for p in lite0_features.model.parameters())
    assert not lite0_features.model.training


# ---------------------------------------------------------------------------
# map_state_dict
# ---------------------------------------------------------------------------


def _target() -> OrderedDict:
    return OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))


def test_map_state_dict_renames_by_position():
    src = OrderedDict(x=torch.ones(2, 3), y=torch.full((4,), 2.0))
    out = map_state_dict(src, _target())
    assert list(out) == ["a", "b"]
    assert torch.equal(out["a"], src["x"]) and torch.equal(out["b"], src["y"])


def test_map_state_dict_shape_mismatch():
    src = OrderedDict(x=torch.ones(2, 3), y=torch.ones(5))
    with pytest.raises(FloristError, match="shape"):
        map_state_dict(src, _target())


@pytest.mark.parametrize("n", [1, 3])
def test_map_state_dict_count_mismatch(n):
    src = OrderedDict((f"t{i}", torch.ones(2, 3)) for i in range(n))
    with pytest.raises(FloristError, match="tensors"):
        map_state_dict(src, _target())


# ---------------------------------------------------------------------------
# Names and offline behaviour
# ---------------------------------------------------------------------------


def test_unknown_backbone_names_the_bundled_ones():
    with pytest.raises(FloristError) as info:
        create_backbone("no_such_network_xyz")
    message = str(info.value)
    assert "no_such_network_xyz" in message
    for name in BUNDLED:
        assert name in message


@pytest.fixture
def no_network(monkeypatch):
    """Make any connection attempt fail at once, so an offline test can never hang."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:  # huggingface_hub reads the variable at import time
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_timm_name_without_weights_offline_mentions_weights_option(no_network):
    with pytest.raises(SettingError) as info:
        create_backbone("resnet18")
    assert "weights='FILE'" in str(info.value) and "--weights FILE" in info.value.for_cli()
    assert "resnet18" in str(info.value)


# ---------------------------------------------------------------------------
# weights=FILE
# ---------------------------------------------------------------------------


def _plain_state(backbone) -> "OrderedDict[str, torch.Tensor]":
    # channels_last tensors are not contiguous; safetensors wants contiguous ones
    return OrderedDict((k, v.detach().clone().contiguous()) for k, v in backbone.model.state_dict().items())


@pytest.fixture(scope="module")
def weight_files(lite0, tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    state = _plain_state(lite0)
    st_path = folder / "lite0.safetensors"
    save_file(dict(state), str(st_path))
    renamed = OrderedDict((f"w{i}", v) for i, v in enumerate(state.values()))
    pth_path = folder / "lite0_renamed.pth"
    torch.save(renamed, pth_path)
    wrapped_path = folder / "lite0_wrapped.pth"
    torch.save({"state_dict": renamed, "epoch": 3}, wrapped_path)
    body_only = OrderedDict(
        (f"w{i}", v) for i, (k, v) in enumerate(state.items()) if not k.startswith("classifier.")
    )
    body_path = folder / "lite0_body.pth"
    torch.save(body_only, body_path)
    return {
        "safetensors": st_path,
        "pth": pth_path,
        "wrapped": wrapped_path,
        "body": body_path,
        "state": state,
    }


@pytest.fixture(scope="module")
def random_input():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["safetensors", "pth", "wrapped", "body"])
def test_weights_file_gives_identical_features(kind, weight_files, lite0_features, random_input):
    backbone = create_backbone("efficientnet_lite0", weights=weight_files[kind])
    assert backbone.spec.weights == "file"
    assert backbone.spec.weights_path == str(Path(weight_files[kind]).resolve())
    assert backbone.spec.weights_id.startswith("sha256:")
    assert backbone.data_config == lite0_features.data_config
    with torch.no_grad():
        expected = lite0_features.model(random_input)
        actual = backbone.model(random_input)
    assert torch.equal(actual, expected)


def test_weights_file_with_a_wrong_shape_is_refused(weight_files, tmp_path):
    state = OrderedDict(weight_files["state"])
    name = next(k for k, v in state.items() if v.ndim == 4)
    state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(FloristError, match="shape"):
        create_backbone("efficientnet_lite0", weights=path)
    renamed = OrderedDict((f"w{i}", v) for i, v in enumerate(state.values()))
    torch.save(renamed, path)
    with pytest.raises(FloristError, match="shape"):
        create_backbone("efficientnet_lite0", weights=path)


def test_weights_file_for_another_architecture_is_refused(weight_files, tmp_path):
    path = tmp_path / "short.pth"
    torch.save(OrderedDict(list(weight_files["state"].items())[:10]), path)
    with pytest.raises(FloristError, match="tensors"):
        create_backbone("efficientnet_lite0", weights=path)


def test_changed_weights_file_is_detected_on_rebuild(weight_files, tmp_path, random_input):
    path = tmp_path / "mine.pth"
    path.write_bytes(weight_files["pth"].read_bytes())
    backbone = create_backbone("efficientnet_lite0", weights=path)
    again = create_backbone(spec=backbone.spec)  # unchanged: rebuilds fine and identically
    with torch.no_grad():
        assert torch.equal(again.model(random_input), backbone.model(random_input))
    state = torch.load(path, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1.0
    torch.save(state, path)
    with pytest.raises(FloristError, match="changed"):
        create_backbone(spec=backbone.spec)
    path.unlink()
    with pytest.raises(FloristError):
        create_backbone(spec=backbone.spec)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FloristError, match="not found"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "nope.safetensors")


def test_junk_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 7 + b"not a safetensors file")
    with pytest.raises(FloristError):
        create_backbone("efficientnet_lite0", weights=path)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    # sanity: the payload is live, i.e. plain unpickling really runs it (harmless: touches a tmp file)
    live_marker = tmp_path / "live"
    live = tmp_path / "live.pth"
    torch.save({"payload": _Exploit(live_marker)}, live)
    torch.load(live, weights_only=False)
    assert live_marker.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(FloristError, match="refusing"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(FloristError):
        create_backbone("efficientnet_lite0", weights=path)
    assert not marker.exists()


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(FloristError, match="state dict"):
        load_checkpoint(path)
    path2 = tmp_path / "mixed.pth"
    torch.save({"w": torch.zeros(1), "epoch": 3}, path2)
    with pytest.raises(FloristError, match="state dict"):
        load_checkpoint(path2)


def test_load_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    save_file(state, str(tmp_path / "s.safetensors"))
    torch.save({"model": state}, tmp_path / "m.pt")
    for name in ("s.safetensors", "m.pt"):
        loaded = load_checkpoint(tmp_path / name)
        assert set(loaded) == {"a", "b"}
        assert np.array_equal(loaded["a"].numpy(), state["a"].numpy())
