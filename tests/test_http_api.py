"""The OpenAI-compatible API through the official `openai` client, over a 2-worker pipeline."""
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from executor.api import create_app
from executor.engine import Engine, EngineConfig, SamplingParams
from executor.model import ModelConfig
from executor.runtime import free_port
from executor.service import Service
from executor.stage import build_stages
from executor.weights import RandomSource, open_source
from policies import ModelSpec, PlacementPlan, Stage, approve, load_cluster, load_policy

# A tiny random model with SmolLM2's vocabulary, so the real tokenizer and chat template apply.
CFG = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=5, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position=1024, tie_embeddings=True, eos_token_ids=(2,))
SRC = RandomSource(CFG, seed=11)
EC = EngineConfig(max_num_seqs=8, max_waiting=4, max_model_len=512, num_kv_blocks=128, block_size=16)


@pytest.fixture(scope="module")
def tokenizer():
    return open_source(None).tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    cluster, policy = load_cluster("scenarios/local/cluster.yaml"), load_policy("scenarios/local/policy.yaml")
    plan = PlacementPlan(model="tiny-smol", data_class="public", cluster_fingerprint=cluster.fingerprint(),
                         stages=(Stage(node="edge-a", first_layer=0, last_layer=1),
                                 Stage(node="edge-b", first_layer=2, last_layer=4)))
    vp = approve(plan, cluster, policy, None, ModelSpec.from_hf_config(CFG.to_hf(), name="tiny-smol", dtype="fp32"))
    svc = Service.launch(cluster, vp, SRC, EC, tokenizer=tokenizer)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    yield svc, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)
    svc.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def reference(tokenizer, prompt_ids, max_tokens):
    eng = Engine(build_stages(SRC, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC, tokenizer,
                 CFG.eos_token_ids)
    return eng.generate([prompt_ids], SamplingParams(max_tokens=max_tokens))[0]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-smol"]


def test_completion_matches_engine_and_counts_usage(client, tokenizer):
    r = client.completions.create(model="tiny-smol", prompt="The weather today", max_tokens=8, temperature=0)
    ref = reference(tokenizer, tokenizer.encode("The weather today", add_special_tokens=False), 8)
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens == len(ref.prompt_ids)
    assert r.choices[0].finish_reason == ref.finish_reason


def test_chat_streaming_and_not_agree(client):
    msgs = [{"role": "user", "content": "Say hello"}]
    full = client.chat.completions.create(model="tiny-smol", messages=msgs, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-smol", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.choices[0].message.role == "assistant"


def test_concurrent_requests(client):
    results = [None] * 6
    seeds = [0, 1, 2, 0, 1, 2]

    def go(i):
        results[i] = client.completions.create(model="tiny-smol", prompt=f"Item {i % 3}:", max_tokens=6,
                                               temperature=0.8, seed=seeds[i]).choices[0].text
    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert all(r is not None for r in results)
    assert results[:3] == results[3:]          # same prompt + seed -> same text, batched or not


@pytest.mark.parametrize("body,status,words", [
    ({"model": "tiny-smol"}, 400, "prompt"),
    ({"model": "tiny-smol", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny-smol", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "not served here"),
    ({"model": "tiny-smol", "prompt": "x", "max_tokens": 5000}, 400, "context window"),
    ({"model": "tiny-smol", "prompt": "x", "n": 3}, 400, "n"),
])
def test_bad_requests_get_openai_errors(server, body, status, words):
    r = httpx.post(server[1] + "/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["type"]
    # The server keeps serving.
    assert httpx.get(server[1] + "/health").json()["status"] == "ok"


def test_malformed_json_and_chat_roles(server):
    r = httpx.post(server[1] + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server[1] + "/v1/chat/completions", json={"model": "tiny-smol", "messages": [{"role": "wizard",
                                                                                                  "content": "hi"}]})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_metrics_health_admin(server, client):
    client.completions.create(model="tiny-smol", prompt="hello", max_tokens=4, temperature=0)
    m = httpx.get(server[1] + "/metrics").text
    for name in ("continuo_ttft_seconds_bucket", "continuo_tpot_seconds", "continuo_token_gap_seconds",
                 "continuo_queue_depth", 'continuo_stage_step_seconds{node="edge-a"}', 'continuo_node_up{node="edge-b"} 1.0'):
        assert name in m, name
    plan = httpx.get(server[1] + "/admin/plan").json()
    assert [s["node"] for s in plan["plan"]["stages"]] == ["edge-a", "edge-b"]
    nodes = {n["node"]: n for n in httpx.get(server[1] + "/admin/nodes").json()["nodes"]}
    assert nodes["edge-a"]["layers"] == [[0, 2]] and nodes["cloud-1"]["layers"] == []
    assert nodes["edge-b"]["rss_bytes"] > 0


def test_queue_full_is_429(server):
    svc, url = server
    # Fill the waiting queue behind long requests, then one more is refused with 429.
    with httpx.Client(timeout=60) as h:
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(h.post(url + "/v1/completions", json={
            "model": "tiny-smol", "prompt": [1, 2, 3], "max_tokens": 60, "temperature": 0}).status_code))
            for _ in range(8 + 4 + 4)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    assert 429 in statuses and 200 in statuses
