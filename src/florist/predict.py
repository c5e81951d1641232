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
from .bundle import BACKBONE_PREFIX, Bundle, build_head
from .engines import supports_bf16, usable_engine
from .errors import FloristError
from .features import FeatureResult, extract_concat, merged_errors
from .inputs import expand_inputs
from .prediction import Prediction, rank
from .progress import ProgressFn
from .remote import default_cache_dir


class Classifier:
    """A frozen backbone plus a trained head, with the class names and preprocessing.

    Use :func:`florist.load` to get one from a run folder.

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
    def from_bundle(cls, bundle: Bundle, engine: str | None = None) -> "Classifier":
        """The classifier of a bundle; ``engine`` (default: the bundle's, where it runs) computes its features."""
        engine = engine or usable_engine(bundle.engine)
        backbones = [create_backbone(spec=spec) for spec in bundle.backbones]
        for b, data_config in zip(backbones, bundle.data_configs):
            b.bf16 = bundle.bf16 and supports_bf16(engine)
            b.engine = engine
            b.data_config = dict(data_config)  # the preprocessing the model was trained and evaluated with
        backbone = backbones[0]
        tuned = {k[len(BACKBONE_PREFIX) :]: v for k, v in bundle.state.items() if k.startswith(BACKBONE_PREFIX)}
        if tuned:
            unknown = set(tuned) - set(backbone.model.state_dict())
            if unknown:
                raise FloristError(f"model.safetensors has backbone tensors this backbone lacks: {sorted(unknown)[:3]}")
            backbone.model.load_state_dict(tuned, strict=False)
            backbone.tuned_id = bundle.tuned_id or state_id(tuned)
        head = build_head(bundle.head)
        head.load_state_dict({k: v for k, v in bundle.state.items() if not k.startswith(BACKBONE_PREFIX)})
        return cls(backbones, head, bundle.classes, tta_views=bundle.tta_views, bundle=bundle)

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


@torch.inference_mode()
def average_probabilities(
    forward: Callable[[torch.Tensor], torch.Tensor], views: Sequence[np.ndarray], batch_size: int = 256
) -> np.ndarray:
    """Softmax of ``forward`` on each view's array, averaged over views (test-time augmentation).

    ``views`` holds one ``[N, ...]`` array per view of the same N images (features or
    cached activations, any float dtype); the modules behind ``forward`` must already
    be in eval mode. Returns ``[N, classes]`` float32 (``[0, 0]`` for no images).
    """
    if not len(views) or not len(views[0]):
        return np.zeros((0, 0), dtype=np.float32)
    total = None
    for array in views:
        probs = torch.cat(
            [
                forward(torch.as_tensor(array[i : i + batch_size]).float()).float().softmax(1)
                for i in range(0, len(array), batch_size)
            ]
        )
        total = probs if total is None else total + probs
    return (total / len(views)).numpy()
