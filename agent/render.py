"""Rich rendering of plans, reports and estimates, shared by the CLI commands."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from policies import Cluster, PlacementPlan, Report


def plan_table(plan: PlacementPlan, cluster: Cluster, title: str = "Placement plan") -> Table:
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
