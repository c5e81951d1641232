"""Stage 4, *train*: cached features -> a new classifier head, saved as a model bundle.

:func:`train` is the whole pipeline in one call (prepare, features, head,
metrics, bundle); :func:`fit_head` is the optimisation on feature arrays alone,
useful on its own for experiments.

Defaults follow the original TensorFlow retraining project: Adam, learning rate
0.005, batch 32. ``optimizer="sgd"`` gives plain SGD with exponential learning
rate decay, ``lr * decay_rate ** (step / decay_steps)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from . import remote
from .backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from .bundle import (
    BACKBONE_PREFIX,
    MODEL_JSON,
    Bundle,
    build_head,
    is_complete,
    linear_head_spec,
    save_bundle,
)
from .data import DEFAULT_MAX_PIXELS, Item, Prepared, Skipped, check_memo_file, prepare, write_manifests
from .distributed import pick_device
from .errors import FloristError
from .evaluate import compute_metrics
from .features import (
    PIXELS,
    FeatureResult,
    default_cache_dir,
    extract_concat,
    merged_errors,
    view_names,
)
from .files import atomic_write_json, folder_lock, remove_stale_temporaries
from .finetune import CHECKPOINT, FinetuneConfig, fit_finetune, load_checkpoint
from .loop import Board, History, average_probabilities, run_steps
from .predict import Classifier
from .progress import ProgressFn, progress_bar
from .runinfo import run_info
from .tfrecord import is_record_data, prepare_records
from .tune import (
    TopConfig,
    bf16_is_fast,
    can_split,
    evaluate_top,
    fit_top,
    split_backbone,
    state_id,
    tuned_state,
)

log = logging.getLogger("florist")

#: Mode used when none is given.
DEFAULT_MODE = "tune-top"
#: Per-mode defaults for settings left as None, chosen on an inner validation split
#: of the flower photos' training part (never on the eval split).
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "head": {"epochs": 15, "views": 1, "label_smoothing": 0.0, "weight_decay": 0.0, "lr": None, "blocks": None,
             "backbone_lr": None},
    "tune-top": {"epochs": 6, "views": 7, "label_smoothing": 0.1, "weight_decay": 0.01, "lr": None, "blocks": 1,
                 "backbone_lr": 1e-3},
    # views: finetune augments on the fly; its tune-top warm start uses tune-top's own defaults.
    "finetune": {"epochs": 12, "views": 0, "label_smoothing": 0.1, "weight_decay": 0.05, "lr": 1e-3,
                 "blocks": None, "backbone_lr": 1e-4},
}
MODES = tuple(MODE_DEFAULTS)


@dataclass
class TrainConfig:
    """Every setting of a training run; saved in ``model.json`` so a run can be repeated.

    Attributes:
        mode: ``"head"`` (linear classifier on frozen features), ``"tune-top"``
            (also train the last ``blocks`` backbone blocks on cached activations) or
            ``"finetune"`` (train the whole backbone, or its last ``blocks``, on
            augmented images, starting from tune-top's result).
        blocks: tune-top and finetune: how many of the backbone's last blocks to train
            (default: tune-top 1, finetune all).
        backbone_lr: tune-top and finetune: peak learning rate of the top backbone block
            (default: tune-top 1e-3, finetune 1e-4).
        layer_decay: finetune: each block's learning rate is this times the next one's.
        warmup: tune-top and finetune: fraction of steps with a linear learning-rate
            warm-up before the cosine decay.
        keep: finetune: keep the ``"last"`` epoch's weights or the ``"best"`` by eval top-1.
        patience: finetune: stop after this many epochs without a better eval top-1.
        device: finetune: ``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        precision: ``"bf16"`` autocast for feature extraction and tune-top/finetune training,
            ``"fp32"``, or ``"auto"`` (bf16 where the CPU has native bfloat16 support).
            Stored with the model, so prediction computes features the same way.
        backbone: bundled name (``efficientnet_lite0/1/2``), a timm model name or ``timm:NAME``;
            head mode also takes several, comma-separated, whose features are concatenated.
        weights: local checkpoint for the backbone instead of its default weights.
        eval_fraction: share of each class held out for evaluation (ignored with ``train_per_class``).
        train_per_class: take exactly this many training images per class, the rest is eval.
        epochs: passes over the training set (default per mode: head 15, tune-top 6, finetune 12).
        steps: total optimisation steps (batches); overrides ``epochs``.
        optimizer: ``"adam"`` (default) or ``"sgd"``.
        lr: learning rate of the head (default 0.005 for Adam, 0.01 for SGD; finetune 1e-3).
        decay_rate: multiply the learning rate by this every ``decay_steps`` steps
            (default 1.0 = constant for Adam, 0.9 for SGD); applied smoothly per step.
        decay_steps: see ``decay_rate``.
        batch_size: examples per step.
        dropout: dropout on the features before the linear layer.
        label_smoothing: cross-entropy label smoothing (default per mode: head 0, others 0.1).
        class_weights: ``"balanced"`` weights the loss by ``n / (classes * n_class)``.
        weight_decay: L2 penalty, decoupled for Adam as in AdamW (default per mode: head 0,
            tune-top 0.01, finetune 0.05).
        views: cached views per training image beyond the clean one: 1 adds its
            mirror image, K > 1 adds K - 1 random augmentations too (crop, flip, colour).
            Default per mode: head 1, tune-top 7 (finetune augments on the fly instead).
        tta: average the predictions of each image and its mirror at evaluation and prediction.
        seed: same seed + same data = same split and same weights.
    """

    mode: str | None = None
    blocks: int | None = None
    backbone_lr: float | None = None
    layer_decay: float = 0.85
    warmup: float = 0.1
    keep: str = "last"
    patience: int | None = None
    device: str = "auto"
    precision: str = "auto"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    eval_fraction: float | None = 0.2
    train_per_class: int | None = None
    epochs: int | None = None
    steps: int | None = None
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = None
    decay_rate: float | None = None
    decay_steps: int = 100
    batch_size: int = 32
    dropout: float = 0.0
    label_smoothing: float | None = None
    class_weights: Literal["balanced"] | None = None
    weight_decay: float | None = None
    views: int | None = None
    tta: bool = True
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> "TrainConfig":
        """Check every value, raising :class:`FloristError` naming the bad one."""
        checks = [
            (self.optimizer in ("adam", "sgd"), f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (
                self.label_smoothing is None or 0.0 <= self.label_smoothing < 1.0,
                f"label smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (self.mode is None or self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"),
            (self.blocks is None or self.blocks >= 1, f"blocks must be >= 1, got {self.blocks}"),
            (self.backbone_lr is None or self.backbone_lr > 0, f"backbone lr must be > 0, got {self.backbone_lr}"),
            (0 < self.layer_decay <= 1, f"layer decay must be in (0, 1], got {self.layer_decay}"),
            (self.keep in ("last", "best"), f"keep must be 'last' or 'best', got {self.keep!r}"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (0.0 <= self.warmup < 1.0, f"warmup must be in [0, 1), got {self.warmup}"),
            (self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (self.decay_rate is None or 0 < self.decay_rate <= 1, f"decay rate must be in (0, 1], got {self.decay_rate}"),
            (self.decay_steps >= 1, f"decay steps must be >= 1, got {self.decay_steps}"),
            (self.class_weights in (None, "balanced"), f"class weights must be 'balanced' or none, got {self.class_weights!r}"),
            (
                self.weight_decay is None or self.weight_decay >= 0,
                f"weight decay must be >= 0, got {self.weight_decay}",
            ),
            (self.views is None or self.views >= 0, f"views must be >= 0, got {self.views}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FloristError(message)
        return self

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return self._default("lr") or (0.005 if self.optimizer == "adam" else 0.01)

    @property
    def use_bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and bf16_is_fast())

    @property
    def resolved_mode(self) -> str:
        return self.mode or DEFAULT_MODE

    def _default(self, name: str) -> Any:
        value = getattr(self, name)
        return MODE_DEFAULTS[self.resolved_mode][name] if value is None else value

    @property
    def resolved_epochs(self) -> int:
        return self._default("epochs")

    @property
    def resolved_blocks(self) -> int | None:
        return self._default("blocks")

    @property
    def resolved_backbone_lr(self) -> float:
        return self._default("backbone_lr")

    @property
    def resolved_views(self) -> int:
        return self._default("views")

    @property
    def resolved_label_smoothing(self) -> float:
        return self._default("label_smoothing")

    @property
    def resolved_weight_decay(self) -> float:
        return self._default("weight_decay")

    @property
    def tta_views(self) -> list[str]:
        return ["clean", "flip"] if self.tta else ["clean"]

    @property
    def resolved_decay_rate(self) -> float:
        if self.decay_rate is not None:
            return self.decay_rate
        return 1.0 if self.optimizer == "adam" else 0.9


def class_weight_vector(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights: ``n / (num_classes * count_c)`` (0 for absent classes)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _make_optimizer(head: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            head.parameters(), lr=cfg.resolved_lr, weight_decay=cfg.resolved_weight_decay
        )
    else:
        opt = torch.optim.SGD(head.parameters(), lr=cfg.resolved_lr, weight_decay=cfg.resolved_weight_decay)
    rate, every = cfg.resolved_decay_rate, cfg.decay_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: rate ** (step / every))
    return opt, schedule


def fit_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    num_classes: int,
    cfg: TrainConfig,
    *,
    eval_x: Sequence[np.ndarray] = (),
    eval_y: np.ndarray | None = None,
    board: Board | None = None,
    progress: ProgressFn | None = None,
) -> tuple[nn.Module, History]:
    """Train a linear head on feature arrays; deterministic for a given ``cfg.seed``.

    Args:
        train_x, train_y: ``[N, D]`` features and ``[N]`` integer labels.
        num_classes: output size.
        cfg: hyperparameters; those left unset take head-mode defaults, whatever ``cfg.mode``.
        eval_x, eval_y: optional held-out features, one array per test-time view (their
            probabilities are averaged); only measured, never used to choose anything.
        board: optional live log of the curves and confusion matrices (TensorBoard).
        progress: optional ``progress(done, total, **stats)`` over steps (see :func:`~florist.loop.run_steps`).
    """
    cfg = replace(cfg, mode="head").validate()  # unset settings take head-mode defaults
    torch.manual_seed(cfg.seed)
    x = torch.as_tensor(train_x, dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.long)
    head = build_head(linear_head_spec(x.shape[1], num_classes, cfg.dropout))
    weight = class_weight_vector(train_y, num_classes) if cfg.class_weights == "balanced" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.resolved_label_smoothing)
    opt, schedule = _make_optimizer(head, cfg)
    total = cfg.steps or math.ceil(len(y) / cfg.batch_size) * cfg.resolved_epochs

    def evaluate() -> np.ndarray:
        head.eval()
        return average_probabilities(head, eval_x)

    history = run_steps(
        lambda batch: head(x[batch]),
        y,
        total_steps=total,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        loss_fn=loss_fn,
        optimizer=opt,
        schedule=schedule,
        train_mode=head.train,
        evaluate=evaluate,
        eval_labels=eval_y,
        board=board,
        progress=progress,
    )
    head.eval()
    return head, history


# ---------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------


def _create_backbones(cfg: TrainConfig) -> list[Backbone]:
    """One backbone per comma-separated name in ``cfg.backbone``, in that order."""
    names = [n.strip() for n in cfg.backbone.split(",") if n.strip()]
    if not names:
        raise FloristError("no backbone given")
    if len(names) > 1 and cfg.weights:
        raise FloristError("--weights applies to a single backbone, not to a list")
    if len(names) > 1 and cfg.resolved_mode != "head":
        raise FloristError(f"--mode {cfg.resolved_mode} tunes one backbone; several are for --mode head")
    if len(set(names)) != len(names):
        raise FloristError(f"backbone listed twice: {cfg.backbone}")
    backbones = [create_backbone(name, cfg.weights) for name in names]
    for b in backbones:
        b.bf16 = cfg.use_bf16
    return backbones


@contextmanager
def _claim_out_dir(out_dir: Path, overwrite: bool) -> Iterator[None]:
    """Lock the run folder for this process; refuse to clobber a finished run unless asked.

    Inside the lock, temporary files of a killed earlier run are removed and a
    finished run being overwritten is un-marked first.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FloristError(f"output path exists and is not a folder: {out_dir}")
    if is_complete(out_dir) and not overwrite:
        raise FloristError(f"{out_dir} already holds a trained model; use --overwrite or another --out")
    with folder_lock(out_dir):
        if is_complete(out_dir):
            if not overwrite:  # finished by another process since the check above
                raise FloristError(f"{out_dir} already holds a trained model; use --overwrite or another --out")
            (out_dir / MODEL_JSON).unlink()
        remove_stale_temporaries(out_dir)
        yield


def _drop_failed(
    items: list[Item], views: dict[str, FeatureResult]
) -> tuple[list[Item], dict[str, np.ndarray], list[Skipped]]:
    """Remove images that failed in any view (e.g. a file changed since prepare)."""
    errors = merged_errors(views.values())
    keep = [i for i in range(len(items)) if i not in errors]
    skipped = [Skipped(items[i].path, reason) for i, reason in sorted(errors.items())]
    return [items[i] for i in keep], {v: r.features[keep] for v, r in views.items()}, skipped


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = True,
    verbose: bool = False,
    **overrides: Any,
) -> Classifier:
    """Prepare ``data_dir``, train a classifier and save it as a bundle in ``out_dir``.

    Args:
        data_dir: ``<folder>/<class>/<images>``, or TFRecord data: a file or a folder of
            ``*.tfrecord`` files with ``labels.txt`` (see :func:`florist.tfrecord.prepare_records`).
            ``data_dir`` and ``out_dir`` may be URLs (``gs://``, ``s3://``...: see :mod:`florist.remote`).
        out_dir: run folder; receives labels.txt, train/eval/skipped.csv, model.safetensors,
            model.json (written last), metrics.json, run.json (how to reproduce it) and
            TensorBoard logs under ``tb/``.
        config: hyperparameters; keyword ``overrides`` replace single fields
            (``florist.train("photos", "run", epochs=30)``).
        cache_dir: feature cache root (default ``$FLORIST_CACHE`` or the user cache folder); a local
            folder, which also holds local copies of remote data.
        overwrite: replace a finished run in ``out_dir``.
        resume: finetune: continue from ``out_dir``'s checkpoint of an interrupted run with the
            same settings and data.
        verbose: show progress bars and a summary in the log.

    Returns:
        The trained :class:`~florist.predict.Classifier`; ``metrics.json`` holds its evaluation.

    Raises:
        FloristError: for bad data, settings or an existing finished run.
    """
    cfg = TrainConfig(**{**asdict(config or TrainConfig()), **overrides}).validate()
    device = pick_device(cfg.device)
    cache_root = remote.require_local(cache_dir, "the feature cache (--cache-dir)") if cache_dir else default_cache_dir()
    if cfg.weights and remote.is_remote(cfg.weights):
        raise FloristError(f"--weights must be a local file, got {cfg.weights}")
    joined = dist.init(device)
    try:
        started = time.perf_counter()
        backbones = _create_backbones(cfg)  # fail fast on a bad name, before touching out_dir
        # Remote data is fetched once per machine; a remote run folder is written locally and uploaded
        # (checkpoint.pt as it changes); model.json is fetched to refuse overwriting a finished run.
        with (
            remote.local_input(data_dir, siblings=["labels.txt"], root=cache_root) as data,
            remote.local_output(out_dir, fetch=[MODEL_JSON, CHECKPOINT], root=cache_root) as out,
        ):
            with _claim_out_dir(out.path, overwrite) if dist.is_main() else nullcontext():
                dist.barrier()
                model = _train(data.path, out.path, backbones, cfg, device, cache_root, resume, verbose, started)
            if dist.is_main():
                remote.relocate(out.path, data)
            return model
    finally:
        if joined:
            dist.shutdown()


@dataclass
class _Run:
    """What every training mode needs besides the data and the settings."""

    out: Path
    cache_root: Path
    device: torch.device
    board: Board | None  # TensorBoard log, or None in processes other than rank 0
    verbose: bool
    resume: bool
    timings: dict[str, float]


def _train(
    data_dir: str | Path, out: Path, backbones: list[Backbone], cfg: TrainConfig, device: torch.device,
    cache_dir: str | Path | None, resume: bool, verbose: bool, started: float,
) -> Classifier:
    backbone = backbones[0]
    verbose = verbose and dist.is_main()
    timings: dict[str, float] = {}

    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    t = time.perf_counter()
    split = dict(eval_fraction=cfg.eval_fraction, train_per_class=cfg.train_per_class, seed=cfg.seed)
    with progress_bar("Checking images", enabled=verbose) as bar:
        if is_record_data(data_dir):
            prepared = prepare_records(data_dir, **split, max_pixels=cfg.max_pixels, progress=bar)
        else:
            memo = check_memo_file(cache_root, data_dir) if dist.is_main() else None  # one writer
            prepared = prepare(data_dir, **split, max_pixels=cfg.max_pixels, progress=bar, check_memo=memo)
    timings["prepare_s"] = time.perf_counter() - t
    for message in prepared.warnings if dist.is_main() else ():
        log.warning(message)

    from .report import Board as TensorBoard

    with TensorBoard(out / "tb", prepared.classes) if dist.is_main() else nullcontext() as board:
        run = _Run(out, cache_root, device, board, verbose, resume, timings)
        fitted = FIT[cfg.resolved_mode](backbones, prepared, cfg, run)
    if not dist.is_main():
        dist.barrier()  # rank 0 writes the run folder
        return _classifier(backbones, fitted, prepared.classes, cfg)
    prepared = Prepared(prepared.classes, fitted.train, fitted.eval, prepared.skipped, prepared.warnings)
    write_manifests(out, prepared)
    if prepared.skipped:
        log.warning("%d file(s) skipped, listed in %s", len(prepared.skipped), out / "skipped.csv")

    model = _classifier(backbones, fitted, prepared.classes, cfg)
    metrics: dict[str, Any] = {
        "mode": cfg.resolved_mode,
        "n_train": len(fitted.train),
        "n_eval": len(fitted.eval),
        "views": view_names(cfg.resolved_views),
    }
    eval_y = np.array([it.label for it in fitted.eval], dtype=np.int64)
    if len(eval_y):
        metrics.update(compute_metrics(eval_y, fitted.eval_probs, prepared.classes))
    metrics["train_top1"] = fitted.history["train_top1"][-1]
    metrics["features_computed"] = fitted.computed
    metrics["n_skipped"] = len(prepared.skipped)
    metrics.update(fitted.extra_metrics)
    timings["total_s"] = time.perf_counter() - started
    metrics["timings"] = timings
    metrics["history"] = fitted.history
    atomic_write_json(out / "metrics.json", metrics)
    used = fitted.train + fitted.eval
    atomic_write_json(out / "run.json", run_info(data_dir, prepared.classes, used, asdict(cfg)))

    state = {**fitted.head.state_dict(), **{BACKBONE_PREFIX + k: v for k, v in fitted.backbone_state.items()}}
    bundle = Bundle(
        classes=prepared.classes,
        backbones=[b.spec for b in backbones],
        data_configs=[b.data_config for b in backbones],
        head=linear_head_spec(sum(b.num_features for b in backbones), len(prepared.classes), cfg.dropout),
        state=state,
        extra={
            "tta_views": cfg.tta_views,
            "tuned_id": backbone.tuned_id,
            "bf16": backbone.bf16,
            "train_config": asdict(cfg),
            "florist_version": _version(),
        },
    )
    save_bundle(out, bundle)  # model.json last: the run is complete from here on
    (out / CHECKPOINT).unlink(missing_ok=True)  # nothing left to resume
    dist.barrier()
    model.bundle = bundle
    from .report import finish_run

    finish_run(out, fitted.eval_probs)  # eval_predictions.csv, TensorBoard images + hparams, report.html
    if verbose:
        top1 = metrics.get("top1")
        log.info(
            "%s: trained on %d images (%d classes) in %.1fs; eval top-1 %s",
            cfg.resolved_mode,
            len(fitted.train),
            len(prepared.classes),
            timings["total_s"],
            f"{top1:.2%} on {len(eval_y)} images" if top1 is not None else "n/a (no eval split)",
        )
    return model


def _classifier(backbones: list[Backbone], fitted: "_Fitted", classes: list[str], cfg: TrainConfig) -> Classifier:
    """The trained model as a :class:`Classifier` (marking a tuned backbone for the feature cache)."""
    if fitted.backbone_state:
        backbones[0].tuned_id = state_id(fitted.backbone_state)
    return Classifier(backbones, fitted.head, classes, tta_views=cfg.tta_views)


@dataclass
class _Fitted:
    """What a training mode hands back to :func:`train`."""

    head: nn.Module
    history: dict[str, list[float]]
    train: list[Item]  # images actually used (failed ones removed)
    eval: list[Item]
    eval_probs: np.ndarray  # TTA-averaged probabilities on ``eval``
    computed: int  # images that went through the network (cache misses)
    backbone_state: dict[str, torch.Tensor] = field(default_factory=dict)  # tuned backbone tensors
    extra_metrics: dict[str, Any] = field(default_factory=dict)  # mode-specific entries of metrics.json


def _extract_splits(
    backbones: list[Backbone],
    prepared: Prepared,
    run: _Run,
    views: dict[str, list[str]],
    *,
    seed: int,
    part: str = "pooled",
    **kwargs: Any,
) -> tuple[dict[str, list[Item]], dict[str, dict[str, np.ndarray]], int]:
    """Cached outputs of ``views[split]`` for the train and eval splits; failed images are dropped.

    Under torchrun each process first computes its share of the images into the
    (shared) cache; then every process reads the whole set from it.
    """
    kept: dict[str, list[Item]] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    computed = 0
    what = {"pooled": "Features", "pixels": "Decoding"}.get(part, "Activations")
    for split_name, items in (("train", prepared.train), ("eval", prepared.eval)):
        if not views[split_name]:  # nothing asked of this split: keep its items as they are
            kept[split_name], outputs[split_name] = items, {}
            continue
        common = {"cache_root": run.cache_root, "seed": seed, "part": part, **kwargs}
        if dist.world_size() > 1:
            share = [items[i] for i in dist.my_share(len(items))]
            mine = _extract_items(backbones, share, views[split_name], f"{what} ({split_name}", run.verbose, **common)
            computed += dist.sum_over_processes(sum(r.computed for r in mine.values()))  # includes a barrier
        results = _extract_items(
            backbones, items, views[split_name], f"{what} ({split_name}", run.verbose and dist.world_size() == 1, **common
        )
        computed += sum(r.computed for r in results.values())  # 0 after the shared pass, unless a file changed
        kept[split_name], outputs[split_name], failed = _drop_failed(items, results)
        prepared.skipped.extend(failed)
    return kept, outputs, computed


def _extract_items(
    backbones: list[Backbone], items: list[Item], views: list[str], title: str, verbose: bool, **kwargs: Any
) -> dict[str, FeatureResult]:
    """:func:`~florist.features.extract_concat` on manifest items, with a progress bar per view."""
    return extract_concat(
        backbones,
        [it.path for it in items],
        views,
        shas=[it.sha256 for it in items],
        progress_for=lambda view: progress_bar(f"{title}, {view})", enabled=verbose and bool(items)),
        **kwargs,
    )


def _labels(items: list[Item], repeat: int = 1) -> np.ndarray:
    return np.tile(np.array([it.label for it in items], dtype=np.int64), repeat)


def _fit_head_mode(backbones: list[Backbone], prepared: Prepared, cfg: TrainConfig, run: _Run) -> _Fitted:
    """Head mode: a linear classifier on cached pooled features of every view."""
    t = time.perf_counter()
    views = view_names(cfg.resolved_views)
    kept, feats, computed = _extract_splits(
        backbones, prepared, run, {"train": views, "eval": cfg.tta_views}, seed=cfg.seed
    )
    run.timings["features_s"] = time.perf_counter() - t
    eval_x = [feats["eval"][v] for v in cfg.tta_views]
    t = time.perf_counter()
    with progress_bar("Training head", enabled=run.verbose, unit="steps") as bar:
        head, history = fit_head(
            np.concatenate([feats["train"][v] for v in views]),
            _labels(kept["train"], len(views)),
            len(prepared.classes),
            cfg,
            eval_x=eval_x,
            eval_y=_labels(kept["eval"]),
            board=run.board,
            progress=bar,
        )
    run.timings["train_s"] = time.perf_counter() - t
    eval_probs = average_probabilities(head, eval_x)
    return _Fitted(head, asdict(history), kept["train"], kept["eval"], eval_probs, computed)


def _fit_tune_top(backbones: list[Backbone], prepared: Prepared, cfg: TrainConfig, run: _Run) -> _Fitted:
    """tune-top mode: train the last blocks and a new head on cached activations."""
    (backbone,) = backbones  # _create_backbones allows one backbone in this mode
    blocks = cfg.resolved_blocks
    split = split_backbone(backbone, blocks)
    t = time.perf_counter()
    views = view_names(cfg.resolved_views)
    kept, acts, computed = _extract_splits(
        backbones,
        prepared,
        run,
        {"train": views, "eval": cfg.tta_views},
        seed=cfg.seed,
        part=f"blocks-{blocks}",
        network=split.bottom,
        out_shape=split.activation_shape,
        dtype=np.float16,
    )
    run.timings["features_s"] = time.perf_counter() - t
    train_y = _labels(kept["train"], len(views))
    torch.manual_seed(cfg.seed)
    head = build_head(linear_head_spec(backbone.num_features, len(prepared.classes), cfg.dropout))
    top_cfg = TopConfig(**_tuning_settings(cfg, train_y, len(prepared.classes)))
    eval_acts = [acts["eval"][v] for v in cfg.tta_views]
    t = time.perf_counter()
    with progress_bar("Tuning top blocks", enabled=run.verbose, unit="steps") as bar:
        history = fit_top(
            split,
            head,
            np.concatenate([acts["train"][v] for v in views]),
            train_y,
            top_cfg,
            eval_acts=eval_acts,
            eval_y=_labels(kept["eval"]),
            board=run.board,
            progress=bar,
        )
    run.timings["train_s"] = time.perf_counter() - t
    eval_probs = evaluate_top(split.top, head, eval_acts)
    state = tuned_state(backbone.model, split.top_prefixes)
    return _Fitted(head, asdict(history), kept["train"], kept["eval"], eval_probs, computed, state)


def _tuning_settings(cfg: TrainConfig, train_y: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The :class:`~florist.tune.TopConfig` fields, shared by tune-top and finetune."""
    return dict(
        epochs=cfg.resolved_epochs,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr_head=cfg.resolved_lr,
        lr_top=cfg.resolved_backbone_lr,
        weight_decay=cfg.resolved_weight_decay,
        label_smoothing=cfg.resolved_label_smoothing,
        warmup=cfg.warmup,
        seed=cfg.seed,
        class_weights=class_weight_vector(train_y, num_classes) if cfg.class_weights else None,
        bf16=cfg.use_bf16,
    )


def _fit_finetune(backbones: list[Backbone], prepared: Prepared, cfg: TrainConfig, run: _Run) -> _Fitted:
    """finetune mode: tune-top (or a head) on cached data first, then the whole network on augmented images."""
    (backbone,) = backbones
    fingerprint = _fingerprint(cfg, prepared)
    checkpoint = load_checkpoint(run.out, fingerprint) if run.resume else None
    warm_cfg = _warm_start_config(cfg, backbone)
    if checkpoint is None:
        warm = FIT[warm_cfg.resolved_mode](backbones, prepared, warm_cfg, replace(run, board=None))
        run.timings["warm_start_s"] = run.timings.pop("train_s")
        prepared = Prepared(prepared.classes, warm.train, warm.eval, prepared.skipped, prepared.warnings)
        head, warm_computed, warm_top1 = warm.head, warm.computed, warm.history["eval_top1"][-1]
    else:  # the checkpoint's weights replace the warm start's: skip it
        head = build_head(linear_head_spec(backbone.num_features, len(prepared.classes), cfg.dropout))
        warm_computed, warm_top1 = 0, checkpoint.get("notes", {}).get("warm_start_top1")
    t = time.perf_counter()
    pixel_args: dict[str, Any] = dict(seed=cfg.seed, part="pixels", network=nn.Identity(), dtype=np.uint8)
    eval_views = [v + PIXELS for v in cfg.tta_views]
    kept, pixels, computed = _extract_splits(
        backbones, prepared, run, {"train": ["square" + PIXELS], "eval": []}, **pixel_args
    )
    backbone.data_config = whole_image(backbone.data_config)  # from here on: eval, and the saved model
    prepared = Prepared(prepared.classes, kept["train"], prepared.eval, prepared.skipped, prepared.warnings)
    kept, eval_pixels, eval_computed = _extract_splits(
        backbones, prepared, run, {"train": [], "eval": eval_views}, **pixel_args
    )
    pixels["eval"], computed = eval_pixels["eval"], computed + eval_computed
    run.timings["decode_s"] = time.perf_counter() - t
    train_y = _labels(kept["train"])
    blocks = cfg.resolved_blocks
    ft_cfg = FinetuneConfig(
        **_tuning_settings(cfg, train_y, len(prepared.classes)),
        layer_decay=cfg.layer_decay,
        keep=cfg.keep,
        patience=cfg.patience,
        trainable=split_backbone(backbone, blocks).top_prefixes if blocks else None,
        fingerprint=fingerprint,
    )
    t = time.perf_counter()
    with progress_bar("Fine-tuning", enabled=run.verbose, unit="steps") as bar:
        history, eval_probs, info = fit_finetune(
            backbone.model,
            head,
            backbone.data_config,
            pixels["train"]["square" + PIXELS],
            train_y,
            ft_cfg,
            device=run.device,
            eval_pixels=[pixels["eval"][v + PIXELS] for v in cfg.tta_views],
            eval_y=_labels(kept["eval"]),
            out=run.out,
            checkpoint=checkpoint,
            notes={"warm_start_top1": warm_top1},
            board=run.board,
            progress=bar,
        )
    run.timings["train_s"] = time.perf_counter() - t
    state = tuned_state(backbone.model, ft_cfg.trainable or [""])
    return _Fitted(
        head, asdict(history), kept["train"], kept["eval"], eval_probs, warm_computed + computed, state,
        extra_metrics={"finetune": {**info, "warm_start": warm_cfg.resolved_mode, "warm_start_top1": warm_top1}},
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


def _warm_start_config(cfg: TrainConfig, backbone: Backbone) -> TrainConfig:
    """Settings of finetune's starting point: tune-top's defaults where the backbone can be split.

    Fine-tuning then starts from a network that already scores as tune-top does
    (its last block and head trained on cached activations, minutes on a CPU),
    so the expensive full-network steps refine a good model instead of first
    repairing a random head. Backbones tune-top cannot split start from a head
    trained on cached clean features.
    """
    defaults = dict(epochs=None, steps=None, lr=None, label_smoothing=None, weight_decay=None, backbone_lr=None)
    if can_split(backbone):
        return replace(cfg, mode="tune-top", blocks=None, views=None, **defaults)
    return replace(cfg, mode="head", views=0, **defaults)


def _fingerprint(cfg: TrainConfig, prepared: Prepared) -> str:
    """Settings + exact training/eval images: a checkpoint is resumed only for the same run."""
    splits = {"train": prepared.train, "eval": prepared.eval}
    payload = {"config": asdict(cfg), "images": {k: [(it.sha256, it.label) for it in v] for k, v in splits.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


#: Training function of each mode.
FIT = {"head": _fit_head_mode, "tune-top": _fit_tune_top, "finetune": _fit_finetune}


def _version() -> str:
    from . import __version__

    return __version__
