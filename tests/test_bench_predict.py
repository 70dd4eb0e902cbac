"""bench predict's residual sides: learned per load from the plans measured before, never from the plan itself."""
from __future__ import annotations

import pytest

from executor.bench_predict import with_residuals


def _row(plan, load, measured, corrected, simulator):
    return {"plan": plan, "load": load, "measured_tpot_ms": measured, "corrected_tpot_ms": corrected,
            "simulator_tpot_ms": simulator, "corrected_ttft_ms": 100.0, "simulator_ttft_ms": 90.0}


def test_residual_is_learned_per_load_from_the_plans_before():
    rows = [_row("P1", "1x", 50.0, 40.0, 45.0), _row("P1", "4x", 60.0, 50.0, 40.0),
            _row("P2", "1x", 55.0, 50.0, 50.0), _row("P2", "4x", 99.0, 80.0, 80.0),
            _row("P3", "1x", 70.0, 70.0, 70.0), _row("P3", "4x", 80.0, 80.0, 80.0)]
    with_residuals(rows, alpha=0.5)
    # the first plan at each load has nothing before it
    assert [r["residual"] for r in rows[:2]] == [1.0, 1.0]
    assert rows[0]["residual_tpot_ms"] == 40.0 and rows[1]["sim_residual_tpot_ms"] == 40.0
    # the second: the first plan's ratio at the same load, each side its own (not the other load's)
    assert rows[2]["residual"] == pytest.approx(50 / 40) and rows[2]["sim_residual"] == pytest.approx(50 / 45)
    assert rows[3]["residual"] == pytest.approx(60 / 50) and rows[3]["sim_residual"] == pytest.approx(60 / 40)
    assert rows[3]["residual_tpot_ms"] == pytest.approx(80 * 60 / 50)
    # the third: smoothed over both before (alpha 0.5)
    assert rows[4]["residual"] == pytest.approx(0.5 * 50 / 40 + 0.5 * 55 / 50)
    # TTFT is the model's own
    assert all(r["residual_ttft_ms"] == 100.0 and r["sim_residual_ttft_ms"] == 90.0 for r in rows)


def test_a_plans_own_measurement_never_informs_its_prediction():
    def run(p2_measured):
        rows = [_row("P1", "4x", 60.0, 50.0, 50.0), _row("P2", "4x", p2_measured, 50.0, 50.0),
                _row("P3", "4x", 60.0, 50.0, 50.0)]
        return with_residuals(rows, alpha=0.5)
    a, b = run(55.0), run(500.0)
    assert a[1]["residual_tpot_ms"] == b[1]["residual_tpot_ms"] == pytest.approx(60.0)
    assert a[2]["residual_tpot_ms"] != b[2]["residual_tpot_ms"]      # it does inform the plan after it


def test_the_warmup_control_uses_the_earlier_plans_warmups_for_both_loads():
    rows = [_row("P1", "1x", 50.0, 40.0, 40.0), _row("P1", "4x", 60.0, 50.0, 50.0),
            _row("P2", "1x", 55.0, 50.0, 50.0), _row("P2", "4x", 99.0, 80.0, 80.0)]
    for r, ratio in zip(rows, (1.1, 1.1, 1.3, 1.3)):
        r["warmup_tpot_ratio"] = ratio
    with_residuals(rows, alpha=0.5)
    assert [r["residual_warmup_tpot_ms"] for r in rows] == pytest.approx([40.0, 50.0, 50 * 1.1, 80 * 1.1])
