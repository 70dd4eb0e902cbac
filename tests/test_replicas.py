"""Replicas: a second pipeline of the same model on nodes of its own, added while the plan serves,
drained without losing a request, and failing alone when its worker dies."""
import os
import signal
import threading
import time

import pytest
from tiny_service import CFG, CLUSTER, POLICY, reference_tokens, submit_all, validated

from executor.engine import EngineConfig, SamplingParams
from executor.reconfig import ReconfigurationError
from executor.service import Service, ServiceUnavailable
from executor.service import ReplicaError
from executor.weights import RandomSource

SRC = RandomSource(CFG, seed=5)
EC = EngineConfig(max_num_seqs=8, max_model_len=256, num_kv_blocks=128, block_size=16)
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40)), [100] * 17, [5, 6], [42, 43, 44, 45],
           [7] * 9, [3, 1, 4, 1, 5, 9, 2, 6]]
LONG = SamplingParams(max_tokens=40, ignore_eos=True)
WHOLE = CFG.num_layers - 1


@pytest.fixture(scope="module")
def reference():
    return reference_tokens(SRC, EC, PROMPTS, LONG)


@pytest.fixture
def svc():
    s = Service.launch(CLUSTER, validated([("edge-a", 0, WHOLE)]), SRC, EC, policy=POLICY)
    yield s
    s.close()


def counted(engine) -> list:
    """The requests an engine is handed, counted as they come."""
    seen, add = [], engine.add_request
    engine.add_request = lambda *a, **k: seen.append(add(*a, **k)) or seen[-1]
    return seen


def test_a_replica_serves_beside_the_plan_with_the_same_tokens(svc, reference):
    rep = svc.add_replica(validated([("edge-b", 0, 3), ("cloud-1", 4, WHOLE)]))
    assert rep.name == "r1" and rep.state == "serving" and rep.engine.groups == 2
    on_plan, on_replica = counted(svc.engine), counted(rep.engine)
    results = [f.result(120) for f in submit_all(svc, PROMPTS, LONG)]
    assert [err for _, err in results] == [None] * len(PROMPTS)
    assert [out.token_ids for out, _ in results] == reference      # whichever pipeline served it
    # joined the shortest queue: submitted at once, they split between the two pipelines
    assert len(on_plan) == len(on_replica) == len(PROMPTS) // 2
    layers = {n["node"]: n["layers"] for n in svc.node_states()}
    assert layers == {"edge-a": [[0, WHOLE + 1]], "edge-b": [[0, 4]], "cloud-1": [[4, WHOLE + 1]]}
    assert [r["name"] for r in svc.replicas()] == ["r1"] and svc.replicas()[0]["nodes"] == ["edge-b", "cloud-1"]
    # telemetry keeps each pipeline's TTFT and TPOT beside the service's
    w = svc.telemetry.snapshot()["windows"]["60s"]
    assert {k: v["tpot_s"]["n"] for k, v in w["pipelines"].items()} == {"plan": 4, "r1": 4}
    assert w["tpot_s"]["n"] == 8


def test_pipelines_keep_off_each_others_nodes(svc):
    with pytest.raises(ReplicaError, match=r"edge-a \(the plan\)"):
        svc.add_replica(validated([("edge-a", 0, 3), ("edge-b", 4, WHOLE)]))
    assert svc.runtime.replica_nodes == set()            # nothing half-reserved by the refusal
    svc.add_replica(validated([("edge-b", 0, WHOLE)]), name="edge")
    with pytest.raises(ReplicaError, match=r"edge-b \(edge\)"):
        svc.add_replica(validated([("edge-b", 0, WHOLE)]))
    with pytest.raises(ReplicaError, match="taken"):
        svc.add_replica(validated([("cloud-1", 0, WHOLE)]), name="edge")
    # the plan's own reconfiguration may not move onto a replica's node
    live = svc.plan.plan
    with pytest.raises(ReconfigurationError, match=r"edge-b \(edge\).*drain that replica"):
        svc.reconfigure(validated([("edge-a", 0, 3), ("edge-b", 4, WHOLE)], current=live))
    # ... and may onto a node no pipeline holds, while the replica serves on
    rep = svc.reconfigure(validated([("edge-a", 0, 3), ("cloud-1", 4, WHOLE)], current=live))
    assert rep.state == "done", rep.error
    out = svc.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_draining_a_replica_loses_no_request(svc, reference):
    rep = svc.add_replica(validated([("edge-b", 0, WHOLE)]))
    on_replica = counted(rep.engine)
    futs = submit_all(svc, PROMPTS, LONG)
    deadline = time.monotonic() + 60
    while not any(s.output_ids for s in list(rep.engine.seqs.values())) and time.monotonic() < deadline:
        time.sleep(0.01)                                  # the replica is mid-decode
    assert on_replica and rep.engine.seqs
    drained = threading.Thread(target=svc.drain_replica, args=("r1",))
    drained.start()
    time.sleep(0.05)
    later = submit_all(svc, PROMPTS[:2], LONG)            # arrive while it drains: the plan takes them
    drained.join(120)
    assert rep.state == "drained" and svc.replicas() == []
    results = [f.result(120) for f in futs + later]
    assert [err for _, err in results] == [None] * len(results)
    assert [out.token_ids for out, _ in results] == reference + reference[:2]
    assert len(on_replica) == len(PROMPTS) // 2           # nothing new went to it once it drained
    assert {n["node"]: n["layers"] for n in svc.node_states()}["edge-b"] == []
    assert svc.runtime.replica_nodes == set()
    svc.add_replica(validated([("edge-b", 0, WHOLE)]))   # the node is free for a pipeline again
    with pytest.raises(ReplicaError, match="no replica named 'nope'"):
        svc.drain_replica("nope")


def test_a_replica_whose_worker_dies_fails_alone(svc, reference):
    rep = svc.add_replica(validated([("edge-b", 0, WHOLE)]))
    on_plan, on_replica = counted(svc.engine), counted(rep.engine)
    futs = submit_all(svc, PROMPTS, SamplingParams(max_tokens=200, ignore_eos=True))
    deadline = time.monotonic() + 60
    while not any(s.output_ids for s in list(rep.engine.seqs.values())) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(svc.runtime.procs["edge-b"].pid, signal.SIGKILL)
    results = [f.result(60) for f in futs]
    failed = [err for out, err in results if out is None]
    assert len(failed) == len(on_replica) and all("edge-b" in e for e in failed), failed
    assert sum(out is not None for out, _ in results) == len(on_plan)
    assert rep.state == "failed" and "edge-b" in rep.error
    # the plan serves on, and takes every new request
    out = svc.generate(PROMPTS[0], LONG)
    assert out.token_ids == reference[0]
    svc.drain_replica("r1")                                # a failed replica is released at once
    assert svc.replicas() == [] and svc.runtime.replica_nodes == set()
    with pytest.raises(ReplicaError, match="edge-b .dead"):
        svc.add_replica(validated([("edge-b", 0, WHOLE)]))


def test_no_replica_on_a_broken_or_one_process_service(svc):
    os.kill(svc.runtime.procs["edge-a"].pid, signal.SIGKILL)
    with pytest.raises(ServiceUnavailable):
        svc.generate([1, 2], SamplingParams(max_tokens=2), timeout=30)
    with pytest.raises(ServiceUnavailable):
        svc.add_replica(validated([("edge-b", 0, WHOLE)]))


def test_the_admin_api_adds_lists_refuses_and_drains_replicas(svc):
    from starlette.testclient import TestClient

    from executor.api import create_app
    c = TestClient(create_app(svc), raise_server_exceptions=False)

    def plan(stages, data_class="public", fingerprint=True):
        body = validated(stages, data_class="public").plan.model_dump(mode="json")
        body["data_class"] = data_class
        if not fingerprint:
            body["cluster_fingerprint"] = None
        return body
    r = c.post("/admin/replicas", json={"plan": plan([("edge-b", 0, 3), ("cloud-1", 4, WHOLE)]), "name": "spare"})
    assert r.status_code == 200 and r.json()["state"] == "serving", r.text
    assert r.json()["stages"] == [{"node": "edge-b", "start": 0, "stop": 4}, {"node": "cloud-1", "start": 4, "stop": 7}]
    assert [x["name"] for x in c.get("/admin/replicas").json()["replicas"]] == ["spare"]
    # the service answers over both pipelines
    for _ in range(2):
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3}).status_code == 200
    # refused: nodes taken (409), no fingerprint (400), a plan the validator rejects (422), a bad name (400)
    r = c.post("/admin/replicas", json={"plan": plan([("edge-b", 0, WHOLE)])})
    assert r.status_code == 409 and r.json()["error"]["code"] == "replica_refused" and "edge-b (spare)" in r.text
    r = c.post("/admin/replicas", json={"plan": plan([("edge-b", 0, WHOLE)], fingerprint=False)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "plan" and "cluster_fingerprint" in r.text
    r = c.post("/admin/replicas", json={"plan": plan([("cloud-1", 0, WHOLE)], data_class="phi")})
    assert r.status_code == 422 and r.json()["report"]["violations"], r.text
    r = c.post("/admin/replicas", json={"plan": plan([("cloud-1", 0, WHOLE)]), "name": "no spaces"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert [x["name"] for x in svc.replicas()] == ["spare"]          # the refusals added nothing
    assert c.delete("/admin/replicas/nosuch").status_code == 404
    r = c.delete("/admin/replicas/spare", params={"wait": "true"})
    assert r.status_code == 200 and r.json()["state"] == "drained", r.text
    assert c.get("/admin/replicas").json() == {"replicas": []}
    assert svc.runtime.replica_nodes == set()


def test_the_autopilot_adds_a_real_replica_under_load_and_drains_it_when_load_falls(svc, reference):
    """The controller against the real service (ServiceTarget: worker processes, the validator, the
    service's own checks); only the load it reads is scripted. Requests sent meanwhile all finish."""
    from agent.autopilot import Autopilot, AutopilotConfig
    from agent.autopilot.server_target import ServiceTarget
    from policies import IntentSpec
    from tiny_service import SPEC

    class Scripted(ServiceTarget):
        t, rate = 0.0, 0.0

        def now(self):
            return self.t

        def snapshot(self):
            return {"now": {"queue_depth": 0, "running": 0},
                    "windows": {"10s": {"arrival_rate": self.rate, "output_tokens_per_s": 0.0, "span_s": 10.0,
                                        "ttft_s": {"p50": None, "p99": None, "n": 0},
                                        "tpot_s": {"p50": None, "p99": None, "n": 0}}}}
    tg = Scripted(svc)
    ap = Autopilot(tg, IntentSpec(data_class="public"), POLICY, SPEC,
                   AutopilotConfig(mode="auto", hysteresis=1, cooldown_s=0.0, alpha=1.0, beta=0.01, max_stages=3))
    most = max(ap._assess(p, CLUSTER, 0.0).capacity_rps for p in ap._plans(CLUSTER, {}, svc.plan.plan))

    def tick(rate):
        tg.rate = rate
        d = ap.tick()
        tg.t += 10.0
        return d
    added = next((d for d in (tick(3 * most) for _ in range(4)) if d.action == "add_replica"), None)
    assert added is not None and added.status == "applied", [(d.action, d.status, d.reason) for d in ap.decisions]
    [rep] = svc.replicas()
    assert rep["state"] == "serving" and not set(rep["nodes"]) & set(svc.plan.plan.nodes)
    # it serves: the same tokens, whichever pipeline takes each request
    futs = submit_all(svc, PROMPTS, LONG)
    drained = next((d for d in (tick(0.0) for _ in range(6)) if d.action == "drain_replica"), None)
    assert drained is not None and drained.status == "applied", [(d.action, d.status, d.reason) for d in ap.decisions]
    results = [f.result(120) for f in futs]
    assert [err for _, err in results] == [None] * len(PROMPTS)
    assert [out.token_ids for out, _ in results] == reference
    deadline = time.monotonic() + 60
    while svc.replicas() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc.replicas() == [] and svc.runtime.replica_nodes == set()
