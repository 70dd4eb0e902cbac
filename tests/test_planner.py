"""The planner returns only valid plans, matches brute force on small instances, and explains infeasibility."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import planner
from agent.instances import random_instance
from agent.planner import Infeasible, brute_force, plan
from policies import IntentSpec, load_cluster, load_intent_spec, load_model_spec, load_policy, validate

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(seed=st.integers(0, 10**6), n=st.integers(1, 12), layers=st.integers(2, 40), slo=st.booleans())
def test_every_planned_plan_passes_the_validator(seed, n, layers, slo):
    cluster, policy, intent, model = random_instance(seed, n, layers, with_slo=slo)
    try:
        p = plan(intent, cluster, policy, model, max_stages=4)
    except Infeasible as e:
        assert e.reasons and all(len(r) > 30 for r in e.reasons)
        return
    report = validate(p.plan, cluster, policy, intent, model)
    assert report.ok, report.text()
    assert p.plan.cluster_fingerprint == cluster.fingerprint()
    assert len(set(p.plan.nodes)) == len(p.plan.nodes)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10**6), slo=st.booleans())
def test_planner_equals_brute_force_on_6_nodes_x_12_layers(seed, slo):
    cluster, policy, intent, model = random_instance(seed, 6, 12, with_slo=slo)
    best_plan, best = brute_force(intent, cluster, policy, model, max_stages=3)
    try:
        p = plan(intent, cluster, policy, model, max_stages=3)
    except Infeasible:
        assert best_plan is None
        return
    assert p.exact
    assert p.score == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_planner_equals_brute_force_small(seed):
    cluster, policy, intent, model = random_instance(1000 + seed, 4, 8, with_slo=seed % 2 == 0)
    best_plan, best = brute_force(intent, cluster, policy, model, max_stages=4)
    if best_plan is None:
        with pytest.raises(Infeasible):
            plan(intent, cluster, policy, model, max_stages=4)
    else:
        assert plan(intent, cluster, policy, model, max_stages=4).score == pytest.approx(best, rel=1e-9)


def test_dp_search_on_large_instances_gives_valid_plans(monkeypatch):
    monkeypatch.setattr(planner, "EXACT_LIMIT", 0)  # force the DP path even on small instances
    found = 0
    for seed in range(6):
        cluster, policy, intent, model = random_instance(seed, 24, 40)
        try:
            p = plan(intent, cluster, policy, model)
        except Infeasible:
            continue
        found += 1
        assert not p.exact and validate(p.plan, cluster, policy, intent, model).ok
    assert found >= 3


SC = "scenarios/hospital/"


def hospital():
    return load_cluster(SC + "cluster.yaml"), load_policy(SC + "policy.yaml")


def test_phi_70b_keeps_ends_and_prefix_on_owned_edge():
    c, p = hospital()
    intent = load_intent_spec(SC + "intents/phi-70b-split.yaml")
    prop = plan(intent, c, p, load_model_spec("llama-3-70b"))
    first, last = c.node(prop.plan.stages[0].node), c.node(prop.plan.stages[-1].node)
    assert first.trust.value == "owned" and last.trust.value == "owned"
    owners = prop.plan.layer_owner()
    assert all(c.node(owners[layer]).trust.value == "owned" for layer in range(4))
    assert all(c.node(n).jurisdiction == "eu" for n in prop.plan.nodes)


def test_infeasible_says_which_constraints_conflict():
    c, p = hospital()
    m = load_model_spec("llama-3-70b")
    # Only the edge racks are owned; forbidding attested pools leaves too little memory.
    with pytest.raises(Infeasible) as e:
        plan(IntentSpec(data_class="phi", min_trust="owned"), c, p, m)
    assert "GB" in e.value.reasons[0] and "eligible" in e.value.reasons[0]
    # Nothing in the US may see phi.
    with pytest.raises(Infeasible) as e:
        plan(IntentSpec(data_class="phi", allowed_jurisdictions=("us",)), c, p, m)
    assert "none of the 9 nodes qualifies" in e.value.reasons[0]
    # A TTFT bound no hardware here can meet.
    with pytest.raises(Infeasible) as e:
        plan(IntentSpec(data_class="public", max_ttft_ms=0.5), c, p, load_model_spec("llama-3-8b"))
    assert "TTFT" in e.value.reasons[0] and "relax the SLO" in e.value.reasons[0]
    with pytest.raises(Infeasible, match="not in policy"):
        plan(IntentSpec(data_class="nope"), c, p, m)


def test_exclusions_and_tier_preference_are_respected():
    c, p = hospital()
    m = load_model_spec("llama-3-8b")
    best = plan(IntentSpec(data_class="public", objective="latency"), c, p, m)
    banned = tuple(best.plan.nodes)
    other = plan(IntentSpec(data_class="public", objective="latency", exclude_nodes=banned), c, p, m)
    assert not set(other.plan.nodes) & set(banned)
    cloud = plan(IntentSpec(data_class="public", prefer_tier="cloud"), c, p, m)
    assert all(c.node(n).tier == "cloud" for n in cloud.plan.nodes)


def test_objectives_differ_as_they_should():
    c = load_cluster("scenarios/serverless/cluster.yaml")
    p = load_policy("scenarios/serverless/policy.yaml")
    m = load_model_spec("llama-3-8b")
    cheap = plan(IntentSpec(data_class="internal", objective="cost"), c, p, m)
    fast = plan(IntentSpec(data_class="internal", objective="throughput"), c, p, m)
    assert cheap.report.estimates.cost_per_hour <= fast.report.estimates.cost_per_hour
    assert fast.report.estimates.throughput_tok_s >= cheap.report.estimates.throughput_tok_s


@FAST
@given(seed=st.integers(0, 10**6), n=st.integers(1, 10), layers=st.integers(2, 30), slo=st.booleans())
def test_groups_in_flight_none_judges_each_plan_with_its_own_stage_count(seed, n, layers, slo):
    """groups_in_flight=None: as the engine runs a plan, one group per stage. A caller asking for "at most k
    stages" used to pass k groups, so a plan with fewer stages was judged with more groups than it runs."""
    cluster, policy, intent, model = random_instance(seed, n, layers, with_slo=slo)
    try:
        p = plan(intent, cluster, policy, model, max_stages=4, groups_in_flight=None)
    except Infeasible as e:
        assert e.reasons
        return
    k = len(p.plan.stages)
    assert p.report.estimates.groups_in_flight == min(k, intent.traffic.concurrency)
    report = validate(p.plan, cluster, policy, intent, model, groups_in_flight=None)
    assert report.ok, report.text()
    # the planner's own TPOT for the chain matches the cost model's at the plan's own groups
    from policies.costmodel import estimate
    est = estimate(p.plan, cluster, model, intent.traffic, groups_in_flight=None)
    assert p.report.estimates.tpot_ms == pytest.approx(est.tpot_ms)
