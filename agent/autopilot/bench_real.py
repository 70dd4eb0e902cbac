"""The closed loop on the real local cluster: `continuo bench adapt [--json]`
(or `python -m agent.autopilot.bench_real [--json]`).

    three worker processes (the local scenario: edge-a, edge-b, cloud-1) behind emulated links, the
    embedded SmolLM2-135M, the HTTP admin API with an admin token, and the autopilot in auto mode
    driving it through ServerTarget, as `continuo autopilot --server URL --mode auto` does.

The load is open loop (Poisson arrivals, greedy requests, ignore_eos) through four phases of equal
length: steady, a 3x burst, idle, steady. Mid-burst the node serving the last stage is drained (the
cluster file is edited: `state: draining`); mid-idle the worker of a node that carries no stage then
is killed (SIGKILL). The steady rate and the SLO bounds come from the machine itself: one request
alone on the start plan, measured first (printed), sets the request's duration d; steady = 1 / d
requests per second (one request in flight on average), and the intent's bounds are 3x the lone
request's TTFT and TPOT.

Figures:
  requests lost          submitted but never finished, nor failed with an error, by the end (target 0)
  failed                 finished with an error
  identical              greedy tokens equal to the same prompt generated alone before the run
                         (a batch's fp32 kernels can flip a near-tie: a difference is reported, not hidden)
  reconfigurations       applied by the controller (plan changes and replicas added or drained)
  flips                  within a phase of constant load, a change back to a plan used earlier in that phase
  loss -> noticed s      from the drain (the file written) to the start of the tick that saw it
  loss -> applied s      ... to the controller's re-plan applied (its live move returned)
  SLO attainment         per phase: requests that arrived in it with TTFT and TPOT within the bounds

On one 2-core machine more nodes add no compute, so this proves the mechanism and its reactions, not
efficiency (issue 16).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
TOKEN = "bench-adapt-admin"
TOPICS = ["the sea", "a mountain", "bread", "trains", "winter", "a library", "bees", "the moon"]


class OpenLoop:
    """Poisson arrivals at a rate that changes by phase; every request's output, error and phase kept."""

    def __init__(self, svc, prompts, max_tokens: int, seed: int = 0):
        self.svc, self.prompts, self.max_tokens = svc, prompts, max_tokens
        self.rng = random.Random(seed)
        self.requests: list[dict] = []          # {i, phase, t, prompt, future}
        self.stop = threading.Event()

    def play(self, phases: list[tuple[str, float, float]], t0: float) -> None:
        from executor.engine import SamplingParams
        from executor.service import Listener
        for name, rate, seconds in phases:
            end = time.perf_counter() + seconds
            while not self.stop.is_set():
                gap = self.rng.expovariate(rate) if rate > 0 else seconds
                if time.perf_counter() + gap >= end:
                    self.stop.wait(max(0.0, end - time.perf_counter()))
                    break
                self.stop.wait(gap)
                i = len(self.requests)
                fut: Future = Future()
                k = i % len(self.prompts)
                self.requests.append({"i": i, "phase": name, "t": time.perf_counter() - t0, "prompt": k,
                                      "future": fut})
                self.svc.submit(self.prompts[k], SamplingParams(max_tokens=self.max_tokens, ignore_eos=True),
                                Listener(on_done=lambda out, err, f=fut: f.set_result((out, err))))


def _serve(app):
    import uvicorn

    from executor.runtime import free_port
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return srv, f"http://127.0.0.1:{srv.config.port}"


def run(phase_s: float = 40.0, max_tokens: int = 24, interval_s: float = 3.0, seed: int = 0,
        log=print) -> dict:
    """The whole run; returns the figures (see the module docstring)."""
    import torch

    from executor.api import create_app
    from executor.calibrate import START_GRID, ensure_profile, model_config
    from executor.engine import EngineConfig, SamplingParams
    from executor.service import Service
    from executor.weights import open_source
    from policies import IntentSpec, ModelSpec, PlacementPlan, Stage, Traffic, approve, load_cluster, load_policy
    from policies.profile import load_profiles

    from ..journal import Journal
    from .config import AutopilotConfig
    from .controller import Autopilot
    from .server_target import ServerTarget

    work = Path(tempfile.mkdtemp(prefix="continuo-bench-adapt-"))
    cluster_file = work / "cluster.yaml"
    shutil.copy(ROOT / "scenarios/local/cluster.yaml", cluster_file)
    cluster, policy = load_cluster(cluster_file), load_policy(ROOT / "scenarios/local/policy.yaml")
    torch.set_num_threads(1)
    log("profile of SmolLM2-135M on this machine's CPU (calibrated once, then reused): "
        f"{ensure_profile(model_config('smollm2-135m'), 'smollm2-135m', 'cpu', 1, 'CPU', log=None, **START_GRID)}")
    profiles = load_profiles()
    src = open_source(None)
    spec = ModelSpec.from_hf_config(src.config.to_hf(), name="smollm2-135m", dtype="fp32")
    traffic = Traffic(concurrency=8, prompt_tokens=32, output_tokens=max_tokens, context_tokens=512)
    start = PlacementPlan(model="smollm2-135m", data_class="public", cluster_fingerprint=cluster.fingerprint(),
                          intent=IntentSpec(data_class="public", traffic=traffic),
                          stages=(Stage(node="edge-a", first_layer=0, last_layer=14),
                                  Stage(node="edge-b", first_layer=15, last_layer=29)))
    log("starting 3 workers behind emulated links; start plan " + start.summary())
    svc = Service.launch(cluster, approve(start, cluster, policy, start.intent, spec), None,
                         EngineConfig(max_num_seqs=8, max_model_len=512), threads_per_worker=1, policy=policy,
                         emulate_links=True)
    server, url = _serve(create_app(svc, admin_tokens=[TOKEN]))
    stop_pilot = threading.Event()
    try:
        tok = svc.tokenizer
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write about {t}."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
                   for t in TOPICS]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        svc.generate(prompts[0], params)                             # warm-up
        alone = [svc.generate(p, params) for p in prompts]           # the references, one at a time
        reference = [o.token_ids for o in alone]
        ttft1 = statistics.median(o.ttft for o in alone)
        tpot1 = statistics.median(o.tpot for o in alone)
        duration = ttft1 + (max_tokens - 1) * tpot1
        rate = 1.0 / duration
        slo_ttft, slo_tpot = 3e3 * ttft1, 3e3 * tpot1
        log(f"a request alone: TTFT {1e3 * ttft1:.0f} ms, TPOT {1e3 * tpot1:.1f} ms, {duration:.2f} s in all -> "
            f"steady {rate:.2f} req/s, burst {3 * rate:.2f} req/s; SLO TTFT <= {slo_ttft:.0f} ms, "
            f"TPOT <= {slo_tpot:.1f} ms")
        intent = IntentSpec(data_class="public", max_ttft_ms=slo_ttft, max_tpot_ms=slo_tpot, traffic=traffic)
        cfg = AutopilotConfig(mode="auto", interval_s=interval_s, window="10s", horizon_s=60.0, hysteresis=2,
                              cooldown_s=5 * interval_s)
        target = ServerTarget(url, cluster_file, admin_token=TOKEN)
        journal = Journal(work / "journal.jsonl")
        ap = Autopilot(target, intent, policy, spec, cfg, journal=journal, profiles=profiles)
        decided: list[tuple[float, object]] = []                  # (perf_counter when it returned, decision)
        t0 = time.perf_counter()
        pilot = threading.Thread(target=ap.run, args=(stop_pilot, lambda d: decided.append((time.perf_counter(), d))),
                                 daemon=True)
        pilot.start()
        load = OpenLoop(svc, prompts, max_tokens, seed)
        phases = [("steady", rate, phase_s), ("burst", 3 * rate, phase_s), ("idle", 0.0, phase_s),
                  ("steady-2", rate, phase_s)]
        events: dict[str, dict] = {}

        def drain_then_kill():
            # mid-burst: drain the node of the live plan's last stage, by editing the cluster file
            time.sleep(phase_s * 1.5)
            node = svc.plan.plan.stages[-1].node
            text = cluster_file.read_text()
            cluster_file.write_text(text.replace(f"{{name: {node}, ", f"{{name: {node}, state: draining, "))
            events["drain"] = {"node": node, "t": time.perf_counter() - t0, "wall": time.time()}
            log(f"t={events['drain']['t']:.0f} s: {node} drained (cluster file)")
            # mid-idle: kill the worker of a node that carries no stage now (not the drained one)
            time.sleep(phase_s)
            idle = [n for n in svc.runtime.nodes if n not in svc.plan.plan.nodes and n != node
                    and n not in svc.runtime.replica_nodes]
            if not idle:
                events["kill"] = {"node": None, "t": time.perf_counter() - t0, "note": "every other node serves"}
                return
            victim = idle[0]
            os.kill(svc.runtime.procs[victim].pid, signal.SIGKILL)
            events["kill"] = {"node": victim, "t": time.perf_counter() - t0, "wall": time.time()}
            log(f"t={events['kill']['t']:.0f} s: worker of {victim} killed (SIGKILL; it carried no stage)")
        chaos = threading.Thread(target=drain_then_kill, daemon=True)
        chaos.start()
        load.play(phases, t0)
        chaos.join(timeout=phase_s)
        # let what is in flight finish (a generous bound: lost means it never ends)
        deadline = time.perf_counter() + max(60.0, 10 * duration)
        for r in load.requests:
            left = deadline - time.perf_counter()
            try:
                r["out"], r["err"] = r["future"].result(timeout=max(0.1, left))
            except Exception:
                r["out"], r["err"] = None, "lost"
        stop_pilot.set()
        pilot.join(timeout=60)
        return _figures(load, decided, events, reference, phases, t0, slo_ttft, slo_tpot, journal, work,
                        {"ttft_ms": 1e3 * ttft1, "tpot_ms": 1e3 * tpot1, "rate": rate, "duration_s": duration})
    finally:
        stop_pilot.set()
        server.should_exit = True
        svc.close()


def _figures(load, decided, events, reference, phases, t0, slo_ttft, slo_tpot, journal, work, base) -> dict:
    reqs = load.requests
    lost = [r for r in reqs if r["err"] == "lost"]
    failed = [r for r in reqs if r["err"] not in (None, "lost")]
    done = [r for r in reqs if r["err"] is None and r["out"] is not None]
    same = [r for r in done if r["out"].token_ids == reference[r["prompt"]]]
    # phase of each decision, by when it returned
    bounds, edge = [], 0.0
    for name, _, seconds in phases:
        bounds.append((name, edge, edge + seconds))
        edge += seconds

    def phase_at(t: float) -> str:
        return next((n for n, a, b in bounds if a <= t < b), "after")
    applied = [(t - t0, d) for t, d in decided if d.applied]
    moves = [(t, d) for t, d in applied if d.action in ("change", "replan")]     # the plan's own changes
    flips, changes = 0, {}
    for name, a, b in bounds:
        seen, replicas = [], []
        for t, d in applied:
            if not a <= t < b or d.action in ("replan", "drop_replica"):
                continue
            if d.action == "change":
                if d.chosen.placement_key() in seen:
                    flips += 1
                seen.append(d.current.placement_key())
            else:                   # a replica added then drained (or drained then added) in one phase
                if replicas and replicas[-1] != d.action:
                    flips += 1
                replicas.append(d.action)
            changes[name] = changes.get(name, 0) + 1
    loss = {}
    if "drain" in events:
        node, at = events["drain"]["node"], events["drain"]["t"]
        after = next(((t, d) for t, d in moves if t >= at and node not in d.chosen.nodes), None)
        # noticed: the start of the first tick that saw the node lost (Decision.t, the wall clock); the
        # re-plan is applied when that tick's live move returns
        wall = events["drain"]["wall"]
        noticed = next((d.t for _, d in decided if d.t >= wall and node in d.lost), None)
        loss = {"node": node, "noticed_s": None if noticed is None else round(noticed - wall, 2),
                "applied_s": None if after is None else round(after[0] - at, 2),
                "plan": after[1].chosen.summary() if after else None}
    kill = dict(events.get("kill") or {})
    if kill.get("node"):
        noticed = next((d.t for _, d in decided if d.t >= kill["wall"] and kill["node"] in d.lost), None)
        kill["noticed_s"] = None if noticed is None else round(noticed - kill["wall"], 2)
    per_phase = {}
    for name, _, _ in bounds:
        rs = [r for r in done if r["phase"] == name]
        ok = [r for r in rs if r["out"].ttft is not None and 1e3 * r["out"].ttft <= slo_ttft
              and (r["out"].tpot is None or 1e3 * r["out"].tpot <= slo_tpot)]
        per_phase[name] = {"requests": len([r for r in reqs if r["phase"] == name]), "finished": len(rs),
                           "slo_attainment": round(len(ok) / len(rs), 3) if rs else None,
                           "ttft_ms_p50": round(1e3 * statistics.median(r["out"].ttft for r in rs), 1) if rs else None,
                           "tpot_ms_p50": round(1e3 * statistics.median(r["out"].tpot for r in rs if r["out"].tpot), 1)
                           if rs else None,
                           "changes": changes.get(name, 0)}
    return {"requests": len(reqs), "lost": len(lost), "failed": len(failed),
            "failed_errors": sorted({str(r["err"])[:120] for r in failed})[:5],
            "identical": len(same), "compared": len(done), "reconfigurations": len(applied),
            "plans": [f"t={t:.0f}s {d.action}: " + (d.chosen.summary() if d.chosen else
                                                      f"{(d.replica or {}).get('name')} on "
                                                      f"{','.join((d.replica or {}).get('nodes') or [])}")
                      for t, d in applied],
            "replicas": {"added": sum(d.action == "add_replica" for _, d in applied),
                         "drained": sum(d.action == "drain_replica" for _, d in applied),
                         "released_failed": sum(d.action == "drop_replica" for _, d in applied)},
            "flips_under_constant_load": flips, "node_loss": loss, "worker_kill": kill, "phases": per_phase,
            "decisions": len(decided), "journal": str(journal.path), "journal_ok": journal.verify().ok,
            "alone": {k: round(v, 3) for k, v in base.items()}, "slo": {"ttft_ms": round(slo_ttft, 1),
                                                                         "tpot_ms": round(slo_tpot, 2)}}


def print_figures(r: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    t = Table(title="bench adapt (real local cluster: 3 worker processes, emulated links, SmolLM2-135M)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("requests", str(r["requests"]))
    t.add_row("requests lost (target 0)", str(r["lost"]))
    t.add_row("requests failed", str(r["failed"]))
    t.add_row("greedy outputs identical to alone", f"{r['identical']}/{r['compared']}")
    t.add_row("reconfigurations made", str(r["reconfigurations"]))
    rp = r["replicas"]
    t.add_row("replicas added / drained / released (failed)",
              f"{rp['added']} / {rp['drained']} / {rp['released_failed']}")
    t.add_row("flips under constant load (target 0)", str(r["flips_under_constant_load"]))
    nl = r["node_loss"]
    t.add_row(f"drain of {nl.get('node')}: noticed / re-plan applied after",
              f"{nl.get('noticed_s')} s / {nl.get('applied_s')} s")
    k = r["worker_kill"]
    t.add_row(f"worker of {k.get('node')} killed: noticed after", f"{k.get('noticed_s')} s")
    for name, p in r["phases"].items():
        att = "-" if p["slo_attainment"] is None else f"{100 * p['slo_attainment']:.0f}%"
        t.add_row(f"SLO attainment, {name}", f"{att} of {p['finished']} (TTFT p50 {p['ttft_ms_p50']} ms, "
                                             f"TPOT p50 {p['tpot_ms_p50']} ms, {p['changes']} changes)")
    console.print(t)
    for line in r["plans"]:
        console.print(f"  {line}", highlight=False)
    if r["failed_errors"]:
        console.print("  errors: " + "; ".join(r["failed_errors"]), highlight=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="continuo bench adapt", description=__doc__.splitlines()[0])
    ap.add_argument("--phase-s", type=float, default=40.0, help="seconds per phase (4 phases)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--interval-s", type=float, default=3.0, help="the controller's interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from policies.loading import InputError
    for name in ("phase_s", "interval_s"):
        if getattr(a, name) <= 0:
            raise InputError(f"must be positive, not {getattr(a, name)}", field="--" + name.replace("_", "-"))
    if a.max_tokens < 2:
        raise InputError(f"must be at least 2 (TPOT needs two tokens), not {a.max_tokens}", field="--max-tokens")
    log = (lambda m: print(m, file=sys.stderr)) if a.json else print
    r = run(a.phase_s, a.max_tokens, a.interval_s, a.seed, log=log)
    if a.json:
        print(json.dumps(r))
    else:
        print_figures(r)
    return 0 if r["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
