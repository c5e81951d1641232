"""Refresh README.md's table of per-mode defaults from florist's mode registry (run by `make docs`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from readme_table import update_readme  # noqa: E402

from florist.training.registry import defaults_table  # noqa: E402

update_readme("mode-defaults", defaults_table(), ROOT / "README.md")
