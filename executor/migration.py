"""Worker side of a live reconfiguration: build the next stage beside the serving one, fill it
with weights and KV in the background, then swap it in at an iteration boundary.

    Prepare  -> a background thread builds the new stage: kept layers are shared (no copy), gained
                layers are loaded from this node's own checkpoint or pulled from their owner;
                a fresh KV cache is allocated for the new layer range.
    SendKV / RecvKV / CopyKV (a round) -> KV of positions [since, len) of in-flight requests moves
                into the new stage's cache, on a second process group so serving goes on.
    Commit   -> the new stage serves from the next step on; the old one is kept until Cleanup.
    Abort    -> the new stage is dropped; the old one never stopped serving.

Background work runs on one thread per worker, in the order the driver sent it, on the "bulk"
process group; a round's completion (or error) is posted to the rendezvous store.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Any

import torch
# torch imports these lazily on the first empty_like of a meta tensor (_empty_parts); a first import
# that runs out of memory half-way leaves a broken module in sys.modules for good, so a worker that
# once failed a Prepare for memory could never prepare again. Imported here, at start-up.
import torch.fx.experimental.symbolic_shapes  # noqa: F401
from torch import nn

from .kvcache import KVCache
from .model import DecoderLayer, Linear, ModelConfig, RMSNorm, StageModel, hf_names, prepack
from .stage import LocalStage
from .transport import recv_obj, recv_raw, recv_tensor, send_obj, send_raw, send_tensor


DEBUG = bool(os.environ.get("CONTINUO_DEBUG"))
TRANSFER_TIMEOUT_S = float(os.environ.get("CONTINUO_TRANSFER_TIMEOUT_S", "30"))   # a peer that never answers


# --- messages (driver -> worker) ------------------------------------------------------------

@dataclass(frozen=True)
class Prepare:
    rid: int
    start: int
    end: int
    pulls: tuple[tuple[int, int, int], ...]   # (a, b, owner rank): layers [a, b) pulled from their owner
    loads: tuple[tuple[int, int], ...]        # (a, b): layers [a, b) loaded from this node's own checkpoint
    source: Any
    dtype: str
    num_kv_blocks: int
    block_size: int
    cfg: Any = None         # the model's shape, so a node that never served need not parse a checkpoint


@dataclass(frozen=True)
class SendWeights:
    rid: int
    start: int
    end: int
    dst: int


@dataclass(frozen=True)
class SendKV:
    rid: int
    layers: tuple[int, int]
    since: dict          # req_id -> first position to send (requests not listed are not sent)
    dst: int


@dataclass(frozen=True)
class RecvKV:
    rid: int
    src: int


@dataclass(frozen=True)
class CopyKV:
    rid: int
    layers: tuple[int, int]
    since: dict


@dataclass(frozen=True)
class BenchCopy:
    """A plain copy of nbytes to (send=True) or from a peer: the benchmark's bandwidth yardstick."""
    rid: int
    nbytes: int
    peer: int
    send: bool


@dataclass(frozen=True)
class RoundEnd:
    """Post `rid/round/node` to the store once every background task before it is done."""
    rid: int
    round: int


@dataclass(frozen=True)
class Commit:
    rid: int


@dataclass(frozen=True)
class Cleanup:
    rid: int


@dataclass(frozen=True)
class Abort:
    rid: int


@dataclass(frozen=True)
class InjectFault:
    """Fault injection (benchmarks and tests only): `cut` makes this worker's next bulk receive fail
    as a cut connection would (ConnectionResetError); `clear` forgets a pending fault. Simulated:
    the peer's socket stays up."""
    what: str


# --- building stages from parts -------------------------------------------------------------------

def stage_parts(model: StageModel) -> dict[Any, nn.Module]:
    """The modules of a stage by role: ('layer', i), 'embed', 'norm', 'head'."""
    parts: dict[Any, nn.Module] = {("layer", model.start + j): m for j, m in enumerate(model.layers)}
    if model.embed_tokens is not None:
        parts["embed"] = model.embed_tokens
    if model.norm is not None:
        parts["norm"], parts["head"] = model.norm, model.lm_head
    return parts


def compose(cfg: ModelConfig, start: int, end: int, parts: dict[Any, nn.Module]) -> StageModel:
    """A StageModel for [start, end) made of existing modules (shared, not copied)."""
    return StageModel(cfg, start, end, parts).eval()


def _empty_parts(cfg: ModelConfig, a: int, b: int, dtype: torch.dtype) -> dict[Any, nn.Module]:
    """Uninitialised modules for layers [a, b) that received or loaded weights fill in.

    Built on the meta device and then given empty storage: a random init of every weight would
    burn CPU seconds on the serving cores for values that are overwritten anyway."""
    parts = {k: m.to_empty(device="cpu").to(dtype) for k, m in _meta_parts(cfg, a, b).items()}
    for m in parts.values():
        for lin in m.modules():
            if isinstance(lin, Linear):
                lin.relayout(copy=False)      # received straight into the serving layout
    return parts


def _meta_parts(cfg: ModelConfig, a: int, b: int) -> dict[Any, nn.Module]:
    """The modules of layers [a, b) (with the ends the range holds) on the meta device: shapes, no storage."""
    with torch.device("meta"):
        parts: dict[Any, nn.Module] = {("layer", i): DecoderLayer(cfg, i) for i in range(a, b)}
        if a == 0:
            parts["embed"] = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if b == cfg.num_layers:
            parts["norm"] = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            parts["head"] = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    return parts


def _warm_up() -> None:
    """Run the weight prepacking once at start-up: oneDNN sets itself up on first use, and a first use
    that runs out of memory (a node's first Prepare) leaves it unable to create primitives for good."""
    lin = Linear(16, 16, bias=False)
    lin.relayout()
    lin.pack()


def _tensors(parts: dict[Any, nn.Module]) -> list[torch.Tensor]:
    """A deterministic flat list of every tensor of `parts` (sender and receiver agree on it).

    Linear weights are listed as their [in, out] transpose, the layout CPU stages keep them in
    (see model.Linear): a CPU sender sends its storage as it is and a CPU receiver receives into
    its own, with no layout copy on either side."""
    out = []
    for key in sorted(parts, key=str):
        mod = parts[key]
        linear = {f"{name}.weight".lstrip(".") for name, m in mod.named_modules() if isinstance(m, Linear)}
        sd = mod.state_dict()
        out += [sd[k].t() if k in linear else sd[k] for k in sorted(sd)]
    return out


def weight_parts(cfg: ModelConfig, owner: StageModel, a: int, b: int) -> dict[Any, nn.Module]:
    """The parts of layers [a, b) (with embedding / head when the range holds the ends) an owner sends."""
    have = stage_parts(owner)
    keys = [("layer", i) for i in range(a, b)] + (["embed"] if a == 0 else []) + \
        (["norm", "head"] if b == cfg.num_layers else [])
    return {k: have[k] for k in keys}


# --- the worker's migration state -------------------------------------------------------------------

@dataclass
class Migration:
    """What a worker holds while a reconfiguration is under way."""
    rid: int
    pending: LocalStage | None = None
    retired: LocalStage | None = None
    freed: set = field(default_factory=set)     # requests finished meanwhile: their KV is not written
    lock: threading.Lock = field(default_factory=threading.Lock)
    empty: bool = False                         # the node holds no layers after the switch
    bytes_in: int = 0                           # every tensor received (weights and KV), counted here
    weight_bytes_in: int = 0
    kv_bytes_in: int = 0
    bytes_out: int = 0
    recv_s: float = 0.0                         # time spent receiving weights and KV (bandwidth figure)
    error: str | None = None
    aborted: bool = False
    committed: bool = False                     # the new stage serves here (until an Abort undoes it)


class Migrator:
    """Runs a worker's background migration tasks in order on the bulk process group."""

    def __init__(self, worker, bulk_group, store, node: str):
        self.worker, self.group, self.store, self.node = worker, bulk_group, store, node
        self.tasks: queue.Queue = queue.Queue()
        self.m: Migration | None = None          # the reconfiguration under way
        self.by_rid: dict[int, Migration] = {}   # ...and aborted ones whose transfers still drain
        self.sends: list = []
        self.cut_next = False                    # InjectFault("cut"): the next bulk receive fails
        _warm_up()
        threading.Thread(target=self._run, name="migrator", daemon=True).start()

    # called on the worker's main thread -------------------------------------------------------
    def handle(self, msg) -> Any:
        """Queue background messages; Commit / Cleanup / Abort act at once and return a reply value."""
        if self.m is None or (self.m.rid != msg.rid and not isinstance(msg, (Commit, Cleanup, Abort))):
            self.m = self.by_rid[msg.rid] = Migration(msg.rid)   # its first message opens a reconfiguration
        m = self.m
        if m is None or m.rid != msg.rid:
            raise RuntimeError(f"no reconfiguration {msg.rid} under way on {self.node}")
        if isinstance(msg, Commit):
            t0 = time.perf_counter()
            self._join()
            if DEBUG:
                print(f"[{self.node}] commit waited {1e3 * (time.perf_counter() - t0):.1f} ms for transfers",
                      file=sys.stderr, flush=True)
            if m.error or (m.pending is None and not m.empty):
                raise RuntimeError(f"cannot commit on {self.node}: {m.error or 'nothing prepared'}")
            m.retired, self.worker.stage = self.worker.stage, m.pending
            m.committed = True
            layers = None if m.pending is None else (m.pending.start, m.pending.end)
            return {"layers": layers, "bytes_in": m.bytes_in, "bytes_out": m.bytes_out, "recv_s": m.recv_s,
                    "weight_bytes_in": m.weight_bytes_in, "kv_bytes_in": m.kv_bytes_in}
        if isinstance(msg, Abort):
            # Do not wait: a transfer may be stuck on a dead peer. Queued tasks see the error and
            # skip; the tags of this reconfiguration keep stray messages out of later ones.
            m.aborted, m.error = True, m.error or "aborted"
            self.m = None
            # An abort after this node committed (another node's commit failed in the same switch):
            # the driver's route never changed, so the old stage, untouched since, serves again.
            # (A node that held no stage before, the usual destination, goes back to holding none.)
            rolled_back = m.committed
            if m.committed:
                self.worker.stage, m.retired, m.committed = m.retired, None, False
            return {"freed_bytes": 0, "rolled_back": rolled_back}
        if isinstance(msg, Cleanup):
            self._join()
            freed = 0
            gone = m.retired
            if gone is not None:
                keep = set(map(id, self.worker.stage.model.parameters())) if self.worker.stage else set()
                freed = sum(p.numel() * p.element_size() for p in gone.model.parameters() if id(p) not in keep)
                freed += 2 * gone.cache.k.numel() * gone.cache.k.element_size()
            self.m = None
            self.by_rid.pop(m.rid, None)
            return {"freed_bytes": freed}
        self.tasks.put(msg)
        return None

    def fail(self, rid: int, error: str) -> None:
        """Mark reconfiguration rid failed (its RoundEnd / Commit reports the error)."""
        m = self.by_rid.get(rid)
        if m is None:
            m = self.m = self.by_rid[rid] = Migration(rid)
        m.error = m.error or error

    def _join(self) -> None:
        """Wait for the background tasks, boundedly: a stuck transfer must not stall serving."""
        with self.tasks.all_tasks_done:
            if not self.tasks.all_tasks_done.wait_for(lambda: self.tasks.unfinished_tasks == 0, TRANSFER_TIMEOUT_S):
                raise TimeoutError(f"{self.node}: background transfers still running after {TRANSFER_TIMEOUT_S:g} s")

    def free(self, req_ids) -> None:
        m = self.m
        if m is not None:
            with m.lock:
                m.freed.update(req_ids)
                if m.pending is not None:
                    m.pending.cache.free(req_ids)

    # the background thread --------------------------------------------------------------------------
    def _run(self, first=None) -> None:
        # Serving comes first: on cores shared with the step loop this thread yields the CPU
        # (a nicer OS priority, Linux: per thread), so a transfer slows steps rather than stalls them.
        # Ten levels nicer than the process (relative: under a process started with `nice -n -15` an
        # absolute 10 would be 25 levels below serving, and a move under load would all but stop).
        # A thread taking over after a failure (`first`: the task it starts with) inherits that priority.
        if first is None:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
            except (AttributeError, OSError):
                pass
        failed = False
        while True:
            msg = first if first is not None else self.tasks.get()
            first = None
            if failed:
                # oneDNN keeps a failure to create a primitive (e.g. out of memory while packing a new
                # stage's weights) in thread-local state: every later primitive on this thread fails,
                # even once memory is back, so the next reconfiguration onto this node would fail too.
                # A fresh thread takes the queue over, starting with this task (one consumer at a time).
                try:
                    threading.Thread(target=self._run, args=(msg,), name="migrator", daemon=True).start()
                    return
                except RuntimeError:
                    pass        # no memory for a thread's stack now: run it here, hand over with the next
            # Tasks of an aborted or failed reconfiguration still run their transfers, so that the
            # peer waiting on one is not left hanging: a gloo wait that times out closes the pair
            # between the two workers for good. What they build is dropped.
            m = self.by_rid.get(msg.rid)
            t0 = time.perf_counter()
            try:
                if m is not None:
                    self._do(m, msg)
                    if DEBUG:
                        print(f"[{self.node}] {type(msg).__name__} {1e3 * (time.perf_counter() - t0):.1f} ms",
                              file=sys.stderr, flush=True)
            except Exception as e:
                traceback.print_exc()
                failed = True
                if m is not None:
                    m.error = m.error or f"{self.node}: {type(e).__name__}: {e}"
                else:       # its reconfiguration is gone (aborted and drained): nobody waits for it
                    print(f"[{self.node}] error in a task of finished reconfiguration {msg.rid}: {e}",
                          file=sys.stderr, flush=True)
            finally:
                if isinstance(msg, RoundEnd):
                    err = None if m is None else m.error
                    for w in self.sends:
                        try:
                            w.wait(timedelta(seconds=TRANSFER_TIMEOUT_S))
                        except Exception as e:
                            err = err or f"send failed: {e}"
                    self.sends = []
                    if m is not None and not m.aborted:
                        m.error = err
                    if m is not None and m.aborted:
                        self.by_rid.pop(m.rid, None)
                        m.pending = None
                    self.store.set(f"mig/{msg.rid}/{msg.round}/{self.node}",
                                   "aborted" if m is None or m.aborted else err or "ok")
                self.tasks.task_done()

    def inject(self, what: str) -> None:
        if what not in ("cut", "clear"):
            raise ValueError(f"unknown fault {what!r}")
        self.cut_next = what == "cut"

    def _recv_check(self, drain) -> None:
        """A pending simulated cut: what the peer sends is received (so the channel stays in step) and
        dropped, and the transfer fails as a reset connection would."""
        if self.cut_next:
            self.cut_next = False
            drain()
            raise ConnectionResetError(f"{self.node}: bulk transfer connection reset by peer (simulated cut)")

    def _drain_weights(self, cfg, a: int, b: int, owner: int, tag: int, dtype) -> None:
        """Receive and drop layers [a, b) from their owner, one tensor at a time (the peak is one
        tensor: this runs when the full allocation failed)."""
        with torch.device("meta"):
            shapes = [t.shape for t in _tensors(_meta_parts(cfg, a, b))]
        for shape in shapes:
            recv_raw(torch.empty(shape, dtype=dtype), owner, self.group, tag, TRANSFER_TIMEOUT_S)

    def _do(self, m: Migration, msg) -> None:
        w = self.worker
        if isinstance(msg, Prepare):
            try:
                self._prepare(m, msg)
            except RuntimeError as e:
                # torch's allocator and oneDNN say "out of memory" in their own words
                if "allocate memory" in str(e) or "could not create a primitive" in str(e):
                    raise MemoryError(f"out of memory building layers {msg.start}-{msg.end - 1}: {e}") from e
                raise
        elif isinstance(msg, SendWeights):
            parts = weight_parts(w.cfg, w.stage.model, msg.start, msg.end)
            for t in _tensors(parts):     # through host memory: the bulk group is gloo
                self.sends += send_raw(t.detach().contiguous().cpu(), msg.dst, self.group, msg.rid)
                m.bytes_out += t.numel() * t.element_size()
        elif isinstance(msg, SendKV):
            payload = self._read(w.stage.cache, msg.layers, msg.since)
            self.sends += _send_payload(payload, msg.dst, self.group, msg.rid)
            m.bytes_out += payload["k"].numel() * payload["k"].element_size() * 2
        elif isinstance(msg, RecvKV):
            self._recv_check(lambda: _recv_payload(msg.src, self.group, msg.rid))
            t0 = time.perf_counter()
            payload = _recv_payload(msg.src, self.group, msg.rid)
            m.recv_s += time.perf_counter() - t0
            got = sum(v.numel() * v.element_size() for v in payload.values() if isinstance(v, torch.Tensor))
            m.kv_bytes_in += got
            m.bytes_in += got
            self._write(m, payload)
        elif isinstance(msg, BenchCopy):
            buf = torch.empty(msg.nbytes, dtype=torch.uint8)
            if msg.send:
                self.sends += send_raw(buf, msg.peer, self.group, msg.rid)
            else:
                recv_raw(buf, msg.peer, self.group, msg.rid, TRANSFER_TIMEOUT_S)
        elif isinstance(msg, CopyKV):
            self._write(m, self._read(w.stage.cache, msg.layers, msg.since))

    def _prepare(self, m: Migration, msg: Prepare) -> None:
        w = self.worker
        if msg.start == msg.end:          # this node gives all its layers away
            m.empty = True
            return
        dtype = getattr(torch, msg.dtype)
        parts = stage_parts(w.stage.model) if w.stage is not None else {}
        for n, (a, b, owner) in enumerate(msg.pulls):
            # The owners send whatever happens here: on any failure the rest is taken in and dropped,
            # or their waits time out, and a gloo timeout closes the channel between two nodes for good.
            try:
                if m.error is not None and not m.aborted:
                    raise RuntimeError(m.error)
                got = _empty_parts(w.cfg, a, b, dtype)
            except BaseException:
                for a2, b2, owner2 in msg.pulls[n:]:
                    self._drain_weights(w.cfg, a2, b2, owner2, msg.rid, dtype)
                raise
            try:
                self._recv_check(lambda: self._drain_weights(w.cfg, a, b, owner, msg.rid, dtype))
            except BaseException:
                del got
                for a2, b2, owner2 in msg.pulls[n + 1:]:
                    self._drain_weights(w.cfg, a2, b2, owner2, msg.rid, dtype)
                raise
            t0 = time.perf_counter()
            for t in _tensors(got):
                recv_raw(t, owner, self.group, msg.rid, TRANSFER_TIMEOUT_S)
                m.weight_bytes_in += t.numel() * t.element_size()
                m.bytes_in += t.numel() * t.element_size()
            m.recv_s += time.perf_counter() - t0
            parts.update(got)
        if msg.loads:
            from .weights import open_source
            src = open_source(msg.source)
            for a, b in msg.loads:
                tmp = StageModel(w.cfg, a, b, _empty_parts(w.cfg, a, b, dtype))
                tmp.load_hf_state(src.load(hf_names(w.cfg, a, b), dtype))
                parts.update(stage_parts(tmp))
        # received and loaded parts arrive on the host; kept ones are already where they compute
        parts = {k: p.to(w.device) for k, p in parts.items()}
        model = compose(w.cfg, msg.start, msg.end, parts)
        if w.device.type == "cuda":
            model.rotary.to(w.device)
        prepack(model)          # here in the background, not on the first step after the switch
        cache = KVCache(range(msg.start, msg.end), msg.num_kv_blocks, msg.block_size, w.cfg.num_kv_heads,
                        w.cfg.head_dim, dtype, w.device)
        m.pending = LocalStage(model, cache)

    def _read(self, cache: KVCache, layers: tuple[int, int], since: dict) -> dict:
        with self.worker.kv_lock:       # not freed under us by the main thread (Worker.free)
            reqs = [r for r in since if r in cache.lens]     # finished meanwhile: nothing to send
            return cache.read(reqs, range(*layers), {r: since[r] for r in reqs})

    def _write(self, m: Migration, payload: dict) -> None:
        if m.pending is None:         # its Prepare failed or it was aborted: received, dropped
            return
        with m.lock:
            keep = [i for i, r in enumerate(payload["reqs"]) if r not in m.freed]
            if len(keep) < len(payload["reqs"]):
                offsets = [0]
                for n in payload["lengths"]:
                    offsets.append(offsets[-1] + n)
                idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in keep] or
                                [torch.zeros(0, dtype=torch.long)])
                payload = {**payload, "reqs": [payload["reqs"][i] for i in keep],
                           "starts": [payload["starts"][i] for i in keep],
                           "lengths": [payload["lengths"][i] for i in keep],
                           "k": payload["k"][:, idx], "v": payload["v"][:, idx]}
            m.pending.cache.write(payload)


def _send_payload(p: dict, dst: int, group, tag: int) -> list:
    meta = {k: p[k] for k in ("layers", "reqs", "starts", "lengths")}
    # bulk data goes over gloo through host memory (a GPU cache's rows are copied out first)
    return send_obj(meta, dst, group, tag) + send_tensor(p["k"].cpu(), dst, group, tag) + \
        send_tensor(p["v"].cpu(), dst, group, tag)


def _recv_payload(src: int, group, tag: int) -> dict:
    meta = recv_obj(src, group, tag, TRANSFER_TIMEOUT_S)
    return {**meta, "k": recv_tensor(src, group, tag, TRANSFER_TIMEOUT_S),
            "v": recv_tensor(src, group, tag, TRANSFER_TIMEOUT_S)}
