"""Per-step shared values live in the cache's step context: two caches decoding in one process never see
each other's, and nothing derived in one step outlives it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from a2ats_tools.compat import cache_kwargs, output_cache
from a2ats_tools.runtime.step import StepContext

from .conftest import build_tiny_model
from .test_runtime import load, make_checkpoint, prompt_ids


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, tokenizer):
    return {
        arch: make_checkpoint(build_tiny_model(arch), tmp_path_factory.mktemp(f"step-{arch}"), tokenizer)
        for arch in ("llama", "qwen3")
    }


def _decoder(model, ids: torch.Tensor, attention_mask: torch.Tensor | None, steps: int):
    """Prefill, then yield each decode step's last-position logits (and the cache), one step per ``next``.
    The cache is made at once, with the model's settings of the moment."""
    return _steps(model, model.a2ats.new_cache(), ids, attention_mask, steps)


def _steps(model, cache, ids: torch.Tensor, attention_mask: torch.Tensor | None, steps: int):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, **cache_kwargs(cache), use_cache=True)
        cache = output_cache(out)
        feed = prompt_ids(steps, ids.shape[0], seed=11)
        mask = attention_mask
        for i in range(steps):
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(input_ids=feed[:, i : i + 1], attention_mask=mask, **cache_kwargs(cache), use_cache=True)
            yield out.logits[:, -1].clone(), cache


def _inputs(kind: str):
    if kind == "padded":
        ids = prompt_ids(120, batch=2, seed=3)
        mask = torch.ones_like(ids)
        mask[0, :37] = 0  # the first sample is left-padded
        return ids, mask
    return prompt_ids(140, batch=1, seed=5), None


def test_two_caches_interleaved_step_by_step_decode_as_each_alone(tiny_checkpoints):
    a, _ = load(tiny_checkpoints["llama"], budget=6, n_sink=2, window=8)
    b, _ = load(tiny_checkpoints["qwen3"], budget=10, n_sink=4, window=8, rerank=0)
    steps = 5
    alone_a = [lg for lg, _ in _decoder(a, *_inputs("padded"), steps)]
    alone_b = [lg for lg, _ in _decoder(b, *_inputs("plain"), steps)]
    # a second cache on the same model, with another budget, interleaved too
    a.a2ats.configure(budget=12)
    alone_a2 = [lg for lg, _ in _decoder(a, *_inputs("plain"), steps)]
    a.a2ats.configure(budget=6)
    runs = [_decoder(a, *_inputs("padded"), steps), _decoder(b, *_inputs("plain"), steps)]
    a.a2ats.configure(budget=12)
    runs.append(_decoder(a, *_inputs("plain"), steps))
    got: list[list[torch.Tensor]] = [[], [], []]
    for _ in range(steps):
        for i, run in enumerate(runs):
            got[i].append(next(run)[0])
    for mine, ref in zip(got, (alone_a, alone_b, alone_a2), strict=True):
        torch.testing.assert_close(torch.stack(mine), torch.stack(ref), atol=0, rtol=0)


def test_a_step_context_is_shared_by_the_layers_and_dropped_at_the_next_step(tiny_checkpoints):
    model, _ = load(tiny_checkpoints["llama"], budget=6, n_sink=2, window=8)
    run = _decoder(model, *_inputs("padded"), 3)
    _, cache = next(run)
    step = cache.step
    assert all(layer.state.step is step for layer in cache.layers)
    assert len(step) > 0  # the layers shared what they derived (mask rows, budgets, bucket offsets)
    gone = weakref.ref(step)
    del step
    next(run)
    gc.collect()
    assert gone() is None
    assert all(layer.state.step is cache.step for layer in cache.layers)


def test_step_context_recomputes_for_other_sources_and_keys():
    step = StepContext()
    calls = []
    x, y = torch.zeros(2), torch.zeros(2)
    compute = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert step.shared("k", compute, x) == 1
    assert step.shared("k", compute, x) == 1  # same key and source: reused
    assert step.shared("k", compute, y) == 2  # an equal but different tensor is another source
    assert step.shared("other", compute, y) == 3
    assert step.shared("k", compute) == 4  # no sources is not the same as one
