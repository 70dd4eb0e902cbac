"""Typed control messages and the torch.distributed plumbing between the driver and node workers.

Rank 0 is the driver (scheduler, sampler, HTTP server); every node of the cluster is one worker
rank. All control flows driver -> worker on one ordered channel per worker; activations flow
worker -> next worker, and the last stage's logits flow back to the driver. Workers join through
a TCPStore rendezvous (`join`), which is what lets the same worker start on another host.
"""
from __future__ import annotations

import hashlib
import hmac
import pickle
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DRIVER = 0


# --- messages (driver -> worker) -------------------------------------------------------------

@dataclass(frozen=True)
class Hop:
    """One stage of a route: the worker rank that runs layers [start, end); gpu: its stage is on a
    GPU (activations between two GPU hops travel over NCCL, device to device)."""
    rank: int
    start: int
    end: int
    gpu: bool = False


@dataclass(frozen=True)
class LoadStage:
    """Build the model of layers [start, end) from `source` and allocate its KV cache."""
    start: int
    end: int
    source: Any            # a GGUF path, a safetensors folder, None (embedded default) or a RandomSource
    dtype: str = "float32"
    num_kv_blocks: int = 512
    block_size: int = 16


@dataclass(frozen=True)
class Step:
    """Run one micro-batch through this worker's hops of `route` (activations from the previous hop).
    telemetry: each stage appends its step record (STEP_RECORD) to what it sends on, so the logits
    bring the driver every stage's figures for this micro-batch: no extra message, no round trip."""
    batch: Any             # executor.stage.StepBatch
    route: tuple[Hop, ...]
    telemetry: bool = False


# One stage's figures for one micro-batch, as ints after the tensor's shape in its header (times in
# microseconds): recv = waiting for the activations (the previous stage's work and the hop), send =
# staging the output for sending (device to host); the send itself does not block. in_* is the hop
# from the previous stage, ctl_* the Step message from the driver. kv_* are this node's KV blocks.
STEP_RECORD = ("rank", "start", "end", "recv_us", "compute_us", "send_us", "tokens", "rows", "kv_used",
               "kv_total", "in_bytes", "in_transfer_us", "ctl_bytes", "ctl_transfer_us")


@dataclass(frozen=True)
class EmulateLinks:
    """Shape what this worker sends over the emulated links (see LinkShaper); None: stop."""
    links: dict | None


@dataclass(frozen=True)
class Free:
    req_ids: tuple


@dataclass(frozen=True)
class Stats:
    """Ask for resident memory, owned layers and per-step compute times (a reply follows)."""


@dataclass(frozen=True)
class DropStage:
    """Forget the stage this node serves (the stop-the-world restart baseline)."""


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass
class Reply:
    ok: bool
    value: Any = None
    error: str | None = None


@dataclass
class WorkerInfo:
    node: str
    rank: int
    pid: int
    threads: int
    layers: list[tuple[int, int]] = field(default_factory=list)
    rss_bytes: int = 0
    weight_bytes: int = 0
    kv_bytes: int = 0
    step_ms_p50: float | None = None
    steps: int = 0
    device: str = "cpu"


# --- sending objects and tensors -------------------------------------------------------------
# Every message starts with a small int64 "size" tensor: [n, sent wall ns, sent monotonic ns, emulated
# arrival monotonic ns (0: none)]. The send stamps are what per-hop transfer times are measured from
# (telemetry); the arrival stamp is how an emulated link (LinkShaper, below) delays delivery.

_STAMP = 3          # sent_wall, sent_mono, arrive_mono


@dataclass(frozen=True)
class Received:
    """What a receive saw besides the data: its size, how long it was on its way, and any ints the
    sender put after a tensor's shape (send_tensor's meta: the step records of upstream stages)."""
    nbytes: int
    transfer_s: float
    meta: tuple[int, ...] = ()


def _stamp(dst: int, nbytes: int, group) -> list[int]:
    shaper = SHAPER
    arrive = shaper.arrival(dst, nbytes, group is not None and group is BULK) if shaper is not None else 0
    return [time.time_ns(), time.monotonic_ns(), arrive]


def _delivered(stamp, nbytes: int, posted_wall: int) -> Received:
    """Hold a received message until its emulated arrival, then say how long it was on its way:
    on an emulated link the link's own time (or the real one if longer); on a real one, from the send
    (or from when this side started to wait, if later: the data may have waited for the receiver)."""
    sent_wall, sent_mono, arrive = (int(v) for v in stamp)
    real = max(0, time.time_ns() - max(sent_wall, posted_wall))
    if arrive:
        delay = arrive - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        return Received(nbytes, max(arrive - sent_mono, real) / 1e9)
    return Received(nbytes, real / 1e9)


def send_obj(obj: Any, dst: int, group=None, tag: int = 0) -> list:
    """Non-blocking send of a picklable object; returns the pending works (keep them alive)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    size = torch.tensor([payload.numel(), *_stamp(dst, payload.numel(), group)], dtype=torch.int64)
    return [dist.isend(size, dst, group=group, tag=tag), dist.isend(payload, dst, group=group, tag=tag)]


def recv_into(t: torch.Tensor, src: int, group=None, tag: int = 0, timeout: float | None = None) -> torch.Tensor:
    """Blocking receive; with a timeout (seconds) a peer that never sends raises instead of hanging."""
    if timeout is None:
        dist.recv(t, src, group=group, tag=tag)
    else:
        dist.irecv(t, src, group=group, tag=tag).wait(timedelta(seconds=timeout))
    return t


def recv_obj(src: int, group=None, tag: int = 0, timeout: float | None = None) -> Any:
    return recv_obj_info(src, group, tag, timeout)[0]


def recv_obj_info(src: int, group=None, tag: int = 0, timeout: float | None = None) -> tuple[Any, Received]:
    posted = time.time_ns()
    size = recv_into(torch.empty(1 + _STAMP, dtype=torch.int64), src, group, tag, timeout)
    payload = recv_into(torch.empty(int(size[0]), dtype=torch.uint8), src, group, tag, timeout)
    info = _delivered(size[1:].tolist(), payload.numel(), posted)
    return pickle.loads(payload.numpy().tobytes()), info


def send_tensor(t: torch.Tensor, dst: int, group=None, tag: int = 0, meta: tuple[int, ...] = ()) -> list:
    """Send shape + dtype header (+ `meta` ints) then the data, so the receiver need not know the shape."""
    t = t.contiguous()
    header = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape, *meta], dtype=torch.int64)
    size = torch.tensor([header.numel(), *_stamp(dst, t.numel() * t.element_size(), group)], dtype=torch.int64)
    return [dist.isend(size, dst, group=group, tag=tag), dist.isend(header, dst, group=group, tag=tag), dist.isend(t, dst, group=group, tag=tag)]


def recv_tensor(src: int, group=None, tag: int = 0, timeout: float | None = None,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """The header always comes over gloo (CPU); the data lands on `device`: a CUDA device when the
    sender sent from one too, so that NCCL carries it."""
    return recv_tensor_info(src, group, tag, timeout, device)[0]


def recv_tensor_info(src: int, group=None, tag: int = 0, timeout: float | None = None,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, Received]:
    posted = time.time_ns()
    size = recv_into(torch.empty(1 + _STAMP, dtype=torch.int64), src, group, tag, timeout)
    header = recv_into(torch.empty(int(size[0]), dtype=torch.int64), src, group, tag, timeout).tolist()
    dtype, ndim = _DTYPES[header[0]], header[1]
    out = torch.empty(tuple(header[2:2 + ndim]), dtype=dtype, device=device)
    recv_into(out, src, group, tag, timeout)
    got = _delivered(size[1:].tolist(), out.numel() * out.element_size(), posted)
    return out, Received(got.nbytes, got.transfer_s, tuple(header[2 + ndim:]))


def send_raw(t: torch.Tensor, dst: int, group=None, tag: int = 0) -> list:
    """A tensor whose shape the receiver knows (weights into their modules, a benchmark's buffer). On
    emulated links a stamp goes first (recv_raw expects it when links are emulated, as they are on
    every process of a service or on none)."""
    works = []
    if SHAPER is not None:
        stamp = torch.tensor(_stamp(dst, t.numel() * t.element_size(), group), dtype=torch.int64)
        works.append(dist.isend(stamp, dst, group=group, tag=tag))
    return works + [dist.isend(t, dst, group=group, tag=tag)]


def recv_raw(t: torch.Tensor, src: int, group=None, tag: int = 0, timeout: float | None = None) -> torch.Tensor:
    if SHAPER is None:
        return recv_into(t, src, group, tag, timeout)
    posted = time.time_ns()
    stamp = recv_into(torch.empty(_STAMP, dtype=torch.int64), src, group, tag, timeout)
    recv_into(t, src, group, tag, timeout)
    _delivered(stamp.tolist(), t.numel() * t.element_size(), posted)
    return t


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8]


# --- emulated links ------------------------------------------------------------------------------
# `continuo serve --emulate-links`: local workers talk as if over the cluster file's links. Shaping
# lives here, in the transport, rather than in the kernel: this kernel has tbf/htb but no netem, so
# latency could not come from tc anyway, and network namespaces, veth pairs and qdiscs need root,
# which a developer's machine or a CI runner rarely grants. Every byte between ranks goes through
# send_obj / send_tensor / send_raw (control messages, activations, logits, weights, KV), so one
# place shapes all of it, with no privileges, on any OS.
#
# The model of a link, per direction (src -> dst): a pipe that serialises bytes at its bandwidth
# and delivers them `latency` after they are through, i.e. a token bucket with no burst allowance
# plus a fixed delay. The sender works out each message's arrival time (it alone knows the order
# of what it sends, from all its threads) and stamps it on the message; the receiver holds the
# message until then. The sender never blocks on the emulated link (an isend returns at once, as
# over a real one), and a receiver that posts its receive late sees no extra delay (the message
# has already "arrived"), which is what a real link does. The emulated time is added to the real
# loopback transfer only where that is slower (a link faster than loopback cannot be emulated).
#
# Serving traffic (default group: steps, activations, logits, control) goes ahead of bulk traffic
# (the BULK group: weights and KV of a reconfiguration) on a link: it is small, and on a real link
# its queueing delay behind a bulk flow is bounded by that flow's window, not by the whole transfer;
# a strict FIFO would hold one activation behind hundreds of MB of pre-copy. Its bytes still use the
# link, so they push bulk traffic back.


@dataclass(frozen=True)
class LinkSpec:
    """One emulated direction: bytes per second and one-way latency in seconds."""
    bytes_per_s: float
    latency_s: float

    def __post_init__(self):
        if not self.bytes_per_s > 0 or self.latency_s < 0:
            raise ValueError(f"a link needs bandwidth > 0 and latency >= 0, not {self}")


class LinkShaper:
    """This process's outgoing emulated links, by destination rank (absent: loopback, unshaped)."""

    def __init__(self, links: dict[int, LinkSpec]):
        self.links = dict(links)
        self.lock = threading.Lock()
        self.free_at: dict[tuple[int, bool], float] = {}     # (dst, bulk) -> when the pipe is free (monotonic s)

    def arrival(self, dst: int, nbytes: int, bulk: bool) -> int:
        """Monotonic ns at which a message of nbytes sent now reaches dst (0: not shaped)."""
        link = self.links.get(dst)
        if link is None:
            return 0
        with self.lock:
            now, ser = time.monotonic(), nbytes / link.bytes_per_s
            done = max(now, self.free_at.get((dst, bulk), 0.0)) + ser
            self.free_at[(dst, bulk)] = done
            if not bulk:        # serving bytes take the link from bulk traffic too
                self.free_at[(dst, True)] = max(now, self.free_at.get((dst, True), 0.0)) + ser
        return int((done + link.latency_s) * 1e9)


SHAPER: LinkShaper | None = None


def emulate_links(links: dict[int, LinkSpec] | None) -> None:
    """Shape what this process sends from now on (None: stop)."""
    global SHAPER
    SHAPER = LinkShaper(links) if links is not None else None


def link_table(ranks: dict[str, int], driver_node: str, cluster) -> dict[int, dict[int, LinkSpec]]:
    """Per sending rank, its emulated links to every other rank, from the cluster's links. The driver
    (rank 0) runs beside `driver_node`; two ranks on the same node (the driver and its node) talk over
    loopback. A pair with no link in the cluster file is left unshaped (no plan routes over it)."""
    where = {DRIVER: driver_node, **{r: n for n, r in ranks.items()}}
    table: dict[int, dict[int, LinkSpec]] = {r: {} for r in where}
    for a, na in where.items():
        for b, nb in where.items():
            if a == b or na == nb:
                continue
            link = cluster.link(na, nb)
            if link is not None:
                table[a][b] = LinkSpec(link.bandwidth_gbps * 1e9 / 8, link.latency_ms / 1e3)
    return table


def wait_all(works: list) -> None:
    for w in works:
        w.wait()


def settle(works: list) -> RuntimeError | None:
    """Wait for every send once (a gloo work must not be waited twice: the second wait blocks),
    even past a failure, so none is dropped half-way; returns the first failure."""
    first = None
    for w in works:
        try:
            w.wait()
        except RuntimeError as e:
            first = first or e
    return first


# --- rendezvous --------------------------------------------------------------------------------
# Node join is authenticated with a join token that the driver and every worker hold (never sent):
#   driver: publishes a random session id
#   worker: picks a nonce, posts proof = HMAC(token, session|node|nonce), then hello = nonce
#   driver: checks the proof (constant time); on a match admits the node under a key whose name is
#           itself an HMAC (only a token holder can find it), else posts a refusal the worker reads
# Everything after admission (rank, device, migration results, the process groups' own rendezvous)
# lives under a key prefix derived from the token and the session, so a process that reaches the
# store port without the token can neither read nor forge it. The store itself is plain TCP and the
# gloo/NCCL traffic is not encrypted (see the README's security section).

JOIN_TOKEN_ENV = "CONTINUO_JOIN_TOKEN"


class JoinRefused(RuntimeError):
    """A worker's proof of the join token did not match the driver's."""


def _mac(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _store(host: str, port: int, master: bool, timeout: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=master, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False)


def _private(store, token: str, session: str) -> dist.PrefixStore:
    return dist.PrefixStore("continuo/" + _mac(token, "private", session)[:32], store)


def serve_rendezvous(host: str, port: int, nodes: list[str], token: str, timeout: float = 120.0,
                     ) -> tuple[dist.Store, dict[str, int]]:
    """Driver side: open the store, admit every node that proves the join token, hand out ranks,
    init the group. Returns the private store (see above) and the ranks."""
    if not token:
        raise ValueError(f"no join token: set ${JOIN_TOKEN_ENV} (the same on the driver and every worker)")
    store = _store(host, port, True, timeout)
    session = secrets.token_hex(16)
    store.set("session", session)
    deadline = time.monotonic() + timeout
    admitted: dict[str, str] = {}
    refused: list[str] = []
    while len(admitted) < len(nodes):
        for n in nodes:
            if n in admitted or not store.check([f"hello/{n}"]):
                continue
            nonce = store.get(f"hello/{n}").decode()
            proof = store.get(f"proof/{n}").decode() if store.check([f"proof/{n}"]) else ""
            store.delete_key(f"hello/{n}")          # consumed: a retry posts a new one
            if hmac.compare_digest(proof, _mac(token, "join", session, n, nonce)):
                admitted[n] = nonce
            else:
                store.set(f"refused/{n}/{nonce}", "the join token does not match the driver's")
                refused.append(n)
                print(f"continuo: refused a worker joining as node {n}: wrong join token", file=sys.stderr, flush=True)
        if len(admitted) < len(nodes) and time.monotonic() > deadline:
            missing = [n for n in nodes if n not in admitted]
            why = f"; refused (wrong join token): {', '.join(sorted(set(refused)))}" if refused else ""
            raise TimeoutError(f"nodes never joined {host}:{port}: {', '.join(missing)}{why}")
        time.sleep(0.05)
    ranks = {n: i + 1 for i, n in enumerate(nodes)}
    world = len(nodes) + 1
    for n, r in ranks.items():
        store.set(f"admit/{_mac(token, 'admit', session, n, admitted[n])}", f"{r} {world}")
    private = _private(store, token, session)
    _init_group(private, 0, world, timeout)
    return private, ranks


def join(host: str, port: int, node: str, token: str, timeout: float = 120.0) -> tuple[int, int, dist.Store]:
    """Worker side: prove the join token at the driver's store, learn the rank, init the group.
    Raises JoinRefused when the driver refuses the proof, TimeoutError when nobody admits it."""
    if not token:
        raise JoinRefused(f"no join token: set ${JOIN_TOKEN_ENV} (the driver's) before starting the worker")
    deadline = time.monotonic() + timeout
    while True:
        try:
            store = _store(host, port, False, timeout)
            break
        except (RuntimeError, OSError):   # the driver is not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    session = store.get("session").decode()
    nonce = secrets.token_hex(16)
    store.set(f"proof/{node}", _mac(token, "join", session, node, nonce))
    store.set(f"hello/{node}", nonce)
    admit, refusal = f"admit/{_mac(token, 'admit', session, node, nonce)}", f"refused/{node}/{nonce}"
    while not store.check([admit]):
        if store.check([refusal]):
            raise JoinRefused(f"the driver at {host}:{port} refused node {node}: {store.get(refusal).decode()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node} was not admitted by {host}:{port} within {timeout:g} s (is the node "
                               "already served, or not in the driver's cluster file?)")
        time.sleep(0.05)
    rank, world = map(int, store.get(admit).decode().split())
    private = _private(store, token, session)
    _init_group(private, rank, world, timeout)
    return rank, world, private


def backend() -> str:
    """gloo for CPU tensors (control messages, CPU activations); where CUDA is present, NCCL for CUDA
    tensors on the same group, so GPU-to-GPU activations never stage through host memory."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _init_group(store, rank: int, world: int, timeout: float) -> None:
    global BULK
    dist.init_process_group(backend(), store=dist.PrefixStore("group", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    # A second group for bulk transfers (weights, KV) that run in a background thread while the
    # default group carries steps: separate gloo pairs, so neither waits behind the other. Bulk
    # data is staged through host memory (gloo), also between GPU nodes.
    BULK = dist.new_group(backend="gloo")


BULK = None
