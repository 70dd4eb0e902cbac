"""The simulator in intervals (Session), SimTarget (the controller's Target over it), and the pieces of
the closed-loop evaluation (agent/autopilot/sim_eval.py): change and flip counting, replica copies,
the load judgement against the simulator, a short evaluation run."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.autopilot import sim_eval as ev
from agent.autopilot.sim_target import SimTarget
from agent.autopilot.target import Target
from policies import PlacementPlan, Stage, approve
from policies.simulator import Reconfig, Session, SimConfig, simulate, speed_case

FIELDS = ("requests", "finished", "rejected", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p99", "slo_attainment", "steps")


@pytest.fixture(scope="module")
def case():
    cluster, plan, model, trace, intent, config = speed_case(nodes=8, layers=80, rate=20, duration_s=90)
    other = PlacementPlan(model=plan.model, data_class="public", stages=tuple(
        Stage(node=f"n{i + 4}", first_layer=20 * i, last_layer=20 * i + 19) for i in range(4)))
    return cluster, plan, model, trace, intent, config, other


def test_session_in_intervals_is_simulate(case):
    cluster, plan, model, trace, intent, config, other = case
    whole = simulate(cluster, plan, model, trace, intent=intent, config=config, reconfigs=[Reconfig(45.0, other)])
    s = Session(cluster, plan, model, trace, intent=intent, config=config)
    for t in (10.0, 20.0, 45.0):
        s.advance(t)
    out = s.reconfigure(other)
    assert out.prepare_s > 0 and out.weight_bytes > 0 and math.isnan(out.switched_s)
    assert s.reconfiguring and s.plan is plan          # the old plan serves until the switch
    for t in range(50, 400, 10):
        s.advance(float(t))
    assert not s.reconfiguring and s.plan is other
    part = s.finish()
    for f in FIELDS:
        assert getattr(part, f) == getattr(whole, f), f
    assert part.reconfigurations[0].switched_s == whole.reconfigurations[0].switched_s


def test_session_fed_arrivals_as_they_come_is_simulate(case):
    cluster, plan, model, trace, intent, config, _ = case
    whole = simulate(cluster, plan, model, trace, intent=intent, config=config)
    s = Session(cluster, plan, model, None, intent=intent, config=config)
    arr, j = trace.arrival_s, 0
    for t in range(5, 400, 5):
        k = j
        while k < len(arr) and arr[k] <= t:
            k += 1
        s.add_requests(arr[j:k], trace.prompt_tokens[j:k], trace.output_tokens[j:k])
        j = k
        s.advance(float(t))
    part = s.finish()
    for f in FIELDS:
        assert getattr(part, f) == getattr(whole, f), f


def test_session_refuses_what_it_cannot_do(case):
    cluster, plan, model, trace, intent, config, other = case
    s = Session(cluster, plan, model, trace, intent=intent, config=config)
    s.advance(10.0)
    with pytest.raises(ValueError, match="cannot go back in time: now 10.0 s, asked 5.0 s"):
        s.advance(5.0)
    with pytest.raises(ValueError, match="arriving at 3.0 s is out of order"):
        s.add_requests([3.0], [10], [10])
    with pytest.raises(ValueError, match="method 'restart'"):
        s.reconfigure(other, "restart")
    s.reconfigure(other)
    with pytest.raises(RuntimeError, match="under way"):
        s.reconfigure(plan)


def test_telemetry_is_the_stats_window_of_the_interval(case):
    cluster, plan, model, trace, intent, config, _ = case
    s = Session(cluster, plan, model, trace, intent=intent, config=config)
    s.advance(30.0)
    s.advance(60.0)
    snap = s.telemetry(30.0, "30s")
    w = snap["windows"]["30s"]
    arrived = sum(1 for a in trace.arrival_s if 30.0 < a <= 60.0)
    assert w["arrival_rate"] == pytest.approx(arrived / 30.0)
    assert w["ttft_s"]["n"] == w["finished"]["stop"] > 0 and w["ttft_s"]["p50"] > 0
    assert snap["now"]["queue_depth"] >= 0 and snap["now"]["running"] > 0


def test_a_reconfiguration_can_bring_more_seats(case):
    cluster, plan, model, trace, intent, config, other = case
    small = SimConfig(max_num_seqs=2, max_waiting=10_000, max_prefill_tokens=8192, max_prefill_tokens_decoding=4096)
    s = Session(cluster, plan, model, trace, intent=intent, config=small)
    s.advance(20.0)
    assert s._live.running <= 2 and s._live.queue > 10
    s.reconfigure(other, config=SimConfig(max_num_seqs=64, max_waiting=10_000, max_prefill_tokens=8192,
                                          max_prefill_tokens_decoding=4096, groups_in_flight=4))
    s.advance(40.0)
    assert s._live.running > 2


# -- SimTarget ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet():
    sc = ev.load_scenario(hours=0.5, interval_s=300)
    return sc


def _plan(sc, *stages, seats=32):
    intent = sc.intent.model_copy(update={"traffic": sc.intent.traffic.model_copy(update={"concurrency": seats})})
    return PlacementPlan(model=sc.model.name, data_class="phi", intent=intent,
                         cluster_fingerprint=sc.cluster.fingerprint(),
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))


A = (("edge-a100-0", 0, 22), ("euc-h100-0", 23, 58), ("edge-a100-1", 59, 79))
B = (("edge-a100-0", 0, 15), ("euc-h100-1", 16, 40), ("euc-h100-2", 41, 64), ("edge-a100-1", 65, 79))


def test_sim_target_is_a_target_and_applies_validated_plans_only(fleet):
    sc = fleet
    a, b = _plan(sc, *A), _plan(sc, *B, seats=64)
    t = SimTarget(sc.cluster, a, sc.model, sc.trace, intent=sc.intent, engine=ev.engine_for(sc.intent),
                  window="300s")
    assert isinstance(t, Target)
    t.advance(300.0)
    snap = t.snapshot()
    assert set(snap["windows"]) == {"300s"} and snap["windows"]["300s"]["arrival_rate"] > 0
    assert t.apply(b)["ok"] is False                        # a plan the validator has not sealed
    validated = approve(b, sc.cluster, sc.policy, b.intent, sc.model, current=a)
    rep = t.apply(validated)
    assert rep["ok"] and rep["state"] == "done" and rep["bytes_moved"]["weights"] > 0 and rep["pause_ms"] > 0
    again = t.apply(validated)
    assert not again["ok"] and "under way" in again["error"]
    t.advance(600.0)
    assert t.live_plan().placement_key() == b.placement_key() == t.session.plan.placement_key()
    # node-seconds: 3 nodes until the switch, 4 after; the 2 new nodes are held from the move's start
    mv = t.moves[0]
    sw = mv.outcome.switched_s
    assert 300.0 < sw < 600.0
    assert t.node_seconds(900.0) == pytest.approx(3 * sw + 2 * (sw - 300.0) + 4 * (900.0 - sw))


def test_sim_target_refuses_a_plan_on_a_node_that_went_down(fleet):
    sc = fleet
    a, b = _plan(sc, *A), _plan(sc, *B, seats=64)
    t = SimTarget(sc.cluster, a, sc.model, sc.trace, intent=sc.intent, engine=ev.engine_for(sc.intent))
    validated = approve(b, sc.cluster, sc.policy, b.intent, sc.model, current=a)
    t.set_node_state("euc-h100-1", "down")
    assert t.cluster().node("euc-h100-1").state == "down"
    rep = t.apply(validated)
    assert not rep["ok"] and "euc-h100-1" in rep["error"]


def test_replica_sim_target_alone_is_sim_target(fleet):
    """Routing the trace itself changes nothing while the plan serves alone."""
    from agent.autopilot.sim_target import ReplicaSimTarget
    sc = fleet
    a = _plan(sc, *A)
    runs = []
    for kind in (SimTarget, ReplicaSimTarget):
        t = kind(sc.cluster, a, sc.model, sc.trace, intent=sc.intent, engine=ev.engine_for(sc.intent), window="300s")
        for k in range(1, 7):
            t.advance(300.0 * k)
            snap = t.snapshot()
        r = t.session.finish()
        runs.append(({f: getattr(r, f) for f in FIELDS}, snap["windows"]["300s"]["arrival_rate"]))
    assert runs[0] == runs[1]


def test_replica_sim_target_splits_the_load_and_drains_without_losing_a_request(fleet):
    from agent.autopilot.sim_target import ReplicaSimTarget, load_seconds
    sc = fleet
    a = _plan(sc, *A)
    other = ev.smallest_plan(sc, exclude=tuple(n for n, _, _ in A))
    assert other is not None and not set(other.nodes) & set(a.nodes)
    t = ReplicaSimTarget(sc.cluster, a, sc.model, sc.trace, intent=sc.intent, engine=ev.engine_for(sc.intent),
                         window="300s")
    t.advance(300.0)
    t.snapshot()                                                                 # the next window starts at 300 s
    assert t.add_replica(other)["ok"] is False                                   # not sealed
    assert not t.add_replica(approve(a, sc.cluster, sc.policy, a.intent, sc.model))["ok"]   # the plan's nodes
    rep = t.add_replica(approve(other, sc.cluster, sc.policy, other.intent, sc.model))
    assert rep["ok"] and [r["name"] for r in t.replicas()] == ["r1"]
    t.advance(900.0)
    r1 = t.started[0]
    assert r1.ready_s == pytest.approx(300.0 + load_seconds(sc.cluster, sc.model, other))
    assert len(r1.session.trace) > 0 and all(x >= r1.ready_s for x in r1.session.trace.arrival_s)
    snap = t.snapshot()
    # arrivals counted over both pipelines: the whole trace's rate over the window
    arr = sc.trace.arrival_s
    assert snap["windows"]["300s"]["arrival_rate"] == pytest.approx(
        sum(1 for x in arr if 300.0 < x <= 900.0) / 600.0)
    assert t.drain_replica("r1")["ok"] and t.replicas()[0]["state"] == "draining"
    t.advance(sc.end_s)
    assert r1.state == "drained" and r1.released_s is not None and t.replicas() == []
    results = t.results()
    assert sum(r.requests for r in results) == len(sc.trace)                   # every request, somewhere
    assert sum(r.finished for r in results) + sum(r.rejected for r in results) == len(sc.trace)
    held = len(set(other.nodes)) * (r1.released_s - 300.0)
    assert t.node_seconds(sc.end_s) == pytest.approx(len(set(a.nodes)) * sc.end_s + held)


# -- the evaluation's pieces ----------------------------------------------------------------------

def test_change_stats_counts_changes_under_constant_load_and_flips():
    rates = [1.0, 1.0, 1.0, 1.05, 3.0, 3.0, 3.0, 1.0]
    changes = [(3 * 300 + 10, "x", "y"),      # rate 1.05 after 1, 1, 1: constant load
               (4 * 300 + 10, "y", "x"),      # back to x one interval later: a flip; load jumped (not constant)
               (7 * 300 + 10, "x", "z")]      # 1.0 after 3, 3: not constant
    const, flips = ev.change_stats(changes, rates, 300)
    assert (const, flips) == (1, 1)
    assert ev.change_stats([(10, "x", "y"), (5000, "y", "x")], [1.0] * 20, 300) == (2, 0)   # too far apart


def test_a_move_back_to_the_same_shape_on_other_nodes_is_a_flip(fleet):
    """Flips are found on shapes (seats; per stage the GPU kind and the layers): the planner picks among
    equal nodes by name, so undoing a change can land on other nodes of the same kinds."""
    sc = fleet
    a = _plan(sc, *A)
    copy = ev.copy_chain(sc, a, set(a.nodes))
    assert copy is not None and set(copy.nodes).isdisjoint(a.nodes)
    assert ev.shape_key(copy, sc) == ev.shape_key(a, sc) and copy.placement_key() != a.placement_key()
    assert ev.shape_key(_plan(sc, *A, seats=64), sc) != ev.shape_key(a, sc)
    x, y = ev.shape_key(a, sc), "other"
    assert ev.change_stats([(0, x, y), (300, y, x)], [1.0, 2.0, 3.0], 300)[1] == 1
    # a move onto the same shape elsewhere (a lost node re-planned) and back is no flip
    assert ev.change_stats([(0, x, x), (300, x, x)], [1.0, 2.0, 3.0], 300)[1] == 0


def test_replica_copies_are_disjoint_same_kind_and_valid(fleet):
    sc = fleet
    chains = ev.replica_chains(sc, _plan(sc, *A))
    nodes = [n for c in chains for n in c.nodes]
    assert len(nodes) == len(set(nodes))
    # 4 owned edge A100s hold the ends: two copies of a chain with two of them, no more
    assert len(chains) == 2
    for c in chains:
        assert [sc.cluster.node(n).gpu for n in c.nodes] == ["A100-80GB", "H100", "A100-80GB"]
        assert ev.validate(c, sc.cluster, sc.policy, c.intent, sc.model).ok


def test_peak_replicas_are_disjoint_valid_and_carry_the_peak_together(fleet):
    """(f): chains on disjoint nodes, each valid as the engine runs it, that together carry a peak no one
    chain carries (the best single chain carries about 4.4 req/s at 80% of its capacity, 3.6)."""
    sc = fleet
    chains = ev.peak_replicas(sc, 6.0, levels=(64, 192), max_stages=4)
    assert len(chains) >= 2
    nodes = [n for c in chains for n in set(c.plan.nodes)]
    assert len(nodes) == len(set(nodes))
    for c in chains:
        assert ev._validate(sc, c.plan).ok
    assert sum(ev.HEADROOM * c.capacity_rps for c in chains) >= 6.0
    # a peak one chain carries needs one chain
    assert len(ev.peak_replicas(sc, 0.5, levels=(64,), max_stages=4)) == 1


def test_weighted_pick_gives_each_replica_its_share_spread_out():
    credit = [0.0, 0.0, 0.0]
    picks = [ev.weighted_pick([0, 1, 2], [3.0, 1.0, 2.0], credit) for _ in range(60)]
    assert [picks.count(r) for r in range(3)] == [30, 10, 20]
    assert all(picks[i:i + 3] != [0, 0, 0] for i in range(58))       # no runs of the heaviest
    # a replica that is not up gets nothing; the others split in their own proportion
    credit = [0.0, 0.0, 0.0]
    picks = [ev.weighted_pick([0, 2], [3.0, 1.0, 1.0], credit) for _ in range(40)]
    assert picks.count(1) == 0 and picks.count(0) == 30 and picks.count(2) == 10


def test_static_replicas_never_change(fleet):
    sc = fleet
    a, b = _plan(sc, *A), ev.copy_chain(sc, _plan(sc, *A), set(_plan(sc, *A).nodes))
    row = ev.run_replicas(sc, [a, b], start_replicas=2, static=True, weights=[3.0, 1.0], name="(f) test", note="")
    assert row.changes == [] and row.requests == len(sc.trace)
    # both replicas up from the start, all half hour: their nodes' hours
    assert row.node_s == pytest.approx((len(set(a.nodes)) + len(set(b.nodes))) * 1800, rel=0.01)


def test_the_load_judgement_agrees_with_the_simulator(fleet):
    """A plan the judgement says carries a rate keeps the SLOs in the simulator; at twice its capacity it does not."""
    sc = fleet
    plan = _plan(sc, *B, seats=64)
    j = ev.loaded(plan, sc.cluster, sc.model, sc.intent)
    ok_rate = 0.7 * j.capacity_rps
    assert j.carries(ok_rate, sc.intent) and not j.carries(2 * j.capacity_rps, sc.intent)
    from policies.traces import Schedule, Steady
    results = []
    for rate in (ok_rate, 2 * j.capacity_rps):
        tr = Schedule(phases=(Steady(kind="steady", rate=rate, duration_s=600),), seed=1,
                      prompt_tokens={"dist": "fixed", "value": 512}, output_tokens={"dist": "fixed", "value": 128}
                      ).generate()
        s = Session(sc.cluster, plan, sc.model, tr, intent=sc.intent, config=ev.engine_for(sc.intent)(plan))
        results.append(s.finish().slo_attainment)
    assert results[0] > 0.95 and results[1] < 0.5


def test_load_scenario_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no policy.yaml"):
        (tmp_path / "cluster.yaml").write_text("x")
        ev.load_scenario(tmp_path)
    src = Path(ev.SCENARIO)
    for f in ("cluster.yaml", "policy.yaml", "trace.yaml"):
        (tmp_path / f).write_text((src / f).read_text())
    (tmp_path / "intent.yaml").write_text("data_class: phi\n")
    with pytest.raises(ValueError, match="intent.yaml: field model"):
        ev.load_scenario(tmp_path)
    with pytest.raises(ValueError, match="unknown strategy 'i'"):
        ev.evaluate(ev.load_scenario(src, hours=0.1), only=["i"])


def test_a_short_evaluation_runs_every_baseline_with_valid_plans(fleet):
    out = ev.evaluate(fleet, only=["a", "b", "e", "h"], levels=(32,), max_stages=3, log=lambda s: None)
    rows = {r["strategy"][:3]: r for r in out["rows"]}
    assert set(rows) == {"(a)", "(b)", "(e)", "(h)"}
    for r in rows.values():
        assert r["plans_rejected_by_validator"] == 0 and r["plans_checked"] >= 1
        assert r["requests"] == len(fleet.trace) and 0 <= r["slo_attainment"] <= 1
        assert r["node_hours"] == pytest.approx(r["node_hours"]) and r["node_hours"] > 0
    # a static plan holds its nodes the whole half hour
    a_nodes = len(set(ev.smallest_plan(fleet).nodes))
    assert rows["(a)"]["node_hours"] == pytest.approx(a_nodes * 0.5, abs=0.01)


def test_the_peak_plan_validates_as_the_engine_runs_it(fleet):
    """(b)'s plan (the most capacity when none carries the peak) was a 192-seat 4-stage plan the validator
    rejected when judged at one group in flight; the engine runs one group per stage, and so must the check."""
    cands = ev.Candidates(fleet, levels=(192,), max_stages=4)
    assert cands.items
    for c in cands.items:
        assert ev._validate(fleet, c.plan).ok, c.plan.summary()
    big = cands.cheapest_for(100.0)              # carries nothing: the most capacity
    assert ev._validate(fleet, big.plan).ok and big.seats == 192


def test_the_controller_in_the_simulator_applies_only_valid_plans_and_scales_out(fleet):
    """(d) over half an hour of the day's start: the smallest plan misses the TPOT bound at the morning's
    load, so the controller moves, and every plan it applies passes the validator as a move from the live
    one (no proposal is rejected at the gate); a change is counted as checked, none as rejected."""
    small = ev.smallest_plan(fleet)
    row = ev.run_controller(fleet, small)
    assert row.rejected_plans == 0 and row.checked_plans >= 2, row
    assert len(row.changes) >= 1
    # it left the smallest plan for one that keeps the SLOs: a better share of requests within them
    a = ev.run_static(fleet, small, "(a)")
    assert row.attainment > a.attainment


def test_a_seed_draws_another_day_of_the_same_shape(tmp_path):
    """--seed: the trace drawn again (figures on material nothing was tuned on); a CSV trace is refused."""
    base = ev.load_scenario(hours=1)
    other = ev.load_scenario(hours=1, seed=99)
    assert other.trace.arrival_s != base.trace.arrival_s and other.name.endswith("(seed 99)")
    assert abs(len(other.trace) - len(base.trace)) < 0.1 * len(base.trace)     # the same rates
    from policies.traces import load_trace
    csv = tmp_path / "t.csv"
    csv.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n")
    with pytest.raises(ValueError, match="seed draws only a rate schedule"):
        load_trace(csv, seed=1)


def test_the_oracle_adds_replicas_before_a_burst_no_one_plan_carries_and_drains_them_after(fleet):
    """(e): five minutes at 1 req/s, five at 6 (the best single chain carries about 3.6 at 80%), five at
    1. It adds (f)'s chains beside the plan early enough that they have their weights when the burst
    starts, drains them when it ends, through the validator; (h), one pipeline, keeps fewer requests
    within the SLOs; the static (f) holds more node-hours for it."""
    import dataclasses

    from policies.traces import Schedule, Steady
    tr = Schedule(phases=tuple(Steady(kind="steady", rate=r, duration_s=300) for r in (1.0, 6.0, 1.0)), seed=3,
                  prompt_tokens={"dist": "fixed", "value": 512}, output_tokens={"dist": "fixed", "value": 128}
                  ).generate()
    sc = dataclasses.replace(fleet, trace=tr, end_s=900.0)
    rates = ev.interval_rates(sc.trace, sc.interval_s, sc.intervals)
    cands = ev.Candidates(sc, levels=(64, 192), max_stages=4)
    chains = ev.peak_replicas(sc, max(rates), levels=(64, 192), max_stages=4)
    assert len(chains) >= 2 and not any(c.carries(max(rates), sc.intent) for c in cands.items)
    e = ev.run_oracle(sc, cands, rates, chains)
    h = ev.run_oracle(sc, cands, rates)
    assert e.rejected_plans == 0 and h.rejected_plans == 0 and e.requests == h.requests == len(tr)
    adds = [(t, a, b) for t, a, b in e.changes if a.endswith("pipelines") and int(b[0]) > int(a[0])]
    drains = [(t, a, b) for t, a, b in e.changes if a.endswith("pipelines") and int(b[0]) < int(a[0])]
    assert adds and drains and len(adds) == len(drains)
    assert all(t < 300.0 for t, _, _ in adds) and all(t >= 600.0 for t, _, _ in drains)
    assert e.attainment > h.attainment + 0.1, (e.attainment, h.attainment)
    f = ev.run_replicas(sc, [c.plan for c in chains], start_replicas=len(chains), static=True,
                        weights=[c.capacity_rps for c in chains], name="(f)", note="")
    assert e.node_s < f.node_s
