"""Plan -> running service: Llama-family pipeline stages, their own KV cache, the engine loop.

The names below load on first use (PEP 562), so that torch-free parts such as `executor.k8s`
import without torch."""
from importlib import import_module

_EXPORTS = {
    "engine": ("ContextTooLong", "Engine", "EngineConfig", "QueueFull", "Request", "RequestOutput", "SamplingParams"),
    "kvcache": ("KVCache", "KVCacheFull"),
    "model": ("ModelConfig", "StageModel", "hf_names", "random_hf_state"),
    "stage": ("LocalStage", "Stage", "StepBatch", "build_stage", "build_stages", "even_bounds"),
    "weights": ("GGUFSource", "RandomSource", "SafetensorsSource", "StateDictSource", "WeightSource",
                "default_gguf", "open_source"),
}
_MODULE_OF = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'executor' has no attribute {name!r}")
    return getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
