"""The inventory and the places a text names: nodes, node groups, cities, countries, regions, tiers, trust.

Countries come from pycountry (names, official names, ISO codes); adjectives, groups of countries (EU, EEA,
the Nordics) and cities with their node-name codes and cloud regions from prompts/gazetteer.yaml. Every
place resolves to the cluster's own jurisdictions and nodes: a jurisdiction code that is a group (a
cluster's "eu") covers its members. Node names are matched exactly, or fuzzily (rapidfuzz) when a
name-shaped word is one typo away from exactly one node; nothing is ever invented.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pycountry
import yaml
from rapidfuzz import fuzz, process

from policies import Cluster, Policy, Trust, builtin_models

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
FUZZY_NODE_SCORE = 90     # rapidfuzz ratio for a near-miss node name ('ward-a-egde'); below it, no match


@lru_cache(maxsize=1)
def gazetteer() -> dict:
    """Place words beyond pycountry (prompts/gazetteer.yaml)."""
    return yaml.safe_load((PROMPTS / "gazetteer.yaml").read_text())


def fold(text: str) -> str:
    """Accents off, one character for one ('São Paulo' -> 'Sao Paulo'), so offsets stay."""
    return "".join(unicodedata.normalize("NFKD", ch)[0] if ord(ch) > 127 else ch for ch in text)


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


@dataclass(frozen=True)
class Mention:
    """A span of the text that names a group of nodes (or a tier / trust level / jurisdictions)."""
    start: int
    end: int
    text: str
    kind: str                    # node | group | place | jurisdiction | tier | trust
    nodes: frozenset[str]
    value: str | None = None     # the tier / trust level named
    codes: frozenset[str] = frozenset()   # jurisdiction: the cluster's jurisdiction codes it covers


@dataclass
class Inventory:
    """Names the text may be grounded in: nodes, zones, jurisdictions, models, data classes."""
    cluster: Cluster
    policy: Policy

    def __post_init__(self):
        self.nodes = [n.name for n in self.cluster.nodes]
        self.jurisdictions = sorted({n.jurisdiction for n in self.cluster.nodes})
        self.tiers = sorted({n.tier for n in self.cluster.nodes})
        self.models = sorted(builtin_models())

    def where(self, pred) -> frozenset[str]:
        return frozenset(n.name for n in self.cluster.nodes if pred(n))

    def ordered(self, names) -> list[str]:
        names = set(names)
        return [n for n in self.nodes if n in names]

    def strictness(self, data_class: str) -> tuple:
        """How strict a data class is; on doubt between two, the stricter one is taken."""
        return strictness(self.policy, data_class)

    def covering(self, countries: set[str]) -> frozenset[str]:
        """The cluster's jurisdictions that lie in any of these ISO countries (or are a group holding one)."""
        return frozenset(j for j in self.jurisdictions if _covers(j) & countries)


def strictness(policy: Policy, data_class: str) -> tuple:
    """How strict a class of the pack is, by its own rules: trust floor, trusted ends, fewer places, prefix."""
    r = policy.data_classes[data_class]
    n_j = len(r.allowed_jurisdictions) if r.allowed_jurisdictions is not None else 99
    return (r.min_trust.rank, (r.trusted_ends or r.min_trust).rank, -n_j, r.private_prefix_layers,
            r.encrypt_cross_boundary)


def _covers(code: str) -> set[str]:
    """The ISO countries a cluster jurisdiction code stands for: 'uk' -> gb, 'eu' -> the members."""
    groups = gazetteer()["groups"]
    if code in groups:
        return set(groups[code])
    alias = gazetteer()["demonyms"].get(code)
    return {alias or code}


@lru_cache(maxsize=1)
def _country_words() -> dict[str, str]:
    """word -> ISO code, from pycountry's names and the gazetteer's adjectives."""
    out: dict[str, str] = {}
    for c in pycountry.countries:
        for attr in ("name", "official_name", "common_name"):
            v = getattr(c, attr, None)
            if v:
                out[fold(v).lower()] = c.alpha_2.lower()
                short = re.sub(r",.*$|\s*\(.*\)$", "", fold(v)).lower()     # 'Korea, Republic of' -> 'korea'
                out.setdefault(short, c.alpha_2.lower())
    out.update({k: str(v) for k, v in gazetteer()["demonyms"].items()})
    return out


def _name_regex(name: str) -> str:
    parts = re.split(r"[-_ ]+", name)
    return r"(?<![\w-])" + r"[-_ ]?".join(re.escape(p) for p in parts) + r"(?![\w-])"


_GENERIC_TOKENS = {"edge", "cloud", "node", "nodes", "the", "and", "use", "gpu", "box", "rack", "eu", "us", "uk",
                   "west", "east", "north", "south", "central", "a", "b", "c", "lab", "labs", "branch", "plant",
                   "core", "colo", "pub", "mec", "amt", "uni", "dc", "rz", "research", "sov", "europe", "qc"}
_TIER_WORDS = {"edge": r"edge|edges|edge nodes|edge sites", "cloud": r"cloud|clouds|hyperscalers?|data ?cent(?:er|re)s?"}
# 'save cloud money', 'the cloud bill': the word names a cost, not a place
_NOT_TIER = re.compile(r"\bcloud (?:money|costs?|bills?|billing|spend(?:ing)?|budget|credits?|invoices?)\b", re.I)
TRUST_WORDS = {
    Trust.owned: r"owned|our own (?:hardware|machines|nodes|gpus|servers|boxes|kit|racks|sites)|"
                 r"(?:hardware|machines|nodes|gpus|servers|boxes|kit) (?:that )?we own|on[- ]prem(?:ises)?|"
                 r"in[- ]house|self[- ]hosted",
    Trust.attested: r"attested|confidential computing|trusted execution|enclaves?|\btees?\b",
    Trust.public_cloud: r"public[- ]cloud|rented|shared cloud|third[- ]party cloud",
}
_NODE_SHAPED = re.compile(r"(?<![\w-])[a-z][a-z0-9]*(?:-[a-z0-9]+){1,5}(?![\w-])", re.I)


def find_mentions(text: str, inv: Inventory) -> list[Mention]:
    """Every place in the text that names nodes of the inventory, longest match first, no overlaps."""
    text = fold(text)
    cands: list[Mention] = []
    c = inv.cluster

    def add(pattern: str, kind: str, nodes, value=None, flags=re.I, codes=frozenset()):
        for m in re.finditer(pattern, text, flags):
            cands.append(Mention(m.start(), m.end(), m.group(0), kind, frozenset(nodes), value, frozenset(codes)))

    for n in c.nodes:
        add(_name_regex(n.name), "node", {n.name})
        short = re.sub(r"[-_](edge|cloud|node)$", "", n.name)
        if short != n.name and len(short) >= 4:   # 'ward-a' for ward-a-edge, 'radiology' for radiology-edge
            add(_name_regex(short) + r"(?:\s+(?:edge|node|rack|box|gpu|machine|server))?", "node", {n.name})
    lower_names = {n.lower() for n in inv.nodes}
    for m in _NODE_SHAPED.finditer(text):     # a near-miss node name: one node only, never a new one
        w = m.group(0).lower()
        if w in lower_names or (not re.search(r"\d", w) and w.count("-") < 2):
            continue
        best = process.extract(w, inv.nodes, scorer=fuzz.ratio, score_cutoff=FUZZY_NODE_SCORE, limit=2)
        if len(best) == 1:
            cands.append(Mention(m.start(), m.end(), m.group(0), "node", frozenset({best[0][0]})))
    zones = sorted({n.zone for n in c.nodes if n.zone})
    for z in zones:
        add(_name_regex(z), "group", inv.where(lambda n, z=z: n.zone == z))
    for z in {re.sub(r"[a-z]$", "", z) for z in zones}:    # region without the AZ letter: eu-central-1
        add(_name_regex(z), "group", inv.where(lambda n, z=z: n.zone.startswith(z)))
    tokens_of = {n.name: set(re.split(r"[-_]", n.name.lower()) + re.split(r"[-_]", n.zone.lower()))
                 for n in c.nodes}
    for place, codes in gazetteer()["places"].items():
        prefixes = [x for x in codes if "-" in x]
        short = {x for x in codes if "-" not in x}
        nodes = inv.where(lambda n, p=prefixes, s=short: any(n.zone.startswith(x) for x in p)
                          or bool(tokens_of[n.name] & s))
        if nodes:
            add(r"\b" + r"\s+".join(map(re.escape, place.split())) + r"\b", "place", nodes)
    # distinctive tokens of node and zone names: 'leeds', 'radiology', 'fra', 'store'
    tokens: dict[str, set[str]] = {}
    for n in c.nodes:
        for t in tokens_of[n.name]:
            if re.fullmatch(r"[a-z]{3,}", t) and t not in _GENERIC_TOKENS:
                tokens.setdefault(t, set()).add(n.name)
    for t, nodes in tokens.items():
        add(r"\b" + re.escape(t) + r"(?:s|es)?\b", "group", nodes)
    for g in {n.gpu for n in c.nodes}:
        base = g.split("-")[0].lower()
        add(r"\b" + re.escape(base) + r"s?\b", "group", inv.where(lambda n, b=base: n.gpu.lower().startswith(b)))
    _add_jurisdictions(text, inv, cands)
    for tier, words in _TIER_WORDS.items():
        for m in re.finditer(r"\b(?:" + words + r")\b", text, re.I):
            if not _NOT_TIER.match(text, m.start()):
                cands.append(Mention(m.start(), m.end(), m.group(0), "tier",
                                     inv.where(lambda n, t=tier: n.tier == t), tier))
    for level, words in TRUST_WORDS.items():
        add(r"(?:" + words + r")", "trust", inv.where(lambda n, lv=level: n.trust == lv), level.value)
    return _resolve(cands, text, inv)


def _add_jurisdictions(text: str, inv: Inventory, cands: list[Mention]) -> None:
    """Countries (pycountry), groups (EU, EEA, the Nordics) and the cluster's own codes, as jurisdictions."""
    words: dict[str, set[str]] = {}
    cw = _country_words()
    for word, iso in cw.items():
        if inv.covering({iso}):
            words.setdefault(word, set()).add(iso)
    for group, ws in gazetteer()["group_words"].items():
        members = set(gazetteer()["groups"][group]) | {group}
        for w in ws:
            words.setdefault(w, set()).update(members)
    for word, isos in words.items():
        codes = inv.covering(isos)
        if not codes:
            continue
        nodes = inv.where(lambda n, cs=codes: n.jurisdiction in cs)
        if word.isalpha() and len(word) <= 3:
            # short codes: upper case only ('US', 'EU', 'DE'); lower-case 'us' is a pronoun, 'de' a particle
            pat, flags = r"(?<![\w-])" + re.escape(word.upper()) + r"(?!\w)", 0    # 'EU-resident' too
        else:
            pat, flags = r"(?<![\w-])" + r"\s+".join(map(re.escape, word.split())) + r"(?![\w-])", re.I
        for m in re.finditer(pat, text, flags):
            cands.append(Mention(m.start(), m.end(), m.group(0), "jurisdiction", nodes, None, codes))
    # the cluster's own codes, upper case ('DK', 'CH') and 'EU'-style
    for j in inv.jurisdictions:
        for m in re.finditer(r"(?<![\w-])" + re.escape(j.upper()) + r"(?![\w-])", text):
            cands.append(Mention(m.start(), m.end(), m.group(0), "jurisdiction",
                                 inv.where(lambda n, j=j: n.jurisdiction == j), None, frozenset({j})))


def _resolve(cands: list[Mention], text: str, inv: Inventory) -> list[Mention]:
    # longest first; earlier kinds (node > group > ...) win ties
    order = {"node": 0, "trust": 1, "group": 2, "place": 3, "jurisdiction": 4, "tier": 5}
    cands.sort(key=lambda m: (-(m.end - m.start), order[m.kind], m.start))
    taken: list[Mention] = []
    for m in cands:
        if not any(m.start < t.end and t.start < m.end for t in taken):
            taken.append(m)
    out: list[Mention] = []
    for m in sorted(taken, key=lambda m: m.start):
        # a group that is exactly one tier's nodes reads as that tier ('the stores' = edge)
        if m.kind in ("group", "place") and len(inv.tiers) > 1:
            for tier in inv.tiers:
                if m.nodes == inv.where(lambda n, t=tier: n.tier == t):
                    m = Mention(m.start, m.end, m.text, "tier", m.nodes, tier)
        # 'the Leeds stores', 'Stockholm cloud nodes': adjacent group words name the nodes in both groups
        if out and m.kind in ("group", "place", "tier") and out[-1].kind in ("group", "place", "jurisdiction") \
                and re.fullmatch(r"[\s-]*", text[out[-1].end:m.start]) and out[-1].nodes & m.nodes:
            p = out.pop()
            m = Mention(p.start, m.end, text[p.start:m.end], "group", p.nodes & m.nodes)
        out.append(m)
    return [m for m in out if m.nodes or m.kind in ("tier", "trust")]
