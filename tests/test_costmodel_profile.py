"""Profiles (load, save, bad files), the cost model preferring them, correction factors, groups in flight."""
from __future__ import annotations

import math

import pytest

from policies import IntentSpec, InputError, PlacementPlan, Stage, Traffic, load_cluster, load_model_spec, load_policy
from policies.costmodel import Corrections, StageShape, decode_ms, estimate, prefill_ms
from policies.profile import Profile, ProfileSet, load_profile, load_profiles, now_utc, save_profile
from policies.validator import validate

CLUSTER, POLICY = "scenarios/local/cluster.yaml", "scenarios/local/policy.yaml"


def make_profile(**over) -> Profile:
    base = dict(model="smollm2-135m", kind="CPU", device="cpu", threads=1, measured_at=now_utc(),
                stage_ms=0.5, embed_ms=0.05,
                head={"rows": [1, 4], "ms": [10.0, 16.0]},
                prefill={"tokens": [16, 64], "layer_ms": [2.0, 5.0]},
                decode={"batch": [1, 4], "context": [64, 256], "layer_ms": [[1.0, 1.2], [1.6, 2.0]]})
    return Profile.model_validate({**base, **over})


def plan2(model="smollm2-135m"):
    return PlacementPlan(model=model, data_class="phi", stages=(Stage(node="edge-a", first_layer=0, last_layer=14),
                                                                Stage(node="edge-b", first_layer=15, last_layer=29)))


def test_profile_tables_interpolate_and_extrapolate():
    p = make_profile()
    assert p.layer_prefill_ms(16) == 2.0 and p.layer_prefill_ms(40) == pytest.approx(3.5)
    assert p.layer_prefill_ms(112) == pytest.approx(8.0)            # linear beyond the last point
    assert p.layer_prefill_ms(1) == 2.0                              # never below the smallest measured
    assert p.layer_decode_ms(1, 64) == 1.0 and p.layer_decode_ms(4, 256) == 2.0
    assert p.layer_decode_ms(2, 160) == pytest.approx((1.1 * 2 + 1.8 * 1) / 3)   # bilinear
    assert p.head_ms(2) == pytest.approx(12.0)
    # a stage: fixed cost + layers x layer + the ends it holds
    assert p.stage_decode_ms(15, True, False, 1, 64) == pytest.approx(0.5 + 15 * 1.0 + 0.05)
    assert p.stage_prefill_ms(15, False, True, 16) == pytest.approx(0.5 + 15 * 2.0 + 10.0)


def test_profile_save_load_round_trip(tmp_path):
    p = make_profile(node="edge-a")
    path = save_profile(p, tmp_path)
    assert path.name == "smollm2-135m--CPU--edge-a.yaml"
    q = load_profile(path)
    assert q == p
    assert len(load_profiles(tmp_path)) == 1
    assert len(load_profiles(tmp_path / "nowhere")) == 0
    with pytest.raises(InputError, match="no such profile folder"):
        load_profiles(tmp_path / "nowhere", missing_ok=False)


@pytest.mark.parametrize("edit, field, words", [
    ("decode:\n  batch: [1, 4]\n  context: [64, 256]\n  layer_ms: [[1.0, 1.2]]\n", "decode.layer_ms",
     "1 rows for 2 batch sizes"),
    ("decode:\n  batch: [4, 1]\n  context: [64]\n  layer_ms: [[1.0], [2.0]]\n", "decode.batch[1]", "must rise: 1 after 4"),
    ("prefill:\n  tokens: [16, 64]\n  layer_ms: [2.0, -5.0]\n", "prefill.layer_ms[1]", "must be positive, not -5.0"),
    ("head:\n  rows: [1]\n  ms: [1.0, 2.0]\n", "head.ms", "2 values for 1 rows"),
])
def test_bad_profile_names_file_line_field_value(tmp_path, edit, field, words):
    good = save_profile(make_profile(), tmp_path).read_text()
    key = edit.split(":")[0]
    lines, out, skip = good.splitlines(), [], False
    for line in lines:           # replace the top-level block `key:` with the edit
        if line.startswith(f"{key}:"):
            skip = True
            out.append(edit.rstrip("\n"))
            continue
        if skip and line.startswith(" "):
            continue
        skip = False
        out.append(line)
    bad = tmp_path / "bad.yaml"
    bad.write_text("\n".join(out) + "\n")
    with pytest.raises(InputError) as e:
        load_profile(bad)
    assert e.value.file == str(bad) and e.value.field == field and words in str(e.value)
    leaf = field.split(".")[-1].split("[")[0]          # the line shown is the one of the field's key
    assert bad.read_text().splitlines()[e.value.line - 1].strip().startswith(f"{leaf}:")


def test_bad_value_type_is_named(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(save_profile(make_profile(), tmp_path).read_text().replace("stage_ms: 0.5", "stage_ms: fast"))
    with pytest.raises(InputError, match=r"p.yaml:\d+: stage_ms: .*'fast'"):
        load_profile(f)


def test_profileset_prefers_node_over_kind():
    cluster = load_cluster(CLUSTER)
    kind, own = make_profile(), make_profile(node="edge-b", stage_ms=9.0)
    ps = ProfileSet([kind, own])
    assert ps.find(cluster.node("edge-a"), "smollm2-135m") is kind
    assert ps.find(cluster.node("edge-b"), "smollm2-135m") is own
    assert ps.find(cluster.node("edge-a"), "llama-3-8b") is None


def test_estimate_prefers_measured_and_says_so():
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    t = Traffic(concurrency=1, prompt_tokens=64, output_tokens=64, context_tokens=256)
    sheet = estimate(plan2(), cluster, model, t)
    assert sheet.source == "datasheet" and {s.source for s in sheet.stages} == {"datasheet"}
    prof = make_profile()
    meas = estimate(plan2(), cluster, model, t, profiles=ProfileSet([prof]))
    assert meas.source == "measured" and {s.source for s in meas.stages} == {"measured"}
    ctx = 64 + 32
    first = prof.stage_decode_ms(15, True, False, 1, ctx)
    last = prof.stage_decode_ms(15, False, True, 1, ctx)
    link = cluster.link("edge-a", "edge-b")
    hop = link.latency_ms + 1e3 * model.hidden_size * model.dtype_bytes * 8 / (link.bandwidth_gbps * 1e9)
    assert meas.tpot_ms == pytest.approx(first + last + hop)
    assert meas.throughput_tok_s == pytest.approx(1e3 / meas.tpot_ms)
    # one node profiled, the other not: mixed
    mixed = estimate(plan2(), cluster, model, t, profiles=ProfileSet([make_profile(node="edge-a")]))
    assert mixed.source == "mixed" and [s.source for s in mixed.stages] == ["measured", "datasheet"]


def test_validator_and_planner_use_the_profile():
    from agent.planner import plan as make_plan
    cluster, policy, model = load_cluster(CLUSTER), load_policy(POLICY), load_model_spec("smollm2-135m")
    intent = IntentSpec(data_class="phi", max_tpot_ms=20, traffic=Traffic(concurrency=1, context_tokens=1024))
    slow = ProfileSet([make_profile()])            # ~30 ms per pass: over the 20 ms bound
    r = validate(plan2(), cluster, policy, intent, model, profiles=slow)
    assert "slo" in r.rules_broken() and r.estimates.source == "measured"
    assert "slo" not in validate(plan2(), cluster, policy, intent, model).rules_broken()   # datasheet: fast
    from agent.planner import Infeasible
    with pytest.raises(Infeasible, match="TPOT"):
        make_plan(intent, cluster, policy, model, profiles=slow)
    ok = make_plan(intent.model_copy(update={"max_tpot_ms": 60}), cluster, policy, model, profiles=slow)
    assert ok.report.estimates.source == "measured"


def test_corrections_smooth_and_scale_estimates():
    c = Corrections(alpha=0.5)
    assert c.factor("edge-a", "decode") == 1.0
    assert c.observe("edge-a", "decode", 20.0, 10.0) == 2.0        # first ratio taken as it is
    assert c.observe("edge-a", "decode", 10.0, 10.0) == pytest.approx(1.5)   # then smoothed
    assert c.observe("edge-a", "decode", 1e6, 1.0) == pytest.approx(0.5 * 1.5 + 0.5 * Corrections.MAX_FACTOR)
    with pytest.raises(ValueError, match="phase"):
        c.observe("edge-a", "bogus", 1, 1)
    with pytest.raises(ValueError, match="positive"):
        c.observe("edge-a", "decode", 0, 1)
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    t = Traffic(concurrency=1, prompt_tokens=64, output_tokens=64, context_tokens=256)
    ps = ProfileSet([make_profile()])
    base = estimate(plan2(), cluster, model, t, profiles=ps)
    corr = Corrections()
    # observe edge-b's real decode step at twice what the profile says, at the estimate's own shape
    pred = make_profile().stage_decode_ms(15, False, True, 1, 96)
    f = corr.observe_stage(plan2(), cluster, model, "edge-b", "decode", 2 * pred, tokens=1, context=96, profiles=ps)
    assert f == pytest.approx(2.0)
    fixed = estimate(plan2(), cluster, model, t, profiles=ps, corrections=corr)
    assert fixed.stages[1].decode_ms == pytest.approx(2 * base.stages[1].decode_ms)
    assert fixed.stages[1].correction_decode == pytest.approx(2.0) and fixed.stages[0].correction_decode == 1.0
    assert fixed.stages[0].decode_ms == pytest.approx(base.stages[0].decode_ms)
    with pytest.raises(KeyError, match="serves no stage"):
        corr.observe_stage(plan2(), cluster, model, "cloud-1", "decode", 1.0, tokens=1)


def unshared(cluster):
    """The same cluster with every node on a machine of its own (scenarios/local's share one host)."""
    return cluster.model_copy(update={"nodes": tuple(n.model_copy(update={"host": None}) for n in cluster.nodes)})


def test_groups_in_flight_fill_the_pipeline():
    # nodes on machines of their own: the round is the max of its bounds (on a shared host the groups
    # also queue at the stages: tests/test_host_sharing.py)
    cluster, model = unshared(load_cluster(CLUSTER)), load_model_spec("smollm2-135m")
    t = Traffic(concurrency=4, prompt_tokens=64, output_tokens=64, context_tokens=256)
    ps = ProfileSet([make_profile()])
    one = estimate(plan2(), cluster, model, t, profiles=ps, groups_in_flight=1)
    two = estimate(plan2(), cluster, model, t, profiles=ps, groups_in_flight=2)
    assert one.groups_in_flight == 1 and two.groups_in_flight == 2
    # None is the engine's default: one group per stage (EngineConfig.pipeline_groups = None)
    assert estimate(plan2(), cluster, model, t, profiles=ps, groups_in_flight=None) == two
    single = PlacementPlan(model="smollm2-135m", data_class="phi", stages=(Stage(node="edge-a", first_layer=0, last_layer=29),))
    assert estimate(single, cluster, model, t, profiles=ps, groups_in_flight=None).groups_in_flight == 1
    # g = 1: TPOT is one pass of the whole batch; g = 2: groups of 2, round = max(pass(2), each stage's
    # work for both groups, each link's bytes for both groups)
    p = make_profile()
    link = cluster.link("edge-a", "edge-b")
    ser = lambda n: 1e3 * n * model.hidden_size * model.dtype_bytes * 8 / (link.bandwidth_gbps * 1e9)  # noqa: E731
    s0 = lambda b: p.stage_decode_ms(15, True, False, b, 96)  # noqa: E731
    s1 = lambda b: p.stage_decode_ms(15, False, True, b, 96)  # noqa: E731
    assert one.tpot_ms == pytest.approx(s0(4) + link.latency_ms + ser(4) + s1(4))
    assert two.tpot_ms == pytest.approx(max(s0(2) + link.latency_ms + ser(2) + s1(2), 2 * s0(2), 2 * s1(2)))
    assert two.throughput_tok_s == pytest.approx(4e3 / two.tpot_ms)
    # three requests in two groups (2 + 1): the busier stage computes a group of 2 and one of 1 per round
    t3 = t.model_copy(update={"concurrency": 3})
    three = estimate(plan2(), cluster, model, t3, profiles=ps, groups_in_flight=None)
    assert three.tpot_ms == pytest.approx(max(s0(2) + link.latency_ms + ser(2) + s1(2), s0(2) + s0(1), s1(2) + s1(1)))


def test_a_long_link_overlaps_across_groups():
    """Latency is not a resource: with 2 groups a 40 ms link delays each pass, but the stages keep
    working on the other group meanwhile."""
    cluster = load_cluster(CLUSTER).model_copy(deep=True)
    model = load_model_spec("smollm2-135m")
    from policies.cluster import Cluster
    d = cluster.model_dump()
    d["links"]["pairs"] = [{"between": ["edge-a", "edge-b"], "bandwidth_gbps": 1, "latency_ms": 40, "encrypted": True}]
    far = unshared(Cluster.model_validate(d))
    t = Traffic(concurrency=8, prompt_tokens=64, output_tokens=64, context_tokens=256)
    ps = ProfileSet([make_profile()])
    one = estimate(plan2(), far, model, t, profiles=ps, groups_in_flight=1)
    two = estimate(plan2(), far, model, t, profiles=ps, groups_in_flight=None)
    assert two.tpot_ms < one.tpot_ms and two.throughput_tok_s > one.throughput_tok_s
    p = make_profile()
    hop = lambda n: 40 + 1e3 * n * model.hidden_size * model.dtype_bytes * 8 / 1e9  # noqa: E731
    assert two.tpot_ms == pytest.approx(p.stage_decode_ms(15, True, False, 4, 96) + hop(4)
                                        + p.stage_decode_ms(15, False, True, 4, 96))


def test_a_wave_of_prompts_flows_through_the_stages_as_micro_batches():
    cluster, model = load_cluster(CLUSTER), load_model_spec("smollm2-135m")
    t = Traffic(concurrency=4, prompt_tokens=64, output_tokens=64, context_tokens=256)
    p = make_profile()
    ps = ProfileSet([p])
    link = cluster.link("edge-a", "edge-b")
    hop = lambda n: link.latency_ms + 1e3 * n * 64 * model.hidden_size * model.dtype_bytes * 8 / (link.bandwidth_gbps * 1e9)  # noqa: E731
    a = p.stage_prefill_ms(15, True, False, 64, 1)           # one prompt per micro-batch
    b = p.stage_prefill_ms(15, False, True, 64, 1)
    # 4 prompts, 2 groups of 2, each group's step cut in 2 micro-batches of 1 prompt: 4 through the stages
    done, free0, free1 = [], 0.0, 0.0
    for _ in range(4):
        free0 += a
        free1 = max(free0 + hop(1), free1) + b
        done.append(free1)
    est = estimate(plan2(), cluster, model, t, profiles=ps, prefill_rows=4, groups_in_flight=None)
    assert est.ttft_ms == pytest.approx((done[1] + done[3]) / 2)       # median of [g0, g0, g1, g1]
    # one group: 2 micro-batches of 2 prompts
    a2, b2 = p.stage_prefill_ms(15, True, False, 64, 2), p.stage_prefill_ms(15, False, True, 64, 2)
    one = estimate(plan2(), cluster, model, t, profiles=ps, prefill_rows=4, groups_in_flight=1)
    assert one.ttft_ms == pytest.approx(max(a2 + hop(2) + b2 + b2, 2 * a2 + hop(2) + b2))
    # a request alone: one pass
    alone = estimate(plan2(), cluster, model, t, profiles=ps)
    assert alone.ttft_ms == pytest.approx(p.stage_prefill_ms(15, True, False, 64) + hop(1)
                                          + p.stage_prefill_ms(15, False, True, 64))
    with pytest.raises(ValueError, match="groups_in_flight must be at least 1, not 0"):
        estimate(plan2(), cluster, model, t, groups_in_flight=0)
    with pytest.raises(ValueError, match="prefill_rows must be at least 1, not 0"):
        estimate(plan2(), cluster, model, t, prefill_rows=0)


def test_datasheet_prefill_rows_scale_work():
    cluster, model = load_cluster(CLUSTER), load_model_spec("llama-3-8b")
    node = cluster.node("cloud-1")
    s = StageShape(32, True, True)
    one, four = prefill_ms(model, s, node, 512), prefill_ms(model, s, node, 512, rows=4)
    assert four == pytest.approx(4 * one, rel=1e-6)
    assert math.isfinite(decode_ms(model, s, node, 8, Traffic()))
