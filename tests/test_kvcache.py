"""The engine's own KV cache: read-out / write-in round trips, deltas, integrity."""
import pytest
import torch

from executor.kvcache import KVCache, KVCacheFull
from executor.model import ModelConfig
from executor.stage import LocalStage, StepBatch, build_stages
from executor.weights import RandomSource

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position=128)


def run(stages, req, ids, start):
    batch = StepBatch([req], [start], [len(ids)], torch.tensor([ids]))
    x = None
    for s in stages:
        x = s.forward(batch, x)
    return x


def test_allocate_free_and_integrity():
    c = KVCache(range(0, 2), num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8)
    c.allocate("a", 5)
    c.allocate("b", 8)
    assert c.num_free_blocks == 0
    c.check_integrity()
    with pytest.raises(KVCacheFull):
        c.allocate("c", 1)
    c.free(["a"])
    assert c.num_free_blocks == 2
    c.check_integrity()
    c.block_tables["b"].append(c.block_tables["b"][0])       # a block owned twice
    with pytest.raises(AssertionError):
        c.check_integrity()


def test_read_write_round_trip_into_a_cache_with_other_layers():
    [stage] = build_stages(RandomSource(CFG), [0, 4], num_kv_blocks=16, block_size=4)
    run([stage], "a", list(range(1, 11)), 0)
    run([stage], "b", list(range(5, 12)), 0)
    payload = stage.cache.read(["a", "b"], layers=[2, 3])
    assert payload["k"].shape == (2, 17, 2, 8) and payload["lengths"] == [10, 7]
    # another node that owns layers 2..3 only, with a different block layout
    other = KVCache(range(2, 4), num_blocks=8, block_size=8, num_kv_heads=2, head_dim=8)
    other.allocate("x", 3)                                   # so block ids differ
    other.write(payload)
    back = other.read(["a", "b"])
    assert back["layers"] == [2, 3]
    assert torch.equal(back["k"], payload["k"]) and torch.equal(back["v"], payload["v"])
    other.check_integrity()
    with pytest.raises(KeyError):
        other.read(["a"], layers=[0])


def test_delta_since_p_completes_a_pre_copy():
    stages = build_stages(RandomSource(CFG), [0, 2, 4], num_kv_blocks=16, block_size=4)
    ids = list(range(1, 10))
    run(stages, "r", ids, 0)
    first = stages[1].cache.read(["r"])                       # pre-copy round: 9 tokens
    dest = KVCache(range(2, 4), num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8)
    dest.write(first)
    for pos, tok in enumerate([3, 4, 5], start=len(ids)):      # decoding goes on meanwhile
        run(stages, "r", [tok], pos)
    delta = stages[1].cache.read(["r"], since={"r": first["lengths"][0]})
    assert delta["starts"] == [9] and delta["lengths"] == [3] and delta["k"].shape[1] == 3
    dest.write(delta)
    full = stages[1].cache.read(["r"])
    moved = dest.read(["r"])
    assert torch.equal(moved["k"], full["k"]) and torch.equal(moved["v"], full["v"])
    # the destination can now serve the request: same logits as the source stage
    batch = StepBatch(["r"], [12], [1], torch.tensor([[7]]))
    x = stages[0].forward(batch, None)
    moved_stage = LocalStage(stages[1].model, dest)
    assert torch.equal(moved_stage.forward(batch, x), stages[1].forward(batch, x))


def test_write_refuses_a_hole():
    c = KVCache(range(0, 1), num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8)
    payload = {"layers": [0], "reqs": ["a"], "starts": [3], "lengths": [2],
               "k": torch.zeros(1, 2, 2, 8), "v": torch.zeros(1, 2, 2, 8)}
    with pytest.raises(ValueError):
        c.write(payload)


def test_garbage_in_unwritten_slots_never_reaches_attention():
    """Attention reads whole blocks and masks their unwritten tail. A recycled or never-used pool
    may hold anything, NaN included, and NaN survives a mask: blocks are zeroed when handed out."""
    ids = list(range(1, 7))                                   # 6 tokens: the second block half written
    [clean] = build_stages(RandomSource(CFG), [0, 4], num_kv_blocks=8, block_size=4)
    [dirty] = build_stages(RandomSource(CFG), [0, 4], num_kv_blocks=8, block_size=4)
    dirty.cache.k.fill_(float("nan"))
    dirty.cache.v.fill_(float("nan"))
    dirty.cache.k[:, :4].zero_()                              # block 0 pads short rows; make it clean too
    dirty.cache.v[:, :4].zero_()
    def steps(stage):
        # two rows of different lengths: the short one is padded with block 0 up to the long one's
        # blocks; then a decode over a half-written block
        batch = StepBatch(["a", "b"], [0, 0], [6, 2], torch.tensor([ids, ids[:2] + [0] * 4]))
        return stage.forward(batch, None), run([stage], "a", [9], 6)
    for got, want in zip(steps(dirty), steps(clean)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
