"""The embedded SmolLM2-135M GGUF: our loader + stages vs transformers loading the same file."""
import pytest
import torch

from executor.engine import Engine, EngineConfig, SamplingParams
from executor.model import hf_names
from executor.stage import StepBatch, build_stages
from executor.weights import GGUFSource, StateDictSource, default_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source():
    gguf = GGUFSource()
    cfg = gguf.config
    # dequantise once and let every split below share the tensors
    return StateDictSource(cfg, gguf.load(hf_names(cfg, 0, cfg.num_layers)), gguf)


@pytest.fixture(scope="module")
def reference(source):
    """transformers' LlamaForCausalLM with weights from transformers' own GGUF reader
    (its tensor-name mapping and q/k un-permutation, not ours)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    model = LlamaForCausalLM(LlamaConfig(**source.config.to_hf())).eval()
    state = load_gguf_checkpoint(str(default_gguf()), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def test_config_from_gguf(source):
    c = source.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and c.eos_token_ids == (2,) and c.rope_theta == 100000.0


def test_logits_and_greedy_match_transformers_gguf(source, reference):
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411]
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0]                   # [16, vocab]
        ref_greedy = reference.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6,
                                        do_sample=False)[0, len(ids):].tolist()
    for bounds in ([0, 30], [0, 7, 30], [0, 10, 11, 30]):
        stages = build_stages(source, bounds, num_kv_blocks=4, block_size=16)
        batch = StepBatch(["r"], [0], [len(ids)], torch.tensor([ids]))
        x = None
        for s in stages:
            x = s.forward(batch, x)
        torch.testing.assert_close(x[0], ref[-1], atol=2e-3, rtol=1e-3, msg=f"split {bounds}")
    eng = Engine(stages, EngineConfig(num_kv_blocks=4, block_size=16, max_model_len=64))
    [res] = eng.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))
    assert res.token_ids == ref_greedy


def test_chat_template_tokenizer_and_eos(source):
    tok = source.tokenizer().tokenizer()
    eng = Engine(build_stages(source, [0, 15, 30], 16, 16), EngineConfig(num_kv_blocks=16, max_model_len=256),
                 tok, source.config.eos_token_ids)
    prompt = eng.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt[0] == 1                                                # <|im_start|>
    [res] = eng.generate([prompt], SamplingParams(max_tokens=12))
    assert "Paris" in res.text and res.finish_reason == "stop" and res.token_ids[-1] == 2


def test_gguf_tokenizer_is_converted_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    from executor import weights
    monkeypatch.setenv("CONTINUO_CACHE", str(tmp_path))
    weights._hf_tokenizer.cache_clear()
    path = default_gguf()
    first = weights._hf_tokenizer(str(path.parent), path.name)
    [entry] = (tmp_path / "tokenizers").iterdir()
    assert (entry / "tokenizer.json").exists()
    weights._hf_tokenizer.cache_clear()
    second = weights._hf_tokenizer(str(path.parent), path.name)
    weights._hf_tokenizer.cache_clear()
    msgs = [{"role": "user", "content": "Bonjour, what's 2+2?"}]
    assert second.encode("Ünïcode and spaces  here") == first.encode("Ünïcode and spaces  here")
    assert second.apply_chat_template(msgs, add_generation_prompt=True) == \
        first.apply_chat_template(msgs, add_generation_prompt=True)
    assert second.eos_token_id == first.eos_token_id
