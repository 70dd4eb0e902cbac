"""Llama-family model code written for pipeline stages.

A stage owns decoder layers [start, end), plus the embedding when start == 0 and the
final norm + LM head when end == num_layers. The model is plain torch; where it runs and
where its KV cache lives is decided outside it (see stage.py and kvcache.py).
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama, Qwen2, Mistral, SmolLM)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope scaling as sorted (key, value) pairs so the config stays hashable; () = none
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False      # Qwen2 has biases on q/k/v
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """From a transformers config dict (config.json or PretrainedConfig.to_dict())."""
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        rope = {k: v for k, v in rope.items() if k != "type"} if kind != "default" else {}
        if rope:
            rope["rope_type"] = kind
        eos = d.get("eos_token_id")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())),
            max_position=d.get("max_position_embeddings", 4096),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", d.get("model_type") == "qwen2")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            name=d.get("model_type", "llama"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers config dict describing the same model (for reference runs)."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **dict(self.rope_scaling)}
        return dict(
            model_type=self.name, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_parameters=rope,
            max_position_embeddings=self.max_position, tie_word_embeddings=self.tie_embeddings,
            attention_bias=self.attention_bias, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) or None, hidden_act="silu",
        )


# --- RoPE ------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with the config's scaling applied (as transformers does)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = dict(cfg.rope_scaling)
    kind = s.get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope scaling type {kind!r}")


class Rotary(nn.Module):
    """cos/sin tables for every position, looked up by position ids."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        freqs = torch.outer(torch.arange(cfg.max_position, dtype=torch.float32), rope_inv_freq(cfg))
        emb = torch.cat([freqs, freqs], dim=-1)              # [max_pos, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions: [B, T] -> cos, sin: [B, T, 1, head_dim] (broadcast over heads)
        return self.cos[positions].unsqueeze(2).to(dtype), self.sin[positions].unsqueeze(2).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, heads, head_dim]; rotate_half convention of the HF checkpoints
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# --- layers ------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:      # one op instead of six; bit-identical to the form below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32 as the reference does, so bf16 runs match it too
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# oneDNN's packed-weight GEMM beats the default BLAS (MKL, which takes a slow path on AMD CPUs)
# once a step has 2 rows or more (dev machine's EPYC, SmolLM2's layers + head: 1.0-1.9x at 2 rows,
# 1.5-2.1x at 8, at 1 and 2 threads), and loses at 1 row (58 vs 44 ms at 1 thread), where a decode
# step only streams weights. So: batched steps use a packed copy.
ONEDNN_MIN_ROWS = 2
ONEDNN = os.environ.get("CONTINUO_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()


class Linear(nn.Linear):
    """nn.Linear laid out for CPU serving.

    - Batched fp32 steps run on a oneDNN-packed copy of the weight: a cache outside the state
      dict (so loading, migration and tying see the plain weight), rebuilt if the weight changes.
      It costs a second copy of the weights in memory on CPU; CONTINUO_ONEDNN=0 turns it off.
    - The plain weight [out, in] is kept column-major on CPU (a transposed view of [in, out]
      storage): a 1-row decode step is then a GEMV that BLAS streams row by row, 1.25x faster on
      the dev machine (SmolLM2's 30 layers + head: 40 vs 50 ms at 1 and 2 threads)."""

    _packed: tuple | None = None

    def relayout(self, copy: bool = True) -> None:
        """Store the CPU weight column-major ([in, out] in memory), copying its values unless
        `copy` is False (an empty weight about to be received in that layout)."""
        w = self.weight
        if w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous() and w.shape[0] > 1:
            t = torch.empty(w.shape[1], w.shape[0], dtype=w.dtype)
            if copy:
                t.copy_(w.data.t())
            self.weight.data = t.t()

    def pack(self) -> torch.Tensor | None:
        w = self.weight
        if not ONEDNN or w.device.type != "cpu" or w.dtype != torch.float32:
            return None
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1] and (packed := self.pack()) is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, self.bias,
                                                   "none", [None], "")          # [rows, out]
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def prepack(module: nn.Module) -> None:
    """Lay weights out for serving and build the packed copies now (off the serving path) rather
    than on the first batched step."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.relayout()
            m.pack()


class Attend(Protocol):
    """What attention needs from the KV cache: store k/v of this step, attend over the cache."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v in one matmul: fewer, larger GEMMs are what a CPU decode step is bound by
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attend: Attend):
        B, T, _ = x.shape                                    # x: [B, T, hidden]
        d, heads = self.cfg.head_dim, self.cfg.num_heads
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads sit side by side in the fused projection: rotate them in one go
        qk = apply_rope(qk.view(B, T, -1, d), cos, sin)     # [B, T, heads + kv_heads, d]
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        o = attend(self.layer, q, k, v.view(B, T, -1, d))   # [B, T, heads, d]
        return self.o_proj(o.reshape(B, T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend: Attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class StageModel(nn.Module):
    """Decoder layers [start, end) of a model; the embedding if start == 0, norm + head if end == L."""

    def __init__(self, cfg: ModelConfig, start: int, end: int, parts: dict | None = None):
        """New modules, or with `parts` ({('layer', i): DecoderLayer, 'embed', 'norm', 'head'}) existing
        ones adopted as they are: a live reconfiguration composes a stage from kept and moved layers."""
        super().__init__()
        if not 0 <= start < end <= cfg.num_layers:
            raise ValueError(f"bad stage range [{start}, {end}) for {cfg.num_layers} layers")
        self.cfg, self.start, self.end = cfg, start, end
        self.is_first, self.is_last = start == 0, end == cfg.num_layers
        p = parts or {}
        new = parts is None
        self.embed_tokens = (nn.Embedding(cfg.vocab_size, cfg.hidden_size) if new else p["embed"]) \
            if self.is_first else None
        self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) if new else p[("layer", i)] for i in range(start, end))
        self.norm = (RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if new else p["norm"]) if self.is_last else None
        self.lm_head = (Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if new else p["head"]) \
            if self.is_last else None
        if self.is_first and self.is_last and cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids [B, T] (first stage) or hidden [B, T, hidden]; positions: [B, T].

        The last stage returns logits [R, vocab] of the tokens at flat indices `last` into the
        B*T tokens (only those are sampled, so the head runs on R rows, not B*T), or [B, T, vocab]
        when `last` is None."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)                         # [B, T, hidden]
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        if self.lm_head is None:
            return x
        if last is not None:
            x = x.flatten(0, 1)[last]                        # [R, hidden]
        return self.lm_head(self.norm(x)).float()

    # --- weights -------------------------------------------------------------------------

    def hf_names(self) -> list[str]:
        return hf_names(self.cfg, self.start, self.end)

    @torch.no_grad()
    def load_hf_state(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy weights given under transformers names (fusing q/k/v and gate/up)."""
        if self.is_last and "lm_head.weight" not in sd:
            if not self.cfg.tie_embeddings:
                raise KeyError("lm_head.weight missing and embeddings are not tied")
            sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}   # tied head
        if self.embed_tokens is not None:
            self.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"])
        for layer in self.layers:
            p = f"model.layers.{layer.self_attn.layer}."
            a = layer.self_attn
            a.qkv_proj.weight.copy_(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
            if a.qkv_proj.bias is not None:
                a.qkv_proj.bias.copy_(torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
            a.o_proj.weight.copy_(sd[p + "self_attn.o_proj.weight"])
            layer.mlp.gate_up_proj.weight.copy_(
                torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
            layer.mlp.down_proj.weight.copy_(sd[p + "mlp.down_proj.weight"])
            layer.input_layernorm.weight.copy_(sd[p + "input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
        if self.is_last:
            self.norm.weight.copy_(sd["model.norm.weight"])
            if self.lm_head.weight is not getattr(self.embed_tokens, "weight", None):
                self.lm_head.weight.copy_(sd["lm_head.weight"])


def random_hf_state(cfg: ModelConfig, seed: int = 0, names: list[str] | None = None,
                    std: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded random weights under transformers names; each tensor is seeded by its own name,
    so a stage that asks only for its layers gets exactly the tensors the whole model has."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embed_tokens": (cfg.vocab_size, h), "lm_head": (cfg.vocab_size, h),
              "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    if names is None:
        names = hf_names(cfg, 0, cfg.num_layers)
    out = {}
    for name in names:
        g = torch.Generator().manual_seed(seed * 1_000_003 + _stable_hash(name))
        part, kind = name.split(".")[-2:]
        if "norm" in part:      # norms near 1 so activations keep a sane scale
            out[name] = 1.0 + 0.1 * torch.randn(h, generator=g)
        elif kind == "bias":
            out[name] = 0.1 * torch.randn(q if part == "q_proj" else kv, generator=g)
        else:
            out[name] = std * torch.randn(shapes[part], generator=g) * (10 if part == "embed_tokens" else 1)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_names(cfg: ModelConfig, start: int, end: int) -> list[str]:
    """The transformers parameter names that layers [start, end) need (and nothing more)."""
    names = ["model.embed_tokens.weight"] if start == 0 else []
    for i in range(start, end):
        p = f"model.layers.{i}."
        names += [p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
        if cfg.attention_bias:
            names += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
    if end == cfg.num_layers:
        names += ["model.norm.weight", "lm_head.weight"]
        if cfg.tie_embeddings and start > 0:     # a tied head on another node needs its own copy
            names.append("model.embed_tokens.weight")
    return names


def _stable_hash(s: str) -> int:
    return zlib.crc32(s.encode())
