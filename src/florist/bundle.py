"""The model bundle: the one thing every stage after training reads.

A run folder holds ``model.safetensors`` (the trained head's tensors) and
``model.json`` (format version, class names, backbone spec, preprocessing and
head shape). Together they rebuild the classifier with no pickle involved.
``model.json`` is written last and atomically: a folder without it is not a
finished run, whatever else it contains. It records the SHA-256 of the weights
file, so weights damaged on disk, or a pair of files from two different runs,
are refused instead of silently giving wrong predictions.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from .backbones import BackboneSpec
from .ensemble import ENSEMBLE, EnsembleHead
from .errors import FloristError
from .files import atomic_write_bytes, atomic_write_json, sha256_bytes
from .runfiles import MODEL_JSON, MODEL_WEIGHTS

FORMAT_VERSION = 1
#: Prefix of backbone tensors re-trained by florist (tune-top) in ``model.safetensors``
#: (of the first backbone; see :func:`tuned_prefix`).
BACKBONE_PREFIX = "backbone."
#: Prefix of the out-of-distribution detector's tensors (see :mod:`florist.ood`).
OOD_PREFIX = "ood."
#: Key of ``model.json`` holding the SHA-256 of ``model.safetensors`` (checked on load).
WEIGHTS_SHA256 = "weights_sha256"


@dataclass
class Bundle:
    """The contents of ``model.json`` plus the model's tensors.

    Attributes:
        classes: class names, in label order.
        backbones: how to rebuild each backbone; their features are concatenated in this order.
        data_configs: the preprocessing of each backbone, as trained and evaluated.
        head: ``{"type": "linear", "in_features", "num_classes", "dropout"}``.
        state: the head's tensors, the re-trained backbone tensors (see :func:`tuned_prefix`) and
            the detector's.
        tta_views: views whose probabilities are averaged at prediction time.
        bf16: the features were computed under bfloat16 autocast, and must be again.
        engine: what computed the features (see :mod:`florist.engines`), and computes them again.
        temperature: divides the log of the averaged probabilities (see :mod:`florist.calibration`).
        ood_threshold: out-of-distribution scores above it answer "unknown" (see :mod:`florist.ood`);
            the detector's tensors are in ``state`` under ``ood.``.
        train_config: the resolved settings of the run that trained it.
        florist_version: the florist that wrote it.
    """

    classes: list[str]
    backbones: list[BackboneSpec]
    data_configs: list[dict[str, Any]]
    head: dict[str, Any]
    state: dict[str, torch.Tensor]
    tta_views: list[str] = field(default_factory=lambda: ["clean"])
    bf16: bool = False
    engine: str = "torch"
    temperature: float = 1.0
    ood_threshold: float | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    florist_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "classes": self.classes,
            "backbones": [b.to_dict() for b in self.backbones],
            "preprocessing": self.data_configs,
            "head": self.head,
            "tta_views": self.tta_views,
            "bf16": self.bf16,
            "engine": self.engine,
            "temperature": self.temperature,
            "ood_threshold": self.ood_threshold,
            "train_config": self.train_config,
            "florist_version": self.florist_version,
        }


#: Bundle fields that have a default, for ``model.json`` files written without them.
_OPTIONAL = tuple(f.name for f in fields(Bundle) if f.default is not MISSING or f.default_factory is not MISSING)


def linear_head_spec(in_features: int, num_classes: int, dropout: float = 0.0) -> dict[str, Any]:
    """The ``head`` entry of ``model.json`` for florist's linear classifier."""
    return {"type": "linear", "in_features": int(in_features), "num_classes": int(num_classes), "dropout": dropout}


def tuned_prefix(index: int) -> str:
    """Prefix of backbone ``index``'s re-trained tensors: ``backbone.`` for the first, ``backbone<i>.`` after it.

    The first backbone keeps the prefix runs of one backbone have always written.
    """
    return BACKBONE_PREFIX if index == 0 else f"backbone{index}."


def _is_tuned_key(key: str) -> bool:
    """True for a key :func:`tuned_prefix` gives, whatever the backbone's index."""
    stem, first = BACKBONE_PREFIX.rstrip("."), key.split(".", 1)[0]
    return first.startswith(stem) and (first == stem or first[len(stem) :].isdigit())


def tuned_tensors(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Backbone ``index``'s re-trained tensors in a bundle's state, under the backbone's own names."""
    prefix = tuned_prefix(index)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def with_tuned_prefixes(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Re-trained tensors of each backbone (an empty dict: untouched), named as :func:`tuned_tensors` reads them."""
    return {tuned_prefix(i) + k: v for i, s in enumerate(states) for k, v in s.items()}


def head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's own tensors among a bundle's (not the tuned backbones', not the detector's)."""
    return {k: v for k, v in state.items() if not _is_tuned_key(k) and not k.startswith(OOD_PREFIX)}


def build_head(spec: dict[str, Any]) -> nn.Module:
    """The classifier head described by ``model.json``'s ``head`` entry.

    A dropout layer (active only in training) followed by one linear layer on the
    pooled backbone features; the parameter names (``fc.weight``, ``fc.bias``) are
    those stored in ``model.safetensors``. An ensemble's entry lists one such head
    per backbone (see :mod:`florist.ensemble`).
    """
    if spec.get("type") == ENSEMBLE:
        return EnsembleHead([build_head(m) for m in spec["members"]], spec["temperatures"], spec["weights"])
    if spec.get("type") != "linear":
        raise FloristError(f"unknown head type {spec.get('type')!r}")
    head = nn.Sequential()
    head.add_module("dropout", nn.Dropout(float(spec.get("dropout", 0.0))))
    head.add_module("fc", nn.Linear(int(spec["in_features"]), int(spec["num_classes"])))
    return head


def is_complete(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a finished model (its ``model.json`` exists)."""
    return (Path(run_dir) / MODEL_JSON).is_file()


def save_bundle(run_dir: str | Path, bundle: Bundle) -> None:
    """Write weights, then ``model.json`` (the completion mark, holding the weights' SHA-256), each atomically."""
    run = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.state.items()}
    weights = save(state, metadata={"format": "florist"})
    atomic_write_bytes(run / MODEL_WEIGHTS, weights)
    atomic_write_json(run / MODEL_JSON, {**bundle.to_json(), WEIGHTS_SHA256: sha256_bytes(weights)})


def read_bundle(run_dir: str | Path) -> Bundle:
    """Read a bundle back; the tensors go through safetensors only.

    Raises:
        FloristError: missing, unfinished or incompatible run folder.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FloristError(f"run folder not found: {run}")
    if not is_complete(run):
        raise FloristError(f"no finished model in {run} (model.json missing: training did not complete?)")
    try:
        meta = json.loads((run / MODEL_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FloristError(f"cannot read {run / MODEL_JSON}: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise FloristError(
            f"{run} was written by an incompatible florist (format {meta.get('format_version')}, "
            f"this version reads {FORMAT_VERSION})"
        )
    try:
        weights = (run / MODEL_WEIGHTS).read_bytes()
    except OSError as e:
        raise FloristError(f"cannot read {run / MODEL_WEIGHTS}: {e.strerror or e}") from None
    if meta.get(WEIGHTS_SHA256, sha256_bytes(weights)) != sha256_bytes(weights):
        raise FloristError(
            f"{run / MODEL_WEIGHTS} does not match {MODEL_JSON} (damaged, or replaced by another run); train again"
        )
    try:
        state = load(weights)
    except Exception as e:
        raise FloristError(f"cannot read {run / MODEL_WEIGHTS}: {e}") from None
    optional = {name: meta[name] for name in _OPTIONAL if name in meta}  # runs written before a field existed
    try:
        return Bundle(
            classes=list(meta["classes"]),
            backbones=[BackboneSpec.from_dict(b) for b in meta["backbones"]],
            data_configs=list(meta["preprocessing"]),
            head=meta["head"],
            state=state,
            **optional,
        )
    except (KeyError, TypeError) as e:
        raise FloristError(f"{run / MODEL_JSON} is incomplete or damaged ({type(e).__name__}: {e}); train again") from None
