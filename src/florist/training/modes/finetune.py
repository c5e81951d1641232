"""finetune mode: tune-top's model first, then the whole network (or its last blocks) on augmented photos.

The most accurate and the most expensive mode: every step runs the whole
network forward and backward on a new random view of each photo (see
:mod:`florist.training.network`). It starts from what tune-top trains in a few
minutes, checkpoints every epoch and resumes an interrupted run.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from ..registry import Mode, get_mode, one_backbone, register
from ..settings import COMMON, TrainConfig

if TYPE_CHECKING:
    from ...backbones import Backbone
    from ...data import Prepared
    from ..job import Fitted, Job


#: Default of ``disk_budget``: 10 GB of photos read from a URL, kept to be read again rather than fetched.
DISK_BUDGET_MB = 10_000


def fit(job: Job) -> Fitted:
    """Warm start on cached data (or resume a checkpoint), decode every photo once, then fine-tune."""
    import time
    from dataclasses import asdict, replace

    import numpy as np

    from ...bundle import build_head, linear_head_spec
    from ...data import Prepared
    from ...features import PIXELS, view_names
    from ...progress import progress_bar
    from ..blocks import split_backbone, tuned_state
    from ..job import Fitted
    from ..loop import Watch
    from ..network import FinetuneConfig, fit_finetune, load_checkpoint
    from ..pipeline import extract_splits, labels
    from .tune_top import tuning_settings

    cfg, (backbone,) = job.cfg, job.backbones  # one_backbone checked it
    prepared = job.prepared
    fingerprint = _fingerprint(cfg, prepared)
    checkpoint = load_checkpoint(job.out, fingerprint) if job.resume else None
    warm_cfg = warm_start_config(cfg, backbone)
    if checkpoint is None:
        warm = get_mode(warm_cfg.mode).fit(replace(job, cfg=warm_cfg, board=None))
        job.timings["warm_start_s"] = job.timings.pop("train_s")
        prepared = Prepared(prepared.classes, warm.train, warm.eval, prepared.skipped, prepared.warnings)
        head, warm_computed, warm_top1 = warm.head, warm.computed, warm.history["eval_top1"][-1]
    else:  # the checkpoint's weights replace the warm start's: skip it
        head = build_head(linear_head_spec(backbone.num_features, len(prepared.classes), cfg.dropout))
        warm_computed, warm_top1 = 0, checkpoint.get("notes", {}).get("warm_start_top1")
    t = time.perf_counter()
    pixel_args: dict[str, Any] = dict(part="pixels", dtype=np.uint8)
    square = "square" + PIXELS
    kept, pixels, computed = extract_splits(
        replace(job, prepared=prepared), {"train": [square], "eval": []}, **pixel_args
    )
    backbone.data_config = whole_image(backbone.data_config)  # from here on: eval, and the saved model
    prepared = Prepared(prepared.classes, kept["train"], prepared.eval, prepared.skipped, prepared.warnings)
    eval_views = [v + PIXELS for v in cfg.tta_views]
    kept, eval_pixels, eval_computed = extract_splits(
        replace(job, prepared=prepared), {"train": [], "eval": eval_views}, **pixel_args
    )
    pixels["eval"], computed = eval_pixels["eval"], computed + eval_computed
    job.timings["decode_s"] = time.perf_counter() - t
    train_y = labels(kept["train"])
    ft_cfg = FinetuneConfig(
        **tuning_settings(cfg, train_y, len(prepared.classes), backbone.bf16),
        layer_decay=cfg.layer_decay,
        keep=cfg.keep,
        patience=cfg.patience,
        trainable=split_backbone(backbone, cfg.blocks).top_prefixes if cfg.blocks else None,
        fingerprint=fingerprint,
    )
    t = time.perf_counter()
    with progress_bar("Fine-tuning", enabled=job.verbose, unit="steps") as bar:
        history, eval_probs, info = fit_finetune(
            backbone.model,
            head,
            backbone.data_config,
            pixels["train"][square],
            train_y,
            ft_cfg,
            device=job.device,
            eval_pixels=[pixels["eval"][v] for v in eval_views],
            watch=Watch(labels(kept["eval"]), job.board, bar),
            out=job.out,
            checkpoint=checkpoint,
            notes={"warm_start_top1": warm_top1},
        )
    job.timings["train_s"] = time.perf_counter() - t
    state = tuned_state(backbone.model, ft_cfg.trainable or [""])
    return Fitted(
        head, asdict(history), kept["train"], kept["eval"], eval_probs, warm_computed + computed,
        views=view_names(0),  # the clean view: finetune's random views are drawn at each step, not cached
        backbone_states=[state],
        extra_metrics={"finetune": {**info, "warm_start": warm_cfg.mode, "warm_start_top1": warm_top1}},
    )


def whole_image(data_config: dict[str, Any]) -> dict[str, Any]:
    """``data_config`` with a centre crop of the whole square (``crop_pct`` 1) instead of its middle.

    A fine-tuned network learnt from random crops of the whole square image, and
    it scores better when shown all of it: on the inner 960/240 split, three
    fine-tuned models got 2, 3 and 2 more photos right with ``crop_pct`` 1.0 than
    with the pretrained 0.875-0.89, while a tune-top model (frozen bottom) got one
    fewer. The preprocessing is saved with the model, so prediction, export and
    serving crop the same way.
    """
    return {**data_config, "crop_pct": 1.0}


def warm_start_config(cfg: TrainConfig, backbone: Backbone) -> TrainConfig:
    """Settings of finetune's starting point: tune-top's defaults where the backbone can be split.

    Fine-tuning then starts from a network that already scores as tune-top does
    (its last block and a head trained on cached activations, minutes on a CPU),
    so the expensive full-network steps refine a good model instead of first
    repairing a random head. Backbones tune-top cannot split start from a head
    trained on cached clean features. The run's own settings that every mode
    reads (seed, batch size, precision...) carry over; ``steps`` does not.
    """
    from ..blocks import can_split
    from ..registry import resolve

    shared = {name: getattr(cfg, name) for name in COMMON if name not in ("mode", "steps")}
    if can_split(backbone):
        return resolve(TrainConfig(**shared, mode="tune-top", warmup=cfg.warmup))
    return resolve(TrainConfig(**shared, mode="head", views=0))


def _fingerprint(cfg: TrainConfig, prepared: Prepared) -> str:
    """Settings + exact training/eval images: a checkpoint is resumed only for the same run.

    The disk budget is left out: it changes what is fetched twice, never the model.
    """
    splits = {"train": prepared.train, "eval": prepared.eval}
    settings = {k: v for k, v in cfg.to_dict().items() if k != "disk_budget"}
    payload = {"config": settings, "images": {k: [(it.sha256, it.label) for it in v] for k, v in splits.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


MODE = register(
    Mode(
        name="finetune",
        summary="train the whole backbone on augmented images, starting from tune-top's model "
        "(tens of minutes on a CPU, minutes on a GPU; resumes if interrupted).",
        defaults={
            "epochs": 12,
            "blocks": None,
            "lr": 1e-3,
            "backbone_lr": 1e-4,
            "layer_decay": 0.85,
            "warmup": 0.1,
            "keep": "last",
            "patience": None,
            "device": "auto",
            "disk_budget": DISK_BUDGET_MB,
            "label_smoothing": 0.1,
            "weight_decay": 0.05,
            "calibration_folds": 0,  # each fold would be a whole fine-tune; ask for it with --calibration-folds
        },
        fit=fit,
        order=2,
        instead={"views": "which draws a new random view of every photo at every step"},
        check=one_backbone,
    )
)
