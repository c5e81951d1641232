"""Do the bundled networks err differently enough to average? The first measurement of issue 19.

Trains the default mode (tune-top, calibrated) once per bundled backbone on the same
photos, split and seed, then scores every subset's plain average of the members'
calibrated eval probabilities (``eval_predictions.csv``), against each member alone.
One fixed split only: a first look before ensembles are built into ``florist train``
(the issue's verdict needs k-fold CV).

Writes ``bench/results/ensemble.json`` and the table between README.md's ``ensemble-table``
markers.

    python bench/ensemble.py ../shared/data/flower_photos
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from readme_table import results_parser, rewrite_table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ensemble.json"
MEMBERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def eval_probabilities(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Paths, labels and calibrated probabilities of a run's eval split, in ``eval_predictions.csv`` order."""
    with open(run / "eval_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [k[2:] for k in rows[0] if k.startswith("p:")]
    probs = np.array([[float(r["p:" + c]) for c in classes] for r in rows])
    return [r["path"] for r in rows], np.array([classes.index(r["label"]) for r in rows]), probs


def train_member(photos: Path, name: str, runs: Path) -> dict:
    import florist

    run = runs / name
    start = time.perf_counter()
    florist.train(photos, run, backbone=name, overwrite=True)
    wall = time.perf_counter() - start
    metrics = json.loads((run / "metrics.json").read_text())
    return {"run": str(run), "wall_s": round(wall, 1), "top1": metrics["top1"], "ece": metrics["ece"]}


def combinations(runs: dict[str, Path]) -> dict[str, dict]:
    from florist.calibration import expected_calibration_error

    loaded = {name: eval_probabilities(run) for name, run in runs.items()}
    paths, labels, _ = next(iter(loaded.values()))
    assert all(p == paths for p, _, _ in loaded.values()), "members must share one eval split"
    out = {}
    for k in range(1, len(runs) + 1):
        for members in itertools.combinations(runs, k):
            probs = np.mean([loaded[m][2] for m in members], axis=0)
            out[" + ".join(m.removeprefix("efficientnet_") for m in members)] = {
                "members": list(members),
                "top1": float((probs.argmax(1) == labels).mean()),
                "ece": expected_calibration_error(probs, labels),
                "n": len(labels),
            }
    return out


def table(r: dict) -> str:
    lines = ["| members (plain average) | top-1 | ECE | train time |", "|---|---|---|---|"]
    for name, c in r["combinations"].items():
        wall = sum(r["members"][m]["wall_s"] for m in c["members"])
        lines.append(f"| {name} | {c['top1']:.2%} | {c['ece']:.3f} | {wall:.0f} s |")
    lines += [
        "",
        f"_Default mode per member on the fixed {r['combinations'][next(iter(r['combinations']))]['n']}-photo eval "
        f"split, calibrated probabilities averaged; train time is the members' sum, run one after another, "
        f"with whatever the feature cache already held. "
        f"Measured {r['measured']} by `bench/ensemble.py` (one split: a first look, not yet k-fold CV)._",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = results_parser(__doc__, RESULTS)
    parser.add_argument("photos", type=Path, nargs="?", help="a photo folder (not needed with --table-only)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ensemble")
    args = parser.parse_args()
    if rewrite_table(args, "ensemble-table", table, ROOT / "README.md"):
        return
    if args.photos is None:
        parser.error("the photo folder is required")
    sys.path.insert(0, str(ROOT / "src"))
    members = {name: train_member(args.photos, name, args.runs) for name in MEMBERS}
    for name, m in members.items():
        print(name, json.dumps(m))
    report = {
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "photos": str(args.photos),
        "members": members,
        "combinations": combinations({name: Path(m["run"]) for name, m in members.items()}),
    }
    print(table(report))
    write_results(report, args.out, RESULTS, "ensemble-table", table(report), ROOT / "README.md")


if __name__ == "__main__":
    main()
