"""The simulator: a discrete-event model of the serving pipeline, driven by the calibrated cost model.

    from policies.simulator import simulate, SimConfig, Reconfig
    result = simulate(cluster, plan, model, trace, profiles=load_profiles(), intent=intent)

What it models, as executor/engine.py and runtime.py run it:

- one engine loop: each step admits waiting requests FIFO while seats (max_num_seqs) and the KV
  pool allow (a request reserves blocks for prompt + output when admitted, as the engine does),
  decodes one token for every running request past its prompt and adds prompt chunks: up to
  max_prefill_tokens per step, max_prefill_tokens_decoding while others decode (chunked prefill).
  A request whose prompt completes in a step gets its first token at that step's end; where a
  step of prompts alone reaches an idle pipeline (a wave), at its group's end instead: the groups'
  micro-batches go through the stages as a flow shop (costmodel.flow_shop, the cost model's TTFT),
  so group 0's first tokens come before group 1's, and all that group's tokens keep that lag.
- the pipeline: a step goes through every stage in order, each stage's time from the cost model
  (its profile where one exists, datasheet figures where not, times its correction factor),
  each hop's from the link (latency + activation bytes / bandwidth). A step with at least
  16 tokens per stage is cut into k micro-batches that overlap (runtime.DistributedPipeline):
  time = sum of stage times + (parts - 1) * the slowest (the fill and drain bubbles). With
  groups_in_flight g > 1 (the engine of issue 15) a round steps every group once and takes
  max(one group's pass, g * the slowest stage) (the steady state of a full pipeline).
- a step's stage time for d decode rows at mean context c, p prompt tokens and r sampled rows:
    profile:   stage_ms + layers * (layer_decode(d, c) + [layer_prefill(d + p) - layer_prefill(d)])
               + embed_ms + head(r)              (prefill alone: layers * layer_prefill(p))
    datasheet: layers * max(layer weights + d * c KV reads / bandwidth, (d + p) token FLOPs / compute)
               + LM head (max of its weight read and r rows of FLOPs)
- reconfigurations (Reconfig): at a time, a new plan; weights of moved layers travel over the links
  between their old and new owners (pairs in parallel, runs on one pair one after another), then
  the KV of in-flight requests for those layers (pre-copy, serving goes on); the switch pauses
  serving for two round trips plus the last delta (one step's tokens of KV), "live"; or for the
  whole transfer, "stop_and_copy".

Events: one per request arrival, one per engine step (not per token, not per layer: a step's time
is a closed form over a few classes of identical stages), one per reconfiguration phase, on a
heapq. Per-request work is O(log n) (a heap of decode finishing steps), so an hour at 50 req/s over
64 stages runs in seconds (see `continuo simulate --speed`).
"""
from __future__ import annotations

import bisect
import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field

from .cluster import Cluster
from .costmodel import (MICRO_BATCH_MIN_TOKENS, Corrections, StageShape, _speed, closed_cycle_ms, flow_shop, hop_ms,
                        host_slowdowns, logits_hop_ms, micro_batches)
from .delta import PlanDelta
from .intent import KV_BLOCK_TOKENS, IntentSpec, Traffic
from .modelspec import ModelSpec
from .plan import PlacementPlan
from .profile import ProfileSet
from .traces import Trace



@dataclass(frozen=True)
class SimConfig:
    """The engine's knobs (defaults: executor/engine.py EngineConfig) and what the pipeline assumes."""
    max_num_seqs: int = 16
    max_waiting: int = 64
    max_prefill_tokens: int = 512
    max_prefill_tokens_decoding: int = 8
    max_model_len: int | None = None     # default: the plan's KV reservation per request (kv tokens)
    kv_blocks: int | None = None         # default: the intent's traffic.kv_blocks (what the validator reserves)
    block_size: int = KV_BLOCK_TOKENS
    groups_in_flight: int = 1
    micro_batches: bool = True           # cut large steps into k micro-batches, as the runtime does
    step_overhead_ms: float = 0.0        # the driver's own time per step (scheduling, sampling), if known
    stage_io: bool = True                # a stage's messages occupy it once per group (costmodel's io_s)
    corun_driver: bool = True            # the driver and the stages' messages work on a shared host's cores too
    queueing: bool = True                # groups queue at the stages near balance (costmodel.closed_cycle_ms)


@dataclass(frozen=True)
class Reconfig:
    """At `at_s`, move to `plan` (live: pre-copy then a short switch; stop_and_copy: pause for all of it).
    config: the engine's knobs from the switch on (a plan that reserves KV for more sequences seats
    more), None to keep them."""
    at_s: float
    plan: PlacementPlan
    method: str = "live"
    config: SimConfig | None = None


@dataclass
class ReconfigOutcome:
    at_s: float
    switched_s: float
    weight_bytes: float
    kv_bytes: float
    prepare_s: float
    precopy_s: float
    pause_s: float
    method: str


@dataclass
class SimResult:
    requests: int
    finished: int
    rejected: int
    ttft_ms_p50: float | None
    ttft_ms_p99: float | None
    tpot_ms_p50: float | None
    tpot_ms_p99: float | None
    slo_attainment: float | None         # share of finished requests within the intent's TTFT and TPOT bounds
    throughput_tok_s: float
    duration_s: float
    node_seconds: float
    steps: int
    stage_utilisation: list[dict]        # per stage of the last plan: node, layers, busy share
    reconfigurations: list[ReconfigOutcome] = field(default_factory=list)
    sim_wall_s: float = 0.0
    sources: list[str] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list, repr=False)     # per finished request, in trace order
    tpot_ms: list[float] = field(default_factory=list, repr=False)     # (requests of more than one token)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("ttft_ms", "tpot_ms")}
        d["reconfigurations"] = [r.__dict__ for r in self.reconfigurations]
        return d


class _Stages:
    """One plan's stages as a few classes of identical stages; a step's time is a sum over classes."""

    def __init__(self, plan: PlacementPlan, cluster: Cluster, model: ModelSpec, profiles: ProfileSet | None,
                 corrections: Corrections | None, driver_node: str | None = None):
        L = model.num_layers
        self.k = len(plan.stages)
        self.model = model
        self.nodes = [s.node for s in plan.stages]
        self.ranges = [(s.node, s.start, s.stop) for s in plan.stages]
        # the last step's shape, for a Session's per-stage telemetry: (engine steps it stands for,
        # decoding rows and prompt tokens per step, compute ms per step of each class)
        self.last: tuple[int, float, float, list[float]] = (0, 0.0, 0.0, [])
        self.sources: list[str] = []
        raw, classes = [], {}
        # the transport's cost per message beyond the link model, and the driver's turn per step
        # (Corrections.observe_transport; costmodel.estimate counts the same)
        msg_fixed = corrections.message_fixed_ms if corrections else 0.0
        msg_per_mb = corrections.message_ms_per_mb if corrections else 0.0
        act_mb = model.hidden_size * model.dtype_bytes / 1e6
        self.stage_class: list[int] = []
        self.class_host: list[str | None] = []
        self.class_slow: list = []          # each class's co-run slowdown of a decode step, and of a prefill step
        self.class_pre_slow: list = []
        for i, st in enumerate(plan.stages):
            node = cluster.node(st.node)
            prof = profiles.find(node, model.name) if profiles else None
            fp = corrections.factor(st.node, "prefill") if corrections else 1.0
            fd = corrections.factor(st.node, "decode") if corrections else 1.0
            lat, per_tok = 0.0, 0.0
            if i + 1 < self.k:
                link = cluster.link(st.node, plan.stages[i + 1].node)
                if link is None:
                    raise ValueError(f"no link between {st.node} and {plan.stages[i + 1].node}")
                # the link, and the transport's own cost of the message (as the cost model counts it)
                lat = link.latency_ms + msg_fixed
                per_tok = hop_ms(model, link, 1) - link.latency_ms + msg_per_mb * act_mb
            shape = StageShape(st.stop - st.start, st.start == 0, st.stop == L)
            # datasheet speed is per node kind; profiles are per object: both make the class key
            speed = ("p", id(prof)) if prof is not None else ("d", node.gpu, node.gpus)
            key = (shape.layers, shape.embed, shape.head, speed, fp, fd, lat, per_tok, node.host)
            self.sources.append("measured" if prof is not None else "datasheet")
            if key not in classes:
                classes[key] = len(raw)
                bw, fl = _speed(node)
                raw.append([shape, prof, (bw, fl), fp, fd, lat, per_tok, 0])
                self.class_host.append(node.host)
                self.class_slow.append(prof.corun_slowdown if prof is not None else (lambda n: 1.0))
                self.class_pre_slow.append(prof.corun_prefill_slowdown if prof is not None else (lambda n: 1.0))
            raw[classes[key]][-1] += 1
            self.stage_class.append(classes[key])
        self.classes = raw
        # stages that share a host slow each other when they compute at once (costmodel.host_slowdowns):
        # one entry per stage, each class's stages in a row
        self.per_stage = [c for c, cl in enumerate(raw) for _ in range(cl[-1])]      # each stage's class
        self.first_stage = [self.per_stage.index(c) for c in range(len(raw))]        # a stage of each class
        self.stage_host = [self.class_host[c] for c in self.per_stage]
        self.stage_slow = [self.class_slow[c] for c in self.per_stage]
        hosts = [h for h in self.stage_host if h is not None]
        self.shared_host = len(set(hosts)) < len(hosts)
        # the logits of the sampled rows go back to the driver, over a link when it sits on another node;
        # with the transport's cost of them and of the step message to the first stage, and the driver's turn
        last = plan.stages[-1].node
        back = cluster.link(last, driver_node) if driver_node and driver_node != last else None
        self.back_lat = (back.latency_ms if back else 0.0) + 2 * msg_fixed \
            + (corrections.driver_ms if corrections else 0.0)
        self.back_per_row = ((logits_hop_ms(model, back, 1) - back.latency_ms) if back else 0.0) \
            + msg_per_mb * model.vocab_size * 4 / 1e6
        # the driver's work on its node's host per group step (costmodel.estimate's corun_driver): its turn,
        # the step message and the logits, (fixed ms, ms per sampled row)
        self.driver_host = cluster.node(driver_node).host if driver_node else None
        self.driver_work = ((corrections.driver_ms if corrections else 0.0) + 2 * msg_fixed,
                            msg_per_mb * model.vocab_size * 4 / 1e6)
        # what a group's pass spends off the stages, for the queueing of groups at them (costmodel's
        # closed_cycle_ms): the links without the transport's cost (the stages' io counts that), the
        # logits' link back and the driver's turn: (fixed ms, ms per sampled row)
        self.off_stage = ((back.latency_ms if back else 0.0) + (corrections.driver_ms if corrections else 0.0),
                          (logits_hop_ms(model, back, 1) - back.latency_ms) if back else 0.0)
        self.msg = (msg_fixed, msg_per_mb * act_mb)     # the transport's cost of a hop: fixed, per token
        self.busy = [0.0] * len(raw)       # per class: busy ms of ONE stage of the class
        # what a stage's worker spends on each group's messages (costmodel's io_s): the step message, the
        # activations in (not on the first stage) and out, or the logits out: (fixed ms, ms per token of
        # activations, ms per sampled row of logits)
        logits_mb = model.vocab_size * 4 / 1e6
        self.io = [((2 if cl[0].embed else 3) * msg_fixed,
                    msg_per_mb * act_mb * ((0 if cl[0].embed else 1) + (0 if cl[0].head else 1)),
                    msg_per_mb * logits_mb if cl[0].head else 0.0) for cl in raw]

    def _layer_ms(self, prof, speed, d: float, ctx: float, p: float) -> float:
        if prof is not None:
            if d <= 0:
                return prof.layer_prefill_ms(p)
            t = prof.layer_decode_ms(d, ctx)
            if p > 0:
                t += max(0.0, prof.layer_prefill_ms(d + p) - prof.layer_prefill_ms(d))
            return t
        m, (bw, fl) = self.model, speed
        read = m.bytes_per_layer + d * ctx * m.kv_bytes_per_token_per_layer
        work = (d + p) * m.flops_per_token_per_layer + d * m.attention_flops_per_token_per_layer(ctx) \
            + p * m.attention_flops_per_token_per_layer(p / 2)
        return 1e3 * max(read / bw, work / fl)

    def _ends_ms(self, prof, speed, shape: StageShape, rows: float) -> float:
        if prof is not None:
            return prof.stage_ms + (prof.embed_ms if shape.embed else 0.0) + (prof.head_ms(rows) if shape.head else 0.0)
        if not shape.head:
            return 0.0
        m, (bw, fl) = self.model, speed
        return 1e3 * max(m.head_bytes / bw, rows * m.head_flops_per_token / fl)

    @staticmethod
    def groups(d: int, rows: int, cfg: SimConfig) -> int:
        """The groups a step's rows spread over (the engine's, at most one per row)."""
        return max(1, min(cfg.groups_in_flight, d + rows)) if cfg.groups_in_flight > 1 else 1

    def wave_ms(self, takes: list[int], g: int, cfg: SimConfig) -> list[float]:
        """A step of prompts alone (the pipeline idle before it): when each row's first token comes, in
        ms from the step's start, as the cost model's TTFT has it. Row r joins group r % g (the engine
        puts each newcomer in the group with the fewest); each group's step is cut into micro-batches as
        the runtime cuts it; all go through the stages at once in launch order (costmodel.flow_shop,
        stages on one host slowing each other by its co-run table)."""
        jobs, owner = [], []
        for j in range(g):
            rows = list(range(j, len(takes), g))
            sizes = micro_batches(len(rows), sum(takes[r] for r in rows) / len(rows), self.k) \
                if cfg.micro_batches else [len(rows)]
            a = 0
            for n in sizes:
                jobs.append(rows[a:a + n])
                owner.append(j)
                a += n
        work, hops = [], []
        for rows in jobs:
            p = sum(takes[r] for r in rows)
            w, h = [], []
            for c in self.stage_class:                     # the stages in pipeline order
                shape, prof, speed, fp, fd, lat, per_tok, _ = self.classes[c]
                w.append(fp * (shape.layers * self._layer_ms(prof, speed, 0, 0.0, p)
                               + self._ends_ms(prof, speed, shape, len(rows))))
                h.append(lat + per_tok * p if (lat or per_tok) else 0.0)
            h[-1] += self.back_lat + self.back_per_row * len(rows)    # the logits' trip back to the driver
            work.append(w)
            hops.append(h)
        done = flow_shop(work, hops, [self.class_host[c] for c in self.stage_class],
                         [self.class_pre_slow[c] for c in self.stage_class])
        group_done = [0.0] * g                             # a group's tokens come with its last micro-batch
        for j, t in zip(owner, done):
            group_done[j] = max(group_done[j], t)
        return [group_done[r % g] + cfg.step_overhead_ms for r in range(len(takes))]

    def step_ms(self, d: int, ctx: float, p: int, rows: int, sampled: int, cfg: SimConfig) -> float:
        """Time of one engine step (or one round of g groups); adds each class's busy time."""
        g = self.groups(d, rows, cfg)
        parts = 1
        if g == 1 and cfg.micro_batches and self.k > 1 and d + p >= self.k * MICRO_BATCH_MIN_TOKENS:
            parts = max(1, min(self.k, d + rows))
        n = g * parts
        dd, pp, ss = d / n, p / n, sampled / n
        per_layer: dict = {}           # stages of one speed share the per-layer figure of this step
        times, hops = [], []
        back = self.back_lat + self.back_per_row * ss if self.back_lat or self.back_per_row else 0.0
        total, slowest = back, 0.0
        io = [fixed + per_tok * (dd + pp) + per_row * ss if cfg.stage_io else 0.0     # per group, on the stage
              for fixed, per_tok, per_row in self.io]
        for c, (shape, prof, speed, fp, fd, lat, per_tok, count) in enumerate(self.classes):
            f = fp if pp > dd else fd
            key = id(prof) if prof is not None else speed
            lm = per_layer.get(key)
            if lm is None:
                lm = per_layer[key] = self._layer_ms(prof, speed, dd, ctx, pp)
            t = f * (shape.layers * lm + self._ends_ms(prof, speed, shape, ss))
            t_hop = t + (lat + per_tok * (dd + pp) if per_tok or lat else 0.0)
            times.append(t)
            hops.append(t_hop - t)
            total += t_hop * count
            slowest = max(slowest, t_hop + (io[c] if g > 1 else 0.0))
        # a group's pass off the stages: the links (less the transport's cost per message), the way back
        off = self.off_stage[0] + self.off_stage[1] * ss + sum(
            max(0.0, h - self.msg[0] - self.msg[1] * (dd + pp)) * cl[-1] for h, cl in zip(hops, self.classes) if h)

        def round_ms(sig: list[float]) -> float:     # the round with each class's steps slowed by sig
            total, slowest = back, 0.0
            for s, t, h, r, cl in zip(sig, times, hops, io, self.classes):
                total += (s * t + h) * cl[-1]
                slowest = max(slowest, s * t + h + (r if g > 1 else 0.0))
            if g == 1:
                return total + (parts - 1) * slowest
            bound = max(total, g * slowest)
            if not (cfg.queueing and self.shared_host and d > 0):
                return bound
            # near balance the groups queue at stages that share a host in decode rounds
            # (costmodel.closed_cycle_ms, as estimate counts it; a wave's prefill is its flow shop)
            service = [s * t + r for s, t, r, cl in zip(sig, times, io, self.classes) for _ in range(cl[-1])]
            return max(bound, closed_cycle_ms(service, off, g))
        ms = round_ms([1.0] * len(times))
        drv = [(self.driver_host, g * (self.driver_work[0] + self.driver_work[1] * ss))] \
            if cfg.corun_driver and self.driver_host is not None and self.driver_host in self.stage_host else []
        if g > 1 and d > 0 and (self.shared_host or drv):
            # Stages on one host slow each other in decode rounds (as in the cost model; a wave's prefill
            # flows through the stages and is not slowed there either), and so do the driver and the
            # stages' messages. Every stage of a round does g steps; a class's stages are alike, so one
            # stands for all.
            first = self.first_stage
            st_sig, ms = host_slowdowns(self.stage_host, [g * times[c] for c in self.per_stage], self.stage_slow,
                                        lambda s: round_ms([s[i] for i in first]),
                                        io_ms=[g * io[c] for c in self.per_stage] if cfg.corun_driver else None,
                                        others=drv)
            times = [st_sig[i] * t for i, t in zip(first, times)]
        for c, t in enumerate(times):
            self.busy[c] += t * n
        self.last = (n, dd, pp, times)
        return ms + cfg.step_overhead_ms

    def utilisation(self, duration_ms: float) -> list[dict]:
        return [{"node": n, "layers": self.classes[c][0].layers,
                 "busy": self.busy[c] / duration_ms if duration_ms > 0 else 0.0}
                for n, c in zip(self.nodes, self.stage_class)]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _transfer(delta: PlanDelta, cluster: Cluster, kv_tokens: float) -> tuple[float, float, float, float, float]:
    """(weight bytes, kv bytes, seconds for weights, seconds for KV, worst link latency s) of a delta."""
    per_pair: dict[tuple[str, str], list[float]] = {}
    for run in delta.moves:
        per_pair.setdefault((run.src, run.dst), [0.0, 0.0])
        per_pair[(run.src, run.dst)][0] += run.weight_bytes
        per_pair[(run.src, run.dst)][1] += run.kv_bytes_per_token * kv_tokens
    wb = sum(v[0] for v in per_pair.values())
    kb = sum(v[1] for v in per_pair.values())
    ws = ks = lat = 0.0
    for (src, dst), (w, k) in per_pair.items():
        link = cluster.link(src, dst)
        if link is None:
            raise ValueError(f"layers move {src} -> {dst} but no link joins them")
        bps = link.bandwidth_gbps * 1e9 / 8
        ws, ks = max(ws, link.latency_ms / 1e3 + w / bps), max(ks, link.latency_ms / 1e3 + k / bps)
        lat = max(lat, link.latency_ms / 1e3)
    return wb, kb, ws, ks, lat


def simulate(cluster: Cluster, plan: PlacementPlan, model: ModelSpec, trace: Trace,
             profiles: ProfileSet | None = None, corrections: Corrections | None = None,
             intent: IntentSpec | None = None, config: SimConfig = SimConfig(),
             reconfigs: list[Reconfig] = (), driver_node: str | None = None) -> SimResult:
    """Run a trace through a plan (and any reconfigurations); pure python, deterministic.
    driver_node: where the engine (which samples) sits; the logits' trip back from the last stage
    is counted when it is another node."""
    run = _run(cluster, plan, model, trace, profiles, corrections, intent, config, reconfigs, driver_node, None)
    try:
        while True:
            next(run)                 # without a Session the run never pauses
    except StopIteration as done:
        return done.value


STAGE_TIMES_KEEP_S = 600.0          # how far back a Session keeps per-step records for telemetry's "stages"


class _Live:
    """What a Session shares with the run it drives: the clock bound, the inbox, the state it reads."""

    def __init__(self, until: float):
        self.until = until                      # run every event at or before this time, then pause
        self.finish = False                     # True: run until nothing is left, then return the result
        self.inbox: list[Reconfig] = []         # reconfigurations to start at the current time
        self.finished_log: list[int] = []       # requests in the order they finished
        self.arrived = 0                        # requests whose arrival has been processed
        self.now = until
        self.queue = self.running = self.rejected = 0
        self.plan: PlacementPlan | None = None
        self.reconfiguring: Reconfig | None = None
        self.started: ReconfigOutcome | None = None    # the figures of the move that started last
        self.outcomes: list[ReconfigOutcome] = []
        self.t_first: list[float] = []
        self.t_last: list[float] = []
        self.rejected_ix: list[int] = []
        # per engine step, as the service's telemetry samples it (Session.telemetry's "stages"):
        # (when it ends, its _Stages, decode-only, steps it stands for, rows, tokens, context, compute ms per class)
        self.steps: deque[tuple] = deque()


class Session:
    """The simulator in intervals, for a controller to drive: `advance(t)` runs every event up to t,
    `telemetry(t0)` reads what happened since t0 (in the shape of the service's /admin/stats window),
    `reconfigure(plan)` starts a move at the current time, `add_requests(...)` feeds arrivals as they
    are routed (a replica autoscaler splits one trace over several sessions). The same event loop as
    `simulate` (one function, `_run`), paused between events instead of run to the end.
    """

    def __init__(self, cluster: Cluster, plan: PlacementPlan, model: ModelSpec, trace: Trace | None = None,
                 profiles: ProfileSet | None = None, corrections: Corrections | None = None,
                 intent: IntentSpec | None = None, config: SimConfig = SimConfig(),
                 driver_node: str | None = None, start_s: float = 0.0):
        self.cluster, self.model = cluster, model
        self.intent = intent or plan.intent or IntentSpec(data_class=plan.data_class)
        # own copies: add_requests appends to them, the caller's trace stays as it was
        t = trace or Trace([], [], [])
        self.trace = Trace(list(t.arrival_s), list(t.prompt_tokens), list(t.output_tokens), t.source)
        self._live = _Live(start_s)
        self._live.plan = plan
        self._run = _run(cluster, plan, model, self.trace, profiles, corrections, self.intent, config, (),
                         driver_node, self._live)
        self.result: SimResult | None = None
        next(self._run)                        # set up, paused at start_s

    @property
    def now(self) -> float:
        return self._live.until

    @property
    def plan(self) -> PlacementPlan:
        """The plan serving now (the old one until a reconfiguration switches)."""
        return self._live.plan

    @property
    def reconfiguring(self) -> bool:
        return self._live.reconfiguring is not None or bool(self._live.inbox)

    @property
    def reconfigurations(self) -> list[ReconfigOutcome]:
        return self._live.outcomes

    def add_requests(self, arrival_s, prompt_tokens, output_tokens) -> None:
        """Requests that arrive later than every one given before (and not before now)."""
        tr = self.trace
        last = tr.arrival_s[-1] if tr.arrival_s else -math.inf
        for a, p, o in zip(arrival_s, prompt_tokens, output_tokens):
            if a < last or a < self.now - 1e-9:
                raise ValueError(f"request arriving at {a} s is out of order (last {last} s, now {self.now} s)")
            tr.arrival_s.append(a)
            tr.prompt_tokens.append(int(p))
            tr.output_tokens.append(int(o))
            last = a

    def advance(self, t: float) -> None:
        """Run every event at or before t (simulated seconds)."""
        if self.result is not None:
            raise RuntimeError("the session has finished")
        if t < self.now:
            raise ValueError(f"cannot go back in time: now {self.now} s, asked {t} s")
        self._live.until = t
        next(self._run)

    def reconfigure(self, plan: PlacementPlan, method: str = "live", config: SimConfig | None = None) -> ReconfigOutcome:
        """Start moving to `plan` now (prepare, pre-copy, switch at a step boundary, as simulate does).
        Returns the move's figures (bytes, prepare, pre-copy, pause); `switched_s` is set when it switches."""
        if self.reconfiguring:
            raise RuntimeError("a reconfiguration is under way; the next one must wait for its switch")
        if method not in ("live", "stop_and_copy"):
            raise ValueError(f"reconfiguration method {method!r}: the simulator models live and stop_and_copy")
        self._live.inbox.append(Reconfig(self.now, plan, method, config))
        self._live.started = None
        next(self._run)                        # the start event is at now: its figures are known at once
        return self._live.started

    def telemetry(self, since: float, window: str | None = None) -> dict:
        """What happened in (since, now], as GET /admin/stats has it (executor/telemetry.py): the `now`
        block and one window named `window` (default: its length, e.g. '300s')."""
        lv, tr, now = self._live, self.trace, self.now
        span = max(now - since, 1e-9)
        arr = tr.arrival_s
        lo = bisect.bisect_right(arr, since)
        hi = bisect.bisect_right(arr, now)
        fin = [i for i in self._finished_since(since)]
        ttft = sorted(lv.t_first[i] - arr[i] for i in fin)
        tpot = sorted((lv.t_last[i] - lv.t_first[i]) / (tr.output_tokens[i] - 1) for i in fin
                      if tr.output_tokens[i] > 1)
        name = window or f"{span:g}s"
        w = {"seconds": span, "span_s": span, "arrival_rate": (hi - lo) / span,
             "prompt_tokens_per_s": sum(tr.prompt_tokens[lo:hi]) / span,
             "output_tokens_per_s": sum(tr.output_tokens[i] for i in fin) / span,
             "finished": {"stop": len(fin)},
             "rejected": sum(1 for i in lv.rejected_ix if since < arr[i] <= now),
             "queue_depth": {"mean": None, "max": None}, "running": {"mean": None, "max": None},
             "ttft_s": {"p50": _pct(ttft, .5), "p99": _pct(ttft, .99), "n": len(ttft)},
             "tpot_s": {"p50": _pct(tpot, .5), "p99": _pct(tpot, .99), "n": len(tpot)},
             "stages": self._stage_times(since), "hops": []}
        return {"enabled": True, "uptime_s": now, "simulated": True,
                "now": {"queue_depth": lv.queue, "running": lv.running, "kv": {}},
                "windows": {name: w}}

    def _stage_times(self, since: float) -> list[dict]:
        """Per stage (node and layer range), the steps that ended in (since, now], in the shape of /admin/stats'
        window "stages": mean compute per step, apart for decode-only steps and steps with prompt tokens (each
        group's step is one step, as the engine's telemetry counts them). Steps that ended at or before `since`
        are dropped (a caller reads consecutive windows, as SimTarget does), and so are those older than
        STAGE_TIMES_KEEP_S."""
        log = self._live.steps
        while log and log[0][0] <= since:
            log.popleft()
        # (node, start, stop) -> [decode steps, decode s, decode rows, decode context,
        #                         prefill steps, prefill s, prefill tokens, prefill context], each summed over steps
        acc: dict[tuple, list[float]] = {}
        order: list[tuple] = []
        for t_end, stages, decode, n, rows, tokens, ctx, times in log:
            if t_end > self.now:
                break
            for (node, a, b), c in zip(stages.ranges, stages.stage_class):
                key = (node, a, b)
                if key not in acc:
                    acc[key] = [0.0] * 8
                    order.append(key)
                x, ms = acc[key], times[c]
                j = 0 if decode else 4
                x[j] += n
                x[j + 1] += n * ms / 1e3
                x[j + 2] += n * (rows if decode else tokens)
                x[j + 3] += n * ctx

        def mean(total: float, count: float) -> float | None:
            return total / count if count else None
        out = []
        for (node, a, b) in order:
            d_n, d_s, d_rows, d_ctx, p_n, p_s, p_tok, _ = acc[(node, a, b)]
            steps = d_n + p_n
            out.append({"node": node, "layers": [a, b], "steps": int(steps), "step_s": mean(d_s + p_s, steps),
                        "compute_s": mean(d_s + p_s, steps), "comm_s": None, "tokens_per_step": None,
                        "rows_per_step": None, "decode_steps": int(d_n), "decode_compute_s": mean(d_s, d_n),
                        "decode_rows_per_step": mean(d_rows, d_n), "decode_context": mean(d_ctx, d_n),
                        "prefill_steps": int(p_n), "prefill_compute_s": mean(p_s, p_n),
                        "prefill_tokens_per_step": mean(p_tok, p_n)})
        return out

    def _finished_since(self, since: float):
        log, t_last = self._live.finished_log, self._live.t_last
        i = len(log)
        while i > 0 and t_last[log[i - 1]] > since:
            i -= 1
        return log[i:]

    def finish(self) -> SimResult:
        """Run to the end (every request served or rejected) and return the whole run's result."""
        if self.result is None:
            self._live.finish = True
            self._live.until = math.inf
            try:
                while True:
                    next(self._run)
            except StopIteration as done:
                self.result = done.value
        return self.result


def _run(cluster: Cluster, plan: PlacementPlan, model: ModelSpec, trace: Trace,
         profiles: ProfileSet | None, corrections: Corrections | None, intent: IntentSpec | None,
         config: SimConfig, reconfigs, driver_node: str | None, live: _Live | None):
    """The event loop of `simulate` and `Session`: a generator that pauses (yields) only when driven by
    a Session (`live`), before the first event after `live.until`; returns the SimResult."""
    wall0 = time.perf_counter()
    intent = intent or plan.intent or IntentSpec(data_class=plan.data_class)
    traffic: Traffic = intent.traffic
    cfg = config
    bs = cfg.block_size
    kv_blocks = cfg.kv_blocks or traffic.kv_blocks
    max_len = cfg.max_model_len or kv_blocks * bs
    stages = _Stages(plan, cluster, model, profiles, corrections, driver_node)
    stage_sets = [stages]
    n = len(trace)
    arr, P, O = trace.arrival_s, trace.prompt_tokens, trace.output_tokens
    t_first = [math.nan] * n
    t_last = [math.nan] * n
    rejected = 0
    fin_log = live.finished_log if live is not None else None
    rejected_ix = live.rejected_ix if live is not None else None
    if live is not None:
        live.t_first, live.t_last = t_first, t_last

    # events: (time s, seq, kind, payload); kinds: 0 step end, 1 reconfig phase, 2 arrival
    ev: list = []
    seq = 0

    def push(t, kind, payload=None):
        nonlocal seq
        seq += 1
        heapq.heappush(ev, (t, kind, seq, payload))

    if n:
        push(arr[0], 2, 0)
    for rc in sorted(reconfigs, key=lambda r: r.at_s):
        push(rc.at_s, 1, ("start", rc))

    waiting: deque[int] = deque()
    prefilling: list[list[int]] = []        # [request, prompt tokens left], in admission order
    finishing: list[tuple[int, int]] = []   # (step index of its last token, request)
    n_dec, ctx_sum, free = 0, 0, kv_blocks
    step_no, busy, blocked_until = 0, False, 0.0
    in_step: list = []                      # (request, lag s) of the prefill rows completing in the step under way
    lag_s: dict[int, float] = {}            # requests whose tokens come early or late of the round's end (wave_ms)
    pending_switch = None
    outcomes: list[ReconfigOutcome] = live.outcomes if live is not None else []
    node_s = 0.0
    plan_since = arr[0] if n else (live.until if live is not None else 0.0)
    now = plan_since
    cur_plan = plan

    def blocks(i):
        return -(-(P[i] + O[i]) // bs)

    def start_step(t):
        nonlocal busy, in_step
        # admit FIFO while seats and KV allow
        nonlocal free
        while waiting and len(prefilling) + n_dec < cfg.max_num_seqs and blocks(waiting[0]) <= free:
            i = waiting.popleft()
            free -= blocks(i)
            prefilling.append([i, P[i]])
        budget = cfg.max_prefill_tokens_decoding if n_dec else cfg.max_prefill_tokens
        p = rows = 0
        done, takes = [], []
        for ent in prefilling:
            if budget <= 0:
                break
            take = min(ent[1], budget)
            ent[1] -= take
            budget -= take
            p += take
            rows += 1
            takes.append(take)
            if ent[1] == 0:
                done.append((ent[0], rows - 1))
        if not n_dec and not rows:
            busy = False
            return
        if done:
            prefilling[:] = [e for e in prefilling if e[1] > 0]
        ctx = ctx_sum / n_dec if n_dec else 0.0
        ms = stages.step_ms(n_dec, ctx, p, rows, n_dec + len(done), cfg)
        lags = [0.0] * len(done)
        g = stages.groups(n_dec, rows, cfg)
        if not n_dec and done and rows > 1 and (g > 1 or stages.k > 1):
            # prompts alone reach an idle pipeline: each group's first tokens come when its last
            # micro-batch is back (a flow shop); one group: the step ends with it. With g groups the
            # round keeps its steady-state length and each request's tokens run early or late by its
            # group's lag (the same for every token: TPOT is the round's)
            offs = stages.wave_ms(takes, g, cfg)
            if g == 1:
                ms = max(offs)
            else:
                lags = [offs[r] - ms for _, r in done]
        if live is not None:
            parts, dd, pp, times = stages.last
            log = live.steps               # a window reaches back STAGE_TIMES_KEEP_S at most (as the service's
            while log and log[0][0] < t - STAGE_TIMES_KEEP_S:           # longest does): older steps go
                log.popleft()
            log.append((t + ms / 1e3, stages, p == 0, parts, dd, dd + pp, ctx, times))
        in_step = [(i, lag / 1e3) for (i, _), lag in zip(done, lags)]
        busy = True
        push(t + ms / 1e3, 0)

    def end_step(t):
        nonlocal step_no, n_dec, ctx_sum, free
        step_no += 1
        ctx_sum += n_dec
        while finishing and finishing[0][0] <= step_no:
            _, i = heapq.heappop(finishing)
            t_last[i] = t + lag_s.pop(i, 0.0)
            if fin_log is not None:
                fin_log.append(i)
            n_dec -= 1
            ctx_sum -= P[i] + O[i]
            free += blocks(i)
        for i, lag in in_step:
            t_first[i] = t + lag
            if O[i] <= 1:
                t_last[i] = t + lag
                free += blocks(i)
                if fin_log is not None:
                    fin_log.append(i)
            else:
                if lag:
                    lag_s[i] = lag
                n_dec += 1
                ctx_sum += P[i] + 1
                heapq.heappush(finishing, (step_no + O[i] - 1, i))

    def in_flight_tokens() -> float:
        return ctx_sum + sum(P[e[0]] - e[1] for e in prefilling)

    arrival_armed = n > 0                               # the next arrival is on the heap
    while True:
        if live is not None:                            # driven by a Session: pause, take new work
            if len(arr) > len(t_first):                 # requests added while paused
                t_first.extend([math.nan] * (len(arr) - len(t_first)))
                t_last.extend([math.nan] * (len(arr) - len(t_last)))
            if not arrival_armed and live.arrived < len(arr):
                push(arr[live.arrived], 2, live.arrived)
                arrival_armed = True
            while live.inbox:
                rc = live.inbox.pop(0)
                live.reconfiguring = rc
                push(max(rc.at_s, now), 1, ("start", rc))
            if not ev or ev[0][0] > live.until:
                if live.finish and not ev:
                    break
                live.queue, live.running, live.rejected = len(waiting), n_dec + len(prefilling), rejected
                live.plan = cur_plan
                now = max(now, live.until)
                yield
                continue
        elif not ev:
            break
        t, kind, _, payload = heapq.heappop(ev)
        now = t
        if kind == 2:                                   # an arrival
            i = payload
            arrival_armed = False
            if live is not None:
                live.arrived = i + 1
            if i + 1 < len(arr):
                push(arr[i + 1], 2, i + 1)
                arrival_armed = True
            if P[i] + O[i] > max_len or len(waiting) >= cfg.max_waiting:
                rejected += 1                           # ContextTooLong / QueueFull, as the engine answers
                if rejected_ix is not None:
                    rejected_ix.append(i)
            else:
                waiting.append(i)
        elif kind == 0:                                 # a step ended
            end_step(t)
            busy = False
            if pending_switch is not None:
                pending_switch(t)
                pending_switch = None
        elif kind == 1:                                 # a reconfiguration phase
            what, rc = payload
            if what == "start":
                delta = PlanDelta.between(cur_plan, rc.plan, model)
                wb, kb, ws, ks, lat = _transfer(delta, cluster, in_flight_tokens())
                dirty = sum(r.kv_bytes_per_token for r in delta.moves) * max(n_dec, 1)
                _, _, _, dirty_s, _ = _transfer(delta, cluster, max(n_dec, 1))
                if rc.method == "stop_and_copy":
                    pause, pre_s, copy_s = ws + ks, 0.0, 0.0
                elif rc.method == "live":
                    pause, pre_s, copy_s = 2 * lat + (dirty_s - lat if delta.moves else 0.0), ws, ks
                else:
                    raise ValueError(f"reconfiguration method {rc.method!r}: the simulator models live and "
                                     "stop_and_copy")
                kv_moved = kb if rc.method == "stop_and_copy" else kb + dirty
                out = ReconfigOutcome(rc.at_s, math.nan, wb, kv_moved, pre_s, copy_s, pause, rc.method)
                if live is not None:
                    live.started = out
                push(t + pre_s + copy_s, 1, ("switch", (rc, out)))
            elif what == "switch":
                rc, out = rc

                def switch(ts, rc=rc, out=out):
                    nonlocal stages, blocked_until, node_s, plan_since, cur_plan, cfg, free, kv_blocks
                    if rc.config is not None:        # the new plan's seats and KV pool (free may go below
                        cfg = rc.config              # 0: admissions wait until enough requests finish)
                        new_blocks = cfg.kv_blocks or kv_blocks
                        free += new_blocks - kv_blocks
                        kv_blocks = new_blocks
                    node_s += len(set(stages.nodes)) * (ts - plan_since)
                    plan_since = ts
                    stages = _Stages(rc.plan, cluster, model, profiles, corrections, driver_node)
                    stage_sets.append(stages)
                    cur_plan = rc.plan
                    blocked_until = ts + out.pause_s
                    out.switched_s = ts
                    outcomes.append(out)
                    if live is not None:
                        live.reconfiguring, live.plan = None, cur_plan
                    push(blocked_until, 1, ("resume", None))
                if busy:
                    pending_switch = switch              # at the iteration boundary, never inside a step
                else:
                    switch(t)
            if what != "resume":
                continue
        if ev and ev[0][0] <= now:
            continue                  # everything that happens at this instant first (e.g. arrivals together)
        if not busy and now >= blocked_until - 1e-12 and pending_switch is None:
            start_step(now)

    end = now
    n = len(arr)                             # a Session may have added requests
    node_s += len(set(stages.nodes)) * (end - plan_since)
    done_ix = [i for i in range(n) if not math.isnan(t_last[i])]
    ttft = [1e3 * (t_first[i] - arr[i]) for i in done_ix]
    tpot = [1e3 * (t_last[i] - t_first[i]) / (O[i] - 1) for i in done_ix if O[i] > 1]
    slo = None
    if intent.max_ttft_ms is not None or intent.max_tpot_ms is not None:
        ok = 0
        for i in done_ix:
            a = intent.max_ttft_ms is None or 1e3 * (t_first[i] - arr[i]) <= intent.max_ttft_ms
            b = intent.max_tpot_ms is None or O[i] <= 1 or 1e3 * (t_last[i] - t_first[i]) / (O[i] - 1) <= intent.max_tpot_ms
            ok += a and b
        slo = ok / n if n else None          # rejected requests miss their SLO
    duration = end - (arr[0] if n else 0.0)
    # utilisation: the busy time of every plan's stages over the time that plan served
    util = stages.utilisation(1e3 * duration) if len(stage_sets) == 1 else \
        stages.utilisation(1e3 * max(end - plan_since, 1e-9))
    return SimResult(
        requests=n, finished=len(done_ix), rejected=rejected,
        ttft_ms_p50=_pct(ttft, .5), ttft_ms_p99=_pct(ttft, .99), tpot_ms_p50=_pct(tpot, .5), tpot_ms_p99=_pct(tpot, .99),
        slo_attainment=slo, throughput_tok_s=sum(O[i] for i in done_ix) / duration if duration > 0 else 0.0,
        duration_s=duration, node_seconds=node_s, steps=step_no, stage_utilisation=util,
        reconfigurations=outcomes, sim_wall_s=time.perf_counter() - wall0, sources=stages.sources,
        ttft_ms=ttft, tpot_ms=tpot)


def speed_case(nodes: int = 64, layers: int = 80, rate: float = 50.0, duration_s: float = 3600.0, seed: int = 0):
    """The README's speed figure: `nodes` H100s in a chain, an 80-layer model (Llama-3-70B) split evenly,
    `duration_s` of Poisson traffic at `rate` req/s (prompts ~512, outputs ~128 tokens, lognormal).
    Returns (cluster, plan, model, trace, intent, config)."""
    from .loading import load_file  # noqa: F401  (keeps the import graph of policies/ flat)
    from .modelspec import load_model_spec
    from .plan import Stage
    from .traces import Lengths, Schedule, Steady
    model = load_model_spec("llama-3-70b")
    model = model.model_copy(update={"num_layers": layers}) if layers != model.num_layers else model
    cluster = Cluster.model_validate({"name": f"sim-{nodes}", "nodes": [
        {"name": f"n{i}", "gpu": "H100", "jurisdiction": "eu"} for i in range(nodes)],
        "links": {"default": {"bandwidth_gbps": 100, "latency_ms": 0.05, "encrypted": True}}})
    bounds = [round(i * layers / nodes) for i in range(nodes + 1)]
    plan = PlacementPlan(model=model.name, data_class="public", stages=tuple(
        Stage(node=f"n{i}", first_layer=a, last_layer=b - 1) for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a))
    sched = Schedule(phases=(Steady(kind="steady", rate=rate, duration_s=duration_s),), seed=seed,
                     prompt_tokens=Lengths(dist="lognormal", mean=512, sigma=0.6, min=16, max=4096),
                     output_tokens=Lengths(dist="lognormal", mean=128, sigma=0.6, min=2, max=1024))
    intent = IntentSpec(data_class="public", max_ttft_ms=2000, max_tpot_ms=200,
                        traffic=Traffic(concurrency=1024, prompt_tokens=512, output_tokens=128, context_tokens=2048))
    config = SimConfig(max_num_seqs=1024, max_waiting=4096, max_prefill_tokens=8192, max_prefill_tokens_decoding=4096,
                       groups_in_flight=nodes)
    return cluster, plan, model, sched.generate(), intent, config
