"""Placement plans, validator reports, and the sealed ValidatedPlan the executor accepts.

Layer ranges: a Stage names its first and last layer, both included, as plan files and people
write them; `Stage.start`/`Stage.stop` give the half-open [start, stop) that all code uses (see
policies/delta.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from . import seal
from .delta import PlanDelta
from .intent import IntentSpec
from .loading import load_file

_STRICT = ConfigDict(frozen=True, extra="forbid")


class Stage(BaseModel):
    """Layers first..last (inclusive, the plan file's form) of the model run on `node`."""
    model_config = _STRICT
    node: str
    first_layer: int = Field(ge=0)
    last_layer: int = Field(ge=0)

    @property
    def start(self) -> int:
        """First layer of the half-open range [start, stop)."""
        return self.first_layer

    @property
    def stop(self) -> int:
        """One past the last layer: the only place the inclusive form becomes half-open."""
        return self.last_layer + 1

    @property
    def layers(self) -> range:
        """The layers, as range(start, stop)."""
        return range(self.start, self.stop)

    def label(self) -> str:
        return f"layers {self.first_layer}-{self.last_layer} on {self.node}"


class StageEstimate(BaseModel):
    model_config = _STRICT
    node: str
    weight_bytes: float
    kv_bytes: float
    workspace_bytes: float
    memory_bytes: float
    capacity_bytes: float
    prefill_ms: float
    decode_ms: float
    hop_out_ms_prefill: float = 0.0
    hop_out_ms_decode: float = 0.0
    source: Literal["measured", "datasheet"] = "datasheet"   # step times from a profile, or datasheet figures
    correction_prefill: float = 1.0      # the factors (measured / predicted while serving) applied
    correction_decode: float = 1.0
    host_slowdown: float = 1.0           # decode steps slowed by stages on the same host computing at once


class Estimates(BaseModel):
    """Cost-model figures for a plan (see policies/costmodel.py for the formulas)."""
    model_config = _STRICT
    ttft_ms: float
    tpot_ms: float
    throughput_tok_s: float
    cost_per_hour: float
    stages: tuple[StageEstimate, ...]
    source: Literal["measured", "datasheet", "mixed"] = "datasheet"   # mixed: some stages measured, some not
    groups_in_flight: int = 1            # what the TPOT / throughput formulas assumed (costmodel.py)


class PlacementPlan(BaseModel):
    """Ordered pipeline stages plus the cluster fingerprint the plan was made from."""
    model_config = _STRICT
    model: str
    data_class: str
    stages: tuple[Stage, ...] = Field(min_length=1)
    cluster_fingerprint: str | None = None
    intent: IntentSpec | None = None
    estimates: Estimates | None = None

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.stages]

    def layer_owner(self) -> dict[int, str]:
        return {layer: s.node for s in self.stages for layer in s.layers}

    def summary(self) -> str:
        return " -> ".join(f"{s.node}[{s.first_layer}-{s.last_layer}]" for s in self.stages)

    def placement_key(self) -> str:
        """Model and stages only: two plans with the same key place the model the same way."""
        return f"{self.model}:{self.summary()}"


class Violation(BaseModel):
    """One broken rule: stable rule id, where, what is wrong, and how to fix it."""
    model_config = _STRICT
    rule: str
    message: str
    hint: str = ""
    stage: int | None = None
    node: str | None = None

    def text(self) -> str:
        where = f" stage {self.stage}" if self.stage is not None else ""
        where += f" ({self.node})" if self.node else ""
        out = f"[{self.rule}]{where}: {self.message}"
        return out + (f" Hint: {self.hint}" if self.hint else "")


class KVReservation(BaseModel):
    """The KV cache the capacity rule reserved: `blocks` blocks of `block_size` tokens on every stage,
    for each of that stage's layers. The executor allocates exactly this (see Service.launch)."""
    model_config = _STRICT
    blocks: int = Field(ge=1)
    block_size: int = Field(ge=1)

    @property
    def tokens(self) -> int:
        """Tokens of KV every stage holds per layer."""
        return self.blocks * self.block_size


class Report(BaseModel):
    """The validator's verdict: violations (plan refused if any), warnings, estimates.

    kv is the reservation the capacity rule checked; delta is what moves from the plan it was
    checked against (`current`), or from nothing; both travel on to the executor unchanged."""
    model_config = _STRICT
    violations: tuple[Violation, ...] = ()
    warnings: tuple[Violation, ...] = ()
    estimates: Estimates | None = None
    kv: KVReservation | None = None
    delta: PlanDelta | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    def rules_broken(self) -> set[str]:
        return {v.rule for v in self.violations}

    def text(self) -> str:
        """The report in words a person and an LLM can act on."""
        if self.ok:
            lines = ["0 violations: the plan passes every rule."]
        else:
            lines = [f"{len(self.violations)} violation(s):"] + [f"- {v.text()}" for v in self.violations]
        lines += [f"- warning {w.text()}" for w in self.warnings]
        return "\n".join(lines)


class ForgedPlan(TypeError):
    """A ValidatedPlan the validator did not issue in this process, or one changed since it was."""


class ValidatedPlan(BaseModel):
    """A plan that passed the validator, sealed. Only `policies.approve` / `policies.review` make one.

    The seal (policies/seal.py) is an HMAC over every field; `verify()` recomputes it, and the
    executor calls it before acting. Copies that could carry changes are refused outright:
    model_copy, model_construct, model_validate* and pickling raise TypeError, and anything built
    around them (object.__setattr__, __new__, a pydantic TypeAdapter) fails verify().
    """
    model_config = ConfigDict(frozen=True, extra="forbid")
    plan: PlacementPlan
    report: Report
    cluster_fingerprint: str
    policy: str
    transition_from: str | None = None   # placement_key of the live plan the transition was checked from
    _mac: str = PrivateAttr(default="")

    def __init__(self, *, _issuer: object = None, **data):
        if _issuer is not seal.ISSUER:
            raise TypeError("a ValidatedPlan comes only from policies.validate() (approve/review); "
                            "the executor accepts nothing else")
        super().__init__(**data)
        self._mac = seal.sign(self._payload())

    def _payload(self) -> bytes:
        return seal.canonical({"plan": self.plan.model_dump(mode="json"), "report": self.report.model_dump(mode="json"),
                               "cluster_fingerprint": self.cluster_fingerprint, "policy": self.policy,
                               "transition_from": self.transition_from})

    @property
    def sealed(self) -> bool:
        """Whether the validator issued exactly this plan in this process."""
        try:
            return seal.matches(self._payload(), getattr(self, "_mac", ""))
        except Exception:              # missing or mangled fields: not what the validator made
            return False

    def verify(self) -> "ValidatedPlan":
        """Return self if the seal holds; raise ForgedPlan otherwise."""
        if not self.sealed:
            raise ForgedPlan("this ValidatedPlan was not issued by policies.approve in this process, or was changed "
                             "since: validate the PlacementPlan again")
        return self

    @property
    def kv(self) -> KVReservation:
        """The KV reservation the capacity rule checked, which the executor allocates."""
        return self.report.kv

    @property
    def kv_blocks_per_node(self) -> dict[str, int]:
        """KV blocks each serving node allocates (the same on every stage: one admission per request)."""
        return {s.node: self.report.kv.blocks for s in self.plan.stages}

    @property
    def delta(self) -> PlanDelta:
        """What moves from the plan it was checked against (everything is new when that was none)."""
        return self.report.delta

    # --- no back doors ------------------------------------------------------------------------
    @classmethod
    def model_validate(cls, *a, **k):
        """Refused: a ValidatedPlan cannot be deserialised; validate the PlacementPlan again."""
        raise TypeError("a ValidatedPlan cannot be deserialised; validate the PlacementPlan again")

    model_validate_json = model_validate
    model_validate_strings = model_validate

    @classmethod
    def model_construct(cls, *a, **k):
        """Refused: building one without the validator would skip every rule."""
        raise TypeError("a ValidatedPlan cannot be constructed around the validator; use policies.approve")

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False):
        """Refused: change the PlacementPlan and validate it again."""
        raise TypeError("a ValidatedPlan cannot be copied or changed; change the PlacementPlan and validate it again")

    def __copy__(self):
        return self            # immutable and sealed: a copy would be the same proof

    def __deepcopy__(self, memo=None):
        return self

    def __reduce_ex__(self, protocol):
        raise TypeError("a ValidatedPlan cannot be pickled (its seal is valid only in this process); "
                        "send the PlacementPlan and validate it where it is applied")

    def __setstate__(self, state):
        raise TypeError("a ValidatedPlan cannot be unpickled; validate the PlacementPlan again")


def load_plan(path: str | Path) -> PlacementPlan:
    """Load a placement plan file (YAML or JSON)."""
    return load_file(PlacementPlan, path)
