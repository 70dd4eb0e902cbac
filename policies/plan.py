"""Placement plans, validator reports, and the sealed ValidatedPlan the executor accepts."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .intent import IntentSpec
from .loading import load_file

_STRICT = ConfigDict(frozen=True, extra="forbid")


class Stage(BaseModel):
    """Layers first..last (inclusive) of the model run on `node`."""
    model_config = _STRICT
    node: str
    first_layer: int = Field(ge=0)
    last_layer: int = Field(ge=0)

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)

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


class Estimates(BaseModel):
    """Cost-model figures for a plan (see policies/costmodel.py for the formulas)."""
    model_config = _STRICT
    ttft_ms: float
    tpot_ms: float
    throughput_tok_s: float
    cost_per_hour: float
    stages: tuple[StageEstimate, ...]


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


class Report(BaseModel):
    """The validator's verdict: violations (plan refused if any), warnings, estimates."""
    model_config = _STRICT
    violations: tuple[Violation, ...] = ()
    warnings: tuple[Violation, ...] = ()
    estimates: Estimates | None = None

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


class ValidatedPlan(BaseModel):
    """A plan that passed the validator. Only `policies.validator.validate` can make one."""
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    plan: PlacementPlan
    report: Report
    cluster_fingerprint: str
    policy: str
    transition_from: str | None = None   # placement_key of the live plan the transition was checked from
    _sealed: bool = PrivateAttr(default=False)

    def __init__(self, *, _seal: object = None, **data):
        from .validator import _SEAL  # the validator holds the only seal
        if _seal is not _SEAL:
            raise TypeError("a ValidatedPlan comes only from policies.validate(); the executor accepts nothing else")
        super().__init__(**data)
        self._sealed = True

    @classmethod
    def model_validate(cls, *a, **k):  # no back door through deserialisation
        raise TypeError("a ValidatedPlan cannot be deserialised; validate the PlacementPlan again")

    model_validate_json = model_validate


def load_plan(path: str | Path) -> PlacementPlan:
    """Load a placement plan file (YAML or JSON)."""
    return load_file(PlacementPlan, path)
