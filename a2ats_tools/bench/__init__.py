"""``a2ats bench``: decode throughput, latency and memory of a converted checkpoint against dense attention."""
