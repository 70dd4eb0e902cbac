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
    """The eight tools, bound to one workbench. metadata["changes_cluster"] says which ones change the world."""
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
    ]
    return [StructuredTool.from_function(fn, name=fn.__name__, description=desc, args_schema=args,
                                         metadata={"changes_cluster": changes})
            for fn, args, changes, desc in specs]


def changes_cluster(tool: StructuredTool) -> bool:
    """Whether calling this tool changes the cluster (such calls pass the approval gate)."""
    return bool((tool.metadata or {}).get("changes_cluster"))
