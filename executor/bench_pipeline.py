"""The pipeline figures of `continuo bench engine`: k stages over k worker processes (one thread
each) vs the 1-stage engine in one process, same model, same requests, side by side in one run.

Sides (each the same prompts, greedy, `concurrency` requests at once):
  stage1_t1        one process, 1 torch thread              (the per-core baseline)
  stage1_tN        one process, all cores' threads          (what one process makes of the machine)
  pipeline2_g1     2 workers, 1 thread each, one group: stages one after the other per step (the
                   engine before groups in flight; the control)
  pipeline2        2 workers, 1 thread each, 2 groups in flight (Engine.groups)
  pipeline3        3 workers, 1 thread each, 3 groups in flight
Layers are split by measured time (each layer's decode time in this process, the embedding with the
first layer, norm + LM head with the last), not by layer count: the LM head of a 49k vocabulary weighs
about as much as 8 of SmolLM2's layers.

What overlap can win at most (`pipeline{k}_ceiling`), from decode step times measured in the same run:
one 1-thread process steps all C rows through every layer (full(C)); k stages with k groups in flight
each step C/k rows through their layers, so the pipeline's period is its slowest stage at C/k rows:
    ceiling = full(C) / (k * max_i stage_i(C/k))
`alone`: the stage times measured in this process with nothing else running; `in_workers`: each
stage's compute time in its worker while the pipeline ran (telemetry records, decode steps), i.e.
with the other stages busy on the other cores at the same time. Where a decode step reads every
weight whatever its rows (memory-bound), full(C) ~ full(C/k) and no overlap can beat ~1x: the k
stages' gain is then memory for k times the KV (seats), not tokens per second at the same seats.
"""
from __future__ import annotations

import statistics
import time

import torch

from .engine import Engine, EngineConfig, RequestOutput, SamplingParams
from .runtime import NodeRuntime
from .stage import build_stages
from .transport import STEP_RECORD
from .weights import open_source

NODES = ("edge-a", "edge-b", "cloud-1")
PROMPTS = ["Write a short poem about the sea.", "Explain photosynthesis to a child.",
           "List five uses of a paperclip.", "What is the capital of Japan and why is it famous?",
           "Describe a sunrise over mountains.", "Give three tips for learning Python.",
           "Summarise the plot of a detective story.", "Why do cats purr?"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _figures(outs: list[RequestOutput], wall: float) -> dict:
    toks = sum(len(o.token_ids) for o in outs)
    ttft = [o.ttft for o in outs if o.ttft is not None]
    tpot = [o.tpot for o in outs if o.tpot is not None]
    return {"tok_s": toks / wall, "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * _pct(ttft, .99),
            "tpot_p50_ms": 1e3 * statistics.median(tpot), "tpot_p99_ms": 1e3 * _pct(tpot, .99)}


class _StageCompute:
    """DistributedPipeline.on_step sink: each stage's compute seconds per decode-only step (from the
    STEP_RECORDs the workers send back with the logits; no extra round trip)."""

    def __init__(self):
        self.by_stage: dict[int, list[float]] = {}

    def __call__(self, batch, route, received, t0, t1) -> None:
        if not all(k == 1 for k in batch.num_new):
            return
        n = len(STEP_RECORD)
        for got in received:
            meta = got.meta
            for i in range(0, len(meta) - n + 1, n):
                rec = dict(zip(STEP_RECORD, meta[i:i + n]))
                self.by_stage.setdefault(rec["start"], []).append(rec["compute_us"] / 1e6)

    def p50_ms(self) -> list[float]:
        return [1e3 * statistics.median(v) for _, v in sorted(self.by_stage.items())]


def _run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[dict, list[list[int]]]:
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))   # warm-up
    t = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return _figures(outs, time.perf_counter() - t), [o.token_ids for o in outs]


def balanced_bounds(cfg, stages: int = 2, costs: list[float] | None = None) -> list[int]:
    """Bounds [0, c1, ..., L] of `stages` contiguous stages whose slowest is as fast as it can be.
    costs: each layer's time, the embedding counted in layer 0 and norm + LM head in the last (as
    measured by layer_costs); without them, weight sizes stand in (the LM head, vocab x hidden,
    weighs like several layers)."""
    L = cfg.num_layers
    if costs is None:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
        costs = [float(layer)] * L
        costs[-1] += cfg.vocab_size * cfg.hidden_size
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    # best[s][j]: the least possible slowest stage for layers [0, j) in s stages (small DP)
    best = [[float("inf")] * (L + 1) for _ in range(stages + 1)]
    cut = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, L + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], pre[j] - pre[i])
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [L], L
    for s in range(stages, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    return bounds[::-1]


def layer_costs(src, rows: int, steps: int = 6) -> list[float]:
    """Seconds per decode step of `rows` rows, per layer, in this process on one thread: the model's
    own stage code with timing hooks (the embedding is added to layer 0, norm + head to the last)."""
    cfg = src.config
    stage = build_stages(src, [0, cfg.num_layers], num_kv_blocks=max(64, rows * 8), block_size=16)[0]
    model = stage.model
    spent = [0.0] * cfg.num_layers
    marks: dict = {}

    def pre(key):
        return lambda mod, args: marks.__setitem__(key, time.perf_counter())

    def post(i, key):
        return lambda mod, args, out: spent.__setitem__(i, spent[i] + time.perf_counter() - marks[key])
    hooks = []
    for i, layer in enumerate(model.layers):
        hooks += [layer.register_forward_pre_hook(pre(i)), layer.register_forward_hook(post(i, i))]
    last = cfg.num_layers - 1
    for key, mod, at in (("embed", model.embed_tokens, 0), ("norm", model.norm, last), ("head", model.lm_head, last)):
        hooks += [mod.register_forward_pre_hook(pre(key)), mod.register_forward_hook(post(at, key))]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompts = [[1 + (i * 7 + j) % 200 for j in range(16)] for i in range(rows)]
        # every prompt prefills in the one uncounted step: with the default budget (512 tokens) the
        # prompts of over 32 rows would trickle into the counted steps, which would then be neither
        # `rows`-row decode steps nor `steps` of them (64 rows read as 1.1-1.8 s a step where it is 0.31 s)
        eng = Engine([stage], EngineConfig(max_num_seqs=rows, max_model_len=256, num_kv_blocks=max(64, rows * 8),
                                           max_prefill_tokens=max(512, 16 * rows)))
        eng.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))      # warm-up (and prefill shapes)
        for p in prompts:
            eng.add_request(p, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
        eng.step()                                  # the prefill step: not counted
        spent[:] = [0.0] * len(spent)
        counted = 0
        while eng.has_unfinished():
            eng.step()
            counted += 1
        if counted != steps:
            raise RuntimeError(f"layer_costs: {counted} decode steps ran where {steps} were timed")
    finally:
        torch.set_num_threads(saved)
        for h in hooks:
            h.remove()
    return [s / steps for s in spent]


def _estimated_tok_s(src, model_name: str, stages, concurrency: int, prompt_tokens: int, max_tokens: int,
                     groups: int) -> dict:
    """The cost model's throughput and TPOT for the same plan and load (local cluster, profiles if any)."""
    from pathlib import Path

    from policies import ModelSpec, PlacementPlan, Stage, load_cluster
    from policies.costmodel import estimate
    from policies.intent import Traffic
    from policies.profile import load_profiles
    cluster = load_cluster(Path(__file__).resolve().parent.parent / "scenarios/local/cluster.yaml")
    spec = ModelSpec.from_hf_config(src.config.to_hf(), name=model_name, dtype="fp32")
    plan = PlacementPlan(model=model_name, data_class="public",
                         stages=tuple(Stage(node=n, first_layer=a, last_layer=b - 1) for n, a, b in stages))
    traffic = Traffic(concurrency=concurrency, prompt_tokens=prompt_tokens, output_tokens=max_tokens,
                      context_tokens=512)
    est = estimate(plan, cluster, spec, traffic, profiles=load_profiles(), groups_in_flight=groups)
    return {"est_tok_s": est.throughput_tok_s, "est_tpot_ms": est.tpot_ms, "est_source": est.source}


def run_pipeline_bench(max_tokens: int = 64, source=None, cores: int | None = None,
                       worker_threads: int | None = None, concurrency: int = 8,
                       model_name: str = "smollm2-135m") -> dict:
    """Every side of the module docstring; ratios between sides of this one run."""
    src = open_source(source)
    cfg = src.config
    tok = src.tokenizer()
    base = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for p in PROMPTS]
    prompts = [base[i % len(base)] for i in range(concurrency)]
    ec = EngineConfig(max_num_seqs=concurrency, max_model_len=512, num_kv_blocks=max(256, concurrency * 32),
                      block_size=16)
    cores = cores or torch.get_num_threads()
    threads = worker_threads or 1
    path = str(src.path) if hasattr(src, "path") else source
    sides: dict[str, dict] = {}
    outputs: dict[str, list] = {}
    saved = torch.get_num_threads()
    try:
        for name, n in (("stage1_t1", 1), (f"stage1_t{cores}", cores)):
            torch.set_num_threads(n)
            one = Engine(build_stages(src, [0, cfg.num_layers], ec.num_kv_blocks, ec.block_size), ec, tok,
                         cfg.eos_token_ids)
            sides[name], outputs[name] = _run(one, prompts, max_tokens)
            del one
        torch.set_num_threads(1)
        full_c = sum(layer_costs(src, rows=concurrency))   # one 1-thread process's decode step, all C rows
        for k in (2, 3):
            # a stage's rows per step are its group's: time the layers at that batch size
            costs = layer_costs(src, rows=max(1, -(-concurrency // k)))
            b = balanced_bounds(cfg, k, costs)
            nodes = list(NODES[:k])           # the local scenario's nodes: the cost model knows them
            stages = [(n, b[i], b[i + 1]) for i, n in enumerate(nodes)]
            rt = NodeRuntime.local(nodes, threads_per_worker=threads)
            try:
                rt.load(stages, source=path, num_kv_blocks=ec.num_kv_blocks, block_size=ec.block_size)
                pipe = rt.pipeline(cfg.num_layers)
                for groups in ((1, k) if k == 2 else (k,)):
                    eng = Engine([pipe], EngineConfig(**{**ec.__dict__, "pipeline_groups": groups}), tok,
                                 cfg.eos_token_ids)
                    name = f"pipeline{k}" + ("_g1" if groups == 1 else "")
                    pipe.on_step = sink = _StageCompute()
                    try:
                        sides[name], outputs[name] = _run(eng, prompts, max_tokens)
                    finally:
                        pipe.on_step = None
                    sides[name]["stage_compute_ms_in_workers"] = [round(x, 2) for x in sink.p50_ms()]
                    sides[name].update(_estimated_tok_s(src, model_name, stages, concurrency, len(prompts[0]),
                                                        max_tokens, groups))
                    sides[name]["bounds"] = b
                    sides[name]["stage_ms_measured_in_process"] = alone = [
                        round(1e3 * sum(costs[b[i]:b[i + 1]]), 2) for i in range(k)]
                    if groups == k:
                        busy = sides[name]["stage_compute_ms_in_workers"]
                        sides[name]["ceiling_alone"] = 1e3 * full_c / (k * max(alone))
                        sides[name]["ceiling_in_workers"] = 1e3 * full_c / (k * max(busy)) if busy else None
                sides[f"pipeline{k}"]["workers"] = [
                    {"node": i.node, "layers": i.layers, "rss_mb": round(i.rss_bytes / 2**20),
                     "weights_mb": round(i.weight_bytes / 2**20), "step_ms_p50": i.step_ms_p50} for i in rt.stats()]
            finally:
                rt.shutdown()
        sides["stage1_t1"].update(_estimated_tok_s(src, model_name, [(NODES[0], 0, cfg.num_layers)], concurrency,
                                                   len(prompts[0]), max_tokens, 1))
    finally:
        torch.set_num_threads(saved)
    ref = outputs["stage1_t1"]
    t1, tn = sides["stage1_t1"]["tok_s"], sides[f"stage1_t{cores}"]["tok_s"]
    return {
        "concurrency": concurrency, "cores": cores, "sides": sides,
        "identical_to_one_process": {name: out == ref for name, out in outputs.items()},
        "pipeline2_vs_stage1_t1": sides["pipeline2"]["tok_s"] / t1,
        f"pipeline2_vs_stage1_t{cores}": sides["pipeline2"]["tok_s"] / tn,
        "pipeline3_vs_stage1_t1": sides["pipeline3"]["tok_s"] / t1,
        "pipeline2_groups_vs_one_group": sides["pipeline2"]["tok_s"] / sides["pipeline2_g1"]["tok_s"],
        # what overlap could win at most vs stage1_t1 (module docstring): alone / with the others busy
        "stage1_t1_decode_step_ms_in_process": round(1e3 * full_c, 2),
        "pipeline2_ceiling_alone": sides["pipeline2"]["ceiling_alone"],
        "pipeline2_ceiling_in_workers": sides["pipeline2"]["ceiling_in_workers"],
        "pipeline3_ceiling_alone": sides["pipeline3"]["ceiling_alone"],
        "pipeline3_ceiling_in_workers": sides["pipeline3"]["ceiling_in_workers"],
        # what `continuo bench engine` printed before, kept for comparison: 2 stages vs all cores
        "pipeline2_vs_stage1": sides["pipeline2"]["tok_s"] / tn,
    }


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run_pipeline_bench(concurrency=int(sys.argv[1]) if len(sys.argv) > 1 else 8), default=str))
