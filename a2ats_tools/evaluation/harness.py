"""One loaded model, switched between dense attention and retrieval configurations, so every configuration
runs on the same prompts in the same process.

A *variant* is dense (plain SDPA with a DynamicCache) or a set of runtime overrides (budget, selector,
buckets, ...) applied to the checkpoint's settings. Baselines run through the same runtime at the same
per-KV-head budget: ``streaming`` (sinks + enlarged window), ``quest`` (page selection), ``wrope`` (the paper's
single distance 2048, no re-ranking), ``exact`` (oracle top-K) and ``norerank`` (A²ATS's approximate scores
alone, the ablation of the default exact re-ranking).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compat import cache_kwargs
from ..errors import A2atsError
from ..models import check_prompt
from ..rope import WROPE_DISTANCE

BASELINES: tuple[str, ...] = ("streaming", "quest", "wrope", "exact", "norerank")


@dataclass(frozen=True)
class Variant:
    """``overrides`` None means dense; otherwise runtime settings on top of the checkpoint's."""

    name: str
    overrides: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    @property
    def dense(self) -> bool:
        return self.overrides is None


def budget_label(budget: float | int) -> str:
    return f"{100 * budget:g}%" if isinstance(budget, float) and budget <= 1.0 else f"{budget}tok"


def build_variants(budgets: Sequence[float | int], baselines: Sequence[str], baseline_budget: float | int) -> list[Variant]:
    """Dense, A²ATS at every budget, then each baseline at ``baseline_budget``."""
    out = [Variant("dense")]
    out += [Variant(f"a2ats@{budget_label(b)}", {"budget": b, "selector": "a2ats"}) for b in budgets]
    label = budget_label(baseline_budget)
    for name in baselines:
        if name == "streaming":
            out.append(Variant(f"streaming@{label}", {"budget": baseline_budget, "selector": "streaming"}))
        elif name == "quest":
            out.append(Variant(f"quest@{label}", {"budget": baseline_budget, "selector": "quest"}))
        elif name == "wrope":
            wrope = {"budget": baseline_budget, "selector": "a2ats", "buckets": f"single:{WROPE_DISTANCE}", "rerank": 0}
            out.append(Variant(f"wrope2048@{label}", wrope))
        elif name == "exact":
            out.append(Variant(f"exact@{label}", {"budget": baseline_budget, "selector": "exact"}))
        elif name == "norerank":
            out.append(Variant(f"a2ats-norerank@{label}", {"budget": baseline_budget, "selector": "a2ats", "rerank": 0}))
        else:
            raise A2atsError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return out


def parse_baselines(spec: str) -> list[str]:
    if spec.strip() in ("", "none"):
        return []
    if spec.strip() == "all":
        return list(BASELINES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in BASELINES:
            raise A2atsError(f"unknown baseline {n!r}; choose from {', '.join(BASELINES)} (or all, none)")
    return names


class ModelUnderTest:
    """A converted checkpoint loaded once; :meth:`use` switches it to a variant and returns its cache factory."""

    def __init__(self, checkpoint: str, device: str = "cpu", dtype: str = "float32", **overrides: Any):
        """``overrides``: runtime settings on top of the checkpoint's, the base of every retrieval variant."""
        from ..runtime.loader import load_converted

        self.model, self.tokenizer = load_converted(checkpoint, device=device, dtype=dtype, **overrides)
        self.runtime = self.model.a2ats
        self.base_settings = self.runtime.settings

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def use(self, variant: Variant) -> Callable[[], Any]:
        """Switch attention for ``variant``; returns a factory of fresh KV caches for it."""
        from transformers import DynamicCache

        from ..runtime.loader import attach, detach

        if variant.dense:
            detach(self.model)
            return lambda: DynamicCache(config=self.model.config)
        settings = self.base_settings.with_overrides(**variant.overrides)
        rt = self.runtime
        attach(self.model, rt.config, rt.codebooks, rt.whitening, settings)
        self.runtime = self.model.a2ats
        return self.runtime.new_cache

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, chunk: int = 2048) -> Prefix:
        """Dense prefill of ``ids [1, n]`` (in chunks), shared by every variant: prefill is dense and exact in all
        of them, so only the decode steps differ."""
        from transformers import DynamicCache

        from ..runtime.loader import detach

        detach(self.model)
        cache = DynamicCache(config=self.model.config)
        ids = ids.to(self.device)
        for start in range(0, ids.shape[1], chunk):
            out = self.model(input_ids=ids[:, start : start + chunk], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        return Prefix(ids, cache, out.logits[:, -1].float())

    def cache_for(self, variant: Variant, prefix: Prefix) -> Any:
        """A KV cache for ``variant`` holding ``prefix`` (a copy for dense; keys encoded for retrieval)."""
        import copy

        if variant.dense:
            self.use(variant)
            return copy.deepcopy(prefix.cache)
        self.use(variant)
        return self.runtime.cache_from(prefix.cache)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, variants: Sequence[Variant]) -> dict[str, str]:
        """Greedy continuations of ``prompt`` (holding any special tokens already) under every variant, from one
        shared dense prefill; the first new token comes from the prefill's logits, as in ``generate``."""
        ids = self.tokenizer(check_prompt(prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        prefix = self.prefill(ids)
        first = prefix.logits.argmax(-1, keepdim=True)  # [1, 1]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
        texts = {}
        for variant in variants:
            cache = self.cache_for(variant, prefix)
            if max_new_tokens == 1 or int(first) in eos:
                new = first[0]
            else:
                full = torch.cat([prefix.ids, first], 1)
                out = self.model.generate(
                    input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=max_new_tokens - 1,
                    do_sample=False, **cache_kwargs(cache), pad_token_id=self.tokenizer.pad_token_id,
                )
                new = out[0, prefix.ids.shape[1] :]
            texts[variant.name] = self.tokenizer.decode(new, skip_special_tokens=True)
        return texts


@dataclass
class Prefix:
    """A dense prefill shared by the variants: the prompt ids, its DynamicCache and the last position's logits."""

    ids: torch.Tensor
    cache: Any
    logits: torch.Tensor
