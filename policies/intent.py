"""IntentSpec: the structured form of what an operator asked for."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .cluster import Trust
from .loading import load_file

# The executor's paged KV cache hands out whole blocks of this many tokens, so a reservation is
# rounded up to whole blocks here, where the capacity rule checks it, not only where it is allocated.
KV_BLOCK_TOKENS = 16


class Traffic(BaseModel):
    """Expected load, used to reserve KV cache and to estimate latency."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    concurrency: int = Field(8, ge=1, description="sequences decoded together")
    prompt_tokens: int = Field(512, ge=1)
    output_tokens: int = Field(256, ge=1)
    context_tokens: int = Field(4096, ge=1, description="KV reserved per sequence")

    @property
    def kv_blocks(self) -> int:
        """KV blocks every stage reserves for its layers: concurrency x context_tokens, in whole blocks."""
        return -(-self.concurrency * self.context_tokens // KV_BLOCK_TOKENS)

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV every stage reserves per layer (kv_blocks whole blocks)."""
        return self.kv_blocks * KV_BLOCK_TOKENS


class IntentSpec(BaseModel):
    """What the operator wants. Only `data_class` is required; an intent can only tighten the policy."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    data_class: str = Field(min_length=1)
    service: str | None = None
    model: str | None = None
    allowed_jurisdictions: tuple[str, ...] | None = None
    min_trust: Trust | None = None
    max_ttft_ms: float | None = Field(None, gt=0)
    max_tpot_ms: float | None = Field(None, gt=0)
    objective: Literal["latency", "throughput", "cost", "balanced"] = "balanced"
    exclude_nodes: tuple[str, ...] = ()
    prefer_tier: Literal["edge", "cloud"] | None = None
    traffic: Traffic = Traffic()

    @field_validator("allowed_jurisdictions")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("allowed_jurisdictions is empty: no node could serve; omit it to keep the policy's")
        return v


def load_intent_spec(path: str | Path) -> IntentSpec:
    """Load a structured intent (YAML) file."""
    return load_file(IntentSpec, path)
