"""ServerTarget: the Target over a running `continuo serve`, through its admin API.

    GET  /admin/stats         the telemetry snapshot
    GET  /admin/plan          the live plan (and the cluster fingerprint the service validates against)
    GET  /admin/nodes         per-node state and health: a dead worker is a lost node
    POST /admin/reconfigure   the validated plan; the service validates it again on its side
    GET|POST /admin/replicas, DELETE /admin/replicas/NAME   replicas beside the plan (the service
                              validates a replica's plan again too)

The admin token goes as the CLI's other admin commands send it (agent.remote.RemoteService:
`Authorization: Bearer`, default $CONTINUO_ADMIN_TOKEN).

The cluster state the service validates against is the one it was started with, so `cluster()`
returns that (its fingerprint is checked against the service's). Nodes the service cannot use
although that state says they are up come from `lost_nodes()`: a worker whose health is not ok,
and a node the cluster file now marks draining or down (the operator edits the file; it is read
again whenever it changes). The controller plans around those with the intent's exclusions.
"""
from __future__ import annotations

import time
from pathlib import Path

from policies import Cluster, InputError, PlacementPlan, ValidatedPlan, load_cluster

from ..remote import RemoteError, RemoteService


class ServerTarget:
    """A live service at `base_url`. cluster: the cluster file it was started with (read again when it
    changes: nodes it marks draining or down are lost), or the Cluster itself (nothing to watch)."""

    def __init__(self, base_url: str, cluster: str | Path | Cluster, admin_token: str | None = None,
                 remote: RemoteService | None = None, timeout_s: float = 600.0):
        self.remote = remote or RemoteService(base_url, timeout=timeout_s, admin_token=admin_token)
        self.cluster_file = None if isinstance(cluster, Cluster) else Path(cluster)
        self.base = cluster if isinstance(cluster, Cluster) else load_cluster(self.cluster_file)
        self._mtime = self._stat()
        self._file_lost: dict[str, str] = {}
        self.timeout_s = timeout_s
        served = self.remote._request("GET", "/admin/plan").get("cluster_fingerprint")
        if served and served != self.base.fingerprint():
            raise InputError(f"the service at {self.remote.base_url} validates against cluster state {served}, but "
                             f"this cluster gives {self.base.fingerprint()}: pass the cluster file the service was "
                             "started with", file=str(self.cluster_file or self.base.name), field="--cluster")

    def now(self) -> float:
        return time.time()

    def snapshot(self) -> dict:
        return self.remote._request("GET", "/admin/stats")

    def live_plan(self) -> PlacementPlan | None:
        return self.remote.plan

    def cluster(self) -> Cluster:
        return self.base

    def lost_nodes(self) -> dict[str, str]:
        """Nodes that cannot serve: a worker whose health is not ok, or a node the cluster file now marks
        draining or down."""
        lost = dict(self._from_file())
        health = self.remote._request("GET", "/admin/nodes").get("health") or {}
        for node, state in (health.get("nodes") or {}).items():
            if state != "ok":
                lost[node] = str(state)
        return lost

    def apply(self, validated: ValidatedPlan) -> dict:
        """POST the plan and wait for the reconfiguration to end; a refusal is a report with ok False."""
        try:
            rep = self.remote.reconfigure(validated, method="live", timeout=self.timeout_s)
        except RemoteError as e:
            body = e.body or {}
            return {"ok": False, "state": "aborted", "error": str(e), "status": e.status,
                    "report": body.get("report")}
        return {**rep, "ok": rep.get("state") == "done"}

    def replicas(self) -> list[dict]:
        return self.remote._request("GET", "/admin/replicas")["replicas"]

    def add_replica(self, validated: ValidatedPlan) -> dict:
        """POST the replica's plan; answers once its stages have loaded. A refusal is a report with ok False."""
        return _replica_report(lambda: self.remote._request(
            "POST", "/admin/replicas", json={"plan": validated.plan.model_dump(mode="json")}))

    def drain_replica(self, name: str) -> dict:
        """Start draining (the replica leaves once its requests are done; the next ticks see it go)."""
        return _replica_report(lambda: self.remote._request("DELETE", f"/admin/replicas/{name}"))

    # ------------------------------------------------------------------ the cluster file, read again when it changes

    def _stat(self) -> float | None:
        if self.cluster_file is None:
            return None
        try:
            return self.cluster_file.stat().st_mtime
        except OSError:
            return None

    def _from_file(self) -> dict[str, str]:
        mtime = self._stat()
        if self.cluster_file is not None and mtime != self._mtime:
            self._mtime = mtime
            try:
                now = load_cluster(self.cluster_file)
            except (InputError, OSError):
                return self._file_lost          # a half-written file: keep what the last good one said
            self._file_lost = {n.name: f"{n.state} in {self.cluster_file.name}" for n in now.nodes
                               if n.state != "up" and self.base.has_node(n.name)}
        return self._file_lost


class ServiceTarget:
    """The Target over an executor.service.Service in this process (benches, notebooks): the same calls
    the admin API answers, made directly."""

    def __init__(self, service, timeout_s: float = 600.0):
        self.service, self.timeout_s = service, timeout_s

    def now(self) -> float:
        return time.time()

    def snapshot(self) -> dict:
        return self.service.stats()

    def live_plan(self) -> PlacementPlan | None:
        vp = self.service.plan
        return vp.plan if vp is not None else None

    def cluster(self) -> Cluster:
        return self.service.cluster

    def lost_nodes(self) -> dict[str, str]:
        return {n: s for n, s in self.service.health()["nodes"].items() if s != "ok"}

    def apply(self, validated: ValidatedPlan) -> dict:
        rep = self.service.reconfigure(validated, method="live", wait=True, timeout=self.timeout_s).as_dict()
        return {**rep, "ok": rep.get("state") == "done"}

    def replicas(self) -> list[dict]:
        listed = getattr(self.service, "replicas", None)    # a stand-in for a Service may not run any
        return listed() if callable(listed) else []

    def add_replica(self, validated: ValidatedPlan) -> dict:
        return self._report(lambda: self.service.add_replica(validated))

    def drain_replica(self, name: str) -> dict:
        return self._report(lambda: self.service.drain_replica(name, wait=False))

    @staticmethod
    def _report(call) -> dict:
        """The replica's state as the admin API answers it; a refusal is a report with ok False."""
        from executor.reconfig import ReconfigurationError
        try:
            return {**call().as_dict(), "ok": True}
        except ReconfigurationError as e:
            return {"ok": False, "error": str(e)}


def _replica_report(call) -> dict:
    try:
        rep = call()
    except RemoteError as e:
        return {"ok": False, "error": str(e), "status": e.status, "report": (e.body or {}).get("report")}
    return {**rep, "ok": rep.get("state") in ("serving", "draining", "drained")}


def target_for(executor, cluster: Cluster) -> "ServerTarget | ServiceTarget":
    """The Target over an Agent's executor: a RemoteService (the admin API) or a Service in this process."""
    if isinstance(executor, RemoteService):
        return ServerTarget(executor.base_url, cluster, remote=executor)
    if executor is not None and hasattr(executor, "stats") and hasattr(executor, "reconfigure"):
        return ServiceTarget(executor)
    raise ValueError("the autopilot needs a running service: give the Agent an executor (a RemoteService or a "
                     "Service), or pass target=")
