"""The agent: from a plain-language intent to an applied plan, behind one approval gate.

    from agent import Agent
    agent = Agent(cluster, policy, executor=service, mode="confirm", confirm=lambda outcome: True)
    outcome = agent.apply("Keep patient data in the EU, TTFT under 300 ms.")

Two paths, one gate:

    deterministic   apply(text): parse -> planner -> gate                        (no LLM tool calls)
    chat            chat(message): the LLM calls tools (agent/tools.py) in a loop;
                    its apply_plan / rollback calls go through the same gate

    gate(plan): validate against the live plan, once (policies.review; the planner's own sealed
                plan is reused when it was checked against the same live plan) -> diff (the
                validator's PlanDelta) -> mode allows? -> valid? -> executor? -> confirm?
                -> executor.reconfigure(validated)

Nothing reaches the executor except a ValidatedPlan from the validator, and only when the mode
(set by the caller, never by the intent's text) allows it. The executor's refusals (policies.Refused:
a rejected plan, an aborted or timed-out reconfiguration, an unavailable service) and an unreachable
service become an Outcome that says so; any other exception is a bug and propagates.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import ValidationError

from policies import (Cluster, IntentSpec, LayerRun, ModelSpec, PlacementPlan, PlanDelta, Policy, Refused, Report,
                      ValidatedPlan, load_model_spec, review)
from policies.profile import ProfileSet, load_profiles

from .intent_file import MODES
from .journal import Journal
from .intent_parser import ParsedIntent, parse_intent
from .planner import Infeasible, PlanProposal, plan as make_plan
from .remote import RemoteError
from .tools import ToolError, Workbench, make_tools

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
DEFAULT_MODEL = "smollm2-135m"
CHANGES_ALLOWED = {"read-only": False, "suggest": False, "confirm": True, "auto": True}
# What the executor (or the network to it) answers when it will not or cannot act: a result to
# report. Anything else it raises is a bug, and propagates.
REFUSALS = (Refused, RemoteError, ConnectionError, TimeoutError)


class AgentError(Exception):
    """The agent gave up; `attempts` holds what was tried and what went wrong, in order."""

    def __init__(self, message: str, attempts: list[str] | None = None):
        self.attempts = list(attempts or [])
        super().__init__(message + "".join(f"\n  attempt {i + 1}: {a}" for i, a in enumerate(self.attempts)))


class NeedsClarification(AgentError):
    """The intent leaves a required field unknown; `questions` are what to ask the operator."""

    def __init__(self, parsed: ParsedIntent):
        self.parsed, self.questions = parsed, list(parsed.questions)
        head = ("the rules and the language model read the intent differently (" + ", ".join(parsed.conflicts) +
                "); settle it in the front matter or the text" if parsed.spec is not None and parsed.conflicts
                else "the intent is incomplete")
        super().__init__(head + ":\n" + "\n".join(f"- {q}" for q in self.questions))


# One row of the diff people see: a run of the validator's PlanDelta ('+' placed, '~' moved,
# '=' unchanged, '-' removed), with half-open [start, stop) and the bytes that travel.
DiffRow = LayerRun


def plan_diff(old: PlacementPlan | None, new: PlacementPlan, model: ModelSpec | None = None) -> list[DiffRow]:
    """Terraform-style diff of layer ownership: the runs of PlanDelta.between(old, new)."""
    return list(PlanDelta.between(old, new, model).runs)


def _row(r: DiffRow) -> dict:
    """A diff row for JSON: half-open start/stop, and first/last layer as people read them."""
    return {"action": r.action, "start": r.start, "stop": r.stop, "first_layer": r.first_layer,
            "last_layer": r.last_layer, "src": r.src, "dst": r.dst, "weight_bytes": r.weight_bytes,
            "kv_bytes_per_token": r.kv_bytes_per_token}


@dataclass
class Outcome:
    """What one request did: the spec, the plan, the validator's report, the diff and, if applied, the figures.

    status: applied | unchanged | dry-run | suggested | declined | refused | rejected | infeasible | failed
    """
    status: str
    spec: IntentSpec | None
    plan: PlacementPlan | None = None
    report: Report | None = None
    diff: list[DiffRow] = field(default_factory=list)
    current: PlacementPlan | None = None
    reconfig: dict | None = None          # the executor's reconfiguration figures (pause, bytes moved, ...)
    message: str = ""
    parsed: ParsedIntent | None = None
    reasons: list[str] = field(default_factory=list)   # why no plan exists (status infeasible)

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    @property
    def ok(self) -> bool:
        """True when nothing went wrong: applied, or a valid plan shown without applying."""
        return self.status in ("applied", "unchanged", "dry-run", "suggested")

    def as_dict(self) -> dict:
        return {"ok": self.ok, "status": self.status, "message": self.message,
                "spec": self.spec.model_dump(mode="json") if self.spec else None,
                "plan": self.plan.model_dump(mode="json") if self.plan else None,
                "report": self.report.model_dump(mode="json") if self.report else None,
                "current": self.current.model_dump(mode="json") if self.current else None,
                "diff": [_row(r) for r in self.diff], "reconfig": self.reconfig, "reasons": self.reasons,
                "questions": self.parsed.questions if self.parsed else [],
                "ignored": self.parsed.ignored if self.parsed else []}


def _live(executor: Any) -> PlacementPlan | None:
    """The plan the executor serves now: a Service holds a ValidatedPlan, a remote client a PlacementPlan."""
    p = getattr(executor, "plan", None) if executor is not None else None
    return p.plan if isinstance(p, ValidatedPlan) else p


def _figures(rep: Any) -> dict:
    """The executor's reconfiguration report as a dict (a Service's report, or a remote's JSON)."""
    if hasattr(rep, "as_dict"):
        return rep.as_dict()
    return dict(rep) if isinstance(rep, dict) else {"result": str(rep)}


class Agent:
    """Intent -> IntentSpec -> plan -> validation -> approval -> live reconfiguration.

    executor: None for a dry run (nothing serving), or anything with `.plan` (the live plan) and
    `.reconfigure(validated, method)`, such as executor.service.Service.
    llm: a langchain chat model for parsing and chat; None takes `agent.llm.get_llm()` when needed.
    use_llm=False parses with the rules alone (no model is loaded).
    model: the ModelSpec to plan for; default the intent's model, else the served one, else smollm2-135m.
    mode: read-only | suggest | confirm | auto. confirm(outcome) -> bool is asked in confirm mode.
    """

    def __init__(self, cluster: Cluster, policy: Policy, executor: Any = None, llm: BaseChatModel | None = None,
                 model: ModelSpec | None = None, mode: str = "confirm",
                 confirm: Callable[[Outcome], bool] | None = None, *, use_llm: bool = True, max_attempts: int = 3,
                 max_steps: int = 12, method: str = "live", ask_on_conflict: bool = False,
                 journal: Journal | None = None, profiles: ProfileSet | None = None):
        self.cluster, self.policy, self.executor = cluster, policy, executor
        # journal (issue 16): a person's applies are recorded beside the autopilot's decisions
        self.journal = journal
        self.pilot = None           # the autopilot the chat started (agent.tools.Pilot), while there is one
        # measured speeds (`continuo calibrate`, or a worker's calibration at start) where they exist, as
        # `continuo plan` and `validate` use them: the plans and estimates the operator is shown
        self.profiles = profiles if profiles is not None else load_profiles()
        self._llm, self.use_llm, self.model = llm, use_llm, model
        self.mode = self._check_mode(mode)
        self.confirm = confirm
        self.max_attempts, self.max_steps, self.method = max_attempts, max_steps, method
        # non-interactive apply: a field the rules and the LLM read differently stops with the question
        self.ask_on_conflict = ask_on_conflict
        self.applied: list[PlacementPlan] = []    # plans this agent applied, newest last (for rollback)

    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        return mode

    @property
    def llm(self) -> BaseChatModel:
        if self._llm is None:
            from .llm import get_llm
            self._llm = get_llm()
        return self._llm

    def live_plan(self) -> PlacementPlan | None:
        """The plan serving now; None when nothing serves."""
        return _live(self.executor)

    def model_for(self, spec: IntentSpec | None = None) -> ModelSpec:
        """The ModelSpec to plan and validate with (see the class docstring)."""
        if self.model is not None:
            return self.model
        live = self.live_plan()
        return load_model_spec((spec and spec.model) or (live and live.model) or DEFAULT_MODEL)

    # ------------------------------------------------------------ parse and plan

    def read(self, text: str, defaults: dict | None = None) -> ParsedIntent:
        """Parse an intent and keep everything the parser found (questions, dropped values, sources)."""
        return parse_intent(text, self.cluster, self.policy, llm=self._llm if self.use_llm else None,
                            use_llm=self.use_llm, defaults=defaults)

    def parse(self, text: str, defaults: dict | None = None) -> IntentSpec:
        """The IntentSpec of a plain-language intent; raises NeedsClarification while it is incomplete."""
        parsed = self.read(text, defaults)
        if parsed.spec is None:
            raise NeedsClarification(parsed)
        return parsed.spec

    def plan_spec(self, spec: IntentSpec) -> PlanProposal:
        """The planner's best valid plan for a spec, checked against the live plan; raises Infeasible."""
        return make_plan(spec, self.cluster, self.policy, self.model_for(spec), current=self.live_plan(),
                         profiles=self.profiles)

    def plan(self, text: str) -> PlanProposal:
        """Parse and plan; raises NeedsClarification or planner.Infeasible."""
        return self.plan_spec(self.parse(text))

    # ------------------------------------------------------------ the deterministic path

    def apply(self, text: str, mode: str | None = None, defaults: dict | None = None) -> Outcome:
        """Parse, plan and (as the mode allows) apply; raises NeedsClarification when the intent is incomplete."""
        parsed = self.read(text, defaults)
        if parsed.spec is None or (self.ask_on_conflict and parsed.conflicts):
            raise NeedsClarification(parsed)
        self._journal("intent", {"source": "human", "text": text, "spec": parsed.spec.model_dump(mode="json")})
        try:
            proposal = self.plan_spec(parsed.spec)
        except Infeasible as e:
            self._journal("plan", {"source": "human", "status": "infeasible", "reasons": e.reasons})
            return Outcome("infeasible", parsed.spec, current=self.live_plan(), parsed=parsed, reasons=e.reasons,
                           message="no valid plan: " + "; ".join(e.reasons))
        out = self.gate(proposal.plan, parsed.spec, mode, validated=proposal.validated)
        out.parsed = parsed
        return out

    # ------------------------------------------------------------ the one gate to the executor

    def gate(self, plan: PlacementPlan, spec: IntentSpec | None, mode: str | None = None,
             validated: ValidatedPlan | None = None) -> Outcome:
        """Validate (once), diff, and apply only if the mode, the validator and (in confirm mode) the operator allow it.

        `validated`: the validator's sealed plan from an earlier check (the planner's); used instead
        of validating again when it proves this plan against the live plan and cluster as they are.
        With a journal, the plan, the validator's report and the result are appended to it."""
        out = self._gate(plan, spec, mode, validated)
        self._journal_outcome(out, mode or self.mode)
        return out

    # ---- journal (issue 16): what a person asked for and what the gate did with it
    def _journal(self, kind: str, data: dict) -> None:
        if self.journal is not None:
            self.journal.append(kind, data)

    def _journal_outcome(self, out: Outcome, mode: str) -> None:
        if self.journal is None:
            return
        nodes = sorted(set(out.plan.nodes)) if out.plan else []
        self.journal.append("plan", {"source": "human", "mode": mode, "summary": out.plan.summary() if out.plan else None,
                                     "nodes": nodes, "plan": out.plan.model_dump(mode="json") if out.plan else None,
                                     "from": out.current.summary() if out.current else None,
                                     "diff": [r.text() for r in out.diff]})
        if out.report is not None:
            self.journal.append("validation", {"source": "human", "ok": out.report.ok,
                                               "report": out.report.model_dump(mode="json")})
        self.journal.append("apply", {"source": "human", "mode": mode, "status": out.status, "ok": out.ok,
                                      "message": out.message, "summary": out.plan.summary() if out.plan else None,
                                      "reconfig": out.reconfig})
    # ---- end journal

    def _gate(self, plan: PlacementPlan, spec: IntentSpec | None, mode: str | None,
              validated: ValidatedPlan | None) -> Outcome:
        mode = self._check_mode(mode or self.mode)
        current = self.live_plan()
        model = self.model_for(spec)
        if self._proves(validated, plan, spec, current):
            report = validated.report
        else:
            report, validated = review(plan, self.cluster, self.policy, spec, model, current=current,
                                       profiles=self.profiles)
        plan = validated.plan if validated is not None else plan.model_copy(update={"estimates": report.estimates})
        delta = report.delta or PlanDelta.between(current, plan, model)
        out = Outcome("pending", spec or plan.intent, plan, report, list(delta.runs), current)
        if not CHANGES_ALLOWED[mode]:
            out.status = "refused" if mode == "read-only" else "suggested"
            out.message = (f"{mode} mode: nothing is applied" if mode == "read-only"
                           else "suggest mode: the plan and diff are shown, never applied")
            return out
        if not report.ok:
            out.status, out.message = "rejected", report.text()
            return out
        if self.executor is None:
            out.status, out.message = "dry-run", "dry run: nothing is serving, nothing applied"
            return out
        # the same placement with a new KV reservation (the intent's traffic changed) still reconfigures:
        # every stage is rebuilt with the new pool (PlanDelta.rebuilt); only an identical plan is a no-op
        if current is not None and current.placement_key() == plan.placement_key() and not delta.pool_changes:
            out.status, out.message = "unchanged", "the live plan already places the model this way: nothing to move"
            return out
        if mode == "confirm" and not (self.confirm and self.confirm(out)):
            out.status, out.message = "declined", "the operator declined: nothing applied"
            return out
        try:
            rep = self.executor.reconfigure(validated, method=self.method)
        except REFUSALS as e:          # the executor said no, or could not be reached: a result, not our bug
            figures = getattr(e, "report", None)
            if hasattr(figures, "as_dict"):           # e.g. ReconfigurationTimeout: how far it got
                out.reconfig = figures.as_dict()
            out.status, out.message = "failed", f"the executor refused or failed: {e}"
            return out
        out.reconfig = _figures(rep)
        state, error = out.reconfig.get("state"), out.reconfig.get("error")
        if state == "done":            # committed: the new plan serves (an error here came after the switch)
            out.status = "applied"
            out.message = "applied live" + (f"; cleanup after the switch failed: {error}" if error else "")
            if current is not None:
                self.applied.append(current)
        elif state == "aborted":
            out.status = "failed"
            out.message = f"reconfiguration aborted, the old plan still serves: {error}"
        else:                          # anything else is not an applied plan (e.g. still under way)
            out.status = "failed"
            out.message = f"the reconfiguration did not finish (state {state!r}): {error or 'no error given'}"
        return out

    def _proves(self, validated: ValidatedPlan | None, plan: PlacementPlan, spec: IntentSpec | None,
                current: PlacementPlan | None) -> bool:
        """Whether an earlier sealed plan is this plan, checked for this spec against the live state now."""
        if validated is None or not validated.sealed:
            return False
        intent = spec or plan.intent or IntentSpec(data_class=plan.data_class)     # what validate would use
        same = {"estimates", "intent", "cluster_fingerprint"}                    # what review stamps on
        return (validated.plan.model_dump(exclude=same) == plan.model_dump(exclude=same)
                and plan.cluster_fingerprint in (None, validated.plan.cluster_fingerprint)
                and validated.plan.intent == intent
                and validated.policy == self.policy.name
                and validated.cluster_fingerprint == self.cluster.fingerprint()
                and validated.transition_from == (current.placement_key() if current else None))

    def diff(self, plan: PlacementPlan, validated: ValidatedPlan | None = None) -> list[DiffRow]:
        """What would move from the live plan: the validator's delta when `validated` was checked against it."""
        current = self.live_plan()
        if validated is not None and self._proves(validated, plan, None, current):
            return list(validated.delta.runs)
        return plan_diff(current, plan, self.model_for(plan.intent))

    def rollback(self, mode: str | None = None) -> Outcome:
        """Put back the plan that served before this agent's last apply (through the gate, like any plan)."""
        if not self.applied:
            raise AgentError("nothing to roll back: this agent has applied no plan")
        previous = self.applied[-1]
        self._journal("rollback", {"source": "human", "to": previous.summary(),
                                   "from": (self.live_plan().summary() if self.live_plan() else None)})
        out = self.gate(previous, previous.intent, mode)
        if out.applied:
            self.applied = self.applied[:-2]   # gate pushed the plan we rolled away from; drop both
        return out

    # ------------------------------------------------------------ the closed loop (agent/autopilot)

    def autopilot(self, intent: IntentSpec | str, target: Any = None, config: Any = None, journal: Any = None,
                  **kw: Any):
        """A controller that keeps the service inside `intent` (an IntentSpec, or text to parse) as load and nodes
        change; target: an agent.autopilot Target (default: over this agent's executor). Call tick() or run(stop)."""
        from .autopilot import autopilot_for
        return autopilot_for(self, intent, target, config, journal, **kw)

    # ------------------------------------------------------------ the chat path: the LLM with tools

    def chat(self, message: str, history: list[BaseMessage] | None = None, mode: str | None = None,
             on_event: Callable[[str, Any], None] | None = None) -> list[BaseMessage]:
        """One turn of conversation: the LLM calls tools until it answers in words. Returns the new history.

        on_event(kind, data) sees: "token" (reply text as it streams), "tool_call" (the call),
        "tool_result" (name, text, ok), "plan" (plan, report), "diff" (plan_diff rows), "reply" (the final text). Raises AgentError after `max_attempts`
        failed tool calls (errors, violations, no plan) or `max_steps` model calls.
        """
        emit = on_event or (lambda kind, data: None)
        bench = Workbench(self, self._check_mode(mode or self.mode), emit=emit)
        tools = {t.name: t for t in make_tools(bench)}
        llm = self.llm.bind_tools(list(tools.values()))
        messages = list(history or []) or [SystemMessage((PROMPTS / "agent_system.md").read_text().strip())]
        messages.append(HumanMessage(message))
        note = self._grounded_note(message)
        if note:
            messages.append(SystemMessage(note))
        failures: list[str] = []
        done: dict[str, str] = {}        # calls made this turn -> their answers (small models repeat themselves)
        for _ in range(self.max_steps):
            reply = self._ask(llm, messages, emit)
            if not reply.tool_calls:
                if _echoes_a_tool_call(reply.content):
                    # Small models often "answer" with the JSON of a tool call instead of words: say
                    # plainly what the tools did rather than show the operator raw JSON.
                    reply = AIMessage(content=_plain_summary(messages))
                    emit("token", reply.content)
                messages.append(reply)
                emit("reply", reply.content)
                return messages
            messages.append(reply)
            repeated = 0
            for call in reply.tool_calls:
                emit("tool_call", call)
                text, ok, again = self._run_tool(tools, call, done)
                emit("tool_result", (call["name"], text, ok))
                messages.append(ToolMessage(text, tool_call_id=call["id"], name=call["name"]))
                repeated += again
                if not ok:
                    failures.append(f"{call['name']}({call['args']}): {text}")
            if len(failures) >= self.max_attempts:
                raise AgentError(f"gave up after {len(failures)} failed attempts", failures)
            if repeated == len(reply.tool_calls):
                llm = self.llm      # it only repeats itself: done with tools, let it answer in words
        raise AgentError(f"no answer after {self.max_steps} model calls", failures)

    @staticmethod
    def _run_tool(tools: dict, call: dict, done: dict[str, str]) -> tuple[str, bool, bool]:
        """Run one tool call: (answer text, ok, was a repeat). The model's mistakes come back as text."""
        key = f"{call['name']}{json.dumps(call['args'], sort_keys=True, default=str)}"
        if key in done:
            return f"already done, same answer: {done[key]}\nNow answer the operator in words.", True, True
        if call["name"] not in tools:
            return f"error: no tool named {call['name']!r}; use one of {', '.join(tools)}", False, False
        try:
            done[key] = str(tools[call["name"]].invoke(call["args"]))
            return done[key], True, False
        except (ToolError, ValidationError) as e:   # the model's mistake: data it can act on; our bugs propagate
            return f"error: {e}", False, False

    def _grounded_note(self, message: str) -> str:
        """What the rules read in the operator's words, grounded in the inventory, for the model to build on."""
        parsed = parse_intent(message, self.cluster, self.policy, use_llm=False)
        lines = []
        if parsed.values:
            lines.append("Fields read from the operator's words (grounded in the cluster and policy): "
                         + json.dumps(parsed.values, default=str))
        if parsed.spec is not None:
            lines.append("If the operator asks for a placement, call propose_plan with these fields first.")
        lines += [f"Unclear, ask the operator: {q}" for q in parsed.questions]
        lines += [f"Ignored, not yours to grant: '{x['text']}' ({x['reason']})" for x in parsed.ignored_why]
        return "\n".join(lines)

    @staticmethod
    def _ask(llm, messages: list[BaseMessage], emit) -> AIMessage:
        """Stream one model reply, passing text on as it comes; tool calls arrive whole at the end.
        Text that opens like JSON is held back until it is known not to be an echoed tool call."""
        full, held = None, []
        for chunk in llm.stream(messages):
            if isinstance(chunk.content, str) and chunk.content:
                so_far = (full.content if full is not None and isinstance(full.content, str) else "") + chunk.content
                if held or so_far.lstrip()[:1] in ("{", "["):
                    held.append(chunk.content)
                else:
                    emit("token", chunk.content)
            full = chunk if full is None else full + chunk
        if full is None:
            return AIMessage(content="")
        if held and not _echoes_a_tool_call(full.content):
            emit("token", "".join(held))
        return AIMessage(content=full.content, tool_calls=list(full.tool_calls or []), id=full.id)


def _echoes_a_tool_call(content: Any) -> bool:
    """True for a reply that is empty or a JSON object/list (a tool call written out instead of words)."""
    text = content.strip() if isinstance(content, str) else ""
    if not text:
        return True
    if text[0] not in "{[":
        return False
    try:
        json.loads(text)
        return True
    except ValueError:
        return '"name"' in text or '"arguments"' in text


def _plain_summary(messages: list[BaseMessage]) -> str:
    """What this turn's tools answered, as the reply (the last human message starts the turn)."""
    start = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=0)
    results = [m for m in messages[start:] if isinstance(m, ToolMessage)]
    if not results:
        return ("I could not turn that into an action. Say what should change: which nodes to use or avoid, "
                "what data the service handles, and any latency limits.")
    return "\n".join(f"{m.name}: {m.content}" for m in results[-2:])
