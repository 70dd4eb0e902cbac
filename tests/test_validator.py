"""Each validator rule catches its violation and passes a good plan."""
import pytest

from policies import (RULES, Cluster, IntentSpec, PlacementPlan, PlanRejected, Policy, Stage, ValidatedPlan, approve,
                      load_model_spec, validate)

CLUSTER = Cluster.model_validate({
    "name": "t",
    "nodes": [
        {"name": "own-1", "gpu": "A100-80GB", "jurisdiction": "eu", "trust": "owned", "tier": "edge"},
        {"name": "own-2", "gpu": "A100-80GB", "jurisdiction": "eu", "trust": "owned", "tier": "edge"},
        {"name": "att-eu", "gpu": "A100-80GB", "jurisdiction": "eu", "trust": "attested"},
        {"name": "att-us", "gpu": "A100-80GB", "jurisdiction": "us", "trust": "attested"},
        {"name": "pub-eu", "gpu": "A100-80GB", "jurisdiction": "eu", "trust": "public-cloud"},
        {"name": "small", "gpu": "T4", "jurisdiction": "eu", "trust": "owned", "tier": "edge"},
        {"name": "down", "gpu": "A100-80GB", "jurisdiction": "eu", "trust": "owned", "state": "down"},
        {"name": "island", "gpu": "A100-80GB", "jurisdiction": "eu", "trust": "owned"},
    ],
    "links": {"default": {"bandwidth_gbps": 10, "latency_ms": 1, "encrypted": True}, "pairs": [
        {"between": ["own-1", "pub-eu"], "bandwidth_gbps": 10, "latency_ms": 1, "encrypted": False},
        {"between": ["own-1", "own-2"], "bandwidth_gbps": 100, "latency_ms": 0.1, "encrypted": False},
    ]},
})
# `island` is reachable only in NO_DEFAULT, where no default link exists.
NO_DEFAULT = Cluster.model_validate({**CLUSTER.model_dump(mode="json"), "links": {"pairs": [
    {"between": ["own-1", "own-2"], "bandwidth_gbps": 100, "latency_ms": 0.1}]}})

POLICY = Policy.model_validate({"name": "p", "data_classes": {
    "public": {},
    "phi": {"allowed_jurisdictions": ["eu"], "min_trust": "attested", "trusted_ends": "owned",
            "private_prefix_layers": 4, "encrypt_cross_boundary": True},
    "wire": {"encrypt_cross_boundary": True},
    "kvstrict": {"min_trust": "attested", "kv_min_trust": "owned"},
    "loose": {"allowed_jurisdictions": ["eu", "us"]},
}})
MODEL = load_model_spec("llama-3-8b")  # 32 layers


def mk(stages, data_class="phi", cluster=CLUSTER, **kw):
    return PlacementPlan(model="llama-3-8b", data_class=data_class, cluster_fingerprint=cluster.fingerprint(),
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages), **kw)


def check(plan, intent=None, cluster=CLUSTER, current=None, model=MODEL):
    return validate(plan, cluster, POLICY, intent or IntentSpec(data_class=plan.data_class), model, current)


GOOD = mk([("own-1", 0, 15), ("own-2", 16, 31)])


def test_good_plan_passes_every_rule():
    r = check(GOOD)
    assert r.ok, r.text()
    assert r.warnings == ()
    assert r.estimates.ttft_ms > 0 and r.estimates.tpot_ms > 0 and r.estimates.throughput_tok_s > 0
    assert "0 violations" in r.text()


@pytest.mark.parametrize("stages,words", [
    ([("own-1", 0, 14), ("own-2", 16, 31)], "layers 15 are on no stage"),
    ([("own-1", 0, 16), ("own-2", 16, 31)], "layer 16 is on stages 0, 1"),
    ([("own-2", 16, 31), ("own-1", 0, 15)], "stage 1 starts at layer 0"),
    ([("ghost", 0, 31)], "names node 'ghost'"),
    ([("own-1", 0, 40)], "model has layers 0-31"),
])
def test_coverage(stages, words):
    r = check(mk(stages))
    assert "coverage" in r.rules_broken() and words in r.text(), r.text()
    assert r.estimates is None  # no estimates for a malformed plan


def test_coverage_needs_a_link_between_consecutive_stages():
    r = check(mk([("own-1", 0, 15), ("island", 16, 31)], cluster=NO_DEFAULT), cluster=NO_DEFAULT)
    assert r.rules_broken() == {"coverage"} and "no link between own-1 and island" in r.text()


def test_capacity():
    r = check(mk([("small", 0, 31)]))
    assert r.rules_broken() == {"capacity"}
    v = r.violations[0]
    assert v.node == "small" and "usable" in v.message and "move about" in v.hint


def test_capacity_reserves_whole_kv_blocks_and_reports_the_reservation():
    # 3 x 1000 tokens is not a whole number of 16-token blocks: the executor allocates 188 blocks
    # (3008 tokens), and that is what the capacity rule charges and the report carries.
    intent = IntentSpec(data_class="phi", traffic={"concurrency": 3, "context_tokens": 1000})
    r = check(GOOD, intent)
    assert r.ok and r.kv.blocks == 188 and r.kv.block_size == 16 and r.kv.tokens == 3008
    assert r.estimates.stages[0].kv_bytes == 16 * MODEL.kv_bytes_per_token_per_layer * 3008


def test_one_stage_per_node():
    r = check(mk([("own-1", 0, 9), ("own-2", 10, 20), ("own-1", 21, 31)]))
    assert r.rules_broken() == {"one-stage-per-node"}, r.text()
    v = r.violations[0]
    assert v.node == "own-1" and v.stage == 2 and "stages 0, 2" in v.message and "one contiguous range" in v.message
    assert "merge them into one stage on own-1" in v.hint
    with pytest.raises(PlanRejected, match="one-stage-per-node"):
        approve(mk([("own-1", 0, 9), ("own-2", 10, 20), ("own-1", 21, 31)]), CLUSTER, POLICY, None, MODEL)


def test_residency():
    r = check(mk([("own-1", 0, 15), ("att-us", 16, 30), ("own-2", 31, 31)]))
    assert "residency" in r.rules_broken()
    v = next(v for v in r.violations if v.rule == "residency")
    assert v.stage == 1 and v.node == "att-us" and "us" in v.message and "eu" in v.hint


def test_min_trust():
    r = check(mk([("own-1", 0, 15), ("att-eu", 16, 20), ("pub-eu", 21, 30), ("own-2", 31, 31)]))
    assert "min-trust" in r.rules_broken() and r.violations[0].node == "pub-eu"


def test_trusted_ends():
    r = check(mk([("own-1", 0, 15), ("att-eu", 16, 31)]))
    assert r.rules_broken() == {"trusted-ends"}
    assert "LM head" in r.violations[0].message and "own-" in r.violations[0].hint


def test_private_prefix():
    r = check(mk([("own-1", 0, 1), ("att-eu", 2, 30), ("own-2", 31, 31)]))
    assert r.rules_broken() == {"private-prefix"}
    assert "layers 0-3" in r.violations[0].message and "move layers 2-3" in r.violations[0].hint
    assert check(mk([("own-1", 0, 3), ("att-eu", 4, 30), ("own-2", 31, 31)])).ok


def test_kv_residency():
    r = check(mk([("own-1", 0, 15), ("att-eu", 16, 31)], data_class="kvstrict"))
    assert r.rules_broken() == {"kv-residency"}


def test_link_encryption():
    r = check(mk([("own-1", 0, 15), ("pub-eu", 16, 31)], data_class="wire"))
    assert r.rules_broken() == {"link-encryption"}
    # Same hop, but inside one trust zone: no boundary, no violation.
    assert check(mk([("own-1", 0, 15), ("own-2", 16, 31)], data_class="wire")).ok


def test_slo_violation_and_warning():
    est = check(GOOD).estimates
    r = check(GOOD, IntentSpec(data_class="phi", max_ttft_ms=est.ttft_ms / 2))
    assert r.rules_broken() == {"slo"} and "TTFT" in r.violations[0].message
    r = check(GOOD, IntentSpec(data_class="phi", max_tpot_ms=est.tpot_ms * 1.1))
    assert r.ok and any(w.rule == "slo" for w in r.warnings)


def test_availability():
    r = check(mk([("own-1", 0, 15), ("down", 16, 31)]))
    assert r.rules_broken() == {"availability"} and "down" in r.violations[0].message


def test_exclusions():
    r = check(GOOD, IntentSpec(data_class="phi", exclude_nodes=("own-2",)))
    assert r.rules_broken() == {"exclusions"}


def test_data_class_unknown_or_mismatched():
    r = check(mk([("own-1", 0, 31)], data_class="secret"))
    assert r.rules_broken() == {"data-class"} and "known: " in r.text()
    r = check(GOOD, IntentSpec(data_class="public"))
    assert "data-class" in r.rules_broken()


def test_transition_kv_may_not_travel_to_a_disallowed_node():
    current = mk([("own-1", 0, 15), ("own-2", 16, 31)])                 # serving phi now
    new = mk([("own-1", 0, 15), ("att-us", 16, 30), ("own-2", 31, 31)], data_class="loose")
    assert check(new).ok                                                 # fine on its own...
    r = check(new, current=current)                                      # ...not as a move
    assert r.rules_broken() == {"transition"} and "in-flight phi" in r.text()


def test_transition_needs_a_link_and_memory_mid_way():
    current = mk([("own-1", 0, 31)], cluster=NO_DEFAULT)
    new = mk([("own-1", 0, 15), ("island", 16, 31)], cluster=NO_DEFAULT)
    r = check(new, cluster=NO_DEFAULT, current=current)
    assert "transition" in r.rules_broken() and "no link between them" in r.text()
    big = load_model_spec("llama-3-70b")
    cur = PlacementPlan(model="llama-3-70b", data_class="public", cluster_fingerprint=CLUSTER.fingerprint(),
                        stages=(Stage(node="own-1", first_layer=0, last_layer=39),
                                Stage(node="own-2", first_layer=40, last_layer=79)))
    swap = cur.model_copy(update={"stages": (Stage(node="own-2", first_layer=0, last_layer=39),
                                             Stage(node="own-1", first_layer=40, last_layer=79))})
    ok_alone = check(swap, IntentSpec(data_class="public", traffic={"concurrency": 1, "context_tokens": 512}),
                     model=big)
    assert ok_alone.ok, ok_alone.text()
    r = check(swap, IntentSpec(data_class="public", traffic={"concurrency": 1, "context_tokens": 512}),
              current=cur, model=big)
    assert "transition" in r.rules_broken() and "mid-way" in r.text()


def test_transition_refuses_another_model():
    other = GOOD.model_copy(update={"model": "qwen2.5-7b"})
    assert "transition" in check(GOOD, current=other).rules_broken()


def test_freshness():
    stale = GOOD.model_copy(update={"cluster_fingerprint": "0123456789abcdef"})
    r = check(stale)
    assert r.rules_broken() == {"freshness"}
    # The same plan goes stale when a node changes state.
    r = check(GOOD, cluster=CLUSTER.with_state("att-us", "draining"))
    assert r.rules_broken() == {"freshness"}
    unstamped = GOOD.model_copy(update={"cluster_fingerprint": None})
    r = check(unstamped)
    assert r.ok and [w.rule for w in r.warnings] == ["freshness"]


def test_every_rule_is_tested():
    import inspect
    import sys
    src = inspect.getsource(sys.modules[__name__])
    for rule in RULES:
        assert f'"{rule}"' in src.split("def test_every_rule_is_tested")[0], rule


def test_intent_cannot_loosen_the_policy():
    # The intent names us, which phi does not allow: the residency rule still holds.
    intent = IntentSpec(data_class="phi", allowed_jurisdictions=("eu", "us"), min_trust="untrusted")
    r = check(mk([("own-1", 0, 15), ("att-us", 16, 30), ("own-2", 31, 31)]), intent)
    assert "residency" in r.rules_broken()
    assert any("does not allow" in w.message for w in r.warnings)
    # It may tighten: only us allowed for `loose` puts own-1 out.
    r = check(mk([("own-1", 0, 31)], data_class="loose"), IntentSpec(data_class="loose", allowed_jurisdictions=("us",)))
    assert r.rules_broken() == {"residency", "kv-residency"}


def test_only_the_validator_makes_a_validated_plan():
    with pytest.raises(TypeError, match="only from policies.validate"):
        ValidatedPlan(plan=GOOD, report=check(GOOD), cluster_fingerprint="x", policy="p")
    with pytest.raises(TypeError):
        ValidatedPlan.model_validate({"plan": GOOD.model_dump()})
    vp = approve(GOOD, CLUSTER, POLICY, None, MODEL)
    assert isinstance(vp, ValidatedPlan) and vp.plan.estimates is not None
    assert vp.cluster_fingerprint == CLUSTER.fingerprint()
    with pytest.raises(PlanRejected) as e:
        approve(mk([("own-1", 0, 15), ("att-eu", 16, 31)]), CLUSTER, POLICY, None, MODEL)
    assert "trusted-ends" in str(e.value)
