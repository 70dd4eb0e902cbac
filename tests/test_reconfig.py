"""Live reconfiguration on a tiny random model: every kind of change keeps greedy outputs
token-identical, baselines too, and failures before the switch leave the old plan serving."""
import os
import signal
import subprocess
import time

import pytest
from tiny_service import CFG, CLUSTER, reference_tokens, submit_all, validated

from executor.engine import EngineConfig, SamplingParams
from executor.reconfig import ReconfigurationError
from executor.service import Service
from executor.weights import RandomSource
from policies import PlacementPlan, PlanDelta, Stage

SRC = RandomSource(CFG, seed=5)
EC = EngineConfig(max_num_seqs=8, max_model_len=300, num_kv_blocks=160, block_size=16)
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40)), [100] * 17, [5, 6], [42, 43, 44, 45], [7] * 3, [8, 9]]
N = 150
START = [("edge-a", 0, 2), ("edge-b", 3, 6)]


@pytest.fixture(scope="module")
def reference():
    return reference_tokens(SRC, EC, PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True))


def start_load(svc):
    futs = submit_all(svc, PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True))
    time.sleep(0.2)
    return futs


def layers(svc):
    return {n["node"]: n["layers"] for n in svc.node_states()}


def _plan(*stages):
    """A plan from half-open (node, start, stop) ranges."""
    return PlacementPlan(model="m", data_class="public",
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b - 1) for n, a, b in stages))


def test_plan_delta():
    """The executor runs the policies' PlanDelta: half-open moves, the nodes that change, each new
    stage's sources (the runs it gets, by the node that holds them now)."""
    d = PlanDelta.between(_plan(("a", 0, 10), ("b", 10, 30)), _plan(("a", 0, 9), ("c", 9, 20), ("b", 20, 30)))
    assert [(m.src, m.dst, m.start, m.stop) for m in d.moves] == [("a", "c", 9, 10), ("b", "c", 10, 20)]
    assert d.changed == ["a", "b", "c"] and d.rebuilt == d.changed
    assert [(r.src, r.start, r.stop) for r in d.sources("c")] == [("a", 9, 10), ("b", 10, 20)]
    assert d.new_range("c") == (9, 20) and d.old_range("c") is None and d.summary() == \
        "layers 9-9: a -> c, layers 10-19: b -> c"
    # a new KV pool size rebuilds every stage of the new plan, moved or not
    resized = PlanDelta.between(_plan(("a", 0, 10), ("b", 10, 30)), _plan(("a", 0, 10), ("b", 10, 30)),
                                old_kv_blocks=64, kv_blocks=128)
    assert resized.changed == [] and resized.rebuilt == ["a", "b"] and resized.moves == ()


def test_every_kind_of_live_reconfiguration_keeps_outputs(reference):
    svc = Service.launch(CLUSTER, validated(START), SRC, EC)
    try:
        futs = start_load(svc)
        steps = [
            [("edge-a", 0, 3), ("edge-b", 4, 6)],                        # move a boundary by one layer
            [("edge-a", 0, 1), ("cloud-1", 2, 4), ("edge-b", 5, 6)],     # add an idle node (2 -> 3 stages)
            [("edge-b", 0, 3), ("cloud-1", 4, 6)],                       # remove a node (3 -> 2)
            [("cloud-1", 0, 6)],                                         # one stage
            [("edge-a", 0, 3), ("edge-b", 4, 6)],                        # back to two, on other nodes
        ]
        reports = []
        for stages in steps:
            rep = svc.reconfigure(validated(stages, current=svc.plan.plan), method="live")
            assert rep.state == "done", rep.error
            reports.append(rep)
            assert [s.node for s in svc.plan.plan.stages] == [n for n, _, _ in stages]
        results = [f.result(120) for f in futs]
        assert [err for _, err in results] == [None] * len(PROMPTS)
        assert [out.token_ids for out, _ in results] == reference
        assert any(r.kv_tokens_copied > 0 for r in reports)          # KV really moved under load
        for r in reports:
            assert set(r.phases) >= {"preparing", "switching", "cleaning"} and r.pause_s is not None
            # every step moves layers; the workers' own receive time is what bandwidth is measured over
            assert 0 < r.transfer_s < sum(r.phases.values()) and r.bandwidth_gbs > 0
        assert layers(svc) == {"edge-a": [[0, 4]], "edge-b": [[4, 7]], "cloud-1": []}
        # bytes moved are the receivers' count of every tensor: layers 0-3 went edge-b -> cloud-1 in
        # the one-stage step, with the embedding; then cloud-1 -> edge-a (0-3) and -> edge-b (4-6),
        # the norm and LM head with the last
        from executor.model import hf_names
        size = lambda a, b: sum(t.numel() * t.element_size()  # noqa: E731
                                for t in SRC.load(hf_names(CFG, a, b)).values())
        assert reports[3].bytes_moved["weights"] == size(0, 4)
        assert reports[4].bytes_moved["weights"] == size(0, 7)
        assert any(r.bytes_moved["kv"] > 0 for r in reports)
    finally:
        svc.close()


@pytest.mark.parametrize("method", ["stop_and_copy", "recompute", "restart"])
def test_baselines_keep_outputs(method, reference):
    svc = Service.launch(CLUSTER, validated(START), SRC, EC)
    try:
        futs = start_load(svc)
        rep = svc.reconfigure(validated([("edge-a", 0, 1), ("cloud-1", 2, 6)], current=svc.plan.plan), method=method)
        assert rep.state == "done", rep.error
        results = [f.result(120) for f in futs]
        assert [out.token_ids for out, _ in results] == reference
        assert layers(svc) == {"edge-a": [[0, 2]], "cloud-1": [[2, 7]], "edge-b": []}
    finally:
        svc.close()


TARGET = [("edge-a", 0, 1), ("cloud-1", 2, 6)]


def check_old_plan_serves(svc, futs, reference, before):
    assert layers(svc) == before and svc.plan.plan.stages[0].last_layer == 2
    results = [f.result(120) for f in futs]
    assert [err for _, err in results] == [None] * len(PROMPTS)
    assert [out.token_ids for out, _ in results] == reference     # nothing lost, nothing changed
    out = svc.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5                                 # and it takes new requests


@pytest.mark.parametrize("phase", ["preparing", "pre-copying", "switching"])
def test_a_failure_in_any_phase_before_the_switch_aborts(phase, reference):
    svc = Service.launch(CLUSTER, validated(START), SRC, EC)
    try:
        futs = start_load(svc)
        before = layers(svc)
        rep = svc.reconfigure(validated(TARGET, current=svc.plan.plan), fail_at=phase)
        assert rep.state == "aborted" and "injected" in rep.error
        check_old_plan_serves(svc, futs, reference, before)
    finally:
        svc.close()


def test_a_transfer_that_does_not_finish_in_time_aborts(reference):
    svc = Service.launch(CLUSTER, validated(START), SRC, EC)
    try:
        futs = start_load(svc)
        before = layers(svc)
        rep = svc.reconfigure(validated(TARGET, current=svc.plan.plan), transfer_timeout_s=0.0)
        assert rep.state == "aborted" and "timed out" in rep.error
        check_old_plan_serves(svc, futs, reference, before)
    finally:
        svc.close()


def test_a_callback_that_raises_mid_reconfiguration_ends_it_clearly(reference):
    """An exception nobody planned for, raised inside a tick (here an event callback, as a slow
    process reap once did in CI), ends the reconfiguration with that error; the engine loop lives on."""
    svc = Service.launch(CLUSTER, validated(START), SRC, EC)
    try:
        futs = start_load(svc)
        before = layers(svc)

        def boom(rep):
            if rep.state == "pre-copying":
                raise subprocess.TimeoutExpired("worker", 5)
        rep = svc.reconfigure(validated(TARGET, current=svc.plan.plan), on_event=boom, timeout=120)
        assert rep.state == "aborted" and "TimeoutExpired" in rep.error and "pre-copying" in rep.error
        check_old_plan_serves(svc, futs, reference, before)
    finally:
        svc.close()


def test_a_dead_destination_aborts(reference):
    svc = Service.launch(CLUSTER, validated(START), SRC, EC)
    try:
        futs = start_load(svc)
        before = layers(svc)
        os.kill(svc.runtime.procs["cloud-1"].pid, signal.SIGKILL)
        time.sleep(0.2)
        rep = svc.reconfigure(validated(TARGET, current=svc.plan.plan))
        assert rep.state == "aborted" and "cloud-1" in rep.error
        assert svc.health()["nodes"]["cloud-1"].startswith("dead")
        before["cloud-1"] = layers(svc)["cloud-1"]          # a dead node reports no layers
        check_old_plan_serves(svc, futs, reference, before)
    finally:
        svc.close()


def test_only_validated_fresh_transitions_are_applied():
    svc = Service.launch(CLUSTER, validated(START), SRC, EC)
    try:
        target = [("edge-a", 0, 1), ("cloud-1", 2, 6)]
        with pytest.raises(TypeError, match="ValidatedPlan"):
            svc.reconfigure(validated(target, current=svc.plan.plan).plan)
        with pytest.raises(ReconfigurationError, match="transition"):
            svc.reconfigure(validated(target))              # validated without the live plan as `current`
        stale = validated(target, current=svc.plan.plan)
        svc.cluster = CLUSTER.with_state("edge-b", "draining")
        with pytest.raises(ReconfigurationError, match="validate it again"):
            svc.reconfigure(stale)
    finally:
        svc.close()


def test_weights_travel_in_the_serving_layout_without_copies():
    """What a weight transfer sends and receives: every tensor is contiguous on both sides as it is
    stored (no layout copy), and a stage composed of the received parts holds exactly the owner's weights."""
    import torch

    from executor.migration import _empty_parts, _tensors, compose, weight_parts
    from executor.model import Linear, prepack
    from executor.stage import build_stages
    [owner] = build_stages(SRC, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size)
    sent = _tensors(weight_parts(CFG, owner.model, 0, CFG.num_layers))
    got = _empty_parts(CFG, 0, CFG.num_layers, torch.float32)
    received = _tensors(got)
    assert len(sent) == len(received)
    for s, r in zip(sent, received):
        assert s.is_contiguous() and r.is_contiguous() and s.shape == r.shape
        r.copy_(s)                                   # what isend / recv_into do, byte for byte
    model = compose(CFG, 0, CFG.num_layers, got)
    ptrs = {m: m.weight.data_ptr() for m in model.modules() if isinstance(m, Linear)}
    prepack(model)
    assert all(m.weight.data_ptr() == p for m, p in ptrs.items())     # already in the serving layout
    for a, b in zip(owner.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_new_kv_reservation_on_the_same_placement_rebuilds_the_stages_under_load(reference):
    """Twice the concurrency on the same placement: no layer moves, every stage is rebuilt with the new
    pool while requests stream, admission counts against it after the switch, outputs stay identical."""
    from tiny_service import POLICY, SPEC

    from policies import approve
    svc = Service.launch(CLUSTER, validated(START), SRC, EC)
    try:
        live = svc.plan.plan
        old = svc.engine.config.num_kv_blocks
        t = live.intent.traffic
        spec = live.intent.model_copy(update={"traffic": t.model_copy(update={"concurrency": 2 * t.concurrency})})
        v = approve(live.model_copy(update={"intent": spec}), CLUSTER, POLICY, spec, SPEC, current=live)
        assert v.delta.pool_changes and v.delta.moves == () and v.delta.kv_blocks > old
        futs = start_load(svc)
        rep = svc.reconfigure(v, method="live")
        assert rep.state == "done", rep.error
        assert svc.engine.config.num_kv_blocks == v.delta.kv_blocks
        results = [f.result(120) for f in futs]
        assert [err for _, err in results] == [None] * len(PROMPTS)
        assert [out.token_ids for out, _ in results] == reference
        assert layers(svc) == {"edge-a": [[0, 3]], "edge-b": [[3, 7]], "cloud-1": []}
    finally:
        svc.close()
