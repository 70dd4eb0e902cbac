"""The main job (`make demo`): the whole loop on the embedded defaults, on this machine.

  1. start a worker process per node of scenarios/local and serve SmolLM2-135M over the
     OpenAI-compatible API, in the plan scenarios/local/plan-2stage.yaml;
  2. keep a small client load of streaming requests going;
  3. read an intent file, parse it (rules + the embedded LLM), plan, validate against the live plan;
  4. apply the plan live and print what happened: the spec, the plan diff, the validator report,
     the measured pause, TTFT/TPOT before/during/after, requests completed and identical.

It runs authenticated end to end, as a served deployment should: the service takes an API key
on /v1 and an admin token on /admin, both made fresh for this run; the client load sends the
key, and the agent reaches the service only through the admin API with the token.
"""
from __future__ import annotations

import json
import secrets
import statistics
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from policies import approve, load_cluster, load_plan, load_policy

from .remote import RemoteService, bearer

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "scenarios" / "local"
TOPICS = ["the sea", "bread", "trains", "winter", "bees", "the moon", "a garden", "chess", "owls", "snow",
          "a market", "rain"]


class _ShowPhases:
    """The service's admin API (a RemoteService) as the agent's executor, printing each
    reconfiguration phase as it completes."""

    def __init__(self, remote, console: Console):
        self.remote, self.console = remote, console
        self.window: tuple[float, float] | None = None     # when the reconfiguration ran
        self.shown: set[str] = set()

    @property
    def plan(self):
        return self.remote.plan

    def _show(self, rep: dict) -> None:
        for phase, secs in rep["phases_s"].items():
            if phase not in self.shown:
                self.shown.add(phase)
                self.console.print(f"  phase: {phase:<12} {1e3 * secs:8.1f} ms", highlight=False)

    def reconfigure(self, validated, method: str = "live"):
        t0 = time.perf_counter()
        self.shown.clear()
        try:
            return self.remote.reconfigure(validated, method=method, on_update=self._show)
        finally:
            self.window = (t0, time.perf_counter())


class ClientLoad:
    """`n` concurrent streaming chat clients over HTTP, each looping over prompts until stopped."""

    def __init__(self, url: str, model: str, n: int = 4, max_tokens: int = 24, api_key: str | None = None):
        self.url, self.model, self.n, self.max_tokens = url, model, n, max_tokens
        self.headers = bearer(api_key)
        self.records: list[dict] = []      # per request: start, token times, text, prompt
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(n)]

    def _client(self, i: int) -> None:
        k = i
        with httpx.Client(timeout=300, headers=self.headers) as h:
            while not self.stop.is_set():
                prompt = f"Write two sentences about {TOPICS[k % len(TOPICS)]}."
                k += self.n
                rec = {"prompt": prompt, "start": time.perf_counter(), "times": [], "text": ""}
                body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                        "max_tokens": self.max_tokens, "temperature": 0}
                try:
                    with h.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            self.errors.append(f"HTTP {r.status_code}: {r.read()[:200]!r}")
                            continue
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            d = json.loads(line[6:])
                            if "error" in d:
                                self.errors.append(d["error"]["message"])
                                break
                            delta = d["choices"][0]["delta"].get("content") if d["choices"] else None
                            if delta:
                                rec["times"].append(time.perf_counter())
                                rec["text"] += delta
                    rec["end"] = time.perf_counter()
                    self.records.append(rec)
                except httpx.HTTPError as e:
                    self.errors.append(str(e))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)

    def figures(self, t0: float, t1: float) -> dict:
        """TTFT / TPOT p50 (ms) of requests that started in [t0, t1)."""
        recs = [r for r in self.records if t0 <= r["start"] < t1 and r["times"]]
        ttft = [r["times"][0] - r["start"] for r in recs]
        tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in recs if len(r["times"]) > 1]
        return {"requests": len(recs), "ttft_ms": 1e3 * statistics.median(ttft) if ttft else None,
                "tpot_ms": 1e3 * statistics.median(tpot) if tpot else None}


def run_demo(intent_path: Path | None = None, console: Console | None = None, emulate_links: bool = False) -> int:
    import uvicorn

    from executor.api import create_app
    from executor.engine import EngineConfig, SamplingParams
    from executor.runtime import free_port
    from executor.service import Service
    from executor.weights import open_source

    from .agent import Agent, NeedsClarification
    from .intent_file import load_intent_file
    from .render import plan_table, print_outcome

    console = console or Console()
    intent_path = intent_path or LOCAL / "intents" / "maintenance.md"
    cluster, policy = load_cluster(LOCAL / "cluster.yaml"), load_policy(LOCAL / "policy.yaml")
    start_plan = load_plan(LOCAL / "plan-2stage.yaml").model_copy(update={"cluster_fingerprint": cluster.fingerprint()})
    console.rule("[bold]1. Serve SmolLM2-135M over worker processes")
    src = open_source(None)
    from policies import ModelSpec
    spec = ModelSpec.from_hf_config(src.config.to_hf(), name="smollm2-135m", dtype="fp32")
    validated = approve(start_plan, cluster, policy, start_plan.intent, spec)
    console.print(plan_table(validated.plan, cluster, "Serving plan"))
    t = time.perf_counter()
    svc = Service.launch(cluster, validated, None, EngineConfig(max_num_seqs=8, max_model_len=1024,
                                                                 num_kv_blocks=256), threads_per_worker=1,
                         policy=policy, emulate_links=emulate_links)
    port = free_port()
    # Credentials for this run only: /v1 takes the API key, /admin the admin token (never the key).
    api_key, admin_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    app = create_app(svc, api_keys=[api_key], admin_tokens=[admin_token])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    console.print(f"workers up and model loaded in {time.perf_counter() - t:.1f} s; OpenAI API at {url}/v1")
    anonymous = httpx.get(f"{url}/admin/plan", timeout=30).status_code
    with_key = httpx.get(f"{url}/admin/plan", headers=bearer(api_key), timeout=30).status_code
    console.print(f"authenticated: /v1 takes this run's API key, /admin its admin token "
                  f"(GET /admin/plan without a token: HTTP {anonymous}; with the API key: HTTP {with_key})")
    load = ClientLoad(url, "smollm2-135m", api_key=api_key)
    try:
        console.rule("[bold]2. Client load: 4 concurrent streaming chat requests")
        load.start()
        t_before = time.perf_counter()
        while len(load.records) < 4 and not load.errors:
            time.sleep(0.2)

        console.rule(f"[bold]3. Intent: {escape(str(intent_path.relative_to(ROOT)))}")
        f = load_intent_file(intent_path)
        console.print(escape(f.body.strip()))
        # The same path as `continuo apply`: parse (rules + the embedded LLM), plan, validate against
        # the live plan, and apply only through the agent's one gate, over the admin API with the token.
        executor = _ShowPhases(RemoteService(url, admin_token=admin_token), console)
        # No operator sits at this demo: in confirm mode it answers yes, and says so.
        agent = Agent(cluster, policy, executor=executor, model=spec, mode=f.front.get("mode", "auto"),
                      confirm=lambda out: console.print("confirm mode: the demo confirms") or True)
        console.rule("[bold]4. Plan, validate, apply live")
        t_parse = time.perf_counter()       # the "before" window ends here: parsing shares the cores
        try:
            out = agent.apply(f.body, defaults={k: f.front[k] for k in ("service", "model") if k in f.front})
        except NeedsClarification as e:
            console.print("[red]the intent leaves questions open:[/] " + escape("; ".join(e.parsed.questions)))
            return 1
        print_outcome(console, out, cluster)
        if out.reconfig:
            d = out.reconfig
            console.print(f"moved {escape(d['delta'])}; pause {d['pause_ms']:.1f} ms; {d['rounds']} pre-copy "
                          f"round(s); weights {d['bytes_moved']['weights'] / 1e6:.1f} MB, "
                          f"KV {d['bytes_moved']['kv'] / 1e6:.2f} MB")
        if not out.applied:
            return 1
        t_during, t_after = executor.window
        n_after = len(load.records)
        while len(load.records) < n_after + 4 and not load.errors:
            time.sleep(0.2)
    finally:
        load.finish()
    try:
        # Identical: each request's greedy text against the same prompt served again, quietly.
        ref = {}
        for r in load.records:
            if r["prompt"] not in ref:
                ids = svc.engine.chat_prompt([{"role": "user", "content": r["prompt"]}])
                ref[r["prompt"]] = svc.generate(ids, SamplingParams(max_tokens=load.max_tokens)).text
        identical = sum(r["text"] == ref[r["prompt"]] for r in load.records)
        table = Table(title="Client view (p50 over requests started in each window)")
        for c in ("window", "requests", "TTFT ms", "TPOT ms"):
            table.add_column(c, justify="right")
        for name, (a, b) in {"before": (t_before, t_parse), "during": (t_during, t_after),
                             "after": (t_after, float("inf"))}.items():
            fg = load.figures(a, b)
            table.add_row(name, str(fg["requests"]), "-" if fg["ttft_ms"] is None else f"{fg['ttft_ms']:.0f}",
                          "-" if fg["tpot_ms"] is None else f"{fg['tpot_ms']:.0f}")
        console.print(table)
        gaps = [b - a for r in load.records for a, b in zip(r["times"], r["times"][1:])]
        during = [b - a for r in load.records for a, b in zip(r["times"], r["times"][1:])
                  if b >= t_during and a <= t_after]
        if gaps and during:
            console.print(f"longest token gap during the reconfiguration / steady p50 gap: "
                          f"{max(during) / statistics.median(gaps):.2f}")
        console.print(f"requests completed: {len(load.records)}, failed: {len(load.errors)}, "
                      f"identical to a run without reconfiguration: {identical}/{len(load.records)}")
        for e in load.errors[:3]:
            console.print(f"  [red]{escape(e)}[/]")
        return 0 if not load.errors else 1
    finally:
        server.should_exit = True
        svc.close()
