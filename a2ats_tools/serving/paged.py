"""A paged KV cache as the selection core reads it.

Serving engines keep each request's keys and values in fixed-size blocks scattered over one preallocated pool;
a request's block table maps its position ``p`` to the slot ``block_table[p // block_size] * block_size +
p % block_size``. A decode batch of such requests is presented to the selectors as the transformers runtime's
batches are: rows ``[B, Hkv, L]`` with ``L`` the longest request, **left-aligned** (request ``b``'s position
``p`` at row ``L - length_b + p``), so that every request's query sits at the last row and the distance-bucket
rule, the sinks and the window apply unchanged; rows left of a request are padding (``valid`` False, never kept).
Only the rows a step reads move: candidates for re-ranking and the rows attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeRows:
    """Where each row of a left-aligned decode batch lives. ``slots [B, L]`` (int64; padding rows point at the
    request's first slot, a valid row that is never kept), ``valid [B, L]`` and ``lengths [B]``."""

    slots: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor

    @property
    def positions(self) -> torch.Tensor:
        """Each request's query position ``[B]`` (its last row)."""
        return self.lengths - 1

    @property
    def width(self) -> int:
        return self.slots.shape[1]


def decode_rows(seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int) -> DecodeRows:
    """:class:`DecodeRows` of requests with ``seq_lens [B]`` tokens (the new one included) and ``block_table
    [B, max_blocks]``: computed once per step, shared by every layer that reads the same blocks."""
    lengths = seq_lens.long()
    width = int(lengths.max())
    row = torch.arange(width, device=lengths.device)
    position = row[None, :] - (width - lengths)[:, None]  # [B, L]: negative on padding
    valid = position >= 0
    position = position.clamp_min(0)
    blocks = block_table.long().gather(1, position // block_size)
    slots = blocks * block_size + position % block_size
    return DecodeRows(slots, valid, lengths)


@dataclass(frozen=True)
class PagedRows:
    """One decode batch's view of a pool of rows ``store [num_blocks, Hkv, block_size, d]`` (any strides): what
    :func:`~a2ats_tools.kernels.sparse_attention.gather_rows` reads in place of a ``[B, Hkv, L, d]`` cache."""

    store: torch.Tensor
    rows: DecodeRows

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, width = self.rows.slots.shape
        return b, self.store.shape[1], width, self.store.shape[-1]

    def gather_rows(self, indices: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Rows ``indices [B, Hkv, K]`` (of the left-aligned batch) -> ``[B, Hkv, K, d]``."""
        b, h, k = indices.shape
        slots = self.rows.slots.gather(1, indices.reshape(b, h * k).to(self.rows.slots.device)).view(b, h, k)
        block_size = self.store.shape[2]
        head = torch.arange(h, device=slots.device).view(1, h, 1)
        picked = self.store[slots // block_size, head, slots % block_size]
        return picked if device is None else picked.to(device, non_blocking=True)


class CodeStore:
    """One layer's VQ codes, one per slot and KV head, beside the engine's pool of K/V blocks.

    Written once for every key as it enters the pool (prefill chunks and decode steps alike), read per step
    for the rows of a decode batch. A block reused by prefix caching holds the same keys at the same positions,
    so its codes stay valid.
    """

    def __init__(self, num_slots: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.codes = torch.zeros(num_slots, num_kv_heads, dtype=dtype, device=device)

    @property
    def num_slots(self) -> int:
        return self.codes.shape[0]

    def write(self, slots: torch.Tensor, codes: torch.Tensor) -> None:
        """``codes [T, Hkv]`` at ``slots [T]``; negative slots (padding tokens) are skipped."""
        keep = slots >= 0
        if not bool(keep.all()):
            slots, codes = slots[keep], codes[keep]
        self.codes[slots.long()] = codes.to(self.codes.dtype)

    def read(self, rows: DecodeRows) -> torch.Tensor:
        """Codes ``[B, Hkv, L]`` of a decode batch's rows."""
        return self.codes[rows.slots].permute(0, 2, 1)
