"""Intent -> plan: the LLM with tools, the planner, the Python API, the CLI.

    from agent import Agent
    agent = Agent(cluster, policy, executor=None, mode="suggest")
    outcome = agent.apply("Keep patient data in the EU, first token under 300 ms.")
"""
from .agent import Agent, AgentError, DiffRow, NeedsClarification, Outcome, plan_diff

__all__ = ["Agent", "AgentError", "DiffRow", "NeedsClarification", "Outcome", "plan_diff"]
