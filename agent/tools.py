"""The tools the LLM can call, each declaring whether it changes the cluster.

Any langchain chat model with `bind_tools` drives them. A tool answers in text the model can act on;
when the model got something wrong (bad arguments, a plan that breaks a rule, no plan possible) the
tool raises ToolError and the agent's loop sends the message back, counting a failed attempt.
apply_plan and rollback go through Agent.gate: the mode, the validator and the operator decide.

This module does not import agent.agent (the agent imports it): the tools see the agent only
through the AgentLike protocol below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field, create_model

from policies import (Cluster, IntentSpec, ModelSpec, PlacementPlan, Policy, Stage, ValidatedPlan, effective_rules,
                      review)
from policies.policy import UnknownDataClass

from .planner import Infeasible


class ToolError(Exception):
    """The model's mistake, in words it can act on."""


class AgentLike(Protocol):
    """What the tools use of agent.Agent."""
    cluster: Cluster
    policy: Policy
    applied: list

    def live_plan(self) -> PlacementPlan | None: ...
    def model_for(self, spec: IntentSpec | None = None) -> ModelSpec: ...
    def plan_spec(self, spec: IntentSpec) -> Any: ...
    def gate(self, plan: PlacementPlan, spec: IntentSpec | None, mode: str | None = None,
             validated: ValidatedPlan | None = None) -> Any: ...
    def diff(self, plan: PlacementPlan, validated: ValidatedPlan | None = None) -> list: ...
    def rollback(self, mode: str | None = None) -> Any: ...
    def autopilot(self, intent: Any, target: Any = None, config: Any = None, journal: Any = None) -> Any: ...


@dataclass
class Workbench:
    """What the tools share during one chat turn: the agent, the mode, and the candidate plan.

    validated: the validator's sealed candidate, when the last check passed, so applying it does
    not validate it again."""
    agent: AgentLike
    mode: str
    candidate: PlacementPlan | None = None
    spec: IntentSpec | None = None
    emit: Callable[[str, Any], None] = lambda kind, data: None   # "plan" and "diff" events, for tables
    validated: ValidatedPlan | None = None


def _plan_text(plan: PlacementPlan) -> str:
    e = plan.estimates
    est = (f"; estimates TTFT {e.ttft_ms:.1f} ms, TPOT {e.tpot_ms:.2f} ms, {e.throughput_tok_s:.0f} tok/s, "
           f"${e.cost_per_hour:.2f}/h") if e else ""
    return f"{plan.model} for data class {plan.data_class}: {plan.summary()}{est}"


def _outcome_text(out: Any) -> str:
    diff = "\n".join(r.text() for r in out.diff)
    return f"{out.status}: {out.message}\n{diff}"


class _NoArgs(BaseModel):
    pass


class _HistoryArgs(BaseModel):
    at: str | None = Field(None, description="a time to look around: 'HH:MM' (today, UTC), an ISO time "
                           "(2026-12-02T14:02), or how long ago ('30m', '2h'); omit for the latest")
    node: str | None = Field(None, description="only changes that involve this node")
    limit: int = Field(5, ge=1, le=20, description="at most this many entries")


class _PilotArgs(BaseModel):
    action: Literal["start", "stop"]
    intent: str | None = Field(None, description="start: the operator's intent in their words (data class, "
                               "SLOs, nodes to avoid); omit to keep the intent of the plan serving now")
    mode: Literal["advisory", "confirm", "auto"] | None = Field(
        None, description="advisory: recommend and journal, never act; confirm: ask first; auto: act. Default: "
                          "the most this chat's mode allows")


# What the chat's own mode lets an autopilot it starts do (it never acts more than the chat may).
PILOT_MODES = {"read-only": (), "suggest": ("advisory",), "confirm": ("advisory", "confirm"),
               "auto": ("advisory", "confirm", "auto")}
CHANGES = ("applied", "advised", "declined", "failed", "rejected")     # decisions worth explaining


def _when(text: str, now: float) -> float:
    """'HH:MM[:SS]' today (UTC), else an ISO time or a relative one (agent.journal.parse_since)."""
    import re
    from datetime import datetime, timezone
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*", text)
    if m:
        day = datetime.fromtimestamp(now, timezone.utc)
        return day.replace(hour=int(m[1]), minute=int(m[2]), second=int(m[3] or 0), microsecond=0).timestamp()
    from .journal import parse_since
    try:
        return parse_since(text, now)
    except ValueError as e:
        raise ToolError(str(e).replace("--since", "at")) from None


def _history_rows(agent: Any) -> list[dict]:
    """Changes made or recommended, oldest first: the agent's journal if it keeps one (the autopilot's
    decisions and a person's applies), else the decisions of the autopilot this chat started."""
    def decision(d: dict, ts: float) -> dict:
        return {"t": d.get("t", ts), "who": "autopilot", "action": d.get("action"), "status": d.get("status"),
                "from": d.get("current"), "to": d.get("chosen"), "reason": d.get("reason", ""),
                "lost": d.get("lost") or {}}
    journal = getattr(agent, "journal", None)
    if journal is None:
        pilot = getattr(agent, "pilot", None)
        found = [d.as_json() for d in (pilot.autopilot.decisions if pilot else [])]
        return [decision(d, d["t"]) for d in found if d["status"] in CHANGES]
    rows = []
    for e in journal.entries(kinds={"decision", "apply"}):
        d = e["data"]
        if e["kind"] == "decision" and d.get("status") in CHANGES:
            rows.append(decision(d, e["ts"]))
        elif e["kind"] == "apply" and d.get("source") == "human":
            rows.append({"t": e["ts"], "who": f"a person ({d.get('mode')} mode)", "action": "apply",
                         "status": d.get("status"), "from": None, "to": d.get("summary"),
                         "reason": d.get("message", ""), "lost": {}})
    return rows


@dataclass
class Pilot:
    """An autopilot the chat started, running in a thread until stopped."""
    autopilot: Any
    stop: Any
    thread: Any
    mode: str


class _PolicyArgs(BaseModel):
    data_class: str | None = Field(None, description="one data class; omit for all")


def _propose_args(agent: "Agent") -> type[BaseModel]:
    """propose_plan's arguments: an IntentSpec whose data class and node names can only be the inventory's.

    Grounding by construction: a schema-constrained model cannot name a class or node that does not exist.
    """
    classes = tuple(agent.policy.data_classes)
    nodes = tuple(n.name for n in agent.cluster.nodes)
    intent = create_model("Intent", __base__=IntentSpec, data_class=(Literal[classes], ...),
                          exclude_nodes=(tuple[Literal[nodes], ...], ()))
    return create_model("ProposeArgs", intent=(intent, Field(description="the structured intent to plan for")))


class _ValidateArgs(BaseModel):
    stages: list[Stage] | None = Field(None, description="stages to check; omit to check the proposed plan")
    data_class: str | None = Field(None, description="the data class, when no plan was proposed yet")


def make_tools(bench: Workbench) -> list[StructuredTool]:
    """The eleven tools, bound to one workbench. metadata["changes_cluster"] says which ones change the world."""
    agent = bench.agent

    def inspect_cluster() -> str:
        lines = [f"cluster {agent.cluster.name}, fingerprint {agent.cluster.fingerprint()}:"]
        for n in agent.cluster.nodes:
            lines.append(f"- {n.name}: {n.gpus}x{n.gpu} {n.total_memory_gb:g} GB, {n.zone} ({n.jurisdiction}), "
                         f"{n.tier}, trust {n.trust.value}, {n.state}")
        return "\n".join(lines)

    def current_plan() -> str:
        live = agent.live_plan()
        return "nothing is serving" if live is None else "serving " + _plan_text(live)

    def explain_policy(data_class: str | None = None) -> str:
        names = [data_class] if data_class else list(agent.policy.data_classes)
        lines = [f"policy {agent.policy.name} (an intent may only tighten it):"]
        for name in names:
            try:
                eff = effective_rules(agent.policy, IntentSpec(data_class=name))
            except UnknownDataClass as e:
                raise ToolError(str(e)) from None
            rule = agent.policy.data_classes[name]
            lines.append(f"- {name}: {rule.model_dump(mode='json', exclude_none=True, exclude={'words', 'examples'})}"
                         + "".join(f"; {n}" for n in eff.notes))
        return "\n".join(lines)

    def propose_plan(intent: IntentSpec) -> str:
        intent = IntentSpec(**intent.model_dump())   # the plain spec, without the grounded schema's subclass
        try:
            proposal = agent.plan_spec(intent)
        except Infeasible as e:
            raise ToolError("no valid plan: " + "; ".join(e.reasons) + ". Relax the intent (SLOs, exclusions, "
                            "tier) within the policy, or tell the operator.") from None
        bench.candidate, bench.spec, bench.validated = proposal.plan, intent, proposal.validated
        bench.emit("plan", (proposal.plan, proposal.report))
        return (f"proposed {_plan_text(proposal.plan)}\n{proposal.report.text()}\n"
                "Next: diff_plans shows what would move; apply_plan only if the operator asked to apply.")

    def validate_plan(stages: list[Stage] | None = None, data_class: str | None = None) -> str:
        plan = _candidate(stages, data_class)
        report, validated = review(plan, agent.cluster, agent.policy, bench.spec, agent.model_for(bench.spec),
                                   current=agent.live_plan())
        if validated is None:
            raise ToolError(report.text() + "\nFix the stages (or call propose_plan) and try again.")
        bench.candidate, bench.validated = validated.plan, validated
        bench.emit("plan", (bench.candidate, report))
        return f"valid: {_plan_text(bench.candidate)}\n{report.text()}"

    def diff_plans() -> str:
        if bench.candidate is None:
            raise ToolError("no plan to compare: call propose_plan first")
        live = agent.live_plan()
        rows = agent.diff(bench.candidate, bench.validated)
        bench.emit("diff", rows)
        head = "nothing is serving; the plan would place:" if live is None else f"from {live.summary()}:"
        return "\n".join([head] + [r.text() for r in rows])

    def apply_plan() -> str:
        if bench.candidate is None:
            raise ToolError("no plan to apply: call propose_plan first")
        out = agent.gate(bench.candidate, bench.spec, bench.mode, validated=bench.validated)
        if out.status == "rejected":
            raise ToolError(out.message + "\nFix the plan and try again.")
        return _outcome_text(out)

    def rollback() -> str:
        if not agent.applied:
            raise ToolError("nothing to roll back: this agent has applied no plan")
        return _outcome_text(agent.rollback(bench.mode))

    def history(at: str | None = None, node: str | None = None, limit: int = 5) -> str:
        import time
        from datetime import datetime, timezone
        rows = _history_rows(agent)
        if node:
            names = [n.name for n in agent.cluster.nodes]
            if node not in names:
                raise ToolError(f"no node named {node!r}; the cluster has {', '.join(names)}")
            rows = [r for r in rows if node in (r["from"] or "") or node in (r["to"] or "") or node in r["lost"]]
        if at:
            t = _when(at, time.time())
            rows = sorted(rows, key=lambda r: abs(r["t"] - t))[:limit]
            rows.sort(key=lambda r: r["t"])
        else:
            rows = rows[-limit:]
        if not rows:
            where = ("the journal" if getattr(agent, "journal", None) is not None else
                     "this chat's autopilot (this agent keeps no journal: start it with one to see earlier changes)")
            return f"no change{f' involving {node}' if node else ''} recorded in {where}"
        out = []
        for r in rows:
            when = datetime.fromtimestamp(r["t"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            move = f"{r['from']} -> {r['to']}" if r["from"] else f"to {r['to']}"
            out.append(f"- {when}: {r['who']} {r['action']} ({r['status']}): {move}. Why: {r['reason']}")
        return "\n".join(out)

    def autopilot_status() -> str:
        pilot = getattr(agent, "pilot", None)
        if pilot is None:
            return "no autopilot started from this chat"
        ap = pilot.autopilot
        state = "running" if pilot.thread.is_alive() else "stopped"
        last = ap.decisions[-1] if ap.decisions else None
        head = f"autopilot {state}, mode {pilot.mode}, {len(ap.decisions)} decisions"
        if last is None:
            return head + "; none yet"
        rate = last.load.get("arrival_rate")
        return (head + f"; last: {last.action} ({last.status}) at load {rate if rate is None else round(rate, 2)} req/s, "
                f"planned for {round(last.forecast.get('rate') or 0.0, 2)} req/s, "
                f"plan {last.current.summary() if last.current else None}. Why: {last.reason}")

    def autopilot_control(action: str, intent: str | None = None, mode: str | None = None) -> str:
        import threading
        pilot = getattr(agent, "pilot", None)
        if action == "stop":
            if pilot is None or not pilot.thread.is_alive():
                raise ToolError("no autopilot is running")
            pilot.stop.set()
            pilot.thread.join(timeout=pilot.autopilot.config.interval_s + 30)
            return f"autopilot stopped after {len(pilot.autopilot.decisions)} decisions"
        allowed = PILOT_MODES.get(bench.mode, ())
        if not allowed:
            raise ToolError(f"{bench.mode} mode: this chat may not start an autopilot")
        mode = mode or allowed[-1]
        if mode not in allowed:
            raise ToolError(f"{bench.mode} mode: an autopilot started here may only run as {' or '.join(allowed)}")
        if pilot is not None and pilot.thread.is_alive():
            raise ToolError(f"an autopilot is already running (mode {pilot.mode}); stop it first")
        spec = intent
        if spec is None:
            live = agent.live_plan()
            spec = live.intent if live is not None and live.intent is not None else None
            if spec is None:
                raise ToolError("say what the autopilot should keep (the intent: data class, SLOs)")
        from .autopilot import AutopilotConfig
        try:
            ap = agent.autopilot(spec, config=AutopilotConfig(mode=mode), journal=getattr(agent, "journal", None))
        except ValueError as e:          # no running service to drive, an intent it cannot read
            raise ToolError(str(e)) from None
        stop = threading.Event()
        thread = threading.Thread(target=ap.run, args=(stop,), name="autopilot", daemon=True)
        agent.pilot = Pilot(ap, stop, thread, mode)
        thread.start()
        return (f"autopilot started in {mode} mode for {ap.intent.data_class} data, one decision every "
                f"{ap.config.interval_s:g} s; autopilot_status shows what it sees and decides")

    def _candidate(stages: list[Stage] | None, data_class: str | None) -> PlacementPlan:
        if stages is None:
            if bench.candidate is None:
                raise ToolError("no plan to check: pass stages or call propose_plan first")
            return bench.candidate
        dc = data_class or (bench.spec.data_class if bench.spec else None)
        if dc is None:
            raise ToolError("say which data class the plan serves (data_class)")
        model = agent.model_for(bench.spec).name
        if bench.spec is None or bench.spec.data_class != dc:
            bench.spec = IntentSpec(data_class=dc)
        return PlacementPlan(model=model, data_class=dc, stages=tuple(stages), intent=bench.spec,
                             cluster_fingerprint=agent.cluster.fingerprint())

    specs = [
        (inspect_cluster, _NoArgs, False, "List the cluster's nodes: GPU, memory, zone, jurisdiction, tier, trust, state."),
        (current_plan, _NoArgs, False, "The placement plan serving now, if any."),
        (explain_policy, _PolicyArgs, False, "What the operator's policy requires for a data class."),
        (propose_plan, _propose_args(agent), False, "Plan the best valid placement for a structured intent (the planner)."),
        (validate_plan, _ValidateArgs, False, "Check a plan against every policy rule; violations say how to fix them."),
        (diff_plans, _NoArgs, False, "What would move: the proposed plan against the live one, layer by layer."),
        (apply_plan, _NoArgs, True, "Apply the proposed plan to the running service (live reconfiguration)."),
        (rollback, _NoArgs, True, "Put back the plan that served before the last apply."),
        (history, _HistoryArgs, False, "What was changed or recommended, when and why (the journal): e.g. why "
                                       "layers moved off a node at a time."),
        (autopilot_status, _NoArgs, False, "The autopilot this chat started: running or not, the load it sees, "
                                           "its last decision and why."),
        (autopilot_control, _PilotArgs, True, "Start or stop the autopilot, which keeps the service inside an "
                                              "intent by itself as load and nodes change."),
    ]
    return [StructuredTool.from_function(fn, name=fn.__name__, description=desc, args_schema=args,
                                         metadata={"changes_cluster": changes})
            for fn, args, changes, desc in specs]


def changes_cluster(tool: StructuredTool) -> bool:
    """Whether calling this tool changes the cluster (such calls pass the approval gate)."""
    return bool((tool.metadata or {}).get("changes_cluster"))
