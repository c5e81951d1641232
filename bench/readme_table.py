"""What the benchmark scripts share: refreshing their generated table in README.md."""

from __future__ import annotations

from pathlib import Path


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
