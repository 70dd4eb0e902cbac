"""The controller's knobs, with defaults that work, read from an intent file's front matter or a dict.

In an intent file they sit under `autopilot:` in the front matter:

    ---
    cluster: ../local/cluster.yaml
    policy: ../local/policy.yaml
    autopilot:
      mode: advisory        # advisory | confirm | auto
      interval_s: 10
      hysteresis: 3
      cooldown_s: 60
    ---

A bad value is an error that names the knob and the value (AutopilotConfigError).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

MODES = ("advisory", "confirm", "auto")


class AutopilotConfigError(ValueError):
    """A knob with a value the controller cannot use; the message names the knob, the value and the source."""


@dataclass(frozen=True)
class AutopilotConfig:
    """Controller knobs. Times are seconds of the Target's clock (wall clock live, simulated time in the simulator)."""
    mode: str = "advisory"          # advisory: recommend and journal, never act; confirm: ask; auto: act
    interval_s: float = 10.0        # one tick per interval
    horizon_s: float = 300.0        # how far ahead the forecast looks, and what a move's cost is amortised over
    hysteresis: int = 3             # the same recommendation for this many consecutive ticks before acting
    cooldown_s: float = 60.0        # no change (except for a node lost) this long after one
    min_gain: float = 0.10          # a cheaper plan must save at least this fraction of the cost per hour
    headroom: float = 0.80          # a plan carries at most this fraction of its throughput (scale-up above it)
    scale_down_headroom: float = 0.60   # survivors must carry the load at or under this fraction (the band stops flips)
    alpha: float = 0.5              # forecaster: level smoothing
    beta: float = 0.3               # forecaster: trend smoothing
    window: str = "10s"             # the /admin/stats window the load is read from
    max_stages: int = 8             # the planner's bound on stages
    pause_s: float = 0.05           # expected pause of a switch until one has been measured
    min_rate: float = 0.0           # arrivals per second assumed at least (0: an idle service may shrink to one node)

    def __post_init__(self):
        self.check()

    def check(self, source: str = "autopilot config") -> None:
        """Raise AutopilotConfigError naming the first bad knob."""
        def bad(knob, why):
            raise AutopilotConfigError(f"{source}: autopilot.{knob} = {getattr(self, knob)!r}: {why}")
        if self.mode not in MODES:
            bad("mode", f"must be one of {', '.join(MODES)}")
        for knob in ("interval_s", "horizon_s", "pause_s"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(knob, "must be a positive number of seconds")
        for knob in ("cooldown_s", "min_gain", "min_rate"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(knob, "must be a number >= 0")
        for knob in ("hysteresis", "max_stages"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(knob, "must be a whole number >= 1")
        for knob in ("headroom", "scale_down_headroom", "alpha", "beta"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                bad(knob, "must be a number in (0, 1]")
        if self.min_gain >= 1:
            bad("min_gain", "is a fraction of the cost per hour and must be under 1")
        if self.scale_down_headroom > self.headroom:
            bad("scale_down_headroom", f"must not exceed headroom ({self.headroom}): without the band between "
                                       "them a plan could flip back and forth under constant load")
        if self.window not in ("10s", "60s"):
            bad("window", "must be one of the telemetry windows: 10s, 60s")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "autopilot config",
                  **overrides: Any) -> "AutopilotConfig":
        """Knobs from a dict (the front matter's `autopilot:` mapping); unknown knobs are errors."""
        data = dict(data or {})
        if not isinstance(data, dict):
            raise AutopilotConfigError(f"{source}: autopilot must be a mapping of knobs, not {data!r}")
        known = {f.name: f for f in fields(cls)}
        for k in data:
            if k not in known:
                raise AutopilotConfigError(f"{source}: unknown knob autopilot.{k} (known: {', '.join(known)})")
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except AutopilotConfigError as e:      # say where the value came from
            raise AutopilotConfigError(str(e).replace("autopilot config", source, 1)) from None

    def as_dict(self) -> dict:
        return asdict(self)
