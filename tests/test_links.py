"""Emulated links (transport.LinkShaper): local workers behind a cluster file's latency and bandwidth.

Measured on real worker processes over a link of 50 ms and 0.2 Gbps: the bytes/time of a bulk copy
within 10% of the set bandwidth, the added round trip of a control message within 10% of twice the
set latency, and the pipeline hop's transfer time (telemetry) near the latency."""
import statistics
import time

import pytest
from tiny_service import CFG, POLICY, SPEC

from executor import transport
from executor.engine import EngineConfig, SamplingParams
from executor.migration import BenchCopy, RoundEnd
from executor.service import Service
from executor.transport import LinkShaper, LinkSpec, Stats, send_obj, wait_all
from executor.weights import RandomSource
from policies import Cluster, PlacementPlan, Stage, approve

LATENCY_MS, GBPS = 50.0, 0.2
CLUSTER = Cluster.model_validate({
    "name": "far", "links": {"pairs": [{"between": ["near", "far"], "bandwidth_gbps": GBPS, "latency_ms": LATENCY_MS}]},
    "nodes": [{"name": n, "gpu": "CPU", "memory_gb": 4, "jurisdiction": "eu", "trust": "owned"} for n in ("near", "far")]})
EC = EngineConfig(max_num_seqs=4, max_model_len=128, num_kv_blocks=64, block_size=16)


def _validated():
    plan = PlacementPlan(model="tiny", data_class="public", cluster_fingerprint=CLUSTER.fingerprint(),
                         stages=(Stage(node="near", first_layer=0, last_layer=3), Stage(node="far", first_layer=4,
                                                                                         last_layer=6)))
    return approve(plan, CLUSTER, POLICY, None, SPEC)


@pytest.fixture(scope="module")
def svc():
    s = Service.launch(CLUSTER, _validated(), RandomSource(CFG, seed=2), EC, threads_per_worker=1, emulate_links=True)
    yield s
    s.close()
    assert transport.SHAPER is None          # this process's sends are plain again after close


def test_the_service_says_what_it_emulates(svc):
    assert svc.links["driver_node"] == "near"          # beside the first stage
    got = {(x["src"], x["dst"]): (x["bandwidth_gbps"], x["latency_ms"]) for x in svc.links["links"]}
    # the driver and `near` share a machine: loopback between them, the cluster's link to `far`
    assert got == {(a, b): (GBPS, LATENCY_MS) for a in ("driver", "near") for b in ("far",)} | \
        {("far", b): (GBPS, LATENCY_MS) for b in ("driver", "near")}
    assert svc.stats()["links"] == svc.links


def test_added_round_trip_is_twice_the_latency(svc):
    rt = svc.runtime

    def rtt(node, n=21):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            rt.call(node, Stats())
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    near, far = svc.loop.call(lambda: (rtt("near"), rtt("far")))
    added_ms = 1e3 * (far - near)
    print(f"added round trip {added_ms:.1f} ms for a set latency of {LATENCY_MS:g} ms (loopback {1e3 * near:.1f} ms)")
    assert abs(added_ms - 2 * LATENCY_MS) <= 0.1 * 2 * LATENCY_MS, (added_ms, 1e3 * near)


def _copy_s(svc, nbytes: int, rid: int) -> float:
    """A bulk copy near -> far (the reconfiguration channel): send to received, via the store."""
    rt = svc.runtime

    def go():
        with rt.lock:
            t = time.perf_counter()
            wait_all(send_obj((BenchCopy(rid, nbytes, rt.ranks["far"], True), RoundEnd(rid, 0)), rt.ranks["near"]))
            wait_all(send_obj((BenchCopy(rid, nbytes, rt.ranks["near"], False), RoundEnd(rid, 0)), rt.ranks["far"]))
        while not rt.store.check([f"mig/{rid}/0/far"]):
            time.sleep(0.0005)
        return time.perf_counter() - t
    return svc.loop.call(go)


def test_bulk_bytes_over_time_is_the_bandwidth(svc):
    small, big = 1_000_000, 6_000_000
    t_small = min(_copy_s(svc, small, 900_001 + i) for i in range(2))
    t_big = min(_copy_s(svc, big, 900_011 + i) for i in range(2))
    # the slope between two sizes leaves out the latency and any fixed cost
    gbps = (big - small) * 8 / (t_big - t_small) / 1e9
    print(f"bulk copy {gbps:.4f} Gbps over a link set to {GBPS:g} Gbps")
    assert abs(gbps - GBPS) <= 0.1 * GBPS, (gbps, t_small, t_big)
    assert t_small >= small * 8 / (GBPS * 1e9) + LATENCY_MS / 1e3 * 0.9


def test_telemetry_sees_the_hop_latency(svc):
    svc.generate([1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=6, ignore_eos=True), timeout=60)
    hops = {(h["src"], h["dst"]): h for h in svc.stats()["windows"]["60s"]["hops"]}
    for hop in (("near", "far"), ("far", "driver"), ("driver", "far")):
        # one micro-batch per step here; a small message on a fast-enough link: the latency, plus
        # (a mean over a few steps) whatever a busy shared machine adds to a step now and then
        assert LATENCY_MS * 0.9 <= 1e3 * hops[hop]["transfer_s"] <= LATENCY_MS * 3, (hop, hops[hop])
    assert 1e3 * hops[("driver", "near")]["transfer_s"] < LATENCY_MS          # loopback


def test_shaper_serialises_bulk_and_lets_serving_traffic_ahead():
    s = LinkShaper({1: LinkSpec(bytes_per_s=1e6, latency_s=0.01)})
    t0 = time.monotonic()
    bulk = s.arrival(1, 100_000, bulk=True) / 1e9 - t0             # 0.1 s on the wire + 10 ms
    ctl = s.arrival(1, 1_000, bulk=False) / 1e9 - t0               # not behind the bulk transfer
    bulk2 = s.arrival(1, 100_000, bulk=True) / 1e9 - t0            # behind the first, and the control bytes
    assert bulk == pytest.approx(0.11, abs=0.005) and ctl == pytest.approx(0.011, abs=0.005)
    assert bulk2 == pytest.approx(0.11 + 0.001 + 0.1, abs=0.005)
    assert s.arrival(2, 10**9, bulk=True) == 0                     # no link: loopback, unshaped
    with pytest.raises(ValueError, match="bandwidth > 0"):
        LinkSpec(bytes_per_s=0, latency_s=0.01)


def test_refusals_name_what_is_wrong():
    before = transport.SHAPER
    with pytest.raises(ValueError, match="workers that join from elsewhere"):
        Service.launch(CLUSTER, _validated(), RandomSource(CFG, seed=2), EC, emulate_links=True,
                       join_at=("127.0.0.1", 1))
    with pytest.raises(ValueError, match="driver_node 'mars' is not an up node of cluster far"):
        Service.launch(CLUSTER, _validated(), RandomSource(CFG, seed=2), EC, emulate_links=True, driver_node="mars")
    assert transport.SHAPER is before        # refused before anything was shaped


def test_serve_refuses_emulation_it_cannot_do(capsys, monkeypatch):
    from tiny_service import run_cli
    serve = ["serve", "--cluster", "scenarios/local/cluster.yaml", "--policy", "scenarios/local/policy.yaml",
             "--plan", "scenarios/local/plan-2stage.yaml"]
    rc, _, err = run_cli(capsys, monkeypatch, *serve, "--emulate-links", "--join", "127.0.0.1:1")
    assert rc == 2 and "--emulate-links" in err and "real network" in err
    rc, _, err = run_cli(capsys, monkeypatch, *serve, "--driver-node", "edge-b")
    assert rc == 2 and "--driver-node" in err and "give both" in err
    rc, _, err = run_cli(capsys, monkeypatch, *serve, "--emulate-links", "--driver-node", "mars")
    assert rc == 2 and "no up node 'mars'" in err
