"""vLLM's CPU attention backend with A²ATS decode for the retrieved layers of a converted checkpoint.

Per engine step, the metadata builder (vLLM reorders each batch so that decode requests come first) adds what
retrieval needs to vLLM's own CPU metadata: the position of every new token, the decode requests' rows
(:func:`~a2ats_tools.serving.paged.decode_rows`, from their block tables) and the prefill requests' own
metadata. Per layer, the implementation then

- writes the codes of every new key (prefill chunks and decode tokens) beside the paged cache;
- runs vLLM's kernel, dense and exact, for the prefill requests;
- runs :meth:`~a2ats_tools.serving.retrieval.LayerRetrieval.decode` for the decode requests, reading only the
  rows it selects from vLLM's blocks, or vLLM's kernel where the budget still covers every row.

Windowed layers, encoder attention and models that are not A²ATS checkpoints take vLLM's path unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.worker.ubatch_utils import UBatchSlice, split_attn_metadata

from ...errors import A2atsError
from ...runtime.loader import checkpoint_dir
from ...runtime.step import StepContext
from ..paged import CodeStore, DecodeRows, PagedRows, decode_rows
from ..retrieval import LayerRetrieval
from .config import A2atsVllmConfig


@dataclass
class A2atsCpuMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata of the whole batch, plus: ``decodes`` (the first requests, one new token each),
    ``prefill`` (vLLM's metadata of the other requests alone, when both kinds are in the batch), ``rows`` (the
    decode requests' rows), ``token_positions`` (of every new token) and ``step`` (shared by the layers)."""

    decodes: int = 0
    prefill: CPUAttentionMetadata | None = None
    rows: DecodeRows | None = None
    token_positions: torch.Tensor | None = None
    step: StepContext = field(default_factory=StepContext)


class A2atsCpuMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # decode requests first, so each kind is one slice of the batch

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> A2atsCpuMetadata:
        common = common_attn_metadata
        whole = super().build(common_prefix_len, common, fast_build)
        decodes, prefills, decode_tokens, _ = split_decodes_and_prefills(common, decode_threshold=1)
        prefill = None
        if decodes and prefills:
            cut = UBatchSlice(slice(decodes, common.num_reqs), slice(decode_tokens, common.num_actual_tokens))
            prefill = super().build(common_prefix_len, split_attn_metadata([cut], common)[0], fast_build)
        starts = common.query_start_loc_cpu.long()
        query_lens = starts[1:] - starts[:-1]
        seq_lens = common.seq_lens.cpu().long()
        first = torch.repeat_interleave(seq_lens - query_lens - starts[:-1], query_lens)
        positions = first + torch.arange(int(starts[-1]))  # each new token's position in its request
        rows = None
        if decodes:
            rows = decode_rows(seq_lens[:decodes], common.block_table_tensor[:decodes].cpu(), self.block_size)
        base = {f.name: getattr(whole, f.name) for f in fields(CPUAttentionMetadata)}
        return A2atsCpuMetadata(**base, decodes=decodes, prefill=prefill, rows=rows, token_positions=positions)


def key_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int) -> str:
    """How vLLM's CPU kernel lays keys out inside a block for this ISA: ``rows`` (``[block_size, d]``) or
    ``columns`` (``[d, block_size]``), found by caching known keys with vLLM's own op. Values are rows."""
    from vllm import _custom_ops as ops

    d = head_size
    cache = torch.zeros(1, 1, block_size, 2 * d, dtype=dtype)
    keys = torch.arange(block_size * d, dtype=torch.float32).reshape(block_size, 1, d).to(dtype)
    view = cache.view(1, 1, 2 * block_size, d)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        keys, keys.clone(), key_cache, value_cache, torch.arange(block_size), isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
    stored = cache.view(2, block_size * d)
    if not torch.equal(stored[1].view(block_size, d), keys[:, 0]):
        raise A2atsError(f"vLLM's CPU attention ({isa}) stores values in a layout A²ATS does not read")
    if torch.equal(stored[0].view(block_size, d), keys[:, 0]):
        return "rows"
    if torch.equal(stored[0].view(d, block_size).T, keys[:, 0]):
        return "columns"
    raise A2atsError(f"vLLM's CPU attention ({isa}, {dtype}) packs keys in a layout A²ATS does not read; use float32")


def paged_views(kv_cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU cache ``[blocks, Hkv, block_size, 2 d]`` as key and value pools ``[blocks, Hkv, block_size, d]``
    (strided views, no copy)."""
    blocks, heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    values = kv_cache.view(blocks, heads, 2, block_size, d)[:, :, 1]
    if layout == "columns":
        return kv_cache.view(blocks, heads, 2, d, block_size)[:, :, 0].transpose(-1, -2), values
    return kv_cache.view(blocks, heads, 2, block_size, d)[:, :, 0], values


class A2atsCpuAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        quant = vllm_config.quant_config
        self._a2ats = quant if isinstance(quant, A2atsVllmConfig) and self.attn_type == AttentionType.DECODER else None
        self._directory = vllm_config.model_config.model if self._a2ats is not None else None
        self._retrieval: LayerRetrieval | None | bool = False  # False: not looked up yet
        self._codes: CodeStore | None = None
        self._key_layout: str | None = None

    def _layer_retrieval(self, layer) -> LayerRetrieval | None:
        if self._retrieval is False:
            self._retrieval = None
            if self._a2ats is not None and self.sliding_window == -1:
                served = self._a2ats.served(str(checkpoint_dir(self._directory)))
                self._retrieval = served.layer(layer.layer_name)
                heads = None if self._retrieval is None else self._retrieval.selector.num_kv_heads
                if heads is not None and heads != self.num_kv_heads:
                    raise A2atsError(
                        f"this worker holds {self.num_kv_heads} of the layer's {heads} KV heads (tensor parallelism); "
                        "A²ATS in vLLM serves one worker per model replica (tensor_parallel_size=1)"
                    )
        return self._retrieval

    def _code_store(self, retrieval: LayerRetrieval, kv_cache: torch.Tensor) -> CodeStore:
        slots = kv_cache.shape[0] * kv_cache.shape[2]
        if self._codes is None or self._codes.num_slots != slots:
            self._codes = retrieval.new_code_store(slots, kv_cache.device)
        return self._codes

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        retrieval = self._layer_retrieval(layer) if isinstance(attn_metadata, A2atsCpuMetadata) else None
        if retrieval is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        md = attn_metadata
        n = md.num_actual_tokens
        store = self._code_store(retrieval, kv_cache)
        if key is not None:  # a layer sharing another's KV cache writes no keys of its own
            retrieval.encode(store, key[:n], md.token_positions[:n], md.slot_mapping[:n])
        result = None
        if md.decodes:
            if self._key_layout is None:
                self._key_layout = key_layout(layer.isa, kv_cache.dtype, self.head_size, kv_cache.shape[2])
            keys, values = paged_views(kv_cache, self._key_layout)
            softcap = self.logits_soft_cap or None
            result = retrieval.decode(
                query[: md.decodes], PagedRows(keys, md.rows), PagedRows(values, md.rows), store, md.step,
                self.scale, softcap,
            )
        if result is None:  # no decode request, or the budget covers every row: vLLM's kernel for the batch
            return super().forward(layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale)
        output[: md.decodes] = result[0].to(output.dtype)
        if md.prefill is not None:
            t = md.decodes  # one token per decode request
            super().forward(
                layer, query[t:], key[t:] if key is not None else None, value[t:] if value is not None else None,
                kv_cache, md.prefill, output[t:], output_scale, output_block_scale,
            )
        return output


class A2atsCpuAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend, with A²ATS decode for an A²ATS checkpoint's retrieved layers."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # vLLM's CPU platform accepts this name only

    @staticmethod
    def get_impl_cls() -> type[A2atsCpuAttentionImpl]:
        return A2atsCpuAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[A2atsCpuMetadataBuilder]:
        return A2atsCpuMetadataBuilder
