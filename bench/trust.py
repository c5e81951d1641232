"""Suspect labels (``florist audit --labels``): precision and recall against labels flipped on purpose.

1. **Choose** the head's L2 strength on an inner split: the run's training photos only, a
   seeded 5% of them moved to another class; each candidate ``C`` is scored by the F1 of
   the issues it finds (features computed once).
2. **Measure** on every photo of the folder: a temporary copy with another seeded 5% moved
   (the shared photos themselves are never touched), ``florist.audit(copy, labels=True)``
   cold and then warm, and the share of moved photos it finds (recall) and of its findings
   that were moved (precision). A photo the folder already had wrong counts against
   precision, so the figure is a floor.

Writes ``bench/results/trust.json`` and the table between README.md's ``trust-table`` markers.

    python bench/trust.py runs/flowers
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from readme_table import run_facts, write_results  # bench/readme_table.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "trust.json"
CANDIDATE_C = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.1)
CANDIDATE_FILTERS = ("prune_by_noise_rate", "both")
FLIPPED = 0.05


def flipped(labels: list[int], classes: int, share: float, seed: int) -> dict[int, int]:
    """Index -> new label for a seeded ``share`` of the photos, each moved to another class at random."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(labels)), round(share * len(labels)))
    return {i: rng.choice([c for c in range(classes) if c != labels[i]]) for i in chosen}


def scores(found: set, moved: set) -> dict:
    hits = len(found & moved)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(moved)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"found": len(found), "flipped": len(moved), "precision": precision, "recall": recall, "f1": f1}


def choose(run: Path) -> dict:
    """Mean F1, over two flip seeds, of each (C, filter) candidate on the run's training photos."""
    import torch

    from florist.data import read_labels, read_manifest
    from florist.features import extract_views
    from florist.labels import VIEWS, out_of_fold_probabilities, rank_label_issues, view_mean
    from florist.remote import default_cache_dir
    from florist.training.pipeline import create_backbones
    from florist.training.settings import TrainConfig

    classes = read_labels(run)
    items = read_manifest(run / "train.csv", classes)
    (net,) = create_backbones(TrainConfig(), torch.device("cpu"))
    views = extract_views(net, [it.path for it in items], VIEWS, cache_root=default_cache_dir())
    features = view_mean(views)
    labels = [it.label for it in items]
    out: dict = {}
    for seed in (1, 2):
        moves = flipped(labels, len(classes), FLIPPED, seed)
        noisy = np.array([moves.get(i, y) for i, y in enumerate(labels)])
        for c in CANDIDATE_C:
            probs = out_of_fold_probabilities(features, noisy, c=c)
            for rule in CANDIDATE_FILTERS:
                ranked, _ = rank_label_issues(noisy, probs, rule)
                row = out.setdefault(f"C={c} {rule}", {"C": c, "filter_by": rule, "seeds": []})
                row["seeds"].append(scores(set(ranked.tolist()), set(moves)))
    for row in out.values():
        row["mean_f1"] = float(np.mean([s["f1"] for s in row["seeds"]]))
        print(json.dumps({k: row[k] for k in ("C", "filter_by", "mean_f1")}))
    return out


def flipped_copy(photos: Path, out: Path, seed: int) -> tuple[set[str], int]:
    """Copy ``photos`` (class folders) to ``out`` with a seeded 5% filed under another class.

    Returns the moved photos' paths relative to ``out`` and the number of photos.
    """
    classes = sorted(p.name for p in photos.iterdir() if p.is_dir())
    files = [(c, f) for c in classes for f in sorted((photos / c).iterdir()) if f.is_file()]
    moves = flipped([classes.index(c) for c, _ in files], len(classes), FLIPPED, seed)
    moved = set()
    for i, (c, f) in enumerate(files):
        target = classes[moves[i]] if i in moves else c
        (out / target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out / target / f.name)
        if i in moves:
            moved.add(f"{target}/{f.name}")
    return moved, len(files)


def measure(photos: Path) -> dict:
    import florist

    with tempfile.TemporaryDirectory(prefix="florist-bench-trust-") as tmp:
        copy = Path(tmp, "photos")
        moved, n = flipped_copy(photos, copy, seed=0)
        times = []
        for _ in ("cold", "warm"):  # cold: the copy's photos are the shared ones, so only if never trained on
            start = time.perf_counter()
            report = florist.audit(copy, labels=True, near_distance=-1)
            times.append(time.perf_counter() - start)
    found = {issue.path for issue in report.label_issues}
    return {"photos": n, **scores(found, moved), "first_s": round(times[0], 1), "warm_s": round(times[1], 1)}


def table(r: dict) -> str:
    m = r["measured_labels"]
    best = r["choice"][r["chosen"]]
    return "\n".join(
        [
            "| flipped | found | recall | precision | warm audit |",
            "|---|---|---|---|---|",
            f"| {m['flipped']} of {m['photos']} | {m['found']} | {m['recall']:.1%} | {m['precision']:.1%} | "
            f"{m['warm_s']:.0f} s |",
            "",
            f"_Head C = {best['C']}, cleanlab filter_by={best['filter_by']!r}: mean F1 {best['mean_f1']:.2f} on the "
            f"run's training photos with two other seeded flips, the best of {len(r['choice'])} candidates. "
            f"Measured {r['measured']} by `bench/trust.py`._",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run trained on a photo folder (its training photos choose C)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from florist.labels import DEFAULT_C, DEFAULT_FILTER

    choice = choose(args.run)
    chosen = max(choice, key=lambda k: choice[k]["mean_f1"])
    if (choice[chosen]["C"], choice[chosen]["filter_by"]) != (DEFAULT_C, DEFAULT_FILTER):
        print(f"note: the inner split prefers {chosen}; florist.labels has C={DEFAULT_C} {DEFAULT_FILTER}")
    photos = Path(json.loads((args.run / "run.json").read_text())["data_dir"])
    report = {
        **run_facts(args.run),
        "choice": choice,
        "chosen": chosen,
        "default": {"C": DEFAULT_C, "filter_by": DEFAULT_FILTER},
        "measured_labels": measure(photos),
    }
    print(json.dumps(report["measured_labels"]))
    write_results(report, args.out, RESULTS, "trust-table", table(report), ROOT / "README.md")


if __name__ == "__main__":
    main()
