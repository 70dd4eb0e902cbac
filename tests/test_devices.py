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
