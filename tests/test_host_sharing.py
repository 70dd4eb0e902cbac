"""Nodes that share a host: the co-run table a profile measures, and what the cost model, the
simulator and the correction factors make of stages that compute at once on one machine."""
from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest

from policies import InputError, Traffic, load_cluster, load_model_spec
from policies.costmodel import Corrections, busy_count_distribution, estimate, flow_shop, host_slowdowns
from policies.profile import ProfileSet, load_profile, save_profile
from policies.simulator import SimConfig, simulate
from policies.traces import Trace
from tests.test_costmodel_profile import make_profile, plan2, unshared

CLUSTER = "scenarios/local/cluster.yaml"
CORUN = {"procs": [1, 2, 3], "slowdown": [1.0, 1.2, 1.8]}
CORUN_PREFILL = {"procs": [1, 2, 3], "slowdown": [1.0, 1.1, 1.4]}


def test_the_local_nodes_share_one_host_and_a_bad_host_is_named(tmp_path):
    cluster = load_cluster(CLUSTER)
    assert {n.host for n in cluster.nodes} == {"this-machine"}
    bad = tmp_path / "c.yaml"
    bad.write_text(open(CLUSTER).read().replace("host: this-machine}", "host: ''}", 1))
    with pytest.raises(InputError) as e:
        load_cluster(bad)
    assert "host" in str(e.value) and str(bad) in str(e.value)


def test_corun_table_reads_and_extends_and_bad_tables_are_refused(tmp_path):
    p = make_profile(corun=CORUN)
    assert p.corun_slowdown(1) == 1.0 and p.corun_slowdown(0.5) == 1.0
    assert p.corun_slowdown(2) == pytest.approx(1.2) and p.corun_slowdown(2.5) == pytest.approx(1.5)
    assert p.corun_slowdown(4) == pytest.approx(2.4)          # along the last segment
    assert make_profile().corun_slowdown(3) == 1.0              # not measured: no slowdown
    assert load_profile(save_profile(p, tmp_path)) == p
    # a prefill step's own table where measured; else the decode step's stands for it
    assert p.corun_prefill_slowdown(3) == pytest.approx(1.8)
    both = make_profile(corun=CORUN, corun_prefill=CORUN_PREFILL)
    assert both.corun_prefill_slowdown(3) == pytest.approx(1.4) and both.corun_slowdown(3) == pytest.approx(1.8)
    assert load_profile(save_profile(both, tmp_path)) == both
    with pytest.raises(InputError) as e:
        f = tmp_path / "bad-prefill.yaml"
        f.write_text(save_profile(both, tmp_path).read_text().replace(
            "corun_prefill:\n  procs: [1, 2, 3]", "corun_prefill:\n  procs: [2, 3, 4]"))
        load_profile(f)
    assert e.value.field.startswith("corun_prefill.procs") and "must be 1" in str(e.value), str(e.value)
    for table, field, words in [({"procs": [2, 3], "slowdown": [1.2, 1.8]}, "corun.procs", "must be 1"),
                                ({"procs": [1, 2], "slowdown": [1.0]}, "corun.slowdown", "1 values for 2 procs"),
                                ({"procs": [1, 3, 2], "slowdown": [1, 1.5, 1.2]}, "corun.procs", "must rise"),
                                ({"procs": [1, 2], "slowdown": [1.0, -1.0]}, "corun.slowdown", "must be positive")]:
        f = tmp_path / "bad.yaml"
        f.write_text(save_profile(p, tmp_path).read_text().replace(
            "corun:\n  procs: [1, 2, 3]\n  slowdown: [1.0, 1.2, 1.8]",
            f"corun:\n  procs: {table['procs']}\n  slowdown: {table['slowdown']}"))
        with pytest.raises(InputError) as e:
            load_profile(f)
        assert e.value.field.startswith(field) and words in str(e.value), (table, str(e.value))


def test_busy_count_distribution_is_a_poisson_binomial():
    assert busy_count_distribution([]) == [1.0]
    d = busy_count_distribution([0.5, 0.5, 0.5])
    assert d == pytest.approx([1 / 8, 3 / 8, 3 / 8, 1 / 8])
    d = busy_count_distribution([0.2, 0.9])
    assert d == pytest.approx([0.8 * 0.1, 0.2 * 0.1 + 0.8 * 0.9, 0.2 * 0.9]) and sum(d) == pytest.approx(1)


def test_host_slowdowns_fixed_point():
    slow = {1: 1.0, 2: 1.2, 3: 1.8}.__getitem__
    # two stages that are each busy the whole round slow each other by the table's 2-at-once figure
    sig, r = host_slowdowns(["h", "h"], [50.0, 50.0], [slow, slow], lambda s: max(s[0] * 50, s[1] * 50))
    assert sig == pytest.approx([1.2, 1.2], abs=1e-3) and r == pytest.approx(60, abs=0.1)
    # on machines of their own, or with no host, nothing changes
    for hosts in (["a", "b"], [None, None]):
        sig, r = host_slowdowns(hosts, [50.0, 50.0], [slow, slow], lambda s: max(s[0] * 50, s[1] * 50))
        assert sig == [1.0, 1.0] and r == 50
    # a bottleneck beside two lighter stages: each light one is busy part of the round, so the
    # bottleneck's slowdown lies between none and the 3-at-once figure, and the round agrees with it
    sig, r = host_slowdowns(["h"] * 3, [40.0, 40.0, 89.0], [slow] * 3, lambda s: max(a * w for a, w in zip(s, [40, 40, 89])))
    assert 1.2 < sig[2] < 1.8 and r == pytest.approx(sig[2] * 89, rel=1e-6)
    u = [min(1, a * w / r) for a, w in zip(sig, [40, 40, 89])]
    want = sum(p * slow(1 + n) for n, p in enumerate(busy_count_distribution(u[:2])))
    assert sig[2] == pytest.approx(want, abs=2e-3)             # it is a fixed point


def test_estimate_slows_decode_rounds_of_stages_sharing_a_host():
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    plain, corun = ProfileSet([make_profile()]), ProfileSet([make_profile(corun=CORUN)])
    t4 = Traffic(concurrency=4, prompt_tokens=64, output_tokens=64, context_tokens=256)
    # the co-run slowdown alone: without the groups' queueing at the stages (tested on its own below)
    base = estimate(plan2(), cluster, model, t4, profiles=plain, groups_in_flight=None, queueing=False)
    shared = estimate(plan2(), cluster, model, t4, profiles=corun, groups_in_flight=None, queueing=False)
    apart = estimate(plan2(), unshared(cluster), model, t4, profiles=corun, groups_in_flight=None)
    assert base.groups_in_flight == 2
    assert base.tpot_ms < shared.tpot_ms <= 1.2 * base.tpot_ms + 1e-9     # two at once: at most 1.2x
    assert apart.tpot_ms == pytest.approx(base.tpot_ms)
    assert all(s.host_slowdown > 1 for s in shared.stages) and all(s.host_slowdown == 1 for s in apart.stages)
    assert shared.ttft_ms == base.ttft_ms                   # one prompt: one stage computes at a time
    # a wave of 4: two groups, each cut into two micro-batches, flow through the stages together, so the
    # stages compute at once part of the time and the host's co-run table slows them there
    w_base, w_shared, w_apart = (estimate(plan2(), c, model, t4, profiles=ps, groups_in_flight=None, prefill_rows=4).ttft_ms
                                 for c, ps in ((cluster, plain), (cluster, corun), (unshared(cluster), corun)))
    assert w_base < w_shared < 1.2 * w_base and w_apart == pytest.approx(w_base)
    # one group (one request, or groups_in_flight=1): the stages take turns, none is slowed
    t1 = t4.model_copy(update={"concurrency": 1})
    assert estimate(plan2(), cluster, model, t1, profiles=corun, groups_in_flight=None).tpot_ms == \
        pytest.approx(estimate(plan2(), cluster, model, t1, profiles=plain, groups_in_flight=None).tpot_ms)
    assert estimate(plan2(), cluster, model, t4, profiles=corun, groups_in_flight=1).tpot_ms == \
        pytest.approx(estimate(plan2(), cluster, model, t4, profiles=plain, groups_in_flight=1).tpot_ms)


def test_flow_shop_with_and_without_a_shared_host():
    slow = {1: 1.0, 2: 1.5, 3: 2.0}.__getitem__
    work = [[10.0, 10.0]] * 3                      # three jobs through two stages, no transfer time
    hops = [[0.0, 0.0]] * 3
    assert flow_shop(work, hops) == pytest.approx([20, 30, 40])
    assert flow_shop(work, [[5.0, 1.0]] * 3) == pytest.approx([26, 36, 46])      # the hops add, occupy nothing
    assert flow_shop(work, hops, ["a", "b"], [slow, slow]) == pytest.approx([20, 30, 40])
    # on one host, while both stages compute each goes at 1 / 1.5: job 0 alone on stage 0 (0-10), then
    # stage 0 on job 1 beside stage 1 on job 0 (10-25), again (25-40), then job 2 alone on stage 1 (40-50)
    assert flow_shop(work, hops, ["h", "h"], [slow, slow]) == pytest.approx([25, 40, 50])
    # unequal work: stage 1 finishes job 0 at 10 + 5 * 1.5 = 17.5; stage 0 has 20 - 7.5/1.5 = 15 ms of job 1 left
    # alone, done at 32.5; stage 1 then takes 5 ms of job 1 at 1x (stage 0 is done): 37.5
    assert flow_shop([[10.0, 5.0], [20.0, 5.0]], [[0.0, 0.0]] * 2, ["h", "h"], [slow, slow]) == pytest.approx([17.5, 37.5])
    assert flow_shop([], []) == []


def test_a_waves_prefill_is_slowed_by_the_prefill_table_and_decode_by_the_decode_table():
    """TTFT's flow shop takes the prefill step's co-run table, TPOT's rounds the decode step's: with a
    prefill table of 1 everywhere, TTFT is as if nothing were shared and TPOT as with the decode table."""
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    t4 = Traffic(concurrency=4, prompt_tokens=64, output_tokens=32, context_tokens=256)
    flat = {"procs": [1, 2, 3], "slowdown": [1.0, 1.0, 1.0]}

    def est(corun=None, corun_prefill=None, c=cluster):
        over = {k: v for k, v in (("corun", corun), ("corun_prefill", corun_prefill)) if v is not None}
        return estimate(plan2(), c, model, t4, profiles=ProfileSet([make_profile(**over)]), groups_in_flight=2,
                        prefill_rows=4)
    plain, decode_only, both = est(), est(CORUN), est(CORUN, flat)
    assert decode_only.ttft_ms > plain.ttft_ms                   # the decode table stands in for prefill's
    assert both.ttft_ms == pytest.approx(plain.ttft_ms) and both.tpot_ms == pytest.approx(decode_only.tpot_ms)
    assert plain.ttft_ms < est(CORUN, CORUN_PREFILL).ttft_ms < decode_only.ttft_ms
    trace = Trace([0.0] * 4, [64] * 4, [32] * 4, "a wave of 4")
    for prof in (make_profile(corun=CORUN, corun_prefill=flat), make_profile(corun=CORUN, corun_prefill=CORUN_PREFILL)):
        sim = simulate(cluster, plan2(), model, trace, profiles=ProfileSet([prof]), config=SimConfig(groups_in_flight=2))
        e = estimate(plan2(), cluster, model, t4, profiles=ProfileSet([prof]), groups_in_flight=2, prefill_rows=4)
        assert statistics.median(sim.ttft_ms) == pytest.approx(e.ttft_ms, rel=1e-6)


def test_simulator_staggers_a_waves_groups_and_slows_them_as_the_cost_model():
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    plan = plan2()
    trace = Trace([0.0] * 4, [64] * 4, [32] * 4, "a wave of 4")
    t4 = Traffic(concurrency=4, prompt_tokens=64, output_tokens=32, context_tokens=256)
    for c, ps in ((cluster, ProfileSet([make_profile()])), (cluster, ProfileSet([make_profile(corun=CORUN)])),
                  (unshared(cluster), ProfileSet([make_profile(corun=CORUN)])),
                  (cluster, ProfileSet([make_profile(corun=CORUN, corun_prefill=CORUN_PREFILL)]))):
        sim = simulate(c, plan, model, trace, profiles=ps, config=SimConfig(groups_in_flight=2))
        est = estimate(plan, c, model, t4, profiles=ps, groups_in_flight=2, prefill_rows=4)
        # group 0's two prompts come back before group 1's: two first-token times, a step apart
        firsts = sorted(set(round(x, 6) for x in sim.ttft_ms))
        assert len(firsts) == 2 and firsts[0] < firsts[1]
        assert statistics.median(sim.ttft_ms) == pytest.approx(est.ttft_ms, rel=1e-6)    # (as bench predict takes it)
        # every token of a group is as late as its first: TPOT is the round's, the same for both groups
        assert max(sim.tpot_ms) == pytest.approx(min(sim.tpot_ms), rel=1e-6)


def test_simulator_slows_rounds_of_stages_sharing_a_host():
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    plan = plan2()
    trace = Trace([0.0] * 4, [64] * 4, [32] * 4, "a wave of 4")
    cfg = SimConfig(groups_in_flight=2, queueing=False)     # the co-run slowdown alone (queueing: below)

    def tpot(c, profiles):
        return simulate(c, plan, model, trace, profiles=profiles, config=cfg).tpot_ms
    plain, corun = ProfileSet([make_profile()]), ProfileSet([make_profile(corun=CORUN)])
    base, shared = tpot(cluster, plain), tpot(cluster, corun)
    assert all(1.0 < s / b <= 1.2 + 1e-9 for s, b in zip(shared, base))
    assert tpot(unshared(cluster), corun) == pytest.approx(base)


def test_corrections_leave_out_the_slowdown_the_window_saw():
    """A stage whose steps took exactly the prediction times the slowdown its busy neighbour made gets
    a factor of 1 when the window's length is known (the estimate adds that slowdown itself)."""
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    prof = make_profile(corun=CORUN)
    ps = ProfileSet([prof])
    plan = plan2()
    window = 10.0
    # each stage busy 60% of the window: the other one is busy when a step runs 60% of the time
    alone = [prof.stage_decode_ms(15, True, False, 2, 96), prof.stage_decode_ms(15, False, True, 2, 96)]
    sigma = 0.4 * 1.0 + 0.6 * 1.2
    times = [SimpleNamespace(node=s.node, start=s.start, end=s.stop, decode_steps=round(0.6 * window * 1e3 / (a * sigma)),
                             decode_compute_s=a * sigma / 1e3, decode_rows_per_step=2, decode_context=96,
                             prefill_steps=0, prefill_compute_s=None, prefill_tokens_per_step=None)
             for s, a in zip(plan.stages, alone)]
    with_window = Corrections(alpha=1.0)
    assert with_window.observe_stage_times(times, plan, cluster, model, 96, ps, window_s=window) == 2
    assert with_window.factor("edge-a", "decode") == pytest.approx(1.0, abs=0.01)
    assert with_window.factor("edge-b", "decode") == pytest.approx(1.0, abs=0.01)
    without = Corrections(alpha=1.0)
    without.observe_stage_times(times, plan, cluster, model, 96, ps)
    assert without.factor("edge-a", "decode") == pytest.approx(sigma, abs=0.01)
    # on machines of their own there is nothing to leave out
    apart = Corrections(alpha=1.0)
    apart.observe_stage_times(times, plan, unshared(cluster), model, 96, ps, window_s=window)
    assert apart.factor("edge-b", "decode") == pytest.approx(sigma, abs=0.01)
    assert not math.isnan(apart.factor("edge-a", "decode"))


def test_the_planner_judges_plans_on_a_shared_host_by_the_estimates():
    """The planner's tables assume every stage has its machine to itself. On one host with a measured
    co-run table, a chain over all three nodes is not the fastest any more, and the planner says so:
    its plan's throughput (the validator's estimate) beats the plan the tables alone would pick."""
    import agent.planner as planner
    from policies import IntentSpec, load_policy
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    policy = load_policy("scenarios/local/policy.yaml")
    intent = IntentSpec(data_class="public", objective="throughput",
                        traffic=Traffic(concurrency=8, prompt_tokens=64, output_tokens=64, context_tokens=256))
    corun = ProfileSet([make_profile(corun=CORUN)])
    alone = planner.plan(intent, cluster, policy, model, profiles=ProfileSet([make_profile()]), groups_in_flight=None)
    shared = planner.plan(intent, cluster, policy, model, profiles=corun, groups_in_flight=None)
    assert len(alone.plan.stages) == 3 and len(shared.plan.stages) < 3, (alone.plan.summary(), shared.plan.summary())
    # what the tables' first choice would have been, judged by the same estimates
    first = estimate(alone.plan, cluster, model, intent.traffic, profiles=corun, groups_in_flight=None)
    assert shared.report.estimates.throughput_tok_s > first.throughput_tok_s
    assert shared.report.ok
    # on machines of their own nothing changes
    apart = planner.plan(intent, unshared(cluster), policy, model, profiles=corun, groups_in_flight=None)
    assert apart.plan.placement_key() == alone.plan.placement_key()


def test_the_driver_and_the_messages_count_as_work_on_the_host():
    """corun_driver: a stage's messages keep its worker busy (io_ms in its busy share, not slowed), and
    the driver on a stage's host is one more party computing there part of the round."""
    slow = {1: 1.0, 2: 1.2, 3: 1.8}.__getitem__
    # one stage, the driver beside it busy 30 of each round: sigma = 1 + (30 / r) * 0.2, a fixed point
    sig, r = host_slowdowns(["h"], [50.0], [slow], lambda s: s[0] * 50 + 10, others=[("h", 30.0)])
    assert sig[0] == pytest.approx(1 + 0.2 * 30 / r, abs=1e-3) and r == pytest.approx(sig[0] * 50 + 10)
    for others in ([("elsewhere", 30.0)], [(None, 30.0)], [("h", 0.0)], []):       # not on its host: nothing
        assert host_slowdowns(["h"], [50.0], [slow], lambda s: s[0] * 50 + 10, others=others) == ([1.0], 60.0)
    # a light stage whose messages keep it busy too: the heavy one beside it is slowed more
    rnd = lambda s: max(s[0] * 20 + 20, s[1] * 50)       # noqa: E731
    plain, _ = host_slowdowns(["h", "h"], [20.0, 50.0], [slow, slow], rnd)
    busy, _ = host_slowdowns(["h", "h"], [20.0, 50.0], [slow, slow], rnd, io_ms=[20.0, 0.0])
    assert 1 < plain[1] < busy[1] <= 1.2

    # the cost model and the simulator: with a transport and a driver's turn learned, a 2-stage plan on
    # the local bench's one host, waves of 4 (2 groups): slower with the driver's work counted, and alike
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    ps = ProfileSet([make_profile(corun=CORUN)])
    c = Corrections(alpha=0.5)
    for mb in (0.001, 0.2, 0.8):
        c.observe_message(mb * 1e6, 1.2 + 2.5 * mb)
    c.driver_ms = 2.0
    t4 = Traffic(concurrency=4, prompt_tokens=64, output_tokens=11, context_tokens=256)
    kw = dict(profiles=ps, corrections=c, groups_in_flight=2, driver_node="edge-a")
    with_, without = (estimate(plan2(), cluster, model, t4, corun_driver=d, **kw).tpot_ms for d in (True, False))
    assert without < with_ < 1.2 * without
    t1 = t4.model_copy(update={"concurrency": 1})           # one group: the stages and the driver take turns
    assert estimate(plan2(), cluster, model, t1, **kw).tpot_ms == \
        estimate(plan2(), cluster, model, t1, corun_driver=False, **kw).tpot_ms
    assert estimate(plan2(), unshared(cluster), model, t4, **kw).tpot_ms == \
        estimate(plan2(), unshared(cluster), model, t4, corun_driver=False, **kw).tpot_ms   # no host: nothing
    tr = Trace([0.0] * 4, [64] * 4, [11] * 4)
    sims = [statistics.median(simulate(cluster, plan2(), model, tr, profiles=ps, corrections=c, driver_node="edge-a",
                                       config=SimConfig(groups_in_flight=2, corun_driver=d)).tpot_ms) for d in (True, False)]
    assert sims[1] < sims[0]
    assert sims[0] / sims[1] == pytest.approx(with_ / without, rel=0.03)


def test_groups_queue_at_stages_that_share_a_host():
    """closed_cycle_ms: approximate mean value analysis of g groups circling the stages. It adds what the
    max of the round's bounds leaves out near balance (a group reaching a stage busy with another waits
    out the rest of its step), only where the stages share a host (their steps vary with each other)."""
    from policies.costmodel import closed_cycle_ms
    assert closed_cycle_ms([10.0, 20.0], 5.0, 1) == pytest.approx(35.0)          # one group: its pass
    # two groups, by hand: U(1) = S / 35.8; R_a = 15.2 + U_a 15.2 / 2, R_b = 18.1 + U_b 18.1 / 2
    r_a, r_b = 15.2 * (1 + 15.2 / 35.8 / 2), 18.1 * (1 + 18.1 / 35.8 / 2)
    assert closed_cycle_ms([15.2, 18.1], 2.5, 2) == pytest.approx(r_a + r_b + 2.5)
    # exponential steps (scv 1): exact MVA, R = S (1 + Q(1))
    assert closed_cycle_ms([10.0, 10.0], 0.0, 2, scv=1.0) == pytest.approx(2 * 10 * 1.5)
    # balanced: above both bounds (the pass, 35.8; the busier stage's two steps, 36.2)
    assert closed_cycle_ms([15.2, 18.1], 2.5, 2) > 36.2

    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    ps = ProfileSet([make_profile()])
    t4 = Traffic(concurrency=4, prompt_tokens=64, output_tokens=64, context_tokens=256)   # context 96
    kw = dict(profiles=ps, groups_in_flight=2)
    q, bound = (estimate(plan2(), cluster, model, t4, queueing=x, **kw).tpot_ms for x in (True, False))
    p = make_profile()
    s = [p.stage_decode_ms(15, True, False, 2, 96), p.stage_decode_ms(15, False, True, 2, 96)]
    link = cluster.link("edge-a", "edge-b")
    hop = link.latency_ms + 1e3 * 2 * model.hidden_size * model.dtype_bytes * 8 / (link.bandwidth_gbps * 1e9)
    assert q == pytest.approx(max(bound, closed_cycle_ms(s, hop, 2))) and q > bound
    apart = unshared(cluster)            # machines of their own: the bounds alone
    assert estimate(plan2(), apart, model, t4, **kw).tpot_ms == estimate(plan2(), apart, model, t4, queueing=False, **kw).tpot_ms
    t1 = t4.model_copy(update={"concurrency": 1})
    assert estimate(plan2(), cluster, model, t1, **kw).tpot_ms == estimate(plan2(), cluster, model, t1, queueing=False, **kw).tpot_ms
    # the simulator's rounds count the same
    tr = Trace([0.0] * 4, [64] * 4, [64] * 4)
    sims = [statistics.median(simulate(cluster, plan2(), model, tr, profiles=ps,
                                       config=SimConfig(groups_in_flight=2, queueing=x)).tpot_ms) for x in (True, False)]
    assert sims[0] / sims[1] == pytest.approx(q / bound, rel=0.03)
