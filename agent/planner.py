"""The planner: the best placement for an intent among those the validator accepts.

How it searches. A plan is a chain of distinct nodes, each owning a contiguous run of layers.
Every stage's cost depends only on (node, first layer, last layer) and every hop's only on the
two nodes, so we first build tables of those costs with the cost model's own functions, with
infeasible entries (memory, trust for the ends and the private prefix) set to +inf:

  exact search    small instances (a few million chain x split combinations at most): every
                  chain of distinct eligible nodes and every split, scored with the tables in
                  numpy. The optimum under the true objective and the SLO bounds.
  DP search       larger instances: a dynamic programme over (stages used, layer boundary, last
                  node), vectorised in numpy, for several scalarisations (the objective, TTFT,
                  TPOT, bottleneck per stage count, cheapest-first). Its candidates are scored
                  with the true objective. Fast (64 nodes x 80 layers well under a second), not
                  guaranteed optimal: the proposal says `exact=False`.

Every returned plan has passed the validator (`policies.review`), and the proposal carries the
validator's sealed plan, so applying it validates nothing again. When none exists the planner
raises `Infeasible` with the constraints that conflict, in words.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from policies import (Cluster, IntentSpec, ModelSpec, PlacementPlan, Policy, Report, Stage, ValidatedPlan,
                      effective_rules, review, validate)
from policies.cluster import Node
from policies.costmodel import StageShape, decode_ms, hop_ms, memory_bytes, node_price, objective_value, prefill_ms
from policies.policy import Effective, UnknownDataClass

INF = float("inf")
EXACT_LIMIT = 1_000_000  # chain x split combinations scored exhaustively


class Infeasible(Exception):
    """No plan satisfies the policy, the intent and the cluster; `reasons` say which constraints conflict."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("no valid plan: " + "; ".join(reasons))


RERANK_SHARED = 16      # valid plans judged by the validator's estimates when eligible nodes share a host


@dataclass(frozen=True)
class PlanProposal:
    """The planner's answer: the plan (with estimates and fingerprint), its validator report, and how it was found.

    validated: the validator's sealed plan (checked against `current` as the planner was given it)."""
    plan: PlacementPlan
    report: Report
    objective: str
    score: float
    exact: bool
    considered: int
    notes: tuple[str, ...] = ()
    validated: ValidatedPlan | None = None


@dataclass
class _Tables:
    """Per-stage and per-hop costs over eligible nodes, indexed [node, a, b] for layers a..b-1."""
    nodes: list[Node]
    L: int
    feas: np.ndarray          # bool [n, L+1, L+1]
    pre: np.ndarray           # prefill ms
    dec: np.ndarray           # decode ms at the full batch
    price: np.ndarray         # [n]
    hop_ok: np.ndarray        # bool [n, n]
    hop_pre: np.ndarray       # ms for the prompt's activations
    hop_dec: np.ndarray       # ms for one decode step of the batch
    dec_m: dict[int, np.ndarray] = field(default_factory=dict)     # k -> decode ms at micro-batch ceil(B/k)
    hop_m: dict[int, np.ndarray] = field(default_factory=dict)
    g: int | None = 1         # groups in flight the TPOT / throughput formulas assume (costmodel.estimate);
                              # None: one per stage, so a k-stage chain is judged at min(k, B) groups
    dec_g: np.ndarray | None = None   # decode ms of a group of ceil(B / g), and its hops
    hop_g: np.ndarray | None = None


def _eligible(cluster: Cluster, eff: Effective, intent: IntentSpec) -> tuple[list[Node], dict[str, list[str]]]:
    why: dict[str, list[str]] = {}
    ok = []
    for n in cluster.nodes:
        reasons = []
        if n.state != "up":
            reasons.append(n.state)
        if n.name in intent.exclude_nodes:
            reasons.append("excluded by the intent")
        if eff.jurisdictions is not None and n.jurisdiction not in eff.jurisdictions:
            reasons.append(f"in {n.jurisdiction}")
        if not n.trust.at_least(eff.min_trust):
            reasons.append(f"only {n.trust.value}")
        if not eff.may_store_kv(n) and not reasons:
            reasons.append("may not hold the KV cache")
        if reasons:
            why[n.name] = reasons
        else:
            ok.append(n)
    return ok, why


def _build_tables(nodes: list[Node], cluster: Cluster, eff: Effective, model: ModelSpec, intent: IntentSpec,
                  K: int, prices, speed: dict) -> _Tables:
    L, t = model.num_layers, intent.traffic
    n = len(nodes)
    a = np.arange(L + 1)[:, None]
    b = np.arange(L + 1)[None, :]
    valid = b > a
    c = np.clip(b - a, 0, L)
    e = (a == 0) & valid
    h = (b == L) & valid
    # groups in flight: a fixed count, or None as the engine runs (one group per stage: then each chain
    # is judged with its own stage count's groups, see _score)
    g_set = speed.get("groups_in_flight", 1)
    g = None if g_set is None else min(g_set, t.concurrency)
    profiles, corr = speed.get("profiles"), speed.get("corrections")
    batches = sorted({t.concurrency, math.ceil(t.concurrency / (g or 1))} | {math.ceil(t.concurrency / k) for k in range(1, K + 1)})
    # Per (hardware, layers, embed, head) tables; nodes with the same hardware share them.
    cache: dict[tuple, tuple] = {}
    shape = (n, L + 1, L + 1)
    feas, pre = np.zeros(shape, bool), np.full(shape, INF)
    dec_b = {m: np.full(shape, INF) for m in batches}
    for i, node in enumerate(nodes):
        prof = profiles.find(node, model.name) if profiles else None
        fp, fd = (corr.factor(node.name, "prefill"), corr.factor(node.name, "decode")) if corr else (1.0, 1.0)
        key = (node.gpu, node.gpus, node.memory_gb, node.reserved_gb, id(prof), fp, fd)
        if key not in cache:
            tab = np.full((2 + len(batches), L + 1, 2, 2), INF)
            counts = np.arange(1, L + 1, dtype=float)
            for ee in (0, 1):
                for hh in (0, 1):
                    s = StageShape(counts, bool(ee), bool(hh))   # every layer count at once
                    tab[0, 1:, ee, hh] = memory_bytes(model, s, t)
                    tab[1, 1:, ee, hh] = fp * prefill_ms(model, s, node, t.prompt_tokens, prof)
                    for j, m in enumerate(batches):
                        tab[2 + j, 1:, ee, hh] = fd * decode_ms(model, s, node, m, t, prof)
            cache[key] = tab
        tab = cache[key]
        ends_ok = eff.may_hold_ends(node)
        fit = valid & (tab[0][c, e.astype(int), h.astype(int)] <= node.usable_memory_bytes)
        if not ends_ok:
            fit &= ~e & ~h & (a >= eff.prefix_layers)
        feas[i] = fit
        pre[i] = np.where(fit, tab[1][c, e.astype(int), h.astype(int)], INF)
        for j, m in enumerate(batches):
            dec_b[m][i] = np.where(fit, tab[2 + j][c, e.astype(int), h.astype(int)], INF)
    hop_ok = np.zeros((n, n), bool)
    hop_pre = np.full((n, n), INF)
    hop_b = {m: np.full((n, n), INF) for m in batches}
    for i, u in enumerate(nodes):
        for j, v in enumerate(nodes):
            if i == j:
                continue
            link = cluster.link(u.name, v.name)
            if link is None:
                continue
            crosses = u.trust != v.trust or u.jurisdiction != v.jurisdiction
            if eff.encrypt_cross_boundary and crosses and not link.encrypted:
                continue
            hop_ok[i, j] = True
            hop_pre[i, j] = hop_ms(model, link, t.prompt_tokens)
            for m in batches:
                hop_b[m][i, j] = hop_ms(model, link, m)
    price = np.array([node_price(x, prices) for x in nodes])
    tb = _Tables(nodes, L, feas, pre, dec_b[t.concurrency], price, hop_ok, hop_pre, hop_b[t.concurrency], g=g)
    tb.dec_g, tb.hop_g = dec_b[math.ceil(t.concurrency / (g or 1))], hop_b[math.ceil(t.concurrency / (g or 1))]
    for k in range(1, K + 1):
        m = math.ceil(t.concurrency / k)
        tb.dec_m[k], tb.hop_m[k] = dec_b[m], hop_b[m]
    return tb


def _score(tb: _Tables, intent: IntentSpec, chains: np.ndarray, bounds: np.ndarray, objective: str):
    """Objective of every (chain, split) pair. chains: [P, k] node indices; bounds: [C, k+1].

    Returns (score [P, C], feasible [P, C]); mirrors policies.costmodel.estimate term by term.
    """
    t = intent.traffic
    k = chains.shape[1]
    P, C = chains.shape[0], bounds.shape[0]
    ttft, tpot, slow, price = np.zeros((P, C)), np.zeros((P, C)), np.zeros((P, C)), np.zeros((P, 1))
    pass_g = np.zeros((P, C))
    ok = np.ones((P, C), bool)
    if tb.g is None:               # one group per stage: this chain length's groups (as the engine runs it)
        g, dec_g, hop_g = min(k, t.concurrency), tb.dec_m[k], tb.hop_m[k]
    else:
        g, dec_g, hop_g = tb.g, tb.dec_g, tb.hop_g
    for j in range(k):
        w = chains[:, j][:, None]
        a, b = bounds[None, :, j], bounds[None, :, j + 1]
        ok &= tb.feas[w, a, b]
        ttft += tb.pre[w, a, b]
        tpot += tb.dec[w, a, b]
        stage_g = dec_g[w, a, b]           # a group of ceil(B / g) (costmodel.estimate)
        price += tb.price[chains[:, j]][:, None]
        if j + 1 < k:
            v = chains[:, j + 1][:, None]
            ttft += tb.hop_pre[w, v]
            tpot += tb.hop_dec[w, v]
            stage_g = stage_g + hop_g[w, v]
        pass_g += stage_g
        slow = np.maximum(slow, stage_g)
    if g > 1:
        tpot = np.maximum(pass_g, g * slow)   # TPOT is one round (equal to tpot above when g = 1)
    if intent.max_ttft_ms is not None:
        ok &= ttft <= intent.max_ttft_ms
    if intent.max_tpot_ms is not None:
        ok &= tpot <= intent.max_tpot_ms
    latency = ttft + (t.output_tokens - 1) * tpot
    with np.errstate(divide="ignore", invalid="ignore"):
        thr = 1e3 * t.concurrency / tpot
        if objective == "latency":
            score = latency
        elif objective == "throughput":
            score = -thr
        elif objective == "cost":
            score = price * 1e9 + latency
        else:
            score = price / (thr * 3600) * 1e6
    score = np.where(ok & np.isfinite(latency), score, INF)
    return score, ok


def _splits(L: int, k: int) -> np.ndarray:
    """Every way to cut L layers into k non-empty contiguous runs, as boundaries [C, k+1]."""
    combos = list(itertools.combinations(range(1, L), k - 1))
    cuts = np.array(combos, dtype=np.int64).reshape(len(combos), k - 1)
    C = cuts.shape[0]
    return np.concatenate([np.zeros((C, 1), np.int64), cuts, np.full((C, 1), L, np.int64)], axis=1)


def _chains(tb: _Tables, k: int) -> np.ndarray:
    ends = np.array([tb.feas[i, 0, :].any() for i in range(len(tb.nodes))])
    tails = np.array([tb.feas[i, :, tb.L].any() for i in range(len(tb.nodes))])
    out = [ch for ch in itertools.permutations(range(len(tb.nodes)), k)
           if ends[ch[0]] and tails[ch[-1]] and all(tb.hop_ok[ch[j], ch[j + 1]] for j in range(k - 1))]
    return np.array(out, dtype=np.int64).reshape(-1, k)


def _combinations(n: int, L: int, K: int) -> int:
    return sum(math.perm(n, k) * math.comb(L - 1, k - 1) for k in range(1, min(K, L) + 1))


def _exact_candidates(tb: _Tables, intent: IntentSpec, K: int, objective: str):
    """Best (chain, bounds) for each stage count, by exhaustive scoring. Yields (score, chain, bounds)."""
    for k in range(1, min(K, tb.L, len(tb.nodes)) + 1):
        chains = _chains(tb, k)
        if not len(chains):
            continue
        bounds = _splits(tb.L, k)
        for lo in range(0, len(chains), max(1, 2_000_000 // len(bounds))):
            part = chains[lo:lo + max(1, 2_000_000 // len(bounds))]
            score, _ = _score(tb, intent, part, bounds, objective)
            order = np.argsort(score, axis=None)[:4]
            for flat in order:
                p, c = np.unravel_index(flat, score.shape)
                if np.isfinite(score[p, c]):
                    yield float(score[p, c]), tuple(part[p]), tuple(bounds[c])


def _dp(stage: np.ndarray, hop: np.ndarray, K: int, combine: str, only_k: int | None = None):
    """Best chains by DP over (stages, boundary, last node); node reuse is checked afterwards.

    stage: [n, L+1, L+1] cost of node w owning layers a..b-1; hop: [n, n] cost of v -> w (inf: no hop).
    combine: 'sum' (additive objectives) or 'max' (bottleneck). Yields (k, chain, bounds) per end node.
    """
    n, L = stage.shape[0], stage.shape[1] - 1
    op = np.add if combine == "sum" else np.maximum
    D = stage[:, 0, :].T.copy()                 # D[b, w]: best with j stages covering [0, b), last on w
    back = []                                   # per j: (argmin v [L+1, n], argmin a [L+1, n])
    for k in range(1, K + 1):
        if k > 1:
            M_all = op(D[:, :, None], hop[None, :, :])        # [a, v, w]
            vbest = np.argmin(M_all, axis=1)                  # [a, w]
            M = np.take_along_axis(M_all, vbest[:, None, :], axis=1)[:, 0, :]   # [a, w]
            T = op(M.T[:, :, None], stage)                    # [w, a, b]
            abest = np.argmin(T, axis=1)                      # [w, b]
            D = np.take_along_axis(T, abest[:, None, :], axis=1)[:, 0, :].T     # [b, w]
            back.append((vbest, abest.T))
        if only_k is not None and k != only_k:
            continue
        for w in range(n):
            if not np.isfinite(D[L, w]):
                continue
            chain, bounds, b, node = [w], [L], L, w
            for j in range(k - 1, 0, -1):
                vbest, abest = back[j - 1]
                a = int(abest[b, node])
                prev = int(vbest[a, node])
                chain.append(prev)
                bounds.append(a)
                b, node = a, prev
            bounds.append(0)
            yield k, tuple(reversed(chain)), tuple(reversed(bounds))


def _dp_candidates(tb: _Tables, intent: IntentSpec, K: int):
    """Candidate plans from DP runs suited to the objective (plus TTFT/TPOT runs when SLOs are set)."""
    t, obj = intent.traffic, intent.objective
    out = t.output_tokens - 1
    lat_stage = tb.pre + out * tb.dec
    lat_hop = np.where(tb.hop_ok, tb.hop_pre + out * tb.hop_dec, INF)
    runs = [(lat_stage, lat_hop, "sum", None)]
    if intent.max_ttft_ms is not None:
        runs.append((tb.pre, np.where(tb.hop_ok, tb.hop_pre, INF), "sum", None))
    if intent.max_tpot_ms is not None or (obj in ("throughput", "balanced") and tb.g == 1):
        # with one group in flight, throughput = B / TPOT: the fastest pass is the best bottleneck
        runs.append((tb.dec, np.where(tb.hop_ok, tb.hop_dec, INF), "sum", None))
    if obj in ("cost", "balanced"):
        runs.append((lat_stage + tb.price[:, None, None] * 1e9, lat_hop, "sum", None))
    # Price levels: cheapest-first plans use only nodes at or under a level (at most 4 levels).
    prices = sorted(set(tb.price.tolist()))
    levels = [prices[round(q * (len(prices) - 1))] for q in (0, 1 / 3, 2 / 3, 1)] if obj in ("cost", "balanced") \
        else [prices[-1]]
    for p in sorted(set(levels)):
        cheap = (tb.price <= p)[:, None, None]
        if obj == "cost":
            runs.append((np.where(cheap, lat_stage, INF), lat_hop, "sum", None))
        if obj in ("throughput", "balanced"):
            for k in range(1, K + 1):   # bottleneck at this stage count's micro-batch size
                runs.append((np.where(cheap, tb.dec_m[k], INF), np.where(tb.hop_ok, tb.hop_m[k], INF), "max", k))
    seen = set()
    for stage, hop, combine, only_k in runs:
        for k, chain, bounds in _dp(stage, hop, only_k or K, combine, only_k):
            if len(set(chain)) == len(chain) and (chain, bounds) not in seen:
                seen.add((chain, bounds))
                yield chain, bounds


def _slowed_by_sharing(nodes, model: ModelSpec, profiles) -> bool:
    """Whether two of `nodes` share a host whose profile has a co-run table (else sharing slows nothing)."""
    if not profiles:
        return False
    by_host: dict[str, list] = {}
    for n in nodes:
        if n.host is not None:
            by_host.setdefault(n.host, []).append(n)
    return any(len(ns) > 1 and any((p := profiles.find(n, model.name)) is not None and p.corun is not None for n in ns)
               for ns in by_host.values())


def _to_plan(tb: _Tables, chain, bounds, model: ModelSpec, intent: IntentSpec, cluster: Cluster) -> PlacementPlan:
    stages = tuple(Stage(node=tb.nodes[w].name, first_layer=int(bounds[j]), last_layer=int(bounds[j + 1]) - 1)
                   for j, w in enumerate(chain))
    return PlacementPlan(model=intent.model or model.name, data_class=intent.data_class, stages=stages,
                         cluster_fingerprint=cluster.fingerprint(), intent=intent)


def _search(nodes, cluster, policy, eff, model, intent, K, prices, current, speed=None):
    """Returns (proposal or None, considered)."""
    if not nodes:
        return None, 0
    speed = speed or {}
    tb = _build_tables(nodes, cluster, eff, model, intent, K, prices, speed)
    exact = _combinations(len(nodes), model.num_layers, K) <= EXACT_LIMIT
    if exact:
        cands = sorted(_exact_candidates(tb, intent, K, intent.objective))
        pairs = [(c, b) for _, c, b in cands]
    else:
        pairs = list(_dp_candidates(tb, intent, K))
    scored = []
    for chain, bounds in pairs:
        s, _ = _score(tb, intent, np.array([chain]), np.array([bounds]), intent.objective)
        if np.isfinite(s[0, 0]):
            scored.append((float(s[0, 0]), chain, bounds))
    scored.sort()
    # The tables know nothing of nodes that share a host (costmodel.host_slowdowns: stages computing at
    # once slow each other), which the validator's estimates count. Where eligible nodes share one and
    # their profiles measured how much (a co-run table), the first RERANK_SHARED valid plans by the
    # tables are judged by the estimates' objective instead.
    rerank = RERANK_SHARED if _slowed_by_sharing(nodes, model, speed.get("profiles")) else 1
    best = None
    for score, chain, bounds in scored:
        plan = _to_plan(tb, chain, bounds, model, intent, cluster)
        report, validated = review(plan, cluster, policy, intent, model, current, prices, **speed)
        if validated is not None:
            value = objective_value(intent.objective, report.estimates, intent.traffic)
            if best is None or value < best[0]:
                best = (value, validated, report)
            rerank -= 1
            if rerank == 0:
                break
    if best is None:
        return None, len(pairs)
    value, validated, report = best
    return PlanProposal(validated.plan, report, intent.objective, value, exact, len(pairs),
                        validated=validated), len(pairs)


def plan(intent: IntentSpec, cluster: Cluster, policy: Policy, model: ModelSpec,
         current: PlacementPlan | None = None, max_stages: int = 8,
         prices: dict[str, float] | None = None, **speed) -> PlanProposal:
    """The best valid plan for the intent's objective; raises Infeasible with reasons when none exists.
    `speed`: profiles=, corrections=, groups_in_flight= for the cost model (costmodel.estimate);
    groups_in_flight=None judges each plan as the engine runs it, one group per stage."""
    try:
        eff = effective_rules(policy, intent)
    except UnknownDataClass as e:
        raise Infeasible([str(e)]) from None
    nodes, why = _eligible(cluster, eff, intent)
    K = max(1, min(max_stages, len(nodes), model.num_layers))
    notes = list(eff.notes)
    if intent.prefer_tier:
        preferred = [n for n in nodes if n.tier == intent.prefer_tier]
        found, _ = _search(preferred, cluster, policy, eff, model, intent, K, prices, current, speed)
        if found:
            return PlanProposal(**{**found.__dict__, "notes": tuple(notes + [f"placed on {intent.prefer_tier} "
                                                                              "nodes only, as preferred"])})
        notes.append(f"no valid plan on {intent.prefer_tier} nodes alone; other tiers used")
    found, _ = _search(nodes, cluster, policy, eff, model, intent, K, prices, current, speed)
    if found:
        return PlanProposal(**{**found.__dict__, "notes": tuple(notes)})
    raise Infeasible(explain(intent, cluster, policy, model, eff, nodes, why, K, prices, current, speed))


def explain(intent, cluster, policy, model, eff, nodes, why, K, prices, current, speed=None) -> list[str]:
    """Which constraints conflict, in words an operator (or an LLM) can act on."""
    cls, t = intent.data_class, intent.traffic
    juris = "/".join(sorted(eff.jurisdictions)) if eff.jurisdictions is not None else "any jurisdiction"
    reasons: list[str] = []
    if not nodes:
        counts: dict[str, list[str]] = {}
        for name, rs in why.items():
            counts.setdefault(", ".join(rs), []).append(name)
        detail = "; ".join(f"{len(v)} {k} ({', '.join(v[:3])}{'...' if len(v) > 3 else ''})" for k, v in counts.items())
        return [f"{cls} needs up nodes in {juris} with trust {eff.min_trust.value} or higher; "
                f"none of the {len(cluster.nodes)} nodes qualifies: {detail}"]
    ends = [n for n in nodes if eff.may_hold_ends(n)]
    first = StageShape(max(1, eff.prefix_layers), True, model.num_layers <= max(1, eff.prefix_layers))
    need_first = memory_bytes(model, first, t)
    if not ends:
        reasons.append(f"{cls} needs its embedding and LM head on {eff.ends_trust.value} nodes in {juris}; "
                       f"none of the eligible nodes ({', '.join(n.name for n in nodes)}) is {eff.ends_trust.value}")
    elif max(n.usable_memory_bytes for n in ends) < need_first:
        big = max(ends, key=lambda n: n.usable_memory_bytes)
        what = f"layers 0-{eff.prefix_layers - 1} and the embedding" if eff.prefix_layers else "the embedding"
        reasons.append(f"{cls} keeps {what} on {eff.ends_trust.value} nodes in {juris}: that stage needs "
                       f"{need_first / 1e9:.1f} GB (at concurrency {t.concurrency} x {t.concurrency and t.context_tokens}"
                       f" tokens of KV) but the largest such node, {big.name}, has "
                       f"{big.usable_memory_bytes / 1e9:.1f} GB usable")
    per_layer = memory_bytes(model, StageShape(model.num_layers, True, True), t)
    total_cap = sum(n.usable_memory_bytes for n in nodes)
    if total_cap < per_layer:
        avg = per_layer / max(1, len(nodes))
        reasons.append(f"{cls} needs {per_layer / 1e9:.1f} GB for {model.name} (weights + KV for {t.concurrency} x "
                       f"{t.context_tokens} tokens) but the {len(nodes)} eligible node(s) in {juris} "
                       f"have {total_cap / 1e9:.1f} GB usable in all (about {avg / 1e9:.1f} GB each would be needed); "
                       f"add nodes, or lower traffic.concurrency/context_tokens")
    if reasons:
        return reasons
    # Hard rules can be met; then the SLO bounds or the links are what conflict.
    relaxed = intent.model_copy(update={"max_ttft_ms": None, "max_tpot_ms": None})
    found, _ = _search(nodes, cluster, policy, eff, model, relaxed, K, prices, current, speed)
    if found and (intent.max_ttft_ms or intent.max_tpot_ms):
        best_ttft = _search(nodes, cluster, policy, eff, model,
                            relaxed.model_copy(update={"objective": "latency"}), K, prices, current, speed)[0]
        est = best_ttft.report.estimates if best_ttft else found.report.estimates
        parts = []
        if intent.max_ttft_ms and est.ttft_ms > intent.max_ttft_ms:
            parts.append(f"TTFT {est.ttft_ms:.0f} ms > {intent.max_ttft_ms:g} ms")
        if intent.max_tpot_ms and est.tpot_ms > intent.max_tpot_ms:
            parts.append(f"TPOT {est.tpot_ms:.1f} ms > {intent.max_tpot_ms:g} ms")
        return [f"plans exist that meet every hard rule for {cls}, but the fastest ({found.plan.summary()} or "
                f"similar) estimates {', '.join(parts) or 'figures just over the bounds'}; relax the SLO or add "
                f"faster {juris} nodes"]
    if found is None and len(nodes) > 1:
        return [f"{cls} cannot be chained over the eligible nodes within {K} stage(s): no single node fits "
                f"{model.name} and the links between eligible nodes are missing"
                + (" or unencrypted across trust boundaries" if eff.encrypt_cross_boundary else "")
                + f" (eligible: {', '.join(n.name for n in nodes)})"]
    return [f"no single eligible node fits {model.name} with its KV reservation, and max_stages={K} "
            f"does not allow enough stages"]


def brute_force(intent: IntentSpec, cluster: Cluster, policy: Policy, model: ModelSpec,
                max_stages: int, prices: dict[str, float] | None = None) -> tuple[PlacementPlan | None, float]:
    """Reference for tests and the benchmark: every chain of distinct nodes x every split, each validated."""
    L, best = model.num_layers, (None, INF)
    names = [n.name for n in cluster.nodes]
    fp = cluster.fingerprint()
    for k in range(1, min(max_stages, L, len(names)) + 1):
        for chain in itertools.permutations(names, k):
            for cuts in itertools.combinations(range(1, L), k - 1):
                b = (0, *cuts, L)
                p = PlacementPlan(model=intent.model or model.name, data_class=intent.data_class,
                                  stages=tuple(Stage(node=chain[j], first_layer=b[j], last_layer=b[j + 1] - 1)
                                               for j in range(k)), cluster_fingerprint=fp, intent=intent)
                r = validate(p, cluster, policy, intent, model, prices=prices)
                if r.ok:
                    v = objective_value(intent.objective, r.estimates, intent.traffic)
                    if v < best[1]:
                        best = (p, v)
    return best
