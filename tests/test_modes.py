"""The settings and the mode registry: checks up front, one source for every per-mode default,
and the same checks run over every registered mode (a new mode gets them for free)."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import florist
from florist.errors import SettingError
from florist.training import TrainConfig, all_modes, resolve
from florist.training.registry import ByValue, default_text, defaults_table, help_text
from florist.training.settings import COMMON, declarations

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "florist"
MODE_NAMES = [m.name for m in all_modes()]
#: Settings every mode reads, chosen to make a run short.
SHORT = {"steps": 2, "batch_size": 8, "eval_fraction": 0.25, "precision": "fp32"}


# ---------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("optimizer", "rmsprop"),
        ("lr", 0.0),
        ("dropout", 1.0),
        ("label_smoothing", -0.1),
        ("class_weights", "inverse"),
        ("batch_size", 0),
        ("views", -1),
        ("epochs", "3"),
        ("tta", 1),
        ("decay_rate", 1.5),
        ("lr", float("nan")),
    ],
)
def test_bad_values_name_the_setting_the_value_and_what_is_allowed(name: str, value) -> None:
    with pytest.raises(SettingError) as caught:
        resolve(TrainConfig(mode="head", **{name: value}))
    assert re.fullmatch(rf"{name} must be .+, got {re.escape(repr(value))}", str(caught.value)), caught.value
    assert caught.value.for_cli().startswith("--" + name.replace("_", "-") + " must be")


def test_unknown_settings_and_modes_are_refused() -> None:
    with pytest.raises(SettingError, match="unknown setting 'epoch'"):
        resolve(epoch=3)
    with pytest.raises(SettingError, match="mode must be one of 'head', 'tune-top', 'finetune', got 'fast'"):
        resolve(mode="fast")


#: Values some mode accepts, for the settings whose every default is None.
VALID = {"patience": 2, "blocks": 1}


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_a_setting_the_mode_does_not_read_is_refused(mode: str) -> None:
    """Every setting outside a mode's reads, for every mode: an error that names the setting and the mode."""
    reads = next(m for m in all_modes() if m.name == mode).reads
    unread = [name for name in declarations() if name not in reads]
    assert unread, mode
    for name in unread:
        reader = next(m for m in all_modes() if name in m.reads)
        value = VALID.get(name, getattr(resolve(mode=reader.name), name))
        with pytest.raises(SettingError) as caught:
            resolve(mode=mode, **{name: value})
        assert str(caught.value).startswith(f"{name} applies to mode=")
        assert f"not to mode={mode!r}" in str(caught.value)
        assert f"--{name.replace('_', '-')} applies to --mode " in caught.value.for_cli()


def test_tune_top_with_sgd_says_what_it_uses_instead() -> None:
    with pytest.raises(SettingError) as caught:
        resolve(optimizer="sgd")  # the default mode
    assert str(caught.value) == (
        "optimizer applies to mode='head', not to mode='tune-top' (the default) "
        "(which trains with AdamW, a warm-up and a cosine decay)"
    )


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--mode", "tune-top", "--optimizer", "sgd"], "--optimizer applies to --mode head, not to --mode tune-top"),
        (["--mode", "head", "--keep", "best"], "--keep applies to --mode finetune, not to --mode head"),
        (["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1), got 1.5"),
    ],
)
def test_bad_settings_exit_2_at_once_and_leave_nothing(flags: list[str], said: str, photos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "florist", "train", str(photos), "--out", str(run), *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    took = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {said}"), proc.stderr
    assert took < 5, f"{took:.1f} s"
    assert not run.exists()


def test_the_python_api_raises_before_touching_the_run_folder(photos: Path, tmp_path: Path) -> None:
    for settings in ({"eval_fraction": 1.5}, {"mode": "tune-top", "optimizer": "sgd"}, {"mode": "head", "keep": "best"}):
        with pytest.raises(SettingError):
            florist.train(photos, tmp_path / "run", **settings)
    assert not (tmp_path / "run").exists()


def test_resolving_fills_each_modes_defaults_once() -> None:
    for mode in all_modes():
        cfg = resolve(mode=mode.name)
        for name, default in mode.defaults.items():
            expected = default.pick(cfg.to_dict()) if isinstance(default, ByValue) else default
            assert getattr(cfg, name) == expected, (mode.name, name)
        assert resolve(cfg) == cfg  # a saved config trains the same run again
    sgd = resolve(mode="head", optimizer="sgd")
    assert (sgd.lr, sgd.decay_rate) == (0.01, 0.9)
    assert resolve().mode == "tune-top"


# ---------------------------------------------------------------------------
# One source for the per-mode defaults
# ---------------------------------------------------------------------------


def test_each_default_is_written_once() -> None:
    """A per-mode default is a literal in its mode's module and nowhere else in the package."""
    for mode in all_modes():
        module = SRC / "training" / "modes" / f"{mode.name.replace('-', '_')}.py"
        assert f'name="{mode.name}"' in module.read_text()
    others = [p for p in SRC.rglob("*.py") if "modes" not in p.parts]
    for path in others:
        text = path.read_text()
        assert "MODE_DEFAULTS" not in text and '"epochs": 15' not in text and '"views": 7' not in text, path


def test_help_readme_and_docstring_show_the_registrys_defaults() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "florist", "train", "--help"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    shown = re.sub(r"[\s│]+", " ", proc.stdout)
    readme = (ROOT / "README.md").read_text()
    for name in declarations():
        if name not in COMMON:
            assert default_text(name) in shown, name
        assert help_text(name) in " ".join(TrainConfig.__doc__.split()), name
    assert defaults_table() in readme, "run `make docs` to refresh the README's table of mode defaults"


# ---------------------------------------------------------------------------
# The same checks for every registered mode
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=MODE_NAMES)
def mode_run(request, photos: Path, tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A short run of each registered mode on the tiny backbone."""
    run = tmp_path_factory.mktemp(request.param) / "run"
    florist.train(photos, run, mode=request.param, **SHORT, **tiny)
    return request.param, run


def test_every_mode_writes_a_run_that_predicts_what_it_evaluated(mode_run: tuple[str, Path]) -> None:
    mode, run = mode_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == mode and metrics["history"]["step"][-1] == SHORT["steps"]
    with open(run / "eval_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    model = florist.load(run)
    probs, errors = model.predict_proba([r["path"] for r in rows])
    assert not errors
    stored = np.array([[float(r[f"p:{c}"]) for c in model.classes] for r in rows])
    # tune-top evaluated on its cached fp16 activations; prediction runs the whole network
    np.testing.assert_allclose(probs, stored, atol=1e-3)
    assert (probs.argmax(1) == stored.argmax(1)).all()
    assert json.loads((run / "model.json").read_text())["train_config"] == resolve(mode=mode, **_run_settings(run)).to_dict()


def _run_settings(run: Path) -> dict:
    given = json.loads((run / "run.json").read_text())["config"]
    return {k: given[k] for k in ("backbone", "weights", *SHORT)}


def test_every_modes_hparams_show_its_defaults(mode_run: tuple[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    mode, run = mode_run
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    shown = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    for name, value in resolve(mode=mode, **_run_settings(run)).to_dict().items():
        expected = "none" if value is None else value
        assert shown[name] == (pytest.approx(expected) if isinstance(expected, float) else expected), name


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def _imports() -> dict[str, set[str]]:
    """florist module -> the florist modules it imports anywhere (functions included), minus TYPE_CHECKING ones.

    ``importlib`` calls (the registry finding the modes, the package's names that need torch) are not
    import statements, and both go downwards.
    """
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if _is_type_checking(node) for n in ast.walk(node)}
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom):  # `from .x import y`: module x.y if there is one, else x
                base = _absolute(node, package)
                found |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = found
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles() -> None:
    graph = _imports()
    assert len(graph) > 30 and "florist.training.pipeline" in graph["florist.training.modes.head"]  # in fit()
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_low_layers_depend_on_nothing_above_them() -> None:
    graph = _imports()
    below_remote = {"florist.errors", "florist.files", "florist.runfiles", "florist.distributed"}
    assert _reachable(graph, "florist.remote") <= below_remote | {"florist"}
    for inference in ("predict", "prediction", "runtime", "loader", "export", "serve", "evaluate", "report"):
        reached = _reachable(graph, f"florist.{inference}")
        assert not {m for m in reached if m.startswith("florist.training")}, inference


def test_run_folders_of_earlier_versions_load(trained_run: Path, tmp_path: Path) -> None:
    """A model.json without the fields a later florist added loads with their defaults, one with a field it
    no longer writes loads too; a damaged one is refused."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "labels.txt"):
        (old / name).write_bytes((trained_run / name).read_bytes())
    meta = json.loads((trained_run / "model.json").read_text())
    for added in ("bf16", "train_config", "florist_version"):
        del meta[added]
    meta["tuned_id"] = None  # written until ensembles came: a tuned backbone's id is now computed from its tensors
    (old / "model.json").write_text(json.dumps(meta))
    model = florist.load(old)
    assert model.bundle.bf16 is False and model.bundle.train_config == {} and model.tta_views == meta["tta_views"]
    del meta["head"]
    (old / "model.json").write_text(json.dumps(meta))
    with pytest.raises(florist.FloristError, match="model.json is incomplete or damaged"):
        florist.load(old)
