"""The transformers-version differences: the cache argument's name is the one the installed version takes."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, LlamaForCausalLM

from a2ats_tools import compat

from .conftest import build_tiny_model


def test_cache_kwarg_is_the_installed_forward_argument():
    assert compat.CACHE_KWARG in inspect.signature(LlamaForCausalLM.forward).parameters
    assert compat.passed_cache({"past_key_values": 1}) == 1 and compat.passed_cache({"cache": 2}) == 2
    assert compat.passed_cache({"cache": None, "past_key_values": None}) is None


def test_a_model_call_uses_and_returns_the_cache_passed_by_that_name():
    model = build_tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), **compat.cache_kwargs(cache), use_cache=True)
    assert compat.output_cache(out) is cache and cache.get_seq_length() == 3


def test_models_load_with_their_own_modeling_code(tiny_model_dirs):
    """No Hub kernels swapped in at load (transformers 5.25 kernelizes by default): the layers a2ats probes and
    hooks are the modeling code's."""
    from a2ats_tools.models import ModelSource, load_model

    model = load_model(ModelSource(str(tiny_model_dirs["llama"])))
    assert model.use_kernels is False and not getattr(model, "_kernels_mode", None)
