"""`continuo apply-plan PLAN`: hand a plan to a running service and follow its live reconfiguration."""
from __future__ import annotations

import json
import time

import httpx
from rich.console import Console
from rich.markup import escape

from policies import PlacementPlan

PHASES = ["preparing", "pre-copying", "switching", "cleaning", "done"]


def apply_plan(plan: PlacementPlan, server: str, method: str, as_json: bool, console: Console,
               timeout: float = 600.0) -> int:
    """POST the plan to /admin/reconfigure, show each phase as it happens; exit code 0 applied, 1 not."""
    url = server.rstrip("/")
    try:
        r = httpx.post(f"{url}/admin/reconfigure", json={"plan": plan.model_dump(mode="json"), "method": method},
                       timeout=60)
    except httpx.HTTPError as e:
        console.print(f"[red]cannot reach the service at {escape(url)}: {escape(str(e))}[/]")
        return 2
    if r.status_code == 422:
        body = r.json()
        if as_json:
            print(json.dumps({"ok": False, **body}))
        else:
            console.print("[bold red]The service's validator refused the plan:[/]")
            for v in body["report"]["violations"]:
                console.print(f"  ✗ [{escape(v['rule'])}] {escape(v['message'])} {escape(v.get('hint') or '')}")
        return 1
    if r.status_code >= 400:
        msg = r.json().get("error", {}).get("message", r.text)
        console.print(f"[bold red]refused ({r.status_code}):[/] {escape(msg)}")
        return 2 if r.status_code == 400 else 1
    rid, seen, deadline = r.json()["rid"], set(), time.monotonic() + timeout
    with console.status("reconfiguring...") as status:
        while time.monotonic() < deadline:
            state = httpx.get(f"{url}/admin/reconfigurations", timeout=30).json()
            rep = next((h for h in state["history"] if h["rid"] == rid), None) or state["current"]
            if rep and rep["rid"] == rid:
                for p, secs in rep["phases_s"].items():
                    if p not in seen and not as_json:
                        seen.add(p)
                        console.print(f"  {p:<12} {1e3 * secs:9.1f} ms")
                status.update(f"reconfiguring: {rep['state']}")
                if rep["state"] in ("done", "aborted"):
                    break
            time.sleep(0.1)
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
