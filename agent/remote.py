"""A running service seen through its admin API, usable as an Agent's executor.

    GET  /admin/plan               -> the live plan
    POST /admin/reconfigure        {"plan": <PlacementPlan JSON>, "method": "live", "wait": true} -> the figures
    GET  /admin/reconfigurations   -> the one under way and the finished ones (to follow phases)

The service validates the plan again on its side; this client only sends plans that passed
`policies.approve` here. A service started with an admin token (`continuo serve --admin-token`)
answers /admin only with it: pass admin_token, or set $CONTINUO_ADMIN_TOKEN.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import httpx

from policies import PlacementPlan, ValidatedPlan

ADMIN_TOKEN_ENV = "CONTINUO_ADMIN_TOKEN"


class RemoteError(RuntimeError):
    """The service could not be reached, or refused the request; the message says which and why.
    status: the HTTP status (None when nothing answered); body: the service's JSON answer, if any."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, body


class AuthError(RemoteError):
    """The service refused the credentials: 401 (none, or not 'Bearer <token>') or 403 (a wrong
    token, or an API key where the admin token is needed)."""


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for a token; none without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class RemoteService:
    """The admin API of a service at `base_url`, with the executor interface: `.plan` and `.reconfigure`.

    admin_token: sent as `Authorization: Bearer <token>` on every request; None reads
    $CONTINUO_ADMIN_TOKEN (unset: nothing is sent, as a service without tokens expects)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0,
                 client: httpx.Client | None = None, admin_token: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.client = client or httpx.Client(timeout=timeout)   # pass one for proxies, TLS settings, transports
        # per request, not on the client, so that a client passed in gets the token too
        self.headers = bearer(admin_token or os.environ.get(ADMIN_TOKEN_ENV))

    def _request(self, method: str, path: str, **kw) -> dict:
        url = self.base_url + path
        try:
            r = self.client.request(method, url, headers=self.headers, **kw)
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach the service at {self.base_url} ({e}); start it with "
                              "`continuo serve`, or use --dry-run") from None
        try:
            body = r.json() if r.content else None
        except ValueError:
            body = None
        if r.status_code in (401, 403):
            said = (body or {}).get("error", {}).get("message") if isinstance(body, dict) else None
            hint = ("pass --admin-token or set $CONTINUO_ADMIN_TOKEN" if r.status_code == 401 and not self.headers
                    else "check the admin token (--admin-token / $CONTINUO_ADMIN_TOKEN)")
            raise AuthError(f"the service at {self.base_url} refused {method} {path} with HTTP {r.status_code}: "
                            f"{said or r.text}; {hint}", r.status_code, body)
        if r.status_code == 404:
            raise RemoteError(f"the service at {self.base_url} has no {path} endpoint (404); it may be an older "
                              "version without the admin API", 404, body)
        if r.status_code >= 400:
            raise RemoteError(f"{method} {path} failed with HTTP {r.status_code}: {body if body is not None else r.text}",
                              r.status_code, body if isinstance(body, dict) else None)
        return body

    @property
    def plan(self) -> PlacementPlan | None:
        """The plan serving now (None when the service serves without one)."""
        body = self._request("GET", "/admin/plan")
        return PlacementPlan.model_validate(body["plan"]) if body.get("plan") else None

    def reconfigure(self, validated: ValidatedPlan, method: str = "live",
                    on_update: Callable[[dict], None] | None = None, timeout: float = 600.0) -> dict:
        """Ask the service to move to a validated plan; returns its reconfiguration figures.
        on_update(report) is called as the reconfiguration advances (its phases_s grows)."""
        if not isinstance(validated, ValidatedPlan):
            raise TypeError("only a ValidatedPlan (from policies.approve) is sent to the service")
        plan = validated.plan.model_dump(mode="json")
        if on_update is None:
            # wait: the answer is the finished reconfiguration (pause, bytes, phases), not its start
            body = self._request("POST", "/admin/reconfigure", json={"plan": plan, "method": method, "wait": True})
            return body.get("report", body)
        return self.follow(self.start(plan, method)["rid"], on_update, timeout)

    def start(self, plan: dict, method: str = "live") -> dict:
        """Hand a plan (PlacementPlan JSON) to the service, which validates it and starts moving;
        returns the reconfiguration's report as it starts (its rid names it)."""
        return self._request("POST", "/admin/reconfigure", json={"plan": plan, "method": method, "wait": False})

    def reconfigurations(self) -> dict:
        """{"current": the one under way or None, "history": the finished ones}."""
        return self._request("GET", "/admin/reconfigurations")

    def follow(self, rid: int, on_update: Callable[[dict], None] | None = None, timeout: float = 600.0,
               poll_s: float = 0.1) -> dict:
        """Wait for reconfiguration `rid` to end (done or aborted) and return its report."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.reconfigurations()
            rep = next((h for h in state["history"] if h["rid"] == rid), None) or state["current"]
            if rep and rep["rid"] == rid:
                if on_update:
                    on_update(rep)
                if rep["state"] in ("done", "aborted"):
                    return rep
            time.sleep(poll_s)
        raise RemoteError(f"reconfiguration {rid} did not end within {timeout:.0f} s; "
                          f"GET {self.base_url}/admin/reconfigurations shows where it stands")
