"""Ensembles: one trained head per backbone, their calibrated probabilities averaged.

A run of ``--mode tune-top`` over several backbones trains each network's top
blocks and its own head (see :mod:`florist.training.ensemble`); this module is what
every stage after training uses to combine them. The features of all backbones
arrive side by side, as for a head-mode run over several backbones (one input per
backbone and view, see :mod:`florist.preprocess`); the combination differs:

* a head-mode run concatenates them into one linear head;
* an ensemble gives each backbone's slice to its own head, averages that
  member's probabilities over the test-time views, calibrates them with the
  member's temperature and averages the members with their weights.

The run's own temperature is then applied to the result, as for any run. Networks
that err differently gain from it: on the flowers' fixed split the three bundled
networks together score higher than the best one alone (README, ensemble table).

:func:`view_probabilities` is the one formula of "probabilities averaged over
views" for single heads and ensembles alike, used by predict, evaluate, export and
serve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .calibration import temperature_scaled

ENSEMBLE = "ensemble"


def ensemble_head_spec(
    members: Sequence[dict[str, Any]], temperatures: Sequence[float], weights: Sequence[float]
) -> dict[str, Any]:
    """The ``head`` entry of ``model.json`` for an ensemble: each member's head, temperature and weight."""
    if not (len(members) == len(temperatures) == len(weights)) or len(members) < 2:
        raise ValueError("an ensemble needs two or more members, each with a temperature and a weight")
    return {
        "type": ENSEMBLE,
        "members": [dict(m) for m in members],
        "temperatures": [float(t) for t in temperatures],
        "weights": [float(w) for w in weights],
    }


class EnsembleHead(nn.Module):
    """Member heads on their slices of the concatenated features, combined as the module docstring says.

    The tensors of member ``i`` are ``members.<i>.*`` in ``model.safetensors``.
    """

    def __init__(self, heads: Sequence[nn.Module], temperatures: Sequence[float], weights: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(heads)
        self.widths = [int(h.fc.in_features) for h in heads]
        self.temperatures = [float(t) for t in temperatures]
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]

    def member_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Each member's logits from its slice of ``[N, sum(widths)]`` features."""
        slices = torch.split(features, self.widths, dim=1)
        return [head(x) for head, x in zip(self.members, slices)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log of the combined probabilities of one view: a score per class, as a plain head's logits are."""
        return self.view_probabilities([features]).clamp_min(1e-12).log()

    def view_probabilities(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[N, classes]``: the weighted average of the members' calibrated, view-averaged probabilities."""
        per_view = [self.member_logits(v) for v in views]
        total = None
        for m, (temperature, weight) in enumerate(zip(self.temperatures, self.weights)):
            probs = torch.stack([logits[m].float().softmax(1) for logits in per_view]).mean(0)
            part = weight * temperature_scaled(probs, temperature)
            total = part if total is None else total + part
        assert total is not None
        return total


def view_probabilities(
    head: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Softmax of ``head`` on each view's features, averaged over the views (an ensemble combines its members).

    ``views`` holds one ``[N, features]`` tensor per test-time view of the same N images.
    """
    if isinstance(head, EnsembleHead):
        return head.view_probabilities(views)
    return torch.stack([head(v).float().softmax(1) for v in views]).mean(0)
