"""Profiles: the measured speed of one node kind for one model, as `continuo calibrate` writes them.

A profile holds step times of the serving code itself (executor/calibrate.py times the model's
own stage code on the node's device), in milliseconds:

  stage_ms          fixed cost of one stage step, whatever its layers (positions, KV metadata, packing)
  embed_ms          the embedding lookup of one step (first stage only)
  head.ms[r]        final norm + LM head on r rows (last stage only; it runs on each row's last token)
  prefill.layer_ms[t]         one decoder layer, one prompt of t tokens from position 0
  decode.layer_ms[b][c]       one decoder layer, one new token for each of b sequences at context c

Between measured points the tables are read by linear interpolation; beyond them by linear
extrapolation from the last two points (a step's time grows about linearly with its tokens and
context once past the smallest sizes), never below the smallest measured value.

Where they live: one YAML file per (model, kind[, node]) in a profile folder, by default
`$CONTINUO_PROFILES`, else `$CONTINUO_CACHE/profiles`, else `~/.cache/continuo/profiles`;
`--profiles DIR` on the commands that read them. A profile naming a node applies to that node
only and wins over one for its kind.
"""
from __future__ import annotations

import bisect
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from .cluster import Node
from .loading import InputError, field_name, load_file

_STRICT = ConfigDict(frozen=True, extra="forbid")
PROFILES_ENV = "CONTINUO_PROFILES"


def default_dir() -> Path:
    """Where profiles are read and written unless a folder is given."""
    if os.environ.get(PROFILES_ENV):
        return Path(os.environ[PROFILES_ENV])
    cache = os.environ.get("CONTINUO_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "continuo") / "profiles"


def _rising(xs: tuple, where: tuple) -> list[tuple[tuple, str]]:
    return [((*where, i), f"must rise: {xs[i]} after {xs[i - 1]}") for i in range(1, len(xs)) if xs[i] <= xs[i - 1]]


def _corun_at(c: "CorunTable | None", procs: float) -> float:
    if c is None or procs <= 1:
        return 1.0
    xs = (1,) + tuple(x for x in c.procs if x > 1)
    ys = (1.0,) + tuple(y for x, y in zip(c.procs, c.slowdown) if x > 1)
    return max(1.0, _interp(xs, ys, procs))


def _interp(xs, ys, x: float) -> float:
    """Piecewise-linear ys(x); linear beyond both ends from the nearest two points; floored at min(ys).
    (Only sizes are looked up; a stage's layer count, which the planner passes as an array, multiplies.)"""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return max(min(ys), y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class HeadTable(BaseModel):
    """Final norm + LM head (and the fp32 logits) on `rows` rows."""
    model_config = _STRICT
    rows: tuple[int, ...] = Field(min_length=1)
    ms: tuple[float, ...] = Field(min_length=1)


class PrefillTable(BaseModel):
    """One decoder layer prefilling one prompt of `tokens` tokens (from position 0)."""
    model_config = _STRICT
    tokens: tuple[int, ...] = Field(min_length=1)
    layer_ms: tuple[float, ...] = Field(min_length=1)


class DecodeTable(BaseModel):
    """One decoder layer decoding one token for each of `batch` sequences at `context` tokens each."""
    model_config = _STRICT
    batch: tuple[int, ...] = Field(min_length=1)
    context: tuple[int, ...] = Field(min_length=1)
    layer_ms: tuple[tuple[float, ...], ...] = Field(min_length=1, description="[batch][context]")


class CorunTable(BaseModel):
    """How much slower one stage's step gets while `procs - 1` others run the same step on the same host
    at once (shared cores and memory bandwidth): slowdown[i] = step time with procs[i] running / alone."""
    model_config = _STRICT
    procs: tuple[int, ...] = Field(min_length=1)
    slowdown: tuple[float, ...] = Field(min_length=1)


class Profile(BaseModel):
    """Measured speed of one node kind (or one node) for one model. Build with load_profile()."""
    model_config = _STRICT
    model: str = Field(min_length=1, description="the model spec's name, e.g. smollm2-135m")
    kind: str = Field(min_length=1, description="the cluster file's gpu kind, e.g. CPU or L40S")
    gpus: int = Field(1, ge=1)
    node: str | None = Field(None, description="measured for this node only (wins over its kind's profile)")
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)
    dtype: str = "float32"
    host: str = ""
    measured_at: datetime
    seconds: float = Field(0.0, ge=0, description="how long the calibration took")
    stage_ms: float = Field(ge=0)
    embed_ms: float = Field(ge=0)
    head: HeadTable
    prefill: PrefillTable
    decode: DecodeTable
    corun: CorunTable | None = Field(None, description="a decode step's (memory-bound); measured only when asked "
                                                       "(continuo calibrate --corun N)")
    corun_prefill: CorunTable | None = Field(None, description="the same for a prefill step (compute-bound: it "
                                                               "shares the cores more than the memory bandwidth); "
                                                               "without it the decode table stands for both")

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo):
        if not (info.context or {}).get("defer_checks"):
            for loc, msg in self.problems():
                raise ValueError(f"{field_name(loc)}: {msg}")
        return self

    def problems(self) -> list[tuple[tuple, str]]:
        """Table shapes that disagree, axes that do not rise, times that are not positive."""
        out = []
        for name, xs, ys in (("head", self.head.rows, self.head.ms),
                             ("prefill", self.prefill.tokens, self.prefill.layer_ms)):
            axis = "rows" if name == "head" else "tokens"
            col = "ms" if name == "head" else "layer_ms"
            out += _rising(xs, (name, axis))
            out += [((name, axis, i), f"must be at least 1, not {x}") for i, x in enumerate(xs) if x < 1]
            if len(xs) != len(ys):
                out.append(((name, col), f"has {len(ys)} values for {len(xs)} {axis}"))
            out += [((name, col, i), f"must be positive, not {y}") for i, y in enumerate(ys) if not y > 0]
        d = self.decode
        out += _rising(d.batch, ("decode", "batch")) + _rising(d.context, ("decode", "context"))
        out += [(("decode", "batch", i), f"must be at least 1, not {x}") for i, x in enumerate(d.batch) if x < 1]
        if len(d.layer_ms) != len(d.batch):
            out.append((("decode", "layer_ms"), f"has {len(d.layer_ms)} rows for {len(d.batch)} batch sizes"))
        for i, row in enumerate(d.layer_ms):
            if len(row) != len(d.context):
                out.append((("decode", "layer_ms", i), f"has {len(row)} values for {len(d.context)} context lengths"))
            out += [(("decode", "layer_ms", i, j), f"must be positive, not {y}") for j, y in enumerate(row)
                    if not y > 0]
        for name, c in (("corun", self.corun), ("corun_prefill", self.corun_prefill)):
            if c is None:
                continue
            out += _rising(c.procs, (name, "procs"))
            if c.procs[0] != 1:
                out.append(((name, "procs", 0), f"must be 1 (the step alone), not {c.procs[0]}"))
            if len(c.slowdown) != len(c.procs):
                out.append(((name, "slowdown"), f"has {len(c.slowdown)} values for {len(c.procs)} procs"))
            out += [((name, "slowdown", i), f"must be positive, not {y}") for i, y in enumerate(c.slowdown)
                    if not y > 0]
        return out

    # --- reading the tables -----------------------------------------------------------------
    def head_ms(self, rows):
        return _interp(self.head.rows, self.head.ms, rows)

    def layer_prefill_ms(self, tokens):
        return _interp(self.prefill.tokens, self.prefill.layer_ms, tokens)

    def layer_decode_ms(self, batch, context):
        """Bilinear in (batch, context): along context at each measured batch, then along batch."""
        d = self.decode
        per_batch = [_interp(d.context, row, context) for row in d.layer_ms]
        if len(d.batch) == 1:
            return per_batch[0] * batch / d.batch[0]
        i = min(max(bisect.bisect_right(d.batch, batch) - 1, 0), len(d.batch) - 2)
        x0, x1 = d.batch[i], d.batch[i + 1]
        y0, y1 = per_batch[i], per_batch[i + 1]
        return max(min(min(r) for r in d.layer_ms), y0 + (y1 - y0) * (batch - x0) / (x1 - x0))

    def corun_slowdown(self, procs: float) -> float:
        """Slowdown of a decode step while `procs` stages (itself included) compute on this host at once:
        1 alone or without a co-run table; piecewise linear in between and past the last count measured."""
        return _corun_at(self.corun, procs)

    def corun_prefill_slowdown(self, procs: float) -> float:
        """The same for a prefill step: its own table where measured, else the decode table's."""
        return _corun_at(self.corun_prefill or self.corun, procs)

    def stage_prefill_ms(self, layers, embed: bool, head: bool, tokens: int, rows: int = 1):
        """One prefill step of `rows` prompts of `tokens` tokens each through a stage of `layers` layers."""
        t = self.stage_ms + layers * self.layer_prefill_ms(tokens * rows)
        return t + (self.embed_ms if embed else 0.0) + (self.head_ms(rows) if head else 0.0)

    def stage_decode_ms(self, layers, embed: bool, head: bool, batch: int, context: int):
        """One decode step of `batch` sequences at `context` tokens through a stage of `layers` layers."""
        t = self.stage_ms + layers * self.layer_decode_ms(batch, context)
        return t + (self.embed_ms if embed else 0.0) + (self.head_ms(batch) if head else 0.0)

    def file_name(self) -> str:
        return f"{self.model}--{self.kind}" + (f"--{self.node}" if self.node else "") + ".yaml"

    def where(self) -> str:
        """Where and when it was measured, in a few words."""
        return (f"{self.model} on {self.node or self.kind} ({self.device}, {self.threads or '?'} threads, "
                f"{self.host or 'unknown host'}, {self.measured_at:%Y-%m-%d %H:%M} UTC)")


class ProfileSet:
    """The profiles the cost model may use, found by (model, node) or (model, node kind)."""

    def __init__(self, profiles: Iterable[Profile] = ()):
        self.profiles = list(profiles)
        self._by_node = {(p.model, p.node): p for p in self.profiles if p.node}
        self._by_kind = {(p.model, p.kind, p.gpus): p for p in self.profiles if not p.node}

    def find(self, node: Node, model: str) -> Profile | None:
        """The node's own profile, else its kind's (same GPU count), else None (datasheet figures)."""
        return self._by_node.get((model, node.name)) or self._by_kind.get((model, node.gpu, node.gpus))

    def __len__(self) -> int:
        return len(self.profiles)

    def __bool__(self) -> bool:
        return bool(self.profiles)


def _post(obj: Profile, locate):
    for loc, msg in obj.problems():
        raise InputError(msg, line=locate(loc), field=field_name(loc))


def load_profile(path: str | Path) -> Profile:
    """Load a profile file; errors name the file, line, field and value."""
    return load_file(Profile, path, post=_post, context={"defer_checks": True})


def load_profiles(folder: str | Path | None = None, missing_ok: bool = True) -> ProfileSet:
    """Every *.yaml profile in a folder (default: default_dir()). A bad file is an error, not skipped."""
    d = Path(folder) if folder is not None else default_dir()
    if not d.is_dir():
        if missing_ok:
            return ProfileSet()
        raise InputError("no such profile folder", file=str(d))
    return ProfileSet(load_profile(p) for p in sorted(d.glob("*.yaml")))


def save_profile(profile: Profile, folder: str | Path | None = None) -> Path:
    """Write a profile as YAML into a folder (default: default_dir()); returns its path."""
    d = Path(folder) if folder is not None else default_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / profile.file_name()
    data = profile.model_dump(mode="json", exclude_none=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# measured by `continuo calibrate`; times in milliseconds (see policies/profile.py)\n"
                   + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))
    tmp.replace(path)         # a reader never sees half a file
    return path


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def this_host() -> str:
    return platform.node()
