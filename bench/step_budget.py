"""Does head mode's step budget (``max_steps``) cost accuracy on a large folder? (issue 20)

    python bench/step_budget.py /tmp/florist-scale/n100000 --cache /tmp/florist-scale/cache-100000-...

Runs on a folder made by ``bench/scale.py``, whose photo ``i`` is a random crop of source
photo ``i % 1500``. Crops of one source look alike, so the photos are split by *source*:
the crops of a seeded, stratified 20% of the sources are held out, and none of them
shares a source with a training photo. The head is fitted on the cached clean and
mirrored features of the rest with 15 full epochs and with several step budgets; top-1
and log-loss of the held-out crops (averaged over both views, as predict does) and the
fit's seconds go to bench/results/step_budget.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from readme_table import ROOT

RESULTS = ROOT / "bench" / "results" / "step_budget.json"
#: How many source photos bench/scale.py crops from (the shared flowers).
SOURCES = 1500
BUDGETS = [None, 20_000, 10_000, 5_000]
VIEWS = ["clean", "flip"]


def grouped_split(paths: list[Path], labels: np.ndarray, seed: int) -> np.ndarray:
    """True for the crops of a stratified 20% of the source photos (the held-out part)."""
    from sklearn.model_selection import train_test_split

    source = np.array([int(p.stem) % SOURCES for p in paths])
    ids = np.unique(source)
    source_label = {s: labels[source == s][0] for s in ids}
    _, held = train_test_split(ids, test_size=0.2, random_state=seed, stratify=[source_label[s] for s in ids])
    return np.isin(source, held)


def main() -> None:
    from florist.calibration import negative_log_likelihood
    from florist.features import extract_views
    from florist.predict import average_probabilities
    from florist.training.backbone_set import create_backbones
    from florist.training.linear import fit_head
    from florist.training.registry import resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--cache", type=Path, required=True, help="the feature cache bench/scale.py filled")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    paths = sorted(args.folder.glob("*/*.jpg"))
    classes = sorted({p.parent.name for p in paths})
    labels = np.array([classes.index(p.parent.name) for p in paths])
    (backbone,) = create_backbones(resolve(mode="head"), torch.device("cpu"))
    views = extract_views(backbone, [str(p) for p in paths], VIEWS, cache_root=args.cache)
    if any(r.computed for r in views.values()):
        raise SystemExit("the cache did not hold every photo: run bench/scale.py on this folder first")
    held = grouped_split(paths, labels, seed=0)
    train_x = np.concatenate([views[v].features[~held] for v in VIEWS]).astype(np.float32)
    train_y = np.tile(labels[~held], len(VIEWS))
    eval_x = [views[v].features[held].astype(np.float32) for v in VIEWS]
    rows = []
    for budget in BUDGETS:
        cfg = resolve(mode="head", max_steps=budget or 10**9)
        started = time.perf_counter()
        head, history = fit_head(train_x, train_y, len(classes), cfg)
        seconds = time.perf_counter() - started
        probs = average_probabilities(head, eval_x)
        rows.append({
            "max_steps": budget,
            "steps": history.step[-1],
            "epochs": round(history.step[-1] * cfg.batch_size / len(train_y), 2),
            "fit_s": round(seconds, 1),
            "heldout_top1": float(np.mean(probs.argmax(1) == labels[held])),
            "heldout_nll": negative_log_likelihood(probs, labels[held]),
        })
        print(rows[-1], flush=True)
    report = {
        "command": f"step_budget.py {args.folder} --cache {args.cache}",
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "photos": len(paths),
        "train_photos": int((~held).sum()),
        "heldout_photos": int(held.sum()),
        "split": "by source photo (no held-out crop shares a source with a training crop)",
        "fits": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
