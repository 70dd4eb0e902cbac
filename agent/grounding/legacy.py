"""Grounding: what an intent's text can mean, given the cluster's inventory and the policy.

Three jobs, all deterministic:
  read_rules(text, inv)   a rule-based reading of the text (regex over the text + inventory)
  build_schema(reading)   a JSON schema for the LLM whose every field can only take values
                          grounded in the text or the inventory (built for each request)
  check(values, reading)  drops any value that is not grounded, or that would loosen the policy

Node groups people write ('the Frankfurt boxes', 'any node outside the EU', 'edge only') are
resolved through the inventory: zone, jurisdiction, tier, GPU kind, gazetteer of cloud regions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from policies import Cluster, Policy, Trust, builtin_models

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
OBJECTIVES = ("latency", "throughput", "cost", "balanced")
FIELDS = ("data_class", "objective", "max_ttft_ms", "max_tpot_ms", "exclude_nodes", "allowed_jurisdictions",
          "prefer_tier", "min_trust", "model", "service", "concurrency")


@lru_cache(maxsize=1)
def gazetteer() -> dict:
    """Place and jurisdiction words (prompts/gazetteer.yaml)."""
    return yaml.safe_load((PROMPTS / "gazetteer.yaml").read_text())


# ---------------------------------------------------------------- words and cues

_NEGATORS = r"not|never|no|don't|dont|do not|doesn't|avoid|avoiding|without|exclude|excluding|except|skip|" \
            r"off|stay off|keep off|away from|out of|drain|draining|drop|nothing|none|nor|anything but|" \
            r"take out|remove|stop using|other than|instead of|rather than"
_FLIPPERS = r"outside|leave|leaves|leaving|beyond|outside of"   # 'never leave X', 'nothing outside X'
_DOWN_AFTER = r"maintenance|down|offline|broken|flaky|closed|shut|drained|draining|unavailable|out of service|" \
              r"out of action|retired|retiring|decommission\w*|failing|overheating|off limits|off-limits|" \
              r"being (?:serviced|patched|upgraded|rebooted|replaced)|excluded|banned|forbidden|not allowed|" \
              r"unhealthy|degraded|is out|are out|must not|should not|shouldn't|mustn't"
_ONLY = r"only|just|exclusively|solely|restrict(?:ed)? to|pin(?:ned)? to|nowhere but|nothing but"
_PLACE_CUE = r"in|inside|within|stay|stays|keep|kept|remain|remains|resident|residency|on|at|to|only|" \
             r"prefer|preferably|favour|favor|run|use|leave|outside|local|locally"
_BOUNDARY = re.compile(r"[.;!?\n]|,|\bbut\b|\bwhile\b|\bwhereas\b|\bhowever\b|\balthough\b|\bthough\b|\bplus\b|"
                       r"\band (?=(?:bring|keep|make|get|use|run|prefer|put|aim|target|let|cut|hold|stay))",
                       re.I)
_LIST_GAP = re.compile(r"^(?:\s|,|and|or|nor|&|/|the|also|plus|as well as)*$", re.I)
_CLASS_STOP = re.compile(r"\bpublic[- ]cloud\b|\bpublic (?:gpus?|nodes?|boxes|machines|instances|hardware|"
                         r"providers?|regions?)\b", re.I)

_INJECTION = re.compile(
    r"[^.;:,!?\n]*\b(?:ignore|ignoring|override|overriding|bypass|disable|turn off|switch off|skip|forget|disregard|"
    r"waive|relax|suspend|lift|drop|loosen|break|circumvent|no need (?:for|to follow))\b[^.;:,!?\n]*"
    r"\b(?:rules?|polic(?:y|ies)|residency|restrictions?|compliance|validator|validation|checks?|gdpr|hipaa|"
    r"pci|guardrails?|constraints?|requirements?|limits on where)\b[^.;!?\n]*"
    r"|[^.;:,!?\n]*\b(?:auto[- ]?(?:apply|mode)|approval mode|read-only mode|suggest mode|confirm mode|"
    r"without (?:asking|approval|confirmation|review)|don't ask|do not ask|no approval|skip (?:the )?approval|"
    r"apply (?:it )?(?:directly|immediately|straight away)|switch (?:to|into) \w+ mode|set (?:the )?mode)\b"
    r"[^.;!?\n]*"
    r"|[^.;:,!?\n]*\b(?:you (?:may|can|are allowed to)|it'?s (?:fine|ok|okay) to|feel free to|allowed to|"
    r"permitted to|go ahead and)\b[^.;:,!?\n]*\b(?:us|eu|uk|outside|abroad|any (?:region|country|node|where)|"
    r"public|untrusted|anywhere)\b[^.;!?\n]*",
    re.I)

_TPOT_CUES = re.compile(r"tpot|per[- ](?:output[- ])?token|between tokens|inter[- ]token|token[- ]to[- ]token|"
                        r"each (?:output |next |later )?token|every token|token gaps?|gap between|decode|decoding|"
                        r"streaming|stream(?:s|ed)? (?:out|at)|time per (?:output )?token|subsequent tokens|"
                        r"later tokens|next token|tokens? (?:after|apart)|generation speed", re.I)
_TTFT_CUES = re.compile(r"ttft|first[- ]token|time[- ]to[- ]first|first byte|first word|first response|"
                        r"start(?:s|ing)? (?:to )?(?:respond|answer|stream|reply)|respond|response|reply|"
                        r"answer|latency|wait|starts?|begin", re.I)

_OBJECTIVE_CUES = {
    "latency": r"latency|latencies|fast|faster|fastest|quick|quickly|quicker|snappy|snappier|responsive|"
               r"speed|speedy|low[- ]lag|lag|sluggish|slow|interactive|real[- ]time|asap|as soon as possible|"
               r"minimi[sz]e (?:the )?(?:delay|wait)|waiting|instant",
    "throughput": r"throughput|volume|volumes|batch|batches|batched|as many (?:requests|users|tokens)|"
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

_TRUST_WORDS = {
    Trust.owned: r"owned|our own (?:hardware|machines|nodes|gpus|servers|boxes|kit)|on[- ]prem(?:ises)?|"
                 r"in[- ]house",
    Trust.attested: r"attested|confidential computing|trusted execution|enclaves?|\btees?\b",
    Trust.public_cloud: r"public[- ]cloud|rented|shared cloud|third[- ]party cloud",
}
_TIER_WORDS = {"edge": r"edge|edges", "cloud": r"cloud|clouds|hyperscalers?|data ?cent(?:er|re)s?"}

_NUM_WORDS = {"one": 1, "a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
              "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20,
              "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "eighty": 80, "hundred": 100}
_WORD_DURATIONS = [  # (pattern, milliseconds); longest first
    (r"a second and a half|one and a half seconds|1\.5 seconds", 1500),
    (r"(?:a |one )?quarter(?: of a)? second", 250),
    (r"(?:a |one )?tenth of a second", 100),
    (r"half (?:a |of a )?second|a half[- ]second|half-second|0\.5 of a second", 500),
    (r"three quarters of a second", 750),
    (r"(?:a|one) (?:full |single )?second", 1000),
    (r"(?:a|one) (?:full |single )?millisecond", 1),
]
_DURATION = re.compile(
    r"(?<![\w.-])(\d+(?:\.\d+)?)\s*(milliseconds?|millisecs?|msecs?|ms|seconds?|secs?|s)(?![\w-])", re.I)
_WORD_NUM_DURATION = re.compile(
    r"\b(one|two|three|four|five|six|seven|eight|nine|ten|twenty|thirty|fifty)(?:[ -](hundred))?"
    r"(?:[ -](fifty|twenty|thirty|forty|sixty|eighty))?\s+(milliseconds?|ms|seconds?)\b", re.I)

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


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


# ---------------------------------------------------------------- the inventory


@dataclass(frozen=True)
class Mention:
    """A span of the text that names a group of nodes (or a tier / trust level / jurisdiction)."""
    start: int
    end: int
    text: str
    kind: str                    # node | group | place | jurisdiction | tier | trust
    nodes: frozenset[str]
    value: str | None = None     # the jurisdiction / tier / trust level named


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
        r = self.policy.data_classes[data_class]
        n_j = len(r.allowed_jurisdictions) if r.allowed_jurisdictions is not None else 99
        return (r.min_trust.rank, (r.trusted_ends or r.min_trust).rank, -n_j, r.private_prefix_layers,
                r.encrypt_cross_boundary)


def _name_regex(name: str) -> str:
    parts = re.split(r"[-_ ]+", name)
    return r"(?<![\w-])" + r"[-_ ]?".join(re.escape(p) for p in parts) + r"(?![\w-])"


_GENERIC_TOKENS = {"edge", "cloud", "node", "nodes", "the", "and", "use", "gpu", "box", "rack", "eu", "us", "uk",
                   "west", "east", "north", "south", "central", "a", "b", "c"}


def find_mentions(text: str, inv: Inventory) -> list[Mention]:
    """Every place in the text that names nodes of the inventory, longest match first, no overlaps."""
    cands: list[Mention] = []
    c = inv.cluster

    def add(pattern: str, kind: str, nodes, value=None, flags=re.I):
        for m in re.finditer(pattern, text, flags):
            cands.append(Mention(m.start(), m.end(), m.group(0), kind, frozenset(nodes), value))

    for n in c.nodes:
        add(_name_regex(n.name), "node", {n.name})
        short = re.sub(r"[-_](edge|cloud|node)$", "", n.name)
        if short != n.name and len(short) >= 4:   # 'ward-a' for ward-a-edge, 'radiology' for radiology-edge
            add(_name_regex(short) + r"(?:\s+(?:edge|node|rack|box|gpu|machine|server))?", "node", {n.name})
    zones = sorted({n.zone for n in c.nodes if n.zone})
    for z in zones:
        add(_name_regex(z), "group", inv.where(lambda n, z=z: n.zone == z))
    for z in {re.sub(r"[a-z]$", "", z) for z in zones}:    # region without the AZ letter: eu-central-1
        add(_name_regex(z), "group", inv.where(lambda n, z=z: n.zone.startswith(z)))
    for place, prefixes in gazetteer()["places"].items():
        nodes = inv.where(lambda n, p=prefixes: any(n.zone.startswith(x) for x in p))
        if nodes:
            add(r"\b" + r"\s+".join(map(re.escape, place.split())) + r"\b", "place", nodes)
    # distinctive tokens of node and zone names: 'leeds', 'radiology', 'fra', 'store'
    tokens: dict[str, set[str]] = {}
    for n in c.nodes:
        for t in set(re.split(r"[-_]", n.name.lower()) + re.split(r"[-_]", n.zone.lower())):
            if re.fullmatch(r"[a-z]{3,}", t) and t not in _GENERIC_TOKENS:
                tokens.setdefault(t, set()).add(n.name)
    for t, nodes in tokens.items():
        add(r"\b" + re.escape(t) + r"(?:s|es)?\b", "group", nodes)
    gpus = {n.gpu for n in c.nodes}
    for g in gpus:
        base = g.split("-")[0].lower()
        add(r"\b" + re.escape(base) + r"s?\b", "group", inv.where(lambda n, b=base: n.gpu.lower().startswith(b)))
    for code, words in gazetteer()["jurisdictions"].items():
        if code not in inv.jurisdictions:
            continue
        nodes = inv.where(lambda n, j=code: n.jurisdiction == j)
        upper = [w for w in words if w.isupper()]
        lower = [w for w in words if not w.isupper()]
        if lower:
            add(r"(?<![\w-])(?:" + _alt(lower) + r")(?![\w-])", "jurisdiction", nodes, code)
        if upper:
            add(r"(?<![\w-])(?:" + _alt(upper) + r")(?![\w-])", "jurisdiction", nodes, code, flags=0)
    for tier, words in _TIER_WORDS.items():
        add(r"\b(?:" + words + r")\b", "tier", inv.where(lambda n, t=tier: n.tier == t), tier)
    for level, words in _TRUST_WORDS.items():
        add(r"(?:" + words + r")", "trust", inv.where(lambda n, lv=level: n.trust == lv), level.value)

    # longest first; earlier kinds (node > group > ...) win ties
    order = {"node": 0, "trust": 1, "group": 2, "place": 3, "jurisdiction": 4, "tier": 5}
    cands.sort(key=lambda m: (-(m.end - m.start), order[m.kind], m.start))
    taken: list[Mention] = []
    for m in cands:
        if not any(m.start < t.end and t.start < m.end for t in taken):
            taken.append(m)
    out = []
    for m in sorted(taken, key=lambda m: m.start):
        # a group that is exactly one jurisdiction's or tier's nodes reads as that ('the stores' = edge)
        if m.kind in ("group", "place"):
            for tier in inv.tiers:
                if m.nodes == inv.where(lambda n, t=tier: n.tier == t) and len(inv.tiers) > 1:
                    m = Mention(m.start, m.end, m.text, "tier", m.nodes, tier)
        # 'the Leeds stores', 'Virginia L40S': adjacent group words name the nodes in both groups
        if out and m.kind in ("group", "place", "tier") and out[-1].kind in ("group", "place", "jurisdiction") \
                and re.fullmatch(r"[\s-]*", text[out[-1].end:m.start]) and out[-1].nodes & m.nodes:
            p = out.pop()
            m = Mention(p.start, m.end, text[p.start:m.end], "group", p.nodes & m.nodes)
        out.append(m)
    return [m for m in out if m.nodes or m.kind in ("tier", "trust")]


# ---------------------------------------------------------------- polarity of a mention


def _window_before(text: str, start: int) -> str:
    """Text from the last clause boundary to `start`."""
    last = 0
    for b in _BOUNDARY.finditer(text, 0, start):
        last = b.end()
    return text[last:start]


def _window_after(text: str, end: int) -> str:
    b = _BOUNDARY.search(text, end)
    return text[end:b.start() if b else len(text)]


def _count(pattern: str, s: str) -> int:
    return len(re.findall(r"(?<![\w'])(?:" + pattern + r")(?![\w'])", s, re.I))


def polarity(text: str, m: Mention, prev: tuple[Mention, int] | None) -> tuple[int, bool, bool]:
    """(+1 include / -1 exclude, has a placement cue, says 'only') for a mention, from the words around it."""
    if prev is not None and _LIST_GAP.match(text[prev[0].end:m.start]) and text[prev[0].end:m.start].strip():
        return prev[1], True, False
    before, after = _window_before(text, m.start), _window_after(text, m.end)
    near_after = " ".join(after.split()[:4])
    neg = _count(_NEGATORS, before) + _count(_FLIPPERS, before)
    if re.search(r"(?<![\w'])(?:" + _DOWN_AFTER + r")(?![\w'])", after, re.I):
        neg += 1
    if re.search(r"^\s*(?:are|is)?\s*(?:not|never|no longer)\b", after, re.I):
        neg += 1
    cue = bool(_count(_PLACE_CUE, before) or _count(_NEGATORS, before) or _count(_FLIPPERS, before)
               or _count(_ONLY + "|" + _DOWN_AFTER, near_after) or neg)
    only = bool(_count(_ONLY, before) or re.match(r"^[\s-]*(?:only|exclusively)\b", after, re.I))
    if re.match(r"^[\s-]*(?:preferred|first|please|preferably|is preferred|if possible)\b", after, re.I):
        cue = True
    return (-1 if neg % 2 else 1), cue, only


# ---------------------------------------------------------------- durations, models, services


@dataclass(frozen=True)
class Duration:
    start: int
    end: int
    ms: float
    text: str


def find_durations(text: str) -> list[Duration]:
    """Every time limit written in the text, in milliseconds ('0.4 s', 'half a second', 'under 250ms')."""
    out: list[Duration] = []

    def free(a, b):
        return not any(a < d.end and d.start < b for d in out)

    for pat, ms in _WORD_DURATIONS:
        for m in re.finditer(r"\b(?:" + pat + r")\b", text, re.I):
            if free(m.start(), m.end()):
                out.append(Duration(m.start(), m.end(), float(ms), m.group(0)))
    for m in _WORD_NUM_DURATION.finditer(text):
        if not free(m.start(), m.end()):
            continue
        n = _NUM_WORDS[m.group(1).lower()] * (100 if m.group(2) else 1) + (_NUM_WORDS[m.group(3).lower()]
                                                                           if m.group(3) else 0)
        out.append(Duration(m.start(), m.end(), float(n * (1 if m.group(4).lower().startswith("m") else 1000)),
                            m.group(0)))
    for m in _DURATION.finditer(text):
        if not free(m.start(), m.end()):
            continue
        unit = m.group(2).lower()
        v = float(m.group(1)) * (1 if unit.startswith("m") else 1000)
        out.append(Duration(m.start(), m.end(), v, m.group(0)))
    return sorted(out, key=lambda d: d.start)


def _which_latency(text: str, d: Duration) -> str:
    """'max_ttft_ms' or 'max_tpot_ms' for a duration, by the nearest cue in its clause."""
    before, after = _window_before(text, d.start), _window_after(text, d.end)
    best = None  # (distance, field)
    for pat, fld in ((_TPOT_CUES, "max_tpot_ms"), (_TTFT_CUES, "max_ttft_ms")):
        for m in pat.finditer(before):
            dist = len(before) - m.end()
            if best is None or dist < best[0]:
                best = (dist, fld)
        for m in pat.finditer(after):
            dist = m.start() + 1
            if best is None or dist < best[0]:
                best = (dist, fld)
    return best[1] if best else "max_ttft_ms"


def _model_parts(name: str) -> tuple[str, str | None]:
    family = re.match(r"[a-z]+", name).group(0)
    size = re.search(r"(\d+(?:\.\d+)?[bm])$", name)
    return family, size.group(1) if size else None


def find_models(text: str, inv: Inventory) -> list[str]:
    """Models of the shipped specs that the text names ('llama-3-70b', 'the 70B', 'qwen')."""
    full = [m for m in inv.models if re.search(_name_regex(m), text, re.I)]
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


# ---------------------------------------------------------------- data class


def _class_words(name: str, rule) -> list[str]:
    words = {w.lower() for w in rule.words} | {name.lower(), name.lower().replace("-", " ")}
    return sorted(words)


def data_class_by_words(text: str, inv: Inventory) -> tuple[list[str], dict[str, list[str]]]:
    """Data classes whose words occur in the text (not negated: 'no patient data'); strictest first."""
    t = _CLASS_STOP.sub(" ", text)
    hits: dict[str, list[str]] = {}
    for name, rule in inv.policy.data_classes.items():
        for w in _class_words(name, rule):
            for m in re.finditer(r"(?<![\w-])" + re.escape(w) + r"(?![\w-])", t, re.I):
                pre = t[max(0, m.start() - 30):m.start()].lower()
                if re.search(r"\b(?:no|not|without|non|never|nothing|zero|free of)\b[\w\s-]{0,14}$", pre) \
                        or re.search(r"non-$", pre):
                    continue
                hits.setdefault(name, []).append(w)
    order = sorted(hits, key=inv.strictness, reverse=True)
    return order, hits


# ---------------------------------------------------------------- the rule reading


@dataclass
class Reading:
    """What the rules read in a text, and the grounded candidates for every field."""
    text: str                                   # the text with ignored instructions blanked out
    original: str = ""                          # the text as written
    values: dict[str, Any] = field(default_factory=dict)
    candidates: dict[str, list] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)      # instructions that tried to change policy/mode
    questions: list[str] = field(default_factory=list)
    weak: set[str] = field(default_factory=set)           # fields read with low confidence
    mentions: list[Mention] = field(default_factory=list)
    durations: list[Duration] = field(default_factory=list)


def strip_injections(text: str) -> tuple[str, list[str]]:
    """Blank out sentences that try to change the policy or the approval mode; they set nothing."""
    ignored = []

    def blank(m):
        ignored.append(m.group(0).strip())
        return " " * len(m.group(0))
    return _INJECTION.sub(blank, text), ignored


def read_rules(text: str, inv: Inventory, classify=None) -> Reading:
    """The deterministic reading of an intent: regex and rules over the text and the inventory.

    `classify(text, inv) -> (class, score) | None` is the fallback for data-class phrasing that no
    policy word covers (the embedding matcher).
    """
    clean, ignored = strip_injections(text)
    r = Reading(clean, text, ignored=ignored)
    r.mentions = find_mentions(clean, inv)
    # time limits, objective, model, service and load cannot loosen the policy: they are read from the
    # whole text, so 'switch to auto mode, 80 ms per token' keeps its limit. Placement and data class
    # come from the text without the ignored instructions.
    soft = text
    r.durations = find_durations(soft)

    # data class
    # data class: candidates for the LLM are the classes the words name, else the nearest by meaning
    classes, _ = data_class_by_words(clean, inv)
    r.candidates["data_class"] = classes or list(inv.policy.data_classes)
    if classes:
        r.values["data_class"] = classes[0]
    elif classify is not None:
        got = classify(clean, inv)
        if got is not None:
            r.values["data_class"] = got[0]
            r.weak.add("data_class")
            r.candidates["data_class"] = [got[0]] + [c for c in inv.policy.data_classes if c != got[0]]

    # latency limits
    for d in r.durations:
        fld = _which_latency(soft, d)
        r.values.setdefault(fld, d.ms)
    ms = sorted({d.ms for d in r.durations})
    if ms:
        r.candidates["max_ttft_ms"] = r.candidates["max_tpot_ms"] = ms

    # objective: cue words, unless the clause says it does not matter
    scores: dict[str, int] = {}
    for obj, pat in _OBJECTIVE_CUES.items():
        for m in re.finditer(r"(?<![\w-])(?:" + pat + r")(?![\w-])", soft, re.I):
            if any(d.start <= m.start() < d.end for d in r.durations):
                continue
            clause = _window_before(soft, m.start()) + soft[m.start():m.end()] + _window_after(soft, m.end())
            if _DONT_CARE.search(clause):
                continue
            scores[obj] = scores.get(obj, 0) + 1
    if scores:
        best = max(scores.values())
        top = [o for o in OBJECTIVES if scores.get(o) == best]
        r.values["objective"] = top[0] if len(top) == 1 else "balanced"
        r.candidates["objective"] = [o for o in OBJECTIVES if o in scores]

    # places: exclusions, jurisdictions, tier, trust
    exclude: list[str] = []
    allowed: set[str] | None = None
    tier = trust = None
    prev = None
    node_cands: set[str] = set()
    juris_cands: set[str] = set()
    tier_cands: set[str] = set()
    for m in r.mentions:
        sign, cue, only = polarity(clean, m, prev)
        prev = (m, sign)
        if m.kind in ("node", "group", "place"):
            node_cands |= m.nodes
            if sign < 0:
                exclude += [n for n in inv.ordered(m.nodes) if n not in exclude]
            elif only:
                exclude += [n for n in inv.nodes if n not in m.nodes and n not in exclude]
        elif m.kind == "jurisdiction":
            juris_cands.add(m.value)
            if not cue:
                continue
            keep = {m.value} if sign > 0 else set(inv.jurisdictions) - {m.value}
            allowed = keep if allowed is None else (allowed | keep if sign > 0 else allowed & keep)
        elif m.kind == "tier":
            tier_cands.add(m.value)
            if cue or only:
                tier = m.value if sign > 0 else next((t for t in ("edge", "cloud") if t != m.value), None)
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

    models = find_models(soft, inv)
    if models:
        r.candidates["model"] = models
        if len(models) == 1:
            r.values["model"] = models[0]
        else:
            r.questions.append(f"Which model do you mean: {', '.join(models)}?")
    services = find_services(soft, inv)
    if services:
        r.candidates["service"] = services
        r.values["service"] = services[0]
    conc = [int(a or b) for a, b in _CONCURRENCY.findall(soft)]
    if conc:
        r.candidates["concurrency"] = sorted(set(conc))
        r.values["concurrency"] = conc[0]
    return r


# ---------------------------------------------------------------- the per-request schema


def build_schema(r: Reading) -> dict:
    """A JSON schema whose fields can only take values grounded in this text or the inventory (or null)."""
    props: dict[str, Any] = {}
    c = r.candidates
    props["data_class"] = {"enum": list(c["data_class"]) + [None]}
    for f in ("objective", "max_ttft_ms", "max_tpot_ms"):
        if f in c:
            props[f] = {"enum": list(c[f]) + [None]}
    # sets are asked as one yes/no per grounded candidate: bounded output, no repeats
    for f in ("exclude_nodes", "allowed_jurisdictions"):
        if f in c:
            props[f] = {"type": "object", "properties": {x: {"type": "boolean"} for x in c[f]},
                        "required": list(c[f]), "additionalProperties": False}
    for f in ("prefer_tier", "model", "service", "concurrency"):
        if f in c:
            props[f] = {"enum": list(c[f]) + [None]}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


# ---------------------------------------------------------------- the check pass


def from_schema(values: dict[str, Any]) -> dict[str, Any]:
    """LLM answers in build_schema's shape back to field values: {name: true/false} maps become lists."""
    out = dict(values)
    for f in ("exclude_nodes", "allowed_jurisdictions"):
        if isinstance(out.get(f), dict):
            out[f] = [k for k, v in out[f].items() if v is True] or None
    return out


def check(values: dict[str, Any], r: Reading, inv: Inventory) -> tuple[dict[str, Any], list[str]]:
    """Keep only grounded values; return (kept, dropped-with-why). Nothing may loosen the policy."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    text = r.original or r.text
    durations = {d.ms for d in r.durations}
    policy = inv.policy
    for f, v in values.items():
        if v is None or v == [] or f not in FIELDS:
            if f not in FIELDS and v is not None:
                dropped.append(f"{f}={v!r}: not a field of an intent")
            continue
        why = None
        if f == "data_class":
            if v not in policy.data_classes:
                why = f"not a data class of policy {policy.name}"
        elif f == "objective":
            if v not in OBJECTIVES:
                why = "not an objective (latency, throughput, cost, balanced)"
            elif v not in r.candidates.get("objective", []):
                why = "no word of the text asks for it"
        elif f in ("max_ttft_ms", "max_tpot_ms"):
            if not isinstance(v, (int, float)) or float(v) not in durations:
                why = "no such time limit in the text"
        elif f == "exclude_nodes":
            v = list(v) if isinstance(v, (list, tuple)) else [v]
            bad = [n for n in v if n not in r.candidates.get("exclude_nodes", [])]
            for n in bad:
                dropped.append(f"exclude_nodes: '{n}': " + ("the text does not name it or its group"
                                                           if n in inv.nodes else "no such node in the cluster"))
            v = [n for n in v if n not in bad]
            if not v:
                continue
        elif f == "allowed_jurisdictions":
            v = list(v) if isinstance(v, (list, tuple)) else [v]
            bad = [j for j in v if j not in inv.jurisdictions]
            for j in bad:
                dropped.append(f"allowed_jurisdictions: '{j}': no node of the cluster is there")
            v = [j for j in v if j not in bad]
            if not v:
                continue
        elif f == "prefer_tier":
            if v not in ("edge", "cloud") or v not in inv.tiers:
                why = "not a tier of this cluster"
        elif f == "min_trust":
            if v not in [t.value for t in Trust]:
                why = "not a trust level"
        elif f == "model":
            if v not in r.candidates.get("model", []):
                why = "the text does not name this model" if v in inv.models else "not a known model"
        elif f == "service":
            if not isinstance(v, str) or not re.search(r"(?<![\w-])" + re.escape(v) + r"(?![\w-])", text):
                why = "the text does not name this service"
        elif f == "concurrency":
            if not isinstance(v, int) or v not in r.candidates.get("concurrency", []):
                why = "no such number in the text"
        if why:
            dropped.append(f"{f}={v!r}: {why}")
        else:
            kept[f] = v
    kept, more = narrow_only(kept, inv)
    return kept, dropped + more


def narrow_only(values: dict[str, Any], inv: Inventory) -> tuple[dict[str, Any], list[str]]:
    """Drop anything that asks for more than the policy allows the data class: an intent only tightens."""
    rule = inv.policy.data_classes.get(values.get("data_class"))
    if rule is None:
        return values, []
    out, dropped = dict(values), []
    if "allowed_jurisdictions" in out and rule.allowed_jurisdictions is not None:
        extra = [j for j in out["allowed_jurisdictions"] if j not in rule.allowed_jurisdictions]
        if extra:
            dropped.append(f"allowed_jurisdictions: {', '.join(extra)}: policy {inv.policy.name} does not allow "
                           f"{values['data_class']} there; an intent can only narrow the policy")
            out["allowed_jurisdictions"] = [j for j in out["allowed_jurisdictions"] if j not in extra]
            if not out["allowed_jurisdictions"]:
                del out["allowed_jurisdictions"]
    if "min_trust" in out and not Trust(out["min_trust"]).at_least(rule.min_trust):
        dropped.append(f"min_trust={out['min_trust']}: below the policy's {rule.min_trust.value} for "
                       f"{values['data_class']}; an intent can only tighten")
        del out["min_trust"]
    return out, dropped
