"""Stages: what the engine calls, in order, once per step.

The engine only knows the `Stage` protocol. `LocalStage` runs a StageModel with its own KV
cache in this process; the distributed layer implements the same protocol with a stage that
sends the step to a worker process.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .kvcache import KVCache
from .model import ModelConfig, Rotary, StageModel, prepack
from .weights import WeightSource


@dataclass
class StepBatch:
    """One step's work, the same message for every stage (plain data, so it can be sent).

    Row b adds num_new[b] tokens to request req_ids[b] at positions starts[b].. ;
    tokens is [B, width] (padded) and only the first stage reads it."""
    req_ids: list[Any]
    starts: list[int]
    num_new: list[int]
    tokens: torch.Tensor

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


class Stage(Protocol):
    start: int                      # first layer owned
    end: int                        # one past the last layer owned

    def forward(self, batch: StepBatch, x: torch.Tensor | None) -> torch.Tensor:
        """Hidden states [B, width, hidden] in (None for the first stage) -> hidden out,
        or logits [B, vocab] of each row's last new token from the last stage."""

    def free(self, req_ids: Sequence[Any]) -> None:
        """Forget finished or cancelled requests (their KV cache blocks)."""


class LocalStage:
    """A stage in this process: a plain StageModel plus the KV cache of its layers."""

    def __init__(self, model: StageModel, cache: KVCache):
        self.model, self.cache = model, cache
        self.start, self.end = model.start, model.end

    @torch.inference_mode()
    def forward(self, batch: StepBatch, x: torch.Tensor | None) -> torch.Tensor:
        B, width, dev = len(batch.req_ids), batch.width, self.cache.k.device
        positions = (torch.tensor(batch.starts).unsqueeze(1) + torch.arange(width)).to(dev)   # [B, width]
        attend = self.cache.prepare(batch.req_ids, batch.starts, batch.num_new, width)
        num_new = torch.tensor(batch.num_new, device=dev)
        inp = batch.tokens.to(dev) if self.model.is_first else x    # [B, width] ids or [B, width, hidden]
        rows = attend.rows                                           # flat index of real tokens, or None
        if rows is not None:
            # Rows of different lengths are padded to `width`; the dense layers (most of the work)
            # run on the real tokens only, packed into one row [1, N]; attention unpacks them.
            inp = inp.flatten(0, 1)[rows].unsqueeze(0)
            positions = positions.flatten()[rows].unsqueeze(0)
            last = num_new.cumsum(0) - 1                            # each row's last token in the packing
        else:
            last = torch.arange(B, device=dev) * width + num_new - 1  # ... in the flattened [B * width]
        out = self.model(inp, positions, attend, last if self.model.is_last else None)
        if self.model.is_last or rows is None:
            return out
        full = out.new_zeros(B * width, out.shape[-1])               # back to [B, width, hidden] to send on
        full[rows] = out[0]
        return full.view(B, width, -1)

    def free(self, req_ids: Sequence[Any]) -> None:
        self.cache.free(req_ids)


def even_bounds(num_layers: int, num_stages: int) -> list[int]:
    """Layer boundaries [0, ..., num_layers] splitting layers as evenly as possible."""
    q, r = divmod(num_layers, num_stages)
    bounds = [0]
    for i in range(num_stages):
        bounds.append(bounds[-1] + q + (i < r))
    return bounds


def build_stage(source: WeightSource, start: int, end: int, num_kv_blocks: int,
                block_size: int = 16, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> LocalStage:
    """Build the plain model of layers [start, end), place it, and load only its weights."""
    cfg: ModelConfig = source.config
    with torch.device("meta"):          # no random init: every weight is loaded just below
        model = StageModel(cfg, start, end)
    model = model.to_empty(device=device).to(dtype).eval()
    if model.is_first and model.is_last and cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight     # to_empty gave each its own storage
    model.rotary = Rotary(cfg).to(device)         # cos/sin tables stay fp32, cast per step
    model.load_hf_state(source.load(model.hf_names(), dtype))
    prepack(model)
    cache = KVCache(range(start, end), num_kv_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                    dtype, device)
    return LocalStage(model, cache)


def build_stages(source: WeightSource, bounds: Sequence[int], num_kv_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32) -> list[LocalStage]:
    """Local stages for layer boundaries like [0, 10, 30] (two stages: 0-9 and 10-29)."""
    if bounds[0] != 0 or bounds[-1] != source.config.num_layers or list(bounds) != sorted(set(bounds)):
        raise ValueError(f"bounds {list(bounds)} must rise from 0 to {source.config.num_layers}")
    return [build_stage(source, a, b, num_kv_blocks, block_size, dtype) for a, b in zip(bounds, bounds[1:])]
