"""Plan -> running service: Llama-family pipeline stages, their own KV cache, the engine loop."""
from .engine import (ContextTooLong, Engine, EngineConfig, QueueFull, Request, RequestOutput,
                     SamplingParams)
from .kvcache import KVCache, KVCacheFull
from .model import ModelConfig, StageModel, hf_names, random_hf_state
from .stage import LocalStage, Stage, StepBatch, build_stage, build_stages, even_bounds
from .weights import (GGUFSource, RandomSource, SafetensorsSource, StateDictSource, WeightSource,
                      default_gguf, open_source)

__all__ = [
    "ContextTooLong", "Engine", "EngineConfig", "QueueFull", "Request", "RequestOutput", "SamplingParams",
    "KVCache", "KVCacheFull", "ModelConfig", "StageModel", "hf_names", "random_hf_state",
    "LocalStage", "Stage", "StepBatch", "build_stage", "build_stages", "even_bounds",
    "GGUFSource", "RandomSource", "SafetensorsSource", "StateDictSource", "WeightSource",
    "default_gguf", "open_source",
]
