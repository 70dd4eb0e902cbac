"""Holt's forecaster: what it must get right for the controller (agent/autopilot/forecast.py)."""
import math

import pytest

from agent.autopilot.forecast import Holt


def test_constant_load_forecasts_the_constant():
    h = Holt(0.5, 0.3)
    for t in range(20):
        h.observe(10.0 * t, 4.0)
    assert h.forecast(300) == pytest.approx(4.0) and abs(h.trend) < 1e-12


def test_a_ramp_is_projected_ahead_of_the_last_value():
    h = Holt(0.5, 0.3, damping_s=None)
    for t in range(30):
        h.observe(10.0 * t, 0.1 * t)               # +0.01 per second
    last = 0.1 * 29
    assert h.trend == pytest.approx(0.01, rel=0.05)
    # the last value lags a ramp by the horizon; Holt's projection does not
    assert h.forecast(100.0) == pytest.approx(last + 1.0, rel=0.05)
    assert h.peak(100.0) == h.forecast(100.0)


def test_the_damped_trend_projects_at_most_trend_times_tau():
    h = Holt(0.5, 0.3, damping_s=60.0)
    for t in range(30):
        h.observe(10.0 * t, 0.1 * t)
    ahead = h.forecast(3600.0) - h.forecast(0.0)
    assert 0.9 * h.trend * 60 < ahead <= h.trend * 60
    assert h.forecast(10.0) - h.forecast(0.0) == pytest.approx(h.trend * 10, rel=0.1)   # short range: as undamped


def test_damping_keeps_poisson_noise_from_turning_into_swings():
    """A constant 2.4 req/s counted over 10 s windows: the undamped trend projected 300 s ahead swings the
    forecast to several times the load; damped, it stays near the noise of the count itself."""
    import numpy as np
    counts = np.random.default_rng(1).poisson(24, size=60) / 10
    worst = {}
    for tau in (None, 60.0):
        h, peaks = Holt(0.3, 0.1, damping_s=tau), []
        for i, x in enumerate(counts):
            h.observe(10.0 * i, float(x))
            peaks.append(h.peak(300.0))
        worst[tau] = max(peaks[5:]) / 2.4
    assert worst[60.0] < 1.5 < worst[None], worst


def test_never_negative_after_a_fall():
    h = Holt(0.5, 0.5)
    for t, x in enumerate([10, 10, 10, 5, 1, 0, 0]):
        h.observe(10.0 * t, x)
    assert h.trend < 0
    assert h.forecast(600.0) == 0.0 and h.peak(600.0) == h.forecast(0.0) >= 0.0


def test_uneven_intervals_keep_the_trend_per_second():
    a, b = Holt(0.5, 0.3), Holt(0.5, 0.3)
    for t in range(0, 200, 10):
        a.observe(t, 0.02 * t)
    for t in (0, 5, 30, 35, 80, 120, 125, 190):
        b.observe(t, 0.02 * t)
    assert b.trend == pytest.approx(0.02, rel=0.15) and a.trend == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("x", [-1.0, math.nan, math.inf, "3"])
def test_bad_observations_are_refused_by_value(x):
    h = Holt()
    with pytest.raises(ValueError, match="load observation"):
        h.observe(0.0, x)
    assert h.level is None


def test_time_must_advance_and_knobs_are_checked():
    h = Holt()
    h.observe(10.0, 1.0)
    with pytest.raises(ValueError, match="time order: t=10.0 after t=10.0"):
        h.observe(10.0, 2.0)
    with pytest.raises(ValueError, match="nothing observed"):
        Holt().forecast(10)
    with pytest.raises(ValueError, match="alpha must be in"):
        Holt(alpha=0.0)


def test_rate_noise_is_the_poisson_standard_error_of_the_smoothed_rate():
    import numpy as np
    from agent.autopilot.forecast import rate_noise
    rate, span, alpha = 2.0, 10.0, 0.3
    # measured: the level of an EWMA over Poisson counts of a constant rate
    counts = np.random.default_rng(3).poisson(rate * span, size=20000) / span
    f, levels = Holt(alpha, 0.01, None), []
    for i, x in enumerate(counts):
        f.observe(span * i, float(x))
        levels.append(f.level)
    measured = float(np.std(levels[200:]))
    assert abs(measured / rate_noise(rate, span, alpha) - 1) < 0.1
    assert rate_noise(0.0, span, alpha) == 0.0 and rate_noise(rate, 0.0, alpha) == 0.0
