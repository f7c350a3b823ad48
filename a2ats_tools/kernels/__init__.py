"""The runtime's three hot ops, each as a Triton kernel plus a vectorised torch reference (the CPU path).

- :mod:`.encode`: nearest-centroid codes of new keys in the query-aware (whitened) space.
- :mod:`.score_select`: per-step lookup tables, table-gather scoring of every cached token, top-K.
- :mod:`.sparse_attention`: exact decode attention over the selected rows of the KV cache.

Every op takes ``backend="auto"|"torch"|"triton"``; ``auto`` runs Triton on CUDA tensors, torch otherwise.
"""

from .encode import EncodeTables, code_dtype, encode, encode_torch, encode_triton, prepare_codebook
from .score_select import (
    build_tables_torch,
    score_select,
    score_torch,
    score_triton,
    select_topk,
)
from .sparse_attention import sparse_decode, sparse_decode_torch, sparse_decode_triton

__all__ = [
    "EncodeTables",
    "build_tables_torch",
    "code_dtype",
    "encode",
    "encode_torch",
    "encode_triton",
    "prepare_codebook",
    "score_select",
    "score_torch",
    "score_triton",
    "select_topk",
    "sparse_decode",
    "sparse_decode_torch",
    "sparse_decode_triton",
]
