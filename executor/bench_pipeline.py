"""The pipeline figures of `continuo bench engine`: 2 stages over 2 worker processes vs the
1-stage engine in one process, on the same cores, same model and same load, in one run."""
from __future__ import annotations

import statistics
import time

import torch

from .engine import Engine, EngineConfig, RequestOutput, SamplingParams
from .runtime import NodeRuntime
from .stage import build_stages
from .weights import open_source

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


def _run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))   # warm-up
    t = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return _figures(outs, time.perf_counter() - t)


def balanced_bounds(cfg) -> list[int]:
    """Two stages of about equal work: the LM head (vocab x hidden) weighs like several layers."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    head = cfg.vocab_size * cfg.hidden_size
    cut = min(range(1, cfg.num_layers), key=lambda c: max(c * layer, (cfg.num_layers - c) * layer + head))
    return [0, cut, cfg.num_layers]


def run_pipeline_bench(max_tokens: int = 64, source=None, cores: int | None = None,
                       worker_threads: int | None = None) -> dict:
    """Returns {'stage1': figures, 'pipeline2': figures + per-worker RSS, 'pipeline2_vs_stage1': ratio}."""
    src = open_source(source)
    cfg = src.config
    tok = src.tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in PROMPTS]
    ec = EngineConfig(max_num_seqs=8, max_model_len=512, num_kv_blocks=256, block_size=16)
    cores = cores or torch.get_num_threads()
    # 1 stage in this process, all cores.
    saved = torch.get_num_threads()
    torch.set_num_threads(cores)
    one = Engine(build_stages(src, [0, cfg.num_layers], ec.num_kv_blocks, ec.block_size), ec, tok, cfg.eos_token_ids)
    stage1 = _run(one, prompts, max_tokens)
    del one
    # 2 stages on 2 worker processes, the cores split between them; this process only schedules.
    rt = NodeRuntime.local(["w0", "w1"], threads_per_worker=worker_threads or max(1, cores // 2))
    try:
        b = balanced_bounds(cfg)
        rt.load([("w0", b[0], b[1]), ("w1", b[1], b[2])], source=str(src.path) if hasattr(src, "path") else source,
                num_kv_blocks=ec.num_kv_blocks, block_size=ec.block_size)
        torch.set_num_threads(1)
        pipe = rt.pipeline(cfg.num_layers)
        two = Engine([pipe], ec, tok, cfg.eos_token_ids)
        pipe2 = _run(two, prompts, max_tokens)                    # micro-batches where a step is big enough
        pipe.micro_batches = 2
        forced = _run(two, prompts, max_tokens)                   # every step cut in 2
        pipe2["forced_microbatch_tok_s"] = forced["tok_s"]
        pipe2["workers"] = [{"node": i.node, "layers": i.layers, "rss_mb": round(i.rss_bytes / 2**20),
                             "weights_mb": round(i.weight_bytes / 2**20), "step_ms_p50": i.step_ms_p50}
                            for i in rt.stats()]
    finally:
        rt.shutdown()
        torch.set_num_threads(saved)
    return {"stage1": stage1, "pipeline2": pipe2, "pipeline2_vs_stage1": pipe2["tok_s"] / stage1["tok_s"],
            "pipeline2_vs_stage1_all_steps_microbatched": forced["tok_s"] / stage1["tok_s"]}


if __name__ == "__main__":
    import json
    print(json.dumps(run_pipeline_bench()))
