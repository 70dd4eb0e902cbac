"""SimTarget: the controller's Target (agent/autopilot/target.py) over the simulator, in simulated time.

    target = SimTarget(cluster, plan, model, trace, intent=intent, engine=engine_for)
    target.advance(t)             # the simulator runs every event up to t
    target.snapshot()             # what happened since the last snapshot, as GET /admin/stats has it
    target.apply(validated)       # a live reconfiguration, starting now (policies.simulator.Session)

The controller is the same code that drives a live server: it cannot tell the two apart except by
the clock. `engine(plan)` gives the engine's knobs a plan runs with (its seats and KV pool follow the
KV the plan reserves: plan.intent.traffic), so a plan sized for more load serves more at once.

Node events: `set_node_state(name, state)` marks a node down or draining from now on (the cluster()
the controller sees changes; the plan serving keeps serving until it is moved, as a drained node does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from policies import Cluster, IntentSpec, ModelSpec, PlacementPlan, PlanDelta, ValidatedPlan
from policies.simulator import Session, SimConfig
from policies.traces import Trace


@dataclass
class Move:
    """One reconfiguration the simulator made: from, to, when it started and switched, its figures."""
    old: PlacementPlan
    new: PlacementPlan
    at_s: float
    outcome: object                 # policies.simulator.ReconfigOutcome (switched_s set at the switch)
    source: str = "controller"


@dataclass
class SimTarget:
    """A Target over a policies.simulator.Session (see the module docstring)."""
    cluster_: Cluster
    plan: PlacementPlan
    model: ModelSpec
    trace: Trace | None = None
    intent: IntentSpec | None = None
    engine: Callable[[PlacementPlan], SimConfig] | None = None
    window: str = "300s"            # the name of the one window snapshot() reports (the controller's `window`)
    start_s: float = 0.0
    profiles: object = None
    moves: list[Move] = field(default_factory=list)

    def __post_init__(self):
        self.session = Session(self.cluster_, self.plan, self.model, self.trace, profiles=self.profiles,
                               intent=self.intent, config=self._engine(self.plan), start_s=self.start_s)
        self._last_snapshot = self.start_s

    def _engine(self, plan: PlacementPlan) -> SimConfig:
        return self.engine(plan) if self.engine else SimConfig()

    # -- driving the simulation (the evaluation calls these; the controller never does)
    def advance(self, t: float) -> None:
        self.session.advance(t)

    def set_node_state(self, node: str, state: str) -> None:
        self.cluster_ = self.cluster_.with_state(node, state)

    # -- the Target protocol
    def now(self) -> float:
        return self.session.now

    def snapshot(self) -> dict:
        """Telemetry of the time since the last snapshot (one window, named `window`)."""
        snap = self.session.telemetry(self._last_snapshot, self.window)
        self._last_snapshot = self.session.now
        return snap

    def live_plan(self) -> PlacementPlan:
        return self.session.plan

    def cluster(self) -> Cluster:
        return self.cluster_

    def apply(self, validated: ValidatedPlan) -> dict:
        """Start a live move to the validated plan now; the report has the simulator's figures for it."""
        if not isinstance(validated, ValidatedPlan):
            return {"ok": False, "state": "aborted", "error": f"not a ValidatedPlan: {type(validated).__name__}"}
        if self.session.reconfiguring:
            return {"ok": False, "state": "aborted", "error": "a reconfiguration is under way; try after its switch"}
        down = [n for n in validated.plan.nodes if self.cluster_.has_node(n) and self.cluster_.node(n).state != "up"]
        if down:
            return {"ok": False, "state": "aborted", "error": f"node(s) not up: {', '.join(down)}"}
        return self.move(validated.plan)

    def move(self, plan: PlacementPlan, source: str = "controller") -> dict:
        """The mechanism under apply(): also used by the baselines (static, oracle), so every strategy
        pays the same moving costs."""
        old = self.session.plan
        out = self.session.reconfigure(plan, "live", self._engine(plan))
        self.moves.append(Move(old, plan, self.session.now, out, source))
        delta = PlanDelta.between(old, plan, self.model)
        return {"ok": True, "state": "done", "error": None, "method": "live",
                "pause_ms": 1e3 * out.pause_s, "prepare_s": out.prepare_s, "precopy_s": out.precopy_s,
                "switch_at_s": self.session.now + out.prepare_s + out.precopy_s,
                "bytes_moved": {"weights": out.weight_bytes, "kv": out.kv_bytes},
                "layers_moved": sum(r.stop - r.start for r in delta.moves)}

    # -- what the evaluation reads at the end
    def node_seconds(self, end_s: float, weight: Callable[[str], float] = lambda node: 1.0) -> float:
        """Node-seconds held from start_s to end_s: the live plan's distinct nodes, plus, while a move
        runs (start to switch), the new nodes it brings in (they hold weights before they serve).
        weight(node): 1 counts node-seconds; a price per second counts what they cost."""
        def w(nodes) -> float:
            return sum(weight(n) for n in nodes)
        t, total = self.start_s, 0.0
        plan = self.plan
        for mv in self.moves:
            sw = mv.outcome.switched_s
            sw = end_s if (sw is None or math.isnan(sw)) else min(sw, end_s)
            total += w(set(plan.nodes)) * (sw - t)
            total += w(set(mv.new.nodes) - set(plan.nodes)) * (sw - mv.at_s)
            t, plan = sw, mv.new
        return total + w(set(plan.nodes)) * max(0.0, end_s - t)
