"""Every setting of a training run, in one record: its type, its default, its meaning, what it allows.

:class:`TrainConfig` is that record. Each field is declared once, with
:func:`setting`, and everything else is derived from the declaration: the
checks of :func:`check_values`, the ``florist train`` options and their help
(``florist.cli``), the class docstring. Settings whose default depends on the
mode default to ``None`` ("unset"); the chosen mode fills them in (see
:mod:`florist.training.registry`), so that the same field can mean 15 epochs in
head mode and 6 in tune-top without either number being written twice.

Like scikit-learn's parameter constraints, checks run before any work, and a
message names the setting, the value given and what is allowed.

This module needs no torch: the CLI builds its options from it even where only
ONNX Runtime is installed.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from ..bundled import DEFAULT_BACKBONE
from ..data import DEFAULT_MAX_PIXELS, check_split
from ..errors import SettingError, literal


@dataclass(frozen=True)
class Rule:
    """What a setting allows: ``test(value)``, and the words for it (``"> 0"``, ``"in [0, 1)"``)."""

    allowed: str
    test: Callable[[Any], bool]


def above(low: float) -> Rule:
    return Rule(f"> {low:g}", lambda v: v > low)


def at_least(low: float) -> Rule:
    return Rule(f">= {low:g}", lambda v: v >= low)


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Rule:
    """``[low, high)`` by default; ``low_open``/``high_open`` choose each end."""
    text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def test(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Rule(text, test)


def one_of(*choices: str) -> Rule:
    return Rule("one of " + ", ".join(map(repr, choices)), lambda v: v in choices)


#: Metadata key of a field's :class:`Setting` declaration.
_KEY = "florist"


@dataclass(frozen=True)
class Setting:
    """The declaration of one :class:`TrainConfig` field.

    Attributes:
        help: what it does, for the CLI help and the docs; ``{name}`` names another setting
            (spelled for each reader by :func:`florist.errors.spell`).
        rule: what a value must satisfy (None: any value of the field's type).
        unset: what ``None`` means, when it means something ("all", "never").
    """

    help: str
    rule: Rule | None = None
    unset: str = "none"


def setting(default: Any, help: str, rule: Rule | None = None, unset: str = "none") -> Any:
    """A :class:`TrainConfig` field with its declaration attached."""
    return field(default=default, metadata={_KEY: Setting(help, rule, unset)})


@dataclass
class TrainConfig:
    """Every setting of a training run; the resolved one is saved in ``model.json`` and ``run.json``.

    The list of settings below is generated from their declarations and the modes' defaults
    (:func:`florist.training.registry.document_settings`).
    """

    mode: str | None = setting(None, "What is trained (see the modes in the README).")
    blocks: int | None = setting(
        None, "How many of the backbone's last blocks to train.", at_least(1), unset="all"
    )
    backbone_lr: float | None = setting(None, "Peak learning rate of the top backbone block.", above(0))
    layer_decay: float | None = setting(
        None, "Each block's learning rate is this times the next block's.", within(0, 1, low_open=True, high_open=False)
    )
    warmup: float | None = setting(
        None, "Fraction of the steps that warm the learning rate up before its cosine decay.", within(0, 1)
    )
    keep: str | None = setting(
        None, "Keep the 'last' epoch's weights, or the 'best' by eval top-1 (then optimistic).", one_of("last", "best")
    )
    patience: int | None = setting(
        None, "Stop after this many epochs without a better eval top-1.", at_least(1), unset="never"
    )
    device: str | None = setting(None, "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.")
    disk_budget: float | None = setting(
        None, "Local disk, in MB, for keeping photos read from a URL that the run reads again "
        "(finetune's later passes); photos beyond it are fetched again; 0 keeps none. Changes no result.",
        at_least(0),
    )
    precision: str = setting(
        "auto",
        "Features and training in bf16, fp32, or auto (bf16 where the CPU has native bfloat16); "
        "stored with the model, so prediction computes features the same way.",
        one_of("auto", "fp32", "bf16"),
    )
    engine: str = setting(
        "auto",
        "What runs the frozen network passes (features, cached activations, prediction): openvino, "
        "onnxruntime, torch, or auto (OpenVINO on a CPU where it loads, else torch); training steps always "
        "run on torch. Stored with the model.",
        one_of("auto", "openvino", "onnxruntime", "torch"),
    )
    backbone: str = setting(
        DEFAULT_BACKBONE,
        "efficientnet_lite0/1/2 (offline), any timm model name (downloads weights), or timm:NAME; "
        "or a comma-separated list: head mode concatenates their features, tune-top trains one model "
        "per backbone and averages them (an ensemble).",
    )
    weights: str | None = setting(
        None, "Local backbone checkpoint (.safetensors or state dict) instead of its default weights.",
        unset="the backbone's own",
    )
    eval_fraction: float | None = setting(0.2, "Share of each class held out for evaluation.")  # checked by data.check_split
    train_per_class: int | None = setting(
        None, "Exact number of training images per class (the rest is eval); overrides {eval_fraction}.", unset="off"
    )
    epochs: int | None = setting(None, "Passes over the training set.", at_least(1))
    steps: int | None = setting(None, "Training steps (batches); overrides {epochs}.", at_least(1), unset="from epochs")
    max_steps: int | None = setting(
        None, "At most this many training steps: fewer passes than {epochs} over a large training set ({steps} overrides it).",
        at_least(1), unset="no limit",
    )
    optimizer: str | None = setting(None, "adam (AdamW) or sgd.", one_of("adam", "sgd"))
    lr: float | None = setting(None, "Learning rate of the head.", above(0))
    decay_rate: float | None = setting(
        None, "Multiply the learning rate by this every {decay_steps} steps (smoothly, per step).",
        within(0, 1, low_open=True, high_open=False),
    )
    decay_steps: int | None = setting(None, "Steps over which the learning rate is multiplied by {decay_rate}.", at_least(1))
    batch_size: int = setting(32, "Examples per step.", at_least(1))
    dropout: float = setting(0.0, "Dropout on the features before the classifier.", within(0, 1))
    label_smoothing: float | None = setting(None, "Label smoothing of the cross-entropy loss.", within(0, 1))
    class_weights: str | None = setting(
        None, "'balanced' weights the loss by n / (classes * n_class).", one_of("balanced")
    )
    weight_decay: float | None = setting(None, "L2 penalty, decoupled from the gradient as in AdamW.", at_least(0))
    views: int | None = setting(
        None, "Cached views per training image beyond the clean one: 1 = its mirror; K > 1 adds K-1 random "
        "crops with colour jitter.", at_least(0),
    )
    tta: bool = setting(True, "Average the predictions of each image and its mirror.")
    calibration_folds: int | None = setting(
        None, "Cross-fit the mode's recipe on this many folds of the training part to calibrate its "
        "probabilities (temperature scaling on the held-out predictions); 0 = off.", at_least(0),
    )
    seed: int = setting(0, "Random seed of the split and the training (same seed + same data = same model).")
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, "Refuse images whose header claims more pixels than this (decompression bombs).",
        at_least(1),
    )

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes``; an unknown name is a :class:`~florist.errors.SettingError`."""
        return TrainConfig(**{**self.to_dict(), **checked_names(changes)})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def tta_views(self) -> list[str]:
        """Views whose predictions are averaged at evaluation and prediction."""
        return ["clean", "flip"] if self.tta else ["clean"]

    @property
    def backbone_names(self) -> list[str]:
        """The comma-separated names of :attr:`backbone`, in order."""
        return [n.strip() for n in self.backbone.split(",") if n.strip()]


#: Settings every mode reads; the others belong to the modes whose defaults name them.
COMMON = (
    "mode", "precision", "engine", "backbone", "weights", "eval_fraction", "train_per_class", "steps", "batch_size",
    "dropout", "class_weights", "tta", "seed", "max_pixels",
)  # fmt: skip


def declarations() -> dict[str, tuple[Field, Setting]]:
    """Field and declaration of every setting, in :class:`TrainConfig` order."""
    return {f.name: (f, f.metadata[_KEY]) for f in fields(TrainConfig)}


def field_default(name: str) -> Any:
    """The default of a field before any mode fills it in."""
    f = declarations()[name][0]
    return None if f.default is MISSING else f.default


def checked_names(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` if every key names a setting, else a :class:`SettingError` naming the first that does not."""
    known = declarations()
    for name in values:
        if name not in known:
            raise SettingError(f"unknown setting {literal(name)}; the settings are: {', '.join(known)}")
    return values


def check_values(cfg: TrainConfig) -> None:
    """Check every value that is set against its type and its rule.

    Raises:
        SettingError: ``"{batch_size} must be >= 1, got 0"``, in the caller's spelling.
    """
    hints = _type_hints()
    for name, (_, decl) in declarations().items():
        value = getattr(cfg, name)
        if value is None:
            if not _allows_none(hints[name]):
                raise SettingError(f"{{{name}}} must be set, got None")
            continue
        kind = _base_type(hints[name])
        if not _is_instance(value, kind):
            raise SettingError(f"{{{name}}} must be {_type_words(kind)}, got {literal(value)}")
        if decl.rule is not None and not decl.rule.test(value):
            raise SettingError(f"{{{name}}} must be {decl.rule.allowed}, got {literal(value)}")
    check_split(cfg.eval_fraction, cfg.train_per_class)
    names = cfg.backbone_names
    if not names:
        raise SettingError(f"{{backbone}} names no network, got {literal(cfg.backbone)}")
    if len(set(names)) != len(names):
        raise SettingError(f"{{backbone}} lists a network twice: {literal(cfg.backbone)}")
    if len(names) > 1 and cfg.weights:
        raise SettingError("{weights} applies to a single backbone, not to a list")


def value_type(name: str) -> type:
    """The type of a setting's values: ``int`` for ``epochs: int | None``, and so on."""
    return _base_type(_type_hints()[name])


@functools.cache
def _type_hints() -> dict[str, Any]:
    """:class:`TrainConfig`'s field types, evaluated once (1 ms each time; the CLI asks for every field)."""
    return typing.get_type_hints(TrainConfig)


def _allows_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _base_type(hint: Any) -> type:
    """``int`` for ``int | None``, and so on."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _is_instance(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_words(kind: type) -> str:
    return {int: "an integer", float: "a finite number", str: "a string", bool: "True or False"}[kind]
