"""The engine: continuous batching over a pipeline of stages.

    step(): schedule -> run stages in order -> sample -> collect finished

With a pipeline of k stages on other processes (DistributedPipeline) the running requests are
split into k groups, each stepped on its own, and up to k steps are in flight at once (as vLLM's
virtual engines): while stage 2 computes group 0, stage 1 already computes group 1, so every stage
works on a whole batch of some group and no weight is read twice for one group's step.

    step(): launch every idle group that has work -> wait for the oldest in flight -> sample it

Requests join and leave between steps. A step is either a prefill step (prompt chunks of
newly admitted requests) or a decode step (one token for every running request), as in
nano-vllm. KV memory for a request's whole budget (prompt + max_tokens) is reserved when it
is admitted, so a running request never has to be preempted and recomputed.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .stage import Stage, StepBatch, build_stages, even_bounds
from .structured import GrammarError, Guidance, Guide, mask_logits
from .weights import WeightSource, open_source


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


class ContextTooLong(ValueError):
    """prompt + max_tokens exceeds the context window; refused rather than truncated."""


MAX_TOP_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5      # below it a row samples greedily: float32 logits / T overflow long before T -> 0


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a sampled token under the model (before any grammar mask or
    temperature, as vLLM reports by default) and the top alternatives, best first."""
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0            # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None             # same seed -> same tokens (a generator per request)
    stop: tuple[str, ...] = ()          # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    grammar: str | None = None          # structured output (executor/structured.py): only tokens it allows
    logprobs: int | None = None         # None: none; k >= 0: the sampled token's logprob and the top k

    def __post_init__(self):
        if self.max_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling params {self}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {self.logprobs}")
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 16              # running requests decoded together
    max_waiting: int = 64               # bound of the waiting queue
    max_model_len: int = 2048           # context window: prompt + max_tokens
    max_prefill_tokens: int = 512       # prompt tokens per prefill step (longer prompts go in chunks)
    # ... and per step while other requests are decoding: a newcomer's prompt is spread over a few
    # steps, each a little longer, instead of one step that stalls every stream (stall-free batching).
    # On the CPU dev machine a prompt token costs about as much as a whole decode row of 8: with 32
    # tokens per step a newcomer made the others' token gaps 2.5-3x the usual, with 8 about 1.5x.
    # A GPU, where a step is bound by weight reads rather than FLOPs, affords far more (e.g. 512).
    max_prefill_tokens_decoding: int = 8
    num_kv_blocks: int = 2048
    block_size: int = 16
    # groups of requests in flight through a pipeline at once; None: one per pipeline stage (a
    # pipeline of one stage, or stages in this process, run one group: nothing to overlap)
    pipeline_groups: int | None = None

    def __post_init__(self):
        if self.pipeline_groups is not None and self.pipeline_groups < 1:
            raise ValueError(f"pipeline_groups must be at least 1, not {self.pipeline_groups}")
        if self.max_prefill_tokens < 1 or self.max_prefill_tokens_decoding < 1:
            raise ValueError("max_prefill_tokens and max_prefill_tokens_decoding must be at least 1")
        if self.max_model_len > self.num_kv_blocks * self.block_size:
            raise ValueError("the KV cache cannot hold one request of max_model_len tokens")


class Status(Enum):
    WAITING, RUNNING, FINISHED = range(3)


@dataclass
class RequestOutput:
    """A finished request, with the timestamps TTFT/TPOT/token gaps are measured from."""
    req_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str                  # "stop" | "length" | "cancelled" | "error" (text says what)
    arrival: float                      # time.perf_counter() at add_request
    token_times: list[float]
    logprobs: list[TokenLogprob] | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[Request, int], None] | None = None
    req_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    num_computed: int = 0               # tokens whose KV is in the cache
    finish_reason: str | None = None
    text: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    guide: Guide | None = None          # where the request stands in its grammar
    logprobs: list[TokenLogprob] | None = None
    group: int = 0                      # which group of running requests it is stepped with

    def __post_init__(self):
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            if self.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.params.seed)

    @property
    def budget(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def pending(self) -> int:
        """Known tokens whose KV is not in the cache yet: the prompt (or what is left of it); then one
        per step while decoding; more after a recompute (the KV was dropped mid-request) or when a
        grammar forced several tokens at once."""
        return len(self.prompt_ids) + len(self.output_ids) - self.num_computed

    @property
    def prefilling(self) -> bool:
        return self.pending > 1 or not self.output_ids

    def known(self, start: int, n: int) -> list[int]:
        """Known tokens start..start+n (prompt, then output)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:start - p + n]
        return self.prompt_ids[start:start + n] + self.output_ids[:max(0, start + n - p)]

    def output(self) -> RequestOutput:
        return RequestOutput(self.req_id, self.prompt_ids, self.output_ids, self.text,
                             self.finish_reason, self.arrival, self.token_times, self.logprobs)


class Scheduler:
    """Admission (queue bound, context window, KV reservation) and batch selection."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_blocks = cfg.num_kv_blocks     # blocks not reserved by a running request
        self.lock = threading.Lock()             # add/cancel may come from a server thread

    def blocks(self, seq: Request) -> int:
        return -(-seq.budget // self.cfg.block_size)

    def add(self, seq: Request) -> None:
        if seq.budget > self.cfg.max_model_len:
            raise ContextTooLong(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens "
                                 f"({seq.params.max_tokens}) exceeds the context window of "
                                 f"{self.cfg.max_model_len} tokens")
        with self.lock:
            if len(self.waiting) >= self.cfg.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests already waiting (max {self.cfg.max_waiting})")
            self.waiting.append(seq)

    def take_cancelled(self, busy: set[int] = frozenset()) -> list[Request]:
        """Cancelled requests leave, except those of a group whose step is in flight (next time)."""
        with self.lock:
            gone = [s for s in itertools.chain(self.waiting, self.running)
                    if s.cancelled and not (s.status == Status.RUNNING and s.group in busy)]
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for s in gone:
            self.finish(s, "cancelled")
        return gone

    def finish(self, seq: Request, reason: str) -> None:
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.free_blocks += self.blocks(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def schedule(self, group: int = 0, groups: int = 1) -> tuple[list[Request], StepBatch] | None:
        """One decode token for every running request of `group` that has its prompt in the cache,
        plus prompt chunks (up to max_prefill_tokens) of those that do not, admitting waiting
        requests FIFO while seats and KV allow (each into the group with the fewest). Mixing them
        means a newcomer's prefill never stalls the others' streams for a whole step; the stage
        packs the ragged rows, so short decode rows cost no padding."""
        with self.lock:
            sizes = self._group_sizes(groups)
            while (self.waiting and len(self.running) < self.cfg.max_num_seqs
                   and self.blocks(self.waiting[0]) <= self.free_blocks):
                seq = self.waiting.popleft()
                seq.status = Status.RUNNING
                # the group with the most room; this one on a tie (it is about to step)
                seq.group = min(range(groups), key=lambda g: (sizes[g], g != group))
                sizes[seq.group] += 1
                self.free_blocks -= self.blocks(seq)
                self.running.append(seq)
            self._rebalance(group, sizes)
        mine = [seq for seq in self.running if seq.group == group]
        decoding = any(not seq.prefilling for seq in mine)
        budget = self.cfg.max_prefill_tokens_decoding if decoding else self.cfg.max_prefill_tokens
        rows = []
        for seq in mine:
            if not seq.prefilling:
                rows.append((seq, seq.output_ids[-1:]))                   # decode
            elif budget > 0:
                n = min(seq.pending, budget)                             # (a chunk of) prefill
                rows.append((seq, seq.known(seq.num_computed, n)))
                budget -= n
        if not rows:
            return None
        seqs = [s for s, _ in rows]
        width = max(len(t) for _, t in rows)
        tokens = torch.tensor([t + [0] * (width - len(t)) for _, t in rows])     # [B, width]
        return seqs, StepBatch([s.req_id for s in seqs], [s.num_computed for s in seqs],
                               [len(t) for _, t in rows], tokens)

    def _group_sizes(self, groups: int) -> list[int]:
        sizes = [0] * groups
        for seq in self.running:
            if seq.group >= groups:          # fewer groups now (a pipeline with fewer stages)
                seq.group = seq.group % groups
            sizes[seq.group] += 1
        return sizes

    def _rebalance(self, group: int, sizes: list[int]) -> None:
        """As requests finish the groups drift apart; the group about to step (none of its requests
        is in flight) hands requests to the smallest until they differ by at most one."""
        small = min(range(len(sizes)), key=sizes.__getitem__)
        spare = [seq for seq in self.running if seq.group == group]
        while sizes[group] > sizes[small] + 1 and spare:
            spare.pop().group = small
            sizes[group] -= 1
            sizes[small] += 1


def _logprob(lp: torch.Tensor, tok: int, k: int) -> TokenLogprob:
    """lp: [vocab] log-probabilities of one row."""
    top = ()
    if k:
        vals, idx = lp.topk(k)
        top = tuple(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(float(lp[tok]), top)


def sample(logits: torch.Tensor, seqs: Sequence[Request]) -> list[int]:
    """logits: [B, vocab] -> one token per row; greedy rows in one argmax, sampled rows each
    with their own generator so a request's tokens do not depend on its batch mates."""
    out = logits.argmax(-1).tolist()
    for b, seq in enumerate(seqs):
        p = seq.params
        if p.temperature < MIN_TEMPERATURE:
            continue                # greedy, the limit as temperature -> 0 (and logits / 1e-210 overflow)
        probs = torch.softmax(logits[b] / p.temperature, -1)
        if p.top_p < 1:
            sorted_p, idx = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = sorted_p.cumsum(-1) - sorted_p < p.top_p
            keep[0] = True          # a top_p below float32's range compares as 0 and would keep nothing
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            continue                # nothing to sample from (a row of -inf): its argmax, never a crash
        out[b] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return out


@dataclass
class Flight:
    """A group's step, launched into the pipeline and not yet back."""
    group: int
    seqs: list[Request]
    batch: StepBatch
    ticket: Any


class Engine:
    def __init__(self, stages: Sequence[Stage], config: EngineConfig = EngineConfig(),
                 tokenizer: Any = None, eos_token_ids: Iterable[int] = (), vocab_size: int | None = None):
        self.stages, self.config, self.tokenizer = list(stages), config, tokenizer
        self.vocab_size = vocab_size        # rows of the LM head (may exceed the tokenizer's vocabulary)
        self.eos_token_ids = set(eos_token_ids)
        self.scheduler = Scheduler(config)
        self.seqs: dict[int, Request] = {}
        self._guidance: Guidance | None = None
        self.inflight: deque[Flight] = deque()  # launched group steps, oldest first

    @property
    def guidance(self) -> Guidance:
        """The tokenizer in llguidance's form, built on the first constrained request."""
        if self._guidance is None:
            vocab = self.vocab_size or (len(self.tokenizer) if self.tokenizer is not None else 0)
            self._guidance = Guidance(self.tokenizer, vocab, sorted(self.eos_token_ids))
        return self._guidance

    # --- requests --------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
                    on_token: Callable[[Request, int], None] | None = None) -> int:
        """Queue a prompt (text or token ids); returns the request id. Raises QueueFull or
        ContextTooLong, or GrammarError for a grammar that does not compile. on_token(seq, token_id)
        is called for every token as it is made."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        seq = Request(ids, params, on_token)
        if params.grammar is not None:
            seq.guide = self.guidance.guide(params.grammar)
        self.scheduler.add(seq)
        self.seqs[seq.req_id] = seq
        return seq.req_id

    def cancel(self, req_id: int) -> None:
        """Stop a request; it leaves at the next step with finish_reason 'cancelled'."""
        if req_id in self.seqs:
            self.seqs[req_id].cancelled = True

    def recompute_all(self) -> list[int]:
        """Drop the KV of every running request; each re-prefills its prompt and outputs so far
        (the baseline a live KV migration is measured against). Returns their ids."""
        ids = [s.req_id for s in self.scheduler.running]
        for stage in self.stages:
            stage.free(ids)
        for s in self.scheduler.running:
            s.num_computed = 0
        return ids

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.inflight)

    @property
    def groups(self) -> int:
        """Groups stepped in flight at once: one per stage of a pipeline that can launch steps
        without waiting for them (see the module docstring), else 1."""
        stage = self.stages[0]
        if len(self.stages) != 1 or not hasattr(stage, "launch"):
            return 1
        return self.config.pipeline_groups or max(1, stage.depth)

    # --- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration; returns the requests that finished in it."""
        if self.groups == 1 and not self.inflight:
            done = self.scheduler.take_cancelled()
            scheduled = self.scheduler.schedule()
            if scheduled is not None:
                seqs, batch = scheduled
                logits = self.run_stages(batch)
                done += self.postprocess(seqs, batch, logits)
            return self._finish(done)
        # groups in flight: launch every idle group that has work, then take the oldest flight
        busy = {f.group for f in self.inflight}
        done = self.scheduler.take_cancelled(busy)
        k = self.groups
        for g in range(k):
            if g in busy:
                continue
            scheduled = self.scheduler.schedule(g, k)
            if scheduled is not None:
                seqs, batch = scheduled
                self.inflight.append(Flight(g, seqs, batch, self.stages[0].launch(batch)))
        if self.inflight:
            f = self.inflight.popleft()
            logits = self.stages[0].finish(f.ticket)
            done += self.postprocess(f.seqs, f.batch, logits)
        return self._finish(done)

    def drain(self) -> list[RequestOutput]:
        """Finish every step in flight (before anything that talks to the workers out of turn: a
        reconfiguration's round, a call); returns the requests that finished meanwhile."""
        done: list[Request] = []
        while self.inflight:
            f = self.inflight.popleft()
            done += self.postprocess(f.seqs, f.batch, self.stages[0].finish(f.ticket))
        return self._finish(done)

    def abandon(self) -> None:
        """The pipeline broke: forget the steps in flight (their requests are failed by the caller)."""
        while self.inflight:
            f = self.inflight.popleft()
            try:
                self.stages[0].abandon(f.ticket)
            except RuntimeError:
                pass            # the sends to a dead worker fail; nothing is waiting for them

    def _finish(self, done: list[Request]) -> list[RequestOutput]:
        for stage in self.stages:
            stage.free([s.req_id for s in done])
        for s in done:
            self.seqs.pop(s.req_id, None)
            if self.tokenizer is not None and s.text is None:
                s.text = self.tokenizer.decode(s.output_ids, skip_special_tokens=True)
        return [s.output() for s in done]

    def run_stages(self, batch: StepBatch) -> torch.Tensor:
        x = None
        for stage in self.stages:
            x = stage.forward(batch, x)
        return x                                 # [B, vocab]: each row's last new token

    def postprocess(self, seqs: list[Request], batch: StepBatch, logits: torch.Tensor) -> list[Request]:
        for seq, n in zip(seqs, batch.num_new):
            seq.num_computed += n
        # only rows whose every known token is now computed sample, not those in the middle of a
        # prompt or of forced tokens (chunked)
        ready = [b for b, s in enumerate(seqs) if s.num_computed == len(s.prompt_ids) + len(s.output_ids)]
        if not ready:
            return []
        rows = [seqs[b] for b in ready]
        logits = logits[ready]                              # [R, vocab], a copy: masking stays local
        raw = logits.log_softmax(-1) if any(s.logprobs is not None for s in rows) else None
        self.apply_grammars(logits, rows)
        tokens = sample(logits, rows)
        now, done = time.perf_counter(), []
        for r, (seq, tok) in enumerate(zip(rows, tokens)):
            if seq.logprobs is not None:
                seq.logprobs.append(_logprob(raw[r], tok, seq.params.logprobs))
            new = [tok]
            if seq.guide is not None:
                try:
                    seq.guide.advance(tok)
                except GrammarError as e:       # cannot happen under the mask; if it does, end this request only
                    seq.text = f"grammar error: {e}"
                    self.scheduler.finish(seq, "error")
                    done.append(seq)
                    continue
                # tokens the grammar forces next join the output now; their KV is computed in the next
                # step as one chunk, like a prompt, with no sampling step each (not with logprobs: the
                # model's logprob of a forced token is never computed)
                if seq.logprobs is None:
                    new += seq.guide.forced()
            for i, t in enumerate(new):
                if i:
                    seq.guide.advance(t)
                seq.output_ids.append(t)
                seq.token_times.append(now)
                if seq.on_token is not None:
                    seq.on_token(seq, t)
                reason = self.stop_reason(seq, t)
                if reason:
                    self.scheduler.finish(seq, reason)
                    done.append(seq)
                    break
        return done

    def apply_grammars(self, logits: torch.Tensor, rows: Sequence[Request]) -> None:
        """logits: [R, vocab]; rows with a grammar keep only the tokens it allows next."""
        guided = [r for r, s in enumerate(rows) if s.guide is not None]
        if not guided:
            return
        bitmask = self.guidance.bitmask(len(guided))
        for i, r in enumerate(guided):
            rows[r].guide.fill(bitmask, i)
        sub = logits[guided]
        mask_logits(sub, bitmask)
        logits[guided] = sub

    def stop_reason(self, seq: Request, tok: int) -> str | None:
        p = seq.params
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if seq.guide is not None and seq.guide.done:
            return "stop"       # the grammar is complete: nothing but the end could follow
        if p.stop and self.tokenizer is not None:
            # a stop string ends within the last few tokens: decode only a tail, not the whole text
            tail = self.tokenizer.decode(seq.output_ids[-max(map(len, p.stop)) - 1:], skip_special_tokens=True)
            if any(s in tail for s in p.stop):
                text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
                seq.text = text[:min(text.find(s) for s in p.stop if s in text)]
                return "stop"
        if len(seq.output_ids) >= p.max_tokens:
            return "length"
        return None

    # --- conveniences ----------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[RequestOutput]:
        """Run prompts to completion (all admitted together), outputs in prompt order."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results: dict[int, RequestOutput] = {}
        while self.has_unfinished():
            results.update((o.req_id, o) for o in self.step())
        return [results[i] for i in ids]

    @classmethod
    def local(cls, source: WeightSource | str | None = None, bounds: Sequence[int] | None = None,
              num_stages: int = 1, config: EngineConfig | None = None,
              dtype: torch.dtype = torch.float32) -> Engine:
        """An engine whose stages all run in this process (default: the embedded SmolLM2 GGUF)."""
        src = open_source(source)
        cfg = src.config
        config = config or EngineConfig(max_model_len=min(cfg.max_position, EngineConfig.max_model_len))
        stages = build_stages(src, bounds or even_bounds(cfg.num_layers, num_stages),
                              config.num_kv_blocks, config.block_size, dtype)
        return cls(stages, config, src.tokenizer(), cfg.eos_token_ids, cfg.vocab_size)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, with the model's chat template and the assistant turn opened."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
