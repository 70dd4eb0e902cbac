"""CLI commands of the journal: `continuo journal [--since T] [--kind K] [--json]` and
`continuo journal verify`; and `continuo bench adapt [--sim]` (the closed loop on the real
cluster, agent/autopilot/bench_real.py, or in the simulator, agent/autopilot/sim_eval.py).

Registered on the main app by agent/cli.py (`register(app, bench_app)`)."""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from policies import InputError

from .journal import Journal, JournalError, parse_since

console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def summary(entry: dict) -> str:
    """One line a person reads: what the entry says, from its own fields (nothing added)."""
    d = entry["data"]
    parts = []
    for key in ("source", "mode", "action", "status", "ok", "reason", "message", "text", "plan_summary",
                "summary", "error"):
        v = d.get(key)
        if v is None or v == "":
            continue
        s = str(v).replace("\n", " ")
        parts.append(f"{key}={s[:160]}{'...' if len(s) > 160 else ''}")
    if not parts:
        parts.append(", ".join(sorted(d))[:160])
    return "; ".join(parts)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    journal_app = typer.Typer(help="The journal: every intent, decision, plan, validation and apply, hash-chained.",
                              invoke_without_command=True)
    app.add_typer(journal_app, name="journal")

    @journal_app.callback()
    def journal_cmd(
        ctx: typer.Context,
        since: Optional[str] = typer.Option(None, "--since", help="ISO time (UTC unless it says) or relative: "
                                                                  "90s, 30m, 2h, 1d"),
        kind: Optional[list[str]] = typer.Option(None, "--kind", help="only entries of this kind (repeatable)"),
        as_json: bool = typer.Option(False, "--json", help="one JSON entry per line, as stored"),
        path: Optional[Path] = typer.Option(None, "--path", help="journal file (default $CONTINUO_JOURNAL "
                                                                 "or .continuo/journal.jsonl)"),
    ):
        """Read the journal (oldest first)."""
        ctx.obj = path
        if ctx.invoked_subcommand is not None:
            return
        try:
            t = parse_since(since) if since else None
        except ValueError as e:
            raise InputError(str(e), field="--since") from None
        j = Journal(path)
        try:
            es = j.entries(since=t, kinds=set(kind) if kind else None)
        except JournalError as e:
            raise InputError(str(e)) from None
        for e in es:
            if as_json:
                print(json.dumps(e, sort_keys=True))
            else:
                console.print(f"{e['seq']:>5} {_when(e['ts'])} {e['kind']:<10} {escape(summary(e))}", highlight=False)
        if not as_json and not es:
            console.print(f"no entries{' since ' + since if since else ''} in {j.path}")

    @journal_app.command("verify")
    def verify_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")):
        """Check the hash chain; exit 1 and name the first bad entry when a line was edited, removed or
        reordered (or the last one was cut short)."""
        j = Journal(ctx.obj)
        r = j.verify()
        if as_json:
            print(json.dumps({"ok": r.ok, "entries": r.entries, "bad_seq": r.bad_seq, "bad_line": r.bad_line,
                              "reason": r.reason, "path": str(j.path)}))
        elif r.ok:
            console.print(f"[green]ok[/]: {j.path}: {r.reason}", highlight=False)
        else:
            console.print(f"[bold red]tampered or damaged[/]: {escape(r.reason)} "
                          f"({r.entries} entries before it verified)", highlight=False)
        raise typer.Exit(0 if r.ok else 1)

    @bench_app.command("adapt")
    def bench_adapt_cmd(
        sim: bool = typer.Option(False, "--sim", help="in the simulator: the 64-node fleet, a day-long trace; "
                                 "without it: the real local cluster (3 worker processes, emulated links)"),
        scenario: Path = typer.Option(Path(__file__).resolve().parent.parent / "scenarios" / "fleet64",
                                      help="--sim: folder with cluster.yaml, policy.yaml, intent.yaml, trace.yaml"),
        hours: Optional[float] = typer.Option(None, min=0.1, help="--sim: simulate only the first H hours"),
        interval_s: Optional[float] = typer.Option(None, min=0.1, help="controller interval (default: 300 "
                                                   "simulated seconds with --sim, 3 s on the real cluster)"),
        only: Optional[str] = typer.Option(None, help="--sim: comma-separated subset of a,b,c,d,e,f,g,h"),
        phase_s: float = typer.Option(40.0, min=1, help="real cluster: seconds per phase (steady, 3x burst, "
                                      "idle, steady)"),
        max_tokens: int = typer.Option(24, min=2, help="real cluster: tokens per request"),
        seed: Optional[int] = typer.Option(None, help="the arrivals' seed (real cluster: default 0; --sim: the "
                                           "trace drawn again with this seed instead of the file's own, a day of "
                                           "the same shape that nothing was tuned on)"),
        as_json: bool = typer.Option(False, "--json"),
    ):
        """Adaptation benchmark. Without --sim: the closed loop on the real local cluster (a load trace with
        a burst, a drained node and a killed worker; requests lost, flips, reaction time, SLO attainment).
        --sim: SLO attainment and node-hours of static, peak-sized, replica autoscaler, Continuo's
        controller and an offline oracle on one simulated day."""
        if not sim:
            from .autopilot.bench_real import print_figures, run as run_real
            log = (lambda m: print(m, file=sys.stderr)) if as_json else print
            r = run_real(phase_s, max_tokens, interval_s or 3.0, seed or 0, log=log)
            if as_json:
                print(json.dumps(r))
            else:
                print_figures(r)
            raise typer.Exit(0 if r["lost"] == 0 else 1)
        from .autopilot.sim_eval import main as sim_main
        raise typer.Exit(sim_main(scenario, hours=hours, interval_s=interval_s or 300.0,
                                  only=only.split(",") if only else None, as_json=as_json, seed=seed))
