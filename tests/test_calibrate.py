"""continuo calibrate on a tiny random model: a loadable profile the cost model then prefers."""
from __future__ import annotations

import multiprocessing

import pytest

from executor.calibrate import calibrate, ensure_profile, gpu_kind, model_config
from executor.model import ModelConfig
from policies import InputError, PlacementPlan, Stage, Traffic, load_cluster, load_model_spec
from policies.costmodel import estimate
from policies.profile import ProfileSet, load_profile, load_profiles, save_profile

TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position=2048)
GRID = dict(decode_batch=(1, 4), decode_context=(16, 64), prefill_tokens=(8, 32), head_rows=(1, 4), repeats=1)


def test_calibrate_tiny_model_writes_a_profile(tmp_path):
    prof = calibrate(TINY, "tiny", "cpu", threads=1, **GRID)
    assert prof.kind == "CPU" and prof.device == "cpu" and prof.threads == 1 and prof.model == "tiny"
    assert prof.decode.batch == (1, 4) and len(prof.decode.layer_ms) == 2 and len(prof.decode.layer_ms[0]) == 2
    assert all(v > 0 for row in prof.decode.layer_ms for v in row) and all(v > 0 for v in prof.head.ms)
    assert 0 < prof.seconds < 30
    # the LM head over a 512-token vocabulary costs more than nothing, and more rows cost more work
    path = save_profile(prof, tmp_path)
    assert load_profile(path) == prof


def test_ensure_profile_calibrates_once(tmp_path, monkeypatch):
    calls = []
    import executor.calibrate as cal
    real = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **{**k, **GRID}))
    p1 = ensure_profile(TINY, "tiny", "cpu", threads=1, folder=tmp_path, log=None)
    p2 = ensure_profile(TINY, "tiny", "cpu", threads=1, folder=tmp_path, log=None)
    assert p1 == p2 and p1.exists() and len(calls) == 1
    # a node of the same kind is served by the kind's profile; another kind gets its own
    ensure_profile(TINY, "tiny", "cpu", threads=1, node="edge-a", folder=tmp_path, log=None)
    assert len(calls) == 1
    ensure_profile(TINY, "tiny", "cpu", threads=1, kind="L4", folder=tmp_path, log=None)
    assert len(calls) == 2 and len(load_profiles(tmp_path)) == 2


def test_cost_model_uses_a_calibrated_profile():
    cfg = model_config("smollm2-135m")
    assert cfg.num_layers == 30 and cfg.hidden_size == 576
    prof = calibrate(cfg, "smollm2-135m", "cpu", threads=1, **{**GRID, "decode_context": (64, 128)})
    cluster, model = load_cluster("scenarios/local/cluster.yaml"), load_model_spec("smollm2-135m")
    plan = PlacementPlan(model="smollm2-135m", data_class="phi", stages=(Stage(node="edge-a", first_layer=0, last_layer=29),))
    est = estimate(plan, cluster, model, Traffic(concurrency=1, prompt_tokens=32, output_tokens=32), profiles=ProfileSet([prof]))
    assert est.source == "measured"
    assert est.tpot_ms == pytest.approx(prof.stage_decode_ms(30, True, True, 1, 48))


def test_model_config_errors_and_kind():
    with pytest.raises(InputError, match="--model"):
        model_config("no-such-model")
    assert gpu_kind("cpu") == "CPU"


# --- calibration at worker start ------------------------------------------------------------------

SMALL = dict(decode_batch=(1, 2), decode_context=(16,), prefill_tokens=(8,), head_rows=(1, 2), repeats=1)


def test_model_name_of_finds_shipped_specs_only():
    from executor.calibrate import model_name_of
    assert model_name_of(model_config("smollm2-135m")) == "smollm2-135m"
    assert model_name_of(TINY) is None


def test_at_worker_start_calibrates_once_and_can_be_turned_off(tmp_path, monkeypatch):
    import executor.calibrate as cal
    monkeypatch.setenv("CONTINUO_PROFILES", str(tmp_path))
    monkeypatch.setattr(cal, "START_GRID", SMALL)
    monkeypatch.setattr(cal, "model_name_of", lambda cfg: "tiny" if cfg is TINY else None)
    calls, logs = [], []
    real = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setenv(cal.AT_START_ENV, "0")
    assert cal.at_worker_start(TINY, "cpu", 1, "edge-a") is None and not calls and not list(tmp_path.iterdir())
    monkeypatch.delenv(cal.AT_START_ENV)
    path = cal.at_worker_start(TINY, "cpu", 1, "edge-a", log=logs.append)
    assert path == tmp_path / "tiny--CPU.yaml" and load_profile(path).threads == 1 and len(calls) == 1
    assert calls[0]["decode_batch"] == (1, 2)                      # the start grid, not calibrate's full one
    assert cal.at_worker_start(TINY, "cpu", 1, "edge-b", log=logs.append) == path and len(calls) == 1
    assert any("edge-a: profile of tiny" in m for m in logs)
    # a model that is no shipped spec: nothing to name the profile by, so no calibration
    other = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=16)
    assert cal.at_worker_start(other, "cpu", 1, "edge-a", log=logs.append) is None and len(calls) == 1
    assert "matches no shipped spec" in logs[-1]


def test_at_worker_start_survives_a_bad_profile_file(tmp_path, monkeypatch):
    import executor.calibrate as cal
    monkeypatch.setenv("CONTINUO_PROFILES", str(tmp_path))
    monkeypatch.setattr(cal, "model_name_of", lambda cfg: "tiny")
    monkeypatch.delenv(cal.AT_START_ENV, raising=False)         # tests/conftest.py turns it off
    (tmp_path / "broken.yaml").write_text("model: tiny\nkind: CPU\nstage_ms: fast\n")
    logs = []
    assert cal.at_worker_start(TINY, "cpu", 1, "edge-a", log=logs.append) is None
    assert "no calibration at start: InputError" in logs[-1] and "broken.yaml" in logs[-1]


def test_workers_starting_together_calibrate_once(tmp_path, monkeypatch):
    import threading
    import executor.calibrate as cal
    calls = []
    real = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **{**k, **SMALL}))
    paths = []
    ts = [threading.Thread(target=lambda: paths.append(ensure_profile(TINY, "tiny", "cpu", 1, folder=tmp_path, log=None)))
          for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1 and len(paths) == 3


def test_worker_load_runs_the_start_hook(monkeypatch):
    import executor.calibrate as cal
    from executor.transport import LoadStage
    from executor.weights import RandomSource
    from executor.worker import Worker
    seen = []
    monkeypatch.setattr(cal, "at_worker_start", lambda *a, **k: seen.append(a))
    w = Worker("edge-a", 1, 1)
    assert w.load(LoadStage(0, 2, RandomSource(TINY), "float32", 8, 16)).ok
    assert seen == [(TINY, "cpu", 1, "edge-a", "float32")]


def test_the_agent_plans_and_validates_with_the_profiles_in_the_default_folder(tmp_path, monkeypatch):
    """The demo's and the chat's plans carry calibrated estimates, as `continuo plan` does (they
    showed the datasheet's TPOT, 12.9 ms, beside a measured ~100 ms)."""
    from agent import Agent
    from policies import IntentSpec, load_policy
    cfg = model_config("smollm2-135m")
    prof = calibrate(cfg, "smollm2-135m", "cpu", threads=1, **{**GRID, "decode_context": (64, 128)})
    save_profile(prof, tmp_path)
    monkeypatch.setenv("CONTINUO_PROFILES", str(tmp_path))
    cluster, policy = load_cluster("scenarios/local/cluster.yaml"), load_policy("scenarios/local/policy.yaml")
    a = Agent(cluster, policy, use_llm=False, model=load_model_spec("smollm2-135m"))
    proposal = a.plan_spec(IntentSpec(data_class="phi"))
    assert proposal.plan.estimates.source == "measured"
    assert Agent(cluster, policy, use_llm=False, profiles=ProfileSet()).plan_spec(
        IntentSpec(data_class="phi")).plan.estimates.source == "datasheet"


def test_calibrate_measures_the_corun_table_when_asked(tmp_path):
    """--corun N: the step timed with 1..N stages decoding at once on this host, and a prefill step
    the same way; the first is 1 by definition, the others no less (a helper never speeds it up)."""
    prof = calibrate(TINY, "tiny", "cpu", threads=1, corun=2, **GRID)
    for table in (prof.corun, prof.corun_prefill):
        assert table is not None and table.procs == (1, 2)
        assert table.slowdown[0] == 1.0 and table.slowdown[1] >= 1.0
    assert not multiprocessing.active_children()     # the helper processes are stopped and joined
    assert load_profile(save_profile(prof, tmp_path)) == prof
    plain = calibrate(TINY, "tiny", "cpu", threads=1, **GRID)
    assert plain.corun is None and plain.corun_prefill is None                   # not asked: not measured


def test_calibrate_cli_refuses_a_bad_corun():
    from executor.calibrate import main
    for bad in ("1", "-2", "99"):
        with pytest.raises(InputError) as e:
            main(["--model", "smollm2-135m", "--corun", bad])
        assert e.value.field == "--corun" and bad in str(e.value)
