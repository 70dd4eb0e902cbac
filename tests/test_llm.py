"""Backends: choice by config/env, the OpenAI-compatible path (mock transport), the embedded model."""
import json
from pathlib import Path

import httpx
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool

from agent.intent_parser import parse_intent
from agent.llm import EmbeddedChatModel, describe, embedded_model_path, get_llm
from policies import load_cluster, load_policy

S = Path(__file__).resolve().parent.parent / "scenarios"


@pytest.fixture(scope="module")
def hospital():
    return load_cluster(S / "hospital/cluster.yaml"), load_policy(S / "hospital/policy.yaml")


@pytest.fixture(scope="module")
def embedded():
    return get_llm({"provider": "embedded"})


def test_default_is_embedded(monkeypatch):
    monkeypatch.delenv("CONTINUO_LLM_BASE_URL", raising=False)
    llm = get_llm()
    assert isinstance(llm, EmbeddedChatModel) and Path(llm.model_path) == embedded_model_path()
    assert embedded_model_path().stat().st_size > 50e6


def test_endpoint_from_env(monkeypatch):
    from langchain_openai import ChatOpenAI
    monkeypatch.setenv("CONTINUO_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("CONTINUO_LLM_MODEL", "qwen2.5-7b-instruct")
    monkeypatch.setenv("CONTINUO_LLM_API_KEY", "k")
    llm = get_llm()
    assert isinstance(llm, ChatOpenAI) and llm.model_name == "qwen2.5-7b-instruct"
    assert llm.openai_api_base == "http://127.0.0.1:9/v1" and "qwen2.5-7b-instruct" in describe(llm)
    assert isinstance(get_llm({"provider": "embedded"}), EmbeddedChatModel)   # config wins over env
    with pytest.raises(ValueError, match="unknown LLM provider"):
        get_llm({"provider": "nope"})


def test_openai_compatible_endpoint_gets_the_grounded_schema(hospital):
    """One code path: ChatOpenAI is sent the per-request schema as response_format, its answer is checked."""
    from langchain_openai import ChatOpenAI
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        answer = {"data_class": "phi", "max_ttft_ms": 300, "exclude_nodes": ["ward-a-edge", "iad-a100-1"]}
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps(answer)}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    llm = ChatOpenAI(model="m", base_url="http://endpoint/v1", api_key="k",
                     http_client=httpx.Client(transport=httpx.MockTransport(handler)), max_retries=0)
    p = parse_intent("Patient triage, first token within 300 ms, ward-a-edge is down.", *hospital, llm=llm, consult="always")
    schema = seen[0]["response_format"]["json_schema"]["schema"]
    assert seen[0]["response_format"]["type"] == "json_schema"
    assert schema["properties"]["max_ttft_ms"]["enum"] == [300.0, None]
    assert schema["properties"]["exclude_nodes"]["required"] == ["ward-a-edge"]
    assert p.spec.exclude_nodes == ("ward-a-edge",) and p.sources["max_ttft_ms"] == "both"
    assert any("iad-a100-1" in d for d in p.dropped)


def test_embedded_output_follows_the_schema(embedded):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", None]},
                                               "n": {"enum": [3, 7]}}, "required": ["colour", "n"]}
    out = embedded.invoke([SystemMessage("Answer in JSON."), HumanMessage("Seven green apples.")],
                          response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    data = json.loads(out.content)
    assert data["colour"] in ("red", "green", None) and data["n"] in (3, 7)


def test_embedded_tool_calls_are_constrained(embedded):
    @tool
    def inspect_cluster(node: str) -> str:
        """Show one node of the cluster."""
        return node

    out = embedded.bind_tools([inspect_cluster], tool_choice="any").invoke("Show me node ward-a-edge.")
    assert out.tool_calls and out.tool_calls[0]["name"] == "inspect_cluster"
    assert isinstance(out.tool_calls[0]["args"].get("node"), str)


def test_embedded_is_loaded_once_and_runs_on_our_engine(embedded):
    from executor.engine import Engine
    assert embedded.service is get_llm({"provider": "embedded"}).service
    assert isinstance(embedded.service.engine, Engine) and len(embedded.service.engine.stages) == 1


def test_embedded_with_structured_output_and_auto_tools(embedded):
    from typing import Literal

    from pydantic import BaseModel

    class Residency(BaseModel):
        data_class: Literal["public", "internal", "phi"]
        region: Literal["eu", "us"]

    r = embedded.with_structured_output(Residency).invoke("Patient records (PHI) must stay in the EU.")
    assert isinstance(r, Residency)

    @tool
    def inspect_cluster(node: str) -> str:
        """Show one node of the cluster."""
        return node

    out = embedded.bind_tools([inspect_cluster]).invoke("Say hello to the operator.")
    assert bool(out.tool_calls) != bool(out.content)         # words or a call, as the model chose


@pytest.mark.parametrize("text", [
    "Keep patient data inside the EU, avoid ward-a-edge, and bring TTFT under 300 ms.",
    "Contract review as cheap as possible, 100 ms per token, stay off the Frankfurt boxes.",
])
def test_end_to_end_on_the_embedded_model(hospital, embedded, text):
    p = parse_intent(text, *hospital, llm=embedded, consult="always")
    assert p.llm_values is not None and p.seconds < 60
    cluster = hospital[0]
    # whatever the model said, only grounded values reach the spec
    for n in p.spec.exclude_nodes:
        assert cluster.has_node(n)
    for f in ("max_ttft_ms", "max_tpot_ms"):
        v = getattr(p.spec, f)
        assert v is None or str(int(v)) in text
    assert p.spec.data_class in hospital[1].data_classes
    assert set(p.sources.values()) <= {"llm", "rules", "both"}
