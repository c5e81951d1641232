"""head mode: a linear classifier on the frozen backbone's cached pooled features.

The cheapest mode (about a minute cold on a 2-core CPU, seconds warm). Its
defaults follow the original TensorFlow retraining project (Adam, lr 0.005),
plus the mirror image of every training photo as a second cached view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import KEEPS_NO_PHOTOS, ByValue, Mode, register

if TYPE_CHECKING:
    from ..job import Fitted, Job

#: Head mode's step budget. 15 epochs fit a thousand photos in about a thousand steps; at
#: 100,000 photos they are 75,000 steps of a linear layer that has long converged, repeated by
#: each calibration fold. 10,000 steps leave every folder of up to about 10,000 photos as it
#: was; on 100,000 generated photos, held out by source photo, they scored 91.2% top-1 against
#: 15 full epochs' 91.4% (5,000 steps: 90.7%), with a lower log-loss, in 2.5 s instead of
#: 19 s a fit (bench/results/step_budget.json).
MAX_STEPS = 10_000


def fit(job: Job) -> Fitted:
    """Cache pooled features of every view, then train the linear head on them."""
    import time
    from dataclasses import asdict

    import numpy as np

    from ...features import view_names
    from ...predict import average_probabilities
    from ...progress import progress_bar
    from ..job import Fitted
    from ..linear import fit_head
    from ..loop import Watch
    from ..pipeline import extract_splits, labels

    cfg = job.cfg
    t = time.perf_counter()
    views = view_names(cfg.views)
    kept, feats, computed = extract_splits(job, {"train": views, "eval": cfg.tta_views})
    job.timings["features_s"] = time.perf_counter() - t
    eval_x = [feats["eval"][v] for v in cfg.tta_views]
    t = time.perf_counter()
    with progress_bar("Training head", enabled=job.verbose, unit="steps") as bar:
        watch = Watch(labels(kept["eval"]), job.board, bar)
        train_x = np.concatenate([feats["train"][v] for v in views])
        n = len(job.prepared.classes)
        head, history = fit_head(train_x, labels(kept["train"], len(views)), n, cfg, eval_x=job.curve_views(eval_x), watch=watch)
    job.timings["train_s"] = time.perf_counter() - t
    eval_probs = average_probabilities(head, eval_x)
    return Fitted(head, asdict(history), kept["train"], kept["eval"], eval_probs, computed, views)


MODE = register(
    Mode(
        name="head",
        summary="a linear classifier on frozen features (about a minute on a CPU).",
        defaults={
            "epochs": 15,
            "max_steps": MAX_STEPS,
            "views": 1,
            "optimizer": "adam",
            "lr": ByValue("optimizer", {"adam": 0.005, "sgd": 0.01}),
            "decay_rate": ByValue("optimizer", {"adam": 1.0, "sgd": 0.9}),
            "decay_steps": 100,
            "label_smoothing": 0.0,
            "weight_decay": 0.0,
            "calibration_folds": 5,
        },
        fit=fit,
        order=0,
        instead={"disk_budget": KEEPS_NO_PHOTOS},
    )
)
