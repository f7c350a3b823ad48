"""``a2ats eval``: retrieval quality, long-context tasks and decode-mode perplexity against dense attention."""
