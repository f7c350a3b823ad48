"""The vLLM plugin: ``vllm serve CONVERTED_DIR`` and ``LLM(model=CONVERTED_DIR)`` decode with A²ATS.

vLLM calls :func:`register` in each of its processes (the ``vllm.general_plugins`` entry point of this package).
It registers the ``a2ats`` quantization method, so a checkpoint whose ``config.json`` names it is accepted
(its weights are plain; the method only marks it), and puts :mod:`.backend`'s attention backend in place of
vLLM's CPU attention backend. That backend serves every other model exactly as vLLM's own does, and for an
A²ATS checkpoint runs prefill through vLLM's kernel and decode through the retrieval of
:mod:`a2ats_tools.serving.retrieval`. Importing this package does not import vLLM; :func:`register` does.
"""

from __future__ import annotations

BACKEND_PATH = "a2ats_tools.serving.vllm.backend.A2atsCpuAttentionBackend"


def register() -> None:
    """Register the quantization method and the attention backend with vLLM (safe to call more than once)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import config  # noqa: F401  (registers the "a2ats" quantization method)

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
