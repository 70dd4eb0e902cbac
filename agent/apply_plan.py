"""`continuo apply-plan PLAN`: hand a plan to a running service and follow its live reconfiguration."""
from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape

from policies import PlacementPlan

from .remote import AuthError, RemoteError, RemoteService

PHASES = ["preparing", "pre-copying", "switching", "cleaning", "done"]


def apply_plan(plan: PlacementPlan, server: str, method: str, as_json: bool, console: Console,
               timeout: float = 600.0, admin_token: str | None = None) -> int:
    """POST the plan to /admin/reconfigure, show each phase as it happens. Exit code: 0 applied;
    1 refused by the service (its validator, or it cannot reconfigure now) or aborted; 2 bad input:
    the service unreachable, the request malformed, or the admin token missing or wrong (401/403).
    admin_token: None reads $CONTINUO_ADMIN_TOKEN."""
    remote = RemoteService(server, timeout=60, admin_token=admin_token)
    try:
        started = remote.start(plan.model_dump(mode="json"), method)
    except AuthError as e:
        console.print(f"[bold red]not authorised:[/] {escape(str(e))}")
        return 2
    except RemoteError as e:
        if e.status is None:
            console.print(f"[red]{escape(str(e))}[/]")
            return 2
        if e.status == 422 and e.body and "report" in e.body:
            if as_json:
                print(json.dumps({"ok": False, **e.body}))
            else:
                console.print("[bold red]The service's validator refused the plan:[/]")
                for v in e.body["report"]["violations"]:
                    console.print(f"  ✗ [{escape(v['rule'])}] {escape(v['message'])} {escape(v.get('hint') or '')}")
            return 1
        msg = (e.body or {}).get("error", {}).get("message") or str(e)
        console.print(f"[bold red]refused ({e.status}):[/] {escape(msg)}")
        return 2 if e.status == 400 else 1
    seen: set[str] = set()
    with console.status("reconfiguring...") as status:
        def show(rep: dict) -> None:
            for p, secs in rep["phases_s"].items():
                if p not in seen and not as_json:
                    seen.add(p)
                    console.print(f"  {p:<12} {1e3 * secs:9.1f} ms")
            status.update(f"reconfiguring: {rep['state']}")
        try:
            rep = remote.follow(started["rid"], show, timeout)
        except RemoteError as e:
            console.print(f"[bold red]lost track of the reconfiguration:[/] {escape(str(e))}")
            return 2 if isinstance(e, AuthError) else 1
    if as_json:
        print(json.dumps({"ok": rep["state"] == "done", "reconfiguration": rep}))
    elif rep["state"] == "done":
        bw = f", {rep['bandwidth_gbs']:.3f} GB/s" if rep["bandwidth_gbs"] else ""
        console.print(f"[bold green]applied[/] ({rep['method']}): pause {rep['pause_ms']:.1f} ms, "
                      f"{rep['rounds']} pre-copy round(s), {rep['kv_tokens_copied']} KV tokens, "
                      f"weights {rep['bytes_moved']['weights'] / 1e6:.1f} MB, KV {rep['bytes_moved']['kv'] / 1e6:.1f} MB{bw}")
        console.print(f"  moved: {escape(rep['delta'])}")
    else:
        console.print(f"[bold red]aborted:[/] {escape(str(rep['error']))}; the old plan keeps serving")
    return 0 if rep["state"] == "done" else 1
