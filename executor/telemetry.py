"""Telemetry: what the running service measures of itself, over rolling windows.

    arrivals, prompt / output token rates, queue depth, running requests, KV use per node,
    TTFT / TPOT p50 / p99, per-stage step time (compute vs communication), per-hop bytes and time

Fed on the engine thread: request arrivals and first tokens (Service.submit), finished requests,
and every engine step with the records each stage's worker put in the header of what it sent on
(transport.STEP_RECORD), which reach the driver with the logits: no message of their own, no round
trip. Read by /metrics and GET /admin/stats (`snapshot()`), and by the cost model's correction
factors (`stage_times()`). Reading never talks to a worker: a scrape costs one pass over the samples
of the longest window.

Samples older than the longest window are dropped as new ones come, so memory stays bounded by
what a minute of traffic leaves: one sample per step, per request, per 0.25 s of tokens.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .transport import STEP_RECORD

WINDOWS = (60.0, 10.0)        # seconds: a minute for planning, a shorter one to see a change soon
_BIN = 0.25                   # token counts are kept per quarter second, not per token


@dataclass(frozen=True)
class StageSample:
    """One stage in one engine step (its micro-batches summed)."""
    node: str
    start: int
    end: int
    recv_s: float                # waiting for activations (the stage before it, and the hop)
    compute_s: float
    send_s: float                # staging the output for sending
    tokens: int
    rows: int
    kv_used: int                 # KV blocks in use on the node after the step
    kv_total: int
    in_bytes: int                # activations in from the stage before (0 for the first)
    in_transfer_s: float
    ctl_bytes: int               # the Step message(s) from the driver
    ctl_transfer_s: float

    @property
    def comm_s(self) -> float:
        return self.recv_s + self.send_s

    @property
    def step_s(self) -> float:
        return self.recv_s + self.compute_s + self.send_s


@dataclass(frozen=True)
class StepSample:
    t: float                     # when the step ended (the telemetry clock)
    wall_s: float                # the engine's whole step: schedule, stages, sampling
    queue: int
    running: int
    rows: int = 0                # batch shape (0 when the engine's stages are not a pipeline)
    tokens: int = 0
    decode: bool = False         # every row decodes one token
    context: float = 0.0         # mean tokens of context per row after the step
    micro_batches: int = 0
    forward_s: float = 0.0       # the pipeline's forward, as the driver saw it
    stages: tuple[StageSample, ...] = ()
    out_node: str | None = None  # the last stage, whose logits came back
    out_bytes: int = 0
    out_transfer_s: float = 0.0


@dataclass(frozen=True)
class StageTime:
    """A stage's measured step time over a window (means per engine step), for the cost model:
    overall, and apart for decode-only steps and for steps with prompt tokens."""
    node: str
    start: int
    end: int
    steps: int
    step_s: float
    compute_s: float
    comm_s: float
    tokens_per_step: float
    rows_per_step: float
    decode_steps: int
    decode_compute_s: float | None
    decode_rows_per_step: float | None
    decode_context: float | None     # mean tokens of context per row in the decode-only steps
    prefill_steps: int
    prefill_compute_s: float | None
    prefill_tokens_per_step: float | None


def _pct(xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None for no samples."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def window_name(seconds: float) -> str:
    return f"{seconds:g}s"


class Telemetry:
    """Rolling windows of the service's own figures. Thread-safe: fed by the engine thread, read
    by HTTP handlers."""

    def __init__(self, windows: Sequence[float] = WINDOWS, clock: Callable[[], float] = time.monotonic):
        if not windows or any(w <= 0 for w in windows):
            raise ValueError(f"telemetry windows must be positive seconds, not {list(windows)}")
        self.windows = tuple(sorted(set(float(w) for w in windows), reverse=True))
        self.horizon = self.windows[0]
        self.clock = clock
        self.enabled = True
        self.started = clock()
        self.node_of: Callable[[int], str] = lambda rank: f"rank{rank}"
        self.lock = threading.Lock()
        self.arrivals: deque[tuple[float, int]] = deque()       # (t, prompt tokens)
        # which pipeline served each request ("plan", or a replica's name): the service's figures mix
        # them, and a controller correcting its model of the plan wants the plan's own
        self.ttfts: deque[tuple[float, float, str]] = deque()   # (t of the first token, TTFT s, pipeline)
        self.finishes: deque[tuple[float, float | None, str, str]] = deque()   # (t, TPOT s or None, outcome, pipeline)
        self.tokens: deque[list] = deque()                      # [bin start, output tokens in it]
        self.steps: deque[StepSample] = deque()
        self.kv_now: dict[str, tuple[int, int]] = {}            # node -> (used, total) blocks, last seen
        # the pipeline's part of the steps that finished since the engine loop last recorded one: with
        # groups of requests in flight an engine step may finish none, one or (draining) several
        self._pending: list[dict[str, Any]] = []

    # --- feeding (engine thread) ---------------------------------------------------------------

    def _prune(self, now: float) -> None:
        old = now - self.horizon
        for q in (self.arrivals, self.ttfts, self.finishes):
            while q and q[0][0] < old:
                q.popleft()
        while self.tokens and self.tokens[0][0] < old - _BIN:
            self.tokens.popleft()
        while self.steps and self.steps[0].t < old:
            self.steps.popleft()

    def arrival(self, prompt_tokens: int) -> None:
        with self.lock:
            self.arrivals.append((self.clock(), prompt_tokens))

    def first_token(self, ttft_s: float, pipeline: str = "plan") -> None:
        with self.lock:
            self.ttfts.append((self.clock(), ttft_s, pipeline))

    def token(self, n: int = 1) -> None:
        now = self.clock()
        b = now - now % _BIN
        with self.lock:
            if self.tokens and self.tokens[-1][0] == b:
                self.tokens[-1][1] += n
            else:
                self.tokens.append([b, n])

    def finished(self, tpot_s: float | None, outcome: str, pipeline: str = "plan") -> None:
        with self.lock:
            self.finishes.append((self.clock(), tpot_s, outcome, pipeline))

    def pipeline_step(self, batch, route, received: Sequence, t0: float, t1: float) -> None:
        """DistributedPipeline.on_step: the batch, its route, what came back per micro-batch
        (transport.Received, whose meta holds every stage's STEP_RECORD)."""
        n = len(STEP_RECORD)
        per: dict[int, list] = {}
        for got in received:
            meta = got.meta
            for i in range(0, len(meta) - n + 1, n):
                per.setdefault(meta[i], []).append(dict(zip(STEP_RECORD, meta[i:i + n])))
        stages = []
        for hop in route:
            recs = per.get(hop.rank)
            if not recs:
                continue
            s = lambda k: sum(r[k] for r in recs)  # noqa: E731
            stages.append(StageSample(self.node_of(hop.rank), hop.start, hop.end, s("recv_us") / 1e6,
                                      s("compute_us") / 1e6, s("send_us") / 1e6, s("tokens"), s("rows"),
                                      recs[-1]["kv_used"], recs[-1]["kv_total"], s("in_bytes"),
                                      s("in_transfer_us") / 1e6, s("ctl_bytes"), s("ctl_transfer_us") / 1e6))
        rows = len(batch.req_ids)
        self._pending.append({
            "rows": rows, "tokens": sum(batch.num_new), "decode": all(k == 1 for k in batch.num_new),
            "context": sum(a + k for a, k in zip(batch.starts, batch.num_new)) / max(1, rows),
            "micro_batches": len(received), "forward_s": t1 - t0, "stages": tuple(stages),
            "out_node": self.node_of(route[-1].rank), "out_bytes": sum(g.nbytes for g in received),
            "out_transfer_s": sum(g.transfer_s for g in received)})

    def step(self, wall_s: float, queue: int, running: int, local_kv: dict[str, tuple[int, int]] | None = None) -> None:
        """An engine step ended (EngineLoop): the loop's figures, with the pipeline's part of every
        pipeline step that finished meanwhile (one sample each), or alone."""
        parts, self._pending = self._pending or [{}], []
        now = self.clock()
        samples = [StepSample(now, wall_s, queue, running, **part) for part in parts]
        with self.lock:
            self.steps.extend(samples)
            for st in (st for s in samples for st in s.stages):
                self.kv_now[st.node] = (st.kv_used, st.kv_total)
            if local_kv:
                self.kv_now.update(local_kv)
            self._prune(now)

    # --- reading ---------------------------------------------------------------------------------

    def _copy(self):
        with self.lock:
            self._prune(self.clock())
            return (list(self.arrivals), list(self.ttfts), list(self.finishes), [tuple(b) for b in self.tokens],
                    list(self.steps), dict(self.kv_now))

    def _span(self, now: float, window: float) -> float:
        """The seconds a window covers so far (less than its length just after start)."""
        return max(1e-9, min(window, now - self.started))

    def stage_times(self, window_s: float | None = None, since: float | None = None) -> list[StageTime]:
        """Per stage (node and layer range) measured in the window (default: the longest), in
        pipeline order: mean step, compute and communication time per engine step. `since`: steps
        after this time of the telemetry clock only (a warm-up's, say, without the cold steps before it
        or an earlier plan's steps on a stage of the same node and layers)."""
        window_s = self.horizon if window_s is None else window_s
        if not 0 < window_s <= self.horizon:
            raise ValueError(f"window_s must be in (0, {self.horizon:g}] (the longest window kept), not {window_s}")
        now = self.clock()
        start = max(now - window_s, since if since is not None else -math.inf)
        return _stage_times([s for s in self._copy()[4] if s.t >= start])

    def transport(self, window_s: float | None = None, since: float | None = None) -> dict[str, Any]:
        """What a pass costs beyond the stages' compute, for the cost model (Corrections.observe_transport):
        per hop, the mean bytes and transfer time of a step's message, and the driver's own time per step
        (the whole step less the pipeline's forward). Only steps with one group in flight and no
        micro-batches count (every running request in the step): there each receiver waits for its
        message, so its transfer time is the message's, not a queue's. `since`: steps after this time
        of the telemetry clock only (a new plan's, say)."""
        window_s = self.horizon if window_s is None else window_s
        if not 0 < window_s <= self.horizon:
            raise ValueError(f"window_s must be in (0, {self.horizon:g}] (the longest window kept), not {window_s}")
        now = self.clock()
        start = max(now - window_s, since if since is not None else -math.inf)
        return _transport([s for s in self._copy()[4] if s.t >= start], max(now - start, 1e-9))

    def stage_time(self, node: str, window_s: float | None = None) -> StageTime | None:
        """The stage a node serves now (its latest layer range), measured over the window."""
        times = [t for t in self.stage_times(window_s) if t.node == node]
        if not times:
            return None
        latest = next((st for s in reversed(self._copy()[4]) for st in s.stages if st.node == node), None)
        return next((t for t in times if latest and (t.start, t.end) == (latest.start, latest.end)), times[-1])

    def snapshot(self, queue: int | None = None, running: int | None = None) -> dict[str, Any]:
        """Everything, as one JSON-ready document (GET /admin/stats; /metrics reads the same)."""
        arrivals, ttfts, finishes, tokens, steps, kv_now = self._copy()
        now = self.clock()
        out: dict[str, Any] = {
            "enabled": self.enabled, "uptime_s": now - self.started,
            "now": {"queue_depth": queue, "running": running,
                    "kv": {n: {"used_blocks": u, "total_blocks": t, "use": u / t if t else None}
                           for n, (u, t) in sorted(kv_now.items())}},
            "windows": {}}
        for w in self.windows:
            since, span = now - w, self._span(now, w)
            arr = [p for t, p in arrivals if t >= since]
            ws = [s for s in steps if s.t >= since]
            # one pass over each: the service's figures, and the same per pipeline that served them
            ttft, tpot, outs = [], [], {}
            per: dict[str, dict[str, list[float]]] = {}
            for t, v, pl in ttfts:
                if t >= since:
                    ttft.append(v)
                    per.setdefault(pl, {"ttft": [], "tpot": []})["ttft"].append(v)
            for t, tp, o, pl in finishes:
                if t >= since:
                    outs[o] = outs.get(o, 0) + 1
                    if tp is not None:
                        tpot.append(tp)
                        per.setdefault(pl, {"ttft": [], "tpot": []})["tpot"].append(tp)
            kv: dict[str, list[float]] = {}
            for s in ws:
                for st in s.stages:
                    if st.kv_total:
                        kv.setdefault(st.node, []).append(st.kv_used / st.kv_total)
            out["windows"][window_name(w)] = {
                "seconds": w, "span_s": span,
                "arrival_rate": len(arr) / span,
                "prompt_tokens_per_s": sum(arr) / span,
                "output_tokens_per_s": sum(n for b, n in tokens if b >= since) / span,
                "finished": outs,
                "queue_depth": {"mean": _mean([s.queue for s in ws]), "max": max((s.queue for s in ws), default=None)},
                "running": {"mean": _mean([s.running for s in ws]), "max": max((s.running for s in ws), default=None)},
                "ttft_s": {"p50": _pct(ttft, .5), "p99": _pct(ttft, .99), "n": len(ttft)},
                "tpot_s": {"p50": _pct(tpot, .5), "p99": _pct(tpot, .99), "n": len(tpot)},
                "pipelines": {pl: {k + "_s": {"p50": _pct(v, .5), "p99": _pct(v, .99), "n": len(v)}
                                   for k, v in d.items()} for pl, d in sorted(per.items())},
                "steps": {"n": len(ws), "per_s": len(ws) / span, "wall_s": _mean([s.wall_s for s in ws]),
                          "tokens": _mean([s.tokens for s in ws if s.rows]),
                          "rows": _mean([s.rows for s in ws if s.rows])},
                "kv_use": {n: {"mean": _mean(v), "max": max(v)} for n, v in sorted(kv.items())},
                "stages": [{"node": t.node, "layers": [t.start, t.end], "steps": t.steps, "step_s": t.step_s,
                            "compute_s": t.compute_s, "comm_s": t.comm_s, "tokens_per_step": t.tokens_per_step,
                            "rows_per_step": t.rows_per_step, "decode_steps": t.decode_steps,
                            "decode_compute_s": t.decode_compute_s, "decode_rows_per_step": t.decode_rows_per_step,
                            "decode_context": t.decode_context, "prefill_steps": t.prefill_steps,
                            "prefill_compute_s": t.prefill_compute_s,
                            "prefill_tokens_per_step": t.prefill_tokens_per_step} for t in _stage_times(ws)],
                "hops": _hops(ws, span),
                "transport": _transport(ws, span),
            }
        return out


def _stage_times(steps: Sequence[StepSample]) -> list[StageTime]:
    by: dict[tuple[str, int, int], list[tuple[StepSample, StageSample]]] = {}
    for s in steps:
        for st in s.stages:
            by.setdefault((st.node, st.start, st.end), []).append((s, st))
    out = []
    for (node, a, b), xs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        dec = [st for s, st in xs if s.decode]
        pre = [st for s, st in xs if not s.decode]
        out.append(StageTime(
            node, a, b, len(xs), _mean([st.step_s for _, st in xs]), _mean([st.compute_s for _, st in xs]),
            _mean([st.comm_s for _, st in xs]), _mean([st.tokens for _, st in xs]), _mean([st.rows for _, st in xs]),
            len(dec), _mean([st.compute_s for st in dec]), _mean([st.rows for st in dec]),
            _mean([s.context for s, _ in xs if s.decode]),
            len(pre), _mean([st.compute_s for st in pre]), _mean([st.tokens for st in pre])))
    return out


def _transport(steps: Sequence[StepSample], span: float) -> dict[str, Any]:
    """Telemetry.transport's figures of `steps`: those with one group in flight and no micro-batches."""
    one = [s for s in steps if s.stages and s.rows and s.running <= s.rows and s.micro_batches <= 1]
    return {"steps": len(one), "hops": _hops(one, span) if one else [],
            "driver_s": _mean([max(0.0, s.wall_s - s.forward_s) for s in one])}


def _hops(steps: Sequence[StepSample], span: float) -> list[dict[str, Any]]:
    """Per hop (driver -> stage: the step message; stage -> next stage: activations; last stage ->
    driver: logits): bytes per step, bytes per second, mean time from send to delivery per step."""
    acc: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for s in steps:
        prev = None
        for st in s.stages:
            acc.setdefault(("driver", st.node), []).append((st.ctl_bytes, st.ctl_transfer_s))
            if prev is not None:
                acc.setdefault((prev, st.node), []).append((st.in_bytes, st.in_transfer_s))
            prev = st.node
        if s.out_node is not None and s.stages:
            acc.setdefault((s.out_node, "driver"), []).append((s.out_bytes, s.out_transfer_s))
    return [{"src": a, "dst": b, "kind": "control" if a == "driver" else "logits" if b == "driver" else "activations",
             "bytes_per_step": _mean([n for n, _ in xs]), "bytes_per_s": sum(n for n, _ in xs) / span,
             "transfer_s": _mean([t for _, t in xs])} for (a, b), xs in acc.items()]
