"""Our torch dequantiser of GGUF blocks against gguf's own (numpy), bit for bit, on random blocks."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from executor.weights import _dequantize


def _blocks(rng, n: int, scales: int, payload: int) -> np.ndarray:
    """n blocks: `scales` float16 scales (finite, of either sign) then `payload` random bytes."""
    s = rng.normal(0, 0.05, size=(n, scales)).astype(np.float16).view(np.uint8).reshape(n, 2 * scales)
    return np.concatenate([s, rng.integers(0, 256, size=(n, payload), dtype=np.uint8)], axis=1)


@pytest.mark.parametrize("kind,scales,payload", [(Q.Q8_0, 1, 32), (Q.Q4_0, 1, 16), (Q.Q4_1, 2, 16)])
def test_block_layouts_match_gguf_bit_for_bit(kind, scales, payload):
    rng = np.random.default_rng(0)
    rows, blocks_per_row = 6, 4                             # 6 rows of 128 weights
    data = _blocks(rng, rows * blocks_per_row, scales, payload).reshape(rows, -1)
    got = _dequantize(SimpleNamespace(tensor_type=kind, data=data))
    want = torch.from_numpy(np.array(dequantize(data, kind), dtype=np.float32))
    assert got.shape == want.shape == (rows, 128)
    assert torch.equal(got, want)


def test_float_tensors_and_a_layout_we_leave_to_gguf():
    rng = np.random.default_rng(1)
    f16 = rng.normal(size=(3, 8)).astype(np.float16)
    assert torch.equal(_dequantize(SimpleNamespace(tensor_type=Q.F16, data=f16)),
                       torch.from_numpy(f16.astype(np.float32)))
    f32 = rng.normal(size=(5,)).astype(np.float32)
    out = _dequantize(SimpleNamespace(tensor_type=Q.F32, data=f32))
    assert torch.equal(out, torch.from_numpy(f32))
    out[0] = 99.0                                           # a copy: the mapped file is never written
    assert f32[0] != 99.0
    bf16 = rng.integers(0, 256, size=(2, 16), dtype=np.uint8)     # 8 bf16 values a row, as the file's bytes
    bf16[:, 1::2] &= 0x3F                                           # exponents up to 0x7F: no NaN, no inf
    assert torch.equal(_dequantize(SimpleNamespace(tensor_type=Q.BF16, data=bf16)),
                       torch.from_numpy(np.array(dequantize(bf16, Q.BF16), dtype=np.float32)))
    q5 = _blocks(rng, 8, 1, 20).reshape(2, -1)             # Q5_0: 22-byte blocks, dequantised by gguf
    assert torch.equal(_dequantize(SimpleNamespace(tensor_type=Q.Q5_0, data=q5)),
                       torch.from_numpy(np.array(dequantize(q5, Q.Q5_0), dtype=np.float32)))
