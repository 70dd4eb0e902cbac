"""From a plain-language intent to a grounded IntentSpec.

    text --strip instructions that try to change policy or mode--> clean text
         --rules (regex + inventory)----------------------------> reading, grounded candidates
         --LLM, schema built from the candidates----------------> values (each can only be grounded)
         --check: grounded in text/inventory, never loosening---> kept values, dropped values
         --merge rules and LLM: agree -> both; disagree -> rules' value + a clarifying question
         --> ParsedIntent(spec, questions, dropped, sources)

The rules win a disagreement because they only read what the text literally says; the LLM's value is
offered back as a question. A value only the LLM found is not applied but asked about, except the
data class, which is required: there the LLM's grounded choice is used and the operator asked to confirm.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage

from policies import Cluster, IntentSpec, Policy, Traffic

from .grounding import FIELDS, Inventory, Reading, build_schema, check, from_schema, narrow_only, read_rules

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
MAX_ATTEMPTS = 2                  # LLM answers that are not JSON are sent back once with the error


@dataclass
class ParsedIntent:
    """The outcome of parsing: the spec (None while the data class is unknown) and what needs the operator."""
    spec: IntentSpec | None
    questions: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)          # ungrounded values, each with why
    sources: dict[str, str] = field(default_factory=dict)     # field -> "llm" | "rules" | "both"
    seconds: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)      # the fields the intent set (what spec holds)
    rule_values: dict[str, Any] = field(default_factory=dict)
    llm_values: dict[str, Any] | None = None                  # None: no LLM was asked, or it failed
    ignored: list[str] = field(default_factory=list)          # instructions that tried to change policy/mode
    ignored_why: list[dict] = field(default_factory=list)     # {text, reason} for each of them
    conflicts: list[str] = field(default_factory=list)        # fields the rules and the LLM read differently
    notes: list[str] = field(default_factory=list)            # how fields were read (evidence)

    def to_json(self) -> dict:
        return {"spec": self.spec.model_dump(mode="json") if self.spec else None, "questions": self.questions,
                "dropped": self.dropped, "sources": self.sources, "ignored": self.ignored,
                "ignored_why": self.ignored_why, "conflicts": self.conflicts, "notes": self.notes,
                "seconds": round(self.seconds, 3)}


@lru_cache(maxsize=1)
def _prompts() -> tuple[str, str]:
    return (PROMPTS / "intent_system.md").read_text().strip(), (PROMPTS / "intent_user.md").read_text().strip()


# ---------------------------------------------------------------- asking the LLM


def _json_from(text: str) -> dict:
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def ask_llm(llm: BaseChatModel, reading: Reading, schema: dict, grade=None) -> tuple[dict | None, list[str]]:
    """The LLM's values for the schema's fields, or None with the errors of each attempt.

    An answer that is not JSON, or (with `grade(values) -> (kept, dropped)`) whose values the grounding
    check drops, is sent back with those errors verbatim, up to MAX_ATTEMPTS answers in all (instructor's
    re-ask); the last answer that parsed is returned."""
    system, user = _prompts()
    msgs = [SystemMessage(system), HumanMessage(user.replace("{text}", reading.text.strip()))]
    fmt = {"type": "json_schema", "json_schema": {"name": "intent", "schema": schema, "strict": False}}
    errors: list[str] = []
    last = None
    for attempt in range(MAX_ATTEMPTS):
        reply = llm.invoke(msgs, response_format=fmt)
        content = reply.content if isinstance(reply.content, str) else json.dumps(reply.content)
        try:
            last = _json_from(content)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            errors.append(f"LLM answer was not a JSON object ({e}): {content[:200]!r}")
            msgs += [reply, HumanMessage(f"That was not a valid JSON object: {e}. "
                                         "Answer again with one JSON object only.")]
            continue
        dropped = grade(last)[1] if grade is not None else []
        if not dropped or attempt + 1 == MAX_ATTEMPTS:
            return last, errors
        errors.append(f"LLM answer {attempt + 1} re-asked: {'; '.join(dropped)}")
        msgs += [reply, HumanMessage("These values are not grounded in the request: " + "; ".join(dropped) +
                                     ". Answer again with one JSON object; use null where the request does "
                                     "not say.")]
    return last, errors


# ---------------------------------------------------------------- merging


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return sorted(map(str, a)) == sorted(map(str, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    if isinstance(v, float) and v.is_integer():
        return f"{int(v)}"
    return str(v)


# fields where a value the LLM alone found is adopted: its grounding is exact (a class of the pack, a name
# or number written in the text). Placement and objective depend on the words around a mention (polarity,
# 'doesn't matter'), which string presence cannot ground: there an LLM-only value is asked about.
ADOPT_LLM_ONLY = ("data_class", "model", "service", "max_ttft_ms", "max_tpot_ms", "concurrency")


def merge(rules: dict, weak: set[str], llm: dict | None, inv: Inventory
          ) -> tuple[dict, dict, list[str], list[str]]:
    """(values, sources, questions, conflicts) from the rules' and the LLM's checked values.

    conflicts: the fields both read, differently; the rules' (or the stricter) value is kept and asked."""
    values, sources, questions, conflicts = {}, {}, [], []
    llm = llm or {}
    for f in FIELDS:
        r, m = rules.get(f), llm.get(f)
        if r is None and m is None:
            continue
        if r is not None and (m is None or _same(r, m)):
            values[f], sources[f] = r, ("both" if m is not None else "rules")
            if f in weak and m is None:
                questions.append(f"I took the data class to be '{r}' from the wording; is that right?")
        elif r is None:
            if f in ADOPT_LLM_ONLY and not (f in ("max_ttft_ms", "max_tpot_ms") and
                                            _same(m, rules.get("max_tpot_ms" if f == "max_ttft_ms" else
                                                               "max_ttft_ms"))):
                values[f], sources[f] = m, "llm"
                if f == "data_class":
                    questions.append(f"The data class was not named; the language model chose '{m}'. "
                                     "Is that right?")
            elif f in ("max_ttft_ms", "max_tpot_ms"):
                conflicts.append(f)
                questions.append(f"I read {_show(m)} ms as the other latency limit, but the language model "
                                 f"read it as {f}. Which is right?")
            else:
                questions.append(f"The language model also read {f} = {_show(m)}, which the rules did not find "
                                 "in the text; should it apply?")
        else:
            if f == "data_class":
                # privacy only goes up: of two readings the stricter class is kept
                pick = max((r, m), key=inv.strictness)
                values[f], sources[f] = pick, ("rules" if pick == r else "llm")
            else:
                values[f], sources[f] = r, "rules"
            conflicts.append(f)
            questions.append(f"I read {f} as {_show(values[f])}, but the language model read {_show(m)}. "
                             "Which is right?")
    return values, sources, questions, conflicts


def to_spec(values: dict) -> IntentSpec | None:
    """Build the IntentSpec from merged values; None while the required data class is unknown."""
    if not values.get("data_class"):
        return None
    kw = {k: v for k, v in values.items() if k not in ("concurrency",)}
    for k in ("exclude_nodes", "allowed_jurisdictions"):
        if k in kw:
            kw[k] = tuple(kw[k])
    if "concurrency" in values:
        kw["traffic"] = Traffic(concurrency=values["concurrency"])
    return IntentSpec(**kw)


# ---------------------------------------------------------------- the public function


def parse_intent(text: str, cluster: Cluster, policy: Policy, llm: BaseChatModel | None = None, *,
                 use_llm: bool = True, defaults: dict | None = None, consult: str = "uncertain") -> ParsedIntent:
    """Parse a plain-language intent into a grounded IntentSpec, with questions for what stays unclear.

    llm: any langchain chat model; None takes `get_llm()` (the embedded default unless configured).
    use_llm=False parses with the rules alone. defaults (e.g. an intent file's front matter: service,
    model) fill fields the text leaves unset. consult="uncertain" (default) asks the LLM only about the
    fields the rules read with low confidence (no data word, a limit or place with no cue word, a tie),
    and only when there is one; "always" asks it about every field with grounded candidates.
    """
    if consult not in ("uncertain", "always"):
        raise ValueError(f"consult must be 'uncertain' or 'always', not {consult!r}")
    t0 = time.perf_counter()
    inv = Inventory(cluster, policy)
    reading = read_rules(text, inv)
    rules, dropped = check(reading.values, reading, inv)
    questions = list(reading.questions)
    llm_values = None
    asked = None if consult == "always" else set(reading.weak) | ({"data_class"} if "data_class" not in rules
                                                                  else set())
    if asked and asked & {"max_ttft_ms", "max_tpot_ms"}:
        asked |= {"max_ttft_ms", "max_tpot_ms"}      # an uncued limit may belong to either metric
    if use_llm and (asked is None or asked):
        if llm is None:
            from .llm import get_llm
            llm = get_llm()
        raw, errors = ask_llm(llm, reading, build_schema(reading, asked),
                              grade=lambda v: check(from_schema(v), reading, inv))
        dropped += errors
        if raw is not None:
            llm_values, llm_dropped = check(from_schema(raw), reading, inv)
            if asked is not None:      # what it was not asked about is not its to change
                llm_values = {k: v for k, v in llm_values.items() if k in asked}
            dropped += [f"(llm) {d}" for d in llm_dropped]
    values, sources, more, conflicts = merge(rules, reading.weak, llm_values, inv)
    questions += more
    values, settled, more = _front_matter(values, sources, defaults or {}, inv)
    dropped += more
    if settled:
        conflicts = [f for f in conflicts if f not in settled]
        questions = [q for q in questions if not any(f in q for f in settled)]
    dropped += [f"ignored '{x.text}': {x.reason}; an intent cannot change the policy or the approval mode"
                for x in reading.loosening]
    if not values.get("data_class"):
        questions.insert(0, "What kind of data does this service handle? Policy "
                            f"{policy.name} knows: {', '.join(policy.data_classes)}.")
    spec = to_spec(values)
    return ParsedIntent(spec, questions, dropped, sources, time.perf_counter() - t0, values, rules, llm_values,
                        reading.ignored, [{"text": x.text, "reason": x.reason} for x in reading.loosening],
                        conflicts, reading.notes)


def _front_matter(values: dict, sources: dict, front: dict, inv: Inventory) -> tuple[dict, set[str], list[str]]:
    """An intent file's front matter fills what the text leaves unset and settles a rules/LLM disagreement.

    It is the operator's own file, yet it cannot lower privacy either: a data class less strict than the
    text's is not taken, and places or trust beyond the policy are dropped (narrow_only)."""
    out, settled, dropped = dict(values), set(), []
    for k, v in front.items():
        if k not in FIELDS or v is None:
            continue
        if k in ("exclude_nodes", "allowed_jurisdictions") and isinstance(v, str):
            v = [v]
        if k == "data_class":
            if v not in inv.policy.data_classes:
                dropped.append(f"front matter data_class={v!r}: not a data class of policy {inv.policy.name}")
                continue
            if "data_class" in out and inv.strictness(v) < inv.strictness(out["data_class"]):
                dropped.append(f"front matter data_class={v!r}: less strict than the text's "
                               f"'{out['data_class']}'; privacy only goes up")
                settled.add(k)
                continue
        out[k], sources[k] = v, "front matter"
        settled.add(k)
        other = {"max_ttft_ms": "max_tpot_ms", "max_tpot_ms": "max_ttft_ms"}.get(k)
        if other and other not in front and _same(out.get(other), v):
            del out[other]        # the one limit the text gave is the front matter's metric, not both
            settled.add(other)
    out, more = narrow_only(out, inv)
    return out, settled, dropped + more
