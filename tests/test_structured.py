"""Constrained decoding in the engine: every output follows its grammar, rows without one are untouched."""
import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from executor import structured
from executor.engine import Engine, EngineConfig, SamplingParams
from executor.model import ModelConfig
from executor.stage import build_stages
from executor.weights import RandomSource, open_source

# A tiny random model with SmolLM2's vocabulary, so the real tokenizer (and llguidance's view of it) applies.
CFG = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position=1024, tie_embeddings=True, eos_token_ids=(2,))
SRC = RandomSource(CFG, seed=3)
EC = EngineConfig(max_num_seqs=8, max_model_len=512, num_kv_blocks=256, block_size=16)
PROMPT = "Describe a hospital node as JSON."


@pytest.fixture(scope="module")
def tokenizer():
    return open_source(None).tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return Engine(build_stages(SRC, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC, tokenizer,
                  CFG.eos_token_ids, CFG.vocab_size)


@pytest.fixture(scope="module")
def smol():
    return Engine.local(None, config=EngineConfig(max_num_seqs=4, max_model_len=1024, num_kv_blocks=256))


# --- schemas drawn by hypothesis: objects, arrays, enums, nesting, required/optional, bounded numbers

def _leaf(numbers=True):
    # a JSON number's fraction has no length limit, and the grammar cannot end it: a random model,
    # and SmolLM2 sampling too (seen: "50.50000000000000012888..."), writes digits until max_tokens.
    # So the drawn schemas bound every leaf's length (integers with bounds, no fractions): a known limit.
    number = st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
                       st.integers(-50, 50), st.integers(1, 100))
    return st.one_of(
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-1000, 1000), st.integers(0, 5000)),
        *([number] if numbers else []),
        st.just({"type": "boolean"}),
        st.lists(st.text("abcxyz -", min_size=1, max_size=6), min_size=1, max_size=4, unique=True)
          .map(lambda xs: {"enum": xs}),
        st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
    )


def _object(children):
    return st.dictionaries(st.sampled_from(["node", "zone", "gpus", "tier", "ok", "load", "tags", "site"]),
                           children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req)}))


def schemas(numbers=True):
    return st.recursive(_leaf(numbers), lambda children: st.one_of(
        _object(children),
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(1, 3))),
        max_leaves=6).filter(lambda s: s.get("type") in ("object", "array"))


def _check(out, schema):
    assert out.finish_reason == "stop", (out.text, schema)
    jsonschema.validate(json.loads(out.text), schema)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas(numbers=False), seed=st.integers(0, 2**31))
def test_every_output_of_a_random_model_follows_its_schema(tiny, schema, seed):
    g = structured.json_schema(schema)
    greedy, sampled = tiny.generate([PROMPT, PROMPT], [SamplingParams(max_tokens=400, grammar=g),
                                                       SamplingParams(max_tokens=400, grammar=g, temperature=1.0,
                                                                      seed=seed)])
    _check(greedy, schema)
    _check(sampled, schema)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas(numbers=False), seed=st.integers(0, 2**31))
def test_every_output_of_smollm2_follows_its_schema(smol, schema, seed):
    g = structured.json_schema(schema)
    prompt = smol.chat_prompt([{"role": "user", "content": f"Reply with JSON for this schema: {json.dumps(schema)}"}])
    greedy, sampled = smol.generate([prompt, prompt], [SamplingParams(max_tokens=300, grammar=g),
                                                       SamplingParams(max_tokens=300, grammar=g, temperature=0.8,
                                                                      seed=seed)])
    _check(greedy, schema)
    _check(sampled, schema)


def test_regex_and_choice(tiny):
    outs = tiny.generate([PROMPT] * 3, [SamplingParams(max_tokens=40, grammar=structured.regex(r"node-[a-z]{2,4}")),
                                        SamplingParams(max_tokens=40, grammar=structured.choice(["edge-a", "cloud-b"])),
                                        SamplingParams(max_tokens=40, grammar=structured.json_object())])
    import re
    assert re.fullmatch(r"node-[a-z]{2,4}", outs[0].text)
    assert outs[1].text in ("edge-a", "cloud-b")
    assert isinstance(json.loads(outs[2].text), dict)


def test_an_unconstrained_row_gets_exactly_what_it_gets_alone(tiny):
    plain = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = tiny.generate([PROMPT], plain)[0].token_ids
    sampled_alone = tiny.generate(["Another prompt"], SamplingParams(max_tokens=16, temperature=1.0, seed=5))[0]
    g = structured.json_schema({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
                                "required": ["a"]})
    mixed = tiny.generate([PROMPT, "Another prompt", PROMPT],
                          [plain, SamplingParams(max_tokens=16, temperature=1.0, seed=5),
                           SamplingParams(max_tokens=60, grammar=g)])
    assert mixed[0].token_ids == alone
    assert mixed[1].token_ids == sampled_alone.token_ids
    assert "a" in json.loads(mixed[2].text)


def test_a_two_stage_pipeline_serves_constrained_requests_like_one_stage(tiny, tokenizer):
    two = Engine(build_stages(SRC, [0, 2, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC, tokenizer,
                 CFG.eos_token_ids, CFG.vocab_size)
    g = structured.json_schema({"type": "object", "properties": {"zone": {"enum": ["eu", "us"]},
                                                                 "gpus": {"type": "integer", "maximum": 64}},
                                "required": ["zone", "gpus"]})
    params = [SamplingParams(max_tokens=80, grammar=g), SamplingParams(max_tokens=80, grammar=g, temperature=1, seed=9)]
    assert [o.token_ids for o in two.generate([PROMPT] * 2, params)] == \
           [o.token_ids for o in tiny.generate([PROMPT] * 2, params)]


def test_forced_tokens_skip_sampling_steps(tiny):
    """Where the grammar allows one continuation only (keys, punctuation), those tokens join the output
    without a step each: fewer steps than tokens."""
    schema = {"type": "object", "properties": {"data_class": {"enum": ["confidential"]},
                                               "excluded_nodes": {"enum": [["ward-a-edge"]]}},
              "required": ["data_class", "excluded_nodes"]}
    tiny.add_request(PROMPT, SamplingParams(max_tokens=100, grammar=structured.json_schema(schema)))
    steps, outs = 0, []
    while tiny.has_unfinished():
        outs += tiny.step()
        steps += 1
    assert json.loads(outs[0].text) == {"data_class": "confidential", "excluded_nodes": ["ward-a-edge"]}
    assert steps < len(outs[0].token_ids) / 2


def test_logprobs_are_of_the_model_and_the_sampled_token(tiny):
    out = tiny.generate([PROMPT], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)   # greedy: the best one
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True) and lp.logprob <= 0


@pytest.mark.parametrize("grammar, part", [
    (lambda: structured.json_schema({"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}),
     "minimum"),
    (lambda: structured.json_schema({"type": "objekt"}), "objekt"),
    (lambda: structured.regex("[a-z"), "[a-z"),
    (lambda: structured.lark("start: nothing_defined"), "nothing_defined"),
])
def test_a_grammar_that_does_not_compile_is_refused_naming_the_part(tiny, grammar, part):
    with pytest.raises(structured.GrammarError, match=part.replace("[", r"\[")):
        tiny.add_request(PROMPT, SamplingParams(grammar=grammar()))
    assert not tiny.has_unfinished()
