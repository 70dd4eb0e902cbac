"""Live pipeline reconfiguration, driver side: the state machine that carries out a PlanDelta.

What moves is not worked out here: the validator computed it (policies.PlanDelta, half-open layer
ranges) and checked it, and it arrives inside the ValidatedPlan. This module only makes it so.

    serving -> preparing -> pre-copying -> switching -> cleaning -> serving
                   \\______________\\___________ aborted (the old plan never stopped serving)

`tick()` is called by the engine loop between two steps and never blocks, except in the switch,
the only window in which no token is produced: the last KV delta is copied and every changed
worker swaps its new stage in, then the route the driver sends with each step changes.

Methods behind the same machine, for measurement:
  live           weights prepared and KV pre-copied in rounds while decoding goes on
  stop_and_copy  everything (weights and all KV) is moved inside the pause
  recompute      weights prepared while serving; the moved KV is dropped and re-prefilled
  restart        stop the world: every node reloads its new layers, every request re-prefills
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from policies import PlanDelta, Refused

from .migration import Abort, Cleanup, Commit, CopyKV, Prepare, RecvKV, RoundEnd, SendKV, SendWeights
from .runtime import NodeRuntime, StagePlacement, WorkerDied, WorkerError, WorkerUnresponsive

METHODS = ("live", "stop_and_copy", "recompute", "restart")
_rids = itertools.count(1)


class ReconfigurationError(Refused, RuntimeError):
    """A reconfiguration was refused or aborted; the old plan keeps serving."""


class ReconfigurationTimeout(ReconfigurationError):
    """Service.reconfigure(wait=True) gave up waiting; the reconfiguration goes on (see `report.state`)."""

    def __init__(self, report: "ReconfigReport", waited_s: float):
        self.report = report
        super().__init__(f"reconfiguration {report.rid} not finished after {waited_s:g} s (state {report.state}); it "
                         "goes on in the background: follow it with GET /admin/reconfigurations or Service.history")


@dataclass
class ReconfigReport:
    """What one reconfiguration did and how long each phase took (seconds)."""
    rid: int
    method: str
    state: str = "serving"
    delta: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    pause_s: float | None = None
    rounds: int = 0
    kv_tokens_copied: int = 0
    bytes_moved: dict[str, int] = field(default_factory=lambda: {"weights": 0, "kv": 0})
    # moving time: the longest any receiving node spent in receives of weights and KV (nodes
    # receive in parallel), as the workers report it at the switch; not stage building or packing
    transfer_s: float | None = None
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None

    @property
    def bandwidth_gbs(self) -> float | None:
        total = sum(self.bytes_moved.values())
        return total / self.transfer_s / 1e9 if self.transfer_s and total else None

    def as_dict(self) -> dict[str, Any]:
        return {"rid": self.rid, "method": self.method, "state": self.state, "delta": self.delta,
                "phases_s": self.phases, "pause_ms": None if self.pause_s is None else 1e3 * self.pause_s,
                "rounds": self.rounds, "kv_tokens_copied": self.kv_tokens_copied, "bytes_moved": self.bytes_moved,
                "transfer_s": self.transfer_s, "bandwidth_gbs": self.bandwidth_gbs, "error": self.error}


class Reconfiguration:
    """One reconfiguration of a running service, advanced by `tick()` between engine steps."""

    def __init__(self, engine, runtime: NodeRuntime, delta: PlanDelta, *, method: str = "live",
                 source=None, dtype: str = "float32", weights: str = "pull", max_rounds: int = 4,
                 timeout_s: float = 300.0, switch_timeout_s: float = 5.0, on_event=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        self.engine, self.rt, self.method, self.delta = engine, runtime, method, delta
        serving = [(p.node, p.start, p.end) for p in runtime.placement]
        if serving != [(s.node, s.start, s.stop) for s in delta.old]:
            planned = [(s.node, s.start, s.stop) for s in delta.old]
            raise ReconfigurationError(f"the delta was computed from {planned!r}, but the workers serve "
                                       f"{serving!r}: validate again against the live plan")
        pool = engine.config.num_kv_blocks
        if delta.old_kv_blocks is not None and delta.old_kv_blocks != pool:
            raise ReconfigurationError(f"the delta assumes a KV pool of {delta.old_kv_blocks} blocks per stage, the "
                                       f"service runs {pool}: validate again against the live plan")
        self.new = [StagePlacement(s.node, s.start, s.stop) for s in delta.new]
        self.rebuilt = delta.rebuilt               # nodes that build a new stage (and keep the old until cleanup)
        self.old_blocks = pool
        self.blocks = delta.kv_blocks or pool      # what the validator's capacity rule reserved
        self.block_size = engine.config.block_size
        self.source, self.dtype = source, dtype
        self.weights, self.max_rounds, self.timeout_s = weights, max_rounds, timeout_s
        # The switch is the pause: a node that has not committed by then (stopped, swapping) is not
        # waited for; the reconfiguration aborts and the old plan serves on (see _issue).
        self.switch_timeout_s = switch_timeout_s
        self.unresponsive: dict[str, str] = {}  # node -> the store key that will say it is back
        self.rid = next(_rids)
        self.report = ReconfigReport(self.rid, method, delta=self.delta.summary())
        self.state = "serving"
        self.phase_t = time.perf_counter()
        self.copied: dict[int, int] = {}       # req_id -> KV positions already at their new home
        self.round = 0
        self.waiting_for: tuple[int, list[str]] | None = None
        self.on_event = on_event or (lambda rep: None)
        self.fail_after: str | None = None     # tests inject a failure at a phase
        self.committed = False

    # --- helpers ----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in ("done", "aborted")

    def _enter(self, state: str) -> None:
        now = time.perf_counter()
        if self.state not in ("serving", "done", "aborted"):
            self.report.phases[self.state] = now - self.phase_t
        self.state, self.phase_t, self.report.state = state, now, state
        if state == "done":
            self.report.ended = now
        self.on_event(self.report)
        if self.fail_after == state:
            raise ReconfigurationError(f"injected failure on entering {state}")

    def _round_done(self, blocking: bool) -> bool:
        """Whether every worker posted the current round; raises on a worker's error."""
        rnd, nodes = self.waiting_for
        keys = [f"mig/{self.rid}/{rnd}/{n}" for n in nodes]
        while True:
            for n in nodes:
                if n in self.rt.dead or self.rt.health().get(n, "ok") != "ok":
                    raise WorkerDied(n, self.rt.dead.get(n, "process exited"))
            if time.perf_counter() - self.report.started > self.timeout_s:
                late = {n: k for k, n in zip(keys, nodes) if not self.rt.store.check([k])}
                self.unresponsive.update(late)
                raise ReconfigurationError(f"timed out after {self.timeout_s:g} s waiting for {', '.join(late)}")
            # A node that failed its round fails the reconfiguration at once, without waiting for
            # the others (a peer may be waiting on a transfer that node will never finish).
            posted = [(k, n) for k, n in zip(keys, nodes) if self.rt.store.check([k])]
            for k, n in posted:
                v = self.rt.store.get(k).decode()
                if v != "ok":
                    # workers name themselves in their errors (Worker / Migrator): say it once
                    raise ReconfigurationError(v if v.startswith(f"{n}: ") else f"{n}: {v}")
            if len(posted) == len(keys):
                self.waiting_for = None
                return True
            if not blocking:
                return False
            time.sleep(0.0005)

    def _issue(self, per_node: dict[str, list], commit: bool = False) -> None:
        """Send each node its round as one batch: sends before receives (so no pair waits on the
        other), then a RoundEnd (completion posted to the store) or, in the switch, a Commit (the
        worker replies once its transfers are done and the new stage is in)."""
        from .transport import send_obj
        order = {SendWeights: 0, SendKV: 0, CopyKV: 1, Prepare: 2, RecvKV: 3}
        nodes = [n for n in per_node if per_node[n]] if not commit else self.rebuilt
        end = Commit(self.rid) if commit else RoundEnd(self.rid, self.round)
        batches = {n: tuple(sorted(per_node.get(n, []), key=lambda m: order[type(m)])) + (end,) for n in nodes}
        with self.rt.lock:
            works: dict[str, list] = {}
            sent, died = [], None
            # a round's batch is taken at once by a worker that is running; the switch waits for its
            # commits until the switch deadline
            deadline = time.monotonic() + (self.switch_timeout_s if commit else 0.05)
            try:
                for n, b in batches.items():
                    # past a node that cannot be reached the others still get theirs: in the switch
                    # they commit and reply, and those replies must be read (and their commits undone
                    # by the abort), or their channels stay out of step
                    try:
                        self.rt.catch_up(n)       # one left behind by an earlier deadline settles first
                        works[n] = self.rt._guard(n, lambda n=n, b=b: send_obj(b, self.rt.ranks[n]))
                        sent.append(n)
                    except WorkerDied as e:
                        died = died or e
                if commit:
                    key = f"mig/{self.rid}/commit/{{}}"
                    try:
                        replies = [r for r in self.rt.collect(
                            sent, ready=key.format, timeout=max(0.0, deadline - time.monotonic()),
                            what=f"the commit of reconfiguration {self.rid}") if r]
                    except WorkerUnresponsive:
                        self.unresponsive.update({n: key.format(n) for n in self.rt.behind if n in sent})
                        raise
                    if died is not None:
                        raise died
                    self.report.transfer_s = max((r.get("recv_s", 0.0) for r in replies), default=0.0)
                    # what moved is what the receivers counted, tensor by tensor (embedding, norm and
                    # LM head included), not an estimate from layer sizes
                    self.report.bytes_moved = {"weights": sum(r.get("weight_bytes_in", 0) for r in replies),
                                               "kv": sum(r.get("kv_bytes_in", 0) for r in replies)}
            finally:
                # Sends already under way must finish even if a later one failed (a dropped send
                # leaves its receiver holding half a message); one to a node that is not taking
                # them by the deadline (stopped) is finished when that node is back.
                failed = self.rt.settle_sends(works, deadline)
            if died is not None:
                raise died
            if failed is not None:
                raise failed
        self.waiting_for = None if commit else (self.round, nodes)

    def _prepare_round(self) -> None:
        """Round 0: every changed node builds its next stage; gained layers are pulled or loaded."""
        per: dict[str, list] = {n: [] for n in self.rebuilt}
        for node in self.rebuilt:
            start, end = self.delta.new_range(node) or (0, 0)
            pulls, loads = [], []
            for mv in self.delta.sources(node):
                if not mv.moves:
                    continue
                if self.weights == "pull" and mv.src not in self.rt.dead:
                    pulls.append((mv.start, mv.stop, self.rt.ranks[mv.src]))
                    per[mv.src].append(SendWeights(self.rid, mv.start, mv.stop, self.rt.ranks[node]))
                else:
                    loads.append((mv.start, mv.stop))
            per[node].append(Prepare(self.rid, start, end, tuple(pulls), tuple(loads), self.source, self.dtype,
                                     self.blocks, self.block_size, getattr(self.rt, "model_cfg", None)))
        self.round = 0
        self._issue(per)

    def _kv_round(self, final: bool, commit: bool = False) -> int:
        """Copy positions [copied, now) of every running request's KV to the node that will own it."""
        lens = {s.req_id: s.num_computed for s in self.engine.scheduler.running if s.num_computed > 0}
        since = {r: self.copied.get(r, 0) for r in lens}
        tokens = sum(lens[r] - since[r] for r in lens)
        per: dict[str, list] = {n: [] for n in self.rt.nodes}
        for node in self.rebuilt:
            for run in self.delta.sources(node):
                src, x, y = run.src, run.start, run.stop
                if src == node:
                    per[node].append(CopyKV(self.rid, (x, y), since))
                else:
                    per[src].append(SendKV(self.rid, (x, y), since, self.rt.ranks[node]))
                    per[node].append(RecvKV(self.rid, self.rt.ranks[src]))
        self.round += 1
        self._issue(per, commit)
        self.copied.update(lens)
        self.report.rounds += 0 if final else 1
        self.report.kv_tokens_copied += tokens
        return tokens

    # --- the machine --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance without blocking (the switch blocks: that is the pause). Aborts on any failure."""
        try:
            self._tick()
        except (WorkerDied, WorkerError, ReconfigurationError, RuntimeError) as e:
            if self.committed:          # past the switch the new plan serves; only cleanup failed
                self.report.error = f"after the switch: {e}"
                self.state = self.report.state = "done"
                self.report.ended = time.perf_counter()
                self.on_event(self.report)
            else:
                self.abort(str(e))
            if isinstance(e, WorkerDied) and e.node in {p.node for p in self.rt.placement}:
                raise                       # a serving node is gone: the engine loop fails its requests

    def _tick(self) -> None:
        if self.state == "serving":
            self._enter("preparing")
            self._check_pool()
            if self.method in ("live", "recompute"):
                self._prepare_round()
            return
        if self.waiting_for is not None and not self._round_done(blocking=False):
            return
        if self.state == "preparing":
            if self.method == "live":
                self._enter("pre-copying")
                self._kv_round(final=False)
            else:
                self._switch()
            return
        if self.state == "pre-copying":
            delta = sum(max(0, s.num_computed - self.copied.get(s.req_id, 0)) for s in self.engine.scheduler.running)
            small = delta <= max(2, 2 * len(self.engine.scheduler.running))
            if small or self.report.rounds >= self.max_rounds:
                self._switch()
            else:
                self._kv_round(final=False)
            return
        if self.state == "cleaning":
            # a step after the switch, not inside it: the first token on the new plan does not wait
            if self.method != "restart":
                for node in self.rebuilt:
                    self.rt.call(node, Cleanup(self.rid))
            self._enter("done")

    def _check_pool(self) -> None:
        """A smaller KV pool must still hold the blocks the running requests reserved."""
        in_use = self.old_blocks - self.engine.scheduler.free_blocks
        if in_use > self.blocks:
            raise ReconfigurationError(f"running requests hold {in_use} KV blocks, but the new plan reserves "
                                       f"{self.blocks} per stage: retry when fewer requests run")

    def _resize_pool(self) -> None:
        """After the commit every stage holds the new pool: admission counts against it from now on.
        (The engine thread runs this between steps, so no request is admitted meanwhile.)"""
        if self.blocks == self.old_blocks:
            return
        cfg = dataclasses.replace(self.engine.config, num_kv_blocks=self.blocks)
        sched = self.engine.scheduler
        with sched.lock:
            sched.free_blocks += self.blocks - self.old_blocks
            sched.cfg = self.engine.config = cfg

    def _switch(self) -> None:
        """The pause: last delta, commit on every changed node, new route. Blocks until done."""
        self._enter("switching")
        t0 = time.perf_counter()
        self._check_pool()                 # before anything commits: a refusal leaves the old plan serving
        if self.method == "stop_and_copy":
            self._prepare_round()
            self._round_done(blocking=True)
        if self.method == "restart":
            self._restart()
        else:
            if self.method in ("live", "stop_and_copy"):
                # The last delta and the Commit go out in one batch per node: each worker commits
                # once its own transfers are done, so the pause is one delta copy + one round trip.
                self._kv_round(final=True, commit=True)
            else:
                self._issue({}, commit=True)
            self.rt.placement = list(self.new)
            self.committed = True
            if self.method == "recompute":
                self.engine.recompute_all()
        self._resize_pool()
        self.report.pause_s = time.perf_counter() - t0
        self._enter("cleaning")

    def _restart(self) -> None:
        """Stop the world: every node drops its layers, loads the new ones, requests re-prefill.
        A replica's nodes (another pipeline of the service) are not the plan's and keep theirs."""
        self.committed = True           # from here on there is no old plan to go back to
        from .transport import DropStage
        for node in self.rt.nodes:
            if node not in self.rt.dead and node not in self.rt.replica_nodes | self.rt.loading:
                self.rt.call(node, DropStage())
        self.rt.load([(p.node, p.start, p.end) for p in self.new], self.source, self.dtype, self.blocks,
                     self.block_size)
        self.engine.recompute_all()

    def fail(self, why: str) -> None:
        """The service broke under it (a serving worker died): end it now rather than leave it
        unfinished for good (the engine loop ticks no reconfiguration of a broken service)."""
        if self.done:
            return
        if self.committed:
            self.report.error = f"after the switch: {why}"
            self.state = self.report.state = "done"
            self.report.ended = time.perf_counter()
            self.on_event(self.report)
        else:
            self.abort(why)

    def abort(self, why: str) -> None:
        """Drop everything prepared; the old plan keeps serving (only before the switch commits)."""
        for node in self.rebuilt:
            if node in self.rt.dead:
                continue
            try:
                if node in self.unresponsive:
                    # It cannot be sent to until it is back (see NodeRuntime.leave_behind): the abort
                    # reaches it then, before any other message, and undoes its commit if it made one.
                    self.rt.leave_behind(node, self.unresponsive[node], then=[Abort(self.rid)])
                else:
                    self.rt.call(node, Abort(self.rid))
            except (WorkerDied, WorkerError) as e:
                # Its state is unknown now (it may hold the new layers): never route to it again
                # unnoticed; a serving node's loss fails the requests with this error.
                self.rt.dead.setdefault(node, f"abort of reconfiguration {self.rid} failed: {e}")
                why = f"{why}; then the abort failed on {node}: {e}"
        self.report.error = why
        self.waiting_for = None
        self.state = self.report.state = "aborted"
        self.report.ended = time.perf_counter()
        self.on_event(self.report)
