"""Continuo's pure core: cluster, policy, intent and model facts, plans, the cost model and the validator.

    from policies import load_cluster, load_policy, load_intent_spec, load_model_spec, validate, approve
"""
from .cluster import GPU_KINDS, Cluster, Link, Node, Trust, load_cluster
from .costmodel import estimate, objective_value
from .intent import IntentSpec, Traffic, load_intent_spec
from .loading import InputError
from .modelspec import ModelSpec, builtin_models, load_model_spec
from .plan import Estimates, PlacementPlan, Report, Stage, ValidatedPlan, Violation, load_plan
from .policy import DataClassRule, Effective, Policy, UnknownDataClass, effective_rules, load_policy
from .validator import RULES, PlanRejected, approve, validate

__all__ = [
    "GPU_KINDS", "Cluster", "Link", "Node", "Trust", "load_cluster", "estimate", "objective_value",
    "IntentSpec", "Traffic", "load_intent_spec", "InputError", "ModelSpec", "builtin_models", "load_model_spec",
    "Estimates", "PlacementPlan", "Report", "Stage", "ValidatedPlan", "Violation", "load_plan",
    "DataClassRule", "Effective", "Policy", "UnknownDataClass", "effective_rules", "load_policy",
    "RULES", "PlanRejected", "approve", "validate",
]
