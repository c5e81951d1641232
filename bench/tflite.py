"""TFLite export of a run: fp32, fp16 and int8 files, their eval-split top-1, size and speed.

For each precision: ``florist.export(RUN, format="tflite", quantize=...)`` (wall time of the
whole export, parity check and eval-split comparison included), the file size, the largest
probability difference from PyTorch on the check photos, top-1 of the file and of the run on
the run's eval split and how often their top class agrees, and the interpreter's time per
photo (ai-edge-litert, XNNPACK, one image per call, all cores, after warm-up, photos already
decoded and cropped). MediaPipe's ImageClassifier then runs each file as a phone app would,
with its own preprocessing (it resizes the whole photo to the input size, no centre crop),
and its top-1 on the eval split shows the labels and the graph work there.

Writes ``bench/results/tflite.json`` and the table between README.md's ``tflite-table`` markers.

    python bench/tflite.py runs/flowers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from readme_table import run_facts, write_results  # bench/readme_table.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tflite.json"
PRECISIONS = ("fp32", "fp16", "int8")


def ms_per_image(model, images: np.ndarray, repeats: int = 2) -> float:
    """Best of ``repeats`` passes over ``images`` (one interpreter call each), per image."""
    model.run(images[:4])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(images)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(images)


def mediapipe_top1(path: Path, items, classes: list[str]) -> float:
    """MediaPipe ImageClassifier's top-1 on ``items``, with its own preprocessing."""
    from mediapipe import Image as MPImage
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=1)
    right = 0
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for it in items:
            top = classifier.classify(MPImage.create_from_file(str(it.path))).classifications[0].categories[0]
            right += top.category_name == classes[it.label]
    return right / len(items)


def measure(run: Path, precision: str, folder: Path, images: int) -> dict:
    from florist.data import read_file, read_manifest
    from florist.export import export
    from florist.tflite import TFLiteClassifier, image_pixels

    path = folder / f"model-{precision}.tflite"
    start = time.perf_counter()
    report = export(run, path, format="tflite", quantize=None if precision == "fp32" else precision)
    wall = time.perf_counter() - start
    model = TFLiteClassifier(path)
    items = read_manifest(run / "eval.csv", model.classes)
    picked = items[:: max(1, len(items) // images)][:images]
    pixels = np.stack([image_pixels(read_file(it.path), model.preprocessing) for it in picked])
    e = report.evaluation
    return {
        "precision": precision,
        "export_s": round(wall, 1),
        "size_mb": round(report.size_bytes / 1e6, 2),
        "max_abs_diff": report.max_abs_diff,
        "eval_images": e["n"],
        "top1_run": e["top1_run"],
        "top1_tflite": e["top1_export"],
        "agreement": e["agreement"],
        "ms_per_image": round(ms_per_image(model, pixels), 2),
        "mediapipe_top1": mediapipe_top1(path, items, model.classes),
    }


def table(report: dict) -> str:
    rows = [
        "| precision | file | top-1 (run: {run}) | same top class as the run | max prob. diff from PyTorch "
        "| ms/photo (LiteRT, {cores} cores) | MediaPipe ImageClassifier top-1 | export |".format(
            run=f"{report['results'][0]['top1_run']:.2%}", cores=report["cpu_count"]
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        rows.append(
            f"| {r['precision']} | {r['size_mb']:.1f} MB | {r['top1_tflite']:.2%} | "
            f"{r['agreement']:.2%} of {r['eval_images']} | {r['max_abs_diff']:.1e} | {r['ms_per_image']:.1f} | "
            f"{r['mediapipe_top1']:.2%} | {r['export_s']:.0f} s |"
        )
    rows.append(f"\n_{report['machine']}, measured {report['measured']} by `bench/tflite.py` in one run._")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a trained run folder")
    parser.add_argument("--images", type=int, default=64, help="eval photos the interpreter is timed on")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory(prefix="florist-bench-tflite-") as tmp:
        results = []
        for precision in PRECISIONS:
            results.append(measure(args.run, precision, Path(tmp), args.images))
            print(json.dumps(results[-1]))
    report = {
        **run_facts(args.run),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    write_results(report, args.out, RESULTS, "tflite-table", table(report), ROOT / "README.md")

if __name__ == "__main__":
    main()
