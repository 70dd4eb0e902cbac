"""The pipeline bench's own arithmetic: how it splits layers and what it reads from the step records."""
from types import SimpleNamespace

from executor.bench_pipeline import _StageCompute, balanced_bounds
from executor.transport import STEP_RECORD


def _cfg(layers: int):
    return SimpleNamespace(num_layers=layers)


def test_balanced_bounds_minimises_the_slowest_stage():
    # a heavy last layer (the LM head counted in it) pulls the cut towards the end's side
    assert balanced_bounds(_cfg(4), 2, [1.0, 1.0, 1.0, 3.0]) == [0, 3, 4]
    assert balanced_bounds(_cfg(6), 3, [1.0] * 6) == [0, 2, 4, 6]
    # never an empty stage, even when one layer outweighs the rest
    b = balanced_bounds(_cfg(3), 3, [10.0, 0.1, 0.1])
    assert b == [0, 1, 2, 3]


def _record(rank: int, start: int, compute_us: int) -> tuple:
    rec = dict.fromkeys(STEP_RECORD, 0)
    rec.update(rank=rank, start=start, compute_us=compute_us)
    return tuple(rec[k] for k in STEP_RECORD)


def test_stage_compute_counts_decode_steps_per_stage_only():
    sink = _StageCompute()
    decode = SimpleNamespace(num_new=[1, 1])
    prefill = SimpleNamespace(num_new=[30, 1])
    got = lambda *recs: [SimpleNamespace(meta=sum(recs, ()))]  # noqa: E731
    sink(decode, None, got(_record(1, 0, 40_000), _record(2, 17, 60_000)), 0, 0)
    sink(decode, None, got(_record(1, 0, 44_000), _record(2, 17, 50_000)), 0, 0)
    sink(decode, None, got(_record(1, 0, 42_000), _record(2, 17, 70_000)), 0, 0)
    sink(prefill, None, got(_record(1, 0, 900_000), _record(2, 17, 900_000)), 0, 0)   # not counted
    assert sink.p50_ms() == [42.0, 60.0]      # stage order by first layer; medians of decode steps


def test_layer_costs_times_decode_steps_of_all_rows_even_past_one_prefill_budget(monkeypatch):
    # 64 rows of 16-token prompts are 1024 tokens: over the engine's default prefill budget (512), so
    # half the prompts used to trickle into the timed steps, which were then divided by the wrong count
    import executor.bench_pipeline as bp
    from executor.weights import RandomSource
    from tests.tiny_service import CFG
    steps_run = []

    class Counting(bp.Engine):
        def step(self):
            out = super().step()
            steps_run.append(1)
            return out
    monkeypatch.setattr(bp, "Engine", Counting)
    costs = bp.layer_costs(RandomSource(CFG), rows=64, steps=3)
    assert len(costs) == CFG.num_layers and all(c > 0 for c in costs)
    # warm-up: one prefill step and one decode step; then the uncounted prefill and 3 timed steps
    assert len(steps_run) == 2 + 1 + 3
