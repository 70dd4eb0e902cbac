"""Stages over worker processes (torch.distributed, gloo): same tokens as one process, joins
over TCP rendezvous, a killed worker fails its requests instead of hanging."""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future

import pytest

from executor.engine import Engine, EngineConfig, SamplingParams
from executor.model import ModelConfig
from executor.runtime import free_port
from executor.service import Listener, Service, ServiceUnavailable
from executor.stage import build_stages
from executor.weights import RandomSource
from policies import ModelSpec, PlacementPlan, Stage, approve, load_cluster, load_policy

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=7, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position=512, eos_token_ids=())
SRC = RandomSource(CFG, seed=3)
CLUSTER = load_cluster("scenarios/local/cluster.yaml")
POLICY = load_policy("scenarios/local/policy.yaml")
SPEC = ModelSpec.from_hf_config(CFG.to_hf(), name="tiny", dtype="fp32")
EC = EngineConfig(max_num_seqs=8, max_model_len=256, num_kv_blocks=128, block_size=16)
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40)), [100] * 17, [5, 6], [42, 43, 44, 45]]


def validated(stages, data_class="public"):
    plan = PlacementPlan(model="tiny", data_class=data_class, cluster_fingerprint=CLUSTER.fingerprint(),
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
    return approve(plan, CLUSTER, POLICY, None, SPEC)


@pytest.fixture(scope="module")
def reference():
    eng = Engine(build_stages(SRC, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC)
    return [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))]


def run_all(service, prompts, params):
    futs = []
    for p in prompts:
        f: Future = Future()
        service.submit(p, params, Listener(on_done=lambda out, err, f=f: f.set_result((out, err))))
        futs.append(f)
    return [f.result(120) for f in futs]


@pytest.mark.parametrize("stages", [
    [("edge-a", 0, 2), ("edge-b", 3, 6)],                       # 2 workers, uneven
    [("edge-a", 0, 0), ("cloud-1", 1, 5), ("edge-b", 6, 6)],    # 3 workers, very uneven
])
def test_pipelined_service_matches_one_process(stages, reference):
    svc = Service.launch(CLUSTER, validated(stages), SRC, EC)
    try:
        results = run_all(svc, PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
        assert [err for _, err in results] == [None] * len(PROMPTS)
        assert [out.token_ids for out, _ in results] == reference
        nodes = {n["node"]: n for n in svc.node_states()}
        # Each worker holds only its own layers; the idle node holds none.
        for n, a, b in stages:
            assert nodes[n]["layers"] == [[a, b + 1]]
        idle = set(nodes) - {n for n, _, _ in stages}
        assert all(nodes[n]["layers"] == [] for n in idle)
        sizes = {n: nodes[n]["weight_bytes"] for n, _, _ in stages}
        assert sizes[stages[0][0]] != sizes[stages[1][0]]
    finally:
        svc.close()


def test_only_validated_plans_are_served():
    plan = validated([("edge-a", 0, 6)]).plan
    with pytest.raises(TypeError, match="ValidatedPlan"):
        Service.launch(CLUSTER, plan, SRC, EC)
    stale = CLUSTER.with_state("cloud-1", "draining")
    with pytest.raises(ValueError, match="validate it again"):
        Service.launch(stale, validated([("edge-a", 0, 6)]), SRC, EC)


def test_workers_join_over_tcp_rendezvous(reference):
    """The path a remote host takes: `continuo worker --join HOST:PORT --node NAME`."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "agent.cli", "worker", "--join", f"127.0.0.1:{port}",
                               "--node", n, "--threads", "1"]) for n in ("edge-a", "edge-b", "cloud-1")]
    try:
        svc = Service.launch(CLUSTER, validated([("edge-b", 0, 3), ("cloud-1", 4, 6)]), SRC, EC,
                             join_at=("127.0.0.1", port), timeout=60)
        try:
            results = run_all(svc, PROMPTS[:3], SamplingParams(max_tokens=12, ignore_eos=True))
            assert [out.token_ids for out, _ in results] == reference[:3]
        finally:
            svc.close()
        for p in procs:
            assert p.wait(timeout=20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_killed_worker_fails_requests_not_hangs():
    svc = Service.launch(CLUSTER, validated([("edge-a", 0, 3), ("edge-b", 4, 6)]), SRC, EC)
    try:
        futs = []
        for p in PROMPTS[:3]:
            f: Future = Future()
            svc.submit(p, SamplingParams(max_tokens=200, ignore_eos=True),
                       Listener(on_done=lambda out, err, f=f: f.set_result((out, err))))
            futs.append(f)
        time.sleep(0.5)
        os.kill(svc.runtime.procs["edge-b"].pid, signal.SIGKILL)
        results = [f.result(30) for f in futs]
        assert all(out is None and "edge-b" in err for out, err in results), results
        h = svc.health()
        assert h["status"] == "degraded" and h["nodes"]["edge-b"].startswith("dead")
        with pytest.raises(ServiceUnavailable, match="edge-b"):
            svc.submit([1, 2], SamplingParams(max_tokens=2), Listener())
    finally:
        svc.close()
