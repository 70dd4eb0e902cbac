"""The autopilot's controller against a scripted Target: the local scenario's real cluster, policy and
model spec, real plans from the planner, the real validator and Agent.gate; only the load is scripted
(an /admin/stats-shaped snapshot) and apply moves the Target's live plan to the validated one."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.autopilot import Autopilot, AutopilotConfig, AutopilotConfigError
from agent.autopilot.config import read_intent_file
from agent.journal import Journal
from policies import IntentSpec, PlacementPlan, Stage, approve, load_cluster, load_model_spec, load_policy, review

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = load_cluster(ROOT / "scenarios/local/cluster.yaml")
POLICY = load_policy(ROOT / "scenarios/local/policy.yaml")
MODEL = load_model_spec("smollm2-135m")
INTENT = IntentSpec(data_class="internal", max_tpot_ms=400)


def plan_of(*stages, cluster=CLUSTER, intent=INTENT) -> PlacementPlan:
    p = PlacementPlan(model=MODEL.name, data_class=intent.data_class, cluster_fingerprint=cluster.fingerprint(),
                      intent=intent, stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
    return approve(p, cluster, POLICY, intent, MODEL).plan


TWO = [("edge-a", 0, 14), ("edge-b", 15, 29)]


class ScriptedTarget:
    """A Target whose load is scripted; apply accepts only a sealed ValidatedPlan, as a service does."""

    def __init__(self, plan: PlacementPlan, cluster=CLUSTER):
        self.t, self.rate, self.queue, self.plan, self._cluster = 0.0, 0.0, 0, plan, cluster
        self.applied: list[str] = []

    def now(self) -> float:
        return self.t

    def snapshot(self) -> dict:
        return {"now": {"queue_depth": self.queue, "running": 0},
                "windows": {"10s": {"arrival_rate": self.rate, "output_tokens_per_s": 0.0, "span_s": 10.0,
                                    "ttft_s": {"p50": None, "p99": None, "n": 0},
                                    "tpot_s": {"p50": None, "p99": None, "n": 0}}}}

    def live_plan(self) -> PlacementPlan:
        return self.plan

    def cluster(self):
        return self._cluster

    def apply(self, validated) -> dict:
        validated.verify()                       # a forged or changed plan raises here
        self.plan = validated.plan
        self.applied.append(validated.plan.summary())
        return {"ok": True, "state": "done", "pause_ms": 20.0}


def pilot(target, mode="auto", journal=None, confirm=None, **knobs) -> Autopilot:
    cfg = AutopilotConfig(**{"mode": mode, "hysteresis": 3, "cooldown_s": 60.0, **knobs})
    return Autopilot(target, INTENT, POLICY, MODEL, cfg, journal=journal, confirm=confirm)


def run(ap, target, rates, dt=10.0):
    out = []
    for r in rates:
        target.rate = r
        out.append(ap.tick())
        target.t += dt
    return out


def capacity(ap, *stages) -> float:
    """What the controller's own cost model says a plan carries (requests per second)."""
    return ap._assess(plan_of(*stages), CLUSTER, 0.0).capacity_rps


# ------------------------------------------------------------------ hysteresis, cooldown, no flips

def test_hysteresis_acts_only_after_n_consecutive_ticks():
    tg = ScriptedTarget(plan_of(*TWO))
    ap = pilot(tg, hysteresis=3)
    ds = run(ap, tg, [0.05] * 2)
    assert [d.status for d in ds] == ["waiting", "waiting"] and tg.applied == []
    ds += run(ap, tg, [0.05] * 2)
    assert ds[2].status == "applied" and ds[2].action == "change" and "consolidate" in ds[2].reason
    assert len(tg.plan.stages) == 1 and tg.applied == [tg.plan.summary()]
    assert ds[3].status == "held"
    assert [d.streak for d in ds[:3]] == [1, 2, 3]


def test_a_recommendation_that_changes_restarts_the_count():
    tg = ScriptedTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=2, alpha=1.0, beta=0.01)
    one = capacity(ap, ("edge-a", 0, 29))
    # over the headroom on one node, then back to idle, then over again: never two in a row
    ds = run(ap, tg, [one * 0.95, 0.0, one * 0.95, 0.0])
    assert tg.applied == [] and all(d.status in ("waiting", "held") for d in ds)
    assert [d.streak for d in ds if d.status == "waiting"] == [1, 1]


def test_cooldown_after_a_change():
    tg = ScriptedTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=1, cooldown_s=60.0, alpha=1.0, beta=0.01)
    one = capacity(ap, ("edge-a", 0, 29))
    ds = run(ap, tg, [one * 0.95])                       # spread out at once (hysteresis 1)
    assert ds[0].status == "applied" and len(tg.plan.stages) > 1
    ds = run(ap, tg, [0.0] * 8)         # idle at t = 10, 20, ...: consolidating waits until t = 60
    assert [d.status for d in ds[:5]] == ["cooldown"] * 5 and "cooling down" in ds[0].reason
    assert ds[5].status == "applied" and ds[5].t == 60.0 and len(tg.plan.stages) == 1
    assert len(tg.applied) == 2


@pytest.mark.parametrize("share", [0.3, 0.5, 0.65, 0.75, 0.9])
@pytest.mark.parametrize("start", ["one", "two"])
def test_no_flips_under_constant_load(share, start):
    """A constant rate, measured as a Poisson count over the 10 s window (the noise a real service shows)."""
    import numpy as np
    tg = ScriptedTarget(plan_of(*TWO) if start == "two" else plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=3, cooldown_s=60.0)
    rate = share * capacity(ap, ("edge-a", 0, 29))
    run(ap, tg, list(np.random.default_rng(7).poisson(rate * 10, size=40) / 10))
    # at most one change, to the plan that suits the load, then it stays
    assert len(tg.applied) <= 1, tg.applied


# ------------------------------------------------------------------ elastic: consolidate, spread, survivors

def test_scale_down_is_judged_on_the_load_the_survivors_carry():
    tg = ScriptedTarget(plan_of(*TWO))
    ap = pilot(tg, hysteresis=1, alpha=1.0, beta=0.01)
    one, two = capacity(ap, ("edge-a", 0, 29)), capacity(ap, *TWO)
    rate = 0.7 * one        # each of the two nodes is far from busy, but one node alone would run at 70%
    assert rate / two < 0.8
    d = run(ap, tg, [rate])[0]
    assert d.status == "held" and tg.applied == []
    single = [a for a in d.alternatives if a["nodes"] == 1]
    assert single and all("over 60%" in a["verdict"] for a in single), single
    # at 45% (a 10 s count) the survivor might see 66% (two standard errors more): held
    d = run(ap, tg, [0.45 * one])[0]
    assert d.status == "held" and d.forecast["survivors_rate"] > 0.6 * one
    assert all("over 60%" in a["verdict"] for a in d.alternatives if a["nodes"] == 1)
    # at 30% (47% with the noise) it consolidates
    d = run(ap, tg, [0.3 * one])[0]
    assert d.status == "applied" and len(set(tg.plan.nodes)) == 1
    assert 0.3 * one < d.forecast["survivors_rate"] < 0.6 * one


def test_spreads_when_load_rises_and_consolidates_when_it_falls():
    tg = ScriptedTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=2, cooldown_s=30.0)
    one = capacity(ap, ("edge-a", 0, 29))
    run(ap, tg, [0.2 * one] * 3 + [1.0 * one] * 6)
    assert len(tg.plan.stages) > 1 and tg.applied
    spread = len(tg.applied)
    run(ap, tg, [0.0] * 12)
    assert len(tg.plan.stages) == 1 and len(tg.applied) == spread + 1


def test_idle_service_shrinks_to_one_node():
    tg = ScriptedTarget(plan_of(("edge-a", 0, 9), ("edge-b", 10, 19), ("cloud-1", 20, 29)))
    ap = pilot(tg, hysteresis=2)
    run(ap, tg, [0.0] * 3)
    assert len(tg.plan.stages) == 1


# ------------------------------------------------------------------ node loss

def test_node_draining_replans_at_once_bypassing_hysteresis_and_cooldown():
    tg = ScriptedTarget(plan_of(*TWO))
    ap = pilot(tg, hysteresis=5, cooldown_s=600.0, min_rate=0.0)
    ap._last_change = 0.0                                 # as if a change was just applied
    tg._cluster = CLUSTER.with_state("edge-b", "draining")
    d = run(ap, tg, [0.1])[0]
    assert d.action == "replan" and d.status == "applied" and d.streak == 1
    assert "edge-b" not in tg.plan.nodes and "edge-b lost (draining)" in d.reason
    assert d.lost == {"edge-b": "draining"}


def test_a_lost_idle_node_changes_nothing():
    tg = ScriptedTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=1)
    tg._cluster = CLUSTER.with_state("cloud-1", "down")
    d = run(ap, tg, [0.05])[0]
    assert d.action == "hold" and tg.applied == [] and d.lost == {"cloud-1": "down"}


def test_lost_nodes_from_the_target_are_planned_around():
    class DeadWorker(ScriptedTarget):
        def lost_nodes(self):
            return {"edge-b": "dead: process exited with code -9"}
    tg = DeadWorker(plan_of(*TWO))
    d = run(pilot(tg, hysteresis=4), tg, [0.1])[0]
    assert d.status == "applied" and "edge-b" not in tg.plan.nodes
    assert "edge-b" in tg.plan.intent.exclude_nodes     # the validator's exclusions rule keeps it off


# ------------------------------------------------------------------ modes and the gate

def test_advisory_never_acts():
    tg = ScriptedTarget(plan_of(*TWO))
    ap = pilot(tg, mode="advisory", hysteresis=1)
    one = capacity(ap, ("edge-a", 0, 29))
    ds = run(ap, tg, [0.0] * 3 + [one] * 3)
    tg._cluster = CLUSTER.with_state("edge-a", "draining")
    ds += run(ap, tg, [0.1] * 2)
    assert tg.applied == [] and tg.plan.summary() == plan_of(*TWO).summary()
    assert "advised" in {d.status for d in ds} and not any(d.applied for d in ds)
    assert ap.why(tg.t).status == "advised"


def test_confirm_asks_with_the_decision_and_a_no_applies_nothing():
    asked = []
    tg = ScriptedTarget(plan_of(*TWO))
    ap = pilot(tg, mode="confirm", hysteresis=1, confirm=lambda d: asked.append(d) or False)
    d = run(ap, tg, [0.0])[0]
    assert d.status == "declined" and tg.applied == [] and asked == [d] and asked[0].chosen is not None
    ap.confirm = lambda d: True
    d = run(ap, tg, [0.0])[0]
    assert d.status == "applied" and len(tg.plan.stages) == 1


def test_a_plan_the_validator_rejects_is_never_applied():
    """However a candidate comes about, it passes the validator before the gate: here one on a node the
    intent excludes (a bug in candidate generation must not reach the service)."""
    intent = INTENT.model_copy(update={"exclude_nodes": ("cloud-1",)})
    bad = PlacementPlan(model=MODEL.name, data_class="internal", cluster_fingerprint=CLUSTER.fingerprint(),
                        intent=intent, stages=(Stage(node="cloud-1", first_layer=0, last_layer=29),))

    class BadCandidates(Autopilot):
        def _plans(self, cluster, lost, live=None, taken=()):
            return [bad]
    tg = ScriptedTarget(plan_of(*TWO, intent=intent))
    ap = BadCandidates(tg, intent, POLICY, MODEL, AutopilotConfig(mode="auto", hysteresis=1))
    ds = run(ap, tg, [0.0] * 3)
    # the choice only considers plans the validator passes as a move from the live one: it holds, and
    # says why the cheaper candidate was not taken (proposing it would have the gate reject it every tick)
    assert tg.applied == [] and {d.status for d in ds} == {"held"}
    verdicts = [a["verdict"] for a in ds[0].alternatives if a["plan"] == bad.summary()]
    assert verdicts and verdicts[0].startswith("not a valid move") and "[exclusions]" in verdicts[0]


def test_the_gate_still_rejects_what_the_choice_let_through():
    """Belt and braces: were a plan that the validator refuses chosen anyway, the gate rejects it."""
    intent = INTENT.model_copy(update={"exclude_nodes": ("cloud-1",)})
    bad = PlacementPlan(model=MODEL.name, data_class="internal", cluster_fingerprint=CLUSTER.fingerprint(),
                        intent=intent, stages=(Stage(node="cloud-1", first_layer=0, last_layer=29),))

    class BadChoice(Autopilot):
        def _plans(self, cluster, lost, live=None, taken=()):
            return [bad]

        def _choose(self, current, assessed, lost, cluster, load, check=None, down=None, reachable=None,
                    elsewhere=None):
            return super()._choose(current, assessed, lost, cluster, load, None, down, reachable, elsewhere)
    tg = ScriptedTarget(plan_of(*TWO, intent=intent))
    ap = BadChoice(tg, intent, POLICY, MODEL, AutopilotConfig(mode="auto", hysteresis=1))
    ds = run(ap, tg, [0.0] * 3)
    assert tg.applied == [] and {d.status for d in ds} == {"rejected"}
    assert "[exclusions]" in ds[0].validation


# ------------------------------------------------------------------ the journal and the decision's content

def test_every_decision_is_journaled_with_what_was_seen_and_considered(tmp_path):
    j = Journal(tmp_path / "journal.jsonl")
    tg = ScriptedTarget(plan_of(*TWO))
    ap = pilot(tg, journal=j, hysteresis=2)
    run(ap, tg, [0.05] * 3)
    decisions = j.entries(kinds={"decision"})
    assert len(decisions) == 3 and j.verify().ok
    last = decisions[1]["data"]
    assert last["status"] == "applied" and last["forecast"]["rate"] >= 0 and last["load"]["arrival_rate"] == 0.05
    verdicts = [a["verdict"] for a in last["alternatives"]]
    assert "chosen" in verdicts and any(v.startswith("current plan") for v in verdicts)
    assert len(j.entries(kinds={"apply"})) == 1 and j.entries(kinds={"autopilot"})


def test_an_unreachable_service_is_an_unobserved_interval_and_the_loop_goes_on(tmp_path):
    """run() outlives a target that fails: each failed interval is journaled with its error, changes
    nothing, restarts the hysteresis count, and the loop ticks on to act once the service answers."""
    import threading

    class Flaky(ScriptedTarget):
        down = 0

        def snapshot(self):
            self.t += 10.0
            if self.down:
                self.down -= 1
                raise ConnectionError("http://127.0.0.1:8000 refused the connection")
            return super().snapshot()
    j = Journal(tmp_path / "journal.jsonl")
    tg = Flaky(plan_of(*TWO))
    ap = pilot(tg, journal=j, hysteresis=2, interval_s=0.001)
    stop, seen = threading.Event(), []

    def on_decision(d):
        seen.append(d)
        if len(seen) == 1:
            tg.down = 2                      # the next two intervals find nobody there
        if len(seen) == 5:
            stop.set()
    ap.run(stop, on_decision)
    assert [d.status for d in seen] == ["waiting", "unobserved", "unobserved", "waiting", "applied"]
    assert "ConnectionError" in seen[1].reason and "refused" in seen[1].reason
    assert tg.applied == [seen[-1].chosen.summary()]     # two agreeing intervals after the outage, not across it
    logged = [e["data"]["status"] for e in j.entries(kinds={"decision"})]
    assert logged == [d.status for d in seen] and j.verify().ok


def test_a_plan_with_less_capacity_must_carry_the_survivors_load_to_replace_one_that_misses_a_bound():
    """The live plan has the capacity but misses the TPOT bound; a one-node plan keeps the bound at the
    forecast. Taking it is a scale-down, so it must carry the survivors' load (the forecast plus its
    noise) under the headroom too, or the next burst has the controller scale up again (sim_eval (g)
    moved back and forth every 20 minutes at the end of each burst)."""
    one = [("edge-a", 0, 29)]

    class OnlyOne(Autopilot):                # the one-node plan is the only candidate
        def _plans(self, cluster, lost, live=None, taken=()):
            return [plan_of(*one)]

    def at(rate, noise_z):
        tg = ScriptedTarget(plan_of(*TWO))
        ap = OnlyOne(tg, INTENT, POLICY, MODEL, AutopilotConfig(mode="auto", hysteresis=1, cooldown_s=60.0,
                                                                  alpha=1.0, beta=0.01, noise_z=noise_z))
        assert capacity(ap, *one) < capacity(ap, *TWO)
        two_tpot = ap._assess(plan_of(*TWO), CLUSTER, rate).tpot_ms
        one_tpot = ap._assess(plan_of(*one), CLUSTER, rate).tpot_ms
        assert one_tpot < two_tpot
        ap.intent = INTENT.model_copy(update={"max_tpot_ms": (one_tpot + two_tpot) / 2})
        return tg, run(ap, tg, [rate])[0], capacity(ap, *one)

    # 36% of the one-node plan's capacity at the forecast, over 80% with four standard errors of a 10 s count
    cap = capacity(pilot(ScriptedTarget(plan_of(*TWO))), *one)
    tg, d, _ = at(0.36 * cap, 4.0)
    assert d.status == "held" and tg.applied == [], d.reason
    assert d.forecast["survivors_rate"] > 0.8 * cap
    assert "less capacity than the live plan" in d.reason or any(
        "less capacity than the live plan" in a["verdict"] for a in d.alternatives)
    assert all("less capacity than the live plan" in a["verdict"] for a in d.alternatives if a["nodes"] == 1)
    # the same load judged without the noise (noise_z 0: the survivors carry the forecast): the move is made
    tg, d, _ = at(0.36 * cap, 0.0)
    assert d.status == "applied" and len(set(tg.plan.nodes)) == 1, d.reason
    assert d.forecast["survivors_rate"] < 0.8 * cap


def test_the_tpot_bound_is_judged_on_the_slow_requests():
    """The cost model predicts a typical request; the bound is every request's. The live plan's measured
    TPOT p99 / p50 (smoothed, clamped) scales the prediction the SLO check uses, for every plan; with
    too few requests in the window nothing is learned, and tail_aware: false judges the median."""
    class Spread(ScriptedTarget):
        p50, p99, n = 0.100, 0.150, 20

        def snapshot(self):
            snap = super().snapshot()
            snap["windows"]["10s"]["tpot_s"] = {"p50": self.p50, "p99": self.p99, "n": self.n}
            return snap
    one = plan_of(("edge-a", 0, 29))
    tg = Spread(plan_of(*TWO))
    ap = pilot(tg, mode="advisory")
    typical = ap._assess(one, CLUSTER, 0.0).tpot_ms
    ap.intent = INTENT.model_copy(update={"max_tpot_ms": 1.2 * typical})
    assert ap._assess(one, CLUSTER, 0.0).slo_ok                  # nothing measured yet: the tail is 1
    run(ap, tg, [0.1] * 12)
    assert ap.tpot_tail == pytest.approx(1.5, rel=1e-3) and ap.decisions[-1].predicted["tpot_tail"] == ap.tpot_tail
    assert not ap._assess(one, CLUSTER, 0.0).slo_ok              # 1.5 x typical is over 1.2 x typical
    ap.config = AutopilotConfig(**{**ap.config.as_dict(), "tail_aware": False})
    assert ap._assess(one, CLUSTER, 0.0).slo_ok
    tg.p99, tg.n = 0.900, 2                                      # too few requests: the tail stays
    run(ap, tg, [0.1] * 3)
    assert ap.tpot_tail == pytest.approx(1.5, rel=1e-3)
    tg.n = 20                                                    # 9x is clamped to MAX_TAIL
    run(ap, tg, [0.1] * 40)
    assert ap.tpot_tail == pytest.approx(2.0, rel=1e-3)


def test_a_prompt_arriving_while_others_decode_waits_its_chunks():
    """The engine takes max_prefill_tokens_decoding prompt tokens a step while others decode: a prompt
    arriving then waits ceil(P / chunk) rounds. The controller learns the budget from the service
    (/admin/stats "engine") unless the knob sets it, and predicts TTFT at load with it."""
    class Chunked(ScriptedTarget):
        def snapshot(self):
            return {**super().snapshot(), "engine": {"max_num_seqs": 8, "max_prefill_tokens": 512,
                                                     "max_prefill_tokens_decoding": 8}}
    tg = Chunked(plan_of(*TWO))
    ap = pilot(tg, mode="advisory")
    one = plan_of(("edge-a", 0, 29))
    rate = 0.5 * capacity(ap, ("edge-a", 0, 29))
    whole = ap._assess(one, CLUSTER, rate)
    assert ap.prefill_chunk_tokens is None
    run(ap, tg, [0.0])
    assert ap.prefill_chunk_tokens == 8
    chunked = ap._assess(one, CLUSTER, rate)
    P = INTENT.traffic.prompt_tokens
    rounds = math.ceil(P / 8) * chunked.tpot_ms
    assert rounds > whole.ttft_ms                     # the case that matters: chunks take longer than a prefill
    assert whole.ttft_ms < chunked.ttft_ms < rounds   # a mix: some arrivals find the engine idle
    assert ap._assess(one, CLUSTER, 0.0).ttft_ms == pytest.approx(whole_idle := ap._at_load(
        one, CLUSTER, 0.0, ap.corrections).ttft_ms) and whole_idle > 0    # idle: nobody to wait behind
    ap.config = AutopilotConfig(**{**ap.config.as_dict(), "prefill_chunk_tokens": 4096})
    assert ap.prefill_chunk_tokens == 4096            # the knob wins over what the service says


def test_a_snapshot_without_the_window_is_a_clear_error():
    tg = ScriptedTarget(plan_of(*TWO))
    tg.snapshot = lambda: {"windows": {"60s": {}}}
    with pytest.raises(ValueError, match="no window '10s' .*60s"):
        pilot(tg).tick()


# ------------------------------------------------------------------ knobs

@pytest.mark.parametrize("knobs, field, value", [
    ({"hysteresis": 0}, "autopilot.hysteresis", "0"),
    ({"mode": "yolo"}, "autopilot.mode", "'yolo'"),
    ({"headroom": 1.5}, "autopilot.headroom", "1.5"),
    ({"interval_s": -1}, "autopilot.interval_s", "-1"),
    ({"scale_down_headroom": 0.9, "headroom": 0.8}, "autopilot.scale_down_headroom", "0.9"),
    ({"window": "5m"}, "autopilot.window", "'5m'"),
    ({"bogus": 1}, "autopilot.bogus", "unknown knob"),
    ({"tail_aware": "yes"}, "autopilot.tail_aware", "'yes'"),
])
def test_bad_knobs_name_the_knob_and_value(knobs, field, value):
    with pytest.raises(AutopilotConfigError) as e:
        AutopilotConfig.from_dict(knobs, "intent.md")
    assert field in str(e.value) and value in str(e.value) and str(e.value).startswith("intent.md")


def test_knobs_from_the_front_matter_with_file_and_line(tmp_path):
    f = tmp_path / "intent.md"
    f.write_text("---\ncluster: c.yaml\nautopilot:\n  mode: auto\n  cooldown_s: 30\n  hysteresis: two\n"
                 "policy: p.yaml\n---\nKeep it running.\n")
    with pytest.raises(AutopilotConfigError, match=r"intent.md:6: autopilot.hysteresis: 'two'"):
        read_intent_file(f)
    intent_file, cfg = read_intent_file(f, hysteresis=2, mode=None)
    assert (cfg.mode, cfg.cooldown_s, cfg.hysteresis) == ("auto", 30.0, 2)
    assert intent_file.front == {"cluster": "c.yaml", "policy": "p.yaml"} and intent_file.body == "Keep it running."
    # the intent file's own errors keep their line numbers
    f.write_text("---\nautopilot:\n  mode: auto\nbogus: 1\n---\nx\n")
    with pytest.raises(Exception, match=r"intent.md:4: bogus"):
        read_intent_file(f)


# ------------------------------------------------------------------ cheap decisions, honest corrections

def test_candidates_are_planned_once_per_cluster_state(monkeypatch):
    """Planning the candidates is the costly part of a tick; the load only changes which one wins."""
    import agent.planner as planner
    calls = []
    real = planner.plan
    monkeypatch.setattr(planner, "plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    tg = ScriptedTarget(plan_of(*TWO))
    ap = pilot(tg, hysteresis=5)
    run(ap, tg, [0.05])
    first = len(calls)
    assert first > 0
    run(ap, tg, [0.05, 0.2, 0.01, 0.1])
    assert len(calls) == first


class MeasuredTarget(ScriptedTarget):
    """Reports measured TTFT/TPOT in its window, as a service with traffic does."""

    def __init__(self, plan, ttft_s, tpot_s):
        super().__init__(plan)
        self.ttft_s, self.tpot_s = ttft_s, tpot_s

    def snapshot(self) -> dict:
        snap = super().snapshot()
        w = snap["windows"]["10s"]
        w["ttft_s"] = {"p50": self.ttft_s, "p99": self.ttft_s, "n": 20}
        w["tpot_s"] = {"p50": self.tpot_s, "p99": self.tpot_s, "n": 20}
        return snap


def test_a_queue_is_not_folded_into_the_prefill_correction():
    """A TTFT measured while requests queue is the queue's wait: it must not make every node look slower."""
    tg = MeasuredTarget(plan_of(*TWO), ttft_s=30.0, tpot_s=0.05)
    tg.queue = 40
    ap = pilot(tg, hysteresis=5)
    run(ap, tg, [0.5] * 3)
    assert not any(ph == "prefill" for _, ph in ap.corrections.factors)
    assert any(ph == "decode" for _, ph in ap.corrections.factors)
    tg.queue = 0
    run(ap, tg, [0.5])
    assert any(ph == "prefill" for _, ph in ap.corrections.factors)


def test_a_plan_two_valid_steps_away_is_reached_through_a_first_step():
    """Autopilot._via: the goal is not one valid step from the live plan; the first step is the valid plan
    with the most capacity from which the goal is a valid move (not the one with the most capacity)."""
    from agent.autopilot.controller import Assessment
    def a(*stages, cap):
        return Assessment(plan_of(*stages), 0.1, cap, 0.5, 1, 100.0, 5.0, True)
    goal = a(("edge-a", 0, 14), ("cloud-1", 15, 29), cap=9.0)
    near = a(("edge-b", 0, 29), cap=2.0)            # the goal is a valid move from here
    big = a(("edge-a", 0, 29), cap=3.0)             # more capacity, but the goal is not a valid move from it
    reach = {(goal.plan.placement_key(), near.plan.placement_key())}

    def reachable(new, via):
        return (new.placement_key(), via.placement_key()) in reach
    rows = lambda *xs: [(x, 0.0, 0.0, 0.0) for x in xs]  # noqa: E731  (assessment, move_s, total, gain)
    assert Autopilot._via(rows(goal), rows(big, near), reachable) == (near, goal)
    assert Autopilot._via(rows(goal), rows(big), reachable) is None
    assert Autopilot._via(rows(goal), rows(big, near), None) is None


def test_a_first_step_that_would_queue_gives_way_to_a_plan_on_free_nodes():
    """Autopilot._choose: the live plan misses a bound, the plan wanted is two valid moves away, and the
    only first step would run past its capacity at the forecast (a queue, then a move back at the next
    burst). A plan on nodes the live plan leaves free that keeps the SLOs is one move: it is chosen.
    Without one (or when the first step carries the forecast) the first step is taken, as before."""
    from types import SimpleNamespace
    from agent.autopilot.controller import Assessment
    tg = ScriptedTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg)

    def a(*stages, cap, util, ok=True):
        return Assessment(plan_of(*stages), 0.1, cap, util, 1, 100.0, 5.0, ok)
    current = a(("edge-a", 0, 29), cap=4.0, util=0.5, ok=False)            # misses the TPOT bound
    goal = a(("edge-a", 0, 14), ("edge-b", 15, 29), cap=6.0, util=0.33)    # keeps it; not one step away
    near = a(("edge-b", 0, 29), cap=1.0, util=2.0)                          # one step away; 200% at the forecast
    free = a(("cloud-1", 0, 29), cap=5.0, util=0.4)                         # on nodes the live plan leaves free
    bad = SimpleNamespace(ok=False, violations=[SimpleNamespace(rule="transition", message="mid-way too much")])
    good = SimpleNamespace(ok=True, violations=[])

    def check(p):
        return bad if p.placement_key() == goal.plan.placement_key() else good

    def reachable(new, via):
        return via.placement_key() == near.plan.placement_key()
    load = {"running": 0.0, "arrival_rate": 2.0}

    def choose(elsewhere, first=near):
        return ap._choose(current, [goal, first], {}, CLUSTER, load, check, None, reachable, elsewhere)
    action, pick, reason, rows = choose(lambda: [free])
    assert action == "change" and pick is free, reason
    assert "on nodes the live plan leaves free" in reason and rows[-1]["verdict"] == "chosen"
    assert choose(None)[1] is near
    assert choose(lambda: [])[1] is near
    missing = a(("cloud-1", 0, 29), cap=5.0, util=0.4, ok=False)
    assert choose(lambda: [missing])[1] is near
    roomy = a(("edge-b", 0, 29), cap=5.0, util=0.4)                        # a first step that carries it
    assert choose(lambda: [free], first=roomy)[1] is roomy


def test_stage_telemetry_sets_the_stage_factors_and_the_tpot_residual():
    """With the window's per-stage step times, each stage's decode factor comes from its own decode-only
    steps, and what the plan's measured TPOT still differs by becomes the TPOT residual applied to every
    plan's prediction; a malformed stage entry is an error naming it."""
    from policies.costmodel import StageShape, stage_step_ms
    plan = plan_of(("edge-a", 0, 29))
    tg = ScriptedTarget(plan)
    ap = pilot(tg, hysteresis=99)
    pred = stage_step_ms(MODEL, StageShape(30, True, True), CLUSTER.node("edge-a"), "decode", 2, 300)
    stages = [{"node": "edge-a", "layers": [0, 30], "decode_steps": 50, "decode_compute_s": 2 * pred / 1e3,
               "decode_rows_per_step": 2.0, "decode_context": 300.0, "prefill_steps": 0}]
    base = ap._at_load(plan, CLUSTER, 0.2, ap.corrections, concurrency=2).tpot_ms
    measured_tpot = 3 * base                       # the stages say 2x slower, the requests 3x
    snap = tg.snapshot()
    w = snap["windows"]["10s"]
    w.update(stages=stages, tpot_s={"p50": measured_tpot / 1e3, "p99": None, "n": 20},
             ttft_s={"p50": 0.1, "p99": None, "n": 20}, arrival_rate=0.2)
    snap["now"]["running"] = 2
    tg.snapshot = lambda: snap
    ap.tick()
    assert ap.corrections.factor("edge-a", "decode") == pytest.approx(2.0, rel=1e-3)
    assert ap.tpot_residual == pytest.approx(1.5, rel=0.05)
    corrected = ap._at_load(plan, CLUSTER, 0.2, ap.corrections, concurrency=2).tpot_ms
    assert corrected == pytest.approx(measured_tpot, rel=0.05)
    w["stages"] = [{"node": "edge-a"}]
    tg.t += 10.0
    level = ap.forecaster.level
    with pytest.raises(ValueError, match="stage entry"):
        ap.tick()
    assert ap.forecaster.level == level and len(ap.decisions) == 1     # the bad snapshot changed nothing


def test_prefill_chunk_tokens_knob():
    assert AutopilotConfig(prefill_chunk_tokens=512).prefill_chunk_tokens == 512
    with pytest.raises(AutopilotConfigError, match="prefill_chunk_tokens"):
        AutopilotConfig(prefill_chunk_tokens=0)


def test_a_forecast_beyond_any_one_pipeline_says_it_takes_a_second_replica():
    tg = ScriptedTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=1)
    most = max(capacity(ap, *s) for s in ([("edge-a", 0, 29)], TWO,
                                          [("edge-a", 0, 9), ("edge-b", 10, 19), ("cloud-1", 20, 29)]))
    d = run(ap, tg, [20 * most] * 3)[-1]
    assert "second pipeline replica" in d.reason and "more than any one pipeline carries" in d.reason
    # ... and what would: pipelines on disjoint nodes, each a plan the validator passes on its own
    rep = d.replica
    assert rep is not None and len(rep["chains"]) >= 2 and d.as_json()["replica"] == rep
    plans = [PlacementPlan.model_validate(c["plan_json"]) for c in rep["chains"]]
    nodes = [n for p in plans for n in p.nodes]
    assert len(nodes) == len(set(nodes)), [p.summary() for p in plans]
    for p, c in zip(plans, rep["chains"]):
        assert c["valid"] and not c["violations"] and review(p, CLUSTER, ap.policy, p.intent, ap.model)[0].ok
        assert c["plan"] in d.reason and 0 < c["carries_rps"] <= c["capacity_rps"]
    assert "validator passes" in d.reason
    # together they carry more than the single pipeline with the most capacity under the headroom
    assert rep["carried_rps"] > most * ap.config.headroom
    assert rep["carried_rps"] <= rep["rate_rps"] + 1e-9
    # a load that one pipeline carries says nothing of the kind
    tg2 = ScriptedTarget(plan_of(("edge-a", 0, 29)))
    ap2 = pilot(tg2, hysteresis=1)
    assert all("replica" not in d.reason and d.replica is None for d in run(ap2, tg2, [0.5 * most] * 3))


# ------------------------------------------------------------------ replicas beside the plan

class ReplicaTarget(ScriptedTarget):
    """A ScriptedTarget that runs replicas as the service does: on nodes of their own, sealed plans only;
    a drained replica shows as draining once, then is gone."""

    def __init__(self, plan, cluster=CLUSTER):
        super().__init__(plan, cluster)
        self.reps: list[dict] = []
        self.added: list[str] = []
        self.drained: list[str] = []

    def replicas(self) -> list[dict]:
        out = [dict(r) for r in self.reps]
        self.reps = [r for r in self.reps if r["state"] != "draining"]
        return out

    def add_replica(self, validated) -> dict:
        validated.verify()
        nodes = list(validated.plan.nodes)
        held = set(self.plan.nodes) | {n for r in self.reps for n in r["nodes"]}
        assert not held & set(nodes), (held, nodes)
        name = f"r{len(self.added) + 1}"
        self.reps.append({"name": name, "state": "serving", "nodes": nodes, "added": self.t,
                          "plan": validated.plan.model_dump(mode="json")})
        self.added.append(validated.plan.summary())
        return {"ok": True, "name": name, "state": "serving"}

    def drain_replica(self, name) -> dict:
        r = next(r for r in self.reps if r["name"] == name)
        if r["state"] == "failed":
            self.reps.remove(r)
        else:
            r["state"] = "draining"
        self.drained.append(name)
        return {"ok": True, "name": name, "state": "draining"}


def most_capacity(ap) -> float:
    return max(capacity(ap, *s) for s in ([("edge-a", 0, 29)], TWO,
                                          [("edge-a", 0, 9), ("edge-b", 10, 19), ("cloud-1", 20, 29)]))


def test_a_forecast_beyond_one_pipeline_adds_a_replica_on_free_nodes_and_drains_it_when_load_falls():
    tg = ReplicaTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=2, cooldown_s=30.0, alpha=1.0, beta=0.01)
    high = 1.5 * most_capacity(ap)
    ds = run(ap, tg, [high] * 2)
    assert [d.status for d in ds] == ["waiting", "applied"] and ds[1].action == "add_replica", ds[1].reason
    assert "scale out" in ds[1].reason and tg.added and tg.applied == []     # the plan itself stayed
    rep_nodes = tg.reps[0]["nodes"]
    assert "edge-a" not in rep_nodes
    assert review(PlacementPlan.model_validate(tg.reps[0]["plan"]), CLUSTER, POLICY, INTENT, MODEL)[0].ok
    ds = run(ap, tg, [high] * 6)
    # the plan is judged at its share and never moves onto a replica's nodes
    assert not any(set(PlacementPlan.model_validate(r["plan"]).nodes) & set(tg.plan.nodes) for r in tg.reps)
    assert len(tg.reps) <= ap.config.max_replicas
    assert any(d.forecast.get("plan_share", 1.0) < 1.0 for d in ds)
    # load gone: the newest replica drains (its requests finish; the target shows it draining, then gone)
    ds = run(ap, tg, [0.0] * 12)
    assert tg.drained and any(d.action == "drain_replica" and d.status == "applied" and "scale in" in d.reason
                              for d in ds)
    assert tg.reps == [] and len(set(tg.plan.nodes)) == 1


def test_a_failed_replica_is_released_at_once():
    tg = ReplicaTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=5, cooldown_s=600.0)
    ap._last_change = 0.0
    tg.reps = [{"name": "r1", "state": "failed", "error": "worker on edge-b died", "nodes": ["edge-b"], "added": 0.0,
                "plan": plan_of(("edge-b", 0, 29)).model_dump(mode="json")}]
    d = run(ap, tg, [0.1])[0]
    assert d.action == "drop_replica" and d.status == "applied" and "worker on edge-b died" in d.reason
    assert tg.drained == ["r1"] and tg.reps == []


def test_advisory_and_max_replicas_zero_add_no_replica():
    for knobs in ({"mode": "advisory"}, {"max_replicas": 0}):
        tg = ReplicaTarget(plan_of(("edge-a", 0, 29)))
        ap = pilot(tg, hysteresis=1, **knobs)
        ds = run(ap, tg, [1.5 * most_capacity(ap)] * 3)
        assert tg.added == [] and tg.reps == []
        if knobs.get("mode") == "advisory":
            assert any(d.action == "add_replica" and d.status == "advised" for d in ds)
        else:
            assert all(d.action != "add_replica" for d in ds) and ds[-1].replica["chains"]


@pytest.mark.parametrize("factor", [0.9, 1.3])
def test_no_replica_flips_under_constant_load(factor):
    import numpy as np
    tg = ReplicaTarget(plan_of(("edge-a", 0, 29)))
    ap = pilot(tg, hysteresis=3, cooldown_s=60.0)
    rate = factor * most_capacity(ap)
    run(ap, tg, list(np.random.default_rng(3).poisson(rate * 10, size=40) / 10))
    assert tg.drained == [], (tg.added, tg.drained)
    assert len(tg.added) <= ap.config.max_replicas


def test_window_transport_teaches_the_cost_per_message_before_the_residual():
    """The window's `transport` (hops of one-group steps, the driver's turn) sets the transport's cost per
    message and the driver's: every plan then pays them per message of a pass, and the TPOT residual is
    what is left after them. A malformed transport entry is an error naming it."""
    from policies.costmodel import StageShape, stage_step_ms
    plan = plan_of(("edge-a", 0, 29))
    tg = ScriptedTarget(plan)
    ap = pilot(tg, hysteresis=99)
    pred = stage_step_ms(MODEL, StageShape(30, True, True), CLUSTER.node("edge-a"), "decode", 2, 300)
    stages = [{"node": "edge-a", "layers": [0, 30], "decode_steps": 50, "decode_compute_s": pred / 1e3,
               "decode_rows_per_step": 2.0, "decode_context": 300.0, "prefill_steps": 0}]
    transport = {"steps": 40, "driver_s": 0.001,
                 "hops": [{"src": "driver", "dst": "edge-a", "kind": "control", "bytes_per_step": 0.0, "transfer_s": 0.002},
                          {"src": "edge-a", "dst": "driver", "kind": "logits", "bytes_per_step": 0.0, "transfer_s": 0.002}]}
    base = ap._at_load(plan, CLUSTER, 0.2, ap.corrections, concurrency=2).tpot_ms
    snap = tg.snapshot()
    w = snap["windows"]["10s"]
    w.update(stages=stages, transport=transport, tpot_s={"p50": (base + 5.0) / 1e3, "p99": None, "n": 20},
             ttft_s={"p50": 0.1, "p99": None, "n": 20}, arrival_rate=0.2)
    snap["now"]["running"] = 2
    tg.snapshot = lambda: snap
    ap.tick()
    assert ap.corrections.message_fixed_ms == pytest.approx(2.0) and ap.corrections.driver_ms == pytest.approx(1.0)
    # the step message and the logits (2 ms each) and the driver (1 ms) explain the 5 ms (a longer round
    # also gathers a little more of the prompts riding in it): the residual is only what is left
    with_transport = ap._at_load(plan, CLUSTER, 0.2, ap.corrections, concurrency=2, residual=1.0).tpot_ms
    assert with_transport - base == pytest.approx(5.0, rel=0.05)
    assert ap.tpot_residual == pytest.approx((base + 5.0) / with_transport, rel=1e-3)
    assert abs(ap.tpot_residual - 1.0) < 0.02
    w["transport"] = {"steps": 3, "hops": [{"src": "edge-a"}]}
    tg.t += 10.0
    with pytest.raises(ValueError, match="transport"):
        ap.tick()
