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

from .grounding import FIELDS, Inventory, Reading, build_schema, check, from_schema, read_rules

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

    def to_json(self) -> dict:
        return {"spec": self.spec.model_dump(mode="json") if self.spec else None, "questions": self.questions,
                "dropped": self.dropped, "sources": self.sources, "ignored": self.ignored,
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


def ask_llm(llm: BaseChatModel, reading: Reading, schema: dict) -> tuple[dict | None, list[str]]:
    """The LLM's values for the schema's fields, or None with the errors of each attempt."""
    system, user = _prompts()
    msgs = [SystemMessage(system), HumanMessage(user.replace("{text}", reading.text.strip()))]
    fmt = {"type": "json_schema", "json_schema": {"name": "intent", "schema": schema, "strict": False}}
    errors = []
    for _ in range(MAX_ATTEMPTS):
        reply = llm.invoke(msgs, response_format=fmt)
        content = reply.content if isinstance(reply.content, str) else json.dumps(reply.content)
        try:
            return _json_from(content), errors
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            errors.append(f"LLM answer was not a JSON object ({e}): {content[:200]!r}")
            msgs += [reply, HumanMessage(f"That was not a valid JSON object: {e}. "
                                         "Answer again with one JSON object only.")]
    return None, errors


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


def merge(rules: dict, weak: set[str], llm: dict | None, inv: Inventory) -> tuple[dict, dict, list[str]]:
    """(values, sources, questions) from the rules' and the LLM's checked values."""
    values, sources, questions = {}, {}, []
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
            if f == "data_class":
                values[f], sources[f] = m, "llm"
                questions.append(f"The data class was not named; the language model chose '{m}'. Is that right?")
            else:
                questions.append(f"The language model also read {f} = {_show(m)}, which the rules did not find "
                                 "in the text; should it apply?")
        else:
            if f == "data_class" and f in weak:
                # the embedding guess was weak: take the stricter of the two and ask
                pick = max((r, m), key=inv.strictness)
                values[f], sources[f] = pick, ("rules" if pick == r else "llm")
            else:
                values[f], sources[f] = r, "rules"
            questions.append(f"I read {f} as {_show(values[f])}, but the language model read {_show(m)}. "
                             "Which is right?")
    return values, sources, questions


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
                 use_llm: bool = True, defaults: dict | None = None) -> ParsedIntent:
    """Parse a plain-language intent into a grounded IntentSpec, with questions for what stays unclear.

    llm: any langchain chat model; None takes `get_llm()` (the embedded default unless configured).
    use_llm=False parses with the rules alone. defaults (e.g. an intent file's front matter: service,
    model) fill fields the text leaves unset.
    """
    t0 = time.perf_counter()
    inv = Inventory(cluster, policy)
    reading = read_rules(text, inv)
    rules, dropped = check(reading.values, reading, inv)
    questions = list(reading.questions)
    llm_values = None
    if use_llm:
        if llm is None:
            from .llm import get_llm
            llm = get_llm()
        raw, errors = ask_llm(llm, reading, build_schema(reading))
        dropped += errors
        if raw is not None:
            llm_values, llm_dropped = check(from_schema(raw), reading, inv)
            dropped += [f"(llm) {d}" for d in llm_dropped]
    values, sources, more = merge(rules, reading.weak, llm_values, inv)
    questions += more
    for k, v in (defaults or {}).items():
        if k in ("service", "model") and v and k not in values:
            values[k], sources[k] = v, "front matter"
    dropped += [f"ignored '{s}': an intent cannot change the policy or the approval mode" for s in reading.ignored]
    if not values.get("data_class"):
        questions.insert(0, "What kind of data does this service handle? Policy "
                            f"{policy.name} knows: {', '.join(policy.data_classes)}.")
    spec = to_spec(values)
    return ParsedIntent(spec, questions, dropped, sources, time.perf_counter() - t0, values, rules, llm_values,
                        reading.ignored)
