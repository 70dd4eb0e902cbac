"""The autopilot over a real `continuo serve`-style service: worker processes for the local scenario's three
nodes, a tiny random-weight model of SmolLM2's 30 layers, the HTTP admin API with an admin token on a real
socket, and the ServerTarget / `continuo autopilot` in front of it."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from agent.autopilot import Autopilot, AutopilotConfig
from agent.autopilot.server_target import ServerTarget
from agent.journal import Journal
from policies import IntentSpec, PlacementPlan, Stage, Traffic, approve, load_cluster, load_model_spec, load_policy
from tests.tiny_service import run_cli, serve_app, submit_all

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "autopilot-test-token"
# the traffic the tests send: 3-token prompts (the engine takes 8 prompt tokens a step while others decode,
# so the intent's default 512-token prompts would each wait 64 rounds, a different service to plan for)
INTENT = IntentSpec(data_class="public", traffic=Traffic(prompt_tokens=8, output_tokens=80))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(service, url, cluster file): the 2-stage plan edge-a 0-14 | edge-b 15-29 serving behind the admin API."""
    from executor.api import create_app
    from executor.engine import EngineConfig
    from executor.model import ModelConfig
    from executor.service import Service
    from executor.weights import RandomSource
    folder = tmp_path_factory.mktemp("autopilot")
    cluster_file = folder / "cluster.yaml"
    shutil.copy(ROOT / "scenarios/local/cluster.yaml", cluster_file)
    cluster, policy = load_cluster(cluster_file), load_policy(ROOT / "scenarios/local/policy.yaml")
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=30, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position=256, eos_token_ids=())
    start = PlacementPlan(model="smollm2-135m", data_class="public", cluster_fingerprint=cluster.fingerprint(),
                          intent=INTENT, stages=(Stage(node="edge-a", first_layer=0, last_layer=14),
                                                 Stage(node="edge-b", first_layer=15, last_layer=29)))
    svc = Service.launch(cluster, approve(start, cluster, policy, INTENT, load_model_spec("smollm2-135m")),
                         RandomSource(cfg, seed=3), EngineConfig(max_num_seqs=4, max_model_len=256, block_size=16),
                         policy=policy, threads_per_worker=1)
    try:
        with serve_app(create_app(svc, admin_tokens=[TOKEN])) as url:
            yield svc, url, cluster_file
    finally:
        svc.close()


def test_consolidates_live_then_a_drained_node_is_left_at_once(served, tmp_path):
    from executor.engine import SamplingParams
    svc, url, cluster_file = served
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    reference = svc.generate([5, 6, 7], params).token_ids
    policy = load_policy(ROOT / "scenarios/local/policy.yaml")
    journal = Journal(tmp_path / "journal.jsonl")
    target = ServerTarget(url, cluster_file, admin_token=TOKEN)
    ap = Autopilot(target, INTENT, policy, load_model_spec("smollm2-135m"),
                   AutopilotConfig(mode="auto", hysteresis=1, cooldown_s=600.0), journal=journal)
    (fut,) = submit_all(svc, [[5, 6, 7]], params)                 # in flight while the plan changes
    d = ap.tick()
    # onto one node: a consolidation, or a scale-up when the measured stage times put the two CPU stages
    # over their headroom at this window's two requests (capacity counts each request's TTFT as well as
    # its decode) and the single node, with no hop, carries more
    assert d.status == "applied" and d.action == "change", (d.reason, d.apply)
    assert "consolidate" in d.reason or ("scale up" in d.reason and "over the 80% headroom" in d.reason), d.reason
    assert len(svc.plan.plan.stages) == 1 and d.apply["state"] == "done" and d.apply["pause_ms"] > 0
    out, err = fut.result(timeout=120)
    assert err is None and out.token_ids == reference             # the in-flight request never noticed
    # the operator drains the node that now serves everything: the controller leaves it in the next
    # interval, though the cooldown of the change it just made has 600 s to run
    node = svc.plan.plan.stages[0].node
    text = cluster_file.read_text()
    time.sleep(0.01)
    cluster_file.write_text(text.replace(f"{{name: {node}, ", f"{{name: {node}, state: draining, "))
    try:
        assert target.lost_nodes() == {node: "draining in cluster.yaml"}
        d = ap.tick()
        assert d.action == "replan" and d.status == "applied", (d.reason, d.validation, d.apply)
        assert node not in svc.plan.plan.nodes and f"{node} lost" in d.reason
    finally:
        cluster_file.write_text(text)
    kinds = [e["kind"] for e in journal.entries()]
    assert kinds.count("decision") == 2 and kinds.count("apply") == 2 and journal.verify().ok


def test_cli_advisory_prints_decisions_and_changes_nothing(served, tmp_path, capsys, monkeypatch):
    svc, url, cluster_file = served
    before = svc.plan.plan.placement_key()
    intent = tmp_path / "intent.md"
    intent.write_text(f"---\ncluster: {cluster_file}\npolicy: {ROOT / 'scenarios/local/policy.yaml'}\n"
                      "data_class: public\nautopilot:\n  hysteresis: 1\n  interval_s: 0.2\n---\n"
                      "Public demo traffic; keep it as cheap as you can.\n")
    rc, out, err = run_cli(capsys, monkeypatch, "autopilot", "--intent", intent, "--server", url, "--mode", "advisory",
                           "--ticks", "2", "--json", "--admin-token", TOKEN, "--journal", tmp_path / "j.jsonl")
    assert rc == 0, err
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert len(lines) == 2 and all(x["status"] in ("held", "advised") for x in lines), lines
    assert all(x["current"] and x["forecast"]["horizon_s"] == 300.0 for x in lines)
    assert svc.plan.plan.placement_key() == before
    # a wrong token is bad input that names what to fix
    rc, out, err = run_cli(capsys, monkeypatch, "autopilot", "--intent", intent, "--server", url, "--ticks", "1",
                           "--admin-token", "wrong")
    assert rc == 2 and "admin token" in err


def test_a_bad_knob_in_the_front_matter_stops_before_anything_runs(tmp_path, capsys, monkeypatch):
    intent = tmp_path / "intent.md"
    intent.write_text("---\ncluster: x.yaml\nautopilot:\n  cooldown_s: soon\n---\nKeep it cheap.\n")
    rc, out, err = run_cli(capsys, monkeypatch, "autopilot", "--intent", intent, "--server", "http://127.0.0.1:9")
    assert rc == 2 and "intent.md:4: autopilot.cooldown_s: 'soon' must be a number >= 0" in err.replace("\n", "")


def test_no_service_at_the_url_is_a_clear_error(tmp_path, capsys, monkeypatch):
    intent = tmp_path / "intent.md"
    intent.write_text(f"---\ncluster: {ROOT / 'scenarios/local/cluster.yaml'}\n"
                      f"policy: {ROOT / 'scenarios/local/policy.yaml'}\n---\nKeep it cheap.\n")
    rc, out, err = run_cli(capsys, monkeypatch, "autopilot", "--intent", intent, "--server", "http://127.0.0.1:9")
    assert rc == 1 and "cannot reach the service at http://127.0.0.1:9" in err.replace("\n", "")
