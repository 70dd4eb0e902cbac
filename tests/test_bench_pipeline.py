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
