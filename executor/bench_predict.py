"""`continuo bench predict`: how well the cost model and the simulator predict the real service.

On scenarios/local (three CPU worker processes, one torch thread each, SmolLM2-135M fp32), for 5
plans x 2 loads, the real service's TTFT and TPOT p50 against:

  datasheet   the cost model before calibration (the `CPU` kind's datasheet figures)
  calibrated  the cost model with a profile measured here first (`continuo calibrate`, 1 thread: what
              each worker gets)
  corrected   the calibrated cost model times correction factors, smoothed over the plans so far, as a
              controller corrects its model while serving (NVIDIA Dynamo's planner): each stage's
              compute time in the service's telemetry during the plan's warm-up / calibrated
              (Corrections.observe_stage_times), and from the same steps what each message costs
              beyond its link and the driver's turn per step (Corrections.observe_transport); without
              telemetry, the warm-up's TTFT and TPOT (Corrections.observe_plan)
  simulator   the simulator on the corrected cost model, fed the loads' own waves
  residual    corrected, with TPOT times the residual at that load: measured / corrected TPOT of the
              plans measured before this one at the same load (smoothed; 1 for the first plan), as the
              autopilot learns it on the live plan at the load it serves and multiplies every plan's TPOT
              by (what the stages' compute times leave out: the driver's turn, the transport, the stage
              loop, and at 4x how the rows and the groups in flight crowd the cores). A plan's own
              measurements never inform its prediction
  sim_residual  the simulator's TPOT times its own residual (measured / simulator TPOT, the same way)

The three nodes are worker processes on this one machine (`host: this-machine` in the cluster
file): the calibration also measures the co-run tables (a decode step, and a prefill step, with 1, 2,
3 stages running it at once, over alone), and the cost model and the simulator slow stages that
compute at once by them (decode steps by the first, a wave's prefill by the second), and count the
driver's turn and the stages' messages as work on those cores too. The controls, printed beside them:
the same models' TPOT with every node on a machine of its own, and with each of the model's terms in
ABLATIONS switched off on its own: each stage's messages per group (io_s), the driver's and the
messages' work on the host (corun_driver), the groups' queueing at the stages (closed_cycle_ms).

Loads: `1x` one request at a time (a request meets an idle pipeline: the cost model's TTFT
assumption), `4x` waves of 4 requests submitted together (prefilled in one step, decoded as a batch
of 4: the cost model is given concurrency 4 and prefill_rows 4); 6 requests at 1x, 3 waves at 4x
(the median of one wave's 4 TTFTs moved 20% from run to run). Each request makes 32 tokens
(EOS ignored) from a prompt of 48-80 random tokens. The service starts on the first plan and
moves to each next one by live reconfiguration; after each move, a cold first request (not learned
from), then two warm-up requests.

Links: with the link emulation of `Service.launch(emulate_links=True)` (the cluster file's latency
and bandwidth per pair), when this checkout has it; otherwise loopback, and it says so (the
predictions then still count the cluster file's link figures).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future

import torch

from policies import IntentSpec, ModelSpec, PlacementPlan, Stage, Traffic, approve, load_cluster, load_policy
from policies.costmodel import Corrections, estimate, smoothed
from policies.profile import ProfileSet, save_profile
from policies.simulator import SimConfig, simulate
from policies.traces import Trace

from .engine import EngineConfig, SamplingParams
from .service import Listener, Service

CLUSTER, POLICY = "scenarios/local/cluster.yaml", "scenarios/local/policy.yaml"
PLANS = [
    [("edge-a", 0, 29)],
    [("edge-a", 0, 14), ("edge-b", 15, 29)],
    [("edge-a", 0, 20), ("cloud-1", 21, 29)],
    [("edge-a", 0, 9), ("cloud-1", 10, 19), ("edge-b", 20, 29)],
    [("cloud-1", 0, 14), ("edge-b", 15, 29)],
]
LOADS = {"1x": 1, "4x": 4}
OUTPUT_TOKENS = 32
PROMPTS = (48, 64, 80)
MIN_WAVES = 3          # waves measured at least per load: one wave's median is too noisy to judge by
TARGET = 0.15
SIDES = ("datasheet", "calibrated", "corrected", "simulator", "residual", "sim_residual")
CONTROLS = ("corrected_apart", "simulator_apart")     # TPOT as if no two nodes shared this machine
# The model's terms, each switched off on its own for a control on the same measurements (corrected_without_NAME,
# simulator_without_NAME): NAME -> (the keyword of estimate and SimConfig that switches it off, what the control's
# line says the model counts with it, how it says "without")
ABLATIONS = {
    "io": ("stage_io", "TPOT with each stage's messages per group", "without them"),             # costmodel's io_s
    "driver": ("corun_driver", "TPOT with the driver's and the messages' work on the host", "without them"),
    "queueing": ("queueing", "TPOT with the groups' queueing at the stages", "without it"),     # closed_cycle_ms
}
ABLATION_CONTROLS = tuple(f"{side}_without_{n}" for n in ABLATIONS for side in ("corrected", "simulator"))
WARMUP_CONTROL = "residual_warmup"     # corrected TPOT times the residual of the earlier plans' 1x warm-ups


def _plan(stages, cluster, policy, spec, intent, current=None):
    p = PlacementPlan(model="smollm2-135m", data_class="public", cluster_fingerprint=cluster.fingerprint(),
                      stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
    return approve(p, cluster, policy, intent, spec, current=current)


def _measure(svc: Service, width: int, n: int, vocab: int, seed: int) -> list:
    """n requests in waves of `width` submitted together; returns their RequestOutputs in order."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    for w in range(-(-n // width)):
        futs = [Future() for _ in range(width)]
        prompts = [torch.randint(100, vocab, (PROMPTS[(w * width + j) % len(PROMPTS)],), generator=g).tolist()
                   for j in range(width)]

        def submit_all():          # on the engine thread: every request of the wave joins the same step
            for p, f in zip(prompts, futs):
                svc.submit(p, params, Listener(on_done=lambda out, err, f=f: f.set_result((out, err))))
        svc.loop.call(submit_all)
        svc.loop.wake.set()
        for f in futs:
            out, err = f.result(300)
            if err:
                raise RuntimeError(err)
            outs.append(out)
    return outs


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def with_residuals(rows: list[dict], alpha: float) -> list[dict]:
    """Add the residual sides to `rows` (in the order measured): each row's TPOT times the residual at
    its load, measured / predicted TPOT of the rows before it at the same load, smoothed (1 with none
    before); `residual` for the corrected model, `sim_residual` for the simulator, each with its own.

    This is what the autopilot does (Autopilot.tpot_residual: learned on the live plan at the load it
    serves, as Dynamo scales by observed / expected ITL). One residual from the 1x warm-ups cannot
    stand for 4x: there the rows and the groups in flight crowd the two cores in ways the stages'
    compute times do not show. That one is kept as the control (`residual_warmup`, from each row's
    `warmup_tpot_ratio`, the plans before it). A plan's own measurements only inform the plans after
    it. TTFT is left as the model has it."""
    learned: dict[tuple[str, str], tuple[float, int]] = {}
    warm, warm_n, plans = 1.0, 0, []
    for row in rows:
        if "warmup_tpot_ratio" in row:        # the control: one residual for both loads, from the warm-ups
            if row["plan"] not in plans:
                if plans:
                    prev = next(r for r in rows if r["plan"] == plans[-1])
                    warm, warm_n = smoothed(warm, warm_n, prev["warmup_tpot_ratio"], alpha), warm_n + 1
                plans.append(row["plan"])
            row[f"{WARMUP_CONTROL}_tpot_ms"] = row["corrected_tpot_ms"] * warm
        for side, out in (("corrected", "residual"), ("simulator", "sim_residual")):
            r, n = learned.get((row["load"], side), (1.0, 0))
            row[out] = r
            row[f"{out}_ttft_ms"] = row[f"{side}_ttft_ms"]
            row[f"{out}_tpot_ms"] = row[f"{side}_tpot_ms"] * r
            learned[(row["load"], side)] = (smoothed(r, n, row["measured_tpot_ms"] / row[f"{side}_tpot_ms"], alpha),
                                            n + 1)
    return rows


def run(as_json: bool = False, requests: int = 6, quick: bool = False, source=None, profile_dir=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from .calibrate import calibrate
    from .weights import open_source
    console = Console(width=None if sys.stdout.isatty() else 130)
    cluster, policy = load_cluster(CLUSTER), load_policy(POLICY)
    src = open_source(source)
    cfg = src.config
    spec = ModelSpec.from_hf_config(cfg.to_hf(), name="smollm2-135m", dtype="fp32")
    plans = PLANS[:2] if quick else PLANS
    torch.set_num_threads(1)               # what each of the three workers gets on this machine
    t0 = time.perf_counter()
    # the sizes these loads reach: contexts of 48-112 tokens, prompts of 48-80 in waves of 1 or 4
    prof = calibrate(cfg, "smollm2-135m", "cpu", threads=1, kind="CPU", decode_batch=(1, 2, 4), decode_context=(64, 128),
                     prefill_tokens=(32, 64, 128, 256), head_rows=(1, 2, 4), corun=max(len(p) for p in plans),
                     log=lambda m: console.print(f"calibrate: {m}", highlight=False))
    path = save_profile(prof, profile_dir or tempfile.mkdtemp(prefix="continuo-profiles-"))
    console.print(f"calibrated in {time.perf_counter() - t0:.1f} s -> {path}", highlight=False)
    profiles = ProfileSet([prof])
    # scenarios/local's nodes are worker processes on this one machine (host: in the cluster file)
    apart = cluster.model_copy(update={"nodes": tuple(n.model_copy(update={"host": None}) for n in cluster.nodes)})
    intent = IntentSpec(data_class="public", traffic=Traffic(concurrency=4, context_tokens=512))
    ec = EngineConfig(max_num_seqs=8, max_model_len=512, num_kv_blocks=128, block_size=16)
    kw = {}
    emulated = "emulate_links" in inspect.signature(Service.launch).parameters
    if emulated:
        kw["emulate_links"] = True
    links = "emulated from the cluster file" if emulated else "loopback (no link emulation in this checkout)"
    console.print(f"links: {links}", highlight=False)
    svc = Service.launch(cluster, _plan(plans[0], cluster, policy, spec, intent), source, ec, threads_per_worker=1,
                         **kw)
    corrections = Corrections(alpha=0.5)
    sim_cfg = SimConfig(max_num_seqs=ec.max_num_seqs, max_waiting=ec.max_waiting,
                        max_prefill_tokens=ec.max_prefill_tokens, max_prefill_tokens_decoding=ec.max_prefill_tokens_decoding)
    load_before = os.getloadavg()[0]
    rows = []
    try:
        for pi, stages in enumerate(plans):
            if pi:
                v = _plan(stages, cluster, policy, spec, intent, current=svc.plan.plan)
                rep = svc.reconfigure(v, method="live")
                if rep.state != "done":
                    raise RuntimeError(f"reconfiguration to {v.plan.summary()} failed: {rep.error}")
            plan = svc.plan.plan
            driver = plan.stages[0].node if emulated else None   # the driver sits beside the first stage
            # the groups the engine keeps in flight on this plan (one per stage by default): the cost model
            # and the simulator are told the same, so they model the pipeline the engine runs
            groups = svc.engine.groups
            sim_g = dataclasses.replace(sim_cfg, groups_in_flight=groups)
            # warm-up after the move; its TTFT and TPOT also feed the correction factors (observed /
            # calibrated, smoothed over the plans measured so far), as a serving controller would
            tel = getattr(svc, "telemetry", None)
            _measure(svc, 1, 1, cfg.vocab_size, seed=98)     # the plan's first request, cold: not learned from
            since = tel.clock() if tel is not None else None
            warm = _measure(svc, 1, 2, cfg.vocab_size, seed=99)
            warm_prompt = round(statistics.mean(len(o.prompt_ids) for o in warm))
            warm_ttft = statistics.median(1e3 * o.ttft for o in warm)
            warm_tpot = statistics.median(1e3 * o.tpot for o in warm)
            t1 = Traffic(concurrency=1, prompt_tokens=warm_prompt, output_tokens=OUTPUT_TOKENS,
                         context_tokens=512)
            if tel is not None and tel.enabled:
                # what a pass costs beyond the stages: the transport per message, the driver per step
                corrections.observe_transport(tel.transport(since=since), cluster, driver)
            if tel is not None and tel.enabled and corrections.observe_stage_times(
                    tel.stage_times(since=since), plan, cluster, spec,
                    warm_prompt + OUTPUT_TOKENS // 2, profiles):
                corrected_by = "each stage's measured compute time (telemetry) / calibrated"
            else:
                raw = estimate(plan, cluster, spec, t1, profiles=profiles, driver_node=driver, groups_in_flight=groups)
                corrections.observe_plan(raw, warm_ttft, warm_tpot)
                corrected_by = "the warm-up's TTFT and TPOT / calibrated"
            # the control for the residual: the one learned from the warm-ups (1x) instead
            warm_pred = estimate(plan, cluster, spec, t1, profiles=profiles, corrections=corrections,
                                 driver_node=driver, groups_in_flight=groups)
            for load, width in LOADS.items():
                outs = _measure(svc, width, max(requests // width, MIN_WAVES if width > 1 else 1) * width,
                                cfg.vocab_size, seed=pi)
                ttft = statistics.median(1e3 * o.ttft for o in outs)
                tpot = statistics.median(1e3 * o.tpot for o in outs)
                prompt = statistics.mean(len(o.prompt_ids) for o in outs)
                traffic = Traffic(concurrency=width, prompt_tokens=round(prompt), output_tokens=OUTPUT_TOKENS,
                                  context_tokens=512)
                sheet = estimate(plan, cluster, spec, traffic, prefill_rows=width, driver_node=driver,
                                 groups_in_flight=groups)
                cal = estimate(plan, cluster, spec, traffic, profiles=profiles, prefill_rows=width, driver_node=driver,
                               groups_in_flight=groups)
                cor = estimate(plan, cluster, spec, traffic, profiles=profiles, corrections=corrections,
                               prefill_rows=width, driver_node=driver, groups_in_flight=groups)
                # the control: the same, as if each node had a machine of its own (no co-run slowdown)
                cor_apart = estimate(plan, apart, spec, traffic, profiles=profiles, corrections=corrections,
                                     prefill_rows=width, driver_node=driver, groups_in_flight=groups)
                # the controls for the model's terms: the same with each switched off
                off = {n: {switch: False} for n, (switch, *_) in ABLATIONS.items()}
                ablated = {f"corrected_without_{n}_tpot_ms": estimate(
                    plan, cluster, spec, traffic, profiles=profiles, corrections=corrections, prefill_rows=width,
                    driver_node=driver, groups_in_flight=groups, **o).tpot_ms for n, o in off.items()}
                # the client waits for a wave before sending the next (a closed loop): each wave is
                # simulated on its own, its requests arriving as they were measured to
                sim_ttft, sim_tpot, apart_tpot = [], [], []
                sim_ablated: dict[str, list[float]] = {n: [] for n in off}
                for w in range(0, len(outs), width):
                    wave = outs[w:w + width]
                    # a wave is submitted in one call on the engine thread: the engine sees it all at once
                    trace = Trace([0.0] * len(wave), [len(o.prompt_ids) for o in wave],
                                  [len(o.token_ids) for o in wave], "measured arrivals")
                    sim = simulate(cluster, plan, spec, trace, profiles=profiles, corrections=corrections,
                                   intent=plan.intent, driver_node=driver, config=sim_g)
                    sim_ttft += sim.ttft_ms
                    sim_tpot += sim.tpot_ms
                    apart_tpot += simulate(apart, plan, spec, trace, profiles=profiles, corrections=corrections,
                                           intent=plan.intent, driver_node=driver, config=sim_g).tpot_ms
                    for n, o in off.items():
                        sim_ablated[n] += simulate(cluster, plan, spec, trace, profiles=profiles,
                                                   corrections=corrections, intent=plan.intent, driver_node=driver,
                                                   config=dataclasses.replace(sim_g, **o)).tpot_ms
                ablated.update({f"simulator_without_{n}_tpot_ms": statistics.median(v) for n, v in sim_ablated.items()})
                row = {"plan": plan.summary(), "load": load, "measured_ttft_ms": ttft, "measured_tpot_ms": tpot,
                       "datasheet_ttft_ms": sheet.ttft_ms, "datasheet_tpot_ms": sheet.tpot_ms,
                       "calibrated_ttft_ms": cal.ttft_ms, "calibrated_tpot_ms": cal.tpot_ms,
                       "corrected_ttft_ms": cor.ttft_ms, "corrected_tpot_ms": cor.tpot_ms,
                       "simulator_ttft_ms": statistics.median(sim_ttft), "simulator_tpot_ms": statistics.median(sim_tpot),
                       "corrected_apart_tpot_ms": cor_apart.tpot_ms, "simulator_apart_tpot_ms": statistics.median(apart_tpot),
                       **ablated,
                       "warmup_tpot_ratio": warm_tpot / warm_pred.tpot_ms,
                       "calibrated_source": cal.source, "requests": len(outs), "groups_in_flight": groups}
                rows.append(row)
                console.print(f"{row['plan']} {load}: measured TTFT {ttft:.1f} ms, TPOT {tpot:.1f} ms; "
                              f"calibrated {cal.ttft_ms:.1f} / {cal.tpot_ms:.1f}; corrected {cor.ttft_ms:.1f} / "
                              f"{cor.tpot_ms:.1f}; simulator {row['simulator_ttft_ms']:.1f} / "
                              f"{row['simulator_tpot_ms']:.1f}; datasheet {sheet.ttft_ms:.1f} / {sheet.tpot_ms:.1f}",
                              highlight=False)
    finally:
        svc.close()
    with_residuals(rows, corrections.alpha)
    for row in rows:
        for side in SIDES:
            for m in ("ttft", "tpot"):
                row[f"{side}_{m}_err"] = _err(row[f"{side}_{m}_ms"], row[f"measured_{m}_ms"])
        for side in (*CONTROLS, *ABLATION_CONTROLS, WARMUP_CONTROL):
            row[f"{side}_tpot_err"] = _err(row[f"{side}_tpot_ms"], row["measured_tpot_ms"])
    t = Table(title=f"Predicted vs measured p50 (error), {len(plans)} plans x {len(LOADS)} loads")
    short = {"datasheet": "sheet", "calibrated": "calib", "corrected": "corr", "simulator": "sim",
             "residual": "corr+r", "sim_residual": "sim+r"}
    for col in ("plan", "load", "TTFT ms", *(short[s] for s in SIDES), "TPOT ms", *(short[s] for s in SIDES)):
        t.add_column(col, justify="right")
    pct = lambda e: f"{100 * e:+.0f}%"  # noqa: E731
    names = list(dict.fromkeys(r["plan"] for r in rows))
    for r in rows:
        t.add_row(f"P{names.index(r['plan']) + 1}", r["load"], f"{r['measured_ttft_ms']:.1f}",
                  *(pct(r[f"{s}_ttft_err"]) for s in SIDES),
                  f"{r['measured_tpot_ms']:.1f}",
                  *(pct(r[f"{s}_tpot_err"]) for s in SIDES))
    console.print(t)
    console.print("  ".join(f"P{i + 1} = {n}" for i, n in enumerate(names)), highlight=False)
    summary = {}
    for side in SIDES:
        errs = [abs(r[f"{side}_{m}_err"]) for r in rows for m in ("ttft", "tpot")]
        summary[side] = {"mean_abs_err": statistics.mean(errs), "max_abs_err": max(errs),
                         "within_15pct": sum(e <= TARGET for e in errs), "of": len(errs)}
        console.print(f"{side:<10}: mean |error| {100 * summary[side]['mean_abs_err']:.1f}%, max "
                      f"{100 * summary[side]['max_abs_err']:.1f}%, {summary[side]['within_15pct']}/{len(errs)} "
                      f"figures within {TARGET:.0%}", highlight=False)
    # the controls, on the same measurements: for the co-run slowdown, the same models with every node on
    # a machine of its own (TTFT is the same either way: the prefill flow shop is not slowed); for the
    # residual per load, the corrected TPOT times the earlier plans' 1x warm-ups' residual; for each of the
    # model's terms in ABLATIONS, the corrected model and the simulator without it
    def tpot_errors(side):
        errs = [abs(r[f"{side}_tpot_err"]) for r in rows]
        return statistics.mean(errs), sum(e <= TARGET for e in errs)

    controls = {}
    hosts = f"TPOT with the nodes' shared host (co-run slowdown {prof.corun.slowdown if prof.corun else '-'})"
    for side, base, label, key, what in [
            *((c, c.replace("_apart", ""), "as if apart", "with_hosts", hosts) for c in CONTROLS),
            *((f"{side}_without_{n}", side, without, f"with_{n}", what)
              for n, (_, what, without) in ABLATIONS.items() for side in ("corrected", "simulator")),
            (WARMUP_CONTROL, "residual", "with the earlier 1x warm-ups' residual (the control)", "per_load",
             "TPOT with the residual learned per load")]:
        (mean, within), (mean_b, within_b) = tpot_errors(side), tpot_errors(base)
        controls[side] = {"mean_abs_tpot_err": mean, "tpot_within_15pct": within,
                          f"{key}_mean_abs_tpot_err": mean_b, f"{key}_tpot_within_15pct": within_b, "of": len(rows)}
        console.print(f"{base:<10}: {what} mean |error| {100 * mean_b:.1f}%, {within_b}/{len(rows)} within "
                      f"{TARGET:.0%}; {label} {100 * mean:.1f}%, {within}/{len(rows)}", highlight=False)
    console.print(f"corrected: {corrected_by}, smoothed over the plans measured so far; the transport "
                  f"{corrections.message_fixed_ms:.2f} ms a message + {corrections.message_ms_per_mb:.2f} ms a MB "
                  f"beyond the link model, the driver {corrections.driver_ms:.2f} ms a step (step telemetry)",
                  highlight=False)
    load_after = os.getloadavg()[0]
    console.print(f"machine load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on "
                  f"{os.cpu_count()} cores: other work on a shared machine slows the service and the calibration "
                  "unevenly", highlight=False)
    transport = {"message_fixed_ms": corrections.message_fixed_ms, "message_ms_per_mb": corrections.message_ms_per_mb,
                 "driver_ms": corrections.driver_ms}
    result = {"links": links, "corrected_by": corrected_by, "transport": transport, "rows": rows, "summary": summary,
              "controls": controls,
              "corun": prof.corun.model_dump() if prof.corun else None,
              "corun_prefill": prof.corun_prefill.model_dump() if prof.corun_prefill else None, "profile": str(path),
              "calibrate_s": prof.seconds, "loadavg": [load_before, load_after]}
    if as_json:
        print(json.dumps(result))
    return result
