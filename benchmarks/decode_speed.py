"""Decode throughput: A²ATS retrieval attention vs HF dense (DynamicCache + SDPA), side by side in one run.

Both start from the same prefilled context of real text (Python's documentation topics): the dense prefill
runs once (chunked), and the A²ATS cache is built from its keys/values (each key encoded once, as a real
prefill would). Then N decode steps alternate dense / A²ATS so both see the same machine load. Also times dense
decode at a short context (the ceiling). `a2ats bench` is the full harness (grids, floor, JSON, plots).

    python benchmarks/decode_speed.py                       # embedded SmolLM2, batch 4, 8K context
    python benchmarks/decode_speed.py --context 2048 --steps 16 --buckets single --set rerank=0 --profile
    python benchmarks/decode_speed.py --checkpoint runs/ckpt --budget 0.03
    python benchmarks/decode_speed.py --checkpoint runs/ckpt --batch 1 --context 131072 --synthetic-from 4096

Without --checkpoint the codebook is random (speed does not depend on its values; recall does).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from a2ats_tools.compat import cache_kwargs
from a2ats_tools.runtime.settings import RuntimeSettings

CLOCK = time.perf_counter  # --cpu-time switches to process CPU time (robust on a shared, loaded machine)


def build_runtime_model(model, checkpoint, codes: int, settings: dict):
    from a2ats_tools.artifacts.checkpoint import A2atsConfig, read_codebooks, read_config
    from a2ats_tools.models import geometry
    from a2ats_tools.runtime.loader import attach

    if checkpoint:
        config = read_config(checkpoint)
        books, whitening = read_codebooks(checkpoint, config)
    else:
        geo = geometry(model)
        config = A2atsConfig(geometry=geo, codebook_size=codes, whitening="plain")
        g = torch.Generator().manual_seed(0)
        books = [torch.randn(geo.num_kv_heads, codes, geo.head_dim, generator=g) for _ in range(geo.num_layers)]
        whitening = [torch.eye(geo.head_dim).expand(geo.num_kv_heads, -1, -1).contiguous()] * geo.num_layers
    ours = attach(copy.deepcopy(model), config, books, whitening, RuntimeSettings.from_config(config, **settings))
    return ours


def dense_cache(model, ids, synthetic_from: int):
    """A real chunked dense prefill of ``ids``, or (``synthetic_from``) a real prefill of its first
    ``synthetic_from`` tokens tiled to its length, keys re-rotated (see ``a2ats_tools.bench.synthetic``)."""
    from a2ats_tools.bench.prefill import real_prefill
    from a2ats_tools.bench.synthetic import synthetic_prefill

    if synthetic_from and synthetic_from < ids.shape[1]:
        return synthetic_prefill(model, ids[:, :synthetic_from], ids.shape[1]).cache
    return real_prefill(model, ids).cache


def time_steps(model, cache, tokens, steps: int, context: int) -> list[float]:
    times = []
    mask_len = context
    for i in range(steps):
        mask_len += 1
        mask = torch.ones(tokens.shape[0], mask_len, dtype=torch.long)
        t = CLOCK()
        model(input_ids=tokens[:, i : i + 1], attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        times.append(CLOCK() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--codes", type=int, default=4096)
    p.add_argument("--budget", default=None, help="default: the checkpoint's (3%%)")
    p.add_argument("--buckets", default=None, help="default: the checkpoint's distance buckets")
    p.add_argument("--rerank", type=float, default=None, help=f"default: the runtime's ({RuntimeSettings.rerank:g})")
    p.add_argument("--set", default="", help="more runtime overrides, e.g. score_dtype=float32")
    p.add_argument("--chunk", type=int, default=4096, help="A²ATS cache fill chunk")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--synthetic-from", type=int, default=0, metavar="N",
                   help="a real N-token prefill tiled to --context (keys re-rotated) instead of a real prefill")
    p.add_argument("--cpu-time", action="store_true", help="time steps by process CPU time instead of wall time")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of A²ATS decode steps")
    args = p.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    from a2ats_tools.bench.prompts import prompt_ids, text_tokens
    from a2ats_tools.models import load_model, load_tokenizer, resolve_source
    from a2ats_tools.runtime.settings import parse_overrides

    source = resolve_source(None)
    dense = load_model(source)
    settings = {"budget": args.budget, "buckets": args.buckets, "rerank": args.rerank, **(parse_overrides(args.set) if args.set else {})}
    ours = build_runtime_model(dense, args.checkpoint, args.codes, settings)
    g = torch.Generator().manual_seed(0)
    ids = prompt_ids(text_tokens(load_tokenizer(source), seed=0), args.batch, args.context)
    feed = torch.randint(0, dense.config.vocab_size, (args.batch, args.steps + 1), generator=g)
    with torch.inference_mode():
        t = time.perf_counter()
        dcache = dense_cache(dense, ids, args.synthetic_from)
        kind = f"synthetic cache (from {args.synthetic_from})" if args.synthetic_from else "prefill"
        print(f"dense {kind} {args.batch}x{args.context}: {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        acache = ours.a2ats.cache_from(dcache, chunk=args.chunk, reserve=args.context + 2 * args.steps + 8)
        print(f"A²ATS cache fill (encode {ours.a2ats.config.codebook_size} codes): {time.perf_counter() - t:.1f} s", flush=True)
        short = dense_cache(dense, ids[:, :512], 0)
        # warm-up one step each
        time_steps(dense, dcache, feed[:, :1], 1, args.context)
        time_steps(ours, acache, feed[:, :1], 1, args.context)
        time_steps(dense, short, feed[:, :1], 1, 512)
        d_times, a_times, s_times = [], [], []
        for i in range(1, args.steps + 1):
            d_times += time_steps(dense, dcache, feed[:, i : i + 1], 1, args.context + i)
            a_times += time_steps(ours, acache, feed[:, i : i + 1], 1, args.context + i)
            s_times += time_steps(dense, short, feed[:, i : i + 1], 1, 512 + i)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_steps(ours, acache, feed[:, :4], 4, args.context + args.steps + 1)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    d, a, s = med(d_times), med(a_times), med(s_times)
    b = args.batch
    print(f"clock: {'process CPU time' if args.cpu_time else 'wall'}; {torch.get_num_threads()} threads")
    print(f"median step: dense {d * 1e3:.1f} ms, A²ATS {a * 1e3:.1f} ms, dense@512 {s * 1e3:.1f} ms")
    print(f"throughput (tokens/s, batch {b}): dense {b / d:.1f}, A²ATS {b / a:.1f}, dense@512 {b / s:.1f}")
    print(f"speed-up A²ATS/dense: {d / a:.2f}x (ceiling dense@512/dense: {d / s:.2f}x)")
    print(f"A²ATS bytes on the compute device: {acache.device_bytes() / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
