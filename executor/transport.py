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
    """Run one micro-batch through this worker's hops of `route` (activations from the previous hop)."""
    batch: Any             # executor.stage.StepBatch
    route: tuple[Hop, ...]


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

def send_obj(obj: Any, dst: int, group=None, tag: int = 0) -> list:
    """Non-blocking send of a picklable object; returns the pending works (keep them alive)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    return [dist.isend(size, dst, group=group, tag=tag), dist.isend(payload, dst, group=group, tag=tag)]


def recv_into(t: torch.Tensor, src: int, group=None, tag: int = 0, timeout: float | None = None) -> torch.Tensor:
    """Blocking receive; with a timeout (seconds) a peer that never sends raises instead of hanging."""
    if timeout is None:
        dist.recv(t, src, group=group, tag=tag)
    else:
        dist.irecv(t, src, group=group, tag=tag).wait(timedelta(seconds=timeout))
    return t


def recv_obj(src: int, group=None, tag: int = 0, timeout: float | None = None) -> Any:
    size = recv_into(torch.empty(1, dtype=torch.int64), src, group, tag, timeout)
    payload = recv_into(torch.empty(int(size.item()), dtype=torch.uint8), src, group, tag, timeout)
    return pickle.loads(payload.numpy().tobytes())


def send_tensor(t: torch.Tensor, dst: int, group=None, tag: int = 0) -> list:
    """Send shape + dtype header then the data, so the receiver need not know the shape."""
    t = t.contiguous()
    header = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape], dtype=torch.int64)
    size = torch.tensor([header.numel()], dtype=torch.int64)
    return [dist.isend(size, dst, group=group, tag=tag), dist.isend(header, dst, group=group, tag=tag), dist.isend(t, dst, group=group, tag=tag)]


def recv_tensor(src: int, group=None, tag: int = 0, timeout: float | None = None,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """The header always comes over gloo (CPU); the data lands on `device`: a CUDA device when the
    sender sent from one too, so that NCCL carries it."""
    size = recv_into(torch.empty(1, dtype=torch.int64), src, group, tag, timeout)
    header = recv_into(torch.empty(int(size.item()), dtype=torch.int64), src, group, tag, timeout)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    out = torch.empty(tuple(int(s) for s in header[2:2 + ndim]), dtype=dtype, device=device)
    return recv_into(out, src, group, tag, timeout)


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8]


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
