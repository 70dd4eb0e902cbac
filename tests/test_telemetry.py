"""Telemetry: rolling windows fed by the engine loop and by the stage records that come back with
the logits; /metrics and /admin/stats read them without asking any worker."""
import httpx
import pytest
import torch
from tiny_service import CFG, CLUSTER, serve_app, submit_all, validated

from executor import transport
from executor.api import create_app
from executor.engine import EngineConfig, SamplingParams
from executor.service import Service
from executor.stage import StepBatch
from executor.telemetry import Telemetry
from executor.transport import STEP_RECORD, Hop, Received
from executor.weights import RandomSource

SRC = RandomSource(CFG, seed=4)
EC = EngineConfig(max_num_seqs=4, max_model_len=128, num_kv_blocks=64, block_size=16)
ADMIN = "tele-admin-token"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _record(rank, start, end, **kw):
    rec = dict.fromkeys(STEP_RECORD, 0) | {"rank": rank, "start": start, "end": end} | kw
    return tuple(rec[k] for k in STEP_RECORD)


def _batch(num_new, starts=None):
    return StepBatch(list(range(len(num_new))), starts or [0] * len(num_new), list(num_new),
                     torch.zeros(len(num_new), max(num_new), dtype=torch.long))


def test_windows_rates_percentiles_and_expiry():
    clock = Clock()
    tel = Telemetry(clock=clock)
    for i in range(100):                  # 100 requests over 50 s, 10 prompt tokens each
        clock.t += 0.5
        tel.arrival(10)
        tel.first_token(0.001 * (i + 1))  # TTFT 1..100 ms
        tel.token(3)
        tel.finished(0.02, "length")
        tel.step(0.01, queue=i % 4, running=2)
    snap = tel.snapshot()
    w60, w10 = snap["windows"]["60s"], snap["windows"]["10s"]
    assert w60["span_s"] == pytest.approx(50) and w60["arrival_rate"] == pytest.approx(2.0)
    assert w60["prompt_tokens_per_s"] == pytest.approx(20.0) and w60["output_tokens_per_s"] == pytest.approx(6.0)
    assert w60["ttft_s"]["p50"] == pytest.approx(0.050) and w60["ttft_s"]["p99"] == pytest.approx(0.099)
    assert w60["queue_depth"] == {"mean": pytest.approx(1.5), "max": 3} and w60["finished"] == {"length": 100}
    # the short window holds the last 10 s: 20 requests, the slowest TTFTs
    assert w10["ttft_s"]["n"] == 21 and w10["ttft_s"]["p50"] == pytest.approx(0.090)
    clock.t += 61                         # a quiet minute: everything has left every window
    tel.step(0.01, queue=0, running=0)
    w60 = tel.snapshot()["windows"]["60s"]
    assert w60["arrival_rate"] == 0 and w60["ttft_s"] == {"p50": None, "p99": None, "n": 0}
    assert len(tel.arrivals) == 0 and len(tel.steps) == 1


def test_ttft_and_tpot_are_kept_per_pipeline_too():
    """Replicas run at their own speed: beside the service's figures, each pipeline's own."""
    clock = Clock()
    tel = Telemetry(clock=clock)
    for i in range(10):
        clock.t += 1.0
        tel.first_token(0.1, "plan"), tel.finished(0.02, "length", "plan")
        tel.first_token(0.3, "r1"), tel.finished(0.06, "length", "r1")
    tel.finished(None, "error")                         # a failed request has no TPOT anywhere
    w = tel.snapshot()["windows"]["60s"]
    assert w["tpot_s"]["n"] == 20 and w["finished"] == {"length": 20, "error": 1}
    assert set(w["pipelines"]) == {"plan", "r1"}
    assert w["pipelines"]["plan"]["tpot_s"] == {"p50": pytest.approx(0.02), "p99": pytest.approx(0.02), "n": 10}
    assert w["pipelines"]["r1"]["ttft_s"]["p50"] == pytest.approx(0.3)
    # the autopilot reads the plan's own when replicas served beside it, the service's otherwise
    from agent.autopilot.controller import _read_load
    snap = tel.snapshot()
    _, measured, _ = _read_load(snap, "60s")
    assert measured["tpot_p50_ms"] == pytest.approx(20.0) and measured["tpot_n"] == 10
    del snap["windows"]["60s"]["pipelines"]["r1"]
    snap["windows"]["60s"]["tpot_s"]["p50"] = 0.04
    assert _read_load(snap, "60s")[1]["tpot_p50_ms"] == pytest.approx(40.0)


def test_stage_records_become_stage_times_and_hops():
    clock = Clock()
    tel = Telemetry(clock=clock)
    tel.node_of = {1: "edge-a", 2: "edge-b"}.get
    route = (Hop(1, 0, 3), Hop(2, 3, 7))
    a = dict(compute_us=4000, recv_us=0, send_us=100, kv_used=3, kv_total=64, ctl_bytes=500, ctl_transfer_us=200)
    b = dict(compute_us=6000, recv_us=4500, send_us=300, kv_used=5, kv_total=64, in_bytes=2048, in_transfer_us=1000)
    for num_new, tokens in (([1, 1], 2), ([1, 1], 2), ([5, 1], 6)):     # 2 decode steps, 1 with a prompt chunk
        clock.t += 0.1
        # two micro-batches: every stage's figures of a step are summed over them
        got = [Received(1000, 0.002, _record(1, 0, 3, tokens=tokens // 2, rows=1, **a) +
                        _record(2, 3, 7, tokens=tokens // 2, rows=1, **b)) for _ in range(2)]
        tel.pipeline_step(_batch(num_new, [10, 20]), route, got, 0.0, 0.03)
        tel.step(0.035, queue=0, running=2)
    ta, tb = tel.stage_times()
    assert (ta.node, ta.start, ta.end, tb.node) == ("edge-a", 0, 3, "edge-b")
    assert ta.compute_s == pytest.approx(0.008) and ta.comm_s == pytest.approx(0.0002)
    assert tb.step_s == pytest.approx(2 * (0.006 + 0.0045 + 0.0003)) and tb.decode_steps == 2 and tb.prefill_steps == 1
    assert tel.stage_time("edge-b") == tb and tel.stage_time("nowhere") is None
    w = tel.snapshot()["windows"]["60s"]
    hops = {(h["src"], h["dst"]): h for h in w["hops"]}
    assert hops[("edge-a", "edge-b")]["bytes_per_step"] == 4096 and hops[("edge-a", "edge-b")]["transfer_s"] == \
        pytest.approx(0.002)
    assert hops[("edge-b", "driver")]["kind"] == "logits" and hops[("driver", "edge-a")]["bytes_per_step"] == 1000
    assert tel.snapshot()["now"]["kv"]["edge-b"] == {"used_blocks": 5, "total_blocks": 64, "use": 5 / 64}
    assert w["steps"]["tokens"] == pytest.approx(10 / 3) and w["kv_use"]["edge-a"]["max"] == pytest.approx(3 / 64)
    with pytest.raises(ValueError, match=r"window_s must be in \(0, 60\]"):
        tel.stage_times(600)
    with pytest.raises(ValueError, match="positive seconds"):
        Telemetry(windows=(60, 0))


@pytest.fixture(scope="module")
def svc():
    s = Service.launch(CLUSTER, validated([("edge-a", 0, 3), ("edge-b", 4, 6)]), SRC, EC, threads_per_worker=1)
    yield s
    s.close()


def test_a_served_pipeline_reports_every_stage(svc):
    futs = submit_all(svc, [[1, 2, 3, 4, 5] * 3, [7, 8, 9]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [f.result(60)[1] for f in futs] == [None, None]
    ta, tb = svc.telemetry.stage_times()
    assert [(t.node, t.start, t.end) for t in (ta, tb)] == [("edge-a", 0, 4), ("edge-b", 4, 7)]
    assert ta.compute_s > 0 and tb.compute_s > 0 and tb.comm_s > 0      # edge-b waits for edge-a
    assert ta.decode_steps > 0 and ta.prefill_steps > 0 and ta.decode_rows_per_step <= 2
    w = svc.stats()["windows"]["60s"]
    assert w["output_tokens_per_s"] > 0 and w["ttft_s"]["n"] == 2 and w["tpot_s"]["n"] == 2
    assert w["steps"]["tokens"] > 0 and set(w["kv_use"]) == {"edge-a", "edge-b"}
    assert {(h["src"], h["dst"]) for h in w["hops"]} == {("driver", "edge-a"), ("driver", "edge-b"),
                                                         ("edge-a", "edge-b"), ("edge-b", "driver")}
    assert all(h["bytes_per_step"] > 0 for h in w["hops"])


def test_metrics_and_stats_ask_no_worker(svc, monkeypatch):
    svc.generate([3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True), timeout=60)

    def no(*a, **k):
        raise AssertionError("a scrape talked to the workers")
    monkeypatch.setattr(svc.runtime, "call", no)
    monkeypatch.setattr(svc.runtime, "stats", no)
    with serve_app(create_app(svc, admin_tokens=[ADMIN])) as url:
        m = httpx.get(url + "/metrics").text
        for name in ('continuo_stage_compute_seconds{layers="0-4",node="edge-a",window="60s"}',
                     'continuo_stage_comm_seconds{layers="4-7",node="edge-b",window="10s"}',
                     'continuo_arrival_rate{window="60s"}', 'continuo_output_tokens_per_second{window="10s"}',
                     'continuo_ttft_window_seconds{quantile="0.99",window="60s"}',
                     'continuo_tpot_window_seconds{quantile="0.5",window="60s"}', 'continuo_queue_depth_mean',
                     'continuo_running_requests_mean', 'continuo_kv_use_ratio{node="edge-b",window="60s"}',
                     'continuo_kv_blocks_used{node="edge-a"}', 'continuo_hop_bytes_per_second{dst="edge-b",src="edge-a"',
                     'continuo_hop_transfer_seconds{dst="driver",src="edge-b"', 'continuo_telemetry_enabled 1.0'):
            assert name in m, name
        assert httpx.get(url + "/admin/stats").status_code == 401
        stats = httpx.get(url + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert set(stats["windows"]) == {"60s", "10s"} and stats["links"] is None
        assert [s["node"] for s in stats["windows"]["60s"]["stages"]] == ["edge-a", "edge-b"]


def test_telemetry_off_sends_no_records(svc, monkeypatch):
    import executor.runtime as runtime
    asked = []

    def step(batch, route, telemetry=False):          # every Step the driver sends: does it ask for records?
        asked.append(telemetry)
        return transport.Step(batch, route, telemetry)
    monkeypatch.setattr(runtime, "Step", step)
    svc.loop.call(lambda: svc.set_telemetry(False))
    try:
        n = len(svc.telemetry.steps)
        svc.generate([3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True), timeout=60)
        assert len(svc.telemetry.steps) == n              # nothing recorded
        assert asked and not any(asked) and svc.stats()["enabled"] is False
    finally:
        svc.loop.call(lambda: svc.set_telemetry(True))
    asked.clear()
    svc.generate([3, 4, 5], SamplingParams(max_tokens=2, ignore_eos=True), timeout=60)
    assert len(svc.telemetry.steps) > n and asked and all(asked)


def test_an_engine_step_may_finish_several_pipeline_steps_or_none():
    """With groups of requests in flight a loop iteration finishes 0, 1 or (draining) several."""
    tel = Telemetry(clock=Clock())
    tel.node_of = {1: "a"}.get
    route = (Hop(1, 0, 7),)
    for _ in range(2):
        tel.pipeline_step(_batch([1]), route, [Received(10, 0.001, _record(1, 0, 7, compute_us=1000))], 0.0, 0.01)
    tel.step(0.02, queue=0, running=1)
    tel.step(0.001, queue=0, running=1)
    assert [len(s.stages) for s in tel.steps] == [1, 1, 0]
    assert tel.stage_times()[0].steps == 2


def test_stage_times_since_leaves_out_the_steps_before():
    """A plan's warm-up is judged on its own steps: not the cold first request's, nor an earlier plan's on a
    stage of the same node and layers (bench predict's correction factors come from stage_times(since=))."""
    clock = Clock()
    tel = Telemetry(clock=clock)
    tel.node_of = {1: "a"}.get
    route = (Hop(1, 0, 7),)
    for compute_us in (9000, 1000, 3000):                 # a cold step, then two warm ones
        clock.t += 0.1
        tel.pipeline_step(_batch([1]), route, [Received(10, 0.001, _record(1, 0, 7, compute_us=compute_us))],
                          0.0, 0.01)
        tel.step(0.02, queue=0, running=1)
        if compute_us == 9000:
            since = clock.t + 0.05          # between the cold step and the next
    [every] = tel.stage_times()
    [warm] = tel.stage_times(since=since)
    assert every.steps == 3 and every.decode_compute_s == pytest.approx(0.013 / 3)
    assert warm.steps == 2 and warm.decode_compute_s == pytest.approx(0.002)
    assert tel.stage_times(since=clock.t + 1) == []


def test_transport_counts_only_steps_where_each_receiver_waits():
    """Telemetry.transport: hops and the driver's turn from steps with one group in flight (every running
    request in the step); a step of one of two groups in flight queues behind the other and is left out."""
    clock = Clock()
    tel = Telemetry(clock=clock)
    tel.node_of = {1: "edge-a", 2: "edge-b"}.get
    route = (Hop(1, 0, 3), Hop(2, 3, 7))
    a = dict(compute_us=4000, ctl_bytes=500, ctl_transfer_us=1000)
    for running, in_us in ((2, 1500), (4, 9000)):          # the second: 2 of the 4 running requests
        clock.t += 0.1
        got = [Received(1000, 0.002, _record(1, 0, 3, tokens=2, rows=2, **a) +
                        _record(2, 3, 7, tokens=2, rows=2, in_bytes=2048, in_transfer_us=in_us))]
        tel.pipeline_step(_batch([1, 1], [10, 20]), route, got, 0.0, 0.03)
        tel.step(0.0305, queue=0, running=running)
    since = clock.t
    tr = tel.transport()
    assert tr["steps"] == 1 and tr["driver_s"] == pytest.approx(0.0005)
    hops = {(h["src"], h["dst"]): h for h in tr["hops"]}
    assert hops[("edge-a", "edge-b")]["transfer_s"] == pytest.approx(0.0015)
    assert hops[("driver", "edge-a")]["bytes_per_step"] == 500 and hops[("edge-b", "driver")]["transfer_s"] == \
        pytest.approx(0.002)
    assert tel.transport(since=since + 1) == {"steps": 0, "hops": [], "driver_s": None}
    with pytest.raises(ValueError, match="window_s"):
        tel.transport(window_s=0)
