"""Stage 6, *predict*: a trained run folder -> a :class:`Classifier` that labels new images.

    >>> model = florist.load("runs/flowers")            # doctest: +SKIP
    >>> model.predict(["rose.jpg"], top_k=3)[0].labels  # doctest: +SKIP
    ['roses', 'tulips', 'daisy']

The classifier rebuilds the backbone from the bundle's spec and applies the
stored preprocessing, so it sees images exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, create_backbone
from .bundle import BACKBONE_PREFIX, Bundle, build_head
from .errors import FloristError
from .features import FeatureResult, default_cache_dir, extract_concat, merged_errors
from .loop import average_probabilities
from .prediction import Prediction, load, rank  # noqa: F401 (load, Prediction: this module's API)
from .progress import ProgressFn
from .remote import expand_inputs
from .tune import state_id


class Classifier:
    """A frozen backbone plus a trained head, with the class names and preprocessing.

    Use :func:`load` to get one from a run folder.

    Attributes:
        tta_views: views whose probabilities are averaged at prediction time
            (``["clean", "flip"]`` = centre crop plus its mirror image).
    """

    def __init__(
        self,
        backbones: Backbone | Sequence[Backbone],
        head: nn.Module,
        classes: Sequence[str],
        *,
        tta_views: Sequence[str] = ("clean",),
        bundle: Bundle | None = None,
    ):
        self.backbones = [backbones] if isinstance(backbones, Backbone) else list(backbones)
        self.backbone = self.backbones[0]  # the one tune-top adapts
        self.head = head.eval()
        self.classes = list(classes)
        self.tta_views = list(tta_views)
        self.bundle = bundle

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "Classifier":
        backbones = [create_backbone(spec=spec) for spec in bundle.backbones]
        for b, data_config in zip(backbones, bundle.data_configs):
            b.bf16 = bool(bundle.extra.get("bf16", False))
            b.data_config = dict(data_config)  # the preprocessing the model was trained and evaluated with
        backbone = backbones[0]
        tuned = {k[len(BACKBONE_PREFIX) :]: v for k, v in bundle.state.items() if k.startswith(BACKBONE_PREFIX)}
        if tuned:
            unknown = set(tuned) - set(backbone.model.state_dict())
            if unknown:
                raise FloristError(f"model.safetensors has backbone tensors this backbone lacks: {sorted(unknown)[:3]}")
            backbone.model.load_state_dict(tuned, strict=False)
            backbone.tuned_id = bundle.extra.get("tuned_id") or state_id(tuned)
        head = build_head(bundle.head)
        head.load_state_dict({k: v for k, v in bundle.state.items() if not k.startswith(BACKBONE_PREFIX)})
        return cls(backbones, head, bundle.classes, tta_views=bundle.extra.get("tta_views", ["clean"]), bundle=bundle)

    @torch.inference_mode()
    def probabilities_from_features(self, features: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``[N, classes]`` for pooled features ``[N, D]``."""
        if len(features) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return average_probabilities(self.head, [features])

    def probabilities_from_views(self, views: dict[str, FeatureResult]) -> tuple[np.ndarray, dict[int, str]]:
        """Average the probabilities of :attr:`tta_views`; rows of unreadable images are NaN."""
        errors = merged_errors(views[v] for v in self.tta_views)
        probs = average_probabilities(self.head, [views[v].features for v in self.tta_views])
        probs[list(errors)] = np.nan
        return probs, errors

    def predict_proba(
        self,
        paths: Sequence[str | Path],
        *,
        shas: Sequence[str | None] | None = None,
        cache: bool = False,
        progress: ProgressFn | None = None,
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Probabilities ``[N, classes]`` for image files and index -> error for unreadable ones.

        Args:
            shas: known content hashes, so cached features can be used without reading files.
            cache: read and fill the feature cache (worth it for repeated evaluation).
        """
        views = extract_concat(
            self.backbones,
            paths,
            self.tta_views,
            shas=shas,
            cache_root=default_cache_dir() if cache else None,
            progress_for=(lambda view: nullcontext(progress)) if progress else None,
        )
        return self.probabilities_from_views(views)

    def predict(
        self, inputs: Iterable[str | Path], top_k: int = 5, progress: ProgressFn | None = None
    ) -> list[Prediction]:
        """Top-``k`` predictions for files, folders (recursive) or glob patterns, local or URLs.

        A file that is not a usable image gets a :class:`Prediction` with ``error`` set;
        it never stops the others. Remote files are fetched first (see :mod:`florist.remote`);
        predictions name them by URL.
        """
        pairs = expand_inputs(inputs)  # (name as given, local file)
        names, paths = [name for name, _ in pairs], [path for _, path in pairs]
        probs, errors = self.predict_proba(paths, progress=progress)
        return rank(names, probs, errors, self.classes, top_k)
