"""Request traces for the simulator: a rate schedule (YAML) or a CSV of recorded requests.

A schedule (YAML):

    duration_s: 3600            # optional: cut the phases off here
    seed: 0
    arrivals: poisson           # or uniform: evenly spaced at the rate (for hand-checkable runs)
    phases:                     # one after the other; rates in requests per second
      - {kind: steady, rate: 50, duration_s: 600}
      - {kind: ramp, from_rate: 10, to_rate: 50, duration_s: 600}
      - {kind: burst, rate: 10, burst_rate: 100, every_s: 60, burst_s: 5, duration_s: 600}
      - {kind: diurnal, mean_rate: 30, amplitude: 20, period_s: 86400, duration_s: 3600}
    prompt_tokens: {dist: lognormal, mean: 512, sigma: 0.6, min: 8, max: 4096}
    output_tokens: {dist: fixed, value: 128}      # fixed | uniform (low, high) | lognormal

A CSV with a header row: `arrival_s,prompt_tokens,output_tokens`, or the public Azure LLM
inference traces' `TIMESTAMP,ContextTokens,GeneratedTokens` (TIMESTAMP a date-time; arrivals are
counted from the first row). Rows must not go back in time.
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .loading import InputError, load_file

_STRICT = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival: parallel lists (cheap to build and walk for an hour of traffic)."""
    arrival_s: list[float]
    prompt_tokens: list[int]
    output_tokens: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return self.arrival_s[-1] - self.arrival_s[0] if self.arrival_s else 0.0


class Steady(BaseModel):
    model_config = _STRICT
    kind: Literal["steady"]
    rate: float = Field(ge=0)
    duration_s: float = Field(gt=0)

    def rate_at(self, t: float) -> float:
        return self.rate

    def peak(self) -> float:
        return self.rate


class Ramp(BaseModel):
    model_config = _STRICT
    kind: Literal["ramp"]
    from_rate: float = Field(ge=0)
    to_rate: float = Field(ge=0)
    duration_s: float = Field(gt=0)

    def rate_at(self, t: float) -> float:
        return self.from_rate + (self.to_rate - self.from_rate) * t / self.duration_s

    def peak(self) -> float:
        return max(self.from_rate, self.to_rate)


class Burst(BaseModel):
    model_config = _STRICT
    kind: Literal["burst"]
    rate: float = Field(ge=0)
    burst_rate: float = Field(ge=0)
    every_s: float = Field(gt=0)
    burst_s: float = Field(gt=0)
    duration_s: float = Field(gt=0)

    def rate_at(self, t: float) -> float:
        return self.burst_rate if t % self.every_s < self.burst_s else self.rate

    def peak(self) -> float:
        return max(self.rate, self.burst_rate)


class Diurnal(BaseModel):
    model_config = _STRICT
    kind: Literal["diurnal"]
    mean_rate: float = Field(ge=0)
    amplitude: float = Field(ge=0)
    period_s: float = Field(86400, gt=0)
    phase_s: float = 0.0
    duration_s: float = Field(gt=0)

    def rate_at(self, t: float) -> float:
        return max(0.0, self.mean_rate + self.amplitude * math.sin(2 * math.pi * (t + self.phase_s) / self.period_s))

    def peak(self) -> float:
        return self.mean_rate + self.amplitude


Phase = Annotated[Union[Steady, Ramp, Burst, Diurnal], Field(discriminator="kind")]


class Lengths(BaseModel):
    """A token-length distribution, cut to [min, max]."""
    model_config = _STRICT
    dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
    value: int | None = Field(None, ge=1, description="fixed")
    low: int | None = Field(None, ge=1, description="uniform")
    high: int | None = Field(None, ge=1, description="uniform")
    mean: float | None = Field(None, gt=0, description="lognormal: the mean length")
    sigma: float = Field(0.5, ge=0, description="lognormal: sigma of the log")
    min: int = Field(1, ge=1)
    max: int = Field(1 << 20, ge=1)

    def problems(self, where: tuple) -> list[tuple[tuple, str]]:
        need = {"fixed": ("value",), "uniform": ("low", "high"), "lognormal": ("mean",)}[self.dist]
        out = [((*where, k), f"a {self.dist} distribution needs {k}") for k in need if getattr(self, k) is None]
        if self.dist == "uniform" and not out and self.low > self.high:
            out.append(((*where, "high"), f"must be at least low ({self.low}), not {self.high}"))
        if self.min > self.max:
            out.append(((*where, "max"), f"must be at least min ({self.min}), not {self.max}"))
        return out

    def sampler(self, rng: random.Random):
        lo, hi = self.min, self.max
        if self.dist == "fixed":
            v = min(max(self.value, lo), hi)
            return lambda: v
        if self.dist == "uniform":
            a, b = self.low, self.high
            return lambda: min(max(rng.randint(a, b), lo), hi)
        mu = math.log(self.mean) - self.sigma ** 2 / 2        # so that the mean is `mean`
        s = self.sigma
        return lambda: min(max(int(round(rng.lognormvariate(mu, s))), lo), hi)


class Schedule(BaseModel):
    """A rate schedule with length distributions; build with load_trace(path)."""
    model_config = _STRICT
    phases: tuple[Phase, ...] = Field(min_length=1)
    duration_s: float | None = Field(None, gt=0)
    seed: int = 0
    arrivals: Literal["poisson", "uniform"] = "poisson"
    prompt_tokens: Lengths = Lengths(value=512)
    output_tokens: Lengths = Lengths(value=128)

    def problems(self) -> list[tuple[tuple, str]]:
        return self.prompt_tokens.problems(("prompt_tokens",)) + self.output_tokens.problems(("output_tokens",))

    def generate(self) -> Trace:
        """Arrivals by thinning a Poisson process at each phase's peak rate (or evenly spaced), then lengths."""
        rng = random.Random(self.seed)
        arrivals: list[float] = []
        start, end_all = 0.0, self.duration_s or math.inf
        for ph in self.phases:
            end = min(start + ph.duration_s, end_all)
            if self.arrivals == "uniform":        # evenly spaced at the rate where each gap starts
                t = start
                while t < end:
                    r = ph.rate_at(t - start)
                    if r <= 0:
                        t += 1.0                  # nothing arrives; look again a second later
                        continue
                    t += 1.0 / r
                    if t <= end + 1e-9:
                        arrivals.append(t)
            else:
                peak = ph.peak()
                t = start
                while peak > 0:
                    t += rng.expovariate(peak)
                    if t >= end:
                        break
                    if rng.random() * peak <= ph.rate_at(t - start):
                        arrivals.append(t)
            start = end
            if start >= end_all:
                break
        ps, os_ = self.prompt_tokens.sampler(rng), self.output_tokens.sampler(rng)
        return Trace(arrivals, [ps() for _ in arrivals], [os_() for _ in arrivals], "schedule")


def _post(obj: Schedule, locate):
    from .loading import field_name
    for loc, msg in obj.problems():
        raise InputError(msg, line=locate(loc), field=field_name(loc))


_COLUMNS = (("arrival_s", "prompt_tokens", "output_tokens"), ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))


def _read_csv(path: Path) -> Trace:
    try:
        f = path.open(newline="")
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror}", file=str(path)) from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise InputError("file is empty; expected a header row", file=str(path), line=1)
        header = [h.strip() for h in header]
        cols = next((c for c in _COLUMNS if set(c) <= set(header)), None)
        if cols is None:
            raise InputError(f"header {','.join(header)} lacks the columns {','.join(_COLUMNS[0])} "
                             f"(or Azure's {','.join(_COLUMNS[1])})", file=str(path), line=1)
        idx = [header.index(c) for c in cols]
        azure = cols is _COLUMNS[1]
        arr: list[float] = []
        ps: list[int] = []
        outs: list[int] = []
        t0 = None
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise InputError(f"has {len(row)} columns, the header {len(header)}", file=str(path), line=lineno)
            vals = [row[i].strip() for i in idx]
            try:
                if azure:
                    ts = datetime.fromisoformat(_trim_fraction(vals[0])).timestamp()
                    t0 = ts if t0 is None else t0
                    t = ts - t0
                else:
                    t = float(vals[0])
            except ValueError:
                raise InputError(f"not a {'date-time' if azure else 'number of seconds'}: {vals[0]!r}",
                                 file=str(path), line=lineno, field=cols[0]) from None
            n = []
            for col, v in zip(cols[1:], vals[1:]):
                try:
                    x = int(v)
                except ValueError:
                    raise InputError(f"not a whole number of tokens: {v!r}", file=str(path), line=lineno,
                                     field=col) from None
                if x < (1 if col in ("prompt_tokens", "ContextTokens", "output_tokens", "GeneratedTokens") else 0):
                    raise InputError(f"must be at least 1, not {x}", file=str(path), line=lineno, field=col)
                n.append(x)
            if not math.isfinite(t) or t < 0:
                raise InputError(f"must be a time of 0 or more, not {vals[0]!r}", file=str(path), line=lineno,
                                 field=cols[0])
            if arr and t < arr[-1]:
                raise InputError(f"goes back in time ({t:g} s after {arr[-1]:g} s): sort the rows by arrival",
                                 file=str(path), line=lineno, field=cols[0])
            arr.append(t)
            ps.append(n[0])
            outs.append(n[1])
    if not arr:
        raise InputError("has a header but no requests", file=str(path))
    return Trace(arr, ps, outs, str(path))


def _trim_fraction(s: str) -> str:
    """Azure's timestamps carry 7 fractional digits; Python reads at most 6."""
    if "." in s:
        head, frac = s.split(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        rest = frac[len(digits):]
        return f"{head}.{digits[:6]}{rest}"
    return s


def load_trace(path: str | Path, seed: int | None = None) -> Trace:
    """A CSV of requests or a YAML rate schedule (by extension); errors name file, line, field, value.
    seed: draw a schedule with this seed instead of its own (another day of the same shape)."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        if seed is not None:
            raise ValueError(f"{p}: a CSV trace is recorded requests; a seed draws only a rate schedule")
        return _read_csv(p)
    schedule = load_file(Schedule, p, post=_post)
    return (schedule if seed is None else schedule.model_copy(update={"seed": seed})).generate()
