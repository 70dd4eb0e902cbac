"""The closed loop: each interval, read the Target, forecast the load, decide, and maybe apply.

    tick():
      1. observe     snapshot (the /admin/stats window), the live plan, the cluster, lost nodes
      2. forecast    Holt's forecaster of the arrival rate; the peak over the horizon, plus the backlog
      3. candidates  the planner's plans for this cluster state (cached until the cluster changes):
                     for k = 1..max_stages, the cheapest and the fastest plan with at most k stages
      4. assess      every candidate and the live plan at the forecast load, with the cost model
                     (calibrated profiles where they exist, corrections from measured TTFT/TPOT)
      5. choose      (`_choose`, the whole policy in one screen)
                     - a node of the live plan lost: the cheapest plan that keeps the SLOs, now
                     - the live plan would miss the SLOs or run past `headroom`: the cheapest that keeps them
                     - else a plan cheaper by at least `min_gain`, counting the move, that carries the
                       whole forecast load at or under `scale_down_headroom` (scale-down judged on the
                       survivors' load, and the band between the two headrooms stops flips)
                     - else hold
                     a forecast no one pipeline carries is said so, with advice: the pipeline replicas
                     on disjoint nodes that would carry it (`_replica_set`)
      5b. replicas   where the Target runs replicas (`_replica_step`; the plan is judged at its share of the
                     load, its candidates off the replicas' nodes): a failed replica, or one on a lost node,
                     is released at once; more than the pipelines carry under `headroom` adds one on free
                     nodes; the others carrying the survivors' load under `scale_down_headroom` drains
                     the newest (none of its requests is lost)
      6. gate        hysteresis (the same recommendation `hysteresis` ticks running), cooldown after a
                     change; a lost node bypasses both. The plan is validated against the live plan
                     (policies.review, the validator every plan passes) and handed to Agent.gate, the
                     gate a person's plan goes through; the mode is the gate's: advisory -> suggest
                     (never applied), confirm (asks `confirm(decision)`), auto
      7. journal     the Decision: what was seen, forecast, considered, chosen and why

What a plan costs is its nodes' price per hour (costmodel: nodes that carry no stage cost nothing).
What a move costs: the layers that travel (PlanDelta weight bytes, plus the KV of the requests in
flight) over each link's bandwidth, pairs in parallel, plus the expected pause; while it runs both
plans' nodes are held and during the pause the old ones serve nothing. That cost is spread over
the horizon: gain = (cost_now - cost_new) * horizon - move cost, as a fraction of cost_now * horizon.

The load is the arrival rate (requests per second); a request's shape (prompt and output tokens)
is the intent's traffic. A plan carries a load when its capacity (the rate at which all the seats
its KV reservation holds are busy, `_at_load`) is at least load / headroom, and the TTFT / TPOT the
cost model predicts at the concurrency that load keeps busy (Little's law), with the load's prompts
riding in the decode steps, are within the intent's bounds. A plan wanted but not one valid move
away is reached in two (`_via`).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from policies import Cluster, IntentSpec, ModelSpec, PlacementPlan, Policy, ValidatedPlan, review
from policies.costmodel import Corrections, decode_context, estimate, node_price, smoothed

from .config import AutopilotConfig
from .forecast import Holt, rate_noise
from .target import Target

GATE_MODE = {"advisory": "suggest", "confirm": "confirm", "auto": "auto"}   # autopilot mode -> Agent.gate mode
REPLAN_FACTOR = 1.25       # plan the candidates again when a correction factor moved by more than this since
MAX_RESIDUAL = 2.0         # the TPOT residual (see Autopilot._correct) is clamped to [1/this, this]
MAX_REPLICAS = 8           # the most pipeline replicas _replica_set advises for one forecast
MAX_TAIL = 2.0              # the TPOT tail spread (see Autopilot._tail) is clamped to [1, this]
MIN_SLO_SAMPLES = 5          # measured TTFT/TPOT feed the corrections only from this many requests in the window


@dataclass
class Decision:
    """One tick: what the controller saw, forecast, considered and chose, and why (one journal entry).

    action: hold (keep the plan) | change (a cheaper or SLO-keeping plan) | replan (a node was lost)
    status: held | waiting (hysteresis) | cooldown | advised (advisory: not applied) | declined (confirm said no)
            | applied | rejected (the validator refused it) | failed (the apply failed) | infeasible
            | unobserved (the tick could not read the service or finish: the error is the reason)
    """
    t: float
    action: str
    status: str
    reason: str
    load: dict = field(default_factory=dict)          # measured now: arrival rate, tokens/s, queue, running
    forecast: dict = field(default_factory=dict)      # rate over the horizon (level, trend, peak, the rate planned for)
    current: PlacementPlan | None = None
    chosen: PlacementPlan | None = None
    alternatives: list[dict] = field(default_factory=list)   # each: plan, cost, capacity, predicted SLOs, verdict
    predicted: dict = field(default_factory=dict)     # the current plan's predicted TTFT/TPOT at the load now
    measured: dict = field(default_factory=dict)      # TTFT/TPOT p50/p99 measured in the window (ms)
    streak: int = 0                                   # consecutive ticks with this recommendation
    lost: dict = field(default_factory=dict)          # node -> why it cannot serve
    validation: str = ""                              # the validator's report on the chosen plan
    apply: dict | None = None                         # the Target's apply report
    replica: dict | None = None                       # advice: replicas that would carry it (see _replica_set)

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def as_json(self) -> dict:
        """JSON-ready, for the journal and `--json`."""
        return {"t": self.t, "action": self.action, "status": self.status, "reason": self.reason,
                "load": self.load, "forecast": self.forecast,
                "current": self.current.summary() if self.current else None,
                "chosen": self.chosen.summary() if self.chosen else None,
                "chosen_plan": self.chosen.model_dump(mode="json", exclude={"estimates"}) if self.chosen else None,
                "alternatives": self.alternatives, "predicted": self.predicted, "measured": self.measured,
                "streak": self.streak, "lost": self.lost, "validation": self.validation, "apply": self.apply,
                "replica": self.replica}


@dataclass
class Assessment:
    """A plan at a load: what it costs, what it can carry, and the TTFT/TPOT predicted at that load."""
    plan: PlacementPlan
    cost: float                 # price per hour of the nodes it uses
    capacity_rps: float         # requests per second at the intent's concurrency
    util: float                 # load / capacity
    concurrency: int            # sequences the load keeps busy (Little's law)
    ttft_ms: float
    tpot_ms: float
    slo_ok: bool

    def keeps(self, headroom: float) -> bool:
        """Whether the plan keeps the SLOs with the load at or under `headroom` of its capacity."""
        return self.slo_ok and self.util <= headroom

    def row(self) -> dict:
        return {"plan": self.plan.summary(), "nodes": len(set(self.plan.nodes)), "cost_per_hour": round(self.cost, 4),
                "capacity_rps": round(self.capacity_rps, 3), "util": round(self.util, 3),
                "concurrency": self.concurrency, "ttft_ms": round(self.ttft_ms, 1), "tpot_ms": round(self.tpot_ms, 2),
                "slo_ok": self.slo_ok}


class _TargetExecutor:
    """The Target seen as an Agent's executor (`.plan`, `.reconfigure`), so plans pass Agent.gate."""

    def __init__(self, target: Target):
        self.target = target

    @property
    def plan(self) -> PlacementPlan | None:
        return self.target.live_plan()

    def reconfigure(self, validated: ValidatedPlan, method: str = "live") -> dict:
        rep = dict(self.target.apply(validated))
        rep.setdefault("state", "done" if rep.get("ok") else "aborted")
        return rep


class Autopilot:
    """The controller over one service: `tick()` is one interval, `run(stop)` loops until stop is set.

    intent: what the operator asked (its SLOs, data class and traffic shape; never changed here).
    groups_in_flight: None as the engine runs by default (one group of requests per stage), or a fixed count.
    confirm(decision) -> bool is asked in confirm mode. journal: an agent.journal.Journal, or None.
    """

    def __init__(self, target: Target, intent: IntentSpec, policy: Policy, model: ModelSpec,
                 config: AutopilotConfig | None = None, journal: Any = None,
                 confirm: Callable[[Decision], bool] | None = None, *, profiles: Any = None,
                 corrections: Corrections | None = None, prices: dict[str, float] | None = None,
                 groups_in_flight: int | None = None):
        self.target, self.intent, self.policy, self.model = target, intent, policy, model
        self.config = config or AutopilotConfig()
        self.journal, self.confirm = journal, confirm
        self.profiles, self.prices, self.groups_in_flight = profiles, prices, groups_in_flight
        self.corrections = corrections if corrections is not None else Corrections()
        self.tpot_residual, self._residual_n = 1.0, 0   # measured / predicted TPOT left after the stages' factors
        self.tpot_tail, self._tail_n = 1.0, 0           # measured TPOT p99 / p50 of the live plan (see _tail)
        self._engine_chunk: int | None = None           # the service's prompt budget per step while decoding
        self.forecaster = Holt(self.config.alpha, self.config.beta, self.config.damping_s)
        self.decisions: list[Decision] = []
        self._candidates: tuple[str, list[PlacementPlan]] | None = None   # (cluster state + lost, plans)
        self._planned_with: dict = {}                # the correction factors the candidates were planned with
        self._reviews: dict = {}                     # this tick's validator reports, per candidate (see _review)
        self._recommendation: str | None = None      # what the last tick recommended, and for how many ticks
        self._streak = 0
        self._last_change: float | None = None       # when the last change was applied
        self._pause_s = self.config.pause_s          # expected switch pause, then the last one measured
        self._pending: Decision | None = None
        # _replica_set's planner plans by the nodes already taken, for one cluster state: (state, {taken: plans})
        self._replica_plans: tuple[tuple, dict[str, list[PlacementPlan]]] = ((), {})
        self._journal("autopilot", {"event": "start", "config": self.config.as_dict(),
                                    "intent": intent.model_dump(mode="json")})

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, on_decision: Callable[[Decision], None] | None = None) -> None:
        """Tick every interval until `stop` is set (wall clock: for a live server).

        A tick that fails (the server unreachable, a malformed answer, a bug) is recorded as an
        `unobserved` decision with the error, and the loop goes on: an autopilot that stops on the
        first lost connection leaves the service unwatched without saying so."""
        while not stop.is_set():
            try:
                d = self.tick()
            except Exception as e:
                d = self._unobserved(e)
            if on_decision:
                on_decision(d)
            stop.wait(self.config.interval_s)
        self._journal("autopilot", {"event": "stop", "decisions": len(self.decisions)})

    def _unobserved(self, e: Exception) -> Decision:
        """The decision of a tick that could not finish: nothing changes, the error is journaled. The
        hysteresis streak starts again (the same recommendation did not hold through this interval)."""
        self._recommendation, self._streak, self._pending = None, 0, None
        try:
            t = self.target.now()
        except Exception:
            t = time.time()
        first = str(e).splitlines()[0] if str(e) else ""
        return self._record(Decision(t, "hold", "unobserved",
                                     f"this interval could not be completed, nothing changed: {type(e).__name__}: {first}"))

    def tick(self) -> Decision:
        """One interval: observe, forecast, assess, choose, gate, journal."""
        cfg = self.config
        t = self.target.now()
        snap, live, cluster = self.target.snapshot(), self.target.live_plan(), self.target.cluster()
        lost = self._lost(cluster, live)
        load, measured, stages = _read_load(snap, cfg.window)
        self._learn_engine(snap)
        self.forecaster.observe(t, load["arrival_rate"])
        rate_now = load["arrival_rate"]
        # plan for the peak the horizon may bring, plus the backlog the queue holds, drained over the horizon
        rate = max(cfg.min_rate, self.forecaster.peak(cfg.horizon_s) + load["queue"] / cfg.horizon_s)
        forecast = {"level": self.forecaster.level, "trend_per_s": self.forecaster.trend,
                    "at_horizon": self.forecaster.forecast(cfg.horizon_s), "rate": rate, "horizon_s": cfg.horizon_s}
        if live is None:
            return self._record(Decision(t, "hold", "held", "nothing serves: the autopilot adapts a running plan",
                                         load, forecast, lost=lost))
        self._reviews = {}
        # Replicas beside the plan (pipelines on nodes of their own) carry part of the load: the plan is
        # judged (and corrected) at its share, in proportion to capacity (the service routes each request
        # to the pipeline with the shortest queue), and its candidates keep off their nodes.
        reps = self._replicas(cluster)
        taken = {n: f"held by replica {r['name']}" for r in reps for n in r["nodes"]}
        share = 1.0
        if any(r["state"] == "serving" for r in reps):
            total = self._assess(live, cluster, 0.0).capacity_rps
            if total > 0:
                share = total / (total + sum(r["capacity_rps"] for r in reps if r["state"] == "serving"))
        if reps:
            forecast["plan_share"] = share
        transport = ((snap.get("windows") or {}).get(cfg.window) or {}).get("transport")
        self._correct(live, cluster, {**load, "arrival_rate": rate_now * share, "running": load["running"] * share},
                      measured, stages, transport)
        self._tail(measured)
        rate_all, rate_now = rate, rate_now * share
        rate *= share
        now_view = self._assess(live, cluster, rate_now)
        predicted = {"ttft_ms": now_view.ttft_ms, "tpot_ms": now_view.tpot_ms, "util": now_view.util,
                     "capacity_rps": now_view.capacity_rps, "tpot_tail": self.tpot_tail}
        plans = self._plans(cluster, lost, live, tuple(taken))
        assessed = [self._assess(p, cluster, rate) for p in plans]
        current = self._assess(live, cluster, rate)
        # scale-down is judged on the load the survivors may carry: the forecast plus noise_z standard errors
        # of the measured rate (forecast.rate_noise), at scale_down_headroom, and within the SLOs up to where
        # the controller would scale up again (that load / the band's width)
        span = load["span_s"] or float(cfg.window[:-1])
        survivors_all = rate_all + cfg.noise_z * rate_noise(max(rate_all, self.forecaster.level or 0.0), span,
                                                            cfg.alpha)
        survivors = survivors_all * share
        forecast["survivors_rate"] = survivors_all
        band = cfg.headroom / cfg.scale_down_headroom

        def down(p: PlacementPlan) -> tuple[Assessment, bool]:
            return self._assess(p, cluster, survivors), self._assess(p, cluster, survivors * band).slo_ok
        # plans on nodes neither the live plan nor a replica holds: a move there never holds two plans on
        # one node mid-way (asked for only when the plan wanted is two moves away, see _choose)
        elsewhere = lambda: [self._assess(p, cluster, rate)   # noqa: E731
                             for p in self._plans_without(cluster, lost, [*live.nodes, *taken])]
        action, choice, reason, rows = self._choose(current, assessed, lost, cluster, load,
                                                    lambda p: self._review(p, cluster, live)[0], down,
                                                    lambda p, via: self._review(p, cluster, via)[0].ok, elsewhere)
        replica = None
        beyond = bool(_beyond_one_pipeline(current, assessed, cfg.headroom))
        if beyond and not reps:
            # no one pipeline carries the forecast: advise the replicas that would carry it together
            replica = self._replica_set(cluster, lost, rate)
            reason += "; " + replica["advice"]
        d = Decision(t, action, "held", reason, load, forecast, live, choice.plan if choice else None, rows,
                     predicted, measured, lost=lost, replica=replica)
        if cfg.max_replicas > 0 and self._runs_replicas():
            step = self._replica_step(d, choice, current, cluster, lost, reps, rate_all, survivors_all * band,
                                      survivors_all, beyond)
            if step is not None:
                return self._record(step)
        return self._record(self._gate(d, choice, cluster, live, bool(lost)))

    def _replica_set(self, cluster: Cluster, lost: dict[str, str], rate: float) -> dict:
        """Advice for a forecast that no one pipeline carries: pipelines on disjoint nodes that carry it
        together, each a plan the validator passes on its own. Greedy, as bench adapt's (f) builds its
        chains: while some of the forecast is left, the cheapest plan on the nodes still free that carries
        the rest within the SLOs and the headroom, else the one that carries most per node it takes (a
        chain over every node can carry less than two chains on halves of them). Advice where the
        controller does not add replicas itself (a Target without them, or max_replicas 0): the operator
        can add them (POST /admin/replicas). The planner's plans are kept per set of nodes left."""
        cfg = self.config
        used: list[str] = []
        chains, carried = [], 0.0
        while rate - carried > 1e-9 and len(chains) < MAX_REPLICAS:
            found = self._next_chain(cluster, lost, used, rate - carried)
            if found is None:               # nothing left keeps the SLOs even at its own share
                break
            pick, report, _ = found
            carries = min(rate - carried, pick.capacity_rps * cfg.headroom)
            chains.append({"plan": pick.plan.summary(), "plan_json": pick.plan.model_dump(mode="json", exclude={"estimates"}),
                           "valid": report.ok, "violations": [f"[{v.rule}] {v.message}" for v in report.violations],
                           "capacity_rps": pick.capacity_rps, "carries_rps": carries, "cost_per_hour": pick.cost})
            carried += carries
            used += [n for n in pick.plan.nodes if n not in used]
        if not chains:
            advice = "no valid plan serves a replica of it"
        else:
            names = " + ".join(f"{c['plan']} ({c['carries_rps']:.2f} req/s)" for c in chains)
            valid = all(c["valid"] for c in chains)
            advice = (f"{len(chains)} pipeline replicas on disjoint nodes, each a plan the validator "
                      f"{'passes' if valid else 'does not all pass'}, would carry {carried:.2f} of the {rate:.2f} "
                      f"req/s: {names}; add them as replicas (POST /admin/replicas)")
        return {"rate_rps": rate, "carried_rps": carried, "chains": chains, "advice": advice}

    def _next_chain(self, cluster: Cluster, lost: dict[str, str], used: list[str], rest: float):
        """(assessment, validator report, ValidatedPlan or None) of the pipeline to run next on the nodes
        neither lost nor `used`, for `rest` req/s: the cheapest that carries it within the SLOs and the
        headroom, else the one that carries most per node it takes; None when none keeps the SLOs even at
        the share it can take. Validated as a plan of its own (nothing moves to start a replica)."""
        cfg = self.config
        options = [self._assess(p, cluster, rest) for p in self._plans_without(cluster, lost, used)]
        ok = sorted((a for a in options if a.keeps(cfg.headroom)), key=lambda a: (a.cost, len(set(a.plan.nodes))))
        if ok:
            pick = ok[0]
        else:                               # each judged at the share it can take: its capacity under the headroom
            full = [self._assess(a.plan, cluster, a.capacity_rps * cfg.headroom) for a in options]
            pick = max((a for a in full if a.slo_ok),
                       key=lambda a: (a.capacity_rps / len(set(a.plan.nodes)), a.capacity_rps), default=None)
        if pick is None:
            return None
        report, validated = review(pick.plan, cluster, self.policy, pick.plan.intent or self.intent, self.model,
                                   prices=self.prices, profiles=self.profiles, corrections=self.corrections,
                                   groups_in_flight=self._groups(pick.plan))
        return pick, report, validated

    # ------------------------------------------------------------------ replicas: more pipelines beside the plan

    def _runs_replicas(self) -> bool:
        """Whether the Target runs replicas (replicas / add_replica / drain_replica)."""
        return all(callable(getattr(self.target, m, None)) for m in ("replicas", "add_replica", "drain_replica"))

    def _replicas(self, cluster: Cluster) -> list[dict]:
        """The Target's replicas, each with its plan parsed, and its capacity and cost by the cost model."""
        if not self._runs_replicas():
            return []
        out = []
        for r in self.target.replicas():
            plan = PlacementPlan.model_validate(r["plan"])
            a = self._assess(plan, cluster, 0.0)
            out.append({**r, "placement": plan, "capacity_rps": a.capacity_rps, "cost": a.cost})
        return out

    def _replica_step(self, d: Decision, choice: Assessment | None, current: Assessment, cluster: Cluster,
                      lost: dict[str, str], reps: list[dict], rate: float, band_rate: float, survivors: float,
                      beyond: bool) -> Decision | None:
        """A replica to release, add or drain this tick, gated; None leaves the tick to the plan's decision.

        - a replica that failed, or holds a lost node: released at once (hysteresis and cooldown bypassed),
          unless the plan itself lost a node (that re-plan goes first)
        - scale out: no one pipeline carries the plan's share of the forecast and the pipelines together
          do not carry the whole forecast under `headroom`: a replica on free nodes (`_next_chain`, for what
          the others leave), when it adds more capacity than the plan's own best change would
        - scale in: the newest replica drained when the others carry the survivors' load under
          `scale_down_headroom`, each keeping the SLOs at its share up to the band's top, and its nodes
          save at least `min_gain` of the cost
        """
        cfg, live = self.config, current.plan
        if d.action == "replan":
            return None
        for r in reps:
            gone = [n for n in r["nodes"] if n in lost]
            if r["state"] == "failed" or (gone and r["state"] == "serving"):
                why = f"failed ({r.get('error')})" if r["state"] == "failed" else \
                    f"holds {', '.join(gone)}, lost ({', '.join(lost[n] for n in gone)})"
                return self._gate_replica(self._replica_decision(d, "drop_replica", f"replica {r['name']} {why}: "
                                          "release it now (its nodes go back to the pool)", r), r, urgent=True)
        serving = [r for r in reps if r["state"] == "serving"]
        if any(r["state"] == "draining" for r in reps):
            return None                     # one replica change at a time: the next tick sees the drained one gone
        carried = current.capacity_rps + sum(r["capacity_rps"] for r in serving)
        if beyond and rate > cfg.headroom * carried and len(reps) < cfg.max_replicas:
            used = list(dict.fromkeys([*live.nodes, *(n for r in reps for n in r["nodes"])]))
            found = self._next_chain(cluster, lost, used, rate - cfg.headroom * carried)
            if found is not None:
                pick, report, validated = found
                own = choice.capacity_rps if (choice is not None and d.action == "change") else current.capacity_rps
                if pick.capacity_rps + current.capacity_rps > own * (1 + cfg.min_gain):
                    d2 = self._replica_decision(d, "add_replica", f"scale out: the forecast, {rate:.2f} req/s, is "
                                                f"more than the {1 + len(serving)} pipeline(s) carry under the "
                                                f"{cfg.headroom:.0%} headroom ({cfg.headroom * carried:.2f} req/s); "
                                                f"a replica on {pick.plan.summary()} adds "
                                                f"{pick.capacity_rps:.2f} req/s", None)
                    d2.chosen, d2.validation = pick.plan, report.text()
                    d2.replica = {"action": "add", "plan": pick.plan.summary(), "capacity_rps": pick.capacity_rps,
                                  "valid": report.ok, "carried_rps": carried}
                    return self._gate_replica(d2, None, validated=validated)
        if serving and d.action == "hold":
            last = max(serving, key=lambda r: r.get("added") or 0.0)
            rest = carried - last["capacity_rps"]
            saved = last["cost"] / max(1e-12, current.cost + sum(r["cost"] for r in serving))
            keeps = rest > 0 and survivors <= cfg.scale_down_headroom * rest and all(
                self._assess(p, cluster, band_rate * c / rest).slo_ok
                for p, c in [(live, current.capacity_rps)] + [(r["placement"], r["capacity_rps"])
                                                               for r in serving if r is not last])
            if keeps and saved >= cfg.min_gain:
                return self._gate_replica(self._replica_decision(
                    d, "drain_replica", f"scale in: without replica {last['name']} the others carry the survivors' "
                    f"load, {survivors:.2f} req/s, at {survivors / rest:.0%} of their capacity (under the "
                    f"{cfg.scale_down_headroom:.0%} scale-down headroom), and its nodes are {saved:.0%} of the cost",
                    last), last)
        return None

    def _replica_decision(self, d: Decision, action: str, reason: str, r: dict | None) -> Decision:
        """The tick's Decision for a replica action: what was seen and forecast, the plan's alternatives."""
        return Decision(d.t, action, "held", reason, d.load, d.forecast, d.current, None, d.alternatives,
                        d.predicted, d.measured, lost=d.lost,
                        replica={"action": action.split("_")[0], "name": r["name"], "nodes": r["nodes"],
                                 "state": r["state"]} if r is not None else None)

    def _gate_replica(self, d: Decision, r: dict | None, urgent: bool = False,
                      validated: ValidatedPlan | None = None) -> Decision:
        """Hysteresis and cooldown (a failed or lost replica bypasses both), the validator's verdict on a
        new replica, then the mode: advisory advises, confirm asks, auto acts through the Target."""
        cfg = self.config
        self._count(d, f"{d.action}:{r['name'] if r is not None else d.chosen.placement_key()}")
        if not urgent and self._held_back(d, d.action == "add_replica"):
            return d
        if d.action == "add_replica" and validated is None:
            d.status = "rejected"            # the validator refused the replica's plan: never started
            self._candidates, self._replica_plans = None, ((), {})
            return d
        if cfg.mode == "advisory":
            d.status = "advised"
            return d
        self._pending = d
        if cfg.mode == "confirm" and not (self.confirm and self.confirm(d)):
            d.status = "declined"
            return d
        try:
            if d.action == "add_replica":
                out = self.target.add_replica(validated)
            else:
                out = self.target.drain_replica(r["name"])
        except Exception as e:               # a mechanism's failure is journaled, never a crash of the loop
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        d.apply = out
        d.status = "applied" if out.get("ok") else "failed"
        if d.applied:
            self._changed()
            if d.replica is not None and out.get("name"):
                d.replica["name"] = out["name"]
        else:
            d.reason += f"; the {d.action.replace('_', ' ')} failed: {out.get('error')}"
        return d

    def _plans_without(self, cluster: Cluster, lost: dict[str, str], used: list[str]) -> list[PlacementPlan]:
        """The planner's plans as `_plans` makes them (each seat level and k, the cheapest and the fastest) on
        the nodes neither lost nor `used`. (With only the cheapest and fastest at up to max_stages per seat
        level, the 4-stage 64-seat chain that kept the TPOT bound on sim_eval's seed-99 day was never a
        replica: a 32-seat one was added, and in a burst a change to a 192-seat chain won over a replica.)"""
        state = (cluster.fingerprint(), ",".join(sorted(lost)))
        if self._replica_plans[0] != state:
            self._replica_plans = (state, {})
        key, cache = ",".join(sorted(used)), self._replica_plans[1]
        if key not in cache:
            spec = self._planning_intent(lost)
            spec = spec.model_copy(update={"exclude_nodes": tuple(dict.fromkeys((*spec.exclude_nodes, *used)))})
            cache[key] = self._planned((spec,), cluster, (None,))
        return cache[key]

    # ------------------------------------------------------------------ observe

    def _lost(self, cluster: Cluster, live: PlacementPlan | None) -> dict[str, str]:
        """Nodes that cannot serve: down or draining in the cluster, or named by the Target's lost_nodes()."""
        lost = {n.name: n.state for n in cluster.nodes if n.state != "up"}
        extra = getattr(self.target, "lost_nodes", None)
        if callable(extra):
            lost.update(extra())
        return lost

    @property
    def prefill_chunk_tokens(self) -> int | None:
        """The prompt tokens one engine step takes while others decode: the knob, else what the service
        says its engine does (/admin/stats "engine"), else None (whole prompts)."""
        return self.config.prefill_chunk_tokens or self._engine_chunk

    def _learn_engine(self, snap: dict) -> None:
        v = (snap.get("engine") or {}).get("max_prefill_tokens_decoding")
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            self._engine_chunk = v

    def _tail(self, measured: dict) -> None:
        """Learn how far the slow requests' TPOT lies above the typical one's: p99 / p50 of the window
        (smoothed like the corrections, clamped to [1, MAX_TAIL]). The cost model predicts a typical
        request, but the intent's bound is every request's: a plan predicted at 140 ms against a 150 ms
        bound kept the median there while one request in ten or more ran over it (in the simulator's day,
        TPOT p99 151-170 ms at a p50 of 135-145). The spread comes from how batches change over a
        request's life, much the same on any plan of the service, so the live plan's is applied to all."""
        p50, p99 = measured.get("tpot_p50_ms"), measured.get("tpot_p99_ms")
        if measured.get("tpot_n", 0) < MIN_SLO_SAMPLES or not p50 or not p99:
            return
        self.tpot_tail = smoothed(self.tpot_tail, self._tail_n, min(max(p99 / p50, 1.0), MAX_TAIL),
                                   self.corrections.alpha)
        self._tail_n += 1

    def _correct(self, live: PlacementPlan, cluster: Cluster, load: dict, measured: dict,
                 stages: list["_StageWindow"], transport: dict | None = None) -> None:
        """Fold what the window measured into the corrections (Dynamo's measured / expected).

        Where the telemetry has each stage's compute time (the window's "stages", split into decode-only
        steps and steps with prompt tokens), each stage's factors come from its own steps against the cost
        model's step time for the same shape (Corrections.observe_stage_times, as bench predict does): a
        stage's speed, apart from the load. Otherwise from the plan's measured TTFT/TPOT (p50) against the
        raw figures at the measured load (`_at_load`, the load's prompts riding in the decode steps, so
        their cost is not mistaken for slow decode; folding it into the decode factor had made the plans
        with more seats look too slow to keep the TPOT bound at any load). A measured TTFT includes the time a request
        waited for a seat, which the estimate does not: while requests queue (or every seat is taken) it
        measures the queue, not the nodes' prefill speed, so prefill is corrected only from windows without
        a queue (folding a queue in made every plan look several times slower, so none kept the SLOs and the
        controller never scaled up).

        With the stages' figures come the window's `transport` (per hop of the steps where each receiver
        waited for its message, and the driver's turn per step): the transport's own cost per message and
        the driver's, which every plan pays once per message and step (Corrections.observe_transport),
        so a plan with more stages is predicted to pay for its extra hops, not scaled by the live plan's
        ratio. The plans' estimates here count no link back to the driver, and neither does the fit."""
        traffic = _traffic(live, self.intent)
        by_context: dict[float, list] = {}
        for st in stages:                       # one call per decode context (the telemetry's, else the intent's)
            by_context.setdefault(st.decode_context or decode_context(traffic), []).append(st)
        if sum(self.corrections.observe_stage_times(group, live, cluster, self.model, round(ctx), self.profiles,
                                                    window_s=load.get("span_s"))
               for ctx, group in by_context.items()):
            if isinstance(transport, dict) and transport.get("steps"):
                try:
                    self.corrections.observe_transport(transport, cluster)
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"telemetry window transport {transport!r}: {type(e).__name__}: {e}") from None
            # what the per-stage figures leave out (how the prompts' chunks fall into steps, overheads):
            # measured / predicted TPOT of the live plan at the measured load, with the stages corrected
            if measured.get("tpot_n", 0) >= MIN_SLO_SAMPLES and measured.get("tpot_p50_ms"):
                conc = max(1, min(traffic.concurrency, round(load["running"] or 1)))
                pred = self._at_load(live, cluster, load["arrival_rate"], self.corrections, concurrency=conc,
                                     residual=1.0).tpot_ms
                if math.isfinite(pred) and pred > 0:
                    r = min(max(measured["tpot_p50_ms"] / pred, 1 / MAX_RESIDUAL), MAX_RESIDUAL)
                    self.tpot_residual = smoothed(self.tpot_residual, self._residual_n, r, self.corrections.alpha)
                    self._residual_n += 1
            return
        if min(measured.get("ttft_n", 0), measured.get("tpot_n", 0)) < MIN_SLO_SAMPLES:
            return
        if not (measured.get("ttft_p50_ms") and measured.get("tpot_p50_ms")):
            return
        conc = max(1, min(traffic.concurrency, round(load["running"] or 1)))
        raw = self._at_load(live, cluster, load["arrival_rate"], corrections=None, concurrency=conc)
        queued = (load["queue"] or 0) > 0 or (load["running"] or 0) >= traffic.concurrency
        if not (math.isfinite(raw.ttft_ms) and math.isfinite(raw.tpot_ms)):
            return                             # the model says this load overruns the plan: no ratio to learn
        for node in dict.fromkeys(live.nodes):
            if not queued:
                self.corrections.observe(node, "prefill", measured["ttft_p50_ms"], raw.ttft_ms)
            self.corrections.observe(node, "decode", measured["tpot_p50_ms"], raw.tpot_ms)

    # ------------------------------------------------------------------ candidates and their assessment

    def _groups(self, plan: PlacementPlan) -> int:
        return self.groups_in_flight or len(plan.stages)

    def _plans(self, cluster: Cluster, lost: dict[str, str], live: PlacementPlan | None = None,
               taken: tuple[str, ...] = ()) -> list[PlacementPlan]:
        """The planner's plans for this cluster state, lost nodes excluded: for each seat level (the intent's
        concurrency and `seat_levels`) and k = 1..max_stages, the cheapest and the fastest with at most k stages,
        with the same cost model the plans are judged by (profiles and the corrections measured so far).
        Planned once per cluster state, and again when a correction factor has moved by more than
        REPLAN_FACTOR since (not at every small step: measured factors wander from window to window, and
        planning again each tick cost seconds a tick); the load only changes which wins. With a node lost,
        each is also planned without the SLO bounds, as the fallback when no plan keeps them (such a plan
        carries the relaxed intent: `_relaxed`).
        With no node lost, each is also planned as a move from `live` (the planner's best plan that the
        validator passes as a move from it, so mid-way no node holds more than it can): planned on their own
        only, most of the plans with more seats were not one valid step away from the live plan, and the
        controller sat on a plan it could not leave while the queue grew. Planned again when the live plan
        changes. `taken`: nodes replicas hold, excluded as the lost ones are (but nothing is lost)."""
        moves_from = (None,) if lost or live is None else (None, live)
        key = "|".join((cluster.fingerprint(), ",".join(sorted(lost)), live.placement_key() if live else "",
                        ",".join(sorted(taken))))
        if self._candidates is not None and self._candidates[0] == key and not self._corrections_moved():
            return self._candidates[1]
        self._planned_with = dict(self.corrections.factors)
        spec = self._planning_intent({**lost, **dict.fromkeys(taken, "held by a replica")})
        self._candidates = (key, self._planned((spec, _relaxed(spec)) if lost else (spec,), cluster, moves_from))
        return self._candidates[1]

    def _planned(self, specs: tuple[IntentSpec, ...], cluster: Cluster,
                 moves_from: tuple[PlacementPlan | None, ...]) -> list[PlacementPlan]:
        """For each intent of `specs`, plan as a move from each of `moves_from` (None: a plan of its own):
        each seat level, k stages from the fewest the memory allows, the cheapest and the fastest."""
        from ..planner import Infeasible, plan as make_plan
        found: dict[tuple, PlacementPlan] = {}
        for base, current in [(b, c) for b in specs for c in moves_from]:
            for seats in self._seat_levels():
                sized = base if seats == base.traffic.concurrency else base.model_copy(
                    update={"traffic": base.traffic.model_copy(update={"concurrency": seats})})
                # k from the fewest stages the memory allows; stop at the first k with no plan after one
                # had a plan (the planner judges a plan at k groups in flight, so more allowed stages only
                # make the same chains slower; an infeasible search also costs the most: it explains itself)
                # or once both objectives took fewer stages than allowed
                done, had = set(), False
                for k in range(min_stages(cluster, self.model, sized), self.config.max_stages + 1):
                    infeasible = False
                    for objective in ("cost", "throughput"):
                        if objective in done:
                            continue
                        try:
                            p = make_plan(sized.model_copy(update={"objective": objective}), cluster, self.policy,
                                          self.model, current=current, max_stages=k, prices=self.prices,
                                          profiles=self.profiles,
                                          corrections=self.corrections, groups_in_flight=self.groups_in_flight or k)
                        except Infeasible:
                            infeasible = True     # the constraints, not the objective, leave no plan: so for both
                            break
                        had = True
                        found.setdefault((seats, p.plan.placement_key()), p.plan.model_copy(update={"intent": sized}))
                        if len(p.plan.stages) < k:
                            done.add(objective)    # allowed k stages it took fewer: more allowed changes nothing
                    if len(done) == 2 or (infeasible and had):
                        break
        return list(found.values())

    def _seat_levels(self) -> list[int]:
        """The concurrencies plans are sized for: the intent's (the smallest) and the larger `seat_levels`."""
        own = self.intent.traffic.concurrency
        return sorted({own, *(x for x in self.config.seat_levels if x > own)})

    def _corrections_moved(self) -> bool:
        """Whether a correction factor moved by more than REPLAN_FACTOR from what the candidates were planned with."""
        for k, f in self.corrections.factors.items():
            f0 = self._planned_with.get(k, 1.0)          # the planner takes a node without a factor at 1
            if abs(math.log(f / f0)) > math.log(REPLAN_FACTOR):
                return True
        return False

    def _review(self, plan: PlacementPlan, cluster: Cluster, live: PlacementPlan):
        """The validator on `plan` as a move from `live` (policies.review, as the gate runs it), once per tick
        and candidate: the choice only picks plans that pass, so the gate never meets a plan it must reject."""
        key = (plan.placement_key(), _traffic(plan, self.intent).concurrency, live.placement_key())
        if key not in self._reviews:
            spec = plan.intent or self.intent
            speed = dict(profiles=self.profiles, corrections=self.corrections, groups_in_flight=self._groups(plan))
            self._reviews[key] = review(plan, cluster, self.policy, spec, self.model, current=live,
                                        prices=self.prices, **speed)
        return self._reviews[key]

    def _planning_intent(self, lost: dict[str, str]) -> IntentSpec:
        """The operator's intent with the lost nodes excluded (the service's cluster state stays as it is)."""
        if not lost:
            return self.intent
        return self.intent.model_copy(update={"exclude_nodes": tuple(dict.fromkeys(
            self.intent.exclude_nodes + tuple(sorted(lost))))})

    def _assess(self, plan: PlacementPlan, cluster: Cluster, rate: float) -> Assessment:
        """A plan at `rate` requests per second (see the module docstring); its seats are its own reservation.
        The TPOT bound is kept when the slow requests keep it: the prediction (a typical request's) times
        the measured tail spread (`tail_aware`, see _tail)."""
        a = self._at_load(plan, cluster, rate, self.corrections)
        tail = self.tpot_tail if self.config.tail_aware else 1.0
        a.slo_ok = ((self.intent.max_ttft_ms is None or a.ttft_ms <= self.intent.max_ttft_ms)
                    and (self.intent.max_tpot_ms is None or a.tpot_ms * tail <= self.intent.max_tpot_ms))
        a.cost = sum(node_price(cluster.node(x), self.prices) for x in dict.fromkeys(plan.nodes))
        return a

    def _at_load(self, plan: PlacementPlan, cluster: Cluster, rate: float, corrections: Corrections | None,
                 concurrency: int | None = None, residual: float | None = None) -> Assessment:
        """What the cost model says `plan` does at `rate` requests per second (cost and SLO verdict left
        for _assess). The prompts arriving meanwhile ride in the decode steps (estimate's
        prompt_tokens_per_s), so TPOT is at that load: on a bandwidth-bound step a prompt's chunk costs
        only the compute it adds, not a prefill of its own (judging each prompt as a separate prefill that
        stalls every decode round had every plan miss the TPOT bound at 4 req/s where the simulator
        served 8.6 within it). TTFT and TPOT are at the concurrency the load keeps busy (Little's law;
        `concurrency` to give it instead); the engine admits a request to a free seat at once and
        chunks its prompt into the next steps, so below capacity TTFT hardly grows with the load.
        capacity: the rate at which every seat is busy, rate * (TTFT + output_tokens * TPOT(rate)) = seats.
        With corrections, TPOT is also scaled by the residual measured on the live plan (`tpot_residual`,
        see _correct; `residual` to give another), as Dynamo scales by measured / expected ITL.
        """
        t = _traffic(plan, self.intent)
        speed = dict(prices=self.prices, profiles=self.profiles, corrections=corrections,
                     groups_in_flight=self._groups(plan))
        P, O, B = t.prompt_tokens, t.output_tokens, t.concurrency

        scale = (self.tpot_residual if residual is None else residual) if corrections is not None else 1.0

        chunk = self.prefill_chunk_tokens
        steps = math.ceil(P / chunk) if chunk else 1

        def est(n: int, r: float):
            e = estimate(plan, cluster, self.model, t if n == B else t.model_copy(update={"concurrency": n}),
                         prompt_tokens_per_s=r * P, prompt_chunk_tokens=chunk, **speed)
            return e if scale == 1.0 else e.model_copy(update={"tpot_ms": e.tpot_ms * scale})

        def ttft_at(e, others: float) -> float:
            """A prompt that arrives while others decode is cut into `chunk`-token pieces, one per engine
            round: ceil(P / chunk) rounds (at least its prefill) instead of a prefill of its own. The others
            an arrival finds are Poisson with mean `others` (M/G/inf), so it finds some with probability
            1 - exp(-others). (On the embedded engine, 8 tokens a step: a 40-token prompt waited 5 rounds,
            TTFT 430 ms where a lone request's was 134.)"""
            if steps <= 1 or others <= 0:
                return e.ttft_ms
            p_busy = 1.0 - math.exp(-others)
            return (1 - p_busy) * e.ttft_ms + p_busy * max(e.ttft_ms, steps * e.tpot_ms)
        full = est(B, 0.0)
        capacity = 1e3 * B / (ttft_at(full, B - 1) + O * full.tpot_ms)
        for _ in range(3):          # the busier the seats, the more prompts ride in each step: a few rounds
            e = est(B, capacity)
            capacity = 0.5 * capacity + 0.5 * (1e3 * B / (ttft_at(e, B - 1) + O * e.tpot_ms))
        util = rate / capacity if capacity > 0 else math.inf
        n = concurrency or 1
        e = est(n, rate)
        busy = (concurrency - 1) if concurrency else rate * (e.ttft_ms + (O - 1) * e.tpot_ms) / 1e3
        for _ in range(0 if concurrency else 8):
            # Little's law: in flight = rate * time in the system; that time depends on how many are in flight
            busy = rate * (ttft_at(e, busy) + (O - 1) * e.tpot_ms) / 1e3
            nxt = max(1, min(B, math.ceil(busy))) if math.isfinite(busy) else B
            if nxt == n:
                break
            n = nxt
            e = est(n, rate)
        # past capacity the queue grows without bound: no TTFT bound is kept, however fast each step is
        ttft = ttft_at(e, busy) if util < 1 else math.inf
        return Assessment(plan, 0.0, capacity, util, n, ttft, e.tpot_ms, False)

    def _move(self, live: PlacementPlan, new: PlacementPlan, cluster: Cluster, load: dict) -> tuple[float, float]:
        """(seconds, price) of moving from `live` to `new`: the bytes each (src, dst) pair sends over its link,
        pairs in parallel, plus the expected pause; the price holds both plans' nodes while it runs and
        counts the old plan's nodes as serving nothing during the pause."""
        from policies import PlanDelta
        delta = PlanDelta.between(live, new, self.model)
        in_flight_tokens = (load["running"] or 0) * decode_context(self.intent.traffic)
        per_pair: dict[tuple[str, str], float] = {}
        for r in delta.moves:
            link = cluster.link(r.src, r.dst)
            bw = (link.bandwidth_gbps * 1e9 / 8) if link else 1e9 / 8
            lat = (link.latency_ms / 1e3) if link else 0.0
            per_pair[(r.src, r.dst)] = per_pair.get((r.src, r.dst), lat) + \
                (r.weight_bytes + r.kv_bytes_per_token * in_flight_tokens) / bw
        seconds = max(per_pair.values(), default=0.0) + (self._pause_s if delta.changed else 0.0)
        both = sum(node_price(cluster.node(x), self.prices) for x in dict.fromkeys(live.nodes + new.nodes)
                   if cluster.has_node(x))
        old = sum(node_price(cluster.node(x), self.prices) for x in dict.fromkeys(live.nodes) if cluster.has_node(x))
        price = both * seconds / 3600 + old * self._pause_s / 3600
        return seconds, price

    # ------------------------------------------------------------------ choose: the whole policy

    def _choose(self, current: Assessment, assessed: list[Assessment], lost: dict[str, str], cluster: Cluster,
                load: dict, check: Callable[[PlacementPlan], Any] | None = None,
                down: Callable[[PlacementPlan], tuple[Assessment, bool]] | None = None,
                reachable: Callable[[PlacementPlan, PlacementPlan], bool] | None = None,
                elsewhere: Callable[[], list[Assessment]] | None = None
                ) -> tuple[str, Assessment | None, str, list[dict]]:
        """(action, the chosen assessment or None to hold, the reason, every alternative with its verdict).

        `down(plan)` -> (the plan at the survivors' load, whether it keeps the SLOs at that load / the band)
        judges a cheaper plan (default: at the forecast, the SLOs only there). The survivors' load is the
        forecast plus the measured rate's noise: judged on the forecast alone, three noisy low readings (a
        Poisson count over 10 s) in a row consolidated a plan that the next high ones scaled out again.
        And the SLOs must hold up to where the controller would scale up again: the band alone stopped
        flips on capacity only.

        `reachable(new, via)`: whether the validator passes `new` as a move from `via`. When scaling up and the
        plan wanted is not one valid step from the live plan (mid-way a node would hold the layers and KV of
        both), a valid plan from which it is becomes the first step (`_via`); the next tick takes the second.
        A first step that would not carry the forecast under `headroom` trades a latency miss for a queue
        (and a move back at the next burst): then the cheapest plan of `elsewhere()` (plans on nodes the
        live plan leaves free, at the forecast: one move away, each node holding one plan mid-way) that keeps
        the SLOs and carries the survivors' load is taken instead, where there is one.

        Only a plan the validator passes as a move from the live plan (`check(plan)` -> its Report) is ever
        chosen: a candidate that is valid on its own may not be one step away (mid-way a node holds the
        layers of both plans), and recommending it would only have the gate reject it, tick after tick."""
        cfg, live = self.config, current.plan
        horizon_h = cfg.horizon_s / 3600

        def priced(a: Assessment) -> tuple[float, float]:
            """(seconds the move takes, what the horizon costs on a's plan, the move included)."""
            move_s, move_price = self._move(live, a.plan, cluster, load)
            return move_s, a.cost * horizon_h + move_price

        def gain_of(total: float) -> float:
            """The share of the live plan's horizon cost that a plan costing `total` over it saves."""
            return (current.cost * horizon_h - total) / (current.cost * horizon_h) if current.cost > 0 else 0.0
        scored = []
        for a in assessed:
            if a.plan.placement_key() == live.placement_key():
                continue
            move_s, total = priced(a)
            scored.append((a, move_s, total, gain_of(total)))
        invalid: dict[int, str] = {}           # id(assessment) -> the validator's first violation, as a move
        if check is not None:
            for a, *_ in scored:
                rep = check(a.plan)
                if not rep.ok:
                    v = rep.violations[0]
                    invalid[id(a)] = f"not a valid move from the live plan: [{v.rule}] {v.message}"
        valid = [s for s in scored if id(s[0]) not in invalid]
        by_total = sorted(valid, key=lambda s: (s[2], len(set(s[0].plan.nodes)), -s[0].capacity_rps))
        live_lost = [n for n in live.nodes if n in lost]

        def table(chosen: Assessment | None, verdict) -> list[dict]:
            out = [{**current.row(), "verdict": "current plan" + (" (chosen: hold)" if chosen is None else "")}]
            for a, move_s, total, gain in scored:
                out.append({**a.row(), "move_s": round(move_s, 3), "gain": round(gain, 4),
                            "verdict": "chosen" if a is chosen else invalid.get(id(a)) or verdict(a, gain)})
            return out

        if live_lost:
            ok = [s for s in by_total if s[0].keeps(cfg.headroom)]
            pick = ok[0][0] if ok else max((s[0] for s in valid), key=lambda a: a.capacity_rps, default=None)
            if pick is None:
                return "replan", None, f"{', '.join(live_lost)} lost ({', '.join(lost[n] for n in live_lost)}) " \
                    "and no valid plan avoids it", table(None, lambda a, g: "not valid")
            why = ("the cheapest plan that keeps the SLOs at the forecast" if ok else
                   "no plan keeps the SLOs at the forecast: the one with the most capacity")
            return "replan", pick, f"{', '.join(live_lost)} lost ({', '.join(lost[n] for n in live_lost)}): {why}", \
                table(pick, lambda a, g: "costs more" if a.keeps(cfg.headroom) else "would miss the SLOs or overload")
        if not current.keeps(cfg.headroom):
            miss = (f"the forecast {current.util:.0%} of its capacity is over the {cfg.headroom:.0%} headroom"
                    if current.slo_ok else f"predicted TTFT {current.ttft_ms:.0f} ms / TPOT {current.tpot_ms:.1f} ms "
                                           "miss the intent's bounds")
            smaller: dict[int, str] = {}     # id(assessment) -> why a plan with less capacity is not taken

            def carries_survivors(a: Assessment) -> bool:
                # The live plan has the capacity and misses a latency bound: a plan with less capacity must
                # also carry the survivors' load (the forecast plus the measured rate's noise, as a
                # scale-down is judged) within the SLOs and under `headroom`, or the next ticks would scale
                # up again. Judged at the forecast alone, a plan 3% over the TPOT bound was left at each
                # burst's end for one that could not carry the next burst, every 20 minutes (sim_eval (g)).
                if current.util > cfg.headroom or down is None or a.capacity_rps >= current.capacity_rps:
                    return True
                at, _ = down(a.plan)
                if at.keeps(cfg.headroom):
                    return True
                smaller[id(a)] = (f"less capacity than the live plan, and it would carry the survivors' load at "
                                  f"{at.util:.0%} of it" + ("" if at.slo_ok else ", missing the SLOs"))
                return False
            ok = [s for s in by_total if s[0].keeps(cfg.headroom) and carries_survivors(s[0])]
            if ok:
                pick = ok[0][0]
                return "change", pick, f"scale up: on the live plan {miss}; the cheapest plan that keeps the " \
                    f"SLOs carries it at {pick.util:.0%}", \
                    table(pick, lambda a, g: smaller.get(id(a)) or (
                        "costs more" if a.keeps(cfg.headroom) else "would miss the SLOs or overload"))
            # no plan one valid step away keeps them: the cheapest that does, reached in two steps
            far = sorted((s for s in scored if id(s[0]) in invalid and s[0].keeps(cfg.headroom)
                          and carries_survivors(s[0])), key=lambda s: (s[2], len(set(s[0].plan.nodes))))
            step = self._via(far, valid, reachable)
            if step is not None and not step[0].keeps(cfg.headroom) and elsewhere is not None:
                # On the seed-99 day of sim_eval, the first step (a 32-seat chain, 148% of its capacity at the
                # forecast) made three flips in an hour: it queued, and the next burst moved the plan back.
                first, goal = step
                apart = []
                for a in elsewhere():
                    if a.keeps(cfg.headroom) and carries_survivors(a) and (check is None or check(a.plan).ok):
                        move_s, total = priced(a)
                        apart.append((total, len(set(a.plan.nodes)), move_s, a))
                if apart:
                    total, _, move_s, pick = min(apart, key=lambda s: s[:2])
                    rows = table(None, lambda a, g: "not a step toward a plan that keeps the SLOs")
                    rows.append({**pick.row(), "move_s": round(move_s, 3), "gain": round(gain_of(total), 4),
                                 "verdict": "chosen"})
                    return "change", pick, f"scale up: on the live plan {miss}; {goal.plan.summary()} keeps the " \
                        f"SLOs at {goal.util:.0%} but is not one valid step away, and the first step there " \
                        f"would carry the forecast at {first.util:.0%} of its capacity: this plan, on nodes the " \
                        f"live plan leaves free, keeps the SLOs at {pick.util:.0%} in one move", rows
            if step is not None:
                first, goal = step
                return "change", first, f"scale up: on the live plan {miss}; {goal.plan.summary()} keeps the " \
                    f"SLOs at {goal.util:.0%} but is not one valid step away: first this plan, from which it is", \
                    table(first, lambda a, g: "not a step toward a plan that keeps the SLOs")
            if smaller:
                return "hold", None, f"on the live plan {miss}; the plans that keep the SLOs at the forecast " \
                    "have less capacity and would not carry the survivors' load: the live plan stays", \
                    table(None, lambda a, g: smaller.get(id(a)) or "would miss the SLOs or overload")

            # no plan carries the forecast within the SLOs: the most capacity among plans that keep the
            # SLOs at their own full seats (what they serve within the bounds; a plan with more seats but
            # a TPOT over the bound serves every request late), then the most capacity of the rest
            miss += _beyond_one_pipeline(current, [s[0] for s in scored], cfg.headroom)

            def goodput(a: Assessment):
                return (a.slo_ok, a.capacity_rps)
            best = max((s[0] for s in valid), key=goodput, default=None)
            top = max((s for s in scored if id(s[0]) in invalid), key=lambda s: goodput(s[0]), default=None)
            if top is not None and (best is None or goodput(top[0]) > goodput(best)) and \
                    top[0].capacity_rps > current.capacity_rps * (1 + cfg.min_gain):
                step = self._via([top], valid, reachable)
                if step is not None:
                    first, goal = step
                    return "change", first, f"scale up: on the live plan {miss}; no plan keeps the SLOs at the " \
                        f"forecast, {goal.plan.summary()} has the most capacity ({goal.capacity_rps:.2f} req/s) " \
                        "but is not one valid step away: first this plan, from which it is", \
                        table(first, lambda a, g: "not a step toward the plan with the most capacity")
            if best is not None and ((best.slo_ok and not current.slo_ok) or (
                    best.slo_ok == current.slo_ok and best.capacity_rps > current.capacity_rps * (1 + cfg.min_gain))):
                return "change", best, f"scale up: on the live plan {miss}; no plan keeps the SLOs at the " \
                    f"forecast, this one has the most capacity ({best.capacity_rps:.2f} req/s)" + \
                    (" of those that keep the SLOs at full seats" if best.slo_ok else ""), \
                    table(best, lambda a, g: "less capacity within the SLOs")
            return "hold", None, f"on the live plan {miss}, but no valid plan does better", \
                table(None, lambda a, g: "no better")
        # the live plan keeps the SLOs: is there a cheaper one that carries the whole load with margin?
        judged: dict[int, tuple[Assessment, bool]] = {}     # id(assessment at the forecast) -> down(plan)
        for a, _, _, gain in by_total:
            if gain >= cfg.min_gain:
                judged[id(a)] = down(a.plan) if down is not None else (a, a.slo_ok)
        cheaper = [s for s in by_total if id(s[0]) in judged and judged[id(s[0])][0].keeps(cfg.scale_down_headroom)
                   and judged[id(s[0])][1]]

        def why_not(a: Assessment, gain: float) -> str:
            return _why_not(*judged.get(id(a), (a, True)), gain, cfg)
        if cheaper:
            pick, _, _, gain = cheaper[0]
            return "change", pick, f"consolidate: {pick.plan.summary()} carries the survivors' load " \
                f"alone at {judged[id(pick)][0].util:.0%} of its capacity (under the " \
                f"{cfg.scale_down_headroom:.0%} scale-down headroom) and saves {gain:.0%} of the cost over " \
                "the horizon, the move counted", table(pick, why_not)
        return "hold", None, f"the live plan keeps the SLOs at the forecast ({current.util:.0%} of its capacity) " \
            "and no plan is cheaper by the gain threshold with the survivors' load under the scale-down headroom", \
            table(None, why_not)

    @staticmethod
    def _via(goals, valid, reachable) -> tuple[Assessment, Assessment] | None:
        """(first step, goal): for the first of `goals` (scored rows, best first) that some valid plan reaches
        in one more valid move, the valid plan with the most capacity that does; None when there is none."""
        if reachable is None:
            return None
        steps = sorted((s[0] for s in valid), key=lambda a: -a.capacity_rps)
        for goal, *_ in goals:
            for first in steps:
                if first.plan.placement_key() != goal.plan.placement_key() and reachable(goal.plan, first.plan):
                    return first, goal
        return None

    # ------------------------------------------------------------------ gate

    def _gate(self, d: Decision, choice: Assessment | None, cluster: Cluster, live: PlacementPlan,
              urgent: bool) -> Decision:
        """Hysteresis and cooldown (a lost node bypasses both), then the validator and Agent.gate."""
        cfg = self.config
        self._count(d, choice.plan.placement_key() if choice else "hold")
        if choice is None:
            d.status = "infeasible" if d.action == "replan" else "held"
            return d
        if d.action != "replan" and self._held_back(d, d.action == "change" and d.reason.startswith("scale up")):
            return d
        spec = choice.plan.intent or self.intent
        report, validated = self._review(choice.plan, cluster, live)
        d.validation = report.text()
        if validated is None:
            d.status = "rejected"
            self._candidates = None          # plan again next tick: this state's candidates are not all valid
            return d
        self._pending = d                    # what confirm(decision) is asked about
        out = self._agent(cluster).gate(validated.plan, spec, GATE_MODE[cfg.mode], validated=validated)
        d.apply = out.reconfig
        d.status = {"suggested": "advised", "applied": "applied", "declined": "declined", "rejected": "rejected",
                    "unchanged": "held", "failed": "failed", "refused": "advised", "dry-run": "advised"}[out.status]
        if out.status == "failed":
            d.reason += f"; the apply failed: {out.message}"
        if d.applied:
            self._changed()
            pause = (out.reconfig or {}).get("pause_ms")
            if isinstance(pause, (int, float)) and pause > 0:
                self._pause_s = pause / 1e3
        return d

    def _count(self, d: Decision, key: str) -> None:
        """Hysteresis: how many ticks in a row have recommended `key` (a plan, a replica action, hold)."""
        self._streak = self._streak + 1 if key == self._recommendation else 1
        self._recommendation = key
        d.streak = self._streak

    def _held_back(self, d: Decision, scale_up: bool) -> bool:
        """Whether the cooldown after the last change, or hysteresis (`scale_up_hysteresis` when scaling
        up, if set), holds the decision back this tick; says so in its status and reason."""
        cfg = self.config
        if self._last_change is not None and d.t - self._last_change < cfg.cooldown_s:
            d.status = "cooldown"
            d.reason += f" (cooling down: {cfg.cooldown_s - (d.t - self._last_change):.0f} s left)"
            return True
        need = cfg.scale_up_hysteresis if (scale_up and cfg.scale_up_hysteresis is not None) else cfg.hysteresis
        if self._streak < need:
            d.status = "waiting"
            d.reason += f" (recommended {self._streak} of {need} ticks in a row)"
            return True
        return False

    def _changed(self) -> None:
        """A change was applied: the cooldown starts, and the next recommendation counts from zero."""
        self._last_change = self.target.now()
        self._streak, self._recommendation = 0, None

    def _agent(self, cluster: Cluster):
        from ..agent import Agent
        return Agent(cluster, self.policy, executor=_TargetExecutor(self.target), model=self.model,
                     mode=GATE_MODE[self.config.mode], use_llm=False,
                     confirm=(lambda outcome: bool(self.confirm and self.confirm(self._pending))))

    # ------------------------------------------------------------------ record

    def _record(self, d: Decision) -> Decision:
        self.decisions.append(d)
        self._journal("decision", d.as_json())
        if d.apply is not None:
            self._journal("apply", {"t": d.t, "plan": d.chosen.summary() if d.chosen else None, "status": d.status,
                                    "report": d.apply})
        return d

    def _journal(self, kind: str, data: dict) -> None:
        if self.journal is not None:
            self.journal.append(kind, data)

    def why(self, at: float) -> Decision | None:
        """The last change applied (or recommended, in advisory mode) at or before time `at`."""
        acted = [d for d in self.decisions if d.t <= at and d.status in ("applied", "advised", "declined", "failed")]
        return acted[-1] if acted else None


def min_stages(cluster: Cluster, model: ModelSpec, intent: IntentSpec) -> int:
    """A lower bound on the stages a plan for `intent` needs: the fewest up, not excluded nodes whose usable
    memory together holds the model's weights and its KV reservation. The planner is not asked for fewer
    (it would search, find nothing and then search twice more to explain why: most of a re-plan's time)."""
    from policies.costmodel import StageShape, kv_bytes, weight_bytes
    L = model.num_layers
    whole = StageShape(L, True, True)
    need = weight_bytes(model, whole) + kv_bytes(model, whole, intent.traffic)
    excluded = set(intent.exclude_nodes)
    have = sorted((n.usable_memory_bytes for n in cluster.nodes if n.state == "up" and n.name not in excluded),
                  reverse=True)
    total = 0.0
    for k, m in enumerate(have, 1):
        total += m
        if total >= need:
            return k
    return max(1, len(have))


def _traffic(plan: PlacementPlan, intent: IntentSpec):
    """The traffic a plan was sized for (its seats: the KV it reserves), else the intent's."""
    return (plan.intent or intent).traffic


def _relaxed(spec: IntentSpec) -> IntentSpec:
    """The intent without its SLO bounds (every other field, and the policy, as they are)."""
    return spec.model_copy(update={"max_ttft_ms": None, "max_tpot_ms": None})


def _beyond_one_pipeline(current: Assessment, others: list[Assessment], headroom: float) -> str:
    """When the forecast is more than any one pipeline carries, words that say so (else ''): no choice
    among single pipelines then keeps the SLOs, and it takes a second replica (`_replica_step` adds one
    where the Target runs replicas; else `_replica_set` advises them)."""
    rate = current.util * current.capacity_rps
    most = max([current, *others], key=lambda a: a.capacity_rps)
    if most.capacity_rps <= 0 or rate <= most.capacity_rps * headroom:
        return ""
    return (f" (the forecast, {rate:.2f} req/s, is more than any one pipeline carries under the {headroom:.0%} "
            f"headroom: at most {most.capacity_rps:.2f} req/s, on {most.plan.summary()}; it takes a second "
            "pipeline replica)")


def _why_not(a: Assessment, in_band: bool, gain: float, cfg: AutopilotConfig) -> str:
    """Why a plan was not chosen to consolidate onto; `a` is it at the survivors' load (at the forecast
    for a plan that saves less than min_gain), `in_band` whether it keeps the SLOs up to the band's top."""
    if not a.slo_ok:
        return "would miss the SLOs"
    if a.util > cfg.scale_down_headroom:
        return f"would carry the survivors' load at {a.util:.0%} of its capacity (over {cfg.scale_down_headroom:.0%})"
    if not in_band:
        return (f"would miss the SLOs at {cfg.headroom / cfg.scale_down_headroom:.2f}x the survivors' load "
                "(what it may meet before scaling up again)")
    if gain <= 0:
        return "costs more" if gain < 0 else "costs the same"
    return f"saves {gain:.0%} only (under the {cfg.min_gain:.0%} threshold)"


def _read_load(snap: dict, window: str) -> tuple[dict, dict]:
    """The load and the measured SLOs from an /admin/stats document; raises ValueError naming what is missing."""
    try:
        w = snap["windows"][window]
    except (KeyError, TypeError):
        have = ", ".join((snap or {}).get("windows", {}) or ()) if isinstance(snap, dict) else type(snap).__name__
        raise ValueError(f"telemetry snapshot has no window {window!r} (it has: {have or 'none'}); is telemetry on?") \
            from None
    now = snap.get("now") or {}
    queue = now.get("queue_depth")
    running = now.get("running")
    load = {"arrival_rate": float(w["arrival_rate"]), "output_tokens_per_s": float(w.get("output_tokens_per_s", 0.0)),
            "queue": float(queue if queue is not None else (w.get("queue_depth") or {}).get("mean") or 0),
            "running": float(running if running is not None else (w.get("running") or {}).get("mean") or 0),
            "window": window, "span_s": w.get("span_s")}
    # with replicas serving beside the plan, the plan's own requests (what its corrections and tail are
    # about: a replica on other nodes runs at its own speed); else the service's, which are the plan's
    pipes = w.get("pipelines") or {}
    own = (pipes.get("plan") or {}) if len(pipes) > 1 else w
    ttft, tpot = own.get("ttft_s") or {}, own.get("tpot_s") or {}
    ms = lambda v: None if v is None else 1e3 * v  # noqa: E731
    measured = {"ttft_p50_ms": ms(ttft.get("p50")), "ttft_p99_ms": ms(ttft.get("p99")), "ttft_n": ttft.get("n", 0),
                "tpot_p50_ms": ms(tpot.get("p50")), "tpot_p99_ms": ms(tpot.get("p99")), "tpot_n": tpot.get("n", 0)}
    return load, measured, [_StageWindow.of(d) for d in w.get("stages") or ()]


@dataclass(frozen=True)
class _StageWindow:
    """One entry of a telemetry window's "stages" (GET /admin/stats), with the attributes
    Corrections.observe_stage_times reads (executor.telemetry.StageTime's, which agent/ does not import)."""
    node: str
    start: int
    end: int
    decode_steps: int
    decode_compute_s: float | None
    decode_rows_per_step: float | None
    decode_context: float | None
    prefill_steps: int
    prefill_compute_s: float | None
    prefill_tokens_per_step: float | None

    @classmethod
    def of(cls, d: dict) -> "_StageWindow":
        """From the JSON entry; raises ValueError naming what is missing or malformed."""
        try:
            a, b = d["layers"]
            return cls(str(d["node"]), int(a), int(b), int(d.get("decode_steps") or 0), d.get("decode_compute_s"),
                       d.get("decode_rows_per_step"), d.get("decode_context"), int(d.get("prefill_steps") or 0),
                       d.get("prefill_compute_s"), d.get("prefill_tokens_per_step"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"telemetry window stage entry {d!r}: {type(e).__name__}: {e}") from None
