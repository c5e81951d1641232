"""The training modes, and the one place that says what each of them reads and defaults to.

A mode is one module of :mod:`florist.training.modes` that calls :func:`register` with
a :class:`Mode`: its name, a summary, the defaults of the settings it reads
beyond :data:`~florist.training.settings.COMMON`, what it does instead of the
settings it does not read, its own checks and its ``fit`` function. The
pipeline (:mod:`florist.training.pipeline`) calls the registered mode, and the
CLI options, their help, the README table and the TensorBoard hparams are all
derived from these records, so they cannot disagree. Adding a mode is adding one
module that registers itself (the way timm's ``register_model`` works).

:func:`resolve` turns what a caller gave into the settings a run uses: every
value checked, the mode's defaults filled in, and a setting the mode does not
read refused rather than ignored.

Mode modules import torch only inside ``fit``: this registry, like the settings,
loads without it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import SettingError, literal, spell
from .settings import COMMON, TrainConfig, check_values, declarations, field_default

if TYPE_CHECKING:
    from .job import Fitted, Job

#: Mode used when none is given.
DEFAULT_MODE = "tune-top"
#: The package whose modules are the modes (each registers itself when imported).
MODES_PACKAGE = "florist.training.modes"
#: What a mode without ``disk_budget`` does instead: the feature cache serves its later passes.
KEEPS_NO_PHOTOS = "which reads each photo once, for its features, and keeps none"


@dataclass(frozen=True)
class ByValue:
    """A default that follows another setting: ``ByValue("optimizer", {"adam": 0.005, "sgd": 0.01})``."""

    setting: str
    values: Mapping[Any, Any]

    def pick(self, settings: Mapping[str, Any]) -> Any:
        return self.values[settings[self.setting]]

    def describe(self) -> str:
        return ", ".join(f"{describe_value(v)} with {k}" for k, v in self.values.items())


@dataclass(frozen=True)
class Mode:
    """One way of training, as registered by its module.

    Attributes:
        name: the value of the ``mode`` setting.
        summary: what is trained and what it costs, for the help text.
        defaults: the settings this mode reads beyond ``COMMON``, with their values when unset.
        fit: trains on a :class:`~florist.training.pipeline.Job`, returns a
            :class:`~florist.training.pipeline.Fitted`.
        order: position in listings (cheapest first).
        instead: for settings this mode does not read, what it does instead (for the error message).
        check: extra checks of resolved settings, raising :class:`~florist.errors.SettingError`.
        ensemble: given several backbones, train one model per backbone and average them
            (:mod:`florist.training.ensemble`); otherwise their features feed one head side by side.
    """

    name: str
    summary: str
    defaults: Mapping[str, Any]
    fit: Callable[["Job"], "Fitted"]
    order: int
    instead: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[TrainConfig], None] | None = None
    ensemble: bool = False

    @property
    def reads(self) -> tuple[str, ...]:
        """Every setting this mode uses."""
        return COMMON + tuple(self.defaults)


_MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add ``mode`` to the registry (called once by its module, when imported)."""
    unknown = set(mode.defaults) - set(declarations())
    if unknown or set(mode.defaults) & set(COMMON):
        raise ValueError(f"mode {mode.name!r}: defaults must name settings outside COMMON, got {sorted(mode.defaults)}")
    _MODES[mode.name] = mode
    return mode


def all_modes() -> list[Mode]:
    """Every registered mode, cheapest first (importing this package's mode modules on first use)."""
    if not _MODES:
        package = importlib.import_module(MODES_PACKAGE)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{MODES_PACKAGE}.{info.name}")
    return sorted(_MODES.values(), key=lambda m: m.order)


def get_mode(name: str) -> Mode:
    """The registered mode called ``name``.

    Raises:
        SettingError: no such mode.
    """
    known = {m.name: m for m in all_modes()}
    if name not in known:
        raise SettingError(f"{{mode}} must be one of {', '.join(map(repr, known))}, got {literal(name)}")
    return known[name]


def resolve(config: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """The settings a run uses: ``config`` with ``overrides``, checked, the mode's defaults filled in.

    A setting the chosen mode does not read must be left unset; in the result it is
    None. Resolving a resolved config gives it back unchanged.

    Raises:
        SettingError: an unknown name, a bad value, or a setting the mode does not read.
    """
    given = (config or TrainConfig()).replace(**overrides)
    check_values(given)
    mode = get_mode(given.mode or DEFAULT_MODE)
    values = given.to_dict()
    for name, value in values.items():
        if value is not None and name not in mode.reads:
            raise SettingError(_not_read(name, mode, defaulted=given.mode is None))
    values["mode"] = mode.name
    for name, default in mode.defaults.items():
        if values[name] is None and not isinstance(default, ByValue):
            values[name] = default
    for name, default in mode.defaults.items():
        if values[name] is None and isinstance(default, ByValue):
            values[name] = default.pick(values)
    resolved = TrainConfig(**values)
    if mode.check is not None:
        mode.check(resolved)
    return resolved


def _not_read(name: str, mode: Mode, defaulted: bool) -> str:
    readers = " and ".join(f"{{mode:{m.name}}}" for m in all_modes() if name in m.reads)
    which = f"{{mode:{mode.name}}}" + (" (the default)" if defaulted else "")
    why = f" ({mode.instead[name]})" if name in mode.instead else ""
    return f"{{{name}}} applies to {readers}, not to {which}{why}"


def one_backbone(cfg: TrainConfig) -> None:
    """The check of finetune: one backbone, not a list."""
    if len(cfg.backbone_names) > 1:
        raise SettingError(
            f"{{mode:{cfg.mode}}} tunes one backbone; a list of backbones is for {{mode:head}} (features side by side) "
            "and {mode:tune-top} (an ensemble)"
        )


# ---------------------------------------------------------------------------
# What the help, the docs and TensorBoard show
# ---------------------------------------------------------------------------


def describe_value(value: Any, unset: str = "none") -> str:
    if value is None:
        return unset
    if isinstance(value, ByValue):
        return value.describe()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_text(name: str) -> str:
    """``"[default: head 15, tune-top 6, finetune 12]"``, or ``"[finetune only; default: last]"``."""
    _, decl = declarations()[name]
    if name in COMMON:
        default = DEFAULT_MODE if name == "mode" else field_default(name)
        return f"[default: {describe_value(default, decl.unset)}]"
    readers = [m for m in all_modes() if name in m.reads]
    values = [describe_value(m.defaults[name], decl.unset) for m in readers]
    body = values[0] if len(set(values)) == 1 else ", ".join(f"{m.name} {v}" for m, v in zip(readers, values))
    only = "" if len(readers) == len(all_modes()) else " and ".join(m.name for m in readers) + " only; "
    return f"[{only}default: {body}]"


def help_text(name: str, cli: bool = False) -> str:
    """A setting's help with its modes and defaults, as ``florist train --help`` (``cli``) shows it."""
    _, decl = declarations()[name]
    text = spell(decl.help, cli)
    if name == "mode":
        text += " " + " ".join(f"{m.name}: {m.summary}" for m in all_modes())
    return f"{text} {default_text(name)}"


def defaults_table() -> str:
    """The per-mode defaults as a Markdown table (README), "-" where a mode does not read the setting."""
    ms = all_modes()
    rows = ["| setting | " + " | ".join(m.name for m in ms) + " |", "|---" * (len(ms) + 1) + "|"]
    for name, (_, decl) in declarations().items():
        if name in COMMON:
            continue
        cells = [describe_value(m.defaults[name], decl.unset) if name in m.defaults else "-" for m in ms]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def document_settings() -> str:
    """The text of :class:`TrainConfig`'s docstring: every setting, its meaning and its defaults."""
    lines = [TrainConfig.__doc__.strip().split("\n")[0], "", "Attributes:"]
    for name in declarations():
        lines.append(f"    {name}: {help_text(name)}")
    return "\n".join(lines)
