"""The network fence: the NetworkPolicy evaluator's semantics, and the property that the rendered
policies allow exactly the pod pairs the policy allows for the data class, on every scenario and on
random clusters and policies.

The expected answer (`policy_allows`) is derived from the policy pack and the cluster alone, not from
the manifests: a service's pods may talk to each other when each runs on a node that may see the
class and hold its KV cache (and is up); the API port takes connections from the namespaces the
operator named; the pods may ask DNS. Everything else that touches a service pod is refused.
"""
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.planner import Infeasible, plan
from executor import k8s
from executor.k8s import Fence, Namespace, Pod
from executor.k8s.render import (ADMISSION_FILE, API_PORT, DATA_CLASS_LABEL, NODE_LABEL, RENDEZVOUS_PORT, ROLE_LABEL,
                                 SERVICE_LABEL)
from policies import (GPU_KINDS, Cluster, IntentSpec, PlacementPlan, Policy, Stage, Trust, effective_rules,
                      load_cluster, load_model_spec, load_policy)

SCENARIOS = sorted(p.parent for p in Path("scenarios").glob("*/cluster.yaml") if (p.parent / "policy.yaml").exists())
NS, API_NS = "inference", ("clients", "gateway")
PORTS = [(API_PORT, "TCP"), (RENDEZVOUS_PORT, "TCP"), (41234, "TCP"), (53, "UDP"), (53, "TCP")]
DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"})


# --- the evaluator on hand-made policies --------------------------------------------------------

def _np(name, ns, selector, types=None, ingress=None, egress=None):
    spec = {"podSelector": selector}
    for k, v in (("policyTypes", types), ("ingress", ingress), ("egress", egress)):
        if v is not None:
            spec[k] = v
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": spec}


A, B = Pod("a", "x", {"app": "a"}), Pod("b", "x", {"app": "b"})
C = Pod("c", "y", {"app": "a"})


def test_no_policy_allows_everything_and_an_empty_one_isolates():
    assert Fence([]).allows(A, B, 80)
    deny = _np("deny", "x", {"matchLabels": {"app": "b"}})              # policyTypes default: Ingress
    f = Fence([deny])
    assert not f.allows(A, B, 80) and f.allows(B, A, 80)                 # B's egress is not isolated
    f = Fence([_np("deny", "x", {}, ["Egress"])])
    assert not f.allows(A, B, 80) and not f.allows(B, A, 80) and f.allows(C, A, 80)


def test_peers_ports_and_namespaces():
    allow = _np("allow", "x", {"matchLabels": {"app": "b"}}, ingress=[
        {"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 8000, "endPort": 8010}]}])
    f = Fence([allow])
    assert f.allows(A, B, 8000) and f.allows(A, B, 8010) and not f.allows(A, B, 8011)
    assert not f.allows(A, B, 8000, "UDP")                               # protocol defaults to TCP
    assert not f.allows(C, B, 8000)                                      # podSelector alone: own namespace only
    by_ns = _np("ns", "x", {"matchLabels": {"app": "b"}}, ingress=[
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "ml"}},
                   "podSelector": {"matchLabels": {"app": "a"}}}]}])
    f = Fence([by_ns], [Namespace("y", {"team": "ml"})])
    assert f.allows(C, B, 1) and not f.allows(A, B, 1)                   # x lacks the label
    assert not f.allows(Pod("d", "y", {"app": "d"}), B, 1)               # both selectors must match
    by_name = _np("name", "x", {}, ingress=[{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]}}]}])
    assert Fence([by_name]).allows(C, A, 1)                              # the name label every namespace has
    everything = _np("all", "x", {}, ingress=[{}])                       # a rule with no from/ports: all
    assert Fence([everything, by_ns]).allows(Pod("z", "q"), B, 9)        # policies add up


def test_egress_and_ingress_both_needed():
    out = _np("out", "x", {"matchLabels": {"app": "a"}}, ["Egress"], egress=[{"to": [{"podSelector": {}}]}])
    inn = _np("in", "x", {"matchLabels": {"app": "b"}}, ["Ingress"], ingress=[])
    f = Fence([out, inn])
    assert not f.allows(A, B, 1)                                          # A may send, B takes nothing
    assert Fence([out]).allows(A, B, 1) and not Fence([out]).allows(A, C, 1)


def test_selector_operators_and_unmodelled_peers():
    s = {"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["1"]}, {"key": "e", "operator": "Exists"},
                              {"key": "g", "operator": "DoesNotExist"}]}
    assert k8s.selects(s, {"k": "2", "e": ""}) and k8s.selects(s, {"e": "x"})
    assert not k8s.selects(s, {"k": "1", "e": ""}) and not k8s.selects(s, {"k": "2"})
    assert not k8s.selects(s, {"e": "", "g": "1"})
    with pytest.raises(ValueError, match="ipBlock"):
        Fence([_np("ip", "x", {}, ingress=[{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}])]).allows(A, B, 1)
    with pytest.raises(ValueError, match="named port"):
        Fence([_np("np", "x", {}, ingress=[{"ports": [{"port": "http"}]}])]).allows(A, B, 1)


# --- the property: the fence allows exactly what the policy allows ---------------------------------

@dataclass(frozen=True)
class Svc:
    """What the policy says about one rendered service (the oracle's input)."""
    name: str
    data_class: str
    usable: frozenset              # nodes that may see the class and hold its KV, and are up
    driver_node: str
    api_from: tuple


def _usable_by_policy(cluster: Cluster, policy: Policy, dc: str) -> frozenset:
    eff = effective_rules(policy, IntentSpec(data_class=dc))
    return frozenset(n.name for n in cluster.nodes if n.state == "up" and eff.may_see(n) and eff.may_store_kv(n))


def _member(pod: Pod, services: dict):
    """(service, on an allowed node with the right class) for a pod carrying a service's label."""
    s = services.get(pod.labels.get(SERVICE_LABEL))
    if s is None or pod.namespace != NS:
        return None
    return s, pod.labels.get(DATA_CLASS_LABEL) == s.data_class and pod.node in s.usable


def policy_allows(src: Pod, dst: Pod, port: int, proto: str, services: dict) -> bool:
    ms, md = _member(src, services), _member(dst, services)
    same = ms is not None and md is not None and ms[0] is md[0] and ms[1] and md[1]
    if ms is not None:                                                  # what the source may send
        if not ms[1]:
            return False
        if not (same or (dst == DNS and port == 53)):
            return False
    if md is not None:                                                  # what the destination may take
        if not md[1]:
            return False
        s = md[0]
        api = (dst.labels.get(ROLE_LABEL) == "driver" and dst.node == s.driver_node and port == API_PORT
               and proto == "TCP" and src.namespace in s.api_from)
        if not (same or api):
            return False
    return True


def _rendered_pods(r) -> list[Pod]:
    pods = []
    for obj in r.objects:
        if obj["kind"] == "Deployment":
            t = obj["spec"]["template"]
            (term,) = t["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"]
            node = term["matchExpressions"][0]["values"][0]
            pods.append(Pod(obj["metadata"]["name"] + "-pod", obj["metadata"]["namespace"],
                            dict(t["metadata"]["labels"]), node))
    return pods


def _stray_pods(r, cluster: Cluster, svc: str) -> list[Pod]:
    """Pods the fence must keep out or must not touch: copies of the service's pods on every other node
    or with another data class, other pods of its namespace, clients, and DNS."""
    worker = next(p for p in _rendered_pods(r) if p.labels[ROLE_LABEL] == "worker")
    out = [Pod(f"{svc}-copy-{n.name}", NS, {**worker.labels, NODE_LABEL: n.name}, n.name)
           for n in cluster.nodes if n.name not in r.workers]
    out.append(Pod(f"{svc}-other-class", NS, {**worker.labels, DATA_CLASS_LABEL: "other"}, worker.node))
    out.append(Pod(f"{svc}-copy-other-ns", "default", dict(worker.labels), worker.node))
    out += [Pod("neighbour", NS, {"app": "metrics"}), Pod("client", API_NS[0], {"app": "ui"}),
            Pod("stranger", "default", {"app": "ui"}), DNS]
    return out


def check_fence(cluster: Cluster, policy: Policy, renders: list[tuple]) -> int:
    """Render the services [(service, plan, api_from)] into one namespace and compare every pod pair and
    port with the policy; returns the number of pairs checked."""
    services, pods, policies = {}, [], []
    for svc, pl, api_from in renders:
        r = k8s.render(cluster, policy, pl, k8s.RenderOptions(svc, "img:1", namespace=NS, api_from=api_from))
        services[svc] = Svc(svc, pl.data_class, _usable_by_policy(cluster, policy, pl.data_class), r.driver_node,
                            api_from)
        assert set(r.workers) == services[svc].usable                    # a worker on every usable node, no other
        assert {p.node for p in _rendered_pods(r)} <= services[svc].usable
        assert effective_rules(policy, IntentSpec(data_class=pl.data_class)).may_hold_ends(cluster.node(r.driver_node))
        pods += _rendered_pods(r) + _stray_pods(r, cluster, svc)
        policies += r.files["20-network-policies.yaml"]
    fence = Fence(policies, [Namespace(n) for n in (NS, *API_NS, "default", "kube-system")])
    pods = list({p.name + "/" + p.namespace: p for p in pods}.values())
    n = 0
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            for port, proto in PORTS:
                want = policy_allows(src, dst, port, proto, services)
                assert fence.allows(src, dst, port, proto) == want, (src.name, dst.name, port, proto, want)
                n += 1
    return n


def _one_stage(cluster: Cluster, policy: Policy, dc: str) -> PlacementPlan | None:
    """A one-stage plan on a node that may hold the class's ends (the fence does not depend on the plan)."""
    eff = effective_rules(policy, IntentSpec(data_class=dc))
    usable = _usable_by_policy(cluster, policy, dc)
    node = next((n for n in cluster.nodes if n.name in usable and eff.may_hold_ends(n)), None)
    if node is None:
        return None
    return PlacementPlan(model="smollm2-135m", data_class=dc,
                         stages=(Stage(node=node.name, first_layer=0, last_layer=29),))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_fence_matches_the_policy_on_every_scenario(scenario):
    c, pol = load_cluster(scenario / "cluster.yaml"), load_policy(scenario / "policy.yaml")
    renders = []
    for i, dc in enumerate(pol.data_classes):          # every class, side by side in one namespace
        try:
            pl = plan(IntentSpec(data_class=dc, model="smollm2-135m"), c, pol, load_model_spec("smollm2-135m")).plan
        except Infeasible:
            pl = _one_stage(c, pol, dc)
        if pl is not None:
            renders.append((f"s{i}-{dc}"[:40].lower(), pl, API_NS[:1] if i % 2 else ()))
    assert renders
    assert check_fence(c, pol, renders) > 0


_NAMES = [f"n{i}" for i in range(8)]
_JUR = ["eu", "us", "uk"]


@st.composite
def clusters_and_policies(draw):
    k = draw(st.integers(2, 7))
    nodes = [{"name": _NAMES[i], "gpu": draw(st.sampled_from(sorted(GPU_KINDS))),
              "jurisdiction": draw(st.sampled_from(_JUR)), "tier": draw(st.sampled_from(["edge", "cloud"])),
              "trust": draw(st.sampled_from([t.value for t in Trust])),
              "state": draw(st.sampled_from(["up", "up", "up", "draining", "down"]))} for i in range(k)]
    pairs = draw(st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)).filter(lambda t: t[0] < t[1]),
                          unique=True, max_size=4))
    cluster = Cluster.model_validate({"name": "random", "nodes": nodes, "links": {
        "default": {"bandwidth_gbps": 10, "latency_ms": 1, "encrypted": draw(st.booleans())},
        "pairs": [{"between": [_NAMES[a], _NAMES[b]], "bandwidth_gbps": 100, "latency_ms": 0.1,
                   "encrypted": draw(st.booleans())} for a, b in pairs]}})
    classes = {}
    for dc in ("alpha", "beta"):
        juris = draw(st.one_of(st.none(), st.lists(st.sampled_from(_JUR), min_size=1, unique=True)))
        trusts = sorted(Trust, key=lambda t: t.rank)
        lo = draw(st.integers(0, 3))
        classes[dc] = {"allowed_jurisdictions": juris, "min_trust": trusts[lo].value,
                       "trusted_ends": trusts[draw(st.integers(lo, 3))].value,
                       "kv_min_trust": trusts[draw(st.integers(lo, 3))].value,
                       "encrypt_cross_boundary": draw(st.booleans())}
    return cluster, Policy.model_validate({"name": "random", "data_classes": classes}), draw(st.booleans())


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(clusters_and_policies())
def test_fence_matches_the_policy_on_random_clusters(drawn):
    cluster, policy, api = drawn
    renders = [(f"svc-{dc}", pl, API_NS if api else ()) for dc in policy.data_classes
               if (pl := _one_stage(cluster, policy, dc)) is not None]
    assume(renders)
    check_fence(cluster, policy, renders)
    # the hops flagged are exactly those the class wants encrypted and the cluster leaves in the clear
    for svc, pl, _ in renders:
        r = k8s.render(cluster, policy, pl, k8s.RenderOptions(svc, "img:1", namespace=NS))
        eff = effective_rules(policy, IntentSpec(data_class=pl.data_class))
        nodes = [cluster.node(n) for n in r.workers]
        want = {frozenset((a.name, b.name)) for i, a in enumerate(nodes) for b in nodes[i + 1:]
                if eff.encrypt_cross_boundary and (a.trust != b.trust or a.jurisdiction != b.jurisdiction)
                and not (cluster.link(a.name, b.name) and cluster.link(a.name, b.name).encrypted)}
        got = {frozenset(f.split(":")[0].split(" <-> ")) for f in r.flags}
        assert got == want


# --- the admission policy that makes the fence's labels true --------------------------------------

class Admission:
    """The rendered ValidatingAdmissionPolicy, its CEL run by cel-python as the API server runs it."""

    def __init__(self, vap: dict):
        import celpy
        self.celpy, self.spec = celpy, vap["spec"]
        env = celpy.Environment()
        self.checks = [env.program(env.compile(v["expression"])) for v in self.spec["validations"]]

    def admits(self, pod: dict, namespace: str) -> bool | None:
        """True / False for a pod the policy matches, None for one it does not look at."""
        mc = self.spec["matchConstraints"]
        if not (k8s.selects(mc["namespaceSelector"], Namespace(namespace).all_labels)
                and k8s.selects(mc["objectSelector"], pod["metadata"].get("labels") or {})):
            return None
        obj = self.celpy.json_to_cel(pod)
        return all(bool(c.evaluate({"object": obj})) for c in self.checks)


def _pod_objects(r) -> list[dict]:
    return [copy.deepcopy(o["spec"]["template"])
            for o in r.objects if o["kind"] == "Deployment"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_admission_admits_the_rendered_pods_and_refuses_misplaced_copies(scenario):
    c, pol = load_cluster(scenario / "cluster.yaml"), load_policy(scenario / "policy.yaml")
    dc = next(d for d in pol.data_classes if _one_stage(c, pol, d) is not None)
    r = k8s.render(c, pol, _one_stage(c, pol, dc), k8s.RenderOptions("svc", "img:1", namespace=NS))
    vap, binding = r.files[ADMISSION_FILE]
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    adm = Admission(vap)
    others = [n.name for n in c.nodes if n.name not in r.workers]
    for pod in _pod_objects(r):
        assert adm.admits(pod, NS) is True
        assert adm.admits(pod, "default") is None                       # another namespace: not this service's
        node = pod["metadata"]["labels"][NODE_LABEL]
        terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        for target in others + [w for w in r.workers if w != node][:1]:
            moved = copy.deepcopy(pod)                                   # the label follows the node: still refused
            moved["metadata"]["labels"][NODE_LABEL] = target
            moved["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"][0]["matchExpressions"][0]["values"] = [target]
            assert adm.admits(moved, NS) is (target in r.workers)       # a usable node is allowed, another not
            lying = copy.deepcopy(pod)                                  # the label stays, the pod goes elsewhere
            lying["spec"]["nodeName"] = target
            assert adm.admits(lying, NS) is False
            wider = copy.deepcopy(pod)                                  # a second term lets it schedule elsewhere
            wider["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"].append({"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [target]}]})
            assert adm.admits(wider, NS) is False
            relabel = copy.deepcopy(pod)
            relabel["metadata"]["labels"][NODE_LABEL] = target
            assert adm.admits(relabel, NS) is False
        loose = copy.deepcopy(pod)
        del loose["spec"]["affinity"]
        assert adm.admits(loose, NS) is False
        other_class = copy.deepcopy(pod)
        other_class["metadata"]["labels"][DATA_CLASS_LABEL] = "public-but-not"
        assert adm.admits(other_class, NS) is False
        assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == [node]
    unlabelled = copy.deepcopy(_pod_objects(r)[0])
    del unlabelled["metadata"]["labels"][SERVICE_LABEL]
    assert adm.admits(unlabelled, NS) is None
