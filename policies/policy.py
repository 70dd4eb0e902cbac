"""The operator's policy pack: data classes and what each requires of the nodes that see it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .cluster import Node, Trust
from .intent import IntentSpec
from .loading import load_file

_STRICT = ConfigDict(frozen=True, extra="forbid")


class DataClassRule(BaseModel):
    """Requirements for one data class. Activations and KV are treated like raw tokens."""
    model_config = _STRICT
    allowed_jurisdictions: tuple[str, ...] | None = None  # None: any jurisdiction
    min_trust: Trust = Trust.untrusted            # every node that sees the data
    trusted_ends: Trust | None = None             # embedding and LM-head stages; default: min_trust
    private_prefix_layers: int = Field(0, ge=0)   # first k layers stay on nodes trusted like the ends
    encrypt_cross_boundary: bool = False          # hops across a trust/jurisdiction boundary need encryption
    kv_jurisdictions: tuple[str, ...] | None = None  # where KV may be stored; default: allowed_jurisdictions
    kv_min_trust: Trust | None = None             # default: min_trust
    description: str = ""
    words: tuple[str, ...] = ()                   # words that name this class, for the intent parser
    examples: tuple[str, ...] = ()                # example sentences, for the intent parser


class Policy(BaseModel):
    """A policy pack. Load with `load_policy(path)`."""
    model_config = _STRICT
    name: str
    data_classes: dict[str, DataClassRule] = Field(min_length=1)


@dataclass(frozen=True)
class Effective:
    """The rules in force for one data class after an intent narrowed them (never loosened)."""
    data_class: str
    jurisdictions: frozenset[str] | None   # None: any
    min_trust: Trust
    ends_trust: Trust
    prefix_layers: int
    encrypt_cross_boundary: bool
    kv_jurisdictions: frozenset[str] | None
    kv_min_trust: Trust
    notes: tuple[str, ...] = ()            # what the intent asked for that the policy does not allow

    def may_see(self, node: Node) -> bool:
        return (self.jurisdictions is None or node.jurisdiction in self.jurisdictions) \
            and node.trust.at_least(self.min_trust)

    def may_store_kv(self, node: Node) -> bool:
        return (self.kv_jurisdictions is None or node.jurisdiction in self.kv_jurisdictions) \
            and node.trust.at_least(self.kv_min_trust)

    def may_hold_ends(self, node: Node) -> bool:
        return node.trust.at_least(self.ends_trust)


class UnknownDataClass(KeyError):
    def __init__(self, name: str, policy: Policy):
        self.name, self.known = name, sorted(policy.data_classes)
        super().__init__(f"data class '{name}' is not in policy {policy.name} (known: {', '.join(self.known)})")

    def __str__(self) -> str:
        return self.args[0]


def _narrow(allowed: tuple[str, ...] | None, asked: tuple[str, ...] | None, what: str, notes: list[str]):
    if asked is None:
        return None if allowed is None else frozenset(allowed)
    if allowed is None:
        return frozenset(asked)
    dropped = sorted(set(asked) - set(allowed))
    if dropped:
        notes.append(f"intent asked for {what} {', '.join(dropped)}, which the policy does not allow; ignored")
    return frozenset(asked) & frozenset(allowed)


def effective_rules(policy: Policy, intent: IntentSpec) -> Effective:
    """Combine the policy's rules for the intent's data class with the intent; the intent only tightens."""
    rule = policy.data_classes.get(intent.data_class)
    if rule is None:
        raise UnknownDataClass(intent.data_class, policy)
    notes: list[str] = []
    juris = _narrow(rule.allowed_jurisdictions, intent.allowed_jurisdictions, "jurisdictions", notes)
    kv_base = rule.kv_jurisdictions if rule.kv_jurisdictions is not None else rule.allowed_jurisdictions
    kv_juris = _narrow(kv_base, intent.allowed_jurisdictions, "KV jurisdictions", [])
    min_trust = rule.min_trust
    if intent.min_trust is not None:
        if intent.min_trust.at_least(min_trust):
            min_trust = intent.min_trust
        else:
            notes.append(f"intent asked for min trust {intent.min_trust.value}, below the policy's "
                         f"{rule.min_trust.value}; ignored")
    ends = rule.trusted_ends or rule.min_trust
    ends = max(ends, min_trust, key=lambda t: t.rank)
    kv_trust = max(rule.kv_min_trust or rule.min_trust, min_trust, key=lambda t: t.rank)
    return Effective(intent.data_class, juris, min_trust, ends, rule.private_prefix_layers,
                     rule.encrypt_cross_boundary, kv_juris, kv_trust, tuple(notes))


def load_policy(path: str | Path) -> Policy:
    """Load a policy pack file; errors name the file, line and field."""
    return load_file(Policy, path)
