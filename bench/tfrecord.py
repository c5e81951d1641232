"""The original TensorFlow project's TFRecords against the same photos as JPEG files.

Takes a run trained on a photo folder (``make demo``'s ``runs/flowers``) and writes its
train and eval photos twice, with the run's split:

- in the layout the original project's ``pre_input.py`` wrote (``training_set.tfrecord``,
  ``eval_set.tfrecord``: ``tf.train.Example``s with raw uint8 RGB ``image``,
  ``image/height``, ``image/width``, ``label``; ``labels.txt`` lines ``<class name> <index> ``);
- as florist's own records of the JPEG files (``florist prepare --tfrecord``): the same bytes
  as the folder, so the same features and cache entries as training on the folder itself.

Both are trained with the run's settings for each ``--seeds`` value. Records fix the split
(by file name), so a seed changes only the training: its shuffling and the random views. A
random view is seeded by the image's content hash, and raw pixels hash differently from
their JPEG, so the two sides see different random crops even at one seed; the mean over
seeds is the fair comparison. The first seed's raw-pixel run is also compared photo by photo
with the run itself.

Writes ``bench/results/tfrecord.json`` and the table between README.md's ``tfrecord-table`` markers.

    python bench/tfrecord.py runs/flowers --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from readme_table import run_facts, write_results  # bench/readme_table.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tfrecord.json"


def write_original_layout(run: Path, out: Path) -> dict[str, int]:
    """The run's train and eval photos as the original project's records; photos per split."""
    from florist.data import decode_image, read_file, read_labels, read_manifest
    from florist.tfrecord import encode_example, write_record

    classes = read_labels(run)
    out.mkdir(parents=True)
    (out / "labels.txt").write_text("".join(f"{name} {i} \n" for i, name in enumerate(classes)))
    counts = {}
    for split, manifest in (("training_set", "train.csv"), ("eval_set", "eval.csv")):
        items = read_manifest(run / manifest, classes)
        with open(out / f"{split}.tfrecord", "wb") as f:
            for it in items:
                rgb = decode_image(read_file(it.path))  # EXIF-rotated RGB, full size
                write_record(
                    f,
                    encode_example(
                        {
                            "image": rgb.tobytes(),
                            "image/height": rgb.height,
                            "image/width": rgb.width,
                            "label": it.label,
                        }
                    ),
                )
        counts[split] = len(items)
    return counts


def eval_predictions(run: Path) -> list[tuple[str, str]]:
    """(label, predicted label) per eval photo, in the order of the run's eval split."""
    with open(run / "eval_predictions.csv", newline="") as f:
        return [(row["label"], row["predicted"]) for row in csv.DictReader(f)]


def top1(data: Path, out: Path, settings: dict) -> float:
    import florist

    florist.train(data, out, overwrite=True, **settings)
    return json.loads((out / "metrics.json").read_text())["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run trained on a photo folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from florist.tfrecord import prepare_tfrecords

    config = json.loads((args.run / "model.json").read_text())["train_config"]
    photos = json.loads((args.run / "run.json").read_text())["data_dir"]
    settings = {k: v for k, v in config.items() if k not in ("eval_fraction", "train_per_class", "seed")}
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="florist-bench-tfrecord-") as tmp:
        raw, jpeg, run = Path(tmp, "original"), Path(tmp, "jpeg"), Path(tmp, "run")
        counts = write_original_layout(args.run, raw)
        prepared = prepare_tfrecords(photos, jpeg, eval_fraction=config["eval_fraction"], seed=config["seed"])
        if (len(prepared.train), len(prepared.eval)) != (counts["training_set"], counts["eval_set"]):
            raise SystemExit("the photo folder no longer splits as the run did")
        size = sum(p.stat().st_size for p in raw.iterdir())
        for seed in seeds:
            row = {"seed": seed, "top1_raw": top1(raw, run, {**settings, "seed": seed})}
            if seed == seeds[0]:
                a, b = eval_predictions(args.run), eval_predictions(run)
                if [label for label, _ in a] != [label for label, _ in b]:  # the records keep the manifest's order
                    raise SystemExit("the eval photos differ from the run's: cannot compare them photo by photo")
                row["same_prediction_as_the_run"] = sum(x[1] == y[1] for x, y in zip(a, b)) / len(a)
            row["top1_jpeg"] = top1(jpeg, run, {**settings, "seed": seed})
            print(json.dumps(row))
            rows.append(row)
    report = {
        **run_facts(args.run),
        "settings": settings,
        "photos": counts,
        "records_mb": round(size / 1e6, 1),
        "top1_run": json.loads((args.run / "metrics.json").read_text())["top1"],
        "seeds": rows,
        "mean_top1_jpeg": float(np.mean([r["top1_jpeg"] for r in rows])),
        "mean_top1_raw": float(np.mean([r["top1_raw"] for r in rows])),
    }
    write_results(report, args.out, RESULTS, "tfrecord-table", table(report), ROOT / "README.md")


def table(r: dict) -> str:
    n = r["photos"]["eval_set"]
    lines = ["| training seed | JPEG files (as records) | original-layout raw pixels | difference |", "|---|---|---|---|"]
    for row in r["seeds"]:
        lines.append(
            f"| {row['seed']} | {row['top1_jpeg']:.2%} | {row['top1_raw']:.2%} | "
            f"{(row['top1_raw'] - row['top1_jpeg']) * 100:+.2f} points |"
        )
    change = (r["mean_top1_raw"] - r["mean_top1_jpeg"]) * 100
    lines += [
        f"| **mean** | **{r['mean_top1_jpeg']:.2%}** | **{r['mean_top1_raw']:.2%}** | **{change:+.2f} points** |",
        "",
        f"_Eval top-1 on the run's {n} eval photos ({r['photos']['training_set']} train), {r['settings']['mode']}, "
        f"the run's settings; raw-pixel records {r['records_mb']:.0f} MB. Seed {r['seeds'][0]['seed']}'s raw-pixel "
        f"run gives the same prediction as the folder-trained run on {r['seeds'][0]['same_prediction_as_the_run']:.1%} "
        f"of the photos. Measured {r['measured']} by `bench/tfrecord.py`._",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
