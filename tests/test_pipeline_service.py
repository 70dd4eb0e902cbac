"""Stages over worker processes (torch.distributed, gloo): same tokens as one process, joins
over TCP rendezvous, a killed worker fails its requests instead of hanging."""
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_service import CFG, CLUSTER, reference_tokens, submit_all, validated

from executor.engine import EngineConfig, SamplingParams
from executor.runtime import free_port
from executor.service import Listener, Service, ServiceUnavailable
from executor.weights import RandomSource

SRC = RandomSource(CFG, seed=3)
EC = EngineConfig(max_num_seqs=8, max_model_len=256, num_kv_blocks=128, block_size=16)
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40)), [100] * 17, [5, 6], [42, 43, 44, 45]]


@pytest.fixture(scope="module")
def reference():
    return reference_tokens(SRC, EC, PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))


def run_all(service, prompts, params):
    return [f.result(120) for f in submit_all(service, prompts, params)]


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
        futs = submit_all(svc, PROMPTS[:3], SamplingParams(max_tokens=200, ignore_eos=True))
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
