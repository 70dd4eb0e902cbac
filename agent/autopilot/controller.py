"""The closed loop: each interval, read the Target, forecast the load, decide, and maybe apply.

INTERFACE COMMIT: Decision, the Autopilot constructor and its methods' signatures, so the
simulator side can code against them; the decision itself lands in the next commit.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from policies import IntentSpec, ModelSpec, PlacementPlan, Policy

from .config import AutopilotConfig
from .target import Target


@dataclass
class Decision:
    """One tick: what the controller saw, forecast, considered and chose, and why (one journal entry).

    action: hold (keep the plan) | change (a cheaper or SLO-keeping plan) | replan (a node was lost)
    status: held | waiting (hysteresis) | cooldown | advised (advisory: not applied) | declined (confirm said no)
            | applied | rejected (the validator refused it) | failed (the apply failed) | infeasible
    """
    t: float
    action: str
    status: str
    reason: str
    load: dict = field(default_factory=dict)          # measured now: arrival rate, tokens/s, queue, TTFT/TPOT
    forecast: dict = field(default_factory=dict)      # rate over the horizon (level, trend, peak)
    current: PlacementPlan | None = None
    chosen: PlacementPlan | None = None
    alternatives: list[dict] = field(default_factory=list)   # each: plan summary, cost, predicted SLOs, why not
    predicted: dict = field(default_factory=dict)     # the current plan's predicted TTFT/TPOT at the forecast
    measured: dict = field(default_factory=dict)      # TTFT/TPOT p50/p99 measured in the window
    streak: int = 0                                   # consecutive ticks with this recommendation
    apply: dict | None = None                         # the Target's apply report

    @property
    def applied(self) -> bool:
        return self.status == "applied"


class Autopilot:
    """The controller over one service: `tick()` is one interval, `run(stop)` loops until stop is set."""

    def __init__(self, target: Target, intent: IntentSpec, policy: Policy, model: ModelSpec,
                 config: AutopilotConfig | None = None, journal: Any = None,
                 confirm: Callable[[Decision], bool] | None = None, *, profiles: Any = None,
                 corrections: Any = None, prices: dict[str, float] | None = None, groups_in_flight: int = 1):
        self.target, self.intent, self.policy, self.model = target, intent, policy, model
        self.config = config or AutopilotConfig()
        self.journal, self.confirm = journal, confirm
        self.profiles, self.corrections, self.prices = profiles, corrections, prices
        self.groups_in_flight = groups_in_flight
        self.decisions: list[Decision] = []

    def tick(self) -> Decision:
        """One interval: read the snapshot, forecast, decide, and (as the mode allows) apply."""
        raise NotImplementedError("the decision lands in the next commit")

    def run(self, stop: threading.Event, on_decision: Callable[[Decision], None] | None = None) -> None:
        """Tick every interval until `stop` is set."""
        raise NotImplementedError("the loop lands in the next commit")
