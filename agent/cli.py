"""The `continuo` command line. Exit codes: 0 ok, 1 violations / no valid plan / refused, 2 bad input
(including credentials a service refuses: a missing or wrong admin token)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from policies import (InputError, PlanRejected, PlacementPlan, load_cluster, load_intent_spec, load_model_spec, load_plan,
                      load_policy, validate)
from policies.profile import load_profiles   # measured speeds where `continuo calibrate` left them

from .k8s_cli import k8s_app
from .planner import Infeasible, plan as make_plan
from .render import plan_table, print_report

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Continuo: privacy-aware placement and live reconfiguration of LLM pipelines.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print their figures.")
app.add_typer(bench_app, name="bench")
app.add_typer(k8s_app, name="k8s")
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, soft_wrap=True)

ROOT = Path(__file__).resolve().parent.parent

# The admin token clients send to /admin (`continuo serve --admin-token` sets the one it takes).
ADMIN_TOKEN_HELP = "admin token of the service (sent as 'Authorization: Bearer'; default $CONTINUO_ADMIN_TOKEN)"


def _admin_token_option():
    return typer.Option(None, "--admin-token", envvar="CONTINUO_ADMIN_TOKEN", show_envvar=False,
                        help=ADMIN_TOKEN_HELP)


def _model_for(name: str | None, override: str | None):
    return load_model_spec(override or name or "smollm2-135m")


@app.command("plan")
def plan_cmd(
    cluster: Path = typer.Option(..., "--cluster", "-c", help="cluster file"),
    policy: Path = typer.Option(..., "--policy", "-p", help="policy pack file"),
    intent: Path = typer.Option(..., "--intent", "-i", help="structured intent (IntentSpec YAML)"),
    model: Optional[str] = typer.Option(None, help="model spec name or config path (default: the intent's)"),
    current: Optional[Path] = typer.Option(None, help="the plan serving now (checks the transition)"),
    max_stages: int = typer.Option(8, min=1, help="most pipeline stages to consider"),
    out: Optional[Path] = typer.Option(None, help="write the plan here as YAML"),
    as_json: bool = typer.Option(False, "--json", help="print the outcome as one JSON object"),
):
    """Find the best valid plan for an intent; exit 0 when one exists, 1 when none does."""
    c, p, i = load_cluster(cluster), load_policy(policy), load_intent_spec(intent)
    m = _model_for(i.model, model)
    cur = load_plan(current) if current else None
    try:
        proposal = make_plan(i, c, p, m, current=cur, max_stages=max_stages, profiles=load_profiles())
    except Infeasible as e:
        if as_json:
            print(json.dumps({"ok": False, "reasons": e.reasons}))
        else:
            console.print("[bold red]No valid plan.[/] Conflicting constraints:")
            for r in e.reasons:
                console.print(f"  - {escape(r)}", highlight=False)
        raise typer.Exit(1)
    if out:
        out.write_text(yaml.safe_dump(proposal.plan.model_dump(mode="json", exclude_none=True), sort_keys=False))
    if as_json:
        print(json.dumps({"ok": True, "plan": proposal.plan.model_dump(mode="json"),
                          "report": proposal.report.model_dump(mode="json"), "objective": proposal.objective,
                          "score": proposal.score, "exact": proposal.exact, "notes": list(proposal.notes)}))
        return
    console.print(plan_table(proposal.plan, c))
    console.print(f"objective {proposal.objective}: {proposal.score:.4g} "
                  f"({'exact search' if proposal.exact else 'DP search'}, {proposal.considered} candidates)")
    for note in proposal.notes:
        console.print(f"  note: {escape(note)}", highlight=False)
    print_report(console, proposal.report)


@app.command("validate")
def validate_cmd(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="placement plan file (YAML or JSON)"),
    cluster: Path = typer.Option(..., "--cluster", "-c"),
    policy: Path = typer.Option(..., "--policy", "-p"),
    intent: Optional[Path] = typer.Option(None, "--intent", "-i", help="default: the plan's own intent"),
    model: Optional[str] = typer.Option(None, help="model spec name or config path (default: the plan's)"),
    current: Optional[Path] = typer.Option(None, help="the plan serving now (checks the transition)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Check a plan against every rule; exit 0 when valid, 1 on violations."""
    pl: PlacementPlan = load_plan(plan_file)
    c, p = load_cluster(cluster), load_policy(policy)
    i = load_intent_spec(intent) if intent else None
    m = _model_for(pl.model, model)
    report = validate(pl, c, p, i, m, current=load_plan(current) if current else None, profiles=load_profiles())
    if as_json:
        print(json.dumps({"ok": report.ok, "report": report.model_dump(mode="json")}))
    else:
        console.print(plan_table(pl.model_copy(update={"estimates": report.estimates}), c))
        print_report(console, report)
    raise typer.Exit(0 if report.ok else 1)


@bench_app.command("plan")
def bench_plan_cmd(as_json: bool = typer.Option(False, "--json"), repeats: int = typer.Option(5, min=1)):
    """Planning time p50 for 8/32/64 nodes x 32/80 layers, and the gap to brute force on small instances."""
    from .bench_plan import run
    run(as_json=as_json, repeats=repeats)


@bench_app.command("engine")
def bench_engine_cmd(as_json: bool = typer.Option(False, "--json"),
                     threads: Optional[int] = typer.Option(None, help="torch threads for both sides (default: "
                                                                      "torch's, one per core)"),
                     max_tokens: int = typer.Option(128, min=1)):
    """Our engine vs transformers generate(), batching gains, TTFT/TPOT, 2-stage pipeline vs 1 stage."""
    from executor.bench import run_engine_bench
    run_engine_bench(json_out=as_json, threads=threads, max_tokens=max_tokens)


@app.command("apply-plan")
def apply_plan_cmd(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="placement plan to apply to the running service"),
    server: str = typer.Option("http://127.0.0.1:8000", help="the service's base URL"),
    method: str = typer.Option("live", help="live | stop_and_copy | recompute | restart"),
    as_json: bool = typer.Option(False, "--json"),
    admin_token: Optional[str] = _admin_token_option(),
):
    """Apply a plan to a running service as a live reconfiguration (validated there first).
    Exit 0 applied, 1 refused or aborted, 2 bad input (unreachable, or the admin token missing or wrong)."""
    from .apply_plan import apply_plan
    from .journal import Journal
    plan = load_plan(plan_file)
    rc = apply_plan(plan, server, method, as_json, console, admin_token=admin_token)
    # a person's apply goes into the journal beside the autopilot's (issue 16)
    Journal().append("apply", {"source": "human", "command": "apply-plan", "server": server, "method": method,
                               "summary": plan.summary(), "nodes": sorted(set(plan.nodes)),
                               "plan": plan.model_dump(mode="json"), "ok": rc == 0, "exit_code": rc,
                               "status": {0: "applied", 1: "refused or aborted"}.get(rc, "unreachable or unauthorised")})
    raise typer.Exit(rc)


@bench_app.command("reconfig")
def bench_reconfig_cmd(as_json: bool = typer.Option(False, "--json"),
                       repeats: int = typer.Option(2, min=1, help="series of reconfigurations per method"),
                       method: Optional[list[str]] = typer.Option(
                           None, help="only these methods (repeatable): live, stop_and_copy, recompute, restart"),
                       emulate_links: bool = typer.Option(False, "--emulate-links", help="the workers talk over "
                                                          "the cluster file's links (latency, bandwidth)"),
                       cluster: Optional[Path] = typer.Option(
                           None, "--cluster", "-c", help="cluster file with nodes edge-a, edge-b, cloud-1 (default: "
                                                         "scenarios/local/cluster.yaml; scenarios/local/cluster-wan.yaml "
                                                         "has 1 Gbps / 40 ms links)")):
    """Downtime, TTFT/TPOT overhead, bandwidth and correctness of live migration vs the baselines."""
    from executor.bench_reconfig import METHODS, run
    bad = [m for m in method or [] if m not in METHODS]
    if bad:
        raise typer.BadParameter(f"unknown method {bad[0]!r}; one of {', '.join(METHODS)}", param_hint="--method")
    run(as_json=as_json, repeats=repeats, methods=method or None, emulate_links=emulate_links,
        cluster_file=str(cluster) if cluster else None)


@bench_app.command("faults", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_faults_cmd(ctx: typer.Context):
    """Live reconfigurations under load with a worker killed, a transfer cut, a destination out of memory
    or a stall, in each phase: aborted cleanly, identical, failed clearly, lost or altered.
    Options: --json, --reconfigs N (default 50), --kinds kill,cut,oom,timeout, --phases P,..."""
    from executor.bench_faults import main as faults_main
    raise typer.Exit(faults_main(list(ctx.args)) or 0)


@app.command("serve")
def serve_cmd(
    cluster: Path = typer.Option(..., "--cluster", "-c"),
    policy: Path = typer.Option(..., "--policy", "-p"),
    plan_file: Path = typer.Option(..., "--plan", help="the placement plan to serve (validated first)"),
    weights: Optional[str] = typer.Option(None, help="GGUF file or safetensors folder (default: embedded SmolLM2)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; any but loopback needs --api-key and "
                                               "--admin-token (or --insecure)"),
    port: int = typer.Option(8000),
    join: Optional[str] = typer.Option(None, help="HOST:PORT: wait for workers to join here instead of "
                                                  "starting them on this machine"),
    api_key: Optional[list[str]] = typer.Option(
        None, "--api-key", envvar="CONTINUO_API_KEY", show_envvar=False,
        help="a key that opens /v1 (repeatable; default $CONTINUO_API_KEY, several separated by spaces)"),
    admin_token: Optional[list[str]] = typer.Option(
        None, "--admin-token", envvar="CONTINUO_ADMIN_TOKEN", show_envvar=False,
        help="a token that opens /admin (repeatable; default $CONTINUO_ADMIN_TOKEN); an API key never does"),
    protect_metrics: bool = typer.Option(False, "--protect-metrics",
                                         help="/metrics and /health take the admin token too (default: open)"),
    insecure: bool = typer.Option(False, "--insecure", help="serve on a non-loopback address without credentials: "
                                                            "anyone who reaches the port may reconfigure"),
    emulate_links: bool = typer.Option(False, "--emulate-links", help="local workers talk as over the cluster "
                                       "file's links: each pair's latency and bandwidth, per direction"),
    driver_node: Optional[str] = typer.Option(None, help="with --emulate-links: the node the engine process sits "
                                                         "beside (default: the plan's first stage's)"),
):
    """Serve the model over node workers with an OpenAI-compatible API (validated plan only)."""
    import uvicorn

    from executor.api import Credentials, create_app
    from executor.service import Service
    from executor.weights import open_source
    from policies import ModelSpec, approve

    # All of it checked before anything starts: a refused configuration should cost nothing.
    for flag, tokens in (("--api-key", api_key), ("--admin-token", admin_token)):
        try:
            Credentials(tokens, flag)
        except ValueError:
            raise InputError("a token must be visible ASCII characters, without spaces", field=flag) from None
    if protect_metrics and not admin_token:
        raise InputError("--protect-metrics needs --admin-token (or $CONTINUO_ADMIN_TOKEN) to open them with",
                         field="--protect-metrics")
    _check_exposure(host, api_key, admin_token, insecure)
    if emulate_links and join:
        raise InputError("--emulate-links shapes the traffic of workers this command starts on this machine; "
                         "workers that --join talk over their real network", field="--emulate-links")
    if driver_node and not emulate_links:
        raise InputError("--driver-node places the engine for --emulate-links; give both", field="--driver-node")
    c, p, pl = load_cluster(cluster), load_policy(policy), load_plan(plan_file)
    if driver_node and not any(n.name == driver_node and n.state != "down" for n in c.nodes):
        raise InputError(f"no up node {driver_node!r} in {cluster} (up: "
                         f"{', '.join(n.name for n in c.nodes if n.state != 'down')})", field="--driver-node")
    src = open_source(weights)
    spec = ModelSpec.from_hf_config(src.config.to_hf(), name=pl.model, dtype="fp32")
    validated = approve(pl, c, p, None, spec)        # raises PlanRejected: exit 1 with the report
    join_at = None
    if join:
        h, _, prt = join.rpartition(":")
        join_at = (h, int(prt))
        console.print(f"waiting for nodes {', '.join(n.name for n in c.nodes if n.state != 'down')} to join at {join}")
    service = Service.launch(c, validated, weights, join_at=join_at, policy=p, emulate_links=emulate_links,
                             driver_node=driver_node)
    console.print(f"serving {pl.model}: {pl.summary()} on http://{host}:{port}/v1")
    if service.links:
        from executor.service import describe_links
        console.print(f"  emulated links: {describe_links(service.links)}")
    console.print(f"  /v1: {'API key' if api_key else 'open'}; /admin: "
                  f"{'admin token' if admin_token else 'closed (no admin token)' if api_key else 'open'}; "
                  f"/metrics, /health: {'admin token' if protect_metrics else 'open'}")
    try:
        uvicorn.run(create_app(service, api_keys=api_key, admin_tokens=admin_token, protect_metrics=protect_metrics),
                    host=host, port=port, log_level="warning")
    finally:
        service.close()


def _check_exposure(host: str, api_keys, admin_tokens, insecure: bool) -> None:
    """Refuse to serve where other machines reach the port unless both doors are locked: without
    an admin token anyone there could move the model's layers, without an API key use the model."""
    from executor.api import is_loopback
    missing = [what for what, given in (("an API key (--api-key or $CONTINUO_API_KEY)", api_keys),
                                        ("an admin token (--admin-token or $CONTINUO_ADMIN_TOKEN)", admin_tokens))
               if not given]
    if is_loopback(host) or not missing:
        return
    if insecure:
        err.print(f"[bold yellow]warning:[/] serving on {escape(host)} without {' and '.join(missing)} "
                  "(--insecure): anyone who reaches the port can use the model or reconfigure the service",
                  highlight=False)
        return
    raise InputError(f"refusing to serve on {host}, which other machines can reach, without {' and '.join(missing)}: "
                     "anyone who reaches the port could use the model and reconfigure the service. Give what is "
                     "missing, serve on 127.0.0.1, or pass --insecure to do it anyway", field="--host")


@app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker_cmd(ctx: typer.Context):
    """A node worker: `continuo worker --join HOST:PORT --node NAME [--threads N] [--device auto|cpu|cuda:N]`."""
    from executor.worker import main as worker_main
    raise typer.Exit(worker_main(list(ctx.args)) or 0)


@app.command("demo")
def demo_cmd(intent: Optional[Path] = typer.Option(None, help="intent file (default: scenarios/local/intents/"
                                                                 "maintenance.md)"),
             emulate_links: bool = typer.Option(False, "--emulate-links", help="the workers talk over the local "
                                                "cluster file's links (latency, bandwidth)")):
    """The main job: serve the embedded model over local workers under load, parse an intent, plan,
    validate and apply it live, and print what happened."""
    from .demo import run_demo
    raise typer.Exit(run_demo(intent, console, emulate_links=emulate_links))


# ---------------------------------------------------------------- the agent: intent files, apply, chat


def _intent_inputs(intent_file: Path, cluster: Optional[Path], policy: Optional[Path]):
    """The intent file and the cluster and policy it runs against (--cluster/--policy override its front matter)."""
    from .intent_file import load_intent_file
    f = load_intent_file(intent_file)
    paths = {"cluster": cluster or f.resolve("cluster"), "policy": policy or f.resolve("policy")}
    for key, path in paths.items():
        if path is None:
            raise InputError(f"no {key}: name it in the front matter ({key}: FILE) or pass --{key}",
                             file=str(intent_file), line=1, field=key)
    return f, load_cluster(paths["cluster"]), load_policy(paths["policy"])


def _front_defaults(f) -> dict:
    """What the front matter sets for the parser: service, model, and any intent field it settles."""
    from .intent_file import SETTLE_KEYS
    return {k: f.front[k] for k in ("service", "model", *SETTLE_KEYS) if k in f.front}


def _print_questions(e, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "status": "needs-clarification", **e.parsed.to_json()}))
    else:
        console.print("[bold yellow]The intent is incomplete.[/] Please say:")
        for q in e.questions:
            console.print(f"  ? {escape(q)}", highlight=False)


@app.command("parse")
def parse_cmd(
    intent_file: Path = typer.Argument(..., metavar="INTENT.md", help="intent file (Markdown, optional front matter)"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="overrides the front matter's"),
    policy: Optional[Path] = typer.Option(None, "--policy", "-p", help="overrides the front matter's"),
    use_llm: bool = typer.Option(True, "--llm/--no-llm", help="ask the LLM too, or read with the rules alone"),
    as_json: bool = typer.Option(False, "--json", help="print the IntentSpec (and what needs asking) as JSON"),
):
    """Parse an intent file into an IntentSpec; exit 1 when a required field stays unknown."""
    from .agent import Agent, NeedsClarification
    f, c, p = _intent_inputs(intent_file, cluster, policy)
    parsed = Agent(c, p, use_llm=use_llm).read(f.body, _front_defaults(f))
    if parsed.spec is None:
        _print_questions(NeedsClarification(parsed), as_json)
        raise typer.Exit(1)
    if as_json:
        print(json.dumps({"ok": True, **parsed.to_json()}))
        return
    console.print_json(parsed.spec.model_dump_json(exclude_defaults=True))
    for q in parsed.questions:
        console.print(f"  ? {escape(q)}", highlight=False)
    for d in parsed.dropped:
        console.print(f"  dropped: {escape(d)}", highlight=False)


@app.command("apply")
def apply_cmd(
    intent_file: Path = typer.Argument(..., metavar="INTENT.md", help="intent file (Markdown, optional front matter)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="parse, plan, validate and diff; no service needed"),
    yes: bool = typer.Option(False, "--yes", "-y", help="apply a valid plan without asking (confirm -> auto)"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="overrides the front matter's"),
    policy: Optional[Path] = typer.Option(None, "--policy", "-p", help="overrides the front matter's"),
    server: str = typer.Option("http://127.0.0.1:8000", help="the running service's base URL"),
    use_llm: bool = typer.Option(True, "--llm/--no-llm", help="ask the LLM too, or read with the rules alone"),
    as_json: bool = typer.Option(False, "--json", help="print the outcome (spec, plan, report, diff) as JSON"),
    admin_token: Optional[str] = _admin_token_option(),
):
    """Parse, plan, validate, show the diff and (as the mode allows) apply live; exit 1 unless ok
    (2 for bad input, such as an admin token the service refuses)."""
    from .agent import Agent, NeedsClarification
    from .remote import AuthError, RemoteError, RemoteService
    if dry_run and yes:
        raise InputError("--dry-run and --yes contradict each other: pick one", field="--yes")
    f, c, p = _intent_inputs(intent_file, cluster, policy)
    mode = f.front.get("mode", "confirm")
    if yes and mode == "confirm":
        mode = "auto"
    if dry_run and mode in ("confirm", "auto"):
        mode = "auto"   # nothing serves, so the gate stops at "dry-run" before asking
    model = load_model_spec(f.front["model"]) if f.front.get("model") else None
    executor = None if dry_run else RemoteService(server, admin_token=admin_token)
    from .journal import Journal
    agent = Agent(c, p, executor=executor, model=model, mode=mode,
                  confirm=lambda out: _confirm(out, c, as_json), use_llm=use_llm, ask_on_conflict=True,
                  journal=Journal())
    try:
        out = agent.apply(f.body, defaults=_front_defaults(f))
    except NeedsClarification as e:
        _print_questions(e, as_json)
        raise typer.Exit(1)
    except RemoteError as e:
        # credentials the service refuses are the caller's input to fix: 2, like any bad input
        status = "unauthorized" if isinstance(e, AuthError) else "unreachable"
        if as_json:
            print(json.dumps({"ok": False, "status": status, "message": str(e)}))
        else:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2 if isinstance(e, AuthError) else 1)
    if as_json:
        print(json.dumps(out.as_dict()))
    else:
        from .render import print_outcome
        print_outcome(console, out, c)
    raise typer.Exit(0 if out.ok else 1)


def _confirm(out, cluster, as_json: bool) -> bool:
    """Show the plan, its diff and report (on stderr when stdout carries JSON), then ask."""
    from rich.prompt import Confirm

    from .render import diff_table, plan_table
    shown = err if as_json else console
    shown.print(diff_table(out.diff))
    shown.print(plan_table(out.plan, cluster))
    print_report(shown, out.report)
    if not sys.stdin.isatty():
        shown.print("[yellow]not a terminal: cannot ask; pass --yes to apply without asking[/]")
        return False
    return Confirm.ask("Apply this plan live?", default=False, console=shown)


@app.command("chat")
def chat_cmd(
    cluster: Path = typer.Option(..., "--cluster", "-c"),
    policy: Path = typer.Option(..., "--policy", "-p"),
    server: Optional[str] = typer.Option(None, help="the running service's base URL (default: nothing serving, "
                                                    "plans are only shown)"),
    mode: str = typer.Option("confirm", help="read-only | suggest | confirm | auto"),
    admin_token: Optional[str] = _admin_token_option(),
):
    """A conversation with the placement agent: tool calls, plan diffs and confirmation as they happen."""
    from rich.prompt import Confirm, Prompt

    from .agent import Agent, AgentError
    from .intent_file import MODES
    from .remote import AuthError, RemoteError, RemoteService
    from .render import diff_table, plan_table
    if mode not in MODES:
        raise InputError(f"mode '{mode}' is not one of {', '.join(MODES)}", field="--mode")
    c, p = load_cluster(cluster), load_policy(policy)
    remote = RemoteService(server, admin_token=admin_token) if server else None
    if remote is not None:
        # Ask once before the conversation starts: a refused token is said now (exit 2), not mid-chat.
        try:
            _ = remote.plan
        except AuthError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2)
        except RemoteError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(1)

    def confirm(out) -> bool:
        console.print(diff_table(out.diff))
        console.print(plan_table(out.plan, c))
        print_report(console, out.report)
        return Confirm.ask("Apply this plan live?", default=False, console=console)

    def show(kind: str, data) -> None:
        if kind == "token":
            console.print(data, end="", highlight=False, markup=False)
        elif kind == "reply":
            console.print()
        elif kind == "tool_call":
            console.print(f"[dim]-> {data['name']}({escape(json.dumps(data['args']))})[/]", highlight=False)
        elif kind == "tool_result":
            name, text, ok = data
            console.print(f"[{'dim' if ok else 'red'}]<- {name}: {escape(str(text))}[/]", highlight=False)
        elif kind == "plan":
            console.print(plan_table(data[0], c))
            print_report(console, data[1])
        elif kind == "diff":
            console.print(diff_table(data))

    from .journal import Journal
    agent = Agent(c, p, executor=remote, mode=mode, confirm=confirm, journal=Journal())
    console.print(f"[bold]Continuo chat[/] on {c.name}, policy {p.name}, mode {mode}. Empty line or 'exit' ends.")
    history = None
    while True:
        try:
            text = Prompt.ask("[bold cyan]you[/]", console=console, default="", show_default=False)
        except (EOFError, KeyboardInterrupt):
            break
        if text.strip().lower() in ("", "exit", "quit"):
            break
        try:
            history = agent.chat(text, history, on_event=show)
        except AgentError as e:
            console.print(f"[red]{escape(str(e))}[/]", highlight=False)
        except RuntimeError as e:   # the service went away: say so and keep talking
            console.print(f"[red]error: {escape(str(e))}[/]", highlight=False)


@app.command("explain-policy")
def explain_policy_cmd(
    policy: Path = typer.Argument(..., metavar="POLICY.yaml", help="policy pack file"),
    as_json: bool = typer.Option(False, "--json", help="print the mapping as JSON"),
):
    """How the intent parser reads a policy pack: each data class mapped onto the shipped data taxonomy
    (by name, words or meaning), strictest first; exit 1 when a class maps to nothing."""
    from .grounding import map_policy, strictness, taxonomy
    pol = load_policy(policy)
    pm = map_policy(pol)
    order = sorted(pol.data_classes, key=lambda c: strictness(pol, c), reverse=True)
    rows = [{"data_class": c, "category": pm.classes[c].category, "how": pm.classes[c].how,
             "detail": pm.classes[c].detail,
             "category_description": taxonomy()[pm.classes[c].category].description if pm.classes[c].category
             else None} for c in order]
    if as_json:
        print(json.dumps({"policy": pol.name, "strictest_first": order, "classes": rows,
                          "unmapped": pm.unmapped()}))
    else:
        console.print(f"[bold]{escape(pol.name)}[/]: {len(order)} data classes, strictest first")
        for r in rows:
            cat = r["category"] or "[yellow]nothing[/]"
            console.print(f"  {escape(r['data_class']):<16} -> {cat:<22} ({r['how']}: {escape(r['detail'])})",
                          highlight=False)
        for c in pm.unmapped():
            err.print(f"[yellow]warning:[/] class '{escape(c)}' maps onto no category: intents can name it only "
                      "by its own name and words", highlight=False)
    raise typer.Exit(1 if pm.unmapped() else 0)


@bench_app.command("intents")
def bench_intents_cmd(
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c"),
    policy: Optional[Path] = typer.Option(None, "--policy", "-p"),
    intents: Optional[Path] = typer.Option(None, "--intents", "-i",
                                           help="labelled set: YAML list of {text, expect}; default: every "
                                                "scenario's set"),
    final: bool = typer.Option(False, "--final", help="score the untouched final sets (intent-final.yaml); "
                                                       "aggregate figures only, no intent is printed"),
    use_llm: bool = typer.Option(True, "--llm/--no-llm", help="score the LLM backends, or the rules alone"),
    as_json: bool = typer.Option(False, "--json", help="last line: one JSON object with the figures"),
):
    """Field accuracy, precision and recall per field (every field scored) and seconds per intent."""
    from .bench_intents import run, run_all
    if intents is None:
        if cluster or policy:
            raise typer.BadParameter("--cluster/--policy go with --intents; without them every scenario's "
                                     "set is scored")
        run_all(as_json=as_json, use_llm=use_llm, final=final)
        return
    if cluster is None or policy is None:
        raise typer.BadParameter("--intents needs --cluster and --policy")
    run(cluster, policy, intents, as_json=as_json, use_llm=use_llm, verbose=not final)


from .cli_speed import register as _register_speed  # noqa: E402  (calibrate, simulate, bench simulate/predict)

_register_speed(app, bench_app)
from .journal_cli import register as _register_journal  # noqa: E402  (journal, journal verify, bench adapt --sim)
_register_journal(app, bench_app)
from .autopilot.cli import register as _register_autopilot  # noqa: E402  (autopilot: the closed loop, issue 16)
_register_autopilot(app, bench_app)


def main() -> None:
    """Entry point: bad input becomes exit code 2 with a message naming file, line and field."""
    try:
        rc = app(standalone_mode=False)   # click returns a typer.Exit's code instead of raising it
        sys.exit(rc if isinstance(rc, int) else 0)
    except PlanRejected as e:
        err.print(f"[bold red]plan rejected by the validator:[/]\n{escape(str(e))}", highlight=False)
        sys.exit(1)
    except InputError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # Usage errors (unknown option, bad value) from typer's click: shown, exit code 2.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
