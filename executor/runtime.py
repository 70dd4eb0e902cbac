"""The driver's side of the node workers: start or accept them, load a plan's stages, run steps.

    rt = NodeRuntime.local(["edge-a", "edge-b"])        # one worker process per node, on this machine
    rt.load([("edge-a", 0, 12), ("edge-b", 12, 30)])     # each worker loads only its layers
    engine = Engine([rt.pipeline()], config, tokenizer)  # the whole pipeline is one Stage to the engine

With k stages a step with enough tokens is cut into k micro-batches; all are sent at once, so
while the second stage works on micro-batch 1 the first already runs micro-batch 2 (pipelining).
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .stage import StepBatch
from .transport import (JOIN_TOKEN_ENV, DropStage, Free, Hop, LoadStage, Reply, Shutdown, Stats, Step, WorkerInfo, recv_obj,
                        recv_tensor_info, send_obj, serve_rendezvous, settle, wait_all)


class WorkerDied(RuntimeError):
    """A node worker stopped answering; its requests fail and /health reports it."""

    def __init__(self, node: str, detail: str):
        self.node = node
        super().__init__(f"worker for node {node} died: {detail}")


class WorkerError(RuntimeError):
    """A worker refused a command (bad input or its bug); the message carries its words."""


@dataclass
class Behind:
    """What a node that missed a deadline is owed and owes: store keys that say it is back, replies it
    still sends, commands it is still to get (each answered by a Reply)."""
    keys: list = field(default_factory=list)
    replies: int = 0
    then: list = field(default_factory=list)


class WorkerUnresponsive(WorkerError):
    """A worker did not answer within a deadline (stopped, swapping, overloaded). Its reply is still
    owed: the driver reads it, first, before the next reply it waits for from that node."""

    def __init__(self, node: str, what: str, waited_s: float):
        self.node = node
        super().__init__(f"{node}: no reply to {what} within {waited_s:g} s (stalled or overloaded)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StagePlacement:
    node: str
    start: int      # first layer
    end: int        # one past the last layer


class NodeRuntime:
    """Worker processes for the nodes of a cluster, driven from rank 0 (this process)."""

    def __init__(self, nodes: Sequence[str], host: str, port: int, procs: dict[str, subprocess.Popen] | None = None,
                 timeout: float = 120.0, join_token: str | None = None):
        """Wait for every node to join at host:port, proving the join token (default: $CONTINUO_JOIN_TOKEN)."""
        self.nodes = list(nodes)
        self.procs = procs or {}
        self.timeout = timeout
        token = join_token or os.environ.get(JOIN_TOKEN_ENV)
        if not token:
            raise ValueError(f"workers on other hosts join with a token: set ${JOIN_TOKEN_ENV} to the same secret "
                             "on the driver and every worker (e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))')")
        self.store, self.ranks = serve_rendezvous(host, port, self.nodes, token, timeout)
        self.node_of = {r: n for n, r in self.ranks.items()}
        self.dead: dict[str, str] = {}
        self.behind: dict[str, Behind] = {}  # nodes that missed a deadline (see leave_behind)
        self.unsettled: dict[str, Future] = {}  # their sends not yet taken (see settle_sends)
        self._settler = ThreadPoolExecutor(max_workers=4, thread_name_prefix="settle")
        self.devices: dict[str, str] = {}
        self.nccl_ok: dict[str, bool] = {}
        self.placement: list[StagePlacement] = []
        self.lock = threading.RLock()      # one conversation with the workers at a time
        # Nodes a replica is being loaded onto: a thread other than the engine loop's waits for their
        # reply, so nothing else talks to them until it is in (free and stats pass them by).
        self.loading: set[str] = set()
        self.replica_nodes: set[str] = set()   # nodes a replica serves on: the plan's reconfigurations keep off

    @classmethod
    def local(cls, nodes: Sequence[str], threads_per_worker: int | None = None, timeout: float = 120.0,
              host: str = "127.0.0.1") -> "NodeRuntime":
        """Start one worker process per node on this machine, splitting the cores between them."""
        port = free_port()
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, len(nodes)))
        token = secrets.token_urlsafe(32)      # this run's join token, handed down in the environment (not argv)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), JOIN_TOKEN_ENV: token}
        procs = {n: subprocess.Popen([sys.executable, "-m", "executor.worker", "--join", f"{host}:{port}",
                                      "--node", n, "--threads", str(threads), "--timeout", str(timeout)], env=env)
                 for n in nodes}
        try:
            return cls(nodes, host, port, procs, timeout, join_token=token)
        except BaseException:
            for p in procs.values():
                p.kill()
            raise

    # --- commands ----------------------------------------------------------------------------

    def _guard(self, node: str, fn):
        if node in self.dead:
            raise WorkerDied(node, self.dead[node])
        try:
            return fn()
        except RuntimeError as e:
            if isinstance(e, (WorkerDied, WorkerError)):
                raise
            self.dead[node] = self.last_words(node) or str(e).splitlines()[0][:200]
            raise WorkerDied(node, self.dead[node]) from None

    def last_words(self, node: str) -> str | None:
        """What a worker posted before it exited on a failed step (see Worker.die), if anything."""
        try:
            if self.store.check([f"error/{node}"]):
                return self.store.get(f"error/{node}").decode()
        except RuntimeError:        # the store went with the driver's own shutdown
            pass
        return None

    def call(self, node: str, msg) -> object:
        """Send a command to a node's worker and wait for its reply value."""
        rank = self.ranks[node]
        with self.lock:
            self.catch_up(node)
            reply: Reply = self._guard(node, lambda: (wait_all(send_obj(msg, rank)), recv_obj(rank))[1])
        if not reply.ok:
            raise WorkerError(f"{node}: {reply.error}")
        return reply.value

    # --- nodes that missed a deadline ---------------------------------------------------------------
    # A stopped or swapping worker cannot be waited for (the switch is the service's pause), and it
    # cannot be sent to either: a gloo send completes only once the receiver has posted its receive.
    # So the driver leaves it behind: it remembers the replies that node owes and the messages it is
    # still to get (an Abort), and settles both, in channel order, once the node shows it is back (it
    # posts a store key just before each reply), before anything else goes to it.

    def leave_behind(self, node: str, back_key: str, replies: int = 0, then=()) -> None:
        b = self.behind.setdefault(node, Behind())
        b.keys.append(back_key)
        b.replies += replies
        b.then += list(then)

    def catch_up(self, node: str, block: bool = True) -> bool:
        """Settle what `node` was left behind with; False if it is not back yet (block=False only).
        A late reply or deferred command that failed leaves its state unknown: the node counts as dead."""
        fut = self.unsettled.get(node)
        if fut is not None and (block or fut.done()):
            del self.unsettled[node]
            failed = fut.result()          # it takes what is queued for it before anything newer
            if failed is not None:
                self.dead[node] = f"a send to it failed after it missed a deadline: {failed}"
                raise WorkerDied(node, self.dead[node])
        elif fut is not None:
            return False
        b = self.behind.get(node)
        if b is None:
            return True
        deadline = time.monotonic() + self.timeout
        while not all(self.store.check([k]) for k in b.keys):
            if self.health()[node] != "ok":
                raise WorkerDied(node, self.dead[node])
            if not block:
                return False
            if time.monotonic() > deadline:
                self.dead[node] = f"did not come back within {self.timeout:g} s of missing a deadline"
                raise WorkerDied(node, self.dead[node])
            time.sleep(0.001)
        del self.behind[node]
        replies = [self._guard(node, lambda: recv_obj(self.ranks[node])) for _ in range(b.replies)]
        for msg in b.then:
            replies.append(self._guard(node, lambda: (wait_all(send_obj(msg, self.ranks[node])),
                                                      recv_obj(self.ranks[node]))[1]))
        bad = [r.error for r in replies if not r.ok]
        if bad:
            self.dead[node] = f"after missing a deadline it reported: {bad[0].splitlines()[0][:200]}"
            raise WorkerDied(node, self.dead[node])
        return True

    def settle_sends(self, works: dict[str, list], deadline: float) -> RuntimeError | None:
        """Wait for sends already under way, node by node, until `deadline`. A gloo send completes only
        once the receiver takes it (a stopped worker does not), and a gloo work says so only to the one
        that waits on it, so the waiting happens on a helper thread; a node whose sends are not done by
        the deadline keeps them unsettled, finished by catch_up. Returns the first failure."""
        futs = {n: self._settler.submit(settle, ws) for n, ws in works.items() if ws}
        first = None
        for n, fut in futs.items():
            try:
                first = first or fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                self.unsettled[n] = fut
        return first

    def reap(self) -> None:
        """Between steps: settle with every node left behind that is back by now (never waits)."""
        for n in list(self.behind) + [n for n in self.unsettled if n not in self.behind]:
            try:
                self.catch_up(n, block=False)
            except WorkerDied:
                pass            # recorded in self.dead: /health and the next use of the node say why

    def collect(self, nodes: Sequence[str], ready=None, timeout: float | None = None,
                what: str = "the command") -> list:
        """The replies of several workers to commands already sent to all of them.

        With `ready(node)` (the store key a worker posts just before it replies) and `timeout`, a node
        that has not replied by then is left behind (see leave_behind) and raises WorkerUnresponsive,
        after the other replies are read."""
        # Every reply is read even when one fails (a dead worker): an unread reply would be taken
        # for the answer to that node's next command, and its channel would stay out of step.
        replies, died, late = [], None, []
        deadline = None if timeout is None else time.monotonic() + timeout
        for n in nodes:
            if deadline is not None and ready is not None:
                while not self.store.check([ready(n)]) and time.monotonic() < deadline and self.health()[n] == "ok":
                    time.sleep(0.0005)
                if not self.store.check([ready(n)]) and self.health()[n] == "ok":
                    self.leave_behind(n, ready(n), replies=1)
                    late.append(n)
                    continue
            try:
                replies.append((n, self._guard(n, lambda n=n: recv_obj(self.ranks[n]))))
            except WorkerDied as e:
                died = died or e
        if died is not None:
            raise died
        bad = [f"{n}: {r.error}" for n, r in replies if not r.ok]
        if bad:
            raise WorkerError("; ".join(bad))
        if late:
            raise WorkerUnresponsive(late[0], what, timeout)
        return [r.value for _, r in replies]

    def load(self, stages: Sequence[tuple[str, int, int]], source=None, dtype: str = "float32",
             num_kv_blocks: int = 512, block_size: int = 16) -> list[WorkerInfo]:
        """Each node loads the layers [start, end) it owns (only those weights are read)."""
        nodes = [n for n, _, _ in stages]
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"a node may serve one contiguous range of layers; {nodes} repeats one")
        infos = [self.call(n, LoadStage(a, b, source, dtype, num_kv_blocks, block_size)) for n, a, b in stages]
        self.placement = [StagePlacement(n, a, b) for n, a, b in stages]
        return infos

    def set_model(self, cfg, dtype_bytes: int) -> None:
        """Sizes the reconfiguration reports bytes with."""
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        params = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size
        self.model_cfg = cfg
        self.num_layers = cfg.num_layers
        self.layer_bytes = params * dtype_bytes
        self.kv_bytes_per_token_layer = 2 * kv * dtype_bytes

    def device(self, node: str) -> str:
        """The device a node's worker computes on (it says so in the store when it starts)."""
        if node not in self.devices:
            self.devices[node] = self.store.get(f"device/{node}").decode()
        return self.devices[node]

    def nccl(self, node: str) -> bool:
        """Whether activations to and from this node's stage may travel over NCCL: its worker computes
        on a GPU that no other worker of this service uses (NCCL refuses two ranks on one device;
        workers sharing a GPU pass activations through the host, over gloo)."""
        if node not in self.nccl_ok:
            gpu = self._gpu(node) if self.device(node).startswith("cuda") else None
            self.nccl_ok[node] = gpu is not None and not any(self._gpu(n) == gpu for n in self.ranks if n != node)
        return self.nccl_ok[node]

    def _gpu(self, node: str) -> str | None:
        """The physical GPU a node's worker said it computes on (None: a CPU worker, or not said)."""
        key = f"gpu/{node}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def route(self, placement: Sequence[StagePlacement] | None = None) -> tuple[Hop, ...]:
        return tuple(Hop(self.ranks[p.node], p.start, p.end, self.nccl(p.node))
                     for p in (self.placement if placement is None else placement))

    def load_replica(self, stages: Sequence[tuple[str, int, int]], source=None, dtype: str = "float32",
                     num_kv_blocks: int = 512, block_size: int = 16) -> list[StagePlacement]:
        """Load a second pipeline's stages onto idle nodes while the first one serves.

        Called from a thread of its own, not the engine loop's: each LoadStage is sent under the lock
        (an idle worker takes it at once), and its reply, seconds later, is waited for without it, so
        the serving pipeline's steps go on meanwhile. The nodes are `loading` until then."""
        nodes = [n for n, _, _ in stages]
        with self.lock:
            taken = {p.node for p in self.placement} | self.loading
            clash = [n for n in nodes if n in taken or n in self.dead or n not in self.ranks]
            if clash or len(set(nodes)) != len(nodes):
                raise ValueError(f"a replica needs idle, live nodes of its own; {clash or nodes} cannot take one")
            self.loading |= set(nodes)
        try:
            for n, a, b in stages:
                rank = self.ranks[n]
                with self.lock:
                    self.catch_up(n)
                    self._guard(n, lambda: wait_all(send_obj(LoadStage(a, b, source, dtype, num_kv_blocks,
                                                                       block_size), rank)))
                reply: Reply = self._guard(n, lambda: recv_obj(rank))
                if not reply.ok:
                    raise WorkerError(f"{n}: {reply.error}")
        except BaseException:
            self.drop(nodes)
            raise
        finally:
            with self.lock:
                self.loading -= set(nodes)
        return [StagePlacement(n, a, b) for n, a, b in stages]

    def drop(self, nodes: Sequence[str]) -> None:
        """Each of these live nodes forgets its stage (a replica that drained, or failed to load)."""
        for n in nodes:
            if n not in self.dead:
                try:
                    self.call(n, DropStage())
                except (WorkerDied, WorkerError):
                    pass

    def stats(self) -> list[WorkerInfo]:
        out = []
        for n in self.nodes:
            if n in self.dead or n in self.loading:
                continue
            try:
                out.append(self.call(n, Stats()))
            except WorkerDied:
                pass
        return out

    def health(self) -> dict[str, str]:
        """'ok' or why not, per node."""
        for n, p in self.procs.items():
            if n not in self.dead and p.poll() is not None:
                self.dead[n] = self.last_words(n) or f"process exited with code {p.returncode}"
        return {n: ("dead: " + self.dead[n]) if n in self.dead else "ok" for n in self.nodes}

    def pipeline(self, num_layers: int, placement: Sequence[StagePlacement] | None = None) -> "DistributedPipeline":
        """The engine's view of the stages: the plan's (self.placement, which a reconfiguration
        changes), or a replica's own, fixed placement."""
        return DistributedPipeline(self, num_layers, placement=placement)

    def shutdown(self) -> None:
        with self.lock:
            for n, r in self.ranks.items():
                if n not in self.dead:
                    try:
                        if not self.catch_up(n, block=False):
                            continue          # left behind and not back: killed below
                        wait_all(send_obj(Shutdown(), r))
                    except RuntimeError:
                        pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Ticket:
    """A step launched into the pipeline (DistributedPipeline.launch)."""
    batch: StepBatch
    route: tuple
    parts: int              # micro-batches: logits come back in this many pieces
    pending: list           # its sends, settled when its logits are in
    t0: float


def split_rows(batch: StepBatch, parts: int) -> list[StepBatch]:
    """Cut a step's rows into up to `parts` micro-batches of near-equal size."""
    n = len(batch.req_ids)
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        width = max(batch.num_new[a:b])
        out.append(StepBatch(batch.req_ids[a:b], batch.starts[a:b], batch.num_new[a:b], batch.tokens[a:b, :width]))
    return out


class DistributedPipeline:
    """The stages on the workers, presented to the engine as one Stage (layers [0, L))."""

    def __init__(self, runtime: NodeRuntime, num_layers: int, micro_batches: int | None = None,
                 min_tokens_per_micro_batch: int = 16, placement: Sequence[StagePlacement] | None = None):
        self.rt, self.start, self.end = runtime, 0, num_layers
        self.own = None if placement is None else list(placement)    # a replica's stages; None: the plan's
        self.micro_batches = micro_batches
        # A micro-batch re-reads every weight of a stage. Below a few tokens per micro-batch a step is
        # bound by those reads (decode on CPU), and cutting it only multiplies them: measured 0.61x vs
        # 0.88x of one process for 8 decode rows in 2 micro-batches. Prefill chunks are cut.
        self.min_tokens = min_tokens_per_micro_batch
        self.on_step = None         # telemetry's sink: (batch, route, [Received per micro-batch], t0, t1)

    def parts(self, batch: StepBatch, stages: int) -> int:
        if self.micro_batches:
            return self.micro_batches
        return stages if sum(batch.num_new) >= stages * self.min_tokens else 1

    @property
    def depth(self) -> int:
        """Stages a step runs through: the engine keeps this many groups of requests in flight."""
        return len(self.placement)

    @property
    def placement(self) -> list[StagePlacement]:
        return self.rt.placement if self.own is None else self.own

    def launch(self, batch: StepBatch) -> "Ticket":
        """Send one step into the pipeline and return at once; finish() waits for its logits. Steps
        launched one after the other are taken in that order by every stage (one channel each)."""
        route = self.rt.route(self.own)
        ranks = list(dict.fromkeys(h.rank for h in route))
        mbs = split_rows(batch, self.parts(batch, len(route)))
        t0 = time.perf_counter()
        with self.rt.lock:
            self.rt.reap()
            for r in ranks:                           # a serving node left behind settles first
                self.rt.catch_up(self.rt.node_of[r])
            pending: list = []
            try:
                for mb in mbs:                        # all micro-batches go out at once: stages overlap
                    msg = Step(mb, route, self.on_step is not None)
                    for r in ranks:
                        pending += self.rt._guard(self.rt.node_of[r], lambda r=r: send_obj(msg, r))
            except BaseException:
                settle(pending)                       # never drop a send half-way (see settle)
                raise
        return Ticket(batch, route, len(mbs), pending, t0)

    def finish(self, t: "Ticket") -> torch.Tensor:
        """The logits of a launched step: [B, vocab]."""
        last = self.rt.node_of[t.route[-1].rank]
        with self.rt.lock:
            try:
                got = [self.rt._guard(last, lambda: recv_tensor_info(t.route[-1].rank)) for _ in range(t.parts)]
            finally:
                settle(t.pending)
        if self.on_step is not None:                  # telemetry: the stages' records came with the logits
            self.on_step(t.batch, t.route, [g for _, g in got], t.t0, time.perf_counter())
        return torch.cat([x for x, _ in got])         # [B, vocab]

    def abandon(self, t: "Ticket") -> None:
        """A launched step whose logits will never come (the pipeline broke): settle its sends."""
        failed = settle(t.pending)
        if failed is not None:
            raise failed

    def forward(self, batch: StepBatch, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(self.launch(batch))

    def free(self, req_ids: Sequence) -> None:
        if not req_ids:
            return
        # Every live worker hears it, not only the route: a node filling up for a reconfiguration
        # holds KV of these requests too.
        serving = {p.node for p in self.placement}
        # A replica's KV is on its own nodes only; the plan's may also be on nodes a reconfiguration
        # fills, so every node that no replica holds hears it.
        told = serving if self.own is not None else set(self.rt.ranks) - self.rt.replica_nodes
        with self.rt.lock:
            for node, r in self.rt.ranks.items():
                if node in self.rt.dead or node in self.rt.loading or node not in told:
                    continue
                works: list = []
                try:
                    if not self.rt.catch_up(node, block=node in serving):
                        continue             # an idle node not back yet: it drops that state anyway
                    works = self.rt._guard(node, lambda r=r: send_obj(Free(tuple(req_ids)), r))
                    self.rt._guard(node, lambda: wait_all(works))
                except WorkerDied:
                    if node in serving:      # an idle node's death does not stop the service
                        raise
