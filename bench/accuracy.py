"""Accuracy and wall time of each training mode on the flower photos, measured in one run.

Protocol: the shared flower photos (``../shared/data/flower_photos``), a fixed
stratified 80/20 split with seed 0, top-1 on the 300 held-out photos. Every run
starts with an empty feature cache, so its wall time is the cold, end-to-end
cost (image checks, features or activations, training, metrics). Defaults were
chosen beforehand on an inner validation split of the training part only.

Writes ``bench/results/accuracy.json`` and refreshes the results table in
README.md between its ``accuracy-table`` markers.

    python bench/accuracy.py                 # all configurations
    python bench/accuracy.py --only "head,tune-top"   # just these (others kept from the last run)
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from readme_table import update_readme  # bench/readme_table.py

import florist

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flower_photos"

#: name -> TrainConfig overrides. The first of each mode is its default setting.
CONFIGS: dict[str, dict] = {
    "head": {"mode": "head"},
    "head (fp32 features)": {"mode": "head", "precision": "fp32"},
    "head (no views/TTA)": {"mode": "head", "views": 0, "tta": False},
    "head (7 views)": {"mode": "head", "views": 7},
    "head (lite0+lite2)": {"mode": "head", "backbone": "efficientnet_lite0,efficientnet_lite2"},
    "tune-top": {"mode": "tune-top"},
    "tune-top ensemble (lite0+1+2)": {
        "mode": "tune-top", "backbone": "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2",
    },
    "finetune": {"mode": "finetune"},
}


#: How each mode optimises (head mode uses the configured optimizer).
OPTIMIZER = {
    "tune-top": "adamw, warm-up + cosine",
    "finetune": "adamw, layer-wise lr, warm-up + cosine",
}


def run_one(name: str, overrides: dict, data: Path, work: Path) -> dict:
    """Train cold (empty cache) and return the figures for one configuration."""
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    out = work / re.sub(r"\W+", "-", name)
    started = time.perf_counter()
    florist.train(data, out, cache_dir=cache, overwrite=True, **overrides)
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    bundle = json.loads((out / "model.json").read_text())
    cfg = bundle["train_config"]
    members = metrics.get("ensemble", {}).get("members", [])
    history = members[0]["history"] if members else metrics["history"]  # an ensemble's members share epochs
    return {
        "name": name,
        "mode": metrics["mode"],
        "backbone": cfg["backbone"],
        "views": "new each step" if metrics["mode"] == "finetune" else len(metrics["views"]),
        "tta": cfg["tta"],
        "epochs": len(history["step"]),  # one history point per epoch
        "steps": history["step"][-1],
        "optimizer": OPTIMIZER.get(metrics["mode"], cfg["optimizer"]),
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "n_train": metrics["n_train"],
        "n_eval": metrics["n_eval"],
        "precision": "bf16" if bundle.get("bf16") else "fp32",
        "wall_s": round(wall, 1),
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "timings": metrics["timings"],
    }


def table(results: list[dict]) -> str:
    """Markdown table like the original project's results table."""
    lines = [
        "| mode | backbone | views | TTA | features | epochs | steps | optimizer | top-1 | cold wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['backbone']} | {r['views']} | {'flip' if r['tta'] else 'no'} "
            f"| {r.get('precision', 'fp32')} | {r['epochs']} "
            f"| {r['steps']} | {r['optimizer']} | {r['top1']:.2%} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--only", default="", help="comma-separated configuration names to run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy.json")
    parser.add_argument("--table-only", action="store_true", help="rebuild the README table from --out")
    args = parser.parse_args()
    if args.table_only:
        update_readme("accuracy-table", table(json.loads(args.out.read_text())["results"]), ROOT / "README.md")
        return
    if not args.data.is_dir():
        raise SystemExit(f"data not found: {args.data}")
    wanted = [n.strip() for n in args.only.split(",")] if args.only else list(CONFIGS)
    unknown = set(wanted) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; known: {list(CONFIGS)}")
    previous = json.loads(args.out.read_text())["results"] if args.out.exists() and args.only else []
    fresh = {}
    with tempfile.TemporaryDirectory(prefix="florist-bench-") as tmp:
        for name in wanted:
            fresh[name] = run_one(name, CONFIGS[name], args.data, Path(tmp))
            print(json.dumps(fresh[name]), flush=True)
    kept = {r["name"]: r for r in previous if r["name"] in CONFIGS}
    results = [fresh.get(name) or kept[name] for name in CONFIGS if name in fresh or name in kept]
    report = {
        "protocol": "stratified 80/20 split, seed 0, cold cache; top-1 on the held-out 20%; "
        "rows measured together share a 'measured' time",
        "data": str(args.data),
        "machine": {"cpus": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "florist_version": florist.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    update_readme("accuracy-table", table(results), ROOT / "README.md")
    print(table(results))


if __name__ == "__main__":
    main()
