"""Training: the settings, the registry of modes, and the pipeline that runs a mode.

    settings.py   TrainConfig: every setting, declared once (type, default, help, rule)
    registry.py   Mode, register, resolve: what each mode reads and defaults to
    modes/        one module per mode (head, tune-top, finetune), each registering itself
    pipeline.py   train(): settings -> prepare -> extract -> fit -> bundle -> report
    linear.py     head mode's linear classifier on feature arrays (fit_head)
    blocks.py     tune-top's split of a backbone and its training on cached activations
    network.py    finetune's training of the whole network on augmented pixels
    loop.py       the optimisation loop every mode shares

This package's ``__init__`` and the registry load without torch (the CLI builds
its options from them); :func:`florist.train` is :func:`.pipeline.train`.
"""

from .registry import DEFAULT_MODE, Mode, all_modes, document_settings, get_mode, register, resolve
from .settings import TrainConfig

TrainConfig.__doc__ = document_settings()  # every setting, with each mode's default

__all__ = ["DEFAULT_MODE", "Mode", "TrainConfig", "all_modes", "get_mode", "register", "resolve"]
