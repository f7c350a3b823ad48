"""Micro-benchmark of the three Triton kernels against their torch references, with achieved bandwidth.

On a CUDA device each op is checked against its torch reference, then timed with ``triton.testing.do_bench``;
the report gives time, bytes moved, achieved GB/s and the share of the device's peak bandwidth (``--peak-gbs``,
or looked up from the device name). Without a GPU the kernels run under the Triton interpreter at tiny sizes:
a correctness smoke run only, its times mean nothing.

    python benchmarks/kernels.py                      # runtime decode shape: B=4, 8K context, SmolLM2 heads
    python benchmarks/kernels.py --tokens 32768 --batch 8 --peak-gbs 3350
    python benchmarks/kernels.py --tiny               # forced tiny sizes (what a CPU-only machine runs)
    python benchmarks/kernels.py --compile-only sm_90 # compile every kernel for a GPU (no GPU needed):
                                                      # registers and spills per kernel, via ptxas/cuobjdump
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if "--compile-only" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, compiled ahead of time below
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import

# Peak HBM/GDDR bandwidth in GB/s by device-name fragment (first match wins; more specific names first).
PEAK_GBS = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H100": 3350.0,
    "GH200": 4000.0,
    "B200": 8000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L40": 864.0,
    "L4": 300.0,
    "A10G": 600.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
    "RTX 3090": 936.0,
    "T4": 320.0,
    "V100": 900.0,
}


def peak_bandwidth(device_name: str) -> float | None:
    for fragment, gbs in PEAK_GBS.items():
        if fragment.lower() in device_name.lower():
            return gbs
    return None


def bench(fn, cuda: bool) -> float:
    """Milliseconds per call: ``do_bench`` (median) on CUDA, one timed call under the interpreter."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def compile_only(arch: int, head_dim: int, group: int) -> int:
    """Compile each kernel for CUDA ``sm_<arch>`` at the given shape; print registers and stack (spills)."""
    import importlib
    import subprocess
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    enc = importlib.import_module("a2ats_tools.kernels.encode")
    sco = importlib.import_module("a2ats_tools.kernels.score_select")
    spa = importlib.import_module("a2ats_tools.kernels.sparse_attention")
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    i32 = "i32"
    dpad = max(16, triton.next_power_of_2(head_dim))
    gp = triton.next_power_of_2(group)
    block_k = 32 if gp * dpad * 32 <= 8192 else 16
    cases = [
        (
            "encode",
            enc._encode_kernel,
            dict(
                keys_ptr="*bf16" if dpad <= 64 else "*fp32",
                whitening_ptr="*fp32",
                wcodebook_ptr="*fp32",
                wnorm_ptr="*fp32",
                codes_ptr="*i16",
                n_tokens=i32,
                n_codes=i32,
                head_dim=i32,
                n_kv_heads=i32,
                stride_kb=i32,
                stride_kh=i32,
                stride_kn=i32,
            ),
            dict(
                BLOCK_N=64 if dpad <= 64 else 32, BLOCK_C=64 if dpad <= 64 else 32, D=dpad, WHITEN=dpad <= 64
            ),
            8,
        ),
        *(
            (
                f"score ({'max' if agg_max else 'sum'})",
                sco._score_kernel,
                dict(
                    tables_ptr="*fp32",
                    codes_ptr="*i16",
                    offsets_ptr="*i64",
                    scores_ptr="*fp32",
                    length=i32,
                    n_kv_heads=i32,
                    table_size=i32,
                    stride_cb=i32,
                    stride_ch=i32,
                ),
                dict(GROUP=group if agg_max else 1, AGG_MAX=agg_max, BLOCK=1024),
                4,
            )
            for agg_max in (False, True)
        ),
        (
            "sparse_decode split",
            spa._sparse_decode_split_kernel,
            dict(
                q_ptr="*bf16",
                k_ptr="*bf16",
                v_ptr="*bf16",
                indices_ptr="*i64",
                keep_ptr="*i8",
                m_ptr="*fp32",
                l_ptr="*fp32",
                acc_ptr="*fp32",
                n_kv_heads=i32,
                group=i32,
                head_dim=i32,
                n_selected=i32,
                per_split=i32,
                n_splits=i32,
                scale="fp32",
                stride_qb=i32,
                stride_qh=i32,
                stride_kb=i32,
                stride_kh=i32,
                stride_kn=i32,
                stride_vb=i32,
                stride_vh=i32,
                stride_vn=i32,
            ),
            dict(GP=gp, D=dpad, BLOCK_K=block_k),
            4 if gp * dpad * block_k <= 8192 else 8,
        ),
        (
            "sparse_decode reduce",
            spa._sparse_decode_reduce_kernel,
            dict(
                m_ptr="*fp32",
                l_ptr="*fp32",
                acc_ptr="*fp32",
                out_ptr="*bf16",
                group=i32,
                head_dim=i32,
                n_splits=i32,
            ),
            dict(GP=gp, D=dpad, SP=32),
            4,
        ),
    ]
    print(f"compiling for sm_{arch}, head_dim {head_dim}, group {group} (triton {triton.__version__})")
    for name, fn, signature, constexprs, warps in cases:
        signature = {**signature, **{key: "constexpr" for key in constexprs}}
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs), target=target, options={"num_warps": warps}
        )
        usage = "cuobjdump not found"
        if cuobjdump.is_file():
            cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"a2ats_{os.getpid()}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            dump = subprocess.run(
                [str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
            )
            cubin.unlink()
            line = next((ln.strip() for ln in dump.stdout.splitlines() if "REG:" in ln), "")
            usage = " ".join(line.split()[:2])
        print(f"{name:22s} ok  warps {warps}  {usage}")
    return 0


def main() -> int:
    if "--compile-only" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--compile-only", default="sm_90", metavar="sm_XX")
        parser.add_argument("--head-dim", type=int, default=64)
        parser.add_argument("--group", type=int, default=3)
        args, _ = parser.parse_known_args()
        return compile_only(int(args.compile_only.removeprefix("sm_")), args.head_dim, args.group)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--group", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--codes", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192, help="cached tokens per sequence")
    parser.add_argument(
        "--buckets", type=int, default=7, help="distance buckets P (ratio 2 from 64: 7 at 8K)"
    )
    parser.add_argument("--topk", type=int, default=390, help="selected rows per KV head (K)")
    parser.add_argument(
        "--prefill", type=int, default=4096, help="keys per sequence for the encode benchmark"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--peak-gbs", type=float, default=None, help="device peak bandwidth in GB/s")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (default without a GPU)")
    parser.add_argument("--compile-only", metavar="sm_XX", help="only compile the kernels for this GPU arch")
    args = parser.parse_args()

    from a2ats_tools.kernels import (
        build_tables,
        encode_torch,
        encode_triton,
        prepare_codebook,
        score_torch,
        score_triton,
        sparse_decode_torch,
        sparse_decode_triton,
    )
    from a2ats_tools.rope import DistanceBuckets
    from a2ats_tools.runtime.settings import RuntimeSettings
    from a2ats_tools.selection import select

    cuda = torch.cuda.is_available()
    if args.tiny or not cuda:
        args.batch, args.kv_heads, args.group, args.head_dim = 1, 2, 2, 16
        args.codes, args.tokens, args.buckets, args.topk, args.prefill = 40, 300, 3, 45, 20
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: correctness only)"
    peak = args.peak_gbs or (peak_bandwidth(name) if cuda else None)
    dtype = getattr(torch, args.dtype)
    b, hkv, g, d, c, n, p, k = (
        args.batch,
        args.kv_heads,
        args.group,
        args.head_dim,
        args.codes,
        args.tokens,
        args.buckets,
        args.topk,
    )
    elem = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    a = rand(hkv, d, d)
    tables_enc = prepare_codebook(
        rand(hkv, c, d), torch.linalg.cholesky(torch.eye(d, device=device) + 0.1 * a @ a.mT)
    )
    keys = rand(b, hkv, args.prefill, d).to(dtype)
    codebook = rand(hkv, c, d)
    q = rand(b, hkv * g, d)
    angles = rand(p, d // 2) * 6.3
    lookup = build_tables(q, codebook.transpose(1, 2).contiguous(), torch.cat([angles.cos()] * 2, -1),
                          torch.cat([angles.sin()] * 2, -1), "sum")
    codes = torch.randint(0, c, (b, hkv, n), generator=gen, dtype=torch.int16).to(device)
    k_cache = rand(b, hkv, n, d).to(dtype)
    v_cache = rand(b, hkv, n, d).to(dtype)
    offsets = DistanceBuckets.geometric(p, 64.0, 2.0).row_buckets(n, device).long() * c
    score_args = (lookup, codes, offsets, "sum")
    valid = torch.ones(b, n, dtype=torch.bool, device=device)
    indices, keep, _ = select(score_torch(*score_args), valid, RuntimeSettings(budget=k))
    q_dec = q.to(dtype)

    # correctness first
    assert torch.equal(encode_triton(keys, tables_enc), encode_torch(keys, tables_enc)), "encode mismatch"
    torch.testing.assert_close(score_triton(*score_args), score_torch(*score_args))
    got = sparse_decode_triton(q_dec, k_cache, v_cache, indices, keep, d**-0.5)
    want = sparse_decode_torch(q_dec, k_cache, v_cache, indices, keep, d**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

    code_bytes = codes.element_size()
    ops = {
        "encode": (
            lambda: encode_triton(keys, tables_enc),
            lambda: encode_torch(keys, tables_enc),
            b * hkv * args.prefill * (d * elem + code_bytes) + hkv * c * (d + 1) * 4,
            2.0 * b * hkv * args.prefill * c * d,
        ),
        "score": (
            lambda: score_triton(*score_args),
            lambda: score_torch(*score_args),
            b * hkv * n * (code_bytes + 4 + 4) + n * 8,  # codes, one table read, score write; offsets
            0.0,
        ),
        "sparse_decode": (
            lambda: sparse_decode_triton(q_dec, k_cache, v_cache, indices, keep, d**-0.5),
            lambda: sparse_decode_torch(q_dec, k_cache, v_cache, indices, keep, d**-0.5),
            b * hkv * k * (2 * d * elem + 8 + 1) + 2 * b * hkv * g * d * elem,
            4.0 * b * hkv * g * k * d,
        ),
    }
    print(f"{name}; B={b} Hkv={hkv} G={g} d={d} C={c} P={p} N={n} K={k} prefill={args.prefill} {args.dtype}")
    if peak:
        print(f"peak bandwidth {peak:.0f} GB/s")
    print(
        f"{'op':14s} {'triton ms':>10s} {'torch ms':>10s} {'MB moved':>9s} {'GB/s':>8s} {'% peak':>7s} {'TFLOP/s':>8s}"
    )
    for op, (triton_fn, torch_fn, nbytes, flops) in ops.items():
        t_triton = bench(triton_fn, cuda)
        t_torch = bench(torch_fn, cuda)
        gbs = nbytes / (t_triton * 1e-3) / 1e9
        share = f"{100 * gbs / peak:6.1f}%" if peak else "      -"
        tflops = f"{flops / (t_triton * 1e-3) / 1e12:8.2f}" if flops else "       -"
        print(f"{op:14s} {t_triton:10.3f} {t_torch:10.3f} {nbytes / 1e6:9.2f} {gbs:8.1f} {share} {tflops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
