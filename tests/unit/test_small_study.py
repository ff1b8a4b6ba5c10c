"""The small study's decisions (bench/small_study.py): which VQ-GAN it trains with, and its intervals."""

import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[2] / "bench" / "small_study.py"
_spec = importlib.util.spec_from_file_location("small_study", _path)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


@pytest.mark.parametrize("coarse, fine, want", [
    (0.938, 0.981, "vq"),           # run 4's pair under today's 0.9 minimum: the 8 x 8 grid
    (0.85, 0.981, "vq_fallback"),   # too many objects lost: the finer grid
    (0.85, 0.80, "vq"),             # the fallback is no better: keep the recipe's
    (None, 0.9, "vq_fallback"),     # no scenes to check against counts as 0
])
def test_vq_choice(coarse, fine, want):
    reports = {"vq": {"recognition_rate": coarse}, "vq_fallback": {"recognition_rate": fine}}
    assert study.choose_vq(reports, 0.9) == want


def test_vq_choice_without_a_fallback_keeps_the_recipes():
    assert study.choose_vq({"vq": {"recognition_rate": 0.1}}, 0.9) == "vq"


def test_run_4_would_have_kept_the_fine_grid_at_its_old_minimum():
    reports = {"vq": {"recognition_rate": 0.938}, "vq_fallback": {"recognition_rate": 0.9806}}
    assert study.choose_vq(reports, 0.95) == "vq_fallback"


def test_bootstrap_interval_and_paired_difference():
    lo, hi = study.bootstrap_ci([1.0] * 30 + [0.0] * 70)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert study.bootstrap_ci([]) == [0.0, 0.0]
    d = study.paired_diff({"a": 0.0, "b": 0.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0, "x": 0.0})
    assert d["n"] == 3 and d["diff"] == pytest.approx(2 / 3, abs=1e-4) and d["ci95"][0] >= 0
