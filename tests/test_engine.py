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


# --- groups of requests in flight (a pipeline that stays full) ---------------------------------------

class Deferred:
    """A stage that launches steps without running them: each runs when its logits are asked for,
    in the order they were launched (what a pipeline of `depth` stages on other processes does)."""

    def __init__(self, stages, depth: int):
        self.stages, self.depth = stages, depth
        self.launched = self.finished = 0
        self.max_in_flight = 0

    def launch(self, batch):
        self.launched += 1
        self.max_in_flight = max(self.max_in_flight, self.launched - self.finished)
        return batch

    def finish(self, batch):
        self.finished += 1
        x = None
        for st in self.stages:
            x = st.forward(batch, x)
        return x

    def abandon(self, batch):
        self.finished += 1

    def forward(self, batch, x=None):
        return self.finish(self.launch(batch))

    def free(self, ids):
        for st in self.stages:
            st.free(ids)


@pytest.mark.parametrize("depth", [2, 3])
def test_groups_in_flight_keep_greedy_and_seeded_outputs(stages, depth):
    ref = alone(stages, PROMPTS, GREEDY)
    seeded = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=i) for i in range(len(PROMPTS))]
    ref_seeded = [engine(stages).generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, seeded)]
    pipe = Deferred(stages, depth)
    eng = Engine([pipe], EngineConfig(num_kv_blocks=64, block_size=4, max_model_len=64, max_prefill_tokens=8),
                 CharTokenizer(), CFG.eos_token_ids)
    assert eng.groups == depth
    assert [o.token_ids for o in eng.generate(PROMPTS, GREEDY)] == ref
    assert pipe.max_in_flight == depth              # the pipeline was full, not stepped one group at a time
    assert [o.token_ids for o in eng.generate(PROMPTS, seeded)] == ref_seeded
    assert not eng.inflight and eng.scheduler.free_blocks == 64


def test_newcomers_join_the_group_with_most_room_and_groups_rebalance(stages):
    from executor.engine import Request, Scheduler
    sched = Scheduler(EngineConfig(num_kv_blocks=64, block_size=4, max_model_len=64))
    reqs = [Request([1, 2], SamplingParams(max_tokens=2)) for _ in range(5)]
    for r in reqs:
        sched.add(r)
    seqs, batch = sched.schedule(group=0, groups=2)
    sizes = [sum(r.group == g for r in sched.running) for g in range(2)]
    assert sizes == [3, 2]                          # 5 admitted, spread; the stepping group takes the tie
    assert all(r.group == 0 for r in seqs) and len(seqs) == 3     # a group steps only its own requests
    for r in [r for r in sched.running if r.group == 1]:
        sched.finish(r, "stop")                     # group 1 empties
    sched.schedule(group=0, groups=2)
    assert sorted(r.group for r in sched.running) == [0, 0, 1]     # group 0 handed one over


def test_a_cancel_in_a_group_in_flight_waits_for_its_step(stages):
    from executor.engine import Request, Scheduler
    sched = Scheduler(EngineConfig(num_kv_blocks=64, block_size=4, max_model_len=64))
    a, b = Request([1], SamplingParams(max_tokens=3)), Request([2], SamplingParams(max_tokens=3))
    sched.add(a)
    sched.add(b)
    sched.schedule(group=0, groups=2)
    a.cancelled = b.cancelled = True
    gone = sched.take_cancelled(busy={a.group})
    assert gone == [b] and a in sched.running       # a's step is in flight: it leaves after it
    assert sched.take_cancelled() == [a]
