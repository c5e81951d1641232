"""bench/speed.py: every measurement runs on a few photos and the report is complete (no timing claims).

Every measurement runs on the tests' tiny backbone, through the script's own --backbone/--weights.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    sys.path.insert(0, str(SCRIPT.parent))  # as `python bench/speed.py` would, for bench/readme_table.py
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(SCRIPT.parent))


def test_images_are_listed_in_florists_order_and_spread_when_limited(speed, photos: Path) -> None:
    paths = speed.list_images(photos)
    assert len(paths) == 24
    assert {p.parent.name for p in speed.list_images(photos, 6)} == {"red", "green", "blue"}


def test_measurements_run_and_make_a_report(speed, photos: Path, tiny: dict[str, str], tmp_path: Path) -> None:
    paths = speed.list_images(photos)[::2]
    combos = {speed.combo_name(e, b): speed.backbone_for(e, b, **tiny) for e, b in speed.combinations()}
    assert {"torch fp32", "openvino fp32", "onnxruntime fp32"} <= set(combos)
    assert "onnxruntime bf16" not in combos, "ONNX Runtime's CPU provider has no bf16"
    default_name = speed.combo_name(*speed.default_combo())
    assert default_name.startswith("openvino"), "auto picks OpenVINO on a CPU where it loads"
    default = combos[default_name]
    results = {
        "default": default_name,
        "decode": {"one_core": speed.decode_rate(paths, default, 0, 1), "pipeline": speed.decode_rate(paths, default, 1, 1)},
        "compute_limit": {name: speed.compute_limit(b, [4, 8], 8, 1) for name, b in combos.items()},
        "florist": {name: speed.florist_rate(paths, b, 1, tmp_path) for name, b in combos.items()},
        "naive": speed.naive_rate(paths, 1, default, workers=1),
        "features_vs_torch_fp32": {n: speed.feature_agreement(paths[:4], b, combos["torch fp32"]) for n, b in combos.items()},
    }
    same = results["features_vs_torch_fp32"]["openvino fp32"]
    assert same["min_cosine"] > 0.99999 and same["max_relative_l2"] < 1e-4, "fp32 engines agree to rounding"
    for agreement in results["features_vs_torch_fp32"].values():
        assert 0.9 < agreement["min_cosine"] <= 1.0 and agreement["max_relative_l2"] < 0.2
    florist_default = results["florist"][default_name]
    assert len(florist_default["runs"]) == 1
    assert florist_default["network_images"] == len(paths)  # every run starts cold
    assert [r["batch_size"] for r in results["compute_limit"]["torch fp32"]["by_batch_size"]] == [4, 8]
    for figure in (results["decode"]["pipeline"], results["naive"], florist_default):
        assert figure["images_per_s"] > 0
    summary = speed.summarise(results, cores=2)
    assert summary["c_images_per_s"] == florist_default["images_per_s"]
    assert summary["c_over_d"] == round(summary["c_images_per_s"] / results["naive"]["images_per_s"], 2)
    assert summary["b_best_images_per_s"] == max(r["images_per_s"] for r in results["compute_limit"].values())
    # decoding on the same cores costs time: the ceiling is below b, and lower still with one core
    assert summary["shared_core_ceiling_images_per_s"] < summary["b_best_images_per_s"]
    assert speed.summarise(results, cores=1)["shared_core_ceiling_images_per_s"] < summary["shared_core_ceiling_images_per_s"]

    # c/ceiling from back-to-back rounds: each round's own a, b and c; the summary keeps the median round
    best = max(results["compute_limit"], key=lambda n: results["compute_limit"][n]["images_per_s"])
    results["ratio_rounds"] = speed.ratio_rounds(paths, default, combos[best], 8, 3, 16, tmp_path / "rounds")
    rounds = results["ratio_rounds"]["rounds"]
    assert len(rounds) == 3
    for r in rounds:
        assert r["ceiling"] == pytest.approx(speed.CORES / (speed.CORES / r["b"] + 1 / r["a"]), rel=1e-3)
        assert r["c_over_ceiling"] == pytest.approx(r["c"] / r["ceiling"], abs=1e-3)
    summary = speed.summarise(results, cores=speed.CORES)
    assert summary["c_over_ceiling"] == sorted(r["c_over_ceiling"] for r in rounds)[1]
    assert summary["c_over_ceiling_rounds"] == [r["c_over_ceiling"] for r in rounds]

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- speed-table:start -->\nold\n<!-- speed-table:end -->\nend\n")
    speed.update_readme("speed-table", speed.table({"results": results, "summary": summary}), readme)
    content = readme.read_text()
    assert "old" not in content and "| c / d (default vs naive) |" in content and content.endswith("end\n")
    assert f"**(c) florist extraction, {default_name} (default)**" in content


@pytest.mark.slow
def test_peak_rss_is_read_in_a_fresh_process(speed, photos: Path, tiny: dict[str, str]) -> None:
    measured = speed.peak_rss(photos, 4, 2, **tiny)
    assert measured["copies"] == 2 and measured["images"] == 8
    assert measured["main_mib"] > 50  # at least torch and the model are resident


@pytest.mark.slow
def test_train_wall_times_cold_then_warm(speed, photos: Path, tiny: dict[str, str], tmp_path: Path) -> None:
    times = speed.train_wall_times(photos, tmp_path, "head", ["--engine", "torch"], 1, **tiny)
    assert times["n_images"] == 24 and len(times["warm_runs_s"]) == 1 and times["flags"] == "--engine torch"
    assert times["cold_timings_s"]["features_s"] > 0
    assert json.loads((tmp_path / "run" / "model.json").read_text())["engine"] == "torch"


def test_cross_validation_scores_every_photo_once_per_combination(
    speed, photos: Path, tiny: dict[str, str], tmp_path: Path
) -> None:
    paths = speed.list_images(photos)
    combos = {"torch fp32": speed.backbone_for("torch", False, **tiny), "openvino fp32": speed.backbone_for("openvino", False, **tiny)}
    result = speed.top1_cv(paths, combos, tmp_path, folds=4)
    assert result["images"] == 24 and result["folds"] == 4
    for name in combos:
        top1 = result[name]["top1"]
        assert 0.9 <= top1 <= 1 and round(top1 * 24) == top1 * 24  # whole photos; the colours are easy
    assert result["torch fp32"]["points_vs_torch_fp32"] == 0
    gap = round(100 * (result["openvino fp32"]["top1"] - result["torch fp32"]["top1"]), 2)
    assert result["openvino fp32"]["points_vs_torch_fp32"] == gap


def test_a_bad_backbone_is_one_line_before_any_measurement(speed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["speed.py", "--quick", "--backbone", "not_a_net"])
    with pytest.raises(SystemExit, match="^error: unknown backbone 'not_a_net'") as raised:
        speed.main()
    assert "\n" not in str(raised.value)
