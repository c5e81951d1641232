"""What the benchmark scripts share: the run they measured, their results file, and their README table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def update_readme(name: str, text: str, readme: Path) -> None:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``readme``.

    A README without the markers is left alone, so a script run elsewhere never
    writes a table into someone else's file.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text()
    if start not in content:
        return
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{text}\n{end}{after}")


def run_facts(run: Path) -> dict:
    """When, and on which trained run, a benchmark measured: the head of its results file."""
    bundle = json.loads((run / "model.json").read_text())
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "run": str(run),
        "backbones": [b["name"] for b in bundle["backbones"]],
        "tta_views": bundle.get("tta_views"),
        "run_bf16": bundle.get("bf16", False),
    }


def write_results(report: dict, out: Path, default: Path, name: str, table: str, readme: Path) -> None:
    """Write ``report`` as JSON to ``out``; the README shows the committed results (``default``) only."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if out.resolve() == default.resolve():
        update_readme(name, table, readme)


def results_parser(description: str, default: Path) -> argparse.ArgumentParser:
    """A bench's command line with ``--out`` (its results file) and ``--table-only``; it adds its own arguments."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--table-only", action="store_true", help="rewrite README's table from --out, measure nothing")
    return parser


def rewrite_table(args: argparse.Namespace, name: str, table: Callable[[dict], str], readme: Path) -> bool:
    """With ``--table-only``, rewrite README's ``name`` table from the results in ``--out``; True if it did."""
    if args.table_only:
        update_readme(name, table(json.loads(args.out.read_text())), readme)
    return args.table_only


def photo_bench(
    description: str,
    default: Path,
    name: str,
    table: Callable[[dict], str],
    measure: Callable[[argparse.Namespace], dict],
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> None:
    """The command line of a bench over one photo folder: measure, write ``default``'s JSON and README table ``name``.

    ``measure(args)`` gives the figures (``args.photos`` is the folder); ``arguments`` adds the bench's own options.
    """
    parser = results_parser(description, default)
    parser.add_argument("photos", type=Path, nargs="?", help="a photo folder (not needed with --table-only)")
    arguments(parser)
    args = parser.parse_args()
    if rewrite_table(args, name, table, ROOT / "README.md"):
        return
    if args.photos is None:
        parser.error("the photo folder is required")
    sys.path.insert(0, str(ROOT / "src"))
    report = {"measured": time.strftime("%Y-%m-%d %H:%M"), "photos": str(args.photos), **measure(args)}
    print(table(report))
    write_results(report, args.out, default, name, table(report), ROOT / "README.md")
