"""Stage model code vs transformers' implementation of the same weights, for every split."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from executor.engine import Engine, EngineConfig, SamplingParams
from executor.model import ModelConfig, random_hf_state
from executor.stage import StepBatch, build_stages, even_bounds
from executor.weights import RandomSource, SafetensorsSource

LLAMA3_ROPE = tuple(sorted({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}.items()))
CONFIGS = {
    "llama3-rope": ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=5,
                               num_heads=4, num_kv_heads=2, head_dim=16, max_position=256,
                               rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "tied-mqa": ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=5,
                            num_heads=3, num_kv_heads=1, head_dim=16, max_position=256, tie_embeddings=True),
    "qwen2-bias": ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=5,
                              num_heads=4, num_kv_heads=2, head_dim=16, max_position=256,
                              attention_bias=True, rope_theta=1e6, name="qwen2"),
}
SPLITS = [[0, 5], [0, 2, 5], [0, 4, 5], [0, 1, 3, 5]]


def hf_model(cfg: ModelConfig, seed: int):
    hf_cfg = (Qwen2Config if cfg.name == "qwen2" else LlamaConfig)(**cfg.to_hf())
    model = AutoModelForCausalLM.from_config(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(random_hf_state(cfg, seed), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def pipeline_logits(stages, ids: list[int], prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest one at a time (teacher forcing) through
    the stages and their KV caches: logits [len(ids) - prefill + 1, vocab]."""
    out, pos = [], 0
    for chunk in [ids[:prefill]] + [[t] for t in ids[prefill:]]:
        batch = StepBatch(["r"], [pos], [len(chunk)], torch.tensor([chunk]))
        x = None
        for s in stages:
            x = s.forward(batch, x)
        out.append(x[0])
        pos += len(chunk)
    return torch.stack(out)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_greedy_match_transformers_for_every_split(name):
    cfg = CONFIGS[name]
    ref_model = hf_model(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0, 11:]                 # [19, vocab]
        ref_greedy = ref_model.generate(torch.tensor([ids[:12]]), max_new_tokens=12, do_sample=False,
                                        min_new_tokens=12)[0, 12:].tolist()
    for bounds in SPLITS:
        stages = build_stages(RandomSource(cfg, seed=3), bounds, num_kv_blocks=16, block_size=4)
        got = pipeline_logits(stages, ids, prefill=12)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=f"split {bounds}")
        eng = Engine(stages, EngineConfig(num_kv_blocks=16, block_size=4, max_model_len=64))
        [res] = eng.generate([ids[:12]], SamplingParams(max_tokens=12, ignore_eos=True))
        assert res.token_ids == ref_greedy, f"split {bounds}"


def test_stage_loads_only_its_own_layers():
    cfg = CONFIGS["tied-mqa"]
    [first, last] = build_stages(RandomSource(cfg), [0, 2, 5], num_kv_blocks=4)
    assert first.model.lm_head is None and last.model.embed_tokens is None
    assert [l.self_attn.layer for l in last.model.layers] == [2, 3, 4]
    # the tied head of a stage without the embedding carries its own copy of it
    torch.testing.assert_close(last.model.lm_head.weight, first.model.embed_tokens.weight)
    assert last.cache.layers == range(2, 5)


def test_safetensors_folder_loads_like_transformers(tmp_path):
    cfg = CONFIGS["llama3-rope"]
    hf_model(cfg, seed=5).save_pretrained(tmp_path)
    src = SafetensorsSource(tmp_path)
    assert src.config.num_layers == 5 and dict(src.config.rope_scaling)["rope_type"] == "llama3"
    ids = list(range(1, 20))
    ref = pipeline_logits(build_stages(RandomSource(cfg, 5), [0, 5], 16, 4), ids, 19)
    got = pipeline_logits(build_stages(src, [0, 3, 5], 16, 4), ids, 19)
    torch.testing.assert_close(got, ref)


def test_even_bounds():
    assert even_bounds(30, 1) == [0, 30]
    assert even_bounds(30, 4) == [0, 8, 16, 23, 30]


def test_bf16_stays_close():
    cfg = CONFIGS["llama3-rope"]
    ids = list(range(1, 20))
    ref = pipeline_logits(build_stages(RandomSource(cfg, 1), [0, 5], 16, 4), ids, 10)
    got = pipeline_logits(build_stages(RandomSource(cfg, 1), [0, 2, 5], 16, 4, torch.bfloat16), ids, 10)
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)


def test_ragged_prefill_across_stages_matches_one_request_at_a_time():
    """Rows of different lengths run packed (no padding) through a 3-stage split; each row's logits
    equal the same prompt run alone."""
    cfg = CONFIGS["qwen2-bias"]
    stages = build_stages(RandomSource(cfg, seed=2), [0, 1, 3, 5], num_kv_blocks=32, block_size=4)
    prompts = [list(range(1, 12)), [5, 6], list(range(20, 27))]
    width = max(map(len, prompts))
    batch = StepBatch(["a", "b", "c"], [0, 0, 0], list(map(len, prompts)),
                      torch.tensor([p + [0] * (width - len(p)) for p in prompts]))
    x = None
    for s in stages:
        x = s.forward(batch, x)
    alone = []
    for p in prompts:                               # each alone, as request "r" with a fresh cache entry
        alone.append(pipeline_logits(stages, p, len(p))[0])
        for s in stages:
            s.free(["r"])
    torch.testing.assert_close(x, torch.stack(alone), atol=1e-4, rtol=1e-4)


def test_packed_linear_matches_plain_and_follows_weight_updates():
    from executor.model import ONEDNN, Linear
    lin = Linear(48, 80, bias=True)
    x = torch.randn(2, 5, 48)                       # 10 rows: the packed path when oneDNN is there
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2)                          # an in-place load must not leave a stale packed copy
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert "_packed" not in lin.state_dict() and (lin._packed is not None) == ONEDNN


def test_cpu_weights_are_column_major_after_prepack_with_the_same_values():
    """A 1-row step is a GEMV: on CPU the weight [out, in] is stored as [in, out] (a transposed
    view), which BLAS streams faster. Values, state-dict shapes and results stay the same."""
    from executor.model import Linear, prepack
    lin = Linear(48, 80, bias=False)
    before = lin.weight.detach().clone()
    x = torch.randn(1, 1, 48)
    ref = torch.nn.functional.linear(x, before)
    prepack(lin)
    assert lin.weight.shape == (80, 48) and lin.weight.stride() == (1, 80)
    assert torch.equal(lin.weight, before) and torch.equal(lin.state_dict()["weight"], before)
    torch.testing.assert_close(lin(x), ref)                       # 1 row: BLAS on the transposed view
    y = torch.randn(3, 48)
    torch.testing.assert_close(lin(y), y @ before.T, atol=1e-5, rtol=1e-5)   # 3 rows: the packed path
