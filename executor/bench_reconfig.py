"""`continuo bench reconfig`: live migration vs stop-and-copy, recompute and restart, measured
side by side on one service under a steady load of concurrent streaming requests.

For each method a closed-loop workload runs with a series of reconfigurations of every kind (move
a boundary by one layer, add an idle node, remove a node, change the stage count), then the same
submissions again with none (the reference: token gaps, TTFT, TPOT and the greedy outputs).
Every method runs the same series from the same starting plan; the load keeps going until the
series is over, so no method skips a reconfiguration. After each reconfiguration the series waits
a quiet spell at least as long as it took; that spell is its control window.
Figures:
  downtime_ratio  longest token gap of any request in flight during a reconfiguration / the same
                  statistic over an equally long quiet window of the same run, right after it
                  (1.0: indistinguishable from ordinary jitter)
  gap_vs_median   the same longest gap / the steady run's median gap (the old, control-free figure)
  ttft_ratio, tpot_ratio   p50 of requests that overlap a reconfiguration / steady p50
  bandwidth_vs_copy        bytes moved (the receiving workers' own count of every tensor) / moving time
                           (the longest any receiving worker spent in its receives), over a plain copy
                           of as many bytes between two workers
  identical        every request's greedy tokens equal the steady run's
"""
from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import Future

import torch

from policies import IntentSpec, ModelSpec, PlacementPlan, Stage, Traffic, approve, load_cluster, load_policy

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


def _plan(stages, cluster, policy, spec, model, intent, current=None):
    p = PlacementPlan(model=model, data_class="public", cluster_fingerprint=cluster.fingerprint(),
                      stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
    return approve(p, cluster, policy, intent, spec, current=current)


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
    """A closed loop of `concurrency` streaming requests over a list of prompts: each once, or, with
    `until`, cycling through them until that event is set (submission j runs prompt j % len)."""

    def __init__(self, svc: Service, prompts: list[list[int]], max_tokens: list[int], concurrency: int,
                 until: threading.Event | None = None):
        self.svc, self.prompts, self.max_tokens, self.conc, self.until = svc, prompts, max_tokens, concurrency, until
        self.outs: dict[int, RequestOutput] = {}
        self.errors: dict[int, str] = {}
        self.next = 0
        self.lock = threading.Lock()
        self.all_done = Future()
        self.submitted = self.finished = 0

    def _more(self) -> bool:
        return self.next < len(self.prompts) if self.until is None else not self.until.is_set()

    def _submit(self) -> None:
        with self.lock:
            if not self._more():
                return
            j, self.next = self.next, self.next + 1
            self.submitted += 1
        i = j % len(self.prompts)
        self.svc.submit(self.prompts[i], SamplingParams(max_tokens=self.max_tokens[i], ignore_eos=True),
                        Listener(on_done=lambda out, err, j=j: self._done(j, out, err)))

    def _done(self, j, out, err) -> None:
        if err:
            self.errors[j] = err
        else:
            self.outs[j] = out
        with self.lock:
            self.finished += 1
            over = not self._more() and self.finished == self.submitted
        if over:
            if not self.all_done.done():
                self.all_done.set_result(True)
        else:
            threading.Thread(target=self._submit, daemon=True).start()

    def run(self, during=None, timeout: float = 1800) -> None:
        for _ in range(self.conc):
            self._submit()
        if during:
            during()
            if self.until is not None:
                self.until.set()
        self.all_done.result(timeout)


def worst_gap(outs, w0: float, w1: float) -> tuple[float, float | None]:
    """The longest token gap of any request that ends inside [w0, w1] or spans it, and when it ended."""
    worst, at = 0.0, None
    for o in outs:
        ts = o.token_times
        for a, b in zip(ts, ts[1:]):
            if b >= w0 and a <= w1 and b - a > worst:
                worst, at = b - a, b
    return worst, at


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
        source=None, methods: list[str] | None = None, emulate_links: bool = False,
        cluster_file: str | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from .weights import open_source
    console = Console()
    cluster, policy = load_cluster(cluster_file or CLUSTER), load_policy(POLICY)
    src = open_source(source)
    cfg = src.config
    spec = ModelSpec.from_hf_config(cfg.to_hf(), name="smollm2-135m", dtype="fp32")
    steps = series(cfg.num_layers)
    torch.set_num_threads(1)
    ec = EngineConfig(max_num_seqs=concurrency, max_model_len=512, num_kv_blocks=256, block_size=16)
    # the plan's traffic sizes every stage's KV pool (the validator reserves it, the executor allocates
    # it): `concurrency` requests of up to 512 tokens, i.e. 256 blocks of 16
    intent = IntentSpec(data_class="public", traffic=Traffic(concurrency=concurrency, context_tokens=512))
    console.print(f"starting 3 workers for {cfg.num_layers}-layer model; plan {steps[0]}"
                  + (" behind emulated links" if emulate_links else ""))
    svc = Service.launch(cluster, _plan(steps[0], cluster, policy, spec, "smollm2-135m", intent), src, ec,
                         threads_per_worker=1, emulate_links=emulate_links)
    if svc.links:
        from .service import describe_links
        console.print(f"emulated links: {describe_links(svc.links)}")
    devices = {n["node"]: n["device"] for n in svc.node_states()}
    console.print(f"workers compute on: {', '.join(f'{n} {d}' for n, d in devices.items())}")
    tok = svc.tokenizer
    topics = ["the sea", "a mountain", "bread", "trains", "winter", "a library", "bees", "the moon", "rain",
              "a garden", "chess", "a violin", "volcanoes", "owls", "a market", "snow"]
    if tok is not None:
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write about {t}."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False) for t in topics]
    else:
        # random weights have no tokenizer: as many seeded prompts of token ids, of chat-prompt lengths
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, cfg.vocab_size, (24 + 3 * i,), generator=g).tolist() for i in range(len(topics))]
    lengths = [max_tokens // 2 + (i * 7) % max_tokens for i in range(len(prompts))]
    results = {}
    try:
        for method in methods or METHODS:
            # a first steady pass sizes the pauses between reconfigurations
            warm = Load(svc, prompts, lengths, concurrency)
            warm.run()
            p50_gap = statistics.median(g for o in warm.outs.values() for g in o.gaps)
            reports, controls = [], []

            def reconfigure_series():
                for _ in range(repeats):
                    for stages in steps[1:]:
                        v = _plan(stages, cluster, policy, spec, "smollm2-135m", intent, current=svc.plan.plan)
                        r = svc.reconfigure(v, method=method)
                        reports.append(r)
                        # the quiet spell after it: a few steps for the switch's after-effects (cleanup,
                        # the first steps of a new stage), then a control window as long as it took
                        span = (r.ended or r.started) - r.started
                        settle_s = 4 * p50_gap
                        q0 = (r.ended or r.started) + settle_s
                        controls.append((q0, q0 + span))
                        time.sleep(settle_s + max(span, 6 * p50_gap))
            load = Load(svc, prompts, lengths, concurrency, until=threading.Event())
            load.run(during=reconfigure_series)
            # The steady reference replays the very same submissions in the same order with no
            # reconfiguration, so both runs batch alike: greedy tokens are compared request by request
            # (fp32 kernels differ with the batch's row count, so a prompt run beside other batch mates
            # can flip a near-tie; that is not what this figure is about).
            order = [j % len(prompts) for j in range(load.submitted)]
            steady = Load(svc, [prompts[i] for i in order], [lengths[i] for i in order], concurrency)
            steady.run()
            gaps = [g for o in steady.outs.values() for g in o.gaps]
            p50_gap = statistics.median(gaps)
            s_ttft = statistics.median(o.ttft for o in steady.outs.values())
            s_tpot = statistics.median(o.tpot for o in steady.outs.values() if o.tpot)
            done = [(r, c) for r, c in zip(reports, controls) if r.state == "done"]
            windows = [(r.started, r.ended or r.started) for r, _ in done]
            outs = list(load.outs.values())
            downtimes, vs_median, each = [], [], []
            for r, (c0, c1) in done:
                worst, at = worst_gap(outs, r.started, r.ended or r.started)
                quiet, _ = worst_gap(outs, c0, c1)
                quiet = quiet or p50_gap
                downtimes.append(worst / quiet)
                vs_median.append(worst / p50_gap)
                each.append({"delta": r.delta, "downtime_ratio": round(worst / quiet, 2),
                             "gap_vs_median": round(worst / p50_gap, 2),
                             "worst_gap_ms": round(1e3 * worst, 1), "control_worst_gap_ms": round(1e3 * quiet, 1),
                             "window_ms": round(1e3 * ((r.ended or r.started) - r.started), 1),
                             "pause_ms": None if r.pause_s is None else round(1e3 * r.pause_s, 1),
                             "worst_gap_ends_in": _phase_at(r, at)})
            overlap = []
            for o in outs:
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
                "gap_vs_median_p50": statistics.median(vs_median) if vs_median else None,
                "ttft_ratio_p50": statistics.median(o.ttft for o in overlap) / s_ttft if overlap else None,
                "tpot_ratio_p50": statistics.median(o.tpot for o in overlap if o.tpot) / s_tpot if overlap else None,
                "bandwidth_vs_copy": bw / plain if bw and plain else None,
                "identical": all(o.token_ids == steady.outs[j].token_ids for j, o in load.outs.items()
                                 if j in steady.outs),
                "requests_differing": sum(o.token_ids != steady.outs[j].token_ids for j, o in load.outs.items()
                                          if j in steady.outs),
                "requests_failed": len(load.errors),
                "requests": len(load.outs) + len(load.errors),
                "reconfigurations": len(reports), "aborted": sum(r.state == "aborted" for r in reports),
                "pause_ms_p50": statistics.median(1e3 * r.pause_s for r in reports if r.pause_s is not None)
                if reports else None,
                "steady_gap_p50_ms": 1e3 * p50_gap, "bytes_moved": moved, "devices": devices,
                "each": each,
            }
            # one line per method even when stdout is no terminal (rich would wrap it at 80 columns)
            console.print(f"{method}: {json.dumps(results[method])}", soft_wrap=True, highlight=False)
    finally:
        svc.close()
    t = Table(title="Reconfiguration under load (downtime: worst gap during / in an equally long quiet window; "
                    "TTFT, TPOT: to the steady run)")
    for col in ("method", "downtime p50", "downtime p99", "gap/median", "TTFT", "TPOT", "bw vs copy", "pause p50", "identical",
                "failed"):
        t.add_column(col, justify="right")
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for m, r in results.items():
        t.add_row(m, fmt(r["downtime_ratio_p50"]), fmt(r["downtime_ratio_p99"]), fmt(r["gap_vs_median_p50"]),
                  fmt(r["ttft_ratio_p50"]),
                  fmt(r["tpot_ratio_p50"]), fmt(r["bandwidth_vs_copy"]), fmt(r["pause_ms_p50"], "{:.1f} ms"),
                  str(r["identical"]), f"{r['requests_failed']}/{r['requests']}")
    console.print(t)
    if as_json:
        print(json.dumps(results))
    return results
