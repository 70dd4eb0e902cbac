"""Grounding: what an intent's text can mean, given the cluster's inventory and the policy.

    text.py         clauses, negation, and loosening text (which sets nothing and is reported)
    places.py       the inventory; nodes, groups, cities, countries and regions a text names
    quantities.py   time limits and which metric each bounds
    privacy.py      the data taxonomy, a pack's classes mapped onto it, class evidence in a text
    extractors.py   the table of per-field extractors and read_rules
    schema.py       the per-request JSON schema for the LLM and the check pass (grounded, never loosening)
"""
from .extractors import (EXTRACTORS, FIELDS, OBJECTIVES, Reading, data_class_by_words, find_models,  # noqa: F401
                         find_services, polarity, read_rules, strip_injections)
from .places import Inventory, Mention, find_mentions, gazetteer, strictness  # noqa: F401
from .privacy import PolicyMappingWarning, class_evidence, map_policy, taxonomy  # noqa: F401
from .quantities import Duration, find_durations, latency_limits, which_latency  # noqa: F401
from .schema import build_schema, check, from_schema, narrow_only  # noqa: F401
from .text import find_loosening, strip_loosening  # noqa: F401
