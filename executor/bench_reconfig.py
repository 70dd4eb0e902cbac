"""`continuo bench reconfig`: live migration vs stop-and-copy, recompute and restart, measured
side by side on one service under a steady load of concurrent streaming requests.

For each method the same closed-loop workload runs twice: once steady (the reference: token
gaps, TTFT, TPOT and the greedy outputs) and once with a series of reconfigurations of every
kind (move a boundary by one layer, add an idle node, remove a node, change the stage count).
Figures, all ratios to the steady run of the same method:
  downtime_ratio  longest token gap of any request in flight during a reconfiguration / steady p50 gap
  ttft_ratio, tpot_ratio   p50 of requests that overlap a reconfiguration / steady p50
  bandwidth_vs_copy        bytes moved / moving time (the longest any receiving worker spent in its
                           receives), over a plain copy of as many bytes between two workers
  identical        every request's greedy tokens equal the steady run's
"""
from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import Future

import torch

from policies import ModelSpec, PlacementPlan, Stage, approve, load_cluster, load_policy

from .engine import EngineConfig, RequestOutput, SamplingParams
from .migration import RoundEnd
from .service import Listener, Service

CLUSTER, POLICY = "scenarios/local/cluster.yaml", "scenarios/local/policy.yaml"
METHODS = ["live", "stop_and_copy", "recompute", "restart"]


def series(L: int) -> list[list[tuple[str, int, int]]]:
    """Start, then one reconfiguration of each kind, ending where it started."""
    h, t = L // 2, L // 3
    return [[("edge-a", 0, h - 1), ("edge-b", h, L - 1)],
            [("edge-a", 0, h), ("edge-b", h + 1, L - 1)],                                     # boundary by one
            [("edge-a", 0, t - 1), ("cloud-1", t, 2 * t - 1), ("edge-b", 2 * t, L - 1)],      # add idle node
            [("edge-a", 0, h - 1), ("cloud-1", h, L - 1)],                                    # remove a node
            [("edge-a", 0, L - 1)],                                                           # one stage
            [("edge-a", 0, h - 1), ("edge-b", h, L - 1)]]                                     # back to two


def _plan(stages, cluster, policy, spec, model, current=None):
    p = PlacementPlan(model=model, data_class="public", cluster_fingerprint=cluster.fingerprint(),
                      stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
    return approve(p, cluster, policy, None, spec, current=current)


def _phase_at(report, t: float | None) -> str | None:
    """The phase of a reconfiguration that time t fell in (phases are timed back to back)."""
    if t is None:
        return None
    edge = report.started
    for phase, secs in report.phases.items():
        edge += secs
        if t <= edge:
            return phase
    return "after"


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Load:
    """A closed loop of `concurrency` streaming requests over a fixed list of prompts."""

    def __init__(self, svc: Service, prompts: list[list[int]], max_tokens: list[int], concurrency: int):
        self.svc, self.prompts, self.max_tokens, self.conc = svc, prompts, max_tokens, concurrency
        self.outs: dict[int, RequestOutput] = {}
        self.errors: dict[int, str] = {}
        self.next = 0
        self.lock = threading.Lock()
        self.all_done = Future()
        self.finished = 0

    def _submit(self) -> None:
        with self.lock:
            if self.next >= len(self.prompts):
                return
            i, self.next = self.next, self.next + 1
        self.svc.submit(self.prompts[i], SamplingParams(max_tokens=self.max_tokens[i], ignore_eos=True),
                        Listener(on_done=lambda out, err, i=i: self._done(i, out, err)))

    def _done(self, i, out, err) -> None:
        if err:
            self.errors[i] = err
        else:
            self.outs[i] = out
        with self.lock:
            self.finished += 1
            over = self.finished == len(self.prompts)
        if over:
            self.all_done.set_result(True)
        else:
            threading.Thread(target=self._submit, daemon=True).start()

    def run(self, during=None, timeout: float = 1800) -> None:
        for _ in range(self.conc):
            self._submit()
        if during:
            during()
        self.all_done.result(timeout)


def _plain_copy_gbs(svc: Service, nbytes: int) -> float:
    """Seconds to move `nbytes` between two workers over the same bulk channel, as GB/s."""
    from .migration import BenchCopy
    rt = svc.runtime
    t0 = time.perf_counter()
    rid = 10_000 + int(t0 * 1000) % 1_000_000
    a, b = "edge-a", "edge-b"

    def go():
        from .transport import send_obj, wait_all
        with rt.lock:
            wait_all(send_obj((BenchCopy(rid, nbytes, rt.ranks[b], True), RoundEnd(rid, 0)), rt.ranks[a]))
            wait_all(send_obj((BenchCopy(rid, nbytes, rt.ranks[a], False), RoundEnd(rid, 0)), rt.ranks[b]))
        t = time.perf_counter()
        keys = [f"mig/{rid}/0/{a}", f"mig/{rid}/0/{b}"]
        while not rt.store.check(keys):
            time.sleep(0.0005)
        return time.perf_counter() - t
    secs = svc.loop.call(go)
    return nbytes / secs / 1e9


def run(as_json: bool = False, repeats: int = 1, max_tokens: int = 48, concurrency: int = 8,
        source=None, methods: list[str] | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from .weights import open_source
    console = Console()
    cluster, policy = load_cluster(CLUSTER), load_policy(POLICY)
    src = open_source(source)
    cfg = src.config
    spec = ModelSpec.from_hf_config(cfg.to_hf(), name="smollm2-135m", dtype="fp32")
    steps = series(cfg.num_layers)
    torch.set_num_threads(1)
    ec = EngineConfig(max_num_seqs=concurrency, max_model_len=512, num_kv_blocks=256, block_size=16)
    console.print(f"starting 3 workers for {cfg.num_layers}-layer model; plan {steps[0]}")
    svc = Service.launch(cluster, _plan(steps[0], cluster, policy, spec, "smollm2-135m"), source, ec,
                         threads_per_worker=1)
    tok = svc.tokenizer
    topics = ["the sea", "a mountain", "bread", "trains", "winter", "a library", "bees", "the moon", "rain",
              "a garden", "chess", "a violin", "volcanoes", "owls", "a market", "snow"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write about {t}."}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for t in topics]
    lengths = [max_tokens // 2 + (i * 7) % max_tokens for i in range(len(prompts))]
    results = {}
    try:
        for method in methods or METHODS:
            steady = Load(svc, prompts, lengths, concurrency)
            steady.run()
            ref = {i: o.token_ids for i, o in steady.outs.items()}
            gaps = [g for o in steady.outs.values() for g in o.gaps]
            p50_gap = statistics.median(gaps)
            s_ttft = statistics.median(o.ttft for o in steady.outs.values())
            s_tpot = statistics.median(o.tpot for o in steady.outs.values() if o.tpot)
            reports = []

            def reconfigure_series():
                for _ in range(repeats):
                    for stages in steps[1:]:
                        time.sleep(6 * p50_gap)          # let decoding run between reconfigurations
                        if load.all_done.done():
                            return
                        v = _plan(stages, cluster, policy, spec, "smollm2-135m", current=svc.plan.plan)
                        reports.append(svc.reconfigure(v, method=method))
            load = Load(svc, prompts, lengths, concurrency)
            load.run(during=reconfigure_series)
            windows = [(r.started, r.ended or r.started) for r in reports if r.state == "done"]
            downtimes, overlap, each = [], [], []
            for r in (r for r in reports if r.state == "done"):
                w0, w1 = r.started, r.ended or r.started
                worst, at = 0.0, None
                for o in load.outs.values():
                    ts = o.token_times
                    for a, b in zip(ts, ts[1:]):
                        if b >= w0 and a <= w1 and b - a > worst:
                            worst, at = b - a, b
                downtimes.append(worst / p50_gap)
                each.append({"delta": r.delta, "downtime_ratio": round(worst / p50_gap, 2),
                             "pause_ms": None if r.pause_s is None else round(1e3 * r.pause_s, 1),
                             "worst_gap_ends_in": _phase_at(r, at)})
            for o in load.outs.values():
                end = o.token_times[-1] if o.token_times else o.arrival
                if any(o.arrival <= w1 and end >= w0 for w0, w1 in windows):
                    overlap.append(o)
            moved = sum(sum(r.bytes_moved.values()) for r in reports)
            moving = sum(r.transfer_s or 0.0 for r in reports)
            bw = moved / moving / 1e9 if moving else None
            plain = _plain_copy_gbs(svc, max(1, moved // max(1, len(reports)))) if moved else None
            results[method] = {
                "downtime_ratio_p50": statistics.median(downtimes) if downtimes else None,
                "downtime_ratio_p99": _pct(downtimes, .99) if downtimes else None,
                "ttft_ratio_p50": statistics.median(o.ttft for o in overlap) / s_ttft if overlap else None,
                "tpot_ratio_p50": statistics.median(o.tpot for o in overlap if o.tpot) / s_tpot if overlap else None,
                "bandwidth_vs_copy": bw / plain if bw and plain else None,
                "identical": all(load.outs.get(i) is not None and load.outs[i].token_ids == ref[i] for i in ref),
                "requests_failed": len(load.errors),
                "requests": len(load.outs) + len(load.errors),
                "reconfigurations": len(reports), "aborted": sum(r.state == "aborted" for r in reports),
                "pause_ms_p50": statistics.median(1e3 * r.pause_s for r in reports if r.pause_s is not None)
                if reports else None,
                "steady_gap_p50_ms": 1e3 * p50_gap, "bytes_moved": moved,
                "each": each,
            }
            console.print(f"{method}: {json.dumps(results[method])}")
    finally:
        svc.close()
    t = Table(title="Reconfiguration under load (ratios to the steady run of the same method)")
    for col in ("method", "downtime p50", "downtime p99", "TTFT", "TPOT", "bw vs copy", "pause p50", "identical",
                "failed"):
        t.add_column(col, justify="right")
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for m, r in results.items():
        t.add_row(m, fmt(r["downtime_ratio_p50"]), fmt(r["downtime_ratio_p99"]), fmt(r["ttft_ratio_p50"]),
                  fmt(r["tpot_ratio_p50"]), fmt(r["bandwidth_vs_copy"]), fmt(r["pause_ms_p50"], "{:.1f} ms"),
                  str(r["identical"]), f"{r['requests_failed']}/{r['requests']}")
    console.print(t)
    if as_json:
        print(json.dumps(results))
    return results
