"""The contract between the validator and the executor: one PlanDelta, the KV reservation the
capacity rule checked, a seal that cannot be forged, one validation per apply, no silent timeout,
refusals told from bugs, and no import cycles."""
import ast
import copy
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, TypeAdapter
from tiny_service import CFG, CLUSTER, POLICY, SPEC, reference_tokens, submit_all

from executor.engine import EngineConfig, SamplingParams
from executor.reconfig import ReconfigReport, ReconfigurationError, ReconfigurationTimeout
from executor.service import Service
from executor.weights import RandomSource
from policies import (ForgedPlan, InputError, IntentSpec, PlacementPlan, PlanDelta, Refused, Stage, ValidatedPlan,
                      approve, review, validate)

ROOT = Path(__file__).resolve().parent.parent
SRC = RandomSource(CFG, seed=9)
# num_kv_blocks here is deliberately unlike any plan's reservation: the plan's must win.
EC = EngineConfig(max_num_seqs=4, max_model_len=128, num_kv_blocks=999, block_size=16)
SMALL = {"concurrency": 2, "context_tokens": 300}      # 600 tokens -> 38 blocks of 16 (608 tokens)
LARGE = {"concurrency": 4, "context_tokens": 250}      # 1000 tokens -> 63 blocks (1008 tokens)
START = [("edge-a", 0, 2), ("edge-b", 3, 6)]


def plan(stages, traffic=SMALL, fingerprint=True):
    """A plan for the tiny model from inclusive (node, first, last) stages, with its intent's traffic."""
    return PlacementPlan(model="tiny", data_class="public",
                         cluster_fingerprint=CLUSTER.fingerprint() if fingerprint else None,
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages),
                         intent=IntentSpec(data_class="public", traffic=traffic))


def sealed(stages, traffic=SMALL, current=None):
    return approve(plan(stages, traffic), CLUSTER, POLICY, None, SPEC, current=current)


@pytest.fixture(scope="module")
def svc():
    service = Service.launch(CLUSTER, sealed(START), SRC, EC, policy=POLICY)
    yield service
    service.close()


def kv_allocated(service) -> dict[str, int]:
    return {n["node"]: n["kv_bytes"] for n in service.node_states() if n["layers"]}


def kv_checked(vp: ValidatedPlan) -> dict[str, int]:
    return {s.node: int(s.kv_bytes) for s in vp.report.estimates.stages}


def wait_done(service, timeout=120):
    deadline = time.monotonic() + timeout
    while not service.loop.reconfig.done and time.monotonic() < deadline:
        time.sleep(0.01)
    return service.loop.reconfig.report


# --- one stage per node ------------------------------------------------------------------------

def test_two_stages_on_one_node_are_refused_with_their_own_rule():
    r = validate(plan([("edge-a", 0, 1), ("edge-b", 2, 4), ("edge-a", 5, 6)]), CLUSTER, POLICY, None, SPEC)
    assert r.rules_broken() == {"one-stage-per-node"}, r.text()
    assert r.violations[0].node == "edge-a" and "merge" in r.violations[0].hint


def test_continuo_validate_exits_1_on_two_stages_on_one_node(tmp_path):
    f = tmp_path / "plan.yaml"
    f.write_text("model: smollm2-135m\ndata_class: public\nstages:\n"
                 "  - {node: edge-a, first_layer: 0, last_layer: 9}\n"
                 "  - {node: edge-b, first_layer: 10, last_layer: 19}\n"
                 "  - {node: edge-a, first_layer: 20, last_layer: 29}\n")
    local = ROOT / "scenarios" / "local"
    p = subprocess.run([sys.executable, "-m", "agent.cli", "validate", str(f), "-c", str(local / "cluster.yaml"),
                        "-p", str(local / "policy.yaml"), "--json"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert "one-stage-per-node" in p.stdout


# --- one delta, half-open, computed once ------------------------------------------------------

def test_the_validator_computes_the_delta_once_and_every_reader_gets_that_one(monkeypatch):
    current = sealed(START).plan
    made = []
    between = PlanDelta.between

    def counted(*a, **k):
        made.append(between(*a, **k))
        return made[-1]
    monkeypatch.setattr(PlanDelta, "between", counted)
    report, vp = review(plan([("edge-a", 0, 3), ("edge-b", 4, 6)]), CLUSTER, POLICY, None, SPEC, current=current)
    assert len(made) == 1 and report.delta is made[0] and vp.delta is made[0] and vp.report is report
    [moved] = vp.delta.moves                      # layer 3 goes edge-b -> edge-a: half-open [3, 4)
    assert (moved.src, moved.dst, moved.start, moved.stop) == ("edge-b", "edge-a", 3, 4)
    assert moved.label() == "layers 3-3" and moved.weight_bytes == SPEC.bytes_per_layer
    assert moved.kv_bytes_per_token == SPEC.kv_bytes_per_token_per_layer
    assert [(r.action, r.start, r.stop) for r in vp.delta.runs] == [("=", 0, 3), ("~", 3, 4), ("=", 4, 7)]


def test_the_transition_rule_reads_the_delta(monkeypatch):
    """Told (falsely) that the layers go to a node without a link, the rule says so: it checks the
    delta it was handed, not a delta of its own."""
    from policies import Cluster
    cut = Cluster.model_validate({**CLUSTER.model_dump(mode="json"), "links": {"pairs": [
        {"between": ["edge-a", "edge-b"], "bandwidth_gbps": 100, "latency_ms": 0.1}]}})
    current = plan(START)
    new = plan([("edge-a", 0, 3), ("edge-b", 4, 6)]).model_copy(update={"cluster_fingerprint": cut.fingerprint()})
    assert validate(new, cut, POLICY, None, SPEC, current=current).ok
    between = PlanDelta.between

    def lying(old, new, model=None, **k):
        d = between(old, new, model, **k)
        runs = tuple(r.model_copy(update={"src": "cloud-1"}) if r.moves else r for r in d.runs)
        return d.model_copy(update={"runs": runs})
    monkeypatch.setattr(PlanDelta, "between", lying)
    r = validate(new, cut, POLICY, None, SPEC, current=current)
    assert "transition" in r.rules_broken() and "cloud-1 -> edge-a but there is no link" in r.text()


class Recording:
    """A stand-in executor: the live plan, and what reconfigure was handed."""

    def __init__(self, live, answer=None):
        self.plan, self.calls, self.answer = live, [], answer

    def reconfigure(self, validated, method="live"):
        self.calls.append(validated)
        if isinstance(self.answer, BaseException):
            raise self.answer
        if self.answer is not None:
            return self.answer
        self.plan = validated
        return {"state": "done", "method": method, "pause_ms": 1.0, "error": None}


def agent_with(executor):
    from agent import Agent
    return Agent(CLUSTER, POLICY, executor=executor, model=SPEC, mode="auto", use_llm=False)


def test_the_diff_people_see_is_the_delta_the_executor_gets_and_validation_runs_once(monkeypatch):
    from policies import validator
    ex = Recording(sealed(START))
    runs = []
    run = validator._Checker.run
    monkeypatch.setattr(validator._Checker, "run", lambda self: runs.append(self.plan.placement_key()) or run(self))
    new = plan([("edge-a", 0, 3), ("edge-b", 4, 6)])
    out = agent_with(ex).gate(new, new.intent)
    [given] = ex.calls
    assert out.applied and runs == [new.placement_key()]           # validated once for the whole apply
    assert out.report is given.report and out.diff == list(given.delta.runs)
    assert [r.text() for r in out.diff if r.moves] == ["~ layers 3-3: edge-b -> edge-a"]
    # the planner's sealed plan is applied as it is: its validation is the apply's only one
    from agent.planner import plan as make_plan
    runs.clear()
    proposal = make_plan(IntentSpec(data_class="public", traffic=SMALL), CLUSTER, POLICY, SPEC, current=ex.plan.plan)
    planned = len(runs)
    out = agent_with(ex).gate(proposal.plan, proposal.plan.intent, validated=proposal.validated)
    assert len(runs) == planned and (out.status in ("applied", "unchanged"))


# --- the seal -----------------------------------------------------------------------------------

def forgeries(vp: ValidatedPlan):
    """Every way around the validator we know of, as (how, object or the exception it raised)."""
    def attempt(fn):
        try:
            return fn()
        except TypeError as e:
            return e
    yield "model_copy", attempt(lambda: vp.model_copy(update={"stages": []}))
    yield "model_construct", attempt(lambda: ValidatedPlan.model_construct(**dict(vp)))
    yield "pickle", attempt(lambda: pickle.loads(pickle.dumps(vp)))
    yield "json", attempt(lambda: ValidatedPlan.model_validate(vp.model_dump()))
    yield "json str", attempt(lambda: ValidatedPlan.model_validate_json(vp.model_dump_json()))
    yield "type adapter", attempt(lambda: TypeAdapter(ValidatedPlan).validate_python(vp.model_dump()))
    blank = ValidatedPlan.__new__(ValidatedPlan)
    object.__setattr__(blank, "__dict__", dict(vp.__dict__))
    yield "__new__", blank
    state = BaseModel.__getstate__(vp)
    other = plan([("cloud-1", 0, 6)])
    state["__dict__"] = {**state["__dict__"], "plan": other}
    restored = ValidatedPlan.__new__(ValidatedPlan)
    BaseModel.__setstate__(restored, state)          # the seal of `vp` on another plan
    yield "state with another plan", restored


def test_forged_validated_plans_are_refused_by_launch():
    vp = sealed(START)
    for how, forged in forgeries(vp):
        if isinstance(forged, TypeError):
            assert "ValidatedPlan" in str(forged), how
            continue
        assert not forged.sealed, how
        with pytest.raises(ForgedPlan, match="not issued by policies.approve"):
            Service.launch(CLUSTER, forged, SRC, EC)
    assert copy.deepcopy(vp) is vp and vp.sealed            # an untouched plan stays good


def test_a_plan_changed_in_place_is_refused():
    vp = sealed(START)
    object.__setattr__(vp.plan, "stages", (Stage(node="cloud-1", first_layer=0, last_layer=6),))
    with pytest.raises(ForgedPlan):
        Service.launch(CLUSTER, vp, SRC, EC)


# --- on a running service ------------------------------------------------------------------------

def test_kv_the_capacity_rule_reserved_is_what_the_executor_allocates_also_after_a_resize(svc):
    live = svc.plan
    assert live.kv.blocks == 38 and svc.engine.config.num_kv_blocks == 38 != EC.num_kv_blocks
    assert kv_allocated(svc) == kv_checked(live)
    # under load, to a plan with another KV reservation: every stage gets the new pool, outputs hold
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    prompts = [[1, 2, 3], [7, 8, 9, 10], list(range(20, 40))]
    reference = reference_tokens(SRC, EC, prompts, params)
    futs = submit_all(svc, prompts, params)
    time.sleep(0.2)
    target = sealed([("edge-a", 0, 1), ("cloud-1", 2, 6)], LARGE, current=live.plan)
    assert target.delta.pool_changes and target.kv.blocks == 63
    rep = svc.reconfigure(target)
    assert rep.state == "done", rep.error
    assert svc.loop.reconfig.delta is target.delta                     # the executor ran the validator's delta
    assert [out.token_ids for out, _ in (f.result(120) for f in futs)] == reference
    assert kv_allocated(svc) == kv_checked(target) and svc.engine.config.num_kv_blocks == 63
    assert svc.engine.scheduler.free_blocks == 63                       # nothing running: the whole new pool


def test_forged_plans_are_refused_by_reconfigure(svc):
    before = svc.plan
    vp = sealed([("edge-b", 0, 6)], current=before.plan)
    for how, forged in forgeries(vp):
        if not isinstance(forged, TypeError):
            with pytest.raises(ForgedPlan):
                svc.reconfigure(forged)
    assert svc.plan is before


def test_a_plan_without_fingerprint_is_refused_not_stamped(svc):
    before = svc.plan
    unstamped = plan([("edge-b", 0, 6)], fingerprint=False)
    for given in (unstamped, unstamped.model_dump(mode="json")):
        with pytest.raises(InputError) as e:
            svc.reconfigure_plan(given)
        assert e.value.field == "cluster_fingerprint" and "GET /admin/plan" in str(e.value)
    assert svc.plan is before


def test_waiting_too_long_raises_with_the_report_instead_of_returning(svc):
    target = sealed([("edge-b", 0, 6)], current=svc.plan.plan)
    with pytest.raises(ReconfigurationTimeout) as e:
        svc.reconfigure(target, wait=True, timeout=0.001)
    assert isinstance(e.value, ReconfigurationError) and isinstance(e.value, Refused)
    assert e.value.report.state not in ("done", "aborted") and "not finished" in str(e.value)
    assert wait_done(svc).state == "done" and svc.plan is target     # it went on, and finished


# --- what the agent makes of the executor's answers ---------------------------------------------------

def test_the_agent_reports_a_timeout_or_an_unfinished_reconfiguration_as_not_applied():
    new = plan([("edge-a", 0, 3), ("edge-b", 4, 6)])
    report = ReconfigReport(rid=7, method="live", state="pre-copying")
    ex = Recording(sealed(START), ReconfigurationTimeout(report, 0.5))
    out = agent_with(ex).gate(new, new.intent)
    assert out.status == "failed" and not out.applied and out.reconfig["state"] == "pre-copying"
    assert "not finished" in out.message
    for answer, words in (({"state": "preparing", "error": None}, "did not finish"),
                          ({"state": "aborted", "error": "edge-b died"}, "old plan still serves: edge-b died")):
        out = agent_with(Recording(sealed(START), answer)).gate(new, new.intent)
        assert out.status == "failed" and not out.applied and words in out.message


def test_the_agent_lets_bugs_propagate():
    new = plan([("edge-a", 0, 3), ("edge-b", 4, 6)])
    with pytest.raises(RuntimeError, match="CUDA error"):
        agent_with(Recording(sealed(START), RuntimeError("CUDA error: an illegal memory access"))).gate(new, new.intent)
    out = agent_with(Recording(sealed(START), ReconfigurationError("still under way"))).gate(new, new.intent)
    assert out.status == "failed" and "still under way" in out.message


# --- import cycles --------------------------------------------------------------------------------------

def _imports(pkg: str) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports anywhere (function bodies and TYPE_CHECKING too)."""
    graph = {}
    for f in (ROOT / pkg).glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(pkg + "."):
                deps.add(node.module.split(".")[1])
        graph[f.stem] = {d for d in deps if (ROOT / pkg / f"{d}.py").exists() and d != f.stem}
    graph.pop("__init__", None)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[n] = 2
        return None
    return next((c for n in graph if n not in state and (c := visit(n, [n]))), None)


@pytest.mark.parametrize("pkg", ["policies", "agent"])
def test_no_import_cycles(pkg):
    assert _cycle(_imports(pkg)) is None


def test_each_module_imports_first_on_its_own():
    """Imported first in a fresh interpreter, each module loads (a cycle would break some order)."""
    mods = [f"policies.{f.stem}" for f in sorted((ROOT / "policies").glob("*.py")) if f.stem != "__init__"]
    for m in mods + ["agent.tools", "agent.agent"]:
        p = subprocess.run([sys.executable, "-c", f"import {m}"], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, (m, p.stderr[-2000:])
