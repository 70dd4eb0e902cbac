"""`continuo parse`, `continuo apply --dry-run` on the scenarios' intent files, and bad input -> exit 2."""
import json
import sys
from pathlib import Path

import pytest

from agent.cli import main

ROOT = Path(__file__).resolve().parent.parent
INTENTS = sorted((ROOT / "scenarios").glob("*/intents/*.md"))


def run(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["continuo", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


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
