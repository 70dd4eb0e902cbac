"""`python -m executor.gpu_check`: the executor's GPU path, end to end, in a few minutes.

What it runs, on a machine where torch sees CUDA:
  1. which devices torch sees, and whether NCCL carries a tensor between two processes on one GPU
     (NCCL refuses that; the executor then passes activations through the host) and, with two
     GPUs or more, between two GPUs;
  2. `bench reconfig` for live migration and stop-and-copy on the embedded model's shape
     (SmolLM2-135M: 30 layers, width 576) with seeded random weights, so that it needs neither the
     model package nor a tokenizer: three worker processes on CUDA serving 8 concurrent streaming
     requests while the plan goes 2 stages -> boundary moved -> 3 stages -> a node removed -> one
     stage -> 2 stages, every change applied live; greedy tokens compared with a replay of the same
     submissions without reconfiguration.

It prints one JSON document last (`verdict`: pass when every worker computed on CUDA, no request
failed, no reconfiguration aborted and every output matched) and exits 0 on pass, 1 otherwise.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from .model import ModelConfig

# The embedded default's shape (tests/test_devices.py checks it against the GGUF's own config).
SMOLLM2_135M = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position=8192,
                           tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def environment() -> dict:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl = torch.cuda.nccl.version() if n else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": n,
            "names": [torch.cuda.get_device_name(i) for i in range(n)],
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}


def _nccl_pair(rank: int, store_path: str, devices: tuple[int, int], out_path: str) -> None:
    import torch.distributed as dist
    dev = torch.device(f"cuda:{devices[rank]}")
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    t = torch.full((1 << 20,), float(rank + 1), device=dev)
    try:
        if rank == 0:
            dist.send(t, 1)
        else:
            dist.recv(t, 0)
            torch.cuda.synchronize(dev)
            with open(out_path, "w") as f:
                f.write("ok" if bool((t == 1.0).all()) else "wrong data")
    except Exception as e:      # the error is the answer this probe is after
        with open(out_path, "w") as f:
            f.write(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        dist.destroy_process_group()


def nccl_probe(devices: tuple[int, int], timeout: float = 45.0) -> str:
    """Send 4 MiB over NCCL between two processes on cuda:devices[0] and cuda:devices[1]: 'ok', the
    error the receiver saw, or how the processes ended."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_nccl_pair, args=(r, os.path.join(d, "store"), devices, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        if os.path.exists(out):
            return open(out).read()
        return "hung" if hung else f"exit codes {[p.exitcode for p in procs]}"


def main() -> int:
    env = environment()
    print(json.dumps({"environment": env}), flush=True)
    if not env["gpus"]:
        print("gpu_check: torch sees no CUDA device here (a CPU build of torch?)", file=sys.stderr)
        return 2
    probes = {"one_gpu_two_processes": nccl_probe((0, 0))}
    if env["gpus"] > 1:
        probes["two_gpus"] = nccl_probe((0, 1))
    print(json.dumps({"nccl": probes}), flush=True)
    from .bench_reconfig import run
    from .weights import RandomSource
    results = run(repeats=1, methods=["live", "stop_and_copy"], source=RandomSource(SMOLLM2_135M, seed=0))
    on_cuda = all(d and d.startswith("cuda") for r in results.values() for d in r["devices"].values())
    ok = on_cuda and all(r["identical"] and r["requests_failed"] == 0 and r["aborted"] == 0
                         and r["reconfigurations"] > 0 for r in results.values())
    keys = ("pause_ms_p50", "steady_gap_p50_ms", "downtime_ratio_p50", "gap_vs_median_p50", "ttft_ratio_p50",
            "tpot_ratio_p50", "identical", "requests_failed", "requests", "reconfigurations", "aborted",
            "bytes_moved", "devices")
    print(json.dumps({"verdict": "pass" if ok else "fail", "environment": env, "nccl": probes,
                      "reconfig": {m: {k: r[k] for k in keys} for m, r in results.items()}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
