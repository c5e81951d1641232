"""Feature-extraction speed: florist's pipeline per engine, against the machine's limits and a naive baseline.

Everything is measured in one run, on one machine, so the ratios compare like with like:

(a) decode + resize alone (florist's dataset, no model): one core, and with the
    DataLoader workers extraction uses;
(b) the model's forward pass alone on ready tensors, for every engine x precision
    (torch, OpenVINO, ONNX Runtime; fp32, and bf16 where the CPU has it) at the best
    of several batch sizes: the compute limit;
(c) ``florist.features.extract_features`` into an empty cache, for the same
    combinations; "default" is what ``florist train`` picks (``--engine auto
    --precision auto``);
(d) the naive baseline: a DataLoader over PIL + torchvision transforms, fp32 torch
    forward, batch 64, 2 workers;

then the shared-core ceiling ``cores / (cores / b_best + 1 / a)`` from the best
engine and the ratio c/ceiling, both from ``--rounds`` rounds of a, b and c measured
back to back (the median round: the machine drifts within minutes), the ratio c/d,
head-mode top-1 of every combination by 5-fold cross-validation over all the photos
(the 0.3-point rule), wall times of ``florist train`` cold (empty cache) and warm for
``--mode head`` and the default mode, with ``--engine auto`` and ``--engine torch`` (and the default mode's top-1 on
the fixed split with torch fp32), and the peak resident memory of extraction.
Throughput figures are the median of ``--repeats`` timed runs after a warm-up.

Writes ``bench/results/speed.json`` and refreshes the table in README.md between
its ``speed-table`` markers.

    python bench/speed.py                      # the full run (a quiet machine, please)
    python bench/speed.py --quick              # a small subset, to check the script works
    python bench/speed.py --table-only         # rebuild the README table from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from readme_table import update_readme  # bench/readme_table.py
from torch.utils.data import DataLoader, Dataset

import florist
from florist.backbones import DEFAULT_BACKBONE, Backbone, create_backbone, resolve_spec
from florist.data import class_files, find_class_folders
from florist.devices import bf16_is_fast
from florist.engines import compile_frozen, engine_problem, resolve_engine
from florist.errors import FloristError
from florist.features import (
    FeatureCache,
    _ImageFiles,
    default_workers,
    extract_features,
    extract_views,
    feature_key,
)
from florist.predict import average_probabilities
from florist.training import TrainConfig
from florist.training.linear import fit_head

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flower_photos"
OUT = ROOT / "bench" / "results" / "speed.json"
BATCH_SIZES = (8, 16, 32, 64, 128)
#: The naive baseline's settings (the issue's measurement: batch 64, 2 workers).
NAIVE_BATCH, NAIVE_WORKERS = 64, 2
CORES = os.cpu_count() or 1


def list_images(data: Path, limit: int | None = None) -> list[Path]:
    """The files of ``data/<class>/`` in florist's order, spread over the classes when limited."""
    folders = find_class_folders(data)
    paths = [path for _, path in class_files(data, folders, list(folders))]
    if limit and limit < len(paths):
        step = len(paths) / limit
        paths = [paths[int(i * step)] for i in range(limit)]
    return paths


def timed_rate(run: Callable[[], int], repeats: int, warmup: bool = True) -> dict:
    """Images/s of ``run`` (which returns how many images it processed): median of ``repeats``."""
    if warmup:
        run()
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - started))
    return {"images_per_s": round(statistics.median(rates), 2), "runs": [round(r, 2) for r in rates]}


def backbone_for(
    engine: str, bf16: bool, backbone: str = DEFAULT_BACKBONE, weights: str | None = None
) -> Backbone:
    """``backbone`` (default: florist's) on ``engine`` in the given precision."""
    net = create_backbone(backbone, weights)
    net.engine, net.bf16 = engine, bf16
    return net


def combinations() -> list[tuple[str, bool]]:
    """Every (engine, bf16) this machine runs: bf16 only where the CPU has it natively, never on ONNX Runtime."""
    precisions = [False, True] if bf16_is_fast() else [False]
    combos = [(e, b) for e in ("torch", "openvino") for b in precisions if engine_problem(e) is None]
    return combos + ([("onnxruntime", False)] if engine_problem("onnxruntime") is None else [])


def combo_name(engine: str, bf16: bool) -> str:
    return f"{engine} {'bf16' if bf16 else 'fp32'}"


def default_combo() -> tuple[str, bool]:
    """What ``florist train`` picks on this machine: ``--engine auto --precision auto``."""
    engine = resolve_engine("auto", torch.device("cpu"))
    return engine, bf16_is_fast() and engine != "onnxruntime"


# ---------------------------------------------------------------------------
# (a) decode + resize
# ---------------------------------------------------------------------------


def decode_rate(paths: Sequence[Path], backbone: Backbone, workers: int, repeats: int) -> dict:
    """Images/s of florist's read + draft decode + resize + crop, without the model."""
    dataset = _ImageFiles([str(p) for p in paths], backbone.data_config, ["clean"])

    def run() -> int:
        loader = DataLoader(dataset, batch_size=NAIVE_BATCH, num_workers=workers)
        return sum(len(idx) for idx, *_ in loader)

    return {"workers": workers, **timed_rate(run, repeats)}


# ---------------------------------------------------------------------------
# (b) the compute limit
# ---------------------------------------------------------------------------


def forward_rate(backbone: Backbone, batch_size: int, batches: int, repeats: int) -> dict:
    """Images/s of the engine's forward pass alone on a ready, normalised batch."""
    side = backbone.data_config["input_size"][-1]
    x = torch.randn(batch_size, 3, side, side)
    net = compile_frozen(backbone.model, [x[:1]], backbone.engine, bf16=backbone.bf16)

    def run() -> int:
        for _ in range(batches):
            net(x)
        return batch_size * batches

    return {"batch_size": batch_size, **timed_rate(run, repeats)}


def compute_limit(backbone: Backbone, batch_sizes: Sequence[int], images: int, repeats: int) -> dict:
    """:func:`forward_rate` at each batch size (about ``images`` per timed run); the best one."""
    by_batch = [forward_rate(backbone, b, max(1, images // b), repeats) for b in batch_sizes]
    best = max(by_batch, key=lambda r: r["images_per_s"])
    return {**best, "by_batch_size": by_batch}


# ---------------------------------------------------------------------------
# (c) florist's extraction
# ---------------------------------------------------------------------------


def florist_rate(paths: Sequence[Path], backbone: Backbone, repeats: int, cache_root: Path) -> dict:
    """Images/s of ``extract_features`` with its defaults, each run into a new, empty cache."""
    key = feature_key(backbone)
    counter = iter(range(1_000_000))
    computed = []

    def run() -> int:
        cache = FeatureCache(cache_root / f"cold-{next(counter)}", key)
        computed.append(extract_features(backbone, paths, cache=cache).computed)
        return len(paths)

    rate = timed_rate(run, repeats)
    # Fewer than len(paths) only for byte-identical copies, served from the cache once their twin is in.
    return {**rate, "images": len(paths), "network_images": computed[-1]}


def ratio_rounds(
    paths: Sequence[Path], default: Backbone, best: Backbone, best_batch: int, rounds: int, images: int, work: Path
) -> dict:
    """a, b (the best engine at its best batch) and c (the default), measured back to back ``rounds`` times.

    This machine's speed drifts by 15% or more within minutes (it is shared), so a
    ratio of figures taken minutes apart says more about the drift than about the
    pipeline. Each round's ratio c/ceiling uses that round's own a and b; the
    summary keeps the median round.
    """
    out = []
    for k in range(rounds):
        a = decode_rate(paths, default, 0, 1)["images_per_s"]
        b = forward_rate(best, best_batch, max(1, images // best_batch), 1)["images_per_s"]
        c = florist_rate(paths, default, 1, work / f"round-{k}")["images_per_s"]
        ceiling = CORES / (CORES / b + 1 / a)
        out.append({"a": a, "b": b, "c": c, "ceiling": round(ceiling, 2), "c_over_ceiling": round(c / ceiling, 3)})
    return {"images": len(paths), "best_batch_size": best_batch, "rounds": out}


def feature_agreement(paths: Sequence[Path], a: Backbone, b: Backbone) -> dict:
    """How close two combinations' features are: cosine similarity and relative L2 error per image."""
    fa = extract_features(a, paths).features
    fb = extract_features(b, paths).features
    norms = np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1)
    cosine = (fa * fb).sum(axis=1) / np.maximum(norms, 1e-12)
    rel = np.linalg.norm(fa - fb, axis=1) / np.maximum(np.linalg.norm(fb, axis=1), 1e-12)
    return {
        "images": len(paths),
        "min_cosine": round(float(cosine.min()), 5),
        "mean_relative_l2": round(float(rel.mean()), 5),
        "max_relative_l2": round(float(rel.max()), 5),
    }


def top1_cv(paths: Sequence[Path], backbones: dict[str, Backbone], cache_root: Path, folds: int = 5, seed: int = 0) -> dict:
    """Head-mode top-1 with each combination's features, by stratified k-fold cross-validation.

    Every photo is scored once, by a head (default settings: clean + mirror views,
    mirror TTA) trained on the other folds, so 1,500 photos resolve differences of
    0.07 points where the 300-photo eval split of bench/accuracy.py resolves 0.33.
    """
    from sklearn.model_selection import StratifiedKFold

    classes = sorted({p.parent.name for p in paths})
    y = np.array([classes.index(p.parent.name) for p in paths])
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    result: dict = {"folds": folds, "images": len(paths)}
    for name, backbone in backbones.items():
        views = extract_views(backbone, paths, ["clean", "flip"], cache_root=cache_root, seed=seed)
        clean, flip = views["clean"].features, views["flip"].features
        correct = np.zeros(len(y), dtype=bool)
        for train, test in splits:
            x = np.concatenate([clean[train], flip[train]])
            head, _ = fit_head(x, np.concatenate([y[train], y[train]]), len(classes), TrainConfig(seed=seed))
            correct[test] = average_probabilities(head, [clean[test], flip[test]]).argmax(1) == y[test]
        result[name] = {"top1": round(float(correct.mean()), 5)}
    reference = result["torch fp32"]["top1"]
    for name in backbones:
        result[name]["points_vs_torch_fp32"] = round(100 * (result[name]["top1"] - reference), 2)
    return result


# ---------------------------------------------------------------------------
# (d) the naive baseline
# ---------------------------------------------------------------------------


class _NaiveImages(Dataset):
    """What a plain PyTorch script does: PIL open + convert, torchvision's eval transform."""

    def __init__(self, paths: Sequence[Path], data_config: dict):
        from torchvision import transforms as T

        side = data_config["input_size"][-1]
        self.paths = list(paths)
        self.transform = T.Compose(
            [
                T.Resize(int(side / data_config["crop_pct"]), interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(side),
                T.ToTensor(),
                T.Normalize(data_config["mean"], data_config["std"]),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def naive_rate(
    paths: Sequence[Path], repeats: int, backbone: Backbone | None = None, workers: int = NAIVE_WORKERS
) -> dict:
    """Images/s of the naive pipeline: plain timm model, fp32, no channels_last, ``no_grad``."""
    backbone = backbone or create_backbone()
    model = copy.deepcopy(backbone.model).to(memory_format=torch.contiguous_format)
    loader = DataLoader(_NaiveImages(paths, backbone.data_config), batch_size=NAIVE_BATCH, num_workers=workers)

    def run() -> int:
        n = 0
        with torch.no_grad():
            for x in loader:
                model(x)
                n += len(x)
        return n

    return {"batch_size": NAIVE_BATCH, "workers": workers, **timed_rate(run, repeats)}


# ---------------------------------------------------------------------------
# end to end and memory
# ---------------------------------------------------------------------------


def _backbone_flags(backbone: str, weights: str | None) -> list[str]:
    """``--backbone``/``--weights`` flags, shared by ``florist train`` and this script."""
    return ["--backbone", backbone, *(["--weights", weights] if weights else [])]


def train_wall_times(
    data: Path, work: Path, mode: str, flags: Sequence[str], warm_repeats: int,
    backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
) -> dict:
    """Wall seconds of ``florist train DATA --mode MODE FLAGS`` as a user runs it, cold (empty cache) then warm."""
    env = {**os.environ, "FLORIST_CACHE": str(work / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "florist", "train", str(data), "--out", str(work / "run")]
    command += ["--mode", mode, *flags, "--overwrite", "--quiet", *_backbone_flags(backbone, weights)]

    def once() -> tuple[float, dict]:
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started, json.loads((work / "run" / "metrics.json").read_text())

    cold, metrics = once()
    warm = [once()[0] for _ in range(warm_repeats)]
    return {
        "flags": " ".join(flags),
        "cold_s": round(cold, 2),
        **({"warm_s": round(statistics.median(warm), 2), "warm_runs_s": [round(w, 2) for w in warm]} if warm else {}),
        "top1": metrics["top1"],
        "cold_timings_s": {k: round(v, 1) for k, v in metrics["timings"].items()},
        "n_images": metrics["n_train"] + metrics["n_eval"],
    }


def train_runs(args: argparse.Namespace, work: Path, log: Callable[[str, object], None]) -> dict:
    """``florist train`` cold and warm: head and the default mode, ``--engine auto`` against ``--engine torch``."""
    runs: dict = {}
    plan = [
        ("head", "auto", ["--engine", "auto"], 3),
        ("head", "torch", ["--engine", "torch"], 3),
        ("default", "auto", ["--engine", "auto"], 1),
        ("default", "torch", ["--engine", "torch"], 0),
        ("default", "torch fp32", ["--engine", "torch", "--precision", "fp32"], 0),
    ]
    from florist.training.registry import DEFAULT_MODE

    for mode, name, flags, warm in plan:
        if "fp32" in name and (not bf16_is_fast() or args.skip_fp32_train):
            continue  # the torch run above is fp32 already, or not asked for
        key = f"{mode} ({name})"
        real_mode = DEFAULT_MODE if mode == "default" else mode
        runs[key] = {
            "mode": real_mode,
            **train_wall_times(args.data, work / key.replace(" ", "-"), real_mode, flags, warm, args.backbone, args.weights),
        }
        log(f"train {key}", runs[key])
    return runs


def peak_rss_child(paths: Sequence[Path], backbone: str = DEFAULT_BACKBONE, weights: str | None = None) -> dict:
    """Extract features for ``paths`` (no cache: every copy goes through the network); peak RSS in MiB.

    ``ru_maxrss`` is in KiB on Linux; the DataLoader workers are children of this process.
    """
    extract_features(backbone_for(*default_combo(), backbone, weights), paths)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"images": len(paths), "main_mib": round(own, 1), "worker_mib": round(workers, 1)}


def peak_rss(
    data: Path, limit: int | None, copies: int, backbone: str = DEFAULT_BACKBONE, weights: str | None = None
) -> dict:
    """:func:`peak_rss_child` in a fresh process for the image list repeated ``copies`` times."""
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(copies), "--data", str(data)]
    command += _backbone_flags(backbone, weights)
    if limit:
        command += ["--images", str(limit)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return {"copies": copies, **json.loads(out.strip().splitlines()[-1])}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def summarise(r: dict, cores: int) -> dict:
    """The ratios the issue asks for, from the best engine's limit.

    When decoding and the model share the same ``cores``, each image costs
    ``cores / b`` core-seconds of forward pass plus ``1 / a`` of decoding (a = the
    one-core decode rate), so no pipeline exceeds ``cores / (cores / b + 1 / a)``
    images/s; b is the best engine x precision's forward-only rate.
    """
    best_name, best = max(r["compute_limit"].items(), key=lambda kv: kv[1]["images_per_s"])
    b = best["images_per_s"]
    c = r["florist"][r["default"]]["images_per_s"]
    ceiling = cores / (cores / b + 1 / r["decode"]["one_core"]["images_per_s"])
    if "ratio_rounds" in r:  # the median of rounds measured back to back (see ratio_rounds)
        rounds = sorted(r["ratio_rounds"]["rounds"], key=lambda x: x["c_over_ceiling"])
        median = rounds[len(rounds) // 2]
        c, b, ceiling = median["c"], median["b"], median["ceiling"]
    out = {
        "default": r["default"],
        "c_images_per_s": c,
        "b_best": best_name,
        "b_best_images_per_s": b,
        "cores": cores,
        "shared_core_ceiling_images_per_s": round(ceiling, 2),
        "c_over_ceiling": round(c / ceiling, 3),
        "c_over_d": round(c / r["naive"]["images_per_s"], 2),
        **({"c_over_ceiling_rounds": [x["c_over_ceiling"] for x in r["ratio_rounds"]["rounds"]]} if "ratio_rounds" in r else {}),
    }
    train = r.get("train", {})
    for mode in ("head", "default"):
        auto, torch_run = train.get(f"{mode} (auto)"), train.get(f"{mode} (torch)")
        if auto and torch_run:
            out[f"{mode}_cold_auto_over_torch"] = round(auto["cold_s"] / torch_run["cold_s"], 3)
    return out


def table(report: dict) -> str:
    """Markdown table for the README."""
    r, s = report["results"], report["summary"]
    a, b, c = r["decode"], r["compute_limit"], r["florist"]
    rows = [
        ("(a) decode + resize, 1 core", f"{a['one_core']['images_per_s']:.0f} images/s"),
        (f"(a) decode + resize, {a['pipeline']['workers']} workers", f"{a['pipeline']['images_per_s']:.0f} images/s"),
    ]
    rows += [(f"(b) forward only, {name} (batch {v['batch_size']})", f"{v['images_per_s']:.0f} images/s") for name, v in b.items()]
    for name, v in c.items():
        label = f"(c) florist extraction, {name}"
        rows.append((f"**{label} (default)**", f"**{v['images_per_s']:.0f} images/s**") if name == s["default"] else (label, f"{v['images_per_s']:.0f} images/s"))
    rows += [
        ("(d) naive DataLoader + PIL + torchvision, torch fp32", f"{r['naive']['images_per_s']:.0f} images/s"),
        (
            f"ceiling when decoding shares the {s['cores']} cores, from the best engine ({s['b_best']})",
            f"{s['shared_core_ceiling_images_per_s']:.0f} images/s; the default reaches {s['c_over_ceiling']:.0%} of it"
            + (f" (median of {len(s['c_over_ceiling_rounds'])} back-to-back rounds)" if "c_over_ceiling_rounds" in s else ""),
        ),
        ("c / d (default vs naive)", f"{s['c_over_d']:.2f}x"),
    ]
    for key, t in r.get("train", {}).items():
        mode = "the default mode" if key.startswith("default") else "--mode head"
        engine = key[key.index("(") + 1 : -1]
        times = t["cold_timings_s"]
        detail = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in times.items() if k != "total_s" and v >= 0.5)
        rows.append((f"`florist train`, {mode} ({t['mode']}), {engine}, cold", f"{t['cold_s']:.0f} s ({detail}); top-1 {t['top1']:.2%}"))
        if "warm_s" in t:
            rows.append((f"`florist train`, {mode}, {engine}, warm", f"{t['warm_s']:.1f} s"))
    for mode in ("head", "default"):
        if f"{mode}_cold_auto_over_torch" in s:
            rows.append((f"cold {mode} train, --engine auto / --engine torch", f"{s[f'{mode}_cold_auto_over_torch']:.2f}"))
    for m in r.get("peak_rss", []):
        rows.append(
            (
                f"peak RSS, extraction of {m['images']} images",
                f"{m['main_mib']:.0f} MiB (+ workers {m['worker_mib']:.0f} MiB)",
            )
        )
    if "top1_cv" in r:
        cv = r["top1_cv"]
        names = [n for n in cv if isinstance(cv[n], dict)]
        rows.append(
            (
                f"head-mode top-1, {cv['folds']}-fold CV over {cv['images']} photos",
                "; ".join(f"{n} {cv[n]['top1']:.2%} ({cv[n]['points_vs_torch_fp32']:+.2f})" for n in names),
            )
        )
    lines = ["| measurement | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def log_progress(what: str, value: object) -> None:
    """One measurement as a progress line on stderr."""
    print(f"{what}: {json.dumps(value)}", file=sys.stderr, flush=True)


def measure_rounds(
    args: argparse.Namespace, results: dict, combos: dict[str, Backbone], default: Backbone, paths: Sequence[Path], work: Path
) -> dict:
    """:func:`ratio_rounds` for the best engine of ``results["compute_limit"]``; b from 4x ``--forward-images`` (a second or more)."""
    best_name, best = max(results["compute_limit"].items(), key=lambda kv: kv[1]["images_per_s"])
    return ratio_rounds(paths, default, combos[best_name], best["batch_size"], args.rounds, 4 * args.forward_images, work)


def measure(args: argparse.Namespace, paths: list[Path], work: Path) -> dict:
    """Run every measurement in turn; progress lines go to stderr."""
    log = log_progress

    combos = {combo_name(e, b): backbone_for(e, b, args.backbone, args.weights) for e, b in combinations()}
    default_name = combo_name(*default_combo())
    default = combos[default_name]
    results: dict = {"default": default_name}
    workers = default_workers(len(paths))
    results["decode"] = {
        "one_core": decode_rate(paths, default, 0, args.repeats),
        "pipeline": decode_rate(paths, default, workers, args.repeats),
    }
    log("decode", results["decode"])
    results["compute_limit"] = {
        name: compute_limit(b, args.batch_sizes, args.forward_images, args.repeats) for name, b in combos.items()
    }
    log("compute limit", results["compute_limit"])
    subset = paths[: args.extract_images]
    results["florist"] = {name: florist_rate(subset, b, args.repeats, work) for name, b in combos.items()}
    log("florist", results["florist"])
    results["ratio_rounds"] = measure_rounds(args, results, combos, default, subset, work / "rounds")
    log("ratio rounds", results["ratio_rounds"])
    results["features_vs_torch_fp32"] = {
        name: feature_agreement(paths[: args.agreement_images], b, combos["torch fp32"]) for name, b in combos.items()
    }
    log("features vs torch fp32", results["features_vs_torch_fp32"])
    results["top1_cv"] = top1_cv(paths, combos, work / "cv-cache")
    log("head top-1 by engine and precision (cross-validation)", results["top1_cv"])
    results["naive"] = naive_rate(subset, args.repeats, default)
    log("naive", results["naive"])
    if not args.skip_train:
        results["train"] = train_runs(args, work / "train", log)
    if not args.skip_rss:
        results["peak_rss"] = [peak_rss(args.data, args.images, k, args.backbone, args.weights) for k in (1, 4)]
        log("peak RSS", results["peak_rss"])
    return results


def remeasure(args: argparse.Namespace, part: str) -> None:
    """Measure one part of the results again (``ratio_rounds`` or ``train``), keep the rest of ``--out``, rebuild summary and table."""
    report = json.loads(args.out.read_text())
    results = report["results"]
    with tempfile.TemporaryDirectory(prefix="florist-speed-") as tmp:
        if part == "train":
            results["train"] = train_runs(args, Path(tmp), log_progress)
        else:
            combos = {combo_name(e, b): backbone_for(e, b, args.backbone, args.weights) for e, b in combinations()}
            subset = list_images(args.data, args.images)[: args.extract_images]
            results[part] = measure_rounds(args, results, combos, combos[results["default"]], subset, Path(tmp))
    report.setdefault("remeasured", {})[part] = time.strftime("%Y-%m-%d %H:%M")
    report["summary"] = summarise(results, report["machine"]["cpus"])
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.out.resolve() == OUT:  # the README shows the committed results only
        update_readme("speed-table", table(report), ROOT / "README.md")
    print(table(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--images", type=int, default=None, help="use only this many photos (default: all)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="network to measure (as florist train)")
    parser.add_argument("--weights", default=None, help="its weights file (as florist train)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is kept)")
    parser.add_argument("--rounds", type=int, default=7, help="back-to-back rounds of a, b and c for c/ceiling")
    parser.add_argument("--forward-images", type=int, default=256, help="images per timed forward-only run")
    parser.add_argument("--agreement-images", type=int, default=128, help="photos to compare features with torch fp32's on")
    parser.add_argument("--extract-images", type=int, default=600, help="photos per timed extraction run (c, d)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(BATCH_SIZES))
    parser.add_argument("--quick", action="store_true", help="96 photos, 1 repeat, no train/RSS; not for results")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-fp32-train", action="store_true", help="no cold default-mode run with torch fp32 (10 minutes)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rounds-only", action="store_true", help="re-measure the back-to-back rounds only; the rest of --out is kept")
    parser.add_argument("--train-only", action="store_true", help="re-measure the florist train runs only; the rest of --out is kept")
    parser.add_argument("--table-only", action="store_true", help="recompute the ratios in --out and rebuild the README table")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:  # a bad --backbone or --weights is one line, before any measurement
        resolve_spec(args.backbone, args.weights)
    except FloristError as e:
        raise SystemExit(f"error: {e}") from None
    if args.rss_child:
        paths = list_images(args.data, args.images) * args.rss_child
        print(json.dumps(peak_rss_child(paths, args.backbone, args.weights)))
        return
    if args.table_only:
        report = json.loads(args.out.read_text())
        report["summary"] = summarise(report["results"], report["machine"]["cpus"])  # current ratios
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        update_readme("speed-table", table(report), ROOT / "README.md")
        return
    if not args.data.is_dir():
        raise SystemExit(f"data not found: {args.data}")
    if args.rounds_only or args.train_only:
        remeasure(args, "ratio_rounds" if args.rounds_only else "train")
        return
    if args.quick:
        args.images, args.repeats, args.forward_images = args.images or 96, 1, 64
        args.batch_sizes, args.skip_train, args.skip_rss = [16, 32], True, True
        args.agreement_images, args.extract_images, args.rounds = 16, 96, 1
    paths = list_images(args.data, args.images)
    with tempfile.TemporaryDirectory(prefix="florist-speed-") as tmp:
        results = measure(args, paths, Path(tmp))
    report = {
        "protocol": "images/s are medians of timed runs after a warm-up; c/ceiling is the median of back-to-back rounds "
        "of a, b and c; florist extraction into an empty cache; "
        "train wall times include process start-up; peak RSS from ru_maxrss in a fresh process",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "data": str(args.data),
        "images": len(paths),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "native_bf16": bf16_is_fast(),
        },
        "torch": torch.__version__,
        "florist_version": florist.__version__,
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "results": results,
        "summary": summarise(results, os.cpu_count() or 1),
    }
    print(table(report))
    if args.quick:
        return  # a smoke run: keep the committed results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.out.resolve() == OUT:  # the README shows the committed results only
        update_readme("speed-table", table(report), ROOT / "README.md")


if __name__ == "__main__":
    main()
