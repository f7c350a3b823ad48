"""Token-for-token agreement with dense attention on the eval's long-context tasks.

For each prompt (the eval's own generator: same seed, same samples) dense generates greedily; every
configuration then decodes dense's tokens teacher-forced from the same dense prefill. A step whose argmax differs
from dense's next token is a divergence. A configuration's own greedy output equals dense's up to its first
divergence, so one that first diverges after dense has written its answers is guaranteed every answer dense
found. Reports, per configuration: outputs identical to dense, right answers of dense kept or lost, token
agreement and the NLL of dense's tokens.

    python benchmarks/greedy_agreement.py runs/smollm2-a2ats --task niah_multikey --length 4096 --samples 30 \\
        --config default= --config softmax=aggregation=softmax --config oracle=selector=exact -o runs/agree.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from a2ats_tools.compat import cache_kwargs
from a2ats_tools.evaluation.harness import ModelUnderTest, Variant
from a2ats_tools.evaluation.haystack import Haystack
from a2ats_tools.evaluation.tasks import make_sample, score_answers
from a2ats_tools.runtime.settings import parse_overrides


@torch.no_grad()
def follow(model, cache, start: int, tokens: list[int]) -> tuple[list[int], list[float]]:
    """Feed ``tokens[:-1]`` one decode step each from position ``start``: argmax and log-prob of the next token."""
    preds, logps = [], []
    for i, tok in enumerate(tokens[:-1]):
        out = model(input_ids=torch.tensor([[tok]]), **cache_kwargs(cache), use_cache=True,
                    cache_position=torch.tensor([start + i]))
        logits = out.logits[0, -1].float()
        preds.append(int(logits.argmax()))
        logps.append(float(torch.log_softmax(logits, -1)[tokens[i + 1]]))
    return preds, logps


def answers_done_at(tokenizer, tokens: list[int], answers: list[str], score: float) -> int | None:
    """The first index whose prefix of dense's tokens already scores what dense's whole output scores."""
    if score <= 0:
        return None
    for t in range(len(tokens)):
        if score_answers(answers, tokenizer.decode(tokens[: t + 1], skip_special_tokens=True)) >= score:
            return t
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--task", default="niah_multikey")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1234, help="the eval's task seed")
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=OVERRIDES, e.g. 'softmax=aggregation=softmax' or 'default=' (repeatable)")
    ap.add_argument("-o", "--out", type=Path, default=Path("runs/greedy_agreement.json"))
    args = ap.parse_args()
    configs = args.config or ["default="]
    variants = []
    for spec in configs:
        name, _, overrides = spec.partition("=")
        variants.append(Variant(name, parse_overrides(overrides) if overrides else {}))

    mut = ModelUnderTest(args.checkpoint)
    model, tok = mut.model, mut.tokenizer
    haystack = Haystack.noise(tok)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    rows, t0 = [], time.time()
    for index in range(args.samples):
        sample = make_sample(args.task, tok, haystack, args.length, index, args.seed)
        ids = tok(sample.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        prefix = mut.prefill(ids)
        tokens = [int(prefix.logits.argmax(-1))]
        mut.use(Variant("dense"))
        cache = copy.deepcopy(prefix.cache)
        with torch.no_grad():
            while len(tokens) < sample.max_new_tokens and tokens[-1] not in eos:
                out = model(input_ids=torch.tensor([[tokens[-1]]]), **cache_kwargs(cache), use_cache=True,
                            cache_position=torch.tensor([ids.shape[1] + len(tokens) - 1]))
                tokens.append(int(out.logits[0, -1].argmax()))
        score = sample.score(tok.decode(tokens, skip_special_tokens=True))
        row = {"index": index, "dense_score": score, "tokens": tokens,
               "done_at": answers_done_at(tok, tokens, sample.answers, score), "configs": {}}
        for v in variants:
            preds, logps = follow(model, mut.cache_for(v, prefix), ids.shape[1], tokens)
            misses = [i for i, (p, t) in enumerate(zip(preds, tokens[1:], strict=True)) if p != t]
            row["configs"][v.name] = {"agree": len(preds) - len(misses), "first_miss": misses[0] if misses else None,
                                      "nll": -sum(logps)}
        rows.append(row)
        print(f"sample {index} ({time.time() - t0:.0f} s): dense score {score:.2f}, first divergence "
              + ", ".join(f"{n} {c['first_miss']}" for n, c in row["configs"].items()), flush=True)

    summary = {}
    steps = sum(len(r["tokens"]) - 1 for r in rows)
    for v in variants:
        cells = [(r, r["configs"][v.name]) for r in rows]
        summary[v.name] = {
            "identical": sum(c["first_miss"] is None for _, c in cells),
            "keeps_dense_answers": sum(r["dense_score"] > 0 and (c["first_miss"] is None or
                                       (r["done_at"] is not None and c["first_miss"] >= r["done_at"]))
                                       for r, c in cells),
            "loses_dense_answers": [r["index"] for r, c in cells if r["dense_score"] > 0 and c["first_miss"] is not None
                                    and (r["done_at"] is None or c["first_miss"] < r["done_at"])],
            "token_agreement": sum(c["agree"] for _, c in cells) / max(steps, 1),
            "nll_per_token": sum(c["nll"] for _, c in cells) / max(steps, 1),
        }
    result = {"task": args.task, "length": args.length, "samples": args.samples, "seed": args.seed,
              "dense_right": sum(r["dense_score"] > 0 for r in rows), "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(f"{args.task} @ {args.length}: {args.samples} samples, dense right in {result['dense_right']}")
    for name, s in summary.items():
        print(f"  {name}: identical {s['identical']}, keeps dense's answers {s['keeps_dense_answers']}, loses them in "
              f"samples {s['loses_dense_answers']}, token agreement {100 * s['token_agreement']:.1f}%, "
              f"NLL/token {s['nll_per_token']:.4f}")


if __name__ == "__main__":
    main()
