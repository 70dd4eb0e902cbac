"""Continuo's pure core: cluster, policy, intent and model facts, plans, the cost model and the validator.

    from policies import load_cluster, load_policy, load_intent_spec, load_model_spec, validate, approve

Layer ranges are half-open, [start, stop), everywhere in code; only a plan file's Stage names its
first and last layer inclusively (Stage.start / Stage.stop convert; see policies/delta.py).
"""
from .cluster import GPU_KINDS, Cluster, Link, Node, Trust, load_cluster
from .costmodel import estimate, objective_value
from .delta import LayerRun, PlanDelta, Span
from .errors import Refused
from .intent import KV_BLOCK_TOKENS, IntentSpec, Traffic, load_intent_spec
from .loading import InputError
from .modelspec import ModelSpec, builtin_models, load_model_spec
from .plan import (Estimates, ForgedPlan, KVReservation, PlacementPlan, Report, Stage, ValidatedPlan, Violation,
                   load_plan)
from .policy import DataClassRule, Effective, Policy, UnknownDataClass, effective_rules, load_policy
from .validator import RULES, PlanRejected, approve, review, validate

__all__ = [
    "GPU_KINDS", "Cluster", "Link", "Node", "Trust", "load_cluster", "estimate", "objective_value",
    "LayerRun", "PlanDelta", "Span", "Refused",
    "KV_BLOCK_TOKENS", "IntentSpec", "Traffic", "load_intent_spec", "InputError", "ModelSpec", "builtin_models",
    "load_model_spec",
    "Estimates", "ForgedPlan", "KVReservation", "PlacementPlan", "Report", "Stage", "ValidatedPlan", "Violation",
    "load_plan",
    "DataClassRule", "Effective", "Policy", "UnknownDataClass", "effective_rules", "load_policy",
    "RULES", "PlanRejected", "approve", "review", "validate",
]
