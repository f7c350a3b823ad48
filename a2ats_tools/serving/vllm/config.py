"""The ``a2ats`` quantization method of vLLM: accepts a converted checkpoint and owns its retrieval.

A converted checkpoint's weights are plain tensors; ``quant_method: a2ats`` in its ``config.json`` marks where
retrieval applies. This config leaves every layer unquantized and builds, once per worker process and on first
use, the :class:`~a2ats_tools.serving.retrieval.ServedCheckpoint` its attention layers read.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ...artifacts.model_files import QUANT_METHOD
from ...errors import A2atsError
from ..retrieval import ServedCheckpoint


@register_quantization_config(QUANT_METHOD)
class A2atsVllmConfig(QuantizationConfig):
    """``quantization_config`` of a converted checkpoint (``{"quant_method": "a2ats", "config_file": ...}``)."""

    def __init__(self, entry: dict[str, Any] | None = None):
        super().__init__()
        self.entry = dict(entry or {})
        self._served: tuple[str, ServedCheckpoint] | None = None

    def __getstate__(self) -> dict[str, Any]:  # sent to worker processes: each builds its own retrieval
        state = self.__dict__.copy()
        state["_served"] = None
        return state

    def get_name(self) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> A2atsVllmConfig:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise A2atsError(
                f"A²ATS decode in vLLM runs on vLLM's CPU backend; this vLLM runs on {current_platform.device_name}, "
                "where its own attention would serve the checkpoint densely"
            )
        return cls(config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None

    def served(self, directory: str) -> ServedCheckpoint:
        """The checkpoint's retrieval in this process, built on first use."""
        if self._served is None or self._served[0] != directory:
            self._served = (directory, ServedCheckpoint(directory))
        return self._served[1]
