"""A node worker: one process per node, holding its stages' weights and KV cache.

    continuo worker --join HOST:PORT --node NAME [--threads N]

The loop reads driver messages in order: LoadStage builds a stage, Step runs a micro-batch
through this worker's hops (activations in from the previous hop, out to the next hop or,
from the last stage, logits back to the driver), Free forgets requests, Stats reports.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

from .transport import (DRIVER, Free, LoadStage, Reply, Shutdown, Stats, Step, WorkerInfo, join, recv_obj,
                        recv_tensor, send_obj, send_tensor, wait_all)


class Worker:
    def __init__(self, node: str, rank: int, threads: int):
        self.node, self.rank, self.threads = node, rank, threads
        self.stages: dict[tuple[int, int], object] = {}     # (start, end) -> LocalStage
        self.step_ms: list[float] = []
        self.pending: list = []                              # sends in flight (kept alive until done)

    def load(self, msg: LoadStage) -> Reply:
        from .stage import build_stage
        from .weights import open_source
        src = msg.source if hasattr(msg.source, "load") else open_source(msg.source)
        stage = build_stage(src, msg.start, msg.end, msg.num_kv_blocks, msg.block_size, getattr(torch, msg.dtype))
        self.stages[(msg.start, msg.end)] = stage
        return Reply(True, self.info())

    def step(self, msg: Step) -> None:
        t0 = time.perf_counter()
        x = None
        route = msg.route
        for i, hop in enumerate(route):
            if hop.rank != self.rank:
                continue
            stage = self.stages[(hop.start, hop.end)]
            if i > 0 and route[i - 1].rank != self.rank:
                x = recv_tensor(route[i - 1].rank)
            x = stage.forward(msg.batch, x)
            if i + 1 == len(route):
                self.pending += send_tensor(x, DRIVER)       # logits [B, vocab]
            elif route[i + 1].rank != self.rank:
                self.pending += send_tensor(x, route[i + 1].rank)   # hidden [B, width, hidden]
        self.step_ms.append(1e3 * (time.perf_counter() - t0))
        del self.step_ms[:-1000]
        self._reap()

    def _reap(self) -> None:
        self.pending = [w for w in self.pending if not w.is_completed()]

    def info(self) -> WorkerInfo:
        wb = sum(p.numel() * p.element_size() for s in self.stages.values() for p in s.model.parameters())
        kvb = sum(s.cache.k.numel() * s.cache.k.element_size() * 2 for s in self.stages.values())
        rss = _rss_bytes()
        return WorkerInfo(self.node, self.rank, os.getpid(), self.threads, sorted(self.stages), rss, wb, kvb,
                          statistics.median(self.step_ms) if self.step_ms else None, len(self.step_ms))

    def serve(self) -> None:
        while True:
            msg = recv_obj(DRIVER)
            if isinstance(msg, Step):
                self.step(msg)
                continue
            if isinstance(msg, Free):
                for s in self.stages.values():
                    s.free(msg.req_ids)
                continue
            if isinstance(msg, Shutdown):
                wait_all(self.pending)
                return
            try:
                if isinstance(msg, LoadStage):
                    reply = self.load(msg)
                elif isinstance(msg, Stats):
                    reply = Reply(True, self.info())
                else:
                    reply = Reply(False, error=f"unknown message {type(msg).__name__}")
            except Exception as e:  # our bug or bad input: report it, keep serving
                reply = Reply(False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
            wait_all(send_obj(reply, DRIVER))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="continuo worker", description=__doc__.splitlines()[0])
    ap.add_argument("--join", required=True, metavar="HOST:PORT", help="the driver's rendezvous address")
    ap.add_argument("--node", required=True, help="this node's name in the cluster file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    host, _, port = a.join.rpartition(":")
    if not host or not port.isdigit():
        ap.error(f"--join wants HOST:PORT, got {a.join!r}")
    if a.threads > 0:
        torch.set_num_threads(a.threads)   # workers on one machine must not fight over cores
    rank, _ = join(host, int(port), a.node, a.timeout)
    try:
        Worker(a.node, rank, torch.get_num_threads()).serve()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
