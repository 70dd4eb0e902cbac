"""continuo k8s: inventory from node lists (round trip on every scenario, missing labels, --context
through the real client against a loopback API server), and rendering every scenario into manifests
that pass the Kubernetes 1.30+ schemas strictly, offline."""
import functools
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent.planner import Infeasible, plan
from executor import k8s
from executor.k8s.inventory import GFD_PRODUCT, JURISDICTION, TIER, TRUST, gpu_kind, quantity
from executor.k8s.render import ADMISSION_FILE, NODE_LABEL, SERVICE_LABEL
from policies import (Cluster, InputError, IntentSpec, load_cluster, load_intent_spec, load_model_spec, load_plan,
                      load_policy, validate)
from tiny_service import run_cli

SCENARIOS = sorted(p.parent for p in Path("scenarios").glob("*/cluster.yaml") if (p.parent / "policy.yaml").exists())
IMAGE = "registry.example/continuo:0.1"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _intents(scenario: Path) -> list[IntentSpec]:
    """The scenario's structured intents, and a plain one per data class of its policy."""
    pol = load_policy(scenario / "policy.yaml")
    out = [load_intent_spec(p) for p in sorted((scenario / "intents").glob("*.yaml"))]
    return out + [IntentSpec(data_class=dc, model="smollm2-135m") for dc in pol.data_classes]


def _plan_or_reasons(intent, cluster, policy):
    try:
        p = plan(intent, cluster, policy, load_model_spec(intent.model or "smollm2-135m"))
        return p.plan.stages, p.plan.estimates, p.score
    except Infeasible as e:
        return "infeasible", tuple(e.reasons)


def _normal(c: Cluster) -> dict:
    """The cluster as planning sees it: a node's memory is the kind's when the file leaves it out."""
    d = c.model_dump(mode="json")
    for n, node in zip(d["nodes"], c.nodes):
        n["memory_gb"] = node.memory_gb or node.kind.memory_gb
    del d["name"]
    return d


def _overlay(c: Cluster) -> dict:
    return {"name": c.name, "links": c.links.model_dump(mode="json")}


# --- inventory --------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_inventory_round_trips_every_scenario(scenario, tmp_path, capsys, monkeypatch):
    c, pol = load_cluster(scenario / "cluster.yaml"), load_policy(scenario / "policy.yaml")
    (tmp_path / "nodes.json").write_text(json.dumps(k8s.node_list(c)))
    (tmp_path / "links.yaml").write_text(yaml.safe_dump(_overlay(c)))
    rc, out, err = run_cli(capsys, monkeypatch, "k8s", "inventory", "--from", tmp_path / "nodes.json",
                           "--links", tmp_path / "links.yaml", "-o", tmp_path / "cluster.yaml")
    assert rc == 0, err
    back = load_cluster(tmp_path / "cluster.yaml")           # the file it wrote loads ...
    assert back.name == c.name and _normal(back) == _normal(c)
    for intent in _intents(scenario):                        # ... and plans the same
        assert _plan_or_reasons(intent, back, pol) == _plan_or_reasons(intent, c, pol), intent


def test_inventory_reads_feature_discovery_labels_and_states():
    nodes = k8s.node_list(load_cluster("scenarios/hospital/cluster.yaml"))["items"]
    h100 = next(n for n in nodes if n["metadata"]["name"] == "fra-h100-1")
    h100["metadata"]["labels"].update({GFD_PRODUCT: "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8",
                                       "nvidia.com/gpu.memory": "81559"})
    h100["spec"] = {"unschedulable": True}                   # cordoned
    a100 = next(n for n in nodes if n["metadata"]["name"] == "iad-a100-1")
    a100["metadata"]["labels"][GFD_PRODUCT] = "NVIDIA-A100-SXM4-40GB-SHARED"   # time-sliced: the same GPU
    a100["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]
    del a100["metadata"]["labels"]["nvidia.com/gpu.memory"]
    plain = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "control-plane", "labels": {}},
             "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    inv = k8s.inventory(nodes + [plain])
    assert not inv.problems and inv.skipped == ["control-plane"]
    n = inv.cluster.node("fra-h100-1")
    assert (n.gpu, n.gpus, n.memory_gb, n.state) == ("H100", 8, 79.65, "draining")
    m = inv.cluster.node("iad-a100-1")
    assert (m.gpu, m.memory_gb, m.state) == ("A100-40GB", None, "down")
    assert inv.cluster.link("ward-a-edge", "iad-a100-2").bandwidth_gbps == 10     # no overlay: the default


def test_quantities_and_products():
    assert quantity("16303412Ki") == 16303412 * 1024
    assert quantity("500m") == 0.5 and quantity("4Gi") == 4 * 2 ** 30
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity("4 GB")
    kind = gpu_kind
    assert [kind(p) for p in ("NVIDIA-L4", "NVIDIA-L40S", "Tesla-T4", "NVIDIA-A100-PCIE-80GB", "NVIDIA-H200-NVL",
                              "NVIDIA-GeForce-RTX-4090", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "Tesla-V100-SXM2-16GB")] \
        == ["L4", "L40S", "T4", "A100-80GB", "H200", "RTX4090", None, None]


def test_missing_labels_report_every_node_and_label_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch):
    nodes = k8s.node_list(load_cluster("scenarios/hospital/cluster.yaml"))
    labels = {n["metadata"]["name"]: n["metadata"]["labels"] for n in nodes["items"]}
    del labels["ward-a-edge"][TRUST]
    del labels["ward-b-edge"][TIER], labels["ward-b-edge"][JURISDICTION]
    labels["fra-a100-1"][TRUST] = "trusted"                                   # not a trust level
    del labels["fra-h100-1"][GFD_PRODUCT]                                     # no feature discovery there
    labels["iad-a100-1"][GFD_PRODUCT] = "Tesla-V100-SXM2-16GB"               # a GPU Continuo has no figures for
    (tmp_path / "nodes.json").write_text(json.dumps(nodes))
    out = tmp_path / "cluster.yaml"
    out.write_text("previous file\n")
    rc, stdout, err = run_cli(capsys, monkeypatch, "k8s", "inventory", "--from", tmp_path / "nodes.json", "-o", out)
    assert rc == 2 and stdout == ""
    assert out.read_text() == "previous file\n"                               # nothing written, not even in part
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cluster.yaml")]
    err = " ".join(err.split())
    for node, label in [("ward-a-edge", TRUST), ("ward-b-edge", TIER), ("ward-b-edge", JURISDICTION),
                        ("fra-a100-1", TRUST), ("fra-h100-1", "continuo.io/gpu"), ("iad-a100-1", "continuo.io/gpu")]:
        assert f"{node}: {label}" in err, (node, label)
    assert "5 node(s) lack labels" in err and "'trusted' is not valid" in err and "Tesla-V100-SXM2-16GB" in err
    assert f"kubectl label node ward-a-edge {TRUST}=TRUST" in err
    assert f"kubectl label node ward-b-edge {JURISDICTION}=JURISDICTION {TIER}=TIER" in err
    assert f"kubectl label node fra-a100-1 {TRUST}=TRUST --overwrite" in err
    assert "kubectl label node fra-h100-1 continuo.io/gpu=GPU" in err
    assert "ward-c-edge" not in err                                           # its labels are all there


def test_label_commands_make_inventory_read_the_cluster_back():
    c = load_cluster("scenarios/retail/cluster.yaml")
    items = k8s.node_list(c)["items"]
    for item, cmd in zip(items, k8s.label_commands(c)):          # nodes with GPU discovery only, then labelled
        item["metadata"]["labels"] = {k: v for k, v in item["metadata"]["labels"].items()
                                      if not k.startswith(("continuo.io/", "tag.continuo.io/"))}
        for kv in cmd.split()[4:-1]:
            k, v = kv.split("=")
            item["metadata"]["labels"][k] = v
    assert _normal(k8s.inventory(items, k8s.Overlay.model_validate(_overlay(c))).cluster) == _normal(c)


def test_bad_node_lists_and_overlays_name_the_file(tmp_path):
    bad = tmp_path / "nodes.json"
    bad.write_text(json.dumps({"kind": "PodList", "items": "no"}))
    with pytest.raises(InputError, match="nodes.json.*kubectl get nodes -o json"):
        k8s.load_node_list(bad)
    bad.write_text(json.dumps({"kind": "NodeList", "items": [{"kind": "Node", "metadata": {}}]}))
    with pytest.raises(InputError, match=r"items\[0\].metadata.name"):
        k8s.load_node_list(bad)
    ov = tmp_path / "links.yaml"
    ov.write_text("links:\n  pairs:\n    - {between: [ward-a-edge, nowhere], bandwidth_gbps: 1, latency_ms: 1}\n")
    nodes = k8s.node_list(load_cluster("scenarios/hospital/cluster.yaml"))["items"]
    with pytest.raises(InputError, match="links.yaml.*unknown node 'nowhere'"):
        k8s.inventory(nodes, k8s.load_overlay(ov), overlay_file=str(ov))
    ov.write_text("links:\n  default: {bandwidth_gbps: -1, latency_ms: 1}\n")
    with pytest.raises(InputError, match=r"links.yaml:2: links.default.bandwidth_gbps"):
        k8s.load_overlay(ov)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FakeAPI(BaseHTTPRequestHandler):
    body: bytes = b""
    seen: list = []

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        ok = self.path.startswith("/api/v1/nodes")
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body if ok else b"{}")

    def log_message(self, *a):
        pass


def test_context_lists_nodes_through_the_kubernetes_client(tmp_path, capsys, monkeypatch):
    c = load_cluster("scenarios/local/cluster.yaml")
    _FakeAPI.body, _FakeAPI.seen = json.dumps({"kind": "NodeList", "apiVersion": "v1", **k8s.node_list(c)}).encode(), []
    srv = HTTPServer(("127.0.0.1", 0), _FakeAPI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "other",
            "clusters": [{"name": "edge", "cluster": {"server": f"http://127.0.0.1:{srv.server_port}"}},
                         {"name": "gone", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
            "users": [{"name": "ops", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "edge-ctx", "context": {"cluster": "edge", "user": "ops"}},
                         {"name": "down", "context": {"cluster": "gone", "user": "ops"}},
                         {"name": "other", "context": {"cluster": "nowhere", "user": "ops"}}]}))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        rc, out, err = run_cli(capsys, monkeypatch, "k8s", "inventory", "--context", "edge-ctx")
        assert rc == 0, err
        assert _FakeAPI.seen[0][0].startswith("/api/v1/nodes") and _FakeAPI.seen[0][1] == "Bearer t0ken"
        (tmp_path / "c.yaml").write_text(out)
        back = load_cluster(tmp_path / "c.yaml")
        assert back.name == "edge-ctx" and [n.model_dump() for n in back.nodes] == [n.model_dump() for n in c.nodes]
        rc, _, err = run_cli(capsys, monkeypatch, "k8s", "inventory", "--context", "missing-ctx")
        assert rc == 2 and "--context" in err and "missing-ctx" in err
        rc, _, err = run_cli(capsys, monkeypatch, "k8s", "inventory", "--context", "down")
        assert rc == 2 and "listing nodes of context down failed" in " ".join(err.split())
    finally:
        srv.shutdown()


def test_context_without_the_client_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)           # as if not installed
    rc, _, err = run_cli(capsys, monkeypatch, "k8s", "inventory", "--context", "prod")
    assert rc == 2 and "pip install 'continuo[k8s]'" in " ".join(err.split())


# --- render -------------------------------------------------------------------------------------

def _scenario_plans(scenario: Path):
    """Every plan a scenario offers to start a service with: its plan files and what its intents plan to."""
    c, pol = load_cluster(scenario / "cluster.yaml"), load_policy(scenario / "policy.yaml")
    plans = [load_plan(p) for p in sorted(scenario.glob("plan*.yaml"))]
    for intent in _intents(scenario):
        try:
            plans.append(plan(intent, c, pol, load_model_spec(intent.model or "smollm2-135m")).plan)
        except Infeasible:
            pass
    return c, pol, plans


SCHEMA_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
# validate() reads and parses the schema files (megabytes of JSON) on every call: read each once
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)


def test_the_shipped_schemas_cover_1_30_and_later_offline():
    versions = kubernetes_validate.utils.all_versions()
    assert "1.30.0" in versions and versions[-1] >= "1.30"
    assert kubernetes_validate.validate({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
                                        "1.30.0", strict=True) == "1.30"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_every_scenario_renders_and_validates_strictly(scenario, tmp_path):
    c, pol, plans = _scenario_plans(scenario)
    assert plans, f"{scenario}: no plan renders"
    for i, pl in enumerate(plans):
        opts = k8s.RenderOptions(service=f"svc{i}", image=IMAGE, namespace="inference", api_from=("clients",),
                                 weights=None if pl.model == "smollm2-135m" else f"/models/{pl.model}")
        r = k8s.render(c, pol, pl, opts)
        m = load_model_spec(pl.model)
        assert validate(r.plan, r.cluster, pol, None, m).ok          # what the driver checks at start
        for obj in r.objects:
            for v in SCHEMA_VERSIONS:
                kubernetes_validate.validate(obj, v, strict=True)
        if i == 0:
            k8s.write(r, tmp_path)
            files = [tmp_path / ADMISSION_FILE, *sorted(tmp_path.glob("*.yaml"))]
            back = [d for f in files for d in yaml.load_all(f.read_text(), Loader=LOADER)]
            assert back == r.objects
            assert load_cluster(tmp_path / "continuo" / "cluster.yaml") == r.cluster
            assert load_plan(tmp_path / "continuo" / "plan.yaml") == r.plan
            assert load_policy(tmp_path / "continuo" / "policy.yaml") == pol
        usable, _ = k8s.usable_nodes(c, pol, pl.data_class)
        workers = [o for o in r.files["50-workers.yaml"]]
        assert sorted(_pinned(w) for w in workers) == sorted(n.name for n in usable)
        assert set(pl.nodes) <= {_pinned(w) for w in workers}


def _pinned(deployment: dict) -> str:
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expr,) = term["matchExpressions"]
    assert expr["key"] == "kubernetes.io/hostname" and expr["operator"] == "In"
    (node,) = expr["values"]
    assert deployment["spec"]["template"]["metadata"]["labels"][NODE_LABEL] == node
    return node


def test_strict_validation_catches_a_wrong_field():
    c, pol = load_cluster("scenarios/local/cluster.yaml"), load_policy("scenarios/local/policy.yaml")
    r = k8s.render(c, pol, load_plan("scenarios/local/plan-2stage.yaml"), k8s.RenderOptions("demo", IMAGE))
    dep = json.loads(json.dumps(r.files["50-workers.yaml"][0]))
    dep["spec"]["template"]["spec"]["containers"][0]["gpuLimit"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="gpuLimit"):
        kubernetes_validate.validate(dep, "1.30.0", strict=True)


def test_render_wires_the_worker_and_serve_command_lines():
    c, pol = load_cluster("scenarios/hospital/cluster.yaml"), load_policy("scenarios/hospital/policy.yaml")
    pl = plan(load_intent_spec("scenarios/hospital/intents/phi-70b-split.yaml"), c, pol,
              load_model_spec("llama-3-70b")).plan
    r = k8s.render(c, pol, pl, k8s.RenderOptions("clinical", IMAGE, weights="/models/llama-3-70b"))
    (driver,) = r.files["40-driver.yaml"]
    pod = driver["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["command"] == ["continuo", "serve"]
    args = dict(zip(ctr["args"][::2], ctr["args"][1::2]))
    assert args == {"--cluster": "/etc/continuo/cluster.yaml", "--policy": "/etc/continuo/policy.yaml",
                    "--plan": "/etc/continuo/plan.yaml", "--weights": "/models/llama-3-70b", "--host": "0.0.0.0",
                    "--port": "8000", "--join": "$(POD_IP):29500"}
    env = {e["name"]: e["valueFrom"] for e in ctr["env"]}
    assert env["CONTINUO_JOIN_TOKEN"]["secretKeyRef"] == {"name": "clinical-tokens", "key": "join-token"}
    assert {"CONTINUO_API_KEY", "CONTINUO_ADMIN_TOKEN"} <= set(env)
    assert _pinned(driver) == r.driver_node and c.node(r.driver_node).trust.value == "owned"   # sees raw tokens
    for w in r.files["50-workers.yaml"]:
        wc = w["spec"]["template"]["spec"]["containers"][0]
        node = _pinned(w)
        assert wc["command"] == ["continuo", "worker"]
        assert wc["args"] == ["--join", "clinical-rendezvous.continuo.svc:29500", "--node", node, "--join-token-file",
                              "/var/run/secrets/continuo/join-token", "--device", "auto"]
        assert wc["resources"]["limits"]["nvidia.com/gpu"] == c.node(node).gpus
        assert "env" not in wc                                     # workers never hold the API keys
    rdv = next(s for s in r.files["30-services.yaml"] if s["metadata"]["name"] == "clinical-rendezvous")
    assert rdv["spec"]["clusterIP"] == "None" and rdv["spec"]["publishNotReadyAddresses"] is True
    # the driver waits for exactly the workers rendered, and serves the plan stamped for that cluster
    sub = load_cluster_text(r.config["cluster.yaml"])
    assert [n.name for n in sub.nodes] == r.workers and sub.fingerprint() == r.plan.cluster_fingerprint
    assert {"ward-c-edge", "fra-h100-1", "iad-a100-1", "iad-a100-2"} == set(r.skipped)


def load_cluster_text(text: str) -> Cluster:
    return Cluster.model_validate(yaml.safe_load(text))


def test_unencrypted_hop_the_policy_wants_encrypted_is_flagged():
    c = load_cluster("scenarios/hospital/cluster.yaml")
    pol = load_policy("scenarios/hospital/policy.yaml")
    links = c.links.model_dump(mode="json")
    for p in links["pairs"]:
        if set(p["between"]) == {"ward-a-edge", "fra-a100-1"}:
            p["encrypted"] = False                     # owned edge <-> attested cloud, in the clear
    c2 = Cluster.model_validate({**c.model_dump(mode="json"), "links": links})
    pl = plan(IntentSpec(data_class="phi", model="smollm2-135m"), c2, pol, load_model_spec("smollm2-135m")).plan
    r = k8s.render(c2, pol, pl, k8s.RenderOptions("notes", IMAGE))
    assert len(r.flags) == 1 and r.flags[0].startswith("ward-a-edge <-> fra-a100-1: phi must be encrypted")
    mesh = next(p for p in r.files["20-network-policies.yaml"] if p["metadata"]["name"] == "notes-mesh")
    assert mesh["metadata"]["annotations"]["continuo.io/unencrypted-hops"] == "ward-a-edge <-> fra-a100-1"
    # internal data asks for no encryption: nothing to flag on the same cluster
    pl = plan(IntentSpec(data_class="internal", model="smollm2-135m"), c2, pol, load_model_spec("smollm2-135m")).plan
    assert k8s.render(c2, pol, pl, k8s.RenderOptions("notes", IMAGE)).flags == []


def test_render_refuses_what_cannot_run(tmp_path, capsys, monkeypatch):
    c, pol = load_cluster("scenarios/hospital/cluster.yaml"), load_policy("scenarios/hospital/policy.yaml")
    pl = load_plan("scenarios/local/plan-2stage.yaml").model_copy(update={
        "stages": (load_plan("scenarios/local/plan-2stage.yaml").stages[0].model_copy(
            update={"node": "iad-a100-1", "last_layer": 29}),)})
    with pytest.raises(InputError, match="iad-a100-1.*may not see phi"):
        k8s.render(c, pol, pl, k8s.RenderOptions("x", IMAGE))
    with pytest.raises(InputError, match="--service.*not a Kubernetes name"):
        k8s.render(c, pol, pl, k8s.RenderOptions("Bad_Name", IMAGE))
    base = ["k8s", "render", "--cluster", "scenarios/hospital/cluster.yaml", "--policy",
            "scenarios/hospital/policy.yaml", "--image", IMAGE]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pl.model_dump(mode="json")))
    rc, _, err = run_cli(capsys, monkeypatch, *base, "--plan", tmp_path / "p.yaml")
    assert rc == 1 and "residency" in err                            # the validator refuses it first
    rc, _, err = run_cli(capsys, monkeypatch, *base, "--intent", "scenarios/hospital/intents/phi-70b-split.yaml")
    assert rc == 2 and "--weights" in err                            # 70B without weights: the embedded model
    rc, _, err = run_cli(capsys, monkeypatch, *base)
    assert rc == 2 and "--plan, --intent or --data-class" in err
    rc, out, err = run_cli(capsys, monkeypatch, *base, "--data-class", "phi", "--service", "letters")
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "NetworkPolicy", "Service", "Deployment",
                                         "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    assert all(d["metadata"].get("labels", {}).get(SERVICE_LABEL, "letters") == "letters" for d in docs)
    assert "kubectl -n continuo create secret generic letters-tokens" in " ".join(err.split())


def test_the_k8s_package_needs_no_torch():
    import subprocess
    code = "import sys, executor.k8s; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
