"""The A²ATS runtime: load a converted checkpoint and decode with retrieval attention (see docs/runtime.md)."""
