"""The OpenAI-compatible HTTP API, metrics, health and the admin API, over a `Service`.

    /v1/models  /v1/completions  /v1/chat/completions  (stream=true: server-sent events)
    /metrics (Prometheus)  /health  /admin/plan  /admin/nodes  /admin/reconfigure  /admin/reconfigurations
    /admin/stats (telemetry)  /admin/replicas (more pipelines of the model, on nodes of their own)

With credentials (create_app(..., api_keys=, admin_tokens=)), /v1 takes an API key and /admin an
admin token, both as `Authorization: Bearer <token>`; see "authentication" below.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import jinja2
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import chat_format
from .engine import MAX_TOP_LOGPROBS, ContextTooLong, QueueFull, RequestOutput, SamplingParams, TokenLogprob
from .structured import GrammarError
from .reconfig import ReconfigurationError
from .runtime import WorkerDied
from .service import Listener, ReplicaError, Service, ServiceUnavailable, UnknownReplica

log = logging.getLogger("continuo.api")


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
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="what torch's generator takes")
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
    prompt: str | list[int] = Field(min_length=1, description="text, or token ids")
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


# One model per role, told apart by `role`, so that /openapi.json says what each needs (a user
# message needs content, a tool message the call it answers). Participant names are not served
# (the model never sees them): only a tool message takes `name`, the function's.

class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[TextPart]


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="the calls it made")
    refusal: None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str = Field(description="the call answered")
    name: str | None = Field(None, description="the function's name")


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _union_member(part, before) -> bool:
    """Whether a part of a validation error's location names a union member, not a JSON key: a
    message's role after its index, a type (str, list[TextPart]) or a model class (TextPart)."""
    if not isinstance(part, str):
        return False
    if isinstance(before, int) and part in ROLES:
        return True
    return part in ("str", "int", "float", "bool", "none") or "[" in part or part[:1].isupper()


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
                 code: str | None = None, headers: dict[str, str] | None = None):
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape."""
    error: ErrorDetail


class PlanRejectedBody(ErrorBody):
    """422 from /admin/reconfigure: the error, and the validator's report (violations with hints)."""
    report: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    nodes: dict[str, str] = Field(description="per node: 'ok', or 'dead: ' and why")
    error: str | None = None


_BUG = {"model": ErrorBody, "description": "a bug in Continuo (the server logs it with its traceback)"}
RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a parameter is malformed or not served (error.param names it)"},
    404: {"model": ErrorBody, "description": "the model is not served here"},
    429: {"model": ErrorBody, "description": "the waiting queue is full; retry later"},
    500: {"model": ErrorBody, "description": "generation failed inside the engine (the message says how), or a bug "
                                             "in Continuo (the server logs it with its traceback)"},
    503: {"model": ErrorBody, "description": "the service cannot take requests (a worker died)"},
}
# stream=true answers 200 as server-sent events: `data: <chunk JSON>` lines, then `data: [DONE]`
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **RESPONSES,
    200: {"description": "the completion; with stream=true, server-sent events (chunks, then [DONE])",
          "content": {"text/event-stream": {"schema": {  # one event: its data is a chunk's JSON, or [DONE]
              "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}},
}
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {500: _BUG}
RECONFIGURE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body or the plan in it is malformed (error.param names it)"},
    409: {"model": ErrorBody, "description": "the service cannot reconfigure now, or at all (the message says why)"},
    422: {"model": PlanRejectedBody, "description": "the validator refused the plan against the live state"},
    500: _BUG,
    503: {"model": ErrorBody, "description": "the service cannot take requests (a worker died)"},
}

REPLICA_RESPONSES: dict[int | str, dict[str, Any]] = {
    **RECONFIGURE_RESPONSES,
    404: {"model": ErrorBody, "description": "no replica goes by that name"},
    409: {"model": ErrorBody, "description": "the replica cannot be added or drained now (its nodes are taken, "
                                             "down or busy moving, or its plan does not fit the service)"},
}


def _admin_call(fn, *args):
    """An admin action on the service, its refusals as the routes document them (RECONFIGURE_RESPONSES,
    REPLICA_RESPONSES): a malformed plan 400, the validator's refusal 422 with its report, no such
    replica 404, a refusal of the service 409, a dead worker 503."""
    from policies import InputError, PlanRejected
    try:
        return fn(*args)
    except InputError as e:
        raise APIError(400, str(e), param="plan") from None
    except PlanRejected as e:
        return _rejected(e)
    except UnknownReplica as e:
        raise APIError(404, str(e), code="replica_not_found") from None
    except ReplicaError as e:
        raise APIError(409, str(e), code="replica_refused") from None
    except ReconfigurationError as e:
        raise APIError(409, str(e), code="reconfiguration_refused") from None
    except ServiceUnavailable as e:
        raise APIError(503, str(e), "server_error", code="service_unavailable") from None


def _rejected(e) -> JSONResponse:
    """422: the validator refused a plan; its report says which rules and how to fix them."""
    return JSONResponse({"error": {"message": "the validator refused the plan", "type": "plan_rejected",
                                   "param": "plan", "code": "violations"},
                         "report": e.report.model_dump(mode="json")}, status_code=422)


def _err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return APIError(status, message, type_, param, code).response()


# --- authentication ------------------------------------------------------------------------------
# Two kinds of credential, both sent the way OpenAI clients send theirs (`Authorization: Bearer
# <token>`): API keys for /v1, and admin tokens for /admin, which moves the model's layers between
# nodes. An API key never opens /admin. With no credentials at all the app is open, as on a
# developer's loopback; `continuo serve` refuses that on any other address (see is_loopback).
#
# _AuthGate enforces it, as ASGI middleware that decides by path before anything else runs:
# FastAPI reads and parses a request's body before it runs the route's dependencies, so checking
# in a dependency would let anyone make the server read a body of any size, and would answer
# broken JSON with a 400 instead of a 401. The gate denies by default: a path that is neither
# under /v1 nor named open needs the admin token, so a route added later cannot be left open by
# forgetting to protect it. The routes also declare the HTTPBearer schemes below as dependencies
# (auto_error=False: they never refuse anything themselves), so that /openapi.json documents
# which credential each route takes, and its 401 and 403.

API_KEY = HTTPBearer(scheme_name="APIKey", auto_error=False,
                     description="an API key of this server (`continuo serve --api-key`); opens /v1")
ADMIN_TOKEN = HTTPBearer(scheme_name="AdminToken", auto_error=False,
                         description="the admin token of this server (`continuo serve --admin-token`); opens /admin "
                                     "(and /metrics, /health under --protect-metrics)")
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no credentials, or an Authorization header that is not "
                                             "'Bearer <token>'",
          "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}},
    403: {"model": ErrorBody, "description": "a token this route does not take: a wrong one, or an API key on /admin"},
}
# Always open: the API's own description and docs pages (they hold no secrets).
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_TOKEN = re.compile(r"[\x21-\x7e]+")          # visible ASCII, no spaces: what fits a Bearer header


class Credentials:
    """The tokens one kind of credential accepts, compared in constant time."""

    def __init__(self, tokens: Iterable[str] | str | None, what: str):
        if isinstance(tokens, str):             # one token, not one per character
            tokens = [tokens]
        tokens = [t for t in (tokens or ()) if t]
        for t in tokens:
            if not _TOKEN.fullmatch(t):
                raise ValueError(f"{what}: a token must be visible ASCII characters without spaces")
        # Kept as SHA-256 digests: every comparison is then 32 bytes against 32, whatever the length
        # of what a client sends, and the tokens themselves are not kept in memory.
        self._digests = tuple(hashlib.sha256(t.encode()).digest() for t in tokens)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, token: str) -> bool:
        given = hashlib.sha256(token.encode()).digest()
        ok = False
        for d in self._digests:                  # all of them, so timing does not tell which matched
            ok |= hmac.compare_digest(given, d)
        return ok


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1 and the name localhost.
    Anything else (0.0.0.0, ::, a LAN address, another name) counts as reachable from outside."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _unauthenticated(message: str, code: str) -> APIError:
    return APIError(401, message, "authentication_error", code=code, headers={"WWW-Authenticate": "Bearer"})


def _forbidden(message: str, code: str) -> APIError:
    return APIError(403, message, "permission_error", code=code)


class _AuthGate:
    """ASGI middleware: each HTTP request is let through, or answered 401/403, by its path alone."""

    def __init__(self, app, api_keys: Credentials, admin_tokens: Credentials, protect_metrics: bool):
        self.app, self.api_keys, self.admin_tokens = app, api_keys, admin_tokens
        self.open = DOC_PATHS if protect_metrics else DOC_PATHS | {"/health", "/metrics"}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":          # not lifespan; no websocket routes are served
            refused = self.check(_route_path(scope), _header(scope, b"authorization"))
            if refused is not None:
                await refused.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, path: str, authorization: str | None) -> APIError | None:
        """None to let the request through, else the error to answer it with."""
        if path in self.open:
            return None
        v1 = path == "/v1" or path.startswith("/v1/")
        if v1 and not self.api_keys:
            return None                      # /v1 is open unless API keys are configured
        what = "an API key" if v1 else "the admin token"
        how = ("the OpenAI clients send their api_key this way" if v1 else
               "continuo apply / apply-plan / chat: --admin-token or $CONTINUO_ADMIN_TOKEN")
        if authorization is None:
            return _unauthenticated(f"this route needs {what}: send 'Authorization: Bearer <token>' ({how})",
                                    "missing_credentials")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _unauthenticated(f"malformed Authorization header: expected 'Bearer <token>' carrying {what}",
                                    "malformed_credentials")
        if v1:
            if self.api_keys.accepts(token):
                return None
            return _forbidden("the API key is not valid for this server", "invalid_api_key")
        if self.admin_tokens.accepts(token):
            return None
        if self.api_keys.accepts(token):
            return _forbidden("an API key does not open /admin: send the admin token", "api_key_not_admin")
        if not self.admin_tokens:
            return _forbidden("this server has no admin token, so /admin is closed: start it with --admin-token "
                              "(or $CONTINUO_ADMIN_TOKEN)", "admin_closed")
        return _forbidden("the admin token is not valid for this server", "invalid_admin_token")


def _route_path(scope) -> str:
    """The path the router matches, without the root path a proxy may mount the app under."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        return path[len(root):]
    return path


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _protected(scheme: HTTPBearer | None, responses: dict[int | str, dict[str, Any]]) -> dict[str, Any]:
    """A route's decorator arguments: its error responses, and (when protected) the scheme it takes."""
    if scheme is None:
        return {"responses": responses}
    return {"responses": {**responses, **AUTH_RESPONSES}, "dependencies": [Security(scheme)]}


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
        r.register(TelemetryCollector(service))
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


class TelemetryCollector:
    """The telemetry windows as Prometheus gauges, read from one snapshot per scrape (no worker is
    asked anything: the workers' figures came with their step replies). Names: README, Telemetry."""

    def __init__(self, service: Service):
        self.service = service

    def describe(self):
        return []            # families are known only at scrape time; registering must not take a snapshot

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily as G
        snap = self.service.stats()
        fams = {
            "arrival_rate": G("continuo_arrival_rate", "requests arrived per second", labels=["window"]),
            "prompt": G("continuo_prompt_tokens_per_second", "prompt tokens arrived per second", labels=["window"]),
            "output": G("continuo_output_tokens_per_second", "tokens generated per second", labels=["window"]),
            "queue_mean": G("continuo_queue_depth_mean", "requests waiting, mean over steps", labels=["window"]),
            "queue_max": G("continuo_queue_depth_max", "requests waiting, most at any step", labels=["window"]),
            "running": G("continuo_running_requests_mean", "requests being decoded, mean over steps", labels=["window"]),
            "ttft": G("continuo_ttft_window_seconds", "TTFT of requests whose first token came in the window",
                      labels=["window", "quantile"]),
            "tpot": G("continuo_tpot_window_seconds", "TPOT of requests that finished in the window",
                      labels=["window", "quantile"]),
            "steps": G("continuo_steps_per_second", "engine steps per second", labels=["window"]),
            "wall": G("continuo_step_wall_seconds", "engine step time, mean (schedule, stages, sampling)",
                      labels=["window"]),
            "kv_use": G("continuo_kv_use_ratio", "KV blocks in use / allocated on a node, mean over steps",
                        labels=["node", "window"]),
            "stage": G("continuo_stage_step_seconds", "a stage's time per engine step, mean (compute + comm)",
                       labels=["node", "layers", "window"]),
            "compute": G("continuo_stage_compute_seconds", "a stage's compute per engine step, mean",
                         labels=["node", "layers", "window"]),
            "comm": G("continuo_stage_comm_seconds", "a stage's time waiting on receives and staging sends per "
                                                     "engine step, mean", labels=["node", "layers", "window"]),
            "stage_tokens": G("continuo_stage_tokens_per_step", "tokens a stage ran per engine step, mean",
                              labels=["node", "layers", "window"]),
            "hop_rate": G("continuo_hop_bytes_per_second", "bytes per second over a hop of the pipeline",
                          labels=["src", "dst", "window"]),
            "hop_time": G("continuo_hop_transfer_seconds", "send to delivery over a hop per engine step, mean",
                          labels=["src", "dst", "window"]),
        }
        used = G("continuo_kv_blocks_used", "KV blocks in use on a node (last step)", labels=["node"])
        total = G("continuo_kv_blocks_total", "KV blocks allocated on a node", labels=["node"])
        for node, kv in snap["now"]["kv"].items():
            used.add_metric([node], kv["used_blocks"])
            total.add_metric([node], kv["total_blocks"])

        def put(key, labels, value):
            if value is not None:
                fams[key].add_metric(labels, value)
        for name, w in snap["windows"].items():
            put("arrival_rate", [name], w["arrival_rate"])
            put("prompt", [name], w["prompt_tokens_per_s"])
            put("output", [name], w["output_tokens_per_s"])
            put("queue_mean", [name], w["queue_depth"]["mean"])
            put("queue_max", [name], w["queue_depth"]["max"])
            put("running", [name], w["running"]["mean"])
            for q, label in (("p50", "0.5"), ("p99", "0.99")):
                put("ttft", [name, label], w["ttft_s"][q])
                put("tpot", [name, label], w["tpot_s"][q])
            put("steps", [name], w["steps"]["per_s"])
            put("wall", [name], w["steps"]["wall_s"])
            for node, kv in w["kv_use"].items():
                put("kv_use", [node, name], kv["mean"])
            for st in w["stages"]:
                labels = [st["node"], "{}-{}".format(*st["layers"]), name]
                put("stage", labels, st["step_s"])
                put("compute", labels, st["compute_s"])
                put("comm", labels, st["comm_s"])
                put("stage_tokens", labels, st["tokens_per_step"])
            for hop in w["hops"]:
                put("hop_rate", [hop["src"], hop["dst"], name], hop["bytes_per_s"])
                put("hop_time", [hop["src"], hop["dst"], name], hop["transfer_s"])
        enabled = G("continuo_telemetry_enabled", "1 when the service records telemetry")
        enabled.add_metric([], 1 if snap["enabled"] else 0)
        yield from [*fams.values(), used, total, enabled]


# --- /admin/stats: the telemetry document, as the OpenAPI schema describes it ------------------------

class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quantiles(_Doc):
    p50: float | None
    p99: float | None
    n: int = Field(description="samples in the window")


class MeanMax(_Doc):
    mean: float | None
    max: float | None


class StepStats(_Doc):
    n: int
    per_s: float
    wall_s: float | None = Field(description="mean engine step: schedule, stages, sampling")
    tokens: float | None = Field(description="mean tokens per step (pipeline steps)")
    rows: float | None = Field(description="mean requests per step (pipeline steps)")


class StageStats(_Doc):
    node: str
    layers: list[int] = Field(description="[first, one past the last]")
    steps: int
    step_s: float | None = Field(description="mean per engine step: compute + comm")
    compute_s: float | None
    comm_s: float | None = Field(description="waiting on receives (the stage before, the hop) + staging sends")
    tokens_per_step: float | None
    rows_per_step: float | None
    decode_steps: int = Field(description="steps in which every row decoded one token")
    decode_compute_s: float | None = Field(description="mean compute of decode-only steps")
    decode_rows_per_step: float | None = Field(description="mean rows of the decode-only steps")
    decode_context: float | None = Field(description="mean tokens of context per row in the decode-only steps")
    prefill_steps: int = Field(description="steps with prompt tokens")
    prefill_compute_s: float | None = Field(description="mean compute of steps with prompt tokens")
    prefill_tokens_per_step: float | None = Field(description="mean tokens of the steps with prompt tokens")


class HopStats(_Doc):
    src: str = Field(description="a node, or 'driver' (the engine's process)")
    dst: str
    kind: Literal["control", "activations", "logits"]
    bytes_per_step: float | None
    bytes_per_s: float
    transfer_s: float | None = Field(description="mean send-to-delivery time per engine step")


class TransportStats(_Doc):
    steps: int = Field(description="steps with one group in flight and no micro-batches: each receiver waited "
                                   "for its message, so a transfer time is the message's, not a queue's")
    hops: list[HopStats] = Field(description="the hops of those steps")
    driver_s: float | None = Field(description="mean engine step less the pipeline's forward in those steps: "
                                               "the driver's own turn (scheduling, sampling)")


class PipelineStats(_Doc):
    ttft_s: Quantiles
    tpot_s: Quantiles


class WindowStats(_Doc):
    seconds: float
    span_s: float = Field(description="seconds covered so far (less than `seconds` just after start)")
    arrival_rate: float = Field(description="requests per second")
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    finished: dict[str, int] = Field(description="requests that finished, by outcome")
    queue_depth: MeanMax
    running: MeanMax
    ttft_s: Quantiles
    tpot_s: Quantiles
    pipelines: dict[str, PipelineStats] = Field(
        description="TTFT and TPOT of the requests each pipeline served: 'plan', or a replica's name")
    steps: StepStats
    kv_use: dict[str, MeanMax] = Field(description="per node: KV blocks in use / allocated")
    stages: list[StageStats]
    hops: list[HopStats]
    transport: TransportStats = Field(description="what a pass costs beyond the stages' compute, for the cost "
                                                  "model (policies.costmodel.Corrections.observe_transport)")


class KVNow(_Doc):
    used_blocks: int
    total_blocks: int
    use: float | None


class NowStats(_Doc):
    queue_depth: int | None
    running: int | None
    kv: dict[str, KVNow]


class EmulatedLink(_Doc):
    src: str
    dst: str
    bandwidth_gbps: float
    latency_ms: float


class EmulatedLinks(_Doc):
    driver_node: str = Field(description="the node the driver (engine process) is placed beside")
    links: list[EmulatedLink]


class EngineStats(_Doc):
    max_num_seqs: int = Field(description="seats: sequences in flight at most")
    max_prefill_tokens: int = Field(description="prompt tokens per step when nothing decodes")
    max_prefill_tokens_decoding: int = Field(description="prompt tokens per step while others decode (a prompt "
                                                         "arriving then takes ceil(tokens / this) steps)")


class StatsBody(_Doc):
    """GET /admin/stats: the service's telemetry over rolling windows (README: Telemetry)."""
    enabled: bool
    uptime_s: float
    now: NowStats
    windows: dict[str, WindowStats] = Field(description="by window length, e.g. '60s', '10s'")
    links: EmulatedLinks | None = Field(description="the emulated links, when the workers run behind them")
    engine: EngineStats | None = Field(None, description="how the plan's engine schedules")


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


class ReplicaBody(BaseModel):
    """POST /admin/replicas: a plan for nodes of their own (the same shape as /admin/reconfigure's)."""
    model_config = ConfigDict(extra="forbid")
    plan: dict[str, Any]
    name: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
                             description="the replica's name (default r1, r2, ...)")


# --- the app --------------------------------------------------------------------------------------

def create_app(service: Service, default_max_tokens: int = 256, *, api_keys: Iterable[str] | None = None,
               admin_tokens: Iterable[str] | None = None, protect_metrics: bool = False) -> FastAPI:
    """The app over a service. api_keys open /v1 and admin_tokens open /admin (none: that door is
    open, except that /admin closes as soon as API keys are set: an API key never opens it).
    protect_metrics: /metrics and /health take the admin token too."""
    keys, tokens = Credentials(api_keys, "api_keys"), Credentials(admin_tokens, "admin_tokens")
    if protect_metrics and not tokens:
        raise ValueError("protect_metrics needs an admin token to open /metrics and /health with")
    app = FastAPI(title="Continuo", version="0.1")
    metrics = Metrics(service)
    app.state.service, app.state.metrics = service, metrics
    if keys or tokens:
        app.add_middleware(_AuthGate, api_keys=keys, admin_tokens=tokens, protect_metrics=protect_metrics)
    # What each family of routes declares in /openapi.json (the gate enforces the same by path).
    v1 = API_KEY if keys else None
    admin = ADMIN_TOKEN if (keys or tokens) else None
    ops = ADMIN_TOKEN if protect_metrics else None

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        e = exc.errors()[0]
        # pydantic puts the union member it tried into the location (messages.0.user.content,
        # content.str, tool_choice.NamedToolChoice...); the client's JSON has no such key
        loc = [p for i, p in enumerate(e["loc"]) if not _union_member(p, e["loc"][i - 1] if i else None)]
        param = ".".join(str(p) for p in loc if p != "body") or None
        top = str(loc[1]) if len(loc) > 1 else None
        if e["type"] == "json_invalid":             # its location is a character offset, not a field
            return _err(400, f"body: not valid JSON ({e.get('ctx', {}).get('error', e['msg'])} at character "
                             f"{e['loc'][-1]})")
        if e["type"] == "extra_forbidden":
            msg = f"unsupported parameter '{param}': Continuo does not serve it"
        elif top in UNSERVED and len(loc) == 2:
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
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # the router's own answers (404 no such route, 405 wrong method), in the same shape as ours
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                        headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        # Anything that reaches here is a bug of ours, not the client's: it surfaces as a 500 in
        # OpenAI's shape, and is logged with its traceback (Starlette re-raises it after this
        # answer, so the server logs it too, and a test client raises it).
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _err(500, f"internal error ({type(exc).__name__}); the server's log has the details",
                    "server_error", code="internal_error")

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

    @app.get("/v1/models", **_protected(v1, RESPONSES))
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": int(service.started), "owned_by": "continuo"}]}

    @app.post("/v1/completions", **_protected(v1, GENERATION_RESPONSES))
    async def completions(body: CompletionRequest):
        check_model(body.model)
        if isinstance(body.prompt, str) and service.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send the prompt as a list of token ids", param="prompt")
        if isinstance(body.prompt, list):
            # an id outside the embedding's rows would fail inside a step, on the engine's thread
            vocab = service.engine.vocab_size or (len(service.tokenizer) if service.tokenizer is not None else None)
            bad = [t for t in body.prompt if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary"
                                    + (f" (ids 0 to {vocab - 1})" if vocab is not None else ""), param="prompt")
        try:
            grammar = structured_grammar(body)
        except chat_format.ParamError as e:
            raise APIError(400, str(e), param=e.param) from None
        return await respond(body.prompt, body, False, grammar, "structured_outputs", body.logprobs, [])

    @app.post("/v1/chat/completions", **_protected(v1, GENERATION_RESPONSES))
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
        except (jinja2.TemplateError, ValueError) as e:
            # The template's raise_exception (e.g. roles out of order) raises TemplateError;
            # transformers raises ValueError for a conversation it cannot render.
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        grammar_param = ("structured_outputs" if body.structured_outputs else
                         "tools" if callable_ else "response_format")
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(list(ids), body, True, grammar, grammar_param, top, chat_format.tool_names(callable_))

    @app.get("/health", response_model=Health, **_protected(ops, {
        503: {"model": Health, "description": "degraded: a worker died, or the engine loop stopped"}, 500: _BUG}))
    async def health():
        h = service.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics", response_class=Response, **_protected(ops, {
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        500: _BUG}))
    async def prom():
        # Cheap to scrape: liveness from the worker processes' state, everything else from telemetry
        # (what the workers sent with their step replies); no command goes to a worker.
        for n, state in service.health()["nodes"].items():
            metrics.alive.labels(n).set(1 if state == "ok" else 0)
        return Response(await asyncio.to_thread(generate_latest, metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/stats", response_model=StatsBody, **_protected(admin, ADMIN_RESPONSES))
    async def admin_stats():
        """The telemetry windows as one document (what /metrics exports, and more)."""
        return await asyncio.to_thread(service.stats)

    @app.get("/admin/plan", **_protected(admin, ADMIN_RESPONSES))
    async def admin_plan():
        vp = service.plan
        return {"model": service.model_name, "plan": vp.plan.model_dump(mode="json") if vp else None,
                "cluster_fingerprint": vp.cluster_fingerprint if vp else None, "policy": vp.policy if vp else None}

    @app.post("/admin/reconfigure", **_protected(admin, RECONFIGURE_RESPONSES))
    async def admin_reconfigure(body: ReconfigureBody):
        """Validate the plan against the live state (policy, transition, freshness), then apply it."""
        out = await asyncio.to_thread(_admin_call, service.reconfigure_plan, body.plan, body.method, body.wait)
        return out if isinstance(out, JSONResponse) else out.as_dict()

    @app.get("/admin/replicas", **_protected(admin, ADMIN_RESPONSES))
    async def admin_replicas():
        """The pipelines beside the plan's: nodes, stages, state, what each holds."""
        return {"replicas": service.replicas()}

    @app.post("/admin/replicas", **_protected(admin, REPLICA_RESPONSES))
    async def admin_add_replica(body: ReplicaBody):
        """Validate the plan as a pipeline of its own against the live state and load it on its nodes,
        which must be idle and live; new requests then go to the pipeline with the shortest queue.
        Answers once the replica serves (its stages load meanwhile; the others serve on)."""
        out = await asyncio.to_thread(_admin_call, service.add_replica_plan, body.plan, body.name)
        return out if isinstance(out, JSONResponse) else out.as_dict()

    @app.delete("/admin/replicas/{name}", **_protected(admin, REPLICA_RESPONSES))
    async def admin_drain_replica(name: str, wait: bool = False):
        """Drain a replica: no new requests go to it; it leaves once it has finished the ones it holds
        (none is lost), and its nodes are free again. wait=true answers once it has left."""
        out = await asyncio.to_thread(_admin_call, service.drain_replica, name, wait)
        return out.as_dict()

    @app.get("/admin/reconfigurations", **_protected(admin, ADMIN_RESPONSES))
    async def admin_reconfigurations():
        cur = service.loop.reconfig
        return {"current": cur.report.as_dict() if cur is not None else None,
                "history": [r.as_dict() for r in service.history]}

    @app.get("/admin/nodes", **_protected(admin, ADMIN_RESPONSES))
    async def admin_nodes():
        return {"nodes": await asyncio.to_thread(_safe_nodes, service), "health": service.health()}

    _honest_openapi(app)
    return app


def _honest_openapi(app: FastAPI) -> None:
    """FastAPI documents a 422 'Validation Error' on every route with a body or parameters; this
    app answers those with a 400 in OpenAI's shape (RESPONSES says so), so the 422 entries go,
    except where a route documents its own 422 (/admin/reconfigure's plan rejection)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)            # builds and caches app.openapi_schema
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    if op.get("responses", {}).get("422", {}).get("description") == "Validation Error":
                        del op["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema
    app.openapi = openapi


def _safe_nodes(service: Service) -> list[dict]:
    """Per-node state, or only what health knows when the workers cannot be asked."""
    try:
        return service.node_states()
    except (WorkerDied, TimeoutError):   # a dead worker or a stuck engine loop must not take /admin/nodes down
        return [{"node": n, "state": s} for n, s in service.health()["nodes"].items()]
