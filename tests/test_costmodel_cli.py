"""The CLI of the measured-speed side: calibrate, simulate, bench simulate; plan-wide corrections."""
from __future__ import annotations

import json

import pytest

from policies import load_cluster, load_model_spec
from policies.costmodel import Corrections, estimate
from policies.profile import ProfileSet, load_profiles
from tests.test_costmodel_profile import make_profile, plan2
from tests.tiny_service import run_cli

LOCAL = ["-c", "scenarios/local/cluster.yaml", "-p", "scenarios/local/policy.yaml",
         "--plan", "scenarios/local/plan-2stage.yaml"]


def test_simulate_json_and_table(capsys, monkeypatch, tmp_path):
    from policies.profile import save_profile
    monkeypatch.setenv("CONTINUO_PROFILES", str(tmp_path / "none-here"))   # the default folder: no profile
    save_profile(make_profile(), tmp_path)
    rc, out, _ = run_cli(capsys, monkeypatch, "simulate", *LOCAL, "-t", "scenarios/traces/local-small.yaml",
                         "--profiles", tmp_path, "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["requests"] > 10 and r["finished"] == r["requests"] and set(r["sources"]) == {"measured"}
    assert r["ttft_ms_p50"] > 0 and r["tpot_ms_p50"] > 0 and len(r["stage_utilisation"]) == 2
    rc, out, _ = run_cli(capsys, monkeypatch, "simulate", *LOCAL, "-t", "scenarios/traces/azure-format-sample.csv",
                         "--reconfig", "20:scenarios/local/plan-2stage.yaml:stop_and_copy")
    assert rc == 0 and "TTFT" in out and "datasheet" in out and "reconfiguration (stop_and_copy)" in out


def test_simulate_bad_input_exits_2(capsys, monkeypatch, tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0,x,1\n")
    rc, _, err = run_cli(capsys, monkeypatch, "simulate", *LOCAL, "-t", bad)
    assert rc == 2 and "t.csv:2: prompt_tokens" in err and "'x'" in err
    rc, _, err = run_cli(capsys, monkeypatch, "simulate", *LOCAL, "-t", "scenarios/traces/local-small.yaml",
                         "--reconfig", "soon:x.yaml")
    assert rc == 2 and "--reconfig" in err
    rc, _, err = run_cli(capsys, monkeypatch, "simulate", *LOCAL, "-t", "scenarios/traces/local-small.yaml",
                         "--profiles", tmp_path / "none")
    assert rc == 2 and "no such profile folder" in err


def test_bench_simulate_prints_the_speed(capsys, monkeypatch):
    rc, out, _ = run_cli(capsys, monkeypatch, "bench", "simulate", "--nodes", "8", "--layers", "16", "--rate", "5",
                         "--duration", "30", "--json")
    fig = json.loads(out)
    assert rc == 0 and fig["requests"] > 50 and fig["finished"] == fig["requests"] and fig["simulate_s"] < 10


def test_calibrate_cli_writes_where_told(capsys, monkeypatch, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "max_position_embeddings": 2048}))
    import executor.calibrate as cal
    monkeypatch.setattr(cal, "DECODE_CONTEXT", (16,))
    rc, out, _ = run_cli(capsys, monkeypatch, "calibrate", "--model", cfg, "--out", tmp_path / "p", "--threads", "1",
                         "--repeats", "1", "--node", "edge-a", "--json")
    assert rc == 0
    (p,) = load_profiles(tmp_path / "p").profiles
    assert p.model == "tiny" and p.node == "edge-a" and json.loads(out)["model"] == "tiny"
    rc, _, err = run_cli(capsys, monkeypatch, "calibrate", "--model", "nope")
    assert rc == 2 and "--model" in err


def test_observe_plan_corrects_ttft_and_tpot():
    cluster, model = load_cluster("scenarios/local/cluster.yaml"), load_model_spec("smollm2-135m")
    from policies import Traffic
    t = Traffic(concurrency=1, prompt_tokens=64, output_tokens=32, context_tokens=256)
    ps = ProfileSet([make_profile()])
    raw = estimate(plan2(), cluster, model, t, profiles=ps)
    c = Corrections()
    c.observe_plan(raw, 2 * raw.ttft_ms, 3 * raw.tpot_ms)
    fixed = estimate(plan2(), cluster, model, t, profiles=ps, corrections=c)
    hops_p = sum(s.hop_out_ms_prefill for s in raw.stages)
    hops_d = sum(s.hop_out_ms_decode for s in raw.stages)
    # stage times scale by the factor; link times are not the stages' and stay
    assert fixed.ttft_ms == pytest.approx(2 * (raw.ttft_ms - hops_p) + hops_p)
    assert fixed.tpot_ms == pytest.approx(3 * (raw.tpot_ms - hops_d) + hops_d)


def test_observe_stage_times_from_telemetry():
    from types import SimpleNamespace as NS
    cluster, model = load_cluster("scenarios/local/cluster.yaml"), load_model_spec("smollm2-135m")
    ps, prof = ProfileSet([make_profile()]), make_profile()
    dec_pred = prof.stage_decode_ms(15, False, True, 2, 100)
    pre_pred = prof.stage_prefill_ms(15, True, False, 64)
    times = [NS(node="edge-a", start=0, end=15, decode_steps=10, decode_compute_s=None, decode_rows_per_step=None,
                prefill_steps=3, prefill_compute_s=3 * pre_pred / 1e3, prefill_tokens_per_step=64.0),
             NS(node="edge-b", start=15, end=30, decode_steps=10, decode_compute_s=1.5 * dec_pred / 1e3,
                decode_rows_per_step=2.0, prefill_steps=0, prefill_compute_s=None, prefill_tokens_per_step=None),
             NS(node="cloud-1", start=0, end=30, decode_steps=5, decode_compute_s=1.0, decode_rows_per_step=1.0,
                prefill_steps=0, prefill_compute_s=None, prefill_tokens_per_step=None)]   # another plan's stage
    c = Corrections()
    assert c.observe_stage_times(times, plan2(), cluster, model, context=100, profiles=ps) == 2
    assert c.factor("edge-a", "prefill") == pytest.approx(3.0) and c.factor("edge-a", "decode") == 1.0
    assert c.factor("edge-b", "decode") == pytest.approx(1.5) and c.factor("cloud-1", "decode") == 1.0
