"""The load forecaster: Holt's linear exponential smoothing (an EWMA of the level plus an EWMA of the trend).

Why this one: load changes in ramps (a morning rise, a burst building up) as much as in steps. A
last-value or plain EWMA forecast lags a ramp by its whole smoothing delay, so scale-up comes late;
Holt's method adds a smoothed trend and projects it over the horizon, and is still two numbers of
state, cheap, and easy to reason about. It is what Dynamo's planner offers beside a constant
predictor, with one change: the forecast is clipped at 0 (Dynamo's could go negative after a fall,
and a negative load then looked like room to scale down to nothing).

    level_t = alpha * x_t + (1 - alpha) * (level_{t-1} + trend_{t-1} * dt)
    trend_t = beta * (level_t - level_{t-1}) / dt + (1 - beta) * trend_{t-1}
    forecast(h) = max(0, level_t + trend_t * tau * (1 - exp(-h / tau)))      (tau = damping_s)

The trend is damped (Gardner & McKenzie's damped-trend method, in continuous time): projected
undamped over a whole horizon, the noise of a measured arrival rate (a Poisson count over a short
window) becomes swings of several times the load, and the controller would flip plans on them.
With damping the projection is at most trend * tau; a real ramp still shows within a few ticks.
damping_s=None projects the trend undamped. Observations may come at uneven times (dt in
seconds), so the trend is per second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Holt:
    """Holt's linear forecaster over (time, value) observations; values and forecasts are >= 0."""
    alpha: float = 0.5
    beta: float = 0.3
    damping_s: float | None = 60.0
    level: float | None = None
    trend: float = 0.0                  # per second
    last_t: float | None = None
    n: int = 0

    def __post_init__(self):
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"Holt.{name} must be in (0, 1], not {v!r}")
        if self.damping_s is not None and not (isinstance(self.damping_s, (int, float)) and self.damping_s > 0):
            raise ValueError(f"Holt.damping_s must be a positive number of seconds or None, not {self.damping_s!r}")

    def observe(self, t: float, x: float) -> None:
        """Fold in the value x measured at time t (seconds, increasing)."""
        if not (isinstance(x, (int, float)) and math.isfinite(x)) or x < 0:
            raise ValueError(f"a load observation must be a finite number >= 0, not {x!r} (at t={t})")
        if self.level is None:
            self.level, self.last_t, self.n = float(x), float(t), 1
            return
        dt = t - self.last_t
        if dt <= 0:
            raise ValueError(f"observations must come in time order: t={t} after t={self.last_t}")
        prev = self.level
        self.level = self.alpha * x + (1 - self.alpha) * (prev + self.trend * dt)
        self.trend = self.beta * (self.level - prev) / dt + (1 - self.beta) * self.trend
        self.last_t, self.n = float(t), self.n + 1

    def forecast(self, horizon_s: float) -> float:
        """The expected value horizon_s seconds after the last observation, never below 0."""
        if self.level is None:
            raise ValueError("nothing observed yet: call observe() first")
        if self.damping_s is None:
            return max(0.0, self.level + self.trend * horizon_s)
        tau = self.damping_s
        return max(0.0, self.level + self.trend * tau * -math.expm1(-horizon_s / tau))

    def peak(self, horizon_s: float) -> float:
        """The highest value expected over [now, now + horizon]: the trend is linear, so one end or the other."""
        return max(self.forecast(0.0), self.forecast(horizon_s))


def rate_noise(rate: float, span_s: float, alpha: float) -> float:
    """The standard error of a smoothed arrival rate: a Poisson count over `span_s` seconds has a standard
    error of sqrt(rate / span_s) requests per second, and an EWMA with weight `alpha` keeps
    sqrt(alpha / (2 - alpha)) of an observation's noise in its level. (Bursty traffic is noisier than
    Poisson; the controller's hysteresis covers the rest.)"""
    if rate <= 0 or span_s <= 0:
        return 0.0
    return math.sqrt(rate / span_s) * math.sqrt(alpha / (2 - alpha))
