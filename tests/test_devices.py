"""Where workers compute: device choice and routing flags (the GPU path itself needs a GPU)."""
import pytest
import torch

from executor.transport import Hop, backend
from executor.worker import pick_device


def test_auto_picks_the_cpu_without_cuda_and_round_robins_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 1) == "cpu" and backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [pick_device("auto", r) for r in (1, 2, 3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert backend() == "cpu:gloo,cuda:nccl"


def test_asking_for_a_gpu_torch_cannot_see_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        pick_device("cuda:0", 1)
    with pytest.raises(SystemExit, match="use cpu, cuda"):
        pick_device("meta", 1)
    assert pick_device("cpu", 3) == "cpu"


def test_hops_default_to_host_transfers():
    assert Hop(1, 0, 10).gpu is False


def test_nccl_only_between_workers_on_distinct_gpus():
    """NCCL refuses two ranks on one device: workers that share a GPU (one GPU, several workers)
    pass activations through the host; a GPU of its own gets device-to-device hops."""
    import torch.distributed as dist

    from executor.runtime import NodeRuntime, StagePlacement
    store = dist.HashStore()
    devices = {"a": ("cuda:0", "GPU-1"), "b": ("cuda:0", "GPU-1"), "c": ("cuda:1", "GPU-2"), "d": ("cpu", None)}
    for node, (dev, gpu) in devices.items():
        store.set(f"device/{node}", dev)
        if gpu:
            store.set(f"gpu/{node}", gpu)
    rt = object.__new__(NodeRuntime)
    rt.store, rt.devices, rt.nccl_ok = store, {}, {}
    rt.ranks = {"a": 1, "b": 2, "c": 3, "d": 4}
    route = rt.route([StagePlacement(n, 0, 1) for n in "abcd"])
    assert [h.gpu for h in route] == [False, False, True, False]
    assert [h.rank for h in route] == [1, 2, 3, 4]


def test_the_gpu_checks_model_has_the_embedded_models_shape():
    """executor.gpu_check runs random weights of the embedded model's shape (GPU machines may lack
    the model package); that shape must be the GGUF's own."""
    import dataclasses

    from executor.gpu_check import SMOLLM2_135M
    from executor.weights import GGUFSource
    try:
        real = GGUFSource().config
    except FileNotFoundError as e:       # a GPU machine without the model package (make setup installs it)
        pytest.skip(str(e))
    assert dataclasses.replace(real, rms_norm_eps=SMOLLM2_135M.rms_norm_eps) == SMOLLM2_135M
    assert real.rms_norm_eps == pytest.approx(SMOLLM2_135M.rms_norm_eps)


def test_the_gpu_checks_k8s_shape_runs_on_cpu_workers(monkeypatch):
    """executor.gpu_check's third part (a driver with no GPU, workers joining it over TCP, a live
    reconfiguration) kept runnable here: with CPU workers it must pass as it would on CUDA ones."""
    from executor.gpu_check import k8s_shape
    monkeypatch.setenv("GPU_CHECK_WORKER_DEVICE", "cpu")
    monkeypatch.delenv("CONTINUO_JOIN_TOKEN", raising=False)
    r = k8s_shape()
    assert r["ok"], r
    assert r["driver_backend"] == "gloo" and r["identical"] == r["requests"] == 6 and r["reconfig"] == "done"
