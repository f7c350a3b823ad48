"""Attach retrieval attention to a loaded model, and ``load_converted`` a checkpoint directory."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicSlidingWindowLayer

from ..artifacts.checkpoint import A2atsConfig, read_codebooks, read_config
from ..compat import cache_kwargs, passed_cache
from ..errors import A2atsError, ArtifactError
from ..models import (
    FULL,
    ModelSource,
    attention_window,
    check_supported,
    geometry,
    layer_types,
    load_model,
    load_tokenizer,
    retrieval_layers,
    rotary,
)
from . import attention, hooks
from .cache import A2atsCache
from .selectors import SELECTOR_CLASSES, A2atsSelector, DenseSelector, TokenSelector
from .selectors.a2ats import fused_kernel_refusal
from .settings import RuntimeSettings, use_cpu_kernel, use_triton


class A2atsRuntime:
    """Per-model runtime state: settings, artifacts and the selector factory. Lives at ``model.a2ats``."""

    def __init__(
        self, model: nn.Module, config: A2atsConfig, codebooks, whitening, settings: RuntimeSettings,
        device: torch.device | None = None,
    ):
        """``device``: where selectors run (default: the model's parameters'; a weightless skeleton of the model,
        as a serving engine builds one for its own weights, names it)."""
        self.model = model
        self.device = device
        self.config = config
        self.codebooks, self.whitening = codebooks, whitening
        self.settings = settings
        self.rotary = rotary(model)  # the full-attention layers' rotary embedding: the only layers retrieved
        types = layer_types(model)
        self.windows = [None if t == FULL else attention_window(model, t) for t in types]
        self._selector_memo: tuple[RuntimeSettings, torch.device, list[TokenSelector | None]] | None = None
        self.check(settings)

    def check(self, settings: RuntimeSettings) -> None:
        """Settings that depend on the model: a known selector, dense layers that exist, kernels that can run on the
        model's device (so ``kernels=cpu`` without a compiler, or for a rotation the fused kernel does not implement,
        fails here, not at the first decode step)."""
        if settings.selector not in SELECTOR_CLASSES:
            raise A2atsError(f"unknown selector {settings.selector!r}; choose from {', '.join(SELECTOR_CLASSES)}")
        layers = self.config.geometry.num_layers
        beyond = [i for i in settings.dense_layers if i >= layers]
        if beyond:
            raise A2atsError(f"dense_layers {beyond} do not exist: the model has {layers} layers")
        refusal = fused_kernel_refusal(self.rotary)
        if settings.kernels == "cpu" and settings.selector == A2atsSelector.name and refusal is not None:
            raise A2atsError(f"kernels=cpu: {refusal}; use kernels=auto or torch")
        if settings.kernels in ("cpu", "triton"):
            probe = torch.empty(0, device=self.compute_device)
            (use_cpu_kernel if settings.kernels == "cpu" else use_triton)(settings.kernels, probe)

    @property
    def compute_device(self) -> torch.device:
        return self.device if self.device is not None else next(self.model.parameters()).device

    def configure(self, **overrides: Any) -> RuntimeSettings:
        """Change the settings for later calls (budget, n_sink, window, buckets, aggregation, selector, ...)."""
        settings = self.settings.with_overrides(**overrides)
        self.check(settings)
        self.settings = settings
        return self.settings

    def selectors(self, settings: RuntimeSettings | None = None) -> list[TokenSelector | None]:
        """One selector per retrieved layer, None for a windowed layer (dense over its window)."""
        settings = settings or self.settings
        device = self.compute_device
        memo = self._selector_memo
        if memo is not None and memo[0] == settings and memo[1] == device:
            return memo[2]
        self.check(settings)
        geo = self.config.geometry
        chosen = SELECTOR_CLASSES[settings.selector]
        out: list[TokenSelector | None] = []
        for i in range(geo.num_layers):
            if self.windows[i] is not None:
                out.append(None)
                continue
            args = (settings, i, geo.num_heads, geo.num_kv_heads, geo.head_dim)
            cls = DenseSelector if i in settings.dense_layers else chosen
            if issubclass(cls, A2atsSelector):
                sel = cls(*args, codebook=self.codebooks[i], whitening=self.whitening[i], rotary=self.rotary).to(device)
            else:
                sel = cls(*args, layout=self.rotary.layout)
            out.append(sel)
        self._selector_memo = (settings, device, out)
        return out

    def new_cache(self, reserve: int | None = None, **overrides: Any) -> A2atsCache:
        """A fresh :class:`A2atsCache` with the current settings (plus ``overrides`` for this cache only);
        ``reserve``: the length it will reach, if known (allocated at once instead of prompt + 1/8 headroom)."""
        settings = self.settings.with_overrides(**overrides) if overrides else self.settings
        return A2atsCache(self.selectors(settings), offload=settings.offload, reserve=reserve, windows=self.windows)

    @torch.no_grad()
    def cache_from(self, dense_cache: Any, chunk: int = 4096, reserve: int | None = None, **overrides: Any) -> A2atsCache:
        """An :class:`A2atsCache` holding what a dense prefill left in ``dense_cache`` (a transformers cache of
        post-RoPE keys at positions ``0..n-1``, unpadded), fed in chunks as a prefill would: each key encoded
        once. Lets several configurations share one dense prefill (prefill is dense and exact either way).
        A windowed layer takes the dense cache's layer as it is (a sliding-window layer) or its last window."""
        cache = self.new_cache(reserve=reserve, **overrides)
        n = dense_cache.get_seq_length()
        first = dense_cache.layers[0].keys
        device = next(self.model.parameters()).device
        retrieved = [i for i, w in enumerate(self.windows) if w is None]
        for start in range(0, n, chunk):
            pos = torch.arange(start, min(n, start + chunk), device=device)
            cos, sin = self.rotary.cos_sin(pos)
            cos, sin = cos.expand(first.shape[0], -1, -1), sin.expand(first.shape[0], -1, -1)
            for i in retrieved:
                layer = dense_cache.layers[i]
                cache.set_rope(i, cos, sin)
                cache.update(layer.keys[:, :, start : start + len(pos)], layer.values[:, :, start : start + len(pos)], i)
        for i, window in enumerate(self.windows):
            if window is None:
                continue
            source = dense_cache.layers[i]
            if isinstance(source, DynamicSlidingWindowLayer):
                cache.layers[i] = copy.deepcopy(source)
            else:  # a full dense layer: the sliding layer keeps what its window needs
                cache.layers[i].update(source.keys, source.values)
        return cache


def _final_length(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Prompt + new tokens of a ``generate`` call, when both are known up front (else None)."""
    ids = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs"))
    new = kwargs.get("max_new_tokens")
    if new is None:
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        new = getattr(config, "max_new_tokens", None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not isinstance(new, int):
        return None
    return ids.shape[1] + new


def _generate(model: nn.Module, original, *args, a2ats: dict[str, Any] | None = None, **kwargs):
    """``generate`` that brings its own :class:`A2atsCache` unless the caller passes a cache (``cache=``, or
    ``past_key_values=`` before transformers 5.24)."""
    runtime: A2atsRuntime = model.a2ats
    overrides = dict(a2ats or {})
    if passed_cache(kwargs) is None and kwargs.get("use_cache", True):
        kwargs.update(cache_kwargs(runtime.new_cache(reserve=_final_length(model, args, kwargs), **overrides)))
    chunk = overrides.get("prefill_chunk", runtime.settings.prefill_chunk)
    if chunk and "prefill_chunk_size" not in kwargs:
        kwargs["prefill_chunk_size"] = int(chunk)
    return original(*args, **kwargs)


def check_layers(config: A2atsConfig, model: nn.Module) -> None:
    """The checkpoint's codebooks must be those of exactly the model's full-attention layers."""
    have, want = config.layers_with_codebooks(), retrieval_layers(model)
    if have != want:
        raise ArtifactError(
            f"the checkpoint has codebooks for layers {have} but the model's full-attention layers are {want}"
        )


def check_artifacts(config: A2atsConfig, model: nn.Module) -> None:
    """The model is one A²ATS serves, and the checkpoint's codebooks fit it (geometry and retrieved layers)."""
    check_supported(model)
    problem = config.geometry.mismatch(geometry(model))
    if problem:
        raise ArtifactError(f"the checkpoint's codebooks do not fit this model: {problem}")
    check_layers(config, model)


def attach(model: nn.Module, config: A2atsConfig, codebooks, whitening, settings: RuntimeSettings | None = None) -> nn.Module:
    """Turn retrieval attention on for ``model`` (in place): checks geometry, registers the attention/mask
    functions, installs the hooks and wraps ``generate``. ``model.a2ats`` is the :class:`A2atsRuntime`."""
    check_artifacts(config, model)
    attention.register()
    if model.config._attn_implementation != attention.NAME:
        model._a2ats_plain_attention = model.config._attn_implementation  # what detach() goes back to
    model.set_attn_implementation(attention.NAME)
    hooks.install(model)
    model.a2ats = A2atsRuntime(model, config, codebooks, whitening, settings or RuntimeSettings.from_config(config))
    original = type(model).generate.__get__(model)
    model.generate = functools.partial(_generate, model, original)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Back to the model's plain attention (the artifacts stay loaded at ``model.a2ats``)."""
    hooks.remove(model)
    model.set_attn_implementation(getattr(model, "_a2ats_plain_attention", "sdpa"))
    model.__dict__.pop("generate", None)
    return model


def checkpoint_dir(path_or_id: str | Path) -> Path:
    """A local checkpoint directory for ``path_or_id`` (a Hub id is downloaded through the HF cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if str(path_or_id).startswith((".", "/", "~")) or path.exists():
        raise ArtifactError(f"checkpoint {path_or_id} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id)))
    except Exception as exc:  # noqa: BLE001 - any hub failure is a user-facing "cannot find it"
        raise ArtifactError(f"checkpoint {path_or_id} is neither a local directory nor downloadable: {exc}") from None


def _model_source(directory: Path, config: A2atsConfig) -> ModelSource:
    """Where the model weights are: the checkpoint itself, or the source the conversion referenced."""
    if (directory / "config.json").is_file():
        return ModelSource(str(directory), None, str(directory))
    src = (config.model or {}).get("source")
    if not src:
        raise ArtifactError(f"{directory} has neither model files (config.json) nor a recorded model source")
    return ModelSource(src["path_or_id"], src.get("gguf_file"), src.get("display_name") or src["path_or_id"])


def load_converted(
    path_or_id: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    budget: float | int | str | None = None,
    offload: str | None = None,
    **overrides: Any,
):
    """Load a converted checkpoint with retrieval attention on: ``model, tokenizer``.

    ``budget`` (fraction of the context or tokens), ``offload`` ("cpu" or None) and ``overrides`` (n_sink,
    window, buckets, aggregation, selector, rerank, rerank_aggregation, prefill_chunk, dense_layers,
    score_dtype, kernels) replace the settings of ``a2ats_config.json``. Then ``model.generate(...)`` decodes with A²ATS.
    """
    directory = checkpoint_dir(path_or_id)
    config = read_config(directory)
    settings = RuntimeSettings.from_config(config, budget=budget, offload=offload, **overrides)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    source = _model_source(directory, config)
    model = load_model(source, dtype=dtype, device=device)
    runtime = getattr(model, "a2ats", None)
    if isinstance(runtime, A2atsRuntime):  # the registered quantizer attached this checkpoint's artifacts already
        runtime.check(settings)
        runtime.settings = settings
    else:  # a --light checkpoint (weights referenced elsewhere) loads as the plain model
        check_layers(config, model)
        codebooks, whitening = read_codebooks(directory, config)
        attach(model, config, codebooks, whitening, settings)
    tok_source = source if not (directory / "tokenizer_config.json").is_file() else ModelSource(str(directory))
    tokenizer = load_tokenizer(tok_source)
    return model, tokenizer


def attach_from_dir(model: nn.Module, directory: str | Path, **overrides: Any) -> nn.Module:
    """Attach using the artifacts in ``directory`` (used by the transformers quantizer hook)."""
    config = read_config(directory)
    check_layers(config, model)
    codebooks, whitening = read_codebooks(directory, config)
    return attach(model, config, codebooks, whitening, RuntimeSettings.from_config(config, **overrides))
