"""Stages over worker processes (torch.distributed, gloo): same tokens as one process, joins
over TCP rendezvous, a killed worker fails its requests instead of hanging."""
import os
import signal
import subprocess
import sys
import threading
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
        pipe, depth = svc.engine.stages[0], [0, 0]      # steps launched, most in flight at once
        launch, finish = pipe.launch, pipe.finish
        pipe.launch = lambda b: (depth.__setitem__(0, depth[0] + 1),
                                 depth.__setitem__(1, max(depth)), launch(b))[-1]
        pipe.finish = lambda t: (depth.__setitem__(0, depth[0] - 1), finish(t))[-1]
        results = run_all(svc, PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
        assert [err for _, err in results] == [None] * len(PROMPTS)
        assert [out.token_ids for out, _ in results] == reference
        # one group of requests per stage in flight at once (activations of different groups share
        # every link, in launch order, with no deadlock)
        assert svc.engine.groups == len(stages) and depth[1] == len(stages)
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


def _worker(port, node, token, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "CONTINUO_JOIN_TOKEN"}
    if token is not None:
        env["CONTINUO_JOIN_TOKEN"] = token
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "worker", "--join", f"127.0.0.1:{port}",
                             "--node", node, "--threads", "1", "--timeout", str(timeout)], env=env,
                            stderr=subprocess.PIPE, text=True)


def test_workers_join_over_tcp_rendezvous_with_the_join_token(reference, monkeypatch):
    """The path a remote host takes: `continuo worker --join HOST:PORT --node NAME`, proving the join
    token; a worker with a wrong token is refused (it says so, and so does the driver) and the nodes
    that prove it make the service."""
    port = free_port()
    monkeypatch.setenv("CONTINUO_JOIN_TOKEN", "right-token")
    rogue = _worker(port, "edge-a", "wrong-token")
    procs = [_worker(port, n, "right-token") for n in ("edge-b", "cloud-1")]
    try:
        launched = {}
        th = threading.Thread(target=lambda: launched.setdefault("svc", Service.launch(
            CLUSTER, validated([("edge-b", 0, 3), ("cloud-1", 4, 6)]), SRC, EC, join_at=("127.0.0.1", port),
            timeout=60)))
        th.start()
        assert rogue.wait(timeout=60) == 3
        said = rogue.stderr.read()
        assert "refused node edge-a" in said and "join token does not match" in said, said
        procs.append(_worker(port, "edge-a", "right-token"))
        th.join(90)
        svc = launched["svc"]
        try:
            results = run_all(svc, PROMPTS[:3], SamplingParams(max_tokens=12, ignore_eos=True))
            assert [out.token_ids for out, _ in results] == reference[:3]
            # a process that reaches the store port later, without the token, is never admitted, and
            # the service keeps serving
            late = _worker(port, "edge-a", "guessed", timeout=3)
            assert late.wait(timeout=30) == 3 and "not admitted" in late.stderr.read()
            results = run_all(svc, PROMPTS[:2], SamplingParams(max_tokens=12, ignore_eos=True))
            assert [out.token_ids for out, _ in results] == reference[:2]
        finally:
            svc.close()
        for p in procs:
            assert p.wait(timeout=20) == 0
    finally:
        for p in procs + [rogue]:
            if p.poll() is None:
                p.kill()


def test_no_join_token_no_remote_workers(monkeypatch):
    monkeypatch.delenv("CONTINUO_JOIN_TOKEN", raising=False)
    with pytest.raises(ValueError, match="CONTINUO_JOIN_TOKEN"):
        Service.launch(CLUSTER, validated([("edge-a", 0, 6)]), SRC, EC, join_at=("127.0.0.1", free_port()), timeout=5)
    worker = _worker(free_port(), "edge-a", None, timeout=5)
    assert worker.wait(timeout=30) == 3 and "no join token" in worker.stderr.read()


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


def test_a_worker_error_in_a_step_reaches_the_driver_with_its_words():
    """A step the worker cannot run (here: a route naming layers it does not hold) ends the worker,
    and the requests fail with that worker's name and its error, not a bare connection reset."""
    svc = Service.launch(CLUSTER, validated([("edge-a", 0, 3), ("edge-b", 4, 6)]), SRC, EC)
    try:
        svc.loop.call(lambda: setattr(svc.runtime.placement[1], "start", 5))   # the driver's routing is now wrong
        futs = submit_all(svc, PROMPTS[:1], SamplingParams(max_tokens=5, ignore_eos=True))
        out, err = futs[0].result(60)
        assert out is None and "edge-b" in err and "asked for layers [5, 7)" in err, err
        assert "asked for layers [5, 7)" in svc.health()["nodes"]["edge-b"]
        with pytest.raises(ServiceUnavailable, match="edge-b"):
            svc.submit(PROMPTS[1], SamplingParams(max_tokens=2), Listener())
    finally:
        svc.close()
