"""Random but plausible clusters, policies and intents, for property tests and the planning benchmark."""
from __future__ import annotations

import random

from policies import Cluster, IntentSpec, ModelSpec, Policy, Traffic, load_model_spec

_GPUS = ["H100", "A100-80GB", "A100-40GB", "L40S", "L4", "RTX4090", "T4"]
_TRUST = ["owned", "attested", "public-cloud", "untrusted"]


def random_instance(seed: int, n_nodes: int, n_layers: int, *, with_slo: bool = False,
                    objective: str | None = None) -> tuple[Cluster, Policy, IntentSpec, ModelSpec]:
    """A cluster of `n_nodes`, a policy with a strict class, an intent, and a model of `n_layers` layers."""
    rng = random.Random(seed)
    nodes = []
    for i in range(n_nodes):
        tier = rng.choice(["edge", "cloud"])
        nodes.append({
            "name": f"n{i}", "gpu": rng.choice(_GPUS), "gpus": rng.choice([1, 1, 1, 2]),
            "zone": f"z{rng.randrange(3)}", "jurisdiction": rng.choice(["eu", "eu", "us"]), "tier": tier,
            "trust": rng.choice(_TRUST[:2] if tier == "edge" else _TRUST[1:]),
            "state": rng.choice(["up"] * 8 + ["draining", "down"]),
            "reserved_gb": rng.choice([0, 0, 4, 12]),
        })
    pairs = []
    for i in range(n_nodes):
        for j in range(i + 1, n_nodes):
            if rng.random() < 0.3:
                pairs.append({"between": [f"n{i}", f"n{j}"], "bandwidth_gbps": rng.choice([1, 10, 100]),
                              "latency_ms": rng.choice([0.1, 1, 10]), "encrypted": rng.random() < 0.5})
    cluster = Cluster.model_validate({"name": f"random-{seed}", "nodes": nodes, "links": {
        "default": {"bandwidth_gbps": 1, "latency_ms": 20, "encrypted": rng.random() < 0.7} if rng.random() < 0.8
        else None, "pairs": pairs}})
    policy = Policy.model_validate({"name": "random", "data_classes": {
        "public": {},
        "secret": {"allowed_jurisdictions": ["eu"], "min_trust": "attested", "trusted_ends": "owned",
                   "private_prefix_layers": rng.choice([0, 1, 2]), "encrypt_cross_boundary": True}}})
    base = load_model_spec(rng.choice(["llama-3-8b", "qwen2.5-7b", "llama-3-70b"]))
    model = base.model_copy(update={"num_layers": n_layers, "name": f"{base.name}-{n_layers}l"})
    intent = IntentSpec(
        data_class=rng.choice(["public", "secret"]),
        objective=objective or rng.choice(["latency", "throughput", "cost", "balanced"]),
        max_ttft_ms=rng.choice([None, 200, 1000]) if with_slo else None,
        max_tpot_ms=rng.choice([None, 30, 100]) if with_slo else None,
        traffic=Traffic(concurrency=rng.choice([1, 8, 32]), context_tokens=rng.choice([2048, 8192])),
    )
    return cluster, policy, intent, model
