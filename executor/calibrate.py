"""`continuo calibrate`: time the serving code's own stages on this node's device and write a profile.

    continuo calibrate [--model smollm2-135m] [--device cpu|cuda] [--threads N] [--kind CPU] [--node NAME]
                       [--corun N] [--out DIR] [--json]

What is timed is `LocalStage.forward` (executor/stage.py: the same model code, KV cache and
packing a worker serves with) on stages of a copy of the model's config cut to 6 layers, with
random weights of the real shapes (step time does not depend on the weights' values):

  mid1  = layers [1, 2)      one decoder layer, no ends
  mid4  = layers [1, 5)      four decoder layers
  first = layers [0, 1)      embedding + one layer
  last  = layers [5, 6)      one layer + final norm + LM head

  layer   = (mid4 - mid1) / 3          stage_ms = mid1 - layer
  embed   = first - mid1               head     = last - mid1

each at decode batch sizes x context lengths, prefill prompt lengths and head row counts. The two
stages of a difference run alternately and the median of the paired differences is kept (the dev
machines are shared: a busy neighbour then slows both sides of a pair alike), after a warm-up, in
PASSES rounds over the whole grid with the median of the rounds kept (a slow second of the host
then touches one round of a figure, not all of it: _passes). CUDA is synchronised around each run.
Differences are floored at a small positive value. It takes seconds for a small model on a CPU
core; the profile says how long it took.

With --corun N (CPU), the profile also gets the host's co-run tables: the decode step of mid4 at
batch 1, timed while 0, 1, ... N-1 helper processes decode their own copies without a break, over
the step alone, in alternating rounds (measure_corun); and the same for a 64-token prefill step.
Nodes that share a host (`host:` in the cluster file) are slowed by them when they compute at once
(policies/costmodel.py: host_slowdowns for decode, flow_shop for a wave's prefill).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from policies.cluster import GPU_KINDS
from policies.profile import Profile, default_dir, now_utc, save_profile, this_host

from .model import ModelConfig
from .stage import LocalStage, StepBatch, build_stage
from .weights import RandomSource

DECODE_BATCH = (1, 2, 4, 8)
DECODE_CONTEXT = (64, 256, 1024)
PREFILL_TOKENS = (8, 32, 128, 512)
HEAD_ROWS = (1, 2, 4, 8)
FLOOR_MS = 1e-3
# A worker's step starts after a wait on its socket; each timed run starts after as short a sleep, so
# that on a shared machine the scheduler treats the calibration as it treats a worker (a process that
# wakes up, not one that hogs the core), rather than measuring a busier share than serving gets.
IDLE_S = float(os.environ.get("CONTINUO_CALIBRATE_IDLE_S", "0.002"))
FAST_MS = 20.0       # a pair of steps quicker than this is timed `repeats` times ...
SLOW_MS = 200.0      # ... under this a third as often, above it once (long prompts, big batches are steady)
CUT_LAYERS = 6
PASSES = 3           # rounds over the whole grid (see _passes); `repeats` is split among them
CORUN_CONTEXT = 64   # the co-run table's decode steps: batch 1 at this context (memory-bound, the worst case)
CORUN_PREFILL_TOKENS = 64   # ... and the prefill table's: one prompt of this many tokens (compute-bound)
CORUN_ROUNDS = 12    # alternating rounds of the co-run table (see measure_corun) ...
CORUN_WINDOW_S = 0.15  # ... each timing one window of back-to-back steps per count at once


def model_config(name_or_path: str) -> ModelConfig:
    """The executor's config of a shipped model spec (policies/models) or a config.json / YAML path."""
    import yaml

    from policies.loading import InputError
    from policies.modelspec import builtin_models
    path = builtin_models().get(name_or_path.lower()) or Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise InputError(f"no such model: a shipped spec ({', '.join(sorted(builtin_models()))}) or a config path",
                         field="--model")
    d = yaml.safe_load(Path(path).read_text())
    try:
        return ModelConfig.from_hf(d)
    except KeyError as e:
        raise InputError(f"model config lacks {e.args[0]}", file=str(path), field=str(e.args[0])) from None


def gpu_kind(device: str) -> str:
    """The cluster file's GPU kind for a device: CPU, or the first known kind named in the CUDA device name."""
    if not device.startswith("cuda"):
        return "CPU"
    name = torch.cuda.get_device_name(torch.device(device)).upper().replace(" ", "")
    for kind in sorted(GPU_KINDS, key=len, reverse=True):
        if kind != "CPU" and kind.upper().replace("-", "") in name.replace("-", ""):
            return kind
    return name


class _Timer:
    """Times steps of two stages alternately, so that whatever else runs on the machine slows both
    alike and their difference (what a layer, the head or the embedding costs) stays steady."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def _once(self, fn, reset) -> float:
        time.sleep(IDLE_S)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ms = 1e3 * (time.perf_counter() - t0)
        reset()
        return ms

    def pair(self, a, b) -> tuple[float, float]:
        """(median ms of a, median of b - a over alternating runs) after one warm-up of each;
        a and b are (fn, reset). Slow points (warm-up over SLOW_MS) are timed fewer times."""
        wa, wb = self._once(*a), self._once(*b)
        n = self.repeats if wa + wb < FAST_MS else max(1, self.repeats // 3) if wa + wb < SLOW_MS else 1
        ta, diff = [], []
        for _ in range(n):
            x, y = self._once(*a), self._once(*b)
            ta.append(x)
            diff.append(y - x)
        return statistics.median(ta), statistics.median(diff)


def _hidden(cfg: ModelConfig, b: int, t: int, stage: LocalStage):
    return None if stage.model.is_first else \
        torch.randn(b, t, cfg.hidden_size, dtype=stage.cache.k.dtype, device=stage.cache.k.device)


def _decode(stage: LocalStage, cfg: ModelConfig, batch: int, ctx: int):
    """(fn, reset) of one decode step of `batch` rows, each with `ctx` tokens already in the cache."""
    reqs = list(range(batch))
    stage.free(reqs)
    for r in reqs:
        stage.cache.allocate(r, ctx + 1)
        stage.cache.lens[r] = ctx
    step = StepBatch(reqs, [ctx] * batch, [1] * batch, torch.zeros(batch, 1, dtype=torch.long))
    x = _hidden(cfg, batch, 1, stage)

    def reset():
        for r in reqs:
            stage.cache.lens[r] = ctx
    return (lambda: stage.forward(step, x)), reset


def _prefill(stage: LocalStage, cfg: ModelConfig, tokens: int, rows: int = 1):
    """(fn, reset) of one prefill step of `rows` prompts of `tokens` tokens from position 0."""
    reqs = list(range(rows))
    stage.free(reqs)
    step = StepBatch(reqs, [0] * rows, [tokens] * rows, torch.randint(0, cfg.vocab_size, (rows, tokens)))
    x = _hidden(cfg, rows, tokens, stage)
    return (lambda: stage.forward(step, x)), (lambda: stage.free(reqs))


def _corun_step(stage: LocalStage, cut: ModelConfig, phase: str):
    """(fn, reset) of the co-run table's step: decode at batch 1 (memory-bound) or one prompt's prefill."""
    if phase == "decode":
        return _decode(stage, cut, 1, CORUN_CONTEXT)
    if phase == "prefill":
        return _prefill(stage, cut, CORUN_PREFILL_TOKENS)
    raise ValueError(f"the co-run table is timed on a decode or a prefill step, not {phase!r}")


def _corun_helper(cut: ModelConfig, threads: int, dtype: str, seed: int, ready, go, stop,
                  phase: str = "decode") -> None:
    """A stage of its own (own weights: shared pages would share the cache too) running the step without
    a break while `go` is set, until told to stop: one of the others while measure_corun times n at once."""
    torch.set_num_threads(threads)
    blocks = -(-max(CORUN_CONTEXT + 1, CORUN_PREFILL_TOKENS) // 16) + 2
    stage = build_stage(RandomSource(cut, seed=seed), 1, 5, blocks, 16, getattr(torch, dtype))
    fn, reset = _corun_step(stage, cut, phase)
    fn()
    reset()
    ready.set()
    while not stop.is_set():
        if go.wait(0.05):
            fn()
            reset()


def _window_ms(fn, reset) -> float:
    """Mean ms of back-to-back steps over at least CORUN_WINDOW_S and 10 steps: a step that never
    sleeps, as a busy stage's, sees the scheduler's fair share, not a fresh slice after each wake-up."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        reset()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= CORUN_WINDOW_S and n >= 10:
            return 1e3 * elapsed / n


def measure_corun(cut: ModelConfig, stage: LocalStage, procs: int, threads: int, dtype: str,
                  rounds: int = CORUN_ROUNDS, log=None, phase: str = "decode") -> dict:
    """The co-run table: a 4-layer stage's decode step (batch 1), or with phase="prefill" its prefill
    of one CORUN_PREFILL_TOKENS-token prompt, timed with 1, 2, ... `procs` stages running that step at
    once on this host (the others in helper processes with their own weights, started once and
    switched on and off), over the step alone. CPU only: what nodes sharing one machine's cores do to
    each other. The two differ: a decode step is bound by memory bandwidth, which sharing slows more
    than the cores (2-core AMD EPYC VM, 3 at once, 2 runs each: decode 2.09x and 2.22x, prefill 1.67x
    and 1.70x).

    Each round times alone, then 2, ... `procs` at once, one window each; the figure for n is the
    sum of its windows over the sum of the alone windows of the same rounds. Alternating makes a
    host that drifts meanwhile slow both sides alike, and summing many windows averages over how the
    scheduler happens to pair the processes on the cores (3 on 2 cores: a window where ours has a
    core to itself reads 1x, one where it shares reads 2x). Measured on a 2-core AMD EPYC VM, side by
    side: 3 at once 2.02-2.31x over 5 runs this way, 1.26-1.95x over 4 timing each step after a short
    sleep, as before."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")         # a fork would copy this process's torch state mid-flight
    fn, reset = _corun_step(stage, cut, phase)
    helpers, stop = [], ctx.Event()
    try:
        for n in range(2, procs + 1):
            ready, go = ctx.Event(), ctx.Event()
            h = ctx.Process(target=_corun_helper, args=(cut, threads, dtype, 100 + n, ready, go, stop, phase),
                            daemon=True)
            h.start()
            helpers.append((h, go))
            if not ready.wait(120):
                raise RuntimeError(f"co-run helper {n - 1} did not start within 120 s")
        fn()                                    # warm-up
        reset()
        sums = [0.0] * procs                    # sums[n - 1]: ms of the windows with n at once
        for _ in range(rounds):
            for n in range(1, procs + 1):
                for i, (_, go) in enumerate(helpers):
                    if i < n - 1:
                        go.set()
                    else:
                        go.clear()
                time.sleep(0.02)                # the helpers switched on are decoding again
                sums[n - 1] += _window_ms(fn, reset)
    finally:
        stop.set()
        for h, go in helpers:
            go.set()
            h.join(10)
            if h.is_alive():
                h.kill()
    slow = [1.0] + [round(max(1.0, t / sums[0]), 3) for t in sums[1:]]
    if log:
        log(f"co-run slowdown ({phase}) " + ", ".join(f"{n} at once {x:.2f}x"
                                                     for n, x in zip(range(1, procs + 1), slow)))
    return {"procs": list(range(1, procs + 1)), "slowdown": slow}


def _passes(timer: _Timer, points: dict) -> dict:
    """{key: (median ms of a, median of b - a)} of each point's pair of steps, timed in PASSES rounds
    over all the points and the median of the rounds kept. A host that runs slower for a second (a
    VM's neighbour) slows a and b alike, so pairing cannot cancel it: it scales their difference.
    Spread over rounds, it touches one round of a point, not all of its samples. (Timed point by
    point, a whole row of the decode grid once came out 25% slow, and with it every plan's TPOT.)"""
    rounds: dict = {key: [] for key in points}
    for _ in range(PASSES):
        for key, make in points.items():
            rounds[key].append(timer.pair(*make()))
    return {key: (statistics.median(a for a, _ in r), statistics.median(d for _, d in r)) for key, r in rounds.items()}


def calibrate(config: ModelConfig, model_name: str, device: str = "cpu", threads: int | None = None,
              kind: str | None = None, node: str | None = None, dtype: str = "float32", repeats: int = 7,
              decode_batch=DECODE_BATCH, decode_context=DECODE_CONTEXT, prefill_tokens=PREFILL_TOKENS,
              head_rows=HEAD_ROWS, log=None, corun: int = 0) -> Profile:
    """Measure a profile of `config` on `device` (see the module docstring for what is timed).
    corun >= 2: also the co-run table with up to that many stages decoding at once (CPU only)."""
    if corun and torch.device(device).type != "cpu":
        raise ValueError(f"the co-run slowdown is measured on CPU hosts only, not on {device}")
    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cut = dataclasses.replace(config, num_layers=CUT_LAYERS, max_position=max(config.max_position,
                                                                            max(decode_context) + 2, max(prefill_tokens),
                                                                            CORUN_PREFILL_TOKENS))
    src = RandomSource(cut, seed=0)
    need = max(decode_batch) * (max(decode_context) + 1) + max(head_rows) * max(prefill_tokens)
    blocks = -(-need // 16) + 8
    tdtype = getattr(torch, dtype)
    stages = {name: build_stage(src, a, b, blocks, 16, tdtype, dev)
              for name, (a, b) in {"mid1": (1, 2), "mid4": (1, 5), "first": (0, 1), "last": (5, 6)}.items()}
    timer = _Timer(dev, max(2, -(-repeats // PASSES)))
    floor = lambda v: max(FLOOR_MS, v)  # noqa: E731
    mid1, mid4 = stages["mid1"], stages["mid4"]
    c0 = decode_context[0]
    # every figure as a pair of steps to difference, built when timed (a stage holds one step's cache)
    points = {("decode", b, c): (lambda b=b, c=c: (_decode(mid1, cut, b, c), _decode(mid4, cut, b, c)))
              for b in decode_batch for c in decode_context}
    points.update({("prefill", t): (lambda t=t: (_prefill(mid1, cut, t), _prefill(mid4, cut, t)))
                   for t in prefill_tokens})
    points.update({("head", r): (lambda r=r: (_decode(mid1, cut, r, c0), _decode(stages["last"], cut, r, c0)))
                   for r in head_rows})
    points["embed"] = lambda: (_decode(mid1, cut, 1, c0), _decode(stages["first"], cut, 1, c0))
    got = _passes(timer, points)
    layer_dec = [[floor(got["decode", b, c][1] / 3) for c in decode_context] for b in decode_batch]
    # what a one-layer stage costs beyond its layer, at the smallest step
    one, three = got["decode", decode_batch[0], c0]
    stage_ms = floor(one - three / 3)
    layer_pre = [floor(got["prefill", t][1] / 3) for t in prefill_tokens]
    head = [floor(got["head", r][1]) for r in head_rows]
    embed = floor(got["embed"][1])
    if log:
        log(f"layer decode {layer_dec[0][0]:.3f} ms (batch 1, ctx {c0}), head {head[0]:.3f} ms, "
            f"stage {stage_ms:.3f} ms")
    table = pre_table = None
    if corun >= 2:
        table = measure_corun(cut, mid4, corun, torch.get_num_threads(), dtype, log=log)
        pre_table = measure_corun(cut, mid4, corun, torch.get_num_threads(), dtype, log=log, phase="prefill")
    return Profile(model=model_name, kind=kind or gpu_kind(str(dev)), node=node, device=str(dev),
                   threads=torch.get_num_threads() if dev.type == "cpu" else None, dtype=dtype, host=this_host(),
                   measured_at=now_utc(), seconds=round(time.perf_counter() - t_start, 2),
                   stage_ms=round(stage_ms, 4), embed_ms=round(embed, 4),
                   head={"rows": list(head_rows), "ms": [round(h, 4) for h in head]},
                   prefill={"tokens": list(prefill_tokens), "layer_ms": [round(v, 4) for v in layer_pre]},
                   decode={"batch": list(decode_batch), "context": list(decode_context),
                           "layer_ms": [[round(v, 4) for v in row] for row in layer_dec]},
                   corun=table, corun_prefill=pre_table)


def _existing(model_name: str, kind: str, node: str | None, folder) -> Path | None:
    from policies.profile import load_profiles
    for p in load_profiles(folder).profiles:
        if p.model == model_name and (p.node == node if node and p.node else p.kind == kind and not p.node):
            return Path(folder or default_dir()) / p.file_name()
    return None


def ensure_profile(config: ModelConfig, model_name: str, device: str, threads: int | None = None,
                   kind: str | None = None, node: str | None = None, folder: str | Path | None = None,
                   log=print, dtype: str = "float32", **grid) -> Path:
    """Calibrate and save unless a profile for this model and node (or its kind) is already in the
    folder; returns the profile's path. Several workers of one kind starting at once on one host
    calibrate once: the first takes a lock file in the folder, the others wait for it and then find
    its profile (and their timings do not disturb its measurement). `grid`: calibrate()'s tables."""
    import fcntl
    k = kind or gpu_kind(device)
    found = _existing(model_name, k, node, folder)
    if found is not None:
        return found
    d = Path(folder) if folder is not None else default_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".calibrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes, also if we die
        found = _existing(model_name, k, node, folder)
        if found is not None:
            return found
        prof = calibrate(config, model_name, device, threads, k, node, dtype=dtype, log=log, **grid)
        return save_profile(prof, d)


# At worker start the grid is smaller than `continuo calibrate`'s: the sizes an engine with its default
# limits reaches (16 running requests, 512-token prefill chunks), three timings per point. It takes a
# few seconds for SmolLM2 on one CPU thread; `continuo calibrate` measures a finer grid when wanted.
START_GRID = dict(decode_batch=(1, 4, 16), decode_context=(64, 512), prefill_tokens=(32, 128, 512),
                  head_rows=(1, 4, 16), repeats=3)
AT_START_ENV = "CONTINUO_CALIBRATE_AT_START"    # 0 / false / no / off: a worker never calibrates itself


def model_name_of(config: ModelConfig) -> str | None:
    """The shipped model spec whose shape `config` has (profiles are per model name), else None."""
    from policies.modelspec import builtin_models
    shape = lambda c: (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,  # noqa: E731
                       c.num_kv_heads, c.head_dim)
    for name in sorted(builtin_models()):
        if shape(model_config(name)) == shape(config):
            return name
    return None


def at_worker_start(config: ModelConfig, device: str, threads: int | None, node: str, dtype: str = "float32",
                    log=None) -> Path | None:
    """The worker's hook after it loads a stage: make sure a profile of this model on this node's
    kind exists (calibrating it now if not, on this device, at the worker's thread count). Skipped,
    returning None, when $CONTINUO_CALIBRATE_AT_START says so or the model is no shipped spec (a
    profile is found by the plan's model name, which the worker only knows for those)."""
    if os.environ.get(AT_START_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    name = model_name_of(config)
    if name is None:
        if log:
            log(f"{node}: no calibration at start: the model matches no shipped spec")
        return None
    from policies.loading import InputError
    t0 = time.perf_counter()
    try:
        path = ensure_profile(config, name, device, threads, node=None, log=log, dtype=dtype, **START_GRID)
    except (InputError, OSError, MemoryError, torch.cuda.OutOfMemoryError) as e:
        # the stage is loaded and can serve: a calibration that cannot run (a bad profile file in the
        # folder, a read-only folder, no memory to spare) leaves the cost model on datasheet figures
        if log:
            log(f"{node}: no calibration at start: {type(e).__name__}: {e}")
        return None
    finally:
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    if log:
        log(f"{node}: profile of {name} on this node's kind: {path} ({time.perf_counter() - t0:.1f} s)")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="continuo calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="shipped model spec name or config path")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's; match the workers')")
    ap.add_argument("--kind", default=None, help="the cluster file's gpu kind (default: from the device)")
    ap.add_argument("--node", default=None, help="a profile for this node only (default: for its kind)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--corun", type=int, default=0, metavar="N",
                    help="also measure how much slower a decode step gets with up to N stages decoding at once "
                         "on this host (CPU; for nodes that share it: `host:` in the cluster file)")
    ap.add_argument("--out", default=None, help=f"profile folder (default: {default_dir()})")
    ap.add_argument("--json", action="store_true", help="print the profile as JSON")
    a = ap.parse_args(argv)
    from policies.loading import InputError
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("torch sees no CUDA device here (a CPU build of torch?)", field="--device")
    if a.repeats < 1:
        raise InputError(f"must be at least 1, not {a.repeats}", field="--repeats")
    if a.corun < 0 or a.corun == 1 or a.corun > 16:
        raise InputError(f"must be 0 (not measured) or 2-16 stages at once, not {a.corun}", field="--corun")
    if a.corun and not a.device.startswith("cpu"):
        raise InputError(f"is measured on CPU hosts only, not on {a.device}", field="--corun")
    cfg = model_config(a.model)
    name = Path(a.model).stem if ("/" in a.model or a.model.endswith((".json", ".yaml"))) else a.model.lower()
    prof = calibrate(cfg, name, a.device, a.threads or None, a.kind, a.node, a.dtype, a.repeats,
                     log=lambda m: print(m, file=sys.stderr), corun=a.corun)
    path = save_profile(prof, a.out)
    if a.json:
        print(json.dumps(prof.model_dump(mode="json")))
    else:
        print(f"profile of {prof.where()} in {prof.seconds:.1f} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
