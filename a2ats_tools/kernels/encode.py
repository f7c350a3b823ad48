"""Encode pre-RoPE keys to their nearest codebook centroid in the query-aware (whitened) space.

With ``H = L Lᵀ`` the key whitening, the distance that matters is ``‖(k − c) L‖²``. Expanding it and dropping
the per-key constant ``‖k L‖²`` leaves ``argmax_c k · (L (c L)ᵀ) − ½ ‖c L‖²``: one matmul of the raw keys
against a folded weight plus a per-code bias, both prepared once per checkpoint (:func:`prepare_codebook`). The
torch version is what the runtime runs off the fused kernels; the Triton version whitens in the kernel instead,
and the fused CPU kernel (``cpu_decode.encode``) reads the folded weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import resolve_backend, tl, triton

INT16_CODES = torch.iinfo(torch.int16).max  # the most codes int16 holds: 0..32766 need C <= 32767


def code_dtype(num_codes: int) -> torch.dtype:
    """The dtype of a codes buffer for a codebook of ``num_codes``: int16 while every code fits (half the
    memory, and what the fused CPU kernel reads), int32 above, so a code never wraps negative."""
    return torch.int16 if num_codes <= INT16_CODES else torch.int32


@dataclass(frozen=True)
class EncodeTables:
    """Per-(layer) encoding tables (all float32): ``whitening [Hkv,d,d]``, ``wcodebook = codebook @ whitening
    [Hkv,C,d]``, ``wnorm = ‖wcodebook‖² [Hkv,C]``, and their fold ``weight = whitening @ wcodebookᵀ [Hkv,d,C]``
    with ``bias = −½ wnorm [Hkv,1,C]``."""

    whitening: torch.Tensor
    wcodebook: torch.Tensor
    wnorm: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def codes(self) -> int:
        return self.wcodebook.shape[1]

    @property
    def code_dtype(self) -> torch.dtype:
        """:func:`code_dtype` of this codebook."""
        return code_dtype(self.codes)

    def to(self, device: torch.device | str) -> EncodeTables:
        return EncodeTables(*(t.to(device) for t in (self.whitening, self.wcodebook, self.wnorm, self.weight, self.bias)))


def prepare_codebook(codebook: torch.Tensor, whitening: torch.Tensor) -> EncodeTables:
    """Whiten the codebook ``[Hkv,C,d]`` with ``whitening [Hkv,d,d]`` (row vectors: ``c L``) once."""
    whitening = whitening.float().contiguous()
    wcodebook = torch.bmm(codebook.float(), whitening).contiguous()
    wnorm = (wcodebook * wcodebook).sum(-1).contiguous()
    weight = (whitening @ wcodebook.transpose(1, 2)).contiguous()
    return EncodeTables(whitening, wcodebook, wnorm, weight, (-0.5 * wnorm).unsqueeze(1).contiguous())


TEMP_BYTES = 24 << 20  # bounds one chunk's [Hkv, rows, C] score temporary: near cache size, and few matmuls


def encode_torch(keys: torch.Tensor, tables: EncodeTables, temp_bytes: int = TEMP_BYTES) -> torch.Tensor:
    """Codes ``[B,Hkv,N]`` (int16, or int32 beyond 32767 codes) of pre-RoPE ``keys [B,Hkv,N,d]``.

    Chunked over the ``B·N`` rows of each KV head so that one chunk's scores take at most ``temp_bytes`` (at
    least 64 rows a chunk).
    """
    b, h, n, d = keys.shape
    flat = keys.float().transpose(0, 1).reshape(h, b * n, d)
    out = torch.empty(h, b * n, dtype=tables.code_dtype, device=keys.device)
    rows = max(64, temp_bytes // (4 * h * tables.codes))
    for i in range(0, b * n, rows):
        out[:, i : i + rows] = torch.baddbmm(tables.bias, flat[:, i : i + rows], tables.weight).argmax(-1)
    return out.reshape(h, b, n).transpose(0, 1)


if triton is not None:

    @triton.jit
    def _encode_kernel(
        keys_ptr,  # [B,Hkv,N,d] any float dtype, strided
        whitening_ptr,  # [Hkv,d,d] f32 contiguous
        wcodebook_ptr,  # [Hkv,C,d] f32 contiguous
        wnorm_ptr,  # [Hkv,C] f32 contiguous
        codes_ptr,  # [B,Hkv,N] int16/int32 contiguous
        n_tokens,
        n_codes,
        head_dim,
        n_kv_heads,
        stride_kb,
        stride_kh,
        stride_kn,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        D: tl.constexpr,
        WHITEN: tl.constexpr,  # False: keys_ptr holds already whitened f32 keys
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // n_kv_heads).to(tl.int64)  # 64-bit offsets into large caches
        h = bh % n_kv_heads
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D)
        row_ok = rows < n_tokens
        dim_ok = dims < head_dim
        k = tl.load(
            keys_ptr + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if WHITEN:
            lw = tl.load(
                whitening_ptr + h * head_dim * head_dim + dims[:, None] * head_dim + dims[None, :],
                mask=dim_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            w = tl.dot(k, lw, input_precision="ieee")  # whitened keys [BLOCK_N, D]
        else:
            w = k
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_code = tl.zeros((BLOCK_N,), tl.int32)
        for c0 in range(0, n_codes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < n_codes
            cb = tl.load(
                wcodebook_ptr + h * n_codes * head_dim + cols[:, None] * head_dim + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            norm = tl.load(wnorm_ptr + h * n_codes + cols, mask=col_ok, other=float("inf"))
            dist = norm[None, :] - 2.0 * tl.dot(w, tl.trans(cb), input_precision="ieee")
            tile_best, tile_code = tl.min(dist, axis=1, return_indices=True)
            better = tile_best < best  # strict: the first (lowest) code wins ties, as torch.argmin
            best = tl.where(better, tile_best, best)
            best_code = tl.where(better, tile_code + c0, best_code)
        tl.store(codes_ptr + bh * n_tokens + rows, best_code, mask=row_ok)


def encode_triton(
    keys: torch.Tensor, tables: EncodeTables, block_n: int = 64, block_c: int | None = None
) -> torch.Tensor:
    """Triton version of :func:`encode_torch` (same contract).

    One program per (token block, sequence, KV head): the key block is whitened in-kernel (one ``tl.dot``
    with ``L``; for head dims above 64 ``L`` would not fit in registers, so keys are whitened by one torch
    matmul first), then the codebook streams through in ``block_c`` tiles, keeping a running (min, argmin)
    per key; no ``[N, C]`` matrix is ever stored. Dots run in full fp32 (``input_precision="ieee"``) so codes
    match the torch reference except on exact float ties. 8 warps: 4 spill registers at d = 64 (sm_90).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, hkv, n, d = keys.shape
    c = tables.codes
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    codes = torch.empty(b, hkv, n, dtype=tables.code_dtype, device=keys.device)
    if n == 0:
        return codes
    dpad = max(16, triton.next_power_of_2(d))
    whiten_in_kernel = dpad <= 64
    if not whiten_in_kernel:
        keys = torch.matmul(keys.float(), tables.whitening.unsqueeze(0))  # [B,Hkv,N,d] whitened
    block_c = block_c or (64 if dpad <= 64 else 32)
    block_n = max(16, min(block_n if dpad <= 64 else 32, triton.next_power_of_2(n)))
    block_c = max(16, min(block_c, triton.next_power_of_2(c)))
    grid = (triton.cdiv(n, block_n), b * hkv)
    _encode_kernel[grid](
        keys,
        tables.whitening,
        tables.wcodebook,
        tables.wnorm,
        codes,
        n,
        c,
        d,
        hkv,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        D=dpad,
        WHITEN=whiten_in_kernel,
        num_warps=8,
    )
    return codes


def encode(keys: torch.Tensor, tables: EncodeTables, backend: str = "auto") -> torch.Tensor:
    """Codes of ``keys [B,Hkv,N,d]``; ``auto`` runs Triton on CUDA tensors and torch otherwise."""
    if resolve_backend(backend, keys, tables.wcodebook) == "triton":
        return encode_triton(keys, tables)
    return encode_torch(keys, tables)
