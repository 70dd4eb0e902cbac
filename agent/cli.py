"""The `continuo` command line. Exit codes: 0 ok, 1 violations / no valid plan, 2 bad input."""
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

from .planner import Infeasible, plan as make_plan
from .render import plan_table, print_report

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Continuo: privacy-aware placement and live reconfiguration of LLM pipelines.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print their figures.")
app.add_typer(bench_app, name="bench")
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, soft_wrap=True)

ROOT = Path(__file__).resolve().parent.parent


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
        proposal = make_plan(i, c, p, m, current=cur, max_stages=max_stages)
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
    report = validate(pl, c, p, i, m, current=load_plan(current) if current else None)
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
def bench_engine_cmd(as_json: bool = typer.Option(False, "--json")):
    """Decode throughput of our engine vs transformers, batching gains, TTFT/TPOT."""
    from executor.bench import run_engine_bench
    run_engine_bench(json_out=as_json)


@app.command("serve")
def serve_cmd(
    cluster: Path = typer.Option(..., "--cluster", "-c"),
    policy: Path = typer.Option(..., "--policy", "-p"),
    plan_file: Path = typer.Option(..., "--plan", help="the placement plan to serve (validated first)"),
    weights: Optional[str] = typer.Option(None, help="GGUF file or safetensors folder (default: embedded SmolLM2)"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    join: Optional[str] = typer.Option(None, help="HOST:PORT: wait for workers to join here instead of "
                                                  "starting them on this machine"),
):
    """Serve the model over node workers with an OpenAI-compatible API (validated plan only)."""
    import uvicorn

    from executor.api import create_app
    from executor.service import Service
    from executor.weights import open_source
    from policies import ModelSpec, approve

    c, p, pl = load_cluster(cluster), load_policy(policy), load_plan(plan_file)
    src = open_source(weights)
    spec = ModelSpec.from_hf_config(src.config.to_hf(), name=pl.model, dtype="fp32")
    validated = approve(pl, c, p, None, spec)        # raises PlanRejected: exit 1 with the report
    join_at = None
    if join:
        h, _, prt = join.rpartition(":")
        join_at = (h, int(prt))
        console.print(f"waiting for nodes {', '.join(n.name for n in c.nodes if n.state != 'down')} to join at {join}")
    service = Service.launch(c, validated, weights, join_at=join_at)
    console.print(f"serving {pl.model}: {pl.summary()} on http://{host}:{port}/v1")
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        service.close()


@app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker_cmd(ctx: typer.Context):
    """A node worker: `continuo worker --join HOST:PORT --node NAME [--threads N]`."""
    from executor.worker import main as worker_main
    worker_main(list(ctx.args))


@app.command("demo")
def demo_cmd(scenario: str = typer.Option("hospital", help="folder under scenarios/"),
             intent: str = typer.Option("phi-70b-split", help="intent file name under scenarios/<s>/intents/")):
    """The main job: plan a scenario's intent and print the plan and the validator report."""
    base = ROOT / "scenarios" / scenario
    console.rule(f"[bold]Continuo demo: scenario {scenario}, intent {intent}")
    ipath = base / "intents" / f"{intent}.yaml"
    console.print(f"intent file {ipath.relative_to(ROOT)}:\n" + ipath.read_text(), highlight=False)
    ctx = typer.Context(plan_cmd)
    ctx.invoke(plan_cmd, cluster=base / "cluster.yaml", policy=base / "policy.yaml", intent=ipath, model=None,
               current=None, max_stages=8, out=None, as_json=False)


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
