"""Test-time resolution and views (issue 19): does scoring larger than training, or over more views, pay?

Chosen on an inner split only: the fixed split's 1,200 training photos (80/20, seed 0,
as everywhere) are split again 960/240 with seed 0, and each mode's default model is
trained on the 960. Its 240 validation photos are then scored

* at larger input sizes than the network was trained at (the "FixRes" effect, Touvron
  et al. 2019: random-resized-crop training sees objects larger than a centre crop
  shows them), keeping the crop fraction, so the whole resize grows with the crop;
* with more test-time views: the mirror, then the cached random crops (``aug<k>``).

The eval split of the fixed split is never read. finetune is left out (an hour per model
on this CPU).

Writes ``bench/results/fixres.json`` and the table between README.md's ``fixres-table``
markers.

    python bench/fixres.py ../shared/data/flower_photos
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from readme_table import photo_bench

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "fixres.json"
MODES = ("head", "tune-top")
SIZES = (1.0, 8 / 7, 9 / 7)  # of the trained side: 224 -> 256, 288 for lite0
VIEWS = {
    "clean": ["clean"],
    "clean + flip (default)": ["clean", "flip"],
    "clean + flip + 3 crops": ["clean", "flip", "aug0", "aug1", "aug2"],
    "clean + flip + 6 crops": ["clean", "flip"] + [f"aug{k}" for k in range(6)],
}


def inner_folder(photos: Path, into: Path) -> Path:
    """Links to the fixed split's training photos, one folder per class: what the inner split is drawn from."""
    from florist.data import prepare

    fixed = prepare(photos, eval_fraction=0.2, seed=0)
    for it in fixed.train:
        link = into / fixed.classes[it.label] / Path(it.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(it.path).resolve())
    return into


def score(model, paths: list[str], labels: np.ndarray, side: int, views: list[str]) -> float:
    """Top-1 of ``model`` on ``paths`` at crop side ``side`` over ``views`` (the model is restored after)."""
    saved = [(dict(b.data_config), b.compiled.copy()) for b in model.backbones]
    saved_views = model.tta_views
    try:
        for b in model.backbones:
            b.data_config["input_size"] = [3, side, side]
            b.compiled.clear()
        model.tta_views = views
        probs, errors = model.predict_proba(paths)
        assert not errors
        return float((probs.argmax(1) == labels).mean())
    finally:
        for b, (config, compiled) in zip(model.backbones, saved):
            b.data_config, b.compiled = config, compiled
        model.tta_views = saved_views


def measure(photos: Path) -> dict:
    import florist
    from florist.data import read_manifest

    out: dict = {"modes": {}}
    with tempfile.TemporaryDirectory(prefix="florist-fixres-") as tmp:
        inner = inner_folder(photos, Path(tmp) / "inner")
        for mode in MODES:
            run = Path(tmp) / mode
            started = time.perf_counter()
            model = florist.train(inner, run, mode=mode, eval_fraction=0.2, seed=0)
            trained = time.perf_counter() - started
            classes = (run / "labels.txt").read_text().split()
            items = read_manifest(run / "eval.csv", classes)
            paths, labels = [it.path for it in items], np.array([it.label for it in items])
            base = int(model.backbones[0].data_config["input_size"][-1])
            rows = {}
            for ratio in SIZES:
                side = int(round(base * ratio / 8) * 8)
                for name, views in VIEWS.items():
                    rows[f"{side} px, {name}"] = {"side": side, "views": views, "top1": score(model, paths, labels, side, views)}
                    print(mode, side, name, f"{rows[f'{side} px, {name}']['top1']:.4f}", flush=True)
            n_train = len(read_manifest(run / "train.csv", classes))
            out["modes"][mode] = {"n_train": n_train, "n_validation": len(items), "train_s": round(trained, 1), "rows": rows}
    return out


def table(r: dict) -> str:
    modes = list(r["modes"])
    lines = ["| test-time input | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    names = list(r["modes"][modes[0]]["rows"])
    for name in names:
        cells = [f"{r['modes'][m]['rows'][name]['top1']:.2%}" for m in modes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n, n_train = r["modes"][modes[0]]["n_validation"], r["modes"][modes[0]]["n_train"]
    lines += [
        "",
        f"_Each mode's default model (efficientnet_lite0, trained at 224 px) on the inner split: trained on {n_train} of the "
        f"fixed split's training photos, top-1 on the other {n} (one photo = {1 / n:.2%}). Measured {r['measured']} "
        "by `bench/fixres.py`._",
    ]
    return "\n".join(lines)


def main() -> None:
    photo_bench(__doc__, RESULTS, "fixres-table", table, lambda args: measure(args.photos))


if __name__ == "__main__":
    main()
