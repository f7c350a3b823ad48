"""Recall of WRoPE scoring on exact keys: single distance vs log buckets (ratio √2, 2, 4) and GQA aggregations.

Runs SmolLM2 over 4096 tokens of CPython's pydoc topic text and prints attention-mass recall at a 3% budget
(layers 3, 15, 27). Output recorded in docs/measurements/bucket_aggregation_exact_keys.txt.
Usage: python benchmarks/bucket_recall_exact_keys.py
"""

import time
from pydoc_data.topics import topics

import torch

from a2ats_tools.models import load_model, load_tokenizer, resolve_source, rotary
from a2ats_tools.rope import DistanceBuckets
from a2ats_tools.runtime.settings import RuntimeSettings
from a2ats_tools.scoring import bucketed_scores, exact_logits, mass_recall

torch.manual_seed(0)
src = resolve_source(None)
tok = load_tokenizer(src)
model = load_model(src)
text = "\n\n".join(topics[k] for k in sorted(topics))
ids = tok(text, return_tensors="pt").input_ids[:, 20000 : 20000 + 4096]
caps = {}


def hook(name, i):
    def f(m, a, out):
        caps[(name, i)] = out.detach()

    return f


layers = [3, 15, 27]
for i in layers:
    at = model.model.layers[i].self_attn
    at.q_proj.register_forward_hook(hook("q", i))
    at.k_proj.register_forward_hook(hook("k", i))
t = time.time()
with torch.inference_mode():
    model(ids)
print("prefill", time.time() - t)
rot = rotary(model)
M = 48
pos = torch.linspace(1024, 4095, M).long()
for i in layers:
    q = caps[("q", i)][0].reshape(4096, 9, 64).transpose(0, 1)  # [Hq, N, d]
    k = caps[("k", i)][0].reshape(4096, 3, 64).transpose(0, 1)
    qs = q[:, pos]
    logits = exact_logits(qs, pos, k, rot)
    row = {}
    for agg in ["sum", "max", "softmax"]:
        pol = RuntimeSettings(aggregation=agg)
        for name, b in [
            ("single", DistanceBuckets.single(2048)),
            ("log√2", DistanceBuckets.log_spaced(8192)),
            ("log2", DistanceBuckets.log_spaced(8192, ratio=2.0)),
            ("log4", DistanceBuckets.log_spaced(8192, ratio=4.0)),
        ]:
            s = bucketed_scores(qs, pos, k, rot, b)
            row[(agg, name)] = mass_recall(logits, s, pos, pol, 0.125, 3).mean().item()
        row[(agg, "oracle")] = mass_recall(logits, None, pos, pol, 0.125, 3).mean().item()
    print("layer", i, {f"{a}/{n}": round(v, 3) for (a, n), v in row.items()}, flush=True)
