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
from pydantic import BaseModel, ConfigDict, Field

from .engine import ContextTooLong, QueueFull, RequestOutput, SamplingParams
from .reconfig import ReconfigurationError
from .service import Listener, Service, ServiceUnavailable


# --- request bodies ------------------------------------------------------------------------------

class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")      # unknown OpenAI fields are accepted and ignored
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None

    def sampling(self, default_max: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=self.max_tokens or default_max, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=stop)


class CompletionRequest(_Common):
    prompt: str | list[int] = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# --- errors ---------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


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
        self.tok, self.ids, self.sent = tokenizer, [], 0
        self.hold = max((len(s) for s in stops), default=0)

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        if self.tok is None:
            return ""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        upto = max(self.sent, len(text) - self.hold)
        delta, self.sent = text[self.sent:upto], upto
        return delta

    def finish(self, final_text: str | None) -> str:
        text = final_text if final_text is not None else ""
        return text[self.sent:] if len(text) > self.sent else ""


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
        return _err(400, f"{param or 'body'}: {e['msg']}", param=param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    def check_model(name: str) -> None:
        if name != service.model_name:
            raise APIError(404, f"model '{name}' is not served here; this server serves '{service.model_name}'",
                           param="model", code="model_not_found")

    def submit(prompt, params: SamplingParams, listener: Listener) -> int:
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
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def run(prompt, body: _Common, kind: str):
        """Submit and return (req_id, queue of events) where events are ('tok', id) / ('done', out, err)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        params = body.sampling(default_max_tokens)
        listener = Listener(on_token=lambda tok: loop.call_soon_threadsafe(q.put_nowait, ("tok", tok)),
                            on_done=lambda out, err: loop.call_soon_threadsafe(q.put_nowait, ("done", out, err)))
        req_id = submit(prompt, params, listener)
        return req_id, q, params

    def usage(out: RequestOutput) -> dict:
        return {"prompt_tokens": len(out.prompt_ids), "completion_tokens": len(out.token_ids),
                "total_tokens": len(out.prompt_ids) + len(out.token_ids)}

    async def respond(prompt, body: _Common, chat: bool):
        req_id, q, params = await run(prompt, body, "chat" if chat else "text")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not body.stream:
            while True:
                ev = await q.get()
                if ev[0] == "done":
                    break
            _, out, err = ev
            if err:
                raise APIError(503, err, "server_error", code="worker_failed")
            text = out.text if out.text is not None else ""
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": out.finish_reason}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish_reason})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": service.model_name,
                                 "choices": [choice], "usage": usage(out)})

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        ts = TextStream(service.tokenizer, params.stop)

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
                c = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                          "model": service.model_name, "choices": [c]}) + "\n\n"

        async def events():
            finished = False
            try:
                if chat:
                    yield chunk("", None, first=True)
                while True:
                    ev = await q.get()
                    if ev[0] == "tok":
                        delta = ts.push(ev[1])
                        if delta:
                            yield chunk(delta, None)
                        continue
                    _, out, err = ev
                    finished = True
                    if err:
                        yield "data: " + json.dumps(APIError(503, err, "server_error", code="worker_failed").body) + "\n\n"
                        break
                    yield chunk(ts.finish(out.text), out.finish_reason)
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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": int(service.started), "owned_by": "continuo"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        if isinstance(body.prompt, str) and service.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send the prompt as a list of token ids", param="prompt")
        return await respond(body.prompt, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        if service.tokenizer is None:
            raise APIError(400, "this model has no tokenizer or chat template", param="messages")
        if body.max_completion_tokens and not body.max_tokens:
            body.max_tokens = body.max_completion_tokens
        try:
            ids = service.engine.chat_prompt([m.model_dump() for m in body.messages])
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        return await respond(list(ids), body, chat=True)

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
