"""A running service seen through its admin API, usable as an Agent's executor.

    GET  /admin/plan          -> the live plan
    POST /admin/reconfigure   {"plan": <PlacementPlan JSON>, "method": "live", "wait": true} -> the figures

The service validates the plan again on its side; this client only sends plans that passed
`policies.approve` here.
"""
from __future__ import annotations

import httpx

from policies import PlacementPlan, ValidatedPlan


class RemoteError(RuntimeError):
    """The service could not be reached, or refused the request; the message says which and why."""


class RemoteService:
    """The admin API of a service at `base_url`, with the executor interface: `.plan` and `.reconfigure`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0,
                 client: httpx.Client | None = None):
        self.base_url = base_url.rstrip("/")
        self.client = client or httpx.Client(timeout=timeout)   # pass one for auth headers, proxies, transports

    def _request(self, method: str, path: str, **kw) -> dict:
        url = self.base_url + path
        try:
            r = self.client.request(method, url, **kw)
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach the service at {self.base_url} ({e}); start it with "
                              "`continuo serve`, or use --dry-run") from None
        if r.status_code == 404:
            raise RemoteError(f"the service at {self.base_url} has no {path} endpoint (404); it may be an older "
                              "version without the admin API")
        if r.status_code >= 400:
            try:
                detail = r.json()
            except ValueError:
                detail = r.text
            raise RemoteError(f"{method} {path} failed with HTTP {r.status_code}: {detail}")
        return r.json()

    @property
    def plan(self) -> PlacementPlan | None:
        """The plan serving now (None when the service serves without one)."""
        body = self._request("GET", "/admin/plan")
        return PlacementPlan.model_validate(body["plan"]) if body.get("plan") else None

    def reconfigure(self, validated: ValidatedPlan, method: str = "live") -> dict:
        """Ask the service to move to a validated plan; returns its reconfiguration figures."""
        if not isinstance(validated, ValidatedPlan):
            raise TypeError("only a ValidatedPlan (from policies.approve) is sent to the service")
        # wait: the answer is the finished reconfiguration (pause, bytes, phases), not its start
        body = self._request("POST", "/admin/reconfigure",
                             json={"plan": validated.plan.model_dump(mode="json"), "method": method, "wait": True})
        return body.get("report", body)
