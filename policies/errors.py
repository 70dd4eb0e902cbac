"""Refused: the shared type of "the validator or the executor declined to act".

It lives in the pure core so that the agent can tell a refusal (a result to report) from a bug
(an exception to propagate) without importing the executor: the executor's refusal types
(ReconfigurationError, ServiceUnavailable) and the validator's PlanRejected all derive from it.
"""
from __future__ import annotations


class Refused(Exception):
    """The validator or the executor declined to act, and said why; nothing changed."""
