"""What the controller runs against: a `Target`, so one controller drives a live server and the simulator.

    ServerTarget   (agent/autopilot/server_target.py) HTTP against `continuo serve` (admin token)
    SimTarget      (policies/simulator.py side, by the simulator's owner) simulated time and load

The controller (agent/autopilot/controller.py) only ever calls these five methods, and one optional
one: `lost_nodes() -> dict[str, str]` (node -> why), nodes that cannot serve although cluster()
says they are up: a dead worker, or a node the cluster file now marks draining, while the service
still validates against the cluster state it was started with. The controller plans around them
(the intent's exclusions), as it does around nodes cluster() marks down or draining. A Target is
a mechanism and decides nothing.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from policies import Cluster, PlacementPlan, ValidatedPlan


@runtime_checkable
class Target(Protocol):
    """A running service the controller observes and reconfigures."""

    def now(self) -> float:
        """Seconds: the wall clock for a server, simulated time in the simulator."""
        ...

    def snapshot(self) -> dict:
        """Telemetry in the shape of the service's /admin/stats JSON (executor/telemetry.py documents it)."""
        ...

    def live_plan(self) -> PlacementPlan:
        """The plan serving now."""
        ...

    def cluster(self) -> Cluster:
        """The cluster as it is now: nodes down or draining carry that state."""
        ...

    def apply(self, validated: ValidatedPlan) -> dict:
        """Apply a validated plan live; returns the apply report: at least `ok` (bool) and `error`
        (str or None), and what the mechanism measured (`state`, `pause_ms`, `bytes`, ...)."""
        ...
