"""`continuo bench faults`: live reconfigurations under streaming load with a fault injected in
each phase (preparing, pre-copying, switching, cleaning), on a tiny random-weight model over the
local scenario's three worker processes (edge-a, edge-b, cloud-1).

    python -m executor.bench_faults [--json] [--reconfigs N]

The service flips between two approved plans, A = edge-a 0-2 | edge-b 3-6 and B = edge-a 0-1 |
cloud-1 2-6; the fault hits the destination: the node that is idle in the old plan and gains
layers in the new one. Each case runs its own closed loop of greedy streaming requests
(ignore_eos) while one faulted reconfiguration runs and, when the service still serves, one
fault-free reconfiguration after it (the recovery check: the destination takes part again).

Faults (what is real, what is simulated):
  kill     real: SIGKILL of the destination worker on entering the phase (a fresh service per case,
           since a killed worker cannot rejoin its gloo groups)
  cut      simulated: the destination's next bulk receive raises ConnectionResetError as a reset
           connection would (the socket itself stays up)
  oom      real: the destination's address-space limit (RLIMIT_AS, set from the driver with
           prlimit) is lowered to what it maps now, so its next allocations fail in the allocator
  timeout  real: SIGSTOP of the destination for longer than the reconfiguration's transfer timeout,
           SIGCONT afterwards

The transfer timeout is calibrated at the start (unless given): four times the longest of two
fault-free reconfigurations under the same load, at least 5 s. A fixed 1.5 s once aborted most cases
on a busy machine before the fault's phase was reached, so they measured a timeout, not the fault;
each case says whether its fault fired, and `faults_fired` counts them.

Every request is classified against a one-process reference run of the same prompt:
identical (greedy tokens equal), altered (completed but different: target 0), failed with a clear
error (it names a node or says why), failed unclear, lost (never ended within a generous timeout:
target 0). "Old plan serves" is checked after every fault before the commit: same plan, every
live worker holds its old layers, and a probe request comes back token-identical.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from policies import ModelSpec, PlacementPlan, Stage, approve, load_cluster, load_policy

from .engine import Engine, EngineConfig, SamplingParams
from .migration import InjectFault
from .model import ModelConfig
from .reconfig import ReconfigurationError, ReconfigurationTimeout
from .service import Listener, Service, ServiceUnavailable
from .stage import build_stages
from .weights import RandomSource

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=7, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position=512, eos_token_ids=())
ROOT = Path(__file__).resolve().parent.parent
PLAN_A = [("edge-a", 0, 2), ("edge-b", 3, 6)]
PLAN_B = [("edge-a", 0, 1), ("cloud-1", 2, 6)]
NODES = ("edge-a", "edge-b", "cloud-1")
PHASES = ("preparing", "pre-copying", "switching", "cleaning")
# where each fault makes sense: a cut needs a transfer (none runs in cleanup); an allocation failure
# needs an allocation (the new stage in preparing, received KV in pre-copying and in the switch)
KINDS = {"kill": PHASES, "cut": PHASES[:3], "oom": PHASES[:3], "timeout": PHASES}
REAL = {"kill": "real (SIGKILL)", "cut": "simulated (next bulk receive drained, then ConnectionResetError)",
        "oom": "real (RLIMIT_AS lowered with prlimit)", "timeout": "real (SIGSTOP past the transfer timeout)"}
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40)), [100] * 17, [5, 6], [42, 43, 44, 45], [7] * 3, [8, 9]]
LENGTHS = [24 + (i * 11) % 40 for i in range(len(PROMPTS))]
EC = EngineConfig(max_num_seqs=8, max_model_len=300, num_kv_blocks=160, block_size=16)
LOST_AFTER_S = 120.0
# A node that has not committed this long after the switch began is not waited for: the switch aborts
# and the old plan serves on (a healthy commit here takes ~10 ms; the stalled one is stopped for stop_s).
SWITCH_TIMEOUT_S = 1.0


def _validated(stages, current=None):
    cluster = load_cluster(ROOT / "scenarios/local/cluster.yaml")
    policy = load_policy(ROOT / "scenarios/local/policy.yaml")
    spec = ModelSpec.from_hf_config(CFG.to_hf(), name="tiny", dtype="fp32")
    plan = PlacementPlan(model="tiny", data_class="public", cluster_fingerprint=cluster.fingerprint(),
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
    return approve(plan, cluster, policy, None, spec, current=current)


def reference(src) -> list[list[int]]:
    """Greedy tokens of one in-process stage for every prompt (ignore_eos: shorter runs are prefixes)."""
    eng = Engine(build_stages(src, [0, CFG.num_layers], EC.num_kv_blocks, EC.block_size), EC)
    return [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_tokens=max(LENGTHS), ignore_eos=True))]


def _stages(svc) -> list[tuple[str, int, int]]:
    return [(s.node, s.first_layer, s.last_layer) for s in svc.plan.plan.stages]


def _layers(svc) -> dict[str, list]:
    return {n["node"]: n["layers"] for n in svc.node_states() if n["state"] == "ok"}


class Load:
    """A closed loop of `concurrency` greedy streaming requests cycling over PROMPTS until stopped
    (the shape of bench_reconfig.Load); keeps each submission's outcome."""

    def __init__(self, svc: Service, concurrency: int, offset: int = 0):
        self.svc, self.conc, self.offset = svc, concurrency, offset
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcome: dict[int, tuple] = {}     # j -> (prompt index, output, error)
        self.started: dict[int, int] = {}       # j -> prompt index, for every accepted submission
        self.refused: list[str] = []            # submissions the service refused (not requests)
        self.next = 0

    def _submit(self) -> None:
        with self.lock:
            if self.stop.is_set():
                return
            j, self.next = self.next, self.next + 1
        i = (j + self.offset) % len(PROMPTS)
        try:
            self.svc.submit(PROMPTS[i], SamplingParams(max_tokens=LENGTHS[i], ignore_eos=True),
                            Listener(on_done=lambda out, err, j=j, i=i: self._done(j, i, out, err)))
        except (ServiceUnavailable, RuntimeError, TimeoutError) as e:
            self.refused.append(str(e))
            return
        with self.lock:
            self.started.setdefault(j, i)

    def _done(self, j, i, out, err) -> None:
        with self.lock:
            self.started.setdefault(j, i)
            self.outcome[j] = (i, out, err)
        if not self.stop.is_set():
            threading.Thread(target=self._submit, daemon=True).start()

    def start(self) -> None:
        for _ in range(self.conc):
            self._submit()

    def finish(self, timeout: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(j in self.outcome for j in self.started):
                    return
            time.sleep(0.05)


def _clear(err: str) -> bool:
    """An error a client can act on: it names the node, or says what timed out / was refused."""
    return any(n in err for n in NODES) or any(w in err for w in ("timed out", "unavailable", "refused"))


@dataclass
class Case:
    kind: str
    phase: str
    direction: str = ""
    state: str | None = None          # the faulted reconfiguration's end state (done / aborted / hung / ...)
    error: str | None = None
    fired: bool = False               # the fault was injected (its phase was reached)
    kept_old_plan: bool | None = None  # pre-commit outcome: the old plan still serves, unchanged
    serving_after: bool = False       # the service takes and answers requests after the fault
    recovered: bool | None = None     # the fault-free reconfiguration after it was done
    reconfigurations: int = 0
    requests: dict = field(default_factory=lambda: {"identical": 0, "altered": 0, "failed_clear": 0,
                                                    "failed_unclear": 0, "lost": 0})
    errors: list = field(default_factory=list)
    worst_gap_ms: float = 0.0
    seconds: float = 0.0

    @property
    def aborted_cleanly(self) -> bool:
        return self.state == "aborted" and bool(self.error) and _clear(self.error) and bool(self.kept_old_plan)


class Fault:
    """Injects one fault into the destination worker when the reconfiguration enters `phase`."""

    def __init__(self, svc: Service, kind: str, phase: str, node: str, stop_s: float):
        self.svc, self.kind, self.phase, self.node, self.stop_s = svc, kind, phase, node, stop_s
        self.proc = svc.runtime.procs[node]
        self.fired = False
        self.old_limit = None
        self.timer: threading.Timer | None = None

    def on_event(self, rep) -> None:
        if self.fired and rep.state != self.phase and self.kind == "oom":
            self.restore()          # the allocation fault lasts the phase it was injected in
        if rep.state != self.phase or self.fired:
            return
        self.fired = True
        pid = self.proc.pid
        if self.kind == "kill":
            os.kill(pid, signal.SIGKILL)
            # reaped before the reconfiguration goes on (a big process takes seconds to exit on a
            # busy machine: waiting 5 s once raised here, inside the engine loop, in CI)
            self.proc.wait(60)
        elif self.kind == "timeout":
            os.kill(pid, signal.SIGSTOP)
            self.timer = threading.Timer(self.stop_s, self.resume)
            self.timer.start()
        elif self.kind == "cut":
            self.svc.runtime.call(self.node, InjectFault("cut"))      # we are on the engine thread
        elif self.kind == "oom":
            self.old_limit = resource.prlimit(pid, resource.RLIMIT_AS)
            resource.prlimit(pid, resource.RLIMIT_AS, (_vm_size(pid), self.old_limit[1]))

    def resume(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def restore(self) -> None:
        if self.old_limit is not None and self.proc.poll() is None:
            try:
                resource.prlimit(self.proc.pid, resource.RLIMIT_AS, self.old_limit)
            except ProcessLookupError:
                pass
        self.old_limit = None

    def undo(self) -> None:
        if self.timer is not None:
            self.timer.join()
        self.restore()
        if self.kind == "cut" and self.proc.poll() is None and self.node not in self.svc.runtime.dead:
            try:
                self.svc.loop.call(lambda: self.svc.runtime.call(self.node, InjectFault("clear")), timeout=30)
            except Exception:
                pass


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmSize for {pid}")


class Bench:
    def __init__(self, src, ref, concurrency: int = 6, transfer_timeout_s: float | None = None,
                 stop_s: float | None = None, log=print):
        self.src, self.ref, self.conc = src, ref, concurrency
        self.transfer_timeout_s, self.stop_s, self.log = transfer_timeout_s, stop_s, log
        self.svc: Service | None = None
        self.dirty = False          # the last case left a worker unable to reconfigure: start afresh
        self.launches = 0
        self.offset = 0

    def service(self) -> Service:
        """The running service, or a fresh one when the last case left a worker dead or the loop broken."""
        svc = self.svc
        if svc is not None and (self.dirty or svc.loop.broken is not None or svc.runtime.dead or
                                any(v != "ok" for v in svc.runtime.health().values())):
            svc.close()
            svc = self.svc = None
        if svc is None:
            # glibc: every allocation of 16 KiB or more is its own mapping, so it counts against the
            # address-space limit the oom fault lowers (small heap blocks would come from arenas
            # mapped long before). Inherited by the worker processes.
            os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "16384")
            self.dirty = False
            svc = self.svc = Service.launch(load_cluster(ROOT / "scenarios/local/cluster.yaml"), _validated(PLAN_A),
                                            self.src, EC, threads_per_worker=1)
            self.launches += 1
        return svc

    def close(self) -> None:
        if self.svc is not None:
            self.svc.close()
            self.svc = None

    def calibrate(self, floor_s: float = 5.0) -> None:
        """Set the transfer timeout (and the stall that must outlast it) from two fault-free
        reconfigurations under this bench's load, unless they were given."""
        if self.transfer_timeout_s is None:
            svc = self.service()
            load = Load(svc, self.conc)
            load.start()
            took = []
            try:
                for target in (PLAN_B, PLAN_A):
                    t = time.perf_counter()
                    state, err = self._reconfigure(svc, target)
                    if state != "done":
                        raise RuntimeError(f"the fault-free calibration reconfiguration ended {state}: {err}")
                    took.append(time.perf_counter() - t)
            finally:
                load.finish(LOST_AFTER_S)
            self.transfer_timeout_s = max(floor_s, 4 * max(took))
            self.log(f"transfer timeout {self.transfer_timeout_s:.1f} s (4 x the slowest fault-free "
                     f"reconfiguration, {max(took):.2f} s, at least {floor_s:g} s)")
        if self.stop_s is None:
            self.stop_s = self.transfer_timeout_s + 1.5

    def _probe(self, svc) -> bool:
        try:
            out = svc.generate(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True), timeout=60)
        except Exception:
            return False
        return out.token_ids == self.ref[0][:8]

    def _reconfigure(self, svc, stages, **kw):
        try:
            rep = svc.reconfigure(_validated(stages, current=svc.plan.plan), timeout=90, **kw)
            return rep.state, rep.error
        except ReconfigurationTimeout as e:
            return "hung", str(e)
        except (ReconfigurationError, ServiceUnavailable) as e:
            return "refused", str(e)

    def case(self, kind: str, phase: str) -> Case:
        t0 = time.perf_counter()
        if kind == "oom":
            # an allocation fault bites only on a destination that never held a stage: one that did
            # (an earlier case, its recovery, the calibration) keeps the freed heap and builds the new
            # stage in it without a new mapping. So each allocation fault starts on fresh workers.
            self.dirty = True
        svc = self.service()
        old = _stages(svc)
        new = PLAN_B if old == PLAN_A else PLAN_A
        dest = next(n for n, _, _ in new if n not in {m for m, _, _ in old})
        c = Case(kind, phase, f"{'A->B' if new == PLAN_B else 'B->A'} (destination {dest})")
        before = _layers(svc)
        self.offset += 3
        load = Load(svc, self.conc, self.offset)
        load.start()
        time.sleep(0.15)                            # requests decoding when the reconfiguration starts
        fault = Fault(svc, kind, phase, dest, self.stop_s) if kind != "none" else None
        c.state, c.error = self._reconfigure(svc, new, on_event=fault.on_event if fault else None,
                                             transfer_timeout_s=self.transfer_timeout_s,
                                             switch_timeout_s=SWITCH_TIMEOUT_S)
        c.reconfigurations += c.state != "refused"
        if fault:
            fault.undo()
            c.fired = fault.fired
        alive = svc.loop.broken is None
        if c.state == "aborted":
            after = _layers(svc) if alive else {}
            c.kept_old_plan = alive and _stages(svc) == old and \
                all(after.get(n) == v for n, v in before.items() if n in after) and self._probe(svc)
        c.serving_after = alive and self._probe(svc)
        if c.serving_after and not svc.runtime.dead:
            # recovery: a fault-free live reconfiguration through the same destination
            target = PLAN_B if _stages(svc) == PLAN_A else PLAN_A
            state, err = self._reconfigure(svc, target)
            c.reconfigurations += state != "refused"
            c.recovered = state == "done"
            if not c.recovered:
                self.dirty = True
                c.errors.append(f"recovery reconfiguration {state}: {err}")
        load.finish(LOST_AFTER_S)
        for j, i in sorted(load.started.items()):
            if j not in load.outcome:
                c.requests["lost"] += 1
                continue
            _, out, err = load.outcome[j]
            if err:
                c.requests["failed_clear" if _clear(err) else "failed_unclear"] += 1
                if len(c.errors) < 3:
                    c.errors.append(err.splitlines()[0][:160])
            elif out.token_ids == self.ref[i][:LENGTHS[i]]:
                c.requests["identical"] += 1
            else:
                c.requests["altered"] += 1
            if out is not None:
                c.worst_gap_ms = max(c.worst_gap_ms, 1e3 * max(out.gaps, default=0.0))
        c.seconds = time.perf_counter() - t0
        return c


def plan_cases(reconfigs: int) -> list[tuple[str, str]]:
    """Every (kind, phase) pair, cycled (so repeats of one pair do not run back to back); `run` stops
    once the faulted plus recovery reconfigurations reach `reconfigs` and every pair ran once."""
    pairs = [(k, p) for k, ps in KINDS.items() for p in ps]
    return [pr for _ in range(max(1, reconfigs)) for pr in pairs]


def summarize(cases: list[Case], launches: int) -> dict:
    def fold(cs: list[Case]) -> dict:
        req = {k: sum(c.requests[k] for c in cs) for k in cases[0].requests} if cs else {}
        pre = [c for c in cs if c.phase != "cleaning"]
        return {"cases": len(cs), "reconfigurations": sum(c.reconfigurations for c in cs),
                "faults_fired": sum(c.fired for c in cs),
                "aborted_cleanly": sum(c.aborted_cleanly for c in cs),
                "aborted": sum(c.state == "aborted" for c in cs),
                "completed": sum(c.state == "done" for c in cs),
                "hung": sum(c.state == "hung" for c in cs),
                "old_plan_kept_pre_switch": f"{sum(bool(c.kept_old_plan) or c.state == 'done' for c in pre)}/{len(pre)}",
                "serving_after": f"{sum(c.serving_after for c in cs)}/{len(cs)}",
                "recovered": f"{sum(bool(c.recovered) for c in cs)}/{sum(c.recovered is not None for c in cs)}",
                **req, "worst_gap_ms": round(max((c.worst_gap_ms for c in cs), default=0.0), 1)}
    out: dict = {"kinds": {}, "by_phase": {}}
    for k in KINDS:
        ks = [c for c in cases if c.kind == k]
        if ks:
            out["kinds"][k] = {"fault": REAL[k], **fold(ks)}
            out["by_phase"][k] = {p: fold([c for c in ks if c.phase == p]) for p in KINDS[k]
                                  if any(c.phase == p for c in ks)}
    tot = fold(cases)
    out.update({"cases": tot["cases"], "faults_fired": tot["faults_fired"],
                "reconfigurations": tot["reconfigurations"], "lost": tot["lost"], "altered": tot["altered"],
                "failed_clear": tot["failed_clear"], "failed_unclear": tot["failed_unclear"],
                "identical": tot["identical"], "hung": tot["hung"], "aborted_cleanly": tot["aborted_cleanly"],
                "service_launches": launches})
    out["errors_seen"] = sorted({e for c in cases for e in c.errors})[:20]
    return out


def run(as_json: bool = False, reconfigs: int = 50, concurrency: int = 6, kinds: list[str] | None = None,
        phases: list[str] | None = None, transfer_timeout_s: float | None = None, stop_s: float | None = None,
        cases: list[tuple[str, str]] | None = None, quiet: bool = False) -> dict:
    from rich.console import Console
    from rich.table import Table
    console = Console(stderr=as_json, quiet=quiet, width=200)
    torch.set_num_threads(1)
    src = RandomSource(CFG, seed=5)
    ref = reference(src)
    todo = cases or [(k, p) for k, p in plan_cases(reconfigs)
                     if (not kinds or k in kinds) and (not phases or p in phases)]
    bench = Bench(src, ref, concurrency, transfer_timeout_s, stop_s, log=console.print)
    done: list[Case] = []
    t0 = time.perf_counter()
    try:
        bench.calibrate()
        for n, (kind, phase) in enumerate(todo):
            if cases is None and sum(c.reconfigurations for c in done) >= reconfigs and \
                    {(c.kind, c.phase) for c in done} >= set(todo):
                break
            c = bench.case(kind, phase)
            done.append(c)
            console.print(f"[{n + 1}] {kind:8s} {phase:12s} {c.direction:26s} -> {c.state}"
                          f"{' (not fired)' if not c.fired else ''}; old plan kept: {c.kept_old_plan}; serving: "
                          f"{c.serving_after}; recovered: {c.recovered}; {c.requests}; {c.seconds:.1f} s"
                          + (f"\n      error: {c.error.splitlines()[0][:150]}" if c.error else "")
                          + "".join(f"\n      {e}" for e in c.errors), markup=False, highlight=False)
    finally:
        bench.close()
    res = summarize(done, bench.launches)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["transfer_timeout_s"] = round(bench.transfer_timeout_s, 2)
    t = Table(title="Faults during live reconfiguration under streaming load (tiny random model, 3 CPU workers)")
    cols = ("kind", "fault", "reconfigs", "aborted cleanly", "completed", "identical", "failed (clear)",
            "failed (unclear)", "lost", "altered", "old plan kept (pre-switch)", "serving after", "recovered")
    for col in cols:
        t.add_column(col, justify="right" if col not in ("kind", "fault") else "left")
    for k, r in res["kinds"].items():
        t.add_row(k, r["fault"], str(r["reconfigurations"]), f"{r['aborted_cleanly']}/{r['cases']}",
                  str(r["completed"]), str(r["identical"]), str(r["failed_clear"]), str(r["failed_unclear"]),
                  str(r["lost"]), str(r["altered"]), r["old_plan_kept_pre_switch"], r["serving_after"],
                  r["recovered"])
    console.print(t)
    p = Table(title="By phase: end state of the faulted reconfiguration / old plan kept / serving after")
    p.add_column("kind")
    for ph in PHASES:
        p.add_column(ph)
    for k, by in res["by_phase"].items():
        p.add_row(k, *[(f"{by[ph]['aborted']}a {by[ph]['completed']}d {by[ph]['hung']}h; "
                        f"kept {by[ph]['old_plan_kept_pre_switch']}; serving {by[ph]['serving_after']}; "
                        f"lost {by[ph]['lost']} altered {by[ph]['altered']}") if ph in by else "-" for ph in PHASES])
    console.print(p)
    console.print(f"total: {res['faults_fired']}/{res['cases']} faults fired in their phase, "
                  f"{res['reconfigurations']} reconfigurations, {res['lost']} requests lost, "
                  f"{res['altered']} silently altered, {res['failed_clear']} failed with a clear error, "
                  f"{res['failed_unclear']} failed unclearly, {res['hung']} hung; {bench.launches} service launches, "
                  f"{res['seconds']} s")
    if as_json:
        print(json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor.bench_faults", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--reconfigs", type=int, default=50, help="at least this many reconfigurations (default 50)")
    ap.add_argument("--kinds", help="comma-separated subset of " + ",".join(KINDS))
    ap.add_argument("--phases", help="comma-separated subset of " + ",".join(PHASES))
    a = ap.parse_args(argv)
    res = run(as_json=a.json, reconfigs=a.reconfigs, kinds=a.kinds.split(",") if a.kinds else None,
              phases=a.phases.split(",") if a.phases else None)
    return 0 if res["lost"] == 0 and res["altered"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
