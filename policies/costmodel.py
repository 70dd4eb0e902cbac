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

  Step times of a stage come from a measured profile (policies/profile.py) where one exists for the
  node (or its kind) and the model, and from datasheet figures where not; every stage estimate says
  which (`source: measured | datasheet`; the plan's is `mixed` when its stages differ).

  measured (profile p):
    prefill(stage, P, rows) = p.stage_ms + layers * p.layer_prefill(rows * P) + embed_ms + head(rows)
    decode(stage, B)        = p.stage_ms + layers * p.layer_decode(B, ctx) + embed_ms + head(B)
  datasheet: a node's effective speed: bandwidth = mem_bandwidth * gpus * BW_EFF,
                                       compute   = bf16_tflops * gpus * MFU.
    prefill(stage, P, rows) = max(rows * P * (layers * (matmul_flops + attn_flops(P/2)) + head_flops) / compute,
                                  weights / bandwidth)                           (compute-bound)
    decode(stage, B)        = max((weights_read + B * ctx * layers * kv_bytes_per_token_per_layer) / bandwidth,
                                  B * layers * (matmul_flops + attn_flops(ctx)) / compute)   (bandwidth-bound)
    with ctx = prompt_tokens + output_tokens / 2 (mean context while decoding); weights_read leaves
    out the embedding table (a lookup reads only B rows).
  Either is then multiplied by the stage's correction factor (Corrections: measured / predicted while
  serving, smoothed; 1 until something is observed).
  hop(link, T tokens)      = latency + T * hidden * dtype_bytes / bandwidth + message(T * hidden * dtype_bytes)
  logits hop (rows R)      = latency + R * vocab * 4 / bandwidth   from the LM-head stage to the driver,
                             counted when `driver_node` is given and is not the last stage's node;
                             + message(R * vocab * 4) + message(0) (the step message out) + driver
                             on every pass, wherever the driver sits
  message(bytes) = fixed + per_MB * bytes / 1e6, and driver, are measured while serving: what a message
  between two processes costs beyond its link (serialising, the transport's turn, waking the receiver)
  and the engine's own turn per step (Corrections.observe_transport, from the step telemetry of steps
  where each receiver waits for its message); 0 until observed. On scenarios/local at 1x: ~1.2 ms a
  message and ~0.5 ms a step, 8-13% of a token on 2-3 stages, which the cost model had left out.

  The engine keeps g groups of requests in flight (EngineConfig.pipeline_groups; by default one per
  stage, g = k; `groups_in_flight` here, None meaning the engine's default): each group's next step is
  launched as soon as its previous one is back, so stage i works on one group while stage i+1 works
  on another. Requests join the group with the fewest (group_sizes: sizes differ by at most one).

  TTFT   a wave of `prefill_rows` prompts of P tokens reaching an idle pipeline together (1: a
         request alone): they spread over min(g, rows) groups; every group's step is launched at
         once and cut into micro-batches (micro_batches: one per stage when it has >= 16 tokens per
         stage, as runtime.DistributedPipeline does); the micro-batches go through the stages in
         launch order, each stage taking one at a time (a flow shop):
           done(mb, s) = max(arrival(mb, s), done(mb before, s)) + prefill_s(rows of mb)
           arrival(mb, s + 1) = done(mb, s) + hop_s(rows * P)
         a group's first tokens come when its last micro-batch is back (+ the logits hop); the
         estimate is the median over the wave's requests (a p50, as the bench measures it).
         Stages on one host slow each other while they compute at once (flow_shop: each goes at
         1 / corun_prefill(stages of its host computing at that moment): the prefill step's own
         co-run table, Profile.corun_prefill, where measured, else the decode step's).
         No queueing and no chunking of long prompts: the simulator models those.
  Decode, steady state, B running requests in min(g, B) groups of sizes m_j:
    pass(m) = sum_s(decode_s(m) + hop_s(m)) + logits hop(m)     one group's token through everything
    round   = max(max_j pass(m_j),                              a group waits for its own pass
                  max_s sum_j (decode_s(m_j) + io_s(m_j)),      a stage computes every group once
                  max_links sum_j serialisation_s(m_j))         a link carries every group once
              (link latency overlaps across groups; only its bytes occupy it)
    io_s(m) = message(0) + message(in) + message(out): the step message from the driver, the activations
              from the stage before (none on the first stage) and what the stage sends on (activations, or
              the last stage's logits to the driver). A worker takes and sends each group's messages itself,
              between its steps (executor/worker.py serves one message at a time), so they occupy the stage
              once per group even where the pass overlaps them. Measured on scenarios/local (2 stages,
              waves of 4: 2 groups of 2), the last stage's worker spent 19.4 ms computing and 25.4 ms in all
              per group (2.5 ms taking the step message, a wait included, 0.5 ms the activations, ~2 ms
              staging and sending the logits); a round of 2 x 19.4 ms alone was 28-32% under the measured
              TPOT (54-57 ms).
    On stages that share a host (below) the round is also at least closed_cycle_ms: the g groups
    circling the stages as jobs of a closed queueing network (approximate mean value analysis, each
    stage taking mean_j(decode_s(m_j) + io_s(m_j)) a visit, the links and the driver a pure delay). Near
    balance (a group's pass about g times the busiest stage's step) a group reaching a stage busy with
    another waits out the rest of that step, which the max of the bounds leaves out: the co-running
    makes steps there vary, so the groups do not keep in step. On scenarios/local (stop 36, `continuo
    bench predict`, one run) it took the corrected 4x TPOT of the 2-stage plans from -18%, -19%, -11%
    of the measured to -10%, -8%, -0%, and the 3-stage plan's from -4% to +1%. Devices of their own
    (host: none) keep the bounds.
    TPOT = round (each request gets one token per round); throughput = B / round.
  With g = 1 this is TPOT = sum(decode(B)) + sum(hop(B)): one step runs the whole batch through the
  stages one after the other.
  Stages on nodes that name the same `host` (the local test bench's worker processes on one machine)
  share its cores and memory bandwidth: with g > 1 each stage's decode steps are slowed by
    sigma_s = sum_n P(n others busy) * corun(1 + n)            (host_slowdowns)
  where corun is the host's measured co-run slowdown (Profile.corun: a decode step with n stages
  computing at once / alone; 1 without a profile that has one), each other stage is busy
  u_o = sigma_o * its work per round / round of the time, independently, and the round uses the
  slowed steps: a fixed point. (With g = 1 the stages take turns and none is slowed. A wave's prefill
  flow shop in TTFT is slowed moment by moment instead, where its micro-batches overlap, by the
  prefill step's table: measured on the local bench, slowing it at all brought the 2- and 3-stage
  plans' 4x TTFT from -17% / -30% of the measured to -9% / -9% before correction; the decode table
  standing in for prefill's then put the 3-stage plan's 4x TTFT at +12% (stop 33: a prefill step
  3 at once on 2 cores is 1.67-1.70x alone, a decode step 2.09-2.22x).)
  The driver and the stages' messages work on the host's cores too: a stage's io_s counts in its busy
  share u (not slowed: the table times steps), and the driver, on its node's host, is one more party
  busy u_d = g * (driver turn + step message + logits) / round of the time (corun_driver). Measured on
  scenarios/local at 4x (stop 36, one run each): the 2-stage plan's TPOT 53.4 ms, predicted 51.1 with
  them and 46.7 without; the 3-stage plan's 95.6 ms, predicted 93.0 and 79.4. In `continuo bench
  predict` (5 plans x 2 loads) the corrected TPOT's mean |error| went 12.5% -> 8.3% (the simulator's
  11.8% -> 7.7%). At 1x nothing changes (one group: the stages take turns).
  cost per hour = sum of the hourly price of the distinct nodes used (per node override, or
    the GPU kind's list price * gpus; a price table passed in overrides by GPU kind).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .cluster import Cluster, Link, Node
from .intent import Traffic
from .modelspec import ModelSpec
from .plan import Estimates, PlacementPlan, StageEstimate
from .profile import Profile, ProfileSet

STEP_TOKENS = 2048   # token budget of one (chunked) prefill step
MICRO_BATCH_MIN_TOKENS = 16   # runtime.DistributedPipeline cuts a step only with >= 16 tokens per stage
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


def prefill_ms(model: ModelSpec, s: StageShape, node: Node, prompt_tokens: int,
               profile: Profile | None = None, rows: int = 1) -> float:
    """One prefill step of `rows` prompts on a stage: from the profile when given, else datasheet
    figures (compute-bound, at least one weight read)."""
    if profile is not None:
        return profile.stage_prefill_ms(s.layers, s.embed, s.head, prompt_tokens, rows)
    bw, flops = _speed(node)
    per_tok = s.layers * (model.flops_per_token_per_layer
                          + model.attention_flops_per_token_per_layer(prompt_tokens // 2))
    work = rows * (prompt_tokens * per_tok + (model.head_flops_per_token if s.head else 0))
    return 1e3 * _max(work / flops, weight_bytes(model, s) / bw)


def decode_context(traffic: Traffic) -> int:
    """Mean context of a sequence while it decodes."""
    return traffic.prompt_tokens + traffic.output_tokens // 2


def decode_ms(model: ModelSpec, s: StageShape, node: Node, batch: int, traffic: Traffic,
              profile: Profile | None = None, context: int | None = None) -> float:
    """One decode step of `batch` sequences on a stage: from the profile when given, else datasheet
    figures (bandwidth-bound). `context` defaults to the traffic's mean decoding context."""
    ctx = decode_context(traffic) if context is None else context
    if profile is not None:
        return profile.stage_decode_ms(s.layers, s.embed, s.head, batch, ctx)
    bw, flops = _speed(node)
    read, work = _decode_read_work(model, s, batch, ctx)
    return 1e3 * _max(read / bw, work / flops)


def _decode_read_work(model: ModelSpec, s: StageShape, batch: int, context: int) -> tuple[float, float]:
    """(bytes read, FLOPs) of one decode step of `batch` sequences at `context` on a stage (datasheet model)."""
    read = weight_bytes(model, s) - (model.embedding_bytes if s.embed else 0)
    read += batch * context * s.layers * model.kv_bytes_per_token_per_layer
    work = batch * (s.layers * (model.flops_per_token_per_layer + model.attention_flops_per_token_per_layer(context))
                    + (model.head_flops_per_token if s.head else 0))
    return read, work


def joined_prefill_ms(model: ModelSpec, s: StageShape, node: Node, batch: int, context: int, tokens: float,
                      profile: Profile | None = None) -> float:
    """What `tokens` prompt tokens add to a decode step of `batch` sequences at `context` when they ride in
    the same step (chunked prefill joined to decode, as the engine and the simulator run it): the weights
    are read once for both, so on a bandwidth-bound step a chunk costs only the compute it adds beyond
    the read. From the profile when given (its prefill curve from batch to batch + tokens tokens), else
    datasheet figures (policies/simulator.py's step model, the same formula)."""
    if tokens <= 0:
        return 0.0
    if profile is not None:
        return s.layers * max(0.0, profile.layer_prefill_ms(batch + tokens) - profile.layer_prefill_ms(batch))
    bw, flops = _speed(node)
    read, work = _decode_read_work(model, s, batch, context)
    extra = tokens * s.layers * (model.flops_per_token_per_layer
                                 + model.attention_flops_per_token_per_layer(int(tokens // 2)))
    return 1e3 * (_max(read / bw, (work + extra) / flops) - _max(read / bw, work / flops))


def smoothed(current: float, n: int, x: float, alpha: float) -> float:
    """An EWMA step: the first observation (n == 0) as it is, then (1 - alpha) * current + alpha * x.
    The correction factors, the autopilot's TPOT residual and tail, and bench predict's residual."""
    return x if n == 0 else (1 - alpha) * current + alpha * x


class Corrections:
    """Correction factors (measured / predicted step time per node and phase), smoothed, as NVIDIA
    Dynamo's planner corrects its performance model while serving.

    factor <- (1 - alpha) * factor + alpha * measured / predicted, starting from the first ratio
    seen; clamped to [1/MAX_FACTOR, MAX_FACTOR] so one bad sample cannot run the model away.
    `predicted` must be the uncorrected figure for the same step shape (stage_step_ms gives it), so
    the factor converges to measured / model. Telemetry feeds it with observe_stage()."""

    MAX_FACTOR = 10.0
    PHASES = ("prefill", "decode")
    MESSAGES_KEPT = 64     # the transport's cost is fitted to this many latest message figures
    # A cost per MB is fitted only over messages whose sizes span at least this much: over a few hundred
    # bytes (a tiny model's step messages and logits) noise made a slope of 180 ms a MB, which then
    # charged a real model's 196 KB logits 36 ms a token. Below it, the mean is all fixed cost.
    MESSAGE_SPAN_MB = 0.064

    def __init__(self, alpha: float = 0.2):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {alpha}")
        self.alpha = alpha
        self.factors: dict[tuple[str, str], float] = {}
        self.samples: dict[tuple[str, str], int] = {}
        # What the link model (latency + bytes / bandwidth) leaves out of a message between two
        # processes, even on one machine: serialising, the transport's own turn, waking the receiver.
        # A fixed part and a part per MB, fitted to measured transfers (observe_message); 0 until then.
        # On scenarios/local at 1x (stop 32): ~1.2 ms per message, the logits' 196 KB ~2 ms.
        self.message_fixed_ms = 0.0
        self.message_ms_per_mb = 0.0
        self._messages: list[tuple[float, float]] = []      # (MB, ms beyond the link model)
        # the engine's own time per step outside the pipeline's forward (scheduling, sampling), smoothed
        self.driver_ms = 0.0
        self._driver_n = 0

    def observe(self, node: str, phase: str, measured_ms: float, predicted_ms: float) -> float:
        """Fold one observed step time into the node's factor for `phase`; returns the new factor."""
        if phase not in self.PHASES:
            raise ValueError(f"phase must be one of {', '.join(self.PHASES)}, not {phase!r}")
        if not (measured_ms > 0 and predicted_ms > 0):
            raise ValueError(f"step times must be positive (measured {measured_ms}, predicted {predicted_ms})")
        ratio = min(max(measured_ms / predicted_ms, 1 / self.MAX_FACTOR), self.MAX_FACTOR)
        key = (node, phase)
        n = self.samples.get(key, 0)
        self.factors[key] = smoothed(self.factors.get(key, 1.0), n, ratio, self.alpha)
        self.samples[key] = n + 1
        return self.factors[key]

    def observe_stage(self, plan: PlacementPlan, cluster: Cluster, model: ModelSpec, node: str, phase: str,
                      measured_ms: float, tokens: int, context: int | None = None,
                      profiles: ProfileSet | None = None, slowdown: float = 1.0) -> float:
        """Fold in one step of `node`'s stage in `plan`: `tokens` prompt tokens (prefill) or sequences
        (decode) at `context`; the prediction is the cost model's own, uncorrected, times `slowdown`
        (what stages sharing its host did to it meanwhile, which the estimate adds by itself)."""
        st = next((x for x in plan.stages if x.node == node), None)
        if st is None:
            raise KeyError(f"node {node} serves no stage of plan {plan.summary()}")
        n = cluster.node(node)
        shape = StageShape(st.stop - st.start, st.start == 0, st.stop == model.num_layers)
        prof = profiles.find(n, model.name) if profiles else None
        pred = stage_step_ms(model, shape, n, phase, tokens, context, prof)
        return self.observe(node, phase, measured_ms, pred * slowdown)

    def observe_plan(self, raw: Estimates, ttft_ms: float, tpot_ms: float) -> None:
        """Fold measured TTFT and TPOT of a plan into every stage's prefill and decode factors (the
        plan-wide form Dynamo's planner uses: observed / expected TTFT and inter-token latency).
        `raw` are the plan's estimates without corrections."""
        for st in raw.stages:
            self.observe(st.node, "prefill", ttft_ms, raw.ttft_ms)
            self.observe(st.node, "decode", tpot_ms, raw.tpot_ms)

    def observe_stage_times(self, stage_times, plan: PlacementPlan, cluster: Cluster, model: ModelSpec,
                            context: int, profiles: ProfileSet | None = None, window_s: float | None = None) -> int:
        """Fold in the service's telemetry: `stage_times` as executor.telemetry.Telemetry.stage_times()
        gives them (per stage: mean compute time of decode-only steps and rows per step, of steps with
        prompt tokens and tokens per step). Stages of another plan (another layer range) are skipped;
        `context` is the mean context of the decoding rows. Returns how many figures were folded in.
        window_s: how long the window the figures cover is. With it, a stage's decode steps are
        compared with the prediction slowed as much as the stages sharing its host, busy for the share
        of the window their steps took, slow it (host_slowdowns' expectation): the estimate adds that
        slowdown by itself, so it is not taken into the factor as well."""
        ranges = {(s.node, s.start, s.stop) for s in plan.stages}
        ours = [st for st in stage_times if (st.node, st.start, st.end) in ranges]
        slowed = self._window_slowdowns(ours, cluster, model, profiles, window_s)
        n = 0
        for st in ours:
            if st.decode_steps and st.decode_compute_s and st.decode_rows_per_step:
                self.observe_stage(plan, cluster, model, st.node, "decode", 1e3 * st.decode_compute_s,
                                   max(1, round(st.decode_rows_per_step)), context, profiles,
                                   slowdown=slowed.get(st.node, 1.0))
                n += 1
            if st.prefill_steps and st.prefill_compute_s and st.prefill_tokens_per_step:
                self.observe_stage(plan, cluster, model, st.node, "prefill", 1e3 * st.prefill_compute_s,
                                   max(1, round(st.prefill_tokens_per_step)), None, profiles)
                n += 1
        return n

    @staticmethod
    def _window_slowdowns(stage_times, cluster: Cluster, model: ModelSpec, profiles: ProfileSet | None,
                          window_s: float | None) -> dict[str, float]:
        """node -> the expected slowdown of its steps over a telemetry window from the other stages on its host."""
        if not window_s or window_s <= 0:
            return {}
        busy = {st.node: min(1.0, ((st.decode_steps or 0) * (st.decode_compute_s or 0.0)
                                   + (st.prefill_steps or 0) * (st.prefill_compute_s or 0.0)) / window_s)
                for st in stage_times}
        out = {}
        for node in busy:
            n = cluster.node(node)
            others = [busy[o] for o in busy if o != node and n.host is not None and cluster.node(o).host == n.host]
            prof = profiles.find(n, model.name) if profiles else None
            if others and prof is not None and prof.corun is not None:
                out[node] = expected_slowdown(prof.corun_slowdown, others)
        return out

    def factor(self, node: str, phase: str) -> float:
        return self.factors.get((node, phase), 1.0)

    # --- the transport and the driver: what a pass through the pipeline costs beyond the stages ---

    def observe_message(self, nbytes: float, measured_ms: float, modeled_ms: float = 0.0) -> None:
        """One message's measured transfer time (send to delivery, with its receiver waiting for it)
        against the link model's time for it; refits the fixed and per-MB cost over the latest
        MESSAGES_KEPT (least squares, neither below 0)."""
        if not (nbytes >= 0 and math.isfinite(nbytes)):
            raise ValueError(f"a message's bytes must be a finite number >= 0, not {nbytes}")
        if not (measured_ms >= 0 and math.isfinite(measured_ms) and modeled_ms >= 0 and math.isfinite(modeled_ms)):
            raise ValueError(f"transfer times must be finite and >= 0 (measured {measured_ms}, modeled {modeled_ms})")
        self._messages = [*self._messages[-(self.MESSAGES_KEPT - 1):], (nbytes / 1e6, measured_ms - modeled_ms)]
        xs, ys = [x for x, _ in self._messages], [y for _, y in self._messages]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        if max(xs) - min(xs) < self.MESSAGE_SPAN_MB:
            self.message_fixed_ms, self.message_ms_per_mb = max(0.0, my), 0.0
            return
        sxx = sum((x - mx) ** 2 for x in xs)
        b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx)
        a = my - b * mx
        if a < 0:                    # through the origin: all of it per byte
            sx2 = sum(x * x for x in xs)
            a, b = 0.0, (max(0.0, sum(x * y for x, y in zip(xs, ys)) / sx2) if sx2 > 0 else 0.0)
        self.message_fixed_ms, self.message_ms_per_mb = a, b

    def message_ms(self, nbytes: float) -> float:
        """The transport's own cost of a message of `nbytes`, beyond its link's latency and bandwidth."""
        return self.message_fixed_ms + self.message_ms_per_mb * nbytes / 1e6

    def observe_driver(self, ms: float) -> float:
        """Fold in the engine's own time per step outside the pipeline's forward."""
        if not (ms >= 0 and math.isfinite(ms)):
            raise ValueError(f"the driver's time per step must be finite and >= 0, not {ms}")
        self.driver_ms = smoothed(self.driver_ms, self._driver_n, ms, self.alpha)
        self._driver_n += 1
        return self.driver_ms

    def observe_transport(self, transport: dict, cluster: Cluster, driver_node: str | None = None) -> int:
        """Fold in the service's telemetry (executor.telemetry.Telemetry.transport(): per hop of steps with
        one group in flight, where each receiver waits for its message, the mean bytes and transfer time;
        and the driver's time per step). Each hop's modeled time is its link's (latency + bytes /
        bandwidth), none between the driver and a stage on the driver's own node. Returns the figures
        folded in."""
        n = 0
        for h in transport.get("hops", ()):          # a hop without its figures is malformed: KeyError / TypeError
            nbytes, seconds = float(h["bytes_per_step"]), float(h["transfer_s"])
            src = driver_node if h["src"] == "driver" else h["src"]
            dst = driver_node if h["dst"] == "driver" else h["dst"]
            link = cluster.link(src, dst) if src and dst and src != dst else None
            modeled = link_ms(link, nbytes) if link else 0.0
            self.observe_message(nbytes, 1e3 * seconds, modeled)
            n += 1
        if transport.get("driver_s") is not None:
            self.observe_driver(1e3 * transport["driver_s"])
            n += 1
        return n


def stage_step_ms(model: ModelSpec, s: StageShape, node: Node, phase: str, tokens: int,
                  context: int | None = None, profile: Profile | None = None) -> float:
    """Uncorrected step time of a stage: prefill of one prompt of `tokens` tokens, or decode of
    `tokens` sequences at `context` (default: the prompt length of a default Traffic)."""
    if phase == "prefill":
        return prefill_ms(model, s, node, tokens, profile)
    ctx = Traffic().prompt_tokens if context is None else context
    return decode_ms(model, s, node, tokens, Traffic(), profile, context=ctx)


def link_ms(link: Link, nbytes: float) -> float:
    """The link model's time for a message of `nbytes`: latency + bytes / bandwidth."""
    return link.latency_ms + 1e3 * nbytes * 8 / (link.bandwidth_gbps * 1e9)


def hop_ms(model: ModelSpec, link: Link, tokens: int) -> float:
    """Time to send the activations of `tokens` tokens over a link."""
    return link_ms(link, tokens * model.hidden_size * model.dtype_bytes)


def logits_hop_ms(model: ModelSpec, link: Link, rows: int) -> float:
    """Time to send `rows` rows of fp32 logits from the LM-head stage to the driver over a link."""
    return link_ms(link, rows * model.vocab_size * 4)


def node_price(node: Node, prices: dict[str, float] | None = None) -> float:
    """Hourly price of a node (its own override, the price table's, or its GPU kind's list price)."""
    if node.price_per_hour is None and prices and node.gpu in prices:
        return prices[node.gpu] * node.gpus
    return node.hourly_price


def group_sizes(n: int, groups: int) -> list[int]:
    """How the engine spreads n requests over its groups: each joins the group with the fewest
    (Scheduler.schedule), so sizes differ by at most one; empty groups are left out."""
    return [n // groups + (1 if j < n % groups else 0) for j in range(groups) if n // groups or j < n % groups]


def micro_batches(rows: int, tokens_per_row: float, stages: int) -> list[int]:
    """Rows of each micro-batch a step of `rows` prompts is cut into (runtime.DistributedPipeline:
    one per stage when the step has MICRO_BATCH_MIN_TOKENS per stage, near-equal, split_rows).
    tokens_per_row may be a mean (the simulator's rows differ); the sum is compared with a margin."""
    enough = rows * tokens_per_row >= MICRO_BATCH_MIN_TOKENS * stages - 1e-9
    parts = min(stages, rows) if stages > 1 and enough else 1
    bounds = [round(i * rows / parts) for i in range(parts + 1)]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def flow_shop(work: Sequence[Sequence[float]], hops: Sequence[Sequence[float]],
              hosts: Sequence[str | None] | None = None,
              slowdown: Sequence[Callable[[float], float]] | None = None) -> list[float]:
    """When each job of a wave launched at once (micro-batches, in launch order) is back: the jobs go
    through the stages in order and each stage takes one at a time, in launch order (a permutation
    flow shop). work[m][s]: the ms job m takes on stage s alone; hops[m][s]: its transfer after stage s
    (to the next stage, or after the last back to the driver), which occupies no stage.

    Stages whose nodes name the same host (hosts[s]; None: a machine of its own) slow each other while
    they compute at once: each progresses at 1 / slowdown[s](n), n the stages of its host computing at
    that moment (the host's measured co-run slowdown; the cores are shared as they go). Without shared
    hosts this is the recursion done(m, s) = max(arrival(m, s), done(m - 1, s)) + work[m][s]."""
    M = len(work)
    k = len(work[0]) if M else 0
    done = [0.0] * M
    shared = hosts is not None and slowdown is not None and len({h for h in hosts if h is not None}) < sum(
        h is not None for h in hosts)
    if not shared:
        free = [0.0] * k
        for m in range(M):
            t = 0.0                               # when job m reaches stage s
            for s in range(k):
                free[s] = max(t, free[s]) + work[m][s]
                t = free[s] + hops[m][s]
            done[m] = t
        return done
    # a fluid simulation, event to event: a stage starts its next job once it is free and the job has
    # arrived; between events every computing stage drains its job's alone-time at its rate
    ready = [[math.inf] * k for _ in range(M)]    # when job m reaches stage s
    for m in range(M):
        ready[m][0] = 0.0
    nxt = [0] * k                                 # the next job each stage takes
    left: list[float | None] = [None] * k         # alone-ms left of the job on each stage (None: idle)
    now, finished = 0.0, 0
    while finished < M:
        for s in range(k):
            if left[s] is None and nxt[s] < M and ready[nxt[s]][s] <= now + 1e-12:
                left[s] = work[nxt[s]][s]
        busy = [s for s in range(k) if left[s] is not None]
        rate = {}
        for s in busy:
            n = sum(1 for o in busy if hosts[o] is not None and hosts[o] == hosts[s]) if hosts[s] is not None else 1
            rate[s] = 1.0 / slowdown[s](n)
        t_next = min([now + left[s] / rate[s] for s in busy]
                     + [ready[nxt[s]][s] for s in range(k) if left[s] is None and nxt[s] < M
                        and ready[nxt[s]][s] > now], default=math.inf)
        if t_next == math.inf:
            raise ValueError("flow_shop: a job can never reach its stage")
        dt = t_next - now
        now = t_next
        for s in busy:
            left[s] -= rate[s] * dt
            if left[s] <= 1e-9:
                m = nxt[s]
                left[s] = None
                nxt[s] += 1
                if s + 1 < k:
                    ready[m][s + 1] = now + hops[m][s]
                else:
                    done[m] = now + hops[m][s]
                    finished += 1
    return done


def busy_count_distribution(probs: Sequence[float]) -> list[float]:
    """P(n of these are busy), n = 0..len(probs), each busy on its own with its probability
    (a Poisson binomial, built one stage at a time)."""
    dist = [1.0]
    for p in probs:
        dist = [a * (1 - p) + b * p for a, b in zip(dist + [0.0], [0.0] + dist)]
    return dist


def expected_slowdown(slowdown: Callable[[float], float], others_busy: Sequence[float]) -> float:
    """A step's expected slowdown from the other stages on its host, each busy with its probability:
    sum_n P(n of them busy) * slowdown(1 + n)."""
    return sum(p * slowdown(1 + n) for n, p in enumerate(busy_count_distribution(others_busy)))


def host_slowdowns(hosts: Sequence[str | None], work_ms: Sequence[float], slowdown: Sequence[Callable[[float], float]],
                   round_of: Callable[[list[float]], float], iterations: int = 30,
                   io_ms: Sequence[float] | None = None,
                   others: Sequence[tuple[str | None, float]] = ()) -> tuple[list[float], float]:
    """The slowdown of each stage's steps from the other stages on its host that compute at the same
    time, and the round they make together: a fixed point.

    Stage s does work_ms[s] of steps per round when alone on its host; slowed by sigma[s], it is busy
    u[s] = min(1, (sigma[s] * work_ms[s] + io_ms[s]) / round) of the round (io_ms: what its worker
    spends on its messages, busy on the cores but not a step). Each other stage on the host is taken to
    be busy at a random moment of the round with its own u, independently, so n of them are busy with
    busy_count_distribution's probabilities, and sigma[s] = sum_n P(n) * slowdown[s](1 + n) (the host's
    measured co-run slowdown with 1 + n stages computing). `others`: (host, busy ms per round) of
    parties that are not stages but work on a host's cores, the driver (its turn and its messages):
    busy u = min(1, ms / round), counted as one more stage computing. round_of(sigma) is the round
    those slowdowns give. Stages with no host (None) or alone on theirs keep 1."""
    k = len(hosts)
    io = list(io_ms) if io_ms is not None else [0.0] * k
    sigma = [1.0] * k
    shared = [[o for o in range(k) if o != s and hosts[s] is not None and hosts[o] == hosts[s]] for s in range(k)]
    extra = [[ms for h, ms in others if hosts[s] is not None and h == hosts[s] and ms > 0] for s in range(k)]
    r = round_of(sigma)
    if not any(shared) and not any(extra):
        return sigma, r
    for _ in range(iterations):
        if not (0 < r < math.inf):
            break
        u = [min(1.0, (sigma[s] * work_ms[s] + io[s]) / r) for s in range(k)]
        new = [expected_slowdown(slowdown[s], [u[o] for o in shared[s]] + [min(1.0, ms / r) for ms in extra[s]])
               if shared[s] or extra[s] else 1.0 for s in range(k)]
        # halfway to the new value: a longer round lowers u, which lowers sigma; damping keeps it from see-sawing
        step = max(abs(a - b) for a, b in zip(new, sigma))
        sigma = [(a + b) / 2 for a, b in zip(new, sigma)]
        r = round_of(sigma)
        if step < 1e-4:
            break
    return sigma, r


def closed_cycle_ms(service_ms: Sequence[float], delay_ms: float, jobs: int, scv: float = 0.0) -> float:
    """The time one of `jobs` circulating jobs takes around a loop of single-server stations (each
    taking service_ms[s] per visit, one job at a time) and a pure delay: approximate mean value analysis
    for a closed network, with the residual of the job in service that an arriving one waits out at
    (1 + scv) / 2 of a service (scv: squared coefficient of variation; 0 for steps of fixed length):
        R_s(n) = S_s + S_s (Q_s(n-1) - U_s(n-1)) + U_s(n-1) S_s (1 + scv) / 2
        C(n) = sum_s R_s(n) + delay;  Q_s(n) = n R_s(n) / C(n);  U_s(n) = n S_s / C(n)
    It counts what the max of the bounds (a job's own pass, a station's work for every job) leaves out
    where they are near balance: a group reaching a stage while another group's step is under way
    waits out its rest. Below the bounds it is not a round: estimate takes the larger."""
    q = [0.0] * len(service_ms)
    u = [0.0] * len(service_ms)
    cycle = delay_ms + sum(service_ms)
    for n in range(1, jobs + 1):
        r = [sv + sv * (qs - us) + us * sv * (1 + scv) / 2 for sv, qs, us in zip(service_ms, q, u)]
        cycle = sum(r) + delay_ms
        q = [n * rs / cycle for rs in r]
        u = [n * sv / cycle for sv in service_ms]
    return cycle


def engine_groups(stages: int, groups_in_flight: int | None) -> int:
    """Groups of requests the engine keeps in flight: the setting, else one per stage (EngineConfig.
    pipeline_groups = None; a one-stage plan has nothing to overlap)."""
    g = stages if groups_in_flight is None else groups_in_flight
    if g < 1:
        raise ValueError(f"groups_in_flight must be at least 1, not {groups_in_flight}")
    return g


def estimate(plan: PlacementPlan, cluster: Cluster, model: ModelSpec, traffic: Traffic,
             prices: dict[str, float] | None = None, profiles: ProfileSet | None = None,
             corrections: Corrections | None = None, groups_in_flight: int | None = 1,
             prefill_rows: int = 1, driver_node: str | None = None,
             prompt_tokens_per_s: float = 0.0, prompt_chunk_tokens: int | None = None,
             stage_io: bool = True, corun_driver: bool = True, queueing: bool = True) -> Estimates:
    """Estimates for a plan whose nodes exist and whose consecutive stages are linked (formulas above).
    groups_in_flight=None: as the engine by default, one group per stage. (The default stays 1 until
    the simulator and the planner, which mirror these formulas, default to the engine's too.)
    prompt_tokens_per_s: the prompts arriving while it decodes, in tokens per second; their chunks ride
    in the decode steps (joined_prefill_ms), so TPOT and throughput are at that load (0: decode alone).
    prompt_chunk_tokens: the tokens of a prompt one step takes at most while others decode (the engine's
    prefill budget while decoding, shared by the groups of a round; default the whole prompt). Chunks
    come whole, not spread thinly over every step: a step carrying one costs joined_prefill_ms of the
    chunk, and x tokens a step on average cost x / chunk of that (spread evenly, x tokens would mostly
    hide under the weight read, and the simulator measured TPOT 20-45% over such an estimate at load).
    stage_io=False leaves io_s out of the round, corun_driver=False the driver's and the messages' work
    out of a shared host's slowdowns, queueing=False the groups' queueing at stages on a shared host
    (closed_cycle_ms) (the controls `continuo bench predict` prints)."""
    if prefill_rows < 1:
        raise ValueError(f"prefill_rows must be at least 1, not {prefill_rows}")
    if prompt_chunk_tokens is not None and prompt_chunk_tokens < 1:
        raise ValueError(f"prompt_chunk_tokens must be at least 1, not {prompt_chunk_tokens}")
    L, k, B, P = model.num_layers, len(plan.stages), traffic.concurrency, traffic.prompt_tokens
    # a step's prompt budget is shared by the groups of a round (as the simulator runs it)
    chunk = min(P, prompt_chunk_tokens or P) / min(engine_groups(k, groups_in_flight), B)
    g_engine = engine_groups(k, groups_in_flight)
    g = min(g_engine, B)
    sizes = group_sizes(B, g)                     # decoding rows of each group
    # the transport's own cost per message beyond the link model, and the driver's per step (measured:
    # Corrections.observe_transport; 0 without)
    msg = corrections.message_ms if corrections else (lambda nbytes: 0.0)
    act_bytes = model.hidden_size * model.dtype_bytes          # activations per token, one hop
    # the stages, each with its step-time functions (corrected) and the link to the next stage
    stages, pre_fn, dec_fn, hop_fn, ser_fn, io_fn, hosts, slow_fn, pre_slow = [], [], [], [], [], [], [], [], []
    link_fn = []
    for i, st in enumerate(plan.stages):
        node = cluster.node(st.node)
        shape = StageShape(st.stop - st.start, st.start == 0, st.stop == L)
        prof = profiles.find(node, model.name) if profiles else None
        hosts.append(node.host)
        slow_fn.append(prof.corun_slowdown if prof is not None else (lambda n: 1.0))
        pre_slow.append(prof.corun_prefill_slowdown if prof is not None else (lambda n: 1.0))
        fp = corrections.factor(st.node, "prefill") if corrections else 1.0
        fd = corrections.factor(st.node, "decode") if corrections else 1.0
        pre_fn.append(lambda r, shape=shape, node=node, prof=prof, fp=fp: fp * prefill_ms(model, shape, node, P, prof, r))
        dec_fn.append(lambda m, x=0.0, shape=shape, node=node, prof=prof, fd=fd: fd * (
            decode_ms(model, shape, node, m, traffic, prof)
            + x / chunk * joined_prefill_ms(model, shape, node, m, decode_context(traffic), chunk, prof)))
        link = cluster.link(st.node, plan.stages[i + 1].node) if i + 1 < k else None
        hop_fn.append((lambda t, link=link: hop_ms(model, link, t) + msg(t * act_bytes)) if link is not None
                      else (lambda t: 0.0))
        ser_fn.append((lambda t, link=link: hop_ms(model, link, t) - link.latency_ms) if link is not None
                      else (lambda t: 0.0))
        link_fn.append((lambda t, link=link: hop_ms(model, link, t)) if link is not None else (lambda t: 0.0))
        # what the stage's own worker spends on a group's messages: the step message and activations it
        # takes, the activations or logits it sends (m rows, x prompt tokens riding along)
        io_fn.append((lambda m, x: 0.0) if not stage_io else
                     lambda m, x, first=i == 0, last=i + 1 == k: msg(0) + (0.0 if first else msg((m + x) * act_bytes))
                     + msg(m * model.vocab_size * 4 if last else (m + x) * act_bytes))
        stages.append(StageEstimate(
            node=st.node, weight_bytes=weight_bytes(model, shape), kv_bytes=kv_bytes(model, shape, traffic),
            workspace_bytes=workspace_bytes(model, shape, traffic), memory_bytes=memory_bytes(model, shape, traffic),
            capacity_bytes=node.usable_memory_bytes, prefill_ms=pre_fn[-1](prefill_rows), decode_ms=dec_fn[-1](B),
            hop_out_ms_prefill=hop_fn[-1](prefill_rows * P), hop_out_ms_decode=hop_fn[-1](B),
            source="measured" if prof is not None else "datasheet", correction_prefill=fp, correction_decode=fd))
    # the logits of the sampled rows go back to the driver (it samples), over a link when it sits on
    # another node; each pass also costs the driver's step message to the first stage, the transport's
    # cost of both messages, and the driver's own turn
    last = plan.stages[-1].node
    back_link_ = cluster.link(last, driver_node) if driver_node and driver_node != last else None
    driver_ms = corrections.driver_ms if corrections else 0.0

    def back_link(r):
        return logits_hop_ms(model, back_link_, r) if back_link_ is not None else 0.0

    def back(r):
        return back_link(r) + msg(r * model.vocab_size * 4) + msg(0) + driver_ms

    # TTFT: the wave's prompts spread over the engine's groups, each group's step cut into micro-batches;
    # all are launched at once and go through the stages in launch order (a flow shop)
    waves = [micro_batches(r, P, k) for r in group_sizes(prefill_rows, min(g_engine, prefill_rows))]
    jobs = [rows for parts in waves for rows in parts]
    done = flow_shop([[pre_fn[s](rows) for s in range(k)] for rows in jobs],
                     [[hop_fn[s](rows * P) for s in range(k - 1)] + [back(rows)] for rows in jobs], hosts, pre_slow)
    ttfts, m = [], 0
    for parts in waves:                           # a group's first tokens come with its last micro-batch
        ttfts += [max(done[m:m + len(parts)])] * sum(parts)
        m += len(parts)
    ttft = statistics.median(ttfts)

    # decode, steady state: each group's token needs a pass through every stage; each stage computes
    # every group's step once per round, each link carries every group's activations once; x prompt
    # tokens ride in each group's step (and its hops). With groups in flight, stages that share a host
    # and compute at once slow each other (host_slowdowns: each stage's busy share and the round they
    # make, a fixed point)
    slowed = [1.0] * k
    host_list = [h for h in hosts if h is not None]
    shared_host = len(set(host_list)) < len(host_list)

    def round_at(x: float, sig: list[float]) -> float:
        def pass_ms(m):
            return sum(sig[s] * dec_fn[s](m, x) + hop_fn[s](m + x) for s in range(k)) + back(m)
        bound = max(max(pass_ms(m) for m in set(sizes)),
                    max(sum(sig[s] * dec_fn[s](m, x) + io_fn[s](m, x) for m in sizes) for s in range(k)),
                    max(sum(ser_fn[s](m + x) for m in sizes) for s in range(k)))
        if g == 1 or not (queueing and shared_host):
            return bound
        # near balance, groups queue at stages that share a host (closed_cycle_ms): there a step's length
        # varies with what the others do at that moment, so groups do not keep in step
        service = [statistics.mean(sig[s] * dec_fn[s](m, x) + io_fn[s](m, x) for m in sizes) for s in range(k)]
        delay = statistics.mean(sum(link_fn[s](m + x) for s in range(k)) + back_link(m) + driver_ms for m in sizes)
        return max(bound, closed_cycle_ms(service, delay, g))

    def round_of(x: float) -> float:
        nonlocal slowed
        if g == 1:                  # one group: the stages take turns, none computes beside another
            return round_at(x, slowed)
        work = [sum(dec_fn[s](m, x) for m in sizes) for s in range(k)]
        io = [sum(io_fn[s](m, x) for m in sizes) for s in range(k)]
        # the driver's turn and its two messages per group step work on its node's host too
        drv = [(cluster.node(driver_node).host, sum(driver_ms + msg(0) + msg(m * model.vocab_size * 4)
                                                     for m in sizes))] if driver_node and corun_driver else []
        slowed, r = host_slowdowns(hosts, work, slow_fn, lambda sig: round_at(x, sig),
                                   io_ms=io if corun_driver else None, others=drv)
        return r
    round_ms = idle_round_ms = round_of(0.0)
    if prompt_tokens_per_s > 0:
        # a longer round gathers more prompt tokens per step: iterate to the fixed point; past the load
        # the steps can absorb (the round grows without bound) the pipeline cannot keep up: inf
        for _ in range(60):
            nxt = round_of(prompt_tokens_per_s * round_ms / 1e3 / len(sizes))
            if nxt > 1e3 * idle_round_ms:
                round_ms = math.inf
                break
            done = abs(nxt - round_ms) <= 1e-4 * round_ms
            round_ms = nxt
            if done:
                break
        else:
            round_ms = math.inf
    if any(f != 1.0 for f in slowed):
        stages = [st.model_copy(update={"host_slowdown": f}) for st, f in zip(stages, slowed)]
    cost = sum(node_price(cluster.node(n), prices) for n in dict.fromkeys(plan.nodes))
    sources = {s.source for s in stages}
    return Estimates(ttft_ms=ttft, tpot_ms=round_ms, throughput_tok_s=1e3 * B / round_ms,
                     cost_per_hour=cost, stages=tuple(stages),
                     source=sources.pop() if len(sources) == 1 else "mixed", groups_in_flight=g)


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
