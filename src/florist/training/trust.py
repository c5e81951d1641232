"""After the fit: the temperature that calibrates the run, and the detector behind its "unknown" answer.

Both must be chosen on photos the model did not learn from, and neither may use
the eval split (it only measures). The temperature comes from *cross-fitting*:
the mode's own ``fit`` trains on ``k - 1`` folds of the training part and predicts
the k-th, so the held-out probabilities come from the very recipe being
calibrated. With cached features or activations a fold costs what the final fit
costs, minus the feature pass (head: seconds; tune-top's two half-size folds:
about one more fit). The out-of-distribution detector needs no re-training: it
scores the pretrained backbone's features (see :mod:`florist.ood`), and the same
features give the run's suspect labels (see :mod:`florist.labels`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..calibration import apply_temperature, expected_calibration_error, fit_temperature
from ..data import Item, Prepared
from ..errors import SettingError
from ..features import extract_concat
from ..labels import LabelIssue, label_issues_of
from ..ood import SCORE_NAME, OodDetector, fit_detector
from ..progress import progress_bar
from ..sampling import fold_count
from .job import Remembered
from .registry import get_mode

if TYPE_CHECKING:
    from ..backbones import Backbone
    from .job import Fitted, Job  # noqa: F401 (annotations only)

#: Training photos a cross-fit fold's model learns from, past which fewer folds are used.
#: The folds stand in for the final model; once each learns from this many photos, head
#: mode's step budget binds and a fifth of the data more changes them little, while each
#: fold costs a full fit (5 folds were 19 s of a 78 s warm re-train at 100,000 photos).
FOLD_PHOTOS = 10_000


@dataclass
class HeldOut:
    """Probabilities of training photos from models that did not learn from them (a cross-fit), before calibration."""

    probs: np.ndarray  # [N, classes]
    labels: np.ndarray  # [N]
    paths: list[str]  # which photos, in row order
    folds: int  # of the cross-fit


@dataclass
class Trust:
    """What :func:`fit_trust` adds to a run: the temperature, the detector and their figures for metrics.json."""

    temperature: float
    detector: OodDetector | None
    metrics: dict[str, Any]
    label_issues: list[LabelIssue] = field(default_factory=list)  # of the run's photos, most suspect first


def fit_trust(job: Job, fitted: Fitted, reference: list[Backbone], held: HeldOut | None) -> Trust:
    """Calibrate ``fitted`` on ``held``, and fit the out-of-distribution detector on ``reference`` features.

    Args:
        job: the run's job.
        fitted: the final fit.
        reference: the backbones with their ImageNet weights, for the detector's features.
        held: the cross-fit's probabilities (:func:`held_out`); None: calibration is off.
    """
    temperature, metrics = calibrate(held, fitted) if held is not None else (1.0, {})
    t = time.perf_counter()
    used = fitted.train + fitted.eval
    features = reference_features(job, reference, used) if len(fitted.train) >= 2 else None
    detector = None
    if features is not None:
        train_x, eval_x = features[: len(fitted.train)], features[len(fitted.train) :]
        detector = fit_detector(train_x, np.array([it.label for it in fitted.train]), seed=job.cfg.seed)
        metrics["ood"] = {"score": SCORE_NAME, "threshold": detector.threshold}
        if len(eval_x) and detector.threshold is not None:
            metrics["ood"]["eval_accepted"] = float(np.mean(~detector.unknown(detector.score(eval_x))))
    job.timings["ood_s"] = time.perf_counter() - t
    t = time.perf_counter()
    issues = _label_issues(features, used, job.prepared.classes) if features is not None else []
    job.timings["label_issues_s"] = time.perf_counter() - t
    return Trust(temperature, detector, metrics, issues)


def held_out(job: Job) -> HeldOut | None:
    """The cross-fit's held-out probabilities, timed; None when calibration is off or impossible.

    Impossible: a class too small to be both trained on and held out.
    """
    folds = job.cfg.calibration_folds or 0
    counts = np.bincount([it.label for it in job.prepared.train], minlength=len(job.prepared.classes))
    if folds < 2 or counts.min() < 2:
        return None
    t = time.perf_counter()
    held = cross_fit(job, fold_count(folds, len(job.prepared.train), FOLD_PHOTOS))
    job.timings["calibration_s"] = job.timings.get("calibration_s", 0.0) + time.perf_counter() - t
    return held


def calibrate(held: HeldOut, fitted: Fitted) -> tuple[float, dict[str, Any]]:
    """The temperature fitted on ``held``, and its figures for metrics.json."""
    temperature = fit_temperature(held.probs, held.labels)
    eval_y = np.array([it.label for it in fitted.eval], dtype=np.int64)

    def ece(probs: np.ndarray, y: np.ndarray, t: float) -> float | None:
        return expected_calibration_error(apply_temperature(probs, t), y) if len(y) else None

    return temperature, {
        "calibration": {
            "method": "temperature",
            "folds": held.folds,
            "temperature": temperature,
            "heldout_ece_before": ece(held.probs, held.labels, 1.0),
            "heldout_ece_after": ece(held.probs, held.labels, temperature),
            "ece_before": ece(fitted.eval_probs, eval_y, 1.0),
            "ece_after": ece(fitted.eval_probs, eval_y, temperature),
        }
    }


def _label_issues(features: np.ndarray, items: list[Item], classes: list[str]) -> list[LabelIssue]:
    """Suspect labels among the run's photos, as ``florist audit --labels`` finds them (clean view only)."""
    try:
        return label_issues_of(features, np.array([it.label for it in items]), classes, [it.path for it in items])
    except SettingError:  # a class with fewer photos than folds: nothing to say
        return []


def _folds(items: list[Item], folds: int, seed: int) -> list[np.ndarray]:
    """Stratified fold index of every training item (fewer folds when a class is smaller)."""
    from sklearn.model_selection import StratifiedKFold

    y = np.array([it.label for it in items])
    k = max(2, min(folds, int(np.bincount(y)[np.unique(y)].min())))  # held_out checked every class has 2
    return [held for _, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(y, y)]


def cross_fit(job: Job, folds: int) -> HeldOut:
    """Held-out probabilities of the training photos: the mode's ``fit`` on each k-1 folds, predicting the k-th.

    Failed photos are left out of the result.
    """
    train = job.prepared.train
    nets = [b.model for b in job.backbones]
    fitted_state = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
    probs, held_items = [], []
    parts = _folds(train, folds, job.cfg.seed)
    with tempfile.TemporaryDirectory(prefix="florist-fold-") as scratch, progress_bar(
        "Calibrating (cross-fit)", enabled=job.verbose, unit="folds"
    ) as bar:
        for done, held in enumerate(parts):
            bar(done, len(parts))
            for net, state in zip(nets, job.initial_state):
                net.load_state_dict(state)
            inside = np.setdiff1d(np.arange(len(train)), held)
            sub = replace(
                job,
                prepared=Prepared(job.prepared.classes, [train[i] for i in inside], [train[i] for i in held]),
                out=Path(scratch),
                board=None,
                verbose=False,
                resume=False,
                timings={},
                curves=False,
            )
            result = get_mode(job.cfg.mode).fit(sub)
            probs.append(result.eval_probs)
            held_items.extend(result.eval)
        bar(len(parts), len(parts))
    for net, state in zip(nets, fitted_state):
        net.load_state_dict(state)
    labels = np.array([it.label for it in held_items], dtype=np.int64)
    return HeldOut(np.concatenate(probs), labels, [it.path for it in held_items], len(parts))


def reference_features(job: Job, reference: list[Backbone], items: list[Item]) -> np.ndarray:
    """The reference backbones' pooled features of the clean view (cached; failed images give zeros).

    Head mode's own backbones are the reference: their features were read already and are remembered.
    """
    known = job.remembered.get(Remembered.key(reference, "clean", job.cfg.seed), items)
    if known is not None:
        return known.astype(np.float32, copy=False)  # 0.5 GB at 100,000 photos: no copy
    result = extract_concat(
        reference, [it.path for it in items], ["clean"], shas=[it.sha256 for it in items],
        cache_root=job.cache_root, seed=job.cfg.seed,
    )["clean"]  # fmt: skip
    return result.features.astype(np.float32)
