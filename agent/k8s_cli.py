"""`continuo k8s ...`: the cluster file from Kubernetes nodes, and one service's manifests.

Exit codes as the rest of the CLI: 0 ok, 1 the plan is refused or none is valid, 2 bad input
(a node list whose nodes lack labels included: nothing is written then)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from executor import k8s
from executor.k8s.inventory import write_atomic
from executor.k8s.render import ADMISSION_FILE
from policies import (InputError, IntentSpec, load_cluster, load_intent_spec, load_model_spec, load_plan, load_policy,
                      validate)

from .planner import Infeasible, plan as make_plan
from .render import print_report

k8s_app = typer.Typer(no_args_is_help=True,
                      help="Kubernetes: inventory from the nodes' labels, manifests for a service.")
err = Console(stderr=True, soft_wrap=True)


def _say(text: str, style: str = "") -> None:
    err.print(f"[{style}]{escape(text)}[/]" if style else escape(text), highlight=False)


@k8s_app.command("inventory")
def inventory_cmd(
    from_file: Optional[str] = typer.Option(None, "--from", help="`kubectl get nodes -o json` saved to a file, or - "
                                                                 "for stdin"),
    context: Optional[str] = typer.Option(None, "--context", help="read the nodes from this kubeconfig context "
                                                                  "(needs the kubernetes client: continuo[k8s])"),
    links: Optional[Path] = typer.Option(None, "--links", help="links overlay: {name, links: {default, pairs}} as in "
                                                               "a cluster file"),
    name: Optional[str] = typer.Option(None, help="the cluster's name (default: the overlay's, else the context's, "
                                                  "else 'kubernetes')"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the cluster file here (default: stdout)"),
):
    """Write a cluster file from the nodes' labels; exit 2, writing nothing, when a node lacks one."""
    if (from_file is None) == (context is None):
        raise InputError("give exactly one of --from FILE and --context CTX", field="--from")
    items = k8s.load_node_list(from_file) if from_file else k8s.from_context(context)
    overlay = k8s.load_overlay(links) if links else None
    inv = k8s.inventory(items, overlay, name or context, overlay_file=str(links) if links else None)
    if inv.skipped:
        _say(f"left out (no GPU or Continuo label): {', '.join(inv.skipped)}", "dim")
    for w in inv.warnings:
        _say(f"warning: {w}", "yellow")
    if inv.problems:
        _say(inv.report(), "red")
        raise typer.Exit(2)
    source = f"context {context}" if context else f"`kubectl get nodes -o json` ({from_file})"
    how = f"links from {links}" if links else "links: the default for every pair"
    text = k8s.cluster_yaml(inv.cluster, f"written by `continuo k8s inventory` from {source}\n{how}")
    if out:
        write_atomic(out, text)
        states = {s: sum(n.state == s for n in inv.cluster.nodes) for s in ("up", "draining", "down")}
        _say(f"{out}: {len(inv.cluster.nodes)} nodes ({', '.join(f'{v} {k}' for k, v in states.items() if v)})")
    else:
        sys.stdout.write(text)


@k8s_app.command("labels")
def labels_cmd(cluster: Path = typer.Option(..., "--cluster", "-c", help="cluster file whose nodes to label")):
    """Print the `kubectl label node` commands that give the nodes the labels of a cluster file."""
    for cmd in k8s.label_commands(load_cluster(cluster)):
        print(cmd)


@k8s_app.command("render")
def render_cmd(
    cluster: Path = typer.Option(..., "--cluster", "-c"),
    policy: Path = typer.Option(..., "--policy", "-p"),
    image: str = typer.Option(..., help="container image with continuo installed (the pods run `continuo serve` / "
                                        "`continuo worker`)"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="the plan to start with (default: plan one for "
                                                                  "--intent or --data-class)"),
    intent: Optional[Path] = typer.Option(None, "--intent", "-i", help="structured intent to plan for (no --plan)"),
    data_class: Optional[str] = typer.Option(None, help="data class to plan for (no --plan, no --intent)"),
    model: Optional[str] = typer.Option(None, help="model spec (default: the plan's or intent's, else smollm2-135m)"),
    service: Optional[str] = typer.Option(None, help="service name (default: the intent's, else 'continuo')"),
    namespace: str = typer.Option("continuo", help="namespace of every object"),
    api_from: Optional[list[str]] = typer.Option(None, "--api-from", help="namespace whose pods may call the API "
                                                                          "(repeatable; default none)"),
    weights: Optional[str] = typer.Option(None, help="weights path every pod can read (default: the image's embedded "
                                                     "SmolLM2)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write NN-*.yaml here (default: all to stdout)"),
):
    """Manifests for one service: workers, driver + API, Services, and the NetworkPolicy fence."""
    c, p = load_cluster(cluster), load_policy(policy)
    if plan_file:
        if intent or data_class:
            raise InputError("--plan already names the data class; drop --intent / --data-class", field="--plan")
        pl = load_plan(plan_file)
    else:
        if intent:
            spec = load_intent_spec(intent)
        elif data_class:
            spec = IntentSpec(data_class=data_class, model=model)
        else:
            raise InputError("give --plan, --intent or --data-class", field="--plan")
        try:
            pl = make_plan(spec, c, p, load_model_spec(model or spec.model or "smollm2-135m")).plan
        except Infeasible as e:
            _say("No valid plan to start the service with:", "bold red")
            for r in e.reasons:
                _say(f"  - {r}")
            raise typer.Exit(1)
    m = load_model_spec(model or pl.model)
    if pl.model != "smollm2-135m" and not weights:
        raise InputError(f"the plan serves {pl.model}, and without --weights the pods serve the embedded SmolLM2: "
                         "give the path of its weights as every pod sees it", field="--weights")
    report = validate(pl, c, p, None, m)
    if not report.ok:
        print_report(err, report)
        raise typer.Exit(1)
    svc = service or (pl.intent.service if pl.intent and pl.intent.service else "continuo")
    opts = k8s.RenderOptions(service=svc, image=image, namespace=namespace, api_from=tuple(api_from or ()),
                             weights=weights)
    r = k8s.render(c, p, pl, opts)
    again = validate(r.plan, r.cluster, p, None, m)       # what the driver will check when it starts
    if not again.ok:
        print_report(err, again)
        raise typer.Exit(1)
    if out:
        k8s.write(r, out)
        _say(f"{out}/: {', '.join(f for f in r.files if '/' not in f)}; the driver's files in {out}/continuo/; "
             f"the placement admission policy (cluster-scoped: a cluster admin applies it first) in "
             f"{out}/{ADMISSION_FILE}")
    else:
        sys.stdout.write("---\n".join(k8s.manifests_yaml(docs) for docs in r.files.values()))
    idle = [w for w in r.workers if w not in pl.nodes]
    _say(f"service {svc} ({pl.data_class}) in namespace {namespace}: driver on {r.driver_node}; workers on "
         f"{', '.join(r.workers)}" + (f" (idle, for reconfiguration: {', '.join(idle)})" if idle else ""))
    for node, why in r.skipped.items():
        _say(f"  no worker on {node}: {why}", "dim")
    for f in r.flags:
        _say(f"flag: {f}", "yellow")
    _say(f"before applying, create the tokens once: {r.secret_command(opts)}")
