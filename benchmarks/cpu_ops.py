"""Time the kernels' torch references (the runtime's CPU path) at the runtime's decode shape.

Default shape: batch 4, 3 KV heads x 3 query heads each, head dim 64, 4096 codes, log-spaced buckets
(start 64, ratio 2) up to 8K, 8192 cached tokens, top-K 318 (sinks and window on top) — one layer's work per
decode step. Run: ``python benchmarks/cpu_ops.py [--tokens 8192] [--batch 4] [--threads N]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from a2ats_tools.kernels import build_tables, encode_torch, prepare_codebook, score_torch, sparse_decode_torch
from a2ats_tools.rope import DistanceBuckets
from a2ats_tools.runtime.settings import RuntimeSettings
from a2ats_tools.selection import select


def timed(fn, repeat: int) -> float:
    """Best wall time of ``fn()`` in milliseconds (after two warm-up calls).

    The best, not the median: on a shared machine the median measures the neighbours' load.
    """
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    """The decode shape's options, SmolLM2's at batch 4 and 8K tokens by default (shared by the CPU benchmarks)."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--group", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--codes", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_options(parser)
    parser.add_argument("--ratio", type=float, default=2.0, help="log-spaced bucket ratio (P follows)")
    parser.add_argument("--topk", type=int, default=318)
    parser.add_argument(
        "--prefill", type=int, default=2048, help="tokens per sequence for the prefill encode"
    )
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, hkv, g, d, c, n = args.batch, args.kv_heads, args.group, args.head_dim, args.codes, args.tokens
    buckets = DistanceBuckets.log_spaced(n, start=64, ratio=args.ratio)
    p = buckets.count
    codebook = torch.randn(hkv, c, d)
    a = torch.randn(hkv, d, d)
    tables_enc = prepare_codebook(codebook, torch.linalg.cholesky(torch.eye(d) + 0.1 * a @ a.transpose(1, 2)))
    angles = torch.rand(p, d // 2) * 6.3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    codebook_t = codebook.transpose(1, 2).contiguous()
    q = torch.randn(b, hkv * g, d)
    codes = torch.randint(0, c, (b, hkv, n), dtype=torch.int16)
    valid = torch.ones(b, n, dtype=torch.bool)
    k_cache = torch.randn(b, hkv, n, d, dtype=torch.bfloat16)
    v_cache = torch.randn(b, hkv, n, d, dtype=torch.bfloat16)
    step_key = torch.randn(b, hkv, 1, d, dtype=torch.bfloat16)
    prefill_keys = torch.randn(b, hkv, args.prefill, d, dtype=torch.bfloat16)
    k = args.topk + 8 + 64
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={b} Hkv={hkv} G={g} d={d} C={c} P={p} N={n} K={k}"
    )
    results = {}
    offsets = buckets.row_buckets(n).long() * c
    for agg in ("sum", "max"):
        tables = build_tables(q, codebook_t, cos, sin, agg)
        scores = score_torch(tables, codes, offsets, agg)
        results[f"build_tables ({agg})"] = timed(
            lambda agg=agg: build_tables(q, codebook_t, cos, sin, agg), args.repeat
        )
        results[f"score ({agg})"] = timed(
            lambda t=tables, agg=agg: score_torch(t, codes, offsets, agg), args.repeat
        )
    policy = RuntimeSettings(budget=args.topk)
    results["select (top-K)"] = timed(lambda: select(scores, valid, policy), args.repeat)
    indices, keep, _ = select(scores, valid, policy)
    results["sparse_decode (bf16 cache)"] = timed(
        lambda: sparse_decode_torch(q, k_cache, v_cache, indices, keep, d**-0.5), args.repeat
    )
    results["encode (1 new key/seq)"] = timed(lambda: encode_torch(step_key, tables_enc), args.repeat)
    step = sum(
        results[name]
        for name in ("build_tables (sum)", "score (sum)", "select (top-K)", "sparse_decode (bf16 cache)")
    )
    step += results["encode (1 new key/seq)"]
    for name, ms in results.items():
        print(f"{name:32s} {ms:8.3f} ms")
    print(f"{'decode step, one layer (sum)':32s} {step:8.3f} ms")
    pre = timed(lambda: encode_torch(prefill_keys, tables_enc), max(3, args.repeat // 5))
    per_token = pre / (b * args.prefill) * 1e3
    print(
        f"{f'encode prefill ({b}x{args.prefill} keys)':32s} {pre:8.3f} ms  ({per_token:.2f} us/token/layer)"
    )


if __name__ == "__main__":
    main()
