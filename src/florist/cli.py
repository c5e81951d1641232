"""The ``florist`` command: a thin Typer layer over the Python API.

Each command parses options, calls one library function and prints the result;
a :class:`~florist.errors.FloristError` becomes a one-line message and exit
status 2, never a traceback.
"""

from __future__ import annotations

import functools
import gc
import inspect
import io
import json
import logging
import os
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from .errors import FloristError, SettingError
from .files import json_text, write_csv

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn a folder of labelled photos (<folder>/<class>/<images>) into an image classifier.",
)
out = Console()
err = Console(stderr=True)

Quiet = typer.Option(False, "--quiet", "-q", help="No progress bars or summary lines.")
Engine = typer.Option(
    "auto", help="Run folders: what computes the network (openvino, onnxruntime, torch); auto: the one it was trained with."
)
OodThreshold = typer.Option(
    None,
    "--ood-threshold",
    help="Answer 'unknown' when an image's ood_score is above this (default: the run's own, chosen to "
    "accept 95% of held-out training photos).",
)
Seed = typer.Option(0, help="Random seed for the split and the training (same seed + data = same model).")
EvalFraction = typer.Option(0.2, help="Share of each class held out for evaluation.")
TrainPerClass = typer.Option(
    None, help="Exact number of training images per class (the rest is eval); overrides --eval-fraction."
)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_time=False, show_path=False)],
        force=True,
    )


def _setup_output() -> None:
    """Output that odd files cannot break.

    File names that are not valid UTF-8 reach Python as lone surrogates, which a
    strict stdout refuses: they are printed as their original bytes, as ``ls`` does.
    Pillow's warnings about damaged metadata (EXIF) are dropped: florist reports
    each unusable file itself, once, and a usable one needs no warning.
    """
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, io.UnsupportedOperation):
            pass


def _print_json(data: Any) -> None:
    """``--json`` output: indented, and valid UTF-8 even when file names are not (see :func:`json_text`)."""
    sys.stdout.write(json_text(data, indent=2) + "\n")
    sys.stdout.flush()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit cannot fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line on stderr and exit status 2 (130 on Ctrl-C).

    Expected failures are florist's own errors and the environment's (``OSError``:
    a full disk, a missing permission, a file where a folder should be).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_output()
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # `florist predict ... | head`: the reader has all it wants
            _silence_stdout()
            raise typer.Exit(1) from None
        except (FloristError, OSError) as e:
            message = e.for_cli() if isinstance(e, SettingError) else str(e)
            err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@friendly_errors
def prepare(
    data_dir: str = typer.Argument(..., help="Folder of class folders (a local path or a URL: gs://, s3://...)."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Folder to write labels.txt and manifests to (path or URL)."),
    eval_fraction: float = EvalFraction,
    train_per_class: Optional[int] = TrainPerClass,
    seed: int = Seed,
    data_format: str = typer.Option(
        "csv",
        "--format",
        help="csv: train.csv/eval.csv listing the photo paths; tfrecord: train/eval .tfrecord files holding "
        "the photos themselves (tf.train.Example), for another machine or TensorFlow.",
    ),
    shards: int = typer.Option(1, help="tfrecord: files per split (train-00000-of-0000N.tfrecord ...)."),
    quiet: bool = Quiet,
) -> None:
    """Check every image, split train/eval, write labels.txt, the split (train/eval .csv or .tfrecord), skipped.csv."""
    from .data import prepare as run_prepare
    from .progress import progress_bar
    from .tfrecord import FORMATS, prepare_tfrecords

    _setup_logging(quiet)
    if data_format not in FORMATS:
        raise FloristError(f"--format must be one of {', '.join(FORMATS)}, got {data_format!r}")
    if data_format != "tfrecord" and shards != 1:
        raise FloristError("--shards applies to --format tfrecord")
    split = {"eval_fraction": eval_fraction, "train_per_class": train_per_class, "seed": seed}
    with progress_bar("Checking images", enabled=not quiet) as bar:
        if data_format == "tfrecord":
            result = prepare_tfrecords(data_dir, out_dir, shards=shards, progress=bar, **split)
        else:
            result = run_prepare(data_dir, out_dir, progress=bar, **split)
    for message in result.warnings:
        logging.getLogger("florist").warning(message)
    if not quiet:
        out.print(
            f"{len(result.classes)} classes, {len(result.train)} train, {len(result.eval)} eval, "
            f"{len(result.skipped)} skipped -> {escape(str(out_dir))}"
        )


def with_settings(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a Typer command one option per training setting, built from the settings' declarations.

    Every option defaults to unset, so the library (the chosen mode) decides what an
    option left out means; the help text says it, from the same declarations. The
    values given reach ``command`` as one ``settings`` dict.
    """
    from .training.registry import help_text
    from .training.settings import declarations, value_type

    own = [p for p in inspect.signature(command).parameters.values() if p.name != "settings"]
    annotations = {k: v for k, v in typing.get_type_hints(command).items() if k != "settings"}
    added = []
    for name in declarations():
        flag = "--" + name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if value_type(name) is bool else [flag]
        option = typer.Option(None, *names, help=escape(help_text(name, cli=True)), show_default=False)
        added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option))
        annotations[name] = Optional[value_type(name)]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in declarations()}
        return command(*args, settings={k: v for k, v in given.items() if v is not None}, **kwargs)

    wrapper.__signature__ = inspect.signature(command).replace(parameters=own + added)  # type: ignore[attr-defined]
    wrapper.__annotations__ = annotations
    del wrapper.__wrapped__  # Typer reads the signature above, not the wrapped function's
    return wrapper


@app.command()
@friendly_errors
@with_settings
def train(
    data_dir: str = typer.Argument(
        ...,
        help="Folder of class folders, or TFRecord data: a .tfrecord file or a folder of them with labels.txt. "
        "A local path or a URL (gs://, s3://...).",
    ),
    out_dir: str = typer.Option(
        ..., "--out", "-o", help="Run folder for the model, metrics and logs (a local path or a URL)."
    ),
    resume: bool = typer.Option(True, help="finetune: continue an interrupted run from its checkpoint."),
    cache_dir: Optional[str] = typer.Option(
        None, help=escape("Feature cache, a local folder (also holds copies of remote TFRecord data and runs, and the "
        "photos finetune keeps) [default: $FLORIST_CACHE "
        "or the user cache folder].")
    ),
    overwrite: bool = typer.Option(False, help="Replace a finished run in --out."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json to stdout."),
    quiet: bool = Quiet,
    *,
    settings: dict[str, Any],
) -> None:
    """Train a classifier on DATA_DIR and save it in --out (prepare runs first).

    Every training setting is an option; see the README for the modes and their defaults.
    """
    from . import remote
    from .distributed import launch_rank
    from .runfiles import METRICS_JSON, REPORT_HTML
    from .training import TrainConfig, resolve

    config = resolve(TrainConfig(**settings))  # a bad setting stops here, before torch is busy
    main_process = launch_rank() == 0  # under torchrun only rank 0 reports
    _setup_logging(quiet or not main_process)
    from .training.pipeline import train as run_train

    run_train(data_dir, out_dir, config, cache_dir=cache_dir, overwrite=overwrite, resume=resume, verbose=not quiet)
    if not main_process:
        return
    metrics = json.loads(remote.read_bytes(remote.join(out_dir, METRICS_JSON)))
    if json_out:
        _print_json(metrics)
    elif "top1" in metrics:
        _print_metrics(metrics)
    if not quiet and not json_out:
        out.print(f"report: {remote.join(out_dir, REPORT_HTML)}", highlight=False)


@app.command()
@friendly_errors
def evaluate(
    run_dir: str = typer.Argument(..., help="A trained run folder (a local path or a URL)."),
    data_dir: Optional[str] = typer.Argument(
        None, help="Folder of class folders, path or URL [default: the run's eval split]."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
    engine: str = Engine,
    quiet: bool = Quiet,
) -> None:
    """Top-1/top-5, per-class precision/recall/F1 and the confusion matrix on labelled photos."""
    from .evaluate import evaluate as run_evaluate
    from .progress import progress_bar

    _setup_logging(quiet)
    with progress_bar("Evaluating", enabled=not quiet and not json_out) as bar:
        metrics = run_evaluate(run_dir, data_dir, engine=engine, progress=bar)
    if json_out:
        _print_json(metrics)
    else:
        _print_metrics(metrics)


@app.command()
@friendly_errors
def predict(
    run_dir: str = typer.Argument(
        ..., help="A trained run folder, or a model exported with `florist export` (.onnx or .xml; local path or URL)."
    ),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or glob patterns (local or URLs)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Classes to show per image."),
    json_out: bool = typer.Option(False, "--json", help="JSON lines: one object per image."),
    csv_out: bool = typer.Option(
        False, "--csv", help="CSV: path, rank, label, probability, error, ood_score, unknown."
    ),
    ood_threshold: Optional[float] = OodThreshold,
    engine: str = Engine,
    quiet: bool = Quiet,
) -> None:
    """Classify images; unreadable files get an error entry and exit status 1. An exported model runs without torch.

    A run folder also scores how unlike its training classes each image is (ood_score) and
    answers "unknown" above its threshold; exported files give the classes only.
    """
    from .loader import load

    _setup_logging(quiet)
    model = load(run_dir, engine=engine)
    predictions = model.predict(inputs, top_k=top_k, ood_threshold=ood_threshold)
    if json_out:
        for p in predictions:
            sys.stdout.write(json_text(p.to_dict()) + "\n")
    elif csv_out:
        rows = []
        for p in predictions:
            if p.error:
                rows.append([p.path, "", "", "", p.error, "", ""])
            ood = ["" if p.ood_score is None else f"{p.ood_score:.6g}", "" if p.unknown is None else p.unknown]
            for rank, (label, prob) in enumerate(zip(p.labels, p.probabilities), 1):
                rows.append([p.path, rank, label, f"{prob:.6f}", "", *ood])
        write_csv(sys.stdout, ["path", "rank", "label", "probability", "error", "ood_score", "unknown"], rows)
    else:
        table = Table("image", "top classes")
        for p in predictions:
            text = p.error and f"[red]{escape(p.error)}[/red]" or ", ".join(
                f"{escape(label)} {prob:.1%}" for label, prob in zip(p.labels, p.probabilities)
            )
            if p.unknown:
                text = f"[yellow]unknown[/yellow] (unlike the training photos; nearest: {text})"
            table.add_row(escape(p.path), text)
        out.print(table)
    if any(p.error for p in predictions):
        raise typer.Exit(1)


@app.command()
@friendly_errors
def explain(
    run_dir: str = typer.Argument(..., help="A trained run folder (local path or URL); exported files have no gradients."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or glob patterns (local or URLs)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the overlays: one <image name>.png per image."),
    label: Optional[str] = typer.Option(None, help="Show where the network saw this class [default: its answer]."),
    json_out: bool = typer.Option(False, "--json", help="JSON lines: one object per image."),
    quiet: bool = Quiet,
) -> None:
    """Grad-CAM heatmaps: where in each image the network found its answer, as overlay PNGs; unreadable files exit 1."""
    from .explain import Explainer
    from .progress import progress_bar

    _setup_logging(quiet)
    explainer = Explainer.from_run(run_dir)
    with progress_bar("Explaining", enabled=not quiet and not json_out) as bar:
        heatmaps = explainer.explain(inputs, out_dir, target=label, progress=bar)
    if json_out:
        for h in heatmaps:
            sys.stdout.write(json_text(h.to_dict()) + "\n")
    else:
        table = Table("image", "label", "probability", "heatmap")
        for column in (table.columns[0], table.columns[3]):
            column.overflow = "fold"  # a path is never cut short
        for h in heatmaps:
            if h.error:
                table.add_row(escape(h.path), f"[red]{escape(h.error)}[/red]", "", "")
                continue
            shown = h.label if h.target == h.label else f"{h.label} (heat: {h.target} {h.target_probability:.1%})"
            table.add_row(escape(h.path), escape(shown), f"{h.probability:.1%}", escape(str(h.png)))
        out.print(table)
    if any(h.error for h in heatmaps):
        raise typer.Exit(1)


@app.command()
@friendly_errors
def download(
    dest: Optional[Path] = typer.Option(None, help="Folder to keep datasets in [default: $FLORIST_DATA or user cache]."),
    quiet: bool = Quiet,
) -> None:
    """Download flower_photos (3,670 photos, 5 classes), verify its SHA-256, extract safely; print its path."""
    from .download import download as run_download
    from .progress import progress_bar

    with progress_bar("Downloading flower_photos", enabled=not quiet, unit="bytes") as bar:
        folder = run_download(dest=dest, progress=bar)
    out.print(str(folder), highlight=False, markup=False)


@app.command()
@friendly_errors
def audit(
    data_dir: Path = typer.Argument(..., help="Folder of class folders."),
    json_out: bool = typer.Option(False, "--json", help="Print the full audit as JSON."),
    near_distance: int = typer.Option(
        8, help="Perceptual-hash distance (0-64) at or below which two pictures are near duplicates; -1: off."
    ),
    min_side: int = typer.Option(112, help="Report images whose shorter side is below this many pixels."),
    limit: int = typer.Option(10, help="Rows shown per kind of problem (--json lists all)."),
    labels: bool = typer.Option(
        False, "--labels", help="Also find suspect labels: out-of-fold heads on cached features, ranked by cleanlab."
    ),
    folds: int = typer.Option(5, help="With --labels: parts the photos are split into for the heads."),
    backbone: str = typer.Option("efficientnet_lite0", help="With --labels: the network whose features they use."),
    weights: Optional[str] = typer.Option(None, help="With --labels: that network's weights file (as train takes it)."),
    engine: str = typer.Option("auto", help="With --labels: auto, openvino, onnxruntime or torch."),
    quiet: bool = Quiet,
) -> None:
    """Check a photo folder: class balance, unusable/odd files, duplicates, label conflicts, tiny images, suspect labels."""
    from .audit import audit as run_audit
    from .progress import progress_bar

    _setup_logging(quiet)
    bars = not quiet and not json_out
    with progress_bar("Auditing images", enabled=bars) as bar, progress_bar("Features", enabled=bars and labels) as fbar:
        report = run_audit(
            data_dir, near_distance=near_distance, min_side=min_side, labels=labels, folds=folds,
            backbone=backbone, weights=weights, engine=engine, progress=bar, labels_progress=fbar,
        )
    if json_out:
        _print_json(report.to_dict())
    else:
        _print_audit(report, limit)


@app.command()
@friendly_errors
def export(
    run_dir: Path = typer.Argument(..., help="A trained run folder."),
    out_file: Path = typer.Option(..., "--out", "-o", help="File to write, e.g. model.onnx."),
    format: str = typer.Option(
        "onnx", "--format", "-f", help="onnx, torchscript, openvino (NAME.xml + NAME.bin) or tflite."
    ),
    quantize: Optional[str] = typer.Option(
        None,
        help="int8 (onnx, tflite) or fp16 (tflite); reports the file's top-1 against the run's on its eval split.",
    ),
    check_images: int = typer.Option(16, help="Real images (from the run's manifests) for the parity check."),
    eval_limit: Optional[int] = typer.Option(
        None, help="Evaluate a quantized or TFLite file on at most this many eval images."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the export report as JSON."),
    quiet: bool = Quiet,
) -> None:
    """Write backbone + head as one ONNX, TorchScript, OpenVINO or TFLite file (labels and preprocessing inside)."""
    from .export import evaluates
    from .export import export as run_export
    from .progress import progress_bar

    _setup_logging(quiet)
    shown = evaluates(format, quantize) and not quiet and not json_out
    with progress_bar("Evaluating the file and the run", enabled=shown) as bar:
        report = run_export(
            run_dir, out_file, format=format, quantize=quantize, check_images=check_images, eval_limit=eval_limit,
            progress=bar,
        )
    if json_out:
        _print_json(report.to_dict())
    elif not quiet:
        for line in report.summary():
            out.print(line, highlight=False)


@app.command()
@friendly_errors
def report(
    run_dir: Path = typer.Argument(..., help="A trained run folder."),
    quiet: bool = Quiet,
) -> None:
    """(Re)write RUN_DIR/report.html, confusion_matrix.png and curves.png from the run's files."""
    from .report import write_report

    _setup_logging(quiet)
    path = write_report(run_dir)
    if not quiet:
        out.print(str(path), highlight=False)


def _print_audit(report: Any, limit: int) -> None:
    """Per-class counts, one table row per problem (at most ``limit`` of each kind), then the warnings.

    Names and reasons are escaped: a file named ``[/x].jpg`` is printed, not taken for markup.
    """
    out.print(
        f"{escape(report.root)}: {report.n_images} usable images in {len(report.classes)} classes "
        f"({report.n_files} files)",
        highlight=False,
    )
    counts = Table("class", "images", "share")
    for name, n in report.classes.items():
        counts.add_row(escape(name), str(n), f"{n / max(1, report.n_images):.1%}")
    out.print(counts)
    rows: list[tuple[str, str, str]] = []

    def add(kind: str, found: list[Any], row: Callable[[Any], tuple[str, str]]) -> None:
        rows.extend((kind, *row(x)) for x in found[:limit])
        if len(found) > limit:
            rows.append((kind, f"... {len(found) - limit} more (--json lists all)", ""))

    same = [g for g in report.exact_duplicates if len(set(g.classes)) == 1]
    add("label conflict", report.label_conflicts, lambda g: ("\n".join(g.paths), "same bytes, two classes"))
    add("exact duplicate", same, lambda g: ("\n".join(g.paths), "same bytes"))
    add("near duplicate", report.near_duplicates, lambda n: ("\n".join(n.paths), f"distance {n.distance}"))
    add("unusable", report.unreadable, lambda f: (f.path, f.reason))
    add("odd file", report.odd, lambda f: (f.path, f.reason))
    add("tiny", report.tiny, lambda t: (t.path, f"{t.width}x{t.height} px"))
    add(
        "suspect label",
        report.label_issues,
        lambda i: (i.path, f"filed as {i.given}, looks like {i.suggested} (p({i.given}) = {i.score:.2f})"),
    )
    if rows:
        table = Table("problem", "file(s)", "detail")
        table.columns[1].overflow = "fold"  # a path is never cut short
        for row in rows:
            table.add_row(*map(escape, row))
        out.print(table)
    for message in report.warnings:
        out.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)
    if not report.warnings:
        out.print("no problems found")


@app.command()
@friendly_errors
def serve(
    model: Path = typer.Argument(..., help="A trained run folder, or an exported .onnx (ONNX Runtime) or .xml (OpenVINO) file."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_mb: float = typer.Option(20.0, help="Largest accepted request body, in megabytes."),
    ood_threshold: Optional[float] = OodThreshold,
    engine: str = Engine,
    quiet: bool = Quiet,
) -> None:
    """Serve a model over HTTP: POST /predict, GET /labels, GET /health, a web page at / and docs at /docs."""
    from .serve import serve as run_serve

    _setup_logging(quiet)
    level = "warning" if quiet else "info"
    run_serve(
        model, host=host, port=port, max_bytes=int(max_mb * 1e6), log_level=level, engine=engine,
        ood_threshold=ood_threshold,
    )  # fmt: skip


def _print_metrics(metrics: dict[str, Any]) -> None:
    """Summary line, per-class table and confusion matrix."""
    out.print(
        f"top-1 {metrics['top1']:.2%}   top-5 {metrics['top5']:.2%}   ECE {metrics['ece']:.3f}   on {metrics['n']} images"
    )
    table = Table("class", "precision", "recall", "f1", "support")
    for name, m in metrics["per_class"].items():
        table.add_row(escape(name), f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    out.print(table)
    cm = Table("true \\ predicted", *map(escape, metrics["classes"]))
    for name, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        cm.add_row(escape(name), *map(str, row))
    out.print(cm)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        # Everything is written and closed by now. Freezing the heap spares the interpreter's
        # last garbage collection a walk over torch's and timm's objects: 1.3 s of exit time
        # after a warm `florist train`, measured on this 2-core CPU.
        gc.freeze()
