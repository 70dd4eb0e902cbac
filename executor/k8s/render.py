"""One service's Kubernetes manifests: a worker per node its data class may use, the driver + OpenAI
API on a node allowed raw tokens, and NetworkPolicies that fence the network to what the policy allows.

    r = render(cluster, policy, plan, RenderOptions(service="clinical", image="registry/continuo:0.1"))
    write(r, "deploy/")          # NN-*.yaml for `kubectl apply -f deploy/`, and deploy/continuo/*.yaml

What the service may use is the policy's, not the plan's: every up node that may see the data class
and hold its KV cache (`usable_nodes`). Each gets a one-replica worker, pinned by required node
affinity on kubernetes.io/hostname, whether the plan gives it layers or not: idle workers are where
a live reconfiguration moves layers to, without creating pods. The driver waits for exactly these
workers, so it is handed the cluster restricted to them (`service_cluster`), and the plan stamped
with that cluster's fingerprint.

The fence (NetworkPolicies in the service's namespace):
  <svc>-default-deny   every pod labelled with the service: no ingress, no egress
  <svc>-mesh           the service's pods on its usable nodes (labels: service, data class, node In
                       the usable set) reach each other on any port (gloo connects every pair of
                       ranks at start; NCCL and the rendezvous use ports of their own), and DNS
  <svc>-api            the driver's API port, from the namespaces the operator names (none: reach it
                       with kubectl port-forward, which NetworkPolicies do not see)
A pod carrying the service's label on any other node, or claiming another data class, is selected by
the default deny only: it can reach nothing and nothing reaches it. NetworkPolicies see labels, not
nodes: the ValidatingAdmissionPolicy in admission/ (cluster-scoped) refuses a pod of the service whose
node label is not a usable node or not the node its required affinity pins it to.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from policies import Cluster, InputError, IntentSpec, Node, PlacementPlan, Policy, UnknownDataClass, effective_rules

from .fence import NAMESPACE_NAME_LABEL
from .inventory import HOSTNAME, cluster_yaml, write_atomic

SERVICE_LABEL, DATA_CLASS_LABEL = "continuo.io/service", "continuo.io/data-class"
NODE_LABEL, ROLE_LABEL = "continuo.io/node", "continuo.io/role"
API_PORT, RENDEZVOUS_PORT = 8000, 29500
ADMISSION_FILE = "admission/placement.yaml"     # cluster-scoped; a subfolder, which `kubectl apply -f DIR` skips
CONFIG_DIR, TOKEN_DIR = "/etc/continuo", "/var/run/secrets/continuo"
DNS_PEER = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_SERVICE_NAME = 40          # leaves room for "-rendezvous" and "-worker-..." within 63


@dataclass(frozen=True)
class RenderOptions:
    """Where and how the service runs; `api_from`: namespaces whose pods may call the API."""
    service: str
    image: str
    namespace: str = "continuo"
    api_from: tuple[str, ...] = ()
    weights: str | None = None          # path every pod can read; None: the image's embedded SmolLM2
    secret: str | None = None           # default: <service>-tokens

    @property
    def secret_name(self) -> str:
        return self.secret or f"{self.service}-tokens"


@dataclass
class Rendering:
    """The manifests by file, the files the driver reads, and what the operator should know."""
    files: dict[str, list[dict]]
    config: dict[str, str]              # cluster.yaml, policy.yaml, plan.yaml as the driver reads them
    cluster: Cluster                    # the service's cluster (usable nodes only)
    plan: PlacementPlan                 # stamped with that cluster's fingerprint
    driver_node: str
    workers: list[str]
    skipped: dict[str, str]             # node -> why it has no worker
    flags: list[str] = field(default_factory=list)   # hops the policy wants encrypted that are not

    @property
    def objects(self) -> list[dict]:
        return [o for docs in self.files.values() for o in docs]

    def secret_command(self, opts: RenderOptions) -> str:
        gen = "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        return (f"kubectl -n {opts.namespace} create secret generic {opts.secret_name} "
                + " ".join(f"--from-literal={k}={gen}" for k in ("join-token", "api-key", "admin-token")))


def usable_nodes(cluster: Cluster, policy: Policy, data_class: str) -> tuple[list[Node], dict[str, str]]:
    """Up nodes that may see the class and hold its KV cache (by the policy alone), and why the rest may not."""
    try:
        eff = effective_rules(policy, IntentSpec(data_class=data_class))
    except UnknownDataClass as e:
        raise InputError(str(e), field="data_class") from None
    ok, why = [], {}
    for n in cluster.nodes:
        if not eff.may_see(n):
            why[n.name] = f"may not see {data_class} ({n.jurisdiction}, {n.trust.value})"
        elif not eff.may_store_kv(n):
            why[n.name] = f"may not hold the KV cache of {data_class}"
        elif n.state != "up":
            why[n.name] = f"{n.state}: a pod pinned there would not start; render again once it is up"
        else:
            ok.append(n)
    return ok, why


def service_cluster(cluster: Cluster, nodes: list[Node]) -> Cluster:
    """The cluster restricted to `nodes`: what the driver waits for and plans are checked against."""
    names = {n.name for n in nodes}
    pairs = tuple(p for p in cluster.links.pairs if set(p.between) <= names)
    links = cluster.links.model_copy(update={"pairs": pairs})
    return cluster.model_copy(update={"nodes": tuple(nodes), "links": links})


def _crosses_boundary(a: Node, b: Node) -> bool:
    """As the validator's link-encryption rule: a change of trust or jurisdiction."""
    return a.trust != b.trust or a.jurisdiction != b.jurisdiction


def _object_name(*parts: str) -> str:
    """A DNS-1123 label from parts; a hash keeps names apart that had to be changed or cut."""
    raw = "-".join(parts)
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    if name != raw or len(name) > 63:
        name = name[:56].rstrip("-") + "-" + hashlib.sha256(raw.encode()).hexdigest()[:6]
    return name


def _check_names(opts: RenderOptions, data_class: str, nodes: list[Node]) -> None:
    for flag, value in (("--service", opts.service), ("--namespace", opts.namespace)):
        if not _DNS_LABEL.match(value) or len(value) > (MAX_SERVICE_NAME if flag == "--service" else 63):
            most = MAX_SERVICE_NAME if flag == "--service" else 63
            raise InputError(f"'{value}' is not a Kubernetes name: lower-case letters, digits and '-', starting and "
                             f"ending with a letter or digit, at most {most} characters", field=flag)
    for ns in opts.api_from:
        if not _DNS_LABEL.match(ns) or len(ns) > 63:
            raise InputError(f"'{ns}' is not a namespace name", field="--api-from")
    for what, value in [("data class", data_class)] + [("node name", n.name) for n in nodes]:
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise InputError(f"{what} '{value}' cannot be a Kubernetes label value (at most 63 letters, digits, "
                             "'-', '_' or '.', starting and ending with a letter or digit)", field=what)


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):     # libyaml when PyYAML has it: 10x faster
    """No &anchors / *aliases for dicts shared between objects: every manifest reads on its own."""
    def ignore_aliases(self, data):
        return True


def _yaml(obj) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def render(cluster: Cluster, policy: Policy, plan: PlacementPlan, opts: RenderOptions) -> Rendering:
    """The manifests for one service serving `plan` (checked by the validator beforehand: see the CLI)."""
    dc, svc, ns = plan.data_class, opts.service, opts.namespace
    nodes, skipped = usable_nodes(cluster, policy, dc)      # raises for a class the policy lacks
    eff = effective_rules(policy, IntentSpec(data_class=dc))
    _check_names(opts, dc, nodes)
    usable = {n.name for n in nodes}
    for st in plan.stages:
        if st.node not in usable:
            raise InputError(f"the plan puts layers {st.first_layer}-{st.last_layer} on {st.node}, which the service "
                             f"cannot use: {skipped.get(st.node, 'not in the cluster')}", field="stages")
    first = cluster.node(plan.stages[0].node)
    ends = [first] + [n for n in nodes if n is not first]
    driver = next((n for n in ends if eff.may_hold_ends(n)), None)
    if driver is None:
        raise InputError(f"no usable node may see raw tokens of {dc} (trust {eff.ends_trust.value} or higher): "
                         "the driver, which tokenizes and samples, has nowhere to run", field="data_class")
    sub = service_cluster(cluster, nodes)
    stamped = plan.model_copy(update={"cluster_fingerprint": sub.fingerprint()})
    config = {
        "cluster.yaml": cluster_yaml(sub, f"{cluster.name}: the nodes service {svc} ({dc}) may use, as its driver sees "
                                          "them;\nplan and apply against this file (continuo apply --cluster ...)"),
        "policy.yaml": _yaml(policy.model_dump(mode="json", exclude_defaults=True)),
        "plan.yaml": _yaml(stamped.model_dump(mode="json", exclude_none=True)),
    }
    flags = []
    if eff.encrypt_cross_boundary:
        for a, b in itertools.combinations(nodes, 2):
            link = sub.link(a.name, b.name)
            if _crosses_boundary(a, b) and not (link and link.encrypted):
                flags.append(f"{a.name} <-> {b.name}: {dc} must be encrypted across a trust/jurisdiction boundary "
                             f"({a.trust.value}/{a.jurisdiction} vs {b.trust.value}/{b.jurisdiction}), and the "
                             f"cluster {'has no link' if link is None else 'offers no encryption'} here; plans "
                             "will not route the class over it. Encrypt the pod network between them (e.g. "
                             "WireGuard in the CNI) and mark the link encrypted in the links overlay")

    base = {"app.kubernetes.io/name": "continuo", "app.kubernetes.io/instance": svc, SERVICE_LABEL: svc,
            DATA_CLASS_LABEL: dc}

    def labels(role: str, node: str) -> dict:
        return {**base, "app.kubernetes.io/component": role, ROLE_LABEL: role, NODE_LABEL: node}

    def meta(name: str, lab: dict | None = None, **extra) -> dict:
        return {"name": name, "namespace": ns, "labels": lab or base, **extra}

    members = {"matchLabels": {SERVICE_LABEL: svc, DATA_CLASS_LABEL: dc},
               "matchExpressions": [{"key": NODE_LABEL, "operator": "In", "values": sorted(usable)}]}

    def netpol(name: str, selector: dict, types: list[str], **rules) -> dict:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(f"{svc}-{name}"),
                "spec": {"podSelector": selector, "policyTypes": types, **rules}}

    fence = [
        netpol("default-deny", {"matchLabels": {SERVICE_LABEL: svc}}, ["Ingress", "Egress"]),
        netpol("mesh", members, ["Ingress", "Egress"], ingress=[{"from": [{"podSelector": members}]}],
               egress=[{"to": [{"podSelector": members}]}, {"to": [DNS_PEER], "ports": DNS_PORTS}]),
    ]
    if flags:
        hops = "; ".join(f.split(":")[0] for f in flags)
        fence[1]["metadata"]["annotations"] = {"continuo.io/unencrypted-hops": hops}
    if opts.api_from:
        fence.append(netpol("api", {"matchLabels": labels("driver", driver.name)}, ["Ingress"], ingress=[{
            "from": [{"namespaceSelector": {"matchExpressions": [
                {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": sorted(set(opts.api_from))}]}}],
            "ports": [{"protocol": "TCP", "port": API_PORT}]}]))

    def pod_spec(node: Node, container: dict, volumes: list[dict], gpu: bool) -> dict:
        spec = {"automountServiceAccountToken": False, "enableServiceLinks": False,
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": HOSTNAME, "operator": "In", "values": [node.name]}]}]}}},
                "containers": [container], "volumes": volumes}
        if gpu:     # GPU node pools are commonly tainted so that only pods asking for GPUs land there
            spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        return spec

    def deployment(name: str, lab: dict, spec: dict, annotations: dict | None = None) -> dict:
        tmeta = {"labels": lab, **({"annotations": annotations} if annotations else {})}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(name, lab),
                # Recreate: never two pods of one node at once (both would join as that node)
                "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                         "selector": {"matchLabels": {k: lab[k] for k in (SERVICE_LABEL, ROLE_LABEL, NODE_LABEL)}},
                         "template": {"metadata": tmeta, "spec": spec}}}

    weights = ["--weights", opts.weights] if opts.weights else []
    token_volume = {"name": "join-token", "secret": {"secretName": opts.secret_name, "defaultMode": 0o400,
                                                     "items": [{"key": "join-token", "path": "join-token"}]}}
    workers = []
    for n in nodes:
        gpu = n.gpu != "CPU"
        resources = {"limits": {"nvidia.com/gpu": n.gpus}} if gpu else \
            {"requests": {"memory": f"{n.total_memory_gb:g}Gi"}}
        container = {"name": "worker", "image": opts.image, "command": ["continuo", "worker"],
                     "args": ["--join", f"{svc}-rendezvous.{ns}.svc:{RENDEZVOUS_PORT}", "--node", n.name,
                              "--join-token-file", f"{TOKEN_DIR}/join-token", "--device", "auto" if gpu else "cpu"],
                     "resources": resources,
                     "volumeMounts": [{"name": "join-token", "mountPath": TOKEN_DIR, "readOnly": True}]}
        workers.append(deployment(_object_name(svc, "worker", n.name), labels("worker", n.name),
                                  pod_spec(n, container, [token_volume], gpu)))

    def secret_env(var: str, key: str) -> dict:
        return {"name": var, "valueFrom": {"secretKeyRef": {"name": opts.secret_name, "key": key}}}

    probe = {"httpGet": {"path": "/health", "port": "api"}}
    driver_container = {
        "name": "driver", "image": opts.image, "command": ["continuo", "serve"],
        "args": ["--cluster", f"{CONFIG_DIR}/cluster.yaml", "--policy", f"{CONFIG_DIR}/policy.yaml",
                 "--plan", f"{CONFIG_DIR}/plan.yaml", *weights, "--host", "0.0.0.0", "--port", str(API_PORT),
                 "--join", f"$(POD_IP):{RENDEZVOUS_PORT}"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                secret_env("CONTINUO_JOIN_TOKEN", "join-token"), secret_env("CONTINUO_API_KEY", "api-key"),
                secret_env("CONTINUO_ADMIN_TOKEN", "admin-token")],
        "ports": [{"name": "api", "containerPort": API_PORT}, {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        # the API listens only once every worker has joined and loaded its stage: allow 15 minutes for that
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 90},
        "readinessProbe": {**probe, "periodSeconds": 10},
        # degraded (a worker died) is 503: restart, and the workers join the new driver
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 3},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]}
    digest = hashlib.sha256("".join(config[k] for k in sorted(config)).encode()).hexdigest()
    driver_dep = deployment(_object_name(svc, "driver"), labels("driver", driver.name),
                            pod_spec(driver, driver_container,
                                     [{"name": "config", "configMap": {"name": f"{svc}-config"}}], False),
                            # a new config changes the template, so `kubectl apply` restarts the driver
                            {"continuo.io/config-sha256": digest, "continuo.io/plan": stamped.summary()})
    driver_sel = {SERVICE_LABEL: svc, ROLE_LABEL: "driver"}
    services = [
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(f"{svc}-api"),
         "spec": {"selector": driver_sel, "ports": [{"name": "api", "port": API_PORT, "targetPort": "api"}]}},
        # headless, and published before the driver is ready: it is ready only after the workers joined it
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(f"{svc}-rendezvous"),
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": driver_sel,
                  "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": "rendezvous"}]}},
    ]
    files = {
        ADMISSION_FILE: placement_admission(svc, ns, dc, sorted(usable)),     # first: it must hold before any pod
        "00-namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}],
        "10-config.yaml": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{svc}-config"),
                            "data": config}],
        "20-network-policies.yaml": fence,       # before any pod starts
        "30-services.yaml": services,
        "40-driver.yaml": [driver_dep],
        "50-workers.yaml": workers,
    }
    return Rendering(files, config, sub, stamped, driver.name, [n.name for n in nodes], skipped, flags)


def placement_admission(svc: str, ns: str, data_class: str, nodes: list[str]) -> list[dict]:
    """A ValidatingAdmissionPolicy (GA in 1.30) and its binding: in the namespace, a pod carrying the
    service's label must claim the service's data class and a usable node, and be pinned by required
    node affinity (and any nodeName) to exactly the node it claims. The fence selects pods by those
    labels; this makes the labels true. Cluster-scoped: a cluster admin applies it, before the rest."""
    name = _object_name("continuo", ns, svc, "placement")
    labels = "object.metadata.labels"
    usable = ", ".join(f"'{n}'" for n in nodes)        # label values: no quote can occur in them
    claims = (f"has(object.metadata.labels) && '{NODE_LABEL}' in {labels} && '{DATA_CLASS_LABEL}' in {labels} && "
              f"{labels}['{DATA_CLASS_LABEL}'] == '{data_class}' && {labels}['{NODE_LABEL}'] in [{usable}]")
    node = f"{labels}['{NODE_LABEL}']"
    required = "object.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    pinned = (f"(!has(object.spec.nodeName) || object.spec.nodeName == {node}) && has(object.spec.affinity) && "
              f"has(object.spec.affinity.nodeAffinity) && has({required}) && {required}.nodeSelectorTerms.all(t, "
              f"has(t.matchExpressions) && t.matchExpressions.exists(e, e.key == '{HOSTNAME}' && e.operator == 'In' "
              f"&& e.values == [{node}]))")
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": name, "labels": {SERVICE_LABEL: svc}},
              "spec": {"failurePolicy": "Fail",
                       "matchConstraints": {
                           "resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                              "operations": ["CREATE", "UPDATE"], "resources": ["pods"]}],
                           "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}},
                           "objectSelector": {"matchLabels": {SERVICE_LABEL: svc}}},
                       "validations": [
                           {"expression": claims, "reason": "Forbidden",
                            "message": f"a pod of service {svc} carries data class {data_class} and the node it runs "
                                       f"on ({NODE_LABEL}), one of {', '.join(nodes)}"},
                           {"expression": pinned, "reason": "Forbidden",
                            "message": f"a pod of service {svc} is pinned by required node affinity on {HOSTNAME} to "
                                       f"exactly the node its {NODE_LABEL} label names"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name, "labels": {SERVICE_LABEL: svc}},
               "spec": {"policyName": name, "validationActions": ["Deny"]}}
    return [policy, binding]


def manifests_yaml(docs: list[dict]) -> str:
    return "---\n".join(_yaml(d) for d in docs)


def write(r: Rendering, out: str | Path) -> list[Path]:
    """NN-*.yaml manifests in `out` (for `kubectl apply -f out`), out/admission/ with the cluster-scoped
    placement check, and out/continuo/ with the driver's cluster, policy and plan files (subfolders:
    kubectl apply without -R does not read them)."""
    out = Path(out)
    (out / "continuo").mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in r.files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out / name, manifests_yaml(docs))
        written.append(out / name)
    for name, text in r.config.items():
        write_atomic(out / "continuo" / name, text)
        written.append(out / "continuo" / name)
    return written
