"""Bad files get errors naming the file, the line and the field."""
import textwrap

import pytest

from policies import InputError, load_cluster, load_intent_spec, load_model_spec, load_plan, load_policy
from policies.modelspec import ModelSpec

GOOD = """\
name: t
nodes:
  - {name: a, gpu: L40S, jurisdiction: eu, trust: owned}
  - {name: b, gpu: A100-80GB, jurisdiction: eu}
links:
  default: {bandwidth_gbps: 1, latency_ms: 40, encrypted: true}
  pairs:
    - {between: [a, b], bandwidth_gbps: 100, latency_ms: 0.1}
"""


def write(tmp_path, text, name="f.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_cluster_loads(tmp_path):
    c = load_cluster(write(tmp_path, GOOD))
    assert [n.name for n in c.nodes] == ["a", "b"]
    assert c.link("b", "a").bandwidth_gbps == 100
    assert c.node("a").total_memory_gb == 48


@pytest.mark.parametrize("text,line,field,words", [
    (GOOD.replace("trust: owned}", "trust: owned, colour: red}"), 3, "nodes[0].colour", "unknown key 'colour'"),
    (GOOD.replace("gpu: A100-80GB", "gpu: A200"), 4, "nodes[1].gpu", "A200"),
    (GOOD.replace("between: [a, b]", "between: [a, zz]"), 8, "links.pairs[0].between[1]", "unknown node 'zz'"),
    (GOOD.replace("name: b,", "name: a,"), 4, "nodes[1].name", "duplicate node name 'a'"),
    (GOOD.replace("latency_ms: 40", "latency_ms: soon"), 6, "links.default.latency_ms", "soon"),
    (GOOD.replace("jurisdiction: eu}", "}"), 4, "nodes[1].jurisdiction", "Field required"),
    (GOOD.replace("pairs:", "pairs: ["), None, None, "not valid YAML"),
])
def test_bad_cluster_names_line_and_field(tmp_path, text, line, field, words):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as e:
        load_cluster(path)
    msg = str(e.value)
    assert str(path) in msg and words in msg
    if line is not None:
        assert e.value.line == line, msg
    if field is not None:
        assert e.value.field == field, msg


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "name: t\nnodes: [\n  {name: a\n")
    with pytest.raises(InputError) as e:
        load_cluster(path)
    assert e.value.line is not None and "not valid YAML" in str(e.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_policy(write(tmp_path, ""))
    with pytest.raises(InputError, match="cannot read"):
        load_policy(tmp_path / "nope.yaml")


def test_policy_errors(tmp_path):
    with pytest.raises(InputError) as e:
        load_policy(write(tmp_path, "name: p\ndata_classes:\n  phi: {min_trust: very}\n"))
    assert e.value.line == 3 and e.value.field == "data_classes.phi.min_trust"
    with pytest.raises(InputError) as e:
        load_policy(write(tmp_path, "name: p\ndata_classes:\n  phi: {private_prefix_layers: -1}\n"))
    assert "greater than or equal to 0" in str(e.value)


def test_intent_errors(tmp_path):
    with pytest.raises(InputError) as e:
        load_intent_spec(write(tmp_path, "data_class: phi\nobjective: fastest\n"))
    assert e.value.line == 2 and e.value.field == "objective"
    with pytest.raises(InputError) as e:
        load_intent_spec(write(tmp_path, "objective: latency\n"))
    assert e.value.field == "data_class"
    with pytest.raises(InputError, match="allowed_jurisdictions is empty"):
        load_intent_spec(write(tmp_path, "data_class: phi\nallowed_jurisdictions: []\n"))


def test_plan_errors(tmp_path):
    with pytest.raises(InputError) as e:
        load_plan(write(tmp_path, "model: m\ndata_class: phi\nstages:\n  - {node: a, first_layer: 0, last_layer: x}\n"))
    assert e.value.line == 4 and e.value.field == "stages[0].last_layer"


def test_scenarios_all_load():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "scenarios"
    clusters = list(root.glob("*/cluster.yaml"))
    assert len(clusters) >= 3
    for c in clusters:
        load_cluster(c)
        load_policy(c.parent / "policy.yaml")
        for i in (c.parent / "intents").glob("*.yaml"):
            load_intent_spec(i)


def test_model_specs_match_published_sizes():
    # Published parameter counts: Llama-3-8B 8.03B, 70B 70.6B, Qwen2.5-7B 7.62B, SmolLM2-135M 134.5M.
    for name, params in [("llama-3-8b", 8.03e9), ("llama-3-70b", 70.55e9), ("qwen2.5-7b", 7.62e9),
                         ("smollm2-135m", 134.5e6)]:
        m = load_model_spec(name)
        assert abs(m.total_params - params) / params < 0.01, (name, m.total_params)
    m = load_model_spec("llama-3-8b")
    assert m.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
    assert m.stage_weight_bytes(0, 31) == pytest.approx(m.total_params * 2)


def test_model_spec_from_gguf_header():
    meta = {"general.architecture": "llama", "general.name": "SmolLM2 135M", "llama.block_count": 30,
            "llama.embedding_length": 576, "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3, "llama.context_length": 8192, "tokenizer.ggml.tokens": ["x"] * 49152}
    m = ModelSpec.from_gguf_metadata(meta, tensor_names=["token_embd.weight"])
    assert m == load_model_spec("smollm2-135m").model_copy(update={"name": "SmolLM2 135M"})
    with pytest.raises(InputError, match="head_count"):
        ModelSpec.from_gguf_metadata({"general.architecture": "llama"})


def test_unknown_model_spec():
    with pytest.raises(InputError, match="shipped specs"):
        load_model_spec("gpt-17")
