"""The run's backbones, built from its settings: names, weights, engine and precision in one place.

Used by training, by the suspect-label audit and by the benches, so that they all get the
networks (and the feature-cache keys) a training run with the same settings would.
"""

from __future__ import annotations

import torch

from ..backbones import Backbone, create_backbone
from ..devices import uses_bf16
from ..engines import resolve_engine, supports_bf16
from ..errors import SettingError
from .settings import TrainConfig


def create_backbones(cfg: TrainConfig, device: torch.device) -> list[Backbone]:
    """One backbone per name in ``cfg.backbone``, in that order, on the chosen engine and precision."""
    engine = resolve_engine(cfg.engine, device)
    if cfg.precision == "bf16" and not supports_bf16(engine):
        raise SettingError("{precision:bf16} needs {engine:openvino} or {engine:torch}: ONNX Runtime computes in fp32")
    backbones = [create_backbone(name, cfg.weights) for name in cfg.backbone_names]
    for b in backbones:
        b.engine = engine
        b.bf16 = uses_bf16(cfg.precision) and supports_bf16(engine)
    return backbones
