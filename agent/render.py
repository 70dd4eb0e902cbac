"""Rich rendering of plans, reports and estimates, shared by the CLI commands."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from policies import Cluster, PlacementPlan, Report


def plan_table(plan: PlacementPlan, cluster: Cluster, title: str = "Placement plan") -> Table:
    """The plan's stages with where they run and the cost model's memory and time per stage."""
    est = {i: s for i, s in enumerate(plan.estimates.stages)} if plan.estimates else {}
    t = Table(title=f"{title}: {plan.model} / data class {plan.data_class}")
    for col in ("#", "node", "layers", "where", "memory", "prefill", "decode"):
        t.add_column(col, justify="right" if col in ("#", "memory", "prefill", "decode") else "left", no_wrap=True)
    for i, st in enumerate(plan.stages):
        n = cluster.node(st.node) if cluster.has_node(st.node) else None
        e = est.get(i)
        t.add_row(str(i), st.node, f"{st.first_layer}-{st.last_layer}",
                  f"{n.gpus}x{n.gpu} {n.jurisdiction} {n.trust.value} {n.tier}" if n else "unknown node",
                  f"{e.memory_bytes / 1e9:.1f}/{e.capacity_bytes / 1e9:.0f}G" if e else "",
                  f"{e.prefill_ms:.1f}ms" if e else "", f"{e.decode_ms:.2f}ms" if e else "")
    return t


def print_report(console: Console, report: Report) -> None:
    """The validator's verdict: violations, warnings and estimates."""
    style = "green" if report.ok else "red"
    console.print(f"[bold {style}]Validator: {len(report.violations)} violation(s), "
                  f"{len(report.warnings)} warning(s)[/]")
    for v in report.violations:
        console.print(f"  [red]✗[/] {escape(v.text())}", highlight=False)
    for w in report.warnings:
        console.print(f"  [yellow]![/] {escape(w.text())}", highlight=False)
    if report.estimates:
        e = report.estimates
        console.print(f"  estimates: TTFT {e.ttft_ms:.1f} ms, TPOT {e.tpot_ms:.2f} ms, "
                      f"throughput {e.throughput_tok_s:.0f} tok/s, cost ${e.cost_per_hour:.2f}/h", highlight=False)


def diff_table(rows, title: str = "Plan diff") -> Table:
    """A terraform-style diff of PlanDelta runs: + placed, ~ moved, = unchanged, - removed.

    Layers show as people read them (last one included); weights are what travels for a move."""
    style = {"+": "green", "~": "yellow", "=": "dim", "-": "red"}
    t = Table(title=title)
    for col in ("", "layers", "from", "to", "weights"):
        t.add_column(col, no_wrap=True, justify="right" if col == "weights" else "left")
    for r in rows:
        s = style.get(r.action, "")
        moved = f"{r.weight_bytes / 1e6:.1f} MB" if r.moves and r.weight_bytes else ""
        t.add_row(f"[{s}]{r.action}[/]", f"{r.first_layer}-{r.last_layer}", r.src or "", r.dst or "", moved)
    return t


def print_outcome(console: Console, out, cluster: Cluster) -> None:
    """An agent Outcome: the spec, the diff against the live plan, the plan, the report and what happened."""
    if out.spec is not None:
        console.print("[bold]Intent:[/] " + escape(out.spec.model_dump_json(exclude_defaults=True)), highlight=False)
    for item in (out.parsed.ignored if out.parsed else []):
        console.print(f"  [yellow]ignored[/] '{escape(item)}': an intent cannot change the policy or the mode",
                      highlight=False)
    for q in (out.parsed.questions if out.parsed else []):
        console.print(f"  [yellow]?[/] {escape(q)}", highlight=False)
    if out.plan is not None:
        console.print(diff_table(out.diff, "Plan diff" + ("" if out.current else " (nothing serving now)")))
        console.print(plan_table(out.plan, cluster))
    if out.report is not None:
        print_report(console, out.report)
    for r in out.reasons:
        console.print(f"  - {escape(r)}", highlight=False)
    if out.reconfig:
        pause = out.reconfig.get("pause_ms")
        console.print(f"  reconfiguration {out.reconfig.get('method', '')}: state {out.reconfig.get('state')}"
                      + (f", pause {pause:.1f} ms" if isinstance(pause, (int, float)) else ""), highlight=False)
    color = "green" if out.ok else "red"
    console.print(f"[bold {color}]{out.status}[/]: {escape(out.message)}", highlight=False)
