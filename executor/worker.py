"""A node worker: one process per node, holding its stages' weights and KV cache.

    CONTINUO_JOIN_TOKEN=... continuo worker --join HOST:PORT --node NAME [--threads N]

The loop reads driver messages in order: LoadStage builds a stage, Step runs a micro-batch
through this worker's hops (activations in from the previous hop, out to the next hop or,
from the last stage, logits back to the driver), Free forgets requests, Stats reports.
"""
from __future__ import annotations

import argparse
import faulthandler
import signal
import os
import socket
import resource
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from . import transport
from .migration import Abort, BenchCopy, Cleanup, Commit, CopyKV, InjectFault, Migrator, Prepare, RecvKV, RoundEnd, SendKV, SendWeights
from .transport import (DRIVER, JOIN_TOKEN_ENV, DropStage, EmulateLinks, JoinRefused, Free, LoadStage, Reply, Shutdown, Stats, Step,
                        WorkerInfo, join, recv_obj_info, recv_tensor_info, send_obj, send_tensor, wait_all)

MIGRATION_MESSAGES = (BenchCopy, Prepare, SendWeights, SendKV, RecvKV, CopyKV, RoundEnd, Commit, Cleanup, Abort)
REPLIED = (Commit, Cleanup, Abort)     # the driver waits for a reply to these; the rest run in the background


class Worker:
    def __init__(self, node: str, rank: int, threads: int, store=None, device: str = "cpu"):
        self.node, self.rank, self.threads = node, rank, threads
        self.device = torch.device(device)
        if store is not None:
            store.set(f"device/{node}", str(self.device))     # the driver routes by it (Hop.gpu)
            if self.device.type == "cuda":
                # which physical GPU: NCCL refuses two ranks on one device, so the driver sends
                # activations between workers that share a GPU through the host instead
                store.set(f"gpu/{node}", gpu_identity(self.device))
        self.stage = None                                    # LocalStage of the layers this node serves
        self.cfg = None
        self.step_ms: list[float] = []
        self.pending: list = []                              # sends in flight (kept alive until done)
        # a request's KV is freed here (Free) while the migrator's thread may be reading it to send
        self.kv_lock = threading.Lock()
        self.migrator = Migrator(self, transport.BULK, store, node)
        self.last_msg = None                                 # how the driver's last message came (Received)

    def load(self, msg: LoadStage) -> Reply:
        from .stage import build_stage
        from .weights import open_source
        if self.stage is not None:
            raise RuntimeError(f"{self.node} already serves layers [{self.stage.start}, {self.stage.end}); "
                               "a node serves one contiguous range (reconfigure to change it)")
        src = open_source(msg.source)
        self.cfg = src.config
        self.stage = build_stage(src, msg.start, msg.end, msg.num_kv_blocks, msg.block_size, getattr(torch, msg.dtype),
                                 self.device)
        # --- calibration at start: a profile of this model on this node's kind, measured here once
        # (seconds) if none exists yet; $CONTINUO_CALIBRATE_AT_START=0 turns it off (executor/calibrate.py)
        from .calibrate import at_worker_start
        at_worker_start(self.cfg, str(self.device), self.threads, self.node, msg.dtype,
                        log=lambda m: print(f"continuo worker {m}", file=sys.stderr, flush=True))
        # --- end of calibration at start
        return Reply(True, self.info())

    def step(self, msg: Step) -> None:
        t0 = time.perf_counter()
        x = None
        route = msg.route
        meta: tuple[int, ...] = ()                 # step records of the stages before this one
        for i, hop in enumerate(route):
            if hop.rank != self.rank:
                continue
            stage = self.stage
            if stage is None or (stage.start, stage.end) != (hop.start, hop.end):
                raise RuntimeError(f"{self.node} asked for layers [{hop.start}, {hop.end}) but serves "
                                   f"{None if stage is None else (stage.start, stage.end)}")
            t_in, got = time.perf_counter(), None
            if i > 0 and route[i - 1].rank != self.rank:
                # GPU to GPU: NCCL straight into device memory; otherwise over gloo through the host
                x, got = recv_tensor_info(route[i - 1].rank, device=self.device if route[i - 1].gpu and self.gpu else "cpu")
                x = x.to(self.device)
                meta = got.meta
            t_fwd = time.perf_counter()
            x = stage.forward(msg.batch, x)
            last = i + 1 == len(route)
            nxt = None if last else route[i + 1]
            if last or nxt.rank != self.rank:
                if msg.telemetry and self.gpu:
                    torch.cuda.synchronize(self.device)    # compute ends when its kernels do, not when queued
                t_out = time.perf_counter()
                # logits [B, vocab] (the driver samples on CPU) or hidden [B, width, hidden]
                out = x.cpu() if last or not (nxt.gpu and self.gpu) else x
                if msg.telemetry:
                    meta += self.record(msg, stage, got, t_in, t_fwd, t_out, time.perf_counter())
                self.pending += send_tensor(out, DRIVER if last else nxt.rank, meta=meta)
        self.step_ms.append(1e3 * (time.perf_counter() - t0))
        del self.step_ms[:-1000]
        self._reap()

    def record(self, msg: Step, stage, got, t_in, t_fwd, t_out, t_sent) -> tuple[int, ...]:
        """This stage's STEP_RECORD for the micro-batch (see transport.STEP_RECORD)."""
        us = lambda s: int(1e6 * s)  # noqa: E731
        cache, ctl = stage.cache, self.last_msg
        return (self.rank, stage.start, stage.end, us(t_fwd - t_in), us(t_out - t_fwd), us(t_sent - t_out),
                sum(msg.batch.num_new), len(msg.batch.req_ids), cache.num_blocks - cache.num_free_blocks,
                cache.num_blocks, got.nbytes if got else 0, us(got.transfer_s) if got else 0,
                ctl.nbytes if ctl else 0, us(ctl.transfer_s) if ctl else 0)

    def emulate_links(self, msg: EmulateLinks) -> Reply:
        transport.emulate_links(msg.links)
        return Reply(True, None)

    def migration(self, m):
        if isinstance(m, Prepare) and self.cfg is None:
            if m.cfg is not None:
                self.cfg = m.cfg
            else:
                from .weights import open_source
                self.cfg = open_source(m.source).config
        return self.migrator.handle(m)

    def queue_migration(self, batch: tuple) -> None:
        """Hand a round to the background thread. A message that fails here (before the thread sees it)
        marks its reconfiguration failed, and the round's RoundEnd still goes through, so the driver
        reads the error where it waits for the round."""
        for i, m in enumerate(batch):
            try:
                self.migration(m)
            except Exception as e:
                self.migrator.fail(m.rid, f"{self.node}: {type(e).__name__}: {e}")
                traceback.print_exc()
                for end in batch[i + 1:]:
                    if isinstance(end, RoundEnd):
                        self.migrator.handle(end)
                return

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

    # --- one dispatch, one error path ---------------------------------------------------------------
    # Each message type names the method that handles it (METHODS); every message, alone or in a
    # batch, goes through serve() -> that method, and every failure takes the one path its kind
    # allows: a command the driver waits for gets a failed Reply carrying this node's name and the
    # error; a background migration round records it on the migration, which reports it at its
    # RoundEnd / Commit; a failed Step or Free leaves this worker's state unknown, so it posts the
    # error to the store (the driver reads it when the connection drops) and exits.

    def stats(self, msg: Stats) -> Reply:
        return Reply(True, self.info())

    def drop_stage(self, msg: DropStage) -> Reply:
        self.stage = None
        return Reply(True, self.info())

    def free(self, msg: Free) -> None:
        if self.stage is not None:
            with self.kv_lock:
                self.stage.free(msg.req_ids)
        self.migrator.free(msg.req_ids)

    def inject_fault(self, msg: InjectFault) -> Reply:
        self.migrator.inject(msg.what)
        return Reply(True, None)

    def migrate(self, msg) -> Reply:
        return Reply(True, self.migration(msg))

    def serve(self) -> None:
        while True:
            msg, self.last_msg = recv_obj_info(DRIVER)
            batch = msg if isinstance(msg, tuple) else (msg,)   # a node's whole migration round in one send
            if isinstance(batch[0], Shutdown):
                wait_all(self.pending)
                return
            if isinstance(batch[0], MIGRATION_MESSAGES) and not isinstance(batch[-1], REPLIED):
                self.queue_migration(batch)       # background work: its outcome is posted to the store
                continue
            try:
                reply = None
                for m in batch:
                    method = METHODS.get(type(m))
                    if method is None:
                        raise TypeError(f"unknown message {type(m).__name__}")
                    reply = getattr(self, method)(m)
            except Exception as e:  # our bug or bad input
                err = f"{self.node}: {type(e).__name__}: {e}"
                if not isinstance(batch[-1], REPLIED_TYPES):
                    self.die(err)
                reply = Reply(False, error=f"{err}\n{traceback.format_exc(limit=3)}")
            if reply is not None:
                if isinstance(batch[-1], Commit):
                    # the driver waits for commits with a deadline, polling this key (see
                    # NodeRuntime.collect): once it is set, the reply is on its way
                    self.migrator.store.set(f"mig/{batch[-1].rid}/commit/{self.node}", "replied")
                wait_all(send_obj(reply, DRIVER))

    def die(self, err: str) -> None:
        """A step or free failed: say why where the driver will look, then stop."""
        traceback.print_exc()
        try:
            self.migrator.store.set(f"error/{self.node}", err)
        finally:
            os._exit(4)


METHODS = {LoadStage: "load", Stats: "stats", DropStage: "drop_stage", Step: "step", Free: "free",
           InjectFault: "inject_fault", EmulateLinks: "emulate_links",
           **{m: "migrate" for m in MIGRATION_MESSAGES}}
REPLIED_TYPES = (LoadStage, Stats, DropStage, InjectFault, EmulateLinks, *REPLIED)   # the driver waits for a Reply to these


def gpu_identity(device: torch.device) -> str:
    """A name for the physical GPU behind `device`, the same in every process that uses it."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return str(uuid) if uuid else f"{socket.gethostname()}/cuda:{device.index or 0}"


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
    ap.add_argument("--join-token-file", metavar="PATH",
                    help=f"file holding the join token (default: ${JOIN_TOKEN_ENV}; never on the command line)")
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
    token = os.environ.get(JOIN_TOKEN_ENV)
    if a.join_token_file:
        try:
            token = Path(a.join_token_file).read_text().strip()
        except OSError as e:
            ap.error(f"--join-token-file {a.join_token_file}: {e.strerror}")
    try:
        rank, _, store = join(host, int(port), a.node, token, a.timeout)
    except (JoinRefused, TimeoutError) as e:
        print(f"continuo worker {a.node}: {e}", file=sys.stderr, flush=True)
        return 3
    try:
        Worker(a.node, rank, torch.get_num_threads(), store, pick_device(a.device, rank)).serve()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
