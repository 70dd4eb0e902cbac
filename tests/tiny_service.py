"""Shared setup of the tests that run a service of worker processes on a tiny random model over
the local scenario's cluster: the model shape, plan approval, the one-process reference, and
submitting a batch of prompts."""
from concurrent.futures import Future
from contextlib import contextmanager

from executor.engine import Engine, EngineConfig, SamplingParams
from executor.model import ModelConfig
from executor.stage import build_stages
from policies import ModelSpec, PlacementPlan, Stage, approve, load_cluster, load_policy

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=7, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position=512, eos_token_ids=())
CLUSTER = load_cluster("scenarios/local/cluster.yaml")
POLICY = load_policy("scenarios/local/policy.yaml")
SPEC = ModelSpec.from_hf_config(CFG.to_hf(), name="tiny", dtype="fp32")


def validated(stages, current=None, data_class="public"):
    """The validator's approval of stages [(node, first_layer, last_layer), ...] (a transition from
    `current` when given)."""
    plan = PlacementPlan(model="tiny", data_class=data_class, cluster_fingerprint=CLUSTER.fingerprint(),
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
    return approve(plan, CLUSTER, POLICY, None, SPEC, current=current)


def reference_tokens(src, ec: EngineConfig, prompts, params: SamplingParams) -> list[list[int]]:
    """Greedy outputs of one in-process stage: what every split and every reconfiguration must match."""
    eng = Engine(build_stages(src, [0, CFG.num_layers], ec.num_kv_blocks, ec.block_size), ec)
    return [o.token_ids for o in eng.generate(prompts, params)]


def submit_all(svc, prompts, params: SamplingParams) -> list[Future]:
    """Submit every prompt; each future resolves to (output, error) when its request ends."""
    from executor.service import Listener
    futs = []
    for p in prompts:
        f: Future = Future()
        svc.submit(p, params, Listener(on_done=lambda out, err, f=f: f.set_result((out, err))))
        futs.append(f)
    return futs


@contextmanager
def serve_app(app):
    """An ASGI app on a real loopback socket (uvicorn in a thread): yields its base URL."""
    import threading
    import time

    import uvicorn

    from executor.runtime import free_port
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        srv.should_exit = True
        th.join(10)


def run_cli(capsys, monkeypatch, *args):
    """`continuo ARGS...` in this process: (exit code, stdout, stderr)."""
    import sys

    import pytest

    from agent.cli import main
    monkeypatch.setattr(sys, "argv", ["continuo", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err
