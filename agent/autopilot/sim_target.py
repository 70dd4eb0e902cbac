"""SimTarget: the controller's Target (agent/autopilot/target.py) over the simulator, in simulated time.

    target = SimTarget(cluster, plan, model, trace, intent=intent, engine=engine_for)
    target.advance(t)             # the simulator runs every event up to t
    target.snapshot()             # what happened since the last snapshot, as GET /admin/stats has it
    target.apply(validated)       # a live reconfiguration, starting now (policies.simulator.Session)

The controller is the same code that drives a live server: it cannot tell the two apart except by
the clock. `engine(plan)` gives the engine's knobs a plan runs with (its seats and KV pool follow the
KV the plan reserves: plan.intent.traffic), so a plan sized for more load serves more at once.

ReplicaSimTarget (below) also runs replicas beside the plan, routing the trace over the pipelines.

Node events: `set_node_state(name, state)` marks a node down or draining from now on (the cluster()
the controller sees changes; the plan serving keeps serving until it is moved, as a drained node does).
"""
from __future__ import annotations

import bisect
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


def load_seconds(cluster: Cluster, model: ModelSpec, plan: PlacementPlan) -> float:
    """How long a new pipeline's nodes take to load their layers' weights, in parallel, over the cluster's
    default link (from wherever the checkpoint is kept): it serves once the slowest has them."""
    from policies.costmodel import StageShape, weight_bytes
    bw = (cluster.links.default.bandwidth_gbps if cluster.links.default else 25.0) * 1e9 / 8
    L = model.num_layers
    return max(weight_bytes(model, StageShape(st.stop - st.start, st.start == 0, st.stop == L)) / bw
               for st in plan.stages)


@dataclass
class SimReplica:
    """A pipeline beside the plan in the simulator: its own Session, fed the arrivals routed to it."""
    name: str
    plan: PlacementPlan
    session: Session
    added_s: float
    ready_s: float                  # serves from here (its weights loaded)
    seats: int = 1                  # its engine's max_num_seqs
    state: str = "serving"          # serving -> draining -> drained
    released_s: float | None = None

    def outstanding(self) -> int:
        return _outstanding(self.session)


def _outstanding(s: Session) -> int:
    return s._live.queue + s._live.running + (len(s.trace) - s._live.arrived)


@dataclass
class ReplicaSimTarget(SimTarget):
    """A SimTarget that also runs replicas, as the service does (POST/DELETE /admin/replicas): this
    Target routes the trace itself, each arrival to the pipeline with the fewest outstanding requests
    per seat (as the service routes), judged every `route_step_s` simulated seconds; a replica
    serves once its weights have loaded (`load_seconds`), holds its nodes from when it was added, and
    a drained one takes no new request and lets its nodes go once it has finished what it holds.

    snapshot(): arrivals, tokens, queue and running are summed over the pipelines (as the service's
    telemetry counts them); TTFT/TPOT are the plan's own requests' (what the controller reads from a
    service's `pipelines.plan` when replicas serve: the plan's are what its corrections want);
    stages are every pipeline's (the controller keeps the live plan's)."""
    route_step_s: float = 1.0
    started: list[SimReplica] = field(default_factory=list)     # every replica ever added

    def __post_init__(self):
        self.routed = self.trace or Trace([], [], [])
        self.trace = None                   # the plan's session is fed too, by advance()
        super().__post_init__()
        self._j = bisect.bisect_left(self.routed.arrival_s, self.start_s)

    def _active(self) -> list[SimReplica]:
        return [r for r in self.started if r.state in ("serving", "draining")]

    def advance(self, t: float) -> None:
        arr, P, O = self.routed.arrival_s, self.routed.prompt_tokens, self.routed.output_tokens
        now = self.session.now
        while True:
            serving = [r for r in self.started if r.state == "serving"]
            end = t if not serving else min(t, now + self.route_step_s)   # the plan alone: in one batch
            hi = bisect.bisect_right(arr, end, lo=self._j)
            if not serving:
                self.session.add_requests(arr[self._j:hi], P[self._j:hi], O[self._j:hi])
            else:
                # outstanding requests and seats per pipeline; each arrival joins the fewest per seat
                load = {id(self.session): [_outstanding(self.session), self._engine(self.session.plan).max_num_seqs],
                        **{id(r.session): [r.outstanding(), r.seats] for r in serving}}
                batch: dict[int, tuple[Session, list, list, list]] = {}
                for i in range(self._j, hi):
                    pipes = [self.session] + [r.session for r in serving if r.ready_s <= arr[i]]
                    s = min(pipes, key=lambda x: (load[id(x)][0] + 1) / load[id(x)][1])
                    load[id(s)][0] += 1
                    b = batch.setdefault(id(s), (s, [], [], []))
                    b[1].append(arr[i]), b[2].append(P[i]), b[3].append(O[i])
                for s, a, p, o in batch.values():
                    s.add_requests(a, p, o)
            self._j = hi
            for s in [self.session] + [r.session for r in self._active()]:
                s.advance(end)
            for r in self.started:
                if r.state == "draining" and r.outstanding() == 0:
                    r.state, r.released_s = "drained", end
            now = end
            if now >= t:
                return

    def snapshot(self) -> dict:
        since = self._last_snapshot
        snap = super().snapshot()
        w = snap["windows"][self.window]
        for r in self.started:
            if r.state == "drained" and r.released_s is not None and r.released_s <= since:
                continue
            o = r.session.telemetry(since, self.window)
            ow = o["windows"][self.window]
            for k in ("arrival_rate", "prompt_tokens_per_s", "output_tokens_per_s", "rejected"):
                w[k] += ow[k]
            w["finished"]["stop"] += ow["finished"]["stop"]
            w["stages"] = w["stages"] + ow["stages"]
            snap["now"]["queue_depth"] += o["now"]["queue_depth"]
            snap["now"]["running"] += o["now"]["running"]
        return snap

    def apply(self, validated: ValidatedPlan) -> dict:
        held = {n: r.name for r in self._active() for n in r.plan.nodes}
        taken = [f"{n} ({held[n]})" for n in validated.plan.nodes if n in held] \
            if isinstance(validated, ValidatedPlan) else []
        if taken:
            return {"ok": False, "state": "aborted", "error": f"held by a replica: {', '.join(taken)}"}
        return super().apply(validated)

    # -- replicas, as GET/POST/DELETE /admin/replicas answer
    def replicas(self) -> list[dict]:
        return [{"name": r.name, "state": r.state, "error": None, "nodes": [st.node for st in r.plan.stages],
                 "plan": r.plan.model_dump(mode="json"), "added": r.added_s,
                 "outstanding": r.outstanding()} for r in self._active()]

    def add_replica(self, validated: ValidatedPlan) -> dict:
        if not isinstance(validated, ValidatedPlan):
            return {"ok": False, "error": f"not a ValidatedPlan: {type(validated).__name__}"}
        plan, now = validated.plan, self.session.now
        held = {**{n: "the plan" for n in self.session.plan.nodes},
                **{n: r.name for r in self._active() for n in r.plan.nodes}}
        bad = [f"{n} ({held[n]})" for n in plan.nodes if n in held]
        bad += [f"{n} (not up)" for n in plan.nodes if self.cluster_.has_node(n) and self.cluster_.node(n).state != "up"]
        if bad:
            return {"ok": False, "error": f"a replica needs idle, up nodes of its own; taken: {', '.join(bad)}"}
        name = f"r{len(self.started) + 1}"
        cfg = self._engine(plan)
        s = Session(self.cluster_, plan, self.model, None, profiles=self.profiles, intent=self.intent,
                    config=cfg, start_s=now)
        self.started.append(SimReplica(name, plan, s, now, now + load_seconds(self.cluster_, self.model, plan),
                                       seats=cfg.max_num_seqs))
        return {"ok": True, "name": name, "state": "serving"}

    def drain_replica(self, name: str) -> dict:
        r = next((r for r in self._active() if r.name == name), None)
        if r is None:
            return {"ok": False, "error": f"no replica named {name!r}"}
        r.state = "draining"
        return {"ok": True, "name": name, "state": "draining"}

    # -- what the evaluation reads at the end
    def node_seconds(self, end_s: float, weight: Callable[[str], float] = lambda node: 1.0) -> float:
        """The plan's node-seconds (SimTarget.node_seconds) plus each replica's, from when it was added
        to when it let its nodes go."""
        total = super().node_seconds(end_s, weight)
        for r in self.started:
            until = end_s if r.released_s is None else min(r.released_s, end_s)
            total += sum(weight(n) for n in set(r.plan.nodes)) * max(0.0, until - r.added_s)
        return total

    def results(self) -> list:
        """Every pipeline's SimResult (the plan's first), each run to its end."""
        return [self.session.finish()] + [r.session.finish() for r in self.started]
