"""The validator: `validate(plan, cluster, policy, intent, model, current=None) -> Report`.

A pure function: no I/O, no clock. Every rule has a stable id (RULES). `review` and `approve`
(which validate once and seal) are the only ways to obtain a ValidatedPlan, the one thing the
executor accepts. The report carries what the executor then relies on: the KV reservation the
capacity rule checked and the PlanDelta the transition rule checked.
"""
from __future__ import annotations

from collections import defaultdict

from . import seal
from .cluster import Cluster, Node
from .costmodel import StageShape, estimate, kv_bytes, memory_bytes, weight_bytes, workspace_bytes
from .delta import PlanDelta
from .errors import Refused
from .intent import KV_BLOCK_TOKENS, IntentSpec, Traffic
from .modelspec import ModelSpec
from .plan import KVReservation, PlacementPlan, Report, ValidatedPlan, Violation
from .policy import Effective, Policy, UnknownDataClass, effective_rules

RULES = {
    "coverage": "every layer on exactly one stage; stages contiguous and in order; consecutive stages linked",
    "one-stage-per-node": "a node serves at most one stage (one contiguous range of layers), as the executor runs it",
    "capacity": "weights + KV reservation + activation workspace fit each node's usable memory",
    "residency": "every node that sees the data class is in a jurisdiction the class (and intent) allows",
    "min-trust": "every node that sees the data class is trusted at least as the class requires",
    "trusted-ends": "the embedding stage and the LM-head stage run on nodes trusted for the class",
    "private-prefix": "the first k layers of the class stay on nodes trusted like the ends",
    "kv-residency": "the class's KV cache is stored only on nodes allowed to hold it",
    "link-encryption": "a hop across a trust or jurisdiction boundary uses an encrypted link",
    "slo": "estimated TTFT/TPOT within the intent's bounds",
    "availability": "no stage on a node that is down or draining",
    "exclusions": "no stage on a node the intent excludes",
    "data-class": "the plan's data class exists in the policy and matches the intent",
    "transition": "moving from the current plan breaks no rule mid-way",
    "freshness": "the plan was made from the cluster state that holds now",
}
SLO_UNCERTAINTY = 0.25  # the cost model's documented error band


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB"


def _describe(node: Node) -> str:
    return f"{node.name} ({node.jurisdiction}, {node.trust.value}, {node.tier})"


def _suggest(cluster: Cluster, ok, exclude: set[str] = frozenset(), k: int = 2) -> str:
    nodes = [n for n in cluster.nodes if n.state == "up" and n.name not in exclude and ok(n)]
    nodes.sort(key=lambda n: -n.usable_memory_bytes)
    if not nodes:
        return "no node in the cluster qualifies"
    return "e.g. " + ", ".join(f"{n.name} ({n.usable_memory_bytes / 1e9:.0f} GB usable)" for n in nodes[:k])


def _crosses_boundary(a: Node, b: Node) -> bool:
    return a.trust != b.trust or a.jurisdiction != b.jurisdiction


class _Checker:
    def __init__(self, plan, cluster, policy, intent, model, current, prices, speed=None):
        self.plan, self.cluster, self.policy, self.model = plan, cluster, policy, model
        self.intent, self.current, self.prices = intent, current, prices
        self.speed = speed or {}         # profiles / corrections / groups_in_flight for the cost model
        self.violations: list[Violation] = []
        self.warnings: list[Violation] = []
        self.L = model.num_layers

    def bad(self, rule, message, hint="", stage=None, node=None):
        self.violations.append(Violation(rule=rule, message=message, hint=hint, stage=stage, node=node))

    def warn(self, rule, message, hint="", stage=None, node=None):
        self.warnings.append(Violation(rule=rule, message=message, hint=hint, stage=stage, node=node))

    # --- structure -----------------------------------------------------------
    def coverage(self) -> bool:
        plan, L, ok = self.plan, self.L, True
        if plan.model.lower() not in {self.model.name.lower(), self.model.name.split("/")[-1].lower()}:
            self.warn("coverage", f"plan names model '{plan.model}' but is checked against '{self.model.name}'")
        names = [n.name for n in self.cluster.nodes]
        for i, st in enumerate(plan.stages):
            if not self.cluster.has_node(st.node):
                ok = False
                self.bad("coverage", f"stage {i} names node '{st.node}', which cluster {self.cluster.name} does not have",
                         f"use one of: {', '.join(names)}", stage=i, node=st.node)
            if st.first_layer > st.last_layer or st.last_layer >= L:
                ok = False
                self.bad("coverage", f"stage {i} has layers {st.first_layer}-{st.last_layer}, but the model has "
                         f"layers 0-{L - 1}", "give each stage first_layer <= last_layer < "
                         f"{L}", stage=i, node=st.node)
        owners: dict[int, list[int]] = defaultdict(list)
        for i, st in enumerate(plan.stages):
            for layer in st.layers:
                if layer < L:
                    owners[layer].append(i)
        missing = [layer for layer in range(L) if not owners[layer]]
        if missing:
            ok = False
            self.bad("coverage", f"layers {_ranges(missing)} are on no stage",
                     "extend a neighbouring stage or add a stage for them")
        for layer, st in sorted(owners.items()):
            if len(st) > 1:
                ok = False
                self.bad("coverage", f"layer {layer} is on stages {', '.join(map(str, st))}",
                         "each layer belongs to exactly one stage", stage=st[1])
                break
        for i in range(1, len(plan.stages)):
            if plan.stages[i].first_layer != plan.stages[i - 1].last_layer + 1:
                if ok:
                    self.bad("coverage", f"stage {i} starts at layer {plan.stages[i].first_layer} but stage "
                             f"{i - 1} ends at layer {plan.stages[i - 1].last_layer}",
                             "order stages by layer, each starting where the previous ends", stage=i)
                ok = False
        for i in range(1, len(plan.stages)):
            a, b = plan.stages[i - 1].node, plan.stages[i].node
            if a != b and self.cluster.has_node(a) and self.cluster.has_node(b) and self.cluster.link(a, b) is None:
                ok = False
                self.bad("coverage", f"no link between {a} and {b} (stages {i - 1} -> {i})",
                         "pick consecutive nodes that the cluster file links, or add a link", stage=i, node=b)
        return ok

    def one_stage_per_node(self, eff: Effective):
        # The executor runs one worker per node holding one stage, and keys placement by node name:
        # a second stage on a node would be refused at load, or collapse into the first mid-reconfiguration.
        seen: dict[str, list[int]] = defaultdict(list)
        for i, st in enumerate(self.plan.stages):
            seen[st.node].append(i)
        for name, idx in seen.items():
            if len(idx) < 2:
                continue
            ranges = " and ".join(self.plan.stages[i].label().removesuffix(f" on {name}") for i in idx)
            self.bad("one-stage-per-node", f"{name} holds stages {', '.join(map(str, idx))} ({ranges}); a node "
                     "serves one contiguous range of layers", f"merge them into one stage on {name} (the layers "
                     f"between go with them), or move all but one to other nodes, "
                     f"{_suggest(self.cluster, eff.may_see, set(seen))}", stage=idx[1], node=name)

    # --- per-node rules --------------------------------------------------------
    def placement(self, eff: Effective):
        prefix = eff.prefix_layers
        cls = eff.data_class
        juris = ", ".join(sorted(eff.jurisdictions)) if eff.jurisdictions is not None else "any"
        for i, st in enumerate(self.plan.stages):
            if not self.cluster.has_node(st.node):
                continue
            n = self.cluster.node(st.node)
            if n.state != "up":
                self.bad("availability", f"{st.label()}: node is {n.state}",
                         f"move these layers to an up node, {_suggest(self.cluster, eff.may_see, {n.name})}",
                         stage=i, node=n.name)
            if n.name in self.intent.exclude_nodes:
                self.bad("exclusions", f"{st.label()}: the intent excludes {n.name}",
                         f"use another node, {_suggest(self.cluster, eff.may_see, set(self.intent.exclude_nodes))}",
                         stage=i, node=n.name)
            if eff.jurisdictions is not None and n.jurisdiction not in eff.jurisdictions:
                self.bad("residency", f"{st.label()}: {cls} data may only be seen in {juris}, but {n.name} is in "
                         f"{n.jurisdiction}", f"move layers {st.first_layer}-{st.last_layer} to a node in {juris}, "
                         f"{_suggest(self.cluster, eff.may_see)}", stage=i, node=n.name)
            if not n.trust.at_least(eff.min_trust):
                self.bad("min-trust", f"{st.label()}: {cls} needs nodes trusted at least {eff.min_trust.value}, "
                         f"{n.name} is {n.trust.value}", f"move layers {st.first_layer}-{st.last_layer} to a node "
                         f"of trust {eff.min_trust.value} or higher, {_suggest(self.cluster, eff.may_see)}",
                         stage=i, node=n.name)
            ends = [w for w, has in (("embedding (raw prompt tokens)", st.first_layer == 0),
                                     ("LM head (emits tokens)", st.last_layer == self.L - 1)) if has]
            ok_ends = lambda m: eff.may_see(m) and eff.may_hold_ends(m)  # noqa: E731
            if ends and not eff.may_hold_ends(n):
                self.bad("trusted-ends", f"stage {i} holds the {' and the '.join(ends)} but {_describe(n)} is not "
                         f"trusted {eff.ends_trust.value} for {cls}",
                         f"put this stage on an {eff.ends_trust.value} node in {juris}, "
                         f"{_suggest(self.cluster, ok_ends)}", stage=i, node=n.name)
            if st.first_layer < prefix and not eff.may_hold_ends(n):
                end = min(st.last_layer, prefix - 1)
                self.bad("private-prefix", f"layers 0-{prefix - 1} of {cls} requests must stay on "
                         f"{eff.ends_trust.value} nodes (their activations can be inverted), but layers "
                         f"{st.first_layer}-{end} are on {_describe(n)}",
                         f"move layers {st.first_layer}-{end} to an {eff.ends_trust.value} node in {juris}, "
                         f"{_suggest(self.cluster, ok_ends)}", stage=i, node=n.name)
            if not eff.may_store_kv(n):
                self.bad("kv-residency", f"{st.label()}: the KV cache of {cls} may not be stored on {_describe(n)}",
                         f"keep these layers on nodes allowed to hold {cls} KV, "
                         f"{_suggest(self.cluster, eff.may_store_kv)}", stage=i, node=n.name)
        if eff.encrypt_cross_boundary:
            for i in range(1, len(self.plan.stages)):
                a, b = self.plan.stages[i - 1].node, self.plan.stages[i].node
                if a == b or not (self.cluster.has_node(a) and self.cluster.has_node(b)):
                    continue
                na, nb, link = self.cluster.node(a), self.cluster.node(b), self.cluster.link(a, b)
                if link is not None and not link.encrypted and _crosses_boundary(na, nb):
                    self.bad("link-encryption", f"hop {a} -> {b} crosses a trust/jurisdiction boundary "
                             f"({na.trust.value}/{na.jurisdiction} -> {nb.trust.value}/{nb.jurisdiction}) over an "
                             f"unencrypted link", "mark the link encrypted in the cluster file once it is, or keep "
                             "consecutive stages inside one trust zone", stage=i, node=b)

    def capacity(self):
        use: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for i, st in enumerate(self.plan.stages):
            if self.cluster.has_node(st.node) and st.first_layer <= st.last_layer < self.L:
                use[st.node].append((i, memory_bytes(self.model, _shape(st, self.L), self._traffic)))
        for name, items in use.items():
            n, need = self.cluster.node(name), sum(b for _, b in items)
            if need > n.usable_memory_bytes:
                per_layer = self.model.bytes_per_layer + self.model.kv_bytes_per_token_per_layer * \
                    self._traffic.kv_tokens
                excess = int((need - n.usable_memory_bytes) // per_layer) + 1
                stages = ", ".join(str(i) for i, _ in items)
                self.bad("capacity", f"{name} needs {_gb(need)} for stage(s) {stages} (weights, KV for "
                         f"{self._traffic.concurrency} x {self._traffic.context_tokens} tokens, workspace) but has "
                         f"{_gb(n.usable_memory_bytes)} usable", f"move about {excess} layer(s) off {name} to a "
                         f"node with free memory, or lower traffic.concurrency/context_tokens", stage=items[0][0],
                         node=name)

    def slo(self, est):
        for field, value, what in (("max_ttft_ms", est.ttft_ms, "TTFT"), ("max_tpot_ms", est.tpot_ms, "TPOT")):
            bound = getattr(self.intent, field)
            if bound is None:
                continue
            if value > bound:
                slow = max(range(len(est.stages)), key=lambda i: est.stages[i].prefill_ms if what == "TTFT"
                           else est.stages[i].decode_ms)
                self.bad("slo", f"estimated {what} {value:.1f} ms exceeds the intent's {bound:g} ms",
                         f"stage {slow} on {est.stages[slow].node} is the slowest; give it fewer layers, a faster "
                         f"GPU, or use fewer hops", stage=slow, node=est.stages[slow].node)
            elif value > bound * (1 - SLO_UNCERTAINTY):
                self.warn("slo", f"estimated {what} {value:.1f} ms is within the cost model's "
                          f"{SLO_UNCERTAINTY:.0%} error band of the {bound:g} ms bound; measure before relying on it")

    def transition(self, eff: Effective, cur_eff: Effective | None, delta: PlanDelta, cur_traffic: Traffic):
        """Check the move itself, as the executor makes it: the runs of `delta`, nothing else."""
        cur = self.current
        if cur.model != self.plan.model:
            self.bad("transition", f"the current plan serves model {cur.model}, this one {self.plan.model}; a live "
                     "reconfiguration keeps the model", "deploy a new model as a new service")
            return
        moves: dict[tuple[str, str], list] = defaultdict(list)
        for run in delta.moves:
            moves[(run.src, run.dst)].append(run)
        for (src, dst), runs in moves.items():
            if not (self.cluster.has_node(src) and self.cluster.has_node(dst)):
                continue
            s, d, layers = self.cluster.node(src), self.cluster.node(dst), _labels(runs)
            for e in filter(None, (eff, cur_eff)):
                if not e.may_store_kv(d):
                    self.bad("transition", f"moving layers {layers} {src} -> {dst} would copy the KV cache "
                             f"of in-flight {e.data_class} requests to {_describe(d)}, which may not hold it",
                             "drain those requests first or pick a destination allowed to hold their KV", node=dst)
            if s.state == "down":
                self.warn("transition", f"{src} is down: KV of layers {layers} cannot be copied; "
                          "in-flight requests will re-prefill them", node=src)
                continue
            link = self.cluster.link(src, dst)
            if link is None:
                self.bad("transition", f"layers {layers} move {src} -> {dst} but there is no link between "
                         "them to carry weights and KV", "add the link or choose another destination", node=dst)
            elif eff.encrypt_cross_boundary and not link.encrypted and _crosses_boundary(s, d):
                self.bad("transition", f"KV of layers {layers} would cross a trust/jurisdiction boundary "
                         f"{src} -> {dst} over an unencrypted link", "use an encrypted link", node=dst)
        # Mid-way a rebuilt node holds its old stage (weights and KV pool) beside the new one until
        # cleanup: weights of kept layers are shared, but the new stage gets a fresh KV pool for all
        # its layers while the old pool still holds the in-flight requests' KV.
        for name in delta.rebuilt:
            if not self.cluster.has_node(name):
                continue
            had = sorted({lay for r in delta.runs if r.src == name for lay in range(r.start, r.stop) if lay < self.L})
            gets = sorted({lay for r in delta.runs if r.dst == name for lay in range(r.start, r.stop) if lay < self.L})
            if not gets:
                continue                         # it only gives layers away: it holds no more than now
            held = sorted(set(had) | set(gets))
            need = sum(weight_bytes(self.model, StageShape(len(r), r[0] == 0, r[-1] == self.L - 1))
                       for r in _runs(held))
            need += kv_bytes(self.model, StageShape(len(had), False, False), cur_traffic)
            need += kv_bytes(self.model, StageShape(len(gets), False, False), self._traffic)
            need += workspace_bytes(self.model, StageShape(len(gets), gets[0] == 0, gets[-1] == self.L - 1),
                                    self._traffic)
            n = self.cluster.node(name)
            if need > n.usable_memory_bytes:
                pools = " (and a KV pool of each size)" if delta.pool_changes else ""
                self.bad("transition", f"mid-way {name} would hold layers {_ranges(held)} of the old and new plan"
                         f"{pools} ({_gb(need)}) but has {_gb(n.usable_memory_bytes)} usable",
                         "reconfigure in two steps, or move fewer layers onto it at once", node=name)

    def freshness(self):
        now = self.cluster.fingerprint()
        fp = self.plan.cluster_fingerprint
        if fp is None:
            self.warn("freshness", "the plan carries no cluster fingerprint; it was checked against the cluster as "
                      "it is now")
        elif fp != now:
            self.bad("freshness", f"the plan was made from cluster state {fp}, but the state now is {now} "
                     "(a node changed since)", "plan again from the current cluster state")

    @property
    def _traffic(self):
        return self.intent.traffic

    def run(self) -> Report:
        """Every rule, in order; the report carries the KV reservation and the delta it checked."""
        if self.intent.data_class != self.plan.data_class:
            self.bad("data-class", f"the plan is for data class '{self.plan.data_class}' but the intent says "
                     f"'{self.intent.data_class}'", "plan again for the intent's data class")
        try:
            eff = effective_rules(self.policy, self.intent)
        except UnknownDataClass as e:
            self.bad("data-class", str(e), "use one of the policy's data classes")
            return Report(violations=tuple(self.violations))
        for note in eff.notes:
            self.warn("residency", note)
        structure_ok = self.coverage()
        self.one_stage_per_node(eff)
        self.placement(eff)
        self.capacity()
        est = None
        if structure_ok:
            est = estimate(self.plan, self.cluster, self.model, self._traffic, self.prices, **self.speed)
            self.slo(est)
        cur_traffic = None
        if self.current is not None:
            cur_intent = self.current.intent or IntentSpec(data_class=self.current.data_class)
            cur_traffic = cur_intent.traffic
        # Computed once, here: the transition rule checks it, the diff shows it, the executor runs it.
        delta = PlanDelta.between(self.current, self.plan, self.model,
                                  old_kv_blocks=cur_traffic.kv_blocks if cur_traffic else None,
                                  kv_blocks=self._traffic.kv_blocks)
        if self.current is not None:
            try:
                cur_eff = effective_rules(self.policy, cur_intent)
            except UnknownDataClass:
                cur_eff = None
            self.transition(eff, cur_eff, delta, cur_traffic)
        self.freshness()
        kv = KVReservation(blocks=self._traffic.kv_blocks, block_size=KV_BLOCK_TOKENS)
        return Report(violations=tuple(self.violations), warnings=tuple(self.warnings), estimates=est, kv=kv,
                      delta=delta)


def _shape(st, L: int) -> StageShape:
    return StageShape(st.stop - st.start, st.start == 0, st.stop == L)


def _runs(layers: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for layer in layers:
        if out and out[-1][-1] == layer - 1:
            out[-1].append(layer)
        else:
            out.append([layer])
    return out


def _labels(runs) -> str:
    """Layer runs as people read them: '9-19, 25' (last layers included)."""
    return ", ".join(f"{r.first_layer}-{r.last_layer}" if r.stop - r.start > 1 else str(r.start) for r in runs)


def _ranges(layers: list[int]) -> str:
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in _runs(sorted(layers)))


def validate(plan: PlacementPlan, cluster: Cluster, policy: Policy, intent: IntentSpec | None,
             model: ModelSpec, current: PlacementPlan | None = None,
             prices: dict[str, float] | None = None, **speed) -> Report:
    """Check a plan against every rule in RULES. Pure: no I/O. `intent` defaults to the plan's.
    `speed`: profiles=, corrections=, groups_in_flight= for the cost model (costmodel.estimate)."""
    intent = intent or plan.intent or IntentSpec(data_class=plan.data_class)
    return _Checker(plan, cluster, policy, intent, model, current, prices, speed).run()


class PlanRejected(Refused):
    """The validator found violations; `report` says which."""

    def __init__(self, report: Report):
        self.report = report
        super().__init__(report.text())


def review(plan: PlacementPlan, cluster: Cluster, policy: Policy, intent: IntentSpec | None,
           model: ModelSpec, current: PlacementPlan | None = None,
           prices: dict[str, float] | None = None, **speed) -> tuple[Report, ValidatedPlan | None]:
    """Validate once: the report, and the sealed plan for the executor when there is no violation."""
    intent = intent or plan.intent or IntentSpec(data_class=plan.data_class)
    report = validate(plan, cluster, policy, intent, model, current, prices, **speed)
    if not report.ok:
        return report, None
    # The sealed plan names what it was checked with: the cluster state (a plan without a fingerprint
    # was checked against the cluster as it is now, and the freshness rule warned), the intent (whose
    # traffic sized the KV reservation) and the estimates.
    stamped = plan.model_copy(update={"cluster_fingerprint": plan.cluster_fingerprint or cluster.fingerprint(),
                                      "intent": intent, "estimates": report.estimates})
    return report, ValidatedPlan(_issuer=seal.ISSUER, plan=stamped, report=report,
                                 cluster_fingerprint=cluster.fingerprint(), policy=policy.name,
                                 transition_from=current.placement_key() if current else None)


def approve(plan: PlacementPlan, cluster: Cluster, policy: Policy, intent: IntentSpec | None,
            model: ModelSpec, current: PlacementPlan | None = None,
            prices: dict[str, float] | None = None, **speed) -> ValidatedPlan:
    """Validate and, only if there is no violation, seal the plan for the executor; else PlanRejected."""
    report, validated = review(plan, cluster, policy, intent, model, current, prices, **speed)
    if validated is None:
        raise PlanRejected(report)
    return validated
