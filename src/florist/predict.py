"""Stage 6, *predict*: a trained run folder -> a :class:`Classifier` that labels new images.

    >>> model = florist.load("runs/flowers")            # doctest: +SKIP
    >>> model.predict(["rose.jpg"], top_k=3)[0].labels  # doctest: +SKIP
    ['roses', 'tulips', 'daisy']

The classifier rebuilds the backbone from the bundle's spec and applies the
stored preprocessing, so it sees images exactly as training did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, create_backbone, state_id
from .bundle import Bundle, build_head, head_state, tuned_tensors
from .calibration import apply_temperature
from .engines import supports_bf16, usable_engine
from .ensemble import view_probabilities
from .errors import FloristError
from .features import FeatureResult, extract_concat, merged_errors
from .inputs import expand_inputs
from .ood import OodDetector
from .prediction import Prediction, rank
from .progress import ProgressFn
from .remote import default_cache_dir
from .runtime import refuse_ood_threshold


class Classifier:
    """Backbones plus a trained head, with the class names and preprocessing.

    The head is one linear layer on the backbones' features side by side, or an
    ensemble's member heads, one per backbone (:class:`~florist.ensemble.EnsembleHead`).

    Use :func:`florist.load` to get one from a run folder.

    Attributes:
        tta_views: views whose probabilities are averaged at prediction time
            (``["clean", "flip"]`` = centre crop plus its mirror image).
        temperature: calibrates the averaged probabilities (see :mod:`florist.calibration`).
        ood: the out-of-distribution detector (see :mod:`florist.ood`), or None for runs without one.
        reference: the backbones whose clean-view features ``ood`` scores (pretrained weights).
    """

    def __init__(
        self,
        backbones: Backbone | Sequence[Backbone],
        head: nn.Module,
        classes: Sequence[str],
        *,
        tta_views: Sequence[str] = ("clean",),
        temperature: float = 1.0,
        bundle: Bundle | None = None,
    ):
        self.backbones = [backbones] if isinstance(backbones, Backbone) else list(backbones)
        self.backbone = self.backbones[0]  # the one tune-top adapts
        self.head = head.eval()
        self.classes = list(classes)
        self.tta_views = list(tta_views)
        self.temperature = float(temperature)
        self.bundle = bundle
        self.ood: OodDetector | None = None
        self.reference: list[Backbone] = self.backbones

    @classmethod
    def from_bundle(cls, bundle: Bundle, engine: str | None = None) -> "Classifier":
        """The classifier of a bundle; ``engine`` (default: the bundle's, where it runs) computes its features."""
        engine = engine or usable_engine(bundle.engine)
        backbones = _pretrained_backbones(bundle, engine)
        tuned = False
        for index, backbone in enumerate(backbones):
            tensors = tuned_tensors(bundle.state, index)
            if tensors:
                _load_tuned(backbone, tensors)
                tuned = True
        head = build_head(bundle.head)
        head.load_state_dict(head_state(bundle.state))
        model = cls(backbones, head, bundle.classes, tta_views=bundle.tta_views, temperature=bundle.temperature, bundle=bundle)
        model.ood = OodDetector.from_state(bundle.state, bundle.ood_threshold)
        if tuned and model.ood is not None:  # the detector scores the pretrained networks' features
            model.reference = _pretrained_backbones(bundle, engine)
        return model

    def probabilities_from_views(self, views: dict[str, FeatureResult]) -> tuple[np.ndarray, dict[int, str]]:
        """Average the probabilities of :attr:`tta_views`; rows of unreadable images are NaN."""
        errors = merged_errors(views[v] for v in self.tta_views)
        probs = average_probabilities(self.head, [views[v].features for v in self.tta_views])
        probs = apply_temperature(probs, self.temperature)
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
        """Calibrated probabilities ``[N, classes]`` for image files and index -> error for unreadable ones.

        Args:
            shas: known content hashes, so cached features can be used without reading files.
            cache: read and fill the feature cache (worth it for repeated evaluation).
        """
        return self.probabilities_from_views(self._views(paths, shas, cache, progress))

    def ood_scores(
        self, paths: Sequence[str | Path], *, shas: Sequence[str | None] | None = None, cache: bool = False
    ) -> np.ndarray | None:
        """Out-of-distribution score per image (higher = less like the training classes; NaN if unreadable).

        None for a run trained without a detector.
        """
        return self._ood_scores(paths, None, shas, cache)

    def _views(
        self, paths: Sequence[str | Path], shas: Sequence[str | None] | None, cache: bool, progress: ProgressFn | None
    ) -> dict[str, FeatureResult]:
        return extract_concat(
            self.backbones,
            paths,
            self.tta_views,
            shas=shas,
            cache_root=default_cache_dir() if cache else None,
            progress_for=(lambda view: nullcontext(progress)) if progress else None,
        )

    def _ood_scores(
        self,
        paths: Sequence[str | Path],
        views: dict[str, FeatureResult] | None,
        shas: Sequence[str | None] | None = None,
        cache: bool = False,
    ) -> np.ndarray | None:
        """Scores of the reference features: the clean view already in ``views`` when the backbones are untuned.

        A run that tuned its backbone needs one more pass, of the pretrained network over the clean view.
        """
        if self.ood is None:
            return None
        if views is not None and self.reference is self.backbones:
            result = views["clean"]
        else:
            (result,) = extract_concat(
                self.reference, paths, ["clean"], shas=shas, cache_root=default_cache_dir() if cache else None
            ).values()
        scores = self.ood.score(result.features)
        scores[list(result.errors)] = np.nan
        return scores

    def predict(
        self,
        inputs: Iterable[str | Path],
        top_k: int = 5,
        progress: ProgressFn | None = None,
        *,
        ood_threshold: float | None = None,
    ) -> list[Prediction]:
        """Top-``k`` predictions for files, folders (recursive) or glob patterns, local or URLs.

        A file that is not a usable image gets a :class:`Prediction` with ``error`` set;
        it never stops the others. Remote files are fetched first (see :mod:`florist.remote`);
        predictions name them by URL. Each carries its ``ood_score`` and whether it is
        ``unknown`` (score above ``ood_threshold``, default the run's own) when the run has a detector.
        """
        refuse_ood_threshold(ood_threshold, has_detector=self.ood is not None)
        pairs = expand_inputs(inputs)  # (name as given, path to read)
        names, paths = [name for name, _ in pairs], [path for _, path in pairs]
        views = self._views(paths, None, False, progress)
        probs, errors = self.probabilities_from_views(views)
        scores = self._ood_scores(paths, views)
        threshold = self.ood_threshold if ood_threshold is None else ood_threshold
        return rank(names, probs, errors, self.classes, top_k, ood=scores, threshold=threshold)

    @property
    def ood_threshold(self) -> float | None:
        """The stored threshold of the "unknown" answer (None: no detector, or too few photos to choose one)."""
        return self.ood.threshold if self.ood is not None else None


def _load_tuned(backbone: Backbone, tensors: dict[str, torch.Tensor]) -> None:
    """Put a run's re-trained tensors into ``backbone``, and mark it for the feature cache."""
    unknown = set(tensors) - set(backbone.model.state_dict())
    if unknown:
        raise FloristError(f"model.safetensors has backbone tensors this backbone lacks: {sorted(unknown)[:3]}")
    backbone.model.load_state_dict(tensors, strict=False)
    backbone.tuned_id = state_id(tensors)


def _pretrained_backbones(bundle: Bundle, engine: str) -> list[Backbone]:
    """The bundle's backbones with their pretrained weights, computing features as the run did."""
    backbones = [create_backbone(spec=spec) for spec in bundle.backbones]
    for b, data_config in zip(backbones, bundle.data_configs):
        b.bf16 = bundle.bf16 and supports_bf16(engine)
        b.engine = engine
        b.data_config = dict(data_config)  # the preprocessing the model was trained and evaluated with
    return backbones


@torch.inference_mode()
def average_probabilities(
    forward: Callable[[torch.Tensor], torch.Tensor], views: Sequence[np.ndarray], batch_size: int = 256
) -> np.ndarray:
    """Softmax of ``forward`` on each view's array, averaged over views (test-time augmentation).

    ``views`` holds one ``[N, ...]`` array per view of the same N images (features or
    cached activations, any float dtype); the modules behind ``forward`` must already
    be in eval mode. An :class:`~florist.ensemble.EnsembleHead` combines its members
    (see :func:`~florist.ensemble.view_probabilities`). Returns ``[N, classes]`` float32
    (``[0, 0]`` for no images).
    """
    if not len(views) or not len(views[0]):
        return np.zeros((0, 0), dtype=np.float32)
    batches = [
        view_probabilities(forward, [torch.as_tensor(array[i : i + batch_size]).float() for array in views])
        for i in range(0, len(views[0]), batch_size)
    ]
    return torch.cat(batches).float().numpy()
