"""The command line: help everywhere, the documented commands, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from florist.cli import app

runner = CliRunner()
COMMANDS = ["prepare", "train", "evaluate", "predict", "explain", "download", "export", "serve"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_top_level_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_prepare_train_evaluate_predict(photos: Path, tiny_cli: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["prepare", str(photos), "--out", str(tmp_path / "prep"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "prep" / "labels.txt").read_text().split() == ["blue", "green", "red"]

    args = ["train", str(photos), "--out", str(run), "--mode", "head", "--epochs", "5", *tiny_cli]
    result = runner.invoke(app, [*args, "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == 1.0

    result = runner.invoke(app, ["evaluate", str(run), str(photos), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 24 and metrics["top1"] == 1.0

    red = sorted((photos / "red").iterdir())
    result = runner.invoke(app, ["predict", str(run), str(red[0]), str(red[1]), "--top-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["label"] for line in lines] == ["red", "red"]
    assert len(lines[0]["top_k"]) == 3

    result = runner.invoke(app, ["predict", str(run), str(photos / "green"), "--top-k", "1", "--csv"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 8 and {r["label"] for r in rows} == {"green"}


def test_predict_bad_file_exit_status_1(trained_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_text("#!/bin/sh\necho hi\n")
    result = runner.invoke(app, ["predict", str(trained_run), str(bad), "--json"])
    assert result.exit_code == 1
    assert "error" in json.loads(result.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{tmp}/missing", "--out", "{tmp}/run"], "data folder not found"),
        (["train", "{photos}", "--out", "{tmp}/run", "--backbone", "not_a_model"], "unknown backbone"),
        (["train", "{photos}", "--out", "{tmp}/run", "--optimizer", "rmsprop"], "optimizer"),
        (["train", "{photos}", "--out", "{tmp}/run", "--train-per-class", "50"], "needs at least 51"),
        (["evaluate", "{tmp}/missing-run"], "run folder not found"),
        (["predict", "{tmp}", "x.jpg"], "no finished model"),
    ],
)
def test_errors_are_one_line_without_traceback(
    args: list[str], message: str, photos: Path, tiny_cli: list[str], tmp_path: Path
) -> None:
    argv = [a.format(tmp=tmp_path, photos=photos) for a in args]
    if argv[0] == "train" and "--backbone" not in argv:
        argv += tiny_cli  # the tiny net: building it is quicker than EfficientNet-Lite0
    proc = subprocess.run([sys.executable, "-m", "florist", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_environment_errors_are_one_line(photos: Path, tmp_path: Path) -> None:
    """An OSError (here: a file where the output folder should be) is a message, not a traceback."""
    (tmp_path / "taken").write_text("a file")
    result = runner.invoke(app, ["prepare", str(photos), "--out", str(tmp_path / "taken" / "run"), "--quiet"])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ") and "Not a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_error_messages_print_names_that_look_like_markup(trained_run: Path, tmp_path: Path) -> None:
    missing = tmp_path / "[/red] [bold]x.jpg"
    result = runner.invoke(app, ["predict", str(trained_run), str(missing)])
    assert result.exit_code == 2, result.output
    assert f"no files match '{missing}'" in result.stderr.replace("\n", "")  # [ makes it a glob


def test_cli_reference_is_up_to_date(tmp_path: Path) -> None:
    """docs/cli.md is generated from the CLI (make docs); a stale copy fails here."""
    typer_bin = Path(sys.executable).with_name("typer")
    out = tmp_path / "cli.md"
    subprocess.run(
        [str(typer_bin), "florist.cli", "utils", "docs", "--name", "florist", "--output", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    committed = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert out.read_text() == committed.read_text(), "run `make docs` to refresh docs/cli.md"


def test_train_tune_top_from_the_command_line(photos: Path, tiny_cli: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", str(photos), "--out", str(run), "--mode", "tune-top", "--blocks", "1", "--epochs", "8"]
    result = runner.invoke(app, [*args, *tiny_cli, "--views", "1", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["mode"] == "tune-top" and metrics["top1"] == 1.0
    assert json.loads((run / "model.json").read_text())["train_config"]["blocks"] == 1
    result = runner.invoke(app, ["train", str(photos), "--out", str(tmp_path / "x"), "--mode", "finetune-all"])
    assert result.exit_code == 2


def test_predict_into_a_closed_pipe_exits_quietly(trained_run: Path, photos: Path) -> None:
    """`florist predict ... | head -1`: once the reader is gone, stop without an error message."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "florist", "predict", str(trained_run), str(photos), "--csv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader leaves before the first line is written
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert b"error" not in stderr.lower() and b"Traceback" not in stderr, stderr.decode()
