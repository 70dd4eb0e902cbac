"""The labelled intent sets and the benchmark's output contract."""
import json
from pathlib import Path

import pytest

from agent import bench_intents
from agent.grounding import FIELDS
from policies import load_cluster, load_policy

S = Path(__file__).resolve().parent.parent / "scenarios"
SETS = sorted(S.glob("*/intent-set.yaml"))


def test_sets_are_big_enough_and_hold_some_out():
    items = [it for p in SETS for it in bench_intents.load_set(p)]
    assert len(SETS) >= 3 and len(items) >= 40
    assert sum(bool(it.get("held_out")) for it in items) >= 12


@pytest.mark.parametrize("path", SETS, ids=lambda p: p.parent.name)
def test_labels_name_real_things(path):
    cluster, policy = load_cluster(path.parent / "cluster.yaml"), load_policy(path.parent / "policy.yaml")
    for it in bench_intents.load_set(path):
        exp = it["expect"]
        assert set(exp) <= set(FIELDS), it["text"]
        assert exp.get("data_class") in policy.data_classes, it["text"]
        for n in exp.get("exclude_nodes") or []:
            assert cluster.has_node(n), (it["text"], n)


def test_json_is_the_last_line(capsys):
    d = S / "retail"
    res = bench_intents.run(d / "cluster.yaml", d / "policy.yaml", d / "intent-set.yaml", as_json=True,
                            use_llm=False)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= last["field_accuracy"] <= 1 and last["per_field"]["data_class"] >= 0
    assert last["sec_per_intent_p50"] > 0 and last["held_out_field_accuracy"] is not None
    assert last["field_accuracy"] == res["field_accuracy"]


def test_scoring_rules():
    assert bench_intents.same(None, []) and bench_intents.same(["b", "a"], ("a", "b"))
    assert bench_intents.same(300, 300.0) and not bench_intents.same(None, "eu")


def test_bad_set_is_reported(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("- text: hi\n")
    with pytest.raises(ValueError, match="entry 0"):
        bench_intents.load_set(p)
