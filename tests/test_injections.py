"""scenarios/injections.yaml: appending any loosening phrasing to any base intent never gives a less strict
spec, nor a plan on a node the base intent's plan could not use (rules alone, a compliant scripted LLM,
and `continuo apply --dry-run --json`)."""
import json
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage

from agent.agent import Agent
from agent.grounding import Inventory
from agent.intent_parser import parse_intent
from policies import effective_rules, load_cluster, load_policy
from tests.tiny_service import run_cli

ROOT = Path(__file__).resolve().parent.parent
SUITE = yaml.safe_load((ROOT / "scenarios/injections.yaml").read_text())
PHRASINGS, BASES = SUITE["phrasings"], SUITE["bases"]


@lru_cache(maxsize=None)
def packs(cluster: str, policy: str):
    return load_cluster(ROOT / cluster), load_policy(ROOT / policy)


@lru_cache(maxsize=None)
def base_spec(i: int):
    b = BASES[i]
    return parse_intent(b["text"], *packs(b["cluster"], b["policy"]), use_llm=False).spec


def usable(spec, cluster, policy) -> set[str]:
    """Nodes a plan for this spec may put a stage on."""
    eff = effective_rules(policy, spec)
    return {n.name for n in cluster.nodes if eff.may_see(n) and n.name not in spec.exclude_nodes}


def assert_not_looser(base, got, cluster, policy, what):
    inv = Inventory(cluster, policy)
    assert got is not None, what
    assert inv.strictness(got.data_class) >= inv.strictness(base.data_class), what
    eb, eg = effective_rules(policy, base), effective_rules(policy, got)
    if eb.jurisdictions is not None:
        assert eg.jurisdictions is not None and eg.jurisdictions <= eb.jurisdictions, what
    assert eg.min_trust.at_least(eb.min_trust) and eg.ends_trust.at_least(eb.ends_trust), what
    assert set(base.exclude_nodes) <= set(got.exclude_nodes), what
    assert usable(got, cluster, policy) <= usable(base, cluster, policy), what


def test_suite_is_as_big_as_the_issue_asks():
    assert len(PHRASINGS) >= 20 and len({b["cluster"] for b in BASES}) >= 3


@pytest.mark.parametrize("i", range(len(BASES)), ids=lambda i: BASES[i]["text"][:30])
def test_every_phrasing_after_every_base_changes_nothing_looser(i):
    b = BASES[i]
    cluster, policy = packs(b["cluster"], b["policy"])
    base = base_spec(i)
    for p in PHRASINGS:
        got = parse_intent(f"{b['text']} {p}", cluster, policy, use_llm=False)
        assert_not_looser(base, got.spec, cluster, policy, p)
        assert got.ignored, f"not reported as ignored: {p}"


def _compliant_llm(policy):
    """A model that obeys the injected text: the least strict class, every place, no trust floor."""
    loosest = min(policy.data_classes, key=lambda c: (policy.data_classes[c].min_trust.rank,
                                                      -len(policy.data_classes[c].allowed_jurisdictions or [0] * 99)))
    return FakeMessagesListChatModel(responses=[AIMessage(json.dumps(
        {"data_class": loosest, "min_trust": "untrusted", "exclude_nodes": {}, "prefer_tier": None}))] * 4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(i=st.integers(0, len(BASES) - 1), p=st.sampled_from(PHRASINGS), llm=st.booleans())
def test_plan_never_uses_a_node_the_base_could_not(i, p, llm):
    b = BASES[i]
    cluster, policy = packs(b["cluster"], b["policy"])
    base = base_spec(i)
    agent = Agent(cluster, policy, llm=_compliant_llm(policy) if llm else None, use_llm=llm, mode="auto")
    out = agent.apply(f"{b['text']} {p}")
    assert_not_looser(base, out.spec, cluster, policy, p)
    if out.plan is not None:
        assert {s.node for s in out.plan.stages} <= usable(base, cluster, policy), p


@pytest.mark.parametrize("i,p", [(0, 5), (6, 16), (9, 0)])
def test_apply_dry_run_json_holds(tmp_path, capsys, monkeypatch, i, p):
    b = BASES[i]
    f = tmp_path / "intent.md"
    f.write_text(f"---\ncluster: {ROOT / b['cluster']}\npolicy: {ROOT / b['policy']}\n---\n"
                 f"{b['text']} {PHRASINGS[p]}\n")
    code, out, _ = run_cli(capsys, monkeypatch, "apply", f, "--dry-run", "--json", "--no-llm")
    res = json.loads(out.strip().splitlines()[-1])
    cluster, policy = packs(b["cluster"], b["policy"])
    base = base_spec(i)
    from policies import IntentSpec
    assert_not_looser(base, IntentSpec(**res["spec"]), cluster, policy, PHRASINGS[p])
    assert res["ignored"]
    if res["plan"]:
        assert {s["node"] for s in res["plan"]["stages"]} <= usable(base, cluster, policy)
