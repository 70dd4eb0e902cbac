"""`continuo parse`, `continuo apply --dry-run` on the scenarios' intent files, and bad input -> exit 2."""
import json
from pathlib import Path

import pytest

from tiny_service import run_cli as run

ROOT = Path(__file__).resolve().parent.parent
INTENTS = sorted((ROOT / "scenarios").glob("*/intents/*.md"))


def test_every_scenario_has_intent_files():
    scenarios = {p.parent.parent.name for p in INTENTS}
    assert {"local", "hospital", "retail", "serverless"} <= scenarios


def test_parse_json_prints_the_intent_spec(capsys, monkeypatch):
    rc, out, _ = run(capsys, monkeypatch, "parse", ROOT / "scenarios/local/intents/drain-edge-b.md", "--json",
                     "--no-llm")
    body = json.loads(out)
    assert rc == 0 and body["ok"]
    assert body["spec"]["data_class"] == "phi" and body["spec"]["exclude_nodes"] == ["edge-b"]
    assert body["spec"]["service"] == "discharge-letters" and body["sources"]["service"] == "front matter"


@pytest.mark.parametrize("path", INTENTS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_apply_dry_run_on_scenario_files(capsys, monkeypatch, path):
    rc, out, _ = run(capsys, monkeypatch, "apply", path, "--dry-run", "--json", "--no-llm")
    body = json.loads(out.strip().splitlines()[-1])
    assert rc == 0, body
    assert body["status"] in ("dry-run", "suggested") and body["report"]["violations"] == []
    assert body["current"] is None and {r["action"] for r in body["diff"]} == {"+"}
    layers = [s["last_layer"] - s["first_layer"] + 1 for s in body["plan"]["stages"]]
    assert sum(layers) == sum(r["last_layer"] - r["first_layer"] + 1 for r in body["diff"])


def test_cluster_and_policy_options_override_the_front_matter(capsys, monkeypatch, tmp_path):
    f = tmp_path / "i.md"
    f.write_text("---\ncluster: nowhere.yaml\npolicy: nowhere.yaml\n---\nPatient letters, edge only.\n")
    local = ROOT / "scenarios/local"
    rc, out, _ = run(capsys, monkeypatch, "apply", f, "--dry-run", "--json", "--no-llm",
                     "--cluster", local / "cluster.yaml", "--policy", local / "policy.yaml")
    assert rc == 0 and json.loads(out)["plan"]["stages"][0]["node"] in ("edge-a", "edge-b")


def test_human_output_shows_diff_plan_and_report(capsys, monkeypatch):
    rc, out, _ = run(capsys, monkeypatch, "apply", ROOT / "scenarios/local/intents/edge-only.md", "--dry-run",
                     "--no-llm")
    assert rc == 0 and "Plan diff" in out and "Validator: 0 violation(s)" in out and "dry-run" in out


@pytest.mark.parametrize("text, field", [
    ("---\ncluster: ../c.yaml\ncolour: red\n---\nPatient letters.\n", "colour"),
    ("---\nmode: yolo\n---\nPatient letters.\n", "mode"),
    ("---\npolicy: p.yaml\n---\nPatient letters.\n", "cluster"),
    ("---\ncluster: c.yaml\n", None),
    ("---\n---\n\n", None),
])
def test_bad_intent_file_exits_2_naming_the_file(capsys, monkeypatch, tmp_path, text, field):
    f = tmp_path / "bad.md"
    f.write_text(text)
    rc, out, err = run(capsys, monkeypatch, "apply", f, "--dry-run", "--no-llm")
    assert rc == 2 and "bad.md" in err and out == ""
    if field:
        assert field in err


def test_incomplete_intent_asks_and_exits_1(capsys, monkeypatch, tmp_path):
    f = tmp_path / "vague.md"
    local = ROOT / "scenarios/local"
    f.write_text(f"---\ncluster: {local / 'cluster.yaml'}\npolicy: {local / 'policy.yaml'}\n---\n"
                 "Make it faster, first token under 300 ms.\n")
    rc, out, _ = run(capsys, monkeypatch, "parse", f, "--json", "--no-llm")
    body = json.loads(out)
    assert rc == 1 and body["status"] == "needs-clarification" and "phi" in body["questions"][0]


def test_apply_without_a_service_says_so(capsys, monkeypatch):
    rc, out, err = run(capsys, monkeypatch, "apply", ROOT / "scenarios/local/intents/edge-only.md", "--yes",
                       "--no-llm", "--server", "http://127.0.0.1:9")
    assert rc == 1 and "cannot reach the service" in err and "--dry-run" in err


def test_apply_through_the_admin_api(capsys, monkeypatch):
    """The HTTP client sends only approved plans, as {"plan", "method"}; a missing endpoint is a clear error."""
    import httpx

    from agent import Agent
    from agent.remote import RemoteError, RemoteService
    from policies import load_cluster, load_plan, load_policy
    local = ROOT / "scenarios/local"
    live = load_plan(local / "plan-2stage.yaml")
    posted, endpoints = [], {"/admin/plan", "/admin/reconfigure"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path not in endpoints:
            return httpx.Response(404, json={"detail": "Not Found"})
        if request.url.path == "/admin/plan":
            return httpx.Response(200, json={"model": live.model, "plan": live.model_dump(mode="json")})
        posted.append(json.loads(request.content))
        return httpx.Response(200, json={"report": {"state": "done", "method": "live", "pause_ms": 2.0}})

    remote = RemoteService("http://svc", client=httpx.Client(transport=httpx.MockTransport(handler)))
    agent = Agent(load_cluster(local / "cluster.yaml"), load_policy(local / "policy.yaml"), executor=remote,
                  mode="auto", use_llm=False)
    out = agent.apply("Patient letters; edge-b is going into maintenance.")
    assert out.applied and out.reconfig["pause_ms"] == 2.0 and out.current == live
    assert posted[0]["method"] == "live" and "edge-b" not in [s["node"] for s in posted[0]["plan"]["stages"]]
    endpoints.discard("/admin/reconfigure")     # a service without the endpoint yet
    failed = agent.apply("Patient letters; keep edge-a out of it.")
    assert failed.status == "failed" and "no /admin/reconfigure endpoint" in failed.message
    assert isinstance(RemoteError("x"), RuntimeError)


def test_apply_reconfigures_a_live_service_over_http(capsys, monkeypatch, tmp_path):
    """`continuo apply --yes` against a real service (worker processes, uvicorn, /admin/reconfigure):
    the intent's plan goes live while a request streams, and the request still finishes identical."""
    import threading
    import time
    from concurrent.futures import Future

    import uvicorn

    from executor.api import create_app
    from executor.engine import EngineConfig, SamplingParams
    from executor.model import ModelConfig
    from executor.runtime import free_port
    from executor.service import Listener, Service
    from executor.weights import RandomSource
    from policies import approve, load_cluster, load_model_spec, load_plan, load_policy

    # the local scenario's plans are for SmolLM2's 30 layers: a random model of that depth, tiny width
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=30, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position=256, eos_token_ids=())
    local = ROOT / "scenarios/local"
    cluster, policy = load_cluster(local / "cluster.yaml"), load_policy(local / "policy.yaml")
    start = load_plan(local / "plan-2stage.yaml").model_copy(update={"cluster_fingerprint": cluster.fingerprint()})
    validated = approve(start, cluster, policy, start.intent, load_model_spec("smollm2-135m"))
    svc = Service.launch(cluster, validated, RandomSource(cfg, seed=3),
                         EngineConfig(max_num_seqs=4, max_model_len=256, num_kv_blocks=64, block_size=16),
                         policy=policy)
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=free_port(), log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        while not server.started:
            time.sleep(0.05)
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        reference = svc.generate([1, 2, 3], params).token_ids
        done: Future = Future()
        svc.submit([1, 2, 3], params, Listener(on_done=lambda out, err: done.set_result((out, err))))
        url = f"http://127.0.0.1:{server.config.port}"
        rc, out, err = run(capsys, monkeypatch, "apply", local / "intents/maintenance.md", "--yes", "--no-llm",
                           "--json", "--server", url)
        result = json.loads(out.strip().splitlines()[-1])
        assert rc == 0 and result["status"] == "applied", (result["message"], err)
        assert result["reconfig"]["state"] == "done" and result["reconfig"]["pause_ms"] > 0
        assert "edge-b" not in [s["node"] for s in result["plan"]["stages"]]
        assert {n["node"]: n["layers"] for n in svc.node_states()}["edge-b"] in ([], None)
        output, error = done.result(timeout=120)
        assert error is None and output.token_ids == reference
        # the service's own record of it, as an operator would read it
        import httpx
        history = httpx.get(f"{url}/admin/reconfigurations").json()["history"]
        assert history[-1]["state"] == "done" and history[-1]["method"] == "live"
        # and back with `continuo apply-plan`, which follows the phases as they happen (the plan
        # carries the fingerprint of the cluster state it was made from, as the freshness rule asks)
        back_file = tmp_path / "back.json"
        back_file.write_text(start.model_dump_json())
        rc, out, err = run(capsys, monkeypatch, "apply-plan", back_file, "--json", "--server", url)
        back = json.loads(out.strip().splitlines()[-1])
        assert rc == 0 and back["ok"] and back["reconfiguration"]["state"] == "done", (out, err)
        assert svc.plan.plan.placement_key() == start.placement_key()
    finally:
        server.should_exit = True
        svc.close()
