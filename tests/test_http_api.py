"""The OpenAI-compatible API through the official `openai` client, over a 2-worker pipeline."""
import json
import threading

import httpx
import openai
import pytest

from tiny_service import serve_app

from executor.api import create_app
from executor.engine import Engine, EngineConfig, SamplingParams
from executor.model import ModelConfig
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
    try:
        with serve_app(create_app(svc)) as url:
            yield svc, url
    finally:
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
                 "continuo_queue_depth", 'continuo_stage_step_seconds{layers="0-2",node="edge-a",window="60s"}',
                 'continuo_node_up{node="edge-b"} 1.0'):
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


# --- structured outputs, tools and logprobs through real clients -------------------------------------

NODE_SCHEMA = {"type": "object", "properties": {"node": {"enum": ["edge-a", "edge-b", "cloud-1"]},
                                                "gpus": {"type": "integer", "minimum": 0, "maximum": 8},
                                                "trusted": {"type": "boolean"}},
               "required": ["node", "gpus", "trusted"]}
TOOLS = [{"type": "function", "function": {"name": "inspect_node", "description": "Show one node.",
                                           "parameters": {"type": "object", "properties": {
                                               "node": {"enum": ["edge-a", "edge-b", "cloud-1"]}},
                                               "required": ["node"]}}},
         {"type": "function", "function": {"name": "drain", "description": "Drain a node.",
                                           "parameters": {"type": "object", "properties": {
                                               "node": {"type": "string", "maxLength": 10},
                                               "minutes": {"type": "integer", "minimum": 1, "maximum": 60}},
                                               "required": ["node", "minutes"]}}}]


def _reference_text(tokenizer, messages, grammar, max_tokens=120):
    """What one in-process stage answers to the same chat under the same grammar."""
    from executor import chat_format
    eng = Engine(build_stages(SRC, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC, tokenizer,
                 CFG.eos_token_ids, CFG.vocab_size)
    ids = eng.chat_prompt(chat_format.render(messages, None, None))
    return eng.generate([ids], SamplingParams(max_tokens=max_tokens, grammar=grammar))[0].text


def test_json_schema_response_format(client, tokenizer):
    import jsonschema
    from executor import structured
    msgs = [{"role": "user", "content": "Describe node edge-a."}]
    r = client.chat.completions.create(model="tiny-smol", messages=msgs, max_tokens=120, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "node", "schema": NODE_SCHEMA, "strict": True}})
    data = json.loads(r.choices[0].message.content)
    jsonschema.validate(data, NODE_SCHEMA)
    # the 2-worker pipeline masks where the driver samples: the same text as one in-process stage
    assert r.choices[0].message.content == _reference_text(tokenizer, msgs, structured.json_schema(NODE_SCHEMA))
    sampled = client.chat.completions.create(model="tiny-smol", messages=msgs, max_tokens=120, temperature=1.0,
                                             seed=4, response_format={"type": "json_object"})
    assert isinstance(json.loads(sampled.choices[0].message.content), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "drain"}}])
def test_tool_calls_required_and_named(client, choice):
    import jsonschema
    r = client.chat.completions.create(model="tiny-smol", max_tokens=120, temperature=0, tools=TOOLS,
                                       tool_choice=choice, messages=[{"role": "user", "content": "Drain edge-b."}])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(choice, dict):
        assert call.function.name == "drain"
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_tool_call_deltas_reassemble(client):
    kw = dict(model="tiny-smol", max_tokens=120, temperature=0, tools=TOOLS, tool_choice="required",
              messages=[{"role": "user", "content": "Look at cloud-1."}])
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    parts = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(parts) > 2 and parts[0].id and parts[0].function.name == whole.function.name
    assert "".join(p.function.arguments or "" for p in parts) == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks)


def test_tool_results_go_back_through_the_chat_template(client):
    msgs = [{"role": "user", "content": "Look at edge-a."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "inspect_node", "arguments": "{\"node\": \"edge-a\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "edge-a: 1 L4, trusted, eu-west"}]
    r = client.chat.completions.create(model="tiny-smol", messages=msgs, tools=TOOLS, tool_choice="none",
                                       max_tokens=6, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens > 40
    auto = client.chat.completions.create(model="tiny-smol", messages=msgs, tools=TOOLS, max_tokens=60, temperature=0)
    m = auto.choices[0].message
    assert (m.tool_calls is None) != (m.content is None)       # words or a call, never both or neither


def test_logprobs_on_chat_and_completions(client):
    r = client.chat.completions.create(model="tiny-smol", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in lp)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in lp)     # greedy: the best token
    assert "".join(e.token for e in lp) == r.choices[0].message.content or r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny-smol", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, logprobs=True, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in lp])
    c = client.completions.create(model="tiny-smol", prompt="The weather", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 4 and len(c.choices[0].logprobs.top_logprobs[0]) == 2


def test_langchain_chat_openai_tools_and_structured_output(server):
    from typing import Literal

    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    # bounded fields: a random model fills an unbounded string until max_tokens
    class NodeFacts(BaseModel):
        node: Literal["edge-a", "edge-b"]
        gpus: int = Field(ge=0, le=8)

    @tool
    def inspect_node(node: Literal["edge-a", "edge-b", "cloud-1"]) -> str:
        """Show one node of the cluster."""
        return node

    llm = ChatOpenAI(model="tiny-smol", base_url=server[1] + "/v1", api_key="unused", temperature=0, max_tokens=80,
                     max_retries=0)
    msg = llm.bind_tools([inspect_node], tool_choice="inspect_node").invoke("Show edge-a.")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "inspect_node"
    assert msg.tool_calls[0]["args"]["node"] in ("edge-a", "edge-b", "cloud-1")
    facts = llm.with_structured_output(NodeFacts).invoke("edge-a has 2 GPUs.")
    assert isinstance(facts, NodeFacts) and 0 <= facts.gpus <= 8
    facts = llm.with_structured_output(NodeFacts, method="function_calling").invoke("edge-a has 2 GPUs.")
    assert isinstance(facts, NodeFacts)


@pytest.mark.parametrize("route, extra, param", [
    ("chat", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("chat", {"presence_penalty": 1}, "presence_penalty"),
    ("chat", {"logit_bias": {"50": 10}}, "logit_bias"),
    ("chat", {"top_k": 5}, "top_k"),
    ("chat", {"audio": {"voice": "x"}}, "audio"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "reboot"}}}, "tool_choice"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": "low"}}}}}}, "response_format"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
    ("chat", {"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"logprobs": 50}, "logprobs"),
])
def test_an_unserved_parameter_is_refused_naming_it(server, route, extra, param):
    body = ({"model": "tiny-smol", "messages": [{"role": "user", "content": "hi"}]} if route == "chat"
            else {"model": "tiny-smol", "prompt": "hi"})
    r = httpx.post(f"{server[1]}/v1/{'chat/completions' if route == 'chat' else 'completions'}",
                   json=body | extra | {"max_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in err["message"] and (err["param"] or "").startswith(param), err


def test_structured_outputs_extension_regex_and_choice(server):
    import re
    url = server[1] + "/v1/completions"
    r = httpx.post(url, json={"model": "tiny-smol", "prompt": "Node:", "max_tokens": 20,
                              "structured_outputs": {"regex": "(edge|cloud)-[0-9]"}}, timeout=60).json()
    assert re.fullmatch("(edge|cloud)-[0-9]", r["choices"][0]["text"])
    r = httpx.post(server[1] + "/v1/chat/completions", json={
        "model": "tiny-smol", "max_tokens": 20, "messages": [{"role": "user", "content": "Pick a tier."}],
        "structured_outputs": {"choice": ["edge", "cloud"]}}, timeout=60).json()
    assert r["choices"][0]["message"]["content"] in ("edge", "cloud")


def test_openapi_documents_errors_and_types_bodies(server):
    spec = httpx.get(server[1] + "/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "404", "429", "503"} <= set(chat["responses"])
    props = spec["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"response_format", "tools", "tool_choice", "logprobs", "top_logprobs"} <= set(props)
    assert spec["components"]["schemas"]["ChatRequest"].get("additionalProperties") is False


def test_a_running_service_is_usable_as_the_agents_llm(server, monkeypatch):
    """CONTINUO_LLM_BASE_URL pointed at `continuo serve`: the parser's schema-constrained call goes through."""
    from agent.intent_parser import parse_intent
    from agent.llm import get_llm
    monkeypatch.setenv("CONTINUO_LLM_BASE_URL", server[1] + "/v1")
    monkeypatch.setenv("CONTINUO_LLM_MODEL", "tiny-smol")
    cluster, policy = load_cluster("scenarios/local/cluster.yaml"), load_policy("scenarios/local/policy.yaml")
    # consult="always": the rules read this text with confidence, and would not ask the LLM at all
    p = parse_intent("Public FAQ bot; edge-b goes into maintenance.", cluster, policy, llm=get_llm(),
                     consult="always")
    assert p.llm_values is not None            # the random model's JSON parsed and was grounded
    assert p.spec.data_class in policy.data_classes


# --- errors: the client's are 4xx, ours surface as a logged 500 ---------------------------------------

@pytest.fixture(scope="module")
def local_app(tokenizer):
    """A one-process service (no workers) behind the app, called in-process; server errors come back
    as responses instead of being raised into the test."""
    from starlette.testclient import TestClient
    eng = Engine(build_stages(SRC, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC, tokenizer,
                 CFG.eos_token_ids, CFG.vocab_size)
    svc = Service(eng, "tiny-smol")
    yield svc, TestClient(create_app(svc), raise_server_exceptions=False)
    svc.close()


def _boom(exc):
    def f(*a, **k):
        raise exc
    return f


def test_a_bug_is_a_logged_500_in_openai_shape(local_app, monkeypatch, caplog):
    svc, c = local_app
    monkeypatch.setattr(svc, "health", _boom(KeyError("status")))
    with caplog.at_level("ERROR", logger="continuo.api"):
        r = c.get("/health")
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "internal error (KeyError); the server's log has the details",
                                 "type": "server_error", "param": None, "code": "internal_error"}
    rec = next(r for r in caplog.records if r.name == "continuo.api")
    assert "GET /health failed" in rec.getMessage() and rec.exc_info[0] is KeyError


def test_chat_template_refusal_is_400_and_its_bug_is_500(local_app, monkeypatch):
    import jinja2
    svc, c = local_app
    body = {"model": "tiny-smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    monkeypatch.setattr(svc.engine, "chat_prompt", _boom(jinja2.TemplateError("roles must alternate")))
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "roles must alternate" in r.json()["error"]["message"]
    monkeypatch.setattr(svc.engine, "chat_prompt", _boom(AttributeError("'NoneType' object has no attribute 'x'")))
    assert c.post("/v1/chat/completions", json=body).status_code == 500


def test_metrics_outlive_a_stuck_worker_call_but_not_a_bug(local_app, monkeypatch):
    svc, c = local_app
    monkeypatch.setattr(svc, "node_states", _boom(TimeoutError()))
    assert c.get("/metrics").status_code == 200 and c.get("/admin/nodes").json()["nodes"] == []
    monkeypatch.setattr(svc.telemetry, "snapshot", _boom(ZeroDivisionError()))
    assert c.get("/metrics").status_code == 500


def test_out_of_vocabulary_token_ids_are_refused(local_app):
    svc, c = local_app
    for prompt in ([1, CFG.vocab_size], [-1]):
        r = c.post("/v1/completions", json={"model": "tiny-smol", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert c.post("/v1/completions", json={"model": "tiny-smol", "prompt": [1, 2], "max_tokens": 2}).status_code == 200


def test_an_unknown_route_answers_in_openai_shape(local_app):
    r = local_app[1].get("/v2/models")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "user"}], "messages.0.content", "Field required"),
    ([{"role": "user", "content": 3}], "messages.0.content", "valid string"),
    ([{"role": "tool", "content": "x"}], "messages.0.tool_call_id", "Field required"),
    ([{"role": "user", "content": "x", "name": "bob"}], "messages.0.name", "does not serve it"),
    ([{"role": "assistant"}], "messages.0", "content or tool_calls"),
    ([{"role": "wizard", "content": "x"}], "messages.0", "wizard"),
])
def test_message_errors_name_the_field_as_the_client_wrote_it(local_app, messages, param, words):
    """The per-role message models are pydantic's union members: none of them shows in error.param."""
    r = local_app[1].post("/v1/chat/completions", json={"model": "tiny-smol", "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


def test_broken_json_says_where(local_app):
    r = local_app[1].post("/v1/completions", content=b'{"model": "tiny-smol", "prompt": }',
                          headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert r.json()["error"]["message"].startswith("body: not valid JSON (") and "at character 33" in r.text
