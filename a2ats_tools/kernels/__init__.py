"""The runtime's hot ops, each a torch version (the one the runtime runs off CUDA) with its Triton version beside
it, plus the fused CPU decode step that does a layer's whole step in one C++ call.

- :mod:`.encode`: nearest-centroid codes of new keys in the query-aware (whitened) space.
- :mod:`.score_select`: per-step lookup tables and the table-gather score of every cached token.
- :mod:`.sparse_attention`: exact decode attention over the selected rows of the KV cache.
- :mod:`.cpu_decode`: the fused CPU step (tables, scores, selection, re-ranking and attention) and encode.

Which rows a step keeps is :func:`a2ats_tools.selection.select`. Every op takes ``backend="auto"|"torch"|"triton"``;
``auto`` runs Triton on CUDA tensors, torch otherwise.
"""

from .encode import EncodeTables, code_dtype, encode, encode_torch, encode_triton, prepare_codebook
from .score_select import build_tables, score, score_torch, score_triton
from .sparse_attention import gather_rows, sparse_decode, sparse_decode_torch, sparse_decode_triton

__all__ = [
    "EncodeTables",
    "build_tables",
    "code_dtype",
    "encode",
    "encode_torch",
    "encode_triton",
    "gather_rows",
    "prepare_codebook",
    "score",
    "score_torch",
    "score_triton",
    "sparse_decode",
    "sparse_decode_torch",
    "sparse_decode_triton",
]
