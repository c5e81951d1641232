"""``python -m florist`` (also what ``torchrun -m florist`` runs)."""

from .cli import main

main()
