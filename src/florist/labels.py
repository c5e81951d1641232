"""Suspect labels: photos whose class folder disagrees with what the rest of the folder says.

    >>> report = florist.audit("flower_photos", labels=True)          # doctest: +SKIP
    >>> [(i.path, i.given, i.suggested) for i in report.label_issues][:1]  # doctest: +SKIP
    [('tulips/15082212714_ff87e8fcb1_m.jpg', 'tulips', 'roses')]

Each photo's class is predicted by a head that never saw it: the photos are split into
``folds`` stratified parts, and a multinomial logistic regression on the backbone's pooled
features (cached, as training caches them: a folder florist has trained on costs no network
pass) is fitted on the other parts (on a sample of :data:`FIT_PHOTOS` of them, for large
folders). Those out-of-fold probabilities go to cleanlab's confident learning (Northcutt
et al., 2021), which estimates, per class pair, how many labels are swapped, and returns
the photos most likely mislabelled, ranked by the out-of-fold probability of their given
class (cleanlab's self-confidence: lower is more suspect).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from .errors import FloristError, SettingError, literal
from .progress import ProgressFn
from .sampling import fold_count, stratified_sample

#: Parts the photos are split into for out-of-fold predictions.
DEFAULT_FOLDS = 5
#: Inverse L2 strength of the logistic regression, and cleanlab's rule for what counts as an
#: issue ("prune_by_class": in each class, as many of the least confident photos as the
#: estimated number of wrong labels there). Chosen by bench/trust.py on the shared flowers'
#: training part with seeded label flips: the highest recall at 60% precision or more.
DEFAULT_C = 0.002
DEFAULT_FILTER = "prune_by_class"
#: Photos each fold's regression is fitted on at most (a seeded, stratified sample of the other
#: folds beyond): strongly regularised (:data:`DEFAULT_C`), it needs no more, while its time
#: grows with every photo (5 folds of 100,000 photos took a minute on a 2-core CPU). Every
#: photo is still scored, by the fewest folds whose other folds hold that many (2 at 100,000).
FIT_PHOTOS = 10_000
#: Views whose pooled features are averaged (training caches both).
VIEWS = ("clean", "flip")


@dataclass
class LabelIssue:
    """A photo whose label looks wrong.

    Attributes:
        path: relative to the audited folder.
        given: its class folder.
        suggested: the class the out-of-fold head gives it.
        score: the out-of-fold probability of ``given`` (0-1; lower is more suspect).
    """

    path: str
    given: str
    suggested: str
    score: float


def folds_fitted(folds: int, photos: int) -> int:
    """How many of ``folds`` :func:`out_of_fold_probabilities` fits for ``photos`` photos (each fit is
    on a sample of :data:`FIT_PHOTOS` anyway, so no more than it takes for the other folds to hold that)."""
    return fold_count(folds, photos, FIT_PHOTOS)


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, folds: int = DEFAULT_FOLDS, seed: int = 0, c: float = DEFAULT_C
) -> np.ndarray:
    """``[N, classes]`` probabilities, each row from a head fitted without that photo.

    Raises:
        SettingError: fewer than 2 folds, or a class with fewer photos than folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels)
    if folds < 2:
        raise SettingError(f"{{folds}} must be >= 2, got {literal(folds)}")
    if counts.min() < folds:
        raise SettingError(
            f"checking labels with {{folds:{folds}}} needs at least {folds} photos per class; "
            f"the smallest class has {counts.min()}"
        )
    probs = np.zeros((len(labels), len(counts)), dtype=np.float64)
    folds = folds_fitted(folds, len(labels))
    for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels):  # X: only its length
        train = train[stratified_sample(labels[train], FIT_PHOTOS, seed)]
        head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        head.fit(features[train], labels[train])
        probs[held_out] = head.predict_proba(features[held_out])
    return probs


def rank_label_issues(
    labels: np.ndarray, probs: np.ndarray, filter_by: str = DEFAULT_FILTER
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the photos cleanlab finds mislabelled, most suspect first, and every photo's score."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    with warnings.catch_warnings():  # its notes on small classes; florist checks the sizes itself
        warnings.simplefilter("ignore")
        ranked = find_label_issues(labels, probs, filter_by=filter_by, return_indices_ranked_by="self_confidence")
    return np.asarray(ranked, dtype=int), get_label_quality_scores(labels, probs, method="self_confidence")


def view_mean(views: dict) -> np.ndarray:
    """The pooled features of :data:`VIEWS` averaged, in float64 for the regression."""
    return np.mean([views[v].features.astype(np.float64) for v in VIEWS], axis=0)


def find_label_issues(
    paths: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    names: Sequence[str],
    *,
    shas: Sequence[str] | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    engine: str = "auto",
    folds: int = DEFAULT_FOLDS,
    progress: ProgressFn | None = None,
) -> list[LabelIssue]:
    """The photos at ``paths`` (shown as ``names``) whose ``labels`` look wrong, most suspect first.

    Args:
        shas: the files' content hashes when known, so cached photos are not read again.
        backbone, weights, engine: the network whose pooled features the heads are fitted on
            (as ``florist train`` takes them; its feature cache is shared).
        progress: ``progress(done, total)`` while features are computed.

    Raises:
        FloristError: a photo cannot be read, or settings that cannot work.
    """
    import torch

    from .features import extract_views, merged_errors
    from .remote import default_cache_dir
    from .training.backbone_set import create_backbones
    from .training.settings import TrainConfig

    (net,) = create_backbones(TrainConfig(backbone=backbone, weights=weights, engine=engine), torch.device("cpu"))
    views = extract_views(
        net,
        list(paths),
        VIEWS,
        shas=shas,
        cache_root=default_cache_dir(),
        progress_for=(lambda view: nullcontext(progress)) if progress else None,
    )
    errors = merged_errors(views.values())
    if errors:
        i, reason = next(iter(errors.items()))
        raise FloristError(f"cannot check labels: {names[i]} cannot be read ({reason})")
    return label_issues_of(view_mean(views), np.asarray(labels), classes, names, folds)


def label_issues_of(
    features: np.ndarray, labels: np.ndarray, classes: Sequence[str], names: Sequence[str], folds: int = DEFAULT_FOLDS
) -> list[LabelIssue]:
    """:func:`find_label_issues` on features already at hand (``[N, D]``, one row per name)."""
    probs = out_of_fold_probabilities(features.astype(np.float64), labels, folds)
    ranked, scores = rank_label_issues(labels, probs)
    return [
        LabelIssue(names[i], classes[labels[i]], classes[int(probs[i].argmax())], float(scores[i])) for i in ranked
    ]

