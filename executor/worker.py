"""A node worker: one process per node, holding its stages' weights and KV cache.

    continuo worker --join HOST:PORT --node NAME [--threads N]

The loop reads driver messages in order: LoadStage builds a stage, Step runs a micro-batch
through this worker's hops (activations in from the previous hop, out to the next hop or,
from the last stage, logits back to the driver), Free forgets requests, Stats reports.
"""
from __future__ import annotations

import argparse
import faulthandler
import signal
import os
import resource
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

from . import transport
from .migration import Abort, BenchCopy, Cleanup, Commit, CopyKV, Migrator, Prepare, RecvKV, RoundEnd, SendKV, SendWeights
from .transport import (DRIVER, DropStage, Free, LoadStage, Reply, Shutdown, Stats, Step, WorkerInfo, join, recv_obj,
                        recv_tensor, send_obj, send_tensor, wait_all)

MIGRATION_MESSAGES = (BenchCopy, Prepare, SendWeights, SendKV, RecvKV, CopyKV, RoundEnd, Commit, Cleanup, Abort)
REPLIED = (Commit, Cleanup, Abort)     # the driver waits for a reply to these; the rest run in the background


class Worker:
    def __init__(self, node: str, rank: int, threads: int, store=None, device: str = "cpu"):
        self.node, self.rank, self.threads = node, rank, threads
        self.device = torch.device(device)
        if store is not None:
            store.set(f"device/{node}", str(self.device))     # the driver routes by it (Hop.gpu)
        self.stage = None                                    # LocalStage of the layers this node serves
        self.cfg = None
        self.step_ms: list[float] = []
        self.pending: list = []                              # sends in flight (kept alive until done)
        self.migrator = Migrator(self, transport.BULK, store, node)

    def load(self, msg: LoadStage) -> Reply:
        from .stage import build_stage
        from .weights import open_source
        if self.stage is not None:
            raise RuntimeError(f"{self.node} already serves layers [{self.stage.start}, {self.stage.end}); "
                               "a node serves one contiguous range (reconfigure to change it)")
        src = msg.source if hasattr(msg.source, "load") else open_source(msg.source)
        self.cfg = src.config
        self.stage = build_stage(src, msg.start, msg.end, msg.num_kv_blocks, msg.block_size, getattr(torch, msg.dtype),
                                 self.device)
        return Reply(True, self.info())

    def step(self, msg: Step) -> None:
        t0 = time.perf_counter()
        x = None
        route = msg.route
        for i, hop in enumerate(route):
            if hop.rank != self.rank:
                continue
            stage = self.stage
            if stage is None or (stage.start, stage.end) != (hop.start, hop.end):
                raise RuntimeError(f"{self.node} asked for layers [{hop.start}, {hop.end}) but serves "
                                   f"{None if stage is None else (stage.start, stage.end)}")
            if i > 0 and route[i - 1].rank != self.rank:
                # GPU to GPU: NCCL straight into device memory; otherwise over gloo through the host
                x = recv_tensor(route[i - 1].rank, device=self.device if route[i - 1].gpu and self.gpu else "cpu")
                x = x.to(self.device)
            x = stage.forward(msg.batch, x)
            if i + 1 == len(route):
                self.pending += send_tensor(x.cpu(), DRIVER)       # logits [B, vocab]; the driver samples on CPU
            elif route[i + 1].rank != self.rank:
                nxt = route[i + 1]                                 # hidden [B, width, hidden]
                self.pending += send_tensor(x if nxt.gpu and self.gpu else x.cpu(), nxt.rank)
        self.step_ms.append(1e3 * (time.perf_counter() - t0))
        del self.step_ms[:-1000]
        self._reap()

    def migration(self, m):
        if isinstance(m, Prepare) and self.cfg is None:
            if m.cfg is not None:
                self.cfg = m.cfg
            else:
                from .weights import open_source
                self.cfg = (m.source if hasattr(m.source, "load") else open_source(m.source)).config
        return self.migrator.handle(m)

    def queue_migration(self, batch: tuple) -> None:
        """Hand a round to the background thread; a failure here is posted where the driver looks."""
        try:
            for m in batch:
                self.migration(m)
        except Exception as e:
            end = batch[-1]
            if isinstance(end, RoundEnd):
                self.migrator.store.set(f"mig/{end.rid}/{end.round}/{self.node}", f"{type(e).__name__}: {e}")

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def _reap(self) -> None:
        self.pending = [w for w in self.pending if not w.is_completed()]

    def info(self) -> WorkerInfo:
        stages = [s for s in (self.stage,) if s is not None]
        wb = sum(p.numel() * p.element_size() for s in stages for p in s.model.parameters())
        kvb = sum(s.cache.k.numel() * s.cache.k.element_size() * 2 for s in stages)
        return WorkerInfo(self.node, self.rank, os.getpid(), self.threads, [(s.start, s.end) for s in stages],
                          _rss_bytes(), wb, kvb, statistics.median(self.step_ms) if self.step_ms else None,
                          len(self.step_ms), str(self.device))

    def serve(self) -> None:
        while True:
            msg = recv_obj(DRIVER)
            if isinstance(msg, Step):
                self.step(msg)
                continue
            if isinstance(msg, Free):
                if self.stage is not None:
                    self.stage.free(msg.req_ids)
                self.migrator.free(msg.req_ids)
                continue
            if isinstance(msg, Shutdown):
                wait_all(self.pending)
                return
            try:
                if isinstance(msg, LoadStage):
                    reply = self.load(msg)
                elif isinstance(msg, Stats):
                    reply = Reply(True, self.info())
                elif isinstance(msg, DropStage):
                    self.stage = None
                    reply = Reply(True, self.info())
                elif isinstance(msg, (tuple, *MIGRATION_MESSAGES)):
                    # A reconfiguration's messages, alone or batched (a node's whole round in one send).
                    batch = msg if isinstance(msg, tuple) else (msg,)
                    if not isinstance(batch[-1], REPLIED):
                        self.queue_migration(batch)           # background work: completion goes to the store
                        continue
                    value = None
                    for m in batch:
                        value = self.migration(m)
                    reply = Reply(True, value)
                else:
                    reply = Reply(False, error=f"unknown message {type(msg).__name__}")
            except Exception as e:  # our bug or bad input: report it, keep serving
                reply = Reply(False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
            wait_all(send_obj(reply, DRIVER))


def pick_device(want: str, rank: int) -> str:
    """auto: the (rank-1)-th visible GPU, round robin (several workers on one GPU host), else the CPU."""
    if want == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f"cuda:{(rank - 1) % n}" if n else "cpu"
    dev = torch.device(want)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {want}: torch sees no CUDA device here (a CPU build of torch?)")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {want}: use cpu, cuda, cuda:N or auto")
    return str(dev)


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
    ap.add_argument("--device", default=os.environ.get("CONTINUO_DEVICE", "auto"),
                    help="cpu, cuda, cuda:N, or auto (default; $CONTINUO_DEVICE): a GPU when torch sees one")
    a = ap.parse_args(argv)
    host, _, port = a.join.rpartition(":")
    if not host or not port.isdigit():
        ap.error(f"--join wants HOST:PORT, got {a.join!r}")
    faulthandler.register(signal.SIGUSR1)      # `kill -USR1 PID` prints every thread's stack
    # A step is hundreds of short torch calls, each taking the GIL back; when the migration thread
    # runs Python meanwhile, every handover can wait out the switch interval (5 ms by default).
    sys.setswitchinterval(0.0005)
    if a.threads > 0:
        torch.set_num_threads(a.threads)   # workers on one machine must not fight over cores
    rank, _, store = join(host, int(port), a.node, a.timeout)
    try:
        Worker(a.node, rank, torch.get_num_threads(), store, pick_device(a.device, rank)).serve()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
