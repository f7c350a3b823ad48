"""Module hooks: the attention function never sees the cache (``past_key_values``, ``cache`` since transformers
5.24) or ``position_embeddings``, so a forward pre-hook on every attention module stashes them (cache on the
module, this step's cos/sin on the cache layer)."""

from __future__ import annotations

from torch import nn

from ..compat import passed_cache
from ..models import attention_modules
from .cache import A2atsCache

HANDLES_ATTR = "_a2ats_hook_handles"


def _pre_hook(module: nn.Module, args, kwargs):
    cache = passed_cache(kwargs)
    if isinstance(cache, A2atsCache):
        cos, sin = kwargs["position_embeddings"]
        cache.set_rope(module.layer_idx, cos, sin)
        module._a2ats_cache = cache
    else:
        module._a2ats_cache = None
    return None


def _post_hook(module: nn.Module, args, kwargs, output):
    module._a2ats_cache = None  # never keep a cache alive past its forward
    return None


def install(model: nn.Module) -> None:
    """Add the hooks to every attention module (replacing earlier ones)."""
    remove(model)
    handles = []
    for mod in attention_modules(model):
        mod._a2ats_cache = None
        handles.append(mod.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        handles.append(mod.register_forward_hook(_post_hook, with_kwargs=True))
    setattr(model, HANDLES_ATTR, handles)


def remove(model: nn.Module) -> None:
    for handle in getattr(model, HANDLES_ATTR, []):
        handle.remove()
    setattr(model, HANDLES_ATTR, [])
