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
    default = speed.backbone_for("auto", **tiny)
    other = speed.backbone_for("fp32" if default.bf16 else "bf16", **tiny)
    assert other.bf16 != default.bf16
    results = {
        "decode": {"one_core": speed.decode_rate(paths, default, 0, 1), "pipeline": speed.decode_rate(paths, default, 1, 1)},
        "compute_limit": {
            "fp32": speed.compute_limit(default, False, [4, 8], 8, 1),
            "bf16": speed.compute_limit(default, True, [4, 8], 8, 1),
        },
        "florist": {
            "default": speed.florist_rate(paths, default, 1, tmp_path),  # warm-up + 1 run: a cold cache each
            "other": speed.florist_rate(paths, other, 1, tmp_path),
        },
        "naive": speed.naive_rate(paths, 1, default, workers=1),
        "bf16_vs_fp32_features": speed.feature_agreement(paths[:4], default, other),
    }
    agreement = results["bf16_vs_fp32_features"]
    assert 0.9 < agreement["min_cosine"] <= 1.0 and 0 < agreement["max_relative_l2"] < 0.2
    assert results["florist"]["default"]["precision"] == ("bf16" if default.bf16 else "fp32")
    assert len(results["florist"]["default"]["runs"]) == 1
    assert results["florist"]["other"]["network_images"] == len(paths)  # every run starts cold
    assert [r["batch_size"] for r in results["compute_limit"]["fp32"]["by_batch_size"]] == [4, 8]
    for figure in (results["decode"]["pipeline"], results["naive"], results["florist"]["other"]):
        assert figure["images_per_s"] > 0
    summary = speed.summarise(results, cores=2)
    assert summary["c_over_d"] == round(summary["c_images_per_s"] / results["naive"]["images_per_s"], 2)
    assert summary["b_best_images_per_s"] == max(r["images_per_s"] for r in results["compute_limit"].values())
    # decoding on the same cores costs time: the ceiling is below b, and lower still with one core
    assert summary["shared_core_ceiling_images_per_s"] < summary["b_best_images_per_s"]
    assert speed.summarise(results, cores=1)["shared_core_ceiling_images_per_s"] < summary["shared_core_ceiling_images_per_s"]

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- speed-table:start -->\nold\n<!-- speed-table:end -->\nend\n")
    text = speed.table({"results": results, "summary": summary, "head_top1_from_accuracy_bench": speed.cited_accuracy()})
    speed.update_readme("speed-table", text, readme)
    content = readme.read_text()
    assert "old" not in content and "| c / d |" in content and content.endswith("end\n")


@pytest.mark.slow
def test_peak_rss_is_read_in_a_fresh_process(speed, photos: Path, tiny: dict[str, str]) -> None:
    measured = speed.peak_rss(photos, 4, 2, **tiny)
    assert measured["copies"] == 2 and measured["images"] == 8
    assert measured["main_mib"] > 50  # at least torch and the model are resident


@pytest.mark.slow
def test_train_wall_times_cold_then_warm(speed, photos: Path, tiny: dict[str, str], tmp_path: Path) -> None:
    times = speed.train_wall_times(photos, tmp_path, warm_repeats=1, **tiny)
    assert times["n_images"] == 24 and len(times["warm_runs_s"]) == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mode"] == "head"


def test_precision_cross_validation_scores_every_photo_once(
    speed, photos: Path, tiny: dict[str, str], tmp_path: Path
) -> None:
    paths = speed.list_images(photos)
    default = speed.backbone_for("auto", **tiny)
    other = speed.backbone_for("fp32" if default.bf16 else "bf16", **tiny)
    result = speed.precision_top1_cv(paths, {"bf16": default, "fp32": other} if default.bf16 else
                                     {"fp32": default, "bf16": other}, tmp_path, folds=4)
    assert result["images"] == 24 and result["folds"] == 4
    for precision in ("bf16", "fp32"):
        top1 = result[precision]["top1"]
        assert 0.9 <= top1 <= 1 and round(top1 * 24) == top1 * 24  # whole photos; the colours are easy
    assert result["difference_points"] == round(100 * abs(result["bf16"]["top1"] - result["fp32"]["top1"]), 2)


def test_a_bad_backbone_is_one_line_before_any_measurement(speed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["speed.py", "--quick", "--backbone", "not_a_net"])
    with pytest.raises(SystemExit, match="^error: unknown backbone 'not_a_net'") as raised:
        speed.main()
    assert "\n" not in str(raised.value)
