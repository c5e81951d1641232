"""The training modes, one module each; every module registers its mode when imported.

See :mod:`florist.training.registry` for what a mode declares.
"""
