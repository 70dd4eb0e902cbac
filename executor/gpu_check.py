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

  3. the Kubernetes shape: a driver that sees no GPU (its process group is plain gloo) and three
     workers that join it over TCP (`python -m executor.worker --join`, gloo + NCCL, on CUDA), a
     tiny random model, requests streaming through a live 2 -> 3 stage reconfiguration, outputs
     against a one-process CPU reference (`--k8s-shape` runs this part alone).

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


def k8s_shape() -> dict:
    """Part 3, run in a process of its own whose CUDA is hidden (see main): the driver side."""
    import subprocess
    import time as _time
    from concurrent.futures import Future

    from policies import ModelSpec, PlacementPlan, Stage, approve, load_cluster, load_policy

    from .engine import Engine, EngineConfig, SamplingParams
    from .runtime import free_port
    from .service import Listener, Service
    from .stage import build_stages
    from .transport import JOIN_TOKEN_ENV, backend
    from .weights import RandomSource
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=7, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position=512, eos_token_ids=())
    src, ec = RandomSource(cfg, seed=5), EngineConfig(max_num_seqs=8, max_model_len=300, num_kv_blocks=160)
    cluster, policy = load_cluster("scenarios/local/cluster.yaml"), load_policy("scenarios/local/policy.yaml")
    spec = ModelSpec.from_hf_config(cfg.to_hf(), name="tiny", dtype="fp32")

    def validated(stages, current=None):
        plan = PlacementPlan(model="tiny", data_class="public", cluster_fingerprint=cluster.fingerprint(),
                             stages=tuple(Stage(node=n, first_layer=a, last_layer=b) for n, a, b in stages))
        return approve(plan, cluster, policy, None, spec, current=current)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40)), [100] * 17, [5, 6], [42, 43, 44, 45]]
    params = SamplingParams(max_tokens=120, ignore_eos=True)
    ref = [o.token_ids for o in Engine(build_stages(src, [0, cfg.num_layers], ec.num_kv_blocks, ec.block_size),
                                       ec).generate(prompts, params)]
    device = os.environ.get("GPU_CHECK_WORKER_DEVICE", "cuda")     # cpu: a smoke test of this part on a CPU
    port, token = free_port(), "gpu-check-join-token"
    before = os.environ.get(JOIN_TOKEN_ENV)
    os.environ[JOIN_TOKEN_ENV] = token                 # the driver proves it too (restored below)
    wenv = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}   # workers see the GPU
    workers = [subprocess.Popen([sys.executable, "-m", "executor.worker", "--join", f"127.0.0.1:{port}",
                                 "--node", n, "--threads", "2", "--device", device], env=wenv)
               for n in ("edge-a", "edge-b", "cloud-1")]
    out = {"driver_backend": backend(), "driver_sees_cuda": torch.cuda.is_available()}
    try:
        svc = Service.launch(cluster, validated([("edge-a", 0, 2), ("edge-b", 3, 6)]), src, ec,
                             join_at=("127.0.0.1", port), timeout=120)
        try:
            out["devices"] = {n["node"]: n["device"] for n in svc.node_states()}
            futs = []
            for p in prompts:
                f: Future = Future()
                svc.submit(p, params, Listener(on_done=lambda o, e, f=f: f.set_result((o, e))))
                futs.append(f)
            _time.sleep(0.2)
            rep = svc.reconfigure(validated([("edge-a", 0, 1), ("cloud-1", 2, 4), ("edge-b", 5, 6)],
                                            current=svc.plan.plan))
            results = [f.result(120) for f in futs]
            out.update(reconfig=rep.state, reconfig_error=rep.error, pause_ms=rep.pause_s and 1e3 * rep.pause_s,
                       failed=sum(e is not None for _, e in results),
                       identical=sum(o is not None and o.token_ids == r for (o, _), r in zip(results, ref)),
                       requests=len(prompts))
        finally:
            svc.close()
    finally:
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
        if before is None:
            os.environ.pop(JOIN_TOKEN_ENV, None)
        else:
            os.environ[JOIN_TOKEN_ENV] = before
    out["ok"] = (out.get("reconfig") == "done" and out.get("failed") == 0 and out.get("identical") == len(prompts)
                 and all(str(d).startswith(device) for d in out.get("devices", {}).values())
                 and not out["driver_sees_cuda"])
    return out


def _k8s_shape_in_subprocess(timeout: float = 240.0) -> dict:
    """Part 3 in a child process with CUDA hidden from it (the driver pod asks for no GPU)."""
    import subprocess
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "executor.gpu_check", "--k8s-shape"], env=env, capture_output=True,
                       text=True, timeout=timeout)
    sys.stderr.write(p.stderr[-4000:])
    last = [line for line in p.stdout.splitlines() if line.startswith("{")]
    return json.loads(last[-1]) if last else {"ok": False, "error": f"exit {p.returncode}", "stderr": p.stderr[-1500:]}


def main() -> int:
    if "--k8s-shape" in sys.argv[1:]:
        r = k8s_shape()
        print(json.dumps(r))
        return 0 if r["ok"] else 1
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
    k8s = _k8s_shape_in_subprocess()
    print(json.dumps({"k8s_shape": k8s}), flush=True)
    ok = on_cuda and k8s["ok"] and all(r["identical"] and r["requests_failed"] == 0 and r["aborted"] == 0
                                       and r["reconfigurations"] > 0 for r in results.values())
    keys = ("pause_ms_p50", "steady_gap_p50_ms", "downtime_ratio_p50", "gap_vs_median_p50", "ttft_ratio_p50",
            "tpot_ratio_p50", "identical", "requests_failed", "requests", "reconfigurations", "aborted",
            "bytes_moved", "devices")
    print(json.dumps({"verdict": "pass" if ok else "fail", "environment": env, "nccl": probes, "k8s_shape": k8s,
                      "reconfig": {m: {k: r[k] for k in keys} for m, r in results.items()}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
