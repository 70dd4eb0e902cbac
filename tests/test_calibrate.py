"""continuo calibrate on a tiny random model: a loadable profile the cost model then prefers."""
from __future__ import annotations

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
