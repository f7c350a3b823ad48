"""Encode pre-RoPE keys to their nearest codebook centroid in the query-aware (whitened) space.

With ``H = L Lᵀ`` the key whitening, the distance that matters is ``‖(k − c) L‖²``. Expanding it and dropping
the per-key constant ``‖k L‖²`` leaves ``argmin_c ‖c L‖² − 2 (k L)·(c L)``: one matmul of whitened keys
against the whitened codebook plus a per-code norm, both prepared once per checkpoint
(:func:`prepare_codebook`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import resolve_backend, tl, triton  # noqa: F401


@dataclass(frozen=True)
class EncodeTables:
    """Per-(layer) encoding tables: ``whitening [Hkv,d,d]``, ``wcodebook = codebook @ whitening [Hkv,C,d]``
    and ``wnorm = ‖wcodebook‖² [Hkv,C]`` (all float32)."""

    whitening: torch.Tensor
    wcodebook: torch.Tensor
    wnorm: torch.Tensor

    @property
    def codes(self) -> int:
        return self.wcodebook.shape[1]

    @property
    def code_dtype(self) -> torch.dtype:
        """int16 when every code fits, int32 otherwise."""
        return torch.int16 if self.codes <= 32767 else torch.int32

    def to(self, device: torch.device | str) -> EncodeTables:
        return EncodeTables(self.whitening.to(device), self.wcodebook.to(device), self.wnorm.to(device))


def prepare_codebook(codebook: torch.Tensor, whitening: torch.Tensor) -> EncodeTables:
    """Whiten the codebook ``[Hkv,C,d]`` with ``whitening [Hkv,d,d]`` (row vectors: ``c L``) once."""
    whitening = whitening.float().contiguous()
    wcodebook = torch.bmm(codebook.float(), whitening).contiguous()
    return EncodeTables(whitening, wcodebook, (wcodebook * wcodebook).sum(-1).contiguous())


def encode_torch(keys: torch.Tensor, tables: EncodeTables, chunk: int = 4096) -> torch.Tensor:
    """Codes ``[B,Hkv,N]`` (int16, or int32 beyond 32767 codes) of pre-RoPE ``keys [B,Hkv,N,d]``.

    Chunked over the ``B·N`` rows of each KV head, so at most ``Hkv × chunk × C`` distances exist at once.
    """
    b, hkv, n, d = keys.shape
    rows = keys.float().transpose(0, 1).reshape(hkv, b * n, d)  # [Hkv, B*N, d]
    wct = tables.wcodebook.transpose(1, 2)  # [Hkv, d, C]
    wnorm = tables.wnorm.unsqueeze(1)  # [Hkv, 1, C]
    codes = torch.empty(hkv, b * n, dtype=torch.long, device=keys.device)
    for lo in range(0, b * n, chunk):  # chunks of tokens, bounded memory
        w = torch.bmm(rows[:, lo : lo + chunk], tables.whitening)  # [Hkv, c, d]
        dist = torch.baddbmm(wnorm, w, wct, alpha=-2.0)  # [Hkv, c, C]
        codes[:, lo : lo + chunk] = dist.argmin(-1)
    return codes.to(tables.code_dtype).reshape(hkv, b, n).transpose(0, 1).contiguous()


def encode_triton(keys: torch.Tensor, tables: EncodeTables) -> torch.Tensor:
    """Triton version of :func:`encode_torch` (same contract)."""
    raise NotImplementedError("triton encode kernel not implemented yet")


def encode(keys: torch.Tensor, tables: EncodeTables, backend: str = "auto") -> torch.Tensor:
    """Codes of ``keys [B,Hkv,N,d]``; ``auto`` runs Triton on CUDA tensors and torch otherwise."""
    if resolve_backend(backend, keys, tables.wcodebook) == "triton":
        return encode_triton(keys, tables)
    return encode_torch(keys, tables)
