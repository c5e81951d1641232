"""Show a run: ``report.html``, its plots, and the images TensorBoard shows.

:func:`write_report` reads only what a finished run folder holds (``metrics.json``,
``run.json``, ``model.json``, the manifests and ``eval_predictions.csv``) and writes

* ``confusion_matrix.png`` and ``curves.png`` (loss, train/eval top-1 per epoch);
* ``report.html``: one self-contained page (plots and thumbnails embedded as
  base64) with the run summary, per-class table, confusion matrix, curves, the
  most confused pairs, a gallery of misclassified eval images (the most confident
  mistakes with a Grad-CAM heatmap of the wrong answer, see :mod:`florist.explain`)
  and the skipped files.

:func:`finish_run` is what training calls once the bundle is saved: it keeps the
eval predictions it already computed (``eval_predictions.csv``, so the report
never runs the network again), adds the confusion matrix, sample input images and
the hyperparameters to the TensorBoard log, and writes the report. Plots use
matplotlib's object API with the Agg canvas: no display and no global pyplot state.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from . import remote
from .bundle import is_complete
from .data import BadImage, Item, duplicate_groups, load_image, read_labels, read_manifest
from .errors import FloristError
from .files import atomic_write_bytes, atomic_write_csv, atomic_write_text, read_csv
from .runfiles import (
    CONFUSION_PNG,
    CURVES_PNG,
    EVAL_CSV,
    LABEL_ISSUES_CSV,
    METRICS_JSON,
    MODEL_JSON,
    PREDICTIONS_CSV,
    REPORT_HTML,
    RUN_JSON,
    SKIPPED_CSV,
    TENSORBOARD,
    TRAIN_CSV,
)
from .tfrecord import read_image_bytes

log = logging.getLogger("florist")


#: Misclassified images shown in the gallery (most confident mistakes first).
GALLERY_SIZE = 48
#: Longest side of a gallery thumbnail, in pixels.
THUMB_PX = 200
#: Misclassified images given a heatmap (the first of the gallery): each costs a forward and backward pass.
HEATMAPS = 24
#: Rows in the "most confused pairs" table.
TOP_PAIRS = 10
#: Training images per class shown in TensorBoard, in every view the network was trained on.
SAMPLE_IMAGES = 8


# ---------------------------------------------------------------------------
# Eval predictions
# ---------------------------------------------------------------------------


def save_predictions(run_dir: str | Path, items: list[Item], probs: np.ndarray, classes: list[str]) -> None:
    """Write ``eval_predictions.csv``: path, label, predicted, its probability, then one column per class."""
    header = ["path", "label", "predicted", "probability", *(f"p:{c}" for c in classes)]
    rows = (
        [it.path, classes[it.label], classes[int(p.argmax())], f"{p.max():.6f}", *(f"{v:.6f}" for v in p)]
        for it, p in zip(items, probs)
    )
    atomic_write_csv(Path(run_dir) / PREDICTIONS_CSV, header, rows)


def load_predictions(run_dir: str | Path, classes: list[str]) -> tuple[list[Item], np.ndarray]:
    """The eval items and their probabilities ``[N, classes]``.

    Read from ``eval_predictions.csv``; a run trained before florist wrote that
    file gets it computed once from its eval manifest (features come from the cache).
    """
    run = Path(run_dir)
    items = read_manifest(run / EVAL_CSV, classes)
    path = run / PREDICTIONS_CSV
    if path.exists():
        rows = read_csv(path)
        by_path = {r["path"]: [float(r[f"p:{c}"]) for c in classes] for r in rows}
        kept = [it for it in items if it.path in by_path]
        return kept, np.array([by_path[it.path] for it in kept], dtype=np.float64).reshape(
            len(kept), len(classes)
        )
    if not items:
        return [], np.zeros((0, len(classes)))
    from .loader import load

    log.info("computing eval predictions for the report (%d images)", len(items))
    probs, errors = load(run).predict_proba(
        [it.path for it in items], shas=[it.sha256 for it in items], cache=True
    )
    kept_rows = [i for i in range(len(items)) if i not in errors]
    items, probs = [items[i] for i in kept_rows], probs[kept_rows]
    save_predictions(run, items, probs, classes)
    return items, probs


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _png(figure: Any) -> bytes:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


class ConfusionFigure:
    """The confusion-matrix plot: rows = true class, colour = share of the row, counts written in.

    Laid out once and refilled by :meth:`draw`, so TensorBoard can get one after every
    eval cheaply: about 22 ms a matrix on this project's 2-core CPU, where a new figure
    saved as PNG took 110 ms.
    """

    def __init__(self, classes: list[str]):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(classes)
        side = min(max(3.6, 0.45 * n + 1.9), 20)
        self.figure = Figure(figsize=(side + 1.2, side))
        FigureCanvasAgg(self.figure)
        ax = self.figure.add_subplot()
        self.image = ax.imshow(np.zeros((n, n)), cmap="Blues", vmin=0, vmax=1)
        self.figure.colorbar(self.image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
        ax.set_xticks(range(n), classes, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        self.title = ax.set_title("Confusion matrix (0 eval images)")
        cells = range(n) if n <= 30 else range(0)  # beyond 30 classes the counts would not fit
        self.counts = {(i, j): ax.text(j, i, "", ha="center", va="center", fontsize=9) for i in cells for j in cells}
        self.figure.tight_layout()
        self._changing = [self.image, self.title, *self.counts.values()]
        self._background: Any = None  # pixels of everything else, drawn once (see rgb)

    def draw(self, matrix: list[list[int]]) -> ConfusionFigure:
        """Show ``matrix`` (counts; rows = true class, columns = predicted)."""
        cm = np.asarray(matrix, dtype=np.int64)
        shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        self.image.set_data(shares)
        self.title.set_text(f"Confusion matrix ({int(cm.sum())} eval images)")
        for (i, j), text in self.counts.items():
            text.set_text(str(cm[i, j]) if cm[i, j] else "")
            text.set_color("white" if shares[i, j] > 0.5 else "black")
        return self

    def rgb(self) -> np.ndarray:
        """The plot as an ``[H, W, 3]`` uint8 array.

        Axes, labels and colour bar never change: they are drawn once and only the
        cells, counts and title are drawn over them again (matplotlib's blitting):
        22 ms instead of 45 ms for a full redraw.
        """
        canvas = self.figure.canvas
        if self._background is None:
            for artist in self._changing:
                artist.set_animated(True)  # left out of a full draw
            canvas.draw()
            self._background = canvas.copy_from_bbox(self.figure.bbox)
        canvas.restore_region(self._background)
        for artist in [*self._changing, *self.image.axes.spines.values()]:  # the frame goes over the cells
            self.figure.draw_artist(artist)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    def png(self) -> bytes:
        for artist in self._changing:
            artist.set_animated(False)
        self._background = None
        return _png(self.figure)


def confusion_matrix_png(matrix: list[list[int]], classes: list[str]) -> bytes:
    """The confusion matrix as a PNG (see :class:`ConfusionFigure`)."""
    return ConfusionFigure(classes).draw(matrix).png()


def curves_png(history: dict[str, list[float]]) -> bytes:
    """Loss and train/eval top-1 per epoch, against the optimisation step."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    steps = history["step"]
    fig = Figure(figsize=(10, 3.6))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(steps, history["loss"], marker="o", markersize=3, color="#d1242f")
    loss_ax.set(title="Training loss", xlabel="step", ylabel="cross-entropy")
    loss_ax.grid(alpha=0.3)
    acc_ax.plot(steps, history["train_top1"], marker="o", markersize=3, label="train")
    eval_top1 = [v if v is not None else np.nan for v in history.get("eval_top1", [])]
    if eval_top1 and not np.all(np.isnan(np.asarray(eval_top1, dtype=float))):
        acc_ax.plot(steps, eval_top1, marker="o", markersize=3, label="eval")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    acc_ax.set(title="Top-1 accuracy", xlabel="step")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)


def reliability_png(probs: np.ndarray, labels: np.ndarray, temperature: float) -> bytes:
    """Reliability diagram of the eval split: accuracy against confidence per bin, before and after calibration.

    ``probs`` are the calibrated probabilities; the uncalibrated ones are recovered exactly by
    the inverse temperature (``softmax(T * log p)``).
    """
    from matplotlib.figure import Figure

    from .calibration import apply_temperature, expected_calibration_error, reliability

    fig = Figure(figsize=(4.8, 4.4), dpi=100)  # not pyplot's: its figures stay open until closed
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    curves = [("after", probs, "tab:blue")]
    if temperature != 1.0:
        curves.insert(0, ("before", apply_temperature(probs, 1 / temperature), "tab:orange"))
    for name, p, colour in curves:
        bins = reliability(p, labels)
        ece = expected_calibration_error(p, labels)
        ax.plot(
            [b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=colour,
            label=f"{name} (ECE {ece:.3f})",
        )  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (top probability)", ylabel="accuracy")
    ax.set_title(f"Reliability, eval split (temperature {temperature:.3g})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------
# The HTML page
# ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise FloristError(f"cannot read {path}: {e}") from None


def _thumbnail(path: str) -> str | None:
    """A small base64 JPEG of an image (decoded like everywhere else), or None if unreadable."""
    try:
        image = load_image(path, draft_size=THUMB_PX)
    except BadImage:
        return None
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _add_heatmaps(run: Path, gallery: list[dict[str, Any]]) -> None:
    """Give the first :data:`HEATMAPS` gallery entries ``heat``: a base64 JPEG of where the network saw its wrong answer.

    JPEG, as the thumbnails: a PNG overlay of a 224-pixel crop is 7x the size. A run whose
    network cannot give heatmaps (several backbones; torch or captum missing) or any failure
    leaves the gallery without them, with a warning: a report, and the training run that
    writes it at its end, never fails for want of a heatmap.
    """
    shown = gallery[:HEATMAPS]
    if not shown:
        return
    try:
        from .explain import Explainer

        explainer = Explainer.from_run(run)
        for g in shown:
            try:
                heatmap = explainer.explain_bytes(read_image_bytes(g["path"]), g["file"], target=g["predicted"])
            except BadImage:
                continue  # its thumbnail says why
            g["heat"] = base64.b64encode(heatmap.encoded("JPEG", quality=85)).decode("ascii")
    except Exception as e:  # see above: anything, logged
        for g in shown:
            g.pop("heat", None)
        log.warning("report.html has no heatmaps: %s", str(e) or type(e).__name__)


def _rel(path: str, root: str | None) -> str:
    if root:
        try:
            return remote.relative(path, root)
        except ValueError:  # another drive on Windows
            pass
    return path


def confused_pairs(matrix: list[list[int]], classes: list[str], top: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """Off-diagonal cells of the confusion matrix, largest first."""
    cm = np.asarray(matrix)
    totals = cm.sum(axis=1)
    cells = [
        (int(cm[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j and cm[i, j]
    ]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [
        {"true": classes[i], "predicted": classes[j], "count": n, "share": n / max(1, totals[i])}
        for n, i, j in cells[:top]
    ]


def _gallery(
    items: list[Item], probs: np.ndarray, classes: list[str], root: str | None
) -> list[dict[str, Any]]:
    """Misclassified items, most confident mistakes first."""
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    wrong = [i for i in range(len(items)) if predicted[i] != items[i].label]
    wrong.sort(key=lambda i: -probs[i, predicted[i]])
    return [
        {
            "path": items[i].path,
            "file": _rel(items[i].path, root),
            "label": classes[items[i].label],
            "predicted": classes[int(predicted[i])],
            "probability": float(probs[i, predicted[i]]),
            "p_label": float(probs[i, items[i].label]),
        }
        for i in wrong
    ]


def _duplicates(run: Path, classes: list[str], root: str | None) -> list[list[str]]:
    """Identical files among the images the run used, each with its class and split."""
    split_of: dict[str, str] = {}
    items: list[Item] = []
    for split_name in ("train", "eval"):
        for it in read_manifest(run / f"{split_name}.csv", classes):
            split_of[it.path] = split_name
            items.append(it)
    return [
        [f"{_rel(it.path, root)} ({classes[it.label]}, {split_of[it.path]})" for it in group]
        for group in duplicate_groups(items)
    ]


def _seconds(value: float) -> str:
    return f"{value:,.1f} s" if value < 120 else f"{value / 60:,.1f} min"


def _cards(metrics: dict[str, Any], n_classes: int) -> list[dict[str, str]]:
    """The headline numbers at the top of the page."""
    measured = "top1" in metrics
    cards = [
        ("top-1", f"{metrics['top1']:.2%}" if measured else "n/a"),
        ("top-5", f"{metrics['top5']:.2%}" if measured else "n/a"),
        ("macro F1", f"{metrics['macro_f1']:.3f}" if measured else "n/a"),
        ("classes", str(n_classes)),
        ("train images", str(metrics.get("n_train", ""))),
        ("eval images", str(metrics.get("n_eval", ""))),
        ("skipped", str(metrics.get("n_skipped", 0))),
        ("total time", _seconds(metrics.get("timings", {}).get("total_s", 0.0))),
    ]
    return [{"label": k, "value": v} for k, v in cards]


def _summary(metrics: dict[str, Any], info: dict[str, Any], model: dict[str, Any]) -> list[tuple[str, Any]]:
    """Data, model and provenance: what it takes to understand and repeat the run."""
    backbones = ", ".join(b.get("name", "?") for b in model.get("backbones", []))
    preprocessing = model.get("preprocessing") or [{}]
    return [
        ("data", info.get("data_dir", "?")),
        ("images used", info.get("n_images", "?")),
        ("data SHA-256", info.get("data_sha256", "?")),
        ("classes", ", ".join(model.get("classes", []))),
        ("mode", metrics.get("mode", "?")),
        ("backbone", backbones or "?"),
        ("input size", "x".join(map(str, preprocessing[0].get("input_size", [])[-2:])) or "?"),
        ("training views", ", ".join(metrics.get("views", []))),
        ("test-time views", ", ".join(model.get("tta_views", []))),
        ("bf16 features", model.get("bf16", "?")),
        ("features computed", metrics.get("features_computed", "?")),
        ("seed", info.get("seed", "?")),
        ("command", " ".join(info.get("command", [])) or "?"),
        ("git commit", info.get("git_commit") or "n/a"),
        ("machine", " / ".join(str(v) for v in info.get("machine", {}).values()) or "?"),
    ]


def _context(run: Path) -> dict[str, Any]:
    """Everything the template shows, gathered from the run folder."""
    metrics = _read_json(run / METRICS_JSON)
    if not metrics:
        raise FloristError(f"no metrics.json in {run}: not a finished florist run")
    info = _read_json(run / RUN_JSON)
    model = _read_json(run / MODEL_JSON)
    classes = read_labels(run)
    root = info.get("data_dir")
    config = info.get("config") or model.get("train_config") or {}
    has_eval = "top1" in metrics
    train_counts: dict[int, int] = defaultdict(int)
    for it in read_manifest(run / TRAIN_CSV, classes):
        train_counts[it.label] += 1

    items, probs = load_predictions(run, classes) if has_eval else ([], np.zeros((0, len(classes))))
    wrong = _gallery(items, probs, classes, root)
    gallery = [{**g, "thumb": _thumbnail(g["path"])} for g in wrong[:GALLERY_SIZE]]
    issues = _read_csv_or_empty(run / LABEL_ISSUES_CSV)
    suspects = [
        {**r, "file": _rel(r["path"], root), "thumb": _thumbnail(r["path"]), "score": float(r["score"])}
        for r in issues[:GALLERY_SIZE]
    ]
    skipped = [
        {"path": _rel(r["path"], root), "reason": r["reason"]}
        for r in _read_csv_or_empty(run / SKIPPED_CSV)
    ]
    per_class = (
        [
            {"name": name, "train": train_counts[i], **metrics["per_class"][name]}
            for i, name in enumerate(classes)
        ]
        if has_eval
        else []
    )
    trained = datetime.datetime.fromtimestamp((run / MODEL_JSON).stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return {
        "name": run.resolve().name,
        "run_dir": str(run),
        "trained": trained,
        "cards": _cards(metrics, len(classes)),
        "summary": _summary(metrics, info, model),
        "timings": [(k.removesuffix("_s"), _seconds(v)) for k, v in metrics.get("timings", {}).items()],
        "versions": [(k, v or "-") for k, v in info.get("versions", {}).items()],
        "config": [(k, "(mode default)" if v is None else v) for k, v in config.items()],
        "per_class": per_class,
        "pairs": confused_pairs(metrics["confusion_matrix"], classes) if has_eval else [],
        "n_wrong": len(wrong),
        "gallery": gallery,
        "duplicates": _duplicates(run, classes, root),
        "suspects": suspects,
        "n_suspects": len(issues),
        "skipped": skipped,
        "florist_version": model.get("florist_version", ""),
        "metrics": metrics,
        "classes": classes,
        "temperature": model.get("temperature", 1.0),
        "calibration": metrics.get("calibration"),
        "ensemble": metrics.get("ensemble"),
        "ood": metrics.get("ood"),
        "eval_predictions": (items, probs),
    }


def _read_csv_or_empty(path: Path) -> list[dict[str, str]]:
    return read_csv(path) if path.exists() else []


def render_html(context: dict[str, Any]) -> str:
    """The report page from :func:`_context`'s data (Jinja2, every value HTML-escaped)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("florist", "templates"), autoescape=select_autoescape(["html"]))
    return env.get_template("report.html").render(**context)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html``, ``confusion_matrix.png`` and ``curves.png`` into a finished run folder.

    Returns:
        The path of ``report.html``.

    Raises:
        FloristError: ``run_dir`` is not a finished run.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FloristError(f"run folder not found: {run}")
    if not is_complete(run):
        raise FloristError(f"no finished model in {run} (model.json missing): train first")
    context = _context(run)
    _add_heatmaps(run, context["gallery"])
    metrics = context["metrics"]
    context["confusion_png"] = context["curves_png"] = context["reliability_png"] = None
    context["member_curves"] = [
        (m["backbone"], base64.b64encode(curves_png(m["history"])).decode("ascii"))
        for m in (metrics.get("ensemble") or {}).get("members", [])
        if m.get("history", {}).get("step")
    ]
    if "confusion_matrix" in metrics:
        png = confusion_matrix_png(metrics["confusion_matrix"], context["classes"])
        atomic_write_bytes(run / CONFUSION_PNG, png)
        context["confusion_png"] = base64.b64encode(png).decode("ascii")
    if metrics.get("history", {}).get("step"):
        png = curves_png(metrics["history"])
        atomic_write_bytes(run / CURVES_PNG, png)
        context["curves_png"] = base64.b64encode(png).decode("ascii")
    items, probs = context.pop("eval_predictions")
    if items:
        labels = np.array([it.label for it in items])
        png = reliability_png(probs, labels, float(context["temperature"]))
        context["reliability_png"] = base64.b64encode(png).decode("ascii")
    path = run / REPORT_HTML
    atomic_write_text(path, render_html(context))
    return path


# ---------------------------------------------------------------------------
# End of training
# ---------------------------------------------------------------------------


def finish_run(run_dir: str | Path, eval_probs: np.ndarray) -> Path:
    """What :func:`florist.train` calls once the bundle is saved.

    Args:
        run_dir: the finished run folder.
        eval_probs: ``[N, classes]`` probabilities of the eval images, in ``eval.csv`` order
            (what training already computed for ``metrics.json``).

    Returns:
        The path of ``report.html``.
    """
    run = Path(run_dir)
    classes = read_labels(run)
    items = read_manifest(run / EVAL_CSV, classes)
    if len(items) != len(eval_probs):
        raise FloristError(f"{len(eval_probs)} eval predictions for {len(items)} eval images in {run}")
    if items:
        save_predictions(run, items, eval_probs, classes)
    path = write_report(run)
    log_to_tensorboard(run)
    return path


class Board:
    """TensorBoard log written during training: the curves after every epoch and the
    held-out confusion matrix after every eval, so a run can be watched while it trains.

    Implements :class:`florist.training.loop.Board`; use as a context manager to close the log.
    """

    def __init__(self, log_dir: str | Path, classes: list[str]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.classes = classes
        self._figure: ConfusionFigure | None = None  # made at the first eval

    def epoch(self, step: int, loss: float, train_top1: float, eval_top1: float, lr: float) -> None:
        """Scalars of one epoch (no eval top-1 when there was no eval)."""
        self.writer.add_scalar("loss/train", loss, step)
        self.writer.add_scalar("top1/train", train_top1, step)
        self.writer.add_scalar("lr", lr, step)
        if not np.isnan(eval_top1):
            self.writer.add_scalar("top1/eval", eval_top1, step)

    def confusion(self, step: int, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        """The confusion matrix of this eval, drawn like ``confusion_matrix.png``."""
        from .evaluate import confusion_matrix

        matrix = confusion_matrix(y_true, y_pred, len(self.classes)).tolist()
        self._figure = self._figure or ConfusionFigure(self.classes)
        self.writer.add_image("eval/confusion_matrix", self._figure.draw(matrix).rgb(), step, dataformats="HWC")

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.close()


def log_to_tensorboard(run_dir: str | Path) -> None:
    """Add the final confusion matrix, sample training inputs and the hyperparameters to ``RUN_DIR/tb``.

    The curves and each eval's confusion matrix are logged during training
    (:class:`Board`); this adds what only exists at the end, in a new event file of
    the same log folder. The final confusion matrix, of the weights the run kept
    (``--keep best`` may keep an earlier epoch), is the ``confusion_matrix.png``
    :func:`write_report` wrote.
    """
    from torch.utils.tensorboard import SummaryWriter

    run = Path(run_dir)
    metrics = _read_json(run / METRICS_JSON)
    info = _read_json(run / RUN_JSON)
    model = _read_json(run / MODEL_JSON)
    classes = read_labels(run)
    step = (metrics.get("history", {}).get("step") or [0])[-1]
    with SummaryWriter(log_dir=str(run / TENSORBOARD)) as writer:
        if (run / CONFUSION_PNG).is_file():
            writer.add_image(
                "final/confusion_matrix", _png_array((run / CONFUSION_PNG).read_bytes()), step, dataformats="HWC"
            )
        preprocessing = model.get("preprocessing") or []
        if preprocessing:
            train_items = read_manifest(run / TRAIN_CSV, classes)
            views = metrics.get("views", ["clean"])
            for view, batch in sample_inputs(
                train_items, preprocessing[0], views, info.get("seed", 0)
            ).items():
                writer.add_images(f"inputs/{view}", batch, 0)
        final = {
            f"hparam/{k}": float(metrics[k])
            for k in ("top1", "top5", "macro_f1", "train_top1")
            if k in metrics
        }
        hparams = {**hyperparameters(info.get("config", {})), "bf16": bool(model.get("bf16", False))}
        writer.add_hparams(hparams, final, run_name=".", global_step=step)


def _png_array(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def sample_inputs(
    items: list[Item], data_config: dict[str, Any], views: list[str], seed: int
) -> dict[str, np.ndarray]:
    """A few training images as the network saw them in each view: ``{view: [N, 3, H, W]}`` in [0, 1].

    Images are taken round-robin over classes and go through the very dataset
    class that feature extraction uses, so augmented views are the cached ones.
    """
    from .features import _ImageFiles

    by_class: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_class[it.label].append(it)
    picked: list[Item] = []
    while len(picked) < min(SAMPLE_IMAGES, len(items)):
        for label in sorted(by_class):
            if by_class[label] and len(picked) < SAMPLE_IMAGES:
                picked.append(by_class[label].pop(0))
    dataset = _ImageFiles([it.path for it in picked], data_config, views, seed)
    good = [item for item in (dataset[i] for i in range(len(picked))) if not item[3]]
    if not good:
        return {}
    return {v: np.stack([pixels[k].numpy() for _, pixels, _, _ in good]).astype(np.float32) / 255 for k, v in enumerate(views)}


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """A run's resolved settings as TensorBoard's hparams plugin wants them: numbers, strings, booleans.

    ``run.json`` holds the settings the run used, each mode's defaults filled in, so
    they are shown as they are; a setting the mode does not read is ``"none"``.
    """
    return {
        k: ("none" if v is None else v)
        for k, v in config.items()
        if isinstance(v, (int, float, str, bool)) or v is None
    }


# ---------------------------------------------------------------------------
# A picture of the page
# ---------------------------------------------------------------------------

#: Headless Chromium switches for a reproducible screenshot with no network activity.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """A Chromium (or Chrome) executable on PATH, or None."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 2000) -> Path:
    """Render an HTML file (e.g. ``report.html``) to a PNG with headless Chromium.

    Used for the README's pictures and by the tests; the report itself needs no browser.

    Raises:
        FloristError: Chromium is not installed (Debian: ``apt-get install chromium``) or failed.
    """
    import subprocess

    browser = find_chromium()
    if browser is None:
        raise FloristError("chromium not found on PATH (Debian/Ubuntu: apt-get install chromium)")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    command = [
        browser,
        *CHROMIUM_FLAGS,
        f"--screenshot={png}",
        f"--window-size={width},{height}",
        Path(html_path).resolve().as_uri(),
    ]
    try:
        subprocess.run(command, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise FloristError("chromium did not finish the screenshot within 120 s") from None
    if not png.is_file():
        raise FloristError(f"chromium wrote no screenshot to {png}")
    return png
