"""CLI commands of the measured-speed side: `continuo calibrate`, `continuo simulate`,
`continuo bench simulate` (the simulator's speed figure) and `continuo bench predict`.

Registered on the main app by agent/cli.py (`register(app, bench_app)`)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from policies import InputError, approve, load_cluster, load_intent_spec, load_model_spec, load_plan, load_policy

console = Console(width=None if sys.stdout.isatty() else 120)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_result(r, title: str) -> None:
    t = Table(title=title)
    for col in ("requests", "finished", "rejected", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "SLO met", "tok/s",
                "node-s", "steps"):
        t.add_column(col, justify="right")
    t.add_row(str(r.requests), str(r.finished), str(r.rejected), f"{_ms(r.ttft_ms_p50)} / {_ms(r.ttft_ms_p99)}",
              f"{_ms(r.tpot_ms_p50)} / {_ms(r.tpot_ms_p99)}",
              "-" if r.slo_attainment is None else f"{100 * r.slo_attainment:.1f}%", f"{r.throughput_tok_s:.0f}",
              f"{r.node_seconds:.0f}", str(r.steps))
    console.print(t)
    util = ", ".join(f"{s['node']}[{s['layers']}] {100 * s['busy']:.0f}%" for s in r.stage_utilisation[:12])
    more = f" (+{len(r.stage_utilisation) - 12} more)" if len(r.stage_utilisation) > 12 else ""
    console.print(f"stage utilisation: {util}{more}", highlight=False)
    src = sorted(set(r.sources))
    console.print(f"step times from: {', '.join(src)} figures", highlight=False)
    for rc in r.reconfigurations:
        console.print(f"reconfiguration ({rc.method}) at {rc.at_s:.1f} s: switched at {rc.switched_s:.2f} s, "
                      f"{rc.weight_bytes / 1e9:.2f} GB weights + {rc.kv_bytes / 1e9:.3f} GB KV, "
                      f"pause {1e3 * rc.pause_s:.2f} ms", highlight=False)


def _reconfig(spec: str):
    from policies.simulator import Reconfig
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise InputError(f"want AT_S:PLAN[:live|stop_and_copy], got {spec!r}", field="--reconfig")
    try:
        at = float(parts[0])
    except ValueError:
        raise InputError(f"not a time in seconds: {parts[0]!r}", field="--reconfig") from None
    return Reconfig(at, load_plan(parts[1]), parts[2] if len(parts) == 3 else "live")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("calibrate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def calibrate_cmd(ctx: typer.Context):
        """Time the model's own stage code on this node's device and write a profile:
        `continuo calibrate [--model M] [--device cpu|cuda] [--threads N] [--kind K] [--node N] [--corun N] [--out DIR] [--json]`."""
        from executor.calibrate import main
        raise typer.Exit(main(list(ctx.args)) or 0)

    @app.command("simulate")
    def simulate_cmd(
        cluster: Path = typer.Option(..., "--cluster", "-c"),
        policy: Path = typer.Option(..., "--policy", "-p"),
        plan_file: Path = typer.Option(..., "--plan", help="the placement plan to simulate (validated first)"),
        trace: Path = typer.Option(..., "--trace", "-t", help="rate schedule (.yaml) or requests (.csv)"),
        intent: Optional[Path] = typer.Option(None, "--intent", "-i", help="default: the plan's own"),
        model: Optional[str] = typer.Option(None, help="model spec (default: the plan's)"),
        profiles: Optional[Path] = typer.Option(None, help="profile folder (default: $CONTINUO_PROFILES or "
                                                           "~/.cache/continuo/profiles)"),
        reconfig: Optional[list[str]] = typer.Option(None, help="AT_S:PLAN[:live|stop_and_copy] (repeatable)"),
        max_num_seqs: int = typer.Option(16, min=1), max_waiting: int = typer.Option(64, min=0),
        max_prefill_tokens: int = typer.Option(512, min=1),
        max_prefill_tokens_decoding: int = typer.Option(8, min=1, help="prompt tokens per step while others decode"),
        groups_in_flight: int = typer.Option(1, min=1),
        as_json: bool = typer.Option(False, "--json"),
    ):
        """Run a trace through a plan on a model of the cluster: TTFT/TPOT, SLO attainment, throughput, utilisation."""
        from policies.profile import load_profiles
        from policies.simulator import SimConfig, simulate
        from policies.traces import load_trace
        c, p, pl = load_cluster(cluster), load_policy(policy), load_plan(plan_file)
        it = load_intent_spec(intent) if intent else None
        spec = load_model_spec(model or pl.model)
        ps = load_profiles(profiles, missing_ok=profiles is None)
        validated = approve(pl, c, p, it, spec, profiles=ps, groups_in_flight=groups_in_flight)   # PlanRejected: exit 1
        tr = load_trace(trace)
        cfg = SimConfig(max_num_seqs=max_num_seqs, max_waiting=max_waiting, max_prefill_tokens=max_prefill_tokens,
                        max_prefill_tokens_decoding=max_prefill_tokens_decoding, groups_in_flight=groups_in_flight)
        rcs = [_reconfig(s) for s in reconfig or []]
        r = simulate(c, validated.plan, spec, tr, profiles=ps, intent=validated.plan.intent, config=cfg, reconfigs=rcs)
        if as_json:
            print(json.dumps(r.as_dict()))
            return
        print_result(r, f"{pl.summary()} under {trace.name} ({len(tr)} requests over {tr.duration_s:.0f} s)")
        console.print(f"simulated in {r.sim_wall_s:.2f} s", highlight=False)

    @bench_app.command("simulate")
    def bench_simulate_cmd(nodes: int = typer.Option(64, min=1), layers: int = typer.Option(80, min=1),
                           rate: float = typer.Option(50.0, min=0.001), duration: float = typer.Option(3600.0, min=1),
                           as_json: bool = typer.Option(False, "--json")):
        """The simulator's speed: NODES H100s x LAYERS layers, DURATION s of Poisson traffic at RATE req/s."""
        from policies.simulator import simulate, speed_case
        t0 = time.perf_counter()
        c, pl, spec, tr, it, cfg = speed_case(nodes, layers, rate, duration)
        made = time.perf_counter() - t0
        r = simulate(c, pl, spec, tr, intent=it, config=cfg)
        total = time.perf_counter() - t0
        fig = {"nodes": nodes, "layers": layers, "rate": rate, "duration_s": duration, "requests": len(tr),
               "trace_s": round(made, 2), "simulate_s": round(r.sim_wall_s, 2), "total_s": round(total, 2),
               "steps": r.steps, "finished": r.finished, "rejected": r.rejected}
        if as_json:
            print(json.dumps(fig))
            return
        print_result(r, f"{nodes} nodes x {layers} layers, {duration:.0f} s at {rate:g} req/s")
        console.print(f"speed: {len(tr)} requests, {r.steps} steps simulated in {r.sim_wall_s:.2f} s "
                      f"(+ {made:.2f} s to draw the trace; {total:.2f} s in all)", highlight=False)

    @bench_app.command("predict")
    def bench_predict_cmd(as_json: bool = typer.Option(False, "--json"),
                          requests: int = typer.Option(6, min=2, help="requests measured per plan and load"),
                          quick: bool = typer.Option(False, help="2 plans x 2 loads, fewer requests (a smoke run)")):
        """Predicted vs measured TTFT and TPOT p50 on scenarios/local: cost model before and after
        calibration, and the simulator; 5 plans x 2 loads."""
        from executor.bench_predict import run
        run(as_json=as_json, requests=requests, quick=quick)
