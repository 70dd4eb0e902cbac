"""The engine loop: continuous batching, sampling, stops, refusals, cancellation."""
import pytest

from executor.engine import ContextTooLong, Engine, EngineConfig, QueueFull, SamplingParams
from executor.model import ModelConfig
from executor.stage import build_stages
from executor.weights import RandomSource

CFG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position=256, eos_token_ids=(49,))
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17, 18, 19], list(range(20, 45))]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


class CharTokenizer:
    """token i <-> one letter, enough to test stop strings without a real vocabulary."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - 97 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def stages():
    return build_stages(RandomSource(CFG, seed=7), [0, 1, 3], num_kv_blocks=64, block_size=4)


def engine(stages, **kw):
    kw = {"num_kv_blocks": 64, "block_size": 4, "max_model_len": 64, **kw}
    return Engine(stages, EngineConfig(**kw), CharTokenizer(), CFG.eos_token_ids)


def alone(stages, prompts, params):
    return [engine(stages).generate([p], params)[0].token_ids for p in prompts]


def test_batching_and_chunked_prefill_do_not_change_greedy_outputs(stages):
    ref = alone(stages, PROMPTS, GREEDY)
    assert [o.token_ids for o in engine(stages).generate(PROMPTS, GREEDY)] == ref
    chunked = engine(stages, max_prefill_tokens=4, max_num_seqs=2).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in chunked] == ref
    for s in stages:
        s.cache.check_integrity()
        assert s.cache.num_free_blocks == 64


def test_requests_join_and_leave_between_steps(stages):
    ref = alone(stages, PROMPTS[:2], GREEDY)
    eng = engine(stages)
    a = eng.add_request(PROMPTS[0], GREEDY)
    for _ in range(4):
        eng.step()
    b = eng.add_request(PROMPTS[1], GREEDY)
    done = {}
    while eng.has_unfinished():
        done.update((o.req_id, o.token_ids) for o in eng.step())
    assert [done[a], done[b]] == ref


def test_same_seed_same_tokens_whatever_the_batch(stages):
    p = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=42, ignore_eos=True)
    [one] = alone(stages, [PROMPTS[1]], p)
    batched = engine(stages).generate(PROMPTS, [p if i == 1 else SamplingParams(max_tokens=12, temperature=1.0, seed=i)
                                                for i in range(len(PROMPTS))])
    assert batched[1].token_ids == one
    other = alone(stages, [PROMPTS[1]], SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=43,
                                                       ignore_eos=True))
    assert other[0] != one
    # a nucleus this small holds only the top token: sampling turns greedy
    tiny = SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True)
    assert alone(stages, [PROMPTS[1]], tiny) == alone(stages, [PROMPTS[1]], GREEDY)


def test_stop_strings_and_stop_tokens(stages):
    [full] = engine(stages).generate([PROMPTS[3]], GREEDY)
    stop = full.text[4:6]
    [res] = engine(stages).generate([PROMPTS[3]], SamplingParams(max_tokens=10, stop=(stop,), ignore_eos=True))
    assert res.finish_reason == "stop" and res.text == full.text[:full.text.find(stop)]
    tok = full.token_ids[3]
    [res] = engine(stages).generate([PROMPTS[3]], SamplingParams(max_tokens=10, stop_token_ids=(tok,),
                                                                 ignore_eos=True))
    assert res.token_ids == full.token_ids[:full.token_ids.index(tok) + 1] and res.finish_reason == "stop"
    assert full.finish_reason == "length" and len(full.token_ids) == 10


def test_queue_bound_and_context_window_refusals(stages):
    eng = engine(stages, max_waiting=2)
    eng.add_request([1], GREEDY)
    eng.add_request([2], GREEDY)
    with pytest.raises(QueueFull):
        eng.add_request([3], GREEDY)
    with pytest.raises(ContextTooLong, match="context window of 64"):
        engine(stages).add_request(list(range(60)), SamplingParams(max_tokens=5))
    engine(stages).add_request(list(range(59)), SamplingParams(max_tokens=5))    # exactly fits


def test_cancel_frees_the_request_and_spares_the_others(stages):
    ref = alone(stages, [PROMPTS[0]], GREEDY)
    eng = engine(stages)
    keep = eng.add_request(PROMPTS[0], GREEDY)
    drop = eng.add_request(PROMPTS[1], GREEDY)
    waiting = eng.add_request(PROMPTS[2], GREEDY)
    for _ in range(3):
        eng.step()
    eng.cancel(drop)
    done = {}
    eng.cancel(waiting)
    while eng.has_unfinished():
        done.update((o.req_id, o) for o in eng.step())
    assert done[drop].finish_reason == "cancelled" and done[keep].token_ids == ref[0]
    assert done[waiting].finish_reason == "cancelled"
    for s in stages:
        s.cache.check_integrity()
        assert s.cache.num_free_blocks == 64
    assert eng.scheduler.free_blocks == 64


def test_streaming_callback_and_timestamps(stages):
    seen = []
    eng = engine(stages)
    eng.add_request(PROMPTS[1], GREEDY, on_token=lambda seq, tok: seen.append(tok))
    [out] = [o for _ in range(30) for o in eng.step()]
    assert seen == out.token_ids and len(out.token_times) == 10
    assert out.ttft > 0 and out.tpot > 0 and all(g >= 0 for g in out.gaps)


def test_eos_ends_a_request(stages):
    [full] = engine(stages).generate([PROMPTS[4]], GREEDY)
    eng = Engine(stages, EngineConfig(num_kv_blocks=64, block_size=4, max_model_len=64),
                 eos_token_ids=[full.token_ids[2]])
    [res] = eng.generate([PROMPTS[4]], SamplingParams(max_tokens=10))
    assert res.finish_reason == "stop" and res.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[2]) + 1]


def test_a_newcomer_prefill_never_stalls_running_streams(stages):
    """While requests decode, a new prompt is prefilled in small chunks in the same steps: the running
    request gets a token every step, and outputs stay what they are alone."""
    eng = engine(stages, max_prefill_tokens_decoding=8)
    a = eng.add_request([1, 2, 3], GREEDY)
    eng.step()                                          # a: prefill, first token
    b = eng.add_request(list(range(20, 45)), GREEDY)    # 25 prompt tokens: 4 chunks of <= 8
    for i in range(4):
        eng.step()
        assert len(eng.seqs[a].output_ids) == 2 + i     # a decoded in every one of these steps
        assert len(eng.seqs[b].output_ids) == (1 if i == 3 else 0)
    done = {}
    while eng.has_unfinished():
        done.update((o.req_id, o.token_ids) for o in eng.step())
    assert [done[a], done[b]] == alone(stages, [[1, 2, 3], list(range(20, 45))], GREEDY)
    with pytest.raises(ValueError, match="at least 1"):
        EngineConfig(max_prefill_tokens_decoding=0)


def test_sampling_survives_extreme_top_p_and_temperature(stages):
    """A top_p far below any token's mass keeps the most likely token (found by fuzzing the API:
    6.37e-50 is 0 in float32, and no token was kept); a tiny temperature is near-greedy."""
    eng = engine(stages)
    greedy = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    tiny_p = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.11,
                                                      top_p=6.37e-50, seed=1))[0].token_ids
    cold = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True, temperature=1e-4, seed=1))[0]
    frozen = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True, temperature=5.7e-210,
                                                       seed=1))[0]          # also found by fuzzing
    assert tiny_p == greedy and cold.token_ids == greedy and frozen.token_ids == greedy


def test_a_bug_in_a_step_fails_the_requests_instead_of_hanging(stages):
    """Not a dead worker but our own bug inside a step: every in-flight request ends with the error,
    the service says it is degraded, and nothing waits forever."""
    from concurrent.futures import Future

    from executor.service import Listener, Service, ServiceUnavailable

    class Broken:
        start, end = 0, CFG.num_layers

        def forward(self, batch, x):
            raise IndexError("a bug in a stage")

        def free(self, req_ids):
            pass

    svc = Service(Engine([Broken()], EngineConfig(num_kv_blocks=64, block_size=4, max_model_len=64)), "broken")
    try:
        done: Future = Future()
        svc.submit([1, 2, 3], GREEDY, Listener(on_done=lambda out, err: done.set_result((out, err))))
        out, err = done.result(10)
        assert out is None and "IndexError: a bug in a stage" in err
        assert svc.health()["status"] == "degraded"
        with pytest.raises(ServiceUnavailable):
            svc.submit([1], GREEDY, Listener())
    finally:
        svc.close()
