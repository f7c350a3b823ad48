"""vLLM decode throughput, A²ATS against vLLM's own dense attention, on one converted checkpoint, in one run.

    python benchmarks/vllm_decode.py runs/smollm2-a2ats --points 8192x1,8192x8,32768x1 --out runs/bench-vllm

For each contender (vLLM dense: the checkpoint served with ``selector=dense``; A²ATS: its own settings) one
engine serves every point in turn. A point prefills ``batch`` distinct prompts of real text (``context`` tokens
each) once, then generates ``new`` tokens for the same prompts, whose prefill prefix caching serves from the
first pass (with ``--share-from``, long batches share a prefix, so one prefill serves the batch): every
request then decodes in lockstep, and a decode step is ``(last token - first token) / (new -
1)`` from vLLM's own per-request timestamps (median over the requests, min/median/max over ``--repeats``).
Contexts beyond the model's ``max_position_embeddings`` are timed with ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` and
noted: timing does not depend on what the model makes of them, quality does. Writes ``bench-vllm.json``
(rendered by benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

CONTENDERS = {"vLLM dense": "selector=dense", "A²ATS": ""}


def text_tokens(tokenizer, count: int) -> list[int]:
    """Tokens of Python's own documentation (real prose and code), repeated to ``count``."""
    import pydoc_data.topics

    ids = tokenizer("\n\n".join(pydoc_data.topics.topics.values()), add_special_tokens=False)["input_ids"]
    return (ids * (count // len(ids) + 1))[:count]


def prompts_for(tokens: list[int], context: int, batch: int, salt: int, shared: int = 0) -> list[dict]:
    """``batch`` distinct prompts of ``context`` tokens (different windows of the text); with ``shared``, each
    starts with the same ``shared`` tokens and only its last ``context - shared`` differ, so one prefill
    (prefix-cached) serves every request."""
    tail = context - shared
    stride = max(1, (len(tokens) - tail) // max(1, batch))
    head = tokens[:shared]
    return [{"prompt_token_ids": head + tokens[(salt + i * stride) % (len(tokens) - tail) :][:tail]}
            for i in range(batch)]


def parse_points(spec: str) -> list[tuple[int, int]]:
    """``"8192x1,8192x8"`` -> ``[(8192, 1), (8192, 8)]``."""
    try:
        return [(int(c), int(b)) for c, b in (p.lower().split("x") for p in spec.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"points are CONTEXTxBATCH pairs such as 8192x1, got {spec!r}") from None


def step_seconds(outputs) -> float:
    """Median over requests of the decode step from vLLM's per-request timestamps."""
    steps = []
    for o in outputs:
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        if m is None or n < 2 or not m.last_token_ts:
            raise SystemExit("vLLM returned no per-request timestamps (the engine must log stats)")
        steps.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    return statistics.median(steps)


def run_contender(name: str, settings: str, args, tokens: list[int]) -> list[dict]:
    from vllm import LLM, SamplingParams

    os.environ["A2ATS_SETTINGS"] = settings
    longest = max(c for c, _ in args.points) + args.new + 64
    llm = LLM(model=str(args.checkpoint), dtype="float32", enforce_eager=True, seed=0, max_model_len=longest,
              kv_cache_memory_bytes=args.kv_gib << 30, max_num_seqs=max(b for _, b in args.points), enable_prefix_caching=True,
              disable_log_stats=False, max_num_batched_tokens=args.chunk)
    warm = SamplingParams(max_tokens=1, temperature=0.0)
    timed = SamplingParams(max_tokens=args.new, min_tokens=args.new, ignore_eos=True, temperature=0.0)
    points = []
    for context, batch in args.points:
        shared = max(0, context - args.distinct) if batch > 1 and context >= args.share_from else 0
        prompts = prompts_for(tokens, context, batch, salt=context, shared=shared)
        t0 = time.perf_counter()
        llm.generate(prompts, warm, use_tqdm=False)  # prefill, kept by prefix caching
        prefill_s = time.perf_counter() - t0
        steps = [step_seconds(llm.generate(prompts, timed, use_tqdm=False)) for _ in range(args.repeats)]
        point = {"contender": name, "context": context, "batch": batch, "step_ms": {
            "min": 1e3 * min(steps), "median": 1e3 * statistics.median(steps), "max": 1e3 * max(steps)},
            "tokens_per_s": batch / statistics.median(steps), "prefill_s": prefill_s, "new_tokens": args.new,
            "shared_prefix": shared}
        print(json.dumps(point), file=sys.stderr, flush=True)
        points.append(point)
    del llm
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--points", default="8192x1,8192x8,32768x1,32768x8", type=parse_points,
                        help="CONTEXTxBATCH,... (each prefilled once per contender: a 32K prefill of 8 requests "
                        "takes most of an hour on 2 cores)")
    parser.add_argument("--share-from", type=int, default=1 << 30,
                        help="at this context and above, a batch's prompts share all but their last --distinct "
                        "tokens (one prefill for the batch; each request still reads its own block table)")
    parser.add_argument("--distinct", type=int, default=512, help="tokens that differ between shared prompts")
    parser.add_argument("--new", type=int, default=24, help="tokens generated per timed pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per point")
    parser.add_argument("--chunk", type=int, default=2048, help="vLLM's max_num_batched_tokens (prefill chunk)")
    parser.add_argument("--kv-gib", type=int, default=6, help="vLLM's KV pool (GiB of host memory)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-vllm"))
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    from a2ats_tools.artifacts.checkpoint import read_config
    from a2ats_tools.provenance import run_provenance

    config = AutoConfig.from_pretrained(args.checkpoint)
    native = int(getattr(config, "max_position_embeddings", 0) or 0)
    notes = []
    longest = max(c for c, _ in args.points)
    if native and longest + args.new > native:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        notes.append(f"contexts beyond the model's {native} positions are timed only (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)")
    tokens = text_tokens(AutoTokenizer.from_pretrained(args.checkpoint), longest * 2)
    points = []
    for name, settings in CONTENDERS.items():
        points += run_contender(name, settings, args, tokens)
    import vllm

    doc = {"schema": "a2ats.vllm-bench", "schema_version": 1, "checkpoint": str(args.checkpoint),
           "model": read_config(args.checkpoint).model_name(),
           "vllm": vllm.__version__, "points": points, "notes": notes,
           "provenance": run_provenance()}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".bench-vllm.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out / "bench-vllm.json")
    print(f"wrote {args.out / 'bench-vllm.json'}")


if __name__ == "__main__":
    main()
