"""`continuo autopilot --server URL --intent INTENT.md [--mode advisory|confirm|auto]`: the closed loop
over a running service, shown live: the load, the forecast, the live plan's predicted vs measured
TTFT/TPOT, and each decision with its reason. Every decision goes to the journal.

Registered on the main app by agent/cli.py (`register(app, bench_app)`)."""
from __future__ import annotations

import json
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from policies import InputError, load_cluster, load_model_spec, load_policy

from .config import MODES, read_intent_file
from .controller import Autopilot, Decision

console = Console(width=None if sys.stdout.isatty() else 140)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def view(ap: Autopilot, last: int = 12) -> Group:
    """What the operator watches: the newest decisions, one row each, and the reason of the last."""
    t = Table(title=f"autopilot ({ap.config.mode}) every {ap.config.interval_s:g} s, horizon {ap.config.horizon_s:g} s",
              expand=False)
    for col in ("time", "req/s", "forecast", "plan", "TTFT pred/meas ms", "TPOT pred/meas ms", "decision"):
        t.add_column(col, justify="right" if col in ("req/s", "forecast") else "left")
    for d in ap.decisions[-last:]:
        p, m = d.predicted, d.measured
        t.add_row(datetime.fromtimestamp(d.t).strftime("%H:%M:%S"), f"{d.load.get('arrival_rate', 0):.2f}",
                  f"{d.forecast.get('rate', 0):.2f}", escape(d.current.summary() if d.current else "-"),
                  f"{_ms(p.get('ttft_ms'))} / {_ms(m.get('ttft_p50_ms'))}",
                  f"{_ms(p.get('tpot_ms'))} / {_ms(m.get('tpot_p50_ms'))}",
                  f"{d.action}: {d.status}" + (f" -> {escape(d.chosen.summary())}" if d.chosen and d.status != "held"
                                               else ""))
    last_d = ap.decisions[-1] if ap.decisions else None
    why = f"[bold]why:[/] {escape(last_d.reason)}" if last_d else "waiting for the first interval"
    return Group(t, why)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("autopilot")
    def autopilot_cmd(
        intent_file: Path = typer.Option(..., "--intent", "-i", help="intent file (its front matter may hold "
                                                                       "`autopilot:` knobs)"),
        server: str = typer.Option("http://127.0.0.1:8000", help="the running service's base URL"),
        mode: Optional[str] = typer.Option(None, help="advisory (recommend, never act) | confirm | auto; "
                                                      "default: the front matter's autopilot.mode, else advisory"),
        cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="the cluster file the service runs "
                                                                              "(overrides the front matter's)"),
        policy: Optional[Path] = typer.Option(None, "--policy", "-p", help="overrides the front matter's"),
        interval: Optional[float] = typer.Option(None, help="seconds between decisions (autopilot.interval_s)"),
        ticks: Optional[int] = typer.Option(None, min=1, help="stop after this many decisions (default: until Ctrl-C)"),
        journal: Optional[Path] = typer.Option(None, help="journal file (default $CONTINUO_JOURNAL or "
                                                          ".continuo/journal.jsonl)"),
        use_llm: bool = typer.Option(False, "--llm/--no-llm", help="read the intent with the LLM too (default: "
                                                                  "the rules alone)"),
        as_json: bool = typer.Option(False, "--json", help="one JSON line per decision instead of the live view"),
        admin_token: Optional[str] = typer.Option(None, "--admin-token", envvar="CONTINUO_ADMIN_TOKEN",
                                                  show_envvar=False, help="admin token of the service (default "
                                                                          "$CONTINUO_ADMIN_TOKEN)"),
    ):
        """Keep a running service inside its intent as load and nodes change; exit 0 when stopped."""
        from ..agent import Agent, NeedsClarification
        from ..cli import _front_defaults
        from ..journal import Journal
        from ..remote import AuthError, RemoteError, RemoteService
        from .server_target import ServerTarget
        if mode is not None and mode not in MODES:
            raise InputError(f"{mode!r} is not one of {', '.join(MODES)}", field="--mode")
        f, cfg = read_intent_file(intent_file, mode=mode, interval_s=interval)
        paths = {"cluster": cluster or f.resolve("cluster"), "policy": policy or f.resolve("policy")}
        for key, path in paths.items():
            if path is None:
                raise InputError(f"no {key}: name it in the front matter ({key}: FILE) or pass --{key}",
                                 file=str(intent_file), line=1, field=key)
        c, p = load_cluster(paths["cluster"]), load_policy(paths["policy"])
        remote = RemoteService(server, admin_token=admin_token)
        try:
            target = ServerTarget(server, paths["cluster"], remote=remote)
        except AuthError as e:           # credentials the service refuses are bad input (exit 2)
            raise InputError(str(e), field="--admin-token") from None
        except RemoteError as e:         # nothing answers there: say so (exit 1), no traceback
            Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(1) from None
        try:
            spec = Agent(c, p, use_llm=use_llm).parse(f.body, _front_defaults(f))
        except NeedsClarification as e:
            raise InputError("the intent is incomplete: " + "; ".join(e.questions), file=str(intent_file)) from None
        live = target.live_plan()
        model = load_model_spec(spec.model or (live.model if live else None) or "smollm2-135m")
        from policies.profile import load_profiles

        def ask(d: Decision) -> bool:
            what = d.chosen.summary() if d.chosen else f"replica {(d.replica or {}).get('name')}"
            console.print(f"[bold]{escape(d.action)}[/]: {escape(d.current.summary())} -> "
                          f"{escape(what)}\n  {escape(d.reason)}", highlight=False)
            return typer.confirm("apply it live?", default=False)

        ap = Autopilot(target, spec, p, model, cfg, journal=Journal(journal), confirm=ask, profiles=load_profiles())
        stop = threading.Event()
        done = {"n": 0}

        def on_decision(d: Decision, live_view=None):
            done["n"] += 1
            if as_json:
                print(json.dumps(d.as_json(), default=str), flush=True)
            elif live_view is not None:
                live_view.update(view(ap))
            if ticks is not None and done["n"] >= ticks:
                stop.set()
        try:
            if as_json or cfg.mode == "confirm":     # a question on the terminal and a live view do not mix
                ap.run(stop, on_decision if as_json else
                       lambda d: (console.print(view(ap, last=1)), on_decision(d)))
            else:
                with Live(view(ap), console=console, refresh_per_second=2) as lv:
                    ap.run(stop, lambda d: on_decision(d, lv))
        except KeyboardInterrupt:        # a service that goes away mid-run is not an exit: each interval it
            pass                         # cannot be read is an `unobserved` decision, and the loop goes on
        if not as_json:
            applied = sum(d.applied for d in ap.decisions)
            console.print(f"{len(ap.decisions)} decisions, {applied} applied; journal: {ap.journal.path}")
