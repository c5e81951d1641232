"""Make the README's pictures of a run: docs/img/report.png and docs/img/confusion_matrix.png.

Run from the repository root:

    python docs/make_screenshots.py                     # trains runs/flowers on ../shared/data/flower_photos
    python docs/make_screenshots.py --run runs/other    # or pictures another finished run

A finished run is reused as it is. The report is rendered with headless Chromium
(Debian: ``apt-get install chromium``), then scaled down and reduced to a
256-colour palette so it stays well under 300 KB in the repository; the confusion
matrix is the run's own ``confusion_matrix.png``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from PIL import Image

import florist
from florist.bundle import is_complete
from florist.report import CONFUSION_PNG, screenshot, write_report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flower_photos"
OUT = ROOT / "docs" / "img"


def shrink(src: Path, dest: Path, width: int) -> None:
    """Scale ``src`` to ``width`` pixels wide and save it as a palette PNG."""
    with Image.open(src) as img:
        img = img.convert("RGB")
        if img.width > width:
            img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
        palette = img.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        palette.save(dest, optimize=True)
    print(f"{dest.relative_to(ROOT)}: {img.width}x{img.height}, {dest.stat().st_size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, default=Path("runs/flowers"), help="run folder (trained if unfinished)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="photos to train on if the run is unfinished"
    )
    parser.add_argument("--height", type=int, default=2600, help="browser window height for the report")
    args = parser.parse_args()

    if not is_complete(args.run):
        florist.train(args.data, args.run, verbose=True)
    report = write_report(args.run)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shot = screenshot(report, Path(tmp) / "report.png", width=1280, height=args.height)
        shrink(shot, OUT / "report.png", width=900)
    shutil.copyfile(args.run / CONFUSION_PNG, OUT / "confusion_matrix.png")
    print(f"{(OUT / 'confusion_matrix.png').relative_to(ROOT)}: copied from {args.run}")


if __name__ == "__main__":
    main()
