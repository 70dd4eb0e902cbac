"""The simulator against cases worked out by hand, and trace files (good and bad)."""
from __future__ import annotations


import pytest

from policies import (InputError, IntentSpec, PlacementPlan, PlanDelta, Stage, Traffic, load_cluster,
                      load_model_spec)
from policies.costmodel import estimate
from policies.profile import ProfileSet
from policies.simulator import Reconfig, SimConfig, simulate, speed_case
from policies.traces import Trace, load_trace
from tests.test_costmodel_profile import make_profile

CLUSTER = "scenarios/local/cluster.yaml"


def flat_profile(**over):
    """Step times that do not depend on batch or context: every figure can be added up by hand."""
    return make_profile(stage_ms=1.0, embed_ms=0.0, head={"rows": [1, 8], "ms": [4.0, 4.0]},
                        prefill={"tokens": [1, 512], "layer_ms": [2.0, 2.0]},
                        decode={"batch": [1, 8], "context": [1, 4096], "layer_ms": [[0.5, 0.5], [0.5, 0.5]]}, **over)


def setup(stages=((("edge-a", 0, 29)),)):
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    plan = PlacementPlan(model="smollm2-135m", data_class="phi",
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
    intent = IntentSpec(data_class="phi", traffic=Traffic(concurrency=4, prompt_tokens=64, output_tokens=11,
                                                          context_tokens=256))
    return cluster, model, plan, intent, ProfileSet([flat_profile()])


def test_one_request_one_stage():
    cluster, model, plan, intent, ps = setup()
    r = simulate(cluster, plan, model, Trace([0.0], [64], [11]), profiles=ps, intent=intent)
    # prefill: 1 (stage) + 30 layers x 2 + head 4 = 65 ms; each decode step: 1 + 30 x 0.5 + 4 = 20 ms
    assert r.ttft_ms_p50 == pytest.approx(65.0)
    assert r.tpot_ms_p50 == pytest.approx(20.0)
    assert r.steps == 11 and r.finished == 1 and r.rejected == 0
    assert r.duration_s == pytest.approx((65 + 10 * 20) / 1e3)
    assert r.stage_utilisation[0]["busy"] == pytest.approx(1.0)
    assert r.node_seconds == pytest.approx(r.duration_s)
    # and the cost model says the same of an idle pipeline
    est = estimate(plan, cluster, model, intent.traffic.model_copy(update={"concurrency": 1}), profiles=ps)
    assert est.ttft_ms == pytest.approx(65.0) and est.tpot_ms == pytest.approx(20.0)


def test_two_stages_add_the_link():
    cluster, model, plan, intent, ps = setup((("edge-a", 0, 14), ("cloud-1", 15, 29)))
    link = cluster.link("edge-a", "cloud-1")           # 10 Gbps, 1 ms
    hop = lambda tokens: link.latency_ms + 1e3 * tokens * 576 * 2 * 8 / 10e9  # noqa: E731  (bf16 spec)
    r = simulate(cluster, plan, model, Trace([0.5], [64], [11]), profiles=ps, intent=intent)
    assert r.ttft_ms_p50 == pytest.approx(2 * 1 + 30 * 2 + 4 + hop(64))
    assert r.tpot_ms_p50 == pytest.approx(2 * 1 + 30 * 0.5 + 4 + hop(1))
    busy = [s["busy"] for s in r.stage_utilisation]
    assert busy[1] > busy[0]                          # the LM head sits on the second stage


def test_kv_capacity_makes_the_second_request_wait():
    cluster, model, plan, intent, ps = setup()
    # blocks for one request only: (64 + 11) tokens -> 5 blocks of 16; the pool has 6
    cfg = SimConfig(kv_blocks=6, max_model_len=96)
    r = simulate(cluster, plan, model, Trace([0.0, 0.0], [64, 64], [11, 11]), profiles=ps, intent=intent, config=cfg)
    first_done = 65 + 10 * 20
    assert r.finished == 2
    assert r.ttft_ms_p50 == pytest.approx(65.0)          # the first
    assert r.ttft_ms_p99 == pytest.approx(first_done + 65)   # the second starts once the first frees its blocks
    # with room for both they prefill together in one step (128 prompt tokens: 1 + 30 x 2 + head)
    both = simulate(cluster, plan, model, Trace([0.0, 0.0], [64, 64], [11, 11]), profiles=ps, intent=intent)
    assert both.ttft_ms_p99 == pytest.approx(65.0)


def test_seats_queue_and_too_long_is_rejected():
    cluster, model, plan, intent, ps = setup()
    cfg = SimConfig(max_num_seqs=1, kv_blocks=64, max_model_len=200)
    r = simulate(cluster, plan, model, Trace([0.0, 0.0, 0.0], [64, 64, 190], [11, 11, 20]), profiles=ps,
                 intent=intent, config=cfg)
    assert r.rejected == 1 and r.finished == 2
    assert r.ttft_ms_p99 == pytest.approx(65 + 10 * 20 + 65)


def test_chunked_prefill_while_others_decode():
    cluster, model, plan, intent, ps = setup()
    # the second arrives while the first decodes: its 64-token prompt goes 8 tokens per step (8 steps)
    r = simulate(cluster, plan, model, Trace([0.0, 0.070], [64, 64], [40, 2]), profiles=ps, intent=intent)
    # steps after the first's prefill (65 ms): decode + an 8-token chunk, each 1 + 30 x (0.5 + 0) + 4 = 20 ms
    # (flat tables: the chunk adds nothing); the second is admitted at the first step boundary after 70 ms
    assert r.ttft_ms_p99 == pytest.approx(65 + 20 + 8 * 20 - 70)


def test_live_reconfiguration_pauses_for_the_switch():
    cluster, model, plan, intent, ps = setup((("edge-a", 0, 14), ("edge-b", 15, 29)))
    moved = plan.model_copy(update={"stages": (Stage(node="edge-a", first_layer=0, last_layer=15),
                                               Stage(node="edge-b", first_layer=16, last_layer=29))})
    tr = Trace([0.0], [64], [50])
    base = simulate(cluster, plan, model, tr, profiles=ps, intent=intent)
    link = cluster.link("edge-a", "edge-b")                      # 100 Gbps, 0.1 ms
    delta = PlanDelta.between(plan, moved, model)
    (run,) = delta.moves
    for method in ("live", "stop_and_copy"):
        r = simulate(cluster, plan, model, tr, profiles=ps, intent=intent, reconfigs=[Reconfig(0.3, moved, method)])
        (rc,) = r.reconfigurations
        bps = link.bandwidth_gbps * 1e9 / 8
        if method == "live":
            expect = 2 * link.latency_ms / 1e3 + run.kv_bytes_per_token * 1 / bps   # last delta: one token each
        else:        # everything, serving stopped: the weights, then the KV of the tokens in flight
            expect = (link.latency_ms / 1e3 + run.weight_bytes / bps) + (link.latency_ms / 1e3 + rc.kv_bytes / bps)
            assert rc.kv_bytes == pytest.approx(run.kv_bytes_per_token * (64 + int((300 - 65) // 20) + 1))
        assert rc.pause_s == pytest.approx(expect, rel=1e-6)
        assert rc.weight_bytes == pytest.approx(run.weight_bytes)
        # moving one layer's boundary keeps every step's time: the request ends later by the pause alone
        end = r.duration_s - base.duration_s
        assert end == pytest.approx(rc.pause_s, abs=1e-9)
        assert rc.switched_s >= 0.3 + rc.prepare_s + rc.precopy_s - 1e-9
    with pytest.raises(ValueError, match="recompute"):
        simulate(cluster, plan, model, tr, profiles=ps, intent=intent, reconfigs=[Reconfig(0.1, moved, "recompute")])


def test_slo_attainment_counts_rejections():
    cluster, model, plan, intent, ps = setup()
    strict = intent.model_copy(update={"max_ttft_ms": 100, "max_tpot_ms": 25})
    cfg = SimConfig(max_num_seqs=1, max_waiting=1)   # one seat, one place in the queue: the third is refused
    r = simulate(cluster, plan, model, Trace([0.0, 0.01, 0.02], [64, 64, 64], [11, 11, 11]), profiles=ps,
                 intent=strict, config=cfg)
    # the first meets both bounds; the second waits for the seat (TTFT 265 + 65 - 10 ms) and misses
    assert r.rejected == 1 and r.finished == 2 and r.slo_attainment == pytest.approx(1 / 3)


def test_config_defaults_are_the_engines():
    from executor.engine import EngineConfig
    e, s = EngineConfig(), SimConfig()
    for f in ("max_num_seqs", "max_waiting", "max_prefill_tokens", "max_prefill_tokens_decoding"):
        assert getattr(e, f) == getattr(s, f), f


def test_speed_case_small_keeps_up():
    cluster, plan, model, trace, intent, cfg = speed_case(nodes=8, layers=16, rate=5, duration_s=60)
    r = simulate(cluster, plan, model, trace, intent=intent, config=cfg)
    assert r.rejected == 0 and r.finished == len(trace) > 200
    assert set(r.sources) == {"datasheet"} and len(r.stage_utilisation) == 8
    assert 0 < r.throughput_tok_s and r.sim_wall_s < 10


# --- traces ---------------------------------------------------------------------------------------

def test_schedule_uniform_and_poisson(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("arrivals: uniform\nphases:\n  - {kind: steady, rate: 2, duration_s: 5}\n"
                 "  - {kind: ramp, from_rate: 2, to_rate: 2, duration_s: 5}\n"
                 "prompt_tokens: {dist: fixed, value: 100}\noutput_tokens: {dist: uniform, low: 5, high: 9}\n")
    t = load_trace(f)
    assert len(t) == 20 and t.arrival_s[:3] == pytest.approx([0.5, 1.0, 1.5])
    assert set(t.prompt_tokens) == {100} and all(5 <= o <= 9 for o in t.output_tokens)
    f.write_text("seed: 3\nphases:\n  - {kind: burst, rate: 1, burst_rate: 50, every_s: 10, burst_s: 2, duration_s: 100}\n"
                 "prompt_tokens: {dist: lognormal, mean: 300, sigma: 0.5, max: 2000}\n")
    t = load_trace(f)
    in_burst = sum(1 for a in t.arrival_s if a % 10 < 2)
    assert 700 < in_burst < 1300 and len(t) - in_burst < 150 and max(t.prompt_tokens) <= 2000
    assert load_trace(f).arrival_s == t.arrival_s        # seeded


@pytest.mark.parametrize("text, line, field, words", [
    ("phases:\n  - {kind: steady, rate: 1, duration_s: 5}\nprompt_tokens: {dist: fixed}\n", 3, "prompt_tokens.value",
     "needs value"),
    ("phases:\n  - {kind: wave, rate: 1, duration_s: 5}\n", 2, "phases[0]", "wave"),
    ("phases:\n  - {kind: steady, rate: -1, duration_s: 5}\n", 2, "phases[0].steady.rate", "-1"),
])
def test_bad_schedule(tmp_path, text, line, field, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError) as e:
        load_trace(f)
    assert e.value.line == line and e.value.field == field and words in str(e.value)


def test_csv_traces(tmp_path):
    t = load_trace("scenarios/traces/azure-format-sample.csv")
    assert len(t) > 10 and t.arrival_s[0] == 0.0 and all(b >= a for a, b in zip(t.arrival_s, t.arrival_s[1:]))
    f = tmp_path / "t.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n0.5,20,6\n")
    t = load_trace(f)
    assert t.arrival_s == [0.0, 0.5] and t.prompt_tokens == [10, 20] and t.output_tokens == [5, 6]


@pytest.mark.parametrize("text, line, field, words", [
    ("when,prompt,out\n0,1,1\n", 1, None, "lacks the columns"),
    ("arrival_s,prompt_tokens,output_tokens\n0,10,5\nsoon,10,5\n", 3, "arrival_s", "'soon'"),
    ("arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,ten,5\n", 3, "prompt_tokens", "'ten'"),
    ("arrival_s,prompt_tokens,output_tokens\n0,10,0\n", 2, "output_tokens", "at least 1, not 0"),
    ("arrival_s,prompt_tokens,output_tokens\n2,10,5\n1,10,5\n", 3, "arrival_s", "back in time"),
    ("arrival_s,prompt_tokens,output_tokens\n0,10\n", 2, None, "2 columns"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\nyesterday,1,1\n", 3, "TIMESTAMP",
     "date-time"),
])
def test_bad_csv(tmp_path, text, line, field, words):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(InputError) as e:
        load_trace(f)
    assert e.value.line == line and e.value.field == field and words in str(e.value)
    assert str(f) in str(e.value)


def test_logits_go_back_to_the_driver():
    cluster, model, plan, intent, ps = setup((("edge-a", 0, 14), ("cloud-1", 15, 29)))
    link = cluster.link("edge-a", "cloud-1")
    back = link.latency_ms + 1e3 * 49152 * 4 * 8 / 10e9          # one row of fp32 logits over 10 Gbps
    tr = Trace([0.0], [64], [11])
    far = simulate(cluster, plan, model, tr, profiles=ps, intent=intent, driver_node="edge-a")
    near = simulate(cluster, plan, model, tr, profiles=ps, intent=intent, driver_node="cloud-1")
    assert far.ttft_ms_p50 - near.ttft_ms_p50 == pytest.approx(back)
    assert far.tpot_ms_p50 - near.tpot_ms_p50 == pytest.approx(back)
    t1 = intent.traffic.model_copy(update={"concurrency": 1})
    e_far = estimate(plan, cluster, model, t1, profiles=ps, driver_node="edge-a")
    e_near = estimate(plan, cluster, model, t1, profiles=ps)
    assert e_far.ttft_ms - e_near.ttft_ms == pytest.approx(back) and e_far.tpot_ms - e_near.tpot_ms == pytest.approx(back)


def test_a_wave_of_prompts_is_micro_batched_alike_in_both_models():
    cluster, model, plan, intent, ps = setup((("edge-a", 0, 14), ("cloud-1", 15, 29)))
    r = simulate(cluster, plan, model, Trace([0.0] * 4, [64] * 4, [11] * 4), profiles=ps, intent=intent)
    t4 = intent.traffic.model_copy(update={"concurrency": 4})
    est = estimate(plan, cluster, model, t4, profiles=ps, prefill_rows=4)
    # 4 x 64 tokens over 2 stages: two micro-batches of 2 prompts that overlap
    link = cluster.link("edge-a", "cloud-1")
    hop = link.latency_ms + 1e3 * 128 * 576 * 2 * 8 / 10e9
    s0, s1 = 1 + 15 * 2 + hop, 1 + 15 * 2 + 4
    assert r.ttft_ms_p50 == pytest.approx(s0 + s1 + max(s0, s1))
    assert est.ttft_ms == pytest.approx(r.ttft_ms_p50)
    assert est.tpot_ms == pytest.approx(r.tpot_ms_p50, rel=1e-6)


def test_session_telemetry_has_each_stages_step_times_as_the_service_reports_them():
    """Session.telemetry's window "stages": per stage, decode-only steps apart from steps with prompt tokens,
    each figure countable by hand from the flat profile (as test_one_request_one_stage)."""
    from policies.simulator import Session
    cluster, model, plan, intent, ps = setup((("edge-a", 0, 14), ("edge-b", 15, 29)))
    s = Session(cluster, plan, model, Trace([0.0], [64], [11]), profiles=ps, intent=intent)
    s.advance(5.0)
    w = s.telemetry(0.0, "5s")["windows"]["5s"]
    a, b = w["stages"]
    assert (a["node"], a["layers"], b["node"], b["layers"]) == ("edge-a", [0, 15], "edge-b", [15, 30])
    # one prefill step, then 10 decode-only steps of one row
    assert [(x["prefill_steps"], x["decode_steps"]) for x in (a, b)] == [(1, 10), (1, 10)]
    assert a["decode_rows_per_step"] == b["decode_rows_per_step"] == 1
    assert a["prefill_tokens_per_step"] == 64
    # edge-a: 1 + 15 x 0.5 = 8.5 ms a decode step, 1 + 15 x 2 = 31 ms the prefill; edge-b adds the 4 ms head
    assert a["decode_compute_s"] == pytest.approx(8.5e-3) and b["decode_compute_s"] == pytest.approx(12.5e-3)
    assert a["prefill_compute_s"] == pytest.approx(31e-3) and b["prefill_compute_s"] == pytest.approx(35e-3)
    assert a["decode_context"] == pytest.approx(sum(64 + i for i in range(1, 11)) / 10)
    # a later window holds only the steps after the first: none here
    assert s.telemetry(5.0, "5s")["windows"]["5s"]["stages"] == []


def test_prompts_riding_in_decode_steps_cost_what_they_add():
    """estimate(prompt_tokens_per_s=...): on a bandwidth-bound step a prompt's chunk costs the compute it adds;
    TPOT grows with the prompt load, and past what the steps can absorb it is infinite."""
    cluster, model, plan, intent, _ = setup()
    t = intent.traffic
    idle = estimate(plan, cluster, model, t)
    assert estimate(plan, cluster, model, t, prompt_tokens_per_s=0.0).tpot_ms == idle.tpot_ms
    tpots = [estimate(plan, cluster, model, t, prompt_tokens_per_s=r).tpot_ms for r in (1e3, 1e5, 1e6)]
    assert idle.tpot_ms <= tpots[0] <= tpots[1] <= tpots[2] and tpots[1] > idle.tpot_ms
    assert estimate(plan, cluster, model, t, prompt_tokens_per_s=1e12).tpot_ms == float("inf")


def test_smaller_prompt_chunks_hide_more_under_the_weight_read():
    cluster, model, plan, intent, _ = setup()
    t = intent.traffic
    whole = estimate(plan, cluster, model, t, prompt_tokens_per_s=2e4).tpot_ms
    small = estimate(plan, cluster, model, t, prompt_tokens_per_s=2e4, prompt_chunk_tokens=8).tpot_ms
    assert small <= whole
    with pytest.raises(ValueError, match="prompt_chunk_tokens"):
        estimate(plan, cluster, model, t, prompt_tokens_per_s=2e4, prompt_chunk_tokens=0)


def test_the_transports_cost_per_message_is_fitted_and_counted_alike_in_both_models():
    """Corrections.observe_message fits a fixed and a per-MB cost beyond the link model; the cost model and
    the simulator then add it to every message of a pass (the step message out, each hop, the logits back)
    and the driver's turn per step."""
    from policies.costmodel import Corrections
    c = Corrections(alpha=0.5)
    for mb in (0.001, 0.2, 0.8, 0.001, 0.2):
        c.observe_message(mb * 1e6, 0.1 + 1.2 + 2.5 * mb, modeled_ms=0.1)     # the link's 0.1 ms taken out
    assert c.message_fixed_ms == pytest.approx(1.2) and c.message_ms_per_mb == pytest.approx(2.5)
    assert c.message_ms(4e5) == pytest.approx(1.2 + 2.5 * 0.4)
    c.observe_driver(0.4)
    cluster, model, plan, intent, ps = setup((("edge-a", 0, 14), ("cloud-1", 15, 29)))
    t1 = intent.traffic.model_copy(update={"concurrency": 1})
    tr = Trace([0.0], [64], [11])
    bare = Corrections()
    e0, e1 = (estimate(plan, cluster, model, t1, profiles=ps, corrections=x) for x in (bare, c))
    r0, r1 = (simulate(cluster, plan, model, tr, profiles=ps, intent=intent, corrections=x) for x in (bare, c))
    logits, act = 49152 * 4 / 1e6, 576 * 2 / 1e6                     # MB a row: fp32 logits, bf16 activations
    # one token: the step message (fixed), the hop (fixed + 1 token), the logits (fixed + 1 row), the driver
    per_token = 3 * 1.2 + 2.5 * (act + logits) + 0.4
    assert e1.tpot_ms - e0.tpot_ms == pytest.approx(per_token)
    assert r1.tpot_ms_p50 - r0.tpot_ms_p50 == pytest.approx(per_token)
    # the prompt: the hop carries 64 tokens
    assert e1.ttft_ms - e0.ttft_ms == pytest.approx(3 * 1.2 + 2.5 * (64 * act + logits) + 0.4)
    assert r1.ttft_ms_p50 == pytest.approx(e1.ttft_ms)
    # a one-stage plan pays the step message and the logits only
    one = setup()[2]
    assert estimate(one, cluster, model, t1, profiles=ps, corrections=c).tpot_ms - \
        estimate(one, cluster, model, t1, profiles=ps).tpot_ms == pytest.approx(2 * 1.2 + 2.5 * logits + 0.4)


def test_with_groups_in_flight_a_stages_messages_occupy_it_once_per_group():
    """io_s: the worker of a stage takes each group's step message and activations and sends its output
    itself, so with g groups in flight the bottleneck stage's round is g x (its step + its messages).
    Without a fitted transport there is nothing to add; with one group the pass already counts them."""
    from policies.costmodel import Corrections
    c = Corrections(alpha=0.5)
    for mb in (0.001, 0.2, 0.8, 0.001, 0.2):
        c.observe_message(mb * 1e6, 1.2 + 2.5 * mb)
    cluster, model, plan, intent, ps = setup((("edge-a", 0, 9), ("cloud-1", 10, 29)))
    t = intent.traffic                                 # 4 running: 2 groups of 2
    act, logits = 576 * 2 / 1e6, 49152 * 4 / 1e6      # MB a row: bf16 activations, fp32 logits
    # the last stage's: its step message, the group's activations in, its logits out
    io_last = 1.2 + (1.2 + 2.5 * 2 * act) + (1.2 + 2.5 * 2 * logits)
    # the last stage (20 layers + head: 1 + 10 + 4 = 15 ms a step) is the bottleneck of the round
    with_, without = (estimate(plan, cluster, model, t, profiles=ps, corrections=c, groups_in_flight=2,
                               stage_io=r).tpot_ms for r in (True, False))
    assert without == pytest.approx(2 * 15.0)
    assert with_ == pytest.approx(2 * (15.0 + io_last))
    for x, g in ((None, 2), (c, 1)):                   # no transport learned, or one group: no change
        a, b = (estimate(plan, cluster, model, t, profiles=ps, corrections=x, groups_in_flight=g,
                         stage_io=r).tpot_ms for r in (True, False))
        assert a == b
    # the simulator's rounds count the same
    tr = Trace([0.0] * 4, [64] * 4, [11] * 4)
    sims = [simulate(cluster, plan, model, tr, profiles=ps, intent=intent, corrections=c,
                     config=SimConfig(groups_in_flight=2, stage_io=r)).tpot_ms_p50 for r in (True, False)]
    assert sims[1] == pytest.approx(without, rel=0.05)
    assert sims[0] - sims[1] == pytest.approx(2 * io_last, rel=0.05)


def test_the_transport_is_learned_from_telemetrys_hops_with_the_link_taken_out():
    from policies.costmodel import Corrections
    cluster = load_cluster(CLUSTER)
    link = cluster.link("edge-a", "cloud-1")                 # 10 Gbps, 1 ms
    c = Corrections()
    hops = [{"src": "driver", "dst": "edge-a", "bytes_per_step": 0.0, "transfer_s": 0.0012},       # same node: no link
            {"src": "edge-a", "dst": "cloud-1", "bytes_per_step": 0.0, "transfer_s": 0.0022},      # 1 ms of it the link's
            {"src": "cloud-1", "dst": "driver", "bytes_per_step": 0.0, "transfer_s": 0.0022}]
    assert c.observe_transport({"hops": hops, "driver_s": 0.0005}, cluster, driver_node="edge-a") == 4
    assert link.latency_ms == 1.0
    assert c.message_fixed_ms == pytest.approx(1.2) and c.message_ms_per_mb == 0.0 and c.driver_ms == pytest.approx(0.5)
    # a transfer faster than the link model says (loopback where the file says 1 ms) teaches no negative cost
    c2 = Corrections()
    c2.observe_transport({"hops": [dict(hops[1], transfer_s=0.0002)]}, cluster, "edge-a")
    assert c2.message_fixed_ms == 0.0 and c2.message_ms_per_mb == 0.0
    # sizes a few hundred bytes apart say nothing about a cost per MB: their mean is the fixed cost
    c3 = Corrections()
    for nbytes, ms in ((130, 1.5), (650, 2.2), (1024, 1.2), (650, 2.8)):
        c3.observe_message(nbytes, ms)
    assert c3.message_ms_per_mb == 0.0 and c3.message_fixed_ms == pytest.approx((1.5 + 2.2 + 1.2 + 2.8) / 4)
    with pytest.raises(ValueError, match="bytes"):
        c.observe_message(-1, 1.0)
    with pytest.raises(ValueError, match="transfer times"):
        c.observe_message(10, float("nan"))
