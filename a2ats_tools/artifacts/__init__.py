"""Stage 3: the converted checkpoint on disk (codebooks, whitening factors, retrieval settings)."""
