"""The cluster: nodes (GPU kind, memory, zone, jurisdiction, trust, state) and the links between them."""
from __future__ import annotations

import hashlib
import json
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from .loading import InputError, field_name, load_file


class GpuKind(BaseModel):
    """What the cost model knows of one GPU kind (datasheet figures, dense bf16)."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    memory_gb: float
    mem_bandwidth_gbs: float   # GB/s of device memory bandwidth
    bf16_tflops: float         # dense bf16 tensor throughput
    price_per_hour: float      # USD, typical on-demand list price; overridable per node


GPU_KINDS: dict[str, GpuKind] = {
    "H200": GpuKind(memory_gb=141, mem_bandwidth_gbs=4800, bf16_tflops=989, price_per_hour=4.0),
    "H100": GpuKind(memory_gb=80, mem_bandwidth_gbs=3350, bf16_tflops=989, price_per_hour=3.0),
    "A100-80GB": GpuKind(memory_gb=80, mem_bandwidth_gbs=2039, bf16_tflops=312, price_per_hour=1.8),
    "A100-40GB": GpuKind(memory_gb=40, mem_bandwidth_gbs=1555, bf16_tflops=312, price_per_hour=1.3),
    "L40S": GpuKind(memory_gb=48, mem_bandwidth_gbs=864, bf16_tflops=362, price_per_hour=1.0),
    "L4": GpuKind(memory_gb=24, mem_bandwidth_gbs=300, bf16_tflops=121, price_per_hour=0.6),
    "T4": GpuKind(memory_gb=16, mem_bandwidth_gbs=320, bf16_tflops=65, price_per_hour=0.35),
    "RTX4090": GpuKind(memory_gb=24, mem_bandwidth_gbs=1008, bf16_tflops=165, price_per_hour=0.4),
    "CPU": GpuKind(memory_gb=64, mem_bandwidth_gbs=100, bf16_tflops=2, price_per_hour=0.1),
}


class Trust(str, Enum):
    """How far a node is trusted; ordered owned > attested > public-cloud > untrusted."""
    untrusted = "untrusted"
    public_cloud = "public-cloud"
    attested = "attested"
    owned = "owned"

    @property
    def rank(self) -> int:
        return _TRUST_ORDER.index(self)

    def at_least(self, other: "Trust") -> bool:
        return self.rank >= other.rank


_TRUST_ORDER = [Trust.untrusted, Trust.public_cloud, Trust.attested, Trust.owned]

_STRICT = ConfigDict(frozen=True, extra="forbid")


class Node(BaseModel):
    """One machine that can host pipeline stages. `memory_gb` is per GPU (defaults to the kind's)."""
    model_config = _STRICT
    name: str = Field(min_length=1)
    gpu: Literal[tuple(GPU_KINDS)]  # type: ignore[valid-type]
    gpus: int = Field(1, ge=1, le=64)
    memory_gb: float | None = Field(None, gt=0)
    reserved_gb: float = Field(0.0, ge=0, description="memory already used by something else")
    zone: str = ""
    jurisdiction: str
    tier: Literal["edge", "cloud"] = "cloud"
    trust: Trust = Trust.untrusted
    tags: tuple[str, ...] = ()
    state: Literal["up", "draining", "down"] = "up"
    price_per_hour: float | None = Field(None, ge=0, description="overrides the GPU kind's price")
    # Nodes that name the same host share its cores and memory bandwidth (the local test bench's
    # worker processes on one machine): stages on them that compute at once slow each other down,
    # by as much as the host's measured co-run slowdown says (Profile.corun, costmodel.host_slowdowns).
    host: str | None = Field(None, min_length=1, description="the machine this node shares with others, if any")

    @property
    def kind(self) -> GpuKind:
        return GPU_KINDS[self.gpu]

    @property
    def total_memory_gb(self) -> float:
        return (self.memory_gb or self.kind.memory_gb) * self.gpus

    @property
    def usable_memory_bytes(self) -> float:
        """Memory stages may use: 90% of the total (runtime context, fragmentation) minus reserved."""
        return (0.9 * self.total_memory_gb - self.reserved_gb) * 1e9

    @property
    def hourly_price(self) -> float:
        return self.price_per_hour if self.price_per_hour is not None else self.kind.price_per_hour * self.gpus


class Link(BaseModel):
    """A network path between two nodes."""
    model_config = _STRICT
    bandwidth_gbps: float = Field(gt=0)
    latency_ms: float = Field(ge=0)
    encrypted: bool = False


class LinkPair(Link):
    between: tuple[str, str]


class Links(BaseModel):
    model_config = _STRICT
    default: Link | None = None  # None: only the listed pairs are connected
    pairs: tuple[LinkPair, ...] = ()


class Cluster(BaseModel):
    """Nodes and links. Build with `load_cluster(path)` or `Cluster.model_validate(dict)`."""
    model_config = _STRICT
    name: str
    nodes: tuple[Node, ...] = Field(min_length=1)
    links: Links = Links()

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo):
        if not (info.context or {}).get("defer_checks"):
            for loc, msg in self.problems():
                raise ValueError(f"{'.'.join(map(str, loc))}: {msg}")
        return self

    def problems(self) -> list[tuple[tuple, str]]:
        """Checks that span fields: duplicate names, links naming unknown nodes or a node twice."""
        out, seen = [], set()
        for i, n in enumerate(self.nodes):
            if n.name in seen:
                out.append((("nodes", i, "name"), f"duplicate node name '{n.name}'"))
            seen.add(n.name)
        for i, p in enumerate(self.links.pairs):
            for j, name in enumerate(p.between):
                if name not in seen:
                    out.append((("links", "pairs", i, "between", j),
                                f"link names unknown node '{name}' (known: {', '.join(sorted(seen))})"))
            if p.between[0] == p.between[1]:
                out.append((("links", "pairs", i, "between"), f"link joins node '{p.between[0]}' to itself"))
        return out

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"cluster {self.name} has no node '{name}'")

    def has_node(self, name: str) -> bool:
        return any(n.name == name for n in self.nodes)

    @cached_property
    def _pair_index(self) -> dict[frozenset, LinkPair]:
        return {frozenset(p.between): p for p in self.links.pairs}

    def link(self, a: str, b: str) -> Link | None:
        """The link between two nodes (a listed pair wins over the default), or None."""
        return self._pair_index.get(frozenset((a, b)), self.links.default)

    @cached_property
    def _fingerprint(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """A short hash of the whole cluster state; a plan made from another state is stale."""
        return self._fingerprint

    def model_copy(self, *, update=None, deep: bool = False) -> "Cluster":
        """A copy rebuilt from fields, so that cached link index and fingerprint are recomputed."""
        return type(self).model_validate({**dict(self), **(update or {})})

    def with_state(self, node: str, state: str) -> "Cluster":
        """A copy with one node's state changed (e.g. into maintenance)."""
        nodes = tuple(n.model_copy(update={"state": state}) if n.name == node else n for n in self.nodes)
        if not any(n.name == node for n in self.nodes):
            raise KeyError(f"cluster {self.name} has no node '{node}'")
        return self.model_copy(update={"nodes": nodes})


def _post(obj, locate):
    for loc, msg in obj.problems():
        raise InputError(msg, line=locate(loc), field=field_name(loc))


def load_cluster(path: str | Path) -> Cluster:
    """Load a cluster file; errors name the file, line and field."""
    return load_file(Cluster, path, post=_post, context={"defer_checks": True})
