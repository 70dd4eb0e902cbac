"""Authentication: an API key for /v1, an admin token for /admin (an API key never opens it), the
non-loopback refusal of `continuo serve`, and the clients (CLI, RemoteService) sending their tokens."""
import json
from pathlib import Path

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from tiny_service import run_cli as run, serve_app

from executor.api import Credentials, create_app, is_loopback
from executor.engine import Engine, EngineConfig
from executor.model import ModelConfig
from executor.service import Service
from executor.stage import build_stages
from executor.weights import RandomSource, open_source
from policies import ModelSpec, PlacementPlan, Stage, approve, load_cluster, load_policy

ROOT = Path(__file__).resolve().parent.parent
API_KEY, ADMIN_TOKEN = "sk-test-api-key-1", "admin-test-token-1"
CFG = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=5, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position=512, tie_embeddings=True, eos_token_ids=(2,))
SRC = RandomSource(CFG, seed=5)
EC = EngineConfig(max_num_seqs=4, max_waiting=4, max_model_len=256, num_kv_blocks=64, block_size=16)
CLUSTER, POLICY = load_cluster(ROOT / "scenarios/local/cluster.yaml"), load_policy(ROOT / "scenarios/local/policy.yaml")
SPEC = ModelSpec.from_hf_config(CFG.to_hf(), name="tiny-smol", dtype="fp32")


def plan_of(*stages) -> PlacementPlan:
    return PlacementPlan(model="tiny-smol", data_class="public", cluster_fingerprint=CLUSTER.fingerprint(),
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))


START = plan_of(("edge-a", 0, 1), ("edge-b", 2, 4))
MOVED = plan_of(("edge-a", 0, 2), ("edge-b", 3, 4))


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def tokenizer():
    return open_source(None).tokenizer()


@pytest.fixture(scope="module")
def keyed(tokenizer):
    """A service of worker processes behind a keyed app on a real socket: (service, url)."""
    svc = Service.launch(CLUSTER, approve(START, CLUSTER, POLICY, None, SPEC), SRC, EC, tokenizer=tokenizer,
                         policy=POLICY)
    try:
        with serve_app(create_app(svc, api_keys=[API_KEY], admin_tokens=[ADMIN_TOKEN])) as url:
            yield svc, url
    finally:
        svc.close()


@pytest.fixture(scope="module")
def local_service(tokenizer):
    """A one-process service (no workers, no plan): enough for what the gate lets through or not."""
    eng = Engine(build_stages(SRC, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC, tokenizer,
                 CFG.eos_token_ids, CFG.vocab_size)
    svc = Service(eng, "tiny-smol")
    yield svc
    svc.close()


def stages(url) -> list:
    plan = httpx.get(url + "/admin/plan", headers=bearer(ADMIN_TOKEN)).json()["plan"]
    return [(s["node"], s["first_layer"], s["last_layer"]) for s in plan["stages"]]


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    return err


# --- /admin ---------------------------------------------------------------------------------------

def test_admin_needs_the_admin_token_and_the_plan_stays(keyed):
    """A valid plan posted without credentials, or with the API key, moves nothing; the admin token does."""
    svc, url = keyed
    body = {"plan": MOVED.model_dump(mode="json"), "method": "live", "wait": True}
    before = stages(url)
    assert before == [("edge-a", 0, 1), ("edge-b", 2, 4)]
    err = assert_openai_error(httpx.post(url + "/admin/reconfigure", json=body, timeout=60), 401)
    assert "admin token" in err["message"]
    assert stages(url) == before
    err = assert_openai_error(httpx.post(url + "/admin/reconfigure", json=body, headers=bearer(API_KEY), timeout=60),
                              403)
    assert err["code"] == "api_key_not_admin" and "API key does not open /admin" in err["message"]
    assert_openai_error(httpx.post(url + "/admin/reconfigure", json=body, headers=bearer("guess"), timeout=60), 403)
    assert_openai_error(httpx.post(url + "/admin/reconfigure", json=body, headers={"Authorization": "Basic eDp5"},
                                   timeout=60), 401)
    assert stages(url) == before and svc.history == []
    # the same request with the admin token is applied: the refusals above were the gate, nothing else
    r = httpx.post(url + "/admin/reconfigure", json=body, headers=bearer(ADMIN_TOKEN), timeout=120)
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    assert stages(url) == [("edge-a", 0, 2), ("edge-b", 3, 4)]
    # and back, so that the other tests see the plan they expect
    back = {"plan": START.model_dump(mode="json"), "wait": True}
    assert httpx.post(url + "/admin/reconfigure", json=back, headers=bearer(ADMIN_TOKEN), timeout=120).json()["state"] \
        == "done"


@pytest.mark.parametrize("path", ["/admin/plan", "/admin/nodes", "/admin/reconfigurations"])
def test_every_admin_read_is_closed_too(keyed, path):
    url = keyed[1]
    assert_openai_error(httpx.get(url + path), 401)
    assert_openai_error(httpx.get(url + path, headers=bearer(API_KEY)), 403)
    assert httpx.get(url + path, headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_an_unknown_path_needs_the_admin_token_before_it_says_404(keyed):
    """Deny by default: a route added later is closed until someone opens it on purpose."""
    url = keyed[1]
    assert_openai_error(httpx.get(url + "/admin/secret-new-route"), 401)
    assert_openai_error(httpx.get(url + "/debug"), 401)
    r = httpx.get(url + "/debug", headers=bearer(ADMIN_TOKEN))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_broken_json_without_credentials_is_401_not_400(keyed):
    """The gate answers before the body is read or parsed."""
    r = httpx.post(keyed[1] + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 401)


# --- /v1 through the official SDK -----------------------------------------------------------------

def test_v1_without_with_a_wrong_and_with_the_right_key(keyed):
    url = keyed[1] + "/v1"
    anonymous = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:      # the SDK's way to send no Authorization at all
        anonymous.models.list(extra_headers={"Authorization": openai.Omit()})
    assert e.value.status_code == 401 and e.value.response.headers["www-authenticate"] == "Bearer"
    assert e.value.body["code"] == "missing_credentials"
    with pytest.raises(openai.PermissionDeniedError) as e:
        openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()
    assert e.value.status_code == 403 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError):      # the admin token is not an API key either
        openai.OpenAI(base_url=url, api_key=ADMIN_TOKEN, max_retries=0).models.list()
    client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-smol"]
    r = client.chat.completions.create(model="tiny-smol", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0)
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.PermissionDeniedError):
        list(openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).chat.completions.create(
            model="tiny-smol", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))


def test_metrics_and_health_are_open_by_default(keyed):
    url = keyed[1]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert "continuo_queue_depth" in httpx.get(url + "/metrics").text
    assert httpx.get(url + "/openapi.json").status_code == 200


def test_protect_metrics_takes_the_admin_token(local_service):
    c = TestClient(create_app(local_service, api_keys=[API_KEY], admin_tokens=[ADMIN_TOKEN], protect_metrics=True))
    for path in ("/metrics", "/health"):
        assert_openai_error(c.get(path), 401)
        assert_openai_error(c.get(path, headers=bearer(API_KEY)), 403)
        assert c.get(path, headers=bearer(ADMIN_TOKEN)).status_code == 200
    with pytest.raises(ValueError, match="admin token"):
        create_app(local_service, api_keys=[API_KEY], protect_metrics=True)


def test_api_keys_alone_close_admin(local_service):
    """Setting only API keys must not leave /admin open: it closes, for every token."""
    c = TestClient(create_app(local_service, api_keys=[API_KEY]))
    assert c.get("/v1/models", headers=bearer(API_KEY)).status_code == 200
    assert_openai_error(c.get("/admin/plan"), 401)
    assert assert_openai_error(c.get("/admin/plan", headers=bearer(API_KEY)), 403)["code"] == "api_key_not_admin"
    assert assert_openai_error(c.get("/admin/plan", headers=bearer("x")), 403)["code"] == "admin_closed"
    # an admin token alone: /admin closed to others, /v1 open (it only reads the model)
    c = TestClient(create_app(local_service, admin_tokens=[ADMIN_TOKEN]))
    assert c.get("/v1/models").status_code == 200
    assert_openai_error(c.get("/admin/plan"), 401)
    # no credentials at all: open, as on a developer's loopback (what tests/test_http_api.py relies on)
    c = TestClient(create_app(local_service))
    assert c.get("/v1/models").status_code == 200 and c.get("/admin/plan").status_code == 200


def test_several_keys_any_opens_and_a_root_path_changes_nothing(local_service):
    c = TestClient(create_app(local_service, api_keys=["k-one", "k-two"], admin_tokens=[ADMIN_TOKEN]),
                   root_path="/behind-proxy")
    assert c.get("/v1/models", headers=bearer("k-two")).status_code == 200
    assert c.get("/v1/models", headers=bearer("k-one")).status_code == 200
    assert_openai_error(c.get("/v1/models", headers=bearer("k-three")), 403)
    assert_openai_error(c.get("/admin/plan"), 401)


def test_comparison_is_constant_time_over_every_key(monkeypatch):
    import executor.api as api
    calls = []
    real = api.hmac.compare_digest
    monkeypatch.setattr(api.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    creds = Credentials(["first", "second-much-longer-key", "third"], "api_keys")
    assert creds.accepts("first") and not creds.accepts("fourth") and not creds.accepts("")
    # every key compared on every try (no early exit), digests of equal length whatever was sent
    assert len(calls) == 9 and set(calls) == {(32, 32)}
    with pytest.raises(ValueError):
        Credentials(["has space"], "api_keys")
    one = Credentials("single-key", "api_keys")       # a lone string is one key, not one per character
    assert one.accepts("single-key") and not one.accepts("s")


def test_openapi_documents_the_schemes_and_401_403(local_service):
    spec = TestClient(create_app(local_service, api_keys=[API_KEY], admin_tokens=[ADMIN_TOKEN])).get(
        "/openapi.json").json()
    assert {k: v["scheme"] for k, v in spec["components"]["securitySchemes"].items()} == {"APIKey": "bearer",
                                                                                          "AdminToken": "bearer"}
    for path, ops in spec["paths"].items():
        for op in ops.values():
            if path.startswith("/v1/"):
                assert op["security"] == [{"APIKey": []}], path
            elif path.startswith("/admin/"):
                assert op["security"] == [{"AdminToken": []}], path
            else:
                assert "security" not in op, path          # /metrics, /health: open by default
            if "security" in op:
                assert {"401", "403"} <= set(op["responses"]), path
                assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
    open_spec = TestClient(create_app(local_service)).get("/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert all("security" not in op for ops in open_spec["paths"].values() for op in ops.values())


# --- serve refuses to listen beyond loopback without both ----------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.7", False), ("example.com", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


SERVE = ["serve", "--cluster", ROOT / "scenarios/local/cluster.yaml", "--policy", ROOT / "scenarios/local/policy.yaml",
         "--plan", "no-such-plan.yaml"]


@pytest.mark.parametrize("extra, missing", [
    ([], ["an API key", "an admin token"]),
    (["--api-key", "k"], ["an admin token"]),
    (["--admin-token", "t"], ["an API key"]),
])
def test_serve_refuses_a_non_loopback_address_without_keys(capsys, monkeypatch, extra, missing):
    monkeypatch.delenv("CONTINUO_API_KEY", raising=False)
    monkeypatch.delenv("CONTINUO_ADMIN_TOKEN", raising=False)
    rc, out, err = run(capsys, monkeypatch, *SERVE, "--host", "0.0.0.0", *extra)
    assert rc == 2 and "refusing to serve on 0.0.0.0" in err and "--insecure" in err
    assert all(m in err for m in missing)


def test_serve_goes_on_with_keys_from_the_environment_or_with_insecure(capsys, monkeypatch):
    # Past the check, serve reads the plan file: its error shows the check let it through.
    monkeypatch.setenv("CONTINUO_API_KEY", "k1 k2")
    monkeypatch.setenv("CONTINUO_ADMIN_TOKEN", "t1")
    rc, out, err = run(capsys, monkeypatch, *SERVE, "--host", "0.0.0.0")
    assert rc == 2 and "refusing" not in err and "no-such-plan.yaml" in err
    monkeypatch.delenv("CONTINUO_API_KEY")
    monkeypatch.delenv("CONTINUO_ADMIN_TOKEN")
    rc, out, err = run(capsys, monkeypatch, *SERVE, "--host", "10.0.0.5", "--insecure")
    assert rc == 2 and "refusing" not in err and "warning" in err and "no-such-plan.yaml" in err
    rc, out, err = run(capsys, monkeypatch, *SERVE, "--host", "127.0.0.1")
    assert rc == 2 and "refusing" not in err and "no-such-plan.yaml" in err


def test_serve_refuses_bad_token_flags(capsys, monkeypatch):
    monkeypatch.delenv("CONTINUO_ADMIN_TOKEN", raising=False)
    rc, _, err = run(capsys, monkeypatch, *SERVE, "--protect-metrics")
    assert rc == 2 and "--protect-metrics needs --admin-token" in err
    rc, _, err = run(capsys, monkeypatch, *SERVE, "--api-key", "two words")
    assert rc == 2 and "--api-key" in err and "without spaces" in err


# --- the clients send their token ------------------------------------------------------------------

def test_apply_plan_sends_the_admin_token(keyed, capsys, monkeypatch, tmp_path):
    svc, url = keyed
    monkeypatch.delenv("CONTINUO_ADMIN_TOKEN", raising=False)
    moved = tmp_path / "moved.json"
    moved.write_text(MOVED.model_dump_json())
    rc, out, err = run(capsys, monkeypatch, "apply-plan", moved, "--server", url)
    out = " ".join(out.split())                 # the console wraps long lines
    assert rc == 2 and "not authorised" in out and "401" in out and "--admin-token" in out
    rc, out, err = run(capsys, monkeypatch, "apply-plan", moved, "--server", url, "--admin-token", API_KEY)
    out = " ".join(out.split())
    assert rc == 2 and "403" in out and "API key does not open /admin" in out
    assert stages(url) == [("edge-a", 0, 1), ("edge-b", 2, 4)]
    rc, out, err = run(capsys, monkeypatch, "apply-plan", moved, "--json", "--server", url, "--admin-token",
                       ADMIN_TOKEN)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["reconfiguration"]["state"] == "done", (out, err)
    assert stages(url) == [("edge-a", 0, 2), ("edge-b", 3, 4)]
    # from the environment, as `continuo serve` reads it
    back = tmp_path / "back.json"
    back.write_text(START.model_dump_json())
    monkeypatch.setenv("CONTINUO_ADMIN_TOKEN", ADMIN_TOKEN)
    rc, out, err = run(capsys, monkeypatch, "apply-plan", back, "--json", "--server", url)
    assert rc == 0, (out, err)
    assert stages(url) == [("edge-a", 0, 1), ("edge-b", 2, 4)]


def test_apply_and_chat_without_the_token_exit_2(keyed, capsys, monkeypatch):
    url = keyed[1]
    monkeypatch.delenv("CONTINUO_ADMIN_TOKEN", raising=False)
    rc, out, err = run(capsys, monkeypatch, "apply", ROOT / "scenarios/local/intents/edge-only.md", "--yes", "--no-llm",
                       "--json", "--server", url)
    body = json.loads(out)
    assert rc == 2 and body["status"] == "unauthorized" and "401" in body["message"], (out, err)
    local = ROOT / "scenarios/local"
    rc, out, err = run(capsys, monkeypatch, "chat", "--cluster", local / "cluster.yaml", "--policy",
                       local / "policy.yaml", "--server", url, "--admin-token", "wrong")
    assert rc == 2 and "403" in err and "admin token" in err


def test_remote_service_sends_the_token_from_argument_or_environment(monkeypatch):
    from agent.remote import AuthError, RemoteService
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != f"Bearer {ADMIN_TOKEN}":
            return httpx.Response(401, json={"error": {"message": "this route needs the admin token", "type": "x",
                                                       "param": None, "code": "missing_credentials"}},
                                  headers={"WWW-Authenticate": "Bearer"})
        return httpx.Response(200, json={"plan": START.model_dump(mode="json")})

    def client():
        return httpx.Client(transport=httpx.MockTransport(handler))
    monkeypatch.delenv("CONTINUO_ADMIN_TOKEN", raising=False)
    assert RemoteService("http://svc", client=client(), admin_token=ADMIN_TOKEN).plan == START
    monkeypatch.setenv("CONTINUO_ADMIN_TOKEN", ADMIN_TOKEN)
    assert RemoteService("http://svc", client=client()).plan == START
    monkeypatch.delenv("CONTINUO_ADMIN_TOKEN")
    with pytest.raises(AuthError) as e:
        RemoteService("http://svc", client=client()).plan
    assert e.value.status == 401 and "needs the admin token" in str(e.value) and "--admin-token" in str(e.value)
    assert seen == [f"Bearer {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN}", None]
