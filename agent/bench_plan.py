"""`continuo bench plan`: planning time and optimality gap, printed from one run."""
from __future__ import annotations

import json
import statistics
import time

from rich.console import Console
from rich.table import Table

from . import planner
from .instances import random_instance
from .planner import Infeasible, brute_force, plan

SIZES = [(8, 32), (8, 80), (32, 32), (32, 80), (64, 32), (64, 80)]
OBJECTIVES = ["latency", "throughput", "cost", "balanced"]


def _gap(value: float, best: float) -> float:
    return abs(value - best) / max(abs(best), 1e-12)


def run(as_json: bool = False, repeats: int = 5, gap_instances: int = 8) -> dict:
    console = Console()
    p50, feasible = {}, {}
    for n, L in SIZES:
        times, ok = [], 0
        for r in range(repeats):
            cluster, policy, intent, model = random_instance(7000 + r, n, L, objective=OBJECTIVES[r % 4],
                                                             with_slo=r % 2 == 1)
            t = time.perf_counter()
            try:
                plan(intent, cluster, policy, model)
                ok += 1
            except Infeasible:
                pass
            times.append(time.perf_counter() - t)
        p50[f"{n}x{L}"], feasible[f"{n}x{L}"] = statistics.median(times), ok
    # Gap to brute force on 6 nodes x 12 layers (max 3 stages): the planner as shipped, and its DP
    # search alone (forced), which is what larger instances use.
    gaps, dp_gaps, compared = [], [], 0
    for s in range(gap_instances):
        cluster, policy, intent, model = random_instance(9000 + s, 6, 12, objective=OBJECTIVES[s % 4],
                                                         with_slo=s % 2 == 1)
        _, best = brute_force(intent, cluster, policy, model, max_stages=3)
        if best == float("inf"):
            continue
        compared += 1
        gaps.append(_gap(plan(intent, cluster, policy, model, max_stages=3).score, best))
        saved, planner.EXACT_LIMIT = planner.EXACT_LIMIT, 0
        try:
            dp_gaps.append(_gap(plan(intent, cluster, policy, model, max_stages=3).score, best))
        except Infeasible:
            dp_gaps.append(float("inf"))
        finally:
            planner.EXACT_LIMIT = saved
    result = {"p50_s": {k: round(v, 4) for k, v in p50.items()}, "feasible": feasible,
              "gap_to_optimum": max(gaps) if gaps else None,
              "dp_gap_to_optimum_mean": statistics.mean(dp_gaps) if dp_gaps else None,
              "dp_gap_to_optimum_max": max(dp_gaps) if dp_gaps else None,
              "instances_vs_brute_force": compared}
    t = Table(title=f"Planning time, p50 of {repeats} random instances (all four objectives, half with SLOs)")
    t.add_column("nodes x layers")
    t.add_column("p50 seconds", justify="right")
    t.add_column("feasible", justify="right")
    for k, v in p50.items():
        t.add_row(k, f"{v:.3f}", f"{feasible[k]}/{repeats}")
    console.print(t)
    console.print(f"gap to brute force, 6 nodes x 12 layers, {compared} instances: planner max "
                  f"{result['gap_to_optimum']}, DP search alone mean {result['dp_gap_to_optimum_mean']:.4f} "
                  f"max {result['dp_gap_to_optimum_max']:.4f}")
    if as_json:
        print(json.dumps(result))
    return result
