"""The per-request JSON schema for the LLM, and the check pass every value goes through.

    build_schema(reading)   a schema whose every field can only take values grounded in the text or the
                            inventory (built for each request)
    check(values, reading)  drops any value that is not grounded, or that would loosen the policy
"""
from __future__ import annotations

import re
from typing import Any

from policies import Trust

from .extractors import FIELDS, OBJECTIVES, Reading
from .places import Inventory


def build_schema(r: Reading, fields=None) -> dict:
    """A JSON schema whose fields can only take values grounded in this text or the inventory (or null).

    fields: only these (default: every field with candidates)."""
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
    if fields is not None:
        props = {k: v for k, v in props.items() if k in fields}
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
