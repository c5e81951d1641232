"""The training pipeline: settings -> prepare -> extract -> fit -> bundle -> report, for any mode.

:func:`train` is the whole run in one call. It resolves the settings first
(:func:`~florist.training.registry.resolve`), before a network is built or the
run folder is touched, so a bad setting costs nothing and leaves nothing
behind. The chosen mode's ``fit`` does the mode's own work on a :class:`Job`
and hands back a :class:`Fitted`; everything before and after it (checking the
photos, the run folder and its lock, metrics, the bundle, the report) is the
same for every mode and lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from .. import remote
from ..backbones import Backbone, state_id
from ..bundle import Bundle, is_complete, linear_head_spec, save_bundle, with_tuned_prefixes
from ..calibration import apply_temperature
from ..data import Item, Prepared, Skipped, check_memo_file, prepare, write_manifests
from ..devices import pick_device
from ..ensemble import EnsembleHead, ensemble_head_spec
from ..errors import FloristError, SettingError, escape
from ..evaluate import compute_metrics
from ..features import FeatureResult, extract_concat, merged_errors
from ..files import atomic_write_csv, atomic_write_json, folder_lock, remove_stale_temporaries
from ..inputs import data_input
from ..predict import Classifier
from ..progress import progress_bar
from ..runfiles import (
    CHECKPOINT,
    LABEL_ISSUES_CSV,
    LABELS,
    METRICS_JSON,
    MODEL_JSON,
    RUN_JSON,
    SKIPPED_CSV,
    TENSORBOARD,
)
from ..runinfo import run_info
from ..tfrecord import is_record_data, prepare_records
from ..version import __version__
from .backbone_set import create_backbones
from .ensemble import fit_ensemble
from .job import Fitted, Job, Remembered
from .registry import get_mode, resolve
from .settings import TrainConfig
from .trust import HeldOut, Trust, fit_trust, held_out

log = logging.getLogger("florist")


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
        config: settings (:class:`~florist.training.TrainConfig`); keyword ``overrides`` replace
            single fields (``florist.train("photos", "run", epochs=30)``).
        cache_dir: feature cache root (default ``$FLORIST_CACHE`` or the user cache folder); a local
            folder, which also holds local copies of remote TFRecord data and the photos
            finetune keeps within its ``disk_budget``.
        overwrite: replace a finished run in ``out_dir``.
        resume: finetune: continue from ``out_dir``'s checkpoint of an interrupted run with the
            same settings and data.
        verbose: show progress bars and a summary in the log.

    Returns:
        The trained :class:`~florist.predict.Classifier`; ``metrics.json`` holds its evaluation.

    Raises:
        SettingError: a bad setting, before anything is read or written.
        FloristError: bad data, or an existing finished run.
    """
    cfg = resolve(config, **overrides)
    device = pick_device(cfg.device or "auto")
    for name, path, what in (("cache_dir", cache_dir, "folder"), ("weights", cfg.weights, "file")):
        if remote.is_remote(path):
            raise SettingError(f"{{{name}}} must be a local {what}, got {escape(str(path))}")
    cache_root = remote.local_path(cache_dir) if cache_dir else remote.default_cache_dir()
    joined = dist.init(device)
    try:
        started = time.perf_counter()
        backbones = create_backbones(cfg, device)  # a bad name fails here, before out_dir is touched
        # Remote photos are read where they are (finetune keeps some, within its disk budget), remote
        # TFRecord data is fetched once per machine; a remote run folder is written locally and uploaded
        # (checkpoint.pt as it changes); model.json is fetched to refuse overwriting a finished run.
        with (
            data_input(data_dir, siblings=[LABELS], root=cache_root) as data,
            remote.local_output(out_dir, fetch=[MODEL_JSON, CHECKPOINT], root=cache_root) as out,
            _keeping_photos(data, cfg, cache_root),
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


def _keeping_photos(data: remote.Staged, cfg: TrainConfig, cache_root: Path) -> AbstractContextManager[Any]:
    """The photo cache of a mode that reads remote photos again (``disk_budget``, in MB); else nothing."""
    streamed = remote.is_remote(data.path)
    return remote.keeping_photos(int((cfg.disk_budget or 0) * 1e6) if streamed else 0, cache_root)


@contextmanager
def _claim_out_dir(out_dir: Path, overwrite: bool) -> Iterator[None]:
    """Lock the run folder for this process; refuse to clobber a finished run unless asked.

    Inside the lock, temporary files of a killed earlier run are removed and a
    finished run being overwritten is un-marked first.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FloristError(f"output path exists and is not a folder: {out_dir}")
    if is_complete(out_dir) and not overwrite:
        raise _finished(out_dir)
    with folder_lock(out_dir):
        if is_complete(out_dir):
            if not overwrite:  # finished by another process since the check above
                raise _finished(out_dir)
            (out_dir / MODEL_JSON).unlink()
        remove_stale_temporaries(out_dir)
        yield


def _finished(out_dir: Path) -> SettingError:
    return SettingError(f"{escape(str(out_dir))} already holds a trained model; use {{overwrite}} or another run folder")


def _train(
    data_dir: str | Path, out: Path, backbones: list[Backbone], cfg: TrainConfig, device: torch.device,
    cache_root: Path, resume: bool, verbose: bool, started: float,
) -> Classifier:
    verbose = verbose and dist.is_main()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    split = dict(eval_fraction=cfg.eval_fraction, train_per_class=cfg.train_per_class, seed=cfg.seed)
    with progress_bar("Checking images", enabled=verbose) as bar:
        if is_record_data(data_dir):
            prepared = prepare_records(data_dir, **split, max_pixels=cfg.max_pixels, progress=bar)
        else:  # one process reads every photo (remote ones too) and writes the verdicts; all get its result
            memo = check_memo_file(cache_root, data_dir)
            prepared = dist.from_main(
                lambda: prepare(data_dir, **split, max_pixels=cfg.max_pixels, progress=bar, check_memo=memo)
            )
    timings["prepare_s"] = time.perf_counter() - t
    for message in prepared.warnings if dist.is_main() else ():
        log.warning(message)

    from ..report import Board as TensorBoard

    with TensorBoard(out / TENSORBOARD, prepared.classes) if dist.is_main() else nullcontext() as board:
        cross_fits = (cfg.calibration_folds or 0) >= 2  # the folds start from the pretrained weights too
        initial = [{k: v.clone() for k, v in b.model.state_dict().items()} for b in backbones] if cross_fits else []
        job = Job(backbones, prepared, cfg, out, cache_root, device, board, verbose, resume, timings, initial)
        fitted, held = _fit(job)
        reference = reference_backbones(backbones, fitted, cfg, device)
        trust = fit_trust(job, fitted, reference, held)
    fitted.eval_probs = apply_temperature(fitted.eval_probs, trust.temperature)
    fitted.extra_metrics.update(trust.metrics)
    model = _classifier(backbones, fitted, prepared.classes, cfg, trust, reference)
    if not dist.is_main():
        dist.barrier()  # rank 0 writes the run folder
        return model
    prepared = Prepared(prepared.classes, fitted.train, fitted.eval, prepared.skipped, prepared.warnings)
    write_manifests(out, prepared)
    if prepared.skipped:
        log.warning("%d file(s) skipped, listed in %s", len(prepared.skipped), out / SKIPPED_CSV)
    timings["total_s"] = time.perf_counter() - started
    metrics = _metrics(fitted, prepared, cfg, timings)
    atomic_write_json(out / METRICS_JSON, metrics)
    atomic_write_csv(
        out / LABEL_ISSUES_CSV,
        ["path", "given", "suggested", "score"],
        [[i.path, i.given, i.suggested, f"{i.score:.6f}"] for i in trust.label_issues],
    )
    used = fitted.train + fitted.eval
    atomic_write_json(out / RUN_JSON, run_info(data_dir, prepared.classes, used, cfg.to_dict()))
    model.bundle = _bundle(backbones, fitted, prepared.classes, cfg, trust)
    save_bundle(out, model.bundle)  # model.json last: the run is complete from here on
    (out / CHECKPOINT).unlink(missing_ok=True)  # nothing left to resume
    dist.barrier()
    from ..report import finish_run

    finish_run(out, fitted.eval_probs)  # eval_predictions.csv, TensorBoard images + hparams, report.html
    if verbose:
        top1 = metrics.get("top1")
        log.info(
            "%s: trained on %d images (%d classes) in %.1fs; eval top-1 %s",
            cfg.mode,
            len(fitted.train),
            len(prepared.classes),
            timings["total_s"],
            f"{top1:.2%} on {len(fitted.eval)} images" if top1 is not None else "n/a (no eval split)",
        )
    return model


def _fit(job: Job) -> tuple[Fitted, HeldOut | None]:
    """The mode's fit (once per backbone for an ensemble), and its cross-fit for the temperature."""
    mode = get_mode(job.cfg.mode)
    if mode.ensemble and len(job.backbones) > 1:
        return fit_ensemble(job, mode.fit)
    fitted = mode.fit(job)
    return fitted, held_out(job)


def _metrics(fitted: Fitted, prepared: Prepared, cfg: TrainConfig, timings: dict[str, float]) -> dict[str, Any]:
    """The contents of ``metrics.json``."""
    metrics: dict[str, Any] = {
        "mode": cfg.mode,
        "n_train": len(fitted.train),
        "n_eval": len(fitted.eval),
        "views": fitted.views,
    }
    eval_y = labels(fitted.eval)
    if len(eval_y):
        metrics.update(compute_metrics(eval_y, fitted.eval_probs, prepared.classes))
    if fitted.history.get("train_top1"):  # an ensemble's members each have theirs
        metrics["train_top1"] = fitted.history["train_top1"][-1]
    metrics["features_computed"] = fitted.computed
    metrics["n_skipped"] = len(prepared.skipped)
    metrics.update(fitted.extra_metrics)
    metrics["timings"] = timings
    metrics["history"] = fitted.history
    return metrics


def _bundle(backbones: list[Backbone], fitted: Fitted, classes: list[str], cfg: TrainConfig, trust: Trust) -> Bundle:
    state = {**fitted.head.state_dict(), **with_tuned_prefixes(fitted.backbone_states)}
    if trust.detector is not None:
        state.update(trust.detector.state())
    return Bundle(
        classes=classes,
        backbones=[b.spec for b in backbones],
        data_configs=[b.data_config for b in backbones],
        head=_head_spec(fitted.head, backbones, len(classes), cfg.dropout),
        state=state,
        tta_views=cfg.tta_views,
        bf16=backbones[0].bf16,
        engine=backbones[0].engine,
        temperature=trust.temperature,
        ood_threshold=trust.detector.threshold if trust.detector else None,
        train_config=cfg.to_dict(),
        florist_version=__version__,
    )


def _head_spec(head: nn.Module, backbones: list[Backbone], num_classes: int, dropout: float) -> dict[str, Any]:
    """``model.json``'s ``head``: one linear head on all features, or an ensemble's member heads."""
    if isinstance(head, EnsembleHead):
        members = [linear_head_spec(b.num_features, num_classes, dropout) for b in backbones]
        return ensemble_head_spec(members, head.temperatures, head.weights)
    return linear_head_spec(sum(b.num_features for b in backbones), num_classes, dropout)


def _classifier(
    backbones: list[Backbone], fitted: Fitted, classes: list[str], cfg: TrainConfig, trust: Trust,
    reference: list[Backbone],
) -> Classifier:
    """The trained model as a :class:`Classifier` (marking a tuned backbone for the feature cache).

    ``reference``: the pretrained backbones whose features ``trust.detector`` scores.
    """
    for backbone, state in zip(backbones, fitted.backbone_states):
        if state:
            backbone.tuned_id = state_id(state)
    model = Classifier(backbones, fitted.head, classes, tta_views=cfg.tta_views, temperature=trust.temperature)
    model.ood, model.reference = trust.detector, reference
    return model


def reference_backbones(
    backbones: list[Backbone], fitted: Fitted, cfg: TrainConfig, device: torch.device
) -> list[Backbone]:
    """The backbones with their pretrained weights, for the detector: the run's own when it tuned none."""
    return create_backbones(cfg, device) if any(fitted.backbone_states) else backbones


# ---------------------------------------------------------------------------
# What the modes share: cached network outputs of both splits
# ---------------------------------------------------------------------------


def extract_splits(
    job: Job, views: dict[str, list[str]], *, part: str = "pooled", **kwargs: Any
) -> tuple[dict[str, list[Item]], dict[str, dict[str, np.ndarray]], int]:
    """Cached outputs of ``views[split]`` for the train and eval splits; failed images are dropped.

    Under torchrun each process first computes its share of the images into the
    (shared) cache; then every process reads the whole set from it.

    Returns:
        The images kept per split, their outputs per split and view, and how many were computed.
    """
    kept: dict[str, list[Item]] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    computed = 0
    what = {"pooled": "Features", "pixels": "Decoding"}.get(part, "Activations")
    for split_name, items in (("train", job.prepared.train), ("eval", job.prepared.eval)):
        if not views[split_name]:  # nothing asked of this split: keep its items as they are
            kept[split_name], outputs[split_name] = items, {}
            continue
        memo_keys = _memo_keys(job, views[split_name], part)
        remembered = [job.remembered.get(k, items) for k in memo_keys.values()] if memo_keys else [None]
        if all(r is not None for r in remembered):
            kept[split_name], outputs[split_name] = items, dict(zip(views[split_name], remembered))
            continue
        common = {"cache_root": job.cache_root, "seed": job.cfg.seed, "part": part, **kwargs}
        title = f"{what} ({split_name}"
        if dist.world_size() > 1:
            share = [items[i] for i in dist.my_share(len(items))]
            mine = _extract_items(job.backbones, share, views[split_name], title, job.verbose, collect=False, **common)
            computed += dist.sum_over_processes(sum(r.computed for r in mine.values()))  # includes a barrier
        verbose = job.verbose and dist.world_size() == 1
        results = _extract_items(job.backbones, items, views[split_name], title, verbose, **common)
        computed += sum(r.computed for r in results.values())  # 0 after the shared pass, unless a file changed
        kept[split_name], outputs[split_name], failed = _drop_failed(items, results)
        job.prepared.skipped.extend(failed)
        for view, key in memo_keys.items():
            job.remembered.add(key, kept[split_name], outputs[split_name][view])
    return kept, outputs, computed


def _memo_keys(job: Job, views: list[str], part: str) -> dict[str, tuple[str, ...]]:
    """View -> the cache keys of its rows, for the views :class:`~florist.training.job.Remembered` keeps."""
    if part != "pooled":
        return {}
    return {v: Remembered.key(job.backbones, v, job.cfg.seed) for v in views}


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


def _drop_failed(
    items: list[Item], views: dict[str, FeatureResult]
) -> tuple[list[Item], dict[str, np.ndarray], list[Skipped]]:
    """Remove images that failed in any view (e.g. a file changed since prepare)."""
    errors = merged_errors(views.values())
    if not errors:  # the usual case: no copy of every view's features (1 GB at 100,000 photos)
        return items, {v: r.features for v, r in views.items()}, []
    keep = [i for i in range(len(items)) if i not in errors]
    skipped = [Skipped(items[i].path, reason) for i, reason in sorted(errors.items())]
    return [items[i] for i in keep], {v: r.features[keep] for v, r in views.items()}, skipped


def labels(items: list[Item], repeat: int = 1) -> np.ndarray:
    """The items' labels, the whole list ``repeat`` times over (one copy per view)."""
    return np.tile(np.array([it.label for it in items], dtype=np.int64), repeat)
