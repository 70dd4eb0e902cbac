"""Time limits written in a text, and which metric (TTFT or TPOT) each one bounds.

Numbers with units come from quantulum3 ('300 ms', 'three hundred milliseconds', '0.4 s'); fractions of
a second in words that it does not read ('a tenth of a second', 'half a second', 'a one-second budget')
from a small table. A limit bounds the metric whose cue words stand nearest to it in its clause, so
'first token within 300 ms and per-token latency below 60 ms' gives each number its own metric.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

from .text import window_after, window_before

# (pattern, milliseconds); longest first. quantulum3 reads numbers with units, not these fractions
_WORD_DURATIONS = [
    (r"a second and a half|one and a half seconds|one-and-a-half[- ]seconds?", 1500),
    (r"three quarters of a second", 750),
    (r"(?:a |one )?quarter(?: of a)?[- ]second", 250),
    (r"(?:a |one )?tenth of a second|(?:a |one )?tenth-second", 100),
    (r"(?:a |one )?fifth of a second", 200),
    (r"half (?:a |of a )?second|a half[- ]second|half-second", 500),
    (r"(?:a|one)[- ](?:full |single )?second|(?:a |one )?single second", 1000),
    (r"(?:a|one)[- ](?:full |single )?millisecond", 1),
]
_SECONDS = {"second", "second of arc"}          # quantulum3 reads '1.5 seconds' as arc seconds at times
_MILLIS = {"millisecond"}
_MINUTES = {"minute", "minute of arc"}
# what quantulum3 leaves dimensionless: '2 secs', '300 msecs'
_FALLBACK = re.compile(r"(?<![\w.-])(\d+(?:\.\d+)?)\s*(milliseconds?|millisecs?|msecs?|ms|seconds?|secs?|s)(?![\w-])",
                       re.I)

TPOT_CUES = re.compile(r"tpot|per[- ](?:output[- ])?token(?:[- ]latency)?|between tokens|inter[- ]token|"
                       r"token[- ]to[- ]token|each (?:output |next |later |generated )?token|every token|"
                       r"tokens? every|token gaps?|gap between|decode|decoding|streaming|stream(?:s|ed)? (?:out|at)|"
                       r"time per (?:output )?token|subsequent tokens|later tokens|next token|"
                       r"tokens? (?:after|apart)|generation speed|/\s*(?:output )?tok(?:en)?s?\b|"
                       r"\beach or (?:better|faster|less)|\beach\b(?= or )|apiece|token rate|output rate", re.I)
TTFT_CUES = re.compile(r"ttft|first[- ]token|time[- ]to[- ]first|first byte|first word|first response|"
                       r"first reply|first answer|start(?:s|ing)? (?:to )?(?:respond|answer|stream|reply)|respond|"
                       r"response|reply|answer|latency|wait|starts?|begin", re.I)


@dataclass(frozen=True)
class Duration:
    start: int
    end: int
    ms: float
    text: str


@lru_cache(maxsize=1)
def _quantulum():
    with warnings.catch_warnings():       # it warns that its optional classifier is missing; we need none
        warnings.simplefilter("ignore")
        from quantulum3 import parser
    return parser


@lru_cache(maxsize=512)
def _parse(text: str) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(_quantulum().parse(text))


def find_durations(text: str) -> list[Duration]:
    """Every time limit written in the text, in milliseconds ('0.4 s', 'half a second', 'under 250ms')."""
    out: list[Duration] = []

    def free(a, b):
        return not any(a < d.end and d.start < b for d in out)

    for pat, ms in _WORD_DURATIONS:
        for m in re.finditer(r"\b(?:" + pat + r")\b", text, re.I):
            if free(m.start(), m.end()):
                out.append(Duration(m.start(), m.end(), float(ms), m.group(0)))
    for q in _parse(text):
        a, b = q.span
        unit = q.unit.name
        scale = 1000.0 if unit in _SECONDS else 1.0 if unit in _MILLIS else 60000.0 if unit in _MINUTES else None
        if scale is None or not free(a, b) or q.value <= 0:
            continue
        # '4s-class GPUs', 'store-1s': a unit glued to a word is part of a name
        if re.match(r"-[a-z]", text[b:b + 2], re.I) or (a > 0 and re.match(r"[\w-]", text[a - 1])):
            continue
        if not re.search(r"\d|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|"
                         r"fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|"
                         r"seventy|eighty|ninety|hundred)\b", q.surface, re.I):
            continue
        out.append(Duration(a, b, round(float(q.value) * scale, 6), text[a:b]))
    for m in _FALLBACK.finditer(text):
        if free(m.start(), m.end()):
            v = float(m.group(1)) * (1 if m.group(2).lower().startswith("m") else 1000)
            out.append(Duration(m.start(), m.end(), v, m.group(0)))
    return sorted(out, key=lambda d: d.start)


_CONNECTOR = re.compile(r"^\s*(?:,|and\b|plus\b|with\b|while\b|but\b)", re.I)


def which_latency(text: str, d: Duration, prev: Duration | None = None, nxt: Duration | None = None) -> str:
    """'max_ttft_ms' or 'max_tpot_ms' for a duration (see _which)."""
    return _which(text, d, prev, nxt)[0]


def _which(text: str, d: Duration, prev: Duration | None = None, nxt: Duration | None = None) -> tuple[str, bool]:
    """'max_ttft_ms' or 'max_tpot_ms' for a duration, by the nearest cue in its clause.

    A cue between two limits belongs to one of them only: the clause is cut at the neighbouring limits,
    and after 'and' / ',' the words lead up to the next limit ('300 ms and per-token latency below 60 ms')."""
    before, after = window_before(text, d.start), window_after(text, d.end)
    if prev is not None and d.start - prev.end < len(before):
        before = text[prev.end:d.start]
    if nxt is not None and nxt.start - d.end <= len(after):
        after = text[d.end:nxt.start]
        if _CONNECTOR.match(after):
            after = ""
    best = None  # (distance, field); TPOT is tried first so that it wins a tie ('per-token latency')
    for pat, fld in ((TPOT_CUES, "max_tpot_ms"), (TTFT_CUES, "max_ttft_ms")):
        for m in pat.finditer(before):
            dist = len(before) - m.end()
            if best is None or dist < best[0]:
                best = (dist, fld)
        for m in pat.finditer(after):
            dist = m.start() + 1
            if best is None or dist < best[0]:
                best = (dist, fld)
    return (best[1], True) if best else ("max_ttft_ms", False)


def latency_limits(text: str, durations: list[Duration], uncued: set | None = None) -> dict[str, float]:
    """{max_ttft_ms, max_tpot_ms}: the first limit written for each metric. A limit with no cue word is
    taken as TTFT and its field added to `uncued`."""
    out: dict[str, float] = {}
    for i, d in enumerate(durations):
        prev = durations[i - 1] if i else None
        nxt = durations[i + 1] if i + 1 < len(durations) else None
        fld, cued = _which(text, d, prev, nxt)
        if fld not in out and not cued and uncued is not None:
            uncued.add(fld)
        out.setdefault(fld, d.ms)
    return out
