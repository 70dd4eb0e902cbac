"""A cluster file from Kubernetes nodes: GPU feature-discovery labels, zone, state, Continuo's labels.

    nodes = load_node_list("nodes.json")            # `kubectl get nodes -o json`, or the API (from_context)
    inv = inventory(nodes, overlay=load_overlay("links.yaml"))
    if inv.problems: print(inv.report())            # which node lacks which label, and the fix
    else: write_cluster(inv.cluster, "cluster.yaml")

What each field comes from:

    gpu            nvidia.com/gpu.product (NVIDIA GPU feature discovery), or continuo.io/gpu to override
    gpus           nvidia.com/gpu.count, else status.capacity["nvidia.com/gpu"]
    memory_gb      nvidia.com/gpu.memory (MiB per GPU; 1 GB here = 1024 MiB, as GPU datasheets count);
                   for gpu CPU, the node's allocatable memory
    zone           topology.kubernetes.io/zone
    state          Ready condition False/Unknown/missing: down; spec.unschedulable (cordoned): draining; else up
    jurisdiction   continuo.io/jurisdiction   (required)
    tier           continuo.io/tier           (required: edge | cloud)
    trust          continuo.io/trust          (required: owned | attested | public-cloud | untrusted)
    reserved_gb, price_per_hour   continuo.io/reserved-gb, continuo.io/price-per-hour (optional)
    host           continuo.io/host (optional: nodes that are VMs or containers on one machine, sharing
                   its cores and memory bandwidth, name the same host)
    tags           tag.continuo.io/NAME labels (any value)

Nodes with no GPU label and no Continuo label (control planes, CPU pools) are left out. Links come from
an overlay file (Kubernetes knows no bandwidths): `name`, and `links` as in a cluster file; pairs it
does not list take its default, or DEFAULT_LINK when it gives none.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from policies import GPU_KINDS, Cluster, InputError, Node, Trust
from policies.cluster import Links
from policies.loading import load_file, parse_yaml

PREFIX = "continuo.io/"
TAG_PREFIX = "tag.continuo.io/"
JURISDICTION, TIER, TRUST = PREFIX + "jurisdiction", PREFIX + "tier", PREFIX + "trust"
GPU_OVERRIDE, RESERVED, PRICE = PREFIX + "gpu", PREFIX + "reserved-gb", PREFIX + "price-per-hour"
HOST = PREFIX + "host"
GFD_PRODUCT, GFD_COUNT, GFD_MEMORY = "nvidia.com/gpu.product", "nvidia.com/gpu.count", "nvidia.com/gpu.memory"
GPU_RESOURCE = "nvidia.com/gpu"
ZONE, ZONE_OLD = "topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone"
HOSTNAME = "kubernetes.io/hostname"
MIB_PER_GB = 1024          # GPU "80 GB" is 80 GiB-ish: an H100 reports 81559 MiB
DEFAULT_LINK = {"bandwidth_gbps": 10.0, "latency_ms": 1.0, "encrypted": False}
TRUST_VALUES = [t.value for t in reversed(list(Trust))]

# A feature-discovery product string -> Continuo's GPU kind: the first pattern that matches wins.
# GFD writes the CUDA device name with spaces as dashes, e.g. NVIDIA-H100-80GB-HBM3, Tesla-T4.
_PRODUCTS = [
    (r"H200", "H200"), (r"H100", "H100"), (r"A100.*80G", "A100-80GB"), (r"A100", "A100-40GB"),
    (r"L40S", "L40S"), (r"(^|-)L4($|-)", "L4"), (r"(^|-)T4($|-)", "T4"), (r"4090", "RTX4090"),
]
# ... and back: what feature discovery would write for each kind (node_list, for tests and `k8s labels`).
PRODUCT_OF_KIND = {"H200": "NVIDIA-H200", "H100": "NVIDIA-H100-80GB-HBM3", "A100-80GB": "NVIDIA-A100-SXM4-80GB",
                   "A100-40GB": "NVIDIA-A100-SXM4-40GB", "L40S": "NVIDIA-L40S", "L4": "NVIDIA-L4", "T4": "Tesla-T4",
                   "RTX4090": "NVIDIA-GeForce-RTX-4090"}

_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60}


def quantity(text: str) -> float:
    """A Kubernetes resource quantity ("16303412Ki", "4Gi", "1.5", "500m") as a number."""
    m = _QUANTITY.match(str(text).strip())
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def gpu_kind(product: str) -> str | None:
    """The GPU kind of a feature-discovery product label, or None when Continuo does not know it."""
    p = product.upper().removesuffix("-SHARED")
    if "-MIG-" in p:            # a MIG slice is not the whole GPU the kind's figures describe
        return None
    return next((kind for pat, kind in _PRODUCTS if re.search(pat, p)), None)


@dataclass(frozen=True)
class Problem:
    """One node's missing or wrong label, and the label that fixes it (value: a placeholder or a value)."""
    node: str
    label: str
    message: str
    fix_value: str | None = None      # None: no label fixes it (the message says what does)
    overwrite: bool = False           # the label is there with a bad value


@dataclass
class Inventory:
    cluster: Cluster | None
    problems: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)        # nodes with no GPU and no Continuo label
    warnings: list[str] = field(default_factory=list)

    def fix_commands(self) -> list[str]:
        """One `kubectl label node` per node that a label can fix."""
        out = []
        for node in dict.fromkeys(p.node for p in self.problems):
            mine = [p for p in self.problems if p.node == node and p.fix_value is not None]
            if mine:
                args = " ".join(f"{p.label}={p.fix_value}" for p in mine)
                overwrite = " --overwrite" if any(p.overwrite for p in mine) else ""
                out.append(f"kubectl label node {node} {args}{overwrite}")
        return out

    def report(self) -> str:
        """Which nodes lack which label, and the kubectl commands that fix it (placeholders in capitals)."""
        nodes = sorted({p.node for p in self.problems})
        lines = [f"{len(nodes)} node(s) lack labels Continuo needs; no cluster file written:"]
        lines += [f"  {p.node}: {p.label}: {p.message}" for p in self.problems]
        fixes = self.fix_commands()
        if fixes:
            lines += ["To fix, label the nodes (replace the CAPITALS with the node's value):"]
            lines += [f"  {c}" for c in fixes]
        return "\n".join(lines)


class Overlay(BaseModel):
    """What Kubernetes does not know: the cluster's name and its links."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str | None = None
    links: Links | None = None


def load_overlay(path: str | Path) -> Overlay:
    """The links overlay file; errors name the file, line and field."""
    return load_file(Overlay, path)


def load_node_list(path: str | Path) -> list[dict]:
    """Nodes from `kubectl get nodes -o json` (or -o yaml) saved in a file, or '-' for stdin."""
    name = "<stdin>" if str(path) == "-" else str(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror}", file=name) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data, _ = parse_yaml(text, name)
    return node_items(data, name)


def node_items(data: Any, name: str = "<input>") -> list[dict]:
    """The Node objects of a NodeList / List / single Node, checked for the fields read here."""
    if isinstance(data, dict) and data.get("kind") == "Node":
        data = {"items": [data]}
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise InputError("expected the output of `kubectl get nodes -o json` (a NodeList with items)", file=name)
    for i, item in enumerate(data["items"]):
        if not isinstance(item, dict) or item.get("kind", "Node") != "Node":
            raise InputError(f"item is not a Node (kind {item.get('kind') if isinstance(item, dict) else item!r})",
                             file=name, field=f"items[{i}]")
        if not (item.get("metadata") or {}).get("name"):
            raise InputError("node has no metadata.name", file=name, field=f"items[{i}].metadata.name")
    return data["items"]


def _state(node: dict) -> str:
    ready = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") != "True":
        return "down"
    return "draining" if (node.get("spec") or {}).get("unschedulable") else "up"


def _member(labels: dict, capacity: dict) -> bool:
    return any(k.startswith((PREFIX, TAG_PREFIX)) for k in labels) or GFD_PRODUCT in labels \
        or GFD_COUNT in labels or GPU_RESOURCE in capacity


def _node(item: dict, problems: list[Problem], warnings: list[str]) -> dict:
    """The cluster file's fields for one Kubernetes node; what is wrong goes to `problems`."""
    meta, status = item["metadata"], item.get("status") or {}
    name, labels = meta["name"], meta.get("labels") or {}
    capacity, allocatable = status.get("capacity") or {}, status.get("allocatable") or {}
    n0 = len(problems)

    def problem(label, message, fix=None, overwrite=False):
        problems.append(Problem(name, label, message, fix, overwrite))

    out: dict[str, Any] = {"name": name}
    kinds = ", ".join(GPU_KINDS)
    if GPU_OVERRIDE in labels:
        kind = labels[GPU_OVERRIDE]
        if kind not in GPU_KINDS:
            problem(GPU_OVERRIDE, f"'{kind}' is not a GPU kind Continuo knows (one of {kinds})", "GPU", True)
    elif GFD_PRODUCT in labels:
        kind = gpu_kind(labels[GFD_PRODUCT])
        if kind is None:
            problem(GPU_OVERRIDE, f"{GFD_PRODUCT} is '{labels[GFD_PRODUCT]}', a GPU (or MIG slice) Continuo has no "
                                  f"figures for: name the closest kind ({kinds})", "GPU")
    else:
        kind = None
        if GFD_COUNT in labels or GPU_RESOURCE in capacity:     # GPUs, but no feature discovery to name them
            problem(GPU_OVERRIDE, f"no {GFD_PRODUCT} label (is NVIDIA GPU feature discovery running on this node?): "
                                  f"run it, or name the GPU kind ({kinds})", "GPU")
        else:
            problem(GPU_OVERRIDE, f"no GPU here (no {GFD_PRODUCT} label, no {GPU_RESOURCE} capacity): to serve "
                                  f"from its CPU, set {GPU_OVERRIDE}=CPU", "CPU")
    out["gpu"] = kind
    if kind not in (None, "CPU"):
        count = labels.get(GFD_COUNT, capacity.get(GPU_RESOURCE))
        try:
            out["gpus"] = int(count)
            if out["gpus"] < 1:
                raise ValueError
        except (TypeError, ValueError):
            problem(GFD_COUNT, f"GPU count is {count!r}: neither {GFD_COUNT} nor capacity {GPU_RESOURCE} gives "
                               "one or more GPUs (is the NVIDIA device plugin running?)")
        if GFD_MEMORY in labels:
            try:
                out["memory_gb"] = round(float(labels[GFD_MEMORY]) / MIB_PER_GB, 2)
            except ValueError:
                problem(GFD_MEMORY, f"'{labels[GFD_MEMORY]}' is not a number of MiB")
    elif kind == "CPU" and "memory" in allocatable:
        try:
            out["memory_gb"] = round(quantity(allocatable["memory"]) / 2 ** 30, 2)
        except ValueError as e:
            problem("status.allocatable.memory", str(e))
    zone = labels.get(ZONE, labels.get(ZONE_OLD, ""))
    if zone:
        out["zone"] = zone
    for label, key, allowed, placeholder in ((JURISDICTION, "jurisdiction", None, "JURISDICTION"),
                                             (TIER, "tier", ["edge", "cloud"], "TIER"),
                                             (TRUST, "trust", TRUST_VALUES, "TRUST")):
        choices = f" (one of {', '.join(allowed)})" if allowed else " (as the policy names it, e.g. eu)"
        value = labels.get(label)
        if value is None:
            problem(label, "missing" + choices, placeholder)
        elif allowed and value not in allowed:
            problem(label, f"'{value}' is not valid{choices}", placeholder, overwrite=True)
        else:
            out[key] = value
    for label, key in ((RESERVED, "reserved_gb"), (PRICE, "price_per_hour")):
        if label in labels:
            try:
                out[key] = float(labels[label])
            except ValueError:
                problem(label, f"'{labels[label]}' is not a number", key.upper(), overwrite=True)
    if labels.get(HOST):
        out["host"] = labels[HOST]
    tags = [k.removeprefix(TAG_PREFIX) for k in labels if k.startswith(TAG_PREFIX)]
    if tags:
        out["tags"] = tags
    out["state"] = _state(item)
    if labels.get(HOSTNAME, name) != name:
        warnings.append(f"{name}: label {HOSTNAME} is '{labels[HOSTNAME]}', not the node's name; `continuo k8s "
                        "render` pins pods by hostname = node name, so they would not schedule there")
    if len(problems) == n0:
        try:
            Node.model_validate(out)
        except ValidationError as e:
            first = e.errors()[0]
            problem(".".join(map(str, first["loc"])), first["msg"])
    return out


def inventory(items: list[dict], overlay: Overlay | None = None, name: str | None = None,
              overlay_file: str | None = None) -> Inventory:
    """Build the cluster from Node objects; with any problem, `cluster` is None and `problems` says why."""
    overlay = overlay or Overlay()
    problems: list[Problem] = []
    inv = Inventory(None, problems)
    nodes = []
    for item in items:
        labels = item["metadata"].get("labels") or {}
        if not _member(labels, (item.get("status") or {}).get("capacity") or {}):
            inv.skipped.append(item["metadata"]["name"])
            continue
        nodes.append(_node(item, problems, inv.warnings))
    if not nodes:
        raise InputError("no node carries a GPU (nvidia.com/gpu.*) or Continuo (continuo.io/*) label: "
                         f"label the nodes to serve from, e.g. kubectl label node NAME {GPU_OVERRIDE}=CPU "
                         f"{JURISDICTION}=eu {TIER}=edge {TRUST}=owned", field="items")
    if problems:
        return inv
    given = overlay.links
    default = DEFAULT_LINK      # a pod network links every node: unlisted pairs take the overlay's default, or this
    if given is not None and "default" in given.model_fields_set:
        default = given.default.model_dump(mode="json") if given.default else None
    links = {"default": default, "pairs": [p.model_dump(mode="json") for p in given.pairs] if given else []}
    try:
        inv.cluster = Cluster.model_validate({"name": overlay.name or name or "kubernetes", "nodes": nodes,
                                              "links": links})
    except ValidationError as e:
        raise InputError(str(e.errors()[0]["msg"]).removeprefix("Value error, "), file=overlay_file,
                         field="links") from None
    return inv


# --- the other way: the labels a cluster file's nodes would carry ---------------------------------

def node_labels(node: Node) -> dict[str, str]:
    """The labels (feature discovery's and Continuo's) that make `inventory` read `node` back."""
    labels = {HOSTNAME: node.name, JURISDICTION: node.jurisdiction, TIER: node.tier, TRUST: node.trust.value}
    if node.gpu == "CPU":
        labels[GPU_OVERRIDE] = "CPU"
    else:
        labels.update({GFD_PRODUCT: PRODUCT_OF_KIND[node.gpu], GFD_COUNT: str(node.gpus),
                       GFD_MEMORY: str(round((node.memory_gb or node.kind.memory_gb) * MIB_PER_GB))})
    if node.zone:
        labels[ZONE] = node.zone
    if node.reserved_gb:
        labels[RESERVED] = f"{node.reserved_gb:g}"
    if node.price_per_hour is not None:
        labels[PRICE] = f"{node.price_per_hour:g}"
    if node.host is not None:
        labels[HOST] = node.host
    labels.update({TAG_PREFIX + t: "true" for t in node.tags})
    return labels


def node_list(cluster: Cluster) -> dict:
    """The NodeList `kubectl get nodes -o json` would show for a cluster whose nodes carry node_labels."""
    items = []
    for n in cluster.nodes:
        gpus = {} if n.gpu == "CPU" else {GPU_RESOURCE: str(n.gpus)}
        mem = f"{round((n.memory_gb or n.kind.memory_gb) * 1024)}Mi"
        items.append({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": {"kubernetes.io/os": "linux", **node_labels(n)}},
            "spec": {"unschedulable": True} if n.state == "draining" else {},
            "status": {"capacity": {"cpu": "32", "memory": mem, **gpus},
                       "allocatable": {"cpu": "31", "memory": mem, **gpus},
                       "conditions": [{"type": "Ready", "status": "False" if n.state == "down" else "True"}]},
        })
    return {"apiVersion": "v1", "kind": "List", "items": items}


def label_commands(cluster: Cluster) -> list[str]:
    """`kubectl label node` commands that give a cluster's nodes the Continuo labels of its file."""
    own = (PREFIX, TAG_PREFIX)
    return [f"kubectl label node {n.name} "
            + " ".join(f"{k}={v}" for k, v in node_labels(n).items() if k.startswith(own)) + " --overwrite"
            for n in cluster.nodes]


# --- files ----------------------------------------------------------------------------------------

_ALWAYS = ("name", "gpu", "jurisdiction", "tier", "trust", "state")


def _pair(p) -> dict:
    return {"between": list(p.between), **p.model_dump(mode="json", exclude={"between"})}


def cluster_yaml(cluster: Cluster, header: str = "") -> str:
    """A cluster file as people write them: one node per line, links pair by pair."""
    defaults = {k: f.default for k, f in Node.model_fields.items()}
    lines = [f"# {h}" for h in header.splitlines()] + [f"name: {json.dumps(cluster.name)}", "nodes:"]
    for n in cluster.nodes:
        d = {k: v for k, v in n.model_dump(mode="json").items()
             if k in _ALWAYS or v != (list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k])}
        lines.append("  - " + yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10 ** 6).strip())
    links = cluster.links
    lines.append("links:")
    lines.append("  default: " + ("null" if links.default is None else
                                  yaml.safe_dump(links.default.model_dump(mode="json"), default_flow_style=True,
                                                 sort_keys=False).strip()))
    if links.pairs:
        lines.append("  pairs:")
        lines += ["    - " + yaml.safe_dump(_pair(p),
                                            default_flow_style=True, sort_keys=False, width=10 ** 6).strip()
                  for p in links.pairs]
    return "\n".join(lines) + "\n"


def write_atomic(path: str | Path, text: str) -> None:
    """Write the whole file or nothing: a temporary file beside it, renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def from_context(context: str | None) -> list[dict]:
    """The nodes of a kubeconfig context, through the official client (`pip install 'continuo[k8s]'`)."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise InputError("--context needs the official Kubernetes client: pip install 'continuo[k8s]' (or "
                         "kubernetes); or save `kubectl get nodes -o json` and pass --from FILE",
                         field="--context") from None
    try:
        api = config.new_client_from_config(context=context)
    except (ConfigException, OSError) as e:
        raise InputError(f"kubeconfig: {e}", field="--context") from None
    try:
        nodes = client.CoreV1Api(api).list_node(_request_timeout=30)     # an unreachable API fails, not hangs
    except Exception as e:       # urllib3 / ApiException: unreachable or refused; the operator's to fix
        raise InputError(f"listing nodes of context {context or '(current)'} failed: {str(e).splitlines()[0]}",
                         field="--context") from None
    return node_items(api.sanitize_for_serialization(nodes), f"context {context or '(current)'}")
