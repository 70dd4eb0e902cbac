"""The cost model: memory, prefill/decode time, hops, TTFT, TPOT, throughput and price of a plan.

Formulas (all documented here; figures are estimates, good to about +-25%):

  memory(stage)   = weights + KV reservation + activation workspace
    weights       = layers * bytes_per_layer (+ embedding if it owns layer 0)
                    (+ final norm and LM head if it owns the last layer)
    KV            = layers * kv_bytes_per_token_per_layer * kv_tokens
                    kv_tokens = concurrency * context_tokens rounded up to whole blocks of
                    KV_BLOCK_TOKENS (Traffic.kv_tokens): exactly what the executor allocates
    workspace     = STEP_TOKENS * (4*hidden + 2*intermediate) * dtype_bytes     (hidden states, MLP)
                    (+ concurrency * vocab * 4 bytes of fp32 logits on the LM-head stage)
  capacity(node)  = 0.9 * memory_gb * gpus - reserved_gb                         (see Node)

  A node's effective speed: bandwidth = mem_bandwidth * gpus * BW_EFF,
                            compute   = bf16_tflops * gpus * MFU.
  prefill(stage, P tokens) = max(P * (layers * (matmul_flops + attn_flops(P/2)) + head_flops) / compute,
                                 weights / bandwidth)                            (compute-bound)
  decode(stage, B seqs)    = max((weights_read + B * ctx * layers * kv_bytes_per_token_per_layer) / bandwidth,
                                 B * layers * (matmul_flops + attn_flops(ctx)) / compute)   (bandwidth-bound)
    with ctx = prompt_tokens + output_tokens / 2 (mean context while decoding); weights_read leaves
    out the embedding table (a lookup reads only B rows).
  hop(link, T tokens)      = latency + T * hidden * dtype_bytes / bandwidth
  TTFT   = sum(prefill(P)) + sum(hop(P))     over stages / hops
  TPOT   = sum(decode(B))  + sum(hop(B))     one decode step of the whole batch through every stage
  throughput = B / round,  round = k * max_s(decode_s(m) + hop_s(m)),  m = ceil(B / k):
    with k stages the batch is cut into k micro-batches that keep every stage busy, so the
    slowest stage sets the pace (k * max >= sum, so a round is never shorter than one pass).
  cost per hour = sum of the hourly price of the distinct nodes used (per node override, or
    the GPU kind's list price * gpus; a price table passed in overrides by GPU kind).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .cluster import Cluster, Link, Node
from .intent import Traffic
from .modelspec import ModelSpec
from .plan import Estimates, PlacementPlan, StageEstimate

STEP_TOKENS = 2048   # token budget of one (chunked) prefill step
BW_EFF = 0.6         # fraction of datasheet memory bandwidth a decode step achieves
MFU = 0.4            # fraction of datasheet FLOPs a prefill achieves


@dataclass(frozen=True)
class StageShape:
    """What the cost of a stage depends on: its layer count and whether it holds the ends.

    `layers` may be a numpy array of counts; every function below then works element-wise.
    """
    layers: int
    embed: bool
    head: bool


def _max(a, b):
    """max() that also works element-wise on numpy arrays (the planner passes arrays of layer counts)."""
    return (a + b + abs(a - b)) / 2


def weight_bytes(model: ModelSpec, s: StageShape) -> float:
    """Weights a stage holds: its layers, plus the embedding and the LM head when it owns the ends."""
    return s.layers * model.bytes_per_layer + (model.embedding_bytes if s.embed else 0) \
        + (model.head_bytes if s.head else 0)


def kv_bytes(model: ModelSpec, s: StageShape, traffic: Traffic) -> float:
    """The KV reservation of a stage: the executor allocates traffic.kv_blocks blocks for each of its layers."""
    return s.layers * model.kv_bytes_per_token_per_layer * traffic.kv_tokens


def workspace_bytes(model: ModelSpec, s: StageShape, traffic: Traffic) -> float:
    """Activation workspace of one step (and fp32 logits on the LM-head stage)."""
    ws = STEP_TOKENS * (4 * model.hidden_size + 2 * model.intermediate_size) * model.dtype_bytes
    return ws + (traffic.concurrency * model.vocab_size * 4 if s.head else 0)


def memory_bytes(model: ModelSpec, s: StageShape, traffic: Traffic) -> float:
    """What the capacity rule charges a stage: weights + KV reservation + workspace."""
    return weight_bytes(model, s) + kv_bytes(model, s, traffic) + workspace_bytes(model, s, traffic)


def _speed(node: Node) -> tuple[float, float]:
    bw = node.kind.mem_bandwidth_gbs * 1e9 * node.gpus * BW_EFF
    flops = node.kind.bf16_tflops * 1e12 * node.gpus * MFU
    return bw, flops


def prefill_ms(model: ModelSpec, s: StageShape, node: Node, prompt_tokens: int) -> float:
    """Time for a stage to prefill one prompt on a node (compute-bound, at least one weight read)."""
    bw, flops = _speed(node)
    per_tok = s.layers * (model.flops_per_token_per_layer
                          + model.attention_flops_per_token_per_layer(prompt_tokens // 2))
    work = prompt_tokens * per_tok + (model.head_flops_per_token if s.head else 0)
    return 1e3 * _max(work / flops, weight_bytes(model, s) / bw)


def decode_ms(model: ModelSpec, s: StageShape, node: Node, batch: int, traffic: Traffic) -> float:
    """Time for a stage to decode one token for `batch` sequences on a node (bandwidth-bound)."""
    bw, flops = _speed(node)
    ctx = traffic.prompt_tokens + traffic.output_tokens // 2
    read = weight_bytes(model, s) - (model.embedding_bytes if s.embed else 0)
    read += batch * ctx * s.layers * model.kv_bytes_per_token_per_layer
    work = batch * (s.layers * (model.flops_per_token_per_layer + model.attention_flops_per_token_per_layer(ctx))
                    + (model.head_flops_per_token if s.head else 0))
    return 1e3 * _max(read / bw, work / flops)


def hop_ms(model: ModelSpec, link: Link, tokens: int) -> float:
    """Time to send the activations of `tokens` tokens over a link."""
    return link.latency_ms + 1e3 * tokens * model.hidden_size * model.dtype_bytes * 8 / (link.bandwidth_gbps * 1e9)


def node_price(node: Node, prices: dict[str, float] | None = None) -> float:
    """Hourly price of a node (its own override, the price table's, or its GPU kind's list price)."""
    if node.price_per_hour is None and prices and node.gpu in prices:
        return prices[node.gpu] * node.gpus
    return node.hourly_price


def estimate(plan: PlacementPlan, cluster: Cluster, model: ModelSpec, traffic: Traffic,
             prices: dict[str, float] | None = None) -> Estimates:
    """Estimates for a plan whose nodes exist and whose consecutive stages are linked."""
    L, k, B = model.num_layers, len(plan.stages), traffic.concurrency
    m = math.ceil(B / k)
    stages, ttft, tpot, slowest = [], 0.0, 0.0, 0.0
    for i, st in enumerate(plan.stages):
        node = cluster.node(st.node)
        shape = StageShape(st.stop - st.start, st.start == 0, st.stop == L)
        pre, dec = prefill_ms(model, shape, node, traffic.prompt_tokens), decode_ms(model, shape, node, B, traffic)
        hop_p = hop_d = hop_m = 0.0
        if i + 1 < k:
            link = cluster.link(st.node, plan.stages[i + 1].node)
            if link is not None:
                hop_p, hop_d, hop_m = (hop_ms(model, link, t) for t in (traffic.prompt_tokens, B, m))
        ttft += pre + hop_p
        tpot += dec + hop_d
        slowest = max(slowest, decode_ms(model, shape, node, m, traffic) + hop_m)
        stages.append(StageEstimate(
            node=st.node, weight_bytes=weight_bytes(model, shape), kv_bytes=kv_bytes(model, shape, traffic),
            workspace_bytes=workspace_bytes(model, shape, traffic), memory_bytes=memory_bytes(model, shape, traffic),
            capacity_bytes=node.usable_memory_bytes, prefill_ms=pre, decode_ms=dec,
            hop_out_ms_prefill=hop_p, hop_out_ms_decode=hop_d))
    cost = sum(node_price(cluster.node(n), prices) for n in dict.fromkeys(plan.nodes))
    return Estimates(ttft_ms=ttft, tpot_ms=tpot, throughput_tok_s=1e3 * B / (k * slowest),
                     cost_per_hour=cost, stages=tuple(stages))


def objective_value(objective: str, est: Estimates, traffic: Traffic) -> float:
    """Lower is better. balanced = dollars per million tokens at the estimated throughput."""
    latency = est.ttft_ms + (traffic.output_tokens - 1) * est.tpot_ms
    if objective == "latency":
        return latency
    if objective == "throughput":
        return -est.throughput_tok_s
    if objective == "cost":
        return est.cost_per_hour * 1e9 + latency     # cheapest first, then fastest
    return est.cost_per_hour / (est.throughput_tok_s * 3600) * 1e6
