"""The OpenAI-compatible HTTP API, metrics, health and the admin API, over a `Service`.

    /v1/models  /v1/completions  /v1/chat/completions  (stream=true: server-sent events)
    /metrics (Prometheus)  /health  /admin/plan  /admin/nodes
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import chat_format
from .engine import MAX_TOP_LOGPROBS, ContextTooLong, QueueFull, RequestOutput, SamplingParams, TokenLogprob
from .structured import GrammarError
from .reconfig import ReconfigurationError
from .service import Listener, Service, ServiceUnavailable


# --- request bodies ------------------------------------------------------------------------------
# Every OpenAI parameter is either served or refused with a 400 that names it, never ignored:
# the models forbid unknown fields, and parameters Continuo does not serve are declared only
# with the value that means "off" (UNSERVED says what a client gets told otherwise).

UNSERVED = {
    "frequency_penalty": "only 0 is served", "presence_penalty": "only 0 is served",
    "logit_bias": "is not served", "n": "only n=1 is served", "best_of": "only 1 is served",
    "echo": "is not served", "suffix": "is not served",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class StructuredOutputs(_Strict):
    """vLLM's extension: constrain the output to exactly one of these."""
    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="a Lark grammar (llguidance's dialect)")


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end-user id; accepted, and kept nowhere")
    frequency_penalty: float = Field(0, ge=0, le=0, description="not served: only 0")
    presence_penalty: float = Field(0, ge=0, le=0, description="not served: only 0")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not served: null or {}")
    structured_outputs: StructuredOutputs | None = None

    def sampling(self, default_max: int, grammar: str | None = None, logprobs: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=self.max_tokens or default_max, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=stop, grammar=grammar, logprobs=logprobs)


class CompletionRequest(_Common):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="the sampled token's logprob and this many alternatives")
    echo: Literal[False] = Field(False, description="not served: only false")
    best_of: Literal[1] = Field(1, description="not served: only 1")
    suffix: None = Field(None, description="not served: only null")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant turns: the calls it made")
    tool_call_id: str | None = Field(None, description="tool turns: the call answered")
    name: str | None = Field(None, description="tool turns only: the function's name")
    refusal: None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.name is not None and self.role != "tool":
            raise ValueError("name is served on tool messages only (the model sees no participant names)")
        return self


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="a reply makes at most one call either way")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools")
        return self

    def dumped(self, name: str):
        v = getattr(self, name)
        if v is None:
            return None
        return [x.model_dump(by_alias=True, exclude_none=True) for x in v] if isinstance(v, list) \
            else (v if isinstance(v, str) else v.model_dump(by_alias=True, exclude_none=True))


# --- errors ---------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape."""
    error: ErrorDetail


RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a parameter is malformed or not served (error.param names it)"},
    404: {"model": ErrorBody, "description": "the model is not served here"},
    429: {"model": ErrorBody, "description": "the waiting queue is full; retry later"},
    500: {"model": ErrorBody, "description": "generation failed inside the engine (the message says how)"},
    503: {"model": ErrorBody, "description": "the service cannot take requests (a worker died)"},
}


def _err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, param, code).body, status_code=status)


# --- metrics ----------------------------------------------------------------------------------------

class Metrics:
    def __init__(self, service: Service):
        self.registry = r = CollectorRegistry()
        buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("continuo_ttft_seconds", "arrival to first token", registry=r, buckets=buckets)
        self.tpot = Histogram("continuo_tpot_seconds", "mean gap between later tokens of a request", registry=r,
                              buckets=buckets)
        self.gap = Histogram("continuo_token_gap_seconds", "time between consecutive tokens", registry=r,
                             buckets=buckets)
        self.requests = Counter("continuo_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("continuo_generated_tokens", "tokens generated", registry=r)
        Gauge("continuo_queue_depth", "requests waiting", registry=r).set_function(service.queue_depth)
        Gauge("continuo_running_requests", "requests being decoded", registry=r).set_function(service.running)
        self.stage = Gauge("continuo_stage_step_seconds", "per-node median step time", ["node"], registry=r)
        self.alive = Gauge("continuo_node_up", "1 when the node's worker answers", ["node"], registry=r)
        self.rc_pause = Histogram("continuo_reconfig_pause_seconds", "switch window of a reconfiguration",
                                  ["method"], registry=r, buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 5, 30))
        self.rc_phase = Gauge("continuo_reconfig_phase_seconds", "duration of each phase of the last reconfiguration",
                              ["phase"], registry=r)
        self.rc_bytes = Counter("continuo_reconfig_bytes", "bytes moved by reconfigurations", ["kind"], registry=r)
        self.rc_rounds = Gauge("continuo_reconfig_precopy_rounds", "pre-copy rounds of the last reconfiguration",
                               registry=r)
        self.rc_total = Counter("continuo_reconfigurations", "reconfigurations by method and outcome",
                                ["method", "outcome"], registry=r)
        self.rc_bandwidth = Gauge("continuo_reconfig_bandwidth_bytes_per_second", "bytes moved / moving time, "
                                  "last reconfiguration", registry=r)
        service.on_reconfigured.append(self.reconfigured)

    def reconfigured(self, rep) -> None:
        self.rc_total.labels(rep.method, rep.state).inc()
        for phase, secs in rep.phases.items():
            self.rc_phase.labels(phase).set(secs)
        if rep.pause_s is not None:
            self.rc_pause.labels(rep.method).observe(rep.pause_s)
        for kind, b in rep.bytes_moved.items():
            self.rc_bytes.labels(kind).inc(b)
        self.rc_rounds.set(rep.rounds)
        if rep.bandwidth_gbs:
            self.rc_bandwidth.set(rep.bandwidth_gbs * 1e9)

    def finished(self, out: RequestOutput | None, err: str | None) -> None:
        if out is None:
            self.requests.labels("error").inc()
            return
        self.requests.labels(out.finish_reason).inc()
        self.tokens.inc(len(out.token_ids))
        if out.ttft is not None:
            self.ttft.observe(out.ttft)
        if out.tpot is not None:
            self.tpot.observe(out.tpot)
        for g in out.gaps:
            self.gap.observe(g)


# --- streaming text ---------------------------------------------------------------------------------

class TextStream:
    """Turns a request's token ids into text deltas, holding back what may become a stop string
    or an incomplete UTF-8 character."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tok, self.ids, self.sent, self.final, self.shown = tokenizer, [], 0, None, ""
        self.hold = max((len(s) for s in stops), default=0)

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        if self.tok is None:
            return ""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        upto = max(self.sent, len(text) - self.hold)
        delta, self.sent, self.shown = text[self.sent:upto], upto, text[:upto]
        return delta

    def finish(self, final_text: str | None) -> str:
        text = final_text if final_text is not None else ""
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.final = text
        return delta

    def text_sent(self) -> str:
        """All the text handed out so far."""
        return self.final if self.final is not None else self.shown


class ReconfigureBody(BaseModel):
    """POST /admin/reconfigure. At module level: with postponed annotations FastAPI resolves a
    body model by name, and a class local to create_app would be read as a query parameter."""
    model_config = ConfigDict(extra="forbid")
    plan: dict[str, Any]
    method: Literal["live", "stop_and_copy", "recompute", "restart"] = "live"
    wait: bool = False


# --- the app --------------------------------------------------------------------------------------

def create_app(service: Service, default_max_tokens: int = 256) -> FastAPI:
    app = FastAPI(title="Continuo", version="0.1")
    metrics = Metrics(service)
    app.state.service, app.state.metrics = service, metrics

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        e = exc.errors()[0]
        param = ".".join(str(p) for p in e["loc"] if p != "body") or None
        top = str(e["loc"][1]) if len(e["loc"]) > 1 else None
        if e["type"] == "extra_forbidden":
            msg = f"unsupported parameter '{param}': Continuo does not serve it"
        elif top in UNSERVED and len(e["loc"]) == 2:
            msg = f"{param}: not served by Continuo, {UNSERVED[top]}"
        elif e["type"] == "value_error":
            said = str(e["ctx"]["error"])
            head, _, rest = said.partition(": ")
            if rest and " " not in head:        # a model-level check names its parameter first
                param = ".".join(filter(None, [param, head]))
                said = rest
            msg = f"{param or 'body'}: {said}"
        else:
            msg = f"{param or 'body'}: {e['msg']}"
        return _err(400, msg, param=param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    def check_model(name: str) -> None:
        if name != service.model_name:
            raise APIError(404, f"model '{name}' is not served here; this server serves '{service.model_name}'",
                           param="model", code="model_not_found")

    def submit(prompt, params: SamplingParams, listener: Listener, grammar_param: str | None) -> int:
        user_done = listener.on_done

        def on_done(out, err):
            metrics.finished(out, err)
            if user_done:
                user_done(out, err)
        listener.on_done = on_done
        try:
            return service.submit(prompt, params, listener)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except ContextTooLong as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except ServiceUnavailable as e:
            raise APIError(503, str(e), "server_error", code="service_unavailable") from None
        except GrammarError as e:
            raise APIError(400, f"{grammar_param}: {e}", param=grammar_param, code="invalid_grammar") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def usage(out: RequestOutput) -> dict:
        return {"prompt_tokens": len(out.prompt_ids), "completion_tokens": len(out.token_ids),
                "total_tokens": len(out.prompt_ids) + len(out.token_ids)}

    def token_info(tok: int) -> tuple[str, list[int]]:
        raw = service.engine.guidance.tok.decode_bytes([tok])
        return raw.decode("utf-8", errors="replace"), list(raw)

    def chat_logprob(tok: int, lp: TokenLogprob) -> dict:
        text, raw = token_info(tok)
        top = []
        for t, v in lp.top:
            tt, tb = token_info(t)
            top.append({"token": tt, "logprob": v, "bytes": tb})
        return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}

    def completion_logprobs(entries: list[tuple[int, TokenLogprob]], offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tok, lp in entries:
            text = token_info(tok)[0]
            tokens.append(text)
            lps.append(lp.logprob)
            tops.append({token_info(t)[0]: v for t, v in lp.top} if lp.top else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def respond(prompt, body: _Common, chat: bool, grammar: str | None, grammar_param: str | None,
                      logprobs: int | None, tool_names: list[str]):
        """Run one request and answer it, whole or as server-sent events. tool_names: the tools the
        reply may call (its text is then read as words or one call)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        params = body.sampling(default_max_tokens, grammar, logprobs)
        listener = Listener(on_token=lambda tok, lp: loop.call_soon_threadsafe(q.put_nowait, ("tok", tok, lp)),
                            on_done=lambda out, err: loop.call_soon_threadsafe(q.put_nowait, ("done", out, err)))
        req_id = submit(prompt, params, listener, grammar_param)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def lp_block(entries: list[tuple[int, TokenLogprob]], offset: int = 0):
            if logprobs is None:
                return None
            if body.stream and not entries:
                return None
            return ({"content": [chat_logprob(t, lp) for t, lp in entries], "refusal": None} if chat
                    else completion_logprobs(entries, offset))

        if not body.stream:
            entries = []
            while True:
                ev = await q.get()
                if ev[0] == "done":
                    break
                if ev[2] is not None:
                    entries.append((ev[1], ev[2]))
            _, out, err = ev
            if err:
                raise APIError(503, err, "server_error", code="worker_failed")
            if out.finish_reason == "error":
                raise APIError(500, out.text or "generation failed", "server_error", code="generation_failed")
            text = out.text if out.text is not None else ""
            finish = out.finish_reason
            if chat:
                content, calls = chat_format.read_reply(text, tool_names) if tool_names else (text, [])
                message = {"role": "assistant", "content": content, "refusal": None}
                if calls:
                    message["tool_calls"] = calls
                    finish = "tool_calls" if finish == "stop" else finish
                choice = {"index": 0, "message": message, "logprobs": lp_block(entries), "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": lp_block(entries), "finish_reason": finish}
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": service.model_name,
                                 "choices": [choice], "usage": usage(out)})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        ts = TextStream(service.tokenizer, params.stop)
        reader = chat_format.ToolCallReader(tool_names) if chat and tool_names else None

        def chunk(delta: dict | str | None, finish: str | None, entries=()) -> str:
            if chat:
                c = {"index": 0, "delta": delta or {}, "logprobs": lp_block(list(entries)), "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": lp_block(list(entries), ts_offset[0]),
                     "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                          "model": service.model_name, "choices": [c]}) + "\n\n"

        ts_offset = [0]                 # characters of completion text sent (logprobs' text_offset)
        state = {"called": False}

        def deltas(text_delta: str, final: bool) -> list:
            """Text so far -> the chunks' deltas: content, or tool-call pieces."""
            if not chat:
                return [text_delta] if text_delta else []
            if reader is None:
                return [{"content": text_delta}] if text_delta else []
            out = []
            for kind, d in reader.feed(ts.text_sent(), final):
                if kind == "content":
                    out.append({"content": d})
                else:
                    state["called"] = True
                    out.append({"tool_calls": [d]})
            return out

        async def events():
            finished = False
            pending: list[tuple[int, TokenLogprob]] = []
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                while True:
                    ev = await q.get()
                    if ev[0] == "tok":
                        if ev[2] is not None:
                            pending.append((ev[1], ev[2]))
                        for d in deltas(ts.push(ev[1]), False):
                            yield chunk(d, None, pending)
                            if not chat:
                                ts_offset[0] += len(d)
                            pending = []
                        continue
                    _, out, err = ev
                    finished = True
                    if err or out.finish_reason == "error":
                        code = "worker_failed" if err else "generation_failed"
                        yield "data: " + json.dumps(APIError(503, err or out.text, "server_error", code=code).body) + "\n\n"
                        break
                    for d in deltas(ts.finish(out.text), True):
                        yield chunk(d, None, pending)
                        pending = []
                    finish = "tool_calls" if state["called"] and out.finish_reason == "stop" else out.finish_reason
                    yield chunk(None, finish, pending)
                    if include_usage:
                        yield "data: " + json.dumps({"id": rid, "object": obj + (".chunk" if chat else ""),
                                                     "created": created, "model": service.model_name, "choices": [],
                                                     "usage": usage(out)}) + "\n\n"
                    break
                yield "data: [DONE]\n\n"
            finally:
                if not finished:       # the client went away: stop generating for it
                    service.cancel(req_id)
        return StreamingResponse(events(), media_type="text/event-stream")

    def structured_grammar(body: _Common) -> str | None:
        if body.structured_outputs is None:
            return None
        return chat_format.grammar_for(None, None, None, body.structured_outputs.model_dump(by_alias=True))

    @app.get("/v1/models", responses=RESPONSES)
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": int(service.started), "owned_by": "continuo"}]}

    @app.post("/v1/completions", responses=RESPONSES)
    async def completions(body: CompletionRequest):
        check_model(body.model)
        if isinstance(body.prompt, str) and service.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send the prompt as a list of token ids", param="prompt")
        try:
            grammar = structured_grammar(body)
        except chat_format.ParamError as e:
            raise APIError(400, str(e), param=e.param) from None
        return await respond(body.prompt, body, False, grammar, "structured_outputs", body.logprobs, [])

    @app.post("/v1/chat/completions", responses=RESPONSES)
    async def chat(body: ChatRequest):
        check_model(body.model)
        if service.tokenizer is None:
            raise APIError(400, "this model has no tokenizer or chat template", param="messages")
        if body.max_completion_tokens and not body.max_tokens:
            body.max_tokens = body.max_completion_tokens
        if body.structured_outputs is not None and (body.response_format is not None or body.tools):
            raise APIError(400, "structured_outputs cannot be combined with response_format or tools",
                           param="structured_outputs")
        tools, choice = body.dumped("tools"), body.dumped("tool_choice")
        try:
            grammar = structured_grammar(body) or chat_format.grammar_for(body.dumped("response_format"), tools, choice)
            callable_, _ = chat_format.chosen_tools(tools, choice)
            turns = chat_format.render(body.dumped("messages"), tools, choice)
        except chat_format.ParamError as e:
            raise APIError(400, str(e), param=e.param) from None
        try:
            ids = service.engine.chat_prompt(turns)
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        grammar_param = ("structured_outputs" if body.structured_outputs else
                         "tools" if callable_ else "response_format")
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(list(ids), body, True, grammar, grammar_param, top, chat_format.tool_names(callable_))

    @app.get("/health")
    async def health():
        h = service.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prom():
        for n in await asyncio.to_thread(_safe_nodes, service):
            metrics.alive.labels(n["node"]).set(1 if n["state"] == "ok" else 0)
            if n.get("step_ms_p50") is not None:
                metrics.stage.labels(n["node"]).set(n["step_ms_p50"] / 1e3)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/plan")
    async def admin_plan():
        vp = service.plan
        return {"model": service.model_name, "plan": vp.plan.model_dump(mode="json") if vp else None,
                "cluster_fingerprint": vp.cluster_fingerprint if vp else None, "policy": vp.policy if vp else None}

    @app.post("/admin/reconfigure")
    async def admin_reconfigure(body: ReconfigureBody):
        """Validate the plan against the live state (policy, transition, freshness), then apply it."""
        from policies import InputError, PlanRejected
        try:
            rep = await asyncio.to_thread(service.reconfigure_plan, body.plan, body.method, body.wait)
        except InputError as e:
            raise APIError(400, str(e), param="plan") from None
        except PlanRejected as e:
            return JSONResponse({"error": {"message": "the validator refused the plan", "type": "plan_rejected",
                                           "param": "plan", "code": "violations"},
                                 "report": e.report.model_dump(mode="json")}, status_code=422)
        except (ReconfigurationError, TypeError) as e:
            raise APIError(409, str(e), code="reconfiguration_refused") from None
        return rep.as_dict()

    @app.get("/admin/reconfigurations")
    async def admin_reconfigurations():
        cur = service.loop.reconfig
        return {"current": cur.report.as_dict() if cur is not None else None,
                "history": [r.as_dict() for r in service.history]}

    @app.get("/admin/nodes")
    async def admin_nodes():
        return {"nodes": await asyncio.to_thread(_safe_nodes, service), "health": service.health()}

    return app


def _safe_nodes(service: Service) -> list[dict]:
    try:
        return service.node_states()
    except Exception:   # a dead worker must not take /metrics down with it
        return [{"node": n, "state": s} for n, s in service.health()["nodes"].items()]
