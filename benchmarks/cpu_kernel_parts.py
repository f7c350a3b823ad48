"""Where the fused CPU kernel's decode step goes: one step's layer calls timed whole, then with parts left out.

Each layer has its own codebook, codes and K/V (as in a real step, where the model's weights flush the caches
between layers). Default shape: SmolLM2's (3 KV heads x 3 query heads, head dim 64, 4096 codes, 30 layers) at
batch 4 and 8192 cached tokens, buckets 2x apart from 64 (7), top-K 3% (246) with re-ranking 2x. The parts,
by difference between rows: the re-rank's extra key reads (default - no re-rank), the K kept rows (no re-rank -
no top-K), the tables of P - 1 more buckets (no top-K - one bucket), scoring and cutting every row (one
bucket - one bucket at a tiny context); the Python wrapper (a plan per step, then each layer's call, as in
the runtime) is timed around the C call. ``torch bmm`` builds the same tables with torch, and ``index_select``
reads the same number of random key and value rows, for scale: the memory cost of the rows alone. Run: ``python benchmarks/cpu_kernel_parts.py [--tokens 8192] [--batch 4]``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from cpu_ops import add_shape_options  # a sibling script: the same shape options
from cpu_ops import timed as best_ms  # best of n after warm-up calls

from a2ats_tools.kernels import cpu_decode
from a2ats_tools.rope import DistanceBuckets
from a2ats_tools.runtime.settings import RuntimeSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_options(parser)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--budget", type=float, default=0.03, help="top-K as a fraction of the tokens")
    parser.add_argument("--rerank", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if not cpu_decode.available():
        raise SystemExit(f"the fused CPU kernel is unavailable here: {cpu_decode.unavailable_reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, hkv, grp, d, c, n = args.batch, args.kv_heads, args.group, args.head_dim, args.codes, args.tokens
    buckets = DistanceBuckets.log_spaced(n)
    p = buckets.count
    angles = torch.outer(torch.tensor(buckets.centres, dtype=torch.float32), torch.rand(d, generator=g))
    step_angles = torch.rand(b, d, generator=g) * 6
    q = torch.randn(b, hkv * grp, d, generator=g)
    layers = []
    for _ in range(args.layers):
        codebook = torch.randn(hkv, c, d, generator=g)
        layers.append({
            "codebook": codebook.transpose(1, 2).contiguous(),
            "tiles": cpu_decode.codebook_tiles(codebook),
            "codes": torch.randint(0, c, (b, hkv, n), generator=g).to(torch.int16),
            "keys": torch.randn(b, hkv, n, d, generator=g),
            "values": torch.randn(b, hkv, n, d, generator=g),
        })
    offsets = buckets.bucket_of((n - 1) - torch.arange(n)).to(torch.int64) * c  # row j at distance t - j
    top = max(1, round(args.budget * n))
    n_sink, window = RuntimeSettings.n_sink, RuntimeSettings.window  # the runtime's defaults

    step_cos, step_sin = step_angles.cos(), step_angles.sin()

    def stepper(used: int = p, length: int = n, k: int = top, rerank: float = args.rerank):
        """One step's layer calls with these parts; their inputs are built here, outside the timed calls (the
        runtime builds a step's offsets once for all layers)."""
        cos, sin = angles[:used].cos(), angles[:used].sin()
        rows_offsets = offsets[n - length :].clamp_max((used - 1) * c)

        def step() -> None:  # as the runtime: one plan per step, then each layer's call
            plan = cpu_decode.plan_step(step_cos, step_sin, rows_offsets, length, n_sink, window, k, rerank, "softmax")
            for layer in layers:
                cpu_decode.decode_layer(
                    plan, q, cos, sin, layer["tiles"], layer["codes"], layer["keys"], layer["values"], d**-0.5
                )

        return step

    step = stepper()
    rows = {
        f"default (P={p}, top-K {top}, re-rank {args.rerank:g}x)": best_ms(step, args.repeat),
        "no re-rank": best_ms(stepper(rerank=0.0), args.repeat),
        "no top-K rows (sinks + window only)": best_ms(stepper(k=0, rerank=0.0), args.repeat),
        "one bucket (P=1)": best_ms(stepper(used=1, k=0, rerank=0.0), args.repeat),
        "one bucket, 128 tokens": best_ms(stepper(used=1, length=128, k=0, rerank=0.0), args.repeat),
    }
    lib = cpu_decode._load()[0]
    call, spent = lib.a2ats_cpu_decode, [0.0]

    def timed_call(*a):
        start = time.perf_counter()
        out = call(*a)
        spent[0] += time.perf_counter() - start
        return out

    lib.a2ats_cpu_decode = timed_call
    try:
        start = time.perf_counter()
        for _ in range(args.repeat):
            step()
        whole = time.perf_counter() - start
    finally:
        lib.a2ats_cpu_decode = call
    wrapper_us = max(0.0, whole - spent[0]) / (args.repeat * args.layers) * 1e6
    forced = n_sink + window
    key_rows = min(n, (math.ceil(top * args.rerank) if args.rerank else top) + forced)  # every candidate's key
    value_rows = min(n, top + forced)  # the kept rows' values

    def rows_of(count: int) -> list[torch.Tensor]:
        return [torch.randint(0, n, (b * hkv, count), generator=g).sort(-1).values for _ in layers]

    picks = list(zip(rows_of(key_rows), rows_of(value_rows), strict=True))

    def read_rows() -> None:  # what reading the rows' bytes alone costs, as torch gathers them
        for layer, (k_rows, v_rows) in zip(layers, picks, strict=True):
            keys, values = layer["keys"].view(b * hkv, n, d), layer["values"].view(b * hkv, n, d)
            for r in range(b * hkv):
                keys[r].index_select(0, k_rows[r])
                values[r].index_select(0, v_rows[r])

    reads = (key_rows + value_rows) * b * hkv * args.layers
    read_ms = best_ms(read_rows, args.repeat)
    rotated = torch.randn(hkv, b * p, d, generator=g)
    table = torch.empty(hkv, b * p, c)
    bmm = best_ms(lambda: [torch.bmm(rotated, layer["codebook"], out=table) for layer in layers], args.repeat)
    gflop = 2 * args.layers * hkv * b * p * c * d / 1e9

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={b} Hkv={hkv} G={grp} d={d} C={c} "
          f"P={p} N={n} layers={args.layers}: best of {args.repeat}, ms per step (all layers)")
    for name, ms in rows.items():
        print(f"{name:44s} {ms:8.2f}")
    values = list(rows.values())
    print("parts, by difference:")
    print(f"{'  re-rank (extra candidate keys)':44s} {values[0] - values[1]:8.2f}")
    print(f"{'  the top-K rows (keys + values)':44s} {values[1] - values[2]:8.2f}")
    more = values[2] - values[3]  # the tables of P - 1 more buckets (the one-bucket table is partly memory-bound)
    more_gflop = gflop * (p - 1) / p
    print(f"{f'  tables of {p - 1} more buckets':44s} {more:8.2f}  "
          f"(~{more_gflop / max(more, 1e-9) * 1e3:.0f} GFLOP/s of {more_gflop:.2f} GFLOP)")
    print(f"{'  scoring + cutting every row':44s} {values[3] - values[4]:8.2f}")
    print(f"{'  Python wrapper per call (us)':44s} {wrapper_us:8.1f}")
    print(f"{'torch index_select of the same rows':44s} {read_ms:8.2f}  ({reads} random {d * 4}-byte rows, "
          f"{read_ms * 1e6 / reads:.0f} ns each)")
    print(f"{'torch bmm, the same tables':44s} {bmm:8.2f}  (~{gflop / bmm * 1e3:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
