"""Privacy: which data class a text is about, through a shipped taxonomy of data categories.

    prompts/data_taxonomy.yaml   categories (health, personal, payment card, ...) with names, acronyms,
                                 descriptions, examples and the terms intents use for them
    map_policy(policy)           each class of a pack onto one category: by its name or acronym, else by
                                 its own words, else by meaning (all-MiniLM-L6-v2 sentence embeddings,
                                 offline); a class that maps to nothing is reported
    class_evidence(text, inv)    every class the text gives evidence for: the pack's own words and names,
                                 and the taxonomy's terms through the mapping (a category no class maps
                                 onto falls back to its listed neighbours). The strictest class wins, by the
                                 pack's own rules: evidence can only raise the class, never lower it.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from policies import Policy

from .text import negated_before

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
EMBED_MAP_MIN = 0.30       # cosine of a class's profile to a category, to map it by meaning
EMBED_TEXT_MIN = 0.30      # cosine of an intent (with no data words) to a category or class example
EMBED_TEXT_MARGIN = 0.02   # over the runner-up class
# words that look like data words but name something else: 'public cloud', 'node health checks'
_STOP = re.compile(r"\bpublic[- ]cloud\b|\bpublic (?:gpus?|nodes?|boxes|machines|instances|hardware|providers?|"
                   r"regions?|internet|ip)\b|\bhealth[- ]?checks?\b|\b(?:node|cluster|gpu|service|system) health\b|"
                   r"\bhealthy\b|\bcloud money\b", re.I)


class PolicyMappingWarning(UserWarning):
    """A data class of a policy pack maps onto no category of the taxonomy."""


@dataclass(frozen=True)
class Category:
    id: str
    names: tuple[str, ...]
    description: str
    examples: tuple[str, ...]
    terms: tuple[str, ...]
    fallback: tuple[str, ...]


@lru_cache(maxsize=1)
def taxonomy() -> dict[str, Category]:
    """The shipped categories, most sensitive first (prompts/data_taxonomy.yaml)."""
    data = yaml.safe_load((PROMPTS / "data_taxonomy.yaml").read_text())["categories"]
    return {k: Category(k, tuple(str(x).lower() for x in v.get("names", [])), v.get("description", "").strip(),
                        tuple(v.get("examples", [])), tuple(str(x).lower() for x in v.get("terms", [])),
                        tuple(v.get("fallback", []))) for k, v in data.items()}


@dataclass(frozen=True)
class ClassMapping:
    """Where one class of a pack lands in the taxonomy, and how it got there."""
    data_class: str
    category: str | None
    how: str             # name | words | meaning | none
    score: float = 0.0
    detail: str = ""


@dataclass
class PolicyMap:
    """A pack's classes onto the taxonomy, both ways."""
    policy: Policy
    classes: dict[str, ClassMapping] = field(default_factory=dict)

    def of_category(self, cat: str) -> list[str]:
        return [c for c, m in self.classes.items() if m.category == cat]

    def unmapped(self) -> list[str]:
        return [c for c, m in self.classes.items() if m.category is None]

    def classes_for(self, cat: str) -> tuple[list[str], str | None]:
        """The classes evidence for a category lands on: its own, else the nearest fallback level's."""
        seen, level = {cat}, [cat]
        while level:
            got = [c for k in level for c in self.of_category(k)]
            if got:
                return got, (None if level == [cat] else "/".join(level))
            nxt = []
            for k in level:
                for f in taxonomy()[k].fallback if k in taxonomy() else ():
                    if f not in seen:
                        seen.add(f)
                        nxt.append(f)
            level = nxt
        return [], None


def _term_regex(term: str) -> str:
    parts = [re.escape(p) for p in re.split(r"[\s-]+", term) if p]
    # a hyphen bounds a word too: 'tax-assessment service', 'cdr-insights', 'EU-resident'
    return r"(?<!\w)" + r"[\s-]+".join(parts) + r"(?:s|es)?(?!\w)"


@lru_cache(maxsize=1)
def _term_patterns() -> list[tuple[str, re.Pattern]]:
    out = []
    for cat in taxonomy().values():
        terms = sorted(set(cat.terms) | set(cat.names), key=len, reverse=True)
        out.append((cat.id, re.compile("|".join(_term_regex(t) for t in terms), re.I)))
    return out


def _profile(name: str, rule) -> str:
    bits = [name.replace("-", " ").replace("_", " ")]
    if rule.description:
        bits.append(rule.description)
    if rule.words:
        bits.append(", ".join(rule.words))
    bits += list(rule.examples)
    return ". ".join(bits)


def _by_name(name: str) -> str | None:
    n = name.lower().replace("_", "-")
    for cat in taxonomy().values():
        if n in cat.names:
            return cat.id
    toks = [t for t in re.split(r"[-\s]+", n) if t]
    for cat in taxonomy().values():           # most sensitive first: 'claims-health' -> health
        if any(t in cat.names for t in toks):
            return cat.id
    return None


def _by_words(name: str, rule) -> tuple[str | None, str]:
    text = " ; ".join([rule.description, *rule.words, *rule.examples])
    if not text.strip(" ;"):
        return None, ""
    counts: dict[str, list[str]] = {}
    for cid, pat in _term_patterns():
        for m in pat.finditer(_STOP.sub(" ", text)):
            if not negated_before(text, m.start()):
                counts.setdefault(cid, []).append(m.group(0).lower())
    if not counts:
        return None, ""
    order = list(taxonomy())
    best = max(counts, key=lambda c: (len(set(counts[c])), -order.index(c)))
    return best, ", ".join(sorted(set(counts[best])))


def _by_meaning(name: str, rule) -> tuple[str | None, float]:
    from ..llm import LLMUnavailable, embed
    try:
        prof = embed([_profile(name, rule)])[0]
        best, score = None, -1.0
        for cat in taxonomy().values():
            vecs = embed([cat.description, *cat.examples])
            s = float((vecs @ prof).max())
            if s > score:
                best, score = cat.id, s
    except LLMUnavailable:
        return None, 0.0
    return (best, score) if score >= EMBED_MAP_MIN else (None, score)


_MAPS: dict[int, PolicyMap] = {}


def map_policy(policy: Policy) -> PolicyMap:
    """Each class of the pack onto a category of the taxonomy (cached per pack object)."""
    key = id(policy)
    if key in _MAPS and _MAPS[key].policy is policy:
        return _MAPS[key]
    pm = PolicyMap(policy)
    for name, rule in policy.data_classes.items():
        cat = _by_name(name)
        if cat:
            pm.classes[name] = ClassMapping(name, cat, "name", 1.0, f"'{name}' is a name of {cat}")
            continue
        cat, words = _by_words(name, rule)
        if cat:
            pm.classes[name] = ClassMapping(name, cat, "words", 1.0, f"its words and description: {words}")
            continue
        cat, score = _by_meaning(name, rule)
        pm.classes[name] = ClassMapping(name, cat, "meaning" if cat else "none", round(score, 3),
                                        f"nearest in meaning (cosine {score:.2f})" if cat else
                                        f"nothing near enough (best cosine {score:.2f})")
    _MAPS[key] = pm
    for c in pm.unmapped():
        warnings.warn(f"policy {policy.name}: data class '{c}' maps onto no category of the data taxonomy; "
                      "intents can name it only by its own name and words (add a description, words or "
                      "examples)", PolicyMappingWarning, stacklevel=2)
    return pm


@dataclass(frozen=True)
class Evidence:
    """One piece of the text that points at a data class."""
    data_class: str
    word: str
    start: int
    via: str               # 'class words' | 'taxonomy: health' | 'taxonomy: payment_card -> personal'


def class_words(name: str, rule) -> list[str]:
    words = {w.lower() for w in rule.words} | {name.lower(), name.lower().replace("-", " ")}
    return sorted(words, key=len, reverse=True)


def class_evidence(text: str, policy: Policy) -> list[Evidence]:
    """Every class the text gives evidence for, not negated ('no customer data'), in text order."""
    t = _STOP.sub(lambda m: " " * len(m.group(0)), text)
    out: list[Evidence] = []
    for name, rule in policy.data_classes.items():
        pat = "|".join(_term_regex(w) for w in class_words(name, rule))
        for m in re.finditer(pat, t, re.I):
            if not negated_before(t, m.start()):
                out.append(Evidence(name, m.group(0), m.start(), "class words"))
    pm = map_policy(policy)
    for cid, pat in _term_patterns():
        targets, via = pm.classes_for(cid)
        if not targets:
            continue
        for m in pat.finditer(t):
            if negated_before(t, m.start()):
                continue
            for c in targets:
                out.append(Evidence(c, m.group(0), m.start(), f"taxonomy: {cid}" + (f" -> {via}" if via else "")))
    return sorted(out, key=lambda e: e.start)


def by_meaning(text: str, policy: Policy) -> tuple[str, float] | None:
    """The class nearest in meaning to a text with no data words, if clearly so; None otherwise."""
    from ..llm import LLMUnavailable, embed
    pm = map_policy(policy)
    protos: list[tuple[str, str]] = []
    for name, rule in policy.data_classes.items():
        for s in [*rule.examples, rule.description, _profile(name, rule)]:
            if s:
                protos.append((name, s))
        m = pm.classes[name]
        if m.category:
            cat = taxonomy()[m.category]
            protos += [(name, s) for s in (cat.description, *cat.examples)]
    try:
        vecs = embed([s for _, s in protos])
        sims = vecs @ embed([text])[0]
    except LLMUnavailable:
        return None
    best: dict[str, float] = {}
    for (n, _), s in zip(protos, sims):
        best[n] = max(best.get(n, -1.0), float(s))
    ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)
    top, score = ranked[0]
    runner = ranked[1][1] if len(ranked) > 1 else -1.0
    if score >= EMBED_TEXT_MIN and score - runner >= EMBED_TEXT_MARGIN:
        return top, score
    return None
