"""ModelSpec: the sizes of a decoder-only model that placement and cost estimates need."""
from __future__ import annotations

from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from .loading import InputError

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "q4": 0.5625}
_TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Architectures whose attention has q/k/v biases (Qwen2 family).
_QKV_BIAS = {"qwen2"}


class ModelSpec(BaseModel):
    """Layer count and per-layer sizes of a Llama-family model, derived from a real config."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    arch: str = "llama"
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    max_context: int = Field(4096, ge=1)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    dtype: str = Field("bf16", pattern="^(fp32|bf16|fp16|int8|q4)$")

    # --- sizes ---------------------------------------------------------------
    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @cached_property
    def params_per_layer(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size      # gate, up, down (SwiGLU)
        return attn + mlp + 2 * h                  # + two RMSNorm weights

    @property
    def bytes_per_layer(self) -> float:
        return self.params_per_layer * self.dtype_bytes

    @property
    def embedding_bytes(self) -> float:
        return self.vocab_size * self.hidden_size * self.dtype_bytes

    @property
    def head_bytes(self) -> float:
        """Final norm + LM head. A tied head still needs its own copy when it sits on another node."""
        return (self.vocab_size * self.hidden_size + self.hidden_size) * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> float:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes   # K and V

    @property
    def flops_per_token_per_layer(self) -> float:
        """Matmul FLOPs of one token through one layer (2 per weight), without attention scores."""
        return 2.0 * (self.params_per_layer - 2 * self.hidden_size)

    def attention_flops_per_token_per_layer(self, context: int) -> float:
        """QK^T and AV for one query token over `context` cached tokens."""
        return 4.0 * self.num_heads * self.head_dim * context

    @property
    def head_flops_per_token(self) -> float:
        return 2.0 * self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * self.params_per_layer + emb * (1 if self.tie_embeddings else 2) + self.hidden_size

    def stage_weight_bytes(self, first: int, last: int) -> float:
        """Weights a stage owning layers first..last (inclusive) holds."""
        b = (last - first + 1) * self.bytes_per_layer
        if first == 0:
            b += self.embedding_bytes
        if last == self.num_layers - 1:
            b += self.head_bytes
        return b

    # --- construction ----------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | Any, name: str | None = None, dtype: str | None = None) -> "ModelSpec":
        """From a transformers config (a dict from config.json, or a PretrainedConfig)."""
        if not isinstance(cfg, dict):
            cfg = cfg.to_dict()
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            arch = cfg.get("model_type", "llama")
            return cls(
                name=name or cfg.get("_name_or_path") or arch,
                arch=arch,
                num_layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                max_context=int(cfg.get("max_position_embeddings", 4096)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", arch in _QKV_BIAS)),
                dtype=dtype or _TORCH_DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), "bf16"),
            )
        except KeyError as e:
            raise InputError(f"model config lacks {e.args[0]}", field=str(e.args[0])) from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tensor_names: list[str] | None = None,
                           name: str | None = None, dtype: str = "bf16") -> "ModelSpec":
        """From the key/value header of a GGUF file (read it with the `gguf` package)."""
        arch = str(meta.get("general.architecture", "llama"))
        try:
            k = lambda key: meta[f"{arch}.{key}"]  # noqa: E731
            heads = int(k("attention.head_count"))
            hidden = int(k("embedding_length"))
            vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
            return cls(
                name=name or str(meta.get("general.name", arch)),
                arch=arch,
                num_layers=int(k("block_count")),
                hidden_size=hidden,
                intermediate_size=int(k("feed_forward_length")),
                num_heads=heads,
                num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
                head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
                vocab_size=int(vocab),
                max_context=int(meta.get(f"{arch}.context_length", 4096)),
                tie_embeddings=tensor_names is not None and "output.weight" not in tensor_names,
                qkv_bias=arch in _QKV_BIAS,
                dtype=dtype,
            )
        except KeyError as e:
            raise InputError(f"GGUF header lacks {e.args[0]}", field=str(e.args[0])) from None


def builtin_models() -> dict[str, Path]:
    """Specs shipped with Continuo, by short name (e.g. 'llama-3-8b', 'smollm2-135m')."""
    root = resources.files("policies") / "models"
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_model_spec(name_or_path: str | Path, dtype: str | None = None) -> ModelSpec:
    """A shipped spec by short name, or a config.json / YAML config file by path."""
    builtins = builtin_models()
    key = str(name_or_path).lower()
    aliases = {Path(v).stem: v for v in builtins.values()}
    path = builtins.get(key) or aliases.get(key)
    short = key if path else None
    if path is None:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise InputError(f"no such model spec; shipped specs: {', '.join(sorted(builtins))}, "
                             "or give a path to a config.json", field="model")
    try:
        cfg = yaml.safe_load(Path(path).read_text())  # JSON is YAML
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML/JSON: {e}", file=str(path)) from None
    if not isinstance(cfg, dict):
        raise InputError("expected a mapping of config fields", file=str(path))
    try:
        return ModelSpec.from_hf_config(cfg, name=short, dtype=dtype)
    except InputError as e:
        raise InputError(e.detail, file=str(path), field=e.field) from None
