"""The engine's own paged KV cache: one per stage, holding that stage's layers.

Layout: for each owned layer a flat pool of slots [num_blocks * block_size, kv_heads, head_dim];
a request owns a list of blocks (its block table), so token position p of request r lives
in slot block_table[r][p // block_size] * block_size + p % block_size.

Because the cache is ours (not hidden inside a model), the KV of given layers and requests
can be read out as a plain dict of tensors, sent to another node, and written into a cache
that owns different layers; that is what live reconfiguration moves.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


class KVCacheFull(RuntimeError):
    """No free blocks left; the scheduler's admission control should make this unreachable."""


class KVCache:
    def __init__(self, layers: range, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.layers, self.block_size, self.num_blocks = layers, block_size, num_blocks
        shape = (len(layers), num_blocks * block_size, num_kv_heads, head_dim)
        # empty, not zeros: untouched pages of a large pool cost no memory on CPU
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self._zero_block(0)                   # block 0 pads short rows of a step (masked, but must be finite)
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[Any, list[int]] = {}
        self.lens: dict[Any, int] = {}        # tokens written per request

    # --- allocation ------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def allocate(self, req: Any, num_tokens: int) -> None:
        """Make sure request `req` has blocks for positions [0, num_tokens)."""
        table = self.block_tables.setdefault(req, [])
        self.lens.setdefault(req, 0)
        need = -(-num_tokens // self.block_size) - len(table)
        if need > len(self.free_blocks):
            raise KVCacheFull(f"request {req!r} needs {need} blocks, {len(self.free_blocks)} free")
        for _ in range(max(need, 0)):
            table.append(self.free_blocks.popleft())
            self._zero_block(table[-1])

    def _zero_block(self, block: int) -> None:
        # Attention reads whole blocks and masks the unwritten tail; garbage there could be NaN,
        # and NaN survives a mask (NaN - inf, 0 * NaN), so a block is zeroed when it is handed out.
        slots = slice(block * self.block_size, (block + 1) * self.block_size)
        self.k[:, slots].zero_()
        self.v[:, slots].zero_()

    def free(self, reqs: Iterable[Any]) -> None:
        for r in reqs:
            self.free_blocks.extend(self.block_tables.pop(r, ()))
            self.lens.pop(r, None)

    def check_integrity(self) -> None:
        """Idle-time check: every block is either free or owned by exactly one request."""
        used = [b for t in self.block_tables.values() for b in t]
        owned = used + list(self.free_blocks)
        if len(owned) != self.num_blocks or set(owned) != set(range(self.num_blocks)):
            raise AssertionError(f"KV blocks: {len(self.free_blocks)} free + {len(used)} used "
                                 f"!= {self.num_blocks} total, or a block is owned twice")
        for r, n in self.lens.items():
            if n > len(self.block_tables[r]) * self.block_size:
                raise AssertionError(f"request {r!r} has {n} tokens beyond its blocks")

    def _slots(self, req: Any, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(self.block_tables[req], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    # --- one forward step ------------------------------------------------------------------

    def prepare(self, reqs: Sequence[Any], starts: Sequence[int], num_new: Sequence[int],
                width: int) -> Attention:
        """Allocate room for this step's tokens and build the attention metadata shared by
        every layer. Row b writes num_new[b] tokens at positions starts[b].. (rows padded to width)."""
        B = len(reqs)
        for r, s, n in zip(reqs, starts, num_new):
            if s != self.lens.get(r, 0):
                raise ValueError(f"request {r!r}: step starts at {s}, cache holds {self.lens.get(r, 0)}")
            self.allocate(r, s + n)
            self.lens[r] = s + n
        ctx = [s + n for s, n in zip(starts, num_new)]
        # Attention reads whole blocks: the block table of each row's context [B, nb], padded with
        # block 0 (masked). One index per block_size tokens is far cheaper than one per token.
        nb = -(-max(ctx) // self.block_size)
        S = nb * self.block_size
        blocks = torch.zeros(B, nb, dtype=torch.long)
        for b, r in enumerate(reqs):
            used = -(-ctx[b] // self.block_size)
            blocks[b, :used] = torch.tensor(self.block_tables[r][:used])
        starts_t, ctx_t = torch.tensor(starts), torch.tensor(ctx)
        q_pos = starts_t.unsqueeze(1) + torch.arange(width).unsqueeze(0)          # [B, width]
        valid = torch.arange(width).unsqueeze(0) < torch.tensor(num_new).unsqueeze(1)   # [B, width]
        # the slot of each real token of this step, in row order (how the stage packs them)
        in_block = blocks.gather(1, (q_pos // self.block_size).clamp(max=nb - 1))
        write_idx = (in_block * self.block_size + q_pos % self.block_size)[valid]  # [tokens]
        rows = None if bool(valid.all()) else valid.flatten().nonzero().squeeze(1)   # real tokens of B*width
        # mask [B, 1, width, S]: causal within the step, and only this row's own context
        kpos = torch.arange(S)
        mask = (kpos.view(1, 1, S) <= q_pos.unsqueeze(2)) & (kpos.view(1, 1, S) < ctx_t.view(B, 1, 1))
        # additive form, made once per step: SDPA would convert a boolean mask in each layer
        mask = torch.zeros(mask.shape, dtype=self.k.dtype).masked_fill_(~mask, float("-inf"))
        dev = self.k.device     # built on the host (small, Python-shaped), used where the cache lives
        return Attention(self, blocks.to(dev), write_idx.to(dev), None if rows is None else rows.to(dev),
                         mask.unsqueeze(1).to(dev), width)

    # --- migration -------------------------------------------------------------------------

    def read(self, reqs: Sequence[Any], layers: Sequence[int] | None = None,
             since: int | dict[Any, int] = 0) -> dict[str, Any]:
        """The KV of `layers` (global ids) for `reqs`, positions [since, len): a plain dict of
        tensors and lists that torch.distributed can send. `since` is one position for all
        requests or one per request: "the tokens appended since p" of a pre-copy round."""
        layers = list(self.layers if layers is None else layers)
        li = torch.tensor([self._local(l) for l in layers], dtype=torch.long)
        starts = [since.get(r, 0) if isinstance(since, dict) else since for r in reqs]
        lengths = [max(self.lens[r] - s, 0) for r, s in zip(reqs, starts)]
        slots = torch.cat([self._slots(r, s, s + n) for r, s, n in zip(reqs, starts, lengths)]
                          or [torch.zeros(0, dtype=torch.long)])
        li, slots = li.to(self.k.device), slots.to(self.k.device)
        return {"layers": layers, "reqs": list(reqs), "starts": starts, "lengths": lengths,
                # advanced indexing copies only the selected slots: [layers, tokens, kv_heads, d]
                "k": self.k[li.unsqueeze(1), slots], "v": self.v[li.unsqueeze(1), slots]}

    def write(self, payload: dict[str, Any]) -> None:
        """Write a read() payload in (appending to or overwriting what a request holds)."""
        li = torch.tensor([self._local(l) for l in payload["layers"]], dtype=torch.long, device=self.k.device)
        offset = 0
        for r, s, n in zip(payload["reqs"], payload["starts"], payload["lengths"]):
            if s > self.lens.get(r, 0):
                raise ValueError(f"request {r!r}: write at {s} would leave a hole after {self.lens.get(r, 0)}")
            self.allocate(r, s + n)
            slots = self._slots(r, s, s + n).to(self.k.device)
            self.k[li.unsqueeze(1), slots] = payload["k"][:, offset:offset + n].to(self.k.device, self.k.dtype)
            self.v[li.unsqueeze(1), slots] = payload["v"][:, offset:offset + n].to(self.v.device, self.v.dtype)
            self.lens[r] = max(self.lens[r], s + n)
            offset += n

    def _local(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not held by this cache (holds {self.layers})")
        return layer - self.layers.start


class Attention:
    """Per-step attention over the paged cache; called by every layer of the stage.

    With `rows` set, the stage runs packed: q, k, v hold only the N real tokens ([1, N, ...], the
    padding of a ragged prefill removed); they are unpacked to [B, width] for attention here."""

    def __init__(self, cache: KVCache, blocks, write_idx, rows, mask, width: int):
        self.cache, self.blocks, self.mask = cache, blocks, mask
        self.write_idx, self.rows, self.width = write_idx, rows, width

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [B, T, heads, d]; k, v: [B, T, kv_heads, d] (or [1, N, ...] when packed)
        i = layer - self.cache.layers.start
        kc, vc = self.cache.k[i], self.cache.v[i]  # [slots, kv_heads, d]
        kc[self.write_idx] = k.flatten(0, 1)       # write_idx: the slot of each real token, in order
        vc[self.write_idx] = v.flatten(0, 1)
        B, nb = self.blocks.shape
        if self.rows is not None:                  # unpack: [1, N, heads, d] -> [B, width, heads, d]
            packed = q
            q = q.new_zeros(B * self.width, *q.shape[2:])
            q[self.rows] = packed[0]
            q = q.view(B, self.width, *q.shape[1:])
        # whole blocks of each row's context, gathered on the flat block list: [B, nb * block, kv_heads, d]
        bs, flat = self.cache.block_size, self.blocks.view(-1)
        shape = (B, nb * bs, *kc.shape[1:])
        keys = kc.view(-1, bs, *kc.shape[1:]).index_select(0, flat).view(shape).transpose(1, 2)  # [B, kvh, S, d]
        vals = vc.view(-1, bs, *vc.shape[1:]).index_select(0, flat).view(shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=self.mask,
                                           enable_gqa=True).transpose(1, 2)   # [B, width, heads, d]
        if self.rows is not None:                  # pack again: [1, N, heads, d]
            o = o.flatten(0, 1)[self.rows].unsqueeze(0)
        return o
