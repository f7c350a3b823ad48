"""Passkey retrieval through the runtime: a number hidden in filler text, asked for at the end.

    python benchmarks/passkey.py CHECKPOINT --tokens 1500 --budget 0.03

Runs dense, A²ATS (checkpoint buckets, single, log:2) and the streaming baseline on the same prompts and prints
whether each answer contains the key.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import DynamicCache

from a2ats_tools.compat import cache_kwargs

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def prompt(tok, tokens: int, depth: float, key: int) -> str:
    unit = len(tok(FILLER)["input_ids"])
    n = max(1, tokens // unit)
    at = int(n * depth)
    body = FILLER * at + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (n - at)
    return (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        + body
        + "\nWhat is the pass key? The pass key is:"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--budget", default="0.03")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from a2ats_tools import load_converted

    model, tok = load_converted(args.checkpoint, budget=args.budget)
    rng = random.Random(args.seed)
    configs = {
        "dense": None,
        "a2ats(ckpt buckets)": {},
        "a2ats(single)": {"buckets": "single"},
        "a2ats(log:2)": {"buckets": "log:2"},
        "streaming": {"selector": "streaming"},
    }
    hits = {name: 0 for name in configs}
    for trial in range(args.trials):
        key = rng.randint(10000, 99999)
        ids = tok(prompt(tok, args.tokens, (trial + 0.5) / args.trials, key), return_tensors="pt")["input_ids"]
        for name, over in configs.items():
            extra = cache_kwargs(DynamicCache(config=model.config)) if over is None else {"a2ats": over}
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id, **extra)
            answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            hits[name] += str(key) in answer
            print(f"trial {trial} ({ids.shape[1]} tokens, key {key}) {name:20s} -> {answer!r}", flush=True)
    for name, n in hits.items():
        print(f"{name:20s} {n}/{args.trials}")


if __name__ == "__main__":
    main()
