"""Training an ensemble: the mode's own recipe once per backbone, combined into one model.

``florist train --backbone efficientnet_lite0,efficientnet_lite1,efficientnet_lite2``
in tune-top mode gives each network its own job: its activations, its top blocks and
head, its cross-fit and so its own temperature. The members are then combined as
:mod:`florist.ensemble` describes: their calibrated probabilities averaged, here with
equal weights. The run's temperature is fitted afterwards on the average of the
members' held-out probabilities, so the ensemble is calibrated as a whole, the same
way a single network is.

Members are independent: each one's fit sees only its own backbone, and its
TensorBoard curves go to ``tb/<backbone>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..calibration import apply_temperature
from ..ensemble import EnsembleHead
from ..runfiles import TENSORBOARD
from .job import Fitted, Job
from .loop import top1
from .trust import HeldOut, calibrate, held_out

if TYPE_CHECKING:
    from ..data import Item
    from .loop import Board

#: What each backbone's member contributes to the average (equal weights: see the module docstring).
COMBINE = "average"


@dataclass
class Member:
    """One backbone's part of an ensemble: its fit, its cross-fit and its temperature."""

    name: str
    fitted: Fitted
    held: HeldOut | None
    temperature: float
    timings: dict[str, float]
    calibration: dict[str, Any]  # its figures, as a single network's run has them in metrics.json


def fit_ensemble(job: Job, fit: Callable[[Job], Fitted]) -> tuple[Fitted, HeldOut | None]:
    """``fit`` once per backbone of ``job``, and the ensemble of the results.

    Returns:
        The ensemble's fit (its head an :class:`~florist.ensemble.EnsembleHead`, its eval
        probabilities the members' combination before the run's temperature) and the
        held-out probabilities of the combination, from which the run's temperature is fitted.
    """
    members = fit_members(job, fit)
    return combined(members), combined_held(members)


def fit_members(job: Job, fit: Callable[[Job], Fitted]) -> list[Member]:
    """Each backbone's member: ``fit`` on a job of its own, its cross-fit and its temperature.

    The members' times are summed into ``job.timings``.
    """
    members = []
    for index, backbone in enumerate(job.backbones):
        name = backbone.spec.name
        with _member_board(job, name) as board:
            sub = replace(
                job, backbones=[backbone], board=board, timings={}, initial_state=job.initial_state[index : index + 1]
            )
            fitted = fit(sub)
            held = held_out(sub)
        temperature, calibration = calibrate(held, fitted) if held is not None else (1.0, {})
        members.append(Member(name, fitted, held, temperature, sub.timings, calibration))
    for key in ("features_s", "train_s", "calibration_s"):
        if any(key in m.timings for m in members):
            job.timings[key] = sum(m.timings.get(key, 0.0) for m in members)
    return members


@contextmanager
def _member_board(job: Job, name: str) -> Iterator[Board | None]:
    """The member's own TensorBoard log under ``tb/<backbone>`` (none where the run has none)."""
    if job.board is None:
        yield None
        return
    from ..report import Board as TensorBoard

    with TensorBoard(job.out / TENSORBOARD / name, job.prepared.classes) as board:
        yield board


def equal_weights(members: Sequence[Member]) -> list[float]:
    return [1.0 / len(members)] * len(members)


def combined(members: Sequence[Member], weights: Sequence[float] | None = None) -> Fitted:
    """The members as one :class:`~florist.training.job.Fitted`, on the photos every member kept.

    ``weights``: of each member in the average (default: equal).
    """
    first = members[0].fitted
    train = _kept_by_all(first.train, [m.fitted.train for m in members])
    eval_items = _kept_by_all(first.eval, [m.fitted.eval for m in members])
    weights = list(weights) if weights is not None else equal_weights(members)
    eval_probs = _average(
        [_member_eval(m, apply_temperature(m.fitted.eval_probs, m.temperature), eval_items) for m in members],
        weights,
    )
    eval_y = np.array([it.label for it in eval_items], dtype=np.int64)
    head = EnsembleHead([m.fitted.head for m in members], [m.temperature for m in members], weights)
    return Fitted(
        head=head,
        history={},  # each member has its curves: metrics.json's "ensemble" entry
        train=train,
        eval=eval_items,
        eval_probs=eval_probs,
        computed=sum(m.fitted.computed for m in members),
        views=first.views,
        backbone_states=[m.fitted.backbone_states[0] if m.fitted.backbone_states else {} for m in members],
        extra_metrics={"ensemble": _report(members, weights, eval_y, eval_items)},
    )


def _report(members: Sequence[Member], weights: Sequence[float], eval_y: np.ndarray, eval_items: list[Item]) -> dict:
    """metrics.json's ``ensemble`` entry: how the members were combined and what each scored alone."""
    rows = []
    for m, weight in zip(members, weights):
        probs = _member_eval(m, m.fitted.eval_probs, eval_items)
        rows.append(
            {
                "backbone": m.name,
                "weight": weight,
                "temperature": m.temperature,
                "top1": top1(probs, eval_y) if len(eval_y) else None,
                "train_top1": m.fitted.history.get("train_top1", [None])[-1],
                "timings": m.timings,
                "history": m.fitted.history,
                **m.calibration,
                **m.fitted.extra_metrics,
            }
        )
    return {"combine": COMBINE, "members": rows}


def _member_eval(member: Member, probs: np.ndarray, eval_items: Sequence[Item]) -> np.ndarray:
    """A member's eval probabilities on the ensemble's eval photos."""
    return _rows(_paths(member.fitted.eval), probs, _paths(eval_items))


def combined_held(members: Sequence[Member], weights: Sequence[float] | None = None) -> HeldOut | None:
    """The members' held-out probabilities, each calibrated, averaged on the photos all of them held out."""
    helds = [m.held for m in members if m.held is not None]
    if len(helds) < len(members):
        return None
    paths = _shared(helds[0].paths, [h.paths for h in helds])
    parts = [apply_temperature(_rows(h.paths, h.probs, paths), m.temperature) for m, h in zip(members, helds)]
    labels = _rows(helds[0].paths, helds[0].labels, paths)
    weights = list(weights) if weights is not None else equal_weights(members)
    return HeldOut(_average(parts, weights), labels, paths, helds[0].folds)


def _shared(order: Sequence[str], lists: Sequence[Sequence[str]]) -> list[str]:
    """Paths of ``order`` present in every one of ``lists``, in ``order``'s order."""
    kept = set.intersection(*(set(paths) for paths in lists))
    return [p for p in order if p in kept]


def _kept_by_all(order: list[Item], lists: Sequence[list[Item]]) -> list[Item]:
    """Items of ``order`` every member kept (a photo one member failed to read is dropped)."""
    kept = set(_shared(_paths(order), [_paths(items) for items in lists]))
    return [it for it in order if it.path in kept]


def _rows(paths: Sequence[str], values: np.ndarray, wanted: Sequence[str]) -> np.ndarray:
    """The rows of ``values`` (one per path of ``paths``) of the ``wanted`` paths, in that order."""
    row = {p: i for i, p in enumerate(paths)}
    return values[np.array([row[p] for p in wanted], dtype=np.int64)]


def _paths(items: Sequence[Item]) -> list[str]:
    return [it.path for it in items]


def _average(parts: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    total: Any = sum(w * p.astype(np.float64) for w, p in zip(weights, parts))
    return np.asarray(total, dtype=np.float32)
