"""How florist's costs grow with the number of photos: 1.5k, 10k, 100k (issue 20).

    python bench/scale.py ../shared/data/flower_photos --sizes 1500,10000,100000 --work /tmp/florist-scale

For each size N it makes N distinct photos (random crops of the source photos,
resized and re-encoded as JPEG, so every content hash differs; kept under
``--work`` and reused by later runs), then, in fresh processes, alone on the machine:

* **extraction**: head mode's cached views (clean, mirror) of every photo into an
  empty feature cache, through ``florist.features.extract_views(collect=False)``, the
  pass a ``torchrun`` rank or a cluster worker makes; seconds per photo (the
  network compiled beforehand) and peak RSS of the process and its decoding workers;
* **the cache it left**: files and bytes;
* **train**: ``florist train --mode head`` on those photos twice, the first run
  checking every photo and finding its features cached, the second a warm re-run:
  wall time, the run's own timings and peak RSS.

Results go to bench/results/scale.json and the README ``scale-table``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from readme_table import ROOT, rewrite_table, write_results

RESULTS = ROOT / "bench" / "results" / "scale.json"
README = ROOT / "README.md"
TABLE = "scale-table"
#: The views head mode caches for each training photo (``--views 1``).
VIEWS = ["clean", "flip"]
#: Longest side of a generated photo: the size of a typical flower_photos JPEG.
LONG_SIDE = 400


# ---------------------------------------------------------------------------
# photos
# ---------------------------------------------------------------------------


def source_photos(folder: Path) -> list[tuple[str, Path]]:
    """(class, path) of every JPEG under ``folder``'s class folders, in a fixed order."""
    return [(p.parent.name, p) for p in sorted(folder.glob("*/*.jpg"))]


def make_photo(job: tuple[int, str, str]) -> None:
    """Photo ``i``: a seeded random crop (half to all of the area) of its source, resized and re-encoded."""
    i, source, target = job
    rng = np.random.default_rng(i)
    with Image.open(source) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = np.sqrt(rng.uniform(0.5, 1.0))
        cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch))
        ratio = LONG_SIDE / max(cw, ch)
        crop = crop.resize((max(1, round(cw * ratio)), max(1, round(ch * ratio))), Image.Resampling.BILINEAR)
        tmp = f"{target}.tmp"
        crop.save(tmp, "JPEG", quality=int(rng.integers(80, 95)))
        os.replace(tmp, target)


def photo_folder(source: Path, work: Path, n: int, workers: int) -> Path:
    """A class-folder tree of ``n`` generated photos: links into ``work/photos``, made once."""
    sources = source_photos(source)
    made = work / "photos"
    jobs = []
    for i in range(n):
        label, path = sources[i % len(sources)]
        target = made / label / f"{i:07d}.jpg"
        if not target.exists():
            jobs.append((i, str(path), str(target)))
    for label in {label for label, _ in sources}:
        (made / label).mkdir(parents=True, exist_ok=True)
    if jobs:
        started = time.perf_counter()
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(make_photo, jobs, chunksize=64))
        print(f"made {len(jobs)} photos in {time.perf_counter() - started:.0f} s", flush=True)
    folder = work / f"n{n}"
    if not folder.exists():
        tmp = work / f".n{n}.tmp"
        for i in range(n):
            label, _ = sources[i % len(sources)]
            link = tmp / label / f"{i:07d}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(made / label / f"{i:07d}.jpg")
        tmp.rename(folder)
    return folder


# ---------------------------------------------------------------------------
# measurements (each in a fresh process)
# ---------------------------------------------------------------------------


def extract_child(folder: Path, cache: Path) -> dict:
    """Fill an empty cache with head mode's views of every photo in ``folder``; time and peak RSS."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from speed import backbone_for, default_combo

    from florist.features import extract_views, frozen_pass

    paths = sorted(str(p) for p in folder.glob("*/*.jpg"))
    backbone = backbone_for(*default_combo())
    frozen_pass(backbone)  # compile the network first: a fixed cost, not a per-photo one
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    results = extract_views(backbone, paths, VIEWS, cache_root=cache, collect=False)
    seconds = time.perf_counter() - started
    return {
        "photos": len(paths),
        "computed": sum(r.computed for r in results.values()),
        "seconds": round(seconds, 1),
        "ms_per_photo": round(1000 * seconds / len(paths), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def in_fresh_process(*args: str) -> dict:
    """Run this script with ``args`` in a new process; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"), *sys.path])}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def train_child(folder: Path, cache: Path, run: Path) -> dict:
    """``florist train FOLDER --mode head`` in a child process: wall time, its timings, peak RSS of its tree."""
    command = [sys.executable, "-m", "florist", "train", str(folder), "--out", str(run), "--mode", "head",
               "--cache-dir", str(cache), "--overwrite", "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "seconds": round(seconds, 1),
        "timings_s": {k: round(v, 1) for k, v in metrics["timings"].items()},
        "features_computed": metrics["features_computed"],
        "top1": metrics["top1"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def cache_files(cache: Path) -> dict:
    files = [p for p in cache.rglob("*") if p.is_file()]
    shards = [p for p in files if p.suffix == ".shard"]
    return {"files": len(files), "shards": len(shards), "bytes": sum(p.stat().st_size for p in files)}


def measure_size(source: Path, work: Path, n: int, workers: int) -> dict:
    folder = photo_folder(source, work, n, workers)
    cache = work / f"cache-{n}-{time.strftime('%H%M%S')}"
    row: dict = {"photos": n}
    row["extraction"] = in_fresh_process("--extract-child", str(folder), str(cache))
    print(json.dumps(row["extraction"]), flush=True)
    row["cache"] = cache_files(cache)
    row["cache"]["files_per_1000_photos"] = round(1000 * row["cache"]["files"] / n, 2)
    run = work / f"run-{n}"
    row["first_train"] = in_fresh_process("--train-child", str(folder), str(cache), str(run))
    row["warm_train"] = in_fresh_process("--train-child", str(folder), str(cache), str(run))
    row["cache_after_train"] = cache_files(cache)  # with the checks memo and compiled networks train adds
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def table(report: dict) -> str:
    rows = report["sizes"]
    base = rows[0]["extraction"]
    lines = [
        f"Measured {report['measured']} on this {report['cpus']}-core CPU, alone, head mode's two views "
        f"(lite0, {report['engine']}); ratios against the {rows[0]['photos']:,}-photo row.",
        "",
        "| photos | extraction ms/photo | (ratio) | extraction peak RSS MiB | (ratio) | cache files (after training) | per 1,000 photos "
        "| cache GB | first train s | warm re-train s | warm train peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, files = r["extraction"], r.get("cache_after_train", r["cache"])["files"]
        lines.append(
            f"| {r['photos']:,} | {e['ms_per_photo']:.2f} | {e['ms_per_photo'] / base['ms_per_photo']:.2f} "
            f"| {e['peak_rss_mib']:,.0f} | {e['peak_rss_mib'] / base['peak_rss_mib']:.2f} | {files} "
            f"| {1000 * files / r['photos']:.2f} | {r['cache']['bytes'] / 1e9:.2f} "
            f"| {r['first_train']['seconds']:.0f} | {r['warm_train']['seconds']:.0f} "
            f"| {r['warm_train']['peak_rss_mib']:,.0f} |"
        )
    return "\n".join([*lines, "", *cost_model(report)])


def cost_model(report: dict) -> list[str]:
    """1M and 10M photos, extrapolated from the largest measured row (and speed.json's one-core decode rate)."""
    big = report["sizes"][-1]
    n, ms = big["photos"], big["extraction"]["ms_per_photo"]
    per_photo_bytes = big["cache"]["bytes"] / n
    read_s = big["warm_train"]["timings_s"]["features_s"] / n
    decode = json.loads((RESULTS.parent / "speed.json").read_text())["results"]["decode"]["one_core"]["images_per_s"]
    lines = [f"Cost model, from the {n:,}-photo row (head mode's two views, lite0):", ""]
    lines += ["| photos | extraction on this 2-core CPU | on M such machines | decode-bound floor on a 16-core GPU machine "
              "| store | shards | warm read-back |", "|---|---|---|---|---|---|---|"]
    for total in (1_000_000, 10_000_000):
        hours = total * ms / 1000 / 3600
        floor_min = total / (16 * decode) / 60
        lines.append(
            f"| {total:,} | {hours:.1f} h | {hours:.1f}/M h | {floor_min:.0f} min / N machines "
            f"| {total * per_photo_bytes / 1e9:,.0f} GB | {total * per_photo_bytes / shard_mb_bytes():,.0f} "
            f"| {total * read_s / 60:.0f} min |"
        )
    lines += ["", f"Extraction scales by machines because every process computes its own share into the shared store. "
              f"On a GPU machine the network pass is no longer the limit (not measured here: this machine has no GPU); "
              f"decoding is, at {decode:.0f} photos/s per core (bench/results/speed.json), so 16 decoding cores bound it "
              f"at about {16 * decode:,.0f} photos/s. Training reads the whole store into memory "
              f"({per_photo_bytes / 1e3:.1f} kB a photo), which at 10M photos asks for a machine with that much RAM."]
    return lines


def shard_mb_bytes() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from florist.store import shard_bytes

    return shard_bytes()


def main() -> None:
    if sys.argv[1:2] == ["--extract-child"]:
        print(json.dumps(extract_child(Path(sys.argv[2]), Path(sys.argv[3]))))
        return
    if sys.argv[1:2] == ["--train-child"]:
        print(json.dumps(train_child(*(Path(a) for a in sys.argv[2:5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path, nargs="?", help="the source photo folder")
    parser.add_argument("--sizes", default="1500,10000,100000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/florist-scale"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if rewrite_table(args, TABLE, table, README):
        return
    sys.path.insert(0, str(ROOT / "src"))
    from speed import default_combo

    from florist import __version__

    engine, bf16 = default_combo()
    sizes = [int(s) for s in args.sizes.split(",")]
    report = {
        "command": "scale.py " + " ".join(sys.argv[1:]),
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "engine": f"{engine} {'bf16' if bf16 else 'fp32'}",
        "florist_version": __version__,
        "sizes": [measure_size(args.photos, args.work, n, os.cpu_count() or 1) for n in sizes],
    }
    write_results(report, args.out, RESULTS, TABLE, table(report), README)


if __name__ == "__main__":
    main()
