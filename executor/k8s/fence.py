"""A small evaluator of Kubernetes NetworkPolicies: can pod X open a connection to pod Y on a port?

It implements the semantics of networking.k8s.io/v1 for pod-to-pod traffic, as a conforming
network plugin enforces them:

- a pod is isolated for ingress (egress) when some NetworkPolicy of its namespace selects it and
  lists Ingress (Egress) in policyTypes (absent policyTypes: Ingress, plus Egress when the policy
  has egress rules);
- an isolated pod takes (sends) only what some rule of a policy selecting it allows; rules add up;
- a connection needs both: the source's egress and the destination's ingress; replies of an
  allowed connection are allowed.

A peer's podSelector alone means pods of the policy's own namespace; namespaceSelector alone, every
pod of the matching namespaces; both, the matching pods of the matching namespaces. ipBlock peers
and named ports are not modelled (Continuo renders neither): they raise instead of being guessed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"   # set by the API server on every namespace


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: namespace and labels (node: where it runs, for reports)."""
    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    node: str | None = None


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def all_labels(self) -> dict[str, str]:
        return {**self.labels, NAMESPACE_NAME_LABEL: self.name}


def selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against a label set; an empty selector selects everything."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"label selector operator {op!r} is not one of In, NotIn, Exists, DoesNotExist")
    return True


def _policy_types(spec: dict) -> set[str]:
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if spec.get("egress") else set())


def _port_matches(ports: list | None, port: int, protocol: str) -> bool:
    if not ports:                       # no ports listed: every port
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:                # a protocol without a port: every port of it
            return True
        if isinstance(want, str):
            raise ValueError(f"named port {want!r}: the evaluator models numeric ports only")
        if want <= port <= p.get("endPort", want):
            return True
    return False


class Fence:
    """The NetworkPolicies of a cluster, with the namespaces they refer to."""

    def __init__(self, policies: Iterable[dict], namespaces: Iterable[Namespace] = ()):
        self.policies = [p for p in policies if p.get("kind") == "NetworkPolicy"]
        self.namespaces = {n.name: n for n in namespaces}

    def _ns_labels(self, name: str) -> dict[str, str]:
        return (self.namespaces.get(name) or Namespace(name)).all_labels

    def _peer_matches(self, peer: dict, policy_ns: str, other: Pod) -> bool:
        if "ipBlock" in peer:
            raise ValueError("ipBlock peers are not modelled by this evaluator")
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], self._ns_labels(other.namespace)):
                return False
        elif other.namespace != policy_ns:
            return False
        return selects(peer.get("podSelector"), other.labels)

    def _side_allows(self, pod: Pod, other: Pod, port: int, protocol: str, direction: str) -> bool:
        """Whether `pod`'s policies let `other` in (Ingress) or let `pod` out to `other` (Egress)."""
        rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        isolated = False
        for pol in self.policies:
            meta, spec = pol["metadata"], pol["spec"]
            if meta.get("namespace", "default") != pod.namespace or not selects(spec.get("podSelector"), pod.labels):
                continue
            if direction not in _policy_types(spec):
                continue
            isolated = True
            for rule in spec.get(rules_key) or []:
                peers = rule.get(peers_key)
                if (not peers or any(self._peer_matches(p, pod.namespace, other) for p in peers)) \
                        and _port_matches(rule.get("ports"), port, protocol):
                    return True
        return not isolated

    def allows(self, src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
        """Can `src` open a connection to `dst` on `port`/`protocol`?"""
        return self._side_allows(src, dst, port, protocol, "Egress") and \
            self._side_allows(dst, src, port, protocol, "Ingress")
