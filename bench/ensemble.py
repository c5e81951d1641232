"""Ensembles of the bundled networks by k-fold cross-validation on a photo folder (issue 19).

For each of ``k`` stratified folds of all the photos, the tune-top ensemble of
efficientnet_lite0/1/2 is trained on the other folds through florist's own
:func:`~florist.training.ensemble.fit_members`: each member is exactly what
``florist train --backbone <that network>`` trains (its fit, its cross-fit, its
temperature). The fold then scores, with the same members:

* each network alone (the single-backbone default is lite0);
* every subset's average of calibrated probabilities with equal weights (what
  ``florist train --backbone a,b,c`` saves), and calibrated with the subset's own
  temperature fitted on the training part's held-out probabilities;
* the same with weights fitted (by likelihood) on those held-out probabilities:
  "weighted vs plain".

Nothing is chosen on the scored fold. The JSON keeps each member's seconds per fold
(training steps and cross-fit, warm activation cache) as a rough guide only: the cold
end-to-end time of a whole run, measured alone, is ``bench/accuracy.py``'s business.

Writes ``bench/results/ensemble.json`` and the table between README.md's
``ensemble-table`` markers.

    python bench/ensemble.py ../shared/data/flower_photos --folds 5
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
from readme_table import photo_bench

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ensemble.json"
MEMBERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def short(names: tuple[str, ...]) -> str:
    return " + ".join(n.removeprefix("efficientnet_") for n in names)


def fit_weights(parts: list[np.ndarray], labels: np.ndarray) -> list[float]:
    """Weights on the simplex minimising the negative log-likelihood of the weighted average of ``parts``."""
    from scipy.optimize import minimize

    from florist.calibration import negative_log_likelihood

    def loss(logits: np.ndarray) -> float:
        w = np.exp(logits - logits.max())
        w /= w.sum()
        return negative_log_likelihood(sum(wi * p for wi, p in zip(w, parts)), labels)

    result = minimize(loss, np.zeros(len(parts)), method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7})
    w = np.exp(result.x - result.x.max())
    return [float(x) for x in w / w.sum()]


def score(members: list, weights: list[float] | None, labels: np.ndarray) -> dict:
    """Top-1 and ECE on the fold of ``members`` averaged with ``weights``, calibrated as florist calibrates a run."""
    from florist.calibration import apply_temperature, expected_calibration_error, fit_temperature
    from florist.training.ensemble import combined, combined_held

    fitted, held = combined(members, weights), combined_held(members, weights)
    temperature = fit_temperature(held.probs, held.labels)
    probs = apply_temperature(fitted.eval_probs, temperature)
    assert [it.label for it in fitted.eval] == labels.tolist()
    return {
        "top1": float((probs.argmax(1) == labels).mean()),
        "ece": expected_calibration_error(probs, labels),
        "weights": weights or [1 / len(members)] * len(members),
    }


def run_fold(job_of, fold: int, held_items: list, train_items: list) -> dict:
    """Train the members on ``train_items``, score every combination on ``held_items``."""
    from florist.calibration import apply_temperature
    from florist.training.ensemble import fit_members
    from florist.training.registry import get_mode

    job = job_of(train_items, held_items)
    started = time.perf_counter()
    members = fit_members(job, get_mode("tune-top").fit)
    wall = time.perf_counter() - started
    labels = np.array([it.label for it in members[0].fitted.eval], dtype=np.int64)
    out: dict = {"fold": fold, "n_eval": len(labels), "wall_s": round(wall, 1), "members": {}, "plain": {}, "fitted": {}}
    for m in members:
        out["members"][m.name] = {
            "top1": float((m.fitted.eval_probs.argmax(1) == labels).mean()),
            "temperature": m.temperature,
            "seconds": round(sum(m.timings.get(k, 0.0) for k in ("train_s", "calibration_s", "features_s")), 1),
        }
    by_name = {m.name: m for m in members}
    for k in range(1, len(members) + 1):
        for names in itertools.combinations(MEMBERS, k):
            subset = [by_name[n] for n in names]
            out["plain"][short(names)] = score(subset, None, labels)
            if k > 1:
                shared = subset[0].held.paths
                parts = [apply_temperature(m.held.probs, m.temperature) for m in subset]
                assert all(m.held.paths == shared for m in subset), "members must share the cross-fit's folds"
                weights = fit_weights(parts, subset[0].held.labels)
                out["fitted"][short(names)] = score(subset, weights, labels)
    print(f"fold {fold}:", {n: round(c["top1"], 4) for n, c in out["plain"].items()}, f"{wall:.0f} s", flush=True)
    return out


def cross_validate(photos: Path, folds: int, seed: int) -> dict:
    import torch
    from sklearn.model_selection import StratifiedKFold

    from florist.data import Prepared, prepare
    from florist.remote import default_cache_dir
    from florist.training.backbone_set import create_backbones
    from florist.training.job import Job
    from florist.training.registry import resolve

    cfg = resolve(mode="tune-top", backbone=",".join(MEMBERS), seed=seed)
    device = torch.device("cpu")
    backbones = create_backbones(cfg, device)
    initial = [{k: v.clone() for k, v in b.model.state_dict().items()} for b in backbones]
    every = prepare(photos, eval_fraction=0.0, seed=seed)
    items = every.train
    y = np.array([it.label for it in items])
    scratch = Path(tempfile.mkdtemp(prefix="florist-cv-"))

    def job_of(train: list, held: list) -> Job:
        for b, state in zip(backbones, initial):
            b.model.load_state_dict(state)
            b.tuned_id = None
        prepared = Prepared(every.classes, train, held)
        return Job(backbones, prepared, cfg, scratch, default_cache_dir(), device, None, False, False, {}, initial)

    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y)
    results = [
        run_fold(job_of, f, [items[i] for i in held], [items[i] for i in train])
        for f, (train, held) in enumerate(splits)
    ]
    return {
        "folds": folds, "seed": seed, "n_photos": len(items), "per_fold": results,
        "summary": summarise(results), "member_seconds": member_seconds(results),
    }  # fmt: skip


def summarise(per_fold: list[dict]) -> dict:
    """Mean, standard deviation and range of each combination's top-1 over the folds."""
    out = {}
    for how in ("plain", "fitted"):
        for name in per_fold[0][how]:
            top1 = np.array([f[how][name]["top1"] for f in per_fold])
            ece = np.array([f[how][name]["ece"] for f in per_fold])
            out[f"{name} ({how})" if how == "fitted" else name] = {
                "top1_mean": float(top1.mean()),
                "top1_std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0,
                "top1_min": float(top1.min()),
                "top1_max": float(top1.max()),
                "ece_mean": float(ece.mean()),
                "members": name.count("+") + 1,
            }
    return out


def member_seconds(per_fold: list[dict]) -> dict[str, float]:
    """Each member's mean time per fold."""
    return {n: float(np.mean([f["members"][n]["seconds"] for f in per_fold])) for n in per_fold[0]["members"]}


def paired_gain(r: dict, name: str) -> list[float]:
    """Per fold, the combination's top-1 minus lite0's on the same photos, in points."""
    how, base = ("fitted", name.removesuffix(" (fitted)")) if name.endswith(" (fitted)") else ("plain", name)
    return [100 * (f[how][base]["top1"] - f["plain"]["lite0"]["top1"]) for f in r["per_fold"]]


def table(r: dict) -> str:
    s = r["summary"]
    lines = [
        f"| members | {r['folds']}-fold top-1 (mean ± sd) | range | vs lite0: mean (per fold) | ECE |",
        "|---|---|---|---|---|",
    ]
    for name, c in s.items():
        gain = paired_gain(r, name)
        lines.append(
            f"| {name} | {c['top1_mean']:.2%} ± {c['top1_std']:.2%} | {c['top1_min']:.2%}–{c['top1_max']:.2%} "
            f"| {np.mean(gain):+.2f} pt ({min(gain):+.2f} to {max(gain):+.2f}) | {c['ece_mean']:.3f} |"
        )
    lines += [
        "",
        f"_tune-top per network, {r['folds']}-fold stratified CV of {r['n_photos']} photos (each fold trains on the "
        "others); a subset averages its members' calibrated probabilities with equal weights (what "
        "`--backbone a,b,c` saves) or with weights fitted on the training part's held-out probabilities "
        f"(fitted). Measured {r['measured']} by `bench/ensemble.py`._",
    ]
    return "\n".join(lines)


def main() -> None:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--folds", type=int, default=5)
        parser.add_argument("--seed", type=int, default=0)

    photo_bench(
        __doc__, RESULTS, "ensemble-table", table, lambda args: cross_validate(args.photos, args.folds, args.seed),
        arguments,
    )  # fmt: skip


if __name__ == "__main__":
    main()
