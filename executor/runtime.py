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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .stage import StepBatch
from .transport import (JOIN_TOKEN_ENV, Free, Hop, LoadStage, Reply, Shutdown, Stats, Step, WorkerInfo, recv_obj,
                        recv_tensor, send_obj, serve_rendezvous, settle, wait_all)


class WorkerDied(RuntimeError):
    """A node worker stopped answering; its requests fail and /health reports it."""

    def __init__(self, node: str, detail: str):
        self.node = node
        super().__init__(f"worker for node {node} died: {detail}")


class WorkerError(RuntimeError):
    """A worker refused a command (bad input or its bug); the message carries its words."""


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
        token = join_token or os.environ.get(JOIN_TOKEN_ENV)
        if not token:
            raise ValueError(f"workers on other hosts join with a token: set ${JOIN_TOKEN_ENV} to the same secret "
                             "on the driver and every worker (e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))')")
        self.store, self.ranks = serve_rendezvous(host, port, self.nodes, token, timeout)
        self.node_of = {r: n for n, r in self.ranks.items()}
        self.dead: dict[str, str] = {}
        self.devices: dict[str, str] = {}
        self.placement: list[StagePlacement] = []
        self.lock = threading.RLock()      # one conversation with the workers at a time

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
            reply: Reply = self._guard(node, lambda: (wait_all(send_obj(msg, rank)), recv_obj(rank))[1])
        if not reply.ok:
            raise WorkerError(f"{node}: {reply.error}")
        return reply.value

    def collect(self, nodes: Sequence[str]) -> list:
        """The replies of several workers to commands already sent to all of them."""
        # Every reply is read even when one fails (a dead worker): an unread reply would be taken
        # for the answer to that node's next command, and its channel would stay out of step.
        replies, died = [], None
        for n in nodes:
            try:
                replies.append((n, self._guard(n, lambda n=n: recv_obj(self.ranks[n]))))
            except WorkerDied as e:
                died = died or e
        if died is not None:
            raise died
        bad = [f"{n}: {r.error}" for n, r in replies if not r.ok]
        if bad:
            raise WorkerError("; ".join(bad))
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

    def route(self) -> tuple[Hop, ...]:
        return tuple(Hop(self.ranks[p.node], p.start, p.end, self.device(p.node).startswith("cuda"))
                     for p in self.placement)

    def stats(self) -> list[WorkerInfo]:
        out = []
        for n in self.nodes:
            if n in self.dead:
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

    def pipeline(self, num_layers: int) -> "DistributedPipeline":
        return DistributedPipeline(self, num_layers)

    def shutdown(self) -> None:
        with self.lock:
            for n, r in self.ranks.items():
                if n not in self.dead:
                    try:
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
                 min_tokens_per_micro_batch: int = 16):
        self.rt, self.start, self.end = runtime, 0, num_layers
        self.micro_batches = micro_batches
        # A micro-batch re-reads every weight of a stage. Below a few tokens per micro-batch a step is
        # bound by those reads (decode on CPU), and cutting it only multiplies them: measured 0.61x vs
        # 0.88x of one process for 8 decode rows in 2 micro-batches. Prefill chunks are cut.
        self.min_tokens = min_tokens_per_micro_batch

    def parts(self, batch: StepBatch, stages: int) -> int:
        if self.micro_batches:
            return self.micro_batches
        return stages if sum(batch.num_new) >= stages * self.min_tokens else 1

    def forward(self, batch: StepBatch, x: torch.Tensor | None = None) -> torch.Tensor:
        route = self.rt.route()
        ranks = list(dict.fromkeys(h.rank for h in route))
        mbs = split_rows(batch, self.parts(batch, len(route)))
        last = self.rt.node_of[route[-1].rank]
        with self.rt.lock:
            pending: list = []
            try:
                for mb in mbs:                        # all micro-batches go out at once: stages overlap
                    msg = Step(mb, route)
                    for r in ranks:
                        pending += self.rt._guard(self.rt.node_of[r], lambda r=r: send_obj(msg, r))
                outs = [self.rt._guard(last, lambda: recv_tensor(route[-1].rank)) for _ in mbs]
            finally:
                settle(pending)                       # never drop a send half-way (see settle)
        return torch.cat(outs)                        # [B, vocab]

    def free(self, req_ids: Sequence) -> None:
        if not req_ids:
            return
        # Every live worker hears it, not only the route: a node filling up for a reconfiguration
        # holds KV of these requests too.
        serving = {p.node for p in self.rt.placement}
        with self.rt.lock:
            for node, r in self.rt.ranks.items():
                if node in self.rt.dead:
                    continue
                works: list = []
                try:
                    works = self.rt._guard(node, lambda r=r: send_obj(Free(tuple(req_ids)), r))
                    self.rt._guard(node, lambda: wait_all(works))
                except WorkerDied:
                    if node in serving:      # an idle node's death does not stop the service
                        raise
