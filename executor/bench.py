"""`continuo bench engine`: our engine vs transformers generate() on the embedded SmolLM2-135M.

Both run side by side in one process on the same cores, with the same tensors (fp32, the
GGUF dequantised once) and the same greedy workload: each request makes exactly
`max_tokens` tokens (EOS ignored; 128 by default, a short chat reply). Last, telemetry's cost: a
2-stage service over worker processes serving the same streams with telemetry on and off, in
alternating runs (telemetry_on_vs_off: throughput on / off). Throughput counts
generated tokens over wall time, prefill included, for both; the decode-only figure counts the
tokens after each request's first over the time after the last first token (prefill excluded). Each measurement is repeated and the best run kept, so a
noisy neighbour on a shared machine hurts neither side more than the other.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .engine import Engine, EngineConfig, SamplingParams
from .model import hf_names
from .stage import build_stages
from .weights import GGUFSource, StateDictSource


def _prompts(n: int, vocab: int) -> list[list[int]]:
    """n prompts of 24..66 tokens (different lengths, so transformers has to pad)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (24 + 6 * i,), generator=g).tolist() for i in range(n)]


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def _engine_run(engine: Engine, prompts, max_tokens: int, grammar: str | None = None):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, grammar=grammar)
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t), outs


def _decode_tok_s(outs) -> float:
    """Tokens after each request's first, over the time from the last first token to the end."""
    t0, t1 = max(o.token_times[0] for o in outs), max(o.token_times[-1] for o in outs)
    return sum(len(o.token_ids) - 1 for o in outs) / (t1 - t0)


@torch.inference_mode()
def _hf_run(model, prompts, max_tokens: int, pad_id: int) -> float:
    width = max(map(len, prompts))
    # left padding, as generate() needs for a batch of different lengths
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=pad_id)
    return (out.shape[1] - width) * len(prompts) / (time.perf_counter() - t)


def run_engine_bench(json_out: bool = False, max_tokens: int = 128, repeats: int = 2,
                     threads: int | None = None, pipeline: bool = True, telemetry: bool = True) -> dict:
    if threads:     # both sides run under the same setting
        torch.set_num_threads(threads)
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    t0 = time.perf_counter()
    gguf = GGUFSource()
    cfg = gguf.config
    source = StateDictSource(cfg, gguf.load(hf_names(cfg, 0, cfg.num_layers)))
    engine = Engine(build_stages(source, [0, cfg.num_layers], num_kv_blocks=256, block_size=16),
                    EngineConfig(max_num_seqs=8, num_kv_blocks=256, max_model_len=1024), gguf.tokenizer(),
                    cfg.eos_token_ids, cfg.vocab_size)
    hf = LlamaForCausalLM(LlamaConfig(**cfg.to_hf())).eval()
    hf.load_state_dict(source.load(list(hf.state_dict())), strict=False)
    hf.tie_weights()
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads; loaded in {time.perf_counter() - t0:.1f}s")

    prompts = _prompts(8, cfg.vocab_size)
    # A JSON string that cannot end before max_tokens: every step computes and applies a mask, and the
    # grammar forces no tokens (which would skip steps and flatter the constrained side).
    from .structured import json_schema
    grammar = json_schema({"type": "object", "properties": {"summary": {"type": "string", "minLength": 50 * max_tokens}},
                           "required": ["summary"]})
    _engine_run(engine, prompts[:2], 4)                  # warm up both sides
    _engine_run(engine, prompts[:2], 4, grammar)         # (and the grammar's tokenizer, built once)
    _hf_run(hf, prompts[:2], 4, pad_id=2)
    best: dict[str, float] = {}
    latencies = []
    for _ in range(repeats):     # interleaved, best of `repeats`: noise hits both sides alike
        for name, run in [("hf_bs1", lambda: _hf_run(hf, prompts[:1], max_tokens, 2)),
                          ("engine_bs1", lambda: _engine_run(engine, prompts[:1], max_tokens)),
                          ("hf_bs8", lambda: _hf_run(hf, prompts, max_tokens, 2)),
                          ("engine_bs8", lambda: _engine_run(engine, prompts, max_tokens)),
                          ("engine_bs1_json", lambda: _engine_run(engine, prompts[:1], max_tokens, grammar)),
                          ("engine_bs8_json", lambda: _engine_run(engine, prompts, max_tokens, grammar))]:
            r = run()
            if name.startswith("engine"):
                r, outs = r
                best[name + "_decode"] = max(best.get(name + "_decode", 0.0), _decode_tok_s(outs))
                if name == "engine_bs8":
                    latencies.append(outs)
                if name.endswith("_json"):
                    assert all(len(o.token_ids) == max_tokens for o in outs), "the grammar ended a request early"
            best[name] = max(best.get(name, 0.0), r)

    # the fastest bs8 run: the one whose last token came soonest after its requests arrived
    outs = min(latencies, key=lambda os: max(o.token_times[-1] for o in os) - min(o.arrival for o in os))
    ttft = [o.ttft * 1e3 for o in outs]
    tpot = [g * 1e3 for o in outs for g in o.gaps]
    result = {
        "vs_transformers_bs1": round(best["engine_bs1"] / best["hf_bs1"], 3),
        "vs_transformers_bs8": round(best["engine_bs8"] / best["hf_bs8"], 3),
        "batch8_vs_batch1": round(best["engine_bs8"] / best["engine_bs1"], 3),
        "batch8_vs_batch1_decode": round(best["engine_bs8_decode"] / best["engine_bs1_decode"], 3),
        "constrained_vs_free_bs1": round(best["engine_bs1_json"] / best["engine_bs1"], 3),
        "constrained_vs_free_bs8": round(best["engine_bs8_json"] / best["engine_bs8"], 3),
        "constrained_vs_free_bs1_decode": round(best["engine_bs1_json_decode"] / best["engine_bs1_decode"], 3),
        "constrained_vs_free_bs8_decode": round(best["engine_bs8_json_decode"] / best["engine_bs8_decode"], 3),
        "engine_tok_s_bs1": round(best["engine_bs1"], 2), "engine_tok_s_bs8": round(best["engine_bs8"], 2),
        "transformers_tok_s_bs1": round(best["hf_bs1"], 2), "transformers_tok_s_bs8": round(best["hf_bs8"], 2),
        "ttft_ms_p50": round(_pct(ttft, 50), 1), "ttft_ms_p99": round(_pct(ttft, 99), 1),
        "tpot_ms_p50": round(_pct(tpot, 50), 1), "tpot_ms_p99": round(_pct(tpot, 99), 1),
        "max_tokens": max_tokens, "threads": torch.get_num_threads(),
    }
    print("decode throughput, tokens/s   engine   transformers   ratio")
    for bs in (1, 8):
        print(f"  batch {bs}                   {best[f'engine_bs{bs}']:7.1f}   {best[f'hf_bs{bs}']:12.1f}"
              f"   {best[f'engine_bs{bs}'] / best[f'hf_bs{bs}']:.2f}x")
    print(f"JSON-schema constrained vs free decoding: {result['constrained_vs_free_bs1']:.2f}x at batch 1, "
          f"{result['constrained_vs_free_bs8']:.2f}x at batch 8 (decode alone {result['constrained_vs_free_bs1_decode']:.2f}x"
          f" / {result['constrained_vs_free_bs8_decode']:.2f}x)")
    print(f"8 concurrent vs 1 request: {result['batch8_vs_batch1']:.2f}x throughput "
          f"({result['batch8_vs_batch1_decode']:.2f}x in decode alone, prefill excluded)")
    print(f"8 concurrent requests: TTFT p50 {result['ttft_ms_p50']} ms, p99 {result['ttft_ms_p99']} ms; "
          f"TPOT p50 {result['tpot_ms_p50']} ms, p99 {result['tpot_ms_p99']} ms "
          f"(mean TPOT {statistics.mean(tpot):.1f} ms)")
    if pipeline:
        from .bench_pipeline import run_pipeline_bench
        # k stages on k worker processes of one thread each vs one process of 1 thread and of all
        # threads, same requests (see bench_pipeline); groups of requests in flight unless said
        for conc in (8, 16):
            pipe = run_pipeline_bench(max_tokens=max_tokens, source=str(gguf.path), cores=torch.get_num_threads(),
                                      worker_threads=1, concurrency=conc)
            tag = f"_c{conc}"
            n = pipe["cores"]
            for key in ("pipeline2_vs_stage1_t1", f"pipeline2_vs_stage1_t{n}", "pipeline3_vs_stage1_t1",
                        "pipeline2_groups_vs_one_group", "pipeline2_ceiling_alone", "pipeline2_ceiling_in_workers",
                        "pipeline3_ceiling_alone", "pipeline3_ceiling_in_workers"):
                if pipe[key] is not None:
                    result[key + tag] = round(pipe[key], 3)
            if conc == 8:
                result["pipeline2_vs_stage1"] = round(pipe["pipeline2_vs_stage1"], 3)
            result["pipeline_identical_to_one_process" + tag] = pipe["identical_to_one_process"]
            result["pipeline_sides" + tag] = {
                side: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in f.items()}
                for side, f in pipe["sides"].items()}
            print(f"{conc} concurrent, greedy, {max_tokens} tokens each: 2 stages (1 thread each) vs one 1-thread "
                  f"process {pipe['pipeline2_vs_stage1_t1']:.2f}x, vs one {n}-thread process "
                  f"{pipe[f'pipeline2_vs_stage1_t{n}']:.2f}x; 3 stages vs 1 thread {pipe['pipeline3_vs_stage1_t1']:.2f}x; "
                  f"2 groups in flight vs 1 {pipe['pipeline2_groups_vs_one_group']:.2f}x; identical to one process: "
                  f"{all(pipe['identical_to_one_process'].values())}")
            ceil = lambda k, w: f"{pipe[f'pipeline{k}_ceiling_{w}']:.2f}x" if pipe[f"pipeline{k}_ceiling_{w}"] else "n/a"  # noqa: E731
            print(f"  what overlap can win at most vs one 1-thread process (decode step times measured here; see "
                  f"executor/bench_pipeline.py): 2 stages {ceil(2, 'alone')} with each stage alone, "
                  f"{ceil(2, 'in_workers')} at the stage times the workers had running together; 3 stages "
                  f"{ceil(3, 'alone')} / {ceil(3, 'in_workers')}")
            for side, f in pipe["sides"].items():
                est = (f"; estimated {f['est_tok_s']:.1f} tok/s, TPOT {f['est_tpot_ms']:.1f} ms ({f['est_source']})"
                       if "est_tok_s" in f else "")
                print(f"  {side:<13} {f['tok_s']:7.1f} tok/s; TTFT p50 {f['ttft_p50_ms']:.0f} ms, p99 "
                      f"{f['ttft_p99_ms']:.0f} ms; TPOT p50 {f['tpot_p50_ms']:.1f} ms, p99 {f['tpot_p99_ms']:.1f} ms"
                      + (f"; layers {f['bounds']}" if "bounds" in f else "") + est)
    if telemetry:
        tel = run_telemetry_overhead(str(gguf.path), max_tokens=max_tokens, repeats=max(3, repeats + 1),
                                     worker_threads=max(1, (os.cpu_count() or 2) // 2))
        result.update(tel)
        print(f"telemetry on vs off (2-stage service over workers, 8 streams, best of {tel['telemetry_repeats']} "
              f"interleaved): {tel['telemetry_on_vs_off']:.3f}x throughput ({tel['telemetry_on_tok_s']:.1f} vs "
              f"{tel['telemetry_off_tok_s']:.1f} tok/s; median of back-to-back pairs "
              f"{tel['telemetry_on_vs_off_pairs_median']:.3f}x); the driver's telemetry work alone: "
              f"{tel['telemetry_driver_us_per_step']:.0f} us per step, {100 * tel['telemetry_driver_share_of_step']:.2f}% "
              "of the mean step")
    if json_out:
        print(json.dumps(result))
    return result


def run_telemetry_overhead(source=None, max_tokens: int = 128, repeats: int = 3, concurrency: int = 8,
                           worker_threads: int | None = None) -> dict:
    """Serving throughput of one service with telemetry on and off, in alternating runs of the same
    workload (best of `repeats` each): the whole serving path (Service.submit, the engine loop, the
    workers' step records riding on the activations and logits, the windows)."""
    from policies import IntentSpec, ModelSpec, PlacementPlan, Stage, Traffic, approve, load_cluster, load_policy

    from .bench_pipeline import PROMPTS, balanced_bounds
    from .service import Listener, Service
    from .weights import open_source
    cluster, policy = load_cluster("scenarios/local/cluster.yaml"), load_policy("scenarios/local/policy.yaml")
    src = open_source(source)
    cfg, tok = src.config, src.tokenizer()
    b = balanced_bounds(cfg)
    plan = PlacementPlan(model="smollm2-135m", data_class="public", cluster_fingerprint=cluster.fingerprint(),
                         stages=(Stage(node="edge-a", first_layer=0, last_layer=b[1] - 1),
                                 Stage(node="edge-b", first_layer=b[1], last_layer=cfg.num_layers - 1)))
    intent = IntentSpec(data_class="public", traffic=Traffic(concurrency=concurrency, context_tokens=512))
    vp = approve(plan, cluster, policy, intent, ModelSpec.from_hf_config(cfg.to_hf(), name="smollm2-135m", dtype="fp32"))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for p in PROMPTS][:concurrency]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)         # this process only schedules and samples
    svc = Service.launch(cluster, vp, source, EngineConfig(max_num_seqs=concurrency, max_model_len=512),
                         threads_per_worker=worker_threads)

    def run(n_tokens: int) -> float:
        from concurrent.futures import Future
        futs = []
        t = time.perf_counter()
        for p in prompts:
            f: Future = Future()
            svc.submit(p, SamplingParams(max_tokens=n_tokens, ignore_eos=True),
                       Listener(on_done=lambda out, err, f=f: f.set_result((out, err))))
            futs.append(f)
        outs = [f.result(600) for f in futs]
        wall = time.perf_counter() - t
        bad = [err for _, err in outs if err]
        if bad:
            raise RuntimeError(f"telemetry bench: a request failed: {bad[0]}")
        return sum(len(o.token_ids) for o, _ in outs) / wall
    best = {True: 0.0, False: 0.0}
    pairs = []
    try:
        run(4)                                          # warm-up
        for i in range(repeats):
            got = {}
            for on in ((False, True) if i % 2 == 0 else (True, False)):     # alternate who goes first
                svc.loop.call(lambda on=on: svc.set_telemetry(on))
                got[on] = run(max_tokens)
                best[on] = max(best[on], got[on])
            pairs.append(got[True] / got[False])
        steps = list(svc.telemetry.steps)
    finally:
        svc.close()
        torch.set_num_threads(saved)
    step_s = statistics.mean(s.wall_s for s in steps) if steps else float("nan")
    cost = _telemetry_cost_s(concurrency)
    # two figures: best on / best off, and the median over back-to-back pairs (a slow spell of the
    # machine hits both runs of a pair, and the median drops the pair it split)
    return {"telemetry_on_vs_off": round(best[True] / best[False], 3),
            "telemetry_on_vs_off_pairs_median": round(statistics.median(pairs), 3),
            "telemetry_on_tok_s": round(best[True], 2),
            "telemetry_off_tok_s": round(best[False], 2), "telemetry_repeats": repeats, "telemetry_steps": len(steps),
            "telemetry_driver_us_per_step": round(1e6 * cost, 1),
            "telemetry_driver_share_of_step": round(cost / step_s, 5)}


def _telemetry_cost_s(rows: int, n: int = 2000) -> float:
    """What the driver spends on telemetry per decode step of `rows` requests over 2 stages (parsing
    the records that came with the logits, the step sample, one token count per row), timed alone:
    a figure that noise from other processes on a shared machine cannot blur."""
    from .stage import StepBatch
    from .telemetry import Telemetry
    from .transport import STEP_RECORD, Hop, Received
    tel = Telemetry()
    tel.node_of = {1: "a", 2: "b"}.get
    route = (Hop(1, 0, 10), Hop(2, 10, 30))
    rec = lambda rank: tuple(rank if k == "rank" else 1000 for k in STEP_RECORD)  # noqa: E731
    got = [Received(4 * 49152 * rows, 0.001, rec(1) + rec(2))]
    batch = StepBatch(list(range(rows)), [100] * rows, [1] * rows, torch.zeros(rows, 1, dtype=torch.long))
    t = time.perf_counter()
    for _ in range(n):
        tel.pipeline_step(batch, route, got, 0.0, 0.01)
        tel.step(0.01, 0, rows)
        for _ in range(rows):
            tel.token()
    return (time.perf_counter() - t) / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m executor.bench")
    p.add_argument("which", choices=["engine", "telemetry"],
                   help="engine: everything; telemetry: only the telemetry on vs off figure")
    p.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    a = p.parse_args(argv)
    if a.which == "telemetry":
        r = run_telemetry_overhead(max_tokens=a.max_tokens)
        print(json.dumps(r) if a.json else r)
        return
    run_engine_bench(json_out=a.json, max_tokens=a.max_tokens, threads=a.threads)


if __name__ == "__main__":
    main()
