"""Serving engines that run a converted checkpoint with retrieval attention at decode.

``paged``: a paged KV cache (blocks of rows, one block table per request) as the selection core reads it.
``retrieval``: one retrieved layer's work over such a cache (codes as keys arrive, the decode step), built from a
checkpoint directory with the transformers runtime's own selectors. ``vllm``: the vLLM plugin (needs the
``vllm`` extra); nothing here imports vLLM except that subpackage.
"""
