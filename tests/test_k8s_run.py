"""The rendered pods' command lines run: the driver's `continuo serve` and every worker's `continuo
worker`, started on this machine exactly as rendered, with what the kubelet would supply swapped in
(the Secret's keys as environment and file, $(POD_IP), the ConfigMap mounted, ports free here).
A tiny random model in a safetensors folder stands in for the checkpoint (`--weights`)."""
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from executor import k8s
from executor.k8s.render import API_PORT, CONFIG_DIR, RENDEZVOUS_PORT, TOKEN_DIR
from executor.model import ModelConfig, random_hf_state
from executor.runtime import free_port
from policies import ModelSpec, PlacementPlan, Stage, load_cluster, load_policy, validate

CFG = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position=512, eos_token_ids=(2,))


def _tiny_checkpoint(folder: Path) -> None:
    from safetensors.torch import save_file

    from executor.weights import GGUFSource
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG.to_hf()))
    save_file({k: v.contiguous() for k, v in random_hf_state(CFG).items()}, str(folder / "model.safetensors"))
    GGUFSource().tokenizer().save_pretrained(str(folder))      # the embedded model's tokenizer (cached)


def _call(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
def test_rendered_driver_and_workers_serve(tmp_path):
    cluster, policy = load_cluster("scenarios/local/cluster.yaml"), load_policy("scenarios/local/policy.yaml")
    _tiny_checkpoint(tmp_path / "tiny")
    pl = PlacementPlan(model="tiny", data_class="phi", cluster_fingerprint=cluster.fingerprint(),
                       stages=(Stage(node="edge-a", first_layer=0, last_layer=1),
                               Stage(node="edge-b", first_layer=2, last_layer=3)))
    spec = ModelSpec.from_hf_config(CFG.to_hf(), name="tiny", dtype="fp32")
    assert validate(pl, cluster, policy, None, spec).ok
    r = k8s.render(cluster, policy, pl, k8s.RenderOptions("e2e", "img:1", weights=str(tmp_path / "tiny")))
    out = tmp_path / "out"
    k8s.write(r, out)
    docs = {f.name: list(yaml.safe_load_all(f.read_text())) for f in out.glob("*.yaml")}
    (driver,) = [d["spec"]["template"]["spec"]["containers"][0] for d in docs["40-driver.yaml"]]
    workers = [d["spec"]["template"]["spec"]["containers"][0] for d in docs["50-workers.yaml"]]

    # what the kubelet supplies: the Secret's keys, the pod IP, the mounts; here, ports that are free
    keys = {k: secrets.token_urlsafe(24) for k in ("join-token", "api-key", "admin-token")}
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "join-token").write_text(keys["join-token"])
    api, rdv = free_port(), free_port()
    env = {**os.environ, "POD_IP": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    env.update({e["name"]: keys[e["valueFrom"]["secretKeyRef"]["key"]] for e in driver["env"]
                if "secretKeyRef" in e["valueFrom"]})

    def local(arg: str) -> str:
        arg = arg.replace(CONFIG_DIR, str(out / "continuo")).replace(TOKEN_DIR, str(tmp_path / "secret"))
        arg = arg.replace("$(POD_IP)", "127.0.0.1").replace(f"e2e-rendezvous.continuo.svc:{RENDEZVOUS_PORT}",
                                                             f"127.0.0.1:{rdv}")
        return arg.replace(f":{RENDEZVOUS_PORT}", f":{rdv}").replace(str(API_PORT), str(api))

    exe = Path(sys.executable).parent
    cmd = lambda c: [str(exe / c["command"][0]), *c["command"][1:], *map(local, c["args"])]  # noqa: E731
    procs = [subprocess.Popen(cmd(driver), env=env)]
    procs += [subprocess.Popen(cmd(w) + ["--threads", "1"], env={**os.environ, "OMP_NUM_THREADS": "1"})
              for w in workers]
    try:
        base, t0 = f"http://127.0.0.1:{api}", time.monotonic()
        while True:
            assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
            try:
                if _call(f"{base}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() - t0 < 300, "the service never became healthy"
            time.sleep(0.5)
        status, nodes = _call(f"{base}/admin/nodes", keys["admin-token"])
        assert status == 200 and sorted(n["node"] for n in nodes["nodes"]) == sorted(r.workers)
        status, got = _call(f"{base}/admin/plan", keys["admin-token"])
        assert status == 200 and [s["node"] for s in got["plan"]["stages"]] == ["edge-a", "edge-b"]
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert _call(f"{base}/v1/chat/completions", None, chat)[0] == 401          # the API key is required
        status, reply = _call(f"{base}/v1/chat/completions", keys["api-key"], chat)
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
