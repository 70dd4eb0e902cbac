"""HTTP fuzzing with schemathesis, against the app's own OpenAPI schema, in-process over ASGI.

For every operation: requests made from the schema (valid ones and deliberately invalid ones) get
no 5xx, only statuses the schema documents, bodies of the documented shape, and 4xx for invalid
data; on a keyed app, none of them gets past the gate without the right token, whatever it
carries. A one-process service over a tiny random model keeps it fast: the context window is 256
tokens (requests may ask for max_tokens up to it) and replies default to 8 tokens.

Bounded and repeatable: a fixed number of examples per operation, derandomized (the same cases
every run), no example database.
"""
import zlib

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, ignored_auth, negative_data_rejection, response_headers_conformance,
    response_schema_conformance, status_code_conformance)

from executor.api import create_app  # noqa: E402
from executor.engine import Engine, EngineConfig  # noqa: E402
from executor.model import ModelConfig  # noqa: E402
from executor.service import Service  # noqa: E402
from executor.stage import build_stages  # noqa: E402
from executor.weights import RandomSource, open_source  # noqa: E402

API_KEY, ADMIN_TOKEN = "fuzz-api-key", "fuzz-admin-token"
CFG = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=16, max_position=256, tie_embeddings=True, eos_token_ids=(2,))
EC = EngineConfig(max_num_seqs=4, max_waiting=8, max_model_len=256, num_kv_blocks=80, block_size=16)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
FUZZ = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def service():
    src = RandomSource(CFG, seed=7)
    eng = Engine(build_stages(src, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC,
                 open_source(None).tokenizer(), CFG.eos_token_ids, CFG.vocab_size)
    svc = Service(eng, "tiny-smol")
    yield svc
    svc.close()


def _schema(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # No generated Authorization headers: each test says which token a request carries.
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                                    with_security_parameters=False)
    return schema


@pytest.fixture(scope="module")
def open_schema(service):
    return _schema(create_app(service, default_max_tokens=8))


@pytest.fixture(scope="module")
def keyed_schema(service):
    return _schema(create_app(service, default_max_tokens=8, api_keys=[API_KEY], admin_tokens=[ADMIN_TOKEN]))


def _served(case) -> None:
    """Most generated model names are not served (404, documented): name the served one in most
    valid cases so that generation itself is fuzzed, not only the 404."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and case.meta is not None \
            and case.meta.generation.mode.is_positive and zlib.crc32(case.body["model"].encode()) % 4:
        case.body["model"] = "tiny-smol"


# Every operation of the app, each fuzzed on its own (a failure names it). Those with a body are
# fuzzed with invalid data too; the others have nothing to make invalid.
OPERATIONS = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("GET", "/health"), ("GET", "/metrics"), ("GET", "/admin/plan"), ("POST", "/admin/reconfigure"),
              ("GET", "/admin/reconfigurations"), ("GET", "/admin/nodes"), ("GET", "/admin/stats"),
              ("GET", "/admin/replicas"), ("POST", "/admin/replicas"), ("DELETE", "/admin/replicas/{name}")]
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in ("positive", "negative") if m == "POST" or mode == "positive"]
MODES = {"positive": schemathesis.GenerationMode.POSITIVE, "negative": schemathesis.GenerationMode.NEGATIVE}


def fuzz(schema, method: str, path: str, mode: str, test) -> None:
    """Run test(case) over generated cases of one operation."""
    # Not schemathesis' pytest integration: its fixture-based loader (from_fixture) fails under
    # pytest 9 (it sets node._nodeid), and a module-level schema would build the service while
    # the whole suite is collected. The cases come from its Hypothesis strategy instead, under
    # our own bounded, derandomized settings.
    strategy = schema[path][method].as_strategy(generation_mode=MODES[mode])
    FUZZ(given(case=strategy)(test))()


def test_every_operation_is_fuzzed(open_schema, keyed_schema):
    for schema in (open_schema, keyed_schema):
        found = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
        assert found == set(OPERATIONS)


@pytest.mark.parametrize("method, path, mode", CASES)
def test_open_app(open_schema, method, path, mode):
    def test(case):
        _served(case)
        case.call_and_validate(checks=CHECKS)
    fuzz(open_schema, method, path, mode, test)


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("method, path, mode", CASES)
def test_keyed_app(keyed_schema, method, path, mode):
    protected = path.startswith(("/v1/", "/admin/"))
    right = API_KEY if path.startswith("/v1/") else ADMIN_TOKEN

    def test(case):
        _served(case)
        if protected:
            # Nothing gets past the gate without the right token, whatever the request carries.
            assert case.call().status_code == 401
            assert case.call(headers={"Authorization": f"Basic {right}"}).status_code == 401
            for wrong in ("not-a-token", ADMIN_TOKEN if right == API_KEY else API_KEY):
                r = case.call(headers=_bearer(wrong))
                assert r.status_code == 403, (wrong, r.text)
        case.call_and_validate(headers=_bearer(right), checks=CHECKS + ([ignored_auth] if protected else []))
    fuzz(keyed_schema, method, path, mode, test)
