"""The controller's knobs, with defaults that work, read from an intent file's front matter or a dict.

In an intent file they sit under `autopilot:` in the front matter:

    ---
    cluster: ../local/cluster.yaml
    policy: ../local/policy.yaml
    autopilot:
      mode: advisory        # advisory | confirm | auto
      interval_s: 10
      hysteresis: 3
      cooldown_s: 60
    ---

A bad value is an error that names the knob and the value (AutopilotConfigError).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from policies.loading import InputError, parse_yaml

MODES = ("advisory", "confirm", "auto")


class AutopilotConfigError(InputError):
    """A knob with a value the controller cannot use; the message names the file, line, knob and value."""


@dataclass(frozen=True)
class AutopilotConfig:
    """Controller knobs. Times are seconds of the Target's clock (wall clock live, simulated time in the simulator)."""
    mode: str = "advisory"          # advisory: recommend and journal, never act; confirm: ask; auto: act
    interval_s: float = 10.0        # one tick per interval
    horizon_s: float = 300.0        # how far ahead the forecast looks, and what a move's cost is amortised over
    hysteresis: int = 3             # the same recommendation for this many consecutive ticks before acting
    cooldown_s: float = 60.0        # no change (except for a node lost) this long after one
    min_gain: float = 0.10          # a cheaper plan must save at least this fraction of the cost per hour
    headroom: float = 0.80          # a plan carries at most this fraction of its throughput (scale-up above it)
    scale_down_headroom: float = 0.60   # survivors must carry the load at or under this fraction (the band stops flips)
    noise_z: float = 2.0            # scale-down is judged on the forecast plus this many standard errors of the
                                    # measured rate (a Poisson count), so a few low readings do not shrink it
    alpha: float = 0.3              # forecaster: level smoothing
    beta: float = 0.1               # forecaster: trend smoothing
    damping_s: float = 60.0         # forecaster: the trend's projection fades with this time constant
    window: str = "10s"             # the /admin/stats window the load is read from (a service keeps 10s and 60s)
    max_stages: int = 8             # the planner's bound on stages
    pause_s: float = 0.05           # expected pause of a switch until one has been measured
    min_rate: float = 0.0           # arrivals per second assumed at least (0: an idle service may shrink to one node)
    scale_up_hysteresis: int | None = None   # ticks in a row before scaling up when the live plan would miss
                                    # the SLOs or run over `headroom` (a panic window); None: `hysteresis`
    prefill_chunk_tokens: int | None = None  # the engine's prefill budget per step while others decode
                                    # (how big a prompt chunk rides in a decode step); None: whole prompts
    max_replicas: int = 2           # pipeline replicas beside the plan the controller may add when no one
                                    # pipeline carries the forecast (0: it only advises them)
    seat_levels: tuple = ()         # KV reservations (concurrency) a plan may be sized for besides the intent's
                                    # traffic.concurrency (its smallest): more seats carry more load on the same nodes
    tail_aware: bool = True         # judge the TPOT bound on the slow requests: the predicted TPOT times the
                                    # live plan's measured p99 / p50 spread (smoothed); False: on the median one

    def __post_init__(self):
        if isinstance(self.seat_levels, list):
            object.__setattr__(self, "seat_levels", tuple(self.seat_levels))
        self.check()

    def check(self, source: str | None = None, lines: dict[str, int] | None = None) -> None:
        """Raise AutopilotConfigError naming the first bad knob (and its file and line when known)."""
        def bad(knob, why):
            raise AutopilotConfigError(f"{getattr(self, knob)!r} {why}", file=source,
                                       line=(lines or {}).get(knob), field=f"autopilot.{knob}")
        if self.mode not in MODES:
            bad("mode", f"must be one of {', '.join(MODES)}")
        for knob in ("interval_s", "horizon_s", "pause_s", "damping_s"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(knob, "must be a positive number of seconds")
        for knob in ("cooldown_s", "min_gain", "min_rate", "noise_z"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(knob, "must be a number >= 0")
        for knob in ("hysteresis", "max_stages"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(knob, "must be a whole number >= 1")
        if not isinstance(self.tail_aware, bool):
            bad("tail_aware", "must be true or false")
        v = self.max_replicas
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            bad("max_replicas", "must be a whole number >= 0 (0: replicas are only advised)")
        v = self.scale_up_hysteresis
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            bad("scale_up_hysteresis", "must be a whole number >= 1 (or absent: the same as hysteresis)")
        v = self.prefill_chunk_tokens
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            bad("prefill_chunk_tokens", "must be a whole number of tokens >= 1 (or absent: whole prompts)")
        v = self.seat_levels
        if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
            bad("seat_levels", "must be a list of whole numbers >= 1 (concurrencies a plan may reserve KV for)")
        for knob in ("headroom", "scale_down_headroom", "alpha", "beta"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                bad(knob, "must be a number in (0, 1]")
        if self.min_gain >= 1:
            bad("min_gain", "is a fraction of the cost per hour and must be under 1")
        if self.scale_down_headroom > self.headroom:
            bad("scale_down_headroom", f"must not exceed headroom ({self.headroom}): without the band between "
                                       "them a plan could flip back and forth under constant load")
        if not (isinstance(self.window, str) and re.fullmatch(r"\d+(\.\d+)?s", self.window)):
            bad("window", "must name a telemetry window as /admin/stats does, e.g. 10s or 60s")

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None, lines: dict[str, int] | None = None,
                  **overrides: Any) -> "AutopilotConfig":
        """Knobs from a mapping (the front matter's `autopilot:`), then `overrides` that are not None
        (command-line options); unknown knobs and bad values are errors naming the file, line and knob."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise AutopilotConfigError(f"must be a mapping of knobs, not {data!r}", file=source,
                                       line=(lines or {}).get(""), field="autopilot")
        known = [f.name for f in fields(cls)]
        for k in data:
            if k not in known:
                raise AutopilotConfigError(f"unknown knob (known: {', '.join(known)})", file=source,
                                           line=(lines or {}).get(k), field=f"autopilot.{k}")
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        for k, v in merged.items():           # a whole number where seconds are asked is fine
            if isinstance(getattr(cls, k), float) and isinstance(v, int) and not isinstance(v, bool):
                merged[k] = float(v)
        if isinstance(merged.get("seat_levels"), list):
            merged["seat_levels"] = tuple(merged["seat_levels"])
        obj = cls.__new__(cls)
        for k in known:
            object.__setattr__(obj, k, merged.get(k, getattr(cls, k)))
        obj.check(source, {k: line for k, line in (lines or {}).items() if k not in overrides or
                           overrides[k] is None})
        return obj

    def as_dict(self) -> dict:
        return asdict(self)


def read_intent_file(path: str | Path, **overrides: Any):
    """An intent file and the autopilot knobs in its front matter: (IntentFile, AutopilotConfig).

    The `autopilot:` block is taken out of the front matter (its lines blanked, so every other line
    keeps its number for the intent file's own errors), checked here, and the rest is read as
    agent.intent_file reads any intent file."""
    from ..intent_file import IntentFile, parse_intent_text
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read intent file: {e.strerror}", file=str(path)) from None
    text, knobs, lines = split_autopilot(text, str(path))
    front, body = parse_intent_text(text, str(path))
    return IntentFile(front, body, path), AutopilotConfig.from_dict(knobs, str(path), lines, **overrides)


def split_autopilot(text: str, file: str = "<input>") -> tuple[str, dict | None, dict[str, int]]:
    """(the text with the front matter's `autopilot:` block blanked out, that block, knob -> line)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return text, None, {}
    end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
    if end is None:
        return text, None, {}             # the intent file's reader says what is wrong
    try:
        data, node = parse_yaml("\n".join(lines[1:end]), file)
    except InputError:
        return text, None, {}
    if not isinstance(node, yaml.MappingNode):
        return text, None, {}
    for k, v in node.value:
        if k.value != "autopilot":
            continue
        first = k.start_mark.line + 1                 # 0-based in the file: +1 for the opening '---'
        last = v.end_mark.line + 1 + (0 if v.end_mark.column == 0 else 1)   # one past its last line, in the file
        where = {"": first + 1}
        if isinstance(v, yaml.MappingNode):
            where.update({kk.value: kk.start_mark.line + 2 for kk, _ in v.value})
        block = data.get("autopilot") if isinstance(data, dict) else None
        kept = lines[:first] + [""] * (max(last, first + 1) - first) + lines[max(last, first + 1):]
        return "\n".join(kept) + ("\n" if text.endswith("\n") else ""), block, where
    return text, None, {}
