"""The running service: node workers + engine + a loop thread, with a thread-safe front door.

The HTTP layer (executor/api.py) and the Python API both go through `Service`: submit a
request with a listener, cancel it, read health and per-node state. The engine loop thread owns
every conversation with the workers; other threads hand it calls to run between steps.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import traceback

import torch
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from policies import Cluster, InputError, ModelSpec, PlacementPlan, Refused, ValidatedPlan, approve

from . import transport
from .engine import Engine, EngineConfig, RequestOutput, SamplingParams
from .reconfig import ReconfigReport, Reconfiguration, ReconfigurationError, ReconfigurationTimeout
from .runtime import NodeRuntime, WorkerDied
from .telemetry import Telemetry


class ServiceUnavailable(Refused, RuntimeError):
    """The service cannot take requests (a worker died, or it is shutting down)."""


def _genuine(validated: Any) -> ValidatedPlan:
    """The plan, if the validator issued it in this process and nothing changed since; else TypeError."""
    if not isinstance(validated, ValidatedPlan):
        raise TypeError("the executor accepts only a ValidatedPlan (from policies.approve)")
    return validated.verify()         # ForgedPlan (a TypeError) for a copy, a construct or an edited one


def _reserved(config: EngineConfig, validated: ValidatedPlan, explicit: bool) -> EngineConfig:
    """The engine config with the KV pool the capacity rule checked (the plan's, not the config's)."""
    kv = validated.kv
    if config.max_model_len > kv.tokens:
        if explicit:
            raise ValueError(f"the plan reserves KV for {kv.tokens} tokens per stage (its intent's traffic."
                             f"concurrency x context_tokens), fewer than max_model_len={config.max_model_len}: "
                             "raise traffic.context_tokens in the intent, or lower max_model_len")
        config = dataclasses.replace(config, max_model_len=kv.tokens)
    return dataclasses.replace(config, num_kv_blocks=kv.blocks, block_size=kv.block_size)


@dataclass
class Listener:
    """Callbacks for one request, called from the engine thread."""
    on_token: Callable[[int, Any], None] | None = None     # (token id, TokenLogprob or None)
    on_done: Callable[[RequestOutput | None, str | None], None] | None = None   # (output, error)


class ReplicaError(ReconfigurationError):
    """A replica cannot be added or drained as asked (its nodes are taken, it is unknown, ...)."""


class UnknownReplica(ReplicaError):
    """No replica goes by that name."""


@dataclass(eq=False)
class Replica:
    """Another pipeline of the service's model, on nodes of its own: its own engine (scheduler, KV
    pool, groups in flight) over its own stages. The service's plan is the first pipeline; each new
    request goes to the pipeline with the fewest outstanding requests per seat (join the shortest queue), so
    a slower one takes fewer. A replica is validated as a plan of its own; privacy, memory and SLO
    rules hold for it as for the plan."""
    name: str
    validated: ValidatedPlan
    engine: Engine
    state: str = "serving"                 # serving -> draining -> drained; or failed
    error: str | None = None
    added: float = field(default_factory=time.time)
    gone: threading.Event = field(default_factory=threading.Event)   # drained or failed

    @property
    def nodes(self) -> list[str]:
        return [st.node for st in self.validated.plan.stages]

    def as_dict(self) -> dict[str, Any]:
        plan = self.validated.plan
        return {"name": self.name, "state": self.state, "error": self.error, "nodes": self.nodes,
                "stages": [{"node": st.node, "start": st.start, "stop": st.stop} for st in plan.stages],
                "outstanding": len(self.engine.seqs), "kv_blocks": self.engine.config.num_kv_blocks,
                "plan": plan.model_dump(mode="json"), "added": self.added}


class EngineLoop(threading.Thread):
    """Steps the engine while it has work; runs handed-in calls at iteration boundaries.

    With replicas (Service.add_replica) it steps every pipeline's engine in turn: each launches its
    idle groups and waits for its oldest step, while the others' steps run on their own nodes."""

    def __init__(self, engine: Engine, telemetry: Telemetry | None = None):
        super().__init__(name="engine-loop", daemon=True)
        self.engine = engine
        self.replicas: dict[str, Replica] = {}   # changed on this thread only (calls)
        self.runtime: NodeRuntime | None = None   # to drop a drained replica's stages
        self.telemetry = telemetry or Telemetry()
        self.calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self.wake = threading.Event()
        self.listeners: dict[int, Listener] = {}
        self.stopped = False
        self.broken: Exception | None = None
        self.reconfig = None                 # a Reconfiguration under way, ticked between steps

    def call(self, fn: Callable[[], Any], timeout: float | None = 60.0, quiet: bool = True) -> Any:
        """Run fn() on the engine thread between two steps and return its result. quiet: with no
        step in flight (fn talks to the workers); False for what only touches the engine's own state."""
        if threading.current_thread() is self:
            return fn()
        fut: Future = Future()
        self.calls.put((fn, fut, quiet))
        self.wake.set()
        return fut.result(timeout)

    def run(self) -> None:
        while not self.stopped:
            try:
                self._iterate()
            except Exception as e:          # noqa: BLE001 -- whatever it was, nothing may hang on a dead loop
                traceback.print_exc()
                self.fail_all(RuntimeError(f"engine loop failed: {type(e).__name__}: {e}"))

    def _iterate(self) -> None:
        """One turn of the loop: calls, a reconfiguration's tick, a step (or a short wait)."""
        rc = self.reconfig
        reconfiguring = rc is not None and not rc.done and self.broken is None
        # Calls and reconfiguration rounds talk to the workers out of turn: with groups of
        # requests in flight (Engine.groups) the pipeline is drained first. A reconfiguration talks
        # to the plan's nodes only (a replica's are never in it), so the replicas step on.
        quiet = any(q for _, _, q in list(self.calls.queue))
        if self.engine.inflight and (reconfiguring or quiet):
            if self._guarded(self.engine.drain) is None:
                return
        if quiet:
            for rep in self.active():
                if rep.engine.inflight:
                    self._guarded(rep.engine.drain, rep)
        while not self.calls.empty():
            fn, fut, _ = self.calls.get()
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed back to the caller
                fut.set_exception(e)
        if reconfiguring:
            try:
                rc.tick()               # a named phase between two steps, never inside one
            except WorkerDied as e:
                self.fail_all(e)
                return
            except Exception as e:      # our bug, or a callback's: end the reconfiguration with it,
                traceback.print_exc()   # never leave it (and its waiter) unfinished with the loop gone
                rc.fail(f"reconfiguration failed in {rc.state}: {type(e).__name__}: {e}")
                return
        stepped = False
        if self.broken is None:
            for engine, rep in [(self.engine, None), *((r.engine, r) for r in self.active())]:
                if self.broken is None and engine.has_unfinished():
                    t0 = time.perf_counter()
                    done = self._guarded(engine.step, rep)
                    stepped = True
                    if done is not None and self.telemetry.enabled:
                        self.observe(time.perf_counter() - t0, done, "plan" if rep is None else rep.name)
            self._retire()
        if not stepped:
            self.wake.wait(0.002 if rc is not None and not rc.done else 0.05)
            self.wake.clear()

    def active(self) -> list[Replica]:
        """The replicas that step: serving, or draining what they hold."""
        return [r for r in self.replicas.values() if r.state in ("serving", "draining")]

    def engines(self) -> list[Engine]:
        """The plan's engine, then each active replica's."""
        return [self.engine, *(r.engine for r in self.active())]

    def _retire(self) -> None:
        """A draining replica with nothing left to finish leaves: its nodes forget their stages."""
        for rep in [r for r in self.replicas.values() if r.state == "draining" and not r.engine.has_unfinished()]:
            if self.runtime is not None:     # nodes first: once it is off the list, they are free
                self.runtime.drop(rep.nodes)
                self.runtime.replica_nodes -= set(rep.nodes)
            del self.replicas[rep.name]
            rep.state = "drained"
            rep.gone.set()

    def _guarded(self, step: Callable[[], list[RequestOutput]], replica: Replica | None = None) -> list[RequestOutput] | None:
        """Run a step (or a drain) and hand its finished requests to their listeners; a failure
        fails everything in flight and returns None (a replica's fails that replica only)."""
        try:
            done = step()
        except Exception as e:      # noqa: BLE001 -- a dead worker, or our bug: fail what is in flight, never hang
            if not isinstance(e, WorkerDied):
                traceback.print_exc()
                e = RuntimeError(f"engine step failed: {type(e).__name__}: {e}")
            if replica is not None:
                self.fail_replica(replica, e)
            else:
                self.fail_all(e)
            return None
        for out in done:
            lst = self.listeners.pop(out.req_id, None)
            if lst and lst.on_done:
                lst.on_done(out, None)
        return done

    def observe(self, wall_s: float, done: list[RequestOutput], pipeline: str = "plan") -> None:
        """Telemetry of the step that just ended (its pipeline part came with the logits); `pipeline`:
        whose step it was ("plan", or a replica's name)."""
        tel, engines = self.telemetry, self.engines()
        local = {f"stage{i}": (st.cache.num_blocks - st.cache.num_free_blocks, st.cache.num_blocks)
                 for i, st in enumerate(self.engine.stages) if hasattr(st, "cache")}
        tel.step(wall_s, sum(len(e.scheduler.waiting) for e in engines),
                 sum(len(e.scheduler.running) for e in engines), local)
        for out in done:
            tel.finished(out.tpot, out.finish_reason, pipeline)

    def fail_all(self, err: Exception) -> None:
        """A worker died mid-step: every in-flight request ends with a clear error, none hangs."""
        self.broken = err
        rc = self.reconfig
        if rc is not None and not rc.done:
            try:
                rc.fail(str(err))       # ended, not left in its phase: its waiter and history learn why
            except Exception:           # noqa: BLE001 -- the requests below must fail whatever happens
                pass
        for rep in self.active():
            self.fail_replica(rep, err)
        self._fail_engine(self.engine, err)
        for lst in self.listeners.values():     # none should be left; if one is, it must not hang
            if lst.on_done:
                lst.on_done(None, str(err))
        self.listeners.clear()

    def fail_replica(self, rep: Replica, err: Exception) -> None:
        """A replica's worker died (or its step failed): its requests end with the error, it leaves
        the routing, and the other pipelines serve on. Its nodes stay reserved (their workers may be
        mid-step) until `Service.drain_replica` releases them."""
        rep.state, rep.error = "failed", str(err)
        self._fail_engine(rep.engine, err)
        rep.gone.set()

    def _fail_engine(self, engine: Engine, err: Exception) -> None:
        """Every request of this engine ends with a clear error; none hangs."""
        engine.abandon()
        for req_id in list(engine.seqs):
            lst = self.listeners.pop(req_id, None)
            self.telemetry.finished(None, "error")
            engine.cancel(req_id)
            if lst is not None and lst.on_done:
                lst.on_done(None, str(err))
        sched = engine.scheduler
        with sched.lock:
            sched.waiting.clear()
            sched.running.clear()
        engine.seqs.clear()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()


def _emulate_links(rt: NodeRuntime, cluster: Cluster, driver_node: str) -> dict:
    """Put every worker and this driver behind the cluster's links; returns what was set up."""
    table = transport.link_table(rt.ranks, driver_node, cluster)
    for node, rank in rt.ranks.items():
        rt.call(node, transport.EmulateLinks(table[rank]))
    transport.emulate_links(table[transport.DRIVER])
    name = {transport.DRIVER: "driver", **rt.node_of}
    return {"driver_node": driver_node,
            "links": [{"src": name[a], "dst": name[b], "bandwidth_gbps": spec.bytes_per_s * 8 / 1e9,
                       "latency_ms": 1e3 * spec.latency_s} for a, row in table.items() for b, spec in row.items()]}


def describe_links(links: dict) -> str:
    """One line for people: the emulated links Service.links holds."""
    return f"engine beside {links['driver_node']}; " + ", ".join(
        f"{x['src']}->{x['dst']} {x['bandwidth_gbps']:g} Gbps {x['latency_ms']:g} ms" for x in links["links"])


def _portable(src) -> Any:
    """What a worker needs to open the same weights itself: a path, or the (picklable) random source."""
    for attr in ("path", "folder"):
        if hasattr(src, attr):
            return str(getattr(src, attr))
    return src


@dataclass
class Service:
    """An engine serving one model, optionally over node workers (runtime)."""
    engine: Engine
    model_name: str
    runtime: NodeRuntime | None = None
    cluster: Cluster | None = None
    plan: ValidatedPlan | None = None
    source: Any = None                   # what workers load weights from (path, None or RandomSource)
    dtype: str = "float32"
    started: float = field(default_factory=time.time)
    history: list = field(default_factory=list)     # finished reconfiguration reports
    policy: Any = None                   # the policy pack, to validate plans handed in over HTTP
    on_reconfigured: list = field(default_factory=list)   # callbacks(report) when one ends
    telemetry: Telemetry = field(default_factory=Telemetry)
    links: dict | None = None            # the emulated links, when the workers run behind them (launch)

    def __post_init__(self):
        if self.runtime is not None:
            self.telemetry.node_of = lambda rank: self.runtime.node_of.get(rank, f"rank{rank}")
        self.loop = EngineLoop(self.engine, self.telemetry)
        self.loop.runtime = self.runtime
        self._replica_lock = threading.Lock()    # one replica added or removed at a time
        self.set_telemetry(self.telemetry.enabled)
        self.loop.start()

    def set_telemetry(self, on: bool) -> None:
        """Telemetry on or off (off: workers send no step records, the loop records nothing)."""
        self.telemetry.enabled = on
        for engine in self.loop.engines():
            for stage in engine.stages:
                if hasattr(stage, "on_step"):       # a pipeline over workers
                    stage.on_step = self.telemetry.pipeline_step if on else None

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def launch(cls, cluster: Cluster, validated: ValidatedPlan, source=None, config: EngineConfig | None = None,
               dtype: str = "float32", threads_per_worker: int | None = None, tokenizer=None,
               join_at: tuple[str, int] | None = None, timeout: float = 120.0, policy=None,
               emulate_links: bool = False, driver_node: str | None = None) -> "Service":
        """Start a worker per node (down nodes excepted) and load the plan's stages.

        Workers run on this machine, or, with join_at=(host, port), the service waits for every node
        to join from wherever it runs (`continuo worker --join HOST:PORT --node NAME`).
        emulate_links: local workers (and this driver, placed beside `driver_node`, by default the
        first stage's node) talk as over the cluster file's links: latency and bandwidth per pair
        and direction, for every message (see transport.LinkShaper).
        Every stage allocates the KV pool the validator's capacity rule reserved for the plan
        (validated.kv); `config.num_kv_blocks` and `config.block_size` are replaced by it."""
        validated = _genuine(validated)
        if validated.cluster_fingerprint != cluster.fingerprint():
            raise ValueError(f"plan was validated against cluster state {validated.cluster_fingerprint}, "
                             f"now {cluster.fingerprint()}: validate it again")
        from .weights import open_source
        src = open_source(source)
        cfg = src.config
        config = _reserved(config or EngineConfig(max_model_len=min(cfg.max_position, 2048)), validated,
                           explicit=config is not None)
        nodes = [n.name for n in cluster.nodes if n.state != "down"]
        driver_node = driver_node or validated.plan.stages[0].node
        if emulate_links:
            if join_at:
                raise ValueError("emulate_links shapes the traffic of workers on this machine; workers that join "
                                 "from elsewhere talk over their real network")
            if driver_node not in nodes:
                raise ValueError(f"driver_node {driver_node!r} is not an up node of cluster {cluster.name} "
                                 f"(up: {', '.join(nodes)})")
        rt = NodeRuntime(nodes, *join_at, timeout=timeout) if join_at else \
            NodeRuntime.local(nodes, threads_per_worker, timeout)
        links = None
        try:
            if emulate_links:
                links = _emulate_links(rt, cluster, driver_node)
            stages = [(s.node, s.start, s.stop) for s in validated.plan.stages]
            rt.load(stages, _portable(src), dtype, config.num_kv_blocks, config.block_size)
            rt.set_model(cfg, torch.tensor([], dtype=getattr(torch, dtype)).element_size())
            engine = Engine([rt.pipeline(cfg.num_layers)], config, tokenizer or src.tokenizer(), cfg.eos_token_ids,
                            cfg.vocab_size)
        except BaseException:
            rt.shutdown()
            transport.emulate_links(None)
            raise
        return cls(engine, validated.plan.model, rt, cluster, validated, _portable(src), dtype, policy=policy,
                   links=links)

    # --- requests ------------------------------------------------------------------------------

    def submit(self, prompt: str | list[int], params: SamplingParams, listener: Listener) -> int:
        """Queue a request; raises QueueFull, ContextTooLong, ValueError or ServiceUnavailable."""
        if self.loop.broken is not None:
            raise ServiceUnavailable(f"service unavailable: {self.loop.broken}")
        def add() -> int:
            if self.loop.broken is not None:      # it broke between the check above and now
                raise ServiceUnavailable(f"service unavailable: {self.loop.broken}")
            engine, pipeline = self._route()
            req_id = engine.add_request(prompt, params, self._on_token(listener, pipeline))
            self.loop.listeners[req_id] = listener
            if self.telemetry.enabled:
                self.telemetry.arrival(len(engine.seqs[req_id].prompt_ids))
            return req_id
        req_id = self.loop.call(add, quiet=False)     # engine state only: no need to drain the pipeline
        self.loop.wake.set()
        return req_id

    def _on_token(self, listener: Listener, pipeline: str = "plan"):
        """The engine's per-token callback: the listener's, and telemetry's first token (of `pipeline`)
        and count."""
        user = listener.on_token
        tel = self.telemetry if self.telemetry.enabled else None
        if tel is None:
            return (lambda seq, tok: user(tok, seq.logprobs[-1] if seq.logprobs else None)) if user else None

        def on_token(seq, tok):
            if len(seq.output_ids) == 1:
                tel.first_token(seq.token_times[0] - seq.arrival, pipeline)
            tel.token()
            if user:
                user(tok, seq.logprobs[-1] if seq.logprobs else None)
        return on_token

    def _route(self) -> tuple[Engine, str]:
        """The pipeline a new request joins, and its name ("plan" or the replica's): the one with the
        fewest outstanding requests per seat (max_num_seqs; the plan's on a tie), so a pipeline with
        fewer seats does not queue while another has seats free. Called on the engine thread."""
        serving = [(self.engine, "plan"),
                   *((r.engine, r.name) for r in self.loop.replicas.values() if r.state == "serving")]
        return min(serving, key=lambda p: (len(p[0].seqs) + 1) / p[0].config.max_num_seqs)

    def cancel(self, req_id: int) -> None:
        for engine in self.loop.engines():
            engine.cancel(req_id)           # only the engine that holds it has it

    def generate(self, prompt: str | list[int], params: SamplingParams, timeout: float = 600) -> RequestOutput:
        """Blocking convenience: submit and wait for the finished output."""
        done: Future = Future()
        self.submit(prompt, params, Listener(on_done=lambda out, err: done.set_result((out, err))))
        out, err = done.result(timeout)
        if err:
            raise ServiceUnavailable(err)
        return out

    # --- state -----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def queue_depth(self) -> int:
        return sum(len(e.scheduler.waiting) for e in self.loop.engines())

    def running(self) -> int:
        return sum(len(e.scheduler.running) for e in self.loop.engines())

    def health(self) -> dict[str, Any]:
        nodes = self.runtime.health() if self.runtime else {}
        ok = self.loop.broken is None and all(v == "ok" for v in nodes.values())
        return {"status": "ok" if ok else "degraded", "nodes": nodes,
                "error": None if self.loop.broken is None else str(self.loop.broken)}

    def node_states(self) -> list[dict[str, Any]]:
        """Per node: alive, layers held, resident memory, weights, KV, step time p50."""
        if self.runtime is None:
            return []
        infos = {i.node: i for i in self.loop.call(self.runtime.stats)}
        health = self.runtime.health()
        out = []
        for n in self.runtime.nodes:
            i = infos.get(n)
            out.append({"node": n, "state": health[n], "layers": [list(x) for x in i.layers] if i else [],
                        "rss_bytes": i.rss_bytes if i else None, "weight_bytes": i.weight_bytes if i else None,
                        "kv_bytes": i.kv_bytes if i else None, "step_ms_p50": i.step_ms_p50 if i else None,
                        "threads": i.threads if i else None, "device": i.device if i else None})
        return out

    # --- reconfiguration -------------------------------------------------------------------------

    def reconfigure(self, validated: ValidatedPlan, method: str = "live", wait: bool = True,
                    timeout: float = 600.0, weights: str = "pull", on_event=None,
                    fail_at: str | None = None, transfer_timeout_s: float = 300.0,
                    switch_timeout_s: float = 5.0) -> ReconfigReport:
        """Apply a validated plan to the running service (see executor/reconfig.py).

        It carries out the plan's own PlanDelta (what the validator's transition rule checked) and
        moves to the plan's KV reservation. With wait=True it returns the finished report (state
        "done", or "aborted" with the error; the old plan then still serves) or raises
        ReconfigurationTimeout, which carries the report, when `timeout` passes first."""
        validated = _genuine(validated)
        if self.runtime is None or self.plan is None:
            raise ReconfigurationError("this service runs in one process; nothing to reconfigure")
        if validated.cluster_fingerprint != self.cluster.fingerprint():
            raise ReconfigurationError(f"plan was validated against cluster state {validated.cluster_fingerprint}, "
                                       f"now {self.cluster.fingerprint()}: validate it again")
        live = self.plan.plan.placement_key()
        if validated.transition_from != live:
            raise ReconfigurationError(f"plan's transition was validated from {validated.transition_from!r}, but "
                                       f"the live plan is {live!r}: validate it with current=the live plan")
        if self.loop.reconfig is not None and not self.loop.reconfig.done:
            raise ReconfigurationError(f"reconfiguration {self.loop.reconfig.rid} is still under way")
        if self.loop.broken is not None:
            raise ServiceUnavailable(f"service unavailable: {self.loop.broken}")
        taken = {n: r.name for r in self.loop.replicas.values() for n in r.nodes}
        taken.update({n: "a replica being loaded" for n in self.runtime.loading})
        clash = [f"{st.node} ({taken[st.node]})" for st in validated.plan.stages if st.node in taken]
        if clash:
            raise ReconfigurationError(f"the plan places stages on nodes another pipeline of this service holds: "
                                       f"{', '.join(clash)}; drain that replica first (DELETE /admin/replicas/NAME)")
        cfg, kv = self.engine.config, validated.kv
        if kv.block_size != cfg.block_size:
            raise ReconfigurationError(f"the plan reserves KV in blocks of {kv.block_size} tokens, the service runs "
                                       f"blocks of {cfg.block_size}; restart the service to change the block size")
        if kv.tokens < cfg.max_model_len:
            raise ReconfigurationError(f"the plan reserves KV for {kv.tokens} tokens per stage, fewer than the "
                                       f"service's context window of {cfg.max_model_len}: raise the intent's "
                                       "traffic.context_tokens")

        def events(rep):
            if rep.state == "done":           # committed: the new plan serves
                self.plan = validated
            if rep.state in ("done", "aborted"):
                self.history.append(rep)
                for cb in self.on_reconfigured:
                    cb(rep)
            if on_event:
                on_event(rep)
        rc = Reconfiguration(self.engine, self.runtime, validated.delta, method=method, source=self.source,
                             dtype=self.dtype, weights=weights, on_event=events, timeout_s=transfer_timeout_s,
                             switch_timeout_s=switch_timeout_s)
        rc.fail_after = fail_at              # fault injection for tests: fail on entering this phase
        self.loop.call(lambda: setattr(self.loop, "reconfig", rc))
        self.loop.wake.set()
        if wait:
            deadline = time.monotonic() + timeout
            while not rc.done and time.monotonic() < deadline:
                time.sleep(0.005)
            if not rc.done:                   # never a silent return: the caller would think it applied
                raise ReconfigurationTimeout(rc.report, timeout)
        return rc.report

    def reconfigure_plan(self, plan: dict | PlacementPlan, method: str = "live", wait: bool = True) -> ReconfigReport:
        """Validate a plain plan against the live state (policy, transition from the live plan, freshness)
        and apply it. Raises PlanRejected (with the report), or InputError for a malformed plan or one
        without a cluster_fingerprint (its freshness could not be shown)."""
        plan = self._plain_plan(plan)
        validated = approve(plan, self.cluster, self.policy, plan.intent, self.model_spec, current=self.plan.plan)
        return self.reconfigure(validated, method=method, wait=wait)

    def _plain_plan(self, plan: dict | PlacementPlan) -> PlacementPlan:
        """A plan handed in as JSON, parsed and carrying the fingerprint it was made from."""
        if self.policy is None:
            raise ReconfigurationError("this service was started without a policy pack; hand in a ValidatedPlan")
        if isinstance(plan, dict):
            try:
                plan = PlacementPlan.model_validate(plan)
            except ValidationError as e:
                err = e.errors()[0]
                raise InputError(err["msg"], field=".".join(map(str, err["loc"]))) from None
        if plan.cluster_fingerprint is None:
            # Stamping today's fingerprint on would make the freshness rule pass whatever the sender saw.
            raise InputError("the plan carries no cluster_fingerprint, so whether it was made from the cluster "
                             "state that holds now cannot be shown; make it from the live state (`continuo plan`, "
                             "or start from GET /admin/plan, which carries the fingerprint) and send it with its "
                             "cluster_fingerprint", field="cluster_fingerprint")
        return plan

    # --- replicas: more pipelines of the same model, on nodes of their own ---------------------------

    def add_replica(self, validated: ValidatedPlan, name: str | None = None) -> Replica:
        """Load a second (third, ...) pipeline of the model on idle nodes while the plan serves, then
        route new requests to it as well. Blocks while its stages load (seconds); the serving
        pipelines step on meanwhile. Raises ReplicaError when its nodes are not idle and live, or it
        does not fit the service (model, KV block size, context window)."""
        validated = _genuine(validated)
        if self.runtime is None or self.plan is None:
            raise ReplicaError("this service runs in one process; a replica needs node workers")
        if self.loop.broken is not None:
            raise ServiceUnavailable(f"service unavailable: {self.loop.broken}")
        if validated.cluster_fingerprint != self.cluster.fingerprint():
            raise ReplicaError(f"plan was validated against cluster state {validated.cluster_fingerprint}, "
                               f"now {self.cluster.fingerprint()}: validate it again")
        if validated.plan.model != self.plan.plan.model:
            raise ReplicaError(f"the replica's plan serves {validated.plan.model!r}; this service serves "
                               f"{self.plan.plan.model!r}")
        cfg, kv = self.engine.config, validated.kv
        if kv.block_size != cfg.block_size or kv.tokens < cfg.max_model_len:
            raise ReplicaError(f"the replica's plan reserves KV for {kv.tokens} tokens in blocks of {kv.block_size}; "
                               f"this service runs a context window of {cfg.max_model_len} in blocks of "
                               f"{cfg.block_size}: plan it from the same intent")
        nodes = [st.node for st in validated.plan.stages]
        rt = self.runtime
        with self._replica_lock:
            if name is not None and (not name.isidentifier() or name in self.loop.replicas):
                raise ReplicaError(f"replica name {name!r} is taken or not a plain name")
            name = name or next(f"r{i}" for i in range(1, 10_000) if f"r{i}" not in self.loop.replicas)
            rc = self.loop.reconfig
            moving = set(rc.rebuilt) if rc is not None and not rc.done else set()
            owner = {**{st.node: "the plan" for st in self.plan.plan.stages}, **{n: "the reconfiguration under way"
                     for n in moving}, **{n: r.name for r in self.loop.replicas.values() for n in r.nodes}}
            busy = [f"{n} ({owner[n]})" for n in nodes if n in owner]
            busy += [f"{n} ({'down' if n not in rt.ranks else 'dead: ' + rt.dead[n]})"
                     for n in nodes if n not in rt.ranks or n in rt.dead]
            if busy:
                raise ReplicaError(f"a replica needs idle, live nodes of its own; taken: {', '.join(busy)}")
            rt.replica_nodes |= set(nodes)         # the plan's reconfigurations keep off them from now
        try:
            placement = rt.load_replica([(st.node, st.start, st.stop) for st in validated.plan.stages],
                                        self.source, self.dtype, kv.blocks, kv.block_size)
            pipeline = rt.pipeline(rt.num_layers, placement)
            pipeline.on_step = self.telemetry.pipeline_step if self.telemetry.enabled else None
            engine = Engine([pipeline], dataclasses.replace(cfg, num_kv_blocks=kv.blocks), self.engine.tokenizer,
                            self.engine.eos_token_ids, self.engine.vocab_size)
            rep = Replica(name, validated, engine)

            def register() -> None:
                if self.loop.broken is not None:
                    raise ServiceUnavailable(f"service unavailable: {self.loop.broken}")
                self.loop.replicas[name] = rep
            self.loop.call(register, quiet=False)
        except BaseException:
            rt.replica_nodes -= set(nodes)
            raise
        return rep

    def add_replica_plan(self, plan: dict | PlacementPlan, name: str | None = None) -> Replica:
        """POST /admin/replicas: validate a plain plan as a pipeline of its own (policy, memory, SLO,
        freshness; no transition, since nothing moves) and add it as a replica."""
        plan = self._plain_plan(plan)
        validated = approve(plan, self.cluster, self.policy, plan.intent, self.model_spec, current=None)
        return self.add_replica(validated, name)

    def drain_replica(self, name: str, wait: bool = True, timeout: float = 600.0) -> Replica:
        """Stop routing new requests to a replica; it leaves once it has finished what it holds (none
        is lost) and its nodes forget their stages. A failed replica is released at once."""
        rep = self.loop.replicas.get(name)
        if rep is None:
            raise UnknownReplica(f"no replica named {name!r} (replicas: {', '.join(self.loop.replicas) or 'none'})")

        def drain() -> None:
            if rep.state == "serving":
                rep.state = "draining"
            elif rep.state == "failed":
                self.runtime.drop([n for n in rep.nodes if n not in self.runtime.dead])
                self.runtime.replica_nodes -= set(rep.nodes)
                self.loop.replicas.pop(rep.name, None)
        self.loop.call(drain, quiet=False)
        self.loop.wake.set()
        if wait and not rep.gone.wait(timeout):
            raise ReplicaError(f"replica {name} still holds {len(rep.engine.seqs)} requests after {timeout:g} s")
        return rep

    def replicas(self) -> list[dict[str, Any]]:
        """GET /admin/replicas: the pipelines beside the plan's, with what each holds."""
        return [r.as_dict() for r in list(self.loop.replicas.values())]

    @property
    def model_spec(self) -> ModelSpec:
        cfg = self.runtime.model_cfg
        return ModelSpec.from_hf_config(cfg.to_hf(), name=self.model_name, dtype="fp32" if self.dtype == "float32" else "bf16")

    def stats(self) -> dict[str, Any]:
        """GET /admin/stats: the telemetry snapshot, with the live gauges and the emulated links."""
        snap = self.telemetry.snapshot(self.queue_depth(), self.running())
        snap["links"] = self.links
        # how the plan's engine schedules: a controller predicting TTFT and TPOT needs the prompt budget
        # per step while others decode (a prompt arriving then takes ceil(P / budget) steps)
        c = self.engine.config
        snap["engine"] = {"max_num_seqs": c.max_num_seqs, "max_prefill_tokens": c.max_prefill_tokens,
                          "max_prefill_tokens_decoding": c.max_prefill_tokens_decoding}
        return snap

    def close(self) -> None:
        self.loop.stop()
        self.loop.join(timeout=10)
        if self.runtime:
            self.runtime.shutdown()
        if self.links is not None:
            transport.emulate_links(None)     # this process's sends are plain again (a later service)
