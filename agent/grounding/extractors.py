"""The rule reading: a table of small per-field extractors over the text and the inventory.

    read_rules(text, inv)   strips loosening text (text.py), finds mentions (places.py) and durations
                            (quantities.py) once, then runs each extractor of EXTRACTORS; each one sets its
                            fields' values and the grounded candidates the LLM's schema may offer

Every extractor reads the text without its loosening spans, so an ignored instruction sets nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from policies import Trust

from . import privacy
from .places import Inventory, Mention, find_mentions, fold
from .quantities import Duration, find_durations, latency_limits
from .text import (DOWN_AFTER, FLIPPERS, LIST_GAP, NEGATORS, ONLY, PLACE_CUE, Loosening, count, strip_loosening,
                   window_after, window_before)

OBJECTIVES = ("latency", "throughput", "cost", "balanced")
FIELDS = ("data_class", "objective", "max_ttft_ms", "max_tpot_ms", "exclude_nodes", "allowed_jurisdictions",
          "prefer_tier", "min_trust", "model", "service", "concurrency")


@dataclass
class Reading:
    """What the rules read in a text, and the grounded candidates for every field."""
    text: str                                   # the text with loosening spans blanked out
    original: str = ""                          # the text as written
    values: dict[str, Any] = field(default_factory=dict)
    candidates: dict[str, list] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)      # loosening text, as written
    loosening: list[Loosening] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    weak: set[str] = field(default_factory=set)           # fields read with low confidence
    mentions: list[Mention] = field(default_factory=list)
    durations: list[Duration] = field(default_factory=list)
    evidence: list[privacy.Evidence] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)        # how fields were read, for explanations


# ---------------------------------------------------------------- data class


def extract_data_class(r: Reading, inv: Inventory, classify=None) -> None:
    """The strictest class the text gives evidence for; with none, the nearest by meaning (weak)."""
    # node and place names are no evidence of what the data is ('basel-qc-1' is not quality data)
    t = r.text
    for m in r.mentions:
        if m.kind in ("node", "group", "place"):
            t = t[:m.start] + " " * (m.end - m.start) + t[m.end:]
    r.evidence = privacy.class_evidence(t, inv.policy)
    classes = sorted({e.data_class for e in r.evidence}, key=inv.strictness, reverse=True)
    r.candidates["data_class"] = classes or list(inv.policy.data_classes)
    if classes:
        r.values["data_class"] = classes[0]
        why = sorted({f"'{e.word}' ({e.via})" for e in r.evidence if e.data_class == classes[0]})
        r.notes.append(f"data_class {classes[0]}: " + ", ".join(why) +
                       (f"; stricter than {', '.join(classes[1:])}, which the text also suggests"
                        if classes[1:] else ""))
        return
    got = (classify or privacy.by_meaning)(r.text, inv.policy) if classify is not False else None
    if got is not None:
        r.values["data_class"] = got[0]
        r.weak.add("data_class")
        r.candidates["data_class"] = [got[0]] + [c for c in inv.policy.data_classes if c != got[0]]
        r.notes.append(f"data_class {got[0]}: nearest in meaning (cosine {got[1]:.2f}), no data word in the text")


def data_class_by_words(text: str, inv: Inventory) -> tuple[list[str], dict[str, list[str]]]:
    """Data classes the text gives evidence for (not negated: 'no patient data'); strictest first."""
    hits: dict[str, list[str]] = {}
    for e in privacy.class_evidence(text, inv.policy):
        hits.setdefault(e.data_class, []).append(e.word)
    return sorted(hits, key=inv.strictness, reverse=True), hits


# ---------------------------------------------------------------- latency limits


def extract_latency(r: Reading, inv: Inventory, classify=None) -> None:
    """max_ttft_ms / max_tpot_ms: each limit bounds the metric written next to it."""
    r.values.update(latency_limits(r.text, r.durations, r.weak))
    ms = sorted({d.ms for d in r.durations})
    if ms:
        r.candidates["max_ttft_ms"] = r.candidates["max_tpot_ms"] = ms


# ---------------------------------------------------------------- objective

OBJECTIVE_CUES = {
    "latency": r"latency|latencies|latency[- ]sensitive|latency[- ]critical|fast|faster|fastest|quick|quickly|"
               r"quicker|snappy|snappier|responsive|speed|speedy|low[- ]lag|lag|sluggish|slow|interactive|"
               r"real[- ]time|asap|as soon as possible|minimi[sz]e (?:the )?(?:delay|wait)|waiting|instant",
    "throughput": r"throughput|volume|volumes|batch(?! (?:records?|manufacturing|release|numbers?))|batches|batched|as many (?:requests|users|tokens)|"
                  r"tokens per second|requests per second|tokens/s|req/s|rps|qps|scale out|bulk|"
                  r"max(?:imi[sz]e)? (?:the )?(?:number|load|capacity)|capacity|heavy load|overnight jobs?|"
                  r"crunch|backlog|traffic spike|peak load|lots of requests|many requests",
    "cost": r"cost|costs|cheap|cheaper|cheapest|cheaply|budget|save money|saving money|spend|spending|"
            r"inexpensive|economical|frugal|price|pricing|money|dollars|bill|billing|low[- ]cost|cost[- ]effective|"
            r"penny|pennies|expensive|affordable",
    "balanced": r"balanced|balance|middle ground|trade[- ]off|tradeoff|compromise|a bit of everything",
}
_DONT_CARE = re.compile(r"doesn'?t matter|does not matter|not important|no object|regardless|don'?t care|"
                        r"whatever it costs|not a (?:concern|priority|problem)|secondary|less important|"
                        r"at any (?:cost|price)|not (?:worried|fussed|bothered)|can wait|no rush", re.I)
_OBJ_WORD = "|".join(f"(?:{p})" for p in OBJECTIVE_CUES.values())
# 'throughput over latency', 'cost before speed': the first wins, the second is not a cue
_PREFER = re.compile(rf"(?<![\w-])({_OBJ_WORD})\s+(?:over|before|rather than|ahead of|more than|above|not)\s+"
                     rf"({_OBJ_WORD})(?![\w-])", re.I)
# a time budget is not money: 'a one-second budget', 'first-token budget'
_TIME_BUDGET = re.compile(r"(?:second|ms|millisecond|token|latency|time|ttft|tpot)s?[- ]budget", re.I)


def _objective_of(word: str) -> str | None:
    for obj, pat in OBJECTIVE_CUES.items():
        if re.fullmatch(pat, word, re.I):
            return obj
    return None


def extract_objective(r: Reading, inv: Inventory, classify=None) -> None:
    """objective: cue words, unless the clause says it does not matter; 'X over Y' picks X."""
    t = r.text
    losers: list[tuple[int, int]] = []
    for m in _PREFER.finditer(t):
        losers.append(m.span(2))
    scores: dict[str, int] = {}
    for obj, pat in OBJECTIVE_CUES.items():
        for m in re.finditer(r"(?<![\w-])(?:" + pat + r")(?![\w-])", t, re.I):
            if any(d.start <= m.start() < d.end for d in r.durations) or any(a <= m.start() < b for a, b in losers):
                continue
            if any(0 <= m.start() - d.end <= 12 and re.fullmatch(r"\s*(?:each\s+)?or\s+", t[d.end:m.start()], re.I)
                   for d in r.durations):
                continue    # 'every 40 ms or faster': part of the bound, not an objective
            if obj == "cost" and m.group(0).lower() == "budget" and _TIME_BUDGET.search(t[max(0, m.start() - 20):m.end()]):
                continue
            if obj == "cost" and m.group(0).lower() == "budget" and re.search(
                    r"\d\s*(?:ms|s)\b[^.;]{0,12}$|second[^.;]{0,6}$", t[max(0, m.start() - 25):m.start()], re.I):
                continue
            clause = window_before(t, m.start()) + t[m.start():m.end()] + window_after(t, m.end())
            if _DONT_CARE.search(clause):
                continue
            scores[obj] = scores.get(obj, 0) + 1
    if scores:
        best = max(scores.values())
        top = [o for o in OBJECTIVES if scores.get(o) == best]
        r.values["objective"] = top[0] if len(top) == 1 else "balanced"
        if len(top) > 1:
            r.weak.add("objective")
        r.candidates["objective"] = [o for o in OBJECTIVES if o in scores]


# ---------------------------------------------------------------- places


def polarity(text: str, m: Mention, prev: tuple[Mention, int] | None) -> tuple[int, bool, bool]:
    """(+1 include / -1 exclude, has a placement cue, says 'only') for a mention, from the words around it."""
    if prev is not None and LIST_GAP.match(text[prev[0].end:m.start]) and text[prev[0].end:m.start].strip():
        return prev[1], True, bool(re.match(r"^[\s-]*(?:only|exclusively)\b", window_after(text, m.end), re.I))
    before, after = window_before(text, m.start), window_after(text, m.end)
    near_after = " ".join(after.split()[:4])
    neg = count(NEGATORS, before) + count(FLIPPERS, before)
    if re.search(r"(?<![\w'])(?:" + DOWN_AFTER + r")(?![\w'])", after, re.I):
        neg += 1
    if re.search(r"^\s*(?:are|is)?\s*(?:not|never|no longer)\b", after, re.I):
        neg += 1
    cue = bool(count(PLACE_CUE, before) or count(NEGATORS, before) or count(FLIPPERS, before)
               or count(ONLY + "|" + DOWN_AFTER, near_after) or neg)
    only = bool(count(ONLY, before) or re.match(r"^[\s-]*(?:nodes?|sites?|boxes|gpus?)?\s*(?:only|exclusively)\b",
                                                after, re.I))
    if re.match(r"^[\s-]*(?:nodes?|gpus?|sites?)?\s*(?:preferred|first|please|preferably|is preferred|if possible|"
                r"or better|or higher|or above|and up)\b", after, re.I):
        cue = True
    return (-1 if neg % 2 else 1), cue, only


def extract_places(r: Reading, inv: Inventory, classify=None) -> None:
    """exclude_nodes, allowed_jurisdictions, prefer_tier, min_trust from the mentions and their polarity."""
    t = r.text
    exclude: list[str] = []
    allowed: set[str] | None = None
    tier = trust = None
    prev = None
    node_cands: set[str] = set()
    juris_cands: set[str] = set()
    tier_cands: set[str] = set()
    for m in r.mentions:
        sign, cue, only = polarity(t, m, prev)
        prev = (m, sign)
        if m.kind in ("node", "group", "place"):
            node_cands |= m.nodes
            if sign < 0:
                exclude += [n for n in inv.ordered(m.nodes) if n not in exclude]
            elif only:
                exclude += [n for n in inv.nodes if n not in m.nodes and n not in exclude]
        elif m.kind == "jurisdiction":
            juris_cands |= m.codes
            if not cue:
                r.weak.add("allowed_jurisdictions")
                continue
            keep = set(m.codes) if sign > 0 else set(inv.jurisdictions) - set(m.codes)
            allowed = keep if allowed is None else (allowed | keep if sign > 0 else allowed & keep)
        elif m.kind == "tier":
            tier_cands.add(m.value)
            if not (cue or only):
                r.weak.add("prefer_tier")
            if cue or only:
                tier = m.value if sign > 0 else next((x for x in ("edge", "cloud") if x != m.value), None)
        elif m.kind == "trust" and cue:
            level = Trust(m.value)
            if sign > 0 and level != Trust.public_cloud:
                trust = level
            elif sign < 0 and level == Trust.public_cloud:
                trust = Trust.attested
    if exclude:
        r.values["exclude_nodes"] = inv.ordered(exclude)
    if allowed:
        r.values["allowed_jurisdictions"] = sorted(allowed)
    if tier:
        r.values["prefer_tier"] = tier
    if trust:
        r.values["min_trust"] = trust.value
    if node_cands:
        r.candidates["exclude_nodes"] = inv.ordered(node_cands)
    if juris_cands or allowed:
        r.candidates["allowed_jurisdictions"] = sorted(juris_cands | (allowed or set()))
    if tier_cands:
        r.candidates["prefer_tier"] = sorted(tier_cands | {"edge", "cloud"} & set(inv.tiers))


# ---------------------------------------------------------------- model, service, load

_SIZE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?([bm])\b", re.I)
_NAME = r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*"
_SERVICE = re.compile(
    # 'service called X', 'service: X', "service 'X'", 'service docs-bot' -- but not 'this service
    # handles ...': a bare word after 'service' is a verb far more often than a name
    rf"\bservice\s*(?:called|named|:)\s*[`'\"]?({_NAME})[`'\"]?"
    rf"|\bservice\s+[`'\"]({_NAME})[`'\"]"
    rf"|\bservice\s+([a-z][a-z0-9]*(?:[-_][a-z0-9]+)+)\b"
    rf"|[`'\"]?\b([a-z][a-z0-9]*(?:[-_][a-z0-9]+)+)[`'\"]?\s+(?:service|app|deployment|endpoint)\b"
    rf"|`({_NAME})`", re.I)
_CONCURRENCY = re.compile(r"\b(\d+)\s+(?:concurrent|simultaneous|parallel)\s+(?:users|requests|sessions|streams|"
                          r"conversations|chats|sequences|clients)|\bconcurrency (?:of |at |to )?(\d+)", re.I)


def _model_parts(name: str) -> tuple[str, str | None]:
    family = re.match(r"[a-z]+", name).group(0)
    size = re.search(r"(\d+(?:\.\d+)?[bm])$", name)
    return family, size.group(1) if size else None


def _model_regex(name: str) -> str:
    parts = re.split(r"[-_ ]+", name)
    return r"(?<![\w-])" + r"[-_ ]?".join(re.escape(p) for p in parts) + r"(?![\w-])"


def find_models(text: str, inv: Inventory) -> list[str]:
    """Models of the shipped specs that the text names ('llama-3-70b', 'the 70B', 'qwen')."""
    full = [m for m in inv.models if re.search(_model_regex(m), text, re.I)]
    if full:
        return full
    sizes = {f"{float(s):g}{u.lower()}" for s, u in _SIZE.findall(text)}
    families = {f for f in {_model_parts(m)[0] for m in inv.models} if re.search(r"\b" + f, text, re.I)}
    out = []
    for m in inv.models:
        fam, size = _model_parts(m)
        if (sizes and size in sizes and (not families or fam in families)) or (not sizes and fam in families):
            out.append(m)
    return out


def find_services(text: str, inv: Inventory) -> list[str]:
    """Service names the text gives ('the discharge-assistant service', 'service docs-bot')."""
    taken = {x.lower() for x in inv.nodes + inv.models} | {n.zone.lower() for n in inv.cluster.nodes}
    out = []
    for m in _SERVICE.finditer(text):
        s = next(g for g in m.groups() if g)
        if s.lower() not in taken and s.lower() not in ("the", "a", "an", "is", "for", "that", "which") \
                and s not in out and not re.fullmatch(r"\d.*", s):
            out.append(s)
    return out


def extract_model(r: Reading, inv: Inventory, classify=None) -> None:
    """model: a shipped spec the text names; two or more candidates become a question."""
    models = find_models(r.text, inv)
    if models:
        r.candidates["model"] = models
        if len(models) == 1:
            r.values["model"] = models[0]
        else:
            r.weak.add("model")
            r.questions.append(f"Which model do you mean: {', '.join(models)}?")


def extract_service(r: Reading, inv: Inventory, classify=None) -> None:
    """service: a name the text gives the service."""
    services = find_services(r.text, inv)
    if services:
        r.candidates["service"] = services
        r.values["service"] = services[0]


def extract_concurrency(r: Reading, inv: Inventory, classify=None) -> None:
    """concurrency: 'N concurrent users'."""
    conc = [int(a or b) for a, b in _CONCURRENCY.findall(r.text)]
    if conc:
        r.candidates["concurrency"] = sorted(set(conc))
        r.values["concurrency"] = conc[0]


# field(s) -> extractor; each reads the prepared Reading and sets only its own fields
EXTRACTORS: list[tuple[tuple[str, ...], Callable[..., None]]] = [
    (("data_class",), extract_data_class),
    (("max_ttft_ms", "max_tpot_ms"), extract_latency),
    (("objective",), extract_objective),
    (("exclude_nodes", "allowed_jurisdictions", "prefer_tier", "min_trust"), extract_places),
    (("model",), extract_model),
    (("service",), extract_service),
    (("concurrency",), extract_concurrency),
]


def strip_injections(text: str) -> tuple[str, list[str]]:
    """The text with loosening spans blanked, and those spans as written."""
    clean, found = strip_loosening(text)
    return clean, [f.text for f in found]


def read_rules(text: str, inv: Inventory, classify=None) -> Reading:
    """The deterministic reading of an intent: the extractors over the text without its loosening spans.

    `classify(text, policy) -> (class, score) | None` is the fallback for a text with no data words
    (default: the embedding matcher; False: none).
    """
    clean, found = strip_loosening(fold(text))
    r = Reading(clean, text, ignored=[f.text for f in found], loosening=found)
    r.mentions = find_mentions(clean, inv)
    r.durations = find_durations(clean)
    for _, extract in EXTRACTORS:
        extract(r, inv, classify)
    return r
